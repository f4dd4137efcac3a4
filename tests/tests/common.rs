//! Shared setup for the runtime's integration tests (included with `mod common;`).
#![allow(dead_code)]

use async_nats::jetstream;
use futures::StreamExt;
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_subjects::Topology;
use std::time::Duration;

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
