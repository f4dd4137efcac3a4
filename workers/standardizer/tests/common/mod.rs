//! Shared helpers: contexts, a strategy, and the sender tool's placeholder
//! resolution for the fixture files.
#![allow(dead_code)]

use chrono::{DateTime, TimeZone, Utc};
use mtx_schemas::enums::{Environment, SizingMode};
use mtx_schemas::signal::{ContentFormat, StandardizedSignal};
use mtx_standardizer::{
    parse_raw, standardize, strip_secret, ParseContext, SignalError, StrategyInfo,
};
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

/// The fixtures' passphrase; must never survive `strip_secret`.
pub const SECRET: &str = "test_password_123";

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

pub fn received_at() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 11, 20, 14, 30, 0).unwrap()
}

pub fn ctx(format: ContentFormat) -> ParseContext {
    let source = match format {
        ContentFormat::Mathematricks => "mathematricks",
        ContentFormat::TradingView => "tradingview",
    };
    ParseContext::new(source, Environment::Staging, received_at(), format)
}

pub fn mm_ctx() -> ParseContext {
    ctx(ContentFormat::Mathematricks)
}

pub fn strategy(id: &str) -> StrategyInfo {
    StrategyInfo {
        strategy_id: id.to_string(),
        expected_alpha: Some(d("0.02")),
        sizing_mode: SizingMode::SenderEquityRatio,
    }
}

/// Parse in `ctx` and standardize with the strategy the payload names.
pub fn run(payload: &Value, ctx: &ParseContext) -> Result<StandardizedSignal, SignalError> {
    let parsed = parse_raw(payload, ctx)?;
    let info = strategy(parsed.strategy());
    Ok(standardize(parsed, &info))
}

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/signals")
        .join(name)
}

/// Load a fixture file as the sender tool sends it: drop `wait` / `entry_name`,
/// assign `signalID` where missing (`<file>_<index>`), resolve `$ENTRY_n` and
/// `$PREVIOUS` in `entry_signal_id`, and strip the passphrase (checking it).
pub fn load_fixture(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture_path(name)).unwrap();
    let signals: Vec<Value> = serde_json::from_str(&text).unwrap();
    let stem = name.trim_end_matches(".json");
    let mut named: HashMap<String, String> = HashMap::new();
    let mut previous: Option<String> = None;
    signals
        .into_iter()
        .enumerate()
        .map(|(i, mut signal)| {
            let obj = signal.as_object_mut().unwrap();
            obj.remove("wait");
            let id = match obj.get("signalID").and_then(Value::as_str) {
                Some(id) => id.to_string(),
                None => {
                    let id = format!("{stem}_{i}");
                    obj.insert("signalID".into(), Value::String(id.clone()));
                    id
                }
            };
            if let Some(Value::String(name)) = obj.remove("entry_name") {
                named.insert(name, id.clone());
            }
            if let Some(Value::String(link)) = obj.get("entry_signal_id").cloned() {
                let resolved = match link.as_str() {
                    "$PREVIOUS" => previous.clone().unwrap(),
                    l if l.starts_with('$') => named[l].clone(),
                    l => l.to_string(),
                };
                obj.insert("entry_signal_id".into(), Value::String(resolved));
            }
            previous = Some(id);
            assert_eq!(strip_secret(&mut signal).as_deref(), Some(SECRET));
            signal
        })
        .collect()
}
