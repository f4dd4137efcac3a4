//! Property tests: drawdown, alignment and CSV round-trips against
//! brute-force / obvious reference implementations.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{Days, NaiveDate};
use mtx_portfolio::backtest::{max_drawdown, parse_backtest_csv};
use mtx_portfolio::optimize::snap_to_feasible;
use mtx_portfolio::{align, StrategyBacktest};
use proptest::prelude::*;

fn base() -> NaiveDate {
    NaiveDate::from_ymd_opt(2020, 1, 1).unwrap_or_default()
}

fn brute_mdd(r: &[f64]) -> f64 {
    let mut e = vec![1.0];
    for x in r {
        let last = e[e.len() - 1];
        e.push(last * (1.0 + x));
    }
    let mut m: f64 = 0.0;
    for i in 0..e.len() {
        for j in i..e.len() {
            m = m.max(1.0 - e[j] / e[i]);
        }
    }
    m
}

/// Build a series from a day-offset → percent-return map via CSV text,
/// written in reverse order to exercise sorting.
fn series(id: &str, days: &BTreeMap<u16, i32>) -> StrategyBacktest {
    let mut text = String::from("Date,Daily Returns (%)\n");
    for (d, r) in days.iter().rev() {
        let date = base() + Days::new(u64::from(*d));
        text.push_str(&format!("{date},{}\n", f64::from(*r) / 100.0));
    }
    parse_backtest_csv(id, Path::new(id), &text).expect("parse")
}

proptest! {
    #[test]
    fn drawdown_matches_brute_force(r in prop::collection::vec(-0.2f64..0.2, 1..60)) {
        let a = max_drawdown(&r);
        prop_assert!((a - brute_mdd(&r)).abs() < 1e-12);
        prop_assert!((0.0..=1.0).contains(&a));
    }

    #[test]
    fn csv_round_trip_sorts_and_scales(days in prop::collection::btree_map(0u16..2000, -500i32..500, 2..50)) {
        let s = series("X", &days);
        prop_assert_eq!(s.dates.len(), days.len());
        for ((d, r), (date, ret)) in days.iter().zip(s.dates.iter().zip(&s.daily_returns)) {
            prop_assert_eq!(*date, base() + Days::new(u64::from(*d)));
            // percent value r/100 → decimal r/10000
            prop_assert!((ret - f64::from(*r) / 10_000.0).abs() < 1e-15);
        }
    }

    #[test]
    fn align_is_an_inner_join_on_date(
        a in prop::collection::btree_map(0u16..300, -500i32..500, 2..80),
        b in prop::collection::btree_map(0u16..300, -500i32..500, 2..80),
    ) {
        let (sa, sb) = (series("A", &a), series("B", &b));
        let common: Vec<u16> = a.keys().filter(|k| b.contains_key(k)).copied().collect();
        match align(&[&sa, &sb]) {
            Ok(al) => {
                prop_assert_eq!(al.n_days(), common.len());
                for (t, d) in common.iter().enumerate() {
                    prop_assert_eq!(al.dates[t], base() + Days::new(u64::from(*d)));
                    prop_assert!((al.returns[[t, 0]] - f64::from(a[d]) / 10_000.0).abs() < 1e-15);
                    prop_assert!((al.returns[[t, 1]] - f64::from(b[d]) / 10_000.0).abs() < 1e-15);
                }
            }
            Err(_) => prop_assert!(common.is_empty()),
        }
    }

    #[test]
    fn snap_lands_in_the_capped_simplex(
        raw in prop::collection::vec(0.0f64..1.0, 4..12),
        noise in prop::collection::vec(-1e-8f64..1e-8, 12),
    ) {
        // scale a random point into W (cap 0.5, total 1.0 ≤ n·cap), then perturb
        let n = raw.len();
        let s: f64 = raw.iter().sum::<f64>().max(1e-9);
        let mut w: Vec<f64> = raw.iter().map(|x| x / s).collect();
        snap_to_feasible(&mut w, 1.0, 0.5);
        for (x, e) in w.iter_mut().zip(&noise) {
            *x += e;
        }
        let moved = snap_to_feasible(&mut w, 1.0, 0.5);
        prop_assert!(moved < 1e-7);
        prop_assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        prop_assert!(w.iter().all(|x| (0.0..=0.5).contains(x)));
        prop_assert_eq!(w.len(), n);
    }
}
