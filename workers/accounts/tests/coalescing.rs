//! The accounts stage under load on real servers: finished orders leave the
//! tracker, and coalesced publishing never loses the final state.

mod common;

use common::*;
use mtx_harness::NatsServer;
use mtx_schemas::ids::execution_id;
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{position_direction, AccountState, ExecutionConfirmation};
use mtx_schemas::{Direction, ExecutionStatus, InstrumentType, Side, SignalAction};
use mtx_subjects::topology::streams;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use std::time::Duration;

const A: &str = "PAPER";

/// The tests' configuration with account [`A`] funded (100,000), so it has
/// a state before the first fill.
fn funded_config(nats: &NatsServer) -> mtx_runtime::config::Config {
    let mut cfg = config(nats);
    cfg.accounts
        .initial_balances
        .insert(A.to_string(), dec!(100000));
    cfg
}

fn fill(
    i: usize,
    strategy: &str,
    instrument: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> ExecutionConfirmation {
    let (action, side) = (SignalAction::Entry, Side::Buy);
    let order_id = format!("burst_{i}");
    ExecutionConfirmation {
        execution_id: execution_id(&order_id, 1),
        order_id,
        account: A.into(),
        strategy_id: strategy.into(),
        instrument: instrument.into(),
        instrument_type: InstrumentType::Stock,
        direction: position_direction(action, side),
        action,
        side,
        quantity: Decimal::ONE,
        price: Decimal::from(100 + (i % 5) as i64),
        commission: dec!(0.01),
        multiplier: Decimal::ONE,
        status: ExecutionStatus::Filled,
        broker_response: serde_json::Value::Null,
        timestamp: at,
    }
}

const SYMBOLS: [&str; 3] = ["AAPL", "MSFT", "NVDA"];

/// Publishes fill `i` of a burst: one share of `SYMBOLS[i % 3]` for
/// strategy `S<i % strategies>`.
async fn publish_fill(
    p: &Pipeline,
    i: usize,
    strategies: usize,
    t0: chrono::DateTime<chrono::Utc>,
) {
    let x = fill(
        i,
        &format!("S{}", i % strategies),
        SYMBOLS[i % 3],
        t0 + chrono::Duration::milliseconds(i as i64),
    );
    p.publish(
        p.subjects.executions(A).unwrap(),
        x.execution_id.clone(),
        serde_json::to_vec(&x).unwrap(),
    )
    .await;
}

/// True once the book holds `n` shares in all.
async fn book_holds(p: &Pipeline, n: usize) -> bool {
    p.accounts.snapshot(A).await.is_ok_and(|s| {
        s.open_positions.iter().map(|x| x.quantity).sum::<Decimal>() == Decimal::from(n)
    })
}

/// Every state on `accounts.PAPER.state`, in order, with its encoded size.
async fn published_sized(p: &Pipeline) -> Vec<(AccountState, usize)> {
    read_all(
        &p.js,
        &p.topo.stream_name(streams::ACCOUNTS),
        &p.subjects.account_state(A).unwrap(),
    )
    .await
    .iter()
    .map(|m| (serde_json::from_slice(&m.payload).unwrap(), m.payload.len()))
    .collect()
}

/// Every state on `accounts.PAPER.state`, in order.
async fn published(p: &Pipeline) -> Vec<AccountState> {
    published_sized(p)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect()
}

fn same(a: &AccountState, b: &AccountState) -> bool {
    AccountState {
        timestamp: b.timestamp,
        ..a.clone()
    } == *b
}

/// A burst of fills and marks inside one long coalescing window: far fewer
/// states than inputs go out, and the last one — in KV for Cerebro and on
/// the stream for the sink — equals the book and the figures expected from
/// the fills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_ends_with_the_exact_state() {
    let nats = NatsServer::start();
    let mut cfg = funded_config(&nats);
    cfg.accounts.publish_coalesce_ms = 400;
    let p = Pipeline::start(cfg).await;
    p.state_where(A, |_| true).await;
    let before = published(&p).await.len();

    let n = 300;
    let t0 = chrono::Utc::now();
    for i in 0..n {
        publish_fill(&p, i, 4, t0).await;
        if i % 50 == 49 {
            let symbol = SYMBOLS[(i / 50) % 3];
            let px = MarketPrice {
                symbol: symbol.into(),
                price: Decimal::from(101 + (i / 50) as i64),
                timestamp: t0 + chrono::Duration::milliseconds(i as i64),
                source: None,
            };
            p.publish(
                p.subjects.market_price(symbol).unwrap(),
                format!("px.{i}"),
                serde_json::to_vec(&px).unwrap(),
            )
            .await;
        }
    }

    // Wait until the book has every fill and the last marks, then until the
    // published state catches up with it.
    let marks = [
        ("AAPL", dec!(104)),
        ("MSFT", dec!(105)),
        ("NVDA", dec!(106)),
    ];
    let ok = eventually(Duration::from_secs(20), || async {
        let mut all = book_holds(&p, n).await;
        for (symbol, px) in marks {
            all &= p.accounts.mark_of(symbol).await.map(|m| m.price) == Some(px);
        }
        all
    })
    .await;
    assert!(ok, "the book never had every fill and mark");
    let book = p.accounts.snapshot(A).await.unwrap();
    let kv = p.state_where(A, |s| same(&book, s)).await;
    assert_eq!(p.accounts.pending().await, 0, "nothing left to publish");

    // The figures, independently of the ledger: 300 × 1 share, 0.01 each.
    assert_eq!(kv.commissions, dec!(3));
    assert_eq!(kv.cash_balance, dec!(99997));
    assert_eq!(kv.open_positions.len(), 12, "4 strategies × 3 symbols");
    let cost: Decimal = (0..n).map(|i| Decimal::from(100 + (i % 5) as i64)).sum();
    let entry_cost: Decimal = kv
        .open_positions
        .iter()
        .map(|x| x.entry_price * x.quantity)
        .sum();
    assert_eq!(entry_cost.round_dp(6), cost);
    assert_eq!(kv.equity, kv.cash_balance + kv.unrealized_pnl);

    // The sink sees the same final state, and far fewer than one per input.
    let states = published(&p).await;
    let last = states.last().unwrap();
    assert!(same(&book, last), "{last:#?}");
    assert_eq!(last, &kv, "KV and the stream hold the same final state");
    let during = states.len() - before;
    assert!(
        during < n / 2,
        "{during} states for {n} fills: not coalesced"
    );
    p.stop().await;
}

/// Orders that finish leave the tracker: only a bounded set of tombstones
/// is kept, and the published state lists no open order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_orders_leave_the_tracker() {
    let nats = NatsServer::start();
    let mut cfg = funded_config(&nats);
    cfg.accounts.finished_orders_max = 2;
    let p = Pipeline::start(cfg).await;
    p.price("AAPL", dec!(150)).await;
    for i in 0..5 {
        let id = format!("F{i}");
        p.order(&market(
            &id,
            "S1",
            "AAPL",
            SignalAction::Entry,
            Direction::Long,
            dec!(1),
        ))
        .await;
        p.wait_status(A, &id, mtx_schemas::OrderStatus::Filled)
            .await;
    }
    let s = p
        .state_where(A, |s| {
            s.open_positions
                .first()
                .is_some_and(|x| x.quantity == dec!(5))
                && s.open_orders.is_empty()
        })
        .await;
    assert_eq!(s.open_positions.len(), 1);
    let ok = eventually(Duration::from_secs(10), || async {
        p.accounts.tracked_orders().await == Some((0, 2))
    })
    .await;
    assert!(
        ok,
        "tracker still holds {:?} (working, finished)",
        p.accounts.tracked_orders().await
    );
    p.stop().await;
}

/// With `publish_bytes_per_sec` a large state waits longer than the
/// coalescing window: after a state of `B` bytes, the account's next state
/// is taken no sooner than `B / publish_bytes_per_sec` later (here there is
/// no window at all, so only the size spaces them). The last state still
/// equals the book.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_state_is_spaced_by_its_size() {
    const BYTES_PER_SEC: u64 = 20_000;
    let nats = NatsServer::start();
    let mut cfg = funded_config(&nats);
    cfg.accounts.publish_coalesce_ms = 0;
    cfg.accounts.publish_bytes_per_sec = BYTES_PER_SEC;
    let p = Pipeline::start(cfg).await;
    p.state_where(A, |_| true).await;

    // 40 strategies × 3 symbols: a state of a few KB, i.e. a spacing of
    // tens to hundreds of milliseconds.
    let n = 240;
    let t0 = chrono::Utc::now();
    for i in 0..n {
        publish_fill(&p, i, 40, t0).await;
    }
    let ok = eventually(Duration::from_secs(20), || book_holds(&p, n)).await;
    assert!(ok, "the book never had every fill");
    let book = p.accounts.snapshot(A).await.unwrap();
    let kv = p.state_where(A, |s| same(&book, s)).await;
    assert_eq!(kv.open_positions.len(), 120);

    let states = published_sized(&p).await;
    assert!(
        same(&book, &states.last().unwrap().0),
        "the last state is the book's"
    );
    let mut stretched = 0;
    for pair in states.windows(2) {
        let ((a, bytes), (b, _)) = (&pair[0], &pair[1]);
        let wait = Duration::from_nanos(*bytes as u64 * 1_000_000_000 / BYTES_PER_SEC);
        let gap = (b.timestamp - a.timestamp).to_std().unwrap_or_default();
        // 1 ms: the state's timestamp is read just after the instant the
        // spacing runs from.
        assert!(
            gap + Duration::from_millis(1) >= wait,
            "a state of {bytes} B at {} was followed after only {gap:?} (≥ {wait:?} expected)",
            a.timestamp
        );
        stretched += usize::from(wait > Duration::from_millis(50));
    }
    assert!(
        stretched > 0,
        "no state was large enough to be spaced: {states:?}"
    );
    p.stop().await;
}
