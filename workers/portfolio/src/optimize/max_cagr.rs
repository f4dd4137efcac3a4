//! Maximum-CAGR allocation under a maximum-drawdown limit.
//!
//! # Problem
//!
//! The portfolio is rebalanced daily to weights w, so its historical daily
//! return is `pₜ(w) = rₜᵀw` and its equity `Eₜ = Πₛ≤ₜ (1 + pₛ)`, `E₀ = 1`.
//!
//! ```text
//!   maximise   CAGR(w) = exp(252 · (1/T) Σₜ ln(1 + rₜᵀw)) − 1
//!   subject to MDD(w) ≤ D,   1ᵀw = L,   0 ≤ wᵢ ≤ u
//! ```
//!
//! with MDD the compounded-equity drawdown of
//! [`crate::backtest::max_drawdown`] (running peak includes `E₀ = 1`).
//!
//! # Why this is solved globally (no local search needed)
//!
//! Drawdown limits are usually called non-convex, but in log-equity they are
//! not: with `Gₜ = Σₛ≤ₜ ln(1 + rₛᵀw)` (`G₀ = 0`), `MDD ≤ D` is exactly
//! `Gₜ − max₀≤ₛ≤ₜ Gₛ ≥ ln(1 − D)` for all t, i.e. every window sum
//! `Σ_{s<i≤t} ln(1 + rᵢᵀw) ≥ ln(1 − D)`. Each window sum is concave in w, so
//! each constraint is a convex superlevel set, and the objective (mean log
//! growth; CAGR is an increasing function of it) is concave. The problem is
//! therefore convex and clarabel solves it to global optimality as an
//! exponential-cone program:
//!
//! ```text
//!   maximise   (252/T) Σₜ gₜ
//!   subject to (gₜ, 1, 1 + rₜᵀw) ∈ K_exp          (gₜ ≤ ln(1 + rₜᵀw))
//!              Cₜ = Cₜ₋₁ + gₜ,  C₀ = 0             (log equity)
//!              Mₜ ≥ Mₜ₋₁,  M₁ ≥ 0,  Mₜ ≥ Cₜ        (Mₜ ≥ running peak)
//!              Cₜ − Mₜ ≥ ln(1 − D)                  (drawdown limit)
//!              1ᵀw = L,  0 ≤ wᵢ ≤ u
//! ```
//!
//! The relaxation `gₜ ≤ ln(…)` is tight at the optimum: raising any gₜ only
//! increases the objective and every window sum, so an optimal solution can
//! always take equality. Likewise Mₜ can always be the exact running peak.
//! After solving, the drawdown and CAGR of the returned weights are
//! recomputed from the historical returns; the run is marked unsuccessful if
//! the recomputed drawdown exceeds D by more than 1e-6.
//!
//! 252 periods per year is used for annualisation (argmax-invariant).

use super::program::{ConeProgram, Expr};
use super::{
    portfolio_metrics, snap_to_feasible, solve_info, Allocation, Constraints, Method,
    OptimizeError, ReturnMoments,
};
use crate::align::AlignedReturns;
use crate::backtest::{max_drawdown, TRADING_DAYS_PER_YEAR};

/// Options for [`max_cagr`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CagrParams {
    /// Largest allowed drawdown as a positive fraction in (0, 1), e.g. 0.2 for
    /// 20 %; `None` removes the limit (growth-optimal / Kelly weights in W).
    pub max_drawdown: Option<f64>,
}

/// A maximum-CAGR allocation with its realised growth and drawdown.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MaxCagrResult {
    /// Weights, solver outcome and expected (mean/variance) metrics.
    pub allocation: Allocation,
    /// CAGR of the weights over the aligned history (252 periods per year).
    pub cagr: f64,
    /// Maximum drawdown of the weights over the aligned history.
    pub max_drawdown: f64,
    /// The limit that was imposed.
    pub max_drawdown_limit: Option<f64>,
}

/// Daily returns `rₜᵀw` of fixed weights over the aligned history.
pub fn portfolio_returns(aligned: &AlignedReturns, w: &[f64]) -> Vec<f64> {
    aligned
        .returns
        .rows()
        .into_iter()
        .map(|row| row.iter().zip(w).map(|(a, b)| a * b).sum())
        .collect()
}

/// CAGR of a daily return series with 252 periods per year; −1 if equity
/// is wiped out, `None` for an empty series.
pub fn cagr(returns: &[f64]) -> Option<f64> {
    if returns.is_empty() {
        return None;
    }
    let mut log_sum = 0.0;
    for r in returns {
        if 1.0 + r <= 0.0 {
            return Some(-1.0);
        }
        log_sum += (1.0 + r).ln();
    }
    Some((TRADING_DAYS_PER_YEAR * log_sum / returns.len() as f64).exp() - 1.0)
}

/// Maximum-CAGR weights over W with an optional drawdown limit (see the
/// module docs: convex, solved globally). An unattainable limit surfaces as
/// [`OptimizeError::NotSolved`] with a primal-infeasible status.
pub fn max_cagr(
    aligned: &AlignedReturns,
    constraints: &Constraints,
    params: &CagrParams,
) -> Result<MaxCagrResult, OptimizeError> {
    let n = aligned.n_strategies();
    let t = aligned.n_days();
    constraints.validate(n)?;
    if let Some(d) = params.max_drawdown {
        if !(d > 0.0 && d < 1.0) {
            return Err(OptimizeError::InvalidConstraints(format!(
                "max_drawdown must be in (0, 1), got {d}"
            )));
        }
    }
    let moments = ReturnMoments::from_aligned(aligned)?;
    let l = constraints.max_leverage;
    let u = constraints.max_single_strategy;
    let g0 = n;
    let c0 = n + t;
    let m0 = n + 2 * t;
    let n_vars = if params.max_drawdown.is_some() {
        n + 3 * t
    } else {
        n + t
    };
    let mut prog = ConeProgram::new(n_vars);
    let k = TRADING_DAYS_PER_YEAR / t as f64;
    for s in 0..t {
        prog.set_linear(g0 + s, -k);
    }
    let sum_row: Expr = (0..n).map(|i| (i, 1.0)).collect();
    prog.eq(&sum_row, l);
    let r = &aligned.returns;
    for s in 0..t {
        let growth: Expr = (0..n).map(|i| (i, r[[s, i]])).collect();
        prog.exp_cone([(0.0, &[(g0 + s, 1.0)]), (1.0, &[]), (1.0, &growth)]);
    }
    if let Some(d) = params.max_drawdown {
        let floor = (1.0 - d).ln();
        for s in 0..t {
            // Cₜ − Cₜ₋₁ − gₜ = 0
            let mut row: Expr = vec![(c0 + s, 1.0), (g0 + s, -1.0)];
            if s > 0 {
                row.push((c0 + s - 1, -1.0));
            }
            prog.eq(&row, 0.0);
        }
        for s in 0..t {
            if s == 0 {
                prog.le(&[(m0, -1.0)], 0.0); // M₁ ≥ 0 (= ln E₀)
            } else {
                prog.le(&[(m0 + s - 1, 1.0), (m0 + s, -1.0)], 0.0); // Mₜ ≥ Mₜ₋₁
            }
            prog.le(&[(c0 + s, 1.0), (m0 + s, -1.0)], 0.0); // Mₜ ≥ Cₜ
            prog.le(&[(m0 + s, 1.0), (c0 + s, -1.0)], -floor); // Cₜ − Mₜ ≥ ln(1−D)
        }
    }
    for i in 0..n {
        prog.le(&[(i, -1.0)], 0.0);
        prog.le(&[(i, 1.0)], u);
    }
    let sol = prog.solve()?.require_usable()?;
    let mut w: Vec<f64> = sol.x[..n].to_vec();
    let snap = snap_to_feasible(&mut w, l, u);
    let port = portfolio_returns(aligned, &w);
    let realised_mdd = max_drawdown(&port);
    let growth = cagr(&port).unwrap_or(-1.0);
    let mut solve = solve_info(sol.status, sol.iterations, snap);
    if let Some(d) = params.max_drawdown {
        if realised_mdd > d + 1e-6 {
            solve.success = false;
            solve.message.push_str(&format!(
                "; recomputed drawdown {realised_mdd:.6} exceeds limit {d}"
            ));
        }
    }
    let metrics = portfolio_metrics(&moments.mean, &moments.cov, &w, constraints.risk_free_rate);
    Ok(MaxCagrResult {
        allocation: Allocation {
            method: Method::MaxCagr,
            strategy_ids: aligned.strategy_ids.clone(),
            weights: w,
            solve,
            metrics,
        },
        cagr: growth,
        max_drawdown: realised_mdd,
        max_drawdown_limit: params.max_drawdown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cagr_of_constant_growth() {
        let r = vec![0.001; 252];
        let c = cagr(&r).expect("cagr");
        assert!((c - (1.001f64.powi(252) - 1.0)).abs() < 1e-12);
        assert_eq!(cagr(&[0.1, -1.0]), Some(-1.0));
    }
}
