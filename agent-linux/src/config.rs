//! Agent configuration: defaults < TOML file (`--config`) < environment <
//! command-line flags. A bad value is a [`ConfigError`] naming the key; the
//! binary exits with code 64.
//!
//! Build-time defaults (see `build.rs`): `ELKEID_AGENT_CA` / `_CERT` / `_KEY`
//! (PEM files embedded in the binary), `ELKEID_AGENT_SERVER` (comma-separated
//! private `host:port` list), `ELKEID_AGENT_VERSION` (version on the wire).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Product string on the wire.
pub const PRODUCT: &str = "elkeid-agent";

/// Version on the wire (`ELKEID_AGENT_VERSION` at build time, else the crate version).
pub const VERSION: &str = match option_env!("ELKEID_AGENT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

const EMBEDDED_CA: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ca.pem"));
const EMBEDDED_CERT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cert.pem"));
const EMBEDDED_KEY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/key.pem"));
const EMBEDDED_SERVER: Option<&str> = option_env!("ELKEID_AGENT_SERVER");

/// Usage text for `--help`.
pub const USAGE: &str = "\
Usage: elkeid-agent [OPTIONS]

  --config FILE          TOML configuration file
  --work-dir DIR         state, logs and plugins (default /var/lib/elkeid-agent)
  --server HOST:PORT     private center address (repeatable)
  --public HOST:PORT     public center address (repeatable)
  --sd HOST:PORT         service-discovery address (repeatable)
  --region NAME          region whose server lists are used (default: env specified_region or default)
  --idc NAME             IDC (default: env specified_idc or default)
  --ca FILE --cert FILE --key FILE   TLS material (PEM; default: embedded at build time)
  --server-name NAME     name verified in the center certificate (default elkeid.com)
  --workers N            blocking worker threads (default 2)
  --log-level LEVEL      error|warn|info|debug|trace (default info)
  --log-max-bytes N      total size cap of the log files (default 1048576)
  --ring-bytes N         byte budget of the record ring (default 8388608)
  --heartbeat-secs N     heartbeat interval (default 60)
  --failover-secs N      leave a hung center (no HTTP/2 ping answer, no TCP progress,
                         acknowledgements stalled) within N s (default 15)
  --unacked-bytes N      packets kept until the center acknowledges them (default 16777216)
  --spool-dir DIR        disk spool for center outages (default WORK_DIR/spool)
  --spool-max-bytes N    byte cap of the disk spool, 0 disables it (default 268435456)
  --update-rollback-secs N  a self-updated binary must connect within N s,
                         else the previous one is restored (default 120)
  --update-max-starts N  starts of a self-updated binary before it has connected
                         and stayed up; one more rolls it back (default 3)
  --spool-full POLICY    when the spool is full: block (back-pressure on the plugins)
                         or drop-oldest (oldest spooled packets dropped, counted)
                         (default block)
  --foreground           also log to stderr
  --empty-config-removes-all[=true|false]
                         an empty plugin config list removes every plugin
                         (Elkeid's behaviour; default off: keep them)
  --probe-connect        dial the centers once (TLS + HTTP/2), exit 0 on success
  --version              print the version and exit
  --help                 print this help and exit

Environment: SPECIFIED_AGENT_ID, specified_idc, specified_region, RUNTIME_MODE=DEBUG.
";

/// Errors building the configuration. Every variant names the bad key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value could not be parsed or is out of range.
    #[error("invalid value for {key}: {msg}")]
    Invalid {
        /// The configuration key or flag.
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// A flag that needs a value had none.
    #[error("missing value for {0}")]
    MissingValue(String),
    /// An unknown command-line flag.
    #[error("unknown option {0}")]
    UnknownFlag(String),
    /// The configuration file could not be read.
    #[error("config: cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML for this schema.
    #[error("config: {0}")]
    Toml(String),
}

impl ConfigError {
    fn invalid(key: &str, msg: impl std::fmt::Display) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            msg: msg.to_string(),
        }
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    /// Run the agent.
    Run(Box<Config>),
    /// Dial the configured centers once (TLS + HTTP/2) and exit 0 on the
    /// first success (`--probe-connect`; self-update runs a new binary so
    /// before it replaces the running one).
    Probe(Box<Config>),
    /// Print the version.
    Version,
    /// Print usage.
    Help,
}

/// Server lists of one region (§2.4).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerList {
    /// Service-discovery `host:port` entries, tried first.
    #[serde(default)]
    pub service_discovery: Vec<String>,
    /// Private center `host:port` entries.
    #[serde(default)]
    pub private: Vec<String>,
    /// Public center `host:port` entries, tried last.
    #[serde(default)]
    pub public: Vec<String>,
}

/// PEM material or where to find it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pem {
    /// A file read at connect time.
    File(PathBuf),
    /// Bytes embedded at build time.
    Embedded(&'static [u8]),
}

impl Pem {
    /// The PEM bytes.
    pub fn load(&self) -> std::io::Result<Vec<u8>> {
        match self {
            Pem::File(p) => std::fs::read(p),
            Pem::Embedded(b) => Ok(b.to_vec()),
        }
    }
}

/// Log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    /// error
    Error,
    /// warn
    Warn,
    /// info
    Info,
    /// debug
    Debug,
    /// trace
    Trace,
}

impl LogLevel {
    fn parse(key: &str, s: &str) -> Result<Self, ConfigError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return Err(ConfigError::invalid(key, format!("unknown level {s:?}"))),
        })
    }
}

/// What happens when the disk spool is full and no center takes data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpoolFull {
    /// Nothing more is spooled: the ring fills and plugins block (no loss).
    #[default]
    Block,
    /// The oldest spooled packets are dropped to make room (a segment at a
    /// time), counted in the heartbeat (`spool_dropped_packets`,
    /// `spool_dropped_records`) and in `status.json`.
    DropOldest,
}

impl SpoolFull {
    fn parse(key: &str, s: &str) -> Result<Self, ConfigError> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "block" => SpoolFull::Block,
            "drop-oldest" | "drop_oldest" => SpoolFull::DropOldest,
            _ => {
                return Err(ConfigError::invalid(
                    key,
                    format!("{s:?} is not block or drop-oldest"),
                ));
            }
        })
    }

    /// The value as written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            SpoolFull::Block => "block",
            SpoolFull::DropOldest => "drop-oldest",
        }
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory: machine-id, specified_env, logs, plugins.
    pub work_dir: PathBuf,
    /// Server lists per region.
    pub servers: BTreeMap<String, ServerList>,
    /// Current region (`specified_region`).
    pub region: String,
    /// Current IDC (`specified_idc`).
    pub idc: String,
    /// `SPECIFIED_AGENT_ID` when set (even empty).
    pub specified_agent_id: Option<String>,
    /// CA certificate(s) verifying the center.
    pub ca: Option<Pem>,
    /// Client certificate chain.
    pub cert: Option<Pem>,
    /// Client private key.
    pub key: Option<Pem>,
    /// Name verified in the center certificate (also sent as SNI).
    pub server_name: String,
    /// Blocking worker threads; the process runs at most 2 + workers threads
    /// (runtime, log writer, blocking pool).
    pub workers: usize,
    /// Log level.
    pub log_level: LogLevel,
    /// Total size cap of the log files, bytes.
    pub log_max_bytes: u64,
    /// Byte budget of the record ring.
    pub ring_bytes: usize,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
    /// Also log to stderr.
    pub foreground: bool,
    /// Timeout of the service-discovery request.
    pub sd_timeout: Duration,
    /// Timeout of each dial (TCP + TLS + h2 handshake).
    pub dial_timeout: Duration,
    /// How long SIGTERM waits to flush the ring to the center.
    pub flush_deadline: Duration,
    /// Bound for leaving a hung center (stalled acknowledgements,
    /// `TCP_USER_TIMEOUT`; HTTP/2 pings are answered or fail sooner).
    pub failover: Duration,
    /// Bytes of packets kept until acknowledged.
    pub unacked_bytes: usize,
    /// Disk spool directory (`None`: `<work-dir>/spool`).
    pub spool_dir: Option<PathBuf>,
    /// Disk spool byte cap; 0 disables the spool.
    pub spool_max_bytes: u64,
    /// Policy when the spool is full.
    pub spool_full: SpoolFull,
    /// An empty plugin config list stops and deletes every plugin (Elkeid's
    /// behaviour); off: an empty list keeps the running plugins.
    pub empty_config_removes_all: bool,
    /// A self-updated binary must connect within this bound after the swap.
    pub update_rollback: Duration,
    /// Starts of a self-updated binary allowed before it is rolled back.
    pub update_max_starts: u32,
}

impl Config {
    /// Defaults (with build-time embedded material and servers).
    pub fn defaults() -> Config {
        let mut servers = BTreeMap::new();
        if let Some(s) = EMBEDDED_SERVER {
            let private = s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            servers.insert(
                "default".to_string(),
                ServerList {
                    private,
                    ..ServerList::default()
                },
            );
        }
        let embedded = |b: &'static [u8]| (!b.is_empty()).then_some(Pem::Embedded(b));
        Config {
            work_dir: PathBuf::from("/var/lib/elkeid-agent"),
            servers,
            region: "default".into(),
            idc: "default".into(),
            specified_agent_id: None,
            ca: embedded(EMBEDDED_CA),
            cert: embedded(EMBEDDED_CERT),
            key: embedded(EMBEDDED_KEY),
            server_name: "elkeid.com".into(),
            workers: 2,
            log_level: LogLevel::Info,
            log_max_bytes: 1024 * 1024,
            ring_bytes: 8 * 1024 * 1024,
            heartbeat_interval: Duration::from_secs(60),
            foreground: false,
            sd_timeout: Duration::from_secs(5),
            dial_timeout: Duration::from_secs(15),
            flush_deadline: Duration::from_secs(5),
            failover: Duration::from_secs(15),
            unacked_bytes: 16 * 1024 * 1024,
            spool_dir: None,
            spool_max_bytes: 256 * 1024 * 1024,
            spool_full: SpoolFull::Block,
            empty_config_removes_all: false,
            update_rollback: Duration::from_secs(120),
            update_max_starts: 3,
        }
    }

    /// The disk spool directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.spool_dir
            .clone()
            .unwrap_or_else(|| self.work_dir.join("spool"))
    }

    /// Server list of the current region (empty when none).
    pub fn region_servers(&self) -> ServerList {
        self.servers.get(&self.region).cloned().unwrap_or_default()
    }

    /// `<work-dir>/specified_env`, persisted by task 1051.
    pub fn specified_env_path(&self) -> PathBuf {
        self.work_dir.join("specified_env")
    }
}

/// TOML file schema.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    work_dir: Option<PathBuf>,
    region: Option<String>,
    idc: Option<String>,
    server_name: Option<String>,
    workers: Option<i64>,
    log_level: Option<String>,
    log_max_bytes: Option<i64>,
    ring_bytes: Option<i64>,
    heartbeat_secs: Option<i64>,
    sd_timeout_secs: Option<i64>,
    dial_timeout_secs: Option<i64>,
    flush_deadline_secs: Option<i64>,
    failover_secs: Option<i64>,
    unacked_bytes: Option<i64>,
    spool_dir: Option<PathBuf>,
    spool_max_bytes: Option<i64>,
    spool_full: Option<String>,
    empty_config_removes_all: Option<bool>,
    update_rollback_secs: Option<i64>,
    update_max_starts: Option<i64>,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    servers: BTreeMap<String, ServerList>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

fn range(key: &str, v: i64, min: i64, max: i64) -> Result<i64, ConfigError> {
    if v < min || v > max {
        return Err(ConfigError::invalid(
            key,
            format!("{v} is outside {min}..={max}"),
        ));
    }
    Ok(v)
}

fn parse_num(key: &str, s: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
    let v: i64 = s
        .trim()
        .parse()
        .map_err(|_| ConfigError::invalid(key, format!("{s:?} is not an integer")))?;
    range(key, v, min, max)
}

fn check_addr(key: &str, s: &str) -> Result<String, ConfigError> {
    let ok = match s.rsplit_once(':') {
        Some((h, p)) => !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    };
    if !ok {
        return Err(ConfigError::invalid(key, format!("{s:?} is not HOST:PORT")));
    }
    Ok(s.to_string())
}

fn check_name(key: &str, s: &str) -> Result<String, ConfigError> {
    if s.is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control()) {
        return Err(ConfigError::invalid(
            key,
            format!("{s:?} is not a valid name"),
        ));
    }
    Ok(s.to_string())
}

const MAX_LOG: i64 = 1 << 30;
const MAX_RING: i64 = 1 << 30;
const MAX_SPOOL: i64 = 1 << 40;

fn apply_file(cfg: &mut Config, f: FileConfig) -> Result<(), ConfigError> {
    if let Some(v) = f.work_dir {
        cfg.work_dir = v;
    }
    if let Some(v) = f.region {
        cfg.region = check_name("region", &v)?;
    }
    if let Some(v) = f.idc {
        cfg.idc = check_name("idc", &v)?;
    }
    if let Some(v) = f.server_name {
        cfg.server_name = check_name("server_name", &v)?;
    }
    if let Some(v) = f.workers {
        cfg.workers = range("workers", v, 1, 64)? as usize;
    }
    if let Some(v) = f.log_level {
        cfg.log_level = LogLevel::parse("log_level", &v)?;
    }
    if let Some(v) = f.log_max_bytes {
        cfg.log_max_bytes = range("log_max_bytes", v, 4096, MAX_LOG)? as u64;
    }
    if let Some(v) = f.ring_bytes {
        cfg.ring_bytes = range("ring_bytes", v, 1 << 20, MAX_RING)? as usize;
    }
    if let Some(v) = f.heartbeat_secs {
        cfg.heartbeat_interval = Duration::from_secs(range("heartbeat_secs", v, 1, 86400)? as u64);
    }
    if let Some(v) = f.sd_timeout_secs {
        cfg.sd_timeout = Duration::from_secs(range("sd_timeout_secs", v, 1, 600)? as u64);
    }
    if let Some(v) = f.dial_timeout_secs {
        cfg.dial_timeout = Duration::from_secs(range("dial_timeout_secs", v, 1, 600)? as u64);
    }
    if let Some(v) = f.flush_deadline_secs {
        cfg.flush_deadline = Duration::from_secs(range("flush_deadline_secs", v, 0, 600)? as u64);
    }
    if let Some(v) = f.failover_secs {
        cfg.failover = Duration::from_secs(range("failover_secs", v, 3, 3600)? as u64);
    }
    if let Some(v) = f.unacked_bytes {
        cfg.unacked_bytes = range("unacked_bytes", v, 1 << 20, MAX_RING)? as usize;
    }
    if let Some(v) = f.spool_dir {
        cfg.spool_dir = Some(v);
    }
    if let Some(v) = f.update_rollback_secs {
        cfg.update_rollback =
            Duration::from_secs(range("update_rollback_secs", v, 1, 86400)? as u64);
    }
    if let Some(v) = f.update_max_starts {
        cfg.update_max_starts = range("update_max_starts", v, 1, 100)? as u32;
    }
    if let Some(v) = f.spool_max_bytes {
        cfg.spool_max_bytes = range("spool_max_bytes", v, 0, MAX_SPOOL)? as u64;
    }
    if let Some(v) = f.spool_full {
        cfg.spool_full = SpoolFull::parse("spool_full", &v)?;
    }
    if let Some(v) = f.empty_config_removes_all {
        cfg.empty_config_removes_all = v;
    }
    if let Some(p) = f.tls.ca {
        cfg.ca = Some(Pem::File(p));
    }
    if let Some(p) = f.tls.cert {
        cfg.cert = Some(Pem::File(p));
    }
    if let Some(p) = f.tls.key {
        cfg.key = Some(Pem::File(p));
    }
    for (region, list) in f.servers {
        let key = |k: &str| format!("servers.{region}.{k}");
        for a in &list.service_discovery {
            check_addr(&key("service_discovery"), a)?;
        }
        for a in &list.private {
            check_addr(&key("private"), a)?;
        }
        for a in &list.public {
            check_addr(&key("public"), a)?;
        }
        cfg.servers.insert(region, list);
    }
    Ok(())
}

/// Reads Java-properties style `key = value` lines (`specified_env`).
pub fn parse_properties(s: &str) -> BTreeMap<String, String> {
    s.lines()
        .filter_map(|l| {
            let l = l.trim();
            if l.starts_with('#') {
                return None;
            }
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Parses the command line (without argv\[0\]) and environment.
pub fn parse<I, E>(args: I, env: E) -> Result<Command, ConfigError>
where
    I: IntoIterator<Item = String>,
    E: Fn(&str) -> Option<String>,
{
    // One non-generic body: `main` and `status` each had their own
    // monomorphized (and inlined) copy, ~15 KiB of the MIPS binary.
    parse_args(args.into_iter().collect(), &env)
}

fn parse_args(
    args: Vec<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Command, ConfigError> {
    // First pass: flags into a list; --config is applied before the rest.
    let mut flags: Vec<(String, Option<String>)> = Vec::new();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        match name.as_str() {
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "--foreground" | "--probe-connect" => flags.push((name, None)),
            // A switch that also takes `=true|false` (to override the file).
            "--empty-config-removes-all" => flags.push((name, inline)),
            "--config"
            | "--work-dir"
            | "--server"
            | "--public"
            | "--sd"
            | "--region"
            | "--idc"
            | "--ca"
            | "--cert"
            | "--key"
            | "--server-name"
            | "--workers"
            | "--log-level"
            | "--log-max-bytes"
            | "--ring-bytes"
            | "--heartbeat-secs"
            | "--failover-secs"
            | "--unacked-bytes"
            | "--spool-dir"
            | "--spool-max-bytes"
            | "--update-rollback-secs"
            | "--update-max-starts"
            | "--spool-full" => {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue(name.clone()))?,
                };
                flags.push((name, Some(v)));
            }
            _ => return Err(ConfigError::UnknownFlag(a)),
        }
    }

    let mut cfg = Config::defaults();
    if let Some((_, Some(path))) = flags.iter().rev().find(|(n, _)| n == "--config") {
        let path = PathBuf::from(path);
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let f: FileConfig =
            basic_toml::from_str(&text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        apply_file(&mut cfg, f)?;
    }
    // --work-dir first: specified_env lives there.
    if let Some((_, Some(v))) = flags.iter().rev().find(|(n, _)| n == "--work-dir") {
        cfg.work_dir = PathBuf::from(v);
    }

    // Environment, then the persisted specified_env (written by task 1051,
    // the most recent decision) on top of it.
    if let Some(v) = env("specified_idc").filter(|v| !v.is_empty()) {
        cfg.idc = check_name("specified_idc", &v)?;
    }
    if let Some(v) = env("specified_region").filter(|v| !v.is_empty()) {
        cfg.region = check_name("specified_region", &v)?;
    }
    if let Ok(s) = std::fs::read_to_string(cfg.specified_env_path()) {
        let props = parse_properties(&s);
        if let Some(v) = props.get("specified_idc").filter(|v| !v.is_empty()) {
            cfg.idc = check_name("specified_env.specified_idc", v)?;
        }
        if let Some(v) = props.get("specified_region").filter(|v| !v.is_empty()) {
            cfg.region = check_name("specified_env.specified_region", v)?;
        }
    }
    cfg.specified_agent_id = env("SPECIFIED_AGENT_ID");
    if env("RUNTIME_MODE").as_deref() == Some("DEBUG") {
        cfg.log_level = LogLevel::Debug;
    }

    // Flags last.
    let mut private_flags = Vec::new();
    let mut public_flags = Vec::new();
    let mut sd_flags = Vec::new();
    let probe = flags.iter().any(|(n, _)| n == "--probe-connect");
    for (name, v) in flags {
        let v = v.unwrap_or_default();
        let key = name.trim_start_matches('-');
        match name.as_str() {
            "--foreground" => cfg.foreground = true,
            "--empty-config-removes-all" => {
                cfg.empty_config_removes_all = match v.to_ascii_lowercase().as_str() {
                    "" | "true" | "1" | "yes" | "on" => true,
                    "false" | "0" | "no" | "off" => false,
                    _ => {
                        return Err(ConfigError::invalid(
                            key,
                            format!("{v:?} is not true or false"),
                        ));
                    }
                }
            }
            "--probe-connect" => {}
            "--server" => private_flags.push(check_addr(key, &v)?),
            "--public" => public_flags.push(check_addr(key, &v)?),
            "--sd" => sd_flags.push(check_addr(key, &v)?),
            "--region" => cfg.region = check_name(key, &v)?,
            "--idc" => cfg.idc = check_name(key, &v)?,
            "--ca" => cfg.ca = Some(Pem::File(v.into())),
            "--cert" => cfg.cert = Some(Pem::File(v.into())),
            "--key" => cfg.key = Some(Pem::File(v.into())),
            "--server-name" => cfg.server_name = check_name(key, &v)?,
            "--workers" => cfg.workers = parse_num(key, &v, 1, 64)? as usize,
            "--log-level" => cfg.log_level = LogLevel::parse(key, &v)?,
            "--log-max-bytes" => cfg.log_max_bytes = parse_num(key, &v, 4096, MAX_LOG)? as u64,
            "--ring-bytes" => cfg.ring_bytes = parse_num(key, &v, 1 << 20, MAX_RING)? as usize,
            "--heartbeat-secs" => {
                cfg.heartbeat_interval = Duration::from_secs(parse_num(key, &v, 1, 86400)? as u64)
            }
            "--failover-secs" => {
                cfg.failover = Duration::from_secs(parse_num(key, &v, 3, 3600)? as u64)
            }
            "--unacked-bytes" => {
                cfg.unacked_bytes = parse_num(key, &v, 1 << 20, MAX_RING)? as usize
            }
            "--spool-dir" => cfg.spool_dir = Some(PathBuf::from(v)),
            "--update-rollback-secs" => {
                cfg.update_rollback = Duration::from_secs(parse_num(key, &v, 1, 86400)? as u64)
            }
            "--update-max-starts" => cfg.update_max_starts = parse_num(key, &v, 1, 100)? as u32,
            "--spool-max-bytes" => cfg.spool_max_bytes = parse_num(key, &v, 0, MAX_SPOOL)? as u64,
            "--spool-full" => cfg.spool_full = SpoolFull::parse(key, &v)?,
            _ => {} // --config / --work-dir already applied
        }
    }
    // Flags replace the corresponding list of the current region.
    let region = cfg.region.clone();
    let entry = cfg.servers.entry(region).or_default();
    if !private_flags.is_empty() {
        entry.private = private_flags;
    }
    if !public_flags.is_empty() {
        entry.public = public_flags;
    }
    if !sd_flags.is_empty() {
        entry.service_discovery = sd_flags;
    }
    if cfg.work_dir.as_os_str().is_empty() {
        return Err(ConfigError::invalid("work_dir", "empty path"));
    }
    if probe {
        return Ok(Command::Probe(Box::new(cfg)));
    }
    Ok(Command::Run(Box::new(cfg)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str], env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match parse(args.iter().map(|s| s.to_string()), |k| {
            env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.clone())
        })? {
            Command::Run(c) => Ok(*c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let c = run(&[], &[]).unwrap();
        assert_eq!(c.work_dir, PathBuf::from("/var/lib/elkeid-agent"));
        assert_eq!(c.server_name, "elkeid.com");
        assert_eq!(c.workers, 2);
        assert_eq!(c.log_max_bytes, 1 << 20);
        assert_eq!(c.region, "default");
        assert_eq!(c.idc, "default");
        assert_eq!(c.specified_agent_id, None);
        assert_eq!(c.heartbeat_interval, Duration::from_secs(60));
        assert_eq!(c.update_rollback, Duration::from_secs(120));
        assert_eq!(c.update_max_starts, 3);
    }

    #[test]
    fn update_rollback_flags_and_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("agent.toml");
        std::fs::write(&f, "update_rollback_secs = 30\nupdate_max_starts = 5\n").unwrap();
        let c = run(&["--config", f.to_str().unwrap()], &[]).unwrap();
        assert_eq!(c.update_rollback, Duration::from_secs(30));
        assert_eq!(c.update_max_starts, 5);
        let c = run(
            &[
                "--config",
                f.to_str().unwrap(),
                "--update-rollback-secs=7",
                "--update-max-starts",
                "2",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.update_rollback, Duration::from_secs(7));
        assert_eq!(c.update_max_starts, 2);
        let e = run(&["--update-max-starts", "0"], &[]).unwrap_err();
        assert!(e.to_string().contains("update-max-starts"), "{e}");
        let e = run(&["--update-rollback-secs", "0"], &[]).unwrap_err();
        assert!(e.to_string().contains("update-rollback-secs"), "{e}");
    }

    #[test]
    fn flags_env_and_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("agent.toml");
        std::fs::write(
            &f,
            r#"
workers = 3
log_level = "warn"
server_name = "center.example"
[tls]
ca = "/x/ca.crt"
[servers.default]
private = ["10.0.0.1:6751"]
public = ["1.2.3.4:6751"]
[servers.eu]
private = ["10.1.0.1:6751"]
"#,
        )
        .unwrap();
        let wd = d.path().join("wd");
        let c = run(
            &[
                "--config",
                f.to_str().unwrap(),
                "--work-dir",
                wd.to_str().unwrap(),
                "--server",
                "127.0.0.1:1",
                "--server=127.0.0.1:2",
                "--workers",
                "4",
            ],
            &[
                ("SPECIFIED_AGENT_ID", ""),
                ("specified_idc", "hz"),
                ("RUNTIME_MODE", "DEBUG"),
            ],
        )
        .unwrap();
        assert_eq!(c.workers, 4);
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.server_name, "center.example");
        assert_eq!(c.ca, Some(Pem::File("/x/ca.crt".into())));
        assert_eq!(c.specified_agent_id.as_deref(), Some(""));
        assert_eq!(c.idc, "hz");
        assert_eq!(c.work_dir, wd);
        let s = c.region_servers();
        assert_eq!(s.private, vec!["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(s.public, vec!["1.2.3.4:6751"]);
        assert_eq!(c.servers["eu"].private, vec!["10.1.0.1:6751"]);
    }

    #[test]
    fn specified_env_file_wins_over_env() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("specified_env"),
            "specified_idc = sh\nspecified_region=eu\n",
        )
        .unwrap();
        let c = run(
            &["--work-dir", d.path().to_str().unwrap()],
            &[("specified_idc", "hz")],
        )
        .unwrap();
        assert_eq!(c.idc, "sh");
        assert_eq!(c.region, "eu");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = run(&["--workers", "0"], &[]).unwrap_err().to_string();
        assert!(e.contains("workers"), "{e}");
        let e = run(&["--server", "nohost"], &[]).unwrap_err().to_string();
        assert!(e.contains("server"), "{e}");
        let e = run(&["--bogus"], &[]).unwrap_err().to_string();
        assert!(e.contains("--bogus"), "{e}");
        let e = run(&["--ca"], &[]).unwrap_err().to_string();
        assert!(e.contains("--ca"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.toml");
        std::fs::write(&f, "ring_bytes = 5\n").unwrap();
        let e = run(&["--config", f.to_str().unwrap()], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("ring_bytes"), "{e}");
        std::fs::write(&f, "nope = 5\n").unwrap();
        let e = run(&["--config", f.to_str().unwrap()], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
        std::fs::write(&f, "[servers.x]\nprivate = [\"a:b\"]\n").unwrap();
        let e = run(&["--config", f.to_str().unwrap()], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("servers.x.private"), "{e}");
    }

    #[test]
    fn empty_config_removes_all_from_file_and_flag() {
        assert!(!run(&[], &[]).unwrap().empty_config_removes_all);
        assert!(
            run(&["--empty-config-removes-all"], &[])
                .unwrap()
                .empty_config_removes_all
        );
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.toml");
        std::fs::write(&f, "empty_config_removes_all = true\n").unwrap();
        let file = f.to_str().unwrap();
        assert!(
            run(&["--config", file], &[])
                .unwrap()
                .empty_config_removes_all
        );
        // The flag overrides the file either way.
        assert!(
            !run(&["--config", file, "--empty-config-removes-all=false"], &[])
                .unwrap()
                .empty_config_removes_all
        );
        let e = run(&["--empty-config-removes-all=maybe"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty-config-removes-all"), "{e}");
        std::fs::write(&f, "empty_config_removes_all = \"yes\"\n").unwrap();
        let e = run(&["--config", file], &[]).unwrap_err().to_string();
        assert!(e.contains("empty_config_removes_all"), "{e}");
    }

    #[test]
    fn spool_full_policy_from_file_and_flag() {
        assert_eq!(run(&[], &[]).unwrap().spool_full, SpoolFull::Block);
        assert_eq!(
            run(&["--spool-full", "drop-oldest"], &[])
                .unwrap()
                .spool_full,
            SpoolFull::DropOldest
        );
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.toml");
        std::fs::write(&f, "spool_full = \"drop-oldest\"\n").unwrap();
        let file = f.to_str().unwrap();
        assert_eq!(
            run(&["--config", file], &[]).unwrap().spool_full,
            SpoolFull::DropOldest
        );
        assert_eq!(
            run(&["--config", file, "--spool-full=block"], &[])
                .unwrap()
                .spool_full,
            SpoolFull::Block
        );
        let e = run(&["--spool-full", "drop-newest"], &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("spool-full"), "{e}");
    }

    #[test]
    fn version_and_help() {
        assert!(matches!(
            parse(["--version".to_string()], |_| None),
            Ok(Command::Version)
        ));
        assert!(matches!(
            parse(["--help".to_string()], |_| None),
            Ok(Command::Help)
        ));
    }
}
