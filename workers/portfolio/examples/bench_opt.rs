//! Times `max_sharpe` on the shared fixtures and on a synthetic universe of
//! 200 strategies × 2,500 days (deterministic LCG data, no `rand`).
//!
//! ```text
//! cargo run --release -p mtx-portfolio --example bench_opt [-- <backtests dir>]
//! ```
//!
//! The fixtures directory defaults to `$MTX_FIXTURES_DIR/backtests`, else
//! `tests/fixtures/backtests` (the repo copy of the shared fixtures).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use mtx_portfolio::optimize::{
    hrp, max_cagr, max_sharpe, min_cvar, CagrParams, Constraints, CvarParams, ReturnMoments,
};
use mtx_portfolio::{align, load_backtest_dir, AlignedReturns};
use ndarray::Array2;

/// Numerical Recipes LCG → uniform (0, 1); Box–Muller for normals.
struct Lcg(u64);

impl Lcg {
    fn uniform(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// 200 strategies driven by 5 common factors plus idiosyncratic noise, with
/// small positive drifts, so Σ is full rank and the problem is non-trivial.
fn synthetic(n: usize, t: usize, seed: u64) -> AlignedReturns {
    let mut rng = Lcg(seed);
    let k = 5;
    let loadings: Vec<f64> = (0..n * k).map(|_| 0.5 * rng.normal()).collect();
    let drift: Vec<f64> = (0..n).map(|_| 0.0002 + 0.0004 * rng.uniform()).collect();
    let idio: Vec<f64> = (0..n).map(|_| 0.005 + 0.01 * rng.uniform()).collect();
    let mut r = Array2::<f64>::zeros((t, n));
    for day in 0..t {
        let f: Vec<f64> = (0..k).map(|_| 0.006 * rng.normal()).collect();
        for i in 0..n {
            let common: f64 = (0..k).map(|j| loadings[i * k + j] * f[j]).sum();
            r[[day, i]] = drift[i] + common + idio[i] * rng.normal();
        }
    }
    let start = NaiveDate::from_ymd_opt(2015, 1, 1).unwrap_or_default();
    AlignedReturns {
        strategy_ids: (0..n).map(|i| format!("SYN{i:03}")).collect(),
        dates: (0..t)
            .map(|d| start + chrono::Days::new(d as u64))
            .collect(),
        returns: r,
    }
}

fn time<T>(reps: u32, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut last = None;
    let start = Instant::now();
    for _ in 0..reps {
        last = Some(f());
    }
    let per = start.elapsed() / reps;
    match last {
        Some(v) => (per, v),
        None => (per, f()),
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var("MTX_FIXTURES_DIR")
                .map(|d| PathBuf::from(d).join("backtests"))
                .unwrap_or_else(|_| {
                    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/backtests")
                })
        });
    let c = Constraints::default();

    let (t_load, all) = time(20, || load_backtest_dir(&dir));
    let all = all?;
    println!(
        "load {} CSVs: {:.2} ms",
        all.len(),
        t_load.as_secs_f64() * 1e3
    );
    let earliest = all
        .iter()
        .map(|s| s.stats.start_date)
        .min()
        .ok_or("no strategies")?;
    let full: Vec<_> = all
        .iter()
        .filter(|s| s.stats.start_date == earliest)
        .collect();
    let aligned = align(&full)?;
    let w = aligned.window();
    println!(
        "shared data: {} strategies × {} days ({} .. {})",
        aligned.n_strategies(),
        w.count,
        w.first,
        w.last
    );
    let (t_mom, moments) = time(50, || ReturnMoments::from_aligned(&aligned));
    let moments = moments?;
    let (t_ms, a) = time(50, || max_sharpe(&moments, &c));
    let a = a?;
    println!(
        "  moments {:.3} ms | max_sharpe {:.3} ms ({} iters, sharpe_annual {:.4})",
        t_mom.as_secs_f64() * 1e3,
        t_ms.as_secs_f64() * 1e3,
        a.solve.iterations,
        a.metrics.expected_sharpe_annual
    );
    for (id, w) in a.allocations_pct() {
        println!("    {id:>14}: {w:8.4} %");
    }
    let (t_cvar, cv) = time(5, || min_cvar(&aligned, &c, &CvarParams::default()));
    let cv = cv?;
    let (t_hrp, h) = time(50, || hrp(&moments, &c));
    h?;
    let (t_cagr, g) = time(3, || {
        max_cagr(
            &aligned,
            &c,
            &CagrParams {
                max_drawdown: Some(0.2),
            },
        )
    });
    let g = g?;
    println!(
        "  min_cvar {:.1} ms (cvar95 {:.5}) | hrp {:.3} ms | max_cagr(DD≤20%) {:.1} ms (cagr {:.4}, mdd {:.4})",
        t_cvar.as_secs_f64() * 1e3,
        cv.cvar,
        t_hrp.as_secs_f64() * 1e3,
        t_cagr.as_secs_f64() * 1e3,
        g.cagr,
        g.max_drawdown
    );

    let syn = synthetic(200, 2500, 42);
    let (t_mom, moments) = time(5, || ReturnMoments::from_aligned(&syn));
    let moments = moments?;
    let (t_ms, a) = time(5, || max_sharpe(&moments, &c));
    let a = a?;
    let nonzero = a.weights.iter().filter(|w| **w > 1e-6).count();
    println!(
        "synthetic 200 × 2500: moments {:.1} ms | max_sharpe {:.1} ms ({} iters, success {}, {} non-zero weights, Σw = {:.12})",
        t_mom.as_secs_f64() * 1e3,
        t_ms.as_secs_f64() * 1e3,
        a.solve.iterations,
        a.solve.success,
        nonzero,
        a.weights.iter().sum::<f64>()
    );
    Ok(())
}
