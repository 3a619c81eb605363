//! Automatic rollback of a self-update.
//!
//! A new binary passed `--version` and `--probe-connect` before it was
//! swapped in (`update`), but may still crash after start-up or
//! never connect when it runs for real. The swap therefore writes an
//! update journal, `<work-dir>/update.journal` (JSON, written atomically:
//! temp file, fsync, rename, directory fsync), before the rename that puts
//! the new binary at `<exe>`; the previous binary stays at `<exe>.old`.
//!
//! The journal's `trial` phase names the new file by device and inode (a
//! rename keeps both), the connect deadline (swap time + the rollback
//! bound, `--update-rollback-secs`, default 120 s), the allowed starts
//! (`--update-max-starts`, default 3) and the starts so far.
//!
//! - At every start, before anything else that could fail
//!   ([`check_at_start`]), a process running the new file counts one
//!   start; more starts than allowed, or a start after the deadline without
//!   ever having connected, rolls back: the journal turns `rolled_back`
//!   (with the reason), then `<exe>.old` is renamed over `<exe>` and the
//!   directory fsynced, and the process execs `<exe>` — the old version.
//! - While running on trial, a timer rolls back the same way at the
//!   deadline when no center was reached ([`Watch`]); the agent stops
//!   gracefully and re-execs the old binary.
//! - Once connected the journal records it; [`SETTLE`] later (the new
//!   binary stayed up) the update is committed: journal and `<exe>.old`
//!   are deleted.
//! - The restored old binary, once connected, reports the rollback as an
//!   error log record (1010, `msg` "self-update rolled back") and an
//!   abnormal heartbeat entry, and keeps the journal (`reported`) so that
//!   the same sha256 is refused instead of installed again in a loop.
//!
//! Who restarts a crashed agent: the service manager (systemd
//! `Restart=always`, procd `respawn`); the agent itself only execs (after
//! an update, after a rollback). A kill at any step of an update leaves a
//! whole binary at `<exe>` and a journal that the next start resolves:
//! the rename did not happen → the journal and the hard link are removed
//! (old version); it did → the new binary is on trial.

use std::cell::Cell;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::heartbeat::Heartbeat;
use crate::stop::{Exit, StopSignal};

/// File name of the journal in the work directory.
pub(crate) const JOURNAL: &str = "update.journal";
/// How long a connected new binary must stay up before the update is
/// committed (crashes within it still count as starts).
pub(crate) const SETTLE: Duration = Duration::from_secs(10);
/// A journal larger than this is not one of ours.
const MAX_JOURNAL: u64 = 64 * 1024;

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    /// The new binary is (about to be) at `<exe>` and has not proven itself.
    Trial,
    /// The old binary was (or is being) put back.
    RolledBack,
}

/// The update journal (`<work-dir>/update.journal`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Journal {
    pub(crate) phase: Phase,
    /// The executable path that was swapped.
    pub(crate) exe: PathBuf,
    /// Device and inode of the new binary.
    pub(crate) new_dev: u64,
    pub(crate) new_ino: u64,
    /// SHA-256 of the new binary (as in the config).
    pub(crate) sha256: String,
    /// Version of the binary that installed the update.
    pub(crate) from_version: String,
    /// Version named in the config.
    pub(crate) to_version: String,
    /// Unix time by which the new binary must have connected.
    pub(crate) deadline: i64,
    /// Starts of the new binary allowed before a rollback.
    pub(crate) max_starts: u32,
    /// Starts of the new binary so far.
    pub(crate) starts: u32,
    /// The new binary reached a center.
    pub(crate) connected: bool,
    /// Why it was rolled back.
    pub(crate) reason: String,
    /// The rollback was reported to a center.
    pub(crate) reported: bool,
}

/// `<work-dir>/update.journal`.
pub(crate) fn journal_path(work_dir: &Path) -> PathBuf {
    work_dir.join(JOURNAL)
}

/// Reads the journal; `Ok(None)` when there is none.
pub(crate) fn read(work_dir: &Path) -> io::Result<Option<Journal>> {
    let f = match std::fs::File::open(journal_path(work_dir)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = Vec::new();
    f.take(MAX_JOURNAL).read_to_end(&mut text)?;
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes the journal atomically (temp file + fsync + rename + dir fsync).
pub(crate) fn write(work_dir: &Path, j: &Journal) -> io::Result<()> {
    let path = journal_path(work_dir);
    let tmp = work_dir.join(format!("{JOURNAL}.tmp"));
    let text = serde_json::to_vec_pretty(j).map_err(io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, &path)?;
    sync_dir(work_dir)
}

/// Deletes the journal (and fsyncs the directory).
pub(crate) fn remove(work_dir: &Path) -> io::Result<()> {
    match std::fs::remove_file(journal_path(work_dir)) {
        Ok(()) => sync_dir(work_dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> i64 {
    crate::clock::now_unix()
}

/// The running executable (without the " (deleted)" suffix Linux adds
/// after it was replaced).
pub(crate) fn current_exe() -> io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    let s = p.to_string_lossy();
    match s.strip_suffix(" (deleted)") {
        Some(stripped) => Ok(PathBuf::from(stripped)),
        None => Ok(p),
    }
}

/// `<exe>.old`.
pub(crate) fn old_path(exe: &Path) -> PathBuf {
    let mut s = exe.as_os_str().to_os_string();
    s.push(".old");
    PathBuf::from(s)
}

/// Test hook: kills this process (SIGKILL, as `kill -9` would) when
/// `ELKEID_TEST_UPDATE_ABORT_AT` equals `step`. Unset (production): nothing.
pub(crate) fn abort_at(step: &str) {
    if std::env::var_os("ELKEID_TEST_UPDATE_ABORT_AT").is_some_and(|v| v == step) {
        eprintln!("elkeid-agent: ELKEID_TEST_UPDATE_ABORT_AT={step}: killing myself");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// fsync of a directory (makes renames and links in it durable).
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes `<exe>.old` left by a previous update. Call once the new
/// process has connected to a center.
pub(crate) fn cleanup_old_binary() {
    let Ok(exe) = current_exe() else { return };
    let old = old_path(&exe);
    match std::fs::remove_file(&old) {
        Ok(()) => tracing::info!(path = %old.display(), "removed the previous agent binary"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %old.display(), error = %e, "cannot remove the previous agent binary")
        }
    }
}

/// What the process does after [`check_at_start`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StartAction {
    /// No update pending.
    Normal,
    /// This process is a new binary on trial: it must connect by `deadline`.
    Trial {
        /// Unix time.
        deadline: i64,
    },
    /// This process is the restored old binary: report once connected.
    RolledBack,
    /// The rollback was just done: exec this (the old binary) instead of
    /// running.
    Reexec(PathBuf),
}

/// The result of [`check_at_start`]: the action and lines to log once
/// logging is set up (`true` = error).
#[derive(Debug)]
pub(crate) struct StartCheck {
    pub(crate) action: StartAction,
    pub(crate) notes: Vec<(bool, String)>,
}

fn same_file(m: &std::fs::Metadata, j: &Journal) -> bool {
    m.dev() == j.new_dev && m.ino() == j.new_ino
}

/// Resolves the journal at start-up: `running` is the metadata of the
/// file this process runs (`/proc/self/exe`), `now` the Unix time.
pub(crate) fn check_at_start(
    work_dir: &Path,
    running: Option<&std::fs::Metadata>,
    now: i64,
) -> StartCheck {
    let mut notes = Vec::new();
    let action = match read(work_dir) {
        Ok(None) => StartAction::Normal,
        Err(e) => {
            notes.push((
                true,
                format!("unreadable update journal removed ({e}); no rollback possible"),
            ));
            let _ = remove(work_dir);
            StartAction::Normal
        }
        Ok(Some(j)) => resolve(work_dir, j, running, now, &mut notes),
    };
    if !matches!(action, StartAction::Reexec(_)) {
        remove_staged(work_dir, &mut notes);
    }
    StartCheck { action, notes }
}

fn resolve(
    work_dir: &Path,
    mut j: Journal,
    running: Option<&std::fs::Metadata>,
    now: i64,
    notes: &mut Vec<(bool, String)>,
) -> StartAction {
    let installed = std::fs::metadata(&j.exe).ok();
    let installed_new = installed.as_ref().is_some_and(|m| same_file(m, &j));
    let running_new = running.is_some_and(|m| same_file(m, &j));
    let old = old_path(&j.exe);
    match j.phase {
        Phase::Trial if !installed_new && !running_new => {
            // Killed before the rename: `<exe>` is still the old binary.
            // Drop the hard link (only if it is that same file) and the journal.
            if let (Some(i), Ok(o)) = (installed.as_ref(), std::fs::metadata(&old))
                && i.dev() == o.dev()
                && i.ino() == o.ino()
            {
                let _ = std::fs::remove_file(&old);
            }
            let _ = remove(work_dir);
            notes.push((
                false,
                format!(
                    "self-update to {} was interrupted before the swap; running version {} stays",
                    j.to_version,
                    crate::config::VERSION
                ),
            ));
            StartAction::Normal
        }
        Phase::Trial if !running_new => {
            // The new binary is installed but this process is another file
            // (started by hand): leave the trial to the new binary.
            StartAction::Normal
        }
        Phase::Trial => {
            j.starts = j.starts.saturating_add(1);
            let reason = if j.starts > j.max_starts {
                Some(format!(
                    "the new binary started {} times without connecting and staying up",
                    j.starts - 1
                ))
            } else if !j.connected && now >= j.deadline {
                Some(
                    "the new binary did not connect to a center before the rollback deadline"
                        .into(),
                )
            } else {
                None
            };
            match reason {
                Some(reason) => match roll_back(work_dir, &mut j, &reason) {
                    Ok(exe) => StartAction::Reexec(exe),
                    Err(e) => {
                        notes.push((
                            true,
                            format!(
                                "self-update rollback impossible ({e}); keeping the new binary"
                            ),
                        ));
                        let _ = remove(work_dir);
                        StartAction::Normal
                    }
                },
                None => match write(work_dir, &j) {
                    Ok(()) => StartAction::Trial {
                        deadline: j.deadline,
                    },
                    Err(e) => {
                        notes.push((true, format!("cannot update the update journal: {e}")));
                        StartAction::Trial {
                            deadline: j.deadline,
                        }
                    }
                },
            }
        }
        Phase::RolledBack if installed_new && old.exists() => {
            // Killed between the journal and the rename: finish it.
            let reason = j.reason.clone();
            match roll_back(work_dir, &mut j, &reason) {
                Ok(exe) => StartAction::Reexec(exe),
                Err(e) => {
                    notes.push((true, format!("self-update rollback failed: {e}")));
                    StartAction::Normal
                }
            }
        }
        Phase::RolledBack if running_new => StartAction::Normal,
        Phase::RolledBack if !j.reported => StartAction::RolledBack,
        Phase::RolledBack => StartAction::Normal,
    }
}

/// Rolls back: journal `rolled_back` (durable first), then `<exe>.old`
/// renamed over `<exe>` and the directory fsynced. Returns `<exe>`.
pub(crate) fn roll_back(work_dir: &Path, j: &mut Journal, reason: &str) -> io::Result<PathBuf> {
    let old = old_path(&j.exe);
    if !old.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is missing", old.display()),
        ));
    }
    j.phase = Phase::RolledBack;
    j.reason = reason.to_string();
    j.reported = false;
    write(work_dir, j)?;
    abort_at("rollback-journaled");
    std::fs::rename(&old, &j.exe)?;
    sync_dir(j.exe.parent().unwrap_or(Path::new("/")))?;
    Ok(j.exe.clone())
}

/// Removes staged downloads a killed update left: `<work-dir>/tmp/elkeid-agent-*`
/// and `.elkeid-agent-*.new` next to the executable.
fn remove_staged(work_dir: &Path, notes: &mut Vec<(bool, String)>) {
    let mut dirs = vec![(work_dir.join("tmp"), "elkeid-agent-", "")];
    if let Ok(exe) = current_exe()
        && let Some(d) = exe.parent()
    {
        dirs.push((d.to_path_buf(), ".elkeid-agent-", ".new"));
    }
    for (dir, prefix, suffix) in dirs {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(prefix)
                && name.ends_with(suffix)
                && e.file_type().is_ok_and(|t| t.is_file())
                && std::fs::remove_file(e.path()).is_ok()
            {
                notes.push((
                    false,
                    format!(
                        "removed a staged binary left by an interrupted update: {}",
                        e.path().display()
                    ),
                ));
            }
        }
    }
}

/// The running agent's side: the deadline timer, commit after connecting,
/// the rollback report.
#[derive(Debug)]
pub(crate) struct Watch {
    work_dir: PathBuf,
    action: StartAction,
    connected: Cell<bool>,
}

impl Watch {
    pub(crate) fn new(work_dir: PathBuf, action: StartAction) -> Rc<Watch> {
        Rc::new(Watch {
            work_dir,
            action,
            connected: Cell::new(false),
        })
    }

    /// Starts the deadline timer when on trial.
    pub(crate) fn spawn(self: &Rc<Self>, stop: Rc<StopSignal>) {
        if let StartAction::Trial { deadline } = self.action {
            let w = self.clone();
            tokio::task::spawn_local(async move {
                // Clamped: a wall clock set back must not postpone it past
                // the largest configurable bound.
                let left = u64::try_from(deadline.saturating_sub(now_unix()))
                    .unwrap_or(0)
                    .min(86_400);
                tokio::time::sleep(Duration::from_secs(left)).await;
                if w.connected.get() {
                    return;
                }
                let wd = w.work_dir.clone();
                let r = tokio::task::spawn_blocking(move || -> io::Result<PathBuf> {
                    let mut j = read(&wd)?
                        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no journal"))?;
                    roll_back(
                        &wd,
                        &mut j,
                        "the new binary did not connect to a center before the rollback deadline",
                    )
                })
                .await
                .map_err(io::Error::other)
                .and_then(|r| r);
                match r {
                    Ok(exe) => {
                        tracing::warn!(exe = %exe.display(), "no center reached before the rollback deadline; restoring the previous binary");
                        stop.stop(Exit::Reexec(exe));
                    }
                    Err(e) => tracing::error!(error = %e, "self-update rollback failed"),
                }
            });
        }
    }

    /// Called at every successful connect.
    pub(crate) fn on_connect(self: &Rc<Self>, heartbeat: &Rc<Heartbeat>) {
        if self.connected.replace(true) {
            return;
        }
        let w = self.clone();
        let hb = heartbeat.clone();
        tokio::task::spawn_local(async move {
            match w.action {
                StartAction::Trial { .. } => w.commit_later().await,
                StartAction::RolledBack => w.report(&hb).await,
                StartAction::Normal | StartAction::Reexec(_) => {
                    let _ = tokio::task::spawn_blocking(cleanup_old_binary).await;
                }
            }
        });
    }

    async fn commit_later(&self) {
        let wd = self.work_dir.clone();
        let marked = tokio::task::spawn_blocking(move || -> io::Result<()> {
            if let Some(mut j) = read(&wd)?
                && j.phase == Phase::Trial
            {
                j.connected = true;
                write(&wd, &j)?;
            }
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = marked {
            tracing::warn!(error = %e, "cannot update the update journal");
        }
        tokio::time::sleep(SETTLE).await;
        let wd = self.work_dir.clone();
        let r = tokio::task::spawn_blocking(move || -> io::Result<Option<Journal>> {
            let j = read(&wd)?;
            if j.as_ref().is_some_and(|j| j.phase == Phase::Trial) {
                remove(&wd)?;
            }
            cleanup_old_binary();
            Ok(j)
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        match r {
            Ok(Some(j)) => {
                tracing::info!(from = %j.from_version, to = %j.to_version, starts = j.starts, "self-update committed");
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot commit the self-update"),
        }
    }

    async fn report(&self, hb: &Rc<Heartbeat>) {
        let wd = self.work_dir.clone();
        let j = tokio::task::spawn_blocking(move || read(&wd))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r);
        let mut j = match j {
            Ok(Some(j)) if j.phase == Phase::RolledBack && !j.reported => j,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the update journal");
                return;
            }
        };
        tracing::error!(
            from_version = %j.from_version,
            to_version = %j.to_version,
            sha256 = %j.sha256,
            starts = j.starts,
            reason = %j.reason,
            "self-update rolled back"
        );
        hb.set_abnormal(format!(
            "agent update to {} rolled back: {}",
            j.to_version, j.reason
        ));
        j.reported = true;
        let wd = self.work_dir.clone();
        let r = tokio::task::spawn_blocking(move || write(&wd, &j)).await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "cannot update the update journal");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(exe: &Path, new: &Path) -> Journal {
        let m = std::fs::metadata(new).unwrap();
        Journal {
            phase: Phase::Trial,
            exe: exe.to_path_buf(),
            new_dev: m.dev(),
            new_ino: m.ino(),
            sha256: "ab".repeat(32),
            from_version: "1.0".into(),
            to_version: "2.0".into(),
            deadline: 1000,
            max_starts: 3,
            starts: 0,
            connected: false,
            reason: String::new(),
            reported: false,
        }
    }

    /// An update stopped just before the rename: `exe` = old binary, also
    /// at `<exe>.old`, the new one staged, journal in trial.
    fn journaled() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("elkeid-agent");
        std::fs::write(&exe, b"OLD").unwrap();
        std::fs::hard_link(&exe, old_path(&exe)).unwrap();
        let new = d.path().join("staged");
        std::fs::write(&new, b"NEW").unwrap();
        write(d.path(), &journal(&exe, &new)).unwrap();
        (d, exe, new)
    }

    /// `exe` = new binary, `<exe>.old` = old one, journal in trial.
    fn installed() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let (d, exe, new) = journaled();
        std::fs::rename(&new, &exe).unwrap();
        let wd = d.path().to_path_buf();
        (d, wd, exe)
    }

    #[test]
    fn counts_starts_then_rolls_back_and_reports_once() {
        let (_d, wd, exe) = installed();
        let running = std::fs::metadata(&exe).unwrap();
        for n in 1..=3 {
            let c = check_at_start(&wd, Some(&running), 10);
            assert_eq!(c.action, StartAction::Trial { deadline: 1000 });
            assert_eq!(read(&wd).unwrap().unwrap().starts, n);
        }
        let c = check_at_start(&wd, Some(&running), 10);
        assert_eq!(c.action, StartAction::Reexec(exe.clone()));
        assert_eq!(std::fs::read(&exe).unwrap(), b"OLD");
        assert!(!old_path(&exe).exists());
        let j = read(&wd).unwrap().unwrap();
        assert_eq!(j.phase, Phase::RolledBack);
        assert!(j.reason.contains("started 3 times"), "{}", j.reason);
        // The old binary starts: it reports once connected.
        let old = std::fs::metadata(&exe).unwrap();
        assert_eq!(
            check_at_start(&wd, Some(&old), 10).action,
            StartAction::RolledBack
        );
        let mut j = read(&wd).unwrap().unwrap();
        j.reported = true;
        write(&wd, &j).unwrap();
        assert_eq!(
            check_at_start(&wd, Some(&old), 10).action,
            StartAction::Normal
        );
    }

    #[test]
    fn deadline_rolls_back_unless_connected() {
        let (_d, wd, exe) = installed();
        let running = std::fs::metadata(&exe).unwrap();
        let mut j = read(&wd).unwrap().unwrap();
        j.connected = true;
        write(&wd, &j).unwrap();
        assert!(matches!(
            check_at_start(&wd, Some(&running), 2000).action,
            StartAction::Trial { .. }
        ));
        let mut j = read(&wd).unwrap().unwrap();
        j.connected = false;
        write(&wd, &j).unwrap();
        let c = check_at_start(&wd, Some(&running), 2000);
        assert_eq!(c.action, StartAction::Reexec(exe.clone()));
        assert!(read(&wd).unwrap().unwrap().reason.contains("deadline"));
        assert_eq!(std::fs::read(&exe).unwrap(), b"OLD");
    }

    #[test]
    fn interrupted_before_rename_keeps_old_and_clears() {
        let (d, exe, _staged) = journaled();
        let running = std::fs::metadata(&exe).unwrap();
        let c = check_at_start(d.path(), Some(&running), 10);
        assert_eq!(c.action, StartAction::Normal);
        assert!(read(d.path()).unwrap().is_none());
        assert!(!old_path(&exe).exists());
        assert_eq!(std::fs::read(&exe).unwrap(), b"OLD");
    }

    #[test]
    fn rollback_interrupted_after_journal_is_finished() {
        let (_d, wd, exe) = installed();
        let mut j = read(&wd).unwrap().unwrap();
        j.phase = Phase::RolledBack;
        j.reason = "test".into();
        write(&wd, &j).unwrap();
        let running = std::fs::metadata(&exe).unwrap();
        let c = check_at_start(&wd, Some(&running), 10);
        assert_eq!(c.action, StartAction::Reexec(exe.clone()));
        assert_eq!(std::fs::read(&exe).unwrap(), b"OLD");
    }

    #[test]
    fn garbage_journal_is_removed_with_a_note() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(journal_path(d.path()), b"{not json").unwrap();
        let c = check_at_start(d.path(), None, 10);
        assert_eq!(c.action, StartAction::Normal);
        assert!(
            c.notes
                .iter()
                .any(|(err, n)| *err && n.contains("unreadable"))
        );
        assert!(!journal_path(d.path()).exists());
    }
}
