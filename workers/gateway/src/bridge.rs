//! Door 3 (`mtx run bridge`): a read-only bridge from the existing signal
//! collector. It tails `<mongo.signals_db>.trading_signals` with a change
//! stream and publishes every inserted document as a [`RawSignal`] on
//! `signals.raw.<env>.<gateway.source>`.
//!
//! - **Read only.** The collector's database is only watched; the bridge's
//!   own state (the resume token) lives in `<mongo.trading_db>.bridge_state`.
//! - **Neither skips nor repeats across restarts.** For each insert the raw
//!   signal is published and acknowledged by JetStream *before* the event's
//!   resume token is saved; a restart resumes after the last saved token. A
//!   crash between the two republishes that one event with the same
//!   `Nats-Msg-Id` (dropped by JetStream within its window; beyond it the
//!   standardizer collapses it: `SIGNALS_STANDARDIZED` stores a signal once). While idle, the stream's
//!   latest token is saved every [`IDLE_SAVE`] so a quiet period cannot age
//!   the saved token out of the oplog. The first start (no saved token)
//!   begins at the current end of the stream. If the saved token is no longer
//!   in the oplog the bridge does **not** jump ahead: it logs an error and
//!   retries, and an operator decides (delete the state document to start
//!   from now).
//! - **Same ids as the gateway.** The source is `gateway.source`, so a signal
//!   that reaches both the collector and the gateway (senders posting to
//!   both during a migration) gets one signal id and is standardized once.
//!   A document without `signalID` uses `mongo:<_id>` as its sender id.
//! - **Environment from config.** A document whose `environment` (the
//!   collector defaults it to `production`) is not this deployment's is
//!   skipped and logged: it was meant for the other deployment.
//! - Documents are published as received (minus `_id`, collector bookkeeping
//!   and any secret); a body the standardizer cannot read is dead-lettered
//!   there with its reason, never dropped here. One NATS can never take
//!   (larger than `max_payload`) gets a dead letter on `dlq.bridge` (reason
//!   `unpublishable`) naming the collector document, and the bridge goes on
//!   with the next.

use crate::GatewayError;
use mongodb::bson::{doc, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::Collection;
use mtx_runtime::process::Process;
use mtx_runtime::publish::Publisher;
use mtx_runtime::Outgoing;
use mtx_schemas::headers;
use mtx_schemas::signal::{ContentFormat, RawSignal};
use mtx_schemas::Environment;
use mtx_standardizer::worker::dedupe_key;
use mtx_standardizer::{parse_raw_signal, strip_secret};
use mtx_subjects::Subjects;
use serde_json::Value;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The collector's collection (in `mongo.signals_db`).
pub const SOURCE_COLLECTION: &str = "trading_signals";
/// The bridge's own state collection (in `mongo.trading_db`).
pub const STATE_COLLECTION: &str = "bridge_state";
/// How often the latest token is saved while no insert arrives.
pub const IDLE_SAVE: Duration = Duration::from_secs(10);

/// Collector bookkeeping fields that are not part of the sender's signal.
const BOOKKEEPING: [&str; 5] = [
    "_id",
    "received_at",
    "signal_processed",
    "processed",
    "processed_at",
];

/// The bridge's wiring.
#[derive(Clone)]
pub struct Bridge {
    source: Collection<Document>,
    state: Collection<Document>,
    state_id: String,
    subjects: Subjects,
    publisher: Publisher,
    environment: Environment,
    source_name: String,
    futures_front_month: bool,
    retry: Duration,
}

/// What became of one inserted document.
#[derive(Debug, Clone, PartialEq)]
pub enum Bridged {
    /// Published with this `Nats-Msg-Id`.
    Published(String),
    /// Meant for another environment; not published.
    OtherEnvironment(String),
    /// NATS can never take it (larger than `max_payload`): a dead letter on
    /// `dlq.bridge` names the collector document instead, so the documents
    /// after it are not held up behind it.
    DeadLettered(String),
}

impl Bridge {
    /// A bridge for `process`'s config.
    pub async fn new(process: &Process) -> Result<Bridge, GatewayError> {
        let cfg = &process.config;
        let client = crate::secrets::mongo_client(&cfg.mongo.uri, Duration::from_secs(5)).await?;
        Ok(Bridge {
            source: client
                .database(&cfg.mongo.signals_db)
                .collection(SOURCE_COLLECTION),
            state: client
                .database(&cfg.mongo.trading_db)
                .collection(STATE_COLLECTION),
            state_id: format!("{}.{SOURCE_COLLECTION}", cfg.mongo.signals_db),
            subjects: process.subjects.clone(),
            publisher: Publisher::new(process.js.clone(), Some(process.metrics.clone()), "bridge"),
            environment: cfg.environment,
            source_name: cfg.gateway.source.clone(),
            futures_front_month: cfg.gateway.futures_front_month,
            retry: Duration::from_millis(cfg.worker.publish_retry_delay_ms.max(100)),
        })
    }

    async fn saved_token(&self) -> Result<Option<ResumeToken>, mongodb::error::Error> {
        let Some(d) = self.state.find_one(doc! {"_id": &self.state_id}).await? else {
            return Ok(None);
        };
        match d.get("resume_token") {
            Some(b) => Ok(mongodb::bson::deserialize_from_bson(b.clone()).ok()),
            None => Ok(None),
        }
    }

    async fn save_token(&self, token: &ResumeToken) -> Result<(), mongodb::error::Error> {
        let b = mongodb::bson::serialize_to_bson(token).map_err(mongodb::error::Error::custom)?;
        self.state
            .update_one(
                doc! {"_id": &self.state_id},
                doc! {"$set": {"resume_token": b, "updated_at": mongodb::bson::DateTime::now()}},
            )
            .upsert(true)
            .await?;
        Ok(())
    }

    /// The raw signal for one inserted document, and its message id.
    pub fn raw_signal(&self, mut d: Document) -> Result<(RawSignal, String), Bridged> {
        let oid = object_id(&d);
        let doc_env = d
            .get_str("environment")
            .unwrap_or("production")
            .trim()
            .to_ascii_lowercase();
        if doc_env != self.environment.as_str() {
            return Err(Bridged::OtherEnvironment(doc_env));
        }
        for k in BOOKKEEPING {
            d.remove(k);
        }
        let mut payload: Value = serde_json::to_value(&d).unwrap_or(Value::Null);
        strip_secret(&mut payload);
        let raw = RawSignal {
            source: self.source_name.clone(),
            environment: self.environment,
            received_at: chrono::Utc::now(),
            format: ContentFormat::Mathematricks,
            strategy_hint: None,
            instrument_type_hint: None,
            fallback_signal_id: Some(format!("mongo:{oid}")),
            futures_front_month: self.futures_front_month,
            payload,
        };
        // Same id as the gateway when the body parses; else one per document.
        let msg_id = match parse_raw_signal(&raw) {
            Ok(p) => dedupe_key(self.environment, &p.signal_id()),
            Err(_) => format!("{}.mongo.{oid}", self.environment),
        };
        Ok((raw, msg_id))
    }

    /// The dead letter of a document NATS can never take: it names the
    /// collector document (too large to carry itself).
    fn dead_letter(
        &self,
        subject: &str,
        msg_id: &str,
        oid: &str,
        bytes: usize,
        error: &str,
    ) -> Result<Outgoing, String> {
        let dlq = self.subjects.dlq("bridge").map_err(|e| e.to_string())?;
        let body = serde_json::json!({
            "collection": self.source.namespace().to_string(),
            "_id": oid,
            "bytes": bytes,
            "msg_id": msg_id,
        });
        let detail = format!(
            "the raw signal of collector document {oid} ({bytes} bytes) cannot be published: {error}"
        );
        let detail = mtx_runtime::dlq::detail_header(&detail);
        Ok(Outgoing::new(
            dlq,
            format!("dlq.bridge.{oid}"),
            serde_json::to_vec(&body).unwrap_or_default(),
        )
        .header(headers::DLQ_STAGE, "bridge")
        .header(headers::DLQ_REASON, "unpublishable")
        .header(headers::DLQ_DETAIL, &detail)
        .header(headers::ORIGINAL_SUBJECT, subject))
    }

    /// Publish a dead letter, retried until JetStream acks or shutdown.
    async fn publish_dead_letter(
        &self,
        letter: Result<Outgoing, String>,
        shutdown: &CancellationToken,
    ) -> Option<Bridged> {
        let letter = match letter {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "bridge: cannot name the DLQ subject");
                return None;
            }
        };
        loop {
            match self.publisher.publish(letter.clone()).await {
                Ok(_) => {
                    tracing::error!(msg_id = %letter.msg_id, "bridge: a collector document cannot be published; dead-lettered");
                    return Some(Bridged::DeadLettered(letter.msg_id.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bridge: dead letter not stored; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(self.retry) => {}
                    }
                }
            }
        }
    }

    /// Publish one inserted document; retried until JetStream acks or shutdown.
    async fn publish(&self, d: Document, shutdown: &CancellationToken) -> Option<Bridged> {
        let oid = object_id(&d);
        let (raw, msg_id) = match self.raw_signal(d) {
            Ok(x) => x,
            Err(skipped) => return Some(skipped),
        };
        let subject = match self.subjects.signals_raw(self.environment, &raw.source) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "bridge: unusable gateway.source");
                return None;
            }
        };
        let body = serde_json::to_vec(&raw).unwrap_or_default();
        let nanos = raw
            .received_at
            .timestamp_nanos_opt()
            .unwrap_or_default()
            .to_string();
        loop {
            let mut out = Outgoing::new(subject.clone(), msg_id.clone(), body.clone())
                .header(headers::RECEIVED_AT, &nanos);
            if let Some(id) = msg_id.strip_prefix(&format!("{}.", self.environment)) {
                if id.starts_with("sig_") {
                    out = out.header(headers::SIGNAL_ID, id);
                }
            }
            match self.publisher.publish(out).await {
                Ok(_) => return Some(Bridged::Published(msg_id)),
                Err(e) if e.permanent => {
                    let letter = self.dead_letter(&subject, &msg_id, &oid, body.len(), &e.message);
                    return self.publish_dead_letter(letter, shutdown).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bridge: publish failed; retrying the same document");
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(self.retry) => {}
                    }
                }
            }
        }
    }

    /// Tail the collection until shutdown, reconnecting on errors.
    pub async fn run(self, shutdown: CancellationToken, ready: mtx_runtime::health::ReadyFlag) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.tail(&shutdown, &ready).await {
                Ok(()) => return,
                Err(e) => {
                    ready.set(false);
                    tracing::error!(error = %e, retry_ms = backoff.as_millis() as u64, "bridge: change stream failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn tail(
        &self,
        shutdown: &CancellationToken,
        ready: &mtx_runtime::health::ReadyFlag,
    ) -> Result<(), mongodb::error::Error> {
        let token = self.saved_token().await?;
        let resumed = token.is_some();
        let mut stream = self.source.watch().resume_after(token).await?;
        if !resumed {
            // First start: remember where "now" is, so a restart before the
            // first insert does not skip what arrives in between.
            if let Some(t) = stream.resume_token() {
                self.save_token(&t).await?;
            }
        }
        ready.set(true);
        tracing::info!(resumed, "bridge: tailing the collector's trading_signals");
        let mut last_save = Instant::now();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                n = stream.next_if_any() => n?,
            };
            match next {
                Some(ChangeStreamEvent {
                    id,
                    operation_type: OperationType::Insert,
                    full_document: Some(d),
                    ..
                }) => {
                    match self.publish(d, shutdown).await {
                        Some(Bridged::Published(msg_id)) => {
                            tracing::info!(%msg_id, "bridge: raw signal published");
                        }
                        Some(Bridged::OtherEnvironment(env)) => {
                            tracing::info!(document_env = %env, "bridge: skipped a signal for another environment");
                        }
                        Some(Bridged::DeadLettered(_)) => {}
                        None => return Ok(()),
                    }
                    self.save_token(&id).await?;
                    last_save = Instant::now();
                }
                Some(ChangeStreamEvent {
                    id,
                    operation_type: OperationType::Insert,
                    full_document: None,
                    ..
                }) => {
                    // Cannot happen (inserts carry the document); never silent.
                    tracing::error!(token = ?id, "bridge: insert event without its document");
                }
                Some(other) => {
                    // Updates (the collector marking documents processed),
                    // deletes, ...: not new signals.
                    if last_save.elapsed() >= IDLE_SAVE {
                        self.save_token(&other.id).await?;
                        last_save = Instant::now();
                    }
                }
                None => {
                    if last_save.elapsed() >= IDLE_SAVE {
                        if let Some(t) = stream.resume_token() {
                            self.save_token(&t).await?;
                        }
                        last_save = Instant::now();
                    }
                }
            }
        }
    }
}

/// A collector document's `_id` as text (hex for an ObjectId).
fn object_id(d: &Document) -> String {
    match d.get("_id") {
        Some(mongodb::bson::Bson::ObjectId(o)) => o.to_hex(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

/// Run the bridge inside `process`.
pub async fn spawn(process: &mut Process) -> Result<(), GatewayError> {
    let bridge = Bridge::new(process).await?;
    let ready = process.health.ready_flag("bridge change stream open");
    process.spawn(bridge.run(process.shutdown.clone(), ready));
    Ok(())
}
