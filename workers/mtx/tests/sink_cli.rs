//! The sink through the real binary: `mtx db migrate` twice, `mtx run sink`
//! killed with SIGKILL mid-batch and started again (exact counts), then
//! `mtx signal show` and `mtx dlq list`.

use mtx_harness::{unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_schemas::{headers, ids, Environment};
use mtx_sink::spec::{names, Db};
use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn mtx(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mtx"));
    c.arg("--config").arg(config).env("MTX_LOG__LEVEL", "warn");
    c
}

fn run(config: &Path, args: &[&str]) -> Output {
    mtx(config).args(args).output().expect("run mtx")
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_run_kill_restart_show() {
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("c");
    let trading = unique("trading");
    let core = unique("core");
    let config = dir.path().join("mtx.toml");
    std::fs::write(
        &config,
        format!(
            "[nats]\nurl = \"{}\"\n[mongo]\nuri = \"{}\"\ntrading_db = \"{trading}\"\nbot_core_db = \"{core}\"\n\
             [metrics]\naddr = \"127.0.0.1:0\"\n[topology]\nprefix = \"{prefix}\"\nack_wait_secs = 4\n\
             [worker]\nbatch_size = 100\n",
            nats.url(),
            mongo.uri()
        ),
    )
    .unwrap();
    let cfg = Config::load(Some(&config)).unwrap();

    let o = run(&config, &["topology", "apply"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&config, &["db", "migrate"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("schema none -> 1.3.0"), "{}", text(&o));
    let o = run(&config, &["db", "migrate"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("nothing to do"), "{}", text(&o));

    // 1,500 raw signals waiting in the stream.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let subject = mtx_subjects::Subjects::new(&prefix)
        .signals_raw(Environment::Staging, "mathematricks")
        .unwrap();
    let n = 1500;
    let mut acks = Vec::new();
    for i in 0..n {
        let sid = ids::signal_id("mathematricks", "SPX_1-D_Opt", &format!("S{i}"));
        let body = serde_json::json!({
            "source": "mathematricks", "environment": "staging",
            "received_at": "2025-11-20T10:00:00Z", "format": "MATHEMATRICKS",
            "payload": {"strategy_name": "SPX_1-D_Opt", "signalID": format!("S{i}")}
        });
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, format!("raw-{i}").as_str());
        h.insert(headers::SIGNAL_ID, sid.as_str());
        acks.push(
            js.publish_with_headers(subject.clone(), h, body.to_string().into())
                .await
                .unwrap(),
        );
    }
    for a in acks {
        a.await.unwrap();
    }

    let store = mtx_sink::Store::connect(&cfg.mongo, Duration::from_secs(10))
        .await
        .unwrap();
    let count = || async {
        store
            .count(Db::Trading, names::RAW_SIGNALS)
            .await
            .unwrap_or(0)
    };

    // kill -9 mid-run.
    let first = Running(mtx(&config).args(["run", "sink"]).spawn().unwrap());
    let start = Instant::now();
    while count().await < 200 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sink wrote nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut first = first;
    unsafe {
        libc::kill(first.0.id() as i32, libc::SIGKILL);
    }
    let _ = first.0.wait();
    let at_kill = count().await;
    assert!(at_kill < n as u64, "killed too late ({at_kill})");

    let _second = Running(mtx(&config).args(["run", "sink"]).spawn().unwrap());
    let start = Instant::now();
    while count().await != n as u64 {
        assert!(
            start.elapsed() < Duration::from_secs(45),
            "after restart: {} of {n}",
            count().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: still exactly n a moment later (nothing written twice).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(count().await, n as u64);
    assert_eq!(
        store.count(Db::Trading, names::DEAD_LETTERS).await.unwrap(),
        0
    );

    let sid = ids::signal_id("mathematricks", "SPX_1-D_Opt", "S7");
    let o = run(&config, &["signal", "show", &sid]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("raw (1)"), "{}", text(&o));
    let o = run(&config, &["signal", "show", "sig_unknown"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let o = run(&config, &["dlq", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 dead letter(s)"), "{}", text(&o));
}
