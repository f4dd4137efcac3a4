//! Throughput and handler latency of the execution stage on a real
//! nats-server. Ignored by default; run in release:
//!
//! ```text
//! cargo test -p mtx-execution --release --test bench -- --ignored --nocapture
//! ```
//!
//! - `throughput`: `BENCH_ORDERS` (default 20000) MARKET orders across four
//!   accounts are on the `ORDERS` stream before the stage starts; prints
//!   orders/s (first batch in to last batch out), the handler latency per
//!   batch and per order, and the CPU time per order of this process and of
//!   nats-server (Linux).
//! - `latency_at_100_per_s`: orders published one by one at 100/s for
//!   `BENCH_SECONDS` (default 5) seconds; prints the handler latency (at that
//!   rate batches hold one or two orders, so it is the per-order cost).
//!
//! Nothing here asserts on time; the assertions only check that every order
//! was filled exactly once.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use mtx_execution::worker::{self, Engine, MarketHandler, OrdersHandler};
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing, Publisher};
use mtx_schemas::order::Order;
use mtx_schemas::Side;
use mtx_subjects::topology::streams;
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use tokio_util::sync::CancellationToken;

/// (batch size, when it started, how long it took)
type Samples = Arc<Mutex<Vec<(usize, Instant, Duration)>>>;

/// Times every batch of the wrapped handler.
struct Timed<H> {
    inner: H,
    samples: Samples,
}

impl<H: Handler> Handler for Timed<H> {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        let t = Instant::now();
        let o = self.inner.handle(msg).await;
        self.samples.lock().unwrap().push((1, t, t.elapsed()));
        o
    }

    fn batches_in_flight(&self) -> usize {
        self.inner.batches_in_flight()
    }

    async fn handle_batch(&self, msgs: &[Delivery], concurrency: usize) -> Vec<Outcome> {
        let t = Instant::now();
        let o = self.inner.handle_batch(msgs, concurrency).await;
        self.samples
            .lock()
            .unwrap()
            .push((msgs.len(), t, t.elapsed()));
        o
    }
}

struct Bench {
    js: jetstream::Context,
    topo: Topology,
    subjects: Subjects,
    engine: Arc<Engine>,
    samples: Samples,
    shutdown: CancellationToken,
    waiter: tokio::task::JoinHandle<()>,
}

fn config(nats: &NatsServer) -> Config {
    let mut cfg = Config::default();
    cfg.nats.url = nats.url();
    cfg.metrics.addr = "127.0.0.1:0".into();
    cfg.topology.prefix = unique("b");
    cfg
}

async fn apply(cfg: &Config) -> (jetstream::Context, Topology, Subjects) {
    let js = jetstream::new(async_nats::connect(&cfg.nats.url).await.unwrap());
    let topo = Topology::build(&cfg.topology);
    mtx_subjects::apply::apply(&js, &topo).await.unwrap();
    (js, topo, Subjects::new(&cfg.topology.prefix))
}

/// The stage as `worker::spawn` starts it, with timed handlers.
async fn start(cfg: Config, js: jetstream::Context, topo: Topology, subjects: Subjects) -> Bench {
    let shutdown = CancellationToken::new();
    let tick = Duration::from_millis(cfg.execution.tick_ms);
    let mut p = Process::start(cfg, shutdown.clone()).await.unwrap();
    let engine = Arc::new(Engine::new(&p).unwrap());
    let samples: Samples = Arc::default();
    p.spawn_consumer(
        worker::STAGE,
        worker::DURABLE_ORDERS,
        Arc::new(Timed {
            inner: OrdersHandler(engine.clone()),
            samples: samples.clone(),
        }),
    )
    .unwrap();
    p.spawn_consumer(
        worker::STAGE_MARKET,
        worker::DURABLE_MARKET,
        Arc::new(MarketHandler(engine.clone())),
    )
    .unwrap();
    let clock = engine.clone();
    let stop = shutdown.clone();
    p.spawn(async move {
        let mut iv = tokio::time::interval(tick);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = iv.tick() => clock.tick().await,
            }
        }
    });
    Bench {
        js,
        topo,
        subjects,
        engine,
        samples,
        shutdown,
        waiter: tokio::spawn(p.wait()),
    }
}

fn market(i: usize) -> Order {
    let account = format!("PAPER{}", i % 4);
    let (order_id, signal_id) = (format!("ord_bench_{i:08}"), format!("sig_bench_{i:08}"));
    let quantity = Decimal::from(1 + i % 5);
    Order {
        // Every other order sells; `direction` stays LONG as `pending` sets it.
        side: if i.is_multiple_of(2) {
            Side::Buy
        } else {
            Side::Sell
        },
        price: Some(Decimal::new(10_000 + (i % 100) as i64, 2)),
        ..Order::pending(
            order_id,
            signal_id,
            "S",
            account,
            "AAPL",
            quantity,
            chrono::Utc::now(),
        )
    }
}

fn outgoing(subjects: &Subjects, o: &Order) -> Outgoing {
    Outgoing::new(
        subjects.orders_new(&o.account).unwrap(),
        o.order_id.clone(),
        serde_json::to_vec(o).unwrap(),
    )
}

async fn publish_all(js: &jetstream::Context, subjects: &Subjects, range: std::ops::Range<usize>) {
    let p = Publisher::new(js.clone(), None, "bench");
    let ids: Vec<usize> = range.collect();
    for chunk in ids.chunks(1000) {
        let outs = chunk
            .iter()
            .map(|i| outgoing(subjects, &market(*i)))
            .collect();
        for r in p.publish_all(outs).await {
            r.unwrap();
        }
    }
}

impl Bench {
    async fn wait_done(&self, n: u64) {
        let orders = self
            .js
            .get_stream(self.topo.stream_name(streams::ORDERS))
            .await
            .unwrap();
        let start = Instant::now();
        loop {
            let mut execs = self
                .js
                .get_stream(self.topo.stream_name(streams::EXECUTIONS))
                .await
                .unwrap();
            let stored = execs.info().await.unwrap().state.messages;
            let i = orders.consumer_info(worker::DURABLE_ORDERS).await.unwrap();
            if stored >= n && i.num_pending == 0 && i.num_ack_pending == 0 {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(600),
                "stuck: {stored} of {n} executions, {} pending, {} unacked",
                i.num_pending,
                i.num_ack_pending
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn check_exactly_once(&self, n: usize) {
        let msgs = mtx_harness::bus::read_all(
            &self.js,
            &self.topo.stream_name(streams::EXECUTIONS),
            &self.subjects.raw_subject("executions.>"),
        )
        .await;
        let mut ids: Vec<String> = msgs
            .iter()
            .map(|m| {
                serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["order_id"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ids.len(), n, "one execution per order");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "no order filled twice");
        let dlq = mtx_harness::bus::read_all(
            &self.js,
            &self.topo.stream_name(streams::DLQ),
            &self.subjects.raw_subject("dlq.>"),
        )
        .await;
        assert!(dlq.is_empty(), "{} dead letters", dlq.len());
    }

    /// `orders`: how many distinct orders the run filled (deliveries handled
    /// can be more: retried batches).
    fn report(&self, title: &str, orders: usize, cpu_before: (f64, f64)) {
        let cpu = cpu_seconds();
        let s = self.samples.lock().unwrap().clone();
        let handled: usize = s.iter().map(|x| x.0).sum();
        let first = s.iter().map(|x| x.1).min().unwrap();
        let last = s.iter().map(|x| x.1 + x.2).max().unwrap();
        let span = (last - first).as_secs_f64();
        let mut per_batch: Vec<f64> = s.iter().map(|x| x.2.as_secs_f64() * 1e3).collect();
        per_batch.sort_by(f64::total_cmp);
        // Each order waits for its whole batch.
        let mut per_order: Vec<f64> = s
            .iter()
            .flat_map(|x| std::iter::repeat_n(x.2.as_secs_f64() * 1e3, x.0))
            .collect();
        per_order.sort_by(f64::total_cmp);
        let mut amortized: Vec<f64> = s
            .iter()
            .flat_map(|x| std::iter::repeat_n(x.2.as_secs_f64() * 1e3 / x.0 as f64, x.0))
            .collect();
        amortized.sort_by(f64::total_cmp);
        let q = |v: &[f64], p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        println!(
            "[{title}] {orders} orders ({handled} deliveries handled) in {} batches (mean {:.1}/batch), {span:.2} s: {:.0} orders/s",
            s.len(),
            handled as f64 / s.len() as f64,
            orders as f64 / span
        );
        println!(
            "[{title}] handler latency per batch   p50 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            q(&per_batch, 0.5),
            q(&per_batch, 0.99),
            per_batch[per_batch.len() - 1]
        );
        println!(
            "[{title}] handler latency per order   p50 {:.3} ms  p99 {:.3} ms (time its batch took)",
            q(&per_order, 0.5),
            q(&per_order, 0.99)
        );
        println!(
            "[{title}] amortized per order         p50 {:.3} ms  p99 {:.3} ms (batch time / batch size, the runtime's handler_seconds)",
            q(&amortized, 0.5),
            q(&amortized, 0.99)
        );
        println!(
            "[{title}] CPU per order: this process {:.1} µs, nats-server {:.1} µs (from the stage's start to the end, idle time included)",
            (cpu.0 - cpu_before.0) * 1e6 / orders as f64,
            (cpu.1 - cpu_before.1) * 1e6 / orders as f64
        );
        println!(
            "[{title}] last state written: {} bytes, largest {} bytes",
            self.engine.metrics().state_bytes.get(),
            self.engine.state_bytes_max()
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.waiter.await.unwrap();
    }
}

/// CPU seconds (user + system) used so far by this process and by its
/// nats-server children (Linux `/proc`; zero elsewhere).
fn cpu_seconds() -> (f64, f64) {
    fn stat(path: &std::path::Path) -> Option<(i64, f64)> {
        let s = std::fs::read_to_string(path).ok()?;
        let rest = &s[s.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        // after the command: state ppid ... utime(12) stime(13) (0-based from state)
        let ppid = f.get(1)?.parse().ok()?;
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        Some((ppid, ticks / 100.0))
    }
    let me = std::process::id() as i64;
    let own = stat(std::path::Path::new("/proc/self/stat")).map_or(0.0, |x| x.1);
    let mut server = 0.0;
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let p = e.path();
            let is_nats =
                std::fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "nats-server");
            if let Some((ppid, cpu)) = is_nats.then(|| stat(&p.join("stat"))).flatten() {
                if ppid == me {
                    server += cpu;
                }
            }
        }
    }
    (own, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "bench: run in release with --ignored --nocapture"]
async fn throughput() {
    let n = common::env_usize("BENCH_ORDERS", 20_000);
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let (js, topo, subjects) = apply(&cfg).await;
    publish_all(&js, &subjects, 0..n).await;
    let cpu = cpu_seconds();
    let b = start(cfg, js, topo, subjects).await;
    b.wait_done(n as u64).await;
    b.report("throughput", n, cpu);
    b.check_exactly_once(n).await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "bench: run in release with --ignored --nocapture"]
async fn latency_at_100_per_s() {
    let secs = common::env_usize("BENCH_SECONDS", 5);
    let n = secs * 100;
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let (js, topo, subjects) = apply(&cfg).await;
    let cpu = cpu_seconds();
    let b = start(cfg, js.clone(), topo, subjects.clone()).await;
    let p = Publisher::new(js.clone(), None, "bench");
    let mut iv = tokio::time::interval(Duration::from_millis(10));
    for i in 0..n {
        iv.tick().await;
        p.publish(outgoing(&subjects, &market(i))).await.unwrap();
    }
    b.wait_done(n as u64).await;
    b.report("100/s", n, cpu);
    b.check_exactly_once(n).await;
    b.stop().await;
}
