//! One HTTP/2 connection to a center: TCP + TLS (ALPN `h2`) + an `h2`
//! client connection with PING keepalive, and the byte counters for the
//! heartbeat's `rx_speed` / `tx_speed` (gRPC message bytes incl. the 5-byte
//! prefix, as they go over the wire after compression; counted by
//! [`super::grpc`]).

use std::sync::Arc;

pub(crate) use crate::counters::ByteCounters;
use std::time::Duration;

use bytes::Bytes;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;

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
        /// h2's error.
        source: h2::Error,
    },
    /// The whole dial took longer than the dial timeout.
    #[error("dial {0} timed out")]
    Timeout(String),
}

/// HTTP/2 PING this long after the previous answer. Not below 5 s:
/// Elkeid's Go center sends GOAWAY `too_many_pings` to clients that ping
/// more often than its keepalive `MinTime` (5 s).
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(6);
/// A PING not answered within this closes the connection.
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// A live h2 connection (cheap to clone; clones share the connection, so
/// file uploads run as another stream on it).
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    pub(crate) send: h2::client::SendRequest<Bytes>,
    pub(crate) counters: Arc<ByteCounters>,
}

impl Channel {
    /// Dials `addr` (`host:port`) within `timeout`, with the hung-peer bound
    /// `failover`: the socket's
    /// `TCP_USER_TIMEOUT` (sent data unacknowledged by the peer's kernel for
    /// that long closes the connection) and HTTP/2 PING keepalive (a PING
    /// every [`PING_INTERVAL`]; no answer within [`PING_TIMEOUT`] closes the
    /// connection: a frozen center process whose kernel still acknowledges
    /// TCP).
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
        // The settings hyper's client used before (push off, 16 KiB header
        // lists), with larger windows for batches.
        let (send, mut conn) = h2::client::Builder::new()
            .enable_push(false)
            .max_header_list_size(16 << 10)
            .initial_window_size(1 << 20)
            .initial_connection_window_size(2 << 20)
            .max_send_buffer_size(1 << 20)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|source| ChannelError::H2 { addr: a(), source })?;
        let ping = conn.ping_pong();
        let addr_s = a();
        tokio::task::spawn_local(async move {
            if let Err(error) = drive(conn, ping).await {
                tracing::debug!(addr = %addr_s, %error, "h2 connection ended");
            }
        });
        Ok(Channel { send, counters })
    }
}

/// Runs the connection until it ends, with PING keepalive; dropping it on
/// a PING timeout fails every stream on it.
async fn drive<T>(
    conn: h2::client::Connection<T, Bytes>,
    ping: Option<h2::PingPong>,
) -> Result<(), String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::pin!(conn);
    let Some(mut ping) = ping else {
        return conn.await.map_err(|e| e.to_string());
    };
    loop {
        tokio::select! {
            r = &mut conn => return r.map_err(|e| e.to_string()),
            () = tokio::time::sleep(PING_INTERVAL) => {}
        }
        let pong = tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque()));
        tokio::select! {
            r = &mut conn => return r.map_err(|e| e.to_string()),
            r = pong => match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("keepalive PING not answered".into()),
            },
        }
    }
}
