//! Pre-trade risk: typed reasons, the shrink-to-fit limits, the slippage rule
//! and the historical CVaR of the allocated portfolio.
//!
//! # Limits that shrink (all linear in the order's quantities)
//!
//! For quantities `q` the order needs `margin(q)` and `notional(q)`; each limit
//! has a *room* and a *usage* at the pre-check size:
//!
//! | limit | room | usage | reason |
//! |---|---|---|---|
//! | strategy capital | `allocated − deployed − reserved(strategy)` | margin | [`Reason::StrategyCapital`] |
//! | account margin | `margin_available − reserved(account)` | margin | [`Reason::AccountMargin`] |
//! | utilisation cap | `cap% × equity − (margin_used + reserved)` | margin | [`Reason::MarginUtilisation`] |
//! | MAX_LEVERAGE_GLOBAL | `max_lev × equity − (gross + reserved notional)` | notional | [`Reason::MaxLeverage`] |
//! | max_position_size (per leg) | `limit − held notional` | leg notional | [`Reason::MaxPositionSize`] |
//!
//! The common scale factor is `s = min(1, room / usage)` over all limits,
//! rounded **down** to 12 decimals; every leg becomes `q × s` rounded toward
//! zero to its lot, so the legs of a pair shrink together and every limit
//! holds after rounding (margin and notional are linear and non-negative).
//! A limit with no room at all, or a shrink that rounds a leg to zero,
//! rejects with that limit's reason.
//!
//! # Slippage rule
//!
//! See [`slippage`]. # CVaR: see [`cvar_impact`].

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mtx_accounts::{InstrumentSpec, MarginModel};
use mtx_schemas::{Direction, InstrumentType, OrderType, Side, StrategyStatus};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::inputs::ReturnsTable;

/// Why a signal was rejected or shrunk (or an exit clamped). Every limit
/// variant carries the limit and the actual value it was compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum Reason {
    /// `TRADING_ENABLED` is false.
    #[error("kill switch: TRADING_ENABLED is false; entries are rejected, exits still pass")]
    KillSwitch,
    /// No configuration for the strategy.
    #[error("strategy {strategy_id} is unknown (no strategy configuration)")]
    StrategyUnknown {
        /// Strategy id from the signal.
        strategy_id: String,
    },
    /// The strategy is INACTIVE.
    #[error(
        "strategy {strategy_id} is {status}; only ACTIVE or TESTING strategies may open positions"
    )]
    StrategyNotTradable {
        /// Strategy id.
        strategy_id: String,
        /// Its status.
        status: StrategyStatus,
    },
    /// The strategy configuration names no account.
    #[error("strategy {strategy_id} has no account configured")]
    NoAccount {
        /// Strategy id.
        strategy_id: String,
    },
    /// No (positive) allocation for the strategy in the ACTIVE allocation.
    #[error("strategy {strategy_id} has no allocation: {allocation_pct}% of equity")]
    NoAllocation {
        /// Strategy id.
        strategy_id: String,
        /// Its allocation in percent (0 when absent).
        allocation_pct: Decimal,
    },
    /// No state for the routed account.
    #[error("no account state for account {account}")]
    AccountStateMissing {
        /// Account name.
        account: String,
    },
    /// The account's equity is zero or negative.
    #[error("account {account} equity {equity} is not positive")]
    NonPositiveEquity {
        /// Account name.
        account: String,
        /// Its equity.
        equity: Decimal,
    },
    /// The strategy lost at least `max_daily_loss` today.
    #[error("max_daily_loss reached: loss today {actual} >= limit {limit}")]
    DailyLossLimit {
        /// `risk_limits.max_daily_loss`.
        limit: Decimal,
        /// Today's loss (positive = loss).
        actual: Decimal,
    },
    /// A leg has neither a usable price nor a fresh mark.
    #[error("leg {leg} ({instrument}): missing price (no signal price and no fresh mark)")]
    MissingPrice {
        /// Leg index.
        leg: u32,
        /// Symbol.
        instrument: String,
    },
    /// A leg's instrument has no multiplier / lot / margin configuration.
    #[error("leg {leg} ({instrument} {instrument_type}): no instrument spec (multiplier, lot size, margin)")]
    MissingInstrumentSpec {
        /// Leg index.
        leg: u32,
        /// Symbol.
        instrument: String,
        /// Asset class.
        instrument_type: InstrumentType,
    },
    /// SENDER_EQUITY_RATIO sizing without a positive sender `account_equity`.
    #[error("SENDER_EQUITY_RATIO sizing needs the sender's positive account_equity")]
    MissingSenderEquity,
    /// Alpha lost to delay and drift exceeds the allowed fraction of expected alpha.
    #[error("slippage: estimated alpha lost {actual} > {limit} ({fraction} of expected alpha {expected_alpha}; delay {delay_secs}s, price drift {price_drift})")]
    Slippage {
        /// `fraction × expected_alpha`.
        limit: Decimal,
        /// Estimated alpha lost (delay + drift).
        actual: Decimal,
        /// The allowed fraction (0.30).
        fraction: Decimal,
        /// Expected alpha used.
        expected_alpha: Decimal,
        /// Signal age at decision time, seconds.
        delay_secs: Decimal,
        /// Adverse relative price move, notional-weighted over legs.
        price_drift: Decimal,
    },
    /// The strategy's allocation is fully deployed or reserved.
    #[error("strategy {strategy_id} has no capital available: allocated {allocated}, deployed {deployed}, reserved {reserved}")]
    NoCapitalAvailable {
        /// Strategy id.
        strategy_id: String,
        /// Allocated capital.
        allocated: Decimal,
        /// Capital its positions tie up.
        deployed: Decimal,
        /// Capital reserved by its in-flight orders.
        reserved: Decimal,
    },
    /// A leg's sized quantity is below one lot.
    #[error(
        "leg {leg} ({instrument}): sized quantity {quantity} rounds to zero at lot size {lot_size}"
    )]
    LegRoundsToZero {
        /// Leg index.
        leg: u32,
        /// Symbol.
        instrument: String,
        /// Quantity before rounding.
        quantity: Decimal,
        /// Lot size.
        lot_size: Decimal,
    },
    /// TARGET_WEIGHT: the strategy already holds at least the target.
    #[error("leg {leg} ({instrument}): already at target weight: target {target}, held {held}")]
    AlreadyAtTarget {
        /// Leg index.
        leg: u32,
        /// Symbol.
        instrument: String,
        /// Target units.
        target: Decimal,
        /// Units held.
        held: Decimal,
    },
    /// Margin required exceeds the strategy's available capital.
    #[error("margin required {required} exceeds the strategy's available capital {available}")]
    StrategyCapital {
        /// Margin of the order at the pre-check size.
        required: Decimal,
        /// `allocated − deployed − reserved`.
        available: Decimal,
    },
    /// Margin required exceeds the account's available margin.
    #[error("margin required {required} exceeds the account's available margin {available}")]
    AccountMargin {
        /// Margin of the order at the pre-check size.
        required: Decimal,
        /// `margin_available − reserved`.
        available: Decimal,
    },
    /// Account margin utilisation after the trade would exceed the cap.
    #[error("margin utilisation {actual_pct}% would exceed the cap {limit_pct}%")]
    MarginUtilisation {
        /// Cap in percent.
        limit_pct: Decimal,
        /// Utilisation after the trade at the pre-check size, percent.
        actual_pct: Decimal,
    },
    /// Gross leverage after the trade would exceed MAX_LEVERAGE_GLOBAL.
    #[error("gross leverage {actual} would exceed MAX_LEVERAGE_GLOBAL {limit}")]
    MaxLeverage {
        /// MAX_LEVERAGE_GLOBAL.
        limit: Decimal,
        /// Gross notional / equity after the trade at the pre-check size.
        actual: Decimal,
    },
    /// A leg's resulting position would exceed `max_position_size`.
    #[error("leg {leg} ({instrument}): position notional {actual} would exceed max_position_size {limit}")]
    MaxPositionSize {
        /// Leg index.
        leg: u32,
        /// Symbol.
        instrument: String,
        /// `risk_limits.max_position_size`.
        limit: Decimal,
        /// Held plus new notional at the pre-check size.
        actual: Decimal,
    },
    /// Portfolio CVaR after the trade exceeds the configured limit.
    #[error(
        "portfolio CVaR95 after the trade {actual_pct}% of equity exceeds the limit {limit_pct}%"
    )]
    CvarLimit {
        /// `cvar_limit_pct`.
        limit_pct: f64,
        /// CVaR after, percent of equity.
        actual_pct: f64,
    },
    /// The account already carries as many approved-but-unbooked entries
    /// as allowed: the accounts stage is not confirming fills, so further
    /// margin cannot be checked against a current state.
    #[error("account {account} has {actual} approved entries not yet booked by the accounts stage (limit {limit})")]
    ReservationBacklog {
        /// Account name.
        account: String,
        /// The allowed number of unbooked entries.
        limit: usize,
        /// Unbooked entries now.
        actual: usize,
    },
    /// A number left Decimal's range (implausible input).
    #[error("arithmetic overflow computing {context}")]
    Overflow {
        /// What was being computed.
        context: String,
    },
    /// The signal has no legs.
    #[error("signal has no legs")]
    NoLegs,
    /// An untyped (delta) order whose legs would both close and open.
    #[error("delta order mixes legs that close and legs that open positions")]
    MixedDeltaLegs,
    /// The entry an exit / cancel refers to never opened anything.
    #[error("entry {entry_signal_id} was {state}; nothing to close")]
    EntryNotOpened {
        /// The entry's signal id.
        entry_signal_id: String,
        /// What happened to it (REJECTED, unfilled, ...).
        state: String,
    },
    /// Nothing open to close on any leg.
    #[error("leg {leg} ({instrument} {direction}): nothing open to close")]
    NothingToClose {
        /// Leg index.
        leg: u32,
        /// Symbol.
        instrument: String,
        /// Position direction.
        direction: Direction,
    },
    /// An exit asked for more than is open; it closes what is open.
    #[error("leg {leg} ({instrument}): exit of {requested} clamped to the open quantity {open}")]
    ExitClamped {
        /// Leg index.
        leg: u32,
        /// Symbol.
        instrument: String,
        /// Quantity the exit asked for (scaled to Cerebro's units).
        requested: Decimal,
        /// Open quantity.
        open: Decimal,
    },
    /// A CANCEL / EXIT without `entry_signal_id` where one is required.
    #[error("{signal_type} without entry_signal_id")]
    MissingEntryLink {
        /// Signal type.
        signal_type: String,
    },
    /// A CANCEL found no working order of its entry.
    #[error("entry {entry_signal_id} has no working order to cancel")]
    NothingToCancel {
        /// The entry's signal id.
        entry_signal_id: String,
    },
}

impl Reason {
    /// Stable snake_case code (the serialized `code` tag), for metrics and queries.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::KillSwitch => "kill_switch",
            Reason::StrategyUnknown { .. } => "strategy_unknown",
            Reason::StrategyNotTradable { .. } => "strategy_not_tradable",
            Reason::NoAccount { .. } => "no_account",
            Reason::NoAllocation { .. } => "no_allocation",
            Reason::AccountStateMissing { .. } => "account_state_missing",
            Reason::NonPositiveEquity { .. } => "non_positive_equity",
            Reason::DailyLossLimit { .. } => "daily_loss_limit",
            Reason::MissingPrice { .. } => "missing_price",
            Reason::MissingInstrumentSpec { .. } => "missing_instrument_spec",
            Reason::MissingSenderEquity => "missing_sender_equity",
            Reason::Slippage { .. } => "slippage",
            Reason::NoCapitalAvailable { .. } => "no_capital_available",
            Reason::LegRoundsToZero { .. } => "leg_rounds_to_zero",
            Reason::AlreadyAtTarget { .. } => "already_at_target",
            Reason::StrategyCapital { .. } => "strategy_capital",
            Reason::AccountMargin { .. } => "account_margin",
            Reason::MarginUtilisation { .. } => "margin_utilisation",
            Reason::MaxLeverage { .. } => "max_leverage",
            Reason::MaxPositionSize { .. } => "max_position_size",
            Reason::CvarLimit { .. } => "cvar_limit",
            Reason::ReservationBacklog { .. } => "reservation_backlog",
            Reason::Overflow { .. } => "overflow",
            Reason::NoLegs => "no_legs",
            Reason::MixedDeltaLegs => "mixed_delta_legs",
            Reason::EntryNotOpened { .. } => "entry_not_opened",
            Reason::NothingToClose { .. } => "nothing_to_close",
            Reason::ExitClamped { .. } => "exit_clamped",
            Reason::MissingEntryLink { .. } => "missing_entry_link",
            Reason::NothingToCancel { .. } => "nothing_to_cancel",
        }
    }
}

fn overflow(context: &str) -> Reason {
    Reason::Overflow {
        context: context.to_string(),
    }
}

/// `a × b`, or [`Reason::Overflow`].
pub(crate) fn mul(a: Decimal, b: Decimal, context: &str) -> Result<Decimal, Reason> {
    a.checked_mul(b).ok_or_else(|| overflow(context))
}

/// `a / b` (`b ≠ 0`), or [`Reason::Overflow`].
pub(crate) fn div(a: Decimal, b: Decimal, context: &str) -> Result<Decimal, Reason> {
    a.checked_div(b).ok_or_else(|| overflow(context))
}

/// `a + b`, or [`Reason::Overflow`].
pub(crate) fn add(a: Decimal, b: Decimal, context: &str) -> Result<Decimal, Reason> {
    a.checked_add(b).ok_or_else(|| overflow(context))
}

/// `a − b`, or [`Reason::Overflow`].
pub(crate) fn sub(a: Decimal, b: Decimal, context: &str) -> Result<Decimal, Reason> {
    a.checked_sub(b).ok_or_else(|| overflow(context))
}

/// Notional of `quantity` at `price`: `quantity × price × multiplier`.
pub fn notional(quantity: Decimal, price: Decimal, multiplier: Decimal) -> Result<Decimal, Reason> {
    mul(mul(quantity, price, "notional")?, multiplier, "notional")
}

/// Margin of `quantity` at `price` under `spec`: the same formula as
/// [`InstrumentSpec::margin_for`] (the accounts ledger's), with overflow
/// checked.
pub fn margin(spec: &InstrumentSpec, quantity: Decimal, price: Decimal) -> Result<Decimal, Reason> {
    match spec.margin {
        MarginModel::PercentOfNotional(f) => {
            mul(notional(quantity, price, spec.multiplier)?, f, "margin")
        }
        MarginModel::PerContract(amount) => mul(quantity, amount, "margin"),
    }
}

/// One shrinkable limit evaluated at some quantities.
#[derive(Debug, Clone, PartialEq)]
pub struct Capacity {
    /// What is left under the limit before this order.
    pub room: Decimal,
    /// What this order uses at the evaluated quantities.
    pub usage: Decimal,
    /// The reason to report when this limit binds (numbers at those quantities).
    pub reason: Reason,
}

impl Capacity {
    /// The order fits under this limit.
    pub fn fits(&self) -> bool {
        self.usage <= self.room
    }
}

/// Decimal places of the common scale factor (rounded down).
pub const SCALE_DP: u32 = 12;

/// The largest common scale factor `s ≤ 1` that fits every limit, and the
/// index of the binding one (`None` when nothing binds, `s = 1`).
/// `Err(i)` when limit `i` has no room at all.
pub fn max_scale(caps: &[Capacity]) -> Result<(Decimal, Option<usize>), usize> {
    let mut scale = Decimal::ONE;
    let mut binding = None;
    for (i, c) in caps.iter().enumerate() {
        if c.fits() || c.usage <= Decimal::ZERO {
            continue;
        }
        if c.room <= Decimal::ZERO {
            return Err(i);
        }
        // room < usage here, so the ratio is in (0, 1).
        let s = (c.room / c.usage).round_dp_with_strategy(SCALE_DP, RoundingStrategy::ToZero);
        if s < scale {
            scale = s;
            binding = Some(i);
        }
    }
    Ok((scale, binding))
}

/// One leg as the slippage rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlippageLeg {
    /// BUY or SELL.
    pub side: Side,
    /// MARKET / STOP drift counts; a LIMIT order cannot fill worse than its price.
    pub order_type: OrderType,
    /// The sender's price.
    pub signal_price: Option<Decimal>,
    /// A fresh mark, if any.
    pub mark: Option<Decimal>,
    /// Weight of the leg: the sender's notional (`qty × price × multiplier`).
    pub weight: Decimal,
}

/// The slippage rule's numbers, recorded with every entry decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlippageAssessment {
    /// `false` when there is no positive expected alpha to compare against.
    pub evaluated: bool,
    /// Expected alpha used (strategy config, else signal metadata).
    pub expected_alpha: Option<Decimal>,
    /// `max(0, now − signal timestamp)` in seconds (millisecond precision).
    pub delay_secs: Decimal,
    /// Alpha horizon in seconds.
    pub horizon_secs: i64,
    /// `expected_alpha × min(delay / horizon, 1)`.
    pub alpha_lost_to_delay: Decimal,
    /// Notional-weighted adverse relative move from signal price to mark.
    pub price_drift: Decimal,
    /// `alpha_lost_to_delay + price_drift`.
    pub alpha_lost: Decimal,
    /// `fraction × expected_alpha` (`None` when not evaluated).
    pub limit: Option<Decimal>,
    /// The allowed fraction (0.30).
    pub fraction: Decimal,
    /// Legs whose drift was measured (a signal price, a fresh mark, not LIMIT).
    pub legs_with_mark: usize,
}

impl SlippageAssessment {
    /// The rejection, when the rule fails.
    pub fn rejection(&self) -> Option<Reason> {
        let (limit, alpha) = (self.limit?, self.expected_alpha?);
        (self.evaluated && self.alpha_lost > limit).then_some(Reason::Slippage {
            limit,
            actual: self.alpha_lost,
            fraction: self.fraction,
            expected_alpha: alpha,
            delay_secs: self.delay_secs,
            price_drift: self.price_drift,
        })
    }
}

/// The 30 % slippage rule: how much of the trade's expected alpha is already
/// gone by the time Cerebro decides.
///
/// Model (all in return units, like `expected_alpha`):
///
/// - **Delay**: alpha decays linearly over the horizon `H`
///   (`alpha_horizon_secs`, one day by default, the backtests' bar):
///   `lost_delay = α × min(Δt / H, 1)` with `Δt = max(0, now − signal time)`.
/// - **Drift**: paying a worse price than the sender saw removes that return
///   one for one. Per leg, `adverse = max(0, ±(mark − p) / p)` with `+` for
///   BUY and `−` for SELL, `p` the signal price and `mark` a fresh mark; legs
///   without both prices and LIMIT legs (they cannot fill worse than their
///   limit) contribute nothing. Legs are averaged weighted by sender notional.
///   A favourable move is not credited.
/// - **Rule**: reject when `lost_delay + drift > fraction × α` (`fraction =
///   0.30`). Without a positive `α` the rule cannot be applied and is
///   recorded as not evaluated.
pub fn slippage(
    expected_alpha: Option<Decimal>,
    signal_time: DateTime<Utc>,
    now: DateTime<Utc>,
    horizon_secs: i64,
    fraction: Decimal,
    legs: &[SlippageLeg],
) -> SlippageAssessment {
    let alpha = expected_alpha.filter(|a| *a > Decimal::ZERO);
    let delay_ms = now
        .signed_duration_since(signal_time)
        .num_milliseconds()
        .max(0);
    let delay_secs = Decimal::new(delay_ms, 3);
    let delay_frac = if horizon_secs > 0 {
        (delay_secs / Decimal::from(horizon_secs)).min(Decimal::ONE)
    } else {
        Decimal::ZERO
    };
    let mut weighted = Decimal::ZERO;
    let mut weights = Decimal::ZERO;
    let mut measured = 0;
    for l in legs {
        let (Some(p), Some(m)) = (l.signal_price, l.mark) else {
            continue;
        };
        if p <= Decimal::ZERO || l.order_type == OrderType::Limit || l.weight <= Decimal::ZERO {
            continue;
        }
        let Some(rel) = (m - p).checked_div(p) else {
            continue;
        };
        let adverse = match l.side {
            Side::Buy => rel,
            Side::Sell => -rel,
        }
        .max(Decimal::ZERO);
        let (Some(w), Some(ws)) = (
            adverse
                .checked_mul(l.weight)
                .and_then(|x| weighted.checked_add(x)),
            weights.checked_add(l.weight),
        ) else {
            continue;
        };
        weighted = w;
        weights = ws;
        measured += 1;
    }
    let price_drift = if weights > Decimal::ZERO {
        weighted / weights
    } else {
        Decimal::ZERO
    };
    let lost_delay = alpha.map(|a| a * delay_frac).unwrap_or_default();
    SlippageAssessment {
        evaluated: alpha.is_some(),
        expected_alpha: alpha,
        delay_secs,
        horizon_secs,
        alpha_lost_to_delay: lost_delay,
        price_drift,
        alpha_lost: lost_delay + price_drift,
        limit: alpha.map(|a| a * fraction),
        fraction,
        legs_with_mark: measured,
    }
}

/// CVaR of the allocated portfolio before and after the trade.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CvarAssessment {
    /// Confidence level (0.95).
    pub confidence: f64,
    /// Common backtest days used.
    pub observations: usize,
    /// Expected one-day loss in the worst `1 − confidence` tail, before (currency; positive = loss).
    pub cvar_before: f64,
    /// The same after adding the trade's capital to its strategy.
    pub cvar_after: f64,
    /// `cvar_before / equity × 100`.
    pub cvar_before_pct: f64,
    /// `cvar_after / equity × 100`.
    pub cvar_after_pct: f64,
    /// `cvar_after − cvar_before` (currency).
    pub cvar_contribution: f64,
    /// Strategies with capital deployed but no backtest data (left out).
    pub excluded_strategies: Vec<String>,
}

/// How the trade's strategy co-moves with the rest of the book.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CorrelationImpact {
    /// The trade's strategy.
    pub strategy_id: String,
    /// Pearson correlation of its returns with the portfolio's P&L before the
    /// trade (`None` when the book was empty or flat).
    pub with_portfolio: Option<f64>,
    /// Its correlation with each other strategy holding capital.
    pub with_strategies: BTreeMap<String, f64>,
    /// Its capital as % of equity before the trade.
    pub weight_before_pct: f64,
    /// Its capital as % of equity after the trade.
    pub weight_after_pct: f64,
}

/// Why CVaR was not evaluated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum CvarSkip {
    /// No backtest returns loaded at all.
    #[error("no backtest data loaded")]
    NoData,
    /// The backtest store could not be read (Mongo unreachable, not loaded
    /// yet): decisions go on without CVaR.
    #[error("backtest data unavailable: {reason}")]
    Unavailable {
        /// What went wrong.
        reason: String,
    },
    /// The trade's strategy has no backtest returns.
    #[error("strategy {strategy_id} has no backtest returns")]
    NoBacktest {
        /// Strategy id.
        strategy_id: String,
    },
    /// Too few days common to all strategies involved.
    #[error("only {observations} common backtest days (need {required})")]
    TooFewObservations {
        /// Days found.
        observations: usize,
        /// Days required.
        required: usize,
    },
}

/// Historical CVaR: the mean loss over the worst `ceil((1 − confidence) × n)`
/// days of `pnl` (positive = loss). Zero for an empty series.
pub fn historical_cvar(pnl: &[f64], confidence: f64) -> f64 {
    if pnl.is_empty() {
        return 0.0;
    }
    let n = pnl.len();
    let tail = (((1.0 - confidence) * n as f64) - 1e-9)
        .ceil()
        .clamp(1.0, n as f64) as usize;
    let mut losses: Vec<f64> = pnl.iter().map(|x| -x).collect();
    losses.select_nth_unstable_by(tail - 1, |a, b| b.total_cmp(a));
    losses[..tail].iter().sum::<f64>() / tail as f64
}

/// Pearson correlation of `a[i]` and `b(i)` over `i < a.len()` (two passes,
/// no allocation).
fn pearson(a: &[f64], b: impl Fn(usize) -> f64) -> Option<f64> {
    let n = a.len();
    if n < 2 {
        return None;
    }
    let (mut sa, mut sb) = (0.0, 0.0);
    for (i, x) in a.iter().enumerate() {
        sa += x;
        sb += b(i);
    }
    let (ma, mb) = (sa / n as f64, sb / n as f64);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (i, x) in a.iter().enumerate() {
        let (da, db) = (x - ma, b(i) - mb);
        sab += da * db;
        saa += da * da;
        sbb += db * db;
    }
    let den = (saa * sbb).sqrt();
    (den > 0.0 && den.is_finite()).then(|| sab / den)
}

/// CVaR of the allocated portfolio before and after the trade, with the
/// trade's correlation impact.
///
/// Model: each strategy's backtest return is a return on the capital it
/// deploys, so the book's P&L on backtest day `t` is
/// `P_t = Σ_s E_s × r_{s,t}` with `E_s` the capital (margin) strategy `s`
/// deploys now. The trade adds its margin `ΔE` to its own strategy:
/// `P'_t = P_t + ΔE × r_{k,t}`. Days are those where every strategy involved
/// has a return. CVaR is [`historical_cvar`] at `confidence`.
pub fn cvar_impact(
    table: Option<&ReturnsTable>,
    exposures: &BTreeMap<String, f64>,
    strategy_id: &str,
    added: f64,
    equity: f64,
    confidence: f64,
    min_observations: usize,
) -> Result<(CvarAssessment, CorrelationImpact), CvarSkip> {
    let table = table.ok_or(CvarSkip::NoData)?;
    let own = table
        .column(strategy_id)
        .ok_or_else(|| CvarSkip::NoBacktest {
            strategy_id: strategy_id.to_string(),
        })?;
    let mut excluded = Vec::new();
    let mut others: Vec<(&str, f64, &[f64])> = Vec::new();
    for (s, e) in exposures {
        if *e == 0.0 || s == strategy_id {
            continue;
        }
        match table.column(s) {
            Some(col) => others.push((s.as_str(), *e, col)),
            None => excluded.push(s.clone()),
        }
    }
    let own_before = exposures.get(strategy_id).copied().unwrap_or(0.0);
    let rows: Vec<usize> = (0..own.len())
        .filter(|&t| !own[t].is_nan() && others.iter().all(|(_, _, c)| !c[t].is_nan()))
        .collect();
    if rows.len() < min_observations.max(1) {
        return Err(CvarSkip::TooFewObservations {
            observations: rows.len(),
            required: min_observations.max(1),
        });
    }
    let own_r: Vec<f64> = rows.iter().map(|&t| own[t]).collect();
    let before: Vec<f64> = rows
        .iter()
        .zip(&own_r)
        .map(|(&t, r)| others.iter().map(|(_, e, c)| e * c[t]).sum::<f64>() + own_before * r)
        .collect();
    let after: Vec<f64> = before
        .iter()
        .zip(&own_r)
        .map(|(p, r)| p + added * r)
        .collect();
    let (cb, ca) = (
        historical_cvar(&before, confidence),
        historical_cvar(&after, confidence),
    );
    let pct = |x: f64| {
        if equity > 0.0 {
            x / equity * 100.0
        } else {
            0.0
        }
    };
    let with_strategies = others
        .iter()
        .filter_map(|(s, _, c)| pearson(&own_r, |i| c[rows[i]]).map(|r| (s.to_string(), r)))
        .collect();
    Ok((
        CvarAssessment {
            confidence,
            observations: rows.len(),
            cvar_before: cb,
            cvar_after: ca,
            cvar_before_pct: pct(cb),
            cvar_after_pct: pct(ca),
            cvar_contribution: ca - cb,
            excluded_strategies: excluded,
        },
        CorrelationImpact {
            strategy_id: strategy_id.to_string(),
            with_portfolio: pearson(&own_r, |i| before[i]),
            with_strategies,
            weight_before_pct: pct(own_before),
            weight_after_pct: pct(own_before + added),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn margin_matches_the_ledger_formula() {
        for spec in [
            InstrumentSpec::default_for(InstrumentType::Stock, Decimal::ONE),
            InstrumentSpec {
                multiplier: dec!(100),
                margin: MarginModel::PerContract(dec!(16500)),
            },
            InstrumentSpec::default_for(InstrumentType::Option, dec!(100)),
        ] {
            assert_eq!(
                margin(&spec, dec!(17), dec!(150)).unwrap(),
                spec.margin_for(dec!(17), dec!(150))
            );
        }
    }

    #[test]
    fn cvar_is_mean_of_worst_tail() {
        // 20 days: worst 5% = 1 day.
        let mut pnl: Vec<f64> = (0..20).map(|i| i as f64).collect();
        pnl[3] = -10.0;
        assert_eq!(historical_cvar(&pnl, 0.95), 10.0);
        // 40 days: worst 2 days.
        let mut pnl = vec![1.0; 40];
        pnl[0] = -4.0;
        pnl[1] = -2.0;
        assert_eq!(historical_cvar(&pnl, 0.95), 3.0);
        // 2000 days: exactly 100 in the tail, not 101.
        let pnl: Vec<f64> = (0..2000).map(|i| -(i as f64)).collect();
        let expect = (1900..2000).map(|i| i as f64).sum::<f64>() / 100.0;
        assert_eq!(historical_cvar(&pnl, 0.95), expect);
    }

    #[test]
    fn max_scale_picks_the_tightest_limit() {
        let cap = |room: Decimal, usage: Decimal| Capacity {
            room,
            usage,
            reason: Reason::KillSwitch,
        };
        assert_eq!(
            max_scale(&[cap(dec!(10), dec!(5)), cap(dec!(3), dec!(4))]),
            Ok((dec!(0.75), Some(1)))
        );
        assert_eq!(max_scale(&[cap(dec!(0), dec!(4))]), Err(0));
        assert_eq!(
            max_scale(&[cap(dec!(1), dec!(3))]).unwrap().0,
            dec!(0.333333333333)
        );
    }
}
