//! Allocation percentages as they are stored, edited, approved and handed
//! to Cerebro: exact decimals (`45.5` = 45.5 % of account equity), not the
//! optimiser's `f64` weights.
//!
//! - [`weights_to_percent`] turns feasible weights into percentages with a
//!   fixed number of decimals **without** letting rounding break the
//!   constraints: largest-remainder rounding keeps the total at the rounded
//!   total of the weights and never lifts a strategy above its cap.
//! - [`PercentLimits`] / [`validate_percentages`] check a hand-edited
//!   allocation against the run's constraints
//!   (`0 ≤ pᵢ ≤ 100·max_single_strategy`, `Σ pᵢ ≤ 100·max_leverage`).
//!   Edits may de-lever (Σ below the target) but never exceed it.
//! - [`percent_metrics`] recomputes the expected metrics of percentages
//!   under a run's moments.

use std::collections::BTreeMap;
use std::str::FromStr;

use ndarray::{Array1, Array2};
use rust_decimal::prelude::{FromPrimitive, ToPrimitive};
use rust_decimal::Decimal;

use crate::optimize::{portfolio_metrics, Constraints, PortfolioMetrics};

/// Decimals kept in stored percentages (0.0001 % of equity).
pub const PERCENT_DECIMALS: u32 = 4;

/// Why percentages are not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PercentError {
    /// A weight or limit is NaN / infinite or cannot be represented.
    #[error("{what} is not a finite number: {value}")]
    NotFinite {
        /// Which value.
        what: String,
        /// The offending value.
        value: f64,
    },
    /// A percentage is below zero (allocations are long-only).
    #[error("{strategy}: {pct} % is negative (allocations are ≥ 0)")]
    Negative {
        /// Strategy id.
        strategy: String,
        /// Its percentage.
        pct: Decimal,
    },
    /// A percentage exceeds `100 × max_single_strategy`.
    #[error("{strategy}: {pct} % is above the per-strategy cap of {cap} %")]
    AboveCap {
        /// Strategy id.
        strategy: String,
        /// Its percentage.
        pct: Decimal,
        /// The cap in percent.
        cap: Decimal,
    },
    /// The sum exceeds `100 × max_leverage`.
    #[error("the allocations add up to {total} %, above the leverage limit of {limit} %")]
    AboveLeverage {
        /// Σ pᵢ.
        total: Decimal,
        /// The limit in percent.
        limit: Decimal,
    },
    /// Stored moments do not fit together (lengths, shape).
    #[error("inconsistent moments: {0}")]
    Shape(String),
    /// The allocation names a strategy the run did not optimise.
    #[error("{strategy} is not part of this allocation (strategies: {known})")]
    UnknownStrategy {
        /// The unknown id.
        strategy: String,
        /// The allowed ids, comma separated.
        known: String,
    },
}

/// The constraint block in percent, exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PercentLimits {
    /// `100 × max_leverage`: the largest allowed Σ pᵢ.
    pub max_total: Decimal,
    /// `100 × max_single_strategy`: the largest allowed pᵢ.
    pub max_single: Decimal,
}

impl PercentLimits {
    /// Convert the optimiser's constraints (fractions) to percent limits.
    /// The fractions are read as the shortest decimals that round-trip
    /// (`2.0` → `200`, `0.5` → `50`).
    pub fn from_constraints(c: &Constraints) -> Result<Self, PercentError> {
        let pct = |what: &str, v: f64| -> Result<Decimal, PercentError> {
            let not_finite = || PercentError::NotFinite {
                what: what.to_string(),
                value: v,
            };
            if !v.is_finite() {
                return Err(not_finite());
            }
            let d = decimal_from_f64(v).ok_or_else(not_finite)?;
            d.checked_mul(Decimal::ONE_HUNDRED)
                .map(|x| x.normalize())
                .ok_or_else(not_finite)
        };
        Ok(PercentLimits {
            max_total: pct("max_leverage", c.max_leverage)?,
            max_single: pct("max_single_strategy", c.max_single_strategy)?,
        })
    }
}

/// The shortest decimal that reads back as `v` (`0.1` → `0.1`, not the
/// binary expansion); `None` for non-finite or out-of-range values.
pub fn decimal_from_f64(v: f64) -> Option<Decimal> {
    if !v.is_finite() {
        return None;
    }
    // `Display` of f64 is the shortest round-trip form and never uses an exponent.
    Decimal::from_str(&v.to_string())
        .ok()
        .or_else(|| Decimal::from_f64(v))
        .map(|d| d.normalize())
}

/// Percentages (`strategy → %`, [`PERCENT_DECIMALS`] decimals) of weights
/// given as fractions of equity, in the order of `ids`.
///
/// Every weight is floored to the grid and the units lost to flooring are
/// handed back one grid step at a time to the largest remainders (ties: the
/// earlier strategy), never to a strategy already at `cap`, so
/// Σ pᵢ equals Σ wᵢ·100 rounded to the grid and no pᵢ exceeds the cap when
/// no wᵢ does. Weights must be finite and ≥ 0 (tiny negative round-off down
/// to −1e-9 is treated as 0).
pub fn weights_to_percent(
    ids: &[String],
    weights: &[f64],
    cap: f64,
) -> Result<BTreeMap<String, Decimal>, PercentError> {
    let scale = 10f64.powi(PERCENT_DECIMALS as i32 + 2); // fraction → grid units
    let mut floors = Vec::with_capacity(weights.len());
    let mut rems = Vec::with_capacity(weights.len());
    let mut exact_total = 0.0;
    for (id, &w) in ids.iter().zip(weights) {
        if !w.is_finite() || w < -1e-9 {
            return Err(PercentError::NotFinite {
                what: format!("weight of {id}"),
                value: w,
            });
        }
        let units = w.max(0.0) * scale;
        exact_total += units;
        let fl = units.floor();
        floors.push(fl as i64);
        rems.push(units - fl);
    }
    if !cap.is_finite() {
        return Err(PercentError::NotFinite {
            what: "max_single_strategy".into(),
            value: cap,
        });
    }
    let cap_units = (cap * scale + 1e-6).floor() as i64;
    // Never round the total above Σw, hence never above the leverage
    // limit (100·L off the 4-decimal grid rounds down).
    let target = (exact_total + 1e-6).floor() as i64;
    let mut deficit = target - floors.iter().sum::<i64>();
    let mut order: Vec<usize> = (0..floors.len()).collect();
    order.sort_by(|&a, &b| rems[b].total_cmp(&rems[a]).then(a.cmp(&b)));
    for &i in &order {
        if deficit <= 0 {
            break;
        }
        if floors[i] < cap_units {
            floors[i] += 1;
            deficit -= 1;
        }
    }
    Ok(ids
        .iter()
        .cloned()
        .zip(floors.iter().map(|u| Decimal::new(*u, PERCENT_DECIMALS)))
        .collect())
}

/// Check percentages against the limits: each ≥ 0 and ≤ `max_single`, the
/// sum ≤ `max_total`. Reports the first violation.
pub fn validate_percentages(
    pcts: &BTreeMap<String, Decimal>,
    limits: &PercentLimits,
) -> Result<(), PercentError> {
    let mut total = Decimal::ZERO;
    for (id, p) in pcts {
        if p.is_sign_negative() && !p.is_zero() {
            return Err(PercentError::Negative {
                strategy: id.clone(),
                pct: *p,
            });
        }
        if *p > limits.max_single {
            return Err(PercentError::AboveCap {
                strategy: id.clone(),
                pct: *p,
                cap: limits.max_single,
            });
        }
        total += *p;
    }
    if total > limits.max_total {
        return Err(PercentError::AboveLeverage {
            total: total.normalize(),
            limit: limits.max_total,
        });
    }
    Ok(())
}

/// Apply `edits` (`strategy → new %`) to `current`; every edited strategy
/// must already be part of `current` (the run's universe, zeros included).
pub fn apply_edits(
    current: &BTreeMap<String, Decimal>,
    edits: &BTreeMap<String, Decimal>,
) -> Result<BTreeMap<String, Decimal>, PercentError> {
    let mut out = current.clone();
    for (id, p) in edits {
        match out.get_mut(id) {
            Some(slot) => *slot = *p,
            None => {
                return Err(PercentError::UnknownStrategy {
                    strategy: id.clone(),
                    known: current.keys().cloned().collect::<Vec<_>>().join(", "),
                })
            }
        }
    }
    Ok(out)
}

/// Sum of percentages.
pub fn total_percent(pcts: &BTreeMap<String, Decimal>) -> Decimal {
    pcts.values().copied().sum()
}

/// Expected metrics of percentages under moments μ (`mean`) and Σ (`cov`)
/// whose rows/columns follow `ids`. Strategies of `ids` missing from
/// `pcts` count as 0 %; a strategy in `pcts` missing from `ids` is an error.
pub fn percent_metrics(
    ids: &[String],
    mean: &Array1<f64>,
    cov: &Array2<f64>,
    pcts: &BTreeMap<String, Decimal>,
    risk_free_rate: f64,
) -> Result<PortfolioMetrics, PercentError> {
    if let Some(extra) = pcts.keys().find(|k| !ids.contains(k)) {
        return Err(PercentError::UnknownStrategy {
            strategy: extra.clone(),
            known: ids.join(", "),
        });
    }
    let w: Vec<f64> = ids
        .iter()
        .map(|id| {
            pcts.get(id)
                .and_then(|p| p.to_f64())
                .map_or(0.0, |p| p / 100.0)
        })
        .collect();
    Ok(portfolio_metrics(mean, cov, &w, risk_free_rate))
}

/// [`percent_metrics`] from moments stored as plain vectors (a run
/// record's `mean_returns_daily` and row-major `covariance_matrix`).
pub fn percent_metrics_from_rows(
    ids: &[String],
    mean: &[f64],
    cov_rows: &[Vec<f64>],
    pcts: &BTreeMap<String, Decimal>,
    risk_free_rate: f64,
) -> Result<PortfolioMetrics, PercentError> {
    let n = ids.len();
    if mean.len() != n || cov_rows.len() != n || cov_rows.iter().any(|r| r.len() != n) {
        return Err(PercentError::Shape(format!(
            "{n} strategies, {} means, a {}-row covariance matrix",
            mean.len(),
            cov_rows.len()
        )));
    }
    let cov = Array2::from_shape_fn((n, n), |(i, j)| cov_rows[i][j]);
    percent_metrics(
        ids,
        &Array1::from(mean.to_vec()),
        &cov,
        pcts,
        risk_free_rate,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("decimal")
    }

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("S{i}")).collect()
    }

    #[test]
    fn rounding_keeps_total_and_cap() {
        // Three thirds of 2.0 with a cap of 0.7: each 66.6666…%.
        let w = [2.0 / 3.0; 3];
        let p = weights_to_percent(&ids(3), &w, 0.7).expect("pct");
        assert_eq!(total_percent(&p), d("200"));
        assert_eq!(p["S0"], d("66.6667"));
        assert_eq!(p["S1"], d("66.6667"));
        assert_eq!(p["S2"], d("66.6666"));
        // Weights at the cap with round-off just under it stay at the cap.
        let w = [0.5 - 1e-15, 0.5, 0.5, 0.5 - 1e-15];
        let p = weights_to_percent(&ids(4), &w, 0.5).expect("pct");
        assert!(p.values().all(|v| *v == d("50")), "{p:?}");
        assert!(weights_to_percent(&ids(1), &[f64::NAN], 0.5).is_err());
        assert!(weights_to_percent(&ids(1), &[-0.1], 0.5).is_err());
    }

    #[test]
    fn shortest_decimals() {
        assert_eq!(decimal_from_f64(0.1), Some(d("0.1")));
        assert_eq!(decimal_from_f64(2000.5), Some(d("2000.5")));
        assert_eq!(decimal_from_f64(1e-7), Some(d("0.0000001")));
        assert_eq!(decimal_from_f64(f64::INFINITY), None);
        let lim = PercentLimits::from_constraints(&Constraints {
            max_leverage: 1.3,
            max_single_strategy: 0.3,
            risk_free_rate: 0.0,
        })
        .expect("limits");
        assert_eq!(lim.max_total, d("130"));
        assert_eq!(lim.max_single, d("30"));
    }

    #[test]
    fn limits_and_validation() {
        let lim = PercentLimits::from_constraints(&Constraints::default()).expect("limits");
        assert_eq!(lim.max_total, d("200"));
        assert_eq!(lim.max_single, d("50"));
        let mut p: BTreeMap<String, Decimal> = [("A", "50"), ("B", "50"), ("C", "50"), ("D", "50")]
            .iter()
            .map(|(k, v)| (k.to_string(), d(v)))
            .collect();
        assert_eq!(validate_percentages(&p, &lim), Ok(()));
        p.insert("A".into(), d("50.0001"));
        assert!(matches!(
            validate_percentages(&p, &lim),
            Err(PercentError::AboveCap { .. })
        ));
        p.insert("A".into(), d("-1"));
        assert!(matches!(
            validate_percentages(&p, &lim),
            Err(PercentError::Negative { .. })
        ));
        p.insert("A".into(), d("50"));
        p.insert("E".into(), d("0.5"));
        let e = validate_percentages(&p, &lim).expect_err("over");
        assert_eq!(
            e.to_string(),
            "the allocations add up to 200.5 %, above the leverage limit of 200 %"
        );
    }

    #[test]
    fn edits_only_touch_known_strategies() {
        let cur: BTreeMap<String, Decimal> =
            [("A".to_string(), d("10")), ("B".to_string(), d("0"))].into();
        let e: BTreeMap<String, Decimal> = [("B".to_string(), d("5"))].into();
        let out = apply_edits(&cur, &e).expect("edit");
        assert_eq!(out["B"], d("5"));
        assert_eq!(out["A"], d("10"));
        let bad: BTreeMap<String, Decimal> = [("Z".to_string(), d("5"))].into();
        let err = apply_edits(&cur, &bad).expect_err("unknown");
        assert!(err.to_string().contains("strategies: A, B"), "{err}");
    }

    #[test]
    fn metrics_of_percentages() {
        let ids = vec!["A".to_string(), "B".to_string()];
        let mean = Array1::from(vec![0.001, 0.002]);
        let cov = Array2::from_shape_vec((2, 2), vec![1e-4, 0.0, 0.0, 4e-4]).expect("cov");
        let p: BTreeMap<String, Decimal> = [("A".to_string(), d("100"))].into();
        let m = percent_metrics(&ids, &mean, &cov, &p, 0.0).expect("metrics");
        assert!((m.expected_daily_return - 0.001).abs() < 1e-15);
        assert!((m.expected_daily_volatility - 0.01).abs() < 1e-15);
        assert!((m.total_allocation_pct - 100.0).abs() < 1e-12);
        let extra: BTreeMap<String, Decimal> = [("Z".to_string(), d("1"))].into();
        assert!(percent_metrics(&ids, &mean, &cov, &extra, 0.0).is_err());
        let rows = vec![vec![1e-4, 0.0], vec![0.0, 4e-4]];
        let m2 = percent_metrics_from_rows(&ids, &[0.001, 0.002], &rows, &p, 0.0).expect("rows");
        assert_eq!(m, m2);
        assert!(percent_metrics_from_rows(&ids, &[0.001], &rows, &p, 0.0).is_err());
    }
}
