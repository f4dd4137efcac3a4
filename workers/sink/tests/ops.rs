//! What `mtx signal show` and `mtx dlq list|show|redrive` do, on real servers.

mod common;

use common::*;
use mongodb::bson::doc;
use mtx_schemas::headers;
use mtx_sink::ops::{self, DeadLetterFilter};
use mtx_sink::Store;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_dead_letter_redrive() {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;

    // The whole life of signal 5.
    publish_lives(&t.js, &t.cfg, 5..6).await;
    let sid = signal_id(5);

    // An execution the validator refuses (unknown status) → dlq.sink → dead_letters.
    let mut bad = execution(6);
    bad["status"] = serde_json::json!("MAYBE");
    let exe_sub = t.sub.executions("IBKR_Main").unwrap();
    publish(&t.js, &exe_sub, "exe-6-bad", None, &bad).await;

    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("account_state", doc! {}).await == 1
                && t.count("trading_orders", doc! {"status": "FILLED"}).await == 1
                && t.count("execution_confirmations", doc! {}).await == 1
                && t.count("dead_letters", doc! {}).await == 1
                && t.count("standardized_signals", doc! {"processed_by_cerebro": true})
                    .await
                    == 1
        })
        .await
    );
    let store = Store::connect(&t.cfg.mongo, Duration::from_secs(10))
        .await
        .unwrap();

    // mtx signal show
    let life = ops::signal_lifecycle(&store, &sid).await.unwrap();
    assert_eq!(life.raw.len(), 1);
    assert!(life.standardized.is_some());
    assert_eq!(life.decisions.len(), 1);
    assert_eq!(life.orders.len(), 1);
    assert_eq!(life.events.len(), 2);
    assert_eq!(life.fills.len(), 1);
    assert_eq!(life.accounts.len(), 1);
    let text = life.render();
    for want in [
        "MODIFIED  quantity 17 -> 12",
        "margin: shrunk to fit",
        "margin 1000.00 -> 1450.75",
        "status FILLED  filled 12 @ 150.20",
        "#2 2025-11-20T10:00:02Z  FILLED",
        "FILLED  BUY 12 x AAPL @ 150.20  commission 1.00",
        "SPX_1-D_Opt LONG 12 x AAPL  entry 150.20  mark 150.3333",
    ] {
        assert!(text.contains(want), "missing `{want}` in\n{text}");
    }
    assert!(life.to_json()["orders"][0]["quantity"]["$numberDecimal"] == "12");
    let none = ops::signal_lifecycle(&store, "sig_nope").await.unwrap();
    assert!(none.is_empty());

    // mtx dlq list / show
    let list = ops::list_dead_letters(
        &store,
        &DeadLetterFilter {
            stage: Some("sink".into()),
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(list.len(), 1);
    let id = list[0].get_str("dead_letter_id").unwrap().to_string();
    assert_eq!(list[0].get_str("reason").unwrap(), "validation_failed");
    let shown = ops::find_dead_letter(&store, &id[..12]).await.unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ops::payload_bytes(&shown)).unwrap(),
        bad
    );

    // A letter that carries a reference instead of its payload (the original
    // was too large for the DLQ) is never redriven with the reference.
    let mut slim = shown.clone();
    let mut hs = slim.get_document("headers").cloned().unwrap_or_default();
    hs.insert(mtx_runtime::dlq::DLQ_PAYLOAD_OMITTED, "true");
    slim.insert("headers", hs);
    let refused = ops::redrive(&store, &t.js, &slim, None, false)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("original payload"),
        "{refused}"
    );

    // mtx dlq redrive with a fixed payload: it goes back through its stage.
    let mut fixed = bad.clone();
    fixed["status"] = serde_json::json!("FILLED");
    let r = ops::redrive(
        &store,
        &t.js,
        &shown,
        Some(serde_json::to_vec(&fixed).unwrap()),
        false,
    )
    .await
    .unwrap();
    assert_eq!(r.subject, exe_sub);
    assert!(!r.duplicate && r.payload_changed && r.seq > 0);
    assert!(
        eventually(Duration::from_secs(20), || async {
            t.count("execution_confirmations", doc! {}).await == 2
        })
        .await,
        "the redriven execution was not stored"
    );
    let after = ops::find_dead_letter(&store, &id).await.unwrap();
    assert_eq!(ops::redrive_count(&after), 1);
    let pending = ops::list_dead_letters(
        &store,
        &DeadLetterFilter {
            pending_only: true,
            limit: 10,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(pending.is_empty());
    let st =
        t.js.get_stream(&t.topo.stream_name("EXECUTIONS"))
            .await
            .unwrap();
    let msg = st.get_last_raw_message_by_subject(&exe_sub).await.unwrap();
    assert_eq!(
        msg.headers.get("Mtx-Redrive-Of").map(|v| v.as_str()),
        Some(id.as_str())
    );
    assert!(msg
        .headers
        .get(headers::MSG_ID)
        .unwrap()
        .as_str()
        .starts_with("redrive:"));
    sink.stop().await;
}
