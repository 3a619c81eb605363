//! Client side: [`SnappyClientLayer`] / [`SnappyClient`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body as TonicBody;
use tower_layer::Layer;
use tower_service::Service;

use super::BoxError;
use super::body::{Abort, TranscodeBody};
use super::framing::DEFAULT_MAX_DECOMPRESSED;
use super::headers;
use super::transcode::Direction;

/// Tower layer for the client side of a gRPC channel: compresses every
/// non-empty outgoing message into a snappy stream (`grpc-encoding: snappy`;
/// empty messages go uncompressed, as grpc-go sends them),
/// advertises `grpc-accept-encoding: snappy`, and decompresses responses
/// sent with `grpc-encoding: snappy` before tonic decodes them (at most
/// [`max_decompressed`](Self::max_decompressed) bytes per message).
///
/// Requests that already carry a non-identity `grpc-encoding` (tonic's own
/// gzip/zstd) are sent unchanged.
#[derive(Debug, Clone, Copy)]
pub struct SnappyClientLayer {
    max_decompressed: usize,
}

impl SnappyClientLayer {
    /// A layer with the default cap, [`DEFAULT_MAX_DECOMPRESSED`] (10 MiB).
    pub const fn new() -> Self {
        Self {
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        }
    }

    /// Sets the cap on one decompressed response message.
    #[must_use]
    pub const fn with_max_decompressed(mut self, max: usize) -> Self {
        self.max_decompressed = max;
        self
    }

    /// The cap on one decompressed response message.
    pub const fn max_decompressed(&self) -> usize {
        self.max_decompressed
    }
}

impl Default for SnappyClientLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for SnappyClientLayer {
    type Service = SnappyClient<S>;

    fn layer(&self, inner: S) -> SnappyClient<S> {
        SnappyClient {
            inner,
            max_decompressed: self.max_decompressed,
        }
    }
}

/// The service made by [`SnappyClientLayer`], generic over the transport
/// (`tonic::transport::Channel` or any
/// `Service<http::Request<tonic::body::Body>>`).
#[derive(Debug, Clone)]
pub struct SnappyClient<S> {
    inner: S,
    max_decompressed: usize,
}

impl<S> SnappyClient<S> {
    /// Wraps `inner` with the default cap.
    pub fn new(inner: S) -> Self {
        SnappyClientLayer::new().layer(inner)
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for SnappyClient<S>
where
    S: Service<Request<TonicBody>, Response = Response<RB>>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<TonicBody>;
    type Error = S::Error;
    type Future = SnappyClientFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        headers::accept_snappy(&mut parts.headers);
        let body = if headers::has_encoding(&parts.headers) {
            TonicBody::new(body)
        } else {
            headers::set_snappy(&mut parts.headers);
            TonicBody::new(TranscodeBody::new(body, Direction::Compress, Abort::None))
        };
        SnappyClientFuture {
            inner: self.inner.call(Request::from_parts(parts, body)),
            max_decompressed: self.max_decompressed,
        }
    }
}

pin_project! {
    /// Response future of [`SnappyClient`].
    #[derive(Debug)]
    pub struct SnappyClientFuture<F> {
        #[pin]
        inner: F,
        max_decompressed: usize,
    }
}

impl<F, RB, E> Future for SnappyClientFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Output = Result<Response<TonicBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (mut parts, body) = ready!(this.inner.poll(cx))?.into_parts();
        let body = if headers::is_snappy(&parts.headers) {
            headers::clear_encoding(&mut parts.headers);
            let dir = Direction::Decompress {
                max: *this.max_decompressed,
            };
            TonicBody::new(TranscodeBody::new(body, dir, Abort::None))
        } else {
            TonicBody::new(body)
        };
        Poll::Ready(Ok(Response::from_parts(parts, body)))
    }
}
