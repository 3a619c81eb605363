//! `elkeid-agent status`: what the running agent is doing, for operators.
//!
//! The running agent keeps `<work-dir>/status.json` (mode 0600, replaced
//! atomically every [`WRITE_EVERY`]): connection (server, since when,
//! reconnects, last disconnect), plugins (pid, version, restarts, records/s),
//! ring fill and drops, `state_detail`. `elkeid-agent status` reads it, checks
//! that the agent process is alive and the file fresh, adds the last
//! warnings/errors of the agent's own log, and prints a summary (or `--json`).
//! A file, not a socket: readable with `cat` on BusyBox, no listener in the
//! agent, and it tells "not running" from "hung" by its age.
//!
//! The transport and the plugin supervisor report connection changes and
//! restarts through [`connected`], [`disconnected`] and [`plugin_restarted`]
//! (a thread-local board: the agent runs on one thread).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::now_unix;

/// File name in the work dir.
pub const FILE: &str = "status.json";
/// How often the running agent rewrites the file.
pub const WRITE_EVERY: Duration = Duration::from_secs(2);
/// Older than this, the file is stale (the agent is hung or gone).
const STALE_SECS: i64 = 15;
/// How much of the end of the agent log is searched for warnings/errors.
const LOG_TAIL_BYTES: u64 = 64 * 1024;
/// Warnings/errors shown.
const LAST_ERRORS: usize = 5;

/// What the running agent publishes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    /// Agent process id.
    pub pid: u32,
    /// Agent id.
    pub agent_id: String,
    /// Agent version.
    pub version: String,
    /// `running` or `stopping`.
    pub state: String,
    /// Unix seconds the agent started.
    pub started_at: i64,
    /// Unix seconds of this snapshot.
    pub updated_at: i64,
    /// The connection to the center.
    pub connection: Connection,
    /// Managed plugins.
    pub plugins: Vec<PluginStatus>,
    /// The record ring.
    pub ring: Ring,
    /// `state_detail` of the heartbeat (empty = healthy).
    pub abnormal: Vec<String>,
    /// The disk spool (absent in files of older agents).
    #[serde(default)]
    pub spool: SpoolStatus,
}

/// The disk spool and its full policy.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SpoolStatus {
    /// Packets waiting.
    pub entries: u64,
    /// Bytes on disk.
    pub bytes: u64,
    /// `block` or `drop-oldest`.
    pub full_policy: String,
    /// Packets dropped from the full spool (drop-oldest) since start.
    pub dropped_packets: u64,
    /// Records in them.
    pub dropped_records: u64,
}

/// The connection to the center.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Connection {
    /// Connected now.
    pub connected: bool,
    /// `host:port` of the current (or last) center.
    pub server: String,
    /// Unix seconds of the current connection's start (0 = never).
    pub since: i64,
    /// Successful connections after the first.
    pub reconnects: u64,
    /// Why the last connection ended.
    pub last_disconnect: String,
    /// Unix seconds of that.
    pub last_disconnect_at: i64,
}

/// One managed plugin.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PluginStatus {
    /// Name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Process id (`None` while waiting to restart).
    pub pid: Option<u32>,
    /// Unix seconds the current process started.
    pub started_at: i64,
    /// Restarts after unexpected exits since the agent started.
    pub restarts: u64,
    /// Records read from the plugin per second (since the last heartbeat).
    pub records_per_sec: f64,
}

/// The record ring.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Ring {
    /// Records waiting.
    pub len: u64,
    /// Record slots.
    pub capacity: u64,
    /// Bytes waiting.
    pub bytes: u64,
    /// Byte budget.
    pub capacity_bytes: u64,
    /// Agent records dropped (the heartbeat's `drop_cnt`).
    pub drops: u64,
}

#[derive(Default)]
struct Board {
    server: String,
    connected: bool,
    since: i64,
    last_disconnect: String,
    last_disconnect_at: i64,
    restarts: BTreeMap<String, u64>,
}

thread_local! {
    static BOARD: RefCell<Board> = RefCell::new(Board::default());
}

/// The transport connected to `addr`.
pub(crate) fn connected(addr: &str) {
    BOARD.with_borrow_mut(|b| {
        b.server = addr.to_string();
        b.connected = true;
        b.since = now_unix();
    });
}

/// The transport's session ended (`why`: the error, or "" when clean).
pub(crate) fn disconnected(why: &str) {
    BOARD.with_borrow_mut(|b| {
        b.connected = false;
        b.last_disconnect = if why.is_empty() {
            "session ended".into()
        } else {
            why.chars().take(512).collect()
        };
        b.last_disconnect_at = now_unix();
    });
}

/// Plugin `name` is being restarted after an unexpected exit.
pub(crate) fn plugin_restarted(name: &str) {
    BOARD.with_borrow_mut(|b| {
        // Bounded by the managed plugins (names were validated).
        if b.restarts.len() < 1024 || b.restarts.contains_key(name) {
            *b.restarts.entry(name.to_string()).or_insert(0) += 1;
        }
    });
}

/// What the transport and the supervisor told the board: the connection
/// (`reconnects` from the agent's counters) and restarts per plugin.
pub(crate) fn board(reconnects: u64) -> (Connection, BTreeMap<String, u64>) {
    BOARD.with_borrow(|b| {
        (
            Connection {
                connected: b.connected,
                server: b.server.clone(),
                since: b.since,
                reconnects,
                last_disconnect: b.last_disconnect.clone(),
                last_disconnect_at: b.last_disconnect_at,
            },
            b.restarts.clone(),
        )
    })
}

/// Writes `status` to `<dir>/status.json` via a 0600 temp file + rename.
pub(crate) fn write(dir: &Path, status: &Status) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    let text = serde_json::to_vec(status).map_err(std::io::Error::other)?;
    f.write_all(&text)?;
    drop(f);
    std::fs::rename(&tmp, dir.join(FILE))
}

/// Keeps `<dir>/status.json` current until aborted (the agent's
/// lifetime); `snapshot(started_at)` is the agent's state now.
pub(crate) async fn run(dir: PathBuf, snapshot: impl Fn(i64) -> Status) {
    let started_at = now_unix();
    let mut failed = false;
    loop {
        let (d, status) = (dir.clone(), snapshot(started_at));
        // File I/O off the runtime thread: on the log writer thread, which
        // is always there (the blocking pool when logging is not set up).
        let (done, result) = tokio::sync::oneshot::channel();
        let job: crate::log::FileJob = Box::new(move || {
            let _ = done.send(write(&d, &status));
        });
        if let Err(job) = crate::log::run_on_writer(job) {
            tokio::task::spawn_blocking(job);
        }
        let r = result.await.map_err(std::io::Error::other).and_then(|r| r);
        match r {
            Ok(()) => failed = false,
            Err(error) if !failed => {
                // Once per failure streak: a full disk must not flood the log.
                tracing::warn!(%error, dir = %dir.display(), "cannot write status.json");
                failed = true;
            }
            Err(_) => {}
        }
        tokio::time::sleep(WRITE_EVERY).await;
    }
}

/// Reads `<dir>/status.json`.
pub fn read(dir: &Path) -> Result<Status, StatusError> {
    let path = dir.join(FILE);
    let mut f = std::fs::File::open(&path).map_err(|source| StatusError::Read {
        path: path.clone(),
        source,
    })?;
    // A status is a few KiB; refuse anything absurd instead of reading it.
    let mut text = Vec::new();
    Read::by_ref(&mut f)
        .take(4 * 1024 * 1024)
        .read_to_end(&mut text)
        .map_err(|source| StatusError::Read {
            path: path.clone(),
            source,
        })?;
    serde_json::from_slice(&text).map_err(|e| StatusError::Parse {
        path,
        msg: e.to_string(),
    })
}

/// Why no status could be shown.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No readable status file (agent never ran with this work dir, or no permission).
    #[error(
        "cannot read {path}: {source} (is the agent running with this work dir? it is root-only)"
    )]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a status.
    #[error("{path}: not a status file: {msg}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parse error.
        msg: String,
    },
}

/// Liveness of the agent behind a status file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Process alive, file fresh.
    Running,
    /// Process alive, file not updated for a while.
    Stale,
    /// No such process.
    NotRunning,
}

/// Whether `s` comes from a live agent, as of `now`.
pub fn liveness(s: &Status, now: i64) -> Liveness {
    // /proc/<pid>/exe of another program would be a recycled pid; the
    // comm name is enough to tell (BusyBox has /proc too).
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", s.pid)).unwrap_or_default();
    if s.pid == 0 || !comm.trim_end().starts_with("elkeid-agent") {
        return Liveness::NotRunning;
    }
    if now.saturating_sub(s.updated_at) > STALE_SECS {
        Liveness::Stale
    } else {
        Liveness::Running
    }
}

/// The last warnings/errors of the agent's log (`<dir>/log/elkeid-agent.log`
/// and its rotated predecessor), oldest first.
pub fn last_errors(dir: &Path) -> Vec<String> {
    let log = dir.join("log");
    let mut out = Vec::new();
    for name in ["elkeid-agent.log", "elkeid-agent.log.1"] {
        let Ok(mut f) = std::fs::File::open(log.join(name)) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let mut buf = Vec::new();
        if f.take(LOG_TAIL_BYTES).read_to_end(&mut buf).is_err() {
            continue;
        }
        let text = String::from_utf8_lossy(&buf);
        let mut found: Vec<String> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(|l| l.chars().take(300).collect())
            .collect();
        // The rotated file is older: its lines go first.
        found.append(&mut out);
        out = found;
        if out.len() >= LAST_ERRORS {
            break;
        }
    }
    let skip = out.len().saturating_sub(LAST_ERRORS);
    out.split_off(skip)
}

fn ago(now: i64, t: i64) -> String {
    if t <= 0 {
        return "-".into();
    }
    let d = now.saturating_sub(t).max(0);
    match d {
        0..=119 => format!("{d}s ago"),
        120..=7199 => format!("{}m ago", d / 60),
        _ => format!("{}h ago", d / 3600),
    }
}

/// The human-readable report.
pub fn render(s: &Status, live: Liveness, errors: &[String], now: i64) -> String {
    let mut o = String::new();
    let state = match live {
        Liveness::Running => s.state.clone(),
        Liveness::Stale => format!(
            "not responding (status {} old)",
            ago(now, s.updated_at).trim_end_matches(" ago")
        ),
        Liveness::NotRunning => format!("not running (last seen {})", ago(now, s.updated_at)),
    };
    o.push_str(&format!(
        "elkeid-agent {} (pid {}): {state}, up since {}\n  agent id    {}\n",
        s.version,
        s.pid,
        ago(now, s.started_at),
        s.agent_id
    ));
    let c = &s.connection;
    let conn = if c.connected && live != Liveness::Running {
        format!("was connected to {} (last known state)", c.server)
    } else if c.connected {
        format!("connected to {} since {}", c.server, ago(now, c.since))
    } else if c.server.is_empty() {
        "not connected yet".to_string()
    } else {
        format!(
            "disconnected from {} {}: {}",
            c.server,
            ago(now, c.last_disconnect_at),
            c.last_disconnect
        )
    };
    o.push_str(&format!(
        "  center      {conn}\n  reconnects  {}\n",
        c.reconnects
    ));
    let pct = |a: u64, b: u64| {
        if b == 0 {
            0.0
        } else {
            a as f64 * 100.0 / b as f64
        }
    };
    o.push_str(&format!(
        "  ring        {}/{} records ({:.0}%), {}/{} bytes ({:.0}%), {} dropped\n",
        s.ring.len,
        s.ring.capacity,
        pct(s.ring.len, s.ring.capacity),
        s.ring.bytes,
        s.ring.capacity_bytes,
        pct(s.ring.bytes, s.ring.capacity_bytes),
        s.ring.drops
    ));
    let sp = &s.spool;
    if sp.entries > 0 || sp.dropped_packets > 0 {
        o.push_str(&format!(
            "  spool       {} packets, {} bytes; full: {}, {} packets ({} records) dropped\n",
            sp.entries, sp.bytes, sp.full_policy, sp.dropped_packets, sp.dropped_records
        ));
    }
    if s.plugins.is_empty() {
        o.push_str("  plugins     none\n");
    } else {
        o.push_str("  plugins\n");
        let mut rows = vec![[
            "NAME".to_string(),
            "VERSION".into(),
            "PID".into(),
            "STARTED".into(),
            "RESTARTS".into(),
            "RECORDS/S".into(),
        ]];
        for p in &s.plugins {
            rows.push([
                p.name.clone(),
                p.version.clone(),
                p.pid.map_or_else(|| "waiting".into(), |p| p.to_string()),
                ago(now, p.started_at),
                p.restarts.to_string(),
                format!("{:.1}", p.records_per_sec),
            ]);
        }
        let w: Vec<usize> = (0..6)
            .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
            .collect();
        for r in &rows {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{c:<w$}", w = w[i]))
                .collect();
            o.push_str(&format!("    {}\n", line.join("  ").trim_end()));
        }
    }
    if !s.abnormal.is_empty() {
        o.push_str("  abnormal\n");
        for a in &s.abnormal {
            o.push_str(&format!("    {a}\n"));
        }
    }
    if !errors.is_empty() {
        o.push_str("  last warnings/errors (log)\n");
        for e in errors {
            o.push_str(&format!("    {e}\n"));
        }
    }
    o
}

/// `elkeid-agent status [--json] [--work-dir DIR | --config FILE]` (args
/// after `status`). Exit 0 running, 1 not running or not responding, 64
/// usage.
pub fn main(args: Vec<String>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let json = args.iter().any(|a| a == "--json");
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!(
            "elkeid-agent status [--json] [--work-dir DIR | --config FILE]\n\n\
             Shows the running agent's connection, plugins, ring and last errors,\n\
             from DIR/status.json (written by the agent every 2 s, root-only).\n\
             Exit 0 running, 1 not running or not responding, 64 usage.\n"
        );
        return ExitCode::SUCCESS;
    }
    let rest: Vec<String> = args.into_iter().filter(|a| a != "--json").collect();
    let dir = match crate::config::parse(rest, |k| std::env::var(k).ok()) {
        Ok(crate::config::Command::Run(cfg)) => cfg.work_dir,
        Ok(_) => {
            eprintln!("elkeid-agent status: unexpected argument (see elkeid-agent status --help)");
            return ExitCode::from(64);
        }
        Err(e) => {
            eprintln!("elkeid-agent status: {e}");
            return ExitCode::from(64);
        }
    };
    let s = match read(&dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("elkeid-agent status: {e}");
            return ExitCode::from(1);
        }
    };
    let now = now_unix();
    let live = liveness(&s, now);
    let errors = last_errors(&dir);
    if json {
        // A struct rather than `json!`: serialized by the same code as
        // status.json (a `serde_json::Value` tree needs a second copy of
        // every Serialize impl, ~6 KiB on MIPS).
        #[derive(Serialize)]
        struct Out<'a> {
            running: bool,
            liveness: &'static str,
            status: &'a Status,
            last_errors: &'a [String],
        }
        let out = Out {
            running: live == Liveness::Running,
            liveness: match live {
                Liveness::Running => "running",
                Liveness::Stale => "not_responding",
                Liveness::NotRunning => "not_running",
            },
            status: &s,
            last_errors: &errors,
        };
        match serde_json::to_string(&out) {
            Ok(v) => println!("{v}"),
            Err(e) => {
                eprintln!("elkeid-agent status: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", render(&s, live, &errors, now));
    }
    if live == Liveness::Running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            pid: std::process::id(),
            agent_id: "a1".into(),
            version: "0.1.0".into(),
            state: "running".into(),
            started_at: 1000,
            updated_at: 1990,
            connection: Connection {
                connected: true,
                server: "10.0.0.5:6751".into(),
                since: 1900,
                reconnects: 2,
                last_disconnect: "center ended the stream".into(),
                last_disconnect_at: 1899,
            },
            plugins: vec![PluginStatus {
                name: "collector".into(),
                version: "1.2.0".into(),
                pid: Some(4242),
                started_at: 1500,
                restarts: 1,
                records_per_sec: 12.5,
            }],
            ring: Ring {
                len: 512,
                capacity: 2048,
                bytes: 1024,
                capacity_bytes: 8 << 20,
                drops: 3,
            },
            abnormal: vec!["plugin collector exited with code 3 unexpectedly".into()],
            spool: SpoolStatus::default(),
        }
    }

    #[test]
    fn spool_drops_are_shown_and_old_files_still_parse() {
        let mut s = sample();
        s.spool = SpoolStatus {
            entries: 3,
            bytes: 4096,
            full_policy: "drop-oldest".into(),
            dropped_packets: 2,
            dropped_records: 40,
        };
        let text = render(&s, Liveness::Running, &[], s.updated_at);
        assert!(
            text.contains("spool       3 packets, 4096 bytes; full: drop-oldest, 2 packets (40 records) dropped"),
            "{text}"
        );
        // a status.json of an agent without the spool field
        let mut v = serde_json::to_value(sample()).unwrap();
        v.as_object_mut().unwrap().remove("spool");
        let old: Status = serde_json::from_value(v).unwrap();
        assert_eq!(old.spool, SpoolStatus::default());
    }

    #[test]
    fn file_round_trips_with_root_only_mode() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let s = sample();
        write(d.path(), &s).unwrap();
        assert_eq!(read(d.path()).unwrap(), s);
        let mode = std::fs::metadata(d.path().join(FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(d.path().join(FILE), "{").unwrap();
        assert!(matches!(read(d.path()), Err(StatusError::Parse { .. })));
        let e = read(&d.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope/status.json"), "{e}");
    }

    #[test]
    fn report_shows_connection_plugins_ring_and_errors() {
        let s = sample();
        let r = render(&s, Liveness::Running, &["x WARN y".into()], 2000);
        for want in [
            "elkeid-agent 0.1.0 (pid",
            "connected to 10.0.0.5:6751 since 100s ago",
            "reconnects  2",
            "512/2048 records (25%)",
            "3 dropped",
            "collector  1.2.0    4242",
            "12.5",
            "exited with code 3",
            "x WARN y",
        ] {
            assert!(r.contains(want), "{want}:\n{r}");
        }
        let mut down = s.clone();
        down.connection.connected = false;
        let r = render(&down, Liveness::NotRunning, &[], 2000);
        assert!(r.contains("not running (last seen 10s ago)"), "{r}");
        assert!(
            r.contains("disconnected from 10.0.0.5:6751 101s ago: center ended the stream"),
            "{r}"
        );
        let r = render(&s, Liveness::Stale, &[], 2000);
        assert!(r.contains("not responding (status 10s old)"), "{r}");
        assert!(
            r.contains("was connected to 10.0.0.5:6751 (last known state)"),
            "{r}"
        );
    }

    #[test]
    fn liveness_needs_a_live_agent_process_and_a_fresh_file() {
        let mut s = sample();
        // This test binary is not called elkeid-agent: a recycled pid.
        assert_eq!(liveness(&s, 1990), Liveness::NotRunning);
        s.pid = 0;
        assert_eq!(liveness(&s, 1990), Liveness::NotRunning);
    }

    #[test]
    fn last_errors_come_from_the_log_tail_oldest_first() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("log");
        std::fs::create_dir_all(&log).unwrap();
        std::fs::write(log.join("elkeid-agent.log.1"), "t  WARN old one\n").unwrap();
        let mut cur = String::new();
        for i in 0..3 {
            cur.push_str(&format!("t  INFO fine {i}\nt ERROR bad {i}\n"));
        }
        std::fs::write(log.join("elkeid-agent.log"), cur).unwrap();
        assert_eq!(
            last_errors(d.path()),
            [
                "t  WARN old one",
                "t ERROR bad 0",
                "t ERROR bad 1",
                "t ERROR bad 2"
            ]
        );
        assert!(last_errors(&d.path().join("none")).is_empty());
    }
}
