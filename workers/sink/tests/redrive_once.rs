//! `mtx dlq redrive` sends a dead letter's bytes once: `mtx dlq redrive A B`
//! that redrove A and then failed on B exits 1, and repeating it must not
//! publish A again. A letter already redriven with the same bytes is
//! skipped (reported as a duplicate) unless `--again` asks for one more
//! copy (`ops::redrive`'s `again`); other bytes (a fixed payload) are sent.

mod common;

use common::*;
use mongodb::bson::doc;
use mtx_sink::ops;
use mtx_sink::Store;
use std::time::Duration;

/// A running sink with one dead letter (an execution with a bad status):
/// the setup, the sink, a store, the letter's id and the executions subject.
async fn one_dead_letter() -> (Setup, Sink, Store, String, String) {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;
    let mut bad = execution(6);
    bad["status"] = serde_json::json!("MAYBE");
    let exe_sub = t.sub.executions("IBKR_Main").unwrap();
    publish(&t.js, &exe_sub, "exe-6-bad", None, &bad).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("dead_letters", doc! {}).await == 1
        })
        .await
    );
    let store = Store::connect(&t.cfg.mongo, Duration::from_secs(10))
        .await
        .unwrap();
    let id = t.find("dead_letters", doc! {}).await[0]
        .get_str("dead_letter_id")
        .unwrap()
        .to_string();
    (t, sink, store, id, exe_sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_redrive_is_skipped_unless_again() {
    let (t, sink, store, id, exe_sub) = one_dead_letter().await;
    let stream = t.topo.stream_name("EXECUTIONS");

    // `mtx dlq redrive <id> <other>`: the first one is redriven...
    let letter = ops::find_dead_letter(&store, &id).await.unwrap();
    let first = ops::redrive(&store, &t.js, &letter, None, false)
        .await
        .unwrap();
    assert!(!first.duplicate && first.seq > 0);
    assert_eq!(first.msg_id, format!("redrive:{id}:1"));
    let letter = ops::find_dead_letter(&store, &id).await.unwrap();
    let recorded = letter.get_array("redrives").unwrap()[0]
        .as_document()
        .unwrap()
        .clone();
    assert_eq!(
        recorded.get_str("payload_sha256").unwrap(),
        mtx_sink::mapping::sha256_hex(&ops::payload_bytes(&letter))
    );

    // ...the second id fails, the command exits 1, the operator repeats it:
    // the same bytes are not sent again; the earlier redrive is reported.
    let again = ops::redrive(&store, &t.js, &letter, None, false)
        .await
        .unwrap();
    assert!(again.duplicate, "a repeat is reported as already redriven");
    assert_eq!((&again.msg_id, again.seq), (&first.msg_id, first.seq));
    assert_eq!(
        stream_count(&t.js, &stream, &exe_sub).await,
        2,
        "original + one redrive"
    );
    let letter = ops::find_dead_letter(&store, &id).await.unwrap();
    assert_eq!(ops::redrive_count(&letter), 1, "nothing new recorded");

    // `--again`: one more copy, under a new message id.
    let forced = ops::redrive(&store, &t.js, &letter, None, true)
        .await
        .unwrap();
    assert!(!forced.duplicate && forced.seq > first.seq);
    assert_eq!(forced.msg_id, format!("redrive:{id}:2"));
    assert_eq!(stream_count(&t.js, &stream, &exe_sub).await, 3);
    let letter = ops::find_dead_letter(&store, &id).await.unwrap();
    assert_eq!(ops::redrive_count(&letter), 2);
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_records_and_fixed_payloads() {
    let (t, sink, store, id, exe_sub) = one_dead_letter().await;
    let stream = t.topo.stream_name("EXECUTIONS");
    let letter = ops::find_dead_letter(&store, &id).await.unwrap();
    ops::redrive(&store, &t.js, &letter, None, false)
        .await
        .unwrap();

    // A record written before `payload_sha256` existed: with
    // `payload_changed: false` it sent the stored payload.
    t.m.database(&t.tdb)
        .collection::<mongodb::bson::Document>("dead_letters")
        .update_one(
            doc! {"dead_letter_id": &id},
            doc! {"$unset": {"redrives.0.payload_sha256": ""}},
        )
        .await
        .unwrap();
    let letter = ops::find_dead_letter(&store, &id).await.unwrap();
    assert!(ops::earlier_redrive(&letter, &ops::payload_bytes(&letter)).is_some());
    let repeat = ops::redrive(&store, &t.js, &letter, None, false)
        .await
        .unwrap();
    assert!(repeat.duplicate);
    assert_eq!(stream_count(&t.js, &stream, &exe_sub).await, 2);

    // A fixed payload is other bytes: sent, and sent once.
    let mut fixed = execution(6);
    fixed["status"] = serde_json::json!("FILLED");
    let fixed = serde_json::to_vec(&fixed).unwrap();
    let sent = ops::redrive(&store, &t.js, &letter, Some(fixed.clone()), false)
        .await
        .unwrap();
    assert!(!sent.duplicate && sent.payload_changed);
    let letter = ops::find_dead_letter(&store, &id).await.unwrap();
    let repeat = ops::redrive(&store, &t.js, &letter, Some(fixed), false)
        .await
        .unwrap();
    assert!(repeat.duplicate && repeat.payload_changed);
    assert_eq!(repeat.msg_id, sent.msg_id);
    assert_eq!(stream_count(&t.js, &stream, &exe_sub).await, 3);
    assert_eq!(ops::redrive_count(&letter), 2);
    sink.stop().await;
}
