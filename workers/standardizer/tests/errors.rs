//! One test per rejection reason: the reason code, the field path it names,
//! and that the message carries that path.

mod common;

use common::*;
use mtx_schemas::signal::ContentFormat;
use mtx_standardizer::{parse_bytes, parse_raw, ParseContext, SignalError};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::Mutex;

/// Reason codes the tests below have exercised.
static SEEN: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());

fn base() -> Value {
    json!({
        "strategy_name": "SPX_1-D_Opt",
        "signalID": "S1",
        "signal_type": "ENTRY",
        "account_equity": 500000,
        "signal_legs": [
            {"instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY", "direction": "LONG",
             "quantity": 10, "order_type": "MARKET", "price": 150.0},
            {"instrument": "NVDA", "instrument_type": "STOCK", "action": "SELL", "direction": "SHORT",
             "quantity": 10, "order_type": "MARKET", "price": 500.0}
        ]
    })
}

/// `base()` with `edit` applied.
fn with(edit: impl FnOnce(&mut Value)) -> Value {
    let mut v = base();
    edit(&mut v);
    v
}

fn rejects_in(
    payload: &Value,
    ctx: &ParseContext,
    reason: &'static str,
    field: &str,
) -> SignalError {
    let err = parse_raw(payload, ctx).expect_err("payload was accepted");
    assert_eq!(err.reason_code(), reason, "{err}");
    assert_eq!(err.field(), field, "{err}");
    assert!(
        err.to_string().contains(field),
        "message `{err}` does not name {field}"
    );
    SEEN.lock().unwrap().insert(reason);
    err
}

fn rejects(payload: &Value, reason: &'static str, field: &str) -> SignalError {
    rejects_in(payload, &mm_ctx(), reason, field)
}

#[test]
fn base_payload_is_valid() {
    assert_eq!(run(&base(), &mm_ctx()).unwrap().legs.len(), 2);
}

#[test]
fn invalid_json() {
    for body in [&b"{not json"[..], b"", b"\xff\xfe", b"{\"a\": 1,}"] {
        let err = parse_bytes(body, &mm_ctx()).unwrap_err();
        assert_eq!(err.reason_code(), "invalid_json");
        assert_eq!(err.field(), "payload");
        assert!(err.to_string().starts_with("payload: invalid JSON"));
    }
    SEEN.lock().unwrap().insert("invalid_json");
}

#[test]
fn unknown_shape() {
    rejects(&json!([base()]), "unknown_shape", "payload");
    rejects(&json!("ENTRY AAPL"), "unknown_shape", "payload");
    rejects(
        &with(|v| drop(v.as_object_mut().unwrap().remove("signal_legs"))),
        "unknown_shape",
        "payload",
    );
    rejects(
        &with(|v| v["signal"] = json!({"ticker": "AAPL"})),
        "unknown_shape",
        "payload",
    );
    rejects(
        &with(|v| v["signal_legs"] = json!({"instrument": "AAPL"})),
        "unknown_shape",
        "signal_legs",
    );
    rejects(
        &with(|v| v["signal_legs"][1] = json!("NVDA")),
        "unknown_shape",
        "signal_legs[1]",
    );
    let tv = ParseContext {
        strategy_hint: Some("TV".into()),
        ..ctx(ContentFormat::TradingView)
    };
    rejects_in(&json!(["buy"]), &tv, "unknown_shape", "payload");
}

#[test]
fn missing_field() {
    rejects(
        &with(|v| {
            drop(
                v["signal_legs"][1]
                    .as_object_mut()
                    .unwrap()
                    .remove("quantity"),
            )
        }),
        "missing_field",
        "signal_legs[1].quantity",
    );
    rejects(
        &with(|v| v["signal_legs"][1]["instrument"] = json!("  ")),
        "missing_field",
        "signal_legs[1].instrument",
    );
    rejects(
        &with(|v| v["signal_legs"][0]["action"] = Value::Null),
        "missing_field",
        "signal_legs[0].action",
    );
    rejects(
        &with(|v| {
            drop(
                v["signal_legs"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("instrument_type"),
            )
        }),
        "missing_field",
        "signal_legs[0].instrument_type",
    );
    rejects(
        &with(|v| drop(v.as_object_mut().unwrap().remove("signalID"))),
        "missing_field",
        "signalID",
    );
    let err = rejects(
        &with(|v| v["signal_type"] = json!("CANCEL")),
        "missing_field",
        "entry_signal_id",
    );
    assert!(err.to_string().contains("CANCEL must name the entry"));
    let err = rejects(
        &with(|v| {
            v["signal_legs"][0]["order_type"] = json!("LIMIT");
            v["signal_legs"][0]["price"] = json!(0);
        }),
        "missing_field",
        "signal_legs[0].price",
    );
    assert!(
        err.to_string()
            .contains("LIMIT order needs a non-zero price"),
        "{err}"
    );
}

#[test]
fn missing_strategy() {
    rejects(
        &with(|v| drop(v.as_object_mut().unwrap().remove("strategy_name"))),
        "missing_strategy",
        "strategy_name",
    );
    rejects(
        &with(|v| v["strategy_name"] = json!("")),
        "missing_strategy",
        "strategy_name",
    );
    let tv = json!({"ticker": "AAPL", "action": "buy", "contracts": "1", "alert_id": "a"});
    let ctx = ParseContext {
        default_instrument_type: Some(mtx_schemas::InstrumentType::Stock),
        ..ctx(ContentFormat::TradingView)
    };
    rejects_in(&tv, &ctx, "missing_strategy", "strategy");
}

#[test]
fn empty_legs() {
    rejects(
        &with(|v| v["signal_legs"] = json!([])),
        "empty_legs",
        "signal_legs",
    );
}

#[test]
fn non_positive_quantity() {
    for q in [json!(0), json!(-5), json!("-0.5"), json!("0.000")] {
        let err = rejects(
            &with(|v| v["signal_legs"][1]["quantity"] = q.clone()),
            "non_positive_quantity",
            "signal_legs[1].quantity",
        );
        assert!(matches!(err, SignalError::NonPositiveQuantity { .. }));
    }
}

#[test]
fn amounts_beyond_the_shared_limits() {
    let err = rejects(
        &with(|v| v["signal_legs"][1]["quantity"] = json!("1e27")),
        "invalid_number",
        "signal_legs[1].quantity",
    );
    assert!(
        err.to_string().contains("at most 10000000000000000"),
        "{err}"
    );
    for field in ["price", "stop_loss", "take_profit"] {
        let err = rejects(
            &with(|v| v["signal_legs"][1][field] = json!(1e11)),
            "invalid_number",
            &format!("signal_legs[1].{field}"),
        );
        assert!(err.to_string().contains("at most 10000000000"), "{err}");
    }
}

#[test]
fn unknown_instrument_type() {
    let err = rejects(
        &with(|v| v["signal_legs"][1]["instrument_type"] = json!("BOND")),
        "unknown_instrument_type",
        "signal_legs[1].instrument_type",
    );
    assert!(err.to_string().contains("`BOND`"));
}

#[test]
fn invalid_forex_symbol() {
    for sym in ["EURUSDX", "EUR/US", "EU", "EUR USD", "12345A"] {
        rejects(
            &with(|v| {
                v["signal_legs"][1]["instrument_type"] = json!("FOREX");
                v["signal_legs"][1]["instrument"] = json!(sym);
            }),
            "invalid_forex_symbol",
            "signal_legs[1].instrument",
        );
    }
    // Legacy `ticker` is named as such.
    let legacy = json!({"strategy_name": "Forex", "signalID": "L1", "signal": {"ticker": "EURO", "instrument_type": "FOREX", "action": "BUY", "quantity": 1}});
    rejects(&legacy, "invalid_forex_symbol", "signal.ticker");
}

#[test]
fn future_without_expiry() {
    let payload = with(|v| {
        v["signal_legs"][1] = json!({"instrument": "GC", "instrument_type": "FUTURE", "action": "SELL", "quantity": 1})
    });
    let err = rejects(&payload, "future_without_expiry", "signal_legs[1].expiry");
    assert!(err.to_string().contains("`GC`"));
    let lenient = ParseContext {
        require_future_expiry: false,
        ..mm_ctx()
    };
    assert!(parse_raw(&payload, &lenient).is_ok());
}

#[test]
fn option_without_contract() {
    // A bare root: which contract?
    let err = rejects(
        &with(
            |v| v["signal_legs"][1] = json!({"instrument": "SPX", "instrument_type": "OPTION", "action": "BUY", "quantity": 1}),
        ),
        "option_without_contract",
        "signal_legs[1].instrument",
    );
    assert!(err.to_string().contains("OCC"), "{err}");
    // Strike and right in fields of their own would be dropped: a call and
    // a put would become the same order.
    rejects(
        &with(|v| {
            v["signal_legs"][1] = json!({"instrument": "SPXW251219C05000000", "instrument_type": "OPTION",
                                          "action": "BUY", "quantity": 1, "right": "P"})
        }),
        "option_without_contract",
        "signal_legs[1].right",
    );
    // The OCC symbol (padded or not) names one contract.
    let ok = with(|v| {
        v["signal_legs"][1] = json!({"instrument": "SPXW  251219C05000000", "instrument_type": "OPTION",
                                      "action": "BUY", "quantity": 1})
    });
    let parsed = parse_raw(&ok, &mm_ctx()).unwrap();
    assert_eq!(parsed.legs()[1].instrument, "SPXW251219C05000000");
}

#[test]
fn invalid_number() {
    for (path, bad) in [
        ("quantity", json!("ten")),
        ("quantity", json!("NaN")),
        ("quantity", json!("inf")),
        ("quantity", json!("")),
        ("quantity", json!(true)),
        ("price", json!("1,5")),
        ("price", json!(-1)),
        ("stop_loss", json!("{{plot_0}}")),
        ("take_profit", json!([1])),
    ] {
        let field = format!("signal_legs[1].{path}");
        rejects(
            &with(|v| v["signal_legs"][1][path] = bad.clone()),
            "invalid_number",
            &field,
        );
    }
    rejects(
        &with(|v| v["account_equity"] = json!(0)),
        "invalid_number",
        "account_equity",
    );
    rejects(
        &with(|v| v["account_equity"] = json!("lots")),
        "invalid_number",
        "account_equity",
    );
    rejects(
        &with(|v| v["signal_legs"][0]["quantity"] = json!("1e40")),
        "invalid_number",
        "signal_legs[0].quantity",
    );
}

#[test]
fn invalid_date() {
    for bad in [
        json!("yesterday"),
        json!(-1),
        json!(86400),
        json!(true),
        json!(""),
    ] {
        rejects(
            &with(|v| v["signal_sent_EPOCH"] = bad.clone()),
            "invalid_date",
            "signal_sent_EPOCH",
        );
    }
    for bad in [
        json!("20251345"),
        json!("202512"),
        json!("Dec 2025"),
        json!(20251229.5),
    ] {
        rejects(
            &with(|v| v["signal_legs"][1]["expiry"] = bad.clone()),
            "invalid_date",
            "signal_legs[1].expiry",
        );
    }
}

#[test]
fn invalid_enum() {
    rejects(
        &with(|v| v["signal_legs"][1]["action"] = json!("HOLD")),
        "invalid_enum",
        "signal_legs[1].action",
    );
    rejects(
        &with(|v| v["signal_legs"][1]["action"] = json!(1)),
        "invalid_enum",
        "signal_legs[1].action",
    );
    rejects(
        &with(|v| v["signal_legs"][1]["direction"] = json!("UP")),
        "invalid_enum",
        "signal_legs[1].direction",
    );
    rejects(
        &with(|v| v["signal_legs"][1]["order_type"] = json!("TRAIL")),
        "invalid_enum",
        "signal_legs[1].order_type",
    );
    let err = rejects(
        &with(|v| v["signal_type"] = json!("OPEN")),
        "invalid_enum",
        "signal_type",
    );
    assert!(
        err.to_string()
            .contains("ENTRY, EXIT, CANCEL, SCALE_IN, SCALE_OUT"),
        "{err}"
    );
    rejects(
        &with(|v| v["signal_type"] = json!("")),
        "invalid_enum",
        "signal_type",
    );
}

#[test]
fn invalid_type() {
    rejects(
        &with(|v| v["signal_legs"][1]["instrument"] = json!(5)),
        "invalid_type",
        "signal_legs[1].instrument",
    );
    rejects(
        &with(|v| v["strategy_name"] = json!({"name": "x"})),
        "invalid_type",
        "strategy_name",
    );
    rejects(
        &with(|v| v["signalID"] = json!(1.5)),
        "invalid_type",
        "signalID",
    );
    rejects(
        &with(|v| v["signal_legs"][0]["exchange"] = json!(["NYSE"])),
        "invalid_type",
        "signal_legs[0].exchange",
    );
}

#[test]
fn every_reason_code_is_exercised() {
    // Run the other tests' bodies here too so this does not depend on order.
    invalid_json();
    unknown_shape();
    missing_field();
    missing_strategy();
    empty_legs();
    non_positive_quantity();
    unknown_instrument_type();
    invalid_forex_symbol();
    future_without_expiry();
    option_without_contract();
    invalid_number();
    invalid_date();
    invalid_enum();
    invalid_type();
    let seen = SEEN.lock().unwrap().clone();
    let all: BTreeSet<&str> = SignalError::ALL_REASON_CODES.iter().copied().collect();
    assert_eq!(seen, all);
}
