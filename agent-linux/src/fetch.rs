//! The agent's one HTTP(S) client: artifact downloads for plugins and
//! self-update (with a SHA-256 check, §4.2) and the small in-memory GET of
//! service discovery ([`get`]).
//!
//! Each URL is tried in order: HTTP/1.1 GET over plain TCP or rustls
//! (system CA bundle + an optional extra CA file), dial + TLS handshake
//! bounded by `connect_timeout` (15 s), the whole request by
//! `total_timeout` (10 min), the body by `max_bytes` (512 MiB). Non-2xx,
//! oversize, I/O errors and hash mismatches move on to the next URL and
//! delete the partial file. The SHA-256 covers the full body and is compared
//! case-insensitively; nothing is extracted or executed before it matches.
//! File writes (`tokio::fs`), deletes and hashing run on the blocking pool,
//! never on the runtime thread.

use std::cell::RefCell;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Where system CA bundles usually live (Debian/OpenWrt, RHEL, SUSE, Alpine).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// Download limits.
#[derive(Debug, Clone)]
pub(crate) struct DownloadConfig {
    /// Largest body accepted (default 512 MiB).
    pub(crate) max_bytes: u64,
    /// Dial + TLS handshake (default 15 s).
    pub(crate) connect_timeout: Duration,
    /// Whole request including the body (default 10 min).
    pub(crate) total_timeout: Duration,
    /// Extra trusted CA (PEM) for HTTPS, besides the system bundle.
    pub(crate) extra_ca: Option<PathBuf>,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            max_bytes: 512 * 1024 * 1024,
            connect_timeout: Duration::from_secs(15),
            total_timeout: Duration::from_secs(600),
            extra_ca: None,
        }
    }
}

/// Why one URL (or all of them) failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DownloadError {
    /// The config lists no URL.
    #[error("no download url")]
    NoUrl,
    /// The URL is not `http://` or `https://` with a host.
    #[error("bad url {0:?}")]
    BadUrl(String),
    /// Dial or TLS handshake did not finish in time.
    #[error("connect timed out")]
    ConnectTimeout,
    /// The whole request did not finish in time.
    #[error("request timed out")]
    Timeout,
    /// Socket, TLS or file error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// HTTP protocol error.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The server answered with a non-2xx status.
    #[error("http status {0}")]
    Status(u16),
    /// The body is larger than the cap.
    #[error("body larger than {0} bytes")]
    TooLarge(u64),
    /// TLS setup failed (no usable CA, bad server name).
    #[error("tls: {0}")]
    Tls(String),
    /// The body's SHA-256 differs from the expected one.
    #[error("sha256 mismatch: expected {expected}, got {actual}")]
    Sha256Mismatch {
        /// From the config.
        expected: String,
        /// Of the downloaded body.
        actual: String,
    },
    /// Every URL failed; the last error of each, in order.
    #[error("all urls failed: {0}")]
    AllFailed(String),
}

/// HTTP(S) downloader; the TLS configuration is built at the first HTTPS URL.
#[derive(Debug)]
pub(crate) struct Downloader {
    cfg: DownloadConfig,
    tls: RefCell<Option<Arc<rustls::ClientConfig>>>,
}

impl Downloader {
    pub(crate) fn new(cfg: DownloadConfig) -> Self {
        Downloader {
            cfg,
            tls: RefCell::new(None),
        }
    }

    pub(crate) fn config(&self) -> &DownloadConfig {
        &self.cfg
    }

    /// Tries `urls` in order until one yields a body whose SHA-256 equals
    /// `sha256` (any case); that body is left at `dest` (mode 0600). On
    /// failure `dest` does not exist.
    pub(crate) async fn fetch_verified(
        &self,
        urls: &[String],
        sha256: &str,
        dest: &Path,
    ) -> Result<(), DownloadError> {
        if urls.is_empty() {
            return Err(DownloadError::NoUrl);
        }
        let mut errors = Vec::new();
        for url in urls {
            let r = match tokio::time::timeout(self.cfg.total_timeout, self.get_to_file(url, dest))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(DownloadError::Timeout),
            };
            let r: Result<(), DownloadError> = match r {
                Ok(_) => match sha256_file(dest.to_path_buf()).await {
                    Ok(actual) if actual.eq_ignore_ascii_case(sha256.trim()) => return Ok(()),
                    Ok(actual) => Err(DownloadError::Sha256Mismatch {
                        expected: sha256.to_string(),
                        actual,
                    }),
                    Err(e) => Err(e.into()),
                },
                Err(e) => Err(e),
            };
            let _ = tokio::fs::remove_file(dest).await;
            if let Err(e) = r {
                tracing::warn!(url = %url, error = %e, "download failed");
                errors.push(format!("{url}: {e}"));
            }
        }
        Err(DownloadError::AllFailed(errors.join("; ")))
    }

    /// One GET streamed into `dest` (opened and written through
    /// `tokio::fs`, i.e. on the blocking pool); returns the body length.
    async fn get_to_file(&self, url: &str, dest: &Path) -> Result<u64, DownloadError> {
        self.get_into(url, Target::File(dest)).await.map(|(n, _)| n)
    }

    /// One GET into memory (at most `max_bytes`), bounded by `total_timeout`.
    pub(crate) async fn get_bytes(&self, url: &str) -> Result<Bytes, DownloadError> {
        let r = tokio::time::timeout(self.cfg.total_timeout, self.get_into(url, Target::Mem))
            .await
            .map_err(|_| DownloadError::Timeout)??;
        match r.1 {
            Sink::Mem(v) => Ok(Bytes::from(v)),
            Sink::File(_) => Err(DownloadError::Io(io::Error::other("unexpected file sink"))),
        }
    }

    /// One GET whose body goes to `target` (opened once the status is
    /// 2xx); returns the body length and the sink.
    async fn get_into(&self, url: &str, open: Target<'_>) -> Result<(u64, Sink), DownloadError> {
        let bad = || DownloadError::BadUrl(url.to_string());
        let uri: http::Uri = url.parse().map_err(|_| bad())?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad()),
        };
        let host = uri.host().ok_or_else(bad)?.to_string();
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or_else(bad)?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::USER_AGENT, "elkeid-agent")
            .body(Empty::<Bytes>::new())
            .map_err(|_| bad())?;
        let connect = async {
            let tcp = TcpStream::connect((bare_host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            Ok::<_, DownloadError>(tcp)
        };
        let tcp = tokio::time::timeout(self.cfg.connect_timeout, connect)
            .await
            .map_err(|_| DownloadError::ConnectTimeout)??;
        if https {
            let tls = self.tls_config()?;
            let name = rustls_pki_types::ServerName::try_from(bare_host.clone())
                .map_err(|e| DownloadError::Tls(e.to_string()))?;
            let handshake = tokio_rustls::TlsConnector::from(tls).connect(name, tcp);
            let stream = tokio::time::timeout(self.cfg.connect_timeout, handshake)
                .await
                .map_err(|_| DownloadError::ConnectTimeout)??;
            self.exchange(Box::new(stream), req, open).await
        } else {
            self.exchange(Box::new(tcp), req, open).await
        }
    }

    /// One HTTP/1.1 exchange. The stream is boxed so that hyper's client
    /// is compiled once for http and https (saves ~20 KiB of code).
    async fn exchange(
        &self,
        stream: Box<dyn Io>,
        req: http::Request<Empty<Bytes>>,
        open: Target<'_>,
    ) -> Result<(u64, Sink), DownloadError> {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let max = self.cfg.max_bytes;
        let work = async move {
            let mut resp = sender.send_request(req).await?;
            if !resp.status().is_success() {
                return Err(DownloadError::Status(resp.status().as_u16()));
            }
            let mut sink = open.open().await?;
            let mut len: u64 = 0;
            while let Some(frame) = resp.body_mut().frame().await {
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                len += data.len() as u64;
                if len > max {
                    return Err(DownloadError::TooLarge(max));
                }
                sink.write_all(&data).await?;
            }
            sink.flush().await?;
            Ok((len, sink))
        };
        // Drive the connection alongside; it ends once `work` drops the sender.
        let (r, _conn) = tokio::join!(work, conn);
        r
    }

    fn tls_config(&self) -> Result<Arc<rustls::ClientConfig>, DownloadError> {
        if let Some(c) = self.tls.borrow().as_ref() {
            return Ok(c.clone());
        }
        let mut roots = rustls::RootCertStore::empty();
        let files = SYSTEM_CA_FILES
            .iter()
            .map(PathBuf::from)
            .chain(self.cfg.extra_ca.clone());
        for f in files {
            let Ok(iter) = <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::pem_file_iter(&f) else {
                continue;
            };
            let (added, _ignored) = roots.add_parsable_certificates(iter.flatten());
            tracing::debug!(file = %f.display(), added, "loaded CA certificates");
        }
        if roots.is_empty() {
            return Err(DownloadError::Tls(
                "no CA certificates found for https downloads".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| DownloadError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let cfg = Arc::new(cfg);
        *self.tls.borrow_mut() = Some(cfg.clone());
        Ok(cfg)
    }
}

/// A byte stream to a web server: TCP or TLS over TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Where a response body should go.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// A new file (mode 0600), truncated.
    File(&'a Path),
    /// Memory.
    Mem,
}

impl Target<'_> {
    async fn open(self) -> io::Result<Sink> {
        match self {
            Target::File(p) => tokio::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(p)
                .await
                .map(Sink::File),
            Target::Mem => Ok(Sink::Mem(Vec::new())),
        }
    }
}

/// Where a response body goes.
#[derive(Debug)]
enum Sink {
    /// Writes go to the blocking pool (`tokio::fs`).
    File(tokio::fs::File),
    Mem(Vec<u8>),
}

impl Sink {
    async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Sink::File(f) => f.write_all(data).await,
            Sink::Mem(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
        }
    }
    async fn flush(&mut self) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        match self {
            Sink::File(f) => f.flush().await,
            Sink::Mem(_) => Ok(()),
        }
    }
}

/// GETs `url` into memory: at most `max` bytes, the whole request within
/// `timeout` (service discovery; plain `http://` or `https://`).
pub(crate) async fn get(url: &str, timeout: Duration, max: usize) -> Result<Bytes, DownloadError> {
    let dl = Downloader::new(DownloadConfig {
        max_bytes: max as u64,
        connect_timeout: timeout,
        total_timeout: timeout,
        extra_ca: None,
    });
    dl.get_bytes(url).await
}

/// Lowercase hex SHA-256 of a file, computed on the blocking pool.
pub(crate) async fn sha256_file(path: PathBuf) -> io::Result<String> {
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(path)?;
        let mut h = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex(h.finish().as_ref()))
    })
    .await
    .map_err(io::Error::other)?
}

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    /// The download target is a FIFO nobody reads yet, so opening and
    /// writing it block. The agent's runtime (current_thread, as in the
    /// binary) keeps running timers meanwhile — the file I/O is on the
    /// blocking pool; then a reader drains it and all 8 MiB arrive.
    #[test]
    fn download_file_io_never_blocks_the_runtime_thread() {
        let body: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let addr = serve(body.clone());
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("dest");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let f2 = fifo.clone();
        // The runtime on its own thread: if it blocked on the FIFO, the
        // timeout below fails the test instead of hanging it.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(2)
                .build()
                .unwrap();
            let r = rt.block_on(async {
                let dl = Downloader::new(DownloadConfig::default());
                let url = format!("http://{addr}/ok");
                let fut = dl.get_to_file(&url, &f2);
                tokio::pin!(fut);
                let mut ticks = 0;
                while ticks < 50 {
                    tokio::select! {
                        r = &mut fut => return Err(format!("finished without a reader: {r:?}")),
                        () = tokio::time::sleep(Duration::from_millis(10)) => ticks += 1,
                    }
                }
                // Only now is there a reader.
                let f3 = f2.clone();
                let reader = std::thread::spawn(move || {
                    let mut v = Vec::new();
                    std::fs::File::open(&f3)
                        .unwrap()
                        .read_to_end(&mut v)
                        .unwrap();
                    v
                });
                let n = fut.await.map_err(|e| e.to_string())?;
                Ok((ticks, n, reader.join().unwrap()))
            });
            let _ = done_tx.send(r);
        });
        let (ticks, n, got) = done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the runtime thread blocked on the download file")
            .unwrap();
        assert_eq!(ticks, 50);
        assert_eq!(n, body.len() as u64);
        assert!(got == body, "body differs");
    }

    /// A tiny HTTP/1.1 server on 127.0.0.1 (own thread, test only):
    /// `/ok` -> `body`, `/404` -> 404, anything else -> 500.
    pub(crate) fn serve(body: Vec<u8>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut line = String::new();
                let mut r = BufReader::new(s.try_clone().unwrap());
                r.read_line(&mut line).unwrap();
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).unwrap() == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = line.split(' ').nth(1).unwrap_or("").to_string();
                let (status, b): (&str, &[u8]) = match path.as_str() {
                    "/ok" => ("200 OK", &body),
                    "/404" => ("404 Not Found", b"no"),
                    _ => ("500 Oops", b"err"),
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    b.len()
                );
                let _ = s.write_all(b);
            }
        });
        addr
    }

    fn sha(b: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    }

    #[test]
    fn hex_golden() {
        // SHA-256("abc"), FIPS 180-2 test vector.
        assert_eq!(
            sha(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tries_urls_in_order_and_verifies() {
        let body = b"plugin-binary".repeat(1000);
        let addr = serve(body.clone());
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dl");
        let dl = Downloader::new(DownloadConfig::default());
        let urls = vec![
            format!("http://{addr}/404"),
            "ftp://x/y".to_string(),
            format!("http://{addr}/500"),
            format!("http://{addr}/ok"),
        ];
        // Upper-case expected hash is fine.
        dl.fetch_verified(&urls, &sha(&body).to_uppercase(), &dest)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
    }

    /// HTTPS over rustls against a real TLS server whose CA is only in
    /// `extra_ca`; the same server is refused without that CA.
    #[tokio::test(flavor = "current_thread")]
    async fn https_download_verifies_the_server() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut ca_p = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_p.clone().self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_p, &ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        let ca_file = d.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls_pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = b"tls-served plugin".to_vec();
        let served = body.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut req = vec![0u8; 4096];
                let _ = tls.read(&mut req).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    served.len()
                );
                let _ = tls.write_all(head.as_bytes()).await;
                let _ = tls.write_all(&served).await;
                let _ = tls.shutdown().await;
            }
        });
        let urls = vec![format!("https://{addr}/p")];
        let dest = d.path().join("dl");
        let dl = Downloader::new(DownloadConfig {
            extra_ca: Some(ca_file),
            ..DownloadConfig::default()
        });
        dl.fetch_verified(&urls, &sha(&body), &dest).await.unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        // Only the system roots: the handshake fails, nothing is kept.
        std::fs::remove_file(&dest).unwrap();
        let plain = Downloader::new(DownloadConfig::default());
        let e = plain
            .fetch_verified(&urls, &sha(&body), &dest)
            .await
            .unwrap_err();
        // (An unknown-issuer handshake error, or "no CA certificates" on a
        // machine without a system bundle.)
        assert!(matches!(e, DownloadError::AllFailed(_)), "{e}");
        assert!(!e.to_string().contains("sha256"), "{e}");
        assert!(!dest.exists());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sha_mismatch_and_cap_leave_nothing() {
        let body = b"x".repeat(5000);
        let addr = serve(body.clone());
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dl");
        let dl = Downloader::new(DownloadConfig::default());
        let urls = vec![format!("http://{addr}/ok")];
        let e = dl
            .fetch_verified(&urls, &sha(b"other"), &dest)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("sha256 mismatch"), "{e}");
        assert!(!dest.exists());
        let small = Downloader::new(DownloadConfig {
            max_bytes: 100,
            ..DownloadConfig::default()
        });
        let e = small
            .fetch_verified(&urls, &sha(&body), &dest)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than 100"), "{e}");
        assert!(!dest.exists());
        let e = dl
            .fetch_verified(&[], &sha(&body), &dest)
            .await
            .unwrap_err();
        assert!(matches!(e, DownloadError::NoUrl));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn get_in_memory_ok_status_cap_and_url() {
        let a = serve(b"hello".to_vec());
        let b = get(&format!("http://{a}/ok"), Duration::from_secs(5), 100)
            .await
            .unwrap();
        assert_eq!(&b[..], b"hello");
        let e = get(&format!("http://{a}/404"), Duration::from_secs(5), 100).await;
        assert!(matches!(e, Err(DownloadError::Status(404))), "{e:?}");
        let e = get(&format!("http://{a}/ok"), Duration::from_secs(5), 3).await;
        assert!(matches!(e, Err(DownloadError::TooLarge(3))), "{e:?}");
        let e = get("ftp://x/", Duration::from_secs(5), 3).await;
        assert!(matches!(e, Err(DownloadError::BadUrl(_))), "{e:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn get_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        let keep = std::thread::spawn(move || {
            let s = l.accept();
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let r = get(&format!("http://{a}/"), Duration::from_millis(300), 10).await;
        assert!(matches!(r, Err(DownloadError::Timeout)), "{r:?}");
        keep.join().unwrap();
    }
}
