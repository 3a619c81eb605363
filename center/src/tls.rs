//! Server TLS material: reads and checks the PEM files, builds tonic's
//! rustls (ring) configuration with the client certificate REQUIRED and
//! verified against the CA. tonic sets ALPN `h2`, which Go agents require.

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// A connection that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(key: &'static str, path: &Path, pem: &[u8]) -> Result<usize, TlsError> {
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(pem) {
        c.map_err(|e| TlsError::Pem {
            key,
            path: path.to_path_buf(),
            msg: format!("bad PEM certificate: {e}"),
        })?;
        n += 1;
    }
    if n == 0 {
        return Err(TlsError::Pem {
            key,
            path: path.to_path_buf(),
            msg: "no PEM certificate found".into(),
        });
    }
    Ok(n)
}

/// Loads CA, server certificate and key; mTLS with the client certificate required.
pub(crate) fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> Result<ServerTlsConfig, TlsError> {
    let ca_pem = read("grpc.ca_file", ca)?;
    certs("grpc.ca_file", ca, &ca_pem)?;
    let cert_pem = read("grpc.cert_file", cert)?;
    certs("grpc.cert_file", cert, &cert_pem)?;
    let key_pem = read("grpc.key_file", key)?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        key: "grpc.key_file",
        path: key.to_path_buf(),
        msg: format!("no usable PEM private key: {e}"),
    })?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(ca_pem))
        .client_auth_optional(false)
        .timeout(HANDSHAKE_TIMEOUT))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.crt");
        let e = server_config(&missing, &missing, &missing).unwrap_err();
        assert!(
            e.to_string().starts_with("grpc.ca_file: cannot read"),
            "{e}"
        );
        let junk = dir.path().join("junk.crt");
        std::fs::write(&junk, "hello").unwrap();
        let e = server_config(&junk, &junk, &junk).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }
}
