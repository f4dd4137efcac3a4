//! The sink worker: one [`Handler`] per `sink_*` durable consumer.
//!
//! Each batch the consume loop hands over (one pull request: up to
//! `worker.batch_size` messages, or what arrived before `pull_expires_ms`) is
//! written in one pass:
//! 1. every message is mapped to its document ([`crate::mapping`]), or to
//!    its documents: an order-events message may carry several events of one
//!    order, one `order_events` document each. A message that cannot be
//!    mapped is rejected whole (→ `dlq.sink`), nothing of it written;
//! 2. documents are inserted with one unordered `insert_many` per collection;
//!    a duplicate key means "already stored" and counts as success;
//! 3. the lifecycle flags are set with guarded, set-based updates
//!    (`raw_signals.processed`, `standardized_signals.processed_by_cerebro`,
//!    `trading_orders.status` by rank, `raw_signals.error` of dead-lettered
//!    raw signals). Each side first writes its own document and then looks
//!    for the other side, so whichever of two related messages is stored
//!    last sets the flag. A side that flags the other side's documents
//!    either sends the guarded update blind, or first looks for the
//!    documents still unflagged and updates only those, whichever its recent
//!    batches found cheaper ([`HitRate`]);
//! 4. only then does the loop ack: a message is acked when Mongo has
//!    acknowledged its documents and their follow-ups. A message with
//!    several documents gets one outcome: retried if any of its documents
//!    must be retried, else rejected if any was refused (the others stay
//!    stored; a redrive finds them as duplicates), else acked (duplicate
//!    when all were already stored). Metrics count documents.
//!
//! Every follow-up filter leads with an equality or `$in` on an indexed key
//! and has no top-level `$or`: a filter the server cannot answer from the
//! key's index scans the whole collection once per statement (the stand-in
//! does that for `$or`), and a batch of such statements on a large
//! collection outlasts the operation time limit on every retry.
//!
//! Two batches of a consumer may be in flight at once
//! (`worker.max_batches_in_flight`): the next batch is pulled and mapped
//! while the previous one is written and acked, but the batches of one
//! consumer take turns at MongoDB (insert and follow-ups of one batch, then
//! the next), and at most `sink.writers` (default 2) batches of the whole
//! process write at once. On a CPU-bound server more concurrent commands
//! only add latency and cost more server time than they hide (`mtx bench
//! sink`). A slow write is waited for and never dropped half-way
//! ([`Store::timed`]): the consume loop keeps the batch's messages in
//! progress, and the operation limit is the ack wait (10–60 s). Giving up
//! sooner only sent a busy server the same write again; a timeout is
//! retried, but only the ping watcher and connection errors count as an
//! outage. The wait for a turn is bounded (then the batch goes anyway):
//! nothing above depends on turns or batch order, documents are keyed,
//! follow-ups are guarded and set-based.
//!
//! Mongo away: the readiness flag `mongo (sink)` drops, batches wait a few
//! seconds for it and are otherwise NAKed with a delay that grows with the
//! delivery count (back-pressure, not a redelivery storm); nothing is acked,
//! and writing resumes by itself once the pinger reaches Mongo again. A
//! document the server's validator refuses is rejected with the server's
//! error (→ `dlq.sink`), never retried forever.

use crate::error::{Class, SinkError};
use crate::mapping::{event_update, status_filter, ErrorTarget, Follow, Kind, Mapper, Prepared};
use crate::spec::{names, Db};
use crate::store::{int_of, Store, UpdateStmt, WriteResult};
use bson::{doc, Bson, DateTime, Document};
use mtx_runtime::health::ReadyFlag;
use mtx_runtime::process::Process;
use mtx_runtime::{Delivery, Handler, Outcome};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The durable consumers' worker pool name in the topology.
pub const POOL: &str = "sink";
/// Stage name of the sink (metric label, `dlq.sink`).
pub const STAGE: &str = "sink";

/// Sink metrics on the process registry (names in `deploy/prometheus/METRICS.md`).
#[derive(Clone)]
pub struct SinkMetrics {
    /// `mtx_mongo_documents_total{collection,result}`: documents by
    /// collection and result (`ok` written, `duplicate` already there,
    /// `rejected` refused by the server (dead-lettered), `error` failed and
    /// retried).
    pub documents: IntCounterVec,
    /// `mtx_mongo_up`: 1 while the sink reaches Mongo.
    pub mongo_up: IntGauge,
    /// `mtx_sink_batch_duration_seconds{stream}`: time to write one batch
    /// (documents and follow-ups), by stream.
    pub batch_seconds: HistogramVec,
    /// Per bulk write: `mtx_mongo_write_duration_seconds{collection}` and
    /// `mtx_mongo_batch_size`.
    pub writes: crate::store::WriteMetrics,
}

impl SinkMetrics {
    /// Register on `registry`.
    pub fn new(registry: &Registry) -> Result<SinkMetrics, prometheus::Error> {
        let documents = IntCounterVec::new(
            Opts::new(
                "mtx_mongo_documents_total",
                "Documents the sink wrote, by collection and result (ok, duplicate, rejected, error)",
            ),
            &["collection", "result"],
        )?;
        let mongo_up = IntGauge::new("mtx_mongo_up", "1 while the sink reaches MongoDB, else 0")?;
        let batch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "mtx_sink_batch_duration_seconds",
                "Time to write one batch to MongoDB (documents and follow-ups), by stream",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["stream"],
        )?;
        let writes = crate::store::WriteMetrics::new(registry)?;
        registry.register(Box::new(documents.clone()))?;
        registry.register(Box::new(mongo_up.clone()))?;
        registry.register(Box::new(batch_seconds.clone()))?;
        Ok(SinkMetrics {
            documents,
            mongo_up,
            batch_seconds,
            writes,
        })
    }
}

/// Timing knobs, derived from the consumer's ack wait.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a batch waits for Mongo to come back before it is NAKed.
    pub wait_for_mongo: Duration,
    /// First NAK delay; doubles per delivery, capped at [`Timing::max_retry_delay`].
    pub retry_delay: Duration,
    /// Largest NAK delay.
    pub max_retry_delay: Duration,
    /// Time limit of one Mongo operation, and of the wait for a batch's
    /// turn at Mongo (`sink.writers`).
    pub op_timeout: Duration,
}

impl Timing {
    /// Defaults for a consumer with `ack_wait`.
    ///
    /// The operation limit is generous (the ack wait, at least 10 s, at most
    /// 60 s): the consume loop marks a batch's messages in progress while
    /// the sink works on them, so a slow write keeps its messages, and a
    /// server that is merely busy is waited for rather than given up on and
    /// sent the same write again (which only adds to its load). The limit
    /// still bounds a command the server accepted and never answers; an
    /// unreachable server fails much sooner (server selection, 3 s).
    pub fn for_ack_wait(ack_wait: Duration) -> Timing {
        Timing {
            wait_for_mongo: (ack_wait / 6)
                .clamp(Duration::from_millis(500), Duration::from_secs(5)),
            retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(30),
            op_timeout: ack_wait.clamp(Duration::from_secs(10), Duration::from_secs(60)),
        }
    }

    /// NAK delay for a message on its `deliveries`-th delivery: the base
    /// delay × deliveries², capped (1 s, 4 s, 9 s, … 30 s): the first nine
    /// deliveries span about three minutes of outage before `max_deliver`
    /// (10) would dead-letter a message, while one NAKed early in a short
    /// outage is back within seconds of Mongo's return.
    ///
    /// Note: when the consumer has a `backoff` (the topology's default),
    /// nats-server (observed on 2.15.1) adds `backoff[n-1] − ack_wait` to the delay of
    /// the n-th delivery's NAK, so the real waits are longer from the second
    /// delivery on (about 34 s, 99 s, 226 s, … with ack_wait 30 s).
    pub fn delay(&self, deliveries: u64) -> Duration {
        let d = deliveries.clamp(1, 1_000) as u32;
        self.retry_delay
            .saturating_mul(d * d)
            .min(self.max_retry_delay)
    }
}

/// How often a guarded flag update on the other side of a link had
/// something to flag: the share of keys (per cent) of recent batches,
/// halved towards each new batch's share.
///
/// It picks how the update is sent; both ways are correct (guarded,
/// set-based, sent after our own write):
/// - blind: one `update_many` by key, the cheapest way when the documents
///   are usually there (the raw signal is normally stored before its
///   standardized signal);
/// - look first: a `find` of the still unflagged documents, then an
///   `update_many` by `_id` of those only, if any. A multi-update that
///   matches nothing costs the server at least as much as the `find` (the
///   stand-in: twice as much), so this is cheaper when the documents are
///   usually not there yet (standardized signals replayed or stored ahead
///   of their raw signals, `mtx bench sink`).
#[derive(Debug)]
pub struct HitRate(AtomicU32);

impl HitRate {
    /// Below this share (per cent) the update looks first.
    pub const LOOK_FIRST_BELOW: u32 = 25;

    /// A rate starting at `percent`.
    pub fn new(percent: u32) -> HitRate {
        HitRate(AtomicU32::new(percent.min(100)))
    }

    /// The current share, per cent.
    pub fn percent(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// True when the next update should look first.
    pub fn look_first(&self) -> bool {
        self.percent() < Self::LOOK_FIRST_BELOW
    }

    /// One batch: `hits` of its `keys` had something to flag.
    pub fn observe(&self, hits: usize, keys: usize) {
        if keys == 0 {
            return;
        }
        let share = (hits.min(keys) * 100 / keys) as u32;
        // Races between batches only blur the average; no update is lost
        // that matters for correctness.
        let old = self.percent();
        self.0.store((old + share) / 2, Ordering::Relaxed);
    }
}

/// Shared state of all sink handlers of a process.
pub struct SinkCore {
    store: Store,
    mapper: Mapper,
    mongo_up: ReadyFlag,
    schema_ok: ReadyFlag,
    down_since: Mutex<Option<Instant>>,
    metrics: SinkMetrics,
    timing: Timing,
    /// One turn at MongoDB per consumer (kind) at a time …
    turns: HashMap<Kind, tokio::sync::Mutex<()>>,
    /// … and `sink.writers` for the process.
    writers: tokio::sync::Semaphore,
    /// `raw_signals.processed` set by standardized signals.
    raw_link: HitRate,
    /// `standardized_signals.processed_by_cerebro` set by decisions.
    decision_link: HitRate,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Per-document state while a batch is written (a message has one slot
/// per document it maps to, see [`Mapper::prepare_all`]).
enum Slot {
    Done(Outcome),
    Pending(Box<Prepared>),
    Stored {
        prepared: Box<Prepared>,
        inserted: bool,
    },
}

/// The outcome of one message, folded from the outcomes of its documents:
/// any retry → retry (the first one); else any rejection → reject (the
/// first one); else every document stored → ok if at least one was
/// inserted, duplicate if all were already there.
#[derive(Debug, Default)]
struct Fold {
    retry: Option<Outcome>,
    reject: Option<Outcome>,
    inserted: bool,
    stored: bool,
}

impl Fold {
    /// A document with a final outcome.
    fn add(&mut self, o: Outcome) {
        match o {
            Outcome::Retry { .. } => {
                self.retry.get_or_insert(o);
            }
            Outcome::Reject { .. } => {
                self.reject.get_or_insert(o);
            }
            Outcome::Duplicate => self.stored = true,
            Outcome::Ok(_) => {
                self.stored = true;
                self.inserted = true;
            }
        }
    }

    /// A document stored by this batch (`inserted`) or found already stored.
    fn add_stored(&mut self, inserted: bool) {
        self.stored = true;
        self.inserted |= inserted;
    }

    /// The message's outcome; `retry_after` if it had no document at all
    /// (never: every message has at least one slot).
    fn outcome(self, retry_after: Duration) -> Outcome {
        if let Some(o) = self.retry.or(self.reject) {
            o
        } else if self.inserted {
            Outcome::Ok(vec![])
        } else if self.stored {
            Outcome::Duplicate
        } else {
            Outcome::retry(retry_after, "not written")
        }
    }
}

impl SinkCore {
    /// Assemble a core (see [`spawn`] for the usual way).
    pub fn new(
        store: Store,
        mapper: Mapper,
        mongo_up: ReadyFlag,
        schema_ok: ReadyFlag,
        metrics: SinkMetrics,
        timing: Timing,
    ) -> SinkCore {
        SinkCore {
            store,
            mapper,
            mongo_up,
            schema_ok,
            down_since: Mutex::new(None),
            metrics,
            timing,
            turns: Kind::ALL
                .iter()
                .map(|k| (*k, tokio::sync::Mutex::new(())))
                .collect(),
            writers: tokio::sync::Semaphore::new(
                mtx_runtime::config::SinkConfig::default().writers,
            ),
            raw_link: HitRate::new(50),
            decision_link: HitRate::new(50),
        }
    }

    /// At most `n` (≥ 1) batches of this process write at once (`sink.writers`; 2 by default).
    pub fn with_writers(mut self, n: usize) -> SinkCore {
        self.writers = tokio::sync::Semaphore::new(n.max(1));
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The sink's metrics.
    pub fn metrics(&self) -> &SinkMetrics {
        &self.metrics
    }

    fn set_mongo(&self, up: bool, why: &str) {
        if up != self.mongo_up.get() {
            if up {
                tracing::info!("mongo reachable; sink ready");
            } else {
                tracing::warn!(
                    error = why,
                    "mongo unavailable; sink not ready, NAKing with delay"
                );
            }
        }
        {
            let mut since = lock(&self.down_since);
            if up {
                *since = None;
            } else if since.is_none() {
                *since = Some(Instant::now());
            }
        }
        self.mongo_up.set(up);
        self.metrics.mongo_up.set(up as i64);
    }

    /// True when Mongo is up, waiting for it only while the outage is
    /// younger than `wait_for_mongo` (a blip). Later batches are NAKed at
    /// once: holding them would leave messages of the pull request in hand
    /// past their ack wait, and those come back only after the consumer's
    /// backoff (tens of seconds).
    async fn wait_for_mongo(&self) -> bool {
        loop {
            if self.mongo_up.get() {
                return true;
            }
            let since = *lock(&self.down_since).get_or_insert_with(Instant::now);
            if since.elapsed() >= self.timing.wait_for_mongo {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// True once the unique natural-key indexes are known to exist (checked
    /// until they do): the sink never writes into unmigrated collections,
    /// where a redelivery would store a second copy.
    async fn schema_ready(&self) -> bool {
        if self.schema_ok.get() {
            return true;
        }
        match crate::migrate::missing_unique_keys(&self.store).await {
            Ok(missing) if missing.is_empty() => {
                tracing::info!("natural-key indexes present; sink writes");
                self.schema_ok.set(true);
                true
            }
            Ok(missing) => {
                tracing::error!(
                    missing = %missing.join(", "),
                    "the databases are not migrated: run `mtx db migrate`; not writing"
                );
                false
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }

    /// Ping Mongo until `shutdown`, keeping the readiness flag current.
    /// One ping that times out on a busy server is tolerated; a second in
    /// a row, or any other failure (refused, unreachable), turns readiness off.
    pub async fn watch_mongo(self: Arc<Self>, shutdown: CancellationToken) {
        let mut slow = 0u32;
        loop {
            let ok = match self.store.ping().await {
                Ok(()) => {
                    slow = 0;
                    self.set_mongo(true, "");
                    true
                }
                Err(SinkError::Timeout(_)) if slow == 0 && self.mongo_up.get() => {
                    slow += 1;
                    tracing::warn!("mongo ping timed out; still ready until the next ping");
                    false
                }
                Err(e) => {
                    self.set_mongo(false, &e.to_string());
                    false
                }
            };
            let pause = if ok {
                Duration::from_secs(2)
            } else {
                Duration::from_millis(500)
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    fn count(&self, coll: &str, result: &str, n: u64) {
        if n > 0 {
            self.metrics
                .documents
                .with_label_values(&[coll, result])
                .inc_by(n);
        }
    }

    /// Write one batch of a `kind` consumer; one outcome per message.
    pub async fn write_batch(&self, kind: Kind, msgs: &[Delivery]) -> Vec<Outcome> {
        let started = Instant::now();
        let now = DateTime::now();
        // One slot per document; `owners[j]` is the message of slot `j`
        // (an order-events message may carry several documents).
        let mut slots: Vec<Slot> = Vec::with_capacity(msgs.len());
        let mut owners: Vec<usize> = Vec::with_capacity(msgs.len());
        for (i, d) in msgs.iter().enumerate() {
            match self.mapper.prepare_all(kind, d, now) {
                Ok(ps) if !ps.is_empty() => {
                    for p in ps {
                        slots.push(Slot::Pending(Box::new(p)));
                        owners.push(i);
                    }
                }
                Ok(_) => {
                    tracing::error!(seq = d.stream_seq, "message mapped to no document");
                    slots.push(Slot::Done(Outcome::reject(
                        "internal",
                        "the message maps to no document",
                    )));
                    owners.push(i);
                }
                Err(r) => {
                    tracing::warn!(reason = r.reason, detail = %r.detail, seq = d.stream_seq, "unmappable message");
                    slots.push(Slot::Done(Outcome::reject(r.reason, r.detail)));
                    owners.push(i);
                }
            }
        }
        // The delivery count of each slot's message (its retry delay).
        let deliveries: Vec<u64> = owners.iter().map(|&i| msgs[i].deliveries).collect();
        if slots.iter().any(|s| matches!(s, Slot::Pending(_))) {
            if !self.wait_for_mongo().await {
                self.retry_pending(&mut slots, &deliveries, "mongo unavailable");
            } else if !self.schema_ready().await {
                self.retry_pending(&mut slots, &deliveries, "databases not migrated");
            } else {
                let _turn = self.turn(kind).await;
                self.insert(&mut slots, &deliveries).await;
                self.follow_up(&mut slots, &deliveries, now).await;
            }
        }
        let mut folds: Vec<Fold> = msgs.iter().map(|_| Fold::default()).collect();
        for (s, &i) in slots.into_iter().zip(&owners) {
            let d = &msgs[i];
            let fold = &mut folds[i];
            match s {
                // A dead letter is never dead-lettered again (that would loop
                // through dlq.sink): it stays in the DLQ stream and is retried.
                Slot::Done(Outcome::Reject { reason, detail }) if kind == Kind::DeadLetters => {
                    tracing::error!(%reason, %detail, seq = d.stream_seq, "dead letter refused by MongoDB; retrying");
                    fold.add(Outcome::retry(
                        self.timing.max_retry_delay,
                        format!("{reason}: {detail}"),
                    ));
                }
                Slot::Done(o) => fold.add(o),
                Slot::Stored { inserted, .. } => fold.add_stored(inserted),
                Slot::Pending(_) => fold.add(Outcome::retry(
                    self.timing.delay(d.deliveries),
                    "not written",
                )),
            }
        }
        let outcomes: Vec<Outcome> = folds
            .into_iter()
            .zip(msgs)
            .map(|(f, d)| f.outcome(self.timing.delay(d.deliveries)))
            .collect();
        self.metrics
            .batch_seconds
            .with_label_values(&[kind.stream()])
            .observe(started.elapsed().as_secs_f64());
        outcomes
    }

    /// Wait until the consumer's previous batch is written and one of the
    /// process's `sink.writers` is free, at most `op_timeout` (then the batch
    /// writes anyway: turns only save server time, correctness never
    /// depends on them).
    async fn turn(
        &self,
        kind: Kind,
    ) -> Option<(
        tokio::sync::MutexGuard<'_, ()>,
        tokio::sync::SemaphorePermit<'_>,
    )> {
        let mine = self.turns.get(&kind)?;
        tokio::time::timeout(self.timing.op_timeout, async {
            let guard = mine.lock().await;
            let permit = self.writers.acquire().await.ok()?;
            Some((guard, permit))
        })
        .await
        .ok()
        .flatten()
    }

    fn retry_pending(&self, slots: &mut [Slot], deliveries: &[u64], reason: &str) {
        for (s, &n) in slots.iter_mut().zip(deliveries) {
            if let Slot::Pending(p) | Slot::Stored { prepared: p, .. } = s {
                self.count(p.coll, "error", 1);
                *s = Slot::Done(Outcome::retry(self.timing.delay(n), reason));
            }
        }
    }

    /// Log-ready text of a failed operation; a retryable failure that says
    /// the server cannot be reached flips readiness. A timeout does not: a
    /// slow answer (a busy server) is not an outage, and flipping would make
    /// every consumer NAK its batches for one slow write. The ping watcher
    /// ([`SinkCore::watch_mongo`]) still turns readiness off within seconds
    /// when the server stops answering at all.
    fn failed(&self, e: &SinkError) -> String {
        if e.class() == Class::Retryable && !matches!(e, SinkError::Timeout(_)) {
            self.set_mongo(false, &e.to_string());
        }
        e.to_string()
    }

    /// Step 2: one unordered insert per collection.
    async fn insert(&self, slots: &mut [Slot], deliveries: &[u64]) {
        let mut groups: BTreeMap<(u8, &'static str), Vec<usize>> = BTreeMap::new();
        for (i, s) in slots.iter().enumerate() {
            if let Slot::Pending(p) = s {
                let db = match p.db {
                    Db::Trading => 0,
                    Db::BotCore => 1,
                };
                groups.entry((db, p.coll)).or_default().push(i);
            }
        }
        for ((db, coll), idx) in groups {
            let db = if db == 0 { Db::Trading } else { Db::BotCore };
            let docs: Vec<Document> = idx
                .iter()
                .filter_map(|&i| match &slots[i] {
                    Slot::Pending(p) => Some(p.doc.clone()),
                    _ => None,
                })
                .collect();
            match self.store.insert_unordered(db, coll, docs).await {
                Ok(results) => {
                    for (&i, r) in idx.iter().zip(results) {
                        let slot = std::mem::replace(&mut slots[i], Slot::Done(Outcome::Duplicate));
                        let Slot::Pending(p) = slot else { continue };
                        slots[i] = match r {
                            WriteResult::Ok => {
                                self.count(coll, "ok", 1);
                                Slot::Stored {
                                    prepared: p,
                                    inserted: true,
                                }
                            }
                            WriteResult::Duplicate => {
                                self.count(coll, "duplicate", 1);
                                Slot::Stored {
                                    prepared: p,
                                    inserted: false,
                                }
                            }
                            WriteResult::Failed {
                                class: Class::Permanent,
                                code,
                                message,
                            } => {
                                self.count(coll, "rejected", 1);
                                let reason = if code == crate::error::VALIDATION_FAILED {
                                    "validation_failed"
                                } else {
                                    "write_failed"
                                };
                                tracing::warn!(collection = coll, code, %message, "document rejected by MongoDB");
                                Slot::Done(Outcome::reject(
                                    reason,
                                    format!("{coll}: code {code}: {message}"),
                                ))
                            }
                            WriteResult::Failed { code, message, .. } => {
                                self.count(coll, "error", 1);
                                Slot::Done(Outcome::retry(
                                    self.timing.delay(deliveries[i]),
                                    format!("{coll}: code {code}: {message}"),
                                ))
                            }
                        };
                    }
                }
                Err(e) => {
                    let class = e.class();
                    let detail = self.failed(&e);
                    tracing::warn!(collection = coll, error = %detail, "insert failed");
                    for &i in &idx {
                        let o = if class == Class::Permanent {
                            self.count(coll, "rejected", 1);
                            Outcome::reject("write_failed", format!("{coll}: {detail}"))
                        } else {
                            self.count(coll, "error", 1);
                            Outcome::retry(
                                self.timing.delay(deliveries[i]),
                                format!("{coll}: {detail}"),
                            )
                        };
                        slots[i] = Slot::Done(o);
                    }
                }
            }
        }
    }

    /// Step 3: lifecycle flags. A failure turns the affected messages into
    /// retries (their documents are duplicates next time, the follow-up runs again).
    async fn follow_up(&self, slots: &mut [Slot], deliveries: &[u64], now: DateTime) {
        let stored: Vec<(usize, Follow)> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Slot::Stored { prepared, .. } => Some((i, prepared.follow.clone())),
                _ => None,
            })
            .collect();
        if stored.iter().all(|(_, f)| *f == Follow::None) {
            return;
        }
        match self.follow_ups(&stored, now).await {
            Ok(rejected) => {
                for (i, reason) in rejected {
                    slots[i] = Slot::Done(Outcome::reject("write_failed", reason));
                }
            }
            Err(e) => {
                let detail = self.failed(&e);
                tracing::warn!(error = %detail, "follow-up update failed; will retry");
                for (i, _) in &stored {
                    slots[*i] = Slot::Done(Outcome::retry(
                        self.timing.delay(deliveries[*i]),
                        format!("follow-up: {detail}"),
                    ));
                }
            }
        }
    }

    async fn follow_ups(
        &self,
        stored: &[(usize, Follow)],
        now: DateTime,
    ) -> Result<Vec<(usize, String)>, SinkError> {
        let mut raw_sigs = BTreeSet::new();
        let mut raw_ids = BTreeSet::new();
        let mut std_ids = BTreeSet::new();
        let mut decided = BTreeSet::new();
        let mut order_ids = BTreeSet::new();
        // order_id → (rank, set, owner)
        let mut events: HashMap<String, (i64, Document, usize)> = HashMap::new();
        let mut errors: Vec<(usize, ErrorTarget)> = Vec::new();
        for (i, f) in stored {
            match f {
                Follow::None => {}
                Follow::Raw {
                    raw_signal_id,
                    signal_id,
                } => {
                    raw_ids.insert(raw_signal_id.clone());
                    if let Some(s) = signal_id {
                        raw_sigs.insert(s.clone());
                    }
                }
                Follow::Standardized { signal_id } => {
                    std_ids.insert(signal_id.clone());
                }
                Follow::Decision { signal_id } => {
                    decided.insert(signal_id.clone());
                }
                Follow::Order { order_id } => {
                    order_ids.insert(order_id.clone());
                }
                Follow::Event {
                    order_id,
                    rank,
                    set,
                } => {
                    let e = events
                        .entry(order_id.clone())
                        .or_insert((*rank, set.clone(), *i));
                    if *rank > e.0 {
                        *e = (*rank, set.clone(), *i);
                    }
                }
                Follow::DeadLetter { target: Some(t) } => errors.push((*i, t.clone())),
                Follow::DeadLetter { target: None } => {}
            }
        }
        let mut rejected = Vec::new();

        // Phase 1: what exists on the other side of each link (and the raw
        // flags this batch's standardized signals set). One command at a
        // time, like the batches of a consumer (see the module doc).
        let found_std = if raw_sigs.is_empty() {
            BTreeSet::new()
        } else {
            self.ids_present(names::STANDARDIZED_SIGNALS, "signal_id", &raw_sigs)
                .await?
        };
        let found_dec = if std_ids.is_empty() {
            BTreeSet::new()
        } else {
            self.ids_present(names::CEREBRO_DECISIONS, "signal_id", &std_ids)
                .await?
        };
        let dl_raw = if raw_ids.is_empty() {
            vec![]
        } else {
            self.raw_dead_letter_errors(&raw_ids).await?
        };
        let evs = if order_ids.is_empty() {
            vec![]
        } else {
            self.store
                .find_all(
                    Db::Trading,
                    names::ORDER_EVENTS,
                    doc! {"order_id": {"$in": to_bson(&order_ids)}},
                    None,
                )
                .await?
        };
        // raw_signals.processed ← this batch's standardized signals.
        self.flag_others(
            &self.raw_link,
            names::RAW_SIGNALS,
            "signal_id",
            &std_ids,
            doc! {"processed": false},
            doc! {"$set": {"processed": true, "processed_at": now}},
        )
        .await?;
        errors.extend(dl_raw.into_iter().map(|t| (usize::MAX, t)));

        // trading_orders.status ← the newest event, forward only.
        for ev in evs {
            let (Ok(order_id), Ok(status)) = (ev.get_str("order_id"), ev.get_str("status")) else {
                continue;
            };
            let seq = int_of(ev.get("seq")).unwrap_or(0);
            let (rank, set) = event_update(&ev, status, seq, now);
            let e = events
                .entry(order_id.to_string())
                .or_insert((rank, set.clone(), usize::MAX));
            if rank > e.0 {
                *e = (rank, set, usize::MAX);
            }
        }
        let mut status_stmts = Vec::new();
        let mut status_owners = Vec::new();
        for (order_id, (rank, set, owner)) in &events {
            status_owners.push(*owner);
            status_stmts.push(UpdateStmt {
                q: status_filter(order_id, *rank),
                u: doc! {"$set": set.clone()},
                multi: false,
            });
        }

        // error ← dead letters: the newest error wins. `error.at` not ≥ the
        // letter's time matches no error, a null error and an older one;
        // the key's index answers it (a top-level `$or` would scan the
        // collection per statement on the stand-in).
        let mut by_coll: BTreeMap<&'static str, (Vec<UpdateStmt>, Vec<usize>)> = BTreeMap::new();
        for (owner, t) in errors {
            let at = t.error.get("at").cloned().unwrap_or(Bson::DateTime(now));
            let e = by_coll.entry(t.coll).or_default();
            e.0.push(UpdateStmt {
                q: error_filter(t.key_field, &t.key, at),
                u: doc! {"$set": {"error": t.error}},
                multi: true,
            });
            e.1.push(owner);
        }
        let raw_err = by_coll.remove(names::RAW_SIGNALS).unwrap_or_default();

        // Phase 2: the flags.
        // raw_signals.processed ← the standardized signals found for this
        // batch's raw signals (known to be there).
        if !found_std.is_empty() {
            self.flag_raw_processed(&found_std, now).await?;
        }
        let pbc_unflagged = || doc! {"processed_by_cerebro": false};
        let pbc_set =
            || doc! {"$set": {"processed_by_cerebro": true, "processed_by_cerebro_at": now}};
        // standardized_signals.processed_by_cerebro ← the decisions found
        // for this batch's standardized signals (known to be there).
        if !found_dec.is_empty() {
            let mut q = doc! {"signal_id": {"$in": to_bson(&found_dec)}};
            q.extend(pbc_unflagged());
            self.store
                .update_many(Db::Trading, names::STANDARDIZED_SIGNALS, q, pbc_set())
                .await?;
        }
        // standardized_signals.processed_by_cerebro ← this batch's decisions.
        self.flag_others(
            &self.decision_link,
            names::STANDARDIZED_SIGNALS,
            "signal_id",
            &decided,
            pbc_unflagged(),
            pbc_set(),
        )
        .await?;
        let status_res = self
            .store
            .update_bulk(Db::Trading, names::TRADING_ORDERS, &status_stmts)
            .await?;
        let raw_err_res = self
            .store
            .update_bulk(Db::Trading, names::RAW_SIGNALS, &raw_err.0)
            .await?;
        check_bulk(status_res, &status_owners, &mut rejected)?;
        check_bulk(raw_err_res, &raw_err.1, &mut rejected)?;
        Ok(rejected)
    }

    /// `raw_signals.processed` for the raw signals of these signal ids.
    async fn flag_raw_processed(
        &self,
        signal_ids: &BTreeSet<String>,
        now: DateTime,
    ) -> Result<u64, SinkError> {
        self.store
            .update_many(
                Db::Trading,
                names::RAW_SIGNALS,
                doc! {"signal_id": {"$in": to_bson(signal_ids)}, "processed": false},
                doc! {"$set": {"processed": true, "processed_at": now}},
            )
            .await
    }

    /// Set a flag on the trading documents of `coll` whose `key` is one of
    /// `keys` and that still match `unflagged`: blind, or after looking for
    /// them, as `rate` says ([`HitRate`]). Returns the documents modified.
    async fn flag_others(
        &self,
        rate: &HitRate,
        coll: &str,
        key: &str,
        keys: &BTreeSet<String>,
        unflagged: Document,
        set: Document,
    ) -> Result<u64, SinkError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut by_key = doc! {key: {"$in": to_bson(keys)}};
        by_key.extend(unflagged.clone());
        if !rate.look_first() {
            let n = self
                .store
                .update_many(Db::Trading, coll, by_key, set)
                .await?;
            rate.observe(usize::try_from(n).unwrap_or(usize::MAX), keys.len());
            return Ok(n);
        }
        let found = self
            .store
            .find_all(Db::Trading, coll, by_key, Some(doc! {"_id": 1, key: 1}))
            .await?;
        let hits: BTreeSet<&str> = found.iter().filter_map(|d| d.get_str(key).ok()).collect();
        rate.observe(hits.len(), keys.len());
        let ids: Vec<Bson> = found.iter().filter_map(|d| d.get("_id").cloned()).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let mut by_id = doc! {"_id": {"$in": ids}};
        by_id.extend(unflagged);
        self.store.update_many(Db::Trading, coll, by_id, set).await
    }

    /// Which of `ids` exist as `field` in `coll`.
    async fn ids_present(
        &self,
        coll: &str,
        field: &str,
        ids: &BTreeSet<String>,
    ) -> Result<BTreeSet<String>, SinkError> {
        let docs = self
            .store
            .find_all(
                Db::Trading,
                coll,
                doc! {field: {"$in": to_bson(ids)}},
                Some(doc! {field: 1, "_id": 0}),
            )
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| d.get_str(field).ok().map(str::to_string))
            .collect())
    }

    /// Errors to record on raw signals from dead letters of other stages
    /// (the standardizer's) about them.
    async fn raw_dead_letter_errors(
        &self,
        raw_ids: &BTreeSet<String>,
    ) -> Result<Vec<ErrorTarget>, SinkError> {
        let key_field = "raw_signal_id";
        let stream = mtx_subjects::topology::streams::SIGNALS_RAW;
        let docs = self
            .store
            .find_all(
                Db::Trading,
                names::DEAD_LETTERS,
                doc! {
                    key_field: {"$in": to_bson(raw_ids)},
                    "stage": {"$ne": STAGE},
                    "original_stream": stream,
                },
                Some(doc! {
                    key_field: 1, "stage": 1, "reason": 1, "detail": 1, "time": 1,
                    "dead_letter_id": 1, "_id": 0,
                }),
            )
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| {
                Some(ErrorTarget {
                    coll: names::RAW_SIGNALS,
                    key_field,
                    key: d.get_str(key_field).ok()?.to_string(),
                    error: doc! {
                        "stage": d.get("stage").cloned().unwrap_or(Bson::Null),
                        "reason": d.get("reason").cloned().unwrap_or(Bson::Null),
                        "detail": d.get("detail").cloned().unwrap_or(Bson::Null),
                        "at": d.get("time").cloned().unwrap_or(Bson::Null),
                        "dead_letter_id": d.get("dead_letter_id").cloned().unwrap_or(Bson::Null),
                    },
                })
            })
            .collect())
    }
}

fn to_bson(ids: &BTreeSet<String>) -> Vec<Bson> {
    ids.iter().map(|s| Bson::from(s.as_str())).collect()
}

/// The documents `key_field` = `key` whose `error` an error of time `at`
/// replaces: no error, a null error, or an older one (`error.at` not ≥
/// `at`). Equality on the indexed key and no top-level `$or`, so the key's
/// index answers it.
pub fn error_filter(key_field: &str, key: &str, at: Bson) -> Document {
    doc! {key_field: key, "error.at": {"$not": {"$gte": at}}}
}

/// Statement failures: retryable ones fail the whole follow-up, permanent
/// ones reject the message that owns the statement (if it is in this batch).
fn check_bulk(
    results: Vec<WriteResult>,
    owners: &[usize],
    rejected: &mut Vec<(usize, String)>,
) -> Result<(), SinkError> {
    for (r, owner) in results.into_iter().zip(owners) {
        match r {
            WriteResult::Ok | WriteResult::Duplicate => {}
            WriteResult::Failed {
                class: Class::Permanent,
                code,
                message,
            } => {
                tracing::error!(code, %message, "follow-up update refused by MongoDB");
                if *owner != usize::MAX {
                    rejected.push((*owner, format!("code {code}: {message}")));
                }
            }
            WriteResult::Failed { code, message, .. } => {
                return Err(SinkError::Command {
                    op: "update",
                    target: "follow-up".into(),
                    detail: format!("code {code}: {message}"),
                })
            }
        }
    }
    Ok(())
}

/// The handler bound to one `sink_*` consumer.
pub struct SinkHandler {
    core: Arc<SinkCore>,
    kind: Kind,
}

impl SinkHandler {
    /// A handler writing `kind` messages through `core`.
    pub fn new(core: Arc<SinkCore>, kind: Kind) -> SinkHandler {
        SinkHandler { core, kind }
    }
}

impl Handler for SinkHandler {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        let mut v = self
            .core
            .write_batch(self.kind, std::slice::from_ref(msg))
            .await;
        v.pop()
            .unwrap_or_else(|| Outcome::retry(Duration::from_secs(1), "no outcome"))
    }

    async fn handle_batch(&self, msgs: &[Delivery], _concurrency: usize) -> Vec<Outcome> {
        self.core.write_batch(self.kind, msgs).await
    }

    /// Batches are independent (unique natural keys, guarded set-based
    /// follow-ups where each side writes before it looks for the other), so
    /// the next batch is pulled and mapped while the previous one is written
    /// and acked, and its insert goes out the moment the previous batch's
    /// follow-ups are done (the two take turns at MongoDB).
    fn batches_in_flight(&self) -> usize {
        2
    }
}

/// Start the sink pool on `process`: connect to Mongo, register the
/// `mongo (sink)` readiness flag and metrics, watch Mongo, and bind every
/// `sink_*` consumer of the topology.
pub async fn spawn(process: &mut Process) -> Result<Arc<SinkCore>, SinkError> {
    let mut timing =
        Timing::for_ack_wait(Duration::from_secs(process.config.topology.ack_wait_secs));
    if let Some(secs) = process.config.sink.op_timeout_secs {
        timing.op_timeout = Duration::from_secs(secs);
    }
    let metrics = SinkMetrics::new(&process.registry)?;
    let store = Store::connect(&process.config.mongo, timing.op_timeout)
        .await?
        .with_metrics(metrics.writes.clone());
    let flag = process.health.ready_flag("mongo (sink)");
    let schema_flag = process.health.ready_flag("mongo schema migrated (sink)");
    let core = Arc::new(
        SinkCore::new(
            store,
            Mapper::new(process.subjects.clone()),
            flag,
            schema_flag,
            metrics,
            timing,
        )
        .with_writers(process.config.sink.writers),
    );
    // One ping up front, so readiness is right from the first batch.
    match core.store.ping().await {
        Ok(()) => {
            core.set_mongo(true, "");
            core.schema_ready().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "mongo unreachable at start; the sink waits for it");
            core.set_mongo(false, &e.to_string());
        }
    }
    process.spawn(core.clone().watch_mongo(process.shutdown.clone()));
    let bindings: Vec<(String, Kind)> = process
        .topology
        .pool_consumers(POOL)
        .map(|c| {
            let base = process
                .topology
                .streams
                .iter()
                .find(|s| s.config.name == c.stream)
                .map(|s| s.base)
                .unwrap_or_default();
            Kind::for_stream(base)
                .map(|k| (c.durable().to_string(), k))
                .ok_or_else(|| {
                    SinkError::Config(format!(
                        "sink consumer {} reads stream {} the sink cannot map",
                        c.durable(),
                        c.stream
                    ))
                })
        })
        .collect::<Result<_, _>>()?;
    if bindings.is_empty() {
        return Err(SinkError::Config(
            "the topology has no sink consumers".into(),
        ));
    }
    for (durable, kind) in bindings {
        process.spawn_consumer(
            STAGE,
            &durable,
            Arc::new(SinkHandler::new(core.clone(), kind)),
        )?;
    }
    tracing::info!("sink pool started");
    Ok(core)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_cap() {
        let t = Timing::for_ack_wait(Duration::from_secs(30));
        assert_eq!(t.delay(1), Duration::from_secs(1));
        assert_eq!(t.delay(3), Duration::from_secs(9));
        assert_eq!(t.delay(50), Duration::from_secs(30));
        let nine: Duration = (1..10).map(|d| t.delay(d)).sum();
        assert!(nine >= Duration::from_secs(170), "{nine:?}");
        assert_eq!(t.op_timeout, Duration::from_secs(30));
        assert!(t.wait_for_mongo <= Duration::from_secs(5));
        // A short ack wait (the chaos tests' 5 s) still gives a busy server 10 s.
        let short = Timing::for_ack_wait(Duration::from_secs(5));
        assert_eq!(short.op_timeout, Duration::from_secs(10));
    }

    #[test]
    fn hit_rate_looks_first_only_while_updates_keep_missing() {
        let r = HitRate::new(50);
        assert!(!r.look_first(), "blind until batches show misses");
        r.observe(0, 256);
        assert_eq!(r.percent(), 25);
        assert!(!r.look_first());
        r.observe(0, 256);
        assert!(r.look_first(), "two batches that flagged nothing");
        r.observe(3, 0);
        assert!(r.look_first(), "an empty batch says nothing");
        r.observe(256, 256);
        assert!(!r.look_first(), "one batch that flagged everything");
        r.observe(1_000, 10);
        assert!(
            r.percent() <= 100,
            "modified copies beyond the keys count once"
        );
    }

    #[test]
    fn a_message_outcome_folds_its_documents() {
        let after = Duration::from_secs(4);
        let fold = |slots: Vec<Outcome>| {
            let mut f = Fold::default();
            for o in slots {
                f.add(o);
            }
            f.outcome(after)
        };
        let retry = || Outcome::retry(Duration::from_secs(9), "follow-up");
        let reject = |r: &str| Outcome::reject(r, "refused");
        assert!(matches!(
            fold(vec![Outcome::Ok(vec![]), Outcome::Duplicate]),
            Outcome::Ok(_)
        ));
        assert!(matches!(
            fold(vec![Outcome::Duplicate, Outcome::Duplicate]),
            Outcome::Duplicate
        ));
        assert!(matches!(
            fold(vec![Outcome::Ok(vec![]), reject("validation_failed"), reject("write_failed")]),
            Outcome::Reject { ref reason, .. } if reason == "validation_failed"
        ));
        assert!(matches!(
            fold(vec![reject("write_failed"), Outcome::Ok(vec![]), retry()]),
            Outcome::Retry { after, .. } if after == Duration::from_secs(9)
        ));
        assert!(matches!(fold(vec![]), Outcome::Retry { after: a, .. } if a == after));
        let mut f = Fold::default();
        f.add_stored(false);
        f.add_stored(false);
        assert!(matches!(f.outcome(after), Outcome::Duplicate));
        let mut f = Fold::default();
        f.add_stored(false);
        f.add_stored(true);
        assert!(matches!(f.outcome(after), Outcome::Ok(_)));
    }

    #[test]
    fn error_filter_leads_with_the_key_and_has_no_or() {
        let at = Bson::DateTime(DateTime::from_millis(1_000));
        let f = error_filter("raw_signal_id", "raw_1", at.clone());
        assert_eq!(f.keys().next().map(String::as_str), Some("raw_signal_id"));
        assert!(!f.contains_key("$or"));
        assert_eq!(
            f.get_document("error.at").unwrap(),
            &doc! {"$not": {"$gte": at}}
        );
    }
}
