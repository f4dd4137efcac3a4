//! Every sender fixture file through the whole ingress path: HTTP gateway →
//! `signals.raw` → standardizer → `signals.standardized`, one test per file,
//! asserting the standardized fields (legs, types, sides, links, strategy
//! configuration, provenance) and that the passphrase is nowhere on the bus.

mod common;

use common::*;
use mtx_harness::unique;
use mtx_schemas::headers;
use mtx_schemas::signal::StandardizedSignal;
use mtx_schemas::{
    Direction, Environment, InstrumentType, OrderType, Side, SignalAction, SignalType, SizingMode,
};
use mtx_subjects::topology::streams;
use rust_decimal::Decimal;
use std::str::FromStr;

/// One expected signal: `"<TYPE> <entry index|-> <leg> [| <leg>]"` with
/// `<leg>` = `<instrument> <side> <direction> <quantity> <price>`.
fn check(file: &str, expected: &[&str]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(check_async(file, expected));
}

fn instrument_type(symbol: &str) -> InstrumentType {
    match symbol {
        "BTC" => InstrumentType::Crypto,
        "AAPL" | "NVDA" => InstrumentType::Stock,
        "EURUSD" | "AUDCAD" => InstrumentType::Forex,
        "HG" | "GC" => InstrumentType::Future,
        other => panic!("no type for {other}"),
    }
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

async fn check_async(file: &str, expected: &[&str]) {
    // Copper senders omit `expiry`: this route lets the executor pick the front month.
    let s = Stack::start(|c| c.gateway.futures_front_month = true).await;
    let prefix = unique("fx");
    let bodies = load_fixture(file, &prefix);
    assert_eq!(bodies.len(), expected.len(), "{file}: element count");
    let mut accepted = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let (status, answer) = s.post("/v1/signals", body).await;
        assert_eq!(status, 202, "{file}[{i}]: {answer}");
        assert_eq!(answer["duplicate"], false);
        accepted.push(answer);
    }
    let signals: Vec<StandardizedSignal> = s.standardized(bodies.len()).await;
    assert_eq!(
        signals.len(),
        bodies.len(),
        "{file}: one standardized signal each"
    );
    let msgs = s.messages(streams::SIGNALS_STANDARDIZED).await;

    for (i, ((sig, exp), body)) in signals.iter().zip(expected).zip(&bodies).enumerate() {
        let at = format!("{file}[{i}]");
        let (head, legs) = exp.split_once(' ').unwrap();
        let (link, legs) = legs.split_once(' ').unwrap();
        let signal_type = SignalType::from_str(head).unwrap();
        assert_eq!(
            sig.signal_id, accepted[i]["signal_id"],
            "{at}: the id the gateway returned"
        );
        assert_eq!(sig.sender_signal_id, body["signalID"], "{at}");
        assert_eq!(
            sig.signal_id,
            mtx_schemas::ids::signal_id("mathematricks", &sig.strategy_id, &sig.sender_signal_id)
        );
        assert_eq!(sig.strategy_id, body["strategy_name"], "{at}");
        assert_eq!(sig.signal_type, Some(signal_type), "{at}");
        let action = match signal_type {
            SignalType::Entry | SignalType::ScaleIn => Some(SignalAction::Entry),
            SignalType::Exit | SignalType::ScaleOut => Some(SignalAction::Exit),
            SignalType::Cancel => None,
        };
        assert_eq!(sig.action, action, "{at}");
        match link {
            "-" => assert_eq!(sig.entry_signal_id, None, "{at}"),
            j => {
                let j: usize = j.parse().unwrap();
                assert_eq!(
                    sig.entry_signal_id.as_ref(),
                    Some(&signals[j].signal_id),
                    "{at}: link"
                );
                assert_eq!(
                    sig.sender_entry_signal_id.as_deref(),
                    Some(signals[j].sender_signal_id.as_str()),
                    "{at}"
                );
            }
        }
        let legs: Vec<&str> = legs.split(" | ").collect();
        assert_eq!(sig.legs.len(), legs.len(), "{at}: one signal, all legs");
        for (k, (got, want)) in sig.legs.iter().zip(&legs).enumerate() {
            let at = format!("{at}.legs[{k}]");
            let w: Vec<&str> = want.split(' ').collect();
            assert_eq!(got.instrument, w[0], "{at}");
            assert_eq!(got.instrument_type, instrument_type(w[0]), "{at}");
            assert_eq!(got.side, Side::from_str(w[1]).unwrap(), "{at}");
            assert_eq!(got.direction, Direction::from_str(w[2]).unwrap(), "{at}");
            assert_eq!(got.quantity, d(w[3]), "{at}");
            assert_eq!(got.price, Some(d(w[4])), "{at}");
            assert_eq!(got.order_type, OrderType::Market, "{at}");
            match w[0] {
                "GC" => assert_eq!(
                    got.expiry.map(|e| e.to_rfc3339()),
                    Some("2025-12-29T00:00:00+00:00".into()),
                    "{at}"
                ),
                "HG" => assert_eq!(got.expiry, None, "{at}: front month"),
                _ => {}
            }
        }
        let lead = &sig.legs[0];
        assert_eq!(
            (&sig.instrument, sig.direction, sig.quantity, sig.price),
            (&lead.instrument, lead.direction, lead.quantity, lead.price),
            "{at}: top level is the first leg"
        );
        let (mode, alpha) = match sig.strategy_id.as_str() {
            "Forex" => (SizingMode::TargetWeight, "0.01"),
            _ => (SizingMode::SenderEquityRatio, "0.02"),
        };
        assert_eq!(sig.sizing_mode, mode, "{at}: from the strategy config");
        assert_eq!(sig.metadata.expected_alpha, Some(d(alpha)), "{at}");
        assert_eq!(sig.environment, Environment::Staging, "{at}");
        assert_eq!(sig.source, "mathematricks", "{at}");
        assert_eq!(sig.account_equity, Some(d("500000")), "{at}");
        assert_eq!(
            sig.timestamp, sig.received_at,
            "{at}: no sender time in the files"
        );
        let m = &msgs[i];
        let h = m.headers.as_ref().unwrap();
        assert_eq!(h.get(headers::SIGNAL_ID).unwrap().as_str(), sig.signal_id);
        let nanos: i64 = h
            .get(headers::RECEIVED_AT)
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        assert_eq!(
            Some(nanos),
            sig.received_at.timestamp_nanos_opt(),
            "{at}: latency header"
        );
    }
    let raw = s.messages(streams::SIGNALS_RAW).await;
    assert_eq!(raw.len(), bodies.len());
    assert!(s.messages(streams::DLQ).await.is_empty());
    s.assert_secret_nowhere().await;
    s.stop().await;
}

#[test]
fn crypto_btc_ladder() {
    check(
        "crypto_btc_ladder_signal_1.json",
        &[
            "ENTRY - BTC BUY LONG 0.25 94000",
            "ENTRY - BTC BUY LONG 0.35 93500",
            "ENTRY - BTC BUY LONG 0.40 93000",
            "EXIT 0 BTC SELL LONG 0.25 96000",
            "EXIT 1 BTC SELL LONG 0.35 96500",
            "EXIT 2 BTC SELL LONG 0.4 97000",
        ],
    );
}

#[test]
fn crypto_btc_simple() {
    check(
        "crypto_btc_simple_signal_1.json",
        &[
            "ENTRY - BTC BUY LONG 0.5 95000",
            "EXIT 0 BTC SELL LONG 0.5 96500",
        ],
    );
}

#[test]
fn equity_ladder() {
    check(
        "equity_ladder_signal_1.json",
        &[
            "ENTRY - AAPL BUY LONG 10 150",
            "ENTRY - AAPL BUY LONG 7 151",
            "ENTRY - AAPL BUY LONG 13 152",
            "EXIT 0 AAPL SELL LONG 5 153",
            "EXIT 1 AAPL SELL LONG 15 154",
            "EXIT 2 AAPL SELL LONG 10 155",
        ],
    );
}

#[test]
fn equity_offmarket() {
    check(
        "equity_offmarket_signal_1.json",
        &[
            "ENTRY - AAPL BUY LONG 10 150",
            "CANCEL 0 AAPL BUY LONG 10 150",
        ],
    );
}

#[test]
fn equity_pairs() {
    check(
        "equity_pairs_signal_1.json",
        &[
            "ENTRY - AAPL BUY LONG 10 150 | NVDA SELL SHORT 10 500",
            "EXIT 0 AAPL SELL LONG 10 152 | NVDA BUY SHORT 10 505",
        ],
    );
}

#[test]
fn equity_simple_short() {
    check(
        "equity_simple_short_signal_1.json",
        &[
            "ENTRY - AAPL SELL SHORT 10 150",
            "EXIT 0 AAPL BUY SHORT 10 152",
        ],
    );
}

#[test]
fn equity_simple() {
    check(
        "equity_simple_signal_1.json",
        &[
            "ENTRY - AAPL BUY LONG 10 150",
            "EXIT 0 AAPL SELL LONG 10 152",
        ],
    );
}

#[test]
fn forex_ladder() {
    check(
        "forex_ladder_signal_1.json",
        &[
            "ENTRY - EURUSD BUY LONG 20000 1.085",
            "ENTRY - EURUSD BUY LONG 15000 1.086",
            "ENTRY - EURUSD BUY LONG 25000 1.087",
            "EXIT 0 EURUSD SELL LONG 20000 1.09",
            "EXIT 1 EURUSD SELL LONG 15000 1.091",
            "EXIT 2 EURUSD SELL LONG 25000 1.092",
        ],
    );
}

#[test]
fn forex_offmarket() {
    check(
        "forex_offmarket_signal_1.json",
        &[
            "ENTRY - AUDCAD BUY LONG 100000 0.9123",
            "CANCEL 0 AUDCAD BUY LONG 100000 0.9123",
        ],
    );
}

#[test]
fn forex_simple() {
    check(
        "forex_simple_signal_1.json",
        &[
            "ENTRY - AUDCAD BUY LONG 100000 0.9123",
            "EXIT 0 AUDCAD SELL LONG 100000 0.9145",
        ],
    );
}

#[test]
fn futures_copper_offmarket() {
    check(
        "futures_copper_offmarket_signal_1.json",
        &["ENTRY - HG BUY LONG 3 4.25", "CANCEL 0 HG BUY LONG 3 4.25"],
    );
}

#[test]
fn futures_copper_simple() {
    check(
        "futures_copper_simple_signal_1.json",
        &["ENTRY - HG BUY LONG 3 4.25", "EXIT 0 HG SELL LONG 3 4.35"],
    );
}

#[test]
fn futures_gold_offmarket() {
    check(
        "futures_gold_offmarket_signal_1.json",
        &["ENTRY - GC BUY LONG 5 4029", "CANCEL 0 GC BUY LONG 5 4029"],
    );
}

#[test]
fn futures_gold_simple() {
    check(
        "futures_gold_simple_signal_1.json",
        &["ENTRY - GC BUY LONG 5 4029", "EXIT 0 GC SELL LONG 5 4041"],
    );
}

#[test]
fn every_fixture_file_has_a_test() {
    let dir = fixture_path("");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let src = include_str!("fixtures.rs");
    for n in names {
        assert!(src.contains(&format!("\"{n}\"")), "no test for {n}");
    }
}
