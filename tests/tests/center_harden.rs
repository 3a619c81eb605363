//! Hardened defaults of the center, against the real binary: HTTPS API by
//! default, replayed signatures refused, request bodies bounded in size and
//! time (issue 10).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use elkeid_tests::Center;
use elkeid_tests::center::{HttpTarget, SERVER_NAME, http, signed_headers, unix_now};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Raw bytes a plain-HTTP client gets back for `GET /ping`.
async fn plain_ping(addr: std::net::SocketAddr) -> Vec<u8> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut raw)).await;
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_is_https_by_default_and_plain_http_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    // HTTPS with the center's server certificate, verified against its CA.
    let r = http(center.api_target(), "GET", "/ping", &[], b"").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, br#"{"message":"pong"}"#);
    // A plain-HTTP client gets no HTTP answer from the TLS port.
    let raw = plain_ping(center.http).await;
    assert!(
        !raw.starts_with(b"HTTP/"),
        "plain HTTP answered on the default port: {:?}",
        String::from_utf8_lossy(&raw)
    );
    drop(center);

    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &["--http-tls", "false"]);
    let raw = plain_ping(center.http).await;
    assert!(raw.starts_with(b"HTTP/1.1 200"), "{raw:?}");
    // ... and then a TLS client fails the handshake.
    let tcp = tokio::net::TcpStream::connect(center.http).await.unwrap();
    let ca = std::fs::read(dir.path().join("pki/ca.crt")).unwrap();
    let cfg = HttpTarget::https(center.http, &ca).tls.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let hs = tokio::time::timeout(
        Duration::from_secs(15),
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .unwrap();
    assert!(hs.is_err(), "TLS handshake succeeded on a plain-HTTP API");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_signed_post_is_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let (ak, sk) = center.api_key();
    let body = br#"{"agent_id":"nobody","command":{"task":{"data_type":1}}}"#;
    let captured = signed_headers(&ak, &sk, "POST", "/command/", body, unix_now());
    let first = http(center.api_target(), "POST", "/command/", &captured, body).await;
    assert_eq!(
        first.json()["data"],
        "agentID not found",
        "{:?}",
        first.json()
    );
    // The same request again (an observer's replay), within the window.
    let again = http(center.api_target(), "POST", "/command/", &captured, body).await;
    let v = again.json();
    assert_eq!(
        (again.status, &v["code"]),
        (200, &serde_json::json!(1)),
        "{v}"
    );
    assert_eq!(v["data"], "signature replayed", "{v}");
    assert_eq!(
        center
            .metric("elkeid_center_http_replays_refused_total")
            .await,
        1
    );
    // A freshly signed request with another body still passes.
    let body2 = br#"{"agent_id":"nobody2","command":{"task":{"data_type":1}}}"#;
    let h2 = signed_headers(&ak, &sk, "POST", "/command/", body2, unix_now());
    let r = http(center.api_target(), "POST", "/command/", &h2, body2).await;
    assert_eq!(r.json()["data"], "agentID not found");
    // Read-only requests may repeat (a manager polling twice in a second).
    let g = signed_headers(&ak, &sk, "GET", "/conn/count", b"", unix_now());
    for _ in 0..2 {
        let r = http(center.api_target(), "GET", "/conn/count", &g, b"").await;
        assert_eq!(r.json()["code"], 0, "{:?}", r.json());
    }
    assert_eq!(
        center
            .metric("elkeid_center_http_replays_refused_total")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_slow_bodies_get_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let target = center.api_target();
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(target.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
        tokio_rustls::TlsConnector::from(target.tls.clone().unwrap())
            .connect(name, tcp)
            .await
            .unwrap()
    };
    let read_all = |mut s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>| async move {
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw)).await;
        String::from_utf8_lossy(&raw).to_string()
    };
    // Declared larger than the cap: refused before reading it.
    let mut s = connect().await;
    s.write_all(
        b"POST /command/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 104857600\r\n\r\n{",
    )
    .await
    .unwrap();
    let resp = read_all(s).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("request body larger than"), "{resp}");
    // A body that never completes: refused after the body deadline.
    let mut s = connect().await;
    s.write_all(
        b"POST /command/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 100\r\n\r\n{\"agent",
    )
    .await
    .unwrap();
    s.flush().await.unwrap();
    let t0 = Instant::now();
    let resp = read_all(s).await;
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("request body not received within"), "{resp}");
    assert!(t0.elapsed() < Duration::from_secs(25), "{:?}", t0.elapsed());
    assert_eq!(
        center
            .metric("elkeid_center_http_bodies_refused_total")
            .await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_identity_fields_are_refused_and_counted() {
    use elkeid_tests::center::{AgentStream, heartbeat, packet};
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let mut cases = Vec::new();
    let mut p = packet("big-host", vec![heartbeat(unix_now())]);
    p.hostname = "h".repeat(300);
    cases.push(p);
    let mut p = packet(&"i".repeat(129), vec![heartbeat(unix_now())]);
    p.hostname = "ok".into();
    cases.push(p);
    let mut p = packet("many-ips", vec![heartbeat(unix_now())]);
    p.intranet_ipv4 = vec!["10.0.0.1".into(); 257];
    cases.push(p);
    let mut p = packet("long-ip", vec![heartbeat(unix_now())]);
    p.extranet_ipv6 = vec!["f".repeat(65)];
    cases.push(p);
    for p in cases {
        let Err(st) = AgentStream::open(center.agent().await, p).await else {
            panic!("accepted");
        };
        assert_eq!(st.code(), tonic::Code::InvalidArgument, "{st:?}");
        assert!(st.message().contains("more than"), "{st:?}");
    }
    assert_eq!(
        center
            .metric("elkeid_center_conn_refused_identity_fields_total")
            .await,
        4
    );
    assert!(center.conn_list().await.is_empty());
    // Real-sized fields pass.
    let _ok = center
        .open_stream("fine", vec![heartbeat(unix_now())])
        .await;
    assert_eq!(center.conn_list().await, vec!["fine".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unidentified_streams_cannot_lock_out_agents() {
    use elkeid_proto::grpc::transfer_client::TransferClient;
    use elkeid_tests::center::heartbeat;
    // conn_limit 8: before, 8 streams that never send a first packet held
    // every slot for 30 s. Now they use their own budget (64).
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(
        dir.path(),
        &["--conn-limit", "8", "--first-packet-timeout-secs", "60"],
    );
    let mut idle = Vec::new();
    let mut senders = Vec::new();
    // 72 streams over 9 connections (16 streams per connection at most):
    // 8 more than the budget, so the 8 oldest are evicted.
    for _ in 0..9 {
        let t = center.agent().await;
        for _ in 0..8 {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            senders.push(tx);
            let mut c = TransferClient::new(t.clone());
            idle.push(tokio::spawn(async move {
                c.transfer(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(|_| ())
            }));
        }
    }
    let mut evicted = 0;
    for _ in 0..100 {
        evicted = center
            .metric("elkeid_center_conn_refused_unidentified_total")
            .await;
        if evicted >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(evicted, 8);
    // The budget (64) is full of idle streams; agents that identify
    // themselves still get all 8 slots at once (not after the 60 s
    // first-packet deadline).
    let t0 = std::time::Instant::now();
    let mut streams = Vec::new();
    for i in 0..8 {
        streams.push(
            center
                .open_stream(&format!("agent-{i}"), vec![heartbeat(unix_now())])
                .await,
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    assert_eq!(center.conn_list().await.len(), 8);
    assert_eq!(
        center
            .metric("elkeid_center_conn_refused_unidentified_total")
            .await,
        9,
        "the first agent evicts one idle stream; once identified it leaves the budget"
    );
    // The evicted ones (the oldest idle streams) ended with RESOURCE_EXHAUSTED:
    // wait until the 9 refusals counted above reached their clients.
    for _ in 0..100 {
        if idle.iter().filter(|t| t.is_finished()).count() >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut exhausted = 0;
    let mut rest = Vec::new();
    for t in idle {
        if !t.is_finished() {
            rest.push(t);
            continue;
        }
        if let Err(st) = t.await.unwrap()
            && st.code() == tonic::Code::ResourceExhausted
        {
            exhausted += 1;
        }
    }
    assert_eq!(exhausted, 9);
    drop(senders);
    for t in rest {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_have_a_quota_an_idle_timeout_and_never_overwrite() {
    use bytes::Bytes;
    use elkeid_proto::grpc::FileUploadRequest;
    use elkeid_proto::grpc::file_ext_client::FileExtClient;
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(
        dir.path(),
        &["--upload-quota-bytes", "1000", "--upload-idle-secs", "2"],
    );
    let chunk = |token: &str, data: &[u8]| FileUploadRequest {
        token: token.into(),
        data: Bytes::copy_from_slice(data),
    };
    let upload = |chunks: Vec<FileUploadRequest>| async {
        let mut c = FileExtClient::new(center.agent().await);
        c.upload(tokio_stream::iter(chunks))
            .await
            .map(|r| r.into_inner().status)
    };
    let uploads = dir.path().join("uploads");
    assert_eq!(upload(vec![chunk("a", &[1; 600])]).await.unwrap(), 0);
    // Same token again: refused, the stored file untouched.
    let st = upload(vec![chunk("a", &[2; 10])]).await.unwrap_err();
    assert_eq!(st.code(), tonic::Code::AlreadyExists, "{st:?}");
    assert_eq!(std::fs::read(uploads.join("a")).unwrap(), vec![1; 600]);
    // Over the quota (600 stored + 600): refused, nothing left behind.
    let st = upload(vec![chunk("b", &[3; 300]), chunk("", &[3; 300])])
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{st:?}");
    assert!(st.message().contains("quota"), "{st:?}");
    // A stream that stops sending: ended after the idle timeout.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(chunk("c", b"partial")).await.unwrap();
    let mut c = FileExtClient::new(center.agent().await);
    let t0 = Instant::now();
    let st = tokio::time::timeout(
        Duration::from_secs(20),
        c.upload(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("ended by the server")
    .unwrap_err();
    assert_eq!(st.code(), tonic::Code::DeadlineExceeded, "{st:?}");
    assert!(t0.elapsed() >= Duration::from_secs(2));
    drop(tx);
    let mut left: Vec<String> = std::fs::read_dir(&uploads)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["a".to_string()], "no partial files, no b, no c");
    // Within the quota again after the refusals released their bytes.
    assert_eq!(upload(vec![chunk("d", &[4; 400])]).await.unwrap(), 0);
    assert!(center.metric("elkeid_center_uploads_failed_total").await >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_retention_keeps_the_records_dir_under_its_byte_budget() {
    use elkeid_tests::center::{record, unix_now};
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(
        dir.path(),
        &[
            "--ndjson-rotate-bytes",
            "4000",
            "--ndjson-retain-bytes",
            "12000",
        ],
    );
    let s = center
        .open_stream("retained", vec![record(5000, unix_now(), &[("n", "0")])])
        .await;
    let pad = "p".repeat(300);
    for i in 0..200 {
        s.send(vec![record(
            5000,
            unix_now(),
            &[("n", &i.to_string()), ("pad", &pad)],
        )])
        .await;
    }
    let records = dir.path().join("records");
    // All 201 records written (the last one is in the newest file, which
    // retention keeps): no rotation or removal runs while sizes are read.
    let last = elkeid_tests::center::eventually(Duration::from_secs(20), || async {
        (elkeid_tests::center::count_in_records(dir.path(), "\"n\":\"199\"") > 0).then_some(())
    })
    .await;
    assert!(last.is_some(), "the last record was written");
    let size = || -> (u64, usize) {
        let mut total = 0;
        let mut n = 0;
        for e in std::fs::read_dir(&records).unwrap() {
            total += e.unwrap().metadata().unwrap().len();
            n += 1;
        }
        (total, n)
    };
    // 200 records of ~600 bytes = ~120 KB written; at most 12000 bytes of
    // closed files plus the file being written are kept.
    let mut removed = 0;
    for _ in 0..100 {
        let r = http(center.api_target(), "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8(r.body).unwrap();
        removed = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(
                    "elkeid_center_sink_records_total{sink=\"ndjson\",kind=\"retention_removed_files\"} ",
                )
            })
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0u64);
        if removed >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(removed >= 20, "retention removed {removed} files");
    let (total, files) = size();
    assert!(
        total <= 12000 + 4000 + 1000,
        "{total} bytes in {files} files"
    );
    assert!(files >= 2, "the newest files stay: {files}");
    drop(s);
}
