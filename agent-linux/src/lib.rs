//! Single-threaded, Elkeid-compatible host-security agent.
//!
//! # Layout
//! - [`config`]: command line, TOML file and environment -> [`config::Config`].
//! - `identity`: agent id (§3.2 of the wire spec, without the empty-id bug).
//! - `host`: hostname, IP lists, platform, kernel, DMI and system facts.
//! - `procstat`: per-process samples from procfs for both heartbeats.
//! - `buffer`: the core ring behind a `RefCell`, with back-pressure and
//!   "send now" wake-ups.
//! - `agent`: the top; builds and owns the parts below, executes commands.
//! - `command`: pure `Command -> Vec<Action>` and the plugin-sync diff.
//! - `counters`, `meta`, `stop`: plain counters, host metadata, stop signal.
//! - `transport/`: mTLS + h2 connection (owns the `Link`),
//!   address selection, send and receive loops.
//! - `heartbeat`: 1000 / 1001 records.
//! - `tasks`: agent tasks 1050 (upload), 1051 (idc/region), 1060 (shutdown).
//! - [`log`]: tracing to a size-capped file, stderr, and 1010 records.
//! - `signals`: SIGTERM / SIGUSR1 / SIGUSR2.
//! - `fetch`: the one HTTP(S) client (artifact downloads with SHA-256
//!   checks for plugins and self-update; service discovery).
//! - [`status`]: `<work-dir>/status.json` and `elkeid-agent status`.
//! - `plugin/`, `update`: plugin management and self-update.
//! - `rollback`: the self-update journal, trial and automatic rollback.
//!
//! Everything runs on one tokio `current_thread` runtime inside a `LocalSet`;
//! blocking work (disk I/O included) goes to the blocking pool capped at
//! `workers` threads, and log lines to one writer thread, so the process
//! never runs more than 2 + `workers` threads.
#![deny(unsafe_code)]

pub mod config;
pub mod log;

mod agent;
mod buffer;
mod clock;
mod command;
mod counters;
mod delivery_stats;
mod fetch;
mod heartbeat;
mod host;
mod identity;
mod meta;
mod plugin;
mod procstat;
mod rollback;
mod signals;
mod spool;
mod stack;
pub mod status;
mod stop;
mod tasks;
mod transport;
mod update;

/// The main-thread stack trim, for `tests/stack_trim.rs` (not a stable API).
#[doc(hidden)]
pub fn trim_main_stack() -> usize {
    stack::trim_main_stack()
}

/// Entry points for the fuzz targets in `fuzz/` (not a stable API).
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    /// Runs the plugin archive extractor on `archive` bytes (a `tar.gz`, or
    /// a bare tar when `gzip` is false) into the empty directory `dest`,
    /// with caps of 1 MiB and 64 entries; `Ok` = files written.
    pub fn extract_plugin_archive(
        archive: &[u8],
        gzip: bool,
        dest: &Path,
    ) -> Result<usize, String> {
        use crate::plugin::extract::{Limits, extract_tar};
        let limits = Limits {
            max_total: 1024 * 1024,
            max_entries: 64,
        };
        let r = if gzip {
            extract_tar(flate2::read::GzDecoder::new(archive), dest, limits)
        } else {
            extract_tar(archive, dest, limits)
        };
        r.map_err(|e| e.to_string())
    }
}

use std::rc::Rc;
use std::time::Duration;

pub use stop::Exit;

/// Errors that stop the agent at start-up; [`RunError::exit_code`] maps each
/// to a `sysexits.h` code (64 for configuration-class errors).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The work directory cannot be created.
    #[error("work_dir {path}: {source}")]
    WorkDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS material is missing or invalid.
    #[error("tls: {0}")]
    Tls(String),
    /// The agent id could not be persisted.
    #[error("identity: {0}")]
    Identity(String),
}

impl RunError {
    /// Exit code for the binary (`sysexits.h`): 64 (`EX_USAGE`, bad
    /// configuration: TLS material missing or invalid), 73 (`EX_CANTCREAT`:
    /// the work directory cannot be created), 74 (`EX_IOERR`: the agent id
    /// cannot be persisted).
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Tls(_) => 64,
            RunError::WorkDir { .. } => 73,
            RunError::Identity(_) => 74,
        }
    }
}

/// After a failed re-exec of a self-updated binary: rolls the update back
/// (journal `rolled_back`, then `<exe>.old` renamed over `exe`; without a
/// journal only the rename). Returns whether an old binary was restored.
pub fn restore_old_binary(
    work_dir: &std::path::Path,
    exe: &std::path::Path,
    reason: &str,
) -> std::io::Result<bool> {
    if let Ok(Some(mut j)) = rollback::read(work_dir)
        && j.phase == rollback::Phase::Trial
    {
        return rollback::roll_back(work_dir, &mut j, reason).map(|_| true);
    }
    update::restore_old_binary(exe)
}

/// A pending self-update resolved at start-up ([`update_start_check`]).
#[derive(Debug)]
pub struct UpdateStart {
    check: rollback::StartCheck,
}

impl UpdateStart {
    /// The update was just rolled back: exec this binary (the previous
    /// one) with the same arguments instead of running.
    pub fn reexec(&self) -> Option<&std::path::Path> {
        match &self.check.action {
            rollback::StartAction::Reexec(p) => Some(p),
            _ => None,
        }
    }

    /// Logs what the check found (call once logging is set up).
    pub fn log_notes(&self) {
        for (error, note) in &self.check.notes {
            if *error {
                tracing::error!("{note}");
            } else {
                tracing::warn!("{note}");
            }
        }
        if let rollback::StartAction::Trial { deadline } = self.check.action {
            tracing::info!(
                deadline,
                "running a self-updated binary on trial: it must connect before the deadline"
            );
        }
    }
}

/// Resolves `<work-dir>/update.journal` before anything else that could
/// fail: counts a start of a self-updated binary on trial, rolls it back
/// after too many starts or past its connect deadline, finishes an
/// interrupted swap or rollback, removes staged leftovers.
pub fn update_start_check(cfg: &config::Config) -> UpdateStart {
    let running = std::fs::metadata("/proc/self/exe").ok();
    let check = rollback::check_at_start(&cfg.work_dir, running.as_ref(), rollback::now_unix());
    if matches!(check.action, rollback::StartAction::Trial { .. }) {
        rollback::abort_at("started");
    }
    UpdateStart { check }
}

/// What [`preflight`] checked and built (the TLS client configuration).
#[derive(Debug)]
pub struct Preflight {
    tls: std::sync::Arc<rustls::ClientConfig>,
    update: rollback::StartAction,
}

impl Preflight {
    /// Hands the start-up update check to [`run`] (deadline timer,
    /// commit or rollback report after connecting).
    pub fn set_update(&mut self, u: UpdateStart) {
        self.update = u.check.action;
    }
}

/// Validates the configuration without touching the filesystem: the CA,
/// certificate and key are read and loaded and the server name is checked.
/// The binary calls this before it creates `work_dir` or its log file, so a
/// bad configuration leaves nothing behind.
pub fn preflight(cfg: &config::Config) -> Result<Preflight, RunError> {
    let tls = transport::tls::client_config(cfg).map_err(|e| RunError::Tls(e.to_string()))?;
    transport::tls::server_name(&cfg.server_name).map_err(|e| RunError::Tls(e.to_string()))?;
    Ok(Preflight {
        tls,
        update: rollback::StartAction::Normal,
    })
}

/// `--probe-connect`: dials the configured private then public centers,
/// each once within `dial_timeout`; returns the address that answered.
/// Must run inside a `LocalSet`.
pub async fn probe(cfg: &config::Config, pre: &Preflight) -> Result<String, String> {
    let name = transport::tls::server_name(&cfg.server_name).map_err(|e| e.to_string())?;
    let servers = cfg.region_servers();
    let mut last = String::from("no center address configured");
    for addr in servers.private.iter().chain(servers.public.iter()) {
        match transport::channel::Channel::connect(
            addr,
            pre.tls.clone(),
            name.clone(),
            std::sync::Arc::default(),
            cfg.dial_timeout,
            cfg.failover,
        )
        .await
        {
            Ok(_) => return Ok(addr.clone()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Runs the agent until SIGTERM, task 1060 or a self-update; then stops
/// plugins, flushes the ring to the center (bounded by `flush_deadline`)
/// and returns why it stopped. Must run inside a `LocalSet`.
pub async fn run(mut cfg: config::Config, pre: Preflight) -> Result<Exit, RunError> {
    if matches!(pre.update, rollback::StartAction::Trial { .. })
        && std::env::var_os("ELKEID_TEST_TRIAL_NO_CONNECT").is_some()
    {
        // Test hook (documented in README): a binary on trial that cannot
        // reach any center, as a broken new version would.
        tracing::warn!("ELKEID_TEST_TRIAL_NO_CONNECT: dialling 127.0.0.1:1 only");
        cfg.servers = std::iter::once((
            cfg.region.clone(),
            config::ServerList {
                private: vec!["127.0.0.1:1".into()],
                ..config::ServerList::default()
            },
        ))
        .collect();
    }
    std::fs::create_dir_all(&cfg.work_dir).map_err(|source| RunError::WorkDir {
        path: cfg.work_dir.clone(),
        source,
    })?;
    let tls = pre.tls;
    let (id, source) = identity::load(&cfg.work_dir, cfg.specified_agent_id.as_deref())
        .map_err(|e| RunError::Identity(e.to_string()))?;
    tracing::info!(agent_id = %id, source = ?source, version = config::VERSION, "elkeid-agent starting");
    let ring = elkeid_core::ring::RingConfig {
        byte_budget: cfg.ring_bytes,
        ..Default::default()
    };
    let buffer = buffer::Buffer::new(ring);
    let mut plugin_ctx = plugin::PluginContext {
        empty_config_removes_all: cfg.empty_config_removes_all,
        ..plugin::PluginContext::new(cfg.work_dir.clone(), buffer.clone())
    };
    // A frame that passes the decoder must fit the ring (a small ring_bytes,
    // e.g. OpenWrt's 2 MiB, would otherwise restart a plugin at every large record).
    plugin_ctx.max_frame_len = buffer.max_plugin_frame();
    if plugin_ctx.max_frame_len < elkeid_core::frame::DEFAULT_MAX_FRAME_LEN {
        tracing::info!(
            ring_bytes = cfg.ring_bytes,
            max_frame_len = plugin_ctx.max_frame_len,
            "plugin frame cap sized to the ring"
        );
    }
    let plugins = Rc::new(plugin::PluginManager::new(plugin_ctx));
    let flush_deadline = cfg.flush_deadline;
    let watch = rollback::Watch::new(cfg.work_dir.clone(), pre.update);
    let agent = agent::Agent::new(cfg, id, buffer, plugins, watch);
    agent.update.spawn(agent.stop.clone());
    let (tasks, mut transport) = agent.spawn(tls);
    let why = agent.stop.stopped().await;
    let delivery = agent.delivery.clone();
    tracing::info!(reason = ?why, "stopping: shutting plugins down");
    agent.plugins.shutdown().await;
    crate::log::drain_error_records(&agent.buffer);
    let deadline = tokio::time::Instant::now() + flush_deadline;
    // Flushed = the ring is empty and the center acknowledged everything
    // (or does not acknowledge at all).
    let flushed = || agent.buffer.is_empty() && delivery.settled();
    while !flushed() && tokio::time::Instant::now() < deadline {
        agent.buffer.kick();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if flushed() {
        tracing::info!("ring flushed to the center");
    }
    // End the Transfer stream cleanly (if connected), then stop the rest.
    agent.link.closing.set(true);
    agent.buffer.kick();
    if tokio::time::timeout(Duration::from_secs(2), &mut transport)
        .await
        .is_err()
    {
        transport.abort();
    }
    // What no center took goes to the disk spool (replayed at next start):
    // the unacknowledged window before everything spooled, the ring after.
    if !agent.buffer.is_empty() || !delivery.settled() {
        let window = delivery.window_to_spool();
        let ring = transport::spill(&agent.buffer, &agent.meta, &delivery, &mut Vec::new());
        delivery.seal();
        if agent.buffer.is_empty() && delivery.settled() {
            tracing::info!(
                window_packets = window,
                ring_records = ring,
                "unsent data moved to the disk spool"
            );
        } else {
            tracing::warn!(
                ring_len = agent.buffer.len(),
                unacked = delivery.stats().unacked_packets,
                "flush deadline passed; records left unsent (no spool room)"
            );
        }
    }
    for t in tasks {
        t.abort();
    }
    Ok(why)
}

#[cfg(test)]
mod run_error_tests {
    use super::RunError;

    #[test]
    fn exit_codes_follow_sysexits() {
        assert_eq!(RunError::Tls("x".into()).exit_code(), 64);
        let e = RunError::WorkDir {
            path: "/x".into(),
            source: std::io::Error::other("x"),
        };
        assert_eq!(e.exit_code(), 73);
        assert_eq!(RunError::Identity("x".into()).exit_code(), 74);
    }
}
