//! Turns what signal providers send into mtx's [`StandardizedSignal`]. The
//! parsing modules are pure logic (no I/O), so the gateway (to reject bad
//! bodies at ingress) and the standardizer worker share exactly the same rules.
//!
//! - [`worker`]: the standardizer stage (`mtx run standardizer`): raw stream
//!   in, strategy lookup, dedupe, standardized stream out (the only module
//!   with I/O).
//! - [`parse`]: the entry points — [`strip_secret`], [`parse_raw`] /
//!   [`parse_bytes`] into a [`ParsedSignal`], then [`standardize`] with the
//!   strategy's [`StrategyInfo`]; plus [`ParseContext`] and [`payload_fingerprint`].
//! - [`mathematricks`]: the Mathematricks body (`signal_legs[]`, legacy `signal`).
//! - [`tradingview`]: the documented TradingView alert body and how it infers
//!   ENTRY / EXIT / SCALE_* from market positions.
//! - [`legs`]: one leg — symbol normalisation, price / expiry rules and the
//!   direction rule ([`position_direction`]).
//! - [`error`]: [`SignalError`] and its stable `reason_code()`s.
//! - `fields` (private): typed, path-aware JSON reads (numbers as strings,
//!   exact decimals, epoch unit detection).
//!
//! [`StandardizedSignal`]: mtx_schemas::signal::StandardizedSignal

pub mod error;
mod fields;
pub mod legs;
pub mod mathematricks;
pub mod parse;
pub mod tradingview;
pub mod worker;

pub use error::SignalError;
pub use legs::position_direction;
pub use parse::{
    decode_payload, parse_bytes, parse_raw, parse_raw_signal, payload_fingerprint, standardize,
    strip_secret, ParseContext, ParsedSignal, StrategyInfo,
};
