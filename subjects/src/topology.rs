//! Streams, consumers and KV buckets, as pure data.
//!
//! [`Topology::build`] turns [`TopologySettings`] (from config) into the exact
//! server objects mtx needs. Nothing here talks to a server; see
//! [`crate::apply`] for that.
//!
//! | stream | subjects | retention |
//! |---|---|---|
//! | `SIGNALS_RAW` | `signals.raw.>` | `max_age` |
//! | `SIGNALS_STANDARDIZED` | `signals.standardized.>` | `max_age` |
//! | `CEREBRO_DECISIONS` | `cerebro.decisions.>` | `max_age` |
//! | `ORDERS` | `orders.*.new`, `orders.*.cancel` | `max_age` |
//! | `ORDER_EVENTS` | `orders.*.events` | `max_age` |
//! | `EXECUTIONS` | `executions.>` | forever (the account ledger replays it) |
//! | `ACCOUNTS` | `accounts.>` | `max_age` |
//! | `MARKET` | `market.>` | `market_max_age`, 1,000 per subject |
//! | `AUDIT` | `audit.>` | `max_age` |
//! | `DLQ` | `dlq.>` | `dlq_max_age` |

use async_nats::jetstream::{consumer, kv, stream};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Operator-tunable knobs of the topology (the `[topology]` config section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologySettings {
    /// One subject token put in front of every subject (and, uppercased, every
    /// stream and bucket name). Empty in production; tests use a fresh one each.
    pub prefix: String,
    /// Stream / KV replicas (1 locally, 3 on a production NATS cluster).
    pub replicas: usize,
    /// Age limit of the pipeline streams, seconds.
    pub max_age_secs: u64,
    /// Age limit of `MARKET`, seconds.
    pub market_max_age_secs: u64,
    /// Age limit of `DLQ`, seconds.
    pub dlq_max_age_secs: u64,
    /// JetStream `Nats-Msg-Id` de-duplication window, seconds.
    pub duplicate_window_secs: u64,
    /// Age limit of `SIGNALS_STANDARDIZED`, seconds: a signal re-sent within
    /// this long after it was standardized is recognised and not standardized
    /// again (the stream holds one subject per signal).
    pub standardized_max_age_secs: u64,
    /// Consumer ack wait (the first delivery's budget), seconds.
    pub ack_wait_secs: u64,
    /// Deliveries before the consume loop dead-letters a message.
    pub max_deliver: i64,
    /// Put [`TopologySettings::backoff`] on consumers (off: see its doc).
    pub redelivery_backoff: bool,
    /// Outstanding unacked messages per consumer, shared by all its replicas.
    pub max_ack_pending: i64,
}

impl Default for TopologySettings {
    fn default() -> Self {
        TopologySettings {
            prefix: String::new(),
            replicas: 1,
            max_age_secs: 7 * 24 * 3600,
            market_max_age_secs: 24 * 3600,
            dlq_max_age_secs: 30 * 24 * 3600,
            duplicate_window_secs: 120,
            standardized_max_age_secs: 30 * 24 * 3600,
            ack_wait_secs: 30,
            max_deliver: 10,
            redelivery_backoff: false,
            max_ack_pending: 20_000,
        }
    }
}

impl TopologySettings {
    /// Check the settings; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if !self.prefix.is_empty()
            && !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!(
                "topology.prefix: `{}` must be one subject token of letters, digits, `_` or `-`",
                self.prefix
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(format!(
                "topology.replicas: {} must be between 1 and 5",
                self.replicas
            ));
        }
        if self.duplicate_window_secs == 0 || self.duplicate_window_secs > self.max_age_secs {
            return Err(format!(
                "topology.duplicate_window_secs: {} must be > 0 and <= topology.max_age_secs ({})",
                self.duplicate_window_secs, self.max_age_secs
            ));
        }
        if self.standardized_max_age_secs < self.duplicate_window_secs {
            return Err(format!(
                "topology.standardized_max_age_secs: {} must be >= topology.duplicate_window_secs ({})",
                self.standardized_max_age_secs, self.duplicate_window_secs
            ));
        }
        if self.ack_wait_secs == 0 {
            return Err("topology.ack_wait_secs: must be > 0".into());
        }
        if self.max_deliver < 2 {
            return Err(format!(
                "topology.max_deliver: {} must be >= 2",
                self.max_deliver
            ));
        }
        if self.max_ack_pending < 1 {
            return Err(format!(
                "topology.max_ack_pending: {} must be >= 1",
                self.max_ack_pending
            ));
        }
        Ok(())
    }

    /// Redelivery schedule after an unacknowledged delivery (crash, timeout):
    /// the first wait is the full ack wait, then it doubles, capped at 10 min.
    ///
    /// Only used when `redelivery_backoff` is on: nats-server 2.15 also adds
    /// `backoff[n-1] - ack_wait` to explicit NAK delays from the second
    /// redelivery on (a 100 ms NAK came back after 5 s), which breaks the
    /// consume loop's retry-after contract, so it is off by default.
    pub fn backoff(&self) -> Vec<Duration> {
        let n = (self.max_deliver - 1).clamp(1, 6) as u32;
        (0..n)
            .map(|i| {
                Duration::from_secs((self.ack_wait_secs << i).min(600).max(self.ack_wait_secs))
            })
            .collect()
    }

    fn stream_name(&self, base: &str) -> String {
        if self.prefix.is_empty() {
            base.to_string()
        } else {
            format!("{}_{base}", self.prefix.to_ascii_uppercase())
        }
    }

    fn subject(&self, s: &str) -> String {
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            format!("{}.{s}", self.prefix)
        }
    }
}

/// One stream: a name, its subjects and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    /// Stream name without prefix, e.g. `SIGNALS_RAW`.
    pub base: &'static str,
    /// The server-side config.
    pub config: stream::Config,
}

/// One durable pull consumer of a worker pool.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerSpec {
    /// Worker pool (process role) that binds it, e.g. `standardizer`, `sink`.
    pub pool: &'static str,
    /// Stream name (with prefix).
    pub stream: String,
    /// The server-side config (durable name inside).
    pub config: consumer::pull::Config,
}

impl ConsumerSpec {
    /// The durable consumer name.
    pub fn durable(&self) -> &str {
        self.config.durable_name.as_deref().unwrap_or_default()
    }
}

/// One KV bucket of live configuration / state.
#[derive(Debug, Clone)]
pub struct KvSpec {
    /// Bucket name without prefix, e.g. `strategies`.
    pub base: &'static str,
    /// The server-side config.
    pub config: kv::Config,
}

/// Everything `mtx topology apply` creates.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The settings it was built from.
    pub settings: TopologySettings,
    /// Streams, in creation order.
    pub streams: Vec<StreamSpec>,
    /// Durable consumers, each on one of `streams`.
    pub consumers: Vec<ConsumerSpec>,
    /// KV buckets.
    pub kv: Vec<KvSpec>,
}

/// Stream base names, as constants so workers never spell them twice.
pub mod streams {
    /// `signals.raw.>`
    pub const SIGNALS_RAW: &str = "SIGNALS_RAW";
    /// `signals.standardized.>`
    pub const SIGNALS_STANDARDIZED: &str = "SIGNALS_STANDARDIZED";
    /// `cerebro.decisions.>`
    pub const CEREBRO_DECISIONS: &str = "CEREBRO_DECISIONS";
    /// `orders.*.new`, `orders.*.cancel`
    pub const ORDERS: &str = "ORDERS";
    /// `orders.*.events`
    pub const ORDER_EVENTS: &str = "ORDER_EVENTS";
    /// `executions.>`
    pub const EXECUTIONS: &str = "EXECUTIONS";
    /// `accounts.>`
    pub const ACCOUNTS: &str = "ACCOUNTS";
    /// `market.>`
    pub const MARKET: &str = "MARKET";
    /// `audit.>`
    pub const AUDIT: &str = "AUDIT";
    /// `dlq.>`
    pub const DLQ: &str = "DLQ";
}

/// KV bucket base names.
pub mod buckets {
    /// Strategy configurations, key = encoded strategy id.
    pub const STRATEGIES: &str = "strategies";
    /// The ACTIVE portfolio allocation, key `active`.
    pub const ALLOCATIONS: &str = "allocations";
    /// Global system config (kill switch, leverage caps).
    pub const SYSTEM: &str = "system";
    /// Latest account state per account (CAS for margin reservations).
    pub const ACCOUNT_STATE: &str = "account_state";
    /// The execution stage's venue state and output outbox (compare-and-set).
    pub const EXECUTION_STATE: &str = "execution_state";
}

impl Topology {
    /// Build the full topology from settings.
    pub fn build(settings: &TopologySettings) -> Topology {
        use streams::*;
        let s = settings;
        let age = Duration::from_secs(s.max_age_secs);
        let mk = |base: &'static str, subjects: &[&str], max_age: Duration, per_subject: i64| {
            StreamSpec {
                base,
                config: stream::Config {
                    name: s.stream_name(base),
                    subjects: subjects.iter().map(|x| s.subject(x)).collect(),
                    retention: stream::RetentionPolicy::Limits,
                    storage: stream::StorageType::File,
                    discard: stream::DiscardPolicy::Old,
                    max_age,
                    max_messages_per_subject: per_subject,
                    duplicate_window: Duration::from_secs(s.duplicate_window_secs),
                    num_replicas: s.replicas,
                    description: Some(format!("mtx {}", base.to_ascii_lowercase())),
                    ..Default::default()
                },
            }
        };
        let streams = vec![
            mk(SIGNALS_RAW, &["signals.raw.>"], age, -1),
            mk(
                SIGNALS_STANDARDIZED,
                &["signals.standardized.>"],
                Duration::from_secs(s.standardized_max_age_secs),
                -1,
            ),
            mk(CEREBRO_DECISIONS, &["cerebro.decisions.>"], age, -1),
            mk(ORDERS, &["orders.*.new", "orders.*.cancel"], age, -1),
            mk(ORDER_EVENTS, &["orders.*.events"], age, -1),
            mk(EXECUTIONS, &["executions.>"], Duration::ZERO, -1),
            mk(ACCOUNTS, &["accounts.>"], age, -1),
            mk(
                MARKET,
                &["market.>"],
                Duration::from_secs(s.market_max_age_secs),
                1000,
            ),
            mk(AUDIT, &["audit.>"], age, -1),
            mk(DLQ, &["dlq.>"], Duration::from_secs(s.dlq_max_age_secs), -1),
        ];

        let consumer =
            |pool: &'static str, durable: &str, stream: &str, filters: &[&str]| ConsumerSpec {
                pool,
                stream: s.stream_name(stream),
                config: consumer::pull::Config {
                    durable_name: Some(durable.to_string()),
                    description: Some(format!("mtx {pool} pool")),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(s.ack_wait_secs),
                    max_deliver: s.max_deliver,
                    backoff: if s.redelivery_backoff {
                        s.backoff()
                    } else {
                        Vec::new()
                    },
                    max_ack_pending: s.max_ack_pending,
                    filter_subjects: filters.iter().map(|x| s.subject(x)).collect(),
                    ..Default::default()
                },
            };
        let mut consumers = vec![
            consumer(
                "standardizer",
                "standardizer",
                SIGNALS_RAW,
                &["signals.raw.>"],
            ),
            consumer(
                "cerebro",
                "cerebro",
                SIGNALS_STANDARDIZED,
                &["signals.standardized.>"],
            ),
            consumer(
                "execution",
                "execution",
                ORDERS,
                &["orders.*.new", "orders.*.cancel"],
            ),
            consumer("accounts", "accounts", EXECUTIONS, &["executions.>"]),
        ];
        // ---- execution / accounts side inputs (issue 5) ----
        // Marks: only prices published from now on (a first deploy must not
        // match resting orders against a day-old tick).
        for (pool, durable) in [
            ("execution", "execution_market"),
            ("accounts", "accounts_market"),
        ] {
            let mut c = consumer(pool, durable, MARKET, &["market.prices.>"]);
            c.config.deliver_policy = consumer::DeliverPolicy::New;
            consumers.push(c);
        }
        // Working orders for the account state's `open_orders`.
        consumers.push(consumer(
            "accounts",
            "accounts_orders",
            ORDERS,
            &["orders.*.new"],
        ));
        consumers.push(consumer(
            "accounts",
            "accounts_order_events",
            ORDER_EVENTS,
            &["orders.*.events"],
        ));
        // ---- end execution / accounts ----
        // The sink persists every stream except raw market ticks (market_data is
        // written from candles by its own stage).
        for st in &streams {
            if st.base == MARKET {
                continue;
            }
            let durable = format!("sink_{}", st.base.to_ascii_lowercase());
            let subjects: Vec<String> = st.config.subjects.clone();
            let mut c = consumer("sink", &durable, st.base, &[]);
            c.config.filter_subjects = subjects;
            consumers.push(c);
        }

        let bucket = |base: &'static str, history: i64, desc: &str| KvSpec {
            base,
            config: kv::Config {
                bucket: if s.prefix.is_empty() {
                    base.to_string()
                } else {
                    format!("{}_{base}", s.prefix)
                },
                description: desc.to_string(),
                history,
                storage: stream::StorageType::File,
                num_replicas: s.replicas,
                ..Default::default()
            },
        };
        let kv = vec![
            bucket(
                buckets::STRATEGIES,
                5,
                "mtx strategy configurations (mirror of strategy_configurations)",
            ),
            bucket(
                buckets::ALLOCATIONS,
                5,
                "mtx ACTIVE portfolio allocation (mirror of portfolio_allocations)",
            ),
            bucket(
                buckets::SYSTEM,
                5,
                "mtx global system config: kill switch, leverage caps",
            ),
            bucket(
                buckets::ACCOUNT_STATE,
                1,
                "mtx latest account state per account",
            ),
            bucket(
                buckets::EXECUTION_STATE,
                1,
                "mtx execution venue state and outbox (written before inputs are acked)",
            ),
        ];
        Topology {
            settings: settings.clone(),
            streams,
            consumers,
            kv,
        }
    }

    /// The stream with this base name.
    pub fn stream(&self, base: &str) -> Option<&StreamSpec> {
        self.streams.iter().find(|s| s.base == base)
    }

    /// The consumer with this durable name.
    pub fn consumer(&self, durable: &str) -> Option<&ConsumerSpec> {
        self.consumers.iter().find(|c| c.durable() == durable)
    }

    /// The consumers a worker pool binds.
    pub fn pool_consumers<'a>(
        &'a self,
        pool: &'a str,
    ) -> impl Iterator<Item = &'a ConsumerSpec> + 'a {
        self.consumers.iter().filter(move |c| c.pool == pool)
    }

    /// Full bucket name (with prefix) of a KV base name.
    pub fn bucket(&self, base: &str) -> Option<&str> {
        self.kv
            .iter()
            .find(|k| k.base == base)
            .map(|k| k.config.bucket.as_str())
    }

    /// Full stream name (with prefix) of a base name.
    pub fn stream_name(&self, base: &str) -> String {
        self.settings.stream_name(base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_build() {
        let s = TopologySettings::default();
        s.validate().unwrap();
        let t = Topology::build(&s);
        assert_eq!(t.streams.len(), 10);
        assert!(t.consumer("standardizer").is_some());
        assert!(t.consumer("sink_dlq").is_some());
        assert!(t.consumer("sink_market").is_none());
        assert_eq!(
            t.stream(streams::EXECUTIONS).unwrap().config.max_age,
            Duration::ZERO
        );
        // no consumer backoff by default (it distorts NAK delays); when on, it
        // starts at the full ack wait and is shorter than max_deliver
        assert!(t.consumer("cerebro").unwrap().config.backoff.is_empty());
        let b = s.backoff();
        assert_eq!(b[0], Duration::from_secs(30));
        assert!((b.len() as i64) < s.max_deliver);
    }

    #[test]
    fn prefix_applies_everywhere() {
        let s = TopologySettings {
            prefix: "t9".into(),
            ..Default::default()
        };
        let t = Topology::build(&s);
        assert_eq!(t.stream(streams::ORDERS).unwrap().config.name, "T9_ORDERS");
        assert_eq!(
            t.stream(streams::ORDERS).unwrap().config.subjects,
            vec!["t9.orders.*.new", "t9.orders.*.cancel"]
        );
        assert_eq!(
            t.consumer("cerebro").unwrap().stream,
            "T9_SIGNALS_STANDARDIZED"
        );
        assert_eq!(t.bucket(buckets::SYSTEM), Some("t9_system"));
        assert_eq!(
            t.stream(streams::SIGNALS_STANDARDIZED)
                .unwrap()
                .config
                .max_age,
            Duration::from_secs(30 * 24 * 3600),
            "re-sends are recognised for 30 days"
        );
    }

    #[test]
    fn validation_names_the_key() {
        let bad = TopologySettings {
            prefix: "a.b".into(),
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().starts_with("topology.prefix"));
        let bad = TopologySettings {
            duplicate_window_secs: 0,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .starts_with("topology.duplicate_window_secs"));
    }
}
