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
//! 4. [`standardize`], then publish to
//!    `signals.standardized.<env>.<strategy>.<signal_id>` under the dedupe
//!    protocol below (a batch's signals in one pipelined round trip, in
//!    stream order).
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
//! at any point. Each standardized signal is published on a subject of its
//! own, [`Subjects::signal_standardized`]
//! (`signals.standardized.<env>.<strategy>.<signal_id>`), with
//! `Nats-Msg-Id` = [`dedupe_key`] and
//! `Nats-Expected-Last-Subject-Sequence: 0`
//! ([`Outgoing::only_if_new_subject`]): JetStream stores it only if that
//! subject holds no message yet. So one publish, atomic on the server, both
//! checks and records:
//!
//! | the publish | outcome |
//! |---|---|
//! | stored | `Ok` (the consume loop acks the raw message) |
//! | refused: the subject already holds the signal | [`Outcome::Duplicate`] (ack, nothing new stored) |
//! | dropped as a duplicate `Nats-Msg-Id` (inside the window) | [`Outcome::Duplicate`] |
//! | no ack (NATS down, timeout) | retried after `worker.publish_retry_delay_ms` |
//!
//! Crash points: before the publish → the redelivery publishes; after it,
//! before the raw ack → the redelivery is refused, a duplicate. A re-send is
//! recognised for as long as `SIGNALS_STANDARDIZED` keeps the signal
//! (`topology.standardized_max_age_secs`, 30 days), however late it comes,
//! and two replicas handed copies at once cannot both store one (the server
//! checks and stores in one step). No KV record or stream scan is involved.
//! The message id carries the environment because staging and production
//! may share one NATS: the same sender id sent to both must not be
//! deduplicated across them (the subject carries it too).

use crate::{parse_raw_signal, standardize, SignalError, StrategyInfo};
use async_nats::jetstream::{self, kv};
use futures::{FutureExt, StreamExt};
use mtx_runtime::metrics::RuntimeMetrics;
use mtx_runtime::process::{Process, ProcessError};
use mtx_runtime::publish::Publisher;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_schemas::headers;
use mtx_schemas::signal::{RawSignal, StandardizedSignal};
use mtx_schemas::strategy::StrategyConfig;
use mtx_schemas::Environment;
use mtx_subjects::topology::buckets;
use mtx_subjects::Subjects;
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

/// The `Nats-Msg-Id` of a signal's raw and standardized messages:
/// `<env>.<signal_id>`.
pub fn dedupe_key(environment: Environment, signal_id: &str) -> String {
    format!("{environment}.{signal_id}")
}

/// Tunables of the stage (from [`mtx_runtime::Config`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Delay before a retryable failure is redelivered.
    pub retry_after: Duration,
}

/// The standardizer's [`Handler`].
pub struct Standardizer {
    js: jetstream::Context,
    subjects: Subjects,
    strategies_bucket: String,
    strategies: OnceCell<kv::Store>,
    /// Strategy configurations read within [`STRATEGY_TTL`], by bucket key.
    strategy_cache: Mutex<HashMap<String, (Instant, StrategyConfig)>>,
    publisher: Publisher,
    metrics: Option<RuntimeMetrics>,
    settings: Settings,
}

/// One message after [`Standardizer::prepare`]: its standardized message.
struct Prepared {
    out: Outgoing,
    received_at: String,
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
            strategies: OnceCell::new(),
            strategy_cache: Mutex::new(HashMap::new()),
            publisher: Publisher::new(process.js.clone(), Some(process.metrics.clone()), STAGE),
            metrics: Some(process.metrics.clone()),
            settings: Settings {
                retry_after: Duration::from_millis(process.config.worker.publish_retry_delay_ms),
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

    /// Steps 1–4 of the module docs for one message, up to the publish:
    /// its standardized message.
    async fn prepare(&self, msg: &Delivery) -> Result<Prepared, Fail> {
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
        self.to_publish(msg, &raw, &signal)
    }

    /// Publish every prepared signal of the batch in stream order (one
    /// pipelined round trip); a signal its subject already holds is a
    /// duplicate.
    async fn publish_batch(
        &self,
        msgs: &[Delivery],
        steps: Vec<Result<Prepared, Fail>>,
    ) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(steps.len());
        let mut outs = Vec::new();
        let mut sent = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Ok(Prepared { out, received_at }) => {
                    outcomes.push(None);
                    sent.push((i, received_at));
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
        for ((i, received_at), r) in sent.into_iter().zip(results) {
            let msg = &msgs[i];
            outcomes[i] = Some(match r {
                Err(e) if e.already_stored => {
                    tracing::debug!(seq = msg.stream_seq, "already standardized");
                    Outcome::Duplicate
                }
                Err(e) => self.settle_failure(msg, Fail::Retry(e.to_string())),
                Ok(published) => {
                    if let (Some(m), Ok(t)) = (&self.metrics, received_at.parse::<i128>()) {
                        let secs = now.saturating_sub(t).max(0) as f64 / 1e9;
                        m.e2e_seconds.with_label_values(&[STAGE]).observe(secs);
                    }
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

    /// The standardized message of `signal`, on its own subject and stored
    /// only if that subject is new (module docs).
    fn to_publish(
        &self,
        msg: &Delivery,
        raw: &RawSignal,
        signal: &StandardizedSignal,
    ) -> Result<Prepared, Fail> {
        let subject = self
            .subjects
            .signal_standardized(signal.environment, &signal.strategy_id, &signal.signal_id)
            .map_err(|e| Fail::Reject("invalid_subject_token", e.to_string()))?;
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
        let key = dedupe_key(signal.environment, &signal.signal_id);
        let out = Outgoing::new(subject, key, body)
            .header(headers::SIGNAL_ID, &signal.signal_id)
            .header(headers::RECEIVED_AT, &received_at)
            .only_if_new_subject();
        Ok(Prepared { out, received_at })
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

    /// Prepare up to `concurrency` messages at once (parse, strategy), then
    /// publish the batch's standardized signals in stream
    /// order in one pipelined round trip: an entry and its exit in one batch
    /// leave in the order they arrived.
    async fn handle_batch(&self, msgs: &[Delivery], concurrency: usize) -> Vec<Outcome> {
        let steps: Vec<Result<Prepared, Fail>> = futures::stream::iter(0..msgs.len())
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
