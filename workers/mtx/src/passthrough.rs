//! The broker ceiling of `mtx bench pipeline`: a chain of JetStream hops
//! with the pipeline's shape and none of its work.
//!
//! Six streams (`raw → standardized → decision → order → fill → state`, the
//! message kinds of the pipeline) joined by five durable pull consumers
//! (more with [`Chain::with_hops`]: `extra<i>` hops of fill-sized
//! messages between `fill` and `state`),
//! each run by the runtime's own consume loop ([`mtx_runtime::consume`])
//! with a [`Forward`] handler that only republishes the bytes it got, resized
//! to the average size the pipeline's message of the next kind had. Streams
//! are configured like the topology's `SIGNALS_RAW` (storage, replicas,
//! limits, duplicate window) and consumers like its `standardizer` consumer
//! (ack wait, max deliver, max ack pending), and the loops use the same
//! `[worker]` settings (batch size, concurrency), so the only difference
//! from the pipeline is the processing.
//!
//! Names: streams `<PREFIX>_BENCH_PT<h>` on subjects `<prefix>.benchpt.<h>.>`
//! (`h` = 0..=5), durables `bench_pt<h>` (consuming hop `h`, publishing hop
//! `h + 1`); [`Chain::delete`] removes them.

use std::sync::Arc;

use async_nats::jetstream;
use bytes::Bytes;
use mtx_runtime::consume::Binding;
use mtx_runtime::process::Process;
use mtx_runtime::{Delivery, Handler, Outcome, Outgoing};
use mtx_subjects::topology::streams;
use mtx_subjects::{Subjects, Topology};

/// Message kinds along the default chain (hop `h` carries `KINDS[h]`).
pub const KINDS: [&str; 6] = ["raw", "standardized", "decision", "order", "fill", "state"];
/// Hops with a consumer in the default chain: `KINDS.len() - 1`, the
/// pipeline's own stages.
pub const HOPS: usize = KINDS.len() - 1;
/// Most hops a chain may have.
pub const MAX_HOPS: usize = 16;

/// The pass-through chain under one topology prefix.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Stream per kind.
    pub streams: Vec<String>,
    /// Subject messages of each kind are published on.
    pub subjects: Vec<String>,
    /// Message kind per stream ([`KINDS`], with `extra<i>` kinds before
    /// `state` when there are extra hops).
    pub kinds: Vec<String>,
    /// Body size per kind, bytes.
    pub sizes: Vec<usize>,
    template_stream: jetstream::stream::Config,
    template_consumer: jetstream::consumer::pull::Config,
}

/// Durable consumer of hop `h`.
pub fn durable(h: usize) -> String {
    format!("bench_pt{h}")
}

impl Chain {
    /// The chain for `topo` (its prefix, stream and consumer settings) with
    /// body sizes per kind ([`KINDS`]) and `hops` consumer hops in all
    /// (clamped to [`HOPS`] ..= [`MAX_HOPS`]): [`HOPS`] are the pipeline's
    /// stages; beyond them, `extra1`, `extra2`, ...
    /// carry fill-sized messages between `fill` and `state`. A chain with as
    /// many JetStream hops as the pipeline's messages per signal (orders and
    /// fills of pairs, order events, Cerebro's and execution's records)
    /// measures what the broker alone allows for the pipeline's traffic.
    pub fn with_hops(topo: &Topology, sizes: [usize; 6], hops: usize) -> Option<Chain> {
        let hops = hops.clamp(HOPS, MAX_HOPS);
        let prefix = &topo.settings.prefix;
        let subjects = Subjects::new(prefix);
        let stream_name = |h: usize| {
            if prefix.is_empty() {
                format!("BENCH_PT{h}")
            } else {
                format!("{}_BENCH_PT{h}", prefix.to_ascii_uppercase())
            }
        };
        let extra = hops - HOPS;
        let mut kinds: Vec<String> = KINDS[..HOPS].iter().map(|k| k.to_string()).collect();
        kinds.extend((1..=extra).map(|i| format!("extra{i}")));
        kinds.push(KINDS[HOPS].to_string());
        let mut body = sizes[..HOPS].to_vec();
        body.extend(std::iter::repeat_n(sizes[HOPS - 1], extra));
        body.push(sizes[HOPS]);
        Some(Chain {
            streams: (0..=hops).map(stream_name).collect(),
            subjects: (0..=hops)
                .map(|h| subjects.raw_subject(&format!("benchpt.{h}.x")))
                .collect(),
            kinds,
            sizes: body,
            template_stream: topo.stream(streams::SIGNALS_RAW)?.config.clone(),
            template_consumer: topo.consumer("standardizer")?.config.clone(),
        })
    }

    /// Hops with a consumer: streams − 1.
    pub fn hops(&self) -> usize {
        self.streams.len() - 1
    }

    fn filter(&self, h: usize) -> String {
        let s = &self.subjects[h];
        format!("{}>", &s[..s.len() - 1])
    }

    /// Create (or replace) the streams and consumers.
    pub async fn create(&self, js: &jetstream::Context) -> Result<(), String> {
        self.delete(js).await;
        for (h, name) in self.streams.iter().enumerate() {
            let cfg = jetstream::stream::Config {
                name: name.clone(),
                subjects: vec![self.filter(h)],
                description: Some(format!("mtx bench pass-through hop {h}")),
                ..self.template_stream.clone()
            };
            let st = js
                .create_stream(cfg)
                .await
                .map_err(|e| format!("create stream {name}: {e}"))?;
            if h < self.hops() {
                let c = jetstream::consumer::pull::Config {
                    durable_name: Some(durable(h)),
                    description: Some(format!("mtx bench pass-through hop {h}")),
                    filter_subject: String::new(),
                    filter_subjects: vec![self.filter(h)],
                    ..self.template_consumer.clone()
                };
                st.create_consumer(c)
                    .await
                    .map_err(|e| format!("create consumer {}: {e}", durable(h)))?;
            }
        }
        Ok(())
    }

    /// Run the forwarding loops (one per hop) in `process`.
    pub fn spawn(&self, process: &mut Process) {
        for h in 0..self.hops() {
            process.spawn_binding(
                Binding {
                    stage: format!("bench_pt{h}"),
                    stream: self.streams[h].clone(),
                    durable: durable(h),
                },
                Arc::new(Forward {
                    next: self.subjects[h + 1].clone(),
                    size: self.sizes[h + 1],
                    hop: h + 1,
                }),
            );
        }
    }

    /// `(stream, durable)` of each hop, in data-flow order.
    pub fn consumers(&self) -> Vec<(String, String)> {
        (0..self.hops())
            .map(|h| (self.streams[h].clone(), durable(h)))
            .collect()
    }

    /// Delete the streams (and with them the consumers); best effort.
    pub async fn delete(&self, js: &jetstream::Context) {
        for name in &self.streams {
            let _ = js.delete_stream(name).await;
        }
    }
}

/// Republish the input's bytes, resized to `size`, on the next hop, with a
/// deterministic id (a redelivery is deduplicated like the pipeline's).
/// The consume loop copies the latency headers, publishes, waits for the
/// ack, then acks the input.
pub struct Forward {
    next: String,
    size: usize,
    hop: usize,
}

/// `payload` cut or padded with spaces to `size` bytes.
pub fn resize(payload: &Bytes, size: usize) -> Bytes {
    if payload.len() == size {
        return payload.clone();
    }
    if payload.len() > size {
        return payload.slice(..size);
    }
    let mut v = Vec::with_capacity(size);
    v.extend_from_slice(payload);
    v.resize(size, b' ');
    Bytes::from(v)
}

impl Handler for Forward {
    async fn handle(&self, msg: &Delivery) -> Outcome {
        Outcome::Ok(vec![Outgoing::new(
            self.next.clone(),
            format!("pt{}.{}", self.hop, msg.stream_seq),
            resize(&msg.payload, self.size),
        )])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtx_subjects::TopologySettings;

    #[test]
    fn names_and_sizes() {
        let topo = Topology::build(&TopologySettings {
            prefix: "b1".into(),
            ..Default::default()
        });
        let c = Chain::with_hops(&topo, [10; 6], HOPS).unwrap();
        assert_eq!(c.streams[0], "B1_BENCH_PT0");
        assert_eq!(c.subjects[5], "b1.benchpt.5.x");
        assert_eq!(c.filter(2), "b1.benchpt.2.>");
        assert_eq!(c.consumers().len(), HOPS);
        assert_eq!(c.hops(), HOPS);
        assert_eq!(c.kinds, KINDS);

        let x = Chain::with_hops(&topo, [1, 2, 3, 4, 5, 6], 8).unwrap();
        assert_eq!(x.hops(), 8);
        assert_eq!(x.consumers().len(), 8);
        assert_eq!(
            x.kinds,
            [
                "raw",
                "standardized",
                "decision",
                "order",
                "fill",
                "extra1",
                "extra2",
                "extra3",
                "state"
            ]
        );
        assert_eq!(x.sizes, [1, 2, 3, 4, 5, 5, 5, 5, 6]);
        assert_eq!(x.streams[8], "B1_BENCH_PT8");
        assert_eq!(x.subjects[8], "b1.benchpt.8.x");
        assert_eq!(x.filter(7), "b1.benchpt.7.>");
        assert_eq!(x.streams[..6], c.streams[..]);
        // Clamped: never fewer than the pipeline's hops, never past the cap.
        let hops = |h| Chain::with_hops(&topo, [1; 6], h).unwrap().hops();
        assert_eq!(hops(2), HOPS);
        assert_eq!(hops(99), MAX_HOPS);
        assert_eq!(
            resize(&Bytes::from_static(b"abc"), 5),
            Bytes::from_static(b"abc  ")
        );
        assert_eq!(
            resize(&Bytes::from_static(b"abcdef"), 2),
            Bytes::from_static(b"ab")
        );
    }
}
