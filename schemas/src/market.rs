//! Market data messages.
//!
//! [`MarketPrice`] is one mark on `market.prices.<symbol>`: published by a
//! market-data feed or by hand (`mtx market price <symbol> <price>`), read by
//! the execution stage (paper matching) and the accounts stage (unrealized
//! P&L).

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// One price observation for a symbol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketPrice {
    /// Symbol, e.g. `AAPL`; must match the subject's symbol token.
    pub symbol: String,
    /// The price (positive; serialized as a string, numbers accepted on input).
    pub price: Decimal,
    /// When the price was observed.
    pub timestamp: DateTime<Utc>,
    /// Who published it (`manual`, a feed name), for audit.
    #[serde(default)]
    pub source: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_accepts_numbers() {
        let p: MarketPrice = serde_json::from_str(
            r#"{"symbol":"AAPL","price":151.25,"timestamp":"2025-01-02T15:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(p.price, Decimal::new(15125, 2));
        assert_eq!(p.source, None);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["price"], "151.25");
        assert_eq!(serde_json::from_value::<MarketPrice>(v).unwrap(), p);
    }
}
