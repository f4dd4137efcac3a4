//! Minimum-variance portfolios and the efficient frontier over W.
//!
//! `min_variance` solves the clarabel QP
//!
//! ```text
//!   minimise   wᵀΣw
//!   subject to 1ᵀw = L,  0 ≤ wᵢ ≤ u,  [μᵀw = target]
//! ```
//!
//! and `efficient_frontier` samples it at evenly spaced targets from the
//! global-minimum-variance portfolio's return up to the largest return
//! attainable in W (the efficient, upper branch only).

use serde::{Deserialize, Serialize};

use super::program::{ConeProgram, Expr};
use super::{
    portfolio_metrics, snap_to_feasible, solve_info, Allocation, Constraints, Method,
    OptimizeError, ReturnMoments, SolveInfo,
};

/// One point of the efficient frontier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrontierPoint {
    /// Target expected daily return requested (the GMV return for the first point).
    pub target_return: f64,
    /// Achieved expected daily return μᵀw.
    pub expected_daily_return: f64,
    /// Daily volatility √(wᵀΣw).
    pub volatility_daily: f64,
    /// Weights achieving it.
    pub weights: Vec<f64>,
}

/// Smallest and largest μᵀw over W. W is a capped simplex, so the LP is solved
/// exactly by filling the best (worst) strategies to the cap in order —
/// used to pick feasible frontier targets.
pub fn max_return_range(
    moments: &ReturnMoments,
    constraints: &Constraints,
) -> Result<(f64, f64), OptimizeError> {
    constraints.validate(moments.n())?;
    let (lo, _) = greedy(moments, constraints, false);
    let (hi, _) = greedy(moments, constraints, true);
    Ok((lo, hi))
}

fn greedy(moments: &ReturnMoments, c: &Constraints, best_first: bool) -> (f64, Vec<f64>) {
    let n = moments.n();
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| {
        let o = moments.mean[a].total_cmp(&moments.mean[b]);
        if best_first {
            o.reverse()
        } else {
            o
        }
    });
    let mut w = vec![0.0; n];
    let mut left = c.max_leverage;
    for i in idx {
        let x = left.min(c.max_single_strategy);
        w[i] = x;
        left -= x;
        if left <= 0.0 {
            break;
        }
    }
    let ret = w.iter().zip(moments.mean.iter()).map(|(a, b)| a * b).sum();
    (ret, w)
}

/// Minimum-variance weights over W, optionally with `μᵀw = target_return`.
pub fn min_variance(
    moments: &ReturnMoments,
    constraints: &Constraints,
    target_return: Option<f64>,
) -> Result<Allocation, OptimizeError> {
    let n = moments.n();
    constraints.validate(n)?;
    let l = constraints.max_leverage;
    let u = constraints.max_single_strategy;
    let cov = &moments.cov;
    let diag_mean = (0..n).map(|i| cov[[i, i]]).sum::<f64>() / n as f64;
    if !(diag_mean.is_finite() && diag_mean > 0.0) {
        return Err(OptimizeError::InvalidInput(
            "covariance matrix has no positive variance".into(),
        ));
    }
    let mut prog = ConeProgram::new(n);
    for i in 0..n {
        for j in i..n {
            let v = 2.0 * cov[[i, j]] / diag_mean;
            if v != 0.0 {
                prog.add_quadratic(i, j, v);
            }
        }
    }
    let sum_row: Expr = (0..n).map(|i| (i, 1.0)).collect();
    prog.eq(&sum_row, l);
    if let Some(target) = target_return {
        if !target.is_finite() {
            return Err(OptimizeError::InvalidConstraints(
                "target return must be finite".into(),
            ));
        }
        // Scale the row to O(1) coefficients; the constraint is unchanged.
        let s = moments
            .mean
            .iter()
            .fold(0.0_f64, |a, m| a.max(m.abs()))
            .max(f64::MIN_POSITIVE);
        let row: Expr = moments.mean.iter().map(|m| m / s).enumerate().collect();
        prog.eq(&row, target / s);
    }
    for i in 0..n {
        prog.le(&[(i, -1.0)], 0.0);
        prog.le(&[(i, 1.0)], u);
    }
    let sol = prog.solve()?.require_usable()?;
    let mut w = sol.x.clone();
    let snap = snap_to_feasible(&mut w, l, u);
    let metrics = portfolio_metrics(&moments.mean, cov, &w, constraints.risk_free_rate);
    Ok(Allocation {
        method: Method::MinVariance,
        strategy_ids: moments.strategy_ids.clone(),
        weights: w,
        solve: solve_info(sol.status, sol.iterations, snap),
        metrics,
    })
}

/// `n_points` (≥ 2) frontier points from the global-minimum-variance
/// portfolio to the maximum-return portfolio of W, each a clarabel QP. The
/// last point is the exact greedy maximum-return portfolio if the QP at that
/// (degenerate, single-point) target does not solve. Points are in ascending
/// return order.
pub fn efficient_frontier(
    moments: &ReturnMoments,
    constraints: &Constraints,
    n_points: usize,
) -> Result<Vec<FrontierPoint>, OptimizeError> {
    if n_points < 2 {
        return Err(OptimizeError::InvalidInput(
            "an efficient frontier needs at least 2 points".into(),
        ));
    }
    let gmv = min_variance(moments, constraints, None)?;
    let r0 = gmv.metrics.expected_daily_return;
    let (_, rmax) = max_return_range(moments, constraints)?;
    let point = |target: f64, a: &Allocation| FrontierPoint {
        target_return: target,
        expected_daily_return: a.metrics.expected_daily_return,
        volatility_daily: a.metrics.expected_daily_volatility,
        weights: a.weights.clone(),
    };
    let mut out = vec![point(r0, &gmv)];
    if rmax <= r0 {
        return Ok(out);
    }
    for k in 1..n_points {
        let target = r0 + (rmax - r0) * k as f64 / (n_points - 1) as f64;
        match min_variance(moments, constraints, Some(target)) {
            Ok(a) => out.push(point(target, &a)),
            Err(_) if k == n_points - 1 => {
                let (_, w) = greedy(moments, constraints, true);
                let a = Allocation {
                    method: Method::MinVariance,
                    strategy_ids: moments.strategy_ids.clone(),
                    metrics: portfolio_metrics(
                        &moments.mean,
                        &moments.cov,
                        &w,
                        constraints.risk_free_rate,
                    ),
                    weights: w,
                    solve: SolveInfo {
                        success: true,
                        message: "greedy maximum-return portfolio".into(),
                        converged: true,
                        iterations: 0,
                    },
                };
                out.push(point(target, &a));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
