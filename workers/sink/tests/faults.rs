//! Exactly once in effect under faults: replay from sequence 1 with two sink
//! replicas, a sink killed mid-batch, and MongoDB stopped for 20 s mid-run.

mod common;

use common::*;
use mongodb::bson::doc;
use mtx_harness::MongoServer;
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

/// Exactly `n` raw signals, one per signal id; nothing dead-lettered.
async fn assert_one_raw_signal_each_and_no_dead_letters(t: &Setup, n: usize) {
    let raws = t.find("raw_signals", doc! {}).await;
    let mut ids: Vec<&str> = raws
        .iter()
        .map(|d| d.get_str("signal_id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n);
    assert_eq!(t.count("dead_letters", doc! {}).await, 0);
    assert_eq!(
        stream_count(&t.js, &t.topo.stream_name(streams::DLQ), ">").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_sequence_one_with_two_replicas_changes_no_count() {
    let t = Setup::migrated().await;
    let n = 120;
    publish_lives(&t.js, &t.cfg, 0..n).await;
    let sink = start_sink(&t.cfg).await;
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
            counts(&t.m, &t.cfg).await == want && drained(&t.js, &t.topo).await
        })
        .await,
        "first pass: {:?}",
        counts(&t.m, &t.cfg).await
    );
    sink.stop().await;
    let filled = t.count("trading_orders", doc! {"status": "FILLED"}).await;
    assert_eq!(filled, n as u64);

    // Replay every stream from sequence 1: delete and recreate the sink's
    // durable consumers, then run two sink replicas side by side.
    for c in t.topo.pool_consumers("sink") {
        t.js.get_stream(&c.stream)
            .await
            .unwrap()
            .delete_consumer(c.durable())
            .await
            .unwrap();
    }
    apply(&t.js, &t.cfg).await;
    let a = start_sink(&t.cfg).await;
    let b = start_sink(&t.cfg).await;
    assert!(
        eventually(Duration::from_secs(40), || drained(&t.js, &t.topo)).await,
        "replay did not drain"
    );
    assert_eq!(counts(&t.m, &t.cfg).await, want, "replay changed counts");
    assert_eq!(
        t.count("trading_orders", doc! {"status": "FILLED"}).await,
        n as u64
    );
    assert_eq!(
        t.count("raw_signals", doc! {"processed": true}).await,
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
    let t = Setup::on(MongoServer::start(), |cfg| {
        cfg.worker.batch_size = 100;
        cfg.topology.ack_wait_secs = 4;
    })
    .await
    .migrate()
    .await;
    let n = 1500usize;
    let raw_sub = t
        .sub
        .signals_raw(Environment::Staging, "mathematricks")
        .unwrap();
    let std_sub = t
        .sub
        .signals_standardized(Environment::Staging, "SPX_1-D_Opt")
        .unwrap();
    for i in 0..n {
        publish(
            &t.js,
            &raw_sub,
            &format!("raw-{i}"),
            Some(&signal_id(i)),
            &raw_signal(i),
        )
        .await;
        publish(
            &t.js,
            &std_sub,
            &format!("std-{i}"),
            Some(&signal_id(i)),
            &standardized(i),
        )
        .await;
    }

    // The first sink runs on its own runtime, which is dropped abruptly
    // (no graceful shutdown, no acks sent, writes cut off) mid-run.
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
    let cfg1 = t.cfg.clone();
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
            t.count("raw_signals", doc! {}).await >= 300
        })
        .await
    );
    kill_tx.send(()).unwrap();
    doomed.join().unwrap();
    let at_kill = t.count("raw_signals", doc! {}).await;
    let std_at_kill = t.count("standardized_signals", doc! {}).await;
    assert!(
        (at_kill as usize) < n || (std_at_kill as usize) < n,
        "killed too late to test anything"
    );

    let sink = start_sink(&t.cfg).await;
    assert!(
        eventually(Duration::from_secs(45), || async {
            t.count("raw_signals", doc! {}).await == n as u64
                && t.count("standardized_signals", doc! {}).await == n as u64
                && t.count("raw_signals", doc! {"processed": true}).await == n as u64
                && drained(&t.js, &t.topo).await
        })
        .await,
        "after restart: raw {} std {} processed {}",
        t.count("raw_signals", doc! {}).await,
        t.count("standardized_signals", doc! {}).await,
        t.count("raw_signals", doc! {"processed": true}).await,
    );
    // Exact: one document per signal, nothing dead-lettered.
    assert_one_raw_signal_each_and_no_dead_letters(&t, n).await;
    sink.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_stopped_20s_mid_run_every_document_arrives_once() {
    // Durable: a SIGKILLed stand-in otherwise loses its last acknowledged
    // writes, which no sink could bring back (they were acked and are gone).
    let mut t = Setup::on(MongoServer::start_durable(), |_| {})
        .await
        .migrate()
        .await;
    let sink = start_sink(&t.cfg).await;
    let n = 2000usize;

    // 2,000 raw signals at ~250 signals/s.
    let publisher = {
        let js = t.js.clone();
        let cfg = t.cfg.clone();
        tokio::spawn(async move {
            let sub = subjects(&cfg);
            let raw_sub = sub
                .signals_raw(Environment::Staging, "mathematricks")
                .unwrap();
            for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
                let started = Instant::now();
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
                tokio::time::sleep(Duration::from_millis(200).saturating_sub(started.elapsed()))
                    .await;
            }
        })
    };
    assert!(
        eventually(Duration::from_secs(20), || async {
            t.count("raw_signals", doc! {}).await >= 200
        })
        .await
    );
    t.mongo_server.stop();
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
    tokio::task::block_in_place(|| t.mongo_server.restart());
    publisher.await.unwrap();
    let restarted = Instant::now();

    if std::env::var("SINK_DEBUG").is_ok() {
        for _ in 0..20 {
            let mut line = format!(
                "t+{:?} raw {}",
                restarted.elapsed(),
                t.count("raw_signals", doc! {}).await
            );
            for c in t
                .topo
                .pool_consumers("sink")
                .filter(|c| c.durable().contains("signals"))
            {
                let st = t.js.get_stream(&c.stream).await.unwrap();
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
        t.count("raw_signals", doc! {}).await == n as u64 && drained(&t.js, &t.topo).await
    })
    .await;
    if !ok {
        let raws = t.find("raw_signals", doc! {}).await;
        let have: std::collections::HashSet<String> = raws
            .iter()
            .map(|d| d.get_str("signal_id").unwrap().to_string())
            .collect();
        let missing: Vec<usize> = (0..n).filter(|i| !have.contains(&signal_id(*i))).collect();
        for c in t.topo.pool_consumers("sink") {
            let st = t.js.get_stream(&c.stream).await.unwrap();
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
            stream_count(&t.js, &t.topo.stream_name(streams::DLQ), ">").await,
            t.count("dead_letters", doc! {}).await
        );
        eprintln!("{}", mtx_runtime::metrics::render(&sink.registry));
        panic!(
            "raw {} missing {:?}",
            t.count("raw_signals", doc! {}).await,
            missing
        );
    }
    eprintln!("caught up {:?} after Mongo returned", restarted.elapsed());
    sink.assert_ready();
    // None twice (unique keys), all linked, nothing dead-lettered.
    assert_one_raw_signal_each_and_no_dead_letters(&t, n).await;
    let text = mtx_runtime::metrics::render(&sink.registry);
    assert!(
        text.contains("outcome=\"retry\",stage=\"sink\""),
        "no NAKs during the outage?\n{text}"
    );
    sink.stop().await;
}

/// A write that outlives the operation time limit is still carried out to
/// its end, and the client stays usable. The driver's futures must not be
/// dropped half-way (mongodb RUST-937): when the sink dropped timed-out
/// writes on a busy server, its pool wedged and every later operation, the
/// readiness ping included, timed out while the server answered other
/// clients in milliseconds (the chaos duplicate storm, CI of session 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_writes_still_finish_and_the_client_stays_usable() {
    use mtx_sink::spec::Db;
    use mtx_sink::{SinkError, Store};
    const WRITES: usize = 60;
    const DOCS: usize = 100;
    let server = MongoServer::start();
    let mc = mtx_runtime::config::MongoConfig {
        uri: server.uri(),
        trading_db: mtx_harness::unique("trading"),
        ..Default::default()
    };
    let client = mongodb::Client::with_uri_str(&mc.uri).await.unwrap();
    let hasty = Store::from_client(client.clone(), &mc, Duration::from_micros(1));
    let patient = Store::from_client(client.clone(), &mc, Duration::from_secs(30));
    let writes = (0..WRITES).map(|w| {
        let docs = (0..DOCS)
            .map(|i| doc! {"_id": format!("{w}-{i}"), "pad": "x".repeat(200)})
            .collect();
        hasty.insert_unordered(Db::Trading, "probe", docs)
    });
    let results = futures::future::join_all(writes).await;
    let timed_out = results
        .iter()
        .filter(|r| matches!(r, Err(SinkError::Timeout(_))))
        .count();
    assert!(
        timed_out > 0,
        "a 1 µs limit must time writes out: {results:?}"
    );
    patient
        .ping()
        .await
        .expect("the client is usable after timeouts");
    let all = (WRITES * DOCS) as u64;
    let finished = eventually(Duration::from_secs(60), || async {
        patient.count(Db::Trading, "probe").await.unwrap_or(0) == all
    })
    .await;
    assert!(
        finished,
        "{timed_out} timed-out writes: only {} of {all} documents arrived",
        patient.count(Db::Trading, "probe").await.unwrap_or(0)
    );
}
