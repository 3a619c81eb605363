//! One command that runs a center and an agent together on their embedded
//! defaults, on this machine, over real mutual TLS:
//!
//! ```text
//! cargo run -p elkeid-tests --bin quickstart
//! ```
//!
//! It builds both binaries, starts `elkeid-center --data-dir ./elkeid-data`
//! (which generates its development PKI and API key on first start), then
//! `elkeid-agent` with its work dir in `./elkeid-data/agent` and the
//! generated client certificate, and follows the records the center writes
//! to `./elkeid-data/records/`. Ctrl-C stops both (SIGTERM, then waits).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let data = PathBuf::from(std::env::var("ELKEID_DATA").unwrap_or_else(|_| "elkeid-data".into()));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "elkeid-center",
            "-p",
            "elkeid-agent",
            "--manifest-path",
        ])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("cargo build failed".into());
    }
    let bin_dir = profile_dir()?;

    std::fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
    let listen = data.join("listen.json");
    let _ = std::fs::remove_file(&listen);
    println!(
        "quickstart: starting elkeid-center (data dir {})",
        data.display()
    );
    let center = Command::new(bin_dir.join("elkeid-center"))
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--grpc-addr",
            "127.0.0.1:6751",
            "--http-addr",
            "127.0.0.1:6752",
        ])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start elkeid-center: {e}"))?;
    let mut center = Guard(center);
    wait_file(&listen, &mut center.0)?;

    let pki = data.join("pki");
    let work = data.join("agent");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    println!(
        "quickstart: starting elkeid-agent (work dir {})",
        work.display()
    );
    let agent = Command::new(bin_dir.join("elkeid-agent"))
        .arg("--work-dir")
        .arg(&work)
        .args(["--server", "127.0.0.1:6751", "--foreground"])
        .arg("--ca")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("client.crt"))
        .arg("--key")
        .arg(pki.join("client.key"))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start elkeid-agent: {e}"))?;
    let mut agent = Guard(agent);

    println!(
        "quickstart: running. Records: {}/records/*.ndjson  API: https://127.0.0.1:6752 (CA {}/pki/ca.crt, keys in {}/api-keys.toml). Ctrl-C to stop.",
        data.display(),
        data.display(),
        data.display()
    );
    loop {
        std::thread::sleep(Duration::from_millis(200));
        for (name, g) in [("elkeid-center", &mut center), ("elkeid-agent", &mut agent)] {
            if let Ok(Some(st)) = g.0.try_wait() {
                return Err(format!("{name} exited: {st}"));
            }
        }
    }
}

/// `target/<profile>`: the directory this binary was built into.
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "no parent directory for current_exe".into())
}

fn wait_file(path: &Path, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!("elkeid-center exited: {st}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{} did not appear within 30 s", path.display()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Kills (SIGKILL) and reaps the child when dropped, e.g. on Ctrl-C of the
/// process group (the children receive the SIGINT themselves first).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
