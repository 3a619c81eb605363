//! Varint, key and field-skipping primitives never panic and agree with
//! their encoders.
#![no_main]

use elkeid_core::pb::{self, DecodeError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match pb::decode_varint(data) {
        Ok((v, n)) => {
            assert!(n <= pb::MAX_VARINT_LEN && n <= data.len());
            assert!(pb::varint_len(v) <= n);
            let mut out = [0u8; 10];
            let m = pb::encode_varint(v, &mut out);
            assert_eq!(m, pb::varint_len(v));
            assert_eq!(pb::decode_varint(&out[..m]), Ok((v, m)));
        }
        Err(DecodeError::Incomplete) => assert!(data.len() < pb::MAX_VARINT_LEN),
        Err(DecodeError::Invalid(_)) => {}
    }
    // Walk the input as a message, skipping every field.
    let mut pos = 0;
    while pos < data.len() {
        let Ok(((field, wt), n)) = pb::decode_key(&data[pos..]) else {
            break;
        };
        pos += n;
        match pb::skip_field(field, wt, &data[pos..]) {
            Ok(n) => pos += n,
            Err(_) => break,
        }
        assert!(pos <= data.len());
    }
});
