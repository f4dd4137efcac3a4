//! Publishing with deterministic de-duplication ids and batched acks.

use crate::metrics::RuntimeMetrics;
use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::future::join_all;
use mtx_schemas::headers;
use std::future::IntoFuture;
use std::time::Instant;

/// One message a handler wants published.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Full subject (built with [`mtx_subjects::Subjects`]).
    pub subject: String,
    /// Deterministic id; becomes `Nats-Msg-Id` so a re-publish is deduplicated.
    pub msg_id: String,
    /// Extra headers (latency timestamps are copied from the input by the loop).
    pub headers: HeaderMap,
    /// Body.
    pub payload: Bytes,
}

impl Outgoing {
    /// A message with a deterministic id.
    pub fn new(
        subject: impl Into<String>,
        msg_id: impl Into<String>,
        payload: impl Into<Bytes>,
    ) -> Self {
        Outgoing {
            subject: subject.into(),
            msg_id: msg_id.into(),
            headers: HeaderMap::new(),
            payload: payload.into(),
        }
    }

    /// Add a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Store the message only if its subject holds no message yet
    /// (`Nats-Expected-Last-Subject-Sequence: 0`, the check KV `create` is
    /// built on): atomic "first writer wins" on the stream itself, for
    /// messages that have a subject of their own. A refusal comes back as a
    /// [`PublishFailure`] with `already_stored`.
    pub fn only_if_new_subject(self) -> Self {
        self.header(headers::EXPECTED_LAST_SUBJECT_SEQUENCE, "0")
    }
}

/// Why a publish did not get a JetStream ack.
#[derive(Debug, thiserror::Error)]
#[error("publish to {subject} failed: {message}")]
pub struct PublishFailure {
    /// Subject of the failed message.
    pub subject: String,
    /// Client / server error text.
    pub message: String,
    /// True for errors a retry cannot fix (payload too large, invalid subject).
    pub permanent: bool,
    /// The stream refused the message because its subject already holds one
    /// and the message said it expected none
    /// ([`Outgoing::only_if_new_subject`]): for a subject of its own, the
    /// message was stored before, so this is a duplicate, not a failure.
    pub already_stored: bool,
}

/// Result of one publish: the stream sequence, and whether JetStream had
/// already seen the id (a duplicate is success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Stream sequence of the stored message.
    pub sequence: u64,
    /// The server dropped it as a duplicate of an earlier publish.
    pub duplicate: bool,
}

/// Publishes on behalf of one stage.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    metrics: Option<RuntimeMetrics>,
    stage: String,
}

impl Publisher {
    /// A publisher labelled with `stage` in metrics.
    pub fn new(
        js: jetstream::Context,
        metrics: Option<RuntimeMetrics>,
        stage: impl Into<String>,
    ) -> Self {
        Publisher {
            js,
            metrics,
            stage: stage.into(),
        }
    }

    /// The JetStream context behind this publisher.
    pub fn context(&self) -> &jetstream::Context {
        &self.js
    }

    fn record(&self, started: Instant, r: &Result<Published, PublishFailure>) {
        if let Some(m) = &self.metrics {
            m.publish_ack_seconds
                .with_label_values(&[&self.stage])
                .observe(started.elapsed().as_secs_f64());
            let result = match r {
                Ok(p) if p.duplicate => "duplicate",
                Ok(_) => "ok",
                Err(e) if e.already_stored => "duplicate",
                Err(_) => "error",
            };
            m.published.with_label_values(&[&self.stage, result]).inc();
        }
    }

    /// Publish one message and wait for its ack.
    pub async fn publish(&self, out: Outgoing) -> Result<Published, PublishFailure> {
        self.publish_all(vec![out]).await.pop().unwrap_or_else(|| {
            Err(PublishFailure {
                subject: String::new(),
                message: "nothing published".into(),
                permanent: true,
                already_stored: false,
            })
        })
    }

    /// Send every message first, then await all acks together (one round trip
    /// of latency for the whole batch). Results are in input order.
    pub async fn publish_all(&self, outs: Vec<Outgoing>) -> Vec<Result<Published, PublishFailure>> {
        let started = Instant::now();
        let mut pending = Vec::with_capacity(outs.len());
        for out in outs {
            let subject = out.subject.clone();
            let mut h = out.headers;
            h.insert(headers::MSG_ID, out.msg_id.as_str());
            let sent = self
                .js
                .send_publish(
                    out.subject,
                    jetstream::message::PublishMessage::build()
                        .headers(h)
                        .payload(out.payload),
                )
                .await;
            pending.push((subject, sent));
        }
        let futs = pending.into_iter().map(|(subject, sent)| async move {
            let fail = |message: String, permanent| PublishFailure {
                subject: subject.clone(),
                message,
                permanent,
                already_stored: false,
            };
            match sent {
                Err(e) => {
                    let permanent = matches!(e.kind(), PublishErrorKind::MaxPayloadExceeded);
                    Err(fail(e.to_string(), permanent))
                }
                Ok(ack) => match ack.into_future().await {
                    Ok(a) => Ok(Published {
                        sequence: a.sequence,
                        duplicate: a.duplicate,
                    }),
                    Err(e) => Err(PublishFailure {
                        already_stored: matches!(e.kind(), PublishErrorKind::WrongLastSequence),
                        ..fail(e.to_string(), false)
                    }),
                },
            }
        });
        let results = join_all(futs).await;
        for r in &results {
            self.record(started, r);
        }
        results
    }
}
