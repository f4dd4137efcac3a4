//! `mtx optimize`: one portfolio optimisation run over the strategies that
//! are ACTIVE and `include_in_optimization` in `strategy_configurations`,
//! using their `strategy_backtest_data` series **joined on date** (inner
//! join: only days every strategy has; the window is printed and stored).
//!
//! Stores, in the trading database:
//!
//! - a `portfolio_optimization_runs` document: `_id` (the ObjectId of the
//!   12-byte digest the `run_id` carries), `run_id`, `timestamp`,
//!   `algorithm`, `strategies_used`, `data_window` {`start_date`,
//!   `end_date`, `total_days`}, `correlation_matrix` and `covariance_matrix`
//!   (rows/columns in `strategies_used` order), `mean_returns_daily`,
//!   `constraints` {`max_leverage`, `max_single_strategy`,
//!   `risk_free_rate` (per day)}, `optimization_result` {`success`,
//!   `message`, `converged`, `iterations`}, `recommended_allocations`
//!   (strategy → percent of equity, Decimal128), `weights` (the solver's
//!   fractions, doubles), `portfolio_metrics` (daily and annualised, doubles),
//!   `details` (algorithm-specific figures), `allocation_id`,
//!   `execution_time_ms`, `created_at`;
//! - when the solve succeeded, a `portfolio_allocations` document with
//!   status `PENDING_APPROVAL`, whose `allocation_id` is derived from the
//!   `run_id` (`alloc_` + hash), the same percentages, `expected_metrics`,
//!   `optimization_run_id` = the run's `_id` as hex (the seed's reference),
//!   and a copy of the constraints
//!   (which later edits are checked against).
//!
//! A run whose solver fails is still recorded (`success: false`, no
//! allocation) and the command exits 1. Percentages keep 4 decimals and are
//! rounded so that their sum stays exactly at the leverage target and none
//! exceeds the cap (`mtx_portfolio::percent`).
//!
//! `--report <dir>` also writes `allocation.svg`, `correlation.svg` and
//! `frontier.svg` (efficient frontier with the chosen allocation, the
//! minimum-variance and the equal-weight portfolios).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bson::{doc, Bson, Document};
use chrono::NaiveDate;
use clap::Args;
use futures::TryStreamExt;
use mtx_portfolio::backtest::{compute_stats, TRADING_DAYS_PER_YEAR};
use mtx_portfolio::optimize::{
    efficient_frontier, portfolio_metrics, to_nested, CagrParams, Constraints, CvarParams,
    OptimizeError, PortfolioMetrics, ReturnMoments,
};
use mtx_portfolio::percent::{percent_metrics, weights_to_percent};
use mtx_portfolio::report::{
    allocation_bars_svg, correlation_heatmap_svg, frontier_svg, MarkedPoint,
};
use mtx_portfolio::{align, Algorithm, AlignedReturns, RunParams, StrategyBacktest};
use mtx_runtime::config::Config;
use mtx_schemas::ids::derive_id;
use mtx_schemas::StrategyStatus;
use mtx_sink::spec::names;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::json;

use crate::cmd_allocations::{
    allocation_doc, constraints_doc, metrics_doc, pcts_doc, NewAllocation,
};
use crate::cmd_portfolio::{bdate, bday, get_str, json_to_bson, now_millis, print_table, Mongo};

/// `mtx optimize` arguments.
#[derive(Args, Debug, Clone)]
pub struct OptimizeArgs {
    /// max-sharpe | min-cvar | hrp | max-cagr.
    #[arg(long, default_value = "max-sharpe")]
    pub algorithm: Algorithm,
    /// Total allocation as a multiple of equity (2.0 = 200 %); the
    /// optimisers allocate exactly this much.
    #[arg(long, default_value_t = 2.0)]
    pub max_leverage: f64,
    /// Largest allocation of one strategy as a fraction of equity (0.5 = 50 %).
    #[arg(long, default_value_t = 0.5)]
    pub max_single: f64,
    /// Risk-free rate per day, decimal (0.0001 = 1 bp a day), for Sharpe ratios.
    #[arg(long, default_value_t = 0.0)]
    pub risk_free: f64,
    /// min-cvar: confidence level (0.95 = the worst 5 % of days).
    #[arg(long, default_value_t = 0.95)]
    pub cvar_confidence: f64,
    /// max-cagr: largest allowed drawdown as a fraction (0.2 = 20 %); none by default.
    #[arg(long)]
    pub max_drawdown: Option<f64>,
    /// Fewest common days of history the run may use (never fewer than the
    /// number of strategies plus one); a shorter window is refused.
    #[arg(long, default_value_t = mtx_portfolio::MIN_COMMON_DAYS)]
    pub min_days: usize,
    /// Write allocation.svg, correlation.svg and frontier.svg into this folder.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Points of the efficient frontier in the report.
    #[arg(long, default_value_t = 25)]
    pub frontier_points: usize,
    /// Notes stored with the allocation.
    #[arg(long)]
    pub notes: Option<String>,
    /// Print one JSON object (run id, allocation id, window, percentages, metrics).
    #[arg(long)]
    pub json: bool,
}

impl OptimizeArgs {
    fn params(&self) -> RunParams {
        RunParams {
            algorithm: self.algorithm,
            constraints: Constraints {
                max_leverage: self.max_leverage,
                max_single_strategy: self.max_single,
                risk_free_rate: self.risk_free,
            },
            cvar: CvarParams {
                confidence: self.cvar_confidence,
                min_expected_return: None,
            },
            cagr: CagrParams {
                max_drawdown: self.max_drawdown,
            },
            min_days: self.min_days,
        }
    }
}

/// The ACTIVE strategies flagged `include_in_optimization`, by id.
async fn universe(mongo: &Mongo) -> Result<Vec<String>> {
    let label = mongo.label(names::STRATEGY_CONFIGURATIONS);
    let docs: Vec<Document> = mongo
        .coll(names::STRATEGY_CONFIGURATIONS)
        .find(doc! { "include_in_optimization": true })
        .sort(doc! { "strategy_id": 1 })
        .await
        .with_context(|| format!("reading {label}"))?
        .try_collect()
        .await
        .with_context(|| format!("reading {label}"))?;
    // Status compared case-insensitively: other tools may not uppercase it.
    let mut ids: Vec<String> = docs
        .iter()
        .filter(|d| {
            get_str(d, "status")
                .and_then(|s| s.parse::<StrategyStatus>().ok())
                .is_some_and(|s| s == StrategyStatus::Active)
        })
        .filter_map(|d| get_str(d, "strategy_id").map(str::to_string))
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// One stored backtest as the optimiser's input type.
fn backtest_from_doc(d: &Document) -> Result<StrategyBacktest> {
    let id = get_str(d, "strategy_id").unwrap_or("?").to_string();
    let dates: Vec<NaiveDate> = match d.get("dates") {
        Some(Bson::Array(a)) => a
            .iter()
            .map(|b| match b {
                Bson::DateTime(t) => Ok(t.to_chrono().date_naive()),
                other => bail!("{id}: `dates` holds {other}, not a date"),
            })
            .collect::<Result<_>>()?,
        _ => bail!(
            "{id}: the backtest document has no `dates` (written by another tool?); \
             re-ingest it with `mtx backtest ingest`"
        ),
    };
    let daily_returns: Vec<f64> = match d.get("daily_returns") {
        Some(Bson::Array(a)) => a
            .iter()
            .map(|b| {
                crate::cmd_portfolio::bson_f64(b)
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| anyhow::anyhow!("{id}: `daily_returns` holds {b}"))
            })
            .collect::<Result<_>>()?,
        _ => bail!("{id}: the backtest document has no `daily_returns`"),
    };
    if dates.len() != daily_returns.len() {
        bail!(
            "{id}: {} dates but {} daily returns; re-ingest it",
            dates.len(),
            daily_returns.len()
        );
    }
    let stats = compute_stats(&dates, &daily_returns)
        .with_context(|| format!("{id}: fewer than 2 daily returns"))?;
    Ok(StrategyBacktest {
        strategy_id: id,
        dates,
        daily_returns,
        margin_per_unit: None,
        stats,
    })
}

/// Load the series of `ids` (all must exist), in the order of `ids`.
async fn load_series(mongo: &Mongo, ids: &[String]) -> Result<Vec<StrategyBacktest>> {
    let label = mongo.label(names::STRATEGY_BACKTEST_DATA);
    let docs: Vec<Document> = mongo
        .coll(names::STRATEGY_BACKTEST_DATA)
        .find(doc! { "strategy_id": { "$in": ids.to_vec() } })
        .projection(doc! { "strategy_id": 1, "dates": 1, "daily_returns": 1 })
        .await
        .with_context(|| format!("reading {label}"))?
        .try_collect()
        .await
        .with_context(|| format!("reading {label}"))?;
    let mut by_id: BTreeMap<String, StrategyBacktest> = BTreeMap::new();
    for d in &docs {
        let bt = backtest_from_doc(d)?;
        by_id.insert(bt.strategy_id.clone(), bt);
    }
    let missing: Vec<&str> = ids
        .iter()
        .filter(|id| !by_id.contains_key(*id))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        bail!(
            "no backtest data in {label} for: {} (ingest it with `mtx backtest ingest`, or \
             `mtx strategies set <id> --include-in-optimization false`)",
            missing.join(", ")
        );
    }
    Ok(ids.iter().filter_map(|id| by_id.remove(id)).collect())
}

fn window_doc(al: &AlignedReturns) -> Document {
    let w = al.window();
    doc! {
        "start_date": bday(w.first),
        "end_date": bday(w.last),
        "total_days": w.count as i64,
    }
}

/// Run `mtx optimize`.
pub async fn run(a: OptimizeArgs, cfg: &Config) -> Result<ExitCode> {
    let params = a.params();
    let c = params.constraints;
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the report folder {}", dir.display()))?;
    }
    let mongo = Mongo::connect(cfg).await?;
    let ids = universe(&mongo).await?;
    if ids.is_empty() {
        bail!(
            "no strategy in {} is ACTIVE with include_in_optimization (see `mtx strategies list`)",
            mongo.label(names::STRATEGY_CONFIGURATIONS)
        );
    }
    c.validate(ids.len())
        .with_context(|| format!("{} strategies", ids.len()))?;

    let series = load_series(&mongo, &ids).await?;
    // execution_time_ms: alignment, moments and the solve (not the reads).
    let started = Instant::now();
    let refs: Vec<&StrategyBacktest> = series.iter().collect();
    let aligned = align(&refs).context("aligning the strategies' returns on date")?;
    let window = aligned.window();
    let moments = ReturnMoments::from_aligned(&aligned).context("estimating the moments")?;
    let outcome = mtx_portfolio::run(&aligned, &moments, &params);
    let elapsed_ms = started.elapsed().as_millis() as i64;

    let now = now_millis();
    let run_id = derive_id(
        "run",
        &[
            params.algorithm.as_str(),
            &c.max_leverage.to_string(),
            &c.max_single_strategy.to_string(),
            &c.risk_free_rate.to_string(),
            &ids.join(","),
            &window.first.to_string(),
            &window.last.to_string(),
            &window.count.to_string(),
            &now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ],
    );
    let run_oid = crate::cmd_allocations::run_object_id(&run_id)?;
    let run_ref = run_oid.to_hex();
    let corr = moments.correlation();
    let mut run_doc = doc! {
        "_id": run_oid,
        "run_id": &run_id,
        "timestamp": bdate(now),
        "algorithm": params.algorithm.as_str(),
        "strategies_used": ids.clone(),
        "data_window": window_doc(&aligned),
        "correlation_matrix": to_nested(&corr),
        "covariance_matrix": to_nested(&moments.cov),
        "mean_returns_daily": moments.mean.to_vec(),
        "constraints": constraints_doc(&c),
        "execution_time_ms": elapsed_ms,
        "created_at": bdate(now),
    };
    if params.algorithm == Algorithm::MinCvar {
        run_doc.insert("cvar_confidence", params.cvar.confidence);
    }
    let runs = mongo.coll(names::PORTFOLIO_OPTIMIZATION_RUNS);

    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            let iterations = match &e {
                OptimizeError::NotSolved { iterations, .. } => i64::from(*iterations),
                _ => 0,
            };
            run_doc.insert(
                "optimization_result",
                doc! { "success": false, "message": e.to_string(), "converged": false, "iterations": iterations },
            );
            runs.insert_one(&run_doc).await.with_context(|| {
                format!(
                    "storing the failed run in {}",
                    mongo.label(names::PORTFOLIO_OPTIMIZATION_RUNS)
                )
            })?;
            eprintln!("run {run_id} recorded as unsuccessful");
            bail!("{} failed: {e}", params.algorithm);
        }
    };
    let alloc = &outcome.allocation;
    let pcts = weights_to_percent(&alloc.strategy_ids, &alloc.weights, c.max_single_strategy)
        .context("converting weights to percentages")?;
    let success = alloc.solve.success;
    let allocation_id = derive_id("alloc", &[&run_id]);
    run_doc.insert(
        "optimization_result",
        doc! {
            "success": success,
            "message": &alloc.solve.message,
            "converged": alloc.solve.converged,
            "iterations": i64::from(alloc.solve.iterations),
        },
    );
    run_doc.insert("recommended_allocations", pcts_doc(&pcts));
    run_doc.insert(
        "weights",
        alloc
            .strategy_ids
            .iter()
            .zip(&alloc.weights)
            .map(|(id, w)| (id.clone(), Bson::Double(*w)))
            .collect::<Document>(),
    );
    run_doc.insert("portfolio_metrics", metrics_doc(&alloc.metrics));
    run_doc.insert(
        "details",
        json_to_bson(&serde_json::to_value(&outcome.details)?),
    );
    if success {
        run_doc.insert("allocation_id", &allocation_id);
    }
    runs.insert_one(&run_doc).await.with_context(|| {
        format!(
            "storing the run in {}",
            mongo.label(names::PORTFOLIO_OPTIMIZATION_RUNS)
        )
    })?;
    if !success {
        eprintln!(
            "run {run_id} recorded; no allocation created: {}",
            alloc.solve.message
        );
        bail!(
            "{} did not solve to full accuracy: {}",
            params.algorithm,
            alloc.solve.message
        );
    }

    let expected = percent_metrics(
        &moments.strategy_ids,
        &moments.mean,
        &moments.cov,
        &pcts,
        c.risk_free_rate,
    )?;
    let new = NewAllocation {
        allocation_id: &allocation_id,
        run_id: &run_ref,
        algorithm: params.algorithm.as_str(),
        pcts: &pcts,
        metrics: &expected,
        constraints: &c,
        notes: a.notes.clone(),
        derived_from: None,
        now,
    };
    mongo
        .coll(names::PORTFOLIO_ALLOCATIONS)
        .insert_one(allocation_doc(&new))
        .await
        .with_context(|| {
            format!(
                "storing the allocation in {} (run {run_id} is stored)",
                mongo.label(names::PORTFOLIO_ALLOCATIONS)
            )
        })?;

    if a.json {
        let out = json!({
            "run_id": run_id,
            "allocation_id": allocation_id,
            "status": "PENDING_APPROVAL",
            "algorithm": params.algorithm.as_str(),
            "strategies": ids,
            "window": { "start_date": window.first.to_string(), "end_date": window.last.to_string(), "days": window.count },
            "allocations": pcts.iter().map(|(k, v)| (k.clone(), json!(v.to_string()))).collect::<serde_json::Map<_, _>>(),
            "metrics": serde_json::to_value(alloc.metrics)?,
            "iterations": alloc.solve.iterations,
            "execution_time_ms": elapsed_ms,
        });
        println!("{out}");
    } else {
        print_summary(&params, &aligned, &pcts, &alloc.metrics, elapsed_ms);
        println!(
            "solver: {} ({} iterations)",
            alloc.solve.message, alloc.solve.iterations
        );
        println!(
            "run {run_id} stored in {}",
            mongo.label(names::PORTFOLIO_OPTIMIZATION_RUNS)
        );
        println!(
            "allocation {allocation_id} PENDING_APPROVAL stored in {}",
            mongo.label(names::PORTFOLIO_ALLOCATIONS)
        );
        println!("approve it with: mtx allocations approve {allocation_id} --by <you>");
    }

    if let Some(dir) = &a.report {
        let files = write_report(
            dir,
            &params,
            &moments,
            &pcts,
            &alloc.metrics,
            a.frontier_points,
        )
        .with_context(|| {
            format!("writing the report (run {run_id} and allocation {allocation_id} are stored)")
        })?;
        if !a.json {
            for f in files {
                println!("wrote {}", f.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(
    params: &RunParams,
    aligned: &AlignedReturns,
    pcts: &BTreeMap<String, Decimal>,
    m: &PortfolioMetrics,
    elapsed_ms: i64,
) {
    let w = aligned.window();
    let c = &params.constraints;
    println!(
        "{} over {} strategies, common window {} → {} ({} days, inner join on date)",
        params.algorithm,
        aligned.n_strategies(),
        w.first,
        w.last,
        w.count
    );
    println!(
        "constraints: Σ = {} % of equity, ≤ {} % per strategy, risk-free {} per day",
        100.0 * c.max_leverage,
        100.0 * c.max_single_strategy,
        c.risk_free_rate
    );
    let mut rows: Vec<(&String, &Decimal)> = pcts.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    print_table(
        &["STRATEGY", "ALLOCATION %"],
        &rows
            .iter()
            .map(|(k, v)| vec![(*k).clone(), format!("{v:.4}")])
            .collect::<Vec<_>>(),
    );
    println!(
        "expected: return {:.4} %/day ({:.2} %/yr), volatility {:.4} %/day ({:.2} %/yr), \
         Sharpe {:.4} daily / {:.3} annual; total {:.2} % (leverage {:.2}); {} ms",
        100.0 * m.expected_daily_return,
        100.0 * m.expected_daily_return * TRADING_DAYS_PER_YEAR,
        100.0 * m.expected_daily_volatility,
        100.0 * m.expected_daily_volatility * TRADING_DAYS_PER_YEAR.sqrt(),
        m.expected_sharpe_daily,
        m.expected_sharpe_annual,
        m.total_allocation_pct,
        m.leverage_ratio,
        elapsed_ms
    );
}

/// Write the three charts; returns the files written.
fn write_report(
    dir: &Path,
    params: &RunParams,
    moments: &ReturnMoments,
    pcts: &BTreeMap<String, Decimal>,
    chosen: &PortfolioMetrics,
    frontier_points: usize,
) -> Result<Vec<PathBuf>> {
    let c = &params.constraints;
    let mut bars: Vec<(String, f64)> = pcts
        .iter()
        .map(|(k, v)| (k.clone(), v.to_f64().unwrap_or(0.0)))
        .collect();
    bars.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let title = format!(
        "{} allocation (Σ {:.0} %, cap {:.0} %)",
        params.algorithm,
        100.0 * c.max_leverage,
        100.0 * c.max_single_strategy
    );
    let alloc_svg = allocation_bars_svg(&title, &bars, 100.0 * c.max_single_strategy)?;
    let corr_svg = correlation_heatmap_svg(
        "Correlation of daily returns (common window)",
        &moments.strategy_ids,
        &to_nested(&moments.correlation()),
    )?;
    let points = efficient_frontier(moments, c, frontier_points.max(2))
        .context("computing the efficient frontier")?;
    let n = moments.n();
    let equal = vec![c.max_leverage / n as f64; n];
    let eq = portfolio_metrics(&moments.mean, &moments.cov, &equal, c.risk_free_rate);
    let mut marked = vec![MarkedPoint {
        label: params.algorithm.to_string(),
        daily_return: chosen.expected_daily_return,
        daily_volatility: chosen.expected_daily_volatility,
    }];
    if let Some(gmv) = points.first() {
        marked.push(MarkedPoint {
            label: "min variance".into(),
            daily_return: gmv.expected_daily_return,
            daily_volatility: gmv.volatility_daily,
        });
    }
    marked.push(MarkedPoint {
        label: "equal weight".into(),
        daily_return: eq.expected_daily_return,
        daily_volatility: eq.expected_daily_volatility,
    });
    let frontier = frontier_svg(
        &format!(
            "Efficient frontier (Σ {:.0} %, cap {:.0} %)",
            100.0 * c.max_leverage,
            100.0 * c.max_single_strategy
        ),
        &points,
        &marked,
    )?;
    let mut out = Vec::new();
    for (name, body) in [
        ("allocation.svg", alloc_svg),
        ("correlation.svg", corr_svg),
        ("frontier.svg", frontier),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backtest_documents_decode_and_need_dates() {
        let day = |d: u32| bday(NaiveDate::from_ymd_opt(2024, 1, d).unwrap());
        let d = doc! {
            "strategy_id": "A",
            "dates": [day(2), day(3), day(4)],
            "daily_returns": [0.01, -0.02, 0.005],
        };
        let bt = backtest_from_doc(&d).unwrap();
        assert_eq!(bt.dates.len(), 3);
        assert_eq!(bt.stats.total_days, 3);
        let no_dates = doc! { "strategy_id": "B", "daily_returns": [0.01, 0.02] };
        assert!(backtest_from_doc(&no_dates)
            .unwrap_err()
            .to_string()
            .contains("re-ingest"));
        let short = doc! { "strategy_id": "C", "dates": [day(2)], "daily_returns": [0.01, 0.02] };
        assert!(backtest_from_doc(&short).is_err());
    }
}
