//! `mtx db migrate`: create or update every documented collection of both
//! databases (validators, indexes, TTLs, the `market_data` time series) and
//! record the schema version in `system_config`. Idempotent: a second run
//! prints `nothing to do`. Exit 1 when something could not be migrated.

use anyhow::{Context, Result};
use clap::Subcommand;
use mtx_runtime::config::Config;
use std::process::ExitCode;
use std::time::Duration;

/// `mtx db ...`
#[derive(Subcommand)]
pub enum DbCmd {
    /// Create / update collections, validators and indexes of
    /// `mongo.trading_db` and `mongo.bot_core_db`; record the schema version.
    Migrate {
        /// Also list what was left alone (extra indexes, rules no validator
        /// can hold).
        #[arg(long, short)]
        verbose: bool,
    },
}

/// Run a `db` subcommand.
pub async fn run(cmd: DbCmd, cfg: &Config) -> Result<ExitCode> {
    let DbCmd::Migrate { verbose } = cmd;
    let store = mtx_sink::Store::connect(&cfg.mongo, Duration::from_secs(60))
        .await
        .context("connecting to MongoDB")?;
    let r = mtx_sink::migrate(&store, &cfg.mongo)
        .await
        .context("migrating")?;
    for c in &r.changes {
        println!("{c}");
    }
    if verbose {
        for n in &r.notes {
            println!("note: {n}");
        }
    }
    for p in &r.problems {
        eprintln!("problem: {p}");
    }
    let from = r.from_version.as_deref().unwrap_or("none");
    if !r.problems.is_empty() {
        eprintln!(
            "migration incomplete: {} problem(s); schema version left at {from}",
            r.problems.len()
        );
        return Ok(ExitCode::from(1));
    }
    if r.is_noop() {
        println!(
            "nothing to do: {} and {} are at schema {}",
            cfg.mongo.trading_db, cfg.mongo.bot_core_db, r.to_version
        );
    } else {
        println!(
            "migrated {} and {}: schema {from} -> {} ({} change(s))",
            cfg.mongo.trading_db,
            cfg.mongo.bot_core_db,
            r.to_version,
            r.changes.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
