//! The accounts stage (`mtx run accounts`): executions (and marks, orders,
//! order events) in, account state out.
//!
//! | input | consumer | effect |
//! |---|---|---|
//! | `executions.<account>` | `accounts` on `EXECUTIONS` | positions, cash, realized P&L, commissions |
//! | `market.prices.<symbol>` | `accounts_market` on `MARKET` | marks → unrealized P&L, margin |
//! | `orders.<account>.new` | `accounts_orders` on `ORDERS` | `open_orders` |
//! | `orders.<account>.events` | `accounts_order_events` on `ORDER_EVENTS` | `open_orders` (status, remaining quantity); a message holds one event or the events one venue step made of one order, each applied once by `seq` |
//!
//! Every input goes through [`Book::apply`], which marks the accounts it
//! changed *dirty*; the batch's outcomes go back to the consume loop right
//! away (see *Acks* below). A single publisher task turns dirty accounts into
//! new [`AccountState`]s: put in the `account_state` KV bucket (JSON, key
//! [`account_state_key`], what Cerebro reads) and published on
//! `accounts.<account>.state`.
//!
//! Coalescing: an account's state goes out at most once per
//! `accounts.publish_coalesce_ms` (default 25 ms). The first change after a
//! quiet spell goes out at once; changes inside the window are folded into
//! one state taken when the window ends, so the latest state always goes out
//! (a burst of any length ends with a state equal to the book) and a busy
//! account costs at most one snapshot + JSON encoding + KV put + publish per
//! window instead of one per batch. A large state stretches its account's
//! window: after a state of `B` encoded bytes the next one waits at least
//! `B / accounts.publish_bytes_per_sec` (default 1 MB/s, at most 10 s), so a
//! book of hundreds of positions and working orders is not re-encoded,
//! stored and sent every 25 ms under load (the latest state still goes out
//! when the stretched window ends). States of one account go out one at a
//! time, in order, so KV never goes back to an older one. Every account is
//! also re-published every `accounts.publish_interval_secs`, and once right
//! after start (configured accounts included, so Cerebro sees their initial
//! balance before the first fill). A state that could not be stored or
//! published stays dirty and is retried after `worker.publish_retry_delay_ms`
//! (with the latest figures). On shutdown the publisher sends every pending
//! state, and batches finished after the shutdown signal publish their own
//! before they are acked.
//!
//! # Acks
//!
//! An input is acked once it is applied to the in-memory book — not once a
//! state containing it is stored. Nothing else has to be durable first: the
//! inputs themselves are already in their streams (`EXECUTIONS` is kept
//! forever), the stage persists no state of its own, and KV / `ACCOUNTS`
//! only carry derived snapshots. If the process dies between the ack and
//! the publish, the restart rebuilds the book from the streams (below) and
//! publishes every account right after, so the state that was not published
//! goes out then. A batch whose book update fails or panics is not acked at all
//! (retry; the book is rebuilt).
//!
//! | problem | outcome |
//! |---|---|
//! | payload does not decode | DLQ `invalid_execution` / `invalid_price` / `invalid_order` / `invalid_order_event` |
//! | a price out of the shared range ([`mtx_schemas::limits`]) or stamped more than a minute after the broker stored it | DLQ `invalid_price`; the mark is unchanged (a replay refuses it the same way: the store time is the message's) |
//! | an execution out of the shared range, or one that would take a position or a total past it | DLQ `invalid_execution`; nothing booked |
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
//! stream order, then every price still in `MARKET` (up to 1,000 per
//! symbol, not just the last one), then every order and order event still in
//! `ORDERS` / `ORDER_EVENTS`, each through the same [`Book::apply`]
//! (messages the live loop dead-letters are skipped the same way). Then the
//! durable consumers resume; anything they redeliver was already replayed
//! and is a duplicate (a late copy of an order that has finished since is
//! ignored, see [`crate::orders`]).
//!
//! Exactness: executions are applied in stream order both live and in replay
//! (first deliveries come in stream order, and no execution outcome is ever
//! retried), the ledger is idempotent on `execution_id`, marks are an
//! order-independent maximum over the valid prices ([`crate::book`]) and the
//! replay reads every retained price, refusing the same ones the live stage
//! refused (a late tick is read but does not win; a price stamped too far
//! ahead is refused again), and open orders are keyed by per-order event
//! sequence. So the rebuilt state equals the live one field for field —
//! except where a stream's limits have dropped the input: a mark older than
//! `MARKET`'s age limit (the latest fill price is used instead), or pushed
//! out by 1,000 later prices of its symbol that were all stamped earlier
//! (late ticks), and an order still working after `ORDERS`' age limit; and
//! except an order first seen live more than the finished-order retention
//! after newer orders finished (`accounts.finished_order_retention_secs` /
//! `accounts.finished_orders_max`, [`crate::orders`]), which the live book
//! does not list. Replay time grows with the number of executions (no
//! checkpoint yet).
//!
//! # Cost per message
//!
//! Decoding a message is one JSON parse; applying it touches only the
//! position, order and instrument it names (positions are found by a range
//! of the account's keys, a price finds its holders in an index, a snapshot
//! walks only the account's positions and working orders; finished orders
//! are dropped). Snapshots, encodings and KV/stream round trips are per
//! coalescing window and account, never per message.

use std::collections::{BTreeSet, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use chrono::Utc;
use futures::future::join_all;
use futures::{FutureExt, StreamExt};
use mtx_runtime::config::AccountsConfig;
use mtx_runtime::health::Beat;
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::publish::Publisher;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::order::{account_state_key, AccountState};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};
use rust_decimal::prelude::ToPrimitive;
use tokio::sync::{Mutex, Notify, OnceCell};
use tokio_util::sync::CancellationToken;

use crate::book::{Book, Input};
use crate::ledger::{LedgerConfig, LedgerError, SymbolSpec};
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
        order_retention: crate::orders::OrderRetention {
            // The config bounds the setting; beyond chrono's range (an
            // unvalidated config) the retention is the longest there is.
            retention: i64::try_from(cfg.finished_order_retention_secs)
                .ok()
                .and_then(chrono::Duration::try_seconds)
                .unwrap_or(chrono::Duration::MAX),
            max_finished: cfg.finished_orders_max,
        },
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
                    SymbolSpec {
                        instrument_type: i.instrument_type,
                        spec: InstrumentSpec {
                            multiplier: i.multiplier,
                            margin,
                        },
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
/// subject (and a price's timestamp against `stored`, the broker's store
/// time of the message: [`MarketPrice::check_time`]). Shared by the live
/// loops and [`rebuild`].
///
/// [`MarketPrice::check_time`]: mtx_schemas::market::MarketPrice::check_time
pub fn decode(
    subjects: &Subjects,
    source: Source,
    subject: &str,
    payload: &[u8],
    stored: Option<chrono::DateTime<Utc>>,
) -> Result<Input, Refusal> {
    let mut parts = subjects.strip(subject).split('.');
    let parts = [parts.next(), parts.next(), parts.next(), parts.next()];
    // The id token of the subject (account or symbol), still encoded.
    let id_token = match (source, parts) {
        (Source::Executions, [Some("executions"), Some(t), None, None]) => t,
        (Source::Market, [Some("market"), Some("prices"), Some(t), None]) => t,
        (Source::Orders, [Some("orders"), Some(t), Some("new"), None]) => t,
        (Source::OrderEvents, [Some("orders"), Some(t), Some("events"), None]) => t,
        _ => return Err(("bad_subject", format!("unexpected subject `{subject}`"))),
    };
    // Whether the token names `id`; no decoding when `id` needs no escaping
    // (the usual case: then its token is itself).
    let names = |id: &str| {
        let plain = !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if plain {
            id == id_token
        } else {
            mtx_subjects::token::decode(id_token).is_ok_and(|d| d == id)
        }
    };
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
            if !names(&x.account) {
                return Err(mismatch("execution", &x.account));
            }
            Ok(Input::Execution(x))
        }
        Source::Market => {
            let p: mtx_schemas::market::MarketPrice =
                serde_json::from_slice(payload).map_err(|e| ("invalid_price", e.to_string()))?;
            if !names(&p.symbol) {
                return Err((
                    "symbol_mismatch",
                    format!("price of {} on `{subject}`", p.symbol),
                ));
            }
            if let Err(e) = mtx_schemas::limits::check_price(p.price) {
                return Err(("invalid_price", format!("price {e}")));
            }
            p.check_time(stored).map_err(|e| ("invalid_price", e))?;
            Ok(Input::Price(p))
        }
        Source::Orders => {
            let o: mtx_schemas::order::Order =
                serde_json::from_slice(payload).map_err(|e| ("invalid_order", e.to_string()))?;
            if !names(&o.account) {
                return Err(mismatch("order", &o.account));
            }
            Ok(Input::Order(o))
        }
        Source::OrderEvents => {
            // All events of a message share order and account (checked by
            // the decoder), so the first one speaks for all.
            let events = mtx_schemas::order::decode_order_events(payload)
                .map_err(|e| ("invalid_order_event", e.to_string()))?;
            if let Some(e) = events.first().filter(|e| !names(&e.account)) {
                return Err(mismatch("order event", &e.account));
            }
            Ok(Input::OrderEvents(events))
        }
    }
}

fn refusal(e: &LedgerError) -> Refusal {
    (e.reason_code(), e.to_string())
}

/// Read every message of `stream` under `filter` (from where
/// `deliver_policy` starts) and hand each to `f`, in stream order. Reads up
/// to what the stream held when the read started.
async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    deliver_policy: consumer::DeliverPolicy,
    progress: &(dyn Fn() + Sync),
    mut f: impl FnMut(&str, &[u8], u64, Option<chrono::DateTime<Utc>>),
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
        progress();
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| format!("replay on {stream}: {e}"))?;
            got += 1;
            read += 1;
            let (pending, seq, stored) = m
                .info()
                .map(|i| {
                    let stored = chrono::DateTime::from_timestamp_nanos(
                        i64::try_from(i.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
                    );
                    (i.pending, i.stream_sequence, Some(stored))
                })
                .unwrap_or((remaining.saturating_sub(1), 0, None));
            f(m.subject.as_str(), &m.payload, seq, stored);
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
    rebuild_with_progress(js, topology, config, &|| {}).await
}

/// [`rebuild`], calling `progress` before every fetch of up to 1,000
/// messages (the stage's liveness beat: a long replay is not a hang).
pub async fn rebuild_with_progress(
    js: &jetstream::Context,
    topology: &Topology,
    config: LedgerConfig,
    progress: &(dyn Fn() + Sync),
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
            // Every retained price, not the last per subject: the live mark
            // is the greatest (timestamp, price) of all valid prices, and the
            // last message of a subject may be a late tick or a refused one.
            consumer::DeliverPolicy::All,
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
            progress,
            |subject, payload, seq, stored| {
                let applied = decode(&subjects, source, subject, payload, stored)
                    .and_then(|input| book.apply(&input).map_err(|e| refusal(&e)));
                if source == Source::Executions {
                    book.processed_execution(seq);
                }
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
    /// Bytes of JSON of the account states published
    /// (`mtx_accounts_state_bytes_total`).
    pub state_bytes: IntCounter,
    /// Messages read by start-up replays, by source.
    pub replayed: IntCounterVec,
    /// Orders held by the open-order tracker, by state (`working`, or
    /// `finished`: the bounded memory of finished ones)
    /// (`mtx_accounts_tracked_orders`).
    pub tracked_orders: IntGaugeVec,
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
            state_bytes: IntCounter::new(
                "mtx_accounts_state_bytes_total",
                "Bytes of JSON of the account states stored and published",
            )?,
            replayed: IntCounterVec::new(
                Opts::new("mtx_accounts_replays_total", "Start-up replays of the book"),
                &["result"],
            )?,
            tracked_orders: IntGaugeVec::new(
                Opts::new(
                    "mtx_accounts_tracked_orders",
                    "Orders held by the open-order tracker (working, finished)",
                ),
                &["state"],
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
        registry.register(Box::new(m.state_bytes.clone()))?;
        registry.register(Box::new(m.replayed.clone()))?;
        registry.register(Box::new(m.tracked_orders.clone()))?;
        registry.register(Box::new(m.equity.clone()))?;
        registry.register(Box::new(m.margin_utilization.clone()))?;
        Ok(m)
    }
}

struct Live {
    book: Book,
    /// Accounts whose latest state is not stored + published yet.
    dirty: BTreeSet<String>,
    /// When each account's next state may be taken: the coalescing window
    /// after the last one was taken, stretched by its size
    /// ([`spacing`]) once it is sent.
    opens: HashMap<String, Instant>,
}

/// The longest an account's next state waits because of its size.
const MAX_SPACING: Duration = Duration::from_secs(10);

/// How long after taking a state of `bytes` encoded bytes the account's next
/// state may be taken: the coalescing `window`, or longer when the state is
/// large enough that `bytes_per_sec` would be exceeded (0 = no limit), but
/// never more than [`MAX_SPACING`].
fn spacing(window: Duration, bytes: usize, bytes_per_sec: u64) -> Duration {
    if bytes_per_sec == 0 {
        return window;
    }
    let nanos = (bytes as u128 * 1_000_000_000) / u128::from(bytes_per_sec);
    let by_size = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
    window.max(by_size.min(MAX_SPACING))
}

/// What one round of the publisher did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flushed {
    /// Every state due went out; the next one falls due at this instant
    /// (`None`: nothing is pending).
    Done(Option<Instant>),
    /// Something could not be stored or published (or the book is not
    /// available); it stays pending.
    Failed,
}

/// The accounts engine shared by the stage's loops and publisher.
pub struct Accounts {
    js: jetstream::Context,
    subjects: Subjects,
    topology: Topology,
    bucket: String,
    kv: OnceCell<kv::Store>,
    config: LedgerConfig,
    live: Mutex<Option<Live>>,
    /// Held for a whole publishing round (snapshot to publish ack), so the
    /// states of one account go out one at a time and in order.
    flushing: Mutex<()>,
    /// Wakes the publisher when accounts become dirty.
    wake: Notify,
    publisher: Publisher,
    metrics: AccountsMetrics,
    interval: Duration,
    window: Duration,
    /// `accounts.publish_bytes_per_sec` (0 = no limit).
    bytes_per_sec: u64,
    retry_after: Duration,
    shutdown: CancellationToken,
    /// Liveness of the publisher, also beaten while a replay makes progress.
    beat: Beat,
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
        let cfg = &process.config.accounts;
        Ok(Accounts {
            js: process.js.clone(),
            subjects: process.subjects.clone(),
            topology: topo.clone(),
            bucket,
            kv: OnceCell::new(),
            config: ledger_config(cfg),
            live: Mutex::new(None),
            flushing: Mutex::new(()),
            wake: Notify::new(),
            publisher: Publisher::new(process.js.clone(), Some(process.metrics.clone()), STAGE),
            metrics: AccountsMetrics::new(&process.registry)?,
            interval: Duration::from_secs(cfg.publish_interval_secs.max(1)),
            window: Duration::from_millis(cfg.publish_coalesce_ms),
            bytes_per_sec: cfg.publish_bytes_per_sec,
            retry_after: Duration::from_millis(process.config.worker.publish_retry_delay_ms),
            shutdown: process.shutdown.clone(),
            beat: process.health.beat("accounts publisher"),
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

    /// (working orders, remembered finished orders) in the live book.
    pub async fn tracked_orders(&self) -> Option<(usize, usize)> {
        let guard = self.live.lock().await;
        let orders = guard.as_ref()?.book.ledger().open_orders();
        Some((orders.working_len(), orders.finished_len()))
    }

    /// Accounts whose latest state is not published yet.
    pub async fn pending(&self) -> usize {
        self.live.lock().await.as_ref().map_or(0, |l| l.dirty.len())
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
            let beat = self.beat.clone();
            let rebuilt =
                rebuild_with_progress(&self.js, &self.topology, self.config.clone(), &move || {
                    beat.beat()
                })
                .await;
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
            *guard = Some(Live {
                book,
                dirty,
                opens: HashMap::new(),
            });
            self.wake.notify_one();
        }
        guard.as_mut().ok_or_else(|| "book not built".to_string())
    }

    /// One publishing round: store and publish the state of every dirty
    /// account whose coalescing window is over (every dirty account if
    /// `force`). The book is locked only to take the snapshots; encoding and
    /// the round trips run without it. Failures stay dirty.
    async fn flush(&self, force: bool) -> Flushed {
        let _turn = self.flushing.lock().await;
        let (states, next, stamp, started) = {
            let mut guard = self.live.lock().await;
            let live = match self.ensure(&mut guard).await {
                Ok(live) => live,
                Err(e) => {
                    tracing::warn!(error = %e, "account book not available yet");
                    return Flushed::Failed;
                }
            };
            let started = Instant::now();
            let stamp = Utc::now();
            let window = self.window;
            let mut next: Option<Instant> = None;
            let mut due = Vec::new();
            let opens = &live.opens;
            live.dirty
                .retain(|account| match opens.get(account).copied() {
                    Some(at) if !force && at > started => {
                        next = Some(next.map_or(at, |n| n.min(at)));
                        true
                    }
                    _ => {
                        due.push(account.clone());
                        false
                    }
                });
            let states: Vec<AccountState> = due
                .iter()
                .map(|account| live.book.snapshot(account, stamp))
                .collect();
            for account in due {
                live.opens.insert(account, started + window);
            }
            (states, next, stamp, started)
        };
        if states.is_empty() {
            return Flushed::Done(next);
        }
        let (sent, failed) = self.send(states, stamp).await;
        let stretch = self.bytes_per_sec > 0
            && sent
                .iter()
                .any(|(_, b)| spacing(self.window, *b, self.bytes_per_sec) > self.window);
        if failed.is_empty() && !stretch {
            return Flushed::Done(next);
        }
        if let Some(live) = self.live.lock().await.as_mut() {
            for (account, bytes) in sent {
                let at = started + spacing(self.window, bytes, self.bytes_per_sec);
                let opens = live.opens.entry(account).or_insert(at);
                *opens = (*opens).max(at);
            }
            if failed.is_empty() {
                return Flushed::Done(next);
            }
            live.dirty.extend(failed);
        }
        Flushed::Failed
    }

    /// Store (KV) and publish `states`; returns the accounts sent (with the
    /// size of their encoded state) and the accounts that failed.
    async fn send(
        &self,
        states: Vec<AccountState>,
        stamp: chrono::DateTime<Utc>,
    ) -> (Vec<(String, usize)>, Vec<String>) {
        let kv = match self.kv().await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::warn!(error = %e, "account states not stored; will retry");
                return (Vec::new(), states.into_iter().map(|s| s.account).collect());
            }
        };
        let mut encoded = Vec::with_capacity(states.len());
        for state in states {
            self.observe(&state);
            match (
                serde_json::to_vec(&state),
                self.subjects.account_state(&state.account),
            ) {
                (Ok(body), Ok(subject)) => {
                    encoded.push((state.account, subject, bytes::Bytes::from(body)))
                }
                _ => {
                    tracing::error!(account = %state.account, "account state cannot be encoded; dropped")
                }
            }
        }
        // Every KV put in flight at once, then every publish at once.
        let puts = join_all(
            encoded
                .iter()
                .map(|(account, _, body)| kv.put(account_state_key(account), body.clone())),
        )
        .await;
        let mut failed = Vec::new();
        let mut outs = Vec::new();
        let mut owners = Vec::new();
        let nanos = stamp.timestamp_nanos_opt().unwrap_or_default();
        for ((account, subject, body), put) in encoded.into_iter().zip(puts) {
            if let Err(e) = put {
                self.metrics.states.with_label_values(&["error"]).inc();
                tracing::warn!(%account, error = %e, "account state not stored in KV; will retry");
                failed.push(account);
                continue;
            }
            outs.push(Outgoing::new(
                subject,
                format!("{}.{nanos}", account_state_key(&account)),
                body,
            ));
            owners.push(account);
        }
        let sizes: Vec<usize> = outs.iter().map(|o| o.payload.len()).collect();
        let results = self.publisher.publish_all(outs).await;
        let mut sent = Vec::with_capacity(owners.len());
        for ((account, r), size) in owners.into_iter().zip(results).zip(sizes) {
            match r {
                Ok(_) => {
                    self.metrics.states.with_label_values(&["ok"]).inc();
                    self.metrics.state_bytes.inc_by(size as u64);
                    sent.push((account, size));
                }
                Err(e) => {
                    self.metrics.states.with_label_values(&["error"]).inc();
                    tracing::warn!(%account, error = %e, "account state not published; will retry");
                    failed.push(account);
                }
            }
        }
        (sent, failed)
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
            Ok(Ok((outcomes, changed))) => {
                if changed {
                    if self.shutdown.is_cancelled() {
                        // The publisher may be gone: publish before the acks.
                        self.flush(true).await;
                    } else {
                        self.wake.notify_one();
                    }
                }
                return outcomes;
            }
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

    /// Apply a batch; returns its outcomes and whether an account changed.
    async fn run_batch_inner(
        &self,
        source: Source,
        msgs: &[Delivery],
    ) -> Result<(Vec<Outcome>, bool), String> {
        let mut guard = self.live.lock().await;
        let live = self.ensure(&mut guard).await?;
        tracing::debug!(source = source.label(), messages = msgs.len(), "batch");
        let mut outcomes = Vec::with_capacity(msgs.len());
        let (mut applied, mut duplicate, mut refused) = (0u64, 0u64, 0u64);
        let mut changed = false;
        for d in msgs {
            let result = decode(&self.subjects, source, &d.subject, &d.payload, d.published)
                .and_then(|input| live.book.apply(&input).map_err(|e| refusal(&e)));
            if source == Source::Executions {
                // Booked, a duplicate or refused (dead-lettered): processed.
                live.book.processed_execution(d.stream_seq);
            }
            match result {
                Ok(effect) if effect.duplicate => {
                    duplicate += 1;
                    outcomes.push(Outcome::Duplicate);
                }
                Ok(effect) => {
                    applied += 1;
                    changed |= !effect.changed.is_empty();
                    live.dirty.extend(effect.changed);
                    outcomes.push(Outcome::Ok(Vec::new()));
                }
                Err((reason, detail)) => {
                    refused += 1;
                    if source == Source::Executions {
                        tracing::error!(reason, %detail, seq = d.stream_seq, "execution refused by the ledger");
                    }
                    outcomes.push(Outcome::reject(reason, detail));
                }
            }
        }
        if matches!(source, Source::Orders | Source::OrderEvents) {
            let orders = live.book.ledger().open_orders();
            for (state, n) in [
                ("working", orders.working_len()),
                ("finished", orders.finished_len()),
            ] {
                self.metrics
                    .tracked_orders
                    .with_label_values(&[state])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        for (result, n) in [
            ("applied", applied),
            ("duplicate", duplicate),
            ("refused", refused),
        ] {
            if n > 0 {
                self.metrics
                    .inputs
                    .with_label_values(&[source.label(), result])
                    .inc_by(n);
            }
        }
        Ok((outcomes, changed))
    }

    /// Mark every account dirty (rebuilding the book first if needed).
    async fn mark_all(&self) {
        let mut guard = self.live.lock().await;
        match self.ensure(&mut guard).await {
            Ok(live) => {
                let all: Vec<String> = live.book.accounts().map(str::to_string).collect();
                live.dirty.extend(all);
            }
            Err(e) => tracing::warn!(error = %e, "account book not available yet"),
        }
    }

    /// Re-publish every account now, whatever the coalescing window (the
    /// periodic publish; also the first rebuild after start).
    pub async fn publish_all(&self) {
        self.mark_all().await;
        self.flush(true).await;
    }

    /// The publisher task: one round whenever accounts become dirty or a
    /// coalescing window ends, every account each `publish_interval_secs`
    /// (the first time right away, which also rebuilds the book), a retry
    /// `worker.publish_retry_delay_ms` after a failed round, and a last
    /// round of everything pending on shutdown.
    async fn publish_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut heartbeat = tokio::time::interval(self.interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Liveness on its own cadence: the re-publish interval may be as
        // long as the liveness timeout.
        let mut alive = tokio::time::interval(self.interval.min(Duration::from_secs(5)));
        alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next: Option<Instant> = None;
        loop {
            let until = next.map(tokio::time::Instant::from_std);
            let force = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = alive.tick() => {
                    self.beat.beat();
                    continue;
                }
                _ = heartbeat.tick() => {
                    self.mark_all().await;
                    true
                }
                // While a window is running its end brings the next round.
                _ = self.wake.notified(), if next.is_none() => false,
                _ = async {
                    match until {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => false,
            };
            next = match self.flush(force).await {
                Flushed::Done(next) => next,
                Flushed::Failed => Some(Instant::now() + self.retry_after.max(self.window)),
            };
        }
        // Batches handled from now on publish their own states.
        self.flush(true).await;
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

/// Start the stage in `process`: four loops and the publisher task (whose
/// first turn, right away, rebuilds the book and publishes every account).
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
    process.spawn(engine.clone().publish_loop(process.shutdown.clone()));
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(order: &str, account: &str, seq: u64, status: &str) -> serde_json::Value {
        json!({"order_id": order, "account": account, "status": status,
               "filled_quantity": "0", "timestamp": "2025-01-02T15:00:00Z", "seq": seq})
    }

    #[test]
    fn a_large_state_stretches_the_window_up_to_a_cap() {
        let w = Duration::from_millis(25);
        // No limit, or a small state: the coalescing window.
        assert_eq!(spacing(w, 5_000_000, 0), w);
        assert_eq!(spacing(w, 2_000, 1_000_000), w);
        // 77 KB at 1 MB/s: 77 ms.
        assert_eq!(spacing(w, 77_000, 1_000_000), Duration::from_millis(77));
        // A window longer than the size's share stays.
        assert_eq!(
            spacing(Duration::from_millis(400), 77_000, 1_000_000),
            Duration::from_millis(400)
        );
        // Never longer than the cap, even for absurd sizes.
        assert_eq!(spacing(w, 50_000_000, 10_000), MAX_SPACING);
        assert_eq!(spacing(w, usize::MAX, 10_000), MAX_SPACING);
    }

    #[test]
    fn order_event_messages_decode_as_one_event_or_a_list() {
        let subjects = Subjects::new("t1");
        let subject = subjects.orders_events("ACC").unwrap();
        let decode = |v: serde_json::Value| {
            decode(
                &subjects,
                Source::OrderEvents,
                &subject,
                &serde_json::to_vec(&v).unwrap(),
                None,
            )
        };
        let one = decode(event("o", "ACC", 4, "CANCELLED")).unwrap();
        assert!(matches!(&one, Input::OrderEvents(v) if v.len() == 1 && v[0].seq == 4));
        let list = json!([
            event("o", "ACC", 1, "SUBMITTED"),
            event("o", "ACC", 2, "ACCEPTED")
        ]);
        let Input::OrderEvents(v) = decode(list).unwrap() else {
            panic!("not events")
        };
        assert_eq!(v.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        let mixed = json!([
            event("o", "ACC", 1, "SUBMITTED"),
            event("p", "ACC", 2, "ACCEPTED")
        ]);
        assert_eq!(decode(mixed).unwrap_err().0, "invalid_order_event");
        assert_eq!(decode(json!([])).unwrap_err().0, "invalid_order_event");
        let elsewhere = json!([
            event("o", "OTHER", 1, "SUBMITTED"),
            event("o", "OTHER", 2, "ACCEPTED")
        ]);
        assert_eq!(decode(elsewhere).unwrap_err().0, "account_mismatch");
    }

    #[test]
    fn a_retention_beyond_chrono_is_the_longest_there_is() {
        // The config refuses these; an unvalidated one must still not panic.
        for secs in [i64::MAX as u64, u64::MAX] {
            let cfg = AccountsConfig {
                finished_order_retention_secs: secs,
                ..Default::default()
            };
            let c = ledger_config(&cfg);
            assert_eq!(c.order_retention.retention, chrono::Duration::MAX, "{secs}");
        }
        let c = ledger_config(&AccountsConfig::default());
        assert_eq!(c.order_retention.retention, chrono::Duration::seconds(300));
    }
}
