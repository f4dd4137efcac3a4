//! The consume loop under two faults found in review: dead letters of
//! messages published with JetStream's own headers, and a pull request lost
//! in a NATS restart while the heartbeat interval is long.

mod common;

use common::*;
use mtx_harness::NatsServer;
use mtx_runtime::config::Config;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::{headers, Environment};
use mtx_subjects::topology::streams;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records every delivery (body, delivery count); sleeps `slow` on bodies
/// starting with "slow"; rejects bodies starting with "reject"; passes the
/// others on to one output.
struct Rec {
    out_subject: String,
    slow: Duration,
    seen: Mutex<Vec<(String, u64)>>,
}

impl Handler for Rec {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        let body = String::from_utf8_lossy(&msg.payload).to_string();
        self.seen
            .lock()
            .unwrap()
            .push((body.clone(), msg.deliveries));
        if body.starts_with("slow") {
            tokio::time::sleep(self.slow).await;
        }
        if body.starts_with("reject") {
            return Outcome::reject("bad_input", format!("cannot use {body}"));
        }
        Outcome::Ok(vec![Outgoing::new(
            self.out_subject.clone(),
            format!("out-{body}"),
            body,
        )])
    }
}

fn rec(cfg: &Config) -> Arc<Rec> {
    slow_rec(cfg, Duration::ZERO)
}

fn slow_rec(cfg: &Config, slow: Duration) -> Arc<Rec> {
    Arc::new(Rec {
        out_subject: mtx_subjects::Subjects::new(&cfg.topology.prefix)
            .audit("out")
            .unwrap(),
        slow,
        seen: Mutex::new(Vec::new()),
    })
}

impl Rec {
    fn deliveries_of(&self, body: &str) -> Vec<u64> {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|(b, _)| b == body)
            .map(|(_, d)| *d)
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejected_standardized_signal_gets_its_dead_letter() {
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let handler = rec(&cfg);
    let run = consume(&cfg, "cerebro", "cerebro", handler.clone()).await;
    // As the standardizer publishes: a subject per signal, stored only if
    // new (`Nats-Expected-Last-Subject-Sequence: 0`). A dead letter that
    // copied that header onto `dlq.cerebro` was refused after the first.
    let s = mtx_subjects::Subjects::new(&cfg.topology.prefix);
    for id in ["a", "b", "c"] {
        let subject = s
            .signal_standardized(Environment::Staging, "strat", id)
            .unwrap();
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, format!("std-{id}").as_str());
        h.insert(headers::EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        js.publish_with_headers(subject, h, format!("reject:{id}").into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let dlq = topo.stream_name(streams::DLQ);
    let all = eventually(Duration::from_secs(20), || async {
        count(&js, &dlq, ">").await == 3
    })
    .await;
    let seen = handler.seen.lock().unwrap().clone();
    run.stop().await;
    assert!(
        all,
        "3 rejections, {} dead letters; handled {seen:?}",
        count(&js, &dlq, ">").await
    );
    // Each handled once: a rejection is final.
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_heartbeat_still_notices_a_pull_request_lost_in_a_restart() {
    let mut nats = NatsServer::start();
    let mut cfg = config(&nats);
    // Longer than the loop's 5 s metrics tick allows for: the tick used to
    // restart the missed-heartbeat wait every time, so it never expired.
    cfg.worker.heartbeat_ms = 3_000;
    cfg.worker.pull_expires_ms = 120_000;
    {
        let js = js(&nats).await;
        apply(&js, &cfg).await;
    }
    let handler = rec(&cfg);
    let run = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;
    let raw = raw_subject(&cfg);
    publish_n(&js(&nats).await, &raw, 1).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            handler.seen.lock().unwrap().len() == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The server forgets the open pull request: no message, heartbeat or
    // status will come for it.
    nats.restart();
    tokio::time::sleep(Duration::from_secs(2)).await;
    publish_all(
        &js(&nats).await,
        &raw,
        &async_nats::HeaderMap::new(),
        [("after-restart".to_string(), "after".to_string())],
    )
    .await;
    let resumed = eventually(Duration::from_secs(30), || async {
        !handler.deliveries_of("after").is_empty()
    })
    .await;
    let seen = handler.seen.lock().unwrap().clone();
    run.stop().await;
    assert!(resumed, "nothing consumed 30 s after the restart: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_nats_is_recorded_with_a_reference() {
    let nats = NatsServer::start_with("max_payload: 8192", "");
    let cfg = config(&nats);
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let handler = rec(&cfg);
    let run = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;
    // Fits NATS; with the dead letter's headers added it no longer does.
    let body = format!("reject:{}", "x".repeat(8_000));
    let seqs = publish_all(
        &js,
        &raw_subject(&cfg),
        &async_nats::HeaderMap::new(),
        [("big".to_string(), body)],
    )
    .await;
    let dlq = topo.stream_name(streams::DLQ);
    let recorded = eventually(Duration::from_secs(20), || async {
        count(&js, &dlq, ">").await == 1
    })
    .await;
    run.stop().await;
    assert!(recorded, "no dead letter for a message too large to copy");
    let letter = &mtx_harness::bus::read_all(&js, &dlq, ">").await[0];
    assert_eq!(
        header(letter, mtx_runtime::dlq::DLQ_PAYLOAD_OMITTED),
        "true"
    );
    assert_eq!(header(letter, headers::DLQ_REASON), "bad_input");
    let reference: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(reference["original_seq"].as_u64(), Some(seqs[0]));
    assert_eq!(reference["original_bytes"].as_u64(), Some(8_007));
    // Handled once: the rejection was final even though its letter was not
    // the first one tried.
    assert_eq!(handler.seen.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_arriving_behind_a_slow_batch_is_handled_once() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.topology.ack_wait_secs = 1;
    cfg.worker.pull_expires_ms = 10_000;
    let js = js(&nats).await;
    apply(&js, &cfg).await;
    let handler = slow_rec(&cfg, Duration::from_millis(3_500));
    let run = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let raw = raw_subject(&cfg);
    let none = async_nats::HeaderMap::new();
    publish_all(&js, &raw, &none, [("i1".into(), "slow".into())]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Delivered into the open pull request while `slow` is handled: it waits
    // 3.5 s, more than three ack waits, and must be kept in hand meanwhile.
    publish_all(&js, &raw, &none, [("i2".into(), "b".into())]).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            !handler.deliveries_of("b").is_empty()
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (b, slow) = (handler.deliveries_of("b"), handler.deliveries_of("slow"));
    run.stop().await;
    assert_eq!(slow, vec![1]);
    assert_eq!(b, vec![1], "handled more than once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_near_max_deliver_waiting_behind_its_batch_is_handled_once() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.topology.ack_wait_secs = 1;
    cfg.topology.max_deliver = 4;
    cfg.worker.isolate_last_deliveries = 3; // deliveries >= 2 are isolated
    cfg.worker.pull_expires_ms = 10_000;
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let raw = raw_subject(&cfg);
    let none = async_nats::HeaderMap::new();
    publish_all(&js, &raw, &none, [("s".into(), "s".into())]).await;
    // A previous holder took `s` and vanished: its delivery 1 expires.
    {
        use futures::StreamExt;
        let st = js
            .get_stream(topo.stream_name(streams::SIGNALS_RAW))
            .await
            .unwrap();
        let c: async_nats::jetstream::consumer::PullConsumer =
            st.get_consumer("standardizer").await.unwrap();
        let mut b = c.fetch().max_messages(1).messages().await.unwrap();
        assert_eq!(b.next().await.unwrap().unwrap().payload.as_ref(), b"s");
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    publish_all(&js, &raw, &none, [("n".into(), "slow".into())]).await;
    // One chunk: `slow` (first delivery) is handled first, `s` (its second,
    // isolated) waits 3.5 s behind it and must be kept in hand meanwhile.
    let handler = slow_rec(&cfg, Duration::from_millis(3_500));
    let run = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            !handler.deliveries_of("s").is_empty() && !handler.deliveries_of("slow").is_empty()
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = handler.deliveries_of("s");
    let all = handler.seen.lock().unwrap().clone();
    run.stop().await;
    assert_eq!(s, vec![2], "handled more than once; all deliveries {all:?}");
}
