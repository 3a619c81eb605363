//! CRC-32C (Castagnoli, reflected polynomial `0x82F63B78`) and the masking
//! the snappy framing format applies to it.
//!
//! Where the CPU has a CRC-32C instruction (x86_64 SSE4.2, aarch64 `crc`,
//! detected at run time) it is used, 8 bytes per instruction: about three
//! times the table's speed, and this checksum runs over every byte both
//! sides send. Elsewhere (MIPS, old x86): slice-by-8 over tables built at
//! compile time, roughly a byte per cycle. No dependency.

/// Reflected CRC-32C polynomial.
const POLY: u32 = 0x82F6_3B78;

/// `TABLES[k][b]` is the CRC of byte `b` followed by `k` zero bytes.
static TABLES: [[u32; 256]; 8] = build_tables();

const fn build_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut k = 1;
        while k < 8 {
            let prev = t[k - 1][i];
            t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            k += 1;
        }
        i += 1;
    }
    t
}

/// CRC-32C of `data`.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU supports SSE4.2, checked just above.
        return !unsafe { hw::update(!0, data) };
    }
    #[cfg(target_arch = "aarch64")]
    if std::arch::is_aarch64_feature_detected!("crc") {
        // SAFETY: the CPU has the CRC32 instructions, checked just above.
        return !unsafe { hw::update(!0, data) };
    }
    crc32c_table(data)
}

/// The CRC-32C instructions (same polynomial and bit order as the tables;
/// no initial or final inversion, the caller does those).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod hw {
    /// Continues `crc` over `data`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "sse4.2")]
    pub(super) fn update(crc: u32, data: &[u8]) -> u32 {
        use std::arch::x86_64::_mm_crc32_u64;
        // the instruction leaves the upper 32 bits zero
        #[allow(clippy::cast_possible_truncation)]
        let step = |c: u32, w: &[u8; 8]| _mm_crc32_u64(u64::from(c), u64::from_le_bytes(*w)) as u32;
        interleaved(crc, data, step, |c, d| serial(c, d))
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "sse4.2")]
    fn serial(crc: u32, data: &[u8]) -> u32 {
        use std::arch::x86_64::{_mm_crc32_u8, _mm_crc32_u64};
        let mut c = u64::from(crc);
        let (words, rest) = data.as_chunks::<8>();
        for w in words {
            c = _mm_crc32_u64(c, u64::from_le_bytes(*w));
        }
        // the instruction leaves the upper 32 bits zero
        #[allow(clippy::cast_possible_truncation)]
        let mut c = c as u32;
        for &b in rest {
            c = _mm_crc32_u8(c, b);
        }
        c
    }

    /// Continues `crc` over `data`.
    #[cfg(target_arch = "aarch64")]
    #[target_feature(enable = "crc")]
    pub(super) fn update(crc: u32, data: &[u8]) -> u32 {
        use std::arch::aarch64::__crc32cd;
        let step = |c: u32, w: &[u8; 8]| __crc32cd(c, u64::from_le_bytes(*w));
        interleaved(crc, data, step, |c, d| serial(c, d))
    }

    #[cfg(target_arch = "aarch64")]
    #[target_feature(enable = "crc")]
    fn serial(crc: u32, data: &[u8]) -> u32 {
        use std::arch::aarch64::{__crc32cb, __crc32cd};
        let mut c = crc;
        let (words, rest) = data.as_chunks::<8>();
        for w in words {
            c = __crc32cd(c, u64::from_le_bytes(*w));
        }
        for &b in rest {
            c = __crc32cb(c, b);
        }
        c
    }

    /// Bytes each of the three interleaved lanes takes per round.
    const LANE: usize = 512;

    /// `SHIFT[j][b]`: the register holding byte `b` at byte `j`, multiplied
    /// by x^(8·LANE) mod P, i.e. advanced over `LANE` zero bytes.
    static SHIFT: [[u32; 256]; 4] = super::shift_tables(LANE);

    /// The register advanced over `LANE` zero bytes (linear in `c`: one
    /// table per byte of it).
    #[inline(always)]
    fn shift(c: u32) -> u32 {
        SHIFT[0][(c & 0xff) as usize]
            ^ SHIFT[1][((c >> 8) & 0xff) as usize]
            ^ SHIFT[2][((c >> 16) & 0xff) as usize]
            ^ SHIFT[3][(c >> 24) as usize]
    }

    /// The instruction has a latency of about three cycles but can start
    /// one per cycle, so one dependent chain uses a third of it. Three
    /// chains run over three consecutive `LANE`-byte pieces of each round,
    /// then are joined: CRC(A‖B) = CRC(A) advanced over |B| zero bytes,
    /// xor CRC(B) started from 0 (the register update is linear).
    #[inline(always)]
    fn interleaved(
        crc: u32,
        data: &[u8],
        step: impl Fn(u32, &[u8; 8]) -> u32,
        serial: impl Fn(u32, &[u8]) -> u32,
    ) -> u32 {
        let mut c = crc;
        let (rounds, rest) = data.as_chunks::<{ 3 * LANE }>();
        for r in rounds {
            let (a, bc) = r.split_at(LANE);
            let (b, cc) = bc.split_at(LANE);
            let (a, b, cc) = (
                a.as_chunks::<8>().0,
                b.as_chunks::<8>().0,
                cc.as_chunks::<8>().0,
            );
            let (mut x, mut y, mut z) = (c, 0, 0);
            for ((wa, wb), wc) in a.iter().zip(b).zip(cc) {
                x = step(x, wa);
                y = step(y, wb);
                z = step(z, wc);
            }
            c = shift(shift(x) ^ y) ^ z;
        }
        serial(c, rest)
    }
}

/// Tables advancing a CRC register over `n` zero bytes (see `hw::SHIFT`).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const fn shift_tables(n: usize) -> [[u32; 256]; 4] {
    // x^(8n) mod P: the register of x^0 (bit 31, reflected) advanced over n
    // zero bytes
    let mut k = 1u32 << 31;
    let mut i = 0;
    while i < n {
        k = (k >> 8) ^ TABLES[0][(k & 0xff) as usize];
        i += 1;
    }
    let mut t = [[0u32; 256]; 4];
    let mut j = 0;
    while j < 4 {
        let mut b = 0;
        while b < 256 {
            t[j][b] = mul_mod((b as u32) << (8 * j), k);
            b += 1;
        }
        j += 1;
    }
    t
}

/// `a · b mod P` in the reflected representation (bit 31 is x^0).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const fn mul_mod(a: u32, mut b: u32) -> u32 {
    let mut p = 0;
    let mut m = 1u32 << 31;
    while m != 0 {
        if a & m != 0 {
            p ^= b;
        }
        // b · x
        b = if b & 1 == 1 { (b >> 1) ^ POLY } else { b >> 1 };
        m >>= 1;
    }
    p
}

/// CRC-32C of `data` by the tables (any CPU).
fn crc32c_table(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][(hi & 0xff) as usize]
            ^ TABLES[2][((hi >> 8) & 0xff) as usize]
            ^ TABLES[1][((hi >> 16) & 0xff) as usize]
            ^ TABLES[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize];
    }
    !crc
}

/// The masked checksum stored in snappy framing chunks:
/// `((c >> 15) | (c << 17)) + 0xa282ead8` (wrapping), `c` the CRC-32C.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-at-a-time reference, straight from the definition.
    fn crc_bitwise(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn known_vectors() {
        // RFC 3720 appendix B.4 / the usual CRC-32C check values.
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0u8..32).collect();
        assert_eq!(crc32c(&inc), 0x46DD_794E);
    }

    #[test]
    fn slice_by_8_matches_bitwise_at_every_length() {
        let data: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(131) ^ (i >> 3)) as u8)
            .collect();
        for n in 0..data.len() {
            assert_eq!(crc32c(&data[..n]), crc_bitwise(&data[..n]), "len {n}");
            assert_eq!(crc32c_table(&data[..n]), crc_bitwise(&data[..n]), "len {n}");
        }
    }

    #[test]
    fn interleaved_rounds_match_the_tables() {
        // lengths around the 3 x 512-byte rounds of the hardware path
        let data: Vec<u8> = (0..70_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let round = 3 * 512;
        for n in [
            round - 1,
            round,
            round + 1,
            2 * round + 7,
            4096,
            65_536,
            70_000,
        ] {
            assert_eq!(crc32c(&data[..n]), crc32c_table(&data[..n]), "len {n}");
        }
        for n in (0..3 * round).step_by(37) {
            assert_eq!(crc32c(&data[..n]), crc_bitwise(&data[..n]), "len {n}");
        }
    }

    #[test]
    fn masking_formula() {
        // Written as in the spec on purpose (not as a rotate).
        let c = u64::from(crc32c(b"hello"));
        let masked = ((c >> 15) | (c << 17)) & 0xffff_ffff;
        assert_eq!(
            u64::from(masked_crc32c(b"hello")),
            (masked + 0xa282_ead8) & 0xffff_ffff
        );
    }
}
