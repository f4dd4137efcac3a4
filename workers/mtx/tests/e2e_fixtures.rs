//! The whole chain, end to end, on real servers: every fixture file of
//! `tests/fixtures/signals/` is sent through the HTTP gateway of one `mtx`
//! process running gateway, standardizer, cerebro, execution, accounts and
//! sink. Afterwards:
//!
//! - the ledger adds up: every accepted signal has exactly one standardized
//!   signal and one decision, every approved leg exactly one order, every
//!   MARKET order exactly one fill of its full quantity, positions and cash
//!   recomputed here from the fills alone equal the published account state,
//!   and a rebuild from the EXECUTIONS stream equals the live state;
//! - every pipeline collection in MongoDB holds exactly the expected
//!   documents (counts and natural keys), with the seed's BSON types
//!   (dates, Decimal128 money) and the seed's indexes.

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mtx_cerebro::worker::ReservationBook;
use mtx_harness::{free_port, unique, MongoServer, NatsServer};
use mtx_runtime::config::Config;
use mtx_schemas::order::{AccountState, ExecutionConfirmation, Order};
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::{Direction, ExecutionStatus, SignalAction};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::Topology;
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

const ACCOUNT: &str = "IBKR_Main";
const SECRET: &str = "test_password_123";
const INITIAL: &str = "1000000";

fn mtx(config: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mtx"));
    c.arg("--config").arg(config).env("MTX_LOG__LEVEL", "warn");
    c
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fixtures() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/signals");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 14, "fixture files in {}", dir.display());
    files
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Every message of a stream, decoded.
async fn read(js: &jetstream::Context, topo: &Topology, base: &str) -> Vec<(String, Value)> {
    let name = topo.stream_name(base);
    mtx_harness::bus::read_all(js, &name, ">")
        .await
        .into_iter()
        .map(|m| {
            let v = serde_json::from_slice(&m.payload)
                .unwrap_or_else(|e| panic!("{base} {}: {e}", m.subject));
            (m.subject.to_string(), v)
        })
        .collect()
}

/// Every durable consumer of the topology has nothing pending and nothing
/// unacknowledged, twice in a row one second apart.
async fn quiescent(js: &jetstream::Context, topo: &Topology) -> bool {
    let mut calm = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let mut busy = Vec::new();
        for c in &topo.consumers {
            let stream = js.get_stream(&c.stream).await.unwrap();
            let mut consumer: PullConsumer = stream.get_consumer(c.durable()).await.unwrap();
            let info = consumer.info().await.unwrap();
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                busy.push(format!(
                    "{}: pending {} ack_pending {}",
                    c.durable(),
                    info.num_pending,
                    info.num_ack_pending
                ));
            }
        }
        if busy.is_empty() {
            calm += 1;
            if calm == 2 {
                return true;
            }
        } else {
            calm = 0;
            eprintln!("waiting: {}", busy.join(", "));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    false
}

/// Every stage but the sink has handled everything sent so far (nothing
/// pending, nothing deferred), the account state books every fill (its
/// commissions equal the fills' on `EXECUTIONS`) and Cerebro's reservation
/// book for the account is empty, twice in a row: the next
/// file is decided against the ledger the earlier files left, however fast
/// or slow each stage is.
async fn settle(js: &jetstream::Context, topo: &Topology, states: &jetstream::kv::Store) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut calm = 0;
    let mut last = String::new();
    while calm < 2 {
        assert!(Instant::now() < deadline, "never settled: {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
        calm += 1;
        for c in topo.consumers.iter().filter(|c| c.pool != "sink") {
            let stream = js.get_stream(&c.stream).await.unwrap();
            let mut consumer: PullConsumer = stream.get_consumer(c.durable()).await.unwrap();
            let info = consumer.info().await.unwrap();
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                last = format!("{} busy", c.durable());
                calm = 0;
            }
        }
        if calm == 0 {
            continue;
        }
        let booked: Decimal = read(js, topo, streams::EXECUTIONS)
            .await
            .into_iter()
            .map(|(_, v)| serde_json::from_value::<ExecutionConfirmation>(v).unwrap())
            .filter(|x| x.account == ACCOUNT)
            .map(|x| x.commission)
            .sum();
        let state: AccountState =
            serde_json::from_slice(&states.get(ACCOUNT).await.unwrap().unwrap()).unwrap();
        if state.commissions != booked {
            last = format!("state commissions {} vs fills {booked}", state.commissions);
            calm = 0;
            continue;
        }
        // Cerebro released every reservation (margin approved but not yet
        // booked): it holds an order's margin until a state at least
        // `booking_grace` newer than the fill omits it.
        let book = states
            .get(mtx_cerebro::worker::reservations_key(ACCOUNT))
            .await
            .unwrap()
            .map(|b| serde_json::from_slice::<ReservationBook>(&b).unwrap())
            .unwrap_or_default();
        if !book.held.is_empty() {
            last = format!("cerebro still reserves for {:?}", book.held.keys());
            calm = 0;
        }
    }
}

/// A position recomputed from fills alone.
#[derive(Debug, Default, Clone)]
struct Pos {
    qty: Decimal,
    cost: Decimal,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_signals_flow_through_every_stage_and_add_up() {
    let nats = NatsServer::start();
    let mongo = MongoServer::start();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique("e");
    let trading = unique("trading");
    let core = unique("core");
    let port = free_port();
    let metrics = free_port();
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
[gateway]
addr = "127.0.0.1:{port}"
secrets_refresh_secs = 1
futures_front_month = true
[metrics]
addr = "127.0.0.1:{metrics}"
[topology]
prefix = "{prefix}"
ack_wait_secs = 5
[worker]
heartbeat_ms = 500
pull_expires_ms = 2000
[execution.paper.commission]
model = "bps"
rate = "1"
[accounts]
publish_interval_secs = 1
[accounts.initial_balances]
{ACCOUNT} = "{INITIAL}"
[accounts.instruments.GC]
multiplier = "100"
margin_per_contract = "11000"
[accounts.instruments.HG]
multiplier = "25000"
margin_per_contract = "6000"
"#,
            nats = nats.url(),
            mongo = mongo.uri(),
        ),
    )
    .unwrap();
    let cfg = Config::load(Some(&config)).unwrap();
    let topo = Topology::build(&cfg.topology);

    for args in [&["db", "migrate"][..], &["topology", "apply"][..]] {
        let out = mtx(&config).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    for strategy in ["SPX_1-D_Opt", "Forex"] {
        let mut set = mtx(&config)
            .args(["secrets", "set", strategy])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        set.stdin
            .take()
            .unwrap()
            .write_all(format!("{SECRET}\n").as_bytes())
            .unwrap();
        let out = set.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }

    // Strategy registry and the ACTIVE allocation, as Cerebro watches them.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let kv = |base: &'static str| {
        let js = js.clone();
        let name = topo.bucket(base).unwrap().to_string();
        async move { js.get_key_value(name).await.unwrap() }
    };
    let strategies = kv(buckets::STRATEGIES).await;
    for id in ["SPX_1-D_Opt", "Forex"] {
        let mut s = StrategyConfig::new(id);
        s.account = Some(ACCOUNT.to_string());
        s.expected_alpha = Some(d("0.05"));
        strategies
            .put(
                StrategyConfig::kv_key(id),
                serde_json::to_vec(&s).unwrap().into(),
            )
            .await
            .unwrap();
    }
    let allocation = serde_json::json!({
        "allocation_id": "e2e-alloc-1",
        "allocations": {"SPX_1-D_Opt": "89.36", "Forex": "20"}
    });
    kv(buckets::ALLOCATIONS)
        .await
        .put("active", serde_json::to_vec(&allocation).unwrap().into())
        .await
        .unwrap();

    let _pipeline = Running(
        mtx(&config)
            .args([
                "run",
                "gateway",
                "standardizer",
                "cerebro",
                "execution",
                "accounts",
                "sink",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{metrics}/readyz");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ok = http
            .get(&ready)
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "pipeline never became ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Cerebro needs the account's first state before it can size anything.
    let states = kv(buckets::ACCOUNT_STATE).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while states.get(ACCOUNT).await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no initial account state published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Send every fixture file, in order, with its waits shrunk 100 times.
    let gateway = format!("http://127.0.0.1:{port}");
    let mut accepted: Vec<(String, String)> = Vec::new(); // (file, signal_id)
    for file in fixtures() {
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        let out = mtx(&config)
            .args(["signal", "send"])
            .arg(&file)
            .args(["--gateway", &gateway, "--json", "--speed", "100"])
            .args(["--id-prefix", &stem])
            .output()
            .unwrap();
        assert!(out.status.success(), "{stem}: {}", text(&out));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["status"], 202, "{stem}: {v}");
            accepted.push((stem.clone(), v["signal_id"].as_str().unwrap().to_string()));
        }
        // Each file's exits find their entries' fills, and the next file is
        // sized against the account as these left it.
        settle(&js, &topo, &states).await;
    }
    assert_eq!(accepted.len(), 40);
    assert!(quiescent(&js, &topo).await, "pipeline never went quiet");

    // ---- the ledger -------------------------------------------------------
    let standardized: Vec<(String, Value)> = read(&js, &topo, streams::SIGNALS_STANDARDIZED).await;
    let decisions: Vec<(String, Value)> = read(&js, &topo, streams::CEREBRO_DECISIONS).await;
    let orders: Vec<(String, Value)> = read(&js, &topo, streams::ORDERS).await;
    let executions: Vec<(String, ExecutionConfirmation)> = read(&js, &topo, streams::EXECUTIONS)
        .await
        .into_iter()
        .map(|(s, v)| (s, serde_json::from_value(v).unwrap()))
        .collect();
    let dlq: Vec<(String, Value)> = read(&js, &topo, streams::DLQ).await;
    assert!(dlq.is_empty(), "unexpected dead letters: {dlq:#?}");

    let ids: BTreeSet<&str> = accepted.iter().map(|(_, id)| id.as_str()).collect();
    assert_eq!(ids.len(), 40, "signal ids are unique per signal");
    let std_ids: Vec<&str> = standardized
        .iter()
        .map(|(_, v)| v["signal_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        std_ids.iter().copied().collect::<BTreeSet<_>>(),
        ids,
        "one standardized signal per accepted signal"
    );
    assert_eq!(std_ids.len(), 40, "no standardized signal twice");
    let mut decision_of: BTreeMap<&str, &Value> = BTreeMap::new();
    for (_, v) in &decisions {
        let id = v["signal_id"].as_str().unwrap();
        assert!(
            decision_of.insert(id, v).is_none(),
            "two decisions for {id}"
        );
    }
    assert_eq!(
        decision_of.keys().copied().collect::<BTreeSet<_>>(),
        ids,
        "one decision per signal"
    );
    let mut summary = BTreeMap::<String, usize>::new();
    for (file, id) in &accepted {
        let v = decision_of[id.as_str()];
        let key = format!(
            "{file} {} {} {}",
            v["signal_type"].as_str().unwrap_or("?"),
            v["decision"].as_str().unwrap(),
            v["reason_code"].as_str().unwrap_or("")
        );
        *summary.entry(key).or_default() += 1;
    }
    eprintln!("decisions: {summary:#?}");
    // What a fund would expect of these files sent in this order: MARKET
    // entries fill at once, so the off-market CANCELs find nothing working;
    // the ladder's second exit asks for more than its entry opened and is
    // clamped; the second gold entry would take gross exposure past
    // MAX_LEVERAGE_GLOBAL (the off-market gold position is still open), so
    // its exit has nothing to close.
    let expected: BTreeMap<String, usize> = [
        ("crypto_btc_ladder_signal_1 ENTRY APPROVED approved", 3),
        ("crypto_btc_ladder_signal_1 EXIT APPROVED approved", 3),
        ("crypto_btc_simple_signal_1 ENTRY APPROVED approved", 1),
        ("crypto_btc_simple_signal_1 EXIT APPROVED approved", 1),
        ("equity_ladder_signal_1 ENTRY APPROVED approved", 3),
        ("equity_ladder_signal_1 EXIT APPROVED approved", 2),
        ("equity_ladder_signal_1 EXIT MODIFIED exit_clamped", 1),
        (
            "equity_offmarket_signal_1 CANCEL REJECTED nothing_to_cancel",
            1,
        ),
        ("equity_offmarket_signal_1 ENTRY APPROVED approved", 1),
        ("equity_pairs_signal_1 ENTRY APPROVED approved", 1),
        ("equity_pairs_signal_1 EXIT APPROVED approved", 1),
        ("equity_simple_short_signal_1 ENTRY APPROVED approved", 1),
        ("equity_simple_short_signal_1 EXIT APPROVED approved", 1),
        ("equity_simple_signal_1 ENTRY APPROVED approved", 1),
        ("equity_simple_signal_1 EXIT APPROVED approved", 1),
        ("forex_ladder_signal_1 ENTRY APPROVED approved", 3),
        ("forex_ladder_signal_1 EXIT APPROVED approved", 3),
        (
            "forex_offmarket_signal_1 CANCEL REJECTED nothing_to_cancel",
            1,
        ),
        ("forex_offmarket_signal_1 ENTRY APPROVED approved", 1),
        ("forex_simple_signal_1 ENTRY APPROVED approved", 1),
        ("forex_simple_signal_1 EXIT APPROVED approved", 1),
        (
            "futures_copper_offmarket_signal_1 CANCEL REJECTED nothing_to_cancel",
            1,
        ),
        (
            "futures_copper_offmarket_signal_1 ENTRY APPROVED approved",
            1,
        ),
        ("futures_copper_simple_signal_1 ENTRY APPROVED approved", 1),
        ("futures_copper_simple_signal_1 EXIT APPROVED approved", 1),
        (
            "futures_gold_offmarket_signal_1 CANCEL REJECTED nothing_to_cancel",
            1,
        ),
        ("futures_gold_offmarket_signal_1 ENTRY APPROVED approved", 1),
        (
            "futures_gold_simple_signal_1 ENTRY REJECTED max_leverage",
            1,
        ),
        (
            "futures_gold_simple_signal_1 EXIT REJECTED entry_not_opened",
            1,
        ),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(summary, expected, "decisions per file");
    for (_, v) in &decisions {
        let decision = v["decision"].as_str().unwrap();
        assert!(
            ["APPROVED", "REJECTED", "MODIFIED"].contains(&decision),
            "{v}"
        );
        if decision == "REJECTED" {
            assert!(
                !v["reason_code"].as_str().unwrap_or("").is_empty(),
                "a rejection carries its reason: {v}"
            );
        }
    }

    // The issue's worked example: AAPL 10 @150 from a 500,000 sender
    // against 1,000,000 × 89.36 % → 17 shares.
    let aapl_entry = accepted
        .iter()
        .find(|(f, _)| f == "equity_simple_signal_1")
        .map(|(_, id)| id.as_str())
        .unwrap();
    let aapl_order = orders
        .iter()
        .map(|(_, o)| o)
        .find(|o| o["signal_id"] == aapl_entry)
        .expect("the AAPL entry has an order");
    assert_eq!(aapl_order["instrument"], "AAPL");
    assert_eq!(aapl_order["order_type"], "MARKET");

    // Orders: one per approved leg, ids unique, each linked to its decision.
    let new_orders: Vec<Order> = orders
        .iter()
        .filter(|(s, _)| s.ends_with(".new"))
        .map(|(_, v)| serde_json::from_value(v.clone()).unwrap())
        .collect();
    let order_ids: BTreeSet<&str> = new_orders.iter().map(|o| o.order_id.as_str()).collect();
    assert_eq!(
        order_ids.len(),
        new_orders.len(),
        "no order published twice"
    );
    for o in &new_orders {
        let dec = decision_of
            .get(o.signal_id.as_str())
            .unwrap_or_else(|| panic!("order {} has no decision", o.order_id));
        assert_ne!(
            dec["decision"], "REJECTED",
            "a rejected signal made an order"
        );
        assert!(o.quantity > Decimal::ZERO);
        assert_eq!(o.account, ACCOUNT);
    }
    for (id, v) in &decision_of {
        if v["decision"] != "REJECTED" && v["signal_type"] != "CANCEL" {
            let legs = v["legs"].as_array().map(Vec::len).unwrap_or(0);
            let n = new_orders.iter().filter(|o| o.signal_id == *id).count();
            assert_eq!(n, legs.max(1), "orders of {id}: {v}");
        }
    }
    let aapl = new_orders
        .iter()
        .find(|o| o.signal_id == aapl_entry)
        .unwrap();
    assert_eq!(aapl.quantity, d("17"));
    let why = aapl.cerebro_decision.as_ref().unwrap();
    assert_eq!(why.margin_required, d("637.50"));
    // Equity has moved with the crypto files' P&L by now: 89.36 % of it.
    assert!(why.allocated_capital > d("893600"), "{why:?}");
    let aapl_fill = &executions
        .iter()
        .find(|(_, x)| x.order_id == aapl.order_id)
        .unwrap()
        .1;
    // No slippage configured and no mark published: the reference price;
    // commission 1 bp of 17 × 150.
    assert_eq!(aapl_fill.price, d("150"));
    assert_eq!(aapl_fill.commission, d("0.255"));

    // Fills: every MARKET order exactly once, for its whole quantity.
    let mut filled = BTreeMap::<&str, Decimal>::new();
    let mut exec_ids = BTreeSet::new();
    for (_, x) in &executions {
        assert!(exec_ids.insert(x.execution_id.clone()), "execution twice");
        assert_ne!(x.status, ExecutionStatus::Rejected, "{x:?}");
        *filled.entry(x.order_id.as_str()).or_default() += x.quantity;
    }
    for o in &new_orders {
        assert_eq!(
            filled.get(o.order_id.as_str()).copied(),
            Some(o.quantity),
            "fills of {} ({} {})",
            o.order_id,
            o.instrument,
            o.quantity
        );
    }
    assert_eq!(filled.len(), new_orders.len(), "a fill without an order");

    // Positions and cash recomputed from the fills alone.
    let initial = d(INITIAL);
    let mut cash = initial;
    let mut realized = Decimal::ZERO;
    let mut commissions = Decimal::ZERO;
    let mut book: BTreeMap<(String, String, Direction), Pos> = BTreeMap::new();
    // The documented cost-basis model: an exit removes cost pro rata
    // (rounded to 12 places; the closing exit removes the rest).
    for (_, x) in &executions {
        commissions += x.commission;
        let key = (x.strategy_id.clone(), x.instrument.clone(), x.direction);
        let p = book.entry(key).or_default();
        match x.action {
            SignalAction::Entry => {
                p.qty += x.quantity;
                p.cost += x.quantity * x.price;
            }
            SignalAction::Exit => {
                assert!(x.quantity <= p.qty, "exit larger than the position: {x:?}");
                let removed = if x.quantity == p.qty {
                    p.cost
                } else {
                    (p.cost * x.quantity / p.qty).round_dp(12)
                };
                let gain = (x.price * x.quantity - removed) * x.multiplier;
                realized += if x.direction == Direction::Long {
                    gain
                } else {
                    -gain
                };
                p.qty -= x.quantity;
                p.cost -= removed;
            }
        }
    }
    cash += realized - commissions;
    book.retain(|_, p| p.qty > Decimal::ZERO);

    let state: AccountState = loop {
        let e = states.get(ACCOUNT).await.unwrap().unwrap();
        let s: AccountState = serde_json::from_slice(&e).unwrap();
        if s.commissions == commissions {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(state.commissions, commissions);
    assert_eq!(state.realized_pnl, realized, "realized P&L");
    assert_eq!(state.cash_balance, cash, "cash");
    assert_eq!(
        state.equity,
        state.cash_balance + state.unrealized_pnl,
        "equity = cash + unrealized"
    );
    assert_eq!(
        state.margin_available,
        state.equity - state.margin_used,
        "margin available"
    );
    let live: BTreeMap<(String, String, Direction), (Decimal, Decimal)> = state
        .open_positions
        .iter()
        .map(|p| {
            (
                (p.strategy_id.clone(), p.instrument.clone(), p.direction),
                (p.quantity, p.entry_price),
            )
        })
        .collect();
    let mine: BTreeMap<(String, String, Direction), (Decimal, Decimal)> = book
        .iter()
        .map(|(k, p)| (k.clone(), (p.qty, p.cost / p.qty)))
        .collect();
    assert_eq!(live, mine, "open positions");
    let unrealized: Decimal = state.open_positions.iter().map(|p| p.unrealized_pnl).sum();
    assert_eq!(state.unrealized_pnl, unrealized);
    assert!(state.open_orders.is_empty(), "{:?}", state.open_orders);

    // A rebuild from the EXECUTIONS stream equals the live state.
    let (rebuilt, refused) = mtx_accounts::worker::rebuild(
        &js,
        &topo,
        mtx_accounts::worker::ledger_config(&cfg.accounts),
    )
    .await
    .unwrap();
    assert_eq!(refused, 0);
    let rebuilt = rebuilt.snapshot(ACCOUNT, state.timestamp);
    assert_eq!(rebuilt.cash_balance, state.cash_balance);
    assert_eq!(rebuilt.realized_pnl, state.realized_pnl);
    assert_eq!(rebuilt.commissions, state.commissions);
    assert_eq!(rebuilt.margin_used, state.margin_used);
    assert_eq!(rebuilt.open_positions, state.open_positions);

    // ---- MongoDB ------------------------------------------------------------
    let m = mongodb::Client::with_uri_str(mongo.uri()).await.unwrap();
    let db = m.database(&trading);
    let all = |name: &'static str| {
        let c = db.collection::<Document>(name);
        async move {
            c.find(doc! {})
                .await
                .unwrap()
                .try_collect::<Vec<_>>()
                .await
                .unwrap()
        }
    };
    // The sink writes asynchronously to the rest: wait for its last writes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = db
            .collection::<Document>("execution_confirmations")
            .count_documents(doc! {})
            .await
            .unwrap();
        let flagged = db
            .collection::<Document>("standardized_signals")
            .count_documents(doc! {"processed_by_cerebro": true})
            .await
            .unwrap();
        if n as usize == executions.len() && flagged == 40 {
            break;
        }
        assert!(Instant::now() < deadline, "sink never caught up");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let raw = all("raw_signals").await;
    assert_eq!(raw.len(), 40, "raw_signals");
    for r in &raw {
        assert_eq!(r.get_bool("processed").ok(), Some(true), "{r}");
        assert!(matches!(r.get("timestamp"), Some(Bson::DateTime(_))));
        assert!(matches!(r.get("created_at"), Some(Bson::DateTime(_))));
        assert!(matches!(r.get("raw_data"), Some(Bson::Document(_))));
        let raw_text = format!("{r}");
        assert!(!raw_text.contains(SECRET), "a passphrase reached Mongo");
    }
    let std_docs = all("standardized_signals").await;
    assert_eq!(
        std_docs
            .iter()
            .map(|s| s.get_str("signal_id").unwrap().to_string())
            .collect::<BTreeSet<_>>(),
        ids.iter().map(|s| s.to_string()).collect()
    );
    assert_eq!(std_docs.len(), 40);
    for s in &std_docs {
        assert!(matches!(s.get("timestamp"), Some(Bson::DateTime(_))), "{s}");
        assert!(
            ["ENTRY", "EXIT", "CANCEL"].contains(&s.get_str("signal_type").unwrap()),
            "{s}"
        );
        assert!(matches!(s.get("price"), Some(Bson::Decimal128(_))), "{s}");
        assert!(
            matches!(s.get("quantity"), Some(Bson::Decimal128(_))),
            "{s}"
        );
    }
    let dec_docs = all("cerebro_decisions").await;
    assert_eq!(dec_docs.len(), 40, "cerebro_decisions");
    for x in &dec_docs {
        assert!(["APPROVED", "REJECTED", "MODIFIED"].contains(&x.get_str("decision").unwrap()));
        assert!(
            matches!(x.get("original_quantity"), Some(Bson::Decimal128(_))),
            "{x}"
        );
        assert!(
            matches!(x.get("final_quantity"), Some(Bson::Decimal128(_))),
            "{x}"
        );
        assert!(matches!(x.get("timestamp"), Some(Bson::DateTime(_))), "{x}");
        assert!(x.get_document("risk_assessment").is_ok(), "{x}");
    }
    let order_docs = all("trading_orders").await;
    assert_eq!(order_docs.len(), new_orders.len(), "trading_orders");
    for o in &order_docs {
        assert!(order_ids.contains(o.get_str("order_id").unwrap()));
        assert_eq!(o.get_str("status").unwrap(), "FILLED", "{o}");
        assert!(
            matches!(o.get("quantity"), Some(Bson::Decimal128(_))),
            "{o}"
        );
        assert!(matches!(o.get("timestamp"), Some(Bson::DateTime(_))), "{o}");
        let cd = o.get_document("cerebro_decision").unwrap();
        assert!(
            matches!(cd.get("allocated_capital"), Some(Bson::Decimal128(_))),
            "{o}"
        );
        assert!(
            matches!(cd.get("margin_required"), Some(Bson::Decimal128(_))),
            "{o}"
        );
    }
    let fills = all("execution_confirmations").await;
    assert_eq!(fills.len(), executions.len());
    for f in &fills {
        assert!(exec_ids.contains(f.get_str("execution_id").unwrap()));
        assert!(matches!(f.get("price"), Some(Bson::Decimal128(_))), "{f}");
        assert!(
            matches!(f.get("commission"), Some(Bson::Decimal128(_))),
            "{f}"
        );
        assert!(["BUY", "SELL"].contains(&f.get_str("side").unwrap()));
        assert_eq!(f.get_str("status").unwrap(), "FILLED");
    }
    // The latest account snapshot in Mongo is the live state.
    let last = db
        .collection::<Document>("account_state")
        .find_one(doc! {"account": ACCOUNT})
        .sort(doc! {"timestamp": -1})
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(last.get("equity"), Some(Bson::Decimal128(_))),
        "{last}"
    );
    // Natural keys are unique indexes, so nothing above can be a duplicate.
    for (coll, key) in [
        ("standardized_signals", "signal_id"),
        ("trading_orders", "order_id"),
        ("execution_confirmations", "execution_id"),
    ] {
        let names: Vec<String> = db
            .collection::<Document>(coll)
            .list_index_names()
            .await
            .unwrap();
        let indexes = db
            .collection::<Document>(coll)
            .list_indexes()
            .await
            .unwrap()
            .try_collect::<Vec<_>>()
            .await
            .unwrap();
        assert!(
            indexes.iter().any(|i| i.keys == doc! {key: 1}
                && i.options.as_ref().and_then(|o| o.unique) == Some(true)),
            "{coll}.{key} unique index: {names:?}"
        );
    }
    let _ = core;
}
