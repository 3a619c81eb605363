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
//! allocating; [`decode_utf8`] (with `alloc`) is the all-UTF-8 view the
//! center uses.

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

impl core::error::Error for Overflow {}

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

impl core::error::Error for PayloadError {}

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

/// Decodes a whole serialized `Payload` into `(key, value)` strings in wire
/// order (duplicates kept; a map built from it keeps the last one).
///
/// This is the center's policy: a record body is shown as fields only when
/// it is a valid `Payload` whose keys and values are all UTF-8; anything
/// else is an error (the NDJSON sink then writes the body as base64).
/// Allocation is bounded by the input: at most one pair per 2 input bytes.
#[cfg(feature = "alloc")]
pub fn decode_utf8(payload: &[u8]) -> Result<alloc::vec::Vec<(&str, &str)>, PayloadError> {
    let mut out = alloc::vec::Vec::new();
    for e in entries(payload) {
        let (k, v) = e?;
        let k = core::str::from_utf8(k).map_err(|_| PayloadError("key is not UTF-8"))?;
        let v = core::str::from_utf8(v).map_err(|_| PayloadError("value is not UTF-8"))?;
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;
    use std::string::{String, ToString};
    use std::vec::Vec;

    fn written(f: impl FnOnce(&mut PayloadWriter<'_>)) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let mut w = PayloadWriter::new(&mut buf);
        f(&mut w);
        let n = w.finish().unwrap();
        buf[..n].to_vec()
    }

    fn value_of(f: impl FnOnce(&mut PayloadWriter<'_>)) -> String {
        let bytes = written(f);
        let mut it = entries(&bytes);
        let (_, v) = it.next().unwrap().unwrap();
        assert!(it.next().is_none());
        String::from_utf8(v.to_vec()).unwrap()
    }

    #[test]
    fn entry_golden() {
        // {1: "cpu", 2: "0.5"} inside field 1; empty key and value kept.
        let got = written(|w| {
            w.field("cpu", "0.5").field_i64("n", -5).field("", "");
        });
        let golden: &[u8] = &[
            0x0a, 0x0a, 0x0a, 0x03, b'c', b'p', b'u', 0x12, 0x03, b'0', b'.', b'5', //
            0x0a, 0x07, 0x0a, 0x01, b'n', 0x12, 0x02, b'-', b'5', //
            0x0a, 0x04, 0x0a, 0x00, 0x12, 0x00,
        ];
        assert_eq!(got, golden);
        assert_eq!(entry_len(3, 3), 12);
        let mut pb = PayloadBuf::new();
        pb.field("cpu", "0.5").field_i64("n", -5).field("", "");
        assert_eq!(pb.as_bytes(), golden);
    }

    #[test]
    fn long_values_use_multi_byte_lengths() {
        let v = "x".repeat(200);
        let got = written(|w| {
            w.field("k", &v);
        });
        // entry body = 3 (key) + 1 + 2 + 200 (value, length c8 01) = 206 = ce 01
        assert_eq!(
            &got[..9],
            &[0x0a, 0xce, 0x01, 0x0a, 0x01, b'k', 0x12, 0xc8, 0x01]
        );
        assert_eq!(got.len(), 3 + 206);
    }

    #[test]
    fn numbers_format_like_elkeid() {
        assert_eq!(
            value_of(|w| {
                w.field_u64("k", u64::MAX);
            }),
            "18446744073709551615"
        );
        assert_eq!(
            value_of(|w| {
                w.field_i64("k", i64::MIN);
            }),
            "-9223372036854775808"
        );
        let cases: &[(f64, &str)] = &[
            (0.5, "0.50000000"),
            (0.0, "0.00000000"),
            (-0.0, "-0.00000000"),
            (1.0 / 3.0, "0.33333333"),
            (2.0 / 3.0, "0.66666667"),
            (-12.25, "-12.25000000"),
            (123_456_789.123_456_79, "123456789.12345679"),
            (1e21, "1000000000000000000000.00000000"),
            (1e-9, "0.00000000"),
            // Exact ties round half to even, like Go's decimal rounding.
            (0.001_953_125, "0.00195312"),
            (0.005_859_375, "0.00585938"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "+Inf"),
            (f64::NEG_INFINITY, "-Inf"),
        ];
        for &(v, s) in cases {
            assert_eq!(
                value_of(|w| {
                    w.field_f64("k", v);
                }),
                s,
                "{v:e}"
            );
        }
        // The longest float still goes through the stack-free path.
        let max = value_of(|w| {
            w.field_f64("k", f64::MAX);
        });
        assert_eq!(max.len(), 309 + 9);
        assert!(max.ends_with(".00000000"));
        assert_eq!(
            value_of(|w| {
                w.field_fmt("k", format_args!("{}-{}", 1, "a"));
            }),
            "1-a"
        );
    }

    #[test]
    fn overflow_is_reported_and_keeps_earlier_entries() {
        let mut buf = [0u8; 15];
        let mut w = PayloadWriter::new(&mut buf);
        w.field("cpu", "0.5");
        assert_eq!(w.len(), 12);
        w.field_f64("mem", 1.0).field("a", "b");
        assert_eq!(w.len(), 12);
        assert_eq!(w.finish(), Err(Overflow));
        assert_eq!(entries(&buf[..12]).count(), 1);

        let mut empty: [u8; 0] = [];
        let mut w = PayloadWriter::new(&mut empty);
        assert!(w.is_empty());
        assert_eq!(w.field("", "").len(), 0);
        assert_eq!(w.finish(), Err(Overflow));
    }

    #[test]
    fn entries_decode_like_protobuf() {
        let payload: &[u8] = &[
            0x0a, 0x06, 0x12, 0x01, b'b', 0x0a, 0x01, b'a', // value before key
            0x10, 0x01, // unknown top-level varint field 2
            0x0a, 0x03, 0x0a, 0x01, b'k', // no value
            0x0a, 0x00, // empty entry
            0x0a, 0x09, 0x0a, 0x01, b'x', 0x18, 0x07, 0x12, 0x01, b'y', 0x2d, // ...
        ];
        // Last entry is truncated inside: fix length for a valid version.
        let mut valid = payload.to_vec();
        valid.truncate(payload.len() - 1);
        valid[18] = 0x08;
        let got: Vec<_> = entries(&valid).map(|e| e.unwrap()).collect();
        assert_eq!(
            got,
            [
                (&b"a"[..], &b"b"[..]),
                (&b"k"[..], &b""[..]),
                (&b""[..], &b""[..]),
                (&b"x"[..], &b"y"[..]),
            ]
        );
        // Malformed input yields one error, then ends.
        let mut it = entries(payload);
        assert_eq!(it.by_ref().filter(|e| e.is_err()).count(), 1);
        assert!(it.next().is_none());
        for bad in [
            &[0x0a, 0x05, 0x0a][..],
            &[0x08, 0x01],
            &[0x0a, 0x02, 0x08, 0x01],
            &[0xff],
        ] {
            assert!(entries(bad).any(|e| e.is_err()), "{bad:02x?}");
        }
        assert_eq!(entries(&[]).count(), 0);
        assert!(PayloadError("x").to_string().contains("x"));
    }

    #[test]
    fn decode_utf8_policy() {
        // Payload{fields: {"a": "bc"}} = 0a 07 0a 01 61 12 02 62 63 (spec §1.2)
        let golden = [0x0a, 0x07, 0x0a, 0x01, b'a', 0x12, 0x02, b'b', b'c'];
        assert_eq!(decode_utf8(&golden).unwrap(), [("a", "bc")]);
        assert_eq!(decode_utf8(&[]).unwrap(), []);
        let mut dup = PayloadBuf::new();
        dup.field("k", "1").field("k", "2");
        assert_eq!(
            decode_utf8(dup.as_bytes()).unwrap(),
            [("k", "1"), ("k", "2")]
        );
        // Not UTF-8 (key, then value), truncated, overlong varint, field 0,
        // a group wire type, a key with the varint wire type.
        for bad in [
            &[0x0a, 0x03, 0x0a, 0x01, 0xff][..],
            &[0x0a, 0x03, 0x12, 0x01, 0xff],
            &[0x0a, 0x07, 0x0a],
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            &[0x02, 0x00],
            &[0x0b],
            &[0x0a, 0x02, 0x08, 0x01],
        ] {
            assert!(decode_utf8(bad).is_err(), "{bad:02x?}");
        }
    }
}
