//! `elkeid-agent status` end to end: a real agent connected to a real
//! center, running the example plugin, reports its connection, plugin and
//! ring from `<work-dir>/status.json`; once the agent is gone, `status` says
//! so and exits 1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use elkeid_tests::plugin::{Agent, FileServer, component, push_configs, sha256_hex};
use elkeid_tests::{Center, bin, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn status(work: &Path, json: bool) -> (i32, String, String) {
    let mut c = Command::new(bin("elkeid-agent", "elkeid-agent"));
    c.arg("status").arg("--work-dir").arg(work);
    if json {
        c.arg("--json");
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_the_running_agent_and_its_absence() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let work = tmp.path().join("agent");
    // Before the agent ever ran: a clear error naming the file.
    let (code, _, err) = status(&work, false);
    assert_eq!(code, 1);
    assert!(err.contains("status.json"), "{err}");

    let mut agent = Agent::start(&center, &work, "status-agent", None, &[]);
    elkeid_tests::plugin::wait_connected(&center, "status-agent", T).await;
    let files = FileServer::start();
    let plugin = std::fs::read(bin("elkeid-core", "elkeid-example-plugin")).unwrap();
    let sum = sha256_hex(&plugin);
    let url = files.put("/p", plugin);
    push_configs(
        &center,
        "status-agent",
        vec![component(
            "example",
            "1.0.0",
            "bin",
            &sum,
            &sum,
            &[url],
            "interval=100",
        )],
    )
    .await;

    let v: Value = wait_for(T, || {
        let (code, out, _) = status(&work, true);
        let v: Value = serde_json::from_str(&out).ok()?;
        (code == 0 && v["status"]["plugins"][0]["pid"].is_u64()).then_some(v)
    })
    .expect("status shows the running plugin");
    assert_eq!(v["running"], true);
    let s = &v["status"];
    assert_eq!(s["pid"], agent.pid());
    assert_eq!(s["agent_id"], "status-agent");
    assert_eq!(s["connection"]["connected"], true);
    assert_eq!(s["connection"]["server"], center.grpc.to_string());
    assert_eq!(s["ring"]["capacity"], 2048);
    assert_eq!(s["plugins"][0]["name"], "example");
    assert_eq!(s["plugins"][0]["version"], "1.0.0");
    let mode = std::fs::metadata(work.join("status.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "status.json is root-only: {mode:o}");

    // The human report, with a records/s figure once the plugin has ticked.
    let (code, out, _) = status(&work, false);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("connected to {} since", center.grpc)),
        "{out}"
    );
    assert!(out.contains("reconnects  0"), "{out}");
    assert!(out.contains("/2048 records"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("example  1.0.0")),
        "{out}"
    );

    // The agent gone: status says so, exit 1.
    agent
        .terminate(Duration::from_secs(20))
        .expect("agent exits");
    let (code, out, _) = status(&work, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not running"), "{out}");
}
