//! Embeds optional build-time material:
//! - `ELKEID_AGENT_CA`, `ELKEID_AGENT_CERT`, `ELKEID_AGENT_KEY`: paths to PEM
//!   files copied into the binary as the default TLS material;
//! - `ELKEID_AGENT_SERVER` (comma-separated `host:port`, the default private
//!   list), `ELKEID_AGENT_VERSION` (version on the wire) are read with
//!   `option_env!` in `config.rs`.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    for (var, file) in [
        ("ELKEID_AGENT_CA", "ca.pem"),
        ("ELKEID_AGENT_CERT", "cert.pem"),
        ("ELKEID_AGENT_KEY", "key.pem"),
    ] {
        println!("cargo:rerun-if-env-changed={var}");
        let data = match std::env::var_os(var) {
            Some(p) if !p.is_empty() => {
                println!("cargo:rerun-if-changed={}", PathBuf::from(&p).display());
                match std::fs::read(&p) {
                    Ok(d) => d,
                    Err(e) => {
                        println!("cargo:warning={var}={}: {e}", PathBuf::from(&p).display());
                        std::process::exit(1);
                    }
                }
            }
            _ => Vec::new(),
        };
        if let Err(e) = std::fs::write(out.join(file), data) {
            println!("cargo:warning=cannot write {file}: {e}");
            std::process::exit(1);
        }
    }
    println!("cargo:rerun-if-env-changed=ELKEID_AGENT_SERVER");
    println!("cargo:rerun-if-env-changed=ELKEID_AGENT_VERSION");
}
