//! `mtx system show | halt | resume`: the kill switch, without a NATS CLI.
//!
//! Cerebro reads the switch from the KV bucket `system`: key
//! `TRADING_ENABLED` (`true` / `false`), which overrides the `config` entry's
//! `trading_enabled`, and key `kill_switch` (`true` halts whatever the
//! others say). While halted every entry is rejected (`kill_switch`); exits
//! and cancels still go through. The change applies to the next signal,
//! without a restart.
//!
//! `halt` writes `TRADING_ENABLED = false`; `resume` writes `true` and clears
//! a set `kill_switch`. KV is written first and is what counts: with MongoDB
//! down the switch still flips (the command warns). Then the switch is
//! mirrored into Bot Core's `system_config` (`key: "TRADING_ENABLED"`,
//! category `trading`, as the seed documents it) with who changed it and
//! why, so the Bot Core admin views show the state mtx trades under.

use crate::cmd_portfolio::{bdate, kv_bucket, now_millis};
use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::kv;
use bson::{doc, Document};
use clap::{Args, Subcommand};
use mtx_cerebro::worker::{parse_bool, SYSTEM_CONFIG_KEY};
use mtx_cerebro::SystemConfig;
use mtx_runtime::config::Config;
use mtx_sink::spec::{names, Db};
use mtx_subjects::topology::buckets;
use std::process::ExitCode;
use std::time::Duration;

/// Key of the switch in the `system` bucket and in Bot Core's `system_config`.
pub const TRADING_ENABLED: &str = "TRADING_ENABLED";
/// The bucket's hard kill key (`true` halts).
const KILL_SWITCH: &str = "kill_switch";

/// `mtx system ...`.
#[derive(Subcommand)]
pub enum SystemCmd {
    /// Print whether trading is enabled, and from which keys.
    Show {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Stop all entries now (exits and cancels still go through).
    Halt(Change),
    /// Allow entries again.
    Resume(Change),
}

/// Who changes the switch, and why.
#[derive(Args)]
pub struct Change {
    /// Your name (recorded as `updated_by`).
    #[arg(long)]
    pub by: String,
    /// Why (recorded in the Bot Core entry's description).
    #[arg(long)]
    pub reason: Option<String>,
}

/// What the bucket says.
#[derive(Debug, Clone, PartialEq)]
struct Switch {
    /// The `config` entry's `trading_enabled`, if the entry exists.
    config: Option<bool>,
    /// `TRADING_ENABLED`, if set.
    trading_enabled: Option<bool>,
    /// `kill_switch`, if set.
    kill_switch: Option<bool>,
}

impl Switch {
    /// Whether Cerebro trades: the same rule as its worker.
    fn enabled(&self) -> bool {
        let base = self
            .trading_enabled
            .or(self.config)
            .unwrap_or(SystemConfig::default().trading_enabled);
        base && self.kill_switch != Some(true)
    }
}

async fn value(store: &kv::Store, key: &str) -> Result<Option<bytes::Bytes>> {
    tokio::time::timeout(Duration::from_secs(10), store.get(key))
        .await
        .map_err(|_| anyhow!("KV get {key}: timed out"))?
        .with_context(|| format!("KV get {key}"))
}

async fn read(store: &kv::Store) -> Result<Switch> {
    let config = match value(store, SYSTEM_CONFIG_KEY).await? {
        Some(v) => Some(
            serde_json::from_slice::<SystemConfig>(&v)
                .with_context(|| format!("system/{SYSTEM_CONFIG_KEY} is not a system config"))?
                .trading_enabled,
        ),
        None => None,
    };
    let flag = |k: &'static str, v: Option<bytes::Bytes>| -> Result<Option<bool>> {
        v.map(|v| parse_bool(&v).ok_or_else(|| anyhow!("system/{k} is not a boolean")))
            .transpose()
    };
    Ok(Switch {
        config,
        trading_enabled: flag(TRADING_ENABLED, value(store, TRADING_ENABLED).await?)?,
        kill_switch: flag(KILL_SWITCH, value(store, KILL_SWITCH).await?)?,
    })
}

async fn put(store: &kv::Store, key: &str, on: bool) -> Result<u64> {
    let body = if on { "true" } else { "false" };
    tokio::time::timeout(Duration::from_secs(10), store.put(key, body.into()))
        .await
        .map_err(|_| anyhow!("KV put {key}: timed out"))?
        .with_context(|| format!("KV put system/{key}"))
}

/// The Bot Core `system_config` entry of the switch (seed 001).
fn mirror_update(enabled: bool, c: &Change) -> Document {
    let now = bdate(now_millis());
    let why = c.reason.as_deref().unwrap_or("no reason given");
    let description = if enabled {
        format!(
            "Global trading on/off switch (mtx): resumed by {}: {why}",
            c.by
        )
    } else {
        format!(
            "Global trading on/off switch (mtx): halted by {}: {why}",
            c.by
        )
    };
    doc! {
        "$set": {
            "value": enabled,
            "category": "trading",
            "description": description,
            "is_active": true,
            "updated_by": &c.by,
            "updated_at": now.clone(),
        },
        "$setOnInsert": { "created_at": now },
    }
}

async fn mirror(cfg: &Config, enabled: bool, c: &Change) -> Result<()> {
    let store = mtx_sink::Store::connect(&cfg.mongo, Duration::from_secs(10))
        .await
        .context("connecting to MongoDB")?;
    let coll = store.coll(Db::BotCore, names::SYSTEM_CONFIG);
    tokio::time::timeout(
        Duration::from_secs(15),
        coll.update_one(doc! {"key": TRADING_ENABLED}, mirror_update(enabled, c))
            .upsert(true),
    )
    .await
    .map_err(|_| anyhow!("MongoDB: timed out"))?
    .context("upserting system_config TRADING_ENABLED")?;
    Ok(())
}

fn describe(s: &Switch) -> String {
    let show = |b: Option<bool>| b.map_or("unset".to_string(), |b| b.to_string());
    format!(
        "trading {} (system/TRADING_ENABLED {}, system/{SYSTEM_CONFIG_KEY}.trading_enabled {}, system/{KILL_SWITCH} {})",
        if s.enabled() { "ENABLED" } else { "HALTED" },
        show(s.trading_enabled),
        show(s.config),
        show(s.kill_switch),
    )
}

/// Run a `system` subcommand.
pub async fn run(cmd: SystemCmd, cfg: &Config) -> Result<ExitCode> {
    let store = kv_bucket(cfg, buckets::SYSTEM).await?;
    match cmd {
        SystemCmd::Show { json } => {
            let s = read(&store).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "trading_enabled": s.enabled(),
                        "keys": {
                            TRADING_ENABLED: s.trading_enabled,
                            "config.trading_enabled": s.config,
                            KILL_SWITCH: s.kill_switch,
                        },
                    })
                );
            } else {
                println!("{}", describe(&s));
            }
            Ok(ExitCode::SUCCESS)
        }
        SystemCmd::Halt(c) | SystemCmd::Resume(c) if c.by.trim().is_empty() => {
            Err(anyhow!("--by must name who changes the switch"))
        }
        SystemCmd::Halt(c) => change(cfg, &store, false, &c).await,
        SystemCmd::Resume(c) => change(cfg, &store, true, &c).await,
    }
}

async fn change(cfg: &Config, store: &kv::Store, enable: bool, c: &Change) -> Result<ExitCode> {
    let rev = put(store, TRADING_ENABLED, enable).await?;
    if enable {
        let s = read(store).await?;
        if s.kill_switch == Some(true) {
            put(store, KILL_SWITCH, false).await?;
            println!("cleared system/{KILL_SWITCH} (it was true)");
        }
    }
    let s = read(store).await?;
    println!(
        "system/{TRADING_ENABLED} = {enable} (revision {rev}); {}",
        describe(&s)
    );
    if s.enabled() != enable {
        return Err(anyhow!(
            "the switch did not take: {}; another writer may have changed it",
            describe(&s)
        ));
    }
    match mirror(cfg, enable, c).await {
        Ok(()) => println!(
            "mirrored to {}.{} key {TRADING_ENABLED}",
            cfg.mongo.bot_core_db,
            names::SYSTEM_CONFIG
        ),
        // The switch itself is in force; only the Bot Core view is stale.
        Err(e) => eprintln!(
            "warning: trading is {} but the Bot Core mirror was not updated: {e:#}; run the command again once MongoDB is back",
            if enable { "enabled" } else { "halted" }
        ),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::Bson;

    fn sw(config: Option<bool>, te: Option<bool>, kill: Option<bool>) -> Switch {
        Switch {
            config,
            trading_enabled: te,
            kill_switch: kill,
        }
    }

    #[test]
    fn the_switch_follows_cerebros_rule() {
        assert!(sw(None, None, None).enabled(), "default: trading");
        assert!(!sw(Some(false), None, None).enabled());
        assert!(
            sw(Some(false), Some(true), None).enabled(),
            "key overrides config"
        );
        assert!(!sw(Some(true), Some(false), None).enabled());
        assert!(
            !sw(None, Some(true), Some(true)).enabled(),
            "kill_switch wins"
        );
        assert!(sw(None, Some(true), Some(false)).enabled());
    }

    #[test]
    fn the_mirror_is_a_seed_system_config_entry() {
        let c = Change {
            by: "pm".into(),
            reason: Some("broker outage".into()),
        };
        let u = mirror_update(false, &c);
        let set = u.get_document("$set").unwrap();
        assert_eq!(set.get("value"), Some(&Bson::Boolean(false)));
        assert_eq!(set.get_str("category").unwrap(), "trading");
        assert_eq!(set.get_str("updated_by").unwrap(), "pm");
        assert!(set
            .get_str("description")
            .unwrap()
            .contains("halted by pm: broker outage"));
        assert!(u
            .get_document("$setOnInsert")
            .unwrap()
            .contains_key("created_at"));
    }
}
