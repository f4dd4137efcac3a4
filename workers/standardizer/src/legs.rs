//! One leg: instrument normalisation and the direction rule.
//!
//! # Direction rule
//!
//! The sender's `action` (BUY/SELL) is authoritative and becomes the leg's
//! `side`. The standardized `direction` is the direction of the POSITION the leg
//! acts on, derived from the signal type and the side ([`position_direction`]):
//!
//! | signal_type                         | BUY   | SELL  |
//! |-------------------------------------|-------|-------|
//! | ENTRY, SCALE_IN, CANCEL, untyped    | LONG  | SHORT |
//! | EXIT, SCALE_OUT                     | SHORT | LONG  |
//!
//! So an EXIT that SELLs closes a LONG, and an EXIT that BUYs covers a SHORT. A
//! CANCEL repeats the legs of the entry it cancels, so it reads like an entry;
//! an untyped (delta) order reads as the direction it pushes the position.
//!
//! Senders' own `direction` is not trusted: the Mathematricks fixtures give an
//! EXIT the direction of the closing trade (SELL + SHORT to close a LONG), and
//! some send an ENTRY SELL marked LONG. The sender's value is still validated
//! (a bad spelling is `invalid_enum`); when it matches neither the trade's
//! direction nor the position's, the signal carries a warning.

use crate::error::SignalError;
use crate::fields::{shown, Obj};
use crate::parse::ParseContext;
use mtx_schemas::enums::{Direction, InstrumentType, OrderType, Side, SignalType};
use mtx_schemas::limits;
use mtx_schemas::signal::SignalLeg;
use rust_decimal::Decimal;

/// Accepted names of the leg fields whose spelling differs between formats.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LegKeys {
    /// Symbol field names, preferred first.
    pub instrument: &'static [&'static str],
    /// Quantity field names, preferred first.
    pub quantity: &'static [&'static str],
    /// Price field names, preferred first.
    pub price: &'static [&'static str],
}

/// Mathematricks legs (and the legacy `signal` object, which used `ticker`).
pub(crate) const MATHEMATRICKS_KEYS: LegKeys = LegKeys {
    instrument: &["instrument", "ticker", "symbol"],
    quantity: &["quantity"],
    price: &["price"],
};

/// TradingView bodies (`{{ticker}}`, `{{strategy.order.contracts}}`, `{{close}}`).
pub(crate) const TRADINGVIEW_KEYS: LegKeys = LegKeys {
    instrument: &["ticker", "symbol", "instrument"],
    quantity: &["contracts", "quantity"],
    price: &["price", "close"],
};

/// Direction of the position a leg with `side` acts on; see the module docs.
pub fn position_direction(signal_type: Option<SignalType>, side: Side) -> Direction {
    let closing = matches!(signal_type, Some(SignalType::Exit | SignalType::ScaleOut));
    match (closing, side) {
        (false, Side::Buy) | (true, Side::Sell) => Direction::Long,
        (false, Side::Sell) | (true, Side::Buy) => Direction::Short,
    }
}

/// Direction of the trade itself (BUY is LONG), the fixtures' EXIT convention.
fn trade_direction(side: Side) -> Direction {
    match side {
        Side::Buy => Direction::Long,
        Side::Sell => Direction::Short,
    }
}

/// Parse one leg object under `obj`'s path.
pub(crate) fn parse_leg(
    obj: &Obj<'_>,
    keys: &LegKeys,
    signal_type: Option<SignalType>,
    ctx: &ParseContext,
    warnings: &mut Vec<String>,
) -> Result<SignalLeg, SignalError> {
    let (instrument_key, raw_symbol) = obj.required_text(keys.instrument)?;
    // `EXCHANGE:SYMBOL` (TradingView's `{{exchange}}:{{ticker}}`, e.g. BINANCE:BTCUSDT).
    let (prefix_exchange, symbol) = match raw_symbol.split_once(':') {
        Some((exchange, symbol)) if !exchange.trim().is_empty() => {
            (Some(exchange.trim()), symbol.trim())
        }
        _ => (None, raw_symbol),
    };

    let instrument_type = match obj.text(&["instrument_type"])? {
        Some((key, text)) => {
            instrument_type_from(text).ok_or_else(|| SignalError::UnknownInstrumentType {
                field: obj.path(key),
                value: shown(text),
            })?
        }
        None => ctx.default_instrument_type.ok_or_else(|| {
            obj.missing(
                "instrument_type",
                Some("the payload names none and the route sets no default"),
            )
        })?,
    };
    let instrument =
        normalise_symbol(symbol, instrument_type).ok_or_else(|| match instrument_type {
            InstrumentType::Forex => SignalError::InvalidForexSymbol {
                field: obj.path(instrument_key),
                value: shown(raw_symbol),
            },
            _ => obj.missing(instrument_key, None),
        })?;

    if instrument_type == InstrumentType::Option {
        check_option_contract(obj, instrument_key, &instrument)?;
    }

    let side: Side = obj
        .enumeration(&["action"])?
        .map(|(_, s)| s)
        .ok_or_else(|| obj.missing("action", None))?;
    let direction = position_direction(signal_type, side);
    if let Some((key, sent)) = obj.enumeration::<Direction>(&["direction"])? {
        if sent != direction && sent != trade_direction(side) {
            warnings.push(format!(
                "{}: {sent} contradicts action {side} on {}; using {direction} (action wins)",
                obj.path(key),
                signal_type.map_or("an untyped order", |t| t.as_str()),
            ));
        }
    }

    let (quantity_key, quantity) = obj
        .decimal(keys.quantity)?
        .ok_or_else(|| obj.missing(keys.quantity[0], None))?;
    if quantity <= Decimal::ZERO {
        return Err(SignalError::NonPositiveQuantity {
            field: obj.path(quantity_key),
            value: quantity.to_string(),
        });
    }
    if quantity > limits::MAX_UNITS {
        return Err(SignalError::InvalidNumber {
            field: obj.path(quantity_key),
            detail: format!("must be at most {}, got {quantity}", limits::MAX_UNITS),
        });
    }

    let order_type = match obj.text(&["order_type"])? {
        Some((key, text)) => order_type_from(text).ok_or_else(|| SignalError::InvalidEnum {
            field: obj.path(key),
            detail: format!(
                "`{}` is not a valid order_type (expected one of: MARKET, LIMIT, STOP)",
                shown(text)
            ),
        })?,
        None => OrderType::Market,
    };
    let price = price_field(obj, keys.price)?;
    if price.is_none() && order_type != OrderType::Market {
        return Err(obj.missing(
            keys.price[0],
            Some(&format!("a {order_type} order needs a non-zero price")),
        ));
    }

    let expiry = obj.expiry(&["expiry"])?;
    if instrument_type == InstrumentType::Future && expiry.is_none() && ctx.require_future_expiry {
        return Err(SignalError::FutureWithoutExpiry {
            field: obj.path("expiry"),
            instrument,
        });
    }
    let exchange = obj
        .text(&["exchange"])?
        .map(|(_, e)| e)
        .or(prefix_exchange)
        .map(str::to_ascii_uppercase);

    Ok(SignalLeg {
        instrument,
        instrument_type,
        side,
        direction,
        quantity,
        order_type,
        price,
        stop_loss: price_field(obj, &["stop_loss"])?,
        take_profit: price_field(obj, &["take_profit"])?,
        expiry,
        exchange,
    })
}

/// A price-like field: negative is an error, 0 means "none" (senders' sentinel
/// for market orders, e.g. FloridaForex's `price: 0`).
fn price_field(obj: &Obj<'_>, keys: &[&'static str]) -> Result<Option<Decimal>, SignalError> {
    match obj.decimal(keys)? {
        Some((key, p)) if p < Decimal::ZERO => Err(SignalError::InvalidNumber {
            field: obj.path(key),
            detail: format!("must not be negative, got {p}"),
        }),
        Some((_, p)) if p.is_zero() => Ok(None),
        Some((key, p)) if p > limits::MAX_PRICE => Err(SignalError::InvalidNumber {
            field: obj.path(key),
            detail: format!("must be at most {}, got {p}", limits::MAX_PRICE),
        }),
        Some((_, p)) => Ok(Some(p)),
        None => Ok(None),
    }
}

/// Instrument type, accepting the seed spellings plus common broker synonyms.
fn instrument_type_from(text: &str) -> Option<InstrumentType> {
    match text.trim().to_ascii_uppercase().as_str() {
        "STK" | "STOCKS" | "EQUITY" => Some(InstrumentType::Stock),
        "FUT" | "FUTURES" => Some(InstrumentType::Future),
        "FX" | "CASH" => Some(InstrumentType::Forex),
        "OPT" | "OPTIONS" => Some(InstrumentType::Option),
        other => other.parse().ok(),
    }
}

/// Order type, accepting the seed spellings plus IBKR's MKT/LMT/STP.
fn order_type_from(text: &str) -> Option<OrderType> {
    match text.trim().to_ascii_uppercase().as_str() {
        "MKT" => Some(OrderType::Market),
        "LMT" => Some(OrderType::Limit),
        "STP" => Some(OrderType::Stop),
        other => other.parse().ok(),
    }
}

/// Uppercase symbol; FOREX becomes six letters (`EUR/USD`, `EUR.USD`, `eur_usd`
/// and `EUR-USD` → `EURUSD`). `None` when the result is not a valid symbol.
/// Contract fields a standardized leg cannot carry: an OPTION names its
/// contract in its symbol instead.
const OPTION_CONTRACT_FIELDS: [&str; 6] = [
    "strike",
    "right",
    "put_call",
    "call_put",
    "option_type",
    "option_right",
];

/// An OPTION leg names one contract by its OCC symbol: root (1–6 letters,
/// digits or `.`), optionally space-padded, expiry `YYMMDD`, `C` or `P`,
/// strike × 1000 in 8 digits (`SPXW  251219C05000000`; spaces are dropped
/// from the standardized symbol). Separate strike / right fields would be
/// lost, turning a call and a put into the same order: they are refused.
fn check_option_contract(
    obj: &Obj<'_>,
    instrument_key: &'static str,
    instrument: &str,
) -> Result<(), SignalError> {
    if let Some(f) = obj.find(&OPTION_CONTRACT_FIELDS) {
        return Err(SignalError::OptionWithoutContract {
            field: obj.path(f.key),
            instrument: shown(instrument),
            detail: format!(
                "`{}` is not carried by a standardized leg; name the contract by its OCC symbol (e.g. SPXW251219C05000000)",
                f.key
            ),
        });
    }
    if !is_occ_symbol(instrument) {
        return Err(SignalError::OptionWithoutContract {
            field: obj.path(instrument_key),
            instrument: shown(instrument),
            detail: "not an OCC option symbol (root, YYMMDD, C or P, strike × 1000 in 8 digits, e.g. SPXW251219C05000000)".into(),
        });
    }
    Ok(())
}

/// `ROOT YYMMDD [CP] 99999999` with the root's padding spaces removed.
fn is_occ_symbol(symbol: &str) -> bool {
    let b = symbol.as_bytes();
    if b.len() < 16 || b.len() > 21 {
        return false;
    }
    let (root, tail) = b.split_at(b.len() - 15);
    let (date, rest) = tail.split_at(6);
    let (right, strike) = rest.split_at(1);
    !root.is_empty()
        && root
            .iter()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == b'.')
        && date.iter().all(u8::is_ascii_digit)
        && chrono::NaiveDate::parse_from_str(
            std::str::from_utf8(date).unwrap_or_default(),
            "%y%m%d",
        )
        .is_ok()
        && matches!(right, [b'C'] | [b'P'])
        && strike.iter().all(u8::is_ascii_digit)
}

fn normalise_symbol(symbol: &str, instrument_type: InstrumentType) -> Option<String> {
    let upper = symbol.trim().to_ascii_uppercase();
    if instrument_type == InstrumentType::Option {
        // OCC pads the root with spaces to six characters.
        let occ: String = upper.chars().filter(|c| *c != ' ').collect();
        return (!occ.is_empty()).then_some(occ);
    }
    if instrument_type == InstrumentType::Future {
        // TradingView's continuous front-month ticker (`GC1!`, with its
        // exchange prefix already split off) is the root: futures are
        // standardized by root with the contract in `expiry`.
        if let Some(root) = upper.strip_suffix("1!") {
            if !root.is_empty() && root.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Some(root.to_string());
            }
        }
    }
    if instrument_type != InstrumentType::Forex {
        return (!upper.is_empty()).then_some(upper);
    }
    let pair = match upper.split_once(['/', '.', '_', '-']) {
        Some((base, quote)) if base.len() == 3 && quote.len() == 3 => format!("{base}{quote}"),
        Some(_) => return None,
        None => upper,
    };
    (pair.len() == 6 && pair.chars().all(|c| c.is_ascii_uppercase())).then_some(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tradingview_front_month_futures_are_their_root() {
        let f = |s: &str| normalise_symbol(s, InstrumentType::Future);
        assert_eq!(f("GC1!").as_deref(), Some("GC"));
        assert_eq!(f("mes1!").as_deref(), Some("MES"));
        assert_eq!(f("GC").as_deref(), Some("GC"));
        // Not the front month: left as sent (no spec matches it).
        assert_eq!(f("GC2!").as_deref(), Some("GC2!"));
        assert_eq!(f("1!").as_deref(), Some("1!"));
        // Only futures.
        assert_eq!(
            normalise_symbol("AB1!", InstrumentType::Stock).as_deref(),
            Some("AB1!")
        );
    }

    #[test]
    fn occ_option_symbols() {
        for ok in [
            "SPXW251219C05000000",
            "SPY251219P00600000",
            "BRK.B260116C00500000",
        ] {
            assert!(is_occ_symbol(ok), "{ok}");
        }
        for bad in [
            "SPX",
            "SPY251219X00600000",
            "SPY251319C00600000",
            "SPY251219C0060000",
            "TOOLONGROOT251219C00600000",
            "251219C00600000",
        ] {
            assert!(!is_occ_symbol(bad), "{bad}");
        }
        assert_eq!(
            normalise_symbol("spxw  251219c05000000", InstrumentType::Option).as_deref(),
            Some("SPXW251219C05000000")
        );
    }

    #[test]
    fn direction_rule_table() {
        use Direction::*;
        use Side::*;
        use SignalType::*;
        for (t, side, want) in [
            (Some(Entry), Buy, Long),
            (Some(Entry), Sell, Short),
            (Some(ScaleIn), Buy, Long),
            (Some(Cancel), Buy, Long),
            (Some(Cancel), Sell, Short),
            (Some(Exit), Sell, Long),
            (Some(Exit), Buy, Short),
            (Some(ScaleOut), Sell, Long),
            (Some(ScaleOut), Buy, Short),
            (None, Buy, Long),
            (None, Sell, Short),
        ] {
            assert_eq!(position_direction(t, side), want, "{t:?} {side}");
        }
    }

    #[test]
    fn forex_symbols_normalise() {
        for s in [
            "EURUSD", "eurusd", "EUR/USD", "EUR.USD", "eur_usd", "EUR-USD", " EURUSD ",
        ] {
            assert_eq!(
                normalise_symbol(s, InstrumentType::Forex).as_deref(),
                Some("EURUSD"),
                "{s}"
            );
        }
        for s in [
            "EURUS", "EURUSDX", "EUR/USDT", "EU/RUSD", "EUR1SD", "ÉURUSD", "EUR//USD", "",
        ] {
            assert_eq!(normalise_symbol(s, InstrumentType::Forex), None, "{s}");
        }
        assert_eq!(
            normalise_symbol("brk.b", InstrumentType::Stock).as_deref(),
            Some("BRK.B")
        );
    }

    #[test]
    fn synonyms() {
        assert_eq!(instrument_type_from("fut"), Some(InstrumentType::Future));
        assert_eq!(instrument_type_from("Stock"), Some(InstrumentType::Stock));
        assert_eq!(instrument_type_from("BOND"), None);
        assert_eq!(order_type_from("lmt"), Some(OrderType::Limit));
        assert_eq!(order_type_from("limit"), Some(OrderType::Limit));
        assert_eq!(order_type_from("TRAIL"), None);
    }
}
