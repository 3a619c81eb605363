//! Center-to-center HTTP calls: a forwarded `POST /command/`, a fan-out
//! `GET /conn/stat`, a forwarded `POST /conn/reset`.
//!
//! Each call is one HTTP/1.1 request on a fresh connection to the peer's
//! API address, signed with this center's AK/SK exactly as an API caller
//! signs (all centers of a cluster share `api-keys.toml`), and marked with
//! [`FORWARDED_HEADER`] so the peer answers from its own pool only (no
//! forwarding loops). When the peer serves HTTPS (`--http-tls true`) the
//! connection is TLS, verified against the cluster CA with the name
//! `elkeid.com`, and this center presents its own certificate (the server
//! certificate, which must allow client authentication: no extended key
//! usage, or one listing clientAuth, as the generated one does). The
//! receiving center verifies it against the same CA and refuses a
//! forwarded call without one (mutual TLS on top of the AK/SK signature).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;

use super::CenterInfo;

/// Set on forwarded requests (value: the sending center's id).
pub(crate) const FORWARDED_HEADER: &str = "x-elkeid-forwarded-by";
/// Largest peer response read.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// How this center calls its peers.
#[derive(Clone)]
pub(crate) struct PeerClient {
    /// This center's id (sent in [`FORWARDED_HEADER`]).
    pub(crate) me: String,
    /// AK/SK used to sign; `None` when this center has auth off.
    pub(crate) key: Option<(String, String)>,
    /// TLS client config for peers that serve HTTPS.
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    /// Whole-call timeout.
    pub(crate) timeout: Duration,
}

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("me", &self.me)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// The rustls client config for peers: trusts `ca`, presents `cert`/`key`.
pub(crate) fn tls_config(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))? {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let mut cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| e.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

impl PeerClient {
    /// One signed request to `peer`; returns the HTTP status and body.
    pub(crate) async fn call(
        &self,
        peer: &CenterInfo,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        tokio::time::timeout(self.timeout, self.call_inner(peer, method, path, body))
            .await
            .map_err(|_| format!("center {} did not answer in time", peer.id))?
    }

    async fn call_inner(
        &self,
        peer: &CenterInfo,
        method: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes), String> {
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, peer.http.as_str())
            .header(FORWARDED_HEADER, self.me.as_str())
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some((ak, sk)) = &self.key {
            let (p, q) = path.split_once('?').unwrap_or((path, ""));
            let ts = crate::now_unix().to_string();
            let sig = crate::http::auth::sign(sk, method, p, q, ak, &ts, &body);
            req = req
                .header("AccessKey", ak.as_str())
                .header("Signature", sig)
                .header("TimeStamp", ts);
        }
        let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::connect(peer.http.as_str())
            .await
            .map_err(|e| format!("center {} ({}): {e}", peer.id, peer.http))?;
        let _ = tcp.set_nodelay(true);
        if peer.https {
            let cfg = self
                .tls
                .clone()
                .ok_or_else(|| format!("center {} serves HTTPS but no TLS material", peer.id))?;
            let name = ServerName::try_from("elkeid.com").map_err(|e| e.to_string())?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("center {} TLS: {e}", peer.id))?;
            send(TokioIo::new(tls), req).await
        } else {
            send(TokioIo::new(tcp), req).await
        }
    }
}

async fn send<T>(io: T, req: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    let out = match resp {
        Ok(resp) => {
            let status = resp.status().as_u16();
            Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map(|b| (status, b.to_bytes()))
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e),
    };
    driver.abort();
    out
}
