//! [`decide`]: one standardized signal in, one decision (plus orders and
//! cancels) or a deferral out.
//!
//! # Entries (ENTRY, SCALE_IN, opening delta orders)
//!
//! Checks run in this order; the first failure rejects with its typed
//! [`Reason`]:
//!
//! 1. kill switch (`TRADING_ENABLED = false`);
//! 2. strategy configured, ACTIVE or TESTING, with an account;
//! 3. a positive allocation in the ACTIVE allocation;
//! 4. state of the strategy's account, with positive equity;
//! 5. `max_daily_loss` not reached (today's P&L `> −max_daily_loss`), and
//!    fewer approved-but-unbooked entries on the account than allowed
//!    ([`Reason::ReservationBacklog`]);
//! 6. every leg has an instrument spec and a price — MARKET: a fresh mark,
//!    else the signal price; LIMIT / STOP: the signal's limit / trigger price;
//! 7. the slippage rule ([`crate::risk::slippage`]);
//! 8. capital available (`allocated − deployed − reserved > 0`), sizing
//!    ([`crate::sizing`]), no leg rounding to zero;
//! 9. the shrinkable limits ([`crate::risk`]): shrink all legs by one common
//!    factor to fit, or reject when even that cannot fit;
//! 10. the optional CVaR limit, on the final size (rejects when CVaR after is
//!     above the limit and above CVaR before).
//!
//! "Held" (TARGET_WEIGHT's `held_i`, the position-size limit's position) is
//! the strategy's booked quantity in the leg's instrument and direction plus
//! the units its approved entries will still add
//! ([`crate::inputs::AccountInputs::pending`]): a target or a limit is the
//! position's, however many signals arrive before the fills are booked.
//!
//! The decision is MODIFIED when step 9 shrank the order (original = the
//! pre-check size, final = the shrunk size), APPROVED otherwise.
//!
//! # Exits and cancels
//!
//! See [`crate::exits`]: never blocked by the kill switch, the allocation or
//! the limits; may be deferred.
//!
//! # Untyped (delta) orders
//!
//! A signal with no `signal_type` moves the strategy's position by its
//! quantity. When the strategy holds a position opposite to every leg's
//! trade direction, it is a closing order (clamped to what is open — never
//! flipping); when it holds none on any leg, it is an entry; a mix is
//! rejected ([`Reason::MixedDeltaLegs`]).
//!
//! # Orders
//!
//! One [`Order`] per leg with a non-zero final quantity: `order_id =
//! ids::order_id(signal_id, leg)`, status PENDING, side from action and
//! position direction, LIMIT orders carry their limit price, STOP orders the
//! trigger (`price` and `stop_price`), MARKET orders the pricing price as a
//! reference. The leg's contract expiry is *not* the order's good-till time;
//! it is recorded in `cerebro_decision.risk_metrics.contract_expiry`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mtx_schemas::ids::order_id;
use mtx_schemas::order::{order_side, CancelOrder, CerebroDecision, Order};
use mtx_schemas::signal::{SignalLeg, StandardizedSignal};
use mtx_schemas::{
    Decision, Direction, Environment, InstrumentType, OrderStatus, OrderType, Side, SignalAction,
    SignalType, StrategyStatus, TradingMode,
};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::exits::{plan_cancel, plan_exit, DeferReason, ExitKind, ExitLegInput, Resolution};
use crate::inputs::{AccountInputs, DecideOptions, Inputs, Reservation, ResolvedInstrument};
use crate::risk::{
    add, cvar_impact, div, margin, max_scale, mul, notional, slippage, sub, Capacity,
    CorrelationImpact, CvarAssessment, CvarSkip, Reason, SlippageAssessment, SlippageLeg,
};
use crate::sizing::{scale_to_lot, size_entry, Capital, SizingLeg};

/// One leg as decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegDecision {
    /// Leg index.
    pub leg: u32,
    /// Symbol.
    pub instrument: String,
    /// Asset class.
    pub instrument_type: InstrumentType,
    /// ENTRY or EXIT (delta orders resolved).
    pub action: SignalAction,
    /// BUY or SELL.
    pub side: Side,
    /// Direction of the position opened or closed.
    pub direction: Direction,
    /// Order type.
    pub order_type: OrderType,
    /// The sender's quantity.
    pub sender_quantity: Decimal,
    /// Pre-check size (sized and rounded; for exits, the sender's intent in units).
    pub original_quantity: Decimal,
    /// Final quantity (zero when rejected or nothing to close).
    pub final_quantity: Decimal,
    /// Pricing price (entries) or reference price (exits), if any.
    pub price: Option<Decimal>,
    /// Contract multiplier.
    pub multiplier: Decimal,
    /// Lot size.
    pub lot_size: Decimal,
    /// Margin of the final quantity (entries; zero for exits).
    pub margin_required: Decimal,
    /// Notional of the final quantity.
    pub notional: Decimal,
    /// How the quantity was found.
    pub logic: String,
}

/// `cerebro_decisions.risk_assessment`: the seed's fields first, then the
/// numbers behind them. `None` = not computed (e.g. rejected earlier).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RiskAssessment {
    /// Account margin used plus reservations, before the order.
    pub portfolio_margin_before: Option<Decimal>,
    /// The same after the order (entries add margin, exits release it).
    pub portfolio_margin_after: Option<Decimal>,
    /// `portfolio_margin_after / equity × 100`.
    pub margin_utilization_pct: Option<Decimal>,
    /// CVaR after − before, currency (see [`CvarAssessment`]).
    pub cvar_contribution: Option<f64>,
    /// Correlation of the strategy with the book.
    pub correlation_impact: Option<CorrelationImpact>,
    /// Account equity.
    pub account_equity: Option<Decimal>,
    /// ACTIVE allocation id.
    pub allocation_id: Option<String>,
    /// Strategy allocation, percent.
    pub allocation_pct: Option<Decimal>,
    /// `equity × allocation_pct / 100`.
    pub allocated_capital: Option<Decimal>,
    /// Margin of the strategy's positions.
    pub deployed_capital: Option<Decimal>,
    /// Margin reserved by the strategy's in-flight orders.
    pub reserved_capital: Option<Decimal>,
    /// `allocated − deployed − reserved`.
    pub available_capital: Option<Decimal>,
    /// Margin of the final order.
    pub margin_required: Option<Decimal>,
    /// Margin released by an exit.
    pub margin_released: Option<Decimal>,
    /// Gross notional of positions plus reservations, before.
    pub gross_exposure_before: Option<Decimal>,
    /// The same after the order.
    pub gross_exposure_after: Option<Decimal>,
    /// `gross_exposure_after / equity`.
    pub leverage_after: Option<Decimal>,
    /// SENDER_EQUITY_RATIO factor `available / sender_equity`.
    pub scale_factor: Option<Decimal>,
    /// Common shrink factor applied by the limits (1 = none).
    pub shrink_factor: Option<Decimal>,
    /// Code of the limit that shrank the order.
    pub binding_limit: Option<String>,
    /// Strategy P&L today.
    pub pnl_today: Option<Decimal>,
    /// The slippage rule's numbers.
    pub slippage: Option<SlippageAssessment>,
    /// CVaR before / after.
    pub cvar: Option<CvarAssessment>,
    /// Why CVaR was not evaluated.
    pub cvar_skipped: Option<CvarSkip>,
}

/// A `cerebro_decisions` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    /// The signal decided.
    pub signal_id: String,
    /// Its strategy.
    pub strategy_id: String,
    /// Routed account, when known.
    pub account: Option<String>,
    /// Environment of the signal.
    pub environment: Environment,
    /// LIVE / PAPER from the strategy config, when known.
    pub trading_mode: Option<TradingMode>,
    /// Sender's signal type.
    pub signal_type: Option<SignalType>,
    /// Resolved action.
    pub action: Option<SignalAction>,
    /// Entry an exit / cancel refers to.
    pub entry_signal_id: Option<String>,
    /// APPROVED / REJECTED / MODIFIED.
    pub decision: Decision,
    /// Decision time.
    pub timestamp: DateTime<Utc>,
    /// Human-readable reason.
    pub reason: String,
    /// Stable reason code (`approved` when nothing to report).
    pub reason_code: String,
    /// The typed reason with its numbers.
    pub reason_detail: Option<Reason>,
    /// Leg 0's pre-check size.
    pub original_quantity: Decimal,
    /// Leg 0's final size.
    pub final_quantity: Decimal,
    /// Every leg.
    pub legs: Vec<LegDecision>,
    /// Risk numbers.
    pub risk_assessment: RiskAssessment,
}

/// A decided signal: the record to publish / store, and what to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The `cerebro_decisions` document.
    pub record: DecisionRecord,
    /// Orders for `orders.<account>.new` (empty when rejected).
    pub orders: Vec<Order>,
    /// Cancels for `orders.<account>.cancel`.
    pub cancels: Vec<CancelOrder>,
    /// Margin and notional the orders need; the worker reserves them
    /// atomically against the account before publishing.
    pub reservation: Reservation,
}

/// What [`decide`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum DecisionOutput {
    /// Decided (APPROVED / MODIFIED / REJECTED).
    Decided(Box<Decided>),
    /// Not decidable yet; redeliver later (nothing published).
    Defer {
        /// The signal.
        signal_id: String,
        /// Why.
        reason: DeferReason,
    },
}

impl DecisionOutput {
    /// The decided output, if any.
    pub fn decided(&self) -> Option<&Decided> {
        match self {
            DecisionOutput::Decided(d) => Some(d),
            DecisionOutput::Defer { .. } => None,
        }
    }
}

/// Decide a signal with default options.
pub fn decide(signal: &StandardizedSignal, inputs: &Inputs) -> DecisionOutput {
    decide_with(signal, inputs, DecideOptions::default())
}

/// Decide a signal (see the module docs).
pub fn decide_with(
    signal: &StandardizedSignal,
    inputs: &Inputs,
    opts: DecideOptions,
) -> DecisionOutput {
    let b = Builder::new(signal, inputs);
    if signal.legs.is_empty() {
        return b.reject(Reason::NoLegs);
    }
    if signal.signal_type == Some(SignalType::Cancel) {
        return b.cancel(opts);
    }
    match resolve_action(signal, inputs) {
        Err(r) => b.reject(r),
        Ok(Resolved::Entry) => b.entry(),
        Ok(Resolved::Exit(kind, dirs)) => b.exit(opts, kind, &dirs),
    }
}

enum Resolved {
    Entry,
    Exit(ExitKind, Vec<Direction>),
}

fn opposite(d: Direction) -> Direction {
    match d {
        Direction::Long => Direction::Short,
        Direction::Short => Direction::Long,
    }
}

fn resolve_action(signal: &StandardizedSignal, inputs: &Inputs) -> Result<Resolved, Reason> {
    match signal.action {
        Some(SignalAction::Entry) => Ok(Resolved::Entry),
        Some(SignalAction::Exit) => {
            let kind = if signal.signal_type == Some(SignalType::ScaleOut) {
                ExitKind::ScaleOut
            } else {
                ExitKind::Exit
            };
            Ok(Resolved::Exit(
                kind,
                signal.legs.iter().map(|l| l.direction).collect(),
            ))
        }
        None => {
            let acct = inputs
                .strategies
                .get(&signal.strategy_id)
                .and_then(|c| c.account.as_ref())
                .and_then(|a| inputs.accounts.get(a));
            let Some(acct) = acct else {
                return Ok(Resolved::Entry);
            };
            let closing: Vec<bool> = signal
                .legs
                .iter()
                .map(|l| {
                    acct.open_quantity(&signal.strategy_id, &l.instrument, opposite(l.direction))
                        > Decimal::ZERO
                })
                .collect();
            if closing.iter().all(|c| *c) {
                Ok(Resolved::Exit(
                    ExitKind::Delta,
                    signal.legs.iter().map(|l| opposite(l.direction)).collect(),
                ))
            } else if closing.iter().any(|c| *c) {
                Err(Reason::MixedDeltaLegs)
            } else {
                Ok(Resolved::Entry)
            }
        }
    }
}

fn f64_of(d: Decimal) -> f64 {
    d.to_f64().unwrap_or(0.0)
}

struct Builder<'a> {
    signal: &'a StandardizedSignal,
    inputs: &'a Inputs,
    ra: RiskAssessment,
    legs: Vec<LegDecision>,
    account: Option<String>,
    trading_mode: Option<TradingMode>,
    action: Option<SignalAction>,
}

/// A priced, specified entry leg.
struct EntryLeg<'a> {
    leg: &'a SignalLeg,
    spec: ResolvedInstrument,
    price: Decimal,
    held: Decimal,
    held_notional: Decimal,
}

impl<'a> Builder<'a> {
    fn new(signal: &'a StandardizedSignal, inputs: &'a Inputs) -> Self {
        let legs = signal
            .legs
            .iter()
            .enumerate()
            .map(|(i, l)| LegDecision {
                leg: i as u32,
                instrument: l.instrument.clone(),
                instrument_type: l.instrument_type,
                action: signal.action.unwrap_or(SignalAction::Entry),
                side: l.side,
                direction: l.direction,
                order_type: l.order_type,
                sender_quantity: l.quantity,
                original_quantity: Decimal::ZERO,
                final_quantity: Decimal::ZERO,
                price: l.price,
                multiplier: Decimal::ONE,
                lot_size: Decimal::ZERO,
                margin_required: Decimal::ZERO,
                notional: Decimal::ZERO,
                logic: String::new(),
            })
            .collect();
        let cfg = inputs.strategies.get(&signal.strategy_id);
        Builder {
            signal,
            inputs,
            ra: RiskAssessment::default(),
            legs,
            account: cfg.and_then(|c| c.account.clone()),
            trading_mode: cfg.map(|c| c.trading_mode),
            action: signal.action,
        }
    }

    fn record(
        &mut self,
        decision: Decision,
        reason: String,
        detail: Option<Reason>,
    ) -> DecisionRecord {
        let (original, fin) = self
            .legs
            .first()
            .map(|l| (l.original_quantity, l.final_quantity))
            .unwrap_or_default();
        DecisionRecord {
            signal_id: self.signal.signal_id.clone(),
            strategy_id: self.signal.strategy_id.clone(),
            account: self.account.clone(),
            environment: self.signal.environment,
            trading_mode: self.trading_mode,
            signal_type: self.signal.signal_type,
            action: self.action,
            entry_signal_id: self.signal.entry_signal_id.clone(),
            decision,
            timestamp: self.inputs.now,
            reason,
            reason_code: detail
                .as_ref()
                .map(|r| r.code())
                .unwrap_or("approved")
                .to_string(),
            reason_detail: detail,
            original_quantity: original,
            final_quantity: fin,
            legs: std::mem::take(&mut self.legs),
            risk_assessment: std::mem::take(&mut self.ra),
        }
    }

    fn reject(mut self, reason: Reason) -> DecisionOutput {
        for l in &mut self.legs {
            l.final_quantity = Decimal::ZERO;
            l.margin_required = Decimal::ZERO;
            l.notional = Decimal::ZERO;
        }
        let record = self.record(Decision::Rejected, reason.to_string(), Some(reason));
        DecisionOutput::Decided(Box::new(Decided {
            record,
            orders: Vec::new(),
            cancels: Vec::new(),
            reservation: Reservation::default(),
        }))
    }

    fn defer(self, reason: DeferReason) -> DecisionOutput {
        DecisionOutput::Defer {
            signal_id: self.signal.signal_id.clone(),
            reason,
        }
    }

    fn cancel_orders(&self, account: &str, ids: &[String], why: &str) -> Vec<CancelOrder> {
        ids.iter()
            .map(|id| CancelOrder {
                order_id: id.clone(),
                account: account.to_string(),
                reason: Some(format!("{why} (signal {})", self.signal.signal_id)),
                timestamp: self.inputs.now,
            })
            .collect()
    }

    // ----- CANCEL -------------------------------------------------------

    fn cancel(mut self, opts: DecideOptions) -> DecisionOutput {
        match plan_cancel(self.signal, self.inputs, opts) {
            Resolution::Defer(d) => self.defer(d),
            Resolution::Reject(r) => self.reject(r),
            Resolution::Plan(p) => {
                self.account = Some(p.account.clone());
                let cancels = self.cancel_orders(&p.account, &p.order_ids, "CANCEL signal");
                let reason = format!(
                    "cancel {} working order(s) of entry {}",
                    cancels.len(),
                    p.entry_signal_id
                );
                let record = self.record(Decision::Approved, reason, None);
                DecisionOutput::Decided(Box::new(Decided {
                    record,
                    orders: Vec::new(),
                    cancels,
                    reservation: Reservation::default(),
                }))
            }
        }
    }

    // ----- EXIT ---------------------------------------------------------

    fn exit(mut self, opts: DecideOptions, kind: ExitKind, dirs: &[Direction]) -> DecisionOutput {
        self.action = Some(SignalAction::Exit);
        let inputs: Vec<ExitLegInput<'_>> = self
            .signal
            .legs
            .iter()
            .zip(dirs)
            .enumerate()
            .map(|(i, (l, d))| ExitLegInput {
                leg: i as u32,
                signal_leg: l,
                direction: *d,
            })
            .collect();
        let plan = match plan_exit(self.signal, self.inputs, opts, kind, &inputs) {
            Resolution::Defer(d) => return self.defer(d),
            Resolution::Reject(r) => {
                for (l, d) in self.legs.iter_mut().zip(dirs) {
                    l.action = SignalAction::Exit;
                    l.direction = *d;
                    l.side = order_side(SignalAction::Exit, *d);
                }
                return self.reject(r);
            }
            Resolution::Plan(p) => p,
        };
        self.account = Some(plan.account.clone());
        let all = self.inputs;
        let acct = all.accounts.get(&plan.account);
        let mut orders = Vec::new();
        let mut released = Decimal::ZERO;
        let mut released_notional = Decimal::ZERO;
        let mut note: Option<Reason> = None;
        for p in &plan.legs {
            let idx = p.leg as usize;
            let Some(sl) = self.signal.legs.get(idx) else {
                continue;
            };
            let mut quantity = p.quantity;
            let mut leg_note = p.note.clone();
            let price = self.reference_price(sl);
            if quantity > Decimal::ZERO && sl.order_type != OrderType::Market && sl.price.is_none()
            {
                leg_note = Some(Reason::MissingPrice {
                    leg: p.leg,
                    instrument: sl.instrument.clone(),
                });
                quantity = Decimal::ZERO;
            }
            let leg_notional = price
                .and_then(|px| notional(quantity, px, p.multiplier).ok())
                .unwrap_or_default();
            if let Some(ld) = self.legs.get_mut(idx) {
                ld.action = SignalAction::Exit;
                ld.direction = p.direction;
                ld.side = order_side(SignalAction::Exit, p.direction);
                ld.original_quantity = p.requested;
                ld.final_quantity = quantity;
                ld.price = price;
                ld.multiplier = p.multiplier;
                ld.lot_size = p.lot_size;
                ld.notional = leg_notional;
                ld.logic = p.logic.clone();
            }
            if note.is_none() {
                note = leg_note;
            }
            if quantity <= Decimal::ZERO {
                continue;
            }
            released += p.released_margin;
            released_notional += leg_notional;
            orders.push(self.order(
                p.leg,
                sl,
                &plan.account,
                SignalAction::Exit,
                p.direction,
                quantity,
                price,
                p.multiplier,
                CerebroDecision {
                    allocated_capital: Decimal::ZERO,
                    margin_required: Decimal::ZERO,
                    position_size_logic: p.logic.clone(),
                    risk_metrics: json!({
                        "margin_released": p.released_margin,
                        "closable": p.closable,
                        "contract_expiry": sl.expiry,
                    }),
                },
            ));
        }
        if let Some(a) = acct {
            self.fill_account_numbers(a);
            let before = self.ra.portfolio_margin_before.unwrap_or_default();
            let after = (before - released).max(Decimal::ZERO);
            self.ra.portfolio_margin_after = Some(after);
            self.ra.margin_released = Some(released);
            self.ra.margin_required = Some(Decimal::ZERO);
            if a.state.equity > Decimal::ZERO {
                self.ra.margin_utilization_pct =
                    (after * Decimal::ONE_HUNDRED).checked_div(a.state.equity);
                self.ra.gross_exposure_after = self
                    .ra
                    .gross_exposure_before
                    .map(|g| (g - released_notional).max(Decimal::ZERO));
                self.ra.leverage_after = self
                    .ra
                    .gross_exposure_after
                    .and_then(|g| g.checked_div(a.state.equity));
            }
        }
        let cancels = self.cancel_orders(
            &plan.account,
            &plan.cancels,
            "exit of a partially filled or unfilled entry",
        );
        if orders.is_empty() && cancels.is_empty() {
            return self.reject(note.unwrap_or(Reason::NoLegs));
        }
        let (decision, reason, detail) = match note {
            Some(r) if !orders.is_empty() => (Decision::Modified, r.to_string(), Some(r)),
            Some(r) => (
                Decision::Approved,
                format!("entry never filled: cancelling its working orders ({r})"),
                Some(r),
            ),
            None => (
                Decision::Approved,
                format!(
                    "exit: {} closing order(s), {} cancel(s)",
                    orders.len(),
                    cancels.len()
                ),
                None,
            ),
        };
        let record = self.record(decision, reason, detail);
        DecisionOutput::Decided(Box::new(Decided {
            record,
            orders,
            cancels,
            reservation: Reservation::default(),
        }))
    }

    /// Reference price of a closing leg: its own price for LIMIT / STOP, else
    /// a fresh mark, else the signal price.
    fn reference_price(&self, leg: &SignalLeg) -> Option<Decimal> {
        match leg.order_type {
            OrderType::Market => self
                .inputs
                .fresh_mark(&leg.instrument)
                .map(|m| m.price)
                .or(leg.price),
            _ => leg.price,
        }
        .filter(|p| *p > Decimal::ZERO)
    }

    /// Margin before, equity, gross exposure before (entries and exits).
    fn fill_account_numbers(&mut self, acct: &AccountInputs) {
        let reserved = acct.reserved_total().unwrap_or_default();
        self.ra.account_equity = Some(acct.state.equity);
        self.ra.portfolio_margin_before = acct.state.margin_used.checked_add(reserved.margin);
        self.ra.gross_exposure_before = gross_exposure(self.inputs, acct)
            .ok()
            .and_then(|g| g.checked_add(reserved.notional));
        self.ra.deployed_capital = Some(acct.deployed(&self.signal.strategy_id));
        self.ra.pnl_today = Some(acct.pnl_today(&self.signal.strategy_id));
    }

    #[allow(clippy::too_many_arguments)]
    fn order(
        &self,
        leg: u32,
        sl: &SignalLeg,
        account: &str,
        action: SignalAction,
        direction: Direction,
        quantity: Decimal,
        reference: Option<Decimal>,
        multiplier: Decimal,
        cerebro: CerebroDecision,
    ) -> Order {
        let (price, stop_price) = match sl.order_type {
            OrderType::Market => (reference, None),
            OrderType::Limit => (sl.price, None),
            OrderType::Stop => (sl.price, sl.price),
        };
        let entry = action == SignalAction::Entry;
        Order {
            order_id: order_id(&self.signal.signal_id, leg as usize),
            signal_id: self.signal.signal_id.clone(),
            strategy_id: self.signal.strategy_id.clone(),
            account: account.to_string(),
            timestamp: self.inputs.now,
            instrument: sl.instrument.clone(),
            instrument_type: sl.instrument_type,
            direction,
            action,
            side: order_side(action, direction),
            order_type: sl.order_type,
            price,
            stop_price,
            quantity,
            stop_loss: if entry { sl.stop_loss } else { None },
            take_profit: if entry { sl.take_profit } else { None },
            expiry: None,
            cerebro_decision: Some(cerebro),
            status: OrderStatus::Pending,
            parent_order_id: None,
            leg,
            multiplier,
        }
    }

    // ----- ENTRY --------------------------------------------------------

    fn entry(mut self) -> DecisionOutput {
        self.action = Some(SignalAction::Entry);
        for l in &mut self.legs {
            l.action = SignalAction::Entry;
            l.side = order_side(SignalAction::Entry, l.direction);
        }
        match self.entry_inner() {
            Ok(out) => out,
            Err(reason) => self.reject(reason),
        }
    }

    fn entry_inner(&mut self) -> Result<DecisionOutput, Reason> {
        let signal = self.signal;
        let inputs = self.inputs;
        let sys = &inputs.system;
        let strategy_id = signal.strategy_id.as_str();
        // 1. kill switch
        if !sys.trading_enabled {
            return Err(Reason::KillSwitch);
        }
        // 2. strategy
        let cfg = inputs
            .strategies
            .get(strategy_id)
            .ok_or_else(|| Reason::StrategyUnknown {
                strategy_id: strategy_id.to_string(),
            })?;
        if !matches!(cfg.status, StrategyStatus::Active | StrategyStatus::Testing) {
            return Err(Reason::StrategyNotTradable {
                strategy_id: strategy_id.to_string(),
                status: cfg.status,
            });
        }
        let account = cfg.account.clone().ok_or_else(|| Reason::NoAccount {
            strategy_id: strategy_id.to_string(),
        })?;
        let limits_cfg = cfg.risk_limits.clone().unwrap_or_default();
        // 3. allocation
        let pct = inputs
            .allocation
            .as_ref()
            .and_then(|a| a.pct(strategy_id))
            .unwrap_or_default();
        self.ra.allocation_id = inputs.allocation.as_ref().map(|a| a.allocation_id.clone());
        self.ra.allocation_pct = Some(pct);
        if pct <= Decimal::ZERO {
            return Err(Reason::NoAllocation {
                strategy_id: strategy_id.to_string(),
                allocation_pct: pct,
            });
        }
        // 4. account
        let acct = inputs
            .accounts
            .get(&account)
            .ok_or_else(|| Reason::AccountStateMissing {
                account: account.clone(),
            })?;
        let equity = acct.state.equity;
        if equity <= Decimal::ZERO {
            return Err(Reason::NonPositiveEquity {
                account: account.clone(),
                equity,
            });
        }
        self.fill_account_numbers(acct);
        let reserved_total = acct.reserved_total().ok_or_else(|| Reason::Overflow {
            context: "reservations".into(),
        })?;
        let reserved_own = acct.reserved_for(strategy_id);
        let capital = Capital::new(equity, pct, acct.deployed(strategy_id), reserved_own.margin)?;
        self.ra.allocated_capital = Some(capital.allocated);
        self.ra.reserved_capital = Some(capital.reserved);
        self.ra.available_capital = Some(capital.available);
        // 5. daily loss
        let pnl = acct.pnl_today(strategy_id);
        if let Some(limit) = limits_cfg.max_daily_loss {
            if -pnl >= limit {
                return Err(Reason::DailyLossLimit {
                    limit,
                    actual: -pnl,
                });
            }
        }
        // 5b. unbooked approvals on the account
        if let Some(limit) = acct.max_in_flight {
            if acct.in_flight >= limit {
                return Err(Reason::ReservationBacklog {
                    account: account.clone(),
                    limit,
                    actual: acct.in_flight,
                });
            }
        }
        // 6. specs and prices
        let mut legs = Vec::with_capacity(signal.legs.len());
        for (i, l) in signal.legs.iter().enumerate() {
            let leg = i as u32;
            let spec = inputs
                .instruments
                .resolve(&l.instrument, l.instrument_type)
                .ok_or_else(|| Reason::MissingInstrumentSpec {
                    leg,
                    instrument: l.instrument.clone(),
                    instrument_type: l.instrument_type,
                })?;
            let price = self
                .reference_price(l)
                .ok_or_else(|| Reason::MissingPrice {
                    leg,
                    instrument: l.instrument.clone(),
                })?;
            // Held = booked plus what approved, unbooked entries will add:
            // a target or a position limit is the position's, whenever
            // its orders fill.
            let held = add(
                acct.open_quantity(strategy_id, &l.instrument, l.direction),
                acct.pending_quantity(strategy_id, &l.instrument, l.direction),
                "held quantity",
            )?;
            let mark = inputs
                .fresh_mark(&l.instrument)
                .map(|m| m.price)
                .unwrap_or(price);
            let held_notional = notional(held, mark, spec.multiplier)?;
            if let Some(ld) = self.legs.get_mut(i) {
                ld.price = Some(price);
                ld.multiplier = spec.multiplier;
                ld.lot_size = spec.lot_size;
            }
            legs.push(EntryLeg {
                leg: l,
                spec,
                price,
                held,
                held_notional,
            });
        }
        // 7. slippage
        let alpha = cfg.expected_alpha.or(signal.metadata.expected_alpha);
        let sl_legs: Vec<SlippageLeg> = legs
            .iter()
            .map(|e| SlippageLeg {
                side: e.leg.side,
                order_type: e.leg.order_type,
                signal_price: e.leg.price,
                mark: inputs.fresh_mark(&e.leg.instrument).map(|m| m.price),
                weight: e
                    .leg
                    .price
                    .and_then(|p| notional(e.leg.quantity, p, e.spec.multiplier).ok())
                    .unwrap_or_default(),
            })
            .collect();
        let slip = slippage(
            alpha,
            signal.timestamp,
            inputs.now,
            sys.alpha_horizon_secs,
            sys.slippage_alpha_fraction,
            &sl_legs,
        );
        let slip_reject = slip.rejection();
        self.ra.slippage = Some(slip);
        if let Some(r) = slip_reject {
            return Err(r);
        }
        // 8. sizing
        if capital.available <= Decimal::ZERO {
            return Err(Reason::NoCapitalAvailable {
                strategy_id: strategy_id.to_string(),
                allocated: capital.allocated,
                deployed: capital.deployed,
                reserved: capital.reserved,
            });
        }
        let sizing_legs: Vec<SizingLeg> = legs
            .iter()
            .enumerate()
            .map(|(i, e)| SizingLeg {
                leg: i as u32,
                instrument: e.leg.instrument.clone(),
                sender_quantity: e.leg.quantity,
                price: e.price,
                multiplier: e.spec.multiplier,
                lot_size: e.spec.lot_size,
                held: e.held,
            })
            .collect();
        let sized = size_entry(
            signal.sizing_mode,
            &capital,
            signal.account_equity,
            &sizing_legs,
        )?;
        self.ra.scale_factor = sized.scale_factor;
        let pre: Vec<Decimal> = sized.legs.iter().map(|s| s.quantity).collect();
        for (ld, s) in self.legs.iter_mut().zip(&sized.legs) {
            ld.original_quantity = s.quantity;
            ld.logic = s.logic.clone();
        }
        // 9. shrinkable limits
        let gross_before = gross_exposure(inputs, acct)?;
        let limits = Limits {
            capital: &capital,
            acct,
            reserved_total,
            gross_before,
            cap_pct: sys.max_margin_utilization_pct,
            max_leverage: sys.max_leverage_global,
            max_position: limits_cfg.max_position_size,
        };
        let caps = limits.evaluate(&legs, &pre)?;
        let (scale, binding) = match max_scale(&caps) {
            Ok(x) => x,
            Err(i) => return Err(caps[i].reason.clone()),
        };
        let fin: Vec<Decimal> = if scale < Decimal::ONE {
            legs.iter()
                .zip(&pre)
                .map(|(e, q)| scale_to_lot(*q, scale, e.spec.lot_size))
                .collect()
        } else {
            pre.clone()
        };
        let binding_reason = binding.map(|i| caps[i].reason.clone());
        self.ra.shrink_factor = Some(scale);
        self.ra.binding_limit = binding_reason.as_ref().map(|r| r.code().to_string());
        if fin.iter().any(|q| *q <= Decimal::ZERO) {
            return Err(binding_reason.unwrap_or(Reason::NoLegs));
        }
        // Safety net: the final size must fit every limit exactly.
        let post = limits.evaluate(&legs, &fin)?;
        if let Some(c) = post.iter().find(|c| !c.fits()) {
            return Err(c.reason.clone());
        }
        // Final numbers.
        let mut total_margin = Decimal::ZERO;
        let mut total_notional = Decimal::ZERO;
        for (i, (e, q)) in legs.iter().zip(&fin).enumerate() {
            let m = margin(&e.spec.spec, *q, e.price)?;
            let n = notional(*q, e.price, e.spec.multiplier)?;
            total_margin = add(total_margin, m, "margin")?;
            total_notional = add(total_notional, n, "notional")?;
            if let Some(ld) = self.legs.get_mut(i) {
                ld.final_quantity = *q;
                ld.margin_required = m;
                ld.notional = n;
            }
        }
        let margin_before = add(acct.state.margin_used, reserved_total.margin, "margin")?;
        let margin_after = add(margin_before, total_margin, "margin")?;
        let gross_after = add(
            add(gross_before, reserved_total.notional, "gross")?,
            total_notional,
            "gross",
        )?;
        self.ra.margin_required = Some(total_margin);
        self.ra.portfolio_margin_before = Some(margin_before);
        self.ra.portfolio_margin_after = Some(margin_after);
        self.ra.margin_utilization_pct = Some(div(
            mul(margin_after, Decimal::ONE_HUNDRED, "pct")?,
            equity,
            "pct",
        )?);
        self.ra.gross_exposure_before = Some(add(gross_before, reserved_total.notional, "gross")?);
        self.ra.gross_exposure_after = Some(gross_after);
        self.ra.leverage_after = Some(div(gross_after, equity, "leverage")?);
        // 10. CVaR, over what each strategy has deployed plus what it has
        // approved and not yet booked (like every capital limit above).
        let mut deployed = acct.state.deployed_capital.clone();
        for (s, r) in &acct.reserved {
            let d = deployed.entry(s.clone()).or_default();
            *d = add(*d, r.margin, "cvar exposure")?;
        }
        let exposures: BTreeMap<String, f64> = deployed
            .iter()
            .map(|(s, d)| (s.clone(), f64_of(*d)))
            .collect();
        match cvar_impact(
            inputs.returns.as_deref(),
            &exposures,
            strategy_id,
            f64_of(total_margin),
            f64_of(equity),
            sys.cvar_confidence,
            sys.cvar_min_observations,
        ) {
            Ok((cvar, corr)) => {
                self.ra.cvar_contribution = Some(cvar.cvar_contribution);
                self.ra.correlation_impact = Some(corr);
                let over = sys
                    .cvar_limit_pct
                    .filter(|lim| cvar.cvar_after_pct > *lim && cvar.cvar_after > cvar.cvar_before);
                let actual = cvar.cvar_after_pct;
                self.ra.cvar = Some(cvar);
                if let Some(limit_pct) = over {
                    return Err(Reason::CvarLimit {
                        limit_pct,
                        actual_pct: actual,
                    });
                }
            }
            Err(CvarSkip::NoData) if inputs.returns_unavailable.is_some() => {
                self.ra.cvar_skipped = Some(CvarSkip::Unavailable {
                    reason: inputs.returns_unavailable.clone().unwrap_or_default(),
                });
            }
            Err(skip) => self.ra.cvar_skipped = Some(skip),
        }
        // Orders.
        let mut orders = Vec::with_capacity(legs.len());
        for (i, (e, q)) in legs.iter().zip(&fin).enumerate() {
            let Some(ld) = self.legs.get(i) else { continue };
            let mut logic = ld.logic.clone();
            if let Some(r) = &binding_reason {
                logic.push_str(&format!("; shrunk x{scale} to {q} ({})", r.code()));
            }
            let risk_metrics = json!({
                "margin_utilization_pct": self.ra.margin_utilization_pct,
                "leverage_after": self.ra.leverage_after,
                "scale_factor": self.ra.scale_factor,
                "shrink_factor": scale,
                "cvar_contribution": self.ra.cvar_contribution,
                "cvar_after_pct": self.ra.cvar.as_ref().map(|c| c.cvar_after_pct),
                "slippage_alpha_lost": self.ra.slippage.as_ref().map(|s| s.alpha_lost),
                "contract_expiry": e.leg.expiry,
            });
            orders.push(self.order(
                i as u32,
                e.leg,
                &account,
                SignalAction::Entry,
                e.leg.direction,
                *q,
                Some(e.price),
                e.spec.multiplier,
                CerebroDecision {
                    allocated_capital: capital.allocated,
                    margin_required: ld.margin_required,
                    position_size_logic: logic,
                    risk_metrics,
                },
            ));
        }
        let (decision, reason, detail) = match binding_reason {
            Some(r) => (Decision::Modified, format!("shrunk to fit: {r}"), Some(r)),
            None => (
                Decision::Approved,
                "approved: all checks passed".to_string(),
                None,
            ),
        };
        let record = self.record(decision, reason, detail);
        Ok(DecisionOutput::Decided(Box::new(Decided {
            record,
            orders,
            cancels: Vec::new(),
            reservation: Reservation {
                margin: total_margin,
                notional: total_notional,
            },
        })))
    }
}

/// Gross notional of the account's open positions at their current prices,
/// each with the multiplier the ledger books it with (a state from before
/// positions carried one: the symbol table's, 1 when unconfigured).
fn gross_exposure(inputs: &Inputs, acct: &AccountInputs) -> Result<Decimal, Reason> {
    acct.state
        .open_positions
        .iter()
        .try_fold(Decimal::ZERO, |acc, p| {
            let multiplier = p
                .multiplier
                .unwrap_or_else(|| inputs.instruments.position_multiplier(&p.instrument));
            let n = notional(p.quantity, p.current_price, multiplier)?;
            add(acc, n.abs(), "gross exposure")
        })
}

/// The shrinkable limits of one entry.
struct Limits<'a> {
    capital: &'a Capital,
    acct: &'a AccountInputs,
    reserved_total: Reservation,
    gross_before: Decimal,
    cap_pct: Decimal,
    max_leverage: Decimal,
    max_position: Option<Decimal>,
}

impl Limits<'_> {
    /// Room and usage of every limit at quantities `qty` (one per leg).
    fn evaluate(&self, legs: &[EntryLeg<'_>], qty: &[Decimal]) -> Result<Vec<Capacity>, Reason> {
        let equity = self.acct.state.equity;
        let mut m = Decimal::ZERO;
        let mut n = Decimal::ZERO;
        let mut per_leg = Vec::with_capacity(legs.len());
        for (e, q) in legs.iter().zip(qty) {
            let lm = margin(&e.spec.spec, *q, e.price)?;
            let ln = notional(*q, e.price, e.spec.multiplier)?;
            m = add(m, lm, "margin")?;
            n = add(n, ln, "notional")?;
            per_leg.push(ln);
        }
        let used = add(
            self.acct.state.margin_used,
            self.reserved_total.margin,
            "margin",
        )?;
        let acct_room = sub(
            self.acct.state.margin_available,
            self.reserved_total.margin,
            "margin",
        )?;
        let cap_room = sub(
            div(
                mul(self.cap_pct, equity, "cap")?,
                Decimal::ONE_HUNDRED,
                "cap",
            )?,
            used,
            "cap",
        )?;
        let gross = add(self.gross_before, self.reserved_total.notional, "gross")?;
        let lev_room = sub(
            mul(self.max_leverage, equity, "leverage")?,
            gross,
            "leverage",
        )?;
        let mut caps = vec![
            Capacity {
                room: self.capital.available,
                usage: m,
                reason: Reason::StrategyCapital {
                    required: m,
                    available: self.capital.available,
                },
            },
            Capacity {
                room: acct_room,
                usage: m,
                reason: Reason::AccountMargin {
                    required: m,
                    available: acct_room,
                },
            },
            Capacity {
                room: cap_room,
                usage: m,
                reason: Reason::MarginUtilisation {
                    limit_pct: self.cap_pct,
                    actual_pct: div(
                        mul(add(used, m, "pct")?, Decimal::ONE_HUNDRED, "pct")?,
                        equity,
                        "pct",
                    )?,
                },
            },
            Capacity {
                room: lev_room,
                usage: n,
                reason: Reason::MaxLeverage {
                    limit: self.max_leverage,
                    actual: div(add(gross, n, "leverage")?, equity, "leverage")?,
                },
            },
        ];
        if let Some(limit) = self.max_position {
            // The limit is per position: legs adding to the same one
            // (instrument and direction) count together, against what it
            // already holds; the reason names the first of them.
            let mut positions: Vec<(usize, Decimal)> = Vec::new();
            for (i, (e, ln)) in legs.iter().zip(&per_leg).enumerate() {
                let same = |(j, _): &&mut (usize, Decimal)| {
                    let other: &EntryLeg<'_> = &legs[*j];
                    other.leg.instrument == e.leg.instrument
                        && other.leg.direction == e.leg.direction
                };
                match positions.iter_mut().find(same) {
                    Some((_, usage)) => *usage = add(*usage, *ln, "position size")?,
                    None => positions.push((i, *ln)),
                }
            }
            for (i, usage) in positions {
                let e = &legs[i];
                caps.push(Capacity {
                    room: sub(limit, e.held_notional, "position size")?,
                    usage,
                    reason: Reason::MaxPositionSize {
                        leg: i as u32,
                        instrument: e.leg.instrument.clone(),
                        limit,
                        actual: add(e.held_notional, usage, "position size")?,
                    },
                });
            }
        }
        Ok(caps)
    }
}
