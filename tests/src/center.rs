//! Driving a real `elkeid-center` from the agent side and the manager side.
//!
//! # Layout
//! - TLS material: the center's generated PKI ([`Center::agent_pki`]) and
//!   a foreign CA made with rcgen ([`foreign_client`]).
//! - gRPC: [`tls_channel`] (mTLS, ALPN h2, server name `elkeid.com`) wrapped
//!   in the snappy layer ([`agent_transport`]); [`AgentStream`], one
//!   `Transfer` stream speaking the agent side; record builders.
//! - HTTP API: a minimal HTTP/1.1 client ([`http`]), the AK/SK signer
//!   ([`sign`], written from spec §5.6, independent of the center's code),
//!   [`Center::api`] for signed calls.
//! - Outputs: [`Center::ndjson_records`], [`kafka_broker`] / [`kafka_read`].
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use elkeid_proto::grpc::transfer_client::TransferClient;
use elkeid_proto::grpc::{Command, EncodedRecord, MqData, PackagedData, Payload};
use elkeid_proto::snappy::{SnappyClient, SnappyClientLayer};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tower_layer::Layer;

use crate::Center;

/// The name every Elkeid agent verifies the center's certificate against.
pub const SERVER_NAME: &str = "elkeid.com";

/// PEM material an agent uses: the CA to trust and its own client identity.
#[derive(Debug, Clone)]
pub struct AgentPki {
    /// CA certificate (PEM) that signed the center's server certificate.
    pub ca: Vec<u8>,
    /// Client certificate (PEM); `None` = present no certificate.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Center {
    /// The generated agent material: `pki/ca.crt`, `pki/client.crt`, `pki/client.key`.
    pub fn agent_pki(&self) -> AgentPki {
        let read =
            |f: &str| std::fs::read(self.pki(f)).unwrap_or_else(|e| panic!("read pki/{f}: {e}"));
        AgentPki {
            ca: read("ca.crt"),
            identity: Some((read("client.crt"), read("client.key"))),
        }
    }

    /// An mTLS + snappy transport to this center as an agent.
    pub async fn agent(&self) -> SnappyClient<Channel> {
        agent_transport(self.grpc, &self.agent_pki())
            .await
            .expect("agent connects to the center")
    }

    /// Opens a `Transfer` stream as agent `id` and sends `first` records.
    pub async fn open_stream(&self, id: &str, first: Vec<EncodedRecord>) -> AgentStream {
        AgentStream::open(self.agent().await, packet(id, first))
            .await
            .expect("open Transfer stream")
    }

    /// The `[aksk]` pair from `DIR/api-keys.toml` (the first entry).
    pub fn api_key(&self) -> (String, String) {
        let text = std::fs::read_to_string(self.data_dir.join("api-keys.toml"))
            .expect("read api-keys.toml");
        let v: toml::Table = toml::from_str(&text).expect("api-keys.toml is TOML");
        let aksk = v
            .get("aksk")
            .and_then(|t| t.as_table())
            .expect("[aksk] table");
        let (ak, sk) = aksk.iter().next().expect("one key pair");
        (
            ak.clone(),
            sk.as_str().expect("secret is a string").to_string(),
        )
    }

    /// A signed API call (AK/SK of `api-keys.toml`, current time); returns
    /// the HTTP status and the parsed JSON body.
    pub async fn api(
        &self,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> (u16, serde_json::Value) {
        let (ak, sk) = self.api_key();
        let headers = signed_headers(&ak, &sk, method, path_and_query, body, unix_now());
        let r = http(self.api_target(), method, path_and_query, &headers, body).await;
        (r.status, r.json())
    }

    /// Agent ids of `GET /conn/list` (signed).
    pub async fn conn_list(&self) -> Vec<String> {
        let (status, v) = self.api("GET", "/conn/list", b"").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["code"], 0, "{v}");
        v["data"]
            .as_array()
            .expect("data array")
            .iter()
            .map(|s| s.as_str().expect("id string").to_string())
            .collect()
    }

    /// `POST /command/` with `body` (signed); returns the envelope.
    ///
    /// The center refuses a signature it has already accepted (replay
    /// protection), and signatures carry a whole-second timestamp: an
    /// identical command sent twice within one second is re-signed in the
    /// next second, as a real client has to.
    pub async fn command(&self, body: &serde_json::Value) -> serde_json::Value {
        let bytes = serde_json::to_vec(body).unwrap();
        for _ in 0..3 {
            let (status, v) = self.api("POST", "/command/", &bytes).await;
            assert_eq!(status, 200, "{v}");
            if v["data"] != "signature replayed" {
                return v;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        panic!("POST /command/ refused as a replay three times");
    }

    /// The value of the unlabelled sample `name` on `GET /metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let r = http(self.api_target(), "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8(r.body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
    }

    /// Every line of every `DIR/records/*.ndjson` file, parsed, oldest file first.
    pub fn ndjson_records(&self) -> Vec<serde_json::Value> {
        ndjson_records_in(&self.data_dir)
    }
}

/// Occurrences of `pat` in the NDJSON files of `data_dir` (std's optimized
/// substring search over raw text: cheap enough to poll for progress).
pub fn count_in_records(data_dir: &std::path::Path, pat: &str) -> usize {
    let Ok(rd) = std::fs::read_dir(data_dir.join("records")) else {
        return 0;
    };
    // Lossy: a read ending inside a multi-byte character of the line being
    // written still counts the file's complete lines (no copy when valid).
    rd.filter_map(Result::ok)
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| String::from_utf8_lossy(&b).matches(pat).count())
        .sum()
}

/// Every complete line of every `<data_dir>/records/*.ndjson` file, parsed,
/// oldest file first (works on a stopped center's data dir too).
pub fn ndjson_records_in(data_dir: &std::path::Path) -> Vec<serde_json::Value> {
    let dir = data_dir.join("records");
    let mut files: Vec<_> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "ndjson"))
            .collect(),
        Err(_) => return Vec::new(),
    };
    files.sort();
    let mut out = Vec::new();
    for f in files {
        // Bytes, not text: a read that ends inside a multi-byte character
        // of the line being written is not an error. A file removed since
        // the listing (retention) has nothing to add.
        let bytes = match std::fs::read(&f) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => panic!("read {}: {e}", f.display()),
        };
        // A line still being written has no newline yet: skip it.
        for line in bytes
            .split_inclusive(|&b| b == b'\n')
            .filter(|l| l.ends_with(b"\n"))
        {
            out.push(serde_json::from_slice(line).unwrap_or_else(|e| {
                panic!(
                    "{}: bad line {:?}: {e}",
                    f.display(),
                    String::from_utf8_lossy(line)
                )
            }));
        }
    }
    out
}

/// A TLS channel to `addr` verifying the server as `elkeid.com` against
/// `pki.ca`, presenting `pki.identity` if any (tonic negotiates ALPN h2).
pub async fn tls_channel(
    addr: SocketAddr,
    pki: &AgentPki,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name(SERVER_NAME);
    if let Some((cert, key)) = &pki.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// Hands tonic one connection dialed (and TLS-handshaken) beforehand.
struct Dialed<IO>(std::sync::Arc<std::sync::Mutex<Option<hyper_util::rt::TokioIo<IO>>>>);

impl<IO> Clone for Dialed<IO> {
    fn clone(&self) -> Self {
        Dialed(self.0.clone())
    }
}

impl<IO> tower_service::Service<tonic::codegen::http::Uri> for Dialed<IO> {
    type Response = hyper_util::rt::TokioIo<IO>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, std::io::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        std::future::ready(
            self.0
                .lock()
                .unwrap()
                .take()
                .ok_or_else(|| std::io::Error::other("connection already used")),
        )
    }
}

/// A tonic channel (HTTP/2) over `io`, a connection the caller dialed and
/// secured itself: with its own `rustls::ClientConfig` (session cache) and
/// a look at the handshake. The channel does not redial.
pub async fn channel_over<IO>(io: IO) -> Result<Channel, tonic::transport::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let io = hyper_util::rt::TokioIo::new(io);
    Endpoint::from_static("http://elkeid.com")
        .connect_with_connector(Dialed(std::sync::Arc::new(std::sync::Mutex::new(Some(io)))))
        .await
}

/// [`tls_channel`] wrapped in the snappy compression layer, as an agent talks.
pub async fn agent_transport(
    addr: SocketAddr,
    pki: &AgentPki,
) -> Result<SnappyClient<Channel>, tonic::transport::Error> {
    Ok(SnappyClientLayer::new().layer(tls_channel(addr, pki).await?))
}

/// A client certificate (and key) signed by a freshly generated CA that
/// the center has never seen, plus that CA, as PEM.
pub fn foreign_client() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "intruder CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf = CertificateParams::new(vec![SERVER_NAME.to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "elkeid@elkeid.com");
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &ca).unwrap();
    (
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
        ca.pem().into_bytes(),
    )
}

/// A serialized `Payload` with `fields`.
pub fn payload(fields: &[(&str, &str)]) -> Bytes {
    let p = Payload {
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    };
    Bytes::from(p.encode_to_vec())
}

/// One record of `data_type` with `fields`, stamped `timestamp`.
pub fn record(data_type: i32, timestamp: i64, fields: &[(&str, &str)]) -> EncodedRecord {
    EncodedRecord {
        data_type,
        timestamp,
        data: payload(fields),
    }
}

/// A 1000 heartbeat like the Go agent's (numbers as strings).
pub fn heartbeat(timestamp: i64) -> EncodedRecord {
    record(
        1000,
        timestamp,
        &[
            ("kernel_version", "6.1.0-13-amd64"),
            ("arch", "x86_64"),
            ("platform", "debian"),
            ("platform_version", "12"),
            ("cpu", "0.25"),
            ("rss", "12345678"),
            ("nproc", "2"),
            ("net_mode", "private"),
            ("host_serial", "000123"),
            ("state", "running"),
        ],
    )
}

/// The host metadata every test packet carries.
pub fn packet(agent_id: &str, records: Vec<EncodedRecord>) -> PackagedData {
    PackagedData {
        records,
        agent_id: agent_id.to_string(),
        intranet_ipv4: vec!["10.9.8.7".into(), "192.168.1.2".into()],
        extranet_ipv4: vec!["203.0.113.5".into()],
        intranet_ipv6: vec!["fd00::7".into()],
        extranet_ipv6: vec![],
        hostname: format!("host-{agent_id}"),
        version: "1.9.1.4".into(),
        product: "elkeid-rs-test".into(),
        ..Default::default()
    }
}

/// One open `Transfer` stream, agent side.
#[derive(Debug)]
pub struct AgentStream {
    /// Agent id of the first packet.
    pub id: String,
    tx: Option<mpsc::Sender<PackagedData>>,
    rx: tonic::Streaming<Command>,
}

impl AgentStream {
    /// Opens the stream over `transport`, sending `first` as the first packet.
    pub async fn open(
        transport: SnappyClient<Channel>,
        first: PackagedData,
    ) -> Result<AgentStream, tonic::Status> {
        let id = first.agent_id.clone();
        let (tx, rx) = mpsc::channel(64);
        tx.send(first)
            .await
            .map_err(|_| tonic::Status::internal("queue"))?;
        let mut client = TransferClient::new(transport).max_decoding_message_size(16 * 1024 * 1024);
        let resp = client.transfer(ReceiverStream::new(rx)).await?;
        Ok(AgentStream {
            id,
            tx: Some(tx),
            rx: resp.into_inner(),
        })
    }

    /// Sends one packet of `records` with this stream's agent metadata.
    pub async fn send(&self, records: Vec<EncodedRecord>) {
        self.send_packet(packet(&self.id, records)).await;
    }

    /// Sends a whole packet.
    pub async fn send_packet(&self, p: PackagedData) {
        let tx = self.tx.as_ref().expect("stream not half-closed");
        tx.send(p).await.expect("stream still open");
    }

    /// Half-closes the sending side (the agent's `CloseSend`).
    pub fn close_send(&mut self) {
        self.tx = None;
    }

    /// The next command, or the stream's end (`Ok(None)`) or error, within `within`.
    pub async fn next(
        &mut self,
        within: Duration,
    ) -> Option<Result<Option<Command>, tonic::Status>> {
        tokio::time::timeout(within, self.rx.message()).await.ok()
    }

    /// The next command; panics on end, error or timeout.
    pub async fn expect_command(&mut self, within: Duration) -> Command {
        match self.next(within).await {
            Some(Ok(Some(c))) => c,
            other => panic!(
                "agent {}: expected a command within {within:?}, got {other:?}",
                self.id
            ),
        }
    }
}

/// Polls `f` every 50 ms until it yields `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub use crate::unix_now;

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Elkeid's AK/SK signature (spec §5.6): lowercase hex HMAC-SHA256, key =
/// the secret, over METHOD, PATH (surrounding spaces and one trailing `/`
/// removed), RAWQUERY (no `?`), AK, TIMESTAMP and BODYHASH (lowercase hex
/// SHA-256 of the body, empty string for an empty body) joined by the two
/// literal characters backslash and `n`.
pub fn sign(
    sk: &str,
    method: &str,
    path: &str,
    raw_query: &str,
    ak: &str,
    timestamp: &str,
    body: &[u8],
) -> String {
    let path = path.trim();
    let path = path.strip_suffix('/').unwrap_or(path);
    let body_hash = if body.is_empty() {
        String::new()
    } else {
        hex(ring::digest::digest(&ring::digest::SHA256, body).as_ref())
    };
    let to_sign = [method, path, raw_query, ak, timestamp, body_hash.as_str()].join("\\n");
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, sk.as_bytes());
    hex(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref())
}

/// `AccessKey`, `Signature`, `TimeStamp` headers for a request.
pub fn signed_headers(
    ak: &str,
    sk: &str,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    ts: i64,
) -> Vec<(String, String)> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let ts = ts.to_string();
    let sig = sign(sk, method, path, query, ak, &ts, body);
    vec![
        ("AccessKey".into(), ak.into()),
        ("Signature".into(), sig),
        ("TimeStamp".into(), ts),
    ]
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as JSON; panics with the body text if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// First header named `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where the HTTP API listens and how to reach it: HTTPS (the center's
/// default) verifying the server as [`SERVER_NAME`] against a CA, or plain
/// HTTP (`--http-tls false`; a bare `SocketAddr` converts to that).
#[derive(Clone)]
pub struct HttpTarget {
    /// API address.
    pub addr: SocketAddr,
    /// TLS client configuration; `None` = plain HTTP.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for HttpTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTarget")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl From<SocketAddr> for HttpTarget {
    fn from(addr: SocketAddr) -> Self {
        HttpTarget { addr, tls: None }
    }
}

impl HttpTarget {
    /// HTTPS to `addr`, trusting the CA certificate(s) in `ca_pem`.
    pub fn https(addr: SocketAddr, ca_pem: &[u8]) -> HttpTarget {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(c.expect("CA PEM")).expect("CA certificate");
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        HttpTarget {
            addr,
            tls: Some(std::sync::Arc::new(cfg)),
        }
    }
}

impl Center {
    /// How to reach this center's API: HTTPS with its CA unless it was
    /// started with `--http-tls false`.
    pub fn api_target(&self) -> HttpTarget {
        match &self.http_ca {
            Some(ca) => HttpTarget::https(
                self.http,
                &std::fs::read(ca).unwrap_or_else(|e| panic!("read {}: {e}", ca.display())),
            ),
            None => HttpTarget::from(self.http),
        }
    }
}

/// One HTTP/1.1 request (`Connection: close`) to `target` (HTTPS or HTTP).
pub async fn http(
    target: impl Into<HttpTarget>,
    method: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> HttpResponse {
    let target = target.into();
    let addr = target.addr;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect HTTP API");
    // Without it a request written in two pieces can wait ~40 ms for the
    // server's delayed ACK (Nagle): loadgen's command p99 measured that.
    let _ = tcp.set_nodelay(true);
    match target.tls {
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .expect("TLS handshake with the HTTP API");
            http_on(tls, addr, method, path_and_query, headers, body).await
        }
        None => http_on(tcp, addr, method, path_and_query, headers, body).await,
    }
}

async fn http_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> HttpResponse {
    let mut req = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    // One write (one TLS record) for the head and the body.
    let mut msg = req.into_bytes();
    msg.extend_from_slice(body);
    s.write_all(&msg).await.unwrap();
    s.flush().await.unwrap();
    let mut raw = Vec::new();
    match tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time")
    {
        Ok(_) => {}
        // A TLS peer closing without close_notify after a complete response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => panic!("read HTTP response: {e}"),
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of HTTP head");
    let head = std::str::from_utf8(&raw[..end]).expect("ASCII head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let nl = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("chunk size line");
            let size_text = std::str::from_utf8(&rest[..nl]).unwrap();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .expect("chunk size");
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
        out
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        rest[..len].to_vec()
    } else {
        rest.to_vec()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// The broker for Kafka tests: `ELKEID_TEST_KAFKA=host:port`. The tests
/// that call this are compiled as ignored unless it (or `CI`) was set at
/// build time (`tests/build.rs`), so unset here is a failure, never a skip.
pub fn kafka_broker() -> String {
    match std::env::var("ELKEID_TEST_KAFKA") {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "ELKEID_TEST_KAFKA is not set: Kafka tests need a real broker \
             (eval \"$(bash tests/kafka-broker.sh start)\")"
        ),
    }
}

/// Every message of `topic` (all partitions, offset order per partition):
/// `(partition, key, decoded MQData)`.
pub async fn kafka_read(broker: &str, topic: &str) -> Vec<(i32, Vec<u8>, MqData)> {
    kafka_read_with_headers(broker, topic)
        .await
        .into_iter()
        .map(|m| (m.partition, m.key, m.value))
        .collect()
}

/// One message read back from Kafka.
#[derive(Debug, Clone)]
pub struct KafkaMessage {
    /// Partition it was read from.
    pub partition: i32,
    /// The record key.
    pub key: Vec<u8>,
    /// The record headers.
    pub headers: std::collections::BTreeMap<String, Vec<u8>>,
    /// The decoded value.
    pub value: MqData,
}

/// [`kafka_read`] with each record's headers.
pub async fn kafka_read_with_headers(broker: &str, topic: &str) -> Vec<KafkaMessage> {
    use rskafka::client::ClientBuilder;
    use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
    let client = ClientBuilder::new(vec![broker.to_string()])
        .build()
        .await
        .expect("kafka client");
    let Some(t) = client
        .list_topics()
        .await
        .expect("list topics")
        .into_iter()
        .find(|t| t.name == topic)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in t.partitions {
        let pc = client
            .partition_client(topic, p, UnknownTopicHandling::Retry)
            .await
            .expect("partition client");
        let high = pc
            .get_offset(OffsetAt::Latest)
            .await
            .expect("high watermark");
        let mut offset = pc
            .get_offset(OffsetAt::Earliest)
            .await
            .expect("low watermark");
        while offset < high {
            let (recs, _) = pc
                .fetch_records(offset, 1..8_000_000, 500)
                .await
                .expect("fetch");
            assert!(
                !recs.is_empty(),
                "fetch at {offset} below high watermark {high} returned nothing"
            );
            for r in recs {
                offset = r.offset + 1;
                let value = r.record.value.expect("message value");
                let m = MqData::decode(value.as_slice()).expect("value is MQData");
                out.push(KafkaMessage {
                    partition: p,
                    key: r.record.key.unwrap_or_default(),
                    headers: r.record.headers,
                    value: m,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden signature computed independently (Python `hmac`/`hashlib`)
    /// from the §5.6 description.
    #[test]
    fn signer_golden() {
        let body = br#"{"agent_id":"a"}"#;
        assert_eq!(
            sign(
                "sk123",
                "POST",
                " /command/ ",
                "",
                "ak1",
                "1700000000",
                body
            ),
            "24cbd017ba796a7cc28f13ca391354b42a495cf4beef76e45066f4affe4c3095"
        );
        assert_eq!(
            sign(
                "sk123",
                "GET",
                "/conn/list",
                "x=1",
                "ak1",
                "1700000000",
                b""
            ),
            "a70d6bbe55ec8e47032ea44c24c69a5c99eb5f5a475fa99353af0a16f09434ed"
        );
    }

    #[test]
    fn parses_chunked_and_sized_bodies() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"abcde"[..]));
        let r = parse_response(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}");
        assert_eq!((r.status, r.json()), (400, serde_json::json!({})));
    }
}
