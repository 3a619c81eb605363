//! Golden-byte, cross-implementation and hostile-input tests of the framing
//! codec and the gRPC message transcoder.
//!
//! Golden bytes are derived by hand from the framing spec; the masked
//! CRC-32C values were computed independently with a bit-at-a-time Python
//! implementation of the definition (checked against `crc32c("123456789") ==
//! 0xE3069283`):
//! - "hello":      crc 0x9a71bb4c, masked 0x191c1fbb -> LE `bb 1f 1c 19`
//! - "a" x 100:    crc 0x5ea3ad99, masked 0xfdb5a81f -> LE `1f a8 b5 fd`

use std::collections::VecDeque;
use std::io::{Read, Write};

use bytes::Bytes;

use super::framing::*;
use super::transcode::{Direction, TranscodeError, Transcoder};

const ID: [u8; 10] = [0xff, 0x06, 0x00, 0x00, 0x73, 0x4e, 0x61, 0x50, 0x70, 0x59];

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// "hello" as one stored chunk: type 01, length 4 + 5 = 9.
fn hello_stored() -> Vec<u8> {
    cat(&[
        &ID,
        &[0x01, 0x09, 0x00, 0x00],
        &[0xbb, 0x1f, 0x1c, 0x19],
        b"hello",
    ])
}

/// "hello" as one compressed chunk: raw block = varint 5, literal tag
/// `(5-1)<<2 = 0x10`, "hello"; chunk length 4 + 7 = 11.
fn hello_compressed() -> Vec<u8> {
    cat(&[
        &ID,
        &[0x00, 0x0b, 0x00, 0x00],
        &[0xbb, 0x1f, 0x1c, 0x19],
        &[0x05, 0x10],
        b"hello",
    ])
}

/// "a" x 100 compressed by hand: varint 100, literal "a" (tag 00), copy-2
/// len 64 off 1 (tag `63<<2|2 = 0xfe`), copy-2 len 35 off 1 (tag `34<<2|2 = 0x8a`).
fn a100_compressed() -> Vec<u8> {
    let block = [0x64, 0x00, 0x61, 0xfe, 0x01, 0x00, 0x8a, 0x01, 0x00];
    cat(&[
        &ID,
        &[0x00, 13, 0x00, 0x00],
        &[0x1f, 0xa8, 0xb5, 0xfd],
        &block,
    ])
}

fn snap_frame_encode(data: &[u8]) -> Vec<u8> {
    let mut w = snap::write::FrameEncoder::new(Vec::new());
    w.write_all(data).unwrap();
    w.into_inner().unwrap()
}

fn snap_frame_decode(framed: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    snap::read::FrameDecoder::new(framed)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Deterministic, partly compressible test data.
fn sample(n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 3 == 0 {
                (x & 0xff) as u8
            } else {
                b"elkeid record "[i % 14]
            }
        })
        .collect()
}

#[test]
fn golden_decode_stored_and_compressed() {
    assert_eq!(decompress(&hello_stored(), 100).unwrap(), b"hello");
    assert_eq!(decompress(&hello_compressed(), 100).unwrap(), b"hello");
    assert_eq!(
        decompress(&a100_compressed(), 100).unwrap(),
        vec![b'a'; 100]
    );
    // The reference decoder agrees with the hand-made bytes.
    assert_eq!(snap_frame_decode(&hello_stored()), b"hello");
    assert_eq!(snap_frame_decode(&hello_compressed()), b"hello");
    assert_eq!(snap_frame_decode(&a100_compressed()), vec![b'a'; 100]);
}

#[test]
fn golden_encode_small_message_is_stored() {
    // A 5-byte literal block (7 bytes) does not shrink: stored, exactly as derived.
    assert_eq!(compress(b"hello"), hello_stored());
}

#[test]
fn golden_encode_compressible_message() {
    let out = compress(&[b'a'; 100]);
    assert_eq!(&out[..10], &ID);
    assert_eq!(out[10], 0x00, "compressed chunk");
    let len = usize::from(out[11]) | usize::from(out[12]) << 8 | usize::from(out[13]) << 16;
    assert_eq!(len, out.len() - 14, "one chunk covering the rest");
    assert_eq!(
        &out[14..18],
        &[0x1f, 0xa8, 0xb5, 0xfd],
        "masked CRC of the uncompressed data"
    );
    assert_eq!(out[18], 100, "raw block starts with the varint length");
    assert!(out.len() < 40);
    assert_eq!(snap_frame_decode(&out), vec![b'a'; 100]);
}

#[test]
fn empty_message_is_zero_bytes() {
    assert!(compress(b"").is_empty());
    assert!(decompress(b"", 0).unwrap().is_empty());
    // A bare identifier is also an empty message.
    assert!(decompress(&ID, 0).unwrap().is_empty());
}

#[test]
fn chunks_hold_at_most_64k() {
    let data = sample(3 * 65536 + 17);
    let out = compress(&data);
    let mut rest = &out[10..];
    let mut total = 0;
    let mut chunks = 0;
    while !rest.is_empty() {
        let len = usize::from(rest[1]) | usize::from(rest[2]) << 8 | usize::from(rest[3]) << 16;
        let body = &rest[4..4 + len];
        let data_part = decompress(&cat(&[&ID, &rest[..4 + len]]), usize::MAX).unwrap();
        assert!(data_part.len() <= 65536);
        assert_eq!(
            u32::from_le_bytes(body[..4].try_into().unwrap()),
            super::crc32c::masked_crc32c(&data_part)
        );
        total += data_part.len();
        chunks += 1;
        rest = &rest[4 + len..];
    }
    assert_eq!((total, chunks), (data.len(), 4));
}

#[test]
fn cross_check_with_snap_frame_codec() {
    for n in [1, 5, 100, 4096, 65535, 65536, 65537, 300_000] {
        let data = sample(n);
        let ours = compress(&data);
        assert_eq!(snap_frame_decode(&ours), data, "snap reads ours, n={n}");
        let theirs = snap_frame_encode(&data);
        assert_eq!(
            decompress(&theirs, n).unwrap(),
            data,
            "we read snap's, n={n}"
        );
        assert_eq!(decompress(&ours, n).unwrap(), data);
    }
}

#[test]
fn cap_is_enforced_exactly() {
    let data = sample(200_000);
    let framed = compress(&data);
    assert_eq!(decompress(&framed, 200_000).unwrap(), data);
    assert_eq!(
        decompress(&framed, 199_999),
        Err(SnappyError::TooLarge { max: 199_999 })
    );
    assert_eq!(
        decompress(&hello_stored(), 4),
        Err(SnappyError::TooLarge { max: 4 })
    );
    assert_eq!(
        decompress(&hello_compressed(), 4),
        Err(SnappyError::TooLarge { max: 4 })
    );
}

#[test]
fn huge_declared_raw_length_is_rejected_before_allocation() {
    // A compressed chunk whose raw header claims 4 GiB - 1 bytes: rejected
    // on the header alone (the cap, or the 64 KiB chunk limit).
    let block = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00, 0x61];
    let framed = cat(&[&ID, &[0x00, 11, 0, 0], &[0; 4], &block]);
    assert_eq!(
        decompress(&framed, usize::MAX),
        Err(SnappyError::CorruptBlock)
    );
    // 60 KiB declared against a 1 KiB cap: TooLarge before any allocation.
    let block = [0x80, 0xe0, 0x03, 0x00, 0x61];
    let framed = cat(&[&ID, &[0x00, 9, 0, 0], &[0; 4], &block]);
    assert_eq!(
        decompress(&framed, 1024),
        Err(SnappyError::TooLarge { max: 1024 })
    );
    // A chunk header declaring 16 MiB - 1 of body that is not there.
    let framed = cat(&[&ID, &[0x00, 0xff, 0xff, 0xff], &[0; 8]]);
    assert_eq!(decompress(&framed, usize::MAX), Err(SnappyError::Truncated));
    // A stored chunk longer than 64 KiB + CRC.
    let framed = cat(&[&ID, &[0x01, 0x05, 0x00, 0x01], &vec![0; 65541]]);
    assert_eq!(
        decompress(&framed, usize::MAX),
        Err(SnappyError::BadChunkLength {
            chunk_type: 1,
            len: 65541
        })
    );
}

#[test]
fn one_allocation_for_the_whole_message_and_a_bounded_hint() {
    // Honest streams: the hint is the exact decompressed size, so the
    // output is allocated once.
    for n in [0, 1, 65_536, 65_537, 400_000] {
        let msg = sample(n);
        let framed = compress(&msg);
        assert_eq!(declared_len(&framed, usize::MAX), n);
        assert_eq!(declared_len(&framed, 1000), n.min(1000));
        let mut out = Vec::new();
        decompress_into(&framed, usize::MAX, &mut out).unwrap();
        assert_eq!(out, msg);
        // (Vec's smallest allocation for bytes is 8)
        assert_eq!(out.capacity(), n.max(8).min(n * 8), "one exact allocation");
    }
    // Hostile: 1,000 tiny chunks that each claim 64 KiB (62.5 MiB in 13 kB)
    // make the hint no larger than valid snappy could expand them to.
    let block = [0x80, 0x80, 0x04, 0x00, 0x61];
    let mut framed = ID.to_vec();
    for _ in 0..1000 {
        framed.extend_from_slice(&[0x00, 9, 0, 0, 0, 0, 0, 0]);
        framed.extend_from_slice(&block);
    }
    assert_eq!(declared_len(&framed, usize::MAX), framed.len() * 22);
    assert_eq!(declared_len(&framed, 4096), 4096);
    assert!(decompress(&framed, usize::MAX).is_err());
    // Truncated and garbage input: a hint of what is there, no panic.
    assert_eq!(declared_len(&framed[..20], usize::MAX), 0);
    assert_eq!(declared_len(&[0xff; 3], usize::MAX), 0);
}

#[test]
fn hostile_streams_give_clean_errors() {
    // Missing identifier.
    assert_eq!(
        decompress(&hello_stored()[10..], 100),
        Err(SnappyError::MissingStreamIdentifier)
    );
    // Wrong identifier contents / length.
    let mut bad = hello_stored();
    bad[4] = b'S';
    assert_eq!(decompress(&bad, 100), Err(SnappyError::BadStreamIdentifier));
    let bad = cat(&[&[0xff, 0x05, 0x00, 0x00], b"sNaPp"]);
    assert_eq!(decompress(&bad, 100), Err(SnappyError::BadStreamIdentifier));
    // Bad CRC, stored and compressed.
    for mut framed in [hello_stored(), hello_compressed()] {
        framed[14] ^= 1;
        assert!(matches!(
            decompress(&framed, 100),
            Err(SnappyError::ChecksumMismatch { .. })
        ));
    }
    // Corrupt data under a correct-looking header.
    let mut bad = hello_compressed();
    bad[19] = 0xfe; // literal tag becomes a copy with offset beyond output
    assert!(matches!(
        decompress(&bad, 100),
        Err(SnappyError::CorruptBlock | SnappyError::ChecksumMismatch { .. })
    ));
    // Reserved unskippable chunk types.
    for t in [0x02u8, 0x40, 0x7f] {
        let framed = cat(&[&ID, &[t, 0x01, 0x00, 0x00, 0x00]]);
        assert_eq!(decompress(&framed, 100), Err(SnappyError::ReservedChunk(t)));
    }
    // Data chunks shorter than their CRC.
    for t in [0x00u8, 0x01] {
        let framed = cat(&[&ID, &[t, 0x03, 0x00, 0x00, 1, 2, 3]]);
        assert_eq!(
            decompress(&framed, 100),
            Err(SnappyError::BadChunkLength {
                chunk_type: t,
                len: 3
            })
        );
    }
    // Compressed chunk with no block at all.
    let framed = cat(&[&ID, &[0x00, 0x04, 0x00, 0x00], &[0xd8, 0xea, 0x82, 0xa2]]);
    assert_eq!(decompress(&framed, 100), Err(SnappyError::CorruptBlock));
    // Every truncation of a valid stream is an error (or, at a chunk
    // boundary, a shorter valid message), never a panic.
    let full = compress(&sample(70_000));
    let cuts = (1..200)
        .chain((200..full.len()).step_by(61))
        .chain(full.len() - 200..full.len());
    for cut in cuts {
        if let Ok(v) = decompress(&full[..cut], usize::MAX) {
            assert!(
                cut == 10 || v.len() == 65536,
                "cut at {cut} decoded {} bytes",
                v.len()
            );
        }
    }
}

#[test]
fn skippable_and_padding_chunks_are_skipped() {
    let framed = cat(&[
        &ID,
        &[0xfe, 0x03, 0x00, 0x00, 0, 0, 0], // padding
        &hello_stored()[10..],
        &[0x80, 0x02, 0x00, 0x00, 9, 9], // skippable
        &ID,                             // repeated identifier is allowed
        &hello_compressed()[10..],
    ]);
    assert_eq!(decompress(&framed, 100).unwrap(), b"hellohello");
    assert_eq!(snap_frame_decode(&framed), b"hellohello");
}

// ---------------------------------------------------------------- transcoder

fn grpc_msg(flag: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flag];
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Feeds `input` split into `step`-byte chunks; returns the output or error.
fn run(dir: Direction, input: &[u8], step: usize) -> Result<Vec<u8>, TranscodeError> {
    let mut t = Transcoder::new(dir);
    let mut out = VecDeque::new();
    for c in input.chunks(step.max(1)) {
        t.push(Bytes::copy_from_slice(c), &mut out)?;
    }
    t.finish()?;
    Ok(out.into_iter().flat_map(|b| b.to_vec()).collect())
}

#[test]
fn transcoder_compresses_every_plain_message() {
    let body = cat(&[
        &grpc_msg(0, b"hello"),
        &grpc_msg(0, b""),
        &grpc_msg(0, &[b'a'; 100]),
    ]);
    // The empty message stays flag 0, length 0, as grpc-go sends it.
    let expected = cat(&[
        &grpc_msg(1, &hello_stored()),
        &grpc_msg(0, b""),
        &grpc_msg(1, &compress(&[b'a'; 100])),
    ]);
    for step in 1..=body.len() {
        assert_eq!(
            run(Direction::Compress, &body, step).unwrap(),
            expected,
            "step {step}"
        );
    }
}

#[test]
fn transcoder_decompresses_snappy_and_passes_plain() {
    let body = cat(&[
        &grpc_msg(1, &hello_compressed()),
        &grpc_msg(0, b"plain"),
        &grpc_msg(1, b""),
        &grpc_msg(1, &a100_compressed()),
        &grpc_msg(0, b""),
    ]);
    let expected = cat(&[
        &grpc_msg(0, b"hello"),
        &grpc_msg(0, b"plain"),
        &grpc_msg(0, b""),
        &grpc_msg(0, &[b'a'; 100]),
        &grpc_msg(0, b""),
    ]);
    for step in 1..=body.len() {
        assert_eq!(
            run(Direction::Decompress { max: 100 }, &body, step).unwrap(),
            expected,
            "step {step}"
        );
    }
}

#[test]
fn transcoder_round_trip_of_large_messages() {
    let msgs = [sample(1), sample(65536), sample(200_001), Vec::new()];
    let body: Vec<u8> = msgs.iter().flat_map(|m| grpc_msg(0, m)).collect();
    for step in [1000, 16384, 65536 + 3, body.len()] {
        let compressed = run(Direction::Compress, &body, step).unwrap();
        let back = run(Direction::Decompress { max: 200_001 }, &compressed, step).unwrap();
        assert_eq!(back, body, "step {step}");
    }
}

#[test]
fn transcoder_rejects_bad_input() {
    let d = Direction::Decompress { max: 1000 };
    assert_eq!(
        run(d, &grpc_msg(2, b"x"), 3),
        Err(TranscodeError::BadFlag(2))
    );
    assert_eq!(
        run(d, &grpc_msg(1, &hello_compressed()[..20]), 7),
        Err(TranscodeError::Snappy(SnappyError::Truncated))
    );
    // Declared compressed length far above what 1000 bytes can take: rejected
    // at the prefix, before buffering anything.
    let mut t = Transcoder::new(d);
    let mut out = VecDeque::new();
    let err = t
        .push(Bytes::from_static(&[1, 0xff, 0xff, 0xff, 0xff]), &mut out)
        .unwrap_err();
    assert!(matches!(
        err,
        TranscodeError::CompressedTooLong {
            len: u32::MAX,
            max: 1000
        }
    ));
    assert_eq!(err.to_status().code(), tonic::Code::ResourceExhausted);
    // Over the decompressed cap.
    let err = run(
        Direction::Decompress { max: 99 },
        &grpc_msg(1, &a100_compressed()),
        4,
    )
    .unwrap_err();
    assert_eq!(
        err,
        TranscodeError::Snappy(SnappyError::TooLarge { max: 99 })
    );
    assert_eq!(err.to_status().code(), tonic::Code::ResourceExhausted);
    // Bad CRC -> internal.
    let mut bad = hello_stored();
    bad[15] ^= 0x40;
    let err = run(d, &grpc_msg(1, &bad), 100).unwrap_err();
    assert_eq!(err.to_status().code(), tonic::Code::Internal);
    // Body ends mid-prefix, mid-pass-through, mid-collect.
    for input in [
        &[0u8, 0, 0][..],
        &grpc_msg(0, b"abc")[..7],
        &grpc_msg(1, &hello_stored())[..12],
    ] {
        assert_eq!(run(d, input, 1), Err(TranscodeError::Truncated));
    }
}

// ---------------------------------------------------------------- properties

mod props {
    use proptest::prelude::*;

    use super::*;

    /// Data with runs and repeats so both chunk kinds occur.
    fn data() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2000),
            (proptest::collection::vec(any::<u8>(), 1..64), 1usize..3000)
                .prop_map(|(unit, reps)| unit.repeat(reps)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn round_trip_and_reference_decoder(d in data()) {
            let framed = compress(&d);
            prop_assert_eq!(decompress(&framed, d.len()).unwrap(), d.clone());
            if !d.is_empty() {
                prop_assert_eq!(snap_frame_decode(&framed), d.clone());
                prop_assert_eq!(decompress(&snap_frame_encode(&d), d.len()).unwrap(), d);
            }
        }

        #[test]
        fn arbitrary_input_never_panics_and_respects_cap(
            tail in proptest::collection::vec(any::<u8>(), 0..512),
            with_id in any::<bool>(),
            max in 0usize..4096,
        ) {
            let input = if with_id { cat(&[&ID, &tail]) } else { tail };
            if let Ok(v) = decompress(&input, max) {
                prop_assert!(v.len() <= max);
            }
        }

        #[test]
        fn mutated_stream_never_panics(d in data(), pos in any::<usize>(), bit in 0u8..8) {
            let mut framed = compress(&d);
            if !framed.is_empty() {
                let i = pos % framed.len();
                framed[i] ^= 1 << bit;
                // Any error is fine; a success must be the message, or the
                // message minus one whole chunk (a flipped type byte can turn
                // a data chunk into a skippable one: the format allows that).
                if let Ok(v) = decompress(&framed, usize::MAX) {
                    let chunks: Vec<&[u8]> = d.chunks(MAX_CHUNK_UNCOMPRESSED).collect();
                    let dropped_one = (0..chunks.len()).any(|k| {
                        let mut c = chunks.clone();
                        c.remove(k);
                        c.concat() == v
                    });
                    prop_assert!(v == d || dropped_one);
                }
            }
        }

        #[test]
        fn transcoder_is_split_invariant(
            msgs in proptest::collection::vec(data(), 0..6),
            step in 1usize..5000,
        ) {
            let body: Vec<u8> = msgs.iter().flat_map(|m| grpc_msg(0, m)).collect();
            let one_shot = run(Direction::Compress, &body, body.len().max(1)).unwrap();
            prop_assert_eq!(&run(Direction::Compress, &body, step).unwrap(), &one_shot);
            let max = msgs.iter().map(Vec::len).max().unwrap_or(0);
            prop_assert_eq!(run(Direction::Decompress { max }, &one_shot, step).unwrap(), body);
        }
    }
}

#[test]
fn a_kept_scratch_gives_the_same_stream_as_a_fresh_one() {
    // sizes that grow, shrink and grow the scratch, incompressible data
    // (stored chunks) included
    let noise: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let mut scratch = Vec::new();
    for msg in [
        sample(10),
        sample(400_000),
        sample(3),
        noise,
        sample(65_537),
    ] {
        let mut out = vec![7u8];
        compress_with(&msg, &mut out, &mut scratch);
        assert_eq!(out[0], 7, "appends");
        assert_eq!(out[1..], compress(&msg)[..]);
        assert_eq!(decompress(&out[1..], usize::MAX).unwrap(), msg);
        assert!(scratch.len() <= snap::raw::max_compress_len(MAX_CHUNK_UNCOMPRESSED));
    }
}
