//! Throughput of [`mtx_cerebro::decide`] on one core: the fixture entries
//! (AAPL, pairs, GC, HG, BTC, AUDCAD) against an account holding positions in
//! several strategies, with the shared backtests loaded so every decision
//! also computes CVaR before / after and correlations.
//!
//! `cargo run --release -p mtx-cerebro --example bench_decide [iterations] [--no-cvar]`
//! (fixtures from `$MTX_FIXTURES_DIR`, else the repo copy in `tests/fixtures`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use chrono::{Duration, TimeZone, Utc};
use mtx_cerebro::{
    decide, AccountInputs, ActiveAllocation, Inputs, InstrumentSpecs, ReturnSeries, ReturnsTable,
    RiskLimits, StrategyConfig, SystemConfig,
};
use mtx_schemas::order::{AccountState, OpenPosition};
use mtx_schemas::signal::{ContentFormat, StandardizedSignal};
use mtx_schemas::{Direction, Environment, SizingMode, StrategyStatus, TradingMode};
use mtx_standardizer::{parse_raw, standardize, strip_secret, ParseContext, StrategyInfo};
use rust_decimal::Decimal;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(200_000);
    let no_cvar = std::env::args().nth(2).as_deref() == Some("--no-cvar");
    let dir = std::env::var("MTX_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
        });
    let t0 = Utc
        .with_ymd_and_hms(2026, 1, 5, 15, 0, 0)
        .single()
        .ok_or("bad time")?;

    let mut signals: Vec<StandardizedSignal> = Vec::new();
    for file in [
        "equity_simple_signal_1.json",
        "equity_pairs_signal_1.json",
        "futures_gold_simple_signal_1.json",
        "futures_copper_simple_signal_1.json",
        "crypto_btc_simple_signal_1.json",
        "forex_simple_signal_1.json",
    ] {
        let text = std::fs::read_to_string(dir.join("signals").join(file))?;
        let bodies: Vec<serde_json::Value> = serde_json::from_str(&text)?;
        let Some(mut body) = bodies.into_iter().next() else {
            continue;
        };
        strip_secret(&mut body);
        let mut ctx = ParseContext::new(
            "mathematricks",
            Environment::Staging,
            t0,
            ContentFormat::Mathematricks,
        );
        ctx.require_future_expiry = false;
        ctx.fallback_signal_id = Some(file.to_string());
        let parsed = parse_raw(&body, &ctx)?;
        let info = StrategyInfo {
            strategy_id: parsed.strategy().to_string(),
            expected_alpha: Some(Decimal::new(2, 2)),
            sizing_mode: SizingMode::SenderEquityRatio,
        };
        signals.push(standardize(parsed, &info));
    }

    let backtests = mtx_portfolio::load_backtest_dir(&dir.join("backtests"))?;
    let ids: Vec<String> = backtests.iter().map(|b| b.strategy_id.clone()).collect();
    let returns = ReturnsTable::new(backtests.into_iter().map(|b| ReturnSeries {
        strategy_id: b.strategy_id,
        dates: b.dates,
        daily_returns: b.daily_returns,
    }))?;

    let mut strategies = BTreeMap::new();
    let mut allocations = BTreeMap::new();
    for id in ids.iter().map(String::as_str).chain(["Forex"]) {
        let mut cfg = StrategyConfig::new(id);
        cfg.status = StrategyStatus::Active;
        cfg.trading_mode = TradingMode::Paper;
        cfg.account = Some("IBKR_Main".into());
        cfg.risk_limits = Some(RiskLimits {
            max_position_size: Some(Decimal::from(5_000_000)),
            max_daily_loss: Some(Decimal::from(50_000)),
        });
        cfg.expected_alpha = Some(Decimal::new(2, 2));
        strategies.insert(id.to_string(), cfg);
        allocations.insert(id.to_string(), Decimal::new(2000, 2));
    }
    allocations.insert("SPX_1-D_Opt".into(), Decimal::new(8936, 2));

    // A book with capital deployed in five strategies.
    let mut positions = Vec::new();
    let mut deployed = BTreeMap::new();
    for (i, id) in ["Com1-Met", "Com2-Ag", "SPY", "TLT", "FloridaForex"]
        .iter()
        .enumerate()
    {
        let margin = Decimal::from(20_000 + 5_000 * i as i64);
        positions.push(OpenPosition {
            strategy_id: id.to_string(),
            instrument: format!("X{i}"),
            direction: Direction::Long,
            quantity: Decimal::from(100),
            entry_price: Decimal::from(400),
            current_price: Decimal::from(400),
            unrealized_pnl: Decimal::ZERO,
            margin_required: margin,
            multiplier: None,
        });
        deployed.insert(id.to_string(), margin);
    }
    let margin_used: Decimal = deployed.values().copied().sum();
    let equity = Decimal::from(1_000_000);
    let state = AccountState {
        account: "IBKR_Main".into(),
        timestamp: t0,
        equity,
        cash_balance: equity,
        margin_used,
        margin_available: equity - margin_used,
        unrealized_pnl: Decimal::ZERO,
        realized_pnl: Decimal::ZERO,
        commissions: Decimal::ZERO,
        open_positions: positions,
        open_orders: vec![],
        deployed_capital: deployed,
        strategy_pnl_today: BTreeMap::new(),
        executions_seq: None,
    };
    let inputs = Inputs {
        strategies,
        allocation: Some(ActiveAllocation {
            allocation_id: "bench".into(),
            allocations,
        }),
        accounts: [("IBKR_Main".to_string(), AccountInputs::new(state))]
            .into_iter()
            .collect(),
        system: SystemConfig::default(),
        instruments: InstrumentSpecs::with_defaults(),
        marks: BTreeMap::new(),
        entries: BTreeMap::new(),
        returns: (!no_cvar).then(|| std::sync::Arc::new(returns)),
        returns_unavailable: None,
        now: t0 + Duration::seconds(2),
    };

    // Warm up and check every signal is actually decided with orders.
    let mut orders = 0usize;
    for s in &signals {
        if let Some(d) = decide(s, &inputs).decided() {
            orders += d.orders.len();
        }
    }
    let started = Instant::now();
    let mut sink = 0usize;
    for i in 0..iterations {
        let s = &signals[i % signals.len()];
        if let Some(d) = decide(s, &inputs).decided() {
            sink += d.orders.len();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}{iterations} decisions over {} signals ({orders} orders per pass, sink {sink}) in {secs:.3}s: {:.0} decisions/s, {:.1} us/decision",
        if no_cvar { "[no CVaR] " } else { "" },
        signals.len(),
        iterations as f64 / secs,
        secs * 1e6 / iterations as f64
    );
    Ok(())
}
