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
//! A message whose handler never returns (it crashes the process) is
//! dead-lettered from the server's max-deliveries advisory instead
//! ([`crate::dlq::watch_max_deliveries`], on unless
//! `worker.dlq_on_max_deliveries_advisory` is off); messages in their last
//! `worker.isolate_last_deliveries` deliveries are handled one at a time so
//! such a message does not take its batch mates down with it. A stage's own
//! dead letters (`dlq.<stage>`, read by the sink) are never dead-lettered
//! again.
//!
//! Batching: a pull request asks for `worker.batch_size` messages; after the
//! first one arrives the loop waits up to `worker.batch_linger_ms` for more
//! while the server reports a backlog, so handlers get full batches. With
//! `worker.prefetch`, the next pull request is sent as soon as the current
//! one is complete, while its last batch is being handled.
//!
//! A handler may take longer than the ack wait: while it works on a batch
//! the loop marks the batch's messages in progress every third of the ack
//! wait, so they are not redelivered to another replica meanwhile. The same
//! goes for every message the loop holds and has not handed out yet: those
//! the open pull requests delivered while other batches were handled, and
//! those near `max_deliver` waiting for their turn to be handled alone. A
//! redelivery of a message still in hand would be handled twice, at once.
//!
//! On shutdown the loop issues no new pull request, handles every message of
//! the requests in hand (until each is complete or idle), then stops.

use crate::config::WorkerConfig;
use crate::dlq;
use crate::health::{Beat, Health, ReadyFlag};
use crate::metrics::RuntimeMetrics;
use crate::publish::{Outgoing, Publisher};
use crate::pull::PullRequest;
use async_nats::jetstream::{self, consumer::pull, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use mtx_schemas::headers;
use mtx_subjects::Subjects;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
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
    /// When JetStream stored the message (from its delivery metadata).
    pub published: Option<chrono::DateTime<chrono::Utc>>,
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

    /// How many batches the loop may hand to this handler at once (at most
    /// `worker.max_batches_in_flight`). The default, 1, hands over the next
    /// batch only when the previous one is settled. Return more when batches
    /// are independent (idempotent writes with guarded follow-ups, like the
    /// sink's): the next batch is then prepared and sent while the previous
    /// one waits on I/O.
    fn batches_in_flight(&self) -> usize {
        1
    }

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
    let watch = ctx
        .worker
        .dlq_on_max_deliveries_advisory
        .then(|| dlq::watch_max_deliveries(ctx.clone(), binding.clone()).instrument(span.clone()));
    let main = run_inner(ctx, binding, handler, ready, beat).instrument(span);
    match watch {
        Some(w) => {
            futures::join!(main, w);
        }
        None => main.await,
    }
}

/// Per-loop memory across batches (shared by the batches in flight).
struct LoopState {
    /// The consumer's `max_deliver` (≤ 0: unlimited).
    max_deliver: i64,
    /// The consumer's ack wait.
    ack_wait: Duration,
    /// How long the last batch took to handle and settle.
    last_batch: Mutex<Duration>,
    /// Stream sequences this loop recently NAKed (their redelivery is expected,
    /// not a sign of a crash).
    naked: Mutex<RecentSeqs>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bounded set of recent stream sequences (oldest forgotten first).
#[derive(Default)]
struct RecentSeqs {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentSeqs {
    const CAP: usize = 65_536;

    fn insert(&mut self, seq: u64) {
        if self.set.insert(seq) {
            self.order.push_back(seq);
            while self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }

    fn contains(&self, seq: u64) -> bool {
        self.set.contains(&seq)
    }
}

fn start_request<'a>(
    ctx: &'a LoopContext,
    consumer: &'a jetstream::consumer::Consumer<pull::Config>,
) -> impl Future<Output = Result<PullRequest, crate::pull::PullError>> + 'a {
    PullRequest::start(
        consumer,
        &ctx.js,
        ctx.worker.batch_size,
        Duration::from_millis(ctx.worker.pull_expires_ms),
        Duration::from_millis(ctx.worker.heartbeat_ms),
    )
}

/// Handle every message still coming on `request` (until it is complete or
/// idle for [`DRAIN_IDLE`]): used when stopping or abandoning a request.
async fn finish_request<H: Handler>(
    ctx: &LoopContext,
    b: &Binding,
    handler: &H,
    state: &LoopState,
    request: &mut PullRequest,
) {
    while !request.is_done() {
        match request.drain_ready(DRAIN_IDLE, ctx.worker.batch_size).await {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) => handle_chunk(ctx, b, handler, state, batch).await,
            Err(_) => break,
        }
    }
}

async fn run_inner<H: Handler>(
    ctx: LoopContext,
    b: Binding,
    handler: Arc<H>,
    ready: ReadyFlag,
    beat: Beat,
) {
    let handler = handler.as_ref();
    // Every per-stage series exists from the start at 0, so rates and
    // alerts on them read 0 (not "no data") before the first message.
    {
        let m = &ctx.metrics;
        let stage = b.stage.as_str();
        m.received.with_label_values(&[stage]);
        for outcome in ["ok", "duplicate", "retry", "dlq"] {
            m.processed.with_label_values(&[stage, &b.durable, outcome]);
        }
        m.redeliveries.with_label_values(&[stage]);
        m.in_flight.with_label_values(&[stage]);
        m.handler_seconds.with_label_values(&[stage]);
    }
    let linger = Duration::from_millis(ctx.worker.batch_linger_ms);
    let max_in_flight = handler
        .batches_in_flight()
        .clamp(1, ctx.worker.max_batches_in_flight.max(1));
    let mut state = LoopState {
        max_deliver: -1,
        ack_wait: Duration::from_secs(30),
        last_batch: Mutex::new(Duration::ZERO),
        naked: Mutex::new(RecentSeqs::default()),
    };
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
        state.max_deliver = consumer.cached_info().config.max_deliver;
        state.ack_wait = consumer.cached_info().config.ack_wait;
        let state = &state;
        ready.set(true);
        tracing::info!(durable = %b.durable, max_deliver = state.max_deliver, "consumer bound");
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let mut touch = tokio::time::interval(touch_period(state.ack_wait));
        touch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Pull requests are bounded (`batch_size` messages or `pull_expires_ms`,
        // whichever first), so shutdown can finish the requests in hand
        // instead of abandoning messages already on the wire. `next` is the
        // request sent ahead while the current one's last batch is handled;
        // `in_flight` the batches being handled (one, unless the handler
        // allows more).
        let mut next: Option<PullRequest> = None;
        let mut in_flight = FuturesUnordered::new();
        'pull: loop {
            if ctx.shutdown.is_cancelled() {
                while in_flight.next().await.is_some() {}
                if let Some(mut r) = next.take() {
                    finish_request(&ctx, &b, handler, state, &mut r).await;
                }
                break 'bind;
            }
            let mut request = match next.take() {
                Some(r) => r,
                None => match start_request(&ctx, &consumer).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "pull request failed; rebinding");
                        while in_flight.next().await.is_some() {}
                        break 'pull;
                    }
                },
            };
            while !request.is_done() {
                let chunk = tokio::select! {
                    biased;
                    _ = ctx.shutdown.cancelled() => {
                        // Finish what is already on the wire, then stop.
                        tracing::info!("shutdown: finishing the pull requests in hand");
                        while in_flight.next().await.is_some() {}
                        finish_request(&ctx, &b, handler, state, &mut request).await;
                        if let Some(mut r) = next.take() {
                            finish_request(&ctx, &b, handler, state, &mut r).await;
                        }
                        break 'bind;
                    }
                    Some(()) = in_flight.next(), if !in_flight.is_empty() => {
                        beat.beat();
                        continue;
                    }
                    _ = touch.tick() => {
                        // Batches in flight, none taken meanwhile: what
                        // arrives is kept in hand until it is.
                        request.touch().await;
                        if let Some(r) = next.as_mut() {
                            r.touch().await;
                        }
                        continue;
                    }
                    _ = tick.tick() => {
                        beat.beat();
                        if let Ok(info) = consumer.info().await {
                            let l = [b.stage.as_str(), b.durable.as_str()];
                            ctx.metrics.consumer_pending.with_label_values(&l).set(info.num_pending as i64);
                            ctx.metrics.consumer_ack_pending.with_label_values(&l).set(info.num_ack_pending as i64);
                            ctx.metrics.consumer_max_ack_pending.with_label_values(&l).set(info.config.max_ack_pending);
                        }
                        continue;
                    }
                    c = request.next_chunk_lingering(ctx.worker.batch_size, linger),
                        if in_flight.len() < max_in_flight => c,
                };
                beat.beat();
                match chunk {
                    Ok(batch) if batch.is_empty() => {}
                    Ok(batch) => {
                        // The request is complete: ask for the next one now,
                        // so it fills while this batch is handled (unless
                        // batches are slow against the ack wait: prefetched
                        // messages would wait a whole batch unacked).
                        if request.is_done()
                            && next.is_none()
                            && ctx.worker.prefetch
                            && !ctx.shutdown.is_cancelled()
                            && *lock(&state.last_batch) < state.ack_wait / 4
                        {
                            match start_request(&ctx, &consumer).await {
                                Ok(r) => next = Some(r),
                                Err(e) => tracing::debug!(error = %e, "prefetch failed"),
                            }
                        }
                        if max_in_flight == 1 || has_suspects(&ctx, state, &batch) {
                            // Handled here, with nothing else in flight (one
                            // at a time for suspects); meanwhile the messages
                            // the open requests deliver are kept in hand.
                            while in_flight.next().await.is_some() {}
                            let work = handle_chunk(&ctx, &b, handler, state, batch);
                            keeping_in_hand(state.ack_wait, &mut request, &mut next, work).await;
                        } else {
                            in_flight.push(handle_chunk(&ctx, &b, handler, state, batch));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pull request ended; rebinding");
                        while in_flight.next().await.is_some() {}
                        if let Some(mut r) = next.take() {
                            finish_request(&ctx, &b, handler, state, &mut r).await;
                        }
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

/// Handle one chunk of delivered messages. Messages in their last
/// `worker.isolate_last_deliveries` deliveries that this loop did not NAK
/// itself (so their last delivery probably ended in a crash or a timeout) are
/// handled and settled one at a time after the others, those before their
/// last try in stream order, those on their last try in reverse order: a
/// message that crashes the process then takes no batch mate with it
/// (whoever comes before it in one of the two rounds is settled).
async fn handle_chunk<H: Handler>(
    ctx: &LoopContext,
    b: &Binding,
    handler: &H,
    state: &LoopState,
    batch: Vec<jetstream::Message>,
) {
    let started = Instant::now();
    let Some(from) = isolate_from(ctx, state) else {
        process_batch(ctx, b, handler, state, batch).await;
        *lock(&state.last_batch) = started.elapsed();
        return;
    };
    let mut normal = Vec::with_capacity(batch.len());
    let mut before_last = Vec::new();
    let mut last = Vec::new();
    for msg in batch {
        if !is_suspect(state, from, &msg) {
            normal.push(msg);
        } else if msg.info().map(|i| i.delivered).unwrap_or(1) < state.max_deliver {
            before_last.push(msg);
        } else {
            last.push(msg);
        }
    }
    last.reverse();
    let mut suspects: VecDeque<_> = before_last.into_iter().chain(last).collect();
    // Those still waiting must not run out of ack wait meanwhile (they are
    // the very messages near max_deliver: a redelivery could be the last).
    if !normal.is_empty() {
        in_progress(
            suspects.make_contiguous(),
            state.ack_wait,
            process_batch(ctx, b, handler, state, normal),
        )
        .await;
    }
    if !suspects.is_empty() {
        tracing::info!(
            count = suspects.len(),
            "handling messages near max_deliver one at a time"
        );
    }
    while let Some(msg) = suspects.pop_front() {
        in_progress(
            suspects.make_contiguous(),
            state.ack_wait,
            process_batch(ctx, b, handler, state, vec![msg]),
        )
        .await;
        // Acks are buffered publishes: make sure this one reached the server
        // before the next suspect gets a chance to crash the process.
        if let Err(e) = ctx.js.client().flush().await {
            tracing::warn!(error = %e, "flush after an isolated message failed");
        }
    }
    *lock(&state.last_batch) = started.elapsed();
}

/// The first delivery count handled in isolation, if isolation applies.
fn isolate_from(ctx: &LoopContext, state: &LoopState) -> Option<i64> {
    let isolate = i64::from(ctx.worker.isolate_last_deliveries).min(state.max_deliver - 1);
    (state.max_deliver > 0 && isolate > 0).then(|| state.max_deliver - isolate + 1)
}

/// Near `max_deliver` and not NAKed by this loop.
fn is_suspect(state: &LoopState, from: i64, msg: &jetstream::Message) -> bool {
    let (delivered, seq) = msg
        .info()
        .map(|i| (i.delivered, i.stream_sequence))
        .unwrap_or((1, 0));
    delivered >= from && !lock(&state.naked).contains(seq)
}

/// True when some message of `batch` will be handled in isolation.
fn has_suspects(ctx: &LoopContext, state: &LoopState, batch: &[jetstream::Message]) -> bool {
    isolate_from(ctx, state).is_some_and(|from| batch.iter().any(|m| is_suspect(state, from, m)))
}

/// How often messages held but not yet handed out get `+WPI`.
fn touch_period(ack_wait: Duration) -> Duration {
    (ack_wait / 3).max(Duration::from_millis(100))
}

/// Run `work` (a chunk handled by the loop itself), touching the open pull
/// requests every third of the ack wait ([`PullRequest::touch`]).
async fn keeping_in_hand<T>(
    ack_wait: Duration,
    request: &mut PullRequest,
    next: &mut Option<PullRequest>,
    work: impl Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep(touch_period(ack_wait)) => {
                request.touch().await;
                if let Some(r) = next.as_mut() {
                    r.touch().await;
                }
            }
        }
    }
}

/// Run `work` on `batch`, telling the server every third of the ack wait
/// that the batch's messages are still in hand (`+WPI`): a handler slowed by
/// a busy dependency (a CPU-starved database) is never raced by redeliveries
/// of the very messages it is working on. A process that dies stops sending
/// them, so its messages still come back one ack wait later.
async fn in_progress<T>(
    batch: &[jetstream::Message],
    ack_wait: Duration,
    work: impl Future<Output = T>,
) -> T {
    let period = (ack_wait / 3).max(Duration::from_millis(100));
    let mut work = std::pin::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep(period) => {
                for m in batch {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            }
        }
    }
}

async fn process_batch<H: Handler>(
    ctx: &LoopContext,
    b: &Binding,
    handler: &H,
    state: &LoopState,
    mut batch: Vec<jetstream::Message>,
) {
    let max_deliver = state.max_deliver;
    let m = &ctx.metrics;
    let stage = b.stage.as_str();
    let n = batch.len();
    m.received.with_label_values(&[stage]).inc_by(n as u64);
    m.in_flight.with_label_values(&[stage]).add(n as i64);
    let deliveries: Vec<Delivery> = batch
        .iter_mut()
        .map(|msg| {
            let (deliveries, stream_seq, pending) = msg
                .info()
                .map(|i| (i.delivered.max(1) as u64, i.stream_sequence, i.pending))
                .unwrap_or((1, 0, 0));
            Delivery {
                subject: msg.subject.to_string(),
                payload: msg.payload.clone(),
                // Moved, not cloned (a map of owned strings per message):
                // settling the message needs only its reply subject.
                headers: msg.message.headers.take().unwrap_or_default(),
                deliveries,
                stream_seq,
                pending,
                published: msg.reply.as_deref().and_then(published_at),
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
    let mut outcomes = in_progress(
        &batch,
        state.ack_wait,
        handler.handle_batch(&deliveries, ctx.worker.concurrency),
    )
    .await;
    let per_msg = started.elapsed().as_secs_f64() / n as f64;
    let hist = m.handler_seconds.with_label_values(&[stage]);
    for _ in 0..n {
        hist.observe(per_msg);
    }

    // Publish every Ok outcome's outputs in one pipelined batch.
    let mut owners = Vec::new();
    let mut outs = Vec::new();
    for (i, (o, d)) in outcomes.iter_mut().zip(&deliveries).enumerate() {
        if let Outcome::Ok(list) = o {
            // Moved out: only the variant matters from here on.
            for mut out in std::mem::take(list) {
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
        let e2e = m.e2e_seconds.with_label_values(&[stage]);
        let received: Vec<Option<u128>> = outs
            .iter()
            .map(|o| {
                o.headers
                    .get(headers::RECEIVED_AT)
                    .and_then(|v| v.as_str().parse::<u128>().ok())
            })
            .collect();
        let results = publisher.publish_all(outs).await;
        // Latency to the output acknowledged by JetStream.
        let now = now_nanos();
        for ((owner, r), t) in owners.into_iter().zip(results).zip(received) {
            match r {
                // A first-writer-wins message whose subject already holds
                // one ([`Outgoing::only_if_new_subject`]): stored before.
                Err(e) if e.already_stored => {}
                Err(e) => publish_failed[owner] = Some(e.to_string()),
                Ok(_) => {
                    if let Some(t) = t {
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
                        dlq::MAX_DELIVERIES,
                        &format!("publish failed: {err}"),
                    )
                    .await
                } else {
                    tracing::warn!(error = %err, "output publish failed; will retry");
                    lock(&state.naked).insert(d.stream_seq);
                    ("retry", msg.ack_with(AckKind::Nak(Some(retry_delay))).await)
                }
            }
            (Outcome::Ok(_), None) => ("ok", msg.ack().await),
            (Outcome::Duplicate, _) => ("duplicate", msg.ack().await),
            (Outcome::Retry { after, reason }, _) => {
                if last_try {
                    dead_letter(ctx, b, &msg, d, dlq::MAX_DELIVERIES, &reason).await
                } else {
                    tracing::debug!(%reason, delay_ms = after.as_millis() as u64, "retry");
                    lock(&state.naked).insert(d.stream_seq);
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
        m.processed
            .with_label_values(&[stage, &b.durable, outcome_label])
            .inc();
    }
    m.in_flight.with_label_values(&[stage]).sub(n as i64);
}

/// Publish the original message to `dlq.<stage>` and terminate it; if the DLQ
/// publish fails, NAK instead so the message is not lost. One of the stage's
/// own dead letters (`dlq.<stage>`) is only terminated: it stays in the DLQ
/// stream.
async fn dead_letter(
    ctx: &LoopContext,
    b: &Binding,
    msg: &jetstream::Message,
    d: &Delivery,
    reason: &str,
    detail: &str,
) -> (&'static str, Result<(), async_nats::Error>) {
    if dlq::is_own_dead_letter(ctx, b, &d.subject) {
        tracing::error!(reason, %detail, seq = d.stream_seq, "giving up on one of this stage's own dead letters; it stays in the DLQ stream");
        ctx.metrics.dlq.with_label_values(&[&b.stage, reason]).inc();
        return ("dlq", msg.ack_with(AckKind::Term).await);
    }
    let letter = dlq::Letter {
        subject: &d.subject,
        stream_seq: d.stream_seq,
        headers: &d.headers,
        payload: d.payload.clone(),
        deliveries: d.deliveries,
        reason,
        detail,
    };
    let out = match dlq::build(ctx, b, &letter) {
        Ok(o) => o,
        Err(e) => return ("retry", Err(e.into())),
    };
    let publisher = Publisher::new(ctx.js.clone(), Some(ctx.metrics.clone()), b.stage.as_str());
    match dlq::publish_letter(&publisher, out, b, d.stream_seq).await {
        Ok(_) => {
            tracing::warn!(reason, %detail, seq = d.stream_seq, "dead-lettered");
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

/// The stream timestamp of a JetStream delivery, from its ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<nanos>.<pending>`,
/// or the 11/12-token form with domain and account hash).
pub fn published_at(reply: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    // Counted and indexed without collecting the tokens: once per message.
    let tokens = reply.split('.').count();
    if tokens < 9 || !reply.starts_with("$JS.ACK.") {
        return None;
    }
    let nanos: i64 = reply
        .split('.')
        .nth(if tokens == 9 { 7 } else { 9 })?
        .parse()
        .ok()?;
    Some(chrono::DateTime::from_timestamp_nanos(nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_at_reads_both_ack_subject_forms() {
        let v1 = "$JS.ACK.S.C.1.2.3.1790230470084404000.0";
        let v2 = "$JS.ACK.dom.acc.S.C.1.2.3.1790230470084404000.0.tok";
        let want = chrono::DateTime::from_timestamp_nanos(1_790_230_470_084_404_000);
        assert_eq!(published_at(v1), Some(want));
        assert_eq!(published_at(v2), Some(want));
        assert_eq!(published_at("_INBOX.x"), None);
    }

    #[test]
    fn recent_seqs_forget_the_oldest() {
        let mut r = RecentSeqs::default();
        for s in 0..(RecentSeqs::CAP as u64 + 10) {
            r.insert(s);
        }
        assert!(!r.contains(5));
        assert!(r.contains(RecentSeqs::CAP as u64 + 9));
        assert_eq!(r.set.len(), RecentSeqs::CAP);
    }
}
