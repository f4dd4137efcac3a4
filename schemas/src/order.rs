//! Orders, order events, execution confirmations and account state.
//!
//! These are the messages (and Mongo documents) between Cerebro, the execution
//! worker and the accounts worker:
//!
//! - [`Order`]: one sized order (`trading_orders`), written by Cerebro and by the
//!   venue for child stop-loss / take-profit orders.
//! - [`CancelOrder`]: a request to cancel a working order.
//! - [`OrderEvent`]: one status transition of an order, with its fill progress;
//!   [`decode_order_events`] reads an `orders.<account>.events` message, which
//!   carries one event or the several events one venue step made of one order.
//! - [`ExecutionConfirmation`]: one fill, partial fill or rejection
//!   (`execution_confirmations`).
//! - [`AccountState`]: a point-in-time account snapshot (`account_state`).
//!
//! Money, prices and quantities are [`Decimal`] end to end and serialize as
//! strings (rust_decimal's default serde), so no value ever passes through a
//! binary float. Quantities are always positive; the side (and, for positions,
//! the direction) carries the sign.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::enums::{
    Direction, ExecutionStatus, InstrumentType, OrderStatus, OrderType, Side, SignalAction,
};

/// Serde default for contract multipliers: plain instruments (stocks, spot FX,
/// crypto) have a multiplier of one.
fn one() -> Decimal {
    Decimal::ONE
}

/// The direction of the position an order or fill opens (ENTRY) or closes (EXIT),
/// derived from action and side alone.
///
/// Senders are inconsistent about `direction` on exit legs (the sample exit of a
/// long is written `"action": "SELL", "direction": "SHORT"`), while action + side
/// is unambiguous: an ENTRY BUY / EXIT SELL is a LONG position, an ENTRY SELL /
/// EXIT BUY is a SHORT one. Execution and accounts key positions on this.
pub fn position_direction(action: SignalAction, side: Side) -> Direction {
    match (action, side) {
        (SignalAction::Entry, Side::Buy) | (SignalAction::Exit, Side::Sell) => Direction::Long,
        (SignalAction::Entry, Side::Sell) | (SignalAction::Exit, Side::Buy) => Direction::Short,
    }
}

/// The order side that performs `action` on a position of `direction`
/// (the inverse of [`position_direction`]).
pub fn order_side(action: SignalAction, direction: Direction) -> Side {
    match (action, direction) {
        (SignalAction::Entry, Direction::Long) | (SignalAction::Exit, Direction::Short) => {
            Side::Buy
        }
        (SignalAction::Entry, Direction::Short) | (SignalAction::Exit, Direction::Long) => {
            Side::Sell
        }
    }
}

/// The other side; child stop-loss / take-profit orders trade against their
/// entry.
pub fn opposite_side(side: Side) -> Side {
    match side {
        Side::Buy => Side::Sell,
        Side::Sell => Side::Buy,
    }
}

/// Why Cerebro sized an order the way it did (`trading_orders.cerebro_decision`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CerebroDecision {
    /// Capital allocated to the strategy when the order was sized.
    pub allocated_capital: Decimal,
    /// Margin the order is expected to consume.
    pub margin_required: Decimal,
    /// Human-readable sizing explanation.
    pub position_size_logic: String,
    /// Free-form risk figures (CVaR contribution, utilization, ...).
    #[serde(default)]
    pub risk_metrics: serde_json::Value,
}

/// One sized order (`trading_orders`).
///
/// Written by Cerebro for each signal leg; the venue writes child orders (with
/// [`Order::parent_order_id`] set) for an entry's attached stop-loss and
/// take-profit. `quantity` is positive and in units/contracts; `side` says
/// whether it buys or sells.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Deterministic id (`ids::order_id(signal_id, leg)` or derived from the
    /// parent for child orders); the Mongo natural key.
    pub order_id: String,
    /// The standardized signal this order came from.
    pub signal_id: String,
    /// Strategy that owns the order (and the resulting position).
    pub strategy_id: String,
    /// Broker account the order is routed to, e.g. `IBKR_Main`.
    pub account: String,
    /// When the order was created.
    pub timestamp: DateTime<Utc>,
    /// Symbol, e.g. `AAPL`, `GC`, `EURUSD`.
    pub instrument: String,
    /// Asset class; selects default margin and commission treatment.
    pub instrument_type: InstrumentType,
    /// Direction of the position this order opens or closes. Should agree with
    /// [`position_direction`]`(action, side)`, which downstream code trusts.
    pub direction: Direction,
    /// ENTRY opens / adds to a position, EXIT reduces / closes it.
    pub action: SignalAction,
    /// BUY or SELL at the venue.
    pub side: Side,
    /// MARKET, LIMIT or STOP.
    pub order_type: OrderType,
    /// Reference price for MARKET orders (used when the venue has no mark),
    /// the limit price for LIMIT orders, and the trigger for STOP orders when
    /// `stop_price` is absent.
    #[serde(default)]
    pub price: Option<Decimal>,
    /// Trigger price of a STOP order.
    #[serde(default)]
    pub stop_price: Option<Decimal>,
    /// Position-sized quantity (positive).
    pub quantity: Decimal,
    /// Attached protective stop; becomes a child STOP order once the entry fills.
    #[serde(default)]
    pub stop_loss: Option<Decimal>,
    /// Attached profit target; becomes a child LIMIT order once the entry fills.
    #[serde(default)]
    pub take_profit: Option<Decimal>,
    /// Good-till time; a working order is EXPIRED at or after it.
    #[serde(default)]
    pub expiry: Option<DateTime<Utc>>,
    /// Cerebro's sizing rationale; absent on venue-created child orders.
    #[serde(default)]
    pub cerebro_decision: Option<CerebroDecision>,
    /// Lifecycle status as last known by the writer.
    pub status: OrderStatus,
    /// The entry order a stop-loss / take-profit child belongs to.
    #[serde(default)]
    pub parent_order_id: Option<String>,
    /// Index of the signal leg this order executes (0-based).
    #[serde(default)]
    pub leg: u32,
    /// Contract multiplier (1 for stocks; e.g. 100 for GC).
    #[serde(default = "one")]
    pub multiplier: Decimal,
}

impl Order {
    /// A new PENDING order with only its identity, size and creation time
    /// given: a MARKET ENTRY BUY of a stock (so `direction` is LONG, as
    /// [`position_direction`] says), leg 0, multiplier 1, and every optional
    /// field (`price`, `stop_price`, `stop_loss`, `take_profit`, `expiry`,
    /// `cerebro_decision`, `parent_order_id`) `None`.
    ///
    /// It exists so that code needing an order (tests above all) names only
    /// what differs from this plain order, with struct update syntax:
    /// `Order { order_type: OrderType::Limit, price: Some(px), ..Order::pending(..) }`,
    /// instead of writing all twenty fields again. A caller that changes
    /// `action` or `side` sets `direction` to match (it is not recomputed).
    pub fn pending(
        order_id: impl Into<String>,
        signal_id: impl Into<String>,
        strategy_id: impl Into<String>,
        account: impl Into<String>,
        instrument: impl Into<String>,
        quantity: Decimal,
        timestamp: DateTime<Utc>,
    ) -> Order {
        let (action, side) = (SignalAction::Entry, Side::Buy);
        Order {
            order_id: order_id.into(),
            signal_id: signal_id.into(),
            strategy_id: strategy_id.into(),
            account: account.into(),
            timestamp,
            instrument: instrument.into(),
            instrument_type: InstrumentType::Stock,
            direction: position_direction(action, side),
            action,
            side,
            order_type: OrderType::Market,
            price: None,
            stop_price: None,
            quantity,
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

    /// Direction of the position this order affects, from action + side
    /// (see [`position_direction`]).
    pub fn position_direction(&self) -> Direction {
        position_direction(self.action, self.side)
    }
}

/// A request to cancel a working order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelOrder {
    /// The order to cancel.
    pub order_id: String,
    /// Account the order lives in (routing / sanity check).
    pub account: String,
    /// Why the cancel was requested (operator, exit signal, OCO, ...).
    #[serde(default)]
    pub reason: Option<String>,
    /// When the cancel was requested.
    pub timestamp: DateTime<Utc>,
}

/// One status transition of an order, with cumulative fill progress.
///
/// `seq` increases by one per event of the same order, so a consumer can apply
/// events idempotently and ignore stale or redelivered ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// The order that changed.
    pub order_id: String,
    /// Its account.
    pub account: String,
    /// Status after the transition.
    pub status: OrderStatus,
    /// Status before the transition (`None` for the first event).
    #[serde(default)]
    pub previous_status: Option<OrderStatus>,
    /// Cumulative filled quantity after the transition.
    pub filled_quantity: Decimal,
    /// Volume-weighted average fill price so far (`None` before any fill).
    #[serde(default)]
    pub avg_fill_price: Option<Decimal>,
    /// Why (reject reason, cancel reason, ...).
    #[serde(default)]
    pub reason: Option<String>,
    /// When the transition happened.
    pub timestamp: DateTime<Utc>,
    /// Per-order event sequence, starting at 1.
    pub seq: u64,
}

/// Why an `orders.<account>.events` payload is not a valid message.
#[derive(Debug, thiserror::Error)]
pub enum OrderEventsError {
    /// Not JSON, or not the shape of an event (or a list of events).
    #[error("not an order event or a list of order events: {0}")]
    Json(#[from] serde_json::Error),
    /// An empty list.
    #[error("an order-events message holds no event")]
    Empty,
    /// A list naming two orders (or two accounts).
    #[error("one order-events message holds events of {first} and {other}")]
    MixedOrders {
        /// `account/order_id` of the first event.
        first: String,
        /// `account/order_id` of the offending event.
        other: String,
    },
    /// A list whose `seq` does not strictly increase.
    #[error("order event seq {next} follows seq {prev}: a message lists events in increasing seq")]
    OutOfSequence {
        /// The previous event's seq.
        prev: u64,
        /// The offending event's seq.
        next: u64,
    },
}

/// The events of one `orders.<account>.events` message, in `seq` order.
///
/// The execution stage publishes the events one venue step made of one order
/// (a market order's SUBMITTED, ACCEPTED and FILLED) as one message: a JSON
/// array of [`OrderEvent`]s of the same order and account in strictly
/// increasing `seq`, with message id `<order_id>.<first seq>-<last seq>`. A
/// single event is a bare object, as every message was before (message id
/// `<order_id>.<seq>`), so both shapes are read here. Consumers still apply
/// each event idempotently by `(order_id, seq)`.
pub fn decode_order_events(payload: &[u8]) -> Result<Vec<OrderEvent>, OrderEventsError> {
    let is_list = payload
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'[');
    if !is_list {
        return Ok(vec![serde_json::from_slice::<OrderEvent>(payload)?]);
    }
    let events: Vec<OrderEvent> = serde_json::from_slice(payload)?;
    let Some(first) = events.first() else {
        return Err(OrderEventsError::Empty);
    };
    for pair in events.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.order_id != first.order_id || b.account != first.account {
            return Err(OrderEventsError::MixedOrders {
                first: format!("{}/{}", first.account, first.order_id),
                other: format!("{}/{}", b.account, b.order_id),
            });
        }
        if b.seq <= a.seq {
            return Err(OrderEventsError::OutOfSequence {
                prev: a.seq,
                next: b.seq,
            });
        }
    }
    Ok(events)
}

/// One fill, partial fill or rejection (`execution_confirmations`).
///
/// Carries everything the accounts ledger needs to move positions and cash
/// without looking the order up: strategy, action, side, direction, instrument
/// type and multiplier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionConfirmation {
    /// Deterministic id (`ids::execution_id(order_id, fill_seq)`); the ledger
    /// applies each id at most once.
    pub execution_id: String,
    /// The order this execution belongs to.
    pub order_id: String,
    /// Account the fill books to.
    pub account: String,
    /// Strategy the resulting position belongs to.
    pub strategy_id: String,
    /// Symbol traded.
    pub instrument: String,
    /// Asset class (default margin treatment).
    pub instrument_type: InstrumentType,
    /// Direction of the position affected (from action + side).
    pub direction: Direction,
    /// ENTRY adds to the position, EXIT reduces it.
    pub action: SignalAction,
    /// BUY or SELL.
    pub side: Side,
    /// Quantity of this execution (positive; zero for rejections).
    pub quantity: Decimal,
    /// Execution price (zero for rejections).
    pub price: Decimal,
    /// Commission charged for this execution (a positive cost).
    pub commission: Decimal,
    /// Contract multiplier.
    #[serde(default = "one")]
    pub multiplier: Decimal,
    /// FILLED (order complete), PARTIAL_FILL (order still working) or REJECTED.
    pub status: ExecutionStatus,
    /// Raw venue payload, kept for audit.
    #[serde(default)]
    pub broker_response: serde_json::Value,
    /// When the execution happened.
    pub timestamp: DateTime<Utc>,
}

/// One open position inside an [`AccountState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenPosition {
    /// Owning strategy.
    pub strategy_id: String,
    /// Symbol.
    pub instrument: String,
    /// LONG or SHORT; `quantity` is always positive.
    pub direction: Direction,
    /// Open quantity (positive).
    pub quantity: Decimal,
    /// Average entry price.
    pub entry_price: Decimal,
    /// Mark used for the unrealized P&L.
    pub current_price: Decimal,
    /// Mark-to-market P&L of the open quantity.
    pub unrealized_pnl: Decimal,
    /// Margin this position consumes at the current mark.
    pub margin_required: Decimal,
    /// Contract multiplier the ledger books it with (100 for an option, 50
    /// for ES), so readers value its notional without guessing the asset
    /// class from the symbol. Absent in states written before it was
    /// recorded: readers fall back to their symbol table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<Decimal>,
}

/// One working order inside an [`AccountState`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOrder {
    /// The working order.
    pub order_id: String,
    /// Symbol.
    pub instrument: String,
    /// BUY or SELL.
    pub side: Side,
    /// Remaining (unfilled) quantity.
    pub quantity: Decimal,
    /// MARKET, LIMIT or STOP.
    pub order_type: OrderType,
    /// Limit / trigger / reference price, if any.
    #[serde(default)]
    pub price: Option<Decimal>,
}

/// Key of an account's latest [`AccountState`] in the `account_state` KV
/// bucket: the account id encoded like a strategy key
/// ([`crate::strategy::StrategyConfig::kv_key`]: letters, digits, `_`, `-`
/// pass through, every other byte becomes `=XX`), so `IBKR_Main` stays as is.
pub fn account_state_key(account: &str) -> String {
    crate::strategy::StrategyConfig::kv_key(account)
}

/// A point-in-time account snapshot (`account_state`).
///
/// Invariants: `equity = cash_balance + unrealized_pnl`,
/// `margin_available = equity - margin_used`, and the values of
/// `deployed_capital` sum to `margin_used`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    /// Account name.
    pub account: String,
    /// When the snapshot was taken.
    pub timestamp: DateTime<Utc>,
    /// Cash plus unrealized P&L.
    pub equity: Decimal,
    /// Initial balance + realized P&L - commissions (margin-account model).
    pub cash_balance: Decimal,
    /// Sum of open positions' margin.
    pub margin_used: Decimal,
    /// Equity minus margin used (negative means a margin deficit).
    pub margin_available: Decimal,
    /// Sum of open positions' unrealized P&L.
    pub unrealized_pnl: Decimal,
    /// Cumulative realized P&L, gross of commissions.
    pub realized_pnl: Decimal,
    /// Cumulative commissions paid.
    #[serde(default)]
    pub commissions: Decimal,
    /// Open positions.
    pub open_positions: Vec<OpenPosition>,
    /// Working orders.
    pub open_orders: Vec<OpenOrder>,
    /// Capital deployed per strategy (margin of its open positions).
    #[serde(default)]
    pub deployed_capital: BTreeMap<String, Decimal>,
    /// Today's P&L per strategy: realized P&L of the strategy's executions
    /// whose timestamp falls on the snapshot's UTC day (`timestamp`), net of
    /// their commissions, plus the current unrealized P&L of its open
    /// positions. Strategies with neither an execution today nor an open
    /// position are absent (zero). Cerebro stops entries once a strategy's
    /// value is at or below `−risk_limits.max_daily_loss`.
    #[serde(default)]
    pub strategy_pnl_today: BTreeMap<String, Decimal>,
    /// The highest `EXECUTIONS` stream sequence the accounts stage had
    /// processed when it took this snapshot: every execution at or below it
    /// (of any account) is booked in the state, or was refused. Cerebro
    /// releases a filled order's margin reservation as soon as this passes
    /// the order's last execution — proof that `margin_used` now holds it.
    /// Absent before the first execution, and from producers that do not
    /// track it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executions_seq: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn sample_order() -> Order {
        Order {
            order_id: "ord_1".into(),
            signal_id: "sig_1".into(),
            strategy_id: "SPX_1-D_Opt".into(),
            account: "IBKR_Main".into(),
            timestamp: Utc.with_ymd_and_hms(2025, 1, 2, 15, 0, 0).unwrap(),
            instrument: "GC".into(),
            instrument_type: InstrumentType::Future,
            direction: Direction::Long,
            action: SignalAction::Entry,
            side: Side::Buy,
            order_type: OrderType::Market,
            price: Some(d("4029.00")),
            stop_price: None,
            quantity: d("5"),
            stop_loss: Some(d("4000")),
            take_profit: None,
            expiry: None,
            cerebro_decision: Some(CerebroDecision {
                allocated_capital: d("100000"),
                margin_required: d("82500"),
                position_size_logic: "ratio".into(),
                risk_metrics: serde_json::json!({"cvar": "0.01"}),
            }),
            status: OrderStatus::Pending,
            parent_order_id: None,
            leg: 0,
            multiplier: d("100"),
        }
    }

    #[test]
    fn order_round_trips_with_decimal_strings_and_seed_enums() {
        let o = sample_order();
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["price"], "4029.00");
        assert_eq!(v["quantity"], "5");
        assert_eq!(v["status"], "PENDING");
        assert_eq!(v["action"], "ENTRY");
        assert_eq!(v["order_type"], "MARKET");
        assert_eq!(v["cerebro_decision"]["margin_required"], "82500");
        let back: Order = serde_json::from_value(v).unwrap();
        assert_eq!(back, o);
    }

    #[test]
    fn pending_is_a_plain_market_entry_buy_and_takes_overrides() {
        let t = Utc.with_ymd_and_hms(2025, 1, 2, 15, 0, 0).unwrap();
        let o = Order::pending(
            "ord_1",
            "sig_1",
            "SPX_1-D_Opt",
            "IBKR_Main",
            "GC",
            d("5"),
            t,
        );
        assert_eq!(
            (o.action, o.side, o.order_type, o.status),
            (
                SignalAction::Entry,
                Side::Buy,
                OrderType::Market,
                OrderStatus::Pending
            )
        );
        assert_eq!(o.direction, o.position_direction());
        assert_eq!(o.instrument_type, InstrumentType::Stock);
        assert_eq!((o.leg, o.multiplier), (0, Decimal::ONE));
        assert!(o.price.is_none() && o.stop_price.is_none() && o.expiry.is_none());
        assert!(o.stop_loss.is_none() && o.take_profit.is_none());
        assert!(o.cerebro_decision.is_none() && o.parent_order_id.is_none());
        let full = sample_order();
        let updated = Order {
            instrument_type: InstrumentType::Future,
            price: full.price,
            stop_loss: full.stop_loss,
            cerebro_decision: full.cerebro_decision.clone(),
            multiplier: full.multiplier,
            ..o
        };
        assert_eq!(updated, full);
    }

    #[test]
    fn order_defaults_for_optional_fields() {
        let mut v = serde_json::to_value(sample_order()).unwrap();
        let m = v.as_object_mut().unwrap();
        for k in [
            "multiplier",
            "leg",
            "stop_price",
            "stop_loss",
            "expiry",
            "parent_order_id",
        ] {
            m.remove(k);
        }
        let o: Order = serde_json::from_value(v).unwrap();
        assert_eq!(o.multiplier, Decimal::ONE);
        assert_eq!(o.leg, 0);
        assert_eq!(o.stop_loss, None);
    }

    #[test]
    fn numbers_are_accepted_on_input() {
        let json = r#"{"order_id":"o","account":"A","status":"FILLED","filled_quantity":3,
            "avg_fill_price":1.5,"timestamp":"2025-01-02T15:00:00Z","seq":2}"#;
        let e: OrderEvent = serde_json::from_str(json).unwrap();
        assert_eq!(e.filled_quantity, d("3"));
        assert_eq!(e.avg_fill_price, Some(d("1.5")));
        assert_eq!(e.previous_status, None);
    }

    fn ev(order: &str, seq: u64, status: OrderStatus) -> OrderEvent {
        OrderEvent {
            order_id: order.into(),
            account: "A".into(),
            status,
            previous_status: None,
            filled_quantity: Decimal::ZERO,
            avg_fill_price: None,
            reason: None,
            timestamp: "2025-01-02T15:00:00Z".parse().unwrap(),
            seq,
        }
    }

    #[test]
    fn order_events_messages_carry_one_event_or_a_list_of_one_order() {
        let one = ev("o", 4, OrderStatus::Cancelled);
        let bytes = serde_json::to_vec(&one).unwrap();
        assert_eq!(decode_order_events(&bytes).unwrap(), vec![one.clone()]);
        let list = vec![
            ev("o", 1, OrderStatus::Submitted),
            ev("o", 2, OrderStatus::Accepted),
            ev("o", 3, OrderStatus::Filled),
        ];
        let mut bytes = b" \n".to_vec();
        bytes.extend(serde_json::to_vec(&list).unwrap());
        assert_eq!(decode_order_events(&bytes).unwrap(), list);

        let bad = |events: Vec<OrderEvent>| {
            decode_order_events(&serde_json::to_vec(&events).unwrap()).unwrap_err()
        };
        assert!(matches!(bad(vec![]), OrderEventsError::Empty));
        let mixed = bad(vec![
            ev("o", 1, OrderStatus::Submitted),
            ev("p", 2, OrderStatus::Accepted),
        ]);
        assert!(
            matches!(mixed, OrderEventsError::MixedOrders { .. }),
            "{mixed}"
        );
        let mut other_account = ev("o", 2, OrderStatus::Accepted);
        other_account.account = "B".into();
        let mixed = bad(vec![ev("o", 1, OrderStatus::Submitted), other_account]);
        assert!(
            matches!(mixed, OrderEventsError::MixedOrders { .. }),
            "{mixed}"
        );
        for seqs in [[2, 1], [2, 2]] {
            let e = bad(vec![
                ev("o", seqs[0], OrderStatus::Submitted),
                ev("o", seqs[1], OrderStatus::Accepted),
            ]);
            assert!(matches!(e, OrderEventsError::OutOfSequence { .. }), "{e}");
        }
        for junk in [
            &b"[1]"[..],
            b"{}",
            b"not json",
            b"[{\"order_id\":\"o\"}]",
            b"",
        ] {
            assert!(matches!(
                decode_order_events(junk),
                Err(OrderEventsError::Json(_))
            ));
        }
    }

    #[test]
    fn account_state_keys_are_valid_kv_keys() {
        assert_eq!(account_state_key("IBKR_Main"), "IBKR_Main");
        assert_eq!(account_state_key("My Acct.1"), "My=20Acct=2E1");
        assert_ne!(account_state_key("a.b"), account_state_key("a=2Eb"));
    }

    #[test]
    fn direction_side_helpers_are_inverse() {
        for a in SignalAction::ALL {
            for s in Side::ALL {
                assert_eq!(order_side(*a, position_direction(*a, *s)), *s);
            }
        }
        assert_eq!(
            position_direction(SignalAction::Exit, Side::Sell),
            Direction::Long
        );
        assert_eq!(opposite_side(Side::Buy), Side::Sell);
    }

    #[test]
    fn account_state_serializes_seed_fields() {
        let s = AccountState {
            account: "IBKR_Main".into(),
            timestamp: Utc.with_ymd_and_hms(2025, 1, 2, 15, 0, 0).unwrap(),
            equity: d("100010"),
            cash_balance: d("100000"),
            margin_used: d("375"),
            margin_available: d("99635"),
            unrealized_pnl: d("10"),
            realized_pnl: d("0"),
            commissions: d("0"),
            open_positions: vec![OpenPosition {
                strategy_id: "s".into(),
                instrument: "AAPL".into(),
                direction: Direction::Long,
                quantity: d("10"),
                entry_price: d("150"),
                current_price: d("151"),
                unrealized_pnl: d("10"),
                margin_required: d("375"),
                multiplier: None,
            }],
            open_orders: vec![],
            deployed_capital: [("s".to_string(), d("375"))].into_iter().collect(),
            strategy_pnl_today: [("s".to_string(), d("9"))].into_iter().collect(),
            executions_seq: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        for k in [
            "account",
            "timestamp",
            "equity",
            "cash_balance",
            "margin_used",
            "margin_available",
            "unrealized_pnl",
            "realized_pnl",
            "open_positions",
            "open_orders",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["open_positions"][0]["entry_price"], "150");
        assert_eq!(v["deployed_capital"]["s"], "375");
        assert_eq!(v["strategy_pnl_today"]["s"], "9");
        let back: AccountState = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, s);
        // States written before the field existed still read (as empty).
        let mut old = v;
        old.as_object_mut().unwrap().remove("strategy_pnl_today");
        let back: AccountState = serde_json::from_value(old).unwrap();
        assert!(back.strategy_pnl_today.is_empty());
    }
}
