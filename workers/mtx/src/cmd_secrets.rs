//! `mtx secrets set <strategy>`: read a strategy's shared secret from stdin
//! and store only its salted hash (Mongo `signal_secrets`, or print it as a
//! `gateway.secrets` config line with `--print`). The secret itself is never
//! written anywhere or echoed.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mtx_gateway::secrets::{self, SecretHash};
use mtx_runtime::config::Config;
use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

/// Shortest secret accepted (senders use long random strings).
const MIN_LEN: usize = 12;

/// `mtx secrets ...`
#[derive(Subcommand)]
pub enum SecretsCmd {
    /// Read <strategy>'s secret from stdin (one line) and store its salted hash
    /// in the trading database's `signal_secrets` collection, where the gateway
    /// picks it up within `gateway.secrets_refresh_secs`.
    Set {
        /// Strategy id the secret authenticates (as senders name it).
        strategy: String,
        /// Do not touch Mongo; print a `[gateway.secrets]` line for mtx.toml instead.
        #[arg(long)]
        print: bool,
    },
}

/// The secret from `input`: the first line, without its line ending.
fn read_secret(mut input: impl Read) -> Result<String> {
    let mut text = String::new();
    input
        .read_to_string(&mut text)
        .context("reading the secret from stdin")?;
    let line = text.lines().next().unwrap_or_default().to_string();
    if line.trim().is_empty() {
        bail!(
            "no secret on stdin (pipe it in: `printf %s \"$SECRET\" | mtx secrets set <strategy>`)"
        );
    }
    if line.chars().count() < MIN_LEN {
        bail!("the secret is shorter than {MIN_LEN} characters; use a long random string");
    }
    Ok(line)
}

/// Run a `secrets` subcommand.
pub async fn run(cmd: SecretsCmd, cfg: &Config) -> Result<ExitCode> {
    let SecretsCmd::Set { strategy, print } = cmd;
    if strategy.trim().is_empty() {
        bail!("the strategy id is empty");
    }
    let secret = read_secret(std::io::stdin().lock())?;
    let hash = SecretHash::generate(&secret)?;
    drop(secret);
    if print {
        println!("[gateway.secrets]");
        println!("{} = \"{hash}\"", serde_json::to_string(&strategy)?);
        return Ok(ExitCode::SUCCESS);
    }
    let client = secrets::mongo_client(&cfg.mongo.uri, Duration::from_secs(5)).await?;
    let coll = client
        .database(&cfg.mongo.trading_db)
        .collection(secrets::COLLECTION);
    secrets::store(&coll, &strategy, &hash)
        .await
        .with_context(|| {
            format!(
                "storing the hash in {}.{}",
                cfg.mongo.trading_db,
                secrets::COLLECTION
            )
        })?;
    println!(
        "stored the secret hash for `{strategy}` in {}.{} (gateways reload every {} s)",
        cfg.mongo.trading_db,
        secrets::COLLECTION,
        cfg.gateway.secrets_refresh_secs
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_first_line_and_refuses_short_or_empty() {
        assert_eq!(
            read_secret("test_password_123\n".as_bytes()).unwrap(),
            "test_password_123"
        );
        assert_eq!(
            read_secret("test_password_123\r\nignored".as_bytes()).unwrap(),
            "test_password_123"
        );
        assert!(read_secret("".as_bytes()).is_err());
        assert!(read_secret("short\n".as_bytes()).is_err());
    }
}
