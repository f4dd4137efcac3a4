//! TradingView alert bodies (see `mtx_standardizer::tradingview` for the shape).

mod common;

use common::*;
use mtx_schemas::enums::{Direction, InstrumentType, Side, SignalAction, SignalType, SizingMode};
use mtx_schemas::signal::ContentFormat;
use mtx_standardizer::{parse_raw, strip_secret, ParseContext, SignalError};
use serde_json::{json, Value};

/// A TradingView route bound to strategy `TV_Forex` trading FOREX.
fn tv_ctx() -> ParseContext {
    ParseContext {
        strategy_hint: Some("TV_Forex".into()),
        default_instrument_type: Some(InstrumentType::Forex),
        ..ctx(ContentFormat::TradingView)
    }
}

/// An alert as TradingView renders the documented message.
fn alert(action: &str, contracts: &str, prev: &str, now: &str) -> Value {
    json!({
        "ticker": "EURUSD",
        "action": action,
        "contracts": contracts,
        "price": "1.0850",
        "prev_market_position": prev,
        "market_position": now,
        "order_id": "Long",
        "time": "2025-11-20T10:00:00Z",
        "secret": "tv-secret-1"
    })
}

fn typed(a: &Value) -> (Option<SignalType>, Side, Direction) {
    let s = run(a, &tv_ctx()).unwrap_or_else(|e| panic!("{a}: {e}"));
    (s.signal_type, s.legs[0].side, s.legs[0].direction)
}

#[test]
fn entry_from_flat_to_long() {
    let mut body = alert("buy", "2", "flat", "long");
    assert_eq!(strip_secret(&mut body).as_deref(), Some("tv-secret-1"));
    let s = run(&body, &tv_ctx()).unwrap();
    assert_eq!(s.signal_type, Some(SignalType::Entry));
    assert_eq!(s.action, Some(SignalAction::Entry));
    assert_eq!(s.strategy_id, "TV_Forex");
    assert_eq!(s.source, "tradingview");
    assert_eq!(
        (s.instrument.as_str(), s.instrument_type),
        ("EURUSD", InstrumentType::Forex)
    );
    assert_eq!((s.legs[0].side, s.direction), (Side::Buy, Direction::Long));
    assert_eq!((s.quantity, s.price), (d("2"), Some(d("1.085"))));
    assert_eq!(s.sender_signal_id, "Long@2025-11-20T10:00:00Z@EURUSD");
    assert_eq!(s.signal_sent_at, Some(s.timestamp));
    assert_eq!(s.sizing_mode, SizingMode::SenderEquityRatio);
    assert!(!serde_json::to_string(&s).unwrap().contains("tv-secret-1"));
}

#[test]
fn inference_table() {
    use Direction::{Long, Short};
    use Side::{Buy, Sell};
    use SignalType::*;
    for (action, prev, now, want) in [
        ("buy", "flat", "long", (Some(Entry), Buy, Long)),
        ("sell", "flat", "short", (Some(Entry), Sell, Short)),
        ("sell", "long", "flat", (Some(Exit), Sell, Long)),
        ("buy", "short", "flat", (Some(Exit), Buy, Short)),
        ("buy", "long", "long", (Some(ScaleIn), Buy, Long)),
        ("sell", "long", "long", (Some(ScaleOut), Sell, Long)),
        ("sell", "short", "short", (Some(ScaleIn), Sell, Short)),
        ("buy", "short", "short", (Some(ScaleOut), Buy, Short)),
        ("BUY", "", "Long", (Some(Entry), Buy, Long)),
        ("sell", "", "long", (Some(ScaleOut), Sell, Long)),
        ("sell", "", "flat", (Some(Exit), Sell, Long)),
        ("buy", "", "flat", (Some(Exit), Buy, Short)),
        ("buy", "", "", (None, Buy, Long)),
        ("sell", "", "", (None, Sell, Short)),
    ] {
        assert_eq!(
            typed(&alert(action, "1", prev, now)),
            want,
            "{action} {prev} → {now}"
        );
    }
}

#[test]
fn contradictions_and_reversals_are_rejected() {
    for (action, prev, now) in [
        ("sell", "flat", "long"),
        ("buy", "long", "flat"),
        ("sell", "long", "short"),
        ("buy", "short", "long"),
        ("buy", "flat", "flat"),
    ] {
        let err = parse_raw(&alert(action, "1", prev, now), &tv_ctx()).unwrap_err();
        assert_eq!(
            (err.reason_code(), err.field()),
            ("invalid_enum", "market_position"),
            "{action} {prev} → {now}: {err}"
        );
    }
    let err = parse_raw(&alert("sell", "2", "long", "short"), &tv_ctx()).unwrap_err();
    assert!(err.to_string().contains("reversal"), "{err}");
    let err = parse_raw(&alert("buy", "1", "sideways", "long"), &tv_ctx()).unwrap_err();
    assert_eq!(
        (err.reason_code(), err.field()),
        ("invalid_enum", "prev_market_position")
    );
    let err = parse_raw(&alert("buy", "1", "flat", ""), &tv_ctx()).unwrap_err();
    assert_eq!(
        (err.reason_code(), err.field()),
        ("missing_field", "market_position")
    );
}

#[test]
fn one_strategy_alerting_on_two_charts_in_one_second_sends_two_signals() {
    // Same order id ("Long"), same bar-close second, no alert_id.
    let eur = run(&alert("buy", "1", "flat", "long"), &tv_ctx()).unwrap();
    let mut gbp_body = alert("buy", "1", "flat", "long");
    gbp_body["ticker"] = json!("GBPUSD");
    let gbp = run(&gbp_body, &tv_ctx()).unwrap();
    assert_ne!(eur.signal_id, gbp.signal_id);
    assert_eq!(gbp.sender_signal_id, "Long@2025-11-20T10:00:00Z@GBPUSD");
    // A re-send of the same alert is still the same signal.
    let again = run(&alert("buy", "1", "flat", "long"), &tv_ctx()).unwrap();
    assert_eq!(again.signal_id, eur.signal_id);
}

#[test]
fn an_explicit_signal_type_contradicting_the_positions_is_refused() {
    // long → flat closes the long: not an ENTRY (it would open a short).
    let mut body = alert("sell", "1", "long", "flat");
    body["signal_type"] = json!("ENTRY");
    let err = parse_raw(&body, &tv_ctx()).unwrap_err();
    assert_eq!(
        (err.reason_code(), err.field()),
        ("invalid_enum", "signal_type")
    );
    assert!(err.to_string().contains("contradicts"), "{err}");
    // flat → long opens: not an EXIT.
    let mut body = alert("buy", "1", "flat", "long");
    body["signal_type"] = json!("EXIT");
    assert!(parse_raw(&body, &tv_ctx()).is_err());
    // Agreeing (or finer: SCALE_OUT where the positions say EXIT) passes.
    let mut body = alert("sell", "1", "long", "flat");
    body["signal_type"] = json!("SCALE_OUT");
    assert_eq!(typed(&body).0, Some(SignalType::ScaleOut));
}

#[test]
fn a_continuous_front_month_future_is_its_root() {
    let mut body = alert("buy", "1", "flat", "long");
    body["ticker"] = json!("COMEX:GC1!");
    body["instrument_type"] = json!("FUTURE");
    let front_month = ParseContext {
        require_future_expiry: false,
        ..tv_ctx()
    };
    let s = run(&body, &front_month).unwrap();
    assert_eq!(s.instrument, "GC");
    assert_eq!(s.legs[0].exchange.as_deref(), Some("COMEX"));
}

#[test]
fn explicit_signal_type_wins() {
    let mut body = alert("sell", "1", "", "");
    body["signal_type"] = json!("EXIT");
    body["entry_signal_id"] = json!("Long@2025-11-19T10:00:00Z");
    let s = run(&body, &tv_ctx()).unwrap();
    assert_eq!(
        (s.signal_type, s.direction),
        (Some(SignalType::Exit), Direction::Long)
    );
    assert_eq!(
        s.sender_entry_signal_id.as_deref(),
        Some("Long@2025-11-19T10:00:00Z")
    );
}

#[test]
fn untyped_alert_without_price_is_a_delta_order() {
    let body = json!({"ticker": "EURUSD", "action": "sell", "quantity": 10000, "alert_id": "a-1"});
    let s = run(&body, &tv_ctx()).unwrap();
    assert_eq!(
        (s.signal_type, s.action, s.sizing_mode),
        (None, None, SizingMode::DeltaUnits)
    );
    assert_eq!(s.sender_signal_id, "a-1");
}

#[test]
fn exchange_prefix_close_alias_and_instrument_type_override() {
    let body = json!({"ticker": "BINANCE:BTCUSDT", "action": "buy", "contracts": "0.01", "close": "94000.5",
                      "instrument_type": "CRYPTO", "alert_id": "x", "market_position": "long", "prev_market_position": "flat"});
    let s = run(&body, &tv_ctx()).unwrap();
    assert_eq!(
        (s.instrument.as_str(), s.instrument_type),
        ("BTCUSDT", InstrumentType::Crypto)
    );
    assert_eq!(s.legs[0].exchange.as_deref(), Some("BINANCE"));
    assert_eq!(s.price, Some(d("94000.5")));
    let fx = json!({"ticker": "FX:EUR/USD", "action": "buy", "contracts": "1", "alert_id": "y"});
    assert_eq!(run(&fx, &tv_ctx()).unwrap().instrument, "EURUSD");
}

#[test]
fn sender_id_rules() {
    // alert_id beats order_id.
    let mut body = alert("buy", "1", "flat", "long");
    body["alert_id"] = json!("A-77");
    assert_eq!(run(&body, &tv_ctx()).unwrap().sender_signal_id, "A-77");
    // order_id repeats across trades: without time it is not an id...
    let mut no_time = alert("buy", "1", "flat", "long");
    no_time.as_object_mut().unwrap().remove("time");
    let err = parse_raw(&no_time, &tv_ctx()).unwrap_err();
    assert_eq!((err.reason_code(), err.field()), ("missing_field", "time"));
    // ...unless the gateway assigned a fallback.
    let fallback = ParseContext {
        fallback_signal_id: Some("body_abc".into()),
        ..tv_ctx()
    };
    assert_eq!(
        parse_raw(&no_time, &fallback).unwrap().sender_signal_id(),
        "body_abc"
    );
    // No id at all.
    let bare = json!({"ticker": "EURUSD", "action": "buy", "contracts": "1"});
    let err = parse_raw(&bare, &tv_ctx()).unwrap_err();
    assert_eq!(
        (err.reason_code(), err.field()),
        ("missing_field", "alert_id")
    );
    // Same alert, same id; another bar time, another id.
    let a = parse_raw(&alert("buy", "1", "flat", "long"), &tv_ctx()).unwrap();
    let mut later = alert("buy", "1", "flat", "long");
    later["time"] = json!("2025-11-20T11:00:00Z");
    assert_eq!(
        a.signal_id(),
        parse_raw(&alert("buy", "1", "flat", "long"), &tv_ctx())
            .unwrap()
            .signal_id()
    );
    assert_ne!(
        a.signal_id(),
        parse_raw(&later, &tv_ctx()).unwrap().signal_id()
    );
}

#[test]
fn route_strategy_wins_over_the_body() {
    let mut body = alert("buy", "1", "flat", "long");
    body["strategy"] = json!("Other");
    let s = run(&body, &tv_ctx()).unwrap();
    assert_eq!(s.strategy_id, "TV_Forex");
    assert_eq!(s.metadata.warnings.len(), 1);
    // Without a route strategy, the body's is used.
    let no_hint = ParseContext {
        strategy_hint: None,
        ..tv_ctx()
    };
    assert_eq!(parse_raw(&body, &no_hint).unwrap().strategy(), "Other");
}

#[test]
fn tradingview_errors_name_tradingview_fields() {
    let cases: [(Value, &str, &str); 6] = [
        (
            json!({"action": "buy", "contracts": "1", "alert_id": "a"}),
            "missing_field",
            "ticker",
        ),
        (
            json!({"ticker": "EURUSD", "contracts": "1", "alert_id": "a"}),
            "missing_field",
            "action",
        ),
        (
            json!({"ticker": "EURUSD", "action": "buy", "alert_id": "a"}),
            "missing_field",
            "contracts",
        ),
        (
            json!({"ticker": "EURUSD", "action": "buy", "contracts": "{{strategy.order.contracts}}", "alert_id": "a"}),
            "invalid_number",
            "contracts",
        ),
        (
            json!({"ticker": "EURUSD", "action": "buy", "contracts": "0", "alert_id": "a"}),
            "non_positive_quantity",
            "contracts",
        ),
        (
            json!({"ticker": "EURUSDT", "action": "buy", "contracts": "1", "alert_id": "a"}),
            "invalid_forex_symbol",
            "ticker",
        ),
    ];
    for (body, reason, field) in cases {
        let err: SignalError = parse_raw(&body, &tv_ctx()).unwrap_err();
        assert_eq!(
            (err.reason_code(), err.field()),
            (reason, field),
            "{body}: {err}"
        );
    }
    let no_type = ParseContext {
        default_instrument_type: None,
        ..tv_ctx()
    };
    let err = parse_raw(
        &json!({"ticker": "AAPL", "action": "buy", "contracts": "1", "alert_id": "a"}),
        &no_type,
    )
    .unwrap_err();
    assert_eq!(
        (err.reason_code(), err.field()),
        ("missing_field", "instrument_type")
    );
}
