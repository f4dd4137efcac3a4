//! Deterministic synthetic signal load for `mtx bench pipeline` and the chaos
//! suite.
//!
//! | item | what |
//! |---|---|
//! | [`LoadSpec`] | how many signals, over which strategies / accounts, the mix |
//! | [`generate`] | the signals, as the gateway would publish them (pure, no I/O) |
//! | [`LoadSignal`] | one raw signal: subject, `Nats-Msg-Id`, headers, body, what it should become |
//! | [`publish`] | publish a slice at a fixed rate or flat out, retrying until JetStream acked each |
//! | [`measure`] | latency summaries, CPU / peak RSS, reading streams back with store times |
//!
//! The generator is pure and seeded: the same spec gives byte-identical
//! bodies (apart from the receive time stamped at publish), so a run can be
//! compared with its replay. Signals are written in the Mathematricks sender
//! format and wrapped in the gateway's [`RawSignal`] envelope, published on
//! `signals.raw.<env>.<source>` with the gateway's de-duplication id
//! (`<env>.<signal_id>`), so the pipeline cannot tell them from real traffic.
//!
//! The mix: per strategy, a stream of ENTRY signals (a share of them pairs
//! with two legs) and, after each entry, with probability `exit_ratio`, an
//! EXIT of that entry `exit_gap` (+ 0–7) signals later. Every `bad_every`-th signal is a
//! deliberately malformed body (no legs) the standardizer must dead-letter.

pub mod measure;

use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::Utc;
use mtx_runtime::publish::{Outgoing, Publisher};
use mtx_schemas::signal::{ContentFormat, RawSignal};
use mtx_schemas::{headers, ids, Environment};
use mtx_subjects::Subjects;
use rust_decimal::Decimal;
use serde_json::{json, Value};

/// Source name stamped on generated signals.
pub const SOURCE: &str = "mathematricks";

/// Instruments the generator trades (all STOCK, so sizing is simple and
/// margin small): symbol and reference price.
pub const INSTRUMENTS: &[(&str, i64)] = &[
    ("AAPL", 150),
    ("MSFT", 410),
    ("NVDA", 500),
    ("AMZN", 180),
    ("GOOG", 170),
    ("META", 560),
    ("TSLA", 250),
    ("JPM", 200),
];

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadSpec {
    /// Total signals (entries, exits and bad ones).
    pub signals: usize,
    /// Strategy ids (each must be registered and allocated to route).
    pub strategies: Vec<String>,
    /// Environment of the route.
    pub environment: Environment,
    /// Prefix of the sender signal ids: different prefixes never collide.
    pub id_prefix: String,
    /// Share of entries that are pairs (two legs), `0.0..=1.0`.
    pub pairs_ratio: f64,
    /// Share of entries followed by an exit, `0.0..=1.0`.
    pub exit_ratio: f64,
    /// An exit comes at least this many signals after its entry (plus 0–7
    /// more): at a fixed rate, the time a position stays open. A real exit
    /// closes a position that exists; one sent right behind its entry waits
    /// for the entry's fill in Cerebro (a deferral, not processing latency).
    pub exit_gap: usize,
    /// Every n-th signal is malformed (`None`: none).
    pub bad_every: Option<usize>,
    /// Sender account equity written into every signal.
    pub sender_equity: i64,
    /// Seed of the mix.
    pub seed: u64,
}

impl LoadSpec {
    /// A spec with the defaults the benchmark uses.
    pub fn new(signals: usize, strategies: Vec<String>, id_prefix: impl Into<String>) -> Self {
        LoadSpec {
            signals,
            strategies,
            environment: Environment::Staging,
            id_prefix: id_prefix.into(),
            pairs_ratio: 0.2,
            exit_ratio: 0.5,
            exit_gap: 2,
            bad_every: None,
            sender_equity: 1_000_000,
            seed: 7,
        }
    }
}

/// What a generated signal should become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A valid entry with this many legs.
    Entry { legs: usize },
    /// A valid exit of an earlier entry.
    Exit { legs: usize },
    /// Malformed: the standardizer dead-letters it.
    Bad,
}

/// One raw signal, ready to publish.
#[derive(Debug, Clone)]
pub struct LoadSignal {
    /// The mtx signal id the pipeline derives (`ids::signal_id`).
    pub signal_id: String,
    /// Sender's id (`signalID` in the body).
    pub sender_signal_id: String,
    /// Strategy.
    pub strategy: String,
    /// What it should become.
    pub expect: Expect,
    /// `signals.raw.<env>.<source>` (with the topology prefix).
    pub subject: String,
    /// `Nats-Msg-Id`, as the gateway sets it.
    pub msg_id: String,
    /// The sender body (the envelope is built at publish time, when the
    /// receive time is known).
    pub payload: Value,
    /// Size of the published envelope, bytes (for the pass-through chain).
    pub approx_bytes: usize,
}

/// A small, fast, seeded generator (SplitMix64); no `rand` dependency and
/// stable across versions.
#[derive(Debug, Clone)]
pub struct Mix(u64);

impl Mix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Mix(seed)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

fn leg(instrument: &str, price: i64, side: &str, direction: &str, qty: i64) -> Value {
    json!({
        "instrument": instrument,
        "instrument_type": "STOCK",
        "action": side,
        "direction": direction,
        "quantity": qty,
        "order_type": "MARKET",
        "price": price,
    })
}

/// Generate the signals of `spec`, in publish order. Pure.
pub fn generate(spec: &LoadSpec, subjects: &Subjects) -> Result<Vec<LoadSignal>, LoadError> {
    if spec.strategies.is_empty() {
        return Err(LoadError::Spec("no strategies".into()));
    }
    let subject = subjects
        .signals_raw(spec.environment, SOURCE)
        .map_err(|e| LoadError::Spec(e.to_string()))?;
    let mut mix = Mix::new(spec.seed);
    let mut out = Vec::with_capacity(spec.signals);
    // Entries waiting for their exit: (due index, entry body, strategy).
    let mut exits: Vec<(usize, String, String, Vec<Value>)> = Vec::new();
    for i in 0..spec.signals {
        let sender_id = format!("{}-{i}", spec.id_prefix);
        let strategy = spec.strategies[i % spec.strategies.len()].clone();
        let (payload, expect, strategy) =
            if spec.bad_every.is_some_and(|n| n > 0 && (i + 1) % n == 0) {
                let body = json!({
                    "strategy_name": strategy,
                    "signalID": sender_id,
                    "signal_type": "ENTRY",
                    "account_equity": spec.sender_equity,
                    "signal_legs": [],
                });
                (body, Expect::Bad, strategy)
            } else if let Some(pos) = exits.iter().position(|(due, ..)| *due <= i) {
                let (_, entry_id, strategy, legs) = exits.swap_remove(pos);
                let closing: Vec<Value> = legs
                    .iter()
                    .map(|l| {
                        let side = if l["action"] == "BUY" { "SELL" } else { "BUY" };
                        let mut c = l.clone();
                        c["action"] = json!(side);
                        c
                    })
                    .collect();
                let n = closing.len();
                let body = json!({
                    "strategy_name": strategy,
                    "signalID": sender_id,
                    "signal_type": "EXIT",
                    "entry_signal_id": entry_id,
                    "account_equity": spec.sender_equity,
                    "signal_legs": closing,
                });
                (body, Expect::Exit { legs: n }, strategy)
            } else {
                let (a, pa) = INSTRUMENTS[mix.below(INSTRUMENTS.len())];
                let qty = 1 + mix.below(10) as i64;
                let mut legs = vec![leg(a, pa, "BUY", "LONG", qty)];
                if mix.unit() < spec.pairs_ratio {
                    let (b, pb) = INSTRUMENTS[mix.below(INSTRUMENTS.len())];
                    if b != a {
                        legs.push(leg(b, pb, "SELL", "SHORT", 1 + mix.below(5) as i64));
                    }
                }
                if mix.unit() < spec.exit_ratio {
                    let due = i + spec.exit_gap.max(1) + mix.below(8);
                    exits.push((due, sender_id.clone(), strategy.clone(), legs.clone()));
                }
                let n = legs.len();
                let body = json!({
                    "strategy_name": strategy,
                    "signalID": sender_id,
                    "signal_type": "ENTRY",
                    "account_equity": spec.sender_equity,
                    "signal_legs": legs,
                });
                (body, Expect::Entry { legs: n }, strategy)
            };
        let signal_id = ids::signal_id(SOURCE, &strategy, &sender_id);
        let approx_bytes = payload.to_string().len() + 200;
        out.push(LoadSignal {
            msg_id: format!("{}.{signal_id}", spec.environment),
            signal_id,
            sender_signal_id: sender_id,
            strategy,
            expect,
            subject: subject.clone(),
            payload,
            approx_bytes,
        });
    }
    Ok(out)
}

/// Why load could not be generated or published.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The spec is unusable.
    #[error("load spec: {0}")]
    Spec(String),
    /// A signal could not be published within the retry budget.
    #[error("publish {signal_id}: {message}")]
    Publish {
        /// The signal.
        signal_id: String,
        /// Last error.
        message: String,
    },
}

/// The gateway's envelope around a generated body, stamped `now`.
pub fn envelope(s: &LoadSignal, spec_env: Environment) -> Outgoing {
    let now = Utc::now();
    let raw = RawSignal {
        source: SOURCE.to_string(),
        environment: spec_env,
        received_at: now,
        format: ContentFormat::Mathematricks,
        strategy_hint: None,
        instrument_type_hint: None,
        fallback_signal_id: None,
        futures_front_month: false,
        payload: s.payload.clone(),
    };
    let body = serde_json::to_vec(&raw).unwrap_or_default();
    Outgoing::new(s.subject.clone(), s.msg_id.clone(), body)
        .header(headers::SIGNAL_ID, &s.signal_id)
        .header(
            headers::RECEIVED_AT,
            &now.timestamp_nanos_opt().unwrap_or_default().to_string(),
        )
}

/// How [`publish`] paces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as acks come back, `batch` messages per round trip.
    FlatOut {
        /// Messages sent before awaiting their acks.
        batch: usize,
    },
    /// A fixed rate, signals per second.
    Rate(f64),
}

/// Publish `signals` (each retried until JetStream acked it, for up to
/// `give_up` per signal: a broker restart mid-run loses nothing), calling
/// `progress(done)` as it goes. Returns how many the server reported as
/// duplicates.
pub async fn publish(
    js: &jetstream::Context,
    env: Environment,
    signals: &[LoadSignal],
    pace: Pace,
    give_up: Duration,
    mut progress: impl FnMut(usize),
) -> Result<usize, LoadError> {
    let publisher = Publisher::new(js.clone(), None, "load");
    let (batch, interval) = match pace {
        Pace::FlatOut { batch } => (batch.max(1), None),
        Pace::Rate(r) if r > 0.0 => {
            // Small batches keep the rate smooth at high rates.
            let batch = ((r / 1000.0).ceil() as usize).max(1);
            (batch, Some(Duration::from_secs_f64(batch as f64 / r)))
        }
        Pace::Rate(r) => return Err(LoadError::Spec(format!("rate {r} must be > 0"))),
    };
    let started = Instant::now();
    let mut duplicates = 0;
    let mut done = 0;
    for (k, chunk) in signals.chunks(batch).enumerate() {
        if let Some(iv) = interval {
            let due = started + iv * k as u32;
            tokio::time::sleep_until(due.into()).await;
        }
        let mut todo: Vec<&LoadSignal> = chunk.iter().collect();
        let first_try = Instant::now();
        while !todo.is_empty() {
            let outs = todo.iter().map(|s| envelope(s, env)).collect();
            let results = publisher.publish_all(outs).await;
            let mut failed = Vec::new();
            let mut last = String::new();
            for (s, r) in todo.into_iter().zip(results) {
                match r {
                    Ok(p) => {
                        duplicates += usize::from(p.duplicate);
                        done += 1;
                    }
                    Err(e) => {
                        last = e.message;
                        failed.push(s);
                    }
                }
            }
            if let Some(s) = failed.first() {
                if first_try.elapsed() > give_up {
                    return Err(LoadError::Publish {
                        signal_id: s.signal_id.clone(),
                        message: last,
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            todo = failed;
        }
        progress(done);
    }
    Ok(duplicates)
}

/// Total legs the valid signals carry (orders expected if all approved).
pub fn legs(signals: &[LoadSignal]) -> usize {
    signals
        .iter()
        .map(|s| match s.expect {
            Expect::Entry { legs } | Expect::Exit { legs } => legs,
            Expect::Bad => 0,
        })
        .sum()
}

/// Decimal helper for callers computing notional.
pub fn price_of(symbol: &str) -> Option<Decimal> {
    INSTRUMENTS
        .iter()
        .find(|(s, _)| *s == symbol)
        .map(|(_, p)| Decimal::from(*p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: usize) -> LoadSpec {
        let mut s = LoadSpec::new(n, vec!["S1".into(), "S2".into()], "t");
        s.bad_every = Some(10);
        s
    }

    #[test]
    fn deterministic_and_ids_unique() {
        let subj = Subjects::new("");
        let a = generate(&spec(500), &subj).unwrap();
        let b = generate(&spec(500), &subj).unwrap();
        assert_eq!(a.len(), 500);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.payload, y.payload);
            assert_eq!(x.signal_id, y.signal_id);
        }
        let ids: std::collections::BTreeSet<_> = a.iter().map(|s| &s.signal_id).collect();
        assert_eq!(ids.len(), 500);
    }

    #[test]
    fn exits_follow_their_entries_and_mirror_legs() {
        let subj = Subjects::new("");
        let all = generate(&spec(2000), &subj).unwrap();
        let mut seen = std::collections::BTreeMap::new();
        let mut exits = 0;
        for s in &all {
            match s.expect {
                Expect::Entry { .. } => {
                    seen.insert(s.sender_signal_id.clone(), s);
                }
                Expect::Exit { legs } => {
                    exits += 1;
                    let entry = s.payload["entry_signal_id"].as_str().unwrap();
                    let e = seen.remove(entry).expect("exit after its entry, once");
                    assert_eq!(e.strategy, s.strategy);
                    assert_eq!(e.payload["signal_legs"].as_array().unwrap().len(), legs);
                    let el = &e.payload["signal_legs"][0];
                    let xl = &s.payload["signal_legs"][0];
                    assert_eq!(el["instrument"], xl["instrument"]);
                    assert_ne!(el["action"], xl["action"]);
                    assert_eq!(el["quantity"], xl["quantity"]);
                }
                Expect::Bad => {
                    assert!(s.payload["signal_legs"].as_array().unwrap().is_empty())
                }
            }
        }
        assert!(exits > 300, "{exits}");
        assert_eq!(all.iter().filter(|s| s.expect == Expect::Bad).count(), 200);
    }
}
