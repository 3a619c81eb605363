//! Plugin names and on-disk layout (wire spec §4.1).
//!
//! `<work-dir>/plugin/<name>/` (mode 0701 when created) holds the executable
//! `<name>`, the stderr capture `<name>.stderr` (+ one rotated
//! `<name>.stderr.1`), and transient `.download-*` / `.staging-*` entries
//! while an install is in progress. The legacy `<name>.stdout` is removed.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

/// The agent's own product name: never loaded as a plugin.
pub(crate) const AGENT_NAME: &str = "elkeid-agent";

/// Longest accepted plugin name (a file name component must fit in 255 bytes,
/// and `<name>.stderr.1` must too).
pub(crate) const MAX_NAME_LEN: usize = 200;

/// Why a plugin name is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NameError {
    /// The name is empty.
    #[error("plugin name is empty")]
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`].
    #[error("plugin name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    /// The name has a byte outside `[0-9A-Za-z_-]`.
    #[error("plugin name has a character outside [0-9A-Za-z_-]")]
    BadChar,
    /// The name is the agent's own (`elkeid-agent`).
    #[error("plugin name {AGENT_NAME} is reserved for the agent")]
    Reserved,
}

/// Accepts exactly `^[0-9A-Za-z_-]+$`, except `elkeid-agent`.
pub(crate) fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(NameError::BadChar);
    }
    if name == AGENT_NAME {
        return Err(NameError::Reserved);
    }
    Ok(())
}

/// Paths of one plugin. Only built from a validated name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Paths {
    /// `<work-dir>/plugin/<name>/`.
    pub(crate) dir: PathBuf,
    /// `<dir>/<name>`.
    pub(crate) exe: PathBuf,
    /// `<dir>/<name>.stderr`.
    pub(crate) stderr: PathBuf,
    /// `<dir>/<name>.stderr.1` (previous capture after rotation).
    pub(crate) stderr_old: PathBuf,
    /// `<dir>/<name>.stdout` (legacy, removed).
    pub(crate) stdout_legacy: PathBuf,
}

impl Paths {
    /// Paths for `name` under `work_dir`; the name is validated first.
    pub(crate) fn new(work_dir: &Path, name: &str) -> Result<Paths, NameError> {
        validate_name(name)?;
        let dir = plugin_root(work_dir).join(name);
        Ok(Paths {
            exe: dir.join(name),
            stderr: dir.join(format!("{name}.stderr")),
            stderr_old: dir.join(format!("{name}.stderr.1")),
            stdout_legacy: dir.join(format!("{name}.stdout")),
            dir,
        })
    }

    /// Creates the plugin directory (mode 0701, parents 0700 if missing)
    /// and removes the legacy stdout file.
    pub(crate) fn prepare(&self) -> io::Result<()> {
        if let Some(root) = self.dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)?;
        }
        match std::fs::DirBuilder::new().mode(0o701).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.dir.is_dir() => {}
            Err(e) => return Err(e),
        }
        match std::fs::remove_file(&self.stdout_legacy) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Deletes the whole plugin directory (missing is fine).
    pub(crate) fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// `<work-dir>/plugin`.
pub(crate) fn plugin_root(work_dir: &Path) -> PathBuf {
    work_dir.join("plugin")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn names() {
        for ok in [
            "a",
            "collector",
            "driver_1",
            "A-b_C-9",
            "elkeid-agent2",
            "0",
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("elkeid-agent"), Err(NameError::Reserved));
        for bad in [
            "a/b", "..", ".", "a b", "é", "a.b", "a\0", "../x", "a\n", "x*",
        ] {
            assert_eq!(validate_name(bad), Err(NameError::BadChar), "{bad:?}");
        }
        assert_eq!(validate_name(&"a".repeat(201)), Err(NameError::TooLong));
        assert_eq!(validate_name(&"a".repeat(200)), Ok(()));
    }

    #[test]
    fn layout_prepare_remove() {
        let wd = tempfile::tempdir().unwrap();
        assert!(Paths::new(wd.path(), "../evil").is_err());
        let p = Paths::new(wd.path(), "collector").unwrap();
        assert_eq!(p.dir, wd.path().join("plugin/collector"));
        assert_eq!(p.exe, wd.path().join("plugin/collector/collector"));
        assert_eq!(
            p.stderr,
            wd.path().join("plugin/collector/collector.stderr")
        );
        p.prepare().unwrap();
        let mode = std::fs::metadata(&p.dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o701);
        std::fs::write(&p.stdout_legacy, b"old").unwrap();
        p.prepare().unwrap();
        assert!(!p.stdout_legacy.exists());
        std::fs::write(&p.exe, b"x").unwrap();
        p.remove().unwrap();
        assert!(!p.dir.exists());
        p.remove().unwrap();
    }
}
