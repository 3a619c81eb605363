//! `PackagedData` encoding straight into bytes.
//!
//! `PackagedData { 1 records repeated EncodedRecord; 2 agent_id; 3..6 IP
//! lists (repeated string); 7 hostname; 8 version; 9 product }`. The host
//! metadata (fields 2..9) is encoded once with [`encode_meta`] and appended
//! after the records of every packet, so the agent never builds per-record
//! prost structs: each record is written as field 1 (key, length, the
//! already-encoded `EncodedRecord` bytes).

pub use crate::pb::EncodeError;
use crate::pb::{self, Writer};

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
            crate::copy::extend(out, &hdr[..n]);
            crate::copy::extend(out, r);
        }
    }
    out.extend_from_slice(meta);
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;

    const META: PacketMeta<'static> = PacketMeta {
        agent_id: "id",
        intranet_ipv4: &["a", ""],
        extranet_ipv4: &[],
        intranet_ipv6: &[],
        extranet_ipv6: &["b"],
        hostname: "h",
        version: "",
        product: "p",
    };
    // Hand-derived: 2 "id" | 3 "a" | 3 "" | 6 "b" | 7 "h" | (8 omitted) | 9 "p".
    const META_GOLDEN: &[u8] = &[
        0x12, 0x02, b'i', b'd', 0x1a, 0x01, b'a', 0x1a, 0x00, 0x32, 0x01, b'b', 0x3a, 0x01, b'h',
        0x4a, 0x01, b'p',
    ];

    #[test]
    fn meta_golden() {
        assert_eq!(meta_len(&META), META_GOLDEN.len());
        let mut out = [0u8; 64];
        let n = encode_meta(&META, &mut out).unwrap();
        assert_eq!(&out[..n], META_GOLDEN);
        assert!(encode_meta(&META, &mut out[..5]).is_err());
        assert_eq!(encode_meta(&PacketMeta::default(), &mut out), Ok(0));
    }

    #[test]
    fn packet_golden() {
        let rec: &[u8] = &[0x08, 0xe8, 0x07, 0x10, 0xac, 0x02];
        let records = [rec, &[][..]];
        let golden = [
            &[0x0a, 0x06][..],
            rec,
            &[0x0a, 0x00], // an all-zero record is still a record
            META_GOLDEN,
        ]
        .concat();
        assert_eq!(
            packet_len(records.iter().copied(), META_GOLDEN),
            golden.len()
        );
        let mut out = [0u8; 64];
        let n = encode_packet(records.iter().copied(), META_GOLDEN, &mut out).unwrap();
        assert_eq!(&out[..n], golden);
        assert!(encode_packet(records.iter().copied(), META_GOLDEN, &mut out[..10]).is_err());

        let mut v = std::vec![0xee];
        encode_packet_vec(records.iter().copied(), META_GOLDEN, &mut v);
        assert_eq!(v[0], 0xee);
        assert_eq!(&v[1..], golden);
    }

    #[test]
    fn large_record_length_varint() {
        let big = std::vec![0u8; 300];
        // 300 = ac 02
        let mut v = std::vec::Vec::new();
        encode_packet_vec(core::iter::once(&big[..]), &[], &mut v);
        assert_eq!(&v[..3], &[0x0a, 0xac, 0x02]);
        assert_eq!(record_entry_len(300), 303);
    }
}
