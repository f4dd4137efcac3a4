//! The `mtx` binary at its edges: config errors, topology apply/check.

use mtx_harness::{unique, NatsServer};
use std::process::{Command, Output};

fn mtx(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mtx"));
    c.args(args).current_dir(std::env::temp_dir());
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run mtx")
}

#[test]
fn config_error_is_one_clear_line_and_nonzero_exit() {
    for (key, value, expect) in [
        (
            "MTX_NATS__URL",
            "localhost:4222",
            "nats.url (MTX_NATS__URL)",
        ),
        (
            "MTX_METRICS__ADDR",
            "nowhere",
            "metrics.addr (MTX_METRICS__ADDR)",
        ),
        (
            "MTX_WORKER__BATCH_SIZE",
            "lots",
            "worker.batch_size (MTX_WORKER__BATCH_SIZE)",
        ),
        ("MTX_ENVIRONMENT", "prod", "environment"),
    ] {
        let out = mtx(&["run", "all"], &[(key, value)]);
        assert_eq!(out.status.code(), Some(2), "{key}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(err.starts_with("config error: "), "{err}");
        assert!(err.contains(expect), "{err} should name {expect}");
        assert!(out.stdout.is_empty());
    }
    let ok = mtx(&["config", "check"], &[]);
    assert!(ok.status.success());
}

#[test]
fn topology_apply_is_idempotent_and_check_reports_drift() {
    let nats = NatsServer::start();
    let prefix = unique("c");
    let env = [
        ("MTX_NATS__URL", nats.url()),
        ("MTX_TOPOLOGY__PREFIX", prefix.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let check = mtx(&["topology", "check"], &env);
    assert_eq!(check.status.code(), Some(1), "empty server must differ");

    let first = mtx(&["topology", "apply"], &env);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let second = mtx(&["topology", "apply"], &env);
    let text = String::from_utf8_lossy(&second.stdout);
    assert!(text.contains("0 created, 0 updated"), "{text}");
    assert!(mtx(&["topology", "check"], &env).status.success());

    // The code changes a consumer setting: check fails and names it.
    let mut changed = env.clone();
    changed.push(("MTX_TOPOLOGY__MAX_ACK_PENDING", "1234"));
    let drift = mtx(&["topology", "check"], &changed);
    assert_eq!(drift.status.code(), Some(1));
    let text = String::from_utf8_lossy(&drift.stdout);
    assert!(
        text.contains("max_ack_pending expected 1234 but server has 20000"),
        "{text}"
    );

    let unknown = mtx(&["run", "nonsense"], &env);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("unknown worker `nonsense`"));
}
