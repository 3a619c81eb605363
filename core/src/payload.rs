//! `Payload` (`map<string,string> fields = 1`) builders and reader.
//!
//! Each map entry is a length-delimited field 1 holding `{1: key, 2: value}`.
//! Like gogo-protobuf (what Elkeid agents and plugins use), the writers emit
//! key and value even when empty. Numbers are formatted the way Elkeid does:
//! integers in decimal, floats fixed-point with 8 decimals (Go's
//! `strconv.FormatFloat(f, 'f', 8, 64)`, including `NaN`, `+Inf`, `-Inf`).
//! Formatting goes through `core::fmt` into the output buffer: no heap.
//!
//! [`entries`] walks the entries of a serialized `Payload` without
//! allocating.

use core::fmt::{self, Write as _};

use crate::pb::{self, DecodeError, WireType};

const FIELDS: u32 = 1;
const KEY: u32 = 1;
const VALUE: u32 = 2;

/// The caller's buffer was too small for the fields written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("payload does not fit in the output buffer")
    }
}

/// Encoded length of one map entry with a key of `k` bytes and a value of
/// `v` bytes (including the outer field key and length).
#[inline]
pub const fn entry_len(k: usize, v: usize) -> usize {
    pb::len_field_len(FIELDS, entry_body_len(k, v))
}

#[inline]
const fn entry_body_len(k: usize, v: usize) -> usize {
    pb::len_field_len(KEY, k) + pb::len_field_len(VALUE, v)
}

/// Counts the bytes a formatted value takes.
struct Counter(usize);

impl fmt::Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

/// Writes formatted output into a slice, failing when it is full.
struct SliceWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.pos + s.len();
        let dst = self.buf.get_mut(self.pos..end).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes());
        self.pos = end;
        Ok(())
    }
}

/// A float formatted like Go's `strconv.FormatFloat(v, 'f', 8, 64)`.
#[derive(Debug, Clone, Copy)]
pub struct GoFloat(pub f64);

impl fmt::Display for GoFloat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v.is_nan() {
            f.write_str("NaN")
        } else if v == f64::INFINITY {
            f.write_str("+Inf")
        } else if v == f64::NEG_INFINITY {
            f.write_str("-Inf")
        } else {
            write!(f, "{v:.8}")
        }
    }
}

/// Where a payload writer puts bytes.
trait Sink {
    /// Room for `n` more bytes, at `pos()..pos()+n`, or `None`.
    fn grow(&mut self, n: usize) -> Option<&mut [u8]>;
    fn fail(&mut self);
}

/// Writes one entry with a `vlen`-byte value that `fill` writes into the
/// slice it is given (returning false if it could not).
fn write_entry_with<S: Sink>(
    sink: &mut S,
    key: &str,
    vlen: usize,
    fill: impl FnOnce(&mut [u8]) -> bool,
) {
    let body = entry_body_len(key.len(), vlen);
    let total = pb::len_field_len(FIELDS, body);
    let Some(out) = sink.grow(total) else {
        sink.fail();
        return;
    };
    let mut w = pb::Writer::new(out);
    let head = w
        .len_header(FIELDS, body)
        .and_then(|()| w.len_field(KEY, key.as_bytes()))
        .and_then(|()| w.len_header(VALUE, vlen));
    let at = w.position();
    if head.is_err() || !fill(&mut out[at..]) {
        sink.fail();
    }
}

/// Writes one entry whose value is a plain string.
fn write_entry_str<S: Sink>(sink: &mut S, key: &str, value: &str) {
    write_entry_with(sink, key, value.len(), |out| {
        out.copy_from_slice(value.as_bytes());
        true
    });
}

/// Writes one entry whose value is produced by `value`.
fn write_entry<S: Sink>(sink: &mut S, key: &str, value: fmt::Arguments<'_>) {
    if let Some(s) = value.as_str() {
        return write_entry_str(sink, key, s);
    }
    let mut c = Counter(0);
    if c.write_fmt(value).is_err() {
        sink.fail();
        return;
    }
    write_entry_with(sink, key, c.0, |out| {
        let mut sw = SliceWriter { buf: out, pos: 0 };
        // A Display impl may print differently on the second pass; insist
        // on the counted length.
        sw.write_fmt(value).is_ok() && sw.pos == c.0
    });
}

/// Writes `Payload` map entries into a caller-provided buffer; no heap.
///
/// Methods chain; the first entry that does not fit makes
/// [`finish`](Self::finish) fail with [`Overflow`] (entries written before
/// it stay valid in the buffer).
#[derive(Debug)]
pub struct PayloadWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
    overflow: bool,
}

impl Sink for PayloadWriter<'_> {
    fn grow(&mut self, n: usize) -> Option<&mut [u8]> {
        if self.overflow {
            return None;
        }
        let start = self.pos;
        let out = self.buf.get_mut(start..start.checked_add(n)?)?;
        self.pos += n;
        Some(out)
    }
    fn fail(&mut self) {
        self.overflow = true;
    }
}

impl<'a> PayloadWriter<'a> {
    /// Starts an empty payload at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self {
            buf,
            pos: 0,
            overflow: false,
        }
    }

    /// Adds `key = value`.
    pub fn field(&mut self, key: &str, value: &str) -> &mut Self {
        let before = self.pos;
        write_entry_str(self, key, value);
        if self.overflow {
            self.pos = before.min(self.pos);
        }
        self
    }

    /// Adds `key = ` the formatted `value`.
    pub fn field_fmt(&mut self, key: &str, value: fmt::Arguments<'_>) -> &mut Self {
        let before = self.pos;
        write_entry(self, key, value);
        if self.overflow {
            self.pos = before.min(self.pos);
        }
        self
    }

    /// Adds a signed integer in decimal.
    pub fn field_i64(&mut self, key: &str, v: i64) -> &mut Self {
        self.field_fmt(key, format_args!("{v}"))
    }

    /// Adds an unsigned integer in decimal.
    pub fn field_u64(&mut self, key: &str, v: u64) -> &mut Self {
        self.field_fmt(key, format_args!("{v}"))
    }

    /// Adds a float with 8 decimals, as Elkeid formats them.
    pub fn field_f64(&mut self, key: &str, v: f64) -> &mut Self {
        self.field_fmt(key, format_args!("{}", GoFloat(v)))
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// True if nothing was written.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// The payload length, or [`Overflow`] if some entry did not fit.
    pub fn finish(self) -> Result<usize, Overflow> {
        if self.overflow {
            Err(Overflow)
        } else {
            Ok(self.pos)
        }
    }
}

#[cfg(feature = "alloc")]
pub use buf::PayloadBuf;

#[cfg(feature = "alloc")]
mod buf {
    use alloc::vec::Vec;
    use core::fmt;

    use super::{GoFloat, Sink, write_entry, write_entry_str};

    /// The [`PayloadWriter`](super::PayloadWriter) API writing into a
    /// growable `Vec<u8>`.
    #[derive(Debug, Default, Clone)]
    pub struct PayloadBuf {
        buf: Vec<u8>,
        /// Set if a `Display` impl failed; the entry was rolled back.
        failed: bool,
    }

    impl Sink for PayloadBuf {
        fn grow(&mut self, n: usize) -> Option<&mut [u8]> {
            let start = self.buf.len();
            self.buf.resize(start + n, 0);
            Some(&mut self.buf[start..])
        }
        fn fail(&mut self) {
            self.failed = true;
        }
    }

    impl PayloadBuf {
        /// An empty payload.
        pub fn new() -> Self {
            Self::default()
        }

        /// An empty payload with room for `n` bytes.
        pub fn with_capacity(n: usize) -> Self {
            Self {
                buf: Vec::with_capacity(n),
                failed: false,
            }
        }

        /// Adds `key = value`.
        pub fn field(&mut self, key: &str, value: &str) -> &mut Self {
            write_entry_str(self, key, value);
            self
        }

        /// Adds `key = ` the formatted `value`. An entry whose `Display`
        /// impl fails is left out.
        pub fn field_fmt(&mut self, key: &str, value: fmt::Arguments<'_>) -> &mut Self {
            let before = self.buf.len();
            let was_failed = self.failed;
            self.failed = false;
            write_entry(self, key, value);
            if self.failed {
                self.buf.truncate(before);
            }
            self.failed |= was_failed;
            self
        }

        /// Adds a signed integer in decimal.
        pub fn field_i64(&mut self, key: &str, v: i64) -> &mut Self {
            self.field_fmt(key, format_args!("{v}"))
        }

        /// Adds an unsigned integer in decimal.
        pub fn field_u64(&mut self, key: &str, v: u64) -> &mut Self {
            self.field_fmt(key, format_args!("{v}"))
        }

        /// Adds a float with 8 decimals, as Elkeid formats them.
        pub fn field_f64(&mut self, key: &str, v: f64) -> &mut Self {
            self.field_fmt(key, format_args!("{}", GoFloat(v)))
        }

        /// The serialized payload so far.
        pub fn as_bytes(&self) -> &[u8] {
            &self.buf
        }

        /// Bytes written so far.
        pub fn len(&self) -> usize {
            self.buf.len()
        }

        /// True if nothing was written.
        pub fn is_empty(&self) -> bool {
            self.buf.is_empty()
        }

        /// Empties the payload, keeping the allocation.
        pub fn clear(&mut self) {
            self.buf.clear();
            self.failed = false;
        }

        /// The serialized payload.
        pub fn into_vec(self) -> Vec<u8> {
            self.buf
        }
    }
}

/// A serialized `Payload` is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadError(pub &'static str);

impl fmt::Display for PayloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed Payload: {}", self.0)
    }
}

fn invalid(e: DecodeError) -> PayloadError {
    match e {
        DecodeError::Incomplete => PayloadError("truncated field"),
        DecodeError::Invalid(why) => PayloadError(why),
    }
}

/// Iterates the `(key, value)` entries of a serialized `Payload`.
///
/// Entries come in wire order; a key may repeat (protobuf map semantics:
/// the last one wins). Missing key/value default to empty, unknown fields
/// are skipped. Keys and values are raw bytes (Elkeid peers do not check
/// UTF-8). After an error the iterator ends.
pub fn entries(payload: &[u8]) -> Entries<'_> {
    Entries { rest: payload }
}

/// One map entry: `(key, value)` bytes.
pub type Entry<'a> = (&'a [u8], &'a [u8]);

/// Iterator returned by [`entries`].
#[derive(Debug, Clone)]
pub struct Entries<'a> {
    rest: &'a [u8],
}

impl<'a> Entries<'a> {
    fn step(&mut self) -> Result<Option<Entry<'a>>, PayloadError> {
        while !self.rest.is_empty() {
            let ((field, wt), n) = pb::decode_key(self.rest).map_err(invalid)?;
            self.rest = &self.rest[n..];
            if field == FIELDS {
                if wt != WireType::Len {
                    return Err(PayloadError("map entry with the wrong wire type"));
                }
                let (entry, n) = pb::decode_len_delimited(self.rest).map_err(invalid)?;
                self.rest = &self.rest[n..];
                return decode_entry(entry).map(Some);
            }
            let n = pb::skip_field(field, wt, self.rest).map_err(invalid)?;
            self.rest = &self.rest[n..];
        }
        Ok(None)
    }
}

fn decode_entry(entry: &[u8]) -> Result<Entry<'_>, PayloadError> {
    let (mut k, mut v): (&[u8], &[u8]) = (&[], &[]);
    let mut pos = 0;
    while pos < entry.len() {
        let ((field, wt), n) = pb::decode_key(&entry[pos..]).map_err(invalid)?;
        pos += n;
        match (field, wt) {
            (KEY | VALUE, WireType::Len) => {
                let (b, n) = pb::decode_len_delimited(&entry[pos..]).map_err(invalid)?;
                pos += n;
                if field == KEY {
                    k = b;
                } else {
                    v = b;
                }
            }
            (KEY | VALUE, _) => return Err(PayloadError("map key/value with the wrong wire type")),
            _ => pos += pb::skip_field(field, wt, &entry[pos..]).map_err(invalid)?,
        }
    }
    Ok((k, v))
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<Entry<'a>, PayloadError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(kv)) => Some(Ok(kv)),
            Ok(None) => None,
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}
