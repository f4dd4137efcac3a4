//! Liveness and readiness, and the ops HTTP server.
//!
//! - `/healthz` (liveness) only asks whether the process's loops are still
//!   turning; it never depends on NATS or Mongo, so an outage does not make
//!   Kubernetes restart healthy pods.
//! - `/readyz` is ready when NATS is connected and every registered readiness
//!   flag (consumers bound, Mongo reachable for the sink, ...) is set.
//! - `/metrics` renders the process registry.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use prometheus::Registry;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A loop's heartbeat for liveness; call [`Beat::beat`] every turn.
#[derive(Clone)]
pub struct Beat(Arc<AtomicU64>);

impl Beat {
    /// Record that the loop is alive now.
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }
}

/// A readiness condition owned by one component.
#[derive(Clone)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    /// Set or clear this condition.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    /// Current value.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Inner {
    nats: Mutex<Option<async_nats::Client>>,
    flags: Mutex<Vec<(String, ReadyFlag)>>,
    beats: Mutex<Vec<(String, Beat)>>,
    liveness_timeout_ms: AtomicU64,
}

/// Process health shared by every component.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// A fresh health state; loops must beat within `liveness_timeout`.
    pub fn new(liveness_timeout: Duration) -> Health {
        let h = Health::default();
        h.inner
            .liveness_timeout_ms
            .store(liveness_timeout.as_millis() as u64, Ordering::Relaxed);
        h
    }

    /// Readiness requires this client to be connected.
    pub fn set_nats(&self, client: async_nats::Client) {
        *lock(&self.inner.nats) = Some(client);
    }

    /// Register a readiness condition (initially not ready).
    pub fn ready_flag(&self, name: impl Into<String>) -> ReadyFlag {
        let f = ReadyFlag(Arc::new(AtomicBool::new(false)));
        lock(&self.inner.flags).push((name.into(), f.clone()));
        f
    }

    /// Register a loop for liveness (beaten once now).
    pub fn beat(&self, name: impl Into<String>) -> Beat {
        let b = Beat(Arc::new(AtomicU64::new(now_ms())));
        lock(&self.inner.beats).push((name.into(), b.clone()));
        b
    }

    /// `Ok` when live, else the names of stalled loops.
    pub fn liveness(&self) -> Result<(), Vec<String>> {
        let limit = self.inner.liveness_timeout_ms.load(Ordering::Relaxed);
        let now = now_ms();
        let stalled: Vec<String> = lock(&self.inner.beats)
            .iter()
            .filter(|(_, b)| now.saturating_sub(b.0.load(Ordering::Relaxed)) > limit)
            .map(|(n, _)| n.clone())
            .collect();
        if stalled.is_empty() {
            Ok(())
        } else {
            Err(stalled)
        }
    }

    /// `Ok` when ready, else what is not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut not = Vec::new();
        match &*lock(&self.inner.nats) {
            Some(c) if c.connection_state() == async_nats::connection::State::Connected => {}
            Some(_) => not.push("nats: disconnected".to_string()),
            None => not.push("nats: not configured".to_string()),
        }
        for (n, f) in lock(&self.inner.flags).iter() {
            if !f.get() {
                not.push(n.clone());
            }
        }
        if not.is_empty() {
            Ok(())
        } else {
            Err(not)
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    registry: Registry,
}

async fn healthz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.liveness() {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(v) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stalled: {}\n", v.join(", ")),
        ),
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(v) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", v.join(", ")),
        ),
    }
}

async fn metrics(
    State(s): State<AppState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(&s.registry),
    )
}

/// The ops router (mountable in tests).
pub fn router(health: Health, registry: Registry) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState { health, registry })
}

/// Bind the ops listener; returns the bound address and the serving task.
pub async fn serve(
    addr: &str,
    health: Health,
    registry: Registry,
    shutdown: CancellationToken,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(health, registry);
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "ops server failed");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_nats_and_every_flag() {
        let h = Health::new(Duration::from_secs(60));
        assert_eq!(h.readiness(), Err(vec!["nats: not configured".to_string()]));
        let f = h.ready_flag("consumer X/y");
        let err = h.readiness().unwrap_err();
        assert!(err.contains(&"consumer X/y".to_string()));
        f.set(true);
        assert!(!h
            .readiness()
            .unwrap_err()
            .contains(&"consumer X/y".to_string()));
    }

    #[test]
    fn liveness_fails_only_for_stalled_loops() {
        let h = Health::new(Duration::from_millis(50));
        let b = h.beat("loop a");
        assert_eq!(h.liveness(), Ok(()));
        b.0.store(now_ms() - 1_000, Ordering::Relaxed);
        assert_eq!(h.liveness(), Err(vec!["loop a".to_string()]));
        b.beat();
        assert_eq!(h.liveness(), Ok(()));
    }
}
