//! Helpers shared by the integration tests: fixture signals through the real
//! standardizer, and the worked example's inputs (equity 1,000,000,
//! SPX_1-D_Opt allocated 89.36 %, sender equity 500,000).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use mtx_cerebro::{
    AccountInputs, ActiveAllocation, Decided, DecisionOutput, EntryLeg, EntryRecord, Inputs,
    InstrumentSpecs, ReturnSeries, ReturnsTable, RiskLimits, StrategyConfig, SystemConfig,
};
use mtx_schemas::ids::order_id;
use mtx_schemas::order::{AccountState, OpenPosition};
use mtx_schemas::signal::{ContentFormat, StandardizedSignal};
use mtx_schemas::{
    Decision, Direction, Environment, OrderStatus, SizingMode, StrategyStatus, TradingMode,
};
use mtx_standardizer::{parse_raw, standardize, strip_secret, ParseContext, StrategyInfo};
use rust_decimal::Decimal;

pub const SPX: &str = "SPX_1-D_Opt";
pub const ACCOUNT: &str = "IBKR_Main";

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// `$MTX_FIXTURES_DIR`, else the repo copy in `tests/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    std::env::var("MTX_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// When the fixture signals are received.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 15, 0, 0).unwrap()
}

/// Every signal of a fixture file, standardized like the standardizer does:
/// sender ids from `signalID`, else `entry_name` (so `entry_signal_id`
/// links resolve), else `<file>#<i>`; expected alpha 0.02; SENDER_EQUITY_RATIO.
pub fn fixture(file: &str) -> Vec<StandardizedSignal> {
    let text = std::fs::read_to_string(fixtures_dir().join("signals").join(file)).unwrap();
    let bodies: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, mut body)| {
            strip_secret(&mut body);
            let mut ctx = ParseContext::new(
                "mathematricks",
                Environment::Staging,
                t0(),
                ContentFormat::Mathematricks,
            );
            ctx.require_future_expiry = false;
            ctx.fallback_signal_id = Some(
                body.get("entry_name")
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{file}#{i}")),
            );
            let parsed = parse_raw(&body, &ctx).unwrap();
            let info = StrategyInfo {
                strategy_id: parsed.strategy().to_string(),
                expected_alpha: Some(d("0.02")),
                sizing_mode: SizingMode::SenderEquityRatio,
            };
            standardize(parsed, &info)
        })
        .collect()
}

pub fn strategy(id: &str) -> StrategyConfig {
    let mut c = StrategyConfig::new(id);
    c.status = StrategyStatus::Active;
    c.trading_mode = TradingMode::Paper;
    c.account = Some(ACCOUNT.into());
    c.include_in_optimization = true;
    c.sizing_mode = SizingMode::SenderEquityRatio;
    c.expected_alpha = Some(d("0.02"));
    c
}

/// The SPX strategy's risk limits, created when absent.
pub fn limits(inputs: &mut Inputs) -> &mut RiskLimits {
    inputs
        .strategies
        .get_mut(SPX)
        .unwrap()
        .risk_limits
        .get_or_insert_with(RiskLimits::default)
}

pub fn account_state(equity: Decimal) -> AccountState {
    AccountState {
        account: ACCOUNT.into(),
        timestamp: t0(),
        equity,
        cash_balance: equity,
        margin_used: Decimal::ZERO,
        margin_available: equity,
        unrealized_pnl: Decimal::ZERO,
        realized_pnl: Decimal::ZERO,
        commissions: Decimal::ZERO,
        open_positions: vec![],
        open_orders: vec![],
        deployed_capital: BTreeMap::new(),
        strategy_pnl_today: BTreeMap::new(),
        executions_seq: None,
    }
}

/// Equity 1,000,000; SPX_1-D_Opt 89.36 %, Forex 30.2 %; default system
/// config and instrument table; decision 2 s after the signals.
pub fn base_inputs() -> Inputs {
    Inputs {
        strategies: [SPX, "Forex"]
            .iter()
            .map(|s| (s.to_string(), strategy(s)))
            .collect(),
        allocation: Some(ActiveAllocation {
            allocation_id: "alloc_1".into(),
            allocations: [
                (SPX.to_string(), d("89.36")),
                ("Forex".to_string(), d("30.2")),
            ]
            .into_iter()
            .collect(),
        }),
        accounts: [(
            ACCOUNT.to_string(),
            AccountInputs::new(account_state(d("1000000"))),
        )]
        .into_iter()
        .collect(),
        system: SystemConfig::default(),
        instruments: InstrumentSpecs::with_defaults(),
        marks: BTreeMap::new(),
        entries: BTreeMap::new(),
        returns: None,
        returns_unavailable: None,
        now: t0() + Duration::seconds(2),
    }
}

pub fn acct(inputs: &mut Inputs) -> &mut AccountInputs {
    inputs.accounts.get_mut(ACCOUNT).unwrap()
}

/// Add an open position (and its margin) to the account.
pub fn hold(
    inputs: &mut Inputs,
    strategy: &str,
    instrument: &str,
    direction: Direction,
    qty: Decimal,
    price: Decimal,
    margin: Decimal,
) {
    let a = acct(inputs);
    a.state.open_positions.push(OpenPosition {
        strategy_id: strategy.into(),
        instrument: instrument.into(),
        direction,
        quantity: qty,
        entry_price: price,
        current_price: price,
        unrealized_pnl: Decimal::ZERO,
        margin_required: margin,
        multiplier: None,
    });
    a.state.margin_used += margin;
    a.state.margin_available -= margin;
    *a.state.deployed_capital.entry(strategy.into()).or_default() += margin;
}

/// Cerebro's record of an approved entry whose legs filled `filled`.
pub fn entry_record(
    entry: &StandardizedSignal,
    decided: &Decided,
    filled: &[Decimal],
    status: OrderStatus,
) -> EntryRecord {
    EntryRecord {
        signal_id: entry.signal_id.clone(),
        strategy_id: entry.strategy_id.clone(),
        account: ACCOUNT.into(),
        decision: decided.record.decision,
        legs: decided
            .orders
            .iter()
            .zip(filled)
            .map(|(o, f)| EntryLeg {
                leg: o.leg,
                order_id: order_id(&entry.signal_id, o.leg as usize),
                instrument: o.instrument.clone(),
                instrument_type: o.instrument_type,
                direction: o.direction,
                sender_quantity: entry.legs[o.leg as usize].quantity,
                ordered_quantity: o.quantity,
                filled_quantity: *f,
                closed_quantity: Decimal::ZERO,
                sender_quantity_exited: Decimal::ZERO,
                status,
            })
            .collect(),
    }
}

pub fn decided(out: DecisionOutput) -> Decided {
    match out {
        DecisionOutput::Decided(d) => *d,
        DecisionOutput::Defer { reason, .. } => panic!("deferred: {reason}"),
    }
}

pub fn assert_decision(d: &Decided, decision: Decision) {
    assert_eq!(d.record.decision, decision, "reason: {}", d.record.reason);
}

/// The shared backtests as a returns table.
pub fn returns_table() -> Arc<ReturnsTable> {
    Arc::new(ReturnsTable::new(backtest_series()).unwrap())
}

/// The shared backtests (`tests/fixtures/backtests`) as return series.
pub fn backtest_series() -> Vec<ReturnSeries> {
    let all = mtx_portfolio::load_backtest_dir(&fixtures_dir().join("backtests")).unwrap();
    all.into_iter()
        .map(|b| ReturnSeries {
            strategy_id: b.strategy_id,
            dates: b.dates,
            daily_returns: b.daily_returns,
        })
        .collect()
}
