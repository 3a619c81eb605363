//! Settings of the Kafka sink, all in one place: its flags (flattened into
//! [`crate::Cli`]), its `[sinks.kafka]` file table, and the resolved
//! [`KafkaConfig`] the sink runs with.
//!
//! | flag | env | file key | default |
//! |---|---|---|---|
//! | `--kafka-brokers B` (comma list) | `ELKEID_CENTER_KAFKA_BROKERS` | `sinks.kafka.brokers` | `["127.0.0.1:9092"]` |
//! | `--kafka-topic T` | `ELKEID_CENTER_KAFKA_TOPIC` | `sinks.kafka.topic` | `hids_svr` |
//! | `--kafka-compression C` | `ELKEID_CENTER_KAFKA_COMPRESSION` | `sinks.kafka.compression` | `none` (none, gzip, snappy, lz4, zstd) |
//! | `--kafka-acks N` | `ELKEID_CENTER_KAFKA_ACKS` | `sinks.kafka.acks` | `-1` (only -1 = all is supported) |
//! | `--kafka-linger-ms N` | `ELKEID_CENTER_KAFKA_LINGER_MS` | `sinks.kafka.linger_ms` | `100` |
//! | `--kafka-max-batch-bytes N` | `ELKEID_CENTER_KAFKA_MAX_BATCH_BYTES` | `sinks.kafka.max_batch_bytes` | `1048576` |
//! | `--kafka-queue N` | `ELKEID_CENTER_KAFKA_QUEUE` | `sinks.kafka.queue` (in-flight bytes) | `67108864` |
//! | `--kafka-drop-when-full true\|false` | `ELKEID_CENTER_KAFKA_DROP_WHEN_FULL` | `sinks.kafka.drop_when_full` | `false` (back-pressure) |
//! | `--kafka-sasl-username U` | `ELKEID_CENTER_KAFKA_SASL_USERNAME` | `sinks.kafka.sasl_username` | none (SASL off) |
//! | `--kafka-sasl-password P` | `ELKEID_CENTER_KAFKA_SASL_PASSWORD` | `sinks.kafka.sasl_password` | none |
//!
//! Values are parsed (numbers, compression names) whether or not the sink is
//! enabled; the sink's own checks (`acks`, empty brokers or topic, sizes) run
//! only when it is.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use crate::config::{ConfigError, parse};

/// Default bootstrap broker when none is configured.
const DEFAULT_BROKER: &str = "127.0.0.1:9092";

/// The Kafka sink's flags (flattened into [`crate::Cli`]).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap brokers (comma list). [default: 127.0.0.1:9092]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_BROKERS", value_delimiter = ',')]
    pub kafka_brokers: Vec<String>,
    /// Kafka topic. [default: hids_svr]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Kafka record-batch compression: none, gzip, snappy, lz4, zstd. [default: none]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_COMPRESSION", value_parser = KafkaCompression::parse)]
    pub kafka_compression: Option<KafkaCompression>,
    /// Kafka acks (-1 = all). [default: -1]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_ACKS", allow_hyphen_values = true, value_parser = parse::number::<i16>)]
    pub kafka_acks: Option<i16>,
    /// Kafka batch linger, ms. [default: 100]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_LINGER_MS", value_parser = parse::number::<u64>)]
    pub kafka_linger_ms: Option<u64>,
    /// Kafka batch size cap, bytes. [default: 1048576]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_MAX_BATCH_BYTES", value_parser = parse::number::<u64>)]
    pub kafka_max_batch_bytes: Option<u64>,
    /// Kafka in-flight budget, bytes. [default: 67108864]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_QUEUE", value_parser = parse::number::<u64>)]
    pub kafka_queue: Option<u64>,
    /// Drop (counted) instead of back-pressure when Kafka is slow (true|false). [default: false]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_DROP_WHEN_FULL", value_parser = parse::boolean)]
    pub kafka_drop_when_full: Option<bool>,
    /// Kafka SASL/PLAIN user (enables SASL).
    #[arg(long, env = "ELKEID_CENTER_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// Kafka SASL/PLAIN password.
    #[arg(long, env = "ELKEID_CENTER_KAFKA_SASL_PASSWORD")]
    pub kafka_sasl_password: Option<String>,
}

/// File key -> argument id (for errors naming the flag or variable).
pub(crate) const KEY_ARGS: &[(&str, &str)] = &[
    ("sinks.kafka.brokers", "kafka_brokers"),
    ("sinks.kafka.topic", "kafka_topic"),
    ("sinks.kafka.compression", "kafka_compression"),
    ("sinks.kafka.acks", "kafka_acks"),
    ("sinks.kafka.linger_ms", "kafka_linger_ms"),
    ("sinks.kafka.max_batch_bytes", "kafka_max_batch_bytes"),
    ("sinks.kafka.queue", "kafka_queue"),
    ("sinks.kafka.drop_when_full", "kafka_drop_when_full"),
    ("sinks.kafka.sasl_username", "kafka_sasl_username"),
];

/// The `[sinks.kafka]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KafkaFile {
    brokers: Option<Vec<String>>,
    topic: Option<String>,
    compression: Option<String>,
    acks: Option<i16>,
    linger_ms: Option<u64>,
    max_batch_bytes: Option<u64>,
    queue: Option<u64>,
    drop_when_full: Option<bool>,
    sasl_username: Option<String>,
    sasl_password: Option<String>,
}

/// The resolved settings the Kafka sink runs with. Only the fields named in
/// the table above are settable; the rest keep their defaults (tests set
/// them).
#[derive(Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` (Elkeid: `kafka.addrs`).
    pub brokers: Vec<String>,
    /// Topic receiving one `MQData` per record (Elkeid: `kafka.topic`).
    pub topic: String,
    /// Kafka client id.
    pub client_id: String,
    /// Record-batch compression; Elkeid's producer uses none.
    pub compression: KafkaCompression,
    /// Acknowledgement level. The client (rskafka) always asks for `all`
    /// (acks = -1), the safest level; other values are refused at load time
    /// rather than silently ignored.
    pub acks: KafkaAcks,
    /// How long a partition's batch may wait for more records before it is
    /// produced (`linger_ms`).
    pub linger_ms: u64,
    /// A partition's batch is produced as soon as it holds this many bytes
    /// (keys + values; `max_batch_bytes`).
    pub batch_bytes: usize,
    /// Largest single message value; a record whose `MQData` is bigger is
    /// refused by any broker, so it is logged and counted as oversized
    /// (Elkeid: `MaxMessageBytes` 4 MiB).
    pub max_message_bytes: usize,
    /// Bound on bytes accepted but not yet acknowledged by Kafka (the
    /// in-flight queue, `queue`). When it is full, `send` waits
    /// (`overflow = block`) or drops and counts (`overflow = drop`).
    pub queue_bytes: usize,
    /// What `send` does when the in-flight queue is full (`drop_when_full`).
    pub overflow: OverflowPolicy,
    /// How long one produce request (with the client's retries) may take
    /// before the sink counts an error and tries again.
    pub request_timeout_ms: u64,
    /// How long `flush` (graceful shutdown) waits for Kafka to take
    /// everything queued.
    pub flush_timeout_ms: u64,
    /// Create the topic when the cluster does not have it.
    pub create_topic: bool,
    /// Partitions of a topic created by `create_topic`.
    pub create_partitions: i32,
    /// Replication factor of a topic created by `create_topic`.
    pub create_replication: i16,
    /// SASL/PLAIN credentials (on when a user or password is set).
    pub sasl: SaslConfig,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: Vec::new(),
            topic: "hids_svr".into(),
            client_id: "elkeid-center".into(),
            compression: KafkaCompression::None,
            acks: KafkaAcks::All,
            linger_ms: 100,
            batch_bytes: 1024 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            queue_bytes: 64 * 1024 * 1024,
            overflow: OverflowPolicy::Block,
            request_timeout_ms: 30_000,
            flush_timeout_ms: 30_000,
            create_topic: true,
            create_partitions: 1,
            create_replication: 1,
            sasl: SaslConfig::default(),
        }
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("client_id", &self.client_id)
            .field("compression", &self.compression)
            .field("acks", &self.acks)
            .field("linger_ms", &self.linger_ms)
            .field("batch_bytes", &self.batch_bytes)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("queue_bytes", &self.queue_bytes)
            .field("overflow", &self.overflow)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("flush_timeout_ms", &self.flush_timeout_ms)
            .field("create_topic", &self.create_topic)
            .field("create_partitions", &self.create_partitions)
            .field("create_replication", &self.create_replication)
            .field("sasl", &self.sasl)
            .finish()
    }
}

fn invalid(key: &'static str, msg: &str) -> ConfigError {
    ConfigError::Invalid {
        key,
        msg: msg.to_string(),
    }
}

impl KafkaConfig {
    /// Flag > env > file > default; `enabled` runs the sink's own checks.
    pub(crate) fn resolve(
        args: KafkaArgs,
        file: KafkaFile,
        enabled: bool,
    ) -> Result<KafkaConfig, ConfigError> {
        let d = KafkaConfig::default();
        let compression = match args.kafka_compression {
            Some(c) => c,
            None => match file.compression {
                Some(s) => KafkaCompression::parse(&s).map_err(|msg| ConfigError::Invalid {
                    key: "sinks.kafka.compression",
                    msg,
                })?,
                None => d.compression,
            },
        };
        let acks = args.kafka_acks.or(file.acks);
        let size = |key: &'static str, v: Option<u64>, default: usize| match v {
            None => Ok(default),
            Some(v) => usize::try_from(v).map_err(|_| invalid(key, "too large")),
        };
        let user = args.kafka_sasl_username.or(file.sasl_username);
        let password = args.kafka_sasl_password.or(file.sasl_password);
        let sasl = match (user, password) {
            (None, None) => SaslConfig::default(),
            (u, p) => SaslConfig {
                enable: true,
                username: u.unwrap_or_default(),
                password: p.unwrap_or_default(),
            },
        };
        let cfg = KafkaConfig {
            brokers: if args.kafka_brokers.is_empty() {
                file.brokers
                    .unwrap_or_else(|| vec![DEFAULT_BROKER.to_string()])
            } else {
                args.kafka_brokers
            },
            topic: args.kafka_topic.or(file.topic).unwrap_or(d.topic.clone()),
            compression,
            linger_ms: args
                .kafka_linger_ms
                .or(file.linger_ms)
                .unwrap_or(d.linger_ms),
            batch_bytes: size(
                "sinks.kafka.max_batch_bytes",
                args.kafka_max_batch_bytes.or(file.max_batch_bytes),
                d.batch_bytes,
            )?,
            queue_bytes: size(
                "sinks.kafka.queue",
                args.kafka_queue.or(file.queue),
                d.queue_bytes,
            )?,
            overflow: if args.kafka_drop_when_full.or(file.drop_when_full) == Some(true) {
                OverflowPolicy::Drop
            } else {
                OverflowPolicy::Block
            },
            sasl,
            ..d
        };
        if enabled {
            if acks.is_some_and(|a| a != -1) {
                return Err(invalid(
                    "sinks.kafka.acks",
                    "only -1 (all) is supported: the client always waits for all in-sync replicas",
                ));
            }
            cfg.validate()?;
        }
        Ok(cfg)
    }

    /// Checks what the types cannot; the error names the bad key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.is_empty() {
            return Err(invalid(
                "sinks.kafka.brokers",
                "must list at least one broker",
            ));
        }
        if self.brokers.iter().any(|b| b.trim().is_empty()) {
            return Err(invalid("sinks.kafka.brokers", "contains an empty address"));
        }
        if self.topic.is_empty() {
            return Err(invalid("sinks.kafka.topic", "must not be empty"));
        }
        if self.queue_bytes == 0 || self.queue_bytes > MAX_QUEUE_BYTES {
            return Err(invalid("sinks.kafka.queue", "must be 1..=4294967295"));
        }
        if self.batch_bytes == 0 {
            return Err(invalid("sinks.kafka.max_batch_bytes", "must be > 0"));
        }
        if self.max_message_bytes == 0 {
            return Err(invalid("sinks.kafka.max_message_bytes", "must be > 0"));
        }
        if self.create_topic && self.create_partitions < 1 {
            return Err(invalid("sinks.kafka.create_partitions", "must be >= 1"));
        }
        if self.create_topic && self.create_replication < 1 {
            return Err(invalid("sinks.kafka.create_replication", "must be >= 1"));
        }
        if self.sasl.enable && self.sasl.username.is_empty() {
            return Err(invalid(
                "sinks.kafka.sasl_username",
                "must be set when a SASL password is",
            ));
        }
        Ok(())
    }

    pub(crate) fn linger(&self) -> Duration {
        Duration::from_millis(self.linger_ms)
    }

    pub(crate) fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub(crate) fn flush_timeout(&self) -> Duration {
        Duration::from_millis(self.flush_timeout_ms)
    }
}

/// The in-flight queue is counted in bytes with a `u32` semaphore request.
pub(crate) const MAX_QUEUE_BYTES: usize = u32::MAX as usize;

/// Record-batch compression codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaCompression {
    /// No compression (Elkeid's default).
    #[default]
    None,
    /// gzip.
    Gzip,
    /// Snappy (Kafka's xerial framing).
    Snappy,
    /// LZ4 frames.
    Lz4,
    /// zstd.
    Zstd,
}

impl KafkaCompression {
    /// `none` (or empty), `gzip`, `snappy`, `lz4`, `zstd` (clap value parser).
    pub(crate) fn parse(s: &str) -> Result<KafkaCompression, String> {
        match s.trim() {
            "" | "none" => Ok(KafkaCompression::None),
            "gzip" => Ok(KafkaCompression::Gzip),
            "snappy" => Ok(KafkaCompression::Snappy),
            "lz4" => Ok(KafkaCompression::Lz4),
            "zstd" => Ok(KafkaCompression::Zstd),
            other => Err(format!(
                "unknown compression `{other}` (expected none, gzip, snappy, lz4 or zstd)"
            )),
        }
    }

    pub(crate) fn to_rskafka(self) -> rskafka::client::partition::Compression {
        use rskafka::client::partition::Compression as C;
        match self {
            KafkaCompression::None => C::NoCompression,
            KafkaCompression::Gzip => C::Gzip,
            KafkaCompression::Snappy => C::Snappy,
            KafkaCompression::Lz4 => C::Lz4,
            KafkaCompression::Zstd => C::Zstd,
        }
    }
}

/// Producer acknowledgement level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KafkaAcks {
    /// Wait for all in-sync replicas (acks = -1).
    #[default]
    All,
}

/// What `send` does when the in-flight queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Wait for room: back-pressure onto the agent stream; nothing is lost.
    #[default]
    Block,
    /// Refuse the batch at once and count its records as dropped.
    Drop,
}

/// SASL/PLAIN settings.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SaslConfig {
    /// Authenticate with SASL/PLAIN.
    pub enable: bool,
    /// User name.
    pub username: String,
    /// Password (never logged).
    pub password: String,
}

impl fmt::Debug for SaslConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslConfig")
            .field("enable", &self.enable)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> KafkaArgs {
        let cli =
            crate::Cli::parse_args_from(std::iter::once("elkeid-center").chain(a.iter().copied()))
                .unwrap();
        cli.sink_args.kafka
    }

    fn file(text: &str) -> KafkaFile {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_match_elkeid() {
        let c = KafkaConfig::resolve(KafkaArgs::default(), KafkaFile::default(), true).unwrap();
        assert_eq!(c.brokers, [DEFAULT_BROKER]);
        assert_eq!(c.topic, "hids_svr");
        assert_eq!(c.compression, KafkaCompression::None);
        assert_eq!(c.acks, KafkaAcks::All);
        assert_eq!(c.overflow, OverflowPolicy::Block);
        assert_eq!(c.linger(), Duration::from_millis(100));
        assert_eq!((c.batch_bytes, c.queue_bytes), (1 << 20, 64 << 20));
        assert_eq!(c.max_message_bytes, 4 * 1024 * 1024);
        assert!(!c.sasl.enable);
    }

    #[test]
    fn flags_beat_the_file_table() {
        let f = file(
            "brokers = [\"a:1\", \"b:2\"]\ntopic = \"t\"\ncompression = \"zstd\"\nacks = -1\n\
             linger_ms = 5\nmax_batch_bytes = 1000\nqueue = 5000\ndrop_when_full = true\n\
             sasl_username = \"u\"\nsasl_password = \"p\"\n",
        );
        let c = KafkaConfig::resolve(
            args(&["--kafka-compression", "lz4", "--kafka-linger-ms", "7"]),
            f,
            true,
        )
        .unwrap();
        assert_eq!(c.brokers, ["a:1", "b:2"]);
        assert_eq!(c.topic, "t");
        assert_eq!(c.compression, KafkaCompression::Lz4);
        assert_eq!((c.linger_ms, c.batch_bytes, c.queue_bytes), (7, 1000, 5000));
        assert_eq!(c.overflow, OverflowPolicy::Drop);
        assert!(c.sasl.enable && c.sasl.username == "u" && c.sasl.password == "p");
        assert!(
            !format!("{c:?}").contains("\"p\""),
            "password must not be printed"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let key = |r: Result<KafkaConfig, ConfigError>| match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            key(KafkaConfig::resolve(
                args(&["--kafka-acks", "1"]),
                KafkaFile::default(),
                true
            )),
            "sinks.kafka.acks"
        );
        // The sink's own checks run only when it is enabled.
        KafkaConfig::resolve(args(&["--kafka-acks", "1"]), KafkaFile::default(), false).unwrap();
        assert_eq!(
            key(KafkaConfig::resolve(
                KafkaArgs::default(),
                file("compression = \"brotli\""),
                false
            )),
            "sinks.kafka.compression"
        );
        assert_eq!(
            key(KafkaConfig::resolve(
                KafkaArgs::default(),
                file("brokers = []"),
                true
            )),
            "sinks.kafka.brokers"
        );
        assert_eq!(
            key(KafkaConfig::resolve(
                KafkaArgs::default(),
                file("queue = 0"),
                true
            )),
            "sinks.kafka.queue"
        );
        assert_eq!(
            key(KafkaConfig::resolve(
                KafkaArgs::default(),
                file("sasl_password = \"p\""),
                true
            )),
            "sinks.kafka.sasl_username"
        );
        let e = toml::from_str::<KafkaFile>("compresion = \"gzip\"").unwrap_err();
        assert!(e.to_string().contains("compresion"), "{e}");
        assert_eq!(
            key(KafkaConfig::default()
                .validate()
                .map(|()| KafkaConfig::default())),
            "sinks.kafka.brokers"
        );
        let e = crate::Cli::parse_args_from(["elkeid-center", "--kafka-compression", "brotli"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("flag --kafka-compression") && e.contains("brotli"),
            "{e}"
        );
    }
}
