//! The exact worked examples: equity 1,000,000, SPX_1-D_Opt
//! allocated 89.36 % (893,600), sender equity 500,000, so the common factor
//! is `893,600 / 500,000 = 1.7872`.

mod common;

use chrono::Duration;
use common::*;
use mtx_cerebro::{decide, Mark};
use mtx_schemas::ids::order_id;
use mtx_schemas::{
    Decision, Direction, InstrumentType, OrderStatus, OrderType, Side, SignalAction, SizingMode,
};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

#[test]
fn aapl_10_at_150_is_17_shares_with_margin_637_50() {
    let sig = &fixture("equity_simple_signal_1.json")[0];
    let inputs = base_inputs();
    let out = decided(decide(sig, &inputs));
    assert_decision(&out, Decision::Approved);
    let r = &out.record;
    // 10 × 893,600 / 500,000 = 17.872 → 17 (toward zero).
    assert_eq!(r.original_quantity, dec!(17));
    assert_eq!(r.final_quantity, dec!(17));
    assert_eq!(r.reason_code, "approved");
    let leg = &r.legs[0];
    assert_eq!(leg.sender_quantity, dec!(10));
    assert_eq!(leg.margin_required, dec!(637.50));
    assert_eq!(leg.notional, dec!(2550));
    let ra = &r.risk_assessment;
    assert_eq!(ra.allocated_capital, Some(dec!(893600)));
    assert_eq!(ra.available_capital, Some(dec!(893600)));
    assert_eq!(ra.scale_factor, Some(dec!(1.7872)));
    assert_eq!(ra.shrink_factor, Some(Decimal::ONE));
    assert_eq!(ra.margin_required, Some(dec!(637.50)));
    assert_eq!(ra.portfolio_margin_before, Some(dec!(0)));
    assert_eq!(ra.portfolio_margin_after, Some(dec!(637.50)));
    assert_eq!(ra.margin_utilization_pct, Some(dec!(0.06375)));
    assert_eq!(ra.leverage_after, Some(dec!(0.00255)));
    assert!(ra.slippage.as_ref().unwrap().evaluated);

    assert_eq!(out.orders.len(), 1);
    let o = &out.orders[0];
    assert_eq!(o.order_id, order_id(&sig.signal_id, 0));
    assert_eq!(o.signal_id, sig.signal_id);
    assert_eq!(o.account, ACCOUNT);
    assert_eq!(o.status, OrderStatus::Pending);
    assert_eq!(
        (o.action, o.side, o.direction),
        (SignalAction::Entry, Side::Buy, Direction::Long)
    );
    assert_eq!(o.order_type, OrderType::Market);
    assert_eq!(o.price, Some(dec!(150)));
    assert_eq!(o.quantity, dec!(17));
    assert_eq!(o.multiplier, Decimal::ONE);
    let cd = o.cerebro_decision.as_ref().unwrap();
    assert_eq!(cd.allocated_capital, dec!(893600));
    assert_eq!(cd.margin_required, dec!(637.50));
    assert!(
        cd.position_size_logic.contains("17.872"),
        "{}",
        cd.position_size_logic
    );
    assert_eq!(out.reservation.margin, dec!(637.50));
    assert_eq!(out.reservation.notional, dec!(2550));

    // Same inputs, same output (deterministic ids and numbers).
    assert_eq!(decided(decide(sig, &inputs)), out);
}

#[test]
fn decision_record_serializes_seed_fields() {
    let sig = &fixture("equity_simple_signal_1.json")[0];
    let out = decided(decide(sig, &base_inputs()));
    let v = serde_json::to_value(&out.record).unwrap();
    assert_eq!(v["decision"], "APPROVED");
    assert_eq!(v["original_quantity"], "17");
    assert_eq!(v["final_quantity"], "17");
    for k in [
        "portfolio_margin_before",
        "portfolio_margin_after",
        "margin_utilization_pct",
        "cvar_contribution",
        "correlation_impact",
    ] {
        assert!(v["risk_assessment"].get(k).is_some(), "missing {k}");
    }
    assert_eq!(v["risk_assessment"]["portfolio_margin_after"], "637.50");
    let o = serde_json::to_value(&out.orders[0]).unwrap();
    assert_eq!(o["cerebro_decision"]["margin_required"], "637.50");
    assert_eq!(o["status"], "PENDING");
}

#[test]
fn pairs_legs_are_sized_together() {
    let sig = &fixture("equity_pairs_signal_1.json")[0];
    let out = decided(decide(sig, &base_inputs()));
    assert_decision(&out, Decision::Approved);
    let legs = &out.record.legs;
    assert_eq!(legs.len(), 2);
    // Both legs: 10 × 1.7872 = 17.872 → 17.
    assert_eq!(
        (legs[0].instrument.as_str(), legs[0].final_quantity),
        ("AAPL", dec!(17))
    );
    assert_eq!(
        (legs[1].instrument.as_str(), legs[1].final_quantity),
        ("NVDA", dec!(17))
    );
    assert_eq!(legs[0].margin_required, dec!(637.50));
    assert_eq!(legs[1].margin_required, dec!(2125));
    assert_eq!(
        out.record.risk_assessment.margin_required,
        Some(dec!(2762.50))
    );
    assert_eq!(out.orders.len(), 2);
    assert_eq!(out.orders[0].order_id, order_id(&sig.signal_id, 0));
    assert_eq!(out.orders[1].order_id, order_id(&sig.signal_id, 1));
    assert_eq!(
        (out.orders[1].side, out.orders[1].direction),
        (Side::Sell, Direction::Short)
    );
    assert_eq!(out.orders[1].leg, 1);
    assert_eq!(out.reservation.notional, dec!(11050));
}

#[test]
fn pairs_shrink_by_one_common_factor() {
    // FIXED_UNITS 10 / 10 and a max position of 4,000: NVDA (5,000) binds at
    // 0.8, so both legs go to 8 — the pair keeps its ratio.
    let mut sig = fixture("equity_pairs_signal_1.json")[0].clone();
    sig.sizing_mode = SizingMode::FixedUnits;
    let mut inputs = base_inputs();
    limits(&mut inputs).max_position_size = Some(dec!(4000));
    let out = decided(decide(&sig, &inputs));
    assert_decision(&out, Decision::Modified);
    assert_eq!(out.record.risk_assessment.shrink_factor, Some(dec!(0.8)));
    let q: Vec<_> = out.orders.iter().map(|o| o.quantity).collect();
    assert_eq!(q, vec![dec!(8), dec!(8)]);
    assert_eq!(out.record.original_quantity, dec!(10));
    assert_eq!(out.record.final_quantity, dec!(8));
}

#[test]
fn gc_futures_use_the_contract_multiplier() {
    let sig = &fixture("futures_gold_simple_signal_1.json")[0];
    let out = decided(decide(sig, &base_inputs()));
    assert_decision(&out, Decision::Approved);
    let o = &out.orders[0];
    // 5 × 1.7872 = 8.936 → 8 contracts; margin 8 × 16,500; notional 8 × 4029 × 100.
    assert_eq!(o.quantity, dec!(8));
    assert_eq!(o.multiplier, dec!(100));
    assert_eq!(
        o.cerebro_decision.as_ref().unwrap().margin_required,
        dec!(132000)
    );
    assert_eq!(out.record.legs[0].notional, dec!(3223200));
    assert_eq!(
        out.record.risk_assessment.leverage_after,
        Some(dec!(3.2232))
    );
    // The contract expiry is recorded, not used as the order's good-till.
    assert_eq!(o.expiry, None);
    assert_eq!(
        o.cerebro_decision.as_ref().unwrap().risk_metrics["contract_expiry"],
        "2025-12-29T00:00:00Z"
    );
}

#[test]
fn hg_copper_multiplier_25000() {
    let sig = &fixture("futures_copper_simple_signal_1.json")[0];
    let out = decided(decide(sig, &base_inputs()));
    assert_decision(&out, Decision::Approved);
    // 3 × 1.7872 = 5.3616 → 5; notional 5 × 4.25 × 25,000; margin 5 × 8,000.
    assert_eq!(out.orders[0].quantity, dec!(5));
    assert_eq!(out.orders[0].multiplier, dec!(25000));
    assert_eq!(out.record.legs[0].notional, dec!(531250));
    assert_eq!(out.record.legs[0].margin_required, dec!(40000));
}

#[test]
fn btc_is_sized_to_8_decimals() {
    let sig = &fixture("crypto_btc_simple_signal_1.json")[0];
    let out = decided(decide(sig, &base_inputs()));
    assert_decision(&out, Decision::Approved);
    // 0.5 × 1.7872 = 0.8936; margin 50 % of 0.8936 × 95,000.
    assert_eq!(out.orders[0].quantity, dec!(0.8936));
    assert_eq!(out.record.legs[0].margin_required, dec!(42446));

    // Sender equity 300,000: 0.5 × 893,600 / 300,000 = 1.48933333… → 1.48933333.
    let mut sig = sig.clone();
    sig.account_equity = Some(dec!(300000));
    let out = decided(decide(&sig, &base_inputs()));
    assert_eq!(out.orders[0].quantity, dec!(1.48933333));
    assert_eq!(out.record.legs[0].lot_size, dec!(0.00000001));
    assert_eq!(out.record.legs[0].margin_required, dec!(70743.333175));
}

#[test]
fn forex_entry_is_sized() {
    let sig = &fixture("forex_simple_signal_1.json")[0];
    assert_eq!(sig.strategy_id, "Forex");
    let out = decided(decide(sig, &base_inputs()));
    assert_decision(&out, Decision::Approved);
    // Allocated 30.2 % = 302,000: 100,000 × 302,000 / 500,000 = 60,400 units;
    // margin 2 % of 60,400 × 0.9123.
    assert_eq!(out.orders[0].quantity, dec!(60400));
    assert_eq!(out.orders[0].instrument, "AUDCAD");
    assert_eq!(out.record.legs[0].margin_required, dec!(1102.0584));
}

#[test]
fn option_entry_is_sized() {
    let mut sig = fixture("equity_simple_signal_1.json")[0].clone();
    let leg = &mut sig.legs[0];
    leg.instrument = "SPY".into();
    leg.instrument_type = InstrumentType::Option;
    leg.quantity = dec!(2);
    leg.price = Some(dec!(4.50));
    let out = decided(decide(&sig, &base_inputs()));
    assert_decision(&out, Decision::Approved);
    // 2 × 1.7872 = 3.5744 → 3 contracts × 100; premium 3 × 4.50 × 100 paid in full.
    assert_eq!(out.orders[0].quantity, dec!(3));
    assert_eq!(out.orders[0].multiplier, dec!(100));
    assert_eq!(out.record.legs[0].margin_required, dec!(1350));
}

#[test]
fn target_weight_095_is_sized_in_shares() {
    let mut sig = fixture("equity_simple_signal_1.json")[0].clone();
    sig.sizing_mode = SizingMode::TargetWeight;
    sig.legs[0].quantity = dec!(0.95);
    sig.quantity = dec!(0.95);
    let out = decided(decide(&sig, &base_inputs()));
    assert_decision(&out, Decision::Approved);
    // 0.95 × 893,600 / 150 = 5,659.466… → 5,659 shares; margin 25 % of 5,659 × 150.
    assert_eq!(out.orders[0].quantity, dec!(5659));
    assert_eq!(out.record.legs[0].margin_required, dec!(212212.50));
    assert_eq!(out.record.risk_assessment.scale_factor, None);
}

#[test]
fn limit_orders_carry_their_limit_price() {
    let mut sig = fixture("equity_simple_signal_1.json")[0].clone();
    sig.legs[0].order_type = OrderType::Limit;
    sig.legs[0].price = Some(dec!(149.5));
    let mut inputs = base_inputs();
    inputs.marks.insert(
        "AAPL".into(),
        Mark {
            price: dec!(149.8),
            at: inputs.now - Duration::seconds(1),
        },
    );
    let out = decided(decide(&sig, &inputs));
    assert_decision(&out, Decision::Approved);
    assert_eq!(out.orders[0].order_type, OrderType::Limit);
    assert_eq!(out.orders[0].price, Some(dec!(149.5)));
    // Sized and margined at the limit price: 17 × 149.5 × 25 %.
    assert_eq!(out.record.legs[0].margin_required, dec!(635.375));
}

#[test]
fn market_orders_price_at_a_fresh_mark() {
    let sig = &fixture("equity_simple_signal_1.json")[0];
    let mut inputs = base_inputs();
    inputs.marks.insert(
        "AAPL".into(),
        Mark {
            price: dec!(149),
            at: inputs.now,
        },
    );
    let out = decided(decide(sig, &inputs));
    assert_eq!(out.orders[0].price, Some(dec!(149)));
    assert_eq!(out.record.legs[0].margin_required, dec!(633.25));
    // A stale mark is ignored, to the millisecond: the default limit is
    // 900 s.
    let max = Duration::seconds(inputs.system.mark_max_age_secs);
    inputs.marks.get_mut("AAPL").unwrap().at = inputs.now - max;
    assert_eq!(
        decided(decide(sig, &inputs)).orders[0].price,
        Some(dec!(149))
    );
    inputs.marks.get_mut("AAPL").unwrap().at = inputs.now - max - Duration::milliseconds(1);
    assert_eq!(
        decided(decide(sig, &inputs)).orders[0].price,
        Some(dec!(150))
    );
    inputs.marks.get_mut("AAPL").unwrap().at = inputs.now - Duration::hours(1);
    let out = decided(decide(sig, &inputs));
    assert_eq!(out.orders[0].price, Some(dec!(150)));
}

#[test]
fn ladder_entries_shrink_as_capital_is_deployed() {
    // After the first entry books 637.50 of margin, available is 892,962.50:
    // 7 × 892,962.50 / 500,000 = 12.5014… → 12.
    let sigs = fixture("equity_ladder_signal_1.json");
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(17),
        dec!(150),
        dec!(637.50),
    );
    let out = decided(decide(&sigs[1], &inputs));
    assert_eq!(
        out.record.risk_assessment.available_capital,
        Some(dec!(892962.50))
    );
    assert_eq!(out.orders[0].quantity, dec!(12));
}
