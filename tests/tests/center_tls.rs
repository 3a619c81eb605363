//! mTLS as Elkeid agents meet it: the center requires a client certificate
//! from its CA, negotiates ALPN `h2`, and presents a certificate valid for
//! `elkeid.com`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use elkeid_tests::Center;
use elkeid_tests::center::{
    AgentPki, AgentStream, agent_transport, channel_over, eventually, foreign_client, heartbeat,
    packet, unix_now,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;
use tower_layer::Layer;

/// Opens a stream with `pki`; `Err` carries whatever refused it.
async fn try_agent(center: &Center, pki: &AgentPki, id: &str) -> Result<AgentStream, String> {
    let transport = agent_transport(center.grpc, pki)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let mut s = AgentStream::open(transport, packet(id, vec![heartbeat(unix_now())]))
        .await
        .map_err(|e| format!("open: {e:?}"))?;
    // TLS 1.3 reports a refused client certificate only after the client's
    // handshake finished: the stream then fails at once.
    match s.next(Duration::from_secs(10)).await {
        Some(Err(e)) => Err(format!("stream: {e:?}")),
        Some(Ok(None)) => Err("stream ended".into()),
        _ => Ok(s),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_without_a_certificate_from_the_ca_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let good = center.agent_pki();

    let none = AgentPki {
        ca: good.ca.clone(),
        identity: None,
    };
    let e = try_agent(&center, &none, "no-cert")
        .await
        .expect_err("no client certificate: refused");
    eprintln!("no client cert -> {e}");

    let (cert, key, _foreign_ca) = foreign_client();
    let foreign = AgentPki {
        ca: good.ca.clone(),
        identity: Some((cert, key)),
    };
    // a refused chain is never remembered: each attempt is checked, and refused
    for _ in 0..2 {
        let e = try_agent(&center, &foreign, "foreign-cert")
            .await
            .expect_err("foreign CA: refused");
        eprintln!("foreign CA -> {e}");
    }
    let verified = "elkeid_center_tls_client_chains_total{result=\"verified\"}";
    let cached = "elkeid_center_tls_client_chains_total{result=\"cached\"}";
    // (at least: the client's channel may redial in the background)
    let refused = center.metric(verified).await;
    assert!(refused >= 2, "{refused}");
    assert_eq!(center.metric(cached).await, 0);

    // The center keeps serving properly authenticated agents; the second
    // connection with the same (accepted) chain skips the chain check.
    let ok = try_agent(&center, &good, "good-cert")
        .await
        .expect("good agent accepted");
    let again = try_agent(&center, &good, "good-cert-2")
        .await
        .expect("good agent accepted again");
    assert!(center.metric(verified).await > refused);
    assert_eq!(center.metric(cached).await, 1);
    drop(again);
    let list = center.conn_list().await;
    assert!(list.contains(&"good-cert".to_string()), "{list:?}");
    assert!(
        !list.iter().any(|x| x == "no-cert" || x == "foreign-cert"),
        "{list:?}"
    );
    drop(ok);
}

fn client_config(pki: &AgentPki, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match &pki.identity {
        Some((cert, key)) => {
            let certs: Vec<_> = CertificateDer::pem_slice_iter(cert)
                .map(Result::unwrap)
                .collect();
            builder
                .with_client_auth_cert(certs, PrivateKeyDer::from_pem_slice(key).unwrap())
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_center_negotiates_h2_and_is_elkeid_com() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let pki = center.agent_pki();
    for name in ["elkeid.com", "localhost"] {
        let cfg = client_config(&pki, &[b"h2"]);
        let tcp = tokio::net::TcpStream::connect(center.grpc).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(name).unwrap().to_owned(), tcp)
            .await
            .unwrap_or_else(|e| panic!("handshake as {name}: {e}"));
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "ALPN h2 (Go agents require it)"
        );
    }
    // TLS 1.2 (what older Go agents may negotiate) with a client cert.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let (cert, key) = pki.identity.clone().unwrap();
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&cert)
        .map(Result::unwrap)
        .collect();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, PrivateKeyDer::from_pem_slice(&key).unwrap())
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(center.grpc).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("elkeid.com").unwrap(), tcp)
        .await
        .expect("TLS 1.2 handshake with client cert");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));

    // TLS 1.2 without a client certificate: the handshake itself fails.
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pki.ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(center.grpc).await.unwrap();
    let res = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("elkeid.com").unwrap(), tcp)
        .await;
    match res {
        Err(e) => eprintln!("TLS 1.2 without client cert -> {e}"),
        Ok(mut s) => {
            let mut buf = [0u8; 64];
            let r = s.read(&mut buf).await;
            assert!(
                !matches!(r, Ok(n) if n > 0),
                "server must not talk to a client without a certificate: {r:?}"
            );
        }
    }
}

/// One TLS connection with `cfg` (kept across dials, as the agent keeps its
/// `Arc<ClientConfig>`), then a Transfer stream over it as agent `id`; the
/// stream is open once the center lists the agent. Returns the handshake
/// kind and the stream.
async fn dial_and_stream(
    center: &Center,
    cfg: &Arc<rustls::ClientConfig>,
    id: &str,
) -> (rustls::HandshakeKind, AgentStream) {
    let tcp = tokio::net::TcpStream::connect(center.grpc).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(ServerName::try_from("elkeid.com").unwrap(), tcp)
        .await
        .expect("handshake");
    let kind = tls.get_ref().1.handshake_kind().expect("handshake done");
    let channel = channel_over(tls).await.expect("h2 over the TLS connection");
    let transport = elkeid_proto::snappy::SnappyClientLayer::new().layer(channel);
    let s = AgentStream::open(transport, packet(id, vec![heartbeat(unix_now())]))
        .await
        .expect("stream");
    let listed = eventually(Duration::from_secs(10), || async {
        center
            .conn_list()
            .await
            .contains(&id.to_string())
            .then_some(())
    })
    .await;
    assert!(listed.is_some(), "{id} never listed");
    (kind, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_resumes_the_tls_session_even_after_a_center_restart() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let grpc = center.grpc.to_string();
    let cfg = Arc::new(client_config(&center.agent_pki(), &[b"h2"]));
    let resumed_metric = "elkeid_center_tls_handshakes_total{listener=\"grpc\",kind=\"resumed\"}";
    let full_metric = "elkeid_center_tls_handshakes_total{listener=\"grpc\",kind=\"full\"}";

    let (kind, s) = dial_and_stream(&center, &cfg, "resume-1").await;
    assert_eq!(kind, rustls::HandshakeKind::Full, "first dial");
    drop(s);
    // the same config dials again: the center's ticket resumes the session,
    // and the resumed connection carries an agent stream like any other
    let (kind, s) = dial_and_stream(&center, &cfg, "resume-2").await;
    assert_eq!(kind, rustls::HandshakeKind::Resumed, "second dial");
    drop(s);
    assert_eq!(center.metric(resumed_metric).await, 1);
    assert_eq!(center.metric(full_metric).await, 1);
    // the chain restored from the ticket is checked again: a cache hit
    let chains = |r: &str| format!("elkeid_center_tls_client_chains_total{{result=\"{r}\"}}");
    assert_eq!(center.metric(&chains("verified")).await, 1);
    assert_eq!(center.metric(&chains("cached")).await, 1);

    // the ticket keys live in the data dir, private to the center's user
    let keys = dir.path().join("tls-ticket-keys");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&keys).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", keys.display());
    }

    // restarted on the same port and data dir: the agent still resumes
    drop(center);
    let center = Center::start_at(dir.path(), &grpc, &[]);
    let (kind, s) = dial_and_stream(&center, &cfg, "resume-3").await;
    assert_eq!(
        kind,
        rustls::HandshakeKind::Resumed,
        "dial after the restart"
    );
    drop(s);
    assert_eq!(center.metric(resumed_metric).await, 1);

    // a client without a session cache always gets a full handshake
    let mut fresh = client_config(&center.agent_pki(), &[b"h2"]);
    fresh.resumption = rustls::client::Resumption::disabled();
    let fresh = Arc::new(fresh);
    for i in 0..2 {
        let (kind, s) = dial_and_stream(&center, &fresh, &format!("no-cache-{i}")).await;
        assert_eq!(kind, rustls::HandshakeKind::Full);
        drop(s);
    }

    // new ticket keys (the file removed): old tickets no longer resume
    drop(center);
    std::fs::remove_file(&keys).unwrap();
    let center = Center::start_at(dir.path(), &grpc, &[]);
    let (kind, s) = dial_and_stream(&center, &cfg, "resume-4").await;
    assert_eq!(
        kind,
        rustls::HandshakeKind::Full,
        "ticket from the old keys"
    );
    drop(s);
    assert_eq!(center.metric(full_metric).await, 1);
}
