//! [`TranscodeBody`]: an `http_body::Body` that runs a [`Transcoder`] over
//! another body, one chunk at a time, and the [`AbortSlot`] through which a
//! failing request body ends the matching response with an error status.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::Status;

use super::counters;
use super::transcode::{Direction, Transcoder};

/// Shared between a server request body and its response body: the request
/// side stores the status that made it fail; the response side forwards the
/// replies that are ready, then (between messages) ends the response with
/// that status as trailers, also replacing the handler's own trailers.
#[derive(Debug, Default)]
pub(crate) struct AbortSlot {
    inner: Mutex<AbortInner>,
}

#[derive(Debug, Default)]
struct AbortInner {
    status: Option<Status>,
    waker: Option<Waker>,
}

impl AbortSlot {
    fn set(&self, status: Status) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if g.status.is_none() {
            g.status = Some(status);
        }
        if let Some(w) = g.waker.take() {
            w.wake();
        }
    }

    fn take(&self) -> Option<Status> {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .status
            .take()
    }

    fn register(&self, waker: &Waker) {
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        match &g.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => g.waker = Some(waker.clone()),
        }
    }
}

/// How a body takes part in abort signalling.
#[derive(Debug)]
pub(crate) enum Abort {
    /// Not linked to another body.
    None,
    /// Request body: report its own transcoding errors.
    Report(Arc<AbortSlot>),
    /// Response body: end early with a reported status.
    Watch(Arc<AbortSlot>),
}

pin_project! {
    /// A body whose gRPC messages are rewritten by a [`Transcoder`].
    pub(crate) struct TranscodeBody<B> {
        #[pin]
        inner: B,
        codec: Transcoder,
        pending: VecDeque<Bytes>,
        // Delivered once `pending` (messages before the bad one) is drained.
        error: Option<Status>,
        done: bool,
        abort: Abort,
    }
}

impl<B> TranscodeBody<B> {
    pub(crate) fn new(inner: B, dir: Direction, abort: Abort) -> Self {
        Self {
            inner,
            codec: Transcoder::new(dir),
            pending: VecDeque::new(),
            error: None,
            done: false,
            abort,
        }
    }
}

fn status_trailers(status: &Status) -> HeaderMap {
    let mut h = HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.clear();
        h.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    h
}

impl<B> Body for TranscodeBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let mut this = self.project();
        loop {
            let fail = |done: &mut bool, abort: &Abort, status: Status| {
                *done = true;
                counters::record_error(&status);
                if let Abort::Report(slot) = abort {
                    slot.set(status.clone());
                }
                Poll::Ready(Some(Err(status)))
            };
            if let Some(data) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if let Some(status) = this.error.take() {
                return fail(this.done, this.abort, status);
            }
            if *this.done {
                return Poll::Ready(None);
            }
            if let Abort::Watch(slot) = &*this.abort {
                slot.register(cx.waker());
            }
            let frame = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => {
                    // Replies already produced have been forwarded; if the
                    // request was rejected, end now rather than wait for the
                    // handler.
                    if this.codec.at_boundary()
                        && let Some(status) = watched_status(this.abort)
                    {
                        *this.done = true;
                        return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    *this.done = true;
                    if let Err(e) = this.codec.finish() {
                        return fail(this.done, this.abort, e.to_status());
                    }
                    if let Some(status) = watched_status(this.abort) {
                        return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))));
                    }
                    continue;
                }
                Poll::Ready(Some(Err(e))) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(Status::from_error(e.into()))));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    if let Err(e) = this.codec.push(data, this.pending) {
                        // Messages completed before the bad one still go out first.
                        *this.done = true;
                        *this.error = Some(e.to_status());
                    }
                }
                Err(frame) => {
                    if let Err(e) = this.codec.finish() {
                        return fail(this.done, this.abort, e.to_status());
                    }
                    *this.done = true;
                    // The request was rejected: its status wins over the handler's.
                    if let Some(status) = watched_status(this.abort) {
                        return Poll::Ready(Some(Ok(Frame::trailers(status_trailers(&status)))));
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty()
            && self.error.is_none()
            && (self.done || (self.inner.is_end_stream() && self.codec.at_boundary()))
    }

    fn size_hint(&self) -> SizeHint {
        // Rewriting changes the length; only an empty body stays exact.
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

fn watched_status(abort: &Abort) -> Option<Status> {
    match abort {
        Abort::Watch(slot) => slot.take(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    fn msg(flag: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flag];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// Drains a body: (data bytes, first error).
    async fn drain<B: Body<Data = Bytes, Error = Status> + Unpin>(
        mut b: B,
    ) -> (Vec<u8>, Option<Status>) {
        let mut data = Vec::new();
        while let Some(f) = b.frame().await {
            match f {
                Ok(f) => data.extend_from_slice(&f.into_data().unwrap_or_default()),
                Err(e) => return (data, Some(e)),
            }
        }
        (data, None)
    }

    #[tokio::test]
    async fn messages_before_a_bad_one_are_delivered_then_the_error() {
        let good = super::super::compress(b"first");
        let input = [msg(1, &good), msg(0, b"second"), msg(1, b"not snappy")].concat();
        let slot = Arc::new(AbortSlot::default());
        let body = TranscodeBody::new(
            Full::new(Bytes::from(input)),
            Direction::Decompress { max: 100 },
            Abort::Report(slot.clone()),
        );
        let (data, err) = drain(body).await;
        assert_eq!(data, [msg(0, b"first"), msg(0, b"second")].concat());
        assert_eq!(err.unwrap().code(), tonic::Code::Internal);
        assert_eq!(
            slot.take().unwrap().code(),
            tonic::Code::Internal,
            "reported to the response side"
        );
    }

    #[tokio::test]
    async fn watcher_replaces_handler_trailers_with_reported_status() {
        let slot = Arc::new(AbortSlot::default());
        slot.set(Status::resource_exhausted("too big"));
        let mut ok = HeaderMap::new();
        ok.insert("grpc-status", http::HeaderValue::from_static("0"));
        let inner = Full::new(Bytes::from(msg(0, b"reply")))
            .map_err(|e| match e {})
            .with_trailers(std::future::ready(Some(Ok::<_, std::convert::Infallible>(
                ok,
            ))));
        let mut body = TranscodeBody::new(inner, Direction::Compress, Abort::Watch(slot));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first[0], 1, "the ready reply is still sent, compressed");
        let trailers = body
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_trailers()
            .unwrap();
        assert_eq!(trailers["grpc-status"], "8");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn truncated_body_is_an_error() {
        let body = TranscodeBody::new(
            Full::new(Bytes::from_static(&[0, 0, 0, 0, 9, 1, 2])),
            Direction::Compress,
            Abort::None,
        );
        let (data, err) = drain(body).await;
        assert!(data.is_empty());
        assert_eq!(err.unwrap().code(), tonic::Code::Internal);
    }
}
