//! Getting a plugin's files in place: reuse, download, extract, commit.
//!
//! Two phases so that an upgrade never leaves the plugin without a binary:
//! [`stage`] does everything slow and fallible next to the live files
//! (hash check of the existing executable, download + SHA-256, `tar.gz`
//! extraction into `.staging-*`), while the old version may still run;
//! [`commit`] then only renames staged entries over the live ones (the
//! executable last), which cannot half-fail on content.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use elkeid_proto::grpc::Config;

use super::extract::{self, ExtractError, Limits};
use super::layout::Paths;
use crate::fetch::{DownloadError, Downloader, sha256_file};

/// Prefix of in-progress downloads inside the plugin dir.
const DOWNLOAD_PREFIX: &str = ".download-";
/// Prefix of in-progress extractions inside the plugin dir.
const STAGING_PREFIX: &str = ".staging-";

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstallError {
    /// Download or verification failed on every URL.
    #[error("download: {0}")]
    Download(#[from] DownloadError),
    /// The archive was refused.
    #[error("extract: {0}")]
    Extract(#[from] ExtractError),
    /// The archive has no regular file named like the plugin.
    #[error("archive has no executable named {0:?}")]
    NoExecutable(String),
    /// File system error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// The result of [`stage`].
#[derive(Debug)]
pub(crate) enum Staged {
    /// The existing executable already matches the signature.
    Reuse,
    /// A verified single-file download.
    File(PathBuf),
    /// A verified, extracted archive.
    Dir(PathBuf),
}

/// `signature`, or `sha256` when the signature is empty (§4.2).
pub(crate) fn exe_signature(cfg: &Config) -> &str {
    if cfg.signature.trim().is_empty() {
        cfg.sha256.trim()
    } else {
        cfg.signature.trim()
    }
}

/// Prepares the files of `cfg` in `paths.dir` (which must exist).
pub(crate) async fn stage(
    dl: &Downloader,
    paths: &Paths,
    cfg: &Config,
) -> Result<Staged, InstallError> {
    let dir = paths.dir.clone();
    tokio::task::spawn_blocking(move || remove_leftovers(&dir))
        .await
        .map_err(io::Error::other)??;
    if paths.exe.is_file() {
        match sha256_file(paths.exe.clone()).await {
            Ok(h) if h.eq_ignore_ascii_case(exe_signature(cfg)) => return Ok(Staged::Reuse),
            _ => {}
        }
    }
    let tag = format!("{}-{}", std::process::id(), unique());
    let download = paths.dir.join(format!("{DOWNLOAD_PREFIX}{tag}"));
    dl.fetch_verified(&cfg.download_urls, &cfg.sha256, &download)
        .await?;
    if cfg.r#type != "tar.gz" {
        tokio::fs::set_permissions(&download, std::fs::Permissions::from_mode(0o700)).await?;
        return Ok(Staged::File(download));
    }
    let staging = paths.dir.join(format!("{STAGING_PREFIX}{tag}"));
    let limits = Limits {
        max_total: dl.config().max_bytes,
        max_entries: extract::MAX_ENTRIES,
    };
    let exe_name = paths.exe.file_name().map(PathBuf::from).unwrap_or_default();
    let (archive, out) = (download.clone(), staging.clone());
    let r = tokio::task::spawn_blocking(move || -> Result<(), InstallError> {
        std::fs::create_dir(&out)?;
        extract::extract_tar_gz(&archive, &out, limits)?;
        let exe = out.join(&exe_name);
        if !std::fs::symlink_metadata(&exe).is_ok_and(|m| m.is_file()) {
            return Err(InstallError::NoExecutable(exe_name.display().to_string()));
        }
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o700))?;
        Ok(())
    })
    .await
    .map_err(io::Error::other)?;
    let _ = tokio::fs::remove_file(&download).await;
    if let Err(e) = r {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        return Err(e);
    }
    Ok(Staged::Dir(staging))
}

/// [`commit`] on the blocking pool (renames, and removal of replaced
/// directories, which may be large).
pub(crate) async fn commit_async(paths: &Paths, staged: Staged) -> Result<(), InstallError> {
    let paths = paths.clone();
    tokio::task::spawn_blocking(move || commit(&paths, staged))
        .await
        .map_err(io::Error::other)?
}

/// Moves staged files over the live ones (blocking: call through
/// [`commit_async`] on the runtime thread).
pub(crate) fn commit(paths: &Paths, staged: Staged) -> Result<(), InstallError> {
    match staged {
        Staged::Reuse => {
            std::fs::set_permissions(&paths.exe, std::fs::Permissions::from_mode(0o700))?;
        }
        Staged::File(f) => {
            if let Err(e) = std::fs::rename(&f, &paths.exe) {
                let _ = std::fs::remove_file(&f);
                return Err(e.into());
            }
        }
        Staged::Dir(staging) => {
            let r = commit_dir(paths, &staging);
            let _ = std::fs::remove_dir_all(&staging);
            r?;
        }
    }
    Ok(())
}

fn commit_dir(paths: &Paths, staging: &Path) -> Result<(), InstallError> {
    let exe_name = paths.exe.file_name().unwrap_or_default().to_os_string();
    for entry in std::fs::read_dir(staging)? {
        let entry = entry?;
        let name = entry.file_name();
        if name == exe_name {
            continue;
        }
        let target = paths.dir.join(&name);
        if entry.file_type()?.is_dir() {
            match std::fs::symlink_metadata(&target) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target)?,
                Ok(_) => std::fs::remove_file(&target)?,
                Err(_) => {}
            }
        } else if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
            std::fs::remove_dir_all(&target)?;
        }
        std::fs::rename(entry.path(), &target)?;
    }
    std::fs::rename(staging.join(&exe_name), &paths.exe)?;
    Ok(())
}

/// Drops `.download-*` / `.staging-*` left by an interrupted install.
fn remove_leftovers(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(DOWNLOAD_PREFIX) {
            let _ = std::fs::remove_file(entry.path());
        } else if name.starts_with(STAGING_PREFIX) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    Ok(())
}

/// A per-process counter for unique temp names.
fn unique() -> u64 {
    // usize: 32-bit MIPS has no 64-bit atomics, and 2^32 temp names per
    // process is plenty (the name also carries the pid).
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed) as u64
}

#[cfg(test)]
mod tests {
    use super::super::extract::tests::{archive, entry};
    use super::*;
    use crate::fetch::{DownloadConfig, hex, tests::serve};
    use std::io::Write;

    fn cfg(kind: &str, sha: &str, sig: &str, urls: Vec<String>) -> Config {
        Config {
            name: "p".into(),
            r#type: kind.into(),
            version: "1".into(),
            sha256: sha.into(),
            signature: sig.into(),
            download_urls: urls,
            detail: String::new(),
        }
    }

    fn sha(b: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tar_gz_install_reuse_and_refusals() {
        let wd = tempfile::tempdir().unwrap();
        let paths = Paths::new(wd.path(), "p").unwrap();
        paths.prepare().unwrap();
        let exe = b"#!/bin/sh\nexit 0\n";
        let tar = archive(&[
            entry("p", b'0', 0o755, exe),
            entry("conf/x.yml", b'0', 0o644, b"a: 1"),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let addr = serve(gz.clone());
        let dl = Downloader::new(DownloadConfig::default());
        let c = cfg(
            "tar.gz",
            &sha(&gz),
            &sha(exe),
            vec![format!("http://{addr}/ok")],
        );
        // Old files exist: the conf dir is replaced, the stderr file kept.
        std::fs::create_dir_all(paths.dir.join("conf")).unwrap();
        std::fs::write(paths.dir.join("conf/old.yml"), b"old").unwrap();
        std::fs::write(&paths.stderr, b"log").unwrap();
        let staged = stage(&dl, &paths, &c).await.unwrap();
        assert!(matches!(staged, Staged::Dir(_)));
        // Nothing live changed before commit.
        assert!(!paths.exe.exists());
        commit(&paths, staged).unwrap();
        assert_eq!(std::fs::read(&paths.exe).unwrap(), exe);
        assert_eq!(
            std::fs::metadata(&paths.exe).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(!paths.dir.join("conf/old.yml").exists());
        assert_eq!(
            std::fs::read(paths.dir.join("conf/x.yml")).unwrap(),
            b"a: 1"
        );
        assert_eq!(std::fs::read(&paths.stderr).unwrap(), b"log");
        let leftovers: Vec<_> = std::fs::read_dir(&paths.dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
        // Signature matches the installed exe: reused without a download.
        let offline = cfg(
            "tar.gz",
            &sha(&gz),
            &sha(exe).to_uppercase(),
            vec!["http://127.0.0.1:1/ok".into()],
        );
        assert!(matches!(
            stage(&dl, &paths, &offline).await.unwrap(),
            Staged::Reuse
        ));
        // Archive without the executable is refused and leaves nothing.
        let tar = archive(&[entry("other", b'0', 0o755, exe)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let addr = serve(gz.clone());
        let c = cfg("tar.gz", &sha(&gz), "", vec![format!("http://{addr}/ok")]);
        let e = stage(&dl, &paths, &c).await.unwrap_err();
        assert!(matches!(e, InstallError::NoExecutable(_)), "{e}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn binary_install_and_sha_mismatch() {
        let wd = tempfile::tempdir().unwrap();
        let paths = Paths::new(wd.path(), "p").unwrap();
        paths.prepare().unwrap();
        let body = b"\x7fELF not really".to_vec();
        let addr = serve(body.clone());
        let dl = Downloader::new(DownloadConfig::default());
        let bad = cfg(
            "",
            &sha(b"something else"),
            "",
            vec![format!("http://{addr}/ok")],
        );
        let e = stage(&dl, &paths, &bad).await.unwrap_err();
        assert!(e.to_string().contains("sha256 mismatch"), "{e}");
        assert_eq!(std::fs::read_dir(&paths.dir).unwrap().count(), 0);
        let good = cfg("", &sha(&body), "", vec![format!("http://{addr}/ok")]);
        let staged = stage(&dl, &paths, &good).await.unwrap();
        commit(&paths, staged).unwrap();
        assert_eq!(std::fs::read(&paths.exe).unwrap(), body);
        assert!(matches!(
            stage(&dl, &paths, &good).await.unwrap(),
            Staged::Reuse
        ));
    }
}
