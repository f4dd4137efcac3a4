//! `mtx system show | halt | resume` through the real binary: the kill switch
//! in KV (what Cerebro reads), mirrored into Bot Core's `system_config`, and
//! still flipped when MongoDB is unreachable.

use async_nats::jetstream;
use mongodb::bson::{doc, Document};
use mtx_harness::{unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_subjects::topology::buckets;
use mtx_subjects::Topology;
use std::path::Path;
use std::process::{Command, Output};

fn run(config: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mtx"));
    c.arg("--config").arg(config).env("MTX_LOG__LEVEL", "warn");
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(args).output().expect("run mtx")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halt_and_resume_flip_the_kill_switch_and_mirror_it() {
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("k");
    let core = unique("core");
    let config = dir.path().join("mtx.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{}\"\n[mongo]\nuri = \"{}\"\nbot_core_db = \"{core}\"\n[topology]\nprefix = \"{prefix}\"\n",
            nats.url(),
            mongo.uri()
        ),
    )
    .unwrap();
    let cfg = Config::load(Some(&config)).unwrap();
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let topo = Topology::build(&cfg.topology);
    mtx_subjects::apply::apply(&js, &topo).await.unwrap();
    let kv = js
        .get_key_value(topo.bucket(buckets::SYSTEM).unwrap())
        .await
        .unwrap();
    let mirror = || async {
        mongodb::Client::with_uri_str(mongo.uri())
            .await
            .unwrap()
            .database(&core)
            .collection::<Document>("system_config")
            .find_one(doc! {"key": "TRADING_ENABLED"})
            .await
            .unwrap()
    };

    let o = run(&config, &[], &["system", "show"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("trading ENABLED"), "{}", text(&o));

    // Halt: KV says false (what Cerebro reads), Bot Core shows who and why.
    let o = run(
        &config,
        &[],
        &[
            "system",
            "halt",
            "--by",
            "pm-anna",
            "--reason",
            "broker outage",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("trading HALTED"), "{}", text(&o));
    assert_eq!(
        &kv.get("TRADING_ENABLED").await.unwrap().unwrap()[..],
        b"false"
    );
    let m = mirror().await.expect("mirrored");
    assert!(!m.get_bool("value").unwrap());
    assert_eq!(m.get_str("category").unwrap(), "trading");
    assert_eq!(m.get_str("updated_by").unwrap(), "pm-anna");
    assert!(m.get_str("description").unwrap().contains("broker outage"));
    assert!(m.get_datetime("created_at").is_ok() && m.get_datetime("updated_at").is_ok());
    let o = run(&config, &[], &["system", "show", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["trading_enabled"], false, "{v}");

    // Someone also set the hard kill key: resume clears it too.
    kv.put("kill_switch", "true".into()).await.unwrap();
    let o = run(&config, &[], &["system", "resume", "--by", "pm-anna"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("cleared system/kill_switch"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("trading ENABLED"), "{}", text(&o));
    assert_eq!(&kv.get("kill_switch").await.unwrap().unwrap()[..], b"false");
    assert!(mirror().await.unwrap().get_bool("value").unwrap());

    // MongoDB unreachable: the switch still flips (KV is what counts), with
    // a warning about the stale mirror.
    let o = run(
        &config,
        &[(
            "MTX_MONGO__URI",
            "mongodb://127.0.0.1:1/?retryWrites=false&directConnection=true&serverSelectionTimeoutMS=500",
        )],
        &["system", "halt", "--by", "ops"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Bot Core mirror was not updated"),
        "{}",
        text(&o)
    );
    assert_eq!(
        &kv.get("TRADING_ENABLED").await.unwrap().unwrap()[..],
        b"false"
    );

    // Nobody named: refused, nothing changed.
    let o = run(&config, &[], &["system", "resume", "--by", " "]);
    assert!(!o.status.success());
    assert!(text(&o).contains("--by must name"), "{}", text(&o));
    assert_eq!(
        &kv.get("TRADING_ENABLED").await.unwrap().unwrap()[..],
        b"false"
    );
}
