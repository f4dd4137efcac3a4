//! Parsing of the developers' backtest CSVs and the per-strategy statistics
//! stored in the `strategy_backtest_data` collection.
//!
//! # Accepted CSV layout
//!
//! The first row is a header. Header names are matched after trimming,
//! lower-casing and collapsing `_`/`-` to spaces:
//!
//! | column            | accepted header names                                            | unit            |
//! |-------------------|------------------------------------------------------------------|-----------------|
//! | date (required)   | `Date`                                                           | `YYYY-MM-DD` (a trailing time such as `YYYY-MM-DD HH:MM:SS` or `YYYY-MM-DDTHH:MM:SS` is accepted and ignored) |
//! | return (required) | any header containing `%`, `pct` or `percent` **and** `return`, e.g. `Daily Returns (%)`, `Return Pct` | **percent**: `0.57` means +0.57 % and is stored as `0.0057` |
//! | return (required) | exactly `Daily Returns`, `Daily Return`, `Returns` or `Return`    | **decimal**: `0.0057` means +0.57 % and is stored unchanged |
//! | margin (optional) | `Margin`, `Margin Per Unit`, `Margin Required`                    | currency per contract/unit |
//!
//! Exactly one return column must be present (two candidate return columns
//! are ambiguous and rejected). Any other column is ignored so that
//! developers can leave e.g. a cumulative-P&L column in the file.
//!
//! Rows may be in any order (some fixtures are newest-first); they are sorted
//! by date ascending. Duplicate dates, non-finite values (`NaN`, `inf`),
//! unparseable dates/numbers, and rows with the wrong number of fields are
//! rejected with an error that names the file and the 1-based line number
//! (line 1 is the header). Empty margin cells are allowed and skipped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// Trading days per year used for annualising daily statistics.
pub const TRADING_DAYS_PER_YEAR: f64 = 252.0;

/// Everything that can go wrong turning a developer's CSV into a
/// [`StrategyBacktest`]. Every variant carries the file (or source name) so
/// that an operator can fix the upload without guessing.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    /// The file or directory could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// File or directory being read.
        path: PathBuf,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// The header row is missing or does not name the required columns.
    #[error("{path}: line 1: bad header: {message}")]
    Header {
        /// Source file.
        path: PathBuf,
        /// What is wrong with the header.
        message: String,
    },
    /// A data row could not be parsed (bad date, bad number, wrong field count).
    #[error("{path}: line {line}: {message}")]
    Row {
        /// Source file.
        path: PathBuf,
        /// 1-based line number in the file (header is line 1).
        line: u64,
        /// What is wrong with the row.
        message: String,
    },
    /// A return or margin value parsed to NaN or ±infinity.
    #[error("{path}: line {line}: non-finite value {value:?} in column {column:?}")]
    NonFinite {
        /// Source file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Column header of the offending cell.
        column: String,
        /// Raw cell text.
        value: String,
    },
    /// The same date appears twice; the series would be ambiguous.
    #[error("{path}: line {line}: duplicate date {date} (first seen on line {first_line})")]
    DuplicateDate {
        /// Source file.
        path: PathBuf,
        /// 1-based line number of the second occurrence.
        line: u64,
        /// 1-based line number of the first occurrence.
        first_line: u64,
        /// The repeated date.
        date: NaiveDate,
    },
    /// Fewer than two observations: volatility (ddof 1) is undefined.
    #[error("{path}: need at least 2 data rows, found {rows}")]
    TooShort {
        /// Source file.
        path: PathBuf,
        /// Number of data rows found.
        rows: usize,
    },
    /// The file name has no usable stem to use as the strategy id.
    #[error("{path}: cannot derive a strategy id from the file name")]
    BadFileName {
        /// Offending path.
        path: PathBuf,
    },
}

/// Summary statistics of one strategy's daily return series, mirroring the
/// fields of a `strategy_backtest_data` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BacktestStats {
    /// First date of the series.
    pub start_date: NaiveDate,
    /// Last date of the series.
    pub end_date: NaiveDate,
    /// Number of daily observations (rows), not calendar days.
    pub total_days: usize,
    /// Arithmetic mean of the decimal daily returns.
    pub mean_return_daily: f64,
    /// Sample standard deviation (ddof = 1) of the decimal daily returns.
    pub volatility_daily: f64,
    /// `mean / volatility` with a zero risk-free rate; `None` if volatility is 0.
    pub sharpe_daily: Option<f64>,
    /// `sharpe_daily × √252`; `None` if volatility is 0.
    pub sharpe_annual: Option<f64>,
    /// Maximum drawdown of the compounded equity curve as a positive fraction
    /// of the running peak; see [`max_drawdown`].
    pub max_drawdown: f64,
    /// Fraction of days with a strictly positive return (0..=1).
    pub win_rate: f64,
}

/// One strategy's parsed backtest: the aligned date/return series, the
/// optional margin, and its statistics. This is the in-memory form of a
/// `strategy_backtest_data` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyBacktest {
    /// Strategy id, taken from the CSV file stem (`SPX_1-D_Opt.csv` → `SPX_1-D_Opt`).
    pub strategy_id: String,
    /// Dates in strictly ascending order; `dates[i]` is the day of `daily_returns[i]`.
    pub dates: Vec<NaiveDate>,
    /// Decimal daily returns (0.57 % → 0.0057).
    pub daily_returns: Vec<f64>,
    /// Margin per contract/unit: the largest value in the margin column
    /// (conservative for sizing), or `None` if there is no margin column or
    /// it is entirely blank.
    pub margin_per_unit: Option<f64>,
    /// Derived statistics.
    pub stats: BacktestStats,
}

/// How the return column's numbers are to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnUnit {
    /// `0.57` means +0.57 % (divided by 100 on load).
    Percent,
    /// `0.0057` means +0.57 % (kept as is).
    Decimal,
}

fn normalise_header(h: &str) -> String {
    let lowered = h.trim().trim_start_matches('\u{feff}').to_lowercase();
    let replaced: String = lowered
        .chars()
        .map(|c| if c == '_' || c == '-' { ' ' } else { c })
        .collect();
    replaced.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Classify a header as a return column, and in which unit. See the module
/// docs for the exact rule.
pub fn classify_return_header(header: &str) -> Option<ReturnUnit> {
    let h = normalise_header(header);
    if h.contains("return") && (h.contains('%') || h.contains("pct") || h.contains("percent")) {
        return Some(ReturnUnit::Percent);
    }
    match h.as_str() {
        "daily returns" | "daily return" | "returns" | "return" => Some(ReturnUnit::Decimal),
        _ => None,
    }
}

fn is_margin_header(header: &str) -> bool {
    matches!(
        normalise_header(header).as_str(),
        "margin" | "margin per unit" | "margin required"
    )
}

fn parse_date(s: &str) -> Option<NaiveDate> {
    let s = s.trim();
    let head = s.get(..10).unwrap_or(s);
    // Four-digit years only: chrono's %Y reads `16-01-04` as the year 16.
    if head.len() != 10 || !head.as_bytes()[..4].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let rest = s.get(10..).unwrap_or("");
    if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('T')) {
        return None;
    }
    NaiveDate::parse_from_str(head, "%Y-%m-%d").ok()
}

struct Columns {
    date: usize,
    ret: usize,
    ret_name: String,
    unit: ReturnUnit,
    margin: Option<(usize, String)>,
}

fn find_columns(path: &Path, headers: &csv::StringRecord) -> Result<Columns, BacktestError> {
    let header_err = |message: String| BacktestError::Header {
        path: path.to_path_buf(),
        message,
    };
    let mut date = None;
    let mut ret: Option<(usize, String, ReturnUnit)> = None;
    let mut margin = None;
    for (i, h) in headers.iter().enumerate() {
        if normalise_header(h) == "date" {
            if date.is_some() {
                return Err(header_err("two `Date` columns".into()));
            }
            date = Some(i);
        } else if let Some(unit) = classify_return_header(h) {
            if let Some((_, prev, _)) = &ret {
                return Err(header_err(format!(
                    "ambiguous return columns {prev:?} and {h:?}"
                )));
            }
            ret = Some((i, h.trim().to_string(), unit));
        } else if is_margin_header(h) {
            if margin.is_some() {
                return Err(header_err("two margin columns".into()));
            }
            margin = Some((i, h.trim().to_string()));
        }
    }
    let date = date.ok_or_else(|| header_err("missing `Date` column".into()))?;
    let (ret, ret_name, unit) = ret.ok_or_else(|| {
        header_err(
            "missing return column (expected e.g. `Daily Returns (%)` or `Daily Returns`)".into(),
        )
    })?;
    Ok(Columns {
        date,
        ret,
        ret_name,
        unit,
        margin,
    })
}

fn parse_finite(path: &Path, line: u64, column: &str, raw: &str) -> Result<f64, BacktestError> {
    let v: f64 = raw.trim().parse().map_err(|_| BacktestError::Row {
        path: path.to_path_buf(),
        line,
        message: format!("cannot parse {raw:?} in column {column:?} as a number"),
    })?;
    if !v.is_finite() {
        return Err(BacktestError::NonFinite {
            path: path.to_path_buf(),
            line,
            column: column.to_string(),
            value: raw.to_string(),
        });
    }
    Ok(v)
}

/// Parse CSV text that came from `source` (used only in error messages) into
/// a [`StrategyBacktest`] with the given id. Split from [`load_backtest_csv`]
/// so callers holding an upload in memory need no temporary file.
pub fn parse_backtest_csv(
    strategy_id: &str,
    source: &Path,
    text: &str,
) -> Result<StrategyBacktest, BacktestError> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let headers = rdr
        .headers()
        .map_err(|e| BacktestError::Header {
            path: source.to_path_buf(),
            message: e.to_string(),
        })?
        .clone();
    let cols = find_columns(source, &headers)?;
    // Divide (not multiply by 0.01) so 0.13 % becomes exactly the f64 nearest 0.0013.
    let divisor = match cols.unit {
        ReturnUnit::Percent => 100.0,
        ReturnUnit::Decimal => 1.0,
    };

    let mut rows: Vec<(NaiveDate, f64)> = Vec::new();
    let mut seen: HashMap<NaiveDate, u64> = HashMap::new();
    let mut margin_max: Option<f64> = None;
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            BacktestError::Row {
                path: source.to_path_buf(),
                line,
                message: e.to_string(),
            }
        })?;
        let line = rec.position().map(|p| p.line()).unwrap_or(0);
        let field = |i: usize| rec.get(i).unwrap_or("");
        let raw_date = field(cols.date);
        let date = parse_date(raw_date).ok_or_else(|| BacktestError::Row {
            path: source.to_path_buf(),
            line,
            message: format!("cannot parse date {raw_date:?} (expected YYYY-MM-DD)"),
        })?;
        let ret = parse_finite(source, line, &cols.ret_name, field(cols.ret))? / divisor;
        // A day cannot lose more than everything, and a decimal column with
        // a move of 100 % or more is almost surely percent under a header
        // that does not say so: refuse rather than read it 100x too large.
        if ret <= -1.0 || (divisor == 1.0 && ret.abs() >= 1.0) {
            return Err(BacktestError::Row {
                path: source.to_path_buf(),
                line,
                message: format!(
                    "daily return {ret} (as a decimal fraction) is implausible; a column in percent must say so in its header, e.g. `Daily Returns (%)`"
                ),
            });
        }
        if let Some((mi, mname)) = &cols.margin {
            let raw = field(*mi);
            if !raw.trim().is_empty() {
                let m = parse_finite(source, line, mname, raw)?;
                margin_max = Some(margin_max.map_or(m, |prev: f64| prev.max(m)));
            }
        }
        if let Some(first_line) = seen.insert(date, line) {
            return Err(BacktestError::DuplicateDate {
                path: source.to_path_buf(),
                line,
                first_line,
                date,
            });
        }
        rows.push((date, ret));
    }
    if rows.len() < 2 {
        return Err(BacktestError::TooShort {
            path: source.to_path_buf(),
            rows: rows.len(),
        });
    }
    rows.sort_by_key(|(d, _)| *d);
    let (dates, daily_returns): (Vec<NaiveDate>, Vec<f64>) = rows.into_iter().unzip();
    let stats = compute_stats(&dates, &daily_returns).ok_or_else(|| BacktestError::TooShort {
        path: source.to_path_buf(),
        rows: dates.len(),
    })?;
    Ok(StrategyBacktest {
        strategy_id: strategy_id.to_string(),
        dates,
        daily_returns,
        margin_per_unit: margin_max,
        stats,
    })
}

/// Strategy id of a backtest file: its file stem (`SPX_1-D_Opt.csv` → `SPX_1-D_Opt`).
pub fn strategy_id_from_path(path: &Path) -> Result<String, BacktestError> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| BacktestError::BadFileName {
            path: path.to_path_buf(),
        })
}

/// Read and parse one backtest CSV; the strategy id is the file stem.
pub fn load_backtest_csv(path: &Path) -> Result<StrategyBacktest, BacktestError> {
    let id = strategy_id_from_path(path)?;
    let text = std::fs::read_to_string(path).map_err(|source| BacktestError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_backtest_csv(&id, path, &text)
}

/// Load every `*.csv` (case-insensitive extension) directly inside `dir`,
/// sorted by strategy id so the result is deterministic. Fails on the first
/// bad file: a half-loaded universe must not be optimised silently.
pub fn load_backtest_dir(dir: &Path) -> Result<Vec<StrategyBacktest>, BacktestError> {
    let io_err = |source| BacktestError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let p = entry.map_err(io_err)?.path();
        let is_csv = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        if is_csv && p.is_file() {
            paths.push(p);
        }
    }
    paths.sort();
    let mut out = paths
        .iter()
        .map(|p| load_backtest_csv(p))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort_by(|a, b| a.strategy_id.cmp(&b.strategy_id));
    Ok(out)
}

/// Arithmetic mean; `None` for an empty slice.
pub fn mean(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        None
    } else {
        Some(xs.iter().sum::<f64>() / xs.len() as f64)
    }
}

/// Sample standard deviation (ddof = 1); `None` for fewer than 2 values.
pub fn sample_std(xs: &[f64]) -> Option<f64> {
    if xs.len() < 2 {
        return None;
    }
    let m = mean(xs)?;
    let ss: f64 = xs.iter().map(|x| (x - m) * (x - m)).sum();
    Some((ss / (xs.len() - 1) as f64).sqrt())
}

/// Maximum drawdown of the compounded equity curve, as a positive fraction.
///
/// Equity starts at `E_0 = 1` and compounds: `E_t = E_{t-1} · (1 + r_t)`.
/// The running peak `P_t = max(E_0, …, E_t)` includes the starting capital,
/// so a loss on day one already counts. Drawdown `D_t = (P_t − E_t) / P_t`
/// and the result is `max_t D_t` ∈ [0, 1] (0 = never below a previous peak,
/// 0.25 = lost 25 % from a peak). A return ≤ −100 % gives 1.
pub fn max_drawdown(returns: &[f64]) -> f64 {
    let mut equity = 1.0_f64;
    let mut peak = 1.0_f64;
    let mut mdd = 0.0_f64;
    for r in returns {
        equity *= 1.0 + r;
        if equity <= 0.0 {
            return 1.0;
        }
        peak = peak.max(equity);
        mdd = mdd.max((peak - equity) / peak);
    }
    mdd
}

/// Statistics of a date-aligned decimal return series; `None` if there are
/// fewer than 2 observations or the slices differ in length.
pub fn compute_stats(dates: &[NaiveDate], returns: &[f64]) -> Option<BacktestStats> {
    if dates.len() != returns.len() || returns.len() < 2 {
        return None;
    }
    let mean_return_daily = mean(returns)?;
    let volatility_daily = sample_std(returns)?;
    let sharpe_daily = (volatility_daily > 0.0).then(|| mean_return_daily / volatility_daily);
    let wins = returns.iter().filter(|r| **r > 0.0).count();
    Some(BacktestStats {
        start_date: *dates.first()?,
        end_date: *dates.last()?,
        total_days: returns.len(),
        mean_return_daily,
        volatility_daily,
        sharpe_daily,
        sharpe_annual: sharpe_daily.map(|s| s * TRADING_DAYS_PER_YEAR.sqrt()),
        max_drawdown: max_drawdown(returns),
        win_rate: wins as f64 / returns.len() as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_classification() {
        assert_eq!(
            classify_return_header("Daily Returns (%)"),
            Some(ReturnUnit::Percent)
        );
        assert_eq!(
            classify_return_header(" daily_returns_pct "),
            Some(ReturnUnit::Percent)
        );
        assert_eq!(
            classify_return_header("Daily Returns"),
            Some(ReturnUnit::Decimal)
        );
        assert_eq!(classify_return_header("Return"), Some(ReturnUnit::Decimal));
        assert_eq!(classify_return_header("Cumulative P&L"), None);
        assert!(is_margin_header("Margin Per Unit"));
        assert!(is_margin_header("margin_per_unit"));
    }

    #[test]
    fn date_formats() {
        let d = NaiveDate::from_ymd_opt(2024, 3, 1);
        assert_eq!(parse_date("2024-03-01"), d);
        assert_eq!(parse_date("2024-03-01 00:00:00"), d);
        assert_eq!(parse_date("2024-03-01T16:00:00"), d);
        assert_eq!(parse_date("2024-03-011"), None);
        assert_eq!(parse_date("03/01/2024"), None);
    }

    #[test]
    fn drawdown_counts_initial_capital() {
        assert_eq!(max_drawdown(&[0.1, 0.1]), 0.0);
        assert!((max_drawdown(&[-0.1]) - 0.1).abs() < 1e-15);
        // 1 → 1.5 → 0.75 → 1.5: 50 % drawdown from the 1.5 peak
        assert!((max_drawdown(&[0.5, -0.5, 1.0]) - 0.5).abs() < 1e-15);
        assert_eq!(max_drawdown(&[0.2, -1.0]), 1.0);
    }

    #[test]
    fn decimal_header_and_margin() {
        let text = "Date,Daily Returns,Margin\n2024-01-03,0.01,\n2024-01-02,-0.02,1500\n2024-01-04,0.0,2000.5\n";
        let bt = parse_backtest_csv("X", Path::new("mem.csv"), text).expect("parse");
        assert_eq!(bt.daily_returns, vec![-0.02, 0.01, 0.0]);
        assert_eq!(bt.margin_per_unit, Some(2000.5));
        assert_eq!(bt.stats.total_days, 3);
        assert!((bt.stats.win_rate - 1.0 / 3.0).abs() < 1e-15);
    }

    #[test]
    fn ambiguous_or_missing_columns() {
        let two = "Date,Daily Returns (%),Return\n2024-01-02,1,0.01\n";
        assert!(matches!(
            parse_backtest_csv("X", Path::new("a.csv"), two),
            Err(BacktestError::Header { .. })
        ));
        let none = "Date,PnL\n2024-01-02,1\n";
        let err = parse_backtest_csv("X", Path::new("a.csv"), none).expect_err("no return col");
        assert!(err.to_string().contains("a.csv: line 1"), "{err}");
    }
}
