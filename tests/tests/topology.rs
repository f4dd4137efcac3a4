//! `topology apply` is idempotent and `check` sees drift, on a real server.

mod common;

use async_nats::jetstream::consumer;
use common::*;
use mtx_harness::NatsServer;
use mtx_subjects::apply::{apply as apply_topology, check};
use mtx_subjects::Topology;
use std::time::Duration;

#[tokio::test]
async fn apply_twice_is_a_noop_and_check_detects_drift() {
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let js = js(&nats).await;
    let topo = Topology::build(&cfg.topology);

    let missing = check(&js, &topo).await.unwrap();
    assert!(missing.iter().all(|d| d.field == "exists"));
    assert_eq!(
        missing.len(),
        topo.streams.len() + topo.consumers.len() + topo.kv.len()
    );

    let first = apply_topology(&js, &topo).await.unwrap();
    assert_eq!(first.created.len(), missing.len());
    let created_at = js
        .get_stream(&topo.consumers[0].stream)
        .await
        .unwrap()
        .consumer_info(topo.consumers[0].durable())
        .await
        .unwrap()
        .created;

    let second = apply_topology(&js, &topo).await.unwrap();
    assert!(
        second.is_noop(),
        "second apply changed {:?} {:?}",
        second.created,
        second.updated
    );
    assert_eq!(second.unchanged.len(), first.created.len());
    assert!(check(&js, &topo).await.unwrap().is_empty());
    let again = js
        .get_stream(&topo.consumers[0].stream)
        .await
        .unwrap()
        .consumer_info(topo.consumers[0].durable())
        .await
        .unwrap()
        .created;
    assert_eq!(created_at, again, "consumer was recreated");

    // Someone changes a consumer setting on the server: check reports exactly it.
    let spec = topo.consumer("cerebro").unwrap();
    let stream = js.get_stream(&spec.stream).await.unwrap();
    stream
        .update_consumer(consumer::pull::Config {
            max_ack_pending: 7,
            ..spec.config.clone()
        })
        .await
        .unwrap();
    let drift = check(&js, &topo).await.unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].object, format!("consumer {}/cerebro", spec.stream));
    assert_eq!(drift[0].field, "max_ack_pending");
    assert_eq!(drift[0].expected, cfg.topology.max_ack_pending.to_string());
    assert_eq!(drift[0].actual, "7");

    // A stream limit changed too.
    let mut s = topo.streams[0].config.clone();
    s.max_age = Duration::from_secs(3600);
    js.update_stream(s).await.unwrap();
    assert_eq!(check(&js, &topo).await.unwrap().len(), 2);

    // apply repairs both and is then a no-op again.
    let fix = apply_topology(&js, &topo).await.unwrap();
    assert_eq!(fix.updated.len(), 2, "{fix:?}");
    assert!(check(&js, &topo).await.unwrap().is_empty());
    assert!(apply_topology(&js, &topo).await.unwrap().is_noop());
}

#[test]
fn checked_in_export_matches_the_code() {
    let dir = mtx_harness::repo_root().join("subjects/topology");
    let topo = Topology::build(&Default::default());
    let files = mtx_subjects::apply::export_files(&topo);
    for (rel, text) in &files {
        let on_disk = std::fs::read_to_string(dir.join(rel))
            .unwrap_or_else(|_| panic!("{rel} missing: run `mtx topology export`"));
        assert_eq!(&on_disk, text, "{rel} is stale: run `mtx topology export`");
    }
    let mut n = 0;
    for sub in ["streams", "consumers"] {
        for e in walk(&dir.join(sub)) {
            let rel = e.strip_prefix(&dir).unwrap().to_string_lossy().to_string();
            assert!(
                files.iter().any(|(r, _)| *r == rel),
                "{rel} is not produced by the code any more"
            );
            n += 1;
        }
    }
    assert_eq!(n, files.len());
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
