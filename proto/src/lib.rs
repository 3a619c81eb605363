//! Elkeid wire types (package `grpc`), tonic client/server stubs, and the
//! snappy-framing gRPC compression layer shared by the agent and the center.
//!
//! # Layout
//! - [`grpc`]: prost messages and tonic stubs generated from `proto/*.proto`
//!   (`/grpc.Transfer/Transfer`, `/grpc.FileExt/Upload`, `MQData`).
//! - [`snappy`]: the snappy framing format (one stream per gRPC message) and
//!   the client/server tower layers that speak `grpc-encoding: snappy`.
//! - [`codec`]: [`codec::RawEncodeCodec`], a tonic codec that sends
//!   pre-encoded protobuf bytes and decodes prost replies.

/// Generated from `proto/grpc.proto` and `proto/mq.proto`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic
)]
pub mod grpc {
    tonic::include_proto!("grpc");
}

pub mod codec;
pub mod snappy;
