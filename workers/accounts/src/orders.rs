//! Working orders for the snapshot's `open_orders`.
//!
//! Orders and their status events travel separately and may arrive in any
//! order or more than once. [`OpenOrders`] keeps, per order id, the order's
//! static fields (once seen) and the newest event (by per-order `seq`; older
//! or repeated events are ignored). An order is listed while its latest known
//! status is not terminal, with its remaining quantity
//! (`quantity - filled_quantity`) and its limit price (the trigger for a
//! STOP).
//!
//! # Finished orders are dropped
//!
//! Only working orders (status not terminal) are kept in full, indexed by
//! account, so a snapshot costs the account's working orders, not every
//! order ever seen. When an order reaches a terminal status its entry is
//! replaced by a *tombstone* (order id and event `seq`) so that a late or
//! redelivered copy of the order, or a stale event, cannot reopen it.
//! Tombstones are bounded ([`OrderRetention`]): one is dropped once the
//! newest event timestamp seen is more than `retention` past its terminal
//! event, or, oldest first, when more than `max_finished` are held.
//!
//! Dropping a tombstone raises the **horizon** to its terminal event's
//! timestamp. An order or event for an order id that is neither working nor
//! tombstoned and whose own timestamp is at or before the horizon is
//! ignored: it may belong to a finished order whose tombstone is gone (an
//! order is created before it finishes, and its events are stamped no later
//! than its terminal one). So a late copy can never bring a finished order
//! back as a ghost, whatever the retention; the price is that a first sight
//! of an order that is itself older than the horizon — stuck for longer
//! than the retention behind newer orders that already finished — is not
//! listed. The clock is the data's own (event timestamps), never the time
//! of processing, so the outcome does not depend on when messages are
//! handled; and the start-up replay applies every order before any event,
//! so replayed orders are all known before the horizon moves.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use mtx_schemas::order::{OpenOrder, Order, OrderEvent};
use mtx_schemas::{OrderStatus, OrderType};
use rust_decimal::Decimal;

/// How long finished orders are remembered (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrderRetention {
    /// A tombstone is dropped once the newest event timestamp seen is more
    /// than this past its terminal event.
    pub retention: chrono::Duration,
    /// At most this many tombstones are held (the oldest go first).
    pub max_finished: usize,
}

impl Default for OrderRetention {
    fn default() -> Self {
        OrderRetention {
            retention: chrono::Duration::seconds(300),
            max_finished: 200_000,
        }
    }
}

/// A working order (latest known status not terminal).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Working {
    account: String,
    /// Static fields, once the order itself has been seen.
    order: Option<OpenOrder>,
    status: OrderStatus,
    filled: Decimal,
    /// Seq of the newest applied event (0 = none).
    seq: u64,
}

impl Working {
    /// A working order known so far only from `event` (its static fields
    /// come with the next copy of the order, if any).
    fn from_event(event: &OrderEvent) -> Working {
        Working {
            account: event.account.clone(),
            order: None,
            status: event.status,
            filled: event.filled_quantity,
            seq: event.seq,
        }
    }
}

/// A finished order: the seq of its newest event, and which expiry-queue
/// entry is its own (`stamp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Finished {
    seq: u64,
    stamp: u64,
}

/// The working orders of every account, and a bounded memory of finished
/// ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOrders {
    retention: OrderRetention,
    working: HashMap<Arc<str>, Working>,
    /// Ids in `working`, per account, sorted.
    by_account: HashMap<String, BTreeSet<Arc<str>>>,
    finished: HashMap<Arc<str>, Finished>,
    /// Tombstones in the order they were made: (terminal event time, stamp,
    /// id). Entries whose stamp no longer matches `finished` are stale.
    expiry: VecDeque<(DateTime<Utc>, u64, Arc<str>)>,
    next_stamp: u64,
    /// Newest event timestamp seen.
    clock: Option<DateTime<Utc>>,
    /// Newest terminal time among dropped tombstones.
    horizon: Option<DateTime<Utc>>,
}

impl OpenOrders {
    /// An empty tracker with this retention of finished orders.
    pub fn new(retention: OrderRetention) -> Self {
        OpenOrders {
            retention,
            ..OpenOrders::default()
        }
    }

    /// Working orders held (listed ones and those whose order is not seen yet).
    pub fn working_len(&self) -> usize {
        self.working.len()
    }

    /// Tombstones of finished orders held.
    pub fn finished_len(&self) -> usize {
        self.finished.len()
    }

    /// Whether something about an unknown order stamped `at` is older than
    /// what has been forgotten.
    fn forgotten(&self, at: DateTime<Utc>) -> bool {
        self.horizon.is_some_and(|h| at <= h)
    }

    fn insert_working(&mut self, id: &str, w: Working) {
        let id: Arc<str> = Arc::from(id);
        self.by_account
            .entry(w.account.clone())
            .or_default()
            .insert(id.clone());
        self.working.insert(id, w);
    }

    fn remove_working(&mut self, id: &str) {
        if let Some(w) = self.working.remove(id) {
            if let Some(ids) = self.by_account.get_mut(&w.account) {
                ids.remove(id);
                if ids.is_empty() {
                    self.by_account.remove(&w.account);
                }
            }
        }
    }

    /// Make (or refresh) the tombstone of `id`, finished at `at`.
    fn finish(&mut self, id: &str, seq: u64, at: DateTime<Utc>) {
        let id: Arc<str> = Arc::from(id);
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.finished.insert(id.clone(), Finished { seq, stamp });
        self.expiry.push_back((at, stamp, id));
        self.expire();
    }

    /// Drop the tombstones past the retention, oldest first.
    fn expire(&mut self) {
        while let Some((at, stamp, id)) = self.expiry.front() {
            let stale = self.finished.get(id).is_none_or(|f| f.stamp != *stamp);
            let over = self.finished.len() > self.retention.max_finished;
            // A retention beyond the calendar (`at + retention` overflows)
            // never expires a tombstone.
            let old = self.clock.is_some_and(|c| {
                at.checked_add_signed(self.retention.retention)
                    .is_some_and(|end| end < c)
            });
            if !(stale || over || old) {
                break;
            }
            let at = *at;
            if let Some((_, _, id)) = self.expiry.pop_front() {
                if !stale {
                    self.finished.remove(&id);
                    self.horizon = self.horizon.max(Some(at));
                }
            }
        }
    }

    /// Remember `order`'s static fields; returns whether anything changed.
    /// Its status counts only if no event has been seen for it yet. A copy
    /// of a finished order, or of one older than the horizon, is ignored.
    pub fn track(&mut self, order: &Order) -> bool {
        let id = order.order_id.as_str();
        if self.finished.contains_key(id) {
            return false;
        }
        let view = || OpenOrder {
            order_id: order.order_id.clone(),
            instrument: order.instrument.clone(),
            side: order.side,
            quantity: order.quantity,
            order_type: order.order_type,
            price: match order.order_type {
                OrderType::Stop => order.stop_price.or(order.price),
                OrderType::Market | OrderType::Limit => order.price,
            },
        };
        if let Some(w) = self.working.get_mut(id) {
            if w.order.is_some() {
                return false;
            }
            w.order = Some(view());
            return true;
        }
        if self.forgotten(order.timestamp) {
            return false;
        }
        if order.status.is_terminal() {
            self.finish(id, 0, order.timestamp);
        } else {
            self.insert_working(
                id,
                Working {
                    account: order.account.clone(),
                    order: Some(view()),
                    status: order.status,
                    filled: Decimal::ZERO,
                    seq: 0,
                },
            );
        }
        true
    }

    /// Apply a status event; returns whether it was newer than what is known.
    pub fn apply_event(&mut self, event: &OrderEvent) -> bool {
        self.clock = self.clock.max(Some(event.timestamp));
        let changed = self.apply_event_inner(event);
        self.expire();
        changed
    }

    fn apply_event_inner(&mut self, event: &OrderEvent) -> bool {
        let id = event.order_id.as_str();
        let terminal = event.status.is_terminal();
        if let Some(f) = self.finished.get_mut(id) {
            if event.seq <= f.seq {
                return false;
            }
            if terminal {
                f.seq = event.seq;
            } else {
                // A newer non-terminal event reopens it.
                self.finished.remove(id);
                self.insert_working(id, Working::from_event(event));
            }
            return true;
        }
        if let Some(w) = self.working.get_mut(id) {
            if event.seq <= w.seq {
                return false;
            }
            if terminal {
                self.remove_working(id);
                self.finish(id, event.seq, event.timestamp);
            } else {
                w.seq = event.seq;
                w.status = event.status;
                w.filled = event.filled_quantity;
            }
            return true;
        }
        if event.seq == 0 || self.forgotten(event.timestamp) {
            return false;
        }
        if terminal {
            self.finish(id, event.seq, event.timestamp);
        } else {
            self.insert_working(id, Working::from_event(event));
        }
        true
    }

    /// Working orders of `account`, by order id, with remaining quantity.
    pub fn for_account(&self, account: &str) -> Vec<OpenOrder> {
        let Some(ids) = self.by_account.get(account) else {
            return Vec::new();
        };
        ids.iter()
            .filter_map(|id| self.working.get(id))
            .filter_map(|w| {
                let mut o = w.order.clone()?;
                o.quantity -= w.filled;
                Some(o)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use rust_decimal_macros::dec;
    use std::collections::BTreeMap;

    fn order(id: &str) -> Order {
        let t = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        Order {
            order_type: OrderType::Limit,
            price: Some(dec!(150)),
            ..Order::pending(id, "sig", "s", "A", "AAPL", dec!(10), t)
        }
    }

    fn at(id: &str, t: i64) -> Order {
        Order {
            timestamp: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
                + chrono::Duration::seconds(t),
            ..order(id)
        }
    }

    fn event_at(id: &str, status: OrderStatus, seq: u64, t: i64) -> OrderEvent {
        OrderEvent {
            timestamp: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
                + chrono::Duration::seconds(t),
            ..event(id, status, Decimal::ZERO, seq)
        }
    }

    fn retention(secs: i64, max: usize) -> OrderRetention {
        OrderRetention {
            retention: chrono::Duration::seconds(secs),
            max_finished: max,
        }
    }

    #[test]
    fn finished_orders_are_dropped_and_tombstones_are_bounded() {
        let mut b = OpenOrders::new(retention(3_600, 3));
        for i in 0..10 {
            let id = format!("o{i}");
            assert!(b.track(&at(&id, i)));
            assert!(b.apply_event(&event_at(&id, OrderStatus::Accepted, 1, i)));
            assert_eq!(b.for_account("A").len(), 1);
            assert!(b.apply_event(&event_at(&id, OrderStatus::Filled, 2, i)));
            assert!(b.for_account("A").is_empty());
            assert_eq!(b.working_len(), 0, "a finished order is not kept in full");
        }
        assert_eq!(b.finished_len(), 3, "only the newest tombstones are kept");
        assert!(b.by_account.is_empty() && b.expiry.len() == 3);
        // Late copies cannot reopen finished orders, remembered or not.
        for i in [0, 6, 9] {
            let id = format!("o{i}");
            assert!(!b.track(&at(&id, i)), "{id}");
            assert!(
                !b.apply_event(&event_at(&id, OrderStatus::Accepted, 1, i)),
                "{id}"
            );
            assert!(
                !b.apply_event(&event_at(&id, OrderStatus::Filled, 2, i)),
                "{id}"
            );
        }
        assert!(b.for_account("A").is_empty());
        assert_eq!((b.working_len(), b.finished_len()), (0, 3));
        // A new order (newer than what was forgotten) is tracked as usual.
        assert!(b.track(&at("new", 10)));
        assert_eq!(b.for_account("A").len(), 1);
    }

    #[test]
    fn tombstones_expire_with_the_event_clock() {
        let mut b = OpenOrders::new(retention(60, 1_000));
        b.track(&at("o1", 0));
        b.apply_event(&event_at("o1", OrderStatus::Cancelled, 1, 0));
        b.track(&at("o2", 30));
        b.apply_event(&event_at("o2", OrderStatus::Rejected, 1, 30));
        assert_eq!(b.finished_len(), 2);
        // Events 61 s later: o1's tombstone goes, o2's stays.
        b.track(&at("o3", 61));
        b.apply_event(&event_at("o3", OrderStatus::Accepted, 1, 61));
        assert_eq!(b.finished_len(), 1);
        assert!(!b.track(&at("o1", 0)), "older than the horizon");
        assert!(!b.track(&at("o2", 30)), "still remembered");
        assert_eq!(b.for_account("A").len(), 1, "only o3");
        b.apply_event(&event_at("o3", OrderStatus::Filled, 2, 200));
        assert_eq!((b.working_len(), b.finished_len()), (0, 1));
    }

    #[test]
    fn a_retention_beyond_the_calendar_never_expires() {
        // The largest retention `ledger_config` can build: `at + retention`
        // is past chrono's range and means "never", not a panic.
        let mut b = OpenOrders::new(OrderRetention {
            retention: chrono::Duration::MAX,
            max_finished: 1_000,
        });
        b.track(&at("o1", 0));
        b.apply_event(&event_at("o1", OrderStatus::Filled, 1, 0));
        b.track(&at("o2", 1_000_000_000));
        b.apply_event(&event_at("o2", OrderStatus::Accepted, 1, 1_000_000_000));
        assert_eq!(b.finished_len(), 1, "o1's tombstone is kept");
        assert!(!b.track(&at("o1", 0)), "o1 stays finished");
        assert_eq!(b.for_account("A").len(), 1, "only o2");
    }

    proptest::proptest! {
        /// Orders and events in any order, with redelivered copies, through
        /// a tracker that may forget: never a ghost (an order listed whose
        /// newest event is terminal), and with enough memory exactly the
        /// orders whose newest event is not terminal.
        #[test]
        fn no_ghosts_whatever_the_order(
            plan in proptest::collection::vec((0usize..12, 1u64..4, proptest::bool::ANY), 1..60),
            swaps in proptest::collection::vec((0usize..200, 0usize..200), 0..40),
            max in 1usize..6,
        ) {
            // Message k of the plan: order `id`, events 1..=last (the last
            // one terminal when `ends`), stamped by order number.
            let mut msgs: Vec<Result<Order, OrderEvent>> = Vec::new();
            let mut newest: BTreeMap<usize, (u64, bool)> = BTreeMap::new();
            for (id, last, ends) in &plan {
                let name = format!("o{id}");
                let t = *id as i64 * 10;
                if newest.contains_key(id) {
                    // A redelivered copy of the order.
                    msgs.push(Ok(at(&name, t)));
                    continue;
                }
                msgs.push(Ok(at(&name, t)));
                for seq in 1..=*last {
                    let terminal = *ends && seq == *last;
                    let status = if terminal { OrderStatus::Filled } else { OrderStatus::Accepted };
                    msgs.push(Err(event_at(&name, status, seq, t + seq as i64)));
                }
                newest.insert(*id, (*last, *ends));
            }
            let n = msgs.len();
            for (a, b) in swaps {
                msgs.swap(a % n, b % n);
            }
            let mut small = OpenOrders::new(retention(1_000_000, max));
            let mut big = OpenOrders::default();
            for m in &msgs {
                for b in [&mut small, &mut big] {
                    match m {
                        Ok(o) => { b.track(o); }
                        Err(e) => { b.apply_event(e); }
                    }
                }
            }
            let open: BTreeSet<String> = newest
                .iter()
                .filter(|(_, (_, ends))| !ends)
                .map(|(id, _)| format!("o{id}"))
                .collect();
            let listed = |b: &OpenOrders| -> BTreeSet<String> {
                b.for_account("A").into_iter().map(|o| o.order_id).collect()
            };
            proptest::prop_assert!(listed(&small).is_subset(&open), "ghost: {:?} vs {:?}", listed(&small), open);
            proptest::prop_assert_eq!(listed(&big), open);
            proptest::prop_assert!(small.finished_len() <= max);
        }
    }

    fn event(id: &str, status: OrderStatus, filled: Decimal, seq: u64) -> OrderEvent {
        OrderEvent {
            order_id: id.into(),
            account: "A".into(),
            status,
            previous_status: None,
            filled_quantity: filled,
            avg_fill_price: None,
            reason: None,
            timestamp: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
            seq,
        }
    }

    #[test]
    fn lists_remaining_quantity_until_terminal() {
        let mut b = OpenOrders::default();
        b.track(&order("o1"));
        assert_eq!(b.for_account("A")[0].quantity, dec!(10));
        assert!(b.apply_event(&event("o1", OrderStatus::PartiallyFilled, dec!(4), 3)));
        assert_eq!(b.for_account("A")[0].quantity, dec!(6));
        assert!(
            !b.apply_event(&event("o1", OrderStatus::Accepted, dec!(0), 2)),
            "stale"
        );
        assert_eq!(b.for_account("A")[0].quantity, dec!(6));
        assert!(b.apply_event(&event("o1", OrderStatus::Filled, dec!(10), 4)));
        assert!(b.for_account("A").is_empty());
        assert!(b.for_account("B").is_empty());
    }

    #[test]
    fn events_before_the_order_and_late_copies() {
        let mut b = OpenOrders::default();
        b.apply_event(&event("o1", OrderStatus::Cancelled, dec!(0), 4));
        b.track(&order("o1"));
        assert!(
            b.for_account("A").is_empty(),
            "a late copy cannot reopen it"
        );
        b.apply_event(&event("o2", OrderStatus::Accepted, dec!(0), 2));
        assert!(
            b.for_account("A").is_empty(),
            "unknown fields: not listed yet"
        );
        b.track(&order("o2"));
        assert_eq!(b.for_account("A").len(), 1);
    }
}
