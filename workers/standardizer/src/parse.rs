//! From a sender's body to a [`StandardizedSignal`].
//!
//! The flow is `strip_secret` (gateway, before publishing the [`RawSignal`]) →
//! [`parse_raw`] (gateway to reject early, and the standardizer worker) →
//! [`standardize`] (worker, once the strategy's configuration is known).
//! Parsing needs no strategy configuration, so the signal id — and therefore
//! dedupe — is known at ingress.

use crate::error::SignalError;
use crate::fields::Obj;
use crate::{mathematricks, tradingview};
use chrono::{DateTime, Utc};
use mtx_schemas::enums::{Environment, InstrumentType, SignalAction, SignalType, SizingMode};
use mtx_schemas::ids;
use mtx_schemas::signal::{
    ContentFormat, RawSignal, SignalLeg, SignalMetadata, StandardizedSignal,
};
use rust_decimal::Decimal;
use serde_json::Value;

/// Field names that carry the sender's shared secret.
const SECRET_KEYS: [&str; 2] = ["passphrase", "secret"];

/// What the route / envelope knows about a payload, which the payload itself
/// must not decide (environment) or may not say (strategy, asset class).
#[derive(Debug, Clone, PartialEq)]
pub struct ParseContext {
    /// Sender / route name; part of the signal id.
    pub source: String,
    /// Environment of the route; any `environment` in the payload is ignored.
    pub environment: Environment,
    /// When the gateway received the request.
    pub received_at: DateTime<Utc>,
    /// How to read the body.
    pub format: ContentFormat,
    /// Sender signal id to use when the body has none (the gateway's choice,
    /// e.g. [`payload_fingerprint`]); without it a body with no id is rejected.
    pub fallback_signal_id: Option<String>,
    /// Strategy bound to the route: the default for Mathematricks bodies, and
    /// authoritative for TradingView (whose route secret is per strategy).
    pub strategy_hint: Option<String>,
    /// Instrument type for legs that declare none (TradingView routes).
    pub default_instrument_type: Option<InstrumentType>,
    /// Reject FUTURE legs without `expiry` (`future_without_expiry`). On by
    /// default; a route whose executor resolves the front month turns it off.
    pub require_future_expiry: bool,
}

impl ParseContext {
    /// A strict context: no fallback id, no hints, futures need an expiry.
    pub fn new(
        source: impl Into<String>,
        environment: Environment,
        received_at: DateTime<Utc>,
        format: ContentFormat,
    ) -> Self {
        ParseContext {
            source: source.into(),
            environment,
            received_at,
            format,
            fallback_signal_id: None,
            strategy_hint: None,
            default_instrument_type: None,
            require_future_expiry: true,
        }
    }

    /// The context a published [`RawSignal`] carries (strict on futures
    /// unless the route set `futures_front_month`).
    pub fn for_raw(raw: &RawSignal) -> Self {
        ParseContext {
            fallback_signal_id: raw.fallback_signal_id.clone(),
            strategy_hint: raw.strategy_hint.clone(),
            default_instrument_type: raw.instrument_type_hint,
            require_future_expiry: !raw.futures_front_month,
            ..ParseContext::new(
                raw.source.clone(),
                raw.environment,
                raw.received_at,
                raw.format,
            )
        }
    }
}

/// A validated signal that does not yet know its strategy's configuration.
///
/// Fields are read-only so the invariants hold: at least one leg, every
/// quantity positive, every FOREX symbol six letters.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSignal {
    format: ContentFormat,
    source: String,
    environment: Environment,
    received_at: DateTime<Utc>,
    strategy: String,
    sender_signal_id: String,
    signal_sent_at: Option<DateTime<Utc>>,
    signal_type: Option<SignalType>,
    sender_entry_signal_id: Option<String>,
    account_equity: Option<Decimal>,
    legs: Vec<SignalLeg>,
    sizing_hint: Option<SizingMode>,
    warnings: Vec<String>,
}

impl ParsedSignal {
    /// Deterministic mtx id: the same sender signal re-sent or redelivered
    /// always maps here, so it doubles as the `Nats-Msg-Id` and Mongo key.
    pub fn signal_id(&self) -> String {
        ids::signal_id(&self.source, &self.strategy, &self.sender_signal_id)
    }
    /// mtx id of the entry this signal exits / cancels / scales, derived the
    /// same way so it equals that entry's [`ParsedSignal::signal_id`].
    pub fn entry_signal_id(&self) -> Option<String> {
        let sender = self.sender_entry_signal_id.as_deref()?;
        Some(ids::signal_id(&self.source, &self.strategy, sender))
    }
    /// Body format it was read from.
    pub fn format(&self) -> ContentFormat {
        self.format
    }
    /// Sender / route name.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// Route environment.
    pub fn environment(&self) -> Environment {
        self.environment
    }
    /// Gateway receive time.
    pub fn received_at(&self) -> DateTime<Utc> {
        self.received_at
    }
    /// Strategy name as the sender (or the route) gave it; look the strategy
    /// configuration up by this.
    pub fn strategy(&self) -> &str {
        &self.strategy
    }
    /// The sender's id for this signal (or the fallback).
    pub fn sender_signal_id(&self) -> &str {
        &self.sender_signal_id
    }
    /// Sender's send time, if given.
    pub fn signal_sent_at(&self) -> Option<DateTime<Utc>> {
        self.signal_sent_at
    }
    /// Sender's signal type; `None` for untyped (delta) orders.
    pub fn signal_type(&self) -> Option<SignalType> {
        self.signal_type
    }
    /// The sender's id of the linked entry, as sent.
    pub fn sender_entry_signal_id(&self) -> Option<&str> {
        self.sender_entry_signal_id.as_deref()
    }
    /// Sender's account equity.
    pub fn account_equity(&self) -> Option<Decimal> {
        self.account_equity
    }
    /// The legs, in sender order (never empty).
    pub fn legs(&self) -> &[SignalLeg] {
        &self.legs
    }
    /// Sizing the payload itself implies (DELTA_UNITS for untyped, unpriced
    /// orders), overriding the strategy's configured mode.
    pub fn sizing_hint(&self) -> Option<SizingMode> {
        self.sizing_hint
    }
    /// Non-fatal corrections made while parsing.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// What a format parser extracts; [`Draft::finish`] applies the rules both
/// formats share.
#[derive(Debug)]
pub(crate) struct Draft {
    pub strategy: String,
    pub sender_signal_id: String,
    pub signal_sent_at: Option<DateTime<Utc>>,
    pub signal_type: Option<SignalType>,
    pub sender_entry_signal_id: Option<String>,
    pub account_equity: Option<Decimal>,
    pub legs: Vec<SignalLeg>,
    pub warnings: Vec<String>,
}

impl Draft {
    fn finish(self, ctx: &ParseContext) -> Result<ParsedSignal, SignalError> {
        if self.legs.is_empty() {
            return Err(SignalError::EmptyLegs {
                field: "signal_legs".into(),
            });
        }
        if self.signal_type == Some(SignalType::Cancel) && self.sender_entry_signal_id.is_none() {
            return Err(SignalError::MissingField {
                field: "entry_signal_id".into(),
                hint: Some("a CANCEL must name the entry it cancels".into()),
            });
        }
        // FloridaForex style: no signal_type and no price — "move the position
        // by this many units", whatever it currently is.
        let sizing_hint = (self.signal_type.is_none()
            && self.legs.iter().all(|l| l.price.is_none()))
        .then_some(SizingMode::DeltaUnits);
        Ok(ParsedSignal {
            format: ctx.format,
            source: ctx.source.clone(),
            environment: ctx.environment,
            received_at: ctx.received_at,
            strategy: self.strategy,
            sender_signal_id: self.sender_signal_id,
            signal_sent_at: self.signal_sent_at,
            signal_type: self.signal_type,
            sender_entry_signal_id: self.sender_entry_signal_id,
            account_equity: self.account_equity,
            legs: self.legs,
            sizing_hint,
            warnings: self.warnings,
        })
    }
}

/// Sender account equity: must be positive (it divides in SENDER_EQUITY_RATIO sizing).
pub(crate) fn account_equity(obj: &Obj<'_>) -> Result<Option<Decimal>, SignalError> {
    match obj.decimal(&["account_equity"])? {
        Some((key, e)) if e <= Decimal::ZERO => Err(SignalError::InvalidNumber {
            field: obj.path(key),
            detail: format!("must be positive, got {e}"),
        }),
        other => Ok(other.map(|(_, e)| e)),
    }
}

/// Remove the shared secret (`passphrase` / `secret`) from a body, top level,
/// inside a legacy `signal` object and inside each `signal_legs[]` entry, and
/// return it for checking. Call it before a body is logged, stored or published:
/// the secret must never leave the gateway. The top-level value wins when
/// several are present; all are removed.
pub fn strip_secret(payload: &mut Value) -> Option<String> {
    fn take(v: &mut Value) -> Option<String> {
        let map = v.as_object_mut()?;
        let mut found = None;
        for key in SECRET_KEYS {
            if let Some(secret) = map.remove(key) {
                let text = match secret {
                    Value::String(s) => Some(s),
                    Value::Null => None,
                    other => Some(other.to_string()),
                };
                found = found.or(text);
            }
        }
        found
    }
    let mut found = take(payload);
    if let Some(map) = payload.as_object_mut() {
        if let Some(signal) = map.get_mut("signal") {
            found = found.or(take(signal));
        }
        if let Some(Value::Array(legs)) = map.get_mut("signal_legs") {
            for leg in legs {
                found = found.or(take(leg));
            }
        }
    }
    found
}

/// Decode a request body; `invalid_json` when it is not JSON.
pub fn decode_payload(bytes: &[u8]) -> Result<Value, SignalError> {
    serde_json::from_slice(bytes).map_err(|e| SignalError::InvalidJson {
        detail: e.to_string(),
    })
}

/// [`decode_payload`] then [`parse_raw`].
pub fn parse_bytes(bytes: &[u8], ctx: &ParseContext) -> Result<ParsedSignal, SignalError> {
    parse_raw(&decode_payload(bytes)?, ctx)
}

/// Validate and normalise a body in `ctx.format`. Unknown fields are ignored
/// (senders add their own); known fields with the wrong type or value are
/// errors naming their path. See [`crate::mathematricks`] and
/// [`crate::tradingview`] for the shapes.
pub fn parse_raw(payload: &Value, ctx: &ParseContext) -> Result<ParsedSignal, SignalError> {
    let draft = match ctx.format {
        ContentFormat::Mathematricks => mathematricks::parse(payload, ctx)?,
        ContentFormat::TradingView => tradingview::parse(payload, ctx)?,
    };
    draft.finish(ctx)
}

/// [`parse_raw`] of a published raw signal, in its own context.
pub fn parse_raw_signal(raw: &RawSignal) -> Result<ParsedSignal, SignalError> {
    parse_raw(&raw.payload, &ParseContext::for_raw(raw))
}

/// The strategy configuration standardization needs.
#[derive(Debug, Clone, PartialEq)]
pub struct StrategyInfo {
    /// Strategy id as configured in mtx.
    pub strategy_id: String,
    /// Expected alpha, copied to `metadata.expected_alpha` for the slippage rule.
    pub expected_alpha: Option<Decimal>,
    /// How Cerebro sizes this strategy's signals unless the payload implies otherwise.
    pub sizing_mode: SizingMode,
}

/// Build the standardized signal. Top-level instrument fields copy the first
/// leg; `timestamp` is the sender's send time, else the receive time; the
/// sizing mode is the payload's implied one (delta orders), else the
/// strategy's, with a warning when the two disagree.
pub fn standardize(parsed: ParsedSignal, strategy: &StrategyInfo) -> StandardizedSignal {
    let signal_id = parsed.signal_id();
    let entry_signal_id = parsed.entry_signal_id();
    let mut warnings = parsed.warnings;
    let sizing_mode = match parsed.sizing_hint {
        Some(hint) if hint != strategy.sizing_mode => {
            warnings.push(format!(
                "sizing_mode: untyped order without price sized as {hint}, not the strategy's {}",
                strategy.sizing_mode
            ));
            hint
        }
        Some(hint) => hint,
        None => strategy.sizing_mode,
    };
    let action = parsed.signal_type.and_then(|t| match t {
        SignalType::Entry | SignalType::ScaleIn => Some(SignalAction::Entry),
        SignalType::Exit | SignalType::ScaleOut => Some(SignalAction::Exit),
        SignalType::Cancel => None,
    });
    // ParsedSignal is only built with at least one leg (Draft::finish).
    let lead = parsed.legs[0].clone();
    StandardizedSignal {
        signal_id,
        strategy_id: strategy.strategy_id.clone(),
        timestamp: parsed.signal_sent_at.unwrap_or(parsed.received_at),
        instrument: lead.instrument,
        instrument_type: lead.instrument_type,
        direction: lead.direction,
        action,
        order_type: lead.order_type,
        price: lead.price,
        quantity: lead.quantity,
        stop_loss: lead.stop_loss,
        take_profit: lead.take_profit,
        expiry: lead.expiry,
        metadata: SignalMetadata {
            expected_alpha: strategy.expected_alpha,
            warnings,
        },
        legs: parsed.legs,
        signal_type: parsed.signal_type,
        entry_signal_id,
        sender_entry_signal_id: parsed.sender_entry_signal_id,
        environment: parsed.environment,
        source: parsed.source,
        sender_signal_id: parsed.sender_signal_id,
        signal_sent_at: parsed.signal_sent_at,
        received_at: parsed.received_at,
        account_equity: parsed.account_equity,
        sizing_mode,
    }
}

/// A stable fallback sender id for bodies without one: a hash of the body
/// with object keys sorted, so the same body always yields the same id
/// whatever order its keys arrived in. Strip the secret first. Two deliberate
/// sends of byte-identical bodies collapse to one signal — the price of dedupe
/// without a sender id.
pub fn payload_fingerprint(payload: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                out.push('{');
                for (i, key) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::String(key.clone()).to_string());
                    out.push(':');
                    if let Some(value) = map.get(key) {
                        write(value, out);
                    }
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            scalar => out.push_str(&scalar.to_string()),
        }
    }
    let mut canonical = String::new();
    write(payload, &mut canonical);
    ids::derive_id("body", &[&canonical])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strip_secret_removes_every_copy_and_returns_the_top_level_one() {
        let mut v = json!({
            "passphrase": "top",
            "secret": "other",
            "signal": {"passphrase": "inner", "ticker": "AAPL"},
            "signal_legs": [{"secret": "leg"}],
        });
        assert_eq!(strip_secret(&mut v).as_deref(), Some("top"));
        let text = v.to_string();
        for s in ["top", "other", "inner", "\"leg\"", "passphrase", "secret"] {
            assert!(!text.contains(s), "{s} left in {text}");
        }
        assert_eq!(v["signal"]["ticker"], "AAPL");

        let mut inner_only = json!({"signal": {"secret": 1234}});
        assert_eq!(strip_secret(&mut inner_only).as_deref(), Some("1234"));
        let mut none = json!({"a": 1});
        assert_eq!(strip_secret(&mut none), None);
        let mut not_object = json!([{"passphrase": "x"}]);
        assert_eq!(strip_secret(&mut not_object), None);
    }

    #[test]
    fn fingerprint_ignores_key_order_but_not_content() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"x":"1","y":[1,2]}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"b":{"y":[1,2],"x":"1"},"a":1}"#).unwrap();
        let c: Value = serde_json::from_str(r#"{"b":{"y":[2,1],"x":"1"},"a":1}"#).unwrap();
        assert_eq!(payload_fingerprint(&a), payload_fingerprint(&b));
        assert_ne!(payload_fingerprint(&a), payload_fingerprint(&c));
        assert!(payload_fingerprint(&a).starts_with("body_"));
    }
}
