//! The gateway's answers against a real nats-server: 400 naming the field for
//! every bad-input case, 401, 413, 429, 503 when NATS is down, dedupe of a
//! repeated signalID, the TradingView route, and nothing refused ever
//! reaching the bus.

mod common;

use common::*;
use mtx_harness::unique;
use mtx_schemas::signal::{ContentFormat, RawSignal};
use mtx_schemas::{SignalType, SizingMode};
use mtx_subjects::topology::streams;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn good() -> Value {
    json!({
        "strategy_name": "SPX_1-D_Opt",
        "signalID": unique("g"),
        "passphrase": SECRET,
        "signal_type": "ENTRY",
        "account_equity": 500000,
        "signal_legs": [{
            "instrument": "AAPL", "instrument_type": "STOCK", "action": "BUY",
            "direction": "LONG", "quantity": 10, "order_type": "MARKET", "price": 150.0
        }]
    })
}

fn set(mut v: Value, path: &[&str], value: Option<Value>) -> Value {
    let mut cur = &mut v;
    for p in &path[..path.len() - 1] {
        cur = match p.parse::<usize>() {
            Ok(i) => &mut cur[i],
            Err(_) => &mut cur[*p],
        };
    }
    let map = cur.as_object_mut().unwrap();
    let last = path[path.len() - 1].to_string();
    match value {
        Some(x) => map.insert(last, x),
        None => map.remove(&last),
    };
    v
}

fn leg(key: &str, value: Value) -> Value {
    set(good(), &["signal_legs", "0", key], Some(value))
}

/// POST `body` with `Transfer-Encoding: chunked` (no Content-Length); the status.
async fn chunked_status(s: &Stack, body: &Value) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bytes = serde_json::to_vec(body).unwrap();
    let mut conn = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = format!(
        "POST /v1/signals HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        s.addr
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    for chunk in bytes.chunks(1000) {
        let _ = conn
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await;
        let _ = conn.write_all(chunk).await;
        let _ = conn.write_all(b"\r\n").await;
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = conn.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_get_the_right_status_code_and_field_and_never_reach_the_bus() {
    let s = Stack::start(|c| c.gateway.max_body_bytes = 4096).await;
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            set(good(), &["signal_legs"], None),
            400,
            "unknown_shape",
            "payload",
        ),
        (
            set(good(), &["strategy_name"], None),
            400,
            "missing_strategy",
            "strategy_name",
        ),
        (
            set(good(), &["signal_legs"], Some(json!([]))),
            400,
            "empty_legs",
            "signal_legs",
        ),
        (
            leg("quantity", json!(0)),
            400,
            "non_positive_quantity",
            "signal_legs[0].quantity",
        ),
        (
            leg("quantity", json!("-3")),
            400,
            "non_positive_quantity",
            "signal_legs[0].quantity",
        ),
        (
            leg("instrument_type", json!("BOND")),
            400,
            "unknown_instrument_type",
            "signal_legs[0].instrument_type",
        ),
        (
            set(
                leg("instrument_type", json!("FOREX")),
                &["signal_legs", "0", "instrument"],
                Some(json!("EURUSDX")),
            ),
            400,
            "invalid_forex_symbol",
            "signal_legs[0].instrument",
        ),
        (
            leg("instrument_type", json!("FUTURE")),
            400,
            "future_without_expiry",
            "signal_legs[0].expiry",
        ),
        (
            leg("price", json!("12,5")),
            400,
            "invalid_number",
            "signal_legs[0].price",
        ),
        (
            set(good(), &["signal_sent_EPOCH"], Some(json!("yesterday"))),
            400,
            "invalid_date",
            "signal_sent_EPOCH",
        ),
        (
            set(good(), &["passphrase"], Some(json!("wrong-password-1"))),
            401,
            "unauthorized",
            "passphrase",
        ),
        (
            set(good(), &["passphrase"], None),
            401,
            "unauthorized",
            "passphrase",
        ),
        (
            set(good(), &["strategy_name"], Some(json!("NoSecretStrategy"))),
            401,
            "unauthorized",
            "passphrase",
        ),
    ];
    for (i, (body, status, code, field)) in cases.iter().enumerate() {
        let (got, answer) = s.post("/v1/signals", body).await;
        assert_eq!(got, *status, "case {i} ({code}): {answer}");
        assert_eq!(answer["error"], *code, "case {i}: {answer}");
        assert_eq!(answer["field"], *field, "case {i}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(
            message.contains(field) || *status == 401,
            "case {i}: the message names the field: {message}"
        );
        assert!(!message.contains(SECRET));
    }
    // Not JSON.
    let (got, answer) = s
        .post_bytes("/v1/signals", b"{\"strategy_name\": ".to_vec())
        .await;
    assert_eq!(
        (got, answer["error"].as_str()),
        (400, Some("invalid_json")),
        "{answer}"
    );
    // Too large (413) whether or not the client declares the length.
    let mut big = good();
    big["padding"] = json!("x".repeat(5000));
    let (got, answer) = s.post("/v1/signals", &big).await;
    assert_eq!(
        (got, answer["error"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert_eq!(
        chunked_status(&s, &big).await,
        413,
        "chunked, no Content-Length"
    );
    assert_eq!(
        chunked_status(&s, &good()).await,
        202,
        "chunked within the cap"
    );
    // Wrong TradingView secret.
    let (got, _) = s
        .post(
            "/v1/webhooks/tradingview/TV_Strategy",
            &json!({"ticker": "EURUSD", "action": "buy", "contracts": "2", "secret": "nope-nope-nope"}),
        )
        .await;
    assert_eq!(got, 401);

    let raw = s.messages(streams::SIGNALS_RAW).await;
    assert_eq!(
        raw.len(),
        1,
        "only the one accepted (chunked) signal is published"
    );
    s.assert_secret_nowhere().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_signal_id_is_one_signal_with_the_same_id() {
    let s = Stack::start(|_| {}).await;
    let body = good();
    let (a, first) = s.post("/v1/signals", &body).await;
    let (b, second) = s.post("/v1/signals", &body).await;
    assert_eq!((a, b), (202, 202));
    assert_eq!(first["signal_id"], second["signal_id"]);
    assert_eq!(
        (first["duplicate"].as_bool(), second["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
    // Same signalID, different content (a sender retrying with a fresh
    // timestamp): still the same signal.
    let mut changed = body.clone();
    changed["signal_sent_EPOCH"] = json!(1763632800);
    let (_, third) = s.post("/v1/signals", &changed).await;
    assert_eq!(third["signal_id"], first["signal_id"]);
    // A body without signalID gets a fingerprint id: identical bodies collapse.
    let anon = set(good(), &["signalID"], None);
    let (_, x) = s.post("/v1/signals", &anon).await;
    let (_, y) = s.post("/v1/signals", &anon).await;
    assert_eq!(x["signal_id"], y["signal_id"]);
    assert!(x["sender_signal_id"].as_str().unwrap().starts_with("body_"));

    let std = s.standardized(2).await;
    assert_eq!(std.len(), 2, "one standardized signal per distinct signal");
    assert_eq!(std[0].signal_id, first["signal_id"]);
    assert_eq!(std[1].signal_id, x["signal_id"]);
    assert_eq!(s.messages(streams::SIGNALS_RAW).await.len(), 2);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_after_the_duplicate_window_is_still_one_signal() {
    let s = Stack::start(|c| c.topology.duplicate_window_secs = 1).await;
    let body = good();
    let (_, first) = s.post("/v1/signals", &body).await;
    s.standardized(1).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (status, again) = s.post("/v1/signals", &body).await;
    assert_eq!(status, 202);
    assert_eq!(again["signal_id"], first["signal_id"]);
    assert_eq!(again["duplicate"], false, "the raw stream forgot it...");
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(s.messages(streams::SIGNALS_RAW).await.len(), 2);
    assert_eq!(
        s.standardized(1).await.len(),
        1,
        "...the standardizer did not"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_rate_limit_answers_429_with_retry_after() {
    let s = Stack::start(|c| {
        c.gateway.rate_limit_per_sec = 1;
        c.gateway.rate_limit_burst = 2;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(s.post("/v1/signals", &good()).await.0);
    }
    assert_eq!(statuses, vec![202, 202, 429]);
    let r = s
        .http
        .post(s.url("/v1/signals"))
        .json(&good())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().get("retry-after").is_some());
    // Another strategy has its own budget.
    let forex = set(good(), &["strategy_name"], Some(json!("Forex")));
    assert_eq!(s.post("/v1/signals", &forex).await.0, 202);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(s.post("/v1/signals", &good()).await.0, 202, "refilled");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_passphrases_never_use_up_the_senders_rate_limit() {
    let s = Stack::start(|c| {
        c.gateway.rate_limit_per_sec = 1;
        c.gateway.rate_limit_burst = 5;
    })
    .await;
    // The strategy name is public (it is in webhook URLs); the secret is not.
    let forged = set(good(), &["passphrase"], Some(json!("not-the-secret")));
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(s.post("/v1/signals", &forged).await.0);
    }
    assert_eq!(statuses, vec![401, 401, 401, 401, 401, 429, 429]);
    let (status, answer) = s.post("/v1/signals", &good()).await;
    assert_eq!(status, 202, "{answer}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_strategy_name_does_not_hide_strategy() {
    let s = Stack::start(|_| {}).await;
    let body = set(
        set(good(), &["strategy_name"], Some(json!(""))),
        &["strategy"],
        Some(json!("SPX_1-D_Opt")),
    );
    let (status, answer) = s.post("/v1/signals", &body).await;
    assert_eq!(status, 202, "{answer}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_is_503_never_a_silent_loss() {
    let mut s = Stack::start(|c| c.gateway.publish_timeout_ms = 1_000).await;
    let (status, _) = s.post("/v1/signals", &good()).await;
    assert_eq!(status, 202);
    s.nats.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lost = good();
    let started = Instant::now();
    let (status, answer) = s.post("/v1/signals", &lost).await;
    assert_eq!(status, 503, "{answer}");
    assert_eq!(answer["error"], "unavailable");
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "answers well within TradingView's 3 s"
    );
    s.nats.restart();
    // The sender retries the same body until accepted.
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let (status, answer) = s.post("/v1/signals", &lost).await;
        if status == 202 {
            break answer["signal_id"].as_str().unwrap().to_string();
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "gateway never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let std = s.standardized(2).await;
    assert_eq!(std.len(), 2);
    assert_eq!(std[1].signal_id, id);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tradingview_alert_is_authenticated_by_route_and_standardized() {
    let s = Stack::start(|c| {
        c.gateway
            .tradingview_instrument_types
            .insert("TV_Strategy".into(), mtx_schemas::InstrumentType::Forex);
    })
    .await;
    let alert = json!({
        "ticker": "EURUSD", "action": "buy", "contracts": "20000", "price": "1.0850",
        "market_position": "long", "prev_market_position": "flat",
        "alert_id": unique("tv"), "time": "2025-11-20T14:30:00Z", "secret": SECRET
    });
    let (status, answer) = s.post("/v1/webhooks/tradingview/TV_Strategy", &alert).await;
    assert_eq!(status, 202, "{answer}");
    // The route's strategy is the one authenticated, whatever the body says.
    let (status, _) = s
        .post("/v1/webhooks/tradingview/NoSecretStrategy", &alert)
        .await;
    assert_eq!(status, 401);
    let std = s.standardized(1).await;
    assert_eq!(std.len(), 1);
    let sig = &std[0];
    assert_eq!(sig.signal_id, answer["signal_id"]);
    assert_eq!(sig.source, "tradingview");
    assert_eq!(sig.strategy_id, "TV_Strategy");
    assert_eq!(sig.signal_type, Some(SignalType::Entry));
    assert_eq!(sig.instrument, "EURUSD");
    assert_eq!(
        sig.legs[0].instrument_type,
        mtx_schemas::InstrumentType::Forex
    );
    assert_eq!(sig.quantity, "20000".parse().unwrap());
    assert_eq!(sig.sizing_mode, SizingMode::DeltaUnits);
    let raw: RawSignal =
        serde_json::from_slice(&s.messages(streams::SIGNALS_RAW).await[0].payload).unwrap();
    assert_eq!(raw.format, ContentFormat::TradingView);
    assert_eq!(raw.strategy_hint.as_deref(), Some("TV_Strategy"));
    assert!(raw.payload.get("secret").is_none());
    s.assert_secret_nowhere().await;
    s.stop().await;
}
