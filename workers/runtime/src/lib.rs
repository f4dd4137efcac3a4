//! The shared runtime every mtx worker is built on.
//!
//! - [`config`]: figment configuration (defaults → `mtx.toml` → `MTX_` env), validated.
//! - [`telemetry`]: tracing subscriber (human or JSON).
//! - [`metrics`]: the runtime's Prometheus metrics on an explicit registry.
//! - [`health`]: liveness / readiness and the `/healthz` `/readyz` `/metrics` server.
//! - [`nats`]: connecting (reconnect forever, credentials from config).
//! - [`publish`]: publishing with `Nats-Msg-Id` and batched acks.
//! - [`multiget`]: the last message of many subjects in one batched direct get.
//! - [`pull`]: one bounded pull request with idle heartbeats.
//! - [`consume`]: the one consume loop (ack / NAK with delay / DLQ).
//! - [`dlq`]: dead letters, and the max-deliveries advisory listener.
//! - [`shutdown`]: SIGTERM/SIGINT → a cancellation token.
//! - [`process`]: wiring of the above for one process ([`process::Process`]).

pub mod config;
pub mod consume;
pub mod dlq;
pub mod health;
pub mod metrics;
pub mod multiget;
pub mod nats;
pub mod process;
pub mod publish;
pub mod pull;
pub mod shutdown;
pub mod telemetry;

pub use config::Config;
pub use consume::{Binding, Delivery, Handler, LoopContext, Outcome};
pub use publish::{Outgoing, Publisher};
