//! Allocation optimisers and the inputs/outputs shared by all of them.
//!
//! Every optimiser works on **decimal daily returns** of date-aligned
//! strategies ([`crate::align::AlignedReturns`]) and on the same feasible set
//!
//! ```text
//!   W = { w ∈ ℝⁿ : Σᵢ wᵢ = max_leverage,  0 ≤ wᵢ ≤ max_single_strategy }
//! ```
//!
//! i.e. fully invested at the target leverage, long-only, and capped per
//! strategy. `wᵢ` is the fraction of account equity given to strategy `i`
//! (`wᵢ = 0.45` ↔ 45 % allocation); daily portfolio return is `rₜᵀw`.
//!
//! - [`max_sharpe`](max_sharpe::max_sharpe): maximum Sharpe ratio (convex QP after homogenisation).
//! - [`min_cvar`](min_cvar::min_cvar): minimum historical CVaR (Rockafellar–Uryasev LP).
//! - [`hrp`](hrp::hrp): hierarchical risk parity (closed form on a dendrogram).
//! - [`max_cagr`](max_cagr::max_cagr): maximum CAGR under a max-drawdown limit (exponential-cone program).
//! - [`frontier`]: minimum-variance portfolios and the efficient frontier.
//!
//! All solves go through clarabel (interior point); nothing here is a
//! hand-rolled gradient method.

pub mod frontier;
pub mod hrp;
pub mod max_cagr;
pub mod max_sharpe;
pub mod min_cvar;
mod program;

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Axis};
use serde::{Deserialize, Serialize};

use crate::align::AlignedReturns;
use crate::backtest::TRADING_DAYS_PER_YEAR;

pub use frontier::{efficient_frontier, max_return_range, min_variance, FrontierPoint};
pub use hrp::{hrp, HrpResult};
pub use max_cagr::{max_cagr, CagrParams, MaxCagrResult};
pub use max_sharpe::max_sharpe;
pub use min_cvar::{historical_var_cvar, min_cvar, CvarParams, MinCvarResult};

/// Largest per-weight correction [`Allocation`]s accept when snapping a
/// solver answer exactly onto the feasible set; anything larger means the
/// solver did not really satisfy the constraints and the run is marked
/// unsuccessful.
pub const REPAIR_TOLERANCE: f64 = 1e-6;

/// Why an optimisation could not produce an allocation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimizeError {
    /// Constraints are malformed (non-finite, non-positive, …).
    #[error("invalid constraints: {0}")]
    InvalidConstraints(String),
    /// The constraint set is empty (e.g. n × max_single < max_leverage).
    #[error("infeasible: {0}")]
    Infeasible(String),
    /// Input data cannot support the computation (too few days, zero variance, …).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// clarabel rejected the problem data.
    #[error("solver setup failed: {0}")]
    SolverSetup(String),
    /// clarabel finished without an (even reduced-accuracy) optimum.
    #[error("solver did not converge: status {status} after {iterations} iterations")]
    NotSolved {
        /// clarabel's final status, e.g. `PrimalInfeasible`.
        status: String,
        /// Interior-point iterations used.
        iterations: u32,
    },
}

/// The constraint block of a `portfolio_optimization_runs` document.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Constraints {
    /// Σ wᵢ exactly (2.0 = 200 % of equity allocated).
    pub max_leverage: f64,
    /// Upper bound on each wᵢ (0.5 = 50 %).
    pub max_single_strategy: f64,
    /// Risk-free rate **per day**, as a decimal, subtracted once from the
    /// portfolio's expected daily return in Sharpe ratios.
    pub risk_free_rate: f64,
}

impl Default for Constraints {
    /// The house defaults: 200 % leverage, 50 % cap, zero risk-free rate.
    fn default() -> Self {
        Self {
            max_leverage: 2.0,
            max_single_strategy: 0.5,
            risk_free_rate: 0.0,
        }
    }
}

impl Constraints {
    /// Check the numbers and that the feasible set for `n` strategies is non-empty.
    pub fn validate(&self, n: usize) -> Result<(), OptimizeError> {
        let bad = |m: &str| Err(OptimizeError::InvalidConstraints(m.to_string()));
        if !(self.max_leverage.is_finite() && self.max_leverage > 0.0) {
            return bad("max_leverage must be finite and > 0");
        }
        if !(self.max_single_strategy.is_finite() && self.max_single_strategy > 0.0) {
            return bad("max_single_strategy must be finite and > 0");
        }
        if !self.risk_free_rate.is_finite() {
            return bad("risk_free_rate must be finite");
        }
        if n == 0 {
            return Err(OptimizeError::InvalidInput("no strategies".into()));
        }
        // Relative slack so that e.g. 4 × 0.5 = 2.0 is accepted despite rounding.
        if (n as f64) * self.max_single_strategy < self.max_leverage * (1.0 - 1e-12) {
            return Err(OptimizeError::Infeasible(format!(
                "{n} strategies × max_single_strategy {} < max_leverage {}",
                self.max_single_strategy, self.max_leverage
            )));
        }
        Ok(())
    }
}

/// The `optimization_result` block of a run document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SolveInfo {
    /// Solved to full accuracy and the weights passed the feasibility checks.
    pub success: bool,
    /// Human-readable outcome (solver status and any caveat).
    pub message: String,
    /// The solver stopped at an optimum (full or reduced accuracy).
    pub converged: bool,
    /// Solver iterations (interior-point iterations; 0 for closed forms).
    pub iterations: u32,
}

/// The `portfolio_metrics` / `expected_metrics` block of run and allocation documents.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PortfolioMetrics {
    /// μᵀw.
    pub expected_daily_return: f64,
    /// √(wᵀΣw), Σ the sample covariance (ddof 1).
    pub expected_daily_volatility: f64,
    /// (μᵀw − r_f) / √(wᵀΣw); 0 if the volatility is 0.
    pub expected_sharpe_daily: f64,
    /// expected_sharpe_daily × √252.
    pub expected_sharpe_annual: f64,
    /// 100 × Σw.
    pub total_allocation_pct: f64,
    /// Σw.
    pub leverage_ratio: f64,
}

/// Which optimiser produced an [`Allocation`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// [`max_sharpe::max_sharpe`].
    MaxSharpe,
    /// [`min_cvar::min_cvar`].
    MinCvar,
    /// [`hrp::hrp`].
    Hrp,
    /// [`max_cagr::max_cagr`].
    MaxCagr,
    /// [`frontier::min_variance`].
    MinVariance,
}

/// A recommended allocation with its solver outcome and expected metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Optimiser used.
    pub method: Method,
    /// Strategy ids in the same order as `weights`.
    pub strategy_ids: Vec<String>,
    /// Weights as fractions of equity; in the feasible set W.
    pub weights: Vec<f64>,
    /// Solver outcome.
    pub solve: SolveInfo,
    /// Expected metrics of `weights` under the sample moments.
    pub metrics: PortfolioMetrics,
}

impl Allocation {
    /// `strategy_id → allocation %` as stored in `recommended_allocations`
    /// (0.455 → 45.5). Includes zero weights so the record is complete.
    pub fn allocations_pct(&self) -> BTreeMap<String, f64> {
        self.strategy_ids
            .iter()
            .cloned()
            .zip(self.weights.iter().map(|w| 100.0 * w))
            .collect()
    }
}

/// Sample moments of aligned returns, computed once and shared by the optimisers.
#[derive(Debug, Clone, PartialEq)]
pub struct ReturnMoments {
    /// Strategy ids (column order).
    pub strategy_ids: Vec<String>,
    /// Number of observations the moments were estimated from.
    pub n_days: usize,
    /// μ: mean decimal daily return per strategy.
    pub mean: Array1<f64>,
    /// Σ: sample covariance matrix (ddof 1).
    pub cov: Array2<f64>,
}

impl ReturnMoments {
    /// Estimate μ and Σ from aligned returns (needs ≥ 2 days).
    pub fn from_aligned(aligned: &AlignedReturns) -> Result<Self, OptimizeError> {
        Ok(Self {
            strategy_ids: aligned.strategy_ids.clone(),
            n_days: aligned.n_days(),
            mean: mean_returns(&aligned.returns)?,
            cov: covariance_matrix(&aligned.returns)?,
        })
    }

    /// Correlation matrix derived from `cov`.
    pub fn correlation(&self) -> Array2<f64> {
        correlation_matrix(&self.cov)
    }

    /// Number of strategies.
    pub fn n(&self) -> usize {
        self.mean.len()
    }
}

/// Column means of a `T × N` return matrix.
pub fn mean_returns(returns: &Array2<f64>) -> Result<Array1<f64>, OptimizeError> {
    returns
        .mean_axis(Axis(0))
        .ok_or_else(|| OptimizeError::InvalidInput("no observations".into()))
}

/// Sample covariance (ddof 1) of the columns of a `T × N` return matrix,
/// for the run record and every optimiser. Needs T ≥ 2.
pub fn covariance_matrix(returns: &Array2<f64>) -> Result<Array2<f64>, OptimizeError> {
    let t = returns.nrows();
    if t < 2 {
        return Err(OptimizeError::InvalidInput(format!(
            "need at least 2 observations for a covariance, got {t}"
        )));
    }
    let mu = mean_returns(returns)?;
    let centred = returns - &mu;
    let mut cov = centred.t().dot(&centred) / (t as f64 - 1.0);
    // Enforce exact symmetry (the product is symmetric up to rounding).
    let n = cov.nrows();
    for i in 0..n {
        for j in (i + 1)..n {
            let v = 0.5 * (cov[[i, j]] + cov[[j, i]]);
            cov[[i, j]] = v;
            cov[[j, i]] = v;
        }
    }
    Ok(cov)
}

/// Pearson correlation matrix from a covariance matrix. A zero-variance
/// strategy gets correlation 0 with everything else and 1 on the diagonal.
pub fn correlation_matrix(cov: &Array2<f64>) -> Array2<f64> {
    let n = cov.nrows();
    let sd: Vec<f64> = (0..n).map(|i| cov[[i, i]].max(0.0).sqrt()).collect();
    Array2::from_shape_fn((n, n), |(i, j)| {
        if i == j {
            1.0
        } else if sd[i] > 0.0 && sd[j] > 0.0 {
            (cov[[i, j]] / (sd[i] * sd[j])).clamp(-1.0, 1.0)
        } else {
            0.0
        }
    })
}

/// Row-major nested vectors, the shape stored for `correlation_matrix` and
/// `covariance_matrix` in a run document.
pub fn to_nested(m: &Array2<f64>) -> Vec<Vec<f64>> {
    m.rows().into_iter().map(|r| r.to_vec()).collect()
}

/// Expected metrics of weights `w` under moments μ, Σ and daily risk-free rate `r_f`.
pub fn portfolio_metrics(
    mean: &Array1<f64>,
    cov: &Array2<f64>,
    w: &[f64],
    risk_free_rate: f64,
) -> PortfolioMetrics {
    let wv = Array1::from(w.to_vec());
    let ret = mean.dot(&wv);
    let var = wv.dot(&cov.dot(&wv)).max(0.0);
    let vol = var.sqrt();
    let sharpe = if vol > 0.0 {
        (ret - risk_free_rate) / vol
    } else {
        0.0
    };
    let lev: f64 = w.iter().sum();
    PortfolioMetrics {
        expected_daily_return: ret,
        expected_daily_volatility: vol,
        expected_sharpe_daily: sharpe,
        expected_sharpe_annual: sharpe * TRADING_DAYS_PER_YEAR.sqrt(),
        total_allocation_pct: 100.0 * lev,
        leverage_ratio: lev,
    }
}

/// Snap solver output onto W = {Σw = total, 0 ≤ w ≤ cap}: clamp to the box,
/// then spread the (tiny) remaining sum error over the coordinates that have
/// room, proportionally to that room, which keeps every coordinate in the box.
/// Returns the largest absolute change made, which callers compare with
/// [`REPAIR_TOLERANCE`]: this removes interior-point round-off, it is not a
/// heuristic projection.
pub fn snap_to_feasible(w: &mut [f64], total: f64, cap: f64) -> f64 {
    let orig: Vec<f64> = w.to_vec();
    for x in w.iter_mut() {
        *x = x.clamp(0.0, cap);
    }
    let residual = total - w.iter().sum::<f64>();
    if residual > 0.0 {
        let room: f64 = w.iter().map(|x| cap - x).sum();
        if room > 0.0 {
            let f = (residual / room).min(1.0);
            for x in w.iter_mut() {
                *x += f * (cap - *x);
            }
        }
    } else if residual < 0.0 {
        let have: f64 = w.iter().sum();
        if have > 0.0 {
            let f = (-residual / have).min(1.0);
            for x in w.iter_mut() {
                *x -= f * *x;
            }
        }
    }
    w.iter()
        .zip(&orig)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// Build the [`SolveInfo`] for a clarabel result after snapping: success only
/// when clarabel reports `Solved` and the snap stayed within tolerance.
pub(crate) fn solve_info(
    status: clarabel::solver::SolverStatus,
    iterations: u32,
    max_snap: f64,
) -> SolveInfo {
    use clarabel::solver::SolverStatus;
    let full = status == SolverStatus::Solved;
    let snapped_ok = max_snap <= REPAIR_TOLERANCE;
    let mut message = format!("clarabel status {status}");
    if !full {
        message.push_str(" (reduced accuracy)");
    }
    if !snapped_ok {
        message.push_str(&format!(
            "; weights needed a correction of {max_snap:.3e} to satisfy the constraints"
        ));
    }
    SolveInfo {
        success: full && snapped_ok,
        message,
        converged: true,
        iterations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn covariance_and_correlation() {
        let r = array![[0.01, 0.02], [0.03, -0.01], [-0.02, 0.00]];
        let cov = covariance_matrix(&r).expect("cov");
        // column 0: mean 0.00667, deviations .00333 .02333 -.02667
        let c00 = (0.01f64 - 0.02 / 3.0).powi(2)
            + (0.03f64 - 0.02 / 3.0).powi(2)
            + (-0.02f64 - 0.02 / 3.0).powi(2);
        assert!((cov[[0, 0]] - c00 / 2.0).abs() < 1e-15);
        let corr = correlation_matrix(&cov);
        assert_eq!(corr[[0, 0]], 1.0);
        assert!((corr[[0, 1]] - corr[[1, 0]]).abs() < 1e-15);
        assert!(corr[[0, 1]].abs() <= 1.0);
    }

    #[test]
    fn constraints_validation() {
        let c = Constraints::default();
        assert!(c.validate(4).is_ok());
        assert!(matches!(c.validate(3), Err(OptimizeError::Infeasible(_))));
        let bad = Constraints {
            max_leverage: -1.0,
            ..c
        };
        assert!(matches!(
            bad.validate(8),
            Err(OptimizeError::InvalidConstraints(_))
        ));
    }

    #[test]
    fn snap_keeps_box_and_sum() {
        let mut w = vec![0.5 + 1e-9, 0.3, -1e-10, 1.2 - 2e-9];
        let d = snap_to_feasible(&mut w, 2.0, 0.5 + 0.7);
        assert!(d < 1e-8);
        assert!((w.iter().sum::<f64>() - 2.0).abs() < 1e-15);
        assert!(w.iter().all(|x| (0.0..=1.2).contains(x)));
    }
}
