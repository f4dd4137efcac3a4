//! When the worker's per-entry KV keys (`entries.<signal_id>`,
//! `exits.<entry_signal_id>` in the `account_state` bucket) are deleted.
//!
//! An entry record is what later EXIT / CANCEL signals of that entry resolve
//! against, so it cannot go the moment the entry fills: an exit may come
//! weeks later, and a *second* exit of a fully closed entry must still find
//! "nothing left to close" instead of closing the strategy's other
//! positions. So:
//!
//! - a **finished** entry — REJECTED (nothing opened), or no longer reserved
//!   and every leg closed by approved exits (`Σ exit quantity ≥ ordered`, or
//!   ≥ filled for a leg whose short end the record notes) —
//!   is deleted `entry_done_retention` after its keys last changed (default
//!   one day);
//! - **any** entry, finished or not, is deleted `entry_max_age` after its keys
//!   last changed (default 30 days). An exit of an entry deleted this way
//!   waits `entry_wait` for the record, then closes against the strategy's
//!   position in the instrument (the unlinked path).
//! - an `exits.*` key whose entry key is gone is deleted after
//!   `entry_done_retention`.
//!
//! Deletion is a KV purge that expects the revision the janitor read, so a
//! key rewritten meanwhile (a new exit) is kept; when the bucket allows
//! per-message TTLs the purge marker itself expires, otherwise one small
//! marker per deleted key stays in the bucket's stream.

use chrono::{DateTime, Duration, Utc};
use mtx_schemas::Decision;
use rust_decimal::Decimal;

use crate::worker::{ExitProgress, StoredEntry};

/// Why a key is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purge {
    /// The entry is finished and its retention passed.
    Done,
    /// The key is older than `entry_max_age`.
    MaxAge,
}

/// What to do with one entry's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Keep them.
    Keep,
    /// Delete them.
    Purge(Purge),
}

/// Retention rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Retention of a finished entry.
    pub done: Duration,
    /// Retention of any entry.
    pub max_age: Duration,
}

/// Whether the entry opened nothing more that exits still have to close.
pub fn finished(entry: &StoredEntry, exits: Option<&ExitProgress>, reserved: bool) -> bool {
    if entry.decision == Decision::Rejected || entry.legs.is_empty() {
        return true;
    }
    if reserved {
        return false;
    }
    entry.legs.iter().all(|l| {
        let closed: Decimal = exits
            .map(|x| {
                x.exits
                    .values()
                    .flatten()
                    .filter(|t| t.instrument == l.instrument && t.direction == l.direction)
                    .map(|t| t.quantity)
                    .sum()
            })
            .unwrap_or_default();
        // A leg whose end the record notes (it filled less than ordered)
        // is done once what it filled is closed.
        let opened = if l.status.is_terminal() {
            l.filled_quantity
        } else {
            l.ordered_quantity
        };
        closed >= opened
    })
}

/// What to do with an entry's keys last changed at `last_change`.
pub fn entry_disposition(
    entry: &StoredEntry,
    exits: Option<&ExitProgress>,
    reserved: bool,
    last_change: DateTime<Utc>,
    now: DateTime<Utc>,
    r: Retention,
) -> Disposition {
    let idle = now.signed_duration_since(last_change);
    if idle >= r.max_age {
        Disposition::Purge(Purge::MaxAge)
    } else if idle >= r.done && finished(entry, exits, reserved) {
        Disposition::Purge(Purge::Done)
    } else {
        Disposition::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inputs::EntryLeg;
    use crate::worker::ExitTake;
    use chrono::TimeZone;
    use mtx_schemas::{Direction, InstrumentType, OrderStatus};
    use rust_decimal_macros::dec;

    fn entry(decision: Decision, ordered: Decimal) -> StoredEntry {
        StoredEntry {
            strategy_id: "s".into(),
            account: "A".into(),
            decision,
            legs: if decision == Decision::Rejected {
                vec![]
            } else {
                vec![EntryLeg {
                    leg: 0,
                    order_id: "o".into(),
                    instrument: "AAPL".into(),
                    instrument_type: InstrumentType::Stock,
                    direction: Direction::Long,
                    sender_quantity: dec!(10),
                    ordered_quantity: ordered,
                    filled_quantity: Decimal::ZERO,
                    closed_quantity: Decimal::ZERO,
                    sender_quantity_exited: Decimal::ZERO,
                    status: OrderStatus::Pending,
                }]
            },
            book_revision: None,
            decided_at: None,
        }
    }

    fn exits(q: &[Decimal]) -> ExitProgress {
        ExitProgress {
            exits: q
                .iter()
                .enumerate()
                .map(|(i, q)| {
                    (
                        format!("x{i}"),
                        vec![ExitTake {
                            instrument: "AAPL".into(),
                            direction: Direction::Long,
                            quantity: *q,
                            sender_quantity: dec!(5),
                        }],
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn finished_entries_go_after_retention_others_after_max_age() {
        let t = Utc.with_ymd_and_hms(2026, 1, 5, 0, 0, 0).unwrap();
        let r = Retention {
            done: Duration::days(1),
            max_age: Duration::days(30),
        };
        let at = |d: i64| t + Duration::days(d);
        let rejected = entry(Decision::Rejected, Decimal::ZERO);
        assert_eq!(
            entry_disposition(&rejected, None, false, t, at(0), r),
            Disposition::Keep
        );
        assert_eq!(
            entry_disposition(&rejected, None, false, t, at(1), r),
            Disposition::Purge(Purge::Done)
        );
        let open = entry(Decision::Approved, dec!(17));
        // Partly exited: kept until max age.
        let part = exits(&[dec!(10)]);
        assert!(!finished(&open, Some(&part), false));
        assert_eq!(
            entry_disposition(&open, Some(&part), false, t, at(29), r),
            Disposition::Keep
        );
        assert_eq!(
            entry_disposition(&open, Some(&part), false, t, at(30), r),
            Disposition::Purge(Purge::MaxAge)
        );
        // Fully exited (a ladder of two): finished unless still reserved.
        let all = exits(&[dec!(10), dec!(7)]);
        assert!(finished(&open, Some(&all), false));
        assert!(!finished(&open, Some(&all), true));
        assert_eq!(
            entry_disposition(&open, Some(&all), false, t, at(2), r),
            Disposition::Purge(Purge::Done)
        );
        assert_eq!(
            entry_disposition(&open, None, false, t, at(2), r),
            Disposition::Keep
        );
    }
}
