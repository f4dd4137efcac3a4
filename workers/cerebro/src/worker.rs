//! The Cerebro stage (`mtx run cerebro`): standardized signals in, decisions,
//! orders and cancels out, on the shared consume loop.
//!
//! | input | source |
//! |---|---|
//! | signals | durable `cerebro` on `SIGNALS_STANDARDIZED` |
//! | strategy configs | KV `strategies` (watched; key = `StrategyConfig::kv_key`) |
//! | ACTIVE allocation | KV `allocations`, key `active` ([`ActiveAllocation`] JSON; watched) |
//! | system config | KV `system`: key `config` = [`SystemConfig`] JSON; key `TRADING_ENABLED` (`true`/`false`) and key `kill_switch` (`true` = halted) override the kill switch (watched) |
//! | account state | KV `account_state`, key `account_state_key(account)` (watched) |
//! | instrument specs | built-in table ([`InstrumentSpecs::with_defaults`]) overridden by `[accounts.instruments]`, so Cerebro and the ledger margin alike |
//!
//! Every watched input is applied as it arrives (by revision, stale updates
//! ignored), so a change takes effect for the next signal without a restart.
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
//! Idempotent per signal id: the book is keyed by signal id, a redelivered
//! signal decides against the book *without* its own entry and then replaces
//! it — never adding twice. A redelivery never shrinks or drops an existing
//! entry (its orders may already be out); a larger new size replaces it.
//!
//! Release / reconciliation against the accounts stage's state (done on
//! every account state update and in every transaction): a held leg whose
//! order is in `open_orders` holds `margin × remaining / quantity` (the filled
//! part is in `margin_used`) and is marked *seen*; a leg whose order is not
//! in `open_orders` is *settled* (filled and booked, or ended) when it was
//! seen working before, or when the state is at least `unbooked_grace`
//! newer than the reservation (the stage has had time to ingest the order;
//! its `publish_interval_secs` heartbeat keeps states coming). An entry is
//! released when all its legs are settled. Known limit: the accounts stage
//! consumes order events and executions on separate consumers, so for the
//! instant between a FILLED event and its execution being booked a seen
//! order can be neither reserved nor in `margin_used`.
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

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::ids::derive_id;
use mtx_schemas::order::{account_state_key, AccountState};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::{Decision, Direction, OrderStatus, SignalAction};
use mtx_subjects::topology::buckets;
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::decide::{decide_with, Decided, DecisionOutput};
use crate::inputs::{
    AccountInputs, ActiveAllocation, DecideOptions, EntryLeg, EntryRecord, InstrumentConfig,
    InstrumentSpecs, MarginRule, Reservation, StrategyConfig, SystemConfig,
};
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

/// Worker knobs (defaults in the crate; instrument specs from config).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Instrument specifications.
    pub instruments: InstrumentSpecs,
    /// A reserved order absent from `open_orders` of a state this much newer
    /// than the reservation is settled.
    pub unbooked_grace: chrono::Duration,
    /// How long an EXIT / CANCEL waits for its entry before it is decided
    /// with `entry_wait_expired`.
    pub entry_wait: chrono::Duration,
    /// First redelivery delay of a deferred signal (doubles per delivery).
    pub defer_base: Duration,
    /// Largest redelivery delay.
    pub defer_max: Duration,
    /// The consumer's `max_deliver` (a deferred signal is decided with
    /// `entry_wait_expired` on the delivery before the last).
    pub max_deliver: i64,
    /// Compare-and-set attempts per signal before it is retried later.
    pub cas_attempts: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            instruments: InstrumentSpecs::with_defaults(),
            unbooked_grace: chrono::Duration::seconds(30),
            entry_wait: chrono::Duration::seconds(300),
            defer_base: Duration::from_millis(500),
            defer_max: Duration::from_secs(30),
            max_deliver: 10,
            cas_attempts: 200,
        }
    }
}

impl Settings {
    /// Defaults plus the process config: `[accounts.instruments]` override
    /// the built-in symbol table's multiplier and margin; `max_deliver` from
    /// the topology.
    pub fn from_config(config: &mtx_runtime::Config) -> Settings {
        let mut s = Settings::default();
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
    #[serde(default)]
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

fn progress(
    leg: &HeldLeg,
    created_at: DateTime<Utc>,
    state: Option<&AccountState>,
    grace: chrono::Duration,
) -> LegProgress {
    let Some(state) = state else {
        return LegProgress::Unbooked;
    };
    if let Some(o) = state
        .open_orders
        .iter()
        .find(|o| o.order_id == leg.order_id)
    {
        return LegProgress::Working(o.quantity.max(Decimal::ZERO).min(leg.quantity));
    }
    if leg.seen || state.timestamp >= created_at + grace {
        LegProgress::Settled
    } else {
        LegProgress::Unbooked
    }
}

impl ReservationBook {
    /// Mark working legs seen and drop fully settled entries; whether
    /// anything changed.
    pub fn reconcile(&mut self, state: Option<&AccountState>, grace: chrono::Duration) -> bool {
        let mut changed = false;
        self.held.retain(|_, h| {
            let mut all_settled = true;
            for l in &mut h.legs {
                match progress(l, h.created_at, state, grace) {
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
        state: Option<&AccountState>,
        grace: chrono::Duration,
        except: Option<&str>,
    ) -> BTreeMap<String, Reservation> {
        let mut out: BTreeMap<String, Reservation> = BTreeMap::new();
        for (sid, h) in &self.held {
            if Some(sid.as_str()) == except {
                continue;
            }
            let r = out.entry(h.strategy_id.clone()).or_default();
            for l in &h.legs {
                let frac = match progress(l, h.created_at, state, grace) {
                    LegProgress::Working(rem) if l.quantity > Decimal::ZERO => {
                        rem.checked_div(l.quantity).unwrap_or(Decimal::ONE)
                    }
                    LegProgress::Working(_) | LegProgress::Unbooked => Decimal::ONE,
                    LegProgress::Settled => Decimal::ZERO,
                };
                r.margin += l.margin * frac;
                r.notional += l.notional * frac;
            }
        }
        out
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

/// The Cerebro handler (one per replica).
pub struct Cerebro {
    subjects: Subjects,
    stores: Stores,
    live: Arc<RwLock<Live>>,
    settings: Settings,
    locks: std::sync::Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

enum Fail {
    Retry(String),
    Reject(&'static str, String),
}

fn retry(e: impl std::fmt::Display) -> Fail {
    Fail::Retry(e.to_string())
}

impl Cerebro {
    /// Open the buckets, load the current inputs and start the watchers
    /// (stopped by `shutdown`).
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
        let me = Arc::new(Cerebro {
            subjects,
            stores: stores.clone(),
            live: Arc::new(RwLock::new(Live::default())),
            settings,
            locks: std::sync::Mutex::new(BTreeMap::new()),
        });
        for (src, store) in [
            (Source::Strategies, stores.strategies),
            (Source::Allocations, stores.allocations),
            (Source::System, stores.system),
            (Source::AccountState, stores.state),
        ] {
            // Start watching first, then load what is there, so no update
            // between the two is missed (stale ones lose on revision).
            let watch = store.watch_all().await.map_err(|e| format!("watch: {e}"))?;
            me.load(src, &store).await?;
            tokio::spawn(Arc::clone(&me).watch(src, store, watch, shutdown.clone()));
        }
        Ok(me)
    }

    async fn load(&self, src: Source, store: &kv::Store) -> Result<(), String> {
        let mut keys = store.keys().await.map_err(|e| format!("kv keys: {e}"))?;
        let mut names = Vec::new();
        while let Some(k) = keys.next().await {
            let k = k.map_err(|e| format!("kv keys: {e}"))?;
            if src == Source::AccountState && k.contains('.') {
                continue;
            }
            names.push(k);
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
                    match store.watch_all().await {
                        Ok(w) => {
                            watch = w;
                            let _ = self.load(src, &store).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "kv re-watch failed"),
                    }
                }
            }
        }
    }

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

    /// Reconcile an account's book with its latest state and store it if it
    /// changed.
    async fn sync_book(&self, account: &str) -> Result<(), String> {
        let lock = self.lock_for(account);
        let _g = lock.lock().await;
        for _ in 0..self.settings.cas_attempts {
            let (rev, mut book) = self.read_book(account).await.map_err(|_| "kv read")?;
            let state = self.account_state(account);
            if !book.reconcile(state.as_ref(), self.settings.unbooked_grace) {
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

    fn snapshot(&self, now: DateTime<Utc>) -> Inputs {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
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
            marks: BTreeMap::new(),
            entries: BTreeMap::new(),
            returns: None,
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
            || base_now.signed_duration_since(signal.received_at) >= self.settings.entry_wait;
        let opts = DecideOptions {
            entry_wait_expired: expired,
        };
        let probe = self.snapshot(base_now);
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
        let lock = self.lock_for(&account);
        let _g = lock.lock().await;
        for _ in 0..self.settings.cas_attempts {
            let now = Utc::now();
            let mut inputs = self.snapshot(now);
            let (book_rev, mut book) = self.read_book(&account).await?;
            let state = self.account_state(&account);
            let grace = self.settings.unbooked_grace;
            let book_changed = book.reconcile(state.as_ref(), grace);
            if let Some(st) = &state {
                let mut a = AccountInputs::new(st.clone());
                a.reserved = book.reserved(state.as_ref(), grace, Some(&signal.signal_id));
                inputs.accounts.insert(account.clone(), a);
            }
            // Entry record with its live fill progress and earlier exits.
            let mut exits_rev = None;
            let mut exits = ExitProgress::default();
            if let (Some(entry_id), Some(se)) = (signal.entry_signal_id.as_deref(), &stored_entry) {
                if let Some((r, p)) = self.read_json::<ExitProgress>(&exits_key(entry_id)).await? {
                    exits_rev = Some(r);
                    exits = p;
                }
                let rec = entry_with_progress(
                    entry_id,
                    se,
                    book.held.get(entry_id),
                    state.as_ref(),
                    grace,
                    &exits,
                    &signal.signal_id,
                );
                inputs.entries.insert(entry_id.to_string(), rec);
            }
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
    state: Option<&AccountState>,
    grace: chrono::Duration,
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
                (None, Some((hl, created))) => match progress(hl, created, state, grace) {
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
