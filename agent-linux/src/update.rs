//! Self-update: a config entry named `elkeid-agent` with another version.
//!
//! Flow (works for a static binary on OpenWrt, no package manager needed):
//! 1. Download the artifact from its URLs in order with the plugin rules
//!    (caps, timeouts, SHA-256 over the full body before anything else).
//!    `tar.gz` is refused, as in Elkeid.
//! 2. `type` = `deb` / `rpm`: the file goes to `<work-dir>/tmp/` and is
//!    installed with `dpkg -i` / `rpm -Uvh`; the caller then restarts.
//! 3. Otherwise (default): the file is written next to the running
//!    executable (or in `<work-dir>/tmp/` when that is on the same file
//!    system), fsynced, made 0755 and smoke-tested with `--version`
//!    (catches a wrong architecture or a truncated file before anything is
//!    replaced); then swapped in crash-safely ([`swap`]): the current
//!    executable is hard-linked to `<exe>.old` (it stays at `<exe>` too),
//!    the new file is renamed over `<exe>` (one atomic step) and the
//!    directory is fsynced. At every instant — a kill or power loss at any
//!    step — `<exe>` is a complete binary, old or new. Before the rename
//!    the update journal is written ([`crate::rollback`]): the new binary
//!    is on trial until it has connected and stayed up, and is rolled back
//!    automatically when it crashes too often or does not connect in time.
//!    The caller shuts down gracefully and re-execs `<exe>`.
//!
//! Test hook: `ELKEID_TEST_UPDATE_ABORT_AT=<step>` kills the process
//! (SIGKILL) at that step ([`abort_at`]): `downloaded`, `synced`,
//! `journaled`, `linked`, `renamed`, `committed`, `started` (a new binary
//! on trial, before it connects), `rollback-journaled`. Only whoever sets
//! the agent's environment can use it; it cannot do more than a kill.
//!
//! If the running executable already hashes to the config's `sha256` there
//! is nothing to install: that is reported as [`UpdateError::AlreadyInstalled`]
//! instead of restarting forever because a manager's version string does
//! not match the version compiled into the binary.

use std::cell::Cell;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::fetch::{DownloadConfig, DownloadError, Downloader, sha256_file};
use crate::rollback::current_exe;
use crate::rollback::{Journal, Phase, abort_at, old_path, sync_dir};

/// How long the `--version` smoke test of a new binary may take.
const SMOKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the `--probe-connect` run of a new binary may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `dpkg -i` / `rpm -Uvh` may take.
const PACKAGE_TIMEOUT: Duration = Duration::from_secs(300);

/// What self-update needs.
#[derive(Debug, Clone)]
pub(crate) struct UpdateContext {
    /// `<work-dir>`.
    pub(crate) work_dir: PathBuf,
    /// The running agent's arguments: the new binary must connect to a
    /// center with them (`--probe-connect`) before it replaces this one.
    /// `None`: no probe (unit tests).
    pub(crate) probe_args: Option<Vec<std::ffi::OsString>>,
    /// The new binary must connect within this bound after the swap.
    pub(crate) rollback_bound: Duration,
    /// Starts of the new binary allowed before it is rolled back.
    pub(crate) max_starts: u32,
}

/// Result of a successful update.
#[derive(Debug)]
pub(crate) enum UpdateOutcome {
    /// The new version is installed at this path: shut down gracefully and
    /// re-exec it (for packages: the path the package installed over).
    Replaced(PathBuf),
}

/// Self-update errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpdateError {
    /// Another update is running.
    #[error("an update is already in progress")]
    InProgress,
    /// `tar.gz` artifacts are not accepted for the agent.
    #[error("type tar.gz is not supported for the agent")]
    TarGz,
    /// The running executable's path is unknown.
    #[error("cannot locate the running executable: {0}")]
    Exe(io::Error),
    /// The running executable already is this artifact.
    #[error("the running executable already has sha256 {0}; not restarting")]
    AlreadyInstalled(String),
    /// Download or verification failed.
    #[error("download: {0}")]
    Download(#[from] DownloadError),
    /// The new binary failed its `--version` smoke test.
    #[error("new binary failed its smoke test: {0}")]
    Smoke(String),
    /// The new binary did not connect to a center (`--probe-connect`): the
    /// running version stays.
    #[error("new binary did not connect to a center; kept the running version: {0}")]
    Probe(String),
    /// `dpkg -i` / `rpm -Uvh` failed.
    #[error("{tool} failed: {detail}")]
    Package {
        /// `dpkg` or `rpm`.
        tool: &'static str,
        /// Exit status and output tail.
        detail: String,
    },
    /// This artifact was installed before and rolled back.
    #[error("sha256 {0} was rolled back before ({1}); not installing it again")]
    RolledBackBefore(String, String),
    /// A new binary is still on trial (not yet committed).
    #[error("the previous self-update is still on trial")]
    OnTrial,
    /// Renaming or writing files failed (the old binary was restored).
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

thread_local! {
    static IN_PROGRESS: Cell<bool> = const { Cell::new(false) };
}

struct Busy;
impl Busy {
    fn enter() -> Result<Busy, UpdateError> {
        if IN_PROGRESS.with(|b| b.replace(true)) {
            return Err(UpdateError::InProgress);
        }
        Ok(Busy)
    }
}
impl Drop for Busy {
    fn drop(&mut self) {
        IN_PROGRESS.with(|b| b.set(false));
    }
}

/// Called for a Config named "elkeid-agent" whose version != ours.
pub(crate) async fn self_update(
    ctx: &UpdateContext,
    cfg: &elkeid_proto::grpc::Config,
) -> Result<UpdateOutcome, UpdateError> {
    let exe = current_exe().map_err(UpdateError::Exe)?;
    self_update_at(ctx, cfg, &exe, DownloadConfig::default()).await
}

/// [`self_update`] for an explicit executable path.
pub(crate) async fn self_update_at(
    ctx: &UpdateContext,
    cfg: &elkeid_proto::grpc::Config,
    exe: &Path,
    download: DownloadConfig,
) -> Result<UpdateOutcome, UpdateError> {
    let _busy = Busy::enter()?;
    if cfg.r#type == "tar.gz" {
        return Err(UpdateError::TarGz);
    }
    if let Ok(h) = sha256_file(exe.to_path_buf()).await
        && h.eq_ignore_ascii_case(cfg.sha256.trim())
    {
        return Err(UpdateError::AlreadyInstalled(h));
    }
    let wd = ctx.work_dir.clone();
    let journal = tokio::task::spawn_blocking(move || crate::rollback::read(&wd))
        .await
        .map_err(io::Error::other)?;
    match journal {
        Ok(Some(j)) if j.phase == Phase::Trial => return Err(UpdateError::OnTrial),
        Ok(Some(j)) if j.sha256.eq_ignore_ascii_case(cfg.sha256.trim()) => {
            return Err(UpdateError::RolledBackBefore(j.sha256, j.reason));
        }
        _ => {}
    }
    let tmp = ctx.work_dir.join("tmp");
    tokio::fs::create_dir_all(&tmp).await?;
    let dl = Downloader::new(download);
    let tag = format!(
        "elkeid-agent-{}-{}",
        sanitize(&cfg.version),
        std::process::id()
    );
    let package = match cfg.r#type.as_str() {
        "deb" => Some(("dpkg", "-i")),
        "rpm" => Some(("rpm", "-Uvh")),
        _ => None,
    };
    if let Some((tool, flag)) = package {
        let file = tmp.join(format!("{tag}.{}", cfg.r#type));
        dl.fetch_verified(&cfg.download_urls, &cfg.sha256, &file)
            .await?;
        let r = run_package_tool(tool, flag, &file).await;
        let _ = tokio::fs::remove_file(&file).await;
        r?;
        tracing::info!(version = %cfg.version, tool, "agent package installed");
        return Ok(UpdateOutcome::Replaced(exe.to_path_buf()));
    }
    let exe_dir = exe.parent().unwrap_or(Path::new("/"));
    let same_fs = match (std::fs::metadata(&tmp), std::fs::metadata(exe_dir)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev(),
        _ => false,
    };
    let new = if same_fs {
        tmp.join(&tag)
    } else {
        exe_dir.join(format!(".{tag}.new"))
    };
    dl.fetch_verified(&cfg.download_urls, &cfg.sha256, &new)
        .await?;
    abort_at("downloaded");
    let r = async {
        tokio::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).await?;
        smoke_test(&new).await?;
        if let Some(args) = &ctx.probe_args {
            probe_test(&new, args).await?;
        }
        let journal = Journal {
            phase: Phase::Trial,
            exe: exe.to_path_buf(),
            new_dev: 0,
            new_ino: 0,
            sha256: cfg.sha256.trim().to_ascii_lowercase(),
            from_version: crate::config::VERSION.to_string(),
            to_version: cfg.version.clone(),
            deadline: 0,
            max_starts: ctx.max_starts,
            starts: 0,
            connected: false,
            reason: String::new(),
            reported: false,
        };
        let (exe2, new2, wd) = (exe.to_path_buf(), new.clone(), ctx.work_dir.clone());
        let bound = ctx.rollback_bound;
        // fsyncs of a multi-MiB file: on the blocking pool.
        tokio::task::spawn_blocking(move || swap(&exe2, &new2, Some((&wd, journal, bound))))
            .await
            .map_err(io::Error::other)?
    }
    .await;
    if r.is_err() {
        let _ = tokio::fs::remove_file(&new).await;
    }
    r?;
    abort_at("committed");
    tracing::info!(version = %cfg.version, exe = %exe.display(), "new agent binary in place");
    Ok(UpdateOutcome::Replaced(exe.to_path_buf()))
}

/// The journal written by [`swap`]: its template (device, inode and
/// deadline are filled in), the work directory and the rollback bound.
type SwapJournal<'a> = (&'a Path, Journal, Duration);

/// Crash-safe replacement of `exe` by `new` (same file system), keeping
/// the current binary as `<exe>.old`:
/// 1. fsync `new` (its bytes are on disk before any name points at it);
/// 2. write the update journal (trial: the new file's device and inode,
///    the connect deadline), atomically;
/// 3. hard-link `exe` to `<exe>.old` (a stale `.old` is removed first);
/// 4. rename `new` over `exe` — atomic: `exe` is the old or the new file;
/// 5. fsync the directory.
///
/// A failure before step 4 leaves `exe` untouched (and removes the link
/// and the journal).
pub(crate) fn swap(
    exe: &Path,
    new: &Path,
    journal: Option<SwapJournal<'_>>,
) -> Result<(), UpdateError> {
    const STEPS: [&str; 6] = ["", "", "synced", "journaled", "linked", "renamed"];
    swap_steps(exe, new, journal, &mut |step| {
        abort_at(STEPS[usize::from(step).min(5)]);
        Ok(())
    })
}

/// [`swap`] with a hook called before each step (1..=5), for tests that
/// stop the swap at every step.
fn swap_steps(
    exe: &Path,
    new: &Path,
    journal: Option<SwapJournal<'_>>,
    before: &mut dyn FnMut(u8) -> io::Result<()>,
) -> Result<(), UpdateError> {
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let old = old_path(exe);
    before(1)?;
    let f = std::fs::File::open(new)?;
    f.sync_all()?;
    let meta = f.metadata()?;
    drop(f);
    before(2)?;
    let work_dir = journal.as_ref().map(|(wd, _, _)| wd.to_path_buf());
    if let Some((wd, mut j, bound)) = journal {
        j.new_dev = meta.dev();
        j.new_ino = meta.ino();
        j.deadline = crate::rollback::now_unix()
            .saturating_add(i64::try_from(bound.as_secs()).unwrap_or(i64::MAX));
        crate::rollback::write(wd, &j)?;
    }
    let undo_journal = || {
        if let Some(wd) = &work_dir {
            let _ = crate::rollback::remove(wd);
        }
    };
    if let Err(e) = before(3) {
        undo_journal();
        return Err(e.into());
    }
    match std::fs::remove_file(&old) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            undo_journal();
            return Err(e.into());
        }
    }
    if let Err(e) = std::fs::hard_link(exe, &old) {
        undo_journal();
        return Err(e.into());
    }
    let r = before(4).and_then(|()| std::fs::rename(new, exe));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&old);
        undo_journal();
        return Err(e.into());
    }
    before(5)?;
    sync_dir(dir)?;
    Ok(())
}

/// Runs `<new> --version`; it must exit 0 in time.
async fn smoke_test(new: &Path) -> Result<(), UpdateError> {
    let child = tokio::process::Command::new(new)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| UpdateError::Smoke(e.to_string()))?;
    match tokio::time::timeout(SMOKE_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(UpdateError::Smoke("--version timed out".into())),
        Ok(Err(e)) => Err(UpdateError::Smoke(e.to_string())),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => Err(UpdateError::Smoke(format!(
            "--version exited with {}",
            out.status
        ))),
    }
}

/// Runs `<new> --probe-connect <the running agent's arguments>`: the new
/// binary must reach a center (TLS + HTTP/2) in time. Exit code 64 (a
/// binary without the flag, e.g. an older version) is accepted with a
/// warning; any other failure refuses the update.
async fn probe_test(new: &Path, args: &[std::ffi::OsString]) -> Result<(), UpdateError> {
    let child = tokio::process::Command::new(new)
        .arg("--probe-connect")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| UpdateError::Probe(e.to_string()))?;
    match tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(UpdateError::Probe("--probe-connect timed out".into())),
        Ok(Err(e)) => Err(UpdateError::Probe(e.to_string())),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) if out.status.code() == Some(64) => {
            tracing::warn!("new binary does not support --probe-connect; installing unprobed");
            Ok(())
        }
        Ok(Ok(out)) => {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err.trim().chars().take(200).collect();
            Err(UpdateError::Probe(format!("exit {}: {tail}", out.status)))
        }
    }
}

async fn run_package_tool(tool: &'static str, flag: &str, file: &Path) -> Result<(), UpdateError> {
    let fail = |detail: String| UpdateError::Package { tool, detail };
    let child = tokio::process::Command::new(tool)
        .arg(flag)
        .arg(file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(e.to_string()))?;
    match tokio::time::timeout(PACKAGE_TIMEOUT, child.wait_with_output()).await {
        Err(_) => Err(fail("timed out".into())),
        Ok(Err(e)) => Err(fail(e.to_string())),
        Ok(Ok(out)) if out.status.success() => Ok(()),
        Ok(Ok(out)) => {
            let text = String::from_utf8_lossy(&out.stderr);
            let tail: String = text
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(fail(format!("{}: {}", out.status, tail.trim())))
        }
    }
}

/// Puts `<exe>.old` back over `<exe>` (the new binary could not be
/// started). Returns whether an old binary was restored.
pub(crate) fn restore_old_binary(exe: &Path) -> io::Result<bool> {
    let old = old_path(exe);
    if !old.exists() {
        return Ok(false);
    }
    std::fs::rename(&old, exe)?;
    if let Some(dir) = exe.parent() {
        sync_dir(dir)?;
    }
    Ok(true)
}

/// Keeps `[0-9A-Za-z._-]` of a version for a file name.
fn sanitize(v: &str) -> String {
    v.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{hex, tests::serve};

    fn cfg(kind: &str, sha: &str, url: String) -> elkeid_proto::grpc::Config {
        elkeid_proto::grpc::Config {
            name: "elkeid-agent".into(),
            r#type: kind.into(),
            version: "9.9.9".into(),
            sha256: sha.into(),
            signature: String::new(),
            download_urls: vec![url],
            detail: String::new(),
        }
    }

    fn setup(new_body: &[u8]) -> (tempfile::TempDir, PathBuf, String, std::net::SocketAddr) {
        let d = tempfile::tempdir().unwrap();
        let exe = d.path().join("bin/elkeid-agent");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, b"#!/bin/sh\necho old\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let addr = serve(new_body.to_vec());
        (
            d,
            exe,
            hex(ring::digest::digest(&ring::digest::SHA256, new_body).as_ref()),
            addr,
        )
    }

    #[tokio::test(flavor = "current_thread")]
    async fn replaces_binary_keeps_old_and_restores() {
        let body = b"#!/bin/sh\n[ \"$1\" = --version ] && echo 9.9.9\n".to_vec();
        let (d, exe, sha, addr) = setup(&body);
        let ctx = UpdateContext {
            work_dir: d.path().join("wd"),
            probe_args: None,
            rollback_bound: Duration::from_secs(120),
            max_starts: 3,
        };
        let c = cfg("", &sha.to_uppercase(), format!("http://{addr}/ok"));
        let out = self_update_at(&ctx, &c, &exe, DownloadConfig::default())
            .await
            .unwrap();
        let UpdateOutcome::Replaced(p) = out;
        assert_eq!(p, exe);
        assert_eq!(std::fs::read(&exe).unwrap(), body);
        assert_eq!(
            std::fs::metadata(&exe).unwrap().permissions().mode() & 0o777,
            0o755
        );
        // The journal puts the new file on trial.
        let j = crate::rollback::read(&ctx.work_dir).unwrap().unwrap();
        let m = std::fs::metadata(&exe).unwrap();
        assert_eq!(j.phase, Phase::Trial);
        assert_eq!((j.new_dev, j.new_ino), (m.dev(), m.ino()));
        assert_eq!(
            (j.to_version.as_str(), j.max_starts, j.starts),
            ("9.9.9", 3, 0)
        );
        assert_eq!(j.sha256, sha);
        assert!(j.deadline >= crate::rollback::now_unix() + 100);
        assert_eq!(
            std::fs::read(old_path(&exe)).unwrap(),
            b"#!/bin/sh\necho old\n"
        );
        // Same artifact again: nothing to do (no restart loop).
        let e = self_update_at(&ctx, &c, &exe, DownloadConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(e, UpdateError::AlreadyInstalled(_)), "{e}");
        assert!(restore_old_binary(&exe).unwrap());
        assert_eq!(std::fs::read(&exe).unwrap(), b"#!/bin/sh\necho old\n");
        assert!(!restore_old_binary(&exe).unwrap());
    }

    /// Stopping the swap before each of its steps (as a kill would) always
    /// leaves a complete binary at `exe`: the old one before the rename,
    /// the new one after it; never a missing or partial file.
    #[test]
    fn swap_leaves_a_whole_binary_at_every_step() {
        for stop_at in 1..=6u8 {
            let d = tempfile::tempdir().unwrap();
            let exe = d.path().join("elkeid-agent");
            let new = d.path().join(".elkeid-agent.new");
            std::fs::write(&exe, b"OLD BINARY").unwrap();
            std::fs::write(&new, b"NEW BINARY").unwrap();
            let mut seen = Vec::new();
            let r = swap_steps(&exe, &new, None, &mut |step| {
                // At every step boundary exe is whole.
                seen.push(std::fs::read(&exe).unwrap());
                if step == stop_at {
                    Err(io::Error::other("killed"))
                } else {
                    Ok(())
                }
            });
            assert_eq!(r.is_ok(), stop_at == 6, "stop at {stop_at}");
            for b in &seen {
                assert!(b == b"OLD BINARY" || b == b"NEW BINARY", "{b:?}");
            }
            let now = std::fs::read(&exe).unwrap();
            if stop_at <= 4 {
                assert_eq!(now, b"OLD BINARY", "stop at {stop_at}");
                assert_eq!(std::fs::read(&new).unwrap(), b"NEW BINARY");
            } else {
                assert_eq!(now, b"NEW BINARY", "stop at {stop_at}");
                assert_eq!(std::fs::read(old_path(&exe)).unwrap(), b"OLD BINARY");
                assert!(!new.exists());
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn refuses_bad_hash_broken_binary_and_tar_gz() {
        let body = b"#!/bin/sh\nexit 3\n".to_vec();
        let (d, exe, sha, addr) = setup(&body);
        let ctx = UpdateContext {
            work_dir: d.path().join("wd"),
            probe_args: None,
            rollback_bound: Duration::from_secs(120),
            max_starts: 3,
        };
        let orig = std::fs::read(&exe).unwrap();
        let bad = cfg("", &"0".repeat(64), format!("http://{addr}/ok"));
        let e = self_update_at(&ctx, &bad, &exe, DownloadConfig::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("sha256 mismatch"), "{e}");
        // Verified but fails `--version`: never swapped in.
        let broken = cfg("", &sha, format!("http://{addr}/ok"));
        let e = self_update_at(&ctx, &broken, &exe, DownloadConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(e, UpdateError::Smoke(_)), "{e}");
        let e = self_update_at(
            &ctx,
            &cfg("tar.gz", &sha, String::new()),
            &exe,
            DownloadConfig::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, UpdateError::TarGz));
        assert_eq!(std::fs::read(&exe).unwrap(), orig);
        assert!(!old_path(&exe).exists());
        // No temp files left behind.
        let tmp: Vec<_> = std::fs::read_dir(d.path().join("wd/tmp"))
            .unwrap()
            .collect();
        assert!(tmp.is_empty());
        let dir: Vec<_> = std::fs::read_dir(exe.parent().unwrap()).unwrap().collect();
        assert_eq!(dir.len(), 1);
    }
}
