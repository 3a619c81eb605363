//! The snappy *framing* format (one complete stream per gRPC message).
//!
//! A stream is the identifier chunk `ff 06 00 00 "sNaPpY"` followed by
//! chunks. Every chunk is a type byte, a 3-byte little-endian length of what
//! follows, then the body. Data chunks (`0x00` compressed, `0x01` stored)
//! start their body with the 4-byte little-endian masked CRC-32C of the
//! *uncompressed* data and carry at most 65536 uncompressed bytes. Chunk
//! types `0x02..=0x7f` are reserved and must be rejected; `0x80..=0xfe`
//! (including padding `0xfe`) are skipped. An empty message is an empty
//! stream (zero bytes, not even the identifier).

use core::fmt;

use super::crc32c::masked_crc32c;

/// Default cap on the decompressed size of one message: 10 MiB, the
/// receive limit of the Elkeid Go center.
pub const DEFAULT_MAX_DECOMPRESSED: usize = 10 * 1024 * 1024;

/// The stream identifier chunk that opens every non-empty stream.
pub const STREAM_IDENTIFIER: [u8; 10] =
    [0xff, 0x06, 0x00, 0x00, b's', b'N', b'a', b'P', b'p', b'Y'];

/// Most uncompressed bytes one data chunk may carry.
pub const MAX_CHUNK_UNCOMPRESSED: usize = 65536;

/// Largest raw-snappy block an encoder can produce for a full chunk
/// (`32 + n + n / 6` for `n = 65536`).
const MAX_CHUNK_COMPRESSED: usize = 32 + MAX_CHUNK_UNCOMPRESSED + MAX_CHUNK_UNCOMPRESSED / 6;

const CHUNK_COMPRESSED: u8 = 0x00;
const CHUNK_STORED: u8 = 0x01;
const CHUNK_STREAM_ID: u8 = 0xff;
const CRC_LEN: usize = 4;
const CHUNK_HEADER_LEN: usize = 4;

/// Why a framed snappy stream was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnappyError {
    /// The stream does not start with the `sNaPpY` identifier chunk.
    MissingStreamIdentifier,
    /// A stream identifier chunk has the wrong length or contents.
    BadStreamIdentifier,
    /// The stream ends inside a chunk header or chunk body.
    Truncated,
    /// A data chunk is shorter than its checksum or longer than the format allows.
    BadChunkLength {
        /// Chunk type byte.
        chunk_type: u8,
        /// Declared length of the chunk body.
        len: usize,
    },
    /// A reserved, unskippable chunk type (`0x02..=0x7f`).
    ReservedChunk(u8),
    /// The masked CRC-32C of a chunk's uncompressed data does not match.
    ChecksumMismatch {
        /// Checksum stored in the chunk.
        stored: u32,
        /// Checksum of the data actually decoded.
        computed: u32,
    },
    /// A compressed chunk holds an invalid raw snappy block.
    CorruptBlock,
    /// The decompressed message would exceed the configured cap.
    TooLarge {
        /// The cap, in bytes.
        max: usize,
    },
}

impl fmt::Display for SnappyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingStreamIdentifier => {
                f.write_str("snappy stream does not start with the sNaPpY stream identifier")
            }
            Self::BadStreamIdentifier => f.write_str("snappy stream identifier chunk is malformed"),
            Self::Truncated => f.write_str("snappy stream is truncated inside a chunk"),
            Self::BadChunkLength { chunk_type, len } => {
                write!(
                    f,
                    "snappy chunk type {chunk_type:#04x} has invalid length {len}"
                )
            }
            Self::ReservedChunk(t) => write!(
                f,
                "snappy stream has reserved unskippable chunk type {t:#04x}"
            ),
            Self::ChecksumMismatch { stored, computed } => write!(
                f,
                "snappy chunk checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            Self::CorruptBlock => f.write_str("snappy chunk holds a corrupt compressed block"),
            Self::TooLarge { max } => {
                write!(f, "snappy message decompresses to more than {max} bytes")
            }
        }
    }
}

impl std::error::Error for SnappyError {}

/// Compresses one message into a complete framed snappy stream.
///
/// Empty input gives empty output. Chunks that do not shrink by at least
/// 1/8 are stored uncompressed (as the Go encoder does).
pub fn compress(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    compress_into(msg, &mut out);
    out
}

/// Like [`compress`], appending to `out`.
pub fn compress_into(msg: &[u8], out: &mut Vec<u8>) {
    compress_chunks(msg, out, None);
}

/// Like [`compress_into`], with the encoder's scratch buffer kept by the
/// caller between messages (the agent's send path). The encoder needs an
/// initialised output of its worst-case size: [`compress_into`] zeroes that
/// (about 75 KiB) in `out` for every 64 KiB chunk and compresses in place;
/// here `scratch` is zeroed only when it grows and the compressed bytes are
/// copied out of it. With a kept scratch the agent spent 4-10 % less CPU
/// per record in alternated runs; with a fresh scratch per message (a one-off call) the
/// copy made compression slower, so [`compress_into`] keeps the in-place
/// path (docs/BENCHMARKS.md, "Round 5").
pub fn compress_with(msg: &[u8], out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
    compress_chunks(msg, out, Some(scratch));
}

fn compress_chunks(msg: &[u8], out: &mut Vec<u8>, mut scratch: Option<&mut Vec<u8>>) {
    if msg.is_empty() {
        return;
    }
    let chunks = msg.len().div_ceil(MAX_CHUNK_UNCOMPRESSED);
    out.reserve(STREAM_IDENTIFIER.len() + chunks * (CHUNK_HEADER_LEN + CRC_LEN) + msg.len());
    out.extend_from_slice(&STREAM_IDENTIFIER);
    let mut encoder = snap::raw::Encoder::new();
    if let Some(s) = scratch.as_deref_mut() {
        let need = snap::raw::max_compress_len(msg.len().min(MAX_CHUNK_UNCOMPRESSED));
        if s.len() < need {
            s.resize(need, 0);
        }
    }
    for chunk in msg.chunks(MAX_CHUNK_UNCOMPRESSED) {
        let crc = masked_crc32c(chunk);
        let start = out.len();
        let data_at = start + CHUNK_HEADER_LEN + CRC_LEN;
        let compressed = match scratch.as_deref_mut() {
            Some(s) => {
                out.resize(data_at, 0);
                match encoder.compress(chunk, s) {
                    Ok(n) if n < chunk.len() - chunk.len() / 8 => {
                        out.extend_from_slice(&s[..n]);
                        Some(n)
                    }
                    _ => None,
                }
            }
            None => {
                out.resize(data_at + snap::raw::max_compress_len(chunk.len()), 0);
                match encoder.compress(chunk, &mut out[data_at..]) {
                    Ok(n) if n < chunk.len() - chunk.len() / 8 => {
                        out.truncate(data_at + n);
                        Some(n)
                    }
                    _ => None,
                }
            }
        };
        let (chunk_type, data_len) = match compressed {
            Some(n) => (CHUNK_COMPRESSED, n),
            None => {
                out.truncate(data_at);
                out.extend_from_slice(chunk);
                (CHUNK_STORED, chunk.len())
            }
        };
        // data_len + 4 <= MAX_CHUNK_COMPRESSED + 4 < 2^24: fits the 3-byte length.
        let body_len = (data_len + CRC_LEN) as u32;
        let len = body_len.to_le_bytes();
        let crc = crc.to_le_bytes();
        out[start..data_at].copy_from_slice(&[
            chunk_type, len[0], len[1], len[2], crc[0], crc[1], crc[2], crc[3],
        ]);
    }
}

/// Upper bound on the framed size of a stream whose decompressed size is at
/// most `max_decompressed`, for any conforming encoder that emits no padding.
/// Used to reject hostile declared lengths before buffering a message.
pub fn max_framed_len(max_decompressed: usize) -> usize {
    let chunks = max_decompressed.div_ceil(MAX_CHUNK_UNCOMPRESSED).max(1);
    STREAM_IDENTIFIER
        .len()
        .saturating_add(chunks.saturating_mul(CHUNK_HEADER_LEN + CRC_LEN + MAX_CHUNK_COMPRESSED))
}

/// Decompresses one complete framed snappy stream.
///
/// Empty input is an empty message. The total decompressed size is checked
/// against `max` before each chunk is allocated.
pub fn decompress(framed: &[u8], max: usize) -> Result<Vec<u8>, SnappyError> {
    let mut out = Vec::new();
    decompress_into(framed, max, &mut out)?;
    Ok(out)
}

/// Like [`decompress`], appending to `out`; `max` bounds the bytes this call
/// appends. On error `out` may hold a partial message.
pub fn decompress_into(framed: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), SnappyError> {
    // One allocation for the whole message instead of doubling chunk by
    // chunk (each doubling copied everything decoded so far).
    out.reserve(declared_len(framed, max));
    let base = out.len();
    let mut decoder = snap::raw::Decoder::new();
    let mut rest = framed;
    let mut first = true;
    while !rest.is_empty() {
        let Some((header, tail)) = rest.split_first_chunk::<CHUNK_HEADER_LEN>() else {
            return Err(SnappyError::Truncated);
        };
        let chunk_type = header[0];
        let len = chunk_len(header);
        if tail.len() < len {
            return Err(SnappyError::Truncated);
        }
        let (body, tail) = tail.split_at(len);
        rest = tail;
        if first && chunk_type != CHUNK_STREAM_ID {
            return Err(SnappyError::MissingStreamIdentifier);
        }
        first = false;
        match chunk_type {
            CHUNK_STREAM_ID if body != &STREAM_IDENTIFIER[CHUNK_HEADER_LEN..] => {
                return Err(SnappyError::BadStreamIdentifier);
            }
            CHUNK_STREAM_ID => {}
            CHUNK_COMPRESSED | CHUNK_STORED => {
                let bad_len = SnappyError::BadChunkLength { chunk_type, len };
                let Some((crc, data)) = body.split_first_chunk::<CRC_LEN>() else {
                    return Err(bad_len);
                };
                let stored = u32::from_le_bytes(*crc);
                let start = out.len();
                if chunk_type == CHUNK_COMPRESSED {
                    if data.len() > MAX_CHUNK_COMPRESSED {
                        return Err(bad_len);
                    }
                    let n =
                        snap::raw::decompress_len(data).map_err(|_| SnappyError::CorruptBlock)?;
                    if n > MAX_CHUNK_UNCOMPRESSED {
                        return Err(SnappyError::CorruptBlock);
                    }
                    check_cap(start - base, n, max)?;
                    out.resize(start + n, 0);
                    match decoder.decompress(data, &mut out[start..]) {
                        Ok(got) if got == n => {}
                        _ => return Err(SnappyError::CorruptBlock),
                    }
                } else {
                    if data.len() > MAX_CHUNK_UNCOMPRESSED {
                        return Err(bad_len);
                    }
                    check_cap(start - base, data.len(), max)?;
                    out.extend_from_slice(data);
                }
                let computed = masked_crc32c(&out[start..]);
                if computed != stored {
                    return Err(SnappyError::ChecksumMismatch { stored, computed });
                }
            }
            0x02..=0x7f => return Err(SnappyError::ReservedChunk(chunk_type)),
            // 0x80..=0xfe: skippable (0xfe is padding).
            _ => {}
        }
    }
    Ok(())
}

/// Body length of a chunk: the 3-byte little-endian field after the type.
fn chunk_len(header: &[u8; CHUNK_HEADER_LEN]) -> usize {
    usize::from(header[1]) | usize::from(header[2]) << 8 | usize::from(header[3]) << 16
}

/// Most bytes one snappy block can decode to per input byte: a 3-byte copy
/// element emits at most 64 bytes.
const MAX_EXPANSION: usize = 22;

/// What the chunk headers of `framed` say it decompresses to: a capacity
/// hint, nothing more (the decoding pass checks everything). Never more
/// than `max`, nor more than valid snappy can expand `framed` to, so a
/// small hostile message cannot make the caller reserve a large buffer.
pub(super) fn declared_len(framed: &[u8], max: usize) -> usize {
    let cap = max.min(framed.len().saturating_mul(MAX_EXPANSION));
    let mut total = 0usize;
    let mut rest = framed;
    while let Some((header, tail)) = rest.split_first_chunk::<CHUNK_HEADER_LEN>() {
        let len = chunk_len(header);
        let Some((body, tail)) = tail.split_at_checked(len) else {
            break;
        };
        rest = tail;
        let n = match header[0] {
            CHUNK_COMPRESSED => body
                .get(CRC_LEN..)
                .and_then(|data| snap::raw::decompress_len(data).ok())
                .unwrap_or(0),
            CHUNK_STORED => len.saturating_sub(CRC_LEN),
            _ => 0,
        };
        total = total.saturating_add(n.min(MAX_CHUNK_UNCOMPRESSED));
        if total >= cap {
            return cap;
        }
    }
    total
}

fn check_cap(have: usize, add: usize, max: usize) -> Result<(), SnappyError> {
    match have.checked_add(add) {
        Some(total) if total <= max => Ok(()),
        _ => Err(SnappyError::TooLarge { max }),
    }
}
