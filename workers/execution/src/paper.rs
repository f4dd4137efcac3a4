//! A deterministic paper venue: a pure matching engine.
//!
//! The venue keeps working orders and the latest mark per symbol, and turns
//! inputs ([`PaperVenue::submit`], [`PaperVenue::on_price`],
//! [`PaperVenue::cancel`], [`PaperVenue::tick`]) into [`VenueEvent`]s. Every
//! order's lifecycle goes through [`OrderFsm`]. There is no clock, randomness
//! or hash-map iteration inside: the same inputs always give the same outputs,
//! so a run can be replayed exactly.
//!
//! # Time
//!
//! Every input carries `now`. Each call first expires working orders whose
//! `expiry <= now` (in arrival order), then does its own work.
//!
//! # Matching rules
//!
//! - **MARKET** fills at the current mark — the latest [`PaperVenue::on_price`]
//!   for the symbol, else the order's reference `price` — moved against the
//!   trader by `slippage_bps`: a buy pays `mark * (1 + bps/10000)`, a sell
//!   receives `mark * (1 - bps/10000)`. With neither a mark nor a reference
//!   price the order is rejected.
//! - **LIMIT** (limit = `price`) fills only when a mark crosses it (buy: mark
//!   <= limit, sell: mark >= limit). Marketable on arrival, it fills at the mark
//!   (better than the limit); once it has rested, at the limit itself (the
//!   conservative assumption for a gap through a resting order). No slippage.
//! - **STOP** (trigger = `stop_price`, else `price`) triggers when a mark
//!   crosses it (buy: mark >= stop, sell: mark <= stop) and from then on fills
//!   as MARKET, slippage included.
//!
//! # Partial fills
//!
//! With `fill_ratio = None` a fill takes the whole remaining quantity. With
//! `fill_ratio = Some(r)`, `0 < r <= 1`, each fill opportunity (the arrival
//! match and each later mark for the symbol) fills
//! `ceil(remaining * r / lot) * lot`, capped at the remaining quantity. Rounding
//! up to a whole lot guarantees progress (at least one lot, or the whole
//! sub-lot remainder). Example: 10 units, r = 0.5, lot 1: 5, 3, 1, 1.
//!
//! # Commission
//!
//! Per execution: [`CommissionModel`] applied to that fill, then raised to the
//! configured minimum if any.
//!
//! # Stop-loss / take-profit (OCO)
//!
//! When an ENTRY order with `stop_loss` and/or `take_profit` ends with anything
//! filled (FILLED, or CANCELLED/EXPIRED after partial fills), the venue creates
//! child EXIT orders for the filled quantity: a STOP at `stop_loss` and a LIMIT
//! at `take_profit`, on the opposite side, with ids
//! `derive_id("ord", [parent_id, "SL" | "TP"])` and `parent_order_id` set. Each
//! child is announced as [`VenueEvent::ChildOrder`], then submitted and matched
//! like any order. The two children are one-cancels-other: the first fill of
//! either makes the venue cancel the other (an unsolicited cancel).
//!
//! # Ids
//!
//! Each execution of an order is numbered `fill_seq = 1, 2, ...` (a rejection
//! counts) and gets `ids::execution_id(order_id, fill_seq)`. Order events carry
//! a per-order `seq` starting at 1. `seed` only namespaces the venue's own
//! order ids in `broker_response` (`derive_id("pvo", [seed, order_id])`), so two
//! paper venues can be told apart; matching itself uses no randomness.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mtx_schemas::ids::{derive_id, execution_id};
use mtx_schemas::limits;
use mtx_schemas::order::{opposite_side, ExecutionConfirmation, Order, OrderEvent};
use mtx_schemas::{ExecutionStatus, OrderStatus, OrderType, Side, SignalAction};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::fsm::{FsmEvent, OrderFsm};

const BPS: Decimal = Decimal::from_parts(10_000, 0, 0, false, 0);

/// How a fill's commission is computed, before the minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommissionModel {
    /// Rate per share / unit (equities, ETFs).
    PerShare(Decimal),
    /// Rate per contract (futures, options).
    PerContract(Decimal),
    /// Basis points of the fill notional (`qty * price * multiplier`).
    Bps(Decimal),
}

/// A commission model plus an optional per-execution minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commission {
    /// The rate.
    pub model: CommissionModel,
    /// Minimum charge per execution, if any.
    pub minimum: Option<Decimal>,
}

impl Commission {
    /// No commission at all.
    pub const FREE: Commission = Commission {
        model: CommissionModel::PerShare(Decimal::ZERO),
        minimum: None,
    };

    /// Commission for one execution of `qty` at `price`.
    pub fn charge(&self, qty: Decimal, price: Decimal, multiplier: Decimal) -> Decimal {
        let raw = match self.model {
            CommissionModel::PerShare(rate) | CommissionModel::PerContract(rate) => rate * qty,
            CommissionModel::Bps(bps) => qty * price * multiplier * bps / BPS,
        };
        match self.minimum {
            Some(min) if raw < min => min,
            _ => raw,
        }
    }
}

/// Venue configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaperConfig {
    /// Slippage against the trader on MARKET (and triggered STOP) fills, in
    /// basis points of the mark; `0 <= bps < 10000`.
    pub slippage_bps: Decimal,
    /// Fraction of the remaining quantity filled per fill opportunity
    /// (`0 < r <= 1`); `None` fills everything at once.
    pub fill_ratio: Option<Decimal>,
    /// Commission per execution.
    pub commission: Commission,
    /// Namespaces the venue order ids in `broker_response`.
    pub seed: u64,
    /// Lot size for instruments not in `lot_sizes` (partial-fill rounding).
    pub default_lot: Decimal,
    /// Per-instrument lot sizes, e.g. `BTC` → `0.0001`.
    pub lot_sizes: BTreeMap<String, Decimal>,
}

impl Default for PaperConfig {
    /// No slippage, complete fills, no commission, seed 0, lot 1.
    fn default() -> Self {
        PaperConfig {
            slippage_bps: Decimal::ZERO,
            fill_ratio: None,
            commission: Commission::FREE,
            seed: 0,
            default_lot: Decimal::ONE,
            lot_sizes: BTreeMap::new(),
        }
    }
}

/// A [`PaperConfig`] the venue refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// Slippage outside `[0, 10000)` bps.
    #[error("slippage_bps must be in [0, 10000), got {0}")]
    Slippage(Decimal),
    /// Fill ratio outside `(0, 1]`.
    #[error("fill_ratio must be in (0, 1], got {0}")]
    FillRatio(Decimal),
    /// A lot size that is not positive.
    #[error("lot size for {instrument} must be positive, got {lot}")]
    Lot {
        /// Instrument (or `default`).
        instrument: String,
        /// The bad lot.
        lot: Decimal,
    },
}

/// Something the venue reports. Order events carry the order's new status and
/// per-order sequence; fills and rejections also carry the execution
/// confirmation to persist and forward to accounts.
#[derive(Debug, Clone, PartialEq)]
pub enum VenueEvent {
    /// A child stop-loss / take-profit order the venue created (persist it to
    /// `trading_orders`); its own Submitted/Accepted events follow.
    ChildOrder(Order),
    /// PENDING → SUBMITTED: the venue received the order.
    Submitted(OrderEvent),
    /// SUBMITTED → ACCEPTED: the order is working.
    Accepted(OrderEvent),
    /// A fill or partial fill.
    Fill {
        /// The execution (status FILLED or PARTIAL_FILL).
        execution: ExecutionConfirmation,
        /// The order's new status and fill progress.
        event: OrderEvent,
    },
    /// The order was refused.
    Rejected {
        /// A REJECTED confirmation (quantity and price zero).
        execution: ExecutionConfirmation,
        /// The order's REJECTED event, with the reason.
        event: OrderEvent,
    },
    /// A cancel request was taken (→ CANCEL_REQUESTED).
    CancelRequested(OrderEvent),
    /// The order was cancelled (requested, or OCO).
    Cancelled(OrderEvent),
    /// A cancel request was refused (unknown or finished order); nothing changed.
    CancelRejected {
        /// The order named by the request.
        order_id: String,
        /// Why.
        reason: String,
        /// When.
        timestamp: DateTime<Utc>,
    },
    /// The order reached its expiry (→ EXPIRED).
    Expired(OrderEvent),
}

impl VenueEvent {
    /// The order status event inside, if any.
    pub fn order_event(&self) -> Option<&OrderEvent> {
        match self {
            VenueEvent::Submitted(e)
            | VenueEvent::Accepted(e)
            | VenueEvent::CancelRequested(e)
            | VenueEvent::Cancelled(e)
            | VenueEvent::Expired(e)
            | VenueEvent::Fill { event: e, .. }
            | VenueEvent::Rejected { event: e, .. } => Some(e),
            VenueEvent::ChildOrder(_) | VenueEvent::CancelRejected { .. } => None,
        }
    }

    /// The execution confirmation inside, if any.
    pub fn execution(&self) -> Option<&ExecutionConfirmation> {
        match self {
            VenueEvent::Fill { execution, .. } | VenueEvent::Rejected { execution, .. } => {
                Some(execution)
            }
            VenueEvent::ChildOrder(_)
            | VenueEvent::Submitted(_)
            | VenueEvent::Accepted(_)
            | VenueEvent::CancelRequested(_)
            | VenueEvent::Cancelled(_)
            | VenueEvent::CancelRejected { .. }
            | VenueEvent::Expired(_) => None,
        }
    }
}

/// The venue's record of one order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Working {
    order: Order,
    fsm: OrderFsm,
    /// Last order-event seq used.
    event_seq: u64,
    /// Last execution seq used.
    fill_seq: u64,
    /// Σ fill qty × fill price, for the average fill price.
    notional: Decimal,
    /// A STOP whose trigger has been crossed.
    triggered: bool,
    /// The other child of an OCO pair.
    oco_sibling: Option<String>,
    /// Children already created (at most once).
    children_done: bool,
}

impl Working {
    fn avg_fill_price(&self) -> Option<Decimal> {
        let filled = self.fsm.filled();
        (filled > Decimal::ZERO).then(|| self.notional / filled)
    }

    /// Apply `ev` and build the matching order event. `None` if the table
    /// refuses (callers only send events valid in the current state).
    fn step(
        &mut self,
        ev: FsmEvent,
        reason: Option<String>,
        now: DateTime<Utc>,
    ) -> Option<OrderEvent> {
        let previous = self.fsm.status();
        let status = self.fsm.apply(ev).ok()?;
        self.order.status = status;
        self.event_seq += 1;
        Some(OrderEvent {
            order_id: self.order.order_id.clone(),
            account: self.order.account.clone(),
            status,
            previous_status: Some(previous),
            filled_quantity: self.fsm.filled(),
            avg_fill_price: self.avg_fill_price(),
            reason,
            timestamp: now,
            seq: self.event_seq,
        })
    }

    fn is_working(&self) -> bool {
        matches!(
            self.fsm.status(),
            OrderStatus::Accepted | OrderStatus::PartiallyFilled
        )
    }
}

/// What the venue remembers of a finished order after [`PaperVenue::compact`]:
/// enough to stay idempotent on its id and to refuse a late cancel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Finished {
    account: String,
    status: OrderStatus,
    filled: Decimal,
    fingerprint: String,
    finished_at: DateTime<Utc>,
}

/// A finished order taken out of the venue ([`PaperVenue::drain_finished`]):
/// what must be remembered of it, outside the venue, while a redelivery of
/// the order or of a cancel of it is possible. The execution worker stores
/// one per order in KV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedOrder {
    /// The order id.
    pub order_id: String,
    /// Account of the order.
    pub account: String,
    /// Terminal status.
    pub status: OrderStatus,
    /// Cumulative filled quantity.
    pub filled: Decimal,
    /// [`order_fingerprint`] of the order as received.
    pub fingerprint: String,
    /// When it left the venue.
    pub finished_at: DateTime<Utc>,
}

impl FinishedOrder {
    /// The same facts as [`PaperVenue::lookup`] gives for a known order.
    pub fn info(&self) -> OrderInfo {
        OrderInfo {
            account: self.account.clone(),
            status: self.status,
            filled: self.filled,
            fingerprint: self.fingerprint.clone(),
        }
    }
}

/// What the venue knows about one order id ([`PaperVenue::lookup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrderInfo {
    /// Account of the order.
    pub account: String,
    /// Current status.
    pub status: OrderStatus,
    /// Cumulative filled quantity.
    pub filled: Decimal,
    /// [`order_fingerprint`] of the order as received.
    pub fingerprint: String,
}

/// The economic content of an order: a re-sent order with the same id and the
/// same fingerprint is a duplicate; a different fingerprint is a conflict.
/// Decimals are normalized (`10` and `10.0` agree); status, timestamps and
/// Cerebro's rationale are not part of it.
pub fn order_fingerprint(o: &Order) -> String {
    let d = |x: Decimal| x.normalize().to_string();
    let od = |x: Option<Decimal>| x.map(d).unwrap_or_default();
    derive_id(
        "ofp",
        &[
            &o.account,
            &o.strategy_id,
            &o.instrument,
            o.instrument_type.as_str(),
            o.action.as_str(),
            o.side.as_str(),
            o.order_type.as_str(),
            &d(o.quantity),
            &od(o.price),
            &od(o.stop_price),
            &od(o.stop_loss),
            &od(o.take_profit),
            &d(o.multiplier),
            &o.expiry.map(|x| x.to_rfc3339()).unwrap_or_default(),
            &o.parent_order_id.clone().unwrap_or_default(),
        ],
    )
}

/// The venue's durable state (everything but the configuration), for
/// persisting between runs ([`PaperVenue::state`] / [`PaperVenue::restore`]).
/// Serialized with serde; its fields are private.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VenueState {
    orders: BTreeMap<String, Working>,
    arrival: Vec<String>,
    marks: BTreeMap<String, Decimal>,
    #[serde(default)]
    finished: BTreeMap<String, Finished>,
}

/// [`VenueState`] by reference, for serializing without a copy (same JSON).
#[derive(Serialize)]
struct VenueStateRef<'a> {
    orders: &'a BTreeMap<String, Working>,
    arrival: &'a Vec<String>,
    marks: &'a BTreeMap<String, Decimal>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    finished: &'a BTreeMap<String, Finished>,
}

/// A [`VenueState`] that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The state contradicts itself (a corrupted or hand-edited snapshot).
    #[error("inconsistent venue state: {0}")]
    Inconsistent(String),
}

/// The paper venue. See the module docs for the rules.
#[derive(Debug, Clone)]
pub struct PaperVenue {
    config: PaperConfig,
    orders: BTreeMap<String, Working>,
    /// Order ids in arrival order (the deterministic iteration order).
    arrival: Vec<String>,
    marks: BTreeMap<String, Decimal>,
    /// Compacted finished orders.
    finished: BTreeMap<String, Finished>,
    /// No working order expires before this; `None`: none has an expiry.
    /// (Derived, not part of the state: spares a scan of every working
    /// order on every input.)
    next_expiry: Option<DateTime<Utc>>,
}

impl PaperVenue {
    /// A venue with `config` (validated).
    pub fn new(config: PaperConfig) -> Result<Self, ConfigError> {
        if config.slippage_bps < Decimal::ZERO || config.slippage_bps >= BPS {
            return Err(ConfigError::Slippage(config.slippage_bps));
        }
        if let Some(r) = config.fill_ratio {
            if r <= Decimal::ZERO || r > Decimal::ONE {
                return Err(ConfigError::FillRatio(r));
            }
        }
        let lots = std::iter::once(("default", config.default_lot))
            .chain(config.lot_sizes.iter().map(|(k, v)| (k.as_str(), *v)));
        for (instrument, lot) in lots {
            if lot <= Decimal::ZERO {
                return Err(ConfigError::Lot {
                    instrument: instrument.to_string(),
                    lot,
                });
            }
        }
        Ok(PaperVenue {
            config,
            orders: BTreeMap::new(),
            arrival: Vec::new(),
            marks: BTreeMap::new(),
            finished: BTreeMap::new(),
            next_expiry: None,
        })
    }

    /// A venue with `config` continuing from `state`. The state is checked:
    /// every order's machine is consistent, arrival order and orders agree,
    /// and no id is both working and finished.
    pub fn restore(config: PaperConfig, state: VenueState) -> Result<Self, StateError> {
        let mut v = PaperVenue::new(config)?;
        let bad = |s: String| Err(StateError::Inconsistent(s));
        for (id, w) in &state.orders {
            if *id != w.order.order_id {
                return bad(format!(
                    "order stored under {id} has id {}",
                    w.order.order_id
                ));
            }
            if !w.fsm.is_consistent() || w.order.status != w.fsm.status() {
                return bad(format!("order {id}: inconsistent state machine"));
            }
            if state.finished.contains_key(id) {
                return bad(format!("order {id} is both working and finished"));
            }
        }
        let mut arrival: Vec<&String> = state.arrival.iter().collect();
        arrival.sort();
        arrival.dedup();
        if arrival.len() != state.arrival.len() || !arrival.iter().copied().eq(state.orders.keys())
        {
            return bad("arrival order does not match the orders".into());
        }
        v.orders = state.orders;
        v.arrival = state.arrival;
        v.marks = state.marks;
        v.finished = state.finished;
        v.next_expiry = v.earliest_expiry();
        Ok(v)
    }

    /// A copy of the durable state (see [`PaperVenue::restore`]).
    pub fn state(&self) -> VenueState {
        VenueState {
            orders: self.orders.clone(),
            arrival: self.arrival.clone(),
            marks: self.marks.clone(),
            finished: self.finished.clone(),
        }
    }

    /// Append the durable state as JSON to `out`, without copying it first.
    /// The JSON is that of [`PaperVenue::state`] (it deserializes as a
    /// [`VenueState`]).
    pub fn write_state(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(
            out,
            &VenueStateRef {
                orders: &self.orders,
                arrival: &self.arrival,
                marks: &self.marks,
                finished: &self.finished,
            },
        )
    }

    /// Take every finished order out of the venue: terminal orders still held
    /// in full and the records [`PaperVenue::compact`] kept. The venue then
    /// holds working orders only and no longer knows these ids; the caller
    /// remembers them (see [`FinishedOrder`]). Returns them in arrival order,
    /// then the compacted records. Call between inputs.
    pub fn drain_finished(&mut self, now: DateTime<Utc>) -> Vec<FinishedOrder> {
        let mut out = Vec::new();
        let orders = &mut self.orders;
        self.arrival.retain(|id| {
            let Some(w) = orders.get(id) else {
                return false;
            };
            if !w.fsm.status().is_terminal() {
                return true;
            }
            if let Some(w) = orders.remove(id) {
                out.push(FinishedOrder {
                    order_id: w.order.order_id.clone(),
                    account: w.order.account.clone(),
                    status: w.fsm.status(),
                    filled: w.fsm.filled(),
                    fingerprint: order_fingerprint(&w.order),
                    finished_at: now,
                });
            }
            false
        });
        for (order_id, f) in std::mem::take(&mut self.finished) {
            out.push(FinishedOrder {
                order_id,
                account: f.account,
                status: f.status,
                filled: f.filled,
                fingerprint: f.fingerprint,
                finished_at: f.finished_at,
            });
        }
        out
    }

    /// Forget the details of finished orders, keeping a small record per id
    /// (so the venue stays idempotent on it and refuses late cancels), and drop
    /// those records once they are older than `retain`. Call between inputs.
    /// Returns the number of orders compacted.
    pub fn compact(&mut self, now: DateTime<Utc>, retain: chrono::Duration) -> usize {
        let done: Vec<String> = self
            .arrival
            .iter()
            .filter(|id| {
                self.orders
                    .get(*id)
                    .is_some_and(|w| w.fsm.status().is_terminal())
            })
            .cloned()
            .collect();
        for id in &done {
            if let Some(w) = self.orders.remove(id) {
                self.finished.insert(
                    id.clone(),
                    Finished {
                        account: w.order.account.clone(),
                        status: w.fsm.status(),
                        filled: w.fsm.filled(),
                        fingerprint: order_fingerprint(&w.order),
                        finished_at: now,
                    },
                );
            }
        }
        self.arrival.retain(|id| self.orders.contains_key(id));
        let horizon = now - retain;
        self.finished.retain(|_, f| f.finished_at > horizon);
        done.len()
    }

    /// What the venue knows about `order_id`: working or finished.
    pub fn lookup(&self, order_id: &str) -> Option<OrderInfo> {
        if let Some(w) = self.orders.get(order_id) {
            return Some(OrderInfo {
                account: w.order.account.clone(),
                status: w.fsm.status(),
                filled: w.fsm.filled(),
                fingerprint: order_fingerprint(&w.order),
            });
        }
        self.finished.get(order_id).map(|f| OrderInfo {
            account: f.account.clone(),
            status: f.status,
            filled: f.filled,
            fingerprint: f.fingerprint.clone(),
        })
    }

    /// Latest mark of every symbol.
    pub fn marks(&self) -> &BTreeMap<String, Decimal> {
        &self.marks
    }

    /// The configuration in use.
    pub fn config(&self) -> &PaperConfig {
        &self.config
    }

    /// Latest mark for `symbol`.
    pub fn mark(&self, symbol: &str) -> Option<Decimal> {
        self.marks.get(symbol).copied()
    }

    /// Status of a known order (working or finished).
    pub fn status(&self, order_id: &str) -> Option<OrderStatus> {
        self.lookup(order_id).map(|i| i.status)
    }

    /// Filled quantity of a known order (working or finished).
    pub fn filled_quantity(&self, order_id: &str) -> Option<Decimal> {
        self.lookup(order_id).map(|i| i.filled)
    }

    /// A known order not yet compacted, with its status field kept current.
    pub fn order(&self, order_id: &str) -> Option<&Order> {
        self.orders.get(order_id).map(|w| &w.order)
    }

    /// Non-terminal orders in arrival order.
    pub fn working_orders(&self) -> impl Iterator<Item = &Order> + '_ {
        self.arrival
            .iter()
            .filter_map(|id| self.orders.get(id))
            .filter(|w| !w.fsm.status().is_terminal())
            .map(|w| &w.order)
    }

    /// Receive `order`. Idempotent: an order id seen before yields nothing.
    ///
    /// Emits Submitted, then either Rejected (invalid order), Expired (expiry
    /// already passed) or Accepted followed by whatever the arrival match
    /// produces. The incoming `status` field is ignored; the venue starts every
    /// order at PENDING.
    pub fn submit(&mut self, order: Order, now: DateTime<Utc>) -> Vec<VenueEvent> {
        if self.orders.contains_key(&order.order_id) || self.finished.contains_key(&order.order_id)
        {
            return Vec::new();
        }
        let mut out = self.expire_due(now);
        let id = order.order_id.clone();
        out.extend(self.admit(order, now));
        out.extend(self.try_match(&id, true, now));
        out
    }

    /// A new mark for `symbol`: records it, then matches that symbol's working
    /// orders in arrival order. Non-positive prices are ignored (a bad tick
    /// must not trigger anything).
    pub fn on_price(
        &mut self,
        symbol: &str,
        price: Decimal,
        now: DateTime<Utc>,
    ) -> Vec<VenueEvent> {
        let mut out = self.expire_due(now);
        if price <= Decimal::ZERO {
            return out;
        }
        self.marks.insert(symbol.to_string(), price);
        let ids: Vec<String> = self
            .arrival
            .iter()
            .filter(|id| {
                self.orders
                    .get(*id)
                    .is_some_and(|w| w.order.instrument == symbol && w.is_working())
            })
            .cloned()
            .collect();
        for id in ids {
            out.extend(self.try_match(&id, false, now));
        }
        out
    }

    /// Cancel a working order. The paper venue confirms at once:
    /// CancelRequested then Cancelled. Unknown or finished orders give
    /// [`VenueEvent::CancelRejected`] and change nothing. Cancelling a partly
    /// filled entry creates its SL/TP children for the filled quantity.
    pub fn cancel(&mut self, order_id: &str, now: DateTime<Utc>) -> Vec<VenueEvent> {
        let mut out = self.expire_due(now);
        let reject = |reason: String| VenueEvent::CancelRejected {
            order_id: order_id.to_string(),
            reason,
            timestamp: now,
        };
        let Some(w) = self.orders.get_mut(order_id) else {
            let reason = match self.finished.get(order_id) {
                Some(f) => format!("order is {}", f.status),
                None => "unknown order".to_string(),
            };
            out.push(reject(reason));
            return out;
        };
        if w.fsm.status().is_terminal() {
            out.push(reject(format!("order is {}", w.fsm.status())));
            return out;
        }
        let reason = Some("cancel requested".to_string());
        if let Some(e) = w.step(FsmEvent::CancelRequest, reason.clone(), now) {
            out.push(VenueEvent::CancelRequested(e));
        }
        if let Some(e) = w.step(FsmEvent::CancelConfirm, reason, now) {
            out.push(VenueEvent::Cancelled(e));
        }
        out.extend(self.spawn_children(order_id, now));
        out
    }

    /// Advance the clock: expire working orders whose expiry is at or before
    /// `now`.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<VenueEvent> {
        self.expire_due(now)
    }

    // ---- internals -------------------------------------------------------

    fn lot(&self, instrument: &str) -> Decimal {
        self.config
            .lot_sizes
            .get(instrument)
            .copied()
            .unwrap_or(self.config.default_lot)
    }

    /// Quantity of the next fill of an order with `remaining` open.
    fn slice(&self, instrument: &str, remaining: Decimal) -> Decimal {
        match self.config.fill_ratio {
            None => remaining,
            Some(r) => {
                let lot = self.lot(instrument);
                // Checked: a lot far finer than the quantity (1e-20 of 1e10)
                // has no slice in range; the fill takes what remains.
                let q = remaining
                    .checked_mul(r)
                    .and_then(|x| x.checked_div(lot))
                    .and_then(|x| x.ceil().checked_mul(lot));
                match q {
                    Some(q) if q > Decimal::ZERO && q <= remaining => q,
                    _ => remaining,
                }
            }
        }
    }

    /// `mark` moved against the trader by the configured slippage.
    fn slipped(&self, mark: Decimal, side: Side) -> Decimal {
        let f = self.config.slippage_bps / BPS;
        match side {
            Side::Buy => mark * (Decimal::ONE + f),
            Side::Sell => mark * (Decimal::ONE - f),
        }
    }

    /// Why the venue refuses `order`, if it does.
    fn validate(&self, order: &Order) -> Option<String> {
        if order.multiplier <= Decimal::ZERO {
            return Some(format!(
                "multiplier must be positive, got {}",
                order.multiplier
            ));
        }
        if let Err(e) = limits::check_quantity(order.quantity, order.multiplier) {
            return Some(format!("quantity {e}"));
        }
        let prices = [
            ("price", order.price),
            ("stop_price", order.stop_price),
            ("stop_loss", order.stop_loss),
            ("take_profit", order.take_profit),
        ];
        for (name, p) in prices {
            if let Some(Err(e)) = p.map(limits::check_price) {
                return Some(format!("{name} {e}"));
            }
        }
        match order.order_type {
            OrderType::Market => {
                if order.price.is_none() && self.mark(&order.instrument).is_none() {
                    return Some(format!(
                        "no price for MARKET order: no mark for {} and no reference price",
                        order.instrument
                    ));
                }
            }
            OrderType::Limit => {
                if order.price.is_none() {
                    return Some("LIMIT order without a limit price".to_string());
                }
            }
            OrderType::Stop => {
                if order.stop_price.or(order.price).is_none() {
                    return Some("STOP order without a stop price".to_string());
                }
            }
        }
        None
    }

    /// Register `order` and run it to ACCEPTED (or REJECTED / EXPIRED). No
    /// matching.
    fn admit(&mut self, order: Order, now: DateTime<Utc>) -> Vec<VenueEvent> {
        let mut out = Vec::new();
        let problem = self.validate(&order);
        let fsm = match OrderFsm::new(order.quantity) {
            Ok(f) => f,
            // Only reachable for a non-positive quantity, which `validate`
            // has already turned into a rejection.
            Err(_) => OrderFsm::new_unchecked(order.quantity),
        };
        let id = order.order_id.clone();
        if let Some(x) = order.expiry {
            self.next_expiry = Some(self.next_expiry.map_or(x, |n| n.min(x)));
        }
        let mut w = Working {
            order,
            fsm,
            event_seq: 0,
            fill_seq: 0,
            notional: Decimal::ZERO,
            triggered: false,
            oco_sibling: None,
            children_done: false,
        };
        w.order.status = OrderStatus::Pending;
        if let Some(e) = w.step(FsmEvent::Submit, None, now) {
            out.push(VenueEvent::Submitted(e));
        }
        if let Some(reason) = problem {
            w.fill_seq += 1;
            let execution = Self::confirmation(
                self.config.seed,
                &w,
                Decimal::ZERO,
                Decimal::ZERO,
                Decimal::ZERO,
                ExecutionStatus::Rejected,
                json!({ "reason": reason }),
                now,
            );
            if let Some(event) = w.step(FsmEvent::Reject, Some(reason), now) {
                out.push(VenueEvent::Rejected { execution, event });
            }
        } else if w.order.expiry.is_some_and(|x| x <= now) {
            if let Some(e) = w.step(FsmEvent::Expire, Some("expired on arrival".into()), now) {
                out.push(VenueEvent::Expired(e));
            }
        } else if let Some(e) = w.step(FsmEvent::Accept, None, now) {
            out.push(VenueEvent::Accepted(e));
        }
        self.orders.insert(id.clone(), w);
        self.arrival.push(id);
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn confirmation(
        seed: u64,
        w: &Working,
        qty: Decimal,
        price: Decimal,
        commission: Decimal,
        status: ExecutionStatus,
        mut detail: serde_json::Value,
        now: DateTime<Utc>,
    ) -> ExecutionConfirmation {
        let o = &w.order;
        let seed = seed.to_string();
        if let Some(m) = detail.as_object_mut() {
            m.insert("venue".into(), json!("PAPER"));
            m.insert(
                "venue_order_id".into(),
                json!(derive_id("pvo", &[&seed, &o.order_id])),
            );
            m.insert("fill_seq".into(), json!(w.fill_seq));
        }
        ExecutionConfirmation {
            execution_id: execution_id(&o.order_id, w.fill_seq),
            order_id: o.order_id.clone(),
            account: o.account.clone(),
            strategy_id: o.strategy_id.clone(),
            instrument: o.instrument.clone(),
            instrument_type: o.instrument_type,
            direction: o.position_direction(),
            action: o.action,
            side: o.side,
            quantity: qty,
            price,
            commission,
            multiplier: o.multiplier,
            status,
            broker_response: detail,
            timestamp: now,
        }
    }

    /// The price a working order would fill at now, or `None` if it does not
    /// fill. May mark a STOP as triggered.
    fn fill_price(&mut self, order_id: &str, at_arrival: bool) -> Option<Decimal> {
        let w = self.orders.get(order_id)?;
        let mark = self.marks.get(&w.order.instrument).copied();
        let side = w.order.side;
        match w.order.order_type {
            OrderType::Market => mark.or(w.order.price).map(|m| self.slipped(m, side)),
            OrderType::Limit => {
                let (mark, limit) = (mark?, w.order.price?);
                let crossed = match side {
                    Side::Buy => mark <= limit,
                    Side::Sell => mark >= limit,
                };
                match (crossed, at_arrival) {
                    (false, _) => None,
                    (true, true) => Some(mark),
                    (true, false) => Some(limit),
                }
            }
            OrderType::Stop => {
                let mark = mark?;
                if !w.triggered {
                    let stop = w.order.stop_price.or(w.order.price)?;
                    let crossed = match side {
                        Side::Buy => mark >= stop,
                        Side::Sell => mark <= stop,
                    };
                    if !crossed {
                        return None;
                    }
                    if let Some(w) = self.orders.get_mut(order_id) {
                        w.triggered = true;
                    }
                }
                Some(self.slipped(mark, side))
            }
        }
    }

    /// Try to fill one slice of a working order.
    fn try_match(
        &mut self,
        order_id: &str,
        at_arrival: bool,
        now: DateTime<Utc>,
    ) -> Vec<VenueEvent> {
        let mut out = Vec::new();
        if !self.orders.get(order_id).is_some_and(Working::is_working) {
            return out;
        }
        let price = self.fill_price(order_id, at_arrival);
        let Some(w) = self.orders.get(order_id) else {
            return out;
        };
        let Some(price) = price else {
            return out;
        };
        let qty = self.slice(&w.order.instrument, w.fsm.remaining());
        let commission = self
            .config
            .commission
            .charge(qty, price, w.order.multiplier);
        let mark = self.marks.get(&w.order.instrument).copied();
        let (seed, slippage_bps) = (self.config.seed, self.config.slippage_bps);
        let Some(w) = self.orders.get_mut(order_id) else {
            return out;
        };
        let first_fill = w.fsm.filled() == Decimal::ZERO;
        // If the machine refuses, nothing changes: `step` leaves the order
        // as it was and the notional is put back.
        let notional = w.notional;
        w.notional += qty * price;
        let Some(event) = w.step(w.fsm.fill_event(qty), None, now) else {
            w.notional = notional;
            return out;
        };
        w.fill_seq += 1;
        let status = if event.status == OrderStatus::Filled {
            ExecutionStatus::Filled
        } else {
            ExecutionStatus::PartialFill
        };
        let detail = json!({
            "mark": mark,
            "order_type": w.order.order_type,
            "slippage_bps": slippage_bps,
            "leaves_quantity": w.fsm.remaining(),
        });
        let execution = Self::confirmation(seed, w, qty, price, commission, status, detail, now);
        let sibling = w.oco_sibling.clone();
        let terminal = w.fsm.status().is_terminal();
        out.push(VenueEvent::Fill { execution, event });

        if first_fill {
            if let Some(sib) = sibling {
                out.extend(self.oco_cancel(&sib, order_id, now));
            }
        }
        if terminal {
            out.extend(self.spawn_children(order_id, now));
        }
        out
    }

    /// Venue-initiated cancel of an OCO sibling.
    fn oco_cancel(&mut self, sibling: &str, filled: &str, now: DateTime<Utc>) -> Vec<VenueEvent> {
        let Some(w) = self.orders.get_mut(sibling) else {
            return Vec::new();
        };
        if w.fsm.status().is_terminal() {
            return Vec::new();
        }
        let reason = Some(format!("OCO: sibling {filled} filled"));
        w.step(FsmEvent::CancelConfirm, reason, now)
            .map(VenueEvent::Cancelled)
            .into_iter()
            .collect()
    }

    /// Create, submit and match the SL/TP children of a finished entry.
    fn spawn_children(&mut self, parent_id: &str, now: DateTime<Utc>) -> Vec<VenueEvent> {
        let mut out = Vec::new();
        let Some(p) = self.orders.get_mut(parent_id) else {
            return out;
        };
        let filled = p.fsm.filled();
        if p.children_done
            || !p.fsm.status().is_terminal()
            || p.order.action != SignalAction::Entry
            || filled <= Decimal::ZERO
            || (p.order.stop_loss.is_none() && p.order.take_profit.is_none())
        {
            return out;
        }
        p.children_done = true;
        let parent = p.order.clone();
        let child = |tag: &str, order_type: OrderType, level: Decimal| Order {
            order_id: derive_id("ord", &[parent_id, tag]),
            signal_id: parent.signal_id.clone(),
            strategy_id: parent.strategy_id.clone(),
            account: parent.account.clone(),
            timestamp: now,
            instrument: parent.instrument.clone(),
            instrument_type: parent.instrument_type,
            direction: parent.position_direction(),
            action: SignalAction::Exit,
            side: opposite_side(parent.side),
            order_type,
            price: Some(level),
            stop_price: (order_type == OrderType::Stop).then_some(level),
            quantity: filled,
            stop_loss: None,
            take_profit: None,
            expiry: None,
            cerebro_decision: None,
            status: OrderStatus::Pending,
            parent_order_id: Some(parent_id.to_string()),
            leg: parent.leg,
            multiplier: parent.multiplier,
        };
        let children: Vec<Order> = [
            parent.stop_loss.map(|sl| child("SL", OrderType::Stop, sl)),
            parent
                .take_profit
                .map(|tp| child("TP", OrderType::Limit, tp)),
        ]
        .into_iter()
        .flatten()
        .filter(|c| !self.orders.contains_key(&c.order_id))
        .collect();

        let ids: Vec<String> = children.iter().map(|c| c.order_id.clone()).collect();
        for c in children {
            out.push(VenueEvent::ChildOrder(c.clone()));
            out.extend(self.admit(c, now));
        }
        if let [a, b] = ids.as_slice() {
            if let Some(w) = self.orders.get_mut(a) {
                w.oco_sibling = Some(b.clone());
            }
            if let Some(w) = self.orders.get_mut(b) {
                w.oco_sibling = Some(a.clone());
            }
        }
        for id in &ids {
            out.extend(self.try_match(id, true, now));
        }
        out
    }

    /// The earliest expiry of a non-terminal order.
    fn earliest_expiry(&self) -> Option<DateTime<Utc>> {
        self.orders
            .values()
            .filter(|w| !w.fsm.status().is_terminal())
            .filter_map(|w| w.order.expiry)
            .min()
    }

    /// Expire every working order whose expiry is at or before `now`.
    fn expire_due(&mut self, now: DateTime<Utc>) -> Vec<VenueEvent> {
        if self.next_expiry.is_none_or(|x| x > now) {
            return Vec::new();
        }
        let due: Vec<String> = self
            .arrival
            .iter()
            .filter(|id| {
                self.orders.get(*id).is_some_and(|w| {
                    !w.fsm.status().is_terminal() && w.order.expiry.is_some_and(|x| x <= now)
                })
            })
            .cloned()
            .collect();
        let mut out = Vec::new();
        for id in due {
            if let Some(w) = self.orders.get_mut(&id) {
                if let Some(e) = w.step(FsmEvent::Expire, Some("expired".into()), now) {
                    out.push(VenueEvent::Expired(e));
                }
            }
            out.extend(self.spawn_children(&id, now));
        }
        self.next_expiry = self.earliest_expiry();
        out
    }
}

#[cfg(test)]
mod tests;
