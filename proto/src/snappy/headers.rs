//! gRPC compression headers as the snappy layers read and write them.

use http::header::{CONTENT_LENGTH, HeaderMap, HeaderValue};

pub(crate) const GRPC_ENCODING: &str = "grpc-encoding";
pub(crate) const GRPC_ACCEPT_ENCODING: &str = "grpc-accept-encoding";
pub(crate) const GRPC_STATUS: &str = "grpc-status";

/// The gRPC encoding name Elkeid registers for snappy framing.
pub const ENCODING_NAME: &str = "snappy";

fn value_is(v: &HeaderValue, name: &str) -> bool {
    v.to_str()
        .is_ok_and(|s| s.trim().eq_ignore_ascii_case(name))
}

/// `grpc-encoding: snappy`?
pub(crate) fn is_snappy(h: &HeaderMap) -> bool {
    h.get(GRPC_ENCODING)
        .is_some_and(|v| value_is(v, ENCODING_NAME))
}

/// A `grpc-encoding` other than identity is already set.
pub(crate) fn has_encoding(h: &HeaderMap) -> bool {
    h.get(GRPC_ENCODING)
        .is_some_and(|v| !value_is(v, "identity"))
}

/// Marks a message stream as snappy-compressed. The body length changes, so
/// any `content-length` goes.
pub(crate) fn set_snappy(h: &mut HeaderMap) {
    h.insert(GRPC_ENCODING, HeaderValue::from_static(ENCODING_NAME));
    h.remove(CONTENT_LENGTH);
}

/// Removes `grpc-encoding` (the body is being decompressed) and `content-length`.
pub(crate) fn clear_encoding(h: &mut HeaderMap) {
    h.remove(GRPC_ENCODING);
    h.remove(CONTENT_LENGTH);
}

/// Adds `snappy` to `grpc-accept-encoding`, keeping what is listed there.
pub(crate) fn accept_snappy(h: &mut HeaderMap) {
    let existing = h
        .get(GRPC_ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let new = match existing {
        None | Some("") => HeaderValue::from_static(ENCODING_NAME),
        Some(list)
            if list
                .split(',')
                .any(|e| e.trim().eq_ignore_ascii_case(ENCODING_NAME)) =>
        {
            return;
        }
        Some(list) => match HeaderValue::try_from(format!("{list},{ENCODING_NAME}")) {
            Ok(v) => v,
            Err(_) => HeaderValue::from_static(ENCODING_NAME),
        },
    };
    h.insert(GRPC_ACCEPT_ENCODING, new);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_list_is_extended_once() {
        let mut h = HeaderMap::new();
        accept_snappy(&mut h);
        assert_eq!(h[GRPC_ACCEPT_ENCODING], "snappy");
        accept_snappy(&mut h);
        assert_eq!(h[GRPC_ACCEPT_ENCODING], "snappy");
        h.insert(GRPC_ACCEPT_ENCODING, HeaderValue::from_static("gzip,zstd"));
        accept_snappy(&mut h);
        assert_eq!(h[GRPC_ACCEPT_ENCODING], "gzip,zstd,snappy");
        h.insert(
            GRPC_ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, Snappy"),
        );
        accept_snappy(&mut h);
        assert_eq!(h[GRPC_ACCEPT_ENCODING], "gzip, Snappy");
    }

    #[test]
    fn encoding_detection() {
        let mut h = HeaderMap::new();
        assert!(!is_snappy(&h) && !has_encoding(&h));
        h.insert(GRPC_ENCODING, HeaderValue::from_static("identity"));
        assert!(!is_snappy(&h) && !has_encoding(&h));
        h.insert(GRPC_ENCODING, HeaderValue::from_static("gzip"));
        assert!(!is_snappy(&h) && has_encoding(&h));
        h.insert(GRPC_ENCODING, HeaderValue::from_static("snappy"));
        assert!(is_snappy(&h) && has_encoding(&h));
        h.insert(CONTENT_LENGTH, HeaderValue::from_static("12"));
        clear_encoding(&mut h);
        assert!(h.is_empty());
    }
}
