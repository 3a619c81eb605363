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
            if let Some(data) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if *this.done {
                return Poll::Ready(None);
            }
            if let Abort::Watch(slot) = &*this.abort {
                slot.register(cx.waker());
            }
            let fail = |done: &mut bool, abort: &Abort, status: Status| {
                *done = true;
                counters::record_error(&status);
                if let Abort::Report(slot) = abort {
                    slot.set(status.clone());
                }
                Poll::Ready(Some(Err(status)))
            };
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
                        this.pending.clear();
                        return fail(this.done, this.abort, e.to_status());
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
