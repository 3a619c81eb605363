//! Where received records go. One small trait, a folder per sink.
//!
//! # Layout
//! - this file: [`Sink`], [`PacketBatch`] (one received `PackagedData` with
//!   its server time and tag), [`SinkError`], the fan-out helper, and the
//!   one list of sinks: [`SinkKind`] with the CLI/file/build wiring of each.
//! - `ndjson/`: the embedded default, one JSON object per record per line.
//! - `kafka/`: one `MQData` message per record.
//! - `null/`: discards (benchmarks).
//!
//! Each sink folder owns its configuration: a `clap::Args` struct (its flags,
//! flattened into [`crate::Cli`] through [`SinkArgs`]), a serde table
//! (`[sinks.<name>]`, a field of [`SinksFile`]), the resolved config type and
//! its `KEY_ARGS` (file key -> flag id, for error messages).
//!
//! # Adding a sink
//! Add a folder `sinks/<name>/` with the `Sink` impl (and, if it has
//! settings, a `config.rs` as in `ndjson/`), then register it in this file
//! only: a [`SinkKind`] variant and its name, its args in [`SinkArgs`], its
//! table in [`SinksFile`], its `KEY_ARGS` in [`KEY_ARGS`], and one arm in
//! [`resolve`] and [`build`]. `config.rs` does not change.
//!
//! [`Sinks`] is the fan-out the stream handlers call; [`build`] picks the
//! sinks named in the configuration.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use elkeid_proto::grpc::EncodedRecord;

use std::path::Path;

use serde::Deserialize;

use crate::ack::{PacketId, Ticket};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;

pub(crate) mod kafka;
pub(crate) mod ndjson;
pub(crate) mod null;

pub use kafka::{KafkaArgs, KafkaConfig};
pub use ndjson::{NdjsonArgs, NdjsonConfig};

/// Which sinks receive records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// Embedded NDJSON files.
    Ndjson,
    /// Discard (benchmarks).
    Null,
    /// Kafka `MQData` messages.
    Kafka,
}

impl SinkKind {
    /// Every sink with its name in `--sink` / `sinks.enabled`.
    const ALL: &[(&str, SinkKind)] = &[
        ("ndjson", SinkKind::Ndjson),
        ("null", SinkKind::Null),
        ("kafka", SinkKind::Kafka),
    ];

    /// Parses one sink name (clap value parser, file values too).
    pub(crate) fn parse(s: &str) -> Result<SinkKind, String> {
        let s = s.trim();
        Self::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|&(_, kind)| kind)
            .ok_or_else(|| format!("unknown sink `{s}` (expected ndjson, null or kafka)"))
    }
}

/// The sink flags, flattened into [`crate::Cli`]: `--sink` and each sink's
/// own.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct SinkArgs {
    /// Sinks to enable: ndjson, null, kafka (repeatable). [default: ndjson]
    #[arg(long = "sink", env = "ELKEID_CENTER_SINK", value_delimiter = ',', value_parser = SinkKind::parse)]
    pub sinks: Vec<SinkKind>,
    /// NDJSON sink flags.
    #[command(flatten)]
    pub ndjson: NdjsonArgs,
    /// Kafka sink flags.
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// File key -> flag id of every sink setting.
pub(crate) const KEY_ARGS: &[&[(&str, &str)]] = &[
    &[("sinks.enabled", "sinks")],
    ndjson::KEY_ARGS,
    kafka::KEY_ARGS,
];

/// The `[sinks]` table of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SinksFile {
    enabled: Option<Vec<String>>,
    #[serde(default)]
    ndjson: ndjson::NdjsonFile,
    #[serde(default)]
    kafka: kafka::KafkaFile,
}

/// The resolved sink settings (spread into [`Config`]'s `sinks`, `ndjson`
/// and `kafka` fields).
#[derive(Debug)]
pub(crate) struct Resolved {
    pub(crate) enabled: Vec<SinkKind>,
    pub(crate) ndjson: NdjsonConfig,
    pub(crate) kafka: KafkaConfig,
}

/// Flag > env > file > default for every sink; each enabled sink checks its
/// own settings. Errors name the file key (the caller turns it into the
/// flag or variable the value came from).
pub(crate) fn resolve(
    args: SinkArgs,
    file: SinksFile,
    data_dir: &Path,
) -> Result<Resolved, ConfigError> {
    let kinds = if args.sinks.is_empty() {
        match file.enabled {
            Some(names) => names
                .iter()
                .map(|n| SinkKind::parse(n))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|msg| ConfigError::Invalid {
                    key: "sinks.enabled",
                    msg,
                })?,
            None => vec![SinkKind::Ndjson],
        }
    } else {
        args.sinks
    };
    let mut enabled = Vec::new();
    for kind in kinds {
        if !enabled.contains(&kind) {
            enabled.push(kind);
        }
    }
    if enabled.is_empty() {
        return Err(ConfigError::Invalid {
            key: "sinks.enabled",
            msg: "at least one sink is required".into(),
        });
    }
    let ndjson = NdjsonConfig::resolve(args.ndjson, file.ndjson, data_dir)?;
    let kafka = KafkaConfig::resolve(args.kafka, file.kafka, enabled.contains(&SinkKind::Kafka))?;
    Ok(Resolved {
        enabled,
        ndjson,
        kafka,
    })
}

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

impl PacketBatch {
    /// The batch of a received packet: its host metadata and records move
    /// in; `svr_time`, `tag`, identity and ticket are the center's.
    pub(crate) fn from_packet(
        pkt: elkeid_proto::grpc::PackagedData,
        svr_time: i64,
        tag: String,
        id: Option<PacketId>,
        ticket: Option<Ticket>,
    ) -> Self {
        PacketBatch {
            svr_time,
            tag,
            agent_id: pkt.agent_id,
            intranet_ipv4: pkt.intranet_ipv4,
            extranet_ipv4: pkt.extranet_ipv4,
            intranet_ipv6: pkt.intranet_ipv6,
            extranet_ipv6: pkt.extranet_ipv6,
            hostname: pkt.hostname,
            version: pkt.version,
            product: pkt.product,
            records: pkt.records,
            id,
            ticket,
        }
    }
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
) -> Result<Sinks, SinkError> {
    let mut list: Vec<Arc<dyn Sink>> = Vec::new();
    for kind in &config.sinks {
        match kind {
            SinkKind::Ndjson => list.push(Arc::new(ndjson::NdjsonSink::start_with(
                &config.ndjson,
                acks.clone(),
            )?)),
            SinkKind::Null => list.push(Arc::new(null::NullSink::default())),
            SinkKind::Kafka => list.push(Arc::new(
                kafka::KafkaSink::connect(config.kafka.clone()).await?,
            )),
        }
    }
    Ok(Sinks::new(list, metrics.clone()))
}
