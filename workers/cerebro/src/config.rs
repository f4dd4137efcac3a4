//! Cerebro's operator settings: the `[cerebro]` config section
//! ([`CerebroConfig`], defined in `mtx_runtime::config` so `mtx run cerebro`
//! reads it from `mtx.toml` / `MTX_CEREBRO__*` like every other section, and
//! validated with the rest of the process config).
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `backtest_refresh_secs` | 300 | reload `<mongo.trading_db>.strategy_backtest_data` this often |
//! | `backtest_retry_secs` | 10 | retry this soon while no backtest data could be loaded yet |
//! | `mongo_timeout_ms` | 3000 | Mongo server selection / connect timeout of the backtest loader |
//! | `marks_initial_wait_ms` | 3000 | at start, wait at most this long for the latest mark per symbol |
//! | `evidence_initial_wait_ms` | 20000 | at start, wait at most this long for the order events and executions replayed since the oldest reservation |
//! | `unbooked_grace_secs` | 30 | a reserved order never seen working and without a known end is settled once a state this much newer than the approval omits it |
//! | `booking_grace_secs` | 1 | a filled order (terminal order event) is settled once a state this much newer than the fill omits it (covers the accounts stage booking the execution a moment after the event) |
//! | `reservation_max_age_secs` | 86400 | safety prune: a reservation older than this is dropped whatever the state says |
//! | `reservation_max_entries` | 4000 | most approved-but-unbooked entries per account; more are rejected `reservation_backlog` (a single-leg entry is ~210 bytes of the one KV value, limit 1 MiB) |
//! | `entry_wait_secs` | 300 | an EXIT / CANCEL waits this long for its entry, then closes against the position |
//! | `entry_done_retention_secs` | 86400 | a fully exited entry is settled this long after its last change (exits folded into its record, its `exits.*` key deleted) |
//! | `entry_max_age_secs` | 2592000 | any `entries.*` / `exits.*` key unchanged this long is deleted |
//! | `janitor_interval_secs` | 600 | how often a replica prunes those keys |
//! | `defer_retry_ms` | 250 | redelivery delay of a deferred EXIT / CANCEL (entry not filled or not booked yet) for its first `defer_fast_retries` deferrals |
//! | `defer_fast_retries` | 4 | deferrals retried after `defer_retry_ms` |
//! | `defer_backoff_ms` | 4000 | later deferrals wait this long, doubling per delivery … |
//! | `defer_max_ms` | 30000 | … up to this |
//!
//! With the defaults and `topology.max_deliver` 10 a deferred exit is tried
//! four times within its first second, then after 4, 8, 16 and 30 s; the
//! delivery before the last (about a minute after the first) or
//! `entry_wait_secs` decides it with `entry_wait_expired`.

pub use mtx_runtime::config::CerebroConfig;
