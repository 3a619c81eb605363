//! Client TLS: mutual TLS with ALPN `h2`, verifying the center's
//! certificate against the configured CA with the configured server name
//! (default `elkeid.com`) whatever address was dialled, as Elkeid does.
//! Accepts Elkeid's X.509 v1 CA (as a trust anchor) and EKU-less leaves.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::Pem;

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// No CA, certificate or key configured nor embedded.
    #[error("no {0} configured (use --ca/--cert/--key or embed them at build time)")]
    Missing(&'static str),
    /// A PEM file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// ca, cert or key.
        what: &'static str,
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file had no usable item.
    #[error("bad PEM in {what}: {msg}")]
    Pem {
        /// ca, cert or key (with its file when it came from one).
        what: String,
        /// Details.
        msg: String,
    },
    /// The configured server name is not a DNS name.
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// rustls refused the material.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built.
    #[error("tls verifier: {0}")]
    Verifier(String),
}

/// Verifies the server chain against the CA with a fixed name, ignoring the
/// name that was dialled.
#[derive(Debug)]
struct FixedNameVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for FixedNameVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn load(what: &'static str, pem: Option<&Pem>) -> Result<Vec<u8>, TlsError> {
    let pem = pem.ok_or(TlsError::Missing(what))?;
    pem.load().map_err(|source| TlsError::Read {
        what,
        path: pem_subject(pem),
        source,
    })
}

/// The file a PEM came from, or `(embedded)`.
fn pem_subject(pem: &Pem) -> String {
    match pem {
        Pem::File(p) => p.display().to_string(),
        Pem::Embedded(_) => "(embedded)".to_string(),
    }
}

fn certs(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let v: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Pem {
            what: what.to_string(),
            msg: e.to_string(),
        })?;
    if v.is_empty() {
        return Err(TlsError::Pem {
            what: what.to_string(),
            msg: "no CERTIFICATE block".into(),
        });
    }
    Ok(v)
}

/// The server name to verify and to send as SNI.
pub(crate) fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::ServerName(name.to_string()))
}

/// Builds the client configuration from PEM bytes.
pub(crate) fn client_config_from_pem(
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
    name: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let chain = certs("cert", cert)?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Pem {
        what: "key".to_string(),
        msg: e.to_string(),
    })?;
    client_config_from_der(certs("ca", ca)?, chain, key, name)
}

/// Builds the client configuration from DER items.
fn client_config_from_der(
    cas: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    name: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut provider = rustls::crypto::ring::default_provider();
    prefer_fast_suites(&mut provider.cipher_suites, aes_in_hardware());
    let provider = Arc::new(provider);
    let mut roots = RootCertStore::empty();
    for c in cas {
        roots.add(c)?;
    }
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let verifier = FixedNameVerifier {
        inner,
        name: server_name(name)?,
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whether this CPU has AES and carry-less multiply instructions (AES-GCM
/// at full speed).
fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Orders the TLS 1.3 cipher suites the agent offers, as Go's TLS client
/// does: AES-128-GCM first where the CPU has AES instructions (cheapest
/// there, and its SHA-256 key schedule is cheaper for the center than
/// SHA-384), ChaCha20-Poly1305 first elsewhere (MIPS, ARMv7 and RISC-V
/// boxes, where software AES is several times slower). The set itself is
/// unchanged; the center picks the first it supports.
fn prefer_fast_suites(suites: &mut [rustls::SupportedCipherSuite], aes: bool) {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256};
    let first = if aes {
        TLS13_AES_128_GCM_SHA256
    } else {
        TLS13_CHACHA20_POLY1305_SHA256
    };
    // stable: the others keep their order
    suites.sort_by_key(|s| s.suite() != first);
}

/// Builds the client configuration from the agent configuration.
pub(crate) fn client_config(cfg: &crate::config::Config) -> Result<Arc<ClientConfig>, TlsError> {
    let ca = load("ca", cfg.ca.as_ref())?;
    let cert = load("cert", cfg.cert.as_ref())?;
    let key = load("key", cfg.key.as_ref())?;
    client_config_from_pem(&ca, &cert, &key, &cfg.server_name).map_err(|e| match e {
        // Name the file the bad PEM came from.
        TlsError::Pem { what, msg } => {
            let pem = match what.as_str() {
                "ca" => cfg.ca.as_ref(),
                "cert" => cfg.cert.as_ref(),
                _ => cfg.key.as_ref(),
            };
            let what = match pem {
                Some(p) => format!("{what} {}", pem_subject(p)),
                None => what,
            };
            TlsError::Pem { what, msg }
        }
        other => other,
    })
}

/// The crypto provider (for servers in tests).
#[cfg(test)]
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Pki {
        ca: String,
        /// The trust anchor both sides use (DER; X.509 v1 when asked).
        ca_der: Vec<u8>,
        server_cert: String,
        server_key: String,
        client_cert: String,
        client_key: String,
    }

    /// Elkeid-like material: CA without extensions other than what rcgen
    /// insists on, leaves with the same subject DN as the CA, SAN
    /// `elkeid.com`, no EKU.
    fn pki(san: &str, v1_ca: bool) -> Pki {
        let mut ca_p = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_p.distinguished_name.push(DnType::CountryName, "GB");
        ca_p.distinguished_name.push(DnType::LocalityName, "China");
        ca_p.distinguished_name
            .push(DnType::OrganizationName, "hids-svr");
        ca_p.distinguished_name
            .push(DnType::CommonName, "elkeid@elkeid.com");
        if !v1_ca {
            ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        }
        ca_p.use_authority_key_identifier_extension = false;
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_p.clone().self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_p.clone(), &ca_key);
        let leaf = |eku: Vec<ExtendedKeyUsagePurpose>| {
            let mut p = CertificateParams::new(vec![san.to_string()]).unwrap();
            p.distinguished_name = ca_p.distinguished_name.clone();
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::ContentCommitment,
                KeyUsagePurpose::KeyEncipherment,
                KeyUsagePurpose::DataEncipherment,
            ];
            p.extended_key_usages = eku;
            let k = KeyPair::generate().unwrap();
            let c = p.signed_by(&k, &issuer).unwrap();
            (c.pem(), k.serialize_pem())
        };
        let (server_cert, server_key) = leaf(vec![]);
        let (client_cert, client_key) = leaf(vec![]);
        let ca_der = if v1_ca {
            to_v1(ca.der(), &ca_key)
        } else {
            ca.der().to_vec()
        };
        Pki {
            ca: ca.pem(),
            ca_der,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }

    /// DER TLV at the start of `b`: (tag, header length, total length).
    fn tlv(b: &[u8]) -> (u8, usize, usize) {
        let (len, hl) = if b[1] < 0x80 {
            (usize::from(b[1]), 2)
        } else {
            let n = usize::from(b[1] & 0x7f);
            (
                b[2..2 + n]
                    .iter()
                    .fold(0usize, |l, x| l << 8 | usize::from(*x)),
                2 + n,
            )
        };
        (b[0], hl, hl + len)
    }

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let n = content.len();
        let mut v = vec![tag];
        if n < 0x80 {
            v.push(n as u8);
        } else if n < 0x100 {
            v.extend([0x81, n as u8]);
        } else {
            v.extend([0x82, (n >> 8) as u8, n as u8]);
        }
        v.extend_from_slice(content);
        v
    }

    /// Re-encodes a certificate as X.509 v1 (no version field, no
    /// extensions), re-signed with `key`, like Elkeid's shipped CA.
    fn to_v1(cert: &[u8], key: &KeyPair) -> Vec<u8> {
        use rcgen::SigningKey;
        let (_, hl, _) = tlv(cert);
        let body = &cert[hl..];
        let (_, thl, tlen) = tlv(body);
        let tbs = &body[thl..tlen];
        let (_, _, alen) = tlv(&body[tlen..]);
        let sig_alg = &body[tlen..tlen + alen];
        let mut keep = Vec::new();
        let mut p = 0;
        while p < tbs.len() {
            let (tag, _, total) = tlv(&tbs[p..]);
            if tag != 0xa0 && tag != 0xa3 {
                keep.extend_from_slice(&tbs[p..p + total]);
            }
            p += total;
        }
        let new_tbs = der(0x30, &keep);
        let mut bits = vec![0u8];
        bits.extend(key.sign(&new_tbs).unwrap());
        let mut c = new_tbs;
        c.extend_from_slice(sig_alg);
        c.extend(der(0x03, &bits));
        der(0x30, &c)
    }

    fn server_config(p: &Pki) -> Arc<rustls::ServerConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(CertificateDer::from(p.ca_der.clone())).unwrap();
        let cv = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(cv)
            .with_single_cert(
                certs("cert", p.server_cert.as_bytes()).unwrap(),
                PrivateKeyDer::from_pem_slice(p.server_key.as_bytes()).unwrap(),
            )
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(cfg)
    }

    /// Real handshake over 127.0.0.1 (an IP, verified as `name`).
    async fn handshake(p: &Pki, name: &str) -> Result<Option<Vec<u8>>, std::io::Error> {
        handshake_suite(p, name).await.map(|(alpn, _)| alpn)
    }

    /// [`handshake`], also returning the negotiated cipher suite.
    async fn handshake_suite(
        p: &Pki,
        name: &str,
    ) -> Result<(Option<Vec<u8>>, Option<rustls::CipherSuite>), std::io::Error> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sc = server_config(p);
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            if let Ok(mut t) = tokio_rustls::TlsAcceptor::from(sc).accept(s).await {
                let mut b = [0u8; 4];
                if t.read_exact(&mut b).await.is_ok() {
                    let _ = t.write_all(&b).await;
                    let _ = t.flush().await;
                }
            }
        });
        let cc = client_config_from_der(
            vec![CertificateDer::from(p.ca_der.clone())],
            certs("cert", p.client_cert.as_bytes()).unwrap(),
            PrivateKeyDer::from_pem_slice(p.client_key.as_bytes()).unwrap(),
            name,
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Dial by IP: the name verified is still `name`.
        let ip = ServerName::IpAddress(addr.ip().into());
        let r = async {
            let mut t = tokio_rustls::TlsConnector::from(cc)
                .connect(ip, tcp)
                .await?;
            t.write_all(b"ping").await?;
            let mut b = [0u8; 4];
            t.read_exact(&mut b).await?;
            assert_eq!(&b, b"ping");
            let c = t.get_ref().1;
            Ok((
                c.alpn_protocol().map(<[u8]>::to_vec),
                c.negotiated_cipher_suite().map(|s| s.suite()),
            ))
        }
        .await;
        server.abort();
        r
    }

    #[tokio::test]
    async fn eku_less_leaf_verified_by_configured_name_when_dialing_ip() {
        let p = pki("elkeid.com", false);
        let alpn = handshake(&p, "elkeid.com").await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    }

    #[tokio::test]
    async fn x509_v1_ca_is_accepted_as_trust_anchor() {
        let p = pki("elkeid.com", true);
        // Really v1: the TBSCertificate starts with the serial, not [0].
        let (_, hl, _) = tlv(&p.ca_der);
        let (_, thl, _) = tlv(&p.ca_der[hl..]);
        assert_eq!(
            p.ca_der[hl + thl],
            0x02,
            "serial INTEGER first: no version field"
        );
        let alpn = handshake(&p, "elkeid.com").await.unwrap();
        assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
        assert!(handshake(&p, "other.example").await.is_err());
    }

    #[test]
    fn suites_ordered_by_the_cpu() {
        use rustls::CipherSuite::*;
        let names = |aes| {
            let mut v = rustls::crypto::ring::default_provider().cipher_suites;
            prefer_fast_suites(&mut v, aes);
            v.iter().map(|s| s.suite()).collect::<Vec<_>>()
        };
        let default: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let (aes, soft) = (names(true), names(false));
        assert_eq!(
            aes[..2],
            [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384]
        );
        assert_eq!(
            soft[..3],
            [
                TLS13_CHACHA20_POLY1305_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_AES_128_GCM_SHA256
            ]
        );
        // the same set: only the order changes
        for mut v in [aes, soft] {
            let mut d = default.clone();
            v.sort_by_key(|s| u16::from(*s));
            d.sort_by_key(|s| u16::from(*s));
            assert_eq!(v, d);
        }
    }

    #[tokio::test]
    async fn the_server_takes_the_agents_first_suite() {
        let p = pki("elkeid.com", false);
        let (_, suite) = handshake_suite(&p, "elkeid.com").await.unwrap();
        let want = if aes_in_hardware() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        } else {
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        };
        assert_eq!(suite, Some(want));
    }

    #[tokio::test]
    async fn wrong_name_is_refused() {
        let p = pki("elkeid.com", true);
        assert!(handshake(&p, "other.example").await.is_err());
    }

    #[tokio::test]
    async fn foreign_ca_is_refused() {
        let p = pki("elkeid.com", true);
        let q = pki("elkeid.com", true);
        let mixed = Pki {
            ca: q.ca,
            ca_der: q.ca_der,
            server_cert: p.server_cert.clone(),
            server_key: p.server_key.clone(),
            client_cert: p.client_cert.clone(),
            client_key: p.client_key.clone(),
        };
        // The client trusts q's CA, the server presents p's leaf.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sc = server_config(&p);
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = tokio_rustls::TlsAcceptor::from(sc).accept(s).await;
        });
        let cc = client_config_from_pem(
            mixed.ca.as_bytes(),
            mixed.client_cert.as_bytes(),
            mixed.client_key.as_bytes(),
            "elkeid.com",
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r = tokio_rustls::TlsConnector::from(cc)
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await;
        assert!(r.is_err());
        server.abort();
    }

    #[test]
    fn bad_material_is_a_clear_error() {
        let p = pki("elkeid.com", true);
        let e = client_config_from_pem(
            b"junk",
            p.client_cert.as_bytes(),
            p.client_key.as_bytes(),
            "elkeid.com",
        )
        .unwrap_err();
        assert!(e.to_string().contains("ca"), "{e}");
        let e =
            client_config_from_pem(p.ca.as_bytes(), p.client_cert.as_bytes(), b"", "elkeid.com")
                .unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
        assert!(
            client_config_from_pem(
                p.ca.as_bytes(),
                p.client_cert.as_bytes(),
                p.client_key.as_bytes(),
                "bad name!"
            )
            .is_err()
        );
    }
}
