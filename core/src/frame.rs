//! The plugin pipe codec (spec §4.4–4.5), both directions.
//!
//! Plugin → agent: each frame is a `u32` little-endian length `L`, then `L`
//! bytes of a protobuf `Record { 1 data_type int32, 2 timestamp int64,
//! 3 data Payload }`. Unlike the Go agent's positional reader, the body is
//! decoded as real protobuf: fields in any order, omitted fields default to
//! zero, unknown fields of every wire type are skipped, an absent or empty
//! payload is fine, and a repeated field 3 merges (concatenates) as protobuf
//! says. The declared length is checked against a maximum before anything is
//! buffered for it.
//!
//! Because `bytes` and embedded messages share wire type 2, a `Record` body
//! in canonical form is byte-for-byte the `EncodedRecord` the agent ships:
//! [`RecordRef::canonical`] says whether the body can pass through as-is;
//! otherwise [`RecordRef::encode_to`] re-encodes it canonically.
//!
//! Agent → plugin: [`encode_task_frame`] writes `u32` LE length + `Task`
//! with proto3 zero omission; [`decode_task_frame`] is its inverse (for
//! plugins written in Rust and for tests).

use core::fmt;

use crate::pb::{self, DecodeError, EncodeError, WireType, Writer};

/// Default cap on a frame's declared body length (4 MiB).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 4 * 1024 * 1024;
/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// A plugin pipe can no longer be trusted. Every variant means the stream
/// is unusable from here on: the caller should drop the pipe and restart
/// the plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The frame declares a body longer than the configured maximum.
    TooLong {
        /// Declared body length.
        declared: u32,
        /// Configured maximum.
        max: u32,
    },
    /// The frame body is not a valid protobuf message of the expected type.
    Invalid(&'static str),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLong { declared, max } => write!(
                f,
                "frame declares {declared} bytes, above the {max}-byte maximum; the pipe is unusable"
            ),
            Self::Invalid(why) => write!(f, "malformed frame ({why}); the pipe is unusable"),
        }
    }
}

impl From<DecodeError> for FrameError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Incomplete => Self::Invalid("truncated field"),
            DecodeError::Invalid(why) => Self::Invalid(why),
        }
    }
}

const DATA_TYPE: u32 = 1;
const TIMESTAMP: u32 = 2;
const DATA: u32 = 3;
/// Task field numbers.
const OBJECT_NAME: u32 = 2;
const TOKEN: u32 = 4;

/// A decoded plugin record, borrowing the frame body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// `Record.data_type` (0 when omitted).
    pub data_type: i32,
    /// `Record.timestamp` (0 when omitted).
    pub timestamp: i64,
    /// Serialized `Payload` bytes (empty if absent). If the plugin repeated
    /// field 3 (legal protobuf: the parts merge), this is only the first
    /// part; [`RecordRef::payload_parts`] yields them all and
    /// [`RecordRef::encode_to`] writes them all.
    pub payload: &'a [u8],
    /// The whole frame body (the `Record` bytes).
    pub body: &'a [u8],
    /// True when `body` is already the canonical `EncodedRecord` encoding
    /// (fields 1, 2, 3 in order, each once, zero values omitted, minimal
    /// varints, no unknown fields) and may be passed through as-is.
    pub canonical: bool,
}

/// Canonical `EncodedRecord` length for these field values.
#[inline]
pub fn encoded_record_len(data_type: i32, timestamp: i64, payload_len: usize) -> usize {
    let mut n = 0;
    if data_type != 0 {
        n += pb::varint_field_len(DATA_TYPE, i64::from(data_type) as u64);
    }
    if timestamp != 0 {
        n += pb::varint_field_len(TIMESTAMP, timestamp as u64);
    }
    if payload_len != 0 {
        n += pb::len_field_len(DATA, payload_len);
    }
    n
}

/// Writes the header of a canonical `EncodedRecord` (fields 1, 2 and the
/// key + length of field 3) into `w`; the caller writes `payload_len`
/// payload bytes next.
#[inline]
pub(crate) fn write_record_header(
    w: &mut Writer<'_>,
    data_type: i32,
    timestamp: i64,
    payload_len: usize,
) -> Result<(), EncodeError> {
    if data_type != 0 {
        w.varint_field(DATA_TYPE, i64::from(data_type) as u64)?;
    }
    if timestamp != 0 {
        w.varint_field(TIMESTAMP, timestamp as u64)?;
    }
    if payload_len != 0 {
        w.len_header(DATA, payload_len)?;
    }
    Ok(())
}

/// Iterator over the parts of field 3 of a record body, in order.
#[derive(Debug, Clone)]
pub struct PayloadParts<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PayloadParts<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        // The body was validated by `decode_record`; stop quietly if a
        // hand-made RecordRef carries something else.
        while !self.rest.is_empty() {
            let ((field, wt), n) = pb::decode_key(self.rest).ok()?;
            self.rest = &self.rest[n..];
            if field == DATA && wt == WireType::Len {
                let (part, n) = pb::decode_len_delimited(self.rest).ok()?;
                self.rest = &self.rest[n..];
                return Some(part);
            }
            let n = pb::skip_field(field, wt, self.rest).ok()?;
            self.rest = &self.rest[n..];
        }
        None
    }
}

impl<'a> RecordRef<'a> {
    /// Every part of field 3 of the body, in order (their concatenation is
    /// the merged `Payload`). For a hand-made `RecordRef` whose body does not
    /// parse, yields `payload` alone.
    pub fn payload_parts(&self) -> PayloadParts<'a> {
        PayloadParts { rest: self.body }
    }

    /// Length of the merged payload.
    pub fn payload_len(&self) -> usize {
        if self.canonical {
            self.payload.len()
        } else {
            self.merged_payload_len()
        }
    }

    fn merged_payload_len(&self) -> usize {
        let total: usize = self.payload_parts().map(<[u8]>::len).sum();
        if total == 0 {
            self.payload.len()
        } else {
            total
        }
    }

    /// Length of the `EncodedRecord` encoding of this record (`body.len()`
    /// when canonical).
    #[inline]
    pub fn encoded_len(&self) -> usize {
        if self.canonical {
            self.body.len()
        } else {
            encoded_record_len(self.data_type, self.timestamp, self.merged_payload_len())
        }
    }

    /// Writes the `EncodedRecord` bytes (the body as-is when canonical,
    /// else a canonical re-encoding) and returns the bytes written.
    ///
    /// # Panics
    /// If `out` is shorter than [`encoded_len`](Self::encoded_len).
    #[inline]
    pub fn encode_to(&self, out: &mut [u8]) -> usize {
        match self.try_encode_to(out) {
            Ok(n) => n,
            #[allow(clippy::panic)] // documented caller contract
            Err(e) => panic!("RecordRef::encode_to: {e}"),
        }
    }

    /// Checked form of [`encode_to`](Self::encode_to).
    pub fn try_encode_to(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let mut w = Writer::new(out);
        if self.canonical {
            w.bytes(self.body)?;
            return Ok(w.position());
        }
        let merged = self.merged_payload_len();
        write_record_header(&mut w, self.data_type, self.timestamp, merged)?;
        if merged != 0 {
            let parts_total: usize = self.payload_parts().map(<[u8]>::len).sum();
            if parts_total == 0 {
                w.bytes(self.payload)?;
            } else {
                for part in self.payload_parts() {
                    w.bytes(part)?;
                }
            }
        }
        Ok(w.position())
    }
}

/// Decodes a `Record` body (no length prefix).
///
/// The payload is checked to be a well-formed protobuf message (every field
/// parses), not interpreted.
pub fn decode_record(body: &[u8]) -> Result<RecordRef<'_>, FrameError> {
    let mut data_type: i32 = 0;
    let mut timestamp: i64 = 0;
    let mut payload: &[u8] = &[];
    let mut payload_parts = 0u32;
    let mut canonical = true;
    // Highest field seen so far, to check the canonical order 1, 2, 3.
    let mut last_field = 0u32;
    let mut pos = 0;
    while pos < body.len() {
        let ((field, wt), n) = pb::decode_key(&body[pos..]).map_err(pb::complete)?;
        if n != 1 {
            canonical = false;
        }
        pos += n;
        match (field, wt) {
            (DATA_TYPE | TIMESTAMP, WireType::Varint) => {
                let (v, n) = pb::decode_varint(&body[pos..]).map_err(pb::complete)?;
                pos += n;
                if n != pb::varint_len(v) || v == 0 || field <= last_field {
                    canonical = false;
                }
                if field == DATA_TYPE {
                    // int32: keep the low 32 bits, as every protobuf
                    // runtime does; canonical only if sign-extended.
                    data_type = v as u32 as i32;
                    if v != i64::from(data_type) as u64 {
                        canonical = false;
                    }
                } else {
                    timestamp = v as i64;
                }
            }
            (DATA, WireType::Len) => {
                let (len, n) = pb::decode_varint(&body[pos..]).map_err(pb::complete)?;
                pos += n;
                if len > (body.len() - pos) as u64 {
                    return Err(FrameError::Invalid("payload runs past the frame"));
                }
                let part = &body[pos..pos + len as usize];
                pos += part.len();
                check_message(part)?;
                if n != pb::varint_len(len) || part.is_empty() || field <= last_field {
                    canonical = false;
                }
                if payload_parts == 0 {
                    payload = part;
                }
                payload_parts += 1;
            }
            (DATA_TYPE | TIMESTAMP | DATA, _) => {
                return Err(FrameError::Invalid("Record field with the wrong wire type"));
            }
            _ => {
                canonical = false;
                pos += pb::skip_field(field, wt, &body[pos..]).map_err(pb::complete)?;
            }
        }
        last_field = field;
    }
    Ok(RecordRef {
        data_type,
        timestamp,
        payload,
        body,
        canonical,
    })
}

/// Checks that `msg` is a sequence of well-formed protobuf fields.
fn check_message(msg: &[u8]) -> Result<(), FrameError> {
    let mut pos = 0;
    while pos < msg.len() {
        let ((field, wt), n) = pb::decode_key(&msg[pos..])
            .map_err(|_| FrameError::Invalid("payload is not a protobuf message"))?;
        pos += n;
        pos += pb::skip_field(field, wt, &msg[pos..])
            .map_err(|_| FrameError::Invalid("payload is not a protobuf message"))?;
    }
    Ok(())
}

/// Reads the length prefix at the start of `buf`: `Ok(None)` if fewer than
/// four bytes are there, `Err(TooLong)` above `max_len`.
#[inline]
pub fn frame_len(buf: &[u8], max_len: u32) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LEN_PREFIX>() else {
        return Ok(None);
    };
    let declared = u32::from_le_bytes(*prefix);
    if declared > max_len {
        return Err(FrameError::TooLong {
            declared,
            max: max_len,
        });
    }
    Ok(Some(declared as usize))
}

/// Decodes one frame from the start of `buf`: `Ok(None)` when incomplete,
/// `Ok(Some((record, consumed)))` otherwise.
pub fn decode_frame(
    buf: &[u8],
    max_len: u32,
) -> Result<Option<(RecordRef<'_>, usize)>, FrameError> {
    let Some(len) = frame_len(buf, max_len)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((decode_record(body)?, LEN_PREFIX + len)))
}

#[cfg(feature = "alloc")]
pub use decoder::FrameDecoder;

#[cfg(feature = "alloc")]
mod decoder {
    use alloc::vec::Vec;

    use super::{FrameError, LEN_PREFIX, RecordRef, decode_record, frame_len};

    /// Streaming frame decoder with an internal buffer.
    ///
    /// Feed it bytes with [`push`](Self::push) (or read straight into
    /// [`spare_mut`](Self::spare_mut) then [`advance`](Self::advance)) in any
    /// chunking, one byte at a time included, and take records with
    /// [`next_record`](Self::next_record). The buffer only ever holds bytes
    /// that were actually received: a hostile length prefix is rejected as
    /// soon as its four bytes are in, before any room is reserved for it,
    /// so the buffer never grows beyond `4 + max_len` plus one read chunk.
    ///
    /// After an error the decoder stays failed and returns the same error.
    #[derive(Debug)]
    pub struct FrameDecoder {
        buf: Vec<u8>,
        /// First unconsumed byte.
        start: usize,
        /// End of received bytes (`buf[end..]` is spare room).
        end: usize,
        max_len: u32,
        failed: Option<FrameError>,
    }

    impl FrameDecoder {
        /// A decoder rejecting frames whose declared body exceeds `max_len`.
        pub fn new(max_len: u32) -> Self {
            Self {
                buf: Vec::new(),
                start: 0,
                end: 0,
                max_len,
                failed: None,
            }
        }

        /// Bytes received but not yet returned as records.
        pub fn buffered(&self) -> usize {
            self.end - self.start
        }

        /// Bytes the internal buffer holds (received or spare).
        pub fn capacity(&self) -> usize {
            self.buf.len()
        }

        /// Appends received bytes.
        pub fn push(&mut self, chunk: &[u8]) {
            let spare = self.spare_mut(chunk.len());
            spare[..chunk.len()].copy_from_slice(chunk);
            self.advance(chunk.len());
        }

        /// At least `at_least` bytes of spare room to `read(2)` into; then
        /// call [`advance`](Self::advance) with the count read.
        pub fn spare_mut(&mut self, at_least: usize) -> &mut [u8] {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            if self.buf.len() - self.end < at_least {
                // Move the unconsumed bytes to the front first.
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
                if self.buf.len() - self.end < at_least {
                    self.buf.resize(self.end + at_least, 0);
                }
            }
            &mut self.buf[self.end..]
        }

        /// Marks `n` bytes of the spare room as received (clamped to the
        /// room that exists).
        pub fn advance(&mut self, n: usize) {
            self.end = (self.end + n).min(self.buf.len());
        }

        /// The next complete record, `Ok(None)` if more bytes are needed.
        pub fn next_record(&mut self) -> Result<Option<RecordRef<'_>>, FrameError> {
            if let Some(e) = self.failed {
                return Err(e);
            }
            let avail = &self.buf[self.start..self.end];
            let len = match frame_len(avail, self.max_len) {
                Ok(Some(len)) => len,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.failed = Some(e);
                    return Err(e);
                }
            };
            if avail.len() < LEN_PREFIX + len {
                return Ok(None);
            }
            let body_start = self.start + LEN_PREFIX;
            self.start = body_start + len;
            let body = &self.buf[body_start..body_start + len];
            match decode_record(body) {
                Ok(rec) => Ok(Some(rec)),
                Err(e) => {
                    self.failed = Some(e);
                    Err(e)
                }
            }
        }
    }
}

/// A `Task` (agent → plugin), borrowing its strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskRef<'a> {
    /// `Task.data_type`.
    pub data_type: i32,
    /// `Task.object_name` (the plugin name).
    pub object_name: &'a str,
    /// `Task.data`.
    pub data: &'a str,
    /// `Task.token`.
    pub token: &'a str,
}

fn task_body_len(task: &TaskRef<'_>) -> usize {
    let mut n = 0;
    if task.data_type != 0 {
        n += pb::varint_field_len(DATA_TYPE, i64::from(task.data_type) as u64);
    }
    for (field, s) in [
        (OBJECT_NAME, task.object_name),
        (DATA, task.data),
        (TOKEN, task.token),
    ] {
        if !s.is_empty() {
            n += pb::len_field_len(field, s.len());
        }
    }
    n
}

/// Length of the task frame (4-byte prefix + `Task` body).
pub fn task_frame_len(task: &TaskRef<'_>) -> usize {
    LEN_PREFIX + task_body_len(task)
}

/// Writes `u32` LE length + `Task` (fields in order, zero values omitted)
/// and returns the bytes written.
pub fn encode_task_frame(task: &TaskRef<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let body = task_body_len(task);
    let total = LEN_PREFIX + body;
    if out.len() < total {
        return Err(EncodeError::BufferTooSmall {
            needed: total,
            available: out.len(),
        });
    }
    let Ok(body32) = u32::try_from(body) else {
        return Err(EncodeError::BufferTooSmall {
            needed: total,
            available: u32::MAX as usize,
        });
    };
    let mut w = Writer::new(out);
    w.bytes(&body32.to_le_bytes())?;
    if task.data_type != 0 {
        w.varint_field(DATA_TYPE, i64::from(task.data_type) as u64)?;
    }
    for (field, s) in [
        (OBJECT_NAME, task.object_name),
        (DATA, task.data),
        (TOKEN, task.token),
    ] {
        if !s.is_empty() {
            w.len_field(field, s.as_bytes())?;
        }
    }
    Ok(w.position())
}

/// Decodes a `Task` body (no prefix): any field order, unknown fields
/// skipped, last occurrence wins, strings must be UTF-8.
pub fn decode_task(body: &[u8]) -> Result<TaskRef<'_>, FrameError> {
    let mut task = TaskRef::default();
    let mut pos = 0;
    while pos < body.len() {
        let ((field, wt), n) = pb::decode_key(&body[pos..]).map_err(pb::complete)?;
        pos += n;
        match (field, wt) {
            (DATA_TYPE, WireType::Varint) => {
                let (v, n) = pb::decode_varint(&body[pos..]).map_err(pb::complete)?;
                pos += n;
                task.data_type = v as u32 as i32;
            }
            (OBJECT_NAME | DATA | TOKEN, WireType::Len) => {
                let (b, n) = pb::decode_len_delimited(&body[pos..]).map_err(pb::complete)?;
                pos += n;
                let s = core::str::from_utf8(b)
                    .map_err(|_| FrameError::Invalid("Task string is not UTF-8"))?;
                match field {
                    OBJECT_NAME => task.object_name = s,
                    DATA => task.data = s,
                    _ => task.token = s,
                }
            }
            (DATA_TYPE | OBJECT_NAME | DATA | TOKEN, _) => {
                return Err(FrameError::Invalid("Task field with the wrong wire type"));
            }
            _ => pos += pb::skip_field(field, wt, &body[pos..]).map_err(pb::complete)?,
        }
    }
    Ok(task)
}

/// Decodes one task frame from the start of `buf`: `Ok(None)` when
/// incomplete, `Ok(Some((task, consumed)))` otherwise.
pub fn decode_task_frame(
    buf: &[u8],
    max_len: u32,
) -> Result<Option<(TaskRef<'_>, usize)>, FrameError> {
    let Some(len) = frame_len(buf, max_len)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((decode_task(body)?, LEN_PREFIX + len)))
}
