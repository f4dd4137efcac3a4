//! The accounts stage (`mtx run accounts`): executions (and marks, orders,
//! order events) in, account state out.
//!
//! | input | consumer | effect |
//! |---|---|---|
//! | `executions.<account>` | `accounts` on `EXECUTIONS` | positions, cash, realized P&L, commissions |
//! | `market.prices.<symbol>` | `accounts_market` on `MARKET` | marks → unrealized P&L, margin |
//! | `orders.<account>.new` | `accounts_orders` on `ORDERS` | `open_orders` |
//! | `orders.<account>.events` | `accounts_order_events` on `ORDER_EVENTS` | `open_orders` (status, remaining quantity) |
//!
//! Every input goes through [`Book::apply`]. After each batch the accounts it
//! changed get one new [`AccountState`] each (coalesced per batch): put in the
//! `account_state` KV bucket (JSON, key [`account_state_key`], what Cerebro
//! reads) and published on `accounts.<account>.state`. Every account is also
//! re-published every `accounts.publish_interval_secs`, and once right after
//! start (configured accounts included, so Cerebro sees their initial balance
//! before the first fill). A state that could not be stored or published stays
//! pending and goes out with the next batch or period.
//!
//! | problem | outcome |
//! |---|---|
//! | payload does not decode | DLQ `invalid_execution` / `invalid_price` / `invalid_order` / `invalid_order_event` |
//! | subject account / symbol ≠ payload | DLQ `account_mismatch` / `symbol_mismatch` |
//! | the ledger refuses the execution | DLQ with [`LedgerError::reason_code`] (`over_close`, `conflicting_duplicate`, ...); nothing booked |
//! | execution applied before (redelivery, replayed copy) | duplicate (ack) |
//!
//! # Restart = replay
//!
//! The stage persists no state of its own: `EXECUTIONS` is kept forever and
//! is the ledger. Before its first batch (and after any failure that may
//! have left the book half-updated) the stage rebuilds the book from nothing
//! with [`rebuild`]: every execution from the beginning of `EXECUTIONS` in
//! stream order, then the latest price per symbol on `MARKET`, then every
//! order and order event still in `ORDERS` / `ORDER_EVENTS`, each through
//! the same [`Book::apply`] (messages the live loop dead-letters are skipped
//! the same way). Then the durable consumers resume; anything they redeliver
//! was already replayed and is a duplicate.
//!
//! Exactness: executions are applied in stream order both live and in replay
//! (first deliveries come in stream order, and no execution outcome is ever
//! retried), the ledger is idempotent on `execution_id`, marks are an
//! order-independent maximum ([`crate::book`]), and open orders are keyed by
//! per-order event sequence. So the rebuilt state equals the live one field
//! for field — except where a stream's age limit has dropped the input: a
//! mark older than `MARKET`'s age limit (the latest fill price is used
//! instead) and an order still working after `ORDERS`' age limit. Replay time
//! grows with the number of executions (no checkpoint yet).

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use chrono::Utc;
use futures::{FutureExt, StreamExt};
use mtx_runtime::config::AccountsConfig;
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::publish::Publisher;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::order::{account_state_key, AccountState};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use prometheus::{GaugeVec, IntCounterVec, Opts, Registry};
use rust_decimal::prelude::ToPrimitive;
use tokio::sync::{Mutex, OnceCell};

use crate::book::{Book, Input};
use crate::ledger::{LedgerConfig, LedgerError};
use crate::spec::{InstrumentSpec, MarginModel};

/// Stage name of the executions loop (`dlq.accounts`).
pub const STAGE: &str = "accounts";
/// Durable consumer on `EXECUTIONS`.
pub const DURABLE_EXECUTIONS: &str = "accounts";
/// Durable consumer on `MARKET` (`market.prices.>`).
pub const DURABLE_MARKET: &str = "accounts_market";
/// Durable consumer on `ORDERS` (`orders.*.new`).
pub const DURABLE_ORDERS: &str = "accounts_orders";
/// Durable consumer on `ORDER_EVENTS`.
pub const DURABLE_ORDER_EVENTS: &str = "accounts_order_events";

/// Why the stage cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The topology lacks a bucket or consumer.
    #[error("topology has no {0}")]
    Topology(String),
    /// Spawning a consumer failed.
    #[error(transparent)]
    Process(#[from] ProcessError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// The ledger configuration from `[accounts]`.
pub fn ledger_config(cfg: &AccountsConfig) -> LedgerConfig {
    LedgerConfig {
        default_initial_balance: cfg.default_initial_balance,
        initial_balances: cfg.initial_balances.clone(),
        instruments: cfg
            .instruments
            .iter()
            .map(|(symbol, i)| {
                let margin = match (i.margin_per_contract, i.margin_fraction) {
                    (Some(a), _) => MarginModel::PerContract(a),
                    (None, f) => MarginModel::PercentOfNotional(f.unwrap_or_default()),
                };
                (
                    symbol.clone(),
                    InstrumentSpec {
                        multiplier: i.multiplier,
                        margin,
                    },
                )
            })
            .collect(),
    }
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `executions.<account>`
    Executions,
    /// `market.prices.<symbol>`
    Market,
    /// `orders.<account>.new`
    Orders,
    /// `orders.<account>.events`
    OrderEvents,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Executions => "executions",
            Source::Market => "market",
            Source::Orders => "orders",
            Source::OrderEvents => "order_events",
        }
    }
}

/// Why a message is refused: (reason code, detail).
type Refusal = (&'static str, String);

/// Decode a message of `source` on `subject` and check it against its
/// subject. Shared by the live loops and [`rebuild`].
pub fn decode(
    subjects: &Subjects,
    source: Source,
    subject: &str,
    payload: &[u8],
) -> Result<Input, Refusal> {
    let token = |i: usize| subjects.token(subject, i).and_then(Result::ok);
    let parts: Vec<&str> = subjects.strip(subject).split('.').collect();
    let shape_ok = match source {
        Source::Executions => matches!(parts.as_slice(), ["executions", _]),
        Source::Market => matches!(parts.as_slice(), ["market", "prices", _]),
        Source::Orders => matches!(parts.as_slice(), ["orders", _, "new"]),
        Source::OrderEvents => matches!(parts.as_slice(), ["orders", _, "events"]),
    };
    if !shape_ok {
        return Err(("bad_subject", format!("unexpected subject `{subject}`")));
    }
    let mismatch = |what: &str, on: &str| {
        (
            "account_mismatch",
            format!("{what} for {on} on `{subject}`"),
        )
    };
    match source {
        Source::Executions => {
            let x: mtx_schemas::order::ExecutionConfirmation = serde_json::from_slice(payload)
                .map_err(|e| ("invalid_execution", e.to_string()))?;
            if token(1).as_deref() != Some(x.account.as_str()) {
                return Err(mismatch("execution", &x.account));
            }
            Ok(Input::Execution(x))
        }
        Source::Market => {
            let p: mtx_schemas::market::MarketPrice =
                serde_json::from_slice(payload).map_err(|e| ("invalid_price", e.to_string()))?;
            if token(2).as_deref() != Some(p.symbol.as_str()) {
                return Err((
                    "symbol_mismatch",
                    format!("price of {} on `{subject}`", p.symbol),
                ));
            }
            if p.price <= rust_decimal::Decimal::ZERO {
                return Err((
                    "invalid_price",
                    format!("price must be positive, got {}", p.price),
                ));
            }
            Ok(Input::Price(p))
        }
        Source::Orders => {
            let o: mtx_schemas::order::Order =
                serde_json::from_slice(payload).map_err(|e| ("invalid_order", e.to_string()))?;
            if token(1).as_deref() != Some(o.account.as_str()) {
                return Err(mismatch("order", &o.account));
            }
            Ok(Input::Order(o))
        }
        Source::OrderEvents => {
            let e: mtx_schemas::order::OrderEvent = serde_json::from_slice(payload)
                .map_err(|e| ("invalid_order_event", e.to_string()))?;
            if token(1).as_deref() != Some(e.account.as_str()) {
                return Err(mismatch("order event", &e.account));
            }
            Ok(Input::OrderEvent(e))
        }
    }
}

fn refusal(e: &LedgerError) -> Refusal {
    (e.reason_code(), e.to_string())
}

/// Read every message of `stream` under `filter` (all of it, or the last per
/// subject) and hand each to `f`, in stream order. Reads up to what the
/// stream held when the read started.
async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    deliver_policy: consumer::DeliverPolicy,
    mut f: impl FnMut(&str, &[u8]),
) -> Result<u64, String> {
    let st = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    // Stop at what the stream held when the read started: a busy feed must
    // not keep the replay going (later messages come through the consumers).
    let last = st.cached_info().state.last_sequence;
    let c = st
        .create_consumer(consumer::pull::Config {
            filter_subject: filter.to_string(),
            deliver_policy,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("replay consumer on {stream}: {e}"))?;
    // The create response carries the consumer info: no INFO request needed.
    let mut remaining = c.cached_info().num_pending;
    let name = c.cached_info().name.clone();
    let mut read = 0u64;
    let mut idle = 0;
    'read: while remaining > 0 {
        let mut batch = c
            .fetch()
            .max_messages(remaining.min(1_000) as usize)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .map_err(|e| format!("replay fetch on {stream}: {e}"))?;
        let mut got = 0u64;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| format!("replay on {stream}: {e}"))?;
            got += 1;
            read += 1;
            f(m.subject.as_str(), &m.payload);
            let (pending, seq) = m
                .info()
                .map(|i| (i.pending, i.stream_sequence))
                .unwrap_or((remaining.saturating_sub(1), 0));
            if pending == 0 || seq >= last {
                break 'read;
            }
            remaining = pending;
        }
        if got == 0 {
            idle += 1;
            if idle >= 3 {
                let _ = st.delete_consumer(&name).await;
                return Err(format!(
                    "replay of {stream} stalled with {remaining} messages pending"
                ));
            }
        } else {
            idle = 0;
        }
    }
    let _ = st.delete_consumer(&name).await;
    Ok(read)
}

/// Rebuild the whole book from the streams (see the module docs). Messages
/// the live stage would dead-letter are skipped; the count of refused ones is
/// returned with the book.
pub async fn rebuild(
    js: &jetstream::Context,
    topology: &Topology,
    config: LedgerConfig,
) -> Result<(Book, u64), String> {
    let subjects = Subjects::new(&topology.settings.prefix);
    let mut book = Book::new(config);
    let mut refused = 0u64;
    let plan = [
        (
            Source::Executions,
            streams::EXECUTIONS,
            "executions.>",
            consumer::DeliverPolicy::All,
        ),
        (
            Source::Market,
            streams::MARKET,
            "market.prices.>",
            consumer::DeliverPolicy::LastPerSubject,
        ),
        (
            Source::Orders,
            streams::ORDERS,
            "orders.*.new",
            consumer::DeliverPolicy::All,
        ),
        (
            Source::OrderEvents,
            streams::ORDER_EVENTS,
            "orders.*.events",
            consumer::DeliverPolicy::All,
        ),
    ];
    for (source, stream, filter, policy) in plan {
        let n = read_stream(
            js,
            &topology.stream_name(stream),
            &subjects.raw_subject(filter),
            policy,
            |subject, payload| {
                let applied = decode(&subjects, source, subject, payload)
                    .and_then(|input| book.apply(&input).map_err(|e| refusal(&e)));
                if let Err((reason, detail)) = applied {
                    refused += 1;
                    tracing::debug!(source = source.label(), reason, %detail, "replay skipped a refused message");
                }
            },
        )
        .await?;
        tracing::info!(source = source.label(), messages = n, "replayed");
    }
    Ok((book, refused))
}

/// Metrics of the stage.
#[derive(Clone)]
pub struct AccountsMetrics {
    /// Inputs by source and result (`applied`, `duplicate`, `refused`).
    pub inputs: IntCounterVec,
    /// Account states stored + published, by result (`ok`, `error`).
    pub states: IntCounterVec,
    /// Messages read by start-up replays, by source.
    pub replayed: IntCounterVec,
    /// Equity per configured account (`mtx_account_equity`; accounts not in
    /// `accounts.initial_balances` are left out so the label stays bounded).
    pub equity: GaugeVec,
    /// Margin used / equity per configured account, the utilisation
    /// Cerebro's cap uses (`mtx_account_margin_utilization_ratio`).
    pub margin_utilization: GaugeVec,
}

impl AccountsMetrics {
    /// Create and register.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = AccountsMetrics {
            inputs: IntCounterVec::new(
                Opts::new("mtx_accounts_inputs_total", "Accounts inputs by result"),
                &["source", "result"],
            )?,
            states: IntCounterVec::new(
                Opts::new(
                    "mtx_accounts_states_published_total",
                    "Account states stored in KV and published",
                ),
                &["result"],
            )?,
            replayed: IntCounterVec::new(
                Opts::new("mtx_accounts_replays_total", "Start-up replays of the book"),
                &["result"],
            )?,
            equity: GaugeVec::new(
                Opts::new("mtx_account_equity", "Account equity, account currency"),
                &["account"],
            )?,
            margin_utilization: GaugeVec::new(
                Opts::new(
                    "mtx_account_margin_utilization_ratio",
                    "Margin used / equity (may exceed 1)",
                ),
                &["account"],
            )?,
        };
        registry.register(Box::new(m.inputs.clone()))?;
        registry.register(Box::new(m.states.clone()))?;
        registry.register(Box::new(m.replayed.clone()))?;
        registry.register(Box::new(m.equity.clone()))?;
        registry.register(Box::new(m.margin_utilization.clone()))?;
        Ok(m)
    }
}

struct Live {
    book: Book,
    /// Accounts whose latest state is not stored + published yet.
    dirty: BTreeSet<String>,
}

/// The accounts engine shared by the stage's loops and timer.
pub struct Accounts {
    js: jetstream::Context,
    subjects: Subjects,
    topology: Topology,
    bucket: String,
    kv: OnceCell<kv::Store>,
    config: LedgerConfig,
    live: Mutex<Option<Live>>,
    publisher: Publisher,
    metrics: AccountsMetrics,
    interval: Duration,
    retry_after: Duration,
}

impl Accounts {
    /// An engine for the process's config and topology.
    pub fn new(process: &Process) -> Result<Accounts, WorkerError> {
        let topo = &process.topology;
        let bucket = topo
            .bucket(buckets::ACCOUNT_STATE)
            .ok_or_else(|| WorkerError::Topology(format!("bucket {}", buckets::ACCOUNT_STATE)))?
            .to_string();
        for d in [
            DURABLE_EXECUTIONS,
            DURABLE_MARKET,
            DURABLE_ORDERS,
            DURABLE_ORDER_EVENTS,
        ] {
            if topo.consumer(d).is_none() {
                return Err(WorkerError::Topology(format!("consumer {d}")));
            }
        }
        Ok(Accounts {
            js: process.js.clone(),
            subjects: process.subjects.clone(),
            topology: topo.clone(),
            bucket,
            kv: OnceCell::new(),
            config: ledger_config(&process.config.accounts),
            live: Mutex::new(None),
            publisher: Publisher::new(process.js.clone(), Some(process.metrics.clone()), STAGE),
            metrics: AccountsMetrics::new(&process.registry)?,
            interval: Duration::from_secs(process.config.accounts.publish_interval_secs.max(1)),
            retry_after: Duration::from_millis(process.config.worker.publish_retry_delay_ms),
        })
    }

    /// The stage's metrics.
    pub fn metrics(&self) -> &AccountsMetrics {
        &self.metrics
    }

    /// The live state of `account` right now (rebuilding first if needed).
    pub async fn snapshot(&self, account: &str) -> Result<AccountState, String> {
        let mut guard = self.live.lock().await;
        let live = self.ensure(&mut guard).await?;
        Ok(live.book.snapshot(account, Utc::now()))
    }

    /// The mark in force for `instrument` (rebuilding first if needed).
    pub async fn mark_of(&self, instrument: &str) -> Option<crate::book::Mark> {
        let mut guard = self.live.lock().await;
        let live = self.ensure(&mut guard).await.ok()?;
        live.book.mark_of(instrument)
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

    async fn ensure<'a>(&self, guard: &'a mut Option<Live>) -> Result<&'a mut Live, String> {
        if guard.is_none() {
            let rebuilt = rebuild(&self.js, &self.topology, self.config.clone()).await;
            let (book, refused) = match rebuilt {
                Ok(r) => r,
                Err(e) => {
                    self.metrics.replayed.with_label_values(&["error"]).inc();
                    return Err(e);
                }
            };
            self.metrics.replayed.with_label_values(&["ok"]).inc();
            tracing::info!(
                refused,
                accounts = book.accounts().count(),
                "account book rebuilt from the streams"
            );
            let dirty = book.accounts().map(str::to_string).collect();
            *guard = Some(Live { book, dirty });
        }
        guard.as_mut().ok_or_else(|| "book not built".to_string())
    }

    /// Store and publish the state of every dirty account; failures stay dirty.
    async fn flush(&self, live: &mut Live) {
        if live.dirty.is_empty() {
            return;
        }
        let now = Utc::now();
        let kv = match self.kv().await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::warn!(error = %e, "account states not stored; will retry");
                return;
            }
        };
        let mut outs = Vec::new();
        let mut owners = Vec::new();
        for account in live.dirty.clone() {
            let state = live.book.snapshot(&account, now);
            self.observe(&state);
            let (Ok(body), Ok(subject)) = (
                serde_json::to_vec(&state),
                self.subjects.account_state(&account),
            ) else {
                tracing::error!(%account, "account state cannot be encoded; dropped");
                live.dirty.remove(&account);
                continue;
            };
            if let Err(e) = kv
                .put(account_state_key(&account), body.clone().into())
                .await
            {
                self.metrics.states.with_label_values(&["error"]).inc();
                tracing::warn!(%account, error = %e, "account state not stored in KV; will retry");
                continue;
            }
            let nanos = now.timestamp_nanos_opt().unwrap_or_default();
            outs.push(Outgoing::new(
                subject,
                format!("{}.{nanos}", account_state_key(&account)),
                body,
            ));
            owners.push(account);
        }
        let results = self.publisher.publish_all(outs).await;
        for (account, r) in owners.into_iter().zip(results) {
            match r {
                Ok(_) => {
                    self.metrics.states.with_label_values(&["ok"]).inc();
                    live.dirty.remove(&account);
                }
                Err(e) => {
                    self.metrics.states.with_label_values(&["error"]).inc();
                    tracing::warn!(%account, error = %e, "account state not published; will retry");
                }
            }
        }
    }

    /// Gauges of a configured account's latest state (f64 is fine for a
    /// gauge; the state itself stays Decimal).
    fn observe(&self, state: &AccountState) {
        if !self.config.initial_balances.contains_key(&state.account) {
            return;
        }
        let equity = state.equity.to_f64().unwrap_or(f64::NAN);
        self.metrics
            .equity
            .with_label_values(&[&state.account])
            .set(equity);
        let used = state.margin_used.to_f64().unwrap_or(f64::NAN);
        let ratio = if equity > 0.0 {
            used / equity
        } else if used > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        self.metrics
            .margin_utilization
            .with_label_values(&[&state.account])
            .set(ratio);
    }

    async fn run_batch(&self, source: Source, msgs: &[Delivery]) -> Vec<Outcome> {
        let r = AssertUnwindSafe(self.run_batch_inner(source, msgs))
            .catch_unwind()
            .await;
        let reason = match r {
            Ok(Ok(outcomes)) => return outcomes,
            Ok(Err(e)) => e,
            Err(_) => {
                // The book may be half-updated: rebuild it next time.
                *self.live.lock().await = None;
                "handler panicked".to_string()
            }
        };
        tracing::warn!(%reason, "accounts batch not applied; will retry");
        msgs.iter()
            .map(|_| Outcome::retry(self.retry_after, reason.clone()))
            .collect()
    }

    async fn run_batch_inner(
        &self,
        source: Source,
        msgs: &[Delivery],
    ) -> Result<Vec<Outcome>, String> {
        let mut guard = self.live.lock().await;
        let live = self.ensure(&mut guard).await?;
        tracing::debug!(source = source.label(), messages = msgs.len(), "batch");
        let mut outcomes = Vec::with_capacity(msgs.len());
        for d in msgs {
            let label = |r: &str| {
                self.metrics
                    .inputs
                    .with_label_values(&[source.label(), r])
                    .inc()
            };
            let applied = decode(&self.subjects, source, &d.subject, &d.payload)
                .and_then(|input| live.book.apply(&input).map_err(|e| refusal(&e)));
            match applied {
                Ok(effect) if effect.duplicate => {
                    label("duplicate");
                    outcomes.push(Outcome::Duplicate);
                }
                Ok(effect) => {
                    label("applied");
                    live.dirty.extend(effect.changed);
                    outcomes.push(Outcome::Ok(Vec::new()));
                }
                Err((reason, detail)) => {
                    label("refused");
                    if source == Source::Executions {
                        tracing::error!(reason, %detail, seq = d.stream_seq, "execution refused by the ledger");
                    }
                    outcomes.push(Outcome::reject(reason, detail));
                }
            }
        }
        self.flush(live).await;
        Ok(outcomes)
    }

    /// Re-publish every account (the periodic publish; also the first
    /// rebuild after start).
    pub async fn publish_all(&self) {
        let mut guard = self.live.lock().await;
        match self.ensure(&mut guard).await {
            Ok(live) => {
                let all: Vec<String> = live.book.accounts().map(str::to_string).collect();
                live.dirty.extend(all);
                self.flush(live).await;
            }
            Err(e) => tracing::warn!(error = %e, "account book not available yet"),
        }
    }
}

/// One consumer's handler.
pub struct AccountsHandler {
    engine: Arc<Accounts>,
    source: Source,
}

impl Handler for AccountsHandler {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        self.engine
            .run_batch(self.source, std::slice::from_ref(msg))
            .await
            .pop()
            .unwrap_or_else(|| Outcome::retry(Duration::from_secs(1), "no outcome"))
    }

    async fn handle_batch(&self, msgs: &[Delivery], _concurrency: usize) -> Vec<Outcome> {
        self.engine.run_batch(self.source, msgs).await
    }
}

/// Start the stage in `process`: four loops and the periodic publisher
/// (whose first turn, right away, rebuilds the book and publishes every
/// account).
pub fn spawn(process: &mut Process) -> Result<Arc<Accounts>, WorkerError> {
    let engine = Arc::new(Accounts::new(process)?);
    for (stage, durable, source) in [
        (STAGE, DURABLE_EXECUTIONS, Source::Executions),
        (DURABLE_MARKET, DURABLE_MARKET, Source::Market),
        (DURABLE_ORDERS, DURABLE_ORDERS, Source::Orders),
        (
            DURABLE_ORDER_EVENTS,
            DURABLE_ORDER_EVENTS,
            Source::OrderEvents,
        ),
    ] {
        process.spawn_consumer(
            stage,
            durable,
            Arc::new(AccountsHandler {
                engine: engine.clone(),
                source,
            }),
        )?;
    }
    let timer = engine.clone();
    let shutdown = process.shutdown.clone();
    let beat = process.health.beat("accounts publisher");
    let period = engine.interval;
    process.spawn(async move {
        let mut iv = tokio::time::interval(period);
        iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = iv.tick() => {
                    beat.beat();
                    timer.publish_all().await;
                }
            }
        }
    });
    Ok(engine)
}
