//! Self-update end to end: an `elkeid-agent` config entry with another
//! version makes a real agent download a new build over HTTP, verify it,
//! rename it over its own executable (keeping `<exe>.old`), shut down
//! gracefully, re-exec, reconnect, and delete `<exe>.old`. A wrong sha256
//! is refused and reported, leaving the binary untouched; so is a new
//! binary that cannot connect to a center (`--probe-connect`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use elkeid_tests::plugin::{
    Agent, FileServer, component, field, push_configs, records, sha256_hex, wait_connected,
};
use elkeid_tests::{Center, bin, wait_for};

const T: Duration = Duration::from_secs(60);

/// A private copy of the agent binary under `dir/bin/` (so an update may
/// rename over it) and the bytes it was made from.
fn agent_copy(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u8>) {
    let exe = dir.join("bin/elkeid-agent");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    let original = std::fs::read(bin("elkeid-agent", "elkeid-agent")).unwrap();
    std::fs::write(&exe, &original).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    (exe, original)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_replaces_binary_and_reexecs() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let files = FileServer::start();

    // The agent runs from its own copy, so renaming over it is harmless.
    let (exe, original) = agent_copy(tmp.path());
    // "A new build": the same program with different bytes (trailing data
    // does not change how an ELF file runs, but changes its sha256).
    let mut new_build = original.clone();
    new_build.extend_from_slice(b"\0elkeid-agent self-update test build\0");
    let url = files.put("/elkeid-agent-9.9.9", new_build.clone());

    let agent = Agent::start(
        &center,
        &tmp.path().join("work"),
        "e2e-update-agent",
        Some(&exe),
        &[],
    );
    let id = agent.id.clone();
    let pid = agent.pid();
    wait_connected(&center, &id, T).await;

    // Wrong sha256: refused, reported, binary untouched.
    let bad = component(
        "elkeid-agent",
        "9.9.9",
        "",
        &"ab".repeat(32),
        "",
        std::slice::from_ref(&url),
        "",
    );
    push_configs(&center, &id, vec![bad]).await;
    let hb = wait_for(T, || {
        records(&center, &id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state_detail").contains("agent update failed"))
    })
    .expect("abnormal heartbeat after the refused update");
    assert!(
        field(&hb, "state_detail").contains("sha256 mismatch"),
        "{hb}"
    );
    assert_eq!(std::fs::read(&exe).unwrap(), original);
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());

    // The real update.
    let good = component(
        "elkeid-agent",
        "9.9.9",
        "",
        &sha256_hex(&new_build),
        "",
        &[url],
        "",
    );
    push_configs(&center, &id, vec![good.clone()]).await;
    wait_for(T, || (std::fs::read(&exe).ok()? == new_build).then_some(()))
        .expect("new binary renamed over the old one");
    // The re-exec'd process (same pid: exec replaces the image) connects
    // again and removes the old binary.
    wait_for(T, || {
        (!tmp.path().join("bin/elkeid-agent.old").exists()).then_some(())
    })
    .expect("<exe>.old removed by the new process");
    wait_connected(&center, &id, T).await;
    let running = std::fs::metadata(format!("/proc/{pid}/exe"))
        .expect("agent still running under the same pid");
    let installed = std::fs::metadata(&exe).unwrap();
    assert_eq!(
        (running.dev(), running.ino()),
        (installed.dev(), installed.ino()),
        "the new file is what runs"
    );
    assert_eq!(installed.permissions().mode() & 0o777, 0o755);

    // The same artifact again (a manager whose version string differs from
    // the compiled one) must not loop: nothing is replaced, no restart.
    push_configs(&center, &id, vec![good]).await;
    let hb = wait_for(T, || {
        records(&center, &id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state_detail").contains("already has sha256"))
    })
    .expect("update skipped and reported");
    assert!(
        field(&hb, "state_detail").contains(&sha256_hex(&new_build)),
        "{hb}"
    );
    let still = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(still.ino(), installed.ino());
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());
}

/// A new binary that passes `--version` but cannot run (it exits 1 for
/// anything else, as a crash after start-up would) is never swapped in:
/// it must connect to a center with the agent's own arguments
/// (`--probe-connect`) first. The running agent stays, still connected,
/// and reports the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_to_a_binary_that_cannot_connect_keeps_the_running_version() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let files = FileServer::start();
    let (exe, original) = agent_copy(tmp.path());
    let crasher = b"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'elkeid-agent 9.9.9'; exit 0; fi\necho crashed >&2\nexit 1\n".to_vec();
    let url = files.put("/elkeid-agent-crasher", crasher.clone());

    let agent = Agent::start(
        &center,
        &tmp.path().join("work"),
        "e2e-crasher-agent",
        Some(&exe),
        &[],
    );
    let id = agent.id.clone();
    let pid = agent.pid();
    wait_connected(&center, &id, T).await;
    let c = component(
        "elkeid-agent",
        "9.9.9",
        "",
        &sha256_hex(&crasher),
        "",
        &[url],
        "",
    );
    push_configs(&center, &id, vec![c]).await;
    let hb = wait_for(T, || {
        records(&center, &id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state_detail").contains("agent update failed"))
    })
    .expect("abnormal heartbeat after the refused update");
    assert!(
        field(&hb, "state_detail").contains("did not connect"),
        "{hb}"
    );
    assert_eq!(std::fs::read(&exe).unwrap(), original, "binary untouched");
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());
    let dir: Vec<_> = std::fs::read_dir(exe.parent().unwrap()).unwrap().collect();
    assert_eq!(dir.len(), 1, "no staged binary left next to the executable");
    // Same process, still connected and reporting.
    let running = std::fs::metadata(format!("/proc/{pid}/exe")).expect("agent still running");
    let installed = std::fs::metadata(&exe).unwrap();
    assert_eq!(running.ino(), installed.ino());
    let before = records(&center, &id, 1000).len();
    wait_for(T, || {
        (records(&center, &id, 1000).len() > before).then_some(())
    })
    .expect("heartbeats keep arriving");
}
