//! Shared by the execution stage's integration tests.
#![allow(dead_code)]

use async_nats::jetstream;
use mtx_schemas::headers;

use mtx_harness::unique;
use mtx_runtime::config::Config;

/// A config for one test: its own topology prefix on `nats_url`, short
/// heartbeats / retries and a 100 ms venue clock, then `tune`.
pub fn config(nats_url: String, tune: impl FnOnce(&mut Config)) -> Config {
    let mut cfg = Config::default();
    cfg.nats.url = nats_url;
    cfg.metrics.addr = "127.0.0.1:0".into();
    cfg.topology.prefix = unique("t");
    cfg.worker.heartbeat_ms = 500;
    cfg.worker.pull_expires_ms = 2_000;
    cfg.worker.publish_retry_delay_ms = 200;
    cfg.execution.tick_ms = 100;
    tune(&mut cfg);
    cfg
}

/// The number in environment variable `name`, or `default` when it is unset
/// or not a number (test sizes that a run can raise).
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `DLQ_REASON` header of a dead letter ("" without one).
pub fn dlq_reason(m: &jetstream::Message) -> String {
    m.headers
        .as_ref()
        .and_then(|h| h.get(headers::DLQ_REASON))
        .map(|v| v.as_str().to_string())
        .unwrap_or_default()
}
