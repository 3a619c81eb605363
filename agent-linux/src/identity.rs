//! Agent id (wire spec §3.2), without Elkeid's empty-id bug: when the
//! hardware-derived (UUIDv5) path cannot be used, the derivation falls
//! through to `/etc/machine-id`, then `<work-dir>/machine-id`, then a random
//! UUIDv4. The result of steps 2–7 is persisted to `<work-dir>/machine-id`
//! (mode 0600, no newline). `SPECIFIED_AGENT_ID` wins when non-empty (an
//! empty value is ignored: an empty id is never used).

use std::io::Read;
use std::path::Path;

/// OID namespace of RFC 4122 (`6ba7b812-9dad-11d1-80b4-00c04fd430c8`).
const NAMESPACE_OID: [u8; 16] = [
    0x6b, 0xa7, 0xb8, 0x12, 0x9d, 0xad, 0x11, 0xd1, 0x80, 0xb4, 0x00, 0xc0, 0x4f, 0xd4, 0x30, 0xc8,
];

/// product_uuid values shared by many boards, never used as identity.
const BOGUS_PRODUCT_UUIDS: [&str; 2] = [
    "03000200-0400-0500-0006-000700080009",
    "02000100-0300-0400-0005-000600070008",
];

/// product_name placeholder values that disqualify the hardware path.
const BOGUS_PRODUCT_NAMES: [&str; 4] =
    ["--", "unknown", "To be filled by O.E.M.", "OEM not specify"];

/// Errors deriving the id.
#[derive(Debug, thiserror::Error)]
pub(crate) enum IdentityError {
    /// `<work-dir>/machine-id` could not be written.
    #[error("cannot persist {path}: {source}")]
    Persist {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Why a string is not a UUID (mirrors Go's google/uuid distinction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UuidParseError {
    /// Not one of the accepted lengths.
    Length,
    /// Right length, bad characters or hyphens.
    Format,
}

/// Formats 16 bytes as a lowercase hyphenated UUID.
fn format_uuid(b: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(b"0123456789abcdef"[usize::from(byte >> 4)]));
        s.push(char::from(b"0123456789abcdef"[usize::from(byte & 0xf)]));
    }
    s
}

/// Parses 32-hex, 36-char hyphenated, `{...}` and `urn:uuid:` forms.
fn parse_uuid(s: &str) -> Result<[u8; 16], UuidParseError> {
    let hex: String = match s.len() {
        32 => s.to_string(),
        36 | 38 | 45 => {
            let body = match s.len() {
                36 => s,
                38 => s
                    .strip_prefix('{')
                    .and_then(|x| x.strip_suffix('}'))
                    .ok_or(UuidParseError::Format)?,
                _ => {
                    let p = s.get(..9).ok_or(UuidParseError::Format)?;
                    if !p.eq_ignore_ascii_case("urn:uuid:") {
                        return Err(UuidParseError::Format);
                    }
                    s.get(9..).ok_or(UuidParseError::Format)?
                }
            };
            let bytes = body.as_bytes();
            if [8, 13, 18, 23].iter().any(|&i| bytes.get(i) != Some(&b'-')) {
                return Err(UuidParseError::Format);
            }
            body.chars().filter(|&c| c != '-').collect()
        }
        _ => return Err(UuidParseError::Length),
    };
    if hex.len() != 32 {
        return Err(UuidParseError::Format);
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).ok_or(UuidParseError::Format)?;
        *o = u8::from_str_radix(pair, 16).map_err(|_| UuidParseError::Format)?;
    }
    Ok(out)
}

/// UUIDv5 (SHA-1) in the OID namespace.
pub(crate) fn uuid5_oid(name: &[u8]) -> String {
    let mut h = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    h.update(&NAMESPACE_OID);
    h.update(name);
    let d = h.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

/// Random UUIDv4 from `/dev/urandom` (falls back to time/pid mixing).
fn uuid4() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut h = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
        h.update(&now.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        b.copy_from_slice(&h.finish().as_ref()[..16]);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    format_uuid(&b)
}

/// Reads a file that "counts" per §3.2: readable and raw length >= 6 bytes;
/// returns its trimmed contents.
fn read_counted(root: &Path, rel: &str) -> Option<String> {
    let data = std::fs::read(root.join(rel.trim_start_matches('/'))).ok()?;
    if data.len() < 6 {
        return None;
    }
    Some(String::from_utf8_lossy(&data).trim().to_string())
}

/// Where the id came from (logged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IdSource {
    /// `SPECIFIED_AGENT_ID`.
    Specified,
    /// UUIDv5 over cloud instance id + product_uuid + eth0 MAC.
    Hardware,
    /// `/etc/machine-id`.
    MachineId,
    /// `<work-dir>/machine-id`.
    Persisted,
    /// Fresh random UUIDv4.
    Random,
}

/// Derives the id with the filesystem rooted at `root` (`/` in production).
/// Does not persist.
pub(crate) fn derive(root: &Path, work_dir: &Path, specified: Option<&str>) -> (String, IdSource) {
    if let Some(s) = specified.map(str::trim).filter(|s| !s.is_empty()) {
        return (s.to_string(), IdSource::Specified);
    }
    let mut source = String::new();
    let product_uuid = read_counted(root, "sys/class/dmi/id/product_uuid");
    for part in [
        read_counted(root, "var/lib/cloud/data/instance-id"),
        product_uuid.clone(),
        read_counted(root, "sys/class/net/eth0/address"),
    ]
    .into_iter()
    .flatten()
    {
        source.push_str(&part);
    }
    let uuid_ok = product_uuid
        .as_deref()
        .is_none_or(|u| !BOGUS_PRODUCT_UUIDS.contains(&u));
    if source.len() > 8 && uuid_ok {
        let name_ok = read_counted(root, "sys/class/dmi/id/product_name").is_some_and(|n| {
            !n.is_empty()
                && !BOGUS_PRODUCT_NAMES.contains(&n.as_str())
                && !n.eq_ignore_ascii_case("t.b.d")
        });
        if name_ok {
            return (uuid5_oid(source.as_bytes()), IdSource::Hardware);
        }
        // Elkeid stops here with an empty id; we fall through.
    }
    if let Ok(data) = std::fs::read(root.join("etc/machine-id")) {
        let text = String::from_utf8_lossy(&data);
        let trimmed = text.trim();
        match parse_uuid(trimmed) {
            Ok(b) => return (format_uuid(&b), IdSource::MachineId),
            Err(UuidParseError::Format) => {
                return (uuid5_oid(trimmed.as_bytes()), IdSource::MachineId);
            }
            Err(UuidParseError::Length) => {}
        }
    }
    if let Ok(s) = std::fs::read_to_string(work_dir.join("machine-id"))
        && let Ok(b) = parse_uuid(s.trim())
    {
        return (format_uuid(&b), IdSource::Persisted);
    }
    (uuid4(), IdSource::Random)
}

/// Derives the id (root `/`) and persists it to `<work-dir>/machine-id`
/// unless it came from `SPECIFIED_AGENT_ID`.
pub(crate) fn load(
    work_dir: &Path,
    specified: Option<&str>,
) -> Result<(String, IdSource), IdentityError> {
    let (id, src) = derive(Path::new("/"), work_dir, specified);
    if src != IdSource::Specified {
        persist(work_dir, &id)?;
    }
    Ok((id, src))
}

fn persist(work_dir: &Path, id: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = work_dir.join("machine-id");
    if std::fs::read_to_string(&path).is_ok_and(|s| s == id) {
        return Ok(());
    }
    let err = |source| IdentityError::Persist {
        path: path.clone(),
        source,
    };
    let tmp = work_dir.join("machine-id.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(id.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    // Vectors computed independently with Python:
    // uuid.uuid5(uuid.NAMESPACE_OID, s)
    #[test]
    fn uuid5_vectors() {
        assert_eq!(
            uuid5_oid(b"i-0abc123def"),
            "a593de7d-a035-5e98-b70f-e7ccec586c7e"
        );
        assert_eq!(
            uuid5_oid(b"0123456789abcdef0123456789abcdef"),
            "31d25dbd-a0d4-544a-afe1-e4ce27cd48be"
        );
    }

    #[test]
    fn hardware_path() {
        let r = tempfile::tempdir().unwrap();
        let wd = tempfile::tempdir().unwrap();
        put(r.path(), "var/lib/cloud/data/instance-id", "i-0abc123def\n");
        put(
            r.path(),
            "sys/class/dmi/id/product_uuid",
            "4C4C4544-0042-3510-8057-B4C04F4B4B32\n",
        );
        put(
            r.path(),
            "sys/class/net/eth0/address",
            "00:16:3e:12:34:56\n",
        );
        put(
            r.path(),
            "sys/class/dmi/id/product_name",
            "PowerEdge R640\n",
        );
        put(
            r.path(),
            "etc/machine-id",
            "0123456789abcdef0123456789abcdef\n",
        );
        let (id, src) = derive(r.path(), wd.path(), None);
        assert_eq!(src, IdSource::Hardware);
        assert_eq!(id, "c524c7ec-75ec-53cc-aaf0-ab6d0f6e91e3");
    }

    #[test]
    fn short_product_name_falls_through_instead_of_empty_id() {
        let r = tempfile::tempdir().unwrap();
        let wd = tempfile::tempdir().unwrap();
        put(
            r.path(),
            "sys/class/dmi/id/product_uuid",
            "4C4C4544-0042-3510-8057-B4C04F4B4B32\n",
        );
        put(r.path(), "sys/class/dmi/id/product_name", "KVM\n"); // < 6 bytes: does not count
        put(
            r.path(),
            "etc/machine-id",
            "0123456789abcdef0123456789abcdef\n",
        );
        let (id, src) = derive(r.path(), wd.path(), None);
        assert_eq!(src, IdSource::MachineId);
        assert_eq!(id, "01234567-89ab-cdef-0123-456789abcdef");
    }

    #[test]
    fn bogus_product_uuid_and_names() {
        let r = tempfile::tempdir().unwrap();
        let wd = tempfile::tempdir().unwrap();
        put(
            r.path(),
            "sys/class/dmi/id/product_uuid",
            "03000200-0400-0500-0006-000700080009",
        );
        put(r.path(), "sys/class/dmi/id/product_name", "Some Board");
        put(
            r.path(),
            "etc/machine-id",
            "zz23456789abcdef0123456789abcdef",
        );
        // bad chars at the right length: UUIDv5 over the machine-id text.
        assert_eq!(
            derive(r.path(), wd.path(), None),
            (
                "6590e96f-c7ab-5832-aa22-0133ccacb4ed".to_string(),
                IdSource::MachineId
            )
        );
        put(
            r.path(),
            "sys/class/dmi/id/product_uuid",
            "4C4C4544-0042-3510-8057-B4C04F4B4B32",
        );
        put(r.path(), "sys/class/dmi/id/product_name", "T.B.D.x");
        assert_eq!(derive(r.path(), wd.path(), None).1, IdSource::Hardware);
        put(r.path(), "sys/class/dmi/id/product_name", "t.b.d ");
        assert_eq!(derive(r.path(), wd.path(), None).1, IdSource::MachineId);
        put(
            r.path(),
            "sys/class/dmi/id/product_name",
            "To be filled by O.E.M.",
        );
        assert_eq!(derive(r.path(), wd.path(), None).1, IdSource::MachineId);
    }

    #[test]
    fn router_without_files_persists_random_then_reuses_it() {
        let r = tempfile::tempdir().unwrap();
        let wd = tempfile::tempdir().unwrap();
        let (id, src) = derive(r.path(), wd.path(), None);
        assert_eq!(src, IdSource::Random);
        let b = parse_uuid(&id).unwrap();
        assert_eq!(b[6] >> 4, 4);
        assert_eq!(b[8] >> 6, 2);
        persist(wd.path(), &id).unwrap();
        let meta = std::fs::metadata(wd.path().join("machine-id")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_to_string(wd.path().join("machine-id")).unwrap(),
            id
        );
        assert_eq!(derive(r.path(), wd.path(), None), (id, IdSource::Persisted));
    }

    #[test]
    fn specified_id_wins_unless_empty() {
        let r = tempfile::tempdir().unwrap();
        let wd = tempfile::tempdir().unwrap();
        assert_eq!(
            derive(r.path(), wd.path(), Some("abc")),
            ("abc".to_string(), IdSource::Specified)
        );
        assert_eq!(derive(r.path(), wd.path(), Some("")).1, IdSource::Random);
    }

    #[test]
    fn uuid_forms() {
        let want = "01234567-89ab-cdef-0123-456789abcdef";
        for s in [
            "0123456789ABCDEF0123456789abcdef",
            "01234567-89ab-cdef-0123-456789abcdef",
            "{01234567-89ab-cdef-0123-456789abcdef}",
            "urn:uuid:01234567-89ab-cdef-0123-456789abcdef",
        ] {
            assert_eq!(format_uuid(&parse_uuid(s).unwrap()), want, "{s}");
        }
        assert_eq!(parse_uuid("0123"), Err(UuidParseError::Length));
        assert_eq!(
            parse_uuid("01234567x89ab-cdef-0123-456789abcdef"),
            Err(UuidParseError::Format)
        );
        assert_eq!(
            parse_uuid("é123456789abcdef0123456789abcde"),
            Err(UuidParseError::Format)
        );
    }
}
