//! One test per file in `tests/fixtures/signals/` (copies of the shared sender
//! fixtures), sent as the sender tool sends them, asserting the standardized
//! fields of every signal.

mod common;

use common::*;
use mtx_schemas::enums::{
    Direction, InstrumentType, OrderType, Side, SignalAction, SignalType, SizingMode,
};
use mtx_schemas::ids;
use mtx_schemas::signal::StandardizedSignal;
use mtx_standardizer::{parse_raw, SignalError};

use Direction::{Long, Short};
use InstrumentType::{Crypto, Forex, Future, Stock};
use Side::{Buy, Sell};

struct LegExp {
    instrument: &'static str,
    instrument_type: InstrumentType,
    side: Side,
    direction: Direction,
    quantity: &'static str,
    price: &'static str,
}

fn leg(
    instrument: &'static str,
    instrument_type: InstrumentType,
    side: Side,
    direction: Direction,
    quantity: &'static str,
    price: &'static str,
) -> LegExp {
    LegExp {
        instrument,
        instrument_type,
        side,
        direction,
        quantity,
        price,
    }
}

struct Exp {
    signal_type: SignalType,
    /// Index (in the file) of the entry this signal links to.
    entry: Option<usize>,
    legs: Vec<LegExp>,
    warnings: usize,
}

fn entry(legs: Vec<LegExp>) -> Exp {
    Exp {
        signal_type: SignalType::Entry,
        entry: None,
        legs,
        warnings: 0,
    }
}

fn exit(entry: usize, legs: Vec<LegExp>) -> Exp {
    Exp {
        signal_type: SignalType::Exit,
        entry: Some(entry),
        legs,
        warnings: 0,
    }
}

fn cancel(entry: usize, legs: Vec<LegExp>) -> Exp {
    Exp {
        signal_type: SignalType::Cancel,
        entry: Some(entry),
        legs,
        warnings: 0,
    }
}

/// Send every signal of `file`, check each against `expected`, return them.
fn check_file(file: &str, expected: &[Exp]) -> Vec<StandardizedSignal> {
    check_file_in(file, expected, &mm_ctx())
}

fn check_file_in(
    file: &str,
    expected: &[Exp],
    ctx: &mtx_standardizer::ParseContext,
) -> Vec<StandardizedSignal> {
    let payloads = load_fixture(file);
    assert_eq!(payloads.len(), expected.len(), "{file}: signal count");
    let signals: Vec<StandardizedSignal> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| run(p, ctx).unwrap_or_else(|e| panic!("{file}[{i}]: {e}")))
        .collect();
    for (i, ((s, exp), payload)) in signals.iter().zip(expected).zip(&payloads).enumerate() {
        let at = format!("{file}[{i}]");
        let sender_id = payload["signalID"].as_str().unwrap();
        let strategy = payload["strategy_name"].as_str().unwrap();
        assert_eq!(s.sender_signal_id, sender_id, "{at}");
        assert_eq!(
            s.signal_id,
            ids::signal_id("mathematricks", strategy, sender_id),
            "{at}"
        );
        assert_eq!(s.strategy_id, strategy, "{at}");
        assert_eq!(s.signal_type, Some(exp.signal_type), "{at}");
        let action = match exp.signal_type {
            SignalType::Entry | SignalType::ScaleIn => Some(SignalAction::Entry),
            SignalType::Exit | SignalType::ScaleOut => Some(SignalAction::Exit),
            SignalType::Cancel => None,
        };
        assert_eq!(s.action, action, "{at}");
        assert_eq!(
            s.entry_signal_id,
            exp.entry.map(|j| signals[j].signal_id.clone()),
            "{at}: entry link"
        );
        assert_eq!(
            s.sender_entry_signal_id.as_deref(),
            exp.entry.map(|j| signals[j].sender_signal_id.as_str()),
            "{at}"
        );
        assert_eq!(s.legs.len(), exp.legs.len(), "{at}: one signal, all legs");
        for (k, (got, want)) in s.legs.iter().zip(&exp.legs).enumerate() {
            let at = format!("{at}.legs[{k}]");
            assert_eq!(got.instrument, want.instrument, "{at}");
            assert_eq!(got.instrument_type, want.instrument_type, "{at}");
            assert_eq!(got.side, want.side, "{at}");
            assert_eq!(got.direction, want.direction, "{at}");
            assert_eq!(got.quantity, d(want.quantity), "{at}");
            assert_eq!(got.price, Some(d(want.price)), "{at}");
            assert_eq!(got.order_type, OrderType::Market, "{at}");
            assert_eq!((got.stop_loss, got.take_profit), (None, None), "{at}");
        }
        let lead = &s.legs[0];
        assert_eq!(
            (
                &s.instrument,
                s.instrument_type,
                s.direction,
                s.quantity,
                s.price,
                s.order_type,
                s.expiry
            ),
            (
                &lead.instrument,
                lead.instrument_type,
                lead.direction,
                lead.quantity,
                lead.price,
                lead.order_type,
                lead.expiry
            ),
            "{at}: top level describes the first leg"
        );
        assert_eq!(s.environment, ctx.environment, "{at}");
        assert_eq!(s.source, "mathematricks", "{at}");
        assert_eq!(s.account_equity, Some(d("500000")), "{at}");
        assert_eq!(s.sizing_mode, SizingMode::SenderEquityRatio, "{at}");
        assert_eq!(s.metadata.expected_alpha, Some(d("0.02")), "{at}");
        assert_eq!(
            s.metadata.warnings.len(),
            exp.warnings,
            "{at}: {:?}",
            s.metadata.warnings
        );
        assert_eq!(
            (s.signal_sent_at, s.timestamp, s.received_at),
            (None, received_at(), received_at()),
            "{at}"
        );
        assert!(!serde_json::to_string(s).unwrap().contains(SECRET), "{at}");
    }
    let mut ids: Vec<&str> = signals.iter().map(|s| s.signal_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), signals.len(), "{file}: distinct signal ids");
    signals
}

#[test]
fn fixture_dir_holds_the_fourteen_files() {
    let dir = fixture_path("");
    assert_eq!(std::fs::read_dir(dir).unwrap().count(), 14);
}

#[test]
fn crypto_btc_ladder() {
    let btc = |side, dir, q, p| leg("BTC", Crypto, side, dir, q, p);
    check_file(
        "crypto_btc_ladder_signal_1.json",
        &[
            entry(vec![btc(Buy, Long, "0.25", "94000")]),
            entry(vec![btc(Buy, Long, "0.35", "93500")]),
            entry(vec![btc(Buy, Long, "0.40", "93000")]),
            // EXIT legs are sent as SELL + SHORT: they close the LONG entries.
            exit(0, vec![btc(Sell, Long, "0.25", "96000")]),
            exit(1, vec![btc(Sell, Long, "0.35", "96500")]),
            exit(2, vec![btc(Sell, Long, "0.4", "97000")]),
        ],
    );
}

#[test]
fn crypto_btc_simple() {
    check_file(
        "crypto_btc_simple_signal_1.json",
        &[
            entry(vec![leg("BTC", Crypto, Buy, Long, "0.5", "95000")]),
            exit(0, vec![leg("BTC", Crypto, Sell, Long, "0.5", "96500")]),
        ],
    );
}

#[test]
fn equity_ladder() {
    let aapl = |side, dir, q, p| leg("AAPL", Stock, side, dir, q, p);
    check_file(
        "equity_ladder_signal_1.json",
        &[
            entry(vec![aapl(Buy, Long, "10", "150")]),
            entry(vec![aapl(Buy, Long, "7", "151")]),
            entry(vec![aapl(Buy, Long, "13", "152")]),
            exit(0, vec![aapl(Sell, Long, "5", "153")]),
            exit(1, vec![aapl(Sell, Long, "15", "154")]),
            exit(2, vec![aapl(Sell, Long, "10", "155")]),
        ],
    );
}

#[test]
fn equity_offmarket_cancel() {
    let signals = check_file(
        "equity_offmarket_signal_1.json",
        &[
            entry(vec![leg("AAPL", Stock, Buy, Long, "10", "150")]),
            // A CANCEL repeats the entry's legs: BUY → LONG like the entry.
            cancel(0, vec![leg("AAPL", Stock, Buy, Long, "10", "150")]),
        ],
    );
    assert_eq!(signals[1].action, None);
}

#[test]
fn equity_pairs_stay_one_signal_with_two_legs() {
    let signals = check_file(
        "equity_pairs_signal_1.json",
        &[
            entry(vec![
                leg("AAPL", Stock, Buy, Long, "10", "150"),
                leg("NVDA", Stock, Sell, Short, "10", "500"),
            ]),
            // Exit: sell the AAPL long, buy back the NVDA short.
            exit(
                0,
                vec![
                    leg("AAPL", Stock, Sell, Long, "10", "152"),
                    leg("NVDA", Stock, Buy, Short, "10", "505"),
                ],
            ),
        ],
    );
    assert_eq!(signals[0].instrument, "AAPL");
    assert_eq!(signals[1].direction, Long);
}

#[test]
fn equity_simple_short_action_wins_over_direction() {
    // The file sends ENTRY SELL marked LONG, and EXIT BUY marked SHORT. The
    // action is authoritative: a short entry, then a buy-to-cover of that SHORT.
    let signals = check_file(
        "equity_simple_short_signal_1.json",
        &[
            Exp {
                warnings: 1,
                ..entry(vec![leg("AAPL", Stock, Sell, Short, "10", "150")])
            },
            exit(0, vec![leg("AAPL", Stock, Buy, Short, "10", "152")]),
        ],
    );
    let warning = &signals[0].metadata.warnings[0];
    assert!(
        warning.starts_with("signal_legs[0].direction: LONG contradicts action SELL"),
        "{warning}"
    );
}

#[test]
fn equity_simple() {
    check_file(
        "equity_simple_signal_1.json",
        &[
            entry(vec![leg("AAPL", Stock, Buy, Long, "10", "150")]),
            exit(0, vec![leg("AAPL", Stock, Sell, Long, "10", "152")]),
        ],
    );
}

#[test]
fn forex_ladder() {
    let eur = |side, dir, q, p| leg("EURUSD", Forex, side, dir, q, p);
    let signals = check_file(
        "forex_ladder_signal_1.json",
        &[
            entry(vec![eur(Buy, Long, "20000", "1.085")]),
            entry(vec![eur(Buy, Long, "15000", "1.086")]),
            entry(vec![eur(Buy, Long, "25000", "1.087")]),
            exit(0, vec![eur(Sell, Long, "20000", "1.09")]),
            exit(1, vec![eur(Sell, Long, "15000", "1.091")]),
            exit(2, vec![eur(Sell, Long, "25000", "1.092")]),
        ],
    );
    // Exact decimals, normalised: 1.0850 is "1.085", never 1.0849999...
    let v = serde_json::to_value(&signals[0]).unwrap();
    assert_eq!(v["price"], "1.085");
    assert_eq!(v["legs"][0]["quantity"], "20000");
}

#[test]
fn forex_offmarket_cancel() {
    let signals = check_file(
        "forex_offmarket_signal_1.json",
        &[
            entry(vec![leg("AUDCAD", Forex, Buy, Long, "100000", "0.9123")]),
            cancel(0, vec![leg("AUDCAD", Forex, Buy, Long, "100000", "0.9123")]),
        ],
    );
    assert_eq!(signals[0].strategy_id, "Forex");
}

#[test]
fn forex_simple_previous_link() {
    // The exit links with `$PREVIOUS`, which the sender resolves to the entry's id.
    check_file(
        "forex_simple_signal_1.json",
        &[
            entry(vec![leg("AUDCAD", Forex, Buy, Long, "100000", "0.9123")]),
            exit(
                0,
                vec![leg("AUDCAD", Forex, Sell, Long, "100000", "0.9145")],
            ),
        ],
    );
}

fn lenient_futures_ctx() -> mtx_standardizer::ParseContext {
    mtx_standardizer::ParseContext {
        require_future_expiry: false,
        ..mm_ctx()
    }
}

/// The copper files carry no `expiry`: rejected under the default (strict)
/// context, accepted with `expiry: None` (front month, for the executor to
/// resolve) when the route allows it.
fn check_copper(file: &str, second: Exp) {
    for (i, payload) in load_fixture(file).iter().enumerate() {
        let err = parse_raw(payload, &mm_ctx()).unwrap_err();
        assert_eq!(err.reason_code(), "future_without_expiry", "{file}[{i}]");
        assert_eq!(err.field(), "signal_legs[0].expiry");
        assert!(err.to_string().contains("HG"), "{err}");
    }
    let signals = check_file_in(
        file,
        &[
            entry(vec![leg("HG", Future, Buy, Long, "3", "4.25")]),
            second,
        ],
        &lenient_futures_ctx(),
    );
    assert!(signals
        .iter()
        .all(|s| s.expiry.is_none() && s.legs[0].exchange.is_none()));
}

#[test]
fn futures_copper_offmarket() {
    check_copper(
        "futures_copper_offmarket_signal_1.json",
        cancel(0, vec![leg("HG", Future, Buy, Long, "3", "4.25")]),
    );
}

#[test]
fn futures_copper_simple() {
    check_copper(
        "futures_copper_simple_signal_1.json",
        exit(0, vec![leg("HG", Future, Sell, Long, "3", "4.35")]),
    );
}

fn check_gold(signals: &[StandardizedSignal], ids: [&str; 2]) {
    let expiry = chrono::DateTime::parse_from_rfc3339("2025-12-29T00:00:00Z").unwrap();
    for (s, id) in signals.iter().zip(ids) {
        assert_eq!(s.sender_signal_id, id);
        assert_eq!(s.expiry, Some(expiry.into()));
        assert_eq!(s.legs[0].expiry, Some(expiry.into()));
        assert_eq!(s.legs[0].exchange.as_deref(), Some("COMEX"));
    }
    assert_eq!(signals[1].sender_entry_signal_id.as_deref(), Some(ids[0]));
    assert_eq!(
        signals[1].entry_signal_id.as_deref(),
        Some(signals[0].signal_id.as_str())
    );
    let v = serde_json::to_value(&signals[0]).unwrap();
    assert_eq!(v["expiry"], "2025-12-29T00:00:00Z");
}

#[test]
fn futures_gold_offmarket() {
    let signals = check_file(
        "futures_gold_offmarket_signal_1.json",
        &[
            entry(vec![leg("GC", Future, Buy, Long, "5", "4029")]),
            cancel(0, vec![leg("GC", Future, Buy, Long, "5", "4029")]),
        ],
    );
    check_gold(
        &signals,
        ["GC_OFFMARKET_ENTRY_001", "GC_OFFMARKET_CANCEL_001"],
    );
}

#[test]
fn futures_gold_simple() {
    let signals = check_file(
        "futures_gold_simple_signal_1.json",
        &[
            entry(vec![leg("GC", Future, Buy, Long, "5", "4029")]),
            exit(0, vec![leg("GC", Future, Sell, Long, "5", "4041")]),
        ],
    );
    check_gold(&signals, ["GC_ENTRY_001", "GC_EXIT_001"]);
    assert_eq!(
        signals[0].signal_id,
        ids::signal_id("mathematricks", "SPX_1-D_Opt", "GC_ENTRY_001")
    );
}

#[test]
fn fixture_signals_without_ids_need_a_sender_or_fallback_id() {
    let text = std::fs::read_to_string(fixture_path("equity_simple_signal_1.json")).unwrap();
    let raw: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let err = parse_raw(&raw[0], &mm_ctx()).unwrap_err();
    assert_eq!(err.reason_code(), "missing_field");
    assert_eq!(err.field(), "signalID");
    let with_fallback = mtx_standardizer::ParseContext {
        fallback_signal_id: Some("gw-1".into()),
        ..mm_ctx()
    };
    let parsed = parse_raw(&raw[0], &with_fallback).unwrap();
    assert_eq!(parsed.sender_signal_id(), "gw-1");
    assert!(matches!(
        parse_raw(&raw[0], &mm_ctx()),
        Err(SignalError::MissingField { .. })
    ));
}
