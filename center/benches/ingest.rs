//! The center's per-record stages for one agent packet of 2048 records:
//! snappy framing (with its CRC-32C), protobuf decode, NDJSON encode (the
//! direct encoder and, for comparison, the `serde_json` one it replaced).
//!
//! `cargo bench -p elkeid-center --bench ingest -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use elkeid_center::bench::Packet;
use elkeid_core::payload::PayloadBuf;
use elkeid_proto::grpc::{EncodedRecord, PackagedData};
use prost::Message;

const RECORDS: usize = 2048;

/// `flood-plugin`'s record: one field `s`, a zero-padded sequence number,
/// 200-byte record body.
fn flood(i: usize) -> EncodedRecord {
    let mut p = PayloadBuf::new();
    p.field("s", &format!("{i:0180}"));
    EncodedRecord {
        data_type: 7000,
        timestamp: 1_700_000_000,
        data: p.into_vec().into(),
    }
}

/// A process-exec-like record: six fields in producer (unsorted) order.
fn process(i: usize) -> EncodedRecord {
    let mut p = PayloadBuf::new();
    p.field("exe", "/usr/bin/some-binary")
        .field("argv", "some-binary --flag value")
        .field_u64("pid", 1000 + i as u64)
        .field_u64("ppid", 1)
        .field("comm", "some-binary-1234")
        .field(
            "sha256",
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        );
    EncodedRecord {
        data_type: 59,
        timestamp: 1_700_000_000,
        data: p.into_vec().into(),
    }
}

fn packet(rec: fn(usize) -> EncodedRecord) -> PackagedData {
    PackagedData {
        agent_id: "0f3c7a52-1f0e-5b4c-9c1a-6d2e8b7f4a10".into(),
        intranet_ipv4: vec!["10.0.0.2".into()],
        intranet_ipv6: vec!["fe80::1".into()],
        hostname: "bench-host".into(),
        version: "1.7.0.24".into(),
        product: "elkeid-agent".into(),
        records: (0..RECORDS).map(rec).collect(),
        ack_epoch: 1_764_000_000_123,
        ack_seq: 42,
        ..Default::default()
    }
}

fn ingest(c: &mut Criterion) {
    let mut g = c.benchmark_group("center_ingest");
    g.throughput(Throughput::Elements(RECORDS as u64));
    for (name, rec) in [
        ("flood_200B", flood as fn(usize) -> EncodedRecord),
        ("process_6_fields", process),
    ] {
        let pkt = packet(rec);
        let plain = pkt.encode_to_vec();
        let framed = elkeid_proto::snappy::compress(&plain);
        g.bench_function(format!("snappy_decompress/{name}"), |b| {
            b.iter(|| elkeid_proto::snappy::decompress(black_box(&framed), 10 << 20).unwrap())
        });
        let bytes = Bytes::from(plain.clone());
        g.bench_function(format!("protobuf_decode/{name}"), |b| {
            b.iter(|| PackagedData::decode(black_box(bytes.clone())).unwrap())
        });
        let p = Packet::new(pkt, 1_764_000_001, Some((1_764_000_000_123, 42)));
        let mut out = Vec::with_capacity(2 << 20);
        g.bench_function(format!("ndjson_direct/{name}"), |b| {
            b.iter(|| {
                out.clear();
                p.ndjson(&mut out);
                black_box(out.len())
            })
        });
        g.bench_function(format!("ndjson_serde_json/{name}"), |b| {
            b.iter(|| {
                out.clear();
                p.ndjson_serde(&mut out);
                black_box(out.len())
            })
        });
        let (mut a, mut s) = (Vec::new(), Vec::new());
        p.ndjson(&mut a);
        p.ndjson_serde(&mut s);
        assert!(a == s, "the encoders differ");
        eprintln!(
            "{name}: {} bytes plain, {} framed, {} NDJSON bytes per record",
            plain.len(),
            framed.len(),
            a.len() / RECORDS
        );
    }
    g.finish();
}

criterion_group!(benches, ingest);
criterion_main!(benches);
