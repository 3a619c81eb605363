//! Decoding of a serialized `Payload` (`map<string,string> fields = 1`) as
//! borrowed key/value pairs, rejecting anything that is not exactly that.

/// Why a record body is not a valid `Payload`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PayloadError {
    /// Truncated varint or length-delimited field.
    #[error("truncated payload")]
    Truncated,
    /// A varint longer than 10 bytes or a bad wire type.
    #[error("malformed payload: {0}")]
    Malformed(&'static str),
    /// A key or value is not UTF-8.
    #[error("payload string is not UTF-8")]
    NotUtf8,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, PayloadError> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let b = *buf.get(*pos).ok_or(PayloadError::Truncated)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(PayloadError::Malformed("varint too long"))
}

fn skip(buf: &[u8], pos: &mut usize, wire: u64) -> Result<(), PayloadError> {
    match wire {
        0 => varint(buf, pos).map(|_| ()),
        1 => advance(buf, pos, 8).map(|_| ()),
        2 => {
            let len = varint(buf, pos)?;
            let len = usize::try_from(len).map_err(|_| PayloadError::Truncated)?;
            advance(buf, pos, len).map(|_| ())
        }
        5 => advance(buf, pos, 4).map(|_| ()),
        _ => Err(PayloadError::Malformed("bad wire type")),
    }
}

fn advance<'a>(buf: &'a [u8], pos: &mut usize, len: usize) -> Result<&'a [u8], PayloadError> {
    let end = pos.checked_add(len).ok_or(PayloadError::Truncated)?;
    let s = buf.get(*pos..end).ok_or(PayloadError::Truncated)?;
    *pos = end;
    Ok(s)
}

fn bytes<'a>(buf: &'a [u8], pos: &mut usize) -> Result<&'a [u8], PayloadError> {
    let len = varint(buf, pos)?;
    let len = usize::try_from(len).map_err(|_| PayloadError::Truncated)?;
    advance(buf, pos, len)
}

/// Decodes `Payload.fields` entries in wire order (duplicates kept; the
/// caller's map decides, last wins). Unknown fields are skipped, as protobuf does.
pub(crate) fn decode(buf: &[u8]) -> Result<Vec<(&str, &str)>, PayloadError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let key = varint(buf, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 1 && wire == 2 {
            let entry = bytes(buf, &mut pos)?;
            let (mut k, mut v): (&[u8], &[u8]) = (b"", b"");
            let mut p = 0;
            while p < entry.len() {
                let ek = varint(entry, &mut p)?;
                match (ek >> 3, ek & 7) {
                    (1, 2) => k = bytes(entry, &mut p)?,
                    (2, 2) => v = bytes(entry, &mut p)?,
                    (_, w) => skip(entry, &mut p, w)?,
                }
            }
            let k = std::str::from_utf8(k).map_err(|_| PayloadError::NotUtf8)?;
            let v = std::str::from_utf8(v).map_err(|_| PayloadError::NotUtf8)?;
            out.push((k, v));
        } else if field == 0 {
            return Err(PayloadError::Malformed("field number 0"));
        } else {
            skip(buf, &mut pos, wire)?;
        }
    }
    Ok(out)
}

/// Decodes into an ordered map (last duplicate wins).
pub(crate) fn decode_map(
    buf: &[u8],
) -> Result<std::collections::BTreeMap<&str, &str>, PayloadError> {
    Ok(decode(buf)?.into_iter().collect())
}

#[cfg(test)]
pub(crate) fn encode(fields: &[(&str, &str)]) -> Vec<u8> {
    use prost::Message;
    let p = elkeid_proto::grpc::Payload {
        fields: fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    p.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_entry() {
        // Payload{fields: {"a": "bc"}} = 0a 07 0a 01 61 12 02 62 63 (spec §1.2)
        let b = [0x0a, 0x07, 0x0a, 0x01, b'a', 0x12, 0x02, b'b', b'c'];
        assert_eq!(decode(&b).unwrap(), vec![("a", "bc")]);
        assert_eq!(decode(&[]).unwrap(), vec![]);
    }

    #[test]
    fn rejects_bad() {
        assert_eq!(decode(&[0x0a, 0x07, 0x0a]), Err(PayloadError::Truncated));
        assert_eq!(
            decode(&[0x0a, 0x03, 0x0a, 0x01, 0xff]),
            Err(PayloadError::NotUtf8)
        );
        assert!(decode(&[0x0f]).is_err());
        assert!(
            decode(&[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ])
            .is_err()
        );
    }

    #[test]
    fn prost_round_trip() {
        let b = encode(&[("x", "1"), ("y", "")]);
        let m = decode_map(&b).unwrap();
        assert_eq!(m.get("x"), Some(&"1"));
        assert_eq!(m.get("y"), Some(&""));
    }
}
