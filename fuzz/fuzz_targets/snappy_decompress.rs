//! The snappy framing decoder (gRPC `grpc-encoding: snappy`) never panics,
//! never exceeds its cap, and round-trips what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;

const CAP: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(out) = elkeid_proto::snappy::decompress(data, CAP) {
        assert!(out.len() <= CAP);
        let again = elkeid_proto::snappy::compress(&out);
        assert_eq!(elkeid_proto::snappy::decompress(&again, CAP).ok(), Some(out));
    }
});
