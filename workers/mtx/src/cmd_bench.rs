//! `mtx bench sink`: the same N documents written by the sink and by a plain
//! `insert_many` loop to the same MongoDB, in the same run, against the
//! configured servers (fresh databases and stream prefix, dropped after).
//!
//! `mtx bench pipeline`: end-to-end throughput and latency of the pipeline
//! against a pass-through chain on the same broker ([`crate::cmd_bench_pipeline`]).

use anyhow::Result;
use clap::Subcommand;
use mtx_runtime::config::Config;
use mtx_sink::bench::{self, BenchOptions};
use std::process::ExitCode;
use std::time::Duration;

/// `mtx bench ...`
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Sink throughput against a plain `insert_many` loop (goal: ratio ≥ 0.9).
    Sink {
        /// Documents per side and round.
        #[arg(long, short, default_value_t = 2_000)]
        n: usize,
        /// Rounds (the side that goes first alternates).
        #[arg(long, default_value_t = 4)]
        rounds: usize,
        /// Keep the bench databases and streams.
        #[arg(long)]
        keep: bool,
        /// Give up on a round after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// Pipeline throughput and latency (standardizer → cerebro → execution →
    /// accounts) against a pass-through chain of as many JetStream hops
    /// (goals: ≥ 10,000 signals/s and ≥ 0.5 of the pass-through flat out;
    /// p99 raw→order ≤ 5 ms, p50 ≤ 1.5 ms at --rate 1000).
    Pipeline(crate::cmd_bench_pipeline::PipelineArgs),
}

/// Run a `bench` subcommand.
pub async fn run(cmd: BenchCmd, cfg: &Config) -> Result<ExitCode> {
    let (n, rounds, keep, timeout_secs) = match cmd {
        BenchCmd::Sink {
            n,
            rounds,
            keep,
            timeout_secs,
        } => (n, rounds, keep, timeout_secs),
        BenchCmd::Pipeline(args) => return crate::cmd_bench_pipeline::run(args, cfg).await,
    };
    let r = bench::run(
        cfg,
        &BenchOptions {
            n,
            rounds,
            keep,
            timeout: Duration::from_secs(timeout_secs),
        },
    )
    .await?;
    println!(
        "sink bench: {} standardized_signals documents per side, batch {}, {}",
        n,
        cfg.worker.batch_size,
        cfg.mongo.uri.split('@').next_back().unwrap_or_default()
    );
    for (i, x) in r.rounds.iter().enumerate() {
        println!(
            "round {}{}: plain insert_many {:>8.0} docs/s ({:.2} s)   sink {:>8.0} docs/s ({:.2} s, {} batches)   ratio {:.2}",
            i + 1,
            if x.sink_first { " (sink first)" } else { "" },
            x.plain_rate(),
            x.plain_secs,
            x.sink_rate(),
            x.sink_secs,
            x.sink_batches,
            x.ratio()
        );
    }
    println!(
        "total: plain {:.0} docs/s, sink {:.0} docs/s, ratio {:.2} (median of rounds {:.2})",
        r.plain_rate(),
        r.sink_rate(),
        r.ratio(),
        r.median_ratio()
    );
    Ok(ExitCode::SUCCESS)
}
