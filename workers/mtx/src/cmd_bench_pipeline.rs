//! `mtx bench pipeline`: end-to-end throughput and latency of the pipeline
//! (standardizer → cerebro → execution → accounts; the sink has its own
//! bench, `mtx bench sink`) against the broker's ceiling, in one run.
//!
//! # What it does
//!
//! 1. **Setup** on the configured NATS: a fresh topology prefix (unless
//!    `--prefix`), `topology apply`, `--strategies` strategies routed
//!    round-robin to `--accounts` accounts in the `strategies` bucket, an
//!    `active` allocation splitting each account's equity between its
//!    strategies, and (in-process) `accounts.initial_balances` overrides so
//!    every account has a state before the first signal.
//! 2. **Pipeline**: the four pools started in this process by the code
//!    `mtx run` uses ([`crate::workers::spawn`] into a
//!    [`Process`]), or, with `--external`, already running elsewhere on the
//!    same prefix. `--signals` synthetic raw signals from `mtx-load` (entries
//!    and exits, single and two-leg, every strategy) are published at
//!    `--rate` or flat out, then the bench waits until every pipeline
//!    consumer has nothing pending and nothing unacknowledged.
//! 3. **Pass-through** (unless `--no-passthrough`): the same signals through
//!    [`crate::passthrough`], five hops of the same consume loop that only
//!    forward bytes: the broker's ceiling on this machine.
//! 4. **Read back** every stream (not timed) and compute the figures below;
//!    print a table, write `--out` as JSON; delete what the run created
//!    (unless `--keep`, or the prefix was given).
//!
//! # What is measured, and from which clock
//!
//! Every time is a wall-clock Unix timestamp of this host: the raw signal's
//! `Mtx-Received-At` header (stamped by the load generator right before its
//! publish, copied by the runtime onto every output), and the **JetStream
//! store timestamp** of each message (the server's clock when it stored the
//! message, read back from the stream afterwards). So "raw → order" is the
//! store time of the `ORDERS` message minus the raw signal's receive time:
//! the order is durably published at that instant, whatever a consumer's
//! own scheduling adds. No observer subscription is used (it would load the
//! server and this process, and measure the observer's scheduling delay).
//! The server and this process share one clock when the server is local;
//! against a remote server, clock offset adds to every latency.
//!
//! A valid signal is **completed** when it has a decision and every order
//! of it is filled (or ended) in `EXECUTIONS`; all pipeline consumers being
//! quiet means every fill was booked by accounts and its state published.
//! Throughput is completed signals over the time from the first raw publish
//! to the last account state (or fill, or decision) stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream;
use indicatif::{ProgressBar, ProgressStyle};
use mtx_load::measure::{self, Stored, Summary, Usage, UsageDelta};
use mtx_load::{Expect, LoadSignal, LoadSpec, Pace};
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_schemas::headers;
use mtx_schemas::order::account_state_key;
use mtx_schemas::strategy::StrategyConfig;
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::{Subjects, Topology};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::passthrough::{self, Chain};

/// The pools the pipeline bench runs (the sink is benchmarked by `mtx bench sink`).
pub const POOLS: &[&str] = &["standardizer", "cerebro", "execution", "accounts"];

/// How often the bench asks the server about every pipeline consumer while
/// it runs (progress, quiet detection). Each poll is one JetStream API
/// request per consumer, work the server does beside the pipeline; the
/// figures come from stored timestamps, so polling faster would only add
/// load to what is measured.
const POLL: Duration = Duration::from_millis(100);

/// Pipeline consumers, in data-flow order (all must be quiet at the end).
const PIPELINE_CONSUMERS: &[(&str, &str)] = &[
    (streams::SIGNALS_RAW, "standardizer"),
    (streams::SIGNALS_STANDARDIZED, "cerebro"),
    (streams::ORDERS, "execution"),
    (streams::ORDERS, "accounts_orders"),
    (streams::ORDER_EVENTS, "accounts_order_events"),
    (streams::EXECUTIONS, "accounts"),
];

/// `mtx bench pipeline` options.
#[derive(clap::Args, Debug, Clone)]
pub struct PipelineArgs {
    /// Signals to publish (all valid: entries, exits, pairs).
    #[arg(long, default_value_t = 20_000)]
    pub signals: usize,
    /// Signals per second; absent: flat out.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Flat out: messages sent before awaiting their acks.
    #[arg(long, default_value_t = 500)]
    pub publish_batch: usize,
    /// Strategies (round-robin over the accounts).
    #[arg(long, default_value_t = 16)]
    pub strategies: usize,
    /// Accounts.
    #[arg(long, default_value_t = 4)]
    pub accounts: usize,
    /// Starting cash of every bench account.
    #[arg(long, default_value_t = 1_000_000_000)]
    pub balance: u64,
    /// Share of entries with two legs.
    #[arg(long, default_value_t = 0.2)]
    pub pairs_ratio: f64,
    /// Share of entries followed by an exit.
    #[arg(long, default_value_t = 0.5)]
    pub exit_ratio: f64,
    /// An exit is published at least this many signals after its entry (1 s
    /// at `--rate 1000`), so it closes a filled position as a real exit does.
    /// Small gaps measure exits racing their entry's fill: Cerebro defers them
    /// (`cerebro.defer_retry_ms`) until the fill is booked.
    #[arg(long, default_value_t = 1000)]
    pub exit_gap: usize,
    /// Seed of the signal mix.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Only generate and measure: the pools run in other processes on
    /// `--prefix` (or `topology.prefix`), with the bench accounts in their
    /// `accounts.initial_balances` (`MTX_ACCOUNTS__INITIAL_BALANCES__BENCH_A1=1000000000`
    /// ... for `bench_a1`..`bench_a<accounts>`). The bench writes strategies and
    /// the `active` allocation of that prefix: never point it at production.
    #[arg(long)]
    pub external: bool,
    /// Topology prefix (default: a fresh one per run, deleted afterwards).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Skip the pass-through chain (no broker ceiling, no ratio).
    #[arg(long)]
    pub no_passthrough: bool,
    /// Consumer hops of the pass-through chain: 5 (the default) are the
    /// pipeline's stages; more insert fill-sized hops before the state, to
    /// measure the broker's ceiling for as many messages per signal as the
    /// pipeline sends (e.g. 8). The ratio is then against that chain.
    #[arg(long, default_value_t = passthrough::HOPS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(passthrough::HOPS as u64..=passthrough::MAX_HOPS as u64))]
    pub passthrough_hops: usize,
    /// Keep the streams and buckets of the run.
    #[arg(long)]
    pub keep: bool,
    /// Give up waiting for the pipeline to finish this long after the last publish.
    #[arg(long, default_value_t = 300)]
    pub timeout_secs: u64,
    /// Log filter for the workers of this process (per-signal info lines cost CPU).
    #[arg(long, default_value = "warn")]
    pub log_level: String,
}

// ---- report ------------------------------------------------------------------

/// The JSON report (`--out`).
#[derive(Debug, Serialize)]
pub struct Report {
    /// Always `pipeline`.
    pub bench: &'static str,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// `in_process` or `external`.
    pub mode: &'static str,
    /// What was run.
    pub settings: Settings,
    /// The pipeline's figures.
    pub pipeline: PhaseReport,
    /// The pass-through chain's figures.
    pub passthrough: Option<PhaseReport>,
    /// Pipeline throughput / pass-through throughput.
    pub ratio: Option<f64>,
    /// Host CPU seconds per completed signal, pass-through over pipeline:
    /// the share of the pipeline's CPU cost (its process and the server)
    /// that the broker hops alone take. When both phases keep the host
    /// equally busy (flat out, CPU bound), `ratio` follows it, so it says
    /// how much cheaper per signal the pipeline must get to reach a ratio.
    pub cpu_ratio: Option<f64>,
    /// The broker's own round trips, one at a time, before the run.
    pub broker_round_trips: BTreeMap<String, Summary>,
    /// The issue's goals, checked against this run.
    pub goals: BTreeMap<String, Option<bool>>,
    /// How the figures were taken.
    pub method: BTreeMap<&'static str, &'static str>,
}

/// Settings of the run.
#[derive(Debug, Serialize)]
pub struct Settings {
    /// Signals published.
    pub signals: usize,
    /// `flat_out` or `rate`.
    pub pace: &'static str,
    /// Signals per second when paced.
    pub rate: Option<f64>,
    /// Flat-out publish batch.
    pub publish_batch: usize,
    /// Strategies.
    pub strategies: usize,
    /// Accounts.
    pub accounts: usize,
    /// Pair share.
    pub pairs_ratio: f64,
    /// Exit share.
    pub exit_ratio: f64,
    /// Minimum signals between an entry and its exit.
    pub exit_gap: usize,
    /// Seed.
    pub seed: u64,
    /// Topology prefix.
    pub prefix: String,
    /// NATS URL.
    pub nats_url: String,
    /// Stream storage.
    pub storage: String,
    /// Stream replicas.
    pub replicas: usize,
    /// `worker.batch_size`.
    pub batch_size: usize,
    /// `worker.concurrency`.
    pub concurrency: usize,
    /// Log filter of the workers.
    pub log_level: String,
    /// CPUs of this host.
    pub host_cpus: usize,
    /// nats-server pid, when found locally.
    pub server_pid: Option<u32>,
    /// Consumer hops of the pass-through chain (5: the pipeline's stages).
    pub passthrough_hops: usize,
    /// The Go runtime variables (`GOGC`, `GOMEMLIMIT`, `GOMAXPROCS`,
    /// `GODEBUG`) the local nats-server runs with: empty = Go's defaults,
    /// `None` = not known (remote server). Its garbage collector makes the
    /// latency tail at a steady rate, so a report must say how it was tuned.
    pub server_go_env: Option<BTreeMap<String, String>>,
}

/// Figures of one phase (pipeline or pass-through).
#[derive(Debug, Default, Serialize)]
pub struct PhaseReport {
    /// Valid signals published.
    pub expected: usize,
    /// Signals that went all the way.
    pub completed: usize,
    /// Signals the publisher had acked.
    pub published: usize,
    /// Publishes the server reported as duplicates.
    pub duplicates: usize,
    /// The pipeline did not go quiet within `--timeout-secs`.
    pub timed_out: bool,
    /// First raw publish to the last completion, seconds.
    pub wall_secs: f64,
    /// First raw publish to the bench seeing every consumer quiet, seconds.
    pub quiet_secs: f64,
    /// Time the publisher took, seconds.
    pub publish_secs: f64,
    /// Completed signals per second.
    pub throughput_per_sec: f64,
    /// Completed entries (exits) per second, over the time from the first
    /// raw publish to the last entry (exit) completed.
    pub throughput_by_action: BTreeMap<String, f64>,
    /// End-to-end latencies (per order message / per fill message).
    pub latency: BTreeMap<String, Summary>,
    /// Per stage (pipeline) or per hop (pass-through) delays between store times.
    pub stages: BTreeMap<String, Summary>,
    /// Messages stored per stream kind.
    pub messages: BTreeMap<String, usize>,
    /// Mean body size per kind, bytes.
    pub sizes: BTreeMap<String, usize>,
    /// Decisions by `decision reason_code` (pipeline).
    pub decisions: BTreeMap<String, usize>,
    /// Dead letters by `stage reason`.
    pub dlq: BTreeMap<String, usize>,
    /// CPU, wall, peak RSS of this process; host and server CPU.
    pub usage: UsageDelta,
    /// What the workers' NATS connection sent and received during the phase
    /// (in-process only; the load generator's own publishes excluded).
    pub nats_traffic: Option<Traffic>,
    /// The runtime's counters at the end (in-process): messages by outcome,
    /// handler and publish-ack time sums, redeliveries, stage metrics.
    pub metrics: BTreeMap<String, f64>,
}

/// Bytes and messages over one NATS connection (payload + headers, no
/// protocol overhead), in total and per signal.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Traffic {
    /// Sent to the server (publishes, KV writes, API requests, acks).
    pub out_bytes: u64,
    /// Messages sent.
    pub out_messages: u64,
    /// Received from the server (deliveries, acks, KV reads, watches).
    pub in_bytes: u64,
    /// Messages received.
    pub in_messages: u64,
    /// `out_bytes / signals`.
    pub out_bytes_per_signal: f64,
    /// `in_bytes / signals`.
    pub in_bytes_per_signal: f64,
    /// `out_messages / signals`.
    pub out_messages_per_signal: f64,
}

fn counters(c: &async_nats::Client) -> [u64; 4] {
    let s = c.statistics();
    [
        s.out_bytes.load(Ordering::Relaxed),
        s.out_messages.load(Ordering::Relaxed),
        s.in_bytes.load(Ordering::Relaxed),
        s.in_messages.load(Ordering::Relaxed),
    ]
}

fn traffic(before: [u64; 4], after: [u64; 4], signals: usize) -> Traffic {
    let d: Vec<u64> = after
        .iter()
        .zip(before)
        .map(|(a, b)| a.saturating_sub(b))
        .collect();
    let n = signals.max(1) as f64;
    Traffic {
        out_bytes: d[0],
        out_messages: d[1],
        in_bytes: d[2],
        in_messages: d[3],
        out_bytes_per_signal: d[0] as f64 / n,
        in_bytes_per_signal: d[2] as f64 / n,
        out_messages_per_signal: d[1] as f64 / n,
    }
}

// ---- setup -------------------------------------------------------------------

struct Bench {
    args: PipelineArgs,
    cfg: Config,
    topo: Topology,
    js: jetstream::Context,
    routes: Vec<(String, String)>,
    accounts: Vec<String>,
    server_pid: Option<u32>,
    fresh_prefix: bool,
}

fn fresh_prefix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "bench{}x{:04x}",
        t.as_secs(),
        (t.subsec_nanos() ^ std::process::id()) & 0xffff
    )
}

fn nats_port(url: &str) -> Option<u16> {
    let first = url.split(',').next()?.trim();
    let rest = first.split("://").nth(1)?;
    let hostport = rest.rsplit('@').next()?;
    let (host, port) = hostport.rsplit_once(':')?;
    if !matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "0.0.0.0") {
        return None;
    }
    port.trim_end_matches('/').parse().ok()
}

impl Bench {
    async fn new(args: PipelineArgs, base: &Config) -> Result<Bench> {
        if args.signals == 0 || args.strategies == 0 || args.accounts == 0 {
            bail!("--signals, --strategies and --accounts must be > 0");
        }
        if args.rate.is_some_and(|r| r <= 0.0 || !r.is_finite()) {
            bail!("--rate must be > 0");
        }
        let mut cfg = base.clone();
        let given = args.prefix.clone().or_else(|| {
            (args.external && !cfg.topology.prefix.is_empty()).then(|| cfg.topology.prefix.clone())
        });
        if args.external && given.is_none() {
            bail!(
                "--external needs the topology prefix the running pools use (--prefix or \
                 topology.prefix); the bench writes strategies and the `active` allocation there"
            );
        }
        let fresh = given.is_none();
        cfg.topology.prefix = given.unwrap_or_else(fresh_prefix);
        cfg.metrics.addr = "127.0.0.1:0".into();
        // Lowercase: `MTX_ACCOUNTS__INITIAL_BALANCES__BENCH_A1` (env keys are
        // lowercased) configures external pools for `bench_a1`.
        let accounts: Vec<String> = (1..=args.accounts).map(|i| format!("bench_a{i}")).collect();
        let routes: Vec<(String, String)> = (0..args.strategies)
            .map(|i| {
                (
                    format!("Bench_S{:02}", i + 1),
                    accounts[i % accounts.len()].clone(),
                )
            })
            .collect();
        if !args.external {
            for a in &accounts {
                cfg.accounts
                    .initial_balances
                    .insert(a.clone(), Decimal::from(args.balance));
            }
        }
        cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (_client, js) = mtx_runtime::nats::connect(&cfg.nats, None)
            .await
            .with_context(|| format!("connecting to NATS at {}", cfg.nats.url))?;
        let topo = Topology::build(&cfg.topology);
        Ok(Bench {
            server_pid: nats_port(&cfg.nats.url).and_then(measure::pid_listening_on),
            args,
            cfg,
            topo,
            js,
            routes,
            accounts,
            fresh_prefix: fresh,
        })
    }

    fn bucket(&self, base: &str) -> Result<&str> {
        self.topo
            .bucket(base)
            .with_context(|| format!("topology has no bucket {base}"))
    }

    /// Topology, strategies, allocation.
    async fn setup(&self) -> Result<()> {
        tokio::time::timeout(
            Duration::from_secs(30),
            mtx_subjects::apply::apply(&self.js, &self.topo),
        )
        .await
        .context("topology apply timed out (is NATS up, with JetStream?)")?
        .context("topology apply")?;
        let strategies = self
            .js
            .get_key_value(self.bucket(buckets::STRATEGIES)?)
            .await?;
        let per_account = self.routes.len().div_ceil(self.accounts.len()).max(1);
        let pct = Decimal::from(100) / Decimal::from(per_account as u64);
        let mut alloc = serde_json::Map::new();
        for (id, account) in &self.routes {
            let mut s = StrategyConfig::new(id.clone());
            s.account = Some(account.clone());
            s.expected_alpha = Some(Decimal::new(5, 2));
            strategies
                .put(StrategyConfig::kv_key(id), serde_json::to_vec(&s)?.into())
                .await
                .with_context(|| format!("storing strategy {id}"))?;
            alloc.insert(id.clone(), Value::String(pct.normalize().to_string()));
        }
        self.js
            .get_key_value(self.bucket(buckets::ALLOCATIONS)?)
            .await?
            .put(
                "active",
                serde_json::to_vec(&serde_json::json!({
                    "allocation_id": "bench", "allocations": alloc
                }))?
                .into(),
            )
            .await
            .context("storing the allocation")?;
        Ok(())
    }

    /// Wait until every bench account has a state (Cerebro sizes against it).
    async fn wait_states(&self, within: Duration) -> Result<()> {
        let states = self
            .js
            .get_key_value(self.bucket(buckets::ACCOUNT_STATE)?)
            .await?;
        let deadline = Instant::now() + within;
        for a in &self.accounts {
            while states
                .get(account_state_key(a))
                .await
                .ok()
                .flatten()
                .is_none()
            {
                if Instant::now() > deadline {
                    let vars: Vec<String> = self
                        .accounts
                        .iter()
                        .map(|a| {
                            format!("MTX_ACCOUNTS__INITIAL_BALANCES__{a}={}", self.args.balance)
                        })
                        .collect();
                    bail!(
                        "account {a} has no state in {}: are the accounts workers running on prefix `{}` with {}?",
                        self.bucket(buckets::ACCOUNT_STATE)?,
                        self.cfg.topology.prefix,
                        vars.join(" ")
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    fn signals(&self) -> Result<Vec<LoadSignal>> {
        let mut spec = LoadSpec::new(
            self.args.signals,
            self.routes.iter().map(|(s, _)| s.clone()).collect(),
            format!("{}r", self.cfg.topology.prefix),
        );
        spec.environment = self.cfg.environment;
        spec.pairs_ratio = self.args.pairs_ratio;
        spec.exit_ratio = self.args.exit_ratio;
        spec.exit_gap = self.args.exit_gap;
        spec.seed = self.args.seed;
        // Sized like the sender: one strategy's allocation over ten, so the
        // pipeline orders ~10x the sender's quantities (small, never zero).
        let per_account = self.routes.len().div_ceil(self.accounts.len()).max(1) as u64;
        spec.sender_equity = (self.args.balance / per_account / 10).max(1) as i64;
        Ok(mtx_load::generate(
            &spec,
            &Subjects::new(&self.cfg.topology.prefix),
        )?)
    }

    fn pace(&self) -> Pace {
        match self.args.rate {
            Some(r) => Pace::Rate(r),
            None => Pace::FlatOut {
                batch: self.args.publish_batch.max(1),
            },
        }
    }

    async fn last_seqs(&self, names: &[String]) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for n in names {
            let seq = match self.js.get_stream(n).await {
                Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
                Err(_) => 0,
            };
            out.insert(n.clone(), seq + 1);
        }
        out
    }

    async fn cleanup(&self, chain: Option<&Chain>) {
        if self.args.keep {
            return;
        }
        if let Some(c) = chain {
            c.delete(&self.js).await;
        }
        if self.fresh_prefix && !self.args.external {
            for s in &self.topo.streams {
                let _ = self.js.delete_stream(&s.config.name).await;
            }
            for k in &self.topo.kv {
                let _ = self.js.delete_key_value(&k.config.bucket).await;
            }
        }
    }
}

// ---- driving a phase -----------------------------------------------------------

struct Driven {
    published: usize,
    duplicates: usize,
    publish_secs: f64,
    quiet_at: i128,
    timed_out: bool,
    usage: UsageDelta,
}

fn bar(n: usize, label: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(n as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}",
    ) {
        pb.set_style(style);
    }
    pb.set_prefix(label.to_string());
    pb
}

/// Publish `signals` at `pace` while polling `consumers` (in data-flow
/// order) until all are quiet twice in a row after the last publish.
/// Progress: the acked stream sequence of `consumers[progress]` since `base`.
#[allow(clippy::too_many_arguments)]
async fn drive(
    js: &jetstream::Context,
    env: mtx_schemas::Environment,
    signals: Arc<Vec<LoadSignal>>,
    pace: Pace,
    consumers: &[(String, String)],
    progress: (usize, u64),
    timeout: Duration,
    server_pid: Option<u32>,
    label: &str,
    dlq: Option<(String, u64)>,
) -> Result<Driven> {
    let pb = bar(signals.len(), label);
    let mut dead = 0u64;
    let mut polls = 0u64;
    measure::reset_peak_rss();
    let u0 = Usage::now(server_pid);
    let started = Instant::now();
    let published = Arc::new(AtomicUsize::new(0));
    let publisher = {
        let js = js.clone();
        let signals = signals.clone();
        let published = published.clone();
        tokio::spawn(async move {
            let r = mtx_load::publish(&js, env, &signals, pace, Duration::from_secs(60), |n| {
                published.store(n, Ordering::Relaxed)
            })
            .await;
            (r, started.elapsed())
        })
    };
    let mut publisher = Some(publisher);
    let mut publish_done: Option<(usize, f64, Instant)> = None;
    let mut calm_since: Option<i128> = None;
    let mut calm = 0;
    let (quiet_at, timed_out) = loop {
        tokio::time::sleep(POLL).await;
        if publisher.as_ref().is_some_and(|p| p.is_finished()) {
            let (r, took) = publisher.take().context("publisher")?.await?;
            let dups = r.context("publishing the signals")?;
            publish_done = Some((dups, took.as_secs_f64(), Instant::now()));
        }
        let polled_at = measure::unix_nanos();
        let mut quiet = true;
        let mut acked = 0;
        for (i, (stream, durable)) in consumers.iter().enumerate() {
            let info = async {
                let st = js.get_stream_no_info(stream).await.ok()?;
                st.consumer_info(durable).await.ok()
            }
            .await;
            match info {
                Some(info) => {
                    if info.num_pending > 0 || info.num_ack_pending > 0 {
                        quiet = false;
                    }
                    if i == progress.0 {
                        acked = info
                            .ack_floor
                            .stream_sequence
                            .saturating_sub(progress.1 - 1);
                    }
                }
                None => quiet = false,
            }
        }
        pb.set_position(acked.min(signals.len() as u64));
        polls += 1;
        if let Some((stream, start)) = dlq.as_ref().filter(|_| polls.is_multiple_of(40)) {
            if let Ok(mut st) = js.get_stream(stream).await {
                if let Ok(i) = st.info().await {
                    let now = (i.state.last_sequence + 1).saturating_sub(*start);
                    if dead == 0 && now > 0 {
                        pb.println(format!(
                            "dead letters are appearing on {stream} (the report counts them by stage and reason)"
                        ));
                    }
                    dead = now;
                }
            }
        }
        pb.set_message(format!(
            "published {}{}",
            published.load(Ordering::Relaxed),
            if dead > 0 {
                format!(", dead letters {dead}")
            } else {
                String::new()
            }
        ));
        let Some((_, _, done_at)) = publish_done else {
            continue;
        };
        if quiet {
            calm += 1;
            let since = *calm_since.get_or_insert(polled_at);
            if calm >= 2 {
                break (since, false);
            }
        } else {
            calm = 0;
            calm_since = None;
        }
        if done_at.elapsed() > timeout {
            break (measure::unix_nanos(), true);
        }
    };
    let usage = u0.delta(&Usage::now(server_pid));
    pb.finish_and_clear();
    let (duplicates, publish_secs, _) = publish_done.unwrap_or((0, 0.0, Instant::now()));
    Ok(Driven {
        published: published.load(Ordering::Relaxed),
        duplicates,
        publish_secs,
        quiet_at,
        timed_out,
        usage,
    })
}

// ---- reading back --------------------------------------------------------------

fn dec(v: &Value) -> Decimal {
    match v {
        Value::String(s) => s.parse().unwrap_or_default(),
        Value::Number(n) => n.to_string().parse().unwrap_or_default(),
        _ => Decimal::ZERO,
    }
}

fn nanos_header(m: &Stored, name: &str) -> Option<i128> {
    m.header(name).and_then(|v| v.parse().ok())
}

fn mean_size(items: &[&Stored]) -> usize {
    if items.is_empty() {
        return 0;
    }
    items.iter().map(|m| m.size).sum::<usize>() / items.len()
}

struct OrderRow {
    signal_id: String,
    stored_at: i128,
    quantity: Decimal,
}

/// Figures of the pipeline phase from what the streams stored.
async fn analyze_pipeline(
    b: &Bench,
    signals: &[LoadSignal],
    start: &HashMap<String, u64>,
    d: &Driven,
) -> Result<PhaseReport> {
    let name = |base: &str| b.topo.stream_name(base);
    let read = |base: &'static str, headers_only: bool| {
        let stream = name(base);
        let from = start.get(&stream).copied().unwrap_or(1);
        async move { measure::read_stream(&b.js, &stream, from, headers_only).await }
    };
    let ours: HashSet<&str> = signals.iter().map(|s| s.signal_id.as_str()).collect();
    let action: HashMap<&str, &'static str> = signals
        .iter()
        .map(|s| {
            let a = match s.expect {
                Expect::Entry { .. } => "entry",
                Expect::Exit { .. } => "exit",
                Expect::Bad => "bad",
            };
            (s.signal_id.as_str(), a)
        })
        .collect();
    let expected = signals.iter().filter(|s| s.expect != Expect::Bad).count();
    let sid = |m: &Stored| m.header(headers::SIGNAL_ID).map(str::to_string);

    let raw = read(streams::SIGNALS_RAW, true)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut recv: HashMap<String, i128> = HashMap::new();
    let mut raw_at: HashMap<String, i128> = HashMap::new();
    let mut raw_ours = Vec::new();
    for m in &raw {
        let Some(id) = sid(m).filter(|i| ours.contains(i.as_str())) else {
            continue;
        };
        if let Some(t) = nanos_header(m, headers::RECEIVED_AT) {
            recv.entry(id.clone()).or_insert(t);
        }
        raw_at.entry(id).or_insert(m.stored_at);
        raw_ours.push(m);
    }
    let std = read(streams::SIGNALS_STANDARDIZED, true)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut std_at: HashMap<String, i128> = HashMap::new();
    let mut std_ours = Vec::new();
    for m in &std {
        if let Some(id) = sid(m).filter(|i| ours.contains(i.as_str())) {
            std_at.entry(id).or_insert(m.stored_at);
            std_ours.push(m);
        }
    }
    let decs = read(streams::CEREBRO_DECISIONS, false)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut dec_at: HashMap<String, (i128, String)> = HashMap::new();
    let mut decisions: BTreeMap<String, usize> = BTreeMap::new();
    let mut dec_ours = Vec::new();
    for m in &decs {
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let id = v["signal_id"].as_str().unwrap_or_default().to_string();
        if !ours.contains(id.as_str()) || dec_at.contains_key(&id) {
            continue;
        }
        let kind = v["decision"].as_str().unwrap_or("?").to_string();
        *decisions
            .entry(format!(
                "{kind} {}",
                v["reason_code"].as_str().unwrap_or_default()
            ))
            .or_default() += 1;
        dec_at.insert(id, (m.stored_at, kind));
        dec_ours.push(m);
    }
    let ords = read(streams::ORDERS, false)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut orders: HashMap<String, OrderRow> = HashMap::new();
    let mut orders_of: HashMap<String, Vec<String>> = HashMap::new();
    let mut order_ours = Vec::new();
    let mut cancels = 0;
    for m in &ords {
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let id = v["signal_id"].as_str().unwrap_or_default().to_string();
        if !ours.contains(id.as_str()) {
            continue;
        }
        if !m.subject.ends_with(".new") {
            cancels += 1;
            continue;
        }
        let order_id = v["order_id"].as_str().unwrap_or_default().to_string();
        if orders.contains_key(&order_id) {
            continue;
        }
        orders_of
            .entry(id.clone())
            .or_default()
            .push(order_id.clone());
        orders.insert(
            order_id,
            OrderRow {
                signal_id: id,
                stored_at: m.stored_at,
                quantity: dec(&v["quantity"]),
            },
        );
        order_ours.push(m);
    }
    let execs = read(streams::EXECUTIONS, false)
        .await
        .map_err(anyhow::Error::msg)?;
    // order id → (filled, ended, first fill, last fill)
    let mut fills: HashMap<String, (Decimal, bool, i128, i128)> = HashMap::new();
    let mut fill_rows: Vec<(String, String, i128)> = Vec::new(); // (order, account, stored)
    let mut exec_ours = Vec::new();
    for m in &execs {
        let v: Value = serde_json::from_slice(&m.payload).unwrap_or_default();
        let order_id = v["order_id"].as_str().unwrap_or_default().to_string();
        if !orders.contains_key(&order_id) {
            continue;
        }
        let e = fills.entry(order_id.clone()).or_insert((
            Decimal::ZERO,
            false,
            m.stored_at,
            m.stored_at,
        ));
        e.0 += dec(&v["quantity"]);
        e.1 |= v["status"] == "REJECTED";
        e.3 = e.3.max(m.stored_at);
        e.2 = e.2.min(m.stored_at);
        fill_rows.push((
            order_id,
            v["account"].as_str().unwrap_or_default().to_string(),
            m.stored_at,
        ));
        exec_ours.push(m);
    }
    let events = read(streams::ORDER_EVENTS, true)
        .await
        .map_err(anyhow::Error::msg)?;
    let events_ours = events
        .iter()
        .filter(|m| sid(m).is_some_and(|i| ours.contains(i.as_str())))
        .count();
    let states = read(streams::ACCOUNTS, true)
        .await
        .map_err(anyhow::Error::msg)?;
    let subjects = Subjects::new(&b.cfg.topology.prefix);
    let mut state_at: HashMap<String, Vec<i128>> = HashMap::new();
    let mut state_ours = Vec::new();
    for m in &states {
        let acct = subjects
            .token(&m.subject, 1)
            .and_then(Result::ok)
            .unwrap_or_default();
        if b.accounts.contains(&acct) {
            state_at.entry(acct).or_default().push(m.stored_at);
            state_ours.push(m);
        }
    }
    for v in state_at.values_mut() {
        v.sort_unstable();
    }
    let dlq = read(streams::DLQ, true).await.map_err(anyhow::Error::msg)?;
    let mut dead: BTreeMap<String, usize> = BTreeMap::new();
    let mut dead_signals: HashSet<String> = HashSet::new();
    for m in &dlq {
        let Some(id) = sid(m).filter(|i| ours.contains(i.as_str())) else {
            continue;
        };
        *dead
            .entry(format!(
                "{} {}",
                m.header(headers::DLQ_STAGE).unwrap_or("?"),
                m.header(headers::DLQ_REASON).unwrap_or("?")
            ))
            .or_default() += 1;
        dead_signals.insert(id);
    }

    // Completion: decided, every order filled or ended, and each fill in a
    // state of its account (the first one stored after the fill).
    let booked_at = |acct: &str, t: i128| {
        state_at
            .get(acct)
            .and_then(|v| v.get(v.partition_point(|x| *x < t)).copied())
            .unwrap_or(t)
    };
    let mut account_of: HashMap<&str, &str> = HashMap::new();
    for (o, acct, _) in &fill_rows {
        account_of.insert(o.as_str(), acct.as_str());
    }
    let mut completed = 0;
    let mut done_at: Vec<(&'static str, i128)> = Vec::new();
    let mut to_complete: BTreeMap<String, Vec<i128>> = BTreeMap::new();
    for s in signals.iter().filter(|s| s.expect != Expect::Bad) {
        let Some((dt, _)) = dec_at.get(&s.signal_id) else {
            continue;
        };
        if dead_signals.contains(&s.signal_id) {
            continue;
        }
        let mut done = true;
        let mut at = *dt;
        for o in orders_of.get(&s.signal_id).into_iter().flatten() {
            let row = &orders[o];
            match fills.get(o) {
                Some((q, ended, _, last)) if *ended || *q >= row.quantity => {
                    let acct = account_of.get(o.as_str()).copied().unwrap_or_default();
                    at = at.max(booked_at(acct, *last));
                }
                _ => done = false,
            }
        }
        if done {
            completed += 1;
            let a = action.get(s.signal_id.as_str()).copied().unwrap_or("?");
            done_at.push((a, at));
            if let Some(r) = recv.get(&s.signal_id) {
                to_complete
                    .entry("raw_to_complete".into())
                    .or_default()
                    .push(at - r);
                to_complete
                    .entry(format!("raw_to_complete_{a}"))
                    .or_default()
                    .push(at - r);
            }
        }
    }
    let t0 = recv.values().copied().min().unwrap_or(0);
    let rate_of = |n: usize, end: Option<i128>| match end {
        Some(e) if e > t0 => n as f64 / ((e - t0) as f64 / 1e9),
        _ => 0.0,
    };
    let t_end = done_at.iter().map(|(_, t)| *t).max();
    let wall = t_end.map(|e| (e - t0).max(0) as f64 / 1e9).unwrap_or(0.0);
    let mut throughput_by_action = BTreeMap::new();
    for a in ["entry", "exit"] {
        let mine: Vec<i128> = done_at
            .iter()
            .filter(|(x, _)| *x == a)
            .map(|(_, t)| *t)
            .collect();
        throughput_by_action.insert(
            a.to_string(),
            rate_of(mine.len(), mine.iter().copied().max()),
        );
    }

    // Latencies.
    let mut lat: BTreeMap<String, Vec<i128>> = BTreeMap::new();
    let mut push = |k: &str, v: i128| lat.entry(k.to_string()).or_default().push(v);
    for row in orders.values() {
        if let Some(r) = recv.get(&row.signal_id) {
            let a = action.get(row.signal_id.as_str()).copied().unwrap_or("?");
            push("raw_to_order", row.stored_at - r);
            push(&format!("raw_to_order_{a}"), row.stored_at - r);
        }
    }
    for (order_id, _, at) in &fill_rows {
        let row = &orders[order_id];
        if let Some(r) = recv.get(&row.signal_id) {
            let a = action.get(row.signal_id.as_str()).copied().unwrap_or("?");
            push("raw_to_fill", at - r);
            push(&format!("raw_to_fill_{a}"), at - r);
        }
    }
    lat.extend(to_complete);
    let latency = lat
        .into_iter()
        .map(|(k, v)| (k, Summary::of_nanos(v)))
        .collect();

    // Stages.
    let mut st: BTreeMap<String, Vec<i128>> = BTreeMap::new();
    let mut stage = |k: &str, v: i128| st.entry(k.to_string()).or_default().push(v);
    for (id, r) in &recv {
        if let Some(ra) = raw_at.get(id) {
            stage("1_publish_raw", ra - r);
            if let Some(sa) = std_at.get(id) {
                stage("2_standardizer", sa - ra);
                if let Some((da, _)) = dec_at.get(id) {
                    let a = action.get(id.as_str()).copied().unwrap_or("?");
                    stage("3_cerebro", da - sa);
                    stage(&format!("3_cerebro_{a}"), da - sa);
                }
            }
        }
    }
    for (o, row) in &orders {
        if let Some((_, _, first, _)) = fills.get(o) {
            stage("4_execution", first - row.stored_at);
        }
    }
    for (_, acct, at) in &fill_rows {
        if let Some(v) = state_at.get(acct) {
            let i = v.partition_point(|t| t < at);
            if let Some(t) = v.get(i) {
                stage("5_accounts_lower_bound", t - at);
            }
        }
    }
    let stages = st
        .into_iter()
        .map(|(k, v)| (k, Summary::of_nanos(v)))
        .collect();

    let messages = BTreeMap::from([
        ("raw".to_string(), raw_ours.len()),
        ("standardized".to_string(), std_ours.len()),
        ("decision".to_string(), dec_ours.len()),
        ("order".to_string(), order_ours.len()),
        ("cancel".to_string(), cancels),
        ("order_event".to_string(), events_ours),
        ("fill".to_string(), exec_ours.len()),
        ("state".to_string(), state_ours.len()),
        ("dlq".to_string(), dead.values().sum()),
    ]);
    let mut sizes = BTreeMap::from([
        ("raw".to_string(), mean_size(&raw_ours)),
        ("standardized".to_string(), mean_size(&std_ours)),
        ("decision".to_string(), mean_size(&dec_ours)),
        ("order".to_string(), mean_size(&order_ours)),
        ("fill".to_string(), mean_size(&exec_ours)),
        ("state".to_string(), mean_size(&state_ours)),
    ]);
    // States are coalesced per batch: the state bytes written per signal
    // published are the fair size of a one-message-per-signal chain's last hop.
    let state_bytes: usize = state_ours.iter().map(|m| m.size).sum();
    sizes.insert(
        "state_per_signal".to_string(),
        state_bytes / expected.max(1),
    );
    Ok(PhaseReport {
        expected,
        completed,
        published: d.published,
        duplicates: d.duplicates,
        timed_out: d.timed_out,
        wall_secs: wall,
        quiet_secs: (d.quiet_at - t0).max(0) as f64 / 1e9,
        publish_secs: d.publish_secs,
        throughput_per_sec: rate_of(completed, t_end),
        throughput_by_action,
        latency,
        stages,
        messages,
        sizes,
        decisions,
        dlq: dead,
        usage: d.usage.clone(),
        nats_traffic: None,
        metrics: BTreeMap::new(),
    })
}

/// Figures of the pass-through phase.
async fn analyze_chain(
    js: &jetstream::Context,
    chain: &Chain,
    signals: &[LoadSignal],
    d: &Driven,
) -> Result<PhaseReport> {
    let ours: HashSet<&str> = signals.iter().map(|s| s.signal_id.as_str()).collect();
    let mut at: Vec<HashMap<String, i128>> = Vec::new();
    let mut messages = BTreeMap::new();
    let mut sizes = BTreeMap::new();
    let mut recv: HashMap<String, i128> = HashMap::new();
    for (h, stream) in chain.streams.iter().enumerate() {
        let msgs = measure::read_stream(js, stream, 1, true)
            .await
            .map_err(anyhow::Error::msg)?;
        let mut m_at = HashMap::new();
        let mut kept = Vec::new();
        for m in &msgs {
            let Some(id) = m
                .header(headers::SIGNAL_ID)
                .filter(|i| ours.contains(*i))
                .map(str::to_string)
            else {
                continue;
            };
            if h == 0 {
                if let Some(t) = nanos_header(m, headers::RECEIVED_AT) {
                    recv.entry(id.clone()).or_insert(t);
                }
            }
            m_at.entry(id).or_insert(m.stored_at);
            kept.push(m);
        }
        messages.insert(format!("{h}_{}", chain.kinds[h]), kept.len());
        sizes.insert(format!("{h}_{}", chain.kinds[h]), mean_size(&kept));
        at.push(m_at);
    }
    let last = chain.hops();
    let completed = at[last].len();
    let t0 = recv.values().copied().min().unwrap_or(0);
    let t_end = at[last].values().copied().max().unwrap_or(t0);
    let wall = (t_end - t0).max(0) as f64 / 1e9;
    let lat_at = |h: usize| {
        Summary::of_nanos(
            at[h]
                .iter()
                .filter_map(|(id, t)| recv.get(id).map(|r| t - r))
                .collect(),
        )
    };
    let latency = BTreeMap::from([
        ("raw_to_order".to_string(), lat_at(3)),
        ("raw_to_fill".to_string(), lat_at(4)),
        ("raw_to_complete".to_string(), lat_at(last)),
    ]);
    let mut stages = BTreeMap::new();
    stages.insert(
        "0_publish_raw".to_string(),
        Summary::of_nanos(
            at[0]
                .iter()
                .filter_map(|(id, t)| recv.get(id).map(|r| t - r))
                .collect(),
        ),
    );
    for h in 0..last {
        stages.insert(
            format!("{}_{}_to_{}", h + 1, chain.kinds[h], chain.kinds[h + 1]),
            Summary::of_nanos(
                at[h + 1]
                    .iter()
                    .filter_map(|(id, t)| at[h].get(id).map(|p| t - p))
                    .collect(),
            ),
        );
    }
    Ok(PhaseReport {
        expected: signals.len(),
        completed,
        published: d.published,
        duplicates: d.duplicates,
        timed_out: d.timed_out,
        wall_secs: wall,
        quiet_secs: (d.quiet_at - t0).max(0) as f64 / 1e9,
        publish_secs: d.publish_secs,
        throughput_per_sec: if wall > 0.0 {
            completed as f64 / wall
        } else {
            0.0
        },
        latency,
        stages,
        messages,
        sizes,
        throughput_by_action: BTreeMap::new(),
        decisions: BTreeMap::new(),
        dlq: BTreeMap::new(),
        usage: d.usage.clone(),
        nats_traffic: None,
        metrics: BTreeMap::new(),
    })
}

/// Counters, gauges and histogram sums / counts of a registry, flattened to
/// `name{labels}` (histogram buckets left out).
fn flatten_metrics(registry: &prometheus::Registry) -> BTreeMap<String, f64> {
    let text = mtx_runtime::metrics::render(registry);
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter(|l| !l.contains("_bucket{"))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .filter(|(k, _)| !k.starts_with("process_"))
        .collect()
}

/// Round trips of the broker on their own, before the run: a JetStream
/// publish awaiting its ack (600-byte body), a KV `entry` read and a KV
/// compare-and-set `update` (2 KB value), one at a time, on a scratch
/// stream and bucket configured like the topology's (deleted after). Stage
/// latencies are multiples of these.
async fn probe_rtt(js: &jetstream::Context, topo: &Topology) -> Result<BTreeMap<String, Summary>> {
    const N: usize = 300;
    let prefix = &topo.settings.prefix;
    let subjects = Subjects::new(prefix);
    let stream = if prefix.is_empty() {
        "BENCH_PROBE".to_string()
    } else {
        format!("{}_BENCH_PROBE", prefix.to_ascii_uppercase())
    };
    let bucket = if prefix.is_empty() {
        "bench_probe".to_string()
    } else {
        format!("{prefix}_bench_probe")
    };
    let template = topo
        .stream(streams::SIGNALS_RAW)
        .context("topology lacks SIGNALS_RAW")?
        .config
        .clone();
    let subject = subjects.raw_subject("benchprobe.x");
    let _ = js.delete_stream(&stream).await;
    js.create_stream(jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![subjects.raw_subject("benchprobe.>")],
        ..template.clone()
    })
    .await
    .context("creating the probe stream")?;
    let _ = js.delete_key_value(&bucket).await;
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: bucket.clone(),
            history: 1,
            storage: template.storage,
            num_replicas: template.num_replicas,
            ..Default::default()
        })
        .await
        .context("creating the probe bucket")?;
    let result = async {
        let body = bytes::Bytes::from(vec![b'x'; 600]);
        let value = bytes::Bytes::from(vec![b'y'; 2048]);
        let (mut publish, mut get, mut update) = (Vec::new(), Vec::new(), Vec::new());
        let mut rev = kv.put("k", value.clone()).await?;
        for i in 0..N {
            let t = Instant::now();
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::MSG_ID, format!("probe{i}").as_str());
            js.publish_with_headers(subject.clone(), h, body.clone())
                .await?
                .await?;
            publish.push(t.elapsed().as_nanos() as i128);
            let t = Instant::now();
            let _ = kv.entry("k").await?;
            get.push(t.elapsed().as_nanos() as i128);
            let t = Instant::now();
            rev = kv.update("k", value.clone(), rev).await?;
            update.push(t.elapsed().as_nanos() as i128);
        }
        Ok::<_, anyhow::Error>(BTreeMap::from([
            ("js_publish_ack".to_string(), Summary::of_nanos(publish)),
            ("kv_entry".to_string(), Summary::of_nanos(get)),
            ("kv_update_cas".to_string(), Summary::of_nanos(update)),
        ]))
    }
    .await;
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_key_value(&bucket).await;
    result
}

// ---- the command -----------------------------------------------------------------

/// Run `mtx bench pipeline`.
pub async fn run(args: PipelineArgs, base: &Config) -> Result<ExitCode> {
    let started_at = chrono::Utc::now();
    let b = Bench::new(args, base).await?;
    b.setup().await?;
    let rtt = probe_rtt(&b.js, &b.topo).await?;
    let signals = Arc::new(b.signals()?);
    let expected = signals.iter().filter(|s| s.expect != Expect::Bad).count();
    let env = b.cfg.environment;

    // ---- pipeline
    let stream_names: Vec<String> = b
        .topo
        .streams
        .iter()
        .map(|s| s.config.name.clone())
        .collect();
    let start = b.last_seqs(&stream_names).await;
    let mut process = None;
    let token = CancellationToken::new();
    if b.args.external {
        b.wait_states(Duration::from_secs(30)).await?;
    } else {
        let mut p = Process::start(b.cfg.clone(), token.clone())
            .await
            .context("starting the pipeline")?;
        for w in POOLS {
            crate::workers::spawn(w, &mut p).await?;
        }
        wait_ready(&p, Duration::from_secs(30)).await?;
        b.wait_states(Duration::from_secs(30)).await?;
        process = Some(p);
    }
    let before = process.as_ref().map(|p| counters(&p.client));
    let consumers: Vec<(String, String)> = PIPELINE_CONSUMERS
        .iter()
        .map(|(s, c)| (b.topo.stream_name(s), c.to_string()))
        .collect();
    let std_stream = b.topo.stream_name(streams::SIGNALS_STANDARDIZED);
    let driven = drive(
        &b.js,
        env,
        signals.clone(),
        b.pace(),
        &consumers,
        (1, start.get(&std_stream).copied().unwrap_or(1)),
        Duration::from_secs(b.args.timeout_secs),
        b.server_pid,
        "pipeline",
        {
            let dlq = b.topo.stream_name(streams::DLQ);
            let from = start.get(&dlq).copied().unwrap_or(1);
            Some((dlq, from))
        },
    )
    .await?;
    let metrics = process
        .as_ref()
        .map(|p| flatten_metrics(&p.registry))
        .unwrap_or_default();
    let sent = process
        .as_ref()
        .zip(before)
        .map(|(p, b)| traffic(b, counters(&p.client), signals.len()));
    if let Some(p) = process.take() {
        token.cancel();
        p.wait().await;
    }
    let mut pipeline = analyze_pipeline(&b, &signals, &start, &driven).await?;
    pipeline.metrics = metrics;
    pipeline.nats_traffic = sent;

    // ---- pass-through
    let mut chain = None;
    let mut pt = None;
    if !b.args.no_passthrough {
        let size = |k: &str| pipeline.sizes.get(k).copied().filter(|s| *s > 0);
        let sizes = [
            size("raw").unwrap_or(600),
            size("standardized").unwrap_or(900),
            size("decision").unwrap_or(1500),
            size("order").unwrap_or(900),
            size("fill").unwrap_or(700),
            size("state_per_signal").unwrap_or(700),
        ];
        let c = Chain::with_hops(&b.topo, sizes, b.args.passthrough_hops)
            .context("topology lacks SIGNALS_RAW / standardizer")?;
        c.create(&b.js).await.map_err(anyhow::Error::msg)?;
        let token = CancellationToken::new();
        let mut p = Process::start(b.cfg.clone(), token.clone())
            .await
            .context("starting the pass-through chain")?;
        c.spawn(&mut p);
        wait_ready(&p, Duration::from_secs(30)).await?;
        let before = counters(&p.client);
        let pt_signals: Vec<LoadSignal> = signals
            .iter()
            .map(|s| LoadSignal {
                subject: c.subjects[0].clone(),
                ..s.clone()
            })
            .collect();
        let pt_signals = Arc::new(pt_signals);
        let d = drive(
            &b.js,
            env,
            pt_signals.clone(),
            b.pace(),
            &c.consumers(),
            (c.hops() - 1, 1),
            Duration::from_secs(b.args.timeout_secs),
            b.server_pid,
            "pass-through",
            None,
        )
        .await?;
        let m = flatten_metrics(&p.registry);
        let sent = traffic(before, counters(&p.client), pt_signals.len());
        token.cancel();
        p.wait().await;
        let mut r = analyze_chain(&b.js, &c, &pt_signals, &d).await?;
        r.metrics = m;
        r.nats_traffic = Some(sent);
        pt = Some(r);
        chain = Some(c);
    }
    b.cleanup(chain.as_ref()).await;

    let ratio = pt
        .as_ref()
        .filter(|p| p.throughput_per_sec > 0.0)
        .map(|p| pipeline.throughput_per_sec / p.throughput_per_sec);
    let cpu_ratio = pt.as_ref().and_then(|t| cpu_ratio(&pipeline, t));
    let report = Report {
        bench: "pipeline",
        started_at: started_at.to_rfc3339(),
        mode: if b.args.external {
            "external"
        } else {
            "in_process"
        },
        settings: settings(&b),
        goals: goals(&b.args, &pipeline, ratio),
        pipeline,
        passthrough: pt,
        ratio,
        cpu_ratio,
        broker_round_trips: rtt,
        method: method(),
    };
    print_table(&report);
    if let Some(path) = &b.args.out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    let ok = report.pipeline.completed == expected
        && !report.pipeline.timed_out
        && report
            .passthrough
            .as_ref()
            .is_none_or(|p| p.completed == p.expected && !p.timed_out);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "not every signal completed: pipeline {}/{}{}",
            report.pipeline.completed,
            expected,
            report
                .passthrough
                .as_ref()
                .map(|p| format!(", pass-through {}/{}", p.completed, p.expected))
                .unwrap_or_default()
        );
        ExitCode::FAILURE
    })
}

async fn wait_ready(p: &Process, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        match p.health.readiness() {
            Ok(()) => return Ok(()),
            Err(why) if Instant::now() > deadline => {
                bail!("workers not ready within {within:?}: {}", why.join(", "))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn settings(b: &Bench) -> Settings {
    let raw = b.topo.stream(streams::SIGNALS_RAW);
    Settings {
        signals: b.args.signals,
        pace: if b.args.rate.is_some() {
            "rate"
        } else {
            "flat_out"
        },
        rate: b.args.rate,
        publish_batch: b.args.publish_batch,
        strategies: b.args.strategies,
        accounts: b.args.accounts,
        pairs_ratio: b.args.pairs_ratio,
        exit_ratio: b.args.exit_ratio,
        exit_gap: b.args.exit_gap,
        seed: b.args.seed,
        prefix: b.cfg.topology.prefix.clone(),
        nats_url: b.cfg.nats.url.clone(),
        storage: raw
            .map(|s| format!("{:?}", s.config.storage).to_ascii_lowercase())
            .unwrap_or_default(),
        replicas: b.cfg.topology.replicas,
        batch_size: b.cfg.worker.batch_size,
        concurrency: b.cfg.worker.concurrency,
        log_level: b.args.log_level.clone(),
        host_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        server_pid: b.server_pid,
        passthrough_hops: b.args.passthrough_hops,
        server_go_env: b.server_pid.and_then(measure::go_runtime_env),
    }
}

fn goals(
    args: &PipelineArgs,
    p: &PhaseReport,
    ratio: Option<f64>,
) -> BTreeMap<String, Option<bool>> {
    let order = p.latency.get("raw_to_order");
    let paced_1000 = args.rate.is_some_and(|r| (r - 1000.0).abs() < 1e-9);
    let at_rate = |f: &dyn Fn(&Summary) -> bool| {
        if paced_1000 {
            order.map(f)
        } else {
            None
        }
    };
    BTreeMap::from([
        (
            "throughput_at_least_10000_per_sec (flat out)".to_string(),
            args.rate
                .is_none()
                .then_some(p.throughput_per_sec >= 10_000.0),
        ),
        (
            "ratio_at_least_0.5 (flat out)".to_string(),
            ratio.filter(|_| args.rate.is_none()).map(|r| r >= 0.5),
        ),
        (
            "raw_to_order_p99_at_most_5ms (--rate 1000)".to_string(),
            at_rate(&|s| s.p99_ms <= 5.0),
        ),
        (
            "raw_to_order_p50_at_most_1.5ms (--rate 1000)".to_string(),
            at_rate(&|s| s.p50_ms <= 1.5),
        ),
    ])
}

fn method() -> BTreeMap<&'static str, &'static str> {
    BTreeMap::from([
        (
            "latency",
            "JetStream store timestamp of the ORDERS (.new) / EXECUTIONS message minus the raw \
             signal's Mtx-Received-At header (stamped right before the raw publish); one sample \
             per order / per fill message; same host clock when the server is local",
        ),
        (
            "throughput",
            "completed signals / (last completion - first raw Mtx-Received-At); a signal \
             completes when it is decided and every order of it is filled (or ended) and each \
             fill is in an account state: its completion time is the store time of the first \
             ACCOUNTS state of the fill's account stored after the fill (else the decision); \
             all pipeline consumers are quiet (nothing pending, nothing unacked) at the end",
        ),
        (
            "stages",
            "delays between store timestamps of consecutive messages of one signal: raw, \
             standardized, decision, order -> first fill; accounts: fill -> first state of \
             its account stored after it (a lower bound)",
        ),
        (
            "passthrough",
            "same signals through 6 streams / 5 consume-loop hops (raw, standardized, \
             decision, order, fill, state; --passthrough-hops adds fill-sized extra hops \
             before state) forwarding bytes resized to the pipeline's mean sizes (state: \
             bytes per signal), same stream, consumer and [worker] settings",
        ),
        (
            "usage",
            "getrusage(RUSAGE_SELF) user+sys and context switches, /proc/self/status VmHWM \
             (reset per phase via /proc/self/clear_refs), /proc/stat busy time of the host, \
             /proc/<pid>/stat and /proc/<pid>/task/*/status context switches of a local \
             nats-server",
        ),
        (
            "server_go_env",
            "GOGC, GOMEMLIMIT, GOMAXPROCS, GODEBUG from /proc/<pid>/environ of the local \
             nats-server (empty: Go defaults)",
        ),
    ])
}

fn ms4(s: Option<&Summary>) -> String {
    match s {
        Some(s) if s.count > 0 => format!(
            "{:.2} / {:.2} / {:.2} / {:.2}",
            s.p50_ms, s.p95_ms, s.p99_ms, s.max_ms
        ),
        _ => "-".into(),
    }
}

fn usage_line(u: &UsageDelta) -> String {
    format!(
        "{:.2} s ({:.2} cores){}",
        u.cpu_secs,
        u.cores,
        u.server_cpu_secs
            .map(|s| format!(", server {s:.2} s"))
            .unwrap_or_default()
    )
}

/// Busy CPU seconds of the whole host per completed signal of a phase
/// (`None` without `/proc/stat` or with nothing completed).
fn host_cpu_per_signal(x: &PhaseReport) -> Option<f64> {
    let busy = x.usage.host_busy_secs?;
    (x.completed > 0).then(|| busy / x.completed as f64)
}

/// [`Report::cpu_ratio`]: host CPU per signal, pass-through over pipeline.
fn cpu_ratio(pipeline: &PhaseReport, passthrough: &PhaseReport) -> Option<f64> {
    let p = host_cpu_per_signal(pipeline)?;
    let t = host_cpu_per_signal(passthrough)?;
    (p > 0.0).then(|| t / p)
}

/// Share of the host's CPU other processes took during a phase.
fn others_share(u: &UsageDelta) -> Option<f64> {
    let o = u.other_busy_secs?;
    let cap = u.wall_secs * u.host_cpus as f64;
    (cap > 0.0).then(|| o / cap)
}

/// How the report's table names the server's Go runtime settings.
fn go_env_line(env: Option<&BTreeMap<String, String>>) -> String {
    match env {
        None => "unknown (not a local process this user can read)".into(),
        Some(e) if e.is_empty() => "Go defaults (GOGC=100, no GOMEMLIMIT)".into(),
        Some(e) => e
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
    }
}

fn print_table(r: &Report) {
    let s = &r.settings;
    println!(
        "mtx bench pipeline: {} signals ({} strategies, {} accounts, {:.0}% pairs, {:.0}% exits {}+ signals after their entry), {}, {}, {} ({} storage, batch {}, concurrency {})",
        s.signals,
        s.strategies,
        s.accounts,
        s.pairs_ratio * 100.0,
        s.exit_ratio * 100.0,
        s.exit_gap,
        s.rate
            .map(|x| format!("{x} signals/s"))
            .unwrap_or_else(|| "flat out".into()),
        r.mode,
        s.nats_url,
        s.storage,
        s.batch_size,
        s.concurrency
    );
    println!(
        "nats-server Go runtime: {}",
        go_env_line(s.server_go_env.as_ref())
    );
    let p = &r.pipeline;
    let t = r.passthrough.as_ref();
    let col = |f: &dyn Fn(&PhaseReport) -> String| {
        format!("{:<46} {}", f(p), t.map(f).unwrap_or_else(|| "-".into()))
    };
    println!("{:<40} {:<46} pass-through", "", "pipeline");
    println!(
        "{:<40} {}",
        "completed / expected",
        col(&|x| format!("{}/{}", x.completed, x.expected))
    );
    println!(
        "{:<40} {}",
        "throughput (signals/s)",
        col(&|x| format!("{:.0} ({:.2} s)", x.throughput_per_sec, x.wall_secs))
    );
    println!(
        "{:<40} {}",
        "raw→order p50/p95/p99/max (ms)",
        col(&|x| ms4(x.latency.get("raw_to_order")))
    );
    println!(
        "{:<40} {}",
        "raw→fill  p50/p95/p99/max (ms)",
        col(&|x| ms4(x.latency.get("raw_to_fill")))
    );
    println!(
        "{:<40} {}",
        "raw→complete p50/p95/p99/max (ms)",
        col(&|x| ms4(x.latency.get("raw_to_complete")))
    );
    println!(
        "{:<40} {}",
        "CPU of this process",
        col(&|x| usage_line(&x.usage))
    );
    println!(
        "{:<40} {}",
        "host CPU per signal (us, all processes)",
        col(&|x| host_cpu_per_signal(x)
            .map(|c| format!("{:.0}", c * 1e6))
            .unwrap_or_else(|| "-".into()))
    );
    println!(
        "{:<40} {}",
        "peak RSS (MiB)",
        col(&|x| x
            .usage
            .peak_rss_bytes
            .map(|b| format!("{:.1}", b as f64 / 1048576.0))
            .unwrap_or_else(|| "-".into()))
    );
    println!(
        "{:<40} {}",
        "workers → NATS per signal (KB, msgs)",
        col(&|x| x
            .nats_traffic
            .as_ref()
            .map(|t| format!(
                "{:.1} KB, {:.1} msgs",
                t.out_bytes_per_signal / 1024.0,
                t.out_messages_per_signal
            ))
            .unwrap_or_else(|| "-".into()))
    );
    println!(
        "{:<40} {}",
        "context switches per signal (us, server)",
        col(&|x| {
            let n = x.completed.max(1) as f64;
            format!(
                "{:.1}, {}",
                x.usage.context_switches as f64 / n,
                x.usage
                    .server_context_switches
                    .map(|s| format!("{:.1}", s as f64 / n))
                    .unwrap_or_else(|| "-".into())
            )
        })
    );
    if let Some(ratio) = r.ratio {
        println!("{:<40} {ratio:.3}", "pipeline / pass-through");
    }
    if let Some(c) = r.cpu_ratio {
        println!("{:<40} {c:.3}", "pass-through / pipeline host CPU");
    }
    for (name, ph) in [("pipeline", Some(p)), ("pass-through", t)] {
        if let Some(share) = ph.and_then(|x| others_share(&x.usage)) {
            if share > 0.1 {
                let who = if r.mode == "external" && name == "pipeline" {
                    "other processes (the external pools included)"
                } else {
                    "other processes"
                };
                println!(
                    "note: {who} used {:.0}% of the host's CPU during the {name} phase; figures may be disturbed",
                    share * 100.0
                );
            }
        }
    }
    println!("broker round trips alone, p50/p95/p99/max (ms):");
    for (k, v) in &r.broker_round_trips {
        println!("  {:<38} {}", k, ms4(Some(v)));
    }
    println!("pipeline stages, store time to store time, p50/p95/p99/max (ms):");
    for (k, v) in &p.stages {
        println!("  {:<38} {}", k, ms4(Some(v)));
    }
    println!(
        "throughput by action (signals/s): {}",
        p.throughput_by_action
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for k in [
        "raw_to_order_entry",
        "raw_to_order_exit",
        "raw_to_complete_entry",
        "raw_to_complete_exit",
    ] {
        if let Some(v) = p.latency.get(k) {
            println!("  {:<38} {}", k, ms4(Some(v)));
        }
    }
    let decisions: Vec<String> = p
        .decisions
        .iter()
        .map(|(k, v)| format!("{} {v}", k.trim()))
        .collect();
    println!("decisions: {}", decisions.join(", "));
    if !p.dlq.is_empty() {
        println!("dead letters: {:?}", p.dlq);
    }
    let retries: Vec<String> = p
        .metrics
        .iter()
        .filter(|(k, v)| k.contains("outcome=\"retry\"") && **v > 0.0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if !retries.is_empty() {
        println!("retries: {}", retries.join(", "));
    }
    for (g, v) in &r.goals {
        if let Some(ok) = v {
            println!("goal {g}: {}", if *ok { "met" } else { "NOT met" });
        }
    }
    if s.rate.is_some() && s.server_go_env.as_ref().is_some_and(measure::default_go_gc) {
        println!(
            "note: the nats-server collects garbage at Go's default pace (GOGC=100); at a steady \
             rate each collection takes both cores for ~20 ms and makes the latency tail. \
             Production runs it with GOGC=1000 under GOMEMLIMIT (deploy/nats/helm-values.yaml, \
             deploy/local/servers.sh)"
        );
    }
}
