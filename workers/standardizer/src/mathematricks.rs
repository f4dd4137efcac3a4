//! The Mathematricks sender format.
//!
//! ```json
//! {
//!   "strategy_name": "SPX_1-D_Opt",        // or "strategy"; else the route's strategy
//!   "signalID": "GC_ENTRY_001",            // or "signal_id"; else the context's fallback id
//!   "signal_sent_EPOCH": 1763632800,       // optional: epoch s / ms / µs / ns or ISO-8601
//!   "account_equity": 500000,              // optional, > 0
//!   "signal_type": "ENTRY",                // optional: ENTRY EXIT CANCEL SCALE_IN SCALE_OUT
//!   "entry_signal_id": "GC_ENTRY_000",     // the sender id of the linked entry (CANCEL: required)
//!   "signal_legs": [{
//!     "instrument": "GC",                  // or "ticker" / "symbol"
//!     "instrument_type": "FUTURE",         // STOCK ETF FOREX FUTURE CRYPTO OPTION (+ STK FUT FX OPT ...)
//!     "action": "BUY",                     // authoritative side
//!     "direction": "LONG",                 // checked, not trusted (see crate::legs)
//!     "quantity": 5,                       // > 0
//!     "order_type": "MARKET",              // default MARKET; LIMIT / STOP need a price
//!     "price": 4029.00,                    // 0 = no price
//!     "stop_loss": 3900, "take_profit": 4200,
//!     "expiry": "20251229", "exchange": "COMEX"
//!   }]
//! }
//! ```
//!
//! The legacy shape replaces `signal_legs` with one `signal` object holding the
//! leg (usually with `ticker`); header fields are then also looked up inside
//! `signal`. Any number may be a JSON number or a numeric string. `passphrase`,
//! per-leg `environment`, `entry_name`, `wait` and other unknown fields are
//! ignored.

use crate::error::SignalError;
use crate::fields::Obj;
use crate::legs::{parse_leg, MATHEMATRICKS_KEYS};
use crate::parse::{account_equity, Draft, ParseContext};
use mtx_schemas::enums::SignalType;
use serde_json::Value;

/// Read a Mathematricks body.
pub(crate) fn parse(payload: &Value, ctx: &ParseContext) -> Result<Draft, SignalError> {
    let root = Obj::new(payload, "")?;
    let legacy = root
        .find(&["signal"])
        .map(|f| Obj::new(f.value, "signal"))
        .transpose()?;
    let legs_value = root.find(&["signal_legs"]);
    if legacy.is_some() && legs_value.is_some() {
        return Err(SignalError::UnknownShape {
            field: "payload".into(),
            detail: "both `signal_legs` and legacy `signal` are present".into(),
        });
    }
    // Header fields sit at the top; legacy bodies sometimes put them in `signal`.
    let scopes: Vec<Obj<'_>> = std::iter::once(root).chain(legacy).collect();
    let mut warnings = Vec::new();

    let payload_strategy = first(&scopes, |o| o.text(&["strategy_name", "strategy"]))?;
    let strategy = match (payload_strategy, &ctx.strategy_hint) {
        (Some((_, named)), Some(route)) if named != route => {
            warnings.push(format!(
                "strategy_name: `{named}` differs from the route's `{route}`; using the payload's"
            ));
            named.to_string()
        }
        (Some((_, named)), _) => named.to_string(),
        (None, Some(route)) => route.clone(),
        (None, None) => {
            return Err(SignalError::MissingStrategy {
                field: "strategy_name".into(),
            })
        }
    };
    let sender_signal_id = match first(&scopes, |o| o.id(&["signalID", "signal_id", "signalId"]))? {
        Some(id) => id,
        None => ctx.fallback_signal_id.clone().ok_or_else(|| {
            root.missing(
                "signalID",
                Some("the sender must assign one, or the gateway a fallback id"),
            )
        })?,
    };
    let signal_sent_at = first(&scopes, |o| {
        o.timestamp(&["signal_sent_EPOCH", "signal_sent_epoch"])
    })?;
    // The envelope and the legacy `signal` object may both say it; if they
    // disagree, neither is trusted (EXIT read as ENTRY opens a short).
    let mut signal_type: Option<SignalType> = None;
    for scope in &scopes {
        if let Some((key, t)) = scope.enumeration::<SignalType>(&["signal_type"])? {
            match signal_type {
                Some(seen) if seen != t => {
                    return Err(SignalError::InvalidEnum {
                        field: scope.path(key),
                        detail: format!("signal_type {t} contradicts the envelope's {seen}"),
                    })
                }
                _ => signal_type = Some(t),
            }
        }
    }
    let sender_entry_signal_id = first(&scopes, |o| o.id(&["entry_signal_id"]))?;
    let account_equity = first(&scopes, account_equity)?;

    let legs = match (legs_value, legacy) {
        (Some(found), _) => {
            let Value::Array(items) = found.value else {
                return Err(SignalError::UnknownShape {
                    field: "signal_legs".into(),
                    detail: format!(
                        "expected an array, got {}",
                        crate::fields::json_type(found.value)
                    ),
                });
            };
            let mut legs = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let prefix = format!("signal_legs[{i}]");
                let leg = Obj::new(item, &prefix)?;
                legs.push(parse_leg(
                    &leg,
                    &MATHEMATRICKS_KEYS,
                    signal_type,
                    ctx,
                    &mut warnings,
                )?);
            }
            legs
        }
        (None, Some(signal)) => vec![parse_leg(
            &signal,
            &MATHEMATRICKS_KEYS,
            signal_type,
            ctx,
            &mut warnings,
        )?],
        (None, None) => {
            return Err(SignalError::UnknownShape {
                field: "payload".into(),
                detail: "expected `signal_legs` (array) or legacy `signal` (object)".into(),
            })
        }
    };

    Ok(Draft {
        strategy,
        sender_signal_id,
        signal_sent_at,
        signal_type,
        sender_entry_signal_id,
        account_equity,
        legs,
        warnings,
    })
}

/// The first scope where `read` finds a value.
fn first<'a, T>(
    scopes: &[Obj<'a>],
    read: impl Fn(&Obj<'a>) -> Result<Option<T>, SignalError>,
) -> Result<Option<T>, SignalError> {
    for scope in scopes {
        if let Some(v) = read(scope)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}
