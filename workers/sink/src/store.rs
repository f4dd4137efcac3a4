//! The Mongo connection and the few write primitives the sink needs, each
//! reporting one result per document / statement.
//!
//! Connection defaults (used only when the URI does not set them): server
//! selection 3 s, connect 3 s, heartbeat 2 s, so an outage is noticed and
//! left quickly; anything the URI says (the stand-in's `retryWrites=false`,
//! a real cluster's `w=majority`, TLS) wins.

use crate::error::{classify_code, Class, SinkError};
use crate::spec::Db;
use bson::{doc, Bson, Document};
use futures::TryStreamExt;
use mongodb::error::ErrorKind;
use mongodb::options::{Acknowledgment, ClientOptions, WriteConcern};
use mongodb::{Client, Collection, Database};
use mtx_runtime::config::MongoConfig;
use prometheus::{Histogram, HistogramOpts, HistogramVec, Registry};
use std::future::Future;
use std::time::{Duration, Instant};

/// Time limit of a readiness ping.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Result of one document or statement of a bulk write.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteResult {
    /// Acknowledged.
    Ok,
    /// Already there (duplicate key): success.
    Duplicate,
    /// Failed; the class says whether to retry or dead-letter.
    Failed {
        /// Retryable or permanent.
        class: Class,
        /// Server code.
        code: i32,
        /// Server message (with `errInfo` for validation failures).
        message: String,
    },
}

/// One update statement of [`Store::update_bulk`].
#[derive(Debug, Clone)]
pub struct UpdateStmt {
    /// Filter.
    pub q: Document,
    /// Update document.
    pub u: Document,
    /// Update every match (else the first).
    pub multi: bool,
}

/// Per bulk write metrics: `mtx_mongo_write_duration_seconds{collection}`
/// and `mtx_mongo_batch_size` (documents or statements per write).
#[derive(Clone)]
pub struct WriteMetrics {
    /// Duration of one bulk write (insert or update command), by collection.
    pub duration: HistogramVec,
    /// Documents / statements per bulk write.
    pub batch_size: Histogram,
}

impl WriteMetrics {
    /// Register on `registry`.
    pub fn new(registry: &Registry) -> Result<WriteMetrics, prometheus::Error> {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "mtx_mongo_write_duration_seconds",
                "Duration of one bulk write to MongoDB, by collection",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["collection"],
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "mtx_mongo_batch_size",
                "Documents or statements per bulk write to MongoDB",
            )
            .buckets((0..=10).map(|i| f64::from(1u32 << i)).collect()),
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        Ok(WriteMetrics {
            duration,
            batch_size,
        })
    }

    fn observe(&self, coll: &str, n: usize, started: Instant) {
        self.duration
            .with_label_values(&[coll])
            .observe(started.elapsed().as_secs_f64());
        self.batch_size.observe(n as f64);
    }
}

/// Both databases on one client.
#[derive(Clone)]
pub struct Store {
    /// The driver client (pooled, reconnects by itself).
    pub client: Client,
    trading: Database,
    bot_core: Database,
    op_timeout: Duration,
    metrics: Option<WriteMetrics>,
}

impl Store {
    /// Connect lazily (the driver connects in the background; an unreachable
    /// server shows up as a retryable error on the first operation).
    pub async fn connect(cfg: &MongoConfig, op_timeout: Duration) -> Result<Store, SinkError> {
        let mut opts = ClientOptions::parse(&cfg.uri).await?;
        if opts.app_name.is_none() {
            opts.app_name = Some("mtx-sink".into());
        }
        if opts.server_selection_timeout.is_none() {
            opts.server_selection_timeout = Some(Duration::from_secs(3));
        }
        if opts.connect_timeout.is_none() {
            opts.connect_timeout = Some(Duration::from_secs(3));
        }
        if opts.heartbeat_freq.is_none() {
            opts.heartbeat_freq = Some(Duration::from_secs(2));
        }
        // The sink acks a message to NATS once its write is acknowledged, so
        // that acknowledgment must mean durable: journaled, on a majority of
        // a replica set. A URI that sets `w` / `journal` decides itself.
        if opts.write_concern.is_none() {
            opts.write_concern = Some(
                WriteConcern::builder()
                    .w(Acknowledgment::Majority)
                    .journal(true)
                    .build(),
            );
        }
        let client = Client::with_options(opts)?;
        Ok(Store::from_client(client, cfg, op_timeout))
    }

    /// Wrap an existing client.
    pub fn from_client(client: Client, cfg: &MongoConfig, op_timeout: Duration) -> Store {
        Store {
            trading: client.database(&cfg.trading_db),
            bot_core: client.database(&cfg.bot_core_db),
            client,
            op_timeout,
            metrics: None,
        }
    }

    /// Observe every bulk write on `metrics`.
    pub fn with_metrics(mut self, metrics: WriteMetrics) -> Store {
        self.metrics = Some(metrics);
        self
    }

    /// The database handle.
    pub fn db(&self, db: Db) -> &Database {
        match db {
            Db::Trading => &self.trading,
            Db::BotCore => &self.bot_core,
        }
    }

    /// A collection of documents.
    pub fn coll(&self, db: Db, name: &str) -> Collection<Document> {
        self.db(db).collection(name)
    }

    /// Time limit of one operation.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }

    /// Run `fut` with the operation time limit.
    ///
    /// The operation runs in its own task and is always polled to the end,
    /// even when the caller stops waiting: the driver documents that a
    /// future dropped half-way can leave its internals inconsistent
    /// (RUST-937), and a sink that dropped timed-out writes on a busy server
    /// was seen with a wedged pool: every later operation, the readiness
    /// ping included, timed out while the server answered other clients in
    /// milliseconds. A late result is discarded; every sink write is
    /// idempotent, so the retry of its messages is harmless.
    pub async fn timed<T, F>(&self, what: &str, fut: F) -> Result<T, SinkError>
    where
        F: Future<Output = Result<T, SinkError>> + Send + 'static,
        T: Send + 'static,
    {
        self.timed_within(self.op_timeout, what, fut).await
    }

    /// [`Store::timed`] with another limit.
    async fn timed_within<T, F>(&self, limit: Duration, what: &str, fut: F) -> Result<T, SinkError>
    where
        F: Future<Output = Result<T, SinkError>> + Send + 'static,
        T: Send + 'static,
    {
        let task = tokio::spawn(fut);
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(SinkError::Command {
                op: "task",
                target: what.to_string(),
                detail: e.to_string(),
            }),
            Err(_) => Err(SinkError::Timeout(what.to_string())),
        }
    }

    /// `ping` the trading database's server, within [`PING_TIMEOUT`] (or
    /// the operation limit, if shorter): a ping is answered at once by any
    /// server that answers at all.
    pub async fn ping(&self) -> Result<(), SinkError> {
        let db = self.trading.clone();
        let limit = self.op_timeout.min(PING_TIMEOUT);
        self.timed_within(limit, "ping", async move {
            db.run_command(doc! {"ping": 1}).await?;
            Ok(())
        })
        .await
    }

    /// Unordered insert; one result per document (duplicate key = success).
    /// `Err` means the call as a whole failed (nothing known per document).
    pub async fn insert_unordered(
        &self,
        db: Db,
        coll: &str,
        docs: Vec<Document>,
    ) -> Result<Vec<WriteResult>, SinkError> {
        let n = docs.len();
        if n == 0 {
            return Ok(vec![]);
        }
        let c = self.coll(db, coll);
        let started = Instant::now();
        let r = self
            .timed(&format!("insert into {coll}"), async move {
                Ok(c.insert_many(docs).ordered(false).await)
            })
            .await?;
        if let Some(m) = &self.metrics {
            m.observe(coll, n, started);
        }
        let mut out = vec![WriteResult::Ok; n];
        match r {
            Ok(_) => Ok(out),
            Err(e) => match e.kind.as_ref() {
                ErrorKind::InsertMany(im) if im.write_concern_error.is_none() => {
                    for w in im.write_errors.as_deref().unwrap_or_default() {
                        if w.index >= n {
                            continue;
                        }
                        let class = classify_code(w.code);
                        out[w.index] = match class {
                            Class::Duplicate => WriteResult::Duplicate,
                            _ => WriteResult::Failed {
                                class,
                                code: w.code,
                                message: with_info(&w.message, w.details.as_ref()),
                            },
                        };
                    }
                    Ok(out)
                }
                _ => Err(SinkError::Mongo(e)),
            },
        }
    }

    /// Several update statements in one unordered `update` command (no
    /// upserts); one result per statement.
    pub async fn update_bulk(
        &self,
        db: Db,
        coll: &str,
        stmts: &[UpdateStmt],
    ) -> Result<Vec<WriteResult>, SinkError> {
        let mut out = Vec::with_capacity(stmts.len());
        for chunk in stmts.chunks(500) {
            out.extend(self.update_chunk(db, coll, chunk).await?);
        }
        Ok(out)
    }

    async fn update_chunk(
        &self,
        db: Db,
        coll: &str,
        stmts: &[UpdateStmt],
    ) -> Result<Vec<WriteResult>, SinkError> {
        let updates: Vec<Bson> = stmts
            .iter()
            .map(|s| {
                Bson::Document(doc! {
                    "q": s.q.clone(),
                    "u": s.u.clone(),
                    "upsert": false,
                    "multi": s.multi,
                })
            })
            .collect();
        let mut cmd = doc! {"update": coll, "updates": updates, "ordered": false};
        if let Some(wc) = self.db(db).write_concern() {
            if let Ok(wc) = bson::serialize_to_document(wc) {
                if !wc.is_empty() {
                    cmd.insert("writeConcern", wc);
                }
            }
        }
        let database = self.db(db).clone();
        let started = Instant::now();
        let reply = self
            .timed(&format!("update {coll}"), async move {
                Ok(database.run_command(cmd).await?)
            })
            .await?;
        if let Some(m) = &self.metrics {
            m.observe(coll, stmts.len(), started);
        }
        if let Ok(wce) = reply.get_document("writeConcernError") {
            return Err(SinkError::Command {
                op: "update",
                target: coll.to_string(),
                detail: format!("write concern error: {wce}"),
            });
        }
        let mut out = vec![WriteResult::Ok; stmts.len()];
        if let Ok(errs) = reply.get_array("writeErrors") {
            for e in errs.iter().filter_map(Bson::as_document) {
                let index = int_of(e.get("index")).unwrap_or(-1);
                let code = int_of(e.get("code")).unwrap_or(0) as i32;
                let message = with_info(
                    e.get_str("errmsg").unwrap_or(""),
                    e.get_document("errInfo").ok(),
                );
                if index >= 0 && (index as usize) < out.len() {
                    let class = classify_code(code);
                    out[index as usize] = match class {
                        Class::Duplicate => WriteResult::Duplicate,
                        _ => WriteResult::Failed {
                            class,
                            code,
                            message,
                        },
                    };
                }
            }
        }
        Ok(out)
    }

    /// Number of documents in a collection.
    pub async fn count(&self, db: Db, coll: &str) -> Result<u64, SinkError> {
        let c = self.coll(db, coll);
        self.timed(&format!("count {coll}"), async move {
            Ok(c.count_documents(doc! {}).await?)
        })
        .await
    }

    /// `update_many` with the time limit.
    pub async fn update_many(
        &self,
        db: Db,
        coll: &str,
        filter: Document,
        update: Document,
    ) -> Result<u64, SinkError> {
        let c = self.coll(db, coll);
        self.timed(&format!("update {coll}"), async move {
            Ok(c.update_many(filter, update).await?.modified_count)
        })
        .await
    }

    /// Find with a projection, all results.
    pub async fn find_all(
        &self,
        db: Db,
        coll: &str,
        filter: Document,
        projection: Option<Document>,
    ) -> Result<Vec<Document>, SinkError> {
        let c = self.coll(db, coll);
        self.timed(&format!("find in {coll}"), async move {
            let cursor = match projection {
                Some(p) => c.find(filter).projection(p).await?,
                None => c.find(filter).await?,
            };
            Ok(cursor.try_collect().await?)
        })
        .await
    }
}

/// An integer from any numeric BSON value.
pub fn int_of(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(d) => Some(*d as i64),
        _ => None,
    }
}

fn with_info(msg: &str, info: Option<&Document>) -> String {
    match info {
        Some(i) if !i.is_empty() => {
            let json = serde_json::to_string(&Bson::Document(i.clone()).into_relaxed_extjson())
                .unwrap_or_default();
            format!("{msg}; errInfo: {json}")
        }
        _ => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(uri: &str) -> MongoConfig {
        MongoConfig {
            uri: uri.into(),
            ..MongoConfig::default()
        }
    }

    #[tokio::test]
    async fn writes_are_journaled_on_a_majority_unless_the_uri_says_otherwise() {
        // Connecting is lazy: no server is needed to read the options.
        let s = Store::connect(
            &cfg("mongodb://127.0.0.1:1/?retryWrites=false"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let wc = s.client.write_concern().unwrap();
        assert_eq!(wc.w, Some(Acknowledgment::Majority));
        assert_eq!(wc.journal, Some(true));
        let s = Store::connect(
            &cfg("mongodb://127.0.0.1:1/?w=1&journal=false"),
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let wc = s.client.write_concern().unwrap();
        assert_eq!(wc.w, Some(Acknowledgment::Nodes(1)));
        assert_eq!(wc.journal, Some(false));
    }
}
