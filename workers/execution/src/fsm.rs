//! The order state machine.
//!
//! States are [`OrderStatus`]; inputs are [`FsmEvent`]s. The whole policy lives
//! in one exhaustive table, [`transition`], which names every
//! (status, [`EventKind`]) pair explicitly (no wildcard arm can silently accept
//! or hide a pair). [`OrderFsm`] adds quantity bookkeeping on top: it applies a
//! table transition only after checking the fill quantity, and changes nothing
//! when it returns an error.
//!
//! Lifecycle:
//!
//! ```text
//! PENDING ──Submit──▶ SUBMITTED ──Accept──▶ ACCEPTED ──PartialFill──▶ PARTIALLY_FILLED ──Fill──▶ FILLED
//!    │                   │  (fills may arrive before the ack)             │
//!    │                   └──────────── CancelRequest ──▶ CANCEL_REQUESTED ◀┘
//!    │                                                    │  PartialFill: stays, fill applied
//!    │                                                    │  Fill: FILLED (the fill won the race)
//!    │                                                    │  CancelConfirm: CANCELLED
//!    │                                                    │  CancelReject: back to ACCEPTED / PARTIALLY_FILLED
//!    │                                                    │  Reject (nothing filled): REJECTED
//!    │  ACCEPTED ──Reject──▶ REJECTED (a broker's late reject; nothing filled)
//!    └── CancelRequest: CANCELLED (never sent) · Reject: REJECTED · Expire: EXPIRED
//! ```
//!
//! Race rules follow real venues: a fill that arrives while a cancel is pending
//! is applied; a cancel confirmation after the order filled completely is
//! invalid (the fill won); a fill after CANCELLED is invalid (the cancel won,
//! so the venue cannot fill). Terminal states (FILLED, CANCELLED, REJECTED,
//! EXPIRED) accept no event at all.

use std::fmt;

use mtx_schemas::OrderStatus;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The kind of an [`FsmEvent`], without payload: the column of the
/// transition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// The order was sent to the venue.
    Submit,
    /// The venue acknowledged the order.
    Accept,
    /// A fill that leaves part of the order working.
    PartialFill,
    /// The fill that completes the order.
    Fill,
    /// We asked the venue to cancel.
    CancelRequest,
    /// The venue cancelled the order (requested or unsolicited).
    CancelConfirm,
    /// The venue refused our cancel request (the order keeps working).
    CancelReject,
    /// The venue (or a pre-trade check) rejected the order.
    Reject,
    /// The order reached its expiry.
    Expire,
}

impl EventKind {
    /// Every kind, in table column order.
    pub const ALL: [EventKind; 9] = [
        EventKind::Submit,
        EventKind::Accept,
        EventKind::PartialFill,
        EventKind::Fill,
        EventKind::CancelRequest,
        EventKind::CancelConfirm,
        EventKind::CancelReject,
        EventKind::Reject,
        EventKind::Expire,
    ];

    /// Upper-case name for logs and error messages.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Submit => "SUBMIT",
            EventKind::Accept => "ACCEPT",
            EventKind::PartialFill => "PARTIAL_FILL",
            EventKind::Fill => "FILL",
            EventKind::CancelRequest => "CANCEL_REQUEST",
            EventKind::CancelConfirm => "CANCEL_CONFIRM",
            EventKind::CancelReject => "CANCEL_REJECT",
            EventKind::Reject => "REJECT",
            EventKind::Expire => "EXPIRE",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An input to the order state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsmEvent {
    /// The order was sent to the venue.
    Submit,
    /// The venue acknowledged the order.
    Accept,
    /// A fill of `qty` that leaves part of the order working.
    PartialFill {
        /// Quantity of this fill (positive).
        qty: Decimal,
    },
    /// A fill of `qty` that completes the order.
    Fill {
        /// Quantity of this fill (positive).
        qty: Decimal,
    },
    /// We asked the venue to cancel.
    CancelRequest,
    /// The venue cancelled the order.
    CancelConfirm,
    /// The venue refused the cancel request.
    CancelReject,
    /// The order was rejected.
    Reject,
    /// The order expired.
    Expire,
}

impl FsmEvent {
    /// The table column of this event.
    pub const fn kind(self) -> EventKind {
        match self {
            FsmEvent::Submit => EventKind::Submit,
            FsmEvent::Accept => EventKind::Accept,
            FsmEvent::PartialFill { .. } => EventKind::PartialFill,
            FsmEvent::Fill { .. } => EventKind::Fill,
            FsmEvent::CancelRequest => EventKind::CancelRequest,
            FsmEvent::CancelConfirm => EventKind::CancelConfirm,
            FsmEvent::CancelReject => EventKind::CancelReject,
            FsmEvent::Reject => EventKind::Reject,
            FsmEvent::Expire => EventKind::Expire,
        }
    }
}

/// A (status, event) pair the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid order transition: {event} in state {from}")]
pub struct InvalidTransition {
    /// Status the order was in.
    pub from: OrderStatus,
    /// The refused event.
    pub event: EventKind,
}

/// Why [`OrderFsm::apply`] refused an event. The machine is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsmError {
    /// The table does not allow this event in this state.
    #[error(transparent)]
    InvalidTransition(#[from] InvalidTransition),
    /// The fill would take the filled quantity above the order quantity.
    #[error("fill of {fill} overfills order: {filled} of {quantity} already filled")]
    Overfill {
        /// Order quantity.
        quantity: Decimal,
        /// Filled before this fill.
        filled: Decimal,
        /// The refused fill.
        fill: Decimal,
    },
    /// A PartialFill that would complete the order, or a Fill that would not.
    #[error("{event} of {fill} does not match the remaining quantity {remaining}")]
    FillMismatch {
        /// PartialFill or Fill.
        event: EventKind,
        /// The refused fill.
        fill: Decimal,
        /// Quantity still open before the fill.
        remaining: Decimal,
    },
    /// Fill quantities must be positive.
    #[error("fill quantity must be positive, got {0}")]
    NonPositiveFill(Decimal),
    /// Order quantities must be positive.
    #[error("order quantity must be positive, got {0}")]
    NonPositiveQuantity(Decimal),
}

/// The transition table: the status after `event` in status `from`.
///
/// `has_fills` only matters for CANCEL_REQUESTED + CancelReject, which returns
/// the order to PARTIALLY_FILLED if anything has filled and to ACCEPTED if not.
/// Fill quantities are checked by [`OrderFsm::apply`], not here.
pub fn transition(
    from: OrderStatus,
    event: EventKind,
    has_fills: bool,
) -> Result<OrderStatus, InvalidTransition> {
    use EventKind as E;
    use OrderStatus::{
        Accepted, CancelRequested, Cancelled, Expired, Filled, PartiallyFilled, Pending, Rejected,
        Submitted,
    };
    let invalid = Err(InvalidTransition { from, event });
    match (from, event) {
        // PENDING: not yet sent. Cancelling needs no venue round trip.
        (Pending, E::Submit) => Ok(Submitted),
        (Pending, E::Accept) => invalid,
        (Pending, E::PartialFill) => invalid,
        (Pending, E::Fill) => invalid,
        (Pending, E::CancelRequest) => Ok(Cancelled),
        (Pending, E::CancelConfirm) => invalid,
        (Pending, E::CancelReject) => invalid,
        (Pending, E::Reject) => Ok(Rejected),
        (Pending, E::Expire) => Ok(Expired),

        // SUBMITTED: sent, not yet acknowledged. Fills may outrun the ack;
        // a venue may cancel unsolicited.
        (Submitted, E::Submit) => invalid,
        (Submitted, E::Accept) => Ok(Accepted),
        (Submitted, E::PartialFill) => Ok(PartiallyFilled),
        (Submitted, E::Fill) => Ok(Filled),
        (Submitted, E::CancelRequest) => Ok(CancelRequested),
        (Submitted, E::CancelConfirm) => Ok(Cancelled),
        (Submitted, E::CancelReject) => invalid,
        (Submitted, E::Reject) => Ok(Rejected),
        (Submitted, E::Expire) => Ok(Expired),

        // ACCEPTED: working at the venue, nothing filled.
        (Accepted, E::Submit) => invalid,
        (Accepted, E::Accept) => invalid,
        (Accepted, E::PartialFill) => Ok(PartiallyFilled),
        (Accepted, E::Fill) => Ok(Filled),
        (Accepted, E::CancelRequest) => Ok(CancelRequested),
        (Accepted, E::CancelConfirm) => Ok(Cancelled),
        (Accepted, E::CancelReject) => invalid,
        // A broker may reject an order it acknowledged (a margin or risk
        // check at the exchange) while nothing has filled.
        (Accepted, E::Reject) => Ok(Rejected),
        (Accepted, E::Expire) => Ok(Expired),

        // PARTIALLY_FILLED: working, part filled. Cancel / expiry end the
        // remainder; the filled part stands.
        (PartiallyFilled, E::Submit) => invalid,
        (PartiallyFilled, E::Accept) => invalid,
        (PartiallyFilled, E::PartialFill) => Ok(PartiallyFilled),
        (PartiallyFilled, E::Fill) => Ok(Filled),
        (PartiallyFilled, E::CancelRequest) => Ok(CancelRequested),
        (PartiallyFilled, E::CancelConfirm) => Ok(Cancelled),
        (PartiallyFilled, E::CancelReject) => invalid,
        (PartiallyFilled, E::Reject) => invalid,
        (PartiallyFilled, E::Expire) => Ok(Expired),

        // CANCEL_REQUESTED: fills racing the cancel are applied; a late ack
        // changes nothing; the venue decides the race.
        (CancelRequested, E::Submit) => invalid,
        (CancelRequested, E::Accept) => Ok(CancelRequested),
        (CancelRequested, E::PartialFill) => Ok(CancelRequested),
        (CancelRequested, E::Fill) => Ok(Filled),
        (CancelRequested, E::CancelRequest) => invalid,
        (CancelRequested, E::CancelConfirm) => Ok(Cancelled),
        (CancelRequested, E::CancelReject) => {
            if has_fills {
                Ok(PartiallyFilled)
            } else {
                Ok(Accepted)
            }
        }
        // Rejected while our cancel was pending: terminal, if nothing filled
        // (a REJECTED order holds no fills).
        (CancelRequested, E::Reject) => {
            if has_fills {
                invalid
            } else {
                Ok(Rejected)
            }
        }
        (CancelRequested, E::Expire) => Ok(Expired),

        // Terminal states never change.
        (Filled, E::Submit) => invalid,
        (Filled, E::Accept) => invalid,
        (Filled, E::PartialFill) => invalid,
        (Filled, E::Fill) => invalid,
        (Filled, E::CancelRequest) => invalid,
        (Filled, E::CancelConfirm) => invalid,
        (Filled, E::CancelReject) => invalid,
        (Filled, E::Reject) => invalid,
        (Filled, E::Expire) => invalid,

        (Cancelled, E::Submit) => invalid,
        (Cancelled, E::Accept) => invalid,
        (Cancelled, E::PartialFill) => invalid,
        (Cancelled, E::Fill) => invalid,
        (Cancelled, E::CancelRequest) => invalid,
        (Cancelled, E::CancelConfirm) => invalid,
        (Cancelled, E::CancelReject) => invalid,
        (Cancelled, E::Reject) => invalid,
        (Cancelled, E::Expire) => invalid,

        (Rejected, E::Submit) => invalid,
        (Rejected, E::Accept) => invalid,
        (Rejected, E::PartialFill) => invalid,
        (Rejected, E::Fill) => invalid,
        (Rejected, E::CancelRequest) => invalid,
        (Rejected, E::CancelConfirm) => invalid,
        (Rejected, E::CancelReject) => invalid,
        (Rejected, E::Reject) => invalid,
        (Rejected, E::Expire) => invalid,

        (Expired, E::Submit) => invalid,
        (Expired, E::Accept) => invalid,
        (Expired, E::PartialFill) => invalid,
        (Expired, E::Fill) => invalid,
        (Expired, E::CancelRequest) => invalid,
        (Expired, E::CancelConfirm) => invalid,
        (Expired, E::CancelReject) => invalid,
        (Expired, E::Reject) => invalid,
        (Expired, E::Expire) => invalid,
    }
}

/// One order's lifecycle: status plus filled quantity.
///
/// Invariants (checked by [`OrderFsm::is_consistent`]): `0 <= filled <=
/// quantity`; FILLED iff `filled == quantity`; PENDING, SUBMITTED, ACCEPTED and
/// REJECTED have nothing filled; PARTIALLY_FILLED has `0 < filled < quantity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderFsm {
    status: OrderStatus,
    quantity: Decimal,
    filled: Decimal,
}

impl OrderFsm {
    /// A new PENDING order of `quantity` (must be positive).
    pub fn new(quantity: Decimal) -> Result<Self, FsmError> {
        if quantity <= Decimal::ZERO {
            return Err(FsmError::NonPositiveQuantity(quantity));
        }
        Ok(Self::new_unchecked(quantity))
    }

    /// A PENDING machine without the quantity check, for orders the venue is
    /// about to reject for that very reason (their lifecycle still goes
    /// through the table, and no fill can ever apply).
    pub(crate) fn new_unchecked(quantity: Decimal) -> Self {
        OrderFsm {
            status: OrderStatus::Pending,
            quantity,
            filled: Decimal::ZERO,
        }
    }

    /// Current status.
    pub fn status(&self) -> OrderStatus {
        self.status
    }

    /// Order quantity.
    pub fn quantity(&self) -> Decimal {
        self.quantity
    }

    /// Cumulative filled quantity.
    pub fn filled(&self) -> Decimal {
        self.filled
    }

    /// Quantity still open (`quantity - filled`).
    pub fn remaining(&self) -> Decimal {
        self.quantity - self.filled
    }

    /// The fill event for `qty`: [`FsmEvent::Fill`] when it completes the
    /// order, [`FsmEvent::PartialFill`] otherwise.
    pub fn fill_event(&self, qty: Decimal) -> FsmEvent {
        if self.filled + qty >= self.quantity {
            FsmEvent::Fill { qty }
        } else {
            FsmEvent::PartialFill { qty }
        }
    }

    /// Apply `event`; on success returns the new status. On error nothing
    /// changes.
    ///
    /// The table decides first (so a fill after CANCELLED is an
    /// [`InvalidTransition`], not a quantity error); fills are then checked for
    /// a positive quantity, no overfill, and agreement between the event kind
    /// and whether the fill completes the order.
    pub fn apply(&mut self, event: FsmEvent) -> Result<OrderStatus, FsmError> {
        let next = transition(self.status, event.kind(), self.filled > Decimal::ZERO)?;
        let filled = match event {
            FsmEvent::PartialFill { qty } | FsmEvent::Fill { qty } => {
                if qty <= Decimal::ZERO {
                    return Err(FsmError::NonPositiveFill(qty));
                }
                let after = self.filled + qty;
                if after > self.quantity {
                    return Err(FsmError::Overfill {
                        quantity: self.quantity,
                        filled: self.filled,
                        fill: qty,
                    });
                }
                let completes = after == self.quantity;
                if completes != matches!(event, FsmEvent::Fill { .. }) {
                    return Err(FsmError::FillMismatch {
                        event: event.kind(),
                        fill: qty,
                        remaining: self.remaining(),
                    });
                }
                after
            }
            FsmEvent::Submit
            | FsmEvent::Accept
            | FsmEvent::CancelRequest
            | FsmEvent::CancelConfirm
            | FsmEvent::CancelReject
            | FsmEvent::Reject
            | FsmEvent::Expire => self.filled,
        };
        self.status = next;
        self.filled = filled;
        Ok(next)
    }

    /// Whether status and filled quantity agree (see the type's invariants).
    pub fn is_consistent(&self) -> bool {
        use OrderStatus::*;
        let z = Decimal::ZERO;
        if self.filled < z || self.filled > self.quantity {
            return false;
        }
        match self.status {
            Filled => self.filled == self.quantity,
            Pending | Submitted | Accepted | Rejected => self.filled == z,
            PartiallyFilled => self.filled > z && self.filled < self.quantity,
            CancelRequested | Cancelled | Expired => self.filled < self.quantity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal_macros::dec;
    use OrderStatus::*;

    const X: Option<OrderStatus> = None;

    /// Expected table, rows = statuses, columns = EventKind::ALL order:
    /// Submit, Accept, PartialFill, Fill, CancelRequest, CancelConfirm,
    /// CancelReject, Reject, Expire. `None` = invalid. (`has_fills = false`.)
    const EXPECTED: [(OrderStatus, [Option<OrderStatus>; 9]); 9] = [
        (
            Pending,
            [
                Some(Submitted),
                X,
                X,
                X,
                Some(Cancelled),
                X,
                X,
                Some(Rejected),
                Some(Expired),
            ],
        ),
        (
            Submitted,
            [
                X,
                Some(Accepted),
                Some(PartiallyFilled),
                Some(Filled),
                Some(CancelRequested),
                Some(Cancelled),
                X,
                Some(Rejected),
                Some(Expired),
            ],
        ),
        (
            Accepted,
            [
                X,
                X,
                Some(PartiallyFilled),
                Some(Filled),
                Some(CancelRequested),
                Some(Cancelled),
                X,
                Some(Rejected),
                Some(Expired),
            ],
        ),
        (
            PartiallyFilled,
            [
                X,
                X,
                Some(PartiallyFilled),
                Some(Filled),
                Some(CancelRequested),
                Some(Cancelled),
                X,
                X,
                Some(Expired),
            ],
        ),
        (
            CancelRequested,
            [
                X,
                Some(CancelRequested),
                Some(CancelRequested),
                Some(Filled),
                X,
                Some(Cancelled),
                Some(Accepted),
                Some(Rejected),
                Some(Expired),
            ],
        ),
        (Filled, [X; 9]),
        (Cancelled, [X; 9]),
        (Rejected, [X; 9]),
        (Expired, [X; 9]),
    ];

    #[test]
    fn every_pair_matches_the_expected_table() {
        let mut checked = 0;
        for (from, row) in EXPECTED {
            for (event, expected) in EventKind::ALL.into_iter().zip(row) {
                let got = transition(from, event, false).ok();
                assert_eq!(got, expected, "{from} + {event}");
                checked += 1;
            }
        }
        assert_eq!(checked, OrderStatus::ALL.len() * EventKind::ALL.len());
        let mut rows: Vec<_> = EXPECTED.iter().map(|(s, _)| *s).collect();
        rows.sort();
        rows.dedup();
        assert_eq!(
            rows.len(),
            OrderStatus::ALL.len(),
            "every status has one row"
        );
    }

    #[test]
    fn has_fills_only_changes_cancel_reject_and_reject_in_cancel_requested() {
        for from in OrderStatus::ALL {
            for event in EventKind::ALL {
                let a = transition(*from, event, false);
                let b = transition(*from, event, true);
                if (*from, event) == (CancelRequested, EventKind::CancelReject) {
                    assert_eq!(a, Ok(Accepted));
                    assert_eq!(b, Ok(PartiallyFilled));
                } else if (*from, event) == (CancelRequested, EventKind::Reject) {
                    // A REJECTED order holds no fills.
                    assert_eq!(a, Ok(Rejected));
                    assert!(b.is_err());
                } else {
                    assert_eq!(a, b, "{from} + {event}");
                }
            }
        }
    }

    #[test]
    fn terminal_rows_are_all_invalid_with_typed_error() {
        for from in OrderStatus::ALL.iter().filter(|s| s.is_terminal()) {
            for event in EventKind::ALL {
                assert_eq!(
                    transition(*from, event, true),
                    Err(InvalidTransition { from: *from, event })
                );
            }
        }
    }

    fn working(qty: Decimal) -> OrderFsm {
        let mut f = OrderFsm::new(qty).unwrap();
        f.apply(FsmEvent::Submit).unwrap();
        f.apply(FsmEvent::Accept).unwrap();
        f
    }

    #[test]
    fn happy_path_with_partial_fills() {
        let mut f = working(dec!(10));
        assert_eq!(
            f.apply(FsmEvent::PartialFill { qty: dec!(4) }),
            Ok(PartiallyFilled)
        );
        assert_eq!(
            f.apply(FsmEvent::PartialFill { qty: dec!(5) }),
            Ok(PartiallyFilled)
        );
        assert_eq!(f.apply(FsmEvent::Fill { qty: dec!(1) }), Ok(Filled));
        assert_eq!(f.filled(), dec!(10));
        assert!(f.is_consistent());
    }

    #[test]
    fn fill_racing_a_cancel_is_applied() {
        let mut f = working(dec!(10));
        f.apply(FsmEvent::CancelRequest).unwrap();
        assert_eq!(
            f.apply(FsmEvent::PartialFill { qty: dec!(3) }),
            Ok(CancelRequested)
        );
        assert_eq!(f.filled(), dec!(3));
        assert_eq!(f.apply(FsmEvent::Fill { qty: dec!(7) }), Ok(Filled));
        // The cancel confirmation after the full fill is refused.
        assert_eq!(
            f.apply(FsmEvent::CancelConfirm),
            Err(FsmError::InvalidTransition(InvalidTransition {
                from: Filled,
                event: EventKind::CancelConfirm
            }))
        );
    }

    #[test]
    fn cancel_wins_then_fill_is_invalid() {
        let mut f = working(dec!(10));
        f.apply(FsmEvent::PartialFill { qty: dec!(2) }).unwrap();
        f.apply(FsmEvent::CancelRequest).unwrap();
        assert_eq!(f.apply(FsmEvent::CancelConfirm), Ok(Cancelled));
        let before = f.clone();
        assert!(matches!(
            f.apply(FsmEvent::Fill { qty: dec!(8) }),
            Err(FsmError::InvalidTransition(_))
        ));
        assert_eq!(f, before);
        assert_eq!(f.filled(), dec!(2));
    }

    #[test]
    fn cancel_reject_returns_to_working_state() {
        let mut f = working(dec!(10));
        f.apply(FsmEvent::CancelRequest).unwrap();
        assert_eq!(f.apply(FsmEvent::CancelReject), Ok(Accepted));
        f.apply(FsmEvent::PartialFill { qty: dec!(1) }).unwrap();
        f.apply(FsmEvent::CancelRequest).unwrap();
        assert_eq!(f.apply(FsmEvent::CancelReject), Ok(PartiallyFilled));
    }

    #[test]
    fn quantity_errors_leave_state_unchanged() {
        let mut f = working(dec!(10));
        f.apply(FsmEvent::PartialFill { qty: dec!(6) }).unwrap();
        let before = f.clone();
        assert_eq!(
            f.apply(FsmEvent::Fill { qty: dec!(5) }),
            Err(FsmError::Overfill {
                quantity: dec!(10),
                filled: dec!(6),
                fill: dec!(5)
            })
        );
        assert!(matches!(
            f.apply(FsmEvent::PartialFill { qty: dec!(4) }),
            Err(FsmError::FillMismatch { .. })
        ));
        assert!(matches!(
            f.apply(FsmEvent::Fill { qty: dec!(3) }),
            Err(FsmError::FillMismatch { .. })
        ));
        assert_eq!(
            f.apply(FsmEvent::PartialFill { qty: dec!(0) }),
            Err(FsmError::NonPositiveFill(dec!(0)))
        );
        assert_eq!(f, before);
        assert_eq!(
            OrderFsm::new(dec!(0)),
            Err(FsmError::NonPositiveQuantity(dec!(0)))
        );
    }

    #[test]
    fn fill_event_picks_kind() {
        let f = working(dec!(10));
        assert_eq!(f.fill_event(dec!(10)), FsmEvent::Fill { qty: dec!(10) });
        assert_eq!(
            f.fill_event(dec!(9)),
            FsmEvent::PartialFill { qty: dec!(9) }
        );
    }

    fn arb_event() -> impl Strategy<Value = FsmEvent> {
        let qty = (1u32..=6).prop_map(Decimal::from);
        prop_oneof![
            Just(FsmEvent::Submit),
            Just(FsmEvent::Accept),
            qty.clone().prop_map(|qty| FsmEvent::PartialFill { qty }),
            qty.prop_map(|qty| FsmEvent::Fill { qty }),
            Just(FsmEvent::CancelRequest),
            Just(FsmEvent::CancelConfirm),
            Just(FsmEvent::CancelReject),
            Just(FsmEvent::Reject),
            Just(FsmEvent::Expire),
            // Fills sized by the machine itself, so sequences reach FILLED often.
            (1u32..=6).prop_map(|q| FsmEvent::PartialFill {
                qty: Decimal::from(q) * dec!(-1)
            }),
        ]
    }

    proptest! {
        #[test]
        fn random_sequences_keep_invariants(
            qty in 1u32..=12,
            events in proptest::collection::vec((arb_event(), any::<bool>()), 0..40),
        ) {
            let mut f = OrderFsm::new(Decimal::from(qty)).unwrap();
            for (ev, auto_kind) in events {
                // A negative PartialFill marker means "let the machine choose
                // Fill vs PartialFill for |qty|".
                let ev = match ev {
                    FsmEvent::PartialFill { qty } if qty < Decimal::ZERO => f.fill_event(-qty),
                    FsmEvent::PartialFill { qty } | FsmEvent::Fill { qty } if auto_kind => f.fill_event(qty),
                    other => other,
                };
                let before = f.clone();
                let res = f.apply(ev);
                if before.status().is_terminal() {
                    prop_assert!(res.is_err());
                }
                match res {
                    Ok(s) => prop_assert_eq!(s, f.status()),
                    Err(_) => prop_assert_eq!(&f, &before),
                }
                prop_assert!(f.filled() <= f.quantity());
                prop_assert!(f.filled() >= before.filled());
                prop_assert!(f.is_consistent(), "inconsistent {:?}", f);
            }
        }
    }
}
