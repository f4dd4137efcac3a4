//! Full order lifecycles on real servers: orders published on
//! `orders.PAPER.new`, marks on `market.prices.<symbol>`, the execution and
//! accounts stages running; fills, events and account state asserted to the
//! cent, and the state rebuilt from the streams compared field by field.
//!
//! Defaults of every test: account PAPER starts with 100 000, commission
//! 0.01 per share, no slippage, margin 25 % of notional (stocks).

mod common;

use common::*;
use mtx_accounts::worker::{ledger_config, rebuild};
use mtx_harness::NatsServer;
use mtx_schemas::ids::execution_id;
use mtx_schemas::order::{AccountState, OpenOrder, OpenPosition};
use mtx_schemas::{Direction, ExecutionStatus, OrderStatus, OrderType, Side, SignalAction};
use mtx_subjects::topology::streams;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use std::time::Duration;

const A: &str = "PAPER";
use Direction::{Long, Short};
use SignalAction::{Entry, Exit};

async fn pipeline(nats: &NatsServer, tune: impl FnOnce(&mut mtx_runtime::Config)) -> Pipeline {
    let mut cfg = config(nats);
    cfg.accounts
        .initial_balances
        .insert(A.to_string(), dec!(100000));
    tune(&mut cfg);
    Pipeline::start(cfg).await
}

fn position(s: &AccountState, strategy: &str, instrument: &str) -> OpenPosition {
    s.open_positions
        .iter()
        .find(|p| p.strategy_id == strategy && p.instrument == instrument)
        .cloned()
        .unwrap_or_else(|| panic!("no {strategy}/{instrument} position in {s:#?}"))
}

/// The live state in KV is current (equals the in-memory book) and a book
/// rebuilt from nothing out of the streams gives the same state, field by
/// field, refusing nothing.
async fn assert_replay_matches(p: &Pipeline) {
    assert_replay_matches_refusing(p, 0).await;
}

/// [`assert_replay_matches`], with the replay refusing exactly `expected`
/// messages (those the live stage dead-lettered).
async fn assert_replay_matches_refusing(p: &Pipeline, expected: u64) {
    let mut live = None;
    for _ in 0..400 {
        if let (Some(kv), Ok(mem)) = (p.state(A).await, p.accounts.snapshot(A).await) {
            let same = AccountState {
                timestamp: kv.timestamp,
                ..mem
            } == kv;
            if same {
                live = Some(kv);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let live = live.expect("KV state never caught up with the book");
    let (book, refused) = rebuild(&p.js, &p.topo, ledger_config(&p.cfg.accounts))
        .await
        .expect("rebuild");
    let rebuilt = book.snapshot(A, live.timestamp);
    assert_eq!(refused, expected, "messages the replay refused");
    assert_eq!(rebuilt.account, live.account);
    assert_eq!(rebuilt.equity, live.equity);
    assert_eq!(rebuilt.cash_balance, live.cash_balance);
    assert_eq!(rebuilt.margin_used, live.margin_used);
    assert_eq!(rebuilt.margin_available, live.margin_available);
    assert_eq!(rebuilt.unrealized_pnl, live.unrealized_pnl);
    assert_eq!(rebuilt.realized_pnl, live.realized_pnl);
    assert_eq!(rebuilt.commissions, live.commissions);
    assert_eq!(rebuilt.open_positions, live.open_positions);
    assert_eq!(rebuilt.open_orders, live.open_orders);
    assert_eq!(rebuilt.deployed_capital, live.deployed_capital);
    assert_eq!(rebuilt, live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_entry_and_exit_with_profit_commission_from_cash() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |_| {}).await;
    // Before any fill the configured account is published with its balance.
    let s = p.state_where(A, |_| true).await;
    assert_eq!(
        (s.equity, s.cash_balance, s.margin_available),
        (dec!(100000), dec!(100000), dec!(100000))
    );

    p.price("AAPL", dec!(150)).await;
    p.order(&market("L1", "S1", "AAPL", Entry, Long, dec!(100)))
        .await;
    let x = p.wait_executions(A, "L1", 1).await;
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].execution_id, execution_id("L1", 1));
    assert_eq!(
        (
            x[0].side,
            x[0].quantity,
            x[0].price,
            x[0].commission,
            x[0].status
        ),
        (
            Side::Buy,
            dec!(100),
            dec!(150),
            dec!(1),
            ExecutionStatus::Filled
        )
    );

    p.price("AAPL", dec!(155)).await;
    let s = p
        .state_where(A, |s| {
            s.open_positions.len() == 1 && s.open_positions[0].current_price == dec!(155)
        })
        .await;
    assert_eq!(
        position(&s, "S1", "AAPL"),
        OpenPosition {
            strategy_id: "S1".into(),
            instrument: "AAPL".into(),
            direction: Long,
            quantity: dec!(100),
            entry_price: dec!(150),
            current_price: dec!(155),
            unrealized_pnl: dec!(500),
            margin_required: dec!(3875),
            multiplier: Some(dec!(1)),
        }
    );
    assert_eq!(s.cash_balance, dec!(99999));
    assert_eq!(s.unrealized_pnl, dec!(500));
    assert_eq!(s.equity, dec!(100499));
    assert_eq!(s.margin_used, dec!(3875));
    assert_eq!(s.margin_available, dec!(96624));
    assert_eq!(s.realized_pnl, dec!(0));
    assert_eq!(s.commissions, dec!(1));
    assert_eq!(s.deployed_capital, [("S1".to_string(), dec!(3875))].into());
    assert!(s.open_orders.is_empty());

    p.order(&market("L2", "S1", "AAPL", Exit, Long, dec!(100)))
        .await;
    let x = p.wait_executions(A, "L2", 1).await;
    assert_eq!(
        (x[0].side, x[0].quantity, x[0].price, x[0].commission),
        (Side::Sell, dec!(100), dec!(155), dec!(1))
    );
    let s = p.state_where(A, |s| s.open_positions.is_empty()).await;
    assert_eq!(s.realized_pnl, dec!(500));
    assert_eq!(s.commissions, dec!(2));
    assert_eq!(
        s.cash_balance,
        dec!(100498),
        "100000 + 500 realized - 2 commission"
    );
    assert_eq!(s.equity, dec!(100498));
    assert_eq!((s.unrealized_pnl, s.margin_used), (dec!(0), dec!(0)));
    assert_eq!(s.margin_available, dec!(100498));
    assert!(s.deployed_capital.is_empty());

    let ev = p.wait_status(A, "L1", OrderStatus::Filled).await;
    let statuses: Vec<_> = ev.iter().map(|e| (e.seq, e.status)).collect();
    assert_eq!(
        statuses,
        [
            (1, OrderStatus::Submitted),
            (2, OrderStatus::Accepted),
            (3, OrderStatus::Filled)
        ]
    );
    assert_eq!(ev[2].avg_fill_price, Some(dec!(150)));
    assert_replay_matches(&p).await;
    // The ops contract: equity and utilisation of the configured account.
    let text = mtx_runtime::metrics::render(&p.registry);
    for line in [
        "mtx_account_equity{account=\"PAPER\"} 100498",
        "mtx_account_margin_utilization_ratio{account=\"PAPER\"} 0",
    ] {
        assert!(text.contains(line), "missing `{line}` in {text}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_entry_and_exit_pnl_sign() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |_| {}).await;
    p.price("TSLA", dec!(200)).await;
    p.order(&market("S1E", "S2", "TSLA", Entry, Short, dec!(50)))
        .await;
    let x = p.wait_executions(A, "S1E", 1).await;
    assert_eq!((x[0].side, x[0].price), (Side::Sell, dec!(200)));

    p.price("TSLA", dec!(190)).await;
    let s = p
        .state_where(A, |s| {
            s.open_positions.len() == 1 && s.open_positions[0].current_price == dec!(190)
        })
        .await;
    let pos = position(&s, "S2", "TSLA");
    assert_eq!((pos.direction, pos.quantity), (Short, dec!(50)));
    assert_eq!(
        pos.unrealized_pnl,
        dec!(500),
        "a short gains when the price falls"
    );
    assert_eq!(pos.margin_required, dec!(2375));

    p.price("TSLA", dec!(210)).await;
    let s = p
        .state_where(A, |s| {
            s.open_positions.len() == 1 && s.open_positions[0].current_price == dec!(210)
        })
        .await;
    assert_eq!(s.unrealized_pnl, dec!(-500));
    assert_eq!(s.equity, dec!(99499.5), "100000 - 0.5 commission - 500");

    p.order(&market("S1X", "S2", "TSLA", Exit, Short, dec!(50)))
        .await;
    let x = p.wait_executions(A, "S1X", 1).await;
    assert_eq!((x[0].side, x[0].price), (Side::Buy, dec!(210)));
    let s = p.state_where(A, |s| s.open_positions.is_empty()).await;
    assert_eq!(s.realized_pnl, dec!(-500), "short 200 → cover 210: a loss");
    assert_eq!(s.commissions, dec!(1));
    assert_eq!(s.cash_balance, dec!(99499));
    assert_eq!(s.equity, dec!(99499));
    assert_replay_matches(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ladder_of_three_entries_and_partial_exits() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |_| {}).await;
    for (i, px) in [dec!(100), dec!(110), dec!(120)].into_iter().enumerate() {
        p.price("MSFT", px).await;
        let id = format!("LAD{i}");
        p.order(&market(&id, "S3", "MSFT", Entry, Long, dec!(10)))
            .await;
        p.wait_executions(A, &id, 1).await;
    }
    let s = p
        .state_where(A, |s| {
            s.open_positions
                .first()
                .is_some_and(|x| x.quantity == dec!(30))
        })
        .await;
    let pos = position(&s, "S3", "MSFT");
    assert_eq!((pos.quantity, pos.entry_price), (dec!(30), dec!(110)));
    assert_eq!(pos.unrealized_pnl, dec!(300), "(120 - 110) * 30");

    p.price("MSFT", dec!(130)).await;
    p.order(&market("LADX1", "S3", "MSFT", Exit, Long, dec!(12)))
        .await;
    p.wait_executions(A, "LADX1", 1).await;
    let s = p
        .state_where(A, |s| {
            s.open_positions
                .first()
                .is_some_and(|x| x.quantity == dec!(18))
        })
        .await;
    let pos = position(&s, "S3", "MSFT");
    assert_eq!(pos.entry_price, dec!(110), "exits do not move the average");
    assert_eq!(s.realized_pnl, dec!(240), "(130 - 110) * 12");
    assert_eq!(pos.unrealized_pnl, dec!(360), "(130 - 110) * 18");

    p.price("MSFT", dec!(105)).await;
    p.order(&market("LADX2", "S3", "MSFT", Exit, Long, dec!(18)))
        .await;
    p.wait_executions(A, "LADX2", 1).await;
    let s = p.state_where(A, |s| s.open_positions.is_empty()).await;
    assert_eq!(s.realized_pnl, dec!(150), "240 + (105 - 110) * 18");
    assert_eq!(s.commissions, dec!(0.6), "0.01 x (10 + 10 + 10 + 12 + 18)");
    assert_eq!(s.cash_balance, dec!(100149.4));
    assert_eq!(s.equity, dec!(100149.4));
    assert_replay_matches(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_entry_and_exit() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |_| {}).await;
    p.price("KO", dec!(60)).await;
    p.price("PEP", dec!(170)).await;
    let leg =
        |id: &str, inst: &str, action: SignalAction, dir: Direction, qty: Decimal, leg: u32| {
            let mut o = market(id, "S4", inst, action, dir, qty);
            o.signal_id = format!("sig_pair_{action:?}");
            o.leg = leg;
            o
        };
    p.order(&leg("PE0", "KO", Entry, Long, dec!(100), 0)).await;
    p.order(&leg("PE1", "PEP", Entry, Short, dec!(50), 1)).await;
    p.wait_executions(A, "PE0", 1).await;
    p.wait_executions(A, "PE1", 1).await;

    p.price("KO", dec!(62)).await;
    p.price("PEP", dec!(165)).await;
    let s = p
        .state_where(A, |s| {
            s.open_positions.len() == 2
                && s.open_positions
                    .iter()
                    .all(|x| x.current_price != x.entry_price)
        })
        .await;
    let ko = position(&s, "S4", "KO");
    let pep = position(&s, "S4", "PEP");
    assert_eq!(
        (ko.direction, ko.unrealized_pnl, ko.margin_required),
        (Long, dec!(200), dec!(1550))
    );
    assert_eq!(
        (pep.direction, pep.unrealized_pnl, pep.margin_required),
        (Short, dec!(250), dec!(2062.5))
    );
    assert_eq!(s.unrealized_pnl, dec!(450));
    assert_eq!(s.margin_used, dec!(3612.5));
    assert_eq!(
        s.deployed_capital,
        [("S4".to_string(), dec!(3612.5))].into()
    );
    assert_eq!(s.equity, dec!(100448.5), "100000 - 1.5 commission + 450");

    p.order(&leg("PX0", "KO", Exit, Long, dec!(100), 0)).await;
    p.order(&leg("PX1", "PEP", Exit, Short, dec!(50), 1)).await;
    let s = p.state_where(A, |s| s.open_positions.is_empty()).await;
    assert_eq!(s.realized_pnl, dec!(450), "KO +200, PEP +250");
    assert_eq!(s.commissions, dec!(3));
    assert_eq!(s.cash_balance, dec!(100447));
    assert_replay_matches(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_rests_until_the_mark_crosses_and_cancel_of_a_resting_order() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |_| {}).await;
    p.price("NVDA", dec!(500)).await;
    let lim = |id: &str, qty: Decimal, px: Decimal| {
        order(
            id,
            "S5",
            "NVDA",
            Entry,
            Long,
            qty,
            OrderType::Limit,
            Some(px),
        )
    };
    p.order(&lim("LM1", dec!(10), dec!(490))).await;
    p.wait_status(A, "LM1", OrderStatus::Accepted).await;
    let s = p.state_where(A, |s| s.open_orders.len() == 1).await;
    assert_eq!(
        s.open_orders,
        [OpenOrder {
            order_id: "LM1".into(),
            instrument: "NVDA".into(),
            side: Side::Buy,
            quantity: dec!(10),
            order_type: OrderType::Limit,
            price: Some(dec!(490)),
        }]
    );
    p.price("NVDA", dec!(495)).await;
    assert!(p.executions(A).await.is_empty(), "495 does not cross 490");

    p.price("NVDA", dec!(489)).await;
    let x = p.wait_executions(A, "LM1", 1).await;
    assert_eq!(
        (x[0].quantity, x[0].price),
        (dec!(10), dec!(490)),
        "a rested limit fills at its limit"
    );
    let s = p
        .state_where(A, |s| {
            s.open_orders.is_empty() && s.open_positions.len() == 1
        })
        .await;
    let pos = position(&s, "S5", "NVDA");
    assert_eq!(
        (pos.entry_price, pos.current_price, pos.unrealized_pnl),
        (dec!(490), dec!(489), dec!(-10))
    );

    // A resting order cancelled: nothing fills afterwards.
    p.order(&lim("LM2", dec!(5), dec!(450))).await;
    p.wait_status(A, "LM2", OrderStatus::Accepted).await;
    p.state_where(A, |s| s.open_orders.len() == 1).await;
    p.cancel(A, "LM2").await;
    let ev = p.wait_status(A, "LM2", OrderStatus::Cancelled).await;
    assert_eq!(
        ev.iter().map(|e| e.status).collect::<Vec<_>>(),
        [
            OrderStatus::Submitted,
            OrderStatus::Accepted,
            OrderStatus::CancelRequested,
            OrderStatus::Cancelled
        ]
    );
    p.state_where(A, |s| s.open_orders.is_empty()).await;
    p.price("NVDA", dec!(440)).await;
    assert!(
        p.executions(A).await.iter().all(|x| x.order_id != "LM2"),
        "a cancelled order never fills"
    );

    // Cancelling it again is an invalid transition: counted, dead-lettered,
    // nothing applied.
    p.cancel(A, "LM2").await;
    let dlq = p.topo.stream_name(streams::DLQ);
    let dead = eventually(Duration::from_secs(10), || async {
        !read_all(&p.js, &dlq, ">").await.is_empty()
    })
    .await;
    assert!(dead);
    let m = &read_all(&p.js, &dlq, ">").await[0];
    let h = m.headers.as_ref().unwrap();
    assert_eq!(
        h.get(mtx_schemas::headers::DLQ_REASON).unwrap().as_str(),
        "invalid_transition"
    );
    let text = mtx_runtime::metrics::render(&p.registry);
    let line =
        "mtx_execution_invalid_transitions_total{event=\"CANCEL_REQUEST\",from=\"CANCELLED\"} 1";
    assert!(text.contains(line), "missing `{line}`");
    assert_eq!(
        p.wait_status(A, "LM2", OrderStatus::Cancelled).await.len(),
        4
    );
    assert_replay_matches(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_fills_sum_to_the_order_quantity() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |c| c.execution.paper.fill_ratio = Some(dec!(0.5))).await;
    p.price("AMD", dec!(55)).await;
    p.order(&order(
        "PF",
        "S6",
        "AMD",
        Entry,
        Long,
        dec!(10),
        OrderType::Limit,
        Some(dec!(50)),
    ))
    .await;
    p.wait_status(A, "PF", OrderStatus::Accepted).await;
    p.price("AMD", dec!(49)).await;
    p.wait_executions(A, "PF", 1).await;
    let s = p
        .state_where(A, |s| {
            s.open_orders.first().is_some_and(|o| o.quantity == dec!(5))
        })
        .await;
    assert_eq!(position(&s, "S6", "AMD").quantity, dec!(5));
    for px in [dec!(48), dec!(47), dec!(46)] {
        p.price("AMD", px).await;
    }
    let x = p.wait_executions(A, "PF", 4).await;
    assert_eq!(
        x.iter().map(|x| x.quantity).collect::<Vec<_>>(),
        [dec!(5), dec!(3), dec!(1), dec!(1)],
        "ceil(remaining / 2) per mark"
    );
    assert_eq!(x.iter().map(|x| x.quantity).sum::<Decimal>(), dec!(10));
    assert_eq!(
        x.iter().map(|x| x.status).collect::<Vec<_>>(),
        [
            ExecutionStatus::PartialFill,
            ExecutionStatus::PartialFill,
            ExecutionStatus::PartialFill,
            ExecutionStatus::Filled
        ]
    );
    assert!(x.iter().all(|x| x.price == dec!(50)));
    let ids: Vec<_> = x.iter().map(|x| x.execution_id.clone()).collect();
    assert_eq!(
        ids,
        (1..=4).map(|i| execution_id("PF", i)).collect::<Vec<_>>()
    );
    let ev = p.wait_status(A, "PF", OrderStatus::Filled).await;
    assert_eq!(ev.last().unwrap().filled_quantity, dec!(10));
    let s = p
        .state_where(A, |s| {
            s.open_orders.is_empty()
                && s.open_positions
                    .first()
                    .is_some_and(|x| x.quantity == dec!(10))
        })
        .await;
    assert_eq!(s.commissions, dec!(0.10));
    assert_eq!(s.cash_balance, dec!(99999.90));
    assert_eq!(
        position(&s, "S6", "AMD").unrealized_pnl,
        dec!(-40),
        "(46 - 50) * 10"
    );
    assert_replay_matches(&p).await;
    p.stop().await;
}

/// Stop both stages and start them again on the same servers: the resting
/// order survives in the venue state and fills on the next cross; the
/// accounts stage rebuilds the same state from the streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_resting_orders_and_rebuilds_accounts() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |_| {}).await;
    let cfg = p.cfg.clone();
    p.price("IBM", dec!(200)).await;
    p.order(&market("R1", "S7", "IBM", Entry, Long, dec!(20)))
        .await;
    p.wait_executions(A, "R1", 1).await;
    p.order(&order(
        "R2",
        "S7",
        "IBM",
        Exit,
        Long,
        dec!(20),
        OrderType::Limit,
        Some(dec!(210)),
    ))
    .await;
    p.wait_status(A, "R2", OrderStatus::Accepted).await;
    let before = p.state_where(A, |s| s.open_orders.len() == 1).await;
    p.stop().await;

    let p = Pipeline::start(cfg).await;
    let after = p.state_where(A, |s| s.timestamp > before.timestamp).await;
    assert_eq!(
        AccountState {
            timestamp: before.timestamp,
            ..after
        },
        before,
        "rebuilt at start = state before the restart"
    );
    p.price("IBM", dec!(211)).await;
    let x = p.wait_executions(A, "R2", 1).await;
    assert_eq!((x[0].quantity, x[0].price), (dec!(20), dec!(210)));
    let s = p.state_where(A, |s| s.open_positions.is_empty()).await;
    assert_eq!(s.realized_pnl, dec!(200));
    assert_eq!(s.cash_balance, dec!(100199.6));
    assert!(s.open_orders.is_empty());
    assert_eq!(p.executions(A).await.len(), 2, "nothing filled twice");
    assert_replay_matches(&p).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_tick_is_dead_lettered_and_the_mark_keeps_moving() {
    let nats = NatsServer::start();
    let p = pipeline(&nats, |_| {}).await;
    p.price("AAPL", dec!(150)).await;
    p.order(&market("L1", "S1", "AAPL", Entry, Long, dec!(10)))
        .await;
    p.wait_executions(A, "L1", 1).await;
    p.state_where(A, |s| s.open_positions.len() == 1).await;

    // A tick stamped a year ahead would stay the newest mark for a year; a
    // price beyond the shared range would overflow the P&L. Both are
    // refused by every reader of the market stream (execution, accounts).
    let subject = p.subjects.market_price("AAPL").unwrap();
    let ahead = (chrono::Utc::now() + chrono::Duration::days(365)).to_rfc3339();
    let bad = [
        format!(r#"{{"symbol":"AAPL","price":"1","timestamp":"{ahead}"}}"#),
        format!(
            r#"{{"symbol":"AAPL","price":"1e26","timestamp":"{}"}}"#,
            chrono::Utc::now().to_rfc3339()
        ),
    ];
    for (i, body) in bad.iter().enumerate() {
        p.publish(
            subject.clone(),
            format!("bad{i}"),
            body.clone().into_bytes(),
        )
        .await;
    }
    p.price("AAPL", dec!(160)).await;
    let s = p
        .state_where(A, |s| s.open_positions[0].current_price == dec!(160))
        .await;
    assert_eq!(s.unrealized_pnl, dec!(100));

    let dlq = p.topo.stream_name(streams::DLQ);
    let dead = eventually(Duration::from_secs(10), || async {
        read_all(&p.js, &dlq, ">").await.len() >= 4
    })
    .await;
    assert!(dead, "both stages dead-letter both ticks");
    let reasons: Vec<String> = read_all(&p.js, &dlq, ">")
        .await
        .iter()
        .map(|m| {
            let h = m.headers.as_ref().unwrap();
            h.get(mtx_schemas::headers::DLQ_REASON).unwrap().to_string()
        })
        .collect();
    assert_eq!(reasons, ["invalid_price"; 4]);
    // The replay reads every retained price (not only the last per symbol)
    // and refuses the two bad ticks the same way the live stage did.
    assert_replay_matches_refusing(&p, 2).await;
    p.stop().await;
}
