//! Inputs the optimiser must refuse rather than turn into an allocation a
//! portfolio manager might approve.
mod common;

use std::path::Path;

use common::{full_history, load_all};
use mtx_portfolio::optimize::Constraints;
use mtx_portfolio::percent::{validate_percentages, weights_to_percent, PercentLimits};
use mtx_portfolio::{align, parse_backtest_csv, run, Algorithm, ReturnMoments, RunParams};

/// README: percentages "summing exactly to 100 × max_leverage"; approve re-checks
/// Σ ≤ 100 × max_leverage. With a leverage that has more than 6 decimals the
/// rounded total lands *above* the limit and the allocation can never be approved.
#[test]
fn percentages_never_exceed_the_leverage_limit() {
    let c = Constraints {
        max_leverage: 2.0 / 3.0,
        max_single_strategy: 0.5,
        risk_free_rate: 0.0,
    };
    let ids = vec!["A".to_string(), "B".to_string()];
    let w = [0.5, 2.0 / 3.0 - 0.5]; // feasible: Σw = max_leverage, each ≤ cap
    let p = weights_to_percent(&ids, &w, c.max_single_strategy).expect("pct");
    let lim = PercentLimits::from_constraints(&c).expect("limits");
    assert_eq!(
        validate_percentages(&p, &lim),
        Ok(()),
        "{p:?} vs limit {}",
        lim.max_total
    );
}

/// A strategy with only 3 days of backtest shrinks the common window to 3 days
/// for all 9 strategies (Σ has rank ≤ 2); the run still reports success and
/// produces an allocation with absurd figures.
#[test]
fn too_short_common_window_is_not_a_successful_run() {
    let all = load_all();
    let mut set = full_history(&all);
    let new = parse_backtest_csv(
        "NEW",
        Path::new("NEW.csv"),
        "Date,Daily Returns (%)\n2025-09-24,0.1\n2025-09-25,0.2\n2025-09-26,-0.1\n",
    )
    .expect("parse");
    set.push(&new);
    let al = align(&set).expect("align");
    assert_eq!(al.n_days(), 3);
    let m = ReturnMoments::from_aligned(&al).expect("moments");
    for alg in [
        Algorithm::MaxSharpe,
        Algorithm::MinCvar,
        Algorithm::MaxCagr,
        Algorithm::Hrp,
    ] {
        match run(&al, &m, &RunParams::new(alg)) {
            Ok(o) => panic!(
                "{alg}: 3 common days for 9 strategies gave an allocation: weights {:?}, sharpe_annual {}",
                o.allocation.weights, o.allocation.metrics.expected_sharpe_annual
            ),
            Err(e) => assert!(e.to_string().contains("has 3 days; at least 60"), "{e}"),
        }
    }
    // Lowering the minimum still never goes below strategies + 1.
    let mut p = RunParams::new(Algorithm::MaxSharpe);
    p.min_days = 2;
    let e = run(&al, &m, &p).unwrap_err();
    assert!(e.to_string().contains("at least 10"), "{e}");
}

/// A percent file whose header lost its "(%)" is read as decimals:
/// −1.54 becomes a −154 % day (equity below zero) and is stored silently.
#[test]
fn daily_return_below_minus_100_percent_is_rejected() {
    let text = "Date,Daily Returns\n2025-09-25,-1.54\n2025-09-26,1.99\n";
    let r = parse_backtest_csv("X", Path::new("X.csv"), text);
    assert!(
        r.is_err(),
        "accepted: {:?}",
        r.map(|b| (b.daily_returns, b.stats.max_drawdown))
    );
}

/// `YY-MM-DD` dates are read as the year 16 AD instead of being rejected.
#[test]
fn two_digit_year_is_rejected() {
    let text = "Date,Daily Returns (%)\n16-01-04,0.5\n16-01-05,0.6\n";
    let r = parse_backtest_csv("X", Path::new("X.csv"), text);
    assert!(r.is_err(), "accepted: {:?}", r.map(|b| b.dates));
}

/// A decimal column's honest extremes pass (a −99 % day, a +99 % day); a
/// percent column may move more than 100 % (a +150 % day), never below −100 %.
#[test]
fn plausible_extremes_still_pass() {
    let text = "Date,Daily Returns\n2025-09-25,-0.99\n2025-09-26,0.99\n";
    assert!(parse_backtest_csv("X", Path::new("X.csv"), text).is_ok());
    let text = "Date,Daily Returns (%)\n2025-09-25,150\n2025-09-26,-99.5\n";
    assert!(parse_backtest_csv("X", Path::new("X.csv"), text).is_ok());
    let text = "Date,Daily Returns (%)\n2025-09-25,-100\n";
    assert!(parse_backtest_csv("X", Path::new("X.csv"), text).is_err());
}
