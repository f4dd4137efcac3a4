//! `mtx allocations list | show | approve | edit`: the portfolio allocations
//! (`<trading_db>.portfolio_allocations`, seed 000) and the ACTIVE one's
//! mirror in KV (`allocations` bucket, key `active`, the JSON of
//! [`mtx_cerebro::ActiveAllocation`]) that Cerebro sizes every signal with.
//!
//! Lifecycle: `mtx optimize` creates an allocation as `PENDING_APPROVAL`.
//!
//! - `approve <id> --by <user>` makes it `ACTIVE` (`approved_by`,
//!   `approved_at`), turns the previously ACTIVE allocation(s) `ARCHIVED`
//!   (`archived_at`), then puts `{allocation_id, allocations}` into KV
//!   `allocations/active`: Cerebro applies it to the next signal, without a
//!   restart. Mongo is written first; approving the allocation that is
//!   already ACTIVE repeats the archive and KV steps (the repair after a
//!   failed KV write). Before approving, the percentages are checked against
//!   the allocation's constraints again.
//! - `edit <id> --set STRATEGY=PCT ...` changes percentages, checked against
//!   the constraints the allocation was optimised with (each ≥ 0 and ≤
//!   100 × max_single_strategy, the sum ≤ 100 × max_leverage; edits may
//!   de-lever but never exceed the target), only for strategies of the run.
//!   The expected metrics are recomputed from the run's stored moments.
//!   **A `PENDING_APPROVAL` allocation is edited in place. An `ACTIVE` or
//!   `ARCHIVED` one is never changed: the edit creates a new
//!   `PENDING_APPROVAL` allocation** (`derived_from` = the source, id derived
//!   from the source id and the edit, so repeating the same edit is refused
//!   as a duplicate), which then goes through `approve` like any other. The
//!   edit is appended to `notes`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use futures::TryStreamExt;
use mtx_cerebro::worker::ALLOCATION_KEY;
use mtx_cerebro::ActiveAllocation;
use mtx_portfolio::backtest::TRADING_DAYS_PER_YEAR;
use mtx_portfolio::optimize::{Constraints, PortfolioMetrics};
use mtx_portfolio::percent::{
    apply_edits, percent_metrics_from_rows, total_percent, validate_percentages, PercentLimits,
};
use mtx_runtime::config::Config;
use mtx_schemas::ids::derive_id;
use mtx_schemas::{AllocationStatus, StrategyStatus};
use mtx_sink::spec::names;
use mtx_subjects::topology::buckets;
use rust_decimal::Decimal;

use crate::cmd_portfolio::{
    bdate, bdec, bson_decimal, bson_f64, default_user, doc_to_json, ensure_matched, get_datetime,
    get_f64, get_str, kv_bucket, kv_put_json, now_millis, print_table, Mongo,
};

/// `mtx allocations ...`
#[derive(Subcommand)]
pub enum AllocationsCmd {
    /// Allocations, newest first.
    List {
        /// Only PENDING_APPROVAL | ACTIVE | ARCHIVED.
        #[arg(long)]
        status: Option<AllocationStatus>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One allocation with its percentages and expected metrics.
    Show {
        /// Its `allocation_id`.
        allocation_id: String,
        /// The stored document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make an allocation ACTIVE (the previous ACTIVE one becomes ARCHIVED)
    /// and hand it to Cerebro through KV `allocations/active`.
    Approve {
        /// Its `allocation_id`.
        allocation_id: String,
        /// Who approves (stored as `approved_by`).
        #[arg(long)]
        by: String,
        /// Appended to the allocation's notes.
        #[arg(long)]
        notes: Option<String>,
    },
    /// Change percentages: in place while PENDING_APPROVAL, else as a new
    /// PENDING_APPROVAL allocation derived from it.
    Edit {
        /// Its `allocation_id`.
        allocation_id: String,
        /// `STRATEGY=PERCENT` (e.g. `SPX_1-D_Opt=35.5`), repeatable.
        #[arg(long = "set", value_name = "STRATEGY=PCT", required = true)]
        sets: Vec<String>,
        /// Who edits (recorded in the notes; default $USER).
        #[arg(long)]
        by: Option<String>,
        /// Appended to the notes with the edit.
        #[arg(long)]
        notes: Option<String>,
    },
}

/// Run an `allocations` subcommand.
pub async fn run(cmd: AllocationsCmd, cfg: &Config) -> Result<ExitCode> {
    let mongo = Mongo::connect(cfg).await?;
    match cmd {
        AllocationsCmd::List {
            status,
            limit,
            json,
        } => list(&mongo, status, limit, json).await,
        AllocationsCmd::Show {
            allocation_id,
            json,
        } => show(cfg, &mongo, &allocation_id, json).await,
        AllocationsCmd::Approve {
            allocation_id,
            by,
            notes,
        } => approve(cfg, &mongo, &allocation_id, &by, notes).await,
        AllocationsCmd::Edit {
            allocation_id,
            sets,
            by,
            notes,
        } => {
            let edits = parse_sets(&sets)?;
            let by = by.unwrap_or_else(default_user);
            edit(&mongo, &allocation_id, &edits, &by, notes).await
        }
    }
}

// --------------------------------------------------------------- documents

/// Everything a new `portfolio_allocations` document holds.
pub struct NewAllocation<'a> {
    /// `allocation_id`.
    pub allocation_id: &'a str,
    /// `optimization_run_id`: the `_id` (hex) of the run it came from
    /// ([`run_object_id`]), as the seed references runs.
    pub run_id: &'a str,
    /// Algorithm of that run.
    pub algorithm: &'a str,
    /// strategy → percent of equity.
    pub pcts: &'a BTreeMap<String, Decimal>,
    /// Expected metrics of `pcts`.
    pub metrics: &'a PortfolioMetrics,
    /// The constraints it was optimised with (edits are checked against them).
    pub constraints: &'a Constraints,
    /// Initial notes.
    pub notes: Option<String>,
    /// The allocation an edit copied.
    pub derived_from: Option<String>,
    /// Creation time.
    pub now: DateTime<Utc>,
}

/// A PENDING_APPROVAL `portfolio_allocations` document.
pub fn allocation_doc(n: &NewAllocation) -> Document {
    let mut d = doc! {
        "allocation_id": n.allocation_id,
        "timestamp": bdate(n.now),
        "status": AllocationStatus::PendingApproval.as_str(),
        "allocations": pcts_doc(n.pcts),
        "expected_metrics": metrics_doc(n.metrics),
        "optimization_run_id": n.run_id,
        "algorithm": n.algorithm,
        "constraints": constraints_doc(n.constraints),
        "created_at": bdate(n.now),
        "updated_at": bdate(n.now),
    };
    if let Some(notes) = &n.notes {
        d.insert("notes", notes);
    }
    if let Some(src) = &n.derived_from {
        d.insert("derived_from", src);
    }
    d
}

/// strategy → Decimal128 percent.
pub fn pcts_doc(p: &BTreeMap<String, Decimal>) -> Document {
    p.iter().map(|(k, v)| (k.clone(), bdec(*v))).collect()
}

/// The seed's metrics block (doubles), plus the annualised return
/// (× 252) and volatility (× √252) next to the annualised Sharpe ratio.
pub fn metrics_doc(m: &PortfolioMetrics) -> Document {
    doc! {
        "expected_daily_return": m.expected_daily_return,
        "expected_daily_volatility": m.expected_daily_volatility,
        "expected_sharpe_daily": m.expected_sharpe_daily,
        "expected_sharpe_annual": m.expected_sharpe_annual,
        "total_allocation_pct": m.total_allocation_pct,
        "leverage_ratio": m.leverage_ratio,
        "expected_annual_return": m.expected_daily_return * TRADING_DAYS_PER_YEAR,
        "expected_annual_volatility": m.expected_daily_volatility * TRADING_DAYS_PER_YEAR.sqrt(),
    }
}

/// The seed's constraints block (doubles; the risk-free rate is per day).
pub fn constraints_doc(c: &Constraints) -> Document {
    doc! {
        "max_leverage": c.max_leverage,
        "max_single_strategy": c.max_single_strategy,
        "risk_free_rate": c.risk_free_rate,
    }
}

fn constraints_from_doc(d: &Document) -> Result<Constraints> {
    Ok(Constraints {
        max_leverage: get_f64(d, "max_leverage")?,
        max_single_strategy: get_f64(d, "max_single_strategy")?,
        risk_free_rate: d.get("risk_free_rate").and_then(bson_f64).unwrap_or(0.0),
    })
}

/// A stored allocation, decoded.
struct Stored {
    id: String,
    status: AllocationStatus,
    pcts: BTreeMap<String, Decimal>,
    constraints: Option<Constraints>,
    run_id: Option<String>,
    doc: Document,
}

fn decode(d: Document) -> Result<Stored> {
    let id = get_str(&d, "allocation_id")
        .ok_or_else(|| anyhow!("allocation document without allocation_id"))?
        .to_string();
    let status = get_str(&d, "status")
        .ok_or_else(|| anyhow!("{id}: no status"))?
        .parse::<AllocationStatus>()
        .with_context(|| format!("{id}: status"))?;
    let mut pcts = BTreeMap::new();
    if let Ok(a) = d.get_document("allocations") {
        for (k, v) in a {
            let p = bson_decimal(v).ok_or_else(|| anyhow!("{id}: allocations.{k} is {v}"))?;
            pcts.insert(k.clone(), p);
        }
    }
    let constraints = match d.get_document("constraints") {
        Ok(c) => Some(constraints_from_doc(c).with_context(|| format!("{id}: constraints"))?),
        Err(_) => None,
    };
    Ok(Stored {
        status,
        pcts,
        constraints,
        run_id: get_str(&d, "optimization_run_id").map(str::to_string),
        id,
        doc: d,
    })
}

async fn find(mongo: &Mongo, id: &str) -> Result<Stored> {
    let label = mongo.label(names::PORTFOLIO_ALLOCATIONS);
    let d = mongo
        .coll(names::PORTFOLIO_ALLOCATIONS)
        .find_one(doc! { "allocation_id": id })
        .await
        .with_context(|| format!("reading {label}"))?
        .ok_or_else(|| anyhow!("no allocation {id:?} in {label}"))?;
    decode(d)
}

/// The run's constraints when the allocation has none, and its moments.
struct RunInfo {
    constraints: Option<Constraints>,
    ids: Vec<String>,
    mean: Vec<f64>,
    cov: Vec<Vec<f64>>,
}

/// A run's `_id`: the 12-byte digest its `run_id` (`run_<24 hex>`) already
/// carries, so the document id is derived, never random, and an
/// allocation's `optimization_run_id` (the seed: a reference to
/// `portfolio_optimization_runs._id`) names it.
pub fn run_object_id(run_id: &str) -> Result<bson::oid::ObjectId> {
    let hex = run_id.strip_prefix("run_").unwrap_or(run_id);
    bson::oid::ObjectId::parse_str(hex)
        .map_err(|e| anyhow!("run id {run_id} carries no 12-byte digest: {e}"))
}

async fn run_info(mongo: &Mongo, run_id: &str) -> Result<Option<RunInfo>> {
    // The run's `_id` (hex); allocations stored by older builds hold its
    // `run_id`.
    let filter = match bson::oid::ObjectId::parse_str(run_id) {
        Ok(oid) => doc! { "_id": oid },
        Err(_) => doc! { "run_id": run_id },
    };
    let Some(d) = mongo
        .coll(names::PORTFOLIO_OPTIMIZATION_RUNS)
        .find_one(filter)
        .await
        .with_context(|| format!("reading run {run_id}"))?
    else {
        return Ok(None);
    };
    let strs = |key: &str| -> Vec<String> {
        d.get_array(key)
            .map(|a| {
                a.iter()
                    .filter_map(|b| b.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let nums = |b: &Bson| -> Vec<f64> {
        b.as_array()
            .map(|a| a.iter().filter_map(bson_f64).collect())
            .unwrap_or_default()
    };
    Ok(Some(RunInfo {
        constraints: d
            .get_document("constraints")
            .ok()
            .and_then(|c| constraints_from_doc(c).ok()),
        ids: strs("strategies_used"),
        mean: d.get("mean_returns_daily").map(nums).unwrap_or_default(),
        cov: d
            .get_array("covariance_matrix")
            .map(|rows| rows.iter().map(nums).collect())
            .unwrap_or_default(),
    }))
}

/// `STRATEGY=PCT` arguments → edits.
fn parse_sets(sets: &[String]) -> Result<BTreeMap<String, Decimal>> {
    let mut out = BTreeMap::new();
    for s in sets {
        let (id, pct) = s
            .rsplit_once('=')
            .ok_or_else(|| anyhow!("--set {s:?}: expected STRATEGY=PERCENT"))?;
        let id = id.trim();
        if id.is_empty() {
            bail!("--set {s:?}: no strategy id");
        }
        let p = Decimal::from_str(pct.trim())
            .map_err(|e| anyhow!("--set {s:?}: {pct:?} is not a percentage ({e})"))?;
        if out.insert(id.to_string(), p.normalize()).is_some() {
            bail!("--set: {id} given twice");
        }
    }
    Ok(out)
}

fn pct_str(p: &Decimal) -> String {
    p.normalize().to_string()
}

fn append_note(old: Option<&str>, line: &str) -> String {
    match old {
        Some(o) if !o.trim().is_empty() => format!("{o}\n{line}"),
        _ => line.to_string(),
    }
}

// --------------------------------------------------------------- commands

async fn list(
    mongo: &Mongo,
    status: Option<AllocationStatus>,
    limit: i64,
    json: bool,
) -> Result<ExitCode> {
    let filter = match status {
        Some(s) => doc! { "status": s.as_str() },
        None => doc! {},
    };
    let label = mongo.label(names::PORTFOLIO_ALLOCATIONS);
    let docs: Vec<Document> = mongo
        .coll(names::PORTFOLIO_ALLOCATIONS)
        .find(filter)
        .sort(doc! { "timestamp": -1, "allocation_id": 1 })
        .limit(limit.max(1))
        .await
        .with_context(|| format!("reading {label}"))?
        .try_collect()
        .await
        .with_context(|| format!("reading {label}"))?;
    if json {
        for d in &docs {
            println!("{}", doc_to_json(d));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = Vec::new();
    for d in docs {
        let ts = get_datetime(&d, "timestamp");
        let approved = get_str(&d, "approved_by").map(str::to_string);
        let sharpe = d
            .get_document("expected_metrics")
            .ok()
            .and_then(|m| m.get("expected_sharpe_annual").and_then(bson_f64));
        let s = decode(d)?;
        let nonzero = s.pcts.values().filter(|p| !p.is_zero()).count();
        rows.push(vec![
            s.id,
            s.status.to_string(),
            ts.map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string()),
            format!("{} %", pct_str(&total_percent(&s.pcts))),
            format!("{nonzero}/{}", s.pcts.len()),
            sharpe.map_or_else(|| "-".into(), |x| format!("{x:.3}")),
            approved.unwrap_or_else(|| "-".into()),
        ]);
    }
    print_table(
        &[
            "ALLOCATION",
            "STATUS",
            "TIMESTAMP (UTC)",
            "TOTAL",
            "STRATEGIES",
            "SHARPE(ANN)",
            "APPROVED BY",
        ],
        &rows,
    );
    Ok(ExitCode::SUCCESS)
}

async fn show(cfg: &Config, mongo: &Mongo, id: &str, json: bool) -> Result<ExitCode> {
    let s = find(mongo, id).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc_to_json(&s.doc))?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("allocation {}  {}", s.id, s.status);
    for key in [
        "optimization_run_id",
        "algorithm",
        "derived_from",
        "approved_by",
    ] {
        if let Some(v) = get_str(&s.doc, key) {
            println!("{key}: {v}");
        }
    }
    for key in [
        "timestamp",
        "approved_at",
        "archived_at",
        "created_at",
        "updated_at",
    ] {
        if let Some(t) = get_datetime(&s.doc, key) {
            println!("{key}: {}", t.to_rfc3339());
        }
    }
    if let Some(c) = &s.constraints {
        println!(
            "constraints: Σ ≤ {} %, ≤ {} % per strategy, risk-free {} per day",
            100.0 * c.max_leverage,
            100.0 * c.max_single_strategy,
            c.risk_free_rate
        );
    }
    let mut rows: Vec<(&String, &Decimal)> = s.pcts.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    print_table(
        &["STRATEGY", "ALLOCATION %"],
        &rows
            .iter()
            .map(|(k, v)| vec![(*k).clone(), pct_str(v)])
            .collect::<Vec<_>>(),
    );
    println!("total: {} %", pct_str(&total_percent(&s.pcts)));
    if let Ok(m) = s.doc.get_document("expected_metrics") {
        let f = |k: &str| m.get(k).and_then(bson_f64);
        if let (Some(r), Some(v), Some(sd), Some(sa)) = (
            f("expected_daily_return"),
            f("expected_daily_volatility"),
            f("expected_sharpe_daily"),
            f("expected_sharpe_annual"),
        ) {
            println!(
                "expected: return {:.4} %/day, volatility {:.4} %/day, Sharpe {sd:.4} daily / {sa:.3} annual",
                100.0 * r,
                100.0 * v
            );
        }
    }
    if let Some(n) = get_str(&s.doc, "notes") {
        println!("notes:\n{n}");
    }
    if s.status == AllocationStatus::Active {
        let state = match kv_bucket(cfg, buckets::ALLOCATIONS).await {
            Err(e) => format!("unknown ({e:#})"),
            Ok(kv) => match kv.entry(ALLOCATION_KEY).await {
                Err(e) => format!("unknown ({e})"),
                Ok(None) => "MISSING (approve it again to re-mirror)".into(),
                Ok(Some(entry)) => match serde_json::from_slice::<ActiveAllocation>(&entry.value) {
                    Ok(a) if a.allocation_id == s.id && a.allocations == s.pcts => {
                        format!("in sync (revision {})", entry.revision)
                    }
                    Ok(a) => format!(
                        "holds {} (revision {}); approve {} again to re-mirror",
                        a.allocation_id, entry.revision, s.id
                    ),
                    Err(e) => format!("unreadable ({e})"),
                },
            },
        };
        println!("kv allocations/{ALLOCATION_KEY}: {state}");
    }
    Ok(ExitCode::SUCCESS)
}

async fn approve(
    cfg: &Config,
    mongo: &Mongo,
    id: &str,
    by: &str,
    notes: Option<String>,
) -> Result<ExitCode> {
    let by = by.trim();
    if by.is_empty() {
        bail!("--by: name who approves");
    }
    let s = find(mongo, id).await?;
    let coll = mongo.coll(names::PORTFOLIO_ALLOCATIONS);
    let now = now_millis();
    match s.status {
        AllocationStatus::Archived => bail!(
            "allocation {id} is ARCHIVED and cannot be approved again; \
             `mtx allocations edit {id} --set ...` creates a pending copy, or run `mtx optimize`"
        ),
        AllocationStatus::PendingApproval => {
            if let Some(c) = &s.constraints {
                let limits = PercentLimits::from_constraints(c)?;
                validate_percentages(&s.pcts, &limits)
                    .with_context(|| format!("allocation {id} violates its constraints"))?;
            }
            if s.pcts.values().all(|p| p.is_zero()) {
                bail!("allocation {id} allocates nothing");
            }
            let mut set = doc! {
                "status": AllocationStatus::Active.as_str(),
                "approved_by": by,
                "approved_at": bdate(now),
                "updated_at": bdate(now),
            };
            if let Some(n) = &notes {
                set.insert(
                    "notes",
                    append_note(get_str(&s.doc, "notes"), &format!("approved by {by}: {n}")),
                );
            }
            let r = coll
                .update_one(
                    doc! { "allocation_id": id, "status": AllocationStatus::PendingApproval.as_str() },
                    doc! { "$set": set },
                )
                .await
                .with_context(|| format!("approving {id}"))?;
            ensure_matched(r.matched_count, || {
                format!("allocation {id} changed while approving; look at it again (`mtx allocations show {id}`)")
            })?;
            println!("allocation {id} is ACTIVE (approved by {by})");
        }
        AllocationStatus::Active => {
            println!(
                "allocation {id} is already ACTIVE (approved by {}); archiving any other ACTIVE one and re-mirroring",
                get_str(&s.doc, "approved_by").unwrap_or("?")
            );
        }
    }

    // The previous ACTIVE allocation(s) become ARCHIVED.
    let others: Vec<Document> = coll
        .find(doc! { "status": AllocationStatus::Active.as_str(), "allocation_id": { "$ne": id } })
        .await
        .context("reading the ACTIVE allocations")?
        .try_collect()
        .await
        .context("reading the ACTIVE allocations")?;
    let other_ids: Vec<String> = others
        .iter()
        .filter_map(|d| get_str(d, "allocation_id").map(str::to_string))
        .collect();
    if !other_ids.is_empty() {
        coll.update_many(
            doc! { "status": AllocationStatus::Active.as_str(), "allocation_id": { "$in": other_ids.clone() } },
            doc! { "$set": {
                "status": AllocationStatus::Archived.as_str(),
                "archived_at": bdate(now),
                "updated_at": bdate(now),
            } },
        )
        .await
        .context("archiving the previous ACTIVE allocation")?;
        for o in &other_ids {
            println!("allocation {o} is ARCHIVED");
        }
    }

    warn_unroutable(mongo, &s.pcts).await;

    // Then the KV mirror Cerebro watches.
    let active = ActiveAllocation {
        allocation_id: id.to_string(),
        allocations: s.pcts.clone(),
    };
    let kv = kv_bucket(cfg, buckets::ALLOCATIONS).await.with_context(|| {
        format!("Mongo is updated but Cerebro is not; run `mtx allocations approve {id} --by {by}` again once NATS is reachable")
    })?;
    let rev = kv_put_json(&kv, ALLOCATION_KEY, &active)
        .await
        .with_context(|| {
            format!("Mongo is updated but Cerebro is not; run `mtx allocations approve {id} --by {by}` again")
        })?;
    println!(
        "kv allocations/{ALLOCATION_KEY} revision {rev}: Cerebro sizes new signals with {id} (total {} %)",
        pct_str(&total_percent(&s.pcts))
    );
    Ok(ExitCode::SUCCESS)
}

/// Warn about allocated strategies Cerebro would reject (not ACTIVE / not configured).
async fn warn_unroutable(mongo: &Mongo, pcts: &BTreeMap<String, Decimal>) {
    let ids: Vec<&str> = pcts
        .iter()
        .filter(|(_, p)| !p.is_zero())
        .map(|(k, _)| k.as_str())
        .collect();
    let docs: Vec<Document> = match mongo
        .coll(names::STRATEGY_CONFIGURATIONS)
        .find(doc! { "strategy_id": { "$in": ids.clone() } })
        .await
    {
        Ok(c) => c.try_collect().await.unwrap_or_default(),
        Err(_) => return,
    };
    for (id, pct) in pcts.iter().filter(|(_, p)| !p.is_zero()) {
        let status = docs
            .iter()
            .find(|d| get_str(d, "strategy_id") == Some(id.as_str()))
            .and_then(|d| get_str(d, "status"))
            .and_then(|s| s.parse::<StrategyStatus>().ok());
        match status {
            Some(StrategyStatus::Active) | Some(StrategyStatus::Testing) => {}
            Some(other) => eprintln!(
                "warning: {id} has {} % but is {other}; Cerebro rejects its signals",
                pct_str(pct)
            ),
            None => eprintln!(
                "warning: {id} has {} % but no strategy configuration; Cerebro rejects its signals",
                pct_str(pct)
            ),
        }
    }
}

async fn edit(
    mongo: &Mongo,
    id: &str,
    edits: &BTreeMap<String, Decimal>,
    by: &str,
    notes: Option<String>,
) -> Result<ExitCode> {
    let s = find(mongo, id).await?;
    let run = match &s.run_id {
        Some(r) => run_info(mongo, r).await?,
        None => None,
    };
    let constraints = s
        .constraints
        .or_else(|| run.as_ref().and_then(|r| r.constraints))
        .ok_or_else(|| {
            anyhow!(
                "allocation {id} records no constraints (nor does its run); cannot check an edit"
            )
        })?;
    let limits = PercentLimits::from_constraints(&constraints)?;
    let new = apply_edits(&s.pcts, edits)?;
    validate_percentages(&new, &limits)?;
    let changes: Vec<String> = edits
        .iter()
        .filter(|(k, v)| s.pcts.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{k} {} → {}",
                s.pcts.get(k).map_or_else(|| "-".into(), pct_str),
                pct_str(v)
            )
        })
        .collect();
    if changes.is_empty() {
        println!("allocation {id}: nothing to change");
        return Ok(ExitCode::SUCCESS);
    }
    let metrics = match &run {
        Some(r) if !r.ids.is_empty() => Some(percent_metrics_from_rows(
            &r.ids,
            &r.mean,
            &r.cov,
            &new,
            constraints.risk_free_rate,
        )?),
        _ => None,
    };
    let metrics_bson = match &metrics {
        Some(m) => Bson::Document(metrics_doc(m)),
        None => {
            // Without the run's moments only the totals can be recomputed.
            let total = total_percent(&new);
            let t = total.to_string().parse::<f64>().unwrap_or(0.0);
            Bson::Document(doc! { "total_allocation_pct": t, "leverage_ratio": t / 100.0 })
        }
    };
    let mut line = format!("edited by {by}: {}", changes.join(", "));
    if let Some(n) = &notes {
        line.push_str(&format!(" ({n})"));
    }
    let now = now_millis();
    let coll = mongo.coll(names::PORTFOLIO_ALLOCATIONS);
    let target = if s.status == AllocationStatus::PendingApproval {
        let r = coll
            .update_one(
                doc! { "allocation_id": id, "status": AllocationStatus::PendingApproval.as_str() },
                doc! { "$set": {
                    "allocations": pcts_doc(&new),
                    "expected_metrics": metrics_bson,
                    "notes": append_note(get_str(&s.doc, "notes"), &line),
                    "updated_at": bdate(now),
                } },
            )
            .await
            .with_context(|| format!("editing {id}"))?;
        ensure_matched(r.matched_count, || {
            format!("allocation {id} is no longer PENDING_APPROVAL; edit again to create a pending copy")
        })?;
        println!(
            "allocation {id} (PENDING_APPROVAL) edited: {}",
            changes.join(", ")
        );
        id.to_string()
    } else {
        let canonical: Vec<String> = edits.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let new_id = derive_id("alloc", &[id, "edit", &canonical.join(",")]);
        if coll
            .find_one(doc! { "allocation_id": &new_id })
            .await
            .context("reading portfolio_allocations")?
            .is_some()
        {
            bail!("this edit of {id} already exists as allocation {new_id}");
        }
        let mut d = s.doc.clone();
        d.remove("_id");
        for k in ["approved_by", "approved_at", "archived_at"] {
            d.remove(k);
        }
        d.insert("allocation_id", &new_id);
        d.insert("status", AllocationStatus::PendingApproval.as_str());
        d.insert("timestamp", bdate(now));
        d.insert("allocations", pcts_doc(&new));
        d.insert("expected_metrics", metrics_bson);
        d.insert("constraints", constraints_doc(&constraints));
        d.insert("derived_from", id);
        d.insert(
            "notes",
            append_note(
                get_str(&s.doc, "notes"),
                &format!("copy of {id} ({}); {line}", s.status),
            ),
        );
        d.insert("created_at", bdate(now));
        d.insert("updated_at", bdate(now));
        coll.insert_one(d)
            .await
            .with_context(|| format!("storing the edited copy of {id}"))?;
        println!(
            "allocation {id} is {} and stays unchanged; created PENDING_APPROVAL allocation {new_id}: {}",
            s.status,
            changes.join(", ")
        );
        new_id
    };
    println!("total: {} %", pct_str(&total_percent(&new)));
    if let Some(m) = metrics {
        println!(
            "expected Sharpe {:.4} daily / {:.3} annual",
            m.expected_sharpe_daily, m.expected_sharpe_annual
        );
    }
    println!("approve it with: mtx allocations approve {target} --by <you>");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_object_id_is_the_digest_its_run_id_carries() {
        let run_id = derive_id("run", &["max_sharpe", "2.0"]);
        let oid = run_object_id(&run_id).unwrap();
        assert_eq!(format!("run_{}", oid.to_hex()), run_id);
        assert_eq!(run_object_id(&run_id).unwrap(), oid, "derived, not random");
        assert!(run_object_id("run_nothex").is_err());
    }

    #[test]
    fn sets_parse() {
        let e = parse_sets(&["SPX_1-D_Opt=35.5".into(), "TLT = 0".into()]).unwrap();
        assert_eq!(e["SPX_1-D_Opt"], Decimal::new(355, 1));
        assert_eq!(e["TLT"], Decimal::ZERO);
        assert!(parse_sets(&["A".into()]).is_err());
        assert!(parse_sets(&["A=x".into()]).is_err());
        assert!(parse_sets(&["A=1".into(), "A=2".into()]).is_err());
        assert!(parse_sets(&["=1".into()]).is_err());
    }

    #[test]
    fn documents_decode() {
        let pcts: BTreeMap<String, Decimal> = [
            ("A".to_string(), Decimal::new(1255, 1)),
            ("B".to_string(), Decimal::new(745, 1)),
        ]
        .into();
        let m = PortfolioMetrics {
            expected_daily_return: 0.001,
            expected_daily_volatility: 0.01,
            expected_sharpe_daily: 0.1,
            expected_sharpe_annual: 1.58,
            total_allocation_pct: 200.0,
            leverage_ratio: 2.0,
        };
        let c = Constraints {
            max_leverage: 2.0,
            max_single_strategy: 1.5,
            risk_free_rate: 0.0,
        };
        let d = allocation_doc(&NewAllocation {
            allocation_id: "alloc_x",
            run_id: "run_x",
            algorithm: "max-sharpe",
            pcts: &pcts,
            metrics: &m,
            constraints: &c,
            notes: None,
            derived_from: None,
            now: now_millis(),
        });
        let s = decode(d).unwrap();
        assert_eq!(s.status, AllocationStatus::PendingApproval);
        assert_eq!(s.pcts, pcts);
        assert_eq!(s.constraints, Some(c));
        assert_eq!(s.run_id.as_deref(), Some("run_x"));
        assert_eq!(append_note(None, "a"), "a");
        assert_eq!(append_note(Some("a"), "b"), "a\nb");
    }
}
