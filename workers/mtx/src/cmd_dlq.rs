//! `mtx dlq list | show | redrive`: the dead letters the sink persisted
//! (`dead_letters` in the trading database), and sending fixed ones back
//! through their stage (published again on their original subject).

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mtx_runtime::config::Config;
use mtx_sink::ops::{self, DeadLetterFilter};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `mtx dlq ...`
#[derive(Subcommand)]
pub enum DlqCmd {
    /// Dead letters, newest first.
    List {
        /// Only this stage (`standardizer`, `cerebro`, `sink`, ...).
        #[arg(long)]
        stage: Option<String>,
        /// Only this reason (`validation_failed`, `max_deliveries`, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only those about this signal.
        #[arg(long)]
        signal: Option<String>,
        /// Leave out the ones already redriven.
        #[arg(long)]
        pending: bool,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter with its headers and payload.
    Show {
        /// Its `dead_letter_id` (or an unambiguous prefix).
        id: String,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Publish dead letters back on their original subject.
    Redrive {
        /// `dead_letter_id`s (or unambiguous prefixes).
        #[arg(required = true)]
        ids: Vec<String>,
        /// Send this file's bytes instead of the stored payload (one id only).
        #[arg(long)]
        payload_file: Option<PathBuf>,
        /// Print what would be sent; send nothing.
        #[arg(long)]
        dry_run: bool,
        /// Send a letter again even if it was already redriven with the same
        /// bytes (without it such a letter is skipped, so repeating a command
        /// that failed half-way cannot send one twice).
        #[arg(long)]
        again: bool,
    },
}

/// Run a `dlq` subcommand.
pub async fn run(cmd: DlqCmd, cfg: &Config) -> Result<ExitCode> {
    let store = mtx_sink::Store::connect(&cfg.mongo, Duration::from_secs(30))
        .await
        .context("connecting to MongoDB")?;
    match cmd {
        DlqCmd::List {
            stage,
            reason,
            signal,
            pending,
            limit,
            json,
        } => {
            let filter = DeadLetterFilter {
                stage,
                reason,
                signal_id: signal,
                pending_only: pending,
                limit,
            };
            let list = ops::list_dead_letters(&store, &filter).await?;
            for d in &list {
                if json {
                    println!("{}", ops::to_json(d));
                } else {
                    println!("{}", ops::dead_letter_line(d));
                }
            }
            if !json {
                println!("{} dead letter(s)", list.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCmd::Show { id, json } => {
            let d = ops::find_dead_letter(&store, &id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ops::to_json(&d))?);
            } else {
                print!("{}", ops::render_dead_letter(&d));
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCmd::Redrive {
            ids,
            payload_file,
            dry_run,
            again,
        } => {
            if payload_file.is_some() && ids.len() != 1 {
                bail!("--payload-file replaces the payload of exactly one dead letter");
            }
            let payload = match &payload_file {
                Some(p) => {
                    Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?)
                }
                None => None,
            };
            let letters = {
                let mut v = Vec::new();
                for id in &ids {
                    v.push(ops::find_dead_letter(&store, id).await?);
                }
                v
            };
            if dry_run {
                for d in &letters {
                    let body = payload.clone().unwrap_or_else(|| ops::payload_bytes(d));
                    match ops::earlier_redrive(d, &body).filter(|_| !again) {
                        Some(r) => println!(
                            "would skip dead letter {}: already redriven with these bytes as {} (--again sends it once more)",
                            ops::show(d.get("dead_letter_id")),
                            ops::show(r.get("msg_id"))
                        ),
                        None => println!(
                            "would publish {} bytes on {} (dead letter {})",
                            body.len(),
                            ops::show(d.get("original_subject")),
                            ops::show(d.get("dead_letter_id"))
                        ),
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let (_client, js) = mtx_runtime::nats::connect(&cfg.nats, None)
                .await
                .with_context(|| format!("connecting to NATS at {}", cfg.nats.url))?;
            let mut failed = 0;
            for d in &letters {
                match ops::redrive(&store, &js, d, payload.clone(), again).await {
                    Ok(r) if r.duplicate => println!(
                        "already redriven {} -> {} seq {} as {}: not sent again{}",
                        r.dead_letter_id,
                        r.subject,
                        r.seq,
                        r.msg_id,
                        if again {
                            ""
                        } else {
                            " (--again sends it once more)"
                        }
                    ),
                    Ok(r) => println!(
                        "redriven {} -> {} seq {}{}",
                        r.dead_letter_id,
                        r.subject,
                        r.seq,
                        if r.payload_changed {
                            " with the fixed payload"
                        } else {
                            ""
                        }
                    ),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{}: {e}", ops::show(d.get("dead_letter_id")));
                    }
                }
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
