//! NATS header names shared by every stage.

/// JetStream de-duplication id; always the message's deterministic id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// JetStream: store the message only if the last message on its subject has
/// this stream sequence (`0`: only if the subject holds none).
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// Unix epoch nanoseconds at which the raw signal entered mtx (gateway receive
/// or first publish); carried on every downstream message for end-to-end latency.
pub const RECEIVED_AT: &str = "Mtx-Received-At";
/// The signal id a message belongs to (for tracing and ledgers).
pub const SIGNAL_ID: &str = "Mtx-Signal-Id";
/// DLQ: stage that rejected the message.
pub const DLQ_STAGE: &str = "Mtx-Dlq-Stage";
/// DLQ: machine-readable reason code (snake_case, bounded set per stage).
pub const DLQ_REASON: &str = "Mtx-Dlq-Reason";
/// DLQ: human-readable detail.
pub const DLQ_DETAIL: &str = "Mtx-Dlq-Detail";
/// DLQ: subject the original message was consumed from.
pub const ORIGINAL_SUBJECT: &str = "Mtx-Original-Subject";
/// DLQ: stream sequence of the original message.
pub const ORIGINAL_SEQ: &str = "Mtx-Original-Seq";
/// DLQ: how many times the original message had been delivered.
pub const DELIVERIES: &str = "Mtx-Deliveries";
