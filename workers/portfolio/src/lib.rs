//! Pure portfolio logic for mtx: no network, no database; the only I/O is
//! reading backtest CSV files from a path (charts are returned as strings).
//!
//! Module map:
//!
//! - [`backtest`]: parse the developers' backtest CSVs (`Date,Daily Returns (%)`
//!   and variants), sort and validate them, and compute the per-strategy
//!   statistics stored in `strategy_backtest_data` (mean, volatility, Sharpe,
//!   max drawdown, win rate, margin). Loads a whole folder at once.
//! - [`mod@align`]: inner-join several strategies' series **by date** and report
//!   the common window.
//! - [`optimize`]: the allocation optimisers behind `portfolio_optimization_runs`
//!   / `portfolio_allocations`, all over the same feasible set
//!   (Σw = max_leverage, 0 ≤ wᵢ ≤ max_single_strategy), solved with clarabel:
//!   - [`optimize::max_sharpe()`]: maximum Sharpe (homogenised QP),
//!   - [`optimize::min_cvar()`]: minimum historical CVaR (Rockafellar–Uryasev LP),
//!   - [`optimize::hrp()`]: hierarchical risk parity,
//!   - [`optimize::max_cagr()`]: maximum CAGR under a drawdown limit (exp-cone program),
//!   - [`mod@optimize::frontier`]: minimum variance and the efficient frontier,
//!
//!   plus covariance/correlation matrices and portfolio metrics for the run record.
//! - [`mod@run`]: one `mtx optimize` run: the algorithm by name
//!   ([`run::Algorithm`]) and its algorithm-specific figures.
//! - [`percent`]: allocations as exact percentages: rounding weights without
//!   breaking the constraints, validating hand edits, metrics of percentages.
//! - [`report`]: SVG charts of a run (allocation bars, correlation heatmap,
//!   efficient frontier) rendered with plotters into strings.
//!
//! Units: returns are decimal daily returns (0.0057 = +0.57 %); `f64` is used
//! throughout because these are ratios and statistics, not money.

pub mod align;
pub mod backtest;
pub mod optimize;
pub mod percent;
pub mod report;
pub mod run;

pub use align::{align, align_all, AlignError, AlignedReturns, AlignmentWindow};
pub use backtest::{
    load_backtest_csv, load_backtest_dir, parse_backtest_csv, BacktestError, BacktestStats,
    StrategyBacktest,
};
pub use optimize::{Allocation, Constraints, OptimizeError, PortfolioMetrics, ReturnMoments};
pub use run::{run, Algorithm, RunDetails, RunOutcome, RunParams, MIN_COMMON_DAYS};
