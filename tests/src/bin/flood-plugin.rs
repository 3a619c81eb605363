//! `flood-plugin`: throughput and robustness load for the agent.
//!
//! Configured through `DETAIL` (comma-separated `key=value`, because a
//! non-empty detail is the plugin's whole environment):
//! - `count=N` (default 1 000 000): records of data_type 7000 with one
//!   field `s` = sequence number zero-padded so the frame body is `size`
//!   bytes (default 200, at least about 30), written as fast as the pipe takes them in 256 KiB
//!   batches; then one marker record data_type 7001 `{done: N}`.
//! - `rate=R`: at most R records/s (paced in 10 ms steps) instead of as
//!   fast as the pipe takes them; `delay=S`: wait S seconds before the
//!   first record; `report=PATH`: write `PATH` (JSON) at start
//!   (`{"state":"waiting"}`) and after the last record: `records`, `secs`
//!   (first to last write), `rate` (achieved records/s) and `write_secs`
//!   (time spent inside pipe writes, i.e. blocked by the agent).
//! - `hostile=1`: instead, write one frame declaring a 4 GiB body.
//! - `crash=1`: instead, write one marker record (data_type 7002) and exit 1.
//!
//! After flooding it waits for EOF on fd 3 (the agent's stop) and exits 0.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};

fn inherited(fd: i32) -> File {
    // SAFETY: fds 3 and 4 were opened for this process by the agent and are
    // owned by nothing else here; each is taken once.
    File::from(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn detail(key: &str) -> Option<String> {
    let d = std::env::var("DETAIL").ok()?;
    d.split(',').find_map(|kv| {
        kv.split_once('=')
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    })
}

/// Appends one frame: u32 LE length + Record {1: dt, 2: ts, 3: Payload {1: {1: key, 2: value}}}.
fn push_frame(out: &mut Vec<u8>, data_type: u32, ts: u32, key: &str, value: &str) {
    fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    let mut entry = Vec::with_capacity(8 + key.len() + value.len());
    entry.push(0x0a);
    varint(&mut entry, key.len() as u64);
    entry.extend_from_slice(key.as_bytes());
    entry.push(0x12);
    varint(&mut entry, value.len() as u64);
    entry.extend_from_slice(value.as_bytes());
    let mut payload = Vec::with_capacity(entry.len() + 4);
    payload.push(0x0a);
    varint(&mut payload, entry.len() as u64);
    payload.extend_from_slice(&entry);
    let mut body = Vec::with_capacity(payload.len() + 16);
    body.push(0x08);
    varint(&mut body, u64::from(data_type));
    body.push(0x10);
    varint(&mut body, u64::from(ts));
    body.push(0x1a);
    varint(&mut body, payload.len() as u64);
    body.extend_from_slice(&payload);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
}

fn main() {
    let mut out = inherited(4);
    let ts = u32::try_from(elkeid_tests::unix_now()).unwrap_or(u32::MAX);
    if detail("hostile").is_some() {
        let _ = out.write_all(&u32::MAX.to_le_bytes());
        let _ = out.write_all(b"\x08\x01");
    } else if detail("crash").is_some() {
        let mut buf = Vec::new();
        push_frame(&mut buf, 7002, ts, "crash", "1");
        let _ = out.write_all(&buf);
        std::process::exit(1);
    } else {
        let count: u64 = detail("count")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let size: usize = detail("size").and_then(|v| v.parse().ok()).unwrap_or(200);
        // Pick the value width that makes the frame body exactly `size`
        // bytes (as far as varint length steps allow).
        let mut width = size.saturating_sub(21).max(1);
        for _ in 0..8 {
            let mut probe = Vec::new();
            push_frame(&mut probe, 7000, ts, "s", &"0".repeat(width));
            let body = probe.len() - 4;
            if body == size {
                break;
            }
            width = if body > size {
                width.saturating_sub(body - size).max(1)
            } else {
                width + (size - body)
            };
        }
        let rate: Option<u64> = detail("rate")
            .and_then(|v| v.parse().ok())
            .filter(|r| *r > 0);
        let report = detail("report");
        if let Some(path) = &report {
            let _ = std::fs::write(path, "{\"state\":\"waiting\"}");
        }
        if let Some(secs) = detail("delay").and_then(|v| v.parse::<f64>().ok()) {
            std::thread::sleep(std::time::Duration::from_secs_f64(secs));
        }
        // records per write: 10 ms worth when paced
        let step = rate.map_or(u64::MAX, |r| (r / 100).max(1));
        let started = std::time::Instant::now();
        let mut blocked = std::time::Duration::ZERO;
        let mut write = |buf: &[u8]| {
            let t = std::time::Instant::now();
            if out.write_all(buf).is_err() {
                std::process::exit(0);
            }
            blocked += t.elapsed();
        };
        let mut buf = Vec::with_capacity(300 * 1024);
        let mut in_buf = 0u64;
        for seq in 0..count {
            push_frame(&mut buf, 7000, ts, "s", &format!("{seq:0width$}"));
            in_buf += 1;
            if buf.len() >= 256 * 1024 || in_buf >= step {
                if let Some(r) = rate {
                    // the records written so far are due by now
                    let due =
                        std::time::Duration::from_secs_f64((seq + 1 - in_buf) as f64 / r as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
                write(&buf);
                buf.clear();
                in_buf = 0;
            }
        }
        push_frame(&mut buf, 7001, ts, "done", &count.to_string());
        write(&buf);
        let secs = started.elapsed().as_secs_f64();
        if let Some(path) = &report {
            let _ = std::fs::write(
                path,
                format!(
                    "{{\"state\":\"done\",\"records\":{count},\"secs\":{secs},\"rate\":{},\"write_secs\":{}}}",
                    count as f64 / secs.max(1e-9),
                    blocked.as_secs_f64()
                ),
            );
        }
    }
    // Wait for the agent to close fd 3.
    let mut tasks = inherited(3);
    let mut sink = [0u8; 4096];
    while matches!(tasks.read(&mut sink), Ok(n) if n > 0) {}
}
