//! The Payload entry iterator never panics, ends after an error, and
//! valid entries written back with PayloadBuf read back the same, and
//! `decode_utf8` (the center's decoder) agrees with the iterator.
#![no_main]

use elkeid_core::payload::{self, PayloadBuf};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = PayloadBuf::new();
    let mut entries = Vec::new();
    let mut it = payload::entries(data);
    for e in it.by_ref() {
        match e {
            Ok((k, v)) => {
                if let (Ok(k), Ok(v)) = (std::str::from_utf8(k), std::str::from_utf8(v)) {
                    buf.field(k, v);
                    entries.push((k, v));
                }
            }
            Err(_) => break,
        }
    }
    assert!(it.next().is_none());
    // The center's view: Ok exactly when every entry decodes and is UTF-8.
    let all_ok = payload::entries(data).all(|e| {
        e.is_ok_and(|(k, v)| std::str::from_utf8(k).is_ok() && std::str::from_utf8(v).is_ok())
    });
    match payload::decode_utf8(data) {
        Ok(pairs) => {
            assert!(all_ok);
            assert_eq!(pairs, entries);
        }
        Err(_) => assert!(!all_ok),
    }
    let back: Vec<(&str, &str)> = payload::entries(buf.as_bytes())
        .map(|e| {
            let (k, v) = e.expect("our own payload decodes");
            (
                std::str::from_utf8(k).unwrap(),
                std::str::from_utf8(v).unwrap(),
            )
        })
        .collect();
    assert_eq!(back, entries);
});
