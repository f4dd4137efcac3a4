//! The one consume loop every worker uses.
//!
//! A worker supplies a [`Handler`]; the loop binds the pool's durable pull
//! consumer, pulls in batches (with idle heartbeats), runs the handler with
//! bounded concurrency and settles each message from its [`Outcome`]:
//!
//! | outcome | what the loop does |
//! |---|---|
//! | `Ok(outputs)` | publishes the outputs (ids from the handler, latency headers copied), waits for their JetStream acks, then acks the input; a failed publish NAKs the input with `worker.publish_retry_delay_ms` |
//! | `Duplicate` | acks (the work was already done) |
//! | `Retry { after }` | NAKs with that delay, so the redelivery is not immediate |
//! | `Reject { reason }` | publishes the original bytes plus reason headers to `dlq.<stage>`, then terminates the message |
//!
//! A `Retry` on the last allowed delivery (`max_deliver`) takes the DLQ path
//! with reason `max_deliveries`, so nothing is silently dropped by the server.
//! On shutdown the loop issues no new pull request, handles every message of
//! the request in hand (until it is complete or idle), then stops.

use crate::config::WorkerConfig;
use crate::health::{Beat, Health, ReadyFlag};
use crate::metrics::RuntimeMetrics;
use crate::publish::{Outgoing, Publisher};
use crate::pull::PullRequest;
use async_nats::jetstream::{self, consumer::pull, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use mtx_schemas::headers;
use mtx_subjects::Subjects;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What a handler decided about one message.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Done; publish these (possibly none) and then ack.
    Ok(Vec<Outgoing>),
    /// Already processed earlier (idempotent replay); ack.
    Duplicate,
    /// Transient failure; redeliver after `after`.
    Retry {
        /// Delay before redelivery.
        after: Duration,
        /// Why, for logs (and the DLQ detail if deliveries run out).
        reason: String,
    },
    /// Permanent failure; dead-letter with this reason.
    Reject {
        /// Bounded snake_case reason code (a metric label).
        reason: String,
        /// Human-readable detail.
        detail: String,
    },
}

impl Outcome {
    /// Shorthand for a rejection.
    pub fn reject(reason: impl Into<String>, detail: impl Into<String>) -> Outcome {
        Outcome::Reject {
            reason: reason.into(),
            detail: detail.into(),
        }
    }
    /// Shorthand for a retry.
    pub fn retry(after: Duration, reason: impl Into<String>) -> Outcome {
        Outcome::Retry {
            after,
            reason: reason.into(),
        }
    }
}

/// One delivered message as a handler sees it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Subject it was published on.
    pub subject: String,
    /// Body.
    pub payload: Bytes,
    /// Headers (empty map when none).
    pub headers: HeaderMap,
    /// Delivery count, starting at 1.
    pub deliveries: u64,
    /// Stream sequence.
    pub stream_seq: u64,
    /// Messages still pending for this consumer when it was delivered.
    pub pending: u64,
}

impl Delivery {
    /// A header value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.as_str())
    }
}

/// A stage's message handler. Implement [`Handler::handle`]; override
/// [`Handler::handle_batch`] when a whole batch can be handled at once (the
/// sink's bulk writes).
pub trait Handler: Send + Sync + 'static {
    /// Handle one message. Must be idempotent: it may see the same message again.
    fn handle(&self, msg: &Delivery) -> impl Future<Output = Outcome> + Send;

    /// Handle a batch; one outcome per message, in order. The default runs
    /// [`Handler::handle`] with up to `concurrency` messages at once.
    fn handle_batch(
        &self,
        msgs: &[Delivery],
        concurrency: usize,
    ) -> impl Future<Output = Vec<Outcome>> + Send
    where
        Self: Sized,
    {
        async move {
            futures::stream::iter(0..msgs.len())
                .map(|i| async move {
                    match AssertUnwindSafe(self.handle(&msgs[i])).catch_unwind().await {
                        Ok(o) => o,
                        Err(_) => Outcome::retry(Duration::from_secs(5), "handler panicked"),
                    }
                })
                .buffered(concurrency.max(1))
                .collect()
                .await
        }
    }
}

/// Everything a consume loop needs besides its handler.
#[derive(Clone)]
pub struct LoopContext {
    /// JetStream context.
    pub js: jetstream::Context,
    /// Subject builder (DLQ subjects).
    pub subjects: Subjects,
    /// Loop knobs.
    pub worker: WorkerConfig,
    /// Metrics (shared registry).
    pub metrics: RuntimeMetrics,
    /// Health registry.
    pub health: Health,
    /// Cancelled on SIGTERM / SIGINT.
    pub shutdown: CancellationToken,
}

/// Which consumer a loop binds.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Stage name: metric label, DLQ subject token, span field.
    pub stage: String,
    /// Stream name (with prefix).
    pub stream: String,
    /// Durable consumer name.
    pub durable: String,
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Run the loop until shutdown. Binding failures (NATS down, consumer not yet
/// created) are retried; the readiness flag is set only while bound.
pub async fn run<H: Handler>(ctx: LoopContext, binding: Binding, handler: Arc<H>) {
    let ready = ctx
        .health
        .ready_flag(format!("consumer {}/{}", binding.stream, binding.durable));
    let beat = ctx.health.beat(format!("loop {}", binding.stage));
    let span = tracing::info_span!("consume", stage = %binding.stage, stream = %binding.stream);
    run_inner(ctx, binding, handler, ready, beat)
        .instrument(span)
        .await
}

async fn run_inner<H: Handler>(
    ctx: LoopContext,
    b: Binding,
    handler: Arc<H>,
    ready: ReadyFlag,
    beat: Beat,
) {
    let mut bind_attempt: u32 = 0;
    'bind: while !ctx.shutdown.is_cancelled() {
        beat.beat();
        let bind = async {
            let st = ctx
                .js
                .get_stream_no_info(&b.stream)
                .await
                .map_err(|e| e.to_string())?;
            st.get_consumer::<pull::Config>(&b.durable)
                .await
                .map_err(|e| e.to_string())
        };
        // Binding waits on NATS; shutdown must not wait for it.
        let consumer = tokio::select! {
            _ = ctx.shutdown.cancelled() => break 'bind,
            c = bind => c,
        };
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                bind_attempt += 1;
                let wait = Duration::from_millis((200u64 << bind_attempt.min(4)).min(3_000));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot bind consumer");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => break 'bind,
                    _ = tokio::time::sleep(wait) => continue 'bind,
                }
            }
        };
        bind_attempt = 0;
        let max_deliver = consumer.cached_info().config.max_deliver;
        ready.set(true);
        tracing::info!(durable = %b.durable, max_deliver, "consumer bound");
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        // One pull request per turn: `batch_size` messages or `pull_expires_ms`,
        // whichever first. Requests are bounded, so shutdown can finish the
        // request in hand instead of abandoning messages already on the wire.
        'pull: loop {
            if ctx.shutdown.is_cancelled() {
                break 'bind;
            }
            let mut request = match PullRequest::start(
                &consumer,
                &ctx.js,
                ctx.worker.batch_size,
                Duration::from_millis(ctx.worker.pull_expires_ms),
                Duration::from_millis(ctx.worker.heartbeat_ms),
            )
            .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "pull request failed; rebinding");
                    break 'pull;
                }
            };
            while !request.is_done() {
                let chunk = tokio::select! {
                    biased;
                    _ = ctx.shutdown.cancelled() => {
                        // Finish what is already on the wire, then stop.
                        tracing::info!("shutdown: finishing the pull request in hand");
                        if let Ok(batch) = request.drain_ready(DRAIN_IDLE, ctx.worker.batch_size).await {
                            if !batch.is_empty() {
                                process_batch(&ctx, &b, handler.as_ref(), batch, max_deliver).await;
                            }
                        }
                        break 'bind;
                    }
                    _ = tick.tick() => {
                        beat.beat();
                        if let Ok(info) = consumer.info().await {
                            let l = [b.stage.as_str(), b.durable.as_str()];
                            ctx.metrics.consumer_pending.with_label_values(&l).set(info.num_pending as i64);
                            ctx.metrics.consumer_ack_pending.with_label_values(&l).set(info.num_ack_pending as i64);
                        }
                        continue;
                    }
                    c = request.next_chunk(ctx.worker.batch_size) => c,
                };
                beat.beat();
                match chunk {
                    Ok(batch) if batch.is_empty() => {}
                    Ok(batch) => {
                        process_batch(&ctx, &b, handler.as_ref(), batch, max_deliver).await
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pull request ended; rebinding");
                        break 'pull;
                    }
                }
            }
        }
        ready.set(false);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break 'bind,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    ready.set(false);
}

/// How long a stopping loop waits for more messages of the request in hand.
const DRAIN_IDLE: Duration = Duration::from_millis(250);

async fn process_batch<H: Handler>(
    ctx: &LoopContext,
    b: &Binding,
    handler: &H,
    batch: Vec<jetstream::Message>,
    max_deliver: i64,
) {
    let m = &ctx.metrics;
    let stage = b.stage.as_str();
    let n = batch.len();
    m.received.with_label_values(&[stage]).inc_by(n as u64);
    m.in_flight.with_label_values(&[stage]).add(n as i64);
    let deliveries: Vec<Delivery> = batch
        .iter()
        .map(|msg| {
            let (deliveries, stream_seq, pending) = msg
                .info()
                .map(|i| (i.delivered.max(1) as u64, i.stream_sequence, i.pending))
                .unwrap_or((1, 0, 0));
            Delivery {
                subject: msg.subject.to_string(),
                payload: msg.payload.clone(),
                headers: msg.headers.clone().unwrap_or_default(),
                deliveries,
                stream_seq,
                pending,
            }
        })
        .collect();
    let redelivered = deliveries.iter().filter(|d| d.deliveries > 1).count();
    if redelivered > 0 {
        m.redeliveries
            .with_label_values(&[stage])
            .inc_by(redelivered as u64);
    }
    if let Some(last) = deliveries.last() {
        m.consumer_pending
            .with_label_values(&[stage, &b.durable])
            .set(last.pending as i64);
    }

    let started = Instant::now();
    let outcomes = handler
        .handle_batch(&deliveries, ctx.worker.concurrency)
        .await;
    let per_msg = started.elapsed().as_secs_f64() / n as f64;
    let hist = m.handler_seconds.with_label_values(&[stage]);
    for _ in 0..n {
        hist.observe(per_msg);
    }

    // Publish every Ok outcome's outputs in one pipelined batch.
    let mut owners = Vec::new();
    let mut outs = Vec::new();
    for (i, (o, d)) in outcomes.iter().zip(&deliveries).enumerate() {
        if let Outcome::Ok(list) = o {
            for out in list {
                let mut out = out.clone();
                for h in [headers::RECEIVED_AT, headers::SIGNAL_ID] {
                    if out.headers.get(h).is_none() {
                        if let Some(v) = d.header(h) {
                            out.headers.insert(h, v);
                        }
                    }
                }
                owners.push(i);
                outs.push(out);
            }
        }
    }
    let mut publish_failed = vec![None::<String>; n];
    if !outs.is_empty() {
        let publisher = Publisher::new(ctx.js.clone(), Some(m.clone()), stage);
        let now = now_nanos();
        let e2e = m.e2e_seconds.with_label_values(&[stage]);
        let results = publisher.publish_all(outs.clone()).await;
        for ((owner, r), out) in owners.into_iter().zip(results).zip(&outs) {
            match r {
                Err(e) => publish_failed[owner] = Some(e.to_string()),
                Ok(_) => {
                    if let Some(t) = out
                        .headers
                        .get(headers::RECEIVED_AT)
                        .and_then(|v| v.as_str().parse::<u128>().ok())
                    {
                        e2e.observe(now.saturating_sub(t) as f64 / 1e9);
                    }
                }
            }
        }
    }

    let retry_delay = Duration::from_millis(ctx.worker.publish_retry_delay_ms);
    for ((msg, d), (o, failed)) in batch
        .into_iter()
        .zip(&deliveries)
        .zip(outcomes.into_iter().zip(publish_failed))
    {
        let span = tracing::debug_span!(
            "settle",
            seq = d.stream_seq,
            signal_id = d.header(headers::SIGNAL_ID).unwrap_or("")
        );
        let _g = span.enter();
        let last_try = max_deliver > 0 && d.deliveries as i64 >= max_deliver;
        let (outcome_label, result) = match (o, failed) {
            (Outcome::Ok(_), Some(err)) => {
                if last_try {
                    dead_letter(
                        ctx,
                        b,
                        &msg,
                        d,
                        "max_deliveries",
                        &format!("publish failed: {err}"),
                    )
                    .await
                } else {
                    tracing::warn!(error = %err, "output publish failed; will retry");
                    ("retry", msg.ack_with(AckKind::Nak(Some(retry_delay))).await)
                }
            }
            (Outcome::Ok(_), None) => ("ok", msg.ack().await),
            (Outcome::Duplicate, _) => ("duplicate", msg.ack().await),
            (Outcome::Retry { after, reason }, _) => {
                if last_try {
                    dead_letter(ctx, b, &msg, d, "max_deliveries", &reason).await
                } else {
                    tracing::debug!(%reason, delay_ms = after.as_millis() as u64, "retry");
                    ("retry", msg.ack_with(AckKind::Nak(Some(after))).await)
                }
            }
            (Outcome::Reject { reason, detail }, _) => {
                dead_letter(ctx, b, &msg, d, &reason, &detail).await
            }
        };
        if let Err(e) = result {
            // The server will redeliver after ack_wait; nothing is lost.
            tracing::warn!(error = %e, "could not settle message");
        }
        m.processed.with_label_values(&[stage, outcome_label]).inc();
    }
    m.in_flight.with_label_values(&[stage]).sub(n as i64);
}

/// Publish the original message to `dlq.<stage>` and terminate it; if the DLQ
/// publish fails, NAK instead so the message is not lost.
async fn dead_letter(
    ctx: &LoopContext,
    b: &Binding,
    msg: &jetstream::Message,
    d: &Delivery,
    reason: &str,
    detail: &str,
) -> (&'static str, Result<(), async_nats::Error>) {
    let subject = match ctx.subjects.dlq(&b.stage) {
        Ok(s) => s,
        Err(e) => return ("retry", Err(e.into())),
    };
    let mut out = Outgoing::new(
        subject,
        format!("dlq:{}:{}", b.stream, d.stream_seq),
        d.payload.clone(),
    );
    for (k, vals) in d.headers.iter() {
        if k.to_string().eq_ignore_ascii_case(headers::MSG_ID) {
            continue;
        }
        for v in vals {
            out.headers.append(k.clone(), v.clone());
        }
    }
    // Header values must be one line.
    let detail_line: String = detail
        .replace(['\r', '\n'], " ")
        .chars()
        .take(2000)
        .collect();
    out.headers.insert(headers::DLQ_STAGE, b.stage.as_str());
    out.headers.insert(headers::DLQ_REASON, reason);
    out.headers
        .insert(headers::DLQ_DETAIL, detail_line.as_str());
    out.headers
        .insert(headers::ORIGINAL_SUBJECT, d.subject.as_str());
    out.headers
        .insert(headers::ORIGINAL_SEQ, d.stream_seq.to_string().as_str());
    out.headers
        .insert(headers::DELIVERIES, d.deliveries.to_string().as_str());
    let publisher = Publisher::new(ctx.js.clone(), Some(ctx.metrics.clone()), b.stage.as_str());
    match publisher.publish(out).await {
        Ok(_) => {
            tracing::warn!(reason, detail = %detail_line, seq = d.stream_seq, "dead-lettered");
            ctx.metrics.dlq.with_label_values(&[&b.stage, reason]).inc();
            ("dlq", msg.ack_with(AckKind::Term).await)
        }
        Err(e) => {
            tracing::error!(error = %e, "DLQ publish failed; will retry the message");
            let delay = Duration::from_millis(ctx.worker.publish_retry_delay_ms);
            ("retry", msg.ack_with(AckKind::Nak(Some(delay))).await)
        }
    }
}
