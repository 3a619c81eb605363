//! The README's first command: `quickstart` starts a real center, agent and
//! example plugin, shows the agent list, a task round trip through the
//! plugin and every kind of record, then (`--exit-after-demo`) stops both
//! cleanly with SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use elkeid_tests::bin;

#[test]
fn quickstart_shows_the_whole_flow_and_stops_cleanly() {
    for (pkg, name) in [
        ("elkeid-center", "elkeid-center"),
        ("elkeid-agent", "elkeid-agent"),
        ("elkeid-core", "elkeid-example-plugin"),
    ] {
        bin(pkg, name);
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = Command::new(bin("elkeid-tests", "quickstart"))
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--heartbeat-secs", "2", "--exit-after-demo"])
        .current_dir(tmp.path())
        .env_remove("ELKEID_DATA")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}\n{err}");
    // The agent list, from `ctl list`.
    assert!(out.contains("\nAGENT ID "), "{out}");
    assert!(out.contains("1 agent(s) connected"), "{out}");
    // The task round trip.
    assert!(out.contains("task sent: agent "), "{out}");
    assert!(
        out.contains(r#""data":"hello from the quickstart""#),
        "{out}"
    );
    // Every kind of record arrived in this run.
    for line in [
        "agent heartbeat",
        "plugin heartbeat",
        "plugin records",
        "task echo",
    ] {
        assert!(out.lines().any(|l| l.ends_with(line)), "{line}: {out}");
    }
    assert!(out.contains("elkeid-data/records/*.ndjson"), "{out}");
    // Both stopped by SIGTERM, cleanly, agent first.
    let a = out
        .find("elkeid-agent stopped (exit status: 0)")
        .expect(&out);
    let c = out
        .find("elkeid-center stopped (exit status: 0)")
        .expect(&out);
    assert!(a < c, "{out}");
    assert!(tmp.path().join("elkeid-data/records").is_dir());
}
