//! Process configuration: defaults → `mtx.toml` → `MTX_` environment.
//!
//! Nested keys use `__` in the environment: `MTX_NATS__URL` is `nats.url`.
//! Everything is validated before a worker starts; a bad value stops the
//! process with one line naming the key and the problem.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use mtx_schemas::Environment;
use mtx_subjects::TopologySettings;
use serde::{Deserialize, Serialize};
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

/// The HTTP gateway listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// `host:port` to listen on.
    pub addr: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            addr: "127.0.0.1:8080".into(),
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
        if (w.batch_size as i64) > self.topology.max_ack_pending {
            return bad(format!(
                "worker.batch_size: {} exceeds topology.max_ack_pending ({})",
                w.batch_size, self.topology.max_ack_pending
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
}
