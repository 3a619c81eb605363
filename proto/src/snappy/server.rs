//! Server side: [`SnappyServerLayer`] / [`SnappyServer`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body as TonicBody;
use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use super::body::{Abort, AbortSlot, TranscodeBody};
use super::framing::DEFAULT_MAX_DECOMPRESSED;
use super::headers;
use super::transcode::Direction;

/// Tower layer for a tonic server (`Server::builder().layer(...)`).
///
/// Requests with `grpc-encoding: snappy` are rewritten so tonic sees an
/// identity stream: the header goes, every snappy message is decompressed
/// (at most [`max_decompressed`](Self::max_decompressed) bytes each) and
/// plain messages pass through. Their responses are then compressed message
/// by message (empty ones stay uncompressed, as in grpc-go) and sent with
/// `grpc-encoding: snappy`, as the Go center does for a Go agent. A request that fails to decompress ends with an error
/// (`resource-exhausted` over the cap, `internal` for a malformed stream)
/// for the handler, and its response ends with that status as trailers.
///
/// Other requests (identity, gzip, zstd) reach tonic unchanged. Every
/// response advertises `snappy` in `grpc-accept-encoding`.
#[derive(Debug, Clone, Copy)]
pub struct SnappyServerLayer {
    max_decompressed: usize,
}

impl SnappyServerLayer {
    /// A layer with the default cap, [`DEFAULT_MAX_DECOMPRESSED`] (10 MiB).
    pub const fn new() -> Self {
        Self {
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        }
    }

    /// Sets the cap on one decompressed request message.
    #[must_use]
    pub const fn with_max_decompressed(mut self, max: usize) -> Self {
        self.max_decompressed = max;
        self
    }

    /// The cap on one decompressed request message.
    pub const fn max_decompressed(&self) -> usize {
        self.max_decompressed
    }
}

impl Default for SnappyServerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for SnappyServerLayer {
    type Service = SnappyServer<S>;

    fn layer(&self, inner: S) -> SnappyServer<S> {
        SnappyServer {
            inner,
            max_decompressed: self.max_decompressed,
        }
    }
}

/// The service made by [`SnappyServerLayer`].
#[derive(Debug, Clone)]
pub struct SnappyServer<S> {
    inner: S,
    max_decompressed: usize,
}

impl<S> SnappyServer<S> {
    /// Wraps `inner` with the default cap.
    pub fn new(inner: S) -> Self {
        SnappyServerLayer::new().layer(inner)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for SnappyServer<S>
where
    S: Service<Request<TonicBody>, Response = Response<RB>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<TonicBody>;
    type Error = S::Error;
    type Future = SnappyServerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        let (body, reply) = if headers::is_snappy(&parts.headers) {
            headers::clear_encoding(&mut parts.headers);
            // tonic must answer identity; this layer compresses the answer.
            parts.headers.remove(headers::GRPC_ACCEPT_ENCODING);
            let slot = Arc::new(AbortSlot::default());
            let dir = Direction::Decompress {
                max: self.max_decompressed,
            };
            let body = TranscodeBody::new(body, dir, Abort::Report(Arc::clone(&slot)));
            (TonicBody::new(body), Some(slot))
        } else {
            (TonicBody::new(body), None)
        };
        SnappyServerFuture {
            inner: self.inner.call(Request::from_parts(parts, body)),
            reply,
        }
    }
}

pin_project! {
    /// Response future of [`SnappyServer`].
    #[derive(Debug)]
    pub struct SnappyServerFuture<F> {
        #[pin]
        inner: F,
        reply: Option<Arc<AbortSlot>>,
    }
}

impl<F, RB, E> Future for SnappyServerFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<Response<TonicBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut parts, body) = ready!(this.inner.poll(cx))?.into_parts();
        headers::accept_snappy(&mut parts.headers);
        let trailers_only = parts.headers.contains_key(headers::GRPC_STATUS);
        let body = match this.reply.take() {
            Some(slot) if !trailers_only && !headers::has_encoding(&parts.headers) => {
                headers::set_snappy(&mut parts.headers);
                TonicBody::new(TranscodeBody::new(
                    body,
                    Direction::Compress,
                    Abort::Watch(slot),
                ))
            }
            _ => TonicBody::new(body),
        };
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}
