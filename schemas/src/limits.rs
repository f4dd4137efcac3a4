//! Sanity bounds on prices and quantities, shared by every stage.
//!
//! `rust_decimal` holds about ±7.9e28 and its operators panic beyond that. A
//! garbage quantity or a bad price tick must be refused as bad input (a DLQ
//! reason, a rejected order) instead of crashing the stage that multiplies
//! it, or worse, wedging one that replays its input after a crash. Inside
//! these bounds one position's notional (`units × price`) stays below
//! `1e26`, so a ledger can sum hundreds of them without overflow; no real
//! instrument comes near them (the largest unit prices trade below `1e7`,
//! and `1e16` units is a hundred trillion micro-cap tokens).

use rust_decimal::Decimal;

/// The largest price (or limit / stop level) any stage accepts: `1e10` per unit.
pub const MAX_PRICE: Decimal = Decimal::from_parts(1_410_065_408, 2, 0, false, 0);

/// The largest number of units (`quantity × multiplier`) one order, fill or
/// position may hold: `1e16`.
pub const MAX_UNITS: Decimal = Decimal::from_parts(1_874_919_424, 2_328_306, 0, false, 0);

/// The largest amount of money one order, fill or position involves
/// ([`MAX_PRICE`] × [`MAX_UNITS`] = `1e26`): a bound for commissions.
pub const MAX_NOTIONAL: Decimal =
    Decimal::from_parts(3_825_205_248, 3_704_098_002, 5_421_010, false, 0);

/// A price-like value is positive and at most [`MAX_PRICE`]; the error says
/// which bound it breaks.
pub fn check_price(price: Decimal) -> Result<(), String> {
    if price <= Decimal::ZERO {
        Err(format!("must be positive, got {price}"))
    } else if price > MAX_PRICE {
        Err(format!("must be at most {MAX_PRICE}, got {price}"))
    } else {
        Ok(())
    }
}

/// A quantity is positive and, times its contract `multiplier`, at most
/// [`MAX_UNITS`].
pub fn check_quantity(quantity: Decimal, multiplier: Decimal) -> Result<(), String> {
    if quantity <= Decimal::ZERO {
        return Err(format!("must be positive, got {quantity}"));
    }
    match quantity.checked_mul(multiplier.max(Decimal::ONE)) {
        Some(units) if units <= MAX_UNITS => Ok(()),
        _ => Err(format!(
            "{quantity} × multiplier {multiplier} exceeds the {MAX_UNITS} units one order or position may hold"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn the_bounds_are_the_round_numbers_they_claim() {
        assert_eq!(MAX_PRICE, dec!(10_000_000_000));
        assert_eq!(MAX_UNITS, dec!(10_000_000_000_000_000));
        assert_eq!(MAX_NOTIONAL, MAX_PRICE * MAX_UNITS);
        // One position at the bounds is far from the type's limit, with room
        // for hundreds of them in one sum.
        let notional = MAX_PRICE * MAX_UNITS;
        assert!(notional.checked_mul(dec!(700)).is_some());
    }

    #[test]
    fn prices_outside_the_range_are_refused_with_the_bound() {
        assert!(check_price(dec!(0.00000001)).is_ok());
        assert!(check_price(MAX_PRICE).is_ok());
        assert_eq!(check_price(dec!(0)).unwrap_err(), "must be positive, got 0");
        assert!(check_price(dec!(-1)).is_err());
        let e = check_price(dec!(1e26)).unwrap_err();
        assert!(e.contains("at most 10000000000"), "{e}");
    }

    #[test]
    fn quantities_count_their_multiplier_and_never_overflow() {
        assert!(check_quantity(dec!(1), dec!(100)).is_ok());
        assert!(check_quantity(MAX_UNITS, dec!(1)).is_ok());
        assert!(check_quantity(MAX_UNITS, dec!(2)).is_err());
        assert!(check_quantity(dec!(0), dec!(1)).is_err());
        // A product beyond the decimal range is an error, not a panic.
        let e = check_quantity(dec!(1e27), dec!(1000)).unwrap_err();
        assert!(e.contains("exceeds"), "{e}");
    }
}
