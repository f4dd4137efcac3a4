//! Exactly once in effect under faults: replay from sequence 1 with two sink
//! replicas, a sink killed mid-batch, and MongoDB stopped for 20 s mid-run.

mod common;

use common::*;
use mongodb::bson::{doc, Document};
use mtx_harness::{MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_schemas::Environment;
use mtx_subjects::topology::streams;
use mtx_subjects::Topology;
use std::time::{Duration, Instant};

const COLLS: &[&str] = &[
    "raw_signals",
    "standardized_signals",
    "cerebro_decisions",
    "trading_orders",
    "order_events",
    "execution_confirmations",
    "account_state",
];

async fn counts(m: &mongodb::Client, cfg: &Config) -> Vec<(&'static str, u64)> {
    let mut out = Vec::new();
    for c in COLLS {
        out.push((*c, count(m, &cfg.mongo.trading_db, c, doc! {}).await));
    }
    out
}

async fn drained(js: &async_nats::jetstream::Context, topo: &Topology) -> bool {
    for c in topo.pool_consumers("sink") {
        let Ok(st) = js.get_stream(&c.stream).await else {
            return false;
        };
        match st.consumer_info(c.durable()).await {
            Ok(i) if i.num_ack_pending == 0 && i.num_pending == 0 => {}
            _ => return false,
        }
    }
    true
}

/// Publish the whole life of signals `range` (raw, standardized, decision,
/// order, two events, execution, account snapshot).
async fn publish_lives(
    js: &async_nats::jetstream::Context,
    cfg: &Config,
    range: std::ops::Range<usize>,
) {
    let sub = subjects(cfg);
    let env = Environment::Staging;
    for i in range {
        let sid = signal_id(i);
        publish(
            js,
            &sub.signals_raw(env, "mathematricks").unwrap(),
            &format!("raw-{i}"),
            Some(&sid),
            &raw_signal(i),
        )
        .await;
        publish(
            js,
            &sub.signals_standardized(env, "SPX_1-D_Opt").unwrap(),
            &format!("std-{i}"),
            Some(&sid),
            &standardized(i),
        )
        .await;
        publish(
            js,
            &sub.cerebro_decisions(env, "SPX_1-D_Opt").unwrap(),
            &format!("dec-{i}"),
            Some(&sid),
            &decision(i),
        )
        .await;
        publish(
            js,
            &sub.orders_new("IBKR_Main").unwrap(),
            &format!("ord-{i}"),
            Some(&sid),
            &order(i),
        )
        .await;
        let ev = sub.orders_events("IBKR_Main").unwrap();
        publish(
            js,
            &ev,
            &format!("ev1-{i}"),
            None,
            &order_event(i, 1, "SUBMITTED", "0"),
        )
        .await;
        publish(
            js,
            &ev,
            &format!("ev2-{i}"),
            None,
            &order_event(i, 2, "FILLED", "12"),
        )
        .await;
        publish(
            js,
            &sub.executions("IBKR_Main").unwrap(),
            &format!("exe-{i}"),
            None,
            &execution(i),
        )
        .await;
        publish(
            js,
            &sub.account_state("IBKR_Main").unwrap(),
            &format!("acct-{i}"),
            None,
            &account_state(i),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_sequence_one_with_two_replicas_changes_no_count() {
    let nats = NatsServer::start();
    let mongo_server = MongoServer::start();
    let cfg = config(&nats, &mongo_server);
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    migrate(&cfg).await;
    let m = mongo(&cfg).await;
    let n = 120;
    publish_lives(&js, &cfg, 0..n).await;
    let sink = start_sink(&cfg).await;
    let want: Vec<(&str, u64)> = COLLS
        .iter()
        .map(|c| {
            (
                *c,
                if *c == "order_events" {
                    2 * n as u64
                } else {
                    n as u64
                },
            )
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(40), || async {
            counts(&m, &cfg).await == want && drained(&js, &topo).await
        })
        .await,
        "first pass: {:?}",
        counts(&m, &cfg).await
    );
    sink.stop().await;
    let filled = count(
        &m,
        &cfg.mongo.trading_db,
        "trading_orders",
        doc! {"status": "FILLED"},
    )
    .await;
    assert_eq!(filled, n as u64);

    // Replay every stream from sequence 1: delete and recreate the sink's
    // durable consumers, then run two sink replicas side by side.
    for c in topo.pool_consumers("sink") {
        js.get_stream(&c.stream)
            .await
            .unwrap()
            .delete_consumer(c.durable())
            .await
            .unwrap();
    }
    apply(&js, &cfg).await;
    let a = start_sink(&cfg).await;
    let b = start_sink(&cfg).await;
    assert!(
        eventually(Duration::from_secs(40), || drained(&js, &topo)).await,
        "replay did not drain"
    );
    assert_eq!(counts(&m, &cfg).await, want, "replay changed counts");
    assert_eq!(
        count(
            &m,
            &cfg.mongo.trading_db,
            "trading_orders",
            doc! {"status": "FILLED"}
        )
        .await,
        n as u64
    );
    assert_eq!(
        count(
            &m,
            &cfg.mongo.trading_db,
            "raw_signals",
            doc! {"processed": true}
        )
        .await,
        n as u64
    );
    // The replayed documents were seen again and counted as duplicates.
    let dups: u64 = [&a, &b]
        .iter()
        .map(|s| {
            mtx_runtime::metrics::render(&s.registry)
                .lines()
                .filter(|l| {
                    l.starts_with("mtx_mongo_documents_total") && l.contains("result=\"duplicate\"")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum();
    assert!(dups >= 8 * n as u64, "duplicates seen on replay: {dups}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_killed_mid_batch_restarts_to_exact_counts() {
    let nats = NatsServer::start();
    let mongo_server = MongoServer::start();
    let mut cfg = config(&nats, &mongo_server);
    cfg.worker.batch_size = 100;
    cfg.topology.ack_wait_secs = 4;
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    migrate(&cfg).await;
    let m = mongo(&cfg).await;
    let n = 1500usize;
    let sub = subjects(&cfg);
    let raw_sub = sub
        .signals_raw(Environment::Staging, "mathematricks")
        .unwrap();
    let std_sub = sub
        .signals_standardized(Environment::Staging, "SPX_1-D_Opt")
        .unwrap();
    for i in 0..n {
        publish(
            &js,
            &raw_sub,
            &format!("raw-{i}"),
            Some(&signal_id(i)),
            &raw_signal(i),
        )
        .await;
        publish(
            &js,
            &std_sub,
            &format!("std-{i}"),
            Some(&signal_id(i)),
            &standardized(i),
        )
        .await;
    }
    let tdb = cfg.mongo.trading_db.clone();

    // The first sink runs on its own runtime, which is dropped abruptly
    // (no graceful shutdown, no acks sent, writes cut off) mid-run.
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let cfg1 = cfg.clone();
    let doomed = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = start_sink(&cfg1).await;
            std::mem::forget(s);
        });
        let _ = up_tx.send(());
        let _ = kill_rx.recv();
        rt.shutdown_background();
    });
    up_rx.recv().unwrap();
    assert!(
        eventually(Duration::from_secs(30), || async {
            count(&m, &tdb, "raw_signals", doc! {}).await >= 300
        })
        .await
    );
    kill_tx.send(()).unwrap();
    doomed.join().unwrap();
    let at_kill = count(&m, &tdb, "raw_signals", doc! {}).await;
    let std_at_kill = count(&m, &tdb, "standardized_signals", doc! {}).await;
    assert!(
        (at_kill as usize) < n || (std_at_kill as usize) < n,
        "killed too late to test anything"
    );

    let sink = start_sink(&cfg).await;
    assert!(
        eventually(Duration::from_secs(45), || async {
            count(&m, &tdb, "raw_signals", doc! {}).await == n as u64
                && count(&m, &tdb, "standardized_signals", doc! {}).await == n as u64
                && count(&m, &tdb, "raw_signals", doc! {"processed": true}).await == n as u64
                && drained(&js, &topo).await
        })
        .await,
        "after restart: raw {} std {} processed {}",
        count(&m, &tdb, "raw_signals", doc! {}).await,
        count(&m, &tdb, "standardized_signals", doc! {}).await,
        count(&m, &tdb, "raw_signals", doc! {"processed": true}).await,
    );
    // Exact: one document per signal, nothing dead-lettered.
    let raws = find(&m, &tdb, "raw_signals", doc! {}).await;
    let mut ids: Vec<&str> = raws
        .iter()
        .map(|d| d.get_str("signal_id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    assert_eq!(count(&m, &tdb, "dead_letters", doc! {}).await, 0);
    assert_eq!(
        stream_count(&js, &topo.stream_name(streams::DLQ), ">").await,
        0
    );
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_stopped_20s_mid_run_every_document_arrives_once() {
    let nats = NatsServer::start();
    // Durable: a SIGKILLed stand-in otherwise loses its last acknowledged
    // writes, which no sink could bring back (they were acked and are gone).
    let mut mongo_server = MongoServer::start_durable();
    let cfg = config(&nats, &mongo_server);
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    migrate(&cfg).await;
    let m = mongo(&cfg).await;
    let sink = start_sink(&cfg).await;
    let tdb = cfg.mongo.trading_db.clone();
    let n = 2000usize;

    // 2,000 raw signals at ~250 signals/s.
    let publisher = {
        let js = js.clone();
        let cfg = cfg.clone();
        tokio::spawn(async move {
            let sub = subjects(&cfg);
            let raw_sub = sub
                .signals_raw(Environment::Staging, "mathematricks")
                .unwrap();
            for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
                let t = Instant::now();
                for &i in chunk {
                    publish(
                        &js,
                        &raw_sub,
                        &format!("raw-{i}"),
                        Some(&signal_id(i)),
                        &raw_signal(i),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(200).saturating_sub(t.elapsed())).await;
            }
        })
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            count(&m, &tdb, "raw_signals", doc! {}).await >= 200
        })
        .await
    );
    mongo_server.stop();
    let stopped = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || async {
            sink.health
                .readiness()
                .err()
                .is_some_and(|v| v.iter().any(|f| f.contains("mongo")))
        })
        .await,
        "readiness stays true while Mongo is down"
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(stopped.elapsed())).await;
    tokio::task::block_in_place(|| mongo_server.restart());
    publisher.await.unwrap();
    let restarted = Instant::now();

    if std::env::var("SINK_DEBUG").is_ok() {
        for _ in 0..20 {
            let mut line = format!(
                "t+{:?} raw {}",
                restarted.elapsed(),
                count(&m, &tdb, "raw_signals", doc! {}).await
            );
            for c in topo
                .pool_consumers("sink")
                .filter(|c| c.durable().contains("signals"))
            {
                let st = js.get_stream(&c.stream).await.unwrap();
                let i = st.consumer_info(c.durable()).await.unwrap();
                line += &format!(
                    " | {} pend {} ackp {} redel {}",
                    c.durable(),
                    i.num_pending,
                    i.num_ack_pending,
                    i.num_redelivered
                );
            }
            eprintln!("{line}");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let ok = eventually(Duration::from_secs(60), || async {
        count(&m, &tdb, "raw_signals", doc! {}).await == n as u64 && drained(&js, &topo).await
    })
    .await;
    if !ok {
        let raws = find(&m, &tdb, "raw_signals", doc! {}).await;
        let have: std::collections::HashSet<String> = raws
            .iter()
            .map(|d| d.get_str("signal_id").unwrap().to_string())
            .collect();
        let missing: Vec<usize> = (0..n).filter(|i| !have.contains(&signal_id(*i))).collect();
        for c in topo.pool_consumers("sink") {
            let st = js.get_stream(&c.stream).await.unwrap();
            let i = st.consumer_info(c.durable()).await.unwrap();
            eprintln!(
                "{}: pending {} ack_pending {} redelivered {} delivered {:?} ack_floor {:?}",
                c.durable(),
                i.num_pending,
                i.num_ack_pending,
                i.num_redelivered,
                i.delivered,
                i.ack_floor
            );
        }
        eprintln!(
            "dlq stream {} dead_letters {}",
            stream_count(&js, &topo.stream_name(streams::DLQ), ">").await,
            count(&m, &tdb, "dead_letters", doc! {}).await
        );
        eprintln!("{}", mtx_runtime::metrics::render(&sink.registry));
        panic!(
            "raw {} missing {:?}",
            count(&m, &tdb, "raw_signals", doc! {}).await,
            missing
        );
    }
    eprintln!("caught up {:?} after Mongo returned", restarted.elapsed());
    assert!(
        sink.health.readiness().is_ok(),
        "{:?}",
        sink.health.readiness()
    );
    // None twice (unique keys), all linked, nothing dead-lettered.
    let raws: Vec<Document> = find(&m, &tdb, "raw_signals", doc! {}).await;
    let mut ids: Vec<&str> = raws
        .iter()
        .map(|d| d.get_str("signal_id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    assert_eq!(count(&m, &tdb, "dead_letters", doc! {}).await, 0);
    assert_eq!(
        stream_count(&js, &topo.stream_name(streams::DLQ), ">").await,
        0
    );
    let text = mtx_runtime::metrics::render(&sink.registry);
    assert!(
        text.contains("outcome=\"retry\",stage=\"sink\""),
        "no NAKs during the outage?\n{text}"
    );
    sink.stop().await;
}
