//! The portfolio commands through the real `mtx` binary, against a real
//! nats-server and the Mongo-compatible server (migrated with `mtx db
//! migrate`, so every document passes the collections' validators):
//! `mtx backtest ingest`, `mtx strategies load|set|show`, `mtx optimize`,
//! `mtx allocations approve|edit`, and end to end with `mtx run cerebro`
//! resizing signals when a new allocation is approved, without a restart.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bson::{doc, Bson, Document};
use chrono::{NaiveDate, Utc};
use futures::TryStreamExt;
use mtx_cerebro::{ActiveAllocation, DecisionRecord};
use mtx_harness::{bus, unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_schemas::ids::derive_id;
use mtx_schemas::order::{account_state_key, Order};
use mtx_schemas::signal::{ContentFormat, StandardizedSignal};
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::{headers, Environment, SizingMode};
use mtx_standardizer::{parse_raw, standardize, strip_secret, ParseContext, StrategyInfo};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use serde_json::Value;

const ACCOUNT: &str = "IBKR_Main";
const SPX: &str = "SPX_1-D_Opt";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn backtests() -> PathBuf {
    fixtures().join("backtests")
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Servers, a config file with a fresh topology prefix and databases, the
/// topology applied and the databases migrated.
struct Env {
    nats: NatsServer,
    _mongo: MongoServer,
    dir: tempfile::TempDir,
    config: PathBuf,
    cfg: Config,
    db: mongodb::Database,
}

impl Env {
    async fn new() -> Env {
        let nats = NatsServer::start();
        let mongo = MongoServer::start();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("mtx.toml");
        std::fs::write(
            &config,
            format!(
                "[nats]\nurl = \"{}\"\n[mongo]\nuri = \"{}\"\ntrading_db = \"{}\"\nbot_core_db = \"{}\"\n\
                 [metrics]\naddr = \"127.0.0.1:0\"\n[topology]\nprefix = \"{}\"\n\
                 [worker]\nheartbeat_ms = 500\npull_expires_ms = 2000\npublish_retry_delay_ms = 200\n",
                nats.url(),
                mongo.uri(),
                unique("trading"),
                unique("core"),
                unique("p"),
            ),
        )
        .unwrap();
        let cfg = Config::load(Some(&config)).unwrap();
        let client = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
        let db = client.database(&cfg.mongo.trading_db);
        let env = Env {
            nats,
            _mongo: mongo,
            dir,
            config,
            cfg,
            db,
        };
        env.ok(&["topology", "apply"]);
        env.ok(&["db", "migrate"]);
        env
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mtx"));
        c.arg("--config")
            .arg(&self.config)
            .env("MTX_LOG__LEVEL", "warn")
            .current_dir(self.dir.path());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run mtx")
    }

    /// Run and require success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "mtx {args:?} failed ({}):\n{}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    fn coll(&self, name: &str) -> mongodb::Collection<Document> {
        self.db.collection(name)
    }

    async fn docs(&self, name: &str, filter: Document) -> Vec<Document> {
        self.coll(name)
            .find(filter)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap()
    }

    async fn one(&self, name: &str, filter: Document) -> Document {
        self.coll(name)
            .find_one(filter.clone())
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no {name} document matching {filter}"))
    }

    fn topo(&self) -> Topology {
        Topology::build(&self.cfg.topology)
    }

    async fn js(&self) -> jetstream::Context {
        jetstream::new(async_nats::connect(self.nats.url()).await.unwrap())
    }

    async fn bucket(&self, base: &str) -> kv::Store {
        let name = self.topo().bucket(base).unwrap().to_string();
        self.js().await.get_key_value(name).await.unwrap()
    }

    fn ingest_fixtures(&self) -> String {
        self.ok(&["backtest", "ingest", backtests().to_str().unwrap()])
    }

    fn load_strategies(&self) -> String {
        self.ok(&[
            "strategies",
            "load",
            fixtures().join("strategies.json").to_str().unwrap(),
        ])
    }
}

fn dates_of(doc: &Document, key: &str) -> Vec<NaiveDate> {
    doc.get_array(key)
        .unwrap()
        .iter()
        .map(|b| match b {
            Bson::DateTime(t) => t.to_chrono().date_naive(),
            other => panic!("{key} holds {other}"),
        })
        .collect()
}

fn f64s(doc: &Document, key: &str) -> Vec<f64> {
    doc.get_array(key)
        .unwrap()
        .iter()
        .map(|b| match b {
            Bson::Double(x) => *x,
            other => panic!("{key} holds {other}"),
        })
        .collect()
}

fn dec(b: &Bson) -> Decimal {
    match b {
        Bson::Decimal128(x) => {
            let s = x.to_string();
            Decimal::from_str(&s)
                .or_else(|_| Decimal::from_scientific(&s))
                .unwrap()
        }
        other => panic!("{other} is not a Decimal128"),
    }
}

fn pcts(doc: &Document, key: &str) -> BTreeMap<String, Decimal> {
    doc.get_document(key)
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), dec(v)))
        .collect()
}

/// An independent reading of a fixture CSV (`Date,Daily Returns (%)`).
fn read_csv(path: &Path) -> Vec<(NaiveDate, f64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows: Vec<(NaiveDate, f64)> = text
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (date, pct) = l.split_once(',').unwrap();
            (
                NaiveDate::parse_from_str(date.trim(), "%Y-%m-%d").unwrap(),
                pct.trim().parse::<f64>().unwrap() / 100.0,
            )
        })
        .collect();
    rows.sort_by_key(|r| r.0);
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_stores_nine_sorted_series_and_reingest_bumps_updated_at() {
    let env = Env::new().await;
    // The migrated validators are enforced, so everything below passed them.
    assert!(env
        .coll("strategy_backtest_data")
        .insert_one(doc! { "strategy_id": 5 })
        .await
        .is_err());
    let out = env.ingest_fixtures();
    assert!(out.contains("ingested 9 strategies"), "{out}");
    let docs = env.docs("strategy_backtest_data", doc! {}).await;
    assert_eq!(docs.len(), 9);
    for doc in &docs {
        let id = doc.get_str("strategy_id").unwrap();
        let dates = dates_of(doc, "dates");
        let returns = f64s(doc, "daily_returns");
        assert_eq!(dates.len(), returns.len(), "{id}");
        assert!(dates.windows(2).all(|w| w[0] < w[1]), "{id}: not sorted");
        let period = doc.get_document("backtest_period").unwrap();
        let start = match period.get("start_date") {
            Some(Bson::DateTime(t)) => t.to_chrono().date_naive(),
            other => panic!("{other:?}"),
        };
        assert_eq!(start, dates[0]);
        assert_eq!(period.get_i64("total_days").unwrap(), dates.len() as i64);
        // The series is the CSV, divided by 100, oldest first.
        let csv = read_csv(&backtests().join(format!("{id}.csv")));
        assert_eq!(
            csv.iter().map(|r| r.0).collect::<Vec<_>>(),
            dates,
            "{id}: dates"
        );
        assert_eq!(
            csv.iter().map(|r| r.1).collect::<Vec<_>>(),
            returns,
            "{id}: returns"
        );
        assert!(matches!(doc.get("created_at"), Some(Bson::DateTime(_))));
    }

    // Sharpe and max drawdown of SPY recomputed independently.
    let spy = env
        .one("strategy_backtest_data", doc! { "strategy_id": "SPY" })
        .await;
    let r: Vec<f64> = read_csv(&backtests().join("SPY.csv"))
        .into_iter()
        .map(|x| x.1)
        .collect();
    let n = r.len() as f64;
    let mean = r.iter().sum::<f64>() / n;
    let sd = (r.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
    let (mut equity, mut peak, mut mdd) = (1.0f64, 1.0f64, 0.0f64);
    for x in &r {
        equity *= 1.0 + x;
        peak = peak.max(equity);
        mdd = mdd.max(1.0 - equity / peak);
    }
    let wins = r.iter().filter(|x| **x > 0.0).count() as f64 / n;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1e-12);
    assert!(close(spy.get_f64("mean_return_daily").unwrap(), mean));
    assert!(close(spy.get_f64("volatility_daily").unwrap(), sd));
    assert!(close(spy.get_f64("sharpe_ratio").unwrap(), mean / sd));
    // Percentages as the seed writes them (34.1 = 34.1 %).
    assert!(close(spy.get_f64("max_drawdown").unwrap(), 100.0 * mdd));
    assert!(close(spy.get_f64("win_rate").unwrap(), 100.0 * wins));
    let meta = spy.get_document("metadata").unwrap();
    assert!(close(
        meta.get_f64("sharpe_ratio_annual").unwrap(),
        mean / sd * 252f64.sqrt()
    ));
    assert_eq!(meta.get_str("source_file").unwrap(), "SPY.csv");
    assert!(mdd > 0.05, "SPY had a real drawdown: {mdd}");

    // Re-ingest: still 9 documents; created_at kept, updated_at bumped.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let spx_csv = backtests().join(format!("{SPX}.csv"));
    env.ok(&[
        "backtest",
        "ingest",
        backtests().to_str().unwrap(),
        spx_csv.to_str().unwrap(),
        "--notes",
        "second upload",
    ]);
    let again = env.docs("strategy_backtest_data", doc! {}).await;
    assert_eq!(again.len(), 9);
    for new in &again {
        let id = new.get_str("strategy_id").unwrap();
        let old = docs
            .iter()
            .find(|o| o.get_str("strategy_id").unwrap() == id)
            .unwrap();
        assert_eq!(
            new.get_datetime("created_at").unwrap(),
            old.get_datetime("created_at").unwrap(),
            "{id}"
        );
        assert!(
            new.get_datetime("updated_at").unwrap() > old.get_datetime("updated_at").unwrap(),
            "{id}"
        );
        assert_eq!(
            new.get_document("metadata")
                .unwrap()
                .get_str("notes")
                .unwrap(),
            "second upload"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_csvs_fail_with_file_and_line_and_store_nothing() {
    let env = Env::new().await;
    let folder = env.dir.path().join("uploads");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("Good.csv"),
        "Date,Daily Returns (%)\n2024-01-02,0.5\n2024-01-03,-0.25\n",
    )
    .unwrap();
    std::fs::write(
        folder.join("BadValue.csv"),
        "Date,Daily Returns (%)\n2024-01-02,0.5\n2024-01-03,0.1\n2024-01-04,abc\n",
    )
    .unwrap();
    std::fs::write(
        folder.join("Dup.csv"),
        "Date,Daily Returns (%)\n2024-01-03,0.5\n2024-01-02,0.1\n2024-01-03,0.2\n",
    )
    .unwrap();
    std::fs::write(
        folder.join("Nan.csv"),
        "Date,Daily Returns (%)\n2024-01-02,0.5\n2024-01-03,NaN\n",
    )
    .unwrap();
    let o = env.run(&["backtest", "ingest", folder.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("BadValue.csv: line 4"), "{err}");
    assert!(
        err.contains("Dup.csv: line 4: duplicate date 2024-01-03 (first seen on line 2)"),
        "{err}"
    );
    assert!(err.contains("Nan.csv: line 3"), "{err}");
    assert!(err.contains("nothing was stored"), "{err}");
    assert!(env.docs("strategy_backtest_data", doc! {}).await.is_empty());

    // A single bad file, named directly.
    let o = env.run(&[
        "backtest",
        "ingest",
        folder.join("BadValue.csv").to_str().unwrap(),
    ]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("BadValue.csv: line 4"));
    // The good file alone goes in.
    env.ok(&[
        "backtest",
        "ingest",
        folder.join("Good.csv").to_str().unwrap(),
    ]);
    assert_eq!(env.docs("strategy_backtest_data", doc! {}).await.len(), 1);
}

/// The KV mirror of every strategy, by id.
async fn kv_strategies(env: &Env) -> BTreeMap<String, StrategyConfig> {
    let kv = env.bucket(buckets::STRATEGIES).await;
    let mut keys = kv.keys().await.unwrap();
    let mut out = BTreeMap::new();
    while let Some(k) = keys.try_next().await.unwrap() {
        let v = kv.get(&k).await.unwrap().unwrap();
        let c: StrategyConfig = serde_json::from_slice(&v).unwrap();
        assert_eq!(StrategyConfig::kv_key(&c.strategy_id), k);
        out.insert(c.strategy_id.clone(), c);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strategies_load_and_set_write_mongo_then_mirror_to_kv() {
    let env = Env::new().await;
    let out = env.load_strategies();
    assert!(out.contains("loaded 9 strategies"), "{out}");
    let docs = env.docs("strategy_configurations", doc! {}).await;
    assert_eq!(docs.len(), 9);
    for doc in &docs {
        assert_eq!(doc.get_str("status").unwrap(), "ACTIVE");
        assert_eq!(doc.get_str("trading_mode").unwrap(), "PAPER");
        assert_eq!(doc.get_str("sizing_mode").unwrap(), "SENDER_EQUITY_RATIO");
        assert!(doc.get_bool("include_in_optimization").unwrap());
        assert!(matches!(doc.get("created_at"), Some(Bson::DateTime(_))));
    }
    let kv = kv_strategies(&env).await;
    assert_eq!(kv.len(), 9);
    assert_eq!(kv["Com1-Met"].strategy_name.as_deref(), Some("Com1 - Met"));
    assert_eq!(kv["Com1-Met"].account.as_deref(), Some(ACCOUNT));

    env.ok(&[
        "strategies",
        "set",
        SPX,
        "--status",
        "testing",
        "--max-position-size",
        "25000.50",
        "--max-daily-loss",
        "5000",
        "--expected-alpha",
        "0.02",
        "--sizing-mode",
        "TARGET_WEIGHT",
        "--developer-contact",
        "dev@example.com",
    ]);
    let spx = env
        .one("strategy_configurations", doc! { "strategy_id": SPX })
        .await;
    assert_eq!(spx.get_str("status").unwrap(), "TESTING");
    let limits = spx.get_document("risk_limits").unwrap();
    assert_eq!(dec(limits.get("max_position_size").unwrap()), d("25000.50"));
    assert_eq!(dec(limits.get("max_daily_loss").unwrap()), d("5000"));
    assert_eq!(dec(spx.get("expected_alpha").unwrap()), d("0.02"));
    assert!(spx.get_datetime("updated_at").unwrap() > spx.get_datetime("created_at").unwrap());
    let kv = kv_strategies(&env).await;
    let k = &kv[SPX];
    assert_eq!(k.status.as_str(), "TESTING");
    assert_eq!(k.sizing_mode, SizingMode::TargetWeight);
    assert_eq!(k.expected_alpha, Some(d("0.02")));
    assert_eq!(
        k.risk_limits.as_ref().unwrap().max_position_size,
        Some(d("25000.50"))
    );
    assert_eq!(k.developer_contact.as_deref(), Some("dev@example.com"));
    let show = env.ok(&["strategies", "show", SPX]);
    assert!(show.contains("in sync"), "{show}");

    // Invalid values and unknown ids change nothing.
    let before = env
        .one("strategy_configurations", doc! { "strategy_id": SPX })
        .await;
    for bad in [
        &["strategies", "set", SPX, "--expected-alpha", "1.5"][..],
        &["strategies", "set", SPX, "--max-daily-loss", "-1"],
        &["strategies", "set", SPX, "--status", "PAUSED"],
        &[
            "strategies",
            "set",
            SPX,
            "--trading-mode",
            "LIVE",
            "--account",
            "none",
        ],
        &["strategies", "set", "NoSuch", "--status", "ACTIVE"],
    ] {
        let o = env.run(bad);
        assert_ne!(o.status.code(), Some(0), "{bad:?} should fail");
    }
    assert_eq!(
        env.one("strategy_configurations", doc! { "strategy_id": SPX })
            .await,
        before
    );
    // --create makes a new one, mirrored too.
    env.ok(&[
        "strategies",
        "set",
        "New Strat",
        "--create",
        "--account",
        ACCOUNT,
    ]);
    let kv = kv_strategies(&env).await;
    assert_eq!(kv.len(), 10);
    assert_eq!(kv["New Strat"].status.as_str(), "ACTIVE");

    // Loading the file again resets the fields it names and keeps the others.
    let out = env.load_strategies();
    assert!(out.contains("updated (status: TESTING → ACTIVE)"), "{out}");
    let kv = kv_strategies(&env).await;
    assert_eq!(kv[SPX].status.as_str(), "ACTIVE");
    assert_eq!(kv[SPX].expected_alpha, Some(d("0.02")));
    assert_eq!(kv[SPX].sizing_mode, SizingMode::TargetWeight);
    let listed = env.ok(&["strategies", "list"]);
    assert!(listed.contains("10 strategies"), "{listed}");
}

/// The standardized AAPL entry of the fixtures (10 @ 150, sender equity
/// 500,000) with its own signal id.
fn aapl_signal(tag: &str) -> StandardizedSignal {
    let text =
        std::fs::read_to_string(fixtures().join("signals/equity_simple_signal_1.json")).unwrap();
    let bodies: Vec<Value> = serde_json::from_str(&text).unwrap();
    let mut body = bodies[0].clone();
    strip_secret(&mut body);
    let mut ctx = ParseContext::new(
        "mathematricks",
        Environment::Staging,
        Utc::now(),
        ContentFormat::Mathematricks,
    );
    ctx.require_future_expiry = false;
    ctx.fallback_signal_id = Some(tag.to_string());
    let parsed = parse_raw(&body, &ctx).unwrap();
    let info = StrategyInfo {
        strategy_id: parsed.strategy().to_string(),
        expected_alpha: Some(d("0.02")),
        sizing_mode: SizingMode::SenderEquityRatio,
    };
    let mut s = standardize(parsed, &info);
    s.signal_id = derive_id("sig", &["portfolio_cli", tag]);
    s.sender_signal_id = tag.to_string();
    s.timestamp = Utc::now();
    s.received_at = Utc::now();
    s
}

async fn put_account_state(env: &Env, equity: &str) {
    let kv = env.bucket(buckets::ACCOUNT_STATE).await;
    let state = serde_json::json!({
        "account": ACCOUNT,
        "timestamp": Utc::now().to_rfc3339(),
        "equity": equity,
        "cash_balance": equity,
        "margin_used": "0",
        "margin_available": equity,
        "unrealized_pnl": "0",
        "realized_pnl": "0",
        "commissions": "0",
        "open_positions": [],
        "open_orders": [],
        "deployed_capital": {},
    });
    kv.put(
        account_state_key(ACCOUNT),
        serde_json::to_vec(&state).unwrap().into(),
    )
    .await
    .unwrap();
}

async fn publish(env: &Env, s: &StandardizedSignal) {
    let subject = Subjects::new(&env.cfg.topology.prefix)
        .signals_standardized(s.environment, &s.strategy_id)
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert(headers::MSG_ID, s.signal_id.as_str());
    h.insert(headers::SIGNAL_ID, s.signal_id.as_str());
    env.js()
        .await
        .publish_with_headers(subject, h, serde_json::to_vec(s).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn decision_of(env: &Env, signal_id: &str) -> (DecisionRecord, Vec<Order>) {
    let js = env.js().await;
    let topo = env.topo();
    let subjects = Subjects::new(&env.cfg.topology.prefix);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        let decisions = bus::read_all(
            &js,
            &topo.stream_name(streams::CEREBRO_DECISIONS),
            &subjects.raw_subject("cerebro.decisions.>"),
        )
        .await;
        if let Some(r) = decisions
            .iter()
            .map(|m| serde_json::from_slice::<DecisionRecord>(&m.payload).unwrap())
            .find(|r| r.signal_id == signal_id)
        {
            let orders = bus::read_all(
                &js,
                &topo.stream_name(streams::ORDERS),
                &subjects.raw_subject("orders.*.new"),
            )
            .await
            .iter()
            .map(|m| serde_json::from_slice::<Order>(&m.payload).unwrap())
            .filter(|o| o.signal_id == signal_id)
            .collect();
            return (r, orders);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no decision for {signal_id}");
}

async fn active_in_kv(env: &Env) -> ActiveAllocation {
    let kv = env.bucket(buckets::ALLOCATIONS).await;
    serde_json::from_slice(&kv.get("active").await.unwrap().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optimize_approve_edit_and_cerebro_resizes_without_restart() {
    let env = Env::new().await;
    env.ingest_fixtures();
    env.load_strategies();
    env.ok(&["strategies", "set", SPX, "--expected-alpha", "0.02"]);

    // The common window is the inner join of the nine series' dates.
    let mut common: Option<std::collections::BTreeSet<NaiveDate>> = None;
    for e in std::fs::read_dir(backtests()).unwrap() {
        let dates: std::collections::BTreeSet<NaiveDate> = read_csv(&e.unwrap().path())
            .into_iter()
            .map(|r| r.0)
            .collect();
        common = Some(match common {
            None => dates,
            Some(c) => c.intersection(&dates).copied().collect(),
        });
    }
    let common = common.unwrap();

    // ---- optimize: a run document and a PENDING_APPROVAL allocation A.
    let report = env.dir.path().join("report");
    let out = env.ok(&[
        "optimize",
        "--max-leverage",
        "2.0",
        "--max-single",
        "0.5",
        "--risk-free",
        "0",
        "--report",
        report.to_str().unwrap(),
        "--json",
    ]);
    let summary: Value = serde_json::from_str(out.trim()).unwrap();
    let run_id = summary["run_id"].as_str().unwrap().to_string();
    let a_id = summary["allocation_id"].as_str().unwrap().to_string();
    assert_eq!(a_id, derive_id("alloc", &[&run_id]));
    assert_eq!(summary["window"]["days"], common.len());
    for (f, needle) in [
        ("allocation.svg", SPX),
        ("correlation.svg", SPX),
        ("frontier.svg", "max-sharpe"),
    ] {
        let svg = std::fs::read_to_string(report.join(f)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains(needle), "{f}");
    }

    let run = env
        .one("portfolio_optimization_runs", doc! { "run_id": &run_id })
        .await;
    let used: Vec<&str> = run
        .get_array("strategies_used")
        .unwrap()
        .iter()
        .map(|b| b.as_str().unwrap())
        .collect();
    assert_eq!(used.len(), 9);
    let corr = run.get_array("correlation_matrix").unwrap();
    let cov = run.get_array("covariance_matrix").unwrap();
    assert_eq!(corr.len(), 9);
    for i in 0..9 {
        let ci = corr[i].as_array().unwrap();
        let vi = cov[i].as_array().unwrap();
        assert_eq!(ci[i].as_f64(), Some(1.0));
        for j in 0..9 {
            let vj = cov[j].as_array().unwrap();
            assert_eq!(vi[j].as_f64(), vj[i].as_f64(), "covariance symmetric");
        }
    }
    let window = run.get_document("data_window").unwrap();
    assert_eq!(window.get_i64("total_days").unwrap(), common.len() as i64);
    let c = run.get_document("constraints").unwrap();
    assert_eq!(c.get_f64("max_leverage").unwrap(), 2.0);
    assert_eq!(c.get_f64("max_single_strategy").unwrap(), 0.5);
    assert_eq!(c.get_f64("risk_free_rate").unwrap(), 0.0);
    let result = run.get_document("optimization_result").unwrap();
    assert!(result.get_bool("success").unwrap());
    assert!(result.get_bool("converged").unwrap());
    assert!(result.get_i64("iterations").unwrap() > 0);
    assert!(run.get_i64("execution_time_ms").unwrap() >= 0);
    let recommended = pcts(&run, "recommended_allocations");
    assert_eq!(recommended.values().copied().sum::<Decimal>(), d("200"));
    assert!(recommended
        .values()
        .all(|p| *p >= Decimal::ZERO && *p <= d("50")));
    let metrics = run.get_document("portfolio_metrics").unwrap();
    assert!((metrics.get_f64("leverage_ratio").unwrap() - 2.0).abs() < 1e-9);
    assert!(
        (metrics.get_f64("expected_sharpe_annual").unwrap()
            - metrics.get_f64("expected_sharpe_daily").unwrap() * 252f64.sqrt())
        .abs()
            < 1e-9
    );

    assert!(
        (metrics.get_f64("expected_annual_return").unwrap()
            - 252.0 * metrics.get_f64("expected_daily_return").unwrap())
        .abs()
            < 1e-12
    );
    let a = env
        .one("portfolio_allocations", doc! { "allocation_id": &a_id })
        .await;
    assert_eq!(a.get_str("status").unwrap(), "PENDING_APPROVAL");
    // The seed: a reference to `portfolio_optimization_runs._id`.
    let run = env
        .one("portfolio_optimization_runs", doc! { "run_id": &run_id })
        .await;
    assert_eq!(
        a.get_str("optimization_run_id").unwrap(),
        run.get_object_id("_id").unwrap().to_hex()
    );
    assert_eq!(pcts(&a, "allocations"), recommended);
    assert!(
        (a.get_document("expected_metrics")
            .unwrap()
            .get_f64("total_allocation_pct")
            .unwrap()
            - 200.0)
            .abs()
            < 1e-9
    );

    // ---- edits are checked against the run's constraints.
    for bad in [
        format!("{SPX}=50.0001"),
        format!("{SPX}=-1"),
        "Unknown=1".to_string(),
    ] {
        let o = env.run(&["allocations", "edit", &a_id, "--set", &bad]);
        assert_ne!(o.status.code(), Some(0), "{bad} should be refused");
    }
    // Raising anything on a fully allocated (200 %) allocation breaks Σ ≤ 200.
    let zero = recommended
        .iter()
        .find(|(_, p)| **p < d("49"))
        .map(|(k, _)| k.clone())
        .unwrap();
    let o = env.run(&["allocations", "edit", &a_id, "--set", &format!("{zero}=50")]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("leverage limit of 200 %"));
    // Pending: edited in place (de-levering is fine). The largest other
    // strategy goes to 0 so that B (below) has room to raise SPX.
    let largest = recommended
        .iter()
        .filter(|(k, _)| k.as_str() != SPX)
        .max_by_key(|(_, p)| **p)
        .map(|(k, _)| k.clone())
        .unwrap();
    env.ok(&[
        "allocations",
        "edit",
        &a_id,
        "--set",
        &format!("{SPX}=25"),
        "--set",
        &format!("{largest}=0"),
        "--by",
        "pm",
    ]);
    let a = env
        .one("portfolio_allocations", doc! { "allocation_id": &a_id })
        .await;
    assert_eq!(a.get_str("status").unwrap(), "PENDING_APPROVAL");
    let a_pcts = pcts(&a, "allocations");
    assert_eq!(a_pcts[SPX], d("25"));
    assert_eq!(a_pcts[&largest], Decimal::ZERO);
    assert!(a.get_str("notes").unwrap().contains("edited by pm"));

    // ---- approve A; Cerebro starts with it.
    env.ok(&["allocations", "approve", &a_id, "--by", "alice"]);
    let a = env
        .one("portfolio_allocations", doc! { "allocation_id": &a_id })
        .await;
    assert_eq!(a.get_str("status").unwrap(), "ACTIVE");
    assert_eq!(a.get_str("approved_by").unwrap(), "alice");
    assert!(matches!(a.get("approved_at"), Some(Bson::DateTime(_))));
    let active = active_in_kv(&env).await;
    assert_eq!(active.allocation_id, a_id);
    assert_eq!(active.allocations, a_pcts);

    put_account_state(&env, "1000000").await;
    let _cerebro = Running(
        env.cmd()
            .args(["run", "cerebro"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let s1 = aapl_signal("alloc-a");
    assert_eq!(s1.strategy_id, SPX);
    publish(&env, &s1).await;
    let (r1, o1) = decision_of(&env, &s1.signal_id).await;
    assert_eq!(r1.decision.as_str(), "APPROVED", "{}", r1.reason);
    assert_eq!(
        r1.risk_assessment.allocation_id.as_deref(),
        Some(a_id.as_str())
    );
    assert_eq!(r1.risk_assessment.allocated_capital, Some(d("250000")));
    // 10 shares of a 500,000 sender account, scaled to 250,000 available.
    assert_eq!(r1.final_quantity, d("5"));
    assert_eq!(o1.len(), 1);
    assert_eq!(
        o1[0].cerebro_decision.as_ref().unwrap().allocated_capital,
        d("250000")
    );

    // ---- B: an edit of the ACTIVE A is a new pending allocation.
    let out = env.ok(&["allocations", "edit", &a_id, "--set", &format!("{SPX}=40")]);
    let b_id = derive_id("alloc", &[&a_id, "edit", &format!("{SPX}=40")]);
    assert!(out.contains(&b_id), "{out}");
    let b = env
        .one("portfolio_allocations", doc! { "allocation_id": &b_id })
        .await;
    assert_eq!(b.get_str("status").unwrap(), "PENDING_APPROVAL");
    assert_eq!(b.get_str("derived_from").unwrap(), a_id);
    assert_eq!(pcts(&b, "allocations")[SPX], d("40"));
    // A is untouched and still what Cerebro uses.
    assert_eq!(
        pcts(
            &env.one("portfolio_allocations", doc! { "allocation_id": &a_id })
                .await,
            "allocations"
        ),
        a_pcts
    );
    // The same edit again is a duplicate.
    let o = env.run(&["allocations", "edit", &a_id, "--set", &format!("{SPX}=40")]);
    assert_ne!(o.status.code(), Some(0));

    // ---- approve B: A archived, KV switched, the next signal sized with B.
    env.ok(&[
        "allocations",
        "approve",
        &b_id,
        "--by",
        "bob",
        "--notes",
        "more SPX",
    ]);
    let a = env
        .one("portfolio_allocations", doc! { "allocation_id": &a_id })
        .await;
    assert_eq!(a.get_str("status").unwrap(), "ARCHIVED");
    assert!(matches!(a.get("archived_at"), Some(Bson::DateTime(_))));
    let b = env
        .one("portfolio_allocations", doc! { "allocation_id": &b_id })
        .await;
    assert_eq!(b.get_str("status").unwrap(), "ACTIVE");
    assert!(b
        .get_str("notes")
        .unwrap()
        .contains("approved by bob: more SPX"));
    assert_eq!(
        env.docs("portfolio_allocations", doc! { "status": "ACTIVE" })
            .await
            .len(),
        1
    );
    let active = active_in_kv(&env).await;
    assert_eq!(active.allocation_id, b_id);
    assert_eq!(active.allocations[SPX], d("40"));
    // An archived allocation cannot come back.
    let o = env.run(&["allocations", "approve", &a_id, "--by", "alice"]);
    assert_ne!(o.status.code(), Some(0));

    tokio::time::sleep(Duration::from_millis(500)).await; // the watcher applies it
    put_account_state(&env, "1000000").await;
    let s2 = aapl_signal("alloc-b");
    publish(&env, &s2).await;
    let (r2, o2) = decision_of(&env, &s2.signal_id).await;
    assert_eq!(r2.decision.as_str(), "APPROVED", "{}", r2.reason);
    assert_eq!(
        r2.risk_assessment.allocation_id.as_deref(),
        Some(b_id.as_str())
    );
    assert_eq!(r2.risk_assessment.allocated_capital, Some(d("400000")));
    assert_eq!(o2.len(), 1);
    assert_eq!(
        o2[0].cerebro_decision.as_ref().unwrap().allocated_capital,
        d("400000")
    );
    // 400,000 allocated less the margin still reserved for the first order.
    assert!(
        r2.final_quantity > r1.final_quantity,
        "{}",
        r2.final_quantity
    );

    let listed = env.ok(&["allocations", "list"]);
    assert!(listed.contains(&a_id) && listed.contains(&b_id), "{listed}");
    let shown = env.ok(&["allocations", "show", &b_id]);
    assert!(shown.contains("kv allocations/active: in sync"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_algorithm_stores_a_feasible_run() {
    let env = Env::new().await;
    env.ingest_fixtures();
    env.load_strategies();
    // SPX_0DE_Opt's short history would cut the window: leave it out.
    env.ok(&[
        "strategies",
        "set",
        "SPX_0DE_Opt",
        "--include-in-optimization",
        "false",
    ]);
    for (alg, extra) in [
        ("max-sharpe", &[][..]),
        ("min-cvar", &["--cvar-confidence", "0.95"][..]),
        ("hrp", &[][..]),
        ("max-cagr", &["--max-drawdown", "0.3"][..]),
    ] {
        let mut args = vec!["optimize", "--algorithm", alg, "--json"];
        args.extend_from_slice(extra);
        let out = env.ok(&args);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let run = env
            .one(
                "portfolio_optimization_runs",
                doc! { "run_id": v["run_id"].as_str().unwrap() },
            )
            .await;
        assert_eq!(run.get_str("algorithm").unwrap(), alg);
        assert_eq!(run.get_array("strategies_used").unwrap().len(), 8, "{alg}");
        let p = pcts(&run, "recommended_allocations");
        assert_eq!(p.values().copied().sum::<Decimal>(), d("200"), "{alg}");
        assert!(
            p.values().all(|x| *x >= Decimal::ZERO && *x <= d("50")),
            "{alg}"
        );
        assert!(run
            .get_document("optimization_result")
            .unwrap()
            .get_bool("success")
            .unwrap());
    }
    assert_eq!(
        env.docs(
            "portfolio_allocations",
            doc! { "status": "PENDING_APPROVAL" }
        )
        .await
        .len(),
        4
    );
    // Nothing to optimise: a clear error.
    for id in [
        "Com1-Met",
        "Com2-Ag",
        "Com3-Mkt",
        "Com4-Misc",
        "FloridaForex",
        SPX,
        "SPY",
        "TLT",
    ] {
        env.ok(&["strategies", "set", id, "--status", "INACTIVE"]);
    }
    let o = env.run(&["optimize"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("ACTIVE with include_in_optimization"));
}
