//! Typed, path-aware reads of JSON fields.
//!
//! Both formats share these readers so every sender gets the same leniency
//! (numbers as strings, `null` = absent, aliases) and the same strictness (a
//! known field with the wrong type is an error naming its path).

use crate::error::SignalError;
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};
use mtx_schemas::enums::ParseEnumError;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use std::str::FromStr;

/// Earliest date accepted anywhere (catches epochs sent in the wrong unit).
const MIN_YEAR: i32 = 2000;
/// First year no longer accepted.
const MAX_YEAR: i32 = 2100;

/// A JSON object plus the path it sits at, so errors can name `signal_legs[1].quantity`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    prefix: &'a str,
}

/// A field found under one of its accepted names.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Found<'a> {
    /// The name it was found under (for the error path).
    pub key: &'static str,
    /// Its value (never `null`).
    pub value: &'a Value,
}

impl<'a> Obj<'a> {
    /// View `value` as an object at `prefix` (`""` for the payload root).
    pub fn new(value: &'a Value, prefix: &'a str) -> Result<Self, SignalError> {
        match value {
            Value::Object(map) => Ok(Obj { map, prefix }),
            other => Err(SignalError::UnknownShape {
                field: if prefix.is_empty() {
                    "payload".into()
                } else {
                    prefix.into()
                },
                detail: format!("expected a JSON object, got {}", json_type(other)),
            }),
        }
    }

    /// Path of `key` under this object.
    pub fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    /// The first of `keys` present with a non-null value; `null` counts as
    /// absent because many senders serialise unset optionals as `null`.
    pub fn find(&self, keys: &[&'static str]) -> Option<Found<'a>> {
        keys.iter().find_map(|&key| match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(value) => Some(Found { key, value }),
        })
    }

    /// Like [`Obj::find`], also passing over blank strings: for free text and
    /// ids, where blank means absent, a blank first alias must not hide the
    /// value a later one carries (`"alert_id": "", "id": "ABC-1"` is
    /// `ABC-1`). Typed fields keep [`Obj::find`]: a blank `signal_type` or
    /// quantity is an error, not an absence.
    fn find_nonblank(&self, keys: &[&'static str]) -> Option<Found<'a>> {
        keys.iter().find_map(|&key| match self.map.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => None,
            Some(value) => Some(Found { key, value }),
        })
    }

    /// A free-text field, trimmed; blank counts as absent.
    pub fn text(
        &self,
        keys: &[&'static str],
    ) -> Result<Option<(&'static str, &'a str)>, SignalError> {
        let Some(f) = self.find_nonblank(keys) else {
            return Ok(None);
        };
        match f.value {
            Value::String(s) => Ok(Some((f.key, s.trim()))),
            other => Err(self.wrong_type(f.key, "a string", other)),
        }
    }

    /// A required free-text field.
    pub fn required_text(
        &self,
        keys: &[&'static str],
    ) -> Result<(&'static str, &'a str), SignalError> {
        self.text(keys)?.ok_or_else(|| self.missing(keys[0], None))
    }

    /// An identifier: a string, or an integer some senders send instead.
    pub fn id(&self, keys: &[&'static str]) -> Result<Option<String>, SignalError> {
        let Some(f) = self.find_nonblank(keys) else {
            return Ok(None);
        };
        match f.value {
            Value::String(s) => Ok(Some(s.trim().to_string())),
            Value::Number(n) if n.is_u64() || n.is_i64() => Ok(Some(n.to_string())),
            other => Err(self.wrong_type(f.key, "a string id", other)),
        }
    }

    /// A decimal number (JSON number or numeric string).
    pub fn decimal(
        &self,
        keys: &[&'static str],
    ) -> Result<Option<(&'static str, Decimal)>, SignalError> {
        let Some(f) = self.find(keys) else {
            return Ok(None);
        };
        decimal_from(f.value)
            .map(|d| Some((f.key, d)))
            .map_err(|detail| SignalError::InvalidNumber {
                field: self.path(f.key),
                detail,
            })
    }

    /// One of a seed enum's values, case-insensitive.
    pub fn enumeration<T>(
        &self,
        keys: &[&'static str],
    ) -> Result<Option<(&'static str, T)>, SignalError>
    where
        T: FromStr<Err = ParseEnumError>,
    {
        let Some(f) = self.find(keys) else {
            return Ok(None);
        };
        let parsed = match f.value {
            Value::String(s) => s.parse::<T>().map_err(|e| e.to_string()),
            other => Err(format!("expected a string, got {}", json_type(other))),
        };
        parsed
            .map(|v| Some((f.key, v)))
            .map_err(|detail| SignalError::InvalidEnum {
                field: self.path(f.key),
                detail,
            })
    }

    /// A send time: epoch (s / ms / µs / ns, number or string) or ISO-8601.
    pub fn timestamp(&self, keys: &[&'static str]) -> Result<Option<DateTime<Utc>>, SignalError> {
        let Some(f) = self.find(keys) else {
            return Ok(None);
        };
        timestamp_from(f.value)
            .map(Some)
            .map_err(|detail| SignalError::InvalidDate {
                field: self.path(f.key),
                detail,
            })
    }

    /// A contract expiry date (`YYYYMMDD`, `YYYY-MM-DD` or RFC 3339).
    pub fn expiry(&self, keys: &[&'static str]) -> Result<Option<DateTime<Utc>>, SignalError> {
        let Some(f) = self.find(keys) else {
            return Ok(None);
        };
        expiry_from(f.value)
            .map(Some)
            .map_err(|detail| SignalError::InvalidDate {
                field: self.path(f.key),
                detail,
            })
    }

    /// A `missing_field` error for `key` under this object.
    pub fn missing(&self, key: &str, hint: Option<&str>) -> SignalError {
        SignalError::MissingField {
            field: self.path(key),
            hint: hint.map(str::to_string),
        }
    }

    fn wrong_type(&self, key: &str, expected: &'static str, got: &Value) -> SignalError {
        SignalError::InvalidType {
            field: self.path(key),
            expected,
            got: json_type(got),
        }
    }
}

/// JSON type name for messages.
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A sender value shortened for an error message (payloads can be large).
pub(crate) fn shown(s: &str) -> String {
    const MAX: usize = 48;
    match s.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &s[..cut]),
        None => s.to_string(),
    }
}

/// Read a decimal exactly from a JSON number's textual form or a string.
///
/// serde_json prints a float as the shortest text that reads back to the same
/// f64, which is the sender's text for any price or quantity with up to 15
/// significant digits, so no binary rounding leaks in. Result is normalised
/// (`150.00` → `150`) so equal values serialise identically.
pub(crate) fn decimal_from(v: &Value) -> Result<Decimal, String> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.trim().to_string(),
        other => return Err(format!("expected a number, got {}", json_type(other))),
    };
    parse_decimal_text(&text).map(|d| d.normalize())
}

fn parse_decimal_text(text: &str) -> Result<Decimal, String> {
    if text.is_empty() {
        return Err("empty string".into());
    }
    if text.contains("{{") {
        return Err(format!("unreplaced placeholder `{}`", shown(text)));
    }
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], Some(&text[i + 1..])),
        None => (text, None),
    };
    let unsigned = mantissa.strip_prefix(['+', '-']).unwrap_or(mantissa);
    let digits = unsigned.chars().filter(char::is_ascii_digit).count();
    let dots = unsigned.chars().filter(|&c| c == '.').count();
    let mantissa_ok = digits > 0 && dots <= 1 && digits + dots == unsigned.len();
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['+', '-']).unwrap_or(e);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    if !mantissa_ok || !exponent_ok {
        return Err(format!("`{}` is not a finite decimal", shown(text)));
    }
    let parsed = if exponent.is_some() {
        Decimal::from_scientific(text)
    } else {
        Decimal::from_str(text)
    };
    parsed.map_err(|e| format!("`{}` is out of range ({e})", shown(text)))
}

fn in_range(t: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    if (MIN_YEAR..MAX_YEAR).contains(&t.year()) {
        Ok(t)
    } else {
        Err(format!(
            "{} is outside {MIN_YEAR}..{MAX_YEAR} (wrong epoch unit?)",
            t.to_rfc3339()
        ))
    }
}

/// Epoch unit by magnitude: below 1e11 seconds (1e11 s is year 5138), below
/// 1e14 milliseconds, below 1e17 microseconds, else nanoseconds. Fractions are
/// kept down to the nanosecond.
pub(crate) fn epoch_to_datetime(epoch: Decimal) -> Result<DateTime<Utc>, String> {
    if epoch <= Decimal::ZERO {
        return Err(format!("epoch must be positive, got {epoch}"));
    }
    let nanos_per_unit: i64 = if epoch < Decimal::from(100_000_000_000_i64) {
        1_000_000_000
    } else if epoch < Decimal::from(100_000_000_000_000_i64) {
        1_000_000
    } else if epoch < Decimal::from(100_000_000_000_000_000_i64) {
        1_000
    } else {
        1
    };
    let nanos = epoch
        .checked_mul(Decimal::from(nanos_per_unit))
        .and_then(|n| n.trunc().to_i64())
        .ok_or_else(|| format!("epoch {epoch} is out of range"))?;
    in_range(DateTime::from_timestamp_nanos(nanos))
}

/// Send time from an epoch (number or numeric string) or an ISO-8601 string
/// (RFC 3339 with offset; without an offset it is taken as UTC).
pub(crate) fn timestamp_from(v: &Value) -> Result<DateTime<Utc>, String> {
    match v {
        Value::Number(_) => epoch_to_datetime(decimal_from(v)?),
        Value::String(s) => {
            let s = s.trim();
            if s.is_empty() {
                return Err("empty string".into());
            }
            if s.starts_with(|c: char| c.is_ascii_digit()) && parse_decimal_text(s).is_ok() {
                return epoch_to_datetime(decimal_from(v)?);
            }
            if let Ok(t) = DateTime::parse_from_rfc3339(s) {
                return in_range(t.with_timezone(&Utc));
            }
            for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
                if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
                    return in_range(Utc.from_utc_datetime(&t));
                }
            }
            Err(format!(
                "`{}` is neither an epoch nor an ISO-8601 date-time",
                shown(s)
            ))
        }
        other => Err(format!(
            "expected an epoch or ISO-8601 string, got {}",
            json_type(other)
        )),
    }
}

/// Contract expiry: `YYYYMMDD` (string or number, the IBKR spelling),
/// `YYYY-MM-DD`, or an RFC 3339 instant, whose date in its own offset
/// counts; always midnight UTC of that date. A bare contract month
/// (`YYYYMM`) is rejected: the executor needs the day.
pub(crate) fn expiry_from(v: &Value) -> Result<DateTime<Utc>, String> {
    let text = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        other => return Err(format!("expected YYYYMMDD, got {}", json_type(other))),
    };
    let date = if text.len() == 8 && text.chars().all(|c| c.is_ascii_digit()) {
        NaiveDate::parse_from_str(&text, "%Y%m%d").ok()
    } else {
        NaiveDate::parse_from_str(&text, "%Y-%m-%d").ok()
    };
    if let Some(midnight) = date.and_then(|d| d.and_hms_opt(0, 0, 0)) {
        return in_range(Utc.from_utc_datetime(&midnight));
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(&text) {
        // The sender's date, wherever its clock is: 2025-12-29T00:00+09:00
        // expires on the 29th, not at 15:00 UTC on the 28th.
        if let Some(midnight) = t.date_naive().and_hms_opt(0, 0, 0) {
            return in_range(Utc.from_utc_datetime(&midnight));
        }
    }
    if text.len() == 6 && text.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "`{text}` is a contract month; send the expiry date YYYYMMDD"
        ));
    }
    Err(format!(
        "`{}` is not a date (expected YYYYMMDD)",
        shown(&text)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn decimals_are_exact_from_numbers_and_strings() {
        assert_eq!(decimal_from(&json!(1.0850)).unwrap().to_string(), "1.085");
        assert_eq!(decimal_from(&json!(0.1)).unwrap().to_string(), "0.1");
        assert_eq!(decimal_from(&json!(4029.00)).unwrap().to_string(), "4029");
        assert_eq!(decimal_from(&json!("0.35")).unwrap().to_string(), "0.35");
        assert_eq!(decimal_from(&json!(" 100000 ")).unwrap(), d("100000"));
        assert_eq!(decimal_from(&json!("1e3")).unwrap(), d("1000"));
        assert_eq!(decimal_from(&json!(1e-7)).unwrap(), d("0.0000001"));
        assert_eq!(
            decimal_from(&json!(u64::MAX)).unwrap(),
            d("18446744073709551615")
        );
        assert_eq!(decimal_from(&json!("-2.5")).unwrap(), d("-2.5"));
    }

    #[test]
    fn non_finite_and_junk_numbers_are_rejected() {
        for bad in [
            "",
            "NaN",
            "nan",
            "inf",
            "-Infinity",
            "1,000",
            "1_000",
            "0x10",
            "1.2.3",
            "e5",
            "1e",
            "--1",
        ] {
            assert!(decimal_from(&json!(bad)).is_err(), "{bad:?} accepted");
        }
        assert!(decimal_from(&json!("{{close}}"))
            .unwrap_err()
            .contains("placeholder"));
        assert!(decimal_from(&json!(1e300)).is_err());
        assert!(decimal_from(&json!(true)).is_err());
        assert!(decimal_from(&json!([1])).is_err());
    }

    #[test]
    fn epoch_unit_is_detected_by_magnitude() {
        let want = "2025-11-20T10:00:00+00:00";
        for v in [
            json!(1_763_632_800),
            json!(1_763_632_800_000_u64),
            json!(1_763_632_800_000_000_u64),
            json!(1_763_632_800_000_000_000_u64),
            json!("1763632800"),
            json!("1763632800000"),
            json!("2025-11-20T10:00:00Z"),
            json!("2025-11-20T11:00:00+01:00"),
            json!("2025-11-20T10:00:00"),
            json!("2025-11-20 10:00:00"),
        ] {
            assert_eq!(timestamp_from(&v).unwrap().to_rfc3339(), want, "{v}");
        }
        let frac = timestamp_from(&json!(1_763_632_800.25)).unwrap();
        assert_eq!(frac.timestamp_subsec_millis(), 250);
    }

    #[test]
    fn implausible_dates_are_rejected() {
        for v in [
            json!(0),
            json!(-5),
            json!(86_400),
            json!("yesterday"),
            json!(""),
            json!(true),
            json!("9999-01-01T00:00:00Z"),
        ] {
            assert!(timestamp_from(&v).is_err(), "{v} accepted");
        }
    }

    #[test]
    fn expiry_formats() {
        let want = "2025-12-29T00:00:00+00:00";
        for v in [
            json!("20251229"),
            json!(20251229),
            json!("2025-12-29"),
            json!("2025-12-29T00:00:00Z"),
            // The sender's date counts, on either side of UTC.
            json!("2025-12-29T00:00:00+09:00"),
            json!("2025-12-29T23:30:00-05:00"),
        ] {
            assert_eq!(expiry_from(&v).unwrap().to_rfc3339(), want, "{v}");
        }
        assert!(expiry_from(&json!("202512"))
            .unwrap_err()
            .contains("contract month"));
        for v in [json!("20251332"), json!("Dec-25"), json!(2025.5), json!("")] {
            assert!(expiry_from(&v).is_err(), "{v} accepted");
        }
    }

    #[test]
    fn a_blank_alias_does_not_hide_a_later_one() {
        let v = json!({"alert_id": " ", "id": "ABC-1", "ticker": "", "symbol": "AAPL"});
        let obj = Obj::new(&v, "").unwrap();
        assert_eq!(
            obj.id(&["alert_id", "id"]).unwrap().as_deref(),
            Some("ABC-1")
        );
        assert_eq!(
            obj.text(&["ticker", "symbol"]).unwrap(),
            Some(("symbol", "AAPL"))
        );
        assert_eq!(obj.id(&["alert_id"]).unwrap(), None);
    }

    #[test]
    fn shown_truncates_on_char_boundaries() {
        let long = "é".repeat(100);
        assert_eq!(shown(&long).chars().count(), 49);
        assert_eq!(shown("short"), "short");
    }
}
