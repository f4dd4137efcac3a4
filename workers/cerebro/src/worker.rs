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
//! | order events | `orders.<account>.events` on `ORDER_EVENTS`: an ordered consumer per replica from the time it starts; terminal events release reservations (below) |
//! | backtest returns | MongoDB `<mongo.trading_db>.strategy_backtest_data` ([`crate::backtests`]), loaded in the background at start and every `backtest_refresh`; unavailable = CVaR recorded as [`crate::CvarSkip::Unavailable`], never a blocked decision |
//! | instrument specs | built-in table ([`InstrumentSpecs::with_defaults`]) overridden by `[accounts.instruments]`, so Cerebro and the ledger margin alike |
//!
//! Every watched input is applied as it arrives (by revision, stale updates
//! ignored), so a change takes effect for the next signal without a restart.
//! Settings: [`Settings`], from [`crate::CerebroConfig`] (`[cerebro]`).
//!
//! | decision | outcome |
//! |---|---|
//! | decided | `Outcome::Ok`: the [`DecisionRecord`] on `cerebro.decisions.<env>.<strategy>` (msg id `dec_…` from the signal id), each order on `orders.<account>.new` (msg id = `order_id`), each cancel on `orders.<account>.cancel` (msg id `cxl_…` from signal and order); the loop publishes, waits for the acks, then acks the signal |
//! | deferred (EXIT / CANCEL before its ENTRY filled) | `Outcome::Retry` with a growing delay (`defer_base` doubling up to `defer_max`): the message is NAKed with a delay, the worker goes on with other signals |
//! | deferred for too long | once the signal is older than `entry_wait` or on the delivery before `max_deliver`, it is decided with `entry_wait_expired` (close against the position / cancel the working orders) |
//! | undecodable signal | DLQ `invalid_signal` |
//! | KV unavailable, CAS contention | `Outcome::Retry` |
//!
//! # Margin reservations across replicas
//!
//! Several replicas share the durable consumer, so two of them may decide
//! entries for the same account at the same moment. Margin approved but not
//! yet booked by the accounts stage (orders in flight) lives in one
//! **reservation book per account**: key `reservations.<account_key>` in the
//! `account_state` bucket (account state keys never contain a `.`, so the
//! two never collide; the accounts stage `put`s only its own keys). The book
//! maps signal id → the held legs (order id, quantity, margin, notional).
//!
//! An entry is decided *inside* a compare-and-set transaction on that key:
//!
//! 1. read the book and its revision (`kv.entry`);
//! 2. reconcile it with the latest account state (below) and give
//!    [`decide_with`] the book's totals as [`AccountInputs::reserved`] (this
//!    signal's own entry excluded);
//! 3. if the decision reserves margin, write the book with this signal's
//!    entry via `kv.update(key, book, revision)` (`kv.create` for a new
//!    book); a `WrongLastRevision` / `AlreadyExists` means another replica
//!    reserved in between: go back to 1 and decide again on the new book.
//!
//! So every approval was checked against a book holding every earlier
//! approval: the sum of approved margin never exceeds what the account has.
//! Within one replica a per-account async mutex serializes the transactions
//! (no self-conflicts); CAS handles the others.
//!
//! **Group commit.** Signals without an entry link (entries, unlinked exits)
//! that reach one replica for the same account while a transaction runs
//! queue up, and the next transaction takes them all: one read of the book,
//! each signal decided in arrival order against the book holding the
//! reservations of those before it, one compare-and-set (on a conflict the
//! whole batch is decided again), then their entry records, then each
//! signal's outputs go back to its own handler. The guarantees are those of
//! one transaction per signal; the book is read, parsed and written once per
//! batch instead of once per signal. Linked exits and cancels (which also
//! compare-and-set their entry's `exits.*` record) keep one transaction each.
//!
//! Idempotent per signal id: the book is keyed by signal id, a redelivered
//! signal decides against the book *without* its own entry and then replaces
//! it — never adding twice. A redelivery never shrinks or drops an existing
//! entry (its orders may already be out); a larger new size replaces it.
//!
//! Release / reconciliation against the accounts stage's state (done on
//! every account state update and in every transaction):
//!
//! - a held leg whose order is in `open_orders` holds
//!   `margin × remaining / quantity` (the filled part is in `margin_used`)
//!   and is marked *seen*;
//! - an order whose terminal event says it ended **unfilled** (rejected,
//!   cancelled, expired with nothing filled) is *settled* at once: nothing
//!   will be booked;
//! - an order not in `open_orders` is *settled* (filled and booked, or
//!   ended) when it was seen working before, or when its terminal event is
//!   known and the state is at least `booking_grace` (1 s) newer than that
//!   event, or — no event seen, e.g. it ended before this replica started —
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
//! Each single-leg entry is about 210 bytes of JSON. Known limits: the
//! accounts stage consumes order events and executions on separate
//! consumers, so for the instant between a FILLED event and its execution
//! being booked a seen order can be neither reserved nor in `margin_used`
//! (`booking_grace` covers the same gap for unseen orders); and the book is
//! rewritten whole on every approval, so its cost grows with the orders in
//! flight (rate × time to booking).
//!
//! # Entries and exits across replicas
//!
//! An exit may reach a different replica than its entry, so entry records are
//! in KV too: `entries.<signal_id>` (the approved legs, written before the
//! decision is published) and `exits.<entry_signal_id>` (quantities closed by
//! each exit signal, compare-and-set, keyed by exit signal id so a
//! redelivered exit is not counted twice). An entry leg's fill progress is
//! read from the account state: in `open_orders` → working with
//! `quantity − remaining` filled; settled (see above) → filled; otherwise
//! still pending (the exit is deferred).
//!
//! These keys do not live forever: every `janitor_interval` each replica
//! deletes those of finished entries after `entry_done_retention` and all
//! of them after `entry_max_age` ([`crate::janitor`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mtx_accounts::book::Input as AccountsInput;
use mtx_accounts::worker::{decode as decode_accounts_input, Source as AccountsSource};
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::ids::derive_id;
use mtx_schemas::order::{account_state_key, AccountState};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::{Decision, Direction, OrderStatus, SignalAction};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backtests::{BacktestReader, BacktestSource, BacktestState};
use crate::config::CerebroConfig;
use crate::decide::{decide_with, Decided, DecisionOutput};
use crate::feeds::{run_feed, scan_kv, Feed, Scanned};
use crate::inputs::{
    AccountInputs, ActiveAllocation, DecideOptions, EntryLeg, EntryRecord, InstrumentConfig,
    InstrumentSpecs, MarginRule, Mark, Reservation, StrategyConfig, SystemConfig,
};
use crate::janitor::{entry_disposition, Disposition, Retention};
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
    /// First redelivery delay of a deferred signal (doubles per delivery).
    pub defer_base: Duration,
    /// Largest redelivery delay.
    pub defer_max: Duration,
    /// The consumer's `max_deliver` (a deferred signal is decided with
    /// `entry_wait_expired` on the delivery before the last).
    pub max_deliver: i64,
    /// Compare-and-set attempts per signal before it is retried later.
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
    /// Read order events from `orders.*.events` (fills and ends release
    /// reservations sooner).
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
            defer_base: Duration::from_millis(500),
            defer_max: Duration::from_secs(30),
            max_deliver: 10,
            cas_attempts: 200,
            backtests: None,
            backtest_refresh: Duration::ZERO,
            backtest_retry: Duration::ZERO,
            marks: true,
            marks_initial_wait: Duration::ZERO,
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
        if let Some(b) = &mut self.backtests {
            b.timeout = Duration::from_millis(c.mongo_timeout_ms.max(1));
        }
    }

    /// [`Settings::from_configs`] with the default `[cerebro]` section (the
    /// process config has none yet).
    pub fn from_config(config: &mtx_runtime::Config) -> Settings {
        Self::from_configs(config, &CerebroConfig::default())
    }

    /// Defaults plus the process config: `[accounts.instruments]` override
    /// the built-in symbol table's multiplier and margin; `max_deliver` from
    /// the topology; backtests from `mongo.uri` / `mongo.trading_db`; the
    /// rest from `cerebro`.
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
                },
            );
        }
        s.max_deliver = config.topology.max_deliver;
        s
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
}

/// The reservation of one approved entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    /// Strategy.
    pub strategy_id: String,
    /// When it was reserved.
    pub created_at: DateTime<Utc>,
    /// Its legs.
    pub legs: Vec<HeldLeg>,
}

impl Held {
    fn margin(&self) -> Decimal {
        self.legs.iter().map(|l| l.margin).sum()
    }
}

/// One account's reservation book.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationBook {
    /// Held reservations by signal id.
    pub held: BTreeMap<String, Held>,
}

/// An order's end as told by its terminal order event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndedOrder {
    /// Quantity filled in all.
    pub filled: Decimal,
    /// When it ended (the event's timestamp).
    pub at: DateTime<Utc>,
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
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    /// The account's latest state.
    pub state: Option<&'a AccountState>,
    /// Orders known to have ended, by order id.
    pub ended: &'a HashMap<String, EndedOrder>,
    /// Now.
    pub now: DateTime<Utc>,
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
    if let Some(o) = state
        .open_orders
        .iter()
        .find(|o| o.order_id == leg.order_id)
    {
        return LegProgress::Working(o.quantity.max(Decimal::ZERO).min(leg.quantity));
    }
    let booked = leg.seen
        || ended.is_some_and(|e| at_least(state.timestamp, e.at, rules.booking_grace))
        || at_least(state.timestamp, created_at, rules.unbooked_grace);
    if booked {
        LegProgress::Settled
    } else {
        LegProgress::Unbooked
    }
}

impl ReservationBook {
    /// Mark working legs seen, drop fully settled entries and entries older
    /// than `max_age`; whether anything changed.
    pub fn reconcile(&mut self, ev: &Evidence<'_>, rules: &SettleRules) -> bool {
        let mut changed = false;
        self.held.retain(|_, h| {
            let expired = after(h.created_at, rules.max_age).is_some_and(|limit| ev.now >= limit);
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
            let r = out.entry(h.strategy_id.clone()).or_default();
            for l in &h.legs {
                let frac = match progress(l, h.created_at, ev, rules) {
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
        }
        out
    }

    /// Held entries other than `except`.
    pub fn in_flight(&self, except: Option<&str>) -> usize {
        self.held.len() - usize::from(except.is_some_and(|e| self.held.contains_key(e)))
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
}

/// What one exit closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitTake {
    /// Instrument.
    pub instrument: String,
    /// Direction of the position closed.
    pub direction: Direction,
    /// Quantity closed.
    pub quantity: Decimal,
    /// Sender quantity of the exit leg.
    pub sender_quantity: Decimal,
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
    let keep = settings
        .unbooked_grace
        .checked_add(&settings.unbooked_grace)
        .unwrap_or(chrono::Duration::MAX)
        .max(chrono::Duration::minutes(1));
    ended.retain(|_, e| after(e.at, keep).is_none_or(|t| t > now));
}

// ----- live inputs ----------------------------------------------------------

#[derive(Debug, Default)]
struct Live {
    strategies: BTreeMap<String, (u64, StrategyConfig)>,
    allocation: Option<(u64, ActiveAllocation)>,
    system: Option<(u64, SystemConfig)>,
    trading_enabled: Option<(u64, bool)>,
    kill_switch: Option<(u64, bool)>,
    accounts: BTreeMap<String, (u64, AccountState)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Strategies,
    Allocations,
    System,
    AccountState,
}

fn parse_bool(v: &[u8]) -> Option<bool> {
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
            Source::AccountState => {
                if key.contains('.') {
                    return;
                }
                if self.accounts.get(key).is_some_and(|(r, _)| *r > rev) {
                    return;
                }
                match value.map(serde_json::from_slice::<AccountState>) {
                    Some(Ok(s)) => {
                        self.accounts.insert(key.to_string(), (rev, s));
                    }
                    Some(Err(e)) => tracing::warn!(key, error = %e, "account state unreadable"),
                    None => {
                        self.accounts.remove(key);
                    }
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

    fn account(&self, account: &str) -> Option<AccountState> {
        self.accounts
            .get(&account_state_key(account))
            .map(|(_, s)| s.clone())
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

/// What one janitor pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JanitorReport {
    /// `entries.*` keys examined.
    pub entries: usize,
    /// `entries.*` keys deleted.
    pub entries_purged: usize,
    /// `exits.*` keys deleted.
    pub exits_purged: usize,
    /// Ended-order records forgotten.
    pub ended_forgotten: usize,
}

/// The Cerebro handler (one per replica).
pub struct Cerebro {
    js: jetstream::Context,
    subjects: Subjects,
    stores: Stores,
    live: Arc<RwLock<Live>>,
    marks: RwLock<BTreeMap<String, Mark>>,
    ended: RwLock<HashMap<String, EndedOrder>>,
    /// Size of `ended` at which old ends are forgotten next.
    ended_prune_at: std::sync::atomic::AtomicUsize,
    backtests: RwLock<BacktestState>,
    settings: Settings,
    /// TTL of purge markers when the bucket allows per-message TTLs.
    marker_ttl: Option<Duration>,
    locks: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Per account: unlinked signals waiting for a group commit.
    queues: std::sync::Mutex<HashMap<String, Queue>>,
    /// Itself, for the group-commit leader tasks.
    me: std::sync::OnceLock<std::sync::Weak<Cerebro>>,
}

#[derive(Debug, Clone)]
enum Fail {
    Retry(String),
    Reject(&'static str, String),
}

/// One signal waiting for its account's next group commit.
struct Job {
    signal: StandardizedSignal,
    opts: DecideOptions,
    deliveries: u64,
    done: tokio::sync::oneshot::Sender<Result<Outcome, Fail>>,
}

/// The signals waiting for one account, and whether a leader runs them.
#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    leading: bool,
}

/// Clears an account's `leading` flag however the leader task ends, and
/// fails (retry later) whatever it left queued, so a crashed leader never
/// strands signals.
struct LeaderGuard<'a> {
    queues: &'a std::sync::Mutex<HashMap<String, Queue>>,
    account: String,
    /// Cleared when the leader stepped down normally.
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = q.get_mut(&self.account) {
            e.leading = false;
            for j in e.jobs.drain(..) {
                let _ = j
                    .done
                    .send(Err(Fail::Retry("decision batch abandoned".into())));
            }
        }
    }
}

fn retry(e: impl std::fmt::Display) -> Fail {
    Fail::Retry(e.to_string())
}

/// Only account state keys (single token) are watched in `account_state`;
/// the worker's own `reservations.*` / `entries.*` / `exits.*` are not.
const ACCOUNT_KEYS: &str = "*";

impl Cerebro {
    /// Open the buckets, load the current inputs and start the watchers,
    /// the mark and order-event feeds, the backtest loader and the janitor
    /// (all stopped by `shutdown`).
    pub async fn start(
        js: &jetstream::Context,
        subjects: Subjects,
        topology: &Topology,
        settings: Settings,
        shutdown: CancellationToken,
    ) -> Result<Arc<Cerebro>, String> {
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
            live: Arc::new(RwLock::new(Live::default())),
            marks: RwLock::new(BTreeMap::new()),
            ended: RwLock::new(HashMap::new()),
            ended_prune_at: std::sync::atomic::AtomicUsize::new(ENDED_PRUNE_MIN),
            backtests: RwLock::new(BacktestState::default()),
            settings,
            marker_ttl,
            locks: std::sync::Mutex::new(BTreeMap::new()),
            queues: std::sync::Mutex::new(HashMap::new()),
            me: std::sync::OnceLock::new(),
        });
        let _ = me.me.set(Arc::downgrade(&me));
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
        if me.settings.marks {
            let (ready, mut loaded) = tokio::sync::watch::channel(false);
            let feed = Feed {
                stream: topology.stream_name(streams::MARKET),
                filter: me.subjects.raw_subject("market.prices.>"),
                deliver: consumer::DeliverPolicy::LastPerSubject,
                what: "marks",
            };
            let c = Arc::clone(&me);
            tokio::spawn(run_feed(
                js.clone(),
                feed,
                shutdown.clone(),
                ready,
                move |m| c.on_mark(m),
            ));
            let wait = me.settings.marks_initial_wait;
            if tokio::time::timeout(wait, loaded.wait_for(|r| *r))
                .await
                .is_err()
            {
                tracing::warn!(?wait, "latest marks not loaded yet; starting without them");
            }
        }
        if me.settings.order_events {
            let (ready, _) = tokio::sync::watch::channel(false);
            let feed = Feed {
                stream: topology.stream_name(streams::ORDER_EVENTS),
                filter: me.subjects.raw_subject("orders.*.events"),
                deliver: consumer::DeliverPolicy::New,
                what: "order events",
            };
            let c = Arc::clone(&me);
            tokio::spawn(run_feed(
                js.clone(),
                feed,
                shutdown.clone(),
                ready,
                move |m| c.on_order_event(m),
            ));
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

    fn apply(&self, src: Source, key: &str, rev: u64, value: Option<&[u8]>) {
        if let Ok(mut live) = self.live.write() {
            live.apply(src, key, rev, value);
        }
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
                    self.apply(src, &e.key, e.revision, value);
                    if src == Source::AccountState && !e.key.contains('.') && value.is_some() {
                        let account =
                            self.live.read().ok().and_then(|l| {
                                l.accounts.get(&e.key).map(|(_, s)| s.account.clone())
                            });
                        if let Some(account) = account {
                            if let Err(err) = self.sync_book(&account).await {
                                tracing::debug!(%account, error = %err, "reservation reconcile deferred");
                            }
                        }
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
    fn on_mark(&self, m: &jetstream::Message) {
        match decode_accounts_input(
            &self.subjects,
            AccountsSource::Market,
            &m.subject,
            &m.payload,
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
    fn on_order_event(&self, m: &jetstream::Message) {
        let Ok(AccountsInput::OrderEvent(e)) = decode_accounts_input(
            &self.subjects,
            AccountsSource::OrderEvents,
            &m.subject,
            &m.payload,
        ) else {
            return;
        };
        if !e.status.is_terminal() {
            return;
        }
        let mut ended = self.ended.write().unwrap_or_else(|p| p.into_inner());
        ended.insert(
            e.order_id,
            EndedOrder {
                filled: e.filled_quantity,
                at: e.timestamp,
            },
        );
        // Bounded: ends older than the fallback grace (twice) no longer
        // change any settlement; forget them every so often.
        let prune_at = self
            .ended_prune_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if ended.len() >= prune_at {
            forget_ended(&mut ended, &self.settings, Utc::now());
            // Amortized: the next prune once the map has doubled.
            self.ended_prune_at.store(
                (ended.len() * 2).max(ENDED_PRUNE_MIN),
                std::sync::atomic::Ordering::Relaxed,
            );
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
                        self.settings.backtest_refresh
                    }
                    Err(e) => {
                        if st.table.is_some() {
                            tracing::warn!(error = %e, "backtest refresh failed; keeping the previous returns");
                        } else {
                            tracing::warn!(error = %e, "backtest returns unavailable; CVaR not evaluated");
                        }
                        st.last_error = Some(e);
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
    /// `entries.*` / `exits.*` keys whose retention passed, forget old order
    /// ends, and drop stale reservations of accounts whose state does not
    /// change. Runs every `janitor_interval`; public for tests and ops.
    pub async fn janitor_pass(&self, now: DateTime<Utc>) -> Result<JanitorReport, String> {
        let mut report = JanitorReport::default();
        {
            let mut ended = self.ended.write().unwrap_or_else(|p| p.into_inner());
            let before = ended.len();
            forget_ended(&mut ended, &self.settings, now);
            report.ended_forgotten = before - ended.len();
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
        // Per account: the encoded signal ids its reservation book holds.
        let mut books: BTreeMap<String, std::collections::HashSet<String>> = BTreeMap::new();
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
                let ids = book.held.keys().map(|sid| StrategyConfig::kv_key(sid));
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
            if let Disposition::Purge(why) = d {
                if self.purge(&e.key, e.revision).await {
                    report.entries_purged += 1;
                    tracing::debug!(key = %e.key, ?why, "entry record deleted");
                    if let Some(x) = &x {
                        if self.purge(&x.key, x.revision).await {
                            report.exits_purged += 1;
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
        self.live.read().ok().and_then(|l| l.account(account))
    }

    /// Read an account's reservation book (tests and ops).
    pub async fn reservation_book(&self, account: &str) -> Result<ReservationBook, String> {
        Ok(self
            .read_json::<ReservationBook>(&reservations_key(account))
            .await
            .map_err(|_| "kv unavailable".to_string())?
            .map(|(_, b)| b)
            .unwrap_or_default())
    }

    fn lock_for(&self, account: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(locks.entry(account.to_string()).or_default())
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<(u64, T)>, Fail> {
        match self.stores.state.entry(key).await.map_err(retry)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = serde_json::from_slice(&e.value)
                    .map_err(|err| Fail::Reject("corrupt_state", format!("{key}: {err}")))?;
                Ok(Some((e.revision, v)))
            }
            _ => Ok(None),
        }
    }

    /// Compare-and-set write: `Ok(false)` on a revision conflict.
    async fn cas(&self, key: &str, rev: Option<u64>, value: Vec<u8>) -> Result<bool, Fail> {
        let value = Bytes::from(value);
        match rev {
            Some(r) => match self.stores.state.update(key, value, r).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(retry(e)),
            },
            None => match self.stores.state.create(key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(retry(e)),
            },
        }
    }

    async fn read_book(&self, account: &str) -> Result<(Option<u64>, ReservationBook), Fail> {
        let key = reservations_key(account);
        // A deleted / purged book reads as empty (revision kept for the CAS).
        match self.stores.state.entry(key.as_str()).await.map_err(retry)? {
            Some(e) if e.operation == kv::Operation::Put => {
                let b = serde_json::from_slice(&e.value)
                    .map_err(|err| Fail::Reject("corrupt_state", format!("{key}: {err}")))?;
                Ok((Some(e.revision), b))
            }
            Some(e) => Ok((Some(e.revision), ReservationBook::default())),
            None => Ok((None, ReservationBook::default())),
        }
    }

    /// Reconcile `book` with `state` and the known order ends.
    fn reconcile(
        &self,
        book: &mut ReservationBook,
        state: Option<&AccountState>,
        now: DateTime<Utc>,
    ) -> bool {
        let ended = self.ended.read().unwrap_or_else(|p| p.into_inner());
        let ev = Evidence {
            state,
            ended: &ended,
            now,
        };
        book.reconcile(&ev, &SettleRules::of(&self.settings))
    }

    /// Reconcile an account's book with its latest state and store it if it
    /// changed.
    async fn sync_book(&self, account: &str) -> Result<(), String> {
        let lock = self.lock_for(account);
        let _g = lock.lock().await;
        for _ in 0..self.settings.cas_attempts {
            let (rev, mut book) = self.read_book(account).await.map_err(|_| "kv read")?;
            let state = self.account_state(account);
            if !self.reconcile(&mut book, state.as_ref(), Utc::now()) {
                return Ok(());
            }
            let body = serde_json::to_vec(&book).map_err(|e| e.to_string())?;
            if self
                .cas(&reservations_key(account), rev, body)
                .await
                .map_err(|_| "kv write")?
            {
                return Ok(());
            }
        }
        Err("cas contention".into())
    }

    /// The decision inputs at `now` for `signal`: live configuration, marks
    /// of the signal's instruments, backtest returns (accounts and entries
    /// are added by the transaction).
    fn snapshot(&self, now: DateTime<Utc>, signal: &StandardizedSignal) -> Inputs {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let marks = {
            let all = self.marks.read().unwrap_or_else(|p| p.into_inner());
            signal
                .legs
                .iter()
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
            strategies: live
                .strategies
                .values()
                .map(|(_, c)| (c.strategy_id.clone(), c.clone()))
                .collect(),
            allocation: live.allocation.as_ref().map(|(_, a)| a.clone()),
            accounts: BTreeMap::new(),
            system: live.system(),
            instruments: self.settings.instruments.clone(),
            marks,
            entries: BTreeMap::new(),
            returns,
            returns_unavailable,
            now,
        }
    }

    fn routed_account(&self, inputs: &Inputs, signal: &StandardizedSignal) -> Option<String> {
        inputs
            .strategies
            .get(&signal.strategy_id)
            .and_then(|c| c.account.clone())
    }

    /// Decide one signal (the whole transaction); the outputs to publish.
    async fn process(&self, d: &Delivery) -> Result<Outcome, Fail> {
        let signal: StandardizedSignal = serde_json::from_slice(&d.payload)
            .map_err(|e| Fail::Reject("invalid_signal", e.to_string()))?;
        let base_now = Utc::now();
        let expired = (self.settings.max_deliver > 1
            && d.deliveries as i64 >= self.settings.max_deliver - 1)
            || at_least(base_now, signal.received_at, self.settings.entry_wait);
        let opts = DecideOptions {
            entry_wait_expired: expired,
        };
        let probe = self.snapshot(base_now, &signal);
        // The linked entry's record decides the account for exits / cancels.
        let stored_entry = match signal.entry_signal_id.as_deref() {
            Some(e) => self
                .read_json::<StoredEntry>(&entry_key(e))
                .await?
                .map(|(_, s)| s),
            None => None,
        };
        let account = stored_entry
            .as_ref()
            .map(|e| e.account.clone())
            .or_else(|| self.routed_account(&probe, &signal));
        let Some(account) = account else {
            // Unknown strategy / no account: decide without a book.
            return self.finish(&signal, decide_with(&signal, &probe, opts), None);
        };
        if signal.entry_signal_id.is_none() {
            // Entries and unlinked exits: group commit.
            return self.enqueue(account, signal, opts, d.deliveries).await;
        }
        let lock = self.lock_for(&account);
        let _g = lock.lock().await;
        let rules = SettleRules::of(&self.settings);
        // Set when the book could not take one more entry: decide again
        // with the book's size as the limit.
        let mut book_full = false;
        for _ in 0..self.settings.cas_attempts {
            let now = Utc::now();
            let mut inputs = self.snapshot(now, &signal);
            let (book_rev, mut book) = self.read_book(&account).await?;
            let state = self.account_state(&account);
            let exits_read = match (signal.entry_signal_id.as_deref(), &stored_entry) {
                (Some(entry_id), Some(_)) => self
                    .read_json::<ExitProgress>(&exits_key(entry_id))
                    .await?
                    .map(|(r, p)| (Some(r), p)),
                _ => None,
            };
            let (exits_rev, mut exits) = exits_read.unwrap_or_default();
            // Everything that needs the order ends, under one read lock
            // (no await inside).
            let book_changed = {
                let ended = self.ended.read().unwrap_or_else(|p| p.into_inner());
                let ev = Evidence {
                    state: state.as_ref(),
                    ended: &ended,
                    now,
                };
                let changed = book.reconcile(&ev, &rules);
                if let Some(st) = &state {
                    let mut a = AccountInputs::new(st.clone());
                    a.reserved = book.reserved(&ev, &rules, Some(&signal.signal_id));
                    a.in_flight = book.in_flight(Some(&signal.signal_id));
                    a.max_in_flight = Some(if book_full {
                        a.in_flight
                    } else {
                        self.settings.reservation_max_entries
                    });
                    // Today's P&L of a state of an earlier UTC day is not
                    // today's.
                    if st.timestamp.date_naive() == now.date_naive() {
                        a.pnl_today = st.strategy_pnl_today.clone();
                    }
                    inputs.accounts.insert(account.clone(), a);
                }
                // Entry record with its live fill progress and earlier exits.
                if let (Some(entry_id), Some(se)) =
                    (signal.entry_signal_id.as_deref(), &stored_entry)
                {
                    let rec = entry_with_progress(
                        entry_id,
                        se,
                        book.held.get(entry_id),
                        &ev,
                        &rules,
                        &exits,
                        &signal.signal_id,
                    );
                    inputs.entries.insert(entry_id.to_string(), rec);
                }
                changed
            };
            let out = decide_with(&signal, &inputs, opts);
            let DecisionOutput::Decided(decided) = &out else {
                if book_changed {
                    let body = serde_json::to_vec(&book).map_err(retry)?;
                    let _ = self
                        .cas(&reservations_key(&account), book_rev, body)
                        .await?;
                }
                return self.finish(&signal, out, Some(d.deliveries));
            };
            // Reserve (CAS on the book).
            let reserves = !decided.orders.is_empty()
                && decided.record.action == Some(SignalAction::Entry)
                && (decided.reservation.margin > Decimal::ZERO
                    || decided.reservation.notional > Decimal::ZERO);
            let mut write_book = book_changed;
            if reserves {
                let held = held_of(&signal, decided, now);
                let keep_old = book
                    .held
                    .get(&signal.signal_id)
                    .is_some_and(|old| old.margin() >= held.margin());
                if !keep_old {
                    book.held.insert(signal.signal_id.clone(), held);
                    write_book = true;
                }
            }
            if write_book {
                let body = serde_json::to_vec(&book).map_err(retry)?;
                if body.len() > MAX_BOOK_BYTES && reserves && !book_full {
                    tracing::warn!(
                        %account,
                        entries = book.held.len(),
                        bytes = body.len(),
                        "reservation book full"
                    );
                    book_full = true;
                    continue;
                }
                if !self
                    .cas(&reservations_key(&account), book_rev, body)
                    .await?
                {
                    continue;
                }
            }
            // Exit progress (CAS on the entry's exits record).
            if let Some(entry_id) = signal.entry_signal_id.as_deref() {
                if stored_entry.is_some() && !decided.orders.is_empty() {
                    let takes = exit_takes(&signal, decided);
                    if exits.exits.get(&signal.signal_id) != Some(&takes) {
                        exits.exits.insert(signal.signal_id.clone(), takes);
                        let body = serde_json::to_vec(&exits).map_err(retry)?;
                        if !self.cas(&exits_key(entry_id), exits_rev, body).await? {
                            continue;
                        }
                    }
                }
            }
            // Entry record for later exits / cancels.
            if decided.record.action == Some(SignalAction::Entry) {
                let se = StoredEntry {
                    strategy_id: signal.strategy_id.clone(),
                    account: account.clone(),
                    decision: decided.record.decision,
                    legs: entry_legs(&signal, decided),
                };
                let body = serde_json::to_vec(&se).map_err(retry)?;
                self.stores
                    .state
                    .put(entry_key(&signal.signal_id), body.into())
                    .await
                    .map_err(retry)?;
            }
            return self.finish(&signal, out, Some(d.deliveries));
        }
        Err(Fail::Retry("reservation compare-and-set contention".into()))
    }

    // ----- group commit -------------------------------------------------------

    /// Queue an unlinked signal for its account's next group commit and wait
    /// for its outcome. The first signal of an idle account starts a leader
    /// task that runs the queue in batches until it is empty.
    async fn enqueue(
        &self,
        account: String,
        signal: StandardizedSignal,
        opts: DecideOptions,
        deliveries: u64,
    ) -> Result<Outcome, Fail> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job = Job {
            signal,
            opts,
            deliveries,
            done,
        };
        let lead = {
            let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let e = q.entry(account.clone()).or_default();
            e.jobs.push(job);
            !std::mem::replace(&mut e.leading, true)
        };
        if lead {
            match self.me.get().and_then(std::sync::Weak::upgrade) {
                Some(me) => {
                    tokio::spawn(async move { me.lead(account).await });
                }
                None => self.lead(account).await,
            }
        }
        result
            .await
            .unwrap_or_else(|_| Err(Fail::Retry("decision batch dropped".into())))
    }

    /// Run `account`'s queue in batches until it is empty.
    async fn lead(&self, account: String) {
        let mut guard = LeaderGuard {
            queues: &self.queues,
            account: account.clone(),
            armed: true,
        };
        loop {
            let jobs = {
                let mut q = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                match q.get_mut(&account) {
                    Some(e) if !e.jobs.is_empty() => std::mem::take(&mut e.jobs),
                    Some(e) => {
                        // Step down in the same critical section that saw
                        // the queue empty: the next job starts a new leader.
                        e.leading = false;
                        guard.armed = false;
                        return;
                    }
                    None => {
                        guard.armed = false;
                        return;
                    }
                }
            };
            let lock = self.lock_for(&account);
            let _g = lock.lock().await;
            match self.decide_batch(&account, &jobs).await {
                Ok(results) => {
                    for (job, r) in jobs.into_iter().zip(results) {
                        let _ = job.done.send(r);
                    }
                }
                Err(f) => {
                    for job in jobs {
                        let _ = job.done.send(Err(f.clone()));
                    }
                }
            }
        }
    }

    /// Decide `jobs` (unlinked signals of `account`, in order) against one
    /// read of the reservation book, each seeing the reservations of the
    /// ones before it, and store the book with one compare-and-set; on a
    /// conflict the whole batch is decided again on the new book. Same
    /// guarantees as one transaction per signal (see the module docs).
    async fn decide_batch(
        &self,
        account: &str,
        jobs: &[Job],
    ) -> Result<Vec<Result<Outcome, Fail>>, Fail> {
        let rules = SettleRules::of(&self.settings);
        for _ in 0..self.settings.cas_attempts {
            let now = Utc::now();
            let (book_rev, mut book) = self.read_book(account).await?;
            let state = self.account_state(account);
            let mut decided: Vec<DecisionOutput> = Vec::with_capacity(jobs.len());
            let mut records: Vec<(String, Vec<u8>)> = Vec::new();
            let mut book_changed;
            {
                let ended = self.ended.read().unwrap_or_else(|p| p.into_inner());
                let ev = Evidence {
                    state: state.as_ref(),
                    ended: &ended,
                    now,
                };
                book_changed = book.reconcile(&ev, &rules);
                // Serialized size of the book, kept up to date as entries
                // are added (a map entry costs key + value + 4 bytes).
                let mut bytes = serde_json::to_vec(&book).map_err(retry)?.len();
                let mut full = false;
                for job in jobs {
                    let signal = &job.signal;
                    let decide = |full: bool, book: &ReservationBook| {
                        let mut inputs = self.snapshot(now, signal);
                        if let Some(st) = &state {
                            let mut a = AccountInputs::new(st.clone());
                            a.reserved = book.reserved(&ev, &rules, Some(&signal.signal_id));
                            a.in_flight = book.in_flight(Some(&signal.signal_id));
                            a.max_in_flight = Some(if full {
                                a.in_flight
                            } else {
                                self.settings.reservation_max_entries
                            });
                            if st.timestamp.date_naive() == now.date_naive() {
                                a.pnl_today = st.strategy_pnl_today.clone();
                            }
                            inputs.accounts.insert(account.to_string(), a);
                        }
                        decide_with(signal, &inputs, job.opts)
                    };
                    let mut out = decide(full, &book);
                    if let DecisionOutput::Decided(d) = &out {
                        let reserves = !d.orders.is_empty()
                            && d.record.action == Some(SignalAction::Entry)
                            && (d.reservation.margin > Decimal::ZERO
                                || d.reservation.notional > Decimal::ZERO);
                        if reserves {
                            let held = held_of(signal, d, now);
                            let keep_old = book
                                .held
                                .get(&signal.signal_id)
                                .is_some_and(|old| old.margin() >= held.margin());
                            if !keep_old {
                                let size = serde_json::to_vec(&held).map_err(retry)?.len()
                                    + signal.signal_id.len()
                                    + 8;
                                if bytes + size > MAX_BOOK_BYTES && !full {
                                    tracing::warn!(
                                        %account,
                                        entries = book.held.len(),
                                        bytes,
                                        "reservation book full"
                                    );
                                    full = true;
                                    out = decide(full, &book);
                                } else {
                                    bytes += size;
                                    book.held.insert(signal.signal_id.clone(), held);
                                    book_changed = true;
                                }
                            }
                        }
                    }
                    if let DecisionOutput::Decided(d) = &out {
                        if d.record.action == Some(SignalAction::Entry) {
                            let se = StoredEntry {
                                strategy_id: signal.strategy_id.clone(),
                                account: account.to_string(),
                                decision: d.record.decision,
                                legs: entry_legs(signal, d),
                            };
                            records.push((
                                entry_key(&signal.signal_id),
                                serde_json::to_vec(&se).map_err(retry)?,
                            ));
                        }
                    }
                    decided.push(out);
                }
            }
            if book_changed {
                let body = serde_json::to_vec(&book).map_err(retry)?;
                if !self.cas(&reservations_key(account), book_rev, body).await? {
                    continue;
                }
            }
            // Entry records for later exits / cancels, before any decision
            // is published.
            let puts = records
                .into_iter()
                .map(|(key, body)| self.stores.state.put(key, body.into()));
            for r in futures::future::join_all(puts).await {
                r.map_err(retry)?;
            }
            return Ok(jobs
                .iter()
                .zip(decided)
                .map(|(job, out)| self.finish(&job.signal, out, Some(job.deliveries)))
                .collect());
        }
        Err(Fail::Retry("reservation compare-and-set contention".into()))
    }

    fn finish(
        &self,
        signal: &StandardizedSignal,
        out: DecisionOutput,
        deliveries: Option<u64>,
    ) -> Result<Outcome, Fail> {
        match out {
            DecisionOutput::Defer { reason, .. } => {
                let n = deliveries.unwrap_or(1).clamp(1, 16) as u32;
                let after = self
                    .settings
                    .defer_base
                    .saturating_mul(1u32 << (n - 1).min(15))
                    .min(self.settings.defer_max);
                Ok(Outcome::retry(after, format!("deferred: {reason}")))
            }
            DecisionOutput::Decided(d) => self.outputs(signal, &d).map(Outcome::Ok),
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
                }
            })
            .collect(),
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
        })
        .collect()
}

/// The entry's record with fill progress from the account state and what
/// other exits (not `this_exit`) already closed.
fn entry_with_progress(
    entry_id: &str,
    se: &StoredEntry,
    held: Option<&Held>,
    ev: &Evidence<'_>,
    rules: &SettleRules,
    exits: &ExitProgress,
    this_exit: &str,
) -> EntryRecord {
    let state = ev.state;
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
            let working =
                state.and_then(|s| s.open_orders.iter().find(|o| o.order_id == l.order_id));
            let (filled, status) = match (working, held_leg) {
                (Some(o), _) => {
                    let f = (l.ordered_quantity - o.quantity).max(Decimal::ZERO);
                    let st = if f > Decimal::ZERO {
                        OrderStatus::PartiallyFilled
                    } else {
                        OrderStatus::Submitted
                    };
                    (f, st)
                }
                (None, Some((hl, created))) => match progress(hl, created, ev, rules) {
                    LegProgress::Settled => (l.ordered_quantity, OrderStatus::Filled),
                    _ => (Decimal::ZERO, OrderStatus::Pending),
                },
                // Released from the book: settled.
                (None, None) => (l.ordered_quantity, OrderStatus::Filled),
            };
            let (closed, sender_exited) = exits
                .exits
                .iter()
                .filter(|(k, _)| k.as_str() != this_exit)
                .flat_map(|(_, v)| v.iter())
                .filter(|t| t.instrument == l.instrument && t.direction == l.direction)
                .fold((Decimal::ZERO, Decimal::ZERO), |(q, s), t| {
                    (q + t.quantity, s + t.sender_quantity)
                });
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
        match self.process(msg).await {
            Ok(o) => o,
            Err(Fail::Retry(r)) => Outcome::retry(Duration::from_millis(500), r),
            Err(Fail::Reject(code, detail)) => Outcome::reject(code, detail),
        }
    }
}

/// Start Cerebro in `process`: watchers plus the consume loop on `cerebro`.
pub async fn spawn(process: &mut Process) -> Result<Arc<Cerebro>, SpawnError> {
    let settings = Settings::from_config(&process.config);
    spawn_with(process, settings).await
}

/// [`spawn`] with explicit settings (tests, or a `[cerebro]` section read
/// by the caller).
pub async fn spawn_with(
    process: &mut Process,
    settings: Settings,
) -> Result<Arc<Cerebro>, SpawnError> {
    let c = Cerebro::start(
        &process.js,
        process.subjects.clone(),
        &process.topology,
        settings,
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
    /// Buckets / watchers unavailable.
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
                            }],
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
        }
    }

    fn reconcile(
        b: &mut ReservationBook,
        st: Option<&AccountState>,
        ended: &HashMap<String, EndedOrder>,
        now: i64,
    ) -> bool {
        b.reconcile(
            &Evidence {
                state: st,
                ended,
                now: t(now),
            },
            &rules(),
        )
    }

    #[test]
    fn an_order_ended_unfilled_releases_at_once() {
        let mut b = book(&["a", "b"]);
        let ended = HashMap::from([(
            "ord_a".to_string(),
            EndedOrder {
                filled: Decimal::ZERO,
                at: t(1),
            },
        )]);
        assert!(reconcile(&mut b, None, &ended, 1));
        assert_eq!(b.held.keys().collect::<Vec<_>>(), ["b"]);
    }

    #[test]
    fn a_fill_releases_once_a_state_booking_grace_newer_omits_it() {
        let mut b = book(&["a"]);
        let ended = HashMap::from([(
            "ord_a".to_string(),
            EndedOrder {
                filled: dec!(10),
                at: t(5),
            },
        )]);
        assert!(!reconcile(&mut b, Some(&state(6, &[])), &ended, 6));
        // A stale state still listing it working: held (pro rata).
        assert!(reconcile(
            &mut b,
            Some(&state(8, &[("ord_a", dec!(4))])),
            &ended,
            8
        ));
        let ev = Evidence {
            state: Some(&state(8, &[("ord_a", dec!(4))])),
            ended: &ended,
            now: t(8),
        };
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
        let ended = HashMap::from([(
            "ord_a".to_string(),
            EndedOrder {
                filled: dec!(10),
                at: t(5),
            },
        )]);
        let r = SettleRules::of(&s);
        let ev = Evidence {
            state: Some(&state(100, &[])),
            ended: &ended,
            now: t(100),
        };
        assert!(!b.reconcile(&ev, &r));
    }
}
