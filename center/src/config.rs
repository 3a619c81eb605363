//! Configuration: a TOML file (`--config`), every key overridable by a flag
//! and by an environment variable. Precedence: flag > env > file > default.
//!
//! # Command line (stable)
//!
//! | flag | env | file key | default |
//! |---|---|---|---|
//! | `--config FILE` | `ELKEID_CENTER_CONFIG` | — | none |
//! | `--data-dir DIR` | `ELKEID_CENTER_DATA_DIR` | `data_dir` | `./elkeid-data` |
//! | `--log-level L` | `ELKEID_CENTER_LOG_LEVEL` | `log_level` | `info` (a tracing filter) |
//! | `--grpc-addr A` | `ELKEID_CENTER_GRPC_ADDR` | `grpc.addr` | `0.0.0.0:6751` |
//! | `--conn-limit N` | `ELKEID_CENTER_CONN_LIMIT` | `grpc.conn_limit` | `10000` |
//! | `--first-packet-timeout-secs N` | `ELKEID_CENTER_FIRST_PACKET_TIMEOUT_SECS` | `grpc.first_packet_timeout_secs` | `30` |
//! | `--max-message-bytes N` | `ELKEID_CENTER_MAX_MESSAGE_BYTES` | `grpc.max_message_bytes` | `10485760` |
//! | `--insecure-plaintext` | `ELKEID_CENTER_INSECURE_PLAINTEXT` | `grpc.tls = false` | TLS on |
//! | `--tls-ca F` | `ELKEID_CENTER_TLS_CA` | `grpc.ca_file` | `DIR/pki/ca.crt` |
//! | `--tls-cert F` | `ELKEID_CENTER_TLS_CERT` | `grpc.cert_file` | `DIR/pki/server.crt` |
//! | `--tls-key F` | `ELKEID_CENTER_TLS_KEY` | `grpc.key_file` | `DIR/pki/server.key` |
//! | `--upload-max-bytes N` | `ELKEID_CENTER_UPLOAD_MAX_BYTES` | `grpc.upload_max_bytes` | `536870912` |
//! | `--http-addr A` | `ELKEID_CENTER_HTTP_ADDR` | `http.addr` | `0.0.0.0:6752` |
//! | `--http-tls true\|false` | `ELKEID_CENTER_HTTP_TLS` | `http.tls` | `false` (HTTPS with the gRPC server certificate) |
//! | `--auth true\|false` | `ELKEID_CENTER_AUTH` | `http.auth` | `true` |
//! | `--api-keys F` | `ELKEID_CENTER_API_KEYS` | `http.api_keys_file` | `DIR/api-keys.toml` |
//! | `--sink S` (repeatable) | `ELKEID_CENTER_SINK` (comma list) | `sinks.enabled` | `["ndjson"]` |
//! | `--ndjson-dir D` | `ELKEID_CENTER_NDJSON_DIR` | `sinks.ndjson.dir` | `DIR/records` |
//! | `--ndjson-rotate-bytes N` | `ELKEID_CENTER_NDJSON_ROTATE_BYTES` | `sinks.ndjson.rotate_bytes` | `268435456` |
//! | `--kafka-brokers B` (comma list) | `ELKEID_CENTER_KAFKA_BROKERS` | `sinks.kafka.brokers` | `["127.0.0.1:9092"]` |
//! | `--kafka-topic T` | `ELKEID_CENTER_KAFKA_TOPIC` | `sinks.kafka.topic` | `hids_svr` |
//! | `--manager local\|elkeid` | `ELKEID_CENTER_MANAGER` | `manager.backend` | `local` |
//! | `--manager-addr A` (comma list) | `ELKEID_CENTER_MANAGER_ADDR` | `manager.addrs` | `[]` (required for `elkeid`) |
//! | `--components-file F` | `ELKEID_CENTER_COMPONENTS_FILE` | `manager.components_file` | `DIR/components.json` |
//! | `--manager-timeout-ms N` | `ELKEID_CENTER_MANAGER_TIMEOUT_MS` | `manager.timeout_ms` | `5000` |
//! | `--manager-retries N` | `ELKEID_CENTER_MANAGER_RETRIES` | `manager.retries` | `2` |
//! | `--command-queue N` | `ELKEID_CENTER_COMMAND_QUEUE` | `commands.queue_len` | `1024` |
//! | `--command-send-timeout-ms N` | `ELKEID_CENTER_COMMAND_SEND_TIMEOUT_MS` | `commands.send_timeout_ms` | `2000` |
//! | `--command-result-timeout-ms N` | `ELKEID_CENTER_COMMAND_RESULT_TIMEOUT_MS` | `commands.result_timeout_ms` | `2000` |
//!
//! | `--kafka-compression C` | `ELKEID_CENTER_KAFKA_COMPRESSION` | `sinks.kafka.compression` | `none` (none, gzip, snappy, lz4, zstd) |
//! | `--kafka-acks N` | `ELKEID_CENTER_KAFKA_ACKS` | `sinks.kafka.acks` | `-1` (only -1 = all is supported) |
//! | `--kafka-linger-ms N` | `ELKEID_CENTER_KAFKA_LINGER_MS` | `sinks.kafka.linger_ms` | `100` |
//! | `--kafka-max-batch-bytes N` | `ELKEID_CENTER_KAFKA_MAX_BATCH_BYTES` | `sinks.kafka.max_batch_bytes` | `1048576` |
//! | `--kafka-queue N` | `ELKEID_CENTER_KAFKA_QUEUE` | `sinks.kafka.queue` (in-flight bytes) | `67108864` |
//! | `--kafka-drop-when-full true\|false` | `ELKEID_CENTER_KAFKA_DROP_WHEN_FULL` | `sinks.kafka.drop_when_full` | `false` (back-pressure) |
//! | `--kafka-sasl-username U` | `ELKEID_CENTER_KAFKA_SASL_USERNAME` | `sinks.kafka.sasl_username` | none (SASL off) |
//! | `--kafka-sasl-password P` | `ELKEID_CENTER_KAFKA_SASL_PASSWORD` | `sinks.kafka.sasl_password` | none |
//!
//! The Kafka defaults are applied by the Kafka sink (`sinks/kafka/config.rs`).
//!
//! Unknown file keys are errors. Any bad key makes the binary exit with code
//! 64 and a message naming the key.
//!
//! # Plaintext mode
//! `--insecure-plaintext` (or `grpc.tls = false`) serves gRPC over cleartext
//! HTTP/2 (h2c) without any client authentication. Real Elkeid agents always
//! use TLS; use this only behind a TLS-terminating proxy or for local tests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// A configuration error; `key` names the offending configuration key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("config: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has a bad/unknown key.
    #[error("config: {path}: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message (names the key).
        msg: String,
    },
    /// A value given by a flag or an environment variable is out of range
    /// or malformed; `subject` names what the user set.
    #[error("config: bad value for {subject} (key `{key}`): {msg}")]
    InvalidArg {
        /// `flag --conn-limit` or `environment variable ELKEID_CENTER_CONN_LIMIT`.
        subject: String,
        /// The key, in file notation.
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A value is out of range or malformed.
    #[error("config: bad value for key `{key}`: {msg}")]
    Invalid {
        /// The key, in file notation (`grpc.conn_limit`).
        key: &'static str,
        /// What is wrong.
        msg: String,
    },
}

/// Command-line flags (each also readable from `ELKEID_CENTER_*`).
#[derive(Debug, Default, Parser)]
#[command(
    name = "elkeid-center",
    version,
    about = "Elkeid-compatible agent center"
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "ELKEID_CENTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (PKI, api keys, records, uploads). [default: ./elkeid-data]
    #[arg(long, env = "ELKEID_CENTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Log filter (tracing `EnvFilter` syntax). [default: info]
    #[arg(long, env = "ELKEID_CENTER_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// gRPC listen address. [default: 0.0.0.0:6751]
    #[arg(long, env = "ELKEID_CENTER_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
    /// Maximum concurrent agent streams. [default: 10000]
    #[arg(long, env = "ELKEID_CENTER_CONN_LIMIT")]
    pub conn_limit: Option<String>,
    /// Seconds to wait for the first packet of a stream. [default: 30]
    #[arg(long, env = "ELKEID_CENTER_FIRST_PACKET_TIMEOUT_SECS")]
    pub first_packet_timeout_secs: Option<String>,
    /// Maximum gRPC message size (decompressed), bytes. [default: 10485760]
    #[arg(long, env = "ELKEID_CENTER_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<String>,
    /// Serve gRPC without TLS (h2c). Only for tests / behind a proxy.
    #[arg(long, env = "ELKEID_CENTER_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// CA certificate (PEM) that agent client certificates must chain to. [default: DATA_DIR/pki/ca.crt]
    #[arg(long, env = "ELKEID_CENTER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Server certificate (PEM). [default: DATA_DIR/pki/server.crt]
    #[arg(long, env = "ELKEID_CENTER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM). [default: DATA_DIR/pki/server.key]
    #[arg(long, env = "ELKEID_CENTER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Maximum size of one uploaded file, bytes. [default: 536870912]
    #[arg(long, env = "ELKEID_CENTER_UPLOAD_MAX_BYTES")]
    pub upload_max_bytes: Option<String>,
    /// HTTP API listen address. [default: 0.0.0.0:6752]
    #[arg(long, env = "ELKEID_CENTER_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Serve the HTTP API over TLS with the server certificate (true|false). [default: false]
    #[arg(long, env = "ELKEID_CENTER_HTTP_TLS")]
    pub http_tls: Option<String>,
    /// AK/SK authentication of the HTTP API (true|false). [default: true]
    #[arg(long, env = "ELKEID_CENTER_AUTH")]
    pub auth: Option<String>,
    /// TOML file with the `[aksk]` table. [default: DATA_DIR/api-keys.toml]
    #[arg(long, env = "ELKEID_CENTER_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Sinks to enable: ndjson, null, kafka (repeatable). [default: ndjson]
    #[arg(long = "sink", env = "ELKEID_CENTER_SINK", value_delimiter = ',')]
    pub sinks: Vec<String>,
    /// Directory of the NDJSON sink. [default: DATA_DIR/records]
    #[arg(long, env = "ELKEID_CENTER_NDJSON_DIR")]
    pub ndjson_dir: Option<PathBuf>,
    /// NDJSON file size at which a new file is started, bytes. [default: 268435456]
    #[arg(long, env = "ELKEID_CENTER_NDJSON_ROTATE_BYTES")]
    pub ndjson_rotate_bytes: Option<String>,
    /// Kafka bootstrap brokers (comma list). [default: 127.0.0.1:9092]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_BROKERS", value_delimiter = ',')]
    pub kafka_brokers: Vec<String>,
    /// Kafka topic. [default: hids_svr]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Kafka record-batch compression: none, gzip, snappy, lz4, zstd. [default: none]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_COMPRESSION")]
    pub kafka_compression: Option<String>,
    /// Kafka acks (-1 = all). [default: -1]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_ACKS", allow_hyphen_values = true)]
    pub kafka_acks: Option<String>,
    /// Kafka batch linger, ms. [default: 100]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_LINGER_MS")]
    pub kafka_linger_ms: Option<String>,
    /// Kafka batch size cap, bytes. [default: 1048576]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_MAX_BATCH_BYTES")]
    pub kafka_max_batch_bytes: Option<String>,
    /// Kafka in-flight budget, bytes. [default: 67108864]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_QUEUE")]
    pub kafka_queue: Option<String>,
    /// Drop (counted) instead of back-pressure when Kafka is slow (true|false). [default: false]
    #[arg(long, env = "ELKEID_CENTER_KAFKA_DROP_WHEN_FULL")]
    pub kafka_drop_when_full: Option<String>,
    /// Kafka SASL/PLAIN user (enables SASL).
    #[arg(long, env = "ELKEID_CENTER_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,
    /// Kafka SASL/PLAIN password.
    #[arg(long, env = "ELKEID_CENTER_KAFKA_SASL_PASSWORD")]
    pub kafka_sasl_password: Option<String>,
    /// Manager backend: local | elkeid. [default: local]
    #[arg(long, env = "ELKEID_CENTER_MANAGER")]
    pub manager: Option<String>,
    /// Elkeid manager address(es), host:port (comma list).
    #[arg(long, env = "ELKEID_CENTER_MANAGER_ADDR", value_delimiter = ',')]
    pub manager_addr: Vec<String>,
    /// Local manager component file (JSON or TOML). [default: DATA_DIR/components.json]
    #[arg(long, env = "ELKEID_CENTER_COMPONENTS_FILE")]
    pub components_file: Option<PathBuf>,
    /// Timeout of one manager HTTP call, ms. [default: 5000]
    #[arg(long, env = "ELKEID_CENTER_MANAGER_TIMEOUT_MS")]
    pub manager_timeout_ms: Option<String>,
    /// Retries of a failed manager HTTP call. [default: 2]
    #[arg(long, env = "ELKEID_CENTER_MANAGER_RETRIES")]
    pub manager_retries: Option<String>,
    /// Per-connection command queue length. [default: 1024]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_QUEUE")]
    pub command_queue: Option<String>,
    /// Command enqueue timeout, ms. [default: 2000]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_SEND_TIMEOUT_MS")]
    pub command_send_timeout_ms: Option<String>,
    /// Command send-result timeout, ms. [default: 2000]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_RESULT_TIMEOUT_MS")]
    pub command_result_timeout_ms: Option<String>,
    /// Where each value given on the command line came from (see
    /// [`Cli::parse_args`]); empty when built with clap's `parse`.
    #[arg(skip)]
    pub origins: Origins,
}

/// File key -> argument id, for naming the flag or environment variable a
/// bad value came from.
const KEY_ARGS: &[(&str, &str)] = &[
    ("log_level", "log_level"),
    ("grpc.addr", "grpc_addr"),
    ("grpc.conn_limit", "conn_limit"),
    (
        "grpc.first_packet_timeout_secs",
        "first_packet_timeout_secs",
    ),
    ("grpc.max_message_bytes", "max_message_bytes"),
    ("grpc.upload_max_bytes", "upload_max_bytes"),
    ("grpc.ca_file", "tls_ca"),
    ("grpc.cert_file", "tls_cert"),
    ("grpc.key_file", "tls_key"),
    ("http.addr", "http_addr"),
    ("http.tls", "http_tls"),
    ("http.auth", "auth"),
    ("http.api_keys_file", "api_keys"),
    ("sinks.enabled", "sinks"),
    ("sinks.ndjson.rotate_bytes", "ndjson_rotate_bytes"),
    ("sinks.kafka.brokers", "kafka_brokers"),
    ("sinks.kafka.topic", "kafka_topic"),
    ("sinks.kafka.compression", "kafka_compression"),
    ("sinks.kafka.acks", "kafka_acks"),
    ("sinks.kafka.linger_ms", "kafka_linger_ms"),
    ("sinks.kafka.max_batch_bytes", "kafka_max_batch_bytes"),
    ("sinks.kafka.queue", "kafka_queue"),
    ("sinks.kafka.drop_when_full", "kafka_drop_when_full"),
    ("sinks.kafka.sasl_username", "kafka_sasl_username"),
    ("manager.backend", "manager"),
    ("manager.addrs", "manager_addr"),
    ("manager.timeout_ms", "manager_timeout_ms"),
    ("manager.retries", "manager_retries"),
    ("commands.queue_len", "command_queue"),
    ("commands.send_timeout_ms", "command_send_timeout_ms"),
    ("commands.result_timeout_ms", "command_result_timeout_ms"),
];

/// For each file key whose value came from a flag or an environment
/// variable: the words naming it (`flag --conn-limit`,
/// `environment variable ELKEID_CENTER_CONN_LIMIT`).
#[derive(Debug, Clone, Default)]
pub struct Origins(BTreeMap<&'static str, String>);

impl Origins {
    /// What the user set for `key`, if it came from a flag or the environment.
    pub fn subject(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// The error for a bad `key`: naming the flag or variable if the value
    /// came from one, the file key otherwise.
    pub fn invalid(&self, key: &'static str, msg: String) -> ConfigError {
        match self.subject(key) {
            Some(subject) => ConfigError::InvalidArg {
                subject: subject.to_string(),
                key,
                msg,
            },
            None => ConfigError::Invalid { key, msg },
        }
    }
}

impl Cli {
    /// Parses the process arguments and environment like clap's
    /// `try_parse`, also recording where each value came from.
    pub fn parse_args() -> Result<Cli, clap::Error> {
        Self::parse_args_from(std::env::args_os())
    }

    /// [`Cli::parse_args`] over the given arguments.
    pub fn parse_args_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
        let cmd = Self::command();
        let matches = cmd.clone().try_get_matches_from(args)?;
        let mut cli = Self::from_arg_matches(&matches)?;
        for &(key, id) in KEY_ARGS {
            let Some(arg) = cmd.get_arguments().find(|a| a.get_id().as_str() == id) else {
                continue;
            };
            let subject = match matches.value_source(id) {
                Some(ValueSource::CommandLine) => arg.get_long().map(|l| format!("flag --{l}")),
                Some(ValueSource::EnvVariable) => arg
                    .get_env()
                    .map(|e| format!("environment variable {}", e.to_string_lossy())),
                _ => None,
            };
            if let Some(subject) = subject {
                cli.origins.0.insert(key, subject);
            }
        }
        Ok(cli)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
    #[serde(default)]
    grpc: FileGrpc,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    sinks: FileSinks,
    #[serde(default)]
    manager: FileManager,
    #[serde(default)]
    commands: FileCommands,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGrpc {
    addr: Option<String>,
    conn_limit: Option<u64>,
    first_packet_timeout_secs: Option<u64>,
    max_message_bytes: Option<u64>,
    tls: Option<bool>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    upload_max_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileHttp {
    addr: Option<String>,
    tls: Option<bool>,
    auth: Option<bool>,
    api_keys_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSinks {
    enabled: Option<Vec<String>>,
    #[serde(default)]
    ndjson: FileNdjson,
    #[serde(default)]
    kafka: FileKafka,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileNdjson {
    dir: Option<PathBuf>,
    rotate_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKafka {
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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileManager {
    backend: Option<String>,
    addrs: Option<Vec<String>>,
    components_file: Option<PathBuf>,
    timeout_ms: Option<u64>,
    retries: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCommands {
    queue_len: Option<u64>,
    send_timeout_ms: Option<u64>,
    result_timeout_ms: Option<u64>,
}

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

/// Manager backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagerKind {
    /// Component file in the data dir; task results to a local file.
    Local,
    /// HTTP calls to an Elkeid manager.
    Elkeid,
}

/// gRPC listener settings.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// Maximum concurrent streams.
    pub conn_limit: usize,
    /// First packet deadline.
    pub first_packet_timeout: Duration,
    /// Max decoded message size.
    pub max_message_bytes: usize,
    /// Mutual TLS on (default) or plaintext h2c.
    pub tls: bool,
    /// CA file; `None` = generated dev PKI.
    pub ca_file: Option<PathBuf>,
    /// Server cert file; `None` = generated dev PKI.
    pub cert_file: Option<PathBuf>,
    /// Server key file; `None` = generated dev PKI.
    pub key_file: Option<PathBuf>,
    /// Upload size cap.
    pub upload_max_bytes: u64,
}

/// HTTP API settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Listen address.
    pub addr: SocketAddr,
    /// HTTPS with the server certificate.
    pub tls: bool,
    /// AK/SK auth on.
    pub auth: bool,
    /// `[aksk]` file.
    pub api_keys_file: PathBuf,
}

/// NDJSON sink settings.
#[derive(Debug, Clone)]
pub struct NdjsonConfig {
    /// Output directory.
    pub dir: PathBuf,
    /// Rotation size.
    pub rotate_bytes: u64,
}

/// Kafka sink settings (interpreted by `sinks::kafka`).
#[derive(Debug, Clone, Default)]
pub struct KafkaConfig {
    /// Bootstrap brokers.
    pub brokers: Vec<String>,
    /// Topic.
    pub topic: String,
    /// Compression name as given (`none`, `snappy`, ...).
    pub compression: Option<String>,
    /// Required acks.
    pub acks: Option<i16>,
    /// Batch linger.
    pub linger_ms: Option<u64>,
    /// Batch size cap.
    pub max_batch_bytes: Option<u64>,
    /// In-flight queue length.
    pub queue: Option<u64>,
    /// Drop (counted) instead of back-pressure when the queue is full.
    pub drop_when_full: Option<bool>,
    /// SASL/PLAIN user.
    pub sasl_username: Option<String>,
    /// SASL/PLAIN password.
    pub sasl_password: Option<String>,
}

/// Manager backend settings.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Backend.
    pub backend: ManagerKind,
    /// Elkeid manager addresses (`host:port`).
    pub addrs: Vec<String>,
    /// Local component file.
    pub components_file: PathBuf,
    /// Per-call timeout.
    pub timeout: Duration,
    /// Retries after a failed call.
    pub retries: u32,
}

/// Command delivery settings.
#[derive(Debug, Clone)]
pub struct CommandConfig {
    /// Per-connection queue length.
    pub queue_len: usize,
    /// Enqueue timeout.
    pub send_timeout: Duration,
    /// Result timeout.
    pub result_timeout: Duration,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Log filter.
    pub log_level: String,
    /// gRPC.
    pub grpc: GrpcConfig,
    /// HTTP API.
    pub http: HttpConfig,
    /// Enabled sinks, in order, deduplicated.
    pub sinks: Vec<SinkKind>,
    /// NDJSON sink.
    pub ndjson: NdjsonConfig,
    /// Kafka sink.
    pub kafka: KafkaConfig,
    /// Manager backend.
    pub manager: ManagerConfig,
    /// Command delivery.
    pub commands: CommandConfig,
    /// Which keys were set by a flag or an environment variable (for
    /// errors found after loading, such as the sinks' own checks).
    pub origins: Origins,
}

impl Config {
    /// Parses the process arguments and environment, reads `--config`, and
    /// resolves everything. Errors name the bad key.
    pub fn load(cli: Cli) -> Result<Config, ConfigError> {
        let file = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                parse_file(path, &text)?
            }
            None => FileConfig::default(),
        };
        resolve(cli, file)
    }
}

fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        msg: e.to_string().trim_end().to_string(),
    })
}

fn num<T>(
    key: &'static str,
    flag: Option<String>,
    file: Option<u64>,
    default: T,
) -> Result<T, ConfigError>
where
    T: std::str::FromStr + TryFrom<u64>,
{
    if let Some(s) = flag {
        return s.trim().parse::<T>().map_err(|_| ConfigError::Invalid {
            key,
            msg: format!("`{s}` is not a valid number"),
        });
    }
    match file {
        Some(v) => T::try_from(v).map_err(|_| ConfigError::Invalid {
            key,
            msg: format!("{v} is out of range"),
        }),
        None => Ok(default),
    }
}

fn addr(
    key: &'static str,
    flag: Option<String>,
    file: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let s = flag.or(file).unwrap_or_else(|| default.to_string());
    s.trim().parse().map_err(|_| ConfigError::Invalid {
        key,
        msg: format!("`{s}` is not an ip:port socket address"),
    })
}

fn opt_num(
    key: &'static str,
    flag: Option<String>,
    file: Option<u64>,
) -> Result<Option<u64>, ConfigError> {
    match flag {
        Some(s) => s
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ConfigError::Invalid {
                key,
                msg: format!("`{s}` is not a valid number"),
            }),
        None => Ok(file),
    }
}

fn boolean(
    key: &'static str,
    flag: Option<String>,
    file: Option<bool>,
    default: bool,
) -> Result<bool, ConfigError> {
    match flag {
        Some(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(ConfigError::Invalid {
                key,
                msg: format!("`{s}` is not true or false"),
            }),
        },
        None => Ok(file.unwrap_or(default)),
    }
}

fn positive(key: &'static str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        return Err(ConfigError::Invalid {
            key,
            msg: "must be greater than 0".into(),
        });
    }
    Ok(v)
}

fn resolve(cli: Cli, file: FileConfig) -> Result<Config, ConfigError> {
    let origins = cli.origins.clone();
    let mut config = resolve_values(cli, file).map_err(|e| match e {
        ConfigError::Invalid { key, msg } => origins.invalid(key, msg),
        e => e,
    })?;
    config.origins = origins;
    Ok(config)
}

fn resolve_values(cli: Cli, file: FileConfig) -> Result<Config, ConfigError> {
    let data_dir = cli
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("./elkeid-data"));
    let log_level = cli
        .log_level
        .or(file.log_level)
        .unwrap_or_else(|| "info".into());

    let g = file.grpc;
    let conn_limit: u64 = num("grpc.conn_limit", cli.conn_limit, g.conn_limit, 10_000)?;
    let first_packet: u64 = num(
        "grpc.first_packet_timeout_secs",
        cli.first_packet_timeout_secs,
        g.first_packet_timeout_secs,
        30,
    )?;
    let max_msg: u64 = num(
        "grpc.max_message_bytes",
        cli.max_message_bytes,
        g.max_message_bytes,
        10 * 1024 * 1024,
    )?;
    let upload_max: u64 = num(
        "grpc.upload_max_bytes",
        cli.upload_max_bytes,
        g.upload_max_bytes,
        512 * 1024 * 1024,
    )?;
    let tls = if cli.insecure_plaintext {
        false
    } else {
        g.tls.unwrap_or(true)
    };
    let grpc = GrpcConfig {
        addr: addr("grpc.addr", cli.grpc_addr, g.addr, "0.0.0.0:6751")?,
        conn_limit: usize::try_from(positive("grpc.conn_limit", conn_limit)?).map_err(|_| {
            ConfigError::Invalid {
                key: "grpc.conn_limit",
                msg: "too large".into(),
            }
        })?,
        first_packet_timeout: Duration::from_secs(positive(
            "grpc.first_packet_timeout_secs",
            first_packet,
        )?),
        max_message_bytes: usize::try_from(positive("grpc.max_message_bytes", max_msg)?).map_err(
            |_| ConfigError::Invalid {
                key: "grpc.max_message_bytes",
                msg: "too large".into(),
            },
        )?,
        tls,
        ca_file: cli.tls_ca.or(g.ca_file),
        cert_file: cli.tls_cert.or(g.cert_file),
        key_file: cli.tls_key.or(g.key_file),
        upload_max_bytes: positive("grpc.upload_max_bytes", upload_max)?,
    };

    let h = file.http;
    let http = HttpConfig {
        addr: addr("http.addr", cli.http_addr, h.addr, "0.0.0.0:6752")?,
        tls: boolean("http.tls", cli.http_tls, h.tls, false)?,
        auth: boolean("http.auth", cli.auth, h.auth, true)?,
        api_keys_file: cli
            .api_keys
            .or(h.api_keys_file)
            .unwrap_or_else(|| data_dir.join("api-keys.toml")),
    };

    let s = file.sinks;
    let names = if cli.sinks.is_empty() {
        s.enabled.unwrap_or_else(|| vec!["ndjson".into()])
    } else {
        cli.sinks
    };
    let mut sinks = Vec::new();
    for n in names {
        let kind = match n.trim() {
            "ndjson" => SinkKind::Ndjson,
            "null" => SinkKind::Null,
            "kafka" => SinkKind::Kafka,
            other => {
                return Err(ConfigError::Invalid {
                    key: "sinks.enabled",
                    msg: format!("unknown sink `{other}` (expected ndjson, null or kafka)"),
                });
            }
        };
        if !sinks.contains(&kind) {
            sinks.push(kind);
        }
    }
    if sinks.is_empty() {
        return Err(ConfigError::Invalid {
            key: "sinks.enabled",
            msg: "at least one sink is required".into(),
        });
    }
    let rotate: u64 = num(
        "sinks.ndjson.rotate_bytes",
        cli.ndjson_rotate_bytes,
        s.ndjson.rotate_bytes,
        256 * 1024 * 1024,
    )?;
    let ndjson = NdjsonConfig {
        dir: cli
            .ndjson_dir
            .or(s.ndjson.dir)
            .unwrap_or_else(|| data_dir.join("records")),
        rotate_bytes: positive("sinks.ndjson.rotate_bytes", rotate)?,
    };
    let k = s.kafka;
    let kafka = KafkaConfig {
        brokers: if cli.kafka_brokers.is_empty() {
            k.brokers.unwrap_or_else(|| vec!["127.0.0.1:9092".into()])
        } else {
            cli.kafka_brokers
        },
        topic: cli
            .kafka_topic
            .or(k.topic)
            .unwrap_or_else(|| "hids_svr".into()),
        compression: cli.kafka_compression.or(k.compression),
        acks: match cli.kafka_acks {
            Some(s) => Some(s.trim().parse::<i16>().map_err(|_| ConfigError::Invalid {
                key: "sinks.kafka.acks",
                msg: format!("`{s}` is not a valid number"),
            })?),
            None => k.acks,
        },
        linger_ms: opt_num("sinks.kafka.linger_ms", cli.kafka_linger_ms, k.linger_ms)?,
        max_batch_bytes: opt_num(
            "sinks.kafka.max_batch_bytes",
            cli.kafka_max_batch_bytes,
            k.max_batch_bytes,
        )?,
        queue: opt_num("sinks.kafka.queue", cli.kafka_queue, k.queue)?,
        drop_when_full: match cli.kafka_drop_when_full {
            Some(s) => Some(boolean("sinks.kafka.drop_when_full", Some(s), None, false)?),
            None => k.drop_when_full,
        },
        sasl_username: cli.kafka_sasl_username.or(k.sasl_username),
        sasl_password: cli.kafka_sasl_password.or(k.sasl_password),
    };

    let m = file.manager;
    let backend = match cli.manager.or(m.backend).as_deref().map(str::trim) {
        None | Some("local") => ManagerKind::Local,
        Some("elkeid") => ManagerKind::Elkeid,
        Some(other) => {
            return Err(ConfigError::Invalid {
                key: "manager.backend",
                msg: format!("unknown backend `{other}` (expected local or elkeid)"),
            });
        }
    };
    let addrs = if cli.manager_addr.is_empty() {
        m.addrs.unwrap_or_default()
    } else {
        cli.manager_addr
    };
    if backend == ManagerKind::Elkeid && addrs.is_empty() {
        return Err(ConfigError::Invalid {
            key: "manager.addrs",
            msg: "required for the elkeid backend".into(),
        });
    }
    let timeout_ms: u64 = num(
        "manager.timeout_ms",
        cli.manager_timeout_ms,
        m.timeout_ms,
        5000,
    )?;
    let retries: u32 = num("manager.retries", cli.manager_retries, m.retries, 2)?;
    let manager = ManagerConfig {
        backend,
        addrs,
        components_file: cli
            .components_file
            .or(m.components_file)
            .unwrap_or_else(|| data_dir.join("components.json")),
        timeout: Duration::from_millis(positive("manager.timeout_ms", timeout_ms)?),
        retries,
    };

    let c = file.commands;
    let queue_len: u64 = num("commands.queue_len", cli.command_queue, c.queue_len, 1024)?;
    let send_ms: u64 = num(
        "commands.send_timeout_ms",
        cli.command_send_timeout_ms,
        c.send_timeout_ms,
        2000,
    )?;
    let result_ms: u64 = num(
        "commands.result_timeout_ms",
        cli.command_result_timeout_ms,
        c.result_timeout_ms,
        2000,
    )?;
    let commands = CommandConfig {
        queue_len: usize::try_from(positive("commands.queue_len", queue_len)?)
            .ok()
            // tokio's mpsc::channel panics above this (at the first stream).
            .filter(|&n| n <= tokio::sync::Semaphore::MAX_PERMITS)
            .ok_or(ConfigError::Invalid {
                key: "commands.queue_len",
                msg: "too large".into(),
            })?,
        send_timeout: Duration::from_millis(positive("commands.send_timeout_ms", send_ms)?),
        result_timeout: Duration::from_millis(positive("commands.result_timeout_ms", result_ms)?),
    };

    Ok(Config {
        data_dir,
        log_level,
        grpc,
        http,
        sinks,
        ndjson,
        kafka,
        manager,
        commands,
        origins: Origins::default(),
    })
}

/// `[aksk]` access key -> secret key, keys lowercased (as Elkeid's viper does).
pub(crate) type AkSk = BTreeMap<String, String>;

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["elkeid-center"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn errors_name_the_flag_the_file_key_or_nothing_else() {
        let c = Cli::parse_args_from(["elkeid-center", "--conn-limit", "x"]).unwrap();
        assert_eq!(
            c.origins.subject("grpc.conn_limit"),
            Some("flag --conn-limit")
        );
        assert_eq!(c.origins.subject("grpc.addr"), None);
        let e = resolve(c, FileConfig::default()).unwrap_err().to_string();
        assert!(
            e.contains("flag --conn-limit (key `grpc.conn_limit`)"),
            "{e}"
        );
        // A file value: the key alone.
        let file = parse_file(Path::new("c.toml"), "[grpc]\nconn_limit = 0\n").unwrap();
        let c = Cli::parse_args_from(["elkeid-center"]).unwrap();
        let e = resolve(c, file).unwrap_err().to_string();
        assert_eq!(
            e,
            "config: bad value for key `grpc.conn_limit`: must be greater than 0"
        );
        // Every table entry names a real argument.
        let cmd = <Cli as clap::CommandFactory>::command();
        for (key, id) in KEY_ARGS {
            assert!(
                cmd.get_arguments().any(|a| a.get_id().as_str() == *id),
                "{key} -> {id}"
            );
        }
    }

    #[test]
    fn command_queue_len_beyond_tokio_max_is_refused() {
        let r = resolve(
            cli(&["--command-queue", "18446744073709551615"]),
            FileConfig::default(),
        );
        assert!(
            matches!(
                r,
                Err(ConfigError::Invalid {
                    key: "commands.queue_len",
                    ..
                })
            ),
            "{r:?}"
        );
        let c = resolve(cli(&["--command-queue", "7"]), FileConfig::default()).unwrap();
        assert_eq!(c.commands.queue_len, 7);
    }

    #[test]
    fn defaults() {
        let c = resolve(cli(&[]), FileConfig::default()).unwrap();
        assert_eq!(c.grpc.addr, "0.0.0.0:6751".parse().unwrap());
        assert_eq!(c.http.addr, "0.0.0.0:6752".parse().unwrap());
        assert_eq!(c.grpc.conn_limit, 10_000);
        assert_eq!(c.grpc.max_message_bytes, 10 * 1024 * 1024);
        assert!(c.grpc.tls);
        assert!(c.http.auth);
        assert_eq!(c.sinks, vec![SinkKind::Ndjson]);
        assert_eq!(c.manager.backend, ManagerKind::Local);
        assert_eq!(c.ndjson.dir, PathBuf::from("./elkeid-data/records"));
        assert_eq!(c.kafka.topic, "hids_svr");
    }

    #[test]
    fn flag_beats_file() {
        let file = parse_file(
            Path::new("x.toml"),
            "data_dir = \"/d\"\n[grpc]\nconn_limit = 5\naddr = \"127.0.0.1:1\"\n[http]\nauth = false\n",
        )
        .unwrap();
        let c = resolve(cli(&["--conn-limit", "7"]), file).unwrap();
        assert_eq!(c.grpc.conn_limit, 7);
        assert_eq!(c.grpc.addr, "127.0.0.1:1".parse().unwrap());
        assert!(!c.http.auth);
        assert_eq!(c.http.api_keys_file, PathBuf::from("/d/api-keys.toml"));
    }

    #[test]
    fn every_flag_has_an_env_variable() {
        // Flag > env is clap's own rule; here we check that every flag has an
        // `ELKEID_CENTER_*` variable named after it.
        let cmd = <Cli as clap::CommandFactory>::command();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let long = arg.get_long().unwrap();
            let want = format!(
                "ELKEID_CENTER_{}",
                long.replace('-', "_").to_ascii_uppercase()
            );
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(want.as_str()),
                "flag --{long}"
            );
        }
    }

    #[test]
    fn bad_keys_are_named() {
        let e = parse_file(Path::new("x.toml"), "[grpc]\nconn_limt = 5\n").unwrap_err();
        assert!(e.to_string().contains("conn_limt"), "{e}");
        let e = parse_file(Path::new("x.toml"), "[grpc]\nconn_limit = \"many\"\n").unwrap_err();
        assert!(e.to_string().contains("conn_limit"), "{e}");
        let e = resolve(cli(&["--conn-limit", "x"]), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("grpc.conn_limit"), "{e}");
        let e = resolve(cli(&["--sink", "s3"]), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("sinks.enabled"), "{e}");
        let e = resolve(cli(&["--manager", "elkeid"]), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("manager.addrs"), "{e}");
        let e = resolve(cli(&["--auth", "maybe"]), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("http.auth"), "{e}");
    }

    #[test]
    fn sinks_repeatable_and_plaintext() {
        let c = resolve(
            cli(&[
                "--sink",
                "null",
                "--sink",
                "ndjson,null",
                "--insecure-plaintext",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert_eq!(c.sinks, vec![SinkKind::Null, SinkKind::Ndjson]);
        assert!(!c.grpc.tls);
        let c = resolve(
            cli(&[
                "--kafka-acks",
                "-1",
                "--kafka-queue",
                "1000",
                "--kafka-drop-when-full",
                "true",
            ]),
            parse_file(
                Path::new("x.toml"),
                "[sinks.kafka]\nqueue = 5\nlinger_ms = 7\n",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(c.kafka.acks, Some(-1));
        assert_eq!(c.kafka.queue, Some(1000));
        assert_eq!(c.kafka.linger_ms, Some(7));
        assert_eq!(c.kafka.drop_when_full, Some(true));
    }
}
