//! Backtest returns for CVaR, from MongoDB
//! `<mongo.trading_db>.strategy_backtest_data`.
//!
//! One document per strategy (what `mtx backtest ingest` writes):
//!
//! | field | type | use |
//! |---|---|---|
//! | `strategy_id` | string | the column's strategy |
//! | `dates` | array of BSON dates | the day of each return (UTC date) |
//! | `daily_returns` | array of doubles | decimal daily returns (`0.001` = 0.1 %) |
//!
//! Series are aligned **by date**, not by position ([`ReturnsTable`] joins
//! them on their common days). Integers and decimals are accepted as
//! returns, `YYYY-MM-DD` / RFC 3339 strings as dates. A document that cannot
//! be used (no `dates`, lengths differ, a date twice, a non-finite return,
//! the same strategy twice) is skipped with a warning; the others load.
//!
//! The worker loads the collection at start and every
//! `cerebro.backtest_refresh_secs` in a background task. A failed load never
//! blocks a decision: until a first load succeeds every decision records
//! CVaR as [`crate::CvarSkip::Unavailable`] with the error; after that, a
//! failed refresh keeps the last table (logged) and the next refresh tries
//! again.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::options::ClientOptions;

use crate::inputs::{ReturnSeries, ReturnsTable};

/// The collection read.
pub const COLLECTION: &str = "strategy_backtest_data";

/// Where the backtests live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BacktestSource {
    /// MongoDB URI.
    pub uri: String,
    /// Database (`mongo.trading_db`).
    pub database: String,
    /// Server selection / connect timeout.
    pub timeout: Duration,
    /// Upper bound on one whole load.
    pub load_timeout: Duration,
}

/// Why one document was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocError {
    /// A required field is missing or has the wrong type.
    #[error("`{0}` is missing or not {1}")]
    Field(&'static str, &'static str),
    /// An element of an array is unusable.
    #[error("`{field}[{index}]`: {problem}")]
    Element {
        /// `dates` or `daily_returns`.
        field: &'static str,
        /// Position in the array.
        index: usize,
        /// What is wrong.
        problem: String,
    },
    /// The series does not check ([`ReturnSeries::check`]).
    #[error(transparent)]
    Series(#[from] crate::inputs::ReturnsError),
}

fn date_of(b: &Bson) -> Result<NaiveDate, String> {
    match b {
        Bson::DateTime(dt) => DateTime::<Utc>::from_timestamp_millis(dt.timestamp_millis())
            .map(|d| d.date_naive())
            .ok_or_else(|| "date out of range".to_string()),
        Bson::String(s) => NaiveDate::parse_from_str(s, "%Y-%m-%d")
            .or_else(|_| {
                DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc).date_naive())
            })
            .map_err(|_| format!("`{s}` is not a date")),
        other => Err(format!("{:?} is not a date", other.element_type())),
    }
}

fn return_of(b: &Bson) -> Result<f64, String> {
    match b {
        Bson::Double(x) => Ok(*x),
        Bson::Int32(x) => Ok(f64::from(*x)),
        Bson::Int64(x) => Ok(*x as f64),
        Bson::Decimal128(d) => d
            .to_string()
            .parse::<f64>()
            .map_err(|_| format!("decimal {d} is not a number")),
        other => Err(format!("{:?} is not a number", other.element_type())),
    }
}

/// One document as a return series (see the module docs for the shape).
pub fn series_from_doc(d: &Document) -> Result<ReturnSeries, DocError> {
    let strategy_id = d
        .get_str("strategy_id")
        .map_err(|_| DocError::Field("strategy_id", "a string"))?
        .to_string();
    let dates = d
        .get_array("dates")
        .map_err(|_| DocError::Field("dates", "an array of dates"))?
        .iter()
        .enumerate()
        .map(|(index, b)| {
            date_of(b).map_err(|problem| DocError::Element {
                field: "dates",
                index,
                problem,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let daily_returns = d
        .get_array("daily_returns")
        .map_err(|_| DocError::Field("daily_returns", "an array of numbers"))?
        .iter()
        .enumerate()
        .map(|(index, b)| {
            return_of(b).map_err(|problem| DocError::Element {
                field: "daily_returns",
                index,
                problem,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let s = ReturnSeries {
        strategy_id,
        dates,
        daily_returns,
    };
    s.check()?;
    Ok(s)
}

/// A table built from documents, with what was left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    /// The returns of every usable document.
    pub table: Arc<ReturnsTable>,
    /// Strategies loaded.
    pub strategies: usize,
    /// Documents skipped: (strategy id or `_id`, why).
    pub skipped: Vec<(String, String)>,
}

/// Table the usable documents; unusable ones (and repeats of a strategy)
/// are listed in [`Loaded::skipped`].
pub fn table_from_docs(docs: &[Document]) -> Loaded {
    let mut series = Vec::with_capacity(docs.len());
    let mut skipped = Vec::new();
    let mut seen = BTreeSet::new();
    for d in docs {
        let name = d
            .get_str("strategy_id")
            .map(str::to_string)
            .unwrap_or_else(|_| d.get("_id").map(|v| v.to_string()).unwrap_or_default());
        match series_from_doc(d) {
            Ok(s) if !seen.insert(s.strategy_id.clone()) => {
                skipped.push((name, format!("strategy {} given twice", s.strategy_id)))
            }
            Ok(s) => series.push(s),
            Err(e) => skipped.push((name, e.to_string())),
        }
    }
    let strategies = series.len();
    // Every series checked on its own and no strategy twice: tabling cannot fail.
    let table = ReturnsTable::new(series).unwrap_or_else(|e| {
        skipped.push(("*".into(), e.to_string()));
        ReturnsTable::default()
    });
    Loaded {
        table: Arc::new(table),
        strategies,
        skipped,
    }
}

/// A lazily connected reader of the backtest collection.
#[derive(Debug)]
pub struct BacktestReader {
    source: BacktestSource,
    client: Option<mongodb::Client>,
}

impl BacktestReader {
    /// A reader for `source` (nothing is connected yet).
    pub fn new(source: BacktestSource) -> Self {
        BacktestReader {
            source,
            client: None,
        }
    }

    async fn client(&mut self) -> Result<mongodb::Client, String> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let mut opts = ClientOptions::parse(&self.source.uri)
            .await
            .map_err(|e| format!("mongo.uri: {e}"))?;
        opts.server_selection_timeout = Some(self.source.timeout);
        opts.connect_timeout = Some(self.source.timeout);
        if opts.app_name.is_none() {
            opts.app_name = Some("mtx-cerebro".into());
        }
        let c = mongodb::Client::with_options(opts).map_err(|e| format!("mongo client: {e}"))?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Read the whole collection and table it.
    pub async fn load(&mut self) -> Result<Loaded, String> {
        let client = self.client().await?;
        let coll = client
            .database(&self.source.database)
            .collection::<Document>(COLLECTION);
        let database = self.source.database.clone();
        // Polled to the end in its own task even when the wait below gives
        // up: a driver future dropped half-way can leave the client's pool
        // inconsistent (mongodb RUST-937).
        let read = tokio::spawn(async move {
            let mut cursor = coll
                .find(doc! {})
                .projection(doc! {"_id": 1, "strategy_id": 1, "dates": 1, "daily_returns": 1})
                .await
                .map_err(|e| format!("{database}.{COLLECTION}: {e}"))?;
            let mut docs = Vec::new();
            while let Some(d) = cursor
                .try_next()
                .await
                .map_err(|e| format!("{database}.{COLLECTION}: {e}"))?
            {
                docs.push(d);
            }
            Ok::<_, String>(docs)
        });
        let docs = tokio::time::timeout(self.source.load_timeout, read)
            .await
            .map_err(|_| {
                format!(
                    "{}.{COLLECTION}: not read within {:?}",
                    self.source.database, self.source.load_timeout
                )
            })?
            .map_err(|e| format!("{}.{COLLECTION}: {e}", self.source.database))??;
        Ok(table_from_docs(&docs))
    }
}

/// What the worker knows about the backtests right now.
#[derive(Debug, Clone, Default)]
pub struct BacktestState {
    /// The latest table loaded.
    pub table: Option<Arc<ReturnsTable>>,
    /// When it was loaded.
    pub loaded_at: Option<DateTime<Utc>>,
    /// Strategies in it.
    pub strategies: usize,
    /// Documents skipped by the latest load.
    pub skipped: Vec<(String, String)>,
    /// The latest load's error (cleared by a success).
    pub last_error: Option<String>,
}

impl BacktestState {
    /// Why there is no table (for [`crate::CvarSkip::Unavailable`]).
    pub fn unavailable_reason(&self) -> Option<String> {
        if self.table.is_some() {
            return None;
        }
        Some(match &self.last_error {
            Some(e) => e.clone(),
            None => "backtest data not loaded yet".to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::DateTime as BsonDate;

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2025, 1, d).unwrap()
    }

    fn bson_day(d: u32) -> Bson {
        Bson::DateTime(BsonDate::from_millis(
            day(d)
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp_millis(),
        ))
    }

    #[test]
    fn documents_become_date_aligned_series() {
        let a = doc! {
            "strategy_id": "a",
            "dates": [bson_day(1), bson_day(2), bson_day(3)],
            "daily_returns": [0.01, -0.02, 1_i32],
        };
        // Same days given out of order and partly missing: aligned by date.
        let b = doc! {
            "strategy_id": "b",
            "dates": ["2025-01-03", bson_day(2)],
            "daily_returns": [0.5, 0.25],
        };
        let loaded = table_from_docs(&[a, b]);
        assert!(loaded.skipped.is_empty(), "{:?}", loaded.skipped);
        assert_eq!(loaded.strategies, 2);
        let t = &loaded.table;
        assert_eq!(t.dates(), &[day(1), day(2), day(3)]);
        assert_eq!(t.column("a").unwrap(), &[0.01, -0.02, 1.0]);
        let b = t.column("b").unwrap();
        assert!(b[0].is_nan());
        assert_eq!((b[1], b[2]), (0.25, 0.5));
    }

    #[test]
    fn unusable_documents_are_skipped_with_a_reason() {
        let ok = doc! {"strategy_id": "ok", "dates": [bson_day(1)], "daily_returns": [0.01]};
        let docs = [
            ok.clone(),
            doc! {"strategy_id": "no_dates", "daily_returns": [0.01]},
            doc! {"strategy_id": "short", "dates": [bson_day(1), bson_day(2)], "daily_returns": [0.01]},
            doc! {"strategy_id": "twice", "dates": [bson_day(1), bson_day(1)], "daily_returns": [0.01, 0.02]},
            doc! {"strategy_id": "text", "dates": [bson_day(1)], "daily_returns": ["x"]},
            doc! {"strategy_id": "nan", "dates": [bson_day(1)], "daily_returns": [f64::NAN]},
            doc! {"_id": 7, "dates": [bson_day(1)], "daily_returns": [0.01]},
            ok,
        ];
        let loaded = table_from_docs(&docs);
        assert_eq!(loaded.strategies, 1);
        assert!(loaded.table.contains("ok"));
        let why: Vec<&str> = loaded.skipped.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(
            why,
            ["no_dates", "short", "twice", "text", "nan", "7", "ok"]
        );
        assert!(
            loaded.skipped[0].1.contains("dates"),
            "{:?}",
            loaded.skipped
        );
        assert!(
            loaded.skipped[6].1.contains("twice"),
            "{:?}",
            loaded.skipped
        );
    }

    #[test]
    fn unavailable_reason_until_a_table_is_loaded() {
        let mut s = BacktestState::default();
        assert_eq!(
            s.unavailable_reason().as_deref(),
            Some("backtest data not loaded yet")
        );
        s.last_error = Some("connection refused".into());
        assert_eq!(
            s.unavailable_reason().as_deref(),
            Some("connection refused")
        );
        s.table = Some(Arc::new(ReturnsTable::default()));
        assert_eq!(s.unavailable_reason(), None);
    }
}
