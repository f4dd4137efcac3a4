//! Process configuration: defaults → `mtx.toml` → `MTX_` environment.
//!
//! Nested keys use `__` in the environment: `MTX_NATS__URL` is `nats.url`.
//! Everything is validated before a worker starts; a bad value stops the
//! process with one line naming the key and the problem.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use mtx_schemas::{Environment, InstrumentType};
use mtx_subjects::TopologySettings;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration problem, rendered as one line for the operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("config error: {0}")]
pub struct ConfigError(pub String);

/// The whole configuration of an mtx process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Environment this deployment serves (`staging` / `production`); it is
    /// stamped on every raw signal and chosen by config, never by a payload.
    pub environment: Environment,
    /// NATS connection.
    pub nats: NatsConfig,
    /// MongoDB connection and database names.
    pub mongo: MongoConfig,
    /// HTTP gateway for signal providers.
    pub gateway: GatewayConfig,
    /// `/metrics`, `/healthz`, `/readyz` listener.
    pub metrics: MetricsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Streams, consumers and buckets.
    pub topology: TopologySettings,
    /// The consume loop.
    pub worker: WorkerConfig,
    /// The execution stage: broker adapter per account, the paper venue.
    pub execution: ExecutionConfig,
    /// The accounts stage: initial balances, instrument specs, publishing.
    pub accounts: AccountsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            environment: Environment::Staging,
            nats: NatsConfig::default(),
            mongo: MongoConfig::default(),
            gateway: GatewayConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            topology: TopologySettings::default(),
            worker: WorkerConfig::default(),
            execution: ExecutionConfig::default(),
            accounts: AccountsConfig::default(),
        }
    }
}

/// How to reach NATS. Credentials come from config or env, never from code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma separated: `nats://127.0.0.1:4222`.
    pub url: String,
    /// Connection name shown in server monitoring.
    pub name: String,
    /// Optional user (with `password`).
    pub user: Option<String>,
    /// Optional password.
    pub password: Option<String>,
    /// Optional token.
    pub token: Option<String>,
    /// Optional `.creds` file (JWT + nkey).
    pub creds_file: Option<PathBuf>,
    /// JetStream API / publish-ack timeout, milliseconds.
    pub request_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            name: "mtx".into(),
            user: None,
            password: None,
            token: None,
            creds_file: None,
            request_timeout_ms: 5_000,
        }
    }
}

/// How to reach MongoDB.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MongoConfig {
    /// Connection string. For the local stand-in add `retryWrites=false`.
    pub uri: String,
    /// The pipeline database (seed 000).
    pub trading_db: String,
    /// The Bot Core database (seed 001).
    pub bot_core_db: String,
    /// The existing signal collector's database: read only, never written.
    pub signals_db: String,
}

impl Default for MongoConfig {
    fn default() -> Self {
        MongoConfig {
            uri: "mongodb://127.0.0.1:27017/?retryWrites=false&directConnection=true".into(),
            trading_db: "mathematricks_trading".into(),
            bot_core_db: "bot_core_db".into(),
            signals_db: "mathematricks_signals".into(),
        }
    }
}

/// The HTTP gateway (signal ingress) and the read-only signal bridge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// `host:port` to listen on.
    pub addr: String,
    /// Source name of `POST /v1/signals` (part of every signal id).
    pub source: String,
    /// Largest accepted request body, bytes (larger → 413).
    pub max_body_bytes: usize,
    /// Sustained requests per second allowed per (source, strategy) (beyond → 429).
    pub rate_limit_per_sec: u32,
    /// Burst size of that rate limit.
    pub rate_limit_burst: u32,
    /// How long a request waits for the JetStream ack before answering 503.
    pub publish_timeout_ms: u64,
    /// Accept FUTURE legs without `expiry` (the executor resolves the front month).
    pub futures_front_month: bool,
    /// Secret hashes per strategy (`mtx secrets set <strategy> --print` makes
    /// one); merged with the Mongo `signal_secrets` collection, config wins.
    pub secrets: BTreeMap<String, String>,
    /// How often the Mongo secret hashes are reloaded, seconds (0 = never use Mongo).
    pub secrets_refresh_secs: u64,
    /// Instrument type assumed for TradingView alerts of a strategy whose body
    /// declares none (TradingView's `{{ticker}}` says nothing about it).
    pub tradingview_instrument_types: BTreeMap<String, InstrumentType>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            addr: "127.0.0.1:8080".into(),
            source: "mathematricks".into(),
            max_body_bytes: 64 * 1024,
            rate_limit_per_sec: 50,
            rate_limit_burst: 100,
            publish_timeout_ms: 2_000,
            futures_front_month: false,
            secrets: BTreeMap::new(),
            secrets_refresh_secs: 30,
            tradingview_instrument_types: BTreeMap::new(),
        }
    }
}

/// The ops listener (`/metrics`, `/healthz`, `/readyz`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// `host:port` to listen on; port 0 picks a free one.
    pub addr: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            addr: "127.0.0.1:9464".into(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line (for log shippers).
    Json,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// `tracing` filter directive, e.g. `info,mtx_runtime=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// The consume loop's knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Messages pulled and handled per batch.
    pub batch_size: usize,
    /// Handlers running at once within a batch.
    pub concurrency: usize,
    /// Idle-heartbeat interval of pull requests, milliseconds.
    pub heartbeat_ms: u64,
    /// Pull request expiry, milliseconds (must exceed 2 × heartbeat).
    pub pull_expires_ms: u64,
    /// Delay before a message whose outputs could not be published is redelivered.
    pub publish_retry_delay_ms: u64,
    /// How long SIGTERM waits for in-flight batches before giving up, seconds.
    pub shutdown_grace_secs: u64,
    /// Liveness fails when a loop has not beaten for this long, seconds.
    pub liveness_timeout_secs: u64,
    /// How long a batch may wait for more messages after its first one, while
    /// the server reports more pending, milliseconds (0 = hand over only what
    /// is already buffered). Never delays a message when nothing else is pending.
    pub batch_linger_ms: u64,
    /// Issue the next pull request as soon as the current one is complete,
    /// while its last batch is handled, so the server keeps delivering
    /// (skipped while batches take longer than a quarter of the ack wait).
    pub prefetch: bool,
    /// Messages in their last this-many allowed deliveries (the consumer's
    /// `max_deliver`; at most `max_deliver - 1` apply) that were not NAKed by
    /// this process are handled one at a time, so a message that crashes the
    /// process cannot take its batch mates to the DLQ with it (0 = off).
    pub isolate_last_deliveries: u32,
    /// Upper bound on the batches a loop hands to one handler at once; a
    /// handler asks for more than one with `Handler::batches_in_flight` (the
    /// sink does: it prepares and sends the next batch while the previous
    /// one waits on MongoDB). 1 = strictly one batch after the other.
    pub max_batches_in_flight: usize,
    /// Dead-letter messages the server gave up on (`max_deliver` reached
    /// without an ack, e.g. the handler crashed the process each time),
    /// reported by the JetStream `MAX_DELIVERIES` advisory.
    pub dlq_on_max_deliveries_advisory: bool,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            batch_size: 256,
            concurrency: 64,
            heartbeat_ms: 2_000,
            pull_expires_ms: 10_000,
            publish_retry_delay_ms: 1_000,
            shutdown_grace_secs: 20,
            liveness_timeout_secs: 60,
            batch_linger_ms: 5,
            prefetch: true,
            max_batches_in_flight: 2,
            isolate_last_deliveries: 2,
            dlq_on_max_deliveries_advisory: true,
        }
    }
}

fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

impl Config {
    /// Figment with the standard layering: defaults, then `file` (default
    /// `mtx.toml`, optional), then `MTX_*` env with `__` nesting.
    pub fn figment(file: Option<&Path>) -> Figment {
        let file = file
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("mtx.toml"));
        Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file(file))
            .merge(Env::prefixed("MTX_").split("__"))
    }

    /// Load and validate; the error is one line naming the key.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    f.display()
                )));
            }
        }
        Self::from_figment(Self::figment(file))
    }

    /// Extract from any figment (tests use `figment::Jail`).
    pub fn from_figment(fig: Figment) -> Result<Config, ConfigError> {
        let cfg: Config = fig.extract().map_err(|e| {
            // figment may chain several errors; the first is the useful one.
            let Some(first) = e.into_iter().next() else {
                return ConfigError("unreadable configuration".into());
            };
            let path: Vec<String> = first
                .path
                .iter()
                .filter(|p| p.as_str() != "default")
                .map(|p| p.to_ascii_lowercase())
                .collect();
            if path.is_empty() {
                return ConfigError(one_line(&first.kind));
            }
            let source = first
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            ConfigError(format!(
                "{} (MTX_{}): {}{source}",
                path.join("."),
                path.join("__").to_ascii_uppercase(),
                one_line(&first.kind)
            ))
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check every value a worker relies on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(s));
        for url in self.nats.url.split(',') {
            let u = url.trim();
            let ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|p| u.starts_with(p) && u.len() > p.len());
            if !ok {
                return bad(format!(
                    "nats.url (MTX_NATS__URL): `{u}` is not a NATS URL (expected nats://host:port)"
                ));
            }
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return bad("nats.user / nats.password: set both or neither".into());
        }
        if let Some(c) = &self.nats.creds_file {
            if !c.exists() {
                return bad(format!("nats.creds_file: {} does not exist", c.display()));
            }
        }
        if self.nats.request_timeout_ms == 0 {
            return bad("nats.request_timeout_ms: must be > 0".into());
        }
        let m = &self.mongo.uri;
        if !(m.starts_with("mongodb://") || m.starts_with("mongodb+srv://")) {
            return bad(format!(
                "mongo.uri (MTX_MONGO__URI): `{m}` is not a MongoDB URI (expected mongodb://...)"
            ));
        }
        for (key, db) in [
            ("mongo.trading_db", &self.mongo.trading_db),
            ("mongo.bot_core_db", &self.mongo.bot_core_db),
        ] {
            if db.is_empty() || db.contains(['/', '\\', '.', ' ', '"', '$']) {
                return bad(format!("{key}: `{db}` is not a valid database name"));
            }
            if *db == self.mongo.signals_db {
                return bad(format!(
                    "{key}: `{db}` is the read-only signal collector database and is never written"
                ));
            }
        }
        for (key, env, addr) in [
            ("gateway.addr", "MTX_GATEWAY__ADDR", &self.gateway.addr),
            ("metrics.addr", "MTX_METRICS__ADDR", &self.metrics.addr),
        ] {
            if addr.parse::<SocketAddr>().is_err() {
                return bad(format!(
                    "{key} ({env}): `{addr}` is not a host:port socket address"
                ));
            }
        }
        let g = &self.gateway;
        if g.source.is_empty() || g.source.contains(['.', '*', '>', ' ']) {
            return bad(format!(
                "gateway.source: `{}` must be a non-empty name without `.`, `*`, `>` or spaces",
                g.source
            ));
        }
        if g.max_body_bytes == 0 || g.rate_limit_per_sec == 0 || g.rate_limit_burst == 0 {
            return bad(
                "gateway.max_body_bytes / rate_limit_per_sec / rate_limit_burst: must be > 0"
                    .into(),
            );
        }
        if g.publish_timeout_ms == 0 {
            return bad("gateway.publish_timeout_ms: must be > 0".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad(format!(
                "log.level: `{}` is not a valid filter",
                self.log.level
            ));
        }
        self.topology.validate().map_err(ConfigError)?;
        let w = &self.worker;
        if w.batch_size == 0 || w.batch_size > 10_000 {
            return bad(format!(
                "worker.batch_size: {} must be between 1 and 10000",
                w.batch_size
            ));
        }
        if w.concurrency == 0 {
            return bad("worker.concurrency: must be >= 1".into());
        }
        if w.heartbeat_ms < 100 || w.pull_expires_ms < 2 * w.heartbeat_ms {
            return bad(format!(
                "worker.pull_expires_ms: {} must be at least twice worker.heartbeat_ms ({}, itself >= 100)",
                w.pull_expires_ms, w.heartbeat_ms
            ));
        }
        if w.batch_linger_ms > 1_000 || w.batch_linger_ms >= w.heartbeat_ms {
            return bad(format!(
                "worker.batch_linger_ms: {} must be at most 1000 and below worker.heartbeat_ms ({})",
                w.batch_linger_ms, w.heartbeat_ms
            ));
        }
        if w.max_batches_in_flight == 0 || w.max_batches_in_flight > 16 {
            return bad(format!(
                "worker.max_batches_in_flight: {} must be between 1 and 16",
                w.max_batches_in_flight
            ));
        }
        if w.isolate_last_deliveries > 100 {
            return bad(format!(
                "worker.isolate_last_deliveries: {} must be at most 100 (it applies below the consumer's max_deliver)",
                w.isolate_last_deliveries
            ));
        }
        if (w.batch_size as i64) > self.topology.max_ack_pending {
            return bad(format!(
                "worker.batch_size: {} exceeds topology.max_ack_pending ({})",
                w.batch_size, self.topology.max_ack_pending
            ));
        }
        self.execution.validate()?;
        self.accounts.validate()?;
        Ok(())
    }
}

// ---- trading stages (execution, accounts) -----------------------------------

/// The execution stage (`[execution]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecutionConfig {
    /// Broker adapter per account, e.g. `IBKR_Main = "paper"` (`paper` is the
    /// only adapter of this build; the execution worker refuses others at start).
    pub adapters: BTreeMap<String, String>,
    /// Adapter of accounts not in `adapters`; empty = their orders are dead-lettered.
    pub default_adapter: String,
    /// Period of the venue clock (expiry of working orders, retry of unpublished
    /// outputs), milliseconds.
    pub tick_ms: u64,
    /// The paper venue.
    pub paper: PaperVenueConfig,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            adapters: BTreeMap::new(),
            default_adapter: "paper".into(),
            tick_ms: 1_000,
            paper: PaperVenueConfig::default(),
        }
    }
}

/// The paper venue's matching parameters (`[execution.paper]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PaperVenueConfig {
    /// Slippage against the trader on MARKET / triggered STOP fills, basis points, `[0, 10000)`.
    pub slippage_bps: Decimal,
    /// Fraction of the remaining quantity filled per fill opportunity, `(0, 1]`;
    /// absent = complete fills.
    pub fill_ratio: Option<Decimal>,
    /// Commission per execution.
    pub commission: CommissionConfig,
    /// Namespaces the venue's order ids (matching uses no randomness).
    pub seed: u64,
    /// Lot size for partial-fill rounding of instruments not in `lot_sizes`.
    pub default_lot: Decimal,
    /// Lot size per instrument, e.g. `BTC = "0.0001"`.
    pub lot_sizes: BTreeMap<String, Decimal>,
}

impl Default for PaperVenueConfig {
    fn default() -> Self {
        PaperVenueConfig {
            slippage_bps: Decimal::ZERO,
            fill_ratio: None,
            commission: CommissionConfig::default(),
            seed: 0,
            default_lot: Decimal::ONE,
            lot_sizes: BTreeMap::new(),
        }
    }
}

/// How a commission is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommissionKind {
    /// `rate` per share / unit.
    PerShare,
    /// `rate` per contract.
    PerContract,
    /// `rate` basis points of the fill notional (`qty * price * multiplier`).
    Bps,
}

/// Commission model (`[execution.paper.commission]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommissionConfig {
    /// `per_share`, `per_contract` or `bps`.
    pub model: CommissionKind,
    /// The rate (non-negative).
    pub rate: Decimal,
    /// Minimum charge per execution, if any.
    pub minimum: Option<Decimal>,
}

impl Default for CommissionConfig {
    fn default() -> Self {
        CommissionConfig {
            model: CommissionKind::PerShare,
            rate: Decimal::ZERO,
            minimum: None,
        }
    }
}

impl ExecutionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(s));
        if self.tick_ms == 0 {
            return bad("execution.tick_ms: must be > 0".into());
        }
        for (account, adapter) in &self.adapters {
            if account.is_empty() || adapter.is_empty() {
                return bad(format!(
                    "execution.adapters: `{account}` = `{adapter}`: account and adapter must be non-empty"
                ));
            }
        }
        let p = &self.paper;
        if p.slippage_bps < Decimal::ZERO || p.slippage_bps >= Decimal::from(10_000) {
            return bad(format!(
                "execution.paper.slippage_bps: {} must be in [0, 10000)",
                p.slippage_bps
            ));
        }
        if let Some(r) = p.fill_ratio {
            if r <= Decimal::ZERO || r > Decimal::ONE {
                return bad(format!("execution.paper.fill_ratio: {r} must be in (0, 1]"));
            }
        }
        if p.default_lot <= Decimal::ZERO || p.lot_sizes.values().any(|l| *l <= Decimal::ZERO) {
            return bad("execution.paper.default_lot / lot_sizes: lots must be > 0".into());
        }
        let c = &p.commission;
        if c.rate < Decimal::ZERO || c.minimum.is_some_and(|m| m < Decimal::ZERO) {
            return bad("execution.paper.commission: rate and minimum must be >= 0".into());
        }
        Ok(())
    }
}

/// The accounts stage (`[accounts]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsConfig {
    /// Starting cash of accounts not in `initial_balances`.
    pub default_initial_balance: Decimal,
    /// Starting cash per account, e.g. `IBKR_Main = "1000000"`. Listed
    /// accounts get a state published even before their first fill.
    pub initial_balances: BTreeMap<String, Decimal>,
    /// Contract multiplier and margin per instrument; others use the defaults
    /// of their instrument type.
    pub instruments: BTreeMap<String, InstrumentConfig>,
    /// Every account's state is re-published this often, seconds.
    pub publish_interval_secs: u64,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            default_initial_balance: Decimal::ZERO,
            initial_balances: BTreeMap::new(),
            instruments: BTreeMap::new(),
            publish_interval_secs: 60,
        }
    }
}

/// One instrument's spec (`[accounts.instruments.<symbol>]`): exactly one
/// margin model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstrumentConfig {
    /// Value of one point per contract (1 for stocks, 100 for GC).
    pub multiplier: Decimal,
    /// Margin as a fraction of notional at the mark (`0.25` = 25 %).
    pub margin_fraction: Option<Decimal>,
    /// Margin as a fixed amount per contract.
    pub margin_per_contract: Option<Decimal>,
}

impl Default for InstrumentConfig {
    fn default() -> Self {
        InstrumentConfig {
            multiplier: Decimal::ONE,
            margin_fraction: None,
            margin_per_contract: None,
        }
    }
}

impl AccountsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(s));
        if self.publish_interval_secs == 0 {
            return bad("accounts.publish_interval_secs: must be > 0".into());
        }
        if self.initial_balances.keys().any(String::is_empty) {
            return bad("accounts.initial_balances: account names must be non-empty".into());
        }
        for (symbol, i) in &self.instruments {
            if i.multiplier <= Decimal::ZERO {
                return bad(format!(
                    "accounts.instruments.{symbol}.multiplier: {} must be > 0",
                    i.multiplier
                ));
            }
            match (i.margin_fraction, i.margin_per_contract) {
                (Some(f), None) if f >= Decimal::ZERO => {}
                (None, Some(a)) if a >= Decimal::ZERO => {}
                _ => {
                    return bad(format!(
                        "accounts.instruments.{symbol}: set exactly one of margin_fraction / margin_per_contract (>= 0)"
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's own error type
mod tests {
    use super::*;
    use figment::Jail;

    #[test]
    fn layering_defaults_file_env() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "mtx.toml",
                "environment = \"production\"\n[worker]\nbatch_size = 32\n",
            )?;
            jail.set_env("MTX_NATS__URL", "nats://10.0.0.1:4222");
            jail.set_env("MTX_WORKER__BATCH_SIZE", "64");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.environment, Environment::Production);
            assert_eq!(c.nats.url, "nats://10.0.0.1:4222");
            assert_eq!(c.worker.batch_size, 64, "env beats file");
            assert_eq!(c.mongo.trading_db, "mathematricks_trading");
            Ok(())
        });
    }

    #[test]
    fn errors_are_one_line_and_name_the_key() {
        Jail::expect_with(|jail| {
            jail.set_env("MTX_NATS__URL", "localhost:4222");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(
                e.starts_with("config error: nats.url (MTX_NATS__URL)"),
                "{e}"
            );
            assert!(!e.contains('\n'));
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("MTX_WORKER__BATCH_SIZE", "lots");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(
                e.starts_with(
                    "config error: worker.batch_size (MTX_WORKER__BATCH_SIZE): invalid type"
                ),
                "{e}"
            );
            assert!(!e.contains('\n'));
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("MTX_NATS__ULR", "nats://x:1");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("ulr"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("MTX_MONGO__TRADING_DB", "mathematricks_signals");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("never written"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn batching_and_dlq_knobs() {
        let d = WorkerConfig::default();
        assert_eq!(d.batch_linger_ms, 5);
        assert!(d.prefetch);
        assert_eq!(d.max_batches_in_flight, 2);
        assert_eq!(d.isolate_last_deliveries, 2);
        assert!(d.dlq_on_max_deliveries_advisory);
        Jail::expect_with(|jail| {
            jail.create_file(
                "mtx.toml",
                "[worker]\nbatch_linger_ms = 0\nprefetch = false\nisolate_last_deliveries = 0\n",
            )?;
            jail.set_env("MTX_WORKER__DLQ_ON_MAX_DELIVERIES_ADVISORY", "false");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.worker.batch_linger_ms, 0, "0 keeps the old behaviour");
            assert!(!c.worker.prefetch);
            assert_eq!(c.worker.isolate_last_deliveries, 0);
            assert!(!c.worker.dlq_on_max_deliveries_advisory);
            Ok(())
        });
        for (var, value, key) in [
            (
                "MTX_WORKER__BATCH_LINGER_MS",
                "2000",
                "worker.batch_linger_ms",
            ),
            (
                "MTX_WORKER__ISOLATE_LAST_DELIVERIES",
                "101",
                "worker.isolate_last_deliveries",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.starts_with(&format!("config error: {key}")), "{e}");
                Ok(())
            });
        }
        // The linger stays below the heartbeat, so it never hides a dead server.
        Jail::expect_with(|jail| {
            jail.set_env("MTX_WORKER__HEARTBEAT_MS", "200");
            jail.set_env("MTX_WORKER__PULL_EXPIRES_MS", "1000");
            jail.set_env("MTX_WORKER__BATCH_LINGER_MS", "200");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("worker.batch_linger_ms"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn trading_sections_parse_and_validate() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "mtx.toml",
                r#"
[execution]
default_adapter = ""
adapters = { IBKR_Main = "paper" }
[execution.paper]
slippage_bps = 5
fill_ratio = "0.5"
commission = { model = "per_contract", rate = 2.5, minimum = "1" }
[accounts]
initial_balances = { IBKR_Main = "1000000" }
[accounts.instruments.GC]
multiplier = 100
margin_per_contract = "16500"
"#,
            )?;
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.execution.adapters["IBKR_Main"], "paper");
            assert_eq!(c.execution.paper.slippage_bps, Decimal::from(5));
            assert_eq!(c.execution.paper.fill_ratio, Some(Decimal::new(5, 1)));
            assert_eq!(
                c.execution.paper.commission.model,
                CommissionKind::PerContract
            );
            assert_eq!(c.execution.paper.commission.rate, Decimal::new(25, 1));
            assert_eq!(
                c.accounts.initial_balances["IBKR_Main"],
                Decimal::from(1_000_000)
            );
            assert_eq!(c.accounts.instruments["GC"].multiplier, Decimal::from(100));
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.set_env("MTX_EXECUTION__PAPER__FILL_RATIO", "1.5");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("execution.paper.fill_ratio"), "{e}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            jail.create_file("mtx.toml", "[accounts.instruments.GC]\nmultiplier = 100\n")?;
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("accounts.instruments.GC"), "{e}");
            Ok(())
        });
    }
}
