//! Maximum-Sharpe allocation.
//!
//! # Problem
//!
//! ```text
//!   maximise   S(w) = (μᵀw − r_f) / √(wᵀΣw)
//!   subject to 1ᵀw = L,   0 ≤ wᵢ ≤ u
//! ```
//!
//! μ = mean daily return, Σ = sample covariance (ddof 1), r_f = daily
//! risk-free rate, L = `max_leverage`, u = `max_single_strategy`.
//!
//! # Homogenisation (Cornuéjols–Tütüncü), derived for Σw = L
//!
//! 1. On the feasible set 1ᵀw = L, so `r_f = (r_f/L)·1ᵀw` and the numerator
//!    is `μ̃ᵀw` with **μ̃ = μ − (r_f/L)·1**. (The textbook `(μ − r_f)ᵀy = 1`
//!    is the special case L = 1; with leverage the risk-free rate is charged
//!    once on the portfolio, i.e. `r_f/L` per unit of weight.) Now S is
//!    invariant under `w ↦ κw`, κ > 0.
//! 2. Assume some feasible w has μ̃ᵀw > 0 (otherwise the best Sharpe is ≤ 0,
//!    this transformation does not apply and clarabel reports the problem
//!    infeasible, which surfaces as [`OptimizeError::NotSolved`]).
//!    Fix a scale c > 0 and put `y = κw` with `κ = c / μ̃ᵀw`. Then
//!    `S(w) = c / √(yᵀΣy)` and the problem becomes the convex QP
//!
//!    ```text
//!      minimise   yᵀΣy
//!      subject to μ̃ᵀy = c,   1ᵀy = L·κ,   0 ≤ yᵢ ≤ u·κ,   κ ≥ 0
//!    ```
//!
//! 3. Conversely any feasible (y, κ) has κ > 0 (κ = 0 forces y = 0,
//!    contradicting μ̃ᵀy = c > 0), and `w = y/κ` satisfies 1ᵀw = L,
//!    0 ≤ w ≤ u and S(w) = c/√(yᵀΣy). So the QP optimum maps to the Sharpe
//!    optimum via **w = y / κ**, and Σw = L holds exactly in exact
//!    arithmetic; the ~1e-12 interior-point residual is removed by
//!    [`snap_to_feasible`] (any correction above
//!    [`REPAIR_TOLERANCE`](super::REPAIR_TOLERANCE) marks the run unsuccessful).
//!
//! Scaling (does not change the argmin): `c = L·maxᵢ μ̃ᵢ`, so κ ≥ 1 and y is
//! on the same scale as w; Σ is divided by its mean diagonal so the
//! objective is O(1). With Σ positive definite the optimum is unique.

use super::program::{ConeProgram, Expr};
use super::{
    portfolio_metrics, snap_to_feasible, solve_info, Allocation, Constraints, Method,
    OptimizeError, ReturnMoments,
};

/// Maximum-Sharpe weights over W (see the module docs for the exact problem).
/// Errors on invalid constraints/inputs or when clarabel cannot solve the QP
/// (e.g. no feasible portfolio has a positive excess return).
pub fn max_sharpe(
    moments: &ReturnMoments,
    constraints: &Constraints,
) -> Result<Allocation, OptimizeError> {
    let n = moments.n();
    constraints.validate(n)?;
    let l = constraints.max_leverage;
    let u = constraints.max_single_strategy;
    let mu_ex: Vec<f64> = moments
        .mean
        .iter()
        .map(|m| m - constraints.risk_free_rate / l)
        .collect();
    let best = mu_ex.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if best <= 0.0 {
        return Err(OptimizeError::Infeasible(
            "no strategy has a positive expected excess return; maximum Sharpe ≤ 0".into(),
        ));
    }
    let c = l * best;

    let cov = &moments.cov;
    let diag_mean = (0..n).map(|i| cov[[i, i]]).sum::<f64>() / n as f64;
    if !(diag_mean.is_finite() && diag_mean > 0.0) {
        return Err(OptimizeError::InvalidInput(
            "covariance matrix has no positive variance".into(),
        ));
    }
    let kappa = n;
    let mut prog = ConeProgram::new(n + 1);
    // ½ yᵀ(2Σ/s)y = yᵀΣy / s
    for i in 0..n {
        for j in i..n {
            let v = 2.0 * cov[[i, j]] / diag_mean;
            if v != 0.0 {
                prog.add_quadratic(i, j, v);
            }
        }
    }
    let mu_row: Expr = mu_ex.iter().copied().enumerate().collect();
    prog.eq(&mu_row, c);
    let mut sum_row: Expr = (0..n).map(|i| (i, 1.0)).collect();
    sum_row.push((kappa, -l));
    prog.eq(&sum_row, 0.0);
    for i in 0..n {
        prog.le(&[(i, -1.0)], 0.0); // y ≥ 0
        prog.le(&[(i, 1.0), (kappa, -u)], 0.0); // y ≤ uκ
    }
    prog.le(&[(kappa, -1.0)], 0.0); // κ ≥ 0

    let sol = prog.solve()?.require_usable()?;
    let k = sol.x[kappa];
    if !(k.is_finite() && k > 0.0) {
        return Err(OptimizeError::NotSolved {
            status: format!("{} with non-positive kappa {k:e}", sol.status),
            iterations: sol.iterations,
        });
    }
    let mut w: Vec<f64> = sol.x[..n].iter().map(|y| y / k).collect();
    let snap = snap_to_feasible(&mut w, l, u);
    let metrics = portfolio_metrics(&moments.mean, cov, &w, constraints.risk_free_rate);
    Ok(Allocation {
        method: Method::MaxSharpe,
        strategy_ids: moments.strategy_ids.clone(),
        weights: w,
        solve: solve_info(sol.status, sol.iterations, snap),
        metrics,
    })
}

/// First-order optimality certificate for [`max_sharpe`]: the largest
/// violation of the KKT conditions of `max S(w)` over W at `w`, relative to
/// the largest gradient component.
///
/// With g = ∇S(w) = (μ̃·σ² − (μ̃ᵀw)·Σw) / σ³, w is a KKT point iff there is a
/// λ with gᵢ = λ where 0 < wᵢ < u, gᵢ ≤ λ where wᵢ = 0 and gᵢ ≥ λ where
/// wᵢ = u. Because S is pseudo-concave where μ̃ᵀw > 0, a KKT point is the
/// global maximum. Coordinates within `active_tol` of a bound count as on it.
/// Returns `f64::INFINITY` if S is undefined at w (zero variance).
pub fn max_sharpe_kkt_violation(
    moments: &ReturnMoments,
    constraints: &Constraints,
    w: &[f64],
    active_tol: f64,
) -> f64 {
    let n = moments.n();
    let l = constraints.max_leverage;
    let u = constraints.max_single_strategy;
    let wv = ndarray::Array1::from(w.to_vec());
    let mu_ex = moments.mean.mapv(|m| m - constraints.risk_free_rate / l);
    let sw = moments.cov.dot(&wv);
    let var = wv.dot(&sw);
    if var.is_nan() || var <= 0.0 {
        return f64::INFINITY;
    }
    let sd = var.sqrt();
    let ret = mu_ex.dot(&wv);
    let g: Vec<f64> = (0..n)
        .map(|i| (mu_ex[i] * var - ret * sw[i]) / (var * sd))
        .collect();
    let scale = g
        .iter()
        .fold(0.0_f64, |a, x| a.max(x.abs()))
        .max(f64::MIN_POSITIVE);
    let mut free = Vec::new();
    let mut lo_max = f64::NEG_INFINITY; // λ ≥ gᵢ for wᵢ = 0
    let mut hi_min = f64::INFINITY; // λ ≤ gᵢ for wᵢ = u
    for i in 0..n {
        if w[i] <= active_tol {
            lo_max = lo_max.max(g[i]);
        } else if w[i] >= u - active_tol {
            hi_min = hi_min.min(g[i]);
        } else {
            free.push(g[i]);
        }
    }
    let viol = if free.is_empty() {
        (lo_max - hi_min).max(0.0)
    } else {
        let lambda = free.iter().sum::<f64>() / free.len() as f64;
        let spread = free.iter().fold(0.0_f64, |a, x| a.max((x - lambda).abs()));
        spread.max(lo_max - lambda).max(lambda - hi_min).max(0.0)
    };
    viol / scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array1};

    fn moments(mean: Array1<f64>, cov: ndarray::Array2<f64>) -> ReturnMoments {
        ReturnMoments {
            strategy_ids: (0..mean.len()).map(|i| format!("S{i}")).collect(),
            n_days: 100,
            mean,
            cov,
        }
    }

    #[test]
    fn uncorrelated_unconstrained_is_proportional_to_mu_over_var() {
        // Tangency for diagonal Σ: w ∝ Σ⁻¹μ = (1, 2, 1)·k; caps loose.
        let m = moments(
            array![0.001, 0.002, 0.0005],
            array![[1e-4, 0.0, 0.0], [0.0, 1e-4, 0.0], [0.0, 0.0, 0.5e-4]],
        );
        let c = Constraints {
            max_leverage: 1.0,
            max_single_strategy: 1.0,
            risk_free_rate: 0.0,
        };
        let a = max_sharpe(&m, &c).expect("solve");
        assert!(a.solve.success, "{:?}", a.solve);
        for (w, e) in a.weights.iter().zip([0.25, 0.5, 0.25]) {
            assert!((w - e).abs() < 1e-7, "{:?}", a.weights);
        }
    }

    #[test]
    fn cap_binds() {
        let m = moments(
            array![0.001, 0.002, 0.0005],
            array![[1e-4, 0.0, 0.0], [0.0, 1e-4, 0.0], [0.0, 0.0, 0.5e-4]],
        );
        let c = Constraints {
            max_leverage: 2.0,
            max_single_strategy: 0.8,
            risk_free_rate: 0.0,
        };
        let a = max_sharpe(&m, &c).expect("solve");
        assert!((a.weights[1] - 0.8).abs() < 1e-7);
        assert!((a.weights.iter().sum::<f64>() - 2.0).abs() < 1e-12);
        let v = max_sharpe_kkt_violation(&m, &c, &a.weights, 1e-7);
        assert!(v < 1e-6, "kkt violation {v}, w = {:?}", a.weights);
    }

    #[test]
    fn all_negative_is_an_error() {
        let m = moments(array![-0.001, -0.002], array![[1e-4, 0.0], [0.0, 1e-4]]);
        assert!(matches!(
            max_sharpe(&m, &Constraints::default()),
            Err(OptimizeError::Infeasible(_))
        ));
    }
}
