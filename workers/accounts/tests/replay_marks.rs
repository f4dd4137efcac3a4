//! A book rebuilt from the streams has the live marks: the live book keeps
//! per symbol the valid market price with the greatest `(timestamp, price)`,
//! so the replay reads every retained price of `MARKET` (not the last per
//! subject, which may be a late tick or a refused one) and takes the same
//! maximum.

mod common;

use common::*;
use mtx_accounts::worker::{ledger_config, rebuild};
use mtx_harness::NatsServer;
use mtx_schemas::ids::execution_id;
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{position_direction, ExecutionConfirmation};
use mtx_schemas::{ExecutionStatus, InstrumentType, Side, SignalAction};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use std::time::Duration;

const A: &str = "PAPER";

async fn start(nats: &NatsServer) -> Pipeline {
    let mut cfg = config(nats);
    cfg.accounts
        .initial_balances
        .insert(A.to_string(), dec!(100000));
    Pipeline::start(cfg).await
}

/// Book 100 AAPL long at 150 straight on `executions.PAPER`.
async fn buy_100_aapl_at_150(p: &Pipeline) {
    let (action, side) = (SignalAction::Entry, Side::Buy);
    let x = ExecutionConfirmation {
        execution_id: execution_id("R1", 1),
        order_id: "R1".into(),
        account: A.into(),
        strategy_id: "S1".into(),
        instrument: "AAPL".into(),
        instrument_type: InstrumentType::Stock,
        direction: position_direction(action, side),
        action,
        side,
        quantity: dec!(100),
        price: dec!(150),
        commission: Decimal::ZERO,
        multiplier: Decimal::ONE,
        status: ExecutionStatus::Filled,
        broker_response: serde_json::Value::Null,
        timestamp: chrono::Utc::now(),
    };
    p.publish(
        p.subjects.executions(A).unwrap(),
        x.execution_id.clone(),
        serde_json::to_vec(&x).unwrap(),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.accounts
                .snapshot(A)
                .await
                .is_ok_and(|s| s.open_positions.len() == 1)
        })
        .await
    );
}

/// Publish a price stamped `at` (no waiting).
async fn tick(p: &Pipeline, symbol: &str, price: Decimal, at: chrono::DateTime<chrono::Utc>) {
    let px = MarketPrice {
        symbol: symbol.into(),
        price,
        timestamp: at,
        source: Some("feed".into()),
    };
    p.publish(
        p.subjects.market_price(symbol).unwrap(),
        format!("px.{symbol}.{}", at.timestamp_nanos_opt().unwrap()),
        serde_json::to_vec(&px).unwrap(),
    )
    .await;
}

/// The market consumer handles prices in stream order: once this marker is
/// in the book, every earlier price was handled.
async fn barrier(p: &Pipeline) {
    tick(p, "MARKER", dec!(1), chrono::Utc::now()).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            p.accounts.mark_of("MARKER").await.is_some()
        })
        .await
    );
}

/// The live and the rebuilt mark of the position, live and rebuilt
/// unrealized P&L, and how many messages the rebuild refused.
async fn live_and_rebuilt_mark(p: &Pipeline) -> (Decimal, Decimal, Decimal, Decimal, u64) {
    let live = p.accounts.snapshot(A).await.unwrap();
    let (book, refused) = rebuild(&p.js, &p.topo, ledger_config(&p.cfg.accounts))
        .await
        .expect("rebuild");
    let rebuilt = book.snapshot(A, live.timestamp);
    (
        live.open_positions[0].current_price,
        rebuilt.open_positions[0].current_price,
        live.unrealized_pnl,
        rebuilt.unrealized_pnl,
        refused,
    )
}

/// A late tick (stored after a newer one) is ignored live (the mark is the
/// price with the greatest timestamp). It is the last message of its
/// subject, but the replay reads the newer one too: the mark stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_tick_does_not_move_the_rebuilt_mark() {
    let nats = NatsServer::start();
    let p = start(&nats).await;
    buy_100_aapl_at_150(&p).await;
    let now = chrono::Utc::now();
    tick(&p, "AAPL", dec!(160), now).await;
    tick(&p, "AAPL", dec!(155), now - chrono::Duration::seconds(5)).await;
    barrier(&p).await;
    let (live_px, rebuilt_px, live_u, rebuilt_u, refused) = live_and_rebuilt_mark(&p).await;
    assert_eq!(live_px, dec!(160), "live mark: the newest observation");
    assert_eq!(refused, 0, "a late tick is valid, it just does not win");
    assert_eq!(
        (rebuilt_px, rebuilt_u),
        (live_px, live_u),
        "rebuilt book differs from the live one (live unrealized {live_u})"
    );
    p.stop().await;
}

/// The last price of a symbol is refused (stamped 5 minutes ahead of the
/// broker, DLQ invalid_price). Live, the earlier valid 160 stays the mark;
/// the replay refuses the same tick and keeps 160 too (not the fill price
/// 150, as when it read only the last message per symbol).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_last_tick_keeps_the_rebuilt_mark() {
    let nats = NatsServer::start();
    let p = start(&nats).await;
    buy_100_aapl_at_150(&p).await;
    let now = chrono::Utc::now();
    tick(&p, "AAPL", dec!(160), now).await;
    tick(&p, "AAPL", dec!(170), now + chrono::Duration::minutes(5)).await;
    barrier(&p).await;
    let (live_px, rebuilt_px, live_u, rebuilt_u, refused) = live_and_rebuilt_mark(&p).await;
    assert_eq!(live_px, dec!(160), "live: the refused tick is ignored");
    assert_eq!(refused, 1, "the replay refuses the tick stamped ahead");
    assert_eq!(
        (rebuilt_px, rebuilt_u),
        (live_px, live_u),
        "rebuilt book differs from the live one (live unrealized {live_u})"
    );
    p.stop().await;
}
