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

/// How far a price's own timestamp may run ahead of the moment the broker
/// stored it, seconds: feed clocks drift a little, but a tick stamped hours
/// ahead would otherwise stay the newest mark of its symbol (readers keep
/// the greatest `(timestamp, price)`) until real time caught up with it.
pub const MAX_AHEAD_OF_BROKER_SECS: i64 = 60;

impl MarketPrice {
    /// The price's timestamp is at most [`MAX_AHEAD_OF_BROKER_SECS`] after
    /// `stored`, the broker's store time of its message (a fact of the
    /// message, so a replay judges it as the live reader did). Unknown
    /// store time: accepted.
    pub fn check_time(&self, stored: Option<DateTime<Utc>>) -> Result<(), String> {
        let Some(stored) = stored else {
            return Ok(());
        };
        let ahead = self.timestamp.signed_duration_since(stored);
        if ahead > chrono::Duration::seconds(MAX_AHEAD_OF_BROKER_SECS) {
            Err(format!(
                "timestamp {} is {} s ahead of the broker's clock ({stored}); at most {MAX_AHEAD_OF_BROKER_SECS} s is accepted",
                self.timestamp,
                ahead.num_seconds()
            ))
        } else {
            Ok(())
        }
    }
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

    #[test]
    fn a_price_stamped_far_ahead_of_the_broker_is_refused() {
        let stored = chrono::DateTime::parse_from_rfc3339("2025-01-02T15:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let at = |secs: i64| MarketPrice {
            symbol: "AAPL".into(),
            price: Decimal::ONE,
            timestamp: stored + chrono::Duration::seconds(secs),
            source: None,
        };
        assert!(at(-86_400).check_time(Some(stored)).is_ok());
        assert!(at(MAX_AHEAD_OF_BROKER_SECS)
            .check_time(Some(stored))
            .is_ok());
        let e = at(365 * 86_400).check_time(Some(stored)).unwrap_err();
        assert!(e.contains("31536000 s ahead"), "{e}");
        assert!(at(365 * 86_400).check_time(None).is_ok());
    }
}
