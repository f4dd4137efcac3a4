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
//! | clock (`execution.tick_ms`) | — | expiries; retry of unpublished outputs; ack floors; the finished-order janitor |
//!
//! Every [`VenueEvent`] becomes messages with deterministic `Nats-Msg-Id`s:
//! order status changes on `orders.<account>.events` (the events one input
//! made of one order in one message: id `<order_id>.<seq>` for a single
//! event, `<order_id>.<first seq>-<last seq>` for a list, see
//! [`mtx_schemas::order::decode_order_events`]), fills, partial fills and rejections on
//! `executions.<account>` (id = `execution_id` =
//! `ids::execution_id(order_id, fill_seq)`), and child stop-loss /
//! take-profit orders on `orders.<account>.new` (id = their order id; the
//! worker reads them back as duplicates, the sink persists them).
//!
//! | problem | outcome |
//! |---|---|
//! | payload is not an order / cancel / price | DLQ `invalid_order` / `invalid_cancel` / `invalid_price` |
//! | a price out of the shared range ([`mtx_schemas::limits`]) or stamped more than a minute after the broker stored it | DLQ `invalid_price` |
//! | an order out of the shared range | REJECTED by the venue, with the bound in its reason |
//! | subject account ≠ payload account, symbol ≠ subject | DLQ `account_mismatch` / `symbol_mismatch` |
//! | account has no adapter (`execution.adapters`, `default_adapter`) | DLQ `no_broker_adapter` |
//! | known order id with different contents | DLQ `conflicting_order` |
//! | known order id, same contents (re-send) | duplicate (ack) |
//! | cancel of an unknown order | DLQ `unknown_order` |
//! | cancel of a FILLED order (the fill won the race) | a venue's "too late to cancel": counted in `mtx_execution_cancel_rejects_total{reason="too_late"}`, acknowledged, nothing applied |
//! | any other cancel the state machine refuses (e.g. the order is already CANCELLED) | counted in `mtx_execution_invalid_transitions_total{from,event}`, logged, DLQ `invalid_transition`; nothing applied |
//! | state store unreachable, or written by another instance | state reloaded and the batch re-applied; redelivered if that keeps failing |
//! | outputs cannot be published and the outbox is full | batch redelivered later (back-pressure); the clock keeps publishing |
//!
//! # No fill twice, no fill lost
//!
//! The venue lives in memory and in the `execution_state` KV bucket, in two
//! kinds of keys:
//!
//! - [`STATE_KEY`] (`venues`), written with compare-and-set: every adapter's
//!   **working** orders and marks, an **outbox** of output messages not yet
//!   known to be published, and the input stream sequences applied but not
//!   yet below their consumer's ack floor (as ranges). Its size depends on
//!   the working orders and on one batch's outputs, not on history.
//! - `fin.<order id>` ([`finished_key`]), one per finished order: account,
//!   terminal status, filled quantity and the order's fingerprint
//!   ([`FinishedOrder`]). It is written once, as an outbox entry of the state
//!   write in which the order finished, and removed by the janitor once older
//!   than `topology.max_age_secs` (the age limit of `ORDERS`, so no
//!   redelivery can outlive it).
//!
//! One batch (of either consumer, serialized by a lock) goes:
//!
//! 1. load the state from KV if not in memory; drop applied sequences at or
//!    below the consumer's ack floor (read by the clock: those can never be
//!    redelivered);
//! 2. read, in one batched direct get (one request per 1,000 keys; a
//!    replicated bucket: one leader read per key), the `fin.` keys of the order ids the
//!    batch names that memory does not know (a new order, or a re-send /
//!    cancel of an order that finished earlier);
//! 3. for each input: an applied sequence is a redelivery → duplicate (ack);
//!    otherwise apply it to the adapter, append its outputs to the outbox and
//!    record its sequence; orders that finished leave the adapter and their
//!    `fin.` records join the outbox;
//! 4. write the state with compare-and-set on the key's revision (a failure —
//!    another instance wrote, the store is down — throws the in-memory state
//!    away: nothing was decided; the state is reloaded and the batch applied
//!    again on top of it, with its lookups redone, and after a few failed
//!    attempts the batch is handed back for redelivery);
//! 5. publish the outbox — outputs and `fin.` records — in one pipelined
//!    round (deterministic ids), drop what was acked (the persisted copy
//!    shrinks with the next write, at the latest one tick later);
//! 6. return: the consume loop acks the inputs.
//!
//! That is one KV write per batch (more only when a batch's outputs would
//! not fit one value: the batch is then applied in chunks, each written
//! before the next is applied).
//!
//! A fill is decided exactly once: at step 4, atomically with the record of
//! its input and with its outputs. Crash points:
//!
//! - before 4: nothing persisted, nothing published; the redelivered input
//!   is applied afresh.
//! - between 4 and 6 (the fill is persisted, maybe not published, the input
//!   not acked): on restart the state comes back from KV; the clock tick
//!   publishes the outbox again, byte for byte the same messages with the
//!   same ids (JetStream drops copies inside its duplicate window; beyond it
//!   the sink, the ledger and order-event consumers dedupe on
//!   `execution_id` / `(order_id, seq)`); the redelivered input finds its
//!   sequence applied and is acked without touching the venue.
//! - after 6: done.
//!
//! Because outputs are published from the persisted outbox (retried by the
//! tick until acked), a publish failure never loses a fill either, even if
//! the input runs out of deliveries. An order id already known (a re-send, or
//! a child order read back) is never submitted again: at every moment a
//! finished order is in the state (still in its adapter, or as the `fin.`
//! record in the outbox) or in its `fin.` key, because a record leaves the
//! outbox only in a write made after its put was acknowledged. A `fin.` key
//! that is not found is trusted only for the compare-and-set against the
//! state that was in memory when it was read: a record another instance
//! writes later follows a state write of that instance, which makes ours
//! fail. Keys are read from the stream leader, never from a possibly stale
//! follower (by direct get only when the bucket has a single replica).
//! Records found, and those this instance wrote, are kept in memory (the
//! latest 50,000) to spare reads.
//!
//! Limits: the `venues` value holds working orders in full (about 0.75 KB
//! each, more with Cerebro's rationale) next to one chunk of outputs (at
//! most ¾ of NATS `max_payload`, 1 MiB by default, minus the working
//! orders), so about a thousand working orders fit by default (a warning is
//! logged above 512 KiB; raise `max_payload` for more); and one input's own
//! outputs (a mark that fills hundreds of resting orders at once) must fit
//! too. The paper venue is one matching engine: run one execution replica (a
//! second one is safe — the compare-and-set makes them take turns — but not
//! faster).
//!
//! The janitor (on the clock) notes the bucket's last sequence every
//! `max_age / 16` (1 s to 1 h) and, once such a note is older than
//! `topology.max_age_secs`, purges the `fin.` records stored before it: a
//! stream purge by subject and sequence, which leaves no delete markers. The
//! stage's NATS user needs `$JS.API.STREAM.PURGE.KV_<bucket>` for it;
//! without, records are kept, the failure is counted in
//! `mtx_execution_finished_purges_total{result="error"}` and retried.
//!
//! # Crash injection
//!
//! For the restart tests, `FAILPOINTS=execution_after_fill_persisted` (or
//! `execution_after_fill_published`; `;`-separated with others) aborts the
//! process right after a batch that produced an execution confirmation has
//! been persisted (or published), i.e. between fill and ack. Unset in
//! production.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, kv};
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use mtx_runtime::config::{CommissionKind, Config};
use mtx_runtime::multiget;
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::publish::Publisher;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::headers;
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{CancelOrder, Order, OrderEvent};
use mtx_schemas::{ExecutionStatus, OrderStatus};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::Subjects;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Mutex, OnceCell};

use crate::adapter::{self, BrokerAdapter, BrokerSnapshot, Routes};
use crate::fsm::{transition, EventKind};
use crate::paper::{
    order_fingerprint, Commission, CommissionModel, FinishedOrder, OrderInfo, PaperConfig,
    VenueEvent,
};

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
/// Key prefix of the finished-order records in the `execution_state` bucket.
pub const FINISHED_PREFIX: &str = "fin.";
/// Environment variable of the crash-injection point (tests only).
pub const FAILPOINT_ENV: &str = "FAILPOINTS";

/// Version 1 held finished orders in the state; it is read and migrated.
const STATE_VERSION: u32 = 2;
const STATE_WARN_BYTES: usize = 512 * 1024;
/// NATS' default `max_payload`, when the server has not said yet.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
/// Writes of one batch's state before the batch is handed back for redelivery.
const PERSIST_ATTEMPTS: u32 = 5;
/// Finished orders kept in memory (beyond that, they are read from KV).
const FINISHED_CACHE: usize = 50_000;
/// Concurrent `fin.` key reads of one batch.
const LOOKUP_CONCURRENCY: usize = 512;
/// How long one batched read of `fin.` keys may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The KV key of the finished-order record of `order_id`: [`FINISHED_PREFIX`]
/// and the id as a KV token ([`mtx_schemas::ids::push_kv_token`]: any id
/// gives a valid key, different ids give different keys).
pub fn finished_key(order_id: &str) -> String {
    let mut out = String::with_capacity(FINISHED_PREFIX.len() + order_id.len());
    out.push_str(FINISHED_PREFIX);
    mtx_schemas::ids::push_kv_token(&mut out, order_id);
    out
}

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
    /// `fin.` keys read, by result (`found`, `not_found`, `error`).
    pub finished_lookups: IntCounterVec,
    /// Janitor purges of old `fin.` keys, by result (`ok`, `error`).
    pub finished_purges: IntCounterVec,
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
            finished_lookups: IntCounterVec::new(
                Opts::new(
                    "mtx_execution_finished_lookups_total",
                    "Finished-order keys read from KV, by result",
                ),
                &["result"],
            )?,
            finished_purges: IntCounterVec::new(
                Opts::new(
                    "mtx_execution_finished_purges_total",
                    "Janitor purges of expired finished-order keys, by result",
                ),
                &["result"],
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
        registry.register(Box::new(m.finished_lookups.clone()))?;
        registry.register(Box::new(m.finished_purges.clone()))?;
        Ok(m)
    }
}

/// `[<prefix>.]executions.<account>`: an execution report (the subject map's
/// one-token account), the end of the signal → fill latency.
fn is_execution_report(subject: &str) -> bool {
    subject.rsplit('.').nth(1) == Some("executions")
}

/// One output message, exactly as it will be (re)published.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recorded {
    /// Full subject.
    pub subject: String,
    /// `Nats-Msg-Id`.
    pub msg_id: String,
    /// JSON body, kept in the state as JSON (byte for byte; not re-escaped
    /// into a string, which version 1 did).
    pub payload: Box<RawValue>,
    /// Latency headers carried over from the input.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

impl Recorded {
    /// Roughly its size in the persisted state.
    fn weight(&self) -> usize {
        let h: usize = self
            .headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 6)
            .sum();
        self.subject.len() + self.msg_id.len() + self.payload.get().len() + h + 48
    }

    /// A version-1 payload is a JSON string holding the body: unwrap it.
    fn unwrap_v1_payload(&mut self) -> Result<(), serde_json::Error> {
        if self.payload.get().starts_with('"') {
            let body: String = serde_json::from_str(self.payload.get())?;
            self.payload = RawValue::from_string(body)?;
        }
        Ok(())
    }
}

/// Sorted, disjoint, inclusive ranges of stream sequences: the applied set of
/// one consumer. Consecutive sequences (the usual case) cost one range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
struct SeqRanges(Vec<(u64, u64)>);

impl SeqRanges {
    /// Whether `seq` is in the set.
    fn contains(&self, seq: u64) -> bool {
        let i = self.0.partition_point(|r| r.1 < seq);
        self.0.get(i).is_some_and(|r| r.0 <= seq)
    }

    /// Add `seq`.
    fn insert(&mut self, seq: u64) {
        if let Some(last) = self.0.last_mut() {
            if seq == last.1.saturating_add(1) {
                last.1 = seq;
                return;
            }
            if seq > last.1 {
                self.0.push((seq, seq));
                return;
            }
        }
        let i = self.0.partition_point(|r| r.1 < seq);
        if self.0.get(i).is_some_and(|r| r.0 <= seq) {
            return;
        }
        let joins_prev = i > 0 && self.0[i - 1].1 + 1 == seq;
        let joins_next = self.0.get(i).is_some_and(|r| r.0 == seq + 1);
        match (joins_prev, joins_next) {
            (true, true) => {
                self.0[i - 1].1 = self.0[i].1;
                self.0.remove(i);
            }
            (true, false) => self.0[i - 1].1 = seq,
            (false, true) => self.0[i].0 = seq,
            (false, false) => self.0.insert(i, (seq, seq)),
        }
    }

    /// Drop every sequence at or below `floor`.
    fn prune(&mut self, floor: u64) {
        let i = self.0.partition_point(|r| r.1 <= floor);
        self.0.drain(..i);
        if let Some(first) = self.0.first_mut() {
            first.0 = first.0.max(floor.saturating_add(1));
        }
    }
}

impl FromIterator<u64> for SeqRanges {
    fn from_iter<T: IntoIterator<Item = u64>>(iter: T) -> Self {
        let mut s = SeqRanges::default();
        for x in iter {
            s.insert(x);
        }
        s
    }
}

/// The persisted state as read (value of [`STATE_KEY`]); version 1 is
/// migrated.
#[derive(Debug, Deserialize)]
struct Stored {
    version: u32,
    /// Saved state per adapter name.
    #[serde(default)]
    adapters: BTreeMap<String, serde_json::Value>,
    /// Applied input stream sequences per source: ranges (version 2) or a
    /// plain set (version 1).
    #[serde(default)]
    applied: BTreeMap<String, serde_json::Value>,
    /// Outputs not yet known to be published, in order.
    #[serde(default)]
    outbox: Vec<Recorded>,
}

/// Finished orders this instance knows without asking KV: those it finished
/// or read, most recent last. Bounded by [`FINISHED_CACHE`], but never
/// forgets one whose `fin.` record may still be unpublished.
#[derive(Default)]
struct FinishedCache {
    map: HashMap<String, FinishedOrder>,
    order: VecDeque<String>,
}

impl FinishedCache {
    fn get(&self, id: &str) -> Option<&FinishedOrder> {
        self.map.get(id)
    }

    fn insert(&mut self, f: FinishedOrder) {
        if !self.map.contains_key(&f.order_id) {
            self.order.push_back(f.order_id.clone());
        }
        self.map.insert(f.order_id.clone(), f);
    }

    /// Forget the oldest beyond `cap`. Only call when no `fin.` record is
    /// waiting in the outbox.
    fn trim(&mut self, cap: usize) {
        while self.order.len() > cap {
            if let Some(id) = self.order.pop_front() {
                self.map.remove(&id);
            }
        }
    }
}

/// The state in memory.
struct Live {
    /// KV revision of the state this copy was loaded from / last wrote.
    revision: Option<u64>,
    adapters: BTreeMap<String, Box<dyn BrokerAdapter>>,
    applied: BTreeMap<String, SeqRanges>,
    outbox: Vec<Recorded>,
    /// Σ [`Recorded::weight`] of the outbox.
    outbox_bytes: usize,
    /// Bytes of the last write besides its outbox (working orders, applied).
    base_bytes: usize,
    /// Memory differs from the last write in a way worth a write of its own
    /// (the outbox shrank, a migrated state).
    dirty: bool,
    finished: FinishedCache,
}

impl Live {
    fn push_outbox(&mut self, r: Recorded) {
        self.outbox_bytes += r.weight();
        self.outbox.push(r);
    }

    fn finished_in_outbox(&self, kv_prefix: &str) -> bool {
        self.outbox.iter().any(|r| {
            r.subject
                .strip_prefix(kv_prefix)
                .is_some_and(|k| k.starts_with(FINISHED_PREFIX))
        })
    }
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

    fn index(self) -> usize {
        match self {
            Source::Orders => 0,
            Source::Market => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failpoint {
    AfterFillPersisted,
    AfterFillPublished,
}

/// One input, decoded once per batch (before the lock; independent of the
/// state).
enum Input {
    /// The order is taken when submitted (the chunk is decoded again if it
    /// has to be applied again).
    New {
        account: String,
        order: Option<Box<Order>>,
    },
    Cancel {
        account: String,
        cancel: CancelOrder,
    },
    Price {
        symbol: String,
        price: Decimal,
    },
    Invalid(&'static str, String),
}

impl Input {
    /// The order id whose history decides what this input does.
    fn order_id(&self) -> Option<(&str, &str)> {
        match self {
            Input::New { account, order } => order
                .as_ref()
                .map(|o| (account.as_str(), o.order_id.as_str())),
            Input::Cancel { account, cancel } => Some((account, &cancel.order_id)),
            Input::Price { .. } | Input::Invalid(..) => None,
        }
    }
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

/// Sequence notes of the finished-order janitor (memory only: after a
/// restart, records from before it are purged one `max_age` after the first
/// note).
#[derive(Default)]
struct Janitor {
    /// (first KV stream sequence not covered, when it was noted), oldest first.
    marks: VecDeque<(u64, DateTime<Utc>)>,
    /// No purge attempt before this (after a failure).
    quiet_until: Option<DateTime<Utc>>,
}

/// The execution engine shared by the stage's loops and clock.
pub struct Engine {
    js: jetstream::Context,
    subjects: Subjects,
    bucket: String,
    /// `$KV.<bucket>.`: the subject prefix of the bucket's keys.
    kv_prefix: String,
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
    /// Ack floor per source (orders, market), refreshed by the clock.
    floors: [AtomicU64; 2],
    /// Largest state value written so far.
    state_bytes_max: AtomicUsize,
    /// The bucket has one replica and direct gets: `fin.` keys are read with
    /// direct gets (refreshed by the clock; off until known).
    direct_reads: AtomicBool,
    janitor: std::sync::Mutex<Janitor>,
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
            kv_prefix: format!("$KV.{bucket}."),
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
            floors: [AtomicU64::new(0), AtomicU64::new(0)],
            state_bytes_max: AtomicUsize::new(0),
            direct_reads: AtomicBool::new(false),
            janitor: std::sync::Mutex::new(Janitor::default()),
        })
    }

    /// The stage's metrics.
    pub fn metrics(&self) -> &ExecutionMetrics {
        &self.metrics
    }

    /// The largest state value ([`STATE_KEY`]) this engine has written, bytes.
    pub fn state_bytes_max(&self) -> usize {
        self.state_bytes_max.load(Ordering::Relaxed)
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
                let kv = self
                    .js
                    .get_key_value(&self.bucket)
                    .await
                    .map_err(|e| format!("kv bucket {}: {e}", self.bucket))?;
                self.note_bucket_config(&kv.stream.cached_info().config);
                Ok(kv)
            })
            .await
    }

    fn note_bucket_config(&self, c: &jetstream::stream::Config) {
        let direct = c.num_replicas <= 1 && c.allow_direct && c.mirror.is_none();
        self.direct_reads.store(direct, Ordering::Relaxed);
    }

    fn max_payload(&self) -> usize {
        match self.js.client().server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    /// How many outbox bytes one chunk of a batch may reach.
    fn outbox_budget(&self, live: &Live) -> usize {
        let max = self.max_payload();
        (max / 4 * 3).saturating_sub(live.base_bytes).max(max / 16)
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
            let a = adapter::restore(&n, &self.settings.paper, saved.remove(&n))
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
        let unreadable =
            |err: String| format!("state {}/{STATE_KEY} unreadable: {err}", self.bucket);
        let (revision, stored) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let p: Stored =
                    serde_json::from_slice(&e.value).map_err(|err| unreadable(err.to_string()))?;
                if p.version != 1 && p.version != STATE_VERSION {
                    return Err(format!(
                        "state {}/{STATE_KEY} has version {}, this build reads 1 and {STATE_VERSION}",
                        self.bucket, p.version
                    ));
                }
                (Some(e.revision), p)
            }
            _ => (
                None,
                Stored {
                    version: STATE_VERSION,
                    adapters: BTreeMap::new(),
                    applied: BTreeMap::new(),
                    outbox: Vec::new(),
                },
            ),
        };
        let mut applied = BTreeMap::new();
        for (k, v) in stored.applied {
            let set = if stored.version == 1 {
                serde_json::from_value::<Vec<u64>>(v).map(SeqRanges::from_iter)
            } else {
                serde_json::from_value::<SeqRanges>(v)
            };
            applied.insert(k, set.map_err(|err| unreadable(err.to_string()))?);
        }
        let mut adapters = self.fresh_adapters(stored.adapters)?;
        let mut live = Live {
            revision,
            adapters: BTreeMap::new(),
            applied,
            outbox: Vec::new(),
            outbox_bytes: 0,
            base_bytes: 0,
            dirty: stored.version != STATE_VERSION,
            finished: FinishedCache::default(),
        };
        for mut r in stored.outbox {
            r.unwrap_v1_payload()
                .map_err(|err| unreadable(err.to_string()))?;
            if let Some(f) = self.finished_in(&r) {
                live.finished.insert(f);
            }
            live.push_outbox(r);
        }
        // A version-1 state holds finished orders: put them into their keys
        // now (idempotent), before anything is decided on this state.
        let mut migrated = Vec::new();
        let now = Utc::now();
        for a in adapters.values_mut() {
            migrated.extend(a.take_finished(now));
        }
        if !migrated.is_empty() {
            let records = migrated
                .iter()
                .map(|f| self.finished_record(f))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|Fatal(e)| e)?;
            let failed = self
                .publisher
                .publish_all(records.iter().map(to_outgoing).collect())
                .await
                .into_iter()
                .find_map(Result::err);
            if let Some(e) = failed {
                return Err(format!("migrating finished orders to their keys: {e}"));
            }
            tracing::info!(
                count = migrated.len(),
                "finished orders of a version-1 state moved to their own keys"
            );
            for f in migrated {
                live.finished.insert(f);
            }
            live.dirty = true;
        }
        live.adapters = adapters;
        tracing::info!(
            revision = ?revision,
            outbox = live.outbox.len(),
            "execution state loaded"
        );
        self.metrics.outbox.set(live.outbox.len() as i64);
        Ok(live)
    }

    /// The finished order a `fin.` outbox entry records, if it is one.
    fn finished_in(&self, r: &Recorded) -> Option<FinishedOrder> {
        let key = r.subject.strip_prefix(&self.kv_prefix)?;
        key.starts_with(FINISHED_PREFIX)
            .then(|| serde_json::from_str(r.payload.get()).ok())
            .flatten()
    }

    fn finished_record(&self, f: &FinishedOrder) -> Result<Recorded, Fatal> {
        let key = finished_key(&f.order_id);
        Ok(Recorded {
            subject: format!("{}{key}", self.kv_prefix),
            msg_id: key,
            payload: to_json(f)?,
            headers: BTreeMap::new(),
        })
    }

    /// Move finished orders out of the adapters: into memory and, as `fin.`
    /// records, into the outbox.
    fn drain_finished(&self, live: &mut Live, now: DateTime<Utc>) -> Result<(), Fatal> {
        let mut done = Vec::new();
        for a in live.adapters.values_mut() {
            done.extend(a.take_finished(now));
        }
        for f in done {
            let r = self.finished_record(&f)?;
            live.push_outbox(r);
            live.finished.insert(f);
        }
        Ok(())
    }

    /// The state as JSON, serialized from the live structures (no copy).
    /// Returns the bytes and how many of them are the outbox.
    fn encode(&self, live: &Live) -> Result<(Vec<u8>, usize), String> {
        let mut buf = Vec::with_capacity(live.base_bytes + live.outbox_bytes + 1024);
        let err = |e: serde_json::Error| format!("cannot serialize the state: {e}");
        buf.extend_from_slice(b"{\"version\":");
        serde_json::to_writer(&mut buf, &STATE_VERSION).map_err(err)?;
        buf.extend_from_slice(b",\"adapters\":{");
        for (i, (name, a)) in live.adapters.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            serde_json::to_writer(&mut buf, name).map_err(err)?;
            buf.push(b':');
            a.save_into(&mut buf).map_err(|e| e.to_string())?;
        }
        buf.extend_from_slice(b"},\"applied\":");
        serde_json::to_writer(&mut buf, &live.applied).map_err(err)?;
        buf.extend_from_slice(b",\"outbox\":");
        let before = buf.len();
        serde_json::to_writer(&mut buf, &live.outbox).map_err(err)?;
        let outbox = buf.len() - before;
        buf.push(b'}');
        Ok((buf, outbox))
    }

    /// Write the state with compare-and-set.
    async fn persist(&self, live: &mut Live) -> Result<(), String> {
        let (bytes, outbox) = self.encode(live)?;
        let size = bytes.len();
        let max = self.max_payload();
        // (The subject and the compare-and-set header count too.)
        if size + 512 > max {
            self.metrics
                .state_writes
                .with_label_values(&["error"])
                .inc();
            return Err(format!(
                "state of {size} bytes exceeds NATS max_payload ({max}): {} bytes of working orders",
                size - outbox
            ));
        }
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
                self.state_bytes_max.fetch_max(size, Ordering::Relaxed);
                if size - outbox > STATE_WARN_BYTES {
                    tracing::warn!(
                        bytes = size - outbox,
                        "the working orders take a large part of the execution state (NATS max_payload bounds it)"
                    );
                }
                live.revision = Some(rev);
                live.base_bytes = size - outbox;
                live.dirty = false;
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
        let results = self
            .publisher
            .publish_all(live.outbox.iter().map(to_outgoing).collect())
            .await;
        let total = live.outbox.len();
        let mut keep = Vec::new();
        let mut first_error = None;
        let now = Utc::now();
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
                    {
                        let nanos = now.timestamp_nanos_opt().unwrap_or_default() - at;
                        if nanos >= 0 {
                            self.e2e_fill.observe(nanos as f64 / 1e9);
                        }
                    }
                }
                Ok(_) => {}
            }
        }
        if let Some(e) = first_error {
            tracing::warn!(error = %e, pending = keep.len(), "outputs not published; the clock retries them");
        }
        if keep.len() < total {
            live.dirty = true;
        }
        live.outbox_bytes = keep.iter().map(Recorded::weight).sum();
        live.outbox = keep;
        if !live.finished_in_outbox(&self.kv_prefix) {
            live.finished.trim(FINISHED_CACHE);
        }
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

    /// Read both consumers' ack floors (the clock does, so batches don't).
    async fn refresh_floors(&self) {
        for source in [Source::Orders, Source::Market] {
            match self.ack_floor(source).await {
                Ok(f) => self.floors[source.index()].store(f, Ordering::Relaxed),
                Err(e) => tracing::debug!(error = %e, "no ack floor; applied set kept"),
            }
        }
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

    /// Handle one batch of one source (steps 1–6 of the module docs).
    async fn run_batch(&self, source: Source, msgs: &[Delivery]) -> Vec<Outcome> {
        match AssertUnwindSafe(self.run_batch_inner(source, msgs))
            .catch_unwind()
            .await
        {
            Ok(outcomes) => outcomes,
            Err(_) => {
                tracing::error!("execution batch panicked; state reloaded from KV");
                *self.live.lock().await = None;
                msgs.iter()
                    .map(|_| Outcome::retry(self.settings.retry_after, "handler panicked"))
                    .collect()
            }
        }
    }

    async fn run_batch_inner(&self, source: Source, msgs: &[Delivery]) -> Vec<Outcome> {
        let mut inputs: Vec<Input> = msgs.iter().map(|d| self.parse(source, d)).collect();
        let mut outcomes = Vec::with_capacity(msgs.len());
        let mut guard = self.live.lock().await;
        while outcomes.len() < msgs.len() {
            let from = outcomes.len();
            match self
                .run_chunk(&mut guard, source, &msgs[from..], &mut inputs[from..])
                .await
            {
                Ok(done) => outcomes.extend(done),
                Err(reason) => {
                    tracing::warn!(%reason, count = msgs.len() - from, "inputs not applied; will retry");
                    outcomes.extend(
                        msgs[from..]
                            .iter()
                            .map(|_| Outcome::retry(self.settings.retry_after, reason.clone())),
                    );
                }
            }
        }
        outcomes
    }

    /// Apply, persist and publish a prefix of `msgs` (the whole of it unless
    /// its outputs would not fit one state value); its outcomes.
    async fn run_chunk(
        &self,
        guard: &mut Option<Live>,
        source: Source,
        msgs: &[Delivery],
        inputs: &mut [Input],
    ) -> Result<Vec<Outcome>, String> {
        let floor = self.floors[source.index()].load(Ordering::Relaxed);
        let mut last_error = String::from("state not written");
        // A failed write (typically a compare-and-set conflict with another
        // instance) reloads the state and applies the chunk again on top of
        // it, a few times, before it is handed back for redelivery.
        for attempt in 1..=PERSIST_ATTEMPTS {
            if attempt > 1 {
                // The last attempt took the orders it submitted.
                for (input, d) in inputs.iter_mut().zip(msgs) {
                    *input = self.parse(source, d);
                }
            }
            if guard.is_none() {
                *guard = Some(self.load().await?);
            }
            let Some(live) = guard.as_mut() else {
                return Err("state not loaded".into());
            };
            if floor > 0 {
                if let Some(set) = live.applied.get_mut(source.key()) {
                    set.prune(floor);
                }
            }
            let budget = self.outbox_budget(live);
            if live.outbox_bytes >= budget {
                self.flush(live).await;
                if live.outbox_bytes >= budget {
                    return Err(format!(
                        "outbox full: {} outputs not yet published",
                        live.outbox.len()
                    ));
                }
            }
            self.lookup_unknown(live, source, msgs, inputs).await?;
            let now = Utc::now();
            let before = live.outbox.len();
            let (outcomes, labels) = match self.apply_all(live, source, msgs, inputs, now, budget) {
                Ok(r) => r,
                Err(Fatal(e)) => {
                    // The venue may hold half-applied changes: forget them.
                    *guard = None;
                    return Err(e);
                }
            };
            if labels.contains(&"applied") {
                if let Err(Fatal(e)) = self.drain_finished(live, now) {
                    *guard = None;
                    return Err(e);
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

    /// Decode one input (step 0: no state involved).
    fn parse(&self, source: Source, d: &Delivery) -> Input {
        let rest = self.subjects.strip(&d.subject);
        match source {
            Source::Orders => {
                let mut parts = rest.split('.');
                let (Some("orders"), Some(_), Some(kind @ ("new" | "cancel")), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Input::Invalid(
                        "bad_subject",
                        format!("`{}` is not orders.<account>.new|cancel", d.subject),
                    );
                };
                let Some(Ok(account)) = self.subjects.token(&d.subject, 1) else {
                    return Input::Invalid(
                        "bad_subject",
                        format!("`{}` is not orders.<account>.new|cancel", d.subject),
                    );
                };
                if kind == "new" {
                    let order: Order = match serde_json::from_slice(&d.payload) {
                        Ok(o) => o,
                        Err(e) => {
                            return Input::Invalid("invalid_order", format!("not an order: {e}"))
                        }
                    };
                    if order.order_id.is_empty() {
                        return Input::Invalid("invalid_order", "empty order_id".into());
                    }
                    if order.account != account {
                        return Input::Invalid(
                            "account_mismatch",
                            format!("order for {} on the subject of {account}", order.account),
                        );
                    }
                    Input::New {
                        account,
                        order: Some(Box::new(order)),
                    }
                } else {
                    let cancel: CancelOrder = match serde_json::from_slice(&d.payload) {
                        Ok(c) => c,
                        Err(e) => {
                            return Input::Invalid("invalid_cancel", format!("not a cancel: {e}"))
                        }
                    };
                    if cancel.account != account {
                        return Input::Invalid(
                            "account_mismatch",
                            format!("cancel for {} on the subject of {account}", cancel.account),
                        );
                    }
                    Input::Cancel { account, cancel }
                }
            }
            Source::Market => {
                let mut parts = rest.split('.');
                let (Some("market"), Some("prices"), Some(_), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return Input::Invalid(
                        "bad_subject",
                        format!("`{}` is not market.prices.<symbol>", d.subject),
                    );
                };
                let Some(Ok(symbol)) = self.subjects.token(&d.subject, 2) else {
                    return Input::Invalid(
                        "bad_subject",
                        format!("`{}` is not market.prices.<symbol>", d.subject),
                    );
                };
                let p: MarketPrice = match serde_json::from_slice(&d.payload) {
                    Ok(p) => p,
                    Err(e) => return Input::Invalid("invalid_price", format!("not a price: {e}")),
                };
                if p.symbol != symbol {
                    return Input::Invalid(
                        "symbol_mismatch",
                        format!("price of {} on the subject of {symbol}", p.symbol),
                    );
                }
                if let Err(e) = mtx_schemas::limits::check_price(p.price) {
                    return Input::Invalid("invalid_price", format!("price {e}"));
                }
                if let Err(e) = p.check_time(d.published) {
                    return Input::Invalid("invalid_price", e);
                }
                Input::Price {
                    symbol,
                    price: p.price,
                }
            }
        }
    }

    /// What memory knows about `order_id`: in its adapter (working), or
    /// finished.
    fn known_in_memory(&self, live: &Live, account: &str, order_id: &str) -> Option<OrderInfo> {
        if let Some(a) = self
            .settings
            .routes
            .route(account)
            .and_then(|n| live.adapters.get(n))
        {
            if let Some(info) = a.lookup(order_id) {
                return Some(info);
            }
        }
        live.finished.get(order_id).map(FinishedOrder::info)
    }

    /// Step 2: read the `fin.` keys of the order ids the chunk names that
    /// memory does not know, concurrently; those found join memory. A key
    /// not found is only meaningful for a write against the state in memory
    /// now, so nothing is remembered of it.
    async fn lookup_unknown(
        &self,
        live: &mut Live,
        source: Source,
        msgs: &[Delivery],
        inputs: &[Input],
    ) -> Result<(), String> {
        let applied = live.applied.get(source.key());
        let mut ids = HashSet::new();
        for (d, input) in msgs.iter().zip(inputs) {
            let Some((account, id)) = input.order_id() else {
                continue;
            };
            if applied.is_some_and(|s| s.contains(d.stream_seq)) {
                continue; // a redelivery: not applied again
            }
            if self.known_in_memory(live, account, id).is_none() {
                ids.insert(id.to_string());
            }
        }
        if ids.is_empty() {
            return Ok(());
        }
        let kv = self.kv().await?;
        let stream = &kv.stream;
        let direct = self.direct_reads.load(Ordering::Relaxed);
        let subject_of = |id: &str| format!("{}{}", self.kv_prefix, finished_key(id));
        let read = |id: &str, m: Option<StreamMessage>| -> Result<Option<FinishedOrder>, String> {
            let Some(m) = m else {
                return Ok(None);
            };
            if multiget::is_kv_marker(&m) {
                return Ok(None);
            }
            let f: FinishedOrder = serde_json::from_slice(&m.payload)
                .map_err(|e| format!("finished order {} unreadable: {e}", m.subject))?;
            if f.order_id != id {
                return Err(format!("{} holds order {}", m.subject, f.order_id));
            }
            Ok(Some(f))
        };
        let results: Vec<Result<Option<FinishedOrder>, String>> = if direct {
            // One batched direct get for the whole chunk.
            let ids: Vec<String> = ids.into_iter().collect();
            let subjects: Vec<String> = ids.iter().map(|id| subject_of(id)).collect();
            match multiget::last_messages(
                &self.js.client(),
                &kv.stream_name,
                &subjects,
                LOOKUP_TIMEOUT,
            )
            .await
            {
                Ok(mut found) => ids
                    .iter()
                    .zip(&subjects)
                    .map(|(id, subject)| read(id, found.remove(subject)))
                    .collect(),
                Err(e) => vec![Err(e.to_string())],
            }
        } else {
            futures::stream::iter(ids)
                .map(|id| async move {
                    let m = read_last(stream, &subject_of(&id)).await?;
                    read(&id, m)
                })
                .buffer_unordered(LOOKUP_CONCURRENCY)
                .collect()
                .await
        };
        for r in results {
            let label = match &r {
                Ok(Some(_)) => "found",
                Ok(None) => "not_found",
                Err(_) => "error",
            };
            self.metrics
                .finished_lookups
                .with_label_values(&[label])
                .inc();
            if let Some(f) = r? {
                live.finished.insert(f);
            }
        }
        Ok(())
    }

    /// Step 3: apply inputs in order to the in-memory state until the outbox
    /// reaches `budget` (at least one input). One outcome and label per
    /// input applied.
    fn apply_all(
        &self,
        live: &mut Live,
        source: Source,
        msgs: &[Delivery],
        inputs: &mut [Input],
        now: DateTime<Utc>,
        budget: usize,
    ) -> Result<(Vec<Outcome>, Vec<&'static str>), Fatal> {
        let mut outcomes = Vec::with_capacity(msgs.len());
        let mut labels = Vec::with_capacity(msgs.len());
        for (d, input) in msgs.iter().zip(inputs.iter_mut()) {
            if !outcomes.is_empty() && live.outbox_bytes >= budget {
                break;
            }
            if live
                .applied
                .get(source.key())
                .is_some_and(|s| s.contains(d.stream_seq))
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
            let step = self.apply_one(live, d, input, now)?;
            let record = |live: &mut Live| {
                // Duplicates too: harmless (a redelivery is a duplicate
                // either way) and it keeps the ranges contiguous.
                if let Some(set) = live.applied.get_mut(source.key()) {
                    set.insert(d.stream_seq);
                } else {
                    live.applied.insert(
                        source.key().to_string(),
                        SeqRanges::from_iter([d.stream_seq]),
                    );
                }
            };
            match step {
                Step::Applied(records) => {
                    labels.push("applied");
                    for r in records {
                        live.push_outbox(r);
                    }
                    record(live);
                    outcomes.push(Outcome::Ok(Vec::new()));
                }
                Step::Duplicate => {
                    labels.push("duplicate");
                    record(live);
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

    fn apply_one(
        &self,
        live: &mut Live,
        d: &Delivery,
        input: &mut Input,
        now: DateTime<Utc>,
    ) -> Result<Step, Fatal> {
        match input {
            Input::Invalid(reason, detail) => Ok(Step::Reject(reason, detail.clone())),
            Input::Price { symbol, price } => {
                let mut events = Vec::new();
                for a in live.adapters.values_mut() {
                    events.extend(a.on_price(symbol, *price, now));
                }
                self.render(&events, Some(d)).map(Step::Applied)
            }
            Input::New {
                account,
                order: slot,
            } => {
                let Some(order) = slot.as_deref() else {
                    return Err(Fatal("an order was applied twice in one attempt".into()));
                };
                let known = self.known_in_memory(live, account, &order.order_id);
                let adapter = match self.adapter_for(live, account) {
                    Ok(a) => a,
                    Err(step) => return Ok(step),
                };
                if let Some(info) = known {
                    return Ok(if info.fingerprint == order_fingerprint(order) {
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
                let Some(order) = slot.take() else {
                    return Err(Fatal("an order was applied twice in one attempt".into()));
                };
                let events = adapter.submit(*order, now);
                self.render(&events, Some(d)).map(Step::Applied)
            }
            Input::Cancel { account, cancel: c } => {
                let known = self.known_in_memory(live, account, &c.order_id);
                let adapter = match self.adapter_for(live, account) {
                    Ok(a) => a,
                    Err(step) => return Ok(step),
                };
                let Some(info) = known else {
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
                    // The fill won the race (Cerebro cancels the rest of an
                    // entry it still saw working): a venue answers "too late
                    // to cancel". Not an error of the sender, so counted and
                    // acknowledged, not dead-lettered; nothing changes.
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
        }
    }

    /// The clock: expiries and asynchronous venue events, then a retry of
    /// whatever is still in the outbox; ack floors; the janitor.
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
        self.refresh_floors().await;
        let now = Utc::now();
        {
            let mut guard = self.live.lock().await;
            if guard.is_none() {
                *guard = Some(self.load().await?);
            }
            let Some(live) = guard.as_mut() else {
                return Err("state not loaded".into());
            };
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
            for r in records {
                live.push_outbox(r);
            }
            if changed {
                if let Err(Fatal(e)) = self.drain_finished(live, now) {
                    *guard = None;
                    return Err(e);
                }
            }
            if changed || live.dirty {
                if let Err(e) = self.persist(live).await {
                    *guard = None;
                    return Err(e);
                }
            }
            self.flush(live).await;
        }
        self.janitor(now).await;
        Ok(())
    }

    /// Purge `fin.` records older than the retention (see the module docs).
    async fn janitor(&self, now: DateTime<Utc>) {
        let retain = self.settings.retain_finished;
        let interval =
            (retain / 16).clamp(chrono::Duration::seconds(1), chrono::Duration::hours(1));
        let stream_name = format!("KV_{}", self.bucket);
        let note = {
            let j = self.janitor.lock().unwrap_or_else(|p| p.into_inner());
            j.marks.back().is_none_or(|(_, t)| now - *t >= interval)
        };
        // The bucket's stream info, every tick: the replica count decides
        // how `fin.` keys are read; the last sequence is the janitor's note.
        match self.js.get_stream(&stream_name).await {
            Ok(st) => {
                let info = st.cached_info();
                self.note_bucket_config(&info.config);
                if note {
                    // Every record up to the last sequence was stored before
                    // now (the reading time, not the tick's: exact bound).
                    let next = info.state.last_sequence + 1;
                    let mut j = self.janitor.lock().unwrap_or_else(|p| p.into_inner());
                    j.marks.push_back((next, Utc::now()));
                }
            }
            Err(e) => tracing::debug!(error = %e, "janitor: no stream info"),
        }
        loop {
            let due = {
                let j = self.janitor.lock().unwrap_or_else(|p| p.into_inner());
                if j.quiet_until.is_some_and(|t| now < t) {
                    return;
                }
                match j.marks.front() {
                    Some((seq, t)) if *t <= now - retain => *seq,
                    _ => return,
                }
            };
            let filter = format!("{}{FINISHED_PREFIX}>", self.kv_prefix);
            let purged = match self.js.get_stream_no_info(&stream_name).await {
                Ok(st) => st
                    .purge()
                    .filter(filter)
                    .sequence(due)
                    .await
                    .map(|r| r.purged)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            let mut j = self.janitor.lock().unwrap_or_else(|p| p.into_inner());
            match purged {
                Ok(n) => {
                    self.metrics
                        .finished_purges
                        .with_label_values(&["ok"])
                        .inc();
                    tracing::debug!(purged = n, below = due, "expired finished orders purged");
                    j.marks.pop_front();
                    j.quiet_until = None;
                }
                Err(e) => {
                    self.metrics
                        .finished_purges
                        .with_label_values(&["error"])
                        .inc();
                    tracing::warn!(error = %e, "cannot purge expired finished orders; retrying later");
                    j.quiet_until = Some(now + interval);
                    return;
                }
            }
        }
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
        let mut out = Vec::with_capacity(events.len() + 1);
        // The order events of each order, in the order the venue made them.
        let mut per_order: Vec<Vec<&OrderEvent>> = Vec::new();
        let mut group_of: HashMap<&str, usize> = HashMap::new();
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
                match group_of.get(ev.order_id.as_str()) {
                    Some(&i) => per_order[i].push(ev),
                    None => {
                        group_of.insert(&ev.order_id, per_order.len());
                        per_order.push(vec![ev]);
                    }
                }
            }
            if let VenueEvent::CancelRejected {
                order_id, reason, ..
            } = e
            {
                tracing::warn!(%order_id, %reason, "venue refused a cancel");
            }
        }
        // One message per order: its events of this step travel together
        // (see `mtx_schemas::order::decode_order_events`).
        for group in per_order {
            let (first, last) = (group[0], group[group.len() - 1]);
            let (msg_id, payload) = if group.len() == 1 {
                (format!("{}.{}", first.order_id, first.seq), to_json(first)?)
            } else {
                (
                    format!("{}.{}-{}", first.order_id, first.seq, last.seq),
                    to_json(&group)?,
                )
            };
            out.push(Recorded {
                subject: self
                    .subjects
                    .orders_events(&first.account)
                    .map_err(|e| fatal(e.to_string()))?,
                msg_id,
                payload,
                headers: hdrs.clone(),
            });
        }
        Ok(out)
    }
}

/// The last message of `subject` in the bucket's stream, if any, from the
/// stream leader (a follower may not have the latest write yet). Buckets
/// that allow direct gets and have one replica are read in batches instead
/// ([`multiget`]), which costs the server less.
async fn read_last(
    stream: &jetstream::stream::Stream,
    subject: &str,
) -> Result<Option<StreamMessage>, String> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("reading {subject}: {e}")),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<Box<RawValue>, Fatal> {
    serde_json::value::to_raw_value(v)
        .map_err(|e| Fatal(format!("cannot serialize an output: {e}")))
}

fn to_outgoing(r: &Recorded) -> Outgoing {
    let mut o = Outgoing::new(
        r.subject.clone(),
        r.msg_id.clone(),
        bytes::Bytes::copy_from_slice(r.payload.get().as_bytes()),
    );
    for (k, v) in &r.headers {
        o.headers.insert(k.as_str(), v.as_str());
    }
    o
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn execution_reports_are_told_apart_by_subject() {
        assert!(is_execution_report("executions.ACC_A"));
        assert!(is_execution_report("t1.executions.ACC_A"));
        assert!(!is_execution_report("t1.orders.ACC_A.events"));
        assert!(!is_execution_report("t1.orders.ACC_A.new"));
        assert!(!is_execution_report("$KV.t1_execution_state.fin.x"));
    }

    #[test]
    fn seq_ranges_merge_and_prune() {
        let mut s = SeqRanges::default();
        for x in [5, 6, 7, 10, 9, 1, 3, 2, 8] {
            s.insert(x);
        }
        assert_eq!(s.0, [(1, 3), (5, 10)]);
        assert!(s.contains(1) && s.contains(10) && !s.contains(4) && !s.contains(11));
        s.insert(4);
        assert_eq!(s.0, [(1, 10)]);
        s.prune(6);
        assert_eq!(s.0, [(7, 10)]);
        s.prune(10);
        assert!(s.0.is_empty());
        assert_eq!(
            serde_json::to_string(&SeqRanges::from_iter([3, 4, 9])).unwrap(),
            "[[3,4],[9,9]]"
        );
    }

    proptest! {
        #[test]
        fn seq_ranges_behave_like_a_set(
            ops in proptest::collection::vec((0u64..200, any::<bool>()), 0..300)
        ) {
            let mut s = SeqRanges::default();
            let mut model = BTreeSet::new();
            for (x, prune) in ops {
                if prune && x % 7 == 0 {
                    s.prune(x);
                    model.retain(|y| *y > x);
                } else {
                    s.insert(x);
                    model.insert(x);
                }
                // Canonical: sorted, disjoint, not adjacent.
                for w in s.0.windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0, "{:?}", s.0);
                }
                prop_assert!(s.0.iter().all(|r| r.0 <= r.1));
            }
            for x in 0..201 {
                prop_assert_eq!(s.contains(x), model.contains(&x));
            }
        }

        #[test]
        fn finished_keys_are_valid_and_distinct(a in ".{1,12}", b in ".{1,12}") {
            let (ka, kb) = (finished_key(&a), finished_key(&b));
            let valid = |k: &str| k.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_=.".contains(&c));
            prop_assert!(valid(&ka) && valid(&kb));
            prop_assert!(!ka.ends_with('.') && !ka.contains(".."));
            prop_assert_eq!(a == b, ka == kb);
        }
    }

    #[test]
    fn finished_key_keeps_plain_ids_readable() {
        assert_eq!(finished_key("ord_ab-12"), "fin.ord_ab-12");
        assert_eq!(finished_key("a.b=c"), "fin.a=2Eb=3Dc");
    }
}
