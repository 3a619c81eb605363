//! The agent's gRPC client, straight on `h2`: the two calls it makes,
//! `/grpc.Transfer/Transfer` (bidirectional stream) and
//! `/grpc.FileExt/Upload` (client stream). tonic, tower and hyper's HTTP/2
//! glue were ~10% of the static router binary for these two calls
//! (docs/BENCHMARKS.md, "Size work").
//!
//! What goes over the wire is what tonic sent before (README, "Compatibility
//! with Elkeid"; gRPC over HTTP/2 as grpc-go speaks it):
//! - request headers: `POST`, `:scheme https`, `:authority` the configured
//!   server name, `:path` the method, `te: trailers`,
//!   `content-type: application/grpc`, `grpc-encoding: snappy`,
//!   `grpc-accept-encoding: snappy`;
//! - every message: a 5-byte prefix (compressed flag, u32 big-endian
//!   length) and the payload. Non-empty request messages are one complete
//!   snappy *framing* stream each (flag 1); empty ones go uncompressed
//!   (flag 0), as grpc-go sends them;
//! - the response: HTTP 200, messages as above (flag 1 only under
//!   `grpc-encoding: snappy`), then trailers with `grpc-status` (0 = OK)
//!   and the percent-encoded `grpc-message`; a Trailers-Only response
//!   carries both in its headers.
//!
//! Flow control is h2's: a message is handed over as the stream's send
//! window allows (the caller waits), and received bytes are released to
//! the peer as they are consumed. One response message is buffered at a
//! time, its declared length checked against [`MAX_MESSAGE`] first.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use elkeid_proto::snappy;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::{HeaderMap, HeaderValue, Method, Request};

use super::channel::ByteCounters;
use super::recycle::Recycler;

/// gRPC message prefix: compressed flag + u32 big-endian length.
const PREFIX_LEN: usize = 5;
/// Largest response message accepted, decompressed (tonic's default
/// receive limit, which applied before).
pub(crate) const MAX_MESSAGE: usize = 4 << 20;
/// Framed request buffers kept for reuse once written (`recycle.rs`).
const FRAMED_RECYCLE_BYTES: usize = 4 << 20;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GrpcError {
    /// The center answered with a non-OK `grpc-status`.
    #[error("status: {}, message: {message:?}", code_name(*.code))]
    Status {
        /// The gRPC status code.
        code: u32,
        /// `grpc-message`, percent-decoded.
        message: String,
    },
    /// The HTTP/2 connection or stream failed.
    #[error("h2: {0}")]
    H2(#[from] h2::Error),
    /// The response is not valid gRPC (or over a limit).
    #[error("{0}")]
    Protocol(String),
    /// A message is not the expected protobuf.
    #[error("decode: {0}")]
    Decode(#[from] prost::DecodeError),
}

/// The canonical name of a gRPC status code.
fn code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "Ok",
        "Cancelled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    NAMES.get(code as usize).copied().unwrap_or("Unknown")
}

/// Starts a call: sends the request headers on a new stream of the
/// connection `send`. Returns the request side and the response future.
pub(crate) async fn start(
    send: &SendRequest<Bytes>,
    counters: &Arc<ByteCounters>,
    authority: &str,
    path: &'static str,
) -> Result<(Sender, ResponseFuture), GrpcError> {
    let uri = http::Uri::builder()
        .scheme("https")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| GrpcError::Protocol(format!("request uri: {e}")))?;
    let mut req = Request::new(());
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    let h = req.headers_mut();
    h.insert(http::header::TE, HeaderValue::from_static("trailers"));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(
        "grpc-encoding",
        HeaderValue::from_static(snappy::ENCODING_NAME),
    );
    h.insert(
        "grpc-accept-encoding",
        HeaderValue::from_static(snappy::ENCODING_NAME),
    );
    let mut send = send.clone().ready().await?;
    let (response, stream) = send.send_request(req, false)?;
    Ok((
        Sender {
            stream,
            counters: counters.clone(),
            framed: Recycler::new(FRAMED_RECYCLE_BYTES),
            scratch: Vec::new(),
        },
        response,
    ))
}

/// The request side of a call.
#[derive(Debug)]
pub(crate) struct Sender {
    stream: SendStream<Bytes>,
    counters: Arc<ByteCounters>,
    /// The framed buffers come back once h2 wrote them (`recycle.rs`).
    framed: Recycler,
    /// The snappy encoder's output scratch (`snappy::compress_with`).
    scratch: Vec<u8>,
}

impl Sender {
    /// Sends one already-encoded protobuf message (snappy-compressed when
    /// not empty); returns once h2 took all of it.
    pub(crate) async fn send(&mut self, msg: &[u8]) -> Result<(), GrpcError> {
        // room for the worst case (nothing compresses), so compress_with
        // never grows it: a reused buffer then serves every message
        let mut framed = self
            .framed
            .take(PREFIX_LEN + snappy::max_framed_len(msg.len()));
        encode(msg, &mut framed, &mut self.scratch)?;
        let n = framed.len() as u64;
        let framed = self.framed.hand_out(framed);
        self.write(framed).await?;
        self.counters.tx.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn write(&mut self, mut data: Bytes) -> Result<(), GrpcError> {
        while !data.is_empty() {
            self.stream.reserve_capacity(data.len());
            let granted = std::future::poll_fn(|cx| self.stream.poll_capacity(cx)).await;
            match granted {
                Some(Ok(0)) => {}
                Some(Ok(n)) => {
                    let chunk = data.split_to(n.min(data.len()));
                    self.stream.send_data(chunk, false)?;
                }
                Some(Err(e)) => return Err(e.into()),
                None => return Err(GrpcError::Protocol("request stream closed".into())),
            }
        }
        Ok(())
    }

    /// Forgets the framed buffers kept for reuse (the ring went idle).
    pub(crate) fn release_buffers(&mut self) {
        self.framed.clear();
        self.scratch = Vec::new();
    }

    /// Ends the request stream (END_STREAM on an empty DATA frame).
    pub(crate) fn finish(&mut self) -> Result<(), GrpcError> {
        self.stream.send_data(Bytes::new(), true)?;
        Ok(())
    }
}

/// The response side of a call: a stream of messages, then the status.
#[derive(Debug)]
pub(crate) struct Receiver {
    body: RecvStream,
    buf: BytesMut,
    snappy: bool,
    counters: Arc<ByteCounters>,
    /// The status arrived (Trailers-Only response or trailers read).
    done: bool,
}

impl Receiver {
    /// Waits for the response headers and checks them.
    pub(crate) async fn open(
        response: ResponseFuture,
        counters: &Arc<ByteCounters>,
    ) -> Result<Receiver, GrpcError> {
        let (parts, body) = response.await?.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(GrpcError::Protocol(format!(
                "HTTP status {} from the center",
                parts.status.as_u16()
            )));
        }
        // Trailers-Only: the status is in the headers, the body is empty.
        if parts.headers.contains_key("grpc-status") {
            status(&parts.headers)?;
            return Ok(Receiver {
                body,
                buf: BytesMut::new(),
                snappy: false,
                counters: counters.clone(),
                done: true,
            });
        }
        let snappy = match parts
            .headers
            .get("grpc-encoding")
            .map(HeaderValue::as_bytes)
        {
            None | Some(b"identity") => false,
            Some(v) if v.eq_ignore_ascii_case(snappy::ENCODING_NAME.as_bytes()) => true,
            Some(v) => {
                return Err(GrpcError::Protocol(format!(
                    "unsupported grpc-encoding {:?}",
                    String::from_utf8_lossy(v)
                )));
            }
        };
        Ok(Receiver {
            body,
            buf: BytesMut::new(),
            snappy,
            counters: counters.clone(),
            done: false,
        })
    }

    /// The next message, or `None` once the call ended with status OK.
    pub(crate) async fn message<M: prost::Message + Default>(
        &mut self,
    ) -> Result<Option<M>, GrpcError> {
        if self.done {
            return Ok(None);
        }
        loop {
            if let Some(msg) = self.parse()? {
                return Ok(Some(M::decode(msg)?));
            }
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    let n = chunk.len();
                    self.counters.rx.fetch_add(n as u64, Ordering::Relaxed);
                    self.buf.extend_from_slice(&chunk);
                    let _ = self.body.flow_control().release_capacity(n);
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
        }
        if !self.buf.is_empty() {
            return Err(GrpcError::Protocol(
                "response ended inside a gRPC message".into(),
            ));
        }
        let trailers = self.body.trailers().await?;
        self.done = true;
        match trailers {
            Some(t) => status(&t).map(|()| None),
            None => Err(GrpcError::Protocol("response without grpc-status".into())),
        }
    }

    fn parse(&mut self) -> Result<Option<Bytes>, GrpcError> {
        parse_buf(&mut self.buf, self.snappy)
    }
}

/// One request message on the wire: prefix + snappy framing stream (flag
/// 1), or the bare prefix (flag 0) for an empty message.
fn encode(msg: &[u8], framed: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Result<(), GrpcError> {
    framed.clear();
    framed.extend_from_slice(&[u8::from(!msg.is_empty()), 0, 0, 0, 0]);
    snappy::compress_with(msg, framed, scratch);
    let len = u32::try_from(framed.len() - PREFIX_LEN)
        .map_err(|_| GrpcError::Protocol("message over 4 GiB".into()))?;
    framed[1..PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// One whole response message out of `buf`, decompressed, once it is all
/// there; its declared length is checked first.
fn parse_buf(buf: &mut BytesMut, snappy_on: bool) -> Result<Option<Bytes>, GrpcError> {
    let Some(prefix) = buf.get(..PREFIX_LEN) else {
        return Ok(None);
    };
    let flag = prefix[0];
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    let limit = match flag {
        0 => MAX_MESSAGE,
        1 if snappy_on => snappy::max_framed_len(MAX_MESSAGE),
        1 => {
            return Err(GrpcError::Protocol(
                "compressed message without grpc-encoding".into(),
            ));
        }
        f => return Err(GrpcError::Protocol(format!("invalid compressed flag {f}"))),
    };
    if len > limit {
        return Err(GrpcError::Protocol(format!(
            "response message of {len} bytes over the {MAX_MESSAGE}-byte limit"
        )));
    }
    if buf.len() < PREFIX_LEN + len {
        buf.reserve(PREFIX_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(PREFIX_LEN);
    let payload = buf.split_to(len).freeze();
    if flag == 0 {
        return Ok(Some(payload));
    }
    snappy::decompress(&payload, MAX_MESSAGE)
        .map(|m| Some(Bytes::from(m)))
        .map_err(|e| GrpcError::Protocol(format!("snappy: {e}")))
}

/// `Ok` for `grpc-status: 0`, the status as an error otherwise.
fn status(h: &HeaderMap) -> Result<(), GrpcError> {
    let code = h
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| GrpcError::Protocol("missing or invalid grpc-status".into()))?;
    if code == 0 {
        return Ok(());
    }
    let message = h
        .get("grpc-message")
        .map(|v| {
            percent_encoding::percent_decode(v.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    Err(GrpcError::Status { code, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn parse(snappy_on: bool, bytes: &[u8]) -> Result<Option<Bytes>, GrpcError> {
        parse_buf(&mut BytesMut::from(bytes), snappy_on)
    }

    #[test]
    fn status_codes_and_messages() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("0"));
        assert!(status(&h).is_ok());
        h.insert("grpc-status", HeaderValue::from_static("14"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("agent%20id%20conflict%3A%20%E2%9C%93"),
        );
        let e = status(&h).unwrap_err();
        assert_eq!(
            e.to_string(),
            "status: Unavailable, message: \"agent id conflict: \u{2713}\""
        );
        assert!(status(&HeaderMap::new()).is_err());
        h.insert("grpc-status", HeaderValue::from_static("x"));
        assert!(status(&h).is_err());
        h.insert("grpc-status", HeaderValue::from_static("99"));
        assert!(
            status(&h)
                .unwrap_err()
                .to_string()
                .starts_with("status: Unknown")
        );
    }

    #[test]
    fn parse_plain_snappy_partial_and_limits() {
        // plain message, then a partial one
        let mut b = frame(0, b"abc");
        b.extend_from_slice(&frame(0, b"defg")[..6]);
        let mut buf = BytesMut::from(&b[..]);
        assert_eq!(parse_buf(&mut buf, false).unwrap().unwrap(), &b"abc"[..]);
        assert!(parse_buf(&mut buf, false).unwrap().is_none());
        buf.extend_from_slice(b"efg");
        assert_eq!(parse_buf(&mut buf, false).unwrap().unwrap(), &b"defg"[..]);
        assert!(buf.is_empty());
        // snappy framing, as the centers send it
        let msg = vec![7u8; 100_000];
        let z = snappy::compress(&msg);
        assert_eq!(parse(true, &frame(1, &z)).unwrap().unwrap(), &msg[..]);
        // flag 1 without grpc-encoding, bad flag, over the limit, bad stream
        assert!(parse(false, &frame(1, &z)).is_err());
        assert!(parse(true, &frame(2, b"x")).is_err());
        let mut big = vec![0u8];
        big.extend_from_slice(&((MAX_MESSAGE + 1) as u32).to_be_bytes());
        assert!(parse(false, &big).is_err());
        assert!(parse(true, &frame(1, b"not snappy")).is_err());
        // the empty message
        assert_eq!(parse(true, &frame(0, b"")).unwrap().unwrap(), &b""[..]);
    }

    /// `Sender::send`'s framing, checked against the decoder side.
    #[test]
    fn request_framing_round_trips() {
        // one buffer for all: encode starts from a clear one
        let mut framed = vec![1u8; 3];
        for msg in [&b""[..], b"x", &[9u8; 200_000][..], b"y"] {
            encode(msg, &mut framed, &mut Vec::new()).unwrap();
            let len = (framed.len() - PREFIX_LEN) as u32;
            assert_eq!(framed[1..PREFIX_LEN], len.to_be_bytes());
            if msg.is_empty() {
                assert_eq!(framed, [0, 0, 0, 0, 0]);
            } else {
                assert_eq!(&framed[5..15], &snappy::STREAM_IDENTIFIER);
            }
            assert_eq!(parse(true, &framed).unwrap().unwrap(), msg);
        }
    }
}
