//! `elkeid-example-plugin`: a minimal Elkeid plugin, and a template for
//! writing your own in Rust without Elkeid's SDK.
//!
//! # The pipe protocol (what the agent gives a plugin)
//! - The agent starts `<work-dir>/plugin/<name>/<name>` with no arguments,
//!   cwd = that directory, in its own process group.
//! - fd 0 and fd 1 are `/dev/null`; fd 2 is captured into `<name>.stderr`
//!   (size-capped), so `eprintln!` is your local log.
//! - **fd 3: tasks in.** Frames of `u32 little-endian length` + a protobuf
//!   `Task {1: data_type int32, 2: object_name string, 3: data string,
//!   4: token string}`. EOF on fd 3 means "the agent wants you to stop":
//!   exit promptly (after 10 s the agent SIGKILLs your process group).
//! - **fd 4: records out.** Frames of `u32 LE length` + a protobuf
//!   `Record {1: data_type int32, 2: timestamp int64, 3: Payload {1: map
//!   <string,string> fields}}`. For compatibility with Elkeid's Go agent keep
//!   data_type and timestamp non-zero and the payload non-empty, fields in
//!   order 1, 2, 3.
//! - **fd 5: high-priority records out** (only if the environment has
//!   `ELKEID_PLUGIN_HIGH_PRIORITY_PIPE`; the Go agent does not provide it).
//!   Same framing; read before fd 4 when both have data.
//! - Environment: if the config's `detail` is non-empty, the environment is
//!   exactly `DETAIL=<detail>` (+ the fd 5 flag); otherwise the agent's.
//! - Frames larger than the agent's limit (4 MiB by default) or malformed
//!   ones get the plugin killed and restarted; a plugin that exits is
//!   restarted with backoff (1 s doubling to 5 min).
//!
//! # What this plugin does
//! - every `interval` ms (DETAIL `interval=<ms>`, default 1000) a record of
//!   data_type 8000 with `seq`, `pid`, `kind=tick`;
//! - for each task, a record of data_type 6000 echoing it: `token`,
//!   `task_data_type`, `data`, `status=succeed`, `plugin` — except task data
//!   `crash` (exit code 3 immediately) and `hostile` (write a frame that
//!   declares 4 GiB, then wait);
//! - exits 0 at EOF on fd 3.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elkeid_core::frame::decode_task;
use elkeid_core::payload::PayloadBuf;
use elkeid_core::pb::Writer;
use elkeid_core::schema::data_type::COLLECTOR_RESULT;

/// Largest task this plugin accepts (the Go SDK's limit).
const MAX_TASK: usize = 1024 * 1024;

/// Shared record writer on fd 4 (or fd 5). Writes one whole frame under
/// the lock, then flushes (simple; batch + flush on a timer for speed).
type Out = Arc<Mutex<BufWriter<File>>>;

/// Takes ownership of an inherited descriptor.
fn inherited(fd: i32) -> File {
    // SAFETY: the agent opened fds 3, 4 (and 5) for us before exec; nothing
    // else in this process owns them, and each is taken exactly once.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes one record frame: u32 LE length, then Record {1, 2, 3}.
fn send(out: &Out, data_type: i32, fields: &[(&str, &str)]) -> io::Result<()> {
    let mut payload = PayloadBuf::new();
    for (k, v) in fields {
        payload.field(k, v);
    }
    let payload = payload.into_vec();
    let mut body = vec![0u8; 32 + payload.len()];
    let mut w = Writer::new(&mut body);
    let encoded = (|| {
        w.varint_field(1, i64::from(data_type) as u64)?;
        w.varint_field(2, unix_now() as u64)?;
        w.len_field(3, &payload)?;
        Ok::<usize, elkeid_core::pb::EncodeError>(w.position())
    })();
    let n = encoded.map_err(|_| io::Error::other("record encoding overflow"))?;
    let mut guard = out
        .lock()
        .map_err(|_| io::Error::other("writer lock poisoned"))?;
    guard.write_all(&(n as u32).to_le_bytes())?;
    guard.write_all(&body[..n])?;
    guard.flush()
}

/// `key=value` pairs of DETAIL, comma-separated.
fn detail(key: &str) -> Option<String> {
    let d = std::env::var("DETAIL").ok()?;
    d.split(',').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    })
}

fn main() {
    let name = std::env::current_dir()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "elkeid-example-plugin".into());
    let out: Out = Arc::new(Mutex::new(BufWriter::with_capacity(
        64 * 1024,
        inherited(4),
    )));
    let high: Option<Out> = std::env::var_os("ELKEID_PLUGIN_HIGH_PRIORITY_PIPE")
        .filter(|v| !v.is_empty())
        .map(|_| Arc::new(Mutex::new(BufWriter::new(inherited(5)))));
    let interval = detail("interval")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000u64);
    eprintln!(
        "{name}: started, pid {}, interval {interval} ms, fd 5 {}",
        std::process::id(),
        high.is_some()
    );

    // Periodic records on their own thread.
    let ticker = out.clone();
    std::thread::spawn(move || {
        let pid = std::process::id().to_string();
        for seq in 1u64.. {
            std::thread::sleep(Duration::from_millis(interval));
            if send(
                &ticker,
                8000,
                &[("kind", "tick"), ("seq", &seq.to_string()), ("pid", &pid)],
            )
            .is_err()
            {
                return; // the agent closed fd 4
            }
        }
    });

    // Tasks on the main thread: u32 LE length, then the Task bytes.
    let mut tasks = inherited(3);
    let mut len = [0u8; 4];
    loop {
        if tasks.read_exact(&mut len).is_err() {
            eprintln!("{name}: fd 3 closed, exiting");
            std::process::exit(0);
        }
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_TASK {
            eprintln!("{name}: task of {n} bytes is too large, exiting");
            std::process::exit(2);
        }
        let mut body = vec![0u8; n];
        if tasks.read_exact(&mut body).is_err() {
            std::process::exit(0);
        }
        let task = match decode_task(&body) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{name}: bad task: {e}");
                continue;
            }
        };
        match task.data {
            "crash" => {
                eprintln!("{name}: crashing on request");
                std::process::exit(3);
            }
            "hostile" => {
                eprintln!("{name}: writing a frame that declares 4 GiB");
                if let Ok(mut g) = out.lock() {
                    let _ = g.write_all(&u32::MAX.to_le_bytes());
                    let _ = g.write_all(b"garbage");
                    let _ = g.flush();
                }
                continue;
            }
            _ => {}
        }
        let dt = task.data_type.to_string();
        let fields = [
            ("token", task.token),
            ("task_data_type", dt.as_str()),
            ("data", task.data),
            ("status", "succeed"),
            ("plugin", name.as_str()),
        ];
        // Task results are what an operator waits for: use fd 5 if present.
        let r = send(high.as_ref().unwrap_or(&out), COLLECTOR_RESULT, &fields);
        if r.is_err() {
            std::process::exit(0);
        }
    }
}

/// Seconds since the Unix epoch (1 if the clock is before it).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
