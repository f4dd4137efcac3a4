//! One mtx process: config, metrics, health server, NATS, and its loops.

use crate::config::Config;
use crate::consume::{self, Binding, Handler, LoopContext};
use crate::health::{self, Health};
use crate::metrics::RuntimeMetrics;
use async_nats::jetstream;
use mtx_subjects::{Subjects, Topology};
use prometheus::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Startup failures of a process (reported once, at the binary edge).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Metrics could not be registered (a programming error).
    #[error("metrics registration: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The ops listener could not bind.
    #[error("cannot listen on metrics.addr {addr}: {source}")]
    Listen {
        /// Configured address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// NATS options were unusable (bad credentials file, ...).
    #[error("nats: {0}")]
    Nats(#[from] async_nats::ConnectError),
    /// A worker asked for a consumer that is not in the topology.
    #[error("no consumer `{0}` in the topology")]
    UnknownConsumer(String),
}

/// A running process and the handles its workers need.
pub struct Process {
    /// Validated configuration.
    pub config: Config,
    /// The one registry served on `/metrics`.
    pub registry: Registry,
    /// Runtime metrics on that registry.
    pub metrics: RuntimeMetrics,
    /// Health state behind `/healthz` and `/readyz`.
    pub health: Health,
    /// NATS client (reconnects by itself).
    pub client: async_nats::Client,
    /// JetStream context.
    pub js: jetstream::Context,
    /// Subject builder with the configured prefix.
    pub subjects: Subjects,
    /// The topology built from config.
    pub topology: Topology,
    /// Cancelled when the process should stop.
    pub shutdown: CancellationToken,
    /// Where `/metrics` listens (useful when configured with port 0).
    pub ops_addr: SocketAddr,
    tasks: JoinSet<()>,
}

impl Process {
    /// Start the ops server and connect to NATS (in the background: the
    /// process comes up and reports not-ready while NATS is away).
    pub async fn start(
        config: Config,
        shutdown: CancellationToken,
    ) -> Result<Process, ProcessError> {
        let registry = Registry::new();
        let metrics = RuntimeMetrics::new(&registry)?;
        let health = Health::new(Duration::from_secs(config.worker.liveness_timeout_secs));
        let (client, js) = crate::nats::connect(&config.nats, Some(metrics.clone())).await?;
        health.set_nats(client.clone());
        let mut tasks = JoinSet::new();
        let (ops_addr, server) = health::serve(
            &config.metrics.addr,
            health.clone(),
            registry.clone(),
            shutdown.clone(),
        )
        .await
        .map_err(|source| ProcessError::Listen {
            addr: config.metrics.addr.clone(),
            source,
        })?;
        tasks.spawn(async move {
            let _ = server.await;
        });
        tracing::info!(%ops_addr, "ops endpoints up (/healthz /readyz /metrics)");
        Ok(Process {
            subjects: Subjects::new(&config.topology.prefix),
            topology: Topology::build(&config.topology),
            config,
            registry,
            metrics,
            health,
            client,
            js,
            shutdown,
            ops_addr,
            tasks,
        })
    }

    /// What a consume loop needs.
    pub fn loop_context(&self) -> LoopContext {
        LoopContext {
            js: self.js.clone(),
            subjects: self.subjects.clone(),
            worker: self.config.worker.clone(),
            metrics: self.metrics.clone(),
            health: self.health.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Run `handler` on the durable consumer `durable` of the topology.
    pub fn spawn_consumer<H: Handler>(
        &mut self,
        stage: &str,
        durable: &str,
        handler: Arc<H>,
    ) -> Result<(), ProcessError> {
        let spec = self
            .topology
            .consumer(durable)
            .ok_or_else(|| ProcessError::UnknownConsumer(durable.to_string()))?;
        let binding = Binding {
            stage: stage.to_string(),
            stream: spec.stream.clone(),
            durable: durable.to_string(),
        };
        let ctx = self.loop_context();
        self.tasks.spawn(consume::run(ctx, binding, handler));
        Ok(())
    }

    /// Run `handler` on an explicit binding (tools and test fixtures).
    pub fn spawn_binding<H: Handler>(&mut self, binding: Binding, handler: Arc<H>) {
        let ctx = self.loop_context();
        self.tasks.spawn(consume::run(ctx, binding, handler));
    }

    /// Run another task (a gateway, a watcher) until shutdown.
    pub fn spawn<F: Future<Output = ()> + Send + 'static>(&mut self, fut: F) {
        self.tasks.spawn(fut);
    }

    /// Wait for shutdown, give loops `worker.shutdown_grace_secs` to finish
    /// their batches, then flush acks and close the connection.
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        let grace = Duration::from_secs(self.config.worker.shutdown_grace_secs);
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "grace period over; abandoning unfinished work (it will be redelivered)"
            );
            self.tasks.abort_all();
        }
        if self.client.connection_state() != async_nats::connection::State::Connected {
            tracing::warn!("nats is not connected: unflushed acks will be redelivered");
        } else {
            // Acks are fire-and-forget publishes: flush (PING/PONG) so every ack
            // written so far has reached the server before the connection closes.
            match tokio::time::timeout(Duration::from_secs(5), self.client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "nats flush failed; unflushed acks will be redelivered")
                }
                Err(_) => {
                    tracing::warn!("nats flush timed out; unflushed acks will be redelivered")
                }
            }
            if let Err(e) = tokio::time::timeout(Duration::from_secs(5), self.client.drain()).await
            {
                tracing::warn!(error = %e, "nats drain timed out");
            }
        }
        tracing::info!("stopped");
    }
}
