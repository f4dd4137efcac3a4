//! Shared by the execution stage's integration tests.

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
