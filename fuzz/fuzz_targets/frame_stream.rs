//! The streaming frame decoder, fed the input in chunk sizes taken from
//! the input itself, must agree with the one-shot slice decoder.
#![no_main]

use elkeid_core::frame::{self, FrameDecoder, FrameError};
use libfuzzer_sys::fuzz_target;

/// Small so that TooLong is reachable.
const MAX: u32 = 4096;

type Rec = (i32, i64, Vec<u8>, bool);

fn one_shot(mut buf: &[u8]) -> (Vec<Rec>, Option<FrameError>) {
    let mut out = Vec::new();
    loop {
        match frame::decode_frame(buf, MAX) {
            Ok(Some((r, used))) => {
                out.push((r.data_type, r.timestamp, r.body.to_vec(), r.canonical));
                buf = &buf[used..];
            }
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n_sizes, rest)) = data.split_first() else {
        return;
    };
    let n_sizes = usize::from(n_sizes % 8);
    if rest.len() < n_sizes {
        return;
    }
    let (sizes, stream) = rest.split_at(n_sizes);
    let (want, want_err) = one_shot(stream);

    let mut d = FrameDecoder::new(MAX);
    let mut got = Vec::new();
    let mut got_err = None;
    let mut pos = 0;
    let mut i = 0;
    'feed: while pos < stream.len() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(1, |&s| usize::from(s).max(1));
        i += 1;
        let n = size.min(stream.len() - pos);
        if i % 2 == 0 {
            d.push(&stream[pos..pos + n]);
        } else {
            let spare = d.spare_mut(n);
            spare[..n].copy_from_slice(&stream[pos..pos + n]);
            d.advance(n);
        }
        pos += n;
        loop {
            match d.next_record() {
                Ok(Some(r)) => got.push((r.data_type, r.timestamp, r.body.to_vec(), r.canonical)),
                Ok(None) => break,
                Err(e) => {
                    got_err = Some(e);
                    break 'feed;
                }
            }
        }
        // Never more than one max frame plus one read chunk buffered.
        assert!(d.capacity() <= 4 + MAX as usize + 256);
    }
    assert_eq!(got, want);
    assert_eq!(got_err, want_err);
});
