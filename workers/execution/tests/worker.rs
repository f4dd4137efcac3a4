//! The execution stage alone on a real nats-server: refusals and their DLQ
//! reasons, expiry by the clock, stop-loss / take-profit children, and the
//! outbox that keeps a fill whose publish failed.

mod common;

use async_nats::jetstream;
use mtx_execution::worker::{self, Engine};
use mtx_harness::{eventually, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::headers;
use mtx_schemas::ids::{derive_id, execution_id};
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{
    decode_order_events, CancelOrder, ExecutionConfirmation, Order, OrderEvent,
};
use mtx_schemas::{OrderStatus, OrderType, Side, SignalAction};
use mtx_subjects::topology::streams;
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Stage {
    prefix: String,
    js: jetstream::Context,
    topo: Topology,
    subjects: Subjects,
    engine: Arc<Engine>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
    waiter: tokio::task::JoinHandle<()>,
}

async fn start(nats: &NatsServer, tune: impl FnOnce(&mut Config)) -> Stage {
    let cfg = common::config(nats.url(), tune);
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let topo = Topology::build(&cfg.topology);
    mtx_subjects::apply::apply(&js, &topo).await.unwrap();
    let shutdown = CancellationToken::new();
    let cfg_prefix = cfg.topology.prefix.clone();
    let mut p = Process::start(cfg, shutdown.clone()).await.unwrap();
    let engine = worker::spawn(&mut p).unwrap();
    Stage {
        prefix: cfg_prefix,
        js,
        topo,
        subjects: p.subjects.clone(),
        engine,
        registry: p.registry.clone(),
        shutdown,
        waiter: tokio::spawn(p.wait()),
    }
}

impl Stage {
    async fn stop(self) {
        self.shutdown.cancel();
        self.waiter.await.unwrap();
    }

    async fn publish(&self, subject: String, id: String, body: Vec<u8>) {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, id.as_str());
        // As the gateway stamps a raw signal (carried through every stage).
        let received = chrono::Utc::now()
            .timestamp_nanos_opt()
            .unwrap()
            .to_string();
        h.insert(headers::RECEIVED_AT, received.as_str());
        self.js
            .publish_with_headers(subject, h, body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn order(&self, o: &Order, msg_id: &str) {
        let s = self.subjects.orders_new(&o.account).unwrap();
        self.publish(s, msg_id.into(), serde_json::to_vec(o).unwrap())
            .await;
    }

    async fn cancel(&self, account: &str, order_id: &str, msg_id: &str) {
        let c = CancelOrder {
            order_id: order_id.into(),
            account: account.into(),
            reason: None,
            timestamp: chrono::Utc::now(),
        };
        let s = self.subjects.orders_cancel(account).unwrap();
        self.publish(s, msg_id.into(), serde_json::to_vec(&c).unwrap())
            .await;
    }

    async fn price(&self, symbol: &str, price: Decimal) {
        let now = chrono::Utc::now();
        let m = MarketPrice {
            symbol: symbol.into(),
            price,
            timestamp: now,
            source: None,
        };
        self.publish(
            self.subjects.market_price(symbol).unwrap(),
            format!("px{}", now.timestamp_nanos_opt().unwrap()),
            serde_json::to_vec(&m).unwrap(),
        )
        .await;
        let seen = eventually(Duration::from_secs(10), || async {
            self.engine
                .broker_snapshot("PAPER")
                .await
                .and_then(|s| s.marks.get(symbol).copied())
                == Some(price)
        })
        .await;
        assert!(seen, "mark not applied");
    }

    async fn read(&self, stream: &str, filter: &str) -> Vec<jetstream::Message> {
        mtx_harness::bus::read_all(&self.js, &self.topo.stream_name(stream), filter).await
    }

    async fn executions(&self) -> Vec<ExecutionConfirmation> {
        self.read(
            streams::EXECUTIONS,
            &self.subjects.raw_subject("executions.>"),
        )
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
    }

    async fn events(&self, order_id: &str) -> Vec<OrderEvent> {
        self.read(
            streams::ORDER_EVENTS,
            &self.subjects.raw_subject("orders.*.events"),
        )
        .await
        .iter()
        .flat_map(|m| decode_order_events(&m.payload).unwrap())
        .filter(|e| e.order_id == order_id)
        .collect()
    }

    async fn wait_status(&self, order_id: &str, status: OrderStatus) -> Vec<OrderEvent> {
        let mut last = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            last = self.events(order_id).await;
            if last.last().is_some_and(|e| e.status == status) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{order_id} never {status}: {last:#?}");
    }

    /// DLQ reasons, in order.
    async fn dlq(&self) -> Vec<String> {
        self.read(streams::DLQ, &self.subjects.raw_subject("dlq.>"))
            .await
            .iter()
            .map(common::dlq_reason)
            .collect()
    }
}

fn order(
    id: &str,
    account: &str,
    order_type: OrderType,
    side: Side,
    qty: Decimal,
    price: Decimal,
) -> Order {
    let now = chrono::Utc::now();
    // `direction` stays LONG whatever the side, as `pending` sets it.
    Order {
        side,
        order_type,
        price: Some(price),
        ..Order::pending(id, format!("sig_{id}"), "S", account, "AAPL", qty, now)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_dead_lettered_with_their_reason_and_change_nothing() {
    let nats = NatsServer::start();
    // Only PAPER has an adapter.
    let s = start(&nats, |c| {
        c.execution.default_adapter = String::new();
        c.execution.adapters.insert("PAPER".into(), "paper".into());
    })
    .await;
    let o = order(
        "O1",
        "PAPER",
        OrderType::Limit,
        Side::Buy,
        dec!(5),
        dec!(90),
    );
    s.order(&o, "m1").await;
    s.wait_status("O1", OrderStatus::Accepted).await;

    // The same order again under another message id (a re-send): duplicate.
    s.order(&o, "m2").await;
    // The same id with other contents: conflicting.
    let mut other = o.clone();
    other.quantity = dec!(6);
    s.order(&other, "m3").await;
    // An account without an adapter.
    s.order(
        &order("O2", "LIVE", OrderType::Market, Side::Buy, dec!(1), dec!(1)),
        "m4",
    )
    .await;
    // Garbage, a cancel of an unknown order, an order on another account's subject.
    s.publish(
        s.subjects.orders_new("PAPER").unwrap(),
        "m5".into(),
        b"{".to_vec(),
    )
    .await;
    s.cancel("PAPER", "NOPE", "m6").await;
    let mut wrong = order(
        "O3",
        "OTHER",
        OrderType::Market,
        Side::Buy,
        dec!(1),
        dec!(1),
    );
    wrong.account = "OTHER".into();
    s.publish(
        s.subjects.orders_new("PAPER").unwrap(),
        "m7".into(),
        serde_json::to_vec(&wrong).unwrap(),
    )
    .await;
    // A bad price.
    s.publish(
        s.subjects.market_price("AAPL").unwrap(),
        "m8".into(),
        br#"{"symbol":"AAPL","price":"-1","timestamp":"2025-01-01T00:00:00Z"}"#.to_vec(),
    )
    .await;

    let want = [
        "account_mismatch",
        "conflicting_order",
        "invalid_order",
        "invalid_price",
        "no_broker_adapter",
        "unknown_order",
    ];
    let mut got = Vec::new();
    let start = Instant::now();
    while got.len() < want.len() && start.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = s.dlq().await;
    }
    got.sort();
    assert_eq!(got, want);
    assert_eq!(
        s.events("O1").await.len(),
        2,
        "O1 untouched: SUBMITTED, ACCEPTED"
    );
    assert!(s.executions().await.is_empty());
    let text = mtx_runtime::metrics::render(&s.registry);
    assert!(
        text.contains("mtx_execution_inputs_total{result=\"duplicate\",source=\"orders\"} 1"),
        "{text}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_expires_working_orders() {
    let nats = NatsServer::start();
    let s = start(&nats, |_| {}).await;
    let mut o = order(
        "EXP",
        "PAPER",
        OrderType::Limit,
        Side::Buy,
        dec!(5),
        dec!(90),
    );
    o.expiry = Some(chrono::Utc::now() + chrono::Duration::milliseconds(800));
    s.order(&o, "e1").await;
    s.wait_status("EXP", OrderStatus::Accepted).await;
    // No other input arrives: only the clock can expire it.
    let ev = s.wait_status("EXP", OrderStatus::Expired).await;
    assert_eq!(ev.len(), 3);
    assert_eq!(ev[2].previous_status, Some(OrderStatus::Accepted));
    s.price("AAPL", dec!(80)).await;
    assert!(
        s.executions().await.is_empty(),
        "an expired order never fills"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_loss_and_take_profit_become_oco_children() {
    let nats = NatsServer::start();
    let s = start(&nats, |_| {}).await;
    s.price("AAPL", dec!(100)).await;
    let mut entry = order(
        "BR",
        "PAPER",
        OrderType::Market,
        Side::Buy,
        dec!(10),
        dec!(100),
    );
    entry.stop_loss = Some(dec!(95));
    entry.take_profit = Some(dec!(110));
    s.order(&entry, "b1").await;
    s.wait_status("BR", OrderStatus::Filled).await;
    let sl = derive_id("ord", &["BR", "SL"]);
    let tp = derive_id("ord", &["BR", "TP"]);
    s.wait_status(&sl, OrderStatus::Accepted).await;
    s.wait_status(&tp, OrderStatus::Accepted).await;
    // The children were published as orders (for the sink) and read back as
    // duplicates, not submitted twice.
    let children = s
        .read(streams::ORDERS, &s.subjects.orders_new("PAPER").unwrap())
        .await;
    assert_eq!(children.len(), 3, "entry + SL + TP");
    let working = s
        .engine
        .broker_snapshot("PAPER")
        .await
        .unwrap()
        .working_orders;
    assert_eq!(working.len(), 2);

    s.price("AAPL", dec!(111)).await;
    let tp_ev = s.wait_status(&tp, OrderStatus::Filled).await;
    assert_eq!(tp_ev.last().unwrap().avg_fill_price, Some(dec!(110)));
    let sl_ev = s.wait_status(&sl, OrderStatus::Cancelled).await;
    assert!(sl_ev
        .last()
        .unwrap()
        .reason
        .as_deref()
        .unwrap()
        .contains("OCO"));
    // One message per order and venue step: the entry's SUBMITTED, ACCEPTED
    // and FILLED travel together, each child's SUBMITTED and ACCEPTED too;
    // the TP's fill and the SL's OCO cancel are one event each.
    let mut shapes: Vec<(String, Vec<(String, u64)>)> = s
        .read(
            streams::ORDER_EVENTS,
            &s.subjects.raw_subject("orders.*.events"),
        )
        .await
        .iter()
        .map(|m| {
            let id = m.headers.as_ref().unwrap().get("Nats-Msg-Id").unwrap();
            let events = decode_order_events(&m.payload).unwrap();
            let single = m.payload.first() == Some(&b'{');
            assert_eq!(single, events.len() == 1, "a lone event is a bare object");
            (
                id.to_string(),
                events.into_iter().map(|e| (e.order_id, e.seq)).collect(),
            )
        })
        .collect();
    shapes.sort();
    let mut want = vec![
        (
            "BR.1-3".to_string(),
            vec![
                ("BR".to_string(), 1),
                ("BR".to_string(), 2),
                ("BR".to_string(), 3),
            ],
        ),
        (format!("{sl}.1-2"), vec![(sl.clone(), 1), (sl.clone(), 2)]),
        (format!("{sl}.3"), vec![(sl.clone(), 3)]),
        (format!("{tp}.1-2"), vec![(tp.clone(), 1), (tp.clone(), 2)]),
        (format!("{tp}.3"), vec![(tp.clone(), 3)]),
    ];
    want.sort();
    assert_eq!(shapes, want);
    let x = s.executions().await;
    assert_eq!(
        x.iter()
            .map(|x| (x.order_id.as_str(), x.side, x.quantity, x.price))
            .collect::<Vec<_>>(),
        [
            ("BR", Side::Buy, dec!(10), dec!(100)),
            (tp.as_str(), Side::Sell, dec!(10), dec!(110))
        ]
    );
    assert_eq!(x[1].action, SignalAction::Exit);
    assert!(s
        .engine
        .broker_snapshot("PAPER")
        .await
        .unwrap()
        .working_orders
        .is_empty());
    s.stop().await;
}

/// The executions stream is gone when the order fills: the fill is kept in
/// the persisted outbox, the order is acked anyway, and the clock publishes
/// the fill once the stream is back — exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_whose_publish_fails_is_published_later_from_the_outbox() {
    let nats = NatsServer::start();
    let s = start(&nats, |_| {}).await;
    s.price("AAPL", dec!(100)).await;
    let execs = s.topo.stream_name(streams::EXECUTIONS);
    s.js.delete_stream(&execs).await.unwrap();
    s.order(
        &order(
            "OB",
            "PAPER",
            OrderType::Market,
            Side::Buy,
            dec!(3),
            dec!(100),
        ),
        "o1",
    )
    .await;
    s.wait_status("OB", OrderStatus::Filled).await;
    let orders =
        s.js.get_stream(s.topo.stream_name(streams::ORDERS))
            .await
            .unwrap();
    let acked = eventually(Duration::from_secs(10), || async {
        let i = orders.consumer_info("execution").await.unwrap();
        i.num_ack_pending == 0 && i.num_pending == 0
    })
    .await;
    assert!(acked, "the order is acked once the fill is persisted");
    let pending = eventually(Duration::from_secs(5), || async {
        s.engine.metrics().outbox.get() >= 1
    })
    .await;
    assert!(pending, "the execution waits in the outbox");

    mtx_subjects::apply::apply(&s.js, &s.topo).await.unwrap();
    let published = eventually(Duration::from_secs(15), || async {
        s.executions().await.len() == 1 && s.engine.metrics().outbox.get() == 0
    })
    .await;
    assert!(published);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let x = s.executions().await;
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].execution_id, execution_id("OB", 1));
    assert_eq!((x[0].quantity, x[0].price), (dec!(3), dec!(100)));
    s.stop().await;
}

/// Two execution processes on the same consumers and state: the
/// compare-and-set on the state makes them take turns; every order fills
/// exactly once and nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_take_turns_and_never_fill_twice() {
    let nats = NatsServer::start();
    let a = start(&nats, |c| c.worker.batch_size = 4).await;
    // (The mark goes first: `price` checks instance A's own memory.)
    a.price("AAPL", dec!(100)).await;
    // A second process with the same prefix (topology already applied).
    let mut cfg = Config::default();
    cfg.nats.url = nats.url();
    cfg.metrics.addr = "127.0.0.1:0".into();
    cfg.topology.prefix = a.prefix.clone();
    cfg.worker.heartbeat_ms = 500;
    cfg.worker.pull_expires_ms = 2_000;
    cfg.worker.publish_retry_delay_ms = 200;
    cfg.worker.batch_size = 4;
    cfg.execution.tick_ms = 100;
    let shutdown_b = CancellationToken::new();
    let mut pb = Process::start(cfg, shutdown_b.clone()).await.unwrap();
    worker::spawn(&mut pb).unwrap();
    let wb = tokio::spawn(pb.wait());

    let n = 40;
    for i in 0..n {
        a.order(
            &order(
                &format!("T{i}"),
                "PAPER",
                OrderType::Market,
                Side::Buy,
                Decimal::from(1 + i % 3),
                dec!(100),
            ),
            &format!("t{i}"),
        )
        .await;
    }
    let all = eventually(Duration::from_secs(30), || async {
        a.executions().await.len() >= n as usize
    })
    .await;
    assert!(all, "not every order filled");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let x = a.executions().await;
    let mut ids: Vec<_> = x.iter().map(|x| x.order_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        (x.len(), ids.len()),
        (n as usize, n as usize),
        "one execution per order"
    );
    assert!(a.dlq().await.is_empty());
    shutdown_b.cancel();
    wb.await.unwrap();
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_after_the_fill_is_too_late_not_a_dead_letter() {
    let nats = NatsServer::start();
    let s = start(&nats, |_| {}).await;
    let o = order(
        "F1",
        "PAPER",
        OrderType::Market,
        Side::Buy,
        dec!(5),
        dec!(100),
    );
    s.order(&o, "f1").await;
    s.wait_status("F1", OrderStatus::Filled).await;
    // Cerebro still saw the order working and cancels the rest: the fill won.
    s.cancel("PAPER", "F1", "c1").await;
    let counted = eventually(Duration::from_secs(10), || async {
        mtx_runtime::metrics::render(&s.registry)
            .contains("mtx_execution_cancel_rejects_total{reason=\"too_late\"} 1")
    })
    .await;
    assert!(counted, "{}", mtx_runtime::metrics::render(&s.registry));
    // A later message is handled, so the cancel was acknowledged, not stuck.
    s.order(
        &order(
            "F2",
            "PAPER",
            OrderType::Market,
            Side::Buy,
            dec!(1),
            dec!(100),
        ),
        "f2",
    )
    .await;
    s.wait_status("F2", OrderStatus::Filled).await;
    assert!(s.dlq().await.is_empty(), "{:?}", s.dlq().await);
    let events = s.events("F1").await;
    assert_eq!(
        events.last().map(|e| e.status),
        Some(OrderStatus::Filled),
        "a terminal status is never overwritten"
    );
    assert_eq!(s.executions().await.len(), 2, "one fill per order");
    // The ops contract (deploy/prometheus/METRICS.md).
    let text = mtx_runtime::metrics::render(&s.registry);
    for line in [
        "mtx_fills_total 2",
        "mtx_orders_total{status=\"filled\"} 2",
        "mtx_orders_total{status=\"submitted\"} 2",
        // Signal → fill, from the carried receive time, once per fill.
        "mtx_end_to_end_latency_seconds_count{stage=\"execution\"} 2",
    ] {
        assert!(text.contains(line), "missing `{line}` in {text}");
    }
    s.stop().await;
}
