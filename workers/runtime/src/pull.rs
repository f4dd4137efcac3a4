//! One bounded pull request with idle heartbeats.
//!
//! The client library's `batch()` stream stalls after an idle heartbeat (it
//! returns `Pending` without arranging a wake-up), so the consume loop uses
//! this small, explicit implementation of the pull protocol instead: send
//! `CONSUMER.MSG.NEXT` with `batch`, `expires` and `idle_heartbeat`, then read
//! the inbox, treating status 100 as a heartbeat, 404/408 as "request done" and
//! 409 as the server ending the request (consumer deleted, leadership change).

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
    done: bool,
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
            done: false,
        })
    }

    /// Interpret one inbox message: `Ok(Some(msg))`, `Ok(None)` for a
    /// heartbeat, or marks the request done.
    fn classify(
        &mut self,
        m: async_nats::Message,
    ) -> Result<Option<jetstream::Message>, PullError> {
        match m.status.unwrap_or(StatusCode::OK) {
            StatusCode::OK => {
                self.remaining = self.remaining.saturating_sub(1);
                if self.remaining == 0 {
                    self.done = true;
                }
                Ok(Some(jetstream::Message {
                    message: m,
                    context: self.context.clone(),
                }))
            }
            StatusCode::IDLE_HEARTBEAT => Ok(None),
            StatusCode::TIMEOUT | StatusCode::NOT_FOUND => {
                self.done = true;
                Ok(None)
            }
            other => {
                self.done = true;
                Err(PullError::Terminated(format!(
                    "{other} {}",
                    m.description.unwrap_or_default()
                )))
            }
        }
    }

    /// Wait for the next messages: returns the first one to arrive plus every
    /// other one already buffered (up to `max`). An empty vector means the
    /// request is complete.
    pub async fn next_chunk(&mut self, max: usize) -> Result<Vec<jetstream::Message>, PullError> {
        let mut out = Vec::new();
        while !self.done && out.is_empty() {
            let wait = self.heartbeat * 2 + Duration::from_millis(100);
            match tokio::time::timeout(wait, self.sub.next()).await {
                Err(_) => {
                    self.done = true;
                    return Err(PullError::MissedHeartbeat);
                }
                Ok(None) => {
                    self.done = true;
                    return Err(PullError::Terminated("subscription closed".into()));
                }
                Ok(Some(m)) => {
                    if let Some(msg) = self.classify(m)? {
                        out.push(msg);
                    }
                }
            }
        }
        while !self.done && out.len() < max {
            match self.sub.next().now_or_never() {
                Some(Some(m)) => {
                    if let Some(msg) = self.classify(m)? {
                        out.push(msg);
                    }
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// Messages already delivered to the inbox, without waiting (used when
    /// stopping, to finish what is on the wire).
    pub async fn drain_ready(
        &mut self,
        idle: Duration,
        max: usize,
    ) -> Result<Vec<jetstream::Message>, PullError> {
        let mut out = Vec::new();
        while !self.done && out.len() < max {
            match tokio::time::timeout(idle, self.sub.next()).await {
                Ok(Some(m)) => {
                    if let Some(msg) = self.classify(m)? {
                        out.push(msg);
                    }
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// True once the server completed or ended the request.
    pub fn is_done(&self) -> bool {
        self.done
    }
}
