//! Door 3: the read-only bridge tails the collector's `trading_signals` with
//! a change stream (Mongo stand-in), publishes raw signals that the
//! standardizer turns into standardized ones (or dead-letters), survives a
//! restart without skipping or repeating, and never writes the collector's
//! database.

mod common;

use common::*;
use futures::TryStreamExt;
use mongodb::bson::{doc, Document};
use mtx_harness::{unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::headers;
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::strategy::StrategyConfig;
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::Topology;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Running {
    shutdown: CancellationToken,
    waiter: tokio::task::JoinHandle<()>,
}

async fn start(c: &Config) -> Running {
    let shutdown = CancellationToken::new();
    let mut p = Process::start(c.clone(), shutdown.clone()).await.unwrap();
    mtx_standardizer::worker::spawn(&mut p).unwrap();
    mtx_gateway::bridge::spawn(&mut p).await.unwrap();
    let ready = format!("http://{}/readyz", p.ops_addr);
    let waiter = tokio::spawn(p.wait());
    let start = Instant::now();
    loop {
        let ok = reqwest::get(&ready)
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Running { shutdown, waiter }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.waiter.await;
    }
}

fn collector_doc(id: &str, env: &str, quantity: i32) -> Document {
    doc! {
        "timestamp": "2025-11-20T14:30:00Z",
        "signalID": id,
        "signal_sent_EPOCH": 1763649000_i64,
        "strategy_name": "SPX_1-D_Opt",
        "passphrase": SECRET,
        "signal": {"ticker": "AAPL", "action": "BUY", "quantity": quantity, "price": 150.5,
                   "instrument_type": "STOCK", "signal_type": "ENTRY"},
        "environment": env,
        "received_at": mongodb::bson::DateTime::now(),
        "signal_processed": false,
    }
}

async fn all_docs(coll: &mongodb::Collection<Document>) -> Vec<Document> {
    coll.find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

/// A bridge's config, topology, strategy and collector collection.
struct Setup {
    c: Config,
    js: async_nats::jetstream::Context,
    topo: Topology,
    coll: mongodb::Collection<Document>,
}

async fn setup(nats: &NatsServer, mongo: &MongoServer) -> Setup {
    let mut c = config(nats);
    c.mongo.uri = mongo.uri();
    c.mongo.signals_db = unique("sig");
    c.mongo.trading_db = unique("trd");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let topo = Topology::build(&c.topology);
    mtx_subjects::apply::apply(&js, &topo).await.unwrap();
    let kv = js
        .get_key_value(topo.bucket(buckets::STRATEGIES).unwrap())
        .await
        .unwrap();
    kv.put(
        "SPX_1-D_Opt",
        serde_json::to_vec(&StrategyConfig::new("SPX_1-D_Opt"))
            .unwrap()
            .into(),
    )
    .await
    .unwrap();
    let m = mtx_gateway::secrets::mongo_client(&mongo.uri(), Duration::from_secs(10))
        .await
        .unwrap();
    let coll = m
        .database(&c.mongo.signals_db)
        .collection::<Document>("trading_signals");
    Setup { c, js, topo, coll }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_nats_cannot_take_is_dead_lettered_and_the_next_one_goes_through() {
    let nats = NatsServer::start_with("max_payload: 8192", "");
    let mongo = MongoServer::start();
    let Setup { c, js, topo, coll } = setup(&nats, &mongo).await;
    let run = start(&c).await;
    let mut big = collector_doc("BIG", "staging", 10);
    big.insert("note", "x".repeat(20_000));
    let big_id = coll.insert_one(big).await.unwrap().inserted_id;
    coll.insert_one(collector_doc("NORMAL_AFTER", "staging", 10))
        .await
        .unwrap();
    let stream = |base: &'static str| {
        let js = js.clone();
        let name = topo.stream_name(base);
        async move { read(&js, &name).await }
    };
    // The next document is not held up behind the one NATS refuses...
    wait_until(|| async { stream(streams::SIGNALS_STANDARDIZED).await.len() == 1 }).await;
    // ...which is named in a dead letter instead of retried forever.
    let dead = stream(streams::DLQ).await;
    assert_eq!(dead.len(), 1);
    let h = dead[0].headers.as_ref().unwrap();
    assert_eq!(
        h.get(headers::DLQ_REASON).unwrap().as_str(),
        "unpublishable"
    );
    let body: serde_json::Value = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(
        body["_id"].as_str(),
        Some(big_id.as_object_id().unwrap().to_hex().as_str())
    );
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_tails_the_collector_read_only_across_restarts() {
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let Setup {
        mut c,
        js,
        topo,
        coll,
    } = setup(&nats, &mongo).await;
    // A short window, so a repeated publish after the restart would be stored twice.
    c.topology.duplicate_window_secs = 1;
    // Present before the bridge ever ran: not replayed (first start = now).
    coll.insert_one(collector_doc("OLD_1", "staging", 5))
        .await
        .unwrap();

    let run = start(&c).await;
    coll.insert_one(collector_doc("LIVE_1", "staging", 10))
        .await
        .unwrap();
    coll.insert_one(collector_doc("PROD_1", "production", 10))
        .await
        .unwrap();
    coll.insert_one(collector_doc("BAD_1", "staging", 0))
        .await
        .unwrap();
    let stack_like = |base: &'static str| {
        let js = js.clone();
        let name = topo.stream_name(base);
        async move { read(&js, &name).await }
    };
    wait_until(|| async { stack_like(streams::DLQ).await.len() == 1 }).await;
    wait_until(|| async { stack_like(streams::SIGNALS_STANDARDIZED).await.len() == 1 }).await;
    run.stop().await;

    // Inserted while the bridge is down, published once after the restart.
    coll.insert_one(collector_doc("WHILE_DOWN", "staging", 7))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let run = start(&c).await;
    wait_until(|| async { stack_like(streams::SIGNALS_STANDARDIZED).await.len() >= 2 }).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let raw = stack_like(streams::SIGNALS_RAW).await;
    assert_eq!(raw.len(), 3, "LIVE_1, BAD_1, WHILE_DOWN; each exactly once");
    let std: Vec<StandardizedSignal> = stack_like(streams::SIGNALS_STANDARDIZED)
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    let ids: Vec<&str> = std.iter().map(|s| s.sender_signal_id.as_str()).collect();
    assert_eq!(ids, vec!["LIVE_1", "WHILE_DOWN"]);
    assert_eq!(std[0].source, "mathematricks", "same source as the gateway");
    assert_eq!(
        std[0].signal_id,
        mtx_schemas::ids::signal_id("mathematricks", "SPX_1-D_Opt", "LIVE_1")
    );
    assert_eq!(std[0].quantity, "10".parse().unwrap());
    let dlq = stack_like(streams::DLQ).await;
    assert_eq!(
        dlq[0]
            .headers
            .as_ref()
            .and_then(|h| h.get(headers::DLQ_REASON))
            .map(|v| v.as_str()),
        Some("non_positive_quantity")
    );
    for st in &topo.streams {
        for msg in read(&js, &st.config.name).await {
            let body = String::from_utf8_lossy(&msg.payload);
            assert!(!body.contains(SECRET) && !body.contains("passphrase"));
        }
    }

    // The collector's database: same collections, same documents.
    let m = coll.client();
    let names = m
        .database(&c.mongo.signals_db)
        .list_collection_names()
        .await
        .unwrap();
    assert_eq!(names, vec!["trading_signals".to_string()]);
    let docs = all_docs(&coll).await;
    assert_eq!(docs.len(), 5);
    assert!(docs
        .iter()
        .all(|d| matches!(d.get_bool("signal_processed"), Ok(false))));
    let state = m
        .database(&c.mongo.trading_db)
        .collection::<Document>("bridge_state");
    assert_eq!(all_docs(&state).await.len(), 1, "the token lives in our db");
    run.stop().await;
}

async fn read(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> Vec<async_nats::jetstream::Message> {
    mtx_harness::bus::read_all(js, stream, ">").await
}

async fn wait_until<F, Fut>(mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "condition never met"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
