//! EXIT / SCALE_OUT / closing delta orders, and CANCEL.
//!
//! Reducing risk is always allowed: nothing here looks at the kill switch,
//! the allocation, the strategy's status or any limit.
//!
//! # What an exit closes
//!
//! With `entry_signal_id` and Cerebro's [`EntryRecord`] of that entry, each
//! exit leg closes the entry leg with the same instrument and direction:
//!
//! - `open = filled − closed` of that entry leg (`closed`: what earlier
//!   exits' orders filled, or all they ordered while working), and never
//!   more than the strategy's open position in the account
//!   (`closable = min(open, account)`);
//! - the sender's fraction `f = exit qty / (entry sender qty − sender qty
//!   already exited)`; `f ≥ 1` closes everything open, otherwise
//!   `open × f` rounded toward zero to the lot (so a ladder of partial exits
//!   ends exactly flat);
//! - asking for more than is open closes what is open ([`Reason::ExitClamped`],
//!   decision MODIFIED); nothing is ever flipped.
//!
//! Without a link (or after the worker gave up waiting for the entry), a leg
//! closes against the strategy's open position in that instrument and
//! direction: an EXIT closes all of it; a SCALE_OUT converts its quantity to
//! units with the sizing mode (SENDER_EQUITY_RATIO against *allocated*
//! capital, TARGET_WEIGHT as a fraction of allocated capital, units
//! otherwise; the whole position when the conversion lacks data); a closing
//! delta order closes its quantity in units, scaled under SENDER_EQUITY_RATIO
//! as its opening delta was (units when the conversion lacks data); all
//! clamped to what is open.
//!
//! # Deferral
//!
//! An exit is deferred ([`DeferReason`]) while its entry is unknown, while the
//! entry has not filled at all but is still working, or while a fill is known
//! but the account state does not show the position yet. With
//! [`DecideOptions::entry_wait_expired`] the worker stops waiting: an unfilled
//! entry's working orders are cancelled instead. An exit of a partially
//! filled, still working entry closes the filled part and cancels the rest.
//!
//! # CANCEL
//!
//! Cancel commands for the entry's working orders (from its record, or —
//! once the wait expired — the deterministic `order_id(entry, leg)` ids found
//! among the account's open orders).

use mtx_schemas::ids::order_id;
use mtx_schemas::signal::{SignalLeg, StandardizedSignal};
use mtx_schemas::{Decision, Direction, SignalType, SizingMode};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::inputs::{AccountInputs, DecideOptions, EntryRecord, Inputs};
use crate::risk::{div, mul, Reason};
use crate::sizing::{allocated_capital, round_to_lot};

/// Why a signal must wait (the worker redelivers it later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "code", rename_all = "snake_case")]
pub enum DeferReason {
    /// Cerebro has no record of the entry yet (it may still be in flight).
    #[error("entry {entry_signal_id} not seen yet")]
    EntryUnknown {
        /// The entry's signal id.
        entry_signal_id: String,
    },
    /// The entry's orders are working and nothing has filled.
    #[error("entry {entry_signal_id} has not filled yet")]
    EntryNotFilled {
        /// The entry's signal id.
        entry_signal_id: String,
    },
    /// The entry filled but the account state does not show the position yet.
    #[error(
        "entry {entry_signal_id} leg {leg} filled {filled} but the position is not booked yet"
    )]
    PositionNotBooked {
        /// The entry's signal id.
        entry_signal_id: String,
        /// Entry leg.
        leg: u32,
        /// Filled quantity the record knows.
        filled: Decimal,
    },
    /// No state for the account yet.
    #[error("no account state for account {account} yet")]
    AccountStateMissing {
        /// Account name.
        account: String,
    },
}

/// How the exit's quantity is read when there is no entry record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// EXIT: close the position.
    Exit,
    /// SCALE_OUT: reduce by the converted quantity.
    ScaleOut,
    /// Untyped delta order against an opposite position: reduce by its units.
    Delta,
}

/// One exit leg to execute.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitLegInput<'a> {
    /// Leg index in the exit signal.
    pub leg: u32,
    /// The signal leg.
    pub signal_leg: &'a SignalLeg,
    /// Direction of the position being closed.
    pub direction: Direction,
}

/// One planned closing order.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitLegPlan {
    /// Leg index in the exit signal.
    pub leg: u32,
    /// Direction of the position closed.
    pub direction: Direction,
    /// Quantity the sender's intent maps to (before clamping to what is open).
    pub requested: Decimal,
    /// What can be closed: `min(entry open, account position)`.
    pub closable: Decimal,
    /// Quantity to close (`≤ closable`; zero when nothing can be closed).
    pub quantity: Decimal,
    /// Margin the closed part releases (pro rata of the position's margin).
    pub released_margin: Decimal,
    /// Contract multiplier.
    pub multiplier: Decimal,
    /// Lot size used.
    pub lot_size: Decimal,
    /// How the quantity was found.
    pub logic: String,
    /// Why the leg closes nothing or less than requested.
    pub note: Option<Reason>,
}

/// A resolved exit.
#[derive(Debug, Clone, PartialEq)]
pub struct ExitPlan {
    /// Account the closing orders go to.
    pub account: String,
    /// One per exit leg (quantity may be zero).
    pub legs: Vec<ExitLegPlan>,
    /// Working entry orders to cancel (unfilled remainder).
    pub cancels: Vec<String>,
}

/// Outcome of planning an exit or a cancel.
#[derive(Debug, Clone, PartialEq)]
pub enum Resolution<T> {
    /// Go ahead.
    Plan(T),
    /// Try again later.
    Defer(DeferReason),
    /// Refuse.
    Reject(Reason),
}

/// Account an exit / cancel is routed to: the entry's, else the strategy's.
fn route(
    signal: &StandardizedSignal,
    inputs: &Inputs,
    record: Option<&EntryRecord>,
) -> Result<String, Reason> {
    if let Some(r) = record {
        return Ok(r.account.clone());
    }
    let cfg =
        inputs
            .strategies
            .get(&signal.strategy_id)
            .ok_or_else(|| Reason::StrategyUnknown {
                strategy_id: signal.strategy_id.clone(),
            })?;
    cfg.account.clone().ok_or_else(|| Reason::NoAccount {
        strategy_id: signal.strategy_id.clone(),
    })
}

fn released_margin(
    acct: &AccountInputs,
    strategy: &str,
    instrument: &str,
    direction: Direction,
    qty: Decimal,
) -> Decimal {
    let (held, margin) = acct
        .state
        .open_positions
        .iter()
        .filter(|p| {
            p.strategy_id == strategy && p.instrument == instrument && p.direction == direction
        })
        .fold((Decimal::ZERO, Decimal::ZERO), |(q, m), p| {
            (q + p.quantity, m + p.margin_required)
        });
    if held <= Decimal::ZERO {
        return Decimal::ZERO;
    }
    margin
        .checked_mul(qty)
        .and_then(|x| x.checked_div(held))
        .unwrap_or(margin)
        .min(margin)
}

/// Units a SCALE_OUT / delta quantity means without an entry record; `None`
/// when the conversion lacks data (the whole position is closed).
fn unlinked_units(
    signal: &StandardizedSignal,
    inputs: &Inputs,
    acct: &AccountInputs,
    leg: &SignalLeg,
    kind: ExitKind,
    multiplier: Decimal,
) -> Result<Option<Decimal>, Reason> {
    let q = leg.quantity;
    let allocated = match inputs
        .allocation
        .as_ref()
        .and_then(|a| a.pct(&signal.strategy_id))
        .filter(|p| *p > Decimal::ZERO)
    {
        Some(pct) => allocated_capital(acct.state.equity, pct)?,
        None => Decimal::ZERO,
    };
    let units = match signal.sizing_mode {
        SizingMode::DeltaUnits | SizingMode::FixedUnits => Some(q),
        SizingMode::SenderEquityRatio => match signal.account_equity {
            Some(se) if se > Decimal::ZERO && allocated > Decimal::ZERO => {
                Some(div(mul(q, allocated, "exit sizing")?, se, "exit sizing")?)
            }
            _ => None,
        },
        SizingMode::TargetWeight => {
            let price = leg
                .price
                .or_else(|| inputs.fresh_mark(&leg.instrument).map(|m| m.price))
                .filter(|p| *p > Decimal::ZERO);
            match price {
                Some(p) if allocated > Decimal::ZERO => Some(div(
                    mul(q, allocated, "exit sizing")?,
                    mul(p, multiplier, "exit sizing")?,
                    "exit sizing",
                )?),
                _ => None,
            }
        }
    };
    // A closing delta under SENDER_EQUITY_RATIO is scaled as its opening
    // delta was (so a sender's +10 / −10 leaves nothing open); in any other
    // mode, or without the data to scale it, its quantity is units.
    Ok(match (kind, signal.sizing_mode) {
        (ExitKind::Delta, SizingMode::SenderEquityRatio) => units.or(Some(q)),
        (ExitKind::Delta, _) => Some(q),
        _ => units,
    })
}

/// Plan an EXIT / SCALE_OUT / closing delta order (see the module docs).
pub fn plan_exit(
    signal: &StandardizedSignal,
    inputs: &Inputs,
    opts: DecideOptions,
    kind: ExitKind,
    legs: &[ExitLegInput<'_>],
) -> Resolution<ExitPlan> {
    match plan_exit_inner(signal, inputs, opts, kind, legs) {
        Ok(r) => r,
        Err(reason) => Resolution::Reject(reason),
    }
}

fn plan_exit_inner(
    signal: &StandardizedSignal,
    inputs: &Inputs,
    opts: DecideOptions,
    kind: ExitKind,
    legs: &[ExitLegInput<'_>],
) -> Result<Resolution<ExitPlan>, Reason> {
    let link = signal.entry_signal_id.as_deref();
    let record = link.and_then(|id| inputs.entries.get(id));
    if let (Some(id), None) = (link, record) {
        if !opts.entry_wait_expired {
            return Ok(Resolution::Defer(DeferReason::EntryUnknown {
                entry_signal_id: id.to_string(),
            }));
        }
    }
    let account = route(signal, inputs, record)?;
    let Some(acct) = inputs.accounts.get(&account) else {
        return Ok(Resolution::Defer(DeferReason::AccountStateMissing {
            account,
        }));
    };
    let mut cancels = Vec::new();
    if let Some(r) = record {
        if r.decision == Decision::Rejected || r.legs.is_empty() {
            return Err(Reason::EntryNotOpened {
                entry_signal_id: r.signal_id.clone(),
                state: r.decision.to_string(),
            });
        }
        cancels = r
            .legs
            .iter()
            .filter(|l| l.is_working())
            .map(|l| l.order_id.clone())
            .collect();
        let filled = r.legs.iter().any(|l| l.filled_quantity > Decimal::ZERO);
        if !filled {
            if cancels.is_empty() {
                return Err(Reason::EntryNotOpened {
                    entry_signal_id: r.signal_id.clone(),
                    state: "ended unfilled".into(),
                });
            }
            if !opts.entry_wait_expired {
                return Ok(Resolution::Defer(DeferReason::EntryNotFilled {
                    entry_signal_id: r.signal_id.clone(),
                }));
            }
        }
    }
    let strategy = signal.strategy_id.as_str();
    let mut plans = Vec::with_capacity(legs.len());
    // What earlier legs of this signal already close, of the account's
    // position per (instrument, direction) and of each entry leg: two legs
    // on one position (a sender's duplicate leg, two months of one futures
    // root) share it instead of each closing all of it, so the signal never
    // sells more than is open and never flips the position.
    let mut taken_position: Vec<((&str, Direction), Decimal)> = Vec::new();
    let mut taken_entry_leg: Vec<(u32, Decimal)> = Vec::new();
    fn taken<K: PartialEq>(book: &[(K, Decimal)], key: &K) -> Decimal {
        book.iter()
            .find(|(k, _)| k == key)
            .map_or(Decimal::ZERO, |(_, q)| *q)
    }
    fn take<K: PartialEq>(book: &mut Vec<(K, Decimal)>, key: K, quantity: Decimal) {
        match book.iter_mut().find(|(k, _)| *k == key) {
            Some((_, q)) => *q += quantity,
            None => book.push((key, quantity)),
        }
    }
    for input in legs {
        let leg = input.signal_leg;
        let direction = input.direction;
        let spec = inputs
            .instruments
            .resolve(&leg.instrument, leg.instrument_type);
        let (multiplier, lot) = spec.map(|s| (s.multiplier, s.lot_size)).unwrap_or((
            inputs.instruments.position_multiplier(&leg.instrument),
            Decimal::ZERO,
        ));
        let account_open = acct.open_quantity(strategy, &leg.instrument, direction);
        let position_key = (leg.instrument.as_str(), direction);
        let account_left =
            (account_open - taken(&taken_position, &position_key)).max(Decimal::ZERO);
        let mut entry_leg = None;
        let nothing = || Reason::NothingToClose {
            leg: input.leg,
            instrument: leg.instrument.clone(),
            direction,
        };
        let (requested, closable, logic) = match record {
            Some(r) => {
                let Some(el) = r
                    .legs
                    .iter()
                    .find(|l| l.instrument == leg.instrument && l.direction == direction)
                else {
                    plans.push(empty_leg(input, multiplier, lot, nothing()));
                    continue;
                };
                let open = el.open_quantity();
                if open > Decimal::ZERO && account_open <= Decimal::ZERO && !opts.entry_wait_expired
                {
                    return Ok(Resolution::Defer(DeferReason::PositionNotBooked {
                        entry_signal_id: r.signal_id.clone(),
                        leg: el.leg,
                        filled: el.filled_quantity,
                    }));
                }
                entry_leg = Some(el.leg);
                let open_left = (open - taken(&taken_entry_leg, &el.leg)).max(Decimal::ZERO);
                let remaining = el.sender_quantity - el.sender_quantity_exited;
                let requested = if remaining <= Decimal::ZERO {
                    open
                } else {
                    round_to_lot(
                        div(
                            mul(open, leg.quantity, "exit sizing")?,
                            remaining,
                            "exit sizing",
                        )?,
                        lot,
                    )
                };
                let logic = format!(
                    "exit of entry {} leg {}: {} of remaining sender {} x open {} = {}",
                    r.signal_id, el.leg, leg.quantity, remaining, open, requested
                );
                (requested, open_left.min(account_left), logic)
            }
            None => {
                let requested = match kind {
                    ExitKind::Exit => account_left,
                    _ => match unlinked_units(signal, inputs, acct, leg, kind, multiplier)? {
                        Some(u) => round_to_lot(u, lot),
                        None => account_left,
                    },
                };
                let logic = format!(
                    "{kind:?} against the strategy's {direction} {} position {} ({} left by earlier legs): {}",
                    leg.instrument, account_open, account_left, requested
                );
                (requested, account_left, logic)
            }
        };
        if closable <= Decimal::ZERO {
            plans.push(empty_leg(input, multiplier, lot, nothing()));
            continue;
        }
        let quantity = requested.min(closable);
        let note = if quantity <= Decimal::ZERO {
            Some(Reason::LegRoundsToZero {
                leg: input.leg,
                instrument: leg.instrument.clone(),
                quantity: requested,
                lot_size: lot,
            })
        } else if requested > closable {
            Some(Reason::ExitClamped {
                leg: input.leg,
                instrument: leg.instrument.clone(),
                requested,
                open: closable,
            })
        } else {
            None
        };
        let quantity = quantity.max(Decimal::ZERO);
        take(&mut taken_position, position_key, quantity);
        if let Some(l) = entry_leg {
            take(&mut taken_entry_leg, l, quantity);
        }
        plans.push(ExitLegPlan {
            leg: input.leg,
            direction,
            requested,
            closable,
            quantity,
            released_margin: released_margin(acct, strategy, &leg.instrument, direction, quantity),
            multiplier,
            lot_size: lot,
            logic,
            note,
        });
    }
    if plans.iter().all(|p| p.quantity <= Decimal::ZERO) && cancels.is_empty() {
        let reason = plans
            .iter()
            .find_map(|p| p.note.clone())
            .unwrap_or(Reason::NoLegs);
        return Err(reason);
    }
    Ok(Resolution::Plan(ExitPlan {
        account,
        legs: plans,
        cancels,
    }))
}

fn empty_leg(
    input: &ExitLegInput<'_>,
    multiplier: Decimal,
    lot: Decimal,
    note: Reason,
) -> ExitLegPlan {
    ExitLegPlan {
        leg: input.leg,
        direction: input.direction,
        requested: Decimal::ZERO,
        closable: Decimal::ZERO,
        quantity: Decimal::ZERO,
        released_margin: Decimal::ZERO,
        multiplier,
        lot_size: lot,
        logic: "nothing open".into(),
        note: Some(note),
    }
}

/// A resolved CANCEL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelPlan {
    /// Account of the orders.
    pub account: String,
    /// The entry being cancelled.
    pub entry_signal_id: String,
    /// Order ids to cancel.
    pub order_ids: Vec<String>,
}

/// Plan a CANCEL (see the module docs).
pub fn plan_cancel(
    signal: &StandardizedSignal,
    inputs: &Inputs,
    opts: DecideOptions,
) -> Resolution<CancelPlan> {
    let Some(entry) = signal.entry_signal_id.clone() else {
        return Resolution::Reject(Reason::MissingEntryLink {
            signal_type: SignalType::Cancel.to_string(),
        });
    };
    let record = inputs.entries.get(&entry);
    if record.is_none() && !opts.entry_wait_expired {
        return Resolution::Defer(DeferReason::EntryUnknown {
            entry_signal_id: entry,
        });
    }
    let account = match route(signal, inputs, record) {
        Ok(a) => a,
        Err(r) => return Resolution::Reject(r),
    };
    let order_ids: Vec<String> = match record {
        Some(r) => r
            .legs
            .iter()
            .filter(|l| l.is_working())
            .map(|l| l.order_id.clone())
            .collect(),
        None => {
            let open = inputs.accounts.get(&account).map(|a| &a.state.open_orders);
            (0..signal.legs.len())
                .map(|i| order_id(&entry, i))
                .filter(|id| open.is_none_or(|o| o.iter().any(|w| &w.order_id == id)))
                .collect()
        }
    };
    if order_ids.is_empty() {
        return Resolution::Reject(Reason::NothingToCancel {
            entry_signal_id: entry,
        });
    }
    Resolution::Plan(CancelPlan {
        account,
        entry_signal_id: entry,
        order_ids,
    })
}
