//! `mtx`: the one binary of the Mathematricks trading pipeline.
//!
//! - `mtx run all | <worker>...`: run worker pools in this process.
//! - `mtx topology apply | check | export`: manage the JetStream topology.
//! - `mtx config check | show`: validate / print the effective configuration.
//! - `mtx market price <symbol> <price>`: publish a mark by hand.
//! - `mtx signal send <file.json>`: replay a sender fixture file through the gateway.
//! - `mtx secrets set <strategy>`: store the hash of a strategy's secret (read from stdin).
//! - `mtx db migrate`: create / update collections, validators, indexes; record the schema version.
//! - `mtx dlq list | show | redrive`: inspect dead letters and send fixed ones back.
//! - `mtx signal show <signal_id>`: one signal's lifecycle from Mongo.
//! - `mtx bench sink`: sink throughput against a plain `insert_many` loop.
//! - `mtx backtest ingest`, `mtx strategies ...`, `mtx optimize`, `mtx allocations ...`:
//!   backtests, the strategy registry, portfolio optimisation and allocation approval.
//! - `mtx bench pipeline`: end-to-end throughput / latency against a pass-through chain.

/// mimalloc rather than the system allocator: every message allocates its
/// decoded body, headers and outputs, and glibc's malloc took ~30 % of the
/// pipeline's CPU in a profile of `mtx bench pipeline`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cmd_allocations;
mod cmd_backtest;
mod cmd_bench;
mod cmd_bench_pipeline;
mod cmd_db;
mod cmd_dlq;
mod cmd_market;
mod cmd_optimize;
mod cmd_portfolio;
mod cmd_secrets;
mod cmd_signal;
mod cmd_signal_show;
mod cmd_strategies;
mod cmd_system;
mod passthrough;
mod workers;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "mtx", version, about = "Mathematricks trading pipeline")]
struct Cli {
    /// Config file (default: ./mtx.toml if present). `MTX_*` env overrides it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run worker pools: `all`, or one or more of the names `mtx run --list` prints.
    Run {
        /// Workers to run.
        workers: Vec<String>,
        /// List the workers this build has and exit.
        #[arg(long)]
        list: bool,
    },
    /// Manage streams, consumers and KV buckets.
    Topology {
        #[command(subcommand)]
        cmd: TopologyCmd,
    },
    /// Configuration.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// The kill switch: `mtx system show | halt | resume`.
    System {
        #[command(subcommand)]
        cmd: cmd_system::SystemCmd,
    },
    /// Market data by hand: `mtx market price <symbol> <price>`.
    Market {
        #[command(subcommand)]
        cmd: cmd_market::MarketCmd,
    },
    /// Send signals to the gateway; show a signal's lifecycle.
    Signal {
        #[command(subcommand)]
        cmd: cmd_signal_show::SignalCmd,
    },
    /// Per-strategy gateway secrets.
    Secrets {
        #[command(subcommand)]
        cmd: cmd_secrets::SecretsCmd,
    },
    /// MongoDB schema: `mtx db migrate`.
    Db {
        #[command(subcommand)]
        cmd: cmd_db::DbCmd,
    },
    /// Dead letters: list, show, redrive.
    Dlq {
        #[command(subcommand)]
        cmd: cmd_dlq::DlqCmd,
    },
    /// Benchmarks: `mtx bench sink`, `mtx bench pipeline`.
    Bench {
        #[command(subcommand)]
        cmd: cmd_bench::BenchCmd,
    },
    /// Backtest data: `mtx backtest ingest <files or folders>`.
    Backtest {
        #[command(subcommand)]
        cmd: cmd_backtest::BacktestCmd,
    },
    /// Strategy registry (Mongo) and its KV mirror: list, show, set, load, sync.
    Strategies {
        #[command(subcommand)]
        cmd: cmd_strategies::StrategiesCmd,
    },
    /// Optimise the allocation of the ACTIVE strategies; stores a run and a pending allocation.
    Optimize(cmd_optimize::OptimizeArgs),
    /// Portfolio allocations: list, show, approve, edit.
    Allocations {
        #[command(subcommand)]
        cmd: cmd_allocations::AllocationsCmd,
    },
}

#[derive(Subcommand)]
enum TopologyCmd {
    /// Create or update everything (idempotent).
    Apply,
    /// Exit non-zero and print the differences when the server disagrees.
    Check,
    /// Write stream and consumer configs as `nats` CLI JSON.
    Export {
        /// Output folder.
        #[arg(long, default_value = "subjects/topology")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Validate and exit 0, or print the problem and exit 2.
    Check,
    /// Print the effective configuration (secrets redacted) as JSON.
    Show,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    if let Cmd::Bench {
        cmd: cmd_bench::BenchCmd::Pipeline(a),
    } = &cli.cmd
    {
        // The workers of the bench log at their own level (default warn).
        cfg.log.level = a.log_level.clone();
    }
    mtx_runtime::telemetry::init(&cfg.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.cmd, cfg)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cmd: Cmd, cfg: Config) -> Result<ExitCode> {
    match cmd {
        Cmd::Config {
            cmd: ConfigCmd::Check,
        } => {
            println!("config ok");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config {
            cmd: ConfigCmd::Show,
        } => {
            let mut shown = cfg.clone();
            for s in [&mut shown.nats.password, &mut shown.nats.token] {
                if s.is_some() {
                    *s = Some("***".into());
                }
            }
            println!("{}", serde_json::to_string_pretty(&shown)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Topology { cmd } => topology(cmd, cfg).await,
        Cmd::System { cmd } => cmd_system::run(cmd, &cfg).await,
        Cmd::Market { cmd } => cmd_market::run(cmd, &cfg).await,
        Cmd::Signal { cmd } => cmd_signal_show::run(cmd, &cfg).await,
        Cmd::Secrets { cmd } => cmd_secrets::run(cmd, &cfg).await,
        Cmd::Db { cmd } => cmd_db::run(cmd, &cfg).await,
        Cmd::Dlq { cmd } => cmd_dlq::run(cmd, &cfg).await,
        Cmd::Bench { cmd } => cmd_bench::run(cmd, &cfg).await,
        Cmd::Backtest { cmd } => cmd_backtest::run(cmd, &cfg).await,
        Cmd::Strategies { cmd } => cmd_strategies::run(cmd, &cfg).await,
        Cmd::Optimize(args) => cmd_optimize::run(args, &cfg).await,
        Cmd::Allocations { cmd } => cmd_allocations::run(cmd, &cfg).await,
        Cmd::Run { workers, list } => {
            if list {
                for w in workers::ALL {
                    println!("{w}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            run(workers, cfg).await
        }
    }
}

async fn topology(cmd: TopologyCmd, cfg: Config) -> Result<ExitCode> {
    let topo = mtx_subjects::Topology::build(&cfg.topology);
    if let TopologyCmd::Export { dir } = cmd {
        let files = mtx_subjects::apply::export(&topo, &dir)
            .with_context(|| format!("writing {}", dir.display()))?;
        println!("wrote {} files under {}", files.len(), dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    let client = async_nats::ConnectOptions::new()
        .name("mtx-topology")
        .connection_timeout(std::time::Duration::from_secs(5));
    let client = match (&cfg.nats.user, &cfg.nats.password) {
        (Some(u), Some(p)) => client.user_and_password(u.clone(), p.clone()),
        _ => client,
    };
    let client = client
        .connect(cfg.nats.url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", cfg.nats.url))?;
    let js = async_nats::jetstream::new(client);
    match cmd {
        TopologyCmd::Apply => {
            let r = mtx_subjects::apply::apply(&js, &topo).await?;
            for o in &r.created {
                println!("created   {o}");
            }
            for o in &r.updated {
                println!("updated   {o}");
            }
            println!(
                "topology applied: {} created, {} updated, {} unchanged",
                r.created.len(),
                r.updated.len(),
                r.unchanged.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        TopologyCmd::Check => {
            let drift = mtx_subjects::apply::check(&js, &topo).await?;
            if drift.is_empty() {
                println!("topology matches the server");
                Ok(ExitCode::SUCCESS)
            } else {
                for d in &drift {
                    println!("drift: {d}");
                }
                println!("{} difference(s); run `mtx topology apply`", drift.len());
                Ok(ExitCode::from(1))
            }
        }
        TopologyCmd::Export { .. } => Ok(ExitCode::SUCCESS),
    }
}

async fn run(names: Vec<String>, cfg: Config) -> Result<ExitCode> {
    let selected = workers::select(&names)?;
    let shutdown = mtx_runtime::shutdown::on_signals();
    let mut process = Process::start(cfg, shutdown)
        .await
        .context("starting the process")?;
    for w in &selected {
        workers::spawn(w, &mut process).await?;
    }
    tracing::info!(workers = ?selected, "running");
    process.wait().await;
    Ok(ExitCode::SUCCESS)
}
