//! A cache of verified client certificate chains for the gRPC listener.
//!
//! Every full handshake of an agent makes two signature checks on the
//! center: the CA's signature over the agent's certificate (the chain, the
//! same bytes on every connection of that agent, and in an Elkeid fleet the
//! same for every agent) and the agent's `CertificateVerify` signature over
//! this handshake (its proof that it holds the key). Profiled on a 2-core
//! VM, they were 14 % and 12 % of the center's CPU per new connection.
//!
//! [`CachedClientVerifier`] wraps the listener's webpki verifier and
//! remembers chains it accepted, keyed by a SHA-256 over the chain's DER
//! bytes. A later connection with the very same chain skips the chain
//! verification when the current time is inside the validity window of
//! every certificate of that chain (read from the certificates when they
//! were accepted). Nothing else is skipped:
//!
//! - the `CertificateVerify` signature is checked on every handshake, so a
//!   client that replays a known certificate without its key is refused;
//! - a chain that failed is never remembered (it is verified again, and
//!   fails again, on every attempt);
//! - an expired or not-yet-valid certificate misses the cache and meets the
//!   webpki verifier, which refuses it;
//! - the trust anchors cannot change under a cache: a new CA means a new
//!   server configuration, and a new, empty cache.
//!
//! This holds because the inner verifier's answer depends on nothing but
//! the chain's bytes and the time: it has no certificate revocation lists.
//! A verifier with CRLs must not be wrapped (a revoked chain would stay
//! accepted from the cache until it expires); `tls::server_config` says so
//! where the verifier is built.
//!
//! The cache holds at most `capacity` chains (oldest forgotten first),
//! about 100 bytes each. An agent holding a valid key can make several
//! entries of its leaf by sending different unused intermediates, pushing
//! other chains out: those are then verified again (CPU, not a bypass).
//! Hits and misses are counted
//! (`elkeid_center_tls_client_chains_total{result="cached"|"verified"}`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::der::{SEQUENCE, tlv};

/// SHA-256 over the chain (each certificate length-prefixed).
type Key = [u8; 32];

/// Seconds since the Unix epoch during which every certificate of an
/// accepted chain is valid (both ends included, as webpki checks them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    not_before: u64,
    not_after: u64,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<Key, Window>,
    order: VecDeque<Key>,
}

/// The counters of a [`CachedClientVerifier`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ChainCounters {
    /// Chains accepted from the cache.
    pub(crate) cached: Counter,
    /// Chains handed to the inner verifier (accepted or not).
    pub(crate) verified: Counter,
}

/// A client certificate verifier that remembers the chains its inner
/// verifier accepted (see the module docs).
#[derive(Debug)]
pub(crate) struct CachedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    capacity: usize,
    entries: Mutex<Entries>,
    counters: ChainCounters,
}

impl CachedClientVerifier {
    /// Wraps `inner`, remembering at most `capacity` chains.
    pub(crate) fn new(
        inner: Arc<dyn ClientCertVerifier>,
        capacity: usize,
        counters: ChainCounters,
    ) -> Self {
        Self {
            inner,
            capacity: capacity.max(1),
            entries: Mutex::new(Entries::default()),
            counters,
        }
    }

    fn key(end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>]) -> Key {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for c in std::iter::once(end_entity).chain(intermediates) {
            ctx.update(&(c.len() as u64).to_be_bytes());
            ctx.update(c);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.finish().as_ref());
        key
    }

    fn lookup(&self, key: &Key, now: u64) -> bool {
        // a panic while holding the lock left the map consistent (inserts
        // and removals are single calls): keep using it
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries
            .map
            .get(key)
            .is_some_and(|w| w.not_before <= now && now <= w.not_after)
    }

    fn remember(&self, key: Key, window: Window) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.map.insert(key, window).is_some() {
            return;
        }
        entries.order.push_back(key);
        while entries.order.len() > self.capacity {
            if let Some(old) = entries.order.pop_front() {
                entries.map.remove(&old);
            }
        }
    }

    /// Chains remembered now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|e| e.map.len()).unwrap_or(0)
    }
}

impl ClientCertVerifier for CachedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let key = Self::key(end_entity, intermediates);
        if self.lookup(&key, now.as_secs()) {
            self.counters.cached.inc();
            return Ok(ClientCertVerified::assertion());
        }
        self.counters.verified.inc();
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        // A chain whose dates cannot be read is accepted, not remembered.
        let window = std::iter::once(end_entity).chain(intermediates).try_fold(
            Window {
                not_before: 0,
                not_after: u64::MAX,
            },
            |w, c| {
                validity(c).map(|v| Window {
                    not_before: w.not_before.max(v.not_before),
                    not_after: w.not_after.min(v.not_after),
                })
            },
        );
        if let Some(w) = window {
            self.remember(key, w);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// The validity of an X.509 certificate (RFC 5280 4.1.2.5) in Unix
/// seconds; `None` when the DER does not have the expected shape.
fn validity(cert: &[u8]) -> Option<Window> {
    let (SEQUENCE, cert, _) = tlv(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(cert)? else {
        return None;
    };
    // [0] EXPLICIT version (optional), serialNumber, signature, issuer
    let mut rest = tbs;
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (SEQUENCE, validity, _) = tlv(rest)? else {
        return None;
    };
    let (tag, not_before, rest) = tlv(validity)?;
    let not_before = time(tag, not_before)?;
    let (tag, not_after, _) = tlv(rest)?;
    let not_after = time(tag, not_after)?;
    Some(Window {
        not_before,
        not_after,
    })
}

/// A DER UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) in Unix seconds.
fn time(tag: u8, s: &[u8]) -> Option<u64> {
    let digits = |b: &[u8]| -> Option<u64> {
        b.iter().try_fold(0u64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + u64::from(c - b'0'))
        })
    };
    let (year, rest) = match (tag, s.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&s[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &s[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&s[..4])?, &s[4..]),
        _ => return None,
    };
    if rest.get(10) != Some(&b'Z') {
        return None;
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (hour, min, sec) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 59 {
        return None;
    }
    if year < 1970 {
        return Some(0);
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + min * 60 + sec)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (year ≥ 1970).
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    use std::time::Duration;

    struct Pki {
        ca: CertificateDer<'static>,
        issuer: CertifiedIssuer<'static, KeyPair>,
    }

    fn ca() -> Pki {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "cache test CA");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let issuer = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
        Pki {
            ca: issuer.der().clone(),
            issuer,
        }
    }

    fn leaf(pki: &Pki, nb: u64, na: u64) -> CertificateDer<'static> {
        let mut p = CertificateParams::new(vec!["agent".to_string()]).unwrap();
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        p.not_before = epoch + Duration::from_secs(nb);
        p.not_after = epoch + Duration::from_secs(na);
        let key = KeyPair::generate().unwrap();
        p.signed_by(&key, &pki.issuer).unwrap().der().clone()
    }

    fn verifier(pki: &Pki, cap: usize) -> (CachedClientVerifier, ChainCounters) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca.clone()).unwrap();
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let counters = ChainCounters::default();
        (
            CachedClientVerifier::new(inner, cap, counters.clone()),
            counters,
        )
    }

    const NB: u64 = 1_700_000_000;
    const NA: u64 = 1_900_000_000;

    #[test]
    fn reads_validity_of_real_certificates() {
        let pki = ca();
        let w = validity(&leaf(&pki, NB, NA)).unwrap();
        assert_eq!((w.not_before, w.not_after), (NB, NA));
        // GeneralizedTime (year 2050 and after) and UTCTime on both sides of 2000
        let w = validity(&leaf(&pki, 946_684_799, 2_556_143_999)).unwrap();
        assert_eq!((w.not_before, w.not_after), (946_684_799, 2_556_143_999));
        assert_eq!(
            time(GENERALIZED_TIME, b"20500101000000Z"),
            Some(2_524_608_000)
        );
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(time(UTC_TIME, b"240229235959Z"), Some(1_709_251_199));
        for bad in [
            &b"2401010000Z"[..],
            b"240101000000+",
            b"241301000000Z",
            b"24010100006aZ",
        ] {
            assert_eq!(time(UTC_TIME, bad), None, "{bad:?}");
        }
        assert_eq!(validity(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(validity(b"\x30\x84\xff\xff\xff\xff"), None);
        assert_eq!(validity(&[]), None);
    }

    #[test]
    fn truncated_certificates_never_panic() {
        let der = leaf(&ca(), NB, NA);
        for n in 0..der.len() {
            let _ = validity(&der[..n]);
        }
    }

    #[test]
    fn a_chain_is_verified_once_then_served_from_the_cache() {
        let pki = ca();
        let (v, c) = verifier(&pki, 8);
        let cert = leaf(&pki, NB, NA);
        let now = UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000));
        for _ in 0..3 {
            v.verify_client_cert(&cert, &[], now).unwrap();
        }
        assert_eq!((c.verified.get(), c.cached.get()), (1, 2));
    }

    #[test]
    fn expiry_and_foreign_chains_still_meet_the_verifier() {
        let pki = ca();
        let (v, c) = verifier(&pki, 8);
        let cert = leaf(&pki, NB, NA);
        let at = |s: u64| UnixTime::since_unix_epoch(Duration::from_secs(s));
        v.verify_client_cert(&cert, &[], at(NA)).unwrap();
        // one second after notAfter: not from the cache, and refused
        let e = v.verify_client_cert(&cert, &[], at(NA + 1));
        assert!(e.is_err(), "{e:?}");
        // before notBefore, likewise
        assert!(v.verify_client_cert(&cert, &[], at(NB - 1)).is_err());
        assert_eq!((c.verified.get(), c.cached.get()), (3, 0));
        // a chain of another CA is refused every time, never remembered
        let other = leaf(&ca(), NB, NA);
        for _ in 0..2 {
            assert!(v.verify_client_cert(&other, &[], at(NB)).is_err());
        }
        assert_eq!((c.verified.get(), v.len()), (5, 1));
        // the same certificate with an extra intermediate is another chain
        let _ = v.verify_client_cert(&cert, std::slice::from_ref(&pki.ca), at(NB));
        assert_eq!(c.verified.get(), 6);
    }

    #[test]
    fn the_cache_is_bounded() {
        let pki = ca();
        let (v, c) = verifier(&pki, 2);
        let now = UnixTime::since_unix_epoch(Duration::from_secs(1_800_000_000));
        let certs: Vec<_> = (0..3).map(|_| leaf(&pki, NB, NA)).collect();
        for cert in &certs {
            v.verify_client_cert(cert, &[], now).unwrap();
        }
        assert_eq!(v.len(), 2);
        // the oldest was forgotten, the newest is still cached
        v.verify_client_cert(&certs[2], &[], now).unwrap();
        v.verify_client_cert(&certs[0], &[], now).unwrap();
        assert_eq!((c.verified.get(), c.cached.get()), (4, 1));
    }
}
