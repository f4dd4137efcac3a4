//! `mtx db migrate`: bring both databases to the catalog, idempotently.
//!
//! For every collection of [`crate::spec::catalog`]:
//! 1. create it when missing, with its `$jsonSchema` validator
//!    (`validationLevel: moderate`, so legacy documents written before the
//!    validator stay updatable) or its time-series options;
//! 2. otherwise `collMod` the validator / time-series TTL when they differ;
//! 3. create missing indexes with the seed's exact keys, order and options;
//!    an index whose key exists with other options is corrected (a TTL by
//!    `collMod`, `unique` / `sparse` by drop and re-create); indexes the
//!    catalog does not know are kept and listed.
//!
//! Then the data steps of every version newer than the one recorded run
//! (1.1.0 backfills `trading_orders.status_rank`, 1.3.0 moves the state
//! machine's order status to `venue_status`), and the version is written
//! to `system_config` (`key: "schema_version"`, with its history), as the
//! Bot Core migrations procedure records it. A second run finds nothing to
//! do and writes nothing. A database recorded at a newer version than this
//! build's is left alone (error). `mongo.signals_db` is never touched.

use crate::error::SinkError;
use crate::spec::{
    self, catalog, CollectionSpec, Db, IndexSpec, Writer, SCHEMA_VERSION, SCHEMA_VERSION_KEY,
};
use crate::store::{int_of, Store};
use bson::{doc, Bson, DateTime, Document};
use mongodb::error::ErrorKind;
use mtx_runtime::config::MongoConfig;

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrateReport {
    /// Version recorded before (None: never migrated).
    pub from_version: Option<String>,
    /// Version recorded after.
    pub to_version: String,
    /// Changes made, one line each (`created collection ...`).
    pub changes: Vec<String>,
    /// Things noticed but left alone (extra indexes, unenforceable rules).
    pub notes: Vec<String>,
    /// Things that could not be done (the command should exit non-zero).
    pub problems: Vec<String>,
}

impl MigrateReport {
    /// True when nothing was changed.
    pub fn is_noop(&self) -> bool {
        self.changes.is_empty()
    }
}

/// `a.b.c` → comparable tuple (missing parts are 0).
pub fn parse_version(v: &str) -> (u64, u64, u64) {
    let mut it = v.trim().split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
        it.next().unwrap_or(0),
    )
}

fn db_name(cfg: &MongoConfig, db: Db) -> &str {
    match db {
        Db::Trading => &cfg.trading_db,
        Db::BotCore => &cfg.bot_core_db,
    }
}

/// The version recorded in `system_config`, if any.
pub async fn recorded_version(store: &Store) -> Result<Option<String>, SinkError> {
    let found = store
        .find_all(
            Db::BotCore,
            spec::names::SYSTEM_CONFIG,
            doc! {"key": SCHEMA_VERSION_KEY},
            None,
        )
        .await?;
    Ok(found
        .first()
        .and_then(|d| d.get_str("value").ok())
        .map(str::to_string))
}

/// Run the migration.
pub async fn migrate(store: &Store, cfg: &MongoConfig) -> Result<MigrateReport, SinkError> {
    for db in [&cfg.trading_db, &cfg.bot_core_db] {
        if *db == cfg.signals_db {
            return Err(SinkError::Config(format!(
                "`{db}` is the read-only signal collector database (mongo.signals_db); refusing to migrate it"
            )));
        }
    }
    let mut report = MigrateReport {
        from_version: recorded_version(store).await?,
        to_version: SCHEMA_VERSION.to_string(),
        ..Default::default()
    };
    if let Some(v) = &report.from_version {
        if parse_version(v) > parse_version(SCHEMA_VERSION) {
            return Err(SinkError::Config(format!(
                "the database is at schema {v}, newer than this build's {SCHEMA_VERSION}; use a newer mtx"
            )));
        }
    }
    for c in catalog() {
        let ns = format!("{}.{}", db_name(cfg, c.db), c.name);
        if let Err(e) = collection(store, c, &ns, &mut report).await {
            report.problems.push(format!("{ns}: {e}"));
        }
        for rule in c.unenforced_rules {
            report
                .notes
                .push(format!("not enforced by a validator: {rule}"));
        }
    }
    data_steps(store, &mut report).await?;
    if report.problems.is_empty() {
        record_version(store, cfg, &mut report).await?;
    } else {
        report.to_version = report.from_version.clone().unwrap_or_default();
    }
    Ok(report)
}

/// Collection options as `listCollections` reports them.
async fn existing_options(
    store: &Store,
    c: &CollectionSpec,
) -> Result<Option<(String, Document)>, SinkError> {
    let db = store.db(c.db).clone();
    let name = c.name;
    let reply = store
        .timed("listCollections", async move {
            Ok(db
                .run_command(doc! {"listCollections": 1, "filter": {"name": name}})
                .await?)
        })
        .await?;
    let batch = reply
        .get_document("cursor")
        .and_then(|cur| cur.get_array("firstBatch"))
        .map_err(|e| SinkError::Command {
            op: "listCollections",
            target: c.name.to_string(),
            detail: e.to_string(),
        })?;
    Ok(batch.iter().filter_map(Bson::as_document).next().map(|d| {
        (
            d.get_str("type").unwrap_or("collection").to_string(),
            d.get_document("options").cloned().unwrap_or_default(),
        )
    }))
}

async fn command(store: &Store, db: Db, what: &str, cmd: Document) -> Result<Document, SinkError> {
    let db = store.db(db).clone();
    store
        .timed(what, async move { Ok(db.run_command(cmd).await?) })
        .await
}

async fn collection(
    store: &Store,
    c: &CollectionSpec,
    ns: &str,
    report: &mut MigrateReport,
) -> Result<(), SinkError> {
    let validator = c.validator();
    match existing_options(store, c).await? {
        None => {
            let mut cmd = doc! {"create": c.name};
            if let Some(ts) = &c.timeseries {
                cmd.insert(
                    "timeseries",
                    doc! {
                        "timeField": ts.time_field,
                        "metaField": ts.meta_field,
                        "granularity": ts.granularity,
                    },
                );
                cmd.insert("expireAfterSeconds", ts.expire_after_seconds);
            }
            if let Some(v) = &validator {
                cmd.insert("validator", v.clone());
                cmd.insert("validationLevel", "moderate");
                cmd.insert("validationAction", "error");
            }
            match command(store, c.db, "create", cmd).await {
                Ok(_) => report.changes.push(format!(
                    "created {}collection {ns}",
                    if c.timeseries.is_some() {
                        "time-series "
                    } else {
                        ""
                    }
                )),
                // Created concurrently by another migrate: fine, compare below.
                Err(SinkError::Mongo(e)) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 48) =>
                    {}
                Err(e) => return Err(e),
            }
        }
        Some((kind, opts)) => {
            if let Some(ts) = &c.timeseries {
                if opts.get_document("timeseries").is_err() {
                    report.problems.push(format!(
                        "{ns} exists as a regular {kind}, not a time series; move its data and drop it, then migrate again"
                    ));
                } else if int_of(opts.get("expireAfterSeconds")) != Some(ts.expire_after_seconds) {
                    command(
                        store,
                        c.db,
                        "collMod",
                        doc! {"collMod": c.name, "expireAfterSeconds": ts.expire_after_seconds},
                    )
                    .await?;
                    report.changes.push(format!(
                        "set {ns} expireAfterSeconds {}",
                        ts.expire_after_seconds
                    ));
                }
            }
            if let Some(v) = &validator {
                let same = opts.get_document("validator").ok() == Some(v)
                    && opts.get_str("validationLevel").unwrap_or("strict") == "moderate"
                    && opts.get_str("validationAction").unwrap_or("error") == "error";
                if !same {
                    command(
                        store,
                        c.db,
                        "collMod",
                        doc! {
                            "collMod": c.name,
                            "validator": v.clone(),
                            "validationLevel": "moderate",
                            "validationAction": "error",
                        },
                    )
                    .await?;
                    report.changes.push(format!(
                        "{} validator of {ns}",
                        if opts.contains_key("validator") {
                            "updated"
                        } else {
                            "added"
                        }
                    ));
                }
            }
        }
    }
    indexes(store, c, ns, report).await
}

/// An existing index, normalised for comparison.
#[derive(Debug, Clone, PartialEq)]
struct Existing {
    name: String,
    keys: Vec<(String, i64)>,
    unique: bool,
    sparse: bool,
    ttl: Option<i64>,
}

async fn list_indexes(store: &Store, c: &CollectionSpec) -> Result<Vec<Existing>, SinkError> {
    let reply = command(store, c.db, "listIndexes", doc! {"listIndexes": c.name}).await?;
    let batch = reply
        .get_document("cursor")
        .and_then(|cur| cur.get_array("firstBatch"))
        .map_err(|e| SinkError::Command {
            op: "listIndexes",
            target: c.name.to_string(),
            detail: e.to_string(),
        })?;
    Ok(batch
        .iter()
        .filter_map(Bson::as_document)
        .map(|d| Existing {
            name: d.get_str("name").unwrap_or_default().to_string(),
            keys: d
                .get_document("key")
                .map(|k| {
                    k.iter()
                        .map(|(f, v)| (f.clone(), int_of(Some(v)).unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
            unique: d.get_bool("unique").unwrap_or(false),
            sparse: d.get_bool("sparse").unwrap_or(false),
            ttl: int_of(d.get("expireAfterSeconds")),
        })
        .collect())
}

fn index_doc(i: &IndexSpec) -> Document {
    let mut d = doc! {"key": i.key_doc(), "name": i.name()};
    if i.unique {
        d.insert("unique", true);
    }
    if i.sparse {
        d.insert("sparse", true);
    }
    if let Some(t) = i.ttl {
        d.insert("expireAfterSeconds", t);
    }
    d
}

fn describe(i: &IndexSpec) -> String {
    let mut opts = Vec::new();
    if i.unique {
        opts.push("unique".to_string());
    }
    if i.sparse {
        opts.push("sparse".to_string());
    }
    if let Some(t) = i.ttl {
        opts.push(format!("expireAfterSeconds {t}"));
    }
    if opts.is_empty() {
        format!("{} {}", i.name(), i.key_doc())
    } else {
        format!("{} {} ({})", i.name(), i.key_doc(), opts.join(", "))
    }
}

async fn indexes(
    store: &Store,
    c: &CollectionSpec,
    ns: &str,
    report: &mut MigrateReport,
) -> Result<(), SinkError> {
    let existing = list_indexes(store, c).await?;
    let mut create = Vec::new();
    for want in &c.indexes {
        let keys: Vec<(String, i64)> = want
            .keys
            .iter()
            .map(|(k, d)| (k.to_string(), *d as i64))
            .collect();
        let same_key = existing.iter().find(|e| e.keys == keys);
        match same_key {
            Some(e) if e.unique == want.unique && e.sparse == want.sparse && e.ttl == want.ttl => {}
            Some(e)
                if e.unique == want.unique
                    && e.sparse == want.sparse
                    && e.ttl.is_some()
                    && want.ttl.is_some() =>
            {
                let ttl = want.ttl.unwrap_or_default();
                command(
                    store,
                    c.db,
                    "collMod",
                    doc! {"collMod": c.name, "index": {"name": &e.name, "expireAfterSeconds": ttl}},
                )
                .await?;
                report
                    .changes
                    .push(format!("set TTL of index {ns}.{} to {ttl} s", e.name));
            }
            Some(e) => {
                command(
                    store,
                    c.db,
                    "dropIndexes",
                    doc! {"dropIndexes": c.name, "index": &e.name},
                )
                .await?;
                report.changes.push(format!(
                    "dropped index {ns}.{} (options differed from the catalog)",
                    e.name
                ));
                create.push(want);
            }
            None => {
                if let Some(clash) = existing.iter().find(|e| e.name == want.name()) {
                    command(
                        store,
                        c.db,
                        "dropIndexes",
                        doc! {"dropIndexes": c.name, "index": &clash.name},
                    )
                    .await?;
                    report.changes.push(format!(
                        "dropped index {ns}.{} (same name, other keys)",
                        clash.name
                    ));
                }
                create.push(want);
            }
        }
    }
    for e in &existing {
        let known = e.name == "_id_"
            || c.indexes.iter().any(|w| {
                w.keys
                    .iter()
                    .map(|(k, d)| (k.to_string(), *d as i64))
                    .collect::<Vec<_>>()
                    == e.keys
            });
        if !known && c.timeseries.is_none() {
            report
                .notes
                .push(format!("kept index {ns}.{} (not in the catalog)", e.name));
        }
    }
    for want in create {
        command(
            store,
            c.db,
            "createIndexes",
            doc! {"createIndexes": c.name, "indexes": [index_doc(want)]},
        )
        .await?;
        report
            .changes
            .push(format!("created index {ns}.{}", describe(want)));
    }
    Ok(())
}

/// The unique natural-key indexes the sink relies on that are missing
/// (empty when the databases are migrated). Without them a redelivery could
/// store a document twice, so the sink does not write until this is empty.
pub async fn missing_unique_keys(store: &Store) -> Result<Vec<String>, SinkError> {
    let mut missing = Vec::new();
    for c in catalog()
        .iter()
        .filter(|c| c.writer == Writer::Sink || c.name == spec::names::AUDIT_LOGS)
    {
        let existing = match list_indexes(store, c).await {
            Ok(e) => e,
            Err(SinkError::Mongo(e)) if matches!(e.kind.as_ref(), ErrorKind::Command(x) if x.code == 26) =>
            {
                vec![]
            }
            Err(e) => return Err(e),
        };
        for want in c.indexes.iter().filter(|i| i.unique) {
            let keys: Vec<(String, i64)> = want
                .keys
                .iter()
                .map(|(k, d)| (k.to_string(), *d as i64))
                .collect();
            if !existing.iter().any(|e| e.unique && e.keys == keys) {
                missing.push(format!("{}.{}", c.name, want.name()));
            }
        }
    }
    Ok(missing)
}

/// Data changes of each version, run when the recorded version is older.
async fn data_steps(store: &Store, report: &mut MigrateReport) -> Result<(), SinkError> {
    let from = report
        .from_version
        .as_deref()
        .map(parse_version)
        .unwrap_or((0, 0, 0));
    if from < parse_version("1.1.0") {
        // trading_orders.status_rank: orders written before 1.1.0 get the
        // rank of their status (terminal ones can never be overwritten).
        let terminal: Vec<Bson> = crate::mapping::TERMINAL_STATUSES
            .iter()
            .map(|s| Bson::from(*s))
            .collect();
        let coll = spec::names::TRADING_ORDERS;
        let n_terminal = store
            .update_many(
                Db::Trading,
                coll,
                doc! {"status_rank": {"$exists": false}, "status": {"$in": terminal}},
                doc! {"$set": {"status_rank": crate::mapping::TERMINAL_RANK}},
            )
            .await?;
        let n_other = store
            .update_many(
                Db::Trading,
                coll,
                doc! {"status_rank": {"$exists": false}},
                doc! {"$set": {"status_rank": 0_i64}},
            )
            .await?;
        if n_terminal + n_other > 0 {
            report.changes.push(format!(
                "backfilled status_rank on {} trading_orders",
                n_terminal + n_other
            ));
        }
    }
    if from < parse_version("1.3.0") {
        // trading_orders.status: the seed's five values; the state
        // machine's own status moves to venue_status.
        let coll = spec::names::TRADING_ORDERS;
        let mut n = 0;
        for s in spec::ORDER_STATUS {
            n += store
                .update_many(
                    Db::Trading,
                    coll,
                    doc! {"venue_status": {"$exists": false}, "status": *s},
                    doc! {"$set": {
                        "venue_status": *s,
                        "status": crate::mapping::seed_order_status(s),
                    }},
                )
                .await?;
        }
        if n > 0 {
            report.changes.push(format!(
                "moved the venue status of {n} trading_orders to venue_status"
            ));
        }
        // strategy_backtest_data: max_drawdown and win_rate in percent, as
        // the seed's percentages are; documents say which by their units.
        let n = store
            .update_many(
                Db::Trading,
                spec::names::STRATEGY_BACKTEST_DATA,
                doc! {"metadata.units.win_rate": {"$regex": "^fraction"}},
                doc! {
                    "$mul": {"max_drawdown": 100.0, "win_rate": 100.0},
                    "$set": {
                        "metadata.units.max_drawdown": "percent of the running peak of compounded equity (34.1 = 34.1 %)",
                        "metadata.units.win_rate": "percent of days with a positive return (54.7 = 54.7 %)",
                    },
                },
            )
            .await?;
        if n > 0 {
            report.changes.push(format!(
                "max_drawdown and win_rate of {n} strategy_backtest_data in percent"
            ));
        }
    }
    Ok(())
}

async fn record_version(
    store: &Store,
    cfg: &MongoConfig,
    report: &mut MigrateReport,
) -> Result<(), SinkError> {
    if report.from_version.as_deref() == Some(SCHEMA_VERSION) {
        return Ok(());
    }
    let now = DateTime::now();
    let coll = store.coll(Db::BotCore, spec::names::SYSTEM_CONFIG);
    let history = doc! {
        "version": SCHEMA_VERSION,
        "from": report.from_version.clone().map(Bson::from).unwrap_or(Bson::Null),
        "applied_at": now,
        "changes": report.changes.len() as i64,
    };
    let update = doc! {
        "$set": {
            "value": SCHEMA_VERSION,
            "category": "features",
            "description": format!(
                "mtx schema version of databases {} and {} (mtx db migrate)",
                cfg.trading_db, cfg.bot_core_db
            ),
            "is_active": true,
            "updated_by": "mtx db migrate",
            "updated_at": now,
            "databases": {"trading": &cfg.trading_db, "bot_core": &cfg.bot_core_db},
        },
        "$setOnInsert": {"created_at": now},
        "$push": {"history": history},
    };
    store
        .timed("record schema version", async move {
            coll.update_one(doc! {"key": SCHEMA_VERSION_KEY}, update)
                .upsert(true)
                .await?;
            Ok(())
        })
        .await?;
    report.changes.push(format!(
        "recorded schema version {SCHEMA_VERSION} in {}.{} (was {})",
        cfg.bot_core_db,
        spec::names::SYSTEM_CONFIG,
        report.from_version.as_deref().unwrap_or("none")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert!(parse_version("1.0.0") < parse_version("1.1.0"));
        assert!(parse_version("1.10.0") > parse_version("1.9.3"));
        assert_eq!(parse_version(SCHEMA_VERSION), (1, 3, 0));
        assert_eq!(
            spec::VERSIONS.last().map(|v| v.0),
            Some(SCHEMA_VERSION),
            "the newest entry of VERSIONS is SCHEMA_VERSION"
        );
    }
}
