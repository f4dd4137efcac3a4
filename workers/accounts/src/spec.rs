//! Instrument specifications: contract multiplier and margin model.
//!
//! Margin is what an open position ties up; the ledger sums it into
//! `margin_used` and per-strategy deployed capital. Configure a spec for any
//! instrument whose margin is known (futures especially: exchanges quote a
//! fixed amount per contract); everything else falls back to
//! [`InstrumentSpec::default_for`].

use mtx_schemas::InstrumentType;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

/// How much margin a position needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarginModel {
    /// A fraction of the position's notional at the current mark
    /// (`quantity * mark * multiplier * fraction`); `0.25` is 25%.
    PercentOfNotional(Decimal),
    /// A fixed amount per contract / unit (`quantity * amount`), e.g. an
    /// exchange's initial margin for one GC contract.
    PerContract(Decimal),
}

/// Contract multiplier plus margin model of one instrument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstrumentSpec {
    /// Value of one point per contract (1 for stocks, 100 for GC).
    pub multiplier: Decimal,
    /// Margin requirement.
    pub margin: MarginModel,
}

impl InstrumentSpec {
    /// The fallback spec for an unconfigured instrument of `instrument_type`,
    /// with the multiplier the execution carries.
    ///
    /// Margin fractions of notional: STOCK / ETF 25% (Reg-T maintenance),
    /// FOREX 2% (50:1), FUTURE 10% (a stand-in until a per-contract spec is
    /// configured), CRYPTO 50%, OPTION 100% (long premium is paid in full).
    pub fn default_for(instrument_type: InstrumentType, multiplier: Decimal) -> Self {
        let fraction = match instrument_type {
            InstrumentType::Stock | InstrumentType::Etf => dec!(0.25),
            InstrumentType::Forex => dec!(0.02),
            InstrumentType::Future => dec!(0.10),
            InstrumentType::Crypto => dec!(0.50),
            InstrumentType::Option => Decimal::ONE,
        };
        InstrumentSpec {
            multiplier,
            margin: MarginModel::PercentOfNotional(fraction),
        }
    }

    /// Margin for `quantity` (positive) at `mark`.
    pub fn margin_for(&self, quantity: Decimal, mark: Decimal) -> Decimal {
        match self.margin {
            MarginModel::PercentOfNotional(f) => quantity * mark * self.multiplier * f,
            MarginModel::PerContract(amount) => quantity * amount,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn margin_models() {
        let stock = InstrumentSpec::default_for(InstrumentType::Stock, Decimal::ONE);
        assert_eq!(stock.margin_for(dec!(10), dec!(150)), dec!(375));
        let gc = InstrumentSpec {
            multiplier: dec!(100),
            margin: MarginModel::PerContract(dec!(16500)),
        };
        assert_eq!(gc.margin_for(dec!(5), dec!(4029)), dec!(82500));
        let gc_default = InstrumentSpec::default_for(InstrumentType::Future, dec!(100));
        assert_eq!(gc_default.margin_for(dec!(5), dec!(4000)), dec!(200000));
    }
}
