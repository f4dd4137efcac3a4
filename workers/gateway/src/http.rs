//! The HTTP routes.
//!
//! | route | source | body |
//! |---|---|---|
//! | `POST /v1/signals` | `gateway.source` (default `mathematricks`) | Mathematricks format, secret in `passphrase` |
//! | `POST /v1/webhooks/tradingview/{strategy}` | `tradingview` | TradingView alert JSON, secret in `secret` / `passphrase` |
//!
//! Every request goes through the same steps, each with its own answer:
//!
//! | step | failure |
//! |---|---|
//! | body within `gateway.max_body_bytes` | 413 `payload_too_large` |
//! | body is JSON | 400 `invalid_json` |
//! | secret removed from the body (it is never logged, stored or published) | |
//! | strategy named (body, or the route for TradingView) | 400 `missing_strategy` / the parser's error |
//! | strategy has a secret hash | 401 `unauthorized` (503 while the hashes are not loaded) |
//! | rate limit: `<source>/<strategy>` for a matching secret, a bucket of its own for a wrong one (so wrong passphrases never use up the sender's signals) | 429 `rate_limited` with `Retry-After` |
//! | secret matches (constant time) | 401 `unauthorized` |
//! | body parses (the standardizer's own rules) | 400 with the reason code and the field path |
//! | NATS connected, JetStream acked within `gateway.publish_timeout_ms` | 503 `unavailable` |
//!
//! Success is `202 {"signal_id", "sender_signal_id", "duplicate"}`, sent only
//! after JetStream stored the raw signal. The message id is
//! `<env>.<signal_id>` (see `mtx_standardizer::worker::dedupe_key`), and the
//! signal id is deterministic from (source, strategy, sender `signalID`, or a
//! fingerprint of the body when it has none), so a re-sent signal gets the
//! same id back and is stored once (`duplicate: true` within the stream's
//! duplicate window; the standardizer collapses later re-sends).
//! The environment is the gateway's configured one, never the payload's.

use crate::limit::RateLimiter;
use crate::secrets::{Lookup, SecretStore};
use async_nats::connection::State as ConnState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mtx_runtime::publish::Publisher;
use mtx_runtime::Outgoing;
use mtx_schemas::headers;
use mtx_schemas::signal::{ContentFormat, RawSignal};
use mtx_schemas::{Environment, InstrumentType};
use mtx_standardizer::worker::dedupe_key;
use mtx_standardizer::{parse_raw, payload_fingerprint, strip_secret, ParseContext, SignalError};
use mtx_subjects::Subjects;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Source name of the TradingView route.
pub const TRADINGVIEW_SOURCE: &str = "tradingview";

/// Gateway request metrics.
#[derive(Clone)]
pub struct GatewayMetrics {
    /// Requests by route and HTTP status.
    pub requests: IntCounterVec,
    /// Request → response time by route.
    pub seconds: HistogramVec,
}

impl GatewayMetrics {
    /// Create and register on `registry`.
    pub fn new(registry: &Registry) -> prometheus::Result<GatewayMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "mtx_gateway_requests_total",
                "Gateway requests by route and HTTP status",
            ),
            &["route", "status"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "mtx_gateway_request_duration_seconds",
                "Gateway request to response time (202 includes the JetStream ack)",
            )
            .buckets(mtx_runtime::metrics::latency_buckets()),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(GatewayMetrics { requests, seconds })
    }
}

/// Everything the routes need (built once by [`crate::serve`]).
pub struct Gateway {
    /// Environment stamped on every raw signal.
    pub environment: Environment,
    /// Source name of `/v1/signals`.
    pub source: String,
    /// Subject builder.
    pub subjects: Subjects,
    /// Publisher (stage label `gateway`).
    pub publisher: Publisher,
    /// The NATS client (connection state is checked before publishing).
    pub client: async_nats::Client,
    /// Secret hashes.
    pub secrets: SecretStore,
    /// Per-source rate limit.
    pub limiter: RateLimiter,
    /// Body size cap.
    pub max_body_bytes: usize,
    /// JetStream ack budget.
    pub publish_timeout: Duration,
    /// Accept futures without expiry.
    pub futures_front_month: bool,
    /// Default instrument type of TradingView alerts per strategy.
    pub tradingview_instrument_types: BTreeMap<String, InstrumentType>,
    /// Metrics.
    pub metrics: Option<GatewayMetrics>,
}

/// The 202 body.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Accepted {
    /// mtx signal id (deterministic).
    pub signal_id: String,
    /// The sender's id, or the body fingerprint the gateway used.
    pub sender_signal_id: String,
    /// JetStream already held this signal (a re-send within the duplicate window).
    pub duplicate: bool,
}

/// An error answer: status plus `{"error", "field", "message"}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code (the parser's reason codes for 400s).
    pub code: &'static str,
    /// Offending field path, when there is one.
    pub field: Option<String>,
    /// Human-readable message.
    pub message: String,
    /// `Retry-After` seconds (429 / 503).
    pub retry_after: Option<u64>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    message: &'a str,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            field: None,
            message: message.into(),
            retry_after: None,
        }
    }

    fn field(mut self, field: impl Into<String>) -> ApiError {
        self.field = Some(field.into());
        self
    }

    fn unauthorized(strategy: &str) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            format!("missing or wrong secret for strategy `{strategy}`"),
        )
        .field("passphrase")
    }

    fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }
}

impl From<SignalError> for ApiError {
    fn from(e: SignalError) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, e.reason_code(), e.to_string()).field(e.field())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            field: self.field.as_deref(),
            message: &self.message,
        };
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

/// What the route fixes about a request.
struct Route {
    label: &'static str,
    source: String,
    format: ContentFormat,
    /// TradingView: the path's strategy (authoritative).
    strategy: Option<String>,
}

/// The gateway's router.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/signals", post(post_signal))
        .route(
            "/v1/webhooks/tradingview/{strategy}",
            post(post_tradingview),
        )
        .with_state(gw)
}

async fn post_signal(State(gw): State<Arc<Gateway>>, headers: HeaderMap, body: Body) -> Response {
    let route = Route {
        label: "signals",
        source: gw.source.clone(),
        format: ContentFormat::Mathematricks,
        strategy: None,
    };
    respond(&gw, route, &headers, body).await
}

async fn post_tradingview(
    State(gw): State<Arc<Gateway>>,
    Path(strategy): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let route = Route {
        label: "tradingview",
        source: TRADINGVIEW_SOURCE.to_string(),
        format: ContentFormat::TradingView,
        strategy: Some(strategy),
    };
    respond(&gw, route, &headers, body).await
}

async fn respond(gw: &Gateway, route: Route, headers: &HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let label = route.label;
    let result = ingest(gw, route, headers, body).await;
    let response = match result {
        Ok(a) => (StatusCode::ACCEPTED, Json(a)).into_response(),
        Err(e) => {
            if e.status.is_server_error() {
                tracing::warn!(code = e.code, message = %e.message, "signal not accepted");
            } else {
                tracing::info!(status = e.status.as_u16(), code = e.code, field = ?e.field, message = %e.message, "signal refused");
            }
            e.into_response()
        }
    };
    if let Some(m) = &gw.metrics {
        m.requests
            .with_label_values(&[label, response.status().as_str()])
            .inc();
        m.seconds
            .with_label_values(&[label])
            .observe(started.elapsed().as_secs_f64());
    }
    response
}

async fn read_body(max: usize, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("body exceeds {max} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(1024).min(max));
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("reading body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > max {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

/// The strategy a Mathematricks body names, read the way the parser reads it
/// (top level, then the legacy `signal` object; `strategy_name`, then
/// `strategy`). `None` when absent or not text (the parser then explains).
fn named_strategy(payload: &Value) -> Option<String> {
    let scopes = [Some(payload), payload.get("signal")];
    for scope in scopes.into_iter().flatten() {
        // Blank counts as absent, as in the parser: `"strategy_name": ""`
        // does not hide `"strategy"` of the same scope.
        let found = ["strategy_name", "strategy"].iter().find_map(|k| {
            scope.get(*k).filter(|v| match v {
                Value::Null => false,
                Value::String(s) => !s.trim().is_empty(),
                _ => true,
            })
        });
        match found {
            None => continue,
            Some(Value::String(s)) => return Some(s.trim().to_string()),
            Some(_) => return None,
        }
    }
    None
}

fn now_nanos(t: DateTime<Utc>) -> String {
    t.timestamp_nanos_opt().unwrap_or_default().to_string()
}

async fn ingest(
    gw: &Gateway,
    route: Route,
    headers: &HeaderMap,
    body: Body,
) -> Result<Accepted, ApiError> {
    let received_at = Utc::now();
    let bytes = read_body(gw.max_body_bytes, headers, body).await?;
    let mut payload = mtx_standardizer::decode_payload(&bytes)?;
    drop(bytes);
    let secret = strip_secret(&mut payload);

    let mut ctx = ParseContext::new(
        route.source.clone(),
        gw.environment,
        received_at,
        route.format,
    );
    ctx.require_future_expiry = !gw.futures_front_month;
    ctx.fallback_signal_id = Some(payload_fingerprint(&payload));
    if let Some(s) = &route.strategy {
        ctx.strategy_hint = Some(s.clone());
        ctx.default_instrument_type = gw.tradingview_instrument_types.get(s).copied();
    }

    let strategy = match route.strategy.clone().or_else(|| named_strategy(&payload)) {
        Some(s) => s,
        // Let the parser name the problem (missing_strategy, invalid_type).
        None => {
            return Err(match parse_raw(&payload, &ctx) {
                Err(e) => e.into(),
                Ok(_) => SignalError::MissingStrategy {
                    field: "strategy_name".into(),
                }
                .into(),
            })
        }
    };

    let hash = match gw.secrets.lookup(&strategy) {
        Lookup::Found(h) => h,
        Lookup::Unknown => return Err(ApiError::unauthorized(&strategy)),
        Lookup::NotLoaded => {
            return Err(ApiError::unavailable(
                "secret store not loaded yet; retry shortly",
            ))
        }
    };
    // The secret first: requests that fail it are limited in a bucket of
    // their own, so a flood of wrong passphrases (the strategy name is in
    // the webhook URL) can never use up the real sender's signals.
    let presented = secret.unwrap_or_default();
    let authentic = !presented.is_empty() && hash.verify(&presented);
    let bucket = if authentic {
        format!("{}/{strategy}", route.source)
    } else {
        format!("{}/{strategy} (failed secret)", route.source)
    };
    if let Err(wait) = gw.limiter.check(&bucket) {
        return Err(ApiError {
            retry_after: Some(wait.as_secs().max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "too many signals for `{bucket}`; retry in {} ms",
                    wait.as_millis().max(1)
                ),
            )
        });
    }
    if !authentic {
        return Err(ApiError::unauthorized(&strategy));
    }

    let parsed = parse_raw(&payload, &ctx)?;
    if parsed.strategy() != strategy {
        return Err(ApiError::unauthorized(parsed.strategy()));
    }
    let signal_id = parsed.signal_id();
    let sender_signal_id = parsed.sender_signal_id().to_string();
    let used_fallback = ctx.fallback_signal_id.as_deref() == Some(sender_signal_id.as_str());

    let raw = RawSignal {
        source: route.source.clone(),
        environment: gw.environment,
        received_at,
        format: route.format,
        strategy_hint: route.strategy.clone(),
        instrument_type_hint: ctx.default_instrument_type,
        fallback_signal_id: used_fallback.then(|| sender_signal_id.clone()),
        futures_front_month: gw.futures_front_month,
        payload,
    };
    let subject = gw
        .subjects
        .signals_raw(gw.environment, &route.source)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_source", e.to_string()))?;
    let body = serde_json::to_vec(&raw)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let out = Outgoing::new(subject, dedupe_key(gw.environment, &signal_id), body)
        .header(headers::SIGNAL_ID, &signal_id)
        .header(headers::RECEIVED_AT, &now_nanos(received_at));

    if gw.client.connection_state() != ConnState::Connected {
        return Err(ApiError::unavailable(
            "signal bus (NATS) unavailable; retry",
        ));
    }
    match tokio::time::timeout(gw.publish_timeout, gw.publisher.publish(out)).await {
        Ok(Ok(p)) => {
            tracing::info!(%signal_id, strategy = %strategy, source = %route.source, duplicate = p.duplicate, seq = p.sequence, "raw signal accepted");
            Ok(Accepted {
                signal_id,
                sender_signal_id,
                duplicate: p.duplicate,
            })
        }
        Ok(Err(e)) => Err(ApiError::unavailable(format!(
            "signal bus did not store the signal: {}; retry",
            e.message
        ))),
        Err(_) => Err(ApiError::unavailable(format!(
            "signal bus did not acknowledge within {} ms; retry (a re-send is deduplicated)",
            gw.publish_timeout.as_millis()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn named_strategy_reads_like_the_parser() {
        assert_eq!(
            named_strategy(&json!({"strategy_name": " A "})).as_deref(),
            Some("A")
        );
        assert_eq!(
            named_strategy(&json!({"strategy": "B"})).as_deref(),
            Some("B")
        );
        assert_eq!(
            named_strategy(&json!({"strategy_name": "", "signal": {"strategy": "C"}})).as_deref(),
            Some("C")
        );
        assert_eq!(named_strategy(&json!({"strategy_name": 5})), None);
        assert_eq!(named_strategy(&json!([1])), None);
        assert_eq!(named_strategy(&json!({"strategy_name": null})), None);
    }
}
