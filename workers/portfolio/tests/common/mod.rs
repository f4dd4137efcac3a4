//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use mtx_portfolio::{load_backtest_dir, StrategyBacktest};

/// `$MTX_FIXTURES_DIR`, else the repo copy of the shared fixtures
/// (`tests/fixtures`, copied from `../shared/fixtures`).
pub fn fixtures_dir() -> PathBuf {
    std::env::var("MTX_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

pub fn backtests_dir() -> PathBuf {
    fixtures_dir().join("backtests")
}

pub fn load_all() -> Vec<StrategyBacktest> {
    load_backtest_dir(&backtests_dir()).expect("fixtures load")
}

/// Strategies whose history starts on the earliest start date.
pub fn full_history(all: &[StrategyBacktest]) -> Vec<&StrategyBacktest> {
    let earliest = all
        .iter()
        .map(|s| s.stats.start_date)
        .min()
        .expect("non-empty");
    all.iter()
        .filter(|s| s.stats.start_date == earliest)
        .collect()
}

/// Deterministic LCG (no rand crate).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    pub fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n - 1)
    }

    /// A random point of W = {Σw = total, 0 ≤ w ≤ cap}: exponential draws
    /// scaled to `total`, then water-filled under the cap. Every third draw
    /// is a random vertex (greedy fill in random order) instead.
    pub fn feasible(&mut self, n: usize, total: f64, cap: f64) -> Vec<f64> {
        if self.below(3) == 0 {
            let mut idx: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = self.below(i + 1);
                idx.swap(i, j);
            }
            let mut w = vec![0.0; n];
            let mut left = total;
            for i in idx {
                let x = left.min(cap);
                w[i] = x;
                left -= x;
            }
            return w;
        }
        // sparse-ish: some coordinates zero
        let mut e: Vec<f64> = (0..n)
            .map(|_| {
                if self.below(4) == 0 {
                    0.0
                } else {
                    -self.uniform().ln()
                }
            })
            .collect();
        if e.iter().all(|x| *x == 0.0) {
            e[0] = 1.0;
        }
        let s: f64 = e.iter().sum();
        let mut w: Vec<f64> = e.iter().map(|x| x / s * total).collect();
        // water-fill excess over the cap onto coordinates with room
        for _ in 0..(2 * n) {
            let excess: f64 = w.iter().map(|x| (x - cap).max(0.0)).sum();
            if excess <= 1e-15 {
                break;
            }
            for x in w.iter_mut() {
                *x = x.min(cap);
            }
            let room: f64 = w.iter().map(|x| cap - x).sum();
            for x in w.iter_mut() {
                *x += excess * (cap - *x) / room;
            }
        }
        w
    }
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
