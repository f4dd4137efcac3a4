//! Shared setup for the runtime's integration tests (included with `mod common;`).
#![allow(dead_code)]

use async_nats::jetstream;
use bytes::Bytes;
use futures::StreamExt;
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_runtime::Handler;
use mtx_schemas::{headers, Environment};
use mtx_subjects::Topology;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A config pointing at `nats` with a fresh topology prefix.
pub fn config(nats: &NatsServer) -> Config {
    let mut c = Config::default();
    if let Ok(level) = std::env::var("TEST_LOG") {
        c.log.level = level;
        mtx_runtime::telemetry::init(&c.log);
    }
    c.nats.url = nats.url();
    c.metrics.addr = "127.0.0.1:0".into();
    c.topology.prefix = unique("t");
    c.worker.heartbeat_ms = 500;
    c.worker.pull_expires_ms = 2_000;
    c.worker.publish_retry_delay_ms = 200;
    c
}

pub async fn js(nats: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    jetstream::new(client)
}

pub async fn apply(js: &jetstream::Context, cfg: &Config) -> Topology {
    let topo = Topology::build(&cfg.topology);
    mtx_subjects::apply::apply(js, &topo).await.expect("apply");
    topo
}

#[allow(unused_imports)] // not every test binary reads streams back
pub use mtx_harness::bus::read_all;

/// Number of messages stored under `filter`.
pub async fn count(js: &jetstream::Context, stream: &str, filter: &str) -> usize {
    let st = js.get_stream(stream).await.expect("stream");
    let info = st.info_with_subjects(filter).await.expect("info");
    let mut n = 0;
    let mut subjects = info;
    while let Some(Ok((_, c))) = subjects.next().await {
        n += c;
    }
    n
}

/// Poll an async condition until true or timeout.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The raw-signal subject (source `t`) under `cfg`'s prefix: what the
/// standardizer's consumer reads.
pub fn raw_subject(cfg: &Config) -> String {
    mtx_subjects::Subjects::new(&cfg.topology.prefix)
        .signals_raw(Environment::Staging, "t")
        .expect("raw subject")
}

/// Publish every `(Nats-Msg-Id, body)` on `subject`, each with the `base`
/// headers too: all sent, then every ack awaited. Their stream sequences.
pub async fn publish_all(
    js: &jetstream::Context,
    subject: &str,
    base: &async_nats::HeaderMap,
    msgs: impl IntoIterator<Item = (String, String)>,
) -> Vec<u64> {
    let mut acks = Vec::new();
    for (id, body) in msgs {
        let mut h = base.clone();
        h.insert(headers::MSG_ID, id.as_str());
        acks.push(
            js.publish_with_headers(subject.to_string(), h, Bytes::from(body))
                .await
                .expect("publish"),
        );
    }
    let mut seqs = Vec::new();
    for a in acks {
        seqs.push(a.await.expect("publish ack").sequence);
    }
    seqs
}

/// `n` messages `m<i>` with Nats-Msg-Id `in-<i>` on `subject`; their stream
/// sequences.
pub async fn publish_n(js: &jetstream::Context, subject: &str, n: usize) -> Vec<u64> {
    let msgs = (0..n).map(|i| (format!("in-{i}"), format!("m{i}")));
    publish_all(js, subject, &async_nats::HeaderMap::new(), msgs).await
}

/// (pending, ack pending) of the durable consumer `durable` on `stream`:
/// (0, 0) once it has settled everything.
pub async fn backlog(js: &jetstream::Context, stream: &str, durable: &str) -> (u64, usize) {
    let i = js
        .get_stream(stream)
        .await
        .expect("stream")
        .consumer_info(durable)
        .await
        .expect("consumer info");
    (i.num_pending, i.num_ack_pending)
}

/// Header `k` of a stored message (panics when it has none).
pub fn header(m: &jetstream::Message, k: &str) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(k))
        .unwrap_or_else(|| panic!("no {k} header on {m:?}"))
        .as_str()
        .to_string()
}

/// A runtime process of its own on `cfg`: spawn consumers on it, then
/// [`Running::new`].
pub async fn process(cfg: &Config) -> Process {
    Process::start(cfg.clone(), CancellationToken::new())
        .await
        .expect("process")
}

/// `handler` as `stage` on the durable consumer `durable`, in a running
/// process of its own.
pub async fn consume<H: Handler>(
    cfg: &Config,
    stage: &str,
    durable: &str,
    handler: Arc<H>,
) -> Running {
    let mut p = process(cfg).await;
    p.spawn_consumer(stage, durable, handler)
        .expect("spawn consumer");
    Running::new(p)
}

/// A process waiting for its shutdown in the background.
pub struct Running {
    pub shutdown: CancellationToken,
    pub registry: prometheus::Registry,
    waiter: tokio::task::JoinHandle<()>,
}

impl Running {
    pub fn new(p: Process) -> Running {
        Running {
            shutdown: p.shutdown.clone(),
            registry: p.registry.clone(),
            waiter: tokio::spawn(p.wait()),
        }
    }

    /// Cancel (if not yet) and wait until the process has finished.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.waiter.await.expect("process task");
    }
}

/// The `echo_worker` fixture on `cfg`'s server and topology, stderr appended
/// to `log`; `env` on top of the settings every such test uses.
pub fn echo_worker(cfg: &Config, log: &Path, env: &[(&str, &str)]) -> Child {
    let out = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("worker log");
    Command::new(env!("CARGO_BIN_EXE_echo_worker"))
        .env("MTX_NATS__URL", &cfg.nats.url)
        .env("MTX_TOPOLOGY__PREFIX", &cfg.topology.prefix)
        .env("MTX_METRICS__ADDR", "127.0.0.1:0")
        .env("MTX_WORKER__CONCURRENCY", "8")
        .env("MTX_WORKER__HEARTBEAT_MS", "500")
        .env("MTX_WORKER__PULL_EXPIRES_MS", "2000")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::from(out))
        .spawn()
        .expect("spawn echo_worker")
}
