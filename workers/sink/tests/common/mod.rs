//! Shared setup for the sink's integration tests (included with `mod common;`).
#![allow(dead_code)]

use async_nats::jetstream;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::Document;
use mongodb::Client;
use mtx_harness::{unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::{headers, Environment};
use mtx_subjects::{Subjects, Topology};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A config pointing at `nats` and `mongo` with fresh prefix and databases.
pub fn config(nats: &NatsServer, mongo: &MongoServer) -> Config {
    let mut c = Config::default();
    if let Ok(level) = std::env::var("TEST_LOG") {
        c.log.level = level;
        mtx_runtime::telemetry::init(&c.log);
    }
    c.nats.url = nats.url();
    c.mongo.uri = mongo.uri();
    c.mongo.trading_db = unique("trading");
    c.mongo.bot_core_db = unique("core");
    c.metrics.addr = "127.0.0.1:0".into();
    c.topology.prefix = unique("s");
    c.topology.ack_wait_secs = 30;
    c.worker.heartbeat_ms = 500;
    c.worker.pull_expires_ms = 2_000;
    c.worker.publish_retry_delay_ms = 200;
    c
}

pub async fn js(nats: &NatsServer) -> jetstream::Context {
    let client = async_nats::connect(nats.url()).await.expect("connect");
    jetstream::new(client)
}

pub async fn apply(js: &jetstream::Context, cfg: &Config) -> Topology {
    let topo = Topology::build(&cfg.topology);
    mtx_subjects::apply::apply(js, &topo).await.expect("apply");
    topo
}

pub async fn mongo(cfg: &Config) -> Client {
    Client::with_uri_str(&cfg.mongo.uri)
        .await
        .expect("mongo client")
}

pub async fn migrate(cfg: &Config) -> mtx_sink::MigrateReport {
    let store = mtx_sink::Store::connect(&cfg.mongo, Duration::from_secs(20))
        .await
        .expect("store");
    mtx_sink::migrate(&store, &cfg.mongo)
        .await
        .expect("migrate")
}

/// One test's world: a nats-server and a Mongo stand-in of its own, `cfg`
/// pointing at them, the topology applied.
pub struct Setup {
    pub nats: NatsServer,
    pub mongo_server: MongoServer,
    pub cfg: Config,
    pub js: jetstream::Context,
    pub topo: Topology,
    /// A client of the Mongo stand-in.
    pub m: Client,
    /// `cfg.mongo.trading_db`.
    pub tdb: String,
    pub sub: Subjects,
}

impl Setup {
    /// Fresh servers, the topology applied, the databases migrated.
    pub async fn migrated() -> Setup {
        Self::on(MongoServer::start(), |_| {}).await.migrate().await
    }

    /// On `mongo_server` and a fresh nats-server, with `cfg` changed by
    /// `tune` before the topology is applied; the databases not migrated.
    pub async fn on(mongo_server: MongoServer, tune: impl FnOnce(&mut Config)) -> Setup {
        let nats = NatsServer::start();
        let mut cfg = config(&nats, &mongo_server);
        tune(&mut cfg);
        let js = js(&nats).await;
        let topo = apply(&js, &cfg).await;
        Setup {
            m: mongo(&cfg).await,
            tdb: cfg.mongo.trading_db.clone(),
            sub: subjects(&cfg),
            nats,
            mongo_server,
            cfg,
            js,
            topo,
        }
    }

    /// Run the schema migrations.
    pub async fn migrate(self) -> Setup {
        migrate(&self.cfg).await;
        self
    }

    /// Documents of the trading database's `coll` matching `filter`.
    pub async fn count(&self, coll: &str, filter: Document) -> u64 {
        count(&self.m, &self.tdb, coll, filter).await
    }

    /// The trading database's `coll` documents matching `filter`.
    pub async fn find(&self, coll: &str, filter: Document) -> Vec<Document> {
        find(&self.m, &self.tdb, coll, filter).await
    }
}

/// A running sink process.
pub struct Sink {
    pub shutdown: CancellationToken,
    pub waiter: tokio::task::JoinHandle<()>,
    pub registry: prometheus::Registry,
    pub health: mtx_runtime::health::Health,
}

pub async fn start_sink(cfg: &Config) -> Sink {
    let shutdown = CancellationToken::new();
    let mut p = Process::start(cfg.clone(), shutdown.clone())
        .await
        .expect("process");
    mtx_sink::spawn(&mut p).await.expect("sink spawn");
    let registry = p.registry.clone();
    let health = p.health.clone();
    let waiter = tokio::spawn(p.wait());
    Sink {
        shutdown,
        waiter,
        registry,
        health,
    }
}

impl Sink {
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.waiter.await;
    }

    pub fn assert_ready(&self) {
        assert!(
            self.health.readiness().is_ok(),
            "{:?}",
            self.health.readiness()
        );
    }
}

/// Publish `body` on `subject` with a msg id and optional signal id header.
pub async fn publish(
    js: &jetstream::Context,
    subject: &str,
    msg_id: &str,
    signal_id: Option<&str>,
    body: &Value,
) {
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, msg_id);
    h.insert(headers::RECEIVED_AT, "1");
    if let Some(s) = signal_id {
        h.insert(headers::SIGNAL_ID, s);
    }
    js.publish_with_headers(
        subject.to_string(),
        h,
        Bytes::from(serde_json::to_vec(body).unwrap()),
    )
    .await
    .expect("publish")
    .await
    .expect("publish ack");
}

/// Publish raw signal `i` on `subject` (msg id `raw-{i}`, its signal id).
pub async fn publish_raw(js: &jetstream::Context, subject: &str, i: usize) {
    let sid = signal_id(i);
    publish(js, subject, &format!("raw-{i}"), Some(&sid), &raw_signal(i)).await;
}

/// Publish standardized signal `i` on `subject` (msg id `std-{i}`, its
/// signal id).
pub async fn publish_standardized(js: &jetstream::Context, subject: &str, i: usize) {
    let sid = signal_id(i);
    publish(
        js,
        subject,
        &format!("std-{i}"),
        Some(&sid),
        &standardized(i),
    )
    .await;
}

/// Publish `body` on `subject` with exactly the headers `h`.
pub async fn publish_with(
    js: &jetstream::Context,
    subject: String,
    h: async_nats::HeaderMap,
    body: impl Into<Bytes>,
) {
    js.publish_with_headers(subject, h, body.into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
}

/// Publish the whole life of signals `range` (raw, standardized, decision,
/// order, two events, execution, account snapshot).
pub async fn publish_lives(js: &jetstream::Context, cfg: &Config, range: std::ops::Range<usize>) {
    let sub = subjects(cfg);
    let env = Environment::Staging;
    let raw_sub = sub.signals_raw(env, "mathematricks").unwrap();
    let std_sub = sub.signals_standardized(env, "SPX_1-D_Opt").unwrap();
    let dec_sub = sub.cerebro_decisions(env, "SPX_1-D_Opt").unwrap();
    let ord_sub = sub.orders_new("IBKR_Main").unwrap();
    let ev_sub = sub.orders_events("IBKR_Main").unwrap();
    let exe_sub = sub.executions("IBKR_Main").unwrap();
    let acct_sub = sub.account_state("IBKR_Main").unwrap();
    for i in range {
        let sid = signal_id(i);
        let sid = Some(sid.as_str());
        for (subject, id, signal, body) in [
            (&raw_sub, "raw", sid, raw_signal(i)),
            (&std_sub, "std", sid, standardized(i)),
            (&dec_sub, "dec", sid, decision(i)),
            (&ord_sub, "ord", sid, order(i)),
            (&ev_sub, "ev1", None, order_event(i, 1, "SUBMITTED", "0")),
            (&ev_sub, "ev2", None, order_event(i, 2, "FILLED", "12")),
            (&exe_sub, "exe", None, execution(i)),
            (&acct_sub, "acct", None, account_state(i)),
        ] {
            publish(js, subject, &format!("{id}-{i}"), signal, &body).await;
        }
    }
}

pub async fn count(client: &Client, db: &str, coll: &str, filter: Document) -> u64 {
    client
        .database(db)
        .collection::<Document>(coll)
        .count_documents(filter)
        .await
        .unwrap_or(u64::MAX)
}

pub async fn find(client: &Client, db: &str, coll: &str, filter: Document) -> Vec<Document> {
    client
        .database(db)
        .collection::<Document>(coll)
        .find(filter)
        .await
        .expect("find")
        .try_collect()
        .await
        .expect("collect")
}

/// Poll an async condition until true or timeout.
pub async fn eventually<F, Fut>(timeout: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Messages stored under `filter` in `stream`.
pub async fn stream_count(js: &jetstream::Context, stream: &str, filter: &str) -> usize {
    let st = js.get_stream(stream).await.expect("stream");
    let mut info = st.info_with_subjects(filter).await.expect("info");
    let mut n = 0;
    while let Some(Ok((_, c))) = info.next().await {
        n += c;
    }
    n
}

#[allow(unused_imports)] // not every test binary reads streams back
pub use mtx_harness::bus::read_all;

// ------------------------------------------------------------------ fixtures

pub fn subjects(cfg: &Config) -> Subjects {
    Subjects::new(&cfg.topology.prefix)
}

/// A raw signal as the gateway publishes it.
pub fn raw_signal(i: usize) -> Value {
    let v = json!({
        "source": "mathematricks",
        "environment": "staging",
        "received_at": format!("2025-11-20T10:00:{:02}.{:03}Z", i % 60, i % 1000),
        "format": "MATHEMATRICKS",
        "payload": {
            "strategy_name": "SPX_1-D_Opt",
            "signalID": format!("SIG_{i}"),
            "signal_legs": [{"ticker": "AAPL", "action": "BUY", "quantity": 10, "price": 150.25}]
        }
    });
    // It must still be what the gateway publishes.
    let typed: mtx_schemas::signal::RawSignal = serde_json::from_value(v).expect("RawSignal shape");
    serde_json::to_value(typed).unwrap()
}

pub fn signal_id(i: usize) -> String {
    mtx_schemas::ids::signal_id("mathematricks", "SPX_1-D_Opt", &format!("SIG_{i}"))
}

/// A standardized signal as the standardizer publishes it.
pub fn standardized(i: usize) -> Value {
    let leg = json!({
        "instrument": "AAPL", "instrument_type": "STOCK", "side": "BUY", "direction": "LONG",
        "quantity": "10", "order_type": "LIMIT", "price": "150.25", "stop_loss": "140.10",
        "take_profit": null, "expiry": null, "exchange": null
    });
    let v = json!({
        "signal_id": signal_id(i),
        "strategy_id": "SPX_1-D_Opt",
        "timestamp": "2025-11-20T10:00:00Z",
        "instrument": "AAPL",
        "instrument_type": "STOCK",
        "direction": "LONG",
        "action": "ENTRY",
        "order_type": "LIMIT",
        "price": "150.25",
        "quantity": "10",
        "stop_loss": "140.10",
        "take_profit": null,
        "expiry": null,
        "metadata": {"expected_alpha": "0.02"},
        "legs": [leg],
        "signal_type": "ENTRY",
        "entry_signal_id": null,
        "sender_entry_signal_id": null,
        "environment": "staging",
        "source": "mathematricks",
        "sender_signal_id": format!("SIG_{i}"),
        "signal_sent_at": null,
        "received_at": "2025-11-20T10:00:00.250Z",
        "account_equity": "500000",
        "sizing_mode": "SENDER_EQUITY_RATIO"
    });
    let typed: mtx_schemas::signal::StandardizedSignal =
        serde_json::from_value(v).expect("StandardizedSignal shape");
    serde_json::to_value(typed).unwrap()
}

/// A decision as Cerebro publishes it (cerebro's DecisionRecord).
pub fn decision(i: usize) -> Value {
    json!({
        "signal_id": signal_id(i),
        "strategy_id": "SPX_1-D_Opt",
        "account": "IBKR_Main",
        "environment": "staging",
        "trading_mode": "PAPER",
        "signal_type": "ENTRY",
        "action": "ENTRY",
        "entry_signal_id": null,
        "decision": "MODIFIED",
        "timestamp": "2025-11-20T10:00:01Z",
        "reason": "margin: shrunk to fit",
        "reason_code": "margin_available",
        "reason_detail": {"code": "margin_available", "limit": "1000.00", "actual": "1200.00"},
        "original_quantity": "17",
        "final_quantity": "12",
        "legs": [{
            "leg": 0, "instrument": "AAPL", "instrument_type": "STOCK", "action": "ENTRY",
            "side": "BUY", "direction": "LONG", "order_type": "LIMIT", "sender_quantity": "10",
            "original_quantity": "17", "final_quantity": "12", "price": "150.25",
            "multiplier": "1", "lot_size": "1", "margin_required": "450.75",
            "notional": "1803.00", "logic": "ratio"
        }],
        "risk_assessment": {
            "portfolio_margin_before": "1000.00",
            "portfolio_margin_after": "1450.75",
            "margin_utilization_pct": "0.1451",
            "cvar_contribution": 12.5,
            "correlation_impact": {"strategy_id": "SPX_1-D_Opt", "with_portfolio": 0.3,
                                   "with_strategies": {}, "weight_before_pct": 1.0, "weight_after_pct": 1.2},
            "account_equity": "1000000",
            "allocation_pct": "89.36",
            "allocated_capital": "893600.00"
        }
    })
}

pub fn order_id(i: usize) -> String {
    mtx_schemas::ids::order_id(&signal_id(i), 0)
}

/// An order as Cerebro publishes it.
pub fn order(i: usize) -> Value {
    let v = json!({
        "order_id": order_id(i),
        "signal_id": signal_id(i),
        "strategy_id": "SPX_1-D_Opt",
        "account": "IBKR_Main",
        "timestamp": "2025-11-20T10:00:01Z",
        "instrument": "AAPL",
        "instrument_type": "STOCK",
        "direction": "LONG",
        "action": "ENTRY",
        "side": "BUY",
        "order_type": "LIMIT",
        "price": "150.25",
        "quantity": "12",
        "stop_loss": "140.10",
        "take_profit": null,
        "expiry": null,
        "cerebro_decision": {
            "allocated_capital": "893600.00",
            "margin_required": "450.75",
            "position_size_logic": "ratio 1.7872",
            "risk_metrics": {"cvar": "0.01"}
        },
        "status": "PENDING",
        "leg": 0,
        "multiplier": "1"
    });
    let typed: mtx_schemas::order::Order = serde_json::from_value(v).expect("Order shape");
    serde_json::to_value(typed).unwrap()
}

pub fn order_event(i: usize, seq: u64, status: &str, filled: &str) -> Value {
    let v = json!({
        "order_id": order_id(i),
        "account": "IBKR_Main",
        "status": status,
        "previous_status": null,
        "filled_quantity": filled,
        "avg_fill_price": if filled == "0" { Value::Null } else { json!("150.20") },
        "reason": null,
        "timestamp": format!("2025-11-20T10:00:0{}Z", seq.min(9)),
        "seq": seq
    });
    let typed: mtx_schemas::order::OrderEvent =
        serde_json::from_value(v).expect("OrderEvent shape");
    serde_json::to_value(typed).unwrap()
}

pub fn execution(i: usize) -> Value {
    let v = json!({
        "execution_id": mtx_schemas::ids::execution_id(&order_id(i), 1),
        "order_id": order_id(i),
        "account": "IBKR_Main",
        "strategy_id": "SPX_1-D_Opt",
        "instrument": "AAPL",
        "instrument_type": "STOCK",
        "direction": "LONG",
        "action": "ENTRY",
        "side": "BUY",
        "quantity": "12",
        "price": "150.20",
        "commission": "1.00",
        "multiplier": "1",
        "status": "FILLED",
        "broker_response": {"venue": "paper", "fill_seq": 1},
        "timestamp": "2025-11-20T10:00:02Z"
    });
    let typed: mtx_schemas::order::ExecutionConfirmation =
        serde_json::from_value(v).expect("ExecutionConfirmation shape");
    serde_json::to_value(typed).unwrap()
}

pub fn account_state(i: usize) -> Value {
    let v = json!({
        "account": "IBKR_Main",
        "timestamp": format!("2025-11-20T{:02}:{:02}:{:02}Z", 10 + i / 3600, (i / 60) % 60, i % 60),
        "equity": "1000000.60",
        "cash_balance": "999999.00",
        "margin_used": "450.60",
        "margin_available": "999550.00",
        "unrealized_pnl": "1.60",
        "realized_pnl": "0",
        "commissions": "1.00",
        "open_positions": [{
            "strategy_id": "SPX_1-D_Opt", "instrument": "AAPL", "direction": "LONG",
            "quantity": "12", "entry_price": "150.20", "current_price": "150.3333",
            "unrealized_pnl": "1.60", "margin_required": "450.60"
        }],
        "open_orders": [],
        "deployed_capital": {"SPX_1-D_Opt": "450.60"}
    });
    let typed: mtx_schemas::order::AccountState =
        serde_json::from_value(v).expect("AccountState shape");
    serde_json::to_value(typed).unwrap()
}
