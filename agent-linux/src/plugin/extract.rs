//! `tar.gz` extraction for plugin archives, hardened (wire spec §4.2, §6.14).
//!
//! A small hand-rolled ustar/GNU/pax reader (keeps the binary small and puts
//! every check in one place) over `flate2`'s pure-Rust gunzip. Only regular
//! files and directories are accepted; symlinks, hard links, devices, FIFOs
//! and unknown entry types are errors, as are absolute paths and any `..`
//! component. Totals (bytes and entries) are capped. Everything is written
//! below a fresh staging directory that the caller moves into place, so a
//! failed extraction never touches the live plugin directory.
//!
//! Blocking: call from `spawn_blocking`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Tar block size.
const BLOCK: usize = 512;
/// Longest entry path accepted (GNU long names and pax `path` included).
pub(crate) const MAX_PATH_LEN: usize = 4096;
/// Largest pax extended header accepted.
const MAX_PAX_LEN: u64 = 64 * 1024;
/// Most entries in one archive.
pub(crate) const MAX_ENTRIES: usize = 10_000;

/// Why an archive is refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExtractError {
    /// Reading the archive or writing the files failed (includes gzip errors).
    #[error("archive i/o: {0}")]
    Io(#[from] io::Error),
    /// A header block is malformed (bad checksum, bad number, truncated).
    #[error("malformed tar header: {0}")]
    Header(&'static str),
    /// An entry path is absolute, has `..`, or is too long.
    #[error("unsafe entry path {0:?}")]
    UnsafePath(String),
    /// An entry is a link, device, FIFO or of an unknown type.
    #[error("entry {path:?} has refused type {kind:?}")]
    RefusedType {
        /// Entry path.
        path: String,
        /// Human name of the type.
        kind: &'static str,
    },
    /// The extracted size or entry count exceeds its cap.
    #[error("archive exceeds the {0} cap")]
    TooLarge(&'static str),
}

/// Caps for one extraction.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Sum of regular file sizes.
    pub(crate) max_total: u64,
    /// Entry count.
    pub(crate) max_entries: usize,
}

/// Gunzips and untars `archive` into `dest` (which must exist and be empty).
/// Returns the number of regular files written.
pub(crate) fn extract_tar_gz(
    archive: &Path,
    dest: &Path,
    limits: Limits,
) -> Result<usize, ExtractError> {
    let file = File::open(archive)?;
    let gz = flate2::read::GzDecoder::new(io::BufReader::new(file));
    extract_tar(gz, dest, limits)
}

/// Untars an uncompressed stream into `dest`.
pub(crate) fn extract_tar<R: Read>(
    mut r: R,
    dest: &Path,
    limits: Limits,
) -> Result<usize, ExtractError> {
    let mut header = [0u8; BLOCK];
    let mut total: u64 = 0;
    let mut entries = 0usize;
    let mut files = 0usize;
    // Name from a preceding GNU 'L' or pax 'x' entry.
    let mut long_name: Option<String> = None;
    loop {
        if !read_block(&mut r, &mut header)? {
            // EOF without end-of-archive blocks: accept (some writers omit them).
            return Ok(files);
        }
        if header.iter().all(|&b| b == 0) {
            return Ok(files);
        }
        entries += 1;
        if entries > limits.max_entries {
            return Err(ExtractError::TooLarge("entry count"));
        }
        verify_checksum(&header)?;
        let size = parse_size(&header[124..136])?;
        let kind = header[156];
        match kind {
            b'L' | b'x' => {
                let cap = if kind == b'L' {
                    MAX_PATH_LEN as u64
                } else {
                    MAX_PAX_LEN
                };
                if size > cap {
                    return Err(ExtractError::Header("long name / pax header too large"));
                }
                let data = read_data(&mut r, size)?;
                let name = if kind == b'L' {
                    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
                    Some(String::from_utf8_lossy(&data[..end]).into_owned())
                } else {
                    pax_path(&data)?
                };
                if name.is_some() {
                    long_name = name;
                }
                continue;
            }
            b'g' => {
                if size > MAX_PAX_LEN {
                    return Err(ExtractError::Header("pax global header too large"));
                }
                read_data(&mut r, size)?;
                continue;
            }
            _ => {}
        }
        let raw_name = match long_name.take() {
            Some(n) => n,
            None => header_name(&header),
        };
        let refused = |kind: &'static str| ExtractError::RefusedType {
            path: raw_name.clone(),
            kind,
        };
        match kind {
            b'0' | 0 | b'7' | b'5' => {}
            b'1' => return Err(refused("hard link")),
            b'2' => return Err(refused("symlink")),
            b'3' => return Err(refused("character device")),
            b'4' => return Err(refused("block device")),
            b'6' => return Err(refused("fifo")),
            _ => return Err(refused("unknown")),
        }
        let rel = safe_path(&raw_name)?;
        let mode =
            parse_octal(&header[100..108]).map_err(|_| ExtractError::Header("bad mode"))? as u32;
        let is_dir = kind == b'5' || (kind == 0 && raw_name.ends_with('/'));
        if is_dir {
            skip_data(&mut r, size)?;
            if let Some(rel) = rel {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode((mode & 0o777) | 0o700)
                    .create(dest.join(rel))?;
            }
            continue;
        }
        let Some(rel) = rel else {
            return Err(ExtractError::UnsafePath(raw_name));
        };
        total = total.saturating_add(size);
        if total > limits.max_total {
            return Err(ExtractError::TooLarge("extracted size"));
        }
        let path = dest.join(&rel);
        if let Some(parent) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(parent)?;
        }
        // A later entry of the same name wins, as with tar(1).
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .open(&path)?;
        copy_exact(&mut r, &mut out, size)?;
        skip_padding(&mut r, size)?;
        files += 1;
    }
}

/// Reads one 512-byte block; `false` at a clean EOF before its first byte.
fn read_block<R: Read>(r: &mut R, buf: &mut [u8; BLOCK]) -> Result<bool, ExtractError> {
    let mut got = 0;
    while got < BLOCK {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(ExtractError::Header("truncated header block")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

fn verify_checksum(h: &[u8; BLOCK]) -> Result<(), ExtractError> {
    let want = parse_octal(&h[148..156]).map_err(|_| ExtractError::Header("bad checksum field"))?;
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u64::from(b' ')
            } else {
                u64::from(b)
            }
        })
        .sum();
    if sum != want {
        return Err(ExtractError::Header("checksum mismatch"));
    }
    Ok(())
}

/// Octal field: optional leading spaces, digits, then NUL/space padding.
fn parse_octal(field: &[u8]) -> Result<u64, ()> {
    let mut v: u64 = 0;
    let mut seen = false;
    for &b in field {
        match b {
            b'0'..=b'7' => {
                v = v
                    .checked_mul(8)
                    .ok_or(())?
                    .checked_add(u64::from(b - b'0'))
                    .ok_or(())?;
                seen = true;
            }
            b' ' if !seen => {}
            0 | b' ' => break,
            _ => return Err(()),
        }
    }
    Ok(v)
}

/// Size field: octal, or GNU base-256 when the high bit is set.
fn parse_size(field: &[u8]) -> Result<u64, ExtractError> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .ok_or(ExtractError::Header("size overflows"))?;
        }
        return Ok(v);
    }
    parse_octal(field).map_err(|_| ExtractError::Header("bad size"))
}

/// `prefix/name` for ustar, `name` otherwise.
fn header_name(h: &[u8; BLOCK]) -> String {
    let cstr = |f: &[u8]| {
        let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
        String::from_utf8_lossy(&f[..end]).into_owned()
    };
    let name = cstr(&h[0..100]);
    if &h[257..262] == b"ustar" {
        let prefix = cstr(&h[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

/// The `path` key of a pax extended header (`"<len> key=value\n"` records).
fn pax_path(data: &[u8]) -> Result<Option<String>, ExtractError> {
    let mut rest = data;
    let mut path = None;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or(ExtractError::Header("pax record without length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or(ExtractError::Header("bad pax record length"))?;
        if len <= sp + 1 || len > rest.len() {
            return Err(ExtractError::Header("bad pax record length"));
        }
        let rec = &rest[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(v) = rec.strip_prefix(b"path=") {
            if v.len() > MAX_PATH_LEN {
                return Err(ExtractError::Header("pax path too long"));
            }
            path = Some(String::from_utf8_lossy(v).into_owned());
        } else if rec.starts_with(b"size=") {
            // Sizes beyond the 8 GiB octal field are far above our caps anyway.
            return Err(ExtractError::TooLarge("pax size"));
        }
        rest = &rest[len..];
    }
    Ok(path)
}

/// Relative, normalised path of an entry: `None` for the archive root
/// (`.` / `./`); error for absolute paths, `..`, NUL or excessive length.
fn safe_path(raw: &str) -> Result<Option<PathBuf>, ExtractError> {
    if raw.len() > MAX_PATH_LEN || raw.contains('\0') || raw.starts_with('/') {
        return Err(ExtractError::UnsafePath(raw.to_string()));
    }
    let mut out = PathBuf::new();
    for c in Path::new(raw).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(ExtractError::UnsafePath(raw.to_string()));
            }
        }
    }
    if out.as_os_str().is_empty() {
        Ok(None)
    } else {
        Ok(Some(out))
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn read_data<R: Read>(r: &mut R, size: u64) -> Result<Vec<u8>, ExtractError> {
    let mut v = Vec::new();
    copy_exact(r, &mut v, size)?;
    skip_padding(r, size)?;
    Ok(v)
}

fn skip_data<R: Read>(r: &mut R, size: u64) -> Result<(), ExtractError> {
    copy_exact(r, &mut io::sink(), size)?;
    skip_padding(r, size)
}

fn skip_padding<R: Read>(r: &mut R, size: u64) -> Result<(), ExtractError> {
    copy_exact(r, &mut io::sink(), padding(size))
}

fn copy_exact<R: Read, W: Write>(r: &mut R, w: &mut W, size: u64) -> Result<(), ExtractError> {
    let n = io::copy(&mut r.take(size), w)?;
    if n != size {
        return Err(ExtractError::Header("truncated entry data"));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const LIMITS: Limits = Limits {
        max_total: 1 << 20,
        max_entries: 100,
    };

    /// One ustar header (+ data + padding) built by hand from the format.
    pub(crate) fn entry(name: &str, kind: u8, mode: u32, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = kind;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut v = h.to_vec();
        v.extend_from_slice(data);
        v.resize(v.len() + padding(data.len() as u64) as usize, 0);
        v
    }

    pub(crate) fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut v: Vec<u8> = entries.concat();
        v.extend_from_slice(&[0u8; 1024]);
        v
    }

    fn run(tar: &[u8]) -> (tempfile::TempDir, Result<usize, ExtractError>) {
        let d = tempfile::tempdir().unwrap();
        let r = extract_tar(tar, d.path(), LIMITS);
        (d, r)
    }

    #[test]
    fn extracts_files_and_dirs() {
        let long = format!("lib/{}", "n".repeat(150));
        let tar = archive(&[
            entry("./", b'5', 0o755, b""),
            entry("./plug", b'0', 0o755, b"#!/bin/sh\necho hi\n"),
            entry("conf/", b'5', 0o700, b""),
            entry("conf/a.yaml", b'0', 0o644, &[7u8; 1000]),
            entry("././@LongLink", b'L', 0o644, format!("{long}\0").as_bytes()),
            entry("ignored", b'0', 0o600, b"long"),
        ]);
        let (d, r) = run(&tar);
        assert_eq!(r.unwrap(), 3);
        assert_eq!(
            std::fs::read(d.path().join("plug")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        let mode = std::fs::metadata(d.path().join("plug"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read(d.path().join("conf/a.yaml")).unwrap(),
            vec![7u8; 1000]
        );
        assert_eq!(std::fs::read(d.path().join(&long)).unwrap(), b"long");
        assert!(!d.path().join("ignored").exists());
    }

    #[test]
    fn pax_path_is_used() {
        let rec = "21 path=pax/name.bin\n";
        assert_eq!(rec.len(), 21);
        let tar = archive(&[
            entry("PaxHeaders/x", b'x', 0o644, rec.as_bytes()),
            entry("short", b'0', 0o644, b"p"),
        ]);
        let (d, r) = run(&tar);
        assert_eq!(r.unwrap(), 1);
        assert_eq!(std::fs::read(d.path().join("pax/name.bin")).unwrap(), b"p");
    }

    #[test]
    fn rejects_traversal_and_absolute() {
        for name in ["../evil", "a/../../evil", "/etc/passwd", "a/.."] {
            let (d, r) = run(&archive(&[entry(name, b'0', 0o644, b"x")]));
            assert!(
                matches!(r, Err(ExtractError::UnsafePath(_))),
                "{name}: {r:?}"
            );
            assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        }
        let (_d, r) = run(&archive(&[entry("../d/", b'5', 0o755, b"")]));
        assert!(matches!(r, Err(ExtractError::UnsafePath(_))));
        // Traversal through a GNU long name too.
        let (_d, r) = run(&archive(&[
            entry("././@LongLink", b'L', 0o644, b"../../x\0"),
            entry("fine", b'0', 0o644, b"x"),
        ]));
        assert!(matches!(r, Err(ExtractError::UnsafePath(_))));
    }

    #[test]
    fn rejects_links_devices_fifos() {
        for (kind, what) in [
            (b'1', "hard link"),
            (b'2', "symlink"),
            (b'3', "character device"),
            (b'4', "block device"),
            (b'6', "fifo"),
            (b'K', "unknown"),
        ] {
            let (_d, r) = run(&archive(&[entry("x", kind, 0o644, b"")]));
            match r {
                Err(ExtractError::RefusedType { kind, .. }) => assert_eq!(kind, what),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_bad_checksum_truncation_and_caps() {
        let mut tar = archive(&[entry("x", b'0', 0o644, b"data")]);
        tar[0] = b'y';
        assert!(matches!(
            run(&tar).1,
            Err(ExtractError::Header("checksum mismatch"))
        ));
        let tar = entry("x", b'0', 0o644, &[1u8; 600]);
        assert!(matches!(run(&tar[..700]).1, Err(ExtractError::Header(_))));
        let big = archive(&[
            entry("a", b'0', 0o644, &[0u8; 600_000]),
            entry("b", b'0', 0o644, &[0u8; 600_000]),
        ]);
        assert!(matches!(run(&big).1, Err(ExtractError::TooLarge(_))));
        let many: Vec<Vec<u8>> = (0..101)
            .map(|i| entry(&format!("f{i}"), b'0', 0o644, b""))
            .collect();
        assert!(matches!(
            run(&archive(&many)).1,
            Err(ExtractError::TooLarge(_))
        ));
        // A declared size that no archive could hold fails on the cap, not an allocation.
        let mut huge = entry("h", b'0', 0o644, b"");
        huge[124..136].copy_from_slice(b"77777777777\0");
        huge[148..156].copy_from_slice(b"        ");
        let sum: u32 = huge[..BLOCK].iter().map(|&b| u32::from(b)).sum();
        huge[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        assert!(matches!(run(&huge).1, Err(ExtractError::TooLarge(_))));
    }

    #[test]
    fn gzip_round_trip() {
        use std::io::Write as _;
        let d = tempfile::tempdir().unwrap();
        let tar = archive(&[entry("p", b'0', 0o700, b"bin")]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let path = d.path().join("a.tar.gz");
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let out = d.path().join("out");
        std::fs::create_dir(&out).unwrap();
        assert_eq!(extract_tar_gz(&path, &out, LIMITS).unwrap(), 1);
        assert_eq!(std::fs::read(out.join("p")).unwrap(), b"bin");
        std::fs::write(&path, b"not gzip").unwrap();
        assert!(matches!(
            extract_tar_gz(&path, &out, LIMITS),
            Err(ExtractError::Io(_))
        ));
    }
}
