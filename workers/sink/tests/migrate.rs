//! `mtx db migrate` against the Mongo-compatible server: every documented
//! collection with its indexes, validators and time-series options; a second
//! run changes nothing; an older database is upgraded.

use futures::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mtx_harness::{unique, MongoServer};
use mtx_runtime::config::Config;
use mtx_sink::spec::{catalog, Db, SCHEMA_VERSION};
use mtx_sink::Store;
use std::time::Duration;

fn cfg(mongo: &MongoServer) -> Config {
    let mut c = Config::default();
    c.mongo.uri = mongo.uri();
    c.mongo.trading_db = unique("trading");
    c.mongo.bot_core_db = unique("core");
    c
}

async fn store(c: &Config) -> Store {
    Store::connect(&c.mongo, Duration::from_secs(20))
        .await
        .unwrap()
}

fn int(b: Option<&Bson>) -> Option<i64> {
    match b? {
        Bson::Int32(i) => Some(*i as i64),
        Bson::Int64(i) => Some(*i),
        Bson::Double(d) => Some(*d as i64),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_everything_and_twice_is_a_noop() {
    let mongo = MongoServer::start();
    let c = cfg(&mongo);
    let s = store(&c).await;
    let first = mtx_sink::migrate(&s, &c.mongo).await.unwrap();
    assert!(first.problems.is_empty(), "{:?}", first.problems);
    assert_eq!(first.from_version, None);
    assert_eq!(first.to_version, SCHEMA_VERSION);
    assert!(first.changes.len() > 40, "{:#?}", first.changes);

    let second = mtx_sink::migrate(&s, &c.mongo).await.unwrap();
    assert!(
        second.is_noop(),
        "second run changed: {:#?}",
        second.changes
    );
    assert_eq!(second.from_version.as_deref(), Some(SCHEMA_VERSION));

    // Every collection, every index exactly as documented.
    for spec in catalog() {
        let db = s.db(spec.db);
        let names: Vec<String> = db.list_collection_names().await.unwrap();
        assert!(
            names.contains(&spec.name.to_string()),
            "{} missing",
            spec.name
        );
        let idx: Vec<Document> = db
            .collection::<Document>(spec.name)
            .list_indexes()
            .await
            .unwrap()
            .map_ok(|m| {
                let mut d = doc! {"key": m.keys.clone()};
                if let Some(o) = m.options {
                    d.insert("name", o.name.unwrap_or_default());
                    d.insert("unique", o.unique.unwrap_or(false));
                    d.insert("sparse", o.sparse.unwrap_or(false));
                    if let Some(t) = o.expire_after {
                        d.insert("ttl", t.as_secs() as i64);
                    }
                }
                d
            })
            .try_collect()
            .await
            .unwrap();
        for want in &spec.indexes {
            let found = idx
                .iter()
                .find(|d| {
                    let keys: Vec<(String, i64)> = d
                        .get_document("key")
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), int(Some(v)).unwrap()))
                        .collect();
                    keys == want
                        .keys
                        .iter()
                        .map(|(k, v)| (k.to_string(), *v as i64))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_else(|| {
                    panic!("{}: index {} missing in {idx:?}", spec.name, want.name())
                });
            assert_eq!(found.get_str("name").unwrap(), want.name());
            assert_eq!(
                found.get_bool("unique").unwrap(),
                want.unique,
                "{}",
                want.name()
            );
            assert_eq!(
                found.get_bool("sparse").unwrap(),
                want.sparse,
                "{}",
                want.name()
            );
            assert_eq!(
                found.get_i64("ttl").ok(),
                want.ttl,
                "{}.{}",
                spec.name,
                want.name()
            );
        }
    }

    // Seed 001 specifics, spelled out.
    let core = s.db(Db::BotCore);
    let info = core
        .run_command(doc! {"listCollections": 1, "filter": {"name": "market_data"}})
        .await
        .unwrap();
    let md = info
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()[0]
        .as_document()
        .unwrap()
        .get_document("options")
        .unwrap()
        .clone();
    let ts = md.get_document("timeseries").unwrap();
    assert_eq!(ts.get_str("timeField").unwrap(), "open_time");
    assert_eq!(ts.get_str("metaField").unwrap(), "symbol");
    assert_eq!(ts.get_str("granularity").unwrap(), "minutes");
    assert_eq!(int(md.get("expireAfterSeconds")), Some(7_776_000));

    // Validators are in place and typed (Decimal128 for money).
    let info = s
        .db(Db::Trading)
        .run_command(doc! {"listCollections": 1, "filter": {"name": "execution_confirmations"}})
        .await
        .unwrap();
    let opts = info
        .get_document("cursor")
        .unwrap()
        .get_array("firstBatch")
        .unwrap()[0]
        .as_document()
        .unwrap()
        .get_document("options")
        .unwrap()
        .clone();
    let price = opts
        .get_document("validator")
        .unwrap()
        .get_document("$jsonSchema")
        .unwrap()
        .get_document("properties")
        .unwrap()
        .get_document("price")
        .unwrap()
        .clone();
    assert_eq!(price.get_str("bsonType").unwrap(), "decimal");
    assert_eq!(opts.get_str("validationLevel").unwrap(), "moderate");

    // The version, recorded as a system_config entry.
    let v = core
        .collection::<Document>("system_config")
        .find_one(doc! {"key": "schema_version"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.get_str("value").unwrap(), SCHEMA_VERSION);
    assert_eq!(v.get_str("updated_by").unwrap(), "mtx db migrate");
    assert_eq!(v.get_str("category").unwrap(), "features");
    assert!(v.get_datetime("created_at").is_ok() && v.get_datetime("updated_at").is_ok());
    assert_eq!(v.get_array("history").unwrap().len(), 1);

    // A duplicate natural key is refused by the server.
    let orders = s.coll(Db::Trading, "order_events");
    let ev = doc! {"order_id": "o1", "seq": 1_i64, "account": "A", "status": "PENDING",
    "filled_quantity": Bson::Decimal128("0".parse().unwrap()),
    "timestamp": mongodb::bson::DateTime::now(), "created_at": mongodb::bson::DateTime::now()};
    orders.insert_one(ev.clone()).await.unwrap();
    let dup = orders.insert_one(ev).await.unwrap_err();
    assert!(dup.to_string().contains("E11000"), "{dup}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_an_older_database() {
    let mongo = MongoServer::start();
    let c = cfg(&mongo);
    let s = store(&c).await;
    // A database at Bot Core schema 1.0.0: an order without status_rank, a
    // TTL that drifted, an index ops added by hand, the version recorded.
    let trading = s.db(Db::Trading);
    let core = s.db(Db::BotCore);
    trading
        .collection::<Document>("trading_orders")
        .insert_many([
            doc! {"order_id": "legacy-1", "status": "FILLED"},
            doc! {"order_id": "legacy-2", "status": "SUBMITTED"},
            // Written before 1.3.0 with the state machine's statuses.
            doc! {"order_id": "legacy-3", "status": "PARTIALLY_FILLED"},
            doc! {"order_id": "legacy-4", "status": "EXPIRED"},
        ])
        .await
        .unwrap();
    // A backtest ingested before 1.3.0: drawdown and win rate as fractions.
    trading
        .collection::<Document>("strategy_backtest_data")
        .insert_one(doc! {"strategy_id": "SPY", "max_drawdown": 0.25, "win_rate": 0.5,
            "metadata": {"units": {"max_drawdown": "fraction of the running peak of compounded equity",
                                   "win_rate": "fraction of days with a positive return"}}})
        .await
        .unwrap();
    core.run_command(doc! {"createIndexes": "trades", "indexes": [
        {"key": {"created_at": 1}, "name": "created_at_1", "expireAfterSeconds": 100_i64},
        {"key": {"fee_asset": 1}, "name": "fee_asset_1"},
    ]})
    .await
    .unwrap();
    core.collection::<Document>("system_config")
        .insert_one(doc! {"key": "schema_version", "value": "1.0.0", "category": "system",
            "description": "Bot Core", "is_active": true, "updated_by": "admin",
            "updated_at": mongodb::bson::DateTime::now(), "created_at": mongodb::bson::DateTime::now()})
        .await
        .unwrap();

    let r = mtx_sink::migrate(&s, &c.mongo).await.unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.from_version.as_deref(), Some("1.0.0"));
    assert_eq!(r.to_version, SCHEMA_VERSION);
    assert!(
        r.changes
            .iter()
            .any(|c| c.contains("set TTL of index") && c.contains("31536000")),
        "{:#?}",
        r.changes
    );
    assert!(
        r.changes
            .iter()
            .any(|c| c.contains("backfilled status_rank on 4")),
        "{:#?}",
        r.changes
    );
    assert!(
        r.notes.iter().any(|n| n.contains("fee_asset_1")),
        "{:#?}",
        r.notes
    );
    let orders: Vec<Document> = trading
        .collection::<Document>("trading_orders")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    for o in orders {
        let rank = o.get_i64("status_rank").unwrap();
        let id = o.get_str("order_id").unwrap();
        match id {
            "legacy-1" | "legacy-4" => assert_eq!(rank, mtx_sink::mapping::TERMINAL_RANK),
            _ => assert_eq!(rank, 0),
        }
        // 1.3.0: the seed's status, the state machine's in venue_status.
        let (status, venue) = match id {
            "legacy-1" => ("FILLED", "FILLED"),
            "legacy-2" => ("SUBMITTED", "SUBMITTED"),
            "legacy-3" => ("SUBMITTED", "PARTIALLY_FILLED"),
            _ => ("CANCELLED", "EXPIRED"),
        };
        assert_eq!(o.get_str("status").unwrap(), status, "{id}");
        assert_eq!(o.get_str("venue_status").unwrap(), venue, "{id}");
    }
    let v = core
        .collection::<Document>("system_config")
        .find_one(doc! {"key": "schema_version"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.get_str("value").unwrap(), SCHEMA_VERSION);
    assert_eq!(v.get_str("updated_by").unwrap(), "mtx db migrate");
    let bt = trading
        .collection::<Document>("strategy_backtest_data")
        .find_one(doc! {"strategy_id": "SPY"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(bt.get_f64("max_drawdown").unwrap(), 25.0);
    assert_eq!(bt.get_f64("win_rate").unwrap(), 50.0);
    assert!(bt
        .get_document("metadata")
        .unwrap()
        .get_document("units")
        .unwrap()
        .get_str("win_rate")
        .unwrap()
        .starts_with("percent"));

    let again = mtx_sink::migrate(&s, &c.mongo).await.unwrap();
    assert!(again.is_noop(), "{:#?}", again.changes);

    // A database newer than this build is left alone.
    core.collection::<Document>("system_config")
        .update_one(
            doc! {"key": "schema_version"},
            doc! {"$set": {"value": "9.0.0"}},
        )
        .await
        .unwrap();
    let e = mtx_sink::migrate(&s, &c.mongo).await.unwrap_err();
    assert!(e.to_string().contains("newer"), "{e}");

    // The signal collector's database is never migrated.
    let mut bad = c.clone();
    bad.mongo.trading_db = bad.mongo.signals_db.clone();
    let e = mtx_sink::migrate(&s, &bad.mongo).await.unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
}
