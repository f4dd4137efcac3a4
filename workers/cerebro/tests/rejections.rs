//! One test per rejection (or shrink) reason, asserting the reason and the
//! numbers it carries.

mod common;

use chrono::Duration;
use common::*;
use mtx_cerebro::{decide, Decided, Inputs, Mark, Reason, Reservation};
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::{Decision, Direction, InstrumentType, SizingMode, StrategyStatus};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

fn aapl() -> StandardizedSignal {
    fixture("equity_simple_signal_1.json")[0].clone()
}

/// AAPL 10 @ 150 as FIXED_UNITS: margin 375, notional 1,500.
fn aapl_fixed() -> StandardizedSignal {
    let mut s = aapl();
    s.sizing_mode = SizingMode::FixedUnits;
    s
}

fn rejected(sig: &StandardizedSignal, inputs: &Inputs) -> (Reason, Decided) {
    let out = decided(decide(sig, inputs));
    assert_decision(&out, Decision::Rejected);
    assert!(out.orders.is_empty());
    assert_eq!(out.record.final_quantity, Decimal::ZERO);
    assert_eq!(out.reservation, Reservation::default());
    let r = out.record.reason_detail.clone().expect("typed reason");
    assert_eq!(out.record.reason, r.to_string());
    assert_eq!(out.record.reason_code, r.code());
    (r, out)
}

fn modified(sig: &StandardizedSignal, inputs: &Inputs) -> (Reason, Decided) {
    let out = decided(decide(sig, inputs));
    assert_decision(&out, Decision::Modified);
    (out.record.reason_detail.clone().expect("typed reason"), out)
}

#[test]
fn kill_switch() {
    let mut inputs = base_inputs();
    inputs.system.trading_enabled = false;
    assert_eq!(rejected(&aapl(), &inputs).0, Reason::KillSwitch);
}

#[test]
fn strategy_unknown() {
    let mut inputs = base_inputs();
    inputs.strategies.remove(SPX);
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::StrategyUnknown {
            strategy_id: SPX.into()
        }
    );
}

#[test]
fn strategy_inactive_but_testing_trades() {
    let mut inputs = base_inputs();
    inputs.strategies.get_mut(SPX).unwrap().status = StrategyStatus::Inactive;
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::StrategyNotTradable {
            strategy_id: SPX.into(),
            status: StrategyStatus::Inactive
        }
    );
    inputs.strategies.get_mut(SPX).unwrap().status = StrategyStatus::Testing;
    assert_decision(&decided(decide(&aapl(), &inputs)), Decision::Approved);
}

#[test]
fn strategy_without_account() {
    let mut inputs = base_inputs();
    inputs.strategies.get_mut(SPX).unwrap().account = None;
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::NoAccount {
            strategy_id: SPX.into()
        }
    );
}

#[test]
fn no_allocation() {
    let mut inputs = base_inputs();
    inputs.allocation.as_mut().unwrap().allocations.remove(SPX);
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::NoAllocation {
            strategy_id: SPX.into(),
            allocation_pct: dec!(0)
        }
    );
    inputs.allocation = None;
    assert_eq!(rejected(&aapl(), &inputs).0.code(), "no_allocation");
}

#[test]
fn account_state_missing() {
    let mut inputs = base_inputs();
    inputs.accounts.clear();
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::AccountStateMissing {
            account: ACCOUNT.into()
        }
    );
}

#[test]
fn non_positive_equity() {
    let mut inputs = base_inputs();
    acct(&mut inputs).state.equity = dec!(-5);
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::NonPositiveEquity {
            account: ACCOUNT.into(),
            equity: dec!(-5)
        }
    );
}

#[test]
fn max_daily_loss_reached() {
    let mut inputs = base_inputs();
    limits(&mut inputs).max_daily_loss = Some(dec!(5000));
    acct(&mut inputs)
        .pnl_today
        .insert(SPX.into(), dec!(-4999.99));
    assert_decision(&decided(decide(&aapl(), &inputs)), Decision::Approved);
    acct(&mut inputs).pnl_today.insert(SPX.into(), dec!(-5000));
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::DailyLossLimit {
            limit: dec!(5000),
            actual: dec!(5000)
        }
    );
}

#[test]
fn missing_price() {
    let mut sig = aapl();
    sig.legs[0].price = None;
    let mut inputs = base_inputs();
    assert_eq!(
        rejected(&sig, &inputs).0,
        Reason::MissingPrice {
            leg: 0,
            instrument: "AAPL".into()
        }
    );
    // A fresh mark prices it.
    inputs.marks.insert(
        "AAPL".into(),
        Mark {
            price: dec!(150),
            at: inputs.now,
        },
    );
    assert_eq!(decided(decide(&sig, &inputs)).orders[0].quantity, dec!(17));
}

#[test]
fn missing_instrument_spec_for_an_unconfigured_future() {
    let mut sig = fixture("futures_gold_simple_signal_1.json")[0].clone();
    sig.legs[0].instrument = "ZZ".into();
    let (r, _) = rejected(&sig, &base_inputs());
    assert_eq!(
        r,
        Reason::MissingInstrumentSpec {
            leg: 0,
            instrument: "ZZ".into(),
            instrument_type: InstrumentType::Future
        }
    );
}

#[test]
fn missing_sender_equity() {
    let mut sig = aapl();
    sig.account_equity = None;
    assert_eq!(
        rejected(&sig, &base_inputs()).0,
        Reason::MissingSenderEquity
    );
}

#[test]
fn slippage_from_price_drift() {
    // Decided at the signal's own time (no delay); the mark moved 150 → 151
    // against a BUY: drift 1/150 = 0.00667 > 30 % × 0.02 = 0.006.
    let sig = aapl();
    let mut inputs = base_inputs();
    inputs.now = sig.timestamp;
    inputs.marks.insert(
        "AAPL".into(),
        Mark {
            price: dec!(151),
            at: inputs.now,
        },
    );
    let (r, out) = rejected(&sig, &inputs);
    assert_eq!(
        r,
        Reason::Slippage {
            limit: dec!(0.006),
            actual: dec!(1) / dec!(150),
            fraction: dec!(0.30),
            expected_alpha: dec!(0.02),
            delay_secs: dec!(0),
            price_drift: dec!(1) / dec!(150),
        }
    );
    let s = out.record.risk_assessment.slippage.unwrap();
    assert_eq!((s.legs_with_mark, s.alpha_lost_to_delay), (1, dec!(0)));
    // A mark that moved in the BUY's favour costs nothing.
    inputs.marks.get_mut("AAPL").unwrap().price = dec!(149);
    assert_decision(&decided(decide(&sig, &inputs)), Decision::Approved);
    // 0.80 up is 0.00533 < 0.006: allowed.
    inputs.marks.get_mut("AAPL").unwrap().price = dec!(150.80);
    assert_decision(&decided(decide(&sig, &inputs)), Decision::Approved);
}

#[test]
fn slippage_from_delay() {
    // 8 h late on a one-day horizon: 0.02 × 28,800 / 86,400 = 0.00667 > 0.006.
    let sig = aapl();
    let mut inputs = base_inputs();
    inputs.now = sig.timestamp + Duration::hours(8);
    let (r, _) = rejected(&sig, &inputs);
    let Reason::Slippage {
        limit,
        actual,
        delay_secs,
        price_drift,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(limit, dec!(0.006));
    assert_eq!(delay_secs, dec!(28800));
    assert_eq!(price_drift, dec!(0));
    assert_eq!(actual, dec!(0.02) * (dec!(28800) / dec!(86400)));
    // 7 h is 0.00583: allowed.
    inputs.now = sig.timestamp + Duration::hours(7);
    assert_decision(&decided(decide(&sig, &inputs)), Decision::Approved);
}

#[test]
fn no_capital_available() {
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "SPY",
        Direction::Long,
        dec!(5000),
        dec!(600),
        dec!(893600),
    );
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::NoCapitalAvailable {
            strategy_id: SPX.into(),
            allocated: dec!(893600),
            deployed: dec!(893600),
            reserved: dec!(0)
        }
    );
}

#[test]
fn leg_rounds_to_zero() {
    // 10 × 893,600 / 100,000,000 = 0.08936 → 0 shares.
    let mut sig = aapl();
    sig.account_equity = Some(dec!(100000000));
    assert_eq!(
        rejected(&sig, &base_inputs()).0,
        Reason::LegRoundsToZero {
            leg: 0,
            instrument: "AAPL".into(),
            quantity: dec!(0.08936),
            lot_size: dec!(1)
        }
    );
}

#[test]
fn already_at_target_weight() {
    let mut sig = aapl();
    sig.sizing_mode = SizingMode::TargetWeight;
    sig.legs[0].quantity = dec!(0.01); // 0.01 × 893,600 / 150 = 59.573… shares
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(60),
        dec!(150),
        dec!(2250),
    );
    let (r, _) = rejected(&sig, &inputs);
    let Reason::AlreadyAtTarget { target, held, .. } = r else {
        panic!("{r:?}")
    };
    assert_eq!(held, dec!(60));
    assert_eq!(target, dec!(0.01) * dec!(893600) / dec!(150));
    // Holding 50, it buys the 9 missing shares.
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(50),
        dec!(150),
        dec!(1875),
    );
    assert_eq!(decided(decide(&sig, &inputs)).orders[0].quantity, dec!(9));
}

#[test]
fn strategy_capital_shrinks_then_rejects() {
    let mut inputs = base_inputs();
    inputs.system.max_margin_utilization_pct = dec!(100);
    // Deployed 893,300 → available 300 < margin 375: × 0.8 → 8 shares.
    hold(
        &mut inputs,
        SPX,
        "SPY",
        Direction::Long,
        dec!(1),
        dec!(1),
        dec!(893300),
    );
    let (r, out) = modified(&aapl_fixed(), &inputs);
    assert_eq!(
        r,
        Reason::StrategyCapital {
            required: dec!(375),
            available: dec!(300)
        }
    );
    assert_eq!(
        (out.record.original_quantity, out.record.final_quantity),
        (dec!(10), dec!(8))
    );
    assert_eq!(
        out.record.risk_assessment.binding_limit.as_deref(),
        Some("strategy_capital")
    );
    assert_eq!(out.orders[0].quantity, dec!(8));
    assert_eq!(out.reservation.margin, dec!(300));
    // Available 30: × 0.08 → 0.8 shares → rejected with the same reason.
    inputs.accounts = base_inputs().accounts;
    hold(
        &mut inputs,
        SPX,
        "SPY",
        Direction::Long,
        dec!(1),
        dec!(1),
        dec!(893570),
    );
    assert_eq!(
        rejected(&aapl_fixed(), &inputs).0,
        Reason::StrategyCapital {
            required: dec!(375),
            available: dec!(30)
        }
    );
}

#[test]
fn reservations_count_against_capital() {
    // Another replica reserved 893,300 for this strategy: same as deployed.
    let mut inputs = base_inputs();
    inputs.system.max_margin_utilization_pct = dec!(100);
    acct(&mut inputs).reserved.insert(
        SPX.into(),
        Reservation {
            margin: dec!(893300),
            notional: dec!(0),
        },
    );
    let (r, _) = modified(&aapl_fixed(), &inputs);
    assert_eq!(r.code(), "strategy_capital");
}

#[test]
fn account_margin_shrinks_then_rejects() {
    // The broker reports only 200 available.
    let mut inputs = base_inputs();
    acct(&mut inputs).state.margin_available = dec!(200);
    let (r, out) = modified(&aapl_fixed(), &inputs);
    assert_eq!(
        r,
        Reason::AccountMargin {
            required: dec!(375),
            available: dec!(200)
        }
    );
    // 200 / 375 = 0.533… → 5 shares, margin 187.50 ≤ 200.
    assert_eq!(out.orders[0].quantity, dec!(5));
    acct(&mut inputs).state.margin_available = dec!(20);
    assert_eq!(
        rejected(&aapl_fixed(), &inputs).0,
        Reason::AccountMargin {
            required: dec!(375),
            available: dec!(20)
        }
    );
}

#[test]
fn margin_utilisation_cap_shrinks_then_rejects() {
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        "Forex",
        "EURUSD",
        Direction::Long,
        dec!(1),
        dec!(1),
        dec!(799800),
    );
    // Room under 80 %: 800,000 − 799,800 = 200.
    let (r, out) = modified(&aapl_fixed(), &inputs);
    assert_eq!(
        r,
        Reason::MarginUtilisation {
            limit_pct: dec!(80),
            actual_pct: dec!(80.0175)
        }
    );
    assert_eq!(out.orders[0].quantity, dec!(5));
    let mut inputs = base_inputs();
    hold(
        &mut inputs,
        "Forex",
        "EURUSD",
        Direction::Long,
        dec!(1),
        dec!(1),
        dec!(800000),
    );
    assert_eq!(
        rejected(&aapl_fixed(), &inputs).0,
        Reason::MarginUtilisation {
            limit_pct: dec!(80),
            actual_pct: dec!(80.0375)
        }
    );
}

#[test]
fn max_leverage_global_shrinks_then_rejects() {
    let mut inputs = base_inputs();
    inputs.system.max_leverage_global = dec!(1);
    // Another strategy holds 999,000 of notional.
    hold(
        &mut inputs,
        "Forex",
        "SPY",
        Direction::Long,
        dec!(1000),
        dec!(999),
        dec!(1),
    );
    let (r, out) = modified(&aapl_fixed(), &inputs);
    assert_eq!(
        r,
        Reason::MaxLeverage {
            limit: dec!(1),
            actual: dec!(1.0005)
        }
    );
    // Room 1,000 / 1,500 → 6 shares (900).
    assert_eq!(out.orders[0].quantity, dec!(6));
    assert_eq!(
        out.record.risk_assessment.gross_exposure_after,
        Some(dec!(999900))
    );
    inputs.system.max_leverage_global = dec!(0.999);
    assert_eq!(
        rejected(&aapl_fixed(), &inputs).0,
        Reason::MaxLeverage {
            limit: dec!(0.999),
            actual: dec!(1.0005)
        }
    );
}

#[test]
fn max_position_size_shrinks_then_rejects() {
    let mut inputs = base_inputs();
    limits(&mut inputs).max_position_size = Some(dec!(1000));
    let (r, out) = modified(&aapl_fixed(), &inputs);
    assert_eq!(
        r,
        Reason::MaxPositionSize {
            leg: 0,
            instrument: "AAPL".into(),
            limit: dec!(1000),
            actual: dec!(1500)
        }
    );
    assert_eq!(out.orders[0].quantity, dec!(6));
    // Already holding 1,000 of AAPL: no room.
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Long,
        dec!(10),
        dec!(100),
        dec!(250),
    );
    inputs.marks.insert(
        "AAPL".into(),
        Mark {
            price: dec!(150),
            at: inputs.now,
        },
    );
    let (r, _) = rejected(&aapl_fixed(), &inputs);
    // Held 10 at the 150 mark = 1,500, plus 1,500 new.
    assert_eq!(
        r,
        Reason::MaxPositionSize {
            leg: 0,
            instrument: "AAPL".into(),
            limit: dec!(1000),
            actual: dec!(3000)
        }
    );
}

#[test]
fn cvar_is_recorded_and_its_limit_rejects() {
    let sig = aapl();
    let mut inputs = base_inputs();
    inputs.returns = Some(returns_table());
    // The book already runs Com1-Met with 100,000 deployed.
    hold(
        &mut inputs,
        "Com1-Met",
        "HG",
        Direction::Long,
        dec!(1),
        dec!(4),
        dec!(100000),
    );
    let out = decided(decide(&sig, &inputs));
    assert_decision(&out, Decision::Approved);
    let ra = &out.record.risk_assessment;
    let cvar = ra.cvar.as_ref().expect("cvar evaluated");
    assert!(cvar.observations > 2000, "{}", cvar.observations);
    assert!(cvar.cvar_before > 0.0, "{cvar:?}");
    assert_eq!(
        ra.cvar_contribution,
        Some(cvar.cvar_after - cvar.cvar_before)
    );
    let corr = ra.correlation_impact.as_ref().unwrap();
    assert_eq!(corr.strategy_id, SPX);
    assert!(corr.with_strategies.contains_key("Com1-Met"));
    assert!(corr.with_portfolio.unwrap().abs() <= 1.0);
    assert_eq!(corr.weight_before_pct, 0.0);
    assert!((corr.weight_after_pct - 0.06375).abs() < 1e-12);

    // Independent check: alone, CVaR after = 637.50 × CVaR(SPX returns).
    let mut alone = base_inputs();
    alone.returns = Some(returns_table());
    let out1 = decided(decide(&sig, &alone));
    let c1 = out1.record.risk_assessment.cvar.unwrap();
    let col: Vec<f64> = alone
        .returns
        .as_ref()
        .unwrap()
        .column(SPX)
        .unwrap()
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .collect();
    let mut losses: Vec<f64> = col.iter().map(|r| -637.5 * r).collect();
    losses.sort_by(|a, b| b.total_cmp(a));
    let k = (0.05 * col.len() as f64 - 1e-9).ceil() as usize;
    let expect = losses[..k].iter().sum::<f64>() / k as f64;
    assert_eq!(c1.cvar_before, 0.0);
    assert!(
        (c1.cvar_after - expect).abs() < 1e-9,
        "{} vs {expect}",
        c1.cvar_after
    );

    // A limit below CVaR-after rejects with the numbers...
    alone.system.cvar_limit_pct = Some(0.0001);
    let (r, _) = rejected(&sig, &alone);
    let Reason::CvarLimit {
        limit_pct,
        actual_pct,
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(limit_pct, 0.0001);
    assert_eq!(actual_pct, c1.cvar_after_pct);
    // ...but a trade that lowers the book's CVaR is never rejected by it.
    inputs.system.cvar_limit_pct = Some(0.0001);
    let out = decided(decide(&sig, &inputs));
    let c = out.record.risk_assessment.cvar.as_ref().unwrap();
    if c.cvar_after <= c.cvar_before {
        assert_decision(&out, Decision::Approved);
    } else {
        assert_eq!(out.record.reason_code, "cvar_limit");
    }
}

#[test]
fn cvar_counts_margin_approved_but_not_yet_booked() {
    let sig = aapl();
    let mut alone = base_inputs();
    alone.returns = Some(returns_table());
    let c1 = decided(decide(&sig, &alone))
        .record
        .risk_assessment
        .cvar
        .unwrap();
    // The strategy has 6,375 of margin approved whose fills the account
    // state does not show yet: ten times this trade's 637.50. CVaR counts
    // it as deployed, as the capital and margin limits do.
    let mut inputs = base_inputs();
    inputs.returns = Some(returns_table());
    acct(&mut inputs).reserved.insert(
        SPX.into(),
        Reservation {
            margin: dec!(6375),
            notional: dec!(25500),
        },
    );
    let c = decided(decide(&sig, &inputs))
        .record
        .risk_assessment
        .cvar
        .unwrap();
    assert!(
        (c.cvar_before - 10.0 * c1.cvar_after).abs() < 1e-6,
        "{} vs {}",
        c.cvar_before,
        10.0 * c1.cvar_after
    );
    assert!((c.cvar_after - 11.0 * c1.cvar_after).abs() < 1e-6);
    // So a limit the trade alone passes can reject it on top of the
    // unbooked approvals.
    inputs.system.cvar_limit_pct = Some(c1.cvar_after_pct * 2.0);
    alone.system.cvar_limit_pct = Some(c1.cvar_after_pct * 2.0);
    assert_decision(&decided(decide(&sig, &alone)), Decision::Approved);
    assert_eq!(rejected(&sig, &inputs).0.code(), "cvar_limit");
}

#[test]
fn cvar_skipped_without_backtest_is_recorded() {
    let mut inputs = base_inputs();
    let out = decided(decide(&aapl(), &inputs));
    assert_eq!(
        out.record
            .risk_assessment
            .cvar_skipped
            .as_ref()
            .unwrap()
            .to_string(),
        "no backtest data loaded"
    );
    inputs.returns = Some(returns_table());
    let out = decided(decide(&fixture("forex_simple_signal_1.json")[0], &inputs));
    assert_eq!(
        serde_json::to_value(out.record.risk_assessment.cvar_skipped.unwrap()).unwrap()["code"],
        "no_backtest"
    );
}

#[test]
fn cvar_unavailable_is_recorded_with_its_reason_and_does_not_block() {
    let mut inputs = base_inputs();
    inputs.returns_unavailable = Some("mongo: connection refused".into());
    let out = decided(decide(&aapl(), &inputs));
    assert_decision(&out, Decision::Approved);
    let skip = out.record.risk_assessment.cvar_skipped.clone().unwrap();
    assert_eq!(
        skip,
        mtx_cerebro::CvarSkip::Unavailable {
            reason: "mongo: connection refused".into()
        }
    );
    let v = serde_json::to_value(&skip).unwrap();
    assert_eq!(v["code"], "unavailable");
    assert_eq!(v["reason"], "mongo: connection refused");
    assert_eq!(out.record.risk_assessment.cvar_contribution, None);
}

#[test]
fn reservation_backlog() {
    let mut inputs = base_inputs();
    acct(&mut inputs).max_in_flight = Some(3);
    acct(&mut inputs).in_flight = 2;
    assert_decision(&decided(decide(&aapl(), &inputs)), Decision::Approved);
    acct(&mut inputs).in_flight = 3;
    assert_eq!(
        rejected(&aapl(), &inputs).0,
        Reason::ReservationBacklog {
            account: ACCOUNT.into(),
            limit: 3,
            actual: 3
        }
    );
}

#[test]
fn absurd_numbers_reject_instead_of_panicking() {
    let mut sig = aapl_fixed();
    sig.legs[0].quantity = Decimal::MAX;
    sig.legs[0].price = Some(Decimal::MAX);
    assert_eq!(rejected(&sig, &base_inputs()).0.code(), "overflow");
}

#[test]
fn delta_order_mixing_close_and_open_is_rejected() {
    let mut sig = fixture("equity_pairs_signal_1.json")[0].clone();
    sig.signal_type = None;
    sig.action = None;
    let mut inputs = base_inputs();
    // Holds a SHORT AAPL (the BUY leg would close it) but nothing in NVDA.
    hold(
        &mut inputs,
        SPX,
        "AAPL",
        Direction::Short,
        dec!(5),
        dec!(150),
        dec!(187.5),
    );
    assert_eq!(rejected(&sig, &inputs).0, Reason::MixedDeltaLegs);
}
