//! Working orders for the snapshot's `open_orders`.
//!
//! Orders and their status events travel separately and may arrive in any
//! order or more than once. [`OpenOrders`] keeps, per order id, the order's
//! static fields (once seen) and the newest event (by per-order `seq`; older
//! or repeated events are ignored). An order is listed while its latest known
//! status is not terminal, with its remaining quantity
//! (`quantity - filled_quantity`) and its limit price (the trigger for a
//! STOP). Finished orders are kept as tombstones so a late copy of the order
//! cannot reopen them.

use std::collections::BTreeMap;

use mtx_schemas::order::{OpenOrder, Order, OrderEvent};
use mtx_schemas::{OrderStatus, OrderType};
use rust_decimal::Decimal;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tracked {
    account: String,
    /// Static fields, once the order itself has been seen.
    order: Option<OpenOrder>,
    status: OrderStatus,
    filled: Decimal,
    /// Seq of the newest applied event (0 = none).
    seq: u64,
}

/// The working orders of every account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenOrders {
    orders: BTreeMap<String, Tracked>,
}

impl OpenOrders {
    /// Remember `order`'s static fields. Its status counts only if no event
    /// has been seen for it yet.
    pub fn track(&mut self, order: &Order) {
        let view = OpenOrder {
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
        let t = self
            .orders
            .entry(order.order_id.clone())
            .or_insert_with(|| Tracked {
                account: order.account.clone(),
                order: None,
                status: order.status,
                filled: Decimal::ZERO,
                seq: 0,
            });
        if t.order.is_none() {
            t.order = Some(view);
        }
    }

    /// Apply a status event; returns whether it was newer than what is known.
    pub fn apply_event(&mut self, event: &OrderEvent) -> bool {
        let t = self
            .orders
            .entry(event.order_id.clone())
            .or_insert_with(|| Tracked {
                account: event.account.clone(),
                order: None,
                status: event.status,
                filled: Decimal::ZERO,
                seq: 0,
            });
        if event.seq <= t.seq {
            return false;
        }
        t.seq = event.seq;
        t.status = event.status;
        t.filled = event.filled_quantity;
        true
    }

    /// Working orders of `account`, by order id, with remaining quantity.
    pub fn for_account(&self, account: &str) -> Vec<OpenOrder> {
        self.orders
            .values()
            .filter(|t| t.account == account && !t.status.is_terminal())
            .filter_map(|t| {
                let mut o = t.order.clone()?;
                o.quantity -= t.filled;
                Some(o)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use mtx_schemas::{Direction, InstrumentType, Side, SignalAction};
    use rust_decimal_macros::dec;

    fn order(id: &str) -> Order {
        Order {
            order_id: id.into(),
            signal_id: "sig".into(),
            strategy_id: "s".into(),
            account: "A".into(),
            timestamp: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
            instrument: "AAPL".into(),
            instrument_type: InstrumentType::Stock,
            direction: Direction::Long,
            action: SignalAction::Entry,
            side: Side::Buy,
            order_type: OrderType::Limit,
            price: Some(dec!(150)),
            stop_price: None,
            quantity: dec!(10),
            stop_loss: None,
            take_profit: None,
            expiry: None,
            cerebro_decision: None,
            status: OrderStatus::Pending,
            parent_order_id: None,
            leg: 0,
            multiplier: Decimal::ONE,
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
