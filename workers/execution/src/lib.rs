//! Order execution logic for mtx, free of I/O (no NATS, no Mongo, no async), so
//! it can be tested exhaustively and replayed deterministically; the execution
//! worker wires it to the bus.
//!
//! - [`fsm`]: the order state machine. Every (status, event) pair is decided in
//!   one exhaustive table; it tracks filled quantity and refuses overfills and
//!   any change to a terminal order.
//! - [`paper`]: a deterministic paper venue. It matches MARKET / LIMIT / STOP
//!   orders against marks with slippage, optional partial fills and commissions,
//!   expires orders, turns an entry's stop-loss / take-profit into OCO child
//!   orders, and emits acks, fills, rejects, cancels and expiries as
//!   [`mtx_schemas::order`] messages.

pub mod fsm;
pub mod paper;

pub use fsm::{EventKind, FsmError, FsmEvent, InvalidTransition, OrderFsm};
pub use paper::{Commission, CommissionModel, ConfigError, PaperConfig, PaperVenue, VenueEvent};
