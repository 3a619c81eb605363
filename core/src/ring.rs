//! The agent's record buffer.
//!
//! A FIFO of already-encoded `EncodedRecord`s with a fixed capacity of `N`
//! records (the const generic, 2048 by default) and a byte budget, backed by
//! a fixed slot table and one byte arena allocated once: nothing is
//! allocated per record.
//!
//! # Arena layout
//! The arena is split in two regions: the *main* region (`byte_budget -
//! agent_reserved_bytes`) and the *reserve* region (`agent_reserved_bytes`).
//! Each is a circular buffer in which a record is always contiguous: when a
//! record does not fit between the tail and the end of the region, it goes
//! to the region start (if the oldest live record leaves room there) and the
//! skipped tail bytes stay unused until the records before them are freed.
//! Records of both regions share one FIFO order through the slot table;
//! since records are freed in that order, each region is freed in its own
//! order too. [`Ring::has_room`] is exact: it answers whether the very next
//! push of that class and length succeeds.
//!
//! # Reserved share for agent records
//! Plugin records ([`Class::Plugin`]) only use the main region and leave
//! `agent_reserved_records` slots to agent records that are not yet used by
//! them. Agent records ([`Class::Agent`]: heartbeats, logs, task results)
//! use the main region when it has room and the reserve region otherwise,
//! so a plugin flood can never starve them.
//!
//! # Batches
//! [`Ring::begin_batch`] marks records at the head as in flight (bounded in
//! count and in bytes as they will appear inside `PackagedData`); the caller
//! encodes them with [`crate::packet`], then either [`Ring::commit`]s
//! (frees them) or [`Ring::rollback`]s (they stay at the head, in order, for
//! the next batch). One batch at a time; pushes continue meanwhile.

use core::fmt;

use crate::frame::{self, RecordRef};
use crate::packet::record_entry_len;
use crate::pb::Writer;

/// Default cap on a batch's bytes inside `PackagedData` (4 MiB, well below
/// the Go center's 10 MiB message limit).
pub const DEFAULT_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Default record capacity (the Go agent's buffer size).
pub const DEFAULT_CAPACITY: usize = 2048;

/// Who produced a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Records read from a plugin pipe.
    Plugin,
    /// Records the agent makes itself: heartbeats, logs, task results.
    Agent,
}

/// Sizes of a [`Ring`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Total arena bytes (both regions).
    pub byte_budget: usize,
    /// Slots plugin records must leave to agent records.
    pub agent_reserved_records: usize,
    /// Arena bytes only agent records may use.
    pub agent_reserved_bytes: usize,
}

impl Default for RingConfig {
    /// 8 MiB, 128 records and 512 KiB reserved for agent records.
    fn default() -> Self {
        Self {
            byte_budget: 8 * 1024 * 1024,
            agent_reserved_records: 128,
            agent_reserved_bytes: 512 * 1024,
        }
    }
}

/// The ring has no room for a record (of that class and size, right now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("record buffer full")
    }
}

impl core::error::Error for Full {}

/// Records at the head of a ring marked in flight by [`Ring::begin_batch`].
///
/// Hand it back to [`Ring::commit`] or [`Ring::rollback`]; until then no
/// other batch can begin.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a batch must be committed or rolled back"]
pub struct Batch {
    records: usize,
    bytes: usize,
    generation: u64,
}

impl Batch {
    /// Records in the batch.
    pub fn len(&self) -> usize {
        self.records
    }

    /// Always false: an empty batch is never begun.
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Bytes the records take inside `PackagedData` (field 1 key, length
    /// varint and record bytes each).
    pub fn encoded_bytes(&self) -> usize {
        self.bytes
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Offset in the arena (absolute).
    off: u32,
    len: u32,
    class: Class,
    /// Region index (0 main, 1 reserve).
    region: u8,
}

const EMPTY_SLOT: Slot = Slot {
    off: 0,
    len: 0,
    class: Class::Plugin,
    region: 0,
};

/// One circular region of the arena; offsets are relative to `base`.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: usize,
    cap: usize,
    /// Start of the oldest live (non-empty) record.
    head: usize,
    /// Where the next record goes.
    tail: usize,
    /// Live records sit in `[head, end_mark)` and `[0, tail)`.
    wrapped: bool,
    end_mark: usize,
    /// Live records of non-zero length (zero-length ones take no bytes).
    live: usize,
}

impl Region {
    const fn new(base: usize, cap: usize) -> Self {
        Self {
            base,
            cap,
            head: 0,
            tail: 0,
            wrapped: false,
            end_mark: 0,
            live: 0,
        }
    }

    /// Where a record of `len` bytes would go: (relative offset, wraps).
    fn place(&self, len: usize) -> Option<(usize, bool)> {
        if len == 0 {
            return Some((0, false));
        }
        if self.live == 0 {
            return (len <= self.cap).then_some((0, false));
        }
        if self.wrapped {
            (self.tail.saturating_add(len) <= self.head).then_some((self.tail, false))
        } else if self.tail.saturating_add(len) <= self.cap {
            Some((self.tail, false))
        } else if len <= self.head {
            Some((0, true))
        } else {
            None
        }
    }

    fn occupy(&mut self, off: usize, len: usize, wraps: bool) {
        if len == 0 {
            return;
        }
        if wraps {
            self.end_mark = self.tail;
            self.wrapped = true;
        }
        self.tail = off + len;
        self.live += 1;
    }

    fn free(&mut self, off: usize, len: usize) {
        if len == 0 {
            return;
        }
        debug_assert_eq!(off, self.head, "records leave a region in order");
        self.live -= 1;
        if self.live == 0 {
            self.head = 0;
            self.tail = 0;
            self.wrapped = false;
            self.end_mark = 0;
            return;
        }
        self.head = off + len;
        if self.wrapped && self.head == self.end_mark {
            self.head = 0;
            self.wrapped = false;
            self.end_mark = 0;
        }
    }
}

#[derive(Debug)]
enum Arena {
    #[cfg(feature = "alloc")]
    Owned(alloc::boxed::Box<[u8]>),
    Borrowed(&'static mut [u8]),
}

impl Arena {
    fn bytes(&self) -> &[u8] {
        match self {
            #[cfg(feature = "alloc")]
            Self::Owned(b) => b,
            Self::Borrowed(b) => b,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            #[cfg(feature = "alloc")]
            Self::Owned(b) => b,
            Self::Borrowed(b) => b,
        }
    }
}

/// The record buffer; see the [module docs](self).
#[derive(Debug)]
pub struct Ring<const N: usize = DEFAULT_CAPACITY> {
    slots: [Slot; N],
    /// Index of the oldest record.
    first: usize,
    count: usize,
    /// Records at the head in the open batch (0 when none).
    in_flight: usize,
    batch_open: bool,
    generation: u64,
    arena: Arena,
    regions: [Region; 2],
    bytes: usize,
    agent_count: usize,
    agent_bytes: usize,
    reserved_records: usize,
    /// End (absolute, exclusive) of the arena bytes written since the last
    /// [`Ring::take_idle_arena`].
    dirty_end: usize,
}

const MAIN: usize = 0;
const RESERVE: usize = 1;

impl<const N: usize> Ring<N> {
    /// A ring whose arena (`cfg.byte_budget` bytes) is allocated once, here.
    #[cfg(feature = "alloc")]
    pub fn new(cfg: RingConfig) -> Self {
        let budget = cfg.byte_budget.min(u32::MAX as usize);
        let arena = alloc::vec![0u8; budget].into_boxed_slice();
        Self::build(cfg, Arena::Owned(arena))
    }

    /// A ring using caller-provided storage as its arena (no allocator
    /// needed); the byte budget is the smaller of `cfg.byte_budget` and the
    /// storage length.
    pub fn with_storage(cfg: RingConfig, storage: &'static mut [u8]) -> Self {
        Self::build(cfg, Arena::Borrowed(storage))
    }

    fn build(cfg: RingConfig, arena: Arena) -> Self {
        let budget = cfg
            .byte_budget
            .min(arena.bytes().len())
            .min(u32::MAX as usize);
        let reserve = cfg.agent_reserved_bytes.min(budget);
        let main = budget - reserve;
        Self {
            slots: [EMPTY_SLOT; N],
            first: 0,
            count: 0,
            in_flight: 0,
            batch_open: false,
            generation: 0,
            arena,
            regions: [Region::new(0, main), Region::new(main, reserve)],
            bytes: 0,
            agent_count: 0,
            agent_bytes: 0,
            reserved_records: cfg.agent_reserved_records.min(N),
            dirty_end: 0,
        }
    }

    /// Records stored (in flight included).
    pub fn len(&self) -> usize {
        self.count
    }

    /// True when no record is stored.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Encoded bytes of the stored records (in flight included).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records of `class` stored.
    pub fn len_of(&self, class: Class) -> usize {
        match class {
            Class::Agent => self.agent_count,
            Class::Plugin => self.count - self.agent_count,
        }
    }

    /// Encoded bytes of the stored records of `class`.
    pub fn bytes_of(&self, class: Class) -> usize {
        match class {
            Class::Agent => self.agent_bytes,
            Class::Plugin => self.bytes - self.agent_bytes,
        }
    }

    /// Records in the open batch (0 when none is open).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Record capacity (`N`).
    pub const fn capacity(&self) -> usize {
        N
    }

    /// The largest record of `class` that could ever be stored (in an
    /// otherwise empty ring). A longer record is always refused: the caller
    /// must drop it rather than wait for room.
    pub fn max_record_len(&self, class: Class) -> usize {
        match class {
            Class::Plugin => self.regions[MAIN].cap,
            Class::Agent => self.regions[MAIN].cap.max(self.regions[RESERVE].cap),
        }
    }

    fn slot_ok(&self, class: Class) -> bool {
        match class {
            Class::Agent => self.count < N,
            Class::Plugin => {
                let held_back = self.reserved_records.saturating_sub(self.agent_count);
                self.count + 1 + held_back <= N
            }
        }
    }

    /// Where a record goes: (region, relative offset, wraps).
    fn place(&self, class: Class, len: usize) -> Option<(usize, usize, bool)> {
        if !self.slot_ok(class) || len > u32::MAX as usize {
            return None;
        }
        if let Some((off, wraps)) = self.regions[MAIN].place(len) {
            return Some((MAIN, off, wraps));
        }
        if class == Class::Agent
            && let Some((off, wraps)) = self.regions[RESERVE].place(len)
        {
            return Some((RESERVE, off, wraps));
        }
        None
    }

    /// Can a record of `len` encoded bytes of `class` be pushed now?
    /// Exact: the next push of that class and length succeeds iff true.
    pub fn has_room(&self, class: Class, len: usize) -> bool {
        self.place(class, len).is_some()
    }

    /// Reserves room, lets `fill` write exactly `len` bytes, then records
    /// the slot. Nothing changes if there is no room.
    fn push_with(
        &mut self,
        class: Class,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), Full> {
        let (region, rel, wraps) = self.place(class, len).ok_or(Full)?;
        let abs = self.regions[region].base + rel;
        if len != 0 {
            fill(&mut self.arena.bytes_mut()[abs..abs + len]);
            self.dirty_end = self.dirty_end.max(abs + len);
        }
        self.regions[region].occupy(rel, len, wraps);
        let idx = (self.first + self.count) % N;
        // `place` bounds both by u32::MAX (the arena is at most that big).
        self.slots[idx] = Slot {
            off: abs as u32,
            len: len as u32,
            class,
            region: region as u8,
        };
        self.count += 1;
        self.bytes += len;
        if class == Class::Agent {
            self.agent_count += 1;
            self.agent_bytes += len;
        }
        Ok(())
    }

    /// Stores one already-encoded `EncodedRecord`; when there is no room it
    /// is handed back.
    pub fn push_encoded<'r>(
        &mut self,
        class: Class,
        record: &'r [u8],
    ) -> Result<(), (Full, &'r [u8])> {
        self.push_with(class, record.len(), |dst| dst.copy_from_slice(record))
            .map_err(|f| (f, record))
    }

    /// Encodes `EncodedRecord { data_type, timestamp, data: payload }`
    /// straight into the arena.
    pub fn push_record(
        &mut self,
        class: Class,
        data_type: i32,
        timestamp: i64,
        payload: &[u8],
    ) -> Result<(), Full> {
        let len = frame::encoded_record_len(data_type, timestamp, payload.len());
        self.push_with(class, len, |dst| {
            let mut w = Writer::new(dst);
            // `dst` is exactly `len` bytes, the size of this encoding.
            let _ = frame::write_record_header(&mut w, data_type, timestamp, payload.len())
                .and_then(|()| w.bytes(payload));
        })
    }

    /// Stores a decoded plugin frame (its body as-is when canonical, else
    /// re-encoded canonically).
    pub fn push_frame(&mut self, class: Class, rec: &RecordRef<'_>) -> Result<(), Full> {
        let len = rec.encoded_len();
        self.push_with(class, len, |dst| {
            // `dst` is exactly `encoded_len()` bytes.
            let _ = rec.try_encode_to(dst);
        })
    }

    /// Arena bytes written since the last [`Ring::take_idle_arena`] (an
    /// upper bound: everything below the highest byte written).
    pub fn dirty_bytes(&self) -> usize {
        self.dirty_end
    }

    /// When the ring is empty (no record stored, no batch open) and at
    /// least `min` arena bytes were written since the last call: those
    /// bytes, so the caller can hand their memory back to the OS (e.g.
    /// `madvise(MADV_DONTNEED)`) after a burst. The ring never reads arena
    /// bytes it has not written since, so what they hold afterwards does not
    /// matter. Resets the count; `None` otherwise (nothing changes).
    pub fn take_idle_arena(&mut self, min: usize) -> Option<&mut [u8]> {
        if self.count != 0 || self.batch_open || self.dirty_end < min.max(1) {
            return None;
        }
        let end = self.dirty_end;
        self.dirty_end = 0;
        Some(&mut self.arena.bytes_mut()[..end])
    }

    fn slot(&self, i: usize) -> &Slot {
        &self.slots[(self.first + i) % N]
    }

    fn record(&self, s: &Slot) -> &[u8] {
        let off = s.off as usize;
        &self.arena.bytes()[off..off + s.len as usize]
    }

    /// Marks up to `max_records` records / `max_bytes` bytes (as they will
    /// appear inside `PackagedData`: key + length varint + record) at the
    /// head as in flight. The first record is always included, even if it
    /// alone exceeds `max_bytes`, so an oversized record cannot wedge the
    /// ring. `None` when empty, `max_records` is 0, or a batch is open.
    pub fn begin_batch(&mut self, max_records: usize, max_bytes: usize) -> Option<Batch> {
        if self.batch_open || self.count == 0 || max_records == 0 {
            return None;
        }
        let mut records = 0;
        let mut bytes: usize = 0;
        while records < self.count.min(max_records) {
            let entry = record_entry_len(self.slot(records).len as usize);
            if records > 0 && bytes.saturating_add(entry) > max_bytes {
                break;
            }
            bytes += entry;
            records += 1;
        }
        self.generation = self.generation.wrapping_add(1);
        self.batch_open = true;
        self.in_flight = records;
        Some(Batch {
            records,
            bytes,
            generation: self.generation,
        })
    }

    fn owns(&self, b: &Batch) -> bool {
        self.batch_open && b.generation == self.generation && b.records == self.in_flight
    }

    /// The encoded records of `b`, oldest first. Empty if `b` is not this
    /// ring's open batch.
    pub fn batch_records(&self, b: &Batch) -> BatchRecords<'_, N> {
        BatchRecords {
            ring: self,
            next: 0,
            end: if self.owns(b) { b.records } else { 0 },
        }
    }

    /// The batch was sent: frees its records. A batch that is not this
    /// ring's open batch is ignored.
    pub fn commit(&mut self, b: Batch) {
        if !self.owns(&b) {
            return;
        }
        for _ in 0..b.records {
            let s = self.slots[self.first];
            let region = &mut self.regions[usize::from(s.region)];
            region.free(s.off as usize - region.base, s.len as usize);
            self.bytes -= s.len as usize;
            if s.class == Class::Agent {
                self.agent_count -= 1;
                self.agent_bytes -= s.len as usize;
            }
            self.first = (self.first + 1) % N;
            self.count -= 1;
        }
        self.batch_open = false;
        self.in_flight = 0;
    }

    /// The batch failed: its records stay at the head, in order, for the
    /// next batch. A batch that is not this ring's open batch is ignored.
    pub fn rollback(&mut self, b: Batch) {
        if self.owns(&b) {
            self.batch_open = false;
            self.in_flight = 0;
        }
    }
}

/// Iterator over a batch's encoded records, oldest first; cloneable so a
/// caller can size a packet ([`crate::packet::packet_len`]) then encode it.
#[derive(Debug, Clone)]
pub struct BatchRecords<'a, const N: usize> {
    ring: &'a Ring<N>,
    next: usize,
    end: usize,
}

impl<'a, const N: usize> Iterator for BatchRecords<'a, N> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.next >= self.end {
            return None;
        }
        let ring = self.ring;
        let rec = ring.record(ring.slot(self.next));
        self.next += 1;
        Some(rec)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.end - self.next;
        (n, Some(n))
    }
}

impl<const N: usize> ExactSizeIterator for BatchRecords<'_, N> {}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn cfg(budget: usize, rec: usize, bytes: usize) -> RingConfig {
        RingConfig {
            byte_budget: budget,
            agent_reserved_records: rec,
            agent_reserved_bytes: bytes,
        }
    }

    fn all<const N: usize>(r: &mut Ring<N>) -> Vec<Vec<u8>> {
        let Some(b) = r.begin_batch(usize::MAX, usize::MAX) else {
            return Vec::new();
        };
        let v = r.batch_records(&b).map(<[u8]>::to_vec).collect();
        r.rollback(b);
        v
    }

    #[test]
    fn push_drain_commit_rollback() {
        let mut r: Ring<8> = Ring::new(cfg(1024, 0, 0));
        assert!(r.is_empty());
        assert!(r.begin_batch(10, 100).is_none());
        r.push_encoded(Class::Plugin, &[1; 10]).unwrap();
        r.push_encoded(Class::Plugin, &[2; 20]).unwrap();
        r.push_encoded(Class::Agent, &[3; 30]).unwrap();
        assert_eq!((r.len(), r.bytes()), (3, 60));
        assert_eq!((r.len_of(Class::Agent), r.bytes_of(Class::Agent)), (1, 30));

        // 12 + 22 = 34 bytes fit in 40, the third (32) does not.
        let b = r.begin_batch(10, 40).unwrap();
        assert_eq!((b.len(), b.encoded_bytes()), (2, 34));
        assert!(r.begin_batch(10, 40).is_none(), "one batch at a time");
        r.push_encoded(Class::Plugin, &[4; 5]).unwrap();
        r.rollback(b);
        assert_eq!(r.in_flight(), 0);
        assert_eq!(all(&mut r), [&[1u8; 10][..], &[2; 20], &[3; 30], &[4; 5]]);

        let b = r.begin_batch(1, usize::MAX).unwrap();
        assert_eq!(r.batch_records(&b).collect::<Vec<_>>(), [&[1u8; 10][..]]);
        r.commit(b);
        assert_eq!((r.len(), r.bytes()), (3, 55));
        let b = r.begin_batch(10, usize::MAX).unwrap();
        assert_eq!(b.len(), 3);
        r.commit(b);
        assert!(r.is_empty());
        assert_eq!(
            (r.bytes(), r.len_of(Class::Agent), r.bytes_of(Class::Agent)),
            (0, 0, 0)
        );
    }

    /// The arena bytes a burst wrote are offered back only once the ring
    /// is empty, at most once per burst, and overwriting them afterwards
    /// (what `MADV_DONTNEED` does: zeros) does not disturb later records.
    #[test]
    fn idle_arena_is_offered_after_a_burst_once_empty() {
        let mut r: Ring<64> = Ring::new(cfg(4096, 2, 512));
        assert!(r.take_idle_arena(1).is_none(), "nothing written yet");
        for i in 0..20u8 {
            r.push_encoded(Class::Plugin, &[i; 100]).unwrap();
        }
        r.push_encoded(Class::Agent, &[99; 10]).unwrap();
        assert_eq!(r.dirty_bytes(), 2010);
        assert!(r.take_idle_arena(1).is_none(), "records stored");
        let b = r.begin_batch(usize::MAX, usize::MAX).unwrap();
        assert!(r.take_idle_arena(1).is_none(), "batch open");
        r.commit(b);
        assert!(r.take_idle_arena(4096).is_none(), "below the minimum");
        let idle = r.take_idle_arena(1024).unwrap();
        assert_eq!(idle.len(), 2010);
        idle.fill(0xee);
        assert_eq!(r.dirty_bytes(), 0);
        assert!(r.take_idle_arena(1).is_none(), "offered once");
        // The ring refills from the start of its regions; contents intact.
        r.push_encoded(Class::Plugin, &[1; 30]).unwrap();
        r.push_encoded(Class::Agent, &[2; 3]).unwrap();
        assert_eq!(all(&mut r), [&[1u8; 30][..], &[2; 3]]);
        assert_eq!(r.dirty_bytes(), 33);
        // A record in the reserve region counts up to its end.
        for _ in 0..35 {
            r.push_encoded(Class::Plugin, &[3; 100]).unwrap();
        }
        r.push_encoded(Class::Agent, &[4; 200]).unwrap();
        assert_eq!(r.dirty_bytes(), 3584 + 200);
    }

    #[test]
    fn oversized_first_record_still_drains() {
        let mut r: Ring<4> = Ring::new(cfg(1024, 0, 0));
        r.push_encoded(Class::Plugin, &[7; 200]).unwrap();
        let b = r.begin_batch(10, 50).unwrap();
        assert_eq!((b.len(), b.encoded_bytes()), (1, 203));
        r.commit(b);
        assert!(r.is_empty());
    }

    #[test]
    fn full_hands_the_record_back() {
        let mut r: Ring<2> = Ring::new(cfg(100, 0, 0));
        r.push_encoded(Class::Plugin, &[1]).unwrap();
        r.push_encoded(Class::Plugin, &[2]).unwrap();
        assert_eq!(r.push_encoded(Class::Plugin, &[3]), Err((Full, &[3u8][..])));
        let mut r: Ring<8> = Ring::new(cfg(100, 0, 0));
        assert_eq!(r.max_record_len(Class::Plugin), 100);
        assert!(!r.has_room(Class::Plugin, 101));
        assert!(r.push_encoded(Class::Plugin, &[0; 101]).is_err());
        r.push_encoded(Class::Plugin, &[0; 100]).unwrap();
        assert!(!r.has_room(Class::Plugin, 1));
        // Zero-length records take a slot, no bytes.
        assert!(r.has_room(Class::Plugin, 0));
        r.push_encoded(Class::Plugin, &[]).unwrap();
    }

    #[test]
    fn wraps_without_splitting_records() {
        let mut r: Ring<16> = Ring::new(cfg(100, 0, 0));
        for i in 0..3u8 {
            r.push_encoded(Class::Plugin, &[i; 30]).unwrap(); // [0,90)
        }
        // 20 bytes do not fit at the tail (90..100) nor at the start.
        assert!(!r.has_room(Class::Plugin, 20));
        let b = r.begin_batch(1, usize::MAX).unwrap();
        r.commit(b); // frees [0,30)
        // Still no 31 bytes anywhere, but 30 fit at the start.
        assert!(!r.has_room(Class::Plugin, 31));
        assert!(r.has_room(Class::Plugin, 30));
        r.push_encoded(Class::Plugin, &[3; 25]).unwrap(); // wraps to [0,25)
        assert!(r.has_room(Class::Plugin, 5));
        assert!(!r.has_room(Class::Plugin, 6));
        r.push_encoded(Class::Plugin, &[4; 5]).unwrap(); // [25,30)
        assert!(!r.has_room(Class::Plugin, 1));
        assert_eq!(r.bytes(), 90);
        let b = r.begin_batch(2, usize::MAX).unwrap();
        r.commit(b); // frees the upper records; head moves to 0
        assert!(r.has_room(Class::Plugin, 70));
        assert!(!r.has_room(Class::Plugin, 71));
        r.push_encoded(Class::Plugin, &[5; 70]).unwrap();
        assert_eq!(all(&mut r), [&[3u8; 25][..], &[4; 5], &[5; 70]]);
    }

    #[test]
    fn plugin_flood_cannot_starve_agent_records() {
        let mut r: Ring<8> = Ring::new(cfg(1000, 2, 100));
        assert_eq!(r.max_record_len(Class::Plugin), 900);
        assert_eq!(r.max_record_len(Class::Agent), 900);
        let mut n = 0;
        while r.push_encoded(Class::Plugin, &[1; 10]).is_ok() {
            n += 1;
        }
        assert_eq!(n, 6, "two slots held back");
        r.push_encoded(Class::Agent, &[2; 10]).unwrap();
        // One agent record stored: only one slot is still held back.
        assert!(!r.has_room(Class::Plugin, 1));
        r.push_encoded(Class::Agent, &[3; 10]).unwrap();
        assert!(!r.has_room(Class::Agent, 0), "all 8 slots used");

        // Bytes: fill the main region with plugin records, then agent
        // records go to the reserve.
        let mut r: Ring<8> = Ring::new(cfg(1000, 2, 100));
        for _ in 0..3 {
            r.push_encoded(Class::Plugin, &[1; 300]).unwrap();
        }
        assert!(!r.has_room(Class::Plugin, 1));
        r.push_encoded(Class::Agent, &[2; 60]).unwrap();
        assert!(r.has_room(Class::Agent, 40));
        assert!(!r.has_room(Class::Agent, 41));
        r.push_encoded(Class::Agent, &[3; 40]).unwrap();
        assert_eq!(r.bytes(), 1000);
        assert_eq!(all(&mut r)[3..], [&[2u8; 60][..], &[3; 40]]);
        // Freeing everything returns both regions to empty.
        let b = r.begin_batch(8, usize::MAX).unwrap();
        r.commit(b);
        assert!(r.has_room(Class::Plugin, 900) && r.has_room(Class::Agent, 900));
    }

    #[test]
    fn stale_batches_are_ignored() {
        let mut r: Ring<4> = Ring::new(cfg(100, 0, 0));
        r.push_encoded(Class::Plugin, &[1]).unwrap();
        let b = r.begin_batch(4, 100).unwrap();
        let stale = Batch {
            records: b.records,
            bytes: b.bytes,
            generation: b.generation,
        };
        r.commit(b);
        r.push_encoded(Class::Plugin, &[2]).unwrap();
        assert_eq!(r.batch_records(&stale).count(), 0);
        r.commit(stale);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn push_record_and_frame_write_canonical_bytes() {
        let mut r: Ring<4> = Ring::new(cfg(1024, 1, 64));
        let payload = [0x0a, 0x06, 0x0a, 0x01, 0x61, 0x12, 0x01, 0x62];
        r.push_record(Class::Agent, 1000, 300, &payload).unwrap();
        r.push_record(Class::Agent, 0, 0, &[]).unwrap();
        // Out-of-order body: stored re-encoded.
        let body = [0x10, 0xac, 0x02, 0x08, 0xe8, 0x07];
        let rec = frame::decode_record(&body).unwrap();
        r.push_frame(Class::Plugin, &rec).unwrap();
        let got = all(&mut r);
        assert_eq!(
            got[0],
            [
                0x08, 0xe8, 0x07, 0x10, 0xac, 0x02, 0x1a, 0x08, 0x0a, 0x06, 0x0a, 0x01, 0x61, 0x12,
                0x01, 0x62
            ]
        );
        assert!(got[1].is_empty());
        assert_eq!(got[2], [0x08, 0xe8, 0x07, 0x10, 0xac, 0x02]);
    }

    #[test]
    fn borrowed_storage() {
        static mut STORAGE: [u8; 64] = [0; 64];
        // SAFETY: this test is the only user of STORAGE.
        let storage: &'static mut [u8] = unsafe { &mut *core::ptr::addr_of_mut!(STORAGE) };
        let mut r: Ring<4> = Ring::with_storage(RingConfig::default(), storage);
        assert_eq!(r.max_record_len(Class::Agent), 64);
        assert_eq!(r.max_record_len(Class::Plugin), 0);
        r.push_encoded(Class::Agent, &[9; 64]).unwrap();
        assert_eq!(all(&mut r), [&[9u8; 64][..]]);
    }
}
