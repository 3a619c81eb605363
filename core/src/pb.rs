//! Protobuf wire primitives over byte slices.
//!
//! Only what the Elkeid messages need: base-128 varints, field keys, and
//! length-delimited fields, plus [`skip_field`] so decoders can step over
//! unknown fields of every wire type (including fixed32/fixed64 and groups).
//!
//! Decoders return [`DecodeError::Incomplete`] when the slice ends too early
//! (a streaming caller may read more) and [`DecodeError::Invalid`] when the
//! bytes can never become valid. Encoders write into caller buffers through
//! [`Writer`], which reports [`EncodeError`] instead of panicking when the
//! buffer is too small.

use core::fmt;

/// Longest varint: 10 bytes carry 64 bits.
pub const MAX_VARINT_LEN: usize = 10;
/// Largest field number protobuf allows (2^29 - 1).
pub const MAX_FIELD_NUMBER: u32 = (1 << 29) - 1;
/// Deepest group nesting [`skip_field`] follows before rejecting the input.
pub const MAX_GROUP_DEPTH: u32 = 32;

/// Why a decode stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended early; more bytes may complete it.
    Incomplete,
    /// The input is malformed and will stay so whatever follows.
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incomplete => f.write_str("protobuf input ends early"),
            Self::Invalid(why) => write!(f, "invalid protobuf input: {why}"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// An encoder ran out of room in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// The output needs `needed` bytes but the buffer holds only `available`.
    BufferTooSmall {
        /// Bytes the complete output needs (at least; a streaming encoder
        /// may only know the bytes up to the piece that did not fit).
        needed: usize,
        /// Bytes the caller provided.
        available: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed, available } => write!(
                f,
                "output buffer too small: need {needed} bytes, have {available}"
            ),
        }
    }
}

impl core::error::Error for EncodeError {}

/// Protobuf wire types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireType {
    /// 0: int32, int64, uint*, bool, enum.
    Varint,
    /// 1: fixed64, sfixed64, double.
    I64,
    /// 2: string, bytes, embedded messages, packed repeated.
    Len,
    /// 3: deprecated group start.
    StartGroup,
    /// 4: deprecated group end.
    EndGroup,
    /// 5: fixed32, sfixed32, float.
    I32,
}

impl WireType {
    /// The 3-bit value used in a key.
    pub const fn bits(self) -> u8 {
        match self {
            Self::Varint => 0,
            Self::I64 => 1,
            Self::Len => 2,
            Self::StartGroup => 3,
            Self::EndGroup => 4,
            Self::I32 => 5,
        }
    }

    const fn from_bits(b: u64) -> Option<Self> {
        match b {
            0 => Some(Self::Varint),
            1 => Some(Self::I64),
            2 => Some(Self::Len),
            3 => Some(Self::StartGroup),
            4 => Some(Self::EndGroup),
            5 => Some(Self::I32),
            _ => None,
        }
    }
}

/// Decodes a varint at the start of `buf`: `(value, bytes consumed)`.
///
/// Rejects varints longer than 10 bytes or whose 10th byte carries bits
/// beyond 64 (what prost and Go's protowire do).
#[inline]
pub fn decode_varint(buf: &[u8]) -> Result<(u64, usize), DecodeError> {
    // Fast path: one byte.
    if let Some(&b) = buf.first()
        && b < 0x80
    {
        return Ok((u64::from(b), 1));
    }
    let mut value: u64 = 0;
    for (i, &b) in buf.iter().enumerate().take(MAX_VARINT_LEN) {
        if i == MAX_VARINT_LEN - 1 && b > 1 {
            return Err(DecodeError::Invalid("varint overflows 64 bits"));
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok((value, i + 1));
        }
    }
    if buf.len() >= MAX_VARINT_LEN {
        Err(DecodeError::Invalid("varint longer than 10 bytes"))
    } else {
        Err(DecodeError::Incomplete)
    }
}

/// Number of bytes the varint encoding of `v` takes (1..=10).
#[inline]
pub const fn varint_len(v: u64) -> usize {
    // 1 + floor(bits_used - 1) / 7, with 0 taking one byte.
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Encodes `v` at the start of `out` and returns the bytes written.
///
/// # Panics
/// If `out` is shorter than [`varint_len(v)`](varint_len) (a caller bug; a
/// 10-byte buffer always suffices). Use [`Writer`] for checked encoding.
#[inline]
pub fn encode_varint(mut v: u64, out: &mut [u8]) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

/// The key (tag) value for a field: `field << 3 | wire type`.
#[inline]
pub const fn key(field: u32, wt: WireType) -> u64 {
    ((field as u64) << 3) | wt.bits() as u64
}

/// Encoded length of the key of `field` (any wire type).
#[inline]
pub const fn key_len(field: u32) -> usize {
    varint_len((field as u64) << 3)
}

/// Encoded length of a whole length-delimited field carrying `len` bytes.
#[inline]
pub const fn len_field_len(field: u32, len: usize) -> usize {
    key_len(field) + varint_len(len as u64) + len
}

/// Encoded length of a varint field carrying `v`.
#[inline]
pub const fn varint_field_len(field: u32, v: u64) -> usize {
    key_len(field) + varint_len(v)
}

/// Decodes a key at the start of `buf`: `((field, wire type), consumed)`.
///
/// Field 0, field numbers above [`MAX_FIELD_NUMBER`] and wire types 6/7
/// are invalid.
#[inline]
pub fn decode_key(buf: &[u8]) -> Result<((u32, WireType), usize), DecodeError> {
    let (k, n) = decode_varint(buf)?;
    let field = k >> 3;
    if field == 0 {
        return Err(DecodeError::Invalid("field number 0"));
    }
    if field > u64::from(MAX_FIELD_NUMBER) {
        return Err(DecodeError::Invalid("field number too large"));
    }
    let wt = WireType::from_bits(k & 7).ok_or(DecodeError::Invalid("unknown wire type"))?;
    Ok(((field as u32, wt), n))
}

/// Reads a length-delimited value (length varint + bytes) at the start of
/// `buf`: `(value bytes, consumed)`. The key must already be consumed.
#[inline]
pub fn decode_len_delimited(buf: &[u8]) -> Result<(&[u8], usize), DecodeError> {
    let (len, n) = decode_varint(buf)?;
    let rest = &buf[n..];
    if len > rest.len() as u64 {
        return Err(DecodeError::Incomplete);
    }
    let len = len as usize;
    Ok((&rest[..len], n + len))
}

/// Skips the value of a field whose key (`field`, `wt`) was just consumed;
/// returns the bytes of `buf` the value occupies.
///
/// Groups are skipped up to their matching end-group key (nesting is
/// bounded by [`MAX_GROUP_DEPTH`]); a stray end-group is invalid.
pub fn skip_field(field: u32, wt: WireType, buf: &[u8]) -> Result<usize, DecodeError> {
    skip_field_depth(field, wt, buf, 0)
}

fn skip_field_depth(
    field: u32,
    wt: WireType,
    buf: &[u8],
    depth: u32,
) -> Result<usize, DecodeError> {
    match wt {
        WireType::Varint => decode_varint(buf).map(|(_, n)| n),
        WireType::I64 => fixed(buf, 8),
        WireType::I32 => fixed(buf, 4),
        WireType::Len => decode_len_delimited(buf).map(|(_, n)| n),
        WireType::EndGroup => Err(DecodeError::Invalid("unexpected end-group")),
        WireType::StartGroup => {
            if depth >= MAX_GROUP_DEPTH {
                return Err(DecodeError::Invalid("groups nested too deeply"));
            }
            let mut pos = 0;
            loop {
                let ((f, w), n) = decode_key(&buf[pos..])?;
                pos += n;
                if w == WireType::EndGroup {
                    if f != field {
                        return Err(DecodeError::Invalid("mismatched end-group"));
                    }
                    return Ok(pos);
                }
                pos += skip_field_depth(f, w, &buf[pos..], depth + 1)?;
            }
        }
    }
}

#[inline]
fn fixed(buf: &[u8], n: usize) -> Result<usize, DecodeError> {
    if buf.len() < n {
        Err(DecodeError::Incomplete)
    } else {
        Ok(n)
    }
}

/// Turns `Incomplete` into `Invalid`: for inputs known to be complete
/// (a frame body, an embedded message), running short is malformed.
#[inline]
pub(crate) fn complete(e: DecodeError) -> DecodeError {
    match e {
        DecodeError::Incomplete => DecodeError::Invalid("truncated field"),
        other => other,
    }
}

/// A checked cursor over a caller-provided output buffer.
#[derive(Debug)]
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes still free.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn need(&self, n: usize) -> Result<(), EncodeError> {
        if n > self.remaining() {
            Err(EncodeError::BufferTooSmall {
                needed: self.pos + n,
                available: self.buf.len(),
            })
        } else {
            Ok(())
        }
    }

    /// Writes raw bytes.
    #[inline]
    pub fn bytes(&mut self, b: &[u8]) -> Result<(), EncodeError> {
        self.need(b.len())?;
        crate::copy::copy(&mut self.buf[self.pos..self.pos + b.len()], b);
        self.pos += b.len();
        Ok(())
    }

    /// Writes a varint.
    #[inline]
    pub fn varint(&mut self, v: u64) -> Result<(), EncodeError> {
        self.need(varint_len(v))?;
        self.pos += encode_varint(v, &mut self.buf[self.pos..]);
        Ok(())
    }

    /// Writes a key.
    #[inline]
    pub fn key(&mut self, field: u32, wt: WireType) -> Result<(), EncodeError> {
        self.varint(key(field, wt))
    }

    /// Writes a varint field (always, even when zero).
    #[inline]
    pub fn varint_field(&mut self, field: u32, v: u64) -> Result<(), EncodeError> {
        self.key(field, WireType::Varint)?;
        self.varint(v)
    }

    /// Writes a length-delimited field (always, even when empty).
    #[inline]
    pub fn len_field(&mut self, field: u32, b: &[u8]) -> Result<(), EncodeError> {
        self.need(len_field_len(field, b.len()))?;
        self.key(field, WireType::Len)?;
        self.varint(b.len() as u64)?;
        self.bytes(b)
    }

    /// Writes the key and length of a length-delimited field whose `len`
    /// bytes of content the caller writes next.
    #[inline]
    pub fn len_header(&mut self, field: u32, len: usize) -> Result<(), EncodeError> {
        self.key(field, WireType::Len)?;
        self.varint(len as u64)
    }

    /// Hands out the next `n` bytes for the caller to fill.
    #[inline]
    pub fn reserve(&mut self, n: usize) -> Result<&mut [u8], EncodeError> {
        self.need(n)?;
        let start = self.pos;
        self.pos += n;
        Ok(&mut self.buf[start..start + n])
    }
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;

    #[test]
    fn varint_golden() {
        // Values and encodings from the protobuf encoding guide.
        let cases: &[(u64, &[u8])] = &[
            (0, &[0x00]),
            (1, &[0x01]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (150, &[0x96, 0x01]),
            (300, &[0xac, 0x02]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (
                u64::MAX,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            // int32 -1 is sign-extended to 64 bits: ten bytes.
            (
                -1i64 as u64,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for &(v, enc) in cases {
            assert_eq!(varint_len(v), enc.len(), "len of {v}");
            let mut out = [0u8; 10];
            let n = encode_varint(v, &mut out);
            assert_eq!(&out[..n], enc, "encode {v}");
            assert_eq!(decode_varint(enc), Ok((v, enc.len())), "decode {v}");
        }
    }

    #[test]
    fn varint_errors() {
        assert_eq!(decode_varint(&[]), Err(DecodeError::Incomplete));
        assert_eq!(decode_varint(&[0x80]), Err(DecodeError::Incomplete));
        assert_eq!(decode_varint(&[0xff; 9]), Err(DecodeError::Incomplete));
        assert!(matches!(
            decode_varint(&[0xff; 10]),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(DecodeError::Invalid(_))
        ));
        // Non-minimal encodings are legal protobuf.
        assert_eq!(decode_varint(&[0x81, 0x80, 0x00]), Ok((1, 3)));
    }

    #[test]
    fn keys() {
        assert_eq!(decode_key(&[0x08]), Ok(((1, WireType::Varint), 1)));
        assert_eq!(decode_key(&[0x1a]), Ok(((3, WireType::Len), 1)));
        assert_eq!(decode_key(&[0x7d]), Ok(((15, WireType::I32), 1)));
        assert_eq!(decode_key(&[0x81, 0x01]), Ok(((16, WireType::I64), 2)));
        assert!(matches!(decode_key(&[0x02]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode_key(&[0x0e]), Err(DecodeError::Invalid(_))));
        assert!(matches!(decode_key(&[0x0f]), Err(DecodeError::Invalid(_))));
        assert_eq!(key_len(15), 1);
        assert_eq!(key_len(16), 2);
    }

    #[test]
    fn skipping() {
        assert_eq!(skip_field(9, WireType::I32, &[1, 2, 3, 4, 5]), Ok(4));
        assert_eq!(
            skip_field(9, WireType::I32, &[1, 2, 3]),
            Err(DecodeError::Incomplete)
        );
        assert_eq!(skip_field(9, WireType::I64, &[0; 8]), Ok(8));
        assert_eq!(skip_field(9, WireType::Len, &[0x02, b'h', b'i', 0]), Ok(3));
        assert_eq!(
            skip_field(9, WireType::Len, &[0x05, b'h']),
            Err(DecodeError::Incomplete)
        );
        // Group 9: inner varint field 1 = 5, then end-group 9 (0x4c).
        assert_eq!(
            skip_field(9, WireType::StartGroup, &[0x08, 0x05, 0x4c, 0xff]),
            Ok(3)
        );
        // End-group of a different field.
        assert!(matches!(
            skip_field(9, WireType::StartGroup, &[0x08, 0x05, 0x54]),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            skip_field(9, WireType::EndGroup, &[]),
            Err(DecodeError::Invalid(_))
        ));
        // Deep nesting is bounded, not a stack overflow.
        let deep = [0x4bu8; 1000];
        assert!(skip_field(9, WireType::StartGroup, &deep).is_err());
    }

    #[test]
    fn writer_checks_room() {
        let mut buf = [0u8; 4];
        let mut w = Writer::new(&mut buf);
        assert_eq!(w.len_field(1, b"ab"), Ok(()));
        assert_eq!(
            w.len_field(2, b"x"),
            Err(EncodeError::BufferTooSmall {
                needed: 7,
                available: 4
            })
        );
        assert_eq!(w.position(), 4);
        assert_eq!(buf, [0x0a, 0x02, b'a', b'b']);
    }
}
