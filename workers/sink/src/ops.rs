//! What ops read and do from the command line, over the sink's collections.
//!
//! - [`signal_lifecycle`]: one signal's whole life (raw → standardized →
//!   decision → orders with their status history → fills → the resulting
//!   position in the latest account snapshot), plus its dead letters;
//!   [`Lifecycle::render`] prints it.
//! - [`list_dead_letters`] / [`find_dead_letter`]: what was rejected, where
//!   and why.
//! - [`redrive`]: publish a dead letter's payload (or a fixed one) back on
//!   its original subject, so it goes through its stage again, and record
//!   the redrive on the dead letter; the same bytes are not sent twice
//!   unless asked to (`mtx dlq redrive --again`).

use crate::error::SinkError;
use crate::spec::{names, Db};
use crate::store::{int_of, Store};
use async_nats::jetstream;
use bson::{doc, Bson, DateTime, Document};
use futures::TryStreamExt;
use mtx_schemas::headers;
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// Everything Mongo knows about one signal.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lifecycle {
    /// The signal id asked for.
    pub signal_id: String,
    /// Raw messages carrying it (re-sends are separate arrivals).
    pub raw: Vec<Document>,
    /// The standardized signal.
    pub standardized: Option<Document>,
    /// Cerebro's decision(s).
    pub decisions: Vec<Document>,
    /// Orders of the signal (and their stop-loss / take-profit children).
    pub orders: Vec<Document>,
    /// Status history of those orders, by order and sequence.
    pub events: Vec<Document>,
    /// Cancel requests for those orders.
    pub cancels: Vec<Document>,
    /// Fills, partial fills and rejections of those orders.
    pub fills: Vec<Document>,
    /// Latest snapshot of each account the orders went to.
    pub accounts: Vec<Document>,
    /// Dead letters about the signal.
    pub dead_letters: Vec<Document>,
}

async fn find_sorted(
    store: &Store,
    db: Db,
    coll: &str,
    filter: Document,
    sort: Document,
    limit: Option<i64>,
) -> Result<Vec<Document>, SinkError> {
    let c = store.coll(db, coll);
    store
        .timed(&format!("find in {coll}"), async move {
            let mut f = c.find(filter).sort(sort);
            if let Some(l) = limit {
                f = f.limit(l);
            }
            Ok(f.await?.try_collect().await?)
        })
        .await
}

/// Read one signal's lifecycle.
pub async fn signal_lifecycle(store: &Store, signal_id: &str) -> Result<Lifecycle, SinkError> {
    let t = Db::Trading;
    let by_sig = doc! {"signal_id": signal_id};
    let ts = doc! {"timestamp": 1};
    let (raw, standardized, decisions, orders, dead_letters) = futures::try_join!(
        find_sorted(
            store,
            t,
            names::RAW_SIGNALS,
            by_sig.clone(),
            ts.clone(),
            None
        ),
        find_sorted(
            store,
            t,
            names::STANDARDIZED_SIGNALS,
            by_sig.clone(),
            ts.clone(),
            Some(1)
        ),
        find_sorted(
            store,
            t,
            names::CEREBRO_DECISIONS,
            by_sig.clone(),
            ts.clone(),
            None
        ),
        find_sorted(
            store,
            t,
            names::TRADING_ORDERS,
            by_sig.clone(),
            doc! {"leg": 1, "timestamp": 1},
            None
        ),
        find_sorted(
            store,
            t,
            names::DEAD_LETTERS,
            by_sig.clone(),
            doc! {"time": 1},
            None
        ),
    )?;
    let mut orders = orders;
    // Child orders (stop-loss / take-profit) point at their parent.
    let parents: Vec<Bson> = orders
        .iter()
        .filter_map(|o| o.get_str("order_id").ok().map(Bson::from))
        .collect();
    if !parents.is_empty() {
        let children = find_sorted(
            store,
            t,
            names::TRADING_ORDERS,
            doc! {"parent_order_id": {"$in": parents}, "signal_id": {"$ne": signal_id}},
            doc! {"timestamp": 1},
            None,
        )
        .await?;
        orders.extend(children);
    }
    let ids: Vec<Bson> = orders
        .iter()
        .filter_map(|o| o.get_str("order_id").ok().map(Bson::from))
        .collect();
    let (events, cancels, fills) = if ids.is_empty() {
        (vec![], vec![], vec![])
    } else {
        let f = doc! {"order_id": {"$in": ids}};
        futures::try_join!(
            find_sorted(
                store,
                t,
                names::ORDER_EVENTS,
                f.clone(),
                doc! {"order_id": 1, "seq": 1},
                None
            ),
            find_sorted(store, t, names::ORDER_CANCELS, f.clone(), ts.clone(), None),
            find_sorted(
                store,
                t,
                names::EXECUTION_CONFIRMATIONS,
                f.clone(),
                ts.clone(),
                None
            ),
        )?
    };
    let accounts_named: BTreeSet<String> = orders
        .iter()
        .filter_map(|o| o.get_str("account").ok().map(str::to_string))
        .collect();
    let mut accounts = Vec::new();
    for a in accounts_named {
        let mut latest = find_sorted(
            store,
            t,
            names::ACCOUNT_STATE,
            doc! {"account": &a},
            doc! {"timestamp": -1},
            Some(1),
        )
        .await?;
        accounts.append(&mut latest);
    }
    Ok(Lifecycle {
        signal_id: signal_id.to_string(),
        raw,
        standardized: standardized.into_iter().next(),
        decisions,
        orders,
        events,
        cancels,
        fills,
        accounts,
        dead_letters,
    })
}

/// A BSON value as ops read it: decimals and strings bare, dates RFC 3339.
pub fn show(v: Option<&Bson>) -> String {
    match v {
        None | Some(Bson::Null) => "-".into(),
        Some(Bson::String(s)) => s.clone(),
        Some(Bson::Decimal128(d)) => d.to_string(),
        Some(Bson::DateTime(d)) => d
            .try_to_rfc3339_string()
            .unwrap_or_else(|_| d.timestamp_millis().to_string()),
        Some(Bson::Double(x)) => format!("{x}"),
        Some(Bson::Int32(i)) => i.to_string(),
        Some(Bson::Int64(i)) => i.to_string(),
        Some(Bson::Boolean(b)) => b.to_string(),
        Some(other) => other.clone().into_relaxed_extjson().to_string(),
    }
}

fn get<'a>(d: &'a Document, path: &str) -> Option<&'a Bson> {
    let mut cur = d;
    let mut it = path.split('.').peekable();
    while let Some(p) = it.next() {
        let v = cur.get(p)?;
        if it.peek().is_none() {
            return Some(v);
        }
        cur = v.as_document()?;
    }
    None
}

fn f(d: &Document, path: &str) -> String {
    show(get(d, path))
}

impl Lifecycle {
    /// True when Mongo has nothing at all about the signal.
    pub fn is_empty(&self) -> bool {
        self.raw.is_empty()
            && self.standardized.is_none()
            && self.decisions.is_empty()
            && self.orders.is_empty()
            && self.dead_letters.is_empty()
    }

    /// Human-readable, one stage per block.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "signal {}", self.signal_id);
        let _ = writeln!(o, "\nraw ({})", self.raw.len());
        for r in &self.raw {
            let _ = writeln!(
                o,
                "  {}  source {}  processed {}  raw_signal_id {}",
                f(r, "timestamp"),
                f(r, "source"),
                f(r, "processed"),
                f(r, "raw_signal_id")
            );
            if r.get_document("error").is_ok() {
                let _ = writeln!(
                    o,
                    "    error at {}: {} ({}): {}",
                    f(r, "error.stage"),
                    f(r, "error.reason"),
                    f(r, "error.at"),
                    f(r, "error.detail")
                );
            }
        }
        let _ = writeln!(o, "\nstandardized");
        match &self.standardized {
            None => {
                let _ = writeln!(o, "  -");
            }
            Some(s) => {
                let _ = writeln!(
                    o,
                    "  {}  {} {} {} {} x {} @ {}  stop {}  target {}  strategy {}",
                    f(s, "timestamp"),
                    f(s, "action"),
                    f(s, "direction"),
                    f(s, "order_type"),
                    f(s, "quantity"),
                    f(s, "instrument"),
                    f(s, "price"),
                    f(s, "stop_loss"),
                    f(s, "take_profit"),
                    f(s, "strategy_id")
                );
                let legs = s.get_array("legs").map(|a| a.len()).unwrap_or(0);
                let _ = writeln!(
                    o,
                    "  legs {legs}  sizing {}  processed_by_cerebro {}",
                    f(s, "sizing_mode"),
                    f(s, "processed_by_cerebro")
                );
            }
        }
        let _ = writeln!(o, "\ndecision ({})", self.decisions.len());
        for d in &self.decisions {
            let _ = writeln!(
                o,
                "  {}  {}  quantity {} -> {}  reason [{}] {}",
                f(d, "timestamp"),
                f(d, "decision"),
                f(d, "original_quantity"),
                f(d, "final_quantity"),
                f(d, "reason_code"),
                f(d, "reason")
            );
            let _ = writeln!(
                o,
                "    margin {} -> {}  utilisation {}%  cvar contribution {}  allocated {}  available {}",
                f(d, "risk_assessment.portfolio_margin_before"),
                f(d, "risk_assessment.portfolio_margin_after"),
                f(d, "risk_assessment.margin_utilization_pct"),
                f(d, "risk_assessment.cvar_contribution"),
                f(d, "risk_assessment.allocated_capital"),
                f(d, "risk_assessment.available_capital")
            );
        }
        let _ = writeln!(o, "\norders ({})", self.orders.len());
        for ord in &self.orders {
            let id = f(ord, "order_id");
            let _ = writeln!(
                o,
                "  {id}  {} {} {} {} x {} @ {}  account {}  status {}  filled {} @ {}",
                f(ord, "action"),
                f(ord, "side"),
                f(ord, "order_type"),
                f(ord, "quantity"),
                f(ord, "instrument"),
                f(ord, "price"),
                f(ord, "account"),
                f(ord, "status"),
                f(ord, "filled_quantity"),
                f(ord, "avg_fill_price")
            );
            let _ = writeln!(
                o,
                "    sizing: {}  margin {}",
                f(ord, "cerebro_decision.position_size_logic"),
                f(ord, "cerebro_decision.margin_required")
            );
            for e in self
                .events
                .iter()
                .filter(|e| e.get_str("order_id").ok() == Some(id.as_str()))
            {
                let _ = writeln!(
                    o,
                    "    #{} {}  {}  filled {}{}",
                    f(e, "seq"),
                    f(e, "timestamp"),
                    f(e, "status"),
                    f(e, "filled_quantity"),
                    match e.get_str("reason") {
                        Ok(r) => format!("  ({r})"),
                        Err(_) => String::new(),
                    }
                );
            }
            for c in self
                .cancels
                .iter()
                .filter(|c| c.get_str("order_id").ok() == Some(id.as_str()))
            {
                let _ = writeln!(
                    o,
                    "    cancel requested {}: {}",
                    f(c, "timestamp"),
                    f(c, "reason")
                );
            }
        }
        let _ = writeln!(o, "\nfills ({})", self.fills.len());
        for x in &self.fills {
            let _ = writeln!(
                o,
                "  {}  {}  {} {} x {} @ {}  commission {}  order {}",
                f(x, "timestamp"),
                f(x, "status"),
                f(x, "side"),
                f(x, "quantity"),
                f(x, "instrument"),
                f(x, "price"),
                f(x, "commission"),
                f(x, "order_id")
            );
        }
        let _ = writeln!(o, "\nposition");
        let wanted: BTreeSet<(String, String)> = self
            .orders
            .iter()
            .map(|x| (f(x, "strategy_id"), f(x, "instrument")))
            .collect();
        if self.accounts.is_empty() {
            let _ = writeln!(o, "  -");
        }
        for a in &self.accounts {
            let positions: Vec<&Document> = a
                .get_array("open_positions")
                .map(|v| v.iter().filter_map(Bson::as_document).collect())
                .unwrap_or_default();
            let mine: Vec<&&Document> = positions
                .iter()
                .filter(|p| {
                    let strategy = f(p, "strategy_id");
                    let instrument = f(p, "instrument");
                    wanted
                        .iter()
                        .any(|(s, i)| *i == instrument && (*s == strategy || strategy == "-"))
                })
                .collect();
            let _ = writeln!(
                o,
                "  account {} as of {}: equity {}  margin used {}",
                f(a, "account"),
                f(a, "timestamp"),
                f(a, "equity"),
                f(a, "margin_used")
            );
            if mine.is_empty() {
                let _ = writeln!(o, "    flat (no open position in the signal's instruments)");
            }
            for p in mine {
                let _ = writeln!(
                    o,
                    "    {} {} {} x {}  entry {}  mark {}  unrealized {}  margin {}",
                    f(p, "strategy_id"),
                    f(p, "direction"),
                    f(p, "quantity"),
                    f(p, "instrument"),
                    f(p, "entry_price"),
                    f(p, "current_price"),
                    f(p, "unrealized_pnl"),
                    f(p, "margin_required")
                );
            }
        }
        if !self.dead_letters.is_empty() {
            let _ = writeln!(o, "\ndead letters ({})", self.dead_letters.len());
            for d in &self.dead_letters {
                let _ = writeln!(
                    o,
                    "  {}  {}  {}: {}  [{}]",
                    f(d, "time"),
                    f(d, "stage"),
                    f(d, "reason"),
                    f(d, "detail"),
                    f(d, "dead_letter_id")
                );
            }
        }
        o
    }

    /// Every document as relaxed extended JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let docs = |v: &[Document]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|d| Bson::Document(d.clone()).into_relaxed_extjson())
                .collect()
        };
        serde_json::json!({
            "signal_id": self.signal_id,
            "raw": docs(&self.raw),
            "standardized": self.standardized.clone().map(|d| Bson::Document(d).into_relaxed_extjson()),
            "decisions": docs(&self.decisions),
            "orders": docs(&self.orders),
            "events": docs(&self.events),
            "cancels": docs(&self.cancels),
            "fills": docs(&self.fills),
            "accounts": docs(&self.accounts),
            "dead_letters": docs(&self.dead_letters),
        })
    }
}

/// Which dead letters to list.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    /// Only this stage.
    pub stage: Option<String>,
    /// Only this reason.
    pub reason: Option<String>,
    /// Only those about this signal.
    pub signal_id: Option<String>,
    /// Leave out the ones already redriven.
    pub pending_only: bool,
    /// At most this many (newest first).
    pub limit: i64,
}

/// Dead letters, newest first, without their payloads.
pub async fn list_dead_letters(
    store: &Store,
    filter: &DeadLetterFilter,
) -> Result<Vec<Document>, SinkError> {
    let mut q = Document::new();
    if let Some(s) = &filter.stage {
        q.insert("stage", s);
    }
    if let Some(r) = &filter.reason {
        q.insert("reason", r);
    }
    if let Some(s) = &filter.signal_id {
        q.insert("signal_id", s);
    }
    if filter.pending_only {
        q.insert("redrives.0", doc! {"$exists": false});
    }
    let c = store.coll(Db::Trading, names::DEAD_LETTERS);
    let limit = filter.limit.max(1);
    store
        .timed("list dead letters", async move {
            Ok(c.find(q)
                .sort(doc! {"time": -1})
                .limit(limit)
                .projection(doc! {"payload": 0, "headers": 0})
                .await?
                .try_collect()
                .await?)
        })
        .await
}

/// One dead letter by its id (or an unambiguous prefix of it).
pub async fn find_dead_letter(store: &Store, id: &str) -> Result<Document, SinkError> {
    let c = store.coll(Db::Trading, names::DEAD_LETTERS);
    let q = doc! {"dead_letter_id": id};
    let exact = store
        .timed("find dead letter", async move { Ok(c.find_one(q).await?) })
        .await?;
    if let Some(d) = exact {
        return Ok(d);
    }
    let escaped: String = id
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '_' {
                ch.to_string()
            } else {
                format!("\\{ch}")
            }
        })
        .collect();
    let found = store
        .find_all(
            Db::Trading,
            names::DEAD_LETTERS,
            doc! {"dead_letter_id": {"$regex": format!("^{escaped}")}},
            None,
        )
        .await?;
    match found.len() {
        1 => Ok(found.into_iter().next().unwrap_or_default()),
        0 => Err(SinkError::NotFound(format!("no dead letter `{id}`"))),
        n => Err(SinkError::NotFound(format!(
            "`{id}` matches {n} dead letters; give more of the id"
        ))),
    }
}

/// The exact payload bytes of a dead letter.
pub fn payload_bytes(d: &Document) -> Vec<u8> {
    match d.get("payload") {
        Some(Bson::String(s)) => s.as_bytes().to_vec(),
        Some(Bson::Binary(b)) => b.bytes.clone(),
        _ => Vec::new(),
    }
}

/// What a redrive published.
#[derive(Debug, Clone, PartialEq)]
pub struct Redriven {
    /// The dead letter.
    pub dead_letter_id: String,
    /// Subject it was published on.
    pub subject: String,
    /// Its `Nats-Msg-Id`.
    pub msg_id: String,
    /// Stream sequence (0 when JetStream dropped it as a duplicate).
    pub seq: u64,
    /// Nothing new was published: the letter had already been redriven with
    /// the same bytes (`msg_id` and `seq` are that earlier redrive's; see
    /// [`redrive`]), or JetStream had already stored this redrive (a repeated
    /// command whose record was not written).
    pub duplicate: bool,
    /// The payload was replaced by a fixed one.
    pub payload_changed: bool,
}

/// Publish a dead letter back on its original subject (with `payload` instead
/// of the stored bytes when given) and record it on the dead letter (with
/// the SHA-256 of the bytes sent, `payload_sha256`).
///
/// A letter already redriven with the same bytes is not published again
/// unless `again` is set: the earlier redrive is returned with `duplicate`
/// set, so repeating a redrive command that failed half-way (`mtx dlq
/// redrive A B` that sent A and failed on B) cannot publish A twice. A
/// record from before `payload_sha256` counts as the same bytes as the
/// stored payload when its `payload_changed` is false. The message id is
/// `redrive:<dead letter id>:<n>` (`n` = recorded redrives + 1), so a
/// publish whose record was not written is dropped by JetStream's duplicate
/// window when repeated, and `again` gets a new one.
pub async fn redrive(
    store: &Store,
    js: &jetstream::Context,
    dead_letter: &Document,
    payload: Option<Vec<u8>>,
    again: bool,
) -> Result<Redriven, SinkError> {
    let id = dead_letter
        .get_str("dead_letter_id")
        .map_err(|_| SinkError::NotFound("dead letter without an id".into()))?
        .to_string();
    let subject = dead_letter
        .get_str("original_subject")
        .map_err(|_| {
            SinkError::NotFound(format!(
                "dead letter {id} has no original subject; it cannot be redriven"
            ))
        })?
        .to_string();
    let n = dead_letter
        .get_array("redrives")
        .map(|a| a.len())
        .unwrap_or(0)
        + 1;
    let msg_id = format!("redrive:{id}:{n}");
    let payload_changed = payload.is_some();
    let omitted = dead_letter
        .get_document("headers")
        .ok()
        .and_then(|h| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(mtx_runtime::dlq::DLQ_PAYLOAD_OMITTED))
                .map(|(_, v)| v.as_str() == Some("true"))
        })
        .unwrap_or(false);
    if omitted && payload.is_none() {
        return Err(SinkError::NotFound(format!(
            "dead letter {id} carries a reference, not the original payload (it was too large for the DLQ): redrive it with the original's bytes from its stream"
        )));
    }
    let body = payload.unwrap_or_else(|| payload_bytes(dead_letter));
    let sha = crate::mapping::sha256_hex(&body);
    if !again {
        if let Some(earlier) = earlier_redrive_of(dead_letter, &sha) {
            return Ok(Redriven {
                dead_letter_id: id,
                subject: earlier
                    .get_str("subject")
                    .map(str::to_string)
                    .unwrap_or(subject),
                msg_id: earlier.get_str("msg_id").unwrap_or_default().to_string(),
                seq: int_of(earlier.get("seq"))
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0),
                duplicate: true,
                payload_changed,
            });
        }
    }
    let mut h = async_nats::HeaderMap::new();
    if let Ok(hs) = dead_letter.get_document("headers") {
        for (k, v) in hs {
            if let Some(v) = v.as_str() {
                // Not the old id, nor the dead-lettering consumer (DLQ metadata).
                if !k.eq_ignore_ascii_case(headers::MSG_ID)
                    && !k.eq_ignore_ascii_case(mtx_runtime::dlq::DLQ_CONSUMER)
                {
                    h.insert(k.as_str(), v);
                }
            }
        }
    }
    h.insert(headers::MSG_ID, msg_id.as_str());
    h.insert("Mtx-Redrive-Of", id.as_str());
    let ack = js
        .publish_with_headers(subject.clone(), h, body.into())
        .await
        .map_err(|e| SinkError::Nats(e.to_string()))?
        .await
        .map_err(|e| SinkError::Nats(e.to_string()))?;
    let record = doc! {
        "at": DateTime::now(),
        "subject": &subject,
        "msg_id": &msg_id,
        "stream": &ack.stream,
        "seq": ack.sequence as i64,
        "payload_changed": payload_changed,
        "payload_sha256": &sha,
    };
    let c = store.coll(Db::Trading, names::DEAD_LETTERS);
    store
        .timed("record redrive", {
            let q = doc! {"dead_letter_id": &id, "redrives.msg_id": {"$ne": &msg_id}};
            async move {
                c.update_one(q, doc! {"$push": {"redrives": record}})
                    .await?;
                Ok(())
            }
        })
        .await?;
    Ok(Redriven {
        dead_letter_id: id,
        subject,
        msg_id,
        seq: ack.sequence,
        duplicate: ack.duplicate,
        payload_changed,
    })
}

/// The first recorded redrive of `dead_letter` that sent `body`, if any
/// (what [`redrive`] without `again` skips).
pub fn earlier_redrive<'a>(dead_letter: &'a Document, body: &[u8]) -> Option<&'a Document> {
    earlier_redrive_of(dead_letter, &crate::mapping::sha256_hex(body))
}

/// The first recorded redrive of `dead_letter` that sent the bytes hashing
/// to `sha` (hex SHA-256). A record without `payload_sha256` (written before
/// it was recorded) sent the stored payload when its `payload_changed` is
/// false; one with a fixed payload of unknown bytes matches nothing.
fn earlier_redrive_of<'a>(dead_letter: &'a Document, sha: &str) -> Option<&'a Document> {
    let mut original = None;
    dead_letter
        .get_array("redrives")
        .ok()?
        .iter()
        .filter_map(Bson::as_document)
        .find(|r| match r.get_str("payload_sha256") {
            Ok(h) => h == sha,
            Err(_) => {
                matches!(r.get_bool("payload_changed"), Ok(false))
                    && original
                        .get_or_insert_with(|| {
                            crate::mapping::sha256_hex(&payload_bytes(dead_letter))
                        })
                        .as_str()
                        == sha
            }
        })
}

/// Number of redrives recorded on a dead letter.
pub fn redrive_count(d: &Document) -> usize {
    d.get_array("redrives").map(|a| a.len()).unwrap_or(0)
}

/// `original_seq` of a dead letter, if known.
pub fn original_seq(d: &Document) -> Option<i64> {
    int_of(d.get("original_seq"))
}

/// A document as relaxed extended JSON (decimals as `{"$numberDecimal": ...}`).
pub fn to_json(d: &Document) -> serde_json::Value {
    Bson::Document(d.clone()).into_relaxed_extjson()
}

/// One line of `mtx dlq list`.
pub fn dead_letter_line(d: &Document) -> String {
    let mut detail = f(d, "detail");
    if detail.chars().count() > 100 {
        detail = detail.chars().take(97).collect::<String>() + "...";
    }
    let redriven = match redrive_count(d) {
        0 => String::new(),
        n => format!("  (redriven {n}x)"),
    };
    format!(
        "{}  {:<12} {:<20} {}  {}#{}  {detail}{redriven}",
        f(d, "time"),
        f(d, "stage"),
        f(d, "reason"),
        f(d, "dead_letter_id"),
        f(d, "original_subject"),
        f(d, "original_seq"),
    )
}

/// `mtx dlq show`: every field, the payload pretty-printed when it is JSON.
pub fn render_dead_letter(d: &Document) -> String {
    let mut o = String::new();
    for k in [
        "dead_letter_id",
        "stage",
        "reason",
        "detail",
        "time",
        "original_subject",
        "original_stream",
        "original_seq",
        "deliveries",
        "signal_id",
        "raw_signal_id",
        "dlq_subject",
    ] {
        let _ = writeln!(o, "{k:<17} {}", f(d, k));
    }
    if let Ok(h) = d.get_document("headers") {
        for (k, v) in h {
            let _ = writeln!(o, "header           {k}: {}", show(Some(v)));
        }
    }
    if let Ok(r) = d.get_array("redrives") {
        for x in r.iter().filter_map(Bson::as_document) {
            let _ = writeln!(
                o,
                "redriven         {} as {} ({} seq {}){}",
                f(x, "at"),
                f(x, "msg_id"),
                f(x, "stream"),
                f(x, "seq"),
                if x.get_bool("payload_changed").unwrap_or(false) {
                    " with a fixed payload"
                } else {
                    ""
                }
            );
        }
    }
    let bytes = payload_bytes(d);
    let payload = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    };
    let _ = writeln!(
        o,
        "payload ({} bytes, {}):\n{payload}",
        bytes.len(),
        f(d, "payload_encoding")
    );
    o
}
