//! Account bookkeeping for mtx: a pure core (no NATS, no Mongo, no async) fed
//! executions and marks, and the accounts worker that wires it to the bus.
//!
//! - [`spec`]: [`InstrumentSpec`] — contract multiplier and margin model
//!   (percent of notional, or a fixed amount per contract), with defaults per
//!   instrument type.
//! - [`ledger`]: [`Ledger`] — positions per (account, strategy, instrument,
//!   direction) built from execution confirmations only: average entry price,
//!   realized and unrealized P&L, margin, cash, equity, per-strategy
//!   deployed capital and today's P&L per strategy (from execution
//!   timestamps, so replay gives the same figure); idempotent on
//!   `execution_id`; produces
//!   [`mtx_schemas::order::AccountState`] snapshots.
//! - [`orders`]: [`OpenOrders`] — the working orders shown in a snapshot, kept
//!   from orders and their status events; finished orders are dropped (a
//!   bounded set of tombstones keeps late copies from reopening them).
//! - [`book`]: [`Book`] — the stage's whole state (ledger, order-independent
//!   marks, known accounts) behind one `apply`, shared by live processing and
//!   replay.
//! - [`worker`]: the `accounts` stage: executions, marks, orders and order
//!   events in; account state on `accounts.<account>.state` and in the
//!   `account_state` KV bucket; rebuilt from the streams at start.

pub mod book;
pub mod ledger;
pub mod orders;
pub mod spec;
pub mod worker;

pub use book::{Book, Effect, Input, Mark};
pub use ledger::{Applied, Ledger, LedgerConfig, LedgerError, Position, PositionKey, SymbolSpec};
pub use orders::{OpenOrders, OrderRetention};
pub use spec::{InstrumentSpec, MarginModel};
