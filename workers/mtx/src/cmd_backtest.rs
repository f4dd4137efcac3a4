//! `mtx backtest ingest <files or folders>...`: developers' backtest CSVs
//! into `<trading_db>.strategy_backtest_data`, one document per strategy.
//!
//! Every file is parsed and checked first (see `mtx_portfolio::backtest`:
//! `Date` + a return column, percent or decimal, optional margin column;
//! rows sorted by date; duplicate dates, NaN/inf and unparseable rows are
//! rejected with `file: line N: ...`). If any file is bad, every problem is
//! printed and **nothing** is stored, so a half-ingested universe is never
//! optimised. Then each strategy is upserted on `strategy_id`:
//!
//! | field | value |
//! |---|---|
//! | `strategy_id` | the file stem (`SPX_1-D_Opt.csv` → `SPX_1-D_Opt`) |
//! | `backtest_period` | `start_date`, `end_date` (BSON dates, 00:00 UTC), `total_days` (rows) |
//! | `daily_returns` | decimal fractions as doubles (0.57 % → 0.0057), oldest first |
//! | `dates` | BSON dates parallel to `daily_returns` (series are joined by date) |
//! | `mean_return_daily`, `volatility_daily` | mean and sample std (ddof 1) of the daily returns |
//! | `sharpe_ratio` | daily, r_f = 0 (null when the volatility is 0); annualised (× √252) in `metadata.sharpe_ratio_annual` |
//! | `max_drawdown` | of the compounded equity curve, a fraction of the peak (0.25 = −25 %) |
//! | `win_rate` | fraction of days with a positive return (0..1) |
//! | `margin_per_unit` | Decimal128, the largest value of the margin column; null without one |
//! | `metadata` | `instrument`, `backtest_source`, `notes`, `source_file`, `sharpe_ratio_annual`, `trading_days_per_year`, `units` |
//! | `created_at` / `updated_at` | first ingest / this ingest |
//!
//! Re-ingesting replaces the series and statistics, bumps `updated_at` and
//! keeps `created_at`; `metadata.instrument` / `notes` are kept unless given
//! again. A strategy that already has a `strategy_configurations` entry gets
//! its `last_backtest_sync` set, mirrored into the `strategies` KV bucket.
//! A progress bar is drawn on stderr for folders when stderr is a terminal.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use bson::{doc, Bson, Document};
use clap::Subcommand;
use futures::TryStreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use mtx_portfolio::backtest::{load_backtest_csv, TRADING_DAYS_PER_YEAR};
use mtx_portfolio::percent::decimal_from_f64;
use mtx_portfolio::StrategyBacktest;
use mtx_runtime::config::Config;
use mtx_sink::spec::names;

use crate::cmd_portfolio::{bdate, bday, bdec, get_str, now_millis, or_null, Mongo};
use crate::cmd_strategies;

/// `mtx backtest ...`
#[derive(Subcommand)]
pub enum BacktestCmd {
    /// Parse backtest CSVs (files, or every `*.csv` in a folder) and upsert
    /// one `strategy_backtest_data` document per strategy (id = file stem).
    Ingest {
        /// CSV files and/or folders of CSV files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// `metadata.backtest_source` (e.g. `portfolio_combiner`, `manual`).
        #[arg(long, default_value = "csv_upload")]
        source: String,
        /// `metadata.instrument` for every file given (kept from the stored document otherwise).
        #[arg(long)]
        instrument: Option<String>,
        /// `metadata.notes` for every file given (kept from the stored document otherwise).
        #[arg(long)]
        notes: Option<String>,
    },
}

/// Run a `backtest` subcommand.
pub async fn run(cmd: BacktestCmd, cfg: &Config) -> Result<ExitCode> {
    let BacktestCmd::Ingest {
        paths,
        source,
        instrument,
        notes,
    } = cmd;
    let (files, any_dir) = collect_files(&paths)?;
    let bar = progress(files.len(), any_dir);

    // 1. Parse everything; report every bad file; store nothing if one is bad.
    bar.set_message("parsing");
    let mut parsed: Vec<(PathBuf, StrategyBacktest)> = Vec::with_capacity(files.len());
    let mut problems = Vec::new();
    for f in &files {
        match load_backtest_csv(f) {
            Ok(bt) => parsed.push((f.clone(), bt)),
            Err(e) => problems.push(e.to_string()),
        }
        bar.inc(1);
    }
    let mut first_file: HashMap<String, &Path> = HashMap::new();
    for (f, bt) in &parsed {
        if let Some(prev) = first_file.insert(bt.strategy_id.clone(), f) {
            problems.push(format!(
                "{}: strategy {} is also in {}",
                f.display(),
                bt.strategy_id,
                prev.display()
            ));
        }
    }
    if !problems.is_empty() {
        bar.finish_and_clear();
        for p in &problems {
            eprintln!("{p}");
        }
        bail!(
            "{} problem(s) in {} file(s); nothing was stored",
            problems.len(),
            files.len()
        );
    }

    // 2. Upsert.
    let mongo = Mongo::connect(cfg).await?;
    let coll = mongo.coll(names::STRATEGY_BACKTEST_DATA);
    let ids: Vec<&str> = parsed.iter().map(|(_, b)| b.strategy_id.as_str()).collect();
    let existing: HashMap<String, Document> = coll
        .find(doc! { "strategy_id": { "$in": ids.clone() } })
        .projection(doc! { "strategy_id": 1, "metadata": 1 })
        .await
        .with_context(|| format!("reading {}", mongo.label(names::STRATEGY_BACKTEST_DATA)))?
        .try_collect::<Vec<Document>>()
        .await
        .with_context(|| format!("reading {}", mongo.label(names::STRATEGY_BACKTEST_DATA)))?
        .into_iter()
        .filter_map(|d| get_str(&d, "strategy_id").map(|id| (id.to_string(), d.clone())))
        .collect();

    bar.reset();
    bar.set_length(parsed.len() as u64);
    bar.set_message("storing");
    let now = now_millis();
    let mut rows = Vec::new();
    for (file, bt) in &parsed {
        let old_meta = existing
            .get(&bt.strategy_id)
            .and_then(|d| d.get_document("metadata").ok());
        let keep = |key: &str, given: &Option<String>| -> Bson {
            match given {
                Some(v) => Bson::String(v.clone()),
                None => old_meta
                    .and_then(|m| m.get(key))
                    .cloned()
                    .unwrap_or(Bson::Null),
            }
        };
        let metadata = doc! {
            "instrument": keep("instrument", &instrument),
            "backtest_source": source.clone(),
            "notes": keep("notes", &notes),
            "source_file": file.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
            "sharpe_ratio_annual": or_null(bt.stats.sharpe_annual, Bson::Double),
            "trading_days_per_year": TRADING_DAYS_PER_YEAR,
            "units": {
                "daily_returns": "decimal fraction per day (0.0057 = +0.57 %)",
                "max_drawdown": "percent of the running peak of compounded equity (34.1 = 34.1 %)",
                "win_rate": "percent of days with a positive return (54.7 = 54.7 %)",
                "sharpe_ratio": "daily, risk-free rate 0",
            },
        };
        let set = backtest_fields(bt, metadata, now);
        let res = coll
            .update_one(
                doc! { "strategy_id": &bt.strategy_id },
                doc! { "$set": set, "$setOnInsert": { "created_at": bdate(now) } },
            )
            .upsert(true)
            .await
            .with_context(|| {
                format!(
                    "storing {} in {}",
                    bt.strategy_id,
                    mongo.label(names::STRATEGY_BACKTEST_DATA)
                )
            })?;
        let action = if res.upserted_id.is_some() {
            "created"
        } else {
            "updated"
        };
        rows.push(vec![
            bt.strategy_id.clone(),
            action.to_string(),
            format!("{} → {}", bt.stats.start_date, bt.stats.end_date),
            bt.stats.total_days.to_string(),
            format!("{:+.4} %", 100.0 * bt.stats.mean_return_daily),
            bt.stats
                .sharpe_annual
                .map_or_else(|| "-".into(), |s| format!("{s:.2}")),
            format!("{:.2} %", 100.0 * bt.stats.max_drawdown),
            format!("{:.1} %", 100.0 * bt.stats.win_rate),
        ]);
        bar.inc(1);
    }
    bar.finish_and_clear();
    crate::cmd_portfolio::print_table(
        &[
            "STRATEGY",
            "",
            "PERIOD",
            "DAYS",
            "MEAN/DAY",
            "SHARPE(ANN)",
            "MAX DD",
            "WIN RATE",
        ],
        &rows,
    );
    println!(
        "ingested {} strategies into {}",
        parsed.len(),
        mongo.label(names::STRATEGY_BACKTEST_DATA)
    );

    // 3. last_backtest_sync of configured strategies (Mongo, then the KV
    //    mirror). The backtests are stored whatever happens here.
    match cmd_strategies::mark_backtest_synced(cfg, &mongo, &ids, now).await {
        Ok(synced) => {
            let missing: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !synced.contains_key(*id))
                .collect();
            if !missing.is_empty() {
                println!(
                    "no strategy configuration yet for: {} (`mtx strategies load <file>` or \
                     `mtx strategies set <id> --create`)",
                    missing.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!(
                "warning: the backtests are stored, but last_backtest_sync of their strategy \
                 configurations was not fully updated: {e:#}"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The `$set` part of a `strategy_backtest_data` upsert.
fn backtest_fields(
    bt: &StrategyBacktest,
    metadata: Document,
    now: chrono::DateTime<chrono::Utc>,
) -> Document {
    let s = &bt.stats;
    doc! {
        "strategy_id": &bt.strategy_id,
        "backtest_period": {
            "start_date": bday(s.start_date),
            "end_date": bday(s.end_date),
            "total_days": s.total_days as i64,
        },
        "daily_returns": bt.daily_returns.iter().map(|r| Bson::Double(*r)).collect::<Vec<_>>(),
        "dates": bt.dates.iter().map(|d| bday(*d)).collect::<Vec<_>>(),
        "mean_return_daily": s.mean_return_daily,
        "volatility_daily": s.volatility_daily,
        "sharpe_ratio": or_null(s.sharpe_daily, Bson::Double),
        // The seed's percentages are 0..100 (allocations 45.5, Bot Core's
        // win_rate 62.22); the in-memory statistics are fractions.
        "max_drawdown": 100.0 * s.max_drawdown,
        "win_rate": 100.0 * s.win_rate,
        "margin_per_unit": or_null(bt.margin_per_unit.and_then(decimal_from_f64), bdec),
        "metadata": metadata,
        "updated_at": bdate(now),
    }
}

/// The CSV files named by `paths` (folders expanded to their `*.csv`,
/// sorted) and whether any path was a folder.
fn collect_files(paths: &[PathBuf]) -> Result<(Vec<PathBuf>, bool)> {
    let mut files = Vec::new();
    let mut any_dir = false;
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("{}: cannot read", p.display()))?;
        if meta.is_dir() {
            any_dir = true;
            let mut found = Vec::new();
            for entry in
                std::fs::read_dir(p).with_context(|| format!("{}: cannot list", p.display()))?
            {
                let f = entry
                    .with_context(|| format!("{}: cannot list", p.display()))?
                    .path();
                let is_csv = f
                    .extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
                if is_csv && f.is_file() {
                    found.push(f);
                }
            }
            if found.is_empty() {
                bail!("{}: no *.csv files in this folder", p.display());
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(p.clone());
        }
    }
    let mut seen = BTreeMap::new();
    files.retain(|f| seen.insert(f.clone(), ()).is_none());
    Ok((files, any_dir))
}

/// A progress bar on stderr for folders, hidden when stderr is not a terminal.
fn progress(len: usize, any_dir: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(len as u64),
        if any_dir && std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    if let Ok(style) = ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} files") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtx_portfolio::parse_backtest_csv;

    #[test]
    fn document_fields_follow_the_seed() {
        let bt = parse_backtest_csv(
            "X",
            Path::new("X.csv"),
            "Date,Daily Returns (%),Margin\n2024-01-03,1.5,\n2024-01-02,-0.5,2000.5\n",
        )
        .unwrap();
        let d = backtest_fields(&bt, doc! {}, now_millis());
        assert_eq!(d.get_array("daily_returns").unwrap().len(), 2);
        assert_eq!(d.get_array("dates").unwrap().len(), 2);
        assert!(matches!(
            d.get_array("dates").unwrap()[0],
            Bson::DateTime(_)
        ));
        let p = d.get_document("backtest_period").unwrap();
        assert_eq!(p.get_i64("total_days").unwrap(), 2);
        assert_eq!(
            d.get_array("daily_returns").unwrap()[0],
            Bson::Double(-0.005)
        );
        match d.get("margin_per_unit") {
            Some(Bson::Decimal128(m)) => assert_eq!(m.to_string(), "2000.5"),
            other => panic!("{other:?}"),
        }
    }

    /// Seed 000: `"max_drawdown": Number // Maximum drawdown percentage`,
    /// `"win_rate": Number // Percentage of winning days` (the seeds write
    /// percentages as 0..100: allocations 45.5, bot_core win_rate 62.22).
    #[test]
    fn drawdown_and_win_rate_are_percentages_per_seed() {
        // equity 1 → 1.10 → 0.55: a 50 % drawdown; 1 winning day of 2 = 50 %.
        let bt = parse_backtest_csv(
            "X",
            Path::new("X.csv"),
            "Date,Daily Returns (%)\n2024-01-02,10\n2024-01-03,-50\n",
        )
        .unwrap();
        let d = backtest_fields(&bt, doc! {}, now_millis());
        assert_eq!(d.get_f64("win_rate").unwrap(), 50.0);
        assert!(
            (d.get_f64("max_drawdown").unwrap() - 50.0).abs() < 1e-9,
            "{d}"
        );
    }

    #[test]
    fn folders_expand_to_sorted_csvs() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b.csv", "a.CSV", "notes.txt"] {
            std::fs::write(dir.path().join(n), "x").unwrap();
        }
        let (files, any_dir) = collect_files(&[dir.path().to_path_buf()]).unwrap();
        assert!(any_dir);
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, ["a.CSV", "b.csv"]);
        let empty = tempfile::tempdir().unwrap();
        assert!(collect_files(&[empty.path().to_path_buf()]).is_err());
        assert!(collect_files(&[dir.path().join("missing.csv")]).is_err());
    }
}
