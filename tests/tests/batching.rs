//! How the consume loop batches: a backlog is handed over in full batches
//! (`worker.batch_linger_ms`), the next pull request is sent while a batch is
//! handled (`worker.prefetch`) and finished on shutdown, and messages near
//! `max_deliver` that this process did not NAK itself are handled one at a
//! time (`worker.isolate_last_deliveries`); a handler that allows it gets
//! the next batch while the previous one is still being handled
//! (`Handler::batches_in_flight`, capped by `worker.max_batches_in_flight`).

mod common;

use common::*;
use mtx_harness::NatsServer;
use mtx_runtime::config::Config;
use mtx_runtime::{Delivery, Handler, Outcome};
use mtx_subjects::topology::streams;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Records the batches it is given; holds the first one until released;
/// NAKs first deliveries when asked to.
struct Recorder {
    batches: Mutex<Vec<Vec<(u64, u64)>>>,
    hold_first: bool,
    release: watch::Receiver<bool>,
    retry_first_delivery: bool,
    in_flight: usize,
}

impl Recorder {
    fn new(
        hold_first: bool,
        retry_first_delivery: bool,
        in_flight: usize,
    ) -> (Arc<Recorder>, watch::Sender<bool>) {
        let (tx, rx) = watch::channel(false);
        (
            Arc::new(Recorder {
                batches: Mutex::new(Vec::new()),
                hold_first,
                release: rx,
                retry_first_delivery,
                in_flight,
            }),
            tx,
        )
    }

    /// Settles every message of every batch at once.
    fn acking() -> Arc<Recorder> {
        Self::new(false, false, 1).0
    }

    /// Holds the first batch until `true` is sent (or forever, while the
    /// sender lives); asks for `in_flight` batches at a time.
    fn holding_first(in_flight: usize) -> (Arc<Recorder>, watch::Sender<bool>) {
        Self::new(true, false, in_flight)
    }

    /// NAKs (100 ms) every first delivery, settles the redelivery.
    fn retrying_first_deliveries() -> Arc<Recorder> {
        Self::new(false, true, 1).0
    }

    fn sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().iter().map(Vec::len).collect()
    }

    fn handled(&self) -> usize {
        self.sizes().iter().sum()
    }

    /// Whether `n` messages in all are handled within 20 s.
    async fn eventually_handled(&self, n: usize) -> bool {
        eventually(Duration::from_secs(20), || async { self.handled() == n }).await
    }
}

impl Handler for Recorder {
    async fn handle(&self, _msg: &Delivery) -> Outcome {
        Outcome::Ok(vec![])
    }

    fn batches_in_flight(&self) -> usize {
        self.in_flight
    }

    async fn handle_batch(&self, msgs: &[Delivery], _concurrency: usize) -> Vec<Outcome> {
        let first = {
            let mut b = self.batches.lock().unwrap();
            b.push(msgs.iter().map(|d| (d.stream_seq, d.deliveries)).collect());
            b.len() == 1
        };
        if first && self.hold_first {
            let mut rx = self.release.clone();
            let _ = rx.wait_for(|v| *v).await;
        }
        msgs.iter()
            .map(|d| {
                if self.retry_first_delivery && d.deliveries == 1 {
                    Outcome::retry(Duration::from_millis(100), "once more")
                } else {
                    Outcome::Ok(vec![])
                }
            })
            .collect()
    }
}

async fn publish(js: &async_nats::jetstream::Context, cfg: &Config, n: usize) {
    publish_n(js, &raw_subject(cfg), n).await;
}

/// (pending, ack pending) of the standardizer's consumer.
async fn consumer_state(js: &async_nats::jetstream::Context, cfg: &Config) -> (u64, usize) {
    let stream = mtx_subjects::Topology::build(&cfg.topology).stream_name(streams::SIGNALS_RAW);
    backlog(js, &stream, "standardizer").await
}

/// `handler` on the standardizer's consumer, in a process of its own.
async fn start(cfg: &Config, handler: Arc<Recorder>) -> Running {
    consume(cfg, "standardizer", "standardizer", handler).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_handed_over_in_full_batches() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.worker.batch_size = 20;
    cfg.worker.heartbeat_ms = 1_000;
    cfg.worker.pull_expires_ms = 4_000;
    // Generous, so a slow test machine still fills every batch; it is only
    // waited for while the server reports more messages pending.
    cfg.worker.batch_linger_ms = 400;
    let js = js(&nats).await;
    apply(&js, &cfg).await;
    publish(&js, &cfg, 100).await;
    let h = Recorder::acking();
    let run = start(&cfg, h.clone()).await;
    assert!(h.eventually_handled(100).await, "{:?}", h.sizes());
    assert_eq!(h.sizes(), vec![20; 5], "every batch full");
    // A message arriving on its own is handed over on its own.
    publish(&js, &cfg, 101).await; // 100 duplicates (same ids) + 1 new
    assert!(h.eventually_handled(101).await, "{:?}", h.sizes());
    assert_eq!(h.sizes().last(), Some(&1));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_pull_request_fills_while_a_batch_is_handled_and_shutdown_finishes_both() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.worker.batch_size = 10;
    cfg.worker.batch_linger_ms = 400; // the first batch is a whole request
    let js = js(&nats).await;
    apply(&js, &cfg).await;
    publish(&js, &cfg, 50).await;
    let (h, release) = Recorder::holding_first(1);
    let run = start(&cfg, h.clone()).await;
    // While the first batch is held, the prefetched request is delivered too.
    assert!(
        eventually(Duration::from_secs(20), || async {
            consumer_state(&js, &cfg).await == (30, 20)
        })
        .await,
        "(pending, ack pending) = {:?}",
        consumer_state(&js, &cfg).await
    );
    assert_eq!(h.sizes(), vec![10]);
    // Stop while holding it: both requests in hand are finished and acked,
    // nothing more is pulled.
    run.shutdown.cancel();
    release.send(true).unwrap();
    run.stop().await;
    assert_eq!(h.handled(), 20, "{:?}", h.sizes());
    assert_eq!(consumer_state(&js, &cfg).await, (30, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prefetch_one_request_at_a_time() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.worker.batch_size = 10;
    cfg.worker.batch_linger_ms = 400;
    cfg.worker.prefetch = false;
    let js = js(&nats).await;
    apply(&js, &cfg).await;
    publish(&js, &cfg, 50).await;
    let (h, release) = Recorder::holding_first(1);
    let run = start(&cfg, h.clone()).await;
    assert!(h.eventually_handled(10).await, "{:?}", h.sizes());
    // Sampled while the batch is held: never more than one request's worth.
    for _ in 0..10 {
        assert_eq!(consumer_state(&js, &cfg).await, (40, 10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    release.send(true).unwrap();
    assert!(h.eventually_handled(50).await, "{:?}", h.sizes());
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_near_max_deliver_are_isolated_unless_this_process_naked_them() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.topology.max_deliver = 3;
    cfg.topology.ack_wait_secs = 2;
    cfg.worker.batch_size = 10;
    cfg.worker.shutdown_grace_secs = 1;
    cfg.worker.batch_linger_ms = 400; // redeliveries arrive as one batch
                                      // isolate_last_deliveries = 2 (default): deliveries 2 and 3 of 3.
    let js = js(&nats).await;
    apply(&js, &cfg).await;

    // NAKed by this loop: the redelivery is expected and handled as a batch.
    publish(&js, &cfg, 10).await;
    let h = Recorder::retrying_first_deliveries();
    let run = start(&cfg, h.clone()).await;
    assert!(h.eventually_handled(20).await, "{:?}", h.sizes());
    assert_eq!(h.sizes(), vec![10, 10]);
    assert_eq!(consumer_state(&js, &cfg).await, (0, 0));
    run.stop().await;

    // Left unsettled by a process that died: on their next delivery each is
    // handled alone. (A fresh topology, so nothing of the first part is
    // still around.)
    let mut cfg2 = config(&nats);
    cfg2.topology = mtx_subjects::TopologySettings {
        prefix: cfg2.topology.prefix.clone(),
        ..cfg.topology.clone()
    };
    cfg2.worker = cfg.worker.clone();
    let cfg = cfg2;
    apply(&js, &cfg).await;
    publish(&js, &cfg, 5).await;
    let (stuck, _never) = Recorder::holding_first(1);
    let run = start(&cfg, stuck.clone()).await;
    let got_all = stuck.eventually_handled(5).await;
    let state = consumer_state(&js, &cfg).await;
    assert!(got_all, "{:?} {state:?}", stuck.sizes());
    run.stop().await; // the grace period runs out: the batch is abandoned
    let h = Recorder::acking();
    let run = start(&cfg, h.clone()).await;
    assert!(h.eventually_handled(5).await, "{:?}", h.sizes());
    assert_eq!(h.sizes(), vec![1; 5], "one at a time");
    let order: Vec<(u64, u64)> = h.batches.lock().unwrap().iter().map(|b| b[0]).collect();
    assert!(
        order.windows(2).all(|w| w[0].0 < w[1].0),
        "before their last try, in stream order: {order:?}"
    );
    assert!(order.iter().all(|(_, d)| *d == 2), "{order:?}");
    assert_eq!(consumer_state(&js, &cfg).await, (0, 0));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_allows_it_gets_the_next_batch_while_one_is_in_flight() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.worker.batch_size = 10;
    cfg.worker.batch_linger_ms = 400;
    let js = js(&nats).await;
    apply(&js, &cfg).await;
    publish(&js, &cfg, 50).await;
    let (h, release) = Recorder::holding_first(2);
    let run = start(&cfg, h.clone()).await;
    // The first batch is held; the others are handed over meanwhile, one
    // at a time next to it, and settled.
    assert!(
        eventually(Duration::from_secs(20), || async {
            h.handled() == 50 && consumer_state(&js, &cfg).await == (0, 10)
        })
        .await,
        "{:?} {:?}",
        h.sizes(),
        consumer_state(&js, &cfg).await
    );
    assert_eq!(h.sizes(), vec![10; 5]);
    // Stop while the first is still held: it is finished and acked.
    run.shutdown.cancel();
    release.send(true).unwrap();
    run.stop().await;
    assert_eq!(consumer_state(&js, &cfg).await, (0, 0));
    publish(&js, &cfg, 70).await; // 50 duplicates + 20 new

    // Capped by worker.max_batches_in_flight.
    let mut cfg1 = cfg.clone();
    cfg1.worker.max_batches_in_flight = 1;
    let (h, release) = Recorder::holding_first(2);
    let run = start(&cfg1, h.clone()).await;
    assert!(h.eventually_handled(10).await, "{:?}", h.sizes());
    for _ in 0..10 {
        assert_eq!(h.sizes(), vec![10], "no second batch while one is held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(consumer_state(&js, &cfg1).await.1, 20, "held + prefetched");
    release.send(true).unwrap();
    assert!(h.eventually_handled(20).await, "{:?}", h.sizes());
    run.stop().await;
}
