//! Per-process resource samples from procfs, used by both heartbeats (1000
//! for the agent itself, 1001 for each plugin).

use std::path::Path;

/// One sample of a process's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ProcSample {
    /// utime + stime, in clock ticks.
    pub(crate) cpu_ticks: u64,
    /// Resident set size in bytes.
    pub(crate) rss_bytes: u64,
    /// `read_bytes` of `/proc/<pid>/io` (0 when unreadable).
    pub(crate) read_bytes: u64,
    /// `write_bytes` of `/proc/<pid>/io` (0 when unreadable).
    pub(crate) write_bytes: u64,
    /// Open file descriptors.
    pub(crate) nfd: u64,
    /// Process start time, Unix seconds.
    pub(crate) start_time_unix: i64,
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 when unknown).
pub(crate) fn clock_ticks() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(v)) if v > 0 => v as u64,
        _ => 100,
    }
}

/// The page size (`sysconf(_SC_PAGESIZE)`, 4096 when unknown).
pub(crate) fn page_size() -> usize {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(v)) if v > 0 => v as usize,
        _ => 4096,
    }
}

/// Samples `pid` from the live `/proc`.
pub(crate) fn sample(pid: u32) -> std::io::Result<ProcSample> {
    sample_at(Path::new("/proc"), pid, clock_ticks(), page_size() as u64)
}

/// Samples `pid` from a procfs mounted at `proc_root` (tests use a fake one).
pub(crate) fn sample_at(
    proc_root: &Path,
    pid: u32,
    ticks_per_sec: u64,
    page: u64,
) -> std::io::Result<ProcSample> {
    let dir = proc_root.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat"))?;
    let (cpu_ticks, start_ticks, rss_pages) = parse_stat(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "malformed /proc/<pid>/stat",
        )
    })?;
    // Resident pages from `statm` (the same counter as stat's field 24);
    // qemu-user fakes `/proc/self/stat` with zeros there, not `statm`.
    let rss_pages = std::fs::read_to_string(dir.join("statm"))
        .ok()
        .and_then(|s| s.split_ascii_whitespace().nth(1)?.parse::<u64>().ok())
        .filter(|&r| r > 0)
        .unwrap_or(rss_pages);
    let btime = std::fs::read_to_string(proc_root.join("stat"))
        .ok()
        .and_then(|s| parse_btime(&s))
        .unwrap_or(0);
    let (read_bytes, write_bytes) = std::fs::read_to_string(dir.join("io"))
        .ok()
        .map(|s| parse_io(&s))
        .unwrap_or((0, 0));
    let nfd = std::fs::read_dir(dir.join("fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let tps = ticks_per_sec.max(1);
    Ok(ProcSample {
        cpu_ticks,
        rss_bytes: rss_pages.saturating_mul(page),
        read_bytes,
        write_bytes,
        nfd,
        start_time_unix: btime.saturating_add(i64::try_from(start_ticks / tps).unwrap_or(i64::MAX)),
    })
}

/// `(utime + stime, starttime, rss pages)` from a `/proc/<pid>/stat` line.
/// The command name may contain spaces and parentheses: fields are counted
/// after the last `)`.
fn parse_stat(s: &str) -> Option<(u64, u64, u64)> {
    let rest = &s[s.rfind(')')? + 1..];
    // After ")": field 3 (state) is index 0.
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let num = |field: usize| -> Option<u64> { f.get(field - 3)?.parse().ok() };
    let utime = num(14)?;
    let stime = num(15)?;
    let start = num(22)?;
    let rss: i64 = f.get(24 - 3)?.parse().ok()?;
    Some((utime.saturating_add(stime), start, rss.max(0) as u64))
}

/// `btime` (boot time, Unix seconds) from `/proc/stat`.
pub(crate) fn parse_btime(s: &str) -> Option<i64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn parse_io(s: &str) -> (u64, u64) {
    let mut r = 0;
    let mut w = 0;
    for l in s.lines() {
        if let Some(v) = l.strip_prefix("read_bytes:") {
            r = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = l.strip_prefix("write_bytes:") {
            w = v.trim().parse().unwrap_or(0);
        }
    }
    (r, w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fake_proc() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("42");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        for i in 0..3 {
            std::fs::write(p.join("fd").join(i.to_string()), "").unwrap();
        }
        // comm with spaces and a ')' inside.
        std::fs::write(
            p.join("stat"),
            "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 1 0 500 1000000 300 18446744073709551615\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("stat"),
            "cpu 1 2 3\nbtime 1700000000\nprocesses 5\n",
        )
        .unwrap();
        std::fs::write(
            p.join("io"),
            "rchar: 1\nwchar: 2\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n",
        )
        .unwrap();
        let s = sample_at(d.path(), 42, 100, 4096).unwrap();
        assert_eq!(
            s,
            ProcSample {
                cpu_ticks: 12,
                rss_bytes: 300 * 4096,
                read_bytes: 4096,
                write_bytes: 8192,
                nfd: 3,
                start_time_unix: 1_700_000_005,
            }
        );
    }

    #[test]
    fn own_process_sample_is_plausible() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.nfd > 0);
        assert!(s.start_time_unix > 1_600_000_000);
    }

    #[test]
    fn malformed_stat_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("7")).unwrap();
        std::fs::write(d.path().join("7/stat"), "7 (x").unwrap();
        assert!(sample_at(d.path(), 7, 100, 4096).is_err());
    }

    #[test]
    fn huge_start_ticks_saturate_instead_of_wrapping() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("9")).unwrap();
        std::fs::write(
            d.path().join("9/stat"),
            "9 (x) S 1 9 9 0 -1 0 0 0 0 0 1 1 0 0 20 0 1 0 18446744073709551615 0 1 0\n",
        )
        .unwrap();
        std::fs::write(d.path().join("stat"), "btime 1700000000\n").unwrap();
        let s = sample_at(d.path(), 9, 1, 4096).unwrap();
        assert_eq!(s.start_time_unix, i64::MAX);
    }
}
