//! The one consume loop against a real nats-server: ack, delayed redelivery,
//! DLQ with reason and payload, max deliveries, stop mid-batch and restart.

mod common;

use common::*;
use mtx_harness::NatsServer;
use mtx_runtime::config::Config;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::headers;
use mtx_subjects::topology::streams;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Script {
    out_subject: String,
    seen: Mutex<Vec<(String, u64, Instant)>>,
    delay: Duration,
}

impl Handler for Script {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        let body = String::from_utf8_lossy(&msg.payload).to_string();
        self.seen
            .lock()
            .unwrap()
            .push((body.clone(), msg.deliveries, Instant::now()));
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let ok = || {
            Outcome::Ok(vec![Outgoing::new(
                self.out_subject.clone(),
                format!("out-{body}"),
                body.clone(),
            )])
        };
        match body.split(':').next().unwrap_or("") {
            "ok" => ok(),
            "retry-once" if msg.deliveries == 1 => {
                Outcome::retry(Duration::from_secs(1), "not yet")
            }
            "retry-once" => ok(),
            "reject" => Outcome::reject("bad_input", format!("cannot use {body}\nsecond line")),
            "fail" => Outcome::retry(Duration::from_millis(100), "still failing"),
            _ => ok(),
        }
    }
}

impl Script {
    /// Outputs on `audit.out` under `cfg`'s prefix.
    fn new(cfg: &Config) -> Script {
        Script {
            out_subject: mtx_subjects::Subjects::new(&cfg.topology.prefix)
                .audit("out")
                .unwrap(),
            ..Default::default()
        }
    }
}

/// Each body with Nats-Msg-Id `in-<body>` and a Received-At header.
async fn publish_raw(
    js: &async_nats::jetstream::Context,
    subject: &str,
    bodies: &[impl AsRef<str>],
) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::RECEIVED_AT, "1");
    let msgs = bodies.iter().map(|b| {
        let b = b.as_ref();
        (format!("in-{b}"), b.to_string())
    });
    publish_all(js, subject, &h, msgs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_drive_ack_delayed_redelivery_and_dlq() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.topology.max_deliver = 3;
    cfg.topology.ack_wait_secs = 5;
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let handler = Arc::new(Script::new(&cfg));
    let out_subject = handler.out_subject.clone();
    let run = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;

    let raw = raw_subject(&cfg);
    publish_raw(&js, &raw, &["ok:1", "retry-once:2", "reject:3", "fail:4"]).await;

    let audit = topo.stream_name(streams::AUDIT);
    let dlq = topo.stream_name(streams::DLQ);
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &audit, &out_subject).await == 2 && count(&js, &dlq, ">").await == 2
        })
        .await,
        "expected 2 outputs and 2 dead letters"
    );

    // Delayed redelivery: the second delivery of retry-once came ~1 s later, not at once.
    let seen = handler.seen.lock().unwrap().clone();
    let times: Vec<_> = seen
        .iter()
        .filter(|(b, _, _)| b == "retry-once:2")
        .collect();
    assert_eq!(times.len(), 2, "{seen:?}");
    assert_eq!((times[0].1, times[1].1), (1, 2));
    let gap = times[1].2 - times[0].2;
    assert!(
        gap >= Duration::from_millis(900),
        "redelivered after {gap:?}, expected >= 1 s"
    );
    assert!(
        gap < Duration::from_secs(5),
        "redelivered after {gap:?}: NAK delay ignored (ack_wait?)"
    );

    // `fail` was tried max_deliver (3) times, then dead-lettered.
    let fails: Vec<_> = seen
        .iter()
        .filter(|(b, _, _)| b == "fail:4")
        .map(|(_, d, _)| *d)
        .collect();
    assert_eq!(fails, vec![1, 2, 3]);
    // Every NAK delay is honoured, not only the first (100 ms each, far below ack_wait).
    let fail_times: Vec<_> = seen
        .iter()
        .filter(|(b, _, _)| b == "fail:4")
        .map(|(_, _, t)| *t)
        .collect();
    for w in fail_times.windows(2) {
        assert!(
            w[1] - w[0] < Duration::from_secs(2),
            "NAK delay stretched to {:?}",
            w[1] - w[0]
        );
    }

    let dead = read_all(&js, &dlq, ">").await;
    let by_body: HashMap<String, &async_nats::jetstream::Message> = dead
        .iter()
        .map(|m| (String::from_utf8_lossy(&m.payload).to_string(), m))
        .collect();
    let rej = by_body["reject:3"];
    assert_eq!(
        rej.subject.as_str(),
        format!("{}.dlq.standardizer", cfg.topology.prefix)
    );
    assert_eq!(header(rej, headers::DLQ_REASON), "bad_input");
    assert_eq!(
        header(rej, headers::DLQ_DETAIL),
        "cannot use reject:3 second line"
    );
    assert_eq!(header(rej, headers::DLQ_STAGE), "standardizer");
    assert_eq!(header(rej, headers::ORIGINAL_SUBJECT), raw);
    assert_eq!(
        header(rej, headers::RECEIVED_AT),
        "1",
        "original headers are kept"
    );
    let fail = by_body["fail:4"];
    assert_eq!(header(fail, headers::DLQ_REASON), "max_deliveries");
    assert_eq!(header(fail, headers::DLQ_DETAIL), "still failing");
    assert_eq!(header(fail, headers::DELIVERIES), "3");

    // Nothing left pending on the consumer.
    let raw_stream = topo.stream_name(streams::SIGNALS_RAW);
    assert!(
        eventually(Duration::from_secs(5), || async {
            backlog(&js, &raw_stream, "standardizer").await == (0, 0)
        })
        .await
    );

    let text = mtx_runtime::metrics::render(&run.registry);
    for line in [
        "mtx_messages_processed_total{consumer=\"standardizer\",outcome=\"ok\",stage=\"standardizer\"} 2",
        "mtx_messages_processed_total{consumer=\"standardizer\",outcome=\"dlq\",stage=\"standardizer\"} 2",
        "mtx_messages_processed_total{consumer=\"standardizer\",outcome=\"retry\",stage=\"standardizer\"} 3",
        "mtx_dlq_messages_total{reason=\"bad_input\",stage=\"standardizer\"} 1",
        "mtx_dlq_messages_total{reason=\"max_deliveries\",stage=\"standardizer\"} 1",
        "mtx_redeliveries_total{stage=\"standardizer\"} 3",
        "mtx_messages_received_total{stage=\"standardizer\"} 7",
        // Series that never moved exist at 0 from the start.
        "mtx_messages_processed_total{consumer=\"standardizer\",outcome=\"duplicate\",stage=\"standardizer\"} 0",
    ] {
        assert!(text.contains(line), "missing `{line}` in\n{text}");
    }
    // The consumer's configured limit, sampled from consumer info.
    let max_ack = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "mtx_consumer_max_ack_pending{consumer=\"standardizer\",stage=\"standardizer\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no mtx_consumer_max_ack_pending in\n{text}"));
    let st = js.get_stream(&raw_stream).await.unwrap();
    let configured = st
        .consumer_info("standardizer")
        .await
        .unwrap()
        .config
        .max_ack_pending;
    assert_eq!(max_ack, configured.to_string());
    run.stop().await;
}

/// A handler slower than the ack wait (a CPU-starved database under the
/// sink) keeps its messages: the loop marks them in progress, so neither a
/// second replica nor its own next batch gets a redelivery meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_the_ack_wait_keeps_its_messages() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.topology.ack_wait_secs = 1;
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let handler = Arc::new(Script {
        delay: Duration::from_millis(3_500),
        ..Script::new(&cfg)
    });
    let first = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;
    let second = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;
    publish_raw(&js, &raw_subject(&cfg), &["ok:slow"]).await;
    let audit = topo.stream_name(streams::AUDIT);
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &audit, ">").await == 1
        })
        .await,
        "the slow message's output"
    );
    // Longer than an ack wait after the ack: a redelivery would show by now.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let seen = handler.seen.lock().unwrap().clone();
    let deliveries: Vec<u64> = seen.iter().map(|(_, d, _)| *d).collect();
    assert_eq!(deliveries, vec![1], "handled more than once: {seen:?}");
    first.stop().await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_mid_batch_and_restart_loses_nothing_and_repeats_nothing() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.worker.batch_size = 50;
    cfg.worker.concurrency = 4;
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let n = 400;
    let bodies: Vec<String> = (0..n).map(|i| format!("ok:{i}")).collect();
    publish_raw(&js, &raw_subject(&cfg), &bodies).await;
    let audit = topo.stream_name(streams::AUDIT);

    let handler = Arc::new(Script {
        delay: Duration::from_millis(5),
        ..Script::new(&cfg)
    });
    for round in 0..2 {
        let run = consume(&cfg, "standardizer", "standardizer", handler.clone()).await;
        if round == 0 {
            // Stop while batches are in flight.
            assert!(
                eventually(Duration::from_secs(20), || async {
                    handler.seen.lock().unwrap().len() >= 60
                })
                .await
            );
            run.stop().await;
            let handled = handler.seen.lock().unwrap().len();
            assert!(handled < n, "stopped too late to test anything ({handled})");
        } else {
            assert!(
                eventually(Duration::from_secs(30), || async {
                    count(&js, &audit, ">").await == n
                })
                .await,
                "all {n} outputs after restart"
            );
            run.stop().await;
        }
    }
    // Every input handled exactly once: nothing acked was redelivered, nothing lost.
    let seen = handler.seen.lock().unwrap().clone();
    let mut per: HashMap<String, usize> = HashMap::new();
    for (b, _, _) in &seen {
        *per.entry(b.clone()).or_default() += 1;
    }
    assert_eq!(per.len(), n);
    let twice: Vec<_> = per.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stages_dead_lettering_the_same_message_keep_one_entry_each() {
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let mut p = process(&cfg).await;
    let handler = Arc::new(Script::new(&cfg));
    // Two stages reading SIGNALS_RAW (as the standardizer and the sink do).
    p.spawn_consumer("standardizer", "standardizer", handler.clone())
        .unwrap();
    p.spawn_consumer("sink", "sink_signals_raw", handler.clone())
        .unwrap();
    let run = Running::new(p);

    let before = chrono::Utc::now();
    publish_raw(&js, &raw_subject(&cfg), &["reject:1"]).await;
    let dlq = topo.stream_name(streams::DLQ);
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &dlq, ">").await == 2
        })
        .await,
        "both stages' dead letters expected, got {}",
        count(&js, &dlq, ">").await
    );
    let after = chrono::Utc::now();
    let raw_stream = topo.stream_name(streams::SIGNALS_RAW);
    let mut seen = Vec::new();
    for m in read_all(&js, &dlq, ">").await {
        let get = |k: &str| header(&m, k);
        let consumer = get(mtx_runtime::dlq::DLQ_CONSUMER);
        assert_eq!(
            get(headers::MSG_ID),
            mtx_runtime::dlq::msg_id(&raw_stream, &consumer, 1)
        );
        // When the runtime dead-lettered it, RFC 3339.
        let t = chrono::DateTime::parse_from_rfc3339(&get(mtx_runtime::dlq::DLQ_TIME))
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert!(
            t >= before - chrono::Duration::milliseconds(1) && t <= after,
            "{t} not within [{before}, {after}]"
        );
        assert_eq!(get(headers::DLQ_REASON), "bad_input");
        seen.push((get(headers::DLQ_STAGE), consumer, m.subject.to_string()));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (
                "sink".to_string(),
                "sink_signals_raw".to_string(),
                format!("{}.dlq.sink", cfg.topology.prefix)
            ),
            (
                "standardizer".to_string(),
                "standardizer".to_string(),
                format!("{}.dlq.standardizer", cfg.topology.prefix)
            ),
        ]
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_never_dead_letters_its_own_dead_letters_again() {
    let nats = NatsServer::start();
    let cfg = config(&nats);
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    // The sink reads the DLQ; here it refuses everything it reads.
    let run = consume(&cfg, "sink", "sink_dlq", Arc::new(Script::new(&cfg))).await;
    let subjects = mtx_subjects::Subjects::new(&cfg.topology.prefix);
    // Another stage's dead letter may take one hop into dlq.sink ...
    publish_raw(&js, &subjects.dlq("standardizer").unwrap(), &["reject:std"]).await;
    let dlq = topo.stream_name(streams::DLQ);
    let drained = || async { backlog(&js, &dlq, "sink_dlq").await == (0, 0) };
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &dlq, ">").await == 2 && drained().await
        })
        .await,
        "dlq holds {}",
        count(&js, &dlq, ">").await
    );
    // ... but the sink's own dead letters are only terminated: no loop.
    publish_raw(&js, &subjects.dlq("sink").unwrap(), &["reject:own"]).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&js, &dlq, ">").await == 3 && drained().await
        })
        .await
    );
    let own = subjects.dlq("sink").unwrap();
    let std = subjects.dlq("standardizer").unwrap();
    assert_eq!(count(&js, &dlq, &own).await, 2, "the hop and the own one");
    assert_eq!(count(&js, &dlq, &std).await, 1);
    run.stop().await;
}
