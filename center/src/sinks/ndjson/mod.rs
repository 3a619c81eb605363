//! The embedded default sink: one JSON object per record per line, in
//! size-rotated files `records-<unix seconds>-<seq>.ndjson` under the sink
//! directory.
//!
//! # Line format (a public interface: keep it stable)
//! ```json
//! {"data_type":1000,"agent_time":1700000000,"svr_time":1700000001,
//!  "agent_id":"…","hostname":"…","version":"…","product":"…",
//!  "intranet_ipv4":["…"],"extranet_ipv4":[],"intranet_ipv6":[],"extranet_ipv6":[],
//!  "tag":"","fields":{"key":"value",…}}
//! ```
//! Keys in this order; `fields` holds the decoded `Payload` (keys sorted, the
//! last duplicate wins). A body that is not a valid `Payload` (bad protobuf or
//! non-UTF-8 strings) is written base64 (standard alphabet, padded) under
//! `body` instead of `fields`.
//!
//! # Durability
//! Lines go through a 1 MiB user-space buffer that is flushed to the OS at
//! least every second; files are fsynced when rotated and on graceful
//! shutdown (SIGTERM). A crash of the process loses at most about one second
//! of records; a power loss may lose what the OS had not yet written since the
//! last rotation. A file is rotated before a line would take it past
//! `rotate_bytes` (a single longer line gets a file of its own).
//!
//! # Retention
//! `sinks.ndjson.retain_bytes` / `retain_secs` (unset: keep everything):
//! see `retention.rs`; applied at each rotation.
//!
//! # Back-pressure
//! Batches queue in a bounded channel (`QUEUE` batches) to one writer
//! thread; when it is full `send` waits, which slows the agent streams.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use elkeid_proto::grpc::EncodedRecord;
use tokio::sync::{mpsc, oneshot};

use super::{PacketBatch, Sink, SinkError, SinkFuture};
mod config;

pub(crate) use config::{KEY_ARGS, NdjsonFile};
pub use config::{NdjsonArgs, NdjsonConfig};

mod retention;
pub(crate) use retention::Retention;

/// Batches queued to the writer thread before `send` waits.
const QUEUE: usize = 256;
/// User-space write buffer.
const BUF: usize = 1024 * 1024;
/// Flush-to-OS period.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

enum Msg {
    Batch(Arc<PacketBatch>),
    Tick,
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
            Msg::Tick => "Tick",
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
    /// Creates the directory and starts the writer thread and its ticker.
    /// Must be called inside a tokio runtime.
    pub(crate) fn start(cfg: &NdjsonConfig) -> Result<NdjsonSink, SinkError> {
        std::fs::create_dir_all(&cfg.dir).map_err(io_err)?;
        let (tx, mut rx) = mpsc::channel::<Msg>(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let mut writer = Writer::new(cfg.dir.clone(), cfg.rotate_bytes);
        writer.retention = cfg.retention;
        let q = queued.clone();
        let stats = Arc::new(Stats::default());
        writer.removed = stats.removed.clone();
        let st = stats.clone();
        std::thread::Builder::new()
            .name("ndjson-sink".into())
            .spawn(move || {
                while let Some(msg) = rx.blocking_recv() {
                    match msg {
                        Msg::Batch(b) => {
                            q.fetch_sub(1, Ordering::Relaxed);
                            let (written, result) = writer.write_batch(&b);
                            st.written.fetch_add(written as u64, Ordering::Relaxed);
                            if let Err(error) = result {
                                let lost = b.records.len().saturating_sub(written);
                                st.failed.fetch_add(lost as u64, Ordering::Relaxed);
                                tracing::error!(%error, lost, "ndjson sink: write failed");
                                // start a fresh file at the next batch
                                writer.file = None;
                            }
                        }
                        Msg::Tick => {
                            if writer.last_flush.elapsed() >= FLUSH_EVERY
                                && let Err(error) = writer.flush(false)
                            {
                                tracing::error!(%error, "ndjson sink: flush failed");
                            }
                        }
                        Msg::Flush(done) => {
                            let _ = done.send(writer.flush(true));
                        }
                    }
                }
                if let Err(error) = writer.flush(true) {
                    tracing::error!(%error, "ndjson sink: final flush failed");
                }
            })
            .map_err(io_err)?;
        let ticker = tx.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(FLUSH_EVERY);
            loop {
                iv.tick().await;
                match ticker.try_send(Msg::Tick) {
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                    _ => continue,
                }
            }
        });
        Ok(NdjsonSink { tx, queued, stats })
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
    file: Option<(std::io::BufWriter<std::fs::File>, PathBuf)>,
    written: u64,
    seq: u64,
    line: Vec<u8>,
    last_flush: Instant,
}

impl Writer {
    fn new(dir: PathBuf, rotate_bytes: u64) -> Self {
        Writer {
            dir,
            rotate_bytes,
            retention: Retention::default(),
            removed: Arc::default(),
            file: None,
            written: 0,
            seq: 0,
            line: Vec::with_capacity(4096),
            last_flush: Instant::now(),
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
                    let n = retention::enforce(
                        &self.dir,
                        self.retention,
                        Some(&path),
                        std::time::SystemTime::now(),
                    );
                    self.removed.fetch_add(n as u64, Ordering::Relaxed);
                    self.file = Some((std::io::BufWriter::with_capacity(BUF, f), path));
                    self.written = 0;
                    return Ok(());
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn close(&mut self) -> std::io::Result<()> {
        if let Some((mut f, _)) = self.file.take() {
            f.flush()?;
            f.get_ref().sync_all()?;
        }
        Ok(())
    }

    /// Writes a batch's lines; returns how many were written and the first error.
    fn write_batch(&mut self, batch: &PacketBatch) -> (usize, std::io::Result<()>) {
        let mut n = 0;
        for rec in &batch.records {
            if let Err(e) = self.write_record(batch, rec) {
                return (n, Err(e));
            }
            n += 1;
        }
        (n, Ok(()))
    }

    fn write_record(&mut self, batch: &PacketBatch, rec: &EncodedRecord) -> std::io::Result<()> {
        self.line.clear();
        write_line(&mut self.line, batch, rec);
        let len = self.line.len() as u64;
        if self.file.is_some() && self.written > 0 && self.written + len > self.rotate_bytes {
            self.close()?;
        }
        if self.file.is_none() {
            self.open()?;
        }
        if let Some((f, _)) = self.file.as_mut() {
            f.write_all(&self.line)?;
            self.written += len;
        }
        Ok(())
    }

    fn flush(&mut self, sync: bool) -> std::io::Result<()> {
        self.last_flush = Instant::now();
        if let Some((f, _)) = self.file.as_mut() {
            f.flush()?;
            if sync {
                f.get_ref().sync_all()?;
            }
        }
        Ok(())
    }
}

#[derive(serde::Serialize)]
struct Line<'a> {
    data_type: i32,
    agent_time: i64,
    svr_time: i64,
    agent_id: &'a str,
    hostname: &'a str,
    version: &'a str,
    product: &'a str,
    intranet_ipv4: &'a [String],
    extranet_ipv4: &'a [String],
    intranet_ipv6: &'a [String],
    extranet_ipv6: &'a [String],
    tag: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<std::collections::BTreeMap<&'a str, &'a str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<String>,
}

/// Appends one record's line (with the trailing `\n`) to `out`.
pub(crate) fn write_line(out: &mut Vec<u8>, batch: &PacketBatch, rec: &EncodedRecord) {
    let (fields, body) = match elkeid_core::payload::decode_utf8(&rec.data) {
        // Last duplicate wins, as in a protobuf map.
        Ok(pairs) => (Some(pairs.into_iter().collect()), None),
        Err(_) => (
            None,
            Some(base64::engine::general_purpose::STANDARD.encode(&rec.data)),
        ),
    };
    let line = Line {
        data_type: rec.data_type,
        agent_time: rec.timestamp,
        svr_time: batch.svr_time,
        agent_id: &batch.agent_id,
        hostname: &batch.hostname,
        version: &batch.version,
        product: &batch.product,
        intranet_ipv4: &batch.intranet_ipv4,
        extranet_ipv4: &batch.extranet_ipv4,
        intranet_ipv6: &batch.intranet_ipv6,
        extranet_ipv6: &batch.extranet_ipv6,
        tag: &batch.tag,
        fields,
        body,
    };
    // Serializing borrowed strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &line);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
        write_line(&mut out, &batch(), &rec);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"data_type\":1000,\"agent_time\":1700000000,\"svr_time\":1700000001,\"agent_id\":\"a1\",\
\"hostname\":\"h\",\"version\":\"1.9.1\",\"product\":\"elkeid-agent\",\"intranet_ipv4\":[\"10.0.0.2\"],\
\"extranet_ipv4\":[],\"intranet_ipv6\":[],\"extranet_ipv6\":[],\"tag\":\"\",\"fields\":{\"a\":\"1\",\"b\":\"2\"}}\n"
        );
    }

    #[test]
    fn bad_body_goes_base64() {
        let rec = EncodedRecord {
            data_type: 7,
            timestamp: 1,
            data: vec![0x0a, 0x03, 0x0a, 0x01, 0xff].into(),
        };
        let mut out = Vec::new();
        write_line(&mut out, &batch(), &rec);
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
}
