//! The snappy layers and `RawEncodeCodec` through a real tonic server and
//! client over loopback TCP/HTTP/2.
//!
//! The server stack is `Recorder -> SnappyServerLayer -> tonic routes`: the
//! recorder sits on the wire side and keeps the raw request/response headers
//! and body bytes, so the tests check what actually crossed the connection,
//! decoding snappy payloads with the independent `snap::read::FrameDecoder`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use elkeid_proto::codec::RawEncodeCodec;
use elkeid_proto::grpc::file_ext_client::FileExtClient;
use elkeid_proto::grpc::file_ext_server::{FileExt, FileExtServer};
use elkeid_proto::grpc::transfer_client::TransferClient;
use elkeid_proto::grpc::transfer_server::{Transfer, TransferServer};
use elkeid_proto::grpc::{
    Command, EncodedRecord, FileUploadRequest, FileUploadResponse, PackagedData, Task,
    file_upload_response,
};
use elkeid_proto::snappy::{self, SnappyClient, SnappyClientLayer, SnappyServerLayer};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::body::Body;
use tonic::codec::CompressionEncoding;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::{Code, Status, Streaming};
use tower::{Layer, Service, ServiceExt};

// ------------------------------------------------------------ wire recorder

#[derive(Default, Debug)]
struct Wire {
    req_headers: Vec<HeaderMap>,
    req_bytes: Vec<u8>,
    resp_headers: Vec<HeaderMap>,
    resp_bytes: Vec<u8>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Wire>>);

impl<S> Layer<S> for Recorder {
    type Service = Recorded<S>;
    fn layer(&self, inner: S) -> Recorded<S> {
        Recorded {
            inner,
            wire: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct Recorded<S> {
    inner: S,
    wire: Arc<Mutex<Wire>>,
}

type BoxFut<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<Request<Body>> for Recorded<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFut<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let wire = self.wire.clone();
        wire.lock().unwrap().req_headers.push(req.headers().clone());
        let w = wire.clone();
        let req = req.map(move |b| {
            Body::new(b.map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    w.lock().unwrap().req_bytes.extend_from_slice(d);
                }
                f
            }))
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            wire.lock()
                .unwrap()
                .resp_headers
                .push(resp.headers().clone());
            Ok(resp.map(move |b| {
                Body::new(b.map_frame(move |f| {
                    if let Some(d) = f.data_ref() {
                        wire.lock().unwrap().resp_bytes.extend_from_slice(d);
                    }
                    f
                }))
            }))
        })
    }
}

/// Splits a gRPC body into (flag, payload) messages.
fn grpc_messages(mut body: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !body.is_empty() {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        out.push((body[0], body[5..5 + len].to_vec()));
        body = &body[5 + len..];
    }
    out
}

/// Decodes one snappy message payload with the reference `snap` crate.
fn snap_decode(framed: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    snap::read::FrameDecoder::new(framed)
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.to_str().unwrap())
}

// ------------------------------------------------------------ test services

/// What the Transfer handler saw.
type Seen = mpsc::UnboundedSender<Result<PackagedData, Status>>;

struct TransferSvc {
    seen: Seen,
}

#[tonic::async_trait]
impl Transfer for TransferSvc {
    type TransferStream = ReceiverStream<Result<Command, Status>>;

    async fn transfer(
        &self,
        req: tonic::Request<Streaming<PackagedData>>,
    ) -> Result<tonic::Response<Self::TransferStream>, Status> {
        let mut inbound = req.into_inner();
        let seen = self.seen.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(p)) => {
                        // Reply with one Command per packet; "big-reply" asks for a large one.
                        let data = if p.hostname == "big-reply" {
                            "x".repeat(300_000)
                        } else {
                            p.hostname.clone()
                        };
                        let cmd = Command {
                            agent_ctrl: p.records.len() as i32,
                            task: Some(Task {
                                data_type: 1050,
                                object_name: p.agent_id.clone(),
                                data,
                                token: "t".into(),
                            }),
                            configs: vec![],
                            ..Default::default()
                        };
                        let _ = seen.send(Ok(p));
                        if tx.send(Ok(cmd)).await.is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    // Deliberately end the reply stream *normally*: the snappy
                    // layer must still report the rejection to the client.
                    Err(s) => {
                        let _ = seen.send(Err(s));
                        break;
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

struct FileSvc;

#[tonic::async_trait]
impl FileExt for FileSvc {
    async fn upload(
        &self,
        req: tonic::Request<Streaming<FileUploadRequest>>,
    ) -> Result<tonic::Response<FileUploadResponse>, Status> {
        let mut inbound = req.into_inner();
        let mut total = 0;
        while let Some(chunk) = inbound.message().await? {
            total += chunk.data.len();
        }
        let status = if total == 3 * 100_000 {
            file_upload_response::StatusCode::Success
        } else {
            file_upload_response::StatusCode::Failed
        };
        Ok(tonic::Response::new(FileUploadResponse {
            status: status as i32,
        }))
    }
}

struct TestServer {
    addr: SocketAddr,
    wire: Arc<Mutex<Wire>>,
    seen: mpsc::UnboundedReceiver<Result<PackagedData, Status>>,
}

async fn start_server(layer: SnappyServerLayer, gzip: bool) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    let recorder = Recorder::default();
    let wire = recorder.0.clone();
    let mut transfer = TransferServer::new(TransferSvc { seen: tx });
    if gzip {
        transfer = transfer
            .accept_compressed(CompressionEncoding::Gzip)
            .send_compressed(CompressionEncoding::Gzip);
    }
    let mut builder = Server::builder().layer(recorder).layer(layer);
    let router = builder
        .add_service(transfer)
        .add_service(FileExtServer::new(FileSvc));
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    TestServer { addr, wire, seen }
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn packet(agent: &str, hostname: &str, n_records: usize, payload_len: usize) -> PackagedData {
    PackagedData {
        records: (0..n_records)
            .map(|i| EncodedRecord {
                data_type: 1000 + i as i32,
                timestamp: 1_700_000_000 + i as i64,
                data: Bytes::from(
                    b"field=value;".repeat(payload_len / 12 + 1)[..payload_len].to_vec(),
                ),
            })
            .collect(),
        agent_id: agent.into(),
        intranet_ipv4: vec!["10.0.0.2".into()],
        hostname: hostname.into(),
        version: "1.0.0".into(),
        product: "elkeid-agent".into(),
        ..Default::default()
    }
}

async fn collect(mut s: Streaming<Command>) -> Result<Vec<Command>, Status> {
    let mut out = Vec::new();
    while let Some(c) = s.message().await? {
        out.push(c);
    }
    Ok(out)
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn snappy_client_and_server_exchange_snappy_frames_both_ways() {
    let mut srv = start_server(SnappyServerLayer::new(), false).await;
    let mut client = TransferClient::new(SnappyClientLayer::new().layer(channel(srv.addr).await));
    let sent = vec![
        packet("agent-1", "h1", 3, 50),
        PackagedData::default(),
        packet("agent-1", "h3", 100, 3000),
    ];
    let replies = collect(
        client
            .transfer(tokio_stream::iter(sent.clone()))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();

    assert_eq!(replies.len(), 3);
    assert_eq!(replies[0].agent_ctrl, 3);
    assert_eq!(replies[0].task.as_ref().unwrap().data, "h1");
    assert_eq!(replies[2].agent_ctrl, 100);
    for p in &sent {
        assert_eq!(&srv.seen.recv().await.unwrap().unwrap(), p);
    }

    let wire = srv.wire.lock().unwrap();
    let rq = &wire.req_headers[0];
    assert_eq!(header(rq, "grpc-encoding"), Some("snappy"));
    assert!(
        header(rq, "grpc-accept-encoding")
            .unwrap()
            .contains("snappy")
    );
    let msgs = grpc_messages(&wire.req_bytes);
    assert_eq!(msgs.len(), 3);
    for ((flag, payload), p) in msgs.iter().zip(&sent) {
        let plain = p.encode_to_vec();
        if plain.is_empty() {
            // grpc-go sends empty messages uncompressed; so do we.
            assert_eq!((*flag, payload.len()), (0, 0), "empty message");
        } else {
            assert_eq!(
                *flag, 1,
                "every non-empty request message is snappy compressed"
            );
            assert_eq!(&payload[..10], &snappy::STREAM_IDENTIFIER);
            assert_eq!(snap_decode(payload), plain);
        }
    }
    // The 300 KB packet really shrank on the wire.
    assert!(msgs[2].1.len() < sent[2].encoded_len() / 4);

    let rs = &wire.resp_headers[0];
    assert_eq!(header(rs, "grpc-encoding"), Some("snappy"));
    assert!(
        header(rs, "grpc-accept-encoding")
            .unwrap()
            .contains("snappy")
    );
    let msgs = grpc_messages(&wire.resp_bytes);
    assert_eq!(msgs.len(), 3);
    for ((flag, payload), c) in msgs.iter().zip(&replies) {
        assert_eq!(*flag, 1, "every response message is snappy compressed");
        assert_eq!(snap_decode(payload), c.encode_to_vec());
    }
}

#[tokio::test]
async fn raw_encode_codec_sends_pre_encoded_bytes() {
    let mut srv = start_server(SnappyServerLayer::new(), false).await;
    let mut grpc = tonic::client::Grpc::new(SnappyClient::new(channel(srv.addr).await));
    grpc.ready().await.unwrap();
    let packets = [
        packet("raw-agent", "r1", 2, 10),
        packet("raw-agent", "r2", 0, 0),
    ];
    let encoded: Vec<Bytes> = packets
        .iter()
        .map(|p| Bytes::from(p.encode_to_vec()))
        .collect();
    let path = PathAndQuery::from_static("/grpc.Transfer/Transfer");
    let resp = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(encoded)),
            path,
            RawEncodeCodec::<Command>::new(),
        )
        .await
        .unwrap();
    let replies = collect(resp.into_inner()).await.unwrap();
    assert_eq!(
        replies
            .iter()
            .map(|c| c.task.as_ref().unwrap().data.as_str())
            .collect::<Vec<_>>(),
        ["r1", "r2"]
    );
    for p in &packets {
        assert_eq!(&srv.seen.recv().await.unwrap().unwrap(), p);
    }
    assert_eq!(
        header(&srv.wire.lock().unwrap().req_headers[0], "grpc-encoding"),
        Some("snappy")
    );
}

/// A request built by hand as a Go agent would send it: snappy streams made
/// by the reference `snap` encoder (including an empty message as zero
/// bytes), sent over a bare tonic channel with no layer at all.
#[tokio::test]
async fn hand_made_snappy_request_gets_snappy_reply() {
    let mut srv = start_server(SnappyServerLayer::new(), false).await;
    let mut ch = channel(srv.addr).await;
    let p = packet("go-agent", "g1", 5, 400);
    let mut body = Vec::new();
    for payload in [snap_frame(&p.encode_to_vec()), Vec::new()] {
        body.push(1);
        body.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        body.extend_from_slice(&payload);
    }
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{}/grpc.Transfer/Transfer", srv.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "snappy")
        .header("grpc-accept-encoding", "snappy")
        .body(Body::new(http_body_util::Full::new(Bytes::from(body))))
        .unwrap();
    let resp = ch.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(header(resp.headers(), "grpc-encoding"), Some("snappy"));
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap();
    assert_eq!(header(&trailers, "grpc-status"), Some("0"));
    let msgs = grpc_messages(&collected.to_bytes());
    assert_eq!(msgs.len(), 2);
    assert!(msgs.iter().all(|(f, _)| *f == 1));
    let c0 = Command::decode(snap_decode(&msgs[0].1).as_slice()).unwrap();
    assert_eq!(
        (c0.agent_ctrl, c0.task.unwrap().object_name.as_str()),
        (5, "go-agent")
    );
    assert_eq!(srv.seen.recv().await.unwrap().unwrap(), p);
    assert_eq!(
        srv.seen.recv().await.unwrap().unwrap(),
        PackagedData::default()
    );
}

fn snap_frame(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    if data.is_empty() {
        return Vec::new();
    }
    let mut w = snap::write::FrameEncoder::new(Vec::new());
    w.write_all(data).unwrap();
    w.into_inner().unwrap()
}

#[tokio::test]
async fn identity_client_passes_through() {
    let mut srv = start_server(SnappyServerLayer::new(), false).await;
    let mut client = TransferClient::new(channel(srv.addr).await);
    let sent = vec![packet("plain", "p1", 1, 20)];
    let replies = collect(
        client
            .transfer(tokio_stream::iter(sent.clone()))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert_eq!(replies[0].task.as_ref().unwrap().data, "p1");
    assert_eq!(srv.seen.recv().await.unwrap().unwrap(), sent[0]);
    let wire = srv.wire.lock().unwrap();
    assert_eq!(header(&wire.req_headers[0], "grpc-encoding"), None);
    assert_eq!(header(&wire.resp_headers[0], "grpc-encoding"), None);
    assert!(
        header(&wire.resp_headers[0], "grpc-accept-encoding")
            .unwrap()
            .contains("snappy")
    );
    assert!(grpc_messages(&wire.req_bytes).iter().all(|(f, _)| *f == 0));
    assert!(grpc_messages(&wire.resp_bytes).iter().all(|(f, _)| *f == 0));
}

#[tokio::test]
async fn gzip_client_reaches_tonic_gzip_unchanged() {
    let mut srv = start_server(SnappyServerLayer::new(), true).await;
    // Also through the client layer: it must leave tonic's gzip alone.
    for layered in [false, true] {
        let ch = channel(srv.addr).await;
        let sent = vec![packet("gz", "z1", 10, 500)];
        let stream = tokio_stream::iter(sent.clone());
        let replies = if layered {
            let mut c = TransferClient::new(SnappyClient::new(ch))
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip);
            collect(c.transfer(stream).await.unwrap().into_inner())
                .await
                .unwrap()
        } else {
            let mut c = TransferClient::new(ch)
                .send_compressed(CompressionEncoding::Gzip)
                .accept_compressed(CompressionEncoding::Gzip);
            collect(c.transfer(stream).await.unwrap().into_inner())
                .await
                .unwrap()
        };
        assert_eq!(replies[0].task.as_ref().unwrap().data, "z1");
        assert_eq!(srv.seen.recv().await.unwrap().unwrap(), sent[0]);
    }
    {
        let wire = srv.wire.lock().unwrap();
        for i in 0..2 {
            assert_eq!(header(&wire.req_headers[i], "grpc-encoding"), Some("gzip"));
            assert_eq!(header(&wire.resp_headers[i], "grpc-encoding"), Some("gzip"));
            assert!(
                header(&wire.resp_headers[i], "grpc-accept-encoding")
                    .unwrap()
                    .contains("snappy")
            );
        }
        let msgs = grpc_messages(&wire.req_bytes);
        assert_eq!(msgs.len(), 2);
        assert!(
            msgs.iter()
                .all(|(f, p)| *f == 1 && p.starts_with(&[0x1f, 0x8b])),
            "gzip members on the wire"
        );
    }

    // A snappy client of the same gzip-enabled server is answered in snappy
    // (as grpc-go answers with the client's compressor), never gzip.
    let mut c = TransferClient::new(SnappyClient::new(channel(srv.addr).await));
    let sent = vec![packet("sn", "s1", 2, 50)];
    let replies = collect(
        c.transfer(tokio_stream::iter(sent.clone()))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert_eq!(replies[0].task.as_ref().unwrap().data, "s1");
    assert_eq!(srv.seen.recv().await.unwrap().unwrap(), sent[0]);
    let wire = srv.wire.lock().unwrap();
    assert_eq!(
        header(&wire.req_headers[2], "grpc-encoding"),
        Some("snappy")
    );
    assert_eq!(
        header(&wire.resp_headers[2], "grpc-encoding"),
        Some("snappy")
    );
}

#[tokio::test]
async fn oversize_message_is_rejected_and_server_keeps_serving() {
    let mut srv = start_server(
        SnappyServerLayer::new().with_max_decompressed(64 * 1024),
        false,
    )
    .await;
    let before = snappy::counters();
    let ch = channel(srv.addr).await;
    let mut client = TransferClient::new(SnappyClient::new(ch.clone()));
    // 1 small packet, then ~100 KB that compresses to a few KB: only the
    // decompressed size is over the cap.
    let sent = vec![packet("big", "b1", 1, 10), packet("big", "b2", 10, 10_000)];
    let mut replies = client
        .transfer(tokio_stream::iter(sent.clone()))
        .await
        .unwrap()
        .into_inner();
    let first = replies.message().await.unwrap().unwrap();
    assert_eq!(first.task.unwrap().data, "b1");
    let err = match replies.message().await {
        Ok(Some(_)) => panic!("oversize packet was answered"),
        Ok(None) => panic!("stream ended without an error status"),
        Err(e) => e,
    };
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("65536"), "{}", err.message());
    assert_eq!(srv.seen.recv().await.unwrap().unwrap(), sent[0]);
    let handler_err = srv.seen.recv().await.unwrap().unwrap_err();
    assert_eq!(handler_err.code(), Code::ResourceExhausted);
    assert!(snappy::counters().rejected_oversize > before.rejected_oversize);

    // Same connection and a fresh one both keep working.
    for ch in [ch, channel(srv.addr).await] {
        let mut c = TransferClient::new(SnappyClient::new(ch));
        let ok = vec![packet("next", "n1", 1, 10)];
        let r = collect(
            c.transfer(tokio_stream::iter(ok.clone()))
                .await
                .unwrap()
                .into_inner(),
        )
        .await
        .unwrap();
        assert_eq!(r[0].task.as_ref().unwrap().data, "n1");
        assert_eq!(srv.seen.recv().await.unwrap().unwrap(), ok[0]);
    }
}

/// Sends a hand-made `grpc-encoding: snappy` Transfer request whose body is
/// whatever `body` yields; returns the response trailers.
async fn raw_snappy_call<B>(addr: SocketAddr, body: B) -> HeaderMap
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut ch = channel(addr).await;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/grpc.Transfer/Transfer"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-encoding", "snappy")
        .body(Body::new(body))
        .unwrap();
    let resp = ch.ready().await.unwrap().call(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    collected.trailers().cloned().unwrap()
}

#[tokio::test]
async fn corrupt_snappy_request_gets_internal_status() {
    let srv = start_server(SnappyServerLayer::new(), false).await;
    let mut framed = snap_frame(&packet("bad", "c1", 2, 100).encode_to_vec());
    let last = framed.len() - 1;
    framed[last] ^= 0x55; // breaks the CRC (or the block)
    let mut body = vec![1];
    body.extend_from_slice(&(framed.len() as u32).to_be_bytes());
    body.extend_from_slice(&framed);
    let trailers = raw_snappy_call(srv.addr, http_body_util::Full::new(Bytes::from(body))).await;
    assert_eq!(header(&trailers, "grpc-status"), Some("13"), "{trailers:?}");
    assert!(
        header(&trailers, "grpc-message")
            .unwrap()
            .contains("snappy")
    );
}

/// A prefix declaring a 4 GiB compressed message is refused at the prefix:
/// the status comes back while the request body is still open, so nothing
/// waited for (or buffered) the declared bytes.
#[tokio::test]
async fn huge_declared_length_is_refused_without_buffering() {
    let srv = start_server(SnappyServerLayer::new(), false).await;
    let (tx, rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, std::convert::Infallible>>(4);
    let mut first = vec![1, 0xff, 0xff, 0xff, 0xff];
    first.extend_from_slice(&snappy::STREAM_IDENTIFIER);
    tx.send(Ok(http_body::Frame::data(Bytes::from(first))))
        .await
        .unwrap();
    let body = http_body_util::StreamBody::new(ReceiverStream::new(rx));
    // Hang guard only (not a timing assertion): without the early refusal
    // this call would wait forever for the 4 GiB.
    let trailers = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        raw_snappy_call(srv.addr, body),
    )
    .await
    .expect("no status while the request body was still open");
    assert_eq!(header(&trailers, "grpc-status"), Some("8"), "{trailers:?}");
    drop(tx);
}

#[tokio::test]
async fn oversize_upload_is_rejected() {
    let srv = start_server(
        SnappyServerLayer::new().with_max_decompressed(64 * 1024),
        false,
    )
    .await;
    let mut c = FileExtClient::new(SnappyClient::new(channel(srv.addr).await));
    let chunks = vec![FileUploadRequest {
        token: "t".into(),
        data: Bytes::from(vec![7u8; 100_000]),
    }];
    let err = c.upload(tokio_stream::iter(chunks)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

#[tokio::test]
async fn client_cap_rejects_oversize_reply() {
    let srv = start_server(SnappyServerLayer::new(), false).await;
    let ch = channel(srv.addr).await;
    let mut small = TransferClient::new(
        SnappyClientLayer::new()
            .with_max_decompressed(100_000)
            .layer(ch.clone()),
    );
    let err = collect(
        small
            .transfer(tokio_stream::iter(vec![packet("c", "big-reply", 1, 1)]))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The default 10 MiB cap takes the 300 KB reply.
    let mut big = TransferClient::new(SnappyClient::new(ch));
    let r = collect(
        big.transfer(tokio_stream::iter(vec![packet("c", "big-reply", 1, 1)]))
            .await
            .unwrap()
            .into_inner(),
    )
    .await
    .unwrap();
    assert_eq!(r[0].task.as_ref().unwrap().data.len(), 300_000);
}

#[tokio::test]
async fn file_upload_client_streaming_over_snappy() {
    let srv = start_server(SnappyServerLayer::new(), false).await;
    let mut c = FileExtClient::new(SnappyClient::new(channel(srv.addr).await));
    let chunks = (0..3).map(|i| FileUploadRequest {
        token: format!("tok{i}"),
        data: Bytes::from(vec![i as u8; 100_000]),
    });
    let resp = c
        .upload(tokio_stream::iter(chunks.collect::<Vec<_>>()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.status,
        file_upload_response::StatusCode::Success as i32
    );
    let wire = srv.wire.lock().unwrap();
    assert_eq!(
        header(&wire.req_headers[0], "grpc-encoding"),
        Some("snappy")
    );
    assert!(grpc_messages(&wire.req_bytes).iter().all(|(f, _)| *f == 1));
    // SUCCESS encodes as an empty message: sent uncompressed, like grpc-go.
    assert_eq!(grpc_messages(&wire.resp_bytes), vec![(0, Vec::new())]);
}
