//! `mtx market price <symbol> <price>`: publish one mark by hand.
//!
//! The price goes to `market.prices.<symbol>` as a
//! [`MarketPrice`] (timestamp = now, source `manual` unless `--source`),
//! where the execution stage fills MARKET orders at it and matches resting
//! LIMIT / STOP orders against it, and the accounts stage marks positions to
//! it. Prints the stream sequence once JetStream has stored it.

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mtx_runtime::config::Config;
use mtx_schemas::headers;
use mtx_schemas::market::MarketPrice;
use mtx_subjects::Subjects;
use rust_decimal::Decimal;
use std::future::IntoFuture;
use std::process::ExitCode;
use std::time::Duration;

/// `mtx market ...`
#[derive(Subcommand)]
pub enum MarketCmd {
    /// Publish a price for a symbol on `market.prices.<symbol>`.
    Price {
        /// Symbol, e.g. `AAPL`.
        symbol: String,
        /// Price (positive decimal, e.g. `151.25`).
        price: Decimal,
        /// Source recorded on the message.
        #[arg(long, default_value = "manual")]
        source: String,
    },
}

/// The message and its subject, checked.
pub fn price_message(
    cfg: &Config,
    symbol: &str,
    price: Decimal,
    source: &str,
) -> Result<(String, MarketPrice)> {
    if let Err(e) = mtx_schemas::limits::check_price(price) {
        bail!("price {e}");
    }
    let subject = Subjects::new(&cfg.topology.prefix)
        .market_price(symbol)
        .with_context(|| format!("symbol `{symbol}`"))?;
    let msg = MarketPrice {
        symbol: symbol.to_string(),
        price,
        timestamp: chrono::Utc::now(),
        source: Some(source.to_string()),
    };
    Ok((subject, msg))
}

/// Run a `market` subcommand.
pub async fn run(cmd: MarketCmd, cfg: &Config) -> Result<ExitCode> {
    let MarketCmd::Price {
        symbol,
        price,
        source,
    } = cmd;
    let (subject, msg) = price_message(cfg, &symbol, price, &source)?;
    let body = serde_json::to_vec(&msg)?;
    let wait = Duration::from_millis(cfg.nats.request_timeout_ms.max(1_000) * 2);
    let (client, js) = tokio::time::timeout(wait, mtx_runtime::nats::connect(&cfg.nats, None))
        .await
        .with_context(|| format!("connecting to NATS at {}: timed out", cfg.nats.url))?
        .with_context(|| format!("connecting to NATS at {}", cfg.nats.url))?;
    let mut h = async_nats::HeaderMap::new();
    let id = format!(
        "{subject}.{}",
        msg.timestamp.timestamp_nanos_opt().unwrap_or_default()
    );
    h.insert(headers::MSG_ID, id.as_str());
    let ack = tokio::time::timeout(wait, async {
        js.publish_with_headers(subject.clone(), h, body.into())
            .await?
            .into_future()
            .await
            .map_err(anyhow::Error::from)
    })
    .await
    .context("publishing the price: timed out (is the topology applied?)")?
    .context("publishing the price")?;
    println!(
        "published {} {} on {subject} (stream {}, seq {})",
        msg.symbol, msg.price, ack.stream, ack.sequence
    );
    let _ = client.flush().await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_the_subject_and_refuses_bad_prices() {
        let mut cfg = Config::default();
        cfg.topology.prefix = "t1".into();
        let (subject, m) =
            price_message(&cfg, "BTC/USD", Decimal::new(6512345, 2), "manual").unwrap();
        assert_eq!(subject, "t1.market.prices.BTC~2FUSD");
        assert_eq!(m.price.to_string(), "65123.45");
        assert_eq!(m.source.as_deref(), Some("manual"));
        assert!(price_message(&cfg, "AAPL", Decimal::ZERO, "manual").is_err());
        assert!(price_message(&cfg, "", Decimal::ONE, "manual").is_err());
    }
}
