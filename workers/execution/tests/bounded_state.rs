//! The execution state stays bounded by the working orders, not by history:
//! finished orders live in their own `fin.<order id>` keys and are still
//! recognised after they left memory (re-sends, late cancels, restarts), a
//! version-1 state (finished orders inside) is migrated, and the janitor
//! purges records older than the retention. Real nats-server throughout.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use mtx_execution::worker::{self, finished_key, Engine, FINISHED_PREFIX, STATE_KEY};
use mtx_execution::{order_fingerprint, FinishedOrder};
use mtx_harness::{bus, until, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_runtime::{Outgoing, Publisher};
use mtx_schemas::order::{decode_order_events, CancelOrder, ExecutionConfirmation, Order};
use mtx_schemas::OrderStatus;
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use tokio_util::sync::CancellationToken;

const ACCOUNTS: usize = 4;

struct Env {
    _nats: NatsServer,
    cfg: Config,
    js: jetstream::Context,
    topo: Topology,
    subjects: Subjects,
}

impl Env {
    async fn new(tune: impl FnOnce(&mut Config)) -> Env {
        Env::on(NatsServer::start(), tune).await
    }

    async fn on(nats: NatsServer, tune: impl FnOnce(&mut Config)) -> Env {
        let cfg = common::config(nats.url(), tune);
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let topo = Topology::build(&cfg.topology);
        mtx_subjects::apply::apply(&js, &topo).await.unwrap();
        let subjects = Subjects::new(&cfg.topology.prefix);
        Env {
            _nats: nats,
            cfg,
            js,
            topo,
            subjects,
        }
    }

    async fn start(&self) -> Stage {
        let shutdown = CancellationToken::new();
        let mut p = Process::start(self.cfg.clone(), shutdown.clone())
            .await
            .unwrap();
        let engine = worker::spawn(&mut p).unwrap();
        Stage {
            engine,
            registry: p.registry.clone(),
            shutdown,
            waiter: tokio::spawn(p.wait()),
        }
    }

    async fn kv(&self) -> kv::Store {
        self.js
            .get_key_value(self.topo.bucket(buckets::EXECUTION_STATE).unwrap())
            .await
            .unwrap()
    }

    /// Publish orders / cancels (pipelined, awaited).
    async fn publish(&self, outs: Vec<Outgoing>) {
        let p = Publisher::new(self.js.clone(), None, "test");
        for chunk in outs.chunks(1000) {
            for r in p.publish_all(chunk.to_vec()).await {
                r.unwrap();
            }
        }
    }

    /// Publish `orders`, each with its order id as message id.
    async fn publish_orders(&self, orders: &[Order]) {
        let outs = orders.iter().map(|o| self.new_order(o, &o.order_id));
        self.publish(outs.collect()).await;
    }

    /// Wait up to `timeout` (panicking with `what`) until there are at least
    /// `n` executions and every input is handled.
    async fn handled(&self, what: &str, n: usize, timeout: Duration) {
        until(what, timeout, || async {
            self.execution_count().await >= n as u64 && self.settled().await
        })
        .await;
    }

    /// Wait up to `timeout` for `n` executions with every input handled,
    /// check that each of the `n` orders filled exactly once, and return
    /// the executions.
    async fn filled_once_each(&self, n: usize, timeout: Duration) -> Vec<ExecutionConfirmation> {
        self.handled("every order filled", n, timeout).await;
        let x = self.executions().await;
        let mut ids: Vec<&str> = x.iter().map(|x| x.order_id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!((x.len(), ids.len()), (n, n), "one execution per order");
        x
    }

    fn new_order(&self, o: &Order, msg_id: &str) -> Outgoing {
        Outgoing::new(
            self.subjects.orders_new(&o.account).unwrap(),
            msg_id.to_string(),
            serde_json::to_vec(o).unwrap(),
        )
    }

    fn cancel(&self, account: &str, order_id: &str, msg_id: &str) -> Outgoing {
        let c = CancelOrder {
            order_id: order_id.into(),
            account: account.into(),
            reason: None,
            timestamp: chrono::Utc::now(),
        };
        Outgoing::new(
            self.subjects.orders_cancel(account).unwrap(),
            msg_id.to_string(),
            serde_json::to_vec(&c).unwrap(),
        )
    }

    /// Every message of `stream` under the (prefixed) `subjects`.
    async fn read(&self, stream: &str, subjects: &str) -> Vec<jetstream::Message> {
        let stream = self.topo.stream_name(stream);
        bus::read_all(&self.js, &stream, &self.subjects.raw_subject(subjects)).await
    }

    async fn executions(&self) -> Vec<ExecutionConfirmation> {
        self.read(streams::EXECUTIONS, "executions.>")
            .await
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
    }

    async fn execution_count(&self) -> u64 {
        let mut st = self
            .js
            .get_stream(self.topo.stream_name(streams::EXECUTIONS))
            .await
            .unwrap();
        st.info().await.unwrap().state.messages
    }

    async fn dlq(&self) -> Vec<String> {
        self.read(streams::DLQ, "dlq.>")
            .await
            .iter()
            .map(common::dlq_reason)
            .collect()
    }

    /// Every input of the `execution` consumer handled and acked.
    async fn settled(&self) -> bool {
        let st = self
            .js
            .get_stream(self.topo.stream_name(streams::ORDERS))
            .await
            .unwrap();
        let i = st.consumer_info(worker::DURABLE_ORDERS).await.unwrap();
        i.num_pending == 0 && i.num_ack_pending == 0
    }

    async fn state(&self) -> (usize, serde_json::Value) {
        let v = self
            .kv()
            .await
            .get(STATE_KEY)
            .await
            .unwrap()
            .expect("state written");
        (v.len(), serde_json::from_slice(&v).unwrap())
    }

    async fn finished(&self, order_id: &str) -> Option<FinishedOrder> {
        self.kv()
            .await
            .get(finished_key(order_id))
            .await
            .unwrap()
            .map(|v| serde_json::from_slice(&v).unwrap())
    }
}

struct Stage {
    engine: Arc<Engine>,
    registry: prometheus::Registry,
    shutdown: CancellationToken,
    waiter: tokio::task::JoinHandle<()>,
}

impl Stage {
    async fn stop(self) {
        self.shutdown.cancel();
        self.waiter.await.unwrap();
    }

    fn metrics(&self) -> String {
        mtx_runtime::metrics::render(&self.registry)
    }
}

/// Payload bytes of `msgs`.
fn payload_bytes(msgs: &[jetstream::Message]) -> usize {
    msgs.iter().map(|m| m.payload.len()).sum()
}

fn market(id: &str, account: &str, qty: Decimal) -> Order {
    let now = chrono::Utc::now();
    Order {
        price: Some(dec!(100)),
        ..Order::pending(id, format!("sig_{id}"), "S", account, "AAPL", qty, now)
    }
}

/// Far more orders than one KV value could remember (the old single-value
/// state failed past ~5,700): every one is filled exactly once, nothing is
/// dead-lettered, and every state value written stays within what the
/// working orders (none: MARKET orders fill at once) and one batch of
/// outputs need. `MTX_TEST_ORDERS` overrides the count (default 8000).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_orders_fill_once_and_the_state_stays_small() {
    let n = common::env_usize("MTX_TEST_ORDERS", 8_000);
    let batch = 64;
    let env = Env::new(|c| c.worker.batch_size = batch).await;
    let orders: Vec<Order> = (0..n)
        .map(|i| {
            market(
                &format!("ord_many_{i:06}"),
                &format!("ACC{}", i % ACCOUNTS),
                Decimal::from(1 + i % 3),
            )
        })
        .collect();
    let stage = env.start().await;
    env.publish_orders(&orders).await;
    let x = env.filled_once_each(n, Duration::from_secs(120)).await;
    assert!(x
        .iter()
        .all(|x| x.status == mtx_schemas::ExecutionStatus::Filled));
    assert_eq!(env.dlq().await, Vec::<String>::new());

    // Bound per write: the working orders (none survive a batch) plus one
    // batch of outputs: each MARKET order gives three order events, one
    // execution and one finished record, well under 4 KiB together.
    let per_order_outputs = 4 * 1024;
    let bound = batch * per_order_outputs + 4 * 1024;
    let max = stage.engine.state_bytes_max();
    println!("{n} orders: largest state written {max} bytes (bound {bound})");
    assert!(max > 0);
    assert!(
        max <= bound,
        "largest state written: {max} bytes > {bound} (batch {batch}, no working orders)"
    );
    // Once the outbox is drained (the clock writes the smaller state), the
    // state holds no history at all.
    until("state drained", Duration::from_secs(10), || async {
        let (_, v) = env.state().await;
        v["outbox"].as_array().is_some_and(|o| o.is_empty())
    })
    .await;
    let (size, v) = env.state().await;
    assert!(size < 2 * 1024, "idle state of {size} bytes: {v}");
    assert_eq!(v["version"], 2);
    assert!(v["adapters"]["paper"]["orders"]
        .as_object()
        .unwrap()
        .is_empty());
    assert!(v["adapters"]["paper"].get("finished").is_none());
    assert!(
        v["applied"]["orders"].as_array().unwrap().len() <= 2,
        "applied sequences are ranges: {}",
        v["applied"]
    );
    // Every order has its record.
    for o in [&orders[0], &orders[n / 2], &orders[n - 1]] {
        let f = env.finished(&o.order_id).await.expect("finished record");
        assert_eq!(f.status, OrderStatus::Filled);
        assert_eq!(f.filled, o.quantity);
        assert_eq!(f.fingerprint, order_fingerprint(o));
    }
    stage.stop().await;
}

/// A batch whose outputs would not fit one state value (a server with a
/// 64 KiB `max_payload`, batches of 256 orders with ~2 KB of outputs each)
/// is applied in chunks, each written before the next: every order fills
/// once and no write exceeds the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_too_big_for_one_value_is_applied_in_chunks() {
    let max_payload = 64 * 1024;
    let nats = NatsServer::start_with(&format!("max_payload: {max_payload}"), "");
    let env = Env::on(nats, |c| c.worker.batch_size = 256).await;
    let n = 1_000;
    let orders: Vec<Order> = (0..n)
        .map(|i| market(&format!("ord_chunk_{i:05}"), "ACC0", dec!(1)))
        .collect();
    env.publish_orders(&orders).await;
    let stage = env.start().await;
    env.filled_once_each(n, Duration::from_secs(60)).await;
    assert_eq!(env.dlq().await, Vec::<String>::new());
    let max = stage.engine.state_bytes_max();
    assert!(max <= max_payload, "largest state written: {max} bytes");
    let writes = stage
        .metrics()
        .lines()
        .find_map(|l| {
            l.strip_prefix("mtx_execution_state_writes_total{result=\"ok\"} ")
                .map(|v| v.parse::<u64>().unwrap())
        })
        .unwrap();
    // Every output is persisted in the outbox of a state write before it is
    // published, and no write exceeds `max_payload`: so the writes must be
    // at least the published outputs' bytes over `max_payload` (about 18
    // here, against the 4 batches of 256 orders an unsplit run would write).
    let mut output_bytes = 0;
    for (stream, filter) in [
        (streams::ORDER_EVENTS, "orders.*.events"),
        (streams::EXECUTIONS, "executions.>"),
    ] {
        output_bytes += payload_bytes(&env.read(stream, filter).await);
    }
    let least = output_bytes.div_ceil(max_payload);
    println!(
        "{n} orders in {writes} state writes, largest {max} bytes, {output_bytes} bytes of outputs"
    );
    assert!(
        least > n.div_ceil(256) && writes as usize >= least,
        "{writes} writes for {output_bytes} bytes of outputs: the batches were not split"
    );
    stage.stop().await;
}

/// After a restart (memory empty), orders finished long ago are recognised
/// from their keys: a re-send is a duplicate, a changed re-send conflicts, a
/// cancel is too late; nothing fills twice. Keys read by direct get (a
/// single-replica bucket, as here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_orders_are_known_from_kv_after_a_restart() {
    known_after_restart(true).await;
}

/// The same with keys read from the stream leader (what a replicated bucket
/// gets; here the bucket's direct gets are switched off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_orders_are_known_from_kv_read_from_the_leader() {
    known_after_restart(false).await;
}

async fn known_after_restart(direct: bool) {
    let env = Env::new(|_| {}).await;
    if !direct {
        let name = format!("KV_{}", env.topo.bucket(buckets::EXECUTION_STATE).unwrap());
        let mut st = env.js.get_stream(&name).await.unwrap();
        let mut config = st.info().await.unwrap().config.clone();
        config.allow_direct = false;
        env.js.update_stream(config).await.unwrap();
    }
    let a = market("R1", "ACC0", dec!(5));
    let b = market("R2", "ACC1", dec!(2));
    let stage = env.start().await;
    env.publish(vec![env.new_order(&a, "m1"), env.new_order(&b, "m2")])
        .await;
    until("both filled", Duration::from_secs(20), || async {
        env.execution_count().await == 2 && env.settled().await
    })
    .await;
    // The clock rewrites the state once the outputs are published: the
    // finished records then live in their keys only.
    until("outbox drained", Duration::from_secs(10), || async {
        env.state().await.1["outbox"]
            .as_array()
            .is_some_and(|o| o.is_empty())
    })
    .await;
    stage.stop().await;
    assert!(env.finished("R1").await.is_some());

    let stage = env.start().await;
    let mut changed = b.clone();
    changed.quantity = dec!(3);
    env.publish(vec![
        env.new_order(&a, "m3"),
        env.cancel("ACC1", "R2", "m4"),
        env.new_order(&changed, "m5"),
        env.new_order(&market("R3", "ACC2", dec!(1)), "m6"),
    ])
    .await;
    env.handled("all handled", 3, Duration::from_secs(20)).await;
    let x = env.executions().await;
    assert_eq!(
        x.iter().map(|x| x.order_id.as_str()).collect::<Vec<_>>(),
        ["R1", "R2", "R3"],
        "R1 and R2 not filled again"
    );
    assert_eq!(env.dlq().await, ["conflicting_order"]);
    let text = stage.metrics();
    for line in [
        "mtx_execution_cancel_rejects_total{reason=\"too_late\"} 1",
        "mtx_execution_inputs_total{result=\"duplicate\",source=\"orders\"} 1",
        "mtx_execution_finished_lookups_total{result=\"found\"} 2",
    ] {
        assert!(text.contains(line), "missing `{line}` in {text}");
    }
    stage.stop().await;
}

/// A state written by the previous build (version 1: finished orders and a
/// plain applied set inside the one value) is read, its finished orders move
/// to their own keys, and it is rewritten as version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_state_is_migrated() {
    let env = Env::new(|_| {}).await;
    let old = market("OLD1", "ACC0", dec!(5));
    let v1 = serde_json::json!({
        "version": 1,
        "adapters": {"paper": {
            "orders": {}, "arrival": [], "marks": {"AAPL": "101"},
            "finished": {"OLD1": {
                "account": "ACC0", "status": "FILLED", "filled": "5",
                "fingerprint": order_fingerprint(&old),
                "finished_at": "2026-01-01T00:00:00Z"
            }}
        }},
        "applied": {"orders": [7, 8, 9]},
        // Version 1 kept output bodies as JSON strings.
        "outbox": [{
            "subject": env.subjects.orders_events("ACC0").unwrap(),
            "msg_id": "OLD1.3",
            "payload": serde_json::to_string(&serde_json::json!({
                "order_id": "OLD1", "account": "ACC0", "status": "FILLED",
                "previous_status": "ACCEPTED", "filled_quantity": "5",
                "avg_fill_price": "100", "reason": null,
                "timestamp": "2026-01-01T00:00:00Z", "seq": 3
            })).unwrap(),
            "headers": {}
        }]
    });
    env.kv()
        .await
        .create(STATE_KEY, serde_json::to_vec(&v1).unwrap().into())
        .await
        .unwrap();

    let stage = env.start().await;
    env.publish(vec![
        env.new_order(&old, "o1"),
        env.cancel("ACC0", "OLD1", "o2"),
        env.new_order(&market("NEW1", "ACC0", dec!(1)), "o3"),
    ])
    .await;
    env.handled("all handled", 1, Duration::from_secs(20)).await;
    let x = env.executions().await;
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].order_id, "NEW1");
    assert_eq!(x[0].price, dec!(101), "the migrated mark is used");
    assert!(env.dlq().await.is_empty());
    let f = env.finished("OLD1").await.expect("moved to its key");
    assert_eq!((f.status, f.filled), (OrderStatus::Filled, dec!(5)));
    until(
        "rewritten as version 2",
        Duration::from_secs(10),
        || async { env.state().await.1["version"] == 2 },
    )
    .await;
    let (_, v) = env.state().await;
    assert!(v["adapters"]["paper"].get("finished").is_none(), "{v}");
    // The old outbox entry was published with its body unwrapped.
    let events = bus::read_all(
        &env.js,
        &env.topo.stream_name(streams::ORDER_EVENTS),
        &env.subjects.orders_events("ACC0").unwrap(),
    )
    .await;
    let old_event = events
        .iter()
        .flat_map(|m| decode_order_events(&m.payload).unwrap())
        .find(|e| e.order_id == "OLD1")
        .expect("outbox of the old state published");
    assert_eq!((old_event.seq, old_event.status), (3, OrderStatus::Filled));
    stage.stop().await;
}

/// Finished records older than the retention (`topology.max_age_secs`, here
/// 2 s) are purged by the clock's janitor; the state key stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_janitor_purges_expired_finished_records() {
    let env = Env::new(|c| {
        c.topology.max_age_secs = 2;
        c.topology.duplicate_window_secs = 1;
    })
    .await;
    let stage = env.start().await;
    env.publish(vec![env.new_order(&market("J1", "ACC0", dec!(1)), "j1")])
        .await;
    until("filled", Duration::from_secs(20), || async {
        env.execution_count().await == 1
    })
    .await;
    until("record written", Duration::from_secs(10), || async {
        env.finished("J1").await.is_some()
    })
    .await;
    until("record purged", Duration::from_secs(30), || async {
        env.finished("J1").await.is_none()
    })
    .await;
    assert!(stage
        .metrics()
        .contains("mtx_execution_finished_purges_total{result=\"ok\"}"));
    let (_, v) = env.state().await;
    assert_eq!(v["version"], 2, "the state key is never purged");
    // Nothing but the state is left in the bucket.
    let keys: Vec<String> =
        futures::StreamExt::collect::<Vec<_>>(env.kv().await.keys().await.unwrap())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    assert!(
        keys.iter().all(|k| !k.starts_with(FINISHED_PREFIX)),
        "{keys:?}"
    );
    stage.stop().await;
}
