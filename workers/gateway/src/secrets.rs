//! Per-strategy shared secrets, held only as salted hashes.
//!
//! A hash is written `sha256$<salt hex>$<digest hex>` with `digest =
//! SHA-256(salt ‖ secret)` and a fresh 16-byte salt per secret. Checking a
//! presented secret recomputes the digest and compares it in constant time
//! ([`subtle`]). Senders' secrets are long random strings, so a fast salted
//! hash is enough to keep them out of config files and databases; it keeps
//! the check in microseconds, inside TradingView's 3 s budget under load.
//!
//! Hashes come from two places, looked up in this order:
//! 1. `gateway.secrets` in the config (`"SPX_1-D_Opt" = "sha256$..."`);
//! 2. the `signal_secrets` collection of the trading database
//!    (`{_id: <strategy>, hash: "sha256$...", updated_at}`), written by
//!    `mtx secrets set <strategy>` and reloaded every
//!    `gateway.secrets_refresh_secs`.
//!
//! Until the collection has been read once, a strategy that is not in the
//! config cannot be judged: the gateway answers 503, not 401.

use mongodb::bson::{doc, Document};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use subtle::ConstantTimeEq;

/// Collection (in `mongo.trading_db`) holding secret hashes.
pub const COLLECTION: &str = "signal_secrets";

/// Problems with secrets and their storage.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// A stored hash is not `sha256$<salt hex>$<digest hex>`.
    #[error("`{0}` is not a secret hash (expected sha256$<salt hex>$<digest hex>)")]
    BadHash(String),
    /// The operating system's random source failed.
    #[error("cannot read random bytes: {0}")]
    Random(#[from] std::io::Error),
    /// MongoDB failed.
    #[error("mongo: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

/// A salted SHA-256 hash of one secret.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretHash {
    salt: Vec<u8>,
    digest: [u8; 32],
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({self})")
    }
}

impl fmt::Display for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sha256${}${}",
            hex::encode(&self.salt),
            hex::encode(self.digest)
        )
    }
}

impl FromStr for SecretHash {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SecretError::BadHash(s.chars().take(80).collect());
        let mut parts = s.trim().split('$');
        let (Some("sha256"), Some(salt), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let salt = hex::decode(salt).map_err(|_| bad())?;
        let digest: [u8; 32] = hex::decode(digest)
            .ok()
            .and_then(|d| d.try_into().ok())
            .ok_or_else(bad)?;
        if salt.len() < 8 {
            return Err(bad());
        }
        Ok(SecretHash { salt, digest })
    }
}

fn digest(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

impl SecretHash {
    /// Hash `secret` with `salt`.
    pub fn new(secret: &str, salt: &[u8]) -> SecretHash {
        SecretHash {
            salt: salt.to_vec(),
            digest: digest(salt, secret),
        }
    }

    /// Hash `secret` with a fresh random salt from the OS.
    pub fn generate(secret: &str) -> Result<SecretHash, SecretError> {
        let mut salt = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut salt)?;
        Ok(SecretHash::new(secret, &salt))
    }

    /// Whether `secret` matches, in time independent of where they differ.
    pub fn verify(&self, secret: &str) -> bool {
        digest(&self.salt, secret).ct_eq(&self.digest).into()
    }
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The strategy's hash.
    Found(SecretHash),
    /// No hash for it anywhere (→ 401).
    Unknown,
    /// Not in config and the Mongo collection was never read (→ 503).
    NotLoaded,
}

#[derive(Default)]
struct Snapshot {
    from_mongo: HashMap<String, SecretHash>,
    mongo_loaded: bool,
}

/// The gateway's view of every secret hash; cheap to clone.
#[derive(Clone)]
pub struct SecretStore {
    config: Arc<HashMap<String, SecretHash>>,
    uses_mongo: bool,
    snapshot: Arc<RwLock<Snapshot>>,
}

impl SecretStore {
    /// From the config's `gateway.secrets`; `uses_mongo` says whether the
    /// collection will be loaded (else only config hashes exist). A malformed
    /// hash is an error naming its strategy.
    pub fn from_config<'a>(
        secrets: impl IntoIterator<Item = (&'a String, &'a String)>,
        uses_mongo: bool,
    ) -> Result<SecretStore, String> {
        let mut config = HashMap::new();
        for (strategy, hash) in secrets {
            let h = hash
                .parse::<SecretHash>()
                .map_err(|e| format!("gateway.secrets.\"{strategy}\": {e}"))?;
            config.insert(strategy.clone(), h);
        }
        Ok(SecretStore {
            config: Arc::new(config),
            uses_mongo,
            snapshot: Arc::new(RwLock::new(Snapshot::default())),
        })
    }

    /// The hash for `strategy`.
    pub fn lookup(&self, strategy: &str) -> Lookup {
        if let Some(h) = self.config.get(strategy) {
            return Lookup::Found(h.clone());
        }
        if !self.uses_mongo {
            return Lookup::Unknown;
        }
        let snap = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        match snap.from_mongo.get(strategy) {
            Some(h) => Lookup::Found(h.clone()),
            None if snap.mongo_loaded => Lookup::Unknown,
            None => Lookup::NotLoaded,
        }
    }

    /// Whether lookups can be answered (Mongo read once, or not used).
    pub fn is_loaded(&self) -> bool {
        !self.uses_mongo
            || self
                .snapshot
                .read()
                .map(|s| s.mongo_loaded)
                .unwrap_or(false)
    }

    /// Replace the Mongo-sourced hashes.
    pub fn set_mongo(&self, hashes: HashMap<String, SecretHash>) {
        let mut snap = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        snap.from_mongo = hashes;
        snap.mongo_loaded = true;
    }

    /// Reload from Mongo every `every` until `shutdown`; failures keep the
    /// previous hashes and are retried sooner.
    pub async fn refresh_loop(
        self,
        coll: mongodb::Collection<Document>,
        every: Duration,
        ready: mtx_runtime::health::ReadyFlag,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let wait = match load(&coll).await {
                Ok(hashes) => {
                    tracing::debug!(count = hashes.len(), "secret hashes loaded from mongo");
                    self.set_mongo(hashes);
                    ready.set(true);
                    every
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load secret hashes from mongo");
                    every.min(Duration::from_secs(2))
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Every hash in the collection (malformed documents are skipped, logged).
pub async fn load(
    coll: &mongodb::Collection<Document>,
) -> Result<HashMap<String, SecretHash>, SecretError> {
    use futures::TryStreamExt;
    let mut cursor = coll.find(doc! {}).await?;
    let mut out = HashMap::new();
    while let Some(d) = cursor.try_next().await? {
        let (Ok(strategy), Ok(hash)) = (d.get_str("_id"), d.get_str("hash")) else {
            tracing::warn!("signal_secrets: skipping a document without string _id / hash");
            continue;
        };
        match hash.parse::<SecretHash>() {
            Ok(h) => {
                out.insert(strategy.to_string(), h);
            }
            Err(e) => tracing::warn!(strategy, error = %e, "signal_secrets: skipping"),
        }
    }
    Ok(out)
}

/// A Mongo client that gives up server selection after `timeout` (so a
/// reload or a CLI call fails fast when Mongo is away).
pub async fn mongo_client(uri: &str, timeout: Duration) -> Result<mongodb::Client, SecretError> {
    let mut opts = mongodb::options::ClientOptions::parse(uri).await?;
    opts.server_selection_timeout = Some(timeout);
    opts.connect_timeout = Some(timeout);
    opts.app_name = Some("mtx-gateway".into());
    Ok(mongodb::Client::with_options(opts)?)
}

/// Store (insert or replace) `strategy`'s hash in the collection.
pub async fn store(
    coll: &mongodb::Collection<Document>,
    strategy: &str,
    hash: &SecretHash,
) -> Result<(), SecretError> {
    coll.update_one(
        doc! {"_id": strategy},
        doc! {"$set": {"hash": hash.to_string(), "updated_at": mongodb::bson::DateTime::now()}},
    )
    .upsert(true)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_round_trips_and_verifies() {
        let h = SecretHash::generate("test_password_123").unwrap();
        let text = h.to_string();
        assert!(text.starts_with("sha256$"));
        assert!(!text.contains("test_password_123"));
        let back: SecretHash = text.parse().unwrap();
        assert_eq!(back, h);
        assert!(back.verify("test_password_123"));
        assert!(!back.verify("test_password_124"));
        assert!(!back.verify(""));
        assert_ne!(
            SecretHash::generate("x").unwrap(),
            SecretHash::generate("x").unwrap()
        );
    }

    #[test]
    fn malformed_hashes_are_rejected() {
        for bad in [
            "",
            "plain",
            "sha256$zz$00",
            "sha256$0011223344556677$00",
            "md5$0011223344556677$".to_string().as_str(),
            "sha256$0011$0000000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert!(bad.parse::<SecretHash>().is_err(), "{bad}");
        }
    }

    #[test]
    fn config_wins_and_mongo_gates_unknowns() {
        let h = SecretHash::new("s", b"saltsalt").to_string();
        let cfg = [("A".to_string(), h)];
        let store = SecretStore::from_config(cfg.iter().map(|(a, b)| (a, b)), true).unwrap();
        assert!(matches!(store.lookup("A"), Lookup::Found(_)));
        assert_eq!(store.lookup("B"), Lookup::NotLoaded);
        assert!(!store.is_loaded());
        store.set_mongo(HashMap::from([(
            "B".to_string(),
            SecretHash::new("t", b"saltsalt"),
        )]));
        assert!(matches!(store.lookup("B"), Lookup::Found(_)));
        assert_eq!(store.lookup("C"), Lookup::Unknown);
        let bad = [("X".to_string(), "nope".to_string())];
        let e = SecretStore::from_config(bad.iter().map(|(a, b)| (a, b)), false)
            .err()
            .unwrap();
        assert!(e.starts_with("gateway.secrets.\"X\""), "{e}");
    }
}
