//! Gives the main thread's unused stack pages back to the kernel.
//!
//! The agent's runtime polls every task on the main thread. A TLS handshake
//! (certificate chain verification, the client's signature) runs about
//! 130 KiB deep, the periodic work about half of that, and the kernel
//! keeps every stack page once touched: without this, a handshake's depth
//! stays resident (anonymous, unswappable memory on a router without swap)
//! for the life of the process. [`trim_main_stack`] discards the pages below
//! the current frame; the next deep call faults them back in as zeros.

/// Bytes kept below the caller's frame: the `madvise` wrapper and anything
/// the compiler places below the probe run there (a few hundred bytes).
const MARGIN: usize = 16 * 1024;

/// Discards the main thread's stack pages more than [`MARGIN`] below the
/// caller; returns the bytes discarded (0 when not on the main thread, or
/// nothing to discard).
#[allow(unsafe_code)]
pub(crate) fn trim_main_stack() -> usize {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return 0;
    };
    let Some((lo, hi)) = stack_range(&maps) else {
        return 0;
    };
    let page = crate::procstat::page_size();
    if !page.is_power_of_two() {
        return 0;
    }
    let probe = 0u8;
    let here = std::hint::black_box(&probe) as *const u8 as usize;
    let Some((start, len)) = dead_range(lo, hi, here, page) else {
        return 0;
    };
    // SAFETY: [start, start + len) is page-aligned and lies inside this
    // process's `[stack]` mapping, more than MARGIN below the frame of this
    // function, which is on that stack (checked by `dead_range`): the main
    // thread's stack grows down, so every live frame of this thread is above
    // it, and no other thread runs on this stack. Signal handlers run on it
    // only after this system call returns. The discarded bytes are dead;
    // the kernel maps zero pages there when the stack grows into them again.
    let r = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if r == 0 { len } else { 0 }
}

/// `[stack]`'s address range in `/proc/self/maps`.
fn stack_range(maps: &str) -> Option<(usize, usize)> {
    let line = maps.lines().find(|l| l.ends_with(" [stack]"))?;
    let range = line.split(' ').next()?;
    let (lo, hi) = range.split_once('-')?;
    let lo = usize::from_str_radix(lo, 16).ok()?;
    let hi = usize::from_str_radix(hi, 16).ok()?;
    (lo < hi).then_some((lo, hi))
}

/// The page-aligned range of `[lo, hi)` more than [`MARGIN`] below `here`;
/// `None` when `here` is not inside it (another thread's stack).
fn dead_range(lo: usize, hi: usize, here: usize, page: usize) -> Option<(usize, usize)> {
    if !(lo..hi).contains(&here) {
        return None;
    }
    let end = here.checked_sub(MARGIN)? & !(page - 1);
    (end > lo).then(|| (lo, end - lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_line_is_found() {
        let maps = "00400000-00401000 r--p 00000000 fe:01 1 /usr/bin/x\n\
                    7fe79000-7fe9a000 rw-p 00000000 00:00 0                          [stack]\n\
                    7fed0000-7fed2000 r-xp 00000000 00:00 0                          [vdso]\n";
        assert_eq!(stack_range(maps), Some((0x7fe7_9000, 0x7fe9_a000)));
        assert_eq!(stack_range("00400000-00401000 r--p 0 0:0 1 /x\n"), None);
        assert_eq!(stack_range("zz-00401000 rw-p 0 0:0 0 [stack]\n"), None);
        assert_eq!(stack_range("5000-4000 rw-p 0 0:0 0 [stack]\n"), None);
    }

    #[test]
    fn only_pages_well_below_the_caller_go() {
        let (lo, hi, page) = (0x10_0000, 0x20_0000, 4096);
        // 64 KiB + 123 above the bottom: 48 KiB + the partial page go.
        let here = lo + 64 * 1024 + 123;
        assert_eq!(dead_range(lo, hi, here, page), Some((lo, 48 * 1024)));
        // Less than MARGIN + a page above the bottom: nothing.
        assert_eq!(dead_range(lo, hi, lo + MARGIN + 100, page), None);
        // Another thread's stack (outside the range): nothing.
        assert_eq!(dead_range(lo, hi, hi + 10, page), None);
        assert_eq!(dead_range(lo, hi, lo - 1, page), None);
    }

    #[test]
    fn off_the_main_thread_it_does_nothing() {
        // The test harness runs tests on spawned threads, not on `[stack]`.
        assert_eq!(std::thread::spawn(trim_main_stack).join().unwrap(), 0);
    }
}
