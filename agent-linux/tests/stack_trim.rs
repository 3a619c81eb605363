//! The main-thread stack trim on the real main thread (`harness = false`:
//! libtest would run the test on a spawned thread): a deep call leaves its
//! pages resident, the trim gives them back, the frames above it keep their
//! values, and the stack grows into the discarded range again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

/// Resident kB of `[stack]` (from /proc/self/maps), counted with
/// `mincore()`: unlike smaps, also right under qemu-user, which emulates
/// the guest's maps and translates the system call.
#[allow(unsafe_code)]
fn stack_rss_kb() -> u64 {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps
        .lines()
        .find(|l| l.ends_with(" [stack]"))
        .expect("[stack]");
    let (lo, hi) = line.split(' ').next().unwrap().split_once('-').unwrap();
    let lo = usize::from_str_radix(lo, 16).unwrap();
    let hi = usize::from_str_radix(hi, 16).unwrap();
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let mut vec = vec![0u8; (hi - lo).div_ceil(page)];
    // SAFETY: [lo, hi) is a mapping of this process, page-aligned; `vec`
    // holds one byte per page of it.
    let r = unsafe { libc::mincore(lo as *mut libc::c_void, hi - lo, vec.as_mut_ptr().cast()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * page as u64 / 1024
}

/// Touches about `depth` × 4 KiB of stack; returns a checksum of it.
#[inline(never)]
fn deep(depth: u32) -> u64 {
    let mut page = [0u8; 4096];
    for (i, b) in page.iter_mut().enumerate() {
        *b = (i as u32 ^ depth) as u8;
    }
    let page = black_box(page);
    let below = if depth > 0 { deep(depth - 1) } else { 0 };
    below + page.iter().map(|&b| b as u64).sum::<u64>()
}

fn main() {
    // Values in this frame must survive the trim.
    let keep: [u64; 64] = std::array::from_fn(|i| black_box(i as u64 * 7));
    let first = deep(64);
    let before = stack_rss_kb();
    assert!(before >= 256, "the deep call touched {before} kB only");
    let trimmed = elkeid_agent::trim_main_stack();
    let after = stack_rss_kb();
    println!("stack_trim: [stack] {before} kB -> {after} kB ({trimmed} bytes discarded)");
    assert!(trimmed >= 200 * 1024, "discarded {trimmed} bytes");
    assert!(after + 200 <= before, "[stack] {before} kB -> {after} kB");
    // Growing into the discarded pages again works and computes the same.
    assert_eq!(deep(64), first);
    for (i, v) in keep.iter().enumerate() {
        assert_eq!(*v, i as u64 * 7);
    }
    // Off the main thread it is a no-op.
    assert_eq!(
        std::thread::spawn(elkeid_agent::trim_main_stack)
            .join()
            .unwrap(),
        0
    );
    println!("stack_trim: ok");
}
