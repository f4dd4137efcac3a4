//! One bounded pull request with idle heartbeats.
//!
//! The client library's `batch()` stream stalls after an idle heartbeat (it
//! returns `Pending` without arranging a wake-up), so the consume loop uses
//! this small, explicit implementation of the pull protocol instead: send
//! `CONSUMER.MSG.NEXT` with `batch`, `expires` and `idle_heartbeat`, then read
//! the inbox, treating status 100 as a heartbeat, 404/408 as "request done" and
//! 409 as the server ending the request (consumer deleted, leadership change).
//!
//! Reading is cancel-safe: messages taken from the inbox are kept in the
//! request until a call returns them, so a caller that drops a
//! [`PullRequest::next_chunk_lingering`] future (a `select!` on shutdown)
//! gets them from the next call or from [`PullRequest::drain_ready`].

use async_nats::jetstream::{self, consumer::pull};
use async_nats::{StatusCode, Subscriber};
use futures::{FutureExt, StreamExt};
use std::time::Duration;

/// Why a pull request ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The request could not be sent (NATS away).
    #[error("cannot send pull request: {0}")]
    Send(String),
    /// No message and no heartbeat for two heartbeat intervals: server gone.
    #[error("missed idle heartbeats")]
    MissedHeartbeat,
    /// The server ended the request with a status (409 ...).
    #[error("server ended the pull request: {0}")]
    Terminated(String),
}

/// An in-flight pull request.
pub struct PullRequest {
    sub: Subscriber,
    remaining: usize,
    context: jetstream::Context,
    heartbeat: Duration,
    /// When the server last sent anything (message, heartbeat, status): the
    /// missed-heartbeat watchdog counts from here, however often the caller
    /// stops waiting and starts again (a metrics tick every 5 s must not
    /// keep resetting it).
    last_heard: tokio::time::Instant,
    done: bool,
    /// Messages read from the inbox and not yet returned.
    buf: Vec<jetstream::Message>,
    /// How the request ended, reported once `buf` is empty.
    error: Option<PullError>,
}

impl PullRequest {
    /// Ask the consumer for up to `batch` messages within `expires`.
    pub async fn start(
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        context: &jetstream::Context,
        batch: usize,
        expires: Duration,
        heartbeat: Duration,
    ) -> Result<PullRequest, PullError> {
        let client = context.client();
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| PullError::Send(e.to_string()))?;
        let cfg = pull::BatchConfig {
            batch,
            expires: Some(expires),
            idle_heartbeat: heartbeat,
            ..Default::default()
        };
        consumer
            .request_batch(cfg, inbox.into())
            .await
            .map_err(|e| PullError::Send(e.to_string()))?;
        Ok(PullRequest {
            sub,
            remaining: batch,
            context: context.clone(),
            heartbeat,
            last_heard: tokio::time::Instant::now(),
            done: false,
            buf: Vec::new(),
            error: None,
        })
    }

    /// Interpret one inbox message: a message goes to `buf`, a heartbeat is
    /// ignored, a final status marks the request done (and an abnormal one
    /// is kept in `error`).
    fn classify(&mut self, m: async_nats::Message) {
        self.last_heard = tokio::time::Instant::now();
        match m.status.unwrap_or(StatusCode::OK) {
            StatusCode::OK => {
                self.remaining = self.remaining.saturating_sub(1);
                if self.remaining == 0 {
                    self.done = true;
                }
                self.buf.push(jetstream::Message {
                    message: m,
                    context: self.context.clone(),
                });
            }
            StatusCode::IDLE_HEARTBEAT => {}
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND => self.done = true,
            other => {
                self.done = true;
                self.error = Some(PullError::Terminated(format!(
                    "{other} {}",
                    m.description.unwrap_or_default()
                )));
            }
        }
    }

    /// Up to `max` buffered messages, or the error the request ended with.
    fn take(&mut self, max: usize) -> Result<Vec<jetstream::Message>, PullError> {
        if self.buf.is_empty() {
            if let Some(e) = self.error.take() {
                return Err(e);
            }
        }
        let n = self.buf.len().min(max.max(1));
        Ok(self.buf.drain(..n).collect())
    }

    /// Wait for the next messages: returns the first one to arrive plus every
    /// other one already buffered (up to `max`). An empty vector means the
    /// request is complete.
    pub async fn next_chunk(&mut self, max: usize) -> Result<Vec<jetstream::Message>, PullError> {
        self.next_chunk_lingering(max, Duration::ZERO).await
    }

    /// Like [`PullRequest::next_chunk`], but after the first message keeps
    /// collecting for up to `linger` while the server reports more messages
    /// pending for the consumer (or delivers redeliveries), so a backlog is
    /// handed over in full batches instead of whatever happened to be
    /// buffered. Stops at `max` messages, at the end of the request, and as
    /// soon as the newest message says nothing else is pending: a lone new
    /// message is never delayed.
    pub async fn next_chunk_lingering(
        &mut self,
        max: usize,
        linger: Duration,
    ) -> Result<Vec<jetstream::Message>, PullError> {
        let max = max.max(1);
        while !self.done && self.buf.is_empty() {
            // Counted from the last thing heard, not from this call: a wait
            // cut short by the caller resumes the same deadline. (Anything
            // already in the inbox is read first, however late it is.)
            let deadline = self.last_heard + self.heartbeat * 2 + Duration::from_millis(100);
            match tokio::time::timeout_at(deadline, self.sub.next()).await {
                Err(_) => {
                    self.done = true;
                    return Err(PullError::MissedHeartbeat);
                }
                Ok(None) => {
                    self.done = true;
                    return Err(PullError::Terminated("subscription closed".into()));
                }
                Ok(Some(m)) => self.classify(m),
            }
        }
        let deadline = tokio::time::Instant::now() + linger;
        while !self.done && self.buf.len() < max {
            let m = match self.sub.next().now_or_never() {
                Some(Some(m)) => m,
                Some(None) => break,
                None => {
                    // Nothing buffered: wait only while more is known to come.
                    let more = self.buf.last().map(more_pending).unwrap_or(false);
                    if linger.is_zero() || !more {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, self.sub.next()).await {
                        Ok(Some(m)) => m,
                        _ => break,
                    }
                }
            };
            self.classify(m);
        }
        self.take(max)
    }

    /// Messages already delivered to the inbox, waiting at most `idle` for
    /// each next one (used when stopping, to finish what is on the wire).
    pub async fn drain_ready(
        &mut self,
        idle: Duration,
        max: usize,
    ) -> Result<Vec<jetstream::Message>, PullError> {
        while !self.done && self.buf.len() < max {
            match tokio::time::timeout(idle, self.sub.next()).await {
                Ok(Some(m)) => self.classify(m),
                _ => break,
            }
        }
        self.take(max)
    }

    /// Tell the server that every message this request has delivered and
    /// the loop has not handed out yet is still in hand (`+WPI`): read what
    /// is in the inbox, then signal each buffered message. Called while the
    /// loop is busy with other batches, so messages that arrived meanwhile
    /// are not redelivered (and handled twice, concurrently) when they
    /// outwait the ack wait.
    pub async fn touch(&mut self) {
        while !self.done {
            match self.sub.next().now_or_never() {
                Some(Some(m)) => self.classify(m),
                _ => break,
            }
        }
        for m in &self.buf {
            let _ = m.ack_with(jetstream::AckKind::Progress).await;
        }
    }

    /// True once the server completed or ended the request and every
    /// message of it was returned.
    pub fn is_done(&self) -> bool {
        self.done && self.buf.is_empty() && self.error.is_none()
    }
}

/// True when more messages are likely on their way after `m`: the server
/// said, delivering it, that more are pending for the consumer, or `m` is a
/// redelivery (redeliveries come in bursts and are not counted as pending).
/// Unknown metadata counts as "no".
fn more_pending(m: &jetstream::Message) -> bool {
    m.info()
        .map(|i| i.pending > 0 || i.delivered > 1)
        .unwrap_or(false)
}
