//! `mtx signal send <file.json>`: replay a sender fixture file through the
//! gateway the way the strategy developers' test harness did.
//!
//! The file is a JSON array of Mathematricks signals (or one signal). For each
//! element, in order:
//! - `wait` (seconds to sleep after sending it) and `entry_name` (a label such
//!   as `$ENTRY_1` that later elements link to) are taken out of the body;
//! - an element without `signalID` gets one: `<run id>_<index>`, where the run
//!   id is `--id-prefix` or `<file stem>-<unix ms>` (so two runs of a file
//!   are two sets of signals, and a fixed prefix replays the same ids);
//! - `entry_signal_id` = `$ENTRY_n` / `$PREVIOUS` is replaced by the
//!   `signalID` of the element labelled `$ENTRY_n` / of the previous element
//!   (the sender id, which the pipeline maps to that entry's mtx `signal_id`);
//! - it is POSTed to `<gateway>/v1/signals`; 429 / 503 / connection errors are
//!   retried (the same body, so a retry cannot duplicate the signal).
//!
//! Each result prints as one line (`--json`: one JSON object per line with the
//! mtx `signal_id` the gateway assigned). Exit status 1 if any element failed.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mtx_runtime::config::Config;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Attempts per element on 429 / 503 / connection errors.
const ATTEMPTS: u32 = 6;

/// `mtx signal ...`
#[derive(Subcommand)]
pub enum SignalCmd {
    /// Replay a sender fixture file (elements in order, sleeping `wait`
    /// seconds, resolving `$ENTRY_n` / `$PREVIOUS` in `entry_signal_id`).
    Send {
        /// The fixture file (a JSON array of signals, or one signal).
        file: PathBuf,
        /// Gateway base URL (default: http://<gateway.addr>).
        #[arg(long)]
        gateway: Option<String>,
        /// Divide every `wait` by this factor (2 = twice as fast).
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Do not sleep between elements.
        #[arg(long)]
        no_wait: bool,
        /// Prefix of the signalIDs assigned to elements without one
        /// (default: `<file stem>-<unix ms>`, fresh each run).
        #[arg(long)]
        id_prefix: Option<String>,
        /// Print one JSON object per element instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// One element ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The body to POST.
    pub body: Value,
    /// Its `signalID`.
    pub sender_signal_id: String,
    /// Seconds to wait after sending it.
    pub wait: f64,
}

fn placeholder_target(
    link: &str,
    named: &HashMap<String, String>,
    previous: Option<&String>,
    index: usize,
) -> Result<String> {
    if link == "$PREVIOUS" {
        return previous
            .cloned()
            .with_context(|| format!("element {index}: $PREVIOUS with no previous element"));
    }
    if link.starts_with('$') {
        return named.get(link).cloned().with_context(|| {
            format!("element {index}: entry_signal_id `{link}` names no earlier entry_name")
        });
    }
    Ok(link.to_string())
}

fn wait_seconds(v: Option<Value>, index: usize) -> Result<f64> {
    let secs = match v {
        None | Some(Value::Null) => 0.0,
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .with_context(|| format!("element {index}: wait `{s}` is not a number"))?,
        Some(other) => bail!("element {index}: wait must be a number, got {other}"),
    };
    if !secs.is_finite() || secs < 0.0 {
        bail!("element {index}: wait must be >= 0");
    }
    Ok(secs)
}

/// Turn the file's elements into bodies (see the module docs).
pub fn prepare(elements: Vec<Value>, run_id: &str) -> Result<Vec<Prepared>> {
    let mut named: HashMap<String, String> = HashMap::new();
    let mut previous: Option<String> = None;
    let mut out = Vec::with_capacity(elements.len());
    for (i, element) in elements.into_iter().enumerate() {
        let Value::Object(mut obj) = element else {
            bail!("element {i} is not a JSON object");
        };
        let wait = wait_seconds(obj.remove("wait"), i)?;
        let id = match obj.get("signalID") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                let id = format!("{run_id}_{i}");
                obj.insert("signalID".into(), Value::String(id.clone()));
                id
            }
        };
        if let Some(Value::String(label)) = obj.remove("entry_name") {
            named.insert(label, id.clone());
        }
        resolve_links(&mut obj, &named, previous.as_ref(), i)?;
        if let Some(Value::Object(inner)) = obj.get_mut("signal") {
            resolve_links(inner, &named, previous.as_ref(), i)?;
        }
        previous = Some(id.clone());
        out.push(Prepared {
            body: Value::Object(obj),
            sender_signal_id: id,
            wait,
        });
    }
    Ok(out)
}

fn resolve_links(
    obj: &mut Map<String, Value>,
    named: &HashMap<String, String>,
    previous: Option<&String>,
    index: usize,
) -> Result<()> {
    if let Some(Value::String(link)) = obj.get("entry_signal_id") {
        let target = placeholder_target(link, named, previous, index)?;
        obj.insert("entry_signal_id".into(), Value::String(target));
    }
    Ok(())
}

fn load(file: &Path) -> Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    Ok(match v {
        Value::Array(items) => items,
        one => vec![one],
    })
}

/// What the gateway answered for one element.
struct Answer {
    status: u16,
    body: Value,
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Result<Answer> {
    let mut delay = Duration::from_millis(200);
    let mut last_err = None;
    for attempt in 1..=ATTEMPTS {
        match client.post(url).json(body).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                let text = resp.text().await.unwrap_or_default();
                let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
                if (status == 429 || status == 503) && attempt < ATTEMPTS {
                    let wait = retry_after.map(Duration::from_secs).unwrap_or(delay);
                    tokio::time::sleep(wait.min(Duration::from_secs(10))).await;
                    delay *= 2;
                    continue;
                }
                return Ok(Answer { status, body });
            }
            Err(e) => {
                last_err = Some(e);
                if attempt < ATTEMPTS {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
    match last_err {
        Some(e) => Err(e).with_context(|| format!("POST {url}")),
        None => bail!("POST {url}: no answer"),
    }
}

/// Run a `signal` subcommand.
pub async fn run(cmd: SignalCmd, cfg: &Config) -> Result<ExitCode> {
    let SignalCmd::Send {
        file,
        gateway,
        speed,
        no_wait,
        id_prefix,
        json,
    } = cmd;
    if !(speed.is_finite() && speed > 0.0) {
        bail!("--speed must be > 0");
    }
    let base = gateway.unwrap_or_else(|| format!("http://{}", cfg.gateway.addr));
    let url = format!("{}/v1/signals", base.trim_end_matches('/'));
    let run_id = id_prefix.unwrap_or_else(|| {
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("signal");
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        format!("{stem}-{ms}")
    });
    let prepared = prepare(load(&file)?, &run_id)?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let total = prepared.len();
    let mut failed = 0usize;
    for (i, p) in prepared.iter().enumerate() {
        let answer = post(&client, &url, &p.body).await?;
        let ok = answer.status == 202;
        if !ok {
            failed += 1;
        }
        let signal_id = answer.body.get("signal_id").and_then(Value::as_str);
        if json {
            println!(
                "{}",
                json!({
                    "index": i,
                    "sender_signal_id": p.sender_signal_id,
                    "status": answer.status,
                    "signal_id": signal_id,
                    "duplicate": answer.body.get("duplicate"),
                    "error": (!ok).then_some(&answer.body),
                })
            );
        } else if ok {
            let dup = if answer.body.get("duplicate") == Some(&Value::Bool(true)) {
                " (duplicate)"
            } else {
                ""
            };
            println!(
                "[{}/{total}] {} -> {}{dup}",
                i + 1,
                p.sender_signal_id,
                signal_id.unwrap_or("?")
            );
        } else {
            println!(
                "[{}/{total}] {} FAILED {}: {}",
                i + 1,
                p.sender_signal_id,
                answer.status,
                answer.body
            );
        }
        if !no_wait && i + 1 < total && p.wait > 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(p.wait / speed)).await;
        }
    }
    if !json {
        println!("{} sent, {failed} failed", total - failed);
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assigns_ids_strips_tool_fields_and_resolves_links() {
        let elements = vec![
            json!({"strategy_name": "S", "entry_name": "$ENTRY_1", "wait": 10, "signal_legs": []}),
            json!({"strategy_name": "S", "signalID": "OWN", "wait": "2.5", "signal_legs": []}),
            json!({"strategy_name": "S", "entry_signal_id": "$ENTRY_1", "signal_legs": []}),
            json!({"strategy_name": "S", "entry_signal_id": "$PREVIOUS", "signal_legs": []}),
            json!({"signal": {"entry_signal_id": "$ENTRY_1"}}),
        ];
        let p = prepare(elements, "run").unwrap();
        assert_eq!(p[0].sender_signal_id, "run_0");
        assert_eq!(p[0].wait, 10.0);
        assert!(p[0].body.get("wait").is_none() && p[0].body.get("entry_name").is_none());
        assert_eq!(p[1].sender_signal_id, "OWN");
        assert_eq!(p[1].wait, 2.5);
        assert_eq!(p[2].body["entry_signal_id"], "run_0");
        assert_eq!(p[3].body["entry_signal_id"], "run_2");
        assert_eq!(p[4].body["signal"]["entry_signal_id"], "run_0");
        assert!(prepare(vec![json!({"entry_signal_id": "$ENTRY_9"})], "r").is_err());
        assert!(prepare(vec![json!({"entry_signal_id": "$PREVIOUS"})], "r").is_err());
        assert!(prepare(vec![json!([1])], "r").is_err());
    }
}
