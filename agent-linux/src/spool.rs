//! The disk spool: encoded packets kept in the work dir while no center
//! takes data, replayed in order (oldest first) once one does.
//!
//! Files: `<dir>/seg-<index>.spool`, each `elkeid_core::spool::MAGIC` then
//! CRC-checked entries (format and checks in `elkeid_core::spool`; this file
//! only does the I/O). Segments are append-only and at most
//! [`SEGMENT_BYTES`]; the oldest is read first and deleted once replayed.
//! Packets that must go *before* everything spooled (the unacknowledged
//! window at shutdown) go to a segment with a lower index.
//!
//! The total size is capped (`cap_bytes`); an append that does not fit is
//! refused (the caller keeps back-pressure, or drops and counts by policy).
//! A torn tail or a corrupt entry (power loss, bit flip) is detected by CRC:
//! the rest of that segment is skipped, counted and logged; other segments
//! replay normally.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use elkeid_core::ack::PacketId;
use elkeid_core::spool::{self as codec, SpoolError};

/// A segment is closed and a new one started past this size.
pub(crate) const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// Index of the first segment of an empty spool (room below for prepends).
const FIRST_INDEX: u64 = 1 << 32;

/// Errors of the spool.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SpoolIoError {
    /// No room under the byte cap.
    #[error("spool full ({used} of {cap} bytes)")]
    Full {
        /// Bytes in use.
        used: u64,
        /// The cap.
        cap: u64,
    },
    /// A file operation failed.
    #[error("spool {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

#[derive(Debug)]
struct Segment {
    index: u64,
    path: PathBuf,
    /// Bytes on disk (including the magic).
    bytes: u64,
    /// Entries not yet replayed (known after the open scan or counted on
    /// append).
    entries: u64,
    /// Read position for replay.
    read_at: u64,
}

/// Counters for the heartbeat.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SpoolStats {
    /// Bytes on disk.
    pub(crate) bytes: u64,
    /// Entries waiting.
    pub(crate) entries: u64,
    /// Entries (or torn tails) skipped as corrupt since start.
    pub(crate) corrupt: u64,
    /// Spool time (Unix ms) of the oldest waiting entry, 0 when empty.
    pub(crate) oldest_ms: u64,
}

/// The spool of one agent; see the module docs.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    cap: u64,
    segments: VecDeque<Segment>,
    writer: Option<File>,
    corrupt: u64,
    oldest_ms: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpoolIoError + '_ {
    move |source| SpoolIoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn seg_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("seg-{index:020}.spool"))
}

impl Spool {
    /// Opens (creating) the spool in `dir` with a byte cap, scanning what a
    /// previous run left: complete entries are counted, a corrupt or torn
    /// part is counted and will be skipped at replay.
    pub(crate) fn open(dir: &Path, cap: u64) -> Result<Spool, SpoolIoError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter_map(|p| {
                let name = p.file_name()?.to_str()?;
                let idx = name.strip_prefix("seg-")?.strip_suffix(".spool")?;
                Some((idx.parse().ok()?, p))
            })
            .collect();
        found.sort();
        let mut s = Spool {
            dir: dir.to_path_buf(),
            cap,
            segments: VecDeque::new(),
            writer: None,
            corrupt: 0,
            oldest_ms: 0,
        };
        for (index, path) in found {
            let bytes = std::fs::metadata(&path).map_err(io(&path))?.len();
            let (entries, bad) = scan(&path)?;
            if bad {
                s.corrupt += 1;
                tracing::warn!(path = %path.display(), "spool segment has a torn or corrupt part; it will be skipped");
            }
            if entries == 0 {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            s.segments.push_back(Segment {
                index,
                path,
                bytes,
                entries,
                read_at: codec::MAGIC.len() as u64,
            });
        }
        s.refresh_oldest();
        Ok(s)
    }

    /// Current counters.
    pub(crate) fn stats(&self) -> SpoolStats {
        SpoolStats {
            bytes: self.segments.iter().map(|s| s.bytes).sum(),
            entries: self.segments.iter().map(|s| s.entries).sum(),
            corrupt: self.corrupt,
            oldest_ms: self.oldest_ms,
        }
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.segments.iter().all(|s| s.entries == 0)
    }

    /// Whether a packet of `len` bytes fits under the cap.
    pub(crate) fn has_room(&self, len: usize) -> bool {
        self.stats().bytes + codec::entry_len(len) as u64 + codec::MAGIC.len() as u64 <= self.cap
    }

    /// Whether a packet of `len` bytes would fit in an empty spool.
    pub(crate) fn fits_alone(&self, len: usize) -> bool {
        codec::entry_len(len) as u64 + codec::MAGIC.len() as u64 <= self.cap
    }

    fn check_room(&self, len: usize) -> Result<(), SpoolIoError> {
        if self.has_room(len) {
            Ok(())
        } else {
            Err(SpoolIoError::Full {
                used: self.stats().bytes,
                cap: self.cap,
            })
        }
    }

    fn new_segment(&mut self, index: u64, front: bool) -> Result<File, SpoolIoError> {
        let path = seg_path(&self.dir, index);
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        f.write_all(&codec::MAGIC).map_err(io(&path))?;
        let seg = Segment {
            index,
            path,
            bytes: codec::MAGIC.len() as u64,
            entries: 0,
            read_at: codec::MAGIC.len() as u64,
        };
        if front {
            self.segments.push_front(seg);
        } else {
            self.segments.push_back(seg);
        }
        Ok(f)
    }

    fn write_entry(
        f: &mut File,
        seg: &mut Segment,
        id: PacketId,
        unix_ms: u64,
        packet: &[u8],
    ) -> Result<(), SpoolIoError> {
        let hdr =
            codec::encode_entry_header(id, unix_ms, packet).map_err(|e| SpoolIoError::Io {
                path: seg.path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        f.write_all(&hdr).map_err(io(&seg.path))?;
        f.write_all(packet).map_err(io(&seg.path))?;
        seg.bytes += (hdr.len() + packet.len()) as u64;
        seg.entries += 1;
        Ok(())
    }

    /// Appends a packet after everything spooled.
    pub(crate) fn push_back(
        &mut self,
        id: PacketId,
        unix_ms: u64,
        packet: &[u8],
    ) -> Result<(), SpoolIoError> {
        self.check_room(packet.len())?;
        let need_new = match self.segments.back() {
            None => true,
            Some(s) => self.writer.is_none() || s.bytes >= SEGMENT_BYTES,
        };
        if need_new {
            self.seal()?;
            let index = self.segments.back().map_or(FIRST_INDEX, |s| s.index + 1);
            let f = self.new_segment(index, false)?;
            self.writer = Some(f);
        }
        let (Some(f), Some(seg)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Ok(());
        };
        Self::write_entry(f, seg, id, unix_ms, packet)?;
        if self.oldest_ms == 0 {
            self.oldest_ms = unix_ms;
        }
        Ok(())
    }

    /// Puts packets (oldest first) before everything spooled, in a segment
    /// of their own (shutdown: the unacknowledged window).
    pub(crate) fn push_front_all<'a>(
        &mut self,
        unix_ms: u64,
        packets: impl IntoIterator<Item = (PacketId, &'a [u8])>,
    ) -> Result<usize, SpoolIoError> {
        let mut packets = packets.into_iter().peekable();
        if packets.peek().is_none() {
            return Ok(0);
        }
        let index = self
            .segments
            .front()
            .map_or(FIRST_INDEX, |s| s.index.saturating_sub(1));
        let mut f = self.new_segment(index, true)?;
        let mut n = 0;
        for (id, p) in packets {
            self.check_room(p.len())?;
            let Some(seg) = self.segments.front_mut() else {
                break;
            };
            Self::write_entry(&mut f, seg, id, unix_ms, p)?;
            n += 1;
        }
        let path = seg_path(&self.dir, index);
        f.sync_data().map_err(io(&path))?;
        self.oldest_ms = unix_ms.min(if self.oldest_ms == 0 {
            unix_ms
        } else {
            self.oldest_ms
        });
        Ok(n)
    }

    /// Makes what was appended durable (rotation and shutdown).
    pub(crate) fn seal(&mut self) -> Result<(), SpoolIoError> {
        if let (Some(f), Some(seg)) = (self.writer.take(), self.segments.back()) {
            f.sync_data().map_err(io(&seg.path))?;
            if let Ok(d) = File::open(&self.dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    /// The oldest waiting packet, removed from the spool (its segment file
    /// is deleted once fully replayed). A corrupt or torn part ends that
    /// segment: counted, logged, and the next segment is read.
    pub(crate) fn pop_front(&mut self) -> Result<Option<(PacketId, Bytes)>, SpoolIoError> {
        loop {
            let Some(seg) = self.segments.front_mut() else {
                return Ok(None);
            };
            if seg.entries == 0 || seg.read_at >= seg.bytes {
                self.drop_front();
                continue;
            }
            match read_entry(&seg.path, seg.read_at) {
                Ok(Some((id, unix_ms, packet, n))) => {
                    seg.read_at += n;
                    seg.entries -= 1;
                    let _ = unix_ms;
                    if seg.entries == 0 {
                        self.drop_front();
                    }
                    self.refresh_oldest();
                    return Ok(Some((id, packet)));
                }
                Ok(None) => {
                    self.corrupt += 1;
                    tracing::warn!(path = %seg.path.display(), offset = seg.read_at, "spool: corrupt or torn entry; rest of the segment skipped");
                    self.drop_front();
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn drop_front(&mut self) {
        if let Some(seg) = self.segments.pop_front() {
            if self.segments.is_empty() {
                self.writer = None;
            }
            let _ = std::fs::remove_file(&seg.path);
        }
        self.refresh_oldest();
    }

    fn refresh_oldest(&mut self) {
        self.oldest_ms = 0;
        if let Some(seg) = self.segments.iter().find(|s| s.entries > 0)
            && let Ok(Some((_, ms, _, _))) = read_entry(&seg.path, seg.read_at)
        {
            self.oldest_ms = ms;
        }
    }
}

/// Reads the entry at `offset`: `Ok(None)` when torn or corrupt.
fn read_entry(
    path: &Path,
    offset: u64,
) -> Result<Option<(PacketId, u64, Bytes, u64)>, SpoolIoError> {
    let mut f = File::open(path).map_err(io(path))?;
    f.seek(SeekFrom::Start(offset)).map_err(io(path))?;
    let mut hdr = [0u8; codec::ENTRY_HEADER];
    if read_full(&mut f, &mut hdr).map_err(io(path))? < hdr.len() {
        return Ok(None);
    }
    let needed = match codec::decode_entry(&hdr) {
        Err(SpoolError::Incomplete { needed }) => needed,
        _ => return Ok(None),
    };
    // `needed` is bounded by MAX_ENTRY_BODY before this allocation.
    let mut buf = vec![0u8; needed];
    buf[..hdr.len()].copy_from_slice(&hdr);
    if read_full(&mut f, &mut buf[hdr.len()..]).map_err(io(path))? < needed - hdr.len() {
        return Ok(None);
    }
    match codec::decode_entry(&buf) {
        Ok((e, n)) => Ok(Some((
            e.id,
            e.unix_ms,
            Bytes::copy_from_slice(e.packet),
            n as u64,
        ))),
        Err(_) => Ok(None),
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Counts the complete entries of a segment; `true` when it has a torn or
/// corrupt part (or a bad magic).
fn scan(path: &Path) -> Result<(u64, bool), SpoolIoError> {
    let data = std::fs::read(path).map_err(io(path))?;
    let mut pos = match codec::check_magic(&data) {
        Ok(n) => n,
        Err(_) => return Ok((0, true)),
    };
    let mut n = 0;
    while pos < data.len() {
        match codec::decode_entry(&data[pos..]) {
            Ok((_, len)) => {
                pos += len;
                n += 1;
            }
            Err(_) => return Ok((n, true)),
        }
    }
    Ok((n, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(seq: u64) -> PacketId {
        PacketId { epoch: 7, seq }
    }

    fn drain(s: &mut Spool) -> Vec<u64> {
        let mut v = Vec::new();
        while let Some((i, p)) = s.pop_front().unwrap() {
            assert_eq!(p, Bytes::from(format!("packet-{}", i.seq)));
            v.push(i.seq);
        }
        v
    }

    #[test]
    fn append_replay_in_order_across_restart_and_prepend() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
            for seq in 3..=5 {
                s.push_back(id(seq), 1000 + seq, format!("packet-{seq}").as_bytes())
                    .unwrap();
            }
            let p1 = b"packet-1".to_vec();
            let p2 = b"packet-2".to_vec();
            assert_eq!(
                s.push_front_all(999, [(id(1), &p1[..]), (id(2), &p2[..])])
                    .unwrap(),
                2
            );
            s.seal().unwrap();
            let st = s.stats();
            assert_eq!((st.entries, st.oldest_ms), (5, 999));
        }
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.stats().entries, 5);
        assert_eq!(drain(&mut s), [1, 2, 3, 4, 5]);
        assert!(s.is_empty());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn cap_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 200).unwrap();
        let p = vec![0u8; 60];
        s.push_back(id(1), 1, &p).unwrap();
        s.push_back(id(2), 1, &p).unwrap();
        assert!(matches!(
            s.push_back(id(3), 1, &p),
            Err(SpoolIoError::Full { .. })
        ));
    }

    #[test]
    fn torn_and_bit_flipped_segments_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = Spool::open(dir.path(), 64 << 20).unwrap();
            // two segments: fill the first past SEGMENT_BYTES
            let big = vec![1u8; 1 << 20];
            for seq in 1..=5 {
                s.push_back(id(seq), 1, &big).unwrap();
            }
            s.push_back(id(6), 1, b"packet-6").unwrap();
            s.push_back(id(7), 1, b"packet-7").unwrap();
            s.seal().unwrap();
        }
        let mut segs: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segs.sort();
        assert_eq!(segs.len(), 2);
        // bit flip inside the 2nd entry of the first segment
        let mut a = std::fs::read(&segs[0]).unwrap();
        let at = 8 + codec::entry_len(1 << 20) + 100;
        a[at] ^= 0x10;
        std::fs::write(&segs[0], &a).unwrap();
        // torn tail of the second segment
        let b = std::fs::read(&segs[1]).unwrap();
        std::fs::write(&segs[1], &b[..b.len() - 3]).unwrap();

        let mut s = Spool::open(dir.path(), 64 << 20).unwrap();
        assert_eq!(s.stats().corrupt, 2);
        let mut got = Vec::new();
        while let Some((i, _)) = s.pop_front().unwrap() {
            got.push(i.seq);
        }
        // segment 1 = entries 1..=4 (flip in 2), segment 2 = 5..=7 (7 torn)
        assert_eq!(got, [1, 5, 6]);
        assert_eq!(s.stats().corrupt, 2);
        assert!(s.is_empty());
    }
}
