//! Why a signal was rejected.
//!
//! Every variant names the offending field path (`signal_legs[1].quantity`,
//! `signal.ticker`, `contracts`) so the sender can fix the exact field, and maps
//! to a stable snake_case [`SignalError::reason_code`] that the worker puts in
//! the DLQ reason header and metrics labels.

/// A payload the standardizer cannot turn into a signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    /// The body is not JSON at all.
    #[error("payload: invalid JSON: {detail}")]
    InvalidJson {
        /// The JSON parser's message.
        detail: String,
    },
    /// The body is JSON but not a shape we know (not an object, no legs, ...).
    #[error("{field}: unknown signal shape: {detail}")]
    UnknownShape {
        /// Where the shape went wrong (`payload`, `signal_legs[0]`, ...).
        field: String,
        /// What was expected.
        detail: String,
    },
    /// A required field is absent, null or blank.
    #[error("{field}: missing required field{}", hint_suffix(.hint))]
    MissingField {
        /// Field path.
        field: String,
        /// Why it is required here, when that is not obvious.
        hint: Option<String>,
    },
    /// Neither the payload nor the route names a strategy.
    #[error("{field}: missing strategy (payload names none and the route has no strategy)")]
    MissingStrategy {
        /// The payload field that should carry it.
        field: String,
    },
    /// `signal_legs` is an empty array.
    #[error("{field}: signal has no legs")]
    EmptyLegs {
        /// Field path of the legs array.
        field: String,
    },
    /// A quantity is zero or negative (the side carries the sign).
    #[error("{field}: quantity must be positive, got {value}")]
    NonPositiveQuantity {
        /// Field path.
        field: String,
        /// The parsed quantity.
        value: String,
    },
    /// `instrument_type` is not one mtx trades.
    #[error(
        "{field}: unknown instrument type `{value}` (expected STOCK, ETF, FOREX, FUTURE, CRYPTO or OPTION)"
    )]
    UnknownInstrumentType {
        /// Field path.
        field: String,
        /// The rejected value.
        value: String,
    },
    /// A FOREX instrument that is not a six-letter pair.
    #[error("{field}: invalid FOREX symbol `{value}` (expected six letters such as EURUSD, EUR/USD or EUR.USD)")]
    InvalidForexSymbol {
        /// Field path.
        field: String,
        /// The rejected value.
        value: String,
    },
    /// A FUTURE leg without a contract expiry, under a route that requires one.
    #[error("{field}: FUTURE `{instrument}` has no expiry (send YYYYMMDD)")]
    FutureWithoutExpiry {
        /// Field path of the missing expiry.
        field: String,
        /// The future's symbol.
        instrument: String,
    },
    /// An OPTION leg that does not name its contract: the standardized leg
    /// has no strike or right, so they must be in the symbol (OCC), or a
    /// call and a put would become the same order.
    #[error("{field}: OPTION `{instrument}`: {detail}")]
    OptionWithoutContract {
        /// Field path.
        field: String,
        /// The option's symbol as sent.
        instrument: String,
        /// What is wrong and what to send.
        detail: String,
    },
    /// A number that is not a finite decimal, or is out of range.
    #[error("{field}: invalid number: {detail}")]
    InvalidNumber {
        /// Field path.
        field: String,
        /// What was wrong.
        detail: String,
    },
    /// A date / epoch that cannot be read or is implausible.
    #[error("{field}: invalid date: {detail}")]
    InvalidDate {
        /// Field path.
        field: String,
        /// What was wrong.
        detail: String,
    },
    /// A value outside an enumeration (action, direction, signal_type, ...),
    /// or one that contradicts the rest of the signal.
    #[error("{field}: {detail}")]
    InvalidEnum {
        /// Field path.
        field: String,
        /// What was wrong, with the accepted values.
        detail: String,
    },
    /// A known text field with a non-text JSON type (e.g. `"instrument": 5`).
    #[error("{field}: expected {expected}, got {got}")]
    InvalidType {
        /// Field path.
        field: String,
        /// The JSON type expected.
        expected: &'static str,
        /// The JSON type received.
        got: &'static str,
    },
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
}

impl SignalError {
    /// Stable snake_case reason for DLQ headers and metrics labels; never
    /// renamed, because dashboards and alerts key on it.
    pub const fn reason_code(&self) -> &'static str {
        match self {
            SignalError::InvalidJson { .. } => "invalid_json",
            SignalError::UnknownShape { .. } => "unknown_shape",
            SignalError::MissingField { .. } => "missing_field",
            SignalError::MissingStrategy { .. } => "missing_strategy",
            SignalError::EmptyLegs { .. } => "empty_legs",
            SignalError::NonPositiveQuantity { .. } => "non_positive_quantity",
            SignalError::UnknownInstrumentType { .. } => "unknown_instrument_type",
            SignalError::InvalidForexSymbol { .. } => "invalid_forex_symbol",
            SignalError::FutureWithoutExpiry { .. } => "future_without_expiry",
            SignalError::OptionWithoutContract { .. } => "option_without_contract",
            SignalError::InvalidNumber { .. } => "invalid_number",
            SignalError::InvalidDate { .. } => "invalid_date",
            SignalError::InvalidEnum { .. } => "invalid_enum",
            SignalError::InvalidType { .. } => "invalid_type",
        }
    }

    /// Path of the offending field (`payload` for undecodable bodies), for
    /// structured logs and the sender-facing error body.
    pub fn field(&self) -> &str {
        match self {
            SignalError::InvalidJson { .. } => "payload",
            SignalError::UnknownShape { field, .. }
            | SignalError::MissingField { field, .. }
            | SignalError::MissingStrategy { field }
            | SignalError::EmptyLegs { field }
            | SignalError::NonPositiveQuantity { field, .. }
            | SignalError::UnknownInstrumentType { field, .. }
            | SignalError::InvalidForexSymbol { field, .. }
            | SignalError::FutureWithoutExpiry { field, .. }
            | SignalError::OptionWithoutContract { field, .. }
            | SignalError::InvalidNumber { field, .. }
            | SignalError::InvalidDate { field, .. }
            | SignalError::InvalidEnum { field, .. }
            | SignalError::InvalidType { field, .. } => field,
        }
    }

    /// Every reason code, for metric pre-registration and docs.
    pub const ALL_REASON_CODES: &'static [&'static str] = &[
        "invalid_json",
        "unknown_shape",
        "missing_field",
        "missing_strategy",
        "empty_legs",
        "non_positive_quantity",
        "unknown_instrument_type",
        "invalid_forex_symbol",
        "future_without_expiry",
        "option_without_contract",
        "invalid_number",
        "invalid_date",
        "invalid_enum",
        "invalid_type",
    ];
}
