//! What `mtx signal show` and `mtx dlq list|show|redrive` do, on real servers.

mod common;

use common::*;
use mongodb::bson::doc;
use mtx_harness::{MongoServer, NatsServer};
use mtx_schemas::{headers, Environment};
use mtx_sink::ops::{self, DeadLetterFilter};
use mtx_sink::Store;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_and_dead_letter_redrive() {
    let nats = NatsServer::start();
    let mongo_server = MongoServer::start();
    let cfg = config(&nats, &mongo_server);
    let js = js(&nats).await;
    let _topo = apply(&js, &cfg).await;
    migrate(&cfg).await;
    let sink = start_sink(&cfg).await;
    let m = mongo(&cfg).await;
    let tdb = cfg.mongo.trading_db.clone();
    let sub = subjects(&cfg);
    let env = Environment::Staging;

    let sid = signal_id(5);
    publish(
        &js,
        &sub.signals_raw(env, "mathematricks").unwrap(),
        "raw-5",
        Some(&sid),
        &raw_signal(5),
    )
    .await;
    publish(
        &js,
        &sub.signals_standardized(env, "SPX_1-D_Opt").unwrap(),
        "std-5",
        Some(&sid),
        &standardized(5),
    )
    .await;
    publish(
        &js,
        &sub.cerebro_decisions(env, "SPX_1-D_Opt").unwrap(),
        "dec-5",
        Some(&sid),
        &decision(5),
    )
    .await;
    publish(
        &js,
        &sub.orders_new("IBKR_Main").unwrap(),
        "ord-5",
        Some(&sid),
        &order(5),
    )
    .await;
    let ev = sub.orders_events("IBKR_Main").unwrap();
    publish(
        &js,
        &ev,
        "ev-5-1",
        None,
        &order_event(5, 1, "SUBMITTED", "0"),
    )
    .await;
    publish(&js, &ev, "ev-5-2", None, &order_event(5, 2, "FILLED", "12")).await;
    publish(
        &js,
        &sub.executions("IBKR_Main").unwrap(),
        "exe-5",
        None,
        &execution(5),
    )
    .await;
    publish(
        &js,
        &sub.account_state("IBKR_Main").unwrap(),
        "acct-5",
        None,
        &account_state(5),
    )
    .await;

    // An execution the validator refuses (unknown status) → dlq.sink → dead_letters.
    let mut bad = execution(6);
    bad["status"] = serde_json::json!("MAYBE");
    let exe_sub = sub.executions("IBKR_Main").unwrap();
    publish(&js, &exe_sub, "exe-6-bad", None, &bad).await;

    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&m, &tdb, "account_state", doc! {}).await == 1
                && count(&m, &tdb, "trading_orders", doc! {"status": "FILLED"}).await == 1
                && count(&m, &tdb, "execution_confirmations", doc! {}).await == 1
                && count(&m, &tdb, "dead_letters", doc! {}).await == 1
                && count(
                    &m,
                    &tdb,
                    "standardized_signals",
                    doc! {"processed_by_cerebro": true},
                )
                .await
                    == 1
        })
        .await
    );
    let store = Store::connect(&cfg.mongo, Duration::from_secs(10))
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

    // mtx dlq redrive with a fixed payload: it goes back through its stage.
    let mut fixed = bad.clone();
    fixed["status"] = serde_json::json!("FILLED");
    let r = ops::redrive(
        &store,
        &js,
        &shown,
        Some(serde_json::to_vec(&fixed).unwrap()),
    )
    .await
    .unwrap();
    assert_eq!(r.subject, exe_sub);
    assert!(!r.duplicate && r.payload_changed && r.seq > 0);
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&m, &tdb, "execution_confirmations", doc! {}).await == 2
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
    let st = js
        .get_stream(&_topo.stream_name("EXECUTIONS"))
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
