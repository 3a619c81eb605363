//! TLS session tickets for the gRPC listener, with keys that survive a
//! center restart, so a reconnect storm (every agent of a restarted center
//! dialing again) costs resumed handshakes instead of full ones.
//!
//! # Keys
//! `DIR/tls-ticket-keys` (mode 0600, written atomically) holds up to
//! [`MAX_KEYS`] AES-256-GCM keys, newest first, each with its creation time.
//! The newest encrypts; all decrypt. A new key is made when the newest is
//! [`ROTATE_SECS`] old (checked at start-up and every
//! [`ROTATE_CHECK`]), so no key encrypts for more than a day and a ticket
//! key older than `ROTATE_SECS * MAX_KEYS` is gone from the disk.
//! Whoever reads this file can forge tickets: it is as secret as
//! `pki/server.key`.
//!
//! # Tickets
//! `id (8) | issued (8, unix seconds, big endian) | nonce (12) | AES-256-GCM(state) + tag (16)`;
//! the id names the key, and the additional data (`id | issued | binding`)
//! authenticates the issue time and binds the ticket to the listener's CA
//! and server certificate (`binding` = SHA-256 over both files), so a ticket
//! stops working when either changes. A ticket older than [`LIFETIME_SECS`]
//! (7 days, the TLS 1.3 maximum) or from a key no longer kept is refused,
//! and the client falls back to a full handshake.
//!
//! # Identity
//! rustls restores the client certificate chain verified in the full
//! handshake from the ticket (`peer_certificates()`), so `agent_identity =
//! cert` still reads the CN of a certificate the CA signed; the TLS 1.3 PSK
//! binder proves the client holds the ticket's resumption secret, and every
//! resumed handshake still runs an ECDHE exchange (`psk_dhe_ke`). The
//! accept loop (`grpc/incoming.rs`) verifies the restored chain again
//! against the CA at resumption time (expiry included), so a resumed session
//! is never accepted on a certificate a full handshake would refuse now.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Ticket lifetime told to clients and enforced on decryption (7 days).
pub(crate) const LIFETIME_SECS: u64 = 7 * 24 * 3600;
/// Age of the newest key at which a new one is made (1 day).
pub(crate) const ROTATE_SECS: u64 = 24 * 3600;
/// Keys kept: enough that every ticket younger than [`LIFETIME_SECS`]
/// still finds its key.
pub(crate) const MAX_KEYS: usize = (LIFETIME_SECS / ROTATE_SECS) as usize + 1;
/// How often the center checks whether to rotate.
pub(crate) const ROTATE_CHECK: Duration = Duration::from_secs(3600);
/// Clock skew tolerated on a ticket's issue time (seconds in the future).
const SKEW_SECS: u64 = 300;
const ID_LEN: usize = 8;
const HEADER: usize = ID_LEN + 8 + NONCE_LEN;
const TAG_LEN: usize = 16;
const FILE_MAGIC: &str = "elkeid-center tls-ticket-keys v1";

/// Why the ticket key file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The system random generator failed.
    #[error("no random bytes for a ticket key")]
    Random,
}

struct Key {
    id: [u8; ID_LEN],
    created: u64,
    secret: [u8; 32],
    aead: LessSafeKey,
}

impl Key {
    fn new(secret: [u8; 32], created: u64) -> Option<Key> {
        let digest = ring::digest::digest(&ring::digest::SHA256, &secret);
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(digest.as_ref().get(..ID_LEN)?);
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).ok()?);
        Some(Key {
            id,
            created,
            secret,
            aead,
        })
    }
}

/// The ticket encrypter of the gRPC listener (`rustls::server::ProducesTickets`).
pub struct Ticketer {
    path: PathBuf,
    binding: [u8; 32],
    keys: RwLock<Vec<Key>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses the key file; unusable lines are skipped (a fresh key follows).
fn parse(text: &str) -> Vec<Key> {
    let mut lines = text.lines();
    if lines.next() != Some(FILE_MAGIC) {
        return Vec::new();
    }
    let mut keys = Vec::new();
    for line in lines {
        let mut f = line.split_whitespace();
        let (Some(created), Some(hex_key)) = (f.next(), f.next()) else {
            continue;
        };
        let Ok(created) = created.parse::<u64>() else {
            continue;
        };
        let mut secret = [0u8; 32];
        if hex::decode_to_slice(hex_key, &mut secret).is_err() {
            continue;
        }
        if let Some(k) = Key::new(secret, created) {
            keys.push(k);
        }
    }
    keys.sort_by_key(|k| std::cmp::Reverse(k.created));
    keys.truncate(MAX_KEYS);
    keys
}

fn render(keys: &[Key]) -> String {
    let mut s = String::from(FILE_MAGIC);
    s.push('\n');
    for k in keys {
        s.push_str(&format!("{} {}\n", k.created, hex::encode(k.secret)));
    }
    s
}

/// Replaces `path` atomically with `data`, mode 0600.
fn write_secret(path: &Path, data: &[u8]) -> Result<(), TicketError> {
    use std::io::Write;
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| TicketError::Io { path: p, source }
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(err(&tmp))?;
        f.write_all(data).map_err(err(&tmp))?;
        f.sync_all().map_err(err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(err(path))
}

impl Ticketer {
    /// Loads (or creates) the keys in `path`, rotating when due; tickets
    /// are bound to `binding` (see the module docs).
    pub(crate) fn load(path: &Path, binding: [u8; 32]) -> Result<Arc<Ticketer>, TicketError> {
        let keys = match std::fs::read_to_string(path) {
            Ok(text) => parse(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(TicketError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let t = Ticketer {
            path: path.to_path_buf(),
            binding,
            keys: RwLock::new(keys),
            rng: SystemRandom::new(),
        };
        t.rotate_at(now_secs(), true)?;
        Ok(Arc::new(t))
    }

    /// Makes a new key if the newest is [`ROTATE_SECS`] old (or there is
    /// none) and saves the file; `force_save` saves even without a change.
    /// Returns whether a key was made.
    pub(crate) fn rotate_at(&self, now: u64, force_save: bool) -> Result<bool, TicketError> {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let due = keys
            .first()
            .is_none_or(|k| now.saturating_sub(k.created) >= ROTATE_SECS || k.created > now);
        if due {
            let mut secret = [0u8; 32];
            self.rng
                .fill(&mut secret)
                .map_err(|_| TicketError::Random)?;
            let key = Key::new(secret, now).ok_or(TicketError::Random)?;
            keys.insert(0, key);
            keys.truncate(MAX_KEYS);
        }
        if due || force_save {
            write_secret(&self.path, render(&keys).as_bytes())?;
        }
        Ok(due)
    }

    /// [`Ticketer::rotate_at`] now.
    pub(crate) fn rotate(&self) -> Result<bool, TicketError> {
        self.rotate_at(now_secs(), false)
    }

    fn aad(&self, header: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(ID_LEN + 8 + self.binding.len());
        aad.extend_from_slice(header.get(..ID_LEN + 8).unwrap_or_default());
        aad.extend_from_slice(&self.binding);
        aad
    }

    fn encrypt_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(HEADER + plain.len() + TAG_LEN);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&now.to_be_bytes());
        out.extend_from_slice(&nonce);
        let aad = self.aad(&out);
        let mut body = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER + TAG_LEN {
            return None;
        }
        let (header, sealed) = ticket.split_at(HEADER);
        let issued = u64::from_be_bytes(header.get(ID_LEN..ID_LEN + 8)?.try_into().ok()?);
        if issued > now.saturating_add(SKEW_SECS) || now.saturating_sub(issued) > LIFETIME_SECS {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(header.get(ID_LEN + 8..)?).ok()?;
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys
            .iter()
            .find(|k| header.get(..ID_LEN) == Some(&k.id[..]))?;
        let aad = self.aad(header);
        let mut body = sealed.to_vec();
        let plain_len = key
            .aead
            .open_in_place(nonce, Aad::from(&aad), &mut body)
            .ok()?
            .len();
        body.truncate(plain_len);
        Some(body)
    }
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(LIFETIME_SECS).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(plain, now_secs())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, now_secs())
    }
}

/// SHA-256 over the CA and server certificate files (the ticket binding).
pub(crate) fn binding(ca_pem: &[u8], cert_pem: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&(ca_pem.len() as u64).to_be_bytes());
    ctx.update(ca_pem);
    ctx.update(cert_pem);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_survives_a_reload_and_refuses_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls-ticket-keys");
        let b = binding(b"ca", b"cert");
        let t = Ticketer::load(&path, b).unwrap();
        let now = now_secs();
        let ticket = t.encrypt_at(b"session state", now).unwrap();
        assert_eq!(
            t.decrypt_at(&ticket, now).as_deref(),
            Some(&b"session state"[..])
        );
        // a restarted center (same file) decrypts it
        let again = Ticketer::load(&path, b).unwrap();
        assert_eq!(
            again.decrypt_at(&ticket, now + 60).as_deref(),
            Some(&b"session state"[..])
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // another CA or server certificate: refused
        let other = Ticketer::load(&path, binding(b"ca2", b"cert")).unwrap();
        assert_eq!(other.decrypt_at(&ticket, now), None);
        // every flipped bit is refused, and so is every truncation
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 1;
            assert_eq!(t.decrypt_at(&bad, now), None, "bit flip at {i}");
            assert_eq!(t.decrypt_at(&ticket[..i], now), None, "truncated to {i}");
        }
        // too old, or from the future
        assert_eq!(t.decrypt_at(&ticket, now + LIFETIME_SECS + 1), None);
        assert_eq!(t.decrypt_at(&ticket, now - SKEW_SECS - 1), None);
    }

    #[test]
    fn rotation_keeps_old_keys_for_the_ticket_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let t = Ticketer::load(&path, [7; 32]).unwrap();
        let t0 = t.keys.read().unwrap()[0].created;
        let ticket = t.encrypt_at(b"x", t0).unwrap();
        assert!(!t.rotate_at(t0 + 10, false).unwrap(), "not yet due");
        let mut now = t0;
        for _ in 0..(MAX_KEYS - 1) {
            now += ROTATE_SECS;
            assert!(t.rotate_at(now, false).unwrap());
        }
        assert_eq!(t.keys.read().unwrap().len(), MAX_KEYS);
        assert_eq!(
            t.decrypt_at(&ticket, t0 + LIFETIME_SECS).as_deref(),
            Some(&b"x"[..])
        );
        // the new key encrypts
        let fresh = t.encrypt_at(b"y", now).unwrap();
        assert_eq!(&fresh[..ID_LEN], &t.keys.read().unwrap()[0].id[..]);
        // one more rotation drops the first key
        assert!(t.rotate_at(now + ROTATE_SECS, false).unwrap());
        assert_eq!(t.keys.read().unwrap().len(), MAX_KEYS);
        assert_eq!(t.decrypt_at(&ticket, t0 + 60), None);
        // saved: a reload sees the same keys
        let again = Ticketer::load(&path, [7; 32]).unwrap();
        assert_eq!(again.decrypt_at(&fresh, now).as_deref(), Some(&b"y"[..]));
        // a damaged file gives a fresh key, not an error
        std::fs::write(&path, "garbage").unwrap();
        let fresh_keys = Ticketer::load(&path, [7; 32]).unwrap();
        assert_eq!(fresh_keys.keys.read().unwrap().len(), 1);
    }
}
