//! The Cerebro stage (`mtx run cerebro`): standardized signals in, decisions,
//! orders and cancels out, on the shared consume loop.
//!
//! | input | source |
//! |---|---|
//! | signals | durable `cerebro` on `SIGNALS_STANDARDIZED` |
//! | strategy configs | KV `strategies` (watched; key = `StrategyConfig::kv_key`) |
//! | ACTIVE allocation | KV `allocations`, key `active` ([`ActiveAllocation`] JSON; watched) |
//! | system config | KV `system`: key `config` = [`SystemConfig`] JSON; key `TRADING_ENABLED` (`true`/`false`) and key `kill_switch` (`true` = halted) override the kill switch (watched) |
//! | account state | KV `account_state`, key `account_state_key(account)` (watched: single-token keys only); `strategy_pnl_today` feeds `max_daily_loss` when the state is of the decision's UTC day |
//! | marks | `market.prices.<symbol>` on `MARKET`: an ordered consumer per replica starting with the last price per subject (so the latest marks are known at start; `start` waits up to `marks_initial_wait` for them), then every new price; the greatest `(timestamp, price)` per symbol is kept (order-independent, like the accounts stage). They price MARKET legs and measure the slippage rule's drift (fresh: not older than `mark_max_age_secs`) |
//! | order events | `orders.<account>.events` on `ORDER_EVENTS`: an ordered consumer per replica, starting at the oldest hold of any reservation book (at least a minute back, at most `reservation_max_age`), so an order that ended while the replica was down is known; `start` waits up to `evidence_initial_wait` for the replay, book syncs wait for it, and until it is done no hold is settled by the time rules (re-opened after a failure from the next stream sequence, so no event is skipped); terminal events release reservations and tell exits what their entry filled (below) |
//! | executions | `executions.<account>` on `EXECUTIONS`: an ordered consumer per replica from the same start (same re-opening); per order, the quantity executed and the stream sequence of its last execution, so a state whose `executions_seq` covers it proves the fill booked (below) |
//! | backtest returns | MongoDB `<mongo.trading_db>.strategy_backtest_data` ([`crate::backtests`]), loaded in the background at start and every `backtest_refresh`; unavailable = CVaR recorded as [`crate::CvarSkip::Unavailable`], never a blocked decision |
//! | instrument specs | built-in table ([`InstrumentSpecs::with_defaults`]) overridden by `[accounts.instruments]`, so Cerebro and the ledger margin alike |
//!
//! Every watched input is applied as it arrives (by revision, stale updates
//! ignored), so a change takes effect for the next signal without a restart.
//! Applying one never waits for a decision in progress. Settings:
//! [`Settings`], from the process config's `[cerebro]` section
//! ([`crate::CerebroConfig`]).
//!
//! | decision | outcome |
//! |---|---|
//! | decided | `Outcome::Ok`: the [`DecisionRecord`] on `cerebro.decisions.<env>.<strategy>` (msg id `dec_…` from the signal id), each order on `orders.<account>.new` (msg id = `order_id`), each cancel on `orders.<account>.cancel` (msg id `cxl_…` from signal and order); the loop publishes, waits for the acks, then acks the signal |
//! | deferred (EXIT / CANCEL before its ENTRY filled or was booked) | `Outcome::Retry`: the message is NAKed with a delay and the worker goes on with other signals. The first `defer_fast_retries` (4) deferrals wait `defer_retry` (250 ms), the next ones `defer_backoff` (4 s) doubling per delivery up to `defer_max` (30 s) |
//! | deferred for too long | once the signal is older than `entry_wait` or on the delivery before `max_deliver`, it is decided with `entry_wait_expired` (close against the position / cancel the working orders) |
//! | undecodable signal | DLQ `invalid_signal` |
//! | KV unavailable, CAS contention | `Outcome::Retry` |
//!
//! Metrics (process registry): `mtx_decisions_total{outcome, reason}`
//! (`outcome` = `approved` / `resized` / `rejected`, `reason` = the typed
//! reason's code, `none` without one) per decision made (a redelivered
//! signal decided again counts again), and `mtx_trading_enabled` (1 / 0)
//! following the kill switch.
//!
//! # Batches
//!
//! The loop hands the worker whole batches (up to two at once). A batch is
//! decided in two rounds. First every signal without an entry link
//! (entries, unlinked exits) is grouped by account, and each account's group
//! is one **group commit** (below), the accounts side by side. Then the
//! linked exits and cancels read their entry and exit-progress records, all
//! of the batch's in one batched direct get ([`multiget`]; so an entry of
//! the same batch is found), and are decided per account under
//! the account's lock, in arrival order, against one reconciliation of the
//! book; their exit-progress compare-and-sets go out together (one per
//! entry at a time). Each signal still gets its own outcome.
//!
//! # Margin reservations across replicas
//!
//! Several replicas share the durable consumer, so two of them may decide
//! entries for the same account at the same moment. Margin approved but not
//! yet booked by the accounts stage (orders in flight) lives in one
//! **reservation book per account**: key `reservations.<account_key>` in the
//! `account_state` bucket (account state keys never contain a `.`, so the
//! two never collide; the accounts stage `put`s only its own keys). The book
//! maps signal id → the held legs (order id, quantity, margin, notional,
//! and the position each adds to: instrument and direction). What a leg
//! still holds follows the reconciliation below; the units it will still add
//! to its position count as held for TARGET_WEIGHT and the position-size
//! limit ([`AccountInputs::pending`]).
//!
//! Each replica keeps its copy of every book it uses in memory, with the KV
//! revision the copy was read at or last written as. A group commit:
//!
//! 1. takes the account's async mutex (one transaction per account at a
//!    time within a replica); reads and parses the book from KV only if the
//!    copy is missing or was invalidated;
//! 2. reconciles the copy with the latest account state and order ends
//!    (below) and sums what it holds per strategy once;
//! 3. decides the signals in arrival order with [`decide_with`], each
//!    against those totals ([`AccountInputs::reserved`], its own earlier
//!    entry excluded) plus the reservations of the signals before it;
//! 4. if any signal reserves margin, writes the book with
//!    `kv.update(key, book, revision)` (`kv.create` for a new book). A
//!    `WrongLastRevision` / `AlreadyExists` means another replica wrote the
//!    book since this copy was read: the copy is dropped, the book re-read
//!    and the whole group decided again on it. Any other write error drops
//!    the copy too (the write may or may not have happened);
//! 5. releases the mutex and hands each signal's outputs back, an approved
//!    entry's record (below) first among them: the consume loop publishes
//!    record, decision and orders in one pipelined round trip and acks the
//!    signal only when all are stored; if one is not, the signal is
//!    redelivered (its reservation stays: the redelivery finds it, does not
//!    add it again, and publishes the same outputs). Records an exit or
//!    cancel of the same batch reads are stored before that exit is decided.
//!
//! So every approval was checked against a book holding every earlier
//! approval, of every replica: the sum of approved margin never exceeds what
//! the account has. A group that reserves nothing (rejections, unlinked
//! exits) writes nothing: it was decided against the copy, whose
//! reservations can only be missing other replicas' *later* approvals (which
//! could only have made a rejection more certain) or include ones another
//! replica already released on evidence this replica gets moments later.
//! Reconciliation results (releases, legs seen working) ride along with the
//! next write; an account with no writes for `SYNC_QUIET` (500 ms) whose
//! copy has unwritten releases gets them written by a background sync that
//! every account state update schedules (coalesced, never holding up the
//! watcher), so idle books drain in KV too.
//!
//! Idempotent per signal id: the book is keyed by signal id, a redelivered
//! signal decides against the book *without* its own entry and then replaces
//! it — never adding twice. A redelivery never shrinks or drops an existing
//! entry (its orders may already be out); a larger new size replaces it.
//!
//! Release / reconciliation against the accounts stage's state (done in
//! every transaction and in the background sync):
//!
//! - a held leg whose order is in `open_orders` holds
//!   `margin × remaining / quantity` (the filled part is in `margin_used`)
//!   and is marked *seen*;
//! - an order whose terminal event says it ended **unfilled** (rejected,
//!   cancelled, expired with nothing filled) is *settled* at once: nothing
//!   will be booked;
//! - an order not in `open_orders` is *settled* (filled and booked, or
//!   ended) when it was seen working before, or — exact — when its terminal
//!   event is known, the replica's `EXECUTIONS` feed has seen executions for
//!   all of its filled quantity and the state's `executions_seq` is at or
//!   past the last of them (the state's `margin_used` holds the fill), or —
//!   time evidence, for states without `executions_seq` or fills this
//!   replica did not see — when its terminal event is known and the state
//!   is at least `booking_grace` (1 s) newer than that event, or — no event
//!   seen, e.g. it ended before this replica started —
//!   when the state is at least `unbooked_grace` (30 s) newer than the
//!   reservation (its `publish_interval_secs` heartbeat keeps states
//!   coming);
//! - **safety prune**: an entry older than `reservation_max_age` (1 day) is
//!   dropped whatever the state says — an order still resting after that
//!   no longer holds margin in Cerebro's checks (it shows in `margin_used`
//!   once it fills), and a silent accounts stage cannot pin margin forever.
//!
//! An entry is released when all its legs are settled. The book is bounded:
//! an entry that would make it hold more than `reservation_max_entries`
//! (4,000) unbooked entries, or exceed [`MAX_BOOK_BYTES`], is rejected with
//! [`crate::Reason::ReservationBacklog`] (limit and actual count) — the
//! accounts stage is not confirming fills, so margin cannot be checked.
//! Each single-leg entry is about 210 bytes of JSON. A filled order is
//! released by the first account state that books its last execution
//! (typically one `accounts.publish_coalesce_ms` window after the fill,
//! longer for a large state: `accounts.publish_bytes_per_sec`), so
//! the book holds only orders in flight and fills not yet booked, and a fill
//! is never counted both in the book and in `margin_used` for longer than
//! the state takes to arrive. Known limit: the book is written whole on
//! every approval, so its cost grows with the orders in flight.
//!
//! # Entries and exits across replicas
//!
//! An exit may reach a different replica than its entry, so entry records are
//! in KV too: `entries.<signal_id>` (the approved legs and the book revision
//! that holds their reservation, published with the decision; the entry's
//! signal is acked only once it is stored, and an exit or cancel that comes
//! first defers until it is)
//! and `exits.<entry_signal_id>` (quantities closed by each exit signal,
//! compare-and-set, keyed by exit signal id so a redelivered exit is not
//! counted twice). A linked exit re-reads the book when its copy is older
//! than the entry's reservation, so an entry missing from the copy has been
//! released. An entry leg's fill progress: its terminal order event (the
//! quantity the venue filled, as soon as the event arrives); else in
//! `open_orders` → working with `quantity − remaining` filled; else settled
//! (see above) → filled; else still pending (the exit is deferred). The
//! order end is remembered only for a while, so when the book drops an
//! entry one of whose legs ended filling less than it ordered, that end is
//! written into the entry record first (before the book write that drops
//! it): an exit weeks later still closes only what the leg filled. A fill
//! the account state does not show as a position yet defers the exit too
//! ([`crate::DeferReason::PositionNotBooked`]): exits never close more than
//! the account holds.
//!
//! An exit's closing orders are held in the book too (reserving nothing,
//! under the exit's signal id, naming the entry: [`Held::exit_of`]), written
//! before they go out. When one ends short — rejected, cancelled or expired
//! with less filled than ordered — what it filled is noted in the entry's
//! exit progress ([`ExitTake::filled`]) before the book drops the hold, so a
//! later exit of the entry (the sender retrying) still closes what is really
//! open. Each order leaves the hold (noted when short) as soon as its end
//! is known — never by the time rules, since a state can show an order gone
//! before its end event arrives; a terminal event has the account's book
//! reconciled while the end is remembered, even if no state follows. An
//! order without a known end stays while it works, else at most
//! `reservation_max_age`. A redelivered exit keeps what was noted and holds
//! no order whose end is known. The janitor does not settle an entry while
//! one of its exits is held.
//!
//! These keys do not live forever: every `janitor_interval` each replica
//! deletes those of finished entries after `entry_done_retention` and all
//! of them after `entry_max_age` ([`crate::janitor`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use mtx_accounts::book::Input as AccountsInput;
use mtx_accounts::worker::{decode as decode_accounts_input, Source as AccountsSource};
use mtx_runtime::multiget;
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::ids::derive_id;
use mtx_schemas::order::{account_state_key, position_direction, AccountState};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::{Decision, Direction, OrderStatus, SignalAction};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backtests::{BacktestReader, BacktestSource, BacktestState};
use crate::config::CerebroConfig;
use crate::decide::{decide_with, Decided, DecisionOutput};
use crate::feeds::{run_feed, scan_kv, Feed, Scanned};
use crate::inputs::{
    AccountInputs, ActiveAllocation, DecideOptions, EntryLeg, EntryRecord, InstrumentConfig,
    InstrumentSpecs, MarginRule, Mark, PendingUnits, Reservation, StrategyConfig, SystemConfig,
};
use crate::janitor::{entry_disposition, settle, Disposition, Retention};
use crate::Inputs;

/// Stage name (metrics, `dlq.cerebro`).
pub const STAGE: &str = "cerebro";
/// Durable consumer on `SIGNALS_STANDARDIZED`.
pub const DURABLE: &str = "cerebro";
/// Key of the ACTIVE allocation in the `allocations` bucket.
pub const ALLOCATION_KEY: &str = "active";
/// Key of the [`SystemConfig`] JSON in the `system` bucket.
pub const SYSTEM_CONFIG_KEY: &str = "config";

/// Key of an account's reservation book in the `account_state` bucket.
pub fn reservations_key(account: &str) -> String {
    format!("reservations.{}", account_state_key(account))
}

/// Key of an entry record in the `account_state` bucket.
pub fn entry_key(signal_id: &str) -> String {
    format!("entries.{}", StrategyConfig::kv_key(signal_id))
}

/// Key of an entry's exit progress in the `account_state` bucket.
pub fn exits_key(entry_signal_id: &str) -> String {
    format!("exits.{}", StrategyConfig::kv_key(entry_signal_id))
}

/// The subject a KV `put` of `key` in `store` publishes to (what
/// `kv::Store::put` builds), or `None` when the store uses a JetStream API
/// prefix, which the client keeps to itself.
fn kv_put_subject(store: &kv::Store, key: &str) -> Option<String> {
    if store.use_jetstream_prefix {
        return None;
    }
    let prefix = store.put_prefix.as_deref().unwrap_or(&store.prefix);
    Some(format!("{prefix}{key}"))
}

/// An entry record as a consume-loop output: a KV put on the bucket's
/// subject, stored only if the key holds nothing yet. The first decision of
/// a signal is the one whose orders the venue has (a redelivery's orders
/// carry the same ids and are dropped), so a redelivery decided afresh
/// against a state that meanwhile booked the entry's own fill must not
/// replace the record exits resolve against. (A stored REJECTED record is
/// the exception: an approved redelivery replaces it, see
/// [`Cerebro::group_commit`].)
fn entry_record_output(subject: String, key: &str, body: Vec<u8>) -> Outgoing {
    let id = derive_id("rec", &[key, &String::from_utf8_lossy(&body)]);
    Outgoing::new(subject, id, body).only_if_new_subject()
}

/// Message id of a decision.
pub fn decision_msg_id(signal_id: &str) -> String {
    derive_id("dec", &[signal_id])
}

/// Message id of a cancel command.
pub fn cancel_msg_id(signal_id: &str, order_id: &str) -> String {
    derive_id("cxl", &[signal_id, order_id])
}

/// Largest serialized reservation book written (the KV value limit is the
/// server's 1 MiB `max_payload`); a bigger one rejects the entry with
/// [`crate::Reason::ReservationBacklog`].
pub const MAX_BOOK_BYTES: usize = 900 * 1024;

/// A book whose copy has unwritten reconciliation results is written by the
/// background sync once it has not been written for this long (busy books
/// get them written with their next approval).
pub const SYNC_QUIET: Duration = Duration::from_millis(500);

/// Failed background syncs of one book (KV unreachable) retried before
/// the next state or order event has to schedule another.
const SYNC_ERROR_RETRIES: u32 = 10;
/// Delay between those retries.
const SYNC_ERROR_DELAY: Duration = Duration::from_secs(1);

/// Worker knobs (defaults in the crate; instrument specs from config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Instrument specifications.
    pub instruments: InstrumentSpecs,
    /// A reserved order never seen working and without a known end is
    /// settled once a state this much newer than the reservation omits it.
    pub unbooked_grace: chrono::Duration,
    /// A filled order (terminal order event) is settled once a state this
    /// much newer than its end omits it.
    pub booking_grace: chrono::Duration,
    /// Safety prune: a reservation older than this is dropped.
    pub reservation_max_age: chrono::Duration,
    /// Most approved-but-unbooked entries per account.
    pub reservation_max_entries: usize,
    /// How long an EXIT / CANCEL waits for its entry before it is decided
    /// with `entry_wait_expired`.
    pub entry_wait: chrono::Duration,
    /// `entries.*` / `exits.*` retention (see [`crate::janitor`]).
    pub entry_retention: Retention,
    /// Janitor period.
    pub janitor_interval: Duration,
    /// Redelivery delay of the first `defer_fast_retries` deferrals.
    pub defer_retry: Duration,
    /// Deferrals redelivered after `defer_retry`.
    pub defer_fast_retries: u32,
    /// Delay of the first deferral after the fast ones (doubles per delivery).
    pub defer_backoff: Duration,
    /// Largest redelivery delay of a deferred signal.
    pub defer_max: Duration,
    /// The consumer's `max_deliver` (a deferred signal is decided with
    /// `entry_wait_expired` on the delivery before the last).
    pub max_deliver: i64,
    /// Compare-and-set attempts per transaction before its signals are
    /// retried later.
    pub cas_attempts: u32,
    /// Backtest returns for CVaR (`None`: CVaR is recorded as unavailable).
    pub backtests: Option<BacktestSource>,
    /// Backtest reload period.
    pub backtest_refresh: Duration,
    /// Backtest retry period while nothing is loaded.
    pub backtest_retry: Duration,
    /// Read marks from `market.prices.>`.
    pub marks: bool,
    /// Start-up wait for the latest marks.
    pub marks_initial_wait: Duration,
    /// Start-up wait for the order events and executions replayed since the
    /// oldest hold (decisions and book syncs wait for them).
    pub evidence_initial_wait: Duration,
    /// Read order events from `orders.*.events` (fills and ends release
    /// reservations sooner and resolve exits).
    pub order_events: bool,
}

impl Default for Settings {
    fn default() -> Self {
        let mut s = Settings {
            instruments: InstrumentSpecs::with_defaults(),
            unbooked_grace: chrono::Duration::zero(),
            booking_grace: chrono::Duration::zero(),
            reservation_max_age: chrono::Duration::zero(),
            reservation_max_entries: 0,
            entry_wait: chrono::Duration::zero(),
            entry_retention: Retention {
                done: chrono::Duration::zero(),
                max_age: chrono::Duration::zero(),
            },
            janitor_interval: Duration::ZERO,
            defer_retry: Duration::ZERO,
            defer_fast_retries: 0,
            defer_backoff: Duration::ZERO,
            defer_max: Duration::ZERO,
            max_deliver: 10,
            cas_attempts: 200,
            backtests: None,
            backtest_refresh: Duration::ZERO,
            backtest_retry: Duration::ZERO,
            marks: true,
            marks_initial_wait: Duration::ZERO,
            evidence_initial_wait: Duration::ZERO,
            order_events: true,
        };
        s.apply(&CerebroConfig::default());
        s
    }
}

fn secs(v: u64) -> chrono::Duration {
    i64::try_from(v)
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .unwrap_or(chrono::Duration::MAX)
}

impl Settings {
    /// Apply the `[cerebro]` section.
    pub fn apply(&mut self, c: &CerebroConfig) {
        self.unbooked_grace = secs(c.unbooked_grace_secs);
        self.booking_grace = secs(c.booking_grace_secs);
        self.reservation_max_age = secs(c.reservation_max_age_secs);
        self.reservation_max_entries = c.reservation_max_entries;
        self.entry_wait = secs(c.entry_wait_secs);
        self.entry_retention = Retention {
            done: secs(c.entry_done_retention_secs),
            max_age: secs(c.entry_max_age_secs),
        };
        self.janitor_interval = Duration::from_secs(c.janitor_interval_secs.max(1));
        self.backtest_refresh = Duration::from_secs(c.backtest_refresh_secs.max(1));
        self.backtest_retry = Duration::from_secs(c.backtest_retry_secs.max(1));
        self.marks_initial_wait = Duration::from_millis(c.marks_initial_wait_ms);
        self.evidence_initial_wait = Duration::from_millis(c.evidence_initial_wait_ms);
        self.defer_retry = Duration::from_millis(c.defer_retry_ms.max(1));
        self.defer_fast_retries = c.defer_fast_retries;
        self.defer_backoff = Duration::from_millis(c.defer_backoff_ms.max(1));
        self.defer_max = Duration::from_millis(c.defer_max_ms.max(1));
        if let Some(b) = &mut self.backtests {
            b.timeout = Duration::from_millis(c.mongo_timeout_ms.max(1));
        }
    }

    /// Defaults plus the process config: `[cerebro]`, `[accounts.instruments]`
    /// (override the built-in symbol table's multiplier and margin),
    /// `max_deliver` from the topology, backtests from `mongo.uri` /
    /// `mongo.trading_db`.
    pub fn from_config(config: &mtx_runtime::Config) -> Settings {
        Self::from_configs(config, &config.cerebro)
    }

    /// [`Settings::from_config`] with another `[cerebro]` section.
    pub fn from_configs(config: &mtx_runtime::Config, cerebro: &CerebroConfig) -> Settings {
        let mut s = Settings {
            backtests: Some(BacktestSource {
                uri: config.mongo.uri.clone(),
                database: config.mongo.trading_db.clone(),
                timeout: Duration::from_millis(3_000),
                load_timeout: Duration::from_secs(60),
            }),
            ..Settings::default()
        };
        s.apply(cerebro);
        for (symbol, i) in &config.accounts.instruments {
            let margin = match (i.margin_per_contract, i.margin_fraction) {
                (Some(a), _) => Some(MarginRule::PerContract(a)),
                (None, Some(f)) => Some(MarginRule::PercentOfNotional(f)),
                (None, None) => None,
            };
            let lot = s
                .instruments
                .symbols
                .get(symbol)
                .map(|c| c.lot_size)
                .unwrap_or(Decimal::ONE);
            s.instruments.symbols.insert(
                symbol.clone(),
                InstrumentConfig {
                    multiplier: i.multiplier,
                    lot_size: lot,
                    margin,
                    instrument_type: i.instrument_type,
                },
            );
        }
        s.max_deliver = config.topology.max_deliver;
        s
    }

    /// Redelivery delay of a signal deferred on its `delivery`-th delivery
    /// (1-based): `defer_retry` for the first `defer_fast_retries`, then
    /// `defer_backoff` doubling per delivery, never above `defer_max`.
    pub fn defer_delay(&self, delivery: u64) -> Duration {
        let n = delivery.max(1);
        let fast = u64::from(self.defer_fast_retries);
        if n <= fast {
            return self.defer_retry.min(self.defer_max);
        }
        let doublings = u32::try_from(n - fast - 1).unwrap_or(u32::MAX).min(20);
        self.defer_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.defer_max)
    }
}

// ----- metrics ------------------------------------------------------------------

/// Metrics of the stage (on the process registry; names fixed by the ops
/// contract in deploy/prometheus/METRICS.md).
#[derive(Clone)]
pub struct CerebroMetrics {
    /// Decisions made, by `outcome` (`approved`, `resized`, `rejected`)
    /// and `reason` (the typed reason's code; `none` without one).
    pub decisions: IntCounterVec,
    /// 1 while the kill switch allows trading, 0 when halted.
    pub trading_enabled: IntGauge,
    /// Strategies in the loaded backtest table; 0 while none is loaded
    /// (the CVaR limit is then not evaluated).
    pub backtest_strategies: IntGauge,
}

impl CerebroMetrics {
    /// Create and register. `mtx_trading_enabled` may already be registered
    /// by another stage of the same process; that one is then exported.
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = CerebroMetrics {
            decisions: IntCounterVec::new(
                Opts::new(
                    "mtx_decisions_total",
                    "Cerebro decisions, by outcome and reason",
                ),
                &["outcome", "reason"],
            )?,
            trading_enabled: IntGauge::new(
                "mtx_trading_enabled",
                "1 when the kill switch allows trading, 0 when halted",
            )?,
            backtest_strategies: IntGauge::new(
                "mtx_cerebro_backtest_strategies",
                "Strategies in Cerebro's loaded backtest table (0: none loaded, CVaR not evaluated)",
            )?,
        };
        registry.register(Box::new(m.decisions.clone()))?;
        registry.register(Box::new(m.backtest_strategies.clone()))?;
        match registry.register(Box::new(m.trading_enabled.clone())) {
            Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
            Err(e) => return Err(e),
        }
        Ok(m)
    }

    fn decided(&self, d: &Decided) {
        let outcome = match d.record.decision {
            Decision::Approved => "approved",
            Decision::Modified => "resized",
            Decision::Rejected => "rejected",
        };
        let reason = d.record.reason_detail.as_ref().map_or("none", |r| r.code());
        self.decisions.with_label_values(&[outcome, reason]).inc();
    }
}

// ----- reservation book (pure) -------------------------------------------

fn is_false(b: &bool) -> bool {
    !*b
}

/// One held order leg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLeg {
    /// Order id.
    pub order_id: String,
    /// Ordered quantity.
    pub quantity: Decimal,
    /// Margin of the whole order.
    pub margin: Decimal,
    /// Notional of the whole order.
    pub notional: Decimal,
    /// Seen working in the account state.
    #[serde(default, skip_serializing_if = "is_false")]
    pub seen: bool,
    /// Symbol and direction of the position the order adds to (absent in
    /// books written by older builds: such a leg counts toward no
    /// position's pending units).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<(String, Direction)>,
}

impl HeldLeg {
    /// Units this leg will still add to its position once booked: what it
    /// will fill (all of it while working or unseen, what filled once it
    /// ended) less what the state already books of it (exact evidence: its
    /// executions the state's `executions_seq` covers; without, the
    /// remaining quantity while working), nothing once settled.
    fn pending(
        &self,
        created_at: DateTime<Utc>,
        ev: &Evidence<'_>,
        rules: &SettleRules,
    ) -> Decimal {
        let booked = ev.booked_quantity(&self.order_id);
        let to_fill = match progress(self, created_at, ev, rules) {
            LegProgress::Working(rem) => match booked {
                Some(_) => self.quantity,
                None => return rem,
            },
            LegProgress::Unbooked => ev
                .ended
                .get(&self.order_id)
                .map_or(self.quantity, |e| e.filled.min(self.quantity)),
            LegProgress::Settled => return Decimal::ZERO,
        };
        to_fill
            .checked_sub(booked.unwrap_or_default())
            .unwrap_or_default()
            .max(Decimal::ZERO)
    }
}

/// The reservation of one approved entry, or the closing orders of one
/// linked exit (`exit_of`) held until their ends are known.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Strategy.
    pub strategy_id: String,
    /// When it was reserved.
    pub created_at: DateTime<Utc>,
    /// Its legs.
    pub legs: Vec<HeldLeg>,
    /// The entry this exit closes: its closing orders reserve nothing and
    /// are held only so that one ending short (rejected, cancelled, expired
    /// part-filled) is noted in the entry's exit progress before its end is
    /// forgotten — a later exit of the entry then closes what is really
    /// still open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_of: Option<String>,
}

impl Held {
    fn margin(&self) -> Decimal {
        self.legs.iter().map(|l| l.margin).sum()
    }

    /// Margin and notional this entry still holds.
    fn reservation(&self, ev: &Evidence<'_>, rules: &SettleRules) -> Reservation {
        let mut r = Reservation::default();
        for l in &self.legs {
            let frac = match progress(l, self.created_at, ev, rules) {
                LegProgress::Working(rem) if l.quantity > Decimal::ZERO => {
                    rem.checked_div(l.quantity).unwrap_or(Decimal::ONE)
                }
                LegProgress::Working(_) | LegProgress::Unbooked => Decimal::ONE,
                LegProgress::Settled => Decimal::ZERO,
            };
            // Overflow (implausible figures) reserves everything: the
            // limits then reject rather than over-approve.
            r.margin = l
                .margin
                .checked_mul(frac)
                .and_then(|m| r.margin.checked_add(m))
                .unwrap_or(Decimal::MAX);
            r.notional = l
                .notional
                .checked_mul(frac)
                .and_then(|n| r.notional.checked_add(n))
                .unwrap_or(Decimal::MAX);
        }
        r
    }

    /// Units its legs will still add, per position (a new entry: all).
    fn pending_units(&self, ev: Option<(&Evidence<'_>, &SettleRules)>) -> Vec<PendingUnits> {
        let mut out: Vec<PendingUnits> = Vec::new();
        for l in &self.legs {
            let Some((instrument, direction)) = &l.position else {
                continue;
            };
            let q = match ev {
                Some((ev, rules)) => l.pending(self.created_at, ev, rules),
                None => l.quantity,
            };
            if q <= Decimal::ZERO {
                continue;
            }
            match out
                .iter_mut()
                .find(|p| p.instrument == *instrument && p.direction == *direction)
            {
                Some(p) => p.quantity = p.quantity.checked_add(q).unwrap_or(Decimal::MAX),
                None => out.push(PendingUnits {
                    strategy_id: self.strategy_id.clone(),
                    instrument: instrument.clone(),
                    direction: *direction,
                    quantity: q,
                }),
            }
        }
        out
    }

    /// Everything it holds while none of its orders is known (a new entry).
    fn full_reservation(&self) -> Reservation {
        let mut r = Reservation::default();
        for l in &self.legs {
            add_to(
                &mut r,
                &Reservation {
                    margin: l.margin,
                    notional: l.notional,
                },
            );
        }
        r
    }
}

/// `total += x`; an overflow saturates (the limits then reject).
fn add_to(total: &mut Reservation, x: &Reservation) {
    total.margin = total.margin.checked_add(x.margin).unwrap_or(Decimal::MAX);
    total.notional = total
        .notional
        .checked_add(x.notional)
        .unwrap_or(Decimal::MAX);
}

/// `total -= x`, never below zero; a saturated total stays saturated.
fn sub_from(total: &mut Reservation, x: &Reservation) {
    let sub = |t: Decimal, v: Decimal| {
        if t == Decimal::MAX {
            t
        } else {
            t.checked_sub(v).unwrap_or(Decimal::ZERO).max(Decimal::ZERO)
        }
    };
    total.margin = sub(total.margin, x.margin);
    total.notional = sub(total.notional, x.notional);
}

/// One account's reservation book.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationBook {
    /// Held reservations by signal id.
    pub held: BTreeMap<String, Held>,
}

/// An entry (or a linked exit) dropped from the book whose legs (some of
/// them) ended filling less than they ordered: (order id, its end) of each
/// such leg.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShortEnd {
    /// The entry's (or the exit's) signal id.
    pub signal_id: String,
    /// For an exit: the entry it closes (its exit progress is noted).
    pub exit_of: Option<String>,
    /// Its short legs.
    pub legs: Vec<(String, EndedOrder)>,
}

/// An order's end as told by its terminal order event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndedOrder {
    /// Quantity filled in all.
    pub filled: Decimal,
    /// When it ended (the event's timestamp).
    pub at: DateTime<Utc>,
    /// The terminal status.
    pub status: OrderStatus,
    /// When this replica learned it: forgetting counts from here, so an
    /// end replayed at start is kept as long as a fresh one.
    pub learned: DateTime<Utc>,
}

/// What Cerebro's `EXECUTIONS` feed saw of one order's fills.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillProgress {
    /// Quantity of every execution seen.
    pub quantity: Decimal,
    /// Stream sequence of the last one.
    pub last_seq: u64,
    /// When this replica last learned of one (old entries are forgotten
    /// like order ends, counting from here).
    pub at: DateTime<Utc>,
    /// (stream sequence, quantity) of each execution (a few per order): how
    /// much of the order a state's `executions_seq` covers.
    pub executions: Vec<(u64, Decimal)>,
}

/// When held legs count as settled (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleRules {
    /// Fallback: absent from a state this much newer than the reservation.
    pub unbooked_grace: chrono::Duration,
    /// Filled: absent from a state this much newer than the fill.
    pub booking_grace: chrono::Duration,
    /// Safety prune.
    pub max_age: chrono::Duration,
}

impl SettleRules {
    /// The rules of `settings`.
    pub fn of(settings: &Settings) -> Self {
        SettleRules {
            unbooked_grace: settings.unbooked_grace,
            booking_grace: settings.booking_grace,
            max_age: settings.reservation_max_age,
        }
    }
}

/// What the worker knows when it reconciles a book.
#[derive(Debug, Clone)]
pub struct Evidence<'a> {
    /// The account's latest state.
    pub state: Option<&'a AccountState>,
    /// Orders known to have ended, by order id.
    pub ended: &'a HashMap<String, EndedOrder>,
    /// Now.
    pub now: DateTime<Utc>,
    /// Fills seen on `EXECUTIONS`, by order id (none: time rules only).
    pub fills: Option<&'a HashMap<String, FillProgress>>,
    /// The order events and executions since the oldest hold are still
    /// being replayed (start-up): an end or fill may just not be known yet,
    /// so no time rule settles anything.
    pub replaying: bool,
    /// The state's working orders: order id → remaining quantity.
    working: HashMap<&'a str, Decimal>,
}

impl<'a> Evidence<'a> {
    /// Evidence from `state` (its working orders indexed once) and `ended`.
    pub fn new(
        state: Option<&'a AccountState>,
        ended: &'a HashMap<String, EndedOrder>,
        now: DateTime<Utc>,
    ) -> Self {
        let mut working = HashMap::new();
        for o in state.map(|s| s.open_orders.as_slice()).unwrap_or_default() {
            working.entry(o.order_id.as_str()).or_insert(o.quantity);
        }
        Evidence {
            state,
            ended,
            now,
            fills: None,
            replaying: false,
            working,
        }
    }

    /// Whether the evidence feeds are still replaying (see the field).
    pub fn replaying(mut self, replaying: bool) -> Self {
        self.replaying = replaying;
        self
    }

    /// With the fills seen on `EXECUTIONS`: a filled order is then settled
    /// as soon as a state's `executions_seq` covers its last execution.
    pub fn with_fills(mut self, fills: &'a HashMap<String, FillProgress>) -> Self {
        self.fills = Some(fills);
        self
    }

    /// With exact evidence, the quantity of `order_id` the state books (its
    /// executions at or below the state's `executions_seq`); `None` without.
    fn booked_quantity(&self, order_id: &str) -> Option<Decimal> {
        let (Some(fills), Some(seq)) = (self.fills, self.state.and_then(|s| s.executions_seq))
        else {
            return None;
        };
        Some(fills.get(order_id).map_or(Decimal::ZERO, |f| {
            f.executions
                .iter()
                .filter(|(s, _)| *s <= seq)
                .map(|(_, q)| *q)
                .sum()
        }))
    }

    /// The state provably books all of `order_id`'s `filled` quantity: the
    /// feed saw executions for all of it, and the state's `executions_seq`
    /// is at or past the last one.
    fn booked(&self, order_id: &str, filled: Decimal) -> bool {
        let (Some(fills), Some(seq)) = (self.fills, self.state.and_then(|s| s.executions_seq))
        else {
            return false;
        };
        fills
            .get(order_id)
            .is_some_and(|f| f.quantity >= filled && seq >= f.last_seq)
    }

    /// The executions feed saw an execution of `order_id` past the state's
    /// `executions_seq` (false without exact evidence).
    fn executions_ahead(&self, order_id: &str) -> bool {
        let (Some(fills), Some(seq)) = (self.fills, self.state.and_then(|s| s.executions_seq))
        else {
            return false;
        };
        fills.get(order_id).is_some_and(|f| f.last_seq > seq)
    }

    /// Remaining quantity of `order_id` if the state lists it working.
    pub fn working(&self, order_id: &str) -> Option<Decimal> {
        self.working.get(order_id).copied()
    }
}

/// How a held order stands against an account state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LegProgress {
    /// Working with this remaining quantity.
    Working(Decimal),
    /// Not in `open_orders`, not settled yet (not ingested, or just ended).
    Unbooked,
    /// Filled and booked, or ended.
    Settled,
}

/// `t + d`, `None` past the end of time.
fn after(t: DateTime<Utc>, d: chrono::Duration) -> Option<DateTime<Utc>> {
    t.checked_add_signed(d)
}

/// `at` is at least `d` after `t`.
fn at_least(at: DateTime<Utc>, t: DateTime<Utc>, d: chrono::Duration) -> bool {
    after(t, d).is_some_and(|x| at >= x)
}

fn progress(
    leg: &HeldLeg,
    created_at: DateTime<Utc>,
    ev: &Evidence<'_>,
    rules: &SettleRules,
) -> LegProgress {
    let ended = ev.ended.get(&leg.order_id);
    // Ended without a fill: nothing will ever be booked.
    if ended.is_some_and(|e| e.filled <= Decimal::ZERO) {
        return LegProgress::Settled;
    }
    let Some(state) = ev.state else {
        return LegProgress::Unbooked;
    };
    // With exact evidence (the executions feed, and a state that says how
    // far into `EXECUTIONS` it has booked), only booked fills release: the
    // accounts stage applies order events and executions on separate
    // consumers, so a state may show an order filled (gone from, or
    // shrunk in, `open_orders`) before it books the fill.
    let exact = ev.fills.is_some() && state.executions_seq.is_some();
    if let Some(remaining) = ev.working(&leg.order_id) {
        let rem = remaining.max(Decimal::ZERO).min(leg.quantity);
        if exact && rem < leg.quantity && !ev.booked(&leg.order_id, leg.quantity - rem) {
            return LegProgress::Working(leg.quantity);
        }
        return LegProgress::Working(rem);
    }
    // The feed saw executions of the order that the state's
    // `executions_seq` does not cover yet: provably not booked, so no time
    // rule may settle it (the accounts stage's executions consumer can lag
    // its order-events one).
    let unbooked = exact && ev.executions_ahead(&leg.order_id);
    let booked = (leg.seen && !exact)
        || ended.is_some_and(|e| ev.booked(&leg.order_id, e.filled))
        || (!unbooked
            && !ev.replaying
            && (ended.is_some_and(|e| at_least(state.timestamp, e.at, rules.booking_grace))
                || at_least(state.timestamp, created_at, rules.unbooked_grace)));
    if booked {
        LegProgress::Settled
    } else {
        LegProgress::Unbooked
    }
}

/// Note in `short` the legs of `h` (dropped from the book) whose known end
/// filled less than they ordered.
fn note_short(sid: &str, h: &Held, ev: &Evidence<'_>, short: &mut Vec<ShortEnd>) {
    let legs: Vec<(String, EndedOrder)> = h
        .legs
        .iter()
        .filter_map(|l| {
            let e = ev.ended.get(&l.order_id)?;
            (e.filled < l.quantity).then(|| (l.order_id.clone(), *e))
        })
        .collect();
    if !legs.is_empty() {
        short.push(ShortEnd {
            signal_id: sid.to_string(),
            exit_of: h.exit_of.clone(),
            legs,
        });
    }
}

impl ReservationBook {
    /// Mark working legs seen, drop fully settled entries and entries older
    /// than `max_age`; whether anything changed.
    pub fn reconcile(&mut self, ev: &Evidence<'_>, rules: &SettleRules) -> bool {
        self.reconcile_noting(ev, rules, &mut Vec::new())
    }

    /// [`ReservationBook::reconcile`], noting in `short` every entry it
    /// drops with a leg that ended filling less than it ordered (known from
    /// its terminal order event): once the reservation is gone and the end
    /// forgotten, only the entry record can tell an exit what that leg holds.
    pub fn reconcile_noting(
        &mut self,
        ev: &Evidence<'_>,
        rules: &SettleRules,
        short: &mut Vec<ShortEnd>,
    ) -> bool {
        let mut changed = false;
        self.held.retain(|sid, h| {
            let expired = after(h.created_at, rules.max_age).is_some_and(|limit| ev.now >= limit);
            if h.exit_of.is_some() {
                // An exit hold reserves nothing: it goes once the end of
                // every order is known (noted when short), never by the time
                // rules (a state can show an order gone before its end
                // event arrives); without an end it stays while working,
                // else until `max_age`.
                // Each leg goes (noted when short) as soon as its end is
                // known: ends are forgotten after `forget_after`, so a leg
                // waiting for a slower sibling would lose its own.
                note_short(sid, h, ev, short);
                let before = h.legs.len();
                h.legs.retain(|l| !ev.ended.contains_key(&l.order_id));
                changed |= h.legs.len() != before;
                let mut working = false;
                for l in &mut h.legs {
                    if ev.working(&l.order_id).is_some() {
                        working = true;
                        if !l.seen {
                            l.seen = true;
                            changed = true;
                        }
                    }
                }
                if !h.legs.is_empty() && (working || !expired) {
                    return true;
                }
                changed = true;
                return false;
            }
            if expired {
                changed = true;
                return false;
            }
            let mut all_settled = true;
            for l in &mut h.legs {
                match progress(l, h.created_at, ev, rules) {
                    LegProgress::Working(_) => {
                        all_settled = false;
                        if !l.seen {
                            l.seen = true;
                            changed = true;
                        }
                    }
                    LegProgress::Unbooked => all_settled = false,
                    LegProgress::Settled => {}
                }
            }
            if all_settled {
                changed = true;
                note_short(sid, h, ev, short);
            }
            !all_settled
        });
        changed
    }

    /// Margin and notional still unbooked per strategy (`except` excluded).
    pub fn reserved(
        &self,
        ev: &Evidence<'_>,
        rules: &SettleRules,
        except: Option<&str>,
    ) -> BTreeMap<String, Reservation> {
        let mut out: BTreeMap<String, Reservation> = BTreeMap::new();
        for (sid, h) in &self.held {
            if Some(sid.as_str()) == except {
                continue;
            }
            let r = h.reservation(ev, rules);
            match out.get_mut(&h.strategy_id) {
                Some(t) => add_to(t, &r),
                None => {
                    out.insert(h.strategy_id.clone(), r);
                }
            }
        }
        out
    }

    /// Units still to be booked, by strategy (only `strategies`'): (signal
    /// id, units) of every held entry with any.
    pub fn pending_units(
        &self,
        ev: &Evidence<'_>,
        rules: &SettleRules,
        strategies: &HashSet<&str>,
    ) -> HashMap<String, Vec<(String, PendingUnits)>> {
        let mut out: HashMap<String, Vec<(String, PendingUnits)>> = HashMap::new();
        for (sid, h) in &self.held {
            if !strategies.contains(h.strategy_id.as_str()) {
                continue;
            }
            for p in h.pending_units(Some((ev, rules))) {
                out.entry(p.strategy_id.clone())
                    .or_default()
                    .push((sid.clone(), p));
            }
        }
        out
    }

    /// Held entries other than `except` (held exits are not counted: they
    /// reserve nothing and go once their orders end).
    pub fn in_flight(&self, except: Option<&str>) -> usize {
        self.held
            .iter()
            .filter(|(sid, h)| h.exit_of.is_none() && Some(sid.as_str()) != except)
            .count()
    }
}

// ----- entry records in KV ------------------------------------------------

/// An entry as stored in `entries.<signal_id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEntry {
    /// Strategy.
    pub strategy_id: String,
    /// Account.
    pub account: String,
    /// Decision.
    pub decision: Decision,
    /// Legs as ordered (fill progress zero).
    pub legs: Vec<EntryLeg>,
    /// Revision of the account's reservation book that holds this entry's
    /// reservation (absent: nothing reserved, or written by an older build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub book_revision: Option<u64>,
    /// When Cerebro decided the entry (absent: written by an older build).
    /// An exit's `entry_wait` counts from here when the entry was decided
    /// after the exit was received (both waited in a backlog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    /// The janitor folded the exits of this finished entry into its legs'
    /// `closed_quantity` / `sender_quantity_exited` and deleted its exits
    /// key: the record stays (until `entry_max_age`) so a late exit still
    /// finds nothing left to close.
    #[serde(default, skip_serializing_if = "is_false")]
    pub settled: bool,
    /// The exit signals a settlement folded in: an exits key that outlived
    /// the settlement (an exit decided meanwhile) counts only the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub folded_exits: Vec<String>,
}

/// What one exit closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitTake {
    /// Instrument.
    pub instrument: String,
    /// Direction of the position closed.
    pub direction: Direction,
    /// Quantity ordered to close.
    pub quantity: Decimal,
    /// Sender quantity of the exit leg.
    pub sender_quantity: Decimal,
    /// The closing order (absent: written by an older build).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_id: Option<String>,
    /// What the closing order filled when it ended short of `quantity`
    /// (rejected, cancelled, expired): noted from its terminal order event.
    /// Absent while it works or once it filled in full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filled: Option<Decimal>,
}

impl ExitTake {
    /// Quantity this exit really closes: what its order filled once it
    /// ended short (noted, or known from `ended`), else all it ordered
    /// (working orders are expected to fill).
    pub fn closed(&self, ended: Option<&HashMap<String, EndedOrder>>) -> Decimal {
        let end = self
            .order_id
            .as_ref()
            .and_then(|id| ended.and_then(|m| m.get(id)))
            .map(|e| e.filled);
        self.filled
            .or(end)
            .map_or(self.quantity, |f| f.max(Decimal::ZERO).min(self.quantity))
    }
}

/// `exits.<entry_signal_id>`: what each exit signal closed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitProgress {
    /// By exit signal id.
    pub exits: BTreeMap<String, Vec<ExitTake>>,
}

/// Fewest remembered order ends before old ones are forgotten.
const ENDED_PRUNE_MIN: usize = 4096;

/// Forget order ends that can no longer settle anything: a leg is settled
/// by the fallback rule `unbooked_grace` after its reservation anyway.
fn forget_ended(ended: &mut HashMap<String, EndedOrder>, settings: &Settings, now: DateTime<Utc>) {
    let keep = forget_after(settings);
    ended.retain(|_, e| after(e.learned, keep).is_none_or(|t| t > now));
}

/// Fills are forgotten with the order ends they prove booked.
fn forget_fills(
    fills: &mut HashMap<String, FillProgress>,
    settings: &Settings,
    now: DateTime<Utc>,
) {
    let keep = forget_after(settings);
    fills.retain(|_, f| after(f.at, keep).is_none_or(|t| t > now));
}

fn forget_after(settings: &Settings) -> chrono::Duration {
    settings
        .unbooked_grace
        .checked_add(&settings.unbooked_grace)
        .unwrap_or(chrono::Duration::MAX)
        .max(chrono::Duration::minutes(1))
}

// ----- live inputs ----------------------------------------------------------

#[derive(Debug, Default)]
struct Live {
    strategies: BTreeMap<String, (u64, StrategyConfig)>,
    allocation: Option<(u64, ActiveAllocation)>,
    system: Option<(u64, SystemConfig)>,
    trading_enabled: Option<(u64, bool)>,
    kill_switch: Option<(u64, bool)>,
    accounts: BTreeMap<String, (u64, Arc<AccountState>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Strategies,
    Allocations,
    System,
    AccountState,
}

/// A switch value of the `system` bucket: `true`/`false` (also `1`/`0`,
/// `on`/`off`, `yes`/`no`, quoted or not, any case); anything else is `None`.
pub fn parse_bool(v: &[u8]) -> Option<bool> {
    let s = std::str::from_utf8(v).ok()?.trim().trim_matches('"');
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "on" | "yes" => Some(true),
        "false" | "0" | "off" | "no" => Some(false),
        _ => None,
    }
}

fn newer<T>(slot: &Option<(u64, T)>, rev: u64) -> bool {
    slot.as_ref().is_none_or(|(r, _)| rev >= *r)
}

impl Live {
    fn apply(&mut self, src: Source, key: &str, rev: u64, value: Option<&[u8]>) {
        match src {
            Source::Strategies => {
                if self.strategies.get(key).is_some_and(|(r, _)| *r > rev) {
                    return;
                }
                match value.map(serde_json::from_slice::<StrategyConfig>) {
                    Some(Ok(c)) => {
                        self.strategies.insert(key.to_string(), (rev, c));
                    }
                    Some(Err(e)) => {
                        tracing::warn!(key, error = %e, "strategy config unreadable; ignored")
                    }
                    None => {
                        self.strategies.remove(key);
                    }
                }
            }
            Source::Allocations => {
                if key != ALLOCATION_KEY || !newer(&self.allocation, rev) {
                    return;
                }
                match value.map(serde_json::from_slice::<ActiveAllocation>) {
                    Some(Ok(a)) => self.allocation = Some((rev, a)),
                    Some(Err(e)) => tracing::warn!(error = %e, "allocation unreadable; ignored"),
                    None => self.allocation = None,
                }
            }
            Source::System => match key {
                SYSTEM_CONFIG_KEY if newer(&self.system, rev) => {
                    match value.map(serde_json::from_slice::<SystemConfig>) {
                        Some(Ok(c)) => self.system = Some((rev, c)),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "system config unreadable; ignored")
                        }
                        None => self.system = None,
                    }
                }
                "TRADING_ENABLED" if newer(&self.trading_enabled, rev) => {
                    self.trading_enabled = value.and_then(parse_bool).map(|b| (rev, b));
                }
                "kill_switch" if newer(&self.kill_switch, rev) => {
                    self.kill_switch = value.and_then(parse_bool).map(|b| (rev, b));
                }
                _ => {}
            },
            // Puts are decoded outside the lock ([`Cerebro::apply_account_state`]);
            // only a delete or purge reaches here.
            Source::AccountState => {
                if value.is_none() && self.accounts.get(key).is_some_and(|(r, _)| *r <= rev) {
                    self.accounts.remove(key);
                }
            }
        }
    }

    fn system(&self) -> SystemConfig {
        let mut s = self
            .system
            .as_ref()
            .map(|(_, c)| c.clone())
            .unwrap_or_default();
        if let Some((_, b)) = self.trading_enabled {
            s.trading_enabled = b;
        }
        if let Some((_, true)) = self.kill_switch {
            s.trading_enabled = false;
        }
        s
    }

    fn account(&self, account: &str) -> Option<Arc<AccountState>> {
        self.accounts
            .get(&account_state_key(account))
            .map(|(_, s)| Arc::clone(s))
    }

    fn routed_account(&self, strategy_id: &str) -> Option<String> {
        let by_key = self
            .strategies
            .get(&StrategyConfig::kv_key(strategy_id))
            .filter(|(_, c)| c.strategy_id == strategy_id);
        by_key
            .or_else(|| {
                self.strategies
                    .values()
                    .find(|(_, c)| c.strategy_id == strategy_id)
            })
            .and_then(|(_, c)| c.account.clone())
    }
}

// ----- the handler -------------------------------------------------------------

/// KV stores the worker uses.
#[derive(Clone)]
struct Stores {
    strategies: kv::Store,
    allocations: kv::Store,
    system: kv::Store,
    state: kv::Store,
}

/// How long one batched read of entry and exit records may take.
const KV_BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A record of the state bucket as read (revision, JSON), decoded; an
/// undecodable one refuses the signal (`corrupt_state`).
fn decode_record<T: for<'de> Deserialize<'de>>(
    key: &str,
    read: Option<&(u64, Bytes)>,
) -> Result<Option<(u64, T)>, Fail> {
    let Some((revision, value)) = read else {
        return Ok(None);
    };
    let v = serde_json::from_slice(value)
        .map_err(|err| Fail::Reject("corrupt_state", format!("{key}: {err}")))?;
    Ok(Some((*revision, v)))
}

/// What one janitor pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JanitorReport {
    /// `entries.*` keys examined.
    pub entries: usize,
    /// `entries.*` keys deleted.
    pub entries_purged: usize,
    /// Finished entries settled (exits folded in, exits key deleted).
    pub entries_settled: usize,
    /// `exits.*` keys deleted.
    pub exits_purged: usize,
    /// Ended-order records forgotten.
    pub ended_forgotten: usize,
}

/// This replica's copy of one account's reservation book (see the module
/// docs), behind the account's async mutex.
#[derive(Debug, Default)]
struct BookCopy {
    /// The cache epoch it was loaded in (`None`: not loaded / invalidated).
    epoch: Option<u64>,
    /// KV revision of the book it was read at or last written as (`None`:
    /// no such key yet).
    rev: Option<u64>,
    /// The book (reconciled in memory; see `dirty`).
    book: ReservationBook,
    /// Size of the book's JSON as last read or written.
    bytes: usize,
    /// Reconciliation changed it since it was last read or written.
    dirty: bool,
    /// When this replica last wrote it.
    written_at: Option<Instant>,
}

/// The Cerebro handler (one per replica).
pub struct Cerebro {
    js: jetstream::Context,
    subjects: Subjects,
    stores: Stores,
    live: RwLock<Live>,
    marks: RwLock<BTreeMap<String, Mark>>,
    ended: RwLock<HashMap<String, EndedOrder>>,
    /// Fills seen on `EXECUTIONS` (pruned with `ended`).
    fills: RwLock<HashMap<String, FillProgress>>,
    /// Size of `ended` at which old ends are forgotten next.
    ended_prune_at: AtomicUsize,
    backtests: RwLock<BacktestState>,
    settings: Settings,
    /// TTL of purge markers when the bucket allows per-message TTLs.
    marker_ttl: Option<Duration>,
    /// Per account: the book copy behind the account's transaction mutex.
    books: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<BookCopy>>>>,
    /// Bumped to invalidate every book copy (after a panic mid-transaction).
    epoch: AtomicU64,
    /// Accounts with a background book sync scheduled.
    syncing: std::sync::Mutex<HashSet<String>>,
    /// True once the evidence feeds caught up at start (or the wait for
    /// them ran out): book syncs wait for it, so no hold is settled by the
    /// time rules while its order's end is still being replayed.
    evidence_ready: tokio::sync::watch::Sender<bool>,
    /// True once both evidence feeds caught up with their start-up replay
    /// (unlike `evidence_ready`, never before): until then no time rule
    /// settles a hold.
    replayed: std::sync::atomic::AtomicBool,
    metrics: CerebroMetrics,
    shutdown: CancellationToken,
}

#[derive(Debug, Clone)]
enum Fail {
    Retry(String),
    Reject(&'static str, String),
}

fn retry(e: impl std::fmt::Display) -> Fail {
    Fail::Retry(e.to_string())
}

fn outcome_of(r: Result<Outcome, Fail>) -> Outcome {
    match r {
        Ok(o) => o,
        Err(Fail::Retry(r)) => Outcome::retry(Duration::from_millis(500), r),
        Err(Fail::Reject(code, detail)) => Outcome::reject(code, detail),
    }
}

/// One decodable signal of a batch.
struct Job {
    /// Position in the batch.
    at: usize,
    signal: StandardizedSignal,
    opts: DecideOptions,
    deliveries: u64,
    /// The delivery before the last: nothing may defer any more.
    last_chance: bool,
}

/// A linked exit / cancel with what was read for it before its transaction.
struct Linked<'a> {
    job: &'a Job,
    /// The job's options, the entry wait counted from the later of the
    /// exit's receipt and its entry's decision.
    opts: DecideOptions,
    entry: Option<StoredEntry>,
    exits: Option<(u64, ExitProgress)>,
}

/// What reserving entries of a decision adds to a book.
fn reserves(d: &Decided) -> bool {
    !d.orders.is_empty()
        && d.record.action == Some(SignalAction::Entry)
        && (d.reservation.margin > Decimal::ZERO || d.reservation.notional > Decimal::ZERO)
}

/// The pending units of `signal`'s strategy in its legs' instruments, its
/// own earlier entry (a redelivery) aside.
fn pending_for(
    pending: &HashMap<String, Vec<(String, PendingUnits)>>,
    signal: &StandardizedSignal,
) -> Vec<PendingUnits> {
    pending
        .get(&signal.strategy_id)
        .map(|units| {
            units
                .iter()
                .filter(|(sid, p)| {
                    *sid != signal.signal_id
                        && signal.legs.iter().any(|l| l.instrument == p.instrument)
                })
                .map(|(_, p)| p.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// `totals` without `own` (a redelivered signal's earlier entry).
fn without(
    totals: &BTreeMap<String, Reservation>,
    own: Option<&(String, Reservation)>,
) -> BTreeMap<String, Reservation> {
    let mut out = totals.clone();
    if let Some((strategy, r)) = own {
        if let Some(t) = out.get_mut(strategy) {
            sub_from(t, r);
        }
    }
    out
}

/// Only account state keys (single token) are watched in `account_state`;
/// the worker's own `reservations.*` / `entries.*` / `exits.*` are not.
const ACCOUNT_KEYS: &str = "*";

impl Cerebro {
    /// Open the buckets, load the current inputs and start the watchers,
    /// the mark and order-event feeds, the backtest loader and the janitor
    /// (all stopped by `shutdown`); metrics go to `registry`.
    pub async fn start(
        js: &jetstream::Context,
        subjects: Subjects,
        topology: &Topology,
        settings: Settings,
        registry: &Registry,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cerebro>, String> {
        let metrics = CerebroMetrics::new(registry).map_err(|e| format!("metrics: {e}"))?;
        let open = |base: &'static str| {
            let name = topology.bucket(base).map(str::to_string);
            let js = js.clone();
            async move {
                let name = name.ok_or_else(|| format!("topology has no bucket {base}"))?;
                js.get_key_value(&name)
                    .await
                    .map_err(|e| format!("kv bucket {name}: {e}"))
            }
        };
        let stores = Stores {
            strategies: open(buckets::STRATEGIES).await?,
            allocations: open(buckets::ALLOCATIONS).await?,
            system: open(buckets::SYSTEM).await?,
            state: open(buckets::ACCOUNT_STATE).await?,
        };
        let marker_ttl = stores
            .state
            .stream
            .cached_info()
            .config
            .allow_message_ttl
            .then_some(Duration::from_secs(86_400));
        let me = Arc::new(Cerebro {
            js: js.clone(),
            subjects,
            stores: stores.clone(),
            live: RwLock::new(Live::default()),
            marks: RwLock::new(BTreeMap::new()),
            ended: RwLock::new(HashMap::new()),
            fills: RwLock::new(HashMap::new()),
            ended_prune_at: AtomicUsize::new(ENDED_PRUNE_MIN),
            backtests: RwLock::new(BacktestState::default()),
            settings,
            marker_ttl,
            books: std::sync::Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            syncing: std::sync::Mutex::new(HashSet::new()),
            evidence_ready: tokio::sync::watch::Sender::new(false),
            replayed: std::sync::atomic::AtomicBool::new(false),
            metrics,
            shutdown: shutdown.clone(),
        });
        me.apply(Source::System, "", 0, None);
        for (src, store) in [
            (Source::Strategies, stores.strategies),
            (Source::Allocations, stores.allocations),
            (Source::System, stores.system),
            (Source::AccountState, stores.state),
        ] {
            // Start watching first, then load what is there, so no update
            // between the two is missed (stale ones lose on revision).
            let watch = Self::open_watch(src, &store)
                .await
                .map_err(|e| format!("watch: {e}"))?;
            me.load(src, &store).await?;
            tokio::spawn(Arc::clone(&me).watch(src, store, watch, shutdown.clone()));
        }
        // One ordered feed per replica: `on` sees every message from `deliver`.
        let spawn_feed = |stream: &str,
                          filter: &str,
                          deliver,
                          what,
                          on: fn(&Arc<Cerebro>, &jetstream::Message)| {
            let (ready, loaded) = tokio::sync::watch::channel(false);
            let feed = Feed {
                stream: topology.stream_name(stream),
                filter: me.subjects.raw_subject(filter),
                deliver,
                what,
            };
            let c = Arc::clone(&me);
            tokio::spawn(run_feed(
                js.clone(),
                feed,
                shutdown.clone(),
                ready,
                move |m| on(&c, m),
            ));
            loaded
        };
        if me.settings.marks {
            let mut loaded = spawn_feed(
                streams::MARKET,
                "market.prices.>",
                consumer::DeliverPolicy::LastPerSubject,
                "marks",
                Cerebro::on_mark,
            );
            let wait = me.settings.marks_initial_wait;
            if tokio::time::timeout(wait, loaded.wait_for(|r| *r))
                .await
                .is_err()
            {
                tracing::warn!(?wait, "latest marks not loaded yet; starting without them");
            }
        }
        if me.settings.order_events {
            // From the oldest hold on: an order may have ended (or filled)
            // while this replica was down, and only its event tells a
            // hold that it ended short.
            let since = me.evidence_since(Utc::now()).await;
            let deliver = i128::from(since.timestamp_nanos_opt().unwrap_or(0));
            let deliver = match async_nats::datetime::from_nanos(deliver) {
                Ok(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
                Err(_) => consumer::DeliverPolicy::New,
            };
            let mut events = spawn_feed(
                streams::ORDER_EVENTS,
                "orders.*.events",
                deliver,
                "order events",
                Cerebro::on_order_event,
            );
            let mut fills = spawn_feed(
                streams::EXECUTIONS,
                "executions.*",
                deliver,
                "executions",
                Cerebro::on_execution,
            );
            let c = Arc::clone(&me);
            let mut replay = tokio::spawn(async move {
                let _ = events.wait_for(|r| *r).await;
                let _ = fills.wait_for(|r| *r).await;
                c.replayed.store(true, Ordering::Release);
            });
            let wait = me.settings.evidence_initial_wait;
            if tokio::time::timeout(wait, &mut replay).await.is_err() {
                tracing::warn!(
                    ?wait,
                    %since,
                    "order events / executions since the oldest reservation not replayed yet; starting without them (no hold is settled by the time rules until they are)"
                );
            }
        } else {
            me.replayed.store(true, Ordering::Release);
        }
        me.evidence_ready.send_replace(true);
        // Reconcile every book with what was replayed while it is fresh.
        let accounts: Vec<String> = {
            let live = me.live.read().unwrap_or_else(|p| p.into_inner());
            live.accounts
                .values()
                .map(|(_, st)| st.account.clone())
                .collect()
        };
        for account in accounts {
            me.schedule_sync(account);
        }
        if let Some(source) = me.settings.backtests.clone() {
            tokio::spawn(Arc::clone(&me).backtest_loop(source, shutdown.clone()));
        }
        tokio::spawn(Arc::clone(&me).janitor_loop(shutdown));
        Ok(me)
    }

    async fn open_watch(src: Source, store: &kv::Store) -> Result<kv::Watch, kv::WatchError> {
        match src {
            Source::AccountState => store.watch(ACCOUNT_KEYS).await,
            _ => store.watch_all().await,
        }
    }

    async fn load(&self, src: Source, store: &kv::Store) -> Result<(), String> {
        if src == Source::AccountState {
            for e in scan_kv(&self.js, store, ACCOUNT_KEYS, false).await? {
                self.apply(src, &e.key, e.revision, Some(&e.value));
            }
            return Ok(());
        }
        let mut keys = store.keys().await.map_err(|e| format!("kv keys: {e}"))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            names.push(k.map_err(|e| format!("kv keys: {e}"))?);
        }
        for k in names {
            if let Some(e) = store
                .entry(k.as_str())
                .await
                .map_err(|e| format!("kv get {k}: {e}"))?
            {
                if e.operation == kv::Operation::Put {
                    self.apply(src, &e.key, e.revision, Some(&e.value));
                }
            }
        }
        Ok(())
    }

    /// Apply a watched input; returns the account of an applied account
    /// state.
    fn apply(&self, src: Source, key: &str, rev: u64, value: Option<&[u8]>) -> Option<String> {
        if let (Source::AccountState, Some(bytes)) = (src, value) {
            return self.apply_account_state(key, rev, bytes);
        }
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        live.apply(src, key, rev, value);
        match src {
            Source::System => {
                let on = live.system().trading_enabled;
                self.metrics.trading_enabled.set(i64::from(on));
                None
            }
            _ => None,
        }
    }

    /// An account state put: decoded before the live inputs are locked
    /// (states are large, tens of KB with hundreds of positions, and
    /// deciding batches read the live inputs meanwhile), stored if no newer
    /// revision arrived in between. Returns the state's account.
    fn apply_account_state(&self, key: &str, rev: u64, bytes: &[u8]) -> Option<String> {
        let stale = |live: &Live| {
            key.contains('.') || live.accounts.get(key).is_some_and(|(r, _)| *r > rev)
        };
        if stale(&self.live.read().unwrap_or_else(|p| p.into_inner())) {
            return None;
        }
        let state = match serde_json::from_slice::<AccountState>(bytes) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(key, error = %e, "account state unreadable");
                return None;
            }
        };
        let account = state.account.clone();
        let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
        if stale(&live) {
            return None;
        }
        live.accounts
            .insert(key.to_string(), (rev, Arc::new(state)));
        Some(account)
    }

    async fn watch(
        self: Arc<Self>,
        src: Source,
        store: kv::Store,
        mut watch: kv::Watch,
        shutdown: CancellationToken,
    ) {
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                n = watch.next() => n,
            };
            match next {
                Some(Ok(e)) => {
                    let value = (e.operation == kv::Operation::Put).then_some(&e.value[..]);
                    if let Some(account) = self.apply(src, &e.key, e.revision, value) {
                        // Releases are written in the background: the
                        // watcher never waits for a transaction.
                        self.schedule_sync(account);
                    }
                }
                other => {
                    if let Some(Err(e)) = other {
                        tracing::warn!(error = %e, "kv watch failed; re-watching");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    match Self::open_watch(src, &store).await {
                        Ok(w) => {
                            watch = w;
                            if let Err(e) = self.load(src, &store).await {
                                tracing::warn!(error = %e, "kv reload failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "kv re-watch failed"),
                    }
                }
            }
        }
    }

    // ----- marks, order events, backtests ----------------------------------

    /// A `market.prices.<symbol>` message: keep the latest observation per
    /// symbol (greatest `(timestamp, price)`, so arrival order and replays
    /// do not matter).
    fn on_mark(self: &Arc<Self>, m: &jetstream::Message) {
        let stored = m.info().ok().map(|i| {
            DateTime::from_timestamp_nanos(
                i64::try_from(i.published.unix_timestamp_nanos()).unwrap_or(i64::MAX),
            )
        });
        match decode_accounts_input(
            &self.subjects,
            AccountsSource::Market,
            &m.subject,
            &m.payload,
            stored,
        ) {
            Ok(AccountsInput::Price(p)) => {
                let mark = Mark {
                    price: p.price,
                    at: p.timestamp,
                };
                let mut marks = self.marks.write().unwrap_or_else(|e| e.into_inner());
                let newer = marks
                    .get(&p.symbol)
                    .is_none_or(|old| (mark.at, mark.price) > (old.at, old.price));
                if newer {
                    marks.insert(p.symbol, mark);
                }
            }
            Ok(_) => {}
            Err((code, detail)) => tracing::debug!(code, %detail, "mark ignored"),
        }
    }

    /// An `orders.<account>.events` message: remember terminal ones.
    fn on_order_event(self: &Arc<Self>, m: &jetstream::Message) {
        let Ok(AccountsInput::OrderEvents(events)) = decode_accounts_input(
            &self.subjects,
            AccountsSource::OrderEvents,
            &m.subject,
            &m.payload,
            None,
        ) else {
            return;
        };
        // A terminal event is the last of its order (a message lists one
        // order's events in seq order).
        let Some(e) = events.into_iter().rev().find(|e| e.status.is_terminal()) else {
            return;
        };
        {
            let mut ended = self.ended.write().unwrap_or_else(|p| p.into_inner());
            ended.insert(
                e.order_id,
                EndedOrder {
                    filled: e.filled_quantity,
                    at: e.timestamp,
                    status: e.status,
                    learned: Utc::now(),
                },
            );
            // Bounded: ends older than the fallback grace (twice) no longer
            // change any settlement; forget them every so often.
            let prune_at = self.ended_prune_at.load(Ordering::Relaxed);
            if ended.len() >= prune_at {
                forget_ended(&mut ended, &self.settings, Utc::now());
                let mut fills = self.fills.write().unwrap_or_else(|p| p.into_inner());
                forget_fills(&mut fills, &self.settings, Utc::now());
                // Amortized: the next prune once the map has doubled.
                self.ended_prune_at
                    .store((ended.len() * 2).max(ENDED_PRUNE_MIN), Ordering::Relaxed);
            }
        }
        // Reconcile the account's book while the end is remembered, even if
        // no account state follows (an exit hold notes a short end then).
        // Coalesced with the sync a state schedules.
        self.schedule_sync(e.account);
    }

    /// An execution: how much of its order is filled, up to which stream
    /// sequence (the proof a state books it, see [`Evidence::with_fills`]).
    fn on_execution(self: &Arc<Self>, m: &jetstream::Message) {
        let Ok(AccountsInput::Execution(x)) = decode_accounts_input(
            &self.subjects,
            AccountsSource::Executions,
            &m.subject,
            &m.payload,
            None,
        ) else {
            return;
        };
        let Ok(info) = m.info() else {
            return;
        };
        let seq = info.stream_sequence;
        let mut fills = self.fills.write().unwrap_or_else(|p| p.into_inner());
        let now = Utc::now();
        let f = fills.entry(x.order_id).or_insert(FillProgress {
            quantity: Decimal::ZERO,
            last_seq: 0,
            at: now,
            executions: Vec::new(),
        });
        // An ordered feed delivers each message once, in order; a re-opened
        // one resumes after the last sequence, so nothing is counted twice.
        if seq > f.last_seq {
            f.quantity += x.quantity;
            f.last_seq = seq;
            f.at = f.at.max(now);
            f.executions.push((seq, x.quantity));
        }
    }

    /// Latest mark known of `symbol` (tests and ops).
    pub fn mark(&self, symbol: &str) -> Option<Mark> {
        self.marks.read().ok().and_then(|m| m.get(symbol).copied())
    }

    /// The end of `order_id`, if its terminal event was seen (tests and ops).
    pub fn ended_order(&self, order_id: &str) -> Option<EndedOrder> {
        self.ended
            .read()
            .ok()
            .and_then(|m| m.get(order_id).copied())
    }

    /// What is known about the backtests (tests and ops).
    pub fn backtest_state(&self) -> BacktestState {
        self.backtests.read().map(|b| b.clone()).unwrap_or_default()
    }

    async fn backtest_loop(self: Arc<Self>, source: BacktestSource, shutdown: CancellationToken) {
        let mut reader = BacktestReader::new(source);
        loop {
            let result = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = reader.load() => r,
            };
            let next = {
                let mut st = self.backtests.write().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(loaded) => {
                        for (doc, why) in &loaded.skipped {
                            tracing::warn!(%doc, %why, "backtest document skipped");
                        }
                        tracing::info!(
                            strategies = loaded.strategies,
                            skipped = loaded.skipped.len(),
                            "backtest returns loaded"
                        );
                        st.table = Some(loaded.table);
                        st.strategies = loaded.strategies;
                        st.skipped = loaded.skipped;
                        st.loaded_at = Some(Utc::now());
                        st.last_error = None;
                        self.metrics
                            .backtest_strategies
                            .set(i64::try_from(st.strategies).unwrap_or(i64::MAX));
                        self.settings.backtest_refresh
                    }
                    Err(e) => {
                        if st.table.is_some() {
                            tracing::warn!(error = %e, "backtest refresh failed; keeping the previous returns");
                        } else {
                            tracing::warn!(error = %e, "backtest returns unavailable; CVaR not evaluated");
                        }
                        st.last_error = Some(e);
                        self.metrics.backtest_strategies.set(if st.table.is_some() {
                            st.strategies as i64
                        } else {
                            0
                        });
                        if st.table.is_some() {
                            self.settings.backtest_refresh
                        } else {
                            self.settings.backtest_retry
                        }
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(next) => {}
            }
        }
    }

    // ----- janitor ------------------------------------------------------------

    async fn janitor_loop(self: Arc<Self>, shutdown: CancellationToken) {
        // Replicas start at different moments, so their passes interleave.
        let period = self.settings.janitor_interval;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            match self.janitor_pass(Utc::now()).await {
                Ok(r) => tracing::debug!(?r, "janitor pass"),
                Err(e) => tracing::warn!(error = %e, "janitor pass failed"),
            }
        }
    }

    /// One janitor pass as of `now` (see [`crate::janitor`]): delete the
    /// `entries.*` / `exits.*` keys whose retention passed and forget old
    /// order ends. Runs every `janitor_interval`; public for tests and ops.
    pub async fn janitor_pass(&self, now: DateTime<Utc>) -> Result<JanitorReport, String> {
        let mut report = JanitorReport::default();
        {
            let mut ended = self.ended.write().unwrap_or_else(|p| p.into_inner());
            let before = ended.len();
            forget_ended(&mut ended, &self.settings, now);
            report.ended_forgotten = before - ended.len();
            let mut fills = self.fills.write().unwrap_or_else(|p| p.into_inner());
            forget_fills(&mut fills, &self.settings, now);
        }
        let store = &self.stores.state;
        let entries = scan_kv(&self.js, store, "entries.>", false).await?;
        let mut exits: BTreeMap<String, Scanned> = scan_kv(&self.js, store, "exits.>", false)
            .await?
            .into_iter()
            .filter_map(|e| {
                let id = e.key.strip_prefix("exits.")?.to_string();
                Some((id, e))
            })
            .collect();
        // Per account: the encoded signal ids its reservation book holds
        // (entries, and the entries of held exits).
        let mut books: BTreeMap<String, HashSet<String>> = BTreeMap::new();
        report.entries = entries.len();
        for e in entries {
            let Some(id) = e.key.strip_prefix("entries.") else {
                continue;
            };
            let x = exits.remove(id);
            let Ok(entry) = serde_json::from_slice::<StoredEntry>(&e.value) else {
                tracing::warn!(key = %e.key, "unreadable entry record left in place");
                continue;
            };
            let progress = x
                .as_ref()
                .and_then(|x| serde_json::from_slice::<ExitProgress>(&x.value).ok());
            if !books.contains_key(&entry.account) {
                let book = self
                    .read_book(&entry.account)
                    .await
                    .map_err(|_| format!("reservation book of {}", entry.account))?
                    .1;
                // An entry with a held exit counts as held too: that exit's
                // end may still change what the entry has left open.
                let ids = book
                    .held
                    .iter()
                    .map(|(sid, h)| StrategyConfig::kv_key(h.exit_of.as_deref().unwrap_or(sid)));
                books.insert(entry.account.clone(), ids.collect());
            }
            // The key holds the encoded signal id.
            let reserved = books.get(&entry.account).is_some_and(|b| b.contains(id));
            let last = x.as_ref().map_or(e.written, |x| x.written.max(e.written));
            let d = entry_disposition(
                &entry,
                progress.as_ref(),
                reserved,
                last,
                now,
                self.settings.entry_retention,
            );
            match d {
                Disposition::Keep => {}
                Disposition::Purge => {
                    if self.purge(&e.key, e.revision).await {
                        report.entries_purged += 1;
                        tracing::debug!(key = %e.key, "entry record deleted (max age)");
                        if let Some(x) = &x {
                            if self.purge(&x.key, x.revision).await {
                                report.exits_purged += 1;
                            }
                        }
                    }
                }
                Disposition::Settle => {
                    // The record first (compare-and-set: an entry rewritten
                    // meanwhile is left for the next pass), then its exits.
                    let body = serde_json::to_vec(&settle(&entry, progress.as_ref()))
                        .map_err(|e| e.to_string())?;
                    if let Ok(Some(_)) = self.cas(&e.key, Some(e.revision), body).await {
                        report.entries_settled += 1;
                        tracing::debug!(key = %e.key, "finished entry settled");
                        if let Some(x) = &x {
                            if self.purge(&x.key, x.revision).await {
                                report.exits_purged += 1;
                            }
                        }
                    }
                }
            }
        }
        // Exit records whose entry is gone.
        for x in exits.into_values() {
            if at_least(now, x.written, self.settings.entry_retention.done)
                && self.purge(&x.key, x.revision).await
            {
                report.exits_purged += 1;
            }
        }
        Ok(report)
    }

    /// Purge `key` if it is still at `revision` (a rewrite meanwhile wins).
    async fn purge(&self, key: &str, revision: u64) -> bool {
        let r = match self.marker_ttl {
            Some(ttl) => {
                self.stores
                    .state
                    .purge_expect_revision_with_ttl(key, revision, ttl)
                    .await
            }
            None => {
                self.stores
                    .state
                    .purge_expect_revision(key, Some(revision))
                    .await
            }
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(key, error = %e, "not purged (changed meanwhile?)");
                false
            }
        }
    }

    // ----- accessors ----------------------------------------------------------

    /// Current allocation (tests and ops).
    pub fn allocation(&self) -> Option<ActiveAllocation> {
        self.live
            .read()
            .ok()
            .and_then(|l| l.allocation.as_ref().map(|(_, a)| a.clone()))
    }

    /// Current system config (tests and ops).
    pub fn system(&self) -> SystemConfig {
        self.live.read().map(|l| l.system()).unwrap_or_default()
    }

    /// Latest account state known (tests and ops).
    pub fn account_state(&self, account: &str) -> Option<AccountState> {
        self.state_of(account).map(|s| (*s).clone())
    }

    fn state_of(&self, account: &str) -> Option<Arc<AccountState>> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .account(account)
    }

    /// Read an account's reservation book as stored in KV (tests and ops).
    pub async fn reservation_book(&self, account: &str) -> Result<ReservationBook, String> {
        Ok(self
            .read_json::<ReservationBook>(&reservations_key(account))
            .await
            .map_err(|_| "kv unavailable".to_string())?
            .map(|(_, b)| b)
            .unwrap_or_default())
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<(u64, T)>, Fail> {
        match self.stores.state.entry(key).await.map_err(retry)? {
            Some(e) if e.operation == kv::Operation::Put => {
                decode_record(key, Some(&(e.revision, e.value)))
            }
            _ => Ok(None),
        }
    }

    /// The current value and revision of each of `keys` in the state bucket
    /// that holds one (deleted and missing keys are absent), read with one
    /// batched direct get per 1,000 keys — exactly what `kv.entry` reads
    /// key by key on a bucket that allows direct gets. `None` when the
    /// bucket does not allow them (then read key by key from the leader).
    async fn read_many(
        &self,
        keys: &[String],
    ) -> Option<Result<HashMap<String, (u64, Bytes)>, Fail>> {
        let store = &self.stores.state;
        if !store.stream.cached_info().config.allow_direct {
            return None;
        }
        if keys.is_empty() {
            return Some(Ok(HashMap::new()));
        }
        let subjects: Vec<String> = keys
            .iter()
            .map(|k| format!("{}{k}", store.prefix))
            .collect();
        let found = match multiget::last_messages(
            &self.js.client(),
            &store.stream_name,
            &subjects,
            KV_BATCH_TIMEOUT,
        )
        .await
        {
            Ok(found) => found,
            Err(e) => return Some(Err(retry(e))),
        };
        let mut out = HashMap::with_capacity(found.len());
        for (subject, m) in found {
            if multiget::is_kv_marker(&m) {
                continue;
            }
            if let Some(key) = subject.strip_prefix(store.prefix.as_str()) {
                out.insert(key.to_string(), (m.sequence, m.payload));
            }
        }
        Some(Ok(out))
    }

    /// Write the end of every short leg (see [`ShortEnd`]) into its entry
    /// record before the book that drops its reservation is written: an
    /// exit long after must not take the leg for filled in full. On a
    /// failure the copy (which already dropped them) is invalidated.
    async fn note_short_ends(&self, copy: &mut BookCopy, short: &[ShortEnd]) -> Result<(), Fail> {
        for s in short {
            if let Some(entry_id) = &s.exit_of {
                if let Err(f) = self.note_exit_end(entry_id, s).await {
                    copy.epoch = None;
                    return Err(f);
                }
                continue;
            }
            let key = entry_key(&s.signal_id);
            let noted = async {
                let Some((_, mut se)) = self.read_json::<StoredEntry>(&key).await? else {
                    return Ok(());
                };
                let mut changed = false;
                for l in &mut se.legs {
                    if let Some((_, e)) = s.legs.iter().find(|(id, _)| *id == l.order_id) {
                        let filled = e.filled.max(Decimal::ZERO).min(l.ordered_quantity);
                        if (l.filled_quantity, l.status) != (filled, e.status) {
                            (l.filled_quantity, l.status) = (filled, e.status);
                            changed = true;
                        }
                    }
                }
                if changed {
                    let body = serde_json::to_vec(&se).map_err(retry)?;
                    self.stores
                        .state
                        .put(key.as_str(), body.into())
                        .await
                        .map_err(retry)?;
                }
                Ok::<(), Fail>(())
            };
            if let Err(f) = noted.await {
                copy.epoch = None;
                return Err(f);
            }
        }
        Ok(())
    }

    /// The evidence books are reconciled with: the state, the order ends
    /// and fills this replica knows, and whether those are still replaying.
    fn evidence<'a>(
        &self,
        state: Option<&'a AccountState>,
        ended: &'a HashMap<String, EndedOrder>,
        fills: &'a HashMap<String, FillProgress>,
        now: DateTime<Utc>,
    ) -> Evidence<'a> {
        Evidence::new(state, ended, now)
            .with_fills(fills)
            .replaying(!self.replayed.load(Ordering::Acquire))
    }

    /// Where the order-event and execution feeds start: at the oldest hold
    /// of any reservation book less a margin for clock skew (its order may
    /// have ended while this replica was down), at least the time ends are remembered back (ends just
    /// before a restart), never more than `reservation_max_age` back (older
    /// holds are dropped anyway; also the fallback when the books cannot
    /// be read).
    async fn evidence_since(&self, now: DateTime<Utc>) -> DateTime<Utc> {
        let back = |d: chrono::Duration| now.checked_sub_signed(d).unwrap_or(now);
        let floor = back(self.settings.reservation_max_age);
        let margin = forget_after(&self.settings);
        let recent = back(margin);
        match scan_kv(&self.js, &self.stores.state, "reservations.*", false).await {
            // A margin before the oldest hold: its time is this replica's
            // clock, the stream's are the server's.
            Ok(books) => books
                .iter()
                .filter_map(|b| serde_json::from_slice::<ReservationBook>(&b.value).ok())
                .flat_map(|b| b.held.into_values().map(|h| h.created_at))
                .map(|t| t.checked_sub_signed(margin).unwrap_or(t))
                .fold(recent, DateTime::min)
                .max(floor),
            Err(e) => {
                tracing::warn!(error = %e, "reservation books unreadable; replaying order events from the oldest possible reservation");
                floor
            }
        }
    }

    /// Note in `exits.<entry_id>` what the exit `s` names really filled
    /// of its closing orders that ended short (compare-and-set: other exits
    /// of the entry write the same key). Nothing to note when the key or the
    /// exit's takes are gone (the entry was purged).
    async fn note_exit_end(&self, entry_id: &str, s: &ShortEnd) -> Result<(), Fail> {
        let key = exits_key(entry_id);
        for _ in 0..self.settings.cas_attempts.max(1) {
            let Some((rev, mut progress)) = self.read_json::<ExitProgress>(&key).await? else {
                return Ok(());
            };
            let Some(takes) = progress.exits.get_mut(&s.signal_id) else {
                return Ok(());
            };
            let mut changed = false;
            for t in takes.iter_mut() {
                let Some(id) = &t.order_id else { continue };
                if let Some((_, e)) = s.legs.iter().find(|(o, _)| o == id) {
                    let filled = e.filled.max(Decimal::ZERO).min(t.quantity);
                    if t.filled != Some(filled) {
                        t.filled = Some(filled);
                        changed = true;
                    }
                }
            }
            if !changed {
                return Ok(());
            }
            let body = serde_json::to_vec(&progress).map_err(retry)?;
            if self.cas(&key, Some(rev), body).await?.is_some() {
                return Ok(());
            }
        }
        Err(Fail::Retry(format!(
            "noting the end of exit {} in {key}: compare-and-set contention",
            s.signal_id
        )))
    }

    /// Compare-and-set write: the new revision, `None` on a revision conflict.
    async fn cas(&self, key: &str, rev: Option<u64>, value: Vec<u8>) -> Result<Option<u64>, Fail> {
        let value = Bytes::from(value);
        match rev {
            Some(r) => match self.stores.state.update(key, value, r).await {
                Ok(new) => Ok(Some(new)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(retry(e)),
            },
            None => match self.stores.state.create(key, value).await {
                Ok(new) => Ok(Some(new)),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(retry(e)),
            },
        }
    }

    /// An account's book from KV: revision, book, size in bytes.
    async fn read_book(
        &self,
        account: &str,
    ) -> Result<(Option<u64>, ReservationBook, usize), Fail> {
        let key = reservations_key(account);
        // A deleted / purged book reads as empty (revision kept for the CAS).
        match self.stores.state.entry(key.as_str()).await.map_err(retry)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let b = serde_json::from_slice(&e.value)
                    .map_err(|err| Fail::Reject("corrupt_state", format!("{key}: {err}")))?;
                Ok((Some(e.revision), b, e.value.len()))
            }
            Some(e) => Ok((Some(e.revision), ReservationBook::default(), 2)),
            None => Ok((None, ReservationBook::default(), 2)),
        }
    }

    // ----- book copies ----------------------------------------------------------

    fn book_lock(&self, account: &str) -> Arc<tokio::sync::Mutex<BookCopy>> {
        let mut books = self.books.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(books.entry(account.to_string()).or_default())
    }

    /// Make `copy` current: read the book from KV unless the copy is loaded
    /// (in this epoch).
    async fn ensure_loaded(&self, account: &str, copy: &mut BookCopy) -> Result<(), Fail> {
        let epoch = self.epoch.load(Ordering::Acquire);
        if copy.epoch == Some(epoch) {
            return Ok(());
        }
        copy.epoch = None;
        let (rev, book, bytes) = self.read_book(account).await?;
        copy.rev = rev;
        copy.book = book;
        copy.bytes = bytes;
        copy.dirty = false;
        copy.epoch = Some(epoch);
        Ok(())
    }

    /// Write `body` (the copy's book) over the copy's revision: `true` when
    /// written, `false` on a conflict. Anything but success drops the copy.
    async fn write_book(
        &self,
        account: &str,
        copy: &mut BookCopy,
        body: Vec<u8>,
    ) -> Result<bool, Fail> {
        let len = body.len();
        let r = self.cas(&reservations_key(account), copy.rev, body).await;
        match r {
            Ok(Some(rev)) => {
                copy.rev = Some(rev);
                copy.bytes = len;
                copy.dirty = false;
                copy.written_at = Some(Instant::now());
                Ok(true)
            }
            Ok(None) => {
                copy.epoch = None;
                Ok(false)
            }
            Err(e) => {
                copy.epoch = None;
                Err(e)
            }
        }
    }

    /// Schedule a background sync of `account`'s book (coalesced).
    fn schedule_sync(self: &Arc<Self>, account: String) {
        let fresh = self
            .syncing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(account.clone());
        if fresh {
            let me = Arc::clone(self);
            tokio::spawn(async move { me.sync_book(account).await });
        }
    }

    /// Reconcile `account`'s copy with the latest evidence and write it if
    /// that changed anything, once the book has not been written for
    /// [`SYNC_QUIET`] (busy books carry their releases in their next write).
    async fn sync_book(&self, account: String) {
        let mut ready = self.evidence_ready.subscribe();
        tokio::select! {
            _ = self.shutdown.cancelled() => return,
            _ = ready.wait_for(|r| *r) => {}
        }
        let lock = self.book_lock(&account);
        let mut attempts = 0;
        let mut errors = 0;
        loop {
            let wait = {
                let copy = lock.lock().await;
                copy.written_at
                    .map(|t| t.elapsed())
                    .filter(|e| *e < SYNC_QUIET)
                    .map(|e| SYNC_QUIET - e)
            };
            if let Some(w) = wait {
                tokio::select! {
                    _ = self.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(w) => continue,
                }
            }
            // States arriving from here on schedule another sync.
            self.syncing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&account);
            let r = {
                let mut copy = lock.lock().await;
                self.sync_locked(&account, &mut copy).await
            };
            match r {
                Ok(true) => return,
                Ok(false) if attempts < self.settings.cas_attempts => attempts += 1,
                Ok(false) => {
                    tracing::debug!(%account, "reservation sync gave up (contention)");
                    return;
                }
                // Retried a while: a sync may be what notes an exit's short
                // end before it is forgotten (no state may follow).
                Err(e) if errors < SYNC_ERROR_RETRIES => {
                    errors += 1;
                    tracing::debug!(%account, error = ?e, "reservation sync failed; retrying");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(SYNC_ERROR_DELAY) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(%account, error = ?e, "reservation sync failed; left to the next state or event");
                    return;
                }
            }
        }
        self.syncing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&account);
    }

    /// `Ok(false)`: lost a compare-and-set, try again.
    async fn sync_locked(&self, account: &str, copy: &mut BookCopy) -> Result<bool, Fail> {
        self.ensure_loaded(account, copy).await?;
        let state = self.state_of(account);
        let mut short = Vec::new();
        let changed = {
            let ended = self.ended.read().unwrap_or_else(|p| p.into_inner());
            let fills = self.fills.read().unwrap_or_else(|p| p.into_inner());
            let ev = self.evidence(state.as_deref(), &ended, &fills, Utc::now());
            copy.book
                .reconcile_noting(&ev, &SettleRules::of(&self.settings), &mut short)
        };
        self.note_short_ends(copy, &short).await?;
        copy.dirty |= changed;
        if !copy.dirty {
            return Ok(true);
        }
        let body = serde_json::to_vec(&copy.book).map_err(retry)?;
        self.write_book(account, copy, body).await
    }

    // ----- deciding -------------------------------------------------------------

    /// The decision inputs at `now` without accounts and entries (the
    /// transaction adds those): live configuration, the marks of the
    /// `signals`' instruments, backtest returns. Built once per transaction.
    fn base_inputs<'a>(
        &self,
        now: DateTime<Utc>,
        signals: impl IntoIterator<Item = &'a StandardizedSignal>,
    ) -> Inputs {
        let (strategies, allocation, system) = {
            let live = self.live.read().unwrap_or_else(|p| p.into_inner());
            (
                live.strategies
                    .values()
                    .map(|(_, c)| (c.strategy_id.clone(), c.clone()))
                    .collect(),
                live.allocation.as_ref().map(|(_, a)| a.clone()),
                live.system(),
            )
        };
        let marks = {
            let all = self.marks.read().unwrap_or_else(|p| p.into_inner());
            signals
                .into_iter()
                .flat_map(|s| s.legs.iter())
                .filter_map(|l| all.get(&l.instrument).map(|m| (l.instrument.clone(), *m)))
                .collect()
        };
        let (returns, returns_unavailable) = {
            let b = self.backtests.read().unwrap_or_else(|p| p.into_inner());
            let reason = match (&b.table, &self.settings.backtests) {
                (Some(_), _) => None,
                (None, None) => Some("no backtest store configured".to_string()),
                (None, Some(_)) => b.unavailable_reason(),
            };
            (b.table.clone(), reason)
        };
        Inputs {
            strategies,
            allocation,
            accounts: BTreeMap::new(),
            system,
            instruments: self.settings.instruments.clone(),
            marks,
            entries: BTreeMap::new(),
            returns,
            returns_unavailable,
            now,
        }
    }

    /// The account's inputs from its state (nothing reserved yet).
    fn account_inputs(state: &AccountState, now: DateTime<Utc>) -> AccountInputs {
        let mut a = AccountInputs::new(state.clone());
        // Today's P&L of a state of an earlier UTC day is not today's.
        if state.timestamp.date_naive() == now.date_naive() {
            a.pnl_today = state.strategy_pnl_today.clone();
        }
        a
    }

    /// Decide a batch (see the module docs): one outcome per message.
    async fn run_batch(&self, msgs: &[Delivery]) -> Vec<Outcome> {
        match AssertUnwindSafe(self.run_batch_inner(msgs))
            .catch_unwind()
            .await
        {
            Ok(outcomes) => outcomes,
            Err(_) => {
                // A transaction may have left its book copy half-updated.
                self.epoch.fetch_add(1, Ordering::AcqRel);
                tracing::error!("cerebro batch panicked; book copies dropped");
                msgs.iter()
                    .map(|_| Outcome::retry(Duration::from_secs(5), "handler panicked"))
                    .collect()
            }
        }
    }

    async fn run_batch_inner(&self, msgs: &[Delivery]) -> Vec<Outcome> {
        let mut results: Vec<Option<Result<Outcome, Fail>>> = vec![None; msgs.len()];
        let base_now = Utc::now();
        let mut jobs = Vec::with_capacity(msgs.len());
        for (at, d) in msgs.iter().enumerate() {
            match serde_json::from_slice::<StandardizedSignal>(&d.payload) {
                Ok(signal) => {
                    let last_chance = self.settings.max_deliver > 1
                        && d.deliveries as i64 >= self.settings.max_deliver - 1;
                    let expired = last_chance
                        || at_least(base_now, signal.received_at, self.settings.entry_wait);
                    jobs.push(Job {
                        at,
                        signal,
                        opts: DecideOptions {
                            entry_wait_expired: expired,
                        },
                        deliveries: d.deliveries,
                        last_chance,
                    });
                }
                Err(e) => results[at] = Some(Err(Fail::Reject("invalid_signal", e.to_string()))),
            }
        }
        // Round 1: unlinked signals, one group commit per account.
        let mut groups: BTreeMap<String, Vec<&Job>> = BTreeMap::new();
        let mut linked = Vec::new();
        {
            let live = self.live.read().unwrap_or_else(|p| p.into_inner());
            for job in &jobs {
                if job.signal.entry_signal_id.is_some() {
                    linked.push(job);
                } else if let Some(account) = live.routed_account(&job.signal.strategy_id) {
                    groups.entry(account).or_default().push(job);
                } else {
                    groups.entry(String::new()).or_default().push(job);
                }
            }
        }
        // Entries whose records round 2 reads from KV in this very batch:
        // those are stored before round 2 starts.
        let read_now: HashSet<&str> = linked
            .iter()
            .filter_map(|j| j.signal.entry_signal_id.as_deref())
            .collect();
        let read_now = &read_now;
        let commits = groups.into_iter().map(|(account, group)| async move {
            let r = if account.is_empty() {
                // Unknown strategy / no account: decided without a book.
                let inputs = self.base_inputs(Utc::now(), group.iter().map(|j| &j.signal));
                group
                    .iter()
                    .map(|j| self.finish(&j.signal, decide_with(&j.signal, &inputs, j.opts), j))
                    .collect()
            } else {
                self.group_commit(&account, &group, read_now).await
            };
            (group, r)
        });
        for (group, r) in futures::future::join_all(commits).await {
            for (job, r) in group.into_iter().zip(r) {
                results[job.at] = Some(r);
            }
        }
        // Round 2: linked exits and cancels, after round 1's entry records.
        // Every record round 2 needs, in one batched read where possible.
        let keys: Vec<String> = linked
            .iter()
            .filter_map(|j| j.signal.entry_signal_id.as_deref())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .flat_map(|id| [entry_key(id), exits_key(id)])
            .collect();
        let batch = self.read_many(&keys).await;
        let batch = &batch;
        let reads = linked.into_iter().map(|job| async move {
            let entry_id = job.signal.entry_signal_id.as_deref().unwrap_or_default();
            let (ek, xk) = (entry_key(entry_id), exits_key(entry_id));
            let (entry, exits) = match batch {
                Some(Ok(found)) => (
                    decode_record::<StoredEntry>(&ek, found.get(&ek)),
                    decode_record::<ExitProgress>(&xk, found.get(&xk)),
                ),
                Some(Err(f)) => (Err(f.clone()), Err(f.clone())),
                None => futures::join!(
                    self.read_json::<StoredEntry>(&ek),
                    self.read_json::<ExitProgress>(&xk),
                ),
            };
            let read = match (entry, exits) {
                (Ok(e), Ok(x)) => Ok((e.map(|(_, s)| s), x)),
                (Err(f), _) | (_, Err(f)) => Err(f),
            };
            (job, read)
        });
        let mut by_account: BTreeMap<String, Vec<Linked<'_>>> = BTreeMap::new();
        for (job, read) in futures::future::join_all(reads).await {
            match read {
                Ok((entry, exits)) => {
                    // An exit received before its entry was decided (both
                    // waited in a backlog) waits for the fill from the
                    // decision on, not from its own receipt.
                    let mut opts = job.opts;
                    if let Some(at) = entry.as_ref().and_then(|e| e.decided_at) {
                        if !job.last_chance && at > job.signal.received_at {
                            opts.entry_wait_expired =
                                at_least(base_now, at, self.settings.entry_wait);
                        }
                    }
                    let account = entry.as_ref().map(|e| e.account.clone()).or_else(|| {
                        self.live
                            .read()
                            .unwrap_or_else(|p| p.into_inner())
                            .routed_account(&job.signal.strategy_id)
                    });
                    by_account
                        .entry(account.unwrap_or_default())
                        .or_default()
                        .push(Linked {
                            job,
                            opts,
                            entry,
                            exits,
                        });
                }
                Err(f) => results[job.at] = Some(Err(f)),
            }
        }
        let rounds = by_account.into_iter().map(|(account, list)| async move {
            let mut out = Vec::with_capacity(list.len());
            if account.is_empty() {
                let inputs = self.base_inputs(Utc::now(), list.iter().map(|l| &l.job.signal));
                for l in list {
                    let j = l.job;
                    let r = self.finish(&j.signal, decide_with(&j.signal, &inputs, l.opts), j);
                    out.push((j.at, r));
                }
                return out;
            }
            let lock = self.book_lock(&account);
            let mut copy = lock.lock().await;
            out.extend(self.decide_linked(&account, &mut copy, list).await);
            out
        });
        for list in futures::future::join_all(rounds).await {
            for (at, r) in list {
                results[at] = Some(r);
            }
        }
        results
            .into_iter()
            .map(|r| outcome_of(r.unwrap_or_else(|| Err(Fail::Retry("not decided".into())))))
            .collect()
    }

    /// Decide `jobs` (unlinked signals of `account`, in order) against this
    /// replica's copy of the book, each seeing the reservations of the ones
    /// before it, and write the book with one compare-and-set if anything
    /// was reserved; on a conflict the book is re-read and the whole group
    /// decided again. Same guarantees as one transaction per signal (see the
    /// module docs).
    ///
    /// Each approved entry's record (`entries.<signal_id>`) goes out as the
    /// first output of its signal: the consume loop publishes it together
    /// with the decision and orders (one round trip for all, instead of the
    /// record's own before them) and acks the signal only once every one of
    /// them is stored; if any is not, the signal is redelivered, finds its
    /// reservation and publishes them again. An exit or cancel that meets
    /// an entry whose record is not stored yet defers
    /// ([`crate::DeferReason::EntryUnknown`]). Records that round 2 of this
    /// same batch reads (`read_now`: entries with a linked signal in the
    /// batch), and every record when the bucket's subjects cannot be built
    /// here (a JetStream API prefix), are stored before the outcomes are
    /// returned, as before.
    async fn group_commit(
        &self,
        account: &str,
        jobs: &[&Job],
        read_now: &HashSet<&str>,
    ) -> Vec<Result<Outcome, Fail>> {
        let lock = self.book_lock(account);
        let mut copy = lock.lock().await;
        let committed = self.group_commit_locked(account, &mut copy, jobs).await;
        if committed.is_err() {
            // It may hold reservations that were never written.
            copy.epoch = None;
        }
        drop(copy);
        let (decided, records) = match committed {
            Ok(x) => x,
            Err(f) => return jobs.iter().map(|_| Err(f.clone())).collect(),
        };
        let mut puts: Vec<futures::future::BoxFuture<'_, Result<(), Fail>>> = Vec::new();
        let mut with_outputs = Vec::with_capacity(jobs.len());
        for ((job, record), out) in jobs.iter().zip(records).zip(&decided) {
            let Some((key, body)) = record else {
                with_outputs.push(None);
                continue;
            };
            let store = &self.stores.state;
            // First writer wins, except over a rejection: a redelivery that
            // is approved where the first delivery was rejected (its record
            // stored, its decision not) is the decision whose orders go out.
            let approved = matches!(out, DecisionOutput::Decided(d) if d.record.decision != Decision::Rejected);
            if job.deliveries > 1 && approved {
                match self.read_json::<StoredEntry>(&key).await {
                    Ok(Some((rev, old))) if old.decision == Decision::Rejected => {
                        puts.push(Box::pin(async move {
                            store
                                .update(key, body.into(), rev)
                                .await
                                .map(|_| ())
                                .map_err(retry)
                        }));
                        with_outputs.push(None);
                        continue;
                    }
                    Ok(_) => {}
                    Err(f) => return jobs.iter().map(|_| Err(f.clone())).collect(),
                }
            }
            let read_in_batch = read_now.contains(job.signal.signal_id.as_str());
            match kv_put_subject(store, &key) {
                Some(subject) if !read_in_batch => {
                    with_outputs.push(Some(entry_record_output(subject, &key, body)));
                }
                _ => {
                    puts.push(Box::pin(async move {
                        match store.create(key, body.into()).await {
                            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
                            r => r.map(|_| ()).map_err(retry),
                        }
                    }));
                    with_outputs.push(None);
                }
            }
        }
        for r in futures::future::join_all(puts).await {
            if let Err(f) = r {
                return jobs.iter().map(|_| Err(f.clone())).collect();
            }
        }
        jobs.iter()
            .zip(decided)
            .zip(with_outputs)
            .map(|((job, out), record)| {
                let mut r = self.finish(&job.signal, out, job);
                if let (Ok(Outcome::Ok(outs)), Some(record)) = (&mut r, record) {
                    outs.insert(0, record);
                }
                r
            })
            .collect()
    }

    /// The transaction of [`Cerebro::group_commit`]: the decisions and the
    /// entry records to store.
    #[allow(clippy::type_complexity)]
    async fn group_commit_locked(
        &self,
        account: &str,
        copy: &mut BookCopy,
        jobs: &[&Job],
    ) -> Result<(Vec<DecisionOutput>, Vec<Option<(String, Vec<u8>)>>), Fail> {
        let rules = SettleRules::of(&self.settings);
        // Set when the book could not take this batch's entries: decide
        // again with the book's size as the limit.
        let mut book_full = false;
        for _ in 0..self.settings.cas_attempts {
            self.ensure_loaded(account, copy).await?;
            let now = Utc::now();
            let state = self.state_of(account);
            let mut inputs = self.base_inputs(now, jobs.iter().map(|j| &j.signal));
            // Reconcile once, sum once; the redelivered signals' own
            // earlier entries aside.
            let mut short = Vec::new();
            let (changed, mut totals, mut own, mut pending) = {
                let ended = self.ended.read().unwrap_or_else(|p| p.into_inner());
                let fills = self.fills.read().unwrap_or_else(|p| p.into_inner());
                let ev = self.evidence(state.as_deref(), &ended, &fills, now);
                let changed = copy.book.reconcile_noting(&ev, &rules, &mut short);
                let totals = copy.book.reserved(&ev, &rules, None);
                let own: HashMap<String, (String, Reservation)> = jobs
                    .iter()
                    .filter_map(|j| {
                        let sid = &j.signal.signal_id;
                        let h = copy.book.held.get(sid)?;
                        Some((
                            sid.clone(),
                            (h.strategy_id.clone(), h.reservation(&ev, &rules)),
                        ))
                    })
                    .collect();
                let strategies: HashSet<&str> =
                    jobs.iter().map(|j| j.signal.strategy_id.as_str()).collect();
                let pending = copy.book.pending_units(&ev, &rules, &strategies);
                (changed, totals, own, pending)
            };
            self.note_short_ends(copy, &short).await?;
            copy.dirty |= changed;
            if let Some(st) = &state {
                inputs
                    .accounts
                    .insert(account.to_string(), Self::account_inputs(st, now));
            }
            let max_entries = self.settings.reservation_max_entries;
            // Size of the book's JSON as last read / written: releases since
            // then make it an overestimate, measured once when it matters.
            let mut bytes = copy.bytes;
            let mut measured = !copy.dirty;
            let mut full = book_full;
            let mut wrote = false;
            let mut decided = Vec::with_capacity(jobs.len());
            for job in jobs {
                let signal = &job.signal;
                let sid = signal.signal_id.as_str();
                let mut decide =
                    |full: bool,
                     book: &ReservationBook,
                     totals: &BTreeMap<String, Reservation>,
                     own: Option<&(String, Reservation)>,
                     pending: &HashMap<String, Vec<(String, PendingUnits)>>| {
                        if let Some(a) = inputs.accounts.get_mut(account) {
                            a.reserved = without(totals, own);
                            a.in_flight = book.in_flight(Some(sid));
                            a.max_in_flight = Some(if full { a.in_flight } else { max_entries });
                            a.pending = pending_for(pending, signal);
                        }
                        decide_with(signal, &inputs, job.opts)
                    };
                let mut out = decide(full, &copy.book, &totals, own.get(sid), &pending);
                if let DecisionOutput::Decided(d) = &out {
                    if reserves(d) {
                        let held = held_of(signal, d, now);
                        let keep_old = copy
                            .book
                            .held
                            .get(sid)
                            .is_some_and(|old| old.margin() >= held.margin());
                        if !keep_old {
                            // A map entry costs key + value + 4 bytes.
                            let size =
                                serde_json::to_vec(&held).map_err(retry)?.len() + sid.len() + 8;
                            if bytes + size > MAX_BOOK_BYTES && !measured {
                                measured = true;
                                bytes = serde_json::to_vec(&copy.book).map_err(retry)?.len();
                            }
                            if bytes + size > MAX_BOOK_BYTES && !full {
                                tracing::warn!(
                                    %account,
                                    entries = copy.book.held.len(),
                                    bytes,
                                    "reservation book full"
                                );
                                full = true;
                                out = decide(full, &copy.book, &totals, own.get(sid), &pending);
                            } else {
                                bytes += size;
                                let add = held.full_reservation();
                                if let Some((strategy, old)) = own.get(sid) {
                                    if let Some(t) = totals.get_mut(strategy) {
                                        sub_from(t, old);
                                    }
                                }
                                match totals.get_mut(&held.strategy_id) {
                                    Some(t) => add_to(t, &add),
                                    None => {
                                        totals.insert(held.strategy_id.clone(), add);
                                    }
                                }
                                own.insert(sid.to_string(), (held.strategy_id.clone(), add));
                                let units = pending.entry(held.strategy_id.clone()).or_default();
                                units.retain(|(s, _)| s != sid);
                                units.extend(
                                    held.pending_units(None)
                                        .into_iter()
                                        .map(|p| (sid.to_string(), p)),
                                );
                                copy.book.held.insert(sid.to_string(), held);
                                wrote = true;
                            }
                        }
                    }
                }
                decided.push(out);
            }
            if wrote {
                let body = serde_json::to_vec(&copy.book).map_err(|e| {
                    copy.epoch = None;
                    retry(e)
                })?;
                if body.len() > MAX_BOOK_BYTES && !book_full {
                    // The estimate missed: decide again, nothing added.
                    copy.epoch = None;
                    book_full = true;
                    continue;
                }
                if !self.write_book(account, copy, body).await? {
                    continue;
                }
            }
            let mut records = Vec::with_capacity(jobs.len());
            for (job, out) in jobs.iter().zip(&decided) {
                records.push(None);
                let DecisionOutput::Decided(d) = out else {
                    continue;
                };
                if d.record.action != Some(SignalAction::Entry) {
                    continue;
                }
                let sid = &job.signal.signal_id;
                let se = StoredEntry {
                    strategy_id: job.signal.strategy_id.clone(),
                    account: account.to_string(),
                    decision: d.record.decision,
                    legs: entry_legs(&job.signal, d),
                    book_revision: copy
                        .book
                        .held
                        .contains_key(sid)
                        .then_some(copy.rev)
                        .flatten(),
                    decided_at: Some(now),
                    settled: false,
                    folded_exits: vec![],
                };
                if let Some(slot) = records.last_mut() {
                    *slot = Some((entry_key(sid), serde_json::to_vec(&se).map_err(retry)?));
                }
            }
            return Ok((decided, records));
        }
        Err(Fail::Retry("reservation compare-and-set contention".into()))
    }

    /// Decide the linked exits / cancels of `account` (in order) under its
    /// lock: one reconciliation of the copy for all of them, each exit's
    /// entry with its fill progress from the order ends, the state and the
    /// copy, then every exit-progress compare-and-set at once (one per
    /// entry per pass; a second exit of the same entry, or one that lost its
    /// compare-and-set, is decided again in the next pass on the re-read
    /// record).
    async fn decide_linked(
        &self,
        account: &str,
        copy: &mut BookCopy,
        list: Vec<Linked<'_>>,
    ) -> Vec<(usize, Result<Outcome, Fail>)> {
        let rules = SettleRules::of(&self.settings);
        let mut out = Vec::with_capacity(list.len());
        let mut pending = list;
        let mut reread_book = true;
        for _ in 0..self.settings.cas_attempts {
            if pending.is_empty() {
                return out;
            }
            if let Err(f) = self.ensure_loaded(account, copy).await {
                out.extend(pending.iter().map(|l| (l.job.at, Err(f.clone()))));
                return out;
            }
            // An entry missing from a copy older than its reservation may
            // just not be in the copy yet: read the book once more.
            let stale = pending.iter().any(|l| {
                let Some(se) = &l.entry else {
                    return false;
                };
                let id = l.job.signal.entry_signal_id.as_deref().unwrap_or_default();
                let older = match (se.book_revision, copy.rev) {
                    (Some(want), Some(have)) => have < want,
                    (Some(_), None) => true,
                    // Nothing reserved (or an older record): look once
                    // unless the entry never opened.
                    (None, _) => se.decision != Decision::Rejected && !se.legs.is_empty(),
                };
                older && !copy.book.held.contains_key(id)
            });
            if stale && reread_book {
                reread_book = false;
                copy.epoch = None;
                continue;
            }
            // This pass: the first pending exit of each entry.
            let mut seen = HashSet::new();
            let (now_list, later): (Vec<_>, Vec<_>) = pending.into_iter().partition(|l| {
                seen.insert(l.job.signal.entry_signal_id.clone().unwrap_or_default())
            });
            pending = later;
            let now = Utc::now();
            let state = self.state_of(account);
            let mut inputs = self.base_inputs(now, now_list.iter().map(|l| &l.job.signal));
            let mut short = Vec::new();
            let records: Vec<Option<EntryRecord>> = {
                let ended = self.ended.read().unwrap_or_else(|p| p.into_inner());
                let fills = self.fills.read().unwrap_or_else(|p| p.into_inner());
                let ev = self.evidence(state.as_deref(), &ended, &fills, now);
                copy.dirty |= copy.book.reconcile_noting(&ev, &rules, &mut short);
                if let Some(st) = &state {
                    let mut a = Self::account_inputs(st, now);
                    // Exits reserve nothing (their holds carry no margin).
                    a.reserved = copy.book.reserved(&ev, &rules, None);
                    a.in_flight = copy.book.in_flight(None);
                    a.max_in_flight = Some(self.settings.reservation_max_entries);
                    inputs.accounts.insert(account.to_string(), a);
                }
                now_list
                    .iter()
                    .map(|l| {
                        let se = l.entry.as_ref()?;
                        let id = l.job.signal.entry_signal_id.as_deref().unwrap_or_default();
                        let exits = l
                            .exits
                            .as_ref()
                            .map(|(_, p)| p)
                            .cloned()
                            .unwrap_or_default();
                        Some(entry_with_progress(
                            id,
                            se,
                            copy.book.held.get(id),
                            &ev,
                            &rules,
                            &exits,
                            &l.job.signal.signal_id,
                        ))
                    })
                    .collect()
            };
            if let Err(f) = self.note_short_ends(copy, &short).await {
                out.extend(now_list.iter().map(|l| (l.job.at, Err(f.clone()))));
                out.extend(pending.iter().map(|l| (l.job.at, Err(f.clone()))));
                return out;
            }
            // Decide each; collect the exit-progress writes.
            let mut decided = Vec::with_capacity(now_list.len());
            for (l, rec) in now_list.into_iter().zip(records) {
                let signal = &l.job.signal;
                let id = signal.entry_signal_id.clone().unwrap_or_default();
                inputs.entries.clear();
                if let Some(rec) = rec {
                    inputs.entries.insert(id.clone(), rec);
                }
                let d = decide_with(signal, &inputs, l.opts);
                let mut write = None;
                let mut noted = HashSet::new();
                if let (DecisionOutput::Decided(dd), Some(_)) = (&d, &l.entry) {
                    if !dd.orders.is_empty() {
                        let mut takes = exit_takes(signal, dd);
                        let (rev, mut progress) = match &l.exits {
                            Some((r, p)) => (Some(*r), p.clone()),
                            None => (None, ExitProgress::default()),
                        };
                        // A redelivery keeps the stored take of each of its
                        // orders (what was noted of its end, and its quantity:
                        // the venue has the first order under that id, a
                        // re-sent one is a duplicate).
                        if let Some(old) = progress.exits.get(&signal.signal_id) {
                            for t in &mut takes {
                                if let Some(o) = old
                                    .iter()
                                    .find(|o| o.order_id.is_some() && o.order_id == t.order_id)
                                {
                                    *t = o.clone();
                                }
                                if let (Some(id), Some(_)) = (&t.order_id, t.filled) {
                                    noted.insert(id.clone());
                                }
                            }
                        }
                        if progress.exits.get(&signal.signal_id) != Some(&takes) {
                            progress.exits.insert(signal.signal_id.clone(), takes);
                            match serde_json::to_vec(&progress) {
                                Ok(body) => write = Some((exits_key(&id), rev, body)),
                                Err(e) => {
                                    out.push((l.job.at, Err(retry(e))));
                                    continue;
                                }
                            }
                        }
                    }
                }
                decided.push((l, d, write, noted));
            }
            let cases = decided.iter().map(|(_, _, w, _)| async move {
                match w {
                    Some((key, rev, body)) => {
                        self.cas(key, *rev, body.clone()).await.map(|r| r.is_some())
                    }
                    None => Ok(true),
                }
            });
            let results = futures::future::join_all(cases).await;
            let mut lost = Vec::new();
            let mut won = Vec::new();
            let mut new_holds: Vec<(String, Held)> = Vec::new();
            for ((l, d, _, noted), r) in decided.into_iter().zip(results) {
                match r {
                    Ok(true) => {
                        // Its closing orders are held until their ends are
                        // known (a redelivery keeps the first hold, and
                        // holds no order whose end is known or noted).
                        if let (DecisionOutput::Decided(dd), Some(_)) = (&d, &l.entry) {
                            let sid = &l.job.signal.signal_id;
                            if self.settings.order_events
                                && !dd.orders.is_empty()
                                && !copy.book.held.contains_key(sid)
                            {
                                let id = l.job.signal.entry_signal_id.as_deref().unwrap_or("");
                                let mut h = held_exit(&l.job.signal, id, dd, now);
                                {
                                    let ended =
                                        self.ended.read().unwrap_or_else(|p| p.into_inner());
                                    h.legs.retain(|x| {
                                        !noted.contains(&x.order_id)
                                            && !ended.contains_key(&x.order_id)
                                    });
                                }
                                if !h.legs.is_empty() {
                                    copy.book.held.insert(sid.clone(), h.clone());
                                    new_holds.push((sid.clone(), h));
                                }
                            }
                        }
                        won.push((l, d));
                    }
                    Ok(false) => lost.push(l),
                    Err(f) => out.push((l.job.at, Err(f))),
                }
            }
            // The holds are written before any closing order goes out; a
            // failed write hands the exits back (their redelivery finds
            // their progress stored and holds them again).
            let mut held = Ok(());
            if !new_holds.is_empty() {
                held = Err(Fail::Retry(
                    "reservation compare-and-set contention (exit holds)".into(),
                ));
                // A lost compare-and-set re-reads the book and adds the
                // holds again (they depend on nothing else in it).
                for _ in 0..self.settings.cas_attempts.max(1) {
                    if let Err(f) = self.ensure_loaded(account, copy).await {
                        held = Err(f);
                        break;
                    }
                    for (sid, h) in &new_holds {
                        copy.book
                            .held
                            .entry(sid.clone())
                            .or_insert_with(|| h.clone());
                    }
                    copy.dirty = true;
                    let body = match serde_json::to_vec(&copy.book) {
                        Ok(b) => b,
                        Err(e) => {
                            copy.epoch = None;
                            held = Err(retry(e));
                            break;
                        }
                    };
                    // Reducing risk is never refused: a book too full for
                    // the holds sends the exits without them (a short end
                    // then goes unnoted).
                    if body.len() > MAX_BOOK_BYTES {
                        tracing::warn!(
                            %account,
                            bytes = body.len(),
                            exits = new_holds.len(),
                            "reservation book full: exits go out without holds"
                        );
                        copy.epoch = None;
                        held = Ok(());
                        break;
                    }
                    match self.write_book(account, copy, body).await {
                        Ok(true) => {
                            held = Ok(());
                            break;
                        }
                        Ok(false) => continue,
                        Err(f) => {
                            held = Err(f);
                            break;
                        }
                    }
                }
            }
            for (l, d) in won {
                match &held {
                    Ok(()) => out.push((l.job.at, self.finish(&l.job.signal, d, l.job))),
                    Err(f) => out.push((l.job.at, Err(f.clone()))),
                }
            }
            // Lost a compare-and-set: re-read the record, decide again.
            let rereads = lost.into_iter().map(|mut l| async move {
                let id = l.job.signal.entry_signal_id.as_deref().unwrap_or_default();
                match self.read_json::<ExitProgress>(&exits_key(id)).await {
                    Ok(x) => {
                        l.exits = x;
                        Ok(l)
                    }
                    Err(f) => Err((l.job.at, f)),
                }
            });
            for r in futures::future::join_all(rereads).await {
                match r {
                    Ok(l) => pending.push(l),
                    Err((at, f)) => out.push((at, Err(f))),
                }
            }
            pending.sort_by_key(|l| l.job.at);
        }
        let f = Fail::Retry("exit progress compare-and-set contention".into());
        out.extend(pending.iter().map(|l| (l.job.at, Err(f.clone()))));
        out
    }

    fn finish(
        &self,
        signal: &StandardizedSignal,
        out: DecisionOutput,
        job: &Job,
    ) -> Result<Outcome, Fail> {
        match out {
            DecisionOutput::Defer { reason, .. } => Ok(Outcome::retry(
                self.settings.defer_delay(job.deliveries),
                format!("deferred: {reason}"),
            )),
            DecisionOutput::Decided(d) => {
                let outs = self.outputs(signal, &d)?;
                self.metrics.decided(&d);
                Ok(Outcome::Ok(outs))
            }
        }
    }

    fn outputs(&self, signal: &StandardizedSignal, d: &Decided) -> Result<Vec<Outgoing>, Fail> {
        let bad = |e: mtx_subjects::token::TokenError| {
            Fail::Reject("invalid_subject_token", e.to_string())
        };
        let mut outs = Vec::with_capacity(1 + d.orders.len() + d.cancels.len());
        let body = serde_json::to_vec(&d.record).map_err(retry)?;
        outs.push(Outgoing::new(
            self.subjects
                .cerebro_decisions(signal.environment, &signal.strategy_id)
                .map_err(bad)?,
            decision_msg_id(&signal.signal_id),
            body,
        ));
        for o in &d.orders {
            outs.push(Outgoing::new(
                self.subjects.orders_new(&o.account).map_err(bad)?,
                o.order_id.clone(),
                serde_json::to_vec(o).map_err(retry)?,
            ));
        }
        for c in &d.cancels {
            outs.push(Outgoing::new(
                self.subjects.orders_cancel(&c.account).map_err(bad)?,
                cancel_msg_id(&signal.signal_id, &c.order_id),
                serde_json::to_vec(c).map_err(retry)?,
            ));
        }
        Ok(outs)
    }
}

fn held_of(signal: &StandardizedSignal, d: &Decided, now: DateTime<Utc>) -> Held {
    Held {
        strategy_id: signal.strategy_id.clone(),
        created_at: now,
        legs: d
            .orders
            .iter()
            .map(|o| {
                let ld = d.record.legs.iter().find(|l| l.leg == o.leg);
                HeldLeg {
                    order_id: o.order_id.clone(),
                    quantity: o.quantity,
                    margin: ld.map(|l| l.margin_required).unwrap_or_default(),
                    notional: ld.map(|l| l.notional).unwrap_or_default(),
                    seen: false,
                    position: Some((
                        o.instrument.clone(),
                        position_direction(SignalAction::Entry, o.side),
                    )),
                }
            })
            .collect(),
        exit_of: None,
    }
}

/// What the book holds of a linked exit: its closing orders, reserving
/// nothing, until their ends are known (see [`Held::exit_of`]).
fn held_exit(signal: &StandardizedSignal, entry_id: &str, d: &Decided, now: DateTime<Utc>) -> Held {
    Held {
        strategy_id: signal.strategy_id.clone(),
        created_at: now,
        legs: d
            .orders
            .iter()
            .map(|o| HeldLeg {
                order_id: o.order_id.clone(),
                quantity: o.quantity,
                margin: Decimal::ZERO,
                notional: Decimal::ZERO,
                seen: false,
                position: None,
            })
            .collect(),
        exit_of: Some(entry_id.to_string()),
    }
}

fn entry_legs(signal: &StandardizedSignal, d: &Decided) -> Vec<EntryLeg> {
    d.orders
        .iter()
        .map(|o| EntryLeg {
            leg: o.leg,
            order_id: o.order_id.clone(),
            instrument: o.instrument.clone(),
            instrument_type: o.instrument_type,
            direction: o.direction,
            sender_quantity: signal
                .legs
                .get(o.leg as usize)
                .map(|l| l.quantity)
                .unwrap_or_default(),
            ordered_quantity: o.quantity,
            filled_quantity: Decimal::ZERO,
            closed_quantity: Decimal::ZERO,
            sender_quantity_exited: Decimal::ZERO,
            status: OrderStatus::Pending,
        })
        .collect()
}

fn exit_takes(signal: &StandardizedSignal, d: &Decided) -> Vec<ExitTake> {
    d.orders
        .iter()
        .map(|o| ExitTake {
            instrument: o.instrument.clone(),
            direction: o.direction,
            quantity: o.quantity,
            sender_quantity: signal
                .legs
                .get(o.leg as usize)
                .map(|l| l.quantity)
                .unwrap_or_default(),
            order_id: Some(o.order_id.clone()),
            filled: None,
        })
        .collect()
}

/// The entry's record with fill progress and what other exits (not
/// `this_exit`) already closed. A leg's fill: its terminal order event when
/// known (what the venue filled), else working in the state
/// (`quantity − remaining`), else its reservation settled or released
/// (filled), else nothing yet.
fn entry_with_progress(
    entry_id: &str,
    se: &StoredEntry,
    held: Option<&Held>,
    ev: &Evidence<'_>,
    rules: &SettleRules,
    exits: &ExitProgress,
    this_exit: &str,
) -> EntryRecord {
    let legs = se
        .legs
        .iter()
        .map(|l| {
            let held_leg = held.and_then(|h| {
                h.legs
                    .iter()
                    .find(|x| x.order_id == l.order_id)
                    .map(|x| (x, h.created_at))
            });
            let ended = ev.ended.get(&l.order_id);
            let working = ev.working(&l.order_id);
            let (filled, status) = match (ended, working, held_leg) {
                (Some(e), _, _) => {
                    let f = e.filled.max(Decimal::ZERO).min(l.ordered_quantity);
                    (f, e.status)
                }
                (None, Some(remaining), _) => {
                    let f = (l.ordered_quantity - remaining).max(Decimal::ZERO);
                    let st = if f > Decimal::ZERO {
                        OrderStatus::PartiallyFilled
                    } else {
                        OrderStatus::Submitted
                    };
                    (f, st)
                }
                (None, None, Some((hl, created))) => match progress(hl, created, ev, rules) {
                    LegProgress::Settled => (l.ordered_quantity, OrderStatus::Filled),
                    _ => (Decimal::ZERO, OrderStatus::Pending),
                },
                // Released from the book with its end noted in the record
                // (it filled less than ordered).
                (None, None, None) if l.status.is_terminal() => {
                    (l.filled_quantity.min(l.ordered_quantity), l.status)
                }
                // Released from the book: settled.
                (None, None, None) => (l.ordered_quantity, OrderStatus::Filled),
            };
            // A settled record carries the exits folded into it.
            let (closed, sender_exited) = exits
                .exits
                .iter()
                .filter(|(k, _)| k.as_str() != this_exit && !se.folded_exits.contains(k))
                .flat_map(|(_, v)| v.iter())
                .filter(|t| t.instrument == l.instrument && t.direction == l.direction)
                .fold(
                    (l.closed_quantity, l.sender_quantity_exited),
                    |(q, s), t| (q + t.closed(Some(ev.ended)), s + t.sender_quantity),
                );
            EntryLeg {
                filled_quantity: filled,
                closed_quantity: closed,
                sender_quantity_exited: sender_exited,
                status,
                ..l.clone()
            }
        })
        .collect();
    EntryRecord {
        signal_id: entry_id.to_string(),
        strategy_id: se.strategy_id.clone(),
        account: se.account.clone(),
        decision: se.decision,
        legs,
    }
}

impl Handler for Cerebro {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        self.run_batch(std::slice::from_ref(msg))
            .await
            .pop()
            .unwrap_or_else(|| Outcome::retry(Duration::from_millis(500), "no outcome"))
    }

    /// Batches are independent: one's transactions run while the other's
    /// outputs are published (the per-account mutex orders them).
    fn batches_in_flight(&self) -> usize {
        2
    }

    async fn handle_batch(&self, msgs: &[Delivery], _concurrency: usize) -> Vec<Outcome> {
        self.run_batch(msgs).await
    }
}

/// Start Cerebro in `process`: watchers plus the consume loop on `cerebro`,
/// with the process config's `[cerebro]` section.
pub async fn spawn(process: &mut Process) -> Result<Arc<Cerebro>, SpawnError> {
    let settings = Settings::from_config(&process.config);
    spawn_with(process, settings).await
}

/// [`spawn`] with explicit settings (tests).
pub async fn spawn_with(
    process: &mut Process,
    settings: Settings,
) -> Result<Arc<Cerebro>, SpawnError> {
    let c = Cerebro::start(
        &process.js,
        process.subjects.clone(),
        &process.topology,
        settings,
        &process.registry,
        process.shutdown.clone(),
    )
    .await
    .map_err(SpawnError::Start)?;
    process.spawn_consumer(STAGE, DURABLE, Arc::clone(&c))?;
    Ok(c)
}

/// Why Cerebro cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// Buckets / watchers / metrics unavailable.
    #[error("cerebro: {0}")]
    Start(String),
    /// The consumer is not in the topology.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use mtx_schemas::order::OpenOrder;
    use mtx_schemas::{OrderType, Side};
    use rust_decimal_macros::dec;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 5, 15, 0, 0).unwrap() + chrono::Duration::seconds(secs)
    }

    fn rules() -> SettleRules {
        SettleRules {
            unbooked_grace: chrono::Duration::seconds(30),
            booking_grace: chrono::Duration::seconds(2),
            max_age: chrono::Duration::hours(1),
        }
    }

    fn book(ids: &[&str]) -> ReservationBook {
        ReservationBook {
            held: ids
                .iter()
                .map(|id| {
                    (
                        id.to_string(),
                        Held {
                            strategy_id: "s".into(),
                            created_at: t(0),
                            legs: vec![HeldLeg {
                                order_id: format!("ord_{id}"),
                                quantity: dec!(10),
                                margin: dec!(400),
                                notional: dec!(1600),
                                seen: false,
                                position: None,
                            }],
                            exit_of: None,
                        },
                    )
                })
                .collect(),
        }
    }

    fn state(at: i64, working: &[(&str, Decimal)]) -> AccountState {
        AccountState {
            account: "A".into(),
            timestamp: t(at),
            equity: dec!(1000000),
            cash_balance: dec!(1000000),
            margin_used: Decimal::ZERO,
            margin_available: dec!(1000000),
            unrealized_pnl: Decimal::ZERO,
            realized_pnl: Decimal::ZERO,
            commissions: Decimal::ZERO,
            open_positions: vec![],
            open_orders: working
                .iter()
                .map(|(id, q)| OpenOrder {
                    order_id: id.to_string(),
                    instrument: "AAPL".into(),
                    side: Side::Buy,
                    quantity: *q,
                    order_type: OrderType::Limit,
                    price: Some(dec!(160)),
                })
                .collect(),
            deployed_capital: BTreeMap::new(),
            strategy_pnl_today: BTreeMap::new(),
            executions_seq: None,
        }
    }

    /// `ord_a` ended: `filled` of it, at `at`, with `status`.
    fn ended_a(
        filled: Decimal,
        at: DateTime<Utc>,
        status: OrderStatus,
    ) -> HashMap<String, EndedOrder> {
        HashMap::from([(
            "ord_a".to_string(),
            EndedOrder {
                filled,
                at,
                status,
                learned: at,
            },
        )])
    }

    fn reconcile(
        b: &mut ReservationBook,
        st: Option<&AccountState>,
        ended: &HashMap<String, EndedOrder>,
        now: i64,
    ) -> bool {
        b.reconcile(&Evidence::new(st, ended, t(now)), &rules())
    }

    /// `book(ids)` with every hold an exit of entry `e`.
    fn exit_book(ids: &[&str]) -> ReservationBook {
        let mut b = book(ids);
        for h in b.held.values_mut() {
            h.exit_of = Some("e".into());
            h.legs[0].margin = Decimal::ZERO;
            h.legs[0].notional = Decimal::ZERO;
        }
        b
    }

    #[test]
    fn an_exit_hold_goes_only_once_its_end_is_known_and_notes_a_short_one() {
        let none = HashMap::new();
        // Gone from a state far newer than the hold: no time rule applies.
        let mut b = exit_book(&["a"]);
        assert!(!reconcile(&mut b, Some(&state(600, &[])), &none, 600));
        assert_eq!(b.held.len(), 1);
        assert_eq!(b.in_flight(None), 0, "exit holds are not entries in flight");
        // Working: seen, kept, also beyond max_age (a good-till-cancelled exit).
        let working = [("ord_a", dec!(10))];
        assert!(reconcile(&mut b, Some(&state(601, &working)), &none, 601));
        assert!(b.held["a"].legs[0].seen);
        assert!(!reconcile(
            &mut b,
            Some(&state(7200, &working)),
            &none,
            7200
        ));
        assert_eq!(b.held.len(), 1);
        // Its end: dropped at once (nothing reserved, booking is moot), and
        // a short end is noted for the entry's exit progress.
        let mut short = Vec::new();
        let ended = ended_a(dec!(4), t(7201), OrderStatus::Cancelled);
        let st = state(7201, &working);
        let ev = Evidence::new(Some(&st), &ended, t(7201));
        assert!(b.reconcile_noting(&ev, &rules(), &mut short));
        assert!(b.held.is_empty());
        assert_eq!(short.len(), 1);
        assert_eq!(short[0].exit_of.as_deref(), Some("e"));
        assert_eq!(short[0].legs[0].1.filled, dec!(4));
        // A full fill is dropped without a note.
        let mut b = exit_book(&["a"]);
        let mut short = Vec::new();
        let ended = ended_a(dec!(10), t(5), OrderStatus::Filled);
        let ev = Evidence::new(None, &ended, t(5));
        assert!(b.reconcile_noting(&ev, &rules(), &mut short));
        assert!(b.held.is_empty() && short.is_empty());
        // Neither working nor ended past max_age: dropped, nothing to note.
        let mut b = exit_book(&["a"]);
        assert!(reconcile(&mut b, Some(&state(3600, &[])), &none, 3600));
        assert!(b.held.is_empty());
    }

    /// A two-leg exit: leg `ord_a` fills at once, leg `ord_b` (a resting
    /// LIMIT) works for minutes and is then cancelled with nothing filled.
    /// By then the end of `ord_a` is forgotten (`forget_after`, one minute
    /// by default), so the hold is neither "all ended" nor working: it
    /// stays until `max_age` and then goes without noting that `ord_b`
    /// closed nothing, and the exit counts as having sold all 10 of it.
    #[test]
    fn a_two_leg_exit_hold_notes_a_short_leg_that_ends_after_the_other_legs_end_is_forgotten() {
        let settings = Settings::default();
        let mut b = exit_book(&["x"]);
        let h = b.held.get_mut("x").unwrap();
        h.legs[0].order_id = "ord_a".into();
        let mut leg_b = h.legs[0].clone();
        leg_b.order_id = "ord_b".into();
        h.legs.push(leg_b);
        // ord_a fills in full at once; ord_b works.
        let mut ended = ended_a(dec!(10), t(1), OrderStatus::Filled);
        let working = [("ord_b", dec!(10))];
        let mut short = Vec::new();
        let st = state(2, &working);
        b.reconcile_noting(
            &Evidence::new(Some(&st), &ended, t(2)),
            &rules(),
            &mut short,
        );
        assert!(short.is_empty());
        assert_eq!(b.held.len(), 1);
        // Five minutes later (a janitor pass): ord_a's end is forgotten.
        forget_ended(&mut ended, &settings, t(300));
        assert!(ended.is_empty());
        // ord_b is cancelled, nothing filled.
        ended.insert(
            "ord_b".into(),
            EndedOrder {
                filled: Decimal::ZERO,
                at: t(301),
                status: OrderStatus::Cancelled,
                learned: t(301),
            },
        );
        let st = state(302, &[]);
        b.reconcile_noting(
            &Evidence::new(Some(&st), &ended, t(302)),
            &rules(),
            &mut short,
        );
        // An hour later ord_b's end is long forgotten too.
        forget_ended(&mut ended, &settings, t(3600));
        let st = state(3600, &[]);
        b.reconcile_noting(
            &Evidence::new(Some(&st), &ended, t(3600)),
            &rules(),
            &mut short,
        );
        assert!(b.held.is_empty());
        let noted: Vec<(String, Decimal)> = short
            .iter()
            .flat_map(|s| s.legs.iter().map(|(o, e)| (o.clone(), e.filled)))
            .collect();
        assert_eq!(
            noted,
            [("ord_b".to_string(), Decimal::ZERO)],
            "the cancelled leg's short end was never noted"
        );
    }

    #[test]
    fn an_order_ended_unfilled_releases_at_once() {
        let mut b = book(&["a", "b"]);
        let ended = ended_a(Decimal::ZERO, t(1), OrderStatus::Cancelled);
        assert!(reconcile(&mut b, None, &ended, 1));
        assert_eq!(b.held.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_fill_releases_once_a_state_booking_grace_newer_omits_it() {
        let mut b = book(&["a"]);
        let ended = ended_a(dec!(10), t(5), OrderStatus::Filled);
        assert!(!reconcile(&mut b, Some(&state(6, &[])), &ended, 6));
        // A stale state still listing it working: held (pro rata).
        assert!(reconcile(
            &mut b,
            Some(&state(8, &[("ord_a", dec!(4))])),
            &ended,
            8
        ));
        let st8 = state(8, &[("ord_a", dec!(4))]);
        let ev = Evidence::new(Some(&st8), &ended, t(8));
        assert_eq!(
            b.reserved(&ev, &rules(), None)["s"],
            Reservation {
                margin: dec!(160),
                notional: dec!(640)
            }
        );
        assert!(reconcile(&mut b, Some(&state(7, &[])), &ended, 9));
        assert!(b.held.is_empty());
    }

    #[test]
    fn a_fill_releases_as_soon_as_a_state_books_its_last_execution() {
        let mut b = book(&["a"]);
        let rules = rules();
        let ended = ended_a(dec!(10), t(5), OrderStatus::Filled);
        // Two partial fills, at stream sequences 40 and 42.
        let part = |q: Decimal, seq: u64| {
            HashMap::from([(
                "ord_a".to_string(),
                FillProgress {
                    quantity: q,
                    last_seq: seq,
                    at: t(5),
                    executions: vec![(seq, q)],
                },
            )])
        };
        let at_seq = |ts: i64, seq: Option<u64>| {
            let mut st = state(ts, &[]);
            st.executions_seq = seq;
            st
        };
        let settles = |b: &mut ReservationBook, st: &AccountState, fills: &HashMap<_, _>| {
            let ev = Evidence::new(Some(st), &ended, t(6)).with_fills(fills);
            b.reconcile(&ev, &rules);
            b.held.is_empty()
        };
        // Within the booking grace (state at 5 s, fill at 5 s): only proof releases.
        let one = part(dec!(4), 40);
        let both = part(dec!(10), 42);
        // The state has not processed the last execution yet: held.
        assert!(!settles(&mut b, &at_seq(5, Some(41)), &both));
        // Not all of the filled quantity seen on the feed yet: held.
        assert!(!settles(&mut b, &at_seq(5, Some(99)), &one));
        // A producer without the watermark: time rules only, held.
        assert!(!settles(&mut b, &at_seq(5, None), &both));
        // The state books the last execution: released at once.
        assert!(settles(&mut b, &at_seq(5, Some(42)), &both));
    }

    #[test]
    fn seen_then_gone_releases_and_the_fallback_grace_covers_the_rest() {
        let none = HashMap::new();
        let mut b = book(&["a", "b"]);
        // `a` is seen working; `b` never shows up.
        assert!(reconcile(
            &mut b,
            Some(&state(1, &[("ord_a", dec!(10))])),
            &none,
            1
        ));
        assert!(b.held["a"].legs[0].seen);
        // `a` gone: released; `b` waits for the fallback grace.
        assert!(reconcile(&mut b, Some(&state(2, &[])), &none, 2));
        assert_eq!(b.held.keys().collect::<Vec<_>>(), ["b"]);
        assert!(!reconcile(&mut b, Some(&state(29, &[])), &none, 29));
        assert!(reconcile(&mut b, Some(&state(30, &[])), &none, 30));
        assert!(b.held.is_empty());
    }

    #[test]
    fn the_max_age_prune_drops_whatever_the_state_says() {
        let none = HashMap::new();
        let mut b = book(&["a"]);
        let working = state(3599, &[("ord_a", dec!(10))]);
        assert!(reconcile(&mut b, Some(&working), &none, 3599));
        assert_eq!(b.held.len(), 1);
        assert!(reconcile(&mut b, Some(&working), &none, 3600));
        assert!(b.held.is_empty());
        // No state at all: the prune still applies.
        let mut b = book(&["a"]);
        assert!(!reconcile(&mut b, None, &none, 10));
        assert!(reconcile(&mut b, None, &none, 3600));
        assert!(b.held.is_empty());
    }

    #[test]
    fn settings_follow_the_cerebro_section_and_never_overflow() {
        let c = CerebroConfig {
            reservation_max_entries: 7,
            booking_grace_secs: u64::MAX,
            unbooked_grace_secs: u64::MAX,
            ..CerebroConfig::default()
        };
        let mut s = Settings::default();
        s.apply(&c);
        assert_eq!(s.reservation_max_entries, 7);
        assert_eq!(s.booking_grace, chrono::Duration::MAX);
        assert!(c.validate().is_err());
        // A grace past the end of time never settles (and never panics).
        let mut b = book(&["a"]);
        let ended = ended_a(dec!(10), t(5), OrderStatus::Filled);
        let r = SettleRules::of(&s);
        let st100 = state(100, &[]);
        let ev = Evidence::new(Some(&st100), &ended, t(100));
        assert!(!b.reconcile(&ev, &r));
    }

    #[test]
    fn deferred_signals_retry_fast_then_back_off() {
        let s = Settings::default();
        let ms = |n| s.defer_delay(n).as_millis();
        assert_eq!((ms(0), ms(1), ms(4)), (250, 250, 250));
        assert_eq!((ms(5), ms(6), ms(7), ms(8)), (4_000, 8_000, 16_000, 30_000));
        assert_eq!(ms(100), 30_000);
        // With max_deliver 10 the 9th delivery is decided: about a minute.
        let waited: u128 = (1..=8).map(ms).sum();
        assert_eq!(waited, 59_000);
    }

    #[test]
    fn an_exit_sees_its_entry_filled_from_the_terminal_event() {
        let se = StoredEntry {
            strategy_id: "s".into(),
            account: "A".into(),
            decision: Decision::Approved,
            legs: vec![EntryLeg {
                leg: 0,
                order_id: "ord_a".into(),
                instrument: "AAPL".into(),
                instrument_type: mtx_schemas::InstrumentType::Stock,
                direction: Direction::Long,
                sender_quantity: dec!(10),
                ordered_quantity: dec!(10),
                filled_quantity: Decimal::ZERO,
                closed_quantity: Decimal::ZERO,
                sender_quantity_exited: Decimal::ZERO,
                status: OrderStatus::Pending,
            }],
            book_revision: Some(7),
            decided_at: None,
            settled: false,
            folded_exits: vec![],
        };
        let b = book(&["a"]);
        let held = b.held.get("a");
        let none = HashMap::new();
        let leg = |ended: &HashMap<String, EndedOrder>, st: &AccountState| {
            let ev = Evidence::new(Some(st), ended, t(2));
            let r =
                entry_with_progress("a", &se, held, &ev, &rules(), &ExitProgress::default(), "x");
            (r.legs[0].filled_quantity, r.legs[0].status)
        };
        // Nothing known yet: pending (the exit waits).
        assert_eq!(
            leg(&none, &state(1, &[])),
            (Decimal::ZERO, OrderStatus::Pending)
        );
        // Working, 4 left.
        assert_eq!(
            leg(&none, &state(1, &[("ord_a", dec!(4))])),
            (dec!(6), OrderStatus::PartiallyFilled)
        );
        // The FILLED event: filled at once, no booking grace, even while a
        // stale state still lists the order working.
        let filled = ended_a(dec!(10), t(1), OrderStatus::Filled);
        assert_eq!(
            leg(&filled, &state(1, &[])),
            (dec!(10), OrderStatus::Filled)
        );
        assert_eq!(
            leg(&filled, &state(1, &[("ord_a", dec!(4))])),
            (dec!(10), OrderStatus::Filled)
        );
        // Cancelled after a partial fill: that part, no longer working.
        let partial = ended_a(dec!(3), t(1), OrderStatus::Cancelled);
        assert_eq!(
            leg(&partial, &state(1, &[])),
            (dec!(3), OrderStatus::Cancelled)
        );
    }

    #[test]
    fn running_totals_match_a_full_recount() {
        let mut b = book(&["a", "b", "c"]);
        let none = HashMap::new();
        let st = state(1, &[("ord_b", dec!(5))]);
        let ev = Evidence::new(Some(&st), &none, t(1));
        let mut totals = b.reserved(&ev, &rules(), None);
        assert_eq!(totals["s"].margin, dec!(1000));
        // Replace `c` with a bigger entry the way a group commit does.
        let own = b.held["c"].reservation(&ev, &rules());
        let mut bigger = b.held["c"].clone();
        bigger.legs[0].margin = dec!(900);
        sub_from(totals.get_mut("s").unwrap(), &own);
        let new = bigger.full_reservation();
        add_to(totals.get_mut("s").unwrap(), &new);
        b.held.insert("c".into(), bigger);
        assert_eq!(totals, b.reserved(&ev, &rules(), None));
        // A redelivery of `c` sees everything but its own entry.
        assert_eq!(
            without(&totals, Some(&("s".to_string(), new))),
            b.reserved(&ev, &rules(), Some("c"))
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's own error type
    fn the_cerebro_section_of_mtx_toml_and_env_reaches_the_settings() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "mtx.toml",
                "[cerebro]\nreservation_max_entries = 50\nbooking_grace_secs = 2\n",
            )?;
            jail.set_env("MTX_CEREBRO__RESERVATION_MAX_ENTRIES", "70");
            jail.set_env("MTX_CEREBRO__DEFER_RETRY_MS", "100");
            jail.set_env("MTX_CEREBRO__ENTRY_WAIT_SECS", "45");
            let cfg = mtx_runtime::Config::load(None).map_err(|e| e.to_string())?;
            let s = Settings::from_config(&cfg);
            assert_eq!(s.reservation_max_entries, 70, "env beats the file");
            assert_eq!(s.booking_grace, chrono::Duration::seconds(2));
            assert_eq!(s.entry_wait, chrono::Duration::seconds(45));
            assert_eq!(s.defer_delay(1), Duration::from_millis(100));
            assert_eq!(s.janitor_interval, Duration::from_secs(600));
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            jail.set_env("MTX_CEREBRO__DEFER_MAX_MS", "0");
            let e = mtx_runtime::Config::load(None).unwrap_err().to_string();
            assert_eq!(
                e,
                "config error: cerebro.defer_max_ms (MTX_CEREBRO__DEFER_MAX_MS): must be > 0"
            );
            Ok(())
        });
    }

    /// While the start-up replay of order events and executions runs, an
    /// order's end or fill may just not be known yet: no time rule settles
    /// a hold (it could be taken for filled in full when it ended short),
    /// while what the evidence proves still does.
    #[test]
    fn no_time_rule_settles_a_hold_while_the_evidence_is_replaying() {
        let none = HashMap::new();
        let fills = HashMap::new();
        let st = state(600, &[]);
        let mut b = book(&["a"]);
        let ev = Evidence::new(Some(&st), &none, t(600))
            .with_fills(&fills)
            .replaying(true);
        assert!(!b.reconcile(&ev, &rules()));
        assert_eq!(b.held.len(), 1, "settled by the time rule mid-replay");
        // An end without a fill is proof enough.
        let ended = ended_a(Decimal::ZERO, t(5), OrderStatus::Rejected);
        let ev = Evidence::new(Some(&st), &ended, t(600))
            .with_fills(&fills)
            .replaying(true);
        assert!(b.reconcile(&ev, &rules()));
        assert!(b.held.is_empty());
        // Replayed: the time rule applies again.
        let mut b = book(&["a"]);
        let ev = Evidence::new(Some(&st), &none, t(600)).with_fills(&fills);
        assert!(b.reconcile(&ev, &rules()));
    }

    /// A fill the executions feed saw but the state's `executions_seq`
    /// does not cover yet is provably unbooked: no time rule releases its
    /// margin (the accounts stage's executions consumer lags its
    /// order-events one), however much newer the state. The old rule
    /// released it `booking_grace` after the fill, counting it nowhere.
    #[test]
    fn a_fill_the_state_provably_has_not_booked_is_not_released_by_the_time_rules() {
        let mut b = book(&["a"]);
        let fills = HashMap::from([(
            "ord_a".to_string(),
            FillProgress {
                quantity: dec!(10),
                last_seq: 42,
                at: t(5),
                executions: vec![(42, dec!(10))],
            },
        )]);
        let ended = ended_a(dec!(10), t(5), OrderStatus::Filled);
        let at = |secs: i64, seq: u64| {
            let mut st = state(secs, &[]);
            st.executions_seq = Some(seq);
            st
        };
        // Far past booking_grace (2 s) and unbooked_grace (30 s).
        let st = at(600, 41);
        let ev = Evidence::new(Some(&st), &ended, t(600)).with_fills(&fills);
        assert!(!b.reconcile(&ev, &rules()));
        assert_eq!(b.held.len(), 1, "released before its fill is booked");
        assert_eq!(b.reserved(&ev, &rules(), None)["s"].margin, dec!(400));
        // Booked: released.
        let st = at(601, 42);
        let ev = Evidence::new(Some(&st), &ended, t(601)).with_fills(&fills);
        assert!(b.reconcile(&ev, &rules()));
        assert!(b.held.is_empty());
        // Without the feed's record of it (forgotten), the time rules apply.
        let mut b = book(&["a"]);
        let none = HashMap::new();
        let st = at(600, 41);
        let ev = Evidence::new(Some(&st), &ended, t(600)).with_fills(&none);
        assert!(b.reconcile(&ev, &rules()));
    }

    /// An order filled in two executions (4 at stream
    /// sequence 40, 6 at 42) whose first execution the state already books
    /// (`executions_seq` 40: the position shows 4). Held must be 10 (what
    /// the order makes the position): the booked 4 are not pending too.
    #[test]
    fn pending_units_do_not_count_booked_executions_twice() {
        let mut b = book(&["a"]);
        b.held.get_mut("a").unwrap().legs[0].position = Some(("AAPL".to_string(), Direction::Long));
        let fills = HashMap::from([(
            "ord_a".to_string(),
            FillProgress {
                quantity: dec!(10),
                last_seq: 42,
                at: t(5),
                executions: vec![(40, dec!(4)), (42, dec!(6))],
            },
        )]);
        let with_position = |working: &[(&str, Decimal)]| {
            let mut st = state(5, working);
            st.executions_seq = Some(40);
            st.open_positions.push(mtx_schemas::order::OpenPosition {
                strategy_id: "s".into(),
                instrument: "AAPL".into(),
                direction: Direction::Long,
                quantity: dec!(4),
                entry_price: dec!(160),
                current_price: dec!(160),
                unrealized_pnl: Decimal::ZERO,
                margin_required: dec!(160),
                multiplier: None,
            });
            st
        };
        let strategies: HashSet<&str> = HashSet::from(["s"]);
        let held = |st: &AccountState, ended: &HashMap<String, EndedOrder>| {
            let ev = Evidence::new(Some(st), ended, t(6)).with_fills(&fills);
            let pending: Decimal = b
                .pending_units(&ev, &rules(), &strategies)
                .get("s")
                .map(|v| v.iter().map(|(_, p)| p.quantity).sum())
                .unwrap_or_default();
            st.open_positions[0].quantity + pending
        };
        // Ended FILLED 10; the state books the first execution only.
        let ended = ended_a(dec!(10), t(5), OrderStatus::Filled);
        let ended_held = held(&with_position(&[]), &ended);
        // Still working (3 left after 7 filled), 4 of them booked.
        let none = HashMap::new();
        assert_eq!(
            held(&with_position(&[("ord_a", dec!(3))]), &none),
            dec!(10),
            "working, partly booked"
        );
        assert_eq!(ended_held, dec!(10), "ended, half booked");
    }
}
