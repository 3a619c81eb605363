//! Single-threaded, Elkeid-compatible host-security agent.
//!
//! # Layout
//! - [`config`]: command line, TOML file and environment -> [`config::Config`].
//! - `identity`: agent id (§3.2 of the wire spec, without the empty-id bug).
//! - `host`: hostname, IP lists, platform, kernel, DMI facts.
//! - `procstat`: per-process samples from procfs for both heartbeats.
//! - `buffer`: the core ring behind a `RefCell`, with back-pressure wake-ups.
//! - `transport/`: mTLS + h2 connection, address selection, send and
//!   receive loops, command dispatch.
//! - `heartbeat`: 1000 / 1001 records.
//! - `tasks`: agent tasks 1050 (upload), 1051 (idc/region), 1060 (shutdown).
//! - `log`: tracing to a size-capped file, stderr, and 1010 records.
//! - `http_client`: tiny HTTP/1.1 GET client (service discovery, downloads).
//! - `plugin/`, `update`: plugin management and self-update.
//!
//! Everything runs on one tokio `current_thread` runtime inside a `LocalSet`;
//! blocking work goes to the blocking pool capped at `workers` threads.
#![deny(unsafe_code)]

mod buffer;
mod plugin;
mod procstat;
mod update;
