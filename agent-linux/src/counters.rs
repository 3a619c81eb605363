//! Plain counters: written by the transport (bytes, records sent, commands
//! received, reconnects, how it connected), read by the heartbeat for its
//! rates and by the SIGUSR1 state dump. No behaviour here.

use std::cell::Cell;
use std::sync::Arc;
// 32-bit MIPS has no native 64-bit atomics: portable-atomic (lock-based there).
#[cfg(not(target_has_atomic = "64"))]
use portable_atomic::AtomicU64;
#[cfg(target_has_atomic = "64")]
use std::sync::atomic::AtomicU64;

/// Bytes received and sent on all RPCs since start (updated by the
/// connection's I/O wrapper, hence atomics).
#[derive(Debug, Default)]
pub(crate) struct ByteCounters {
    pub(crate) rx: AtomicU64,
    pub(crate) tx: AtomicU64,
}

/// The agent's counters.
#[derive(Debug)]
pub(crate) struct Counters {
    /// gRPC bytes received / sent (all RPCs).
    pub(crate) bytes: Arc<ByteCounters>,
    /// Records delivered to the center.
    pub(crate) tx_records: Cell<u64>,
    /// Commands received.
    pub(crate) rx_commands: Cell<u64>,
    /// Successful connections after the first.
    pub(crate) reconnects: Cell<u64>,
    /// `sd` / `private` / `public` / `unknown`: how the current (or last)
    /// connection was found.
    pub(crate) net_mode: Cell<&'static str>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            bytes: Arc::default(),
            tx_records: Cell::new(0),
            rx_commands: Cell::new(0),
            reconnects: Cell::new(0),
            net_mode: Cell::new("unknown"),
        }
    }
}

impl Counters {
    /// `c += n` for one of the plain counters.
    pub(crate) fn add(c: &Cell<u64>, n: u64) {
        c.set(c.get().saturating_add(n));
    }
}
