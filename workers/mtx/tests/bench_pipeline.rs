//! CLI smoke test of `mtx bench pipeline`: a small run against a harness
//! nats-server writes a report with every field, and every signal completes
//! in the pipeline and in the pass-through chain. No wall-clock assertions:
//! this is a benchmark, the figures belong to the machine.
//!
//! Takes from a few seconds to about a minute: an EXIT whose MARKET entry
//! was filled without ever being seen working in an account state waits for
//! Cerebro's `unbooked_grace` (30 s) and a state published after it.

use mtx_harness::NatsServer;
use serde_json::Value;
use std::process::Command;

#[test]
fn small_run_writes_a_complete_report() {
    // A Go runtime setting of the server, to see it in the report.
    let nats = NatsServer::start_with_env(&[("GOGC", "1234")]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.json");
    let run = Command::new(env!("CARGO_BIN_EXE_mtx"))
        .args([
            "bench",
            "pipeline",
            "--signals",
            "300",
            "--passthrough-hops",
            "6",
        ])
        .arg("--out")
        .arg(&out)
        .current_dir(dir.path())
        .env("MTX_NATS__URL", nats.url())
        .env("MTX_LOG__LEVEL", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{}\nnats:\n{}",
        run.status,
        String::from_utf8_lossy(&run.stderr),
        nats.log()
    );
    assert!(stdout.contains("throughput (signals/s)"), "{stdout}");
    assert!(stdout.contains("pipeline / pass-through"), "{stdout}");

    let r: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(r["bench"], "pipeline");
    assert_eq!(r["mode"], "in_process");
    assert_eq!(r["settings"]["signals"], 300);
    assert_eq!(r["settings"]["storage"], "file");
    assert_eq!(
        r["settings"]["server_go_env"]["GOGC"], "1234",
        "{:#}",
        r["settings"]
    );
    assert!(
        stdout.contains("nats-server Go runtime: ") && stdout.contains("GOGC=1234"),
        "{stdout}"
    );
    for phase in ["pipeline", "passthrough"] {
        let p = &r[phase];
        assert_eq!(p["expected"], 300, "{phase}");
        assert_eq!(p["completed"], p["expected"], "{phase}: {p:#}");
        assert_eq!(p["timed_out"], false, "{phase}");
        assert!(p["throughput_per_sec"].as_f64().unwrap() > 0.0, "{phase}");
        for lat in ["raw_to_order", "raw_to_fill"] {
            let s = &p["latency"][lat];
            assert!(s["count"].as_u64().unwrap() > 0, "{phase} {lat}: {s}");
            for f in ["p50_ms", "p95_ms", "p99_ms", "max_ms"] {
                assert!(s[f].as_f64().is_some(), "{phase} {lat} {f}");
            }
            assert!(s["p50_ms"].as_f64() <= s["p99_ms"].as_f64());
            assert!(s["p99_ms"].as_f64() <= s["max_ms"].as_f64());
        }
        let u = &p["usage"];
        assert!(u["cpu_secs"].as_f64().unwrap() > 0.0, "{phase}: {u}");
        assert!(u["peak_rss_bytes"].as_u64().unwrap() > 0, "{phase}: {u}");
    }
    let p = &r["pipeline"];
    // One order per approved leg, every one filled.
    assert!(p["messages"]["order"].as_u64().unwrap() > 0);
    assert_eq!(p["messages"]["dlq"], 0, "{p:#}");
    for stage in ["2_standardizer", "3_cerebro", "4_execution"] {
        assert!(p["stages"][stage]["count"].as_u64().unwrap() > 0, "{stage}");
    }
    assert!(
        p["metrics"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.starts_with("mtx_messages_processed_total")),
        "runtime counters in the report"
    );
    assert!(r["ratio"].as_f64().unwrap() > 0.0);
    // The pass-through chain had one extra hop, before the state: every
    // signal went through all seven streams.
    assert_eq!(r["settings"]["passthrough_hops"], 6);
    let pt = &r["passthrough"];
    let kinds: Vec<&String> = pt["messages"].as_object().unwrap().keys().collect();
    assert_eq!(
        kinds,
        [
            "0_raw",
            "1_standardized",
            "2_decision",
            "3_order",
            "4_fill",
            "5_extra1",
            "6_state"
        ],
        "{pt:#}"
    );
    for (k, n) in pt["messages"].as_object().unwrap() {
        assert_eq!(n, 300, "{k}");
    }
    assert!(pt["stages"]["6_extra1_to_state"]["count"].as_u64().unwrap() > 0);
    // Both phases' host CPU per signal, and their quotient.
    let per_signal = |phase: &str| {
        r[phase]["usage"]["host_busy_secs"].as_f64().unwrap()
            / r[phase]["completed"].as_f64().unwrap()
    };
    let cpu_ratio = r["cpu_ratio"].as_f64().unwrap();
    let expected = per_signal("passthrough") / per_signal("pipeline");
    assert!(
        (cpu_ratio - expected).abs() < 1e-9 && cpu_ratio > 0.0,
        "cpu_ratio {cpu_ratio}, expected {expected}"
    );
    assert!(
        stdout.contains("pass-through / pipeline host CPU"),
        "{stdout}"
    );
    // A run cleans up after itself: no stream of its prefix is left.
    let prefix = r["settings"]["prefix"]
        .as_str()
        .unwrap()
        .to_ascii_uppercase();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let left: Vec<String> = rt.block_on(async {
        use futures::StreamExt;
        let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        js.stream_names()
            .filter_map(|n| async move { n.ok() })
            .filter(|n| std::future::ready(n.to_ascii_uppercase().contains(&prefix)))
            .collect()
            .await
    });
    assert!(left.is_empty(), "left behind: {left:?}");
}
