//! Sans-IO, `no_std` core of the Elkeid-compatible agent.
//!
//! Everything here works on byte slices and caller-provided buffers: no
//! clock, no files, no sockets, no async runtime. The agent drives it.
//!
//! # Layout
//! - [`pb`]: protobuf wire primitives (varints, keys, length-delimited
//!   fields, skipping unknown fields) with `Incomplete`/`Invalid` errors.
//! - [`frame`]: the plugin pipe codec: length-prefixed `Record` frames in
//!   (a real protobuf decode, pass-through when canonical, hostile lengths
//!   rejected before buffering) and `Task` frames out.
//! - [`ring`]: the agent's bounded record buffer (fixed slot table + one
//!   arena, reserved share for agent records, batches with commit/rollback).
//! - [`payload`]: `Payload` map entry writers (Elkeid number formatting via
//!   `core::fmt`, no heap) and an allocation-free entry reader.
//! - [`packet`]: `PackagedData` encoding around a drained batch.
//! - [`copy`]: the short record copies of the ring push and the packet
//!   encode, inline on x86_64 (musl's `memcpy` is slow for them).
//! - [`ack`]: the acknowledged-delivery extension: packet identity fields
//!   and the unacknowledged window (re-send order, non-acking center and
//!   stall detection).
//! - [`spool`]: the disk spool's segment/entry codec (CRC-32C per entry,
//!   torn vs corrupt).
//! - [`schema`]: record data types and the payload keys of the records the
//!   agent builds (heartbeats, 1010 logs, 5100 results), shared with the
//!   center and the tests.
//!
//! # Features
//! - `alloc`: heap-backed helpers ([`frame::FrameDecoder`],
//!   [`payload::PayloadBuf`], [`ring::Ring::new`],
//!   [`packet::encode_packet_vec`]).
//! - `std` (default): implies `alloc`.
#![no_std]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod ack;
pub mod copy;
pub mod frame;
pub mod packet;
pub mod payload;
pub mod pb;
pub mod ring;
pub mod schema;
pub mod spool;
