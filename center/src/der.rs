//! The little DER reading the center does itself (a certificate's subject
//! CN, its validity dates): one element at a time, bounds-checked.

/// One DER element: (tag, contents, rest). Definite lengths of up to 4
/// length bytes, as DER requires; `None` on anything else or when the input
/// is shorter than the element claims.
pub(crate) fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, rest) = rest.split_at(n);
        let len = bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// The SEQUENCE tag.
pub(crate) const SEQUENCE: u8 = 0x30;
