//! Plugin pipes: records in (fd 4 and fd 5), tasks out (fd 3), counters.
//!
//! Records are read straight into each pipe's `FrameDecoder` (the decoder
//! never grows past `4 + max_frame_len + chunk`) and pushed into the ring.
//! The read chunk adapts: [`MIN_READ_CHUNK`] while the plugin is quiet (a
//! heartbeat now and then), [`READ_CHUNK`] as soon as reads fill the chunk;
//! after [`IDLE_READS`] small reads in a row the pipe gives its large buffer
//! back, so idle plugins cost 4 KiB each instead of 64 KiB. When the ring has no room for plugin records the
//! reader waits for [`Buffer::space`] and stops reading meanwhile, so the
//! plugin blocks on its full pipe: back-pressure, never a drop.
//!
//! High priority (fd 5): whenever both pipes have data, fd 5 is read and
//! pushed first. Both feed the same FIFO ring, so a high-priority record
//! never overtakes records already in the ring, only those still in fd 4.
//!
//! A broken frame (`FrameError`) ends the reader with an error: the caller
//! kills and restarts the plugin, because the stream cannot be resynchronised.

use std::cell::Cell;
use std::io;

use elkeid_core::frame::{FrameDecoder, FrameError};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::buffer::Buffer;

/// Largest read chunk per `read(2)` (a pipe under a flood).
pub(crate) const READ_CHUNK: usize = 64 * 1024;
/// Smallest read chunk (a quiet pipe).
pub(crate) const MIN_READ_CHUNK: usize = 4 * 1024;
/// Reads in a row smaller than [`MIN_READ_CHUNK`] after which a pipe
/// shrinks its chunk and its decoder buffer back to [`MIN_READ_CHUNK`].
const IDLE_READS: u32 = 8;

/// Why a record reader stopped early.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The plugin wrote a frame that cannot be decoded.
    #[error("broken frame on fd {fd}: {error}")]
    Frame {
        /// 4 or 5.
        fd: u8,
        /// The decoder's verdict.
        error: FrameError,
    },
    /// A record that can never fit in the ring, even empty.
    #[error("record of {0} bytes is larger than the ring can ever hold")]
    TooBigForRing(usize),
    /// Reading the pipe failed.
    #[error("pipe read: {0}")]
    Io(#[from] io::Error),
}

/// §4.8 counters, reset by each 1001 sample. `rx` = tasks written to the
/// plugin (bytes incl. the 4-byte prefix); `tx` = records read (bytes = `L`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) rx_cnt: Cell<u64>,
    pub(crate) rx_bytes: Cell<u64>,
    pub(crate) tx_cnt: Cell<u64>,
    pub(crate) tx_bytes: Cell<u64>,
}

impl Counters {
    fn add(c: &Cell<u64>, v: u64) {
        c.set(c.get().wrapping_add(v));
    }

    /// Returns (rx_cnt, rx_bytes, tx_cnt, tx_bytes) and resets them.
    pub(crate) fn take(&self) -> (u64, u64, u64, u64) {
        (
            self.rx_cnt.take(),
            self.rx_bytes.take(),
            self.tx_cnt.take(),
            self.tx_bytes.take(),
        )
    }
}

struct Pipe {
    rx: pipe::Receiver,
    dec: FrameDecoder,
    eof: bool,
    fd: u8,
    /// Current read chunk, [`MIN_READ_CHUNK`]..=[`READ_CHUNK`].
    chunk: usize,
    /// Small reads in a row.
    small_reads: u32,
}

impl Pipe {
    fn new(rx: pipe::Receiver, max_frame_len: u32, fd: u8) -> Pipe {
        Pipe {
            rx,
            dec: FrameDecoder::new(max_frame_len),
            eof: false,
            fd,
            chunk: MIN_READ_CHUNK,
            small_reads: 0,
        }
    }

    /// Sizes the next read after one of `n` bytes: a full chunk means the
    /// plugin writes faster than we read, so grow (x4, up to
    /// [`READ_CHUNK`]); a run of small reads means it is quiet, so give the
    /// large buffer back (bytes still buffered are kept).
    fn adapt(&mut self, n: usize) {
        if n >= self.chunk {
            self.chunk = (self.chunk * 4).min(READ_CHUNK);
            self.small_reads = 0;
        } else if n < MIN_READ_CHUNK {
            self.small_reads += 1;
            if self.small_reads >= IDLE_READS {
                self.small_reads = 0;
                self.chunk = MIN_READ_CHUNK;
                if self.dec.capacity() > 2 * MIN_READ_CHUNK {
                    self.dec.shrink_to(MIN_READ_CHUNK);
                }
            }
        } else {
            self.small_reads = 0;
        }
    }
}

/// Reads both record pipes until EOF on both (Ok) or a broken frame (Err).
/// A frame cut short by EOF (the plugin died mid-write) is logged and
/// discarded: there is nothing more to read.
pub(crate) async fn read_records(
    records: pipe::Receiver,
    high: pipe::Receiver,
    buffer: &Buffer,
    max_frame_len: u32,
    counters: &Counters,
) -> Result<(), ReadError> {
    let mut normal = Pipe::new(records, max_frame_len, 4);
    let mut hp = Pipe::new(high, max_frame_len, 5);
    loop {
        if normal.eof && hp.eof {
            return Ok(());
        }
        let p = tokio::select! {
            biased;
            r = hp.rx.readable(), if !hp.eof => { r?; &mut hp }
            r = normal.rx.readable(), if !normal.eof => { r?; &mut normal }
        };
        match p.rx.try_read(p.dec.spare_mut(p.chunk)) {
            Ok(0) => {
                p.eof = true;
                if p.dec.buffered() > 0 {
                    tracing::warn!(
                        fd = p.fd,
                        bytes = p.dec.buffered(),
                        "plugin pipe closed inside a frame"
                    );
                }
            }
            Ok(n) => {
                p.dec.advance(n);
                drain(p, buffer, counters).await?;
                p.adapt(n);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Pushes every complete record of `p` into the ring, waiting for room.
async fn drain(p: &mut Pipe, buffer: &Buffer, counters: &Counters) -> Result<(), ReadError> {
    let fd = p.fd;
    loop {
        let rec = match p.dec.next_record() {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(()),
            Err(error) => return Err(ReadError::Frame { fd, error }),
        };
        Counters::add(&counters.tx_cnt, 1);
        Counters::add(&counters.tx_bytes, rec.body.len() as u64);
        while buffer.push_frame(&rec).is_err() {
            if buffer.is_empty() {
                return Err(ReadError::TooBigForRing(rec.encoded_len()));
            }
            buffer.space().await;
        }
    }
}

/// Writes queued Task frames to fd 3 until the queue closes or the pipe
/// breaks (the plugin closed fd 3 or exited). Returns why it stopped.
pub(crate) async fn write_tasks(
    mut tx: pipe::Sender,
    queue: &mut mpsc::Receiver<Vec<u8>>,
    counters: &Counters,
) -> io::Result<()> {
    while let Some(frame) = queue.recv().await {
        tx.write_all(&frame).await?;
        Counters::add(&counters.rx_cnt, 1);
        Counters::add(&counters.rx_bytes, frame.len() as u64);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use elkeid_core::ring::RingConfig;

    /// A record frame built from the wire layout: u32 LE length + Record
    /// {1: data_type, 2: timestamp, 3: Payload{1: {1: key, 2: value}}}.
    pub(crate) fn frame(data_type: u8, ts: u8, key: &str, value: &str) -> Vec<u8> {
        let mut entry = vec![0x0a, key.len() as u8];
        entry.extend_from_slice(key.as_bytes());
        entry.extend_from_slice(&[0x12, value.len() as u8]);
        entry.extend_from_slice(value.as_bytes());
        let mut payload = vec![0x0a, entry.len() as u8];
        payload.extend_from_slice(&entry);
        let mut body = vec![0x08, data_type, 0x10, ts, 0x1a, payload.len() as u8];
        body.extend_from_slice(&payload);
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&body);
        f
    }

    fn ring_records(buffer: &Buffer) -> usize {
        buffer.len()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn reads_both_pipes_counts_and_ends_at_eof() {
        use tokio::io::AsyncWriteExt as _;
        let buffer = Buffer::new(RingConfig::default());
        let counters = Counters::default();
        let (mut w4, r4) = pipe::pipe().unwrap();
        let (mut w5, r5) = pipe::pipe().unwrap();
        let f = frame(100, 7, "k", "v");
        let mut bytes = Vec::new();
        for _ in 0..10 {
            bytes.extend_from_slice(&f);
        }
        // Split a frame across writes.
        w4.write_all(&bytes[..13]).await.unwrap();
        w5.write_all(&f).await.unwrap();
        let writer = async {
            w4.write_all(&bytes[13..]).await.unwrap();
            drop(w4);
            drop(w5);
        };
        let (r, ()) = tokio::join!(read_records(r4, r5, &buffer, 1 << 20, &counters), writer);
        r.unwrap();
        assert_eq!(ring_records(&buffer), 11);
        let (rxc, rxb, txc, txb) = counters.take();
        assert_eq!((rxc, rxb, txc), (0, 0, 11));
        assert_eq!(txb, 11 * (f.len() as u64 - 4));
        assert_eq!(counters.take(), (0, 0, 0, 0));
    }

    /// A pipe's read chunk grows while reads fill it and, after a run of
    /// small reads, shrinks back with the decoder's buffer; a frame still
    /// buffered is kept whole.
    #[tokio::test(flavor = "current_thread")]
    async fn read_chunk_grows_under_load_and_shrinks_when_quiet() {
        let (_w, r) = pipe::pipe().unwrap();
        let mut p = Pipe::new(r, 1 << 20, 4);
        assert_eq!(p.chunk, MIN_READ_CHUNK);
        // Full reads: 4 KiB -> 16 KiB -> 64 KiB, then it stays there.
        for want in [16 * 1024, READ_CHUNK, READ_CHUNK] {
            let n = p.dec.spare_mut(p.chunk).len();
            assert!(n >= p.chunk);
            p.dec.advance(p.chunk);
            p.adapt(p.chunk);
            assert_eq!(p.chunk, want);
        }
        assert!(p.dec.capacity() >= READ_CHUNK);
        // 3 bytes of the next frame's prefix stay buffered across the shrink.
        let f = frame(100, 7, "k", "v");
        let mut fresh = FrameDecoder::new(1 << 20);
        fresh.push(&f[..3]);
        p.dec = fresh;
        p.dec.spare_mut(READ_CHUNK);
        assert!(p.dec.capacity() >= READ_CHUNK);
        for i in 1..=IDLE_READS {
            p.adapt(100);
            let shrunk = i == IDLE_READS;
            assert_eq!(p.chunk == MIN_READ_CHUNK, shrunk, "after {i} small reads");
        }
        assert_eq!(p.dec.capacity(), MIN_READ_CHUNK);
        assert_eq!(p.dec.buffered(), 3);
        p.dec.push(&f[3..]);
        let rec = p.dec.next_record().unwrap().unwrap();
        assert_eq!(rec.data_type, 100);
        // A medium read resets the run.
        p.chunk = READ_CHUNK;
        for _ in 1..IDLE_READS {
            p.adapt(100);
        }
        p.adapt(MIN_READ_CHUNK);
        p.adapt(100);
        assert_eq!(p.chunk, READ_CHUNK);
    }

    /// When both pipes have data, fd 5 records enter the ring first.
    #[tokio::test(flavor = "current_thread")]
    async fn high_priority_pipe_is_read_first() {
        use prost::Message as _;
        use tokio::io::AsyncWriteExt as _;
        let buffer = Buffer::new(RingConfig::default());
        let counters = Counters::default();
        let (mut w4, r4) = pipe::pipe().unwrap();
        let (mut w5, r5) = pipe::pipe().unwrap();
        for _ in 0..3 {
            w4.write_all(&frame(4, 1, "k", "normal")).await.unwrap();
        }
        for _ in 0..3 {
            w5.write_all(&frame(5, 1, "k", "high")).await.unwrap();
        }
        drop((w4, w5));
        read_records(r4, r5, &buffer, 1 << 20, &counters)
            .await
            .unwrap();
        let mut out = Vec::new();
        let (_batch, n) = buffer
            .begin_packet(usize::MAX, usize::MAX, &[], &mut out)
            .unwrap();
        assert_eq!(n, 6);
        let p = elkeid_proto::grpc::PackagedData::decode(out.as_slice()).unwrap();
        let types: Vec<i32> = p.records.iter().map(|r| r.data_type).collect();
        assert_eq!(types, [5, 5, 5, 4, 4, 4]);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn hostile_length_is_an_error_without_allocation() {
        use tokio::io::AsyncWriteExt as _;
        let buffer = Buffer::new(RingConfig::default());
        let counters = Counters::default();
        let (mut w4, r4) = pipe::pipe().unwrap();
        let (_w5, r5) = pipe::pipe().unwrap();
        w4.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
        let r = read_records(r4, r5, &buffer, 4 << 20, &counters).await;
        assert!(
            matches!(
                r,
                Err(ReadError::Frame {
                    fd: 4,
                    error: FrameError::TooLong { .. }
                })
            ),
            "{r:?}"
        );
        assert_eq!(buffer.len(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn garbage_body_is_an_error() {
        use tokio::io::AsyncWriteExt as _;
        let buffer = Buffer::new(RingConfig::default());
        let counters = Counters::default();
        let (_w4, r4) = pipe::pipe().unwrap();
        let (mut w5, r5) = pipe::pipe().unwrap();
        w5.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff]).await.unwrap();
        let r = read_records(r4, r5, &buffer, 4 << 20, &counters).await;
        assert!(matches!(r, Err(ReadError::Frame { fd: 5, .. })), "{r:?}");
    }

    /// Ring full -> the reader waits (no drop) and resumes after a commit.
    #[tokio::test(flavor = "current_thread")]
    async fn back_pressure_waits_for_space() {
        use tokio::io::AsyncWriteExt as _;
        let cfg = RingConfig {
            byte_budget: 4096,
            agent_reserved_records: 1,
            agent_reserved_bytes: 256,
        };
        let buffer = Buffer::new(cfg);
        let counters = Counters::default();
        let (mut w4, r4) = pipe::pipe().unwrap();
        let (w5, r5) = pipe::pipe().unwrap();
        drop(w5);
        let f = frame(1, 1, "key", &"v".repeat(100));
        let n = 200usize;
        let sender = async {
            for _ in 0..n {
                w4.write_all(&f).await.unwrap();
            }
            drop(w4);
        };
        let mut delivered = 0usize;
        let consumer = async {
            let mut out = Vec::new();
            while delivered < n {
                tokio::task::yield_now().await;
                if let Some((batch, k)) = buffer.begin_packet(usize::MAX, usize::MAX, &[], &mut out)
                {
                    delivered += k;
                    buffer.commit(batch);
                }
            }
        };
        let (r, (), ()) = tokio::join!(
            read_records(r4, r5, &buffer, 1 << 20, &counters),
            sender,
            consumer
        );
        r.unwrap();
        assert_eq!(delivered, n);
        assert_eq!(buffer.drops(), 0);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tasks_are_written_and_counted() {
        use tokio::io::AsyncReadExt as _;
        let counters = Counters::default();
        let (w3, mut r3) = pipe::pipe().unwrap();
        let (qtx, mut qrx) = mpsc::channel(4);
        qtx.send(vec![1, 0, 0, 0, 9]).await.unwrap();
        qtx.send(vec![2, 0, 0, 0, 8, 8]).await.unwrap();
        drop(qtx);
        write_tasks(w3, &mut qrx, &counters).await.unwrap();
        let mut got = Vec::new();
        r3.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [1, 0, 0, 0, 9, 2, 0, 0, 0, 8, 8]);
        assert_eq!(counters.take(), (2, 11, 0, 0));
    }
}
