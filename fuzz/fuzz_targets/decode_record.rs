//! `decode_record` never panics; whatever it accepts re-encodes to a
//! canonical record with the same values.
#![no_main]

use elkeid_core::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(rec) = frame::decode_record(body) else {
        return;
    };
    let mut out = vec![0u8; rec.encoded_len()];
    assert_eq!(rec.encode_to(&mut out), out.len());
    if rec.canonical {
        assert_eq!(out, body);
    }
    let again = frame::decode_record(&out).expect("re-encoding decodes");
    assert!(again.canonical);
    assert_eq!(
        (again.data_type, again.timestamp),
        (rec.data_type, rec.timestamp)
    );
    let merged: Vec<u8> = rec.payload_parts().flatten().copied().collect();
    assert_eq!(again.payload, &merged[..]);
    assert_eq!(rec.payload_len(), merged.len());
});
