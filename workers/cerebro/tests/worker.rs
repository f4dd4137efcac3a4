//! The Cerebro worker against a real nats-server: standardized signals and KV
//! inputs in, decisions and orders out.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use async_nats::HeaderMap;
use chrono::Utc;
use common::{account_state, d, fixture, strategy, ACCOUNT, SPX};
use futures::StreamExt;
use mtx_cerebro::worker::{self, reservations_key, Cerebro, ReservationBook, Settings};
use mtx_cerebro::{ActiveAllocation, CvarSkip, DecisionRecord, Reason};
use mtx_harness::{unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::ids::{derive_id, order_id};
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{
    account_state_key, AccountState, ExecutionConfirmation, OpenOrder, OpenPosition, Order,
    OrderEvent,
};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::{
    Decision, Direction, ExecutionStatus, InstrumentType, OrderStatus, OrderType, Side,
    SignalAction, SignalType, SizingMode,
};
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
    strategies: kv::Store,
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
        // Never another test's (or a local dev server's) backtests.
        cfg.mongo.trading_db = unique("db");
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
            strategies,
            shutdown: CancellationToken::new(),
        };
        env.put_strategy(&strategy(SPX)).await;
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

    async fn put_strategy(&self, s: &StrategyConfig) {
        self.strategies
            .put(
                StrategyConfig::kv_key(&s.strategy_id),
                serde_json::to_vec(s).unwrap().into(),
            )
            .await
            .unwrap();
    }

    /// One replica: a full process running the `cerebro` pool.
    async fn replica(&self) -> (Arc<Cerebro>, tokio::task::JoinHandle<()>) {
        self.replica_with(|_| {}).await
    }

    /// One replica with adjusted settings.
    async fn replica_with(
        &self,
        tune: impl FnOnce(&mut Settings),
    ) -> (Arc<Cerebro>, tokio::task::JoinHandle<()>) {
        let (c, h, _) = self.replica_metered(tune).await;
        (c, h)
    }

    /// [`Env::replica_with`], with the process's metrics registry.
    async fn replica_metered(
        &self,
        tune: impl FnOnce(&mut Settings),
    ) -> (
        Arc<Cerebro>,
        tokio::task::JoinHandle<()>,
        prometheus::Registry,
    ) {
        let mut p = Process::start(self.cfg.clone(), self.shutdown.clone())
            .await
            .unwrap();
        let mut settings = Settings::from_config(&p.config);
        tune(&mut settings);
        let c = worker::spawn_with(&mut p, settings).await.unwrap();
        let registry = p.registry.clone();
        (c, tokio::spawn(p.wait()), registry)
    }

    /// Give the test strategy a `max_position_size` of `notional`.
    async fn limit_position_size(&self, notional: &str) {
        let mut s = strategy(SPX);
        s.risk_limits = Some(mtx_cerebro::RiskLimits {
            max_position_size: Some(d(notional)),
            ..Default::default()
        });
        self.put_strategy(&s).await;
    }

    async fn publish_mark(&self, symbol: &str, price: &str) {
        let m = MarketPrice {
            symbol: symbol.into(),
            price: d(price),
            timestamp: Utc::now(),
            source: Some("test".into()),
        };
        self.publish_json(self.subjects.market_price(symbol).unwrap(), &m)
            .await;
    }

    /// Publish `body` as JSON on `subject`, acked.
    async fn publish_json(
        &self,
        subject: String,
        body: &impl serde::Serialize,
    ) -> async_nats::jetstream::publish::PublishAck {
        self.js
            .publish(subject, serde_json::to_vec(body).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap()
    }

    /// The venue's events of a market order filled at once, in one message as
    /// the venue sends them: SUBMITTED, ACCEPTED, then FILLED with `filled`.
    async fn publish_filled(&self, order_id: &str, filled: Decimal) {
        let e = |seq, status, previous_status, filled_quantity| OrderEvent {
            order_id: order_id.into(),
            account: ACCOUNT.into(),
            status,
            previous_status,
            filled_quantity,
            avg_fill_price: (status == OrderStatus::Filled).then(|| d("150")),
            reason: None,
            timestamp: Utc::now(),
            seq,
        };
        let step = [
            e(1, OrderStatus::Submitted, None, Decimal::ZERO),
            e(
                2,
                OrderStatus::Accepted,
                Some(OrderStatus::Submitted),
                Decimal::ZERO,
            ),
            e(3, OrderStatus::Filled, Some(OrderStatus::Accepted), filled),
        ];
        self.publish_json(self.subjects.orders_events(ACCOUNT).unwrap(), &step)
            .await;
    }

    /// The venue's execution report of a whole AAPL entry fill at 150; its
    /// `EXECUTIONS` stream sequence.
    async fn publish_execution(&self, order_id: &str, quantity: Decimal) -> u64 {
        let x = ExecutionConfirmation {
            execution_id: format!("exe_{order_id}"),
            order_id: order_id.into(),
            account: ACCOUNT.into(),
            strategy_id: SPX.into(),
            instrument: "AAPL".into(),
            instrument_type: InstrumentType::Stock,
            direction: Direction::Long,
            action: SignalAction::Entry,
            side: Side::Buy,
            quantity,
            price: d("150"),
            commission: d("0.255"),
            multiplier: Decimal::ONE,
            status: ExecutionStatus::Filled,
            broker_response: serde_json::Value::Null,
            timestamp: Utc::now(),
        };
        self.publish_json(self.subjects.executions(ACCOUNT).unwrap(), &x)
            .await
            .sequence
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
        let stream = self.topo.stream_name(stream);
        mtx_harness::bus::read_all(&self.js, &stream, &self.subjects.raw_subject(filter))
            .await
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
    }

    async fn decisions(&self) -> Vec<DecisionRecord> {
        self.read(streams::CEREBRO_DECISIONS, "cerebro.decisions.>")
            .await
    }

    /// No decision of `signal_id` is on the stream (yet).
    async fn undecided(&self, signal_id: &str) -> bool {
        self.decisions()
            .await
            .iter()
            .all(|r| r.signal_id != signal_id)
    }

    async fn orders(&self) -> Vec<Order> {
        self.read(streams::ORDERS, "orders.*.new").await
    }

    /// Wait until the `cerebro` consumer has settled everything.
    async fn drained(&self) {
        self.drained_within(T).await
    }

    /// The pool's durable consumer on `SIGNALS_STANDARDIZED`.
    async fn cerebro_consumer(&self) -> consumer::PullConsumer {
        let st = self
            .js
            .get_stream(self.topo.stream_name(streams::SIGNALS_STANDARDIZED))
            .await
            .unwrap();
        st.get_consumer(worker::DURABLE).await.unwrap()
    }

    /// [`Env::drained`] with its own timeout.
    async fn drained_within(&self, timeout: Duration) {
        let mut c = self.cerebro_consumer().await;
        let start = Instant::now();
        loop {
            let i = c.info().await.unwrap();
            if i.num_pending == 0 && i.num_ack_pending == 0 {
                return;
            }
            assert!(start.elapsed() < timeout, "consumer not drained");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `n` decisions are on their stream; panics once 600 s have
    /// passed since `start`.
    async fn await_decisions(&self, n: usize, start: Instant) {
        let st = self
            .js
            .get_stream(self.topo.stream_name(streams::CEREBRO_DECISIONS))
            .await
            .unwrap();
        loop {
            let mut st = st.clone();
            if st.info().await.unwrap().state.messages >= n as u64 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(600));
            tokio::time::sleep(Duration::from_millis(20)).await;
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

/// An approved entry's record travels with its decision and order; the
/// signal is acked only once the record is stored. Here the bucket refuses
/// the record (its stream is told to take only the books' keys for a
/// while): decision and order go out, the signal is not
/// acked and comes back; once the bucket accepts writes again a redelivery
/// stores the record, with no second decision or order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_record_the_bucket_refuses_is_stored_by_a_redelivery() {
    let env = Env::new().await;
    let (_c, _h) = env.replica().await;
    let sig = aapl("rec1");
    let key = worker::entry_key(&sig.signal_id);
    let stream = env.state.stream_name.clone();
    // Refusing: the bucket's stream takes only the reservation books' keys,
    // so the record's put finds no stream (the book write still works).
    let set_refuse = |on: bool| {
        let (js, stream) = (env.js.clone(), stream.clone());
        async move {
            let mut st = js.get_stream(&stream).await.unwrap();
            let mut cfg = st.info().await.unwrap().config.clone();
            let all = cfg.subjects[0]
                .trim_end_matches('>')
                .trim_end_matches("reservations.")
                .to_string();
            cfg.subjects = vec![if on {
                format!("{all}reservations.>")
            } else {
                format!("{all}>")
            }];
            js.update_stream(&cfg).await.unwrap();
        }
    };
    set_refuse(true).await;
    env.publish(&sig).await;
    let r = env
        .decision_of(&sig.signal_id, T)
        .await
        .expect("decision published with the record");
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    // The record's publish failed: the signal was not acked and is handled again.
    let mut c = env.cerebro_consumer().await;
    let start = Instant::now();
    loop {
        let i = c.info().await.unwrap();
        if i.num_redelivered > 0 {
            assert_eq!(i.ack_floor.stream_sequence, 0, "not acked");
            break;
        }
        assert!(start.elapsed() < T, "the signal must come back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(env.state.get(&key).await.unwrap().is_none(), "not stored");

    set_refuse(false).await;
    env.drained().await;
    let stored: serde_json::Value =
        serde_json::from_slice(&env.state.get(&key).await.unwrap().unwrap()).unwrap();
    assert_eq!(stored["account"], ACCOUNT);
    assert_eq!(stored["strategy_id"], SPX);
    let legs = stored["legs"].as_array().expect("legs");
    assert_eq!(legs.len(), 1);
    assert_eq!(env.decisions().await.len(), 1, "one decision");
    let orders = env.orders().await;
    assert_eq!(orders.len(), 1, "one order");
    assert_eq!(orders[0].order_id, order_id(&sig.signal_id, 0));
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
        multiplier: None,
    });
    st.margin_used = d("637.50");
    st.margin_available = d("999362.50");
    st.deployed_capital.insert(SPX.into(), d("637.50"));
    env.put_state(&st).await;
    let (c, _h, registry) = env.replica_metered(|_| {}).await;
    let metrics = || mtx_runtime::metrics::render(&registry);
    assert!(
        metrics().contains("\nmtx_trading_enabled 1\n"),
        "{}",
        metrics()
    );
    env.system.put("kill_switch", "true".into()).await.unwrap();
    assert!(wait_until(T, || !c.system().trading_enabled).await);
    // The gauge follows the kill switch live (ops contract, METRICS.md).
    assert!(
        metrics().contains("\nmtx_trading_enabled 0\n"),
        "{}",
        metrics()
    );

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
    assert!(
        metrics().contains("\nmtx_trading_enabled 1\n"),
        "{}",
        metrics()
    );
    let e2 = aapl("k3");
    env.publish(&e2).await;
    let r = env.decision_of(&e2.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    // One line per (outcome, typed reason code); `none` when approved.
    let text = metrics();
    for line in [
        "mtx_decisions_total{outcome=\"rejected\",reason=\"kill_switch\"} 1",
        "mtx_decisions_total{outcome=\"approved\",reason=\"none\"} 2",
    ] {
        assert!(text.contains(line), "missing `{line}` in {text}");
    }
    assert_eq!(text.matches("mtx_decisions_total{").count(), 2, "{text}");
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
        env.undecided(&exit.signal_id).await,
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
        multiplier: None,
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
async fn an_exit_goes_out_once_the_fill_event_and_the_position_are_known() {
    let env = Env::new().await;
    // No grace can settle the entry's reservation during the test: the
    // exit can only learn the fill from the order event.
    let (c, _h) = env
        .replica_with(|s| {
            s.booking_grace = chrono::Duration::hours(1);
            s.unbooked_grace = chrono::Duration::hours(2);
        })
        .await;
    let entry = aapl("f1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(r.final_quantity, d("17"));
    let oid = order_id(&entry.signal_id, 0);
    let exit = exit_of(&entry, "f2", true);
    env.publish(&exit).await;
    // Nothing known of the entry's order: the exit waits.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        env.undecided(&exit.signal_id).await,
        "exit must wait for the fill"
    );
    // The venue fills it; the accounts stage books the position.
    env.publish_filled(&oid, d("17")).await;
    assert!(wait_until(T, || c.ended_order(&oid).is_some()).await);
    env.put_state(&holding_aapl("1000000")).await;
    let r = env
        .decision_of(&exit.signal_id, T)
        .await
        .expect("exit decided from the fill event");
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17")),
        "{}",
        r.reason
    );
    // Decided on the event alone: the entry's margin is still reserved
    // (its booking is not proven yet).
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    assert!(book.held.contains_key(&entry.signal_id));

    // The execution report (sequence `seq` on EXECUTIONS): a state that has
    // not processed it keeps the reservation; the first state that has
    // releases it at once, long before any grace.
    let seq = env.publish_execution(&oid, d("17")).await;
    let mut before = holding_aapl("1000000");
    before.executions_seq = Some(seq - 1);
    env.put_state(&before).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    assert!(book.held.contains_key(&entry.signal_id), "not booked yet");
    let mut booked = holding_aapl("1000000");
    booked.executions_seq = Some(seq);
    env.put_state(&booked).await;
    let mut released = false;
    for _ in 0..100 {
        let book = c.reservation_book(ACCOUNT).await.unwrap();
        if !book.held.contains_key(&entry.signal_id) {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        released,
        "a state booking the last execution releases the entry"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_from_the_market_stream_drive_the_slippage_rule() {
    let env = Env::new().await;
    // Published before the replica starts: loaded at start (last per symbol).
    env.publish_mark("AAPL", "160").await;
    let (c, _h) = env.replica().await;
    assert_eq!(c.mark("AAPL").map(|m| m.price), Some(d("160")));

    // BUY 10 @ 150 with the market at 160: 6.67 % adverse drift against an
    // expected alpha of 2 % (limit 30 % = 0.006).
    let far = aapl("m1");
    env.publish(&far).await;
    let r = env.decision_of(&far.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Rejected, "{}", r.reason);
    assert_eq!(r.reason_code, "slippage");
    let Some(Reason::Slippage {
        limit,
        actual,
        fraction,
        expected_alpha,
        price_drift,
        ..
    }) = r.reason_detail.clone()
    else {
        panic!("{:?}", r.reason_detail)
    };
    let drift = (d("160") - d("150")) / d("150");
    assert_eq!(price_drift, drift);
    assert_eq!(
        (limit, fraction, expected_alpha),
        (d("0.006"), d("0.30"), d("0.02"))
    );
    assert!(actual >= drift && actual > limit, "{actual}");
    let sl = r.risk_assessment.slippage.as_ref().unwrap();
    assert_eq!(sl.legs_with_mark, 1);
    assert_eq!(sl.price_drift, drift);

    // The market comes back next to the signal price: approved, the small
    // drift recorded, the order referenced at the mark.
    env.publish_mark("AAPL", "150.15").await;
    assert!(wait_until(T, || c.mark("AAPL").is_some_and(|m| m.price == d("150.15"))).await);
    let close = aapl("m2");
    env.publish(&close).await;
    let r = env.decision_of(&close.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    let sl = r.risk_assessment.slippage.as_ref().unwrap();
    assert_eq!(sl.legs_with_mark, 1);
    assert_eq!(sl.price_drift, d("0.001"));
    assert!(sl.alpha_lost < d("0.006"), "{sl:?}");
    let order = env
        .orders()
        .await
        .into_iter()
        .find(|o| o.signal_id == close.signal_id)
        .unwrap();
    assert_eq!(order.price, Some(d("150.15")));
    env.shutdown.cancel();
}

fn holding_aapl(equity: &str) -> AccountState {
    let mut st = fresh_state(d(equity));
    st.open_positions.push(OpenPosition {
        strategy_id: SPX.into(),
        instrument: "AAPL".into(),
        direction: Direction::Long,
        quantity: d("17"),
        entry_price: d("150"),
        current_price: d("150"),
        unrealized_pnl: Decimal::ZERO,
        margin_required: d("637.50"),
        multiplier: None,
    });
    st.margin_used = d("637.50");
    st.margin_available = st.equity - st.margin_used;
    st.deployed_capital.insert(SPX.into(), d("637.50"));
    st
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_daily_loss_from_the_accounts_strategy_pnl_today() {
    let env = Env::new().await;
    let mut s = strategy(SPX);
    s.risk_limits = Some(mtx_cerebro::RiskLimits {
        max_daily_loss: Some(d("5000")),
        ..Default::default()
    });
    env.put_strategy(&s).await;
    let mut st = holding_aapl("1000000");
    st.strategy_pnl_today.insert(SPX.into(), d("-5000.00"));
    st.strategy_pnl_today.insert("Forex".into(), d("-90000"));
    env.put_state(&st).await;
    let (c, _h) = env.replica().await;

    let entry = aapl("dl1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Rejected, "{}", r.reason);
    assert_eq!(
        r.reason_detail,
        Some(Reason::DailyLossLimit {
            limit: d("5000"),
            actual: d("5000.00"),
        })
    );
    assert_eq!(r.risk_assessment.pnl_today, Some(d("-5000.00")));

    // Reducing risk is still allowed.
    let exit = exit_of(&entry, "dl2", false);
    env.publish(&exit).await;
    let r = env.decision_of(&exit.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("17"));

    // The loss recovers above the limit: entries pass again, no restart.
    st.strategy_pnl_today.insert(SPX.into(), d("-4999.99"));
    st.timestamp = Utc::now();
    env.put_state(&st).await;
    assert!(
        wait_until(T, || c
            .account_state(ACCOUNT)
            .is_some_and(|s| s.strategy_pnl_today[SPX] == d("-4999.99")))
        .await
    );
    let again = aapl("dl3");
    env.publish(&again).await;
    let r = env.decision_of(&again.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.risk_assessment.pnl_today, Some(d("-4999.99")));
    env.shutdown.cancel();
}

/// A `strategy_backtest_data` document as `mtx backtest ingest` writes it;
/// `reversed` stores the days newest first (CVaR must align by date).
fn backtest_doc(s: &mtx_cerebro::ReturnSeries, reversed: bool) -> mongodb::bson::Document {
    use mongodb::bson::{doc, Bson, DateTime as BsonDate};
    let mut rows: Vec<(Bson, Bson)> = s
        .dates
        .iter()
        .zip(&s.daily_returns)
        .map(|(day, r)| {
            let ms = day
                .and_hms_opt(0, 0, 0)
                .unwrap()
                .and_utc()
                .timestamp_millis();
            (Bson::DateTime(BsonDate::from_millis(ms)), Bson::Double(*r))
        })
        .collect();
    if reversed {
        rows.reverse();
    }
    let (dates, returns): (Vec<Bson>, Vec<Bson>) = rows.into_iter().unzip();
    doc! {
        "strategy_id": s.strategy_id.clone(),
        "dates": dates,
        "daily_returns": returns,
        "metadata": {"backtest_source": "test"},
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cvar_from_mongo_backtests_and_unavailable_while_mongo_is_down() {
    let mut mongo = MongoServer::start();
    let mut env = Env::new().await;
    env.cfg.mongo.uri = mongo.uri();
    let series = common::backtest_series();
    let pick = |id: &str| series.iter().find(|s| s.strategy_id == id).unwrap();
    {
        let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
        let coll = client
            .database(&env.cfg.mongo.trading_db)
            .collection::<mongodb::bson::Document>("strategy_backtest_data");
        coll.insert_many([
            backtest_doc(pick(SPX), true),
            backtest_doc(pick("Com1-Met"), false),
        ])
        .await
        .unwrap();
    }
    // Com1-Met already runs 100,000 of capital in the account.
    let mut st = fresh_state(d("1000000"));
    st.open_positions.push(OpenPosition {
        strategy_id: "Com1-Met".into(),
        instrument: "HG".into(),
        direction: Direction::Long,
        quantity: d("1"),
        entry_price: d("4"),
        current_price: d("4"),
        unrealized_pnl: Decimal::ZERO,
        margin_required: d("100000"),
        multiplier: None,
    });
    st.margin_used = d("100000");
    st.margin_available = d("900000");
    st.deployed_capital.insert("Com1-Met".into(), d("100000"));
    env.put_state(&st).await;

    // Mongo is down when Cerebro starts: decisions go on, CVaR unavailable.
    mongo.stop();
    let (c, _h, registry) = env
        .replica_metered(|s| s.backtest_retry = Duration::from_millis(300))
        .await;
    assert!(wait_until(T, || c.backtest_state().last_error.is_some()).await);
    // What the MtxBacktestsUnavailable alert watches.
    let gauge = || {
        mtx_runtime::metrics::render(&registry)
            .lines()
            .find_map(|l| {
                l.strip_prefix("mtx_cerebro_backtest_strategies ")?
                    .parse::<i64>()
                    .ok()
            })
    };
    assert_eq!(gauge(), Some(0));
    let s1 = aapl("cv1");
    env.publish(&s1).await;
    let r = env.decision_of(&s1.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    let Some(CvarSkip::Unavailable { reason }) = r.risk_assessment.cvar_skipped.clone() else {
        panic!("{:?}", r.risk_assessment.cvar_skipped)
    };
    assert!(!reason.is_empty());
    assert_eq!(r.risk_assessment.cvar, None);
    // Approved and never booked here (no accounts stage): still reserved.
    let reserved_cv1: f64 = r
        .risk_assessment
        .margin_required
        .unwrap()
        .to_string()
        .parse()
        .unwrap();

    // Mongo back: the next retry loads the backtests, CVaR is evaluated.
    mongo.restart();
    assert!(
        wait_until(Duration::from_secs(60), || c
            .backtest_state()
            .table
            .is_some())
        .await
    );
    assert_eq!(c.backtest_state().strategies, 2);
    assert_eq!(gauge(), Some(2));
    let s2 = aapl("cv2");
    env.publish(&s2).await;
    let r = env.decision_of(&s2.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    let ra = &r.risk_assessment;
    let cvar = ra.cvar.clone().expect("cvar evaluated");
    assert_eq!(ra.cvar_skipped, None);
    // The same numbers as the fixture series aligned by date in memory.
    let table =
        mtx_cerebro::ReturnsTable::new([pick(SPX).clone(), pick("Com1-Met").clone()]).unwrap();
    // What is deployed, plus cv1's margin approved but not booked.
    let exposures = [
        ("Com1-Met".to_string(), 100_000.0),
        (SPX.to_string(), reserved_cv1),
    ]
    .into_iter()
    .collect();
    let margin: f64 = ra.margin_required.unwrap().to_string().parse().unwrap();
    let (expect, corr) = mtx_cerebro::risk::cvar_impact(
        Some(&table),
        &exposures,
        SPX,
        margin,
        1_000_000.0,
        0.95,
        20,
    )
    .unwrap();
    assert_eq!(cvar.observations, expect.observations);
    assert!(cvar.observations > 2000, "{}", cvar.observations);
    assert!(
        (cvar.cvar_before - expect.cvar_before).abs() < 1e-6,
        "{cvar:?} vs {expect:?}"
    );
    assert!(
        (cvar.cvar_after - expect.cvar_after).abs() < 1e-6,
        "{cvar:?} vs {expect:?}"
    );
    assert_eq!(
        ra.cvar_contribution,
        Some(cvar.cvar_after - cvar.cvar_before)
    );
    let got = ra.correlation_impact.clone().unwrap();
    assert!((got.with_strategies["Com1-Met"] - corr.with_strategies["Com1-Met"]).abs() < 1e-9);

    // Mongo gone again: the loaded returns stay in use.
    mongo.stop();
    let s3 = aapl("cv3");
    env.publish(&s3).await;
    let r = env.decision_of(&s3.signal_id, T).await.unwrap();
    assert!(r.risk_assessment.cvar.is_some());
    env.shutdown.cancel();
}

/// A stand-in for the execution and accounts stages: every new order fills
/// at once (a FILLED order event), and every 100 ms the account state shows
/// every fill booked (positions and margin), with no working orders.
struct AccountsSim {
    stop: CancellationToken,
    filled: Arc<std::sync::atomic::AtomicUsize>,
}

impl AccountsSim {
    async fn start(env: &Env, equity: Decimal) -> AccountsSim {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let stop = CancellationToken::new();
        let filled = Arc::new(AtomicUsize::new(0));
        let (js, subjects, state) = (env.js.clone(), env.subjects.clone(), env.state.clone());
        let orders = env
            .js
            .get_stream(env.topo.stream_name(streams::ORDERS))
            .await
            .unwrap()
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: env.subjects.raw_subject("orders.*.new"),
                ..Default::default()
            })
            .await
            .unwrap();
        let mut orders = orders.messages().await.unwrap();
        let (stop2, filled2) = (stop.clone(), filled.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let (mut qty, mut margin) = (Decimal::ZERO, Decimal::ZERO);
            // Fill events are published pipelined, like the venue does.
            let mut acks = futures::stream::FuturesUnordered::new();
            loop {
                tokio::select! {
                    _ = stop2.cancelled() => return,
                    Some(r) = acks.next(), if !acks.is_empty() => {
                        let _: async_nats::jetstream::publish::PublishAck = r;
                        filled2.fetch_add(1, Ordering::Relaxed);
                    }
                    m = orders.next(), if acks.len() < 1024 => {
                        let Some(Ok(m)) = m else { return };
                        let o: Order = serde_json::from_slice(&m.payload).unwrap();
                        let e = OrderEvent {
                            order_id: o.order_id.clone(),
                            account: o.account.clone(),
                            status: OrderStatus::Filled,
                            previous_status: Some(OrderStatus::Submitted),
                            filled_quantity: o.quantity,
                            avg_fill_price: o.price,
                            reason: None,
                            timestamp: Utc::now(),
                            seq: 2,
                        };
                        let ack = js
                            .publish(
                                subjects.orders_events(&o.account).unwrap(),
                                serde_json::to_vec(&e).unwrap().into(),
                            )
                            .await
                            .unwrap();
                        acks.push(async move { ack.await.unwrap() });
                        qty += o.quantity;
                        margin += o.cerebro_decision.map(|c| c.margin_required).unwrap_or_default();
                    }
                    _ = tick.tick() => {
                        let mut st = fresh_state(equity);
                        if qty > Decimal::ZERO {
                            st.open_positions.push(OpenPosition {
                                strategy_id: SPX.into(),
                                instrument: "AAPL".into(),
                                direction: Direction::Long,
                                quantity: qty,
                                entry_price: d("150"),
                                current_price: d("150"),
                                unrealized_pnl: Decimal::ZERO,
                                margin_required: margin,
                                multiplier: None,
                            });
                            st.deployed_capital.insert(SPX.into(), margin);
                        }
                        st.margin_used = margin;
                        st.margin_available = equity - margin;
                        let _ = state
                            .put(account_state_key(ACCOUNT), serde_json::to_vec(&st).unwrap().into())
                            .await;
                    }
                }
            }
        });
        AccountsSim { stop, filled }
    }

    fn filled(&self) -> usize {
        self.filled.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for AccountsSim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Largest reservation book (entries, bytes) written while it runs.
fn watch_book_size(
    env: &Env,
) -> (
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (entries, bytes) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (e2, b2, state) = (entries.clone(), bytes.clone(), env.state.clone());
    tokio::spawn(async move {
        let mut w = state.watch(reservations_key(ACCOUNT)).await.unwrap();
        while let Some(Ok(e)) = w.next().await {
            if let Ok(book) = serde_json::from_slice::<ReservationBook>(&e.value) {
                e2.fetch_max(book.held.len(), Ordering::Relaxed);
                b2.fetch_max(e.value.len(), Ordering::Relaxed);
            }
        }
    });
    (entries, bytes)
}

async fn publish_all(env: &Env, signals: &[StandardizedSignal]) {
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
}

fn fixed_aapl(n: usize, tag: &str) -> Vec<StandardizedSignal> {
    (0..n)
        .map(|i| {
            let mut s = aapl(&format!("{tag}{i}"));
            s.sizing_mode = SizingMode::FixedUnits;
            s
        })
        .collect()
}

/// The number in environment variable `k`, or `default` (bench sizes).
fn env_or(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A bench's world: a fresh [`Env`] whose account holds a billion, one
/// replica (settings changed by `tune`) once it sees that account, and a
/// stand-in accounts stage filling every order.
async fn bench_replica(
    tune: impl FnOnce(&mut Settings),
) -> (Env, Arc<Cerebro>, tokio::task::JoinHandle<()>, AccountsSim) {
    let env = Env::new().await;
    let equity = d("1000000000");
    env.put_state(&fresh_state(equity)).await;
    let (c, h) = env.replica_with(tune).await;
    assert!(
        wait_until(T, || c
            .account_state(ACCOUNT)
            .is_some_and(|s| s.equity == equity))
        .await
    );
    let sim = AccountsSim::start(&env, equity).await;
    (env, c, h, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_approvals_keep_the_reservation_book_bounded() {
    let env = Env::new().await;
    let equity = d("1000000000");
    env.put_state(&fresh_state(equity)).await;
    let (c, _h) = env
        .replica_with(|s| s.booking_grace = chrono::Duration::zero())
        .await;
    let sim = AccountsSim::start(&env, equity).await;
    let (max_entries, max_bytes) = watch_book_size(&env);
    let n = 3000;
    let signals = fixed_aapl(n, "bb");
    let start = Instant::now();
    publish_all(&env, &signals).await;
    env.drained_within(Duration::from_secs(300)).await;
    eprintln!("{n} decisions in {:?}", start.elapsed());
    let decisions = env.decisions().await;
    assert_eq!(decisions.len(), n);
    let not_approved: Vec<_> = decisions
        .iter()
        .filter(|r| r.decision != Decision::Approved)
        .map(|r| &r.reason)
        .collect();
    assert!(
        not_approved.is_empty(),
        "{:?}",
        &not_approved[..not_approved.len().min(3)]
    );
    assert!(wait_until(T, || sim.filled() == n).await);
    // Every fill booked: the book drains completely.
    let mut left = usize::MAX;
    for _ in 0..200 {
        left = c.reservation_book(ACCOUNT).await.unwrap().held.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "reservations left after every fill was booked");
    let (entries, bytes) = (
        max_entries.load(std::sync::atomic::Ordering::Relaxed),
        max_bytes.load(std::sync::atomic::Ordering::Relaxed),
    );
    eprintln!("{n} approvals: largest book {entries} entries, {bytes} bytes");
    assert!(entries > 0);
    // Released as fills are booked: far below the 3,000 it would hold
    // without release (and below the 4,000 cap).
    assert!(entries < n / 2, "book grew to {entries} entries");
    assert!(bytes < worker::MAX_BOOK_BYTES, "book grew to {bytes} bytes");
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbooked_backlog_is_capped_with_a_typed_rejection_and_fills_release_it() {
    let env = Env::new().await;
    env.put_state(&fresh_state(d("1000000000"))).await;
    let (c, _h) = env.replica_with(|s| s.reservation_max_entries = 50).await;
    // The accounts stage is silent: nothing is ever booked.
    let signals = fixed_aapl(80, "cap");
    publish_all(&env, &signals).await;
    env.drained().await;
    let decisions = env.decisions().await;
    assert_eq!(decisions.len(), 80);
    let approved = decisions
        .iter()
        .filter(|r| r.decision == Decision::Approved)
        .count();
    assert_eq!(approved, 50);
    for r in decisions
        .iter()
        .filter(|r| r.decision != Decision::Approved)
    {
        assert_eq!(
            r.reason_detail,
            Some(Reason::ReservationBacklog {
                account: ACCOUNT.into(),
                limit: 50,
                actual: 50
            }),
            "{}",
            r.reason
        );
    }
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    assert_eq!(book.held.len(), 50);

    // The venue reports the fills and the accounts stage books them: the
    // reservations are released and entries pass again.
    for o in env.orders().await {
        env.publish_filled(&o.order_id, o.quantity).await;
    }
    let ids: Vec<String> = env.orders().await.into_iter().map(|o| o.order_id).collect();
    assert!(wait_until(T, || ids.iter().all(|id| c.ended_order(id).is_some())).await);
    let mut st = fresh_state(d("1000000000"));
    st.timestamp = Utc::now() + chrono::Duration::seconds(3);
    env.put_state(&st).await;
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = c.reservation_book(ACCOUNT).await.unwrap().held.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0);
    let more = aapl("cap-more");
    env.publish(&more).await;
    let r = env.decision_of(&more.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    env.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_entries_are_settled_and_every_record_goes_when_too_old() {
    let env = Env::new().await;
    let mut held = holding_aapl("1000000");
    held.strategy_pnl_today.clear();
    let (c, _h) = env.replica().await;
    let key_live = |key: String| {
        let state = env.state.clone();
        async move {
            matches!(state.entry(key).await.unwrap(), Some(e) if e.operation == kv::Operation::Put)
        }
    };
    // 1. An entry rejected by the kill switch.
    env.system.put("kill_switch", "true".into()).await.unwrap();
    assert!(wait_until(T, || !c.system().trading_enabled).await);
    let rejected = aapl("j1");
    env.publish(&rejected).await;
    assert_eq!(
        env.decision_of(&rejected.signal_id, T)
            .await
            .unwrap()
            .decision,
        Decision::Rejected
    );
    env.system.put("kill_switch", "false".into()).await.unwrap();
    assert!(wait_until(T, || c.system().trading_enabled).await);
    // 2. An entry that fills and is exited in full.
    let done = aapl("j2");
    env.publish(&done).await;
    let r = env.decision_of(&done.signal_id, T).await.unwrap();
    assert_eq!(r.final_quantity, d("17"));
    env.publish_filled(&order_id(&done.signal_id, 0), d("17"))
        .await;
    assert!(wait_until(T, || c.ended_order(&order_id(&done.signal_id, 0)).is_some()).await);
    held.timestamp = Utc::now() + chrono::Duration::seconds(3);
    env.put_state(&held).await;
    let exit = exit_of(&done, "j3", true);
    env.publish(&exit).await;
    let r = env.decision_of(&exit.signal_id, T).await.unwrap();
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17")),
        "{}",
        r.reason
    );
    // The exit's order fills: the book stops holding it (until then its
    // entry cannot settle: the exit might still end short).
    let xo = order_id(&exit.signal_id, 0);
    env.publish_filled(&xo, d("17")).await;
    assert!(wait_until(T, || c.ended_order(&xo).is_some()).await);
    held.timestamp = Utc::now() + chrono::Duration::seconds(3);
    env.put_state(&held).await;
    assert!(
        released(&c, &exit.signal_id).await,
        "the filled exit is released"
    );
    // 3. An entry still open (approved, never exited).
    let open = aapl("j4");
    env.publish(&open).await;
    env.decision_of(&open.signal_id, T).await.unwrap();
    let (k1, k2, x2, k4) = (
        worker::entry_key(&rejected.signal_id),
        worker::entry_key(&done.signal_id),
        worker::exits_key(&done.signal_id),
        worker::entry_key(&open.signal_id),
    );
    for k in [&k1, &k2, &x2, &k4] {
        assert!(key_live(k.clone()).await, "{k} written");
    }

    // Within the retention nothing goes.
    let r = c.janitor_pass(Utc::now()).await.unwrap();
    assert_eq!((r.entries, r.entries_purged, r.exits_purged), (3, 0, 0));
    // Two days on: the filled and fully exited entry is settled (its exits
    // folded into the record, the exits key deleted); the rejected one and
    // the open one stay as they are.
    let r = c
        .janitor_pass(Utc::now() + chrono::Duration::days(2))
        .await
        .unwrap();
    assert_eq!(
        (r.entries_purged, r.entries_settled, r.exits_purged),
        (0, 1, 1),
        "{r:?}"
    );
    assert!(
        key_live(k1.clone()).await,
        "a rejected entry's record stays"
    );
    assert!(key_live(k2.clone()).await, "a settled record stays");
    assert!(!key_live(x2.clone()).await);
    assert!(key_live(k4.clone()).await, "an open entry stays");
    let settled: worker::StoredEntry =
        serde_json::from_slice(&env.state.get(&k2).await.unwrap().unwrap()).unwrap();
    assert!(settled.settled);
    assert_eq!(settled.legs[0].closed_quantity, d("17"));
    // A second exit of the closed entry, and an exit of the rejected one,
    // find nothing to close: never the strategy's other AAPL.
    for (entry, tag) in [(&done, "j5"), (&rejected, "j6")] {
        let late = exit_of(entry, tag, true);
        env.publish(&late).await;
        let r = env.decision_of(&late.signal_id, T).await.unwrap();
        assert_eq!(r.decision, Decision::Rejected, "{tag}: {}", r.reason);
    }
    assert_eq!(
        env.orders()
            .await
            .iter()
            .filter(|o| o.action == SignalAction::Exit)
            .count(),
        1,
        "only the first exit closed anything"
    );
    // A later pass leaves a settled record alone.
    let r = c
        .janitor_pass(Utc::now() + chrono::Duration::days(3))
        .await
        .unwrap();
    assert_eq!((r.entries_purged, r.entries_settled), (0, 0), "{r:?}");
    // Past the max age everything goes.
    let r = c
        .janitor_pass(Utc::now() + chrono::Duration::days(31))
        .await
        .unwrap();
    assert_eq!(r.entries_purged, 3, "{r:?}");
    assert!(!key_live(k1).await);
    assert!(!key_live(k2).await);
    assert!(!key_live(k4).await);
    let mut keys = env.state.keys().await.unwrap();
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        assert!(
            !k.starts_with("entries.") && !k.starts_with("exits."),
            "{k} left"
        );
    }
    env.shutdown.cancel();
}

/// Decisions per second of one replica, end to end: signals published to
/// the file-backed `SIGNALS_STANDARDIZED` stream, decided by the real worker
/// (KV reads, reservation CAS, entry record, decision + order published and
/// acked), until every decision is stored. A stand-in accounts stage fills
/// every order and publishes states, so reservations are released as in
/// production (default settings). Release build:
/// `cargo test -p mtx-cerebro --release --test worker -- --ignored --nocapture bench`
/// (`MTX_BENCH_SIGNALS` = signals, default 5000; `MTX_BENCH_BOOKING_GRACE_MS`
/// overrides `booking_grace`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --release -- --ignored --nocapture"]
async fn bench_one_replica_decisions_per_second() {
    let grace: Option<i64> = std::env::var("MTX_BENCH_BOOKING_GRACE_MS")
        .ok()
        .and_then(|v| v.parse().ok());
    let (env, c, _h, _sim) = bench_replica(|s| {
        if let Some(ms) = grace {
            s.booking_grace = chrono::Duration::milliseconds(ms);
        }
    })
    .await;
    let (max_entries, _) = watch_book_size(&env);
    let n = env_or("MTX_BENCH_SIGNALS", 5000);
    let signals = fixed_aapl(n, "bench");
    let start = Instant::now();
    publish_all(&env, &signals).await;
    let published = start.elapsed();
    env.await_decisions(n, start).await;
    let el = start.elapsed();
    let decisions = env.decisions().await;
    let approved = decisions
        .iter()
        .filter(|r| r.decision == Decision::Approved)
        .count();
    eprintln!(
        "one replica: {n} decisions ({approved} approved) in {el:?} (published in {published:?}) = {:.0} decisions/s; largest reservation book {} entries",
        n as f64 / el.as_secs_f64(),
        max_entries.load(std::sync::atomic::Ordering::Relaxed),
    );
    // How far the order-event feed and the releases trail the decisions.
    let ids: Vec<String> = env.orders().await.into_iter().map(|o| o.order_id).collect();
    let all_known = wait_until(Duration::from_secs(60), || {
        ids.iter().all(|id| c.ended_order(id).is_some())
    })
    .await;
    let known = start.elapsed();
    let mut left = usize::MAX;
    while start.elapsed() < Duration::from_secs(120) {
        left = c.reservation_book(ACCOUNT).await.unwrap().held.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "every order end known to the replica: {all_known} after {known:?}; book drained ({left} left) after {:?}",
        start.elapsed()
    );
    env.shutdown.cancel();
}

/// Exit latency of one replica: `MTX_BENCH_SIGNALS` entries (default
/// 4000), each followed five signals later by an EXIT linked to it,
/// published at `MTX_BENCH_RATE` signals/s (default 2000; receive time
/// stamped at publish); the stand-in accounts stage fills every order at
/// once and publishes states every 100 ms. Reports decisions per second and
/// the linked exits' decision latency (decision time − receive time), which
/// includes their deferrals until the entry's fill and position are known.
/// `cargo test -p mtx-cerebro --release --test worker -- --ignored --nocapture bench_exits`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run with --release -- --ignored --nocapture"]
async fn bench_exits_latency() {
    let (env, _c, _h, _sim) = bench_replica(|_| {}).await;
    let (n, rate) = (
        env_or("MTX_BENCH_SIGNALS", 4000),
        env_or("MTX_BENCH_RATE", 2000),
    );
    let entries = fixed_aapl(n, "xb");
    let mut signals = Vec::with_capacity(2 * n);
    let lag = 5;
    for (i, e) in entries.iter().enumerate() {
        signals.push(e.clone());
        if i >= lag {
            let mut x = exit_of(&entries[i - lag], &format!("xbx{i}"), true);
            x.sizing_mode = SizingMode::FixedUnits;
            signals.push(x);
        }
    }
    // Paced: one chunk every 10 ms.
    let per_tick = (rate / 100).max(1);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut received = std::collections::HashMap::new();
    for chunk in signals.chunks_mut(per_tick) {
        tick.tick().await;
        let now = Utc::now();
        for s in chunk.iter_mut() {
            s.received_at = now;
            received.insert(s.signal_id.clone(), now);
        }
        publish_all(&env, chunk).await;
    }
    let published = start.elapsed();
    env.await_decisions(signals.len(), start).await;
    let el = start.elapsed();
    let decisions = env.decisions().await;
    let latency = |exits: bool| {
        let mut ms: Vec<i64> = decisions
            .iter()
            .filter(|r| r.entry_signal_id.is_some() == exits)
            .map(|r| (r.timestamp - received[&r.signal_id]).num_milliseconds())
            .collect();
        ms.sort_unstable();
        let pct = |p: usize| ms[(ms.len() - 1) * p / 100];
        format!(
            "p50 {} ms, p90 {} ms, p99 {} ms, max {} ms",
            pct(50),
            pct(90),
            pct(99),
            pct(100)
        )
    };
    let closed = decisions
        .iter()
        .filter(|r| r.entry_signal_id.is_some() && r.final_quantity > Decimal::ZERO)
        .count();
    let mut others: std::collections::BTreeMap<String, usize> = Default::default();
    for r in decisions
        .iter()
        .filter(|r| r.decision != Decision::Approved)
    {
        *others
            .entry(format!("{} {}", r.decision, r.reason_code))
            .or_default() += 1;
    }
    eprintln!("not approved: {others:?}");
    eprintln!(
        "one replica, {rate}/s offered: {} decisions ({closed} closing exits) in {el:?} (published in {published:?}); entries {}; linked exits {}",
        decisions.len(),
        latency(false),
        latency(true),
    );
    env.shutdown.cancel();
}

/// TARGET_WEIGHT `q` buys up to `q × allocated / price` units, counting what
/// the strategy already holds. Units approved but not yet booked count as
/// held too: two signals inside the booking window must not both buy up to
/// the target. Allocated 893,600 (89.36 % of 1,000,000), AAPL at 150.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_weight_counts_units_approved_but_not_yet_booked() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    let weight = |tag: &str, q: &str| {
        let mut s = aapl(tag);
        s.sizing_mode = SizingMode::TargetWeight;
        s.account_equity = None;
        s.legs[0].quantity = d(q);
        s
    };
    // 1 %: 0.01 × 893,600 / 150 = 59.57 → 59 (nothing held).
    let first = weight("tw1", "0.01");
    env.publish(&first).await;
    let r = env.decision_of(&first.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("59"));
    // 2 %, the first order not booked yet: target 119.15, 59 on its way
    // → 60 more (the old rule bought 119).
    let second = weight("tw2", "0.02");
    env.publish(&second).await;
    let r = env.decision_of(&second.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("60"));
    // 2 % again: 119 on their way, 0.15 more rounds to nothing.
    let third = weight("tw3", "0.02");
    env.publish(&third).await;
    let r = env.decision_of(&third.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Rejected, "{}", r.reason);
    assert!(
        matches!(r.reason_detail, Some(Reason::LegRoundsToZero { .. })),
        "{:?}",
        r.reason_detail
    );

    // Both orders fill and the accounts stage books 119: the position
    // counts once (booked), nothing is pending any more.
    for o in env.orders().await {
        env.publish_filled(&o.order_id, o.quantity).await;
    }
    let ids: Vec<String> = env.orders().await.into_iter().map(|o| o.order_id).collect();
    assert_eq!(ids.len(), 2);
    assert!(wait_until(T, || ids.iter().all(|id| c.ended_order(id).is_some())).await);
    let mut st = holding_aapl("1000000");
    st.open_positions[0].quantity = d("119");
    st.timestamp = Utc::now() + chrono::Duration::seconds(3);
    env.put_state(&st).await;
    assert!(
        wait_until(T, || c.account_state(ACCOUNT).is_some_and(|s| s
            .open_positions
            .first()
            .is_some_and(|p| p.quantity == d("119"))))
        .await
    );
    let mut left = usize::MAX;
    for _ in 0..100 {
        left = c.reservation_book(ACCOUNT).await.unwrap().held.len();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0);
    // 3 %: target 178.72, 119 held → 59.
    let fourth = weight("tw4", "0.03");
    env.publish(&fourth).await;
    let r = env.decision_of(&fourth.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("59"));
    env.shutdown.cancel();
}

/// The position-size limit is the position's, whenever its orders fill:
/// two entries of 6,000 inside the booking window against a 10,000 limit
/// may not both pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_position_size_counts_units_approved_but_not_yet_booked() {
    let env = Env::new().await;
    env.limit_position_size("10000").await;
    let (_c, _h) = env.replica().await;
    let units = |tag: &str| {
        let mut s = aapl(tag);
        s.sizing_mode = SizingMode::FixedUnits;
        s.account_equity = None;
        s.legs[0].quantity = d("40");
        s
    };
    let first = units("ps1");
    env.publish(&first).await;
    let r = env.decision_of(&first.signal_id, T).await.unwrap();
    assert_eq!(r.decision, Decision::Approved, "{}", r.reason);
    assert_eq!(r.final_quantity, d("40"));
    let second = units("ps2");
    env.publish(&second).await;
    let r = env.decision_of(&second.signal_id, T).await.unwrap();
    // 40 × 150 = 6,000 on its way: room for 4,000 = 26 units, or none.
    assert_ne!(r.final_quantity, d("40"), "{}", r.reason);
    let total: Decimal = env.orders().await.iter().map(|o| o.quantity).sum();
    assert!(total * d("150") <= d("10000"), "ordered {total} units");
    env.shutdown.cancel();
}

// ----- entries and exits under races, redeliveries and backlogs ----------------

/// The accounts stage applies order events and executions on two separate
/// consumers, so a state can show the FILLED event (order gone from
/// `open_orders`) before the execution is booked (no position, no margin,
/// `executions_seq` below the fill). A reservation must not be released by
/// such a state: the fill's margin would then be counted nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seen_order_is_not_released_before_its_fill_is_booked() {
    let env = Env::new().await;
    // No grace can settle the reservation during the test.
    let (c, _h) = env
        .replica_with(|s| {
            s.booking_grace = chrono::Duration::hours(1);
            s.unbooked_grace = chrono::Duration::hours(2);
        })
        .await;
    let entry = aapl("sb1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(r.final_quantity, d("17"));
    let oid = order_id(&entry.signal_id, 0);

    // 1. The accounts stage lists the order working (it read it from ORDERS).
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
    let mut seen = false;
    for _ in 0..100 {
        let book = c.reservation_book(ACCOUNT).await.unwrap();
        if book
            .held
            .get(&entry.signal_id)
            .is_some_and(|h| h.legs[0].seen)
        {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen, "the working order was seen");

    // 2. The venue fills it: FILLED event and execution report.
    env.publish_filled(&oid, d("17")).await;
    let seq = env.publish_execution(&oid, d("17")).await;
    assert!(wait_until(T, || c.ended_order(&oid).is_some()).await);

    // 3. A state that applied the FILLED event but not the execution yet.
    let mut st = fresh_state(d("1000000"));
    st.executions_seq = Some(seq - 1);
    env.put_state(&st).await;
    assert!(
        wait_until(T, || c
            .account_state(ACCOUNT)
            .is_some_and(|s| s.open_orders.is_empty()))
        .await
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // The next entry is checked against margin_used 0 + reserved: the
    // unbooked fill's 637.50 must still be counted.
    let next = aapl("sb2");
    env.publish(&next).await;
    let r2 = env.decision_of(&next.signal_id, T).await.unwrap();
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    assert_eq!(
        r2.risk_assessment.portfolio_margin_before,
        Some(d("637.50")),
        "the unbooked fill's margin is counted nowhere (book holds entry: {})",
        book.held.contains_key(&entry.signal_id)
    );
    env.shutdown.cancel();
}

/// A signal delivered again after its first decision went out (a lost ack,
/// a crash before the ack) is decided afresh against the account state,
/// which by then may hold the entry's own fill. The entry record
/// (`entries.<signal_id>`, content-addressed message id) is then overwritten
/// with the second decision, while the order the venue filled (same order
/// id, deduplicated) is the first one: the exit closes what the record says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_entry_does_not_rewrite_the_entry_record() {
    let env = Env::new().await;
    env.limit_position_size("3000").await;
    let (c, _h) = env.replica().await;
    let entry = aapl("rd1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17"))
    );
    let oid = order_id(&entry.signal_id, 0);

    // The venue fills the 17; the accounts stage books them.
    env.publish_filled(&oid, d("17")).await;
    let seq = env.publish_execution(&oid, d("17")).await;
    let mut st = holding_aapl("1000000");
    st.executions_seq = Some(seq);
    env.put_state(&st).await;
    assert!(
        wait_until(T, || c.ended_order(&oid).is_some()
            && c.account_state(ACCOUNT)
                .is_some_and(|s| !s.open_positions.is_empty()))
        .await
    );

    // The same signal comes again (what a redelivery hands the worker).
    let subject = env
        .subjects
        .signals_standardized(entry.environment, &entry.strategy_id)
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", "redelivery-rd1");
    h.insert("Mtx-Signal-Id", entry.signal_id.as_str());
    env.js
        .publish_with_headers(subject, h, serde_json::to_vec(&entry).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    env.drained().await;

    let rec = env
        .state
        .get(worker::entry_key(&entry.signal_id))
        .await
        .unwrap()
        .unwrap();
    let rec: worker::StoredEntry = serde_json::from_slice(&rec).unwrap();
    println!(
        "entry record after the redelivery: decision {:?}, ordered {:?}",
        rec.decision,
        rec.legs
            .iter()
            .map(|l| l.ordered_quantity)
            .collect::<Vec<_>>()
    );

    // The sender exits its whole entry: the 17 held must be closed.
    let exit = exit_of(&entry, "rd2", true);
    env.publish(&exit).await;
    let x = env.decision_of(&exit.signal_id, T).await.unwrap();
    assert_eq!(
        x.final_quantity,
        d("17"),
        "exit of a 17-share entry closes {} ({}: {})",
        x.final_quantity,
        x.decision,
        x.reason
    );
    env.shutdown.cancel();
}

/// Signals that waited in a backlog (Cerebro down or behind for more than
/// `entry_wait`, 300 s) carry an old `received_at`. An exit of an entry
/// decided a moment ago must still wait for that entry's fill (the README:
/// "an EXIT / CANCEL waits at most this long for its entry to fill"), not
/// give up at once and send a cancel of an order that fills a millisecond
/// later (too late to cancel: the position is never closed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_from_a_backlog_still_waits_for_its_entry_fill() {
    let env = Env::new().await;
    let (_c, _h) = env.replica().await;
    let queued_at = Utc::now() - chrono::Duration::minutes(10);
    let mut entry = aapl("bl1");
    entry.received_at = queued_at;
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17"))
    );

    let mut exit = exit_of(&entry, "bl2", true);
    exit.received_at = queued_at + chrono::Duration::seconds(30);
    env.publish(&exit).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let early = env
        .decisions()
        .await
        .into_iter()
        .find(|r| r.signal_id == exit.signal_id);
    let cancels = env
        .read::<mtx_schemas::order::CancelOrder>(streams::ORDERS, "orders.*.cancel")
        .await;
    assert!(
        early.is_none(),
        "exit decided before its entry could fill: {:?} final {:?} ({}); cancels sent: {:?}",
        early.as_ref().map(|r| r.decision),
        early.as_ref().map(|r| r.final_quantity),
        early.as_ref().map(|r| r.reason.clone()).unwrap_or_default(),
        cancels.iter().map(|c| &c.order_id).collect::<Vec<_>>()
    );
    env.shutdown.cancel();
}

/// An entry order that ended partly filled (5 of 17, the rest cancelled):
/// once Cerebro no longer remembers the order's end (forgotten one minute
/// after it by the janitor pass, or never seen by a replica started after
/// it: the order-event feed starts at `New`) and the reservation is
/// released, `entry_with_progress` treats the entry as FILLED with its whole
/// ordered quantity, and the linked exit closes 17 of the strategy's
/// position: 12 shares that other entries opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_of_a_partly_filled_entry_never_closes_more_than_it_filled() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    let entry = aapl("pf1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17"))
    );
    let oid = order_id(&entry.signal_id, 0);

    // The venue fills 5, then the rest is cancelled.
    let e = |seq, status, previous_status, filled_quantity| OrderEvent {
        order_id: oid.clone(),
        account: ACCOUNT.into(),
        status,
        previous_status,
        filled_quantity,
        avg_fill_price: None,
        reason: None,
        timestamp: Utc::now(),
        seq,
    };
    let events = [
        e(1, OrderStatus::Submitted, None, Decimal::ZERO),
        e(
            2,
            OrderStatus::Accepted,
            Some(OrderStatus::Submitted),
            Decimal::ZERO,
        ),
        e(
            3,
            OrderStatus::PartiallyFilled,
            Some(OrderStatus::Accepted),
            d("5"),
        ),
        e(
            4,
            OrderStatus::Cancelled,
            Some(OrderStatus::PartiallyFilled),
            d("5"),
        ),
    ];
    env.publish_json(env.subjects.orders_events(ACCOUNT).unwrap(), &events)
        .await;
    let seq = env.publish_execution(&oid, d("5")).await;
    assert!(wait_until(T, || c.ended_order(&oid).is_some()).await);
    // The account books the 5; the strategy also holds 100 AAPL of earlier entries.
    let mut st = holding_aapl("1000000");
    st.open_positions[0].quantity = d("105");
    st.executions_seq = Some(seq);
    env.put_state(&st).await;
    let mut released = false;
    for _ in 0..100 {
        if !c
            .reservation_book(ACCOUNT)
            .await
            .unwrap()
            .held
            .contains_key(&entry.signal_id)
        {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(released, "the entry's reservation is released (booked)");

    // A few minutes later the janitor has forgotten the order's end.
    c.janitor_pass(Utc::now() + chrono::Duration::minutes(5))
        .await
        .unwrap();
    assert!(c.ended_order(&oid).is_none());

    // The sender exits its whole entry: only the 5 it filled may be sold.
    let exit = exit_of(&entry, "pf2", true);
    env.publish(&exit).await;
    let x = env.decision_of(&exit.signal_id, T).await.unwrap();
    assert_eq!(
        x.final_quantity,
        d("5"),
        "exit of an entry that filled 5 sells {} ({}: {})",
        x.final_quantity,
        x.decision,
        x.reason
    );
    env.shutdown.cancel();
}

/// First-writer-wins entry records vs. a first delivery that was REJECTED.
/// The entry is rejected (kill switch); its record is stored but the
/// decision's publish fails, so the signal comes back. Meanwhile trading
/// resumed: the redelivery is APPROVED and its order goes to the venue. Its
/// record replaces the REJECTED one, so the linked exit closes the 17 shares
/// the entry bought (a record kept REJECTED would say "entry not opened").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_redelivery_replaces_a_rejected_first_record() {
    let mut env = Env::new().await;
    // Enough deliveries for the outage below (10 × 1.5 s).
    env.cfg.worker.publish_retry_delay_ms = 1_500;
    let (c, _h) = env.replica().await;
    let dec_stream = env.topo.stream_name(streams::CEREBRO_DECISIONS);
    let set_refuse = |on: bool| {
        let (js, stream) = (env.js.clone(), dec_stream.clone());
        async move {
            let mut st = js.get_stream(&stream).await.unwrap();
            let mut cfg = st.info().await.unwrap().config.clone();
            cfg.subjects = cfg
                .subjects
                .iter()
                .map(|s| {
                    if on {
                        s.replace("cerebro.decisions", "cerebro.refused")
                    } else {
                        s.replace("cerebro.refused", "cerebro.decisions")
                    }
                })
                .collect();
            js.update_stream(&cfg).await.unwrap();
        }
    };
    env.system.put("kill_switch", "true".into()).await.unwrap();
    assert!(wait_until(T, || !c.system().trading_enabled).await);
    set_refuse(true).await;

    let entry = aapl("rj1");
    let key = worker::entry_key(&entry.signal_id);
    env.publish(&entry).await;
    // The REJECTED record is stored; the decision is not.
    let start = Instant::now();
    while env.state.get(&key).await.unwrap().is_none() {
        assert!(start.elapsed() < T, "record stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Trading resumes, the decisions stream is back: the redelivery is decided.
    env.system.put("kill_switch", "false".into()).await.unwrap();
    assert!(wait_until(T, || c.system().trading_enabled).await);
    set_refuse(false).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17")),
        "{}",
        r.reason
    );
    let oid = order_id(&entry.signal_id, 0);
    assert!(env.orders().await.iter().any(|o| o.order_id == oid));
    env.drained().await;
    let rec: worker::StoredEntry =
        serde_json::from_slice(&env.state.get(&key).await.unwrap().unwrap()).unwrap();
    assert_eq!(
        rec.decision,
        Decision::Approved,
        "the approved record replaced the rejection"
    );

    // The venue fills the 17, the account books them.
    env.publish_filled(&oid, d("17")).await;
    let seq = env.publish_execution(&oid, d("17")).await;
    let mut st = holding_aapl("1000000");
    st.executions_seq = Some(seq);
    env.put_state(&st).await;
    assert!(wait_until(T, || c.ended_order(&oid).is_some()).await);

    let exit = exit_of(&entry, "rj2", true);
    env.publish(&exit).await;
    let x = env.decision_of(&exit.signal_id, T).await.unwrap();
    assert_eq!(
        (x.decision, x.final_quantity),
        (Decision::Approved, d("17")),
        "exit of an entry whose order bought 17: {} {} ({})",
        x.decision,
        x.final_quantity,
        x.reason
    );
    env.shutdown.cancel();
}

/// The events of one order, in order: (status, filled after it).
fn order_events(oid: &str, steps: &[(OrderStatus, &str)]) -> Vec<OrderEvent> {
    let mut previous = None;
    steps
        .iter()
        .enumerate()
        .map(|(i, (status, filled))| {
            let e = OrderEvent {
                order_id: oid.to_string(),
                account: ACCOUNT.into(),
                status: *status,
                previous_status: previous,
                filled_quantity: d(filled),
                avg_fill_price: None,
                reason: None,
                timestamp: Utc::now(),
                seq: i as u64 + 1,
            };
            previous = Some(*status);
            e
        })
        .collect()
}

/// A linked full exit of `entry` (`tag`), decided to sell `quantity`.
async fn exit_sells(
    env: &Env,
    entry: &StandardizedSignal,
    tag: &str,
    quantity: &str,
) -> StandardizedSignal {
    let x = exit_of(entry, tag, true);
    env.publish(&x).await;
    let r = env.decision_of(&x.signal_id, T).await.unwrap();
    assert_eq!(
        r.final_quantity,
        d(quantity),
        "exit {tag} sells {} ({}: {})",
        r.final_quantity,
        r.decision,
        r.reason
    );
    x
}

/// The venue reports `steps` of order `oid` (its events, in order).
async fn venue_says(env: &Env, oid: &str, steps: &[(OrderStatus, &str)]) {
    env.publish_json(
        env.subjects.orders_events(ACCOUNT).unwrap(),
        &order_events(oid, steps),
    )
    .await;
}

/// Wait until the book no longer holds `signal_id`.
async fn released(c: &Cerebro, signal_id: &str) -> bool {
    for _ in 0..200 {
        let book = c.reservation_book(ACCOUNT).await.unwrap();
        if !book.held.contains_key(signal_id) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// An AAPL entry (`tag`) approved for 17, filled and booked: the state
/// (returned) shows `position` AAPL of the strategy, 17 of them this
/// entry's.
async fn booked_entry(
    env: &Env,
    c: &Cerebro,
    tag: &str,
    position: &str,
) -> (StandardizedSignal, AccountState) {
    let entry = aapl(tag);
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17"))
    );
    let oid = order_id(&entry.signal_id, 0);
    venue_says(
        env,
        &oid,
        &[(OrderStatus::Submitted, "0"), (OrderStatus::Filled, "17")],
    )
    .await;
    let seq = env.publish_execution(&oid, d("17")).await;
    assert!(wait_until(T, || c.ended_order(&oid).is_some()).await);
    let mut st = holding_aapl("1000000");
    st.open_positions[0].quantity = d(position);
    st.executions_seq = Some(seq);
    env.put_state(&st).await;
    assert!(released(c, &entry.signal_id).await, "entry booked");
    (entry, st)
}

/// An exit whose closing order the venue rejects (or cancels part-filled)
/// closed nothing (or only part): a later exit of the same entry still
/// closes what is open, even once the order's end is long forgotten. The
/// old exit progress counted every exit as closing all it ordered, so the
/// retried exit found "nothing open" and the 17 shares stayed held while the
/// strategy believed itself flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_exit_closes_what_a_rejected_or_cut_short_exit_left_open() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    // The strategy also holds 100 AAPL of earlier entries: a linked exit
    // must close this entry's 17, never those.
    let (entry, mut st) = booked_entry(&env, &c, "xr1", "117").await;

    // Exit 1 sells the 17; the venue rejects its order.
    let x1 = exit_sells(&env, &entry, "xr2", "17").await;
    let o1 = order_id(&x1.signal_id, 0);
    let book = c.reservation_book(ACCOUNT).await.unwrap();
    let hold = book.held.get(&x1.signal_id).expect("the exit is held");
    assert_eq!(hold.exit_of.as_deref(), Some(entry.signal_id.as_str()));
    assert_eq!(c.reservation_book(ACCOUNT).await.unwrap().held.len(), 1);
    venue_says(
        &env,
        &o1,
        &[(OrderStatus::Submitted, "0"), (OrderStatus::Rejected, "0")],
    )
    .await;
    assert!(wait_until(T, || c.ended_order(&o1).is_some()).await);
    // No account state follows (say the accounts stage is down): the end
    // itself has the book reconciled while it is remembered.
    assert!(released(&c, &x1.signal_id).await, "rejected exit released");
    // Hours later the order's end is forgotten.
    c.janitor_pass(Utc::now() + chrono::Duration::minutes(5))
        .await
        .unwrap();
    assert!(c.ended_order(&o1).is_none());

    // Exit 2 (the sender retries): the 17 are still open. The venue fills
    // 5 of its order, then cancels the rest.
    let x2 = exit_sells(&env, &entry, "xr3", "17").await;
    let o2 = order_id(&x2.signal_id, 0);
    venue_says(
        &env,
        &o2,
        &[
            (OrderStatus::Submitted, "0"),
            (OrderStatus::PartiallyFilled, "5"),
            (OrderStatus::Cancelled, "5"),
        ],
    )
    .await;
    let seq = env.publish_execution(&o2, d("5")).await;
    assert!(wait_until(T, || c.ended_order(&o2).is_some()).await);
    st.open_positions[0].quantity = d("112");
    st.executions_seq = Some(seq);
    st.timestamp = Utc::now();
    env.put_state(&st).await;
    assert!(released(&c, &x2.signal_id).await, "cut-short exit released");
    c.janitor_pass(Utc::now() + chrono::Duration::minutes(5))
        .await
        .unwrap();
    assert!(c.ended_order(&o2).is_none());

    // Exit 3 closes the 12 left, not the strategy's other 100.
    exit_sells(&env, &entry, "xr4", "12").await;
    env.shutdown.cancel();
}

/// An order that ends short while Cerebro is down is known after the
/// restart: the order-event and execution feeds start at the oldest hold of
/// any book, not "from now". The old feeds started from now, so the
/// restarted worker never learned the entry had filled only 5 of 17: the
/// exit waited until the time rule settled the hold as filled in full, and
/// would then sell 17 — 12 of them from the strategy's other positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_that_ended_short_while_cerebro_was_down_is_known_after_restart() {
    let env = Env::new().await;
    let stop = env.shutdown.child_token();
    let h1 = {
        let mut p = Process::start(env.cfg.clone(), stop.clone()).await.unwrap();
        worker::spawn(&mut p).await.unwrap();
        tokio::spawn(p.wait())
    };
    let entry = aapl("rs1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(
        (r.decision, r.final_quantity),
        (Decision::Approved, d("17"))
    );
    let oid = order_id(&entry.signal_id, 0);

    // Cerebro goes down; meanwhile the venue fills 5 and cancels the rest,
    // and the account books the 5 (it also holds 100 of earlier entries).
    stop.cancel();
    h1.await.unwrap();
    venue_says(
        &env,
        &oid,
        &[
            (OrderStatus::Submitted, "0"),
            (OrderStatus::PartiallyFilled, "5"),
            (OrderStatus::Cancelled, "5"),
        ],
    )
    .await;
    let seq = env.publish_execution(&oid, d("5")).await;
    let mut st = holding_aapl("1000000");
    st.open_positions[0].quantity = d("105");
    st.executions_seq = Some(seq);
    env.put_state(&st).await;

    // Restarted, it knows the end before it decides anything.
    let (c, _h) = env.replica().await;
    let end = c.ended_order(&oid).expect("the end replayed at start");
    assert_eq!((end.status, end.filled), (OrderStatus::Cancelled, d("5")));
    assert!(released(&c, &entry.signal_id).await, "entry booked");
    // Much later the end is forgotten; the record keeps it.
    c.janitor_pass(Utc::now() + chrono::Duration::minutes(5))
        .await
        .unwrap();
    assert!(c.ended_order(&oid).is_none());
    let exit = exit_of(&entry, "rs2", true);
    env.publish(&exit).await;
    let x = env.decision_of(&exit.signal_id, T).await.unwrap();
    assert_eq!(
        x.final_quantity,
        d("5"),
        "exit after a restart sells {} ({}: {})",
        x.final_quantity,
        x.decision,
        x.reason
    );
    env.shutdown.cancel();
}

/// Publish `s` again under another message id: what a redelivery of the
/// same signal hands the worker.
async fn redeliver(env: &Env, s: &StandardizedSignal, tag: &str) {
    let subject = env
        .subjects
        .signals_standardized(s.environment, &s.strategy_id)
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", format!("redelivery-{tag}").as_str());
    h.insert("Mtx-Signal-Id", s.signal_id.as_str());
    env.js
        .publish_with_headers(subject, h, serde_json::to_vec(s).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// An exit whose order was rejected is noted (`filled: 0`) when its hold
/// goes. A redelivery of that same exit (lost ack, failed publish) decides
/// it again and must keep the note. The first version overwrote the stored
/// take with `filled: None` and put a new hold on an order id that would
/// never report an end again (a duplicate message id; its end forgotten):
/// the hold went by the time rule without a note, the exit counted as
/// having sold all 17, and the sender's retry closed nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_rejected_exit_keeps_its_short_note() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    let (entry, mut st) = booked_entry(&env, &c, "rv1", "117").await;

    // Exit 1 sells the 17; the venue rejects its order; the note is written.
    let x1 = exit_sells(&env, &entry, "rv2", "17").await;
    let o1 = order_id(&x1.signal_id, 0);
    venue_says(
        &env,
        &o1,
        &[(OrderStatus::Submitted, "0"), (OrderStatus::Rejected, "0")],
    )
    .await;
    assert!(wait_until(T, || c.ended_order(&o1).is_some()).await);
    // No account state follows (say the accounts stage is down): the end
    // itself has the book reconciled while it is remembered.
    assert!(released(&c, &x1.signal_id).await, "rejected exit released");
    let key = worker::exits_key(&entry.signal_id);
    let progress: worker::ExitProgress =
        serde_json::from_slice(&env.state.get(&key).await.unwrap().unwrap()).unwrap();
    assert_eq!(progress.exits[&x1.signal_id][0].filled, Some(d("0")));
    c.janitor_pass(Utc::now() + chrono::Duration::minutes(5))
        .await
        .unwrap();
    assert!(c.ended_order(&o1).is_none());

    // Exit 1 comes again (a redelivery).
    redeliver(&env, &x1, "rv2").await;
    env.drained().await;
    let progress: worker::ExitProgress =
        serde_json::from_slice(&env.state.get(&key).await.unwrap().unwrap()).unwrap();
    println!(
        "after the redelivery: take {:?}, held: {}",
        progress.exits[&x1.signal_id][0].filled,
        c.reservation_book(ACCOUNT)
            .await
            .unwrap()
            .held
            .contains_key(&x1.signal_id)
    );
    // A later state (nothing changed: the order was a duplicate).
    st.timestamp = Utc::now() + chrono::Duration::seconds(40);
    env.put_state(&st).await;
    assert!(released(&c, &x1.signal_id).await);

    // The sender retries the exit: the 17 are still open.
    exit_sells(&env, &entry, "rv3", "17").await;
    env.shutdown.cancel();
}

/// `mtx_messages_processed_total{outcome}` of the process's registry.
fn processed(registry: &prometheus::Registry, outcome: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "mtx_messages_processed_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "outcome" && l.value() == outcome)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// What another replica does all day on a busy account: rewrite the
/// reservation book (compare-and-set over the revision it read).
async fn other_replica_writes_the_book(env: &Env) {
    let key = reservations_key(ACCOUNT);
    let e = env.state.entry(&key).await.unwrap().unwrap();
    env.state
        .update(&key, e.value.clone(), e.revision)
        .await
        .unwrap();
}

/// The exit hold is written after the exit's progress (`exits.<entry>`:
/// "this exit closes 17") is stored; a lost compare-and-set (another
/// replica wrote the book since this replica's copy was read) re-reads the
/// book and tries again. The first version handed the exit back for a
/// redelivery instead: on a busy multi-replica account every delivery met a
/// stale copy, the exit burnt its deliveries and was dead-lettered, its
/// order never went out, and the stored progress still said it closed 17.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exit_is_not_lost_when_another_replica_writes_the_book() {
    let env = Env::new().await;
    let (c, _h, registry) = env.replica_metered(|_| {}).await;
    let entry = aapl("cc1");
    env.publish(&entry).await;
    let r = env.decision_of(&entry.signal_id, T).await.unwrap();
    assert_eq!(r.final_quantity, d("17"));
    let oid = order_id(&entry.signal_id, 0);
    env.publish_filled(&oid, d("17")).await;
    let seq = env.publish_execution(&oid, d("17")).await;
    assert!(wait_until(T, || c.ended_order(&oid).is_some()).await);
    let mut st = holding_aapl("1000000");
    st.executions_seq = Some(seq);
    env.put_state(&st).await;
    assert!(released(&c, &entry.signal_id).await, "entry booked");
    tokio::time::sleep(Duration::from_millis(700)).await;

    // Replica B writes the book; then the exit comes (to replica A).
    other_replica_writes_the_book(&env).await;
    let x = exit_of(&entry, "cc2", true);
    env.publish(&x).await;
    // Every time A hands it back, A's copy is refreshed (a state arrives
    // and is synced) and B writes the book again.
    let mut failures = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let now = processed(&registry, "retry") + processed(&registry, "dlq");
        if processed(&registry, "dlq") > 0 {
            break;
        }
        if now > failures {
            failures = now;
            st.timestamp = Utc::now();
            env.put_state(&st).await;
            tokio::time::sleep(Duration::from_millis(150)).await;
            other_replica_writes_the_book(&env).await;
        }
        if !env.undecided(&x.signal_id).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let xo = order_id(&x.signal_id, 0);
    let sent = env.orders().await.iter().any(|o| o.order_id == xo);
    let progress: Option<worker::ExitProgress> = env
        .state
        .get(worker::exits_key(&entry.signal_id))
        .await
        .unwrap()
        .map(|b| serde_json::from_slice(&b).unwrap());
    println!(
        "hand-backs {failures}, dead-lettered {}, exit order sent {sent}, stored takes {:?}",
        processed(&registry, "dlq"),
        progress.as_ref().and_then(|p| p.exits.get(&x.signal_id))
    );
    assert!(sent, "the exit's closing order never went out");
    env.shutdown.cancel();
}

/// A redelivered exit (lost ack) decided while its first closing order is
/// part-filled meets a smaller position and rewrites its stored take to the
/// smaller quantity, but the venue keeps the first order under that id (the
/// re-sent one is a duplicate): the order fills all 17, the take says the
/// exit closed 10, and a later exit of the same entry sells 7 shares that
/// belong to other positions of the strategy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_exit_keeps_the_quantity_of_the_order_the_venue_has() {
    let env = Env::new().await;
    let (c, _h) = env.replica().await;
    let (entry, mut st) = booked_entry(&env, &c, "rq1", "17").await;

    // Exit 1 sells the 17; its order fills 7 and works on.
    let x1 = exit_sells(&env, &entry, "rq2", "17").await;
    let o1 = order_id(&x1.signal_id, 0);
    venue_says(
        &env,
        &o1,
        &[
            (OrderStatus::Submitted, "0"),
            (OrderStatus::PartiallyFilled, "7"),
        ],
    )
    .await;
    st.open_positions[0].quantity = d("10");
    st.open_orders.push(OpenOrder {
        order_id: o1.clone(),
        instrument: "AAPL".into(),
        side: Side::Sell,
        quantity: d("10"),
        order_type: OrderType::Market,
        price: Some(d("150")),
    });
    st.timestamp = Utc::now();
    env.put_state(&st).await;
    assert!(
        wait_until(T, || c.account_state(ACCOUNT).is_some_and(|s| s
            .open_positions
            .first()
            .is_some_and(|p| p.quantity == d("10"))))
        .await
    );

    // Exit 1 comes again (a lost ack); its orders are duplicates.
    redeliver(&env, &x1, "rq2").await;
    env.drained().await;
    let key = worker::exits_key(&entry.signal_id);
    let progress: worker::ExitProgress =
        serde_json::from_slice(&env.state.get(&key).await.unwrap().unwrap()).unwrap();
    println!(
        "take after the redelivery: {:?}",
        progress.exits[&x1.signal_id]
    );

    // The venue's order (17) fills in full.
    venue_says(
        &env,
        &o1,
        &[
            (OrderStatus::Submitted, "0"),
            (OrderStatus::PartiallyFilled, "7"),
            (OrderStatus::Filled, "17"),
        ],
    )
    .await;
    assert!(wait_until(T, || c.ended_order(&o1).is_some()).await);
    assert!(released(&c, &x1.signal_id).await, "exit released");
    // The entry is flat; the strategy later holds 100 AAPL of another entry.
    st.open_orders.clear();
    st.open_positions[0].quantity = d("100");
    st.timestamp = Utc::now();
    env.put_state(&st).await;
    assert!(
        wait_until(T, || c.account_state(ACCOUNT).is_some_and(|s| s
            .open_positions
            .first()
            .is_some_and(|p| p.quantity == d("100"))))
        .await
    );

    // A second exit of the same entry has nothing left to close.
    exit_sells(&env, &entry, "rq3", "0").await;
    env.shutdown.cancel();
}
