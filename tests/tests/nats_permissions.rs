//! NATS users per role (`deploy/nats/auth.conf.tmpl`) on a real nats-server:
//!
//! - a provider may publish `signals.raw.>` and nothing else: publishing to
//!   `orders.>` / `executions.>`, subscribing to `executions.>`, `orders.>` or
//!   the pipeline's `_INBOX.>`, and the JetStream API are all refused, and
//!   nothing reaches the streams;
//! - `ops` is read-only: it can run `mtx topology check` and watch the
//!   pipeline subjects, but cannot delete a stream or publish an order;
//! - every pool's user can bind and pull each durable consumer of its pool
//!   (the topology's consumers, with the test prefix) and only its own, hear
//!   their max-deliveries advisories and read their streams by sequence
//!   (the runtime's dead-lettering of messages the server gave up on);
//! - the KV permissions match what the stages do (create / put / get, and
//!   the batched reads of Cerebro's and execution's records);
//! - the pipeline runs end to end with the role credentials: the setup
//!   credential (`admin`) applies the topology, a provider publishes raw
//!   signals, and the `echo_worker` fixture (the shared runtime's consume loop
//!   on the `standardizer` durable) processes all of them with the
//!   `standardizer` credential, without a single permission violation.
//!
//! The config under test is the template rendered for the test's topology
//! prefix exactly as `deploy/nats/render-auth.sh <prefix>` does; passwords are
//! defined as config variables, the same `$MTX_NATS_PW_<ROLE>` references that
//! production resolves from the environment.

mod common;

use async_nats::jetstream::{self, consumer::pull, stream::RawMessageErrorKind};
use bytes::Bytes;
use common::{count, eventually};
use futures::StreamExt;
use mtx_harness::nats_auth::{password, render_auth};
use mtx_harness::{repo_root, unique, NatsServer};
use mtx_runtime::multiget::last_messages;
use mtx_schemas::{headers, Environment};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology, TopologySettings};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A nats-server (JetStream) with the role users for a fresh topology prefix.
struct Secured {
    nats: NatsServer,
    prefix: String,
    topo: Topology,
    subjects: Subjects,
}

impl Secured {
    fn start() -> Secured {
        let prefix = unique("p");
        let nats = NatsServer::start_with(&mtx_harness::nats_auth::config(&prefix, None), "");
        let settings = TopologySettings {
            prefix: prefix.clone(),
            ..Default::default()
        };
        Secured {
            nats,
            topo: Topology::build(&settings),
            subjects: Subjects::new(&prefix),
            prefix,
        }
    }

    /// Connect as `role`; server errors (permission violations) are collected.
    async fn connect(&self, role: &str) -> Conn {
        self.connect_with(role, &password(role))
            .await
            .unwrap_or_else(|e| panic!("connect as {role}: {e}"))
    }

    async fn connect_with(&self, role: &str, pw: &str) -> Result<Conn, async_nats::ConnectError> {
        let events = Arc::new(Mutex::new(Vec::<String>::new()));
        let ev = events.clone();
        let mut opts = async_nats::ConnectOptions::with_user_and_password(role.into(), pw.into())
            .name(format!("test-{role}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(move |e| {
                let ev = ev.clone();
                async move {
                    ev.lock().unwrap().push(e.to_string().to_lowercase());
                }
            });
        if role == "provider" {
            // Providers get their publish acks on a private inbox prefix.
            opts = opts.custom_inbox_prefix("_INBOX_providers");
        }
        let client = opts.connect(self.nats.url()).await?;
        // Short API timeout: a refused request never gets an answer.
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(1500))
            .build(client.clone());
        Ok(Conn { client, js, events })
    }

    fn stream(&self, base: &str) -> String {
        self.topo.stream_name(base)
    }
}

struct Conn {
    client: async_nats::Client,
    js: jetstream::Context,
    events: Arc<Mutex<Vec<String>>>,
}

impl Conn {
    fn violations(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.contains("permissions violation"))
            .cloned()
            .collect()
    }

    /// Wait until the server reported a violation mentioning `what` (its
    /// `-ERR` arrives asynchronously).
    async fn expect_violation(&self, what: &str) {
        let what = what.to_lowercase();
        let _ = self.client.flush().await;
        let seen = eventually(Duration::from_secs(5), || async {
            self.violations().iter().any(|v| v.contains(&what))
        })
        .await;
        assert!(
            seen,
            "expected a permissions violation for `{what}`, got {:?}",
            self.events.lock().unwrap()
        );
    }

    /// JetStream publish; Ok only when the stream acknowledged it.
    async fn js_publish(&self, subject: &str, id: &str) -> Result<u64, String> {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, id);
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), h, Bytes::from(id.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map(|a| a.sequence).map_err(|e| e.to_string())
    }
}

async fn apply_as_admin(s: &Secured) -> Conn {
    let admin = s.connect("admin").await;
    mtx_subjects::apply::apply(&admin.js, &s.topo)
        .await
        .expect("the admin (setup) credential applies the topology");
    assert!(admin.violations().is_empty(), "{:?}", admin.violations());
    admin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checked_in_auth_conf_is_the_template_rendered_without_prefix() {
    let checked_in = std::fs::read_to_string(repo_root().join("deploy/nats/auth.conf"))
        .expect("deploy/nats/auth.conf");
    assert_eq!(
        checked_in,
        render_auth(""),
        "deploy/nats/auth.conf is stale: run `deploy/nats/render-auth.sh > deploy/nats/auth.conf`"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_users_and_wrong_passwords_are_refused() {
    let s = Secured::start();
    assert!(s.connect_with("provider", "wrong").await.is_err());
    assert!(s.connect_with("nobody", "x").await.is_err());
    assert!(
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(s.nats.url())
            .await
            .is_err(),
        "anonymous connections must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_may_only_publish_raw_signals() {
    let s = Secured::start();
    let admin = apply_as_admin(&s).await;
    let provider = s.connect("provider").await;
    let exec = s.connect("execution").await;

    // Allowed: a raw signal, acknowledged by SIGNALS_RAW.
    let raw = s.subjects.signals_raw(Environment::Staging, "tv").unwrap();
    provider
        .js_publish(&raw, "raw-1")
        .await
        .expect("a provider publishes signals.raw.>");

    // Subscriptions to the pipeline are refused (the server drops them).
    let executions = format!("{}.executions.>", s.prefix);
    let mut exec_sub = provider.client.subscribe(executions.clone()).await.unwrap();
    provider
        .expect_violation(&format!("subscription to \"{executions}\""))
        .await;
    let orders_all = format!("{}.orders.>", s.prefix);
    let mut orders_sub = provider.client.subscribe(orders_all.clone()).await.unwrap();
    provider
        .expect_violation(&format!("subscription to \"{orders_all}\""))
        .await;
    // ... and so is the pipeline's inbox space, where pull requests deliver
    // orders and executions to the workers.
    let mut inbox_sub = provider.client.subscribe("_INBOX.>").await.unwrap();
    provider
        .expect_violation("subscription to \"_inbox.>\"")
        .await;

    // Forbidden publishes: no ack, a violation, nothing stored.
    let order = s.subjects.orders_new("ACC1").unwrap();
    assert!(provider.js_publish(&order, "order-1").await.is_err());
    provider
        .expect_violation(&format!("publish to \"{order}\""))
        .await;
    let fill = s.subjects.executions("ACC1").unwrap();
    provider
        .client
        .publish(fill.clone(), "fill".into())
        .await
        .unwrap();
    provider
        .expect_violation(&format!("publish to \"{fill}\""))
        .await;
    let standardized = s
        .subjects
        .signals_standardized(Environment::Staging, "S1")
        .unwrap();
    assert!(provider.js_publish(&standardized, "std-1").await.is_err());

    // No JetStream API either (here: deleting the orders stream).
    assert!(provider
        .js
        .delete_stream(s.stream(streams::ORDERS))
        .await
        .is_err());
    provider.expect_violation("$js.api.stream.delete").await;

    // The execution pool may write executions; the provider's refused
    // subscriptions see none of it.
    exec.js_publish(&fill, "fill-1")
        .await
        .expect("execution publishes executions.>");
    let exec_order = s.subjects.orders_events("ACC1").unwrap();
    exec.js_publish(&exec_order, "ev-1")
        .await
        .expect("execution publishes orders.*.events");
    for sub in [&mut exec_sub, &mut orders_sub, &mut inbox_sub] {
        let got = tokio::time::timeout(Duration::from_millis(700), sub.next()).await;
        assert!(
            !matches!(got, Ok(Some(_))),
            "a refused subscription received a message"
        );
    }
    assert!(exec.violations().is_empty(), "{:?}", exec.violations());

    // What reached the streams: the raw signal and the execution's own
    // messages, nothing from the provider.
    assert_eq!(
        count(&admin.js, &s.stream(streams::SIGNALS_RAW), ">").await,
        1
    );
    assert_eq!(count(&admin.js, &s.stream(streams::ORDERS), ">").await, 0);
    assert_eq!(
        count(&admin.js, &s.stream(streams::EXECUTIONS), ">").await,
        1
    );
    assert_eq!(
        count(&admin.js, &s.stream(streams::SIGNALS_STANDARDIZED), ">").await,
        0
    );
    assert!(admin.js.get_stream(s.stream(streams::ORDERS)).await.is_ok());

    // The server itself enforced and logged it.
    let server_log = s.nats.log();
    for line in [
        format!("Publish Violation - Subject \"{order}\""),
        format!("Subscription Violation - Subject \"{executions}\""),
    ] {
        assert!(
            server_log.contains(&line),
            "no `{line}` in the server log:\n{server_log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_is_read_only() {
    let s = Secured::start();
    let admin = apply_as_admin(&s).await;
    let ops = s.connect("ops").await;

    // `mtx topology check` works with the read-only credential.
    let drift = mtx_subjects::apply::check(&ops.js, &s.topo)
        .await
        .expect("ops runs `mtx topology check`");
    assert!(drift.is_empty(), "{drift:?}");
    assert!(ops.violations().is_empty(), "{:?}", ops.violations());

    // It watches the pipeline ...
    let fills = format!("{}.executions.>", s.prefix);
    let mut sub = ops.client.subscribe(fills).await.unwrap();
    ops.client.flush().await.unwrap();
    let exec = s.connect("execution").await;
    let fill = s.subjects.executions("ACC1").unwrap();
    exec.js_publish(&fill, "fill-1").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert!(matches!(got, Ok(Some(_))), "ops sees executions");

    // ... but changes nothing.
    assert!(ops
        .js
        .delete_stream(s.stream(streams::ORDERS))
        .await
        .is_err());
    ops.expect_violation("$js.api.stream.delete").await;
    let order = s.subjects.orders_new("ACC1").unwrap();
    assert!(ops.js_publish(&order, "order-1").await.is_err());
    ops.expect_violation(&format!("publish to \"{order}\""))
        .await;
    assert!(admin.js.get_stream(s.stream(streams::ORDERS)).await.is_ok());
    assert_eq!(count(&admin.js, &s.stream(streams::ORDERS), ">").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pool_pulls_its_own_consumers_and_no_other() {
    let s = Secured::start();
    let admin = apply_as_admin(&s).await;
    let mut conns = std::collections::HashMap::new();
    for c in &s.topo.consumers {
        if !conns.contains_key(c.pool) {
            conns.insert(c.pool, s.connect(c.pool).await);
        }
        let conn = &conns[c.pool];
        let consumer: jetstream::consumer::Consumer<pull::Config> = conn
            .js
            .get_stream_no_info(&c.stream)
            .await
            .unwrap()
            .get_consumer(c.durable())
            .await
            .unwrap_or_else(|e| panic!("{} binds {}/{}: {e}", c.pool, c.stream, c.durable()));
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .unwrap_or_else(|e| panic!("{} pulls {}/{}: {e}", c.pool, c.stream, c.durable()));
        while let Some(m) = batch.next().await {
            m.unwrap_or_else(|e| panic!("{} pull {}/{}: {e}", c.pool, c.stream, c.durable()));
        }
        // The runtime's max-deliveries listener: the advisory of its own
        // durable, and the message by stream sequence.
        let advisory = mtx_runtime::dlq::advisory_subject(&c.stream, c.durable());
        let _sub = conn.client.subscribe(advisory).await.unwrap();
        match conn
            .js
            .get_stream_no_info(&c.stream)
            .await
            .unwrap()
            .get_raw_message(1)
            .await
        {
            Ok(_) => {}
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => {}
            Err(e) => panic!("{} reads {} by sequence: {e}", c.pool, c.stream),
        }
    }
    for (pool, conn) in &conns {
        let _ = conn.client.flush().await;
        assert!(
            conn.violations().is_empty(),
            "{pool}: {:?}",
            conn.violations()
        );
    }
    // A pool cannot bind another pool's consumer.
    let cerebro = &conns["cerebro"];
    let raw = s.stream(streams::SIGNALS_RAW);
    assert!(cerebro
        .js
        .get_stream_no_info(&raw)
        .await
        .unwrap()
        .get_consumer::<pull::Config>("standardizer")
        .await
        .is_err());
    cerebro
        .expect_violation(&format!(
            "$js.api.consumer.info.{}.standardizer",
            raw.to_lowercase()
        ))
        .await;
    // ... nor hear its advisories.
    let other = mtx_runtime::dlq::advisory_subject(&raw, "standardizer");
    let _sub = cerebro.client.subscribe(other.clone()).await.unwrap();
    cerebro
        .expect_violation(&format!("subscription to \"{}\"", other.to_lowercase()))
        .await;
    drop(admin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_permissions_match_the_stages() {
    let s = Secured::start();
    let admin = apply_as_admin(&s).await;
    let bucket = |b: &str| s.topo.bucket(b).unwrap().to_string();
    // Setup writes a strategy configuration.
    let strategies = admin
        .js
        .get_key_value(bucket(buckets::STRATEGIES))
        .await
        .unwrap();
    strategies
        .put("S1", Bytes::from_static(b"{}"))
        .await
        .unwrap();

    // standardizer: reads strategies, publishes each standardized signal on
    // its own subject, stored only if new (a second copy is refused).
    let std = s.connect("standardizer").await;
    let kv = std
        .js
        .get_key_value(bucket(buckets::STRATEGIES))
        .await
        .unwrap();
    assert!(kv.get("S1").await.unwrap().is_some());
    let once = s
        .subjects
        .signal_standardized(Environment::Staging, "S1", "sig-1")
        .unwrap();
    let only_if_new = || {
        let mut h = async_nats::HeaderMap::new();
        h.insert(mtx_schemas::headers::EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        h
    };
    std.js
        .publish_with_headers(once.clone(), only_if_new(), Bytes::from_static(b"{}"))
        .await
        .unwrap()
        .await
        .expect("the standardizer publishes standardized signals");
    let again = std
        .js
        .publish_with_headers(once, only_if_new(), Bytes::from_static(b"{}"))
        .await
        .unwrap()
        .await;
    assert_eq!(
        again.map_err(|e| e.kind()).err(),
        Some(async_nats::jetstream::context::PublishErrorKind::WrongLastSequence)
    );
    assert!(std.violations().is_empty(), "{:?}", std.violations());
    // ... but cannot change strategy configurations.
    assert!(kv
        .put("S1", Bytes::from_static(b"{\"evil\":1}"))
        .await
        .is_err());
    std.expect_violation("publish to \"$kv.").await;

    // cerebro: reads allocations / system, reserves margin in account_state.
    let cer = s.connect("cerebro").await;
    let acct = cer
        .js
        .get_key_value(bucket(buckets::ACCOUNT_STATE))
        .await
        .unwrap();
    acct.put("ACC1", Bytes::from_static(b"{}")).await.unwrap();
    let system = cer.js.get_key_value(bucket(buckets::SYSTEM)).await.unwrap();
    assert!(system.get("kill_switch").await.unwrap().is_none());
    // Cerebro reads a batch's entry and exit records in one batched get.
    let got = last_messages(
        &cer.client,
        &acct.stream_name,
        &[format!("{}ACC1", acct.prefix)],
        Duration::from_secs(3),
    )
    .await
    .expect("cerebro reads account_state keys in a batch");
    assert_eq!(got.len(), 1);
    assert!(cer.violations().is_empty(), "{:?}", cer.violations());

    // execution may read the kill switch but not write account state.
    let exe = s.connect("execution").await;
    let sys = exe.js.get_key_value(bucket(buckets::SYSTEM)).await.unwrap();
    assert!(sys.get("kill_switch").await.unwrap().is_none());
    // ... and writes its own state, whose `fin.` keys it reads in batches.
    let state = exe
        .js
        .get_key_value(bucket(buckets::EXECUTION_STATE))
        .await
        .unwrap();
    state
        .put("fin.o1", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let got = last_messages(
        &exe.client,
        &state.stream_name,
        &[
            format!("{}fin.o1", state.prefix),
            format!("{}fin.o2", state.prefix),
        ],
        Duration::from_secs(3),
    )
    .await
    .expect("execution reads its fin. keys in a batch");
    assert_eq!(got.len(), 1);
    assert!(exe.violations().is_empty(), "{:?}", exe.violations());
    assert!(exe
        .js
        .get_key_value(bucket(buckets::ACCOUNT_STATE))
        .await
        .is_err());
    exe.expect_violation("$js.api.stream.info.kv_").await;
}

/// Kills the worker process when the test ends, also when an assertion fails.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_echo_worker(s: &Secured, role: &str, log: &std::path::Path) -> (KillOnDrop, String) {
    let err = std::fs::File::create(log).unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_echo_worker"))
            .env("MTX_NATS__URL", s.nats.url())
            .env("MTX_NATS__USER", role)
            .env("MTX_NATS__PASSWORD", password(role))
            .env("MTX_TOPOLOGY__PREFIX", &s.prefix)
            .env("MTX_METRICS__ADDR", "127.0.0.1:0")
            .env("MTX_WORKER__BATCH_SIZE", "16")
            .env("MTX_WORKER__HEARTBEAT_MS", "500")
            .env("MTX_WORKER__PULL_EXPIRES_MS", "2000")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn echo_worker"),
    );
    // The fixture prints `ops <addr>` once its endpoints are up.
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("ops ") {
                let _ = tx.send(a.to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| {
            panic!(
                "echo_worker did not start; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_runs_end_to_end_with_role_credentials() {
    let s = Secured::start();
    let admin = apply_as_admin(&s).await;
    let dir = tempfile::tempdir().unwrap();
    let (worker, ops_addr) = spawn_echo_worker(&s, "standardizer", &dir.path().join("w.log"));

    let provider = s.connect("provider").await;
    let raw = s.subjects.signals_raw(Environment::Staging, "tv").unwrap();
    let n = 40;
    for i in 0..n {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, format!("raw-{i}").as_str());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        h.insert(headers::RECEIVED_AT, now.to_string().as_str());
        provider
            .js
            .publish_with_headers(raw.clone(), h, Bytes::from(format!("signal {i}")))
            .await
            .unwrap()
            .await
            .expect("provider publish acked");
    }

    let audit = s.stream(streams::AUDIT);
    let echo = s.subjects.audit("echo").unwrap();
    let done = eventually(Duration::from_secs(30), || async {
        count(&admin.js, &audit, &echo).await == n
    })
    .await;
    let log = || std::fs::read_to_string(dir.path().join("w.log")).unwrap_or_default();
    assert!(done, "{n} echoes expected; worker log:\n{}", log());

    // Every delivery was acknowledged (acks are permitted), none is pending.
    let raw_stream = s.stream(streams::SIGNALS_RAW);
    assert!(
        eventually(Duration::from_secs(10), || async {
            let st = admin.js.get_stream(&raw_stream).await.unwrap();
            let i = st.consumer_info("standardizer").await.unwrap();
            i.num_pending == 0 && i.num_ack_pending == 0 && i.num_redelivered == 0
        })
        .await,
        "standardizer consumer still has pending / unacked / redelivered messages"
    );

    // The worker is ready and connected with its role credential.
    let http = reqwest::Client::new();
    let ready = http
        .get(format!("http://{ops_addr}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        ready.status(),
        200,
        "{}",
        ready.text().await.unwrap_or_default()
    );
    let metrics = http
        .get(format!("http://{ops_addr}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "mtx_nats_connected 1".to_string(),
        format!("mtx_messages_processed_total{{consumer=\"standardizer\",outcome=\"ok\",stage=\"echo\"}} {n}"),
    ] {
        assert!(metrics.contains(&line), "missing `{line}` in\n{metrics}");
    }
    assert!(
        metrics.contains("mtx_messages_processed_total{consumer=\"standardizer\",outcome=\"dlq\",stage=\"echo\"} 0"),
        "{metrics}"
    );

    drop(worker);
    // Not one permission violation on the whole run (the server logs them as
    // `Publish Violation` / `Subscription Violation`, the client as
    // `permissions violation`).
    let server_log = s.nats.log();
    assert!(
        !server_log.to_lowercase().contains("violation"),
        "server log has permission violations:\n{server_log}"
    );
    assert!(
        provider.violations().is_empty(),
        "{:?}",
        provider.violations()
    );
    assert!(!log().to_lowercase().contains("violation"), "{}", log());
}
