//! JSON → BSON, typed by the collection catalog.
//!
//! Messages carry decimals as strings (rust_decimal's serde) and dates as
//! RFC 3339 strings. Each field declared in [`crate::spec`] is converted to
//! its BSON type: `Dec` → Decimal128 parsed exactly (never through a float),
//! `Date` → BSON date, `Dbl` → double, `Int` → int64. Fields the catalog does
//! not declare keep their JSON shape (strings stay strings, integers become
//! int64, other numbers doubles). Top-level fields are written in the seed's
//! order, then the rest alphabetically.

use crate::spec::{CollectionSpec, Ty};
use bson::{Bson, DateTime, Decimal128, Document};
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::str::FromStr;
use std::sync::OnceLock;

/// A field whose value cannot be given its documented BSON type.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{path}`: expected {expected}, got {got}")]
pub struct ConvertError {
    /// Dotted path of the field.
    pub path: String,
    /// What the catalog requires.
    pub expected: &'static str,
    /// What the message held (truncated).
    pub got: String,
}

fn err(path: &str, expected: &'static str, v: &Value) -> ConvertError {
    let mut got = v.to_string();
    if got.len() > 80 {
        got.truncate(77);
        got.push_str("...");
    }
    ConvertError {
        path: path.to_string(),
        expected,
        got,
    }
}

/// An exact Decimal128 from a rust_decimal value.
pub fn decimal128(d: Decimal) -> Bson {
    match Decimal128::from_str(&d.to_string()) {
        Ok(v) => Bson::Decimal128(v),
        // Unreachable: rust_decimal's 28 digits always fit Decimal128's 34.
        Err(_) => Bson::String(d.to_string()),
    }
}

/// A Decimal128 from a JSON string or number, exactly: the text is parsed
/// straight into Decimal128 (34 digits, exponents to ±6111), never through
/// rust_decimal's 28 digits or a float, and a value it cannot hold exactly
/// (35 significant digits, NaN, infinity) is refused, never rounded. A JSON
/// number is as exact as its text was to the JSON reader (integers always;
/// mtx's producers send decimals as strings).
pub fn parse_decimal128(v: &Value) -> Option<Decimal128> {
    let text = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    let mantissa = text.split(['e', 'E']).next().unwrap_or_default();
    let numeric = mantissa.bytes().any(|b| b.is_ascii_digit())
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
    if !numeric {
        return None;
    }
    Decimal128::from_str(&text).ok()
}

/// A BSON date from an RFC 3339 string.
pub fn parse_date(v: &Value) -> Option<DateTime> {
    let s = v.as_str()?;
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|d| DateTime::from_chrono(d.with_timezone(&chrono::Utc)))
}

/// The catalog's types of one collection as a tree, so conversion walks the
/// message and the tree together without building path strings.
#[derive(Debug, Default)]
struct Node {
    ty: Option<Ty>,
    props: HashMap<&'static str, Node>,
    items: Option<Box<Node>>,
    values: Option<Box<Node>>,
}

impl Node {
    fn insert(&mut self, segs: &[&'static str], ty: Ty) {
        match segs.split_first() {
            None => self.ty = Some(ty),
            Some((&"[]", rest)) => self
                .items
                .get_or_insert_with(Default::default)
                .insert(rest, ty),
            Some((&"*", rest)) => self
                .values
                .get_or_insert_with(Default::default)
                .insert(rest, ty),
            Some((name, rest)) => self.props.entry(name).or_default().insert(rest, ty),
        }
    }

    /// The node of object key `k` (a declared field, else the map wildcard).
    fn child(&self, k: &str) -> Option<&Node> {
        self.props.get(k).or(self.values.as_deref())
    }
}

fn tree(spec: &CollectionSpec) -> &'static Node {
    static TREES: OnceLock<HashMap<&'static str, Node>> = OnceLock::new();
    static EMPTY: OnceLock<Node> = OnceLock::new();
    TREES
        .get_or_init(|| {
            crate::spec::catalog()
                .iter()
                .map(|c| {
                    let mut root = Node::default();
                    for f in &c.fields {
                        let segs: Vec<&'static str> = f.path.split('.').collect();
                        root.insert(&segs, f.ty);
                    }
                    (c.name, root)
                })
                .collect()
        })
        .get(spec.name)
        .unwrap_or_else(|| EMPTY.get_or_init(Node::default))
}

/// Prefix an error's path with the key it was found under.
fn under(key: &str) -> impl FnOnce(ConvertError) -> ConvertError + '_ {
    move |mut e| {
        e.path = if e.path.is_empty() {
            key.to_string()
        } else if e.path.starts_with('[') {
            format!("{key}{}", e.path)
        } else {
            format!("{key}.{}", e.path)
        };
        e
    }
}

/// Convert one value with its node's type (errors carry the path below it).
fn value(node: Option<&Node>, v: &Value) -> Result<Bson, ConvertError> {
    let ty = node.and_then(|n| n.ty);
    if v.is_null() {
        return Ok(Bson::Null);
    }
    Ok(match (ty, v) {
        (Some(Ty::Dec), v) => {
            Bson::Decimal128(parse_decimal128(v).ok_or_else(|| err("", "a decimal", v))?)
        }
        (Some(Ty::Date), v) => {
            Bson::DateTime(parse_date(v).ok_or_else(|| err("", "an RFC 3339 date", v))?)
        }
        (Some(Ty::Dbl), Value::Number(n)) => {
            Bson::Double(n.as_f64().ok_or_else(|| err("", "a number", v))?)
        }
        (Some(Ty::Dbl), Value::String(s)) => Bson::Double(
            s.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| err("", "a number", v))?,
        ),
        (Some(Ty::Int), Value::Number(n)) => {
            Bson::Int64(n.as_i64().ok_or_else(|| err("", "an integer", v))?)
        }
        (Some(Ty::Int), Value::String(s)) => Bson::Int64(
            s.trim()
                .parse::<i64>()
                .map_err(|_| err("", "an integer", v))?,
        ),
        (Some(Ty::Str), Value::String(s)) => Bson::String(s.clone()),
        (Some(Ty::Bool), Value::Bool(b)) => Bson::Boolean(*b),
        (Some(Ty::Str), _) => return Err(err("", "a string", v)),
        (Some(Ty::Bool), _) => return Err(err("", "a boolean", v)),
        (Some(Ty::Dbl | Ty::Int), _) => return Err(err("", "a number", v)),
        (Some(Ty::Obj), v) if !v.is_object() => return Err(err("", "an object", v)),
        (Some(Ty::Arr), v) if !v.is_array() => return Err(err("", "an array", v)),
        (_, Value::Object(m)) => {
            let mut d = Document::new();
            for (k, x) in m {
                let b = value(node.and_then(|n| n.child(k)), x).map_err(under(k))?;
                d.insert(k.clone(), b);
            }
            Bson::Document(d)
        }
        (_, Value::Array(a)) => {
            let item = node.and_then(|n| n.items.as_deref());
            let mut out = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                out.push(value(item, x).map_err(|e| {
                    let key = format!("[{i}]");
                    under(&key)(e)
                })?);
            }
            Bson::Array(out)
        }
        (_, v) => generic(v),
    })
}

/// JSON without a declared type: integers → int64, other numbers → double.
pub fn generic(v: &Value) -> Bson {
    match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Bson::Int64(i),
            None => Bson::Double(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(a) => Bson::Array(a.iter().map(generic).collect()),
        Value::Object(m) => Bson::Document(
            m.iter()
                .map(|(k, v)| (k.clone(), generic(v)))
                .collect::<Document>(),
        ),
    }
}

/// Convert a whole message object into a document of `spec`'s collection,
/// top-level fields in the catalog's order first.
pub fn document(spec: &CollectionSpec, m: &Map<String, Value>) -> Result<Document, ConvertError> {
    document_with(spec, m, Document::new())
}

/// [`document`] plus `extra` fields set by the sink (they win over message
/// fields of the same name); everything in the catalog's order first, then
/// the message's other fields, then the other extras.
pub fn document_with(
    spec: &CollectionSpec,
    m: &Map<String, Value>,
    mut extra: Document,
) -> Result<Document, ConvertError> {
    let root = tree(spec);
    let mut d = Document::new();
    for fld in &spec.fields {
        let top = fld.path;
        if top.contains('.') {
            continue;
        }
        if let Some(v) = extra.remove(top) {
            d.insert(top, v);
        } else if let Some(v) = m.get(top) {
            d.insert(top, value(root.child(top), v).map_err(under(top))?);
        }
    }
    for (k, v) in m {
        if !d.contains_key(k) && !extra.contains_key(k) {
            d.insert(k.clone(), value(root.child(k), v).map_err(under(k))?);
        }
    }
    d.extend(extra);
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::spec;
    use serde_json::json;

    #[test]
    fn decimals_dates_and_ratios() {
        let s = spec("cerebro_decisions").unwrap();
        let m = json!({
            "signal_id": "sig_1",
            "decision": "MODIFIED",
            "timestamp": "2025-11-20T10:00:00.123Z",
            "reason": "shrunk",
            "original_quantity": "17",
            "final_quantity": "12.50",
            "risk_assessment": {
                "portfolio_margin_before": "1000.10",
                "margin_utilization_pct": "12.5",
                "cvar_contribution": 0.25,
                "correlation_impact": {"with_portfolio": 0.1}
            },
            "legs": [{"final_quantity": "12.50", "logic": "x"}],
            "extra": 3
        });
        let d = document(s, m.as_object().unwrap()).unwrap();
        assert_eq!(d.keys().next().map(String::as_str), Some("signal_id"));
        match d.get("final_quantity") {
            Some(Bson::Decimal128(x)) => assert_eq!(x.to_string(), "12.50"),
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(d.get("timestamp"), Some(Bson::DateTime(t)) if t.timestamp_millis() % 1000 == 123)
        );
        let ra = d.get_document("risk_assessment").unwrap();
        assert!(matches!(
            ra.get("portfolio_margin_before"),
            Some(Bson::Decimal128(_))
        ));
        assert_eq!(ra.get_f64("margin_utilization_pct").ok(), Some(12.5));
        assert!(matches!(
            d.get_array("legs").unwrap()[0]
                .as_document()
                .unwrap()
                .get("final_quantity"),
            Some(Bson::Decimal128(_))
        ));
        assert_eq!(d.get_i64("extra").ok(), Some(3));
    }

    #[test]
    fn map_values_and_bad_types() {
        let s = spec("account_state").unwrap();
        let m = json!({
            "deployed_capital": {"SPX": "375.25"},
            "strategy_pnl_today": {"SPX": "-1250.5", "Forex": "12"},
            "equity": "1e2"
        });
        let d = document(s, m.as_object().unwrap()).unwrap();
        assert!(matches!(
            d.get_document("deployed_capital").unwrap().get("SPX"),
            Some(Bson::Decimal128(_))
        ));
        let pnl = d.get_document("strategy_pnl_today").unwrap();
        for k in ["SPX", "Forex"] {
            assert!(
                matches!(pnl.get(k), Some(Bson::Decimal128(_))),
                "{k}: {pnl}"
            );
        }
        let bad = json!({"equity": "lots"});
        let e = document(s, bad.as_object().unwrap()).unwrap_err();
        assert_eq!(e.path, "equity");
        let bad = json!({"timestamp": 1700000000});
        assert!(document(s, bad.as_object().unwrap()).is_err());
    }

    #[test]
    fn decimal_text_goes_to_decimal128_exactly_or_not_at_all() {
        let d = |s: &str| parse_decimal128(&json!(s)).map(|x| x.to_string());
        // Beyond rust_decimal's 28 digits and range, still exact.
        assert_eq!(
            d("0.00000000000000000000000000001").as_deref(),
            Some("1E-29")
        );
        assert_eq!(
            d("9.99999999999999999999999999999").as_deref(),
            Some("9.99999999999999999999999999999")
        );
        assert_eq!(d("1e30").as_deref(), Some("1E+30"));
        assert_eq!(
            d("79228162514264337593543950336").as_deref(),
            Some("79228162514264337593543950336")
        );
        assert_eq!(d(" 12.50 ").as_deref(), Some("12.50"));
        assert_eq!(
            parse_decimal128(&json!(1234567890))
                .map(|x| x.to_string())
                .as_deref(),
            Some("1234567890")
        );
        // 35 significant digits cannot be held exactly: refused, not rounded.
        assert_eq!(d("1.2345678901234567890123456789012345"), None);
        for bad in ["NaN", "inf", "-Infinity", "", "1,5", "12abc", "e5", "."] {
            assert_eq!(d(bad), None, "{bad}");
        }
    }

    #[test]
    fn decimal128_is_exact() {
        let d = Decimal::from_str("0.1000000000000000000000000001").unwrap();
        match decimal128(d) {
            Bson::Decimal128(x) => assert_eq!(x.to_string(), "0.1000000000000000000000000001"),
            other => panic!("{other:?}"),
        }
    }
}
