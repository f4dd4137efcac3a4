//! Enumerations written exactly as the seed schemas spell them.
//!
//! Every enum serializes to (and parses from) its uppercase seed string, so a
//! document written by mtx matches what the existing Mathematricks tools and the
//! `$jsonSchema` validators expect.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Error returned when a string is not one of an enum's documented values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not a valid {kind} (expected one of: {expected})")]
pub struct ParseEnumError {
    /// The enum being parsed, e.g. `direction`.
    pub kind: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted spellings, comma separated.
    pub expected: String,
}

macro_rules! seed_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The exact string the seed schema uses.
            pub const fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ParseEnumError;
            /// Case-insensitive parse; surrounding whitespace is ignored.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let t = s.trim();
                $(if t.eq_ignore_ascii_case($text) { return Ok($name::$variant); })+
                Err(ParseEnumError {
                    kind: $kind,
                    value: s.to_string(),
                    expected: [$($text),+].join(", "),
                })
            }
        }
    };
}

seed_enum!(
    /// Position direction of a signal, order or position.
    Direction, "direction" { Long => "LONG", Short => "SHORT" }
);

seed_enum!(
    /// Order side as brokers and `execution_confirmations.side` write it.
    Side, "side" { Buy => "BUY", Sell => "SELL" }
);

seed_enum!(
    /// What a standardized signal does to a position (`standardized_signals.action`).
    SignalAction, "action" { Entry => "ENTRY", Exit => "EXIT" }
);

seed_enum!(
    /// The sender's signal type, finer than [`SignalAction`].
    SignalType, "signal_type" {
        Entry => "ENTRY",
        Exit => "EXIT",
        Cancel => "CANCEL",
        ScaleIn => "SCALE_IN",
        ScaleOut => "SCALE_OUT",
    }
);

seed_enum!(
    /// Order types accepted end to end.
    OrderType, "order_type" { Market => "MARKET", Limit => "LIMIT", Stop => "STOP" }
);

seed_enum!(
    /// Asset class of an instrument as senders declare it.
    InstrumentType, "instrument_type" {
        Stock => "STOCK",
        Etf => "ETF",
        Forex => "FOREX",
        Future => "FUTURE",
        Crypto => "CRYPTO",
        Option => "OPTION",
    }
);

seed_enum!(
    /// Order lifecycle states (`trading_orders.status`).
    OrderStatus, "order status" {
        Pending => "PENDING",
        Submitted => "SUBMITTED",
        Accepted => "ACCEPTED",
        PartiallyFilled => "PARTIALLY_FILLED",
        Filled => "FILLED",
        CancelRequested => "CANCEL_REQUESTED",
        Cancelled => "CANCELLED",
        Rejected => "REJECTED",
        Expired => "EXPIRED",
    }
);

impl OrderStatus {
    /// Terminal states are never overwritten.
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            OrderStatus::Filled
                | OrderStatus::Cancelled
                | OrderStatus::Rejected
                | OrderStatus::Expired
        )
    }
}

seed_enum!(
    /// Status of one execution confirmation.
    ExecutionStatus, "execution status" {
        Filled => "FILLED",
        PartialFill => "PARTIAL_FILL",
        Rejected => "REJECTED",
    }
);

seed_enum!(
    /// Cerebro's verdict on a signal (`cerebro_decisions.decision`).
    Decision, "decision" { Approved => "APPROVED", Rejected => "REJECTED", Modified => "MODIFIED" }
);

seed_enum!(
    /// Operational status of a strategy (`strategy_configurations.status`).
    StrategyStatus, "strategy status" { Active => "ACTIVE", Inactive => "INACTIVE", Testing => "TESTING" }
);

seed_enum!(
    /// Where a strategy's orders go (`strategy_configurations.trading_mode`).
    TradingMode, "trading_mode" { Live => "LIVE", Paper => "PAPER" }
);

seed_enum!(
    /// Lifecycle of a portfolio allocation (`portfolio_allocations.status`).
    AllocationStatus, "allocation status" {
        PendingApproval => "PENDING_APPROVAL",
        Active => "ACTIVE",
        Archived => "ARCHIVED",
    }
);

seed_enum!(
    /// How Cerebro interprets a leg's `quantity` (configured per strategy).
    SizingMode, "sizing_mode" {
        /// Units scaled by `available capital / sender account_equity` (the sample files).
        SenderEquityRatio => "SENDER_EQUITY_RATIO",
        /// Quantity is a fraction of the strategy's allocated capital.
        TargetWeight => "TARGET_WEIGHT",
        /// Quantity is a delta to the current position, in units.
        DeltaUnits => "DELTA_UNITS",
        /// Quantity is taken as-is, in units.
        FixedUnits => "FIXED_UNITS",
    }
);

/// Deployment environment of a signal; chosen by the gateway's route or config,
/// never by the payload. Lowercase because it is a subject token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Paper / pre-production flow.
    Staging,
    /// Real money.
    Production,
}

impl Environment {
    /// The subject token and config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Environment {
    type Err = ParseEnumError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "staging" => Ok(Environment::Staging),
            "production" => Ok(Environment::Production),
            _ => Err(ParseEnumError {
                kind: "environment",
                value: s.to_string(),
                expected: "staging, production".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_as_seed_strings() {
        for s in OrderStatus::ALL {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<OrderStatus>(&json).unwrap(), *s);
            assert_eq!(s.as_str().parse::<OrderStatus>().unwrap(), *s);
        }
        assert_eq!(
            "scale_in".parse::<SignalType>().unwrap(),
            SignalType::ScaleIn
        );
        assert_eq!(SizingMode::TargetWeight.to_string(), "TARGET_WEIGHT");
    }

    #[test]
    fn parse_error_names_kind_and_choices() {
        let e = "UP".parse::<Direction>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "`UP` is not a valid direction (expected one of: LONG, SHORT)"
        );
    }

    #[test]
    fn terminal_states() {
        let terminal: Vec<_> = OrderStatus::ALL
            .iter()
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal.len(), 4);
        assert!(!OrderStatus::PartiallyFilled.is_terminal());
    }
}
