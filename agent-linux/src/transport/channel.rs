//! One HTTP/2 connection to a center: TCP + TLS (ALPN `h2`) + hyper's h2
//! client, exposed as a tower service for tonic, with byte counters for the
//! heartbeat's `rx_speed` / `tx_speed` (gRPC message bytes incl. the 5-byte
//! prefix, as they go over the wire after compression).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub(crate) use crate::counters::ByteCounters;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tonic::body::Body as TonicBody;

/// Connection errors.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChannelError {
    /// TCP connect (or name resolution) failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (bad certificate, wrong name, ...).
    #[error("tls handshake with {addr}: {source}")]
    Tls {
        /// The address dialled.
        addr: String,
        /// The I/O error wrapping the rustls error.
        source: std::io::Error,
    },
    /// The server did not negotiate ALPN `h2`.
    #[error("{0} did not negotiate ALPN h2")]
    NoH2(String),
    /// The HTTP/2 handshake failed.
    #[error("h2 handshake with {addr}: {source}")]
    H2 {
        /// The address dialled.
        addr: String,
        /// hyper's error.
        source: hyper::Error,
    },
    /// The whole dial took longer than the dial timeout.
    #[error("dial {0} timed out")]
    Timeout(String),
}

/// HTTP/2 PING after this long without a frame from the center. Not below
/// 5 s: Elkeid's Go center sends GOAWAY `too_many_pings` to clients that
/// ping more often than its keepalive `MinTime` (5 s).
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(6);
/// A PING not answered within this closes the connection.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A live h2 connection usable by tonic (cheap to clone; clones share the
/// connection, so file uploads run as another stream on it).
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    send: http2::SendRequest<TonicBody>,
    counters: Arc<ByteCounters>,
}

impl Channel {
    /// Dials `addr` (`host:port`) within `timeout`, with the hung-peer bound
    /// `failover`: the socket's
    /// `TCP_USER_TIMEOUT` (sent data unacknowledged by the peer's kernel for
    /// that long closes the connection) and HTTP/2 PING keepalive (no frame
    /// from the center for [`PING_INTERVAL`], then no PING answer within
    /// [`PING_TIMEOUT`], closes it: a frozen center process whose kernel
    /// still acknowledges TCP).
    pub(crate) async fn connect(
        addr: &str,
        tls: Arc<ClientConfig>,
        name: ServerName<'static>,
        counters: Arc<ByteCounters>,
        timeout: Duration,
        failover: Duration,
    ) -> Result<Channel, ChannelError> {
        match tokio::time::timeout(timeout, Self::dial(addr, tls, name, counters, failover)).await {
            Ok(r) => r,
            Err(_) => Err(ChannelError::Timeout(addr.to_string())),
        }
    }

    async fn dial(
        addr: &str,
        tls: Arc<ClientConfig>,
        name: ServerName<'static>,
        counters: Arc<ByteCounters>,
        failover: Duration,
    ) -> Result<Channel, ChannelError> {
        let a = || addr.to_string();
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ChannelError::Connect { addr: a(), source })?;
        let _ = tcp.set_nodelay(true);
        let ms = u32::try_from(failover.as_millis()).unwrap_or(u32::MAX);
        if let Err(error) =
            nix::sys::socket::setsockopt(&tcp, nix::sys::socket::sockopt::TcpUserTimeout, &ms)
        {
            tracing::debug!(%error, "TCP_USER_TIMEOUT not set");
        }
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .map_err(|source| ChannelError::Tls { addr: a(), source })?;
        if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ChannelError::NoH2(a()));
        }
        let (send, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(2 << 20)
            .max_send_buf_size(1 << 20)
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ChannelError::H2 { addr: a(), source })?;
        let addr_s = a();
        tokio::task::spawn_local(async move {
            if let Err(error) = conn.await {
                tracing::debug!(addr = %addr_s, %error, "h2 connection ended");
            }
        });
        Ok(Channel { send, counters })
    }
}

impl tower::Service<Request<TonicBody>> for Channel {
    type Response = Response<Counted<hyper::body::Incoming>>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, hyper::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), hyper::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, req: Request<TonicBody>) -> Self::Future {
        let tx = self.counters.clone();
        let (parts, body) = req.into_parts();
        let body = TonicBody::new(Counted {
            inner: body,
            counters: tx.clone(),
            tx: true,
        });
        let fut = self.send.send_request(Request::from_parts(parts, body));
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| Counted {
                inner,
                counters: tx,
                tx: false,
            }))
        })
    }
}

/// A body that adds the length of every data frame to a counter.
#[derive(Debug)]
pub(crate) struct Counted<B> {
    inner: B,
    counters: Arc<ByteCounters>,
    tx: bool,
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r
            && let Some(d) = f.data_ref()
        {
            let c = if self.tx {
                &self.counters.tx
            } else {
                &self.counters.rx
            };
            c.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
