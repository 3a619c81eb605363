//! Acknowledged delivery between our agent and our center (an extension
//! Elkeid peers ignore), sans-IO.
//!
//! # Wire
//! - `PackagedData` field [`FIELD_EPOCH`] (varint): the agent's boot epoch,
//!   non-zero. Its presence *advertises* that the agent understands
//!   acknowledgements. Field [`FIELD_SEQ`] (varint): the packet's sequence
//!   number within the epoch, starting at 1, +1 per packet. Both follow the
//!   host metadata ([`encode_packet_id`]). Elkeid's Go center (gofast) keeps
//!   or skips unknown fields, so it decodes such packets unchanged.
//! - `Command` fields [`FIELD_EPOCH`] and [`FIELD_SEQ`]: a cumulative
//!   acknowledgement: every packet of that epoch up to and including `seq`
//!   is durable in every sink of the center. Our center sends them only to
//!   streams whose packets advertise, and only in a `Command` without task
//!   and configs (an Elkeid Go agent would take such a Command as an empty
//!   config list and delete every plugin: it must never receive one).
//!
//! # Bookkeeping
//! [`AckWindow`] keeps the packets the center has not acknowledged, bounded
//! by bytes, in sequence order. After a reconnect or failover everything in
//! it is sent again, in order ([`AckWindow::rewind`]). An acknowledgement
//! releases a prefix. It also decides, from times the caller passes in,
//! whether the center acknowledges at all ([`Mode`]) and whether
//! acknowledgements stopped advancing while data is pending
//! ([`AckWindow::stalled`]). Against a center that never acknowledges (a
//! real Elkeid center) the window is released as soon as a packet was handed
//! to the connection: today's behaviour.

use crate::pb::{self, DecodeError, EncodeError, WireType, Writer};

/// Field number of the epoch on `PackagedData` and `Command` (Elkeid uses 1..9
/// and 1..3).
pub const FIELD_EPOCH: u32 = 2001;
/// Field number of the sequence (`PackagedData`) / cumulative ack (`Command`).
pub const FIELD_SEQ: u32 = 2002;

/// Identity of one packet: agent boot epoch and sequence within it. A record's
/// identity is the packet's plus its index in the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PacketId {
    /// Boot epoch (non-zero).
    pub epoch: u64,
    /// Sequence within the epoch, from 1.
    pub seq: u64,
}

/// Encoded length of the two extension fields.
pub const fn packet_id_len(id: PacketId) -> usize {
    pb::varint_field_len(FIELD_EPOCH, id.epoch) + pb::varint_field_len(FIELD_SEQ, id.seq)
}

/// Writes fields [`FIELD_EPOCH`] and [`FIELD_SEQ`] (append them after the
/// host metadata of a packet, or alone for an ack-only `Command`).
pub fn encode_packet_id(id: PacketId, out: &mut [u8]) -> Result<usize, EncodeError> {
    let mut w = Writer::new(out);
    w.varint_field(FIELD_EPOCH, id.epoch)?;
    w.varint_field(FIELD_SEQ, id.seq)?;
    Ok(w.position())
}

/// Finds fields [`FIELD_EPOCH`]/[`FIELD_SEQ`] among the top-level fields of a
/// complete `PackagedData` or `Command` message, skipping every other field.
/// `Ok(None)` when the message carries no (non-zero) epoch.
pub fn decode_packet_id(msg: &[u8]) -> Result<Option<PacketId>, DecodeError> {
    let mut pos = 0;
    let mut id = PacketId::default();
    while pos < msg.len() {
        let ((field, wt), n) = pb::decode_key(&msg[pos..]).map_err(pb::complete)?;
        pos += n;
        match (field, wt) {
            (FIELD_EPOCH, WireType::Varint) | (FIELD_SEQ, WireType::Varint) => {
                let (v, n) = pb::decode_varint(&msg[pos..]).map_err(pb::complete)?;
                pos += n;
                if field == FIELD_EPOCH {
                    id.epoch = v;
                } else {
                    id.seq = v;
                }
            }
            _ => pos += pb::skip_field(field, wt, &msg[pos..]).map_err(pb::complete)?,
        }
    }
    Ok((id.epoch != 0).then_some(id))
}

/// Records (`PackagedData` field 1) in a complete encoded packet: what a
/// packet dropped from a full spool held (the drop is counted in records).
pub fn packet_records(msg: &[u8]) -> Result<usize, DecodeError> {
    let mut pos = 0;
    let mut n = 0;
    while pos < msg.len() {
        let ((field, wt), k) = pb::decode_key(&msg[pos..]).map_err(pb::complete)?;
        pos += k;
        if field == 1 && wt == WireType::Len {
            n += 1;
        }
        pos += pb::skip_field(field, wt, &msg[pos..]).map_err(pb::complete)?;
    }
    Ok(n)
}

/// Whether the center on the current connection acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing heard yet on this connection.
    Unknown,
    /// An acknowledgement arrived on this connection.
    Acking,
    /// No acknowledgement within the detection bound: an Elkeid center.
    /// Packets are released once handed to the connection.
    NonAcking,
}

/// The window is full: the packet is handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowFull;

impl core::fmt::Display for WindowFull {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("unacknowledged window full")
    }
}

/// Timing bounds of the window, in milliseconds of the caller's clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A connection that sent packets and got no acknowledgement at all for
    /// this long is a center without the extension.
    pub detect_ms: u64,
    /// Acknowledgements not advancing for this long while sent packets are
    /// unacknowledged: the center is stalled.
    pub stall_ms: u64,
}

#[cfg(feature = "alloc")]
pub use window::AckWindow;

#[cfg(feature = "alloc")]
mod window {
    use super::{Mode, PacketId, Timing, WindowFull};
    use alloc::collections::VecDeque;

    #[derive(Debug)]
    struct Entry<P> {
        id: PacketId,
        len: usize,
        packet: P,
    }

    /// Packets sent (or to be sent) and not yet acknowledged, in order,
    /// bounded by `max_bytes` (a single packet larger than the bound is
    /// accepted when the window is empty, so progress is always possible).
    #[derive(Debug)]
    pub struct AckWindow<P> {
        epoch: u64,
        next_seq: u64,
        entries: VecDeque<Entry<P>>,
        bytes: usize,
        max_bytes: usize,
        /// Index of the next entry to send on the current connection.
        cursor: usize,
        mode: Mode,
        timing: Timing,
        /// When the first packet went out on this connection.
        first_sent_ms: Option<u64>,
        /// Last time the acknowledged point advanced (or sending resumed
        /// from an empty window).
        progress_ms: u64,
        resent: u64,
        acked: u64,
    }

    impl<P> AckWindow<P> {
        /// A window for boot epoch `epoch` (non-zero) holding at most
        /// `max_bytes` of packets.
        pub fn new(epoch: u64, max_bytes: usize, timing: Timing) -> Self {
            AckWindow {
                epoch: epoch.max(1),
                next_seq: 1,
                entries: VecDeque::new(),
                bytes: 0,
                max_bytes,
                cursor: 0,
                mode: Mode::Unknown,
                timing,
                first_sent_ms: None,
                progress_ms: 0,
                resent: 0,
                acked: 0,
            }
        }

        /// This boot's epoch.
        pub fn epoch(&self) -> u64 {
            self.epoch
        }

        /// The identity the next new packet gets ([`AckWindow::push`]
        /// assigns it).
        pub fn next_id(&self) -> PacketId {
            PacketId {
                epoch: self.epoch,
                seq: self.next_seq,
            }
        }

        /// Whether a packet of `len` bytes fits.
        pub fn has_room(&self, len: usize) -> bool {
            self.entries.is_empty() || self.bytes.saturating_add(len) <= self.max_bytes
        }

        /// Adds a new packet with identity [`AckWindow::next_id`].
        pub fn push(&mut self, len: usize, packet: P) -> Result<PacketId, (WindowFull, P)> {
            let id = self.next_id();
            self.push_with_id(id, len, packet)?;
            self.next_seq += 1;
            Ok(id)
        }

        /// The packet numbered [`AckWindow::next_id`] went elsewhere (the
        /// disk spool): the next new packet gets the following sequence.
        pub fn skip_seq(&mut self) {
            self.next_seq += 1;
        }

        /// Adds a packet that already has an identity (replayed from the
        /// spool, possibly of an older epoch).
        pub fn push_with_id(
            &mut self,
            id: PacketId,
            len: usize,
            packet: P,
        ) -> Result<(), (WindowFull, P)> {
            if !self.has_room(len) {
                return Err((WindowFull, packet));
            }
            self.bytes += len;
            self.entries.push_back(Entry { id, len, packet });
            Ok(())
        }

        /// The next packet to send on this connection.
        pub fn next_to_send(&self) -> Option<(PacketId, &P)> {
            self.entries.get(self.cursor).map(|e| (e.id, &e.packet))
        }

        /// The packet `id` from [`AckWindow::next_to_send`] was handed to
        /// the connection at `now_ms`. Against a non-acking center it leaves
        /// the window at once (returned, so the caller can count it).
        ///
        /// Handing a packet over takes time (the caller awaits the
        /// connection), and an acknowledgement may arrive meanwhile. When it
        /// released `id` (and perhaps packets never sent on this connection:
        /// a center's first ack after a reconnect reports what an earlier
        /// connection delivered), the send position already points past the
        /// released prefix and must not move: advancing it would mark the
        /// next, unsent packet as sent and a later cumulative ack would
        /// release it without the center ever having it.
        pub fn sent(&mut self, id: PacketId, now_ms: u64) -> Option<P> {
            if self.entries.get(self.cursor).is_none_or(|e| e.id != id) {
                return None;
            }
            if self.first_sent_ms.is_none() {
                self.first_sent_ms = Some(now_ms);
            }
            if self.cursor == 0 {
                // Nothing was outstanding: the stall clock starts now.
                self.progress_ms = now_ms;
            }
            if self.mode == Mode::NonAcking {
                let e = self.entries.pop_front()?;
                self.bytes -= e.len;
                return Some(e.packet);
            }
            self.cursor += 1;
            None
        }

        /// A cumulative acknowledgement arrived; releases every packet of
        /// `id.epoch` up to `id.seq` from the front. Returns how many.
        pub fn ack(&mut self, id: PacketId, now_ms: u64) -> usize {
            if self.mode != Mode::Acking {
                self.mode = Mode::Acking;
            }
            let mut n = 0;
            while let Some(front) = self.entries.front() {
                if front.id.epoch != id.epoch || front.id.seq > id.seq {
                    break;
                }
                if let Some(e) = self.entries.pop_front() {
                    self.bytes -= e.len;
                }
                self.cursor = self.cursor.saturating_sub(1);
                n += 1;
            }
            if n > 0 {
                self.progress_ms = now_ms;
                self.acked += n as u64;
            }
            n
        }

        /// A new connection: everything unacknowledged is sent again, in
        /// order, and the center's support is detected afresh.
        pub fn rewind(&mut self) {
            self.resent += self.cursor as u64;
            self.cursor = 0;
            self.mode = Mode::Unknown;
            self.first_sent_ms = None;
        }

        /// Re-evaluates the mode at `now_ms`; returns packets released
        /// because the center turned out not to acknowledge.
        pub fn poll(&mut self, now_ms: u64) -> usize {
            if self.mode != Mode::Unknown {
                return 0;
            }
            let Some(first) = self.first_sent_ms else {
                return 0;
            };
            if now_ms.saturating_sub(first) < self.timing.detect_ms {
                return 0;
            }
            self.mode = Mode::NonAcking;
            // What was handed over is released, as Elkeid's protocol does.
            let mut n = 0;
            while self.cursor > 0 {
                if let Some(e) = self.entries.pop_front() {
                    self.bytes -= e.len;
                }
                self.cursor -= 1;
                n += 1;
            }
            n
        }

        /// Acknowledgements stopped advancing for `stall_ms` while sent
        /// packets wait for one (only for an acking center).
        pub fn stalled(&self, now_ms: u64) -> bool {
            self.mode == Mode::Acking
                && self.cursor > 0
                && now_ms.saturating_sub(self.progress_ms) >= self.timing.stall_ms
        }

        /// Current mode.
        pub fn mode(&self) -> Mode {
            self.mode
        }

        /// Packets held (sent and not yet sent).
        pub fn len(&self) -> usize {
            self.entries.len()
        }

        /// Whether nothing is held.
        pub fn is_empty(&self) -> bool {
            self.entries.is_empty()
        }

        /// Packets sent on this connection and not yet acknowledged.
        pub fn in_flight(&self) -> usize {
            self.cursor
        }

        /// Bytes held.
        pub fn bytes(&self) -> usize {
            self.bytes
        }

        /// Packets sent again after a reconnect, since creation.
        pub fn resent(&self) -> u64 {
            self.resent
        }

        /// Packets released by acknowledgements, since creation.
        pub fn acked(&self) -> u64 {
            self.acked
        }

        /// Takes every packet out, oldest first (shutdown: to the spool).
        pub fn drain(&mut self) -> impl Iterator<Item = (PacketId, P)> + '_ {
            self.bytes = 0;
            self.cursor = 0;
            self.entries.drain(..).map(|e| (e.id, e.packet))
        }
    }
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;
    use std::vec::Vec;

    const T: Timing = Timing {
        detect_ms: 5_000,
        stall_ms: 10_000,
    };

    #[test]
    fn golden_fields() {
        // key(2001, varint) = 2001 << 3 = 16008 = 0x88 0x7d; key(2002) = 16016 = 0x90 0x7d.
        let id = PacketId { epoch: 5, seq: 300 };
        let mut out = [0u8; 16];
        let n = encode_packet_id(id, &mut out).unwrap();
        assert_eq!(&out[..n], &[0x88, 0x7d, 0x05, 0x90, 0x7d, 0xac, 0x02]);
        assert_eq!(packet_id_len(id), n);
        assert_eq!(decode_packet_id(&out[..n]), Ok(Some(id)));
        // Among other fields (agent_id "a", a record).
        let msg = [&[0x0a, 0x00, 0x12, 0x01, b'a'][..], &out[..n]].concat();
        assert_eq!(decode_packet_id(&msg), Ok(Some(id)));
        assert_eq!(decode_packet_id(&[0x12, 0x01, b'a']), Ok(None));
        assert!(decode_packet_id(&out[..n - 1]).is_err());
        assert!(encode_packet_id(id, &mut out[..3]).is_err());
        // two records (field 1), agent_id, then the identity
        let pkt = [
            &[0x0a, 0x02, 0x08, 0x01, 0x0a, 0x00, 0x12, 0x01, b'a'][..],
            &out[..n],
        ]
        .concat();
        assert_eq!(packet_records(&pkt), Ok(2));
        assert_eq!(packet_records(&[]), Ok(0));
        assert!(packet_records(&pkt[..3]).is_err());
    }

    #[test]
    fn window_acks_and_rewinds_in_order() {
        let mut w: AckWindow<u32> = AckWindow::new(9, 100, T);
        for i in 0..5 {
            assert_eq!(w.push(10, i).unwrap().seq, u64::from(i) + 1);
        }
        for _ in 0..3 {
            let (id, p) = w.next_to_send().unwrap();
            assert_eq!(*p, w.in_flight() as u32);
            assert_eq!(w.sent(id, 0), None);
        }
        assert_eq!(w.ack(PacketId { epoch: 9, seq: 2 }, 1), 2);
        assert_eq!(w.mode(), Mode::Acking);
        assert_eq!(w.in_flight(), 1);
        assert_eq!(w.bytes(), 30);
        // another epoch's ack releases nothing
        assert_eq!(w.ack(PacketId { epoch: 8, seq: 99 }, 1), 0);
        w.rewind();
        assert_eq!(w.resent(), 1);
        let order: Vec<u32> = core::iter::from_fn(|| {
            let (id, p) = w.next_to_send().map(|(id, p)| (id, *p))?;
            w.sent(id, 2);
            Some(p)
        })
        .collect();
        assert_eq!(order, [2, 3, 4]);
    }

    /// The bug behind lost packets after a center restart: a packet was
    /// being handed to the connection when the center's first ack (what an
    /// earlier connection delivered) released it and packets never sent on
    /// this connection. Finishing that send must not mark the next, unsent
    /// packet as sent.
    #[test]
    fn ack_during_a_send_does_not_skip_the_next_packet() {
        let mut w: AckWindow<u32> = AckWindow::new(9, 1000, T);
        for i in 1..=6 {
            w.push(10, i).unwrap();
        }
        // packets 1 and 2 go out; 3 is being handed over
        for _ in 0..2 {
            let (id, _) = w.next_to_send().unwrap();
            w.sent(id, 0);
        }
        let (in_flight, p) = w.next_to_send().map(|(id, p)| (id, *p)).unwrap();
        assert_eq!(p, 3);
        // meanwhile: the center already has 1..=4 (from before a restart)
        assert_eq!(w.ack(PacketId { epoch: 9, seq: 4 }, 1), 4);
        assert_eq!(w.in_flight(), 0);
        assert_eq!(w.sent(in_flight, 2), None);
        // 5 is next, not skipped
        assert_eq!(w.next_to_send().map(|(id, p)| (id.seq, *p)), Some((5, 5)));
        assert_eq!(w.in_flight(), 0);
        // an ack that releases only packets already sent keeps the one
        // being handed over in place
        let (id5, _) = w.next_to_send().unwrap();
        w.sent(id5, 3);
        let (id6, _) = w.next_to_send().unwrap();
        assert_eq!(w.ack(PacketId { epoch: 9, seq: 5 }, 4), 1);
        w.sent(id6, 5);
        assert_eq!(w.in_flight(), 1);
        assert!(w.next_to_send().is_none());
    }

    #[test]
    fn window_bounded_by_bytes() {
        let mut w: AckWindow<u8> = AckWindow::new(1, 25, T);
        assert!(w.push(10, 1).is_ok());
        assert!(w.push(10, 2).is_ok());
        assert_eq!(w.push(10, 3), Err((WindowFull, 3)));
        // a big packet alone always fits
        let mut w: AckWindow<u8> = AckWindow::new(1, 5, T);
        assert!(w.push(50, 1).is_ok());
        assert!(w.push(1, 2).is_err());
    }

    #[test]
    fn non_acking_center_detected() {
        let mut w: AckWindow<u8> = AckWindow::new(1, 1000, T);
        w.push(1, 1).unwrap();
        w.push(1, 2).unwrap();
        let (id, _) = w.next_to_send().unwrap();
        w.sent(id, 100);
        assert_eq!(w.poll(5_099), 0);
        assert_eq!(w.mode(), Mode::Unknown);
        assert_eq!(w.poll(5_100), 1);
        assert_eq!(w.mode(), Mode::NonAcking);
        // from now on a sent packet leaves at once
        let (id, _) = w.next_to_send().unwrap();
        assert_eq!(w.sent(id, 5_200), Some(2));
        assert!(w.is_empty());
        // a new connection detects again
        w.rewind();
        assert_eq!(w.mode(), Mode::Unknown);
    }

    #[test]
    fn stall_detection() {
        let mut w: AckWindow<u8> = AckWindow::new(1, 1000, T);
        w.push(1, 1).unwrap();
        let (id, _) = w.next_to_send().unwrap();
        w.sent(id, 0);
        w.ack(PacketId { epoch: 1, seq: 1 }, 10);
        assert!(!w.stalled(100_000), "nothing pending");
        w.push(1, 2).unwrap();
        let (id, _) = w.next_to_send().unwrap();
        w.sent(id, 50_000);
        assert!(!w.stalled(59_999));
        assert!(w.stalled(60_000));
        w.ack(PacketId { epoch: 1, seq: 2 }, 60_001);
        assert!(!w.stalled(70_000));
    }

    proptest::proptest! {
        /// Model: whatever the interleaving of pushes, sends (handing a
        /// packet over is split in two, so acks can arrive in between),
        /// cumulative acks of what the center has and reconnects: a packet
        /// is released only once the center has it, released packets are
        /// an in-order prefix, and every unreleased packet is sent again
        /// after a rewind.
        #[test]
        fn model(ops in proptest::collection::vec((0u8..5, 0usize..8), 0..300)) {
            let mut w: AckWindow<u64> = AckWindow::new(3, 64, T);
            let mut held: std::collections::VecDeque<u64> = Default::default();
            // what the center stored (over all connections)
            let mut center: std::collections::BTreeSet<u64> = Default::default();
            let mut handing: Option<PacketId> = None;
            for (op, arg) in ops {
                match op {
                    0 => {
                        let seq = w.next_id().seq;
                        if w.push(8, seq).is_ok() { held.push_back(seq); }
                    }
                    1 => {
                        if handing.is_none()
                            && let Some((id, p)) = w.next_to_send()
                        {
                            proptest::prop_assert_eq!(id.seq, *p);
                            handing = Some(id);
                        }
                    }
                    2 => {
                        if let Some(id) = handing.take() {
                            center.insert(id.seq);
                            w.sent(id, 0);
                        }
                    }
                    3 => {
                        // a cumulative ack of the center's highest seq,
                        // possibly lagging
                        if let Some(&upto) = center.iter().rev().nth(arg) {
                            let n = w.ack(PacketId { epoch: 3, seq: upto }, 0);
                            for _ in 0..n {
                                let seq = held.pop_front().unwrap_or(0);
                                proptest::prop_assert!(center.contains(&seq), "{} released unsent", seq);
                            }
                        }
                    }
                    _ => {
                        // reconnect: a packet being handed over is lost
                        handing = None;
                        w.rewind();
                    }
                }
                proptest::prop_assert_eq!(w.len(), held.len());
                proptest::prop_assert_eq!(w.bytes(), held.len() * 8);
                proptest::prop_assert!(w.bytes() <= 64);
            }
            w.rewind();
            let mut again = Vec::new();
            while let Some((id, p)) = w.next_to_send() { again.push(*p); w.sent(id, 0); }
            proptest::prop_assert_eq!(again, held.into_iter().collect::<Vec<_>>());
        }
    }
}
