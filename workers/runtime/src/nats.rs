//! Connecting to NATS the same way in every process.

use crate::config::NatsConfig;
use crate::metrics::RuntimeMetrics;
use async_nats::jetstream;
use std::time::Duration;

/// Connect (retrying forever in the background: the client reconnects by
/// itself after outages) and build a JetStream context whose publishes wait
/// for ack capacity instead of failing.
pub async fn connect(
    cfg: &NatsConfig,
    metrics: Option<RuntimeMetrics>,
) -> Result<(async_nats::Client, jetstream::Context), async_nats::ConnectError> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(&cfg.name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_millis(cfg.request_timeout_ms)))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move {
                match &event {
                    async_nats::Event::Connected => {
                        tracing::info!("nats connected");
                        if let Some(m) = &metrics {
                            m.nats_connected.set(1);
                        }
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!("nats disconnected");
                        if let Some(m) = &metrics {
                            m.nats_connected.set(0);
                        }
                    }
                    other => tracing::info!(event = %other, "nats event"),
                }
            }
        });
    if let (Some(u), Some(p)) = (&cfg.user, &cfg.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(c) = &cfg.creds_file {
        opts = opts.credentials_file(c).await.map_err(|e| {
            async_nats::ConnectError::with_source(async_nats::ConnectErrorKind::Authentication, e)
        })?;
    }
    let urls: Vec<String> = cfg.url.split(',').map(|s| s.trim().to_string()).collect();
    let client = opts.connect(urls.as_slice()).await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(cfg.request_timeout_ms))
        .backpressure_on_inflight(true)
        .max_ack_inflight(20_000)
        .build(client.clone());
    Ok((client, js))
}

/// Delay before connection attempt `attempts` (counted from 1): none for the
/// first (the client counts before asking, so a plain `50 << attempts` made
/// every start and every reconnect wait 100 ms), then 100 ms, 200 ms, …
/// capped at 2 s: fast recovery after a restart, no hammering of a dead server.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        Duration::ZERO
    } else {
        Duration::from_millis((50u64 << (attempts - 1).min(6) as u32).min(2_000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_attempt_is_immediate_then_backs_off() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), Duration::from_millis(100));
        assert_eq!(reconnect_delay(3), Duration::from_millis(200));
        assert_eq!(reconnect_delay(50), Duration::from_millis(2_000));
    }
}
