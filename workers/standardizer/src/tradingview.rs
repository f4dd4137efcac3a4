//! TradingView alert bodies.
//!
//! TradingView posts whatever text the alert's message holds, with `{{...}}`
//! placeholders substituted (always as text, so every number may arrive as a
//! string). mtx documents this JSON message for TradingView routes:
//!
//! ```json
//! {
//!   "ticker": "{{ticker}}",                        // required; "EXCHANGE:SYMBOL" also accepted
//!   "action": "{{strategy.order.action}}",         // required: buy / sell
//!   "contracts": "{{strategy.order.contracts}}",   // required (or "quantity"), > 0
//!   "price": "{{close}}",                          // optional (or "close"); 0 = none
//!   "market_position": "{{strategy.market_position}}",           // optional: long / short / flat
//!   "prev_market_position": "{{strategy.prev_market_position}}", // optional
//!   "alert_id": "...",                             // optional unique id (or "signalID" / "id")
//!   "order_id": "{{strategy.order.id}}",           // optional, qualified by "time"
//!   "time": "{{timenow}}",                         // optional send time (or "timenow")
//!   "instrument_type": "FOREX",                    // optional; else the route's default
//!   "secret": "..."                                // removed by the gateway
//! }
//! ```
//!
//! Optional like the Mathematricks legs: `order_type`, `stop_loss`,
//! `take_profit`, `expiry`, `exchange`, `account_equity`, `signal_type`,
//! `entry_signal_id`, `strategy` (the route's strategy wins over it).
//!
//! # Signal type inference
//!
//! An explicit `signal_type` wins. Otherwise, with `dir` the non-flat position
//! involved and "adding" meaning BUY on a long / SELL on a short:
//!
//! | prev → market_position | adding     | reducing   |
//! |------------------------|------------|------------|
//! | flat → long/short      | ENTRY      | error      |
//! | (absent) → long/short  | ENTRY      | SCALE_OUT  |
//! | long → long, short → short | SCALE_IN | SCALE_OUT |
//! | long/short/absent → flat | error    | EXIT       |
//! | long ↔ short (reversal), flat → flat | error | error |
//!
//! Without any position field the alert is an untyped delta order ("buy 2").
//! A reversal in one alert is rejected (`invalid_enum` on `market_position`):
//! its contracts mix the close and the new entry, so send two alerts.
//!
//! # Sender id
//!
//! `alert_id` / `signalID` / `id` if present; else `order_id@time@instrument`,
//! because `{{strategy.order.id}}` names the order ("Long") and repeats
//! across trades, and one strategy's alerts on several charts fire the same
//! order id in the same second; else the context's fallback id; else
//! `missing_field`.
//!
//! An explicit `signal_type` that contradicts the alert's positions (ENTRY
//! where `prev_market_position` long → `market_position` flat closes) is
//! refused (`invalid_enum` on `signal_type`).

use crate::error::SignalError;
use crate::fields::{shown, Obj};
use crate::legs::{parse_leg, TRADINGVIEW_KEYS};
use crate::parse::{account_equity, Draft, ParseContext};
use chrono::{DateTime, SecondsFormat, Utc};
use mtx_schemas::enums::{Direction, Side, SignalType};
use serde_json::Value;

/// `{{strategy.market_position}}` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarketPosition {
    Long,
    Short,
    Flat,
}

impl MarketPosition {
    fn as_str(self) -> &'static str {
        match self {
            MarketPosition::Long => "long",
            MarketPosition::Short => "short",
            MarketPosition::Flat => "flat",
        }
    }

    fn direction(self) -> Option<Direction> {
        match self {
            MarketPosition::Long => Some(Direction::Long),
            MarketPosition::Short => Some(Direction::Short),
            MarketPosition::Flat => None,
        }
    }
}

/// Read a TradingView body.
pub(crate) fn parse(payload: &Value, ctx: &ParseContext) -> Result<Draft, SignalError> {
    let root = Obj::new(payload, "")?;
    let mut warnings = Vec::new();

    let payload_strategy = root.text(&["strategy", "strategy_name"])?;
    let strategy = match (&ctx.strategy_hint, payload_strategy) {
        (Some(route), Some((key, named))) if named != route => {
            warnings.push(format!(
                "{key}: `{named}` differs from the route's `{route}`; using the route's"
            ));
            route.clone()
        }
        (Some(route), _) => route.clone(),
        (None, Some((_, named))) => named.to_string(),
        (None, None) => {
            return Err(SignalError::MissingStrategy {
                field: "strategy".into(),
            })
        }
    };

    let side: Side = root
        .enumeration(&["action"])?
        .map(|(_, s)| s)
        .ok_or_else(|| root.missing("action", None))?;
    let inferred = infer_signal_type(&root, side)?;
    let signal_type = match root.enumeration::<SignalType>(&["signal_type"])? {
        Some((key, explicit)) => {
            check_explicit_type(&root, key, explicit, inferred)?;
            Some(explicit)
        }
        None => inferred,
    };
    let leg = parse_leg(&root, &TRADINGVIEW_KEYS, signal_type, ctx, &mut warnings)?;
    let signal_sent_at = root.timestamp(&["time", "timenow"])?;

    let sender_signal_id = match root.id(&["alert_id", "signalID", "signal_id", "id"])? {
        Some(id) => id,
        None => sender_id_fallback(&root, &leg.instrument, signal_sent_at, ctx)?,
    };

    Ok(Draft {
        strategy,
        sender_signal_id,
        signal_sent_at,
        signal_type,
        sender_entry_signal_id: root.id(&["entry_signal_id"])?,
        account_equity: account_equity(&root)?,
        legs: vec![leg],
        warnings,
    })
}

/// An explicit `signal_type` must agree with the positions the alert also
/// sends: one that opens (ENTRY, SCALE_IN) where they say the order closes,
/// or the reverse, is refused rather than trusted either way (a close-long
/// read as an entry would open a short).
fn check_explicit_type(
    root: &Obj<'_>,
    key: &'static str,
    explicit: SignalType,
    inferred: Option<SignalType>,
) -> Result<(), SignalError> {
    let opens = |t: SignalType| matches!(t, SignalType::Entry | SignalType::ScaleIn);
    let closes = |t: SignalType| matches!(t, SignalType::Exit | SignalType::ScaleOut);
    match inferred {
        Some(i) if (opens(explicit) && closes(i)) || (closes(explicit) && opens(i)) => {
            Err(SignalError::InvalidEnum {
                field: root.path(key),
                detail: format!(
                    "signal_type {explicit} contradicts the alert's market positions, which make it {i}"
                ),
            })
        }
        _ => Ok(()),
    }
}

/// Sender id for an alert without `alert_id`: `order_id@time@instrument`,
/// else the context's fallback (see the module docs).
fn sender_id_fallback(
    root: &Obj<'_>,
    instrument: &str,
    sent_at: Option<DateTime<Utc>>,
    ctx: &ParseContext,
) -> Result<String, SignalError> {
    const NEEDS_TIME: &str = "order_id ({{strategy.order.id}}) repeats across trades; \
                              add \"time\": \"{{timenow}}\" or an alert_id";
    const NEEDS_ID: &str =
        "send alert_id, or order_id with time, or have the gateway assign a fallback id";
    match (root.id(&["order_id"])?, sent_at, &ctx.fallback_signal_id) {
        (Some(order), Some(at), _) => Ok(format!(
            "{order}@{}@{instrument}",
            at.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        )),
        (_, _, Some(fallback)) => Ok(fallback.clone()),
        (Some(_), None, None) => Err(root.missing("time", Some(NEEDS_TIME))),
        (None, _, None) => Err(root.missing("alert_id", Some(NEEDS_ID))),
    }
}

fn market_position(
    root: &Obj<'_>,
    key: &'static str,
) -> Result<Option<MarketPosition>, SignalError> {
    let Some((key, text)) = root.text(&[key])? else {
        return Ok(None);
    };
    match text.to_ascii_lowercase().as_str() {
        "long" => Ok(Some(MarketPosition::Long)),
        "short" => Ok(Some(MarketPosition::Short)),
        "flat" => Ok(Some(MarketPosition::Flat)),
        _ => Err(SignalError::InvalidEnum {
            field: root.path(key),
            detail: format!(
                "`{}` is not a valid market position (expected long, short or flat)",
                shown(text)
            ),
        }),
    }
}

/// See the module docs' table.
fn infer_signal_type(root: &Obj<'_>, side: Side) -> Result<Option<SignalType>, SignalError> {
    let now = market_position(root, "market_position")?;
    let prev = market_position(root, "prev_market_position")?;
    let Some(now) = now else {
        return match prev {
            None => Ok(None),
            Some(_) => Err(root.missing(
                "market_position",
                Some("prev_market_position needs market_position"),
            )),
        };
    };
    let contradiction = |detail: String| SignalError::InvalidEnum {
        field: root.path("market_position"),
        detail,
    };
    let prev_dir = prev.and_then(MarketPosition::direction);
    // The position this order acts on.
    let dir = match (now.direction(), prev_dir) {
        (Some(n), Some(p)) if n != p => {
            return Err(contradiction(format!(
                "a reversal ({p} → {n}) in one alert is not supported; send an exit alert and an entry alert"
            )))
        }
        (Some(d), _) | (None, Some(d)) => d,
        (None, None) if prev == Some(MarketPosition::Flat) => {
            return Err(contradiction("flat → flat is not an order".into()))
        }
        // → flat with no previous position given: a SELL closes a long.
        (None, None) => match side {
            Side::Sell => Direction::Long,
            Side::Buy => Direction::Short,
        },
    };
    let adding = matches!(
        (dir, side),
        (Direction::Long, Side::Buy) | (Direction::Short, Side::Sell)
    );
    use MarketPosition::{Flat, Long, Short};
    let signal_type = match (now, prev, adding) {
        (Flat, _, false) => Some(SignalType::Exit),
        (Flat, _, true) | (Long | Short, Some(Flat), false) => None,
        (Long | Short, Some(Flat) | None, true) => Some(SignalType::Entry),
        (Long | Short, None, false) => Some(SignalType::ScaleOut),
        // prev is the same direction here: reversals were rejected above.
        (Long | Short, Some(Long | Short), true) => Some(SignalType::ScaleIn),
        (Long | Short, Some(Long | Short), false) => Some(SignalType::ScaleOut),
    };
    let Some(signal_type) = signal_type else {
        let prev = prev.map_or("(absent)", MarketPosition::as_str);
        return Err(contradiction(format!(
            "action {side} cannot move a {dir} position from {prev} to {}",
            now.as_str()
        )));
    };
    Ok(Some(signal_type))
}
