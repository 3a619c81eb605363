//! Reading a spool segment never panics; every accepted entry re-encodes to
//! the same bytes.
#![no_main]

use elkeid_core::spool;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut pos) = spool::check_magic(data) else {
        return;
    };
    while pos < data.len() {
        match spool::decode_entry(&data[pos..]) {
            Ok((e, n)) => {
                assert!(n <= data.len() - pos);
                let h = spool::encode_entry_header(e.id, e.unix_ms, e.packet).expect("fits");
                assert_eq!(&h[..], &data[pos..pos + h.len()]);
                pos += n;
            }
            Err(_) => break,
        }
    }
});
