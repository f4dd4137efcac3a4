//! `mtx bench sink`: the same N documents written by the sink and by a plain
//! `insert_many` loop, to the same server, in the same run.
//!
//! Both sides get freshly migrated databases (same indexes and validators)
//! named after the configured ones plus a run suffix; the sink side also gets
//! a fresh topology prefix, so nothing of a live deployment is touched. The
//! N messages are published to the stream first (not timed); the sink's time
//! runs from starting the pool until Mongo acknowledged the N-th document.
//! The documents of the baseline are the very ones the sink writes (same
//! mapping), inserted in chunks of `worker.batch_size`. Everything the bench
//! created is dropped at the end unless `keep` is set.

use crate::error::SinkError;
use crate::mapping::{Kind, Mapper};
use crate::spec::{names, Db};
use crate::store::Store;
use async_nats::jetstream;
use bson::{DateTime, Document};
use bytes::Bytes;
use mtx_runtime::config::Config;
use mtx_runtime::process::Process;
use mtx_runtime::Delivery;
use mtx_schemas::{headers, ids, Environment};
use mtx_subjects::{Subjects, Topology};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Documents per side and round.
    pub n: usize,
    /// Rounds (fresh databases each; the side that goes first alternates,
    /// so a server that slows down as it fills favours neither).
    pub rounds: usize,
    /// Keep the bench databases and streams.
    pub keep: bool,
    /// Give up after this long.
    pub timeout: Duration,
}

/// Figures of all rounds.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Each round.
    pub rounds: Vec<RoundReport>,
}

impl BenchReport {
    /// Documents per side over all rounds.
    pub fn n(&self) -> usize {
        self.rounds.iter().map(|r| r.n).sum()
    }
    /// Plain documents per second over all rounds.
    pub fn plain_rate(&self) -> f64 {
        self.n() as f64
            / self
                .rounds
                .iter()
                .map(|r| r.plain_secs)
                .sum::<f64>()
                .max(1e-9)
    }
    /// Sink documents per second over all rounds.
    pub fn sink_rate(&self) -> f64 {
        self.n() as f64
            / self
                .rounds
                .iter()
                .map(|r| r.sink_secs)
                .sum::<f64>()
                .max(1e-9)
    }
    /// sink rate / plain rate over all rounds (goal ≥ 0.9).
    pub fn ratio(&self) -> f64 {
        self.sink_rate() / self.plain_rate().max(1e-9)
    }
    /// Median of the per-round ratios (robust to a round disturbed by
    /// other load on the server).
    pub fn median_ratio(&self) -> f64 {
        let mut r: Vec<f64> = self.rounds.iter().map(RoundReport::ratio).collect();
        r.sort_by(f64::total_cmp);
        match r.len() {
            0 => 0.0,
            n if n % 2 == 1 => r[n / 2],
            n => (r[n / 2 - 1] + r[n / 2]) / 2.0,
        }
    }
}

/// Figures of one round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundReport {
    /// Documents per side.
    pub n: usize,
    /// Collection written.
    pub collection: &'static str,
    /// Plain `insert_many` loop: seconds.
    pub plain_secs: f64,
    /// Sink: seconds from start to the N-th acknowledged document.
    pub sink_secs: f64,
    /// Documents in the sink's collection afterwards (must equal `n`).
    pub sink_docs: u64,
    /// Batches the sink wrote them in (`n / sink_batches` = mean batch size).
    pub sink_batches: u64,
    /// Batch size used by both.
    pub batch_size: usize,
    /// The sink ran first in this round.
    pub sink_first: bool,
}

impl RoundReport {
    /// Plain documents per second.
    pub fn plain_rate(&self) -> f64 {
        self.n as f64 / self.plain_secs.max(1e-9)
    }
    /// Sink documents per second.
    pub fn sink_rate(&self) -> f64 {
        self.n as f64 / self.sink_secs.max(1e-9)
    }
    /// sink rate / plain rate (goal ≥ 0.9).
    pub fn ratio(&self) -> f64 {
        self.sink_rate() / self.plain_rate().max(1e-9)
    }
}

/// The signal id of bench message `i` of `run`.
fn bench_signal_id(run: &str, i: usize) -> String {
    ids::signal_id("bench", "SPX_1-D_Opt", &format!("{run}-{i}"))
}

/// One standardized signal message (as the standardizer publishes it).
pub fn signal_message(run: &str, i: usize) -> serde_json::Value {
    json!({
        "signal_id": bench_signal_id(run, i),
        "strategy_id": "SPX_1-D_Opt",
        "timestamp": "2025-11-20T10:00:00Z",
        "instrument": "AAPL",
        "instrument_type": "STOCK",
        "direction": "LONG",
        "action": "ENTRY",
        "order_type": "LIMIT",
        "price": "150.25",
        "quantity": "10",
        "stop_loss": "140.10",
        "take_profit": "170.00",
        "expiry": null,
        "metadata": {"expected_alpha": "0.02"},
        "legs": [{
            "instrument": "AAPL", "instrument_type": "STOCK", "side": "BUY", "direction": "LONG",
            "quantity": "10", "order_type": "LIMIT", "price": "150.25", "stop_loss": "140.10",
            "take_profit": "170.00", "expiry": null, "exchange": "NASDAQ"
        }],
        "signal_type": "ENTRY",
        "entry_signal_id": null,
        "sender_entry_signal_id": null,
        "environment": "staging",
        "source": "bench",
        "sender_signal_id": format!("{run}-{i}"),
        "signal_sent_at": null,
        "received_at": "2025-11-20T10:00:00.250Z",
        "account_equity": "500000",
        "sizing_mode": "SENDER_EQUITY_RATIO"
    })
}

fn suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("b{t}")
}

/// Run the benchmark against the servers of `cfg`.
pub async fn run(cfg: &Config, opts: &BenchOptions) -> Result<BenchReport, SinkError> {
    let mut rounds = Vec::new();
    for r in 0..opts.rounds.max(1) {
        rounds.push(round(cfg, opts, r % 2 == 1).await?);
    }
    Ok(BenchReport { rounds })
}

async fn round(
    cfg: &Config,
    opts: &BenchOptions,
    sink_first: bool,
) -> Result<RoundReport, SinkError> {
    let run_id = suffix();
    let mut sink_cfg = cfg.clone();
    sink_cfg.topology.prefix = run_id.clone();
    sink_cfg.metrics.addr = "127.0.0.1:0".into();
    sink_cfg.mongo.trading_db = format!("{}_{run_id}_sink", cfg.mongo.trading_db);
    sink_cfg.mongo.bot_core_db = format!("{}_{run_id}_sink", cfg.mongo.bot_core_db);
    let mut plain_cfg = cfg.mongo.clone();
    plain_cfg.trading_db = format!("{}_{run_id}_plain", cfg.mongo.trading_db);
    plain_cfg.bot_core_db = format!("{}_{run_id}_plain", cfg.mongo.bot_core_db);
    sink_cfg
        .validate()
        .map_err(|e| SinkError::Config(e.to_string()))?;

    let plain = Store::connect(&plain_cfg, Duration::from_secs(60)).await?;
    let sink_store = Store::connect(&sink_cfg.mongo, Duration::from_secs(60)).await?;
    for (s, c) in [(&plain, &plain_cfg), (&sink_store, &sink_cfg.mongo)] {
        let r = crate::migrate(s, c).await?;
        if !r.problems.is_empty() {
            return Err(SinkError::Config(r.problems.join("; ")));
        }
    }

    // The messages, and the very documents the sink will write for them.
    let subjects = Subjects::new(&sink_cfg.topology.prefix);
    let bodies: Vec<Bytes> = (0..opts.n)
        .map(|i| Bytes::from(signal_message(&run_id, i).to_string()))
        .collect();
    // Each on its own subject, as the standardizer publishes them.
    let subject_of: Vec<String> = (0..opts.n)
        .map(|i| {
            subjects.signal_standardized(
                Environment::Staging,
                "SPX_1-D_Opt",
                &bench_signal_id(&run_id, i),
            )
        })
        .collect::<Result<_, _>>()
        .map_err(|e| SinkError::Config(e.to_string()))?;
    let mapper = Mapper::new(subjects.clone());
    let now = DateTime::now();
    let mut docs: Vec<Document> = Vec::with_capacity(opts.n);
    for (i, b) in bodies.iter().enumerate() {
        let d = Delivery {
            subject: subject_of[i].clone(),
            payload: b.clone(),
            headers: async_nats::HeaderMap::new(),
            deliveries: 1,
            stream_seq: i as u64 + 1,
            pending: 0,
            published: None,
        };
        let p = mapper
            .prepare(Kind::StandardizedSignals, &d, now)
            .map_err(|r| SinkError::Config(format!("{}: {}", r.reason, r.detail)))?;
        docs.push(p.doc);
    }

    // The sink's input is published first (not timed).
    let batch = cfg.worker.batch_size.max(1);
    let (client, js) = mtx_runtime::nats::connect(&cfg.nats, None)
        .await
        .map_err(|e| SinkError::Nats(e.to_string()))?;
    let topo = Topology::build(&sink_cfg.topology);
    mtx_subjects::apply::apply(&js, &topo)
        .await
        .map_err(|e| SinkError::Nats(e.to_string()))?;
    publish_all(&js, &subject_of, &bodies).await?;

    let mut plain_secs = if sink_first {
        None
    } else {
        Some(plain_loop(&plain, &docs, batch).await?)
    };

    // The sink.
    let shutdown = CancellationToken::new();
    let mut process = Process::start(sink_cfg.clone(), shutdown.clone()).await?;
    let t = Instant::now();
    let core = crate::sink::spawn(&mut process).await?;
    let waiter = tokio::spawn(process.wait());
    let counter = core
        .metrics()
        .documents
        .with_label_values(&[names::STANDARDIZED_SIGNALS, "ok"]);
    let batches = core
        .metrics()
        .batch_seconds
        .with_label_values(&[Kind::StandardizedSignals.stream()]);
    let mut sink_secs = None;
    while t.elapsed() < opts.timeout {
        if counter.get() as usize >= opts.n {
            sink_secs = Some(t.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shutdown.cancel();
    let _ = waiter.await;
    let sink_batches = batches.get_sample_count();
    if plain_secs.is_none() {
        plain_secs = Some(plain_loop(&plain, &docs, batch).await?);
    }
    let plain_secs = plain_secs.unwrap_or_default();
    let sink_docs = sink_store
        .coll(Db::Trading, names::STANDARDIZED_SIGNALS)
        .count_documents(bson::doc! {})
        .await?;

    if !opts.keep {
        for (s, c) in [(&plain, &plain_cfg), (&sink_store, &sink_cfg.mongo)] {
            let _ = s.client.database(&c.trading_db).drop().await;
            let _ = s.client.database(&c.bot_core_db).drop().await;
        }
        for st in &topo.streams {
            let _ = js.delete_stream(&st.config.name).await;
        }
        for kv in &topo.kv {
            let _ = js.delete_key_value(&kv.config.bucket).await;
        }
    }
    drop(client);
    let sink_secs = sink_secs.ok_or_else(|| {
        SinkError::Timeout(format!(
            "sink bench: {} of {} documents within {:?}",
            counter.get(),
            opts.n,
            opts.timeout
        ))
    })?;
    Ok(RoundReport {
        n: opts.n,
        collection: names::STANDARDIZED_SIGNALS,
        plain_secs,
        sink_secs,
        sink_docs,
        sink_batches,
        batch_size: batch,
        sink_first,
    })
}

/// The baseline: a plain `insert_many` loop in chunks of `batch`.
async fn plain_loop(plain: &Store, docs: &[Document], batch: usize) -> Result<f64, SinkError> {
    let coll = plain.coll(Db::Trading, names::STANDARDIZED_SIGNALS);
    let t = Instant::now();
    for chunk in docs.chunks(batch) {
        coll.insert_many(chunk.to_vec()).await?;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn publish_all(
    js: &jetstream::Context,
    subjects: &[String],
    bodies: &[Bytes],
) -> Result<(), SinkError> {
    for (i, chunk) in bodies.chunks(1_000).enumerate() {
        let mut acks = Vec::with_capacity(chunk.len());
        for (j, b) in chunk.iter().enumerate() {
            let n = i * 1_000 + j;
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::MSG_ID, format!("bench-{n}").as_str());
            acks.push(
                js.publish_with_headers(subjects[n].clone(), h, b.clone())
                    .await
                    .map_err(|e| SinkError::Nats(e.to_string()))?,
            );
        }
        for a in acks {
            a.await.map_err(|e| SinkError::Nats(e.to_string()))?;
        }
    }
    Ok(())
}
