//! The Cerebro worker against a real nats-server: standardized signals and KV
//! inputs in, decisions and orders out.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use async_nats::HeaderMap;
use chrono::Utc;
use common::{account_state, d, fixture, strategy, ACCOUNT, SPX};
use futures::StreamExt;
use mtx_cerebro::worker::{self, reservations_key, Cerebro, ReservationBook};
use mtx_cerebro::{ActiveAllocation, DecisionRecord};
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::ids::{derive_id, order_id};
use mtx_schemas::order::{account_state_key, AccountState, OpenOrder, OpenPosition, Order};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::{Decision, Direction, OrderType, Side, SignalAction, SignalType, SizingMode};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

struct Env {
    _nats: NatsServer,
    cfg: Config,
    js: jetstream::Context,
    topo: Topology,
    subjects: Subjects,
    state: kv::Store,
    system: kv::Store,
    allocations: kv::Store,
    shutdown: CancellationToken,
}

impl Env {
    async fn new() -> Env {
        let nats = NatsServer::start();
        let mut cfg = Config::default();
        cfg.nats.url = nats.url();
        cfg.metrics.addr = "127.0.0.1:0".into();
        cfg.topology.prefix = unique("c");
        cfg.worker.heartbeat_ms = 500;
        cfg.worker.pull_expires_ms = 2_000;
        cfg.worker.publish_retry_delay_ms = 200;
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client);
        let topo = Topology::build(&cfg.topology);
        mtx_subjects::apply::apply(&js, &topo).await.unwrap();
        let open = |b: &str| {
            let name = topo.bucket(b).unwrap().to_string();
            let js = js.clone();
            async move { js.get_key_value(name).await.unwrap() }
        };
        let strategies = open(buckets::STRATEGIES).await;
        let allocations = open(buckets::ALLOCATIONS).await;
        let system = open(buckets::SYSTEM).await;
        let state = open(buckets::ACCOUNT_STATE).await;
        let env = Env {
            subjects: Subjects::new(&cfg.topology.prefix),
            _nats: nats,
            cfg,
            js,
            topo,
            state,
            system,
            allocations: allocations.clone(),
            shutdown: CancellationToken::new(),
        };
        let s = strategy(SPX);
        strategies
            .put(
                StrategyConfig::kv_key(SPX),
                serde_json::to_vec(&s).unwrap().into(),
            )
            .await
            .unwrap();
        env.set_allocation("89.36").await;
        env.put_state(&fresh_state(d("1000000"))).await;
        env
    }

    async fn set_allocation(&self, pct: &str) {
        let a = ActiveAllocation {
            allocation_id: format!("alloc_{pct}"),
            allocations: [(SPX.to_string(), d(pct))].into_iter().collect(),
        };
        self.allocations
            .put(
                worker::ALLOCATION_KEY,
                serde_json::to_vec(&a).unwrap().into(),
            )
            .await
            .unwrap();
    }

    async fn put_state(&self, s: &AccountState) {
        self.state
            .put(
                account_state_key(ACCOUNT),
                serde_json::to_vec(s).unwrap().into(),
            )
            .await
            .unwrap();
    }

    /// One replica: a full process running the `cerebro` pool.
    async fn replica(&self) -> (Arc<Cerebro>, tokio::task::JoinHandle<()>) {
        let mut p = Process::start(self.cfg.clone(), self.shutdown.clone())
            .await
            .unwrap();
        let c = worker::spawn(&mut p).await.unwrap();
        (c, tokio::spawn(p.wait()))
    }

    async fn publish(&self, s: &StandardizedSignal) {
        let subject = self
            .subjects
            .signals_standardized(s.environment, &s.strategy_id)
            .unwrap();
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", s.signal_id.as_str());
        h.insert("Mtx-Signal-Id", s.signal_id.as_str());
        self.js
            .publish_with_headers(subject, h, serde_json::to_vec(s).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn read<T: serde::de::DeserializeOwned>(&self, stream: &str, filter: &str) -> Vec<T> {
        let st = self
            .js
            .get_stream(self.topo.stream_name(stream))
            .await
            .unwrap();
        let c = st
            .create_consumer(consumer::pull::Config {
                filter_subject: self.subjects.raw_subject(filter),
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut out = Vec::new();
        loop {
            let mut batch = c
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_millis(300))
                .messages()
                .await
                .unwrap();
            let mut got = 0;
            while let Some(Ok(m)) = batch.next().await {
                out.push(serde_json::from_slice(&m.payload).unwrap());
                got += 1;
            }
            if got == 0 {
                break;
            }
        }
        out
    }

    async fn decisions(&self) -> Vec<DecisionRecord> {
        self.read(streams::CEREBRO_DECISIONS, "cerebro.decisions.>")
            .await
    }

    async fn orders(&self) -> Vec<Order> {
        self.read(streams::ORDERS, "orders.*.new").await
    }

    /// Wait until the `cerebro` consumer has settled everything.
    async fn drained(&self) {
        let st = self
            .js
            .get_stream(self.topo.stream_name(streams::SIGNALS_STANDARDIZED))
            .await
            .unwrap();
        let mut c: consumer::PullConsumer = st.get_consumer(worker::DURABLE).await.unwrap();
        let start = Instant::now();
        loop {
            let i = c.info().await.unwrap();
            if i.num_pending == 0 && i.num_ack_pending == 0 {
                return;
            }
            assert!(start.elapsed() < T, "consumer not drained");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait for the decision of `signal_id`.
    async fn decision_of(&self, signal_id: &str, timeout: Duration) -> Option<DecisionRecord> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(r) = self
                .decisions()
                .await
                .into_iter()
                .find(|r| r.signal_id == signal_id)
            {
                return Some(r);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
}

fn fresh_state(equity: Decimal) -> AccountState {
    let mut s = account_state(equity);
    s.timestamp = Utc::now();
    s
}

/// The AAPL fixture (10 @ 150, sender equity 500,000), fresh, with its own id.
fn aapl(tag: &str) -> StandardizedSignal {
    let mut s = fixture("equity_simple_signal_1.json").remove(0);
    s.signal_id = derive_id("sig", &["test", tag]);
    s.sender_signal_id = tag.to_string();
    s.timestamp = Utc::now();
    s.received_at = Utc::now();
    s
}

fn exit_of(entry: &StandardizedSignal, tag: &str, link: bool) -> StandardizedSignal {
    let mut s = aapl(tag);
    s.action = Some(SignalAction::Exit);
    s.signal_type = Some(SignalType::Exit);
    s.entry_signal_id = link.then(|| entry.signal_id.clone());
    for l in &mut s.legs {
        l.side = Side::Sell;
        l.direction = Direction::Long;
    }
    s
}

async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aapl_fixture_decision_and_order_published_and_reserved_once() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    let sig = aapl("a1");
    env.publish(&sig).await;
    let r = env.decision_of(&sig.signal_id, T).await.expect("decision");
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("17"));
    assert_eq!(r.account.as_deref(), Some(ACCOUNT));
    assert_eq!(r.risk_assessment.margin_required, Some(d("637.50")));
    let orders = env.orders().await;
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0].order_id, order_id(&sig.signal_id, 0));
    assert_eq!(orders[0].quantity, d("17"));
    assert_eq!(orders[0].side, Side::Buy);
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    assert_eq!(book.held.len(), 1);
    assert_eq!(book.held[&sig.signal_id].legs[0].margin, d("637.50"));

    // The same signal again (a redelivery past the stream's dedupe: new
    // message id): reserved once, the order id unchanged and deduplicated.
    let mut again = sig.clone();
    again.sender_signal_id = "a1-again".into();
    let subject = env
        .subjects
        .signals_standardized(again.environment, &again.strategy_id)
        .unwrap();
    env.js
        .publish(subject, serde_json::to_vec(&again).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    env.drained().await;
    assert_eq!(
        env.decisions().await.len(),
        1,
        "decision deduplicated by msg id"
    );
    assert_eq!(
        env.orders().await.len(),
        1,
        "order deduplicated by order id"
    );
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    assert_eq!(book.held.len(), 1);
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_switch_rejects_entries_but_exits_go_through() {
    let env = Env::new().await;
    let mut st = fresh_state(d("1000000"));
    st.open_positions.push(OpenPosition {
        strategy_id: SPX.into(),
        instrument: "AAPL".into(),
        direction: Direction::Long,
        quantity: d("17"),
        entry_price: d("150"),
        current_price: d("150"),
        unrealized_pnl: Decimal::ZERO,
        margin_required: d("637.50"),
    });
    st.margin_used = d("637.50");
    st.margin_available = d("999362.50");
    st.deployed_capital.insert(SPX.into(), d("637.50"));
    env.put_state(&st).await;
    let (c, _h) = env.replica().await;
    env.system.put("kill_switch", "true".into()).await.unwrap();
    assert!(wait_until(T, || !c.system().trading_enabled).await);

    let entry = aapl("k1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Rejected);
    assert_eq!(r.reason_code, "kill_switch");

    let exit = exit_of(&entry, "k2", false);
    env.publish(&exit).await;
    let r = env.decision_of(&exit.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("17"));
    let orders = env.orders().await;
    assert_eq!(orders.len(), 1, "only the exit's order");
    assert_eq!(
        (orders[0].action, orders[0].side, orders[0].quantity),
        (SignalAction::Exit, Side::Sell, d("17"))
    );

    // Trading back on: entries approved again, no restart.
    env.system.put("kill_switch", "false".into()).await.unwrap();
    assert!(wait_until(T, || c.system().trading_enabled).await);
    let e2 = aapl("k3");
    env.publish(&e2).await;
    let r = env.decision_of(&e2.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocation_change_in_kv_applies_to_the_next_signal() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    let s1 = aapl("al1");
    env.publish(&s1).await;
    let r = env.decision_of(&s1.signal_id, T).await.unwrap();
    assert_eq!(r.final_quantity, d("17"));
    assert_eq!(r.risk_assessment.allocation_pct, Some(d("89.36")));

    env.set_allocation("44.68").await;
    assert!(
        wait_until(T, || c
            .allocation()
            .is_some_and(|a| a.allocations[SPX] == d("44.68")))
        .await
    );
    let s2 = aapl("al2");
    env.publish(&s2).await;
    let r = env.decision_of(&s2.signal_id, T).await.unwrap();
    // 10 × (446,800 − 637.50 reserved) / 500,000 = 8.9 → 8.
    assert_eq!(r.risk_assessment.allocation_pct, Some(d("44.68")));
    assert_eq!(r.final_quantity, d("8"), "{}", r.legs[0].logic);

    // Allocation removed: entries rejected with no_allocation.
    env.allocations
        .delete(worker::ALLOCATION_KEY)
        .await
        .unwrap();
    assert!(wait_until(T, || c.allocation().is_none()).await);
    let s3 = aapl("al3");
    env.publish(&s3).await;
    let r = env.decision_of(&s3.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Rejected);
    assert_eq!(r.reason_code, "no_allocation");
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_before_entry_fill_is_deferred_without_blocking_then_completes() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    let entry = aapl("x1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(r.final_quantity, d("17"));
    let oid = order_id(&entry.signal_id, 0);

    // The accounts stage reports the order working, unfilled.
    let mut st = fresh_state(d("1000000"));
    st.open_orders.push(OpenOrder {
        order_id: oid.clone(),
        instrument: "AAPL".into(),
        side: Side::Buy,
        quantity: d("17"),
        order_type: OrderType::Market,
        price: Some(d("150")),
    });
    env.put_state(&st).await;
    assert!(
        wait_until(T, || c
            .account_state(ACCOUNT)
            .is_some_and(|s| !s.open_orders.is_empty()))
        .await
    );

    let exit = exit_of(&entry, "x2", true);
    env.publish(&exit).await;
    // Meanwhile another signal is decided.
    let other = aapl("x3");
    env.publish(&other).await;
    let r = env.decision_of(&other.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        env.decisions()
            .await
            .iter()
            .all(|r| r.signal_id != exit.signal_id),
        "exit must wait for the fill"
    );
    // The working order was seen: the reservation book says so.
    let book: ReservationBook = c.reservation_book(ACCOUNT).await.unwrap();
    assert!(book.held[&entry.signal_id].legs[0].seen);

    // The fill is booked: position 17, order gone.
    let mut st = fresh_state(d("1000000"));
    st.open_positions.push(OpenPosition {
        strategy_id: SPX.into(),
        instrument: "AAPL".into(),
        direction: Direction::Long,
        quantity: d("17"),
        entry_price: d("150"),
        current_price: d("150"),
        unrealized_pnl: Decimal::ZERO,
        margin_required: d("637.50"),
    });
    st.margin_used = d("637.50");
    st.margin_available = d("999362.50");
    st.deployed_capital.insert(SPX.into(), d("637.50"));
    env.put_state(&st).await;

    let r = env
        .decision_of(&exit.signal_id, Duration::from_secs(40))
        .await
        .expect("exit decided after the fill");
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("17"));
    let orders = env.orders().await;
    let close = orders
        .iter()
        .find(|o| o.signal_id == exit.signal_id)
        .unwrap();
    assert_eq!((close.side, close.quantity), (Side::Sell, d("17")));
    // The entry's reservation is released (booked).
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    assert!(!book.held.contains_key(&entry.signal_id));
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_replicas_never_approve_more_margin_than_the_account_has() {
    let env = Env::new().await;
    // Equity 1,000,000: utilisation cap 80 % = 800,000 margin is the binding
    // limit. Each signal asks 100 AAPL @ 150 = 3,750 margin; 1,000 of them
    // ask 3,750,000.
    let mut replicas = Vec::new();
    for _ in 0..4 {
        replicas.push(env.replica().await);
    }
    let signals: Vec<StandardizedSignal> = (0..1000)
        .map(|i| {
            let mut s = aapl(&format!("cc{i}"));
            s.sizing_mode = SizingMode::FixedUnits;
            s.legs[0].quantity = d("100");
            s.quantity = d("100");
            s
        })
        .collect();
    let mut set = tokio::task::JoinSet::new();
    for chunk in signals.chunks(100) {
        let chunk = chunk.to_vec();
        let js = env.js.clone();
        let subjects = env.subjects.clone();
        set.spawn(async move {
            let mut acks = Vec::new();
            for s in &chunk {
                let subject = subjects
                    .signals_standardized(s.environment, &s.strategy_id)
                    .unwrap();
                let mut h = HeaderMap::new();
                h.insert("Nats-Msg-Id", s.signal_id.as_str());
                acks.push(
                    js.publish_with_headers(subject, h, serde_json::to_vec(s).unwrap().into())
                        .await
                        .unwrap(),
                );
            }
            for a in acks {
                a.await.unwrap();
            }
        });
    }
    while set.join_next().await.is_some() {}
    let start = Instant::now();
    let mut decisions = Vec::new();
    while start.elapsed() < Duration::from_secs(120) {
        decisions = env.decisions().await;
        if decisions.len() >= 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(decisions.len(), 1000, "every signal decided exactly once");
    let ids: std::collections::BTreeSet<_> = decisions.iter().map(|r| &r.signal_id).collect();
    assert_eq!(ids.len(), 1000);
    let approved: Vec<&DecisionRecord> = decisions
        .iter()
        .filter(|r| matches!(r.decision, Decision::Approved | Decision::Modified))
        .collect();
    let total: Decimal = approved
        .iter()
        .map(|r| r.risk_assessment.margin_required.unwrap_or_default())
        .sum();
    let cap = d("800000");
    assert!(total <= cap, "approved margin {total} exceeds {cap}");
    assert!(
        total >= d("790000"),
        "capacity should be used: approved {total}"
    );
    // The book agrees with the decisions.
    let book = replicas[0].0.reservation_book(ACCOUNT).await.unwrap();
    let reserved: Decimal = book
        .held
        .values()
        .flat_map(|h| h.legs.iter().map(|l| l.margin))
        .sum();
    assert_eq!(reserved, total);
    assert_eq!(book.held.len(), approved.len());
    // Every approval's orders are published once.
    let orders = env.orders().await;
    assert_eq!(orders.len(), approved.len());
    let ordered: Decimal = orders
        .iter()
        .map(|o| o.cerebro_decision.as_ref().unwrap().margin_required)
        .sum();
    assert_eq!(ordered, total);
    eprintln!(
        "4 replicas: {} approved / {} decisions, margin {total}, in {:?}",
        approved.len(),
        decisions.len(),
        start.elapsed()
    );
    assert!(reservations_key(ACCOUNT).starts_with("reservations."));
    env.shutdown.cancel();
}

/// Decisions per second of one replica, end to end (publish → decision
/// stored). `cargo test -p mtx-cerebro --release --test worker -- --ignored --nocapture bench`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_one_replica_decisions_per_second() {
    let env = Env::new().await;
    env.put_state(&fresh_state(d("1000000000"))).await;
    let (c, _h) = env.replica().await;
    assert!(
        wait_until(T, || c
            .account_state(ACCOUNT)
            .is_some_and(|s| s.equity == d("1000000000")))
        .await
    );
    let n = 3000;
    let signals: Vec<StandardizedSignal> = (0..n)
        .map(|i| {
            let mut s = aapl(&format!("b{i}"));
            s.sizing_mode = SizingMode::FixedUnits;
            s
        })
        .collect();
    let start = Instant::now();
    for chunk in signals.chunks(500) {
        let mut acks = Vec::new();
        for s in chunk {
            let subject = env
                .subjects
                .signals_standardized(s.environment, &s.strategy_id)
                .unwrap();
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", s.signal_id.as_str());
            acks.push(
                env.js
                    .publish_with_headers(subject, h, serde_json::to_vec(s).unwrap().into())
                    .await
                    .unwrap(),
            );
        }
        for a in acks {
            a.await.unwrap();
        }
    }
    let st = env
        .js
        .get_stream(env.topo.stream_name(streams::CEREBRO_DECISIONS))
        .await
        .unwrap();
    loop {
        let mut st = st.clone();
        if st.info().await.unwrap().state.messages >= n as u64 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(300));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let el = start.elapsed();
    let approved = env
        .decisions()
        .await
        .iter()
        .filter(|r| r.decision == Decision::Approved)
        .count();
    eprintln!(
        "one replica: {n} decisions ({approved} approved) in {el:?} = {:.0} decisions/s",
        n as f64 / el.as_secs_f64()
    );
    env.shutdown.cancel();
}
