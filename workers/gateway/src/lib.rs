//! Signal ingress: the doors through which signals enter mtx. Every door
//! publishes a [`RawSignal`] on `signals.raw.<env>.<source>`; the
//! standardizer takes it from there.
//!
//! - [`http`]: the HTTP gateway (`mtx run gateway`): `POST /v1/signals`
//!   (Mathematricks format) and `POST /v1/webhooks/tradingview/{strategy}`,
//!   with authentication, limits, strict parsing and 202-after-ack.
//! - [`secrets`]: per-strategy secrets held as salted hashes (config and the
//!   Mongo `signal_secrets` collection), constant-time checks.
//! - [`limit`]: per-source token-bucket rate limiting.
//! - [`bridge`]: the read-only bridge (`mtx run bridge`) that tails the
//!   existing collector's `trading_signals` with a change stream.
//!
//! Door 2 — providers inside the network publishing a [`RawSignal`] to
//! `signals.raw.<env>.<source>` themselves — needs no code here.
//!
//! [`RawSignal`]: mtx_schemas::signal::RawSignal

pub mod bridge;
pub mod http;
pub mod limit;
pub mod secrets;

use mtx_runtime::process::Process;
use mtx_runtime::publish::Publisher;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A configuration value is unusable (the message names the key).
    #[error("config error: {0}")]
    Config(String),
    /// The listener could not bind.
    #[error("cannot listen on gateway.addr {addr}: {source}")]
    Listen {
        /// Configured address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The secret store could not be set up.
    #[error(transparent)]
    Secrets(#[from] secrets::SecretError),
}

/// Start the HTTP gateway inside `process` (listening on `gateway.addr`) and
/// the secret-hash reload; returns the bound address. Stops with the process.
pub async fn serve(process: &mut Process) -> Result<SocketAddr, GatewayError> {
    let cfg = process.config.gateway.clone();
    let uses_mongo = cfg.secrets_refresh_secs > 0;
    let store = secrets::SecretStore::from_config(&cfg.secrets, uses_mongo)
        .map_err(GatewayError::Config)?;
    if uses_mongo {
        let client =
            secrets::mongo_client(&process.config.mongo.uri, Duration::from_secs(3)).await?;
        let coll = client
            .database(&process.config.mongo.trading_db)
            .collection(secrets::COLLECTION);
        let ready = process.health.ready_flag("gateway secret hashes loaded");
        process.spawn(store.clone().refresh_loop(
            coll,
            Duration::from_secs(cfg.secrets_refresh_secs),
            ready,
            process.shutdown.clone(),
        ));
    }
    let gw = Arc::new(http::Gateway {
        environment: process.config.environment,
        source: cfg.source.clone(),
        subjects: process.subjects.clone(),
        publisher: Publisher::new(process.js.clone(), Some(process.metrics.clone()), "gateway"),
        client: process.client.clone(),
        secrets: store,
        limiter: limit::RateLimiter::new(cfg.rate_limit_per_sec, cfg.rate_limit_burst),
        max_body_bytes: cfg.max_body_bytes,
        publish_timeout: Duration::from_millis(cfg.publish_timeout_ms),
        futures_front_month: cfg.futures_front_month,
        tradingview_instrument_types: cfg.tradingview_instrument_types.clone(),
        metrics: Some(http::GatewayMetrics::new(&process.registry)?),
    });
    let listen_err = |source| GatewayError::Listen {
        addr: cfg.addr.clone(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(&cfg.addr)
        .await
        .map_err(listen_err)?;
    let addr = listener.local_addr().map_err(listen_err)?;
    let app = http::router(gw);
    let shutdown = process.shutdown.clone();
    process.spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gateway server failed");
        }
    });
    tracing::info!(%addr, env = %process.config.environment, "gateway listening");
    Ok(addr)
}
