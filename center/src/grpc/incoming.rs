//! Accepted TCP connections, capped before any TLS or HTTP/2 work.
//!
//! At most `conn_limit + max(64, conn_limit / 10)` TCP connections are open
//! at once (the slack lets a reconnecting agent overlap its stale
//! connection); beyond that a new connection is closed right after accept and
//! counted (`elkeid_center_tcp_refused_total`). The exact per-stream
//! `conn_limit` is then enforced by the pool.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::metrics::{Metrics, inc};

/// TCP connection cap for a stream limit.
pub(crate) fn tcp_limit(conn_limit: usize) -> usize {
    conn_limit
        .saturating_add((conn_limit / 10).max(64))
        .min(Semaphore::MAX_PERMITS)
}

/// A TCP connection holding one of the capped slots.
#[derive(Debug)]
pub(crate) struct Limited {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The accept loop as a stream of capped connections. Accept errors (such as
/// running out of file descriptors) are logged and retried after a pause;
/// they never end the server.
pub(crate) fn incoming(
    listener: TcpListener,
    limit: usize,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<Limited, io::Error>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limit));
    futures_util::stream::unfold(
        (listener, slots, metrics),
        |(listener, slots, metrics)| async move {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            inc(&metrics.tcp_refused);
                            tracing::debug!(%peer, "tcp connection refused: too many open connections");
                            drop(stream);
                            continue;
                        };
                        let _ = stream.set_nodelay(true);
                        return Some((
                            Ok(Limited {
                                inner: stream,
                                _permit: permit,
                            }),
                            (listener, slots, metrics),
                        ));
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accept failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn refuses_beyond_the_cap() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        let mut inc = Box::pin(incoming(l, 1, metrics.clone()));
        let _c1 = TcpStream::connect(addr).await.unwrap();
        let first = inc.next().await.unwrap().unwrap();
        let mut c2 = TcpStream::connect(addr).await.unwrap();
        // the second is accepted and closed while the first holds the slot
        let accept_more = tokio::spawn(async move {
            let next = inc.next().await;
            (next.map(|r| r.is_ok()), inc)
        });
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut c2, &mut buf)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "refused connection is closed");
        assert_eq!(metrics.tcp_refused.get(), 1);
        drop(first);
        let _c3 = TcpStream::connect(addr).await.unwrap();
        let (next, _inc) = accept_more.await.unwrap();
        assert_eq!(next, Some(true));
        assert_eq!(tcp_limit(10_000), 11_000);
        assert_eq!(tcp_limit(10), 74);
    }
}
