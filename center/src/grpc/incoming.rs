//! Accepted TCP connections, capped before any TLS or HTTP/2 work, and
//! their TLS handshakes under a deadline.
//!
//! At most `conn_limit + max(64, conn_limit / 10)` TCP connections are open
//! at once (the slack lets a reconnecting agent overlap its stale
//! connection); beyond that a new connection is closed right after accept and
//! counted (`elkeid_center_tcp_refused_total`). The exact per-stream
//! `conn_limit` is then enforced by the pool.
//!
//! With TLS ([`tls_incoming`]) each accepted connection has
//! `tls_handshake_timeout_secs` (10 s) to complete its handshake, run in its
//! own task so a slow one delays no other; a connection that sends nothing,
//! half a ClientHello or a handshake that fails is closed, its TCP slot
//! freed, and counted in
//! `elkeid_center_tls_handshakes_refused_total{listener="grpc",reason="timeout"|"failed"}`.
//!
//! Completed handshakes are counted by kind
//! (`elkeid_center_tls_handshakes_total{listener="grpc",kind="full"|"resumed"}`).
//! A resumed session (session ticket, see [`crate::tickets`]) skipped the
//! certificate exchange: its client certificate chain, restored from the
//! ticket, is verified again here against the CA with the listener's own
//! verifier (expiry included) before the connection is served; one that no
//! longer verifies is closed (counted as `failed`) and the agent's next
//! dial does a full handshake.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
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

/// The next connection that gets one of `slots`. Accept errors (such as
/// running out of file descriptors) are logged and retried after a pause;
/// they never end the server.
async fn accept_limited(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    metrics: &Metrics,
) -> (Limited, std::net::SocketAddr) {
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
                return (
                    Limited {
                        inner: stream,
                        _permit: permit,
                    },
                    peer,
                );
            }
            Err(error) => {
                tracing::warn!(%error, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The accept loop as a stream of capped plaintext connections.
pub(crate) fn incoming(
    listener: TcpListener,
    limit: usize,
    metrics: Arc<Metrics>,
) -> impl Stream<Item = Result<Limited, io::Error>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limit));
    futures_util::stream::unfold(
        (listener, slots, metrics),
        |(listener, slots, metrics)| async move {
            let (conn, _) = accept_limited(&listener, &slots, &metrics).await;
            Some((Ok(conn), (listener, slots, metrics)))
        },
    )
}

/// Established TLS connections handed to the server at once.
const READY_QUEUE: usize = 64;

/// Checks the client certificate chain a resumed session restored from
/// its ticket, as a full handshake would now.
pub(crate) fn reverify(
    verifier: &dyn ClientCertVerifier,
    chain: Option<&[CertificateDer<'static>]>,
) -> Result<(), String> {
    match chain.and_then(|c| c.split_first()) {
        Some((leaf, intermediates)) => verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string()),
        None if verifier.client_auth_mandatory() => {
            Err("resumed session without a client certificate".into())
        }
        None => Ok(()),
    }
}

/// The accept loop as a stream of capped connections whose TLS handshake
/// completed within `timeout` (see the module docs). The accept task ends
/// when the stream is dropped (server shutdown).
pub(crate) fn tls_incoming(
    listener: TcpListener,
    limit: usize,
    metrics: Arc<Metrics>,
    tls: Arc<rustls::ServerConfig>,
    verifier: Arc<dyn ClientCertVerifier>,
    timeout: Duration,
) -> impl Stream<Item = Result<TlsStream<Limited>, io::Error>> + Send + 'static {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    let slots = Arc::new(Semaphore::new(limit));
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (conn, peer) = tokio::select! {
                _ = tx.closed() => return,
                c = accept_limited(&listener, &slots, &metrics) => c,
            };
            let (tx, acceptor, metrics) = (tx.clone(), acceptor.clone(), metrics.clone());
            let verifier = verifier.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(timeout, acceptor.accept(conn)).await {
                    Ok(Ok(tls)) => {
                        let session = tls.get_ref().1;
                        let resumed =
                            session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                        if resumed
                            && let Err(error) = reverify(&*verifier, session.peer_certificates())
                        {
                            metrics.tls_refused("grpc", false);
                            tracing::debug!(%peer, %error, "grpc: resumed session's client certificate refused");
                            return;
                        }
                        metrics.tls_handshake("grpc", resumed);
                        // the server is gone when this fails: the connection just closes
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        metrics.tls_refused("grpc", false);
                        tracing::debug!(%peer, %error, "grpc: TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.tls_refused("grpc", true);
                        tracing::debug!(%peer, ?timeout, "grpc: TLS handshake not completed in time: closed");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
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
