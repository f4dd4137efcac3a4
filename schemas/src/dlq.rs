//! The dead-letter envelope.
//!
//! A rejected message is published to `dlq.<stage>` with its original payload
//! untouched (as the body) and the reason in headers, so ops can inspect it and
//! redrive the exact bytes. [`DeadLetter`] is the decoded view of such a message.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// One dead letter as ops see it (and as the sink stores it in `dead_letters`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Stage whose handler rejected the message (`standardizer`, `cerebro`, ...).
    pub stage: String,
    /// Reason code, e.g. `invalid_json`, `max_deliveries`.
    pub reason: String,
    /// Free-text detail (the parser error, the server error, ...).
    pub detail: String,
    /// Subject the message was consumed from.
    pub original_subject: String,
    /// Stream sequence of the original message.
    pub original_seq: u64,
    /// Deliveries attempted before the rejection.
    pub deliveries: u64,
    /// The original message body, byte for byte (lossy UTF-8 only for display).
    pub payload: String,
    /// When the message was dead-lettered.
    pub time: DateTime<Utc>,
}
