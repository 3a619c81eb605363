//! The agent's disk spool format (sans-IO): append-only segment files of
//! CRC-checked entries, each one encoded `PackagedData` with its identity.
//!
//! # Segment layout (all integers little-endian)
//! ```text
//! segment := MAGIC (8 bytes "EKSPOOL1") entry*
//! entry   := len u32 | crc u32 | epoch u64 | seq u64 | unix_ms u64 | packet (len - 24 bytes)
//! crc     := CRC-32C (Castagnoli) over len (4 bytes) and everything after crc
//! ```
//! `len` counts the bytes after the 8-byte entry header and is checked
//! against [`MAX_ENTRY_BODY`] before anything is buffered. A reader tells a
//! torn tail ([`SpoolError::Incomplete`]: the file ends inside an entry, as
//! after a power loss mid-append) from corruption ([`SpoolError::Invalid`]:
//! bad length or CRC); either way the rest of that segment is skipped and
//! counted by the caller, never trusted.

use crate::ack::PacketId;
use core::fmt;

/// First bytes of every segment file (format version 1).
pub const MAGIC: [u8; 8] = *b"EKSPOOL1";
/// Entry header: `len` and `crc`.
pub const ENTRY_HEADER: usize = 8;
/// Fixed part of an entry body: epoch, seq, unix_ms.
pub const BODY_FIXED: usize = 24;
/// Largest packet an entry may hold (the agent's packets are at most 4 MiB;
/// the center refuses anything over 10 MiB).
pub const MAX_PACKET: usize = 16 * 1024 * 1024;
/// Largest `len` a reader accepts.
pub const MAX_ENTRY_BODY: usize = BODY_FIXED + MAX_PACKET;

/// Why an entry could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolError {
    /// The bytes end inside an entry; `needed` bytes in total would complete
    /// it. At the end of a file this is a torn append.
    Incomplete {
        /// Total bytes the entry needs from its start.
        needed: usize,
    },
    /// The bytes can never be a valid entry (bad magic, length or CRC).
    Invalid(&'static str),
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incomplete { needed } => {
                write!(f, "spool entry incomplete ({needed} bytes needed)")
            }
            Self::Invalid(why) => write!(f, "spool entry invalid: {why}"),
        }
    }
}

impl core::error::Error for SpoolError {}

/// One decoded entry, borrowing the packet bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    /// The packet's identity (kept across the spool, so the center can
    /// de-duplicate a replay).
    pub id: PacketId,
    /// When it was spooled (caller's clock, Unix milliseconds).
    pub unix_ms: u64,
    /// The encoded `PackagedData`.
    pub packet: &'a [u8],
}

/// Bytes an entry holding a `packet_len`-byte packet takes on disk.
pub const fn entry_len(packet_len: usize) -> usize {
    ENTRY_HEADER + BODY_FIXED + packet_len
}

/// Checks a segment's first bytes; returns the header length.
pub fn check_magic(buf: &[u8]) -> Result<usize, SpoolError> {
    if buf.len() < MAGIC.len() {
        if MAGIC.starts_with(buf) {
            return Err(SpoolError::Incomplete {
                needed: MAGIC.len(),
            });
        }
        return Err(SpoolError::Invalid("bad segment magic"));
    }
    if buf[..MAGIC.len()] != MAGIC {
        return Err(SpoolError::Invalid("bad segment magic"));
    }
    Ok(MAGIC.len())
}

/// Writes the 32-byte header of an entry holding `packet` (the caller
/// writes the header, then the packet itself: no copy of the packet).
pub fn encode_entry_header(
    id: PacketId,
    unix_ms: u64,
    packet: &[u8],
) -> Result<[u8; ENTRY_HEADER + BODY_FIXED], SpoolError> {
    if packet.len() > MAX_PACKET {
        return Err(SpoolError::Invalid("packet larger than MAX_PACKET"));
    }
    let mut h = [0u8; ENTRY_HEADER + BODY_FIXED];
    // Fits: MAX_ENTRY_BODY < 2^32.
    let len = (BODY_FIXED + packet.len()) as u32;
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&id.epoch.to_le_bytes());
    h[16..24].copy_from_slice(&id.seq.to_le_bytes());
    h[24..32].copy_from_slice(&unix_ms.to_le_bytes());
    let mut c = Crc32c::new();
    c.update(&h[0..4]);
    c.update(&h[8..32]);
    c.update(packet);
    h[4..8].copy_from_slice(&c.finish().to_le_bytes());
    Ok(h)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes the entry at the start of `buf`; returns it and its length.
/// Never panics and never asks for more than [`entry_len`]`(MAX_PACKET)`.
pub fn decode_entry(buf: &[u8]) -> Result<(Entry<'_>, usize), SpoolError> {
    if buf.len() < ENTRY_HEADER {
        return Err(SpoolError::Incomplete {
            needed: ENTRY_HEADER,
        });
    }
    let len = u32_at(buf, 0) as usize;
    if len < BODY_FIXED {
        return Err(SpoolError::Invalid("entry length below the fixed body"));
    }
    if len > MAX_ENTRY_BODY {
        return Err(SpoolError::Invalid("entry length above MAX_ENTRY_BODY"));
    }
    let total = ENTRY_HEADER + len;
    if buf.len() < total {
        return Err(SpoolError::Incomplete { needed: total });
    }
    let mut c = Crc32c::new();
    c.update(&buf[0..4]);
    c.update(&buf[ENTRY_HEADER..total]);
    if c.finish() != u32_at(buf, 4) {
        return Err(SpoolError::Invalid("entry CRC mismatch"));
    }
    let id = PacketId {
        epoch: u64_at(buf, 8),
        seq: u64_at(buf, 16),
    };
    let entry = Entry {
        id,
        unix_ms: u64_at(buf, 24),
        packet: &buf[ENTRY_HEADER + BODY_FIXED..total],
    };
    Ok((entry, total))
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
#[derive(Debug, Clone, Copy)]
pub struct Crc32c(u32);

const fn table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static TABLE: [u32; 256] = table();

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32c {
    /// A fresh checksum.
    pub const fn new() -> Self {
        Crc32c(!0)
    }
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        let mut c = self.0;
        for &b in data {
            c = TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }
    /// The checksum of everything fed.
    pub const fn finish(self) -> u32 {
        !self.0
    }
}

#[cfg(test)]
#[cfg(feature = "std")]
mod tests {
    use super::*;
    use std::vec::Vec;

    fn entry(id: PacketId, ms: u64, packet: &[u8]) -> Vec<u8> {
        let h = encode_entry_header(id, ms, packet).unwrap();
        [&h[..], packet].concat()
    }

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C.
        let mut c = Crc32c::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xE306_9283);
    }

    #[test]
    fn golden_entry() {
        let id = PacketId { epoch: 1, seq: 2 };
        let e = entry(id, 3, b"ab");
        // len = 26, crc, epoch 1, seq 2, ms 3, "ab"
        assert_eq!(&e[0..4], &[26, 0, 0, 0]);
        assert_eq!(&e[8..16], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&e[16..24], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&e[24..32], &[3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&e[32..], b"ab");
        let mut c = Crc32c::new();
        c.update(&e[0..4]);
        c.update(&e[8..]);
        assert_eq!(&e[4..8], &c.finish().to_le_bytes());
        let (d, n) = decode_entry(&e).unwrap();
        assert_eq!(n, e.len());
        assert_eq!(n, entry_len(2));
        assert_eq!(
            d,
            Entry {
                id,
                unix_ms: 3,
                packet: b"ab"
            }
        );
    }

    #[test]
    fn torn_and_corrupt() {
        let e = entry(PacketId { epoch: 7, seq: 9 }, 1, b"hello world");
        for cut in 0..e.len() {
            assert!(
                matches!(decode_entry(&e[..cut]), Err(SpoolError::Incomplete { needed }) if needed > cut),
                "cut {cut}"
            );
        }
        for i in 0..e.len() {
            for bit in 0..8 {
                let mut bad = e.clone();
                bad[i] ^= 1 << bit;
                match decode_entry(&bad) {
                    Err(_) => {}
                    Ok(_) => panic!("flip at byte {i} bit {bit} accepted"),
                }
            }
        }
        let mut huge = e.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode_entry(&huge),
            Err(SpoolError::Invalid("entry length above MAX_ENTRY_BODY"))
        );
        assert!(
            encode_entry_header(PacketId::default(), 0, &std::vec![0; MAX_PACKET + 1]).is_err()
        );
    }

    #[test]
    fn magic() {
        assert_eq!(check_magic(b"EKSPOOL1rest"), Ok(8));
        assert_eq!(
            check_magic(b"EKSP"),
            Err(SpoolError::Incomplete { needed: 8 })
        );
        assert!(matches!(
            check_magic(b"XKSPOOL1"),
            Err(SpoolError::Invalid(_))
        ));
        assert!(matches!(check_magic(b"X"), Err(SpoolError::Invalid(_))));
    }

    proptest::proptest! {
        #[test]
        fn round_trip_stream(packets in proptest::collection::vec(
            (proptest::prelude::any::<u64>(), proptest::prelude::any::<u64>(),
             proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64)), 0..20)) {
            let mut seg = MAGIC.to_vec();
            for (e, s, p) in &packets {
                seg.extend(entry(PacketId { epoch: *e, seq: *s }, 5, p));
            }
            let mut pos = check_magic(&seg).unwrap();
            let mut got = Vec::new();
            while pos < seg.len() {
                let (d, n) = decode_entry(&seg[pos..]).unwrap();
                got.push((d.id.epoch, d.id.seq, d.packet.to_vec()));
                pos += n;
            }
            proptest::prop_assert_eq!(got, packets);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = check_magic(&data);
            if let Ok((e, n)) = decode_entry(&data) {
                proptest::prop_assert!(n <= data.len());
                proptest::prop_assert_eq!(e.packet.len() + ENTRY_HEADER + BODY_FIXED, n);
            }
        }
    }
}
