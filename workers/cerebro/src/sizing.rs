//! Position sizing: from the sender's leg quantities to Cerebro's units.
//!
//! - allocated capital = `equity × allocation_pct / 100`;
//! - available capital = `allocated − deployed − reserved`, where deployed is
//!   the margin the strategy's open positions tie up in the routed account and
//!   reserved the margin of its approved orders not yet booked.
//!
//! Modes (the signal's `sizing_mode`):
//!
//! | mode | raw units of leg `i` |
//! |---|---|
//! | SENDER_EQUITY_RATIO | `q_i × available / sender_equity` (one factor `k = available / sender_equity` for all legs) |
//! | TARGET_WEIGHT | `q_i × allocated / (price_i × multiplier_i) − held_i` (`q_i` a fraction of allocated capital; buys up to the target; `held_i` booked plus approved-unbooked units) |
//! | DELTA_UNITS | `q_i` (units to add) |
//! | FIXED_UNITS | `q_i` |
//!
//! Raw units are rounded **toward zero** to the instrument's lot size
//! ([`round_to_lot`]); a leg that rounds to zero rejects the signal
//! ([`Reason::LegRoundsToZero`]). Multiplication happens before division so
//! exact inputs give exact results (`10 × 893,600 / 500,000 = 17.872 → 17`).

use mtx_schemas::SizingMode;
use rust_decimal::Decimal;

use crate::risk::{div, mul, sub, Reason};

/// `equity × allocation_pct / 100`.
pub fn allocated_capital(equity: Decimal, allocation_pct: Decimal) -> Result<Decimal, Reason> {
    div(
        mul(equity, allocation_pct, "allocated capital")?,
        Decimal::ONE_HUNDRED,
        "allocated capital",
    )
}

/// `quantity` rounded toward zero to a multiple of `lot` (`lot > 0`; a
/// non-positive lot leaves the quantity unchanged).
pub fn round_to_lot(quantity: Decimal, lot: Decimal) -> Decimal {
    if lot <= Decimal::ZERO {
        return quantity;
    }
    match quantity.checked_div(lot) {
        Some(lots) => lots.trunc() * lot,
        None => Decimal::ZERO,
    }
}

/// `quantity × scale` rounded toward zero to the lot (used to shrink every leg
/// by the common factor).
pub fn scale_to_lot(quantity: Decimal, scale: Decimal, lot: Decimal) -> Decimal {
    quantity
        .checked_mul(scale)
        .map(|q| round_to_lot(q, lot))
        .unwrap_or(Decimal::ZERO)
}

/// The strategy's capital figures for one decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capital {
    /// Account equity.
    pub equity: Decimal,
    /// Allocation in percent.
    pub allocation_pct: Decimal,
    /// `equity × allocation_pct / 100`.
    pub allocated: Decimal,
    /// Margin of the strategy's open positions.
    pub deployed: Decimal,
    /// Margin of the strategy's approved, unbooked orders.
    pub reserved: Decimal,
    /// `allocated − deployed − reserved`.
    pub available: Decimal,
}

impl Capital {
    /// Compute the figures.
    pub fn new(
        equity: Decimal,
        allocation_pct: Decimal,
        deployed: Decimal,
        reserved: Decimal,
    ) -> Result<Self, Reason> {
        let allocated = allocated_capital(equity, allocation_pct)?;
        let available = sub(
            sub(allocated, deployed, "available capital")?,
            reserved,
            "available capital",
        )?;
        Ok(Capital {
            equity,
            allocation_pct,
            allocated,
            deployed,
            reserved,
            available,
        })
    }
}

/// One entry leg as sizing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizingLeg {
    /// Leg index.
    pub leg: u32,
    /// Symbol (for reasons).
    pub instrument: String,
    /// The sender's quantity.
    pub sender_quantity: Decimal,
    /// Pricing price (> 0).
    pub price: Decimal,
    /// Contract multiplier.
    pub multiplier: Decimal,
    /// Lot size.
    pub lot_size: Decimal,
    /// Units the strategy already holds in this instrument and direction.
    pub held: Decimal,
}

/// One sized leg (before risk limits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizedLeg {
    /// Units before rounding.
    pub raw_quantity: Decimal,
    /// Units rounded toward zero to the lot: the pre-check size.
    pub quantity: Decimal,
    /// How it was computed, for `position_size_logic`.
    pub logic: String,
}

/// Sized legs plus the common factor (SENDER_EQUITY_RATIO's `k`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sized {
    /// One per leg, in leg order.
    pub legs: Vec<SizedLeg>,
    /// `available / sender_equity` for SENDER_EQUITY_RATIO, else `None`.
    pub scale_factor: Option<Decimal>,
}

/// Size all legs of an entry together (see the module docs).
pub fn size_entry(
    mode: SizingMode,
    capital: &Capital,
    sender_equity: Option<Decimal>,
    legs: &[SizingLeg],
) -> Result<Sized, Reason> {
    let sender_equity = match mode {
        SizingMode::SenderEquityRatio => Some(
            sender_equity
                .filter(|e| *e > Decimal::ZERO)
                .ok_or(Reason::MissingSenderEquity)?,
        ),
        _ => None,
    };
    let mut out = Vec::with_capacity(legs.len());
    for l in legs {
        let (raw, logic) = match (mode, sender_equity) {
            (SizingMode::SenderEquityRatio, Some(se)) => {
                let raw = div(
                    mul(l.sender_quantity, capital.available, "sizing")?,
                    se,
                    "sizing",
                )?;
                (
                    raw,
                    format!(
                        "SENDER_EQUITY_RATIO: {} x available {} / sender equity {} = {}",
                        l.sender_quantity, capital.available, se, raw
                    ),
                )
            }
            (SizingMode::TargetWeight, _) => {
                let unit_value = mul(l.price, l.multiplier, "sizing")?;
                let target = div(
                    mul(l.sender_quantity, capital.allocated, "sizing")?,
                    unit_value,
                    "sizing",
                )?;
                if target <= l.held {
                    return Err(Reason::AlreadyAtTarget {
                        leg: l.leg,
                        instrument: l.instrument.clone(),
                        target,
                        held: l.held,
                    });
                }
                (
                    target - l.held,
                    format!(
                        "TARGET_WEIGHT: {} x allocated {} / ({} x {}) = {} target - {} held",
                        l.sender_quantity, capital.allocated, l.price, l.multiplier, target, l.held
                    ),
                )
            }
            (m, _) => (
                l.sender_quantity,
                format!("{m}: {} units as sent", l.sender_quantity),
            ),
        };
        let quantity = round_to_lot(raw, l.lot_size);
        if quantity <= Decimal::ZERO {
            return Err(Reason::LegRoundsToZero {
                leg: l.leg,
                instrument: l.instrument.clone(),
                quantity: raw,
                lot_size: l.lot_size,
            });
        }
        out.push(SizedLeg {
            raw_quantity: raw,
            quantity,
            logic: format!("{logic} -> {quantity} (toward zero, lot {})", l.lot_size),
        });
    }
    let scale_factor = match sender_equity {
        Some(se) => Some(div(capital.available, se, "scale factor")?),
        None => None,
    };
    Ok(Sized {
        legs: out,
        scale_factor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn rounds_toward_zero_to_the_lot() {
        assert_eq!(round_to_lot(dec!(17.872), Decimal::ONE), dec!(17));
        assert_eq!(
            round_to_lot(dec!(1.4893333333333), dec!(0.00000001)),
            dec!(1.48933333)
        );
        assert_eq!(round_to_lot(dec!(0.9), Decimal::ONE), Decimal::ZERO);
        assert_eq!(round_to_lot(dec!(250), dec!(100)), dec!(200));
        assert_eq!(scale_to_lot(dec!(17), dec!(0.5), Decimal::ONE), dec!(8));
    }

    #[test]
    fn capital_figures() {
        let c = Capital::new(dec!(1000000), dec!(89.36), dec!(600), dec!(400)).unwrap();
        assert_eq!(c.allocated, dec!(893600));
        assert_eq!(c.available, dec!(892600));
    }
}
