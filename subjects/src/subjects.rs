//! Typed subject builders.
//!
//! Every subject mtx publishes or consumes is built here, so the map in the
//! README is the only place a subject string is spelled out. Ids are encoded
//! with [`crate::token::encode`]; an optional prefix (a single token) puts the
//! whole tree under `<prefix>.` for isolated tests or tenants.

use crate::token::{encode, TokenError};
use mtx_schemas::Environment;

/// Builds subjects under an optional prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// `prefix` is empty in production, or one token such as `t42`.
    pub fn new(prefix: &str) -> Self {
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}.")
        };
        Subjects { prefix }
    }

    /// Prefix a literal subject or wildcard pattern.
    pub fn raw_subject(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }

    /// Strip this builder's prefix from a concrete subject, if present.
    pub fn strip<'a>(&self, subject: &'a str) -> &'a str {
        subject
            .strip_prefix(self.prefix.as_str())
            .unwrap_or(subject)
    }

    /// `signals.raw.<env>.<source>`: every door publishes raw signals here.
    pub fn signals_raw(&self, env: Environment, source: &str) -> Result<String, TokenError> {
        Ok(format!(
            "{}signals.raw.{env}.{}",
            self.prefix,
            encode(source)?
        ))
    }

    /// `signals.standardized.<env>.<strategy>`: the strategy's part of the
    /// standardized tree (messages of earlier versions; a filter for
    /// `<this>.>` reads the strategy's signals).
    pub fn signals_standardized(
        &self,
        env: Environment,
        strategy: &str,
    ) -> Result<String, TokenError> {
        Ok(format!(
            "{}signals.standardized.{env}.{}",
            self.prefix,
            encode(strategy)?
        ))
    }

    /// `signals.standardized.<env>.<strategy>.<signal_id>`: where the
    /// standardizer publishes one signal. One subject per signal lets the
    /// publish itself say "only if this signal is not stored yet"
    /// (`Nats-Expected-Last-Subject-Sequence: 0`), so a re-send is recognised
    /// for as long as `SIGNALS_STANDARDIZED` keeps the signal, with no extra
    /// record. Consumers filter on `signals.standardized.>` and so read this
    /// and the four-token form alike.
    pub fn signal_standardized(
        &self,
        env: Environment,
        strategy: &str,
        signal_id: &str,
    ) -> Result<String, TokenError> {
        Ok(format!(
            "{}signals.standardized.{env}.{}.{}",
            self.prefix,
            encode(strategy)?,
            encode(signal_id)?
        ))
    }

    /// `cerebro.decisions.<env>.<strategy>`
    pub fn cerebro_decisions(
        &self,
        env: Environment,
        strategy: &str,
    ) -> Result<String, TokenError> {
        Ok(format!(
            "{}cerebro.decisions.{env}.{}",
            self.prefix,
            encode(strategy)?
        ))
    }

    /// `orders.<account>.new`
    pub fn orders_new(&self, account: &str) -> Result<String, TokenError> {
        Ok(format!("{}orders.{}.new", self.prefix, encode(account)?))
    }

    /// `orders.<account>.cancel`
    pub fn orders_cancel(&self, account: &str) -> Result<String, TokenError> {
        Ok(format!("{}orders.{}.cancel", self.prefix, encode(account)?))
    }

    /// `orders.<account>.events`
    pub fn orders_events(&self, account: &str) -> Result<String, TokenError> {
        Ok(format!("{}orders.{}.events", self.prefix, encode(account)?))
    }

    /// `executions.<account>`
    pub fn executions(&self, account: &str) -> Result<String, TokenError> {
        Ok(format!("{}executions.{}", self.prefix, encode(account)?))
    }

    /// `accounts.<account>.state`
    pub fn account_state(&self, account: &str) -> Result<String, TokenError> {
        Ok(format!(
            "{}accounts.{}.state",
            self.prefix,
            encode(account)?
        ))
    }

    /// `market.prices.<symbol>`
    pub fn market_price(&self, symbol: &str) -> Result<String, TokenError> {
        Ok(format!("{}market.prices.{}", self.prefix, encode(symbol)?))
    }

    /// `market.candles.<symbol>.<timeframe>`
    pub fn market_candles(&self, symbol: &str, timeframe: &str) -> Result<String, TokenError> {
        Ok(format!(
            "{}market.candles.{}.{}",
            self.prefix,
            encode(symbol)?,
            encode(timeframe)?
        ))
    }

    /// `audit.<stage>`
    pub fn audit(&self, stage: &str) -> Result<String, TokenError> {
        Ok(format!("{}audit.{}", self.prefix, encode(stage)?))
    }

    /// `dlq.<stage>`: where the consume loop sends rejected messages.
    pub fn dlq(&self, stage: &str) -> Result<String, TokenError> {
        Ok(format!("{}dlq.{}", self.prefix, encode(stage)?))
    }

    /// The decoded token at `index` (0-based, after the prefix) of a subject.
    pub fn token(&self, subject: &str, index: usize) -> Option<Result<String, TokenError>> {
        self.strip(subject)
            .split('.')
            .nth(index)
            .map(crate::token::decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_documented_subjects() {
        let s = Subjects::new("");
        assert_eq!(
            s.signals_raw(Environment::Staging, "tradingview").unwrap(),
            "signals.raw.staging.tradingview"
        );
        assert_eq!(
            s.signals_standardized(Environment::Production, "My Strategy")
                .unwrap(),
            "signals.standardized.production.My~20Strategy"
        );
        assert_eq!(
            s.signal_standardized(Environment::Production, "My Strategy", "tv_My Strategy_a.1")
                .unwrap(),
            "signals.standardized.production.My~20Strategy.tv_My~20Strategy_a~2E1"
        );
        assert_eq!(s.orders_new("IBKR_Main").unwrap(), "orders.IBKR_Main.new");
        assert_eq!(
            s.market_candles("BTC/USD", "1m").unwrap(),
            "market.candles.BTC~2FUSD.1m"
        );
        let p = Subjects::new("t1");
        let subj = p.cerebro_decisions(Environment::Staging, "a.b").unwrap();
        assert_eq!(subj, "t1.cerebro.decisions.staging.a~2Eb");
        assert_eq!(p.token(&subj, 3).unwrap().unwrap(), "a.b");
        assert!(s.dlq("").is_err());
    }
}
