//! `mtx bench sink` end to end on the test servers (small N; the figures for
//! the note come from the CLI).

use mtx_harness::{unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_sink::bench::{run, BenchOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_writes_the_same_documents_both_ways() {
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let mut cfg = Config::default();
    cfg.nats.url = nats.url();
    cfg.mongo.uri = mongo.uri();
    cfg.mongo.trading_db = unique("trading");
    cfg.mongo.bot_core_db = unique("core");
    let n: usize = std::env::var("SINK_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let r = run(
        &cfg,
        &BenchOptions {
            n,
            rounds: std::env::var("SINK_BENCH_ROUNDS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2),
            keep: false,
            timeout: Duration::from_secs(60),
        },
    )
    .await
    .unwrap();
    eprintln!(
        "plain {:.0} docs/s, sink {:.0} docs/s, ratio {:.2} (median of {} rounds {:.2})",
        r.plain_rate(),
        r.sink_rate(),
        r.ratio(),
        r.rounds.len(),
        r.median_ratio()
    );
    for round in &r.rounds {
        assert_eq!(round.sink_docs, n as u64);
    }
    assert!(r.ratio() > 0.3, "{r:?}");
}
