//! Messages → documents of their documented collections: one document per
//! message, except that an order-events message may carry several events of
//! one order (one document each, see [`Mapper::prepare_all`]).
//!
//! | stream | subject | collection | natural key |
//! |---|---|---|---|
//! | `SIGNALS_RAW` | `signals.raw.<env>.<source>` | `raw_signals` | `raw_signal_id` = hash(subject, exact bytes) |
//! | `SIGNALS_STANDARDIZED` | `signals.standardized.<env>.<strategy>.<signal_id>` | `standardized_signals` | `signal_id` |
//! | `CEREBRO_DECISIONS` | `cerebro.decisions.<env>.<strategy>` | `cerebro_decisions` | `decision_id` (else `signal_id`) |
//! | `ORDERS` | `orders.<account>.new` | `trading_orders` | `order_id` |
//! | `ORDERS` | `orders.<account>.cancel` | `order_cancels` | `cancel_id` = hash(subject, `Nats-Msg-Id`), else hash(subject, bytes) |
//! | `ORDER_EVENTS` | `orders.<account>.events` (one event, or an array of events of one order: one document each) | `order_events` (+ `trading_orders.status`) | (`order_id`, `seq`) |
//! | `EXECUTIONS` | `executions.<account>` | `execution_confirmations` | `execution_id` |
//! | `ACCOUNTS` | `accounts.<account>.state` | `account_state` | `snapshot_id` = hash(subject, bytes) |
//! | `AUDIT` | `audit.<stage>` | `bot_core_db.audit_logs` | `audit_id` = hash(subject, bytes) |
//! | `DLQ` | `dlq.<stage>` | `dead_letters` | `dead_letter_id` = hash(stage, original subject, seq, bytes) |
//!
//! Keys depend only on the message itself (never on a stream sequence, which
//! restarts when a stream is recreated), so redeliveries, replays and several
//! sink replicas all collapse to one document. Documents are immutable facts,
//! inserted once; the only fields that change later are the lifecycle flags
//! (`raw_signals.processed`, `standardized_signals.processed_by_cerebro`,
//! `trading_orders.status` …) which [`crate::sink`] sets with guarded updates.

use crate::convert::{self, ConvertError};
use crate::spec::{self, names, Db};
use bson::{doc, Binary, Bson, DateTime, Document};
use mtx_runtime::dlq::DLQ_TIME;
use mtx_runtime::Delivery;
use mtx_schemas::{headers, ids};
use mtx_subjects::topology::streams;
use mtx_subjects::Subjects;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Rank added to terminal order statuses: a terminal status is never replaced.
pub const TERMINAL_RANK: i64 = 1 << 40;
/// The terminal order statuses.
pub const TERMINAL_STATUSES: &[&str] = &["FILLED", "CANCELLED", "REJECTED", "EXPIRED"];

/// The seed's five `trading_orders.status` values (PENDING, SUBMITTED,
/// FILLED, REJECTED, CANCELLED) for a venue status: working states are
/// SUBMITTED, an expiry is a CANCELLED. The venue's own status goes to
/// `venue_status`, so nothing is lost.
pub fn seed_order_status(status: &str) -> &str {
    match status {
        "ACCEPTED" | "PARTIALLY_FILLED" | "CANCEL_REQUESTED" => "SUBMITTED",
        "EXPIRED" => "CANCELLED",
        other => other,
    }
}

/// Ordering of `trading_orders.status` writes: the event sequence, with
/// terminal statuses above every non-terminal one. An update applies only when
/// the stored rank is lower than `min(new rank, TERMINAL_RANK)`, so a late or
/// redelivered event (lower sequence) never moves the status backwards and a
/// terminal status (FILLED, CANCELLED, REJECTED, EXPIRED) is never replaced.
pub fn status_rank(status: &str, seq: i64) -> i64 {
    let seq = seq.clamp(0, TERMINAL_RANK - 1);
    if TERMINAL_STATUSES.contains(&status) {
        TERMINAL_RANK + seq
    } else {
        seq
    }
}

/// Which stream a sink consumer reads, and so how its messages map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `SIGNALS_RAW` → `raw_signals`.
    RawSignals,
    /// `SIGNALS_STANDARDIZED` → `standardized_signals`.
    StandardizedSignals,
    /// `CEREBRO_DECISIONS` → `cerebro_decisions`.
    Decisions,
    /// `ORDERS` → `trading_orders` / `order_cancels`.
    Orders,
    /// `ORDER_EVENTS` → `order_events` and `trading_orders.status`.
    OrderEvents,
    /// `EXECUTIONS` → `execution_confirmations`.
    Executions,
    /// `ACCOUNTS` → `account_state`.
    Accounts,
    /// `AUDIT` → `audit_logs`.
    Audit,
    /// `DLQ` → `dead_letters`.
    DeadLetters,
}

impl Kind {
    /// Every kind.
    pub const ALL: &'static [Kind] = &[
        Kind::RawSignals,
        Kind::StandardizedSignals,
        Kind::Decisions,
        Kind::Orders,
        Kind::OrderEvents,
        Kind::Executions,
        Kind::Accounts,
        Kind::Audit,
        Kind::DeadLetters,
    ];

    /// The stream (base name) this kind reads.
    pub const fn stream(self) -> &'static str {
        match self {
            Kind::RawSignals => streams::SIGNALS_RAW,
            Kind::StandardizedSignals => streams::SIGNALS_STANDARDIZED,
            Kind::Decisions => streams::CEREBRO_DECISIONS,
            Kind::Orders => streams::ORDERS,
            Kind::OrderEvents => streams::ORDER_EVENTS,
            Kind::Executions => streams::EXECUTIONS,
            Kind::Accounts => streams::ACCOUNTS,
            Kind::Audit => streams::AUDIT,
            Kind::DeadLetters => streams::DLQ,
        }
    }

    /// The kind reading stream `base`.
    pub fn for_stream(base: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.stream() == base)
    }
}

/// Follow-up work after a document is stored (or found already stored).
#[derive(Debug, Clone, PartialEq)]
pub enum Follow {
    /// Nothing.
    None,
    /// A raw signal: flip `processed` if its standardized signal exists;
    /// record the error of a dead letter (of another stage) about it.
    Raw {
        /// Its key.
        raw_signal_id: String,
        /// The signal it carries, when known.
        signal_id: Option<String>,
    },
    /// A standardized signal: flip the raw signals' `processed`; flip its own
    /// `processed_by_cerebro` if a decision exists.
    Standardized {
        /// Its id.
        signal_id: String,
    },
    /// A decision: flip the signal's `processed_by_cerebro`.
    Decision {
        /// The signal decided.
        signal_id: String,
    },
    /// An order: apply the newest status already recorded in `order_events`.
    Order {
        /// Its id.
        order_id: String,
    },
    /// An order event: apply it to `trading_orders` if it is newer.
    Event {
        /// The order.
        order_id: String,
        /// Its [`status_rank`].
        rank: i64,
        /// Fields to set on the order.
        set: Document,
    },
    /// A dead letter: record the error on the document it is about.
    DeadLetter {
        /// Where to record it.
        target: Option<ErrorTarget>,
    },
}

/// A document an error is recorded on (`error` field).
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorTarget {
    /// Collection.
    pub coll: &'static str,
    /// Key field.
    pub key_field: &'static str,
    /// Key value.
    pub key: String,
    /// `{stage, reason, detail, at, dead_letter_id}`.
    pub error: Document,
}

/// A message ready to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Database.
    pub db: Db,
    /// Collection.
    pub coll: &'static str,
    /// The document.
    pub doc: Document,
    /// Follow-up.
    pub follow: Follow,
}

/// Why a message cannot be mapped (dead-lettered to `dlq.sink`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Reason code.
    pub reason: &'static str,
    /// Detail.
    pub detail: String,
}

impl From<ConvertError> for Rejection {
    fn from(e: ConvertError) -> Self {
        Rejection {
            reason: "invalid_field",
            detail: e.to_string(),
        }
    }
}

fn reject(reason: &'static str, detail: impl Into<String>) -> Rejection {
    Rejection {
        reason,
        detail: detail.into(),
    }
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

/// A content key: `<prefix>_<hash>` of a subject (without prefix) and bytes.
pub fn content_key(prefix: &str, subject: &str, payload: &[u8]) -> String {
    ids::derive_id(prefix, &[subject, &sha256_hex(payload)])
}

/// Key of a raw signal message.
pub fn raw_signal_id(stripped_subject: &str, payload: &[u8]) -> String {
    content_key("raw", stripped_subject, payload)
}

/// Maps deliveries of one sink consumer to documents.
#[derive(Debug, Clone)]
pub struct Mapper {
    subjects: Subjects,
}

fn json(payload: &[u8]) -> Result<Value, Rejection> {
    serde_json::from_slice::<Value>(payload)
        .map_err(|e| reject("invalid_payload", format!("not JSON: {e}")))
}

fn object(payload: &[u8]) -> Result<Map<String, Value>, Rejection> {
    match json(payload)? {
        Value::Object(m) => Ok(m),
        other => Err(reject(
            "invalid_payload",
            format!("expected a JSON object, got {}", kind_of(&other)),
        )),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn key(m: &Map<String, Value>, field: &str) -> Result<String, Rejection> {
    match m.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        Some(other) => Err(reject(
            "missing_key",
            format!("`{field}` must be a non-empty string, got {other}"),
        )),
        None => Err(reject("missing_key", format!("`{field}` is missing"))),
    }
}

/// The keys of one order event: `order_id`, `status` and `seq`.
struct EventKey {
    order_id: String,
    status: String,
    seq: i64,
}

fn event_key(m: &Map<String, Value>) -> Result<EventKey, Rejection> {
    let order_id = key(m, "order_id")?;
    let status = key(m, "status")?;
    let seq = match m.get("seq") {
        Some(Value::Number(n)) => n.as_i64(),
        _ => None,
    }
    .filter(|s| *s >= 0)
    .ok_or_else(|| reject("missing_key", "`seq` must be a non-negative integer"))?;
    Ok(EventKey {
        order_id,
        status,
        seq,
    })
}

impl Mapper {
    /// A mapper for subjects under `prefix`.
    pub fn new(subjects: Subjects) -> Mapper {
        Mapper { subjects }
    }

    fn ingest(&self, d: &Delivery) -> Document {
        doc! {
            "subject": &d.subject,
            "stream_seq": d.stream_seq as i64,
            "msg_id": d.header(headers::MSG_ID).map(Bson::from).unwrap_or(Bson::Null),
        }
    }

    fn finish(
        &self,
        coll: &'static str,
        db: Db,
        m: Map<String, Value>,
        mut extra: Document,
        d: &Delivery,
        follow: Follow,
    ) -> Result<Prepared, Rejection> {
        let Some(spec) = spec::spec(coll) else {
            return Err(reject("internal", format!("no catalog entry for {coll}")));
        };
        extra.insert("ingest", self.ingest(d));
        let doc = convert::document_with(spec, &m, extra)?;
        Ok(Prepared {
            db,
            coll,
            doc,
            follow,
        })
    }

    /// Map one delivery of a `kind` consumer to its documents, in message
    /// order; never an empty list. A message maps to one document, except an
    /// order-events message carrying an array of events of one order: one
    /// `order_events` document per event, each exactly the document that
    /// event alone would give. A message is mapped whole or rejected whole:
    /// when one of its events cannot be mapped, or the events are not of one
    /// order in strictly increasing `seq`, none is.
    pub fn prepare_all(
        &self,
        kind: Kind,
        d: &Delivery,
        now: DateTime,
    ) -> Result<Vec<Prepared>, Rejection> {
        match kind {
            Kind::OrderEvents => self.events(d, now),
            _ => self.one(kind, d, now).map(|p| vec![p]),
        }
    }

    /// Map one delivery of a `kind` consumer that gives one document (every
    /// message but an order-events message with several events, which is
    /// rejected here as `invalid_payload`: use [`Mapper::prepare_all`]).
    pub fn prepare(&self, kind: Kind, d: &Delivery, now: DateTime) -> Result<Prepared, Rejection> {
        let mut all = self.prepare_all(kind, d, now)?;
        match all.len() {
            1 => Ok(all.remove(0)),
            n => Err(reject(
                "invalid_payload",
                format!("the message maps to {n} documents, not one"),
            )),
        }
    }

    /// The one document of a message (an order-events message as a single
    /// event object).
    fn one(&self, kind: Kind, d: &Delivery, now: DateTime) -> Result<Prepared, Rejection> {
        let subject = self.subjects.strip(&d.subject).to_string();
        match kind {
            Kind::RawSignals => self.raw(d, &subject, now),
            Kind::StandardizedSignals => {
                let m = object(&d.payload)?;
                let signal_id = key(&m, "signal_id")?;
                let extra = doc! {"processed_by_cerebro": false, "created_at": now};
                self.finish(
                    names::STANDARDIZED_SIGNALS,
                    Db::Trading,
                    m,
                    extra,
                    d,
                    Follow::Standardized { signal_id },
                )
            }
            Kind::Decisions => {
                let m = object(&d.payload)?;
                let signal_id = key(&m, "signal_id")?;
                let decision_id = match m.get("decision_id") {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    _ => signal_id.clone(),
                };
                let extra = doc! {"decision_id": decision_id, "created_at": now};
                self.finish(
                    names::CEREBRO_DECISIONS,
                    Db::Trading,
                    m,
                    extra,
                    d,
                    Follow::Decision { signal_id },
                )
            }
            Kind::Orders if subject.ends_with(".cancel") => {
                let m = object(&d.payload)?;
                key(&m, "order_id")?;
                // The sender's deterministic message id names the cancel
                // (Cerebro's is derived from signal and order), so the same
                // cancel decided again later, with a new timestamp, is the
                // same document; without one, the bytes name it.
                let cancel_id = match d.header(headers::MSG_ID) {
                    Some(id) => ids::derive_id("cxl", &[&subject, "msg", id]),
                    None => content_key("cxl", &subject, &d.payload),
                };
                let extra = doc! {
                    "cancel_id": cancel_id,
                    "created_at": now,
                };
                self.finish(names::ORDER_CANCELS, Db::Trading, m, extra, d, Follow::None)
            }
            Kind::Orders => {
                let m = object(&d.payload)?;
                let order_id = key(&m, "order_id")?;
                let status = key(&m, "status")?;
                let extra = doc! {
                    "venue_status": &status,
                    "status_rank": status_rank(&status, 0),
                    "status_seq": 0_i64,
                    "status_at": now,
                    "updated_at": now,
                    "created_at": now,
                };
                self.finish(
                    names::TRADING_ORDERS,
                    Db::Trading,
                    m,
                    extra,
                    d,
                    Follow::Order { order_id },
                )
            }
            Kind::OrderEvents => {
                let m = object(&d.payload)?;
                let k = event_key(&m)?;
                self.event(m, k, d, now)
            }
            Kind::Executions => {
                let m = object(&d.payload)?;
                key(&m, "execution_id")?;
                key(&m, "order_id")?;
                self.finish(
                    names::EXECUTION_CONFIRMATIONS,
                    Db::Trading,
                    m,
                    doc! {"created_at": now},
                    d,
                    Follow::None,
                )
            }
            Kind::Accounts => {
                let m = object(&d.payload)?;
                key(&m, "account")?;
                let extra = doc! {
                    "snapshot_id": content_key("acct", &subject, &d.payload),
                    "created_at": now,
                };
                self.finish(names::ACCOUNT_STATE, Db::Trading, m, extra, d, Follow::None)
            }
            Kind::Audit => self.audit(d, &subject, now),
            Kind::DeadLetters => Ok(self.dead_letter(d, &subject, now)),
        }
    }

    fn raw(&self, d: &Delivery, subject: &str, now: DateTime) -> Result<Prepared, Rejection> {
        let mut m = object(&d.payload)?;
        let raw_signal_id = raw_signal_id(subject, &d.payload);
        // The gateway and the bridge name the signal in a header; a provider
        // publishing directly does not, so derive it as they do.
        let signal_id = d
            .header(headers::SIGNAL_ID)
            .map(str::to_string)
            .or_else(|| {
                serde_json::from_slice::<mtx_schemas::signal::RawSignal>(&d.payload)
                    .ok()
                    .and_then(|r| mtx_standardizer::parse_raw_signal(&r).ok())
                    .map(|p| p.signal_id())
            });
        let source = key(&m, "source")?;
        let received = m
            .remove("received_at")
            .ok_or_else(|| reject("missing_key", "`received_at` is missing"))?;
        let timestamp = convert::parse_date(&received).ok_or_else(|| {
            reject(
                "invalid_field",
                format!("`received_at` is not an RFC 3339 date: {received}"),
            )
        })?;
        let payload = m.remove("payload").unwrap_or(Value::Null);
        let spec = spec::spec(names::RAW_SIGNALS)
            .ok_or_else(|| reject("internal", "no catalog entry for raw_signals"))?;
        let raw_data = convert::generic(&payload);
        let mut rest = convert::document(spec, &m)?;
        rest.remove("source");
        let mut doc = doc! {
            "timestamp": timestamp,
            "source": source,
            "raw_data": raw_data,
            "processed": false,
            "created_at": now,
            "raw_signal_id": &raw_signal_id,
            "signal_id": signal_id.clone().map(Bson::from).unwrap_or(Bson::Null),
        };
        doc.extend(rest);
        doc.insert("ingest", self.ingest(d));
        Ok(Prepared {
            db: Db::Trading,
            coll: names::RAW_SIGNALS,
            doc,
            follow: Follow::Raw {
                raw_signal_id,
                signal_id,
            },
        })
    }

    /// An order-events message: one `order_events` document per event.
    ///
    /// The message is one [`OrderEvent`](mtx_schemas::order::OrderEvent)
    /// object (as every message was before the execution stage sent the
    /// events of one step together), or a non-empty array of them, all of
    /// one order (same `order_id` and `account`) in strictly increasing
    /// `seq` (message id `<order_id>.<first seq>-<last seq>`). Each event
    /// becomes exactly the document the same event alone would (the
    /// message's `ingest`, key (`order_id`, `seq`)), with its
    /// `trading_orders.status` follow-up. Anything else rejects the whole
    /// message (`invalid_payload`, or the first failing event's reason, its
    /// detail prefixed `events[i] of n`).
    fn events(&self, d: &Delivery, now: DateTime) -> Result<Vec<Prepared>, Rejection> {
        let list = match json(&d.payload)? {
            Value::Object(m) => {
                let k = event_key(&m)?;
                return Ok(vec![self.event(m, k, d, now)?]);
            }
            Value::Array(list) if !list.is_empty() => list,
            Value::Array(_) => {
                return Err(reject(
                    "invalid_payload",
                    "an empty array: an order-events message carries at least one event",
                ))
            }
            other => {
                let got = kind_of(&other);
                let detail =
                    format!("expected an order event or a non-empty array of them, got {got}");
                return Err(reject("invalid_payload", detail));
            }
        };
        let n = list.len();
        let mut out = Vec::with_capacity(n);
        // The first event's order and account, and the previous event's seq.
        let mut first: Option<(String, Option<Value>)> = None;
        let mut prev_seq: Option<i64> = None;
        for (i, v) in list.into_iter().enumerate() {
            let at = |r: Rejection| Rejection {
                reason: r.reason,
                detail: format!("events[{i}] of {n}: {}", r.detail),
            };
            let Value::Object(m) = v else {
                return Err(at(reject(
                    "invalid_payload",
                    format!("expected a JSON object, got {}", kind_of(&v)),
                )));
            };
            let k = event_key(&m).map_err(at)?;
            let account = m.get("account").cloned();
            match &first {
                None => first = Some((k.order_id.clone(), account)),
                Some((order_id, acct)) if *order_id != k.order_id || *acct != account => {
                    let show = |a: &Option<Value>| {
                        a.as_ref()
                            .map_or_else(|| "none".to_string(), Value::to_string)
                    };
                    return Err(at(reject(
                        "invalid_payload",
                        format!(
                            "events of two orders in one message: order {} account {} after order {order_id} account {}",
                            k.order_id,
                            show(&account),
                            show(acct),
                        ),
                    )));
                }
                Some(_) => {}
            }
            if let Some(prev) = prev_seq.filter(|p| k.seq <= *p) {
                return Err(at(reject(
                    "invalid_payload",
                    format!(
                        "seq {} follows seq {prev}: the events of a message are in strictly increasing seq",
                        k.seq
                    ),
                )));
            }
            prev_seq = Some(k.seq);
            out.push(self.event(m, k, d, now).map_err(at)?);
        }
        Ok(out)
    }

    /// One order event object (keys checked): its `order_events` document.
    fn event(
        &self,
        m: Map<String, Value>,
        k: EventKey,
        d: &Delivery,
        now: DateTime,
    ) -> Result<Prepared, Rejection> {
        let EventKey {
            order_id,
            status,
            seq,
        } = k;
        let prepared = self.finish(
            names::ORDER_EVENTS,
            Db::Trading,
            m,
            doc! {"created_at": now},
            d,
            Follow::None,
        )?;
        let (rank, set) = event_update(&prepared.doc, &status, seq, now);
        Ok(Prepared {
            follow: Follow::Event {
                order_id,
                rank,
                set,
            },
            ..prepared
        })
    }

    fn audit(&self, d: &Delivery, subject: &str, now: DateTime) -> Result<Prepared, Rejection> {
        let stage = self
            .subjects
            .token(&d.subject, 1)
            .and_then(Result::ok)
            .unwrap_or_else(|| "unknown".into());
        let body: Value = serde_json::from_slice(&d.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&d.payload).into_owned()));
        let obj = body.as_object().cloned().unwrap_or_default();
        let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_string);
        let action = text("action").unwrap_or_else(|| format!("{}_EVENT", stage.to_uppercase()));
        let status = text("status")
            .map(|s| s.to_uppercase())
            .filter(|s| ["SUCCESS", "FAILURE", "ERROR"].contains(&s.as_str()))
            .unwrap_or_else(|| "SUCCESS".into());
        let resource_id = ["resource_id", "signal_id", "order_id", "execution_id", "id"]
            .iter()
            .find_map(|k| text(k))
            .or_else(|| d.header(headers::SIGNAL_ID).map(str::to_string));
        let timestamp = obj
            .get("timestamp")
            .and_then(convert::parse_date)
            .unwrap_or(now);
        let metadata = match &body {
            Value::Object(_) => convert::generic(&body),
            other => Bson::Document(doc! {"body": convert::generic(other)}),
        };
        let opt = |v: Option<String>| v.map(Bson::from).unwrap_or(Bson::Null);
        let doc = doc! {
            "user_id": Bson::Null,
            "action": action,
            "resource": text("resource").unwrap_or(stage),
            "resource_id": opt(resource_id),
            "method": Bson::Null,
            "endpoint": Bson::Null,
            "ip_address": text("ip_address").unwrap_or_else(|| "internal".into()),
            "user_agent": "mtx",
            "status": status,
            "error_message": opt(text("error_message").or_else(|| text("error"))),
            "metadata": metadata,
            "timestamp": timestamp,
            "created_at": now,
            "audit_id": content_key("aud", subject, &d.payload),
            "ingest": self.ingest(d),
        };
        Ok(Prepared {
            db: Db::BotCore,
            coll: names::AUDIT_LOGS,
            doc,
            follow: Follow::None,
        })
    }

    /// Dead letters are never rejected: whatever arrives on `dlq.>` is stored.
    /// `time` is when the runtime dead-lettered the message (`Mtx-Dlq-Time`),
    /// else when the DLQ stream stored it, else now.
    fn dead_letter(&self, d: &Delivery, subject: &str, now: DateTime) -> Prepared {
        let h = |k: &str| d.header(k).map(str::to_string);
        let time = dead_letter_time(d).unwrap_or(now);
        let stage = h(headers::DLQ_STAGE)
            .or_else(|| self.subjects.token(&d.subject, 1).and_then(Result::ok))
            .unwrap_or_else(|| "unknown".into());
        let reason = h(headers::DLQ_REASON).unwrap_or_else(|| "unknown".into());
        let detail = h(headers::DLQ_DETAIL).unwrap_or_default();
        let original_subject = h(headers::ORIGINAL_SUBJECT);
        let original_seq = h(headers::ORIGINAL_SEQ).and_then(|s| s.parse::<i64>().ok());
        let deliveries = h(headers::DELIVERIES).and_then(|s| s.parse::<i64>().ok());
        let orig_stripped = original_subject
            .as_deref()
            .map(|s| self.subjects.strip(s).to_string());
        let dead_letter_id = match (&orig_stripped, original_seq) {
            (Some(os), Some(seq)) => ids::derive_id(
                "dlq",
                &[&stage, os, &seq.to_string(), &sha256_hex(&d.payload)],
            ),
            _ => content_key("dlq", subject, &d.payload),
        };
        let (payload, encoding) = match std::str::from_utf8(&d.payload) {
            Ok(s) => (Bson::String(s.to_string()), "utf8"),
            Err(_) => (
                Bson::Binary(Binary {
                    subtype: bson::spec::BinarySubtype::Generic,
                    bytes: d.payload.to_vec(),
                }),
                "binary",
            ),
        };
        let skip = [
            headers::DLQ_STAGE,
            headers::DLQ_REASON,
            headers::DLQ_DETAIL,
            headers::ORIGINAL_SUBJECT,
            headers::ORIGINAL_SEQ,
            headers::DELIVERIES,
            headers::MSG_ID,
            DLQ_TIME,
        ];
        let mut hdrs = Document::new();
        for (name, values) in d.headers.iter() {
            let n = name.to_string();
            if skip.iter().any(|s| s.eq_ignore_ascii_case(&n)) {
                continue;
            }
            if let Some(v) = values.first() {
                hdrs.insert(n, v.as_str());
            }
        }
        let signal_id = h(headers::SIGNAL_ID).or_else(|| {
            serde_json::from_slice::<Value>(&d.payload)
                .ok()
                .and_then(|v| {
                    v.get("signal_id")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
        });
        let raw_id = orig_stripped
            .as_deref()
            .filter(|s| s.starts_with("signals.raw."))
            .map(|s| raw_signal_id(s, &d.payload));
        let original_stream = orig_stripped.as_deref().and_then(stream_of);
        let error = doc! {
            "stage": &stage,
            "reason": &reason,
            "detail": &detail,
            "at": time,
            "dead_letter_id": &dead_letter_id,
        };
        let target = match (orig_stripped.as_deref(), stage.as_str()) {
            (_, "sink") => None,
            (Some(s), _) if s.starts_with("signals.raw.") => raw_id.clone().map(|k| ErrorTarget {
                coll: names::RAW_SIGNALS,
                key_field: "raw_signal_id",
                key: k,
                error: error.clone(),
            }),
            _ => None,
        };
        let opt = |v: Option<String>| v.map(Bson::from).unwrap_or(Bson::Null);
        let doc = doc! {
            "dead_letter_id": dead_letter_id,
            "stage": stage,
            "reason": reason,
            "detail": detail,
            "payload": payload,
            "payload_encoding": encoding,
            "time": time,
            "original_subject": opt(original_subject),
            "original_stream": opt(original_stream.map(str::to_string)),
            "original_seq": original_seq.map(Bson::Int64).unwrap_or(Bson::Null),
            "deliveries": deliveries.map(Bson::Int64).unwrap_or(Bson::Null),
            "headers": hdrs,
            "signal_id": opt(signal_id),
            "raw_signal_id": opt(raw_id),
            "dlq_subject": &d.subject,
            "created_at": now,
            "redrives": [],
            "ingest": self.ingest(d),
        };
        Prepared {
            db: Db::Trading,
            coll: names::DEAD_LETTERS,
            doc,
            follow: Follow::DeadLetter { target },
        }
    }
}

/// When a dead letter was dead-lettered: the runtime's `Mtx-Dlq-Time`
/// header, else the DLQ stream's timestamp of the message.
fn dead_letter_time(d: &Delivery) -> Option<DateTime> {
    d.header(DLQ_TIME)
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t.trim()).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .or(d.published)
        .map(DateTime::from_chrono)
}

/// The `trading_orders` fields an order event (as stored in `order_events`)
/// sets, and its rank.
pub fn event_update(event: &Document, status: &str, seq: i64, now: DateTime) -> (i64, Document) {
    let pick = |k: &str| event.get(k).cloned().unwrap_or(Bson::Null);
    let rank = status_rank(status, seq);
    let set = doc! {
        "status": seed_order_status(status),
        "venue_status": status,
        "status_rank": rank,
        "status_seq": seq,
        "status_reason": pick("reason"),
        "status_at": pick("timestamp"),
        "filled_quantity": pick("filled_quantity"),
        "avg_fill_price": pick("avg_fill_price"),
        "updated_at": now,
    };
    (rank, set)
}

/// The update that moves `trading_orders.status` forward to an event of
/// `rank`, and only forward (see [`status_rank`]).
pub fn status_filter(order_id: &str, rank: i64) -> Document {
    doc! {"order_id": order_id, "status_rank": {"$lt": rank.min(TERMINAL_RANK)}}
}

/// The stream (base name) a subject without prefix belongs to.
pub fn stream_of(subject: &str) -> Option<&'static str> {
    let t: Vec<&str> = subject.split('.').collect();
    Some(match t.as_slice() {
        ["signals", "raw", ..] => streams::SIGNALS_RAW,
        ["signals", "standardized", ..] => streams::SIGNALS_STANDARDIZED,
        ["cerebro", "decisions", ..] => streams::CEREBRO_DECISIONS,
        ["orders", _, "new" | "cancel"] => streams::ORDERS,
        ["orders", _, "events"] => streams::ORDER_EVENTS,
        ["executions", ..] => streams::EXECUTIONS,
        ["accounts", ..] => streams::ACCOUNTS,
        ["market", ..] => streams::MARKET,
        ["audit", ..] => streams::AUDIT,
        ["dlq", ..] => streams::DLQ,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::int_of;

    #[test]
    fn ranks() {
        assert!(status_rank("FILLED", 2) > status_rank("PARTIALLY_FILLED", 7));
        assert!(status_rank("SUBMITTED", 2) > status_rank("PENDING", 0));
        assert_eq!(status_rank("PENDING", 0), 0);
        assert_eq!(status_rank("REJECTED", 0), TERMINAL_RANK);
    }

    fn delivery(subject: &str, payload: &str, headers: &[(&str, &str)]) -> Delivery {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        Delivery {
            subject: subject.into(),
            payload: payload.as_bytes().to_vec().into(),
            headers: h,
            deliveries: 1,
            stream_seq: 7,
            pending: 0,
            published: None,
        }
    }

    #[test]
    fn a_cancel_is_named_by_its_message_id_when_it_has_one() {
        let m = Mapper::new(Subjects::new(""));
        let cancel = |ts: &str, id: Option<&str>| {
            let body = serde_json::json!({"order_id": "ord_1", "account": "A",
                "reason": "exit (signal sig_2)", "timestamp": ts});
            let headers: Vec<(&str, &str)> = id.map(|i| (headers::MSG_ID, i)).into_iter().collect();
            m.prepare(
                Kind::Orders,
                &delivery("orders.A.cancel", &body.to_string(), &headers),
                DateTime::now(),
            )
            .unwrap()
            .doc
            .get_str("cancel_id")
            .unwrap()
            .to_string()
        };
        // Decided again after the duplicate window: a new timestamp, the
        // same message id, the same document.
        let id = Some("cxl_sig_2_ord_1");
        assert_eq!(
            cancel("2025-11-20T10:00:00Z", id),
            cancel("2025-11-20T10:05:00Z", id)
        );
        assert_ne!(
            cancel("2025-11-20T10:00:00Z", id),
            cancel("2025-11-20T10:00:00Z", Some("cxl_sig_3_ord_1"))
        );
        // Without one, the bytes name it.
        assert_ne!(
            cancel("2025-11-20T10:00:00Z", None),
            cancel("2025-11-20T10:05:00Z", None)
        );
    }

    #[test]
    fn cerebros_nested_numbers_are_typed_not_strings() {
        let m = Mapper::new(Subjects::new(""));
        let now = DateTime::now();
        let order = serde_json::json!({"order_id": "ord_1", "signal_id": "sig_1", "strategy_id": "S",
            "account": "A", "timestamp": "2025-11-20T10:00:00Z", "instrument": "GC",
            "instrument_type": "FUTURE", "direction": "LONG", "action": "EXIT", "side": "SELL",
            "order_type": "MARKET", "price": "4029.00", "quantity": "5", "status": "PENDING",
            "leg": 0, "multiplier": "100",
            "cerebro_decision": {"allocated_capital": "0", "margin_required": "0",
                "position_size_logic": "exit", "risk_metrics": {"margin_released": "82500.00",
                "closable": "5", "contract_expiry": "2025-12-29T00:00:00Z", "leverage_after": "0.5"}}});
        let p = m
            .prepare(
                Kind::Orders,
                &delivery("orders.A.new", &order.to_string(), &[]),
                now,
            )
            .unwrap();
        let rm = p
            .doc
            .get_document("cerebro_decision")
            .unwrap()
            .get_document("risk_metrics")
            .unwrap();
        assert!(
            matches!(rm.get("contract_expiry"), Some(Bson::DateTime(_))),
            "{rm}"
        );
        assert!(
            matches!(rm.get("margin_released"), Some(Bson::Decimal128(_))),
            "{rm}"
        );
        assert!(
            matches!(rm.get("leverage_after"), Some(Bson::Double(_))),
            "{rm}"
        );

        let decision = serde_json::json!({"decision_id": "dec_1", "signal_id": "sig_1", "strategy_id": "S",
            "decision": "REJECTED", "timestamp": "2025-11-20T10:00:00Z", "reason": "capital",
            "reason_code": "strategy_capital", "original_quantity": "10", "final_quantity": "0",
            "reason_detail": {"code": "strategy_capital", "required": "5000.00",
                "available": "1200.50", "allocation_pct": "12.5"},
            "risk_assessment": {"slippage": {"evaluated": true, "delay_secs": "1.5",
                "horizon_secs": 3600, "alpha_lost_to_delay": "0.0001", "price_drift": "0.002",
                "alpha_lost": "0.0021", "limit": null, "fraction": "0.1", "legs_with_mark": 1}}});
        let p = m
            .prepare(
                Kind::Decisions,
                &delivery("cerebro.decisions.staging.S", &decision.to_string(), &[]),
                now,
            )
            .unwrap();
        let rd = p.doc.get_document("reason_detail").unwrap();
        assert!(
            matches!(rd.get("available"), Some(Bson::Decimal128(_))),
            "{rd}"
        );
        assert!(
            matches!(rd.get("allocation_pct"), Some(Bson::Double(_))),
            "{rd}"
        );
        let slip = p
            .doc
            .get_document("risk_assessment")
            .unwrap()
            .get_document("slippage")
            .unwrap();
        assert!(
            matches!(slip.get("alpha_lost"), Some(Bson::Double(_))),
            "{slip}"
        );
    }

    #[test]
    fn keys_depend_on_the_message_only() {
        let m = Mapper::new(Subjects::new("t1"));
        let raw = r#"{"source":"tv","environment":"staging","received_at":"2025-11-20T10:00:00Z","format":"TRADINGVIEW","payload":{"a":1}}"#;
        let now = DateTime::now();
        let a = m
            .prepare(
                Kind::RawSignals,
                &delivery("t1.signals.raw.staging.tv", raw, &[]),
                now,
            )
            .unwrap();
        let mut d = delivery("t1.signals.raw.staging.tv", raw, &[]);
        d.stream_seq = 99;
        d.deliveries = 3;
        let b = m.prepare(Kind::RawSignals, &d, now).unwrap();
        assert_eq!(a.doc.get("raw_signal_id"), b.doc.get("raw_signal_id"));
        // The prefix is not part of the key.
        let other = Mapper::new(Subjects::new(""));
        let c = other
            .prepare(
                Kind::RawSignals,
                &delivery("signals.raw.staging.tv", raw, &[]),
                now,
            )
            .unwrap();
        assert_eq!(a.doc.get("raw_signal_id"), c.doc.get("raw_signal_id"));
        let changed = raw.replace("\"a\":1", "\"a\":2");
        let e = m
            .prepare(
                Kind::RawSignals,
                &delivery("t1.signals.raw.staging.tv", &changed, &[]),
                now,
            )
            .unwrap();
        assert_ne!(a.doc.get("raw_signal_id"), e.doc.get("raw_signal_id"));
        assert_eq!(a.coll, names::RAW_SIGNALS);
    }

    #[test]
    fn bad_messages_are_rejected_dead_letters_never() {
        let m = Mapper::new(Subjects::new(""));
        let now = DateTime::now();
        let e = m
            .prepare(
                Kind::Executions,
                &delivery("executions.A", "{oops", &[]),
                now,
            )
            .unwrap_err();
        assert_eq!(e.reason, "invalid_payload");
        let e = m
            .prepare(
                Kind::Executions,
                &delivery("executions.A", r#"{"order_id":"o"}"#, &[]),
                now,
            )
            .unwrap_err();
        assert_eq!(e.reason, "missing_key");
        let e = m
            .prepare(
                Kind::Executions,
                &delivery(
                    "executions.A",
                    r#"{"order_id":"o","execution_id":"x","price":"abc"}"#,
                    &[],
                ),
                now,
            )
            .unwrap_err();
        assert_eq!(e.reason, "invalid_field");
        let dl = m
            .prepare(
                Kind::DeadLetters,
                &delivery(
                    "dlq.standardizer",
                    "\u{0}not json",
                    &[
                        (headers::DLQ_STAGE, "standardizer"),
                        (headers::DLQ_REASON, "invalid_json"),
                        (headers::ORIGINAL_SUBJECT, "signals.raw.staging.tv"),
                        (headers::ORIGINAL_SEQ, "12"),
                    ],
                ),
                now,
            )
            .unwrap();
        assert_eq!(dl.doc.get_str("reason").unwrap(), "invalid_json");
        assert_eq!(dl.doc.get_i64("original_seq").unwrap(), 12);
        assert_eq!(
            dl.doc.get_str("original_stream").unwrap(),
            streams::SIGNALS_RAW
        );
        assert!(
            matches!(dl.follow, Follow::DeadLetter { target: Some(ref t) } if t.coll == names::RAW_SIGNALS)
        );
    }

    #[test]
    fn dead_letter_time_is_when_the_runtime_dead_lettered_it() {
        let m = Mapper::new(Subjects::new(""));
        let now = DateTime::now();
        let base = [
            (headers::DLQ_STAGE, "standardizer"),
            (headers::DLQ_REASON, "invalid_json"),
            (headers::ORIGINAL_SUBJECT, "signals.raw.staging.tv"),
            (headers::ORIGINAL_SEQ, "12"),
        ];
        let time_of = |d: &Delivery| {
            let p = m.prepare(Kind::DeadLetters, d, now).unwrap();
            let Follow::DeadLetter { target: Some(t) } = &p.follow else {
                panic!("no error target")
            };
            assert_eq!(
                t.error.get_datetime("at").unwrap(),
                p.doc.get_datetime("time").unwrap(),
                "raw_signals.error.at is the dead letter's time"
            );
            assert!(p
                .doc
                .get_document("headers")
                .unwrap()
                .get(DLQ_TIME)
                .is_none());
            *p.doc.get_datetime("time").unwrap()
        };
        // The runtime's header wins over the stream timestamp.
        let mut hs = base.to_vec();
        hs.push((DLQ_TIME, "2025-11-20T10:00:01.500Z"));
        let mut d = delivery("dlq.standardizer", "{}", &hs);
        d.published = chrono::DateTime::from_timestamp(1_800_000_000, 0);
        assert_eq!(time_of(&d).timestamp_millis(), 1_763_632_801_500);
        // No header: the DLQ stream's timestamp.
        let mut d = delivery("dlq.standardizer", "{}", &base);
        d.published = chrono::DateTime::from_timestamp(1_800_000_000, 0);
        assert_eq!(
            time_of(&d).timestamp_millis(),
            1_800_000_000_000,
            "falls back to the JetStream timestamp"
        );
        // Unreadable header, no timestamp: now.
        let mut hs = base.to_vec();
        hs.push((DLQ_TIME, "yesterday"));
        assert_eq!(time_of(&delivery("dlq.standardizer", "{}", &hs)), now);
    }

    fn event_json(order_id: &str, account: &str, seq: i64, status: &str) -> Value {
        serde_json::json!({
            "order_id": order_id,
            "account": account,
            "status": status,
            "previous_status": null,
            "filled_quantity": if status == "FILLED" { "12" } else { "0" },
            "avg_fill_price": if status == "FILLED" { Value::from("150.20") } else { Value::Null },
            "reason": null,
            "timestamp": format!("2025-11-20T10:00:0{seq}Z"),
            "seq": seq
        })
    }

    fn events_delivery(body: &Value) -> Delivery {
        delivery(
            "orders.IBKR_Main.events",
            &body.to_string(),
            &[(headers::MSG_ID, "ord_1.1-3")],
        )
    }

    #[test]
    fn an_array_of_events_maps_to_one_document_each() {
        let m = Mapper::new(Subjects::new(""));
        let now = DateTime::now();
        let events = [
            event_json("ord_1", "IBKR_Main", 1, "SUBMITTED"),
            event_json("ord_1", "IBKR_Main", 2, "ACCEPTED"),
            event_json("ord_1", "IBKR_Main", 3, "FILLED"),
        ];
        let d = events_delivery(&Value::Array(events.to_vec()));
        let all = m.prepare_all(Kind::OrderEvents, &d, now).unwrap();
        assert_eq!(all.len(), 3);
        for ((p, ev), (seq, status)) in
            all.iter()
                .zip(&events)
                .zip([(1, "SUBMITTED"), (2, "ACCEPTED"), (3, "FILLED")])
        {
            assert_eq!(p.coll, names::ORDER_EVENTS);
            assert_eq!(p.db, Db::Trading);
            assert_eq!(p.doc.get_str("order_id").unwrap(), "ord_1");
            assert_eq!(int_of(p.doc.get("seq")), Some(seq));
            assert_eq!(p.doc.get_str("status").unwrap(), status);
            let ingest = p.doc.get_document("ingest").unwrap();
            assert_eq!(ingest.get_str("msg_id").unwrap(), "ord_1.1-3");
            assert_eq!(ingest.get_i64("stream_seq").unwrap(), 7);
            let Follow::Event {
                order_id,
                rank,
                set,
            } = &p.follow
            else {
                panic!("not an event follow-up: {:?}", p.follow)
            };
            assert_eq!(order_id, "ord_1");
            assert_eq!(*rank, status_rank(status, seq));
            assert_eq!(set.get_str("status").unwrap(), seed_order_status(status));
            assert_eq!(set.get_str("venue_status").unwrap(), status);
            // Exactly what the same event alone gives (same message headers
            // and stream position).
            let mut alone = d.clone();
            alone.payload = ev.to_string().into_bytes().into();
            let single = m.prepare(Kind::OrderEvents, &alone, now).unwrap();
            assert_eq!(&single, p);
            let single_all = m.prepare_all(Kind::OrderEvents, &alone, now).unwrap();
            assert_eq!(single_all, vec![single]);
        }
        assert!(matches!(all[2].follow, Follow::Event { rank, .. } if rank >= TERMINAL_RANK));
        // `prepare` takes one-document messages only; an array of one is one.
        let e = m.prepare(Kind::OrderEvents, &d, now).unwrap_err();
        assert_eq!(e.reason, "invalid_payload");
        let one = events_delivery(&Value::Array(vec![events[1].clone()]));
        let p = m.prepare(Kind::OrderEvents, &one, now).unwrap();
        assert_eq!(int_of(p.doc.get("seq")), Some(2));
        // Other kinds: one document, the same as `prepare`.
        let exe = delivery(
            "executions.A",
            r#"{"order_id":"o","execution_id":"x","price":"1.5"}"#,
            &[],
        );
        assert_eq!(
            m.prepare_all(Kind::Executions, &exe, now).unwrap(),
            vec![m.prepare(Kind::Executions, &exe, now).unwrap()]
        );
    }

    #[test]
    fn a_bad_array_of_events_is_rejected_whole() {
        let m = Mapper::new(Subjects::new(""));
        let now = DateTime::now();
        let ev = |o: &str, a: &str, seq: i64| event_json(o, a, seq, "SUBMITTED");
        let mut no_seq = ev("ord_1", "A", 2);
        no_seq.as_object_mut().unwrap().remove("seq");
        let mut bad_price = ev("ord_1", "A", 2);
        bad_price["avg_fill_price"] = Value::from("abc");
        let cases: Vec<(&str, Value, &str, &str)> = vec![
            ("empty", serde_json::json!([]), "invalid_payload", "empty"),
            (
                "a non-object",
                serde_json::json!([ev("ord_1", "A", 1), 5]),
                "invalid_payload",
                "events[1] of 2: expected a JSON object, got a number",
            ),
            (
                "mixed order ids",
                serde_json::json!([ev("ord_1", "A", 1), ev("ord_2", "A", 2)]),
                "invalid_payload",
                "two orders",
            ),
            (
                "mixed accounts",
                serde_json::json!([ev("ord_1", "A", 1), ev("ord_1", "B", 2)]),
                "invalid_payload",
                "two orders",
            ),
            (
                "a repeated seq",
                serde_json::json!([ev("ord_1", "A", 1), ev("ord_1", "A", 1)]),
                "invalid_payload",
                "seq 1 follows seq 1",
            ),
            (
                "a decreasing seq",
                serde_json::json!([
                    ev("ord_1", "A", 2),
                    ev("ord_1", "A", 3),
                    ev("ord_1", "A", 1)
                ]),
                "invalid_payload",
                "events[2] of 3: seq 1 follows seq 3",
            ),
            (
                "an event without seq",
                serde_json::json!([ev("ord_1", "A", 1), no_seq]),
                "missing_key",
                "events[1] of 2: `seq`",
            ),
            (
                "an event without order_id",
                serde_json::json!([{"status": "SUBMITTED", "seq": 1}]),
                "missing_key",
                "`order_id`",
            ),
            (
                "an unconvertible field",
                serde_json::json!([ev("ord_1", "A", 1), bad_price]),
                "invalid_field",
                "events[1] of 2",
            ),
            (
                "a scalar",
                serde_json::json!("SUBMITTED"),
                "invalid_payload",
                "got a string",
            ),
        ];
        for (what, body, reason, detail) in cases {
            let e = m
                .prepare_all(Kind::OrderEvents, &events_delivery(&body), now)
                .expect_err(what);
            assert_eq!(e.reason, reason, "{what}: {}", e.detail);
            assert!(e.detail.contains(detail), "{what}: {}", e.detail);
        }
        let e = m
            .prepare_all(
                Kind::OrderEvents,
                &delivery("orders.A.events", "[{", &[]),
                now,
            )
            .unwrap_err();
        assert_eq!(e.reason, "invalid_payload");
    }

    #[test]
    fn streams_of_subjects() {
        assert_eq!(stream_of("orders.IBKR_Main.new"), Some(streams::ORDERS));
        assert_eq!(
            stream_of("orders.IBKR_Main.events"),
            Some(streams::ORDER_EVENTS)
        );
        assert_eq!(
            stream_of("signals.raw.staging.tv"),
            Some(streams::SIGNALS_RAW)
        );
        assert_eq!(stream_of("nope"), None);
        for k in Kind::ALL {
            assert_eq!(Kind::for_stream(k.stream()), Some(*k));
        }
    }
}
