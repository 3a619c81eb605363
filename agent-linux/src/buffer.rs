//! The agent's record buffer: the core ring (2048 slots + a byte budget)
//! behind a `RefCell`, with wake-ups for the sender (data) and for plugin
//! readers waiting on back-pressure (space), plus the drop counter.
//!
//! Everything runs on one thread (`current_thread` runtime + `LocalSet`), so
//! the buffer is shared as `Rc<Buffer>`; no borrow is ever held across an
//! `.await`.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use elkeid_core::frame::RecordRef;
use elkeid_core::ring::{Batch, Class, Full, Ring, RingConfig};
use tokio::sync::Notify;

/// Slot count of the ring (Elkeid's buffer size).
pub(crate) const RING_SLOTS: usize = 2048;

/// The shared record buffer.
pub(crate) struct Buffer {
    ring: RefCell<Ring<RING_SLOTS>>,
    /// Woken after a commit: space may have been freed.
    space: Notify,
    /// Woken when the ring passes the high-water mark: send now.
    data: Notify,
    /// Woken by producers that want their records sent at once (a
    /// heartbeat, a 5100, shutdown).
    kick: Notify,
    /// Agent records dropped because even the reserve was full.
    drops: Cell<u64>,
    /// Byte level at which the sender is woken early.
    high_water_bytes: usize,
    /// Record count at which the sender is woken early.
    high_water_records: usize,
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len())
            .field("bytes", &self.bytes())
            .field("drops", &self.drops.get())
            .finish_non_exhaustive()
    }
}

impl Buffer {
    /// A buffer with the given ring configuration; the high-water mark is
    /// half of the slots or a quarter of the byte budget.
    pub(crate) fn new(cfg: RingConfig) -> Rc<Buffer> {
        let high_water_bytes = (cfg.byte_budget / 4).max(1);
        Rc::new(Buffer {
            ring: RefCell::new(Ring::new(cfg)),
            space: Notify::new(),
            data: Notify::new(),
            kick: Notify::new(),
            drops: Cell::new(0),
            high_water_bytes,
            high_water_records: RING_SLOTS / 2,
        })
    }

    /// The largest plugin frame body this ring can ever hold: the frame cap
    /// (at most `DEFAULT_MAX_FRAME_LEN`), so that a record which passed the
    /// frame decoder always fits an emptied ring. Without this, a `ring_bytes`
    /// below the 4 MiB frame cap let a large record pass the decoder, never
    /// fit the ring, and restart its plugin at every re-send.
    pub(crate) fn max_plugin_frame(&self) -> u32 {
        let ring = self.ring.borrow().max_record_len(Class::Plugin);
        // The stored EncodedRecord re-encodes the frame's Record header
        // (tag, varint data_type, varint timestamp, length): at most 32 bytes more.
        let fits = ring.saturating_sub(32);
        u32::try_from(fits)
            .unwrap_or(u32::MAX)
            .min(elkeid_core::frame::DEFAULT_MAX_FRAME_LEN)
    }

    /// Plugin record (`Class::Plugin`). `Err` means the ring is full for the
    /// plugin class: the caller waits on [`Buffer::space`] and retries
    /// (back-pressure: it stops reading the pipe meanwhile). Never drops.
    pub(crate) fn push_frame(&self, rec: &RecordRef<'_>) -> Result<(), Full> {
        let r = self.ring.borrow_mut().push_frame(Class::Plugin, rec);
        if r.is_ok() {
            self.after_push();
        }
        r
    }

    /// Agent-generated record (heartbeat 1000/1001, 1010 logs, 5100 results):
    /// uses the reserve; if even that is full, the record is dropped and
    /// counted in `drop_cnt`. Returns whether it was stored.
    pub(crate) fn push_agent(&self, data_type: i32, timestamp: i64, payload: &[u8]) -> bool {
        let r = self
            .ring
            .borrow_mut()
            .push_record(Class::Agent, data_type, timestamp, payload);
        match r {
            Ok(()) => {
                self.after_push();
                true
            }
            Err(Full) => {
                self.drops.set(self.drops.get().saturating_add(1));
                false
            }
        }
    }

    fn after_push(&self) {
        let ring = self.ring.borrow();
        if ring.len() >= self.high_water_records || ring.bytes() >= self.high_water_bytes {
            self.data.notify_one();
        }
    }

    /// Resolves when space may have been freed (after a commit).
    pub(crate) async fn space(&self) {
        self.space.notified().await;
    }

    /// Resolves when the ring passed the high-water mark since the last call.
    pub(crate) async fn high_water(&self) {
        self.data.notified().await;
    }

    /// Asks the sender to ship what is buffered now.
    pub(crate) fn kick(&self) {
        self.kick.notify_one();
    }

    /// Resolves after [`Buffer::kick`] (one permit is stored).
    pub(crate) async fn kicked(&self) {
        self.kick.notified().await;
    }

    /// Agent records dropped so far.
    pub(crate) fn drops(&self) -> u64 {
        self.drops.get()
    }

    /// Records in the ring (including an in-flight batch).
    pub(crate) fn len(&self) -> usize {
        self.ring.borrow().len()
    }

    /// True when no record is buffered.
    pub(crate) fn is_empty(&self) -> bool {
        self.ring.borrow().is_empty()
    }

    /// Encoded bytes in the ring (including an in-flight batch).
    pub(crate) fn bytes(&self) -> usize {
        self.ring.borrow().bytes()
    }

    /// Marks up to `max_records` / `max_bytes` at the head as in flight and
    /// appends the `PackagedData` (records + pre-encoded `meta`) to `out`.
    /// `None` when the ring is empty (or a batch is already in flight).
    pub(crate) fn begin_packet(
        &self,
        max_records: usize,
        max_bytes: usize,
        meta: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<(Batch, usize)> {
        let mut ring = self.ring.borrow_mut();
        let batch = ring.begin_batch(max_records, max_bytes)?;
        let n = ring.batch_records(&batch).count();
        elkeid_core::packet::encode_packet_vec(ring.batch_records(&batch), meta, out);
        Some((batch, n))
    }

    /// The batch was sent: free its space and wake waiting plugin readers.
    pub(crate) fn commit(&self, batch: Batch) {
        self.ring.borrow_mut().commit(batch);
        self.space.notify_waiters();
    }

    /// The batch failed: its records stay at the head, in order.
    pub(crate) fn rollback(&self, batch: Batch) {
        self.ring.borrow_mut().rollback(batch);
    }

    /// Once the ring is empty after a burst (at least `min` arena bytes
    /// written since the last release), hands the arena pages that burst
    /// touched back to the kernel, so the agent's RSS returns to its idle
    /// level instead of keeping the whole ring resident until the next
    /// flood. Returns the bytes released (0: nothing to do).
    pub(crate) fn release_idle_pages(&self, min: usize) -> usize {
        let mut ring = self.ring.borrow_mut();
        ring.take_idle_arena(min).map_or(0, discard_pages)
    }
}

/// Smallest burst whose arena pages are released: one page. The release
/// runs once per idle period (the ring empty for about a second), so even a
/// heartbeat's few records are worth the one `madvise`: an idle agent keeps
/// no ring page resident between bursts.
pub(crate) const RELEASE_MIN_BYTES: usize = 4096;

/// `madvise(MADV_DONTNEED)` on the whole pages inside `bytes`: their
/// memory goes back to the kernel and reads as zeros (or the file's
/// contents for a file-backed mapping) when touched again. Returns the
/// bytes advised (0 on failure: the pages simply stay).
#[allow(unsafe_code)]
fn discard_pages(bytes: &mut [u8]) -> usize {
    let page = crate::procstat::page_size();
    if !page.is_power_of_two() {
        return 0;
    }
    let start = bytes.as_mut_ptr() as usize;
    let first = start.next_multiple_of(page);
    let end = (start + bytes.len()) & !(page - 1);
    if end <= first {
        return 0;
    }
    let len = end - first;
    // SAFETY: [first, end) lies inside `bytes`, to which we hold the only
    // (mutable) reference, and is page-aligned. The memory is private
    // (heap or static), so MADV_DONTNEED only replaces its contents with
    // zero-fill (or file) pages on the next touch: any byte value is valid
    // for `u8`, and the ring never reads arena bytes it has not written
    // since (`Ring::take_idle_arena`). No allocator metadata is in range.
    let r = unsafe { libc::madvise(first as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if r == 0 { len } else { 0 }
}

/// Pushes a 5100 task-failure record (`token`, `msg`, `status: failed`)
/// and wakes the sender.
pub(crate) fn task_failed(buffer: &Buffer, token: &str, msg: &str) {
    tracing::warn!(token, msg, "task failed");
    let mut p = elkeid_core::payload::PayloadBuf::new();
    p.field("token", token)
        .field("msg", msg)
        .field("status", "failed");
    buffer.push_agent(
        elkeid_core::schema::data_type::TASK_RESULT,
        crate::clock::now_unix(),
        p.as_bytes(),
    );
    buffer.kick();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_cap_follows_a_small_ring() {
        let small = Buffer::new(RingConfig {
            byte_budget: 2 * 1024 * 1024,
            ..Default::default()
        });
        let cap = small.max_plugin_frame();
        assert!(cap < elkeid_core::frame::DEFAULT_MAX_FRAME_LEN, "{cap}");
        // A record of exactly the cap fits the empty ring; the default ring keeps 4 MiB.
        let body = vec![b'x'; cap as usize - 16];
        let mut rec = Vec::new();
        rec.extend_from_slice(&[0x08, 0x01, 0x10, 0x01, 0x1a]);
        let mut n = body.len();
        while n >= 0x80 {
            rec.push((n as u8) | 0x80);
            n >>= 7;
        }
        rec.push(n as u8);
        rec.extend_from_slice(&body);
        assert!(rec.len() <= cap as usize);
        let r = elkeid_core::frame::decode_record(&rec).unwrap();
        assert!(small.push_frame(&r).is_ok(), "a record under the cap fits");
        let big = Buffer::new(RingConfig::default());
        assert_eq!(
            big.max_plugin_frame(),
            elkeid_core::frame::DEFAULT_MAX_FRAME_LEN
        );
    }
    use elkeid_proto::grpc::PackagedData;
    use prost::Message;

    fn small() -> RingConfig {
        RingConfig {
            byte_budget: 64 * 1024,
            agent_reserved_records: 4,
            agent_reserved_bytes: 8 * 1024,
        }
    }

    /// A plugin frame body: Record{data_type, timestamp, data: Payload{k: v}}.
    fn frame_body(dt: u8, v: &[u8]) -> Vec<u8> {
        let mut entry = vec![0x0a, 1, b'k', 0x12, v.len() as u8];
        entry.extend_from_slice(v);
        let mut payload = vec![0x0a, entry.len() as u8];
        payload.extend(entry);
        let mut body = vec![0x08, dt, 0x10, 0x01, 0x1a, payload.len() as u8];
        body.extend(payload);
        body
    }

    #[test]
    fn packet_decodes_as_packaged_data_in_order() {
        let b = Buffer::new(small());
        let body = frame_body(7, b"plugin");
        let rec = elkeid_core::frame::decode_record(&body).unwrap();
        b.push_frame(&rec).unwrap();
        assert!(b.push_agent(1000, 5, b"\x0a\x06\x0a\x01a\x12\x01b"));
        assert_eq!(b.len(), 2);
        let mut out = Vec::new();
        let (batch, n) = b
            .begin_packet(RING_SLOTS, 1 << 20, b"\x12\x02id", &mut out)
            .unwrap();
        assert_eq!(n, 2);
        let p = PackagedData::decode(&out[..]).unwrap();
        assert_eq!(p.agent_id, "id");
        assert_eq!(p.records.len(), 2);
        assert_eq!((p.records[0].data_type, p.records[0].timestamp), (7, 1));
        assert_eq!((p.records[1].data_type, p.records[1].timestamp), (1000, 5));
        // A failed send keeps the records, in order.
        b.rollback(batch);
        assert_eq!(b.len(), 2);
        out.clear();
        let (batch, _) = b.begin_packet(RING_SLOTS, 1 << 20, b"", &mut out).unwrap();
        assert_eq!(
            PackagedData::decode(&out[..]).unwrap().records[0].data_type,
            7
        );
        b.commit(batch);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn plugin_records_get_back_pressure_agent_records_the_reserve_then_count_drops() {
        let b = Buffer::new(small());
        let body = frame_body(9, &[b'x'; 100]);
        let rec = elkeid_core::frame::decode_record(&body).unwrap();
        let mut pushed = 0;
        while b.push_frame(&rec).is_ok() {
            pushed += 1;
            assert!(pushed < 10_000);
        }
        assert!(pushed > 0);
        assert_eq!(
            b.drops(),
            0,
            "plugin records are never dropped, the caller waits"
        );
        // Agent records still fit in the reserve ...
        assert!(b.push_agent(1000, 1, &[b'y'; 64]));
        // ... until even the reserve is full: then they are counted.
        let mut stored = 1;
        while b.push_agent(1000, 1, &[b'y'; 64]) {
            stored += 1;
            assert!(stored < 10_000);
        }
        assert_eq!(b.drops(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn commit_wakes_space_waiters_and_high_water_wakes_sender() {
        let b = Buffer::new(small());
        let body = frame_body(9, &[b'x'; 100]);
        let rec = elkeid_core::frame::decode_record(&body).unwrap();
        while b.push_frame(&rec).is_ok() {}
        // The ring is past its high-water mark: the sender was woken.
        tokio::time::timeout(std::time::Duration::from_secs(1), b.high_water())
            .await
            .unwrap();
        let waiter = b.space();
        tokio::pin!(waiter);
        let early = tokio::time::timeout(std::time::Duration::from_millis(10), &mut waiter).await;
        assert!(early.is_err(), "no space was freed yet");
        let mut out = Vec::new();
        let (batch, _) = b.begin_packet(RING_SLOTS, 1 << 20, b"", &mut out).unwrap();
        b.commit(batch);
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap();
        assert!(b.push_frame(&rec).is_ok());
    }
}
