//! Hierarchical risk parity (López de Prado, 2016).
//!
//! # Procedure
//!
//! 1. Correlation distance `dᵢⱼ = √(½(1 − ρᵢⱼ))` (0 for identical series,
//!    1 for perfectly anti-correlated ones).
//! 2. Single-linkage agglomerative clustering of `d` with linfa
//!    (`linfa-hierarchical`, whose engine is kodama, a port of SciPy's
//!    fastcluster). Single linkage on `d` directly is the
//!    PyPortfolioOpt/Riskfolio convention.
//! 3. Quasi-diagonalisation: strategies are ordered as the leaves of the
//!    dendrogram (pre-order, first-merged child first — SciPy's and kodama's
//!    labelling). See [below](#the-leaf-order-from-linfa) for how that order
//!    is recovered from linfa.
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
//!
//! # The leaf order from linfa
//!
//! `linfa-hierarchical` only returns flat cluster labels, not the
//! dendrogram, so the tree is recovered top-down: cut the current set into
//! 2 clusters (`num_clusters(2)`, single linkage), recurse into each side,
//! and concatenate the two sides' orders.
//!
//! **Input encoding.** linfa-hierarchical takes no distance matrix, only a
//! similarity kernel `K` (a `linfa_kernel::Kernel`, built here directly from
//! a precomputed dense matrix; its `method` field is not used for
//! clustering), and clusters the distances `−ln K` (`K ≤ 1e-6` floored).
//! Single linkage only *compares* distances, so any strictly increasing
//! re-encoding of `d` yields the same dendrogram. We pass the rank: the
//! pairs are sorted into a strict total order (below), pair number `r` of
//! `m` gets `K = 1 − (r+1)·2⁻ᵏ` with `2ᵏ ≥ 2m`, so `K ∈ (½, 1)` is exact in
//! f64, and consecutive values of `−ln K` differ by ≥ 2⁻ᵏ, far above the
//! rounding of `ln` (for any m < 2⁵⁰): linfa's kodama sees exactly our
//! order. The literal `K = e^{−d}` would not do: near ρ = 1 it maps
//! distances less than ~1e-16 apart to the same `K`, i.e. makes ties.
//!
//! **Why the cuts are the dendrogram's splits.** Agglomeration repeatedly
//! merges the closest pair of current clusters, and under single linkage
//! the distance of two clusters (the closest pair of members) depends only
//! on their members. Let S be a node of the full dendrogram. Before S is
//! formed, every current cluster meeting S lies inside S and changes only by
//! merges inside S; each such merge was the globally closest pair, hence
//! the closest pair among S's current clusters. So the merges inside S are
//! exactly those of single linkage on S alone, in the same order: the
//! subtree under S is the dendrogram of S by itself, and stopping that one
//! at 2 clusters (linfa replays kodama's merges while more than 2 clusters
//! remain) leaves S's two children. By induction from the full set, the
//! recursion visits every node with its exact children. (This relies on a
//! strict order of the distances, so the closest pair is always unique.)
//!
//! **Which child comes first.** kodama labels leaf i as i and the cluster
//! made by merge step s as n + s, with steps sorted by distance, and the
//! quasi-diagonal order lists the smaller label's leaves first. So a single
//! strategy precedes a cluster, two single strategies go by input index,
//! and of two clusters the one merged first (the lower merge distance, i.e.
//! the closest pair across its own two children) goes first.
//!
//! **Ties.** Equal distances (e.g. duplicated or exactly uncorrelated
//! strategies) would make the 2-cut ambiguous, so pairs are ordered by
//! `(dᵢⱼ, i, j)`: among equal distances the pair of lower input indices
//! (lexicographically) counts as closer. This is deterministic and makes the
//! dendrogram unique (Kruskal's algorithm with that tie-break). Without
//! ties the result is exactly kodama's dendrogram of `d`; with ties kodama
//! on the raw `d` resolves them by its Prim traversal order instead, which
//! may give a different but equally valid tree (the tests check the tie
//! rule against kodama on the tie-broken order).

use linfa::traits::Transformer;
use linfa::{DatasetBase, ParamGuard};
use linfa_hierarchical::{HierarchicalCluster, Method as Linkage, ValidHierarchicalCluster};
use linfa_kernel::{Kernel, KernelInner, KernelMethod};
use ndarray::Array2;

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

/// A binary cluster tree, children in quasi-diagonal order (first child's
/// leaves first).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tree {
    Leaf(usize),
    Node(Box<Tree>, Box<Tree>),
}

impl Tree {
    /// Leaves in order (the quasi-diagonal order).
    fn leaves(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut stack = vec![self];
        while let Some(t) = stack.pop() {
            match t {
                Tree::Leaf(i) => out.push(*i),
                Tree::Node(a, b) => {
                    stack.push(b);
                    stack.push(a);
                }
            }
        }
        out
    }
}

/// Correlation distances `√(½(1 − ρᵢⱼ))`, condensed (row-major upper
/// triangle, the SciPy/kodama layout). Errors on a non-finite correlation.
fn correlation_distances(corr: &Array2<f64>, ids: &[String]) -> Result<Vec<f64>, OptimizeError> {
    let n = corr.nrows();
    let mut condensed = Vec::with_capacity(n * n.saturating_sub(1) / 2);
    for i in 0..n {
        for j in (i + 1)..n {
            let rho = corr[[i, j]];
            if !rho.is_finite() {
                return Err(OptimizeError::InvalidInput(format!(
                    "correlation of {} and {} is not finite",
                    ids[i], ids[j]
                )));
            }
            condensed.push((0.5 * (1.0 - rho)).max(0.0).sqrt());
        }
    }
    Ok(condensed)
}

/// Position of each pair in the strict order `(dᵢⱼ, i, j)`, as a symmetric
/// matrix (diagonal unused). `condensed` lists the pairs in `(i, j)` order,
/// so a stable sort by distance breaks ties lexicographically.
fn pair_ranks(n: usize, condensed: &[f64]) -> Array2<usize> {
    let mut pairs: Vec<(usize, usize)> = Vec::with_capacity(condensed.len());
    for i in 0..n {
        for j in (i + 1)..n {
            pairs.push((i, j));
        }
    }
    let mut by_distance: Vec<usize> = (0..pairs.len()).collect();
    by_distance.sort_by(|&a, &b| condensed[a].total_cmp(&condensed[b]));
    let mut rank = Array2::zeros((n, n));
    for (r, &p) in by_distance.iter().enumerate() {
        let (i, j) = pairs[p];
        rank[[i, j]] = r;
        rank[[j, i]] = r;
    }
    rank
}

/// Similarity handed to linfa for the pair of rank `r` (see the module
/// docs): `1 − (r+1)·step`, exact, in (½, 1), with `−ln` strictly
/// increasing in `r`.
fn rank_similarity(r: usize, step: f64) -> f64 {
    1.0 - (r + 1) as f64 * step
}

/// `2⁻ᵏ` with `2ᵏ ≥ 2(m+1)` for `m` pairs.
fn similarity_step(pairs: usize) -> f64 {
    0.5 / (pairs + 1).next_power_of_two() as f64
}

/// The single-linkage dendrogram of the correlation distances, recovered
/// by recursive linfa 2-cuts (see the module docs).
fn cluster_tree(n: usize, condensed: &[f64]) -> Result<Tree, OptimizeError> {
    if n == 0 {
        return Err(OptimizeError::InvalidInput("no strategies".into()));
    }
    let rank = pair_ranks(n, condensed);
    let step = similarity_step(condensed.len());
    let two_cut = HierarchicalCluster::<f64>::default()
        .with_method(Linkage::Single)
        .num_clusters(2)
        .check()
        .map_err(|e| OptimizeError::InvalidInput(format!("linfa-hierarchical: {e}")))?;
    let members: Vec<usize> = (0..n).collect();
    Ok(bisect(&two_cut, &rank, step, &members)?.0)
}

/// Sort key of a subtree among siblings: kodama's label order (a leaf is
/// labelled by its index, a cluster by its merge step; merges are sorted by
/// distance, which for a cluster is the rank of its closest cross pair).
type SiblingKey = (u8, usize);

/// The subtree over `members` (ascending input indices) and its sibling key.
/// Recursion depth is at most the tree height (< n; single linkage chains).
fn bisect(
    two_cut: &ValidHierarchicalCluster<f64>,
    rank: &Array2<usize>,
    step: f64,
    members: &[usize],
) -> Result<(Tree, SiblingKey), OptimizeError> {
    if let [i] = members {
        return Ok((Tree::Leaf(*i), (0, *i)));
    }
    let s = members.len();
    let sim = Array2::from_shape_fn((s, s), |(a, b)| {
        if a == b {
            1.0
        } else {
            rank_similarity(rank[[members[a], members[b]]], step)
        }
    });
    let kernel = Kernel {
        inner: KernelInner::Dense(sim),
        method: KernelMethod::Linear,
    };
    let labelled: DatasetBase<Kernel<f64>, Vec<usize>> = two_cut.transform(kernel);
    // Label values are arbitrary (linfa numbers clusters in HashMap order);
    // only the partition matters. `members` stays ascending on each side.
    let first = labelled.targets[0];
    let (mut left, mut right) = (Vec::new(), Vec::new());
    for (&m, &label) in members.iter().zip(&labelled.targets) {
        if label == first {
            left.push(m);
        } else {
            right.push(m);
        }
    }
    if right.is_empty() {
        return Err(OptimizeError::InvalidInput(format!(
            "linfa-hierarchical did not split a cluster of {s} strategies"
        )));
    }
    let mut height = usize::MAX;
    for &a in &left {
        for &b in &right {
            height = height.min(rank[[a, b]]);
        }
    }
    let (tl, kl) = bisect(two_cut, rank, step, &left)?;
    let (tr, kr) = bisect(two_cut, rank, step, &right)?;
    let node = if kl < kr {
        Tree::Node(Box::new(tl), Box::new(tr))
    } else {
        Tree::Node(Box::new(tr), Box::new(tl))
    };
    Ok((node, (1, height)))
}

fn cluster_variance(cov: &Array2<f64>, idx: &[usize]) -> f64 {
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

/// Recursive-bisection weights (summing to 1, input order) for the
/// quasi-diagonal `order`.
fn bisection_weights(cov: &Array2<f64>, order: &[usize]) -> Vec<f64> {
    let mut raw = vec![1.0; cov.nrows()];
    let mut queue: Vec<&[usize]> = vec![order];
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
    raw
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
    let condensed = correlation_distances(&moments.correlation(), &moments.strategy_ids)?;
    let order = cluster_tree(n, &condensed)?.leaves();
    let raw = bisection_weights(cov, &order);

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
    use proptest::prelude::*;

    use crate::optimize::correlation_matrix;

    /// The tree of kodama's dendrogram, built from its merge steps: leaf i is
    /// label i, step s makes label n + s with children (cluster1, cluster2),
    /// cluster1 (the smaller label) first — the previous implementation.
    fn tree_from_steps(n: usize, steps: &[(usize, usize)]) -> Tree {
        let mut nodes: Vec<Option<Tree>> = (0..n).map(|i| Some(Tree::Leaf(i))).collect();
        for &(a, b) in steps {
            let ta = nodes[a].take().expect("label merged twice");
            let tb = nodes[b].take().expect("label merged twice");
            nodes.push(Some(Tree::Node(Box::new(ta), Box::new(tb))));
        }
        nodes.pop().flatten().expect("non-empty")
    }

    /// kodama's single-linkage dendrogram of a condensed matrix.
    fn kodama_tree(n: usize, condensed: &[f64]) -> Tree {
        let mut d = condensed.to_vec();
        let steps: Vec<(usize, usize)> = kodama::linkage(&mut d, n, kodama::Method::Single)
            .steps()
            .iter()
            .map(|s| (s.cluster1, s.cluster2))
            .collect();
        tree_from_steps(n, &steps)
    }

    /// kodama on the tie-broken order `(d, i, j)` (pair ranks as distances).
    fn kodama_tree_tie_broken(n: usize, condensed: &[f64]) -> Tree {
        let rank = pair_ranks(n, condensed);
        let mut ranked = Vec::with_capacity(condensed.len());
        for i in 0..n {
            for j in (i + 1)..n {
                ranked.push(rank[[i, j]] as f64);
            }
        }
        kodama_tree(n, &ranked)
    }

    fn has_ties(condensed: &[f64]) -> bool {
        let mut d = condensed.to_vec();
        d.sort_by(f64::total_cmp);
        d.windows(2).any(|w| w[0] == w[1])
    }

    /// Every split of `t` as (first child's leaves, second child's leaves).
    fn splits(t: &Tree) -> Vec<(Vec<usize>, Vec<usize>)> {
        let mut out = Vec::new();
        let mut stack = vec![t];
        while let Some(t) = stack.pop() {
            if let Tree::Node(a, b) = t {
                out.push((a.leaves(), b.leaves()));
                stack.push(a);
                stack.push(b);
            }
        }
        out
    }

    /// linfa's tree equals kodama's: same clusters at every split, same
    /// child order, hence the same leaf order.
    fn assert_same_tree(linfa: &Tree, kodama: &Tree) {
        assert_eq!(splits(linfa), splits(kodama));
        assert_eq!(linfa.leaves(), kodama.leaves());
        assert_eq!(linfa, kodama);
    }

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
        assert_eq!(
            tree_from_steps(3, &[(0, 2), (1, 3)]).leaves(),
            vec![1, 0, 2]
        );
        // the same distances through linfa: d(0,2) < d(0,1) < d(1,2)
        let condensed = [0.5, 0.1, 0.7];
        assert_eq!(
            cluster_tree(3, &condensed).expect("tree").leaves(),
            vec![1, 0, 2]
        );
        assert_eq!(cluster_tree(1, &[]).expect("tree"), Tree::Leaf(0));
    }

    #[test]
    fn similarity_encoding_is_strictly_monotone() {
        for m in [1usize, 2, 3, 36, 1_000, 65_535, 65_536, 200_000] {
            let step = similarity_step(m);
            let mut prev = f64::NEG_INFINITY;
            for r in 0..m {
                let k = rank_similarity(r, step);
                assert!(k > 0.5 && k < 1.0, "m {m} r {r}: K {k}");
                let d = -k.ln();
                assert!(d > prev, "m {m} r {r}: -ln K {d} not above {prev}");
                prev = d;
            }
        }
        // the largest rank count the docs promise, at both ends
        let m = 1usize << 49;
        let step = similarity_step(m);
        for window in [0..1_000, m - 1_000..m] {
            let mut prev = -rank_similarity(window.start, step).ln();
            for r in window.start + 1..window.end {
                let d = -rank_similarity(r, step).ln();
                assert!(d > prev && rank_similarity(r, step) > 0.5);
                prev = d;
            }
        }
    }

    /// Every subset (≥ 2 strategies) of the fixture backtests, inner-joined
    /// on date: the linfa tree is kodama's dendrogram, and the HRP weights
    /// are bit-for-bit those of kodama's leaf order.
    #[test]
    fn linfa_order_matches_kodama_on_fixture_backtests() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/backtests");
        let all = crate::load_backtest_dir(&dir).expect("fixtures");
        assert_eq!(all.len(), 9);
        let c = Constraints {
            max_leverage: 2.0,
            max_single_strategy: 1.0,
            risk_free_rate: 0.0,
        };
        let mut checked = 0;
        for mask in 1u32..(1 << all.len()) {
            if mask.count_ones() < 2 {
                continue;
            }
            let subset: Vec<_> = (0..all.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| &all[i])
                .collect();
            let aligned = crate::align(&subset).expect("align");
            let m = ReturnMoments::from_aligned(&aligned).expect("moments");
            let n = m.n();
            let condensed = correlation_distances(&m.correlation(), &m.strategy_ids).expect("d");
            assert!(!has_ties(&condensed), "subset {mask:#b} has tied distances");
            let reference = kodama_tree(n, &condensed);
            assert_same_tree(&cluster_tree(n, &condensed).expect("tree"), &reference);

            let h = hrp(&m, &c).expect("hrp");
            let order = reference.leaves();
            let ids: Vec<String> = order.iter().map(|&i| m.strategy_ids[i].clone()).collect();
            assert_eq!(h.leaf_order, ids);
            assert_eq!(h.raw_weights, bisection_weights(&m.cov, &order));
            checked += 1;
        }
        assert_eq!(checked, 502);
    }

    /// A random correlation matrix: Σ = BBᵀ + diag(δ) with k factors.
    fn random_correlation() -> impl Strategy<Value = Array2<f64>> {
        (2usize..=12, 1usize..=4).prop_flat_map(|(n, k)| {
            (
                proptest::collection::vec(-1.0f64..1.0, n * k),
                proptest::collection::vec(0.01f64..1.0, n),
            )
                .prop_map(move |(b, delta)| {
                    let cov = Array2::from_shape_fn((n, n), |(i, j)| {
                        let common: f64 = (0..k).map(|f| b[i * k + f] * b[j * k + f]).sum();
                        common + if i == j { delta[i] } else { 0.0 }
                    });
                    correlation_matrix(&cov)
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn linfa_order_matches_kodama_on_random_correlations(corr in random_correlation()) {
            let n = corr.nrows();
            let ids: Vec<String> = (0..n).map(|i| format!("S{i}")).collect();
            let condensed = correlation_distances(&corr, &ids).expect("d");
            let linfa = cluster_tree(n, &condensed).expect("tree");
            if has_ties(&condensed) {
                assert_same_tree(&linfa, &kodama_tree_tie_broken(n, &condensed));
            } else {
                assert_same_tree(&linfa, &kodama_tree(n, &condensed));
            }
        }

        /// Heavily tied distances: the tree is deterministic and is kodama's
        /// dendrogram of the documented tie-broken order `(d, i, j)`.
        #[test]
        fn ties_follow_the_lexicographic_rule(
            (n, levels) in (2usize..=10).prop_flat_map(|n| {
                (Just(n), proptest::collection::vec(0u8..4, n * (n - 1) / 2))
            })
        ) {
            let condensed: Vec<f64> = levels.iter().map(|&l| f64::from(l) * 0.25).collect();
            let linfa = cluster_tree(n, &condensed).expect("tree");
            assert_same_tree(&linfa, &kodama_tree_tie_broken(n, &condensed));
            prop_assert_eq!(&linfa, &cluster_tree(n, &condensed).expect("again"));
        }
    }

    #[test]
    fn all_equal_distances_match_kodama_raw() {
        // e.g. exactly uncorrelated strategies: kodama's Prim tie-break and
        // the lexicographic rule agree here (caterpillar 0,1 then 2, 3, …)
        for n in 2..=8 {
            let condensed = vec![std::f64::consts::FRAC_1_SQRT_2; n * (n - 1) / 2];
            assert_same_tree(
                &cluster_tree(n, &condensed).expect("tree"),
                &kodama_tree(n, &condensed),
            );
        }
    }

    #[test]
    fn non_finite_correlation_is_rejected() {
        let corr = array![[1.0, f64::NAN], [f64::NAN, 1.0]];
        let err = correlation_distances(&corr, &["A".into(), "B".into()]).unwrap_err();
        assert!(matches!(err, OptimizeError::InvalidInput(_)), "{err}");
    }
}
