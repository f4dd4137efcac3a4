//! Minimum historical CVaR allocation (Rockafellar–Uryasev).
//!
//! # Problem
//!
//! Daily portfolio loss on historical day t is `ℓₜ(w) = −rₜᵀw`. Historical
//! CVaR at confidence α (default 0.95) is the Rockafellar–Uryasev value
//!
//! ```text
//!   CVaR_α(w) = min_ζ  ζ + 1/((1−α)T) · Σₜ max(0, ℓₜ(w) − ζ)
//! ```
//!
//! (the average of the worst (1−α) share of days, with the boundary day
//! weighted fractionally when (1−α)T is not an integer); the minimising ζ is
//! the historical VaR. Both are reported as **positive loss fractions**
//! (0.02 = lose 2 % of equity on a bad day).
//!
//! The allocation solves the LP
//!
//! ```text
//!   minimise   ζ + 1/((1−α)T) · Σₜ zₜ
//!   subject to zₜ ≥ −rₜᵀw − ζ,  zₜ ≥ 0           (t = 1..T)
//!              1ᵀw = L,  0 ≤ wᵢ ≤ u
//!              μᵀw ≥ min_expected_return          (optional)
//! ```
//!
//! over (w, ζ, z) with clarabel.

use super::program::{ConeProgram, Expr};
use super::{
    portfolio_metrics, snap_to_feasible, solve_info, Allocation, Constraints, Method,
    OptimizeError, ReturnMoments,
};
use crate::align::AlignedReturns;

/// Options for [`min_cvar`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CvarParams {
    /// Confidence level α in (0, 1); 0.95 averages the worst 5 % of days.
    pub confidence: f64,
    /// Optional floor on the expected daily return μᵀw (decimal per day).
    pub min_expected_return: Option<f64>,
}

impl Default for CvarParams {
    /// CVaR 95 %, no return floor.
    fn default() -> Self {
        Self {
            confidence: 0.95,
            min_expected_return: None,
        }
    }
}

/// A minimum-CVaR allocation with its risk figures.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MinCvarResult {
    /// Weights, solver outcome and expected metrics.
    pub allocation: Allocation,
    /// Confidence level used.
    pub confidence: f64,
    /// Historical VaR of the chosen weights (positive loss fraction).
    pub var: f64,
    /// Historical CVaR of the chosen weights (positive loss fraction), recomputed
    /// from the snapped weights with [`historical_var_cvar`].
    pub cvar: f64,
}

/// Historical `(VaR, CVaR)` at `confidence` of a daily return series, both
/// as positive loss fractions, by evaluating the Rockafellar–Uryasev function
/// exactly at its kinks (O(T log T)). Lets callers and tests check any
/// weights independently of the LP. Returns `None` for an empty series or a
/// confidence outside (0, 1).
pub fn historical_var_cvar(returns: &[f64], confidence: f64) -> Option<(f64, f64)> {
    if returns.is_empty() || !(confidence > 0.0 && confidence < 1.0) {
        return None;
    }
    let mut losses: Vec<f64> = returns.iter().map(|r| -r).collect();
    losses.sort_by(|a, b| b.total_cmp(a)); // descending
    let denom = (1.0 - confidence) * losses.len() as f64;
    // F(ζ) = ζ + Σ max(0, ℓ − ζ)/denom is convex piecewise linear with kinks
    // at the losses, so its minimum is attained at one of them.
    let mut best: Option<(f64, f64)> = None;
    let mut prefix = 0.0; // sum of the j larger losses
    for (j, &z) in losses.iter().enumerate() {
        let f = z + (prefix - j as f64 * z) / denom;
        if best.is_none_or(|(_, bf)| f < bf) {
            best = Some((z, f));
        }
        prefix += z;
    }
    best
}

/// Minimum-CVaR weights over W (see the module docs for the exact LP).
pub fn min_cvar(
    aligned: &AlignedReturns,
    constraints: &Constraints,
    params: &CvarParams,
) -> Result<MinCvarResult, OptimizeError> {
    let n = aligned.n_strategies();
    let t = aligned.n_days();
    constraints.validate(n)?;
    let alpha = params.confidence;
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(OptimizeError::InvalidConstraints(format!(
            "confidence must be in (0, 1), got {alpha}"
        )));
    }
    let moments = ReturnMoments::from_aligned(aligned)?;
    let l = constraints.max_leverage;
    let u = constraints.max_single_strategy;
    let zeta = n;
    let z0 = n + 1;
    let mut prog = ConeProgram::new(n + 1 + t);
    prog.set_linear(zeta, 1.0);
    let k = 1.0 / ((1.0 - alpha) * t as f64);
    for s in 0..t {
        prog.set_linear(z0 + s, k);
    }
    let sum_row: Expr = (0..n).map(|i| (i, 1.0)).collect();
    prog.eq(&sum_row, l);
    let r = &aligned.returns;
    for s in 0..t {
        // −rₜᵀw − ζ − zₜ ≤ 0
        let mut row: Expr = (0..n).map(|i| (i, -r[[s, i]])).collect();
        row.push((zeta, -1.0));
        row.push((z0 + s, -1.0));
        prog.le(&row, 0.0);
        prog.le(&[(z0 + s, -1.0)], 0.0);
    }
    for i in 0..n {
        prog.le(&[(i, -1.0)], 0.0);
        prog.le(&[(i, 1.0)], u);
    }
    if let Some(m) = params.min_expected_return {
        if !m.is_finite() {
            return Err(OptimizeError::InvalidConstraints(
                "min_expected_return must be finite".into(),
            ));
        }
        let row: Expr = moments.mean.iter().map(|v| -v).enumerate().collect();
        prog.le(&row, -m);
    }
    let sol = prog.solve()?.require_usable()?;
    let mut w: Vec<f64> = sol.x[..n].to_vec();
    let snap = snap_to_feasible(&mut w, l, u);
    let port: Vec<f64> = r
        .rows()
        .into_iter()
        .map(|row| row.iter().zip(&w).map(|(a, b)| a * b).sum())
        .collect();
    let (var, cvar) = historical_var_cvar(&port, alpha).ok_or_else(|| {
        OptimizeError::InvalidInput("cannot evaluate CVaR of an empty series".into())
    })?;
    let metrics = portfolio_metrics(&moments.mean, &moments.cov, &w, constraints.risk_free_rate);
    Ok(MinCvarResult {
        allocation: Allocation {
            method: Method::MinCvar,
            strategy_ids: aligned.strategy_ids.clone(),
            weights: w,
            solve: solve_info(sol.status, sol.iterations, snap),
            metrics,
        },
        confidence: alpha,
        var,
        cvar,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_cvar_integer_tail() {
        // 20 days, α = 0.9 → worst 2 days: losses 10 and 8 → CVaR 9; VaR = 8.
        let mut r: Vec<f64> = (0..18).map(|i| i as f64 * 0.1).collect();
        r.push(-10.0);
        r.push(-8.0);
        let (var, cvar) = historical_var_cvar(&r, 0.9).expect("cvar");
        assert!((cvar - 9.0).abs() < 1e-12, "{cvar}");
        assert!((var - 8.0).abs() < 1e-12, "{var}");
    }

    #[test]
    fn var_cvar_fractional_tail() {
        // 10 days, α = 0.85 → tail mass 1.5 days: (10 + 0.5·6)/1.5
        let r = [-10.0, -6.0, -1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        let (_, cvar) = historical_var_cvar(&r, 0.85).expect("cvar");
        assert!((cvar - 13.0 / 1.5).abs() < 1e-12, "{cvar}");
    }
}
