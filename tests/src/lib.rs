//! Shared helpers for the end-to-end tests in `tests/tests/`.
//!
//! # Layout
//! - this file: locating (and building) the real binaries, temp dirs,
//!   starting `elkeid-center` on port 0 and learning its addresses.
//! - further `pub mod` files per area (center driving, agent driving,
//!   plugins), each owned by the tests that need them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod center;
pub mod plugin;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Path of a workspace binary, building its package first (once per process)
/// with the same cargo and profile that runs the tests.
pub fn bin(package: &str, name: &str) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let dir = target_profile_dir();
    let path = dir.join(name);
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", name]);
        if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build -p {package} --bin {name} failed"
        );
        built.push(name.to_string());
    }
    path
}

/// `target/<profile>` of the running test binary (`target/<profile>/deps/x-hash`).
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    wait_for_every(timeout, Duration::from_millis(20), f)
}

/// Polls `f` every `every` until it returns `Some` or `timeout` passes.
pub fn wait_for_every<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `elkeid-center` on 127.0.0.1 port 0 with its own data dir.
#[derive(Debug)]
pub struct Center {
    /// The process.
    pub child: KillOnDrop,
    /// `--data-dir`.
    pub data_dir: PathBuf,
    /// Bound gRPC address, read from `<data-dir>/listen.json`.
    pub grpc: std::net::SocketAddr,
    /// Bound HTTP address, read from `<data-dir>/listen.json`.
    pub http: std::net::SocketAddr,
    /// Plain-HTTP service-discovery address (`--sd-listen`), from
    /// `listen.json`.
    pub sd: Option<std::net::SocketAddr>,
    /// CA that verifies the HTTPS API (`--tls-ca` or the generated
    /// `pki/ca.crt`); `None` when started with `--http-tls false`.
    pub http_ca: Option<PathBuf>,
}

impl Center {
    /// Starts the center with `--data-dir dir --grpc-addr 127.0.0.1:0
    /// --http-addr 127.0.0.1:0` plus `extra` args and waits for `listen.json`.
    pub fn start(dir: &Path, extra: &[&str]) -> Center {
        Center::start_at(dir, "127.0.0.1:0", extra)
    }

    /// Like [`Center::start`] with a fixed gRPC address (e.g. to restart a
    /// center on the port its agents know).
    pub fn start_at(dir: &Path, grpc_addr: &str, extra: &[&str]) -> Center {
        let exe = bin("elkeid-center", "elkeid-center");
        let listen = dir.join("listen.json");
        let _ = std::fs::remove_file(&listen);
        let child = Command::new(exe)
            .arg("--data-dir")
            .arg(dir)
            .args(["--grpc-addr", grpc_addr, "--http-addr", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn elkeid-center");
        let mut child = KillOnDrop(child);
        let v: serde_json::Value = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(st)) = child.0.try_wait() {
                panic!("elkeid-center exited early: {st}");
            }
            let s = std::fs::read_to_string(&listen).ok()?;
            serde_json::from_str(&s).ok()
        })
        .expect("elkeid-center wrote listen.json");
        let addr = |k: &str| {
            v[k].as_str()
                .and_then(|s| s.parse().ok())
                .expect("addr in listen.json")
        };
        let arg = |name: &str| {
            extra
                .windows(2)
                .rev()
                .find(|w| w[0] == name)
                .map(|w| w[1].to_string())
        };
        let plain = arg("--http-tls").is_some_and(|v| v == "false");
        let http_ca = (!plain)
            .then(|| arg("--tls-ca").map_or_else(|| dir.join("pki").join("ca.crt"), PathBuf::from));
        Center {
            grpc: addr("grpc"),
            http: addr("http"),
            sd: v["sd"].as_str().and_then(|s| s.parse().ok()),
            child,
            data_dir: dir.to_path_buf(),
            http_ca,
        }
    }

    /// `<data-dir>/pki/<file>`.
    pub fn pki(&self, file: &str) -> PathBuf {
        self.data_dir.join("pki").join(file)
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, `RssAnon`...),
/// `None` if the process or the field is gone.
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Current Unix time in seconds (the one clock helper of the tests, the
/// test plugins included).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
