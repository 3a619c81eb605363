//! Logging: `tracing` to a size-capped rotating file
//! (`<work-dir>/log/elkeid-agent.log` + `.1`, together at most
//! `log_max_bytes`), to stderr when run in the foreground, and every
//! error-level event also shipped as a 1010 record (fields `level`,
//! `source`, `msg`, plus the event's other fields as strings).
//!
//! The level can be toggled between the configured one and `debug` at run
//! time (SIGUSR1).
//!
//! File and stderr writes happen on one small thread (`elkeid-log`), never
//! on the runtime thread: an event formats its line and queues it (at most
//! 1024 lines). A full queue drops the line and counts it; the writer
//! then logs how many lines were dropped before the next one. [`flush`]
//! waits (bounded) for the queue to drain before exit or re-exec.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
// 32-bit MIPS has no native 64-bit atomics: portable-atomic (lock-based there).
#[cfg(not(target_has_atomic = "64"))]
use portable_atomic::AtomicU64;
#[cfg(target_has_atomic = "64")]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use elkeid_core::payload::PayloadBuf;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};

use crate::config::LogLevel;

/// Data type of agent error logs.
pub(crate) use elkeid_core::schema::data_type::AGENT_LOG as DT_AGENT_LOG;
/// Pending 1010 records kept at most (between two send ticks).
const MAX_PENDING: usize = 256;
/// Largest 1010 payload.
const MAX_RECORD: usize = 16 * 1024;
/// Lines queued for the writer thread at most. The queue is an unbounded
/// channel (memory in small blocks, only while lines wait) bounded by the
/// `queued` count: a preallocated 1024-slot `sync_channel` kept 32 KiB
/// resident for a queue that is empty nearly always.
const LINE_QUEUE: usize = 1024;

static LEVEL: AtomicU8 = AtomicU8::new(2);
static DEBUG_TOGGLED: AtomicBool = AtomicBool::new(false);
static PENDING: Mutex<VecDeque<(i64, Vec<u8>)>> = Mutex::new(VecDeque::new());
static PENDING_DROPS: AtomicU64 = AtomicU64::new(0);
static WRITER: std::sync::OnceLock<LineLayer> = std::sync::OnceLock::new();

/// Logging setup errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log directory or file could not be created.
    #[error("cannot open log file {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A global subscriber was already installed.
    #[error("logging already initialised")]
    AlreadySet,
}

fn level_num(l: LogLevel) -> u8 {
    match l {
        LogLevel::Error => 0,
        LogLevel::Warn => 1,
        LogLevel::Info => 2,
        LogLevel::Debug => 3,
        LogLevel::Trace => 4,
    }
}

fn enabled(level: &Level) -> bool {
    let mut max = LEVEL.load(Ordering::Relaxed);
    if DEBUG_TOGGLED.load(Ordering::Relaxed) {
        max = max.max(3);
    }
    let n = match *level {
        Level::ERROR => 0,
        Level::WARN => 1,
        Level::INFO => 2,
        Level::DEBUG => 3,
        Level::TRACE => 4,
    };
    n <= max
}

/// Toggles debug logging; returns whether debug is now on.
pub(crate) fn toggle_debug() -> bool {
    !DEBUG_TOGGLED.fetch_xor(true, Ordering::Relaxed)
}

/// Size-capped rotating file: `file` and `file.1`, each at most half the cap.
#[derive(Debug)]
struct Rotating {
    path: PathBuf,
    half_cap: u64,
    state: Mutex<(Option<File>, u64)>,
}

impl Rotating {
    fn open(path: &Path, cap: u64) -> Result<Rotating, LogError> {
        let err = |source| LogError::Open {
            path: path.to_path_buf(),
            source,
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(err)?;
        }
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(err)?;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Rotating {
            path: path.to_path_buf(),
            half_cap: (cap / 2).max(1024),
            state: Mutex::new((Some(f), len)),
        })
    }

    fn write_line(&self, buf: &[u8]) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.1 + buf.len() as u64 > self.half_cap {
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            st.0 = None;
            let _ = std::fs::rename(&self.path, &old);
            st.0 = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&self.path)
                .ok();
            st.1 = 0;
        }
        if st.0.is_none() {
            // A failed reopen (rotation, full disk) must not end file logging.
            st.0 = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        // A single line larger than the cap is cut.
        let take = buf.len().min(self.half_cap as usize);
        if let Some(f) = st.0.as_mut()
            && f.write_all(&buf[..take]).is_ok()
        {
            st.1 += take as u64;
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC) for a Unix time.
fn utc_timestamp(d: std::time::Duration) -> String {
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// What the writer thread receives.
enum Msg {
    Line(Vec<u8>),
    Flush(std::sync::mpsc::SyncSender<()>),
    /// Other small file I/O of the agent ([`run_on_writer`]).
    Job(FileJob),
}

/// A small blocking file operation run on the log writer thread.
pub(crate) type FileJob = Box<dyn FnOnce() + Send>;

/// Queues one text line per enabled event for the writer thread, which
/// appends it to the capped file and, in the foreground, to stderr:
/// `<utc time> <LEVEL> <target>: <msg> k=v ...`.
#[derive(Clone)]
struct LineLayer {
    tx: std::sync::mpsc::Sender<Msg>,
    /// Lines sent and not yet taken by the writer (at most `LINE_QUEUE`).
    queued: Arc<AtomicUsize>,
    /// Lines dropped on a full queue, not yet noted in the file.
    dropped: Arc<AtomicU64>,
}

impl LineLayer {
    /// Starts the writer thread.
    fn spawn(file: Rotating, stderr: bool) -> std::io::Result<LineLayer> {
        let (tx, rx) = std::sync::mpsc::channel::<Msg>();
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = dropped.clone();
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = queued.clone();
        std::thread::Builder::new()
            .name("elkeid-log".into())
            .spawn(move || {
                for m in rx {
                    match m {
                        Msg::Line(line) => {
                            taken.fetch_sub(1, Ordering::Relaxed);
                            let dropped = counter.swap(0, Ordering::Relaxed);
                            if dropped > 0 {
                                let note = format!(
                                    "{} WARN elkeid_agent::log: {dropped} log lines dropped (log writer behind)\n",
                                    utc_timestamp(
                                        std::time::SystemTime::now()
                                            .duration_since(std::time::UNIX_EPOCH)
                                            .unwrap_or_default()
                                    )
                                );
                                file.write_line(note.as_bytes());
                            }
                            file.write_line(&line);
                            if stderr {
                                let _ = std::io::stderr().write_all(&line);
                            }
                        }
                        Msg::Flush(ack) => {
                            let _ = ack.send(());
                        }
                        Msg::Job(job) => job(),
                    }
                }
            })?;
        Ok(LineLayer {
            tx,
            queued,
            dropped,
        })
    }

    /// Waits up to `timeout` for the lines queued so far to be written.
    fn flush(&self, timeout: std::time::Duration) {
        let (ack, done) = std::sync::mpsc::sync_channel(1);
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(timeout);
        }
    }
}

/// Waits (at most 2 s) until every queued log line is written; call
/// before the process exits or execs.
pub fn flush() {
    if let Some(w) = WRITER.get() {
        w.flush(std::time::Duration::from_secs(2));
    }
}

/// Runs `job` on the log writer thread, which exists for the agent's whole
/// life: small periodic file writes (status.json every 2 s) then neither
/// block the runtime thread nor keep a blocking-pool thread (its stack and
/// a wake-up every 2 s) alive while the agent idles. Gives the job back when
/// logging is not initialised (tests, `--probe-connect`).
pub(crate) fn run_on_writer(job: FileJob) -> Result<(), FileJob> {
    let Some(w) = WRITER.get() else {
        return Err(job);
    };
    w.tx.send(Msg::Job(job)).map_err(|e| match e.0 {
        Msg::Job(job) => job,
        _ => Box::new(|| {}),
    })
}

/// Log lines dropped because the writer queue was full (not yet noted in
/// the file).
pub(crate) fn lines_dropped() -> u64 {
    WRITER
        .get()
        .map_or(0, |w| w.dropped.load(Ordering::Relaxed))
}

impl<S: Subscriber> Layer<S> for LineLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let m = event.metadata();
        if !enabled(m.level()) {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = format!(
            "{} {:>5} {}: {}",
            utc_timestamp(now),
            m.level(),
            m.target(),
            f.msg
        );
        for (k, v) in &f.rest {
            let _ = write!(line, " {k}={v}");
        }
        line.push('\n');
        if self.queued.fetch_add(1, Ordering::Relaxed) >= LINE_QUEUE {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        } else if self.tx.send(Msg::Line(line.into_bytes())).is_err() {
            // the writer is gone (its thread panicked): nothing to queue for
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Collects an event's fields as strings.
#[derive(Default)]
struct Fields {
    msg: String,
    rest: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.msg = value.to_string();
        } else if self.rest.len() < 32 {
            self.rest
                .push((field.name().to_string(), value.to_string()));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        if field.name() == "message" {
            self.msg = s;
        } else if self.rest.len() < 32 {
            self.rest.push((field.name().to_string(), s));
        }
    }
}

/// Layer turning error events into pending 1010 payloads.
struct ErrorRecords;

impl<S: Subscriber> Layer<S> for ErrorRecords {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if *event.metadata().level() != Level::ERROR {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let m = event.metadata();
        let source = match (m.file(), m.line()) {
            (Some(file), Some(line)) => format!("{file}:{line}"),
            _ => m.target().to_string(),
        };
        let mut p = PayloadBuf::with_capacity(256);
        p.field("level", "error")
            .field("source", &source)
            .field("target", m.target())
            .field("msg", &f.msg);
        for (k, v) in &f.rest {
            if !matches!(k.as_str(), "level" | "source" | "target" | "msg") {
                p.field(k, v);
            }
        }
        if p.len() > MAX_RECORD {
            p = PayloadBuf::new();
            p.field("level", "error")
                .field("source", &source)
                .field("msg", "log record too large");
        }
        let mut q = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= MAX_PENDING {
            PENDING_DROPS.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back((crate::clock::now_unix(), p.as_bytes().to_vec()));
    }
}

/// Moves pending 1010 records into the ring (called by the send loop).
pub(crate) fn drain_error_records(buffer: &crate::buffer::Buffer) {
    let items: Vec<(i64, Vec<u8>)> = {
        let mut q = PENDING.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    };
    for (ts, p) in items {
        buffer.push_agent(DT_AGENT_LOG, ts, &p);
    }
}

/// 1010 records dropped because the pending queue was full.
pub(crate) fn pending_drops() -> u64 {
    PENDING_DROPS.load(Ordering::Relaxed)
}

/// Installs the global subscriber.
pub fn init(
    work_dir: &Path,
    level: LogLevel,
    max_bytes: u64,
    foreground: bool,
) -> Result<(), LogError> {
    LEVEL.store(level_num(level), Ordering::Relaxed);
    let path = work_dir.join("log").join("elkeid-agent.log");
    let rot = Rotating::open(&path, max_bytes)?;
    let lines = LineLayer::spawn(rot, foreground).map_err(|source| LogError::Open {
        path: path.clone(),
        source,
    })?;
    let _ = WRITER.set(lines.clone());
    let sub = tracing_subscriber::registry()
        .with(lines)
        .with(ErrorRecords);
    tracing::subscriber::set_global_default(sub).map_err(|_| LogError::AlreadySet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps() {
        use std::time::Duration;
        assert_eq!(
            utc_timestamp(Duration::from_secs(0)),
            "1970-01-01T00:00:00.000000Z"
        );
        // date -u -d @1700000000.123456
        assert_eq!(
            utc_timestamp(Duration::from_micros(1_700_000_000_123_456)),
            "2023-11-14T22:13:20.123456Z"
        );
        // 2024-02-29 (leap day) 12:00:00 UTC
        assert_eq!(
            utc_timestamp(Duration::from_secs(1_709_208_000)),
            "2024-02-29T12:00:00.000000Z"
        );
    }

    #[test]
    fn lines_go_to_the_capped_file() {
        let d = tempfile::tempdir().unwrap();
        let rot = Rotating::open(&d.path().join("a.log"), 1 << 20).unwrap();
        let layer = LineLayer::spawn(rot, false).unwrap();
        let sub = tracing_subscriber::registry().with(layer.clone());
        tracing::subscriber::with_default(sub, || {
            tracing::info!(peer = "x", n = 3, "hello");
            tracing::trace!("hidden");
        });
        // Written by the writer thread: visible after a flush.
        layer.flush(std::time::Duration::from_secs(10));
        let text = std::fs::read_to_string(d.path().join("a.log")).unwrap();
        assert!(
            text.ends_with(" INFO elkeid_agent::log::tests: hello peer=x n=3\n"),
            "{text:?}"
        );
        assert!(!text.contains("hidden"));
    }

    /// The log file is a FIFO nobody reads: file writes block. Logging
    /// still returns at once (the caller never waits on disk I/O), lines
    /// beyond the queue are dropped and counted, and the count is written
    /// to the file once it drains.
    #[test]
    fn a_blocked_log_file_never_blocks_the_caller_and_drops_are_counted() {
        use std::io::Read;
        use std::sync::mpsc::channel;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fifo.log");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (go_tx, go_rx) = channel::<()>();
        let p2 = p.clone();
        let reader = std::thread::spawn(move || {
            let mut f = File::open(&p2).unwrap();
            go_rx.recv().unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            s
        });
        let layer = LineLayer::spawn(Rotating::open(&p, 1 << 30).unwrap(), false).unwrap();
        let (done_tx, done_rx) = channel();
        let l2 = layer.clone();
        std::thread::spawn(move || {
            let sub = tracing_subscriber::registry().with(l2);
            tracing::subscriber::with_default(sub, || {
                for i in 0..5000 {
                    tracing::info!(i, "a line that fills the pipe buffer soon enough ......");
                }
            });
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("logging blocked behind the file");
        let dropped = layer.dropped.load(Ordering::Relaxed);
        assert!(dropped > 0, "nothing dropped");
        go_tx.send(()).unwrap();
        layer.flush(std::time::Duration::from_secs(30));
        let sub = tracing_subscriber::registry().with(layer.clone());
        tracing::subscriber::with_default(sub, || tracing::info!("after the drain"));
        layer.flush(std::time::Duration::from_secs(30));
        drop(layer); // the writer thread ends and closes the FIFO
        let text = reader.join().unwrap();
        assert!(
            text.contains(&format!("{dropped} log lines dropped")),
            "{dropped} not noted"
        );
        assert!(text.ends_with("after the drain\n"));
    }

    #[test]
    fn rotation_caps_total_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("log/a.log");
        let r = Rotating::open(&p, 4096).unwrap();
        let line = [b'x'; 100];
        for _ in 0..1000 {
            r.write_line(&line);
        }
        let a = std::fs::metadata(&p).unwrap().len();
        let b = std::fs::metadata(d.path().join("log/a.log.1"))
            .unwrap()
            .len();
        assert!(a + b <= 4096, "{a} + {b}");
        assert!(b > 0);
    }

    #[test]
    fn logging_resumes_after_a_failed_reopen() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("log");
        let p = dir.join("a.log");
        let r = Rotating::open(&p, 4096).unwrap();
        r.write_line(&[b'x'; 100]);
        // Rotation while the directory is gone: the reopen fails.
        std::fs::remove_dir_all(&dir).unwrap();
        r.write_line(&[b'y'; 2000]);
        std::fs::create_dir_all(&dir).unwrap();
        r.write_line(b"back\n");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "back\n");
    }

    #[test]
    fn error_events_become_1010_payloads() {
        let sub = tracing_subscriber::registry().with(ErrorRecords);
        tracing::subscriber::with_default(sub, || {
            tracing::info!("not shipped");
            tracing::error!(plugin = "p1", code = 3, "boom");
        });
        let q: Vec<_> = PENDING.lock().unwrap().drain(..).collect();
        let mine: Vec<_> = q
            .iter()
            .filter(|(_, p)| {
                elkeid_core::payload::entries(p)
                    .any(|e| matches!(e, Ok((k, v)) if k == b"msg" && v == b"boom"))
            })
            .collect();
        assert_eq!(mine.len(), 1);
        let fields: Vec<(Vec<u8>, Vec<u8>)> = elkeid_core::payload::entries(&mine[0].1)
            .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).unwrap())
            .collect();
        let get = |k: &str| {
            fields
                .iter()
                .find(|(fk, _)| fk == k.as_bytes())
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
        };
        assert_eq!(get("level").as_deref(), Some("error"));
        assert_eq!(get("plugin").as_deref(), Some("p1"));
        assert_eq!(get("code").as_deref(), Some("3"));
        assert!(get("source").unwrap().contains("log.rs:"));
    }
}
