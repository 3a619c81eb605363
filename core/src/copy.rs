//! Short byte copies done inline, without a call to the C library.
//!
//! The agent copies every record twice on its way out (the plugin's frame
//! into the ring, the ring into the packet), a few hundred bytes each time.
//! For such lengths the call costs more than the copy on x86_64 musl, whose
//! `memcpy` starts a `rep movsq` and then moves the tail byte by byte: it
//! was 14-30 % of the shipped agent's CPU in plugin-flood profiles
//! (docs/BENCHMARKS.md). Here lengths up to [`INLINE_MAX`] are copied as
//! straight-line 16-byte blocks (one SSE load and store each); longer runs
//! still go to `memcpy`, whose start-up cost they amortise.
//!
//! `#[inline(never)]` on purpose: the shipped agent is built at
//! `opt-level = "z"`, and with fat LTO a copy inlined into agent code is
//! optimised for size there, which turns the blocks back into `memcpy`
//! calls; compiled here, in `elkeid-core` (opt-level 3 in every profile),
//! they stay loads and stores.

#[cfg(feature = "alloc")]
use alloc::vec::Vec;
use core::mem::MaybeUninit;

/// Longest copy [`copy`] and [`extend`] do inline; longer ones call `memcpy`.
pub const INLINE_MAX: usize = 256;

/// Only x86_64 copies inline. musl's `memcpy` is assembly tuned for short
/// copies on aarch64 and armv7; the MIPS and RISC-V agents (plain C
/// `memcpy`, word by word) are bound by their 2 MiB size budget instead,
/// and keep the call: there both functions are `copy_from_slice` /
/// `extend_from_slice`.
const INLINE: bool = cfg!(target_arch = "x86_64");

/// `dst.copy_from_slice(src)` (same panic when the lengths differ), with
/// the copy inline for lengths up to [`INLINE_MAX`].
#[inline(never)]
pub fn copy(dst: &mut [u8], src: &[u8]) {
    if !INLINE || dst.len() != src.len() || src.len() > INLINE_MAX {
        dst.copy_from_slice(src);
    } else {
        copy_into(dst, src);
    }
}

/// `out.extend_from_slice(src)`, with the copy inline for lengths up to
/// [`INLINE_MAX`].
#[cfg(feature = "alloc")]
#[inline(never)]
pub fn extend(out: &mut Vec<u8>, src: &[u8]) {
    let n = src.len();
    if !INLINE || n > INLINE_MAX {
        out.extend_from_slice(src);
        return;
    }
    out.reserve(n);
    let len = out.len();
    copy_into(&mut out.spare_capacity_mut()[..n], src);
    // SAFETY: `reserve` made room for `n` more bytes, and `copy_into`
    // initialised all `n` of them: every length class below writes each
    // byte of `0..n` (tested with a spare capacity full of another value).
    unsafe { out.set_len(len + n) };
}

/// A destination that takes `K` bytes of `src` at offset `at` (the same
/// offset in both).
trait Dst {
    fn put<const K: usize>(&mut self, src: &[u8], at: usize);
}

impl Dst for [u8] {
    #[inline(always)]
    fn put<const K: usize>(&mut self, src: &[u8], at: usize) {
        self[at..at + K].copy_from_slice(&src[at..at + K]);
    }
}

impl Dst for [MaybeUninit<u8>] {
    #[inline(always)]
    fn put<const K: usize>(&mut self, src: &[u8], at: usize) {
        self[at..at + K].write_copy_of_slice(&src[at..at + K]);
    }
}

/// Copies `src` (at most [`INLINE_MAX`] bytes) into `dst` of the same
/// length. Straight-line code per length class, no loop: LLVM's loop-idiom
/// pass turns a block-copy loop back into one `memcpy` call. Each class
/// writes its first and its last `K` bytes with `K <= n <= 2K`, so the two
/// runs (overlapping unless `n = 2K`) cover every byte.
#[inline(always)]
fn copy_into<D: Dst + ?Sized>(dst: &mut D, src: &[u8]) {
    let n = src.len();
    match n {
        0 => {}
        1..=3 => {
            dst.put::<1>(src, 0);
            dst.put::<1>(src, n / 2);
            dst.put::<1>(src, n - 1);
        }
        4..=7 => ends::<4, D>(dst, src),
        8..=15 => ends::<8, D>(dst, src),
        16..=32 => ends::<16, D>(dst, src),
        33..=64 => ends::<32, D>(dst, src),
        65..=128 => ends::<64, D>(dst, src),
        _ => ends::<128, D>(dst, src),
    }
}

#[inline(always)]
fn ends<const K: usize, D: Dst + ?Sized>(dst: &mut D, src: &[u8]) {
    let last = src.len() - K;
    if K <= 16 {
        dst.put::<K>(src, 0);
        dst.put::<K>(src, last);
    } else {
        let mut o = 0;
        while o < K {
            dst.put::<16>(src, o);
            dst.put::<16>(src, last + o);
            o += 16;
        }
    }
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn every_length_and_offset_copies_exactly() {
        let src: Vec<u8> = (0..=255u8).cycle().take(4200).collect();
        for n in (0..=300).chain([INLINE_MAX + 1, 1000, 4096]) {
            for off in [0, 1, 3, 7] {
                let s = &src[off..off + n];
                let mut dst = vec![0xAAu8; n + 2];
                copy(&mut dst[1..=n], s);
                assert_eq!(&dst[1..=n], s, "copy n={n} off={off}");
                assert_eq!(
                    (dst[0], dst[n + 1]),
                    (0xAA, 0xAA),
                    "copy wrote outside, n={n}"
                );
                let mut v = vec![9u8, 8];
                extend(&mut v, s);
                assert_eq!(&v[..2], [9, 8]);
                assert_eq!(&v[2..], s, "extend n={n} off={off}");
            }
        }
    }

    #[test]
    fn extend_initialises_every_byte_of_the_spare_capacity() {
        // src bytes are < 0x80; the spare capacity holds 0xEE, so a byte
        // extend failed to write would show
        let src: Vec<u8> = (0..INLINE_MAX).map(|i| (i % 0x80) as u8).collect();
        for n in 0..=INLINE_MAX {
            let mut v = vec![0xEEu8; 3 + INLINE_MAX];
            v.truncate(3);
            extend(&mut v, &src[..n]);
            assert_eq!(v.len(), 3 + n);
            assert_eq!(&v[3..], &src[..n], "n={n}");
        }
    }
}
