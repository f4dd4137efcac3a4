//! Dead letters: the message the consume loop publishes to `dlq.<stage>`,
//! and the listener for messages the server itself gave up on.
//!
//! A dead letter is the original payload with the original headers (except
//! `Nats-Msg-Id`) plus:
//!
//! | header | value |
//! |---|---|
//! | `Mtx-Dlq-Stage` | stage that gave up |
//! | `Mtx-Dlq-Consumer` | its durable consumer |
//! | `Mtx-Dlq-Reason` / `Mtx-Dlq-Detail` | reason code / one-line detail |
//! | `Mtx-Dlq-Time` | when the runtime dead-lettered it (RFC 3339, UTC) |
//! | `Mtx-Original-Subject` / `Mtx-Original-Seq` | where it was consumed from |
//! | `Mtx-Deliveries` | how often it had been delivered |
//!
//! Its `Nats-Msg-Id` is `dlq:<stream>:<durable>:<seq>` ([`msg_id`]): every
//! replica of a stage, and both the loop and the advisory listener, produce
//! the same id for the same message of the same consumer, so they collapse
//! into one DLQ entry, while two stages reading the same stream (the sink and
//! the standardizer on `SIGNALS_RAW`) keep one entry each.
//!
//! **Max deliveries.** A handler that crashes the process on every delivery
//! never returns an outcome, so the loop never sees the last try; the server
//! stops delivering at `max_deliver` and only says so in the JetStream
//! advisory `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<consumer>`.
//! [`watch_max_deliveries`] listens to it for one binding, reads the message
//! by stream sequence (`$JS.API.STREAM.MSG.GET.<stream>`) and dead-letters it
//! with reason `max_deliveries`. Advisories are not stored: one sent while no
//! process of the stage runs is lost (the message stays in its stream).

use crate::consume::{Binding, LoopContext};
use crate::publish::{Outgoing, Publisher};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt;
use mtx_schemas::headers;
use serde::Deserialize;
use std::time::Duration;
use tracing::Instrument;

/// DLQ: when the runtime dead-lettered the message (RFC 3339, UTC).
pub const DLQ_TIME: &str = "Mtx-Dlq-Time";
/// DLQ: durable consumer of the stage that gave up on the message.
pub const DLQ_CONSUMER: &str = "Mtx-Dlq-Consumer";

/// Reason code of messages delivered `max_deliver` times without success.
pub const MAX_DELIVERIES: &str = "max_deliveries";

/// The deterministic `Nats-Msg-Id` of the dead letter of message `seq` of
/// `stream` given up by consumer `durable`.
pub fn msg_id(stream: &str, durable: &str, seq: u64) -> String {
    format!("dlq:{stream}:{durable}:{seq}")
}

/// True for a message of `b`'s own `dlq.<stage>` (the sink reading its own
/// dead letters): it is never dead-lettered again, which would loop through
/// `dlq.<stage>` for ever; it stays in the DLQ stream. (Other stages' dead
/// letters may take that one hop.)
pub fn is_own_dead_letter(ctx: &LoopContext, b: &Binding, subject: &str) -> bool {
    ctx.subjects
        .dlq(&b.stage)
        .map(|own| own == subject)
        .unwrap_or(false)
}

/// What a dead letter says about its original.
#[derive(Debug, Clone)]
pub struct Letter<'a> {
    /// Original subject.
    pub subject: &'a str,
    /// Original stream sequence.
    pub stream_seq: u64,
    /// Original headers.
    pub headers: &'a HeaderMap,
    /// Original payload.
    pub payload: Bytes,
    /// Deliveries so far.
    pub deliveries: u64,
    /// Reason code.
    pub reason: &'a str,
    /// Detail (made one line, at most 2,000 characters).
    pub detail: &'a str,
}

/// A dead letter's detail as a header value: one line (headers cannot hold
/// more), at most 2,000 characters.
pub fn detail_header(detail: &str) -> String {
    detail
        .replace(['\r', '\n'], " ")
        .chars()
        .take(2000)
        .collect()
}

/// The dead letter of `l` for binding `b` (to `dlq.<stage>`).
pub fn build(ctx: &LoopContext, b: &Binding, l: &Letter<'_>) -> Result<Outgoing, String> {
    let subject = ctx.subjects.dlq(&b.stage).map_err(|e| e.to_string())?;
    let mut out = Outgoing::new(
        subject,
        msg_id(&b.stream, &b.durable, l.stream_seq),
        l.payload.clone(),
    );
    for (k, vals) in l.headers.iter() {
        // JetStream's own headers are instructions for the original publish
        // (`Nats-Msg-Id`, `Nats-Expected-Last-Subject-Sequence: 0` of the
        // standardizer's dedupe, `Nats-TTL`, `Nats-Rollup`, ...): copied onto
        // a dead letter they would be applied to the DLQ stream, where the
        // expected-sequence check refuses every letter of a stage after its
        // first, and the message would end with no dead letter at all.
        if k.to_string()
            .get(..5)
            .is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
        {
            continue;
        }
        for v in vals {
            out.headers.append(k.clone(), v.clone());
        }
    }
    let detail_line = detail_header(l.detail);
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    out.headers.insert(headers::DLQ_STAGE, b.stage.as_str());
    out.headers.insert(DLQ_CONSUMER, b.durable.as_str());
    out.headers.insert(headers::DLQ_REASON, l.reason);
    out.headers
        .insert(headers::DLQ_DETAIL, detail_line.as_str());
    out.headers.insert(DLQ_TIME, now.as_str());
    out.headers.insert(headers::ORIGINAL_SUBJECT, l.subject);
    out.headers
        .insert(headers::ORIGINAL_SEQ, l.stream_seq.to_string().as_str());
    out.headers
        .insert(headers::DELIVERIES, l.deliveries.to_string().as_str());
    Ok(out)
}

/// Header of a dead letter that carries a reference instead of the
/// original payload (`true`).
pub const DLQ_PAYLOAD_OMITTED: &str = "Mtx-Dlq-Payload-Omitted";

/// Publish a dead letter. If NATS can never take it (the original was near
/// `max_payload` and the letter's headers pushed it over), publish it again
/// with the payload replaced by a reference to the original (stream,
/// sequence, size), which stays in its stream: the failure is recorded
/// either way, never lost.
pub async fn publish_letter(
    publisher: &Publisher,
    out: Outgoing,
    b: &Binding,
    stream_seq: u64,
) -> Result<crate::publish::Published, crate::publish::PublishFailure> {
    match publisher.publish(out.clone()).await {
        Err(e) if e.permanent => {
            tracing::error!(error = %e, "dead letter refused; publishing it with a reference instead of the payload");
            let reference = serde_json::json!({
                "payload_omitted": e.message,
                "original_stream": b.stream,
                "original_seq": stream_seq,
                "original_bytes": out.payload.len(),
            });
            let mut slim = out;
            slim.payload = serde_json::to_vec(&reference).unwrap_or_default().into();
            slim.headers.insert(DLQ_PAYLOAD_OMITTED, "true");
            publisher.publish(slim).await
        }
        other => other,
    }
}

/// `$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.<stream>.<durable>`
pub fn advisory_subject(stream: &str, durable: &str) -> String {
    format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{durable}")
}

/// The fields of `io.nats.jetstream.advisory.v1.max_deliver` we use.
#[derive(Debug, Deserialize)]
struct MaxDeliverAdvisory {
    stream: String,
    consumer: String,
    stream_seq: u64,
    deliveries: u64,
}

/// Until shutdown: dead-letter every message the server reports as having
/// reached `max_deliver` on `b`'s consumer.
pub async fn watch_max_deliveries(ctx: LoopContext, b: Binding) {
    let subject = advisory_subject(&b.stream, &b.durable);
    let client = ctx.js.client();
    let mut attempt: u32 = 0;
    while !ctx.shutdown.is_cancelled() {
        let sub = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            s = client.subscribe(subject.clone()) => s,
        };
        let mut sub = match sub {
            Ok(s) => s,
            Err(e) => {
                attempt += 1;
                let wait = Duration::from_millis((200u64 << attempt.min(4)).min(3_000));
                tracing::warn!(error = %e, %subject, "cannot subscribe to max-deliveries advisories");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        attempt = 0;
        tracing::debug!(%subject, "watching max-deliveries advisories");
        loop {
            let m = tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                m = sub.next() => m,
            };
            let Some(m) = m else { break };
            match serde_json::from_slice::<MaxDeliverAdvisory>(&m.payload) {
                Ok(a) if a.stream == b.stream && a.consumer == b.durable => {
                    on_max_deliveries(&ctx, &b, &a).await
                }
                Ok(a) => {
                    tracing::warn!(stream = %a.stream, consumer = %a.consumer, "advisory for another consumer ignored")
                }
                Err(e) => tracing::warn!(error = %e, "unreadable max-deliveries advisory"),
            }
        }
    }
}

async fn on_max_deliveries(ctx: &LoopContext, b: &Binding, a: &MaxDeliverAdvisory) {
    let span = tracing::warn_span!(
        "max_deliveries",
        stage = %b.stage,
        seq = a.stream_seq,
        deliveries = a.deliveries
    );
    dead_letter_given_up(ctx, b, a).instrument(span).await
}

/// What the stream still has of a message.
enum Original {
    Found(async_nats::jetstream::message::StreamMessage),
    Gone,
    Unreadable,
}

async fn read_original(ctx: &LoopContext, b: &Binding, seq: u64) -> Original {
    use async_nats::jetstream::stream::RawMessageErrorKind;
    for attempt in 0..6u32 {
        let got = async {
            let st = ctx
                .js
                .get_stream_no_info(&b.stream)
                .await
                .map_err(|e| (false, e.to_string()))?;
            st.get_raw_message(seq).await.map_err(|e| {
                (
                    matches!(e.kind(), RawMessageErrorKind::NoMessageFound),
                    e.to_string(),
                )
            })
        }
        .await;
        match got {
            Ok(m) => return Original::Found(m),
            Err((true, _)) => return Original::Gone,
            Err((false, e)) => {
                tracing::warn!(error = %e, attempt, "cannot read the message for its dead letter");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250 << attempt)) => {}
                }
            }
        }
    }
    Original::Unreadable
}

async fn dead_letter_given_up(ctx: &LoopContext, b: &Binding, a: &MaxDeliverAdvisory) {
    let mut detail = format!(
        "delivered {} times without being settled (the handler crashed the process or overran the ack wait)",
        a.deliveries
    );
    let original = read_original(ctx, b, a.stream_seq).await;
    let empty = HeaderMap::new();
    let (subject, hdrs, payload) = match &original {
        Original::Found(m) => (m.subject.as_str(), &m.headers, m.payload.clone()),
        Original::Gone => {
            // Still worth a dead letter: the failure is not silent.
            detail.push_str("; the message is no longer in the stream");
            ("", &empty, Bytes::new())
        }
        Original::Unreadable => {
            tracing::error!(
                "max deliveries reached but the message could not be read: not dead-lettered (it stays in its stream)"
            );
            return;
        }
    };
    if is_own_dead_letter(ctx, b, subject) {
        tracing::error!(
            "a dead letter reached max deliveries; it stays in the DLQ stream (never dead-lettered again)"
        );
        return;
    }
    let letter = Letter {
        subject,
        stream_seq: a.stream_seq,
        headers: hdrs,
        payload,
        deliveries: a.deliveries,
        reason: MAX_DELIVERIES,
        detail: &detail,
    };
    let out = match build(ctx, b, &letter) {
        Ok(o) => o,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the dead letter");
            return;
        }
    };
    // The server will not deliver this message again: keep trying for a
    // while (NATS blips), every replica does the same under the same id.
    let publisher = Publisher::new(ctx.js.clone(), Some(ctx.metrics.clone()), b.stage.as_str());
    for attempt in 0..8u32 {
        match publish_letter(&publisher, out.clone(), b, a.stream_seq).await {
            Ok(p) => {
                if !p.duplicate {
                    tracing::warn!(reason = MAX_DELIVERIES, %detail, "dead-lettered after the server gave up");
                    ctx.metrics
                        .dlq
                        .with_label_values(&[&b.stage, MAX_DELIVERIES])
                        .inc();
                }
                return;
            }
            Err(e) if e.permanent => {
                tracing::error!(error = %e, "DLQ publish of a max-deliveries message refused");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, attempt, "DLQ publish of a max-deliveries message failed; retrying");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250 << attempt.min(5))) => {}
                }
            }
        }
    }
    tracing::error!("could not dead-letter a max-deliveries message (it stays in its stream)");
}
