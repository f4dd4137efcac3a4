//! Messages of every stage published to NATS end up as exactly the expected
//! documents, field by field with the seed's BSON types; lifecycle flags and
//! order status follow; the validator's rejections go to `dlq.sink`.

mod common;

use common::*;
use mongodb::bson::{doc, Bson, Document};
use mtx_harness::MongoServer;
use mtx_schemas::{headers, Environment};
use mtx_subjects::topology::streams;
use serde_json::json;
use std::time::Duration;

fn dec(d: &Document, path: &str, want: &str) {
    let v = get(d, path);
    match v {
        Some(Bson::Decimal128(x)) => assert_eq!(x.to_string(), want, "{path}"),
        other => panic!("{path}: expected Decimal128 {want}, got {other:?}"),
    }
}

fn date(d: &Document, path: &str, want: &str) {
    match get(d, path) {
        Some(Bson::DateTime(t)) => assert_eq!(
            t.timestamp_millis(),
            mongodb::bson::DateTime::parse_rfc3339_str(want)
                .unwrap()
                .timestamp_millis(),
            "{path}: {t} != {want}"
        ),
        other => panic!("{path}: expected a BSON date {want}, got {other:?}"),
    }
}

fn is_date(d: &Document, path: &str) {
    assert!(
        matches!(get(d, path), Some(Bson::DateTime(_))),
        "{path}: {:?}",
        get(d, path)
    );
}

fn dbl(d: &Document, path: &str, want: f64) {
    match get(d, path) {
        Some(Bson::Double(x)) => assert!((x - want).abs() < 1e-12, "{path}: {x} != {want}"),
        other => panic!("{path}: expected a double {want}, got {other:?}"),
    }
}

fn s(d: &Document, path: &str, want: &str) {
    match get(d, path) {
        Some(Bson::String(x)) => assert_eq!(x, want, "{path}"),
        other => panic!("{path}: expected string {want}, got {other:?}"),
    }
}

fn get<'a>(d: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut cur = d;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        let v = cur.get(p)?;
        if i == parts.len() - 1 {
            return Some(v);
        }
        cur = match v {
            Bson::Document(d) => d,
            Bson::Array(a) => a.first()?.as_document()?,
            _ => return None,
        };
    }
    None
}

fn only(mut v: Vec<Document>, what: &str) -> Document {
    assert_eq!(v.len(), 1, "{what}: {v:#?}");
    v.remove(0)
}

/// The headers a stage's runtime puts on a message it dead-letters (but
/// the time).
fn dead_letter_headers(
    msg_id: &str,
    stage: &str,
    reason: &str,
    original_subject: &str,
    original_seq: u64,
) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id);
    h.insert(headers::DLQ_STAGE, stage);
    h.insert(headers::DLQ_REASON, reason);
    h.insert(headers::ORIGINAL_SUBJECT, original_subject);
    h.insert(headers::ORIGINAL_SEQ, original_seq.to_string().as_str());
    h
}

/// Every sink consumer has nothing pending and nothing unacked (within 10 s).
async fn assert_sink_drained(t: &Setup) {
    for c in t.topo.pool_consumers("sink") {
        let st = t.js.get_stream(&c.stream).await.unwrap();
        let ok = eventually(Duration::from_secs(10), || {
            let st = st.clone();
            let d = c.durable().to_string();
            async move {
                let i = st.consumer_info(&d).await.unwrap();
                i.num_ack_pending == 0 && i.num_pending == 0
            }
        })
        .await;
        assert!(ok, "{} not drained", c.durable());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stage_lands_with_seed_fields_and_types() {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;
    let env = Environment::Staging;

    // Out of order on purpose: events before their order, the decision
    // before its signal, the signal before its raw message.
    let ev_sub = t.sub.orders_events("IBKR_Main").unwrap();
    publish(
        &t.js,
        &ev_sub,
        "ev-2",
        None,
        &order_event(1, 2, "PARTIALLY_FILLED", "5"),
    )
    .await;
    publish(
        &t.js,
        &ev_sub,
        "ev-3",
        None,
        &order_event(1, 3, "FILLED", "12"),
    )
    .await;
    publish(
        &t.js,
        &ev_sub,
        "ev-1",
        None,
        &order_event(1, 1, "SUBMITTED", "0"),
    )
    .await;
    publish(
        &t.js,
        &t.sub.orders_new("IBKR_Main").unwrap(),
        "ord-1",
        None,
        &order(1),
    )
    .await;
    publish(
        &t.js,
        &t.sub.orders_cancel("IBKR_Main").unwrap(),
        "cxl-1",
        None,
        &json!({"order_id": order_id(1), "account": "IBKR_Main", "reason": "operator", "timestamp": "2025-11-20T10:00:05Z"}),
    )
    .await;
    publish(
        &t.js,
        &t.sub.cerebro_decisions(env, "SPX_1-D_Opt").unwrap(),
        "dec-1",
        None,
        &decision(1),
    )
    .await;
    publish(
        &t.js,
        &t.sub.signals_standardized(env, "SPX_1-D_Opt").unwrap(),
        "std-1",
        Some(&signal_id(1)),
        &standardized(1),
    )
    .await;
    let raw_sub = t.sub.signals_raw(env, "mathematricks").unwrap();
    publish(
        &t.js,
        &raw_sub,
        "raw-1",
        Some(&signal_id(1)),
        &raw_signal(1),
    )
    .await;
    publish(
        &t.js,
        &t.sub.executions("IBKR_Main").unwrap(),
        "exe-1",
        None,
        &execution(1),
    )
    .await;
    publish(
        &t.js,
        &t.sub.account_state("IBKR_Main").unwrap(),
        "acct-1",
        None,
        &account_state(1),
    )
    .await;
    publish(
        &t.js,
        &t.sub.audit("cerebro").unwrap(),
        "aud-1",
        Some(&signal_id(1)),
        &json!({"action": "KILL_SWITCH_ON", "signal_id": signal_id(1), "timestamp": "2025-11-20T10:00:06Z"}),
    )
    .await;
    // Raw signal 2 is dead-lettered by the standardizer: its raw document
    // gets the error recorded (whichever of the two the sink stores first).
    let raw2 = serde_json::to_vec(&raw_signal(2)).unwrap();
    let mut h = dead_letter_headers("dlq:RAW:2", "standardizer", "unknown_strategy", &raw_sub, 2);
    h.insert(
        headers::DLQ_DETAIL,
        "strategy SPX_1-D_Opt is not configured",
    );
    h.insert(headers::DELIVERIES, "1");
    h.insert(headers::SIGNAL_ID, signal_id(2).as_str());
    // When the standardizer's runtime dead-lettered it (not when the sink
    // got to store it).
    h.insert(mtx_runtime::dlq::DLQ_TIME, "2025-11-20T10:00:07.250Z");
    publish_with(&t.js, t.sub.dlq("standardizer").unwrap(), h, raw2).await;
    let sid2 = signal_id(2);
    publish(&t.js, &raw_sub, "raw-2", Some(&sid2), &raw_signal(2)).await;
    // A late redelivered event (seq 1) after FILLED changes nothing.
    publish(
        &t.js,
        &ev_sub,
        "ev-1-again",
        None,
        &order_event(1, 1, "SUBMITTED", "0"),
    )
    .await;

    let want = [
        ("raw_signals", 2u64),
        ("standardized_signals", 1),
        ("cerebro_decisions", 1),
        ("trading_orders", 1),
        ("order_events", 3),
        ("order_cancels", 1),
        ("execution_confirmations", 1),
        ("account_state", 1),
        ("dead_letters", 1),
    ];
    let ok = eventually(Duration::from_secs(30), || async {
        for (c, n) in want {
            if t.count(c, doc! {}).await != n {
                return false;
            }
        }
        t.count("raw_signals", doc! {"processed": true}).await == 1
            && t.count("standardized_signals", doc! {"processed_by_cerebro": true})
                .await
                == 1
            && t.count("trading_orders", doc! {"status": "FILLED"}).await == 1
            && t.count("raw_signals", doc! {"error.reason": "unknown_strategy"})
                .await
                == 1
            && count(&t.m, &t.cfg.mongo.bot_core_db, "audit_logs", doc! {}).await == 1
    })
    .await;
    let mut seen = Vec::new();
    for (c, _) in want {
        seen.push((c, t.count(c, doc! {}).await));
    }
    assert!(ok, "counts: {seen:?}");

    // raw_signals
    let raw = only(
        t.find("raw_signals", doc! {"signal_id": signal_id(1)})
            .await,
        "raw",
    );
    let keys: Vec<&str> = raw.keys().map(String::as_str).collect();
    assert_eq!(
        &keys[..6],
        [
            "_id",
            "timestamp",
            "source",
            "raw_data",
            "processed",
            "created_at"
        ]
    );
    assert!(matches!(raw.get("_id"), Some(Bson::ObjectId(_))));
    date(&raw, "timestamp", "2025-11-20T10:00:01.001Z");
    s(&raw, "source", "mathematricks");
    s(&raw, "raw_data.signalID", "SIG_1");
    assert!(raw.get_bool("processed").unwrap());
    is_date(&raw, "created_at");
    is_date(&raw, "processed_at");
    s(&raw, "environment", "staging");
    s(&raw, "format", "MATHEMATRICKS");
    let raw2 = only(
        t.find("raw_signals", doc! {"signal_id": signal_id(2)})
            .await,
        "raw2",
    );
    assert!(!raw2.get_bool("processed").unwrap());
    s(&raw2, "error.stage", "standardizer");
    s(
        &raw2,
        "error.detail",
        "strategy SPX_1-D_Opt is not configured",
    );
    date(&raw2, "error.at", "2025-11-20T10:00:07.250Z");

    // standardized_signals
    let st = only(t.find("standardized_signals", doc! {}).await, "std");
    s(&st, "signal_id", &signal_id(1));
    s(&st, "strategy_id", "SPX_1-D_Opt");
    date(&st, "timestamp", "2025-11-20T10:00:00Z");
    s(&st, "instrument", "AAPL");
    s(&st, "direction", "LONG");
    s(&st, "action", "ENTRY");
    s(&st, "order_type", "LIMIT");
    dec(&st, "price", "150.25");
    dec(&st, "quantity", "10");
    dec(&st, "stop_loss", "140.10");
    assert_eq!(st.get("take_profit"), Some(&Bson::Null));
    assert_eq!(st.get("expiry"), Some(&Bson::Null));
    dbl(&st, "metadata.expected_alpha", 0.02);
    assert!(st.get_bool("processed_by_cerebro").unwrap());
    is_date(&st, "created_at");
    dec(&st, "legs.quantity", "10");
    dec(&st, "legs.price", "150.25");
    dec(&st, "account_equity", "500000");
    date(&st, "received_at", "2025-11-20T10:00:00.250Z");

    // cerebro_decisions
    let d = only(t.find("cerebro_decisions", doc! {}).await, "decision");
    s(&d, "signal_id", &signal_id(1));
    s(&d, "decision", "MODIFIED");
    date(&d, "timestamp", "2025-11-20T10:00:01Z");
    s(&d, "reason", "margin: shrunk to fit");
    dec(&d, "original_quantity", "17");
    dec(&d, "final_quantity", "12");
    dec(&d, "risk_assessment.portfolio_margin_before", "1000.00");
    dec(&d, "risk_assessment.portfolio_margin_after", "1450.75");
    dbl(&d, "risk_assessment.margin_utilization_pct", 0.1451);
    dbl(&d, "risk_assessment.cvar_contribution", 12.5);
    dbl(&d, "risk_assessment.correlation_impact.with_portfolio", 0.3);
    dec(&d, "risk_assessment.allocated_capital", "893600.00");
    dbl(&d, "risk_assessment.allocation_pct", 89.36);
    dec(&d, "legs.margin_required", "450.75");
    is_date(&d, "created_at");

    // trading_orders: FILLED from the events although the order (PENDING)
    // and a stale SUBMITTED arrived after it.
    let o = only(t.find("trading_orders", doc! {}).await, "order");
    for k in [
        "order_id",
        "signal_id",
        "strategy_id",
        "account",
        "timestamp",
        "instrument",
        "direction",
        "action",
        "order_type",
        "price",
        "quantity",
        "stop_loss",
        "take_profit",
        "expiry",
        "cerebro_decision",
        "status",
        "created_at",
    ] {
        assert!(o.contains_key(k), "trading_orders.{k} missing");
    }
    s(&o, "order_id", &order_id(1));
    s(&o, "account", "IBKR_Main");
    dec(&o, "price", "150.25");
    dec(&o, "quantity", "12");
    dec(&o, "cerebro_decision.allocated_capital", "893600.00");
    dec(&o, "cerebro_decision.margin_required", "450.75");
    s(&o, "cerebro_decision.position_size_logic", "ratio 1.7872");
    s(&o, "status", "FILLED");
    dec(&o, "filled_quantity", "12");
    dec(&o, "avg_fill_price", "150.20");
    assert_eq!(o.get_i64("status_seq").unwrap(), 3);
    date(&o, "timestamp", "2025-11-20T10:00:01Z");

    // execution_confirmations
    let e = only(
        t.find("execution_confirmations", doc! {}).await,
        "execution",
    );
    s(
        &e,
        "execution_id",
        &mtx_schemas::ids::execution_id(&order_id(1), 1),
    );
    s(&e, "side", "BUY");
    dec(&e, "quantity", "12");
    dec(&e, "price", "150.20");
    dec(&e, "commission", "1.00");
    s(&e, "status", "FILLED");
    s(&e, "broker_response.venue", "paper");
    date(&e, "timestamp", "2025-11-20T10:00:02Z");
    is_date(&e, "created_at");

    // account_state
    let a = only(t.find("account_state", doc! {}).await, "account");
    for (k, v) in [
        ("equity", "1000000.60"),
        ("cash_balance", "999999.00"),
        ("margin_used", "450.60"),
        ("margin_available", "999550.00"),
        ("unrealized_pnl", "1.60"),
        ("realized_pnl", "0"),
    ] {
        dec(&a, k, v);
    }
    dec(&a, "open_positions.entry_price", "150.20");
    dec(&a, "open_positions.current_price", "150.3333");
    dec(&a, "open_positions.margin_required", "450.60");
    dec(&a, "deployed_capital.SPX_1-D_Opt", "450.60");
    assert!(a.get_array("open_orders").unwrap().is_empty());
    date(&a, "timestamp", "2025-11-20T10:00:01Z");

    // order_events, order_cancels, dead_letters, audit_logs
    let evs = t.find("order_events", doc! {"seq": 3_i64}).await;
    let ev = only(evs, "event 3");
    dec(&ev, "filled_quantity", "12");
    s(&ev, "status", "FILLED");
    let cx = only(t.find("order_cancels", doc! {}).await, "cancel");
    s(&cx, "reason", "operator");
    date(&cx, "timestamp", "2025-11-20T10:00:05Z");
    let dl = only(t.find("dead_letters", doc! {}).await, "dead letter");
    s(&dl, "stage", "standardizer");
    s(&dl, "reason", "unknown_strategy");
    s(&dl, "original_subject", &raw_sub);
    s(&dl, "original_stream", streams::SIGNALS_RAW);
    assert_eq!(dl.get_i64("original_seq").unwrap(), 2);
    s(&dl, "signal_id", &signal_id(2));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(dl.get_str("payload").unwrap()).unwrap(),
        raw_signal(2)
    );
    date(&dl, "time", "2025-11-20T10:00:07.250Z");
    let au = only(
        find(&t.m, &t.cfg.mongo.bot_core_db, "audit_logs", doc! {}).await,
        "audit",
    );
    s(&au, "action", "KILL_SWITCH_ON");
    s(&au, "resource", "cerebro");
    s(&au, "resource_id", &signal_id(1));
    s(&au, "status", "SUCCESS");
    date(&au, "timestamp", "2025-11-20T10:00:06Z");

    // Everything acked: nothing pending on any sink consumer.
    assert_sink_drained(&t).await;
    assert_eq!(
        stream_count(
            &t.js,
            &t.topo.stream_name(streams::DLQ),
            &t.sub.dlq("sink").unwrap()
        )
        .await,
        0
    );
    let text = mtx_runtime::metrics::render(&sink.registry);
    assert!(text.contains("mtx_mongo_up 1"), "{text}");
    // Every bulk write is timed and sized; documents counted by result.
    for want in [
        "mtx_mongo_write_duration_seconds_count{collection=\"standardized_signals\"}",
        "mtx_mongo_batch_size_count ",
        "mtx_mongo_documents_total{collection=\"standardized_signals\",result=\"ok\"}",
        "mtx_sink_batch_duration_seconds_count{stream=",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    sink.assert_ready();
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validator_rejection_goes_to_dlq_sink_not_into_retries() {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;

    let mut bad = execution(7);
    bad["status"] = json!("MAYBE");
    let exe = t.sub.executions("IBKR_Main").unwrap();
    publish(&t.js, &exe, "bad-exe", None, &bad).await;
    publish(&t.js, &exe, "good-exe", None, &execution(8)).await;
    let mut not_json = async_nats::HeaderMap::new();
    not_json.insert(headers::MSG_ID, "not-json");
    publish_with(&t.js, exe.clone(), not_json, "{oops").await;

    let dlq_stream = t.topo.stream_name(streams::DLQ);
    let dlq_sink = t.sub.dlq("sink").unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            stream_count(&t.js, &dlq_stream, &dlq_sink).await == 2
                && t.count("dead_letters", doc! {"stage": "sink"}).await == 2
                && t.count("execution_confirmations", doc! {}).await == 1
        })
        .await,
        "dlq {} dead_letters {} executions {}",
        stream_count(&t.js, &dlq_stream, &dlq_sink).await,
        t.count("dead_letters", doc! {}).await,
        t.count("execution_confirmations", doc! {}).await,
    );
    let msgs = read_all(&t.js, &dlq_stream, &dlq_sink).await;
    let by_reason = |r: &str| {
        msgs.iter()
            .find(|x| {
                x.headers
                    .as_ref()
                    .unwrap()
                    .get(headers::DLQ_REASON)
                    .unwrap()
                    .as_str()
                    == r
            })
            .unwrap_or_else(|| panic!("no {r} dead letter"))
    };
    let v = by_reason("validation_failed");
    let detail = v
        .headers
        .as_ref()
        .unwrap()
        .get(headers::DLQ_DETAIL)
        .unwrap()
        .as_str();
    assert!(detail.contains("Document failed validation"), "{detail}");
    assert!(
        detail.contains("status"),
        "the server's error names the field: {detail}"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&v.payload).unwrap(),
        bad
    );
    by_reason("invalid_payload");
    let stored = only(
        t.find("dead_letters", doc! {"reason": "validation_failed"})
            .await,
        "validation dead letter",
    );
    s(&stored, "stage", "sink");
    s(&stored, "original_subject", &exe);
    // The runtime stamped when it dead-lettered the message; the sink keeps it.
    let stamped = v
        .headers
        .as_ref()
        .unwrap()
        .get(mtx_runtime::dlq::DLQ_TIME)
        .expect("Mtx-Dlq-Time set by the runtime")
        .as_str()
        .to_string();
    date(&stored, "time", &stamped);
    assert!(stored
        .get_str("detail")
        .unwrap()
        .contains("Document failed validation"));
    // Each bad message was tried once, not retried until max_deliver.
    let text = mtx_runtime::metrics::render(&sink.registry);
    assert!(
        text.contains("mtx_mongo_documents_total{collection=\"execution_confirmations\",result=\"rejected\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("mtx_redeliveries_total{stage=\"sink\"} 0"),
        "{text}"
    );
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmigrated_database_is_never_written() {
    let t = Setup::on(MongoServer::start(), |_| {}).await;
    let sink = start_sink(&t.cfg).await;
    publish(
        &t.js,
        &t.sub.executions("IBKR_Main").unwrap(),
        "exe-1",
        None,
        &execution(1),
    )
    .await;
    // Without its unique indexes a redelivery could store a second copy:
    // the sink waits, not ready, and writes nothing.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(t.count("execution_confirmations", doc! {}).await, 0);
    let not = sink.health.readiness().unwrap_err();
    assert!(not.iter().any(|f| f.contains("schema")), "{not:?}");
    migrate(&t.cfg).await;
    // The message comes back on its next delivery. (With the topology's
    // consumer backoff, nats-server adds backoff[n-1] - ack_wait to the NAK
    // delay of the n-th delivery: ~34 s here, not the 4 s asked for.)
    assert!(
        eventually(Duration::from_secs(50), || async {
            t.count("execution_confirmations", doc! {}).await == 1
        })
        .await
    );
    sink.assert_ready();
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_time_without_the_runtime_header_is_the_stream_timestamp() {
    let t = Setup::migrated().await;
    // A dead letter from a producer that sets no Mtx-Dlq-Time (an older
    // runtime, a tool).
    let raw_sub = t
        .sub
        .signals_raw(Environment::Staging, "mathematricks")
        .unwrap();
    let h = dead_letter_headers("old-dlq-1", "standardizer", "unknown_strategy", &raw_sub, 9);
    let body = serde_json::to_vec(&raw_signal(9)).unwrap();
    publish_with(&t.js, t.sub.dlq("standardizer").unwrap(), h, body).await;
    let stored = read_all(&t.js, &t.topo.stream_name(streams::DLQ), ">").await;
    let stored_at =
        mtx_runtime::consume::published_at(stored[0].reply.as_deref().unwrap()).unwrap();
    let sink = start_sink(&t.cfg).await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("dead_letters", doc! {}).await == 1
        })
        .await
    );
    let dl = only(t.find("dead_letters", doc! {}).await, "dead letter");
    assert_eq!(
        dl.get_datetime("time").unwrap().timestamp_millis(),
        stored_at.timestamp_millis(),
        "the DLQ stream's timestamp of the message"
    );
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processed_flags_whichever_way_the_flag_update_is_sent() {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;
    let env = Environment::Staging;
    let raw_sub = t.sub.signals_raw(env, "mathematricks").unwrap();
    let std_sub = t.sub.signals_standardized(env, "SPX_1-D_Opt").unwrap();
    let stored = |coll: &'static str, n: u64| {
        let t = &t;
        async move {
            assert!(
                eventually(Duration::from_secs(30), || async {
                    t.count(coll, doc! {}).await == n
                })
                .await,
                "{coll}: {} of {n}",
                t.count(coll, doc! {}).await
            );
        }
    };
    // Two rounds, each: standardized signals one batch each, then raw
    // signals all together.
    // 1. Standardized signals 0..8 ahead of their raw signals: their raw
    //    flag updates find nothing, so later ones look first. Raw signals
    //    8..16 ahead of their standardized signals: looked up and flagged by
    //    _id, then (once updates find something again) blind.
    // 2. Standardized signals 8..16, then the raw signals of 0..8 last: they
    //    find their standardized signals.
    for (standardized_now, raw_now, raw_total) in [(0..8, 8..16, 8), (8..16, 0..8, 16)] {
        for i in standardized_now {
            publish_standardized(&t.js, &std_sub, i).await;
            stored("standardized_signals", i as u64 + 1).await;
        }
        for i in raw_now {
            publish_raw(&t.js, &raw_sub, i).await;
        }
        stored("raw_signals", raw_total).await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("raw_signals", doc! {"processed": true}).await == 16
        })
        .await,
        "processed: {} of 16",
        t.count("raw_signals", doc! {"processed": true}).await
    );
    for raw in t.find("raw_signals", doc! {}).await {
        is_date(&raw, "processed_at");
    }
    // The same both ways for standardized_signals.processed_by_cerebro:
    // decisions 16..24 ahead of their standardized signals (one batch
    // each, so later decisions look first), decisions 24..32 after theirs
    // (looked up and flagged by _id, then blind), decisions 0..16 last.
    let dec_sub = t.sub.cerebro_decisions(env, "SPX_1-D_Opt").unwrap();
    let mut decided = 0;
    for i in (16..24).chain(24..32).chain(0..16) {
        if i == 24 {
            for j in 16..32 {
                publish_standardized(&t.js, &std_sub, j).await;
            }
            stored("standardized_signals", 32).await;
        }
        publish(&t.js, &dec_sub, &format!("dec-{i}"), None, &decision(i)).await;
        decided += 1;
        stored("cerebro_decisions", decided).await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("standardized_signals", doc! {"processed_by_cerebro": true})
                .await
                == 32
        })
        .await,
        "processed_by_cerebro: {} of 32",
        t.count("standardized_signals", doc! {"processed_by_cerebro": true})
            .await
    );
    for s in t.find("standardized_signals", doc! {}).await {
        is_date(&s, "processed_by_cerebro_at");
    }
    sink.assert_ready();
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_events_array_is_one_document_per_event() {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;
    let ev_sub = t.sub.orders_events("IBKR_Main").unwrap();
    let oid = order_id(5);
    // What the execution stage publishes for a market order's one step:
    // SUBMITTED, ACCEPTED and FILLED of one order as one message.
    let events = json!([
        order_event(5, 1, "SUBMITTED", "0"),
        order_event(5, 2, "ACCEPTED", "0"),
        order_event(5, 3, "FILLED", "12"),
    ]);
    let msg_id = format!("{oid}.1-3");
    publish(&t.js, &ev_sub, &msg_id, None, &events).await;
    publish(
        &t.js,
        &t.sub.orders_new("IBKR_Main").unwrap(),
        "ord-5",
        None,
        &order(5),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("order_events", doc! {"order_id": &oid}).await == 3
                && t.count(
                    "trading_orders",
                    doc! {"order_id": &oid, "status": "FILLED"},
                )
                .await
                    == 1
        })
        .await,
        "order_events {} trading_orders {:?}",
        t.count("order_events", doc! {}).await,
        t.find("trading_orders", doc! {}).await
    );
    let mut evs = t.find("order_events", doc! {"order_id": &oid}).await;
    evs.sort_by_key(|e| e.get_i64("seq").unwrap_or(-1));
    let seqs: Vec<i64> = evs.iter().map(|e| e.get_i64("seq").unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    for (e, status) in evs.iter().zip(["SUBMITTED", "ACCEPTED", "FILLED"]) {
        s(e, "status", status);
        s(e, "account", "IBKR_Main");
        s(e, "ingest.msg_id", &msg_id);
        s(e, "ingest.subject", &ev_sub);
        is_date(e, "timestamp");
        is_date(e, "created_at");
    }
    dec(&evs[2], "filled_quantity", "12");
    dec(&evs[2], "avg_fill_price", "150.20");
    let o = only(t.find("trading_orders", doc! {}).await, "order");
    s(&o, "status", "FILLED");
    assert_eq!(o.get_i64("status_seq").unwrap(), 3);
    dec(&o, "filled_quantity", "12");

    // The same message again under another msg id (JetStream stores it):
    // three duplicates, nothing new.
    publish(&t.js, &ev_sub, &format!("{msg_id}-again"), None, &events).await;
    let events_stream = t.topo.stream_name(streams::ORDER_EVENTS);
    assert_eq!(stream_count(&t.js, &events_stream, &ev_sub).await, 2);
    let duplicates =
        "mtx_mongo_documents_total{collection=\"order_events\",result=\"duplicate\"} 3";
    assert!(
        eventually(Duration::from_secs(30), || async {
            mtx_runtime::metrics::render(&sink.registry).contains(duplicates)
        })
        .await,
        "{}",
        mtx_runtime::metrics::render(&sink.registry)
    );
    assert_eq!(t.count("order_events", doc! {}).await, 3);
    assert_eq!(t.count("trading_orders", doc! {}).await, 1);
    assert_eq!(
        t.count(
            "trading_orders",
            doc! {"status": "FILLED", "status_seq": 3_i64}
        )
        .await,
        1
    );

    // Events of two orders in one message: dead-lettered whole, nothing of
    // it written.
    let mixed = json!([
        order_event(6, 1, "SUBMITTED", "0"),
        order_event(7, 2, "ACCEPTED", "0"),
    ]);
    publish(&t.js, &ev_sub, "mixed-6-7", None, &mixed).await;
    let dlq_stream = t.topo.stream_name(streams::DLQ);
    let dlq_sink = t.sub.dlq("sink").unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            t.count("dead_letters", doc! {"stage": "sink"}).await == 1
        })
        .await,
        "dead letters {:?}",
        t.find("dead_letters", doc! {}).await
    );
    let dl = only(
        t.find("dead_letters", doc! {"stage": "sink"}).await,
        "dead letter",
    );
    s(&dl, "reason", "invalid_payload");
    s(&dl, "original_subject", &ev_sub);
    s(&dl, "original_stream", streams::ORDER_EVENTS);
    assert!(
        dl.get_str("detail").unwrap().contains("two orders"),
        "{dl:?}"
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(dl.get_str("payload").unwrap()).unwrap(),
        mixed
    );
    assert_eq!(stream_count(&t.js, &dlq_stream, &dlq_sink).await, 1);
    assert_eq!(
        t.count(
            "order_events",
            doc! {"order_id": {"$in": [order_id(6), order_id(7)]}}
        )
        .await,
        0
    );
    assert_eq!(t.count("order_events", doc! {}).await, 3);

    // Every message acked (the array once, its copy as duplicates, the
    // mixed one dead-lettered), none retried.
    assert_sink_drained(&t).await;
    let text = mtx_runtime::metrics::render(&sink.registry);
    for want in [
        "mtx_mongo_documents_total{collection=\"order_events\",result=\"ok\"} 3",
        duplicates,
        "mtx_redeliveries_total{stage=\"sink\"} 0",
    ] {
        assert!(text.contains(want), "{want} missing:\n{text}");
    }
    sink.assert_ready();
    sink.stop().await;
}
