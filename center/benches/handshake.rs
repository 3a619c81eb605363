//! The center's share of one full mTLS handshake of the gRPC listener (the
//! dev PKI: ECDSA P-256 certificates, as the center generates them), driven
//! in memory: only the time spent in the server's rustls calls is counted,
//! the client's work is not.
//!
//! - `no_cache_aes256`: every chain checked against the CA, the client
//!   offering rustls' default order (`TLS_AES_256_GCM_SHA384` first): the
//!   center before round 6;
//! - `cache_aes256`: the verified-chain cache, same client;
//! - `cache_aes128`: the cache, the client offering `TLS_AES_128_GCM_SHA256`
//!   first (the elkeid-rs agent on a CPU with AES instructions, and Go).
//!
//! `cargo bench -p elkeid-center --bench handshake -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

fn client(pem: &[Vec<u8>; 3], aes128_first: bool) -> Arc<ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    if aes128_first {
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem[0]) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem[1])
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&pem[2]).unwrap();
    let mut cfg = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // every dial a full handshake
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

/// One full handshake; returns the time spent in the server's calls.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> Duration {
    let name = ServerName::try_from("elkeid.com").unwrap();
    let mut c = ClientConnection::new(client.clone(), name).unwrap();
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut spent = t.elapsed();
    let mut wire = Vec::with_capacity(4096);
    for _ in 0..16 {
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        let t = Instant::now();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        spent += t.elapsed();
        let mut rd = &wire[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets().unwrap();
        }
        if !s.is_handshaking() && !c.is_handshaking() && !c.wants_write() {
            assert!(s.peer_certificates().is_some(), "client certificate");
            return spent;
        }
    }
    panic!("handshake did not finish");
}

fn bench(cr: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (no_cache, pem) = elkeid_center::bench::grpc_tls(dir.path(), false).unwrap();
    let (cache, _) = elkeid_center::bench::grpc_tls(dir.path(), true).unwrap();
    let (aes256, aes128) = (client(&pem, false), client(&pem, true));
    let mut g = cr.benchmark_group("full_mtls_handshake_server_side");
    for (name, server, client) in [
        ("no_cache_aes256", &no_cache, &aes256),
        ("cache_aes256", &cache, &aes256),
        ("cache_aes128", &cache, &aes128),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|n| (0..n).map(|_| handshake(server, client)).sum());
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
