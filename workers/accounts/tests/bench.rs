//! Throughput of the accounts stage on real servers (ignored; run with
//! `cargo test -p mtx-accounts --release --test bench -- --ignored --nocapture`).
//!
//! Only the accounts stage runs (no venue): the bench publishes, for each of
//! `ACCOUNTS_BENCH_ORDERS` orders (default 5 000), the order, its ACCEPTED and
//! FILLED events and its execution — the four messages the pipeline feeds
//! the stage per filled signal — plus one market price every 20 orders,
//! spread over 4 accounts × 20 strategies × 10 symbols (200 positions per
//! account, so states are tens of KB like in a full pipeline run). Two
//! phases, each with fresh orders:
//!
//! - **burst**: everything published as fast as possible — messages/s from
//!   the first publish until every input is consumed (the stage's ceiling);
//! - **paced**: `ACCOUNTS_BENCH_RATE` orders/s (default 2 500, i.e. 10 000
//!   messages/s) in 10 ms slices, as a pipeline feeds it — how far behind
//!   the stage ends, and the CPU the process spent per message.
//!
//! Each phase prints the account states published meanwhile (stream
//! messages and bytes, KV puts, per order) and checks that the state in KV
//! ends equal to the book.

mod common;

use std::future::IntoFuture;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use mtx_harness::NatsServer;
use mtx_runtime::config::Config;
use mtx_schemas::headers;
use mtx_schemas::ids::execution_id;
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{
    account_state_key, order_side, AccountState, ExecutionConfirmation, Order, OrderEvent,
};
use mtx_schemas::{Direction, ExecutionStatus, InstrumentType, OrderStatus, SignalAction};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::Subjects;
use rust_decimal::Decimal;

const ACCOUNTS: usize = 4;
const STRATEGIES: usize = 20;
const SYMBOLS: usize = 10;

fn config(nats: &NatsServer) -> Config {
    let mut c = common::base_config(nats, "b");
    for a in 0..ACCOUNTS {
        c.accounts
            .initial_balances
            .insert(format!("ACC{a}"), Decimal::from(10_000_000));
    }
    c
}

/// The four messages of order `i` (subject, msg id, body) plus, every 20
/// orders, a market price.
fn messages(
    subjects: &Subjects,
    i: usize,
    t0: chrono::DateTime<chrono::Utc>,
) -> Vec<(String, String, Vec<u8>)> {
    let account = format!("ACC{}", i % ACCOUNTS);
    let strategy = format!("S{:02}", (i / ACCOUNTS) % STRATEGIES);
    let symbol = format!("SYM{}", (i / (ACCOUNTS * STRATEGIES)) % SYMBOLS);
    let order_id = format!("bench_{i:08}");
    let at = t0 + chrono::Duration::milliseconds(i as i64);
    let price = Decimal::from(100 + (i % 7) as i64);
    let (action, direction) = (SignalAction::Entry, Direction::Long);
    let side = order_side(action, direction);
    let order = Order {
        direction,
        action,
        side,
        ..Order::pending(
            order_id.clone(),
            format!("sig_{i}"),
            strategy.clone(),
            account.clone(),
            symbol.clone(),
            Decimal::ONE,
            at,
        )
    };
    let event = |status, previous, filled, seq| OrderEvent {
        order_id: order_id.clone(),
        account: account.clone(),
        status,
        previous_status: previous,
        filled_quantity: filled,
        avg_fill_price: (filled > Decimal::ZERO).then_some(price),
        reason: None,
        timestamp: at,
        seq,
    };
    let x = ExecutionConfirmation {
        execution_id: execution_id(&order_id, 1),
        order_id: order_id.clone(),
        account: account.clone(),
        strategy_id: strategy,
        instrument: symbol.clone(),
        instrument_type: InstrumentType::Stock,
        direction,
        action,
        side,
        quantity: Decimal::ONE,
        price,
        commission: Decimal::new(1, 2),
        multiplier: Decimal::ONE,
        status: ExecutionStatus::Filled,
        broker_response: serde_json::json!({"venue": "bench"}),
        timestamp: at,
    };
    let mut out = vec![
        (
            subjects.orders_new(&account).unwrap(),
            order_id.clone(),
            serde_json::to_vec(&order).unwrap(),
        ),
        (
            subjects.orders_events(&account).unwrap(),
            format!("{order_id}.1"),
            serde_json::to_vec(&event(OrderStatus::Accepted, None, Decimal::ZERO, 1)).unwrap(),
        ),
        (
            subjects.orders_events(&account).unwrap(),
            format!("{order_id}.2"),
            serde_json::to_vec(&event(
                OrderStatus::Filled,
                Some(OrderStatus::Accepted),
                Decimal::ONE,
                2,
            ))
            .unwrap(),
        ),
        (
            subjects.executions(&account).unwrap(),
            x.execution_id.clone(),
            serde_json::to_vec(&x).unwrap(),
        ),
    ];
    if i.is_multiple_of(20) {
        let p = MarketPrice {
            symbol: symbol.clone(),
            price: price + Decimal::new(5, 1),
            timestamp: at,
            source: Some("bench".into()),
        };
        out.push((
            subjects.market_price(&symbol).unwrap(),
            format!("px.{i}"),
            serde_json::to_vec(&p).unwrap(),
        ));
    }
    out
}

/// (messages, bytes, last sequence) of a stream.
async fn stream_state(js: &jetstream::Context, name: &str) -> (u64, u64, u64) {
    let mut st = js.get_stream(name).await.expect("stream");
    let s = st.info().await.expect("info").state.clone();
    (s.messages, s.bytes, s.last_sequence)
}

/// `mtx_accounts_tracked_orders` by state, if the build exports it.
fn tracked(registry: &prometheus::Registry) -> String {
    let found: Vec<String> = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "mtx_accounts_tracked_orders")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| {
            let state = m.get_label().first().map(|l| l.value()).unwrap_or("?");
            format!("{state} {}", m.get_gauge().get_value())
        })
        .collect();
    if found.is_empty() {
        "n/a".into()
    } else {
        found.join(", ")
    }
}

fn consumed(registry: &prometheus::Registry) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "mtx_accounts_inputs_total")
        .flat_map(|f| f.get_metric().iter())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 (1-based) of the whole line.
    (ticks(11) + ticks(12)) / 100.0
}

struct Bench {
    js: jetstream::Context,
    subjects: Subjects,
    registry: prometheus::Registry,
    accounts: std::sync::Arc<mtx_accounts::worker::Accounts>,
    kv: jetstream::kv::Store,
    kv_stream: String,
    states_stream: String,
}

impl Bench {
    /// Every account's KV state equals its book (timestamps aside).
    async fn settled(&self) -> bool {
        for a in 0..ACCOUNTS {
            let account = format!("ACC{a}");
            let mem = self.accounts.snapshot(&account).await.expect("snapshot");
            let stored: Option<AccountState> = self
                .kv
                .get(account_state_key(&account))
                .await
                .ok()
                .flatten()
                .and_then(|v| serde_json::from_slice(&v).ok());
            if stored.is_none_or(|s| {
                AccountState {
                    timestamp: s.timestamp,
                    ..mem
                } != s
            }) {
                return false;
            }
        }
        true
    }

    /// Publish orders `from..from + n` (all at once when `rate` is 0, else
    /// `rate` orders/s) and wait until the stage consumed them and KV
    /// caught up; print the figures.
    async fn phase(&self, name: &str, from: usize, n: usize, rate: usize) {
        let (_, bytes0, seq0) = stream_state(&self.js, &self.states_stream).await;
        let (_, _, kv0) = stream_state(&self.js, &self.kv_stream).await;
        let consumed0 = consumed(&self.registry);
        let t0 = chrono::Utc::now();
        // Built first so the timed part is publish + consume.
        let slices: Vec<Vec<(String, String, Vec<u8>)>> = {
            let per_slice = if rate == 0 { n } else { (rate / 100).max(1) };
            (from..from + n)
                .collect::<Vec<_>>()
                .chunks(per_slice)
                .map(|c| {
                    c.iter()
                        .flat_map(|&i| messages(&self.subjects, i, t0))
                        .collect()
                })
                .collect()
        };
        let total: u64 = slices.iter().map(|s| s.len() as u64).sum();
        let cpu0 = cpu_secs();
        let started = Instant::now();
        let publisher = {
            let js = self.js.clone();
            tokio::spawn(async move {
                let mut acks = FuturesUnordered::new();
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for slice in slices {
                    if rate > 0 {
                        tick.tick().await;
                    }
                    for (subject, id, body) in slice {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert(headers::MSG_ID, id.as_str());
                        let ack = js
                            .publish_with_headers(subject, h, body.into())
                            .await
                            .expect("publish");
                        acks.push(ack.into_future());
                        while acks.len() >= 2_000 {
                            acks.next().await.expect("ack").expect("ack");
                        }
                    }
                }
                while let Some(a) = acks.next().await {
                    a.expect("ack");
                }
                Instant::now()
            })
        };
        let published_at = publisher.await.expect("publisher");
        while consumed(&self.registry) - consumed0 < total {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "consumed {} of {total}",
                consumed(&self.registry) - consumed0
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let done = started.elapsed();
        let cpu = cpu_secs() - cpu0;
        let mut settled = None;
        for _ in 0..3_000 {
            if self.settled().await {
                settled = Some(started.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let settled = settled.expect("KV never caught up with the book");
        let (_, bytes1, seq1) = stream_state(&self.js, &self.states_stream).await;
        let (_, _, kv1) = stream_state(&self.js, &self.kv_stream).await;
        let states = seq1 - seq0;
        let bytes = bytes1.saturating_sub(bytes0);
        let publish = (published_at - started).as_secs_f64();
        let last = self.accounts.snapshot("ACC0").await.expect("snapshot");
        eprintln!(
            "[{name}] {n} orders, {total} messages: consumed in {:.2}s = {:.0} msg/s \
             (published in {publish:.2}s, done {:.0} ms after the last publish; \
             KV equal to the book after {:.2}s); process CPU {cpu:.2}s = {:.1} µs/msg",
            done.as_secs_f64(),
            total as f64 / done.as_secs_f64(),
            (done.as_secs_f64() - publish) * 1e3,
            settled.as_secs_f64(),
            cpu * 1e6 / total as f64,
        );
        eprintln!(
            "[{name}] {states} states published = {:.3} per order, {:.1} MB on ACCOUNTS \
             ({:.1} KB each), {} KV puts; ACC0 now: {} positions, {} open orders, {} B of JSON; \
             orders in the tracker: {}",
            states as f64 / n as f64,
            bytes as f64 / 1e6,
            bytes as f64 / states.max(1) as f64 / 1e3,
            kv1 - kv0,
            last.open_positions.len(),
            last.open_orders.len(),
            serde_json::to_vec(&last).map(|v| v.len()).unwrap_or(0),
            tracked(&self.registry),
        );
        assert!(last.open_orders.is_empty(), "every order was filled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --release -- --ignored --nocapture"]
async fn accounts_throughput() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("ACCOUNTS_BENCH_ORDERS", 5_000);
    let rate = env("ACCOUNTS_BENCH_RATE", 2_500);
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let client = async_nats::connect(&cfg.nats.url).await.expect("connect");
    let mut js = jetstream::new(client);
    // A loaded 2-core box can take longer than the default 5 s to ack.
    js.set_timeout(Duration::from_secs(60));
    let (topo, mut p, shutdown) = common::apply_and_start(&cfg, &js).await;
    let accounts = mtx_accounts::worker::spawn(&mut p).expect("accounts");
    let registry = p.registry.clone();
    let subjects = p.subjects.clone();
    let waiter = tokio::spawn(p.wait());
    let bucket = topo.bucket(buckets::ACCOUNT_STATE).unwrap().to_string();
    let bench = Bench {
        kv: js.get_key_value(&bucket).await.expect("kv"),
        kv_stream: format!("KV_{bucket}"),
        states_stream: topo.stream_name(streams::ACCOUNTS),
        js,
        subjects,
        registry,
        accounts,
    };
    // Ready: every configured account has its initial state in KV.
    let ready = Instant::now();
    while !bench.settled().await {
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "stage never ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bench.phase("burst", 0, n, 0).await;
    bench.phase("paced", n, n, rate).await;
    shutdown.cancel();
    waiter.await.expect("stop");
}
