//! The real `elkeid-center` binary as an operator meets it: no colour codes
//! into a pipe, errors that name what the user set, `--help` with defaults.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use elkeid_tests::{KillOnDrop, bin, wait_for};

fn center() -> Command {
    let mut c = Command::new(bin("elkeid-center", "elkeid-center"));
    // Only what each test sets: no inherited ELKEID_CENTER_* from the caller.
    for (k, _) in std::env::vars() {
        if k.starts_with("ELKEID_CENTER_") || k == "NO_COLOR" {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> Output {
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn logs_into_a_pipe_have_no_ansi_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = KillOnDrop(
        center()
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let listen = dir.path().join("listen.json");
    wait_for(Duration::from_secs(60), || listen.exists().then_some(())).expect("center started");
    // SIGTERM: a clean stop logs "stopped" and closes stderr.
    let pid = child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut err = Vec::new();
    child
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut err)
        .unwrap();
    let text = String::from_utf8_lossy(&err);
    assert!(text.contains("elkeid-center started"), "{text}");
    assert!(text.contains("elkeid-center stopped"), "{text}");
    assert!(!err.contains(&0x1b), "ESC byte in piped stderr: {text:?}");
}

#[test]
fn a_bad_env_value_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(center()
        .arg("--data-dir")
        .arg(dir.path())
        .env("ELKEID_CENTER_CONN_LIMIT", "abc"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("environment variable ELKEID_CENTER_CONN_LIMIT"),
        "{err}"
    );
    assert!(err.contains("`abc` is not a valid number"), "{err}");

    // The same value as a flag names the flag.
    let out = run(center()
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--conn-limit", "0"]));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("flag --conn-limit"), "{err}");

    // From the file: the file key.
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[grpc]\nconn_limit = 0\n").unwrap();
    let out = run(center()
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--config")
        .arg(&cfg));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("key `grpc.conn_limit`"), "{err}");
    assert!(
        !err.contains("flag") && !err.contains("environment"),
        "{err}"
    );

    // Checked by a sink after loading: still the variable.
    let out = run(center()
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .env("ELKEID_CENTER_SINK", "kafka")
        .env("ELKEID_CENTER_KAFKA_COMPRESSION", "brotli"));
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("environment variable ELKEID_CENTER_KAFKA_COMPRESSION"),
        "{err}"
    );
}

#[test]
fn a_missing_tls_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.crt");
    let out = run(center()
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .arg("--tls-ca")
        .arg(&missing)
        .arg("--tls-cert")
        .arg(dir.path().join("no-such.crt"))
        .arg("--tls-key")
        .arg(dir.path().join("no-such.key")));
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*missing.to_string_lossy()), "{err}");
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn help_shows_defaults() {
    let out = run(center().arg("--help"));
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for want in [
        "[default: 10000]",
        "[default: 0.0.0.0:6751]",
        "[default: 0.0.0.0:6752]",
        "[default: ./elkeid-data]",
        "[default: ndjson]",
        "[default: hids_svr]",
        "[env: ELKEID_CENTER_CONN_LIMIT=",
    ] {
        assert!(help.contains(want), "--help lacks {want}:\n{help}");
    }
}
