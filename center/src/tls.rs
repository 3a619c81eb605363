//! Server TLS material: reads and checks the PEM files, builds the rustls
//! (ring) server configuration of the gRPC listener with the client
//! certificate REQUIRED and verified against the CA (webpki), and ALPN `h2`,
//! which Go agents require. The handshake itself runs in
//! `grpc/incoming.rs`, under a deadline (`tls_handshake_timeout_secs`).
//! Session tickets (resumption after a reconnect or a center restart) come
//! from [`crate::tickets`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;

use crate::certcache::{CachedClientVerifier, ChainCounters};
use crate::tickets::{TicketError, Ticketer};

/// Why the TLS material is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{key}: cannot read {path}: {source}")]
    Read {
        /// Config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no usable PEM item.
    #[error("{key}: {path}: {msg}")]
    Pem {
        /// Config key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The session ticket key file is unusable.
    #[error("tls ticket keys: {0}")]
    Tickets(#[from] TicketError),
}

/// The gRPC listener's TLS: the rustls configuration, the client
/// certificate verifier it uses (resumed sessions are checked with it
/// again), and the ticket keys (rotated by the center).
#[derive(Debug, Clone)]
pub(crate) struct GrpcTls {
    pub(crate) config: Arc<rustls::ServerConfig>,
    pub(crate) verifier: Arc<dyn ClientCertVerifier>,
    pub(crate) tickets: Option<Arc<Ticketer>>,
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut out = Vec::new();
    for c in CertificateDer::pem_slice_iter(pem) {
        out.push(c.map_err(|e| TlsError::Pem {
            key,
            path: path.to_path_buf(),
            msg: format!("bad PEM certificate: {e}"),
        })?);
    }
    if out.is_empty() {
        return Err(TlsError::Pem {
            key,
            path: path.to_path_buf(),
            msg: "no PEM certificate found".into(),
        });
    }
    Ok(out)
}

/// The cache of verified client chains ([`crate::certcache`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct ChainCache {
    /// Chains remembered at most (the connection limit: one per agent);
    /// 0: no cache, every chain is checked against the CA (benches).
    pub(crate) capacity: usize,
    pub(crate) counters: ChainCounters,
}

/// Session tickets sent after each TLS 1.3 handshake (rustls' default is
/// 2). An agent holds one connection and needs one ticket for its next
/// dial; a resumed handshake brings it a fresh one. Measured at 19,000
/// agents: one ticket keeps the center 15 MiB (≈ 0.8 KiB per connection)
/// smaller; the price is that a ticket spent on a dial that fails (a center
/// shutting down) leaves nothing for the next dial, which is then a full
/// handshake: 32 of 19,000 agents in a restart storm, against 0 with two.
const TLS13_TICKETS: usize = 1;

/// Loads CA, server certificate and key; mTLS with the client certificate
/// required (verified chains cached, see [`crate::certcache`]), ALPN `h2`;
/// with `ticket_keys` (a file, see [`crate::tickets`]) the server issues
/// session tickets.
pub(crate) fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    ticket_keys: Option<&Path>,
    cache: ChainCache,
) -> Result<GrpcTls, TlsError> {
    let pem_err = |k: &'static str, p: &Path, msg: String| TlsError::Pem {
        key: k,
        path: p.to_path_buf(),
        msg,
    };
    let ca_pem = read("grpc.ca_file", ca)?;
    let cert_pem = read("grpc.cert_file", cert)?;
    let cas = certs("grpc.ca_file", ca, &ca_pem)?;
    let chain = certs("grpc.cert_file", cert, &cert_pem)?;
    let key_der = PrivateKeyDer::from_pem_slice(&read("grpc.key_file", key)?).map_err(|e| {
        pem_err(
            "grpc.key_file",
            key,
            format!("no usable PEM private key: {e}"),
        )
    })?;
    // As tonic did: CA certificates webpki cannot use as anchors are skipped
    // (an error only when none is left).
    let mut roots = rustls::RootCertStore::empty();
    roots.add_parsable_certificates(cas);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| pem_err("grpc.ca_file", ca, format!("unusable CA: {e}")))?;
    // No CRLs: the verifier's answer depends only on the chain and the time,
    // which is what makes caching its accepted chains sound. Adding
    // `.with_crls(..)` above would need the cache gone (see certcache).
    let verifier: Arc<dyn ClientCertVerifier> = if cache.capacity == 0 {
        verifier
    } else {
        Arc::new(CachedClientVerifier::new(
            verifier,
            cache.capacity,
            cache.counters,
        ))
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pem_err("grpc.cert_file", cert, e.to_string()))?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(chain, key_der)
        .map_err(|e| {
            pem_err(
                "grpc.key_file",
                key,
                format!("certificate and key do not match: {e}"),
            )
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    cfg.send_tls13_tickets = TLS13_TICKETS;
    let tickets = match ticket_keys {
        Some(path) => {
            let t = Ticketer::load(path, crate::tickets::binding(&ca_pem, &cert_pem))?;
            cfg.ticketer = t.clone();
            Some(t)
        }
        None => None,
    };
    Ok(GrpcTls {
        config: Arc::new(cfg),
        verifier,
        tickets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.crt");
        let e =
            server_config(&missing, &missing, &missing, None, ChainCache::default()).unwrap_err();
        assert!(
            e.to_string().starts_with("grpc.ca_file: cannot read"),
            "{e}"
        );
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "hello").unwrap();
        let e = server_config(&junk, &junk, &junk, None, ChainCache::default()).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }
}
