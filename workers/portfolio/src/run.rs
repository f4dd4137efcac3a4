//! One optimisation run as `mtx optimize` performs it: pick an algorithm by
//! name, solve over the date-aligned returns, and return the allocation with
//! the algorithm-specific figures worth storing next to it.
//!
//! This is the only place that maps the CLI's algorithm names onto the
//! optimisers of [`crate::optimize`], so the run record, the report and the
//! tests all agree on what `max-sharpe` (etc.) means.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::align::AlignedReturns;
use crate::optimize::{
    hrp, max_cagr, max_sharpe, min_cvar, Allocation, CagrParams, Constraints, CvarParams,
    OptimizeError, ReturnMoments,
};

/// The allocation algorithms `mtx optimize --algorithm` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Maximum Sharpe ratio ([`max_sharpe()`]).
    MaxSharpe,
    /// Minimum historical CVaR ([`min_cvar()`]).
    MinCvar,
    /// Hierarchical risk parity ([`hrp()`]).
    Hrp,
    /// Maximum CAGR, optionally under a drawdown limit ([`max_cagr()`]).
    MaxCagr,
}

impl Algorithm {
    /// Every algorithm, in the order the CLI lists them.
    pub const ALL: &'static [Algorithm] = &[
        Algorithm::MaxSharpe,
        Algorithm::MinCvar,
        Algorithm::Hrp,
        Algorithm::MaxCagr,
    ];

    /// The CLI / run-record spelling (`max-sharpe`, `min-cvar`, `hrp`, `max-cagr`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::MaxSharpe => "max-sharpe",
            Algorithm::MinCvar => "min-cvar",
            Algorithm::Hrp => "hrp",
            Algorithm::MaxCagr => "max-cagr",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no [`Algorithm`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown algorithm {0:?} (expected one of: max-sharpe, min-cvar, hrp, max-cagr)")]
pub struct UnknownAlgorithm(pub String);

impl FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    /// Case-insensitive; `_` is accepted for `-` (`max_sharpe`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Algorithm::ALL
            .iter()
            .copied()
            .find(|a| a.as_str() == norm)
            .ok_or_else(|| UnknownAlgorithm(s.to_string()))
    }
}

/// Everything a run needs besides the returns.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunParams {
    /// Algorithm to use.
    pub algorithm: Algorithm,
    /// Leverage, per-strategy cap and daily risk-free rate.
    pub constraints: Constraints,
    /// Options of `min-cvar` (ignored by the others).
    pub cvar: CvarParams,
    /// Options of `max-cagr` (ignored by the others).
    pub cagr: CagrParams,
    /// Fewest common days a run may use (at least the number of strategies
    /// plus one is always required): fewer cannot estimate the covariance,
    /// and an optimiser would still "succeed" with meaningless weights.
    pub min_days: usize,
}

/// Default of [`RunParams::min_days`]: about three months of trading days.
pub const MIN_COMMON_DAYS: usize = 60;

impl RunParams {
    /// `algorithm` with the house defaults: 200 % leverage, 50 % cap, zero
    /// risk-free rate, CVaR 95 %, no drawdown limit.
    pub fn new(algorithm: Algorithm) -> Self {
        RunParams {
            algorithm,
            constraints: Constraints::default(),
            cvar: CvarParams::default(),
            cagr: CagrParams { max_drawdown: None },
            min_days: MIN_COMMON_DAYS,
        }
    }
}

/// Algorithm-specific figures stored with a run (`details` of the record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "algorithm", rename_all = "kebab-case")]
pub enum RunDetails {
    /// Nothing beyond the allocation.
    MaxSharpe,
    /// The CVaR figures of the chosen weights.
    MinCvar {
        /// Confidence level α.
        confidence: f64,
        /// Historical VaR (positive loss fraction of equity per day).
        var: f64,
        /// Historical CVaR (positive loss fraction of equity per day).
        cvar: f64,
    },
    /// The clustering behind the weights.
    Hrp {
        /// Strategy ids in dendrogram leaf order.
        leaf_order: Vec<String>,
        /// Strategies held at the cap.
        capped: Vec<String>,
    },
    /// Realised growth and drawdown of the chosen weights.
    MaxCagr {
        /// CAGR over the aligned history.
        cagr: f64,
        /// Maximum drawdown over the aligned history.
        max_drawdown: f64,
        /// The limit imposed, if any.
        max_drawdown_limit: Option<f64>,
    },
}

/// The outcome of [`run`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunOutcome {
    /// Weights, solver outcome and expected metrics.
    pub allocation: Allocation,
    /// Algorithm-specific figures.
    pub details: RunDetails,
}

/// Solve `params.algorithm` over `aligned` (with its precomputed `moments`).
pub fn run(
    aligned: &AlignedReturns,
    moments: &ReturnMoments,
    params: &RunParams,
) -> Result<RunOutcome, OptimizeError> {
    if moments.strategy_ids != aligned.strategy_ids {
        return Err(OptimizeError::InvalidInput(
            "moments were estimated from different strategies than the returns".into(),
        ));
    }
    let need = params.min_days.max(aligned.n_strategies() + 1);
    if aligned.n_days() < need {
        return Err(OptimizeError::InvalidInput(format!(
            "the common window of the {} strategies has {} days; at least {need} are needed (a new strategy with a short backtest shrinks everyone's window: leave it out, or lower --min-days)",
            aligned.n_strategies(),
            aligned.n_days()
        )));
    }
    let c = &params.constraints;
    Ok(match params.algorithm {
        Algorithm::MaxSharpe => RunOutcome {
            allocation: max_sharpe(moments, c)?,
            details: RunDetails::MaxSharpe,
        },
        Algorithm::MinCvar => {
            let r = min_cvar(aligned, c, &params.cvar)?;
            RunOutcome {
                allocation: r.allocation,
                details: RunDetails::MinCvar {
                    confidence: r.confidence,
                    var: r.var,
                    cvar: r.cvar,
                },
            }
        }
        Algorithm::Hrp => {
            let r = hrp(moments, c)?;
            RunOutcome {
                allocation: r.allocation,
                details: RunDetails::Hrp {
                    leaf_order: r.leaf_order,
                    capped: r.capped,
                },
            }
        }
        Algorithm::MaxCagr => {
            let r = max_cagr(aligned, c, &params.cagr)?;
            RunOutcome {
                allocation: r.allocation,
                details: RunDetails::MaxCagr {
                    cagr: r.cagr,
                    max_drawdown: r.max_drawdown,
                    max_drawdown_limit: r.max_drawdown_limit,
                },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.as_str().parse::<Algorithm>(), Ok(*a));
            assert_eq!(
                serde_json::to_value(a).ok(),
                Some(serde_json::json!(a.as_str()))
            );
        }
        assert_eq!("MAX_SHARPE".parse::<Algorithm>(), Ok(Algorithm::MaxSharpe));
        let e = "sharpe".parse::<Algorithm>().expect_err("unknown");
        assert!(e.to_string().contains("max-sharpe, min-cvar"), "{e}");
    }
}
