//! Integration tests on the shared fixtures (repo copy in `tests/fixtures`):
//! parsing, statistics recomputed independently, error reporting, and the
//! optimisers' feasibility and optimality.

mod common;

use std::io::Write;
use std::path::Path;

use chrono::NaiveDate;
use common::{backtests_dir, dot, fixtures_dir, full_history, load_all, Lcg};
use mtx_portfolio::backtest::{load_backtest_csv, load_backtest_dir, BacktestError};
use mtx_portfolio::optimize::max_cagr::portfolio_returns;
use mtx_portfolio::optimize::max_sharpe::max_sharpe_kkt_violation;
use mtx_portfolio::optimize::{
    correlation_matrix, efficient_frontier, historical_var_cvar, hrp, max_cagr, max_sharpe,
    min_cvar, min_variance, to_nested, CagrParams, Constraints, CvarParams, OptimizeError,
    ReturnMoments,
};
use mtx_portfolio::{align, AlignedReturns};

const TOL: f64 = 1e-7;

fn house() -> Constraints {
    Constraints {
        max_leverage: 2.0,
        max_single_strategy: 0.5,
        risk_free_rate: 0.0,
    }
}

fn aligned_full() -> AlignedReturns {
    let all = load_all();
    align(&full_history(&all)).expect("align")
}

fn assert_feasible(w: &[f64], c: &Constraints) {
    let sum: f64 = w.iter().sum();
    assert!((sum - c.max_leverage).abs() <= TOL, "Σw = {sum}");
    for x in w {
        assert!(*x >= -TOL && *x <= c.max_single_strategy + TOL, "w = {w:?}");
    }
}

fn sharpe(m: &ReturnMoments, w: &[f64]) -> f64 {
    let wv = ndarray::Array1::from(w.to_vec());
    m.mean.dot(&wv) / wv.dot(&m.cov.dot(&wv)).sqrt()
}

// ---------------------------------------------------------------- parsing

#[test]
fn parses_every_fixture_sorted() {
    let all = load_all();
    assert_eq!(all.len(), 9);
    let ids: Vec<&str> = all.iter().map(|s| s.strategy_id.as_str()).collect();
    assert_eq!(
        ids,
        vec![
            "Com1-Met",
            "Com2-Ag",
            "Com3-Mkt",
            "Com4-Misc",
            "FloridaForex",
            "SPX_0DE_Opt",
            "SPX_1-D_Opt",
            "SPY",
            "TLT"
        ]
    );
    // every id is a configured strategy
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("strategies.json")).expect("strategies.json"),
    )
    .expect("json");
    let configured: Vec<&str> = cfg
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["strategy_id"].as_str())
        .collect();
    for s in &all {
        assert!(
            configured.contains(&s.strategy_id.as_str()),
            "{}",
            s.strategy_id
        );
        assert!(
            s.dates.windows(2).all(|w| w[0] < w[1]),
            "{} unsorted",
            s.strategy_id
        );
        assert_eq!(s.dates.len(), s.daily_returns.len());
        assert_eq!(s.stats.total_days, s.dates.len());
        assert_eq!(s.stats.start_date, s.dates[0]);
        assert_eq!(s.stats.end_date, *s.dates.last().expect("non-empty"));
        assert_eq!(s.margin_per_unit, None);
        assert!((0.0..=1.0).contains(&s.stats.max_drawdown));
        assert!((0.0..=1.0).contains(&s.stats.win_rate));
    }
}

#[test]
fn newest_first_file_is_reversed_and_scaled() {
    // Com1-Met.csv starts with "2025-09-27,-0.65" and ends with "2016-01-04,1.99".
    let s = load_backtest_csv(&backtests_dir().join("Com1-Met.csv")).expect("load");
    assert_eq!(s.dates[0], NaiveDate::from_ymd_opt(2016, 1, 4).expect("d"));
    assert!((s.daily_returns[0] - 0.0199).abs() < 1e-15);
    assert_eq!(
        *s.dates.last().expect("d"),
        NaiveDate::from_ymd_opt(2025, 9, 27).expect("d")
    );
    assert!((s.daily_returns.last().expect("r") + 0.0065).abs() < 1e-15);
}

#[test]
fn full_history_set_is_the_eight_without_spx_0de() {
    let all = load_all();
    let full = full_history(&all);
    assert_eq!(full.len(), 8);
    assert!(full.iter().all(|s| s.strategy_id != "SPX_0DE_Opt"));
    let spx0 = all
        .iter()
        .find(|s| s.strategy_id == "SPX_0DE_Opt")
        .expect("present");
    assert!(spx0.stats.start_date > full[0].stats.start_date);
    let al = align(&full).expect("align");
    let w = al.window();
    assert_eq!(w.first, NaiveDate::from_ymd_opt(2016, 1, 4).expect("d"));
    assert_eq!(w.last, NaiveDate::from_ymd_opt(2025, 9, 27).expect("d"));
    assert_eq!(w.count, 2449);
    // aligning all nine restricts to SPX_0DE_Opt's window
    let nine = align(&all.iter().collect::<Vec<_>>()).expect("align 9");
    assert_eq!(nine.window().first, spx0.stats.start_date);
    assert!(nine.n_days() <= spx0.stats.total_days);
}

/// Recompute SPY's statistics from the raw file with nothing but std.
#[test]
fn spy_statistics_recomputed_independently() {
    let text = std::fs::read_to_string(backtests_dir().join("SPY.csv")).expect("read");
    let mut rows: Vec<(String, f64)> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (d, r) = l.split_once(',').expect("two fields");
            (
                d.trim().to_string(),
                r.trim().parse::<f64>().expect("num") / 100.0,
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let r: Vec<f64> = rows.iter().map(|x| x.1).collect();
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    let var = r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let sharpe_daily = mean / var.sqrt();
    // Max drawdown by brute force over all (peak, trough) pairs, E₀ = 1.
    let mut equity = vec![1.0];
    for x in &r {
        let last = *equity.last().expect("e");
        equity.push(last * (1.0 + x));
    }
    let mut mdd: f64 = 0.0;
    for (i, peak) in equity.iter().enumerate() {
        for trough in &equity[i..] {
            mdd = mdd.max(1.0 - trough / peak);
        }
    }

    let s = load_backtest_csv(&backtests_dir().join("SPY.csv")).expect("load");
    assert_eq!(s.strategy_id, "SPY");
    assert_eq!(s.daily_returns.len(), r.len());
    for (a, b) in s.daily_returns.iter().zip(&r) {
        assert_eq!(a, b);
    }
    let st = &s.stats;
    assert!((st.mean_return_daily - mean).abs() < 1e-15);
    assert!((st.volatility_daily - var.sqrt()).abs() < 1e-15);
    let sd = st.sharpe_daily.expect("vol > 0");
    assert!((sd - sharpe_daily).abs() < 1e-12, "{sd} vs {sharpe_daily}");
    let sa = st.sharpe_annual.expect("vol > 0");
    assert!((sa - sharpe_daily * 252f64.sqrt()).abs() < 1e-12);
    assert!(
        (st.max_drawdown - mdd).abs() < 1e-12,
        "{} vs {mdd}",
        st.max_drawdown
    );
    assert!(mdd > 0.0);
    let wins = r.iter().filter(|x| **x > 0.0).count() as f64 / n;
    assert_eq!(st.win_rate, wins);
}

// ----------------------------------------------------------------- errors

fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create");
    f.write_all(body.as_bytes()).expect("write");
    p
}

#[test]
fn duplicate_date_names_file_and_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(
        dir.path(),
        "Dup.csv",
        "Date,Daily Returns (%)\n2024-01-02,0.1\n2024-01-03,0.2\n2024-01-02,0.3\n",
    );
    let err = load_backtest_csv(&p).expect_err("duplicate");
    match &err {
        BacktestError::DuplicateDate {
            line, first_line, ..
        } => {
            assert_eq!((*line, *first_line), (4, 2));
        }
        other => panic!("unexpected {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("Dup.csv") && msg.contains("line 4"), "{msg}");
}

#[test]
fn nan_and_inf_are_rejected_with_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bad) in [
        ("Nan.csv", "NaN"),
        ("Inf.csv", "inf"),
        ("NegInf.csv", "-inf"),
    ] {
        let p = write(
            dir.path(),
            name,
            &format!("Date,Daily Returns (%)\n2024-01-02,0.1\n2024-01-03,{bad}\n2024-01-04,0.2\n"),
        );
        let err = load_backtest_csv(&p).expect_err("non-finite");
        assert!(
            matches!(err, BacktestError::NonFinite { line: 3, .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(name) && msg.contains("line 3"), "{msg}");
    }
}

#[test]
fn bad_rows_are_rejected_with_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        ("BadNum.csv", "2024-01-03,abc", 3),
        ("BadDate.csv", "2024-13-01,0.1", 3),
        ("Blank.csv", "2024-01-03,", 3),
        ("Extra.csv", "2024-01-03,0.1,oops", 3),
    ];
    for (name, row, line) in cases {
        let p = write(
            dir.path(),
            name,
            &format!("Date,Daily Returns (%)\n2024-01-02,0.1\n{row}\n2024-01-04,0.2\n"),
        );
        let err = load_backtest_csv(&p).expect_err(name);
        match &err {
            BacktestError::Row { line: l, .. } => assert_eq!(*l, line, "{name}: {err}"),
            other => panic!("{name}: unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains(name) && msg.contains(&format!("line {line}")),
            "{msg}"
        );
    }
}

#[test]
fn folder_load_fails_on_a_bad_file_and_names_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(
        dir.path(),
        "Good.csv",
        "Date,Daily Returns (%)\n2024-01-02,0.1\n2024-01-03,0.2\n",
    );
    write(
        dir.path(),
        "Broken.csv",
        "Date,Daily Returns (%)\n2024-01-02,0.1\n2024-01-03,x\n",
    );
    write(dir.path(), "notes.txt", "ignored");
    let err = load_backtest_dir(dir.path()).expect_err("bad file");
    assert!(err.to_string().contains("Broken.csv"), "{err}");
    std::fs::remove_file(dir.path().join("Broken.csv")).expect("rm");
    let ok = load_backtest_dir(dir.path()).expect("good only");
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].strategy_id, "Good");
}

// ------------------------------------------------------------- optimisers

#[test]
fn max_sharpe_full_history_is_feasible_and_optimal() {
    let al = aligned_full();
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    let c = house();
    let a = max_sharpe(&m, &c).expect("solve");
    assert!(a.solve.success, "{:?}", a.solve);
    assert!(a.solve.converged);
    assert!(a.solve.iterations > 0);
    assert_feasible(&a.weights, &c);
    assert_eq!(a.strategy_ids, al.strategy_ids);

    // metrics are consistent with the weights
    let s = sharpe(&m, &a.weights);
    assert!((a.metrics.expected_sharpe_daily - s).abs() < 1e-12);
    assert!((a.metrics.expected_sharpe_annual - s * 252f64.sqrt()).abs() < 1e-12);
    assert!((a.metrics.leverage_ratio - 2.0).abs() < TOL);
    assert!((a.metrics.total_allocation_pct - 200.0).abs() < 1e-5);
    let pct = a.allocations_pct();
    assert_eq!(pct.len(), 8);
    assert!((pct.values().sum::<f64>() - 200.0).abs() < 1e-5);

    // First-order (KKT) certificate; S is pseudo-concave so this is global.
    let v = max_sharpe_kkt_violation(&m, &c, &a.weights, 1e-7);
    assert!(v < 1e-6, "KKT violation {v}");

    // Nothing feasible beats it: random points, random vertices, and small
    // feasible perturbations of the optimum.
    let mut rng = Lcg(7);
    let n = m.n();
    for _ in 0..20_000 {
        let w = rng.feasible(n, c.max_leverage, c.max_single_strategy);
        assert!(sharpe(&m, &w) <= s + 1e-12, "random point beats optimum");
    }
    for _ in 0..20_000 {
        let (i, j) = (rng.below(n), rng.below(n));
        if i == j {
            continue;
        }
        let step = 1e-4 * rng.uniform();
        let mut w = a.weights.clone();
        w[i] += step;
        w[j] -= step;
        if w[i] <= c.max_single_strategy && w[j] >= 0.0 {
            assert!(sharpe(&m, &w) <= s + 1e-15, "perturbation beats optimum");
        }
    }
}

#[test]
fn max_sharpe_with_risk_free_rate_keeps_constraints() {
    let al = aligned_full();
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    let c = Constraints {
        risk_free_rate: 0.0001,
        ..house()
    };
    let a = max_sharpe(&m, &c).expect("solve");
    assert!(a.solve.success);
    assert_feasible(&a.weights, &c);
    assert!(max_sharpe_kkt_violation(&m, &c, &a.weights, 1e-7) < 1e-6);
    let mut rng = Lcg(11);
    let s = |w: &[f64]| {
        let wv = ndarray::Array1::from(w.to_vec());
        (m.mean.dot(&wv) - c.risk_free_rate) / wv.dot(&m.cov.dot(&wv)).sqrt()
    };
    let best = s(&a.weights);
    for _ in 0..5_000 {
        let w = rng.feasible(m.n(), 2.0, 0.5);
        assert!(s(&w) <= best + 1e-12);
    }
}

#[test]
fn min_cvar_is_feasible_and_beats_alternatives() {
    let al = aligned_full();
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    let c = house();
    let r = min_cvar(&al, &c, &CvarParams::default()).expect("cvar");
    assert!(r.allocation.solve.success, "{:?}", r.allocation.solve);
    assert_feasible(&r.allocation.weights, &c);
    assert!(r.cvar >= r.var);
    let cvar_of = |w: &[f64]| {
        historical_var_cvar(&portfolio_returns(&al, w), 0.95)
            .expect("cvar")
            .1
    };
    assert!((cvar_of(&r.allocation.weights) - r.cvar).abs() < 1e-12);
    let ms = max_sharpe(&m, &c).expect("ms");
    assert!(r.cvar <= cvar_of(&ms.weights) + 1e-9);
    let mut rng = Lcg(3);
    for _ in 0..3_000 {
        let w = rng.feasible(m.n(), 2.0, 0.5);
        assert!(r.cvar <= cvar_of(&w) + 1e-9);
    }

    // with a return floor above the unconstrained optimum's return
    let floor = ms.metrics.expected_daily_return;
    let rf = min_cvar(
        &al,
        &c,
        &CvarParams {
            confidence: 0.95,
            min_expected_return: Some(floor),
        },
    )
    .expect("cvar floor");
    assert_feasible(&rf.allocation.weights, &c);
    assert!(rf.allocation.metrics.expected_daily_return >= floor - 1e-9);
    assert!(rf.cvar >= r.cvar - 1e-9);
}

#[test]
fn hrp_respects_leverage_and_cap() {
    let al = aligned_full();
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    let c = house();
    let h = hrp(&m, &c).expect("hrp");
    assert_feasible(&h.allocation.weights, &c);
    assert!((h.raw_weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(h.raw_weights.iter().all(|w| *w > 0.0));
    let mut order = h.leaf_order.clone();
    order.sort();
    let mut ids = al.strategy_ids.clone();
    ids.sort();
    assert_eq!(order, ids);
    // tight cap forces redistribution
    let tight = Constraints {
        max_single_strategy: 0.26,
        ..c
    };
    let h2 = hrp(&m, &tight).expect("hrp tight");
    assert_feasible(&h2.allocation.weights, &tight);
    assert!(!h2.capped.is_empty());
}

#[test]
fn max_cagr_respects_drawdown_and_beats_feasible_points() {
    let al = aligned_full();
    let c = house();
    let free = max_cagr(&al, &c, &CagrParams { max_drawdown: None }).expect("free");
    assert!(free.allocation.solve.success, "{:?}", free.allocation.solve);
    assert_feasible(&free.allocation.weights, &c);
    // a limit tighter than the unconstrained optimum's drawdown must bind
    let limit = 0.75 * free.max_drawdown;
    let r = max_cagr(
        &al,
        &c,
        &CagrParams {
            max_drawdown: Some(limit),
        },
    )
    .expect("limited");
    assert!(r.allocation.solve.success, "{:?}", r.allocation.solve);
    assert_feasible(&r.allocation.weights, &c);
    assert!(
        r.max_drawdown <= limit + 1e-6,
        "{} > {limit}",
        r.max_drawdown
    );
    assert!(r.cagr <= free.cagr + 1e-9);
    let growth = |w: &[f64]| {
        let p = portfolio_returns(&al, w);
        (
            mtx_portfolio::optimize::max_cagr::cagr(&p).expect("cagr"),
            mtx_portfolio::backtest::max_drawdown(&p),
        )
    };
    let (g, _) = growth(&free.allocation.weights);
    assert!((g - free.cagr).abs() < 1e-12);
    let mut rng = Lcg(5);
    let mut checked = 0;
    for _ in 0..3_000 {
        let w = rng.feasible(al.n_strategies(), 2.0, 0.5);
        let (g, dd) = growth(&w);
        assert!(g <= free.cagr + 1e-7, "beats unconstrained max");
        if dd <= limit {
            checked += 1;
            assert!(g <= r.cagr + 1e-7, "feasible point beats limited max");
        }
    }
    assert!(checked > 0, "no random point met the drawdown limit");
    // an impossible limit is reported, not silently violated
    let impossible = max_cagr(
        &al,
        &c,
        &CagrParams {
            max_drawdown: Some(1e-4),
        },
    );
    match impossible {
        Err(OptimizeError::NotSolved { status, .. }) => {
            assert!(status.contains("Infeasible"), "{status}")
        }
        other => panic!("expected infeasible, got {other:?}"),
    }
    eprintln!(
        "max_cagr: free cagr {:.4} mdd {:.4}; limited({limit:.4}) cagr {:.4} mdd {:.4}; {checked} random points met the limit",
        free.cagr, free.max_drawdown, r.cagr, r.max_drawdown
    );
}

#[test]
fn frontier_is_monotone_and_below_max_sharpe() {
    let al = aligned_full();
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    let c = house();
    let pts = efficient_frontier(&m, &c, 12).expect("frontier");
    assert_eq!(pts.len(), 12);
    let ms = max_sharpe(&m, &c).expect("ms");
    let best = ms.metrics.expected_sharpe_daily;
    for w in pts.windows(2) {
        assert!(w[1].expected_daily_return > w[0].expected_daily_return);
        assert!(w[1].volatility_daily >= w[0].volatility_daily - 1e-12);
    }
    for p in &pts {
        assert_feasible(&p.weights, &c);
        assert!((p.expected_daily_return - p.target_return).abs() < 1e-9);
        assert!(p.expected_daily_return / p.volatility_daily <= best + 1e-9);
    }
    let gmv = min_variance(&m, &c, None).expect("gmv");
    assert!((gmv.metrics.expected_daily_volatility - pts[0].volatility_daily).abs() < 1e-12);
    assert!(gmv.metrics.expected_daily_volatility <= ms.metrics.expected_daily_volatility);
}

#[test]
fn run_record_matrices() {
    let al = aligned_full();
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    let corr = correlation_matrix(&m.cov);
    let cov = to_nested(&m.cov);
    let cor = to_nested(&corr);
    assert_eq!(cov.len(), 8);
    for i in 0..8 {
        assert_eq!(cov[i].len(), 8);
        assert!((cor[i][i] - 1.0).abs() < 1e-15);
        for j in 0..8 {
            assert_eq!(cov[i][j], cov[j][i]);
            assert!(cor[i][j].abs() <= 1.0);
        }
    }
    // independent covariance of the first pair
    let a: Vec<f64> = al.returns.column(0).to_vec();
    let b: Vec<f64> = al.returns.column(1).to_vec();
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let c01 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum::<f64>()
        / (n - 1.0);
    assert!((cov[0][1] - c01).abs() < 1e-15);
    assert!(dot(&a, &b).is_finite());
}
