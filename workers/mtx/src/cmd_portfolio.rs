//! What the portfolio commands (`mtx backtest`, `mtx strategies`,
//! `mtx optimize`, `mtx allocations`) share: the Mongo and KV connections,
//! the BSON conversions of the seed's types (Decimal128 money and percent,
//! BSON dates, doubles for statistics) and table printing.
//!
//! MongoDB is the source of truth of strategy configurations and
//! allocations; the KV buckets `strategies` and `allocations` are mirrors
//! the workers watch. Every command writes Mongo first and the KV mirror
//! second, so a failed KV write leaves Mongo right and is repaired by running
//! the command again (or `mtx strategies sync` / `mtx allocations approve`
//! on the ACTIVE allocation).

use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use async_nats::jetstream::kv;
use bson::{Bson, Document};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use mongodb::Collection;
use mtx_runtime::config::Config;
use mtx_sink::spec::Db;
use rust_decimal::Decimal;
use serde_json::{Map, Value};

/// Time limit of one Mongo operation of these commands.
const MONGO_OP_TIMEOUT: Duration = Duration::from_secs(30);

/// The trading database's collections the portfolio commands use.
pub struct Mongo {
    store: mtx_sink::Store,
    db_name: String,
}

impl Mongo {
    /// Connect (lazily; the first operation reports an unreachable server).
    pub async fn connect(cfg: &Config) -> Result<Mongo> {
        let store = mtx_sink::Store::connect(&cfg.mongo, MONGO_OP_TIMEOUT)
            .await
            .with_context(|| format!("connecting to MongoDB at {}", redact_uri(&cfg.mongo.uri)))?;
        Ok(Mongo {
            store,
            db_name: cfg.mongo.trading_db.clone(),
        })
    }

    /// A collection of the trading database.
    pub fn coll(&self, name: &str) -> Collection<Document> {
        self.store.coll(Db::Trading, name)
    }

    /// `<trading_db>.<name>`, for messages.
    pub fn label(&self, name: &str) -> String {
        format!("{}.{name}", self.db_name)
    }
}

/// The URI without credentials, for error messages.
fn redact_uri(uri: &str) -> String {
    match (uri.find("://"), uri.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &uri[..s], &uri[at..]),
        _ => uri.to_string(),
    }
}

/// Open a KV bucket of the topology (by base name, e.g. `strategies`).
pub async fn kv_bucket(cfg: &Config, base: &str) -> Result<kv::Store> {
    let topo = mtx_subjects::Topology::build(&cfg.topology);
    let name = topo
        .bucket(base)
        .ok_or_else(|| anyhow!("the topology has no KV bucket `{base}`"))?
        .to_string();
    let wait = Duration::from_millis(cfg.nats.request_timeout_ms.max(1_000) * 3);
    let (_client, js) = tokio::time::timeout(wait, mtx_runtime::nats::connect(&cfg.nats, None))
        .await
        .map_err(|_| anyhow!("connecting to NATS at {}: timed out", cfg.nats.url))?
        .with_context(|| format!("connecting to NATS at {}", cfg.nats.url))?;
    tokio::time::timeout(wait, js.get_key_value(&name))
        .await
        .map_err(|_| anyhow!("opening KV bucket {name}: timed out"))?
        .with_context(|| {
            format!("opening KV bucket {name} (is the topology applied? `mtx topology apply`)")
        })
}

/// Put `value` as JSON under `key`; returns the new revision.
pub async fn kv_put_json<T: serde::Serialize>(
    store: &kv::Store,
    key: &str,
    value: &T,
) -> Result<u64> {
    let body = serde_json::to_vec(value)?;
    tokio::time::timeout(Duration::from_secs(10), store.put(key, body.into()))
        .await
        .map_err(|_| anyhow!("KV put {key}: timed out"))?
        .with_context(|| format!("KV put {key}"))
}

/// Now, truncated to the millisecond BSON dates hold, so the same instant
/// written to Mongo and into a KV JSON mirror compares equal.
pub fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    Utc.timestamp_millis_opt(now.timestamp_millis())
        .single()
        .unwrap_or(now)
}

/// A BSON date.
pub fn bdate(t: DateTime<Utc>) -> Bson {
    Bson::DateTime(bson::DateTime::from_chrono(t))
}

/// A calendar day as a BSON date at 00:00 UTC.
pub fn bday(d: NaiveDate) -> Bson {
    bdate(d.and_time(chrono::NaiveTime::MIN).and_utc())
}

/// An exact Decimal128.
pub fn bdec(d: Decimal) -> Bson {
    mtx_sink::convert::decimal128(d)
}

/// Optional value or BSON null.
pub fn or_null<T>(v: Option<T>, f: impl FnOnce(T) -> Bson) -> Bson {
    v.map_or(Bson::Null, f)
}

/// A decimal from a numeric BSON value.
pub fn bson_decimal(v: &Bson) -> Option<Decimal> {
    match v {
        Bson::Decimal128(x) => parse_decimal_text(&x.to_string()),
        Bson::Double(x) => mtx_portfolio::percent::decimal_from_f64(*x),
        Bson::Int32(x) => Some(Decimal::from(*x)),
        Bson::Int64(x) => Some(Decimal::from(*x)),
        Bson::String(s) => parse_decimal_text(s),
        _ => None,
    }
}

fn parse_decimal_text(s: &str) -> Option<Decimal> {
    let s = s.trim();
    Decimal::from_str(s)
        .or_else(|_| Decimal::from_scientific(s))
        .ok()
        .map(|d| d.normalize())
}

/// An `f64` from any numeric BSON value.
pub fn bson_f64(v: &Bson) -> Option<f64> {
    match v {
        Bson::Double(x) => Some(*x),
        Bson::Int32(x) => Some(f64::from(*x)),
        Bson::Int64(x) => Some(*x as f64),
        Bson::Decimal128(x) => x.to_string().parse::<f64>().ok(),
        _ => None,
    }
}

/// A required `f64` field.
pub fn get_f64(doc: &Document, key: &str) -> Result<f64> {
    doc.get(key)
        .and_then(bson_f64)
        .ok_or_else(|| anyhow!("field `{key}` is missing or not a number"))
}

/// A date field as chrono (`None` when absent / null / not a date).
pub fn get_datetime(doc: &Document, key: &str) -> Option<DateTime<Utc>> {
    match doc.get(key) {
        Some(Bson::DateTime(d)) => Some(d.to_chrono()),
        _ => None,
    }
}

/// A string field (`None` when absent / null / not a string).
pub fn get_str<'a>(doc: &'a Document, key: &str) -> Option<&'a str> {
    match doc.get(key) {
        Some(Bson::String(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// BSON → JSON for display and for typed decoding: Decimal128 as its exact
/// decimal string, dates as RFC 3339, ObjectIds as hex.
pub fn bson_to_json(v: &Bson) -> Value {
    match v {
        Bson::Null | Bson::Undefined => Value::Null,
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::Int32(i) => Value::from(*i),
        Bson::Int64(i) => Value::from(*i),
        Bson::Double(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        Bson::Decimal128(d) => Value::String(
            parse_decimal_text(&d.to_string()).map_or_else(|| d.to_string(), |x| x.to_string()),
        ),
        Bson::String(s) => Value::String(s.clone()),
        Bson::DateTime(d) => Value::String(
            d.to_chrono()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
        Bson::ObjectId(o) => Value::String(o.to_hex()),
        Bson::Array(a) => Value::Array(a.iter().map(bson_to_json).collect()),
        Bson::Document(d) => doc_to_json(d),
        other => other.clone().into_relaxed_extjson(),
    }
}

/// A document as a JSON object (see [`bson_to_json`]).
pub fn doc_to_json(d: &Document) -> Value {
    Value::Object(
        d.iter()
            .map(|(k, v)| (k.clone(), bson_to_json(v)))
            .collect::<Map<String, Value>>(),
    )
}

/// JSON → BSON for algorithm details and similar free-form blocks: integers
/// as Int64, other numbers as doubles, objects as documents.
pub fn json_to_bson(v: &Value) -> Bson {
    match v {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Bson::Int64(i),
            None => n.as_f64().map_or(Bson::Null, Bson::Double),
        },
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(a) => Bson::Array(a.iter().map(json_to_bson).collect()),
        Value::Object(m) => Bson::Document(
            m.iter()
                .map(|(k, v)| (k.clone(), json_to_bson(v)))
                .collect::<Document>(),
        ),
    }
}

/// Print rows as a left-aligned table with a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(0);
            if i + 1 == cells.len() {
                out.push_str(c);
            } else {
                out.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

/// `user` for audit fields when none is given: `$USER`, else `cli`.
pub fn default_user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| "cli".into())
}

/// Fail when a Mongo write result says nothing matched.
pub fn ensure_matched(matched: u64, what: impl FnOnce() -> String) -> Result<()> {
    if matched == 0 {
        bail!("{}", what());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bson_numbers_and_dates() {
        let d = Decimal::from_str("12.50").unwrap_or_default();
        let b = bdec(d);
        assert_eq!(bson_decimal(&b), Some(Decimal::new(125, 1)));
        assert_eq!(bson_decimal(&Bson::Double(0.1)), Some(Decimal::new(1, 1)));
        assert_eq!(bson_f64(&Bson::Int32(3)), Some(3.0));
        let day = NaiveDate::from_ymd_opt(2024, 3, 1).unwrap_or_default();
        match bday(day) {
            Bson::DateTime(t) => assert_eq!(t.timestamp_millis() % 86_400_000, 0),
            other => panic!("{other}"),
        }
        let j = bson_to_json(&bdec(Decimal::new(455, 1)));
        assert_eq!(j, Value::String("45.5".into()));
        assert_eq!(
            redact_uri("mongodb://u:p@h:1/?x=1"),
            "mongodb://***@h:1/?x=1"
        );
    }
}
