//! HTTPS for the API (`http.tls = true`, the default), as Elkeid's
//! `server.http.ssl.enable`: an Elkeid manager calls
//! `https://<center>:<http port>/command/`. The server certificate is the
//! gRPC one. A single center asks for no client certificate (requests are
//! signed); a clustered one asks for an optional one, required (by
//! `auth.rs`) on center-to-center calls.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::tls::TlsError;

/// rustls server config (ring, TLS 1.2/1.3, ALPN http/1.1) from PEM files.
///
/// With `client_ca` (a clustered center), a client certificate is asked
/// for but optional: one that is presented must verify against that CA
/// (else the handshake fails); API callers without one are served as
/// before. Centers present theirs when forwarding (see `auth.rs`).
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |k: &'static str, p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            key: k,
            path: p.to_path_buf(),
            source,
        })
    };
    let pem_err = |k: &'static str, p: &Path, msg: String| TlsError::Pem {
        key: k,
        path: p.to_path_buf(),
        msg,
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read("grpc.cert_file", cert)?)
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err("grpc.cert_file", cert, format!("bad PEM certificate: {e}")))?;
    let key_der = PrivateKeyDer::from_pem_slice(&read("grpc.key_file", key)?).map_err(|e| {
        pem_err(
            "grpc.key_file",
            key,
            format!("no usable PEM private key: {e}"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| pem_err("grpc.cert_file", cert, e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read("grpc.ca_file", ca)?) {
                let c = c.map_err(|e| pem_err("grpc.ca_file", ca, format!("bad PEM: {e}")))?;
                roots
                    .add(c)
                    .map_err(|e| pem_err("grpc.ca_file", ca, e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| pem_err("grpc.ca_file", ca, e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key_der).map_err(|e| {
        pem_err(
            "grpc.key_file",
            key,
            format!("certificate and key do not match: {e}"),
        )
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
