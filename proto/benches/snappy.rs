//! Throughput of the snappy framing codec on agent-like payloads.
//!
//! `cargo bench -p elkeid-proto --bench snappy`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use elkeid_proto::snappy::{compress, decompress, masked_crc32c};

/// ~4 MiB of PackagedData-like bytes: repeated key/value records with
/// varying numbers, like a batch of heartbeats and process events.
fn batch() -> Vec<u8> {
    let mut v = Vec::with_capacity(4 << 20);
    let mut i: u64 = 0;
    while v.len() < 4 << 20 {
        i += 1;
        // EncodedRecord-ish framing bytes, then Payload-like key/value text.
        v.extend_from_slice(&[0x0a, 0x9c, 0x01, 0x08, 0xe8, 0x07, 0x10]);
        v.extend_from_slice(&(1_700_000_000 + i).to_le_bytes());
        let kv = format!(
            "pid={} exe=/usr/bin/python3 argv=-m http.server {} cpu=0.{:08} rss={}",
            i * 7919 % 100_000,
            8000 + i % 10,
            i * 31 % 100_000_000,
            i * 4096 % 10_000_000,
        );
        v.extend_from_slice(kv.as_bytes());
    }
    v
}

fn bench(c: &mut Criterion) {
    let data = batch();
    let framed = compress(&data);
    let mut g = c.benchmark_group("snappy_framing_4MiB");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("compress", |b| {
        b.iter(|| compress(std::hint::black_box(&data)))
    });
    g.bench_function("decompress", |b| {
        b.iter(|| decompress(std::hint::black_box(&framed), 10 << 20).unwrap())
    });
    g.finish();
    // The checksum alone over one 64 KiB framing chunk (CPU instruction,
    // three interleaved chains, where the CPU has one).
    let chunk = &data[..65_536];
    let mut g = c.benchmark_group("crc32c_64KiB");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("masked_crc32c", |b| {
        b.iter(|| masked_crc32c(std::hint::black_box(chunk)))
    });
    g.finish();
    eprintln!(
        "ratio: {} -> {} bytes ({:.1}%)",
        data.len(),
        framed.len(),
        100.0 * framed.len() as f64 / data.len() as f64
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
