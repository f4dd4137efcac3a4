//! The standardizer stage (`mtx run standardizer`): raw signals in, exactly
//! one standardized signal out per accepted signal.
//!
//! For each message of the `standardizer` consumer on `SIGNALS_RAW`:
//!
//! 1. decode the [`RawSignal`] envelope and check it against its subject
//!    (`signals.raw.<env>.<source>`: the envelope may not claim another
//!    environment or source than the subject it was published on);
//! 2. [`parse_raw_signal`] — the same rules the gateway applies at ingress;
//! 3. look the strategy up in the `strategies` KV bucket ([`StrategyConfig`],
//!    key [`StrategyConfig::kv_key`]) for `expected_alpha` and `sizing_mode`
//!    (a configuration read is reused for [`STRATEGY_TTL`], so a change
//!    applies within that time; an unknown strategy is never cached);
//! 4. [`standardize`], then publish to `signals.standardized.<env>.<strategy>`
//!    under the dedupe protocol below.
//!
//! | problem | outcome |
//! |---|---|
//! | body not JSON | DLQ `invalid_json` |
//! | not a `RawSignal` envelope | DLQ `invalid_envelope` |
//! | envelope environment / source ≠ subject | DLQ `envelope_mismatch` |
//! | payload rejected by the parser | DLQ with the [`SignalError`] reason code (`missing_strategy`, `empty_legs`, ...) |
//! | strategy not in the `strategies` bucket | DLQ `unknown_strategy` |
//! | strategy configuration unreadable | retried (ops fix the config), then DLQ `max_deliveries` |
//! | KV / NATS errors | retried after `worker.publish_retry_delay_ms` |
//!
//! An unknown strategy is dead-lettered at once rather than retried: no
//! amount of waiting configures a strategy, and the DLQ keeps the exact bytes
//! (reason `unknown_strategy`) for a redrive once it is configured. Strategy
//! *status* (INACTIVE, ...) is Cerebro's decision, not the standardizer's.
//!
//! # Dedupe without loss
//!
//! A signal must come out once even when the sender re-sends it long after
//! JetStream's duplicate window, and must never be lost when the worker dies
//! at any point. The `signals_seen` bucket holds one key per
//! [`dedupe_key`] (`<env>.<signal_id>`) whose value is a [`SeenMarker`]:
//!
//! 1. `create` the key as `pending` (atomic, first writer wins): created →
//!    step 3;
//! 2. it exists: read it; `done` → [`Outcome::Duplicate`] (ack, nothing
//!    published), `pending` → the path below;
//! 3. publish the standardized signal with `Nats-Msg-Id` = [`dedupe_key`] and
//!    wait for the JetStream ack;
//! 4. `put` the key as `done` (in the background: the consume loop acks the
//!    raw message without waiting for it).
//!
//! A `pending` key means "a publish may have happened after `at`". If `at` is
//! younger than half the stream's duplicate window, publishing again is safe:
//! JetStream drops the copy (and says so). If it is older, the worker scans
//! the strategy's standardized subject from `at` (minus a clock-skew margin)
//! for the message id: found → mark `done`, duplicate; not found → publish.
//!
//! Crash points: before 2 or between 2 and 3 → nothing was published, the
//! redelivery publishes (pending path); between 3 and 4 → the redelivery finds
//! `pending` and republishes into the duplicate window or finds the message by
//! scanning (also when the raw message was acked but the background `done`
//! write was lost: a later re-send takes the same path); after 4 → `done`,
//! duplicate. No point loses the signal or publishes it twice. The message id carries the environment because staging
//! and production may share one NATS: the same sender id sent to both must not
//! be deduplicated across them.

use crate::{parse_raw_signal, standardize, SignalError, StrategyInfo};
use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use mtx_runtime::metrics::RuntimeMetrics;
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::publish::Publisher;
use mtx_runtime::pull::PullRequest;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::headers;
use mtx_schemas::signal::{RawSignal, StandardizedSignal};
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::Environment;
use mtx_subjects::topology::{buckets, streams};
use mtx_subjects::Subjects;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::OnceCell;

/// Stage name: metric label and DLQ subject token (`dlq.standardizer`).
pub const STAGE: &str = "standardizer";
/// Durable consumer the stage binds (on `SIGNALS_RAW`).
pub const DURABLE: &str = "standardizer";

/// How long a strategy configuration read from the bucket is reused before it
/// is read again: one KV round trip per strategy per second instead of one
/// per signal.
pub const STRATEGY_TTL: Duration = Duration::from_secs(1);

/// Extra room, beyond the marker's own time, when scanning for an earlier
/// publish: covers clock skew between workers and servers.
const SCAN_SKEW: Duration = Duration::from_secs(300);

/// Key of a signal in `signals_seen`, and the `Nats-Msg-Id` of its raw and
/// standardized messages: `<env>.<signal_id>` (a valid KV key).
pub fn dedupe_key(environment: Environment, signal_id: &str) -> String {
    format!("{environment}.{signal_id}")
}

/// State of a signal in `signals_seen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeenState {
    /// A publish was started at `at` and may or may not have happened.
    Pending,
    /// The standardized signal is stored in `SIGNALS_STANDARDIZED`.
    Done,
}

/// Value of a `signals_seen` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenMarker {
    /// Pending or done.
    pub state: SeenState,
    /// Unix epoch nanoseconds (worker clock) when the state was written.
    pub at: i128,
    /// Stream sequence of the raw message that wrote it (for operators).
    pub raw_seq: u64,
}

/// Tunables of the stage (from [`mtx_runtime::Config`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Delay before a retryable failure is redelivered.
    pub retry_after: Duration,
    /// JetStream duplicate window of `SIGNALS_STANDARDIZED`.
    pub duplicate_window: Duration,
}

/// The standardizer's [`Handler`].
pub struct Standardizer {
    js: jetstream::Context,
    subjects: Subjects,
    strategies_bucket: String,
    seen_bucket: String,
    standardized_stream: String,
    strategies: OnceCell<kv::Store>,
    /// Strategy configurations read within [`STRATEGY_TTL`], by bucket key.
    strategy_cache: Mutex<HashMap<String, (Instant, StrategyConfig)>>,
    seen: OnceCell<kv::Store>,
    publisher: Publisher,
    metrics: Option<RuntimeMetrics>,
    settings: Settings,
}

/// One message after [`Standardizer::prepare`].
enum Step {
    /// Nothing to publish (a duplicate).
    Settled(Outcome),
    /// Publish `out`, then mark `key` done.
    Publish {
        out: Outgoing,
        key: String,
        received_at: String,
    },
}

/// Why one message failed.
#[derive(Debug)]
enum Fail {
    /// Permanent: dead-letter with this reason code.
    Reject(&'static str, String),
    /// Transient: redeliver later.
    Retry(String),
}

impl From<SignalError> for Fail {
    fn from(e: SignalError) -> Self {
        Fail::Reject(e.reason_code(), e.to_string())
    }
}

/// The [`RawSignal`] envelope in one pass over the bytes; only a failure
/// takes a second look, to tell JSON that is no envelope (`invalid_envelope`)
/// from bytes that are no JSON at all (`invalid_json`).
fn decode_envelope(payload: &[u8]) -> Result<RawSignal, Fail> {
    serde_json::from_slice(payload).map_err(|e| {
        if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
            Fail::Reject("invalid_envelope", format!("raw signal envelope: {e}"))
        } else {
            Fail::Reject("invalid_json", format!("payload: invalid JSON: {e}"))
        }
    })
}

fn now_nanos() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

impl Standardizer {
    /// A handler for the process's topology and config.
    pub fn new(process: &Process) -> Result<Standardizer, WorkerError> {
        let topo = &process.topology;
        let bucket = |base: &'static str| {
            topo.bucket(base)
                .map(str::to_string)
                .ok_or(WorkerError::MissingBucket(base))
        };
        Ok(Standardizer {
            js: process.js.clone(),
            subjects: process.subjects.clone(),
            strategies_bucket: bucket(buckets::STRATEGIES)?,
            seen_bucket: bucket(buckets::SIGNALS_SEEN)?,
            standardized_stream: topo.stream_name(streams::SIGNALS_STANDARDIZED),
            strategies: OnceCell::new(),
            strategy_cache: Mutex::new(HashMap::new()),
            seen: OnceCell::new(),
            publisher: Publisher::new(process.js.clone(), Some(process.metrics.clone()), STAGE),
            metrics: Some(process.metrics.clone()),
            settings: Settings {
                retry_after: Duration::from_millis(process.config.worker.publish_retry_delay_ms),
                duplicate_window: Duration::from_secs(
                    process.config.topology.duplicate_window_secs,
                ),
            },
        })
    }

    async fn store<'a>(
        &self,
        cell: &'a OnceCell<kv::Store>,
        bucket: &str,
    ) -> Result<&'a kv::Store, Fail> {
        cell.get_or_try_init(|| async {
            self.js
                .get_key_value(bucket)
                .await
                .map_err(|e| Fail::Retry(format!("kv bucket {bucket}: {e}")))
        })
        .await
    }

    /// Steps 1–3 of the module docs and the dedupe decision for one message:
    /// what to publish, or its outcome when nothing is to be published.
    async fn prepare(&self, msg: &Delivery) -> Result<Step, Fail> {
        let raw = decode_envelope(&msg.payload)?;
        self.check_subject(&msg.subject, &raw)?;
        let parsed = parse_raw_signal(&raw)?;
        let config = self.strategy(parsed.strategy()).await?;
        // The signal keeps the name it was looked up by (the bucket key), so
        // its id, subject and configuration always agree.
        let info = StrategyInfo {
            strategy_id: parsed.strategy().to_string(),
            expected_alpha: config.expected_alpha,
            sizing_mode: config.sizing_mode,
        };
        let signal = standardize(parsed, &info);
        self.publish_once(msg, &raw, &signal).await
    }

    /// Publish every prepared signal of the batch in stream order (one
    /// pipelined round trip), then mark each one `done`.
    async fn publish_batch(
        &self,
        msgs: &[Delivery],
        steps: Vec<Result<Step, Fail>>,
    ) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(steps.len());
        let mut outs = Vec::new();
        let mut sent = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Ok(Step::Settled(o)) => outcomes.push(Some(o)),
                Ok(Step::Publish {
                    out,
                    key,
                    received_at,
                }) => {
                    outcomes.push(None);
                    sent.push((i, key, received_at));
                    outs.push(out);
                }
                Err(f) => outcomes.push(Some(self.settle_failure(&msgs[i], f))),
            }
        }
        if outs.is_empty() {
            return outcomes.into_iter().flatten().collect();
        }
        let results = self.publisher.publish_all(outs).await;
        let now = now_nanos();
        let seen = self.seen.get();
        let mut marks = Vec::new();
        for ((i, key, received_at), r) in sent.into_iter().zip(results) {
            let msg = &msgs[i];
            outcomes[i] = Some(match r {
                Err(e) => self.settle_failure(msg, Fail::Retry(e.to_string())),
                Ok(published) => {
                    if let (Some(m), Ok(t)) = (&self.metrics, received_at.parse::<i128>()) {
                        let secs = now.saturating_sub(t).max(0) as f64 / 1e9;
                        m.e2e_seconds.with_label_values(&[STAGE]).observe(secs);
                    }
                    marks.push((key, Self::marker(SeenState::Done, msg)));
                    if published.duplicate {
                        tracing::debug!(
                            seq = msg.stream_seq,
                            "standardized copy dropped by JetStream"
                        );
                        Outcome::Duplicate
                    } else {
                        tracing::info!(
                            signal_id = msg.header(headers::SIGNAL_ID).unwrap_or(""),
                            seq = published.sequence,
                            "standardized"
                        );
                        Outcome::Ok(vec![])
                    }
                }
            });
        }
        // `done` markers are written off the batch's path: a marker still
        // `pending` is already safe (module docs), so the raw messages are
        // acked and the next batch starts without waiting for these writes.
        if let Some(seen) = seen.cloned() {
            tokio::spawn(async move {
                let puts = marks.into_iter().map(|(key, marker)| {
                    let seen = &seen;
                    async move {
                        if let Err(e) = seen.put(&key, marker).await {
                            tracing::warn!(error = %e, key, "could not mark signal done; a re-send will scan");
                        }
                    }
                });
                futures::future::join_all(puts).await;
            });
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::retry(self.settings.retry_after, "not settled")))
            .collect()
    }

    fn settle_failure(&self, msg: &Delivery, fail: Fail) -> Outcome {
        match fail {
            Fail::Reject(reason, detail) => Outcome::reject(reason, detail),
            Fail::Retry(reason) => {
                tracing::warn!(%reason, seq = msg.stream_seq, "retrying");
                Outcome::retry(self.settings.retry_after, reason)
            }
        }
    }

    /// The envelope may not claim another environment or source than its subject.
    fn check_subject(&self, subject: &str, raw: &RawSignal) -> Result<(), Fail> {
        let rest = self.subjects.strip(subject);
        let tokens: Vec<&str> = rest.split('.').collect();
        let mismatch = |d: String| Fail::Reject("envelope_mismatch", d);
        let [signals, raw_token, env, source] = tokens.as_slice() else {
            return Err(mismatch(format!(
                "subject `{subject}` is not signals.raw.<env>.<source>"
            )));
        };
        if *signals != "signals" || *raw_token != "raw" {
            return Err(mismatch(format!(
                "subject `{subject}` is not signals.raw.<env>.<source>"
            )));
        }
        let env: Environment = env
            .parse()
            .map_err(|e| mismatch(format!("subject `{subject}`: {e}")))?;
        let source = mtx_subjects::token::decode(source)
            .map_err(|e| mismatch(format!("subject `{subject}`: {e}")))?;
        if env != raw.environment {
            return Err(mismatch(format!(
                "envelope environment `{}` but subject environment `{env}`",
                raw.environment
            )));
        }
        if source != raw.source {
            return Err(mismatch(format!(
                "envelope source `{}` but subject source `{source}`",
                raw.source
            )));
        }
        Ok(())
    }

    async fn strategy(&self, strategy: &str) -> Result<StrategyConfig, Fail> {
        let unknown = || {
            Fail::Reject(
                "unknown_strategy",
                format!("strategy `{strategy}` has no configuration in the strategies bucket"),
            )
        };
        let key = StrategyConfig::kv_key(strategy);
        if key.is_empty() {
            return Err(unknown());
        }
        if let Some((at, config)) = self.cached_strategies().get(&key) {
            if at.elapsed() < STRATEGY_TTL {
                return Ok(config.clone());
            }
        }
        let kv = self
            .store(&self.strategies, &self.strategies_bucket)
            .await?;
        let Some(bytes) = kv
            .get(&key)
            .await
            .map_err(|e| Fail::Retry(format!("strategies kv get {key}: {e}")))?
        else {
            self.cached_strategies().remove(&key);
            return Err(unknown());
        };
        let config: StrategyConfig = serde_json::from_slice(&bytes).map_err(|e| {
            Fail::Retry(format!(
                "strategy `{strategy}`: configuration in the strategies bucket is unreadable: {e}"
            ))
        })?;
        self.cached_strategies()
            .insert(key, (Instant::now(), config.clone()));
        Ok(config)
    }

    fn cached_strategies(&self) -> MutexGuard<'_, HashMap<String, (Instant, StrategyConfig)>> {
        // A panic while holding the lock leaves a map of valid entries.
        self.strategy_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn marker(state: SeenState, msg: &Delivery) -> Bytes {
        let m = SeenMarker {
            state,
            at: now_nanos(),
            raw_seq: msg.stream_seq,
        };
        Bytes::from(serde_json::to_vec(&m).unwrap_or_default())
    }

    /// The dedupe protocol of the module docs.
    async fn publish_once(
        &self,
        msg: &Delivery,
        raw: &RawSignal,
        signal: &StandardizedSignal,
    ) -> Result<Step, Fail> {
        let key = dedupe_key(signal.environment, &signal.signal_id);
        let subject = self
            .subjects
            .signals_standardized(signal.environment, &signal.strategy_id)
            .map_err(|e| Fail::Reject("invalid_strategy_id", e.to_string()))?;
        let seen = self.store(&self.seen, &self.seen_bucket).await?;
        let kv_err = |op: &str, e: &dyn std::fmt::Display| {
            Fail::Retry(format!("signals_seen {op} {key}: {e}"))
        };
        // The common case is a new signal: try to create the marker first
        // (one round trip); only an existing marker is read. At most a few
        // turns: a marker deleted between the two re-creates once.
        for _ in 0..3 {
            match seen
                .create(&key, Self::marker(SeenState::Pending, msg))
                .await
            {
                Ok(_) => return Self::to_publish(msg, raw, signal, subject, key),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(kv_err("create", &e)),
            }
            let entry = seen
                .entry(key.as_str())
                .await
                .map_err(|e| kv_err("get", &e))?;
            let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) else {
                continue;
            };
            let marker: Option<SeenMarker> = serde_json::from_slice(&e.value).ok();
            let (state, at) = match marker {
                Some(m) => (m.state, m.at),
                // Unreadable marker: treat as pending from the start of time.
                None => (SeenState::Pending, 0),
            };
            if state == SeenState::Done {
                tracing::debug!(signal_id = %signal.signal_id, "already standardized");
                return Ok(Step::Settled(Outcome::Duplicate));
            }
            let age = now_nanos().saturating_sub(at);
            let young = age >= 0 && age < (self.settings.duplicate_window / 2).as_nanos() as i128;
            if !young && self.already_published(&subject, &key, at).await? {
                self.mark_done(msg, &key, seen).await;
                return Ok(Step::Settled(Outcome::Duplicate));
            }
            return Self::to_publish(msg, raw, signal, subject, key);
        }
        Err(Fail::Retry(format!("signals_seen {key}: kept changing")))
    }

    /// The standardized message of `signal` (step 3 of the dedupe protocol).
    fn to_publish(
        msg: &Delivery,
        raw: &RawSignal,
        signal: &StandardizedSignal,
        subject: String,
        key: String,
    ) -> Result<Step, Fail> {
        let body = serde_json::to_vec(signal)
            .map_err(|e| Fail::Retry(format!("serialize standardized signal: {e}")))?;
        let received_at = msg
            .header(headers::RECEIVED_AT)
            .map(str::to_string)
            .unwrap_or_else(|| {
                raw.received_at
                    .timestamp_nanos_opt()
                    .unwrap_or_default()
                    .to_string()
            });
        let out = Outgoing::new(subject, &key, body)
            .header(headers::SIGNAL_ID, &signal.signal_id)
            .header(headers::RECEIVED_AT, &received_at);
        Ok(Step::Publish {
            out,
            key,
            received_at,
        })
    }

    /// Best effort: a missing `done` only costs a later re-send a scan.
    async fn mark_done(&self, msg: &Delivery, key: impl AsRef<str>, seen: &kv::Store) {
        let key = key.as_ref();
        if let Err(e) = seen.put(key, Self::marker(SeenState::Done, msg)).await {
            tracing::warn!(error = %e, key, "could not mark signal done; a re-send will scan");
        }
    }

    /// Whether `SIGNALS_STANDARDIZED` holds a message with id `key` on
    /// `subject`, published after `since` (epoch nanos, minus [`SCAN_SKEW`]).
    async fn already_published(&self, subject: &str, key: &str, since: i128) -> Result<bool, Fail> {
        let retry = |what: &str, e: &dyn std::fmt::Display| {
            Fail::Retry(format!("scan {subject} for {key}: {what}: {e}"))
        };
        let start = since.saturating_sub(SCAN_SKEW.as_nanos() as i128).max(0);
        let deliver_policy = match async_nats::datetime::from_nanos(start) {
            Ok(start_time) => consumer::DeliverPolicy::ByStartTime { start_time },
            Err(_) => consumer::DeliverPolicy::All,
        };
        let stream = self
            .js
            .get_stream_no_info(&self.standardized_stream)
            .await
            .map_err(|e| retry("stream", &e))?;
        let c = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject.to_string(),
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                headers_only: true,
                memory_storage: true,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| retry("consumer", &e))?;
        let name = c.cached_info().name.clone();
        let mut remaining = c.cached_info().num_pending;
        let found = async {
            while remaining > 0 {
                let batch = remaining.min(1000) as usize;
                let mut req = PullRequest::start(
                    &c,
                    &self.js,
                    batch,
                    Duration::from_secs(5),
                    Duration::from_secs(1),
                )
                .await
                .map_err(|e| retry("pull", &e))?;
                let mut got = 0u64;
                while !req.is_done() {
                    let chunk = req.next_chunk(batch).await.map_err(|e| retry("pull", &e))?;
                    for m in &chunk {
                        got += 1;
                        let id = m.headers.as_ref().and_then(|h| h.get(headers::MSG_ID));
                        if id.map(|v| v.as_str()) == Some(key) {
                            return Ok(true);
                        }
                    }
                }
                if got == 0 {
                    return Err(Fail::Retry(format!(
                        "scan {subject} for {key}: no progress"
                    )));
                }
                remaining = remaining.saturating_sub(got);
            }
            Ok(false)
        }
        .await;
        let _ = stream.delete_consumer(&name).await;
        found
    }
}

impl Handler for Standardizer {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        let step = self.prepare(msg).await;
        let mut out = self
            .publish_batch(std::slice::from_ref(msg), vec![step])
            .await;
        out.pop()
            .unwrap_or_else(|| Outcome::retry(self.settings.retry_after, "not settled"))
    }

    /// Prepare up to `concurrency` messages at once (parse, strategy, dedupe
    /// marker), then publish the batch's standardized signals in stream
    /// order in one pipelined round trip: an entry and its exit in one batch
    /// leave in the order they arrived.
    async fn handle_batch(&self, msgs: &[Delivery], concurrency: usize) -> Vec<Outcome> {
        let steps: Vec<Result<Step, Fail>> = futures::stream::iter(0..msgs.len())
            .map(|i| async move {
                match AssertUnwindSafe(self.prepare(&msgs[i]))
                    .catch_unwind()
                    .await
                {
                    Ok(step) => step,
                    Err(_) => Err(Fail::Retry("handler panicked".into())),
                }
            })
            .buffered(concurrency.max(1))
            .collect()
            .await;
        self.publish_batch(msgs, steps).await
    }
}

/// Why the stage could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The topology has no such KV bucket (a build of mismatched crates).
    #[error("the topology has no `{0}` KV bucket")]
    MissingBucket(&'static str),
    /// The process refused the consumer.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

/// Run the standardizer pool in `process`.
pub fn spawn(process: &mut Process) -> Result<(), WorkerError> {
    let handler = Arc::new(Standardizer::new(process)?);
    process.spawn_consumer(STAGE, DURABLE, handler)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(payload: &[u8]) -> &'static str {
        match decode_envelope(payload) {
            Err(Fail::Reject(r, _)) => r,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn an_envelope_decodes_and_bad_bytes_are_told_apart() {
        let raw = serde_json::json!({
            "source": "tradingview",
            "environment": "staging",
            "received_at": "2026-11-21T10:00:00Z",
            "format": "TRADINGVIEW",
            "payload": {"strategy_name": "S1"}
        });
        let ok = decode_envelope(raw.to_string().as_bytes());
        assert!(ok.is_ok(), "{ok:?}");
        assert_eq!(reason(b"not json"), "invalid_json");
        // Truncated JSON whose start is already no envelope: still not JSON.
        assert_eq!(reason(br#"{"source": 5, "environment""#), "invalid_json");
        assert_eq!(reason(br#"{"source": 5}"#), "invalid_envelope");
        assert_eq!(reason(b"[1, 2]"), "invalid_envelope");
    }
}
