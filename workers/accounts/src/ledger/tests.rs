use super::*;
use crate::spec::MarginModel;
use chrono::{Duration, TimeZone};
use proptest::prelude::*;
use rust_decimal_macros::dec;

const ACC: &str = "IBKR_Main";
const STRAT: &str = "SPX_1-D_Opt";

fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 3, 14, 30, 0).unwrap() + Duration::seconds(secs)
}

/// A STOCK fill for `ACC` / `STRAT`.
fn fill(
    id: &str,
    instrument: &str,
    action: SignalAction,
    side: Side,
    qty: Decimal,
    price: Decimal,
) -> ExecutionConfirmation {
    ExecutionConfirmation {
        execution_id: id.into(),
        order_id: format!("ord_{id}"),
        account: ACC.into(),
        strategy_id: STRAT.into(),
        instrument: instrument.into(),
        instrument_type: InstrumentType::Stock,
        direction: position_direction(action, side),
        action,
        side,
        quantity: qty,
        price,
        commission: Decimal::ZERO,
        multiplier: Decimal::ONE,
        status: ExecutionStatus::Filled,
        broker_response: serde_json::Value::Null,
        timestamp: t(0),
    }
}

fn with_commission(mut x: ExecutionConfirmation, c: Decimal) -> ExecutionConfirmation {
    x.commission = c;
    x
}

fn config(initial: Decimal) -> LedgerConfig {
    LedgerConfig {
        default_initial_balance: initial,
        ..LedgerConfig::default()
    }
}

fn key(instrument: &str, direction: Direction) -> PositionKey {
    PositionKey {
        account: ACC.into(),
        strategy_id: STRAT.into(),
        instrument: instrument.into(),
        direction,
    }
}

use Side::{Buy, Sell};
use SignalAction::{Entry, Exit};

#[test]
fn long_entry_and_exit_with_profit() {
    let mut l = Ledger::new(config(dec!(100000)));
    l.apply(&with_commission(
        fill("e1", "AAPL", Entry, Buy, dec!(10), dec!(150)),
        dec!(1),
    ))
    .unwrap();

    let s = l.snapshot(ACC, t(1));
    assert_eq!(s.cash_balance, dec!(99999));
    assert_eq!(s.unrealized_pnl, dec!(0));
    assert_eq!(s.margin_used, dec!(375)); // 10 * 150 * 25%
    assert_eq!(s.margin_available, dec!(99624));
    assert_eq!(s.open_positions.len(), 1);
    let p = &s.open_positions[0];
    assert_eq!(
        (p.direction, p.quantity, p.entry_price),
        (Direction::Long, dec!(10), dec!(150))
    );

    l.mark("AAPL", dec!(151));
    let s = l.snapshot(ACC, t(2));
    assert_eq!(s.unrealized_pnl, dec!(10));
    assert_eq!(s.equity, dec!(100009));
    assert_eq!(s.margin_used, dec!(377.5));
    assert_eq!(s.open_positions[0].current_price, dec!(151));

    let r = l
        .apply(&with_commission(
            fill("x1", "AAPL", Exit, Sell, dec!(10), dec!(152)),
            dec!(1),
        ))
        .unwrap();
    assert_eq!(
        r,
        Applied::Booked {
            realized_pnl: dec!(20)
        }
    );
    let s = l.snapshot(ACC, t(3));
    assert_eq!(s.realized_pnl, dec!(20));
    assert_eq!(s.commissions, dec!(2));
    assert_eq!(s.cash_balance, dec!(100018));
    assert_eq!(s.equity, dec!(100018));
    assert_eq!(s.unrealized_pnl, dec!(0));
    assert_eq!(s.margin_used, dec!(0));
    assert_eq!(s.margin_available, dec!(100018));
    assert!(s.open_positions.is_empty());
    assert!(s.deployed_capital.is_empty());
}

#[test]
fn short_entry_and_exit_pnl_sign() {
    let mut l = Ledger::new(config(dec!(100000)));
    l.apply(&fill("e1", "NVDA", Entry, Sell, dec!(10), dec!(500)))
        .unwrap();
    let k = key("NVDA", Direction::Short);
    assert_eq!(l.position(&k).unwrap().quantity, dec!(10));

    l.mark("NVDA", dec!(490));
    assert_eq!(
        l.snapshot(ACC, t(1)).unrealized_pnl,
        dec!(100),
        "short gains when price falls"
    );
    l.mark("NVDA", dec!(510));
    assert_eq!(l.snapshot(ACC, t(1)).unrealized_pnl, dec!(-100));

    let r = l
        .apply(&fill("x1", "NVDA", Exit, Buy, dec!(10), dec!(505)))
        .unwrap();
    assert_eq!(
        r,
        Applied::Booked {
            realized_pnl: dec!(-50)
        }
    );
    let s = l.snapshot(ACC, t(2));
    assert_eq!(s.realized_pnl, dec!(-50));
    assert_eq!(s.cash_balance, dec!(99950));
    assert!(l.position(&k).is_none());

    // And a profitable short: sell 100, cover 90.
    l.apply(&fill("e2", "NVDA", Entry, Sell, dec!(4), dec!(100)))
        .unwrap();
    let r = l
        .apply(&fill("x2", "NVDA", Exit, Buy, dec!(4), dec!(90)))
        .unwrap();
    assert_eq!(
        r,
        Applied::Booked {
            realized_pnl: dec!(40)
        }
    );
}

#[test]
fn ladder_of_entries_with_partial_exits() {
    // The equity ladder fixture: 10@150, 7@151, 13@152, then exits 5, 15, 10.
    let mut l = Ledger::new(config(dec!(500000)));
    l.apply(&fill("e1", "AAPL", Entry, Buy, dec!(10), dec!(150)))
        .unwrap();
    l.apply(&fill("e2", "AAPL", Entry, Buy, dec!(7), dec!(151)))
        .unwrap();
    l.apply(&fill("e3", "AAPL", Entry, Buy, dec!(13), dec!(152)))
        .unwrap();
    let k = key("AAPL", Direction::Long);
    let p = l.position(&k).unwrap();
    // (1500 + 1057 + 1976) / 30 = 4533 / 30
    assert_eq!(p.quantity, dec!(30));
    assert_eq!(p.cost_basis, dec!(4533));
    assert_eq!(p.avg_entry_price(), dec!(151.1));

    let pnl = |r: Applied| match r {
        Applied::Booked { realized_pnl } => realized_pnl,
        other => panic!("{other:?}"),
    };
    // (153 - 151.1) * 5
    assert_eq!(
        pnl(l
            .apply(&fill("x1", "AAPL", Exit, Sell, dec!(5), dec!(153)))
            .unwrap()),
        dec!(9.5)
    );
    let p = l.position(&k).unwrap();
    assert_eq!(
        (p.quantity, p.avg_entry_price()),
        (dec!(25), dec!(151.1)),
        "exits keep the average"
    );
    // (154 - 151.1) * 15
    assert_eq!(
        pnl(l
            .apply(&fill("x2", "AAPL", Exit, Sell, dec!(15), dec!(154)))
            .unwrap()),
        dec!(43.5)
    );
    l.mark("AAPL", dec!(156));
    let s = l.snapshot(ACC, t(1));
    assert_eq!(s.open_positions[0].quantity, dec!(10));
    assert_eq!(s.unrealized_pnl, dec!(49)); // (156 - 151.1) * 10
                                            // (155 - 151.1) * 10
    assert_eq!(
        pnl(l
            .apply(&fill("x3", "AAPL", Exit, Sell, dec!(10), dec!(155)))
            .unwrap()),
        dec!(39)
    );
    let s = l.snapshot(ACC, t(2));
    assert_eq!(s.realized_pnl, dec!(92)); // 4625 proceeds - 4533 cost
    assert_eq!(s.cash_balance, dec!(500092));
    assert!(s.open_positions.is_empty());
}

#[test]
fn pairs_entry_and_exit() {
    // The pairs fixture: long AAPL / short NVDA, exit legs written with the
    // sender's `direction` (SHORT for the AAPL exit, LONG for the NVDA exit).
    let mut l = Ledger::new(config(dec!(500000)));
    l.apply(&fill("e1", "AAPL", Entry, Buy, dec!(10), dec!(150)))
        .unwrap();
    l.apply(&fill("e2", "NVDA", Entry, Sell, dec!(10), dec!(500)))
        .unwrap();
    l.mark("AAPL", dec!(151));
    l.mark("NVDA", dec!(498));
    let s = l.snapshot(ACC, t(1));
    assert_eq!(s.unrealized_pnl, dec!(30)); // +10 long, +20 short
    assert_eq!(s.margin_used, dec!(1622.5)); // 377.5 + 1245
    assert_eq!(s.deployed_capital.get(STRAT), Some(&dec!(1622.5)));
    assert_eq!(s.equity, dec!(500030));
    assert_eq!(s.margin_available, dec!(498407.5));

    let mut aapl_exit = fill("x1", "AAPL", Exit, Sell, dec!(10), dec!(152));
    aapl_exit.direction = Direction::Short;
    let mut nvda_exit = fill("x2", "NVDA", Exit, Buy, dec!(10), dec!(505));
    nvda_exit.direction = Direction::Long;
    l.apply(&aapl_exit).unwrap();
    l.apply(&nvda_exit).unwrap();
    let s = l.snapshot(ACC, t(2));
    assert_eq!(s.realized_pnl, dec!(-30)); // +20 - 50
    assert_eq!(s.cash_balance, dec!(499970));
    assert!(s.open_positions.is_empty());
}

#[test]
fn commissions_are_deducted_from_cash() {
    let mut l = Ledger::new(config(dec!(10000)));
    l.apply(&with_commission(
        fill("e1", "AAPL", Entry, Buy, dec!(10), dec!(150)),
        dec!(5),
    ))
    .unwrap();
    l.apply(&with_commission(
        fill("e2", "AAPL", Entry, Buy, dec!(10), dec!(150)),
        dec!(0.35),
    ))
    .unwrap();
    let s = l.snapshot(ACC, t(1));
    assert_eq!(s.realized_pnl, dec!(0));
    assert_eq!(s.commissions, dec!(5.35));
    assert_eq!(s.cash_balance, dec!(9994.65));
    assert_eq!(s.equity, dec!(9994.65));
}

#[test]
fn strategy_pnl_today_is_todays_net_realized_plus_open_unrealized() {
    let day = Duration::days(1);
    let at = |x: ExecutionConfirmation, when: DateTime<Utc>| ExecutionConfirmation {
        timestamp: when,
        ..x
    };
    let other = |x: ExecutionConfirmation| ExecutionConfirmation {
        strategy_id: "Forex".into(),
        ..x
    };
    let xs = vec![
        // Yesterday: 20 AAPL @ 100 (fee 2), 10 sold @ 110 (fee 1): +100 realized.
        at(
            with_commission(fill("y1", "AAPL", Entry, Buy, dec!(20), dec!(100)), dec!(2)),
            t(0) - day,
        ),
        at(
            with_commission(fill("y2", "AAPL", Exit, Sell, dec!(10), dec!(110)), dec!(1)),
            t(0) - day,
        ),
        // Today: 5 more sold @ 90 (fee 1): −50 realized; 10 MSFT @ 50 (fee 3).
        at(
            with_commission(fill("d1", "AAPL", Exit, Sell, dec!(5), dec!(90)), dec!(1)),
            t(60),
        ),
        at(
            with_commission(fill("d2", "MSFT", Entry, Buy, dec!(10), dec!(50)), dec!(3)),
            t(120),
        ),
        // Another strategy closes a round trip today: +20 − 2 fees.
        at(
            other(with_commission(
                fill("f1", "IBM", Entry, Buy, dec!(2), dec!(100)),
                dec!(1),
            )),
            t(10),
        ),
        at(
            other(with_commission(
                fill("f2", "IBM", Exit, Sell, dec!(2), dec!(110)),
                dec!(1),
            )),
            t(20),
        ),
    ];
    let mut l = Ledger::new(config(dec!(100000)));
    for x in &xs {
        l.apply(x).unwrap();
    }
    l.mark("AAPL", dec!(80));
    l.mark("MSFT", dec!(52));
    let s = l.snapshot(ACC, t(300));
    // SPX: today realized −50 − 1 − 3 = −54; unrealized AAPL 5 × (80 − 100)
    // = −100, MSFT 10 × 2 = +20: −134. Yesterday's +100 and fees do not count.
    assert_eq!(s.strategy_pnl_today[STRAT], dec!(-134));
    assert_eq!(s.strategy_pnl_today["Forex"], dec!(18));
    assert_eq!(s.strategy_pnl_today.len(), 2);
    // Cumulative figures are unaffected.
    assert_eq!(s.realized_pnl, dec!(100) - dec!(50) + dec!(20));
    // Tomorrow only the open positions' unrealized P&L is left; the Forex
    // strategy (flat, nothing today) is absent.
    let s = l.snapshot(ACC, t(300) + day);
    assert_eq!(s.strategy_pnl_today[STRAT], dec!(-80));
    assert!(!s.strategy_pnl_today.contains_key("Forex"));
    // Yesterday's net realized figure is kept per day.
    assert_eq!(
        l.realized_on(ACC, (t(0) - day).date_naive())[STRAT],
        dec!(100) - dec!(3)
    );
    // A ledger replayed from the executions gives the same figures for the
    // same snapshot time, whenever the replay runs.
    let mut replayed = Ledger::replay(config(dec!(100000)), &xs).unwrap();
    replayed.mark("AAPL", dec!(80));
    replayed.mark("MSFT", dec!(52));
    for when in [t(300), t(300) + day] {
        assert_eq!(replayed.snapshot(ACC, when), l.snapshot(ACC, when));
    }
}

fn gc_config() -> LedgerConfig {
    LedgerConfig {
        default_initial_balance: dec!(500000),
        instruments: [(
            "GC".to_string(),
            SymbolSpec {
                instrument_type: Some(InstrumentType::Future),
                spec: InstrumentSpec {
                    multiplier: dec!(100),
                    margin: MarginModel::PerContract(dec!(16500)),
                },
            },
        )]
        .into_iter()
        .collect(),
        ..LedgerConfig::default()
    }
}

fn gc(
    id: &str,
    action: SignalAction,
    side: Side,
    qty: Decimal,
    price: Decimal,
) -> ExecutionConfirmation {
    ExecutionConfirmation {
        instrument_type: InstrumentType::Future,
        multiplier: dec!(100),
        commission: dec!(2.25) * qty,
        ..fill(id, "GC", action, side, qty, price)
    }
}

#[test]
fn a_futures_root_entry_does_not_capture_a_stock_of_the_same_symbol() {
    // `GC` is configured as the gold future (×100, 16,500 a contract); a
    // stock fill of a `GC` ticker books as a stock: ×1, 25 % of notional.
    let mut l = Ledger::new(gc_config());
    l.apply(&fill("s1", "GC", Entry, Buy, dec!(10), dec!(40)))
        .unwrap();
    let s = l.snapshot(ACC, t(1));
    assert_eq!(s.margin_used, dec!(100)); // 25 % of 400
    l.mark("GC", dec!(41));
    assert_eq!(l.snapshot(ACC, t(2)).unrealized_pnl, dec!(10));
    // The future itself still gets its configured spec, and a fill that
    // claims another multiplier for it is refused.
    let mut l = Ledger::new(gc_config());
    let wrong = ExecutionConfirmation {
        multiplier: dec!(1),
        ..gc("e1", Entry, Buy, dec!(1), dec!(4029))
    };
    assert!(matches!(
        l.apply(&wrong),
        Err(LedgerError::MultiplierMismatch { .. })
    ));
}

#[test]
fn futures_with_multiplier() {
    // The gold fixture: 5 GC long at 4029, exit at 4041.
    let mut l = Ledger::new(gc_config());
    l.apply(&gc("e1", Entry, Buy, dec!(5), dec!(4029))).unwrap();
    l.mark("GC", dec!(4035));
    let s = l.snapshot(ACC, t(1));
    assert_eq!(s.unrealized_pnl, dec!(3000)); // 6 * 5 * 100
    assert_eq!(s.margin_used, dec!(82500)); // 5 * 16500
    assert_eq!(s.cash_balance, dec!(499988.75));
    assert_eq!(s.equity, dec!(502988.75));
    assert_eq!(s.margin_available, dec!(420488.75));

    let r = l.apply(&gc("x1", Exit, Sell, dec!(5), dec!(4041))).unwrap();
    assert_eq!(
        r,
        Applied::Booked {
            realized_pnl: dec!(6000)
        }
    ); // 12 * 5 * 100
    let s = l.snapshot(ACC, t(2));
    assert_eq!(s.commissions, dec!(22.50));
    assert_eq!(s.cash_balance, dec!(505977.5));

    // A short future: sell 2 at 4041, cover at 4050 → -9 * 2 * 100.
    l.apply(&gc("e2", Entry, Sell, dec!(2), dec!(4041)))
        .unwrap();
    let r = l.apply(&gc("x2", Exit, Buy, dec!(2), dec!(4050))).unwrap();
    assert_eq!(
        r,
        Applied::Booked {
            realized_pnl: dec!(-1800)
        }
    );
}

#[test]
fn multiplier_must_match_spec_and_position() {
    let mut l = Ledger::new(gc_config());
    let mut wrong = gc("e1", Entry, Buy, dec!(1), dec!(4000));
    wrong.multiplier = Decimal::ONE;
    assert!(matches!(
        l.apply(&wrong),
        Err(LedgerError::MultiplierMismatch { .. })
    ));

    // Unconfigured instrument: the first execution fixes the multiplier.
    let mut l = Ledger::new(config(dec!(1000)));
    let mut hg = fill("e1", "HG", Entry, Buy, dec!(1), dec!(4.5));
    hg.multiplier = dec!(25000);
    hg.instrument_type = InstrumentType::Future;
    l.apply(&hg).unwrap();
    let mut hg2 = hg.clone();
    hg2.execution_id = "e2".into();
    hg2.multiplier = dec!(2500);
    assert!(matches!(
        l.apply(&hg2),
        Err(LedgerError::MultiplierMismatch { .. })
    ));
    assert!(!l.has_applied("e2"));
}

#[test]
fn duplicate_execution_is_ignored() {
    let mut l = Ledger::new(config(dec!(100000)));
    let e = with_commission(fill("e1", "AAPL", Entry, Buy, dec!(10), dec!(150)), dec!(1));
    l.apply(&e).unwrap();
    let before = l.clone();
    let snap = l.snapshot(ACC, t(1));

    // A redelivery, even with a different timestamp / broker payload.
    let mut again = e.clone();
    again.timestamp = t(99);
    again.broker_response = serde_json::json!({"redelivered": true});
    assert_eq!(l.apply(&again), Ok(Applied::Duplicate));
    assert_eq!(l, before);
    assert_eq!(l.snapshot(ACC, t(1)), snap);

    let mut conflicting = e;
    conflicting.quantity = dec!(11);
    assert_eq!(
        l.apply(&conflicting),
        Err(LedgerError::ConflictingDuplicate {
            execution_id: "e1".into()
        })
    );
    assert_eq!(l, before);
}

#[test]
fn over_close_is_refused_and_changes_nothing() {
    let mut l = Ledger::new(config(dec!(100000)));
    l.apply(&fill("e1", "AAPL", Entry, Buy, dec!(10), dec!(150)))
        .unwrap();
    let before = l.clone();
    let err = l
        .apply(&fill("x1", "AAPL", Exit, Sell, dec!(11), dec!(151)))
        .unwrap_err();
    assert_eq!(
        err,
        LedgerError::OverClose {
            execution_id: "x1".into(),
            key: Box::new(key("AAPL", Direction::Long)),
            held: dec!(10),
            requested: dec!(11),
        }
    );
    // Closing a position that does not exist (a short here).
    let err = l
        .apply(&fill("x2", "AAPL", Exit, Buy, dec!(1), dec!(151)))
        .unwrap_err();
    assert!(matches!(err, LedgerError::OverClose { held, .. } if held.is_zero()));
    assert_eq!(l, before);
    assert!(!l.has_applied("x1"));
}

#[test]
fn rejected_and_invalid_executions_book_nothing() {
    let mut l = Ledger::new(config(dec!(100000)));
    let mut rej = fill("r1", "AAPL", Entry, Buy, dec!(0), dec!(0));
    rej.status = ExecutionStatus::Rejected;
    assert_eq!(l.apply(&rej), Ok(Applied::Rejected));
    assert_eq!(l.apply(&rej), Ok(Applied::Duplicate));
    assert_eq!(l.snapshot(ACC, t(1)).cash_balance, dec!(100000));
    assert_eq!(l.positions(ACC).count(), 0);

    for bad in [
        fill("b1", "AAPL", Entry, Buy, dec!(0), dec!(150)),
        fill("b2", "AAPL", Entry, Buy, dec!(1), dec!(-1)),
    ] {
        assert!(matches!(
            l.apply(&bad),
            Err(LedgerError::InvalidExecution { .. })
        ));
    }
}

#[test]
fn amounts_beyond_the_shared_limits_are_refused_and_never_overflow() {
    let mut l = Ledger::new(config(dec!(100000)));
    l.apply(&fill("ok", "AAPL", Entry, Buy, dec!(1000), dec!(100)))
        .unwrap();
    let before = l.snapshot(ACC, t(1));
    for (bad, says) in [
        // 1e15 × 1e15 would overflow the notional.
        (
            fill("q", "AAPL", Entry, Buy, dec!(1e15), dec!(1e15)),
            "price must be at most",
        ),
        (
            fill("u", "AAPL", Entry, Buy, dec!(1e17), dec!(1)),
            "quantity 100000000000000000 × multiplier 1 exceeds",
        ),
        (
            with_commission(fill("c", "AAPL", Entry, Buy, dec!(1), dec!(1)), dec!(1e27)),
            "commission",
        ),
    ] {
        match l.apply(&bad) {
            Err(LedgerError::InvalidExecution { reason, .. }) => {
                assert!(reason.contains(says), "{reason}")
            }
            other => panic!("{}: {other:?}", bad.execution_id),
        }
    }
    // A position may not grow past the limit by many fills in range.
    l.apply(&fill("big", "MSFT", Entry, Buy, dec!(1e16), dec!(1)))
        .unwrap();
    match l.apply(&fill("more", "MSFT", Entry, Buy, dec!(1), dec!(1))) {
        Err(LedgerError::InvalidExecution { reason, .. }) => {
            assert!(
                reason.contains("MSFT position would hold too much"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A mark beyond the range is ignored, so the snapshot stays computable.
    l.mark("AAPL", dec!(1e26));
    let after = l.snapshot(ACC, t(2));
    assert_eq!(
        after.open_positions[0].current_price,
        before.open_positions[0].current_price
    );
}

#[test]
fn strategies_and_accounts_are_kept_apart() {
    let mut l = Ledger::new(LedgerConfig {
        default_initial_balance: dec!(1000),
        initial_balances: [("Other".to_string(), dec!(50))].into_iter().collect(),
        ..LedgerConfig::default()
    });
    l.apply(&fill("e1", "AAPL", Entry, Buy, dec!(10), dec!(100)))
        .unwrap();
    let mut other_strat = fill("e2", "AAPL", Entry, Sell, dec!(4), dec!(100));
    other_strat.strategy_id = "Forex".into();
    l.apply(&other_strat).unwrap();
    let mut other_acc = fill("e3", "AAPL", Entry, Buy, dec!(1), dec!(100));
    other_acc.account = "Other".into();
    l.apply(&other_acc).unwrap();

    let s = l.snapshot(ACC, t(1));
    assert_eq!(s.open_positions.len(), 2);
    assert_eq!(s.deployed_capital.get(STRAT), Some(&dec!(250)));
    assert_eq!(s.deployed_capital.get("Forex"), Some(&dec!(100)));
    assert_eq!(s.margin_used, dec!(350));
    let o = l.snapshot("Other", t(1));
    assert_eq!(o.cash_balance, dec!(50));
    assert_eq!(o.open_positions.len(), 1);
    assert_eq!(l.snapshot("Nobody", t(1)).equity, dec!(1000));
    assert_eq!(l.accounts().collect::<Vec<_>>(), ["IBKR_Main", "Other"]);
    // Positions of one account come from its own key range; holders per
    // instrument follow opens and closes.
    assert_eq!(l.positions("IBKR_Mai").count(), 0);
    assert_eq!(l.positions("IBKR_Main_").count(), 0);
    assert_eq!(l.positions("Other").count(), 1);
    assert_eq!(
        l.holders("AAPL").collect::<Vec<_>>(),
        ["IBKR_Main", "Other"]
    );
    assert_eq!(l.holders("MSFT").count(), 0);
    let mut close = fill("e4", "AAPL", Exit, Sell, dec!(10), dec!(101));
    close.commission = Decimal::ZERO;
    l.apply(&close).unwrap();
    assert_eq!(
        l.holders("AAPL").collect::<Vec<_>>(),
        ["IBKR_Main", "Other"],
        "IBKR_Main still holds the Forex short"
    );
    let mut cover = fill("e5", "AAPL", Exit, Buy, dec!(4), dec!(99));
    cover.strategy_id = "Forex".into();
    l.apply(&cover).unwrap();
    assert_eq!(l.holders("AAPL").collect::<Vec<_>>(), ["Other"]);
    assert_eq!(l.positions(ACC).count(), 0);
}

#[test]
fn snapshot_lists_tracked_open_orders() {
    use mtx_schemas::{OrderStatus, OrderType};
    let mut l = Ledger::new(config(dec!(1000)));
    let order = Order {
        order_type: OrderType::Limit,
        price: Some(dec!(140)),
        ..Order::pending("o1", "s", STRAT, ACC, "AAPL", dec!(10), t(0))
    };
    l.track_order(&order);
    l.apply_order_event(&OrderEvent {
        order_id: "o1".into(),
        account: ACC.into(),
        status: OrderStatus::PartiallyFilled,
        previous_status: Some(OrderStatus::Accepted),
        filled_quantity: dec!(3),
        avg_fill_price: Some(dec!(140)),
        reason: None,
        timestamp: t(1),
        seq: 3,
    });
    let s = l.snapshot(ACC, t(2));
    assert_eq!(s.open_orders.len(), 1);
    assert_eq!(s.open_orders[0].quantity, dec!(7));
    assert_eq!(s.open_orders[0].price, Some(dec!(140)));
}

/// A realistic stream: several accounts, strategies, instruments, duplicates.
fn stream() -> Vec<ExecutionConfirmation> {
    let mut xs = vec![
        with_commission(fill("a", "AAPL", Entry, Buy, dec!(10), dec!(150)), dec!(1)),
        fill("b", "NVDA", Entry, Sell, dec!(10), dec!(500)),
        with_commission(
            fill("c", "AAPL", Entry, Buy, dec!(7), dec!(151.37)),
            dec!(0.7),
        ),
        gc("d", Entry, Buy, dec!(3), dec!(4029.1)),
        fill("e", "AAPL", Exit, Sell, dec!(9), dec!(152.01)),
        fill("f", "NVDA", Exit, Buy, dec!(3), dec!(497.5)),
        gc("g", Exit, Sell, dec!(1), dec!(4030.4)),
    ];
    let mut other = fill("h", "EURUSD", Entry, Sell, dec!(100000), dec!(1.08315));
    other.account = "Forex_Acc".into();
    other.instrument_type = InstrumentType::Forex;
    xs.push(other);
    xs
}

#[test]
fn replay_from_empty_equals_live_snapshot() {
    let xs = stream();
    let mut live = Ledger::new(gc_config());
    for (i, x) in xs.iter().enumerate() {
        live.apply(x).unwrap();
        // Redeliveries interleaved with live traffic.
        if i % 2 == 0 {
            assert_eq!(live.apply(x), Ok(Applied::Duplicate));
        }
        if i > 0 {
            assert_eq!(live.apply(&xs[i - 1]), Ok(Applied::Duplicate));
        }
    }
    let replayed = Ledger::replay(gc_config(), &xs).unwrap();
    assert_eq!(replayed, live);
    for account in [ACC, "Forex_Acc"] {
        let (a, b) = (
            live.snapshot(account, t(9)),
            replayed.snapshot(account, t(9)),
        );
        assert_eq!(a.equity, b.equity);
        assert_eq!(a.cash_balance, b.cash_balance);
        assert_eq!(a.margin_used, b.margin_used);
        assert_eq!(a.margin_available, b.margin_available);
        assert_eq!(a.unrealized_pnl, b.unrealized_pnl);
        assert_eq!(a.realized_pnl, b.realized_pnl);
        assert_eq!(a.open_positions, b.open_positions);
        assert_eq!(a.deployed_capital, b.deployed_capital);
        assert_eq!(a, b);
    }
    // Spot-check the live numbers: AAPL 17 @ (1500 + 1059.59)/17, 9 sold at 152.01.
    let s = live.snapshot(ACC, t(9));
    let aapl = s
        .open_positions
        .iter()
        .find(|p| p.instrument == "AAPL")
        .unwrap();
    assert_eq!(aapl.quantity, dec!(8));
    assert_eq!(aapl.current_price, dec!(152.01));
    // Round trip through JSON keeps every Decimal exactly.
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<AccountState>(&json).unwrap(), s);
}

// ---- property test -------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Enter {
        inst: usize,
        short: bool,
        qty: u32,
        px: u32,
        fee: u32,
    },
    /// Exit `pct`% (rounded up) of whatever is held.
    Exit {
        inst: usize,
        short: bool,
        pct: u32,
        px: u32,
        fee: u32,
    },
    Mark {
        inst: usize,
        px: u32,
    },
    Redeliver {
        back: usize,
    },
}

const INSTS: [&str; 3] = ["AAPL", "GC", "BTC"];

fn arb_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..3usize, any::<bool>(), 1u32..50, 50u32..150, 0u32..300)
            .prop_map(|(inst, short, qty, px, fee)| Step::Enter { inst, short, qty, px, fee }),
        3 => (0..3usize, any::<bool>(), 1u32..=100, 50u32..150, 0u32..300)
            .prop_map(|(inst, short, pct, px, fee)| Step::Exit { inst, short, pct, px, fee }),
        1 => (0..3usize, 50u32..150).prop_map(|(inst, px)| Step::Mark { inst, px }),
        1 => (0..20usize).prop_map(|back| Step::Redeliver { back }),
    ]
}

fn make(
    n: usize,
    inst: usize,
    action: SignalAction,
    short: bool,
    qty: Decimal,
    px: u32,
    fee: u32,
) -> ExecutionConfirmation {
    let side = mtx_schemas::order::order_side(
        action,
        if short {
            Direction::Short
        } else {
            Direction::Long
        },
    );
    // Prices with cents; fees in cents.
    let price = Decimal::new(i64::from(px) * 100 + 37, 2);
    let mut x = with_commission(
        fill(&format!("x{n}"), INSTS[inst], action, side, qty, price),
        Decimal::new(i64::from(fee), 2),
    );
    if INSTS[inst] == "GC" {
        x.multiplier = dec!(100);
        x.instrument_type = InstrumentType::Future;
    }
    if INSTS[inst] == "BTC" {
        x.instrument_type = InstrumentType::Crypto;
        x.quantity = qty / dec!(1000);
    }
    x
}

proptest! {
    #[test]
    fn ledger_invariants_hold(steps in proptest::collection::vec(arb_step(), 1..60)) {
        let cfg = gc_config();
        let mut live = Ledger::new(cfg.clone());
        let mut applied: Vec<ExecutionConfirmation> = Vec::new();
        let mut marks: Vec<(usize, &str, Decimal)> = Vec::new();
        // Σ signed cash flows (proceeds - costs) per closed-out lifecycle.
        let mut flows = Decimal::ZERO;
        let mut fees = Decimal::ZERO;
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Step::Enter { inst, short, qty, px, fee } => {
                    let x = make(n, inst, Entry, short, Decimal::from(qty), px, fee);
                    let r = live.apply(&x);
                    prop_assert!(matches!(r, Ok(Applied::Booked { .. })), "{:?}", r);
                    let sign = if short { Decimal::ONE } else { -Decimal::ONE };
                    flows += sign * x.quantity * x.price * x.multiplier;
                    fees += x.commission;
                    applied.push(x);
                }
                Step::Exit { inst, short, pct, px, fee } => {
                    let dir = if short { Direction::Short } else { Direction::Long };
                    let held = live.position(&key(INSTS[inst], dir)).map(|p| p.quantity);
                    let Some(held) = held else { continue };
                    let mut x = make(n, inst, Exit, short, Decimal::ONE, px, fee);
                    x.quantity = (held * Decimal::from(pct) / dec!(100)).round_dp(3).max(dec!(0.001)).min(held);
                    let r = live.apply(&x);
                    prop_assert!(matches!(r, Ok(Applied::Booked { .. })), "{:?}", r);
                    let sign = if short { -Decimal::ONE } else { Decimal::ONE };
                    flows += sign * x.quantity * x.price * x.multiplier;
                    fees += x.commission;
                    applied.push(x);
                }
                Step::Mark { inst, px } => {
                    let p = Decimal::from(px);
                    live.mark(INSTS[inst], p);
                    marks.push((applied.len(), INSTS[inst], p));
                }
                Step::Redeliver { back } => {
                    if let Some(x) = applied.iter().rev().nth(back) {
                        let before = live.clone();
                        prop_assert_eq!(live.apply(x), Ok(Applied::Duplicate));
                        prop_assert_eq!(&live, &before);
                    }
                }
            }
            let s = live.snapshot(ACC, t(0));
            prop_assert_eq!(s.cash_balance, dec!(500000) + s.realized_pnl - s.commissions);
            prop_assert_eq!(s.equity, s.cash_balance + s.unrealized_pnl);
            prop_assert_eq!(s.margin_available, s.equity - s.margin_used);
            let deployed: Decimal = s.deployed_capital.values().copied().sum();
            prop_assert_eq!(deployed, s.margin_used);
            // Every execution is on the snapshot's day: today's P&L of all
            // strategies is the account's whole P&L.
            let today: Decimal = s.strategy_pnl_today.values().copied().sum();
            prop_assert_eq!(today, s.realized_pnl - s.commissions + s.unrealized_pnl);
            prop_assert_eq!(s.commissions, fees);
            prop_assert!(s.open_positions.iter().all(|p| p.quantity > Decimal::ZERO));
        }

        // Replay (executions and marks interleaved as they happened) equals live.
        let mut replay = Ledger::new(cfg);
        let mut mi = marks.iter().peekable();
        for (i, x) in applied.iter().enumerate() {
            while let Some((at, inst, p)) = mi.peek() {
                if *at != i { break; }
                replay.mark(inst, *p);
                mi.next();
            }
            replay.apply(x).unwrap();
        }
        for (_, inst, p) in mi {
            replay.mark(inst, *p);
        }
        prop_assert_eq!(&replay, &live);
        prop_assert_eq!(replay.snapshot(ACC, t(5)), live.snapshot(ACC, t(5)));

        // Close everything: realized P&L equals the exact sum of cash flows.
        let open: Vec<Position> = live.positions(ACC).cloned().collect();
        for (j, p) in open.into_iter().enumerate() {
            let side = mtx_schemas::order::order_side(Exit, p.key.direction);
            let mut x = fill(&format!("close{j}"), &p.key.instrument, Exit, side, p.quantity, dec!(100.01));
            x.multiplier = p.spec.multiplier;
            x.instrument_type = p.instrument_type;
            let sign = if p.key.direction == Direction::Short { -Decimal::ONE } else { Decimal::ONE };
            flows += sign * x.quantity * x.price * x.multiplier;
            live.apply(&x).unwrap();
        }
        let s = live.snapshot(ACC, t(6));
        prop_assert!(s.open_positions.is_empty());
        prop_assert_eq!(s.realized_pnl, flows);
    }
}
