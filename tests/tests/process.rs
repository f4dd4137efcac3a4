//! Real worker processes (the `echo_worker` fixture, built on the shared
//! runtime exactly like the stages): SIGTERM drains in-flight work, and
//! `kill -9` followed by a restart loses nothing.

mod common;

use common::*;
use mtx_harness::NatsServer;
use mtx_runtime::config::Config;
use mtx_subjects::topology::streams;
use std::collections::HashMap;
use std::process::{Child, ExitStatus};
use std::time::Duration;

fn spawn_worker(cfg: &Config, delay_ms: u64, id_mode: &str, log: &std::path::Path) -> Child {
    let ack_wait = cfg.topology.ack_wait_secs.to_string();
    let delay = delay_ms.to_string();
    echo_worker(
        cfg,
        log,
        &[
            ("MTX_TOPOLOGY__ACK_WAIT_SECS", &ack_wait),
            ("MTX_WORKER__BATCH_SIZE", "50"),
            ("ECHO_DELAY_MS", &delay),
            ("ECHO_ID_MODE", id_mode),
        ],
    )
}

/// SIGTERM the worker and wait for it to exit.
async fn sigterm(mut w: Child) -> ExitStatus {
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    tokio::task::spawn_blocking(move || w.wait().unwrap())
        .await
        .unwrap()
}

/// (input seq → number of echoes, deliveries seen)
async fn echoes(js: &async_nats::jetstream::Context, cfg: &Config) -> HashMap<u64, Vec<u64>> {
    let topo = mtx_subjects::Topology::build(&cfg.topology);
    let mut out: HashMap<u64, Vec<u64>> = HashMap::new();
    for m in read_all(js, &topo.stream_name(streams::AUDIT), ">").await {
        let seq: u64 = header(&m, "Echo-Seq").parse().unwrap();
        let d: u64 = header(&m, "Echo-Deliveries").parse().unwrap();
        out.entry(seq).or_default().push(d);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_and_redelivers_nothing_acked() {
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let n = 600;
    publish_n(&js, &raw_subject(&cfg), n).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = topo.stream_name(streams::AUDIT);

    // Ids include the delivery count: an acked message delivered again would
    // produce a second echo instead of being deduplicated.
    let w = spawn_worker(&cfg, 10, "seq_delivery", &dir.path().join("w1.log"));
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &audit, ">").await >= 100
        })
        .await
    );
    let status = sigterm(w).await;
    assert!(
        status.success(),
        "worker exit {status:?}: {}",
        std::fs::read_to_string(dir.path().join("w1.log")).unwrap()
    );
    let log = std::fs::read_to_string(dir.path().join("w1.log")).unwrap();
    assert!(log.contains("shutdown requested"), "{log}");
    let first = count(&js, &audit, ">").await;
    assert!(
        first < n,
        "drained everything before the signal; nothing tested ({first})"
    );

    // Nothing left unacknowledged by the stopped worker.
    let (_, ack_pending) =
        backlog(&js, &topo.stream_name(streams::SIGNALS_RAW), "standardizer").await;
    assert_eq!(
        ack_pending, 0,
        "in-flight messages left unacked after SIGTERM: {log}"
    );

    let w2 = spawn_worker(&cfg, 0, "seq_delivery", &dir.path().join("w2.log"));
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&js, &audit, ">").await >= n
        })
        .await,
        "restart did not finish the backlog"
    );
    sigterm(w2).await;

    let e = echoes(&js, &cfg).await;
    assert_eq!(e.len(), n, "every input echoed");
    let twice: Vec<_> = e.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(
        twice.is_empty(),
        "handled twice (an acked message was redelivered): {twice:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_then_restart_loses_nothing() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.topology.ack_wait_secs = 2;
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let n = 600;
    publish_n(&js, &raw_subject(&cfg), n).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = topo.stream_name(streams::AUDIT);

    let mut w = spawn_worker(&cfg, 10, "seq", &dir.path().join("w1.log"));
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &audit, ">").await >= 100
        })
        .await
    );
    w.kill().unwrap(); // SIGKILL mid-batch
    w.wait().unwrap();
    let before = count(&js, &audit, ">").await;
    assert!(before < n);

    let mut w2 = spawn_worker(&cfg, 0, "seq", &dir.path().join("w2.log"));
    assert!(
        eventually(Duration::from_secs(40), || async {
            count(&js, &audit, ">").await >= n
        })
        .await,
        "messages lost after kill -9: {} of {n}",
        count(&js, &audit, ">").await
    );
    let e = echoes(&js, &cfg).await;
    assert_eq!(e.len(), n);
    // Output ids are deterministic, so redeliveries of unacked work deduplicate.
    assert!(e.values().all(|v| v.len() == 1));
    w2.kill().unwrap();
    w2.wait().unwrap();
}
