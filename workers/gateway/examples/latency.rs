//! Gateway latency: POST → 202 (which includes the JetStream ack) under
//! concurrent load, against a real nats-server started for the run.
//!
//! ```sh
//! CARGO_TARGET_DIR=/tmp/t-ingress cargo run --release -p mtx-gateway --example latency -- [requests] [concurrency]
//! ```
//!
//! Defaults: 4000 requests, 200 in flight. The standardizer runs in the same
//! process (as in `mtx run all`) unless `BENCH_GATEWAY_ONLY=1`. Prints p50 /
//! p90 / p99 / max and the throughput.

use mtx_gateway::secrets::SecretHash;
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::strategy::StrategyConfig;
use mtx_subjects::topology::buckets;
use mtx_subjects::Topology;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "bench-secret-0123456789";

fn body(i: usize, run: &str) -> serde_json::Value {
    json!({
        "strategy_name": "Bench",
        "signalID": format!("{run}-{i}"),
        "passphrase": SECRET,
        "signal_type": "ENTRY",
        "account_equity": 500000,
        "signal_legs": [{
            "instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY",
            "direction": "LONG", "quantity": 10, "order_type": "MARKET", "price": 150.0
        }]
    })
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(4000);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let gateway_only = std::env::var("BENCH_GATEWAY_ONLY").is_ok();

    let nats = NatsServer::start();
    let mut c = Config::default();
    c.nats.url = nats.url();
    c.metrics.addr = "127.0.0.1:0".into();
    c.gateway.addr = "127.0.0.1:0".into();
    c.gateway.secrets_refresh_secs = 0;
    c.gateway.rate_limit_per_sec = 1_000_000;
    c.gateway.rate_limit_burst = 1_000_000;
    c.gateway.secrets.insert(
        "Bench".into(),
        SecretHash::generate(SECRET).expect("salt").to_string(),
    );
    c.topology.prefix = unique("bench");
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let topo = Topology::build(&c.topology);
    mtx_subjects::apply::apply(&js, &topo)
        .await
        .expect("topology");
    let kv = js
        .get_key_value(topo.bucket(buckets::STRATEGIES).expect("bucket"))
        .await
        .expect("kv");
    kv.put(
        "Bench",
        serde_json::to_vec(&StrategyConfig::new("Bench"))
            .expect("json")
            .into(),
    )
    .await
    .expect("put");

    let shutdown = CancellationToken::new();
    let mut p = Process::start(c, shutdown.clone()).await.expect("process");
    if !gateway_only {
        mtx_standardizer::worker::spawn(&mut p).expect("standardizer");
    }
    let addr = mtx_gateway::serve(&mut p).await.expect("gateway");
    let waiter = tokio::spawn(p.wait());
    let url = Arc::new(format!("http://{addr}/v1/signals"));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .expect("client");

    // Wait for NATS, then warm up connections.
    let run = unique("r");
    let start = Instant::now();
    while http
        .post(url.as_str())
        .json(&body(usize::MAX, &run))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
        != 202
    {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "gateway not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warm: Vec<_> = (0..concurrency)
        .map(|i| {
            let (http, url, run) = (http.clone(), url.clone(), format!("warm-{run}"));
            tokio::spawn(async move {
                let _ = http.post(url.as_str()).json(&body(i, &run)).send().await;
            })
        })
        .collect();
    for w in warm {
        let _ = w.await;
    }

    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, run, next) = (http.clone(), url.clone(), run.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut errors = 0usize;
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= total {
                        return (lat, errors);
                    }
                    let b = body(i, &run);
                    let t = Instant::now();
                    let ok = http
                        .post(url.as_str())
                        .json(&b)
                        .send()
                        .await
                        .map(|r| r.status().as_u16() == 202)
                        .unwrap_or(false);
                    lat.push(t.elapsed());
                    if !ok {
                        errors += 1;
                    }
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("task");
        all.extend(l);
        errors += e;
    }
    let elapsed = started.elapsed();
    all.sort();
    println!(
        "gateway POST -> 202: {total} requests, {concurrency} concurrent, standardizer {}",
        if gateway_only { "off" } else { "on" }
    );
    println!(
        "p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  | {:.0} req/s  errors {errors}",
        pct(&all, 0.50).as_secs_f64() * 1e3,
        pct(&all, 0.90).as_secs_f64() * 1e3,
        pct(&all, 0.99).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        total as f64 / elapsed.as_secs_f64()
    );
    shutdown.cancel();
    let _ = waiter.await;
}
