//! `[kafka]` configuration of the Kafka sink.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// Settings of the Kafka sink, embedded by the center under `[kafka]` in its
/// TOML file. Every key has a default except `brokers`.
///
/// ```toml
/// [kafka]
/// brokers = ["10.0.0.1:9092", "10.0.0.2:9092"]
/// topic = "hids_svr"
/// compression = "none"      # none | gzip | snappy | lz4 | zstd
/// acks = "all"
/// linger_ms = 100
/// batch_bytes = 1048576
/// queue_bytes = 67108864
/// overflow = "block"        # block | drop
/// [kafka.sasl]
/// enable = true
/// username = "user"
/// password = "secret"
/// ```
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct KafkaConfig {
    /// Bootstrap brokers, `host:port` (Elkeid: `kafka.addrs`).
    pub(crate) brokers: Vec<String>,
    /// Topic receiving one `MQData` per record (Elkeid: `kafka.topic`).
    pub(crate) topic: String,
    /// Kafka client id.
    pub(crate) client_id: String,
    /// Record-batch compression; Elkeid's producer uses none.
    pub(crate) compression: KafkaCompression,
    /// Acknowledgement level. The client (rskafka) always asks for `all`
    /// (acks = -1), the safest level; other values are refused at load time
    /// rather than silently ignored.
    pub(crate) acks: KafkaAcks,
    /// How long a partition's batch may wait for more records before it is
    /// produced.
    pub(crate) linger_ms: u64,
    /// A partition's batch is produced as soon as it holds this many bytes
    /// (keys + values).
    pub(crate) batch_bytes: usize,
    /// Largest single message value; a record whose `MQData` is bigger is
    /// refused by any broker, so it is logged and counted as oversized
    /// (Elkeid: `MaxMessageBytes` 4 MiB).
    pub(crate) max_message_bytes: usize,
    /// Bound on bytes accepted but not yet acknowledged by Kafka (the
    /// in-flight queue). When it is full, `send` waits (`overflow = block`)
    /// or drops and counts (`overflow = drop`).
    pub(crate) queue_bytes: usize,
    /// What `send` does when the in-flight queue is full.
    pub(crate) overflow: OverflowPolicy,
    /// How long one produce request (with the client's retries) may take
    /// before the sink counts an error and tries again.
    pub(crate) request_timeout_ms: u64,
    /// How long `flush` (graceful shutdown) waits for Kafka to take
    /// everything queued.
    pub(crate) flush_timeout_ms: u64,
    /// Create the topic when the cluster does not have it.
    pub(crate) create_topic: bool,
    /// Partitions of a topic created by `create_topic`.
    pub(crate) create_partitions: i32,
    /// Replication factor of a topic created by `create_topic`.
    pub(crate) create_replication: i16,
    /// SASL/PLAIN credentials (Elkeid: `kafka.sasl.*`).
    pub(crate) sasl: SaslConfig,
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

impl KafkaConfig {
    /// Checks values serde cannot; the error names the bad key.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.is_empty() {
            return Err(ConfigError {
                key: "kafka.brokers",
                why: "must list at least one broker",
            });
        }
        if self.brokers.iter().any(|b| b.trim().is_empty()) {
            return Err(ConfigError {
                key: "kafka.brokers",
                why: "contains an empty address",
            });
        }
        if self.topic.is_empty() {
            return Err(ConfigError {
                key: "kafka.topic",
                why: "must not be empty",
            });
        }
        if self.queue_bytes == 0 || self.queue_bytes > MAX_QUEUE_BYTES {
            return Err(ConfigError {
                key: "kafka.queue_bytes",
                why: "must be 1..=4294967295",
            });
        }
        if self.batch_bytes == 0 {
            return Err(ConfigError {
                key: "kafka.batch_bytes",
                why: "must be > 0",
            });
        }
        if self.max_message_bytes == 0 {
            return Err(ConfigError {
                key: "kafka.max_message_bytes",
                why: "must be > 0",
            });
        }
        if self.create_topic && self.create_partitions < 1 {
            return Err(ConfigError {
                key: "kafka.create_partitions",
                why: "must be >= 1",
            });
        }
        if self.create_topic && self.create_replication < 1 {
            return Err(ConfigError {
                key: "kafka.create_replication",
                why: "must be >= 1",
            });
        }
        if self.sasl.enable && self.sasl.username.is_empty() {
            return Err(ConfigError {
                key: "kafka.sasl.username",
                why: "must be set when sasl.enable = true",
            });
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

impl KafkaConfig {
    /// Maps the center's `[sinks.kafka]` settings (flags, env, file) onto
    /// the sink's configuration, filling defaults, then validates. `queue`
    /// is the in-flight budget in bytes; `acks` must be -1 (all).
    pub(crate) fn from_center(c: &crate::config::KafkaConfig) -> Result<KafkaConfig, ConfigError> {
        let d = KafkaConfig::default();
        let compression = match c.compression.as_deref().map(str::trim) {
            None | Some("" | "none") => KafkaCompression::None,
            Some("gzip") => KafkaCompression::Gzip,
            Some("snappy") => KafkaCompression::Snappy,
            Some("lz4") => KafkaCompression::Lz4,
            Some("zstd") => KafkaCompression::Zstd,
            Some(_) => {
                return Err(ConfigError {
                    key: "sinks.kafka.compression",
                    why: "expected none, gzip, snappy, lz4 or zstd",
                });
            }
        };
        if c.acks.is_some_and(|a| a != -1) {
            return Err(ConfigError {
                key: "sinks.kafka.acks",
                why: "only -1 (all) is supported: the client always waits for all in-sync replicas",
            });
        }
        let size = |key: &'static str, v: Option<u64>, default: usize| match v {
            None => Ok(default),
            Some(v) => usize::try_from(v).map_err(|_| ConfigError {
                key,
                why: "too large",
            }),
        };
        let sasl = match (&c.sasl_username, &c.sasl_password) {
            (None, None) => SaslConfig::default(),
            (u, p) => SaslConfig {
                enable: true,
                username: u.clone().unwrap_or_default(),
                password: p.clone().unwrap_or_default(),
            },
        };
        let cfg = KafkaConfig {
            brokers: c.brokers.clone(),
            topic: c.topic.clone(),
            compression,
            linger_ms: c.linger_ms.unwrap_or(d.linger_ms),
            batch_bytes: size(
                "sinks.kafka.max_batch_bytes",
                c.max_batch_bytes,
                d.batch_bytes,
            )?,
            queue_bytes: size("sinks.kafka.queue", c.queue, d.queue_bytes)?,
            overflow: if c.drop_when_full == Some(true) {
                OverflowPolicy::Drop
            } else {
                OverflowPolicy::Block
            },
            sasl,
            ..d
        };
        cfg.validate().map_err(|e| ConfigError {
            key: center_key(e.key),
            why: e.why,
        })?;
        Ok(cfg)
    }
}

/// The center's name (`sinks.kafka.*`) for one of our `kafka.*` keys.
fn center_key(key: &'static str) -> &'static str {
    match key {
        "kafka.brokers" => "sinks.kafka.brokers",
        "kafka.topic" => "sinks.kafka.topic",
        "kafka.queue_bytes" => "sinks.kafka.queue",
        "kafka.batch_bytes" => "sinks.kafka.max_batch_bytes",
        "kafka.sasl.username" => "sinks.kafka.sasl_username",
        other => other,
    }
}

/// The in-flight queue is counted in bytes with a `u32` semaphore request.
pub(crate) const MAX_QUEUE_BYTES: usize = u32::MAX as usize;

/// A bad `[kafka]` value.
#[derive(Debug, thiserror::Error)]
#[error("bad config key {key}: {why}")]
pub(crate) struct ConfigError {
    /// Dotted key, e.g. `kafka.brokers`.
    pub(crate) key: &'static str,
    /// What is wrong with it.
    pub(crate) why: &'static str,
}

/// Record-batch compression codec.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum KafkaCompression {
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
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub(crate) enum KafkaAcks {
    /// Wait for all in-sync replicas (acks = -1).
    #[default]
    #[serde(rename = "all", alias = "-1")]
    All,
}

/// What `send` does when the in-flight queue is full.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum OverflowPolicy {
    /// Wait for room: back-pressure onto the agent stream; nothing is lost.
    #[default]
    Block,
    /// Refuse the batch at once and count its records as dropped.
    Drop,
}

/// SASL/PLAIN settings (`[kafka.sasl]`).
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct SaslConfig {
    /// Authenticate with SASL/PLAIN.
    pub(crate) enable: bool,
    /// User name.
    pub(crate) username: String,
    /// Password (never logged).
    pub(crate) password: String,
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

    #[test]
    fn defaults_match_elkeid() {
        let c: KafkaConfig = toml::from_str("brokers = [\"127.0.0.1:9092\"]").unwrap();
        assert_eq!(c.topic, "hids_svr");
        assert_eq!(c.compression, KafkaCompression::None);
        assert_eq!(c.overflow, OverflowPolicy::Block);
        assert_eq!(c.max_message_bytes, 4 * 1024 * 1024);
        assert!(!c.sasl.enable);
        c.validate().unwrap();
    }

    #[test]
    fn full_table_parses() {
        let c: KafkaConfig = toml::from_str(
            r#"
            brokers = ["a:1", "b:2"]
            topic = "t"
            compression = "zstd"
            acks = "-1"
            linger_ms = 5
            overflow = "drop"
            [sasl]
            enable = true
            username = "u"
            password = "p"
            "#,
        )
        .unwrap();
        assert_eq!(c.brokers, ["a:1", "b:2"]);
        assert_eq!(c.compression, KafkaCompression::Zstd);
        assert_eq!(c.acks, KafkaAcks::All);
        assert_eq!(c.overflow, OverflowPolicy::Drop);
        assert_eq!(c.linger(), Duration::from_millis(5));
        assert!(c.sasl.enable);
        c.validate().unwrap();
        assert!(
            !format!("{c:?}").contains("\"p\""),
            "password must not be printed"
        );
    }

    #[test]
    fn from_center_maps_and_checks() {
        let c = crate::config::KafkaConfig {
            brokers: vec!["127.0.0.1:9092".into()],
            topic: "t".into(),
            compression: Some("lz4".into()),
            acks: Some(-1),
            linger_ms: Some(7),
            max_batch_bytes: Some(1000),
            queue: Some(5000),
            drop_when_full: Some(true),
            sasl_username: Some("u".into()),
            sasl_password: Some("p".into()),
        };
        let k = KafkaConfig::from_center(&c).unwrap();
        assert_eq!(k.compression, KafkaCompression::Lz4);
        assert_eq!((k.linger_ms, k.batch_bytes, k.queue_bytes), (7, 1000, 5000));
        assert_eq!(k.overflow, OverflowPolicy::Drop);
        assert!(k.sasl.enable && k.sasl.username == "u" && k.sasl.password == "p");
        let bad = crate::config::KafkaConfig {
            acks: Some(1),
            ..c.clone()
        };
        assert_eq!(
            KafkaConfig::from_center(&bad).unwrap_err().key,
            "sinks.kafka.acks"
        );
        let bad = crate::config::KafkaConfig {
            compression: Some("brotli".into()),
            ..c.clone()
        };
        assert_eq!(
            KafkaConfig::from_center(&bad).unwrap_err().key,
            "sinks.kafka.compression"
        );
        let bad = crate::config::KafkaConfig {
            brokers: vec![],
            ..c
        };
        assert_eq!(
            KafkaConfig::from_center(&bad).unwrap_err().key,
            "sinks.kafka.brokers"
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = toml::from_str::<KafkaConfig>("acks = \"1\"").unwrap_err();
        assert!(e.to_string().contains("acks"), "{e}");
        let e = toml::from_str::<KafkaConfig>("compresion = \"gzip\"").unwrap_err();
        assert!(e.to_string().contains("compresion"), "{e}");
        let e = KafkaConfig::default().validate().unwrap_err();
        assert_eq!(e.key, "kafka.brokers");
        let c = KafkaConfig {
            brokers: vec!["x:1".into()],
            sasl: SaslConfig {
                enable: true,
                ..SaslConfig::default()
            },
            ..KafkaConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "kafka.sasl.username");
    }
}
