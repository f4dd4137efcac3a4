//! End to end without I/O: orders → paper venue → executions → ledger.

use chrono::{DateTime, Duration, TimeZone, Utc};
use mtx_accounts::{InstrumentSpec, Ledger, LedgerConfig, MarginModel, SymbolSpec};
use mtx_execution::{Commission, CommissionModel, PaperConfig, PaperVenue, VenueEvent};
use mtx_schemas::order::{order_side, ExecutionConfirmation, Order};
use mtx_schemas::{Direction, InstrumentType, SignalAction};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;

fn t(secs: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 3, 14, 30, 0).unwrap() + Duration::seconds(secs)
}

fn order(
    id: &str,
    instrument: &str,
    action: SignalAction,
    direction: Direction,
    qty: Decimal,
) -> Order {
    let sig = format!("sig_{id}");
    Order {
        direction,
        action,
        side: order_side(action, direction),
        ..Order::pending(id, sig, "SPX_1-D_Opt", "IBKR_Main", instrument, qty, t(0))
    }
}

/// Feed venue output to the ledger the way the workers will: orders and
/// status events to open-order tracking, executions to the books.
fn feed(ledger: &mut Ledger, journal: &mut Vec<ExecutionConfirmation>, events: &[VenueEvent]) {
    for e in events {
        if let VenueEvent::ChildOrder(o) = e {
            ledger.track_order(o);
        }
        if let Some(ev) = e.order_event() {
            ledger.apply_order_event(ev);
        }
        if let Some(x) = e.execution() {
            ledger.apply(x).unwrap();
            journal.push(x.clone());
        }
    }
}

fn gc_ledger_config() -> LedgerConfig {
    LedgerConfig {
        default_initial_balance: dec!(500000),
        instruments: [(
            "GC".to_string(),
            SymbolSpec::any_class(InstrumentSpec {
                multiplier: dec!(100),
                margin: MarginModel::PerContract(dec!(16500)),
            }),
        )]
        .into_iter()
        .collect(),
        ..LedgerConfig::default()
    }
}

#[test]
fn gold_bracket_take_profit_books_exact_pnl() {
    let mut venue = PaperVenue::new(PaperConfig {
        commission: Commission {
            model: CommissionModel::PerContract(dec!(2.25)),
            minimum: None,
        },
        ..PaperConfig::default()
    })
    .unwrap();
    let mut ledger = Ledger::new(gc_ledger_config());
    let mut journal = Vec::new();

    let entry = Order {
        instrument_type: InstrumentType::Future,
        multiplier: dec!(100),
        price: Some(dec!(4029)),
        stop_loss: Some(dec!(4000)),
        take_profit: Some(dec!(4060)),
        ..order(
            "gc_entry",
            "GC",
            SignalAction::Entry,
            Direction::Long,
            dec!(5),
        )
    };
    ledger.track_order(&entry);
    let ev = venue.submit(entry, t(0));
    feed(&mut ledger, &mut journal, &ev);

    let s = ledger.snapshot("IBKR_Main", t(1));
    assert_eq!(s.open_positions.len(), 1);
    assert_eq!(s.open_positions[0].entry_price, dec!(4029));
    assert_eq!(s.margin_used, dec!(82500));
    assert_eq!(s.cash_balance, dec!(499988.75));
    assert_eq!(s.open_orders.len(), 2, "SL and TP children are working");

    ledger.mark("GC", dec!(4045)); // the accounts worker sees the same prices
    feed(
        &mut ledger,
        &mut journal,
        &venue.on_price("GC", dec!(4045), t(2)),
    );
    let s = ledger.snapshot("IBKR_Main", t(2));
    assert_eq!(s.unrealized_pnl, dec!(8000)); // 16 * 5 * 100

    ledger.mark("GC", dec!(4061));
    feed(
        &mut ledger,
        &mut journal,
        &venue.on_price("GC", dec!(4061), t(3)),
    );
    let s = ledger.snapshot("IBKR_Main", t(3));
    assert!(s.open_positions.is_empty());
    assert!(s.open_orders.is_empty(), "TP filled, SL cancelled by OCO");
    assert_eq!(s.realized_pnl, dec!(15500)); // (4060 - 4029) * 5 * 100
    assert_eq!(s.commissions, dec!(22.5));
    assert_eq!(s.cash_balance, dec!(515477.5));

    let replayed = Ledger::replay(gc_ledger_config(), &journal).unwrap();
    let r = replayed.snapshot("IBKR_Main", t(3));
    assert_eq!(
        (r.equity, r.realized_pnl, r.cash_balance),
        (s.equity, s.realized_pnl, s.cash_balance)
    );
}

#[test]
fn ladder_with_partial_fills_and_slippage_replays_identically() {
    let mut venue = PaperVenue::new(PaperConfig {
        slippage_bps: dec!(5),
        fill_ratio: Some(dec!(0.5)),
        commission: Commission {
            model: CommissionModel::PerShare(dec!(0.005)),
            minimum: Some(dec!(1)),
        },
        seed: 7,
        ..PaperConfig::default()
    })
    .unwrap();
    let mut ledger = Ledger::new(LedgerConfig {
        default_initial_balance: dec!(500000),
        ..LedgerConfig::default()
    });
    let mut journal = Vec::new();
    let (long, buy_in) = (Direction::Long, SignalAction::Entry);
    let steps: Vec<(Order, Decimal)> = vec![
        (order("e1", "AAPL", buy_in, long, dec!(10)), dec!(150)),
        (order("e2", "AAPL", buy_in, long, dec!(7)), dec!(151)),
        (order("e3", "AAPL", buy_in, long, dec!(13)), dec!(152)),
        (
            order("x1", "AAPL", SignalAction::Exit, long, dec!(5)),
            dec!(153),
        ),
        (
            order("x2", "AAPL", SignalAction::Exit, long, dec!(15)),
            dec!(154),
        ),
        (
            order("x3", "AAPL", SignalAction::Exit, long, dec!(10)),
            dec!(155),
        ),
    ];
    let mut clock = 0;
    for (o, px) in steps {
        clock += 1;
        feed(
            &mut ledger,
            &mut journal,
            &venue.on_price("AAPL", px, t(clock)),
        );
        feed(&mut ledger, &mut journal, &venue.submit(o, t(clock)));
        // Let the partial fills complete at the same price.
        for _ in 0..6 {
            clock += 1;
            feed(
                &mut ledger,
                &mut journal,
                &venue.on_price("AAPL", px, t(clock)),
            );
        }
    }
    assert!(journal.len() > 6, "partial fills happened");
    let s = ledger.snapshot("IBKR_Main", t(clock));
    assert!(s.open_positions.is_empty());
    // Gross P&L is 92 before slippage; 5 bps on both sides costs exactly
    // 0.0005 * (4533 + 4625) = 4.579.
    assert_eq!(s.realized_pnl, dec!(87.421));
    assert_eq!(
        s.cash_balance,
        dec!(500000) + s.realized_pnl - s.commissions
    );

    let replayed = Ledger::replay(ledger.config().clone(), &journal).unwrap();
    let mut r = replayed.snapshot("IBKR_Main", t(clock));
    r.open_orders = s.open_orders.clone(); // orders are not part of an execution replay
    assert_eq!(r, s);
}
