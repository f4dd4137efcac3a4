//! The accounts stage's whole state as pure data: [`Book`].
//!
//! A book is a [`Ledger`] plus order-independent marks and the set of known
//! accounts. Every input the accounts worker consumes goes through
//! [`Book::apply`] — the live loops and the replay at start-up alike — so the
//! same messages give the same state.
//!
//! # Marks
//!
//! The ledger's own mark is "the latest applied" (a fill price or a market
//! price), which depends on the order in which the stage's separate consumers
//! happen to deliver. The book keeps instead, per instrument, the market
//! price with the greatest `(timestamp, price)`, and — only for instruments
//! no market price has been seen for — the booked fill with the greatest
//! `(timestamp, price)`; it pins the ledger's mark to that after every input.
//! Market prices come first because a fill price is not a market observation
//! (a resting LIMIT fills at its limit when the market trades through it).
//! Both are maxima over sets, so they do not depend on arrival order: a
//! replay that reads the executions stream first and every retained price
//! after (the last price of a symbol is not enough: it may be a late tick or
//! one refused) gets the live marks exactly.
//!
//! # Accounts
//!
//! Known accounts are the configured ones (`accounts.initial_balances`) plus
//! every account seen on an execution, an order or an order event.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use mtx_schemas::market::MarketPrice;
use mtx_schemas::order::{AccountState, ExecutionConfirmation, Order, OrderEvent};
use rust_decimal::Decimal;

use crate::ledger::{Applied, Ledger, LedgerConfig, LedgerError};

/// One price observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mark {
    /// When it was observed (compared first).
    pub at: DateTime<Utc>,
    /// The price (breaks ties between equal timestamps).
    pub price: Decimal,
}

/// One message the accounts stage consumes, decoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// From `executions.<account>`.
    Execution(ExecutionConfirmation),
    /// From `market.prices.<symbol>`.
    Price(MarketPrice),
    /// From `orders.<account>.new`.
    Order(Order),
    /// From `orders.<account>.events`: the events of one order one message
    /// carries (one, or several a venue step made), in `seq` order.
    OrderEvents(Vec<OrderEvent>),
}

/// What [`Book::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Effect {
    /// Accounts whose state changed.
    pub changed: BTreeSet<String>,
    /// The input was already applied (a redelivery or replayed copy).
    pub duplicate: bool,
}

/// The observations behind one instrument's mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Marks {
    market: Option<Mark>,
    fill: Option<Mark>,
}

impl Marks {
    fn effective(&self) -> Option<Mark> {
        self.market.or(self.fill)
    }
}

/// Positions, cash, marks and working orders of every account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Book {
    ledger: Ledger,
    marks: BTreeMap<String, Marks>,
    accounts: BTreeSet<String>,
    /// Highest `EXECUTIONS` stream sequence processed ([`Book::processed_execution`]).
    executions_seq: Option<u64>,
}

impl Book {
    /// An empty book; the configured accounts are known from the start.
    pub fn new(config: LedgerConfig) -> Self {
        let accounts = config.initial_balances.keys().cloned().collect();
        Book {
            ledger: Ledger::new(config),
            marks: BTreeMap::new(),
            accounts,
            executions_seq: None,
        }
    }

    /// Record that the execution at stream sequence `seq` was processed
    /// (booked, a duplicate, or refused). Executions are processed in stream
    /// order and never retried one by one (a failed batch rebuilds the
    /// book), so every execution at or below the highest such sequence is
    /// in the book: snapshots carry it as [`AccountState::executions_seq`].
    pub fn processed_execution(&mut self, seq: u64) {
        if seq > 0 && self.executions_seq.is_none_or(|s| seq > s) {
            self.executions_seq = Some(seq);
        }
    }

    /// The ledger inside.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Known accounts, sorted.
    pub fn accounts(&self) -> impl Iterator<Item = &str> + '_ {
        self.accounts.iter().map(String::as_str)
    }

    /// The mark in force for `instrument`.
    pub fn mark_of(&self, instrument: &str) -> Option<Mark> {
        self.marks.get(instrument).and_then(Marks::effective)
    }

    /// Record a market price (`market`) or a fill; true if the mark in force
    /// changed.
    fn observe(&mut self, instrument: &str, m: Mark, market: bool) -> bool {
        if !self.marks.contains_key(instrument) {
            self.marks.insert(instrument.to_string(), Marks::default());
        }
        let Some(entry) = self.marks.get_mut(instrument) else {
            return false;
        };
        let before = entry.effective();
        let slot = if market {
            &mut entry.market
        } else {
            &mut entry.fill
        };
        if slot.is_none_or(|old| m > old) {
            *slot = Some(m);
        }
        let after = entry.effective();
        // Pin the ledger to the book's mark (a fill moves the ledger's own).
        if let Some(cur) = after {
            self.ledger.mark(instrument, cur.price);
        }
        after != before
    }

    fn know(&mut self, account: &str, effect: &mut Effect) {
        if self.accounts.insert(account.to_string()) {
            effect.changed.insert(account.to_string());
        }
    }

    /// Apply one input. On error nothing changes (the worker dead-letters the
    /// message, and a replay skips it the same way).
    pub fn apply(&mut self, input: &Input) -> Result<Effect, LedgerError> {
        let mut effect = Effect::default();
        match input {
            Input::Execution(x) => match self.ledger.apply(x)? {
                Applied::Booked { .. } => {
                    self.observe(
                        &x.instrument,
                        Mark {
                            at: x.timestamp,
                            price: x.price,
                        },
                        false,
                    );
                    if !self.accounts.contains(&x.account) {
                        self.accounts.insert(x.account.clone());
                    }
                    effect.changed.insert(x.account.clone());
                }
                Applied::Rejected => self.know(&x.account, &mut effect),
                Applied::Duplicate => effect.duplicate = true,
            },
            Input::Price(p) => {
                if p.price > Decimal::ZERO
                    && self.observe(
                        &p.symbol,
                        Mark {
                            at: p.timestamp,
                            price: p.price,
                        },
                        true,
                    )
                {
                    // Holders are known accounts (they booked a fill).
                    effect
                        .changed
                        .extend(self.ledger.holders(&p.symbol).map(str::to_string));
                } else {
                    effect.duplicate = true;
                }
            }
            Input::Order(o) => {
                if self.ledger.track_order(o) {
                    self.accounts.insert(o.account.clone());
                    effect.changed.insert(o.account.clone());
                } else {
                    // A copy, or an order already finished: only its account
                    // may be news.
                    self.know(&o.account, &mut effect);
                    effect.duplicate = effect.changed.is_empty();
                }
            }
            Input::OrderEvents(events) => {
                // Each event applies on its own (by seq): a copy of the
                // message, or an overlap with one applied earlier, changes
                // nothing twice.
                let mut applied = false;
                for e in events {
                    if self.ledger.apply_order_event(e) {
                        applied = true;
                        self.accounts.insert(e.account.clone());
                        effect.changed.insert(e.account.clone());
                    }
                }
                effect.duplicate = !applied;
            }
        }
        Ok(effect)
    }

    /// The account's state at `now`.
    pub fn snapshot(&self, account: &str, now: DateTime<Utc>) -> AccountState {
        let mut state = self.ledger.snapshot(account, now);
        state.executions_seq = self.executions_seq;
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use mtx_schemas::order::position_direction;
    use mtx_schemas::{ExecutionStatus, InstrumentType, Side, SignalAction};
    use proptest::prelude::*;
    use rust_decimal_macros::dec;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 3, 14, 30, 0).unwrap() + chrono::Duration::seconds(s)
    }

    fn fill(id: &str, action: SignalAction, qty: Decimal, px: Decimal, at: i64) -> Input {
        let side = match action {
            SignalAction::Entry => Side::Buy,
            SignalAction::Exit => Side::Sell,
        };
        Input::Execution(ExecutionConfirmation {
            execution_id: id.into(),
            order_id: format!("ord_{id}"),
            account: "A".into(),
            strategy_id: "s".into(),
            instrument: "AAPL".into(),
            instrument_type: InstrumentType::Stock,
            direction: position_direction(action, side),
            action,
            side,
            quantity: qty,
            price: px,
            commission: dec!(1),
            multiplier: Decimal::ONE,
            status: ExecutionStatus::Filled,
            broker_response: serde_json::Value::Null,
            timestamp: t(at),
        })
    }

    #[test]
    fn snapshots_carry_the_highest_execution_sequence_processed() {
        let mut b = Book::new(LedgerConfig::default());
        assert_eq!(b.snapshot("A", t(0)).executions_seq, None);
        b.apply(&fill("x1", SignalAction::Entry, dec!(10), dec!(100), 1))
            .unwrap();
        b.processed_execution(7);
        assert_eq!(b.snapshot("A", t(1)).executions_seq, Some(7));
        // A redelivered (lower) sequence never moves it back.
        b.processed_execution(3);
        assert_eq!(b.snapshot("A", t(2)).executions_seq, Some(7));
        b.processed_execution(9);
        assert_eq!(b.snapshot("B", t(2)).executions_seq, Some(9));
    }

    fn price(px: Decimal, at: i64) -> Input {
        Input::Price(MarketPrice {
            symbol: "AAPL".into(),
            price: px,
            timestamp: t(at),
            source: None,
        })
    }

    fn config() -> LedgerConfig {
        LedgerConfig {
            initial_balances: [("A".to_string(), dec!(10000))].into(),
            ..LedgerConfig::default()
        }
    }

    #[test]
    fn market_prices_beat_fills_and_the_latest_wins_whatever_the_order() {
        let inputs = [
            fill("x1", SignalAction::Entry, dec!(10), dec!(100), 1),
            price(dec!(104), 5),
            price(dec!(103), 3),
            fill("x2", SignalAction::Entry, dec!(5), dec!(102), 4),
        ];
        let mut a = Book::new(config());
        for i in &inputs {
            a.apply(i).unwrap();
        }
        let mut b = Book::new(config());
        for i in inputs.iter().rev() {
            b.apply(i).unwrap();
        }
        assert_eq!(a.mark_of("AAPL").unwrap().price, dec!(104));
        let (sa, sb) = (a.snapshot("A", t(9)), b.snapshot("A", t(9)));
        assert_eq!(sa, sb);
        // 10 @ 100 + 5 @ 102, mark 104: (104*15 - 1510) = 50
        assert_eq!(sa.unrealized_pnl, dec!(50));
        assert_eq!(sa.cash_balance, dec!(9998));
        // A later fill does not override the market: a rested limit fills at
        // its limit while the market trades through it.
        a.apply(&fill("x3", SignalAction::Entry, dec!(1), dec!(110), 9))
            .unwrap();
        assert_eq!(a.mark_of("AAPL").unwrap().price, dec!(104));
        // Without any market price, the latest fill is the mark.
        let mut c = Book::new(config());
        c.apply(&fill("x1", SignalAction::Entry, dec!(10), dec!(100), 1))
            .unwrap();
        c.apply(&fill("x2", SignalAction::Entry, dec!(5), dec!(102), 4))
            .unwrap();
        assert_eq!(c.mark_of("AAPL").unwrap().price, dec!(102));
    }

    #[test]
    fn effects_name_changed_accounts_and_duplicates() {
        let mut b = Book::new(config());
        assert_eq!(b.accounts().collect::<Vec<_>>(), ["A"]);
        let e = b.apply(&price(dec!(100), 1)).unwrap();
        assert!(e.changed.is_empty(), "nobody holds AAPL yet");
        let e = b
            .apply(&fill("x1", SignalAction::Entry, dec!(1), dec!(100), 2))
            .unwrap();
        assert_eq!(e.changed, ["A".to_string()].into());
        assert!(
            b.apply(&fill("x1", SignalAction::Entry, dec!(1), dec!(100), 2))
                .unwrap()
                .duplicate
        );
        let e = b.apply(&price(dec!(101), 3)).unwrap();
        assert_eq!(e.changed, ["A".to_string()].into());
        assert!(
            b.apply(&price(dec!(99), 0)).unwrap().duplicate,
            "older price"
        );
    }

    fn events(id: &str, seqs: &[(u64, mtx_schemas::OrderStatus)]) -> Input {
        Input::OrderEvents(
            seqs.iter()
                .map(|(seq, status)| OrderEvent {
                    order_id: id.into(),
                    account: "A".into(),
                    status: *status,
                    previous_status: None,
                    filled_quantity: Decimal::ZERO,
                    avg_fill_price: None,
                    reason: None,
                    timestamp: t(*seq as i64),
                    seq: *seq,
                })
                .collect(),
        )
    }

    #[test]
    fn a_message_of_several_events_applies_each_once() {
        use mtx_schemas::OrderStatus::{Accepted, Filled, Submitted};
        let mut b = Book::new(config());
        let order = Input::Order(Order::pending("o1", "sig", "s", "A", "AAPL", dec!(5), t(0)));
        b.apply(&order).unwrap();
        let step = events("o1", &[(1, Submitted), (2, Accepted)]);
        let e = b.apply(&step).unwrap();
        assert_eq!((e.changed, e.duplicate), (["A".to_string()].into(), false));
        assert_eq!(b.snapshot("A", t(3)).open_orders.len(), 1);
        // The same message again (redelivered, or re-published beyond the
        // duplicate window) changes nothing.
        let again = b.apply(&step).unwrap();
        assert!(again.duplicate && again.changed.is_empty());
        // A message overlapping what is known applies what is new: here its
        // last event, which ends the order.
        let e = b
            .apply(&events("o1", &[(2, Accepted), (3, Filled)]))
            .unwrap();
        assert!(!e.duplicate);
        assert!(b.snapshot("A", t(4)).open_orders.is_empty());
    }

    proptest! {
        /// Any interleaving of the same executions (in their stream order)
        /// and prices gives the same snapshot.
        #[test]
        fn interleaving_does_not_matter(
            prices in proptest::collection::vec((90u32..110, 0i64..20), 0..8),
            splits in proptest::collection::vec(any::<bool>(), 0..16),
        ) {
            let execs = [
                fill("x1", SignalAction::Entry, dec!(10), dec!(100), 2),
                fill("x2", SignalAction::Entry, dec!(5), dec!(104), 6),
                fill("x3", SignalAction::Exit, dec!(8), dec!(107), 11),
            ];
            let marks: Vec<Input> = prices.iter().map(|(p, at)| price(Decimal::from(*p), *at)).collect();
            let mut live = Book::new(config());
            let (mut xi, mut mi) = (0, 0);
            for take_exec in splits.iter().copied().chain(std::iter::repeat_n(true, 8)) {
                if take_exec && xi < execs.len() {
                    live.apply(&execs[xi]).unwrap();
                    xi += 1;
                } else if mi < marks.len() {
                    live.apply(&marks[mi]).unwrap();
                    mi += 1;
                }
            }
            for m in &marks[mi..] { live.apply(m).unwrap(); }
            for x in &execs[xi..] { live.apply(x).unwrap(); }
            let mut replay = Book::new(config());
            for x in &execs { replay.apply(x).unwrap(); }
            for m in &marks { replay.apply(m).unwrap(); }
            prop_assert_eq!(live.snapshot("A", t(30)), replay.snapshot("A", t(30)));
        }
    }
}
