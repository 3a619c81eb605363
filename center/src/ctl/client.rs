//! The signed HTTP/1.1 client of `elkeid-center ctl`: one connection per
//! call, plain or TLS (rustls, ring), AK/SK-signed with the same signer the
//! API verifies with (`http::auth::sign`).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Largest response body accepted (a `/conn/stat` of 10000 agents is
/// about 30 MiB).
const MAX_RESPONSE: usize = 256 * 1024 * 1024;

/// Why a call failed; each names what it was about.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API keys file is missing, unreadable or has no usable key.
    #[error("api keys {path}: {msg}")]
    Keys {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The CA file to trust is missing or not PEM.
    #[error("ca {path}: {msg}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The URL or server name is unusable.
    #[error("{0}")]
    Url(String),
    /// Connecting, the TLS handshake or the HTTP exchange failed.
    #[error("{url}: {msg}")]
    Call {
        /// `scheme://host:port/path`.
        url: String,
        /// What went wrong.
        msg: String,
    },
}

/// HTTP or HTTPS; `Auto` tries HTTPS and falls back to plain HTTP only
/// when the peer is on loopback and answers the TLS hello with non-TLS
/// bytes (a center started with `--http-tls false`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTPS.
    Https,
    /// HTTPS, or HTTP on loopback when the center does not speak TLS.
    Auto,
}

/// Where the API is.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Scheme to use.
    pub scheme: Scheme,
    /// Host name or IP literal (no brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl Endpoint {
    /// Parses `http://host:port`, `https://host:port` (a trailing `/` is
    /// allowed, nothing else) or bare `host:port` (scheme `Auto`).
    pub fn parse(url: &str) -> Result<Endpoint, ClientError> {
        let bad = |why: &str| ClientError::Url(format!("--url {url:?}: {why}"));
        let (scheme, rest) = if let Some(r) = url.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (Scheme::Http, r)
        } else if url.contains("://") {
            return Err(bad("only http:// and https:// are supported"));
        } else {
            (Scheme::Auto, url)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(bad("give the API root only (scheme://host:port)"));
        }
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, p) = r
                .split_once("]:")
                .ok_or_else(|| bad("expected [ipv6]:port"))?;
            (h.to_string(), p)
        } else {
            let (h, p) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected host:port"))?;
            (h.to_string(), p)
        };
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        if host.is_empty() {
            return Err(bad("empty host"));
        }
        Ok(Endpoint { scheme, host, port })
    }

    /// The `http` address of `DIR/listen.json`; an unspecified bind address
    /// (`0.0.0.0`, `::`) becomes the loopback address of its family.
    pub fn from_listen_json(path: &Path) -> Result<Endpoint, ClientError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ClientError::Url(format!(
                "cannot read {}: {e} (is the center running with this --data-dir? \
                 or pass --url https://HOST:PORT)",
                path.display()
            ))
        })?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| ClientError::Url(format!("{}: not JSON: {e}", path.display())))?;
        let addr: std::net::SocketAddr = v["http"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ClientError::Url(format!("{}: no \"http\" address", path.display())))?;
        let ip = match addr.ip() {
            IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Ok(Endpoint {
            scheme: Scheme::Auto,
            host: ip.to_string(),
            port: addr.port(),
        })
    }

    fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://{}{path}", self.authority())
    }
}

/// An access key and its secret key.
#[derive(Clone)]
pub struct ApiKey {
    /// `AccessKey`.
    pub ak: String,
    sk: String,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("ak", &self.ak)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    /// Reads the `[aksk]` table of `path` (the center's `api-keys.toml`):
    /// the pair of `access_key` (case-insensitive), or else the first in
    /// sorted order. Never creates the file.
    pub fn load(path: &Path, access_key: Option<&str>) -> Result<ApiKey, ClientError> {
        #[derive(serde::Deserialize)]
        struct KeyFile {
            #[serde(default)]
            aksk: std::collections::BTreeMap<String, String>,
        }
        let err = |msg: String| ClientError::Keys {
            path: path.to_path_buf(),
            msg,
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            err(format!(
                "{e} (the center writes it on its first start; or pass --api-keys FILE)"
            ))
        })?;
        let file: KeyFile = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        let found = match access_key {
            Some(want) => file
                .aksk
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(want))
                .ok_or_else(|| err(format!("no access key {want:?} in the [aksk] table")))?,
            None => file
                .aksk
                .into_iter()
                .next()
                .ok_or_else(|| err("the [aksk] table is empty".into()))?,
        };
        Ok(ApiKey {
            ak: found.0,
            sk: found.1,
        })
    }
}

/// TLS settings for HTTPS.
#[derive(Debug, Clone)]
pub struct TlsOptions {
    /// PEM CA certificate(s) to trust.
    pub ca: PathBuf,
    /// Name to verify the certificate against (default: the URL host).
    pub server_name: Option<String>,
}

/// A signed API client.
#[derive(Debug)]
pub struct Client {
    endpoint: Endpoint,
    key: Option<ApiKey>,
    tls: TlsOptions,
    timeout: Duration,
}

/// A decoded response.
#[derive(Debug)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
}

impl Client {
    /// A client for `endpoint`; `key: None` sends unsigned requests (a
    /// center with `--auth false`).
    pub fn new(
        endpoint: Endpoint,
        key: Option<ApiKey>,
        tls: TlsOptions,
        timeout: Duration,
    ) -> Client {
        Client {
            endpoint,
            key,
            tls,
            timeout,
        }
    }

    /// The scheme in use (after `Auto` was resolved by a first call).
    pub fn scheme(&self) -> Scheme {
        self.endpoint.scheme
    }

    /// `method path` with `body` (JSON or empty), signed; the JSON answer.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Response, ClientError> {
        match self.endpoint.scheme {
            Scheme::Http => self.call_once(false, method, path, body).await,
            Scheme::Https => self.call_once(true, method, path, body).await,
            Scheme::Auto => match self.call_once(true, method, path, body.clone()).await {
                Ok(r) => {
                    self.endpoint.scheme = Scheme::Https;
                    Ok(r)
                }
                Err(Attempt::NotTls(e)) if self.endpoint.is_loopback() => {
                    tracing::debug!(error = %e, "no TLS on loopback API, using plain HTTP");
                    self.endpoint.scheme = Scheme::Http;
                    self.call_once(false, method, path, body).await
                }
                Err(e) => Err(e),
            },
        }
        .map_err(Attempt::into_error)
    }

    async fn call_once(
        &self,
        tls: bool,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<Response, Attempt> {
        let scheme = if tls { "https" } else { "http" };
        let url = self.endpoint.url(scheme, path);
        let fail = |msg: String| {
            Attempt::Failed(ClientError::Call {
                url: url.clone(),
                msg,
            })
        };
        let req = self.request(method, path, body).map_err(&fail)?;
        let work = async {
            let tcp = TcpStream::connect((self.endpoint.host.as_str(), self.endpoint.port))
                .await
                .map_err(|e| fail(format!("cannot connect: {e}")))?;
            if tls {
                let cfg = client_config(&self.tls.ca).map_err(Attempt::Failed)?;
                let name = self
                    .tls
                    .server_name
                    .clone()
                    .unwrap_or_else(|| self.endpoint.host.clone());
                let name = ServerName::try_from(name.clone()).map_err(|_| {
                    Attempt::Failed(ClientError::Url(format!("bad TLS server name {name:?}")))
                })?;
                let stream = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        let msg = format!("TLS handshake failed: {e}");
                        if not_tls(&e) {
                            Attempt::NotTls(ClientError::Call {
                                url: url.clone(),
                                msg,
                            })
                        } else {
                            fail(msg)
                        }
                    })?;
                exchange(stream, req).await.map_err(fail)
            } else {
                exchange(tcp, req).await.map_err(fail)
            }
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| fail(format!("no answer within {:?}", self.timeout)))??;
        let body: Value = serde_json::from_slice(&bytes).map_err(|_| {
            fail(format!(
                "HTTP {status}, not JSON: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ))
        })?;
        Ok(Response { status, body })
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<http::Request<Full<Bytes>>, String> {
        let mut b = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.endpoint.authority())
            .header(http::header::USER_AGENT, "elkeid-center-ctl");
        if !body.is_empty() {
            b = b.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(key) = &self.key {
            let ts = crate::now_unix().to_string();
            let (p, q) = path.split_once('?').unwrap_or((path, ""));
            let sig = crate::http::auth::sign(&key.sk, method, p, q, &key.ak, &ts, &body);
            b = b
                .header("AccessKey", key.ak.as_str())
                .header("Signature", sig)
                .header("TimeStamp", ts);
        }
        b.body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("bad request: {e}"))
    }
}

/// A failed attempt; `NotTls` means the peer answered the TLS hello with
/// something that is not TLS.
enum Attempt {
    NotTls(ClientError),
    Failed(ClientError),
}

impl Attempt {
    fn into_error(self) -> ClientError {
        match self {
            Attempt::NotTls(e) | Attempt::Failed(e) => e,
        }
    }
}

/// Whether a handshake error says the peer does not speak TLS (a plain
/// HTTP server answers the hello with `HTTP/1.1 400`, or just closes).
fn not_tls(e: &std::io::Error) -> bool {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return true;
    }
    matches!(
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidMessage(_))
    )
}

fn client_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, ClientError> {
    let err = |msg: String| ClientError::Ca {
        path: ca.to_path_buf(),
        msg,
    };
    let pem = std::fs::read(ca).map_err(|e| {
        err(format!(
            "{e} (the center's generated CA is DIR/pki/ca.crt; or pass --ca FILE)"
        ))
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| err(format!("bad PEM certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("unusable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate in the file".into()));
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| err(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// One request/response over `io` (HTTP/1.1).
async fn exchange<S>(io: S, req: http::Request<Full<Bytes>>) -> Result<(u16, Bytes), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let result = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP request: {e}"))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| format!("HTTP body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("https://center.example:6752/").unwrap();
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (Scheme::Https, "center.example", 6752)
        );
        let e = Endpoint::parse("http://[::1]:80").unwrap();
        assert_eq!(
            (e.scheme, e.host.as_str(), e.port),
            (Scheme::Http, "::1", 80)
        );
        assert_eq!(e.authority(), "[::1]:80");
        let e = Endpoint::parse("127.0.0.1:6752").unwrap();
        assert_eq!(e.scheme, Scheme::Auto);
        assert!(e.is_loopback());
        for bad in [
            "ftp://x:1",
            "http://x",
            "http://x:1/command",
            "x:port",
            ":1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_json_unspecified_becomes_loopback() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("listen.json");
        std::fs::write(&p, r#"{"grpc":"0.0.0.0:6751","http":"0.0.0.0:6752"}"#).unwrap();
        let e = Endpoint::from_listen_json(&p).unwrap();
        assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 6752));
        std::fs::write(&p, r#"{"http":"[::]:7"}"#).unwrap();
        assert_eq!(Endpoint::from_listen_json(&p).unwrap().host, "::1");
        let missing = Endpoint::from_listen_json(&dir.path().join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }

    #[test]
    fn keys_pick_named_or_first_and_never_create() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api-keys.toml");
        let e = ApiKey::load(&p, None).unwrap_err();
        assert!(e.to_string().contains("api-keys.toml"), "{e}");
        assert!(!p.exists());
        std::fs::write(&p, "[aksk]\nzz = \"s2\"\nAa = \"s1\"\n").unwrap();
        let k = ApiKey::load(&p, None).unwrap();
        assert_eq!((k.ak.as_str(), k.sk.as_str()), ("Aa", "s1"));
        let k = ApiKey::load(&p, Some("ZZ")).unwrap();
        assert_eq!(k.sk, "s2");
        assert!(ApiKey::load(&p, Some("nope")).is_err());
        std::fs::write(&p, "[aksk]\n").unwrap();
        assert!(
            ApiKey::load(&p, None)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
    }
}
