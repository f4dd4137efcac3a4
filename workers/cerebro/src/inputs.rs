//! The decision inputs as plain data: everything [`crate::decide()`] reads,
//! with no I/O behind it.
//!
//! The worker keeps one [`Inputs`] up to date from its KV watchers (strategy
//! configurations, the ACTIVE allocation, account states, the system config,
//! marks) and from its own order bookkeeping (entry records, margin
//! reservations), and passes it by reference to each decision.
//!
//! Strategy configurations are the shared
//! [`mtx_schemas::strategy::StrategyConfig`] (re-exported here): Cerebro reads
//! `status`, `account`, `risk_limits.max_position_size` (largest notional,
//! `quantity × price × multiplier`, the strategy may hold in one instrument
//! and direction, counting what it holds), `risk_limits.max_daily_loss`
//! (entries stop once today's P&L is at or below `−max_daily_loss`),
//! `expected_alpha` (slippage rule; falls back to the signal's metadata) and
//! `trading_mode` (recorded).
//!
//! Units: money, prices and quantities are [`Decimal`]. Fields named `*_pct`
//! are percents (`89.36` is 89.36 %); ratios without the suffix are plain
//! fractions (`0.30` is 30 %). Backtest returns are `f64` decimal daily
//! returns (statistics, not money).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use mtx_accounts::{InstrumentSpec, MarginModel, SymbolSpec};
use mtx_schemas::order::AccountState;
pub use mtx_schemas::strategy::{RiskLimits, StrategyConfig};
use mtx_schemas::{Decision, Direction, InstrumentType, OrderStatus};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The ACTIVE portfolio allocation (`portfolio_allocations`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAllocation {
    /// `allocation_id` of the document, recorded with each decision.
    #[serde(default)]
    pub allocation_id: String,
    /// Percent of account equity per strategy (`45.5` = 45.5 %); the sum may
    /// exceed 100.
    pub allocations: BTreeMap<String, Decimal>,
}

impl ActiveAllocation {
    /// The strategy's allocation in percent, if it has one.
    pub fn pct(&self, strategy_id: &str) -> Option<Decimal> {
        self.allocations.get(strategy_id).copied()
    }
}

/// Margin and notional approved by Cerebro but not yet visible in the
/// account state (orders in flight). The worker adds an approved decision's
/// [`crate::Decided::reservation`] here atomically and releases it once the
/// accounts stage reports the fill (or the order ends unfilled).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// Margin reserved.
    pub margin: Decimal,
    /// Gross notional reserved (counts toward MAX_LEVERAGE_GLOBAL).
    pub notional: Decimal,
}

impl Reservation {
    /// Component-wise sum; `None` on overflow.
    pub fn checked_add(self, other: Reservation) -> Option<Reservation> {
        Some(Reservation {
            margin: self.margin.checked_add(other.margin)?,
            notional: self.notional.checked_add(other.notional)?,
        })
    }
}

/// What Cerebro knows about one broker account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInputs {
    /// Latest snapshot from the accounts stage (equity, margin, positions per
    /// strategy, deployed capital per strategy, working orders).
    pub state: AccountState,
    /// Today's P&L per strategy: the worker copies the accounts stage's
    /// [`AccountState::strategy_pnl_today`] (realized today net of
    /// commissions plus open positions' unrealized P&L) when the state is of
    /// the decision's UTC day. Missing means zero.
    #[serde(default)]
    pub pnl_today: BTreeMap<String, Decimal>,
    /// Approved-but-not-yet-booked margin and notional per strategy.
    #[serde(default)]
    pub reserved: BTreeMap<String, Reservation>,
    /// Approved entries whose orders the account state does not show booked
    /// yet (the worker's reservation book for this account, this signal
    /// excluded).
    #[serde(default)]
    pub in_flight: usize,
    /// Most approved-but-unbooked entries the account may carry; an entry
    /// beyond it is rejected ([`crate::Reason::ReservationBacklog`]). `None`
    /// = no limit.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// Units the account's approved, unbooked entries will still add to
    /// positions (the worker fills in the deciding signal's strategy and
    /// instruments, that signal's own earlier entry excluded). TARGET_WEIGHT
    /// and the position-size limit count them as held, so two signals in
    /// the booking window do not both buy up to one target.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingUnits>,
}

/// Units of one instrument and direction a strategy's approved entries will
/// add once booked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingUnits {
    /// Strategy.
    pub strategy_id: String,
    /// Symbol.
    pub instrument: String,
    /// Direction of the position the entries open or add to.
    pub direction: Direction,
    /// Units not yet booked (positive).
    pub quantity: Decimal,
}

impl AccountInputs {
    /// An account with no P&L today and nothing reserved.
    pub fn new(state: AccountState) -> Self {
        AccountInputs {
            state,
            pnl_today: BTreeMap::new(),
            reserved: BTreeMap::new(),
            in_flight: 0,
            max_in_flight: None,
            pending: Vec::new(),
        }
    }

    /// Sum of all strategies' reservations; `None` on overflow.
    pub fn reserved_total(&self) -> Option<Reservation> {
        self.reserved
            .values()
            .try_fold(Reservation::default(), |acc, r| acc.checked_add(*r))
    }

    /// One strategy's reservation (zero when none).
    pub fn reserved_for(&self, strategy_id: &str) -> Reservation {
        self.reserved.get(strategy_id).copied().unwrap_or_default()
    }

    /// Capital (margin) the strategy's open positions tie up.
    pub fn deployed(&self, strategy_id: &str) -> Decimal {
        self.state
            .deployed_capital
            .get(strategy_id)
            .copied()
            .unwrap_or_default()
    }

    /// Today's P&L of the strategy (zero when unknown).
    pub fn pnl_today(&self, strategy_id: &str) -> Decimal {
        self.pnl_today.get(strategy_id).copied().unwrap_or_default()
    }

    /// Open quantity the strategy holds in `instrument` / `direction`.
    pub fn open_quantity(
        &self,
        strategy_id: &str,
        instrument: &str,
        direction: Direction,
    ) -> Decimal {
        let rows = self.state.open_positions.iter();
        sum_for(
            rows.map(|p| (&p.strategy_id, &p.instrument, p.direction, p.quantity)),
            (strategy_id, instrument, direction),
        )
    }

    /// Units the strategy's approved, unbooked entries will add in
    /// `instrument` / `direction`.
    pub fn pending_quantity(
        &self,
        strategy_id: &str,
        instrument: &str,
        direction: Direction,
    ) -> Decimal {
        let rows = self.pending.iter();
        sum_for(
            rows.map(|p| (&p.strategy_id, &p.instrument, p.direction, p.quantity)),
            (strategy_id, instrument, direction),
        )
    }
}

/// Σ quantity of the (strategy, instrument, direction, quantity) rows of one
/// position.
fn sum_for<'a>(
    rows: impl Iterator<Item = (&'a String, &'a String, Direction, Decimal)>,
    (strategy_id, instrument, direction): (&str, &str, Direction),
) -> Decimal {
    rows.filter(|(s, i, d, _)| *s == strategy_id && *i == instrument && *d == direction)
        .map(|(_, _, _, q)| q)
        .sum()
}

/// Global switches (the system config KV entry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SystemConfig {
    /// `TRADING_ENABLED`: `false` is the kill switch (entries rejected, exits
    /// and cancels still go through).
    #[serde(alias = "TRADING_ENABLED")]
    pub trading_enabled: bool,
    /// `MAX_LEVERAGE_GLOBAL`: gross notional of all positions (plus reserved
    /// and the new order) over account equity, e.g. `4` = 400 %.
    #[serde(alias = "MAX_LEVERAGE_GLOBAL")]
    pub max_leverage_global: Decimal,
    /// Cap on `margin used / equity` after the trade, in percent.
    #[serde(alias = "MAX_MARGIN_UTILIZATION_PCT")]
    pub max_margin_utilization_pct: Decimal,
    /// Optional cap on the portfolio's historical CVaR 95 % after the trade,
    /// in percent of equity (one-day loss).
    #[serde(alias = "CVAR_LIMIT_PCT")]
    pub cvar_limit_pct: Option<f64>,
    /// Reject an entry when the alpha estimated lost to delay and drift
    /// exceeds this fraction of its expected alpha (`0.30`).
    pub slippage_alpha_fraction: Decimal,
    /// Seconds over which a signal's alpha decays to zero (linear model; see
    /// [`crate::risk::slippage`]). Default one day.
    pub alpha_horizon_secs: i64,
    /// A mark older than this (seconds before `now`) is ignored.
    pub mark_max_age_secs: i64,
    /// CVaR confidence level (`0.95`).
    pub cvar_confidence: f64,
    /// Fewest common backtest days for a CVaR estimate; fewer and CVaR is not
    /// evaluated (recorded as such).
    pub cvar_min_observations: usize,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig {
            trading_enabled: true,
            max_leverage_global: Decimal::from(4),
            max_margin_utilization_pct: Decimal::from(80),
            cvar_limit_pct: None,
            slippage_alpha_fraction: Decimal::new(30, 2),
            alpha_horizon_secs: 86_400,
            mark_max_age_secs: 900,
            cvar_confidence: 0.95,
            cvar_min_observations: 20,
        }
    }
}

/// How an instrument's margin is computed (serializable mirror of
/// [`MarginModel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MarginRule {
    /// Fraction of notional at the pricing price (`0.25` = 25 %).
    PercentOfNotional(Decimal),
    /// Fixed amount per contract / unit (futures initial margin).
    PerContract(Decimal),
}

impl From<MarginRule> for MarginModel {
    fn from(r: MarginRule) -> Self {
        match r {
            MarginRule::PercentOfNotional(f) => MarginModel::PercentOfNotional(f),
            MarginRule::PerContract(a) => MarginModel::PerContract(a),
        }
    }
}

/// Configuration of one symbol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstrumentConfig {
    /// Value of one point per contract (GC 100, HG 25000, ES 50; 1 for cash
    /// instruments).
    pub multiplier: Decimal,
    /// Smallest tradable increment (1 share / contract, `0.00000001` BTC).
    pub lot_size: Decimal,
    /// Margin rule; `None` uses the class rate.
    #[serde(default)]
    pub margin: Option<MarginRule>,
    /// The asset class the entry describes (`FUTURE` for a futures root);
    /// a leg of the same symbol in another class gets its class defaults:
    /// the stock `CL` (Colgate-Palmolive) is not the crude future `CL`.
    /// `None`: every class.
    #[serde(default)]
    pub instrument_type: Option<InstrumentType>,
}

/// An instrument's resolved multiplier, lot size and margin model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedInstrument {
    /// Contract multiplier.
    pub multiplier: Decimal,
    /// Lot size (quantities are rounded toward zero to a multiple of it).
    pub lot_size: Decimal,
    /// Multiplier and margin model, shared with the accounts ledger.
    pub spec: InstrumentSpec,
}

/// Instrument specifications: per-symbol configuration over per-class
/// defaults.
///
/// Class defaults: STOCK / ETF lot 1, multiplier 1, Reg-T 25 % of notional;
/// FOREX lot 1 unit, 2 % (50:1); CRYPTO lot `0.00000001`, 50 %; OPTION lot 1
/// contract, multiplier 100, 100 % of premium (long premium is paid in full).
/// FUTURE has **no** class default: a future is only sized when its symbol
/// (the root, e.g. `GC`) is configured, so no margin is ever computed without
/// its real multiplier. Class margin rates can be overridden in
/// `class_margin`; per-symbol `margin` wins over both.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstrumentSpecs {
    /// Per-symbol configuration, keyed by the standardized symbol (futures by
    /// root).
    #[serde(default)]
    pub symbols: BTreeMap<String, InstrumentConfig>,
    /// Percent-of-notional margin fraction per class, overriding the defaults.
    #[serde(default)]
    pub class_margin: BTreeMap<InstrumentType, Decimal>,
}

impl InstrumentSpecs {
    /// The built-in symbol table: common futures with their exchange
    /// multipliers and indicative per-contract initial margins (ES 50 /
    /// 22,000; MES 5 / 2,200; NQ 20 / 32,000; MNQ 2 / 3,200; GC 100 / 16,500;
    /// MGC 10 / 1,650; SI 5,000 / 20,000; HG 25,000 / 8,000; CL 1,000 /
    /// 6,000; ZN 1,000 / 2,500) and crypto lot sizes (BTC, ETH 8 decimals).
    /// Margins are placeholders until the exchange's current figures are
    /// configured.
    pub fn with_defaults() -> Self {
        let fut = |mult: i64, margin: i64| InstrumentConfig {
            multiplier: Decimal::from(mult),
            lot_size: Decimal::ONE,
            margin: Some(MarginRule::PerContract(Decimal::from(margin))),
            instrument_type: Some(InstrumentType::Future),
        };
        let coin = InstrumentConfig {
            multiplier: Decimal::ONE,
            lot_size: Decimal::new(1, 8),
            margin: None,
            instrument_type: Some(InstrumentType::Crypto),
        };
        let symbols = [
            ("ES", fut(50, 22_000)),
            ("MES", fut(5, 2_200)),
            ("NQ", fut(20, 32_000)),
            ("MNQ", fut(2, 3_200)),
            ("GC", fut(100, 16_500)),
            ("MGC", fut(10, 1_650)),
            ("SI", fut(5_000, 20_000)),
            ("HG", fut(25_000, 8_000)),
            ("CL", fut(1_000, 6_000)),
            ("ZN", fut(1_000, 2_500)),
            ("BTC", coin.clone()),
            ("ETH", coin),
        ]
        .into_iter()
        .map(|(s, c)| (s.to_string(), c))
        .collect();
        InstrumentSpecs {
            symbols,
            class_margin: BTreeMap::new(),
        }
    }

    fn class_lot(instrument_type: InstrumentType) -> Decimal {
        match instrument_type {
            InstrumentType::Crypto => Decimal::new(1, 8),
            _ => Decimal::ONE,
        }
    }

    fn class_multiplier(instrument_type: InstrumentType) -> Option<Decimal> {
        match instrument_type {
            InstrumentType::Future => None,
            InstrumentType::Option => Some(Decimal::ONE_HUNDRED),
            _ => Some(Decimal::ONE),
        }
    }

    fn class_model(&self, instrument_type: InstrumentType, multiplier: Decimal) -> MarginModel {
        match self.class_margin.get(&instrument_type) {
            Some(f) => MarginModel::PercentOfNotional(*f),
            None => InstrumentSpec::default_for(instrument_type, multiplier).margin,
        }
    }

    /// Multiplier, lot size and margin of `symbol` traded as `instrument_type`;
    /// `None` for an unconfigured future or a non-positive multiplier / lot.
    pub fn resolve(
        &self,
        symbol: &str,
        instrument_type: InstrumentType,
    ) -> Option<ResolvedInstrument> {
        let configured = self
            .symbols
            .get(symbol)
            .filter(|c| c.instrument_type.is_none_or(|t| t == instrument_type));
        let (multiplier, lot_size, model) = match configured {
            Some(c) => (
                c.multiplier,
                c.lot_size,
                match c.margin {
                    Some(rule) => rule.into(),
                    None => self.class_model(instrument_type, c.multiplier),
                },
            ),
            None => {
                let m = Self::class_multiplier(instrument_type)?;
                (
                    m,
                    Self::class_lot(instrument_type),
                    self.class_model(instrument_type, m),
                )
            }
        };
        if multiplier <= Decimal::ZERO || lot_size <= Decimal::ZERO {
            return None;
        }
        Some(ResolvedInstrument {
            multiplier,
            lot_size,
            spec: InstrumentSpec {
                multiplier,
                margin: model,
            },
        })
    }

    /// Multiplier of a held position's symbol (positions carry no asset
    /// class): the configured one, else 1.
    pub fn position_multiplier(&self, symbol: &str) -> Decimal {
        self.symbols
            .get(symbol)
            .map(|c| c.multiplier)
            .unwrap_or(Decimal::ONE)
    }

    /// The per-symbol specs in the accounts ledger's form
    /// (`LedgerConfig::instruments`), so both stages compute the same margin.
    pub fn ledger_specs(&self) -> BTreeMap<String, SymbolSpec> {
        self.symbols
            .iter()
            .filter_map(|(s, c)| {
                let margin = c.margin?;
                Some((
                    s.clone(),
                    SymbolSpec {
                        instrument_type: c.instrument_type,
                        spec: InstrumentSpec {
                            multiplier: c.multiplier,
                            margin: margin.into(),
                        },
                    },
                ))
            })
            .collect()
    }
}

/// Latest market price of an instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Price.
    pub price: Decimal,
    /// When it was observed.
    pub at: DateTime<Utc>,
}

/// One leg of an entry Cerebro approved, with its fill progress — what exits
/// and cancels resolve against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryLeg {
    /// Leg index in the entry signal.
    pub leg: u32,
    /// Order id of the entry order (`ids::order_id(entry_signal_id, leg)`).
    pub order_id: String,
    /// Symbol.
    pub instrument: String,
    /// Asset class.
    pub instrument_type: InstrumentType,
    /// Direction of the position it opened.
    pub direction: Direction,
    /// The sender's quantity on the entry leg (sender units).
    pub sender_quantity: Decimal,
    /// Quantity Cerebro ordered.
    pub ordered_quantity: Decimal,
    /// Quantity filled so far.
    pub filled_quantity: Decimal,
    /// Quantity already closed, or being closed by approved exit orders.
    #[serde(default)]
    pub closed_quantity: Decimal,
    /// Sender quantity consumed by earlier exits of this entry (sender units).
    #[serde(default)]
    pub sender_quantity_exited: Decimal,
    /// Latest status of the entry order.
    pub status: OrderStatus,
}

impl EntryLeg {
    /// Filled and not yet closed.
    pub fn open_quantity(&self) -> Decimal {
        (self.filled_quantity - self.closed_quantity).max(Decimal::ZERO)
    }

    /// The entry order can still fill.
    pub fn is_working(&self) -> bool {
        !self.status.is_terminal()
    }
}

/// Cerebro's record of one entry signal it decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// The entry's signal id.
    pub signal_id: String,
    /// Its strategy.
    pub strategy_id: String,
    /// Account its orders went to.
    pub account: String,
    /// How it was decided (a REJECTED entry opened nothing).
    pub decision: Decision,
    /// Its legs (empty when rejected).
    pub legs: Vec<EntryLeg>,
}

/// One strategy's daily backtest returns (`strategy_backtest_data`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReturnSeries {
    /// Strategy id.
    pub strategy_id: String,
    /// Dates, one per return.
    pub dates: Vec<NaiveDate>,
    /// Decimal daily returns on the strategy's capital.
    pub daily_returns: Vec<f64>,
}

impl ReturnSeries {
    /// Check one series on its own: equal lengths, finite returns, no date
    /// twice.
    pub fn check(&self) -> Result<(), ReturnsError> {
        if self.dates.len() != self.daily_returns.len() {
            return Err(ReturnsError::LengthMismatch(self.strategy_id.clone()));
        }
        let mut seen = BTreeSet::new();
        for (d, r) in self.dates.iter().zip(&self.daily_returns) {
            if !r.is_finite() {
                return Err(ReturnsError::NonFinite(self.strategy_id.clone(), *d));
            }
            if !seen.insert(*d) {
                return Err(ReturnsError::DuplicateDate(self.strategy_id.clone(), *d));
            }
        }
        Ok(())
    }
}

/// Why backtest series cannot be tabled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReturnsError {
    /// Dates and returns differ in length.
    #[error("strategy {0}: dates and returns differ in length")]
    LengthMismatch(String),
    /// A return is NaN or infinite.
    #[error("strategy {0}: non-finite return on {1}")]
    NonFinite(String, NaiveDate),
    /// A date appears twice in one series.
    #[error("strategy {0}: duplicate date {1}")]
    DuplicateDate(String, NaiveDate),
    /// A strategy appears twice.
    #[error("strategy {0} given twice")]
    DuplicateStrategy(String),
}

/// Backtest returns of all strategies on the union of their dates (a missing
/// day is `NaN`), built once when the backtest data changes. CVaR joins the
/// columns it needs on their common days at decision time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReturnsTable {
    dates: Vec<NaiveDate>,
    index: BTreeMap<String, usize>,
    columns: Vec<Vec<f64>>,
}

impl ReturnsTable {
    /// Table the given series.
    pub fn new(series: impl IntoIterator<Item = ReturnSeries>) -> Result<Self, ReturnsError> {
        let series: Vec<ReturnSeries> = series.into_iter().collect();
        let mut all = BTreeSet::new();
        for s in &series {
            if s.dates.len() != s.daily_returns.len() {
                return Err(ReturnsError::LengthMismatch(s.strategy_id.clone()));
            }
            all.extend(s.dates.iter().copied());
        }
        let dates: Vec<NaiveDate> = all.into_iter().collect();
        let mut index = BTreeMap::new();
        let mut columns = Vec::with_capacity(series.len());
        for s in series {
            if index.contains_key(&s.strategy_id) {
                return Err(ReturnsError::DuplicateStrategy(s.strategy_id));
            }
            let mut col = vec![f64::NAN; dates.len()];
            for (d, r) in s.dates.iter().zip(&s.daily_returns) {
                if !r.is_finite() {
                    return Err(ReturnsError::NonFinite(s.strategy_id.clone(), *d));
                }
                // Every date of every series is in `dates`.
                let row = dates.binary_search(d).unwrap_or_default();
                if !col[row].is_nan() {
                    return Err(ReturnsError::DuplicateDate(s.strategy_id.clone(), *d));
                }
                col[row] = *r;
            }
            index.insert(s.strategy_id, columns.len());
            columns.push(col);
        }
        Ok(ReturnsTable {
            dates,
            index,
            columns,
        })
    }

    /// The union of all dates, ascending.
    pub fn dates(&self) -> &[NaiveDate] {
        &self.dates
    }

    /// A strategy's returns aligned to [`ReturnsTable::dates`] (`NaN` = no data).
    pub fn column(&self, strategy_id: &str) -> Option<&[f64]> {
        self.index
            .get(strategy_id)
            .and_then(|i| self.columns.get(*i))
            .map(Vec::as_slice)
    }

    /// Whether the strategy has backtest data.
    pub fn contains(&self, strategy_id: &str) -> bool {
        self.index.contains_key(strategy_id)
    }

    /// Strategies with backtest data.
    pub fn strategies(&self) -> impl Iterator<Item = &str> + '_ {
        self.index.keys().map(String::as_str)
    }
}

/// Everything a decision reads. The worker mutates it as KV updates arrive;
/// `decide` only borrows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inputs {
    /// Strategy configurations by strategy id.
    pub strategies: BTreeMap<String, StrategyConfig>,
    /// The ACTIVE allocation (`None` = no allocation: no entries).
    pub allocation: Option<ActiveAllocation>,
    /// Account states by account name.
    pub accounts: BTreeMap<String, AccountInputs>,
    /// Global switches and limits.
    pub system: SystemConfig,
    /// Instrument specifications.
    pub instruments: InstrumentSpecs,
    /// Latest marks by symbol.
    pub marks: BTreeMap<String, Mark>,
    /// Entries Cerebro decided, by signal id.
    pub entries: BTreeMap<String, EntryRecord>,
    /// Strategies' backtest returns (`None` = CVaR not evaluated). Shared:
    /// the worker loads the table once per refresh and hands every decision
    /// the same copy.
    pub returns: Option<Arc<ReturnsTable>>,
    /// Why `returns` is `None` (backtest store unreachable, not loaded yet);
    /// recorded as [`crate::CvarSkip::Unavailable`].
    pub returns_unavailable: Option<String>,
    /// Decision time.
    pub now: DateTime<Utc>,
}

impl Inputs {
    /// A fresh mark of `symbol` (not older than `mark_max_age_secs`).
    pub fn fresh_mark(&self, symbol: &str) -> Option<Mark> {
        let m = self.marks.get(symbol)?;
        // Exact, not in whole seconds: 30.9 s is older than 30.
        let age = self.now.signed_duration_since(m.at);
        let fresh = chrono::Duration::try_seconds(self.system.mark_max_age_secs)
            .is_some_and(|max| age <= max);
        (fresh && m.price > Decimal::ZERO).then_some(*m)
    }
}

/// Per-call options of [`crate::decide_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecideOptions {
    /// The worker has waited long enough for an unknown / unfilled entry: stop
    /// deferring exits and cancels (close against the strategy's position,
    /// cancel the entry's working orders).
    pub entry_wait_expired: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn system_config_reads_kv_spellings_with_defaults() {
        let c: SystemConfig = serde_json::from_value(
            serde_json::json!({"TRADING_ENABLED": false, "MAX_LEVERAGE_GLOBAL": "2.5"}),
        )
        .unwrap();
        assert!(!c.trading_enabled);
        assert_eq!(c.max_leverage_global, dec!(2.5));
        assert_eq!(c.slippage_alpha_fraction, dec!(0.30));
        assert_eq!(c.max_margin_utilization_pct, dec!(80));
        assert_eq!(c.cvar_limit_pct, None);
    }

    #[test]
    fn instrument_resolution() {
        let specs = InstrumentSpecs::with_defaults();
        let gc = specs.resolve("GC", InstrumentType::Future).unwrap();
        assert_eq!(gc.multiplier, dec!(100));
        assert_eq!(gc.spec.margin, MarginModel::PerContract(dec!(16500)));
        // No future is margined without its configured multiplier.
        assert!(specs.resolve("ZZ", InstrumentType::Future).is_none());
        let btc = specs.resolve("BTC", InstrumentType::Crypto).unwrap();
        assert_eq!(
            (btc.lot_size, btc.spec.margin),
            (dec!(0.00000001), MarginModel::PercentOfNotional(dec!(0.50)))
        );
        let aapl = specs.resolve("AAPL", InstrumentType::Stock).unwrap();
        assert_eq!(
            aapl.spec,
            InstrumentSpec::default_for(InstrumentType::Stock, Decimal::ONE)
        );
        let opt = specs.resolve("SPY", InstrumentType::Option).unwrap();
        assert_eq!(opt.multiplier, dec!(100));
        let mut specs = specs;
        specs.class_margin.insert(InstrumentType::Stock, dec!(0.5));
        assert_eq!(
            specs
                .resolve("AAPL", InstrumentType::Stock)
                .unwrap()
                .spec
                .margin,
            MarginModel::PercentOfNotional(dec!(0.5))
        );
        assert_eq!(specs.ledger_specs()["HG"].spec.multiplier, dec!(25000));
        // A futures root does not capture a stock of the same ticker
        // (`CL`: crude oil futures, and Colgate-Palmolive).
        let cl = specs.resolve("CL", InstrumentType::Future).unwrap();
        assert_eq!(cl.multiplier, dec!(1000));
        let colgate = specs.resolve("CL", InstrumentType::Stock).unwrap();
        assert_eq!(
            colgate.spec,
            InstrumentSpec {
                multiplier: Decimal::ONE,
                margin: MarginModel::PercentOfNotional(dec!(0.5)),
            }
        );
        assert_eq!(
            specs.resolve("BTC", InstrumentType::Etf).unwrap().lot_size,
            Decimal::ONE
        );
        assert!(!specs.ledger_specs().contains_key("BTC"));
    }

    #[test]
    fn returns_table_unions_dates_and_rejects_bad_series() {
        let day = |d: u32| NaiveDate::from_ymd_opt(2025, 1, d).unwrap();
        let t = ReturnsTable::new([
            ReturnSeries {
                strategy_id: "a".into(),
                dates: vec![day(1), day(2)],
                daily_returns: vec![0.01, 0.02],
            },
            ReturnSeries {
                strategy_id: "b".into(),
                dates: vec![day(2), day(3)],
                daily_returns: vec![0.03, 0.04],
            },
        ])
        .unwrap();
        assert_eq!(t.dates(), &[day(1), day(2), day(3)]);
        assert!(t.column("a").unwrap()[2].is_nan());
        assert_eq!(t.column("b").unwrap()[1], 0.03);
        let dup = ReturnsTable::new([ReturnSeries {
            strategy_id: "a".into(),
            dates: vec![day(1), day(1)],
            daily_returns: vec![0.01, 0.02],
        }]);
        assert_eq!(dup, Err(ReturnsError::DuplicateDate("a".into(), day(1))));
        let nan = ReturnsTable::new([ReturnSeries {
            strategy_id: "a".into(),
            dates: vec![day(1)],
            daily_returns: vec![f64::NAN],
        }]);
        assert_eq!(nan, Err(ReturnsError::NonFinite("a".into(), day(1))));
    }
}
