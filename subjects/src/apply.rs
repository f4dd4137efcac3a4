//! Applying, checking and exporting the topology against a live server.
//!
//! Only the fields mtx sets are compared, so server-side defaults (and fields
//! a newer server adds) never show up as drift.

use crate::topology::{ConsumerSpec, KvSpec, StreamSpec, Topology};
use async_nats::jetstream::{self, consumer, stream};
use futures::TryStreamExt;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;
use std::path::Path;

/// A server call failed while applying or checking the topology.
#[derive(Debug, thiserror::Error)]
#[error("{op} {object}: {message}")]
pub struct ApplyError {
    /// What was attempted (`create stream`, `update consumer`, ...).
    pub op: &'static str,
    /// The stream / consumer / bucket concerned.
    pub object: String,
    /// The server's or client's error text.
    pub message: String,
}

fn err(op: &'static str, object: &str, e: impl fmt::Display) -> ApplyError {
    ApplyError {
        op,
        object: object.to_string(),
        message: e.to_string(),
    }
}

/// One field where the server disagrees with the code.
#[derive(Debug, Clone, PartialEq)]
pub struct Drift {
    /// `stream SIGNALS_RAW`, `consumer SIGNALS_RAW/standardizer`, `kv strategies`.
    pub object: String,
    /// Field name as in the JetStream API (`max_ack_pending`, ...), or `exists`.
    pub field: String,
    /// What the code wants.
    pub expected: String,
    /// What the server has.
    pub actual: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} expected {} but server has {}",
            self.object, self.field, self.expected, self.actual
        )
    }
}

/// What `apply` did, per object.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ApplyReport {
    /// Objects that did not exist and were created.
    pub created: Vec<String>,
    /// Objects whose config differed and were updated (with the drift fixed).
    pub updated: Vec<String>,
    /// Objects already as the code wants them.
    pub unchanged: Vec<String>,
}

impl ApplyReport {
    /// True when applying changed nothing on the server.
    pub fn is_noop(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty()
    }
}

const STREAM_FIELDS: &[&str] = &[
    "subjects",
    "retention",
    "storage",
    "discard",
    "max_age",
    "max_msgs_per_subject",
    "duplicate_window",
    "num_replicas",
    "description",
];
const CONSUMER_FIELDS: &[&str] = &[
    "filter_subjects",
    "deliver_policy",
    "ack_policy",
    "ack_wait",
    "max_deliver",
    "backoff",
    "max_ack_pending",
    "description",
];

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Normalise a serialized config so that equal intent compares equal.
fn normalise(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        // subjects and filters are sets
        for key in ["subjects", "filter_subjects"] {
            if let Some(Value::Array(a)) = obj.get_mut(key) {
                a.sort_by_key(|x| x.to_string());
            }
        }
        // one filter may come back as filter_subject
        let single = obj
            .get("filter_subject")
            .and_then(|x| x.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        if let Some(single) = single {
            obj.insert(
                "filter_subjects".into(),
                Value::Array(vec![Value::String(single)]),
            );
        }
        obj.entry("filter_subjects").or_insert(Value::Array(vec![]));
        obj.entry("backoff").or_insert(Value::Array(vec![]));
        obj.entry("description").or_insert(Value::Null);
        if obj.get("description") == Some(&Value::String(String::new())) {
            obj.insert("description".into(), Value::Null);
        }
    }
    v
}

fn compare(object: &str, fields: &[&str], want: &Value, have: &Value) -> Vec<Drift> {
    let want = normalise(want.clone());
    let have = normalise(have.clone());
    fields
        .iter()
        .filter_map(|f| {
            let w = want.get(*f).cloned().unwrap_or(Value::Null);
            let h = have.get(*f).cloned().unwrap_or(Value::Null);
            (w != h).then(|| Drift {
                object: object.to_string(),
                field: f.to_string(),
                expected: w.to_string(),
                actual: h.to_string(),
            })
        })
        .collect()
}

fn stream_label(s: &StreamSpec) -> String {
    format!("stream {}", s.config.name)
}

fn consumer_label(c: &ConsumerSpec) -> String {
    format!("consumer {}/{}", c.stream, c.durable())
}

fn kv_label(k: &KvSpec) -> String {
    format!("kv {}", k.config.bucket)
}

async fn stream_names(js: &jetstream::Context) -> Result<BTreeSet<String>, ApplyError> {
    js.stream_names()
        .try_collect()
        .await
        .map_err(|e| err("list", "streams", e))
}

async fn stream_drift(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<Vec<Drift>, ApplyError> {
    let label = stream_label(spec);
    let mut st = js
        .get_stream(&spec.config.name)
        .await
        .map_err(|e| err("get", &label, e))?;
    let info = st.info().await.map_err(|e| err("info", &label, e))?;
    Ok(compare(
        &label,
        STREAM_FIELDS,
        &to_value(&spec.config),
        &to_value(&info.config),
    ))
}

async fn consumer_drift(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
) -> Result<Option<Vec<Drift>>, ApplyError> {
    let label = consumer_label(spec);
    let st = js
        .get_stream_no_info(&spec.stream)
        .await
        .map_err(|e| err("get", &label, e))?;
    let names: BTreeSet<String> = st
        .consumer_names()
        .try_collect()
        .await
        .map_err(|e| err("list consumers", &label, e))?;
    if !names.contains(spec.durable()) {
        return Ok(None);
    }
    let info = st
        .consumer_info(spec.durable())
        .await
        .map_err(|e| err("info", &label, e))?;
    Ok(Some(compare(
        &label,
        CONSUMER_FIELDS,
        &to_value(&spec.config),
        &to_value(&info.config),
    )))
}

async fn kv_drift(js: &jetstream::Context, spec: &KvSpec) -> Result<Vec<Drift>, ApplyError> {
    let label = kv_label(spec);
    let mut st = js
        .get_stream(format!("KV_{}", spec.config.bucket))
        .await
        .map_err(|e| err("get", &label, e))?;
    let info = st.info().await.map_err(|e| err("info", &label, e))?;
    let mut d = Vec::new();
    if info.config.max_messages_per_subject != spec.config.history {
        d.push(Drift {
            object: label.clone(),
            field: "history".into(),
            expected: spec.config.history.to_string(),
            actual: info.config.max_messages_per_subject.to_string(),
        });
    }
    if info.config.max_age != spec.config.max_age {
        d.push(Drift {
            object: label.clone(),
            field: "max_age".into(),
            expected: format!("{:?}", spec.config.max_age),
            actual: format!("{:?}", info.config.max_age),
        });
    }
    if info.config.num_replicas != spec.config.num_replicas {
        d.push(Drift {
            object: label,
            field: "num_replicas".into(),
            expected: spec.config.num_replicas.to_string(),
            actual: info.config.num_replicas.to_string(),
        });
    }
    Ok(d)
}

/// Every difference between the server and the code (missing objects included).
pub async fn check(js: &jetstream::Context, topo: &Topology) -> Result<Vec<Drift>, ApplyError> {
    let names = stream_names(js).await?;
    let mut drift = Vec::new();
    let missing = |object: String| Drift {
        object,
        field: "exists".into(),
        expected: "true".into(),
        actual: "false".into(),
    };
    for s in &topo.streams {
        if names.contains(&s.config.name) {
            drift.extend(stream_drift(js, s).await?);
        } else {
            drift.push(missing(stream_label(s)));
        }
    }
    for c in &topo.consumers {
        if !names.contains(&c.stream) {
            drift.push(missing(consumer_label(c)));
            continue;
        }
        match consumer_drift(js, c).await? {
            Some(d) => drift.extend(d),
            None => drift.push(missing(consumer_label(c))),
        }
    }
    for k in &topo.kv {
        if names.contains(&format!("KV_{}", k.config.bucket)) {
            drift.extend(kv_drift(js, k).await?);
        } else {
            drift.push(missing(kv_label(k)));
        }
    }
    Ok(drift)
}

/// Create what is missing and update what drifted; idempotent.
pub async fn apply(js: &jetstream::Context, topo: &Topology) -> Result<ApplyReport, ApplyError> {
    let names = stream_names(js).await?;
    let mut report = ApplyReport::default();
    for s in &topo.streams {
        let label = stream_label(s);
        if !names.contains(&s.config.name) {
            js.create_stream(s.config.clone())
                .await
                .map_err(|e| err("create", &label, e))?;
            report.created.push(label);
        } else if !stream_drift(js, s).await?.is_empty() {
            js.update_stream(s.config.clone())
                .await
                .map_err(|e| err("update", &label, e))?;
            report.updated.push(label);
        } else {
            report.unchanged.push(label);
        }
    }
    for c in &topo.consumers {
        let label = consumer_label(c);
        let st = js
            .get_stream_no_info(&c.stream)
            .await
            .map_err(|e| err("get", &label, e))?;
        match consumer_drift(js, c).await? {
            None => {
                st.create_consumer(c.config.clone())
                    .await
                    .map_err(|e| err("create", &label, e))?;
                report.created.push(label);
            }
            Some(d) if !d.is_empty() => {
                st.update_consumer(c.config.clone())
                    .await
                    .map_err(|e| err("update", &label, e))?;
                report.updated.push(label);
            }
            Some(_) => report.unchanged.push(label),
        }
    }
    for k in &topo.kv {
        let label = kv_label(k);
        if !names.contains(&format!("KV_{}", k.config.bucket)) {
            js.create_key_value(k.config.clone())
                .await
                .map_err(|e| err("create", &label, e))?;
            report.created.push(label);
        } else if !kv_drift(js, k).await?.is_empty() {
            js.update_key_value(k.config.clone())
                .await
                .map_err(|e| err("update", &label, e))?;
            report.updated.push(label);
        } else {
            report.unchanged.push(label);
        }
    }
    Ok(report)
}

/// The export as (relative path, JSON text) pairs, in a stable order.
///
/// Stream files are accepted by `nats stream add --config <file>`, consumer
/// files by `nats consumer add <STREAM> --config <file>`.
pub fn export_files(topo: &Topology) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for s in &topo.streams {
        out.push((
            format!("streams/{}.json", s.config.name),
            pretty(&to_value(&s.config)),
        ));
    }
    for c in &topo.consumers {
        out.push((
            format!("consumers/{}/{}.json", c.stream, c.durable()),
            pretty(&to_value(&c.config)),
        ));
    }
    out
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Write [`export_files`] under `dir` (created if needed).
pub fn export(topo: &Topology, dir: &Path) -> std::io::Result<Vec<String>> {
    let mut written = Vec::new();
    for (rel, text) in export_files(topo) {
        let path = dir.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, text)?;
        written.push(rel);
    }
    Ok(written)
}

/// Convert a stream spec's config into the consumer the tests and tools can use.
pub fn pull_config(spec: &ConsumerSpec) -> consumer::pull::Config {
    spec.config.clone()
}

/// Re-export for callers that only need the stream config type.
pub type StreamConfig = stream::Config;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::TopologySettings;

    #[test]
    fn compare_ignores_unset_and_normalises_filters() {
        let t = Topology::build(&TopologySettings::default());
        let c = t.consumer("standardizer").unwrap();
        let mut have = to_value(&c.config);
        // server returns a single filter in filter_subject
        have["filter_subject"] = Value::String("signals.raw.>".into());
        have["filter_subjects"] = Value::Array(vec![]);
        have["max_waiting"] = Value::from(512);
        assert!(compare("c", CONSUMER_FIELDS, &to_value(&c.config), &have).is_empty());
        have["max_ack_pending"] = Value::from(7);
        let d = compare("c", CONSUMER_FIELDS, &to_value(&c.config), &have);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].field, "max_ack_pending");
        assert_eq!(
            d[0].to_string(),
            "c: max_ack_pending expected 20000 but server has 7"
        );
    }

    #[test]
    fn export_is_stable() {
        let t = Topology::build(&TopologySettings::default());
        let a = export_files(&t);
        assert_eq!(a, export_files(&t));
        assert!(a.iter().any(|(p, _)| p == "streams/SIGNALS_RAW.json"));
        assert!(a
            .iter()
            .any(|(p, _)| p == "consumers/SIGNALS_RAW/standardizer.json"));
        let raw: Value = serde_json::from_str(&a[0].1).unwrap();
        assert_eq!(raw["storage"], "file");
        assert_eq!(raw["retention"], "limits");
    }
}
