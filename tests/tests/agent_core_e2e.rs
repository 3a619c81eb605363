//! The real `elkeid-agent` against the real `elkeid-center` over mTLS:
//! heartbeat fields, reconnect without loss, task 1060, upload round trip,
//! and the thread budget (2 + workers: runtime, log writer, blocking pool).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use elkeid_tests::{Center, KillOnDrop, bin, wait_for};

/// Every field name of spec §3.8, plus our own counters.
const HEARTBEAT_FIELDS: &[&str] = &elkeid_core::schema::heartbeat::KEYS;

const WORKERS: usize = 2;

struct Agent {
    child: KillOnDrop,
    work: PathBuf,
    id: String,
    max_threads: usize,
}

impl Agent {
    fn start(center: &Center, work: &Path, id: &str) -> Agent {
        Self::start_with(center, work, id, &["--server", &center.grpc.to_string()])
    }

    fn start_with(center: &Center, work: &Path, id: &str, servers: &[&str]) -> Agent {
        let exe = bin("elkeid-agent", "elkeid-agent");
        let child = Command::new(exe)
            .arg("--work-dir")
            .arg(work)
            .args(servers)
            .arg("--ca")
            .arg(center.pki("ca.crt"))
            .arg("--cert")
            .arg(center.pki("client.crt"))
            .arg("--key")
            .arg(center.pki("client.key"))
            .args([
                "--heartbeat-secs",
                "1",
                "--log-level",
                "debug",
                "--workers",
                &WORKERS.to_string(),
            ])
            .env("SPECIFIED_AGENT_ID", id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn elkeid-agent");
        Agent {
            child: KillOnDrop(child),
            work: work.to_path_buf(),
            id: id.to_string(),
            max_threads: 0,
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Samples the thread count (kept as a running maximum).
    fn sample_threads(&mut self) {
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{}/task", self.pid())) {
            self.max_threads = self.max_threads.max(rd.count());
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.join("log/elkeid-agent.log")).unwrap_or_default()
    }

    /// This agent's records of `data_type` in the center's NDJSON sink.
    fn records(&self, center: &Center, data_type: i64) -> Vec<serde_json::Value> {
        self.records_in(&center.data_dir, data_type)
    }

    /// Same, from a center data dir (the center may be stopped).
    fn records_in(&self, data_dir: &Path, data_type: i64) -> Vec<serde_json::Value> {
        elkeid_tests::center::ndjson_records_in(data_dir)
            .into_iter()
            .filter(|r| {
                r["agent_id"] == self.id.as_str() && r["data_type"].as_i64() == Some(data_type)
            })
            .collect()
    }

    /// Waits (sampling threads) until `f` holds.
    fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&mut Agent) -> Option<T>,
    ) -> T {
        let r = wait_for(timeout, || {
            self.sample_threads();
            f(self)
        });
        match r {
            Some(v) => v,
            None => panic!("timed out waiting for {what}; agent log:\n{}", self.log()),
        }
    }
}

/// Stops a center gracefully (SIGTERM: its sink flushes) and waits for it.
fn stop_center(mut c: Center) -> (PathBuf, std::net::SocketAddr) {
    let pid = c.child.0.id().to_string();
    let st = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(st.success());
    let _ = c.child.0.wait();
    (c.data_dir.clone(), c.grpc)
}

/// Starts a center on `dir` with a fixed gRPC address.
fn start_center_at(dir: &Path, grpc: std::net::SocketAddr) -> Center {
    Center::start_at(dir, &grpc.to_string(), &[])
}

fn hb_seqs(records: &[serde_json::Value]) -> Vec<u64> {
    let mut v: Vec<u64> = records
        .iter()
        .filter_map(|r| r["fields"]["hb_seq"].as_str().and_then(|s| s.parse().ok()))
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn heartbeat_fields_reconnect_without_loss_and_thread_budget() {
    let cdir = tempfile::tempdir().unwrap();
    let adir = tempfile::tempdir().unwrap();
    let center = Center::start(cdir.path(), &[]);
    let mut agent = Agent::start(&center, adir.path(), "agent-core-hb");

    // The heartbeat built at start-up (before any connection) says
    // net_mode "unknown"; the one sent right after connecting says "private".
    let hb = agent.wait("heartbeat after connect", Duration::from_secs(60), |a| {
        a.records(&center, 1000)
            .into_iter()
            .find(|r| r["fields"]["net_mode"] == "private")
    });
    let fields = hb["fields"].as_object().expect("fields object");
    for name in HEARTBEAT_FIELDS {
        assert!(fields.contains_key(*name), "heartbeat lacks {name}: {hb}");
    }
    assert_eq!(hb["product"], "elkeid-agent");
    assert_eq!(fields["pid"], agent.pid().to_string().as_str());
    assert_eq!(fields["net_mode"], "private");
    assert_eq!(fields["state"], "running");
    assert_eq!(fields["state_detail"], "[]");
    let cpu = fields["cpu"].as_str().unwrap();
    assert_eq!(
        cpu.split_once('.').map(|(_, d)| d.len()),
        Some(8),
        "floats have 8 decimals: {cpu}"
    );
    assert!(fields["rss"].as_str().unwrap().parse::<u64>().unwrap() > 0);
    // The machine-id is persisted in the work dir only when not specified.
    assert!(!adir.path().join("machine-id").exists());

    // Stop the center; heartbeats produced meanwhile stay in the ring.
    let (cdata, grpc) = stop_center(center);
    let before = hb_seqs(&agent.records_in(&cdata, 1000))
        .last()
        .copied()
        .unwrap();
    // Let several heartbeats be produced while no center runs.
    let _ = wait_for(Duration::from_secs(4), || {
        agent.sample_threads();
        None::<()>
    });
    let center = start_center_at(&cdata, grpc);
    let seqs = agent.wait(
        "heartbeats after the restart",
        Duration::from_secs(90),
        |a| {
            let s = hb_seqs(&a.records(&center, 1000));
            // Well past the outage: at least 8 more heartbeats arrived.
            (s.last().copied().unwrap_or(0) > before + 8).then_some(s)
        },
    );
    // Heartbeats produced while the center was down reached the restarted
    // one: no gap in the sequence after the last one the first center got.
    let mut all = hb_seqs(&agent.records(&center, 1000));
    all.dedup();
    let after: Vec<u64> = all.iter().copied().filter(|s| *s > before).collect();
    let max = *seqs.last().unwrap();
    let want: Vec<u64> = (before + 1..=max).collect();
    let missing: Vec<&u64> = want.iter().filter(|s| !after.contains(s)).collect();
    assert!(
        missing.is_empty(),
        "heartbeats lost across the restart: {missing:?} (got {after:?})"
    );
    let last = agent.records(&center, 1000).last().cloned().unwrap();
    assert!(
        last["fields"]["reconnects"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1,
        "{last}"
    );

    // The agent kept its TLS configuration (its session cache) across the
    // reconnect, and the restarted center still knew the ticket keys: the
    // agent's reconnection resumed its TLS session.
    let resumed = tokio::runtime::Runtime::new().unwrap().block_on(
        center.metric("elkeid_center_tls_handshakes_total{listener=\"grpc\",kind=\"resumed\"}"),
    );
    assert!(
        resumed >= 1,
        "resumed handshakes after the restart: {resumed}"
    );

    agent.sample_threads();
    assert!(agent.max_threads >= 1);
    assert!(
        agent.max_threads <= 2 + WORKERS,
        "agent ran {} threads (budget 2 + {WORKERS}: runtime, log writer, blocking pool)",
        agent.max_threads
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_round_trip_then_1060_shuts_down_cleanly() {
    let cdir = tempfile::tempdir().unwrap();
    let adir = tempfile::tempdir().unwrap();
    let center = Center::start(cdir.path(), &[]);
    let mut agent = Agent::start(&center, adir.path(), "agent-core-tasks");
    let id = agent.id.clone();
    let a = tokio::task::block_in_place(|| {
        agent.wait("agent registered", Duration::from_secs(60), |a| {
            a.records(&center, 1000).into_iter().next()
        })
    });
    assert_eq!(a["agent_id"], id.as_str());

    // 1050: a 300 KB file at 200000 bytes/s: two chunks, one per second.
    let file = adir.path().join("upload-me.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let task_data =
        serde_json::json!({"path": file.to_str().unwrap(), "buf_size": 200000}).to_string();
    let cmd = serde_json::json!({
        "agent_id": id,
        "command": {"task": {"data_type": 1050, "name": "elkeid-agent", "data": task_data, "token": "up-token-1"}}
    });
    let v = center.command(&cmd).await;
    assert_eq!(v["code"], 0, "{v}");
    let stored = cdir.path().join("uploads").join("up-token-1");
    tokio::task::block_in_place(|| {
        agent.wait("uploaded file", Duration::from_secs(60), |_| {
            std::fs::read(&stored)
                .ok()
                .filter(|b| b.len() == data.len())
        })
    });
    assert_eq!(std::fs::read(&stored).unwrap(), data);

    // 1050 of a missing file: a 5100 failure record with the token.
    let task_data = serde_json::json!({"path": "/nonexistent/x", "buf_size": 1000}).to_string();
    let cmd = serde_json::json!({
        "agent_id": id,
        "command": {"task": {"data_type": 1050, "name": "elkeid-agent", "data": task_data, "token": "up-token-2"}}
    });
    assert_eq!(center.command(&cmd).await["code"], 0);
    let fail = tokio::task::block_in_place(|| {
        agent.wait("5100 failure", Duration::from_secs(30), |a| {
            a.records(&center, 5100)
                .into_iter()
                .find(|r| r["fields"]["token"] == "up-token-2")
        })
    });
    assert_eq!(fail["fields"]["status"], "failed");
    assert!(
        fail["fields"]["msg"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/x"),
        "{fail}"
    );

    // 1051: idc persisted in the work dir and reported in the next heartbeat.
    let cmd = serde_json::json!({
        "agent_id": id,
        "command": {"task": {"data_type": 1051, "name": "elkeid-agent", "data": "{\"idc\":\"hz-1\"}", "token": "meta-1"}}
    });
    assert_eq!(center.command(&cmd).await["code"], 0);
    tokio::task::block_in_place(|| {
        agent.wait("idc in heartbeat", Duration::from_secs(30), |a| {
            a.records(&center, 1000)
                .into_iter()
                .find(|r| r["fields"]["idc"] == "hz-1")
        })
    });
    let env = std::fs::read_to_string(adir.path().join("specified_env")).unwrap();
    assert!(env.contains("specified_idc = hz-1"), "{env}");

    // 1060: clean exit with status 0.
    let cmd = serde_json::json!({
        "agent_id": id,
        "command": {"task": {"data_type": 1060, "name": "elkeid-agent", "data": "", "token": "bye"}}
    });
    assert_eq!(center.command(&cmd).await["code"], 0);
    let code = tokio::task::block_in_place(|| {
        agent.wait("agent exit", Duration::from_secs(60), |a| {
            a.child.0.try_wait().ok().flatten()
        })
    });
    assert!(
        code.success(),
        "agent exit status {code}; log:\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("ring flushed to the center"),
        "{}",
        agent.log()
    );
    assert!(
        agent.max_threads <= 2 + WORKERS,
        "threads {}",
        agent.max_threads
    );
}

#[test]
fn bad_config_exits_64_naming_the_key() {
    let out = Command::new(bin("elkeid-agent", "elkeid-agent"))
        .args(["--workers", "zero"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("workers"));
    let out = Command::new(bin("elkeid-agent", "elkeid-agent"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("elkeid-agent "));
    let d = tempfile::tempdir().unwrap();
    // No TLS material embedded or given: a start-up error, exit 64.
    let out = Command::new(bin("elkeid-agent", "elkeid-agent"))
        .arg("--work-dir")
        .arg(d.path())
        .args(["--server", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("ca"));
}

#[test]
fn bad_tls_fails_before_touching_the_filesystem_and_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    let wd = d.path().join("work");
    let ca = d.path().join("missing-ca.crt");
    let out = Command::new(bin("elkeid-agent", "elkeid-agent"))
        .arg("--work-dir")
        .arg(&wd)
        .arg("--ca")
        .arg(&ca)
        .arg("--cert")
        .arg(d.path().join("missing.crt"))
        .arg("--key")
        .arg(d.path().join("missing.key"))
        .args(["--server", "127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    // The error names its subject: which PEM and which file.
    assert!(
        err.contains(&format!("cannot read ca {}", ca.display())),
        "{err}"
    );
    // Nothing was created: no work dir, no log directory or file.
    assert!(!wd.exists(), "work dir created before validation: {err}");

    // A present but unusable CA file: named as well, still nothing created.
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let out = Command::new(bin("elkeid-agent", "elkeid-agent"))
        .arg("--work-dir")
        .arg(&wd)
        .arg("--ca")
        .arg(&ca)
        .arg("--cert")
        .arg(&ca)
        .arg("--key")
        .arg(&ca)
        .args(["--server", "127.0.0.1:1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&ca.display().to_string()), "{err}");
    assert!(!wd.exists(), "work dir created before validation: {err}");
}

/// A one-shot-per-connection service-discovery server answering
/// `/registry/detail` with `center`; returns its address and the request
/// lines it saw.
fn fake_sd(
    center: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::io::{BufRead, BufReader, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            seen2.lock().unwrap().push(line.trim().to_string());
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let body = format!(
                r#"{{"code":0,"data":[{{"ip":"{}","port":{},"weight":0}}],"msg":"ok"}}"#,
                center.ip(),
                center.port()
            );
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (addr, seen)
}

#[test]
fn service_discovery_usr1_usr2_then_sigterm_flushes_and_exits_0() {
    let cdir = tempfile::tempdir().unwrap();
    let adir = tempfile::tempdir().unwrap();
    let center = Center::start(cdir.path(), &[]);
    let (sd, seen) = fake_sd(center.grpc);
    let mut agent = Agent::start_with(
        &center,
        adir.path(),
        "agent-core-sd",
        &["--sd", &sd.to_string()],
    );
    let hb = agent.wait(
        "heartbeat via service discovery",
        Duration::from_secs(60),
        |a| {
            a.records(&center, 1000)
                .into_iter()
                .find(|r| r["fields"]["net_mode"] == "sd")
        },
    );
    assert_eq!(hb["agent_id"], "agent-core-sd");
    let lines = seen.lock().unwrap().clone();
    assert!(
        lines
            .iter()
            .any(|l| l == "GET /registry/detail?name=hids_svr_grpc&count=10 HTTP/1.1"),
        "{lines:?}"
    );

    let pid = agent.pid().to_string();
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    };
    // SIGUSR1: debug toggle + state dump in the log; SIGUSR2: release buffers.
    kill("-USR1");
    agent.wait("state dump", Duration::from_secs(30), |a| {
        a.log().contains("state dump").then_some(())
    });
    kill("-USR2");
    agent.wait("SIGUSR2 handled", Duration::from_secs(30), |a| {
        a.log()
            .contains("SIGUSR2: releasing cached buffers")
            .then_some(())
    });
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let code = agent.wait("exit after SIGTERM", Duration::from_secs(60), |a| {
        a.child.0.try_wait().ok().flatten()
    });
    assert!(code.success(), "exit status {code}; log:\n{}", agent.log());
    assert!(
        agent.log().contains("ring flushed to the center"),
        "{}",
        agent.log()
    );
    assert!(
        agent.max_threads <= 2 + WORKERS,
        "threads {}",
        agent.max_threads
    );
}
