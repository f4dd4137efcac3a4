//! Typed messages that flow between mtx stages and the vocabulary they share.
//!
//! - [`enums`]: the exact uppercase enum strings the seed schemas document
//!   (directions, sides, order statuses, decisions, ...).
//! - [`ids`]: deterministic ids derived from upstream ids, so redeliveries and
//!   re-sends collapse to one document / one message.
//! - [`headers`]: NATS header names every stage reads or writes (dedupe id,
//!   latency timestamps, DLQ reason).
//! - [`dlq`]: the dead-letter envelope published to `dlq.<stage>`.
//! - [`signal`]: raw and standardized signals (ingress → standardizer → Cerebro).
//! - [`order`]: orders, order events, execution confirmations and account state.
//! - [`market`]: market prices (`market.prices.<symbol>`).
//! - [`limits`]: the price and quantity range every stage accepts, so a
//!   garbage amount is refused as bad input instead of overflowing.
//! - [`strategy`]: strategy configuration (`strategy_configurations`, the `strategies` KV bucket).

pub mod dlq;
pub mod enums;
pub mod headers;
pub mod ids;
pub mod limits;
pub mod market;
pub mod order;
pub mod signal;
pub mod strategy;

pub use enums::*;
