//! glibc heap settings for a server that holds many megabytes of packets
//! between an arrival and its group commit.
//!
//! With the NDJSON sink, up to [`crate::sinks`]' group bound (16 MiB) of
//! decompressed packets are alive until the `fdatasync` that acknowledges
//! them; then they are all freed at once. glibc's default (dynamic) trim
//! threshold then handed the top of each arena back to the kernel, and the
//! next group faulted and zeroed every page again: one page fault per 33–46
//! records (docs/BENCHMARKS.md, "The center's page faults, and the figures
//! after round 4"). [`tune`]
//! fixes the thresholds so freed packet memory is reused; [`trim`], run
//! every [`TRIM_EVERY`], gives free pages back (all of them, also those in
//! the middle of the heap, which glibc's own trimming never returns), so an
//! idle center still shrinks after a burst.
//!
//! Other C libraries (musl builds of the center) are left alone.
#![allow(unsafe_code)]

use std::time::Duration;

/// How often free heap pages go back to the kernel.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Allocations from this size up get their own mapping (fixed: the dynamic
/// threshold is what let packets bounce between mappings and the heap).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 16 << 20;
/// Free memory at the top of an arena kept for reuse before it is trimmed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 64 << 20;

/// Sets the thresholds; call once, before the runtime starts. Returns
/// whether the allocator took them (always `false` off glibc).
pub fn tune() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters (it takes the
        // allocator's own lock); the values are within glibc's ranges.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Gives every whole free page of every arena back to the kernel. Blocks
/// for a few milliseconds on a large heap: run it on a blocking thread.
pub(crate) fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it locks each arena in turn) and
    // only releases memory no allocation owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn glibc_takes_the_thresholds_and_trims() {
        assert!(tune());
        // An 8 MiB block (now below the mmap threshold) freed, the heap
        // trimmed: the allocator keeps working afterwards. What the
        // thresholds save is measured, not asserted (docs/BENCHMARKS.md).
        let v = vec![1u8; 8 << 20];
        drop(v);
        trim();
        let w = vec![2u8; 8 << 20];
        assert_eq!(w[(8 << 20) - 1], 2);
    }
}
