use super::*;
use chrono::{Duration, TimeZone};
use mtx_schemas::{Direction, InstrumentType};
use proptest::prelude::*;
use rust_decimal_macros::dec;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 3, 14, 30, 0).unwrap()
}

fn at(secs: i64) -> DateTime<Utc> {
    t0() + Duration::seconds(secs)
}

fn order(id: &str, instrument: &str, side: Side, order_type: OrderType, qty: Decimal) -> Order {
    let sig = format!("sig_{id}");
    Order {
        direction: mtx_schemas::order::position_direction(SignalAction::Entry, side),
        side,
        order_type,
        ..Order::pending(id, sig, "SPX_1-D_Opt", "IBKR_Main", instrument, qty, t0())
    }
}

fn market(id: &str, side: Side, qty: Decimal, reference: Decimal) -> Order {
    Order {
        price: Some(reference),
        ..order(id, "AAPL", side, OrderType::Market, qty)
    }
}

fn venue(cfg: PaperConfig) -> PaperVenue {
    PaperVenue::new(cfg).unwrap()
}

fn fills(events: &[VenueEvent]) -> Vec<&ExecutionConfirmation> {
    events
        .iter()
        .filter(|e| matches!(e, VenueEvent::Fill { .. }))
        .filter_map(VenueEvent::execution)
        .collect()
}

fn kinds(events: &[VenueEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| match e {
            VenueEvent::ChildOrder(_) => "child",
            VenueEvent::Submitted(_) => "submitted",
            VenueEvent::Accepted(_) => "accepted",
            VenueEvent::Fill { .. } => "fill",
            VenueEvent::Rejected { .. } => "rejected",
            VenueEvent::CancelRequested(_) => "cancel_requested",
            VenueEvent::Cancelled(_) => "cancelled",
            VenueEvent::CancelRejected { .. } => "cancel_rejected",
            VenueEvent::Expired(_) => "expired",
        })
        .collect()
}

#[test]
fn market_buy_without_mark_fills_at_reference_plus_slippage() {
    let mut v = venue(PaperConfig {
        slippage_bps: dec!(10),
        ..PaperConfig::default()
    });
    let ev = v.submit(market("o1", Side::Buy, dec!(10), dec!(150)), t0());
    assert_eq!(kinds(&ev), ["submitted", "accepted", "fill"]);
    let f = fills(&ev)[0];
    assert_eq!(f.price, dec!(150.15));
    assert_eq!(f.quantity, dec!(10));
    assert_eq!(f.status, ExecutionStatus::Filled);
    assert_eq!(f.execution_id, execution_id("o1", 1));
    assert_eq!(f.direction, Direction::Long);
    let e = ev[2].order_event().unwrap();
    assert_eq!(e.status, OrderStatus::Filled);
    assert_eq!(e.previous_status, Some(OrderStatus::Accepted));
    assert_eq!(e.seq, 3);
    assert_eq!(e.avg_fill_price, Some(dec!(150.15)));
    assert_eq!(v.status("o1"), Some(OrderStatus::Filled));
    assert_eq!(v.order("o1").unwrap().status, OrderStatus::Filled);
}

#[test]
fn market_sell_uses_latest_mark_minus_slippage() {
    let mut v = venue(PaperConfig {
        slippage_bps: dec!(10),
        ..PaperConfig::default()
    });
    assert!(v.on_price("AAPL", dec!(152), t0()).is_empty());
    let ev = v.submit(market("o1", Side::Sell, dec!(10), dec!(150)), at(1));
    assert_eq!(fills(&ev)[0].price, dec!(151.848));
    assert_eq!(fills(&ev)[0].direction, Direction::Short);
}

#[test]
fn market_without_any_price_is_rejected_with_a_confirmation() {
    let mut v = venue(PaperConfig::default());
    let ev = v.submit(
        order("o1", "AAPL", Side::Buy, OrderType::Market, dec!(1)),
        t0(),
    );
    assert_eq!(kinds(&ev), ["submitted", "rejected"]);
    let VenueEvent::Rejected { execution, event } = &ev[1] else {
        panic!("not a reject")
    };
    assert_eq!(execution.status, ExecutionStatus::Rejected);
    assert_eq!(execution.quantity, Decimal::ZERO);
    assert_eq!(execution.execution_id, execution_id("o1", 1));
    assert_eq!(event.status, OrderStatus::Rejected);
    assert!(event
        .reason
        .as_deref()
        .unwrap()
        .contains("no mark for AAPL"));
}

#[test]
fn invalid_orders_are_rejected() {
    let mut v = venue(PaperConfig::default());
    let cases = [
        order("q", "AAPL", Side::Buy, OrderType::Market, dec!(0)),
        order("l", "AAPL", Side::Buy, OrderType::Limit, dec!(1)),
        order("s", "AAPL", Side::Buy, OrderType::Stop, dec!(1)),
        Order {
            price: Some(dec!(-1)),
            ..order("p", "AAPL", Side::Buy, OrderType::Limit, dec!(1))
        },
        Order {
            multiplier: dec!(0),
            ..market("m", Side::Buy, dec!(1), dec!(1))
        },
    ];
    for o in cases {
        let id = o.order_id.clone();
        let ev = v.submit(o, t0());
        assert_eq!(kinds(&ev), ["submitted", "rejected"], "{id}");
        assert_eq!(v.status(&id), Some(OrderStatus::Rejected));
    }
}

#[test]
fn limit_buy_rests_then_fills_at_limit_when_crossed() {
    let mut v = venue(PaperConfig {
        slippage_bps: dec!(50),
        ..PaperConfig::default()
    });
    v.on_price("AAPL", dec!(151), t0());
    let o = Order {
        price: Some(dec!(150)),
        ..order("o1", "AAPL", Side::Buy, OrderType::Limit, dec!(10))
    };
    assert_eq!(kinds(&v.submit(o, t0())), ["submitted", "accepted"]);
    assert!(v.on_price("AAPL", dec!(150.01), at(1)).is_empty());
    assert!(v.on_price("MSFT", dec!(100), at(1)).is_empty());
    let ev = v.on_price("AAPL", dec!(149.5), at(2));
    let f = fills(&ev);
    assert_eq!(f.len(), 1);
    assert_eq!(
        f[0].price,
        dec!(150),
        "a resting limit fills at its limit, no slippage"
    );
    assert_eq!(v.status("o1"), Some(OrderStatus::Filled));
}

#[test]
fn marketable_limit_fills_at_the_better_mark_on_arrival() {
    let mut v = venue(PaperConfig::default());
    v.on_price("AAPL", dec!(149), t0());
    let buy = Order {
        price: Some(dec!(150)),
        ..order("b", "AAPL", Side::Buy, OrderType::Limit, dec!(1))
    };
    assert_eq!(fills(&v.submit(buy, t0()))[0].price, dec!(149));
    let sell = Order {
        price: Some(dec!(148)),
        ..order("s", "AAPL", Side::Sell, OrderType::Limit, dec!(1))
    };
    assert_eq!(fills(&v.submit(sell, t0()))[0].price, dec!(149));
    let resting_sell = Order {
        price: Some(dec!(155)),
        ..order("r", "AAPL", Side::Sell, OrderType::Limit, dec!(1))
    };
    assert!(fills(&v.submit(resting_sell, t0())).is_empty());
    assert!(v.on_price("AAPL", dec!(154.99), at(1)).is_empty());
    assert_eq!(
        fills(&v.on_price("AAPL", dec!(156), at(2)))[0].price,
        dec!(155)
    );
}

#[test]
fn stop_orders_trigger_on_cross_and_fill_as_market() {
    let mut v = venue(PaperConfig {
        slippage_bps: dec!(10),
        ..PaperConfig::default()
    });
    v.on_price("GC", dec!(4000), t0());
    let buy_stop = Order {
        stop_price: Some(dec!(4050)),
        ..order("bs", "GC", Side::Buy, OrderType::Stop, dec!(1))
    };
    let sell_stop = Order {
        price: Some(dec!(3950)), // trigger taken from price when stop_price is absent
        ..order("ss", "GC", Side::Sell, OrderType::Stop, dec!(1))
    };
    assert!(fills(&v.submit(buy_stop, t0())).is_empty());
    assert!(fills(&v.submit(sell_stop, t0())).is_empty());
    assert!(v.on_price("GC", dec!(4049.9), at(1)).is_empty());
    let ev = v.on_price("GC", dec!(4060), at(2));
    let f = fills(&ev);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].order_id, "bs");
    assert_eq!(f[0].price, dec!(4064.06));
    let ev = v.on_price("GC", dec!(3900), at(3));
    assert_eq!(fills(&ev)[0].order_id, "ss");
    assert_eq!(fills(&ev)[0].price, dec!(3896.1));
}

#[test]
fn partial_fills_take_ceil_of_ratio_in_lots() {
    let mut v = venue(PaperConfig {
        fill_ratio: Some(dec!(0.5)),
        ..PaperConfig::default()
    });
    let mut all = v.submit(market("o1", Side::Buy, dec!(10), dec!(100)), t0());
    for (i, p) in [dec!(101), dec!(102), dec!(103), dec!(104)]
        .into_iter()
        .enumerate()
    {
        all.extend(v.on_price("AAPL", p, at(i as i64 + 1)));
    }
    let f = fills(&all);
    let q: Vec<Decimal> = f.iter().map(|e| e.quantity).collect();
    assert_eq!(q, [dec!(5), dec!(3), dec!(1), dec!(1)]);
    let st: Vec<ExecutionStatus> = f.iter().map(|e| e.status).collect();
    use ExecutionStatus::{Filled, PartialFill};
    assert_eq!(st, [PartialFill, PartialFill, PartialFill, Filled]);
    let ids: Vec<String> = f.iter().map(|e| e.execution_id.clone()).collect();
    assert_eq!(
        ids,
        (1..=4).map(|n| execution_id("o1", n)).collect::<Vec<_>>()
    );
    // avg = (5*100 + 3*101 + 1*102 + 1*103) / 10 = 100.8
    let last = all.iter().rev().find_map(VenueEvent::order_event).unwrap();
    assert_eq!(last.status, OrderStatus::Filled);
    assert_eq!(last.filled_quantity, dec!(10));
    assert_eq!(last.avg_fill_price, Some(dec!(100.8)));
}

#[test]
fn amounts_beyond_the_shared_limits_are_rejected_not_overflowed() {
    let mut v = venue(PaperConfig::default());
    let cases = [
        // 1e27 × 1000 would overflow the notional.
        market("huge_qty", Side::Buy, dec!(1e27), dec!(1000)),
        // 1e16 units are the limit; × 100 is beyond it.
        Order {
            multiplier: dec!(100),
            ..market("huge_units", Side::Buy, dec!(1e16), dec!(1))
        },
        market("huge_price", Side::Buy, dec!(1), dec!(1e26)),
        Order {
            stop_loss: Some(dec!(1e11)),
            ..market("huge_stop", Side::Buy, dec!(1), dec!(100))
        },
    ];
    for o in cases {
        let id = o.order_id.clone();
        let ev = v.submit(o, t0());
        assert_eq!(kinds(&ev), ["submitted", "rejected"], "{id}");
        let VenueEvent::Rejected { event, .. } = &ev[1] else {
            panic!("not a reject")
        };
        let reason = event.reason.as_deref().unwrap_or_default();
        assert!(
            reason.contains("at most") || reason.contains("exceeds"),
            "{id}: {reason}"
        );
    }
}

#[test]
fn a_lot_far_finer_than_the_quantity_fills_what_remains_instead_of_overflowing() {
    let mut v = venue(PaperConfig {
        fill_ratio: Some(dec!(0.5)),
        lot_sizes: [("WEI".to_string(), dec!(0.00000000000000000001))]
            .into_iter()
            .collect(),
        ..PaperConfig::default()
    });
    let o = Order {
        price: Some(dec!(1)),
        ..order("w", "WEI", Side::Buy, OrderType::Market, dec!(10000000000))
    };
    let ev = v.submit(o, t0());
    let q: Vec<Decimal> = fills(&ev).iter().map(|e| e.quantity).collect();
    assert_eq!(q, [dec!(10000000000)]);
}

#[test]
fn partial_fills_respect_fractional_lots() {
    let mut v = venue(PaperConfig {
        fill_ratio: Some(dec!(0.3)),
        lot_sizes: [("BTC".to_string(), dec!(0.001))].into_iter().collect(),
        ..PaperConfig::default()
    });
    let o = Order {
        price: Some(dec!(60000)),
        ..order("c", "BTC", Side::Buy, OrderType::Market, dec!(0.01))
    };
    let mut all = v.submit(o, t0());
    for i in 1..10 {
        all.extend(v.on_price("BTC", dec!(60000), at(i)));
    }
    let q: Vec<Decimal> = fills(&all).iter().map(|e| e.quantity).collect();
    assert_eq!(
        q,
        [
            dec!(0.003),
            dec!(0.003),
            dec!(0.002),
            dec!(0.001),
            dec!(0.001)
        ]
    );
    assert_eq!(v.filled_quantity("c"), Some(dec!(0.01)));
}

#[test]
fn commission_models_and_minimum() {
    let per_share = Commission {
        model: CommissionModel::PerShare(dec!(0.005)),
        minimum: Some(dec!(1)),
    };
    assert_eq!(per_share.charge(dec!(10), dec!(150), dec!(1)), dec!(1));
    assert_eq!(
        per_share.charge(dec!(1000), dec!(150), dec!(1)),
        dec!(5.000)
    );
    let per_contract = Commission {
        model: CommissionModel::PerContract(dec!(2.25)),
        minimum: None,
    };
    assert_eq!(
        per_contract.charge(dec!(5), dec!(4029), dec!(100)),
        dec!(11.25)
    );
    let bps = Commission {
        model: CommissionModel::Bps(dec!(1)),
        minimum: None,
    };
    // 5 * 4029 * 100 * 1bp = 201.45
    assert_eq!(bps.charge(dec!(5), dec!(4029), dec!(100)), dec!(201.45));

    let mut v = venue(PaperConfig {
        commission: per_contract,
        ..PaperConfig::default()
    });
    let gc = Order {
        instrument_type: InstrumentType::Future,
        multiplier: dec!(100),
        price: Some(dec!(4029)),
        ..order("gc", "GC", Side::Buy, OrderType::Market, dec!(5))
    };
    let ev = v.submit(gc, t0());
    assert_eq!(fills(&ev)[0].commission, dec!(11.25));
    assert_eq!(fills(&ev)[0].multiplier, dec!(100));
}

#[test]
fn expiry_on_tick_and_on_arrival() {
    let mut v = venue(PaperConfig::default());
    let o = Order {
        price: Some(dec!(100)),
        expiry: Some(at(60)),
        ..order("o1", "AAPL", Side::Buy, OrderType::Limit, dec!(1))
    };
    v.submit(o, t0());
    assert!(v.tick(at(59)).is_empty());
    let ev = v.tick(at(60));
    assert_eq!(kinds(&ev), ["expired"]);
    assert_eq!(
        ev[0].order_event().unwrap().previous_status,
        Some(OrderStatus::Accepted)
    );
    assert!(v.tick(at(61)).is_empty(), "terminal orders never change");
    assert!(fills(&v.on_price("AAPL", dec!(90), at(62))).is_empty());

    let late = Order {
        price: Some(dec!(100)),
        expiry: Some(at(10)),
        ..order("o2", "AAPL", Side::Buy, OrderType::Limit, dec!(1))
    };
    assert_eq!(kinds(&v.submit(late, at(10))), ["submitted", "expired"]);
}

#[test]
fn price_updates_expire_due_orders_before_matching() {
    let mut v = venue(PaperConfig::default());
    let o = Order {
        price: Some(dec!(100)),
        expiry: Some(at(60)),
        ..order("o1", "AAPL", Side::Buy, OrderType::Limit, dec!(1))
    };
    v.submit(o, t0());
    let ev = v.on_price("AAPL", dec!(99), at(61));
    assert_eq!(kinds(&ev), ["expired"]);
}

#[test]
fn cancel_working_order_then_nothing_fills() {
    let mut v = venue(PaperConfig::default());
    let o = Order {
        price: Some(dec!(100)),
        ..order("o1", "AAPL", Side::Buy, OrderType::Limit, dec!(1))
    };
    v.submit(o, t0());
    let ev = v.cancel("o1", at(1));
    assert_eq!(kinds(&ev), ["cancel_requested", "cancelled"]);
    assert_eq!(ev[1].order_event().unwrap().seq, 4);
    assert_eq!(kinds(&v.cancel("o1", at(2))), ["cancel_rejected"]);
    assert_eq!(kinds(&v.cancel("nope", at(2))), ["cancel_rejected"]);
    assert!(v.on_price("AAPL", dec!(90), at(3)).is_empty());
    assert_eq!(v.working_orders().count(), 0);
}

#[test]
fn submit_is_idempotent() {
    let mut v = venue(PaperConfig::default());
    let o = market("o1", Side::Buy, dec!(10), dec!(150));
    assert!(!v.submit(o.clone(), t0()).is_empty());
    assert!(v.submit(o.clone(), at(1)).is_empty());
    let rejected = order("bad", "AAPL", Side::Buy, OrderType::Market, dec!(1));
    assert!(!v.submit(rejected.clone(), t0()).is_empty());
    assert!(v.submit(rejected, at(1)).is_empty());
}

fn bracket_entry(side: Side, reference: Decimal, sl: Decimal, tp: Decimal) -> Order {
    Order {
        stop_loss: Some(sl),
        take_profit: Some(tp),
        ..market("entry", side, dec!(10), reference)
    }
}

#[test]
fn filled_entry_spawns_oco_children_and_take_profit_cancels_stop() {
    let mut v = venue(PaperConfig::default());
    v.on_price("AAPL", dec!(150), t0());
    let ev = v.submit(
        bracket_entry(Side::Buy, dec!(150), dec!(145), dec!(160)),
        t0(),
    );
    assert_eq!(
        kinds(&ev),
        [
            "submitted",
            "accepted",
            "fill",
            "child",
            "submitted",
            "accepted",
            "child",
            "submitted",
            "accepted"
        ]
    );
    let sl_id = derive_id("ord", &["entry", "SL"]);
    let tp_id = derive_id("ord", &["entry", "TP"]);
    let VenueEvent::ChildOrder(sl) = &ev[3] else {
        panic!()
    };
    assert_eq!(sl.order_id, sl_id);
    assert_eq!(sl.order_type, OrderType::Stop);
    assert_eq!(sl.stop_price, Some(dec!(145)));
    assert_eq!(sl.side, Side::Sell);
    assert_eq!(sl.action, SignalAction::Exit);
    assert_eq!(sl.direction, Direction::Long);
    assert_eq!(sl.quantity, dec!(10));
    assert_eq!(sl.parent_order_id.as_deref(), Some("entry"));
    let VenueEvent::ChildOrder(tp) = &ev[6] else {
        panic!()
    };
    assert_eq!(tp.order_id, tp_id);
    assert_eq!(tp.order_type, OrderType::Limit);
    assert_eq!(tp.price, Some(dec!(160)));

    let ev = v.on_price("AAPL", dec!(161), at(1));
    assert_eq!(kinds(&ev), ["fill", "cancelled"]);
    let f = fills(&ev)[0];
    assert_eq!((f.order_id.as_str(), f.price), (tp_id.as_str(), dec!(160)));
    assert_eq!(f.action, SignalAction::Exit);
    assert_eq!(f.side, Side::Sell);
    assert_eq!(f.direction, Direction::Long);
    let c = ev[1].order_event().unwrap();
    assert_eq!(c.order_id, sl_id);
    assert!(c.reason.as_deref().unwrap().starts_with("OCO"));
    assert!(v.on_price("AAPL", dec!(140), at(2)).is_empty());
}

#[test]
fn short_entry_stop_loss_triggers_and_cancels_take_profit() {
    let mut v = venue(PaperConfig {
        slippage_bps: dec!(10),
        ..PaperConfig::default()
    });
    let entry = Order {
        instrument: "NVDA".into(),
        ..bracket_entry(Side::Sell, dec!(500), dec!(510), dec!(480))
    };
    let ev = v.submit(entry, t0());
    let children: Vec<&Order> = ev
        .iter()
        .filter_map(|e| match e {
            VenueEvent::ChildOrder(o) => Some(o),
            _ => None,
        })
        .collect();
    assert_eq!(children.len(), 2);
    assert!(children.iter().all(|c| c.side == Side::Buy
        && c.direction == Direction::Short
        && c.action == SignalAction::Exit));
    // No mark yet: the children rest. A mark of 512 crosses the 510 stop.
    let ev = v.on_price("NVDA", dec!(512), at(1));
    assert_eq!(kinds(&ev), ["fill", "cancelled"]);
    assert_eq!(fills(&ev)[0].price, dec!(512.512));
    assert_eq!(fills(&ev)[0].order_id, derive_id("ord", &["entry", "SL"]));
    assert_eq!(
        v.status(&derive_id("ord", &["entry", "TP"])),
        Some(OrderStatus::Cancelled)
    );
}

#[test]
fn partially_filled_entry_cancelled_protects_the_filled_part() {
    let mut v = venue(PaperConfig {
        fill_ratio: Some(dec!(0.4)),
        ..PaperConfig::default()
    });
    let entry = Order {
        stop_loss: Some(dec!(90)),
        ..market("entry", Side::Buy, dec!(10), dec!(100))
    };
    let ev = v.submit(entry, t0());
    assert_eq!(fills(&ev)[0].quantity, dec!(4));
    assert!(
        !kinds(&ev).contains(&"child"),
        "no children while the entry works"
    );
    let ev = v.cancel("entry", at(1));
    assert_eq!(
        kinds(&ev),
        [
            "cancel_requested",
            "cancelled",
            "child",
            "submitted",
            "accepted"
        ]
    );
    let VenueEvent::ChildOrder(sl) = &ev[2] else {
        panic!()
    };
    assert_eq!(sl.quantity, dec!(4));
}

#[test]
fn exit_orders_never_spawn_children() {
    let mut v = venue(PaperConfig::default());
    let exit = Order {
        action: SignalAction::Exit,
        stop_loss: Some(dec!(1)),
        ..market("x", Side::Sell, dec!(1), dec!(100))
    };
    assert_eq!(
        kinds(&v.submit(exit, t0())),
        ["submitted", "accepted", "fill"]
    );
}

#[test]
fn config_is_validated() {
    let bad = [
        PaperConfig {
            slippage_bps: dec!(-1),
            ..PaperConfig::default()
        },
        PaperConfig {
            fill_ratio: Some(dec!(0)),
            ..PaperConfig::default()
        },
        PaperConfig {
            fill_ratio: Some(dec!(1.5)),
            ..PaperConfig::default()
        },
        PaperConfig {
            default_lot: dec!(0),
            ..PaperConfig::default()
        },
    ];
    for cfg in bad {
        assert!(PaperVenue::new(cfg).is_err());
    }
}

#[test]
fn seed_namespaces_venue_ids_only() {
    let run = |seed| {
        let mut v = venue(PaperConfig {
            seed,
            ..PaperConfig::default()
        });
        v.submit(market("o1", Side::Buy, dec!(1), dec!(10)), t0())
    };
    let (a, b) = (run(1), run(2));
    let (fa, fb) = (fills(&a)[0], fills(&b)[0]);
    assert_eq!(fa.execution_id, fb.execution_id);
    assert_eq!(fa.price, fb.price);
    assert_ne!(
        fa.broker_response["venue_order_id"],
        fb.broker_response["venue_order_id"]
    );
}

/// One scripted input.
#[derive(Debug, Clone)]
enum Input {
    Submit(Box<Order>),
    Price(&'static str, Decimal),
    Cancel(String),
    Tick,
}

fn run_script(cfg: &PaperConfig, script: &[Input]) -> Vec<VenueEvent> {
    let mut v = venue(cfg.clone());
    let mut out = Vec::new();
    for (i, input) in script.iter().enumerate() {
        let now = at(i as i64);
        out.extend(match input {
            Input::Submit(o) => v.submit(o.as_ref().clone(), now),
            Input::Price(s, p) => v.on_price(s, *p, now),
            Input::Cancel(id) => v.cancel(id, now),
            Input::Tick => v.tick(now),
        });
    }
    out
}

fn busy_config() -> PaperConfig {
    PaperConfig {
        slippage_bps: dec!(7.5),
        fill_ratio: Some(dec!(0.35)),
        commission: Commission {
            model: CommissionModel::Bps(dec!(2)),
            minimum: Some(dec!(1)),
        },
        seed: 42,
        ..PaperConfig::default()
    }
}

#[test]
fn same_inputs_give_same_outputs() {
    let script = vec![
        Input::Price("AAPL", dec!(150)),
        Input::Submit(Box::new(bracket_entry(
            Side::Buy,
            dec!(150),
            dec!(145),
            dec!(155),
        ))),
        Input::Submit(Box::new(Order {
            price: Some(dec!(149)),
            expiry: Some(at(8)),
            ..order("lim", "AAPL", Side::Buy, OrderType::Limit, dec!(7))
        })),
        Input::Price("AAPL", dec!(149.5)),
        Input::Price("AAPL", dec!(148)),
        Input::Cancel("entry".into()),
        Input::Price("AAPL", dec!(156)),
        Input::Tick,
        Input::Tick,
        Input::Price("AAPL", dec!(144)),
        Input::Price("AAPL", dec!(143)),
    ];
    let a = run_script(&busy_config(), &script);
    let b = run_script(&busy_config(), &script);
    assert!(!fills(&a).is_empty());
    assert_eq!(a, b);
}

fn arb_input() -> impl Strategy<Value = Input> {
    let side = prop_oneof![Just(Side::Buy), Just(Side::Sell)];
    let ot = prop_oneof![
        Just(OrderType::Market),
        Just(OrderType::Limit),
        Just(OrderType::Stop)
    ];
    let px = (90u32..=110).prop_map(Decimal::from);
    let submit = (
        0u8..6,
        side,
        ot,
        1u32..=20,
        px.clone(),
        any::<bool>(),
        0i64..20,
    )
        .prop_map(|(n, side, ot, q, p, bracket, exp)| {
            let mut o = order(&format!("o{n}"), "AAPL", side, ot, Decimal::from(q));
            o.price = Some(p);
            if bracket {
                let (sl, tp) = match side {
                    Side::Buy => (p - dec!(5), p + dec!(5)),
                    Side::Sell => (p + dec!(5), p - dec!(5)),
                };
                o.stop_loss = Some(sl);
                o.take_profit = Some(tp);
            }
            if exp > 10 {
                o.expiry = Some(at(exp));
            }
            Input::Submit(Box::new(o))
        });
    prop_oneof![
        3 => submit,
        4 => px.prop_map(|p| Input::Price("AAPL", p)),
        1 => (0u8..6).prop_map(|n| Input::Cancel(format!("o{n}"))),
        1 => Just(Input::Tick),
    ]
}

proptest! {
    #[test]
    fn random_scripts_are_deterministic_and_never_overfill(
        script in proptest::collection::vec(arb_input(), 1..40)
    ) {
        let cfg = busy_config();
        let a = run_script(&cfg, &script);
        prop_assert_eq!(&a, &run_script(&cfg, &script));

        let mut filled: BTreeMap<String, Decimal> = BTreeMap::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut last_seq: BTreeMap<String, u64> = BTreeMap::new();
        let mut terminal: BTreeMap<String, OrderStatus> = BTreeMap::new();
        let mut quantities: BTreeMap<String, Decimal> = BTreeMap::new();
        for e in &a {
            if let VenueEvent::ChildOrder(o) = e {
                quantities.insert(o.order_id.clone(), o.quantity);
            }
            if let Some(x) = e.execution() {
                prop_assert!(seen.insert(x.execution_id.clone()), "duplicate execution id");
                *filled.entry(x.order_id.clone()).or_default() += x.quantity;
            }
            if let Some(ev) = e.order_event() {
                prop_assert!(!terminal.contains_key(&ev.order_id), "terminal order changed");
                let prev = last_seq.insert(ev.order_id.clone(), ev.seq).unwrap_or(0);
                prop_assert_eq!(ev.seq, prev + 1);
                prop_assert_eq!(ev.filled_quantity, filled.get(&ev.order_id).copied().unwrap_or_default());
                if ev.status.is_terminal() {
                    terminal.insert(ev.order_id.clone(), ev.status);
                }
            }
        }
        for s in &script {
            if let Input::Submit(o) = s {
                quantities.entry(o.order_id.clone()).or_insert(o.quantity);
            }
        }
        for (id, f) in &filled {
            let q = quantities.get(id).copied().unwrap_or_default();
            prop_assert!(*f <= q, "{} filled {} of {}", id, f, q);
        }
    }
}
