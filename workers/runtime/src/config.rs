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
    /// The Cerebro stage: reservations, deferred exits, backtests, janitor.
    pub cerebro: CerebroConfig,
    /// The sink stage: how hard it may press on MongoDB.
    pub sink: SinkConfig,
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
            cerebro: CerebroConfig::default(),
            sink: SinkConfig::default(),
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
        self.cerebro.validate()?;
        self.sink.validate()?;
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

/// The sink stage (`[sink]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SinkConfig {
    /// At most this many batches of one sink process write to MongoDB at
    /// once (each consumer also waits for its own previous batch). Two suit
    /// a CPU-bound single server; a MongoDB with cores to spare takes more.
    pub writers: usize,
    /// Time limit of one MongoDB operation, seconds. Unset: the ack wait
    /// clamped to 10–60 s. A batch's messages stay in progress meanwhile, so
    /// a longer limit only lets a slow server finish instead of being sent
    /// the same write again (the local stand-in under load needs it).
    pub op_timeout_secs: Option<u64>,
}

impl SinkConfig {
    /// Largest accepted `writers`: one per sink consumer is already more
    /// than a server gains from.
    pub const MAX_WRITERS: usize = 64;

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=Self::MAX_WRITERS).contains(&self.writers) {
            return Err(ConfigError(format!(
                "sink.writers (MTX_SINK__WRITERS): {} must be between 1 and {}",
                self.writers,
                Self::MAX_WRITERS
            )));
        }
        if let Some(t) = self.op_timeout_secs.filter(|t| !(1..=600).contains(t)) {
            return Err(ConfigError(format!(
                "sink.op_timeout_secs (MTX_SINK__OP_TIMEOUT_SECS): {t} must be between 1 and 600"
            )));
        }
        Ok(())
    }
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            writers: 2,
            op_timeout_secs: None,
        }
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
    /// An account's state is stored and published at most once per this
    /// many milliseconds; changes within the window are coalesced and the
    /// latest state goes out when it ends (0 = as fast as publishing goes).
    pub publish_coalesce_ms: u64,
    /// Encoded state an account may publish per second, bytes (0 = no
    /// limit). After a state of `B` bytes the account's next state waits at
    /// least `B / publish_bytes_per_sec` (at least the coalescing window, at
    /// most 10 s), so a large book (hundreds of positions and working
    /// orders) is not re-encoded, stored and sent every window under load.
    pub publish_bytes_per_sec: u64,
    /// A finished order is remembered (so a late copy cannot reopen it) until
    /// events this many seconds newer than its end have been seen (1 s to
    /// [`MAX_FINISHED_ORDER_RETENTION_SECS`], 10 years).
    pub finished_order_retention_secs: u64,
    /// At most this many finished orders are remembered (oldest dropped first).
    pub finished_orders_max: usize,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            default_initial_balance: Decimal::ZERO,
            initial_balances: BTreeMap::new(),
            instruments: BTreeMap::new(),
            publish_interval_secs: 60,
            publish_coalesce_ms: 25,
            publish_bytes_per_sec: 1_000_000,
            finished_order_retention_secs: 300,
            finished_orders_max: 200_000,
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
    /// The asset class this entry describes (`FUTURE` for a futures root);
    /// a signal or fill of the same symbol in another class (the stock `CL`
    /// against the crude future `CL`) gets its class defaults instead.
    /// Absent: every class.
    pub instrument_type: Option<mtx_schemas::InstrumentType>,
}

impl Default for InstrumentConfig {
    fn default() -> Self {
        InstrumentConfig {
            multiplier: Decimal::ONE,
            margin_fraction: None,
            margin_per_contract: None,
            instrument_type: None,
        }
    }
}

/// Upper bound of `accounts.finished_order_retention_secs`: 10 years.
pub const MAX_FINISHED_ORDER_RETENTION_SECS: u64 = 315_360_000;

impl AccountsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(s));
        if self.publish_interval_secs == 0 {
            return bad("accounts.publish_interval_secs: must be > 0".into());
        }
        if self.publish_coalesce_ms > 10_000 {
            return bad(format!(
                "accounts.publish_coalesce_ms: {} must be <= 10000 (Cerebro sizes from this state)",
                self.publish_coalesce_ms
            ));
        }
        if (1..10_000).contains(&self.publish_bytes_per_sec) {
            return bad(format!(
                "accounts.publish_bytes_per_sec (MTX_ACCOUNTS__PUBLISH_BYTES_PER_SEC): {} must be 0 (no limit) or >= 10000",
                self.publish_bytes_per_sec
            ));
        }
        if self.finished_order_retention_secs == 0 {
            return bad("accounts.finished_order_retention_secs: must be > 0".into());
        }
        if self.finished_order_retention_secs > MAX_FINISHED_ORDER_RETENTION_SECS {
            return bad(format!(
                "accounts.finished_order_retention_secs (MTX_ACCOUNTS__FINISHED_ORDER_RETENTION_SECS): {} must be <= {MAX_FINISHED_ORDER_RETENTION_SECS} (10 years)",
                self.finished_order_retention_secs
            ));
        }
        if self.finished_orders_max == 0 {
            return bad("accounts.finished_orders_max: must be > 0".into());
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

// ---- cerebro ------------------------------------------------------------------

/// The Cerebro stage (`[cerebro]`); what each key does is in the README's
/// configuration table and `mtx_cerebro::worker`'s module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CerebroConfig {
    /// Backtest reload period, seconds.
    pub backtest_refresh_secs: u64,
    /// Backtest retry period while nothing is loaded, seconds.
    pub backtest_retry_secs: u64,
    /// Mongo server selection / connect timeout of the backtest loader, milliseconds.
    pub mongo_timeout_ms: u64,
    /// Start-up wait for the latest marks, milliseconds.
    pub marks_initial_wait_ms: u64,
    /// Start-up wait for the order events and executions replayed since
    /// the oldest reservation, milliseconds.
    pub evidence_initial_wait_ms: u64,
    /// Fallback settlement of a reserved order never seen working and
    /// without a known end, seconds.
    pub unbooked_grace_secs: u64,
    /// Settlement of a filled order after its terminal order event, seconds.
    pub booking_grace_secs: u64,
    /// Safety prune of reservations, seconds.
    pub reservation_max_age_secs: u64,
    /// Most approved-but-unbooked entries per account.
    pub reservation_max_entries: usize,
    /// How long an EXIT / CANCEL waits for its entry, seconds.
    pub entry_wait_secs: u64,
    /// Retention of a finished entry's `entries.*` / `exits.*` keys, seconds.
    pub entry_done_retention_secs: u64,
    /// Retention of any entry's keys, seconds.
    pub entry_max_age_secs: u64,
    /// Janitor period, seconds.
    pub janitor_interval_secs: u64,
    /// Redelivery delay of a deferred exit / cancel for its first
    /// `defer_fast_retries` deferrals, milliseconds.
    pub defer_retry_ms: u64,
    /// Deferrals retried after `defer_retry_ms`; later ones back off.
    pub defer_fast_retries: u32,
    /// First back-off delay after the fast retries (doubles per delivery), milliseconds.
    pub defer_backoff_ms: u64,
    /// Largest redelivery delay of a deferred signal, milliseconds.
    pub defer_max_ms: u64,
}

impl Default for CerebroConfig {
    fn default() -> Self {
        CerebroConfig {
            backtest_refresh_secs: 300,
            backtest_retry_secs: 10,
            mongo_timeout_ms: 3_000,
            marks_initial_wait_ms: 3_000,
            evidence_initial_wait_ms: 20_000,
            unbooked_grace_secs: 30,
            booking_grace_secs: 1,
            reservation_max_age_secs: 86_400,
            reservation_max_entries: 4_000,
            entry_wait_secs: 300,
            entry_done_retention_secs: 86_400,
            entry_max_age_secs: 30 * 86_400,
            janitor_interval_secs: 600,
            defer_retry_ms: 250,
            defer_fast_retries: 4,
            defer_backoff_ms: 4_000,
            defer_max_ms: 30_000,
        }
    }
}

impl CerebroConfig {
    /// Check the values; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |s: String| Err(ConfigError(s));
        for (key, v) in [
            ("backtest_refresh_secs", self.backtest_refresh_secs),
            ("backtest_retry_secs", self.backtest_retry_secs),
            ("mongo_timeout_ms", self.mongo_timeout_ms),
            ("reservation_max_age_secs", self.reservation_max_age_secs),
            ("entry_max_age_secs", self.entry_max_age_secs),
            ("janitor_interval_secs", self.janitor_interval_secs),
            ("defer_retry_ms", self.defer_retry_ms),
            ("defer_backoff_ms", self.defer_backoff_ms),
            ("defer_max_ms", self.defer_max_ms),
        ] {
            if v == 0 {
                return bad(format!(
                    "cerebro.{key} (MTX_CEREBRO__{}): must be > 0",
                    key.to_ascii_uppercase()
                ));
            }
        }
        if self.reservation_max_entries == 0 {
            return bad(
                "cerebro.reservation_max_entries (MTX_CEREBRO__RESERVATION_MAX_ENTRIES): must be > 0"
                    .into(),
            );
        }
        if self.unbooked_grace_secs >= self.reservation_max_age_secs {
            return bad(format!(
                "cerebro.unbooked_grace_secs: {} must be below cerebro.reservation_max_age_secs ({})",
                self.unbooked_grace_secs, self.reservation_max_age_secs
            ));
        }
        if self.entry_done_retention_secs > self.entry_max_age_secs {
            return bad(format!(
                "cerebro.entry_done_retention_secs: {} must not exceed cerebro.entry_max_age_secs ({})",
                self.entry_done_retention_secs, self.entry_max_age_secs
            ));
        }
        if self.defer_retry_ms > self.defer_backoff_ms || self.defer_backoff_ms > self.defer_max_ms
        {
            return bad(format!(
                "cerebro.defer_retry_ms / defer_backoff_ms / defer_max_ms: {} / {} / {} must not decrease",
                self.defer_retry_ms, self.defer_backoff_ms, self.defer_max_ms
            ));
        }
        if self.defer_fast_retries > 100 {
            return bad(format!(
                "cerebro.defer_fast_retries: {} must be at most 100 (deliveries are bounded by topology.max_deliver)",
                self.defer_fast_retries
            ));
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

    #[test]
    fn sink_section_takes_env_and_names_bad_values() {
        assert_eq!(SinkConfig::default().writers, 2);
        Jail::expect_with(|jail| {
            jail.create_file("mtx.toml", "[sink]\nwriters = 3\n")?;
            assert_eq!(
                Config::load(None).map_err(|e| e.to_string())?.sink.writers,
                3
            );
            jail.set_env("MTX_SINK__WRITERS", "5");
            assert_eq!(
                Config::load(None).map_err(|e| e.to_string())?.sink.writers,
                5
            );
            jail.set_env("MTX_SINK__WRITERS", "0");
            let e = Config::load(None).unwrap_err().to_string();
            assert_eq!(
                e,
                "config error: sink.writers (MTX_SINK__WRITERS): 0 must be between 1 and 64"
            );
            jail.set_env("MTX_SINK__WRITERS", "2");
            assert_eq!(SinkConfig::default().op_timeout_secs, None);
            jail.set_env("MTX_SINK__OP_TIMEOUT_SECS", "90");
            assert_eq!(
                Config::load(None)
                    .map_err(|e| e.to_string())?
                    .sink
                    .op_timeout_secs,
                Some(90)
            );
            jail.set_env("MTX_SINK__OP_TIMEOUT_SECS", "0");
            let e = Config::load(None).unwrap_err().to_string();
            assert_eq!(
                e,
                "config error: sink.op_timeout_secs (MTX_SINK__OP_TIMEOUT_SECS): 0 must be between 1 and 600"
            );
            Ok(())
        });
    }

    #[test]
    fn accounts_publish_bytes_per_sec_defaults_and_is_checked() {
        assert_eq!(AccountsConfig::default().publish_bytes_per_sec, 1_000_000);
        Jail::expect_with(|jail| {
            jail.set_env("MTX_ACCOUNTS__PUBLISH_BYTES_PER_SEC", "0");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.accounts.publish_bytes_per_sec, 0);
            jail.set_env("MTX_ACCOUNTS__PUBLISH_BYTES_PER_SEC", "250000");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.accounts.publish_bytes_per_sec, 250_000);
            jail.set_env("MTX_ACCOUNTS__PUBLISH_BYTES_PER_SEC", "999");
            let e = Config::load(None).unwrap_err().to_string();
            assert_eq!(
                e,
                "config error: accounts.publish_bytes_per_sec (MTX_ACCOUNTS__PUBLISH_BYTES_PER_SEC): 999 must be 0 (no limit) or >= 10000"
            );
            Ok(())
        });
    }

    #[test]
    fn accounts_finished_order_retention_is_bounded() {
        let mut c = Config::default();
        c.accounts.finished_order_retention_secs = MAX_FINISHED_ORDER_RETENTION_SECS;
        assert!(c.validate().is_ok(), "10 years is accepted");
        // Beyond that, `at + retention` leaves the calendar: refused, naming
        // the setting.
        c.accounts.finished_order_retention_secs = u64::MAX;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            format!(
                "config error: accounts.finished_order_retention_secs (MTX_ACCOUNTS__FINISHED_ORDER_RETENTION_SECS): {} must be <= 315360000 (10 years)",
                u64::MAX
            )
        );
        Jail::expect_with(|jail| {
            jail.set_env("MTX_ACCOUNTS__FINISHED_ORDER_RETENTION_SECS", "315360001");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(
                e.starts_with(
                    "config error: accounts.finished_order_retention_secs (MTX_ACCOUNTS__FINISHED_ORDER_RETENTION_SECS): 315360001 must be <="
                ),
                "{e}"
            );
            Ok(())
        });
    }

    #[test]
    fn cerebro_section_parses_and_names_bad_keys() {
        let d = CerebroConfig::default();
        assert_eq!(d.validate(), Ok(()));
        assert_eq!(
            (
                d.unbooked_grace_secs,
                d.booking_grace_secs,
                d.reservation_max_entries
            ),
            (30, 1, 4_000)
        );
        assert_eq!((d.defer_retry_ms, d.defer_fast_retries), (250, 4));
        Jail::expect_with(|jail| {
            jail.create_file(
                "mtx.toml",
                "[cerebro]\nreservation_max_entries = 50\nentry_wait_secs = 60\n",
            )?;
            jail.set_env("MTX_CEREBRO__ENTRY_WAIT_SECS", "120");
            jail.set_env("MTX_CEREBRO__DEFER_RETRY_MS", "100");
            let c = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(c.cerebro.reservation_max_entries, 50);
            assert_eq!(c.cerebro.entry_wait_secs, 120, "env beats file");
            assert_eq!(c.cerebro.defer_retry_ms, 100);
            assert_eq!(c.cerebro.janitor_interval_secs, 600);
            Ok(())
        });
        for (var, value, want) in [
            (
                "MTX_CEREBRO__RESERVATION_MAX_ENTRIES",
                "0",
                "config error: cerebro.reservation_max_entries (MTX_CEREBRO__RESERVATION_MAX_ENTRIES): must be > 0",
            ),
            (
                "MTX_CEREBRO__JANITOR_INTERVAL_SECS",
                "0",
                "config error: cerebro.janitor_interval_secs (MTX_CEREBRO__JANITOR_INTERVAL_SECS): must be > 0",
            ),
            (
                "MTX_CEREBRO__UNBOOKED_GRACE_SECS",
                "86400",
                "config error: cerebro.unbooked_grace_secs: 86400 must be below",
            ),
            (
                "MTX_CEREBRO__DEFER_RETRY_MS",
                "5000",
                "config error: cerebro.defer_retry_ms",
            ),
            (
                "MTX_CEREBRO__BOOKING_GRACE_SECS",
                "soon",
                "config error: cerebro.booking_grace_secs (MTX_CEREBRO__BOOKING_GRACE_SECS): invalid type",
            ),
        ] {
            Jail::expect_with(|jail| {
                jail.set_env(var, value);
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.starts_with(want), "{e}");
                assert!(!e.contains('\n'));
                Ok(())
            });
        }
        Jail::expect_with(|jail| {
            jail.create_file("mtx.toml", "[cerebro]\nbooking_grace = 1\n")?;
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("booking_grace"), "{e}");
            Ok(())
        });
    }
}
