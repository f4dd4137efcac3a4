//! What the sink and `mtx db migrate` store, held against the
//! seed contracts (000 `mathematricks_trading`, 001 `bot_core_db`).

mod common;

use common::*;
use mongodb::bson::{doc, Document};
use mtx_schemas::Environment;
use std::time::Duration;

/// Seed 001 `system_config.category`: "trading" | "security" | "features" | "limits".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_version_entry_uses_a_documented_category() {
    let t = Setup::migrated().await;
    let v =
        t.m.database(&t.cfg.mongo.bot_core_db)
            .collection::<Document>("system_config")
            .find_one(doc! {"key": "schema_version"})
            .await
            .unwrap()
            .expect("schema_version entry");
    let category = v.get_str("category").unwrap();
    assert!(
        ["trading", "security", "features", "limits"].contains(&category),
        "system_config.category = {category:?}, not one of the seed's values"
    );
}

/// Seed 000 `trading_orders.status`: "PENDING", "SUBMITTED", "FILLED",
/// "REJECTED", "CANCELLED".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trading_order_status_stays_within_the_seed_enum() {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;
    let ev = t.sub.orders_events("IBKR_Main").unwrap();
    publish(
        &t.js,
        &t.sub.orders_new("IBKR_Main").unwrap(),
        "ord-1",
        None,
        &order(1),
    )
    .await;
    publish(
        &t.js,
        &ev,
        "ev-1",
        None,
        &order_event(1, 1, "SUBMITTED", "0"),
    )
    .await;
    publish(
        &t.js,
        &ev,
        "ev-2",
        None,
        &order_event(1, 2, "ACCEPTED", "0"),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            t.count("order_events", doc! {}).await == 2
                && t.count("trading_orders", doc! {"status_seq": 2_i64}).await == 1
        })
        .await
    );
    let o = t.find("trading_orders", doc! {}).await.remove(0);
    let status = o.get_str("status").unwrap();
    sink.stop().await;
    assert!(
        ["PENDING", "SUBMITTED", "FILLED", "REJECTED", "CANCELLED"].contains(&status),
        "trading_orders.status = {status:?}, not one of the seed's values"
    );
}

/// Seed 000 `raw_signals.processed`: a raw signal that was standardized is
/// processed, whoever published it (README: providers publish on
/// `signals.raw.<env>.<source>` directly, without the gateway's headers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directly_published_raw_signal_is_marked_processed() {
    let t = Setup::migrated().await;
    let sink = start_sink(&t.cfg).await;
    let env = Environment::Staging;
    let raw_sub = t.sub.signals_raw(env, "mathematricks").unwrap();
    // A provider's own publish: the RawSignal JSON, a message id, no Mtx-Signal-Id.
    // (A body the standardizer reads: the leg names its instrument type.)
    let mut raw = raw_signal(1);
    raw["payload"]["signal_legs"][0]["instrument_type"] = "STOCK".into();
    publish(&t.js, &raw_sub, "provider-raw-1", None, &raw).await;
    // The standardizer's output for it (it sets Mtx-Signal-Id on its own message).
    publish(
        &t.js,
        &t.sub.signals_standardized(env, "SPX_1-D_Opt").unwrap(),
        "std-1",
        Some(&signal_id(1)),
        &standardized(1),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            t.count("raw_signals", doc! {}).await == 1
                && t.count("standardized_signals", doc! {}).await == 1
        })
        .await
    );
    let processed = eventually(Duration::from_secs(10), || async {
        t.count("raw_signals", doc! {"processed": true}).await == 1
    })
    .await;
    let raw = t.find("raw_signals", doc! {}).await.remove(0);
    sink.stop().await;
    assert!(
        processed,
        "raw signal of standardized {} still processed=false: signal_id={:?}",
        signal_id(1),
        raw.get("signal_id")
    );
}
