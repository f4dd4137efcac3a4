//! Strategy configuration (`strategy_configurations`, seed 000), as mirrored
//! into the `strategies` KV bucket for the workers.
//!
//! The KV value is the JSON of [`StrategyConfig`]; the key is
//! [`StrategyConfig::kv_key`] of the strategy id. Besides the seed's fields it
//! carries what the pipeline needs per strategy: how Cerebro reads a signal's
//! quantities ([`SizingMode`]) and the expected alpha the standardizer copies
//! to `metadata.expected_alpha` for the slippage rule.
//!
//! Reading is lenient (unknown fields are ignored, optional fields may be
//! absent) so the mirror keeps working while the collection grows fields.

use crate::enums::{SizingMode, StrategyStatus, TradingMode};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Per-strategy risk limits (`strategy_configurations.risk_limits`), dollars.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RiskLimits {
    /// Maximum position size, in dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_size: Option<Decimal>,
    /// Maximum daily loss, in dollars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_daily_loss: Option<Decimal>,
}

/// One strategy's operational settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StrategyConfig {
    /// Unique id, as senders name it in `strategy_name` (e.g. `SPX_1-D_Opt`).
    pub strategy_id: String,
    /// Human-readable name (e.g. `SPX 1 - D Opt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strategy_name: Option<String>,
    /// Asset class label from the strategy registry (free text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub asset_class: Option<String>,
    /// ACTIVE / INACTIVE / TESTING.
    #[serde(default = "default_status")]
    pub status: StrategyStatus,
    /// LIVE / PAPER.
    #[serde(default = "default_trading_mode")]
    pub trading_mode: TradingMode,
    /// Account its orders go to (e.g. `IBKR_Main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Whether the portfolio optimizer considers it.
    #[serde(default)]
    pub include_in_optimization: bool,
    /// Position and loss limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_limits: Option<RiskLimits>,
    /// How Cerebro reads the quantities of this strategy's signals
    /// (default SENDER_EQUITY_RATIO, what the sample sender files mean).
    #[serde(default = "default_sizing_mode")]
    pub sizing_mode: SizingMode,
    /// Expected alpha per trade (fraction), for Cerebro's slippage rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_alpha: Option<Decimal>,
    /// Email or Slack handle of the developer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub developer_contact: Option<String>,
    /// Free-text notes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    /// When backtest data was last synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backtest_sync: Option<DateTime<Utc>>,
    /// Creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<DateTime<Utc>>,
    /// Last update time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<DateTime<Utc>>,
}

fn default_status() -> StrategyStatus {
    StrategyStatus::Active
}

fn default_trading_mode() -> TradingMode {
    TradingMode::Paper
}

fn default_sizing_mode() -> SizingMode {
    SizingMode::SenderEquityRatio
}

impl StrategyConfig {
    /// A minimal ACTIVE / PAPER configuration with the default sizing mode.
    pub fn new(strategy_id: impl Into<String>) -> Self {
        StrategyConfig {
            strategy_id: strategy_id.into(),
            strategy_name: None,
            asset_class: None,
            status: default_status(),
            trading_mode: default_trading_mode(),
            account: None,
            include_in_optimization: false,
            risk_limits: None,
            sizing_mode: default_sizing_mode(),
            expected_alpha: None,
            developer_contact: None,
            notes: None,
            last_backtest_sync: None,
            created_at: None,
            updated_at: None,
        }
    }

    /// Key of a strategy in the `strategies` KV bucket.
    ///
    /// KV keys allow only `[-/_=.A-Za-z0-9]`, so ASCII letters, digits, `_`
    /// and `-` pass through and every other byte of the UTF-8 id becomes
    /// `=XX` (uppercase hex): `SPX_1-D_Opt` stays as is, `Com1 - Met` becomes
    /// `Com1=20-=20Met`. Injective, so two ids never share a key. Empty ids
    /// map to the empty string, which is not a valid key.
    pub fn kv_key(strategy_id: &str) -> String {
        let mut out = String::with_capacity(strategy_id.len());
        crate::ids::push_kv_token(&mut out, strategy_id);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_strategy_registry_shape_with_defaults() {
        let v = serde_json::json!({
            "strategy_id": "Com1-Met",
            "strategy_name": "Com1 - Met",
            "asset_class": "commodities",
            "status": "ACTIVE",
            "trading_mode": "PAPER",
            "account": "IBKR_Main",
            "include_in_optimization": true,
            "something_new": 1
        });
        let c: StrategyConfig = serde_json::from_value(v).unwrap();
        assert_eq!(c.strategy_id, "Com1-Met");
        assert_eq!(c.sizing_mode, SizingMode::SenderEquityRatio);
        assert_eq!(c.expected_alpha, None);
        assert_eq!(c.account.as_deref(), Some("IBKR_Main"));

        let mut c = StrategyConfig::new("FloridaForex");
        c.sizing_mode = SizingMode::DeltaUnits;
        c.expected_alpha = Some(Decimal::new(15, 3));
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["sizing_mode"], "DELTA_UNITS");
        assert_eq!(v["expected_alpha"], "0.015");
        assert_eq!(serde_json::from_value::<StrategyConfig>(v).unwrap(), c);
    }

    #[test]
    fn kv_keys_are_valid_and_injective() {
        assert_eq!(StrategyConfig::kv_key("SPX_1-D_Opt"), "SPX_1-D_Opt");
        assert_eq!(StrategyConfig::kv_key("Com1 - Met"), "Com1=20-=20Met");
        assert_ne!(
            StrategyConfig::kv_key("a.b"),
            StrategyConfig::kv_key("a=2Eb")
        );
        for id in ["a.b", "x/y", "é", "=", "~"] {
            let k = StrategyConfig::kv_key(id);
            assert!(k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'='));
        }
    }
}
