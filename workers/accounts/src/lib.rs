//! Account bookkeeping for mtx, free of I/O (no NATS, no Mongo, no async); the
//! accounts worker feeds it executions and marks and persists its snapshots.
//!
//! - [`spec`]: [`InstrumentSpec`] — contract multiplier and margin model
//!   (percent of notional, or a fixed amount per contract), with defaults per
//!   instrument type.
//! - [`ledger`]: [`Ledger`] — positions per (account, strategy, instrument,
//!   direction) built from execution confirmations only: average entry price,
//!   realized and unrealized P&L, margin, cash, equity and per-strategy
//!   deployed capital; idempotent on `execution_id`; produces
//!   [`mtx_schemas::order::AccountState`] snapshots.
//! - [`orders`]: [`OpenOrders`] — the working orders shown in a snapshot, kept
//!   from orders and their status events.

pub mod ledger;
pub mod orders;
pub mod spec;

pub use ledger::{Applied, Ledger, LedgerConfig, LedgerError, Position, PositionKey};
pub use orders::OpenOrders;
pub use spec::{InstrumentSpec, MarginModel};
