//! Real worker processes (the `echo_worker` fixture, built on the shared
//! runtime exactly like the stages): SIGTERM drains in-flight work, and
//! `kill -9` followed by a restart loses nothing.

mod common;

use bytes::Bytes;
use common::*;
use mtx_harness::NatsServer;
use mtx_runtime::config::Config;
use mtx_schemas::{headers, Environment};
use mtx_subjects::topology::streams;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn spawn_worker(cfg: &Config, delay_ms: u64, id_mode: &str, log: &std::path::Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_echo_worker"))
        .env("MTX_NATS__URL", &cfg.nats.url)
        .env("MTX_TOPOLOGY__PREFIX", &cfg.topology.prefix)
        .env(
            "MTX_TOPOLOGY__ACK_WAIT_SECS",
            cfg.topology.ack_wait_secs.to_string(),
        )
        .env("MTX_METRICS__ADDR", "127.0.0.1:0")
        .env("MTX_WORKER__BATCH_SIZE", "50")
        .env("MTX_WORKER__CONCURRENCY", "8")
        .env("MTX_WORKER__HEARTBEAT_MS", "500")
        .env("MTX_WORKER__PULL_EXPIRES_MS", "2000")
        .env("ECHO_DELAY_MS", delay_ms.to_string())
        .env("ECHO_ID_MODE", id_mode)
        .stdout(Stdio::null())
        .stderr(Stdio::from(out))
        .spawn()
        .expect("spawn echo_worker")
}

async fn publish_n(js: &async_nats::jetstream::Context, subject: &str, n: usize) {
    let mut acks = Vec::new();
    for i in 0..n {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, format!("in-{i}").as_str());
        acks.push(
            js.publish_with_headers(subject.to_string(), h, Bytes::from(format!("m{i}")))
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// (input seq → number of echoes, deliveries seen)
async fn echoes(js: &async_nats::jetstream::Context, cfg: &Config) -> HashMap<u64, Vec<u64>> {
    let topo = mtx_subjects::Topology::build(&cfg.topology);
    let mut out: HashMap<u64, Vec<u64>> = HashMap::new();
    for m in read_all(js, &topo.stream_name(streams::AUDIT), ">").await {
        let h = m.headers.as_ref().unwrap();
        let seq: u64 = h.get("Echo-Seq").unwrap().as_str().parse().unwrap();
        let d: u64 = h.get("Echo-Deliveries").unwrap().as_str().parse().unwrap();
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
    let raw = mtx_subjects::Subjects::new(&cfg.topology.prefix)
        .signals_raw(Environment::Staging, "t")
        .unwrap();
    let n = 600;
    publish_n(&js, &raw, n).await;
    let dir = tempfile::tempdir().unwrap();
    let audit = topo.stream_name(streams::AUDIT);

    // Ids include the delivery count: an acked message delivered again would
    // produce a second echo instead of being deduplicated.
    let mut w = spawn_worker(&cfg, 10, "seq_delivery", &dir.path().join("w1.log"));
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &audit, ">").await >= 100
        })
        .await
    );
    unsafe { libc::kill(w.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || w.wait().unwrap())
        .await
        .unwrap();
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
    let ci = js
        .get_stream(topo.stream_name(streams::SIGNALS_RAW))
        .await
        .unwrap()
        .consumer_info("standardizer")
        .await
        .unwrap();
    assert_eq!(
        ci.num_ack_pending, 0,
        "in-flight messages left unacked after SIGTERM: {log}"
    );

    let mut w2 = spawn_worker(&cfg, 0, "seq_delivery", &dir.path().join("w2.log"));
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&js, &audit, ">").await >= n
        })
        .await,
        "restart did not finish the backlog"
    );
    unsafe { libc::kill(w2.id() as i32, libc::SIGTERM) };
    tokio::task::spawn_blocking(move || w2.wait().unwrap())
        .await
        .unwrap();

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
    let raw = mtx_subjects::Subjects::new(&cfg.topology.prefix)
        .signals_raw(Environment::Staging, "t")
        .unwrap();
    let n = 600;
    publish_n(&js, &raw, n).await;
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
