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

pub use crate::pb::EncodeError;
use crate::pb::{self, DecodeError, WireType, Writer};

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

impl core::error::Error for FrameError {}

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
#[inline]
fn check_message(msg: &[u8]) -> Result<(), FrameError> {
    const NOT_PB: FrameError = FrameError::Invalid("payload is not a protobuf message");
    let mut pos = 0;
    while pos < msg.len() {
        let ((field, wt), n) = pb::decode_key(&msg[pos..]).map_err(|_| NOT_PB)?;
        pos += n;
        if wt == WireType::Len {
            // The common case (map entries), without the generic skip.
            let (len, n) = pb::decode_varint(&msg[pos..]).map_err(|_| NOT_PB)?;
            pos += n;
            if len > (msg.len() - pos) as u64 {
                return Err(NOT_PB);
            }
            pos += len as usize;
        } else {
            pos += pb::skip_field(field, wt, &msg[pos..]).map_err(|_| NOT_PB)?;
        }
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
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX.saturating_add(len)) else {
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

        /// Returns memory to the allocator after a large frame, keeping only
        /// the bytes still buffered (and at least `min_capacity` bytes).
        pub fn shrink_to(&mut self, min_capacity: usize) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let keep = self.end.max(min_capacity);
            if self.buf.len() > keep {
                self.buf.truncate(keep);
                self.buf.shrink_to_fit();
            }
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
            if avail.len() < LEN_PREFIX.saturating_add(len) {
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
    let Some(body) = buf.get(LEN_PREFIX..LEN_PREFIX.saturating_add(len)) else {
        return Ok(None);
    };
    Ok(Some((decode_task(body)?, LEN_PREFIX + len)))
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;

    // Golden bodies, derived by hand from the spec (§1.3, §4.4):
    // data_type 1000 = varint e8 07; timestamp 300 = varint ac 02;
    // Payload {"a": "b"} = 0a 06 | 0a 01 'a' | 12 01 'b'.
    const PAYLOAD_AB: &[u8] = &[0x0a, 0x06, 0x0a, 0x01, 0x61, 0x12, 0x01, 0x62];
    const CANONICAL: &[u8] = &[
        0x08, 0xe8, 0x07, // 1: data_type 1000
        0x10, 0xac, 0x02, // 2: timestamp 300
        0x1a, 0x08, 0x0a, 0x06, 0x0a, 0x01, 0x61, 0x12, 0x01, 0x62, // 3: payload
    ];

    fn frame(body: &[u8]) -> std::vec::Vec<u8> {
        let mut v = std::vec::Vec::from((body.len() as u32).to_le_bytes());
        v.extend_from_slice(body);
        v
    }

    fn reencode(rec: &RecordRef<'_>) -> std::vec::Vec<u8> {
        let mut out = std::vec![0u8; rec.encoded_len()];
        assert_eq!(rec.encode_to(&mut out), out.len());
        out
    }

    #[test]
    fn canonical_record_passes_through() {
        let f = frame(CANONICAL);
        assert_eq!(&f[..4], &[0x10, 0x00, 0x00, 0x00]);
        let (rec, used) = decode_frame(&f, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
        assert_eq!(used, 20);
        assert_eq!((rec.data_type, rec.timestamp), (1000, 300));
        assert_eq!(rec.payload, PAYLOAD_AB);
        assert!(rec.canonical);
        assert_eq!(rec.encoded_len(), CANONICAL.len());
        assert_eq!(reencode(&rec), CANONICAL);
    }

    #[test]
    fn zero_data_type_and_timestamp_are_omitted() {
        // Proto3 omits zeros: only field 3 is left.
        let body = &CANONICAL[6..];
        let rec = decode_record(body).unwrap();
        assert_eq!((rec.data_type, rec.timestamp), (0, 0));
        assert_eq!(rec.payload, PAYLOAD_AB);
        assert!(rec.canonical);
        // Only timestamp omitted.
        let body = [&CANONICAL[..3], &CANONICAL[6..]].concat();
        let rec = decode_record(&body).unwrap();
        assert_eq!((rec.data_type, rec.timestamp), (1000, 0));
        assert!(rec.canonical);
    }

    #[test]
    fn explicit_zero_fields_are_reencoded() {
        let body = [&[0x08, 0x00, 0x10, 0x00][..], &CANONICAL[6..]].concat();
        let rec = decode_record(&body).unwrap();
        assert_eq!((rec.data_type, rec.timestamp), (0, 0));
        assert!(!rec.canonical);
        assert_eq!(reencode(&rec), &CANONICAL[6..]);
    }

    #[test]
    fn missing_payload_does_not_desync() {
        // Go's positional reader would eat the next frame's first byte.
        let body = &CANONICAL[..6];
        let mut stream = frame(body);
        stream.extend_from_slice(&frame(CANONICAL));
        let (rec, used) = decode_frame(&stream, DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(used, 10);
        assert_eq!(
            (rec.data_type, rec.timestamp, rec.payload),
            (1000, 300, &[][..])
        );
        assert!(rec.canonical);
        let (next, _) = decode_frame(&stream[used..], DEFAULT_MAX_FRAME_LEN)
            .unwrap()
            .unwrap();
        assert_eq!(next.body, CANONICAL);
    }

    #[test]
    fn empty_record_and_empty_payload() {
        let rec = decode_record(&[]).unwrap();
        assert_eq!((rec.data_type, rec.timestamp, rec.payload.len()), (0, 0, 0));
        assert!(rec.canonical);
        assert_eq!(rec.encoded_len(), 0);
        let f = [0u8, 0, 0, 0];
        let (rec, used) = decode_frame(&f, 16).unwrap().unwrap();
        assert_eq!((used, rec.body.len()), (4, 0));

        // data present but empty: `1a 00`, dropped on re-encoding.
        let body = [&CANONICAL[..6], &[0x1a, 0x00][..]].concat();
        let rec = decode_record(&body).unwrap();
        assert!(rec.payload.is_empty());
        assert!(!rec.canonical);
        assert_eq!(reencode(&rec), &CANONICAL[..6]);
    }

    #[test]
    fn fields_out_of_order() {
        let body = [&CANONICAL[6..], &CANONICAL[3..6], &CANONICAL[..3]].concat();
        let rec = decode_record(&body).unwrap();
        assert_eq!(
            (rec.data_type, rec.timestamp, rec.payload),
            (1000, 300, PAYLOAD_AB)
        );
        assert!(!rec.canonical);
        assert_eq!(reencode(&rec), CANONICAL);
    }

    #[test]
    fn unknown_fields_of_every_wire_type_are_skipped() {
        let unknown: &[u8] = &[
            0x20, 0x05, // 4: varint 5
            0x2d, 0x01, 0x02, 0x03, 0x04, // 5: fixed32
            0x31, 1, 2, 3, 4, 5, 6, 7, 8, // 6: fixed64
            0x3a, 0x02, 0xab, 0xcd, // 7: bytes
            0x43, 0x08, 0x01, 0x44, // 8: group { 1: 1 }
            0x80, 0x01, 0x07, // 16 (two-byte key): varint 7
        ];
        let body = [&CANONICAL[..3], unknown, &CANONICAL[3..]].concat();
        let rec = decode_record(&body).unwrap();
        assert_eq!(
            (rec.data_type, rec.timestamp, rec.payload),
            (1000, 300, PAYLOAD_AB)
        );
        assert!(!rec.canonical);
        assert_eq!(reencode(&rec), CANONICAL);
    }

    #[test]
    fn negative_data_type() {
        // int32 -1 on the wire: sign-extended, ten bytes.
        let body = [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        let rec = decode_record(&body).unwrap();
        assert_eq!(rec.data_type, -1);
        assert!(rec.canonical);
        // A writer that truncated to 32 bits (5 bytes) still decodes as -1,
        // and is re-encoded the standard way.
        let rec = decode_record(&[0x08, 0xff, 0xff, 0xff, 0xff, 0x0f]).unwrap();
        assert_eq!(rec.data_type, -1);
        assert!(!rec.canonical);
        assert_eq!(reencode(&rec), body);
        // A non-minimal varint is not canonical either.
        let rec = decode_record(&[0x08, 0x81, 0x00]).unwrap();
        assert_eq!(rec.data_type, 1);
        assert!(!rec.canonical);
        assert_eq!(reencode(&rec), [0x08, 0x01]);
    }

    #[test]
    fn repeated_fields_merge_like_protobuf() {
        // Scalars: last one wins.
        let rec = decode_record(&[0x08, 0x01, 0x08, 0x02]).unwrap();
        assert_eq!(rec.data_type, 2);
        assert!(!rec.canonical);
        assert_eq!(reencode(&rec), [0x08, 0x02]);
        // Field 3 twice: the payloads concatenate ({"a":"b"} + {"c":"d"}).
        let body = [
            0x08, 0x01, //
            0x1a, 0x08, 0x0a, 0x06, 0x0a, 0x01, 0x61, 0x12, 0x01, 0x62, //
            0x1a, 0x08, 0x0a, 0x06, 0x0a, 0x01, 0x63, 0x12, 0x01, 0x64,
        ];
        let rec = decode_record(&body).unwrap();
        assert!(!rec.canonical);
        assert_eq!(rec.payload_len(), 16);
        assert_eq!(rec.payload_parts().count(), 2);
        let expected = [
            0x08, 0x01, 0x1a, 0x10, //
            0x0a, 0x06, 0x0a, 0x01, 0x61, 0x12, 0x01, 0x62, //
            0x0a, 0x06, 0x0a, 0x01, 0x63, 0x12, 0x01, 0x64,
        ];
        assert_eq!(reencode(&rec), expected);
    }

    #[test]
    fn malformed_bodies_are_invalid() {
        let bad: &[&[u8]] = &[
            &[0x08],                   // varint missing
            &[0x1a, 0x05, 0x0a],       // payload runs past the frame
            &[0x0d, 0, 0, 0, 0],       // data_type as fixed32
            &[0x1a, 0x02, 0xff, 0xff], // payload is not protobuf
            &[0x00, 0x01],             // field 0
            &[0x0f],                   // wire type 7
            &[0x44],                   // stray end-group
            &[0x2d, 0x01],             // truncated fixed32
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
        ];
        for b in bad {
            assert!(
                matches!(decode_record(b), Err(FrameError::Invalid(_))),
                "{b:02x?}"
            );
        }
    }

    #[test]
    fn hostile_length_is_rejected_before_buffering() {
        let f = [0xff, 0xff, 0xff, 0xff, 0x08];
        let err = decode_frame(&f, DEFAULT_MAX_FRAME_LEN).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLong {
                declared: u32::MAX,
                max: DEFAULT_MAX_FRAME_LEN
            }
        );
        assert!(std::format!("{err}").contains("unusable"));
        // Exactly at the limit is fine (incomplete), one above is not.
        assert_eq!(decode_frame(&[0x10, 0, 0, 0], 16), Ok(None));
        assert!(decode_frame(&[0x11, 0, 0, 0], 16).is_err());

        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME_LEN);
        d.push(&f);
        assert!(matches!(d.next_record(), Err(FrameError::TooLong { .. })));
        // Nothing was reserved for the 4 GiB body, and the error sticks.
        assert!(d.capacity() < 64, "capacity {}", d.capacity());
        d.push(&frame(CANONICAL));
        assert!(d.next_record().is_err());
    }

    /// Frames that break the Go agent, back to back.
    type Decoded = std::vec::Vec<(i32, i64, std::vec::Vec<u8>)>;

    fn nasty_stream() -> (std::vec::Vec<u8>, Decoded) {
        let bodies: std::vec::Vec<std::vec::Vec<u8>> = std::vec![
            CANONICAL.into(),
            CANONICAL[6..].into(),
            CANONICAL[..6].into(),
            std::vec![],
            [&CANONICAL[..6], &[0x1a, 0x00][..]].concat(),
            [&CANONICAL[6..], &CANONICAL[3..6], &CANONICAL[..3]].concat(),
            [&CANONICAL[..3], &[0x2d, 1, 2, 3, 4][..], &CANONICAL[3..]].concat(),
            std::vec![
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ],
        ];
        let expected = std::vec![
            (1000, 300, CANONICAL.to_vec()),
            (0, 0, CANONICAL[6..].to_vec()),
            (1000, 300, CANONICAL[..6].to_vec()),
            (0, 0, std::vec![]),
            (1000, 300, CANONICAL[..6].to_vec()),
            (1000, 300, CANONICAL.to_vec()),
            (1000, 300, CANONICAL.to_vec()),
            (-1, 0, bodies[7].clone()),
        ];
        let stream = bodies.iter().flat_map(|b| frame(b)).collect();
        (stream, expected)
    }

    fn drain(d: &mut FrameDecoder, out: &mut Decoded) {
        while let Some(rec) = d.next_record().unwrap() {
            out.push((rec.data_type, rec.timestamp, reencode(&rec)));
        }
    }

    #[test]
    fn split_at_every_boundary() {
        let (stream, expected) = nasty_stream();
        for i in 0..=stream.len() {
            for j in i..=stream.len() {
                let mut d = FrameDecoder::new(64);
                let mut got = std::vec::Vec::new();
                for chunk in [&stream[..i], &stream[i..j], &stream[j..]] {
                    d.push(chunk);
                    drain(&mut d, &mut got);
                }
                assert_eq!(got, expected, "split at {i}, {j}");
                assert_eq!(d.buffered(), 0);
            }
        }
    }

    #[test]
    fn one_byte_at_a_time_through_spare_room() {
        let (stream, expected) = nasty_stream();
        let mut d = FrameDecoder::new(64);
        let mut got = std::vec::Vec::new();
        for &b in &stream {
            let spare = d.spare_mut(1);
            spare[0] = b;
            d.advance(1);
            drain(&mut d, &mut got);
            assert!(d.capacity() <= 4 + 64 + 1, "capacity {}", d.capacity());
        }
        assert_eq!(got, expected);
        d.shrink_to(0);
        assert_eq!(d.capacity(), 0);
    }

    #[test]
    fn task_frame_golden() {
        // Task {1: 1050 (9a 08), 2: "collector", 3: "" (omitted), 4: "t1"}.
        let task = TaskRef {
            data_type: 1050,
            object_name: "collector",
            data: "",
            token: "t1",
        };
        let golden = [
            0x12, 0x00, 0x00, 0x00, // 18 bytes
            0x08, 0x9a, 0x08, //
            0x12, 0x09, b'c', b'o', b'l', b'l', b'e', b'c', b't', b'o', b'r', //
            0x22, 0x02, b't', b'1',
        ];
        assert_eq!(task_frame_len(&task), golden.len());
        let mut out = [0u8; 64];
        let n = encode_task_frame(&task, &mut out).unwrap();
        assert_eq!(&out[..n], golden);
        assert_eq!(
            decode_task_frame(&golden, 1024),
            Ok(Some((task, golden.len())))
        );
        assert_eq!(decode_task_frame(&golden[..10], 1024), Ok(None));
        assert!(encode_task_frame(&task, &mut out[..21]).is_err());

        // All-zero task: an empty body.
        let zero = TaskRef::default();
        assert_eq!(encode_task_frame(&zero, &mut out), Ok(4));
        assert_eq!(&out[..4], [0, 0, 0, 0]);

        // Any order, unknown fields, invalid UTF-8 rejected, hostile length.
        let body = [
            0x22, 0x01, b'x', 0x2d, 1, 2, 3, 4, 0x1a, 0x01, b'd', 0x08, 0x05,
        ];
        let t = decode_task(&body).unwrap();
        assert_eq!(
            (t.data_type, t.data, t.token, t.object_name),
            (5, "d", "x", "")
        );
        assert!(decode_task(&[0x1a, 0x01, 0xff]).is_err());
        assert!(matches!(
            decode_task_frame(&[0xff, 0xff, 0xff, 0xff], 1 << 20),
            Err(FrameError::TooLong { .. })
        ));
    }
}
