//! Kafka sink: one `MQData` protobuf message (spec §1.4) per record, key =
//! agent id, so an Elkeid rule engine (HUB) or any consumer of Elkeid's
//! `hids_svr` topic reads our output unchanged.
//!
//! # Layout
//! - `config.rs`: all the sink's settings in one place: [`KafkaArgs`] (its
//!   `--kafka-*` flags), the `[sinks.kafka]` file table, and the resolved
//!   [`KafkaConfig`] with its checks.
//! - `encode.rs`: `MQData` building and Sarama's FNV-1a key partitioner.
//! - `sink.rs`: [`KafkaSink`]: the bounded in-flight queue (a byte budget),
//!   the per-partition batching producer task, counters.
//! - `tests.rs`: against a real Kafka-protocol broker (`ELKEID_TEST_KAFKA`).
//!
//! # Client choice
//! `rskafka` 0.6: pure Rust (no cmake, no librdkafka C build, so CI builds
//! quickly and the center stays easy to cross-compile), tokio-native, and it
//! has what this sink needs: produce with gzip/snappy/lz4/zstd, SASL/PLAIN
//! (`SaslConfig::Plain`), topic creation, and fetch for the tests. It has no
//! consumer groups (not needed to produce) and always produces with
//! acks = all (-1), the most durable level, so `acks` accepts only that.
//!
//! # Semantics
//! - `send` returns once the records are queued; Kafka acknowledgement
//!   returns their bytes to the budget (`queue_bytes`). A slow or absent
//!   broker therefore makes `send` wait (back-pressure onto the agent
//!   stream) under the default `overflow = block`; `overflow = drop` refuses
//!   the batch instead and counts it (`KafkaStats::dropped`).
//! - Failed produce requests are retried with backoff under `block` (order
//!   per partition is kept); under `drop` the batch is counted as dropped.
//! - Partitions follow Sarama's hash partitioner, so one agent's records
//!   keep their order on one partition, as with an Elkeid center. The
//!   partition count is read at connect time.
//! - `connect` needs the cluster: it fails (and the center refuses to start,
//!   naming the brokers) when no broker answers within `request_timeout_ms`
//!   or the topic is missing and `create_topic` is off. After that, a broker
//!   outage only stalls (or, under `drop`, sheds) traffic until it returns.
//! - SASL/PLAIN is wired through rskafka's `SaslConfig::Plain`; the test
//!   broker (tansu) offers only SCRAM, so it is covered by config tests only.
//! - `flush` (graceful shutdown) produces everything queued and waits for
//!   the acknowledgements, at most `flush_timeout_ms`.
//!
//! # Wiring (center side)
//! ```ignore
//! // config.kafka was resolved and checked at load time (exit 64, names the key)
//! let sink: Arc<dyn Sink> = Arc::new(sinks::kafka::KafkaSink::connect(config.kafka.clone()).await?);
//! ```
//! Export `KafkaSink::stats()` and `KafkaSink::in_flight_bytes()` as metrics.

mod config;
mod encode;
mod sink;
#[cfg(test)]
mod tests;

pub(crate) use config::{KEY_ARGS, KafkaFile};
#[cfg(test)]
pub(crate) use config::{KafkaAcks, OverflowPolicy};
pub use config::{KafkaArgs, KafkaConfig};
pub(crate) use sink::KafkaSink;
