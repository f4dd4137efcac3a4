//! Errors, classified once at the Mongo boundary.
//!
//! Every failure the sink sees is one of three things ([`Class`]):
//! - **duplicate**: the document is already there (E11000): success;
//! - **retryable**: the server or the network is away or busy: NAK with a
//!   delay, nothing acked, readiness false until Mongo answers again;
//! - **permanent**: this document can never be written as is (validator
//!   rejection, bad value): dead-letter it to `dlq.sink` with the server's error.
//!
//! Unknown server codes count as retryable: a stuck message ends in the DLQ
//! after `max_deliver` attempts, while a message wrongly judged permanent
//! would be dropped from the pipeline's view on the first try.

use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};

/// How a failure must be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Already written: treat as success.
    Duplicate,
    /// Try again later.
    Retryable,
    /// Never succeeds as is: dead-letter.
    Permanent,
}

/// Errors of the sink library.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// MongoDB failed.
    #[error("mongo: {0}")]
    Mongo(#[from] MongoError),
    /// A command returned an error document or an unexpected reply.
    #[error("mongo {op} on {target}: {detail}")]
    Command {
        /// The command.
        op: &'static str,
        /// Database / collection.
        target: String,
        /// What went wrong.
        detail: String,
    },
    /// The operation did not finish in time.
    #[error("mongo {0} timed out")]
    Timeout(String),
    /// The process could not start a consumer.
    #[error("process: {0}")]
    Process(#[from] mtx_runtime::process::ProcessError),
    /// Metrics could not be registered.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The configuration cannot be used.
    #[error("config: {0}")]
    Config(String),
    /// NATS failed (DLQ redrive, bench).
    #[error("nats: {0}")]
    Nats(String),
    /// Something the caller asked for does not exist.
    #[error("{0}")]
    NotFound(String),
}

impl SinkError {
    /// The class of this error.
    pub fn class(&self) -> Class {
        match self {
            SinkError::Mongo(e) => classify(e),
            SinkError::Command { .. } | SinkError::Timeout(_) | SinkError::Nats(_) => {
                Class::Retryable
            }
            SinkError::Process(_)
            | SinkError::Metrics(_)
            | SinkError::Config(_)
            | SinkError::NotFound(_) => Class::Permanent,
        }
    }
}

/// Duplicate-key server codes.
pub const DUPLICATE_KEY: &[i32] = &[11000, 11001, 12582];
/// `DocumentValidationFailure`.
pub const VALIDATION_FAILED: i32 = 121;

/// Server codes that mean "this write can never succeed as sent".
const PERMANENT_CODES: &[i32] = &[
    2,     // BadValue
    9,     // FailedToParse
    14,    // TypeMismatch
    52,    // DollarPrefixedFieldName
    55,    // InvalidDBRef
    56,    // EmptyFieldName
    57,    // DottedFieldName
    66,    // ImmutableField
    121,   // DocumentValidationFailure
    10334, // BSONObjectTooLarge
    17419, // document too large
    17280, // key too large
];

/// Class of one server error code (write errors and command errors).
pub fn classify_code(code: i32) -> Class {
    if DUPLICATE_KEY.contains(&code) {
        Class::Duplicate
    } else if PERMANENT_CODES.contains(&code) {
        Class::Permanent
    } else {
        Class::Retryable
    }
}

/// Class of a driver error.
pub fn classify(e: &MongoError) -> Class {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => classify_code(c.code),
        ErrorKind::Write(WriteFailure::WriteError(w)) => classify_code(w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(_)) => Class::Retryable,
        ErrorKind::InsertMany(im) => {
            // Whole-call class: the worst of its write errors (the caller
            // looks at them one by one).
            let errs = im.write_errors.as_deref().unwrap_or_default();
            if im.write_concern_error.is_some() {
                Class::Retryable
            } else if errs
                .iter()
                .all(|w| classify_code(w.code) == Class::Duplicate)
            {
                Class::Duplicate
            } else if errs
                .iter()
                .any(|w| classify_code(w.code) == Class::Retryable)
            {
                Class::Retryable
            } else {
                Class::Permanent
            }
        }
        ErrorKind::InvalidArgument { .. }
        | ErrorKind::Bson(_)
        | ErrorKind::BsonSerialization(_)
        | ErrorKind::BsonDeserialization(_) => Class::Permanent,
        // Io, ServerSelection, ConnectionPoolCleared, InvalidResponse,
        // Authentication (credentials may be rotated), Shutdown, ...
        _ => Class::Retryable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(classify_code(11000), Class::Duplicate);
        assert_eq!(classify_code(121), Class::Permanent);
        assert_eq!(classify_code(91), Class::Retryable); // ShutdownInProgress
        assert_eq!(classify_code(10107), Class::Retryable); // NotWritablePrimary
        assert_eq!(classify_code(424242), Class::Retryable);
    }
}
