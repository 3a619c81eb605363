//! The embedded default sink: one JSON object per record per line, in
//! size-rotated files `records-<unix seconds>-<seq>.ndjson` under the sink
//! directory.
//!
//! # Line format (a public interface: keep it stable)
//! ```json
//! {"data_type":1000,"agent_time":1700000000,"svr_time":1700000001,
//!  "agent_id":"…","hostname":"…","version":"…","product":"…",
//!  "intranet_ipv4":["…"],"extranet_ipv4":[],"intranet_ipv6":[],"extranet_ipv6":[],
//!  "tag":"","agent_epoch":…,"agent_seq":…,"record_idx":…,"packet_records":…,"fields":{"key":"value",…}}
//! ```
//! Keys in this order; `fields` holds the decoded `Payload` (keys sorted, the
//! last duplicate wins). A body that is not a valid `Payload` (bad protobuf or
//! non-UTF-8 strings) is written base64 (standard alphabet, padded) under
//! `body` instead of `fields`. `agent_epoch`, `agent_seq` (the packet's
//! identity), `record_idx` (the record's index in the packet) and
//! `packet_records` (records in the packet) are present
//! only for agents that send packet identities (elkeid-rs agents): together
//! with `agent_id` they identify a record, so consumers can de-duplicate.
//!
//! # Durability: group commit
//! The writer thread takes every batch queued, writes their lines, then
//! `fdatasync`s the file once for the whole group; only then are the
//! batches released (their acknowledgement tickets fire). Under load a group
//! holds many packets (one sync for all of them); a group stops growing at
//! [`GROUP_MAX_BYTES`] or [`GROUP_MAX_TIME`], which bounds the latency. A
//! crash of the process or the machine loses nothing that was acknowledged.
//! A failed write fails every batch of the group (their lines may have been
//! in the lost buffer): none of them is acknowledged, the agents re-send.
//! Lines are encoded straight into the writer's 1 MiB buffer (`line.rs`).
//! A file is rotated before a line would take it past `rotate_bytes` (a
//! single longer line gets a file of its own); rotation fsyncs the old file.
//!
//! # Retention
//! `sinks.ndjson.retain_bytes` / `retain_secs` (unset: keep everything):
//! see `retention.rs`; applied at each rotation.
//!
//! # Back-pressure
//! Batches queue in a bounded channel (`QUEUE` batches) to one writer
//! thread; when it is full `send` waits, which slows the agent streams.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::ack::{AckMetrics, PacketId};

use elkeid_proto::grpc::EncodedRecord;
use tokio::sync::{mpsc, oneshot};

use super::{PacketBatch, Sink, SinkError, SinkFuture};
mod config;

pub(crate) use config::{KEY_ARGS, NdjsonFile};
pub use config::{NdjsonArgs, NdjsonConfig};

pub(crate) mod line;
mod retention;
pub(crate) use retention::Retention;

/// Batches queued to the writer thread before `send` waits.
const QUEUE: usize = 256;
/// User-space write buffer.
const BUF: usize = 1024 * 1024;
/// A group commit stops taking batches after writing this many bytes...
pub(crate) const GROUP_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// ... or after this long.
pub(crate) const GROUP_MAX_TIME: Duration = Duration::from_millis(50);

enum Msg {
    Batch(Arc<PacketBatch>),
    Flush(oneshot::Sender<Result<(), std::io::Error>>),
}

/// Handle to the NDJSON writer thread.
#[derive(Debug)]
pub(crate) struct NdjsonSink {
    tx: mpsc::Sender<Msg>,
    queued: Arc<AtomicUsize>,
    stats: Arc<Stats>,
}

/// Counters shared with the writer thread.
#[derive(Debug, Default)]
struct Stats {
    /// Lines handed to the file.
    written: AtomicU64,
    /// Records lost to a failed write (the batch's remaining records).
    failed: AtomicU64,
    /// Files removed by retention.
    removed: Arc<AtomicU64>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Batch(_) => "Batch",
            Msg::Flush(_) => "Flush",
        })
    }
}

fn io_err(source: std::io::Error) -> SinkError {
    SinkError::Io {
        sink: "ndjson",
        source,
    }
}

impl NdjsonSink {
    /// Creates the directory and starts the writer thread.
    #[cfg(test)]
    pub(crate) fn start(cfg: &NdjsonConfig) -> Result<NdjsonSink, SinkError> {
        Self::start_with(cfg, Arc::new(AckMetrics::default()))
    }

    /// [`NdjsonSink::start`] recording sync latency in `metrics`.
    pub(crate) fn start_with(
        cfg: &NdjsonConfig,
        metrics: Arc<AckMetrics>,
    ) -> Result<NdjsonSink, SinkError> {
        std::fs::create_dir_all(&cfg.dir).map_err(io_err)?;
        let (tx, rx) = mpsc::channel::<Msg>(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let mut writer = Writer::new(cfg.dir.clone(), cfg.rotate_bytes);
        writer.retention = cfg.retention;
        let q = queued.clone();
        let stats = Arc::new(Stats::default());
        writer.removed = stats.removed.clone();
        let st = stats.clone();
        std::thread::Builder::new()
            .name("ndjson-sink".into())
            .spawn(move || writer_thread(writer, rx, &q, &st, &metrics))
            .map_err(io_err)?;
        Ok(NdjsonSink { tx, queued, stats })
    }
}

/// The writer loop: group commits (see the module docs).
fn writer_thread(
    mut writer: Writer,
    mut rx: mpsc::Receiver<Msg>,
    queued: &AtomicUsize,
    st: &Stats,
    metrics: &AckMetrics,
) {
    let mut group: Vec<Arc<PacketBatch>> = Vec::new();
    let mut flushes: Vec<oneshot::Sender<Result<(), std::io::Error>>> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let started = Instant::now();
        let start_bytes = writer.total;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Batch(b) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    let (written, result) = writer.write_batch(&b);
                    st.written.fetch_add(written as u64, Ordering::Relaxed);
                    if let Err(error) = result {
                        let lost = b.records.len().saturating_sub(written);
                        st.failed.fetch_add(lost as u64, Ordering::Relaxed);
                        tracing::error!(%error, lost, "ndjson sink: write failed");
                        // Lines of the group's earlier batches may have been
                        // in the lost buffer too: none of them is durable.
                        for b in group.iter().chain(std::iter::once(&b)) {
                            if let Some(t) = &b.ticket {
                                t.fail();
                            }
                        }
                        // start a fresh file at the next batch
                        writer.reset();
                    }
                    group.push(b);
                }
                Msg::Flush(done) => flushes.push(done),
            }
            if writer.total - start_bytes >= GROUP_MAX_BYTES || started.elapsed() >= GROUP_MAX_TIME
            {
                break;
            }
            next = rx.try_recv().ok();
        }
        let t = Instant::now();
        let synced = writer.flush(true);
        metrics.ndjson_synced(t.elapsed());
        if let Err(error) = &synced {
            tracing::error!(%error, "ndjson sink: group commit failed");
            for b in &group {
                if let Some(t) = &b.ticket {
                    t.fail();
                }
            }
            writer.reset();
        }
        // Releasing the batches fires their tickets: durable (or failed).
        group.clear();
        for done in flushes.drain(..) {
            let _ = done.send(match &synced {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
    if let Err(error) = writer.flush(true) {
        tracing::error!(%error, "ndjson sink: final flush failed");
    }
}

impl Sink for NdjsonSink {
    fn name(&self) -> &'static str {
        "ndjson"
    }

    fn send<'a>(&'a self, batch: &'a Arc<PacketBatch>) -> SinkFuture<'a> {
        Box::pin(async move {
            self.queued.fetch_add(1, Ordering::Relaxed);
            if self.tx.send(Msg::Batch(batch.clone())).await.is_err() {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                return Err(SinkError::Closed("ndjson"));
            }
            Ok(())
        })
    }

    fn flush(&self) -> SinkFuture<'_> {
        Box::pin(async move {
            let (done, wait) = oneshot::channel();
            self.tx
                .send(Msg::Flush(done))
                .await
                .map_err(|_| SinkError::Closed("ndjson"))?;
            wait.await
                .map_err(|_| SinkError::Closed("ndjson"))?
                .map_err(io_err)
        })
    }

    fn lag(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("written", self.stats.written.load(Ordering::Relaxed)),
            ("failed", self.stats.failed.load(Ordering::Relaxed)),
            (
                "retention_removed_files",
                self.stats.removed.load(Ordering::Relaxed),
            ),
        ]
    }
}

struct Writer {
    dir: PathBuf,
    rotate_bytes: u64,
    retention: Retention,
    /// Files removed by retention.
    removed: Arc<AtomicU64>,
    file: Option<(std::fs::File, PathBuf)>,
    /// Lines not yet written to `file`: encoded straight into this buffer,
    /// written out when it holds [`BUF`] bytes and at each group commit.
    buf: Vec<u8>,
    /// Bytes in the current file, `buf` included.
    written: u64,
    /// Bytes written since start (all files).
    total: u64,
    seq: u64,
    /// The per-packet parts of the current batch's lines.
    packet: line::PacketJson,
}

impl Writer {
    fn new(dir: PathBuf, rotate_bytes: u64) -> Self {
        Writer {
            dir,
            rotate_bytes,
            retention: Retention::default(),
            removed: Arc::default(),
            file: None,
            buf: Vec::with_capacity(BUF + 64 * 1024),
            written: 0,
            total: 0,
            seq: 0,
            packet: line::PacketJson::default(),
        }
    }

    fn open(&mut self) -> std::io::Result<()> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        loop {
            self.seq += 1;
            let path = self
                .dir
                .join(format!("records-{now}-{:06}.ndjson", self.seq));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(f) => {
                    tracing::debug!(path = %path.display(), "ndjson sink: new file");
                    // the new file's directory entry is durable before any
                    // of its records is acknowledged
                    std::fs::File::open(&self.dir)?.sync_all()?;
                    let n = retention::enforce(
                        &self.dir,
                        self.retention,
                        Some(&path),
                        std::time::SystemTime::now(),
                    );
                    self.removed.fetch_add(n as u64, Ordering::Relaxed);
                    self.file = Some((f, path));
                    self.written = 0;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes the first `n` buffered bytes to the file.
    fn write_out(&mut self, n: usize) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        if let Some((f, _)) = self.file.as_mut() {
            f.write_all(&self.buf[..n])?;
        }
        self.buf.drain(..n);
        Ok(())
    }

    /// Drops the file and what was buffered for it (after an error: the
    /// next line starts a fresh file).
    fn reset(&mut self) {
        self.file = None;
        self.buf.clear();
    }

    /// Writes a batch's lines; returns how many were written and the first error.
    fn write_batch(&mut self, batch: &PacketBatch) -> (usize, std::io::Result<()>) {
        self.packet.set(batch);
        let mut n = 0;
        for (idx, rec) in batch.records.iter().enumerate() {
            if let Err(e) = self.write_record(idx, rec) {
                return (n, Err(e));
            }
            n += 1;
        }
        (n, Ok(()))
    }

    fn write_record(&mut self, idx: usize, rec: &EncodedRecord) -> std::io::Result<()> {
        let start = self.buf.len();
        self.packet.write(&mut self.buf, idx, rec);
        let len = (self.buf.len() - start) as u64;
        if self.file.is_some() && self.written > 0 && self.written + len > self.rotate_bytes {
            // the lines before this one go to the old file
            self.write_out(start)?;
            if let Some((f, _)) = self.file.take() {
                f.sync_all()?;
            }
        }
        if self.file.is_none() {
            self.open()?;
        }
        self.written += len;
        self.total += len;
        if self.buf.len() >= BUF {
            self.write_out(self.buf.len())?;
        }
        Ok(())
    }

    /// Writes the buffer out and, with `sync`, `fdatasync`s the file
    /// (a new file was already made durable in the directory by `open`).
    fn flush(&mut self, sync: bool) -> std::io::Result<()> {
        self.write_out(self.buf.len())?;
        if sync && let Some((f, _)) = self.file.as_mut() {
            f.sync_data()?;
        }
        Ok(())
    }
}

/// Files scanned by [`recover_ids`]: the journal of acknowledged points lags
/// the data by at most one group commit, which lies in the newest file or,
/// across a rotation, the one before.
const RECOVER_FILES: usize = 2;

#[derive(serde::Deserialize)]
struct IdLine<'a> {
    #[serde(borrow)]
    agent_id: std::borrow::Cow<'a, str>,
    agent_epoch: Option<u64>,
    agent_seq: Option<u64>,
    packet_records: Option<usize>,
}

/// One complete line of the recovery scan.
struct Scanned {
    file: usize,
    offset: u64,
    key: Option<(String, u64, u64, usize)>,
}

/// Recovery after a crash, before the sink starts: in the newest NDJSON
/// files of `dir`, a torn last line (crash mid-write) is cut off, and so is
/// the last packet when not all its `packet_records` lines made it (never
/// acknowledged: the agent re-sends it whole, so keeping the part would
/// duplicate it). Returns the identities (agent, epoch, highest seq) of
/// the complete packets there: what the center made durable just before the
/// crash, possibly after the last journal line.
pub(crate) fn recover_ids(dir: &Path) -> Vec<(String, PacketId)> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("records-") && n.ends_with(".ndjson"))
        })
        .collect();
    files.sort();
    let files: Vec<PathBuf> = files.split_off(files.len().saturating_sub(RECOVER_FILES));
    let mut lines: Vec<Scanned> = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        let Ok(data) = std::fs::read(f) else {
            continue;
        };
        let mut offset = 0usize;
        while offset < data.len() {
            let Some(end) = data[offset..].iter().position(|b| *b == b'\n') else {
                // torn last line: cut off
                tracing::warn!(file = %f.display(), offset, "ndjson: torn last line removed");
                truncate(f, offset as u64);
                break;
            };
            let line = &data[offset..offset + end];
            let key = serde_json::from_slice::<IdLine<'_>>(line)
                .ok()
                .and_then(|l| {
                    Some((
                        l.agent_id.into_owned(),
                        l.agent_epoch?,
                        l.agent_seq?,
                        l.packet_records?,
                    ))
                });
            lines.push(Scanned {
                file: fi,
                offset: offset as u64,
                key,
            });
            offset += end + 1;
        }
    }
    // Packets are written whole, one after another: only the last one can
    // be incomplete.
    if let Some(Some(last)) = lines.last().map(|l| l.key.clone()) {
        let same = |l: &Scanned| {
            l.key
                .as_ref()
                .is_some_and(|k| (&k.0, k.1, k.2) == (&last.0, last.1, last.2))
        };
        let n = lines.iter().rev().take_while(|l| same(l)).count();
        if n < last.3 {
            let first = &lines[lines.len() - n];
            let (fi, off) = (first.file, first.offset);
            tracing::warn!(agent_id = %last.0, epoch = last.1, seq = last.2, lines = n, of = last.3, "ndjson: incomplete last packet removed (the agent re-sends it)");
            truncate(&files[fi], off);
            for later in files.iter().skip(fi + 1) {
                truncate(later, 0);
            }
            lines.truncate(lines.len() - n);
        }
    }
    let mut best: std::collections::HashMap<(String, u64), u64> = Default::default();
    for (agent, epoch, seq, _) in lines.into_iter().filter_map(|l| l.key) {
        let e = best.entry((agent, epoch)).or_default();
        *e = (*e).max(seq);
    }
    best.into_iter()
        .map(|((agent, epoch), seq)| (agent, PacketId { epoch, seq }))
        .collect()
}

fn truncate(path: &Path, len: u64) {
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()));
    if let Err(error) = r {
        tracing::error!(file = %path.display(), %error, "ndjson: recovery truncate failed");
    }
}

/// Appends one record's line (with the trailing `\n`) to `out`.
#[cfg(test)]
pub(crate) fn write_line(out: &mut Vec<u8>, batch: &PacketBatch, idx: usize, rec: &EncodedRecord) {
    line::PacketJson::new(batch).write(out, idx, rec);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("ndjson"))
            .collect();
        v.sort();
        v
    }

    fn batch() -> PacketBatch {
        PacketBatch {
            svr_time: 1_700_000_001,
            agent_id: "a1".into(),
            intranet_ipv4: vec!["10.0.0.2".into()],
            hostname: "h".into(),
            version: "1.9.1".into(),
            product: "elkeid-agent".into(),
            ..Default::default()
        }
    }

    #[test]
    fn golden_line() {
        // Payload {"b": "2", "a": "1"} written by hand from the spec's wire rules.
        let data = vec![
            0x0a, 0x06, 0x0a, 0x01, b'b', 0x12, 0x01, b'2', 0x0a, 0x06, 0x0a, 0x01, b'a', 0x12,
            0x01, b'1',
        ];
        let rec = EncodedRecord {
            data_type: 1000,
            timestamp: 1_700_000_000,
            data: data.into(),
        };
        let mut out = Vec::new();
        write_line(&mut out, &batch(), 0, &rec);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"data_type\":1000,\"agent_time\":1700000000,\"svr_time\":1700000001,\"agent_id\":\"a1\",\
\"hostname\":\"h\",\"version\":\"1.9.1\",\"product\":\"elkeid-agent\",\"intranet_ipv4\":[\"10.0.0.2\"],\
\"extranet_ipv4\":[],\"intranet_ipv6\":[],\"extranet_ipv6\":[],\"tag\":\"\",\"fields\":{\"a\":\"1\",\"b\":\"2\"}}\n"
        );
    }

    /// The line as `serde_json` writes it from a struct and a map: the
    /// reference the direct encoder must match byte for byte.
    fn reference_line(batch: &PacketBatch, idx: usize, rec: &EncodedRecord) -> Vec<u8> {
        let mut out = Vec::new();
        crate::bench::serde_line(&mut out, batch, idx, rec);
        out
    }

    #[test]
    fn direct_encoder_matches_serde_json() {
        // Every byte that JSON may escape, in keys, values and metadata.
        let all: String = (0u8..0x80).map(char::from).collect();
        let texts = [
            "",
            "plain",
            "exactly8",
            "sixteen-bytes-xx",
            "tab\there",
            "quote\"back\\slash",
            "é日本\u{1f600}\u{7f}",
            all.as_str(),
            &all[5..],
        ];
        let payloads: Vec<Vec<u8>> = vec![
            Vec::new(),
            crate::test_payload(&[("s", &"0".repeat(180))]),
            crate::test_payload(&[("a", "1"), ("b", "2"), ("c", texts[5])]),
            // unsorted, with duplicates: sorted, the last duplicate wins
            crate::test_payload(&[("b", "2"), ("a", "1"), ("b", "3"), ("a", "0")]),
            crate::test_payload(&[("a", "1"), ("a", "2")]),
            crate::test_payload(&[(texts[7], texts[6]), (texts[4], texts[7]), ("", "")]),
            // more entries than the stack array: unsorted, duplicates
            {
                let keys: Vec<String> = (0..40).map(|i| format!("k{}", (i * 7) % 23)).collect();
                let pairs: Vec<(&str, &str)> =
                    keys.iter().map(|k| (k.as_str(), texts[4])).collect();
                let mut v = crate::test_payload(&pairs);
                v.extend_from_slice(&crate::test_payload(&[("k3", "last")]));
                v
            },
            {
                let mut v = crate::test_payload(&[("x", "1"); 20]);
                v.extend_from_slice(&[0x0a, 0x03, 0x12, 0x01, 0xff]);
                v
            },
            // not a UTF-8 Payload: base64 body
            vec![0x0a, 0x03, 0x0a, 0x01, 0xff],
            vec![0x0a, 0x07, 0x0a],
            // the second entry is bad after a good first one
            {
                let mut v = crate::test_payload(&[("a", "1")]);
                v.extend_from_slice(&[0x0a, 0x03, 0x12, 0x01, 0xff]);
                v
            },
        ];
        for (ti, text) in texts.iter().enumerate() {
            let mut b = batch();
            b.svr_time = -(ti as i64);
            b.agent_id = (*text).to_string();
            b.hostname = texts[(ti + 1) % texts.len()].to_string();
            b.tag = texts[(ti + 2) % texts.len()].to_string();
            b.extranet_ipv6 = vec![(*text).to_string(), "::1".into()];
            b.id = (ti % 2 == 0).then_some(PacketId {
                epoch: u64::MAX - ti as u64,
                seq: ti as u64,
            });
            b.records = payloads
                .iter()
                .enumerate()
                .map(|(i, p)| EncodedRecord {
                    data_type: i32::MIN + i as i32 * 1000,
                    timestamp: i64::MAX - i as i64,
                    data: p.clone().into(),
                })
                .collect();
            let mut lines = Vec::new();
            let mut reference = Vec::new();
            for (i, rec) in b.records.iter().enumerate() {
                write_line(&mut lines, &b, i, rec);
                reference.extend_from_slice(&reference_line(&b, i, rec));
            }
            assert_eq!(
                String::from_utf8(lines).unwrap(),
                String::from_utf8(reference).unwrap(),
                "text {ti}"
            );
        }
    }

    #[test]
    fn escape_matches_serde_json_for_every_position() {
        // each special byte at each offset of a 0..24-byte string (the
        // 8-byte fast path and its tail)
        for special in [0u8, 0x08, 0x1f, b'"', b'\\', 0x7f, b'a'] {
            for len in 0..24 {
                for at in 0..len {
                    let mut v = vec![b'x'; len];
                    v[at] = special;
                    let s = String::from_utf8(v).unwrap();
                    let mut out = Vec::new();
                    line::escape(&mut out, &s);
                    assert_eq!(out, serde_json::to_vec(&s).unwrap(), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn bad_body_goes_base64() {
        let rec = EncodedRecord {
            data_type: 7,
            timestamp: 1,
            data: vec![0x0a, 0x03, 0x0a, 0x01, 0xff].into(),
        };
        let mut out = Vec::new();
        write_line(&mut out, &batch(), 0, &rec);
        let s = String::from_utf8(out).unwrap();
        assert!(s.ends_with("\"tag\":\"\",\"body\":\"CgMKAf8=\"}\n"), "{s}");
    }

    #[tokio::test]
    async fn writes_rotates_and_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let sink = NdjsonSink::start(&NdjsonConfig {
            dir: dir.path().to_path_buf(),
            rotate_bytes: 400,
            retention: Retention::default(),
        })
        .unwrap();
        let mut b = batch();
        for i in 0..10 {
            b.records.push(EncodedRecord {
                data_type: 1,
                timestamp: i,
                data: crate::test_payload(&[("k", "v")]).into(),
            });
        }
        sink.send(&Arc::new(b)).await.unwrap();
        sink.flush().await.unwrap();
        let files = files(dir.path());
        assert!(files.len() >= 3, "{files:?}");
        let mut lines = 0;
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            assert!(text.len() <= 400, "{} bytes", text.len());
            for l in text.lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["fields"]["k"], "v");
                assert_eq!(v["agent_time"], lines);
                lines += 1;
            }
        }
        assert_eq!(lines, 10);
        assert_eq!(
            sink.counters(),
            vec![
                ("written", 10),
                ("failed", 0),
                ("retention_removed_files", 0)
            ]
        );
    }

    #[tokio::test]
    async fn tickets_fire_after_sync_and_identities_recover() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(AckMetrics::default());
        let sink = NdjsonSink::start_with(
            &NdjsonConfig {
                dir: dir.path().to_path_buf(),
                rotate_bytes: 1 << 20,
                retention: Retention::default(),
            },
            metrics.clone(),
        )
        .unwrap();
        let mut rxs = Vec::new();
        for seq in 1..=20u64 {
            let (t, rx) = crate::ack::Ticket::new();
            let mut b = batch();
            b.id = Some(PacketId { epoch: 42, seq });
            b.ticket = Some(t);
            b.records = (0..3)
                .map(|i| EncodedRecord {
                    data_type: 1,
                    timestamp: i,
                    data: crate::test_payload(&[("k", "v")]).into(),
                })
                .collect();
            sink.send(&Arc::new(b)).await.unwrap();
            rxs.push(rx);
        }
        for rx in rxs {
            // durable: the lines are in the file when the ticket fires
            assert!(rx.await.unwrap());
        }
        let syncs = metrics.ndjson_syncs.load(Ordering::Relaxed);
        assert!((1..=20).contains(&syncs), "{syncs} syncs");
        let text = std::fs::read_to_string(&files(dir.path())[0]).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        assert_eq!(
            (
                &last["agent_epoch"],
                &last["agent_seq"],
                &last["record_idx"]
            ),
            (
                &serde_json::json!(42),
                &serde_json::json!(20),
                &serde_json::json!(2)
            )
        );
        // a torn last line (crash mid-write) is skipped
        std::fs::OpenOptions::new()
            .append(true)
            .open(&files(dir.path())[0])
            .unwrap()
            .write_all(b"{\"data_type\":1,\"agent_ti")
            .unwrap();
        assert_eq!(
            recover_ids(dir.path()),
            vec![("a1".to_string(), PacketId { epoch: 42, seq: 20 })]
        );
        // the torn line was cut off
        let f = files(dir.path())[0].clone();
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == 60);
        // the last packet lost its last line (crash mid-packet): the rest of
        // it goes too, and it is not counted as durable
        let cut = text[..text.len() - 1].rfind('\n').unwrap() + 1;
        std::fs::write(&f, &text[..cut]).unwrap();
        assert_eq!(
            recover_ids(dir.path()),
            vec![("a1".to_string(), PacketId { epoch: 42, seq: 19 })]
        );
        assert_eq!(std::fs::read_to_string(&f).unwrap().lines().count(), 57);
    }
}
