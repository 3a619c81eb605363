//! decode → ring → drain throughput for 200-byte plugin records.
//!
//! `cargo bench -p elkeid-core --bench pipeline -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

// criterion is a dev-dependency on the build host only (not on the musl
// targets, whose QEMU test builds would otherwise compile it and its
// regex/clap/serde tree five times in CI): see core/Cargo.toml.
#[cfg(not(target_env = "musl"))]
mod bench {
    use std::hint::black_box;

    use criterion::{Criterion, Throughput, criterion_group};
    use elkeid_core::frame::{self, FrameDecoder};
    use elkeid_core::packet;
    use elkeid_core::payload::PayloadWriter;
    use elkeid_core::ring::{Batch, Class, DEFAULT_BATCH_BYTES, Ring, RingConfig};

    /// Records per iteration.
    const RECORDS: usize = 8192;
    /// Bytes fed to the decoder per read, like a pipe read of 64 KiB.
    const READ: usize = 64 * 1024;

    /// A stream of `RECORDS` frames, each a canonical 200-byte Record body.
    fn stream() -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..RECORDS {
            let mut payload = [0u8; 256];
            let mut w = PayloadWriter::new(&mut payload);
            w.field("exe", "/usr/bin/some-binary")
                .field("argv", "some-binary --flag value")
                .field_u64("pid", 1000 + i as u64)
                .field_u64("ppid", 1)
                .field("comm", "some-binary-1234")
                .field(
                    "sha256",
                    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                );
            let n = w.finish().unwrap();
            let mut body = vec![0u8; frame::encoded_record_len(59, 1_700_000_000, n)];
            let rec = frame::RecordRef {
                data_type: 59,
                timestamp: 1_700_000_000,
                payload: &payload[..n],
                body: &[],
                canonical: false,
            };
            rec.encode_to(&mut body);
            out.extend_from_slice(&(body.len() as u32).to_le_bytes());
            out.extend_from_slice(&body);
        }
        out
    }

    /// Decodes `stream` in `READ`-byte reads, pushes every record into the
    /// ring and drains it in 2048-record batches through `encode` (when the
    /// ring is full, and after each read, like the agent's send tick); returns
    /// the records sent.
    fn feed(
        stream: &[u8],
        decoder: &mut FrameDecoder,
        ring: &mut Ring,
        mut encode: impl FnMut(&Ring, &Batch),
    ) -> usize {
        let mut sent = 0usize;
        let mut drain = |ring: &mut Ring| {
            while let Some(batch) = ring.begin_batch(2048, DEFAULT_BATCH_BYTES) {
                encode(ring, &batch);
                sent += batch.len();
                ring.commit(batch);
            }
        };
        for chunk in stream.chunks(READ) {
            decoder.push(chunk);
            while let Some(rec) = decoder.next_record().unwrap() {
                if ring.push_frame(Class::Plugin, &rec).is_err() {
                    drain(ring);
                    ring.push_frame(Class::Plugin, &rec).unwrap();
                }
            }
            drain(ring);
        }
        sent
    }

    fn pipeline(c: &mut Criterion) {
        let stream = stream();
        let body_len = u32::from_le_bytes(stream[..4].try_into().unwrap()) as usize;
        assert!(
            (195..=205).contains(&body_len),
            "record body is {body_len} bytes"
        );

        let meta_fields = packet::PacketMeta {
            agent_id: "0f3c7a52-1f0e-5b4c-9c1a-6d2e8b7f4a10",
            intranet_ipv4: &["10.0.0.2"],
            extranet_ipv4: &[],
            intranet_ipv6: &["fe80::1"],
            extranet_ipv6: &[],
            hostname: "bench-host",
            version: "1.7.0.24",
            product: "elkeid-agent",
        };
        let mut meta = vec![0u8; packet::meta_len(&meta_fields)];
        packet::encode_meta(&meta_fields, &mut meta).unwrap();

        let mut ring: Ring = Ring::new(RingConfig::default());
        let mut decoder = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_LEN);
        let mut out = vec![0u8; DEFAULT_BATCH_BYTES + 64 * 1024];

        let mut g = c.benchmark_group("pipeline");
        g.throughput(Throughput::Elements(RECORDS as u64));
        g.bench_function("decode_push_drain_200B", |b| {
            b.iter(|| {
                let sent = feed(&stream, &mut decoder, &mut ring, |ring, batch| {
                    let n =
                        packet::encode_packet(ring.batch_records(batch), &meta, &mut out).unwrap();
                    black_box(&out[..n]);
                });
                assert_eq!(sent, RECORDS);
            });
        });

        // The same, the packet appended to a reused `Vec` as the agent does
        // (`encode_packet_vec`).
        let mut vec_out: Vec<u8> = Vec::with_capacity(DEFAULT_BATCH_BYTES + 64 * 1024);
        g.bench_function("decode_push_drain_vec_200B", |b| {
            b.iter(|| {
                let sent = feed(&stream, &mut decoder, &mut ring, |ring, batch| {
                    vec_out.clear();
                    packet::encode_packet_vec(ring.batch_records(batch), &meta, &mut vec_out);
                    black_box(&vec_out);
                });
                assert_eq!(sent, RECORDS);
            });
        });

        // The pieces alone, for context.
        g.bench_function("decode_only_200B", |b| {
            b.iter(|| {
                let mut n = 0;
                let mut pos = 0;
                while let Some((rec, used)) =
                    frame::decode_frame(&stream[pos..], frame::DEFAULT_MAX_FRAME_LEN).unwrap()
                {
                    black_box(rec.canonical);
                    pos += used;
                    n += 1;
                }
                assert_eq!(n, RECORDS);
            });
        });
        g.finish();
    }

    criterion_group!(benches, pipeline);
}

#[cfg(not(target_env = "musl"))]
fn main() {
    bench::benches();
    criterion::Criterion::default()
        .configure_from_args()
        .final_summary();
}

#[cfg(target_env = "musl")]
fn main() {
    eprintln!("the criterion benches run on the build host (a non-musl target)");
}
