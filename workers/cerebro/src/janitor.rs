//! When the worker's per-entry KV keys (`entries.<signal_id>`,
//! `exits.<entry_signal_id>` in the `account_state` bucket) are settled and
//! deleted.
//!
//! An entry record is what later EXIT / CANCEL signals of that entry resolve
//! against, so it cannot go the moment the entry fills: an exit may come
//! weeks later, and a *second* exit of a fully closed entry (or an exit of a
//! REJECTED one) must still find "nothing left to close" instead of closing
//! the strategy's other positions. So:
//!
//! - a **finished** entry — no longer reserved and every leg closed by
//!   approved exits (`Σ exit quantity ≥ ordered`, or ≥ filled for a leg
//!   whose short end the record notes) — is **settled**
//!   `entry_done_retention` after its keys last changed (default one day):
//!   its exits are folded into the record's legs (`closed_quantity`,
//!   `sender_quantity_exited`, `settled: true`) with a compare-and-set, and
//!   its `exits.*` key is deleted. The record stays, one key per entry;
//! - **any** entry — settled, REJECTED, open — is deleted `entry_max_age`
//!   after its keys last changed (default 30 days). An exit of an entry
//!   deleted this way waits `entry_wait` for the record, then closes against
//!   the strategy's position in the instrument (the unlinked path).
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

use crate::inputs::EntryLeg;
use crate::worker::{ExitProgress, StoredEntry};

/// What to do with one entry's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Keep them.
    Keep,
    /// Fold the exits into the record and delete the exits key.
    Settle,
    /// Delete them (older than `entry_max_age`).
    Purge,
}

/// Retention rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Retention of a finished entry.
    pub done: Duration,
    /// Retention of any entry.
    pub max_age: Duration,
}

/// Quantity and sender quantity the exits closed of `leg` (its instrument
/// and direction): what a settled record folded in plus `exits`.
pub fn closed_of(
    entry: &StoredEntry,
    leg: &EntryLeg,
    exits: Option<&ExitProgress>,
) -> (Decimal, Decimal) {
    exits
        .map(|x| {
            x.exits
                .iter()
                .filter(|(k, _)| !entry.folded_exits.contains(k))
                .flat_map(|(_, v)| v.iter())
                .filter(|t| t.instrument == leg.instrument && t.direction == leg.direction)
                .fold((Decimal::ZERO, Decimal::ZERO), |(q, s), t| {
                    (q + t.closed(None), s + t.sender_quantity)
                })
        })
        .map_or(
            (leg.closed_quantity, leg.sender_quantity_exited),
            |(q, s)| (leg.closed_quantity + q, leg.sender_quantity_exited + s),
        )
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
        // A leg whose end the record notes (it filled less than ordered)
        // is done once what it filled is closed.
        let opened = if l.status.is_terminal() {
            l.filled_quantity
        } else {
            l.ordered_quantity
        };
        closed_of(entry, l, exits).0 >= opened
    })
}

/// The record of a finished entry with `exits` folded in (see the module
/// docs).
pub fn settle(entry: &StoredEntry, exits: Option<&ExitProgress>) -> StoredEntry {
    let mut out = entry.clone();
    for l in &mut out.legs {
        (l.closed_quantity, l.sender_quantity_exited) = closed_of(entry, l, exits);
    }
    out.settled = true;
    if let Some(x) = exits {
        out.folded_exits.extend(
            x.exits
                .keys()
                .filter(|k| !entry.folded_exits.contains(k))
                .cloned(),
        );
    }
    out
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
    let opened = entry.decision != Decision::Rejected && !entry.legs.is_empty();
    if idle >= r.max_age {
        Disposition::Purge
    } else if idle >= r.done && opened && !entry.settled && finished(entry, exits, reserved) {
        Disposition::Settle
    } else {
        Disposition::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            settled: false,
            folded_exits: vec![],
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
                            order_id: None,
                            filled: None,
                        }],
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn finished_entries_settle_after_retention_all_go_after_max_age() {
        let t = Utc.with_ymd_and_hms(2026, 1, 5, 0, 0, 0).unwrap();
        let r = Retention {
            done: Duration::days(1),
            max_age: Duration::days(30),
        };
        let at = |d: i64| t + Duration::days(d);
        // A REJECTED entry's record says "not opened": kept until max age.
        let rejected = entry(Decision::Rejected, Decimal::ZERO);
        assert_eq!(
            entry_disposition(&rejected, None, false, t, at(2), r),
            Disposition::Keep
        );
        assert_eq!(
            entry_disposition(&rejected, None, false, t, at(30), r),
            Disposition::Purge
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
            Disposition::Purge
        );
        // Fully exited (a ladder of two): finished unless still reserved.
        let all = exits(&[dec!(10), dec!(7)]);
        assert!(finished(&open, Some(&all), false));
        assert!(!finished(&open, Some(&all), true));
        assert_eq!(
            entry_disposition(&open, Some(&all), false, t, at(2), r),
            Disposition::Settle
        );
        assert_eq!(
            entry_disposition(&open, None, false, t, at(2), r),
            Disposition::Keep
        );
        // Settled: the exits are in the record, which stays finished
        // without its exits key, and is kept until max age.
        let settled = settle(&open, Some(&all));
        assert!(settled.settled);
        assert_eq!(settled.legs[0].closed_quantity, dec!(17));
        assert_eq!(settled.legs[0].sender_quantity_exited, dec!(10));
        assert!(finished(&settled, None, false));
        // An exits key that outlived the settlement: its folded exits count
        // once, a new one on top.
        let mut later = exits(&[dec!(10), dec!(7)]);
        later.exits.insert(
            "x9".into(),
            vec![ExitTake {
                instrument: "AAPL".into(),
                direction: Direction::Long,
                quantity: dec!(1),
                sender_quantity: dec!(1),
                order_id: None,
                filled: None,
            }],
        );
        assert_eq!(settled.folded_exits, ["x0", "x1"]);
        assert_eq!(
            closed_of(&settled, &settled.legs[0], Some(&later)).0,
            dec!(18)
        );
        assert_eq!(
            entry_disposition(&settled, None, false, t, at(2), r),
            Disposition::Keep
        );
        assert_eq!(
            entry_disposition(&settled, None, false, t, at(30), r),
            Disposition::Purge
        );
    }
}
