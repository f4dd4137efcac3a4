//! The JetStream topology of mtx, as code.
//!
//! - [`token`]: reversible encoding of arbitrary ids (strategy names such as
//!   `My Strategy`, accounts, symbols) into valid subject tokens.
//! - [`subjects`]: typed subject builders (`signals.raw.<env>.<source>`, ...),
//!   optionally under a prefix so tests and tenants never collide.
//! - [`topology`]: the streams, durable pull consumers (one per worker pool) and
//!   KV buckets mtx needs, built from [`topology::TopologySettings`].
//! - [`apply`]: `mtx topology apply|check|export` against a live server.

pub mod apply;
pub mod subjects;
pub mod token;
pub mod topology;

pub use subjects::Subjects;
pub use topology::{ConsumerSpec, KvSpec, StreamSpec, Topology, TopologySettings};
