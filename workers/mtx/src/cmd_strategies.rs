//! `mtx strategies list | show | set | load | sync`: the strategy registry
//! (`<trading_db>.strategy_configurations`, seed 000) and its mirror in the
//! `strategies` KV bucket that the standardizer and Cerebro watch.
//!
//! Mongo is the source of truth: every change is written there first
//! (upsert on `strategy_id`, `created_at` kept, `updated_at` bumped), then
//! the whole configuration is put into KV under
//! `StrategyConfig::kv_key(strategy_id)` as the JSON of
//! [`mtx_schemas::strategy::StrategyConfig`]. If the KV write fails the
//! command fails saying so; `mtx strategies sync` re-mirrors everything.
//!
//! Document fields: the seed's (`strategy_id`, `strategy_name`, `status`
//! ACTIVE/INACTIVE/TESTING, `trading_mode` LIVE/PAPER, `account`,
//! `include_in_optimization`, `risk_limits.max_position_size` /
//! `max_daily_loss` as Decimal128 dollars, `developer_contact`, `notes`,
//! `last_backtest_sync`, `created_at`, `updated_at`) plus what the pipeline
//! needs per strategy: `asset_class`, `sizing_mode`
//! (SENDER_EQUITY_RATIO / TARGET_WEIGHT / DELTA_UNITS / FIXED_UNITS) and
//! `expected_alpha` (Decimal128 fraction). Enum values are written exactly
//! as the seed spells them (uppercase); input is accepted in any case.
//!
//! Validation: a non-empty id without surrounding whitespace that yields a
//! KV key; LIVE trading needs an account; risk limits > 0; expected alpha
//! in [0, 1). Fields not given keep their value; `none` clears an optional
//! field (`--account none`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context, Result};
use bson::{doc, Bson, Document};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use futures::TryStreamExt;
use mtx_runtime::config::Config;
use mtx_schemas::strategy::{RiskLimits, StrategyConfig};
use mtx_schemas::{SizingMode, StrategyStatus, TradingMode};
use mtx_sink::spec::names;
use mtx_subjects::topology::buckets;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::cmd_portfolio::{
    bdate, bdec, doc_to_json, get_str, kv_bucket, kv_put_json, now_millis, print_table, Mongo,
};

/// `mtx strategies ...`
#[derive(Subcommand)]
pub enum StrategiesCmd {
    /// Every strategy configuration, by id.
    List {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One configuration, and whether its KV mirror matches Mongo.
    Show {
        /// Strategy id.
        id: String,
        /// Only the configuration, as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change a strategy's settings (Mongo, then the KV mirror).
    Set(SetArgs),
    /// Create or update strategies from a JSON file: an array of objects with
    /// at least `strategy_id` and any of the configuration fields. Fields an
    /// object leaves out keep their stored value (or the default for a new
    /// strategy: ACTIVE, PAPER, SENDER_EQUITY_RATIO, not optimised).
    Load {
        /// The JSON file (e.g. `tests/fixtures/strategies.json`).
        file: PathBuf,
    },
    /// Put every configuration from Mongo into the KV bucket again (repair).
    Sync,
}

/// A flag value that may also clear the field: `none` (or an empty string).
#[derive(Debug, Clone, PartialEq)]
pub enum Setting<T> {
    /// Set to this value.
    Set(T),
    /// Remove the value.
    Clear,
}

impl<T: FromStr> FromStr for Setting<T>
where
    T::Err: std::fmt::Display,
{
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.is_empty() || t.eq_ignore_ascii_case("none") {
            return Ok(Setting::Clear);
        }
        T::from_str(t).map(Setting::Set).map_err(|e| e.to_string())
    }
}

impl<T> Setting<T> {
    fn into_option(self) -> Option<T> {
        match self {
            Setting::Set(v) => Some(v),
            Setting::Clear => None,
        }
    }
}

/// `mtx strategies set` arguments.
#[derive(Args, Debug, Clone, Default)]
pub struct SetArgs {
    /// Strategy id.
    pub id: String,
    /// Create the strategy if it does not exist (defaults: ACTIVE, PAPER).
    #[arg(long)]
    pub create: bool,
    /// Human-readable name (`none` clears).
    #[arg(long)]
    pub name: Option<Setting<String>>,
    /// Asset class label (`none` clears).
    #[arg(long)]
    pub asset_class: Option<Setting<String>>,
    /// ACTIVE | INACTIVE | TESTING.
    #[arg(long)]
    pub status: Option<StrategyStatus>,
    /// LIVE | PAPER.
    #[arg(long)]
    pub trading_mode: Option<TradingMode>,
    /// Account its orders go to, e.g. IBKR_Main (`none` clears).
    #[arg(long)]
    pub account: Option<Setting<String>>,
    /// Whether `mtx optimize` considers it: true | false.
    #[arg(long)]
    pub include_in_optimization: Option<bool>,
    /// Maximum position size in dollars (`none` clears).
    #[arg(long)]
    pub max_position_size: Option<Setting<Decimal>>,
    /// Maximum daily loss in dollars (`none` clears).
    #[arg(long)]
    pub max_daily_loss: Option<Setting<Decimal>>,
    /// SENDER_EQUITY_RATIO | TARGET_WEIGHT | DELTA_UNITS | FIXED_UNITS.
    #[arg(long)]
    pub sizing_mode: Option<SizingMode>,
    /// Expected alpha per trade as a fraction, e.g. 0.02 (`none` clears).
    #[arg(long)]
    pub expected_alpha: Option<Setting<Decimal>>,
    /// Email or Slack handle of the developer (`none` clears).
    #[arg(long)]
    pub developer_contact: Option<Setting<String>>,
    /// Free-text notes (`none` clears).
    #[arg(long)]
    pub notes: Option<Setting<String>>,
}

/// Run a `strategies` subcommand.
pub async fn run(cmd: StrategiesCmd, cfg: &Config) -> Result<ExitCode> {
    let mongo = Mongo::connect(cfg).await?;
    match cmd {
        StrategiesCmd::List { json } => list(&mongo, json).await,
        StrategiesCmd::Show { id, json } => show(cfg, &mongo, &id, json).await,
        StrategiesCmd::Set(a) => set(cfg, &mongo, a).await,
        StrategiesCmd::Load { file } => load(cfg, &mongo, &file).await,
        StrategiesCmd::Sync => sync(cfg, &mongo).await,
    }
}

// ------------------------------------------------------------------ model

/// Validate a configuration before it is stored.
pub fn validate(c: &StrategyConfig) -> Result<()> {
    let id = &c.strategy_id;
    if id.is_empty() || id.trim() != id {
        bail!("strategy id {id:?} is empty or has surrounding whitespace");
    }
    if id.chars().count() > 200 {
        bail!("strategy id {id:?} is longer than 200 characters");
    }
    let text = |what: &str, v: &Option<String>| -> Result<()> {
        if let Some(s) = v {
            if s.trim().is_empty() {
                bail!("{id}: {what} is blank (use `none` to clear it)");
            }
        }
        Ok(())
    };
    text("strategy_name", &c.strategy_name)?;
    text("asset_class", &c.asset_class)?;
    text("account", &c.account)?;
    text("developer_contact", &c.developer_contact)?;
    if let Some(a) = &c.account {
        if a.trim() != a {
            bail!("{id}: account {a:?} has surrounding whitespace");
        }
    }
    if c.trading_mode == TradingMode::Live && c.account.is_none() {
        bail!("{id}: LIVE trading needs an account (--account)");
    }
    if let Some(l) = &c.risk_limits {
        for (what, v) in [
            ("max_position_size", l.max_position_size),
            ("max_daily_loss", l.max_daily_loss),
        ] {
            if let Some(v) = v {
                if v <= Decimal::ZERO {
                    bail!("{id}: risk_limits.{what} must be a positive dollar amount, got {v}");
                }
            }
        }
    }
    if let Some(a) = c.expected_alpha {
        if a < Decimal::ZERO || a >= Decimal::ONE {
            bail!("{id}: expected_alpha must be a fraction in [0, 1) (0.02 = 2 %), got {a}");
        }
    }
    Ok(())
}

/// Enum fields as the seed spells them, whatever case a document used.
fn normalise_enums(v: &mut Value) {
    if let Value::Object(m) = v {
        for key in ["status", "trading_mode", "sizing_mode"] {
            if let Some(Value::String(s)) = m.get_mut(key) {
                *s = s.trim().to_ascii_uppercase();
            }
        }
    }
}

/// Decode a `strategy_configurations` document (leniently: numbers of any
/// BSON type, unknown fields ignored).
pub fn config_from_doc(d: &Document) -> Result<StrategyConfig> {
    let mut v = doc_to_json(d);
    normalise_enums(&mut v);
    if let Value::Object(m) = &mut v {
        m.remove("_id");
        // Nulls mean "absent" for every optional field.
        m.retain(|_, x| !x.is_null());
    }
    let id = get_str(d, "strategy_id").unwrap_or("?").to_string();
    serde_json::from_value(v).with_context(|| format!("strategy_configurations document of {id}"))
}

/// The update of one configuration: `$set` what it has, `$unset` the
/// optional fields it lacks, `$setOnInsert` the creation time.
fn config_update(c: &StrategyConfig, now: DateTime<Utc>) -> Document {
    let mut set = doc! {
        "strategy_id": &c.strategy_id,
        "status": c.status.as_str(),
        "trading_mode": c.trading_mode.as_str(),
        "include_in_optimization": c.include_in_optimization,
        "sizing_mode": c.sizing_mode.as_str(),
        "updated_at": bdate(now),
    };
    let mut unset = Document::new();
    let mut opt = |key: &str, v: Option<Bson>| match v {
        Some(b) => {
            set.insert(key, b);
        }
        None => {
            unset.insert(key, "");
        }
    };
    opt("strategy_name", c.strategy_name.clone().map(Bson::String));
    opt("asset_class", c.asset_class.clone().map(Bson::String));
    opt("account", c.account.clone().map(Bson::String));
    let limits = c.risk_limits.as_ref().and_then(|l| {
        let mut d = Document::new();
        if let Some(v) = l.max_position_size {
            d.insert("max_position_size", bdec(v));
        }
        if let Some(v) = l.max_daily_loss {
            d.insert("max_daily_loss", bdec(v));
        }
        (!d.is_empty()).then_some(Bson::Document(d))
    });
    opt("risk_limits", limits);
    opt("expected_alpha", c.expected_alpha.map(bdec));
    opt(
        "developer_contact",
        c.developer_contact.clone().map(Bson::String),
    );
    opt("notes", c.notes.clone().map(Bson::String));
    opt("last_backtest_sync", c.last_backtest_sync.map(bdate));
    let created = c.created_at.unwrap_or(now);
    let mut update = doc! { "$set": set, "$setOnInsert": { "created_at": bdate(created) } };
    if !unset.is_empty() {
        update.insert("$unset", unset);
    }
    update
}

/// Decimals without trailing zeros (`25000.50` → `25000.5`), the form
/// they read back from Decimal128 in, so Mongo and KV agree textually.
fn normalised(mut c: StrategyConfig) -> StrategyConfig {
    if let Some(l) = &mut c.risk_limits {
        l.max_position_size = l.max_position_size.map(|d| d.normalize());
        l.max_daily_loss = l.max_daily_loss.map(|d| d.normalize());
    }
    c.expected_alpha = c.expected_alpha.map(|d| d.normalize());
    c
}

/// The configuration without its timestamps, for change detection.
fn content(c: &StrategyConfig) -> StrategyConfig {
    let mut c = normalised(c.clone());
    c.created_at = None;
    c.updated_at = None;
    c
}

/// Field-by-field differences (`field: old → new`), timestamps left out.
fn diff(old: Option<&StrategyConfig>, new: &StrategyConfig) -> Vec<String> {
    let to_map = |c: &StrategyConfig| -> BTreeMap<String, Value> {
        match serde_json::to_value(content(c)) {
            Ok(Value::Object(m)) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        }
    };
    let a = old.map(to_map).unwrap_or_default();
    let b = to_map(new);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let show = |v: Option<&Value>| match v {
        None => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    keys.into_iter()
        .filter(|k| *k != "strategy_id" && a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} → {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

/// Read every configuration, by id.
async fn read_all(mongo: &Mongo) -> Result<Vec<StrategyConfig>> {
    let label = mongo.label(names::STRATEGY_CONFIGURATIONS);
    let docs: Vec<Document> = mongo
        .coll(names::STRATEGY_CONFIGURATIONS)
        .find(doc! {})
        .sort(doc! { "strategy_id": 1 })
        .await
        .with_context(|| format!("reading {label}"))?
        .try_collect()
        .await
        .with_context(|| format!("reading {label}"))?;
    docs.iter().map(config_from_doc).collect()
}

/// Read the configurations of `ids` that exist.
async fn read_some(mongo: &Mongo, ids: &[&str]) -> Result<HashMap<String, StrategyConfig>> {
    let label = mongo.label(names::STRATEGY_CONFIGURATIONS);
    let docs: Vec<Document> = mongo
        .coll(names::STRATEGY_CONFIGURATIONS)
        .find(doc! { "strategy_id": { "$in": ids.to_vec() } })
        .await
        .with_context(|| format!("reading {label}"))?
        .try_collect()
        .await
        .with_context(|| format!("reading {label}"))?;
    docs.iter()
        .map(|d| config_from_doc(d).map(|c| (c.strategy_id.clone(), c)))
        .collect()
}

/// Write one (validated) configuration to Mongo; returns it as stored
/// (timestamps filled in). `existing` is what was read before.
async fn write_mongo(
    mongo: &Mongo,
    c: StrategyConfig,
    existing: Option<&StrategyConfig>,
    now: DateTime<Utc>,
) -> Result<StrategyConfig> {
    validate(&c)?;
    let mut c = normalised(c);
    c.created_at = existing.and_then(|e| e.created_at).or(Some(now));
    c.updated_at = Some(now);
    mongo
        .coll(names::STRATEGY_CONFIGURATIONS)
        .update_one(
            doc! { "strategy_id": &c.strategy_id },
            config_update(&c, now),
        )
        .upsert(true)
        .await
        .with_context(|| {
            format!(
                "storing {} in {}",
                c.strategy_id,
                mongo.label(names::STRATEGY_CONFIGURATIONS)
            )
        })?;
    Ok(c)
}

/// Put configurations into the `strategies` KV bucket; returns each revision.
pub async fn mirror(cfg: &Config, configs: &[StrategyConfig]) -> Result<Vec<u64>> {
    if configs.is_empty() {
        return Ok(Vec::new());
    }
    let kv = kv_bucket(cfg, buckets::STRATEGIES).await.context(
        "Mongo is updated but the KV mirror is not; run `mtx strategies sync` once NATS is reachable",
    )?;
    let mut revs = Vec::with_capacity(configs.len());
    for c in configs {
        let key = StrategyConfig::kv_key(&c.strategy_id);
        let rev = kv_put_json(&kv, &key, c).await.with_context(|| {
            format!(
                "mirroring {} into KV `strategies` (Mongo is updated; run `mtx strategies sync`)",
                c.strategy_id
            )
        })?;
        revs.push(rev);
    }
    Ok(revs)
}

/// Set `last_backtest_sync` (and `updated_at`) of the configured strategies
/// among `ids` and mirror them; returns the ones that have a configuration.
pub async fn mark_backtest_synced(
    cfg: &Config,
    mongo: &Mongo,
    ids: &[&str],
    now: DateTime<Utc>,
) -> Result<HashMap<String, StrategyConfig>> {
    let existing = read_some(mongo, ids).await?;
    let mut written = Vec::new();
    for (id, old) in &existing {
        let mut c = old.clone();
        c.last_backtest_sync = Some(now);
        // A stored config that no longer validates is still marked synced.
        c.created_at = old.created_at.or(Some(now));
        c.updated_at = Some(now);
        mongo
            .coll(names::STRATEGY_CONFIGURATIONS)
            .update_one(
                doc! { "strategy_id": id },
                doc! { "$set": { "last_backtest_sync": bdate(now), "updated_at": bdate(now) } },
            )
            .await
            .with_context(|| format!("setting last_backtest_sync of {id}"))?;
        written.push(c);
    }
    written.sort_by(|a, b| a.strategy_id.cmp(&b.strategy_id));
    mirror(cfg, &written).await?;
    Ok(written
        .into_iter()
        .map(|c| (c.strategy_id.clone(), c))
        .collect())
}

// --------------------------------------------------------------- commands

fn opt_dec(v: Option<Decimal>) -> String {
    v.map_or_else(|| "-".into(), |d| d.normalize().to_string())
}

async fn list(mongo: &Mongo, json: bool) -> Result<ExitCode> {
    let all = read_all(mongo).await?;
    if json {
        for c in &all {
            println!("{}", serde_json::to_string(c)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            let l = c.risk_limits.clone().unwrap_or_default();
            vec![
                c.strategy_id.clone(),
                c.status.to_string(),
                c.trading_mode.to_string(),
                c.account.clone().unwrap_or_else(|| "-".into()),
                if c.include_in_optimization {
                    "yes"
                } else {
                    "no"
                }
                .into(),
                c.sizing_mode.to_string(),
                opt_dec(c.expected_alpha),
                opt_dec(l.max_position_size),
                opt_dec(l.max_daily_loss),
                c.last_backtest_sync
                    .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M").to_string()),
            ]
        })
        .collect();
    print_table(
        &[
            "STRATEGY",
            "STATUS",
            "MODE",
            "ACCOUNT",
            "OPTIMIZE",
            "SIZING",
            "ALPHA",
            "MAX POS",
            "MAX LOSS",
            "BACKTEST SYNC",
        ],
        &rows,
    );
    println!(
        "{} strateg{} in {}",
        all.len(),
        if all.len() == 1 { "y" } else { "ies" },
        mongo.label(names::STRATEGY_CONFIGURATIONS)
    );
    Ok(ExitCode::SUCCESS)
}

async fn show(cfg: &Config, mongo: &Mongo, id: &str, json: bool) -> Result<ExitCode> {
    let found = read_some(mongo, &[id]).await?;
    let Some(c) = found.get(id) else {
        eprintln!(
            "no strategy {id:?} in {}",
            mongo.label(names::STRATEGY_CONFIGURATIONS)
        );
        return Ok(ExitCode::from(1));
    };
    println!("{}", serde_json::to_string_pretty(c)?);
    if json {
        return Ok(ExitCode::SUCCESS);
    }
    let key = StrategyConfig::kv_key(id);
    let state = match kv_bucket(cfg, buckets::STRATEGIES).await {
        Err(e) => format!("unknown ({e:#})"),
        Ok(kv) => match kv.entry(&key).await {
            Err(e) => format!("unknown ({e})"),
            Ok(None) => "MISSING (run `mtx strategies sync`)".into(),
            Ok(Some(entry)) => match serde_json::from_slice::<StrategyConfig>(&entry.value) {
                Ok(k) if &k == c => format!("in sync (revision {})", entry.revision),
                Ok(_) => format!(
                    "DIFFERS from Mongo (revision {}; run `mtx strategies sync`)",
                    entry.revision
                ),
                Err(e) => format!("unreadable ({e}; run `mtx strategies sync`)"),
            },
        },
    };
    println!("kv strategies/{key}: {state}");
    Ok(ExitCode::SUCCESS)
}

/// Apply `set` flags to a configuration.
fn apply_set(mut c: StrategyConfig, a: &SetArgs) -> StrategyConfig {
    if let Some(v) = &a.name {
        c.strategy_name = v.clone().into_option();
    }
    if let Some(v) = &a.asset_class {
        c.asset_class = v.clone().into_option();
    }
    if let Some(v) = a.status {
        c.status = v;
    }
    if let Some(v) = a.trading_mode {
        c.trading_mode = v;
    }
    if let Some(v) = &a.account {
        c.account = v.clone().into_option();
    }
    if let Some(v) = a.include_in_optimization {
        c.include_in_optimization = v;
    }
    if a.max_position_size.is_some() || a.max_daily_loss.is_some() {
        let mut l = c.risk_limits.take().unwrap_or_default();
        if let Some(v) = &a.max_position_size {
            l.max_position_size = v.clone().into_option();
        }
        if let Some(v) = &a.max_daily_loss {
            l.max_daily_loss = v.clone().into_option();
        }
        c.risk_limits = (l != RiskLimits::default()).then_some(l);
    }
    if let Some(v) = a.sizing_mode {
        c.sizing_mode = v;
    }
    if let Some(v) = &a.expected_alpha {
        c.expected_alpha = v.clone().into_option();
    }
    if let Some(v) = &a.developer_contact {
        c.developer_contact = v.clone().into_option();
    }
    if let Some(v) = &a.notes {
        c.notes = v.clone().into_option();
    }
    c
}

async fn set(cfg: &Config, mongo: &Mongo, a: SetArgs) -> Result<ExitCode> {
    let found = read_some(mongo, &[a.id.as_str()]).await?;
    let old = found.get(&a.id);
    let base = match old {
        Some(c) => c.clone(),
        None if a.create => StrategyConfig::new(a.id.clone()),
        None => bail!(
            "no strategy {:?} in {}; pass --create to create it (or `mtx strategies load <file>`)",
            a.id,
            mongo.label(names::STRATEGY_CONFIGURATIONS)
        ),
    };
    let new = apply_set(base, &a);
    validate(&new)?;
    let changes = diff(old, &new);
    let stored = if old.is_some() && changes.is_empty() {
        println!("{}: nothing to change", a.id);
        found.get(&a.id).cloned().unwrap_or(new)
    } else {
        let stored = write_mongo(mongo, new, old, now_millis()).await?;
        println!(
            "{} {}",
            if old.is_some() { "updated" } else { "created" },
            a.id
        );
        for ch in &changes {
            println!("  {ch}");
        }
        stored
    };
    let revs = mirror(cfg, std::slice::from_ref(&stored)).await?;
    println!(
        "kv strategies/{} revision {}",
        StrategyConfig::kv_key(&stored.strategy_id),
        revs.first().copied().unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// Parse a strategies JSON file into objects keyed by id (in file order).
fn read_load_file(file: &std::path::Path) -> Result<Vec<(String, serde_json::Map<String, Value>)>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("{}: cannot read", file.display()))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not valid JSON", file.display()))?;
    let Value::Array(items) = v else {
        bail!(
            "{}: expected a JSON array of strategy objects",
            file.display()
        );
    };
    let mut out: Vec<(String, serde_json::Map<String, Value>)> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Object(mut m) = item else {
            bail!("{}: element {i} is not an object", file.display());
        };
        let id = match m.get("strategy_id") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            _ => bail!(
                "{}: element {i} has no non-empty string `strategy_id`",
                file.display()
            ),
        };
        if out.iter().any(|(o, _)| *o == id) {
            bail!("{}: strategy {id} appears twice", file.display());
        }
        // Managed by mtx, never taken from a file.
        m.remove("created_at");
        m.remove("updated_at");
        m.remove("_id");
        out.push((id, m));
    }
    if out.is_empty() {
        bail!("{}: no strategies in the file", file.display());
    }
    Ok(out)
}

async fn load(cfg: &Config, mongo: &Mongo, file: &std::path::Path) -> Result<ExitCode> {
    let items = read_load_file(file)?;
    let ids: Vec<&str> = items.iter().map(|(id, _)| id.as_str()).collect();
    let existing = read_some(mongo, &ids).await?;

    // Validate everything before writing anything.
    let mut planned = Vec::with_capacity(items.len());
    for (id, fields) in &items {
        let old = existing.get(id);
        let mut merged = match old {
            Some(c) => serde_json::to_value(c)?,
            None => Value::Object(serde_json::Map::new()),
        };
        if let Value::Object(m) = &mut merged {
            for (k, v) in fields {
                if v.is_null() {
                    m.remove(k);
                } else {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        normalise_enums(&mut merged);
        let new: StrategyConfig = serde_json::from_value(merged)
            .map_err(|e| anyhow!("{}: strategy {id}: {e}", file.display()))?;
        validate(&new).with_context(|| format!("{}", file.display()))?;
        planned.push((id.clone(), new));
    }

    let now = now_millis();
    let mut stored = Vec::with_capacity(planned.len());
    let mut rows = Vec::new();
    for (id, new) in planned {
        let old = existing.get(&id);
        let changes = diff(old, &new);
        let (c, what) = match old {
            Some(o) if changes.is_empty() => (o.clone(), "unchanged".to_string()),
            Some(_) => (
                write_mongo(mongo, new, old, now).await?,
                format!("updated ({})", changes.join("; ")),
            ),
            None => (write_mongo(mongo, new, None, now).await?, "created".into()),
        };
        rows.push(vec![id, what]);
        stored.push(c);
    }
    let revs = mirror(cfg, &stored).await?;
    print_table(&["STRATEGY", "MONGO"], &rows);
    println!(
        "loaded {} strategies into {} and mirrored them into KV `strategies` (revisions {}..={})",
        stored.len(),
        mongo.label(names::STRATEGY_CONFIGURATIONS),
        revs.iter().min().copied().unwrap_or_default(),
        revs.iter().max().copied().unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

async fn sync(cfg: &Config, mongo: &Mongo) -> Result<ExitCode> {
    let all = read_all(mongo).await?;
    let revs = mirror(cfg, &all).await?;
    for (c, r) in all.iter().zip(&revs) {
        println!(
            "kv strategies/{} revision {r}",
            StrategyConfig::kv_key(&c.strategy_id)
        );
    }
    println!("mirrored {} strategies into KV `strategies`", all.len());
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn settings_parse_and_clear() {
        assert_eq!("none".parse::<Setting<Decimal>>().unwrap(), Setting::Clear);
        assert_eq!(
            "1500".parse::<Setting<Decimal>>().unwrap(),
            Setting::Set(d("1500"))
        );
        assert!("abc".parse::<Setting<Decimal>>().is_err());
    }

    #[test]
    fn set_applies_and_validates() {
        let a = SetArgs {
            id: "X".into(),
            status: Some(StrategyStatus::Inactive),
            max_position_size: Some(Setting::Set(d("25000"))),
            expected_alpha: Some(Setting::Set(d("0.02"))),
            account: Some(Setting::Set("IBKR_Main".into())),
            ..SetArgs::default()
        };
        let c = apply_set(StrategyConfig::new("X"), &a);
        assert_eq!(c.status, StrategyStatus::Inactive);
        assert_eq!(
            c.risk_limits.as_ref().unwrap().max_position_size,
            Some(d("25000"))
        );
        validate(&c).unwrap();
        let mut bad = c.clone();
        bad.expected_alpha = Some(d("1.5"));
        assert!(validate(&bad).is_err());
        let mut live = StrategyConfig::new("Y");
        live.trading_mode = TradingMode::Live;
        assert!(validate(&live).unwrap_err().to_string().contains("account"));
        let cleared = apply_set(
            c,
            &SetArgs {
                max_position_size: Some(Setting::Clear),
                ..SetArgs::default()
            },
        );
        assert_eq!(cleared.risk_limits, None);
    }

    #[test]
    fn documents_round_trip_with_decimal128_and_uppercase_enums() {
        let mut c = StrategyConfig::new("SPX_1-D_Opt");
        c.account = Some("IBKR_Main".into());
        c.risk_limits = Some(RiskLimits {
            max_position_size: Some(d("25000.50")),
            max_daily_loss: None,
        });
        c.expected_alpha = Some(d("0.02"));
        let now = now_millis();
        c.created_at = Some(now);
        c.updated_at = Some(now);
        let u = config_update(&c, now);
        let set = u.get_document("$set").unwrap();
        assert_eq!(set.get_str("status").unwrap(), "ACTIVE");
        assert!(matches!(
            set.get_document("risk_limits")
                .unwrap()
                .get("max_position_size"),
            Some(Bson::Decimal128(_))
        ));
        assert!(u.get_document("$unset").unwrap().contains_key("notes"));
        // What the upsert would store, read back.
        let mut stored = set.clone();
        stored.insert("created_at", bdate(now));
        stored.insert("status", "active");
        let back = config_from_doc(&stored).unwrap();
        assert_eq!(back, c);
        assert!(diff(Some(&back), &c).is_empty());
        let mut other = c.clone();
        other.status = StrategyStatus::Testing;
        assert_eq!(diff(Some(&c), &other), ["status: ACTIVE → TESTING"]);
    }

    #[test]
    fn load_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.json");
        std::fs::write(&p, r#"[{"strategy_id":"A"},{"strategy_id":"A"}]"#).unwrap();
        assert!(read_load_file(&p)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        std::fs::write(&p, r#"{"strategy_id":"A"}"#).unwrap();
        assert!(read_load_file(&p).is_err());
        std::fs::write(
            &p,
            r#"[{"strategy_id":"A","created_at":"x","status":"ACTIVE"}]"#,
        )
        .unwrap();
        let items = read_load_file(&p).unwrap();
        assert!(!items[0].1.contains_key("created_at"));
    }
}
