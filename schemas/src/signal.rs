//! Raw and standardized signals (ingress → standardizer → Cerebro).
//!
//! - [`RawSignal`] is what the gateway publishes on `signals.raw.<env>.<source>`:
//!   the sender's JSON body (secret removed) plus what the route knows about it.
//! - [`StandardizedSignal`] is what the standardizer publishes for Cerebro and
//!   stores in `standardized_signals`: the seed collection's fields, plus the
//!   legs, links and provenance mtx needs to size, route and audit the signal.
//!
//! Decimals serialize as strings (rust_decimal's default) so no price or
//! quantity ever passes through a binary float; dates are UTC.

use crate::enums::{
    Direction, Environment, InstrumentType, OrderType, Side, SignalAction, SignalType, SizingMode,
};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Body format of a raw signal; chosen by the gateway route, because the body
/// alone cannot always tell a TradingView alert from a Mathematricks signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContentFormat {
    /// The Mathematricks sender format (`strategy_name`, `signal_legs[]`, ...),
    /// including its legacy single-`signal` shape.
    #[serde(rename = "MATHEMATRICKS")]
    Mathematricks,
    /// A TradingView alert body built from `{{...}}` placeholders.
    #[serde(rename = "TRADINGVIEW")]
    TradingView,
}

impl ContentFormat {
    /// The serialized spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            ContentFormat::Mathematricks => "MATHEMATRICKS",
            ContentFormat::TradingView => "TRADINGVIEW",
        }
    }
}

impl fmt::Display for ContentFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signal as received, published by the gateway on `signals.raw.<env>.<source>`.
///
/// The payload is kept verbatim (minus the passphrase/secret, which the gateway
/// strips after checking it) so the standardizer can be fixed and the stream
/// replayed without asking senders to re-send.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RawSignal {
    /// Sender / route name, e.g. `mathematricks`, `tradingview`, `floridaforex`.
    pub source: String,
    /// Environment of the route that received it (never taken from the payload).
    pub environment: Environment,
    /// When the gateway received the request.
    pub received_at: DateTime<Utc>,
    /// How to read `payload`.
    pub format: ContentFormat,
    /// Strategy bound to the route (TradingView routes are per strategy; the
    /// body may not name one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_hint: Option<String>,
    /// Instrument type bound to the route, for bodies that do not declare one
    /// (TradingView `{{ticker}}` says nothing about the asset class).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instrument_type_hint: Option<InstrumentType>,
    /// Sender signal id the gateway assigned when the body carries none, so the
    /// standardizer derives the same signal id the gateway used for dedupe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_signal_id: Option<String>,
    /// The route accepts FUTURE legs without `expiry` (the executor resolves
    /// the front month); by default such legs are rejected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub futures_front_month: bool,
    /// The sender's JSON body with `passphrase` / `secret` removed.
    pub payload: serde_json::Value,
}

/// One instrument order within a signal (a pairs trade has two).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignalLeg {
    /// Normalised symbol: uppercase; FOREX as six letters (`EURUSD`); futures as
    /// the root (`GC`) with the contract in `expiry`.
    pub instrument: String,
    /// Asset class.
    pub instrument_type: InstrumentType,
    /// Order side (the sender's `action`); authoritative.
    pub side: Side,
    /// Direction of the POSITION this leg opens, adds to, reduces or closes
    /// (an EXIT that sells closes a LONG), never the direction of the trade.
    pub direction: Direction,
    /// Sender quantity in units (always > 0; `side` carries the sign).
    /// How Cerebro scales it is the signal's `sizing_mode`.
    pub quantity: Decimal,
    /// Order type (MARKET when the sender gives none).
    pub order_type: OrderType,
    /// Sender reference / limit / stop price; `None` when the sender sent none
    /// or 0 (its "no price" sentinel).
    pub price: Option<Decimal>,
    /// Protective stop price, if any.
    pub stop_loss: Option<Decimal>,
    /// Profit target price, if any.
    pub take_profit: Option<Decimal>,
    /// Contract expiry (futures / options), midnight UTC of the sender's date.
    pub expiry: Option<DateTime<Utc>>,
    /// Listing exchange the sender named (e.g. `COMEX`), uppercase.
    pub exchange: Option<String>,
}

/// Strategy facts copied onto the signal (`standardized_signals.metadata`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SignalMetadata {
    /// Strategy's expected alpha, for Cerebro's 30% slippage rule.
    pub expected_alpha: Option<Decimal>,
    /// Non-fatal oddities the standardizer corrected (e.g. a `direction` that
    /// contradicted `action`), so they are visible without failing the signal.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A signal in the internal Mathematricks format (`standardized_signals`), as
/// the standardizer publishes it for Cerebro.
///
/// The top-level instrument fields (`instrument` ... `expiry`) describe the
/// first leg, for the seed schema and single-leg consumers; `legs` is the full
/// order list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StandardizedSignal {
    /// Deterministic id: `ids::signal_id(source, sender strategy, sender_signal_id)`.
    pub signal_id: String,
    /// Strategy the signal belongs to (as configured in mtx).
    pub strategy_id: String,
    /// Sender's timestamp when it sent one, else `received_at`.
    pub timestamp: DateTime<Utc>,
    /// First leg's instrument.
    pub instrument: String,
    /// First leg's asset class.
    pub instrument_type: InstrumentType,
    /// First leg's position direction.
    pub direction: Direction,
    /// ENTRY (entries, scale-ins) or EXIT (exits, scale-outs); `None` for a
    /// CANCEL and for an untyped (delta) order, whose effect depends on the
    /// position Cerebro holds.
    pub action: Option<SignalAction>,
    /// First leg's order type.
    pub order_type: OrderType,
    /// First leg's price.
    pub price: Option<Decimal>,
    /// First leg's quantity.
    pub quantity: Decimal,
    /// First leg's stop loss.
    pub stop_loss: Option<Decimal>,
    /// First leg's take profit.
    pub take_profit: Option<Decimal>,
    /// First leg's expiry.
    pub expiry: Option<DateTime<Utc>>,
    /// Strategy metadata and standardizer warnings.
    pub metadata: SignalMetadata,
    /// Every leg, in sender order (never empty).
    pub legs: Vec<SignalLeg>,
    /// Sender's signal type; `None` when the sender gave none (delta orders).
    pub signal_type: Option<SignalType>,
    /// mtx signal id of the entry this signal exits / cancels / scales.
    pub entry_signal_id: Option<String>,
    /// The sender's own id for that entry, as sent.
    pub sender_entry_signal_id: Option<String>,
    /// Environment of the route that received it.
    pub environment: Environment,
    /// Sender / route name.
    pub source: String,
    /// The sender's id for this signal (or the gateway's fallback).
    pub sender_signal_id: String,
    /// Sender's send time (`signal_sent_EPOCH`, TradingView `time`), if given.
    pub signal_sent_at: Option<DateTime<Utc>>,
    /// When the gateway received it.
    pub received_at: DateTime<Utc>,
    /// Sender's account equity, the denominator of SENDER_EQUITY_RATIO sizing.
    pub account_equity: Option<Decimal>,
    /// How Cerebro must read the legs' quantities.
    pub sizing_mode: SizingMode,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn sample() -> StandardizedSignal {
        let t = DateTime::parse_from_rfc3339("2025-11-20T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let leg = SignalLeg {
            instrument: "GC".into(),
            instrument_type: InstrumentType::Future,
            side: Side::Buy,
            direction: Direction::Long,
            quantity: d("5"),
            order_type: OrderType::Market,
            price: Some(d("4029.00")),
            stop_loss: None,
            take_profit: None,
            expiry: Some(
                DateTime::parse_from_rfc3339("2025-12-29T00:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc),
            ),
            exchange: Some("COMEX".into()),
        };
        StandardizedSignal {
            signal_id: crate::ids::signal_id("mathematricks", "SPX_1-D_Opt", "GC_ENTRY_001"),
            strategy_id: "SPX_1-D_Opt".into(),
            timestamp: t,
            instrument: leg.instrument.clone(),
            instrument_type: leg.instrument_type,
            direction: leg.direction,
            action: Some(SignalAction::Entry),
            order_type: leg.order_type,
            price: leg.price,
            quantity: leg.quantity,
            stop_loss: None,
            take_profit: None,
            expiry: leg.expiry,
            metadata: SignalMetadata {
                expected_alpha: Some(d("0.02")),
                warnings: vec![],
            },
            legs: vec![leg],
            signal_type: Some(SignalType::Entry),
            entry_signal_id: None,
            sender_entry_signal_id: None,
            environment: Environment::Staging,
            source: "mathematricks".into(),
            sender_signal_id: "GC_ENTRY_001".into(),
            signal_sent_at: None,
            received_at: t,
            account_equity: Some(d("500000")),
            sizing_mode: SizingMode::SenderEquityRatio,
        }
    }

    #[test]
    fn standardized_round_trips_with_string_decimals_and_seed_enums() {
        let s = sample();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["price"], "4029.00");
        assert_eq!(v["quantity"], "5");
        assert_eq!(v["direction"], "LONG");
        assert_eq!(v["action"], "ENTRY");
        assert_eq!(v["legs"][0]["side"], "BUY");
        assert_eq!(v["legs"][0]["instrument_type"], "FUTURE");
        assert_eq!(v["expiry"], "2025-12-29T00:00:00Z");
        assert_eq!(v["environment"], "staging");
        assert_eq!(v["sizing_mode"], "SENDER_EQUITY_RATIO");
        assert_eq!(v["metadata"]["expected_alpha"], "0.02");
        assert!(v["metadata"].get("warnings").is_none());
        let back: StandardizedSignal = serde_json::from_value(v).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn raw_signal_round_trips_and_omits_absent_hints() {
        let raw = RawSignal {
            source: "tradingview".into(),
            environment: Environment::Production,
            received_at: DateTime::parse_from_rfc3339("2025-11-20T10:00:00.123Z")
                .unwrap()
                .with_timezone(&Utc),
            format: ContentFormat::TradingView,
            strategy_hint: Some("Forex".into()),
            instrument_type_hint: None,
            fallback_signal_id: None,
            futures_front_month: false,
            payload: serde_json::json!({"ticker": "EURUSD", "action": "buy"}),
        };
        let v = serde_json::to_value(&raw).unwrap();
        assert_eq!(v["format"], "TRADINGVIEW");
        assert_eq!(v["strategy_hint"], "Forex");
        assert!(v.get("instrument_type_hint").is_none());
        assert!(v.get("fallback_signal_id").is_none());
        assert!(v.get("futures_front_month").is_none());
        assert_eq!(serde_json::from_value::<RawSignal>(v).unwrap(), raw);
        assert_eq!(ContentFormat::Mathematricks.to_string(), "MATHEMATRICKS");
    }
}
