//! gRPC compression with the snappy *framing* format, as every Elkeid agent
//! and center speaks it (`grpc-encoding: snappy`).
//!
//! tonic only knows gzip, deflate and zstd, so snappy is done by tower layers
//! that sit between tonic and the HTTP/2 connection and rewrite the message
//! stream frame by frame: tonic itself only ever sees identity messages.
//! Each gRPC message with compressed-flag 1 carries one complete framed
//! stream (identifier chunk, then chunks of at most 64 KiB); every message
//! starts a fresh stream and an empty message is zero bytes.
//!
//! ```no_run
//! # async fn demo(
//! #     svc: impl elkeid_proto::grpc::transfer_server::Transfer,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use elkeid_proto::grpc::{transfer_client::TransferClient, transfer_server::TransferServer};
//! use elkeid_proto::snappy::{SnappyClientLayer, SnappyServerLayer};
//! use tower_layer::Layer;
//!
//! // Center (tonic features `transport` + `router`): snappy, identity, and
//! // whatever tonic itself enables (gzip, zstd) are all accepted.
//! let serve = tonic::transport::Server::builder()
//!     .layer(SnappyServerLayer::new().with_max_decompressed(10 << 20))
//!     .add_service(TransferServer::new(svc))
//!     .serve("127.0.0.1:6751".parse()?);
//!
//! // Agent: any `Service<http::Request<tonic::body::Body>>` transport.
//! let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:6751").connect().await?;
//! let client = TransferClient::new(SnappyClientLayer::new().layer(channel));
//!
//! // One message on its own:
//! let framed = elkeid_proto::snappy::compress(b"hello");
//! assert_eq!(&framed[..10], &elkeid_proto::snappy::STREAM_IDENTIFIER);
//! assert_eq!(elkeid_proto::snappy::decompress(&framed, 1024)?, b"hello");
//! # drop((serve, client));
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! - `framing`: [`compress`] / [`decompress`] of one message, [`SnappyError`],
//!   the [`DEFAULT_MAX_DECOMPRESSED`] cap.
//! - `crc32c`: CRC-32C and its snappy masking ([`masked_crc32c`], public for
//!   tools and the benchmark).
//! - `transcode`: sans-IO rewriting of a gRPC message stream split at
//!   arbitrary chunk boundaries (5-byte prefixes, flag 0/1).
//! - `body`: the `http_body::Body` running a transcoder, and the abort slot
//!   that ends a server response when its request body was rejected.
//! - `headers`: `grpc-encoding` / `grpc-accept-encoding` handling.
//! - `client`: [`SnappyClientLayer`] / [`SnappyClient`].
//! - `server`: [`SnappyServerLayer`] / [`SnappyServer`].
//! - `counters`: process-wide [`counters()`] of compressed, decompressed and
//!   rejected messages.

mod body;
mod client;
mod counters;
mod crc32c;
mod framing;
mod headers;
mod server;
mod transcode;

#[cfg(test)]
mod tests;

pub use client::{SnappyClient, SnappyClientFuture, SnappyClientLayer};
pub use counters::{SnappyCounters, counters};
pub use crc32c::masked_crc32c;
pub use framing::{
    DEFAULT_MAX_DECOMPRESSED, MAX_CHUNK_UNCOMPRESSED, STREAM_IDENTIFIER, SnappyError, compress,
    compress_into, compress_with, decompress, decompress_into, max_framed_len,
};
pub use headers::ENCODING_NAME;
pub use server::{SnappyServer, SnappyServerFuture, SnappyServerLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
