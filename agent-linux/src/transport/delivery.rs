//! Acknowledged delivery, agent side: the unacknowledged window
//! (`elkeid_core::ack::AckWindow`) and the disk spool, owned by the
//! transport task. The decisions (what to re-send, whether the center
//! acknowledges, whether it stalled) are `core`'s; this file feeds it
//! packets, times and acknowledgements, and moves packets to and from the
//! spool.
//!
//! Order is what makes cumulative acks sound: within an epoch packets go
//! out strictly in sequence. A new packet from the ring enters the window
//! only while the spool is empty; otherwise it is appended to the spool and
//! the window is fed from the spool's front.

use std::cell::{Cell, RefCell};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use elkeid_core::ack::{self, AckWindow, Mode, PacketId, Timing};
use elkeid_proto::grpc::Command;

use crate::config::SpoolFull;
pub(crate) use crate::delivery_stats::DeliveryStats;
use crate::spool::Spool;

/// A connection that sent packets and got no acknowledgement at all within
/// this long talks to a center without the extension (Elkeid's).
pub(crate) const DETECT: Duration = Duration::from_secs(5);

/// The agent's delivery state; see the module docs.
#[derive(Debug)]
pub(crate) struct Delivery {
    window: RefCell<AckWindow<Bytes>>,
    spool: RefCell<Option<Spool>>,
    /// A packet taken from the spool that did not fit the window yet (it
    /// goes before anything else from the spool).
    stash: RefCell<Option<(PacketId, Bytes)>>,
    start: Instant,
    /// Packets appended to the spool since start.
    spooled: Cell<u64>,
    /// Packets the spool refused (full / I/O error) and that stayed in the
    /// ring (back-pressure) — not lost.
    spool_refused: Cell<u64>,
    /// Policy when the spool is full.
    spool_full: SpoolFull,
    /// Packets / records dropped from a full spool (`SpoolFull::DropOldest`).
    spool_dropped_packets: Cell<u64>,
    spool_dropped_records: Cell<u64>,
    /// Kicked when an acknowledgement released packets.
    pub(crate) acked: tokio::sync::Notify,
}

/// A random non-zero boot epoch.
pub(crate) fn new_epoch() -> u64 {
    let mut b = [0u8; 8];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok();
    let mut e = u64::from_le_bytes(b);
    if !ok || e == 0 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        e = t ^ (u64::from(std::process::id()) << 32) | 1;
    }
    e
}

impl Delivery {
    /// A window of `unacked_bytes` with `failover` as the stall bound, and
    /// the spool in `spool_dir` when `spool_max_bytes` > 0 (`spool_full`:
    /// what to do when it is full).
    pub(crate) fn new(
        unacked_bytes: usize,
        failover: Duration,
        spool_dir: &Path,
        spool_max_bytes: u64,
        spool_full: SpoolFull,
    ) -> Delivery {
        let timing = Timing {
            detect_ms: DETECT.as_millis() as u64,
            // two thirds of the bound: room left to dial the next center
            stall_ms: (failover.as_millis() as u64 * 2 / 3).max(1000),
        };
        let spool = if spool_max_bytes == 0 {
            None
        } else {
            match Spool::open(spool_dir, spool_max_bytes) {
                Ok(s) => {
                    let st = s.stats();
                    if st.entries > 0 || st.corrupt > 0 {
                        tracing::info!(dir = %spool_dir.display(), entries = st.entries, bytes = st.bytes, corrupt = st.corrupt, "spool holds packets from a previous run; replaying them first");
                    }
                    Some(s)
                }
                Err(error) => {
                    tracing::error!(dir = %spool_dir.display(), %error, "disk spool unusable: running without it");
                    None
                }
            }
        };
        Delivery {
            window: RefCell::new(AckWindow::new(new_epoch(), unacked_bytes, timing)),
            spool: RefCell::new(spool),
            stash: RefCell::new(None),
            start: Instant::now(),
            spooled: Cell::new(0),
            spool_refused: Cell::new(0),
            spool_full,
            spool_dropped_packets: Cell::new(0),
            spool_dropped_records: Cell::new(0),
            acked: tokio::sync::Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Counters for the heartbeat.
    pub(crate) fn stats(&self) -> DeliveryStats {
        let w = self.window.borrow();
        DeliveryStats {
            unacked_packets: w.len(),
            unacked_bytes: w.bytes(),
            resent_packets: w.resent(),
            acked_packets: w.acked(),
            mode: match w.mode() {
                Mode::Acking => "acking",
                Mode::NonAcking => "none",
                Mode::Unknown => "unknown",
            },
            spool: self
                .spool
                .borrow()
                .as_ref()
                .map(Spool::stats)
                .unwrap_or_default(),
            spooled: self.spooled.get(),
            spool_refused: self.spool_refused.get(),
            spool_dropped_packets: self.spool_dropped_packets.get(),
            spool_dropped_records: self.spool_dropped_records.get(),
            spool_full: self.spool_full.as_str(),
        }
    }

    /// Handles the acknowledgement fields of a received Command; returns
    /// `true` when the Command was ack-only (nothing else to do with it:
    /// never a config sync).
    pub(crate) fn on_command(&self, cmd: &Command) -> bool {
        if cmd.ack_epoch == 0 {
            return false;
        }
        let id = PacketId {
            epoch: cmd.ack_epoch,
            seq: cmd.ack_seq,
        };
        let n = self.window.borrow_mut().ack(id, self.now());
        if n > 0 {
            self.acked.notify_one();
        }
        cmd.task.is_none() && cmd.configs.is_empty()
    }

    /// A new connection: re-send everything unacknowledged, in order.
    pub(crate) fn rewind(&self) {
        self.window.borrow_mut().rewind();
    }

    /// Re-evaluates the center's support; `true` when it is stalled
    /// (acknowledgements stopped advancing while packets wait).
    pub(crate) fn poll(&self) -> bool {
        let now = self.now();
        let mut w = self.window.borrow_mut();
        let released = w.poll(now);
        if released > 0 {
            tracing::info!(
                released,
                "center does not acknowledge (no ack within 5 s): Elkeid protocol, packets released once sent"
            );
        }
        w.stalled(now)
    }

    /// The next packet to (re)send on this connection.
    pub(crate) fn next_to_send(&self) -> Option<(PacketId, Bytes)> {
        self.window
            .borrow()
            .next_to_send()
            .map(|(id, p)| (id, p.clone()))
    }

    /// The packet `id` from [`Delivery::next_to_send`] went out (an
    /// acknowledgement that arrived meanwhile may have released it: see
    /// `AckWindow::sent`).
    pub(crate) fn sent(&self, id: PacketId) {
        let now = self.now();
        let _ = self.window.borrow_mut().sent(id, now);
    }

    /// Whether a new packet of up to `len` bytes can be taken from the ring
    /// into the window (the spool, if any, is empty and the window has room).
    pub(crate) fn can_take(&self, len: usize) -> bool {
        self.spool_empty() && self.window.borrow().has_room(len)
    }

    fn spool_empty(&self) -> bool {
        self.stash.borrow().is_none() && self.spool.borrow().as_ref().is_none_or(Spool::is_empty)
    }

    /// Whether a spool is configured.
    pub(crate) fn has_spool(&self) -> bool {
        self.spool.borrow().is_some()
    }

    /// The identity the next new packet gets: encode it into the packet
    /// (after the host metadata) with [`stamp`].
    pub(crate) fn next_id(&self) -> PacketId {
        self.window.borrow().next_id()
    }

    /// Adds a stamped new packet to the window (its identity is
    /// [`Delivery::next_id`]); hands it back when the window is full.
    pub(crate) fn push(&self, packet: Bytes) -> Result<(), Bytes> {
        let len = packet.len();
        self.window
            .borrow_mut()
            .push(len, packet)
            .map(|_| ())
            .map_err(|(_, p)| p)
    }

    /// Moves spooled packets into the window while it has room; returns how
    /// many.
    pub(crate) fn refill_from_spool(&self) -> usize {
        let mut n = 0;
        let stashed = self.stash.borrow_mut().take();
        if let Some((id, p)) = stashed {
            let len = p.len();
            if let Err((_, p)) = self.window.borrow_mut().push_with_id(id, len, p) {
                *self.stash.borrow_mut() = Some((id, p));
                return 0;
            }
            n += 1;
        }
        let mut spool = self.spool.borrow_mut();
        let Some(s) = spool.as_mut() else { return n };
        loop {
            if !self
                .window
                .borrow()
                .has_room(crate::transport::MAX_BATCH_BYTES)
            {
                break;
            }
            match s.pop_front() {
                Ok(Some((id, p))) => {
                    let len = p.len();
                    if let Err((_, p)) = self.window.borrow_mut().push_with_id(id, len, p) {
                        // larger than the room checked: kept for the next turn
                        *self.stash.borrow_mut() = Some((id, p));
                        break;
                    }
                    n += 1;
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(%error, "spool read failed");
                    break;
                }
            }
        }
        n
    }

    /// Appends a new packet (identity [`Delivery::next_id`], already
    /// stamped) to the spool; `false` when there is no room (the caller
    /// keeps its records in the ring: back-pressure).
    pub(crate) fn spool_new(&self, packet: &[u8]) -> bool {
        let id = self.next_id();
        if self.spool_back(id, packet) {
            self.window.borrow_mut().skip_seq();
            true
        } else {
            false
        }
    }

    fn spool_back(&self, id: PacketId, packet: &[u8]) -> bool {
        let mut spool = self.spool.borrow_mut();
        let Some(s) = spool.as_mut() else {
            return false;
        };
        if self.spool_full == SpoolFull::DropOldest {
            self.make_room(s, packet.len());
        }
        match s.push_back(id, crate::clock::unix_ms(), packet) {
            Ok(()) => {
                self.spooled.set(self.spooled.get() + 1);
                true
            }
            Err(error) => {
                self.spool_refused.set(self.spool_refused.get() + 1);
                tracing::debug!(%error, "spool refused a packet; records stay in the ring");
                false
            }
        }
    }

    /// Whether a spool exists and can take `len` more bytes: it has room,
    /// or (drop-oldest) room can be made by dropping its oldest packets.
    pub(crate) fn spool_has_room(&self, len: usize) -> bool {
        self.spool
            .borrow()
            .as_ref()
            .is_some_and(|s| match self.spool_full {
                SpoolFull::Block => s.has_room(len),
                SpoolFull::DropOldest => s.fits_alone(len),
            })
    }

    /// Drop-oldest: removes the oldest spooled packets until `len` bytes
    /// fit (space comes back a whole segment at a time, so up to a segment
    /// of the oldest packets goes); every dropped packet and its records
    /// are counted, and each drop is logged.
    fn make_room(&self, s: &mut Spool, len: usize) {
        let (mut packets, mut records) = (0u64, 0u64);
        while !s.has_room(len) {
            match s.pop_front() {
                Ok(Some((_, p))) => {
                    packets += 1;
                    // an undecodable packet still held at least one record
                    records += ack::packet_records(&p).map_or(1, |n| n as u64);
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(%error, "spool read failed while dropping its oldest packets");
                    break;
                }
            }
        }
        if packets > 0 {
            self.spool_dropped_packets
                .set(self.spool_dropped_packets.get() + packets);
            self.spool_dropped_records
                .set(self.spool_dropped_records.get() + records);
            tracing::warn!(
                packets,
                records,
                "spool full: oldest spooled packets dropped (spool_full = drop-oldest)"
            );
        }
    }

    /// Shutdown without a center: the unacknowledged window goes before
    /// everything spooled, and the spool is made durable. Returns packets
    /// moved.
    pub(crate) fn window_to_spool(&self) -> usize {
        let mut spool = self.spool.borrow_mut();
        let Some(s) = spool.as_mut() else { return 0 };
        let mut packets: Vec<(PacketId, Bytes)> = self.window.borrow_mut().drain().collect();
        packets.extend(self.stash.borrow_mut().take());
        let moved = match s.push_front_all(
            crate::clock::unix_ms(),
            packets.iter().map(|(id, p)| (*id, &p[..])),
        ) {
            Ok(n) => n,
            Err(error) => {
                tracing::error!(%error, packets = packets.len(), "unacknowledged packets could not be spooled at shutdown");
                0
            }
        };
        if let Err(error) = s.seal() {
            tracing::error!(%error, "spool sync failed at shutdown");
        }
        moved
    }

    /// Seals the spool's open segment (durable).
    pub(crate) fn seal(&self) {
        if let Some(s) = self.spool.borrow_mut().as_mut()
            && let Err(error) = s.seal()
        {
            tracing::error!(%error, "spool sync failed");
        }
    }

    /// Nothing waits for an acknowledgement (or the center does not ack).
    pub(crate) fn settled(&self) -> bool {
        let w = self.window.borrow();
        w.is_empty() || w.mode() == Mode::NonAcking
    }

    /// Nothing in the window and nothing spooled.
    pub(crate) fn is_empty(&self) -> bool {
        self.window.borrow().is_empty() && self.spool_empty()
    }
}

impl Delivery {
    /// Publishes the counters for the heartbeat.
    pub(crate) fn publish(&self) {
        crate::delivery_stats::publish(self.stats());
    }
}

/// Appends the identity fields to an encoded packet.
pub(crate) fn stamp(buf: &mut Vec<u8>, id: PacketId) {
    let mut f = [0u8; 2 * (3 + elkeid_core::pb::MAX_VARINT_LEN)];
    if let Ok(n) = ack::encode_packet_id(id, &mut f) {
        buf.extend_from_slice(&f[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spilled_packets_replay_first_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = Delivery::new(
            16 << 20,
            Duration::from_secs(15),
            dir.path(),
            1 << 30,
            SpoolFull::Block,
        );
        let mut sent = Vec::new();
        // connected: 3 packets into the window, all acked
        for _ in 0..3 {
            let id = d.next_id();
            d.push(Bytes::from(format!("p{}", id.seq))).unwrap();
        }
        while let Some((id, p)) = d.next_to_send() {
            sent.push(p);
            d.sent(id);
        }
        let epoch = d.next_id().epoch;
        let cmd = Command {
            ack_epoch: epoch,
            ack_seq: 3,
            ..Default::default()
        };
        assert!(d.on_command(&cmd));
        // outage: 3 packets spilled
        for _ in 0..3 {
            let id = d.next_id();
            assert!(d.spool_new(format!("p{}", id.seq).as_bytes()));
        }
        // reconnect
        d.rewind();
        assert_eq!(d.refill_from_spool(), 3);
        let mut again = Vec::new();
        while let Some((id, p)) = d.next_to_send() {
            again.push(p);
            d.sent(id);
        }
        assert_eq!(again, ["p4", "p5", "p6"]);
        assert_eq!(d.next_id().seq, 7);
    }

    /// A packet of `records` records of `each` bytes, as the agent encodes it.
    fn packet(records: usize, each: usize) -> Vec<u8> {
        use prost::Message;
        elkeid_proto::grpc::PackagedData {
            records: (0..records)
                .map(|i| elkeid_proto::grpc::EncodedRecord {
                    data_type: 7000,
                    timestamp: i as i64,
                    data: vec![b'x'; each].into(),
                })
                .collect(),
            agent_id: "a".into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// A delivery with a 16 MiB window and a `cap`-byte spool in `dir`.
    fn spooling(dir: &Path, cap: u64, full: SpoolFull) -> Delivery {
        Delivery::new(16 << 20, Duration::from_secs(15), dir, cap, full)
    }

    #[test]
    fn full_spool_drops_its_oldest_packets_and_counts_them_when_configured() {
        let (dir, cap) = (tempfile::tempdir().unwrap(), 8 << 20);
        let d = spooling(dir.path(), cap, SpoolFull::DropOldest);
        let p = packet(3, 170 * 1024);
        let mut ids = Vec::new();
        for _ in 0..40 {
            ids.push(d.next_id().seq);
            assert!(d.spool_has_room(p.len()));
            assert!(d.spool_new(&p), "drop-oldest always takes the new packet");
        }
        let st = d.stats();
        assert!(st.spool.bytes <= cap, "{} > {cap}", st.spool.bytes);
        assert!(st.spool_dropped_packets > 0);
        assert_eq!(st.spool_dropped_records, 3 * st.spool_dropped_packets);
        assert_eq!(st.spool.entries + st.spool_dropped_packets, 40);
        assert_eq!(st.spool_refused, 0);
        assert_eq!(st.spool_full, "drop-oldest");
        // what is left are the newest packets, in order
        d.rewind();
        let mut left = Vec::new();
        while d.refill_from_spool() > 0 {
            while let Some((id, _)) = d.next_to_send() {
                left.push(id.seq);
                d.sent(id);
            }
        }
        assert_eq!(left, ids[ids.len() - left.len()..]);
        assert_eq!(left.len() as u64, st.spool.entries);
    }

    #[test]
    fn full_spool_blocks_by_default() {
        let (dir, cap) = (tempfile::tempdir().unwrap(), 8 << 20);
        let d = spooling(dir.path(), cap, SpoolFull::Block);
        let p = packet(3, 170 * 1024);
        let mut taken = 0;
        for _ in 0..40 {
            if d.spool_has_room(p.len()) && d.spool_new(&p) {
                taken += 1;
            }
        }
        assert!(taken < 40 && taken > 0);
        assert!(!d.spool_has_room(p.len()));
        assert!(!d.spool_new(&p), "refused: the records stay in the ring");
        let st = d.stats();
        assert_eq!((st.spool_dropped_packets, st.spool_dropped_records), (0, 0));
        assert_eq!(st.spool.entries, taken);
        assert!(st.spool_refused >= 1);
    }
}
