//! Which external tools and services the end-to-end tests may use, decided
//! at build time so that a test without them is reported by libtest as
//! `ignored, SKIPPED: <what is missing>` in the normal `cargo test` output
//! (an early `return` would print `ok` and test nothing). With `CI` set
//! every such test runs, and fails when what it needs is missing.
//!
//! - `elkeid_test_kafka`: `ELKEID_TEST_KAFKA` names a broker
//!   (`eval "$(bash tests/kafka-broker.sh start)"`).
//! - `elkeid_test_openssl`: the `openssl` CLI runs (looked up on `PATH`).
//! - `elkeid_test_etcd`: an etcd binary (`ELKEID_TEST_ETCD_BIN`, or `etcd`
//!   on `PATH`; `eval "$(bash tests/etcd.sh start)"`).
//!
//! Cargo re-runs this when those variables (or `PATH`) change; after
//! installing openssl with the same `PATH`, `touch tests/build.rs`.

use std::process::{Command, Stdio};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for var in ["ELKEID_TEST_KAFKA", "ELKEID_TEST_ETCD_BIN", "CI", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(elkeid_test_kafka)");
    println!("cargo::rustc-check-cfg=cfg(elkeid_test_openssl)");
    println!("cargo::rustc-check-cfg=cfg(elkeid_test_etcd)");
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if ci || std::env::var("ELKEID_TEST_KAFKA").is_ok_and(|v| !v.is_empty()) {
        println!("cargo::rustc-cfg=elkeid_test_kafka");
    }
    let openssl = Command::new("openssl")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ci || openssl {
        println!("cargo::rustc-cfg=elkeid_test_openssl");
    }
    let etcd_env = std::env::var_os("ELKEID_TEST_ETCD_BIN").is_some_and(|p| !p.is_empty());
    let etcd_on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("etcd").is_file()));
    if ci || etcd_env || etcd_on_path {
        println!("cargo::rustc-cfg=elkeid_test_etcd");
    }
}
