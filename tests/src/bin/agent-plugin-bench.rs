//! `agent-plugin-bench`: whole-system plugin throughput.
//!
//! `flood-plugin` (N records of ~200 bytes as fast as its pipe takes them)
//! -> `elkeid-agent` (one runtime thread) -> `elkeid-center --sink null`,
//! all real processes over real mTLS. Reports records/s delivered (counted
//! by the center), loss (must be 0), agent CPU (fraction of one core) and
//! RSS.
//!
//! ```sh
//! cargo build --release -p elkeid-agent -p elkeid-center -p elkeid-tests \
//!   --bin elkeid-agent --bin elkeid-center --bin flood-plugin --bin agent-plugin-bench
//! target/release/agent-plugin-bench --records 2000000
//! ```
//! Binaries are taken from the bench's own directory unless `--agent`,
//! `--center`, `--flood` are given.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use elkeid_tests::center::{http, signed_headers, unix_now};
use elkeid_tests::plugin::{FileServer, component, sha256_hex};
use elkeid_tests::{KillOnDrop, proc_status_kb};

#[derive(Parser, Debug)]
struct Args {
    /// Records the plugin writes.
    #[arg(long, default_value_t = 2_000_000)]
    records: u64,
    /// Frame body size of each record.
    #[arg(long, default_value_t = 200)]
    size: usize,
    /// Agent binary.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Center binary.
    #[arg(long)]
    center: Option<PathBuf>,
    /// Flood plugin binary.
    #[arg(long)]
    flood: Option<PathBuf>,
    /// The center's sink: `null` (counts only), `ndjson` (written and
    /// fdatasync'd before each acknowledgement) or `kafka` (the center
    /// inherits this process's environment: set `ELKEID_CENTER_KAFKA_BROKERS`
    /// and `ELKEID_CENTER_KAFKA_TOPIC`).
    #[arg(long, default_value = "null")]
    center_sink: String,
    /// The agent's ring byte budget (`--ring-bytes`); the agent's own
    /// default (8 MiB) when not given. The OpenWrt low-memory profile uses
    /// 1048576.
    #[arg(long)]
    ring_bytes: Option<u64>,
    /// The agent's blocking-pool size (`--workers`); the agent's default
    /// when not given (OpenWrt: 1).
    #[arg(long)]
    workers: Option<u32>,
    /// The agent's unacknowledged-window bound (`--unacked-bytes`); the
    /// agent's default (16 MiB) when not given (OpenWrt: 2097152).
    #[arg(long)]
    unacked_bytes: Option<u64>,
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let r = http(addr, "GET", "/metrics", &[], b"").await;
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .join(name)
}

fn proc_stat(pid: u32) -> (u64, u64) {
    // (utime + stime ticks, VmHWM kB)
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let hwm = proc_status_kb(pid, "VmHWM").unwrap_or(0);
    (ticks, hwm)
}

async fn received(addr: std::net::SocketAddr) -> u64 {
    let r = http(addr, "GET", "/metrics", &[], b"").await;
    String::from_utf8_lossy(&r.body)
        .lines()
        .find_map(|l| l.strip_prefix("elkeid_center_records_received_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let agent_bin = args.agent.unwrap_or_else(|| sibling("elkeid-agent"));
    let center_bin = args.center.unwrap_or_else(|| sibling("elkeid-center"));
    let flood_bin = args.flood.unwrap_or_else(|| sibling("flood-plugin"));
    let tmp = tempfile::tempdir().unwrap();
    let cdir = tmp.path().join("center");
    std::fs::create_dir_all(&cdir).unwrap();

    let center = KillOnDrop(
        Command::new(&center_bin)
            .arg("--data-dir")
            .arg(&cdir)
            .args([
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--sink",
                args.center_sink.as_str(),
                // The bench reads /metrics on loopback: plain HTTP (the
                // center warns; HTTPS stays the default everywhere else).
                "--http-tls",
                "false",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start center"),
    );
    let listen: serde_json::Value = elkeid_tests::wait_for(Duration::from_secs(30), || {
        serde_json::from_str(&std::fs::read_to_string(cdir.join("listen.json")).ok()?).ok()
    })
    .expect("center listen.json");
    let addr = |k: &str| -> std::net::SocketAddr { listen[k].as_str().unwrap().parse().unwrap() };
    let (grpc, api) = (addr("grpc"), addr("http"));

    let files = FileServer::start();
    let flood = std::fs::read(&flood_bin).expect("read flood-plugin");
    let url = files.put("/flood", flood.clone());

    let wd = tmp.path().join("agent");
    std::fs::create_dir_all(&wd).unwrap();
    let mut agent_cmd = Command::new(&agent_bin);
    if let Some(b) = args.ring_bytes {
        agent_cmd.args(["--ring-bytes", &b.to_string()]);
    }
    if let Some(w) = args.workers {
        agent_cmd.args(["--workers", &w.to_string()]);
    }
    if let Some(b) = args.unacked_bytes {
        agent_cmd.args(["--unacked-bytes", &b.to_string()]);
    }
    let agent = KillOnDrop(
        agent_cmd
            .arg("--work-dir")
            .arg(&wd)
            .arg("--server")
            .arg(grpc.to_string())
            .arg("--ca")
            .arg(cdir.join("pki/ca.crt"))
            .arg("--cert")
            .arg(cdir.join("pki/client.crt"))
            .arg("--key")
            .arg(cdir.join("pki/client.key"))
            .args(["--heartbeat-secs", "3600"])
            .env("SPECIFIED_AGENT_ID", "bench-agent")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start agent"),
    );
    let apid = agent.0.id();
    // Connected once the first heartbeat (1000) is counted.
    let t = Instant::now();
    while received(api).await == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let base = received(api).await;

    let text = std::fs::read_to_string(cdir.join("api-keys.toml")).unwrap();
    let keys: toml::Table = toml::from_str(&text).unwrap();
    let (ak, sk) = keys["aksk"].as_table().unwrap().iter().next().unwrap();
    let detail = format!("count={},size={}", args.records, args.size);
    let cfg = component("flood", "1", "", &sha256_hex(&flood), "", &[url], &detail);
    let body = serde_json::to_vec(
        &serde_json::json!({"agent_id": "bench-agent", "command": {"config": [cfg]}}),
    )
    .unwrap();
    let headers = signed_headers(
        ak,
        sk.as_str().unwrap(),
        "POST",
        "/command/",
        &body,
        unix_now(),
    );
    let r = http(api, "POST", "/command/", &headers, &body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let (cpu_push, _) = proc_stat(apid);
    let cpid = center.0.id();
    let (ccpu_push, _) = proc_stat(cpid);
    let push_at = Instant::now();
    let want = base + args.records + 1;
    let (mut t0, mut cpu0) = (None, 0u64);
    let start = Instant::now();
    let last;
    loop {
        let n = received(api).await;
        if t0.is_none() && n > base {
            t0 = Some(Instant::now());
            cpu0 = proc_stat(apid).0;
        }
        if n >= want {
            last = n;
            break;
        }
        if start.elapsed() > Duration::from_secs(600) {
            last = n;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t1 = Instant::now();
    let (cpu1, hwm) = proc_stat(apid);
    let (ccpu1, _) = proc_stat(cpid);
    let t0 = t0.unwrap_or(t1);
    let secs = (t1 - t0).as_secs_f64().max(1e-9);
    let delivered = last - base;
    let hz = 100.0;
    let cpu = (cpu1 - cpu0) as f64 / hz / secs;
    let total_secs = (t1 - push_at).as_secs_f64();
    let cpu_total = (cpu1 - cpu_push) as f64 / hz;
    let threads = std::fs::read_dir(format!("/proc/{apid}/task")).map_or(0, |d| d.count());
    // The agent releases its ring's pages about a second after the ring
    // went empty: its RSS once the flood is over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = proc_status_kb(apid, "VmRSS").unwrap_or(0);
    println!(
        "records written by the plugin : {} (+1 end marker), {}-byte frame bodies",
        args.records, args.size
    );
    println!(
        "records delivered to the center: {delivered} (expected {})",
        args.records + 1
    );
    println!(
        "lost                           : {}",
        (args.records + 1).saturating_sub(delivered)
    );
    println!("elapsed (first to last record) : {secs:.3} s");
    println!(
        "throughput                     : {:.0} records/s",
        args.records as f64 / secs
    );
    println!("agent CPU                      : {:.2} cores", cpu);
    println!(
        "from config push (download, spawn, flood, delivery): {total_secs:.3} s, {:.0} records/s, agent CPU {cpu_total:.2} s = {:.2} us/record",
        args.records as f64 / total_secs,
        cpu_total * 1e6 / args.records as f64
    );
    println!(
        "agent peak RSS (VmHWM)         : {:.1} MiB",
        hwm as f64 / 1024.0
    );
    println!("agent threads                  : {threads}");
    println!(
        "agent RSS 3 s after the flood   : {:.1} MiB",
        rss_after as f64 / 1024.0
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "agent default".to_string(), |b| b.to_string());
    println!(
        "agent ring bytes / unacked bytes / workers: {} / {} / {}",
        opt(args.ring_bytes),
        opt(args.unacked_bytes),
        opt(args.workers.map(u64::from))
    );
    let ccpu = (ccpu1 - ccpu_push) as f64 / hz;
    println!(
        "center ({} sink) CPU from config push: {ccpu:.2} s = {:.2} us/record",
        args.center_sink,
        ccpu * 1e6 / args.records as f64
    );
    let acks = metric(api, "elkeid_center_acks_sent_total").await;
    let syncs = metric(api, "elkeid_center_ndjson_sync_seconds_count").await;
    let sync_sum = metric(api, "elkeid_center_ndjson_sync_seconds_sum").await;
    let sync_max = metric(api, "elkeid_center_ndjson_sync_seconds_max").await;
    let dups = metric(api, "elkeid_center_duplicate_records_dropped_total").await;
    println!(
        "acks sent {acks:.0}; ndjson group commits {syncs:.0}, mean fdatasync {:.2} ms, max {:.2} ms; duplicates dropped {dups:.0}",
        if syncs > 0.0 {
            sync_sum / syncs * 1e3
        } else {
            0.0
        },
        sync_max * 1e3
    );
    drop(center);
    drop(agent);
}
