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
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use elkeid_proto::snappy::{SnappyClientLayer, SnappyServerLayer};
//! // Center: tonic::transport::Server::builder().layer(SnappyServerLayer::new())
//! //             .add_service(TransferServer::new(svc)).serve(addr)
//! // Agent:  let channel = SnappyClientLayer::new().layer(channel);
//! //         let mut client = TransferClient::new(channel);
//! let framed = elkeid_proto::snappy::compress(b"hello");
//! let back = elkeid_proto::snappy::decompress(&framed, 1024)?;
//! assert_eq!(back, b"hello");
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `framing`: [`compress`] / [`decompress`] of one message, [`SnappyError`],
//!   the [`DEFAULT_MAX_DECOMPRESSED`] cap.
//! - `crc32c`: CRC-32C and its snappy masking.
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
pub use framing::{
    DEFAULT_MAX_DECOMPRESSED, MAX_CHUNK_UNCOMPRESSED, STREAM_IDENTIFIER, SnappyError, compress,
    compress_into, decompress, decompress_into, max_framed_len,
};
pub use headers::ENCODING_NAME;
pub use server::{SnappyServer, SnappyServerFuture, SnappyServerLayer};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
