//! Identity-binding mode (`--agent-identity cert`) with per-agent client
//! certificates issued by `elkeid-center pki issue-agent`, against the real
//! center and real agents (issue 10).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use elkeid_tests::center::{AgentPki, AgentStream, agent_transport, heartbeat, packet, unix_now};
use elkeid_tests::{Center, KillOnDrop, bin, wait_for};

/// Runs `elkeid-center pki issue-agent` for `id`; (exit code, cert, key).
fn issue(data_dir: &Path, id: &str) -> (i32, PathBuf, PathBuf) {
    let out = Command::new(bin("elkeid-center", "elkeid-center"))
        .args(["pki", "issue-agent", "--data-dir"])
        .arg(data_dir)
        .args(["--agent-id", id])
        .output()
        .expect("run elkeid-center pki");
    let agents = data_dir.join("pki/agents");
    (
        out.status.code().unwrap_or(-1),
        agents.join(format!("{id}.crt")),
        agents.join(format!("{id}.key")),
    )
}

fn start_agent(center: &Center, work: &Path, id: &str, cert: &Path, key: &Path) -> KillOnDrop {
    let child = Command::new(bin("elkeid-agent", "elkeid-agent"))
        .arg("--work-dir")
        .arg(work)
        .args([
            "--server",
            &center.grpc.to_string(),
            "--heartbeat-secs",
            "1",
        ])
        .arg("--ca")
        .arg(center.pki("ca.crt"))
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .env("SPECIFIED_AGENT_ID", id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn elkeid-agent");
    KillOnDrop(child)
}

fn pki_of(center: &Center, cert: &Path, key: &Path) -> AgentPki {
    AgentPki {
        ca: std::fs::read(center.pki("ca.crt")).unwrap(),
        identity: Some((std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_agent_certificates_bind_the_agent_id() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &["--agent-identity", "cert"]);
    let (code, cert_a, key_a) = issue(dir.path(), "host-a");
    assert_eq!(code, 0);
    assert!(cert_a.exists() && key_a.exists());
    // Never overwritten.
    let before = std::fs::read(&cert_a).unwrap();
    assert_eq!(issue(dir.path(), "host-a").0, 1);
    assert_eq!(std::fs::read(&cert_a).unwrap(), before);
    assert_eq!(issue(dir.path(), "../x").0, 64);

    // The right agent with its own certificate connects and reports.
    let work = tempfile::tempdir().unwrap();
    let _a = start_agent(&center, work.path(), "host-a", &cert_a, &key_a);
    // The same certificate claiming another id is refused, again and again.
    let work_b = tempfile::tempdir().unwrap();
    let _b = start_agent(&center, work_b.path(), "host-b", &cert_a, &key_a);
    // The shared (Elkeid) client certificate has CN elkeid-agent: refused too.
    let work_c = tempfile::tempdir().unwrap();
    let _c = start_agent(
        &center,
        work_c.path(),
        "host-c",
        &center.pki("client.crt"),
        &center.pki("client.key"),
    );
    let mut seen = Vec::new();
    // Up to 60 s: three agent processes start and dial on a loaded machine.
    for _ in 0..300 {
        seen = center.conn_list().await;
        if seen.contains(&"host-a".to_string())
            && center
                .metric("elkeid_center_identity_mismatches_total")
                .await
                >= 2
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen.contains(&"host-a".to_string()), "{seen:?}");
    assert!(
        wait_for(Duration::from_secs(20), || {
            center
                .ndjson_records()
                .iter()
                .any(|r| r["agent_id"] == "host-a" && r["data_type"] == 1000)
                .then_some(())
        })
        .is_some(),
        "host-a's heartbeat arrives"
    );
    let seen = center.conn_list().await;
    assert_eq!(
        seen,
        vec!["host-a".to_string()],
        "only the bound agent is in"
    );
    assert!(
        center
            .metric("elkeid_center_identity_mismatches_total")
            .await
            >= 2
    );
    assert!(
        !center
            .ndjson_records()
            .iter()
            .any(|r| r["agent_id"] == "host-b" || r["agent_id"] == "host-c"),
        "no record under a refused id"
    );

    // A stream bound to host-x may not send a packet for another agent.
    let (code, cert_x, key_x) = issue(dir.path(), "host-x");
    assert_eq!(code, 0);
    let before = center
        .metric("elkeid_center_identity_mismatches_total")
        .await;
    let t = agent_transport(center.grpc, &pki_of(&center, &cert_x, &key_x))
        .await
        .unwrap();
    let mut s = AgentStream::open(t, packet("host-x", vec![heartbeat(unix_now())]))
        .await
        .expect("host-x with its own certificate");
    s.send_packet(packet("host-a", vec![heartbeat(unix_now())]))
        .await;
    match s.next(Duration::from_secs(10)).await {
        Some(Err(st)) => assert_eq!(st.code(), tonic::Code::PermissionDenied, "{st:?}"),
        other => panic!("expected PERMISSION_DENIED, got {other:?}"),
    }
    // At least this refusal (an agent refused earlier in this test may still
    // be retrying with its wrong certificate and add its own).
    let after = center
        .metric("elkeid_center_identity_mismatches_total")
        .await;
    assert!(after > before, "mismatches {before} -> {after}");
    // ...and a first packet naming another id is refused with the reason.
    let t = agent_transport(center.grpc, &pki_of(&center, &cert_x, &key_x))
        .await
        .unwrap();
    let Err(st) = AgentStream::open(t, packet("host-a", vec![heartbeat(unix_now())])).await else {
        panic!("accepted");
    };
    assert_eq!(st.code(), tonic::Code::PermissionDenied);
    assert!(
        st.message()
            .contains("does not match the client certificate"),
        "{st:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_stays_the_default() {
    // Elkeid compatibility: the shared certificate may speak for any id.
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let mut streams = Vec::new();
    for id in ["one", "two"] {
        streams.push(center.open_stream(id, vec![heartbeat(unix_now())]).await);
    }
    let mut ids = center.conn_list().await;
    ids.sort();
    assert_eq!(ids, vec!["one".to_string(), "two".to_string()]);
}
