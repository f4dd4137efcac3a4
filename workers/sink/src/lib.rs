//! The sink: every pipeline stage persisted into the documented MongoDB
//! collections, exactly once in effect.
//!
//! - [`spec`]: the collection catalog of seeds 000 and 001 (fields and BSON
//!   types, validation rules, indexes, TTLs, time series), read by both
//!   migrations and the sink.
//! - [`migrate`]: `mtx db migrate`, idempotent create/update of collections,
//!   validators and indexes, and the schema version in `system_config`.
//! - [`convert`]: message JSON → typed BSON (Decimal128, dates, doubles).
//! - [`mapping`]: which message goes to which collection under which natural key.
//! - [`sink`]: the consume-loop handlers (bulk inserts, lifecycle flags,
//!   Mongo readiness) and [`spawn`], which binds every `sink_*` consumer.
//! - [`store`]: the Mongo connection and per-document bulk write results.
//! - [`ops`]: what the CLI reads and does: a signal's lifecycle, dead letters
//!   (list / show / redrive).
//! - [`bench`]: `mtx bench sink`, the sink against a plain `insert_many` loop.
//! - [`error`]: [`SinkError`] and the duplicate / retryable / permanent classes.

pub mod bench;
pub mod convert;
pub mod error;
pub mod mapping;
pub mod migrate;
pub mod ops;
pub mod sink;
pub mod spec;
pub mod store;

pub use error::{Class, SinkError};
pub use migrate::{migrate, MigrateReport};
pub use sink::spawn;
pub use store::Store;
