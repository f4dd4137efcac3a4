//! The last message of many subjects of one stream in one request: the
//! batched direct get of nats-server 2.11+ (ADR-31, `multi_last`).
//!
//! Stages that look up many KV keys per batch (execution's `fin.` records,
//! Cerebro's entry and exit records) would otherwise send one direct get per
//! key: a request, a reply and a timer each. One `multi_last` request
//! answers up to [`MAX_SUBJECTS`] subjects with one message per subject that
//! has one, then an end-of-batch status. The reads are exactly those of a
//! direct get by last subject (`kv.entry()` on a bucket that allows direct
//! gets), so a caller only uses this where it would use direct gets anyway.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use async_nats::Client;
use futures::StreamExt;
use serde::Serialize;

/// Subjects per request (the server answers at most 1,000 messages per
/// batch and accepts at most 1,024 subjects).
pub const MAX_SUBJECTS: usize = 1000;

/// Why a batched read failed. Every variant is transient from the caller's
/// point of view (retry later), except on a server older than 2.11, which
/// answers without the end-of-batch marker and so times out every time.
#[derive(Debug, thiserror::Error)]
pub enum MultiGetError {
    /// The reply subscription could not be made.
    #[error("batched direct get on {stream}: subscribe: {reason}")]
    Subscribe {
        /// Stream read.
        stream: String,
        /// Client error.
        reason: String,
    },
    /// The request could not be sent.
    #[error("batched direct get on {stream}: request: {reason}")]
    Request {
        /// Stream read.
        stream: String,
        /// Client error.
        reason: String,
    },
    /// The answer did not end within the timeout (also: a server without
    /// batched direct gets, which never sends the end marker, or a request
    /// the user's permissions refuse, whose error goes to the connection).
    #[error("batched direct get on {stream}: no end of batch within {timeout:?} ({received} messages received): the server is older than 2.11, or this user may not publish to $JS.API.DIRECT.GET.{stream}")]
    Timeout {
        /// Stream read.
        stream: String,
        /// Time allowed.
        timeout: Duration,
        /// Messages received before giving up.
        received: usize,
    },
    /// The server refused the request (e.g. 408 bad request, 413 too many
    /// subjects).
    #[error("batched direct get on {stream}: server answered {code} {description}")]
    Refused {
        /// Stream read.
        stream: String,
        /// Status code.
        code: u16,
        /// Status description.
        description: String,
    },
    /// A message of the answer lacks the stream headers.
    #[error("batched direct get on {stream}: unreadable message: {reason}")]
    Invalid {
        /// Stream read.
        stream: String,
        /// What was wrong.
        reason: String,
    },
    /// The connection closed the subscription before the end of the batch.
    #[error("batched direct get on {stream}: subscription closed")]
    Closed {
        /// Stream read.
        stream: String,
    },
}

/// True when `m` is a KV delete or purge marker (header `KV-Operation` other
/// than `PUT`), which readers treat as "no value", as `kv.entry` does.
pub fn is_kv_marker(m: &StreamMessage) -> bool {
    m.headers
        .get("KV-Operation")
        .is_some_and(|op| op.as_str() != "PUT")
}

#[derive(Serialize)]
struct Request<'a> {
    multi_last: &'a [String],
    batch: usize,
}

/// The last message of each of `subjects` in `stream` (which must allow
/// direct gets), keyed by subject; subjects without a message are absent.
/// Deleted KV keys come back as their delete marker (header `KV-Operation`),
/// as a direct get would return them. Requests of at most [`MAX_SUBJECTS`]
/// go out one after another; `timeout` applies to each.
pub async fn last_messages(
    client: &Client,
    stream: &str,
    subjects: &[String],
    timeout: Duration,
) -> Result<HashMap<String, StreamMessage>, MultiGetError> {
    let mut out = HashMap::with_capacity(subjects.len());
    for chunk in subjects.chunks(MAX_SUBJECTS) {
        one_request(client, stream, chunk, timeout, &mut out).await?;
    }
    Ok(out)
}

async fn one_request(
    client: &Client,
    stream: &str,
    subjects: &[String],
    timeout: Duration,
    out: &mut HashMap<String, StreamMessage>,
) -> Result<(), MultiGetError> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| MultiGetError::Subscribe {
            stream: stream.to_string(),
            reason: e.to_string(),
        })?;
    let body = serde_json::to_vec(&Request {
        multi_last: subjects,
        batch: subjects.len(),
    })
    .map_err(|e| MultiGetError::Request {
        stream: stream.to_string(),
        reason: e.to_string(),
    })?;
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{stream}"),
            inbox,
            bytes::Bytes::from(body),
        )
        .await
        .map_err(|e| MultiGetError::Request {
            stream: stream.to_string(),
            reason: e.to_string(),
        })?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut received = 0;
    loop {
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => {
                return Err(MultiGetError::Timeout {
                    stream: stream.to_string(),
                    timeout,
                    received,
                })
            }
            Ok(None) => {
                return Err(MultiGetError::Closed {
                    stream: stream.to_string(),
                })
            }
            Ok(Some(m)) => m,
        };
        if let Some(status) = msg.status {
            return match status.as_u16() {
                // End of batch; 404: none of the subjects has a message.
                204 | 404 => Ok(()),
                code => Err(MultiGetError::Refused {
                    stream: stream.to_string(),
                    code,
                    description: msg.description.unwrap_or_default(),
                }),
            };
        }
        received += 1;
        let m = StreamMessage::try_from(msg).map_err(|e| MultiGetError::Invalid {
            stream: stream.to_string(),
            reason: e.to_string(),
        })?;
        out.insert(m.subject.to_string(), m);
    }
}
