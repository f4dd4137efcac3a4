//! The standardizer stage against a real nats-server: raw envelopes published
//! straight to `signals.raw.<env>.<source>` (door 2), one standardized signal
//! out per accepted signal, every bad input dead-lettered with its reason, and
//! the dedupe protocol (re-sends, redeliveries, crash leftovers).

mod common;

use async_nats::jetstream;
use bytes::Bytes;
use common::{fixture_path, load_fixture, SECRET};
use mtx_harness::{unique, NatsServer};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::headers;
use mtx_schemas::signal::{ContentFormat, RawSignal, StandardizedSignal};
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::{Environment, SignalType, SizingMode};
use mtx_standardizer::worker::{self, dedupe_key};
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Stack {
    _nats: NatsServer,
    js: jetstream::Context,
    subjects: Subjects,
    topo: Topology,
    shutdown: CancellationToken,
    waiter: Option<tokio::task::JoinHandle<()>>,
}

impl Stack {
    async fn start(tune: impl FnOnce(&mut Config)) -> Stack {
        let nats = NatsServer::start();
        let mut c = Config::default();
        if let Ok(level) = std::env::var("TEST_LOG") {
            c.log.level = level;
            mtx_runtime::telemetry::init(&c.log);
        }
        c.nats.url = nats.url();
        c.metrics.addr = "127.0.0.1:0".into();
        c.topology.prefix = unique("s");
        c.worker.heartbeat_ms = 500;
        c.worker.pull_expires_ms = 2_000;
        c.worker.publish_retry_delay_ms = 200;
        tune(&mut c);
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = jetstream::new(client);
        let topo = Topology::build(&c.topology);
        mtx_subjects::apply::apply(&js, &topo).await.unwrap();
        let shutdown = CancellationToken::new();
        let mut p = Process::start(c.clone(), shutdown.clone()).await.unwrap();
        worker::spawn(&mut p).unwrap();
        let waiter = tokio::spawn(p.wait());
        let s = Stack {
            _nats: nats,
            js,
            subjects: Subjects::new(&c.topology.prefix),
            topo,
            shutdown,
            waiter: Some(waiter),
        };
        for (id, mode, alpha) in [
            ("SPX_1-D_Opt", SizingMode::SenderEquityRatio, "0.02"),
            ("Forex", SizingMode::TargetWeight, "0.01"),
        ] {
            s.put_strategy(id, mode, alpha).await;
        }
        s
    }

    async fn put_strategy(&self, id: &str, mode: SizingMode, alpha: &str) {
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

    fn raw(&self, source: &str, payload: Value) -> RawSignal {
        RawSignal {
            source: source.into(),
            environment: Environment::Staging,
            received_at: common::received_at(),
            format: ContentFormat::Mathematricks,
            strategy_hint: None,
            instrument_type_hint: None,
            fallback_signal_id: None,
            futures_front_month: false,
            payload,
        }
    }

    /// Publish bytes on `signals.raw.staging.<source>` with a fresh msg id.
    async fn publish_bytes(&self, source: &str, body: Vec<u8>) {
        let subject = self
            .subjects
            .signals_raw(Environment::Staging, source)
            .unwrap();
        let mut h = async_nats::HeaderMap::new();
        h.insert(headers::MSG_ID, unique("m").as_str());
        h.insert(headers::RECEIVED_AT, "1700000000000000000");
        self.js
            .publish_with_headers(subject, h, Bytes::from(body))
            .await
            .unwrap()
            .await
            .unwrap();
    }

    async fn publish(&self, raw: &RawSignal) {
        self.publish_bytes(&raw.source, serde_json::to_vec(raw).unwrap())
            .await;
    }

    async fn messages(&self, base: &str) -> Vec<jetstream::Message> {
        mtx_harness::bus::read_all(&self.js, &self.topo.stream_name(base), ">").await
    }

    async fn standardized(&self) -> Vec<StandardizedSignal> {
        self.messages(streams::SIGNALS_STANDARDIZED)
            .await
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
    }

    /// Wait until `base` holds `n` messages, then a little longer to catch extras.
    async fn wait_count(&self, base: &str, n: usize) -> Vec<jetstream::Message> {
        let start = std::time::Instant::now();
        loop {
            let got = self.messages(base).await;
            if got.len() >= n || start.elapsed() > Duration::from_secs(20) {
                tokio::time::sleep(Duration::from_millis(700)).await;
                return self.messages(base).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(w) = self.waiter.take() {
            let _ = w.await;
        }
    }
}

fn header<'a>(m: &'a jetstream::Message, name: &str) -> Option<&'a str> {
    m.headers.as_ref()?.get(name).map(|v| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_files_standardize_over_the_bus_with_strategy_config() {
    let s = Stack::start(|_| {}).await;
    let mut sent = Vec::new();
    for file in [
        "futures_gold_simple_signal_1.json",
        "forex_simple_signal_1.json",
        "equity_pairs_signal_1.json",
    ] {
        assert!(fixture_path(file).exists());
        for payload in load_fixture(file) {
            let raw = s.raw("mathematricks", payload);
            s.publish(&raw).await;
            sent.push(raw);
        }
    }
    let msgs = s
        .wait_count(streams::SIGNALS_STANDARDIZED, sent.len())
        .await;
    assert_eq!(msgs.len(), sent.len());
    let signals = s.standardized().await;
    for (raw, (m, sig)) in sent.iter().zip(msgs.iter().zip(&signals)) {
        let parsed = mtx_standardizer::parse_raw_signal(raw).unwrap();
        assert_eq!(sig.signal_id, parsed.signal_id());
        let want_subject = s
            .subjects
            .signal_standardized(Environment::Staging, parsed.strategy(), &sig.signal_id)
            .unwrap();
        assert_eq!(m.subject.as_str(), want_subject);
        assert_eq!(
            header(m, headers::MSG_ID),
            Some(dedupe_key(Environment::Staging, &sig.signal_id).as_str())
        );
        assert_eq!(header(m, headers::SIGNAL_ID), Some(sig.signal_id.as_str()));
        assert_eq!(header(m, headers::RECEIVED_AT), Some("1700000000000000000"));
        // expected_alpha and sizing come from the strategy configuration.
        match sig.strategy_id.as_str() {
            "SPX_1-D_Opt" => {
                assert_eq!(sig.metadata.expected_alpha, Some("0.02".parse().unwrap()));
                assert_eq!(sig.sizing_mode, SizingMode::SenderEquityRatio);
            }
            "Forex" => {
                assert_eq!(sig.metadata.expected_alpha, Some("0.01".parse().unwrap()));
                assert_eq!(sig.sizing_mode, SizingMode::TargetWeight);
            }
            other => panic!("unexpected strategy {other}"),
        }
    }
    // Links: each EXIT names its entry's mtx id; the pair stays one signal.
    for pair in signals.chunks(2) {
        assert_eq!(pair[0].signal_type, Some(SignalType::Entry));
        assert_eq!(pair[1].signal_type, Some(SignalType::Exit));
        assert_eq!(pair[1].entry_signal_id.as_ref(), Some(&pair[0].signal_id));
    }
    assert_eq!(signals[4].legs.len(), 2);
    assert_eq!(signals[4].legs[1].instrument, "NVDA");
    for m in s.messages(streams::SIGNALS_STANDARDIZED).await {
        assert!(!String::from_utf8_lossy(&m.payload).contains(SECRET));
    }
    assert!(s.messages(streams::DLQ).await.is_empty());
    s.stop().await;
}

/// One valid Mathematricks body, for mutation.
fn good() -> Value {
    json!({
        "strategy_name": "SPX_1-D_Opt",
        "signalID": unique("b"),
        "signal_type": "ENTRY",
        "account_equity": 500000,
        "signal_legs": [{
            "instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY",
            "direction": "LONG", "quantity": 10, "order_type": "MARKET", "price": 150.0
        }]
    })
}

fn with(mut v: Value, path: &[&str], value: Value) -> Value {
    let mut cur = &mut v;
    for p in &path[..path.len() - 1] {
        cur = match p.parse::<usize>() {
            Ok(i) => &mut cur[i],
            Err(_) => &mut cur[*p],
        };
    }
    let last = path[path.len() - 1];
    match cur {
        Value::Object(m) if value.is_null() => {
            m.remove(last);
        }
        Value::Object(m) => {
            m.insert(last.to_string(), value);
        }
        _ => panic!("bad path"),
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_dead_lettered_with_their_reason_and_bytes() {
    let s = Stack::start(|_| {}).await;
    let leg = |k: &str, v: Value| with(good(), &["signal_legs", "0", k], v);
    let cases: Vec<(&str, Value)> = vec![
        ("unknown_shape", with(good(), &["signal_legs"], Value::Null)),
        (
            "missing_strategy",
            with(good(), &["strategy_name"], Value::Null),
        ),
        ("empty_legs", with(good(), &["signal_legs"], json!([]))),
        ("non_positive_quantity", leg("quantity", json!(0))),
        (
            "unknown_instrument_type",
            leg("instrument_type", json!("BOND")),
        ),
        (
            "invalid_forex_symbol",
            with(
                leg("instrument_type", json!("FOREX")),
                &["signal_legs", "0", "instrument"],
                json!("EURUSDX"),
            ),
        ),
        (
            "future_without_expiry",
            leg("instrument_type", json!("FUTURE")),
        ),
        ("invalid_number", leg("price", json!("12,5"))),
        (
            "invalid_date",
            with(good(), &["signal_sent_EPOCH"], json!("yesterday")),
        ),
        (
            "unknown_strategy",
            with(good(), &["strategy_name"], json!("NoSuchStrategy")),
        ),
    ];
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    for (reason, payload) in &cases {
        let body = serde_json::to_vec(&s.raw("mathematricks", payload.clone())).unwrap();
        s.publish_bytes("mathematricks", body.clone()).await;
        expected.push((reason.to_string(), body));
    }
    // Envelope-level problems.
    let not_json = b"{not json".to_vec();
    s.publish_bytes("mathematricks", not_json.clone()).await;
    expected.push(("invalid_json".into(), not_json));
    let not_envelope = serde_json::to_vec(&good()).unwrap();
    s.publish_bytes("mathematricks", not_envelope.clone()).await;
    expected.push(("invalid_envelope".into(), not_envelope));
    let mut lying = s.raw("mathematricks", good());
    lying.environment = Environment::Production;
    let lying = serde_json::to_vec(&lying).unwrap();
    s.publish_bytes("mathematricks", lying.clone()).await;
    expected.push(("envelope_mismatch".into(), lying));
    let other_source = serde_json::to_vec(&s.raw("someone_else", good())).unwrap();
    s.publish_bytes("mathematricks", other_source.clone()).await;
    expected.push(("envelope_mismatch".into(), other_source));

    let dlq = s.wait_count(streams::DLQ, expected.len()).await;
    assert_eq!(dlq.len(), expected.len());
    for (m, (reason, body)) in dlq.iter().zip(&expected) {
        assert_eq!(header(m, headers::DLQ_REASON), Some(reason.as_str()));
        assert_eq!(header(m, headers::DLQ_STAGE), Some("standardizer"));
        assert_eq!(m.subject.as_str(), s.subjects.dlq("standardizer").unwrap());
        assert_eq!(&m.payload[..], &body[..], "{reason}: original bytes kept");
        let detail = header(m, headers::DLQ_DETAIL).unwrap_or_default();
        assert!(!detail.is_empty(), "{reason}");
    }
    // The detail names the field.
    assert!(header(&dlq[3], headers::DLQ_DETAIL)
        .unwrap()
        .starts_with("signal_legs[0].quantity"));
    assert!(s.standardized().await.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resends_and_redeliveries_yield_one_standardized_signal() {
    // A 2 s duplicate window so the re-send below is beyond it.
    let s = Stack::start(|c| c.topology.duplicate_window_secs = 2).await;
    let payload = good();
    let raw = s.raw("mathematricks", payload.clone());
    // The same signal three times (distinct raw msg ids: JetStream cannot
    // drop them), once concurrently, once after the window.
    s.publish(&raw).await;
    s.publish(&raw).await;
    s.wait_count(streams::SIGNALS_STANDARDIZED, 1).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    s.publish(&raw).await;
    // A different body with the same signalID is the same signal.
    s.publish(&s.raw(
        "mathematricks",
        with(payload, &["signal_legs", "0", "quantity"], json!(11)),
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let out = s.wait_count(streams::SIGNALS_STANDARDIZED, 1).await;
    assert_eq!(out.len(), 1, "one standardized signal");
    let sig: StandardizedSignal = serde_json::from_slice(&out[0].payload).unwrap();
    assert_eq!(sig.quantity, "10".parse().unwrap());
    // On a subject of its own, which is what makes the late re-send a
    // duplicate: the stream refuses a second message there.
    assert_eq!(
        out[0].subject.as_str(),
        s.subjects
            .signal_standardized(Environment::Staging, "SPX_1-D_Opt", &sig.signal_id)
            .unwrap()
    );
    assert_eq!(
        header(&out[0], headers::MSG_ID),
        Some(dedupe_key(Environment::Staging, &sig.signal_id).as_str())
    );
    // The same sender id in production is a different signal.
    let mut prod = raw.clone();
    prod.environment = Environment::Production;
    let subject = s
        .subjects
        .signals_raw(Environment::Production, "mathematricks")
        .unwrap();
    s.js.publish(subject, serde_json::to_vec(&prod).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let out = s.wait_count(streams::SIGNALS_STANDARDIZED, 2).await;
    assert_eq!(out.len(), 2);
    assert!(s.messages(streams::DLQ).await.is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leftovers_neither_lose_nor_duplicate() {
    let s = Stack::start(|c| c.topology.duplicate_window_secs = 2).await;

    // (a) Died after the publish, before acking the raw message, and the raw
    // message came back after the duplicate window (so JetStream's id check
    // no longer helps): the stream refuses a second message on the signal's
    // subject, nothing is republished.
    let a = s.raw("mathematricks", good());
    let id_a = mtx_standardizer::parse_raw_signal(&a).unwrap().signal_id();
    let key_a = dedupe_key(Environment::Staging, &id_a);
    let subject = s
        .subjects
        .signal_standardized(Environment::Staging, "SPX_1-D_Opt", &id_a)
        .unwrap();
    let mut h = async_nats::HeaderMap::new();
    h.insert(headers::MSG_ID, key_a.as_str());
    s.js.publish_with_headers(subject, h, Bytes::from_static(b"{\"earlier\":true}"))
        .await
        .unwrap()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    s.publish(&a).await;

    // (b) Died before the publish: the redelivery publishes.
    let b = s.raw("mathematricks", good());
    let key_b = dedupe_key(
        Environment::Staging,
        &mtx_standardizer::parse_raw_signal(&b).unwrap().signal_id(),
    );
    s.publish(&b).await;

    let out = s.wait_count(streams::SIGNALS_STANDARDIZED, 2).await;
    let ids: Vec<&str> = out
        .iter()
        .filter_map(|m| header(m, headers::MSG_ID))
        .collect();
    assert_eq!(
        ids,
        vec![key_a.as_str(), key_b.as_str()],
        "a and b exactly once each"
    );
    assert_eq!(
        &out[0].payload[..],
        b"{\"earlier\":true}",
        "a is the earlier copy only"
    );
    assert!(s.messages(streams::DLQ).await.is_empty());
    s.stop().await;
}
