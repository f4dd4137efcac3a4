//! Positions as the fund holds them: a symbol names one instrument per asset
//! class (the stock `CL` is not the crude future `CL`); held positions are
//! valued with the multiplier they are booked with; legs of one signal that
//! act on the same position share it (an exit never closes it twice, an
//! entry's `max_position_size` counts them together); a closing delta is
//! sized like the opening one.

mod common;

use common::*;
use mtx_cerebro::{decide, Inputs};
use mtx_schemas::signal::{SignalLeg, SignalMetadata, StandardizedSignal};
use mtx_schemas::{
    Direction, Environment, InstrumentType, OrderType, Side, SignalAction, SignalType, SizingMode,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

fn leg(
    instrument: &str,
    class: InstrumentType,
    side: Side,
    qty: Decimal,
    px: Decimal,
) -> SignalLeg {
    SignalLeg {
        instrument: instrument.into(),
        instrument_type: class,
        side,
        direction: match side {
            Side::Buy => Direction::Long,
            Side::Sell => Direction::Short,
        },
        quantity: qty,
        order_type: OrderType::Market,
        price: Some(px),
        stop_loss: None,
        take_profit: None,
        expiry: None,
        exchange: None,
    }
}

/// A signal of `SPX` with `legs` (FIXED_UNITS unless `mode` says otherwise).
fn signal(
    id: &str,
    action: Option<SignalAction>,
    mode: SizingMode,
    legs: Vec<SignalLeg>,
) -> StandardizedSignal {
    let first = legs[0].clone();
    StandardizedSignal {
        signal_id: id.into(),
        strategy_id: SPX.into(),
        timestamp: t0(),
        instrument: first.instrument.clone(),
        instrument_type: first.instrument_type,
        direction: first.direction,
        action,
        order_type: first.order_type,
        price: first.price,
        quantity: first.quantity,
        stop_loss: None,
        take_profit: None,
        expiry: None,
        metadata: SignalMetadata::default(),
        legs,
        signal_type: action.map(|a| match a {
            SignalAction::Entry => SignalType::Entry,
            SignalAction::Exit => SignalType::Exit,
        }),
        entry_signal_id: None,
        sender_entry_signal_id: None,
        environment: Environment::Staging,
        source: "test".into(),
        sender_signal_id: id.into(),
        signal_sent_at: None,
        received_at: t0(),
        account_equity: Some(dec!(500000)),
        sizing_mode: mode,
    }
}

fn total_sold(inputs: &Inputs, s: &StandardizedSignal) -> Decimal {
    let d = decided(decide(s, inputs));
    assert!(
        d.orders.iter().all(|o| o.side == Side::Sell),
        "{:?}",
        d.orders
    );
    d.orders.iter().map(|o| o.quantity).sum()
}

#[test]
fn a_stock_ticker_that_is_also_a_futures_root_is_sized_as_a_stock() {
    let inputs = base_inputs();
    let colgate = signal(
        "cl_stock",
        Some(SignalAction::Entry),
        SizingMode::FixedUnits,
        vec![leg(
            "CL",
            InstrumentType::Stock,
            Side::Buy,
            dec!(10),
            dec!(80),
        )],
    );
    let d = decided(decide(&colgate, &inputs));
    assert_eq!(d.orders[0].multiplier, dec!(1));
    assert_eq!(d.record.legs[0].notional, dec!(800));
    assert_eq!(d.record.legs[0].margin_required, dec!(200)); // 25 % Reg-T
    let crude = signal(
        "cl_future",
        Some(SignalAction::Entry),
        SizingMode::FixedUnits,
        vec![leg(
            "CL",
            InstrumentType::Future,
            Side::Buy,
            dec!(1),
            dec!(80),
        )],
    );
    let d = decided(decide(&crude, &inputs));
    assert_eq!(d.orders[0].multiplier, dec!(1000));
    assert_eq!(d.record.legs[0].margin_required, dec!(6000));
}

#[test]
fn held_positions_count_in_gross_exposure_with_their_booked_multiplier() {
    let mut inputs = base_inputs();
    inputs.system.max_leverage_global = dec!(1);
    inputs.system.max_margin_utilization_pct = dec!(100);
    // 100 option contracts at 50: 500,000 of notional at ×100.
    hold(
        &mut inputs,
        SPX,
        "SPYC600",
        Direction::Long,
        dec!(100),
        dec!(50),
        dec!(500000),
    );
    acct(&mut inputs).state.open_positions[0].multiplier = Some(dec!(100));
    let buy = signal(
        "aapl",
        Some(SignalAction::Entry),
        SizingMode::FixedUnits,
        vec![leg(
            "AAPL",
            InstrumentType::Stock,
            Side::Buy,
            dec!(6000),
            dec!(100),
        )],
    );
    let d = decided(decide(&buy, &inputs));
    assert_eq!(
        d.record.risk_assessment.gross_exposure_before,
        Some(dec!(500000))
    );
    // 500,000 held + 600,000 asked > 1× equity: shrunk to what fits (at
    // ×1 the held options would have counted 5,000 and all 6,000 passed).
    let q = d.orders[0].quantity;
    assert!(q <= dec!(5000) && q > dec!(4900), "{q}");
}

#[test]
fn two_exit_legs_on_one_position_never_close_more_than_it_holds() {
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "GC",
        Direction::Long,
        dec!(2),
        dec!(4000),
        dec!(33000),
    );
    // Two months of one root, both LONG: one merged GC position of 2.
    let gc = |qty| leg("GC", InstrumentType::Future, Side::Sell, qty, dec!(4000));
    let exit = signal(
        "gc_exit",
        Some(SignalAction::Exit),
        SizingMode::FixedUnits,
        vec![gc(dec!(1)), gc(dec!(1))],
    );
    let mut exit = exit;
    for l in &mut exit.legs {
        l.direction = Direction::Long;
    }
    exit.direction = Direction::Long;
    assert_eq!(total_sold(&inputs, &exit), dec!(2));

    // An untyped order whose two legs each sell the whole position sells
    // it once: a delta close never flips.
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(10),
        dec!(100),
        dec!(250),
    );
    let aapl = || {
        leg(
            "AAPL",
            InstrumentType::Stock,
            Side::Sell,
            dec!(10),
            dec!(100),
        )
    };
    let delta = signal(
        "aapl_delta",
        None,
        SizingMode::DeltaUnits,
        vec![aapl(), aapl()],
    );
    assert_eq!(total_sold(&inputs, &delta), dec!(10));
}

#[test]
fn max_position_size_counts_every_leg_that_adds_to_the_position() {
    let mut inputs = base_inputs();
    limits(&mut inputs).max_position_size = Some(dec!(10000));
    let aapl = || {
        leg(
            "AAPL",
            InstrumentType::Stock,
            Side::Buy,
            dec!(60),
            dec!(100),
        )
    };
    let entry = signal(
        "two_legs",
        Some(SignalAction::Entry),
        SizingMode::FixedUnits,
        vec![aapl(), aapl()],
    );
    let d = decided(decide(&entry, &inputs));
    let notional: Decimal = d.orders.iter().map(|o| o.quantity * dec!(100)).sum();
    // Each leg alone (6,000) fits; together (12,000) they are shrunk.
    assert!(notional <= dec!(10000), "{notional}");
    assert!(notional >= dec!(9800), "{notional}");
}

#[test]
fn a_closing_delta_is_sized_like_the_opening_one() {
    // SENDER_EQUITY_RATIO: the sender (equity 500,000) buys 10, then sells
    // 10. Opening: 10 × 893,600 allocated / 500,000 = 17.87 → 17 shares.
    let mut inputs = base_inputs();
    let aapl = |side| leg("AAPL", InstrumentType::Stock, side, dec!(10), dec!(100));
    let open = signal(
        "open",
        None,
        SizingMode::SenderEquityRatio,
        vec![aapl(Side::Buy)],
    );
    let bought = decided(decide(&open, &inputs)).orders[0].quantity;
    assert_eq!(bought, dec!(17));
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        bought,
        dec!(100),
        bought * dec!(25),
    );
    let close = signal(
        "close",
        None,
        SizingMode::SenderEquityRatio,
        vec![aapl(Side::Sell)],
    );
    // The sender is flat, and so is the fund (not 7 shares left over).
    assert_eq!(total_sold(&inputs, &close), bought);
}
