//! Where received records go. One small trait, a folder per sink.
//!
//! # Layout
//! - this file: [`Sink`], [`PacketBatch`] (one received `PackagedData` with
//!   its server time and tag), [`SinkError`], and the fan-out helper.
//! - `ndjson/`: the embedded default, one JSON object per record per line.
//! - `kafka/`: one `MQData` message per record.
//! - `null/`: discards (benchmarks).
//!
//! [`Sinks`] is the fan-out the stream handlers call; [`build`] picks the
//! sinks named in the configuration.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use elkeid_proto::grpc::EncodedRecord;

use crate::ack::{PacketId, Ticket};
use crate::config::{Config, SinkKind};
use crate::metrics::Metrics;

pub(crate) mod kafka;
pub(crate) mod ndjson;
pub(crate) mod null;

/// A boxed future returned by [`Sink`] methods (the trait stays dyn-compatible).
pub(crate) type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'a>>;

/// One received `PackagedData`: the packet's host metadata, the center's
/// receive time (Unix seconds, taken once per packet) and its records, whose
/// `data` stays the opaque serialized `Payload` bytes.
#[derive(Debug, Clone, Default)]
pub(crate) struct PacketBatch {
    pub(crate) svr_time: i64,
    pub(crate) agent_id: String,
    pub(crate) intranet_ipv4: Vec<String>,
    pub(crate) extranet_ipv4: Vec<String>,
    pub(crate) intranet_ipv6: Vec<String>,
    pub(crate) extranet_ipv6: Vec<String>,
    pub(crate) hostname: String,
    pub(crate) version: String,
    pub(crate) product: String,
    /// `tags` from the manager's extra-info cache, else empty.
    pub(crate) tag: String,
    pub(crate) records: Vec<EncodedRecord>,
    /// The packet's identity when the agent sent one (acknowledged
    /// delivery): written with every record (NDJSON keys `agent_epoch`,
    /// `agent_seq`, `record_idx`; Kafka headers) so consumers can
    /// de-duplicate.
    pub(crate) id: Option<PacketId>,
    /// Held by each sink until the records are durable (see `crate::ack`).
    pub(crate) ticket: Option<Ticket>,
}

/// Why a sink could not take a batch.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SinkError {
    /// Writing to local storage failed.
    #[error("sink {sink}: i/o error: {source}")]
    Io {
        /// Sink name.
        sink: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The sink is shutting down and takes no more records.
    #[error("sink {0} is closed")]
    Closed(&'static str),
    /// The sink's bounded queue is full and its policy is to drop (counted).
    #[error("sink {0} dropped the batch: queue full")]
    Dropped(&'static str),
    /// Any other sink-specific failure.
    #[error("sink {sink}: {msg}")]
    Other {
        /// Sink name.
        sink: &'static str,
        /// What went wrong.
        msg: String,
    },
}

/// A destination for received records.
///
/// `send` runs on the agent's stream task: a sink that is slow applies
/// back-pressure to that agent simply by not completing. A sink never drops
/// silently: drops happen only under an explicit policy and are counted.
///
/// Durability: a sink keeps a clone of `batch.ticket` (or the batch itself)
/// until the records are durable, and calls `Ticket::fail` when they cannot
/// become durable; only then is the packet acknowledged to the agent.
pub(crate) trait Sink: Send + Sync + 'static {
    /// Short name used in logs and metrics (`ndjson`, `kafka`, `null`).
    fn name(&self) -> &'static str;
    /// Takes one packet's records.
    fn send<'a>(&'a self, batch: &'a Arc<PacketBatch>) -> SinkFuture<'a>;
    /// Writes out everything accepted so far (called on graceful shutdown).
    fn flush(&self) -> SinkFuture<'_>;
    /// Batches accepted but not yet written (exported as `elkeid_center_sink_lag`).
    fn lag(&self) -> usize {
        0
    }
    /// The sink's own counters as `(kind, value)`, exported as
    /// `elkeid_center_sink_records_total{sink, kind}` (e.g. `delivered`,
    /// `dropped`).
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Why the sinks could not be built.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
    /// A sink setting is invalid (names the key).
    #[error("config: bad value for key `{key}`: {msg}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A sink failed to start.
    #[error(transparent)]
    Sink(#[from] SinkError),
}

/// The configured sinks, called in order for every packet.
#[derive(Clone)]
pub(crate) struct Sinks {
    list: Vec<Arc<dyn Sink>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Sinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|s| s.name()))
            .finish()
    }
}

impl Sinks {
    /// Wraps a list of sinks.
    pub(crate) fn new(list: Vec<Arc<dyn Sink>>, metrics: Arc<Metrics>) -> Self {
        Sinks { list, metrics }
    }

    /// Hands one packet to every sink; waits for each (back-pressure). A
    /// failing sink is logged and counted; the others still get the batch.
    pub(crate) async fn send(&self, batch: &Arc<PacketBatch>) {
        for sink in &self.list {
            if let Err(error) = sink.send(batch).await {
                if let Some(t) = &batch.ticket {
                    t.fail();
                }
                let dropped = matches!(error, SinkError::Dropped(_));
                self.metrics.sink_failed(sink.name(), dropped);
                tracing::warn!(sink = sink.name(), agent_id = %batch.agent_id, records = batch.records.len(), %error, "sink did not take a batch");
            }
        }
    }

    /// Flushes every sink (graceful shutdown).
    pub(crate) async fn flush(&self) {
        for sink in &self.list {
            if let Err(error) = sink.flush().await {
                tracing::error!(sink = sink.name(), %error, "sink flush failed");
            }
        }
    }

    /// `(sink, kind, value)` of every sink's own counters.
    pub(crate) fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        self.list
            .iter()
            .flat_map(|s| s.counters().into_iter().map(|(k, v)| (s.name(), k, v)))
            .collect()
    }

    /// `(name, lag)` per sink.
    pub(crate) fn lag(&self) -> Vec<(&'static str, usize)> {
        self.list.iter().map(|s| (s.name(), s.lag())).collect()
    }
}

/// Builds the sinks enabled in `config` (the Kafka sink connects here).
pub(crate) async fn build(
    config: &Config,
    metrics: &Arc<Metrics>,
    acks: &Arc<crate::ack::AckMetrics>,
) -> Result<Sinks, BuildError> {
    let mut list: Vec<Arc<dyn Sink>> = Vec::new();
    for kind in &config.sinks {
        match kind {
            SinkKind::Ndjson => list.push(Arc::new(ndjson::NdjsonSink::start_with(
                &config.ndjson,
                acks.clone(),
            )?)),
            SinkKind::Null => list.push(Arc::new(null::NullSink::default())),
            SinkKind::Kafka => {
                let cfg = kafka::KafkaConfig::from_center(&config.kafka).map_err(|e| {
                    BuildError::Config {
                        key: e.key,
                        msg: e.why.to_string(),
                    }
                })?;
                list.push(Arc::new(kafka::KafkaSink::connect(cfg).await?));
            }
        }
    }
    Ok(Sinks::new(list, metrics.clone()))
}
