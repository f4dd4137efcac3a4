//! Prometheus metrics of the runtime, on one explicitly passed registry.
//!
//! Names follow Prometheus rules: `mtx_` prefix, base units (seconds),
//! `_total` for counters, and only bounded label values (stage names, outcome
//! and reason codes; never ids or free text).

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};

/// Latency buckets from 100 µs to ~26 s.
pub fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.0001, 2.0, 19).unwrap_or_default()
}

/// Metrics shared by every consume loop and publisher in a process.
#[derive(Clone)]
pub struct RuntimeMetrics {
    /// Messages delivered to a stage's loop.
    pub received: IntCounterVec,
    /// Messages finished by outcome: `ok`, `duplicate`, `retry`, `dlq`.
    pub processed: IntCounterVec,
    /// Handler time per message.
    pub handler_seconds: HistogramVec,
    /// Deliveries with a delivery count above one.
    pub redeliveries: IntCounterVec,
    /// Dead-lettered messages by stage and reason code.
    pub dlq: IntCounterVec,
    /// Messages currently being handled.
    pub in_flight: IntGaugeVec,
    /// Time from publish to JetStream ack.
    pub publish_ack_seconds: HistogramVec,
    /// Published messages by result: `ok`, `duplicate`, `error`.
    pub published: IntCounterVec,
    /// Messages pending for a stage's consumer (from delivery metadata and consumer info).
    pub consumer_pending: IntGaugeVec,
    /// Unacknowledged messages of a stage's consumer (from consumer info).
    pub consumer_ack_pending: IntGaugeVec,
    /// The consumer's configured `max_ack_pending` (from consumer info), so
    /// alerts compare ack-pending with the real limit.
    pub consumer_max_ack_pending: IntGaugeVec,
    /// 1 while the NATS connection is up.
    pub nats_connected: IntGauge,
    /// End-to-end latency from the raw signal's receive time to a stage's output.
    pub e2e_seconds: HistogramVec,
}

impl RuntimeMetrics {
    /// Create and register every runtime metric plus `mtx_build_info`.
    pub fn new(registry: &Registry) -> prometheus::Result<RuntimeMetrics> {
        let stage = &["stage"];
        let m = RuntimeMetrics {
            received: IntCounterVec::new(
                Opts::new(
                    "mtx_messages_received_total",
                    "Messages delivered to a stage",
                ),
                stage,
            )?,
            processed: IntCounterVec::new(
                Opts::new(
                    "mtx_messages_processed_total",
                    "Messages finished, by durable consumer and outcome",
                ),
                &["stage", "consumer", "outcome"],
            )?,
            handler_seconds: HistogramVec::new(
                HistogramOpts::new("mtx_handler_duration_seconds", "Handler time per message")
                    .buckets(latency_buckets()),
                stage,
            )?,
            redeliveries: IntCounterVec::new(
                Opts::new("mtx_redeliveries_total", "Deliveries beyond the first"),
                stage,
            )?,
            dlq: IntCounterVec::new(
                Opts::new(
                    "mtx_dlq_messages_total",
                    "Messages dead-lettered, by reason code",
                ),
                &["stage", "reason"],
            )?,
            in_flight: IntGaugeVec::new(
                Opts::new("mtx_in_flight_messages", "Messages being handled now"),
                stage,
            )?,
            publish_ack_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "mtx_publish_ack_duration_seconds",
                    "Publish to JetStream ack",
                )
                .buckets(latency_buckets()),
                stage,
            )?,
            published: IntCounterVec::new(
                Opts::new(
                    "mtx_published_messages_total",
                    "Messages published, by result",
                ),
                &["stage", "result"],
            )?,
            consumer_pending: IntGaugeVec::new(
                Opts::new(
                    "mtx_consumer_pending_messages",
                    "Messages not yet delivered to the consumer",
                ),
                &["stage", "consumer"],
            )?,
            consumer_ack_pending: IntGaugeVec::new(
                Opts::new(
                    "mtx_consumer_ack_pending_messages",
                    "Delivered but unacknowledged messages",
                ),
                &["stage", "consumer"],
            )?,
            consumer_max_ack_pending: IntGaugeVec::new(
                Opts::new(
                    "mtx_consumer_max_ack_pending",
                    "The consumer's configured max_ack_pending (shared by every replica)",
                ),
                &["stage", "consumer"],
            )?,
            nats_connected: IntGauge::new("mtx_nats_connected", "1 while connected to NATS")?,
            e2e_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "mtx_end_to_end_latency_seconds",
                    "Raw signal receive time to a stage's published output",
                )
                .buckets(latency_buckets()),
                &["stage"],
            )?,
        };
        registry.register(Box::new(m.received.clone()))?;
        registry.register(Box::new(m.processed.clone()))?;
        registry.register(Box::new(m.handler_seconds.clone()))?;
        registry.register(Box::new(m.redeliveries.clone()))?;
        registry.register(Box::new(m.dlq.clone()))?;
        registry.register(Box::new(m.in_flight.clone()))?;
        registry.register(Box::new(m.publish_ack_seconds.clone()))?;
        registry.register(Box::new(m.published.clone()))?;
        registry.register(Box::new(m.consumer_pending.clone()))?;
        registry.register(Box::new(m.consumer_ack_pending.clone()))?;
        registry.register(Box::new(m.consumer_max_ack_pending.clone()))?;
        registry.register(Box::new(m.nats_connected.clone()))?;
        registry.register(Box::new(m.e2e_seconds.clone()))?;
        let build = IntGaugeVec::new(
            Opts::new("mtx_build_info", "Build information; always 1"),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(build))?;
        Ok(m)
    }

    /// A standalone histogram (for stage-specific metrics built by workers).
    pub fn histogram(registry: &Registry, name: &str, help: &str) -> prometheus::Result<Histogram> {
        let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))?;
        registry.register(Box::new(h.clone()))?;
        Ok(h)
    }
}

/// Render a registry in the text exposition format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let enc = prometheus::TextEncoder::new();
    if enc.encode(&registry.gather(), &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}
