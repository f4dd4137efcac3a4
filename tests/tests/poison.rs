//! A message whose handler crashes the whole process on every delivery (the
//! `echo_worker` fixture with `ECHO_POISON`) never returns an outcome, so the
//! consume loop never sees its last try. Two replicas, restarted whenever
//! they die: the poison message is dead-lettered exactly once with reason
//! `max_deliveries` (from the server's max-deliveries advisory, both
//! replicas publishing under one id), and every other message, including the
//! ones that kept sharing a batch with it, is processed.

mod common;

use common::*;
use mtx_harness::NatsServer;
use mtx_runtime::config::Config;
use mtx_schemas::headers;
use mtx_subjects::topology::streams;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

const MAX_DELIVER: i64 = 4;

fn spawn_worker(cfg: &Config, poison: &str, log: &Path) -> Child {
    echo_worker(
        cfg,
        log,
        &[
            ("MTX_WORKER__BATCH_SIZE", "16"),
            ("ECHO_ID_MODE", "seq"),
            ("ECHO_POISON", poison),
        ],
    )
}

/// The replicas; killed when the test ends, also on a failed assertion.
struct Pool {
    workers: Vec<(Child, PathBuf)>,
    crashes: usize,
}

impl Pool {
    /// Restart every replica that died; count the crashes.
    fn restart_dead(&mut self, cfg: &Config, poison: &str) {
        for (child, log) in &mut self.workers {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(!status.success(), "a replica stopped by itself: {status:?}");
                self.crashes += 1;
                *child = spawn_worker(cfg, poison, log);
            }
        }
    }

    fn logs(&self) -> String {
        self.workers
            .iter()
            .map(|(_, l)| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n----\n")
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for (c, _) in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_crashes_the_process_is_dead_lettered_once_and_spares_its_batch() {
    let nats = NatsServer::start();
    let mut cfg = config(&nats);
    cfg.topology.ack_wait_secs = 2;
    cfg.topology.max_deliver = MAX_DELIVER;
    let js = js(&nats).await;
    let topo = apply(&js, &cfg).await;
    let raw = raw_subject(&cfg);

    // 40 messages; the poison sits in the middle of the first batch.
    let n = 40;
    let poison = "m7";
    let poison_seq = publish_n(&js, &raw, n).await[7]; // m7's sequence

    let dir = tempfile::tempdir().unwrap();
    let mut pool = Pool {
        workers: (0..2)
            .map(|r| {
                let log = dir.path().join(format!("replica{r}.log"));
                (spawn_worker(&cfg, poison, &log), log)
            })
            .collect(),
        crashes: 0,
    };

    let audit = topo.stream_name(streams::AUDIT);
    let dlq = topo.stream_name(streams::DLQ);
    let mut done = false;
    for _ in 0..1_200 {
        pool.restart_dead(&cfg, poison);
        if count(&js, &dlq, ">").await >= 1 && count(&js, &audit, ">").await >= n - 1 {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        done,
        "dead letters {}, echoes {} of {}; crashes {}; logs:\n{}",
        count(&js, &dlq, ">").await,
        count(&js, &audit, ">").await,
        n - 1,
        pool.crashes,
        pool.logs()
    );
    // The replicas keep running: nothing delivers the poison any more.
    let raw_stream = topo.stream_name(streams::SIGNALS_RAW);
    assert!(
        eventually(Duration::from_secs(10), || async {
            backlog(&js, &raw_stream, "standardizer").await == (0, 0)
        })
        .await,
        "consumer not drained"
    );
    pool.restart_dead(&cfg, poison);

    // One crash per delivery of the poison, up to max_deliver.
    assert_eq!(pool.crashes as i64, MAX_DELIVER, "{}", pool.logs());

    // Exactly one dead letter (two replicas heard the advisory), the poison.
    let dead = read_all(&js, &dlq, ">").await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(&d.payload[..], poison.as_bytes());
    assert_eq!(
        d.subject.as_str(),
        format!("{}.dlq.echo", cfg.topology.prefix)
    );
    assert_eq!(header(d, headers::DLQ_REASON), "max_deliveries");
    assert_eq!(header(d, headers::DLQ_STAGE), "echo");
    assert_eq!(header(d, mtx_runtime::dlq::DLQ_CONSUMER), "standardizer");
    assert_eq!(header(d, headers::ORIGINAL_SUBJECT), raw);
    assert_eq!(header(d, headers::ORIGINAL_SEQ), poison_seq.to_string());
    assert_eq!(header(d, headers::DELIVERIES), MAX_DELIVER.to_string());
    assert_eq!(
        header(d, headers::MSG_ID),
        mtx_runtime::dlq::msg_id(&raw_stream, "standardizer", poison_seq)
    );
    assert!(
        chrono::DateTime::parse_from_rfc3339(&header(d, mtx_runtime::dlq::DLQ_TIME)).is_ok(),
        "Mtx-Dlq-Time: {}",
        header(d, mtx_runtime::dlq::DLQ_TIME)
    );

    // Every other message was processed, each once (its batch mates were
    // not taken down with it), and the poison never was.
    let mut echoed: HashMap<String, usize> = HashMap::new();
    for m in read_all(&js, &audit, ">").await {
        *echoed
            .entry(String::from_utf8_lossy(&m.payload).to_string())
            .or_default() += 1;
    }
    assert!(!echoed.contains_key(poison));
    for i in 0..n {
        let body = format!("m{i}");
        if body != poison {
            assert_eq!(echoed.get(&body), Some(&1), "{body}: {echoed:?}");
        }
    }
}
