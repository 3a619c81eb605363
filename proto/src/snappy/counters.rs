//! Process-wide counters of the snappy layers, for heartbeats and metrics.

// 32-bit MIPS has no native 64-bit atomics: portable-atomic (lock-based there).
#[cfg(not(target_has_atomic = "64"))]
use portable_atomic::AtomicU64;
#[cfg(target_has_atomic = "64")]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

static COMPRESSED: AtomicU64 = AtomicU64::new(0);
static DECOMPRESSED: AtomicU64 = AtomicU64::new(0);
static REJECTED_OVERSIZE: AtomicU64 = AtomicU64::new(0);
static REJECTED_INVALID: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the counters of every snappy layer in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnappyCounters {
    /// gRPC messages compressed into snappy streams by a layer.
    pub messages_compressed: u64,
    /// gRPC messages decompressed from snappy streams by a layer.
    pub messages_decompressed: u64,
    /// Bodies ended because a message exceeded the decompression cap.
    pub rejected_oversize: u64,
    /// Bodies ended because of a malformed message (bad snappy stream,
    /// bad checksum, bad gRPC prefix, truncation).
    pub rejected_invalid: u64,
}

/// Reads the current counter values.
pub fn counters() -> SnappyCounters {
    SnappyCounters {
        messages_compressed: COMPRESSED.load(Ordering::Relaxed),
        messages_decompressed: DECOMPRESSED.load(Ordering::Relaxed),
        rejected_oversize: REJECTED_OVERSIZE.load(Ordering::Relaxed),
        rejected_invalid: REJECTED_INVALID.load(Ordering::Relaxed),
    }
}

pub(crate) fn record_compressed() {
    COMPRESSED.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn record_decompressed() {
    DECOMPRESSED.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn record_error(status: &tonic::Status) {
    if status.code() == tonic::Code::ResourceExhausted {
        REJECTED_OVERSIZE.fetch_add(1, Ordering::Relaxed);
    } else {
        REJECTED_INVALID.fetch_add(1, Ordering::Relaxed);
    }
}
