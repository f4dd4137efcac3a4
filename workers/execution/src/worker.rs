//! The execution stage (`mtx run execution`): orders in, order events and
//! execution confirmations out, with no order ever filled twice.
//!
//! # Inputs and outputs
//!
//! | input | consumer | what happens |
//! |---|---|---|
//! | `orders.<account>.new` ([`Order`]) | `execution` on `ORDERS` | routed to the account's [`BrokerAdapter`] and submitted |
//! | `orders.<account>.cancel` ([`CancelOrder`]) | `execution` on `ORDERS` | cancel of a working order |
//! | `market.prices.<symbol>` ([`MarketPrice`]) | `execution_market` on `MARKET` | new mark: resting LIMIT / STOP orders may fill |
//! | clock (`execution.tick_ms`) | — | expiries; retry of unpublished outputs |
//!
//! Every [`VenueEvent`] becomes messages with deterministic `Nats-Msg-Id`s:
//! order status changes on `orders.<account>.events` (id
//! `<order_id>.<seq>`), fills, partial fills and rejections on
//! `executions.<account>` (id = `execution_id` =
//! `ids::execution_id(order_id, fill_seq)`), and child stop-loss /
//! take-profit orders on `orders.<account>.new` (id = their order id; the
//! worker reads them back as duplicates, the sink persists them).
//!
//! | problem | outcome |
//! |---|---|
//! | payload is not an order / cancel / price | DLQ `invalid_order` / `invalid_cancel` / `invalid_price` |
//! | subject account ≠ payload account, symbol ≠ subject | DLQ `account_mismatch` / `symbol_mismatch` |
//! | account has no adapter (`execution.adapters`, `default_adapter`) | DLQ `no_broker_adapter` |
//! | known order id with different contents | DLQ `conflicting_order` |
//! | known order id, same contents (re-send) | duplicate (ack) |
//! | cancel of an unknown order | DLQ `unknown_order` |
//! | cancel of a FILLED order (the fill won the race) | a venue's "too late to cancel": counted in `mtx_execution_cancel_rejects_total{reason="too_late"}`, acknowledged, nothing applied |
//! | any other cancel the state machine refuses (e.g. the order is already CANCELLED) | counted in `mtx_execution_invalid_transitions_total{from,event}`, logged, DLQ `invalid_transition`; nothing applied |
//! | state store unreachable, or written by another instance | state reloaded and the batch re-applied; redelivered if that keeps failing |
//!
//! # No fill twice, no fill lost
//!
//! The venue's state (working orders, marks, finished order ids) lives in
//! memory and in one key of the `execution_state` KV bucket, together with an
//! **outbox** of output messages not yet known to be published, and the set
//! of input stream sequences applied but not yet below their consumer's ack
//! floor. One batch (of either consumer, serialized by a lock) goes:
//!
//! 1. load the state from KV if not in memory; drop applied sequences at or
//!    below the consumer's ack floor (those can never be redelivered);
//! 2. for each input: an applied sequence is a redelivery → duplicate (ack);
//!    otherwise apply it to the adapter, append its outputs to the outbox and
//!    record its sequence;
//! 3. write the whole state with compare-and-set on the key's revision
//!    (a failure — another instance wrote, the store is down — throws the
//!    in-memory state away: nothing was decided; the state is reloaded and
//!    the batch applied again on top of it, and after a few failed attempts
//!    the batch is handed back for redelivery);
//! 4. publish the outbox (deterministic ids), drop what was acked (the
//!    persisted copy shrinks with the next write, at the latest one tick
//!    later);
//! 5. return: the consume loop acks the inputs.
//!
//! A fill is decided exactly once: at step 3, atomically with the record of
//! its input and with its outputs. Crash points:
//!
//! - before 3: nothing persisted, nothing published; the redelivered input
//!   is applied afresh.
//! - between 3 and 5 (the fill is persisted, maybe not published, the input
//!   not acked): on restart the state comes back from KV; the clock tick
//!   publishes the outbox again, byte for byte the same messages with the
//!   same ids (JetStream drops copies inside its duplicate window; beyond it
//!   the sink, the ledger and order-event consumers dedupe on
//!   `execution_id` / `(order_id, seq)`); the redelivered input finds its
//!   sequence applied and is acked without touching the venue.
//! - after 5: done.
//!
//! Because outputs are published from the persisted outbox (retried by the
//! tick until acked), a publish failure never loses a fill either, even if
//! the input runs out of deliveries. An order id already known to the venue
//! (a re-send, or a child order read back) is never submitted again: the
//! venue remembers finished orders for `topology.max_age_secs` — the age
//! limit of `ORDERS`, so no redelivery can outlive the memory.
//!
//! Limits: one key holds the whole venue (working orders in full, finished
//! orders as small records), so its size is bounded by NATS `max_payload`
//! (1 MiB by default; a warning is logged above 512 KiB). The paper venue is
//! one matching engine: run one execution replica (a second one is safe —
//! the compare-and-set makes them take turns — but not faster).
//!
//! # Crash injection
//!
//! For the restart tests, `FAILPOINTS=execution_after_fill_persisted` (or
//! `execution_after_fill_published`; `;`-separated with others) aborts the
//! process right after a batch that produced an execution confirmation has
//! been persisted (or published), i.e. between fill and ack. Unset in
//! production.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::FutureExt;
use mtx_runtime::config::{CommissionKind, Config};
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::publish::Publisher;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::headers;
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{CancelOrder, Order};
use mtx_schemas::{ExecutionStatus, OrderStatus};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::Subjects;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, OnceCell};

use crate::adapter::{self, BrokerAdapter, BrokerSnapshot, Routes};
use crate::fsm::{transition, EventKind};
use crate::paper::{order_fingerprint, Commission, CommissionModel, PaperConfig, VenueEvent};

/// Stage name of the orders loop: metric label, DLQ subject `dlq.execution`.
pub const STAGE: &str = "execution";
/// Stage name of the market-price loop (`dlq.execution_market`).
pub const STAGE_MARKET: &str = "execution_market";
/// Durable consumer on `ORDERS` (`orders.*.new`, `orders.*.cancel`).
pub const DURABLE_ORDERS: &str = "execution";
/// Durable consumer on `MARKET` (`market.prices.>`).
pub const DURABLE_MARKET: &str = "execution_market";
/// The key of the state in the `execution_state` bucket.
pub const STATE_KEY: &str = "venues";
/// Environment variable of the crash-injection point (tests only).
pub const FAILPOINT_ENV: &str = "FAILPOINTS";

const STATE_VERSION: u32 = 1;
const STATE_WARN_BYTES: usize = 512 * 1024;
/// Writes of one batch's state before the batch is handed back for redelivery.
const PERSIST_ATTEMPTS: u32 = 5;

/// Why the stage cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The topology lacks a bucket or consumer the stage needs.
    #[error("topology has no {0}")]
    Topology(String),
    /// The `[execution]` configuration is unusable.
    #[error("execution config: {0}")]
    Config(String),
    /// Spawning a consumer failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The stage's settings, from [`Config`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Adapter per account.
    pub routes: Routes,
    /// The paper venue's parameters.
    pub paper: PaperConfig,
    /// How long finished orders are remembered (≥ the `ORDERS` age limit).
    pub retain_finished: chrono::Duration,
    /// Clock period.
    pub tick: Duration,
    /// Delay before a failed batch is redelivered.
    pub retry_after: Duration,
}

impl Settings {
    /// Settings from the process config, validated (unknown adapters, bad
    /// venue parameters).
    pub fn from_config(cfg: &Config) -> Result<Settings, WorkerError> {
        let e = &cfg.execution;
        let p = &e.paper;
        let rate = p.commission.rate;
        let paper = PaperConfig {
            slippage_bps: p.slippage_bps,
            fill_ratio: p.fill_ratio,
            commission: Commission {
                model: match p.commission.model {
                    CommissionKind::PerShare => CommissionModel::PerShare(rate),
                    CommissionKind::PerContract => CommissionModel::PerContract(rate),
                    CommissionKind::Bps => CommissionModel::Bps(rate),
                },
                minimum: p.commission.minimum,
            },
            seed: p.seed,
            default_lot: p.default_lot,
            lot_sizes: p.lot_sizes.clone(),
        };
        crate::paper::PaperVenue::new(paper.clone())
            .map_err(|err| WorkerError::Config(format!("execution.paper: {err}")))?;
        let routes = Routes {
            accounts: e.adapters.clone(),
            default: (!e.default_adapter.is_empty()).then(|| e.default_adapter.clone()),
        };
        routes
            .validate()
            .map_err(|err| WorkerError::Config(format!("execution.adapters: {err}")))?;
        let secs = i64::try_from(cfg.topology.max_age_secs).unwrap_or(i64::MAX / 2);
        Ok(Settings {
            routes,
            paper,
            retain_finished: chrono::Duration::seconds(secs.max(1)),
            tick: Duration::from_millis(e.tick_ms.max(1)),
            retry_after: Duration::from_millis(cfg.worker.publish_retry_delay_ms),
        })
    }
}

/// Metrics of the stage (on the process registry).
#[derive(Clone)]
pub struct ExecutionMetrics {
    /// Refused state-machine transitions, by from-status and event.
    pub invalid_transitions: IntCounterVec,
    /// Cancels the venue answered with a cancel-reject, by reason
    /// (`too_late`: the order had already filled).
    pub cancel_rejects: IntCounterVec,
    /// Inputs by source (`orders`, `market`) and result (`applied`,
    /// `duplicate`, `already_applied`, `rejected`).
    pub inputs: IntCounterVec,
    /// Execution confirmations decided, by status.
    pub executions: IntCounterVec,
    /// Order events published, by lowercase status (`mtx_orders_total`, the
    /// ops contract in deploy/prometheus/METRICS.md).
    pub orders: IntCounterVec,
    /// Fills and partial fills published (`mtx_fills_total`).
    pub fills: IntCounter,
    /// State writes by result (`ok`, `error`).
    pub state_writes: IntCounterVec,
    /// Size of the last state written, bytes.
    pub state_bytes: IntGauge,
    /// Output messages waiting to be published.
    pub outbox: IntGauge,
}

impl ExecutionMetrics {
    /// Create and register.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = ExecutionMetrics {
            invalid_transitions: IntCounterVec::new(
                Opts::new(
                    "mtx_execution_invalid_transitions_total",
                    "Order state-machine transitions refused (never applied)",
                ),
                &["from", "event"],
            )?,
            cancel_rejects: IntCounterVec::new(
                Opts::new(
                    "mtx_execution_cancel_rejects_total",
                    "Cancels refused like a venue does (too late: already filled)",
                ),
                &["reason"],
            )?,
            inputs: IntCounterVec::new(
                Opts::new("mtx_execution_inputs_total", "Execution inputs by result"),
                &["source", "result"],
            )?,
            executions: IntCounterVec::new(
                Opts::new(
                    "mtx_execution_confirmations_total",
                    "Execution confirmations decided, by status",
                ),
                &["status"],
            )?,
            orders: IntCounterVec::new(
                Opts::new("mtx_orders_total", "Order events published, by status"),
                &["status"],
            )?,
            fills: IntCounter::new(
                "mtx_fills_total",
                "Fills and partial fills published on executions.<account>",
            )?,
            state_writes: IntCounterVec::new(
                Opts::new(
                    "mtx_execution_state_writes_total",
                    "Venue state writes to KV",
                ),
                &["result"],
            )?,
            state_bytes: IntGauge::new(
                "mtx_execution_state_bytes",
                "Size of the venue state last written",
            )?,
            outbox: IntGauge::new(
                "mtx_execution_outbox_messages",
                "Output messages not yet published",
            )?,
        };
        registry.register(Box::new(m.invalid_transitions.clone()))?;
        registry.register(Box::new(m.cancel_rejects.clone()))?;
        registry.register(Box::new(m.inputs.clone()))?;
        registry.register(Box::new(m.executions.clone()))?;
        registry.register(Box::new(m.orders.clone()))?;
        registry.register(Box::new(m.fills.clone()))?;
        registry.register(Box::new(m.state_writes.clone()))?;
        registry.register(Box::new(m.state_bytes.clone()))?;
        registry.register(Box::new(m.outbox.clone()))?;
        Ok(m)
    }
}

/// `[<prefix>.]executions.<account>`: an execution report (the subject map's
/// one-token account), the end of the signal → fill latency.
fn is_execution_report(subject: &str) -> bool {
    subject.rsplit('.').nth(1) == Some("executions")
}

/// One output message, exactly as it will be (re)published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Full subject.
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// JSON body.
    pub payload: String,
    /// Latency headers carried over from the input.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// The persisted state (value of [`STATE_KEY`]).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    version: u32,
    /// Saved state per adapter name.
    adapters: BTreeMap<String, serde_json::Value>,
    /// Applied input stream sequences per source, above the ack floor.
    applied: BTreeMap<String, BTreeSet<u64>>,
    /// Outputs not yet known to be published, in order.
    outbox: Vec<Recorded>,
}

/// The state in memory.
struct Live {
    /// KV revision of the state this copy was loaded from / last wrote.
    revision: Option<u64>,
    adapters: BTreeMap<String, Box<dyn BrokerAdapter>>,
    applied: BTreeMap<String, BTreeSet<u64>>,
    outbox: Vec<Recorded>,
    /// Outbox length in the last write (a shorter outbox is worth a write).
    persisted_outbox: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Orders,
    Market,
}

impl Source {
    fn key(self) -> &'static str {
        match self {
            Source::Orders => "orders",
            Source::Market => "market",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failpoint {
    AfterFillPersisted,
    AfterFillPublished,
}

/// What one input did.
enum Step {
    Applied(Vec<Recorded>),
    Duplicate,
    Reject(&'static str, String),
}

/// The outputs could not be built; the batch must be thrown away.
#[derive(Debug)]
struct Fatal(String);

/// The execution engine shared by the stage's loops and clock.
pub struct Engine {
    js: jetstream::Context,
    subjects: Subjects,
    bucket: String,
    orders_stream: String,
    market_stream: String,
    kv: OnceCell<kv::Store>,
    live: Mutex<Option<Live>>,
    publisher: Publisher,
    metrics: ExecutionMetrics,
    /// `mtx_end_to_end_latency_seconds{stage="execution"}`: the raw signal's
    /// receive time (header) to its execution report acknowledged by
    /// JetStream (fills go out through the outbox, not the consume loop).
    e2e_fill: prometheus::Histogram,
    settings: Settings,
    failpoint: Option<Failpoint>,
}

impl Engine {
    /// An engine for the process's config and topology.
    pub fn new(process: &Process) -> Result<Engine, WorkerError> {
        let settings = Settings::from_config(&process.config)?;
        let topo = &process.topology;
        let bucket = topo
            .bucket(buckets::EXECUTION_STATE)
            .ok_or_else(|| WorkerError::Topology(format!("bucket {}", buckets::EXECUTION_STATE)))?
            .to_string();
        for d in [DURABLE_ORDERS, DURABLE_MARKET] {
            if topo.consumer(d).is_none() {
                return Err(WorkerError::Topology(format!("consumer {d}")));
            }
        }
        let failpoint = std::env::var(FAILPOINT_ENV).ok().and_then(|v| {
            v.split([';', ',']).find_map(|f| match f.trim() {
                "execution_after_fill_persisted" => Some(Failpoint::AfterFillPersisted),
                "execution_after_fill_published" => Some(Failpoint::AfterFillPublished),
                _ => None,
            })
        });
        if let Some(f) = failpoint {
            tracing::warn!(failpoint = ?f, "crash injection armed: this process will abort");
        }
        Ok(Engine {
            js: process.js.clone(),
            subjects: process.subjects.clone(),
            bucket,
            orders_stream: topo.stream_name(streams::ORDERS),
            market_stream: topo.stream_name(streams::MARKET),
            kv: OnceCell::new(),
            live: Mutex::new(None),
            publisher: Publisher::new(process.js.clone(), Some(process.metrics.clone()), STAGE),
            metrics: ExecutionMetrics::new(&process.registry)?,
            e2e_fill: process.metrics.e2e_seconds.with_label_values(&[STAGE]),
            settings,
            failpoint,
        })
    }

    /// The stage's metrics.
    pub fn metrics(&self) -> &ExecutionMetrics {
        &self.metrics
    }

    /// Working orders and marks of `account` at its venue, as this instance
    /// last loaded or wrote the state (loads it if needed). `None` when the
    /// account has no adapter or the state cannot be loaded.
    pub async fn broker_snapshot(&self, account: &str) -> Option<BrokerSnapshot> {
        let name = self.settings.routes.route(account)?.to_string();
        let mut guard = self.live.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await.ok()?);
        }
        let live = guard.as_ref()?;
        live.adapters
            .get(&name)
            .map(|a| a.account_snapshot(account))
    }

    async fn kv(&self) -> Result<&kv::Store, String> {
        self.kv
            .get_or_try_init(|| async {
                self.js
                    .get_key_value(&self.bucket)
                    .await
                    .map_err(|e| format!("kv bucket {}: {e}", self.bucket))
            })
            .await
    }

    fn fresh_adapters(
        &self,
        mut saved: BTreeMap<String, serde_json::Value>,
    ) -> Result<BTreeMap<String, Box<dyn BrokerAdapter>>, String> {
        let mut out = BTreeMap::new();
        let mut names = self.settings.routes.adapter_names();
        names.extend(saved.keys().cloned());
        names.sort();
        names.dedup();
        for n in names {
            let a = adapter::restore(
                &n,
                &self.settings.paper,
                self.settings.retain_finished,
                saved.remove(&n),
            )
            .map_err(|e| e.to_string())?;
            out.insert(n, a);
        }
        Ok(out)
    }

    /// Load the state from KV (or start empty when there is none). A state
    /// that cannot be read is an error, never a silent fresh start: that
    /// could fill orders a second time.
    async fn load(&self) -> Result<Live, String> {
        let kv = self.kv().await?;
        let entry = kv
            .entry(STATE_KEY)
            .await
            .map_err(|e| format!("reading {}/{STATE_KEY}: {e}", self.bucket))?;
        let (revision, p) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let p: Persisted = serde_json::from_slice(&e.value).map_err(|err| {
                    format!("state {}/{STATE_KEY} unreadable: {err}", self.bucket)
                })?;
                if p.version != STATE_VERSION {
                    return Err(format!(
                        "state {}/{STATE_KEY} has version {}, this build reads {STATE_VERSION}",
                        self.bucket, p.version
                    ));
                }
                (Some(e.revision), p)
            }
            _ => (None, Persisted::default()),
        };
        let adapters = self.fresh_adapters(p.adapters)?;
        tracing::info!(
            revision = ?revision,
            outbox = p.outbox.len(),
            "execution state loaded"
        );
        self.metrics.outbox.set(p.outbox.len() as i64);
        Ok(Live {
            revision,
            adapters,
            applied: p.applied,
            persisted_outbox: p.outbox.len(),
            outbox: p.outbox,
        })
    }

    /// Write the whole state with compare-and-set.
    async fn persist(&self, live: &mut Live) -> Result<(), String> {
        let mut adapters = BTreeMap::new();
        for (n, a) in &live.adapters {
            adapters.insert(n.clone(), a.save().map_err(|e| e.to_string())?);
        }
        let p = Persisted {
            version: STATE_VERSION,
            adapters,
            applied: live.applied.clone(),
            outbox: live.outbox.clone(),
        };
        let bytes = serde_json::to_vec(&p).map_err(|e| e.to_string())?;
        let size = bytes.len();
        let kv = self.kv().await?;
        let written = match live.revision {
            Some(r) => kv
                .update(STATE_KEY, bytes.into(), r)
                .await
                .map_err(|e| e.to_string()),
            None => kv
                .create(STATE_KEY, bytes.into())
                .await
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(rev) => {
                self.metrics.state_writes.with_label_values(&["ok"]).inc();
                self.metrics.state_bytes.set(size as i64);
                if size > STATE_WARN_BYTES {
                    tracing::warn!(
                        bytes = size,
                        "execution state is large (NATS max_payload bounds it)"
                    );
                }
                live.revision = Some(rev);
                live.persisted_outbox = live.outbox.len();
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .state_writes
                    .with_label_values(&["error"])
                    .inc();
                Err(format!("writing {}/{STATE_KEY}: {e}", self.bucket))
            }
        }
    }

    /// Publish the outbox in order; keep what was not acked.
    async fn flush(&self, live: &mut Live) {
        if live.outbox.is_empty() {
            return;
        }
        let outs: Vec<Outgoing> = live
            .outbox
            .iter()
            .map(|r| {
                let mut o = Outgoing::new(r.subject.clone(), r.msg_id.clone(), r.payload.clone());
                for (k, v) in &r.headers {
                    o.headers.insert(k.as_str(), v.as_str());
                }
                o
            })
            .collect();
        let results = self.publisher.publish_all(outs).await;
        let mut keep = Vec::new();
        let mut first_error = None;
        let now = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        for (r, res) in live.outbox.drain(..).zip(results) {
            match res {
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                    keep.push(r);
                }
                Ok(_) if is_execution_report(&r.subject) => {
                    if let Some(at) = r
                        .headers
                        .get(headers::RECEIVED_AT)
                        .and_then(|v| v.parse::<i64>().ok())
                        .filter(|at| *at <= now)
                    {
                        self.e2e_fill.observe((now - at) as f64 / 1e9);
                    }
                }
                Ok(_) => {}
            }
        }
        if let Some(e) = first_error {
            tracing::warn!(error = %e, pending = keep.len(), "outputs not published; the clock retries them");
        }
        live.outbox = keep;
        self.metrics.outbox.set(live.outbox.len() as i64);
    }

    async fn ack_floor(&self, source: Source) -> Result<u64, String> {
        let (stream, durable) = match source {
            Source::Orders => (&self.orders_stream, DURABLE_ORDERS),
            Source::Market => (&self.market_stream, DURABLE_MARKET),
        };
        let st = self
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| e.to_string())?;
        let info = st.consumer_info(durable).await.map_err(|e| e.to_string())?;
        Ok(info.ack_floor.stream_sequence)
    }

    fn check_failpoint(&self, point: Failpoint, new_outputs: &[Recorded]) {
        if self.failpoint != Some(point) {
            return;
        }
        let has_execution = new_outputs
            .iter()
            .any(|r| self.subjects.strip(&r.subject).starts_with("executions."));
        if has_execution {
            tracing::error!(failpoint = ?point, "crash injection: aborting between fill and ack");
            std::process::abort();
        }
    }

    /// Handle one batch of one source (steps 1–5 of the module docs).
    async fn run_batch(&self, source: Source, msgs: &[Delivery]) -> Vec<Outcome> {
        let retry_all = |reason: &str| {
            msgs.iter()
                .map(|_| Outcome::retry(self.settings.retry_after, reason.to_string()))
                .collect::<Vec<_>>()
        };
        match AssertUnwindSafe(self.run_batch_inner(source, msgs))
            .catch_unwind()
            .await
        {
            Ok(Ok(outcomes)) => outcomes,
            Ok(Err(reason)) => {
                tracing::warn!(%reason, "batch not applied; will retry");
                retry_all(&reason)
            }
            Err(_) => {
                tracing::error!("execution batch panicked; state reloaded from KV");
                *self.live.lock().await = None;
                retry_all("handler panicked")
            }
        }
    }

    async fn run_batch_inner(
        &self,
        source: Source,
        msgs: &[Delivery],
    ) -> Result<Vec<Outcome>, String> {
        let mut guard = self.live.lock().await;
        let floor = self.ack_floor(source).await;
        let mut last_error = String::from("state not written");
        // A failed write (typically a compare-and-set conflict with another
        // instance) reloads the state and applies the batch again on top of
        // it, a few times, before the batch is handed back for redelivery.
        for attempt in 1..=PERSIST_ATTEMPTS {
            if guard.is_none() {
                *guard = Some(self.load().await?);
            }
            let Some(live) = guard.as_mut() else {
                return Err("state not loaded".into());
            };
            match &floor {
                Ok(floor) => {
                    if let Some(set) = live.applied.get_mut(source.key()) {
                        set.retain(|s| *s > *floor);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "no ack floor; applied set kept"),
            }
            let now = Utc::now();
            let before = live.outbox.len();
            let (outcomes, labels) = match self.apply_all(live, source, msgs, now) {
                Ok(r) => r,
                Err(Fatal(e)) => {
                    // The venue may hold half-applied changes: forget them.
                    *guard = None;
                    return Err(e);
                }
            };
            let applied_any = labels.contains(&"applied");
            if applied_any {
                for a in live.adapters.values_mut() {
                    a.compact(now);
                }
                if let Err(e) = self.persist(live).await {
                    tracing::info!(attempt, error = %e, "state write failed; reloading");
                    *guard = None;
                    last_error = e;
                    continue;
                }
                self.check_failpoint(Failpoint::AfterFillPersisted, &live.outbox[before..]);
            }
            for l in labels {
                self.metrics
                    .inputs
                    .with_label_values(&[source.key(), l])
                    .inc();
            }
            let new_outputs: Vec<Recorded> = if self.failpoint.is_some() {
                live.outbox[before.min(live.outbox.len())..].to_vec()
            } else {
                Vec::new()
            };
            self.flush(live).await;
            self.check_failpoint(Failpoint::AfterFillPublished, &new_outputs);
            return Ok(outcomes);
        }
        Err(last_error)
    }

    /// Apply every input of a batch to the in-memory state (step 2).
    fn apply_all(
        &self,
        live: &mut Live,
        source: Source,
        msgs: &[Delivery],
        now: DateTime<Utc>,
    ) -> Result<(Vec<Outcome>, Vec<&'static str>), Fatal> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        let mut labels = Vec::with_capacity(msgs.len());
        for d in msgs {
            if live
                .applied
                .get(source.key())
                .is_some_and(|s| s.contains(&d.stream_seq))
            {
                tracing::info!(
                    seq = d.stream_seq,
                    deliveries = d.deliveries,
                    "input already applied; outputs come from the outbox"
                );
                labels.push("already_applied");
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            let step = match source {
                Source::Orders => self.apply_order(live, d, now)?,
                Source::Market => self.apply_price(live, d, now)?,
            };
            match step {
                Step::Applied(records) => {
                    labels.push("applied");
                    live.outbox.extend(records);
                    live.applied
                        .entry(source.key().to_string())
                        .or_default()
                        .insert(d.stream_seq);
                    outcomes.push(Outcome::Ok(Vec::new()));
                }
                Step::Duplicate => {
                    labels.push("duplicate");
                    outcomes.push(Outcome::Duplicate);
                }
                Step::Reject(reason, detail) => {
                    labels.push("rejected");
                    outcomes.push(Outcome::reject(reason, detail));
                }
            }
        }
        Ok((outcomes, labels))
    }

    /// The clock: expiries and asynchronous venue events, then a retry of
    /// whatever is still in the outbox.
    pub async fn tick(&self) {
        let r = AssertUnwindSafe(self.tick_inner()).catch_unwind().await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "execution tick failed"),
            Err(_) => {
                tracing::error!("execution tick panicked; state reloaded from KV");
                *self.live.lock().await = None;
            }
        }
    }

    async fn tick_inner(&self) -> Result<(), String> {
        let mut guard = self.live.lock().await;
        if guard.is_none() {
            *guard = Some(self.load().await?);
        }
        let Some(live) = guard.as_mut() else {
            return Err("state not loaded".into());
        };
        let now = Utc::now();
        let mut events = Vec::new();
        for a in live.adapters.values_mut() {
            events.extend(a.tick(now));
            events.extend(a.poll_events());
        }
        let records = match self.render(&events, None) {
            Ok(r) => r,
            Err(Fatal(e)) => {
                *guard = None;
                return Err(e);
            }
        };
        let changed = !records.is_empty();
        if changed || live.persisted_outbox != live.outbox.len() {
            live.outbox.extend(records);
            if changed {
                for a in live.adapters.values_mut() {
                    a.compact(now);
                }
            }
            if let Err(e) = self.persist(live).await {
                *guard = None;
                return Err(e);
            }
        }
        self.flush(live).await;
        Ok(())
    }

    fn adapter_for<'a>(
        &self,
        live: &'a mut Live,
        account: &str,
    ) -> Result<&'a mut Box<dyn BrokerAdapter>, Step> {
        let Some(name) = self.settings.routes.route(account) else {
            return Err(Step::Reject(
                "no_broker_adapter",
                format!("account {account} has no broker adapter (execution.adapters / execution.default_adapter)"),
            ));
        };
        live.adapters.get_mut(name).ok_or_else(|| {
            Step::Reject(
                "no_broker_adapter",
                format!("adapter {name} of account {account} is not running"),
            )
        })
    }

    fn apply_order(
        &self,
        live: &mut Live,
        d: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<Step, Fatal> {
        let rest = self.subjects.strip(&d.subject);
        let parts: Vec<&str> = rest.split('.').collect();
        let account = match (parts.as_slice(), self.subjects.token(&d.subject, 1)) {
            (["orders", _, "new" | "cancel"], Some(Ok(a))) => a,
            _ => {
                return Ok(Step::Reject(
                    "bad_subject",
                    format!("`{}` is not orders.<account>.new|cancel", d.subject),
                ))
            }
        };
        if parts[2] == "new" {
            self.submit(live, d, &account, now)
        } else {
            self.cancel(live, d, &account, now)
        }
    }

    fn submit(
        &self,
        live: &mut Live,
        d: &Delivery,
        account: &str,
        now: DateTime<Utc>,
    ) -> Result<Step, Fatal> {
        let order: Order = match serde_json::from_slice(&d.payload) {
            Ok(o) => o,
            Err(e) => return Ok(Step::Reject("invalid_order", format!("not an order: {e}"))),
        };
        if order.order_id.is_empty() {
            return Ok(Step::Reject("invalid_order", "empty order_id".into()));
        }
        if order.account != account {
            return Ok(Step::Reject(
                "account_mismatch",
                format!("order for {} on the subject of {account}", order.account),
            ));
        }
        let adapter = match self.adapter_for(live, account) {
            Ok(a) => a,
            Err(step) => return Ok(step),
        };
        if let Some(info) = adapter.lookup(&order.order_id) {
            return Ok(if info.fingerprint == order_fingerprint(&order) {
                Step::Duplicate
            } else {
                Step::Reject(
                    "conflicting_order",
                    format!(
                        "order {} is already known ({}) with different contents",
                        order.order_id, info.status
                    ),
                )
            });
        }
        let events = adapter.submit(order, now);
        self.render(&events, Some(d)).map(Step::Applied)
    }

    fn cancel(
        &self,
        live: &mut Live,
        d: &Delivery,
        account: &str,
        now: DateTime<Utc>,
    ) -> Result<Step, Fatal> {
        let c: CancelOrder = match serde_json::from_slice(&d.payload) {
            Ok(c) => c,
            Err(e) => return Ok(Step::Reject("invalid_cancel", format!("not a cancel: {e}"))),
        };
        if c.account != account {
            return Ok(Step::Reject(
                "account_mismatch",
                format!("cancel for {} on the subject of {account}", c.account),
            ));
        }
        let adapter = match self.adapter_for(live, account) {
            Ok(a) => a,
            Err(step) => return Ok(step),
        };
        let Some(info) = adapter.lookup(&c.order_id) else {
            return Ok(Step::Reject(
                "unknown_order",
                format!("cancel of unknown order {}", c.order_id),
            ));
        };
        if info.account != c.account {
            return Ok(Step::Reject(
                "account_mismatch",
                format!("order {} belongs to {}", c.order_id, info.account),
            ));
        }
        if info.status == OrderStatus::Filled {
            // The fill won the race (Cerebro cancels the rest of an entry it
            // still saw working): a venue answers "too late to cancel". Not an
            // error of the sender, so counted and acknowledged, not
            // dead-lettered; nothing changes.
            self.metrics
                .cancel_rejects
                .with_label_values(&["too_late"])
                .inc();
            tracing::info!(order_id = %c.order_id, "cancel arrived after the fill: too late to cancel");
            return Ok(Step::Applied(Vec::new()));
        }
        if let Err(e) = transition(
            info.status,
            EventKind::CancelRequest,
            info.filled > Decimal::ZERO,
        ) {
            self.metrics
                .invalid_transitions
                .with_label_values(&[info.status.as_str(), e.event.as_str()])
                .inc();
            tracing::warn!(order_id = %c.order_id, from = %info.status, event = %e.event, "invalid transition refused");
            return Ok(Step::Reject(
                "invalid_transition",
                format!("order {}: {e}", c.order_id),
            ));
        }
        let events = adapter.cancel(&c.order_id, now);
        self.render(&events, Some(d)).map(Step::Applied)
    }

    fn apply_price(
        &self,
        live: &mut Live,
        d: &Delivery,
        now: DateTime<Utc>,
    ) -> Result<Step, Fatal> {
        let parts: Vec<&str> = self.subjects.strip(&d.subject).split('.').collect();
        let symbol = match (parts.as_slice(), self.subjects.token(&d.subject, 2)) {
            (["market", "prices", _], Some(Ok(s))) => s,
            _ => {
                return Ok(Step::Reject(
                    "bad_subject",
                    format!("`{}` is not market.prices.<symbol>", d.subject),
                ))
            }
        };
        let p: MarketPrice = match serde_json::from_slice(&d.payload) {
            Ok(p) => p,
            Err(e) => return Ok(Step::Reject("invalid_price", format!("not a price: {e}"))),
        };
        if p.symbol != symbol {
            return Ok(Step::Reject(
                "symbol_mismatch",
                format!("price of {} on the subject of {symbol}", p.symbol),
            ));
        }
        if p.price <= Decimal::ZERO {
            return Ok(Step::Reject(
                "invalid_price",
                format!("price must be positive, got {}", p.price),
            ));
        }
        let mut events = Vec::new();
        for a in live.adapters.values_mut() {
            events.extend(a.on_price(&symbol, p.price, now));
        }
        self.render(&events, Some(d)).map(Step::Applied)
    }

    /// Venue events → output messages (deterministic ids).
    fn render(
        &self,
        events: &[VenueEvent],
        input: Option<&Delivery>,
    ) -> Result<Vec<Recorded>, Fatal> {
        let mut hdrs = BTreeMap::new();
        if let Some(d) = input {
            for h in [headers::RECEIVED_AT, headers::SIGNAL_ID] {
                if let Some(v) = d.header(h) {
                    hdrs.insert(h.to_string(), v.to_string());
                }
            }
        }
        let fatal = |e: String| Fatal(format!("cannot build an output: {e}"));
        let mut out = Vec::new();
        for e in events {
            if let VenueEvent::ChildOrder(o) = e {
                out.push(Recorded {
                    subject: self
                        .subjects
                        .orders_new(&o.account)
                        .map_err(|e| fatal(e.to_string()))?,
                    msg_id: o.order_id.clone(),
                    payload: to_json(o)?,
                    headers: hdrs.clone(),
                });
            }
            if let Some(x) = e.execution() {
                self.metrics
                    .executions
                    .with_label_values(&[x.status.as_str()])
                    .inc();
                if x.status != ExecutionStatus::Rejected {
                    self.metrics.fills.inc();
                }
                out.push(Recorded {
                    subject: self
                        .subjects
                        .executions(&x.account)
                        .map_err(|e| fatal(e.to_string()))?,
                    msg_id: x.execution_id.clone(),
                    payload: to_json(x)?,
                    headers: hdrs.clone(),
                });
            }
            if let Some(ev) = e.order_event() {
                self.metrics
                    .orders
                    .with_label_values(&[&ev.status.as_str().to_ascii_lowercase()])
                    .inc();
                out.push(Recorded {
                    subject: self
                        .subjects
                        .orders_events(&ev.account)
                        .map_err(|e| fatal(e.to_string()))?,
                    msg_id: format!("{}.{}", ev.order_id, ev.seq),
                    payload: to_json(ev)?,
                    headers: hdrs.clone(),
                });
            }
            if let VenueEvent::CancelRejected {
                order_id, reason, ..
            } = e
            {
                tracing::warn!(%order_id, %reason, "venue refused a cancel");
            }
        }
        Ok(out)
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<String, Fatal> {
    serde_json::to_string(v).map_err(|e| Fatal(format!("cannot serialize an output: {e}")))
}

/// The `execution` consumer's handler (orders and cancels).
pub struct OrdersHandler(pub Arc<Engine>);

impl Handler for OrdersHandler {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        self.0
            .run_batch(Source::Orders, std::slice::from_ref(msg))
            .await
            .pop()
            .unwrap_or_else(|| Outcome::retry(Duration::from_secs(1), "no outcome"))
    }

    async fn handle_batch(&self, msgs: &[Delivery], _concurrency: usize) -> Vec<Outcome> {
        self.0.run_batch(Source::Orders, msgs).await
    }
}

/// The `execution_market` consumer's handler (marks).
pub struct MarketHandler(pub Arc<Engine>);

impl Handler for MarketHandler {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        self.0
            .run_batch(Source::Market, std::slice::from_ref(msg))
            .await
            .pop()
            .unwrap_or_else(|| Outcome::retry(Duration::from_secs(1), "no outcome"))
    }

    async fn handle_batch(&self, msgs: &[Delivery], _concurrency: usize) -> Vec<Outcome> {
        self.0.run_batch(Source::Market, msgs).await
    }
}

/// Start the stage in `process`: both loops and the clock. Returns the
/// engine (tests read its metrics and broker snapshots).
pub fn spawn(process: &mut Process) -> Result<Arc<Engine>, WorkerError> {
    let engine = Arc::new(Engine::new(process)?);
    process.spawn_consumer(
        STAGE,
        DURABLE_ORDERS,
        Arc::new(OrdersHandler(engine.clone())),
    )?;
    process.spawn_consumer(
        STAGE_MARKET,
        DURABLE_MARKET,
        Arc::new(MarketHandler(engine.clone())),
    )?;
    let clock = engine.clone();
    let shutdown = process.shutdown.clone();
    let beat = process.health.beat("execution clock");
    let period = engine.settings.tick;
    process.spawn(async move {
        let mut iv = tokio::time::interval(period);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = iv.tick() => {
                    beat.beat();
                    clock.tick().await;
                }
            }
        }
    });
    tracing::info!(
        adapters = ?engine.settings.routes.adapter_names(),
        "execution stage started"
    );
    Ok(engine)
}
