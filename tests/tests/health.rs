//! `/healthz`, `/readyz`, `/metrics` on a real process; readiness follows
//! the NATS connection through a server outage.

mod common;

use common::*;
use mtx_harness::NatsServer;
use mtx_runtime::process::Process;
use mtx_runtime::{Delivery, Handler, Outcome};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Nop;
impl Handler for Nop {
    async fn handle(&self, _m: &Delivery) -> Outcome {
        Outcome::Ok(vec![])
    }
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics_follow_nats() {
    let mut nats = NatsServer::start();
    let cfg = config(&nats);
    let js = js(&nats).await;
    apply(&js, &cfg).await;
    let shutdown = CancellationToken::new();
    let mut p = Process::start(cfg, shutdown.clone()).await.unwrap();
    p.spawn_consumer("standardizer", "standardizer", Arc::new(Nop))
        .unwrap();
    let base = format!("http://{}", p.ops_addr);
    let client = p.client.clone();
    let health = p.health.clone();
    let waiter = tokio::spawn(p.wait());

    let ready = || async { get(&format!("{base}/readyz")).await.0 == 200 };
    assert!(
        eventually(Duration::from_secs(10), ready).await,
        "never ready"
    );
    assert_eq!(get(&format!("{base}/healthz")).await, (200, "ok\n".into()));
    let (code, text) = get(&format!("{base}/metrics")).await;
    assert_eq!(code, 200);
    assert!(text.contains("mtx_build_info{version="), "{text}");
    assert!(text.contains("mtx_nats_connected 1"), "{text}");

    assert_eq!(health.readiness(), Ok(()));
    nats.kill();
    let not_ready = || async {
        let (c, body) = get(&format!("{base}/readyz")).await;
        c == 503 && body.contains("nats")
    };
    assert!(
        eventually(Duration::from_secs(10), not_ready).await,
        "still ready with NATS down: {:?} {:?}",
        get(&format!("{base}/readyz")).await,
        client.connection_state()
    );
    // Liveness never depends on NATS.
    assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    assert!(get(&format!("{base}/metrics"))
        .await
        .1
        .contains("mtx_nats_connected 0"));

    nats.restart();
    assert!(
        eventually(Duration::from_secs(20), ready).await,
        "not ready again after NATS came back: {:?}",
        get(&format!("{base}/readyz")).await
    );
    shutdown.cancel();
    waiter.await.unwrap();
}
