//! The gRPC side: `/grpc.Transfer/Transfer` and `/grpc.FileExt/Upload`.
//!
//! # Layout
//! - this file: the tonic server (limits, keepalive, compression, TLS).
//! - `transfer.rs`: the agent stream handler (slot, first packet, pool,
//!   receive loop, command stream).
//! - `upload.rs`: `FileExt.Upload` into `DIR/uploads/`.
//! - `incoming.rs`: the accept loop with a TCP connection cap, and the TLS
//!   handshakes under their deadline (counted when they time out or fail).
//!
//! Keepalive: the server pings after 30 s of silence and drops the
//! connection when the ping is not answered within 10 s, so a dead agent
//! (host gone, cable pulled) leaves the pool and `/conn/list` within about
//! 40 s (Elkeid's center waits 10 min + 5 s; Go agents answer pings, as
//! every HTTP/2 peer must). Elkeid's
//! `MaxConnectionIdle` (20 min) and ping enforcement (`MinTime` 5 s, GOAWAY
//! `too_many_pings`) have no tonic equivalent: a client that pings too often is
//! tolerated (Go agents send no pings at all).
//!
//! Compression: snappy (framing format) through `SnappyServerLayer`, which
//! answers snappy to a snappy client; tonic itself accepts gzip and zstd and
//! answers in one of them only when the client advertises it in
//! `grpc-accept-encoding` (a Go agent advertises only snappy, so it gets
//! snappy or identity).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use elkeid_proto::grpc::file_ext_server::FileExtServer;
use elkeid_proto::grpc::transfer_server::TransferServer;
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::Server;

use crate::config::GrpcConfig;
use crate::pool::Pool;
use crate::records::Ctx;

pub(crate) mod incoming;
pub(crate) mod transfer;
pub(crate) mod upload;

/// The gRPC server failed.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    /// tonic refused the TLS configuration or the server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// HTTP/2 streams one connection may have open (SETTINGS_MAX_CONCURRENT_STREAMS):
/// an agent uses one Transfer stream and at most one upload at a time.
pub(crate) const MAX_STREAMS_PER_CONNECTION: u32 = 16;
/// Server ping period.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Ping answer deadline.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves until `shutdown` resolves.
pub(crate) async fn serve(
    listener: TcpListener,
    cfg: &GrpcConfig,
    tls: Option<(crate::tls::GrpcTls, Duration)>,
    pool: Arc<Pool>,
    ctx: Ctx,
    uploads: upload::UploadConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GrpcError> {
    let max = cfg.max_message_bytes;
    let transfer = TransferServer::new(transfer::TransferSvc::new(
        pool,
        ctx.clone(),
        cfg.first_packet_timeout,
        cfg.agent_identity,
        transfer::unidentified_limit(cfg.conn_limit),
    ))
    .max_decoding_message_size(max)
    .max_encoding_message_size(max)
    .accept_compressed(CompressionEncoding::Gzip)
    .accept_compressed(CompressionEncoding::Zstd)
    .send_compressed(CompressionEncoding::Gzip)
    .send_compressed(CompressionEncoding::Zstd);
    let metrics = ctx.metrics.clone();
    let files = FileExtServer::new(upload::UploadSvc::new(uploads, ctx))
        .max_decoding_message_size(max)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd);
    let router = Server::builder()
        // One connection cannot open thousands of streams (an agent uses 1-2).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(elkeid_proto::snappy::SnappyServerLayer::new().with_max_decompressed(max))
        .add_service(transfer)
        .add_service(files);
    let limit = incoming::tcp_limit(cfg.conn_limit);
    // TLS is done by our accept loop (deadline + counters), not by tonic;
    // tonic still sees the client certificate (`Request::peer_certs`).
    match tls {
        Some((tls, timeout)) => {
            let incoming =
                incoming::tls_incoming(listener, limit, metrics, tls.config, tls.verifier, timeout);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
        None => {
            let incoming = incoming::incoming(listener, limit, metrics);
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await?;
        }
    }
    Ok(())
}

/// `ip:port` of a request's peer, or empty.
pub(crate) fn peer(addr: Option<SocketAddr>) -> String {
    addr.map(|a| a.to_string()).unwrap_or_default()
}
