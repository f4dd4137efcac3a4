//! Robustness and idempotence: the parser never panics, the same payload
//! always maps to the same signal id, and the secret never leaves the gateway.

mod common;

use common::*;
use mtx_schemas::enums::Environment;
use mtx_schemas::signal::{ContentFormat, RawSignal};
use mtx_standardizer::{
    parse_bytes, parse_raw, parse_raw_signal, payload_fingerprint, standardize, strip_secret,
    ParseContext, ParsedSignal,
};
use proptest::prelude::*;
use rust_decimal::Decimal;
use serde_json::{json, Map, Value};

const FIXTURES: [&str; 14] = [
    "crypto_btc_ladder_signal_1.json",
    "crypto_btc_simple_signal_1.json",
    "equity_ladder_signal_1.json",
    "equity_offmarket_signal_1.json",
    "equity_pairs_signal_1.json",
    "equity_simple_short_signal_1.json",
    "equity_simple_signal_1.json",
    "forex_ladder_signal_1.json",
    "forex_offmarket_signal_1.json",
    "forex_simple_signal_1.json",
    "futures_copper_offmarket_signal_1.json",
    "futures_copper_simple_signal_1.json",
    "futures_gold_offmarket_signal_1.json",
    "futures_gold_simple_signal_1.json",
];

fn lenient(format: ContentFormat) -> ParseContext {
    ParseContext {
        require_future_expiry: false,
        fallback_signal_id: Some("fb".into()),
        strategy_hint: Some("S".into()),
        default_instrument_type: Some(mtx_schemas::InstrumentType::Stock),
        ..ctx(format)
    }
}

fn all_fixture_signals() -> Vec<Value> {
    FIXTURES.iter().flat_map(|f| load_fixture(f)).collect()
}

/// Invariants every accepted signal keeps.
fn check_invariants(parsed: &ParsedSignal) {
    assert!(!parsed.legs().is_empty());
    for leg in parsed.legs() {
        assert!(leg.quantity > Decimal::ZERO);
        assert!(leg.price.is_none_or(|p| p > Decimal::ZERO));
        assert!(!leg.instrument.is_empty());
    }
    let s = standardize(parsed.clone(), &strategy(parsed.strategy()));
    assert_eq!(s.signal_id, parsed.signal_id());
    assert_eq!(s.legs.len(), parsed.legs().len());
    assert!(serde_json::to_string(&s).is_ok());
}

fn keys() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "strategy_name", "signalID", "signal_sent_EPOCH", "account_equity", "signal_type", "entry_signal_id",
            "signal_legs", "signal", "instrument", "ticker", "instrument_type", "action", "direction", "quantity",
            "contracts", "order_type", "price", "close", "stop_loss", "take_profit", "expiry", "exchange",
            "market_position", "prev_market_position", "order_id", "alert_id", "time", "strategy",
        ])
        .prop_map(str::to_string),
        1 => "[a-z_]{1,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        ".{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "BUY",
            "sell",
            "LONG",
            "SHORT",
            "FOREX",
            "FUTURE",
            "STOCK",
            "ENTRY",
            "EXIT",
            "CANCEL",
            "20251229",
            "202512",
            "1.5",
            "-1",
            "0",
            "1e30",
            "NaN",
            "EUR/USD",
            "EURUSD",
            "long",
            "flat",
            "short",
            "LIMIT",
            "1763632800",
            "2025-11-20T10:00:00Z",
            "X:Y",
            "{{close}}",
        ])
        .prop_map(|s| Value::String(s.to_string())),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((keys(), inner), 0..10)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A fixture signal with one field (top level or in a leg) replaced or removed.
fn mutated_fixture() -> impl Strategy<Value = Value> {
    let signals = all_fixture_signals();
    (
        prop::sample::select(signals),
        keys(),
        prop::option::of(json_value()),
        any::<bool>(),
    )
        .prop_map(|(mut signal, key, value, in_leg)| {
            let target = if in_leg {
                &mut signal["signal_legs"][0]
            } else {
                &mut signal
            };
            if let Some(obj) = target.as_object_mut() {
                match value {
                    Some(v) => obj.insert(key, v),
                    None => obj.remove(&key),
                };
            }
            signal
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for format in [ContentFormat::Mathematricks, ContentFormat::TradingView] {
            if let Ok(parsed) = parse_bytes(&bytes, &lenient(format)) {
                check_invariants(&parsed);
            }
        }
    }

    #[test]
    fn arbitrary_json_never_panics(value in json_value()) {
        let text = value.to_string();
        for format in [ContentFormat::Mathematricks, ContentFormat::TradingView] {
            for ctx in [ctx(format), lenient(format)] {
                if let Ok(parsed) = parse_raw(&value, &ctx) {
                    check_invariants(&parsed);
                }
                let _ = parse_bytes(text.as_bytes(), &ctx);
            }
        }
        let mut stripped = value.clone();
        let _ = strip_secret(&mut stripped);
        let _ = payload_fingerprint(&stripped);
    }

    #[test]
    fn mutated_fixtures_never_panic(value in mutated_fixture()) {
        for format in [ContentFormat::Mathematricks, ContentFormat::TradingView] {
            if let Ok(parsed) = parse_raw(&value, &lenient(format)) {
                check_invariants(&parsed);
            }
        }
    }
}

#[test]
fn same_payload_same_signal_id() {
    for payload in all_fixture_signals() {
        let a = parse_raw(&payload, &lenient(ContentFormat::Mathematricks)).unwrap();
        // Re-sent later, re-serialised with other key order: still the same signal.
        let reordered: Value = {
            let obj = payload.as_object().unwrap();
            let mut entries: Vec<_> = obj.iter().collect();
            entries.reverse();
            Value::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        };
        let later = ParseContext {
            received_at: received_at() + chrono::Duration::seconds(5),
            ..lenient(ContentFormat::Mathematricks)
        };
        let b = parse_raw(&reordered, &later).unwrap();
        assert_eq!(a.signal_id(), b.signal_id());
    }
    // A different sender id is a different signal; so is another source.
    let mut payload = load_fixture("equity_simple_signal_1.json").remove(0);
    let a = parse_raw(&payload, &mm_ctx()).unwrap().signal_id();
    let other_source = ParseContext {
        source: "other".into(),
        ..mm_ctx()
    };
    assert_ne!(a, parse_raw(&payload, &other_source).unwrap().signal_id());
    payload["signalID"] = json!("another");
    assert_ne!(a, parse_raw(&payload, &mm_ctx()).unwrap().signal_id());
}

#[test]
fn fingerprint_fallback_dedupes_id_less_bodies() {
    let text = std::fs::read_to_string(fixture_path("forex_simple_signal_1.json")).unwrap();
    let raw: Vec<Value> = serde_json::from_str(&text).unwrap();
    let id_of = |body: &Value| {
        let mut body = body.clone();
        strip_secret(&mut body);
        let ctx = ParseContext {
            fallback_signal_id: Some(payload_fingerprint(&body)),
            ..mm_ctx()
        };
        parse_raw(&body, &ctx).unwrap().signal_id()
    };
    assert_eq!(id_of(&raw[0]), id_of(&raw[0].clone()));
    assert_ne!(id_of(&raw[0]), id_of(&raw[1]));
}

#[test]
fn secret_never_reaches_raw_or_standardized_signals() {
    for file in FIXTURES {
        let text = std::fs::read_to_string(fixture_path(file)).unwrap();
        assert!(text.contains(SECRET));
        for payload in load_fixture(file) {
            let raw = RawSignal {
                source: "mathematricks".into(),
                environment: Environment::Staging,
                received_at: received_at(),
                format: ContentFormat::Mathematricks,
                strategy_hint: None,
                instrument_type_hint: None,
                fallback_signal_id: None,
                futures_front_month: false,
                payload,
            };
            let raw_json = serde_json::to_string(&raw).unwrap();
            assert!(
                !raw_json.contains(SECRET) && !raw_json.contains("passphrase"),
                "{file}: {raw_json}"
            );
            // The published envelope round-trips and parses in its own context.
            let back: RawSignal = serde_json::from_str(&raw_json).unwrap();
            let ctx = ParseContext {
                require_future_expiry: false,
                ..ParseContext::for_raw(&back)
            };
            let parsed = parse_raw(&back.payload, &ctx).unwrap();
            let std_json = serde_json::to_string(&standardize(parsed, &strategy("S"))).unwrap();
            assert!(!std_json.contains(SECRET), "{file}");
            if !file.starts_with("futures_copper") {
                assert!(parse_raw_signal(&back).is_ok(), "{file}");
            }
        }
    }
}

#[test]
fn secret_in_a_rejected_body_is_not_echoed() {
    // Even a body that was never stripped does not leak its secret into errors.
    let body = json!({"strategy_name": "S", "signalID": "1", "passphrase": SECRET,
        "signal_legs": [{"instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY", "quantity": "x"}]});
    let err = parse_raw(&body, &mm_ctx()).unwrap_err();
    assert!(!err.to_string().contains(SECRET));
}
