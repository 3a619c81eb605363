//! `PackagedData` encoding straight into bytes.
//!
//! `PackagedData { 1 records repeated EncodedRecord; 2 agent_id; 3..6 IP
//! lists (repeated string); 7 hostname; 8 version; 9 product }`. The host
//! metadata (fields 2..9) is encoded once with [`encode_meta`] and appended
//! after the records of every packet, so the agent never builds per-record
//! prost structs: each record is written as field 1 (key, length, the
//! already-encoded `EncodedRecord` bytes).

use crate::pb::{self, EncodeError, Writer};

const RECORDS: u32 = 1;
const AGENT_ID: u32 = 2;
const INTRANET_IPV4: u32 = 3;
const EXTRANET_IPV4: u32 = 4;
const INTRANET_IPV6: u32 = 5;
const EXTRANET_IPV6: u32 = 6;
const HOSTNAME: u32 = 7;
const VERSION: u32 = 8;
const PRODUCT: u32 = 9;

/// Host metadata every packet carries.
#[derive(Debug, Clone, Copy, Default)]
pub struct PacketMeta<'a> {
    /// Field 2.
    pub agent_id: &'a str,
    /// Field 3.
    pub intranet_ipv4: &'a [&'a str],
    /// Field 4.
    pub extranet_ipv4: &'a [&'a str],
    /// Field 5.
    pub intranet_ipv6: &'a [&'a str],
    /// Field 6.
    pub extranet_ipv6: &'a [&'a str],
    /// Field 7.
    pub hostname: &'a str,
    /// Field 8.
    pub version: &'a str,
    /// Field 9.
    pub product: &'a str,
}

impl<'a> PacketMeta<'a> {
    fn lists(&self) -> [(u32, &'a [&'a str]); 4] {
        [
            (INTRANET_IPV4, self.intranet_ipv4),
            (EXTRANET_IPV4, self.extranet_ipv4),
            (INTRANET_IPV6, self.intranet_ipv6),
            (EXTRANET_IPV6, self.extranet_ipv6),
        ]
    }
}

/// Encoded length of one record inside `PackagedData` (key + length + bytes).
#[inline]
pub const fn record_entry_len(record_len: usize) -> usize {
    pb::len_field_len(RECORDS, record_len)
}

/// Length of [`encode_meta`]'s output.
pub fn meta_len(meta: &PacketMeta<'_>) -> usize {
    let single = |field: u32, s: &str| {
        if s.is_empty() {
            0
        } else {
            pb::len_field_len(field, s.len())
        }
    };
    let mut n = single(AGENT_ID, meta.agent_id);
    for (field, list) in meta.lists() {
        // Repeated strings are written even when empty.
        n += list
            .iter()
            .map(|s| pb::len_field_len(field, s.len()))
            .sum::<usize>();
    }
    n + single(HOSTNAME, meta.hostname)
        + single(VERSION, meta.version)
        + single(PRODUCT, meta.product)
}

/// Encodes `PackagedData` fields 2..9 (proto3: empty singular strings
/// omitted, repeated elements always written), in field order. Encode once,
/// reuse for every packet.
pub fn encode_meta(meta: &PacketMeta<'_>, out: &mut [u8]) -> Result<usize, EncodeError> {
    let need = meta_len(meta);
    if out.len() < need {
        return Err(EncodeError::BufferTooSmall {
            needed: need,
            available: out.len(),
        });
    }
    let mut w = Writer::new(out);
    let single = |w: &mut Writer<'_>, field: u32, s: &str| {
        if s.is_empty() {
            Ok(())
        } else {
            w.len_field(field, s.as_bytes())
        }
    };
    single(&mut w, AGENT_ID, meta.agent_id)?;
    for (field, list) in meta.lists() {
        for s in list {
            w.len_field(field, s.as_bytes())?;
        }
    }
    single(&mut w, HOSTNAME, meta.hostname)?;
    single(&mut w, VERSION, meta.version)?;
    single(&mut w, PRODUCT, meta.product)?;
    Ok(w.position())
}

/// Length of the packet [`encode_packet`] writes for these records and meta.
pub fn packet_len<'r>(records: impl Iterator<Item = &'r [u8]>, meta: &[u8]) -> usize {
    records.map(|r| record_entry_len(r.len())).sum::<usize>() + meta.len()
}

/// Writes the records as field 1 entries, then the pre-encoded meta bytes;
/// returns the packet length.
pub fn encode_packet<'r>(
    records: impl Iterator<Item = &'r [u8]>,
    meta: &[u8],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let mut w = Writer::new(out);
    for r in records {
        w.len_field(RECORDS, r)?;
    }
    w.bytes(meta)?;
    Ok(w.position())
}

/// [`encode_packet`] appending to a `Vec` (existing contents are kept, so a
/// caller may put a header in front).
#[cfg(feature = "alloc")]
pub fn encode_packet_vec<'r>(
    records: impl Iterator<Item = &'r [u8]>,
    meta: &[u8],
    out: &mut alloc::vec::Vec<u8>,
) {
    let mut hdr = [0u8; 1 + pb::MAX_VARINT_LEN];
    for r in records {
        let mut w = Writer::new(&mut hdr);
        // `hdr` always has room for a key of field 1 and a 64-bit varint.
        if w.len_header(RECORDS, r.len()).is_ok() {
            let n = w.position();
            out.extend_from_slice(&hdr[..n]);
            out.extend_from_slice(r);
        }
    }
    out.extend_from_slice(meta);
}
