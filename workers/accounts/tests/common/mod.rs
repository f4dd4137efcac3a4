//! Shared setup: a real nats-server, the topology under a fresh prefix, and
//! the execution + accounts stages running in one process.
#![allow(dead_code)]

use async_nats::jetstream;
use mtx_accounts::worker::Accounts;
use mtx_execution::worker::Engine;
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::{CommissionKind, Config};
use mtx_runtime::process::Process;
use mtx_schemas::headers;
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{
    account_state_key, decode_order_events, order_side, AccountState, CancelOrder,
    ExecutionConfirmation, Order, OrderEvent,
};
use mtx_schemas::{Direction, OrderStatus, OrderType, SignalAction};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The default config on `nats` under a fresh topology prefix starting with
/// `prefix`, metrics on any port, logging at `TEST_LOG` when it is set.
pub fn base_config(nats: &NatsServer, prefix: &str) -> Config {
    let mut c = Config::default();
    if let Ok(level) = std::env::var("TEST_LOG") {
        c.log.level = level;
        mtx_runtime::telemetry::init(&c.log);
    }
    c.nats.url = nats.url();
    c.metrics.addr = "127.0.0.1:0".into();
    c.topology.prefix = unique(prefix);
    c
}

/// [`base_config`] with short heartbeats / retries, a 200 ms venue clock
/// and a commission of 0.01 per share.
pub fn config(nats: &NatsServer) -> Config {
    let mut c = base_config(nats, "t");
    c.worker.heartbeat_ms = 500;
    c.worker.pull_expires_ms = 2_000;
    c.worker.publish_retry_delay_ms = 200;
    c.execution.tick_ms = 200;
    c.execution.paper.commission.model = CommissionKind::PerShare;
    c.execution.paper.commission.rate = Decimal::new(1, 2); // 0.01 per share
    c
}

pub struct Pipeline {
    pub js: jetstream::Context,
    pub cfg: Config,
    pub topo: Topology,
    pub subjects: Subjects,
    pub execution: Arc<Engine>,
    pub accounts: Arc<Accounts>,
    pub registry: prometheus::Registry,
    shutdown: CancellationToken,
    waiter: Option<tokio::task::JoinHandle<()>>,
}

/// Apply `cfg`'s topology through `js`, then start a process on `cfg` (no
/// stage spawned yet) that stops when the returned token is cancelled.
pub async fn apply_and_start(
    cfg: &Config,
    js: &jetstream::Context,
) -> (Topology, Process, CancellationToken) {
    let topo = Topology::build(&cfg.topology);
    mtx_subjects::apply::apply(js, &topo).await.expect("apply");
    let shutdown = CancellationToken::new();
    let p = Process::start(cfg.clone(), shutdown.clone())
        .await
        .expect("process");
    (topo, p, shutdown)
}

impl Pipeline {
    pub async fn start(cfg: Config) -> Pipeline {
        let client = async_nats::connect(&cfg.nats.url).await.expect("connect");
        let js = jetstream::new(client);
        let (topo, mut p, shutdown) = apply_and_start(&cfg, &js).await;
        let execution = mtx_execution::worker::spawn(&mut p).expect("execution");
        let accounts = mtx_accounts::worker::spawn(&mut p).expect("accounts");
        let registry = p.registry.clone();
        let subjects = p.subjects.clone();
        let waiter = tokio::spawn(p.wait());
        Pipeline {
            js,
            cfg,
            topo,
            subjects,
            execution,
            accounts,
            registry,
            shutdown,
            waiter: Some(waiter),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(w) = self.waiter.take() {
            w.await.unwrap();
        }
    }

    pub async fn publish(&self, subject: String, msg_id: String, body: Vec<u8>) {
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, msg_id.as_str());
        self.js
            .publish_with_headers(subject, h, body.into())
            .await
            .expect("publish")
            .await
            .expect("ack");
    }

    pub async fn order(&self, o: &Order) {
        let subject = self.subjects.orders_new(&o.account).unwrap();
        self.publish(subject, o.order_id.clone(), serde_json::to_vec(o).unwrap())
            .await;
    }

    pub async fn cancel(&self, account: &str, order_id: &str) {
        let c = CancelOrder {
            order_id: order_id.into(),
            account: account.into(),
            reason: Some("test".into()),
            timestamp: chrono::Utc::now(),
        };
        let subject = self.subjects.orders_cancel(account).unwrap();
        let id = format!(
            "cancel.{order_id}.{}",
            c.timestamp.timestamp_nanos_opt().unwrap()
        );
        self.publish(subject, id, serde_json::to_vec(&c).unwrap())
            .await;
    }

    /// Publish a mark and wait until both stages have it.
    pub async fn price(&self, symbol: &str, price: Decimal) {
        let now = chrono::Utc::now();
        let p = MarketPrice {
            symbol: symbol.into(),
            price,
            timestamp: now,
            source: Some("test".into()),
        };
        let subject = self.subjects.market_price(symbol).unwrap();
        self.publish(
            subject,
            format!("px.{symbol}.{}", now.timestamp_nanos_opt().unwrap()),
            serde_json::to_vec(&p).unwrap(),
        )
        .await;
        let ok = eventually(Duration::from_secs(10), || async {
            let venue = self
                .execution
                .broker_snapshot("PAPER")
                .await
                .and_then(|s| s.marks.get(symbol).copied());
            let book = self.accounts.mark_of(symbol).await.map(|m| m.price);
            venue == Some(price) && book == Some(price)
        })
        .await;
        assert!(ok, "mark {symbol} {price} not seen by both stages");
    }

    pub async fn state(&self, account: &str) -> Option<AccountState> {
        let kv = self
            .js
            .get_key_value(self.topo.bucket(buckets::ACCOUNT_STATE).unwrap())
            .await
            .ok()?;
        let v = kv.get(account_state_key(account)).await.ok()??;
        serde_json::from_slice(&v).ok()
    }

    /// Wait for a stored state satisfying `f`.
    pub async fn state_where(
        &self,
        account: &str,
        f: impl Fn(&AccountState) -> bool,
    ) -> AccountState {
        let mut last = None;
        for _ in 0..400 {
            if let Some(s) = self.state(account).await {
                if f(&s) {
                    return s;
                }
                last = Some(s);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("state of {account} never matched; last: {last:#?}");
    }

    pub async fn executions(&self, account: &str) -> Vec<ExecutionConfirmation> {
        read_all(
            &self.js,
            &self.topo.stream_name(streams::EXECUTIONS),
            &self.subjects.executions(account).unwrap(),
        )
        .await
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect()
    }

    pub async fn events(&self, account: &str) -> Vec<OrderEvent> {
        read_all(
            &self.js,
            &self.topo.stream_name(streams::ORDER_EVENTS),
            &self.subjects.orders_events(account).unwrap(),
        )
        .await
        .iter()
        .flat_map(|m| decode_order_events(&m.payload).unwrap())
        .collect()
    }

    /// Wait until `order_id` has `n` executions on the stream.
    pub async fn wait_executions(
        &self,
        account: &str,
        order_id: &str,
        n: usize,
    ) -> Vec<ExecutionConfirmation> {
        let mut got = Vec::new();
        for _ in 0..400 {
            got = self
                .executions(account)
                .await
                .into_iter()
                .filter(|x| x.order_id == order_id)
                .collect();
            if got.len() >= n {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{order_id}: expected {n} executions, got {got:#?}");
    }

    /// Wait until the order's latest event has `status`.
    pub async fn wait_status(
        &self,
        account: &str,
        order_id: &str,
        status: OrderStatus,
    ) -> Vec<OrderEvent> {
        let mut got = Vec::new();
        for _ in 0..400 {
            got = self
                .events(account)
                .await
                .into_iter()
                .filter(|e| e.order_id == order_id)
                .collect();
            if got.last().is_some_and(|e| e.status == status) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{order_id}: never {status}; events {got:#?}");
    }
}

#[allow(unused_imports)] // not every test binary reads streams back
pub use mtx_harness::bus::read_all;

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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// An order of strategy `strategy` on account PAPER.
#[allow(clippy::too_many_arguments)]
pub fn order(
    id: &str,
    strategy: &str,
    instrument: &str,
    action: SignalAction,
    direction: Direction,
    qty: Decimal,
    order_type: OrderType,
    price: Option<Decimal>,
) -> Order {
    let now = chrono::Utc::now();
    Order {
        direction,
        action,
        side: order_side(action, direction),
        order_type,
        price,
        ..Order::pending(
            id,
            format!("sig_{id}"),
            strategy,
            "PAPER",
            instrument,
            qty,
            now,
        )
    }
}

pub fn market(
    id: &str,
    strategy: &str,
    instrument: &str,
    action: SignalAction,
    direction: Direction,
    qty: Decimal,
) -> Order {
    order(
        id,
        strategy,
        instrument,
        action,
        direction,
        qty,
        OrderType::Market,
        None,
    )
}
