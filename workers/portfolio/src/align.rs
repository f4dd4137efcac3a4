//! Date alignment of several strategies' return series.
//!
//! Strategies are joined on the calendar date (an inner join): a day is kept
//! only if **every** strategy has a return for it. Joining by position would
//! silently pair different days whenever one file skips a holiday or starts
//! later, which corrupts covariances.

use chrono::NaiveDate;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::backtest::StrategyBacktest;

/// Why a set of strategies cannot be aligned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AlignError {
    /// No strategies were given.
    #[error("no strategies to align")]
    Empty,
    /// The same strategy id was given twice.
    #[error("strategy {0:?} given more than once")]
    DuplicateStrategy(String),
    /// A strategy's dates are not strictly ascending (not produced by the loader).
    #[error("strategy {0:?}: dates are not strictly ascending or do not match its returns")]
    Unsorted(String),
    /// The strategies share no date at all.
    #[error("strategies share no common date")]
    NoCommonDates,
}

/// The common window of an alignment, as recorded with an optimisation run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlignmentWindow {
    /// First common date.
    pub first: NaiveDate,
    /// Last common date.
    pub last: NaiveDate,
    /// Number of common dates (rows of the aligned matrix).
    pub count: usize,
}

/// Returns of several strategies on their common dates.
#[derive(Debug, Clone, PartialEq)]
pub struct AlignedReturns {
    /// Strategy ids, in column order.
    pub strategy_ids: Vec<String>,
    /// Common dates, strictly ascending; row `t` of `returns` is `dates[t]`.
    pub dates: Vec<NaiveDate>,
    /// `T × N` matrix of decimal daily returns (rows = dates, columns = strategies).
    pub returns: Array2<f64>,
}

impl AlignedReturns {
    /// The common window (first/last date and number of rows).
    pub fn window(&self) -> AlignmentWindow {
        // `align` guarantees at least one date.
        let first = self.dates.first().copied().unwrap_or_default();
        let last = self.dates.last().copied().unwrap_or_default();
        AlignmentWindow {
            first,
            last,
            count: self.dates.len(),
        }
    }

    /// Number of strategies (columns).
    pub fn n_strategies(&self) -> usize {
        self.strategy_ids.len()
    }

    /// Number of common dates (rows).
    pub fn n_days(&self) -> usize {
        self.dates.len()
    }
}

fn strictly_ascending(d: &[NaiveDate]) -> bool {
    d.windows(2).all(|w| w[0] < w[1])
}

/// Inner-join the given strategies on date. Column order follows the input
/// order. Errors if a strategy id repeats, the input is unsorted, or there is
/// no common date.
pub fn align(strategies: &[&StrategyBacktest]) -> Result<AlignedReturns, AlignError> {
    let first = strategies.first().ok_or(AlignError::Empty)?;
    for (i, s) in strategies.iter().enumerate() {
        if strategies[..i]
            .iter()
            .any(|p| p.strategy_id == s.strategy_id)
        {
            return Err(AlignError::DuplicateStrategy(s.strategy_id.clone()));
        }
        if !strictly_ascending(&s.dates) || s.dates.len() != s.daily_returns.len() {
            return Err(AlignError::Unsorted(s.strategy_id.clone()));
        }
    }
    let common: Vec<NaiveDate> = first
        .dates
        .iter()
        .copied()
        .filter(|d| {
            strategies[1..]
                .iter()
                .all(|s| s.dates.binary_search(d).is_ok())
        })
        .collect();
    if common.is_empty() {
        return Err(AlignError::NoCommonDates);
    }
    let mut returns = Array2::<f64>::zeros((common.len(), strategies.len()));
    for (j, s) in strategies.iter().enumerate() {
        // Both lists are ascending: walk them together.
        let mut k = 0;
        for (t, d) in common.iter().enumerate() {
            while s.dates[k] < *d {
                k += 1;
            }
            returns[[t, j]] = s.daily_returns[k];
        }
    }
    Ok(AlignedReturns {
        strategy_ids: strategies.iter().map(|s| s.strategy_id.clone()).collect(),
        dates: common,
        returns,
    })
}

/// Convenience: align owned strategies (same rules as [`align`]).
pub fn align_all(strategies: &[StrategyBacktest]) -> Result<AlignedReturns, AlignError> {
    let refs: Vec<&StrategyBacktest> = strategies.iter().collect();
    align(&refs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backtest::parse_backtest_csv;
    use std::path::Path;

    fn bt(id: &str, text: &str) -> StrategyBacktest {
        parse_backtest_csv(id, Path::new(id), text).expect("parse")
    }

    #[test]
    fn joins_by_date_not_position() {
        let a = bt(
            "A",
            "Date,Return\n2024-01-02,0.01\n2024-01-03,0.02\n2024-01-04,0.03\n2024-01-05,0.04\n",
        );
        // B is missing 01-03 and has an extra 01-08, newest first.
        let b = bt(
            "B",
            "Date,Return\n2024-01-08,0.9\n2024-01-05,0.4\n2024-01-04,0.3\n2024-01-02,0.1\n",
        );
        let al = align(&[&a, &b]).expect("align");
        assert_eq!(al.n_days(), 3);
        assert_eq!(al.returns.column(0).to_vec(), vec![0.01, 0.03, 0.04]);
        assert_eq!(al.returns.column(1).to_vec(), vec![0.1, 0.3, 0.4]);
        let w = al.window();
        assert_eq!(w.first, NaiveDate::from_ymd_opt(2024, 1, 2).expect("date"));
        assert_eq!(w.last, NaiveDate::from_ymd_opt(2024, 1, 5).expect("date"));
        assert_eq!(w.count, 3);
    }

    #[test]
    fn errors() {
        let a = bt("A", "Date,Return\n2024-01-02,0.01\n2024-01-03,0.02\n");
        let b = bt("B", "Date,Return\n2025-01-02,0.01\n2025-01-03,0.02\n");
        assert_eq!(align(&[]), Err(AlignError::Empty));
        assert_eq!(align(&[&a, &b]), Err(AlignError::NoCommonDates));
        assert_eq!(
            align(&[&a, &a]),
            Err(AlignError::DuplicateStrategy("A".into()))
        );
    }
}
