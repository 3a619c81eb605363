//! Real Elkeid certificate quirks (spec §2.3), made at test time with the
//! `openssl` CLI exactly as Elkeid's generator makes them: an X.509 **v1** CA
//! without extensions, v3 leaves with the **same subject DN as the CA**, SAN
//! `DNS:elkeid.com` only, **no EKU**, and **PKCS#1** RSA keys. The real
//! center and the real agent are started with that material and the agent's
//! 1000 heartbeat must land in the center's NDJSON sink; a client
//! certificate signed by another v1 CA (same DN, different key) is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use elkeid_tests::center::{AgentPki, tls_channel};
use elkeid_tests::{Center, KillOnDrop, bin, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncReadExt;

/// Subject (and issuer) DN of every Elkeid certificate.
const DN: &str = "/C=GB/L=China/O=hids-svr/CN=elkeid@elkeid.com";

/// Leaf extensions: SAN and KeyUsage only (no EKU).
const LEAF_EXT: &str = "subjectAltName=DNS:elkeid.com\n\
    keyUsage=digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment\n";

/// Runs `openssl args` in `dir`, failing the test with its stderr.
fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl x509 -text` of a certificate.
fn cert_text(dir: &Path, crt: &str) -> String {
    openssl(dir, &["x509", "-in", crt, "-noout", "-text"])
}

/// An RSA-2048 key written as PKCS#1 (`BEGIN RSA PRIVATE KEY`) to `name`.
fn pkcs1_key(dir: &Path, name: &str) {
    let pkcs8 = format!("{name}.pkcs8");
    openssl(dir, &["genrsa", "-out", &pkcs8, "2048"]);
    openssl(dir, &["rsa", "-in", &pkcs8, "-traditional", "-out", name]);
    let pem = std::fs::read_to_string(dir.join(name)).unwrap();
    assert!(
        pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "{name} is not PKCS#1: {pem}"
    );
}

/// Elkeid's CA: `<prefix>ca.key` / `<prefix>ca.crt`, X.509 v1, no extensions.
fn v1_ca(dir: &Path, prefix: &str) -> PathBuf {
    let (key, csr, crt) = (
        format!("{prefix}ca.key"),
        format!("{prefix}ca.csr"),
        format!("{prefix}ca.crt"),
    );
    pkcs1_key(dir, &key);
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", DN, "-out", &csr],
    );
    // `x509 -req -signkey` without `-extfile` self-signs a v1 certificate.
    openssl(
        dir,
        &[
            "x509", "-req", "-in", &csr, "-signkey", &key, "-days", "3650", "-out", &crt,
        ],
    );
    let text = cert_text(dir, &crt);
    assert!(text.contains("Version: 1 (0x0)"), "CA is not v1:\n{text}");
    assert!(!text.contains("X509v3"), "CA has extensions:\n{text}");
    assert!(text.contains("Public-Key: (2048 bit)"), "{text}");
    assert!(
        text.contains("Issuer: C = GB, L = China, O = hids-svr, CN = elkeid@elkeid.com")
            && text.contains("Subject: C = GB, L = China, O = hids-svr, CN = elkeid@elkeid.com"),
        "{text}"
    );
    dir.join(crt)
}

/// An Elkeid leaf `<name>.crt` / `<name>.key` signed by `<prefix>ca.*`:
/// v3, subject = the CA's DN, SAN `DNS:elkeid.com`, KeyUsage, no EKU.
fn leaf(dir: &Path, prefix: &str, name: &str) -> (PathBuf, PathBuf) {
    let (key, csr, crt, ext) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("{name}.ext"),
    );
    pkcs1_key(dir, &key);
    std::fs::write(dir.join(&ext), LEAF_EXT).unwrap();
    openssl(
        dir,
        &["req", "-new", "-key", &key, "-subj", DN, "-out", &csr],
    );
    let (ca_crt, ca_key) = (format!("{prefix}ca.crt"), format!("{prefix}ca.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
    let text = cert_text(dir, &crt);
    assert!(text.contains("Version: 3 (0x2)"), "{text}");
    assert!(text.contains("DNS:elkeid.com"), "{text}");
    assert!(
        text.contains("Digital Signature, Non Repudiation, Key Encipherment, Data Encipherment"),
        "{text}"
    );
    assert!(
        !text.contains("Extended Key Usage"),
        "leaf has an EKU:\n{text}"
    );
    assert!(
        text.contains("Subject: C = GB, L = China, O = hids-svr, CN = elkeid@elkeid.com"),
        "{text}"
    );
    (dir.join(crt), dir.join(key))
}

/// A real agent with the given material, heartbeating every second.
fn start_agent(
    center: &Center,
    work: &Path,
    id: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> KillOnDrop {
    let child = Command::new(bin("elkeid-agent", "elkeid-agent"))
        .arg("--work-dir")
        .arg(work)
        .args(["--server", &center.grpc.to_string()])
        .arg("--ca")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(["--heartbeat-secs", "1", "--log-level", "debug"])
        .env("SPECIFIED_AGENT_ID", id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn elkeid-agent");
    KillOnDrop(child)
}

fn agent_log(work: &Path) -> String {
    std::fs::read_to_string(work.join("log/elkeid-agent.log")).unwrap_or_default()
}

/// Complete NDJSON lines of `agent_id` and `data_type` in the center's sink.
fn records(center: &Center, agent_id: &str, data_type: i64) -> Vec<serde_json::Value> {
    elkeid_tests::plugin::records(center, agent_id, data_type)
}

/// A raw TLS client (TLS 1.2 only if `tls12`, else the default versions, so
/// 1.3) trusting `ca` and presenting `cert`/`key`, ALPN `h2`, as `elkeid.com`.
async fn raw_handshake(
    addr: std::net::SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
    tls12: bool,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider);
    let builder = if tls12 {
        builder.with_protocol_versions(&[&rustls::version::TLS12])
    } else {
        builder.with_safe_default_protocol_versions()
    };
    let mut cfg = builder
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("elkeid.com").unwrap(), tcp)
        .await
}

#[test]
#[cfg_attr(
    not(elkeid_test_openssl),
    ignore = "SKIPPED: the openssl CLI was not found at build time (install openssl; see tests/build.rs)"
)]
fn real_elkeid_material_carries_heartbeats_and_foreign_clients_are_refused() {
    let pki = tempfile::tempdir().unwrap();
    let p = pki.path();
    let ca = v1_ca(p, "");
    let (server_crt, server_key) = leaf(p, "", "server");
    let (client_crt, client_key) = leaf(p, "", "client");
    // Another deployment's material: same DN everywhere, different keys.
    v1_ca(p, "foreign-");
    let (foreign_crt, foreign_key) = leaf(p, "foreign-", "foreign-client");

    let cdir = tempfile::tempdir().unwrap();
    let center = Center::start(
        cdir.path(),
        &[
            "--tls-ca",
            ca.to_str().unwrap(),
            "--tls-cert",
            server_crt.to_str().unwrap(),
            "--tls-key",
            server_key.to_str().unwrap(),
        ],
    );

    // The agent with the genuine client leaf: heartbeats reach the sink.
    let good = tempfile::tempdir().unwrap();
    let agent = start_agent(
        &center,
        good.path(),
        "compat-elkeid-good",
        &ca,
        &client_crt,
        &client_key,
    );
    let hb = wait_for(Duration::from_secs(60), || {
        records(&center, "compat-elkeid-good", 1000)
            .into_iter()
            .find(|r| r["fields"]["net_mode"] == "private")
    })
    .unwrap_or_else(|| {
        panic!(
            "no heartbeat over Elkeid material; agent log:\n{}",
            agent_log(good.path())
        )
    });
    assert_eq!(hb["product"], "elkeid-agent");
    assert_eq!(hb["fields"]["pid"], agent.0.id().to_string().as_str());

    // A raw client with the foreign leaf (it trusts the real CA, so only the
    // center's check of the client certificate can refuse it).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let genuine_pki = AgentPki {
        ca: std::fs::read(&ca).unwrap(),
        identity: Some((
            std::fs::read(&client_crt).unwrap(),
            std::fs::read(&client_key).unwrap(),
        )),
    };
    rt.block_on(async {
        // Control: tonic's client with the genuine PKCS#1, EKU-less leaf.
        tls_channel(center.grpc, &genuine_pki)
            .await
            .expect("genuine client leaf accepted");
        // TLS 1.3: the client finishes first; the center's alert follows.
        let mut s = raw_handshake(center.grpc, &ca, &foreign_crt, &foreign_key, false)
            .await
            .expect("TLS 1.3: the client side of the handshake completes");
        let mut buf = [0u8; 64];
        let r = s.read(&mut buf).await;
        match &r {
            Err(e) if e.to_string().contains("received fatal alert") => {
                eprintln!("foreign client (TLS 1.3) refused: {e}");
            }
            other => panic!("TLS 1.3 foreign client not refused with an alert: {other:?}"),
        }
        // TLS 1.2: the handshake itself fails.
        let e = raw_handshake(center.grpc, &ca, &foreign_crt, &foreign_key, true)
            .await
            .expect_err("TLS 1.2 foreign client refused in the handshake");
        assert!(e.to_string().contains("received fatal alert"), "{e}");
        eprintln!("foreign client (TLS 1.2) refused: {e}");
    });

    // The real agent with the foreign leaf: nothing lands, and it says why.
    let bad = tempfile::tempdir().unwrap();
    let _bad_agent = start_agent(
        &center,
        bad.path(),
        "compat-elkeid-foreign",
        &ca,
        &foreign_crt,
        &foreign_key,
    );
    // With TLS 1.3 the refusal reaches the agent as a fatal alert or, when
    // its first write races the center's close, as a broken pipe: either
    // way the session ends.
    let log = wait_for(Duration::from_secs(30), || {
        let log = agent_log(bad.path());
        log.contains("transfer session ended").then_some(log)
    })
    .unwrap_or_else(|| {
        panic!(
            "the foreign agent never logged its failed session:\n{}",
            agent_log(bad.path())
        )
    });
    // Give it a few more heartbeat periods to (wrongly) get through.
    let _ = wait_for(Duration::from_secs(4), || None::<()>);
    assert!(
        records(&center, "compat-elkeid-foreign", 1000).is_empty(),
        "a foreign client certificate got records in; agent log:\n{log}"
    );
    // The genuine agent kept working meanwhile.
    assert!(!records(&center, "compat-elkeid-good", 1000).is_empty());
}
