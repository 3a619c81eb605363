//! A plugin does not outlive its agent: SIGKILL the agent (no chance to
//! stop its plugins) and the plugin is killed too (parent-death signal),
//! so a restarted agent never runs a second copy next to an orphan.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use elkeid_tests::plugin::{
    Agent, FileServer, component, push_configs, sha256_hex, wait_connected,
};
use elkeid_tests::{Center, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_dies_with_a_killed_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let files = FileServer::start();
    // Ignores EOF on fd 3 (never reads it), so only the parent-death
    // signal can end it.
    let plugin = b"#!/bin/sh\necho $$ > pid.txt\nexec sleep 1000\n".to_vec();
    let url = files.put("/stubborn", plugin.clone());
    let mut agent = Agent::start(
        &center,
        &tmp.path().join("agent"),
        "e2e-orphan-agent",
        None,
        &[],
    );
    let id = agent.id.clone();
    wait_connected(&center, &id, Duration::from_secs(60)).await;
    let cfg = component("stubborn", "1", "", &sha256_hex(&plugin), "", &[url], "");
    push_configs(&center, &id, vec![cfg]).await;
    let pid_file = agent.plugin_dir("stubborn").join("pid.txt");
    let pid = wait_for(Duration::from_secs(60), || {
        let s = std::fs::read_to_string(&pid_file).ok()?;
        s.ends_with('\n').then(|| s.trim().to_string())
    })
    .expect("plugin running");
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    agent.child.0.kill().unwrap();
    agent.child.0.wait().unwrap();
    wait_for(Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for init to reap it.
        (stat.is_empty()
            || stat
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
        .then_some(())
    })
    .expect("plugin killed with its agent");
}
