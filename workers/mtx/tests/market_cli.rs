//! `mtx market price <symbol> <price>` against a real nats-server.

use async_nats::jetstream;
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_schemas::market::MarketPrice;
use mtx_subjects::topology::streams;
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_a_mark_on_market_prices() {
    let nats = NatsServer::start();
    let mut cfg = Config::default();
    cfg.topology.prefix = unique("t");
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let topo = Topology::build(&cfg.topology);
    mtx_subjects::apply::apply(&js, &topo).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_mtx"))
            .args(args)
            .current_dir(dir.path())
            .env("MTX_NATS__URL", nats.url())
            .env("MTX_TOPOLOGY__PREFIX", &cfg.topology.prefix)
            .output()
            .unwrap()
    };
    let out = run(&["market", "price", "BTC/USD", "65123.45"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("published BTC/USD 65123.45"), "{stdout}");

    let subject = Subjects::new(&cfg.topology.prefix)
        .market_price("BTC/USD")
        .unwrap();
    let st = js
        .get_stream(topo.stream_name(streams::MARKET))
        .await
        .unwrap();
    let m = st.get_last_raw_message_by_subject(&subject).await.unwrap();
    let p: MarketPrice = serde_json::from_slice(&m.payload).unwrap();
    assert_eq!(p.symbol, "BTC/USD");
    assert_eq!(p.price, Decimal::new(6512345, 2));
    assert_eq!(p.source.as_deref(), Some("manual"));

    let bad = run(&["market", "price", "AAPL", "0"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("price must be positive"));
}
