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
//! | `--upload-quota-bytes N` | `ELKEID_CENTER_UPLOAD_QUOTA_BYTES` | `grpc.upload_quota_bytes` | `4294967296` (all stored + in-flight uploads) |
//! | `--upload-idle-secs N` | `ELKEID_CENTER_UPLOAD_IDLE_SECS` | `grpc.upload_idle_secs` | `60` (longest pause between chunks) |
//! | `--agent-identity shared\|cert` | `ELKEID_CENTER_AGENT_IDENTITY` | `grpc.agent_identity` | `shared` (Elkeid's shared client certificate; `cert`: the client certificate's CN is the agent id) |
//! | `--upload-max-bytes N` | `ELKEID_CENTER_UPLOAD_MAX_BYTES` | `grpc.upload_max_bytes` | `536870912` |
//! | `--detail-budget-bytes N` | `ELKEID_CENTER_DETAIL_BUDGET_BYTES` | `grpc.detail_budget_bytes` | `268435456` (stored 1000/1001 details of all connections) |
//! | `--tls-handshake-timeout-secs N` | `ELKEID_CENTER_TLS_HANDSHAKE_TIMEOUT_SECS` | `tls_handshake_timeout_secs` | `10` (gRPC and HTTPS listeners) |
//! | `--http-addr A` | `ELKEID_CENTER_HTTP_ADDR` | `http.addr` | `0.0.0.0:6752` |
//! | `--http-tls true\|false` | `ELKEID_CENTER_HTTP_TLS` | `http.tls` | `true` (HTTPS with the gRPC server certificate; `false` = plain HTTP, logged as a warning) |
//! | `--auth true\|false` | `ELKEID_CENTER_AUTH` | `http.auth` | `true` |
//! | `--api-keys F` | `ELKEID_CENTER_API_KEYS` | `http.api_keys_file` | `DIR/api-keys.toml` |
//! | `--sink S` (repeatable) | `ELKEID_CENTER_SINK` (comma list) | `sinks.enabled` | `["ndjson"]` |
//! | `--manager local\|elkeid` | `ELKEID_CENTER_MANAGER` | `manager.backend` | `local` |
//! | `--manager-addr A` (comma list) | `ELKEID_CENTER_MANAGER_ADDR` | `manager.addrs` | `[]` (required for `elkeid`) |
//! | `--components-file F` | `ELKEID_CENTER_COMPONENTS_FILE` | `manager.components_file` | `DIR/components.json` |
//! | `--manager-timeout-ms N` | `ELKEID_CENTER_MANAGER_TIMEOUT_MS` | `manager.timeout_ms` | `5000` |
//! | `--manager-retries N` | `ELKEID_CENTER_MANAGER_RETRIES` | `manager.retries` | `2` |
//! | `--command-queue N` | `ELKEID_CENTER_COMMAND_QUEUE` | `commands.queue_len` | `1024` |
//! | `--command-send-timeout-ms N` | `ELKEID_CENTER_COMMAND_SEND_TIMEOUT_MS` | `commands.send_timeout_ms` | `2000` |
//! | `--command-result-timeout-ms N` | `ELKEID_CENTER_COMMAND_RESULT_TIMEOUT_MS` | `commands.result_timeout_ms` | `2000` |
//! | `--command-queue-bytes N` | `ELKEID_CENTER_COMMAND_QUEUE_BYTES` | `commands.queue_bytes` | `16777216` (one agent's queued commands) |
//! | `--command-total-queue-bytes N` | `ELKEID_CENTER_COMMAND_TOTAL_QUEUE_BYTES` | `commands.total_queue_bytes` | `268435456` (all agents' queued commands) |
//! | `--task-queue-bytes N` | `ELKEID_CENTER_TASK_QUEUE_BYTES` | `manager.task_queue_bytes` | `67108864` (task results waiting for the manager backend) |
//!
//! Each sink's own settings (`--ndjson-*`, `--kafka-*`, `[sinks.ndjson]`,
//! `[sinks.kafka]`) are defined, documented and checked in its folder:
//! `sinks/ndjson/config.rs`, `sinks/kafka/config.rs`.
//!
//! Flag and environment values are parsed by typed clap value parsers
//! ([`parse`]); a value that does not parse is reported like any other bad
//! value (naming the flag or variable and the key, exit code 64).
//!
//! | `--etcd URL` (comma list) | `ELKEID_CENTER_ETCD` | `cluster.etcd` | none (a single center) |
//! | `--cluster-advertise HOST` | `ELKEID_CENTER_CLUSTER_ADVERTISE` | `cluster.advertise` | the IP of `--grpc-addr` (required when that is 0.0.0.0/::) |
//! | `--cluster-id ID` | `ELKEID_CENTER_CLUSTER_ID` | `cluster.id` | `ADVERTISE:HTTP_PORT` |
//! | `--cluster-prefix P` | `ELKEID_CENTER_CLUSTER_PREFIX` | `cluster.prefix` | `/elkeid-rs/` |
//! | `--cluster-lease-ttl-secs N` | `ELKEID_CENTER_CLUSTER_LEASE_TTL_SECS` | `cluster.lease_ttl_secs` | `10` (2..=3600) |
//! | `--sd-listen ADDR` | `ELKEID_CENTER_SD_LISTEN` | `cluster.sd_listen` | none (needs `--etcd`; plain HTTP, only `GET /registry/detail`) |
//! | `--elkeid-sd URL` (comma list) | `ELKEID_CENTER_ELKEID_SD` | `cluster.elkeid_sd` | none (no registration into an Elkeid SD) |
//! | `--elkeid-sd-name N` | `ELKEID_CENTER_ELKEID_SD_NAME` | `cluster.elkeid_sd_name` | `hids_svr` |
//! | `--elkeid-sd-ak AK` / `--elkeid-sd-sk SK` | `ELKEID_CENTER_ELKEID_SD_AK` / `_SK` | `cluster.elkeid_sd_ak` / `_sk` | unsigned |
//! | `--elkeid-sd-interval-secs N` | `ELKEID_CENTER_ELKEID_SD_INTERVAL_SECS` | `cluster.elkeid_sd_interval_secs` | `30` (1..=3600) |
//!
//! The cluster keys are resolved by `cluster/config.rs`.
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

pub use crate::sinks::{KafkaConfig, NdjsonConfig, SinkKind};
use crate::sinks::{SinkArgs, SinksFile};

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
    #[arg(long, env = "ELKEID_CENTER_GRPC_ADDR", value_parser = parse::socket_addr)]
    pub grpc_addr: Option<SocketAddr>,
    /// Maximum concurrent agent streams. [default: 10000]
    #[arg(long, env = "ELKEID_CENTER_CONN_LIMIT", value_parser = parse::number::<u64>)]
    pub conn_limit: Option<u64>,
    /// Seconds to wait for the first packet of a stream. [default: 30]
    #[arg(long, env = "ELKEID_CENTER_FIRST_PACKET_TIMEOUT_SECS", value_parser = parse::number::<u64>)]
    pub first_packet_timeout_secs: Option<u64>,
    /// Maximum gRPC message size (decompressed), bytes. [default: 10485760]
    #[arg(long, env = "ELKEID_CENTER_MAX_MESSAGE_BYTES", value_parser = parse::number::<u64>)]
    pub max_message_bytes: Option<u64>,
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
    /// Total bytes of stored plus in-flight uploads. [default: 4294967296]
    #[arg(long, env = "ELKEID_CENTER_UPLOAD_QUOTA_BYTES", value_parser = parse::number::<u64>)]
    pub upload_quota_bytes: Option<u64>,
    /// Seconds an upload stream may stay silent between chunks. [default: 60]
    #[arg(long, env = "ELKEID_CENTER_UPLOAD_IDLE_SECS", value_parser = parse::number::<u64>)]
    pub upload_idle_secs: Option<u64>,
    /// Agent identity: shared (trust the packet's agent_id) | cert (client certificate CN). [default: shared]
    #[arg(long, env = "ELKEID_CENTER_AGENT_IDENTITY", value_parser = parse_identity)]
    pub agent_identity: Option<crate::identity::AgentIdentity>,
    /// Maximum size of one uploaded file, bytes. [default: 536870912]
    #[arg(long, env = "ELKEID_CENTER_UPLOAD_MAX_BYTES", value_parser = parse::number::<u64>)]
    pub upload_max_bytes: Option<u64>,
    /// Bytes of stored heartbeat details (1000/1001) of all connections. [default: 268435456]
    #[arg(long, env = "ELKEID_CENTER_DETAIL_BUDGET_BYTES", value_parser = parse::number::<u64>)]
    pub detail_budget_bytes: Option<u64>,
    /// Seconds a new connection has to complete its TLS handshake (gRPC and HTTPS). [default: 10]
    #[arg(long, env = "ELKEID_CENTER_TLS_HANDSHAKE_TIMEOUT_SECS", value_parser = parse::number::<u64>)]
    pub tls_handshake_timeout_secs: Option<u64>,
    /// HTTP API listen address. [default: 0.0.0.0:6752]
    #[arg(long, env = "ELKEID_CENTER_HTTP_ADDR", value_parser = parse::socket_addr)]
    pub http_addr: Option<SocketAddr>,
    /// Serve the HTTP API over TLS with the server certificate (true|false). [default: true]
    #[arg(long, env = "ELKEID_CENTER_HTTP_TLS", value_parser = parse::boolean)]
    pub http_tls: Option<bool>,
    /// AK/SK authentication of the HTTP API (true|false). [default: true]
    #[arg(long, env = "ELKEID_CENTER_AUTH", value_parser = parse::boolean)]
    pub auth: Option<bool>,
    /// TOML file with the `[aksk]` table. [default: DATA_DIR/api-keys.toml]
    #[arg(long, env = "ELKEID_CENTER_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Sink flags: `--sink` and each sink's own (`sinks/*/config.rs`).
    #[command(flatten)]
    pub sink_args: SinkArgs,
    /// Manager backend: local | elkeid. [default: local]
    #[arg(long, env = "ELKEID_CENTER_MANAGER", value_parser = ManagerKind::parse)]
    pub manager: Option<ManagerKind>,
    /// Elkeid manager address(es), host:port (comma list).
    #[arg(long, env = "ELKEID_CENTER_MANAGER_ADDR", value_delimiter = ',')]
    pub manager_addr: Vec<String>,
    /// Local manager component file (JSON or TOML). [default: DATA_DIR/components.json]
    #[arg(long, env = "ELKEID_CENTER_COMPONENTS_FILE")]
    pub components_file: Option<PathBuf>,
    /// Timeout of one manager HTTP call, ms. [default: 5000]
    #[arg(long, env = "ELKEID_CENTER_MANAGER_TIMEOUT_MS", value_parser = parse::number::<u64>)]
    pub manager_timeout_ms: Option<u64>,
    /// Retries of a failed manager HTTP call. [default: 2]
    #[arg(long, env = "ELKEID_CENTER_MANAGER_RETRIES", value_parser = parse::number::<u32>)]
    pub manager_retries: Option<u32>,
    /// Per-connection command queue length. [default: 1024]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_QUEUE", value_parser = parse::number::<u64>)]
    pub command_queue: Option<u64>,
    /// Command enqueue timeout, ms. [default: 2000]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_SEND_TIMEOUT_MS", value_parser = parse::number::<u64>)]
    pub command_send_timeout_ms: Option<u64>,
    /// Command send-result timeout, ms. [default: 2000]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_RESULT_TIMEOUT_MS", value_parser = parse::number::<u64>)]
    pub command_result_timeout_ms: Option<u64>,
    /// Bytes of commands queued for one agent. [default: 16777216]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_QUEUE_BYTES", value_parser = parse::number::<u64>)]
    pub command_queue_bytes: Option<u64>,
    /// Bytes of commands queued for all agents together. [default: 268435456]
    #[arg(long, env = "ELKEID_CENTER_COMMAND_TOTAL_QUEUE_BYTES", value_parser = parse::number::<u64>)]
    pub command_total_queue_bytes: Option<u64>,
    /// Bytes of task results waiting for the manager backend. [default: 67108864]
    #[arg(long, env = "ELKEID_CENTER_TASK_QUEUE_BYTES", value_parser = parse::number::<u64>)]
    pub task_queue_bytes: Option<u64>,
    /// Cluster flags (`--etcd`, `--cluster-*`; see `cluster/config.rs`).
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterArgs,
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
    ("grpc.upload_quota_bytes", "upload_quota_bytes"),
    ("grpc.upload_idle_secs", "upload_idle_secs"),
    ("grpc.agent_identity", "agent_identity"),
    ("grpc.detail_budget_bytes", "detail_budget_bytes"),
    ("tls_handshake_timeout_secs", "tls_handshake_timeout_secs"),
    ("grpc.ca_file", "tls_ca"),
    ("grpc.cert_file", "tls_cert"),
    ("grpc.key_file", "tls_key"),
    ("http.addr", "http_addr"),
    ("http.tls", "http_tls"),
    ("http.auth", "auth"),
    ("http.api_keys_file", "api_keys"),
    ("manager.backend", "manager"),
    ("manager.addrs", "manager_addr"),
    ("manager.timeout_ms", "manager_timeout_ms"),
    ("manager.retries", "manager_retries"),
    ("manager.task_queue_bytes", "task_queue_bytes"),
    ("commands.queue_len", "command_queue"),
    ("commands.send_timeout_ms", "command_send_timeout_ms"),
    ("commands.result_timeout_ms", "command_result_timeout_ms"),
    ("commands.queue_bytes", "command_queue_bytes"),
    ("commands.total_queue_bytes", "command_total_queue_bytes"),
    ("cluster.lease_ttl_secs", "cluster_lease_ttl_secs"),
    ("cluster.id", "cluster_id"),
    ("cluster.sd_listen", "sd_listen"),
    ("cluster.elkeid_sd", "elkeid_sd"),
    ("cluster.elkeid_sd_name", "elkeid_sd_name"),
    ("cluster.elkeid_sd_ak", "elkeid_sd_ak"),
    ("cluster.elkeid_sd_interval_secs", "elkeid_sd_interval_secs"),
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

    /// [`Cli::parse_args`] over the given arguments. A value that fails its
    /// typed parser becomes the same error as any other bad value
    /// ([`ConfigError::InvalidArg`], naming the flag or variable and the key),
    /// carried in a `clap::Error` so callers handle one error type.
    pub fn parse_args_from<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let cmd = Self::command();
        let matches = match cmd.clone().try_get_matches_from(&args) {
            Ok(m) => m,
            Err(e) => return Err(bad_value(&cmd, &args, e)),
        };
        let mut cli = Self::from_arg_matches(&matches)?;
        for &(key, id) in key_args() {
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

/// Every file key -> argument id pair: the center's own and each sink's.
fn key_args() -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    KEY_ARGS
        .iter()
        .chain(crate::sinks::KEY_ARGS.iter().flat_map(|t| t.iter()))
}

/// Turns clap's error for a value its typed parser refused into our
/// [`ConfigError::InvalidArg`] text (flag or variable, key, reason); other
/// clap errors (unknown flag, `--help`) pass through.
fn bad_value(cmd: &clap::Command, args: &[std::ffi::OsString], e: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::ValueValidation {
        return e;
    }
    // "--conn-limit <CONN_LIMIT>"
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return e;
    };
    let Some(long) = shown
        .strip_prefix("--")
        .and_then(|s| s.split([' ', '=']).next())
    else {
        return e;
    };
    let Some(arg) = cmd.get_arguments().find(|a| a.get_long() == Some(long)) else {
        return e;
    };
    let id = arg.get_id().as_str();
    let key = key_args().find(|(_, a)| *a == id).map_or("", |&(k, _)| k);
    let flag = format!("--{long}");
    let on_command_line = args.iter().skip(1).any(|a| {
        a.to_str()
            .is_some_and(|a| a == flag || a.strip_prefix(&flag).is_some_and(|r| r.starts_with('=')))
    });
    let subject = match (on_command_line, arg.get_env()) {
        (false, Some(env)) => format!("environment variable {}", env.to_string_lossy()),
        _ => format!("flag {flag}"),
    };
    let msg = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
    let err = ConfigError::InvalidArg { subject, key, msg };
    clap::Error::raw(ErrorKind::ValueValidation, format!("{err}\n"))
}

/// Typed clap value parsers; their messages become the `msg` of
/// [`ConfigError::InvalidArg`].
pub(crate) mod parse {
    use std::net::SocketAddr;

    /// A number of type `T` (`"`x` is not a valid number"` otherwise).
    pub(crate) fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
        s.trim()
            .parse::<T>()
            .map_err(|_| format!("`{s}` is not a valid number"))
    }

    /// `true|1|yes|on` or `false|0|no|off`, any case.
    pub(crate) fn boolean(s: &str) -> Result<bool, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err(format!("`{s}` is not true or false")),
        }
    }

    /// `ip:port`.
    pub(crate) fn socket_addr(s: &str) -> Result<SocketAddr, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an ip:port socket address"))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    log_level: Option<String>,
    tls_handshake_timeout_secs: Option<u64>,
    #[serde(default)]
    grpc: FileGrpc,
    #[serde(default)]
    http: FileHttp,
    #[serde(default)]
    sinks: SinksFile,
    #[serde(default)]
    manager: FileManager,
    #[serde(default)]
    cluster: crate::cluster::config::FileCluster,
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
    upload_quota_bytes: Option<u64>,
    upload_idle_secs: Option<u64>,
    agent_identity: Option<String>,
    detail_budget_bytes: Option<u64>,
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
struct FileManager {
    backend: Option<String>,
    addrs: Option<Vec<String>>,
    components_file: Option<PathBuf>,
    timeout_ms: Option<u64>,
    retries: Option<u64>,
    task_queue_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCommands {
    queue_len: Option<u64>,
    send_timeout_ms: Option<u64>,
    result_timeout_ms: Option<u64>,
    queue_bytes: Option<u64>,
    total_queue_bytes: Option<u64>,
}

/// Manager backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagerKind {
    /// Component file in the data dir; task results to a local file.
    Local,
    /// HTTP calls to an Elkeid manager.
    Elkeid,
}

impl ManagerKind {
    /// `local` or `elkeid` (clap value parser, file values too).
    pub(crate) fn parse(s: &str) -> Result<ManagerKind, String> {
        match s.trim() {
            "local" => Ok(ManagerKind::Local),
            "elkeid" => Ok(ManagerKind::Elkeid),
            other => Err(format!(
                "unknown backend `{other}` (expected local or elkeid)"
            )),
        }
    }
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
    /// Stored + in-flight upload bytes cap.
    pub upload_quota_bytes: u64,
    /// Longest silence within an upload stream.
    pub upload_idle: Duration,
    /// Who an agent is: its packets' `agent_id`, or its certificate's CN.
    pub agent_identity: crate::identity::AgentIdentity,
    /// Stored 1000/1001 detail bytes of all connections.
    pub detail_budget_bytes: u64,
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
    /// Bytes of task results waiting for the backend.
    pub task_queue_bytes: u64,
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
    /// Bytes of commands queued for one agent.
    pub queue_bytes: u64,
    /// Bytes of commands queued for all agents.
    pub total_queue_bytes: u64,
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
    /// Deadline of a new connection's TLS handshake (gRPC and HTTPS API).
    pub tls_handshake_timeout: Duration,
    /// Clustering through etcd; `None` = a single center.
    pub cluster: Option<crate::cluster::ClusterConfig>,
    /// Registration into an Elkeid service discovery; `None` = none.
    pub elkeid_sd: Option<crate::cluster::ElkeidSdConfig>,
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

/// Flag/env value, else file value (range-checked into `T`), else default.
pub(crate) fn pick_num<T>(
    key: &'static str,
    flag: Option<T>,
    file: Option<u64>,
    default: T,
) -> Result<T, ConfigError>
where
    T: TryFrom<u64>,
{
    if let Some(v) = flag {
        return Ok(v);
    }
    match file {
        Some(v) => T::try_from(v).map_err(|_| ConfigError::Invalid {
            key,
            msg: format!("{v} is out of range"),
        }),
        None => Ok(default),
    }
}

/// Flag/env address, else the file's (parsed), else the default.
fn pick_addr(
    key: &'static str,
    flag: Option<SocketAddr>,
    file: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    if let Some(a) = flag {
        return Ok(a);
    }
    parse::socket_addr(file.as_deref().unwrap_or(default))
        .map_err(|msg| ConfigError::Invalid { key, msg })
}

/// clap value parser of `--agent-identity`.
fn parse_identity(s: &str) -> Result<crate::identity::AgentIdentity, String> {
    s.parse()
}

pub(crate) fn positive(key: &'static str, v: u64) -> Result<u64, ConfigError> {
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
    let conn_limit: u64 = pick_num("grpc.conn_limit", cli.conn_limit, g.conn_limit, 10_000)?;
    let first_packet: u64 = pick_num(
        "grpc.first_packet_timeout_secs",
        cli.first_packet_timeout_secs,
        g.first_packet_timeout_secs,
        30,
    )?;
    let max_msg: u64 = pick_num(
        "grpc.max_message_bytes",
        cli.max_message_bytes,
        g.max_message_bytes,
        10 * 1024 * 1024,
    )?;
    let upload_max: u64 = pick_num(
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
        addr: pick_addr("grpc.addr", cli.grpc_addr, g.addr, "0.0.0.0:6751")?,
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
        upload_quota_bytes: positive(
            "grpc.upload_quota_bytes",
            pick_num(
                "grpc.upload_quota_bytes",
                cli.upload_quota_bytes,
                g.upload_quota_bytes,
                4 * 1024 * 1024 * 1024,
            )?,
        )?,
        upload_idle: Duration::from_secs(positive(
            "grpc.upload_idle_secs",
            pick_num(
                "grpc.upload_idle_secs",
                cli.upload_idle_secs,
                g.upload_idle_secs,
                60,
            )?,
        )?),
        detail_budget_bytes: positive(
            "grpc.detail_budget_bytes",
            pick_num(
                "grpc.detail_budget_bytes",
                cli.detail_budget_bytes,
                g.detail_budget_bytes,
                256 * 1024 * 1024,
            )?,
        )?,
        agent_identity: match (cli.agent_identity, g.agent_identity) {
            (Some(id), _) => id,
            (None, Some(s)) => s.parse().map_err(|msg| ConfigError::Invalid {
                key: "grpc.agent_identity",
                msg,
            })?,
            (None, None) => Default::default(),
        },
    };

    let h = file.http;
    let http = HttpConfig {
        addr: pick_addr("http.addr", cli.http_addr, h.addr, "0.0.0.0:6752")?,
        // HTTPS by default, as Elkeid's manager expects (`https://…`).
        tls: cli.http_tls.or(h.tls).unwrap_or(true),
        auth: cli.auth.or(h.auth).unwrap_or(true),
        api_keys_file: cli
            .api_keys
            .or(h.api_keys_file)
            .unwrap_or_else(|| data_dir.join("api-keys.toml")),
    };

    let sinks = crate::sinks::resolve(cli.sink_args, file.sinks, &data_dir)?;

    let m = file.manager;
    let backend = match cli.manager {
        Some(kind) => kind,
        None => match m.backend.as_deref() {
            None => ManagerKind::Local,
            Some(name) => ManagerKind::parse(name).map_err(|msg| ConfigError::Invalid {
                key: "manager.backend",
                msg,
            })?,
        },
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
    let timeout_ms: u64 = pick_num(
        "manager.timeout_ms",
        cli.manager_timeout_ms,
        m.timeout_ms,
        5000,
    )?;
    let retries: u32 = pick_num("manager.retries", cli.manager_retries, m.retries, 2)?;
    let manager = ManagerConfig {
        backend,
        addrs,
        components_file: cli
            .components_file
            .or(m.components_file)
            .unwrap_or_else(|| data_dir.join("components.json")),
        timeout: Duration::from_millis(positive("manager.timeout_ms", timeout_ms)?),
        retries,
        task_queue_bytes: positive(
            "manager.task_queue_bytes",
            pick_num(
                "manager.task_queue_bytes",
                cli.task_queue_bytes,
                m.task_queue_bytes,
                64 * 1024 * 1024,
            )?,
        )?,
    };

    let c = file.commands;
    let queue_len: u64 = pick_num("commands.queue_len", cli.command_queue, c.queue_len, 1024)?;
    let send_ms: u64 = pick_num(
        "commands.send_timeout_ms",
        cli.command_send_timeout_ms,
        c.send_timeout_ms,
        2000,
    )?;
    let result_ms: u64 = pick_num(
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
        queue_bytes: positive(
            "commands.queue_bytes",
            pick_num(
                "commands.queue_bytes",
                cli.command_queue_bytes,
                c.queue_bytes,
                16 * 1024 * 1024,
            )?,
        )?,
        total_queue_bytes: positive(
            "commands.total_queue_bytes",
            pick_num(
                "commands.total_queue_bytes",
                cli.command_total_queue_bytes,
                c.total_queue_bytes,
                256 * 1024 * 1024,
            )?,
        )?,
    };
    let tls_handshake_timeout = Duration::from_secs(positive(
        "tls_handshake_timeout_secs",
        pick_num(
            "tls_handshake_timeout_secs",
            cli.tls_handshake_timeout_secs,
            file.tls_handshake_timeout_secs,
            10,
        )?,
    )?);

    Ok(Config {
        data_dir,
        log_level,
        grpc,
        http,
        sinks: sinks.enabled,
        ndjson: sinks.ndjson,
        kafka: sinks.kafka,
        manager,
        commands,
        tls_handshake_timeout,
        elkeid_sd: crate::cluster::config::resolve_elkeid_sd(&cli.cluster, &file.cluster)?,
        cluster: crate::cluster::config::resolve(cli.cluster, file.cluster)?,
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
        let c = Cli::parse_args_from(["elkeid-center", "--conn-limit", "0"]).unwrap();
        assert_eq!(
            c.origins.subject("grpc.conn_limit"),
            Some("flag --conn-limit")
        );
        assert_eq!(c.origins.subject("grpc.addr"), None);
        let e = resolve(c, FileConfig::default()).unwrap_err().to_string();
        assert!(
            e.contains("flag --conn-limit (key `grpc.conn_limit`): must be greater than 0"),
            "{e}"
        );
        // A value the typed parser refuses: the same words, from clap.
        for args in [
            &["elkeid-center", "--conn-limit", "x"][..],
            &["elkeid-center", "--conn-limit=x"][..],
        ] {
            let e = Cli::parse_args_from(args).unwrap_err().to_string();
            assert!(
                e.contains("flag --conn-limit (key `grpc.conn_limit`): `x` is not a valid number"),
                "{e}"
            );
        }
        // A file value: the key alone.
        let file = parse_file(Path::new("c.toml"), "[grpc]\nconn_limit = 0\n").unwrap();
        let c = Cli::parse_args_from(["elkeid-center"]).unwrap();
        let e = resolve(c, file).unwrap_err().to_string();
        assert_eq!(
            e,
            "config: bad value for key `grpc.conn_limit`: must be greater than 0"
        );
        // Every table entry (the center's and each sink's) names a real argument.
        let cmd = <Cli as clap::CommandFactory>::command();
        for (key, id) in key_args() {
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
        assert!(c.http.tls, "HTTPS API by default");
        assert!(c.http.auth);
        assert_eq!(c.sinks, vec![SinkKind::Ndjson]);
        assert_eq!(c.manager.backend, ManagerKind::Local);
        assert_eq!(c.ndjson.dir, PathBuf::from("./elkeid-data/records"));
        assert_eq!(c.kafka.topic, "hids_svr");
        assert_eq!(c.grpc.detail_budget_bytes, 256 << 20);
        assert_eq!(c.commands.queue_bytes, 16 << 20);
        assert_eq!(c.commands.total_queue_bytes, 256 << 20);
        assert_eq!(c.manager.task_queue_bytes, 64 << 20);
        assert_eq!(c.tls_handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn byte_budgets_and_handshake_deadline_from_flags_and_file() {
        let file = parse_file(
            Path::new("x.toml"),
            "tls_handshake_timeout_secs = 3\n[grpc]\ndetail_budget_bytes = 1000\n\
             [commands]\nqueue_bytes = 2000\ntotal_queue_bytes = 3000\n\
             [manager]\ntask_queue_bytes = 4000\n",
        )
        .unwrap();
        let c = resolve(cli(&["--command-queue-bytes", "2500"]), file).unwrap();
        assert_eq!(c.grpc.detail_budget_bytes, 1000);
        assert_eq!(c.commands.queue_bytes, 2500);
        assert_eq!(c.commands.total_queue_bytes, 3000);
        assert_eq!(c.manager.task_queue_bytes, 4000);
        assert_eq!(c.tls_handshake_timeout, Duration::from_secs(3));
        let c =
            Cli::parse_args_from(["elkeid-center", "--tls-handshake-timeout-secs", "0"]).unwrap();
        let e = resolve(c, FileConfig::default()).unwrap_err().to_string();
        assert!(
            e.contains("flag --tls-handshake-timeout-secs (key `tls_handshake_timeout_secs`)"),
            "{e}"
        );
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
        let e = parse_file(Path::new("x.toml"), "[sinks.kafka]\nqueue_bytes = 1\n").unwrap_err();
        assert!(e.to_string().contains("queue_bytes"), "{e}");
        for (args, want) in [
            (&["--conn-limit", "x"][..], "grpc.conn_limit"),
            (&["--sink", "s3"][..], "sinks.enabled"),
            (&["--auth", "maybe"][..], "http.auth"),
            (&["--grpc-addr", "nowhere"][..], "grpc.addr"),
            (&["--manager", "etcd"][..], "manager.backend"),
            (
                &["--ndjson-rotate-bytes", "1e3"][..],
                "sinks.ndjson.rotate_bytes",
            ),
            (&["--kafka-queue", "lots"][..], "sinks.kafka.queue"),
        ] {
            let e =
                Cli::parse_args_from(std::iter::once("elkeid-center").chain(args.iter().copied()))
                    .unwrap_err()
                    .to_string();
            assert!(e.contains(&format!("(key `{want}`)")), "{args:?}: {e}");
        }
        let file = parse_file(Path::new("x.toml"), "[sinks]\nenabled = [\"s3\"]\n").unwrap();
        let e = resolve(cli(&[]), file).unwrap_err().to_string();
        assert!(e.contains("key `sinks.enabled`") && e.contains("s3"), "{e}");
        let e = resolve(cli(&["--manager", "elkeid"]), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("manager.addrs"), "{e}");
        // Unknown flags stay clap's own error.
        let e = Cli::parse_args_from(["elkeid-center", "--no-such-flag"]).unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::UnknownArgument);
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
                "--sink",
                "kafka",
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
        assert_eq!(c.kafka.acks, crate::sinks::kafka::KafkaAcks::All);
        assert_eq!(c.kafka.queue_bytes, 1000);
        assert_eq!(c.kafka.linger_ms, 7);
        assert_eq!(c.kafka.overflow, crate::sinks::kafka::OverflowPolicy::Drop);
    }
}
