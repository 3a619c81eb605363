//! Agent + real center + real plugin processes: a plugin installed from a
//! `tar.gz` served over HTTP by config push, its records reaching the
//! center's NDJSON sink, a task round trip, crash -> restart, hostile frame
//! -> kill + restart + 1010, a sha256 mismatch refused, 1001 heartbeats,
//! abnormal state, and removal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use elkeid_tests::plugin::{
    Agent, FileServer, component, field, push_configs, records, send_task, sha256_hex, tar_entry,
    tar_gz, wait_connected,
};
use elkeid_tests::{Center, bin, wait_for};

const T: Duration = Duration::from_secs(60);

fn pid_of_ticks(center: &Center, id: &str, not: &[String]) -> Option<String> {
    records(center, id, 8000)
        .iter()
        .rev()
        .map(|r| field(r, "pid").to_string())
        .find(|p| !p.is_empty() && !not.contains(p))
}

fn log_1010(center: &Center, id: &str, plugin: &str, needle: &str) -> Option<serde_json::Value> {
    records(center, id, 1010)
        .into_iter()
        .find(|r| field(r, "plugin") == plugin && field(r, "msg").contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_lifecycle_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let files = FileServer::start();
    let plugin_bin = std::fs::read(bin("elkeid-core", "elkeid-example-plugin")).unwrap();
    let tgz = tar_gz(&[
        tar_entry("example", b'0', 0o755, &plugin_bin),
        tar_entry("conf/", b'5', 0o755, b""),
        tar_entry("conf/example.yaml", b'0', 0o644, b"level: info\n"),
    ]);
    let url = files.put("/example-1.0.0.tar.gz", tgz.clone());
    let agent = Agent::start(
        &center,
        &tmp.path().join("agent"),
        "e2e-plugin-agent",
        None,
        &[],
    );
    let id = agent.id.clone();
    wait_connected(&center, &id, T).await;

    // Install by config push: a dead URL first, then the real one.
    let example = component(
        "example",
        "1.0.0",
        "tar.gz",
        &sha256_hex(&tgz),
        &sha256_hex(&plugin_bin),
        &[files.url("/missing.tar.gz"), url],
        "interval=200",
    );
    push_configs(&center, &id, vec![example.clone()]).await;
    let pid1 =
        wait_for(T, || pid_of_ticks(&center, &id, &[])).expect("tick records from the plugin");
    let dir = agent.plugin_dir("example");
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o701
    );
    assert_eq!(std::fs::read(dir.join("example")).unwrap(), plugin_bin);
    assert_eq!(
        std::fs::read(dir.join("conf/example.yaml")).unwrap(),
        b"level: info\n"
    );
    assert!(dir.join("example.stderr").exists());
    assert_eq!(
        files.hits()[..2],
        [
            "/missing.tar.gz".to_string(),
            "/example-1.0.0.tar.gz".to_string()
        ]
    );
    // The plugin ran with cwd = its dir and DETAIL as its whole environment
    // (plus the fd 5 flag): it says so on stderr.
    let stderr = wait_for(T, || {
        let s = std::fs::read_to_string(dir.join("example.stderr")).ok()?;
        s.contains("started").then_some(s)
    })
    .unwrap();
    assert!(stderr.contains("interval 200 ms, fd 5 true"), "{stderr}");

    // A task round trip: fd 3 in, fd 5 out (high priority), center sink.
    send_task(&center, &id, "example", 1234, "hello", "tok-1").await;
    let echo = wait_for(T, || {
        records(&center, &id, 6000)
            .into_iter()
            .find(|r| field(r, "token") == "tok-1")
    })
    .expect("task echo record");
    assert_eq!(field(&echo, "data"), "hello");
    assert_eq!(field(&echo, "task_data_type"), "1234");
    assert_eq!(field(&echo, "plugin"), "example");

    // 1001 heartbeat for the plugin, with the task counted (rx) and records (tx).
    let hb = wait_for(T, || {
        records(&center, &id, 1001)
            .into_iter()
            .find(|r| field(r, "name") == "example" && field(r, "pid") == pid1)
    })
    .expect("1001 heartbeat of the plugin");
    assert_eq!(field(&hb, "pversion"), "1.0.0");

    // Crash -> reported (1010 + abnormal) -> restarted with a new pid.
    send_task(&center, &id, "example", 1, "crash", "tok-crash").await;
    let log = wait_for(T, || {
        log_1010(&center, &id, "example", "exited with code 3 unexpectedly")
    })
    .expect("1010 record for the crash");
    assert_eq!(field(&log, "level"), "error");
    let pid2 = wait_for(T, || {
        pid_of_ticks(&center, &id, std::slice::from_ref(&pid1))
    })
    .expect("restarted plugin ticks");
    assert!(!std::path::Path::new(&format!("/proc/{pid1}")).exists());
    // The crashed run's stderr is kept next to the new one.
    let old_stderr = std::fs::read_to_string(dir.join("example.stderr.1")).unwrap();
    assert!(old_stderr.contains("crashing on request"), "{old_stderr}");
    let hb = wait_for(T, || {
        records(&center, &id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state") == "abnormal")
    })
    .expect("abnormal 1000 heartbeat");
    assert!(
        field(&hb, "state_detail").contains("plugin example exited with code 3"),
        "{hb}"
    );

    // Hostile frame (declares 4 GiB) -> killed, 1010, restarted.
    send_task(&center, &id, "example", 1, "hostile", "tok-hostile").await;
    wait_for(T, || {
        log_1010(&center, &id, "example", "frame declares 4294967295 bytes")
    })
    .expect("1010 record for the hostile frame");
    let pid3 = wait_for(T, || {
        pid_of_ticks(&center, &id, &[pid1.clone(), pid2.clone()])
    })
    .expect("restarted again");
    assert!(!std::path::Path::new(&format!("/proc/{pid2}")).exists());

    // A plugin whose download does not match its sha256 is refused: nothing
    // installed or executed, the failure is reported, the others keep running.
    let fake = b"#!/bin/sh\ntouch /tmp/should-never-run\n".to_vec();
    let bad_url = files.put("/bad", fake.clone());
    let bad = component(
        "badsha",
        "1",
        "",
        &sha256_hex(b"something else"),
        "",
        &[bad_url],
        "",
    );
    push_configs(&center, &id, vec![example.clone(), bad]).await;
    let log = wait_for(T, || log_1010(&center, &id, "badsha", "sha256 mismatch"))
        .expect("1010 for the mismatch");
    assert!(
        field(&log, "msg").contains("load plugin badsha failed"),
        "{log}"
    );
    assert!(!agent.plugin_dir("badsha").join("badsha").exists());
    let leftovers: Vec<_> = std::fs::read_dir(agent.plugin_dir("badsha"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        std::path::Path::new(&format!("/proc/{pid3}")).exists(),
        "example kept running"
    );

    // Removal: a list without `example` stops it and deletes its directory.
    let other = component(
        "badsha",
        "2",
        "",
        &sha256_hex(b"x"),
        "",
        &[files.url("/bad")],
        "",
    );
    push_configs(&center, &id, vec![other]).await;
    wait_for(T, || (!dir.exists()).then_some(())).expect("plugin dir removed");
    wait_for(T, || {
        (!std::path::Path::new(&format!("/proc/{pid3}")).exists()).then_some(())
    })
    .expect("plugin process gone");
}
