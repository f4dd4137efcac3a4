//! `mtx signal show <signal_id>`: one signal's whole lifecycle from Mongo
//! (raw → standardized → decision with its reason and numbers → orders and
//! their status history → fills → the resulting position), plus its dead
//! letters. [`SignalCmd`] adds `show` next to the `signal` subcommands of
//! [`crate::cmd_signal`].

use crate::cmd_signal;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use mtx_runtime::config::Config;
use std::process::ExitCode;
use std::time::Duration;

/// `mtx signal ...`: the gateway's subcommands plus `show`.
#[derive(Subcommand)]
pub enum SignalCmd {
    #[command(flatten)]
    Gateway(cmd_signal::SignalCmd),
    /// Print one signal's lifecycle from MongoDB.
    Show(ShowArgs),
}

/// `mtx signal show` arguments.
#[derive(Args)]
pub struct ShowArgs {
    /// The mtx signal id (`sig_...`).
    pub signal_id: String,
    /// Every document as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Run a `signal` subcommand.
pub async fn run(cmd: SignalCmd, cfg: &Config) -> Result<ExitCode> {
    match cmd {
        SignalCmd::Gateway(c) => cmd_signal::run(c, cfg).await,
        SignalCmd::Show(a) => show(a, cfg).await,
    }
}

async fn show(a: ShowArgs, cfg: &Config) -> Result<ExitCode> {
    let store = mtx_sink::Store::connect(&cfg.mongo, Duration::from_secs(30))
        .await
        .context("connecting to MongoDB")?;
    let life = mtx_sink::ops::signal_lifecycle(&store, &a.signal_id).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&life.to_json())?);
    } else {
        print!("{}", life.render());
    }
    if life.is_empty() {
        eprintln!("nothing in {} about {}", cfg.mongo.trading_db, a.signal_id);
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
