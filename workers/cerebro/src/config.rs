//! Cerebro's operator settings: the `[cerebro]` config section.
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `backtest_refresh_secs` | 300 | reload `<mongo.trading_db>.strategy_backtest_data` this often |
//! | `backtest_retry_secs` | 10 | retry this soon while no backtest data could be loaded yet |
//! | `mongo_timeout_ms` | 3000 | Mongo server selection / connect timeout of the backtest loader |
//! | `marks_initial_wait_ms` | 3000 | at start, wait at most this long for the latest mark per symbol |
//! | `unbooked_grace_secs` | 30 | a reserved order never seen working and without a known end is settled once a state this much newer than the approval omits it |
//! | `booking_grace_secs` | 1 | a filled order (terminal order event) is settled once a state this much newer than the fill omits it (covers the accounts stage booking the execution a moment after the event) |
//! | `reservation_max_age_secs` | 86400 | safety prune: a reservation older than this is dropped whatever the state says |
//! | `reservation_max_entries` | 4000 | most approved-but-unbooked entries per account; more are rejected `reservation_backlog` (a single-leg entry is ~210 bytes of the one KV value, limit 1 MiB) |
//! | `entry_wait_secs` | 300 | an EXIT / CANCEL waits this long for its entry, then closes against the position |
//! | `entry_done_retention_secs` | 86400 | a finished entry's `entries.*` / `exits.*` keys are deleted this long after their last change |
//! | `entry_max_age_secs` | 2592000 | any `entries.*` / `exits.*` key unchanged this long is deleted |
//! | `janitor_interval_secs` | 600 | how often a replica prunes those keys |
//!
//! The process config (`mtx_runtime::Config`) does not carry a `[cerebro]`
//! section yet; until it does, [`crate::worker::Settings::from_config`] uses
//! [`CerebroConfig::default`] and a deployment can only change these through
//! [`crate::worker::spawn_with`].

use serde::{Deserialize, Serialize};

/// The `[cerebro]` section (see the module docs for every key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CerebroConfig {
    /// Backtest reload period, seconds.
    pub backtest_refresh_secs: u64,
    /// Retry period while nothing is loaded, seconds.
    pub backtest_retry_secs: u64,
    /// Mongo server selection / connect timeout, milliseconds.
    pub mongo_timeout_ms: u64,
    /// Start-up wait for the latest marks, milliseconds.
    pub marks_initial_wait_ms: u64,
    /// Fallback settlement of an order never seen working, seconds.
    pub unbooked_grace_secs: u64,
    /// Settlement of a filled order after its fill, seconds.
    pub booking_grace_secs: u64,
    /// Safety prune of reservations, seconds.
    pub reservation_max_age_secs: u64,
    /// Most unbooked approved entries per account.
    pub reservation_max_entries: usize,
    /// How long an exit / cancel waits for its entry, seconds.
    pub entry_wait_secs: u64,
    /// Retention of a finished entry's keys, seconds.
    pub entry_done_retention_secs: u64,
    /// Retention of any entry's keys, seconds.
    pub entry_max_age_secs: u64,
    /// Janitor period, seconds.
    pub janitor_interval_secs: u64,
}

impl Default for CerebroConfig {
    fn default() -> Self {
        CerebroConfig {
            backtest_refresh_secs: 300,
            backtest_retry_secs: 10,
            mongo_timeout_ms: 3_000,
            marks_initial_wait_ms: 3_000,
            unbooked_grace_secs: 30,
            booking_grace_secs: 1,
            reservation_max_age_secs: 86_400,
            reservation_max_entries: 4_000,
            entry_wait_secs: 300,
            entry_done_retention_secs: 86_400,
            entry_max_age_secs: 30 * 86_400,
            janitor_interval_secs: 600,
        }
    }
}

impl CerebroConfig {
    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("cerebro.backtest_refresh_secs", self.backtest_refresh_secs),
            ("cerebro.backtest_retry_secs", self.backtest_retry_secs),
            ("cerebro.mongo_timeout_ms", self.mongo_timeout_ms),
            (
                "cerebro.reservation_max_age_secs",
                self.reservation_max_age_secs,
            ),
            ("cerebro.entry_max_age_secs", self.entry_max_age_secs),
            ("cerebro.janitor_interval_secs", self.janitor_interval_secs),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(format!("{key}: must be > 0"));
            }
        }
        if self.reservation_max_entries == 0 {
            return Err("cerebro.reservation_max_entries: must be > 0".into());
        }
        if self.unbooked_grace_secs >= self.reservation_max_age_secs {
            return Err(format!(
                "cerebro.unbooked_grace_secs: {} must be below cerebro.reservation_max_age_secs ({})",
                self.unbooked_grace_secs, self.reservation_max_age_secs
            ));
        }
        if self.entry_done_retention_secs > self.entry_max_age_secs {
            return Err(format!(
                "cerebro.entry_done_retention_secs: {} must not exceed cerebro.entry_max_age_secs ({})",
                self.entry_done_retention_secs, self.entry_max_age_secs
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_the_key() {
        assert_eq!(CerebroConfig::default().validate(), Ok(()));
        let c: CerebroConfig =
            serde_json::from_value(serde_json::json!({"backtest_refresh_secs": 60})).unwrap();
        assert_eq!(c.backtest_refresh_secs, 60);
        assert_eq!(c.reservation_max_entries, 4_000);
        let bad = CerebroConfig {
            reservation_max_entries: 0,
            ..CerebroConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("cerebro.reservation_max_entries"));
        let bad = CerebroConfig {
            unbooked_grace_secs: 100,
            reservation_max_age_secs: 100,
            ..CerebroConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("cerebro.unbooked_grace_secs"));
        assert!(serde_json::from_value::<CerebroConfig>(serde_json::json!({"nope": 1})).is_err());
    }
}
