//! Hierarchical risk parity (López de Prado, 2016).
//!
//! # Procedure
//!
//! 1. Correlation distance `dᵢⱼ = √(½(1 − ρᵢⱼ))` (0 for identical series,
//!    1 for perfectly anti-correlated ones).
//! 2. Single-linkage agglomerative clustering of `d` (kodama, the linkage
//!    engine behind linfa-hierarchical; same labelling as SciPy). Single
//!    linkage on `d` directly is the PyPortfolioOpt/Riskfolio convention.
//! 3. Quasi-diagonalisation: strategies are ordered as the leaves of the
//!    dendrogram (pre-order, first-merged child first).
//! 4. Recursive bisection: the ordered list is split in halves; each half's
//!    variance is `w̃ᵀΣw̃` with inverse-variance weights w̃ inside the half,
//!    and the halves get weight in proportion `1 − Vₗ/(Vₗ+Vᵣ)` : `Vₗ/(Vₗ+Vᵣ)`.
//!    This yields positive weights summing to 1.
//! 5. Leverage: weights are multiplied by `max_leverage`.
//! 6. Cap: any weight above `max_single_strategy` is set to the cap and the
//!    excess is redistributed over the uncapped strategies **in proportion
//!    to their HRP weights** (so their relative HRP risk budget is kept),
//!    repeating until no weight exceeds the cap. This terminates in at most
//!    n rounds and is always feasible because n·u ≥ L is checked first.
//!
//! No solver is involved; `iterations` reports the capping rounds.

use kodama::{linkage, Method as Linkage};

use super::{
    portfolio_metrics, Allocation, Constraints, Method, OptimizeError, ReturnMoments, SolveInfo,
};

/// An HRP allocation plus the clustering details worth storing with the run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HrpResult {
    /// Weights (scaled and capped), solver-style outcome and metrics.
    pub allocation: Allocation,
    /// Strategy ids in quasi-diagonal (dendrogram leaf) order.
    pub leaf_order: Vec<String>,
    /// Uncapped HRP weights summing to 1, in input order.
    pub raw_weights: Vec<f64>,
    /// Strategies that hit `max_single_strategy`.
    pub capped: Vec<String>,
}

/// Leaf order of a dendrogram over `n` observations (pre-order traversal).
fn leaf_order(n: usize, children: &[(usize, usize)]) -> Vec<usize> {
    if n == 0 {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(n);
    let mut stack = vec![if n == 1 { 0 } else { 2 * n - 2 }];
    while let Some(label) = stack.pop() {
        if label < n {
            out.push(label);
        } else {
            let (a, b) = children[label - n];
            stack.push(b);
            stack.push(a);
        }
    }
    out
}

fn cluster_variance(cov: &ndarray::Array2<f64>, idx: &[usize]) -> f64 {
    let inv: Vec<f64> = idx.iter().map(|&i| 1.0 / cov[[i, i]]).collect();
    let s: f64 = inv.iter().sum();
    let mut v = 0.0;
    for (a, &i) in idx.iter().enumerate() {
        for (b, &j) in idx.iter().enumerate() {
            v += inv[a] / s * inv[b] / s * cov[[i, j]];
        }
    }
    v
}

/// Water-fill `w` (summing to `total`) under `cap`, redistributing excess in
/// proportion to the current weights of the uncapped entries. Returns the
/// indices that were capped and the number of rounds.
fn cap_weights(w: &mut [f64], cap: f64) -> (Vec<usize>, u32) {
    let mut fixed = vec![false; w.len()];
    let mut rounds = 0;
    loop {
        let mut excess = 0.0;
        for (i, x) in w.iter_mut().enumerate() {
            if !fixed[i] && *x > cap {
                excess += *x - cap;
                *x = cap;
                fixed[i] = true;
            }
        }
        if excess <= 0.0 {
            break;
        }
        rounds += 1;
        let free_sum: f64 = w
            .iter()
            .zip(&fixed)
            .filter(|(_, f)| !**f)
            .map(|(x, _)| x)
            .sum();
        if free_sum <= 0.0 {
            break;
        }
        for (x, f) in w.iter_mut().zip(&fixed) {
            if !*f {
                *x += excess * *x / free_sum;
            }
        }
    }
    let capped = fixed
        .iter()
        .enumerate()
        .filter(|(_, f)| **f)
        .map(|(i, _)| i)
        .collect();
    (capped, rounds)
}

/// HRP weights over W (see the module docs for the procedure and the cap rule).
/// Errors if a strategy has zero or non-finite variance.
pub fn hrp(moments: &ReturnMoments, constraints: &Constraints) -> Result<HrpResult, OptimizeError> {
    let n = moments.n();
    constraints.validate(n)?;
    let cov = &moments.cov;
    for i in 0..n {
        let v = cov[[i, i]];
        if !(v.is_finite() && v > 0.0) {
            return Err(OptimizeError::InvalidInput(format!(
                "strategy {} has zero or non-finite variance",
                moments.strategy_ids[i]
            )));
        }
    }
    let corr = moments.correlation();
    let mut condensed = Vec::with_capacity(n * n.saturating_sub(1) / 2);
    for i in 0..n {
        for j in (i + 1)..n {
            condensed.push((0.5 * (1.0 - corr[[i, j]])).max(0.0).sqrt());
        }
    }
    let children: Vec<(usize, usize)> = if n > 1 {
        linkage(&mut condensed, n, Linkage::Single)
            .steps()
            .iter()
            .map(|s| (s.cluster1, s.cluster2))
            .collect()
    } else {
        Vec::new()
    };
    let order = leaf_order(n, &children);

    let mut raw = vec![1.0; n];
    let mut queue: Vec<&[usize]> = vec![&order];
    while let Some(cluster) = queue.pop() {
        if cluster.len() < 2 {
            continue;
        }
        let (left, right) = cluster.split_at(cluster.len() / 2);
        let vl = cluster_variance(cov, left);
        let vr = cluster_variance(cov, right);
        let alpha = 1.0 - vl / (vl + vr);
        for &i in left {
            raw[i] *= alpha;
        }
        for &i in right {
            raw[i] *= 1.0 - alpha;
        }
        queue.push(left);
        queue.push(right);
    }

    let l = constraints.max_leverage;
    let mut w: Vec<f64> = raw.iter().map(|x| x * l).collect();
    let (capped, rounds) = cap_weights(&mut w, constraints.max_single_strategy);
    let metrics = portfolio_metrics(&moments.mean, cov, &w, constraints.risk_free_rate);
    let message = if capped.is_empty() {
        "HRP closed form; no weight capped".to_string()
    } else {
        format!(
            "HRP closed form; {} weight(s) capped at {} in {rounds} round(s)",
            capped.len(),
            constraints.max_single_strategy
        )
    };
    Ok(HrpResult {
        allocation: Allocation {
            method: Method::Hrp,
            strategy_ids: moments.strategy_ids.clone(),
            weights: w,
            solve: SolveInfo {
                success: true,
                message,
                converged: true,
                iterations: rounds,
            },
            metrics,
        },
        leaf_order: order
            .iter()
            .map(|&i| moments.strategy_ids[i].clone())
            .collect(),
        raw_weights: raw,
        capped: capped
            .iter()
            .map(|&i| moments.strategy_ids[i].clone())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn two_uncorrelated_assets_get_inverse_variance() {
        let m = ReturnMoments {
            strategy_ids: vec!["A".into(), "B".into()],
            n_days: 10,
            mean: array![0.0, 0.0],
            cov: array![[1.0, 0.0], [0.0, 3.0]],
        };
        let c = Constraints {
            max_leverage: 1.0,
            max_single_strategy: 1.0,
            risk_free_rate: 0.0,
        };
        let r = hrp(&m, &c).expect("hrp");
        assert!((r.allocation.weights[0] - 0.75).abs() < 1e-12);
        assert!((r.allocation.weights[1] - 0.25).abs() < 1e-12);
    }

    #[test]
    fn cap_redistributes_proportionally() {
        let mut w = vec![1.2, 0.4, 0.3, 0.1];
        let (capped, rounds) = cap_weights(&mut w, 0.65);
        assert_eq!(capped, vec![0, 1]);
        assert_eq!(rounds, 2);
        assert!((w.iter().sum::<f64>() - 2.0).abs() < 1e-12);
        assert!(w.iter().all(|x| *x <= 0.65 + 1e-12));
        // uncapped keep their 3:1 ratio
        assert!((w[2] / w[3] - 3.0).abs() < 1e-12);
    }

    #[test]
    fn leaf_order_follows_tree() {
        // n = 3: step0 merges (0,2) → 3, step1 merges (1,3) → 4
        assert_eq!(leaf_order(3, &[(0, 2), (1, 3)]), vec![1, 0, 2]);
    }
}
