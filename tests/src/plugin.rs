//! Helpers for the agent + plugin end-to-end tests (`tests/agent_plugin_*.rs`)
//! and the throughput bench: starting a real agent against a [`Center`], a
//! tiny HTTP file server for plugin artifacts, hand-built `tar.gz` archives,
//! SHA-256, config pushes and tasks through the center's signed HTTP API.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::{Center, KillOnDrop, bin, wait_for};

/// A running `elkeid-agent` connected to a test center.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub child: KillOnDrop,
    /// `--work-dir`.
    pub work_dir: PathBuf,
    /// `SPECIFIED_AGENT_ID`.
    pub id: String,
    /// The executable that was started.
    pub exe: PathBuf,
}

impl Agent {
    /// Starts the workspace agent binary (or `exe`) with `--work-dir
    /// work_dir --server <center grpc> --ca/--cert/--key <center pki>
    /// --heartbeat-secs 2 --foreground` and `SPECIFIED_AGENT_ID=id`.
    pub fn start(
        center: &Center,
        work_dir: &Path,
        id: &str,
        exe: Option<&Path>,
        extra: &[&str],
    ) -> Agent {
        Agent::start_env(center, work_dir, id, exe, extra, &[])
    }

    /// [`Agent::start`] with extra environment variables.
    pub fn start_env(
        center: &Center,
        work_dir: &Path,
        id: &str,
        exe: Option<&Path>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let server = center.grpc.to_string();
        Agent::spawn(center, work_dir, id, exe, ["--server", &server], extra, env)
    }

    /// [`Agent::start`] that knows only the service discovery at `sd`
    /// (`--sd`, no `--server`); `center` provides the PKI.
    pub fn start_via_sd(
        center: &Center,
        work_dir: &Path,
        id: &str,
        sd: &str,
        extra: &[&str],
    ) -> Agent {
        Agent::spawn(center, work_dir, id, None, ["--sd", sd], extra, &[])
    }

    fn spawn(
        center: &Center,
        work_dir: &Path,
        id: &str,
        exe: Option<&Path>,
        route: [&str; 2],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let exe = exe.map_or_else(|| bin("elkeid-agent", "elkeid-agent"), Path::to_path_buf);
        std::fs::create_dir_all(work_dir).unwrap();
        let child = Command::new(&exe)
            .arg("--work-dir")
            .arg(work_dir)
            .args(route)
            .arg("--ca")
            .arg(center.pki("ca.crt"))
            .arg("--cert")
            .arg(center.pki("client.crt"))
            .arg("--key")
            .arg(center.pki("client.key"))
            .args(["--heartbeat-secs", "2", "--foreground"])
            .args(extra)
            .env("SPECIFIED_AGENT_ID", id)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn elkeid-agent");
        Agent {
            child: KillOnDrop(child),
            work_dir: work_dir.to_path_buf(),
            id: id.to_string(),
            exe,
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// `<work-dir>/plugin/<name>`.
    pub fn plugin_dir(&self, name: &str) -> PathBuf {
        self.work_dir.join("plugin").join(name)
    }

    /// Sends SIGTERM and waits (up to `timeout`) for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        wait_for(timeout, || self.child.0.try_wait().ok().flatten())
    }
}

/// A tiny threaded HTTP/1.1 file server on 127.0.0.1 (GET only).
#[derive(Debug, Clone)]
pub struct FileServer {
    /// Bound address.
    pub addr: SocketAddr,
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    hits: Arc<Mutex<Vec<String>>>,
}

impl FileServer {
    /// Starts serving (404 for unknown paths).
    pub fn start() -> FileServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let files: Arc<Mutex<HashMap<String, Vec<u8>>>> = Arc::default();
        let hits: Arc<Mutex<Vec<String>>> = Arc::default();
        let (f, h) = (files.clone(), hits.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let (f, h) = (f.clone(), h.clone());
                std::thread::spawn(move || serve_one(s, &f, &h));
            }
        });
        FileServer { addr, files, hits }
    }

    /// Serves `body` at `path` (e.g. `/p.tar.gz`); returns the full URL.
    pub fn put(&self, path: &str, body: Vec<u8>) -> String {
        self.files.lock().unwrap().insert(path.to_string(), body);
        self.url(path)
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Paths requested so far, in order.
    pub fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

fn serve_one(
    mut s: std::net::TcpStream,
    files: &Mutex<HashMap<String, Vec<u8>>>,
    hits: &Mutex<Vec<String>>,
) {
    let Ok(clone) = s.try_clone() else { return };
    let mut r = BufReader::new(clone);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        match r.read_line(&mut h) {
            Ok(0) | Err(_) => break,
            Ok(_) if h == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let path = line.split(' ').nth(1).unwrap_or("").to_string();
    hits.lock().unwrap().push(path.clone());
    let body = files.lock().unwrap().get(&path).cloned();
    let (status, body) = match body {
        Some(b) => ("200 OK", b),
        None => ("404 Not Found", b"not found".to_vec()),
    };
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(&body);
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(b: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, b)
        .as_ref()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// One ustar entry (`kind` `b'0'` file, `b'5'` dir, `b'2'` symlink, ...),
/// header built by hand from the format.
pub fn tar_entry(name: &str, kind: u8, mode: u32, data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut v = h.to_vec();
    v.extend_from_slice(data);
    v.resize(v.len().div_ceil(512) * 512, 0);
    v
}

/// Gzipped tar of `entries` plus the end-of-archive blocks.
pub fn tar_gz(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut tar: Vec<u8> = entries.concat();
    tar.extend_from_slice(&[0u8; 1024]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// A component config as `POST /command/` spells it.
pub fn component(
    name: &str,
    version: &str,
    kind: &str,
    sha256: &str,
    signature: &str,
    urls: &[String],
    detail: &str,
) -> Value {
    json!({
        "name": name, "type": kind, "version": version, "sha256": sha256,
        "signature": signature, "download_url": urls, "detail": detail,
    })
}

/// Pushes `configs` to agent `id` (signed `POST /command/`).
pub async fn push_configs(center: &Center, id: &str, configs: Vec<Value>) {
    let v = center
        .command(&json!({"agent_id": id, "command": {"config": configs}}))
        .await;
    assert_eq!(v["code"], 0, "{v}");
}

/// Serves the `flood-plugin` test binary from `files` and pushes it to agent
/// `id` as plugin `flood` 1 with `detail` (e.g. `count=1000,size=120`).
pub async fn push_flood(center: &Center, id: &str, files: &FileServer, detail: &str) {
    let flood = std::fs::read(crate::bin("elkeid-tests", "flood-plugin")).unwrap();
    let url = files.put("/flood", flood.clone());
    let sha = sha256_hex(&flood);
    push_configs(
        center,
        id,
        vec![component("flood", "1", "", &sha, "", &[url], detail)],
    )
    .await;
}

/// Sends a task to plugin `name` of agent `id`.
pub async fn send_task(
    center: &Center,
    id: &str,
    name: &str,
    data_type: i32,
    data: &str,
    token: &str,
) {
    let body = json!({"agent_id": id, "command": {"task": {"data_type": data_type, "name": name, "data": data, "token": token}}});
    let v = center.command(&body).await;
    assert_eq!(v["code"], 0, "{v}");
}

/// NDJSON records of agent `id` with `data_type`.
pub fn records(center: &Center, id: &str, data_type: i64) -> Vec<Value> {
    center
        .ndjson_records()
        .into_iter()
        .filter(|r| r["agent_id"] == id && r["data_type"] == data_type)
        .collect()
}

/// Waits until agent `id` is in the center's connection list.
pub async fn wait_connected(center: &Center, id: &str, timeout: Duration) {
    let ok = crate::center::eventually(timeout, || async {
        center
            .conn_list()
            .await
            .iter()
            .any(|c| c == id)
            .then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "agent {id} did not connect within {timeout:?}"
    );
}

/// The value of a `fields` key of an NDJSON record.
pub fn field<'a>(r: &'a Value, key: &str) -> &'a str {
    r["fields"][key].as_str().unwrap_or("")
}

/// `elkeid_center_records_received_total` from `GET /metrics`.
pub async fn center_records_received(center: &Center) -> u64 {
    let r = crate::center::http(center.api_target(), "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8_lossy(&r.body);
    text.lines()
        .find_map(|l| l.strip_prefix("elkeid_center_records_received_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
