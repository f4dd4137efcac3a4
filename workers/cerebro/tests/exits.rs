//! EXIT / SCALE_OUT / CANCEL / delta orders: never more than open, never
//! flipping, never blocked by the kill switch or a zero allocation, deferred
//! while the entry has not filled.

mod common;

use common::*;
use mtx_cerebro::{decide, decide_with, DecideOptions, DecisionOutput, DeferReason, Reason};
use mtx_schemas::ids::order_id;
use mtx_schemas::order::OpenOrder;
use mtx_schemas::{
    Decision, Direction, OrderStatus, OrderType, Side, SignalAction, SignalType, StrategyStatus,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

const EXPIRED: DecideOptions = DecideOptions {
    entry_wait_expired: true,
};

/// The AAPL entry decided (17 shares) and its record with `filled` shares.
fn aapl_entry(
    filled: Decimal,
    status: OrderStatus,
) -> (
    mtx_cerebro::Inputs,
    Vec<mtx_schemas::signal::StandardizedSignal>,
) {
    let sigs = fixture("equity_simple_signal_1.json");
    let mut inputs = base_inputs();
    let entry = decided(decide(&sigs[0], &inputs));
    let rec = entry_record(&sigs[0], &entry, &[filled], status);
    inputs.entries.insert(sigs[0].signal_id.clone(), rec);
    if filled > Decimal::ZERO {
        let margin = filled * dec!(150) * dec!(0.25);
        hold(
            &mut inputs,
            SPX,
            "AAPL",
            Direction::Long,
            filled,
            dec!(150),
            margin,
        );
    }
    (inputs, sigs)
}

#[test]
fn exit_closes_the_entry_position() {
    let (inputs, sigs) = aapl_entry(dec!(17), OrderStatus::Filled);
    let exit = &sigs[1];
    assert_eq!(
        exit.entry_signal_id.as_deref(),
        Some(sigs[0].signal_id.as_str())
    );
    let out = decided(decide(exit, &inputs));
    assert_decision(&out, Decision::Approved);
    let o = &out.orders[0];
    assert_eq!(o.order_id, order_id(&exit.signal_id, 0));
    assert_eq!(
        (o.action, o.side, o.direction),
        (SignalAction::Exit, Side::Sell, Direction::Long)
    );
    assert_eq!(o.quantity, dec!(17));
    assert_eq!(o.stop_loss, None);
    let ra = &out.record.risk_assessment;
    assert_eq!(ra.portfolio_margin_before, Some(dec!(106.25) * dec!(6)));
    assert_eq!(ra.margin_released, Some(dec!(637.50)));
    assert_eq!(ra.portfolio_margin_after, Some(dec!(0)));
    assert_eq!(out.reservation.margin, Decimal::ZERO);
}

#[test]
fn kill_switch_blocks_entries_but_not_exits() {
    let (mut inputs, sigs) = aapl_entry(dec!(17), OrderStatus::Filled);
    inputs.system.trading_enabled = false;
    let entry = decided(decide(&sigs[0], &inputs));
    assert_decision(&entry, Decision::Rejected);
    assert_eq!(entry.record.reason_detail, Some(Reason::KillSwitch));
    let exit = decided(decide(&sigs[1], &inputs));
    assert_decision(&exit, Decision::Approved);
    assert_eq!(exit.orders[0].quantity, dec!(17));
}

#[test]
fn exits_pass_with_zero_allocation_and_an_inactive_strategy() {
    let (mut inputs, sigs) = aapl_entry(dec!(17), OrderStatus::Filled);
    inputs
        .allocation
        .as_mut()
        .unwrap()
        .allocations
        .insert(SPX.into(), dec!(0));
    inputs.strategies.get_mut(SPX).unwrap().status = StrategyStatus::Inactive;
    assert_decision(&decided(decide(&sigs[0], &inputs)), Decision::Rejected);
    let exit = decided(decide(&sigs[1], &inputs));
    assert_decision(&exit, Decision::Approved);
    assert_eq!(exit.orders[0].quantity, dec!(17));
}

#[test]
fn exit_before_entry_fill_is_deferred_then_completes() {
    let (mut inputs, sigs) = aapl_entry(dec!(0), OrderStatus::Submitted);
    let exit = &sigs[1];
    assert_eq!(
        decide(exit, &inputs),
        DecisionOutput::Defer {
            signal_id: exit.signal_id.clone(),
            reason: DeferReason::EntryNotFilled {
                entry_signal_id: sigs[0].signal_id.clone()
            }
        }
    );
    // Meanwhile other signals are decided normally.
    let other = &fixture("futures_gold_simple_signal_1.json")[0];
    assert_decision(&decided(decide(other, &inputs)), Decision::Approved);

    // The fill is known but not yet booked by the accounts stage: still deferred.
    let rec = inputs.entries.get_mut(&sigs[0].signal_id).unwrap();
    rec.legs[0].filled_quantity = dec!(17);
    rec.legs[0].status = OrderStatus::Filled;
    assert!(matches!(
        decide(exit, &inputs),
        DecisionOutput::Defer {
            reason: DeferReason::PositionNotBooked { .. },
            ..
        }
    ));
    // Booked: the exit completes.
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(17),
        dec!(150),
        dec!(637.50),
    );
    let out = decided(decide(exit, &inputs));
    assert_decision(&out, Decision::Approved);
    assert_eq!(out.orders[0].quantity, dec!(17));
}

#[test]
fn exit_of_an_entry_never_seen_defers_then_falls_back_to_the_position() {
    let sigs = fixture("equity_simple_signal_1.json");
    let mut inputs = base_inputs();
    assert!(matches!(
        decide(&sigs[1], &inputs),
        DecisionOutput::Defer {
            reason: DeferReason::EntryUnknown { .. },
            ..
        }
    ));
    // The worker gave up waiting: close the strategy's AAPL long.
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(12),
        dec!(150),
        dec!(450),
    );
    let out = decided(decide_with(&sigs[1], &inputs, EXPIRED));
    assert_decision(&out, Decision::Approved);
    assert_eq!(out.orders[0].quantity, dec!(12));
    // Nothing held: nothing to close.
    let out = decided(decide_with(&sigs[1], &base_inputs(), EXPIRED));
    assert_decision(&out, Decision::Rejected);
    assert_eq!(
        out.record.reason_detail,
        Some(Reason::NothingToClose {
            leg: 0,
            instrument: "AAPL".into(),
            direction: Direction::Long
        })
    );
}

#[test]
fn unfilled_entry_is_cancelled_once_the_wait_expired() {
    let (inputs, sigs) = aapl_entry(dec!(0), OrderStatus::Accepted);
    let out = decided(decide_with(&sigs[1], &inputs, EXPIRED));
    assert_decision(&out, Decision::Approved);
    assert!(out.orders.is_empty());
    assert_eq!(out.cancels.len(), 1);
    assert_eq!(out.cancels[0].order_id, order_id(&sigs[0].signal_id, 0));
}

#[test]
fn exit_of_a_partially_filled_entry_closes_the_fill_and_cancels_the_rest() {
    let (inputs, sigs) = aapl_entry(dec!(9), OrderStatus::PartiallyFilled);
    let out = decided(decide(&sigs[1], &inputs));
    assert_decision(&out, Decision::Approved);
    assert_eq!(out.orders[0].quantity, dec!(9));
    assert_eq!(out.cancels.len(), 1);
    assert_eq!(out.cancels[0].order_id, order_id(&sigs[0].signal_id, 0));
    assert_eq!(out.cancels[0].account, ACCOUNT);
}

#[test]
fn exit_of_a_rejected_entry_is_rejected() {
    let sigs = fixture("equity_simple_signal_1.json");
    let mut inputs = base_inputs();
    inputs.system.trading_enabled = false;
    let entry = decided(decide(&sigs[0], &inputs));
    let rec = entry_record(&sigs[0], &entry, &[], OrderStatus::Rejected);
    inputs.entries.insert(sigs[0].signal_id.clone(), rec);
    let out = decided(decide(&sigs[1], &inputs));
    assert_decision(&out, Decision::Rejected);
    assert_eq!(
        out.record.reason_detail,
        Some(Reason::EntryNotOpened {
            entry_signal_id: sigs[0].signal_id.clone(),
            state: "REJECTED".into()
        })
    );
}

#[test]
fn ladder_exits_never_exceed_what_is_open() {
    // ENTRY_2 sent 7 (Cerebro bought 12); its EXIT sends 15 > 7.
    let sigs = fixture("equity_ladder_signal_1.json");
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(17),
        dec!(150),
        dec!(637.50),
    );
    let e2 = decided(decide(&sigs[1], &inputs));
    assert_eq!(e2.orders[0].quantity, dec!(12));
    let rec = entry_record(&sigs[1], &e2, &[dec!(12)], OrderStatus::Filled);
    inputs.entries.insert(sigs[1].signal_id.clone(), rec);
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(12),
        dec!(151),
        dec!(453),
    );
    let exit2 = &sigs[4];
    assert_eq!(
        exit2.entry_signal_id.as_deref(),
        Some(sigs[1].signal_id.as_str())
    );
    let out = decided(decide(exit2, &inputs));
    assert_decision(&out, Decision::Modified);
    // 15 / 7 of 12 = 25.71 → 25 requested; 12 open → 12.
    assert_eq!(
        out.record.reason_detail,
        Some(Reason::ExitClamped {
            leg: 0,
            instrument: "AAPL".into(),
            requested: dec!(25),
            open: dec!(12)
        })
    );
    assert_eq!(out.orders[0].quantity, dec!(12));
    assert_eq!(
        (out.record.original_quantity, out.record.final_quantity),
        (dec!(25), dec!(12))
    );
}

#[test]
fn partial_exits_scale_with_the_sender_and_end_flat() {
    // ENTRY_1 sent 10 (17 bought); EXIT of 5 closes 8 (17 × 5/10 = 8.5 → 8);
    // the next EXIT of the remaining 5 closes the other 9.
    let (mut inputs, sigs) = aapl_entry(dec!(17), OrderStatus::Filled);
    let mut exit = sigs[1].clone();
    exit.legs[0].quantity = dec!(5);
    let out = decided(decide(&exit, &inputs));
    assert_decision(&out, Decision::Approved);
    assert_eq!(out.orders[0].quantity, dec!(8));
    // The worker books the approved exit on the entry and the fill on the account.
    let rec = inputs.entries.get_mut(&sigs[0].signal_id).unwrap();
    rec.legs[0].closed_quantity = dec!(8);
    rec.legs[0].sender_quantity_exited = dec!(5);
    let a = acct(&mut inputs);
    a.state.open_positions[0].quantity = dec!(9);
    exit.signal_id.push_str("-2");
    let out = decided(decide(&exit, &inputs));
    assert_eq!(out.orders[0].quantity, dec!(9));
}

#[test]
fn pairs_exit_closes_both_legs() {
    let sigs = fixture("equity_pairs_signal_1.json");
    let mut inputs = base_inputs();
    let entry = decided(decide(&sigs[0], &inputs));
    let rec = entry_record(&sigs[0], &entry, &[dec!(17), dec!(17)], OrderStatus::Filled);
    inputs.entries.insert(sigs[0].signal_id.clone(), rec);
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(17),
        dec!(150),
        dec!(637.5),
    );
    hold(
        &mut inputs,
        SPX,
        "NVDA",
        Direction::Short,
        dec!(17),
        dec!(500),
        dec!(2125),
    );
    let out = decided(decide(&sigs[1], &inputs));
    assert_decision(&out, Decision::Approved);
    let sides: Vec<_> = out
        .orders
        .iter()
        .map(|o| (o.instrument.as_str(), o.side, o.direction, o.quantity))
        .collect();
    assert_eq!(
        sides,
        vec![
            ("AAPL", Side::Sell, Direction::Long, dec!(17)),
            ("NVDA", Side::Buy, Direction::Short, dec!(17)),
        ]
    );
    assert_eq!(
        out.record.risk_assessment.margin_released,
        Some(dec!(2762.5))
    );
}

#[test]
fn delta_order_closes_but_never_flips() {
    // Untyped BUY 10 AAPL while the strategy is short 4: closes the 4, no flip.
    let mut sig = fixture("equity_simple_signal_1.json")[0].clone();
    sig.signal_type = None;
    sig.action = None;
    sig.sizing_mode = mtx_schemas::SizingMode::DeltaUnits;
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Short,
        dec!(4),
        dec!(150),
        dec!(150),
    );
    let out = decided(decide(&sig, &inputs));
    assert_decision(&out, Decision::Modified);
    let o = &out.orders[0];
    assert_eq!(
        (o.action, o.side, o.direction, o.quantity),
        (SignalAction::Exit, Side::Buy, Direction::Short, dec!(4))
    );
    assert_eq!(out.record.reason_code, "exit_clamped");
    // With no opposite position it opens (DELTA_UNITS: 10 as sent).
    let out = decided(decide(&sig, &base_inputs()));
    assert_eq!(
        (out.orders[0].action, out.orders[0].quantity),
        (SignalAction::Entry, dec!(10))
    );
}

#[test]
fn scale_out_without_link_converts_units_and_clamps() {
    let mut sig = fixture("equity_simple_signal_1.json")[1].clone();
    sig.signal_type = Some(SignalType::ScaleOut);
    sig.entry_signal_id = None;
    sig.legs[0].quantity = dec!(5);
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(20),
        dec!(150),
        dec!(750),
    );
    // 5 × allocated 893,600 / 500,000 = 8.936 → 8.
    let out = decided(decide(&sig, &inputs));
    assert_eq!(out.orders[0].quantity, dec!(8));
}

#[test]
fn cancel_sends_cancel_commands_for_working_entry_orders() {
    let sigs = fixture("equity_offmarket_signal_1.json");
    let cancel = &sigs[1];
    assert_eq!(cancel.signal_type, Some(SignalType::Cancel));
    let mut inputs = base_inputs();
    // Unknown entry: deferred.
    assert!(matches!(
        decide(cancel, &inputs),
        DecisionOutput::Defer { .. }
    ));
    let entry = decided(decide(&sigs[0], &inputs));
    inputs.entries.insert(
        sigs[0].signal_id.clone(),
        entry_record(&sigs[0], &entry, &[dec!(0)], OrderStatus::Accepted),
    );
    let out = decided(decide(cancel, &inputs));
    assert_decision(&out, Decision::Approved);
    assert!(out.orders.is_empty());
    assert_eq!(out.cancels.len(), 1);
    assert_eq!(out.cancels[0].order_id, order_id(&sigs[0].signal_id, 0));
    assert_eq!(out.cancels[0].account, ACCOUNT);
    // Kill switch on: cancels still pass.
    inputs.system.trading_enabled = false;
    assert_decision(&decided(decide(cancel, &inputs)), Decision::Approved);
    // Already filled: nothing to cancel.
    inputs.entries.get_mut(&sigs[0].signal_id).unwrap().legs[0].status = OrderStatus::Filled;
    let out = decided(decide(cancel, &inputs));
    assert_decision(&out, Decision::Rejected);
    assert_eq!(
        out.record.reason_detail,
        Some(Reason::NothingToCancel {
            entry_signal_id: sigs[0].signal_id.clone()
        })
    );
}

#[test]
fn cancel_after_wait_uses_deterministic_order_ids() {
    let sigs = fixture("equity_offmarket_signal_1.json");
    let mut inputs = base_inputs();
    let id = order_id(&sigs[0].signal_id, 0);
    acct(&mut inputs).state.open_orders.push(OpenOrder {
        order_id: id.clone(),
        instrument: "AAPL".into(),
        side: Side::Buy,
        quantity: dec!(17),
        order_type: OrderType::Market,
        price: None,
    });
    let out = decided(decide_with(&sigs[1], &inputs, EXPIRED));
    assert_eq!(
        out.cancels
            .iter()
            .map(|c| c.order_id.clone())
            .collect::<Vec<_>>(),
        vec![id]
    );
}

#[test]
fn cancel_without_entry_link_is_rejected() {
    let mut sig = fixture("equity_offmarket_signal_1.json")[1].clone();
    sig.entry_signal_id = None;
    let out = decided(decide(&sig, &base_inputs()));
    assert_decision(&out, Decision::Rejected);
    assert_eq!(
        out.record.reason_detail,
        Some(Reason::MissingEntryLink {
            signal_type: "CANCEL".into()
        })
    );
}
