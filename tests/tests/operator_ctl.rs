//! `elkeid-center ctl` end to end: a real center (HTTPS API, then plain
//! HTTP), a real agent, a real plugin installed by `ctl config`, a task round
//! trip through `ctl task`, `ctl reset`, tables and `--json`, and the errors
//! an operator meets (unknown agent, wrong key, refused 1060).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use elkeid_tests::center::ndjson_records_in;
use elkeid_tests::plugin::{Agent, FileServer, component, sha256_hex};
use elkeid_tests::{Center, bin, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// `elkeid-center ctl --data-dir DIR ARGS…`.
fn ctl(dir: &Path, args: &[&str]) -> Out {
    let o = Command::new(bin("elkeid-center", "elkeid-center"))
        .arg("ctl")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .env_remove("ELKEID_CENTER_DATA_DIR")
        .env_remove("ELKEID_CTL_URL")
        .output()
        .expect("run elkeid-center ctl");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = ctl(dir, args);
    assert_eq!(o.code, 0, "ctl {args:?}: {}{}", o.stdout, o.stderr);
    o.stdout
}

fn json(dir: &Path, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let s = ok(dir, &a);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("ctl {args:?}: not JSON ({e}): {s}"))
}

fn connected(dir: &Path, id: &str) -> bool {
    json(dir, &["list"])
        .as_array()
        .is_some_and(|a| a.iter().any(|v| v == id))
}

#[test]
fn ctl_drives_a_real_agent_over_https() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("center");
    let center = Center::start(&dir, &["--http-tls", "true"]);
    let id = "ctl-e2e-agent";
    let mut agent = Agent::start(&center, &tmp.path().join("agent"), id, None, &[]);
    assert!(
        wait_for(T, || connected(&dir, id).then_some(())).is_some(),
        "agent never listed by ctl"
    );

    // list / count / stat: tables by default, --json for scripts.
    let table = ok(&dir, &["list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("AGENT ID"), "{table}");
    assert!(lines.iter().any(|l| l.starts_with(id)), "{table}");
    assert!(table.ends_with("1 agent(s) connected\n"), "{table}");
    assert_eq!(json(&dir, &["count"]), 1);
    let stat = json(&dir, &["stat", id]);
    assert_eq!(stat[0]["agent_info"]["agent_id"], id, "{stat}");
    assert_eq!(stat[0]["agent_info"]["product"], "elkeid-agent", "{stat}");

    // config: install the example plugin (bare binary served over HTTP).
    let files = FileServer::start();
    let plugin = std::fs::read(bin("elkeid-core", "elkeid-example-plugin")).unwrap();
    let sum = sha256_hex(&plugin);
    let url = files.put("/example", plugin);
    let cfg = tmp.path().join("plugins.json");
    let list = serde_json::json!([component(
        "example",
        "1.0.0",
        "bin",
        &sum,
        &sum,
        &[url],
        "interval=200"
    )]);
    std::fs::write(&cfg, list.to_string()).unwrap();
    let out = ok(&dir, &["config", id, "--file", cfg.to_str().unwrap()]);
    assert_eq!(out, format!("config sent: agent {id}, 1 component(s)\n"));
    let records = |dt: i64| -> Vec<Value> {
        ndjson_records_in(&dir)
            .into_iter()
            .filter(|r| r["agent_id"] == id && r["data_type"] == dt)
            .collect()
    };
    assert!(
        wait_for(T, || (!records(8000).is_empty()).then_some(())).is_some(),
        "no plugin records after ctl config"
    );
    // The plugin shows up in stat once its 1001 arrives (heartbeat every 2 s).
    assert!(
        wait_for(T, || {
            let s = ok(&dir, &["stat", id]);
            s.lines()
                .any(|l| l.trim_start().starts_with("example  1.0.0"))
                .then_some(s)
        })
        .is_some(),
        "stat never showed the plugin"
    );

    // task: a round trip through the plugin, found by its token.
    let out = ok(
        &dir,
        &[
            "task",
            id,
            "--plugin",
            "example",
            "--data-type",
            "8001",
            "--data",
            "hello",
            "--token",
            "ctl-tk-1",
        ],
    );
    assert_eq!(
        out,
        format!("task sent: agent {id}, plugin example, data_type 8001, token ctl-tk-1\n")
    );
    let echo = wait_for(T, || {
        records(6000)
            .into_iter()
            .find(|r| r["fields"]["token"] == "ctl-tk-1")
    })
    .expect("task echo record");
    assert_eq!(echo["fields"]["data"], "hello");
    // A generated token is printed, and --json says what was sent.
    let v = json(
        &dir,
        &["task", id, "--plugin", "example", "--data-type", "8001"],
    );
    assert!(
        v["task"]["token"]
            .as_str()
            .is_some_and(|t| t.starts_with("ctl-")),
        "{v}"
    );

    // 1060 to the agent is refused without --yes; the agent keeps running.
    let o = ctl(
        &dir,
        &[
            "task",
            id,
            "--plugin",
            "elkeid-agent",
            "--data-type",
            "1060",
        ],
    );
    assert_eq!(o.code, 64, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("--yes"), "{}", o.stderr);
    assert!(agent.child.0.try_wait().unwrap().is_none());

    // Errors name their subject and exit 1.
    let o = ctl(
        &dir,
        &["task", "no-such-agent", "--plugin", "x", "--data-type", "1"],
    );
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(
        o.stderr.contains("/command/") && o.stderr.contains("agentID not found"),
        "{}",
        o.stderr
    );
    let badkeys = tmp.path().join("bad-keys.toml");
    std::fs::write(&badkeys, "[aksk]\nnobody = \"x\"\n").unwrap();
    let o = ctl(&dir, &["--api-keys", badkeys.to_str().unwrap(), "count"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("auth failed"), "{}", o.stderr);
    let o = ctl(&dir, &["--ca", "/nonexistent/ca.crt", "count"]);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("/nonexistent/ca.crt"), "{}", o.stderr);

    // reset: the connection is closed, the agent reconnects.
    let before = json(&dir, &["stat", id])[0]["agent_info"]["create_at"].clone();
    let out = ok(&dir, &["reset", id]);
    assert!(
        out.lines()
            .any(|l| l.starts_with(id) && l.trim_end().ends_with("ok")),
        "{out}"
    );
    assert!(out.ends_with("1 connection(s) reset\n"), "{out}");
    let o = ok(&dir, &["reset", "gone-agent"]);
    assert!(o.contains("agentID not found"), "{o}");
    assert!(
        wait_for(T, || {
            let s = ctl(&dir, &["--json", "stat", id]);
            let v: Value = serde_json::from_str(&s.stdout).ok()?;
            let at = v[0]["agent_info"]["create_at"].clone();
            (s.code == 0 && !at.is_null() && at != before).then_some(())
        })
        .is_some(),
        "agent did not reconnect after ctl reset"
    );

    // drain: refused without --yes; then the agent's stream ends and it
    // cannot come back (a drained center refuses new streams).
    let o = ctl(&dir, &["drain"]);
    assert_eq!(o.code, 64, "{}{}", o.stdout, o.stderr);
    assert!(o.stderr.contains("--yes"), "{}", o.stderr);
    assert!(connected(&dir, id), "nothing happened without --yes");
    let out = ok(&dir, &["drain", "--yes"]);
    assert_eq!(
        out, "draining: 1 agent stream(s) closed, not in etcd\n",
        "{out}"
    );
    // The agent comes back (its reconnect backoff is about a second) and is
    // refused: wait for that refusal instead of a fixed time.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = || rt.block_on(center.metric("elkeid_center_conn_refused_draining_total"));
    assert!(
        wait_for(T, || (refused() >= 1).then_some(())).is_some(),
        "the agent never came back to the drained center"
    );
    assert!(!connected(&dir, id), "a drained center takes no agent back");
    let v = json(&dir, &["drain", "--yes"]);
    assert_eq!(v["was_draining"], true, "{v}");
    agent.terminate(Duration::from_secs(20));
    drop(center);
}

#[test]
fn ctl_speaks_plain_http_and_explicit_urls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("center");
    let center = Center::start(&dir, &["--http-tls", "false"]);
    let id = "ctl-plain-agent";
    let _agent = Agent::start(&center, &tmp.path().join("agent"), id, None, &[]);
    assert!(
        wait_for(T, || connected(&dir, id).then_some(())).is_some(),
        "agent never listed over plain HTTP"
    );
    // An explicit http:// URL, and an explicit https:// one that must fail
    // (no silent downgrade when the operator asked for TLS).
    let url = format!("http://{}", center.http);
    assert_eq!(json(&dir, &["--url", &url, "count"]), 1);
    let o = ctl(
        &dir,
        &["--url", &format!("https://{}", center.http), "count"],
    );
    assert_eq!(o.code, 1, "{}", o.stdout);
    assert!(o.stderr.contains("TLS"), "{}", o.stderr);
    // --help names the subcommands and the center's --help points at ctl.
    let o = ctl(&dir, &["--help"]);
    assert_eq!(o.code, 0);
    for sub in ["list", "count", "stat", "task", "config", "reset", "--json"] {
        assert!(o.stdout.contains(sub), "{sub}: {}", o.stdout);
    }
    let help = Command::new(bin("elkeid-center", "elkeid-center"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("elkeid-center ctl"));
}
