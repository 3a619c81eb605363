//! Test-only build configuration: which external services the Kafka sink
//! tests may use. libtest decides "ignored" at compile time, so a test that
//! needs a broker is marked `#[ignore = "SKIPPED: …"]` when none was named
//! at build time: the skip then shows in the normal `cargo test` output
//! ("… ignored, SKIPPED: …") and in its summary, instead of an `ok` that
//! tested nothing. With `CI` set the tests always run (and fail without a
//! broker). Cargo rebuilds when any of these variables changes.

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    for var in ["ELKEID_TEST_KAFKA", "ELKEID_TEST_TANSU", "CI"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    println!("cargo::rustc-check-cfg=cfg(elkeid_test_kafka)");
    println!("cargo::rustc-check-cfg=cfg(elkeid_test_tansu)");
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty());
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    if ci || set("ELKEID_TEST_KAFKA") {
        println!("cargo::rustc-cfg=elkeid_test_kafka");
    }
    if ci || set("ELKEID_TEST_TANSU") {
        println!("cargo::rustc-cfg=elkeid_test_tansu");
    }
}
