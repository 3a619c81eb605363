//! Optional HTTPS for the API (`http.tls = true`), as Elkeid's
//! `server.http.ssl.enable`: an Elkeid manager calls
//! `https://<center>:<http port>/command/`. The server certificate is the
//! gRPC one; no client certificate is asked for (requests are signed).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::tls::TlsError;

/// A connection that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent API connections.
const MAX_CONNECTIONS: usize = 1024;

/// rustls server config (ring, TLS 1.2/1.3, ALPN http/1.1) from PEM files.
pub(crate) fn server_config(
    cert: &Path,
    key: &Path,
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
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| pem_err("grpc.cert_file", cert, e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| {
        pem_err(
            "grpc.key_file",
            key,
            format!("certificate and key do not match: {e}"),
        )
    })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Serves `router` over HTTPS until `shutdown` resolves (then stops
/// accepting; open connections end with the process).
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(cfg);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(error) => {
                    tracing::warn!(%error, "http api: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "http api: too many connections");
            continue;
        };
        let acceptor = acceptor.clone();
        let router = router.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "http api: TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let svc = TowerToHyperService::new(router);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tls), svc);
            if let Err(error) = conn.await {
                tracing::debug!(%peer, %error, "http api connection ended with an error");
            }
        });
    }
}
