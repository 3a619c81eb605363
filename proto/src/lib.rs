//! Elkeid wire types (package `grpc`), tonic client/server stubs, and the
//! snappy-framing gRPC compression layer shared by the agent and the center.
//!
//! # Layout
//! - [`grpc`]: prost messages and tonic stubs generated from `proto/*.proto`
//!   (`/grpc.Transfer/Transfer`, `/grpc.FileExt/Upload`, `MQData`).

/// Generated from `proto/grpc.proto` and `proto/mq.proto`.
#[allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]
pub mod grpc {
    tonic::include_proto!("grpc");
}
