//! The position and cash ledger, built from execution confirmations only.
//!
//! # Positions
//!
//! A position is keyed by (account, strategy, instrument, direction), so two
//! strategies trading the same symbol — even in opposite directions — never
//! net against each other. The direction comes from the execution's action and
//! side ([`position_direction`]): ENTRY BUY / EXIT SELL is LONG, ENTRY SELL /
//! EXIT BUY is SHORT. (The `direction` field is not trusted: senders write
//! `"direction": "SHORT"` on the exit of a long.) Quantities are positive for
//! both directions.
//!
//! An ENTRY adds `qty` and `qty * price` to the position's cost basis. An EXIT
//! removes `qty` and the proportional share of the cost basis
//! (`cost * qty / held`, rounded to 12 decimal places; the whole remaining
//! cost when it closes the position, so a position's lifetime realized P&L is
//! exactly proceeds minus costs), and realizes
//!
//! - LONG: `(exit_price * qty - removed_cost) * multiplier`
//! - SHORT: `(removed_cost - exit_price * qty) * multiplier`, i.e.
//!   `(entry - exit) * qty * multiplier`.
//!
//! The average entry price is `cost / quantity`; exits do not change it. An
//! exit larger than the position is refused ([`LedgerError::OverClose`]).
//!
//! # Cash model (margin account)
//!
//! Fills do not move notional through cash; the broker finances positions
//! against margin. So:
//!
//! - `cash_balance = initial_balance + realized_pnl - commissions`
//! - `unrealized_pnl = Σ` positions' mark-to-market P&L
//!   (LONG `(mark - avg) * qty * mult`, SHORT `(avg - mark) * qty * mult`)
//! - `equity = cash_balance + unrealized_pnl`
//! - `margin_used = Σ` positions' margin at the current mark ([`InstrumentSpec`])
//! - `margin_available = equity - margin_used` (negative = margin deficit)
//!
//! `realized_pnl` is gross; commissions are reported separately.
//!
//! **Deployed capital** per strategy is the margin of that strategy's open
//! positions at the current mark, so the per-strategy values sum to
//! `margin_used` — the capital the strategy actually ties up, comparable to
//! Cerebro's `margin_required`, and meaningful for futures where notional
//! dwarfs the capital at risk.
//!
//! # Today's P&L per strategy
//!
//! `strategy_pnl_today` of a snapshot taken at `now` is, per strategy, the
//! realized P&L minus commissions of its executions whose own `timestamp`
//! falls on `now`'s UTC day, plus the current unrealized P&L of its open
//! positions (opened today or before). "Today" comes only from the
//! execution timestamps and the snapshot time — never from when a message
//! happened to be processed — so a ledger replayed from `EXECUTIONS` gives
//! the same figure as the live one for the same snapshot time. The ledger
//! keeps one net realized figure per (account, strategy, UTC day) with
//! executions (a few bytes per strategy and trading day).
//!
//! # Marks
//!
//! The mark of an instrument is the latest of: [`Ledger::mark`] calls and fill
//! prices, in the order they were applied. A replay of the same executions (and
//! marks) in the same order rebuilds the same state.
//!
//! # Idempotency
//!
//! Each `execution_id` is applied at most once. A redelivery with the same
//! economics (order, account, strategy, instrument, action, side, quantity,
//! price, commission, multiplier, status) is a no-op [`Applied::Duplicate`];
//! the same id with different economics is [`LedgerError::ConflictingDuplicate`].
//! Timestamps and `broker_response` are not compared: a copy read back from
//! Mongo has millisecond timestamps. REJECTED confirmations book nothing.
//! Every error leaves the ledger unchanged.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, NaiveDate, Utc};
use mtx_schemas::limits;
use mtx_schemas::order::{
    position_direction, AccountState, ExecutionConfirmation, OpenPosition, Order, OrderEvent,
};
use mtx_schemas::{Direction, ExecutionStatus, InstrumentType, Side, SignalAction};
use rust_decimal::Decimal;

use crate::orders::{OpenOrders, OrderRetention};
use crate::spec::InstrumentSpec;

/// Decimal places of the cost removed by a partial exit. The rounding
/// residue stays in the cost basis and is realized by the closing exit, so
/// every figure keeps a bounded scale and lifetime P&L stays exact.
const COST_DP: u32 = 12;

/// Identifies one position.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PositionKey {
    /// Broker account.
    pub account: String,
    /// Owning strategy.
    pub strategy_id: String,
    /// Symbol.
    pub instrument: String,
    /// LONG or SHORT.
    pub direction: Direction,
}

/// One open position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Which position.
    pub key: PositionKey,
    /// Asset class of the first execution.
    pub instrument_type: InstrumentType,
    /// Open quantity (positive).
    pub quantity: Decimal,
    /// Σ `price * qty` of the open quantity (without multiplier).
    pub cost_basis: Decimal,
    /// Multiplier and margin model in force.
    pub spec: InstrumentSpec,
    /// Realized P&L of this position since it was opened (gross).
    pub realized_pnl: Decimal,
}

impl Position {
    /// Average entry price of the open quantity.
    pub fn avg_entry_price(&self) -> Decimal {
        if self.quantity.is_zero() {
            Decimal::ZERO
        } else {
            self.cost_basis / self.quantity
        }
    }

    /// Mark-to-market P&L at `mark`.
    pub fn unrealized_pnl(&self, mark: Decimal) -> Decimal {
        let gain = (mark * self.quantity - self.cost_basis) * self.spec.multiplier;
        match self.key.direction {
            Direction::Long => gain,
            Direction::Short => -gain,
        }
    }

    /// Margin the position needs at `mark`.
    pub fn margin(&self, mark: Decimal) -> Decimal {
        self.spec.margin_for(self.quantity, mark)
    }
}

/// A configured symbol's spec and the asset class it describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolSpec {
    /// The asset class of the entry (`None`: every class). A symbol can
    /// name two instruments: `CL` is crude oil futures and a stock.
    pub instrument_type: Option<InstrumentType>,
    /// Multiplier and margin.
    pub spec: InstrumentSpec,
}

impl SymbolSpec {
    /// An entry for every asset class.
    pub fn any_class(spec: InstrumentSpec) -> Self {
        SymbolSpec {
            instrument_type: None,
            spec,
        }
    }

    /// Whether the entry describes an instrument of `class`.
    pub fn applies_to(&self, class: InstrumentType) -> bool {
        self.instrument_type.is_none_or(|c| c == class)
    }
}

/// Ledger configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LedgerConfig {
    /// Starting cash of accounts not in `initial_balances`.
    pub default_initial_balance: Decimal,
    /// Starting cash per account.
    pub initial_balances: BTreeMap<String, Decimal>,
    /// Configured instruments by symbol; others, and executions of another
    /// asset class than the entry names, use [`InstrumentSpec::default_for`].
    pub instruments: BTreeMap<String, SymbolSpec>,
    /// How long finished orders are remembered ([`crate::orders`]).
    pub order_retention: OrderRetention,
}

impl LedgerConfig {
    /// Starting cash of `account`.
    pub fn initial_balance(&self, account: &str) -> Decimal {
        self.initial_balances
            .get(account)
            .copied()
            .unwrap_or(self.default_initial_balance)
    }
}

/// What [`Ledger::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The fill was booked; `realized_pnl` is what it realized (zero for entries).
    Booked {
        /// Gross P&L realized by this execution.
        realized_pnl: Decimal,
    },
    /// This execution id was already applied with the same economics.
    Duplicate,
    /// A REJECTED confirmation: recorded as seen, nothing booked.
    Rejected,
}

/// Why an execution was refused. The ledger is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// An exit larger than the open position.
    #[error("execution {execution_id}: exit of {requested} exceeds the {held} held in {key:?}")]
    OverClose {
        /// The refused execution.
        execution_id: String,
        /// The position it tried to reduce (boxed to keep the error small).
        key: Box<PositionKey>,
        /// Quantity held.
        held: Decimal,
        /// Quantity the exit asked for.
        requested: Decimal,
    },
    /// A fill with non-positive quantity, price or multiplier.
    #[error("execution {execution_id} is invalid: {reason}")]
    InvalidExecution {
        /// The refused execution.
        execution_id: String,
        /// What is wrong.
        reason: String,
    },
    /// The id was applied before with different economics.
    #[error("execution {execution_id} was already applied with different contents")]
    ConflictingDuplicate {
        /// The id.
        execution_id: String,
    },
    /// The execution's multiplier disagrees with the configured spec or the
    /// open position.
    #[error("execution {execution_id}: multiplier {got} for {instrument}, expected {expected}")]
    MultiplierMismatch {
        /// The refused execution.
        execution_id: String,
        /// Symbol.
        instrument: String,
        /// Multiplier in force.
        expected: Decimal,
        /// Multiplier on the execution.
        got: Decimal,
    },
}

impl LedgerError {
    /// A bounded snake_case code for metrics and the DLQ reason.
    pub fn reason_code(&self) -> &'static str {
        match self {
            LedgerError::OverClose { .. } => "over_close",
            LedgerError::InvalidExecution { .. } => "invalid_execution",
            LedgerError::ConflictingDuplicate { .. } => "conflicting_duplicate",
            LedgerError::MultiplierMismatch { .. } => "multiplier_mismatch",
        }
    }
}

/// The economic content of an execution, compared on redelivery.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    order_id: String,
    account: String,
    strategy_id: String,
    instrument: String,
    action: SignalAction,
    side: Side,
    quantity: Decimal,
    price: Decimal,
    commission: Decimal,
    multiplier: Decimal,
    status: ExecutionStatus,
}

impl Fingerprint {
    /// Whether `x` has these economics (no allocation).
    fn matches(&self, x: &ExecutionConfirmation) -> bool {
        self.order_id == x.order_id
            && self.account == x.account
            && self.strategy_id == x.strategy_id
            && self.instrument == x.instrument
            && self.action == x.action
            && self.side == x.side
            && self.quantity == x.quantity
            && self.price == x.price
            && self.commission == x.commission
            && self.multiplier == x.multiplier
            && self.status == x.status
    }

    fn of(x: &ExecutionConfirmation) -> Self {
        Fingerprint {
            order_id: x.order_id.clone(),
            account: x.account.clone(),
            strategy_id: x.strategy_id.clone(),
            instrument: x.instrument.clone(),
            action: x.action,
            side: x.side,
            quantity: x.quantity,
            price: x.price,
            commission: x.commission,
            multiplier: x.multiplier,
            status: x.status,
        }
    }
}

/// Cash-side totals of one account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Book {
    realized_pnl: Decimal,
    commissions: Decimal,
}

/// Positions, cash and margin of every account. See the module docs for the
/// model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    config: LedgerConfig,
    positions: BTreeMap<PositionKey, Position>,
    books: BTreeMap<String, Book>,
    /// Realized P&L net of commissions per (account, strategy) and UTC day
    /// of the execution timestamp.
    daily: BTreeMap<(String, String), BTreeMap<NaiveDate, Decimal>>,
    applied: HashMap<String, Fingerprint>,
    marks: BTreeMap<String, Decimal>,
    /// Accounts with an open position, per instrument (with how many).
    holders: BTreeMap<String, BTreeMap<String, usize>>,
    open_orders: OpenOrders,
}

impl Ledger {
    /// An empty ledger.
    pub fn new(config: LedgerConfig) -> Self {
        Ledger {
            open_orders: OpenOrders::new(config.order_retention),
            config,
            ..Ledger::default()
        }
    }

    /// Rebuild a ledger by applying `executions` in order (duplicates are
    /// skipped as in live operation). Stops at the first refused execution.
    pub fn replay<'a>(
        config: LedgerConfig,
        executions: impl IntoIterator<Item = &'a ExecutionConfirmation>,
    ) -> Result<Self, LedgerError> {
        let mut ledger = Ledger::new(config);
        for x in executions {
            ledger.apply(x)?;
        }
        Ok(ledger)
    }

    /// The configuration.
    pub fn config(&self) -> &LedgerConfig {
        &self.config
    }

    /// Whether `execution_id` has been applied.
    pub fn has_applied(&self, execution_id: &str) -> bool {
        self.applied.contains_key(execution_id)
    }

    /// Latest mark of `instrument`.
    pub fn mark_of(&self, instrument: &str) -> Option<Decimal> {
        self.marks.get(instrument).copied()
    }

    /// Record a market price; prices outside the shared range
    /// ([`limits::check_price`]: non-positive, or beyond `1e10`) are ignored.
    pub fn mark(&mut self, instrument: &str, price: Decimal) {
        if limits::check_price(price).is_err() {
            return;
        }
        match self.marks.get_mut(instrument) {
            Some(m) => *m = price,
            None => {
                self.marks.insert(instrument.to_string(), price);
            }
        }
    }

    /// One position, if open.
    pub fn position(&self, key: &PositionKey) -> Option<&Position> {
        self.positions.get(key)
    }

    /// Open positions of `account`, ordered by (strategy, instrument, direction).
    pub fn positions<'a>(&'a self, account: &'a str) -> impl Iterator<Item = &'a Position> + 'a {
        // Keys sort by account first: start at the smallest key of `account`.
        let first = PositionKey {
            account: account.to_string(),
            strategy_id: String::new(),
            instrument: String::new(),
            direction: Direction::ALL
                .iter()
                .min()
                .copied()
                .unwrap_or(Direction::Long),
        };
        self.positions
            .range(first..)
            .map(|(_, p)| p)
            .take_while(move |p| p.key.account == account)
    }

    /// Accounts with an open position in `instrument`, sorted.
    pub fn holders<'a>(&'a self, instrument: &str) -> impl Iterator<Item = &'a str> + 'a {
        self.holders
            .get(instrument)
            .into_iter()
            .flat_map(|m| m.keys().map(String::as_str))
    }

    /// Accounts that have seen at least one execution.
    pub fn accounts(&self) -> impl Iterator<Item = &str> + '_ {
        self.books.keys().map(String::as_str)
    }

    /// Start tracking a working order for the snapshot's `open_orders`;
    /// returns whether anything changed.
    pub fn track_order(&mut self, order: &Order) -> bool {
        self.open_orders.track(order)
    }

    /// The working orders (and the bounded memory of finished ones).
    pub fn open_orders(&self) -> &OpenOrders {
        &self.open_orders
    }

    /// Apply an order status event to the tracked working orders; returns
    /// whether it was newer than what was known.
    pub fn apply_order_event(&mut self, event: &OrderEvent) -> bool {
        self.open_orders.apply_event(event)
    }

    /// The spec in force for `x`'s instrument.
    fn spec_for(&self, x: &ExecutionConfirmation) -> Result<InstrumentSpec, LedgerError> {
        let spec = match self.config.instruments.get(&x.instrument) {
            Some(s) if s.applies_to(x.instrument_type) => s.spec,
            _ => InstrumentSpec::default_for(x.instrument_type, x.multiplier),
        };
        if spec.multiplier != x.multiplier {
            return Err(LedgerError::MultiplierMismatch {
                execution_id: x.execution_id.clone(),
                instrument: x.instrument.clone(),
                expected: spec.multiplier,
                got: x.multiplier,
            });
        }
        Ok(spec)
    }

    /// Book one execution. Idempotent on `execution_id`; on error nothing
    /// changes.
    pub fn apply(&mut self, x: &ExecutionConfirmation) -> Result<Applied, LedgerError> {
        if let Some(seen) = self.applied.get(&x.execution_id) {
            return if seen.matches(x) {
                Ok(Applied::Duplicate)
            } else {
                Err(LedgerError::ConflictingDuplicate {
                    execution_id: x.execution_id.clone(),
                })
            };
        }
        if x.status == ExecutionStatus::Rejected {
            self.applied
                .insert(x.execution_id.clone(), Fingerprint::of(x));
            return Ok(Applied::Rejected);
        }
        let invalid = |reason: String| LedgerError::InvalidExecution {
            execution_id: x.execution_id.clone(),
            reason,
        };
        if x.multiplier <= Decimal::ZERO {
            return Err(invalid(format!(
                "multiplier must be positive, got {}",
                x.multiplier
            )));
        }
        limits::check_quantity(x.quantity, x.multiplier)
            .map_err(|e| invalid(format!("quantity {e}")))?;
        limits::check_price(x.price).map_err(|e| invalid(format!("price {e}")))?;
        if x.commission.abs() > limits::MAX_NOTIONAL {
            return Err(invalid(format!(
                "commission {} is beyond {} in size",
                x.commission,
                limits::MAX_NOTIONAL
            )));
        }
        let spec = self.spec_for(x)?;
        let key = PositionKey {
            account: x.account.clone(),
            strategy_id: x.strategy_id.clone(),
            instrument: x.instrument.clone(),
            direction: position_direction(x.action, x.side),
        };
        let existing = self.positions.get(&key);
        if let Some(p) = existing {
            if p.spec.multiplier != x.multiplier {
                return Err(LedgerError::MultiplierMismatch {
                    execution_id: x.execution_id.clone(),
                    instrument: x.instrument.clone(),
                    expected: p.spec.multiplier,
                    got: x.multiplier,
                });
            }
        }

        // Compute the new position (or its removal) before touching anything.
        let (next, realized) = match x.action {
            SignalAction::Entry => {
                let mut p = existing.cloned().unwrap_or_else(|| Position {
                    key: key.clone(),
                    instrument_type: x.instrument_type,
                    quantity: Decimal::ZERO,
                    cost_basis: Decimal::ZERO,
                    spec,
                    realized_pnl: Decimal::ZERO,
                });
                p.quantity += x.quantity;
                p.cost_basis += x.quantity * x.price;
                (Some(p), Decimal::ZERO)
            }
            SignalAction::Exit => {
                let held = existing.map_or(Decimal::ZERO, |p| p.quantity);
                let Some(mut p) = existing.cloned().filter(|_| x.quantity <= held) else {
                    return Err(LedgerError::OverClose {
                        execution_id: x.execution_id.clone(),
                        key: Box::new(key),
                        held,
                        requested: x.quantity,
                    });
                };
                let removed = if x.quantity == p.quantity {
                    p.cost_basis
                } else {
                    (p.cost_basis * x.quantity / p.quantity).round_dp(COST_DP)
                };
                let gain = (x.price * x.quantity - removed) * p.spec.multiplier;
                let realized = match key.direction {
                    Direction::Long => gain,
                    Direction::Short => -gain,
                };
                p.quantity -= x.quantity;
                p.cost_basis -= removed;
                p.realized_pnl += realized;
                (Some(p).filter(|p| !p.quantity.is_zero()), realized)
            }
        };

        // Inside the limits no figure can leave the decimal range: the
        // position's units are bounded, and so the totals it changes.
        if let Some(p) = &next {
            limits::check_quantity(p.quantity, p.spec.multiplier).map_err(|e| {
                invalid(format!(
                    "the {} position would hold too much: {e}",
                    p.key.instrument
                ))
            })?;
        }
        let book = self.books.get(&x.account).cloned().unwrap_or_default();
        let day = x.timestamp.date_naive();
        let daily = self
            .daily
            .get(&(x.account.clone(), x.strategy_id.clone()))
            .and_then(|d| d.get(&day))
            .copied()
            .unwrap_or_default();
        let (Some(realized_total), Some(commissions_total), Some(daily_total)) = (
            book.realized_pnl.checked_add(realized),
            book.commissions.checked_add(x.commission),
            realized
                .checked_sub(x.commission)
                .and_then(|net| daily.checked_add(net)),
        ) else {
            return Err(invalid(
                "the account's totals would leave the decimal range".to_string(),
            ));
        };

        let opened = existing.is_none();
        match next {
            Some(p) => {
                self.positions.insert(key, p);
                if opened {
                    *self
                        .holders
                        .entry(x.instrument.clone())
                        .or_default()
                        .entry(x.account.clone())
                        .or_default() += 1;
                }
            }
            None => {
                self.positions.remove(&key);
                if let Some(accounts) = self.holders.get_mut(&x.instrument) {
                    if let Some(n) = accounts.get_mut(&x.account) {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            accounts.remove(&x.account);
                        }
                    }
                    if accounts.is_empty() {
                        self.holders.remove(&x.instrument);
                    }
                }
            }
        }
        let book = self.books.entry(x.account.clone()).or_default();
        book.realized_pnl = realized_total;
        book.commissions = commissions_total;
        self.daily
            .entry((x.account.clone(), x.strategy_id.clone()))
            .or_default()
            .insert(day, daily_total);
        self.mark(&x.instrument, x.price);
        self.applied
            .insert(x.execution_id.clone(), Fingerprint::of(x));
        Ok(Applied::Booked {
            realized_pnl: realized,
        })
    }

    /// Realized P&L net of commissions of `account`'s executions on `day`
    /// (UTC), per strategy with executions that day.
    pub fn realized_on(&self, account: &str, day: NaiveDate) -> BTreeMap<String, Decimal> {
        self.daily
            .range((account.to_string(), String::new())..)
            .take_while(|((a, _), _)| a == account)
            .filter_map(|((_, strategy), days)| days.get(&day).map(|v| (strategy.clone(), *v)))
            .collect()
    }

    /// The account's state at `now` (see the module docs for every figure).
    pub fn snapshot(&self, account: &str, now: DateTime<Utc>) -> AccountState {
        let book = self.books.get(account).cloned().unwrap_or_default();
        let mut open_positions = Vec::new();
        let mut deployed_capital: BTreeMap<String, Decimal> = BTreeMap::new();
        let mut strategy_pnl_today = self.realized_on(account, now.date_naive());
        let (mut unrealized, mut margin_used) = (Decimal::ZERO, Decimal::ZERO);
        for p in self.positions(account) {
            let mark = self
                .mark_of(&p.key.instrument)
                .unwrap_or_else(|| p.avg_entry_price());
            let pnl = p.unrealized_pnl(mark);
            let margin = p.margin(mark);
            unrealized += pnl;
            margin_used += margin;
            *deployed_capital
                .entry(p.key.strategy_id.clone())
                .or_default() += margin;
            *strategy_pnl_today
                .entry(p.key.strategy_id.clone())
                .or_default() += pnl;
            open_positions.push(OpenPosition {
                strategy_id: p.key.strategy_id.clone(),
                instrument: p.key.instrument.clone(),
                direction: p.key.direction,
                quantity: p.quantity,
                entry_price: p.avg_entry_price(),
                current_price: mark,
                unrealized_pnl: pnl,
                margin_required: margin,
                multiplier: Some(p.spec.multiplier),
            });
        }
        let cash = self.config.initial_balance(account) + book.realized_pnl - book.commissions;
        let equity = cash + unrealized;
        AccountState {
            account: account.to_string(),
            timestamp: now,
            equity,
            cash_balance: cash,
            margin_used,
            margin_available: equity - margin_used,
            unrealized_pnl: unrealized,
            realized_pnl: book.realized_pnl,
            commissions: book.commissions,
            open_positions,
            open_orders: self.open_orders.for_account(account),
            deployed_capital,
            strategy_pnl_today,
            executions_seq: None,
        }
    }
}

#[cfg(test)]
mod tests;
