//! Kill the execution worker (`mtx run execution`, a separate process)
//! between fill and ack and restart it: no order is filled twice and no fill
//! is lost.
//!
//! - `after_fill_persisted`: the process aborts right after the fill was
//!   written to the `execution_state` KV bucket, before anything was
//!   published or acked. Between the crash and the restart the mark moves, so
//!   a second decision would fill at another price: the one execution on the
//!   stream must carry the original price.
//! - `after_fill_published`: the process aborts after publishing, before
//!   acking: the redelivered order must not produce a second execution.
//! - SIGKILL at random moments while orders and prices stream in: every order
//!   ends with exactly one execution.

use async_nats::jetstream;
use mtx_harness::{unique, until, NatsServer};
use mtx_runtime::config::Config;
use mtx_schemas::headers;
use mtx_schemas::ids::execution_id;
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{decode_order_events, ExecutionConfirmation, Order, OrderEvent};
use mtx_schemas::OrderStatus;
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ACCOUNT: &str = "PAPER";

struct Env {
    nats: NatsServer,
    cfg: Config,
    js: jetstream::Context,
    topo: Topology,
    subjects: Subjects,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Env {
        let nats = NatsServer::start();
        let mut cfg = Config::default();
        cfg.nats.url = nats.url();
        cfg.topology.prefix = unique("t");
        cfg.topology.ack_wait_secs = 2;
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = jetstream::new(client);
        let topo = Topology::build(&cfg.topology);
        mtx_subjects::apply::apply(&js, &topo).await.expect("apply");
        let subjects = Subjects::new(&cfg.topology.prefix);
        Env {
            nats,
            cfg,
            js,
            topo,
            subjects,
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    /// `mtx run execution` against this environment.
    fn worker(&self, failpoint: Option<&str>, log: &str) -> Child {
        let log = self.dir.path().join(log);
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().expect("log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mtx"));
        cmd.args(["run", "execution"])
            .current_dir(self.dir.path())
            .env("MTX_NATS__URL", self.nats.url())
            .env("MTX_TOPOLOGY__PREFIX", &self.cfg.topology.prefix)
            .env("MTX_TOPOLOGY__ACK_WAIT_SECS", "2")
            .env("MTX_METRICS__ADDR", "127.0.0.1:0")
            .env("MTX_WORKER__HEARTBEAT_MS", "500")
            .env("MTX_WORKER__PULL_EXPIRES_MS", "2000")
            .env("MTX_WORKER__PUBLISH_RETRY_DELAY_MS", "200")
            .env("MTX_EXECUTION__TICK_MS", "200")
            .env("MTX_LOG__LEVEL", "info")
            .env_remove("FAILPOINTS")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if let Some(f) = failpoint {
            cmd.env("FAILPOINTS", format!("execution_{f}"));
        }
        // SAFETY: prctl is async-signal-safe; the child dies with the test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.spawn().expect("spawn mtx")
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    async fn publish(&self, subject: String, id: String, body: Vec<u8>) {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, id.as_str());
        self.js
            .publish_with_headers(subject, h, body.into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    async fn price(&self, symbol: &str, price: Decimal) {
        let now = chrono::Utc::now();
        let m = MarketPrice {
            symbol: symbol.into(),
            price,
            timestamp: now,
            source: Some("test".into()),
        };
        self.publish(
            self.subjects.market_price(symbol).unwrap(),
            format!("px.{}", now.timestamp_nanos_opt().unwrap()),
            serde_json::to_vec(&m).unwrap(),
        )
        .await;
    }

    async fn order(&self, o: &Order) {
        self.publish(
            self.subjects.orders_new(&o.account).unwrap(),
            o.order_id.clone(),
            serde_json::to_vec(o).unwrap(),
        )
        .await;
    }

    async fn read(&self, stream: &str, filter: &str) -> Vec<jetstream::Message> {
        mtx_harness::bus::read_all(&self.js, &self.topo.stream_name(stream), filter).await
    }

    async fn executions(&self) -> Vec<ExecutionConfirmation> {
        self.read(
            streams::EXECUTIONS,
            &self.subjects.executions(ACCOUNT).unwrap(),
        )
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
    }

    async fn events(&self) -> Vec<OrderEvent> {
        self.read(
            streams::ORDER_EVENTS,
            &self.subjects.orders_events(ACCOUNT).unwrap(),
        )
        .await
        .iter()
        .flat_map(|m| decode_order_events(&m.payload).unwrap())
        .collect()
    }

    /// Both execution consumers have nothing pending or unacked.
    async fn drained(&self) -> bool {
        for (stream, durable) in [
            (streams::ORDERS, "execution"),
            (streams::MARKET, "execution_market"),
        ] {
            let st = self
                .js
                .get_stream(self.topo.stream_name(stream))
                .await
                .unwrap();
            let i = st.consumer_info(durable).await.unwrap();
            if i.num_pending > 0 || i.num_ack_pending > 0 {
                return false;
            }
        }
        true
    }

    async fn state_json(&self) -> serde_json::Value {
        let kv = self
            .js
            .get_key_value(self.topo.bucket(buckets::EXECUTION_STATE).unwrap())
            .await
            .unwrap();
        let v = kv.get("venues").await.unwrap().expect("state written");
        serde_json::from_slice(&v).unwrap()
    }
}

fn market_buy(id: &str, qty: Decimal, reference: Decimal) -> Order {
    let now = chrono::Utc::now();
    Order {
        price: Some(reference),
        ..Order::pending(id, format!("sig_{id}"), "S", ACCOUNT, "AAPL", qty, now)
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        assert!(start.elapsed() < timeout, "worker did not crash");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(mut child: Child) {
    // SIGTERM: the graceful path.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let start = Instant::now();
    while child.try_wait().ok().flatten().is_none() && start.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

async fn crash_between_fill_and_ack(failpoint: &str) {
    let env = Env::new().await;
    env.price("AAPL", Decimal::from(100)).await;
    let mut w1 = env.worker(Some(failpoint), "w1.log");
    env.order(&market_buy("C1", Decimal::from(10), Decimal::from(100)))
        .await;
    let status = wait_exit(&mut w1, Duration::from_secs(30));
    assert!(!status.success(), "crash injection should abort the worker");
    assert!(
        env.log("w1.log").contains("crash injection"),
        "{}",
        env.log("w1.log")
    );

    // The fill is decided and persisted; the order is not acked.
    let state = env.state_json().await;
    let outbox = state["outbox"].as_array().expect("outbox").clone();
    let execs_before = env.executions().await;
    match failpoint {
        "after_fill_persisted" => {
            assert!(
                execs_before.is_empty(),
                "nothing published before the crash"
            );
            assert!(outbox.iter().any(|r| r["subject"]
                .as_str()
                .unwrap()
                .ends_with(&format!("executions.{ACCOUNT}"))));
        }
        _ => assert_eq!(execs_before.len(), 1, "published before the crash"),
    }
    // C1 finished: its record (key `fin.C1`) is written through the outbox.
    assert!(outbox
        .iter()
        .any(|r| r["subject"].as_str().unwrap().ends_with(".fin.C1")
            && r["payload"]["status"] == "FILLED"));
    let orders = env
        .js
        .get_stream(env.topo.stream_name(streams::ORDERS))
        .await
        .unwrap();
    let info = orders.consumer_info("execution").await.unwrap();
    assert_eq!(
        info.num_ack_pending + info.num_pending as usize,
        1,
        "the order is still unacked"
    );

    // The market moves while the worker is down: a second decision would
    // fill at 105.
    env.price("AAPL", Decimal::from(105)).await;
    let w2 = env.worker(None, "w2.log");
    until("one execution", Duration::from_secs(30), || async {
        env.executions().await.len() == 1
    })
    .await;
    until("consumers drained", Duration::from_secs(30), || async {
        env.drained().await
    })
    .await;
    // Give a wrong second fill every chance to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let execs = env.executions().await;
    assert_eq!(execs.len(), 1, "filled exactly once: {execs:#?}");
    let x = &execs[0];
    assert_eq!(x.execution_id, execution_id("C1", 1));
    assert_eq!(x.quantity, Decimal::from(10));
    assert_eq!(
        x.price,
        Decimal::from(100),
        "the original decision, not 105"
    );
    let events: Vec<(u64, OrderStatus)> = env
        .events()
        .await
        .iter()
        .filter(|e| e.order_id == "C1")
        .map(|e| (e.seq, e.status))
        .collect();
    assert_eq!(
        events,
        [
            (1, OrderStatus::Submitted),
            (2, OrderStatus::Accepted),
            (3, OrderStatus::Filled)
        ]
    );
    let log = env.log("w2.log");
    assert!(
        log.contains("input already applied"),
        "the redelivered order was recognized: {log}"
    );
    stop(w2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_fill_is_persisted_before_publish_and_ack() {
    crash_between_fill_and_ack("after_fill_persisted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_publish_before_ack() {
    crash_between_fill_and_ack("after_fill_published").await;
}

/// A tiny deterministic generator (no extra dependency); the seed is printed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_fills_twice() {
    let env = Env::new().await;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("seed {seed}");
    let mut rng = Lcg(seed);
    env.price("AAPL", Decimal::from(100)).await;
    let mut worker = env.worker(None, "k0.log");
    let mut kills = 0;
    let n = 40;
    for i in 0..n {
        if i % 5 == 0 {
            env.price("AAPL", Decimal::from(100 + i)).await;
        }
        env.order(&market_buy(
            &format!("K{i}"),
            Decimal::from(1 + i % 7),
            Decimal::from(100),
        ))
        .await;
        if rng.next(4) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.next(400))).await;
            let _ = worker.kill();
            let _ = worker.wait();
            kills += 1;
            worker = env.worker(None, &format!("k{kills}.log"));
        }
    }
    until("every order filled", Duration::from_secs(90), || async {
        env.executions().await.len() >= n as usize
    })
    .await;
    until("consumers drained", Duration::from_secs(60), || async {
        env.drained().await
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let execs = env.executions().await;
    let mut per_order: BTreeMap<String, Vec<&ExecutionConfirmation>> = BTreeMap::new();
    for x in &execs {
        per_order.entry(x.order_id.clone()).or_default().push(x);
    }
    assert_eq!(per_order.len(), n as usize, "every order has an execution");
    for (order, xs) in &per_order {
        assert_eq!(xs.len(), 1, "{order} filled {} times: {xs:#?}", xs.len());
        assert_eq!(xs[0].execution_id, execution_id(order, 1));
        assert_eq!(xs[0].status, mtx_schemas::ExecutionStatus::Filled);
    }
    eprintln!("{kills} kills, {} executions", execs.len());
    stop(worker);
}
