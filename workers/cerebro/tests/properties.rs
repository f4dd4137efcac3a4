//! Properties over random accounts, allocations, limits and signals:
//! an APPROVED / MODIFIED entry never exceeds its pre-check size or any
//! limit (margin never exceeds what is available), and an exit never closes
//! more than is open or flips the position.

mod common;

use std::sync::OnceLock;

use common::*;
use mtx_cerebro::{decide, DecisionOutput};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::{
    Decision, Direction, InstrumentType, OrderStatus, Side, SignalAction, SizingMode,
};
use proptest::prelude::*;
use rust_decimal::Decimal;

fn template() -> &'static (StandardizedSignal, StandardizedSignal) {
    static T: OnceLock<(StandardizedSignal, StandardizedSignal)> = OnceLock::new();
    T.get_or_init(|| {
        let s = fixture("equity_simple_signal_1.json");
        let p = fixture("equity_pairs_signal_1.json");
        (s[0].clone(), p[0].clone())
    })
}

const INSTRUMENTS: [(&str, InstrumentType); 5] = [
    ("AAPL", InstrumentType::Stock),
    ("GC", InstrumentType::Future),
    ("BTC", InstrumentType::Crypto),
    ("EURUSD", InstrumentType::Forex),
    ("SPY", InstrumentType::Option),
];

fn dec(units: i64, scale: u32) -> Decimal {
    Decimal::new(units, scale)
}

#[derive(Debug, Clone)]
struct Case {
    equity: i64,
    alloc_bp: i64,
    sender_equity: i64,
    mode: u8,
    pair: bool,
    legs: [(usize, i64, i64); 2],
    margin_used_pct: i64,
    deployed_pct: i64,
    reserved: i64,
    cap_pct: i64,
    lev_tenths: i64,
    max_pos: Option<i64>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (
            10_000i64..10_000_000,
            1i64..30_000,
            1_000i64..5_000_000,
            0u8..3,
            any::<bool>(),
        ),
        [
            (0usize..5, 1i64..100_000, 50i64..500_000),
            (0usize..5, 1i64..100_000, 50i64..500_000),
        ],
        (
            0i64..100,
            0i64..120,
            0i64..50_000,
            10i64..=100,
            1i64..60,
            proptest::option::of(100i64..2_000_000),
        ),
    )
        .prop_map(
            |(
                (equity, alloc_bp, sender_equity, mode, pair),
                legs,
                (mu, dp, reserved, cap, lev, max_pos),
            )| Case {
                equity,
                alloc_bp,
                sender_equity,
                mode,
                pair,
                legs,
                margin_used_pct: mu,
                deployed_pct: dp,
                reserved,
                cap_pct: cap,
                lev_tenths: lev,
                max_pos,
            },
        )
}

fn build(c: &Case) -> (StandardizedSignal, mtx_cerebro::Inputs) {
    let (single, pair) = template();
    let mut sig = if c.pair { pair.clone() } else { single.clone() };
    sig.sizing_mode = match c.mode {
        0 => SizingMode::SenderEquityRatio,
        1 => SizingMode::FixedUnits,
        _ => SizingMode::TargetWeight,
    };
    sig.account_equity = Some(Decimal::from(c.sender_equity));
    for (leg, (inst, qty, price)) in sig.legs.iter_mut().zip(c.legs) {
        let (sym, ty) = INSTRUMENTS[inst];
        leg.instrument = sym.into();
        leg.instrument_type = ty;
        // qty in hundredths; TARGET_WEIGHT reads it as a fraction (÷ 100,000).
        leg.quantity = if c.mode == 2 {
            dec(qty, 5)
        } else {
            dec(qty, 2)
        };
        leg.price = Some(dec(price, 2));
    }
    let mut inputs = base_inputs();
    let equity = Decimal::from(c.equity);
    let pct = dec(c.alloc_bp, 2);
    inputs
        .allocation
        .as_mut()
        .unwrap()
        .allocations
        .insert(SPX.into(), pct);
    inputs.system.max_margin_utilization_pct = Decimal::from(c.cap_pct);
    inputs.system.max_leverage_global = dec(c.lev_tenths, 1);
    limits(&mut inputs).max_position_size = c.max_pos.map(Decimal::from);
    let a = acct(&mut inputs);
    a.state = account_state(equity);
    let used = equity * Decimal::from(c.margin_used_pct) / Decimal::ONE_HUNDRED;
    let deployed = (equity * pct / Decimal::ONE_HUNDRED * Decimal::from(c.deployed_pct)
        / Decimal::ONE_HUNDRED)
        .min(used);
    hold(
        &mut inputs,
        SPX,
        "TLT",
        Direction::Long,
        Decimal::ONE,
        Decimal::ONE,
        deployed,
    );
    hold(
        &mut inputs,
        "Forex",
        "EURUSD",
        Direction::Short,
        Decimal::ONE,
        Decimal::ONE,
        used - deployed,
    );
    acct(&mut inputs).reserved.insert(
        "Forex".into(),
        mtx_cerebro::Reservation {
            margin: Decimal::from(c.reserved),
            notional: Decimal::from(c.reserved),
        },
    );
    (sig, inputs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn approved_entries_respect_every_limit(c in case()) {
        let (sig, inputs) = build(&c);
        let out = match decide(&sig, &inputs) {
            DecisionOutput::Decided(d) => *d,
            DecisionOutput::Defer { .. } => panic!("entry deferred"),
        };
        let r = &out.record;
        if r.decision == Decision::Rejected {
            prop_assert!(out.orders.is_empty());
            prop_assert!(r.reason_detail.is_some());
            return Ok(());
        }
        prop_assert_eq!(out.orders.len(), sig.legs.len());
        prop_assert_eq!(r.decision == Decision::Modified, r.reason_detail.is_some());
        let ra = &r.risk_assessment;
        let acct = &inputs.accounts[ACCOUNT];
        let equity = acct.state.equity;
        let reserved = acct.reserved_total().unwrap();
        let mut margin = Decimal::ZERO;
        for (o, l) in out.orders.iter().zip(&r.legs) {
            prop_assert!(o.quantity > Decimal::ZERO);
            prop_assert!(o.quantity <= l.original_quantity, "final {} > pre-check {}", o.quantity, l.original_quantity);
            prop_assert_eq!(o.quantity, l.final_quantity);
            prop_assert_eq!((o.quantity / l.lot_size).fract(), Decimal::ZERO);
            prop_assert_eq!(o.side, mtx_schemas::order::order_side(SignalAction::Entry, o.direction));
            if let Some(limit) = c.max_pos {
                prop_assert!(l.notional <= Decimal::from(limit));
            }
            margin += l.margin_required;
        }
        prop_assert_eq!(out.reservation.margin, margin);
        // Margin never exceeds what is available.
        prop_assert!(margin <= ra.available_capital.unwrap(), "margin {} > strategy available {:?}", margin, ra.available_capital);
        prop_assert!(margin <= acct.state.margin_available - reserved.margin);
        let after = ra.portfolio_margin_after.unwrap();
        prop_assert_eq!(after, acct.state.margin_used + reserved.margin + margin);
        prop_assert!(after * Decimal::ONE_HUNDRED <= Decimal::from(c.cap_pct) * equity);
        prop_assert!(ra.gross_exposure_after.unwrap() <= inputs.system.max_leverage_global * equity);
    }

    #[test]
    fn exits_never_exceed_the_open_position_nor_flip(
        held in 1i64..10_000,
        filled in 0i64..10_000,
        closed in 0i64..10_000,
        sender_entry in 1i64..1_000,
        sender_exit in 1i64..2_000,
        exited in 0i64..1_000,
        short in any::<bool>(),
    ) {
        let sigs = fixture("equity_simple_signal_1.json");
        let (mut entry, mut exit) = (sigs[0].clone(), sigs[1].clone());
        let direction = if short { Direction::Short } else { Direction::Long };
        let (entry_side, exit_side) = if short { (Side::Sell, Side::Buy) } else { (Side::Buy, Side::Sell) };
        entry.legs[0].direction = direction;
        entry.legs[0].side = entry_side;
        entry.legs[0].quantity = Decimal::from(sender_entry);
        exit.legs[0].direction = direction;
        exit.legs[0].side = exit_side;
        exit.legs[0].quantity = Decimal::from(sender_exit);
        let mut inputs = base_inputs();
        let e = decided(decide(&entry, &inputs));
        prop_assume!(!e.orders.is_empty());
        let mut rec = entry_record(&entry, &e, &[Decimal::from(filled)], OrderStatus::Filled);
        rec.legs[0].closed_quantity = Decimal::from(closed.min(filled));
        rec.legs[0].sender_quantity_exited = Decimal::from(exited);
        let entry_open = rec.legs[0].open_quantity();
        inputs.entries.insert(entry.signal_id.clone(), rec);
        hold(&mut inputs, SPX, "AAPL", direction, Decimal::from(held), Decimal::from(150), Decimal::ONE);
        // A different strategy's opposite position must not be touched.
        hold(&mut inputs, "Forex", "AAPL", direction, Decimal::from(99_999), Decimal::from(150), Decimal::ONE);
        let out = decided(decide(&exit, &inputs));
        let total: Decimal = out.orders.iter().map(|o| o.quantity).sum();
        prop_assert!(total <= Decimal::from(held));
        prop_assert!(total <= entry_open);
        for o in &out.orders {
            prop_assert_eq!(o.action, SignalAction::Exit);
            prop_assert_eq!(o.direction, direction);
            prop_assert_eq!(o.side, exit_side);
        }
        if entry_open.is_zero() {
            prop_assert!(out.orders.is_empty());
        }
    }
}
