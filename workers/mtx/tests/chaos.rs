//! The chaos suite: the pipeline as separate OS processes (`mtx run <pool>`
//! per pool) against a real nats-server and the Mongo-compatible server; a
//! few thousand synthetic signals (entries, exits, pairs, and deliberately
//! malformed ones); one fault injected mid-stream; then, once every consumer
//! is quiet, the ledger is checked:
//!
//! - every valid signal has exactly one standardized signal and exactly one
//!   decision, and every approved leg exactly one order;
//! - no order is filled twice and no fill exceeds its order;
//! - every collection holds exactly one document per natural key, as many as
//!   the streams hold;
//! - each account's live state equals a replay of the EXECUTIONS stream;
//! - the DLQ holds exactly the deliberately bad inputs, one dead letter per
//!   copy the raw stream stored (a re-publication after the dedupe window is
//!   a new message, so it gets its own dead letter).
//!
//! The replicas test also runs every pool as its own NATS role
//! (`deploy/nats/auth.conf.tmpl`: setup as `admin`, the load as `provider`)
//! and fails on any permission violation the server logs.

use async_nats::jetstream::{self, consumer::PullConsumer};
use mongodb::bson::{doc, Document};
use mtx_harness::{unique, MongoServer, NatsServer};
use mtx_load::{Expect, LoadSignal, LoadSpec, Pace};
use mtx_runtime::config::Config;
use mtx_schemas::order::{AccountState, ExecutionConfirmation, Order};
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::Environment;
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Strategy → account routing of the load.
const ROUTES: &[(&str, &str)] = &[
    ("Chaos_S1", "ACC_A"),
    ("Chaos_S2", "ACC_B"),
    ("Chaos_S3", "ACC_A"),
    ("Chaos_S4", "ACC_B"),
];

/// The pools, in data-flow order.
const POOLS: &[&str] = &["standardizer", "cerebro", "execution", "accounts", "sink"];

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Opts {
    /// Extra fields in nats-server's `jetstream {}` block.
    js_fields: &'static str,
    /// `topology.duplicate_window_secs`.
    duplicate_window_secs: Option<u64>,
    /// Replicas per pool (default 1).
    replicas: BTreeMap<&'static str, usize>,
    /// nats-server with the role users of `deploy/nats/auth.conf.tmpl`:
    /// every pool runs as its own role, setup as `admin`, the load as
    /// `provider`; the test's own checks use an unrestricted observer.
    role_credentials: bool,
}

/// The chaos tests run one at a time. Each spawns a dozen worker processes,
/// a nats-server and a Mongo stand-in; two at once on a 2-core CI machine
/// starved the stand-ins until the sink's writes outlasted their operation
/// limit and its retries backed off past the quiescence deadline. Alone,
/// each finishes well inside it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test's own unrestricted NATS user under `role_credentials`.
const OBSERVER: &str = "observer";

struct Cluster {
    nats: NatsServer,
    mongo: MongoServer,
    _dir: tempfile::TempDir,
    config: PathBuf,
    cfg: Config,
    topo: Topology,
    js: jetstream::Context,
    procs: BTreeMap<&'static str, Vec<Proc>>,
    trading: String,
    /// Under `role_credentials`: the load's connection (`provider`).
    provider: Option<jetstream::Context>,
    role_credentials: bool,
    /// Held for the test's whole life (dropped last, after every process
    /// and server): see [`SERIAL`].
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// `MTX_NATS__USER` / `MTX_NATS__PASSWORD` for `role` on `cmd`.
fn as_role(cmd: &mut Command, role: &str) {
    cmd.env("MTX_NATS__USER", role)
        .env("MTX_NATS__PASSWORD", mtx_harness::nats_auth::password(role));
}

impl Cluster {
    async fn start(opts: Opts) -> Cluster {
        // (A tokio mutex: no poisoning, a failed test frees it for the next.)
        let serial = SERIAL.lock().await;
        let prefix = unique("x");
        let auth = if opts.role_credentials {
            mtx_harness::nats_auth::config(&prefix, Some(OBSERVER))
        } else {
            String::new()
        };
        let nats = NatsServer::start_with(&auth, opts.js_fields);
        let mongo = MongoServer::start();
        let dir = tempfile::tempdir().unwrap();
        let trading = unique("trading");
        let mut balances = String::new();
        for (_, acct) in ROUTES {
            if !balances.contains(acct) {
                balances.push_str(&format!("{acct} = \"10000000\"\n"));
            }
        }
        let window = opts
            .duplicate_window_secs
            .map(|s| format!("duplicate_window_secs = {s}\n"))
            .unwrap_or_default();
        let config = dir.path().join("mtx.toml");
        std::fs::write(
            &config,
            format!(
                r#"
[nats]
url = "{nats}"
[mongo]
uri = "{mongo}"
trading_db = "{trading}"
bot_core_db = "{core}"
[metrics]
addr = "127.0.0.1:0"
[topology]
prefix = "{prefix}"
ack_wait_secs = 5
{window}
[worker]
heartbeat_ms = 500
pull_expires_ms = 2000
shutdown_grace_secs = 5
[accounts]
publish_interval_secs = 2
# The stand-in is single-threaded: under a dozen processes' load a sink
# write can outlast the default limit (10 s with this ack wait), and its
# retries back off past the quiescence deadline.
[sink]
op_timeout_secs = 60
[accounts.initial_balances]
{balances}
"#,
                nats = nats.url(),
                mongo = mongo.uri(),
                core = unique("core"),
            ),
        )
        .unwrap();
        let cfg = Config::load(Some(&config)).unwrap();
        let topo = Topology::build(&cfg.topology);
        for args in [&["db", "migrate"][..], &["topology", "apply"][..]] {
            let mut cmd = mtx(&config);
            if opts.role_credentials {
                as_role(&mut cmd, "admin");
            }
            let out = cmd.args(args).output().unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let (client, provider) = if opts.role_credentials {
            let observer = async_nats::ConnectOptions::with_user_and_password(
                OBSERVER.into(),
                OBSERVER.into(),
            )
            .connect(nats.url())
            .await
            .unwrap();
            let provider = async_nats::ConnectOptions::with_user_and_password(
                "provider".into(),
                mtx_harness::nats_auth::password("provider"),
            )
            .custom_inbox_prefix("_INBOX_providers")
            .connect(nats.url())
            .await
            .unwrap();
            (observer, Some(jetstream::new(provider)))
        } else {
            (async_nats::connect(nats.url()).await.unwrap(), None)
        };
        let js = jetstream::new(client);
        let strategies = js
            .get_key_value(topo.bucket(buckets::STRATEGIES).unwrap())
            .await
            .unwrap();
        let mut alloc = serde_json::Map::new();
        for (id, acct) in ROUTES {
            let mut s = StrategyConfig::new(*id);
            s.account = Some(acct.to_string());
            s.expected_alpha = Some(Decimal::new(5, 2));
            strategies
                .put(
                    StrategyConfig::kv_key(id),
                    serde_json::to_vec(&s).unwrap().into(),
                )
                .await
                .unwrap();
            alloc.insert(id.to_string(), Value::String("25".into()));
        }
        js.get_key_value(topo.bucket(buckets::ALLOCATIONS).unwrap())
            .await
            .unwrap()
            .put(
                "active",
                serde_json::to_vec(&serde_json::json!({
                    "allocation_id": "chaos", "allocations": alloc
                }))
                .unwrap()
                .into(),
            )
            .await
            .unwrap();
        let mut c = Cluster {
            nats,
            mongo,
            _dir: dir,
            config,
            cfg,
            topo,
            js,
            procs: BTreeMap::new(),
            trading,
            provider,
            role_credentials: opts.role_credentials,
            _serial: serial,
        };
        for pool in POOLS {
            for _ in 0..opts.replicas.get(pool).copied().unwrap_or(1) {
                c.spawn(pool);
            }
        }
        // Cerebro sizes against the accounts' first published state.
        let states =
            c.js.get_key_value(c.topo.bucket(buckets::ACCOUNT_STATE).unwrap())
                .await
                .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        for (_, acct) in ROUTES {
            while states.get(*acct).await.ok().flatten().is_none() {
                assert!(Instant::now() < deadline, "no state for {acct}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        c
    }

    fn spawn(&mut self, pool: &'static str) {
        let mut cmd = mtx(&self.config);
        if self.role_credentials {
            as_role(&mut cmd, pool);
        }
        let child = cmd
            .args(["run", pool])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        self.procs.entry(pool).or_default().push(Proc(child));
    }

    /// SIGKILL every replica of `pool` (no chance to ack or flush).
    fn kill9(&mut self, pool: &'static str) -> usize {
        let procs = self.procs.remove(pool).unwrap_or_default();
        let n = procs.len();
        for mut p in procs {
            unsafe {
                libc::kill(p.0.id() as i32, libc::SIGKILL);
            }
            let _ = p.0.wait();
        }
        n
    }

    fn generate(&self, n: usize, tag: &str) -> Vec<LoadSignal> {
        let mut spec = LoadSpec::new(
            n,
            ROUTES.iter().map(|(s, _)| s.to_string()).collect(),
            unique(tag),
        );
        spec.bad_every = Some(50);
        spec.sender_equity = 250_000;
        mtx_load::generate(&spec, &Subjects::new(&self.cfg.topology.prefix)).unwrap()
    }

    async fn publish(&self, signals: &[LoadSignal], rate: f64) {
        mtx_load::publish(
            self.provider.as_ref().unwrap_or(&self.js),
            Environment::Staging,
            signals,
            Pace::Rate(rate),
            Duration::from_secs(60),
            |_| {},
        )
        .await
        .unwrap();
    }

    /// Every durable consumer drained and acked, twice in a row.
    async fn quiesce(&self) {
        let t0 = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(150);
        let mut calm = 0;
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut busy = Vec::new();
            for c in &self.topo.consumers {
                let info = async {
                    let s = self.js.get_stream(&c.stream).await.ok()?;
                    let mut k: PullConsumer = s.get_consumer(c.durable()).await.ok()?;
                    k.info().await.ok().cloned()
                }
                .await;
                match info {
                    Some(i) if i.num_pending == 0 && i.num_ack_pending == 0 => {}
                    Some(i) => busy.push(format!(
                        "{} {}/{}",
                        c.durable(),
                        i.num_pending,
                        i.num_ack_pending
                    )),
                    None => busy.push(format!("{} unreachable", c.durable())),
                }
            }
            if busy.is_empty() {
                calm += 1;
                if calm == 3 {
                    eprintln!("quiet after {:?}", t0.elapsed());
                    return;
                }
            } else {
                calm = 0;
                last = busy.join(", ");
                if t0.elapsed().as_secs().is_multiple_of(5) {
                    eprintln!("{:?} busy: {last}", t0.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        panic!("pipeline never went quiet: {last}");
    }

    async fn read(&self, base: &str) -> Vec<(String, Value)> {
        mtx_harness::bus::read_all(&self.js, &self.topo.stream_name(base), ">")
            .await
            .into_iter()
            .map(|m| {
                (
                    m.subject.to_string(),
                    serde_json::from_slice(&m.payload).unwrap(),
                )
            })
            .collect()
    }

    /// The ledger checks of the module doc, for `signals` (everything the
    /// load published, possibly several times).
    async fn check_ledger(&self, signals: &[LoadSignal]) {
        let valid: BTreeSet<&str> = signals
            .iter()
            .filter(|s| s.expect != Expect::Bad)
            .map(|s| s.signal_id.as_str())
            .collect();
        let bad: BTreeSet<&str> = signals
            .iter()
            .filter(|s| s.expect == Expect::Bad)
            .map(|s| s.signal_id.as_str())
            .collect();

        let standardized = self.read(streams::SIGNALS_STANDARDIZED).await;
        let mut std_ids = BTreeSet::new();
        for (_, v) in &standardized {
            let id = v["signal_id"].as_str().unwrap();
            assert!(std_ids.insert(id.to_string()), "{id} standardized twice");
        }
        assert_eq!(
            std_ids,
            valid.iter().map(|s| s.to_string()).collect(),
            "one standardized signal per valid signal"
        );

        let decisions = self.read(streams::CEREBRO_DECISIONS).await;
        let mut decision_of: BTreeMap<String, Value> = BTreeMap::new();
        for (_, v) in decisions {
            let id = v["signal_id"].as_str().unwrap().to_string();
            assert!(
                decision_of.insert(id.clone(), v).is_none(),
                "{id} decided twice"
            );
        }
        assert_eq!(
            decision_of.keys().cloned().collect::<BTreeSet<_>>(),
            std_ids,
            "one decision per standardized signal"
        );

        let orders: Vec<Order> = self
            .read(streams::ORDERS)
            .await
            .into_iter()
            .filter(|(s, _)| s.ends_with(".new"))
            .map(|(_, v)| serde_json::from_value(v).unwrap())
            .collect();
        let mut order_ids = BTreeMap::new();
        for o in &orders {
            assert!(
                order_ids.insert(o.order_id.clone(), o).is_none(),
                "order {} twice",
                o.order_id
            );
            let d = &decision_of[&o.signal_id];
            assert_ne!(d["decision"], "REJECTED", "order of a rejected signal");
        }
        let mut outcome = BTreeMap::<String, usize>::new();
        for (id, d) in &decision_of {
            *outcome
                .entry(format!(
                    "{} {}",
                    d["decision"].as_str().unwrap(),
                    d["reason_code"].as_str().unwrap_or("")
                ))
                .or_default() += 1;
            if d["decision"] != "REJECTED" {
                // A MODIFIED exit may leave a leg with nothing open to close
                // (final quantity 0): only legs with a quantity trade.
                let legs = d["legs"]
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .filter(|x| x["final_quantity"].as_str().is_some_and(|q| q != "0"))
                            .count()
                    })
                    .unwrap_or(0);
                let n = orders.iter().filter(|o| &o.signal_id == id).count();
                assert_eq!(n, legs, "orders of {id}: {d}");
            }
        }
        eprintln!("decisions: {outcome:?}");
        let approved = outcome
            .iter()
            .filter(|(k, _)| !k.starts_with("REJECTED"))
            .map(|(_, n)| n)
            .sum::<usize>();
        assert!(
            approved * 2 > valid.len(),
            "most signals should trade: {outcome:?}"
        );

        let executions: Vec<ExecutionConfirmation> = self
            .read(streams::EXECUTIONS)
            .await
            .into_iter()
            .map(|(_, v)| serde_json::from_value(v).unwrap())
            .collect();
        let mut exec_ids = BTreeSet::new();
        let mut filled = BTreeMap::<&str, Decimal>::new();
        for x in &executions {
            assert!(exec_ids.insert(&x.execution_id), "execution twice");
            *filled.entry(x.order_id.as_str()).or_default() += x.quantity;
        }
        for (id, q) in &filled {
            let o = order_ids
                .get(*id)
                .unwrap_or_else(|| panic!("fill of unknown order {id}"));
            assert!(
                *q <= o.quantity,
                "order {id} overfilled: {q} > {}",
                o.quantity
            );
            assert_eq!(*q, o.quantity, "MARKET order {id} not filled completely");
        }
        assert_eq!(filled.len(), orders.len(), "every order filled once");

        // DLQ: exactly the bad inputs, from the standardizer, one dead letter
        // per copy of a bad input the raw stream holds (a copy published
        // again after the dedupe window is a new message and gets its own
        // dead letter; one inside the window was never stored).
        let raw_copies = {
            let raw = mtx_harness::bus::read_all(
                &self.js,
                &self.topo.stream_name(streams::SIGNALS_RAW),
                ">",
            )
            .await;
            let mut n = BTreeMap::<String, usize>::new();
            for m in &raw {
                if let Some(sid) = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(mtx_schemas::headers::SIGNAL_ID))
                {
                    if bad.contains(sid.as_str()) {
                        *n.entry(sid.to_string()).or_default() += 1;
                    }
                }
            }
            n
        };
        let dlq =
            mtx_harness::bus::read_all(&self.js, &self.topo.stream_name(streams::DLQ), ">").await;
        let mut dead = BTreeMap::<String, usize>::new();
        for m in &dlq {
            let h = m.headers.clone().unwrap_or_default();
            let sid = h
                .get(mtx_schemas::headers::SIGNAL_ID)
                .map(|v| v.to_string())
                .unwrap_or_default();
            assert!(
                m.subject.ends_with(".standardizer") && bad.contains(sid.as_str()),
                "unexpected dead letter on {}: {:?} {}",
                m.subject,
                h,
                String::from_utf8_lossy(&m.payload)
            );
            *dead.entry(sid).or_default() += 1;
        }
        assert_eq!(
            dead.len(),
            bad.len(),
            "every bad input dead-lettered: {dead:?}"
        );
        assert_eq!(
            dead, raw_copies,
            "one dead letter per stored copy of a bad input"
        );
        // Under role credentials, not one permission violation on the run
        // (nats-server logs each as `Publish Violation` / `Subscription
        // Violation`).
        if self.role_credentials {
            let log = self.nats.log();
            let violations: Vec<&str> = log
                .lines()
                .filter(|l| l.to_lowercase().contains("violation"))
                .collect();
            assert!(
                violations.is_empty(),
                "permission violations:\n{}",
                violations.join("\n")
            );
        }

        // Live account state equals a replay of the executions.
        let (book, refused) = mtx_accounts::worker::rebuild(
            &self.js,
            &self.topo,
            mtx_accounts::worker::ledger_config(&self.cfg.accounts),
        )
        .await
        .unwrap();
        assert_eq!(refused, 0);
        let states = self
            .js
            .get_key_value(self.topo.bucket(buckets::ACCOUNT_STATE).unwrap())
            .await
            .unwrap();
        for acct in ROUTES.iter().map(|(_, a)| *a).collect::<BTreeSet<_>>() {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let e = states.get(acct).await.unwrap().unwrap();
                let live: AccountState = serde_json::from_slice(&e).unwrap();
                let replay = book.snapshot(acct, live.timestamp);
                if replay == live {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{acct}: live state differs from the replay:\nlive {live:#?}\nreplay {replay:#?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }

        // Mongo: one document per natural key, as many as the streams hold.
        let raw_msgs = self.read(streams::SIGNALS_RAW).await.len();
        let expect: Vec<(&str, &str, usize)> = vec![
            ("raw_signals", "raw_signal_id", raw_msgs),
            ("standardized_signals", "signal_id", std_ids.len()),
            ("cerebro_decisions", "signal_id", decision_of.len()),
            ("trading_orders", "order_id", orders.len()),
            ("execution_confirmations", "execution_id", executions.len()),
            ("dead_letters", "dead_letter_id", dlq.len()),
        ];
        let m = mongodb::Client::with_uri_str(self.mongo.uri())
            .await
            .unwrap();
        let db = m.database(&self.trading);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut wrong = Vec::new();
            for (coll, key, want) in &expect {
                let c = db.collection::<Document>(coll);
                let n = c.count_documents(doc! {}).await.unwrap_or(0) as usize;
                let distinct = c
                    .distinct(*key, doc! {})
                    .await
                    .map(|v| v.len())
                    .unwrap_or(0);
                assert_eq!(n, distinct, "{coll}: duplicate {key}");
                assert!(n <= *want, "{coll}: {n} documents > {want} messages");
                if n != *want {
                    wrong.push(format!("{coll} {n}/{want}"));
                }
            }
            if wrong.is_empty() {
                break;
            }
            eprintln!("sink: {}", wrong.join(", "));
            assert!(
                Instant::now() < deadline,
                "sink never caught up: {}",
                wrong.join(", ")
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

fn mtx(config: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mtx"));
    // `CHAOS_LOG` (a `tracing` filter) shows the workers' logs on stderr.
    let level = std::env::var("CHAOS_LOG").unwrap_or_else(|_| "error".into());
    c.arg("--config").arg(config).env("MTX_LOG__LEVEL", level);
    c
}

/// Signals per test: `CHAOS_SIGNALS` (default 1,000, a few per cent of them
/// malformed; the duplicate storm publishes each three times).
fn n() -> usize {
    std::env::var("CHAOS_SIGNALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_each_stage_in_turn_mid_stream() {
    let mut c = Cluster::start(Opts::default()).await;
    let signals = c.generate(n(), "k9");
    let load = {
        let js = c.js.clone();
        let signals = signals.clone();
        tokio::spawn(async move {
            mtx_load::publish(
                &js,
                Environment::Staging,
                &signals,
                Pace::Rate(150.0),
                Duration::from_secs(60),
                |_| {},
            )
            .await
            .unwrap();
        })
    };
    for pool in POOLS {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(c.kill9(pool), 1, "{pool}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        c.spawn(pool);
    }
    load.await.unwrap();
    c.quiesce().await;
    c.check_ledger(&signals).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_nats_server_mid_stream() {
    let mut c = Cluster::start(Opts {
        js_fields: "sync_interval: always",
        ..Opts::default()
    })
    .await;
    let signals = c.generate(n(), "kn");
    let (first, second) = signals.split_at(signals.len() / 2);
    c.publish(first, 500.0).await;
    // Whatever was acked before the kill is on disk (sync_interval: always).
    c.nats.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.nats.restart();
    c.publish(second, 500.0).await;
    c.quiesce().await;
    c.check_ledger(&signals).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_stopped_20s_mid_stream() {
    let mut c = Cluster::start(Opts::default()).await;
    let signals = c.generate(n(), "mg");
    let (first, second) = signals.split_at(signals.len() / 2);
    c.publish(first, 500.0).await;
    c.mongo.stop();
    c.publish(second, 500.0).await;
    tokio::time::sleep(Duration::from_secs(16)).await;
    c.mongo.restart();
    c.quiesce().await;
    c.check_ledger(&signals).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_storm_three_times_some_after_the_window() {
    let c = Cluster::start(Opts {
        duplicate_window_secs: Some(2),
        ..Opts::default()
    })
    .await;
    let signals = c.generate(n(), "dup");
    // Twice inside the JetStream window, a third time after it: only the
    // standardizer's own dedupe can stop the third copy.
    c.publish(&signals, 1000.0).await;
    c.publish(&signals, 2000.0).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    c.publish(&signals, 2000.0).await;
    c.quiesce().await;
    c.check_ledger(&signals).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_of_standardizer_cerebro_and_sink() {
    let c = Cluster::start(Opts {
        replicas: [("standardizer", 2), ("cerebro", 3), ("sink", 2)]
            .into_iter()
            .collect(),
        // Every pool with its own role's NATS credentials, as deployed.
        role_credentials: true,
        ..Opts::default()
    })
    .await;
    let signals = c.generate(n(), "rep");
    c.publish(&signals, 1000.0).await;
    c.quiesce().await;
    c.check_ledger(&signals).await;
}
