//! NDJSON retention: after each rotation the writer thread removes the
//! oldest closed `records-*.ndjson` files while the directory holds more
//! than `sinks.ndjson.retain_bytes`, or while they are older than
//! `sinks.ndjson.retain_secs` (by modification time). The file being
//! written is never removed. Both unset (the default): files are kept
//! forever, and a full disk stops the sink with counted write errors —
//! set a retention to make a full disk a configured outcome instead.
//! Removed files are counted (`elkeid_center_sink_records_total{sink="ndjson",kind="retention_removed_files"}`)
//! and logged.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Retention limits; `None` = unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Retention {
    /// Most bytes of `records-*.ndjson` kept (the current file included).
    pub(crate) max_bytes: Option<u64>,
    /// Oldest file age kept.
    pub(crate) max_age: Option<Duration>,
}

impl Retention {
    fn is_unlimited(&self) -> bool {
        self.max_bytes.is_none() && self.max_age.is_none()
    }
}

/// Removes what `r` says must go from `dir`, sparing `current`; returns
/// the number of files removed.
pub(crate) fn enforce(dir: &Path, r: Retention, current: Option<&Path>, now: SystemTime) -> usize {
    if r.is_unlimited() {
        return 0;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    // (name, path, size, mtime); names sort oldest first (unix seconds, seq).
    let mut files: Vec<(String, PathBuf, u64, SystemTime)> = rd
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("records-") && name.ends_with(".ndjson")) {
                return None;
            }
            let m = e.metadata().ok()?;
            m.is_file()
                .then(|| (name, e.path(), m.len(), m.modified().unwrap_or(now)))
        })
        .collect();
    files.sort_by_key(|a| natural_key(&a.0));
    let mut total: u64 = files.iter().map(|f| f.2).sum();
    let mut removed = 0;
    for (_, path, size, mtime) in files {
        if current == Some(path.as_path()) {
            continue;
        }
        let too_big = r.max_bytes.is_some_and(|m| total > m);
        let too_old = r
            .max_age
            .is_some_and(|a| now.duration_since(mtime).unwrap_or_default() > a);
        if !too_big && !too_old {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                total = total.saturating_sub(size);
                removed += 1;
                tracing::info!(path = %path.display(), bytes = size, too_big, too_old, "ndjson sink: retention removed a file");
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "ndjson sink: retention cannot remove a file");
            }
        }
    }
    removed
}

/// `records-<secs>-<seq>.ndjson` -> (secs, seq), so 10-digit and 11-digit
/// times and 6+ digit sequences sort numerically.
fn natural_key(name: &str) -> (u64, u64, String) {
    let mid = name
        .strip_prefix("records-")
        .and_then(|s| s.strip_suffix(".ndjson"))
        .unwrap_or("");
    let mut it = mid.splitn(2, '-');
    let secs = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let seq = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (secs, seq, name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(dir: &Path, name: &str, bytes: usize) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, vec![b'x'; bytes]).unwrap();
        p
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn oldest_files_go_first_down_to_the_byte_budget() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "records-100-000001.ndjson", 100);
        put(d.path(), "records-100-000002.ndjson", 100);
        put(d.path(), "records-99-000009.ndjson", 100);
        let cur = put(d.path(), "records-200-000003.ndjson", 100);
        put(d.path(), "other.txt", 1000);
        let r = Retention {
            max_bytes: Some(250),
            max_age: None,
        };
        assert_eq!(enforce(d.path(), r, Some(&cur), SystemTime::now()), 2);
        assert_eq!(
            names(d.path()),
            vec![
                "other.txt",
                "records-100-000002.ndjson",
                "records-200-000003.ndjson"
            ]
        );
        // The current file is never removed, even alone over budget.
        let r = Retention {
            max_bytes: Some(1),
            max_age: None,
        };
        assert_eq!(enforce(d.path(), r, Some(&cur), SystemTime::now()), 1);
        assert!(cur.exists());
        assert_eq!(
            enforce(d.path(), Retention::default(), None, SystemTime::now()),
            0
        );
    }

    #[test]
    fn old_files_go_by_age() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "records-1-000001.ndjson", 10);
        let r = Retention {
            max_bytes: None,
            max_age: Some(Duration::from_secs(60)),
        };
        assert_eq!(enforce(d.path(), r, None, SystemTime::now()), 0);
        let later = SystemTime::now() + Duration::from_secs(120);
        assert_eq!(enforce(d.path(), r, None, later), 1);
        assert!(names(d.path()).is_empty());
    }
}
