//! Test fixture: a worker built on the shared runtime exactly like the real
//! stages (Process, signal handling, the one consume loop), whose handler
//! echoes each message to `audit.echo`. Used by the process-level tests
//! (SIGTERM drain, kill -9 and restart).
//!
//! Env: `ECHO_DELAY_MS` per-message handler time; `ECHO_ID_MODE` = `seq`
//! (output id from the input's stream sequence: redeliveries dedupe) or
//! `seq_delivery` (id includes the delivery count: a redelivery of an
//! already-handled message shows up as a second output); `ECHO_POISON` = a
//! payload that aborts the whole process whenever it is handled (a handler
//! that crashes instead of returning an outcome).

use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_runtime::{Binding, Delivery, Handler, Outcome, Outgoing};
use mtx_subjects::topology::streams;
use std::sync::Arc;
use std::time::Duration;

struct Echo {
    delay: Duration,
    with_delivery: bool,
    subject: String,
    poison: Option<String>,
}

impl Handler for Echo {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        if self.poison.as_deref().map(str::as_bytes) == Some(&msg.payload[..]) {
            eprintln!(
                "poison message (seq {}, delivery {}): aborting the process",
                msg.stream_seq, msg.deliveries
            );
            std::process::abort();
        }
        tokio::time::sleep(self.delay).await;
        let id = if self.with_delivery {
            format!("echo-{}-{}", msg.stream_seq, msg.deliveries)
        } else {
            format!("echo-{}", msg.stream_seq)
        };
        Outcome::Ok(vec![Outgoing::new(
            self.subject.clone(),
            id,
            msg.payload.clone(),
        )
        .header("Echo-Seq", &msg.stream_seq.to_string())
        .header("Echo-Deliveries", &msg.deliveries.to_string())])
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::load(None).map_err(|e| anyhow::anyhow!("{e}"))?;
    mtx_runtime::telemetry::init(&cfg.log);
    let delay = std::env::var("ECHO_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let with_delivery = std::env::var("ECHO_ID_MODE").as_deref() == Ok("seq_delivery");
    let shutdown = mtx_runtime::shutdown::on_signals();
    let mut p = Process::start(cfg, shutdown).await?;
    let handler = Arc::new(Echo {
        delay: Duration::from_millis(delay),
        with_delivery,
        subject: p.subjects.audit("echo")?,
        poison: std::env::var("ECHO_POISON").ok().filter(|p| !p.is_empty()),
    });
    let binding = Binding {
        stage: "echo".into(),
        stream: p.topology.stream_name(streams::SIGNALS_RAW),
        durable: "standardizer".into(),
    };
    p.spawn_binding(binding, handler);
    println!("ops {}", p.ops_addr);
    p.wait().await;
    Ok(())
}
