//! Cerebro's pure decision logic: position sizing and pre-trade risk for
//! mtx, with no I/O (no NATS, no Mongo, no async) — and the worker around
//! it ([`worker`], [`backtests`]). The Cerebro worker keeps
//! an [`Inputs`] snapshot current from its KV watchers, calls [`decide()`] per
//! standardized signal, reserves the approved margin atomically and publishes
//! the decision, orders and cancels.
//!
//! Module map:
//!
//! - [`inputs`]: the decision inputs as plain data — [`StrategyConfig`],
//!   [`ActiveAllocation`], [`AccountInputs`] (account state, today's P&L,
//!   reservations), [`SystemConfig`] (kill switch, MAX_LEVERAGE_GLOBAL,
//!   utilisation cap, CVaR limit, slippage fraction), [`InstrumentSpecs`]
//!   (multiplier, lot size, margin per class / symbol, reusing
//!   [`mtx_accounts::InstrumentSpec`]), marks, [`EntryRecord`]s and the
//!   backtest [`ReturnsTable`].
//! - [`sizing`]: allocated / available capital and the four sizing modes,
//!   legs sized together, rounded toward zero to the lot.
//! - [`risk`]: typed [`Reason`]s, the shrink-to-fit limits, the slippage
//!   rule and historical CVaR 95 % before / after the trade.
//! - [`exits`]: EXIT / SCALE_OUT / CANCEL against the entry or the strategy's
//!   position, with deferral while the entry has not filled.
//! - [`backtests`]: `strategy_backtest_data` documents → [`ReturnsTable`]
//!   (aligned by date), and the worker's lazily connected Mongo reader.
//! - [`config`]: the `[cerebro]` settings ([`CerebroConfig`]).
//! - [`janitor`]: when `entries.*` / `exits.*` KV keys are deleted.
//! - [`worker`]: the `cerebro` stage (KV watchers, mark and order-event
//!   feeds, backtest loader, CAS margin reservations, janitor).
//! - [`mod@decide`]: [`decide()`] / [`decide_with`] → [`DecisionOutput`]: the
//!   `cerebro_decisions` record ([`DecisionRecord`]), per-leg
//!   [`mtx_schemas::order::Order`]s, cancels and the margin to reserve — or a
//!   deferral.
//!
//! Money, prices and quantities are `Decimal` throughout; `f64` only for the
//! CVaR and correlation statistics.

pub mod backtests;
pub mod config;
pub mod decide;
pub mod exits;
mod feeds;
pub mod inputs;
pub mod janitor;
pub mod risk;
pub mod sizing;
pub mod worker;

pub use config::CerebroConfig;
pub use decide::{
    decide, decide_with, Decided, DecisionOutput, DecisionRecord, LegDecision, RiskAssessment,
};
pub use exits::{DeferReason, ExitKind};
pub use inputs::{
    AccountInputs, ActiveAllocation, DecideOptions, EntryLeg, EntryRecord, Inputs,
    InstrumentConfig, InstrumentSpecs, MarginRule, Mark, Reservation, ReturnSeries, ReturnsError,
    ReturnsTable, RiskLimits, StrategyConfig, SystemConfig,
};
pub use risk::{CorrelationImpact, CvarAssessment, CvarSkip, Reason, SlippageAssessment};
