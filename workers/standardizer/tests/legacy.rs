//! Older shapes senders still emit: a single `signal` object, `ticker`,
//! numbers as strings, epochs in seconds / milliseconds / ISO-8601, untyped
//! delta orders (FloridaForex), and route-owned fields the payload may not set.

mod common;

use common::*;
use mtx_schemas::enums::{
    Direction, Environment, InstrumentType, OrderType, Side, SignalAction, SignalType, SizingMode,
};
use mtx_standardizer::{parse_raw, standardize, ParseContext};
use serde_json::{json, Value};

fn legacy(sent: Value) -> Value {
    json!({
        "strategy_name": "Forex",
        "signalID": "LEGACY_1",
        "signal_sent_EPOCH": sent,
        "account_equity": "250000.50",
        "signal_type": "entry",
        "signal": {
            "ticker": "eur/usd",
            "instrument_type": "FOREX",
            "action": "buy",
            "direction": "long",
            "quantity": "100000",
            "order_type": "LMT",
            "price": "1.0850",
            "stop_loss": "1.08",
            "take_profit": "1.1"
        }
    })
}

#[test]
fn single_signal_object_with_ticker_and_string_numbers() {
    let s = run(&legacy(json!(1_763_632_800)), &mm_ctx()).unwrap();
    assert_eq!(s.legs.len(), 1);
    let leg = &s.legs[0];
    assert_eq!(leg.instrument, "EURUSD");
    assert_eq!(leg.instrument_type, InstrumentType::Forex);
    assert_eq!((leg.side, leg.direction), (Side::Buy, Direction::Long));
    assert_eq!(leg.quantity, d("100000"));
    assert_eq!(leg.order_type, OrderType::Limit);
    assert_eq!(
        (leg.price, leg.stop_loss, leg.take_profit),
        (Some(d("1.085")), Some(d("1.08")), Some(d("1.1")))
    );
    assert_eq!(s.signal_type, Some(SignalType::Entry));
    assert_eq!(s.action, Some(SignalAction::Entry));
    assert_eq!(s.account_equity, Some(d("250000.5")));
    assert_eq!(s.sender_signal_id, "LEGACY_1");
    assert_eq!(
        s.signal_sent_at.unwrap().to_rfc3339(),
        "2025-11-20T10:00:00+00:00"
    );
    assert_eq!(s.timestamp, s.signal_sent_at.unwrap());
    assert_eq!(s.received_at, received_at());
}

#[test]
fn epoch_seconds_milliseconds_and_iso_agree() {
    let want = run(&legacy(json!(1_763_632_800)), &mm_ctx())
        .unwrap()
        .signal_sent_at;
    for sent in [
        json!("1763632800"),
        json!(1_763_632_800_000_u64),
        json!("1763632800000"),
        json!("2025-11-20T10:00:00Z"),
        json!("2025-11-20T05:00:00-05:00"),
    ] {
        assert_eq!(
            run(&legacy(sent.clone()), &mm_ctx())
                .unwrap()
                .signal_sent_at,
            want,
            "{sent}"
        );
    }
    let ms = run(&legacy(json!(1_763_632_800_123_u64)), &mm_ctx()).unwrap();
    assert_eq!(ms.signal_sent_at.unwrap().timestamp_subsec_millis(), 123);
}

#[test]
fn header_fields_may_sit_inside_the_legacy_signal() {
    let payload = json!({
        "strategy_name": "Forex",
        "signal": {"signalID": 42, "signal_type": "EXIT", "entry_signal_id": 41, "ticker": "AUDCAD",
                   "instrument_type": "FX", "action": "SELL", "quantity": 5, "account_equity": 1000}
    });
    let s = run(&payload, &mm_ctx()).unwrap();
    assert_eq!(s.sender_signal_id, "42");
    assert_eq!(s.signal_type, Some(SignalType::Exit));
    assert_eq!(s.sender_entry_signal_id.as_deref(), Some("41"));
    assert_eq!(
        s.entry_signal_id,
        Some(mtx_schemas::ids::signal_id("mathematricks", "Forex", "41"))
    );
    assert_eq!(
        (s.legs[0].side, s.legs[0].direction),
        (Side::Sell, Direction::Long)
    );
    assert_eq!(s.account_equity, Some(d("1000")));
    assert_eq!(s.order_type, OrderType::Market);
    assert_eq!(s.price, None);
}

#[test]
fn a_signal_type_on_both_levels_must_agree() {
    let body = |outer: &str, inner: &str| {
        json!({
            "strategy_name": "Forex", "signalID": "L1", "signal_type": outer,
            "signal": {"ticker": "AUDCAD", "instrument_type": "FX", "action": "SELL",
                       "quantity": 5, "signal_type": inner}
        })
    };
    let err = run(&body("ENTRY", "EXIT"), &mm_ctx()).unwrap_err();
    assert_eq!(
        (err.reason_code(), err.field()),
        ("invalid_enum", "signal.signal_type")
    );
    assert!(
        err.to_string().contains("contradicts the envelope's ENTRY"),
        "{err}"
    );
    let s = run(&body("EXIT", "exit"), &mm_ctx()).unwrap();
    assert_eq!(s.signal_type, Some(SignalType::Exit));
}

#[test]
fn floridaforex_delta_orders_are_untyped_and_delta_sized() {
    let payload = json!({
        "strategy_name": "FloridaForex",
        "signalID": "FF-9",
        "signal_sent_EPOCH": 1_763_632_800,
        "signal_legs": [{"instrument": "GBPUSD", "instrument_type": "FOREX", "action": "SELL", "quantity": 30000, "price": 0}]
    });
    let parsed = parse_raw(&payload, &mm_ctx()).unwrap();
    assert_eq!(parsed.signal_type(), None);
    assert_eq!(parsed.sizing_hint(), Some(SizingMode::DeltaUnits));
    // The strategy is configured otherwise: the payload's delta intent wins, visibly.
    let s = standardize(parsed.clone(), &strategy("FloridaForex"));
    assert_eq!(s.sizing_mode, SizingMode::DeltaUnits);
    assert_eq!(s.action, None);
    assert_eq!(s.signal_type, None);
    assert_eq!(s.price, None);
    assert_eq!(
        (s.legs[0].side, s.legs[0].direction, s.quantity),
        (Side::Sell, Direction::Short, d("30000"))
    );
    assert_eq!(s.metadata.warnings.len(), 1, "{:?}", s.metadata.warnings);
    // Configured as DELTA_UNITS: no warning.
    let delta = mtx_standardizer::StrategyInfo {
        sizing_mode: SizingMode::DeltaUnits,
        ..strategy("FloridaForex")
    };
    assert!(standardize(parsed, &delta).metadata.warnings.is_empty());
}

#[test]
fn untyped_orders_with_a_price_use_the_strategy_sizing() {
    let payload = json!({"strategy_name": "X", "signalID": "1",
        "signal_legs": [{"instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY", "quantity": 1, "price": 150}]});
    let s = run(&payload, &mm_ctx()).unwrap();
    assert_eq!(
        (s.signal_type, s.sizing_mode),
        (None, SizingMode::SenderEquityRatio)
    );
    assert!(s.metadata.warnings.is_empty());
}

#[test]
fn environment_comes_from_the_route_never_the_payload() {
    let payload = json!({"strategy_name": "X", "signalID": "1", "environment": "staging", "signal_type": "ENTRY",
        "signal_legs": [{"instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY", "quantity": 1, "environment": "staging"}]});
    let prod = ParseContext {
        environment: Environment::Production,
        ..mm_ctx()
    };
    assert_eq!(
        run(&payload, &prod).unwrap().environment,
        Environment::Production
    );
}

#[test]
fn nulls_are_absent_and_unknown_fields_are_ignored() {
    let payload = json!({"strategy_name": "X", "signalID": "1", "signal_type": "ENTRY", "entry_signal_id": null,
        "my_note": {"anything": [1, 2]}, "account_equity": null,
        "signal_legs": [{"instrument": "BTC", "instrument_type": "CRYPTO", "action": "BUY", "quantity": 0.1,
                         "price": null, "stop_loss": null, "expiry": null, "exchange": null, "leverage": 3}]});
    let s = run(&payload, &mm_ctx()).unwrap();
    assert_eq!(
        (s.price, s.stop_loss, s.expiry, s.account_equity),
        (None, None, None, None)
    );
    assert_eq!(s.legs[0].exchange, None);
}

#[test]
fn route_strategy_fills_a_missing_strategy_name() {
    let payload = json!({"signalID": "1", "signal_type": "ENTRY",
        "signal_legs": [{"instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY", "quantity": 1}]});
    let ctx = ParseContext {
        strategy_hint: Some("Route".into()),
        ..mm_ctx()
    };
    assert_eq!(parse_raw(&payload, &ctx).unwrap().strategy(), "Route");
}
