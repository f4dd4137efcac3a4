//! Order execution for mtx: a pure core (no NATS, no Mongo, no async) that can
//! be tested exhaustively and replayed deterministically, and the execution
//! worker that wires it to the bus.
//!
//! - [`fsm`]: the order state machine. Every (status, event) pair is decided in
//!   one exhaustive table; it tracks filled quantity and refuses overfills and
//!   any change to a terminal order.
//! - [`paper`]: a deterministic paper venue. It matches MARKET / LIMIT / STOP
//!   orders against marks with slippage, optional partial fills and commissions,
//!   expires orders, turns an entry's stop-loss / take-profit into OCO child
//!   orders, and emits acks, fills, rejects, cancels and expiries as
//!   [`mtx_schemas::order`] messages. Its state can be saved and restored.
//! - [`adapter`]: the [`BrokerAdapter`] trait (submit, cancel, events, account
//!   snapshot, save / restore), per-account [`Routes`], and the paper venue as
//!   the one adapter of this build.
//! - [`worker`]: the `execution` stage: orders, cancels and market prices in,
//!   order events and execution confirmations out; the working orders and an
//!   outbox persisted in KV (finished orders as one small key each) before
//!   inputs are acked, so no order is filled twice across redeliveries and
//!   restarts.

pub mod adapter;
pub mod fsm;
pub mod paper;
pub mod worker;

pub use adapter::{BrokerAdapter, BrokerSnapshot, PaperAdapter, Routes};
pub use fsm::{EventKind, FsmError, FsmEvent, InvalidTransition, OrderFsm};
pub use paper::{
    order_fingerprint, Commission, CommissionModel, ConfigError, FinishedOrder, OrderInfo,
    PaperConfig, PaperVenue, StateError, VenueEvent, VenueState,
};
