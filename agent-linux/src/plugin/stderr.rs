//! Size-capped capture of a plugin's stderr.
//!
//! Choice: the child's fd 2 is a pipe that the agent drains into
//! `<name>.stderr` (Elkeid hands the file itself to the child, which can then
//! fill the disk). When the file would pass the cap it is renamed to
//! `<name>.stderr.1` (replacing the previous one) and a fresh file is
//! started, so a plugin's stderr never takes more than twice the cap on
//! disk. Each start begins a fresh `<name>.stderr`; a non-empty previous
//! one becomes `<name>.stderr.1` (Elkeid truncates it, losing the output of
//! a plugin that just crashed). The drain
//! ends at EOF, i.e. when the plugin and everything it forked have closed
//! fd 2. Writes are small appends to the page cache, done inline.
//!
//! A file that cannot be opened or written (disk full, directory removed)
//! is reopened — appending — at the first chunk [`REOPEN_AFTER`] later,
//! like the agent's own log; meanwhile the pipe is still drained (the plugin
//! never blocks) and the discarded bytes are counted and logged when the
//! file is back.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;

use tokio::net::unix::pipe;

use super::layout::Paths;

/// Read chunk for the stderr pipe.
const CHUNK: usize = 4096;
/// Wait before reopening a file that failed.
const REOPEN_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

fn open(path: &std::path::Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Copies `rx` into `paths.stderr`, rotating at `cap` bytes. Never fails:
/// on a file error the pipe is drained to nowhere (so the plugin never
/// blocks on a full stderr pipe) and the file is reopened after
/// [`REOPEN_AFTER`]; the bytes lost meanwhile are counted in the log.
pub(crate) async fn drain(rx: pipe::Receiver, paths: Paths, cap: u64) {
    // Keep the previous run's output (often the reason it crashed).
    if std::fs::metadata(&paths.stderr).is_ok_and(|m| m.len() > 0) {
        let _ = std::fs::rename(&paths.stderr, &paths.stderr_old);
    }
    let mut file = match open(&paths.stderr) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path = %paths.stderr.display(), error = %e, "cannot open plugin stderr file");
            None
        }
    };
    let cap = cap.max(CHUNK as u64);
    let mut written: u64 = 0;
    let mut buf = [0u8; CHUNK];
    let mut failed_at = file.is_none().then(std::time::Instant::now);
    let mut discarded: u64 = 0;
    loop {
        if rx.readable().await.is_err() {
            return;
        }
        let n = match rx.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        if file.is_none() && failed_at.is_some_and(|t| t.elapsed() >= REOPEN_AFTER) {
            match OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&paths.stderr)
            {
                Ok(f) => {
                    written = f.metadata().map(|m| m.len()).unwrap_or(0);
                    tracing::warn!(path = %paths.stderr.display(), discarded_bytes = discarded, "plugin stderr file reopened; output in between was discarded");
                    file = Some(f);
                    failed_at = None;
                    discarded = 0;
                }
                Err(_) => failed_at = Some(std::time::Instant::now()),
            }
        }
        let Some(f) = file.as_mut() else {
            discarded += n as u64;
            continue;
        };
        if written + n as u64 > cap {
            let _ = std::fs::rename(&paths.stderr, &paths.stderr_old);
            match open(&paths.stderr) {
                Ok(nf) => *f = nf,
                Err(e) => {
                    tracing::warn!(path = %paths.stderr.display(), error = %e, "cannot reopen plugin stderr file");
                    file = None;
                    failed_at = Some(std::time::Instant::now());
                    discarded += n as u64;
                    continue;
                }
            }
            written = 0;
        }
        if let Err(e) = f.write_all(&buf[..n]) {
            tracing::warn!(path = %paths.stderr.display(), error = %e, "plugin stderr write failed");
            file = None;
            failed_at = Some(std::time::Instant::now());
            discarded += n as u64;
            continue;
        }
        written += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(flavor = "current_thread")]
    async fn rotates_at_cap() {
        let wd = tempfile::tempdir().unwrap();
        let paths = Paths::new(wd.path(), "p").unwrap();
        paths.prepare().unwrap();
        let (mut tx, rx) = pipe::pipe().unwrap();
        let task = tokio::spawn(drain(rx, paths.clone(), 10_000));
        for i in 0..30u8 {
            tx.write_all(&[b'a' + (i % 26); 1000]).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
        let cur = std::fs::metadata(&paths.stderr).unwrap().len();
        let old = std::fs::metadata(&paths.stderr_old).unwrap().len();
        assert!(cur <= 10_000 && old <= 10_000, "{cur} {old}");
        // 30 000 bytes written, at most 2 x cap kept, nothing lost but rotated data.
        assert!(cur > 0 && old > 10_000 - 4096, "{cur} {old}");
        // The newest bytes are in the current file.
        let tail = std::fs::read(&paths.stderr).unwrap();
        assert_eq!(*tail.last().unwrap(), b'a' + 29 % 26);

        // A restart keeps the previous run's output as `.stderr.1`.
        let (mut tx, rx) = pipe::pipe().unwrap();
        let task = tokio::spawn(drain(rx, paths.clone(), 10_000));
        tx.write_all(b"second run\n").await.unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!(std::fs::read(&paths.stderr).unwrap(), b"second run\n");
        assert_eq!(std::fs::read(&paths.stderr_old).unwrap(), tail);
    }

    /// A stderr file that cannot be opened is retried: once the path is
    /// usable again the later output lands in it (before: drained to
    /// nowhere for the rest of the plugin's life).
    #[tokio::test(flavor = "current_thread")]
    async fn capture_reopens_after_a_failure() {
        let wd = tempfile::tempdir().unwrap();
        let paths = Paths::new(wd.path(), "p").unwrap();
        paths.prepare().unwrap();
        // A link into a missing directory: every open fails (ENOENT).
        let missing = wd.path().join("missing");
        std::os::unix::fs::symlink(missing.join("err"), &paths.stderr).unwrap();
        let (mut tx, rx) = pipe::pipe().unwrap();
        let task = tokio::spawn(drain(rx, paths.clone(), 10_000));
        tx.write_all(b"lost while broken\n").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        std::fs::create_dir(&missing).unwrap();
        tokio::time::sleep(REOPEN_AFTER + std::time::Duration::from_millis(200)).await;
        tx.write_all(b"after the fix\n").await.unwrap();
        drop(tx);
        task.await.unwrap();
        assert_eq!(std::fs::read(&paths.stderr).unwrap(), b"after the fix\n");
    }
}
