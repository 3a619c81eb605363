//! Sans-IO rewriting of a gRPC length-prefixed message stream, frame by frame.
//!
//! A gRPC body is a sequence of messages, each a 5-byte prefix (compressed
//! flag, u32 big-endian length) and the payload. The [`Transcoder`] is fed
//! body chunks split at arbitrary points and emits rewritten bytes:
//! - [`Direction::Decompress`]: flag-1 payloads are decoded from framed snappy
//!   into flag-0 messages; flag-0 messages stream through untouched (without
//!   being buffered).
//! - [`Direction::Compress`]: non-empty flag-0 payloads are encoded into
//!   flag-1 framed snappy streams; empty messages stay flag 0 (as grpc-go
//!   sends them) and flag-1 messages stream through untouched.
//!
//! Only the message being rewritten is buffered, and in the decompress
//! direction its declared length is checked against the cap first.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::counters;
use super::framing::{self, SnappyError};

/// Size of the gRPC message prefix.
pub(crate) const PREFIX_LEN: usize = 5;

/// Which way messages are rewritten.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    /// Plain messages become snappy streams.
    Compress,
    /// Snappy streams become plain messages of at most `max` bytes.
    Decompress {
        /// Cap on one decompressed message.
        max: usize,
    },
}

/// Why a message stream could not be rewritten. Every variant ends the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TranscodeError {
    /// A compressed payload is not a valid framed snappy stream (or too big).
    Snappy(SnappyError),
    /// A compressed payload's declared length exceeds what any stream of at
    /// most `max` decompressed bytes can take.
    CompressedTooLong {
        /// Declared payload length.
        len: u32,
        /// Decompressed cap it was checked against.
        max: usize,
    },
    /// The compressed-flag byte is neither 0 nor 1.
    BadFlag(u8),
    /// The body ended inside a message.
    Truncated,
}

impl TranscodeError {
    /// The gRPC status a peer should see for this error.
    pub(crate) fn to_status(self) -> tonic::Status {
        match self {
            Self::Snappy(SnappyError::TooLarge { max }) | Self::CompressedTooLong { max, .. } => {
                tonic::Status::resource_exhausted(format!(
                    "snappy: message larger than the {max}-byte decompression limit"
                ))
            }
            Self::Snappy(e) => tonic::Status::internal(format!("snappy: {e}")),
            Self::BadFlag(f) => {
                tonic::Status::internal(format!("snappy: invalid gRPC compressed flag {f}"))
            }
            Self::Truncated => tonic::Status::internal("snappy: body ended inside a gRPC message"),
        }
    }
}

#[derive(Debug)]
enum State {
    /// Reading a prefix; `have` bytes of it are in `prefix`.
    Prefix { have: usize },
    /// Forwarding `remaining` payload bytes as they come.
    Pass { remaining: usize },
    /// Buffering a payload of `len` bytes to rewrite.
    Collect { len: usize, buf: BytesMut },
}

/// Streaming gRPC message rewriter (see the module docs).
#[derive(Debug)]
pub(crate) struct Transcoder {
    dir: Direction,
    prefix: [u8; PREFIX_LEN],
    state: State,
}

impl Transcoder {
    pub(crate) fn new(dir: Direction) -> Self {
        Self {
            dir,
            prefix: [0; PREFIX_LEN],
            state: State::Prefix { have: 0 },
        }
    }

    /// True between messages (nothing partial buffered or half forwarded).
    pub(crate) fn at_boundary(&self) -> bool {
        matches!(self.state, State::Prefix { have: 0 })
    }

    /// The body ended (or trailers arrived): it must end between messages.
    pub(crate) fn finish(&self) -> Result<(), TranscodeError> {
        if self.at_boundary() {
            Ok(())
        } else {
            Err(TranscodeError::Truncated)
        }
    }

    /// Feeds one body chunk; rewritten bytes are appended to `out`.
    pub(crate) fn push(
        &mut self,
        mut chunk: Bytes,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), TranscodeError> {
        while !chunk.is_empty() {
            match &mut self.state {
                State::Prefix { have } => {
                    let take = (PREFIX_LEN - *have).min(chunk.len());
                    self.prefix[*have..*have + take].copy_from_slice(&chunk[..take]);
                    *have += take;
                    let _ = chunk.split_to(take);
                    if *have == PREFIX_LEN {
                        self.on_prefix(&mut chunk, out)?;
                    }
                }
                State::Pass { remaining } => {
                    let take = (*remaining).min(chunk.len());
                    out.push_back(chunk.split_to(take));
                    *remaining -= take;
                    if *remaining == 0 {
                        self.state = State::Prefix { have: 0 };
                    }
                }
                State::Collect { len, buf } => {
                    let take = (*len - buf.len()).min(chunk.len());
                    buf.extend_from_slice(&chunk.split_to(take));
                    if buf.len() == *len {
                        let payload = std::mem::take(buf).freeze();
                        self.state = State::Prefix { have: 0 };
                        self.rewrite(&payload, out)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A whole prefix has been read: decide what to do with the payload.
    fn on_prefix(
        &mut self,
        chunk: &mut Bytes,
        out: &mut VecDeque<Bytes>,
    ) -> Result<(), TranscodeError> {
        let flag = self.prefix[0];
        let len32 = u32::from_be_bytes([
            self.prefix[1],
            self.prefix[2],
            self.prefix[3],
            self.prefix[4],
        ]);
        let len = len32 as usize;
        let rewrite = match (self.dir, flag) {
            (_, f) if f > 1 => return Err(TranscodeError::BadFlag(f)),
            // grpc-go (1.66+, both Elkeid sides) sends an empty message
            // uncompressed even with a compressor set: do the same.
            (Direction::Compress, 0) => len > 0,
            (Direction::Decompress { max }, 1) => {
                if len > framing::max_framed_len(max) {
                    return Err(TranscodeError::CompressedTooLong { len: len32, max });
                }
                true
            }
            _ => false,
        };
        if !rewrite {
            out.push_back(Bytes::copy_from_slice(&self.prefix));
            self.state = if len == 0 {
                State::Prefix { have: 0 }
            } else {
                State::Pass { remaining: len }
            };
            return Ok(());
        }
        if chunk.len() >= len {
            // Whole payload already here: no copy into a buffer.
            let payload = chunk.split_to(len);
            self.state = State::Prefix { have: 0 };
            return self.rewrite(&payload, out);
        }
        // Grow with the data actually received, not with the declared length.
        let buf = BytesMut::with_capacity(chunk.len());
        self.state = State::Collect { len, buf };
        Ok(())
    }

    /// Rewrites one complete payload and emits prefix + new payload.
    fn rewrite(&mut self, payload: &[u8], out: &mut VecDeque<Bytes>) -> Result<(), TranscodeError> {
        let mut msg = Vec::with_capacity(PREFIX_LEN);
        msg.extend_from_slice(&[0; PREFIX_LEN]);
        let flag = match self.dir {
            Direction::Compress => {
                framing::compress_into(payload, &mut msg);
                counters::record_compressed();
                1
            }
            Direction::Decompress { max } => {
                framing::decompress_into(payload, max, &mut msg).map_err(TranscodeError::Snappy)?;
                counters::record_decompressed();
                0
            }
        };
        let Ok(len) = u32::try_from(msg.len() - PREFIX_LEN) else {
            // Only reachable when compressing a message close to 4 GiB.
            return Err(TranscodeError::Snappy(SnappyError::TooLarge {
                max: u32::MAX as usize,
            }));
        };
        msg[0] = flag;
        msg[1..PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
        out.push_back(Bytes::from(msg));
        Ok(())
    }
}
