//! `mtx secrets set` and `mtx signal send` against `mtx run gateway
//! standardizer`, all as child processes of the real binary, with a real
//! nats-server and the Mongo stand-in holding the secret hash.

use async_nats::jetstream;
use mtx_harness::{free_port, unique, MongoServer, NatsServer};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::strategy::StrategyConfig;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "test_password_123";

fn mtx(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mtx"));
    c.arg("--config")
        .arg(config)
        .current_dir(std::env::temp_dir());
    c
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../standardizer/tests/fixtures/signals")
        .join(name)
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn messages(js: &jetstream::Context, stream: &str) -> Vec<jetstream::Message> {
    mtx_harness::bus::read_all(js, stream, ">").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_set_then_signal_send_replays_a_fixture_through_the_pipeline() {
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("m");
    let port = free_port();
    let config = dir.path().join("mtx.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[nats]
url = "{}"
[mongo]
uri = "{}"
trading_db = "{}"
[gateway]
addr = "127.0.0.1:{port}"
secrets_refresh_secs = 1
[metrics]
addr = "127.0.0.1:0"
[topology]
prefix = "{prefix}"
[worker]
heartbeat_ms = 500
pull_expires_ms = 2000
"#,
            nats.url(),
            mongo.uri(),
            unique("db")
        ),
    )
    .unwrap();

    // The secret goes in through stdin and only its hash is stored.
    let mut set = mtx(&config)
        .args(["secrets", "set", "SPX_1-D_Opt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(format!("{SECRET}\n").as_bytes())
        .unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("signal_secrets") && !printed.contains(SECRET));
    let print = mtx(&config)
        .args(["secrets", "set", "X_Strategy", "--print"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut print = print;
    print
        .stdin
        .take()
        .unwrap()
        .write_all(b"another-long-secret\n")
        .unwrap();
    let printed = print.wait_with_output().unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(printed.contains("\"X_Strategy\" = \"sha256$"), "{printed}");

    let applied = mtx(&config).args(["topology", "apply"]).output().unwrap();
    assert!(applied.status.success());
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let kv = js
        .get_key_value(format!("{prefix}_strategies"))
        .await
        .unwrap();
    let mut cfg = StrategyConfig::new("SPX_1-D_Opt");
    cfg.expected_alpha = Some("0.02".parse().unwrap());
    kv.put(
        StrategyConfig::kv_key("SPX_1-D_Opt"),
        serde_json::to_vec(&cfg).unwrap().into(),
    )
    .await
    .unwrap();

    let _run = Running(
        mtx(&config)
            .args(["run", "gateway", "standardizer"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let gateway = format!("http://127.0.0.1:{port}");
    let send = |file: &str, extra: &[&str]| {
        let mut c = mtx(&config);
        c.args(["signal", "send"])
            .arg(fixture(file))
            .args(["--gateway", &gateway, "--json"])
            .args(extra);
        c.output().unwrap()
    };

    // The pairs file has no signalIDs and links its exit with $ENTRY_1; the
    // speed flag shrinks its 10 s wait to 0.1 s.
    let started = Instant::now();
    let out = send(
        "equity_pairs_signal_1.json",
        &["--speed", "100", "--id-prefix", "pairs"],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["sender_signal_id"], "pairs_0");
    assert_eq!(lines[1]["sender_signal_id"], "pairs_1");
    assert!(lines.iter().all(|l| l["status"] == 202));

    // Replaying with the same prefix is the same signals: deduplicated.
    let again = send(
        "equity_pairs_signal_1.json",
        &["--no-wait", "--id-prefix", "pairs"],
    );
    assert!(again.status.success());
    let again: Vec<Value> = String::from_utf8_lossy(&again.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(again[0]["signal_id"], lines[0]["signal_id"]);

    // A file whose elements carry their own signalIDs.
    let gold = send("futures_gold_simple_signal_1.json", &["--no-wait"]);
    assert!(gold.status.success());

    let stream = format!("{}_SIGNALS_STANDARDIZED", prefix.to_ascii_uppercase());
    let deadline = Instant::now() + Duration::from_secs(20);
    let signals: Vec<StandardizedSignal> = loop {
        let got = messages(&js, &stream).await;
        if got.len() >= 4 || Instant::now() > deadline {
            tokio::time::sleep(Duration::from_millis(700)).await;
            break messages(&js, &stream)
                .await
                .iter()
                .map(|m| serde_json::from_slice(&m.payload).unwrap())
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(signals.len(), 4, "pairs entry + exit, gold entry + exit");
    assert_eq!(signals[0].signal_id, lines[0]["signal_id"]);
    assert_eq!(signals[0].legs.len(), 2);
    assert_eq!(
        signals[1].entry_signal_id.as_deref(),
        Some(signals[0].signal_id.as_str()),
        "$ENTRY_1 resolved to the entry the pipeline assigned"
    );
    assert_eq!(signals[2].sender_signal_id, "GC_ENTRY_001");
    assert_eq!(
        signals[3].entry_signal_id.as_deref(),
        Some(signals[2].signal_id.as_str())
    );

    // A wrong secret fails the command.
    let wrong = dir.path().join("wrong.json");
    std::fs::write(
        &wrong,
        std::fs::read_to_string(fixture("equity_simple_signal_1.json"))
            .unwrap()
            .replace(SECRET, "not-the-secret"),
    )
    .unwrap();
    let out = mtx(&config)
        .args(["signal", "send"])
        .arg(&wrong)
        .args(["--gateway", &gateway, "--no-wait"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED 401"));
}
