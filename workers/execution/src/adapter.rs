//! Broker adapters: the venue behind an account.
//!
//! The execution worker routes every order by its account ([`Routes`], from
//! `execution.adapters` / `execution.default_adapter`) to one
//! [`BrokerAdapter`]. An adapter is a state machine driven by the worker:
//! `submit`, `cancel`, market prices and a clock tick go in, [`VenueEvent`]s
//! (acks, fills, partial fills, rejects, cancels, expiries, child orders) come
//! out, either at once or later through [`BrokerAdapter::poll_events`] — the
//! events stream of a venue that answers asynchronously. Its state (working
//! orders, marks) can be saved and restored ([`BrokerAdapter::save_into`] /
//! [`restore`]); finished orders are handed out
//! ([`BrokerAdapter::take_finished`]) and remembered by the worker, one KV key
//! each. That is what makes the worker's no-double-fill guarantee possible
//! with a saved state bounded by the working orders (see [`crate::worker`]).
//!
//! This build has one adapter, [`PaperAdapter`] (name `paper`): the
//! deterministic [`PaperVenue`], used for strategies in PAPER mode. A live
//! broker adapter would implement the same trait, keep its own order-id map
//! in the saved state and report the broker's acks and fills from
//! `poll_events`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mtx_schemas::order::Order;
use rust_decimal::Decimal;

use crate::paper::{
    FinishedOrder, OrderInfo, PaperConfig, PaperVenue, StateError, VenueEvent, VenueState,
};

/// Why an adapter could not be built or saved.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// No adapter of that name in this build.
    #[error("unknown broker adapter `{0}` (this build has: paper)")]
    Unknown(String),
    /// The saved state could not be restored.
    #[error("adapter `{name}`: {source}")]
    State {
        /// Adapter name.
        name: String,
        /// What is wrong with it.
        source: StateError,
    },
    /// The saved state is not valid JSON for this adapter.
    #[error("adapter `{name}`: unreadable state: {message}")]
    Serde {
        /// Adapter name.
        name: String,
        /// Decoder message.
        message: String,
    },
}

/// What a venue holds for one account right now.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerSnapshot {
    /// The account.
    pub account: String,
    /// Its working (non-terminal) orders, in arrival order.
    pub working_orders: Vec<Order>,
    /// The venue's latest mark per symbol.
    pub marks: BTreeMap<String, Decimal>,
}

/// One venue behind one or more accounts. Every method that takes `now`
/// first expires working orders due at `now`.
pub trait BrokerAdapter: Send + Sync {
    /// The adapter name used in config (`paper`).
    fn name(&self) -> &'static str;
    /// Send a new order. The caller has checked that the id is new
    /// ([`BrokerAdapter::lookup`]).
    fn submit(&mut self, order: Order, now: DateTime<Utc>) -> Vec<VenueEvent>;
    /// Ask the venue to cancel a working order.
    fn cancel(&mut self, order_id: &str, now: DateTime<Utc>) -> Vec<VenueEvent>;
    /// A market price (a paper venue matches on it; a live broker ignores it).
    fn on_price(&mut self, symbol: &str, price: Decimal, now: DateTime<Utc>) -> Vec<VenueEvent>;
    /// Advance the clock: expiries.
    fn tick(&mut self, now: DateTime<Utc>) -> Vec<VenueEvent>;
    /// Events the venue reported asynchronously since the last call (acks,
    /// fills, rejects of a live broker). The paper venue answers every call
    /// synchronously, so this is always empty for it.
    fn poll_events(&mut self) -> Vec<VenueEvent>;
    /// What the venue knows about an order id it still holds (working, or
    /// finished and not yet taken by [`BrokerAdapter::take_finished`]).
    fn lookup(&self, order_id: &str) -> Option<OrderInfo>;
    /// Working orders and marks of `account`.
    fn account_snapshot(&self, account: &str) -> BrokerSnapshot;
    /// Append the state (working orders, marks; no finished order once
    /// [`BrokerAdapter::take_finished`] ran) to `out` as one JSON value, for
    /// [`restore`]. Serialized in place: no copy of the state is made.
    fn save_into(&self, out: &mut Vec<u8>) -> Result<(), AdapterError>;
    /// Take the finished orders out: from now on the adapter does not know
    /// their ids, the caller remembers them. Call between inputs.
    fn take_finished(&mut self, now: DateTime<Utc>) -> Vec<FinishedOrder>;
}

/// Which adapter serves which account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Routes {
    /// Adapter name per account.
    pub accounts: BTreeMap<String, String>,
    /// Adapter of every other account (`None`: their orders are refused).
    pub default: Option<String>,
}

impl Routes {
    /// The adapter name for `account`.
    pub fn route(&self, account: &str) -> Option<&str> {
        self.accounts
            .get(account)
            .or(self.default.as_ref())
            .map(String::as_str)
    }

    /// Every adapter name in use, sorted, without repeats.
    pub fn adapter_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .accounts
            .values()
            .chain(self.default.iter())
            .cloned()
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Check that every adapter name exists in this build.
    pub fn validate(&self) -> Result<(), AdapterError> {
        for n in self.adapter_names() {
            if n != PaperAdapter::NAME {
                return Err(AdapterError::Unknown(n));
            }
        }
        Ok(())
    }
}

/// Build adapter `name`, from its saved state when given.
pub fn restore(
    name: &str,
    paper: &PaperConfig,
    state: Option<serde_json::Value>,
) -> Result<Box<dyn BrokerAdapter>, AdapterError> {
    match name {
        PaperAdapter::NAME => Ok(Box::new(PaperAdapter::restore(paper.clone(), state)?)),
        other => Err(AdapterError::Unknown(other.to_string())),
    }
}

/// The paper venue as a broker adapter.
#[derive(Debug, Clone)]
pub struct PaperAdapter {
    venue: PaperVenue,
}

impl PaperAdapter {
    /// Config name.
    pub const NAME: &'static str = "paper";

    /// A venue with `config`, continuing from `state` when given.
    pub fn restore(
        config: PaperConfig,
        state: Option<serde_json::Value>,
    ) -> Result<Self, AdapterError> {
        let state_err = |source| AdapterError::State {
            name: Self::NAME.to_string(),
            source,
        };
        let venue = match state {
            None => PaperVenue::new(config).map_err(|e| state_err(StateError::Config(e)))?,
            Some(v) => {
                let s: VenueState = serde_json::from_value(v).map_err(|e| AdapterError::Serde {
                    name: Self::NAME.to_string(),
                    message: e.to_string(),
                })?;
                PaperVenue::restore(config, s).map_err(state_err)?
            }
        };
        Ok(PaperAdapter { venue })
    }

    /// The venue inside.
    pub fn venue(&self) -> &PaperVenue {
        &self.venue
    }
}

impl BrokerAdapter for PaperAdapter {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn submit(&mut self, order: Order, now: DateTime<Utc>) -> Vec<VenueEvent> {
        self.venue.submit(order, now)
    }

    fn cancel(&mut self, order_id: &str, now: DateTime<Utc>) -> Vec<VenueEvent> {
        self.venue.cancel(order_id, now)
    }

    fn on_price(&mut self, symbol: &str, price: Decimal, now: DateTime<Utc>) -> Vec<VenueEvent> {
        self.venue.on_price(symbol, price, now)
    }

    fn tick(&mut self, now: DateTime<Utc>) -> Vec<VenueEvent> {
        self.venue.tick(now)
    }

    fn poll_events(&mut self) -> Vec<VenueEvent> {
        Vec::new()
    }

    fn lookup(&self, order_id: &str) -> Option<OrderInfo> {
        self.venue.lookup(order_id)
    }

    fn account_snapshot(&self, account: &str) -> BrokerSnapshot {
        BrokerSnapshot {
            account: account.to_string(),
            working_orders: self
                .venue
                .working_orders()
                .filter(|o| o.account == account)
                .cloned()
                .collect(),
            marks: self.venue.marks().clone(),
        }
    }

    fn save_into(&self, out: &mut Vec<u8>) -> Result<(), AdapterError> {
        self.venue
            .write_state(out)
            .map_err(|e| AdapterError::Serde {
                name: Self::NAME.to_string(),
                message: e.to_string(),
            })
    }

    fn take_finished(&mut self, now: DateTime<Utc>) -> Vec<FinishedOrder> {
        self.venue.drain_finished(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use mtx_schemas::{OrderStatus, OrderType};
    use rust_decimal_macros::dec;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 3, 14, 30, 0).unwrap() + chrono::Duration::seconds(s)
    }

    fn limit(id: &str, qty: Decimal, px: Decimal) -> Order {
        Order {
            order_type: OrderType::Limit,
            price: Some(px),
            ..Order::pending(id, "sig", "s", "A", "AAPL", qty, t(0))
        }
    }

    #[test]
    fn routes_pick_account_then_default() {
        let r = Routes {
            accounts: [("A".to_string(), "paper".to_string())].into(),
            default: None,
        };
        assert_eq!(r.route("A"), Some("paper"));
        assert_eq!(r.route("B"), None);
        r.validate().unwrap();
        let bad = Routes {
            default: Some("ibkr".into()),
            ..r
        };
        assert!(matches!(bad.validate(), Err(AdapterError::Unknown(n)) if n == "ibkr"));
    }

    fn saved(a: &PaperAdapter) -> serde_json::Value {
        let mut out = Vec::new();
        a.save_into(&mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    /// Save, restore and go on: the restored venue behaves exactly like the
    /// original (same events for the same later inputs); finished orders are
    /// handed out once and leave the saved state.
    #[test]
    fn save_restore_continues_identically() {
        let cfg = PaperConfig {
            fill_ratio: Some(dec!(0.5)),
            ..PaperConfig::default()
        };
        let mut a = PaperAdapter::restore(cfg.clone(), None).unwrap();
        a.submit(limit("o1", dec!(10), dec!(100)), t(1));
        a.submit(limit("o2", dec!(4), dec!(90)), t(2));
        a.on_price("AAPL", dec!(99), t(3)); // o1 partially filled
        let mut b = PaperAdapter::restore(cfg.clone(), Some(saved(&a))).unwrap();
        assert_eq!(a.venue().state(), b.venue().state());
        for (x, y) in [
            (
                a.on_price("AAPL", dec!(98), t(4)),
                b.on_price("AAPL", dec!(98), t(4)),
            ),
            (a.cancel("o2", t(5)), b.cancel("o2", t(5))),
            (
                a.on_price("AAPL", dec!(97), t(6)),
                b.on_price("AAPL", dec!(97), t(6)),
            ),
        ] {
            assert_eq!(x, y);
        }
        assert_eq!(b.lookup("o2").unwrap().status, OrderStatus::Cancelled);
        let done = b.take_finished(t(7));
        assert_eq!(done.len(), 1);
        let f = &done[0];
        assert_eq!(
            (f.order_id.as_str(), f.account.as_str(), f.status, f.filled),
            ("o2", "A", OrderStatus::Cancelled, dec!(0))
        );
        assert_eq!(f.finished_at, t(7));
        assert_eq!(
            f.info().fingerprint,
            crate::paper::order_fingerprint(&limit("o2", dec!(4), dec!(90)))
        );
        assert!(b.lookup("o2").is_none(), "the caller remembers it now");
        assert!(b.take_finished(t(8)).is_empty(), "handed out once");
        let state = saved(&b);
        assert!(state["orders"].get("o2").is_none());
        assert!(state.get("finished").is_none(), "nothing finished is saved");
        let snap = b.account_snapshot("A");
        assert_eq!(
            snap.working_orders
                .iter()
                .map(|o| o.order_id.as_str())
                .collect::<Vec<_>>(),
            ["o1"]
        );
        // a restore of a drained state round-trips too
        let again = PaperAdapter::restore(cfg, Some(state)).unwrap();
        assert_eq!(again.venue().state(), b.venue().state());
    }

    /// A state saved before finished orders moved out (with compacted
    /// records) still restores, and its records are handed out.
    #[test]
    fn compacted_records_of_an_old_state_are_handed_out() {
        let mut v = PaperVenue::new(PaperConfig::default()).unwrap();
        v.submit(limit("o1", dec!(1), dec!(100)), t(1));
        v.cancel("o1", t(2));
        v.compact(t(3), chrono::Duration::days(7));
        let old = serde_json::to_value(v.state()).unwrap();
        assert!(old["finished"].get("o1").is_some());
        let mut a = PaperAdapter::restore(PaperConfig::default(), Some(old)).unwrap();
        let done = a.take_finished(t(4));
        assert_eq!(done.len(), 1);
        assert_eq!(
            (
                done[0].order_id.as_str(),
                done[0].status,
                done[0].finished_at
            ),
            ("o1", OrderStatus::Cancelled, t(3))
        );
        assert!(a.lookup("o1").is_none());
    }

    #[test]
    fn corrupted_state_is_refused() {
        let mut a = PaperAdapter::restore(PaperConfig::default(), None).unwrap();
        a.submit(limit("o1", dec!(10), dec!(100)), t(1));
        let mut v = saved(&a);
        v["orders"]["o1"]["fsm"]["filled"] = serde_json::json!("11");
        let e = PaperAdapter::restore(PaperConfig::default(), Some(v)).unwrap_err();
        assert!(e.to_string().contains("inconsistent"), "{e}");
        let e =
            PaperAdapter::restore(PaperConfig::default(), Some(serde_json::json!(1))).unwrap_err();
        assert!(matches!(e, AdapterError::Serde { .. }));
    }
}
