//! Stream reading helpers of the worker: a self-healing ordered-consumer
//! feed (marks, order events) and a last-value-per-key scan of a KV bucket.
//!
//! Every replica reads these on its own (an ordered, ephemeral, ack-less
//! consumer per replica), unlike the durable pull consumer the replicas
//! share for signals: each one needs every mark and every order event.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One ordered feed.
#[derive(Debug, Clone)]
pub(crate) struct Feed {
    /// Stream name (prefixed).
    pub stream: String,
    /// Filter subject (prefixed).
    pub filter: String,
    /// Where a fresh consumer starts.
    pub deliver: consumer::DeliverPolicy,
    /// What it is, for logs.
    pub what: &'static str,
}

/// `published` of a JetStream message as chrono time (now when unknown).
pub(crate) fn published(m: &jetstream::Message) -> DateTime<Utc> {
    m.info()
        .ok()
        .and_then(|i| {
            let nanos = i.published.unix_timestamp_nanos();
            i64::try_from(nanos).ok()
        })
        .map(DateTime::from_timestamp_nanos)
        .unwrap_or_else(Utc::now)
}

async fn open(
    js: &jetstream::Context,
    feed: &Feed,
    deliver: consumer::DeliverPolicy,
) -> Result<(consumer::pull::Ordered, u64), String> {
    let stream = js
        .get_stream(&feed.stream)
        .await
        .map_err(|e| format!("stream {}: {e}", feed.stream))?;
    let c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: feed.filter.clone(),
            deliver_policy: deliver,
            description: Some(format!("cerebro {}", feed.what)),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("{} consumer on {}: {e}", feed.what, feed.stream))?;
    let pending = c.cached_info().num_pending;
    let messages = c
        .messages()
        .await
        .map_err(|e| format!("{} messages on {}: {e}", feed.what, feed.stream))?;
    Ok((messages, pending))
}

/// Read `feed` until `shutdown`, handing every message to `on`; re-open it
/// whenever it fails, from the stream sequence after the last message
/// handed over (from `feed.deliver` if none was), so a failure never skips
/// a message. `ready` turns true once the backlog present when the consumer
/// was first created has been handed over.
pub(crate) async fn run_feed(
    js: jetstream::Context,
    feed: Feed,
    shutdown: CancellationToken,
    ready: watch::Sender<bool>,
    mut on: impl FnMut(&jetstream::Message) + Send,
) {
    let mut backoff = Duration::from_millis(250);
    let mut last: Option<u64> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let deliver = match last {
            Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: seq + 1,
            },
            None => feed.deliver,
        };
        match open(&js, &feed, deliver).await {
            Ok((mut messages, pending)) => {
                backoff = Duration::from_millis(250);
                if pending == 0 {
                    ready.send_replace(true);
                }
                let mut errors = 0;
                loop {
                    let next = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        n = messages.next() => n,
                    };
                    match next {
                        Some(Ok(m)) => {
                            errors = 0;
                            on(&m);
                            if let Ok(i) = m.info() {
                                last = Some(i.stream_sequence);
                                if i.pending == 0 {
                                    ready.send_if_modified(|r| !std::mem::replace(r, true));
                                }
                            }
                        }
                        Some(Err(e)) => {
                            errors += 1;
                            tracing::warn!(feed = feed.what, error = %e, "feed error");
                            if errors >= 3 {
                                break;
                            }
                        }
                        None => break,
                    }
                }
                tracing::warn!(feed = feed.what, "feed ended; re-opening");
            }
            Err(e) => tracing::warn!(feed = feed.what, error = %e, "feed unavailable; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The latest value of one key.
#[derive(Debug, Clone)]
pub(crate) struct Scanned {
    /// Key.
    pub key: String,
    /// Revision (stream sequence).
    pub revision: u64,
    /// When it was written.
    pub written: DateTime<Utc>,
    /// Value (empty for headers-only scans).
    pub value: bytes::Bytes,
}

/// The latest value of every live key of `store` matching `key_filter`
/// (NATS wildcards: `*` = single-token keys, `entries.>`); deleted and
/// purged keys are left out. Reads what the bucket held when the scan
/// started.
pub(crate) async fn scan_kv(
    js: &jetstream::Context,
    store: &kv::Store,
    key_filter: &str,
    headers_only: bool,
) -> Result<Vec<Scanned>, String> {
    let c = store
        .stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            description: Some("cerebro kv scan".into()),
            filter_subject: format!("{}{key_filter}", store.prefix),
            headers_only,
            deliver_policy: consumer::DeliverPolicy::LastPerSubject,
            replay_policy: consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("kv scan of {key_filter}: {e}"))?;
    let mut out = Vec::new();
    if c.cached_info().num_pending == 0 {
        return Ok(out);
    }
    let mut messages = c
        .messages()
        .await
        .map_err(|e| format!("kv scan of {key_filter}: {e}"))?;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| format!("kv scan of {key_filter} stalled"))?;
        let m = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => return Err(format!("kv scan of {key_filter}: {e}")),
            None => return Err(format!("kv scan of {key_filter} ended early")),
        };
        let info = m
            .info()
            .map_err(|e| format!("kv scan of {key_filter}: {e}"))?;
        let (revision, pending) = (info.stream_sequence, info.pending);
        let deleted = m
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        if !deleted {
            if let Some(key) = m.subject.as_str().strip_prefix(store.prefix.as_str()) {
                out.push(Scanned {
                    key: key.to_string(),
                    revision,
                    written: published(&m),
                    value: m.payload.clone(),
                });
            }
        }
        if pending == 0 {
            return Ok(out);
        }
    }
}
