//! Which external tools and services the end-to-end tests may use, decided
//! at build time so that a test without them is reported by libtest as
//! `ignored, SKIPPED: <what is missing>` in the normal `cargo test` output
//! (an early `return` would print `ok` and test nothing). With `CI` set
//! every such test runs, and fails when what it needs is missing.
//!
//! - `elkeid_test_kafka`: `ELKEID_TEST_KAFKA` names a broker
//!   (`eval "$(bash tests/kafka-broker.sh start)"`).
//! - `elkeid_test_openssl`: the `openssl` CLI runs (looked up on `PATH`).
//!
//! Cargo re-runs this when those variables (or `PATH`) change; after
//! installing openssl with the same `PATH`, `touch tests/build.rs`.

use std::process::{Command, Stdio};

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for var in ["ELKEID_TEST_KAFKA", "CI", "PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(elkeid_test_kafka)");
    println!("cargo::rustc-check-cfg=cfg(elkeid_test_openssl)");
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
}
