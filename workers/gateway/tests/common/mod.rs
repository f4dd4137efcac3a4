//! A whole ingress stack per test: a real nats-server, the topology, and one
//! mtx process running the gateway and the standardizer.
#![allow(dead_code)]

use async_nats::jetstream;
use mtx_gateway::secrets::SecretHash;
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::SizingMode;
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The fixtures' passphrase.
pub const SECRET: &str = "test_password_123";

pub struct Stack {
    pub nats: NatsServer,
    pub config: Config,
    pub js: jetstream::Context,
    pub subjects: Subjects,
    pub topo: Topology,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    waiter: Option<tokio::task::JoinHandle<()>>,
}

/// A config for `nats` with a fresh prefix, secrets for the fixture strategies.
pub fn config(nats: &NatsServer) -> Config {
    let mut c = Config::default();
    if let Ok(level) = std::env::var("TEST_LOG") {
        c.log.level = level;
        mtx_runtime::telemetry::init(&c.log);
    }
    c.nats.url = nats.url();
    c.nats.request_timeout_ms = 2_000;
    c.metrics.addr = "127.0.0.1:0".into();
    c.gateway.addr = "127.0.0.1:0".into();
    c.gateway.secrets_refresh_secs = 0;
    for s in ["SPX_1-D_Opt", "Forex", "TV_Strategy"] {
        let h = SecretHash::generate(SECRET).unwrap().to_string();
        c.gateway.secrets.insert(s.to_string(), h);
    }
    c.topology.prefix = unique("g");
    c.worker.heartbeat_ms = 500;
    c.worker.pull_expires_ms = 2_000;
    c.worker.publish_retry_delay_ms = 200;
    c
}

impl Stack {
    /// Start with the default test config, adjusted by `tune`.
    pub async fn start(tune: impl FnOnce(&mut Config)) -> Stack {
        let nats = NatsServer::start();
        let mut c = config(&nats);
        tune(&mut c);
        Self::start_on(nats, c).await
    }

    pub async fn start_on(nats: NatsServer, c: Config) -> Stack {
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client);
        let topo = Topology::build(&c.topology);
        mtx_subjects::apply::apply(&js, &topo).await.unwrap();
        let shutdown = CancellationToken::new();
        let mut p = Process::start(c.clone(), shutdown.clone()).await.unwrap();
        mtx_standardizer::worker::spawn(&mut p).unwrap();
        let addr = mtx_gateway::serve(&mut p).await.unwrap();
        let ready = format!("http://{}/readyz", p.ops_addr);
        let waiter = tokio::spawn(p.wait());
        let http = reqwest::Client::new();
        let start = Instant::now();
        loop {
            let ok = http
                .get(&ready)
                .send()
                .await
                .map(|r| r.status().is_success());
            if ok.unwrap_or(false) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "process never ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let s = Stack {
            nats,
            config: c.clone(),
            js,
            subjects: Subjects::new(&c.topology.prefix),
            topo,
            addr,
            http,
            shutdown,
            waiter: Some(waiter),
        };
        for (id, mode, alpha) in [
            ("SPX_1-D_Opt", SizingMode::SenderEquityRatio, "0.02"),
            ("Forex", SizingMode::TargetWeight, "0.01"),
            ("TV_Strategy", SizingMode::DeltaUnits, "0.005"),
        ] {
            s.put_strategy(id, mode, alpha).await;
        }
        s
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn put_strategy(&self, id: &str, mode: SizingMode, alpha: &str) {
        let kv = self
            .js
            .get_key_value(self.topo.bucket(buckets::STRATEGIES).unwrap())
            .await
            .unwrap();
        let mut c = StrategyConfig::new(id);
        c.sizing_mode = mode;
        c.expected_alpha = Some(alpha.parse().unwrap());
        kv.put(
            StrategyConfig::kv_key(id),
            serde_json::to_vec(&c).unwrap().into(),
        )
        .await
        .unwrap();
    }

    /// POST raw bytes; (status, JSON body).
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_bytes(path, serde_json::to_vec(body).unwrap())
            .await
    }

    /// Every message of a stream (base name), in order.
    pub async fn messages(&self, base: &str) -> Vec<jetstream::Message> {
        mtx_harness::bus::read_all(&self.js, &self.topo.stream_name(base), ">").await
    }

    /// Wait until `base` holds at least `n` messages (20 s max), then a
    /// little longer so extra (duplicate) messages would show up too.
    pub async fn wait_count(&self, base: &str, n: usize) -> Vec<jetstream::Message> {
        let start = Instant::now();
        loop {
            let got = self.messages(base).await;
            if got.len() >= n || start.elapsed() > Duration::from_secs(20) {
                tokio::time::sleep(Duration::from_millis(700)).await;
                return self.messages(base).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn standardized(&self, n: usize) -> Vec<StandardizedSignal> {
        self.wait_count(streams::SIGNALS_STANDARDIZED, n)
            .await
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
    }

    /// No stored message anywhere (payload or headers) mentions the secret.
    pub async fn assert_secret_nowhere(&self) {
        for st in &self.topo.streams {
            for m in self.messages(st.base).await {
                let body = String::from_utf8_lossy(&m.payload).to_string();
                let hdrs = format!("{:?}", m.headers);
                for needle in [SECRET, "passphrase"] {
                    assert!(
                        !body.contains(needle) && !hdrs.contains(needle),
                        "{needle} found on {}: {body}",
                        m.subject
                    );
                }
            }
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(w) = self.waiter.take() {
            let _ = w.await;
        }
    }
}

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../standardizer/tests/fixtures/signals")
        .join(name)
}

/// A fixture file as `mtx signal send` sends it (passphrase kept: the
/// gateway checks and strips it): `wait` / `entry_name` dropped, `signalID`
/// assigned where missing (`<prefix>_<i>`), `$ENTRY_n` / `$PREVIOUS` resolved.
pub fn load_fixture(name: &str, prefix: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(fixture_path(name)).unwrap();
    let signals: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut named: HashMap<String, String> = HashMap::new();
    let mut previous: Option<String> = None;
    signals
        .into_iter()
        .enumerate()
        .map(|(i, mut signal)| {
            let obj = signal.as_object_mut().unwrap();
            obj.remove("wait");
            let id = match obj.get("signalID").and_then(Value::as_str) {
                Some(id) => id.to_string(),
                None => {
                    let id = format!("{prefix}_{i}");
                    obj.insert("signalID".into(), Value::String(id.clone()));
                    id
                }
            };
            if let Some(Value::String(name)) = obj.remove("entry_name") {
                named.insert(name, id.clone());
            }
            if let Some(Value::String(link)) = obj.get("entry_signal_id").cloned() {
                let resolved = match link.as_str() {
                    "$PREVIOUS" => previous.clone().unwrap(),
                    l if l.starts_with('$') => named[l].clone(),
                    l => l.to_string(),
                };
                obj.insert("entry_signal_id".into(), Value::String(resolved));
            }
            previous = Some(id);
            assert_eq!(obj["passphrase"], SECRET);
            signal
        })
        .collect()
}
