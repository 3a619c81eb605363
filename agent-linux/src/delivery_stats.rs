//! What the transport last published of its delivery state (acknowledged
//! window, spool), for the heartbeat and `status.json`: a leaf, so the
//! heartbeat reads it without importing the transport.

use std::cell::Cell;

use crate::spool::SpoolStats;

/// Heartbeat view of the delivery state.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeliveryStats {
    pub(crate) unacked_packets: usize,
    pub(crate) unacked_bytes: usize,
    pub(crate) resent_packets: u64,
    pub(crate) acked_packets: u64,
    pub(crate) mode: &'static str,
    pub(crate) spool: SpoolStats,
    pub(crate) spooled: u64,
    pub(crate) spool_refused: u64,
    pub(crate) spool_dropped_packets: u64,
    pub(crate) spool_dropped_records: u64,
    pub(crate) spool_full: &'static str,
}

impl Default for DeliveryStats {
    fn default() -> Self {
        DeliveryStats {
            unacked_packets: 0,
            unacked_bytes: 0,
            resent_packets: 0,
            acked_packets: 0,
            mode: "unknown",
            spool: SpoolStats::default(),
            spooled: 0,
            spool_refused: 0,
            spool_dropped_packets: 0,
            spool_dropped_records: 0,
            spool_full: "block",
        }
    }
}

thread_local! {
    /// The transport's latest [`DeliveryStats`] (the agent runs on one
    /// thread; the heartbeat reads what the transport published).
    static PUBLISHED: Cell<DeliveryStats> = Cell::new(DeliveryStats::default());
}

/// Makes `s` what the next heartbeat reports.
pub(crate) fn publish(s: DeliveryStats) {
    PUBLISHED.with(|p| p.set(s));
}

/// Adds the delivery fields to a 1000 heartbeat: `ack_mode`
/// (`acking`/`none`/`unknown`), `unacked_packets`, `unacked_bytes`,
/// `resent_packets`, `acked_packets`, `spool_bytes`, `spool_entries`,
/// `spool_oldest_age` (seconds), `spool_corrupt`, `spooled_packets`,
/// `spool_refused`, `spool_full` (`block`/`drop-oldest`),
/// `spool_dropped_packets`, `spool_dropped_records`.
pub(crate) fn heartbeat_fields(p: &mut elkeid_core::payload::PayloadBuf) {
    let s = PUBLISHED.with(Cell::get);
    let age = if s.spool.oldest_ms == 0 {
        0
    } else {
        crate::clock::unix_ms().saturating_sub(s.spool.oldest_ms) / 1000
    };
    p.field("ack_mode", s.mode)
        .field_u64("unacked_packets", s.unacked_packets as u64)
        .field_u64("unacked_bytes", s.unacked_bytes as u64)
        .field_u64("resent_packets", s.resent_packets)
        .field_u64("acked_packets", s.acked_packets)
        .field_u64("spool_bytes", s.spool.bytes)
        .field_u64("spool_entries", s.spool.entries)
        .field_u64("spool_oldest_age", age)
        .field_u64("spool_corrupt", s.spool.corrupt)
        .field_u64("spooled_packets", s.spooled)
        .field_u64("spool_refused", s.spool_refused)
        .field("spool_full", s.spool_full)
        .field_u64("spool_dropped_packets", s.spool_dropped_packets)
        .field_u64("spool_dropped_records", s.spool_dropped_records);
}
