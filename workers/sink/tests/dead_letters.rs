//! Dead letters about raw signals on a large `raw_signals` collection: the
//! ordering that stalled the chaos duplicate storm (bug #8).
//!
//! The standardizer dead-letters bad raw signals while `raw_signals` already
//! holds thousands of documents; some of those raw signals are stored before
//! their dead letters, some after. Each dead letter records its error on the
//! raw document (the dead letter's side when the raw document is there, the
//! raw side when it comes later). The guarded error update used to filter
//! with a top-level `$or`, which the stand-in answers by scanning the whole
//! collection once per statement: a batch of dead letters outlasted the
//! operation time limit, was NAKed, took the sink's readiness down with it,
//! and came back with ever longer delays, for minutes. Now every dead letter
//! is written on its first delivery, nothing is retried, and the newest
//! error wins.

mod common;

use bson::DateTime;
use common::*;
use mongodb::bson::doc;
use mtx_harness::MongoServer;
use mtx_runtime::Delivery;
use mtx_schemas::{headers, Environment};
use mtx_sink::mapping::{Kind, Mapper};
use mtx_sink::spec::{names, Db};
use mtx_subjects::topology::streams;
use std::time::Duration;

/// Raw signals already stored before the dead letters arrive.
const SEEDED: usize = 8_000;
/// Bad raw signals, each dead-lettered once.
const BAD: usize = 40;

/// Publish the dead letter the standardizer's runtime publishes for raw
/// signal `i` (stored at raw stream sequence `seq`), dead-lettered at `time`.
async fn publish_letter(t: &Setup, raw_sub: &str, i: usize, seq: u64, time: &str) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(
        headers::MSG_ID,
        format!("dlq:SIGNALS_RAW:standardizer:{seq}").as_str(),
    );
    h.insert(headers::DLQ_STAGE, "standardizer");
    h.insert(headers::DLQ_REASON, "no_legs");
    h.insert(
        headers::DLQ_DETAIL,
        format!("signal {i} has no legs").as_str(),
    );
    h.insert(headers::ORIGINAL_SUBJECT, raw_sub);
    h.insert(headers::ORIGINAL_SEQ, seq.to_string().as_str());
    h.insert(headers::DELIVERIES, "1");
    h.insert(headers::SIGNAL_ID, signal_id(i).as_str());
    h.insert(mtx_runtime::dlq::DLQ_TIME, time);
    let body = serde_json::to_vec(&raw_signal(i)).unwrap();
    publish_with(&t.js, t.sub.dlq("standardizer").unwrap(), h, body).await;
}

/// `mtx_messages_processed_total{stage="sink",outcome=...}`, summed over the
/// sink's durable consumers.
fn processed(text: &str, outcome: &str) -> u64 {
    let (o, s) = (format!("outcome=\"{outcome}\""), "stage=\"sink\"");
    text.lines()
        .filter(|l| {
            l.starts_with("mtx_messages_processed_total{") && l.contains(&o) && l.contains(s)
        })
        .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
        .sum()
}

async fn sink_consumers_drained(t: &Setup) -> bool {
    for c in t.topo.pool_consumers("sink") {
        let Ok(st) = t.js.get_stream(&c.stream).await else {
            return false;
        };
        match st.consumer_info(c.durable()).await {
            Ok(i) if i.num_ack_pending == 0 && i.num_pending == 0 => {}
            _ => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_on_a_large_raw_collection_are_written_first_time() {
    // The chaos suite's ack wait: a 2 s limit per MongoDB operation.
    let t = Setup::on(MongoServer::start(), |c| c.topology.ack_wait_secs = 5)
        .await
        .migrate()
        .await;
    let env = Environment::Staging;
    let raw_sub = t.sub.signals_raw(env, "mathematricks").unwrap();

    // Thousands of raw signals already stored (as the sink maps them).
    let store = mtx_sink::Store::connect(&t.cfg.mongo, Duration::from_secs(60))
        .await
        .unwrap();
    let mapper = Mapper::new(t.sub.clone());
    let now = DateTime::now();
    let seeded: Vec<_> = (0..SEEDED)
        .map(|i| {
            let d = Delivery {
                subject: raw_sub.clone(),
                payload: serde_json::to_vec(&raw_signal(100_000 + i)).unwrap().into(),
                headers: async_nats::HeaderMap::new(),
                deliveries: 1,
                stream_seq: i as u64 + 1,
                pending: 0,
                published: None,
            };
            mapper.prepare(Kind::RawSignals, &d, now).unwrap().doc
        })
        .collect();
    let raws = store.coll(Db::Trading, names::RAW_SIGNALS);
    for chunk in seeded.chunks(1_000) {
        raws.insert_many(chunk.to_vec()).await.unwrap();
    }

    // Half of the bad raw signals are stored before their dead letters.
    let sink = start_sink(&t.cfg).await;
    for i in 0..BAD / 2 {
        publish_raw(&t.js, &raw_sub, i).await;
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            t.count("raw_signals", doc! {}).await == (SEEDED + BAD / 2) as u64
        })
        .await,
        "raw signals stored: {}",
        t.count("raw_signals", doc! {}).await
    );
    sink.stop().await;

    // All the dead letters at once (one batch for the sink's DLQ consumer),
    // then the other half of the raw signals.
    for i in 0..BAD {
        publish_letter(&t, &raw_sub, i, 1_000 + i as u64, "2025-11-20T10:00:10Z").await;
    }
    let sink = start_sink(&t.cfg).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            t.count("dead_letters", doc! {}).await == BAD as u64
        })
        .await,
        "dead letters stored: {}",
        t.count("dead_letters", doc! {}).await
    );
    for i in BAD / 2..BAD {
        publish_raw(&t.js, &raw_sub, i).await;
    }

    // Every error recorded, by whichever side came second.
    let all_recorded = eventually(Duration::from_secs(60), || async {
        t.count("raw_signals", doc! {"error.reason": "no_legs"})
            .await
            == BAD as u64
            && sink_consumers_drained(&t).await
    })
    .await;
    let text = mtx_runtime::metrics::render(&sink.registry);
    assert!(
        all_recorded,
        "errors recorded on {} of {BAD} raw signals\n{text}",
        t.count("raw_signals", doc! {"error.reason": "no_legs"})
            .await
    );
    for i in 0..BAD {
        let raw = t
            .find("raw_signals", doc! {"signal_id": signal_id(i)})
            .await;
        assert_eq!(raw.len(), 1, "raw signal {i}");
        let err = raw[0].get_document("error").unwrap();
        let dl_id = err.get_str("dead_letter_id").unwrap();
        assert_eq!(
            t.count(
                "dead_letters",
                doc! {"dead_letter_id": dl_id, "raw_signal_id": raw[0].get_str("raw_signal_id").unwrap()}
            )
            .await,
            1,
            "raw signal {i}: the error names its dead letter"
        );
        assert_eq!(err.get_str("stage").unwrap(), "standardizer");
    }
    // Written on the first delivery: nothing NAKed, nothing redelivered.
    assert_eq!(processed(&text, "retry"), 0, "{text}");
    assert!(
        text.contains("mtx_redeliveries_total{stage=\"sink\"} 0"),
        "{text}"
    );
    sink.assert_ready();

    // The newest error wins: an older dead letter of raw signal 0 (another
    // copy) leaves its error alone, a newer one replaces it.
    publish_letter(&t, &raw_sub, 0, 5_000, "2025-11-20T09:00:00Z").await;
    publish_letter(&t, &raw_sub, 1, 5_001, "2025-11-20T11:00:00Z").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("dead_letters", doc! {}).await == BAD as u64 + 2
                && sink_consumers_drained(&t).await
        })
        .await
    );
    let error_at = |i: usize| {
        let t = &t;
        async move {
            let raw = t
                .find("raw_signals", doc! {"signal_id": signal_id(i)})
                .await;
            raw[0]
                .get_document("error")
                .unwrap()
                .get_datetime("at")
                .unwrap()
                .timestamp_millis()
        }
    };
    let millis = |s: &str| DateTime::parse_rfc3339_str(s).unwrap().timestamp_millis();
    assert_eq!(
        error_at(0).await,
        millis("2025-11-20T10:00:10Z"),
        "older error ignored"
    );
    assert_eq!(
        error_at(1).await,
        millis("2025-11-20T11:00:00Z"),
        "newer error wins"
    );
    assert_eq!(
        stream_count(&t.js, &t.topo.stream_name(streams::DLQ), ">").await,
        BAD + 2,
        "nothing dead-lettered by the sink itself"
    );
    sink.stop().await;
}
