//! Hostile input against the real center: path-traversal upload tokens,
//! oversized and malformed messages. Each must end with a clear status
//! while the center keeps serving other agents.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use bytes::Bytes;
use elkeid_proto::codec::RawEncodeCodec;
use elkeid_proto::grpc::file_ext_client::FileExtClient;
use elkeid_proto::grpc::transfer_client::TransferClient;
use elkeid_proto::grpc::{Command, FileUploadRequest, PackagedData};
use elkeid_tests::Center;
use elkeid_tests::center::{eventually, heartbeat, packet, record, tls_channel, unix_now};
use tonic::codegen::http::uri::PathAndQuery;

const T: Duration = Duration::from_secs(20);

/// Another agent can still connect, send, and be listed.
async fn still_serving(center: &Center, id: &str) {
    let s = center.open_stream(id, vec![heartbeat(unix_now())]).await;
    let c = center;
    eventually(T, || async move {
        c.conn_list().await.iter().any(|x| x == id).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{id} served after hostile input"));
    drop(s);
}

async fn upload(center: &Center, chunks: Vec<FileUploadRequest>) -> Result<i32, tonic::Status> {
    let mut client = FileExtClient::new(center.agent().await);
    client
        .upload(tokio_stream::iter(chunks))
        .await
        .map(|r| r.into_inner().status)
}

fn chunk(token: &str, data: &[u8]) -> FileUploadRequest {
    FileUploadRequest {
        token: token.into(),
        data: Bytes::copy_from_slice(data),
    }
}

fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p)
            } else {
                out.push(p)
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_refuse_hostile_tokens_and_store_good_ones() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    let center = Center::start(&data_dir, &[]);
    let before: Vec<_> = files_under(root.path());

    for token in [
        "../x",
        "../../escaped",
        "a/b",
        "..",
        "/etc/passwd",
        "x y",
        "t\0z",
        "",
    ] {
        match upload(&center, vec![chunk(token, b"evil bytes")]).await {
            Err(status) => {
                assert_ne!(status.code(), tonic::Code::Ok);
                eprintln!(
                    "token {token:?} -> {:?}: {}",
                    status.code(),
                    status.message()
                );
            }
            Ok(code) => assert_eq!(code, 1, "token {token:?} must not succeed"),
        }
    }
    // Nothing new was written anywhere (task-results file aside).
    let after: Vec<_> = files_under(root.path())
        .into_iter()
        .filter(|p| !before.contains(p) && !p.ends_with("task-results.ndjson"))
        .filter(|p| !p.starts_with(data_dir.join("records")))
        .collect();
    assert!(after.is_empty(), "hostile uploads left files: {after:?}");
    assert!(!root.path().join("x").exists() && !root.path().join("escaped").exists());

    // A good token in three chunks is stored whole under DIR/uploads/.
    let status = upload(
        &center,
        vec![
            chunk("tok_OK-1", b"hello "),
            chunk("", b"upload "),
            chunk("", b"world"),
        ],
    )
    .await
    .expect("good upload");
    assert_eq!(status, 0, "SUCCESS");
    let stored = std::fs::read(data_dir.join("uploads").join("tok_OK-1")).expect("stored file");
    assert_eq!(stored, b"hello upload world");

    still_serving(&center, "after-upload").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_end_the_stream_with_a_clear_status() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let big = || {
        let mut r = record(5003, unix_now(), &[]);
        r.data = Bytes::from(vec![b'A'; 11 * 1024 * 1024]); // > 10 MiB once decompressed
        r
    };

    // Snappy: 11 MiB compress to a small wire message; the limit applies to
    // the decompressed size.
    let mut s = center
        .open_stream("big-snappy", vec![heartbeat(unix_now())])
        .await;
    s.send(vec![big()]).await;
    match s.next(T).await {
        Some(Err(status)) => {
            eprintln!(
                "snappy oversized -> {:?}: {}",
                status.code(),
                status.message()
            );
            assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        }
        other => panic!("oversized snappy message must fail the stream, got {other:?}"),
    }

    // Identity encoding, as the first message.
    let channel = tls_channel(center.grpc, &center.agent_pki()).await.unwrap();
    let mut client = TransferClient::new(channel);
    let res = client
        .transfer(tokio_stream::iter(vec![packet("big-plain", vec![big()])]))
        .await;
    let status = match res {
        Err(s) => s,
        Ok(resp) => resp.into_inner().message().await.expect_err("stream fails"),
    };
    eprintln!(
        "identity oversized -> {:?}: {}",
        status.code(),
        status.message()
    );
    // grpc-go says ResourceExhausted; tonic's own size check says OutOfRange.
    assert!(
        matches!(
            status.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange
        ),
        "{status:?}"
    );
    assert!(
        status.message().contains("10485760"),
        "names the limit: {status:?}"
    );

    still_serving(&center, "after-big").await;
    assert!(!center.conn_list().await.iter().any(|x| x == "big-plain"));
}

/// Sends raw bytes as `PackagedData` messages over snappy.
async fn raw_transfer(center: &Center, msgs: Vec<Bytes>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(center.agent().await);
    grpc.ready().await.unwrap();
    let res = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(msgs)),
            PathAndQuery::from_static("/grpc.Transfer/Transfer"),
            RawEncodeCodec::<Command>::new(),
        )
        .await;
    match res {
        Err(s) => s,
        Ok(resp) => {
            let mut stream = resp.into_inner();
            loop {
                match tokio::time::timeout(T, stream.message())
                    .await
                    .expect("status in time")
                {
                    Ok(Some(_cmd)) => continue,
                    Ok(None) => panic!("malformed input must not end with OK"),
                    Err(s) => break s,
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_end_the_stream_with_a_clear_status() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    // Field 1 (records) declaring a length far past the end of the message.
    let truncated = Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    // Wire type 7 does not exist.
    let bad_wire = Bytes::from_static(&[0x0f, 0x00]);
    // Valid first packet, garbage second.
    let good: Bytes = packet("mal-2", vec![heartbeat(unix_now())])
        .encode_to_vec()
        .into();
    for (name, msgs) in [
        ("truncated first", vec![truncated.clone()]),
        ("bad wire type first", vec![bad_wire]),
        ("garbage after a good packet", vec![good, truncated]),
    ] {
        let status = raw_transfer(&center, msgs).await;
        eprintln!("{name} -> {:?}: {}", status.code(), status.message());
        assert!(
            matches!(
                status.code(),
                tonic::Code::InvalidArgument | tonic::Code::Internal | tonic::Code::DataLoss
            ),
            "{name}: {status:?}"
        );
        assert!(!status.message().is_empty(), "{name}: clear message");
    }
    let none = PackagedData::default();
    assert!(none.agent_id.is_empty());
    still_serving(&center, "after-malformed").await;
}
