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
            drops: Cell::new(0),
            high_water_bytes,
            high_water_records: RING_SLOTS / 2,
        })
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
}
