//! Load generator for `elkeid-center`: N simulated agents, each on its own
//! mutual-TLS connection speaking the agent side of `/grpc.Transfer/Transfer`
//! (snappy by default), sending a heartbeat and then packets of records at a
//! fixed rate, while signed `POST /command/` calls go to random agents.
//!
//! Reports: accepted connections, the center's RSS (from
//! `/proc/<pid>/status`, `--center-pid`), records/s ingested (the center's
//! `elkeid_center_records_received_total` over the window) and command
//! round-trip p50/p99 (HTTP request sent -> task received on the agent's
//! stream).
//!
//! ```text
//! elkeid-center --data-dir /tmp/lg --sink null --conn-limit 20000 &
//! loadgen --data-dir /tmp/lg --grpc 127.0.0.1:6751 --http 127.0.0.1:6752 \
//!     --center-pid $! --agents 1000 --packets-per-sec 1 --records-per-packet 10 --duration 30
//! ```
//!
//! Several centers of one cluster (same PKI and API keys): repeat `--grpc`,
//! `--http` and `--center-pid` (same order); agent `i` connects to the
//! `i mod n`-th center; with `--cross-center` each command is posted to the
//! NEXT center's API, which does not hold the agent and forwards it (the
//! round trip then includes the etcd lookup and the center-to-center call).
//! Records and RSS/CPU are summed over the centers.
//!
//! TLS: each simulated agent has its own `rustls::ClientConfig` (one
//! `Arc`, kept across its reconnects, as the real agent does) with a
//! session cache, so a reconnect resumes the TLS session when the center
//! issues tickets (`--no-resume`: every handshake is full). With
//! `--reconnect` an agent whose stream ends dials again (after 0.1-0.5 s,
//! `--connect-concurrency` handshakes at a time): restart the center during
//! the window and the generator prints how long after the first dropped
//! stream all agents were streaming again (the reconnect storm), with
//! full/resumed handshake counts.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use elkeid_proto::codec::RawEncodeCodec;
use elkeid_proto::grpc::Command;
use elkeid_proto::snappy::SnappyClientLayer;
use elkeid_tests::center::{
    AgentPki, HttpTarget, SERVER_NAME, channel_over, heartbeat, http, packet, record,
    signed_headers, unix_now,
};
use prost::Message;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::uri::PathAndQuery;
use tower_layer::Layer;

#[derive(Parser, Debug, Clone)]
#[command(about = "Simulated Elkeid agents against a running elkeid-center")]
struct Args {
    /// The center's data dir (reads `pki/` and `api-keys.toml`).
    #[arg(long)]
    data_dir: PathBuf,
    /// Center gRPC address (repeat for several centers).
    #[arg(long, required = true)]
    grpc: Vec<SocketAddr>,
    /// Center HTTP API address (HTTPS, verified with `pki/ca.crt`; repeat,
    /// in the order of --grpc).
    #[arg(long, required = true)]
    http: Vec<SocketAddr>,
    /// Post each command to the API of the center after the agent's own
    /// (needs as many --http as --grpc): cross-center round trips.
    #[arg(long)]
    cross_center: bool,
    /// The center's API is plain HTTP (`--http-tls false`).
    #[arg(long)]
    http_plain: bool,
    /// Center pid, for RSS and CPU (repeat for several centers; summed).
    #[arg(long)]
    center_pid: Vec<u32>,
    /// Simulated agents (one TLS connection each).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Packets per second per agent (0 = heartbeat only).
    #[arg(long, default_value_t = 1.0)]
    packets_per_sec: f64,
    /// Records per packet.
    #[arg(long, default_value_t = 10)]
    records_per_packet: usize,
    /// Measurement window after all agents connected, seconds.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Commands per second during the window (to random agents).
    #[arg(long, default_value_t = 20.0)]
    commands_per_sec: f64,
    /// Concurrent TLS handshakes while connecting.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Send uncompressed (identity) instead of snappy.
    #[arg(long)]
    identity: bool,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 300)]
    connect_timeout: u64,
    /// Dial again when a stream ends (measure a center restart).
    #[arg(long)]
    reconnect: bool,
    /// No TLS session cache: every handshake is a full one.
    #[arg(long)]
    no_resume: bool,
}

#[derive(Default)]
struct Stats {
    connected: AtomicU64,
    failed: AtomicU64,
    ended: AtomicU64,
    packets: AtomicU64,
    records: AtomicU64,
    send_stalls: AtomicU64,
    commands_sent: AtomicU64,
    commands_failed: AtomicU64,
    rtts_us: Mutex<Vec<u64>>,
    /// Streams open now.
    live: AtomicU64,
    handshakes_full: AtomicU64,
    handshakes_resumed: AtomicU64,
    reconnects: AtomicU64,
    /// First stream lost since all were last up: (when, full, resumed).
    storm: Mutex<Option<(Instant, u64, u64)>>,
    storms: Mutex<Vec<serde_json::Value>>,
    pending: Mutex<HashMap<String, Instant>>,
    first_error: Mutex<Option<String>>,
}

fn main() {
    let args = Args::parse();
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    let want = (args.agents as u64 * 2 + 1024).min(hard);
    if soft < want {
        let _ = rlimit::Resource::NOFILE.set(want, hard);
    }
    let (soft, _) = rlimit::Resource::NOFILE.get().unwrap_or((0, 0));
    eprintln!("loadgen: RLIMIT_NOFILE {soft} (hard {hard})");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(args));
}

fn rss_kib(pid: u32) -> Option<u64> {
    elkeid_tests::proc_status_kb(pid, "VmRSS")
}

/// utime + stime of `pid` in clock ticks (USER_HZ, 100 on Linux).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime/stime are 14 and 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn self_rss_kib() -> Option<u64> {
    rss_kib(std::process::id())
}

/// Sum of `f` over the center pids (`None` without pids or on a failure).
fn sum_pids(pids: &[u32], f: fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|&p| f(p)).sum()
}

async fn metric(addrs: Vec<HttpTarget>, name: &str) -> Option<f64> {
    let mut total = 0.0;
    for addr in addrs {
        let r = http(addr, "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8(r.body).ok()?;
        total += text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())?;
    }
    Some(total)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)] as f64 / 1000.0
}

/// A process-exec-like record (~300 bytes).
fn sample_record(i: usize) -> elkeid_proto::grpc::EncodedRecord {
    record(
        59,
        unix_now(),
        &[
            (
                "argv",
                "/usr/bin/python3 /opt/app/worker.py --queue default --concurrency 4",
            ),
            ("exe", "/usr/bin/python3.11"),
            ("pid", &(10_000 + i).to_string()),
            ("ppid", "1"),
            ("pgid", "4242"),
            ("uid", "1000"),
            ("username", "app"),
            ("cwd", "/opt/app"),
            ("tty", "-"),
            ("sip", "10.0.0.5"),
            ("sport", "51234"),
            ("dip", "10.0.0.9"),
            ("dport", "5432"),
            ("pid_tree", "4242.python3<1.systemd"),
        ],
    )
}

fn api_targets(args: &Args) -> Vec<HttpTarget> {
    if args.http_plain {
        return args.http.iter().map(|&a| HttpTarget::from(a)).collect();
    }
    let ca = std::fs::read(args.data_dir.join("pki/ca.crt")).expect("read pki/ca.crt");
    args.http
        .iter()
        .map(|&a| HttpTarget::https(a, &ca))
        .collect()
}

async fn run(args: Args) {
    let read = |f: &str| {
        std::fs::read(args.data_dir.join("pki").join(f)).unwrap_or_else(|e| panic!("pki/{f}: {e}"))
    };
    let pki = AgentPki {
        ca: read("ca.crt"),
        identity: Some((read("client.crt"), read("client.key"))),
    };
    let keys: toml::Table =
        toml::from_str(&std::fs::read_to_string(args.data_dir.join("api-keys.toml")).unwrap())
            .unwrap();
    let (ak, sk) = keys["aksk"]
        .as_table()
        .unwrap()
        .iter()
        .next()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .unwrap();
    let (cert, key) = pki.identity.clone().unwrap();
    let tls = client_config(&pki.ca, &cert, &key);
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let connect_gate = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let records: Vec<_> = (0..args.records_per_packet).map(sample_record).collect();
    let rss_before = sum_pids(&args.center_pid, rss_kib);
    if args.cross_center {
        assert!(
            args.grpc.len() > 1 && args.http.len() == args.grpc.len(),
            "--cross-center needs as many --http as --grpc, at least 2"
        );
    }
    let lg_rss_before = self_rss_kib();

    eprintln!(
        "loadgen: connecting {} agents to {:?}",
        args.agents, args.grpc
    );
    let t0 = Instant::now();
    let connect_cpu0 = sum_pids(&args.center_pid, cpu_ticks);
    let mut tasks = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let id = format!("lg-{i:06}");
        let first = Bytes::from(packet(&id, vec![heartbeat(unix_now())]).encode_to_vec());
        let body = Bytes::from(packet(&id, records.clone()).encode_to_vec());
        let ctx = AgentCtx {
            id,
            tls: {
                let mut c = (*tls).clone();
                c.resumption = if args.no_resume {
                    rustls::client::Resumption::disabled()
                } else {
                    rustls::client::Resumption::in_memory_sessions(4)
                };
                Arc::new(c)
            },
            addr: args.grpc[i % args.grpc.len()],
            reconnect: args.reconnect,
            identity: args.identity,
            first,
            body,
            records: args.records_per_packet as u64,
            period: (args.packets_per_sec > 0.0)
                .then(|| Duration::from_secs_f64(1.0 / args.packets_per_sec)),
            stats: stats.clone(),
            stop: stop.clone(),
            stopping: stopping.clone(),
            gate: connect_gate.clone(),
        };
        tasks.push(tokio::spawn(agent(ctx)));
    }
    let connect_deadline = Instant::now() + Duration::from_secs(args.connect_timeout);
    loop {
        let done = stats.connected.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed);
        if done >= args.agents as u64 || Instant::now() >= connect_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    let connected = stats.connected.load(Ordering::Relaxed);
    // center CPU per accepted connection (TLS handshake, HTTP/2, stream set-up, first packet)
    let connect_cpu_ms = match (connect_cpu0, sum_pids(&args.center_pid, cpu_ticks)) {
        (Some(a), Some(b)) if connected > 0 => (b - a) as f64 * 10.0 / connected as f64,
        _ => f64::NAN,
    };
    let connect_handshakes = (
        stats.handshakes_full.load(Ordering::Relaxed),
        stats.handshakes_resumed.load(Ordering::Relaxed),
    );
    // Reconnect storms: all agents streaming again after the first drop.
    let storm_task = {
        let stats = stats.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            while !stopping.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if stats.live.load(Ordering::Relaxed) < connected {
                    continue;
                }
                let Some((since, full0, res0)) = stats.storm.lock().unwrap().take() else {
                    continue;
                };
                let full = stats.handshakes_full.load(Ordering::Relaxed) - full0;
                let resumed = stats.handshakes_resumed.load(Ordering::Relaxed) - res0;
                let secs = since.elapsed().as_secs_f64();
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                eprintln!(
                    "loadgen: storm: all {connected} streaming again {secs:.2} s after the first drop \
                     (at unix ms {unix_ms}); handshakes full {full}, resumed {resumed}"
                );
                stats.storms.lock().unwrap().push(serde_json::json!({
                    "secs_from_first_drop": (secs * 100.0).round() / 100.0,
                    "all_up_unix_ms": unix_ms as u64,
                    "handshakes_full": full,
                    "handshakes_resumed": resumed,
                }));
            }
        })
    };
    eprintln!(
        "loadgen: {connected} connected, {} failed in {connect_secs:.1} s",
        stats.failed.load(Ordering::Relaxed)
    );
    // Let the first heartbeats settle, then measure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut listed = Some(0u64);
    for t in api_targets(&args) {
        let h = signed_headers(&ak, &sk, "GET", "/conn/count", b"", unix_now());
        let n = http(t, "GET", "/conn/count", &h, b"").await.json()["data"].as_u64();
        listed = listed.zip(n).map(|(a, b)| a + b);
    }
    let rec0 = metric(api_targets(&args), "elkeid_center_records_received_total").await;
    let sent0 = stats.records.load(Ordering::Relaxed);
    let cpu0 = sum_pids(&args.center_pid, cpu_ticks);
    let lg_cpu0 = cpu_ticks(std::process::id());
    let w0 = Instant::now();
    let mut rss_max = sum_pids(&args.center_pid, rss_kib).unwrap_or(0);

    // Commands at a fixed rate to random agents.
    let cmd_task = {
        let stats = stats.clone();
        let (ak, sk, targets) = (ak.clone(), sk.clone(), api_targets(&args));
        let centers = args.grpc.len();
        let cross = args.cross_center;
        let n = args.agents;
        let rate = args.commands_per_sec;
        let dur = Duration::from_secs(args.duration);
        tokio::spawn(async move {
            if rate <= 0.0 || n == 0 {
                return;
            }
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            let end = Instant::now() + dur;
            let mut seq: u64 = 0;
            let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
            while Instant::now() < end {
                tick.tick().await;
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let k = (rng % n as u64) as usize;
                let target = format!("lg-{k:06}");
                // The agent is on center k mod centers; cross-center: post to the next one.
                let home = k % centers;
                let api = if cross { (home + 1) % centers } else { home };
                let http_addr = targets[api % targets.len()].clone();
                seq += 1;
                let token = format!("rtt-{seq}");
                let body = serde_json::to_vec(&serde_json::json!({
                    "agent_id": target,
                    "command": {"task": {"data_type": 1050, "name": "loadgen", "data": "ping", "token": token}}
                }))
                .unwrap();
                let stats = stats.clone();
                let (ak, sk) = (ak.clone(), sk.clone());
                tokio::spawn(async move {
                    let h = signed_headers(&ak, &sk, "POST", "/command/", &body, unix_now());
                    stats
                        .pending
                        .lock()
                        .unwrap()
                        .insert(token.clone(), Instant::now());
                    let r = http(http_addr, "POST", "/command/", &h, &body).await;
                    stats.commands_sent.fetch_add(1, Ordering::Relaxed);
                    let ok = r.status == 200
                        && serde_json::from_slice::<serde_json::Value>(&r.body)
                            .is_ok_and(|v| v["code"] == 0);
                    if !ok {
                        stats.commands_failed.fetch_add(1, Ordering::Relaxed);
                        stats.pending.lock().unwrap().remove(&token);
                        let mut fe = stats.first_error.lock().unwrap();
                        if fe.is_none() {
                            *fe = Some(format!(
                                "command: {} {}",
                                r.status,
                                String::from_utf8_lossy(&r.body)
                            ));
                        }
                    }
                });
            }
        })
    };

    while w0.elapsed() < Duration::from_secs(args.duration) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(r) = sum_pids(&args.center_pid, rss_kib) {
            rss_max = rss_max.max(r);
        }
    }
    let _ = cmd_task.await;
    let window = w0.elapsed().as_secs_f64();
    let rec1 = metric(api_targets(&args), "elkeid_center_records_received_total").await;
    let sent1 = stats.records.load(Ordering::Relaxed);
    let cpu_pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => ((b - a) as f64 / window).round(), // ticks/s at 100 Hz = % of one core
        _ => f64::NAN,
    };
    let center_cpu = cpu_pct(cpu0, sum_pids(&args.center_pid, cpu_ticks));
    let lg_cpu = cpu_pct(lg_cpu0, cpu_ticks(std::process::id()));
    tokio::time::sleep(Duration::from_secs(2)).await; // late command replies
    let rss_end = sum_pids(&args.center_pid, rss_kib);
    let lg_rss = self_rss_kib();
    stopping.store(true, Ordering::Relaxed);
    stop.notify_waiters();
    storm_task.abort();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }

    let mut rtts = stats.rtts_us.lock().unwrap().clone();
    rtts.sort_unstable();
    let ingested = match (rec0, rec1) {
        (Some(a), Some(b)) => (b - a) / window,
        _ => f64::NAN,
    };
    let report = serde_json::json!({
        "agents": args.agents,
        "centers": args.grpc.len(),
        "commands_cross_center": args.cross_center,
        "accepted_connections": connected,
        "failed_connections": stats.failed.load(Ordering::Relaxed),
        "listed_by_center": listed,
        "streams_ended_early": stats.ended.load(Ordering::Relaxed),
        "connect_secs": (connect_secs * 10.0).round() / 10.0,
        "center_cpu_ms_per_connection": (connect_cpu_ms * 1000.0).round() / 1000.0,
        "connect_handshakes_full": connect_handshakes.0,
        "connect_handshakes_resumed": connect_handshakes.1,
        "handshakes_full": stats.handshakes_full.load(Ordering::Relaxed),
        "handshakes_resumed": stats.handshakes_resumed.load(Ordering::Relaxed),
        "reconnects": stats.reconnects.load(Ordering::Relaxed),
        "storms": stats.storms.lock().unwrap().clone(),
        "window_secs": (window * 10.0).round() / 10.0,
        "packets_per_sec_per_agent": args.packets_per_sec,
        "records_per_packet": args.records_per_packet,
        "compression": if args.identity { "identity" } else { "snappy" },
        "records_sent_per_sec": ((sent1 - sent0) as f64 / window).round(),
        "records_ingested_per_sec": ingested.round(),
        "center_rss_mib_before": rss_before.map(|k| k / 1024),
        "center_rss_mib_max": rss_max / 1024,
        "center_rss_mib_end": rss_end.map(|k| k / 1024),
        "center_cpu_pct_of_one_core": center_cpu,
        "loadgen_cpu_pct_of_one_core": lg_cpu,
        "loadgen_rss_mib_before": lg_rss_before.map(|k| k / 1024),
        "loadgen_rss_mib": lg_rss.map(|k| k / 1024),
        "commands_sent": stats.commands_sent.load(Ordering::Relaxed),
        "commands_failed": stats.commands_failed.load(Ordering::Relaxed),
        "commands_received": rtts.len(),
        "command_rtt_ms_p50": pct(&rtts, 0.50),
        "command_rtt_ms_p99": pct(&rtts, 0.99),
        "command_rtt_ms_max": pct(&rtts, 1.0),
        "first_error": stats.first_error.lock().unwrap().clone(),
    });
    println!("{}", serde_json::to_string_pretty(&report).unwrap());
}

struct AgentCtx {
    id: String,
    addr: SocketAddr,
    /// This agent's own config (its session cache), reused on every dial.
    tls: Arc<rustls::ClientConfig>,
    reconnect: bool,
    identity: bool,
    first: Bytes,
    body: Bytes,
    records: u64,
    period: Option<Duration>,
    stats: Arc<Stats>,
    stop: Arc<tokio::sync::Notify>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
    gate: Arc<Semaphore>,
}

fn note_error(stats: &Stats, e: String) {
    let mut fe = stats.first_error.lock().unwrap();
    if fe.is_none() {
        *fe = Some(e);
    }
}

/// The client side of the center's mTLS: its CA, the shared client
/// certificate, ALPN h2; AES-128-GCM offered first, as the elkeid-rs agent
/// and Go's TLS client do on a CPU with AES instructions.
fn client_config(ca: &[u8], cert: &[u8], key: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let chain: Vec<_> = CertificateDer::pem_slice_iter(cert)
        .map(|c| c.expect("client cert PEM"))
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key).expect("client key PEM");
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client cert");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

/// One mTLS connection and Transfer stream: (inbound commands, request sender).
async fn open(ctx: &AgentCtx) -> Result<(tonic::Streaming<Command>, mpsc::Sender<Bytes>), String> {
    let dial = async {
        let tcp = TcpStream::connect(ctx.addr).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(SERVER_NAME).map_err(std::io::Error::other)?;
        tokio_rustls::TlsConnector::from(ctx.tls.clone())
            .connect(name, tcp)
            .await
    };
    let tls = match tokio::time::timeout(Duration::from_secs(30), dial).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(format!("connect: {e}")),
        Err(_) => return Err("connect: timeout".into()),
    };
    let counter = match tls.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => &ctx.stats.handshakes_resumed,
        _ => &ctx.stats.handshakes_full,
    };
    counter.fetch_add(1, Ordering::Relaxed);
    let channel = channel_over(tls).await.map_err(|e| format!("h2: {e:?}"))?;
    let (tx, rx) = mpsc::channel::<Bytes>(2);
    let _ = tx.send(ctx.first.clone()).await;
    let path = PathAndQuery::from_static("/grpc.Transfer/Transfer");
    let req = tonic::Request::new(ReceiverStream::new(rx));
    let resp = if ctx.identity {
        let mut g = tonic::client::Grpc::new(channel);
        match g.ready().await {
            Ok(()) => {
                g.streaming(req, path, RawEncodeCodec::<Command>::new())
                    .await
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    } else {
        let mut g = tonic::client::Grpc::new(SnappyClientLayer::new().layer(channel));
        match g.ready().await {
            Ok(()) => {
                g.streaming(req, path, RawEncodeCodec::<Command>::new())
                    .await
            }
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
        }
    };
    match resp {
        Ok(r) => Ok((r.into_inner(), tx)),
        Err(e) => Err(format!("open stream: {e:?}")),
    }
}

async fn agent(ctx: AgentCtx) {
    let mut rng = fxhash(&ctx.id) | 1;
    let mut first = true;
    loop {
        let permit = ctx.gate.clone().acquire_owned().await.ok();
        let opened = open(&ctx).await;
        drop(permit);
        let (inbound, tx) = match opened {
            Ok(s) => s,
            Err(e) if first => {
                ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
                note_error(&ctx.stats, e);
                return;
            }
            Err(_) => {
                if ctx.stopping.load(Ordering::Relaxed) {
                    return;
                }
                // center not back yet: retry after 0.1-0.5 s
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                tokio::time::sleep(Duration::from_millis(100 + rng % 400)).await;
                continue;
            }
        };
        if first {
            ctx.stats.connected.fetch_add(1, Ordering::Relaxed);
        } else {
            ctx.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        ctx.stats.live.fetch_add(1, Ordering::Relaxed);
        let stopped = session(&ctx, inbound, tx).await;
        ctx.stats.live.fetch_sub(1, Ordering::Relaxed);
        if stopped || ctx.stopping.load(Ordering::Relaxed) {
            return;
        }
        {
            let mut storm = ctx.stats.storm.lock().unwrap();
            if storm.is_none() {
                *storm = Some((
                    Instant::now(),
                    ctx.stats.handshakes_full.load(Ordering::Relaxed),
                    ctx.stats.handshakes_resumed.load(Ordering::Relaxed),
                ));
            }
        }
        if !ctx.reconnect {
            ctx.stats.ended.fetch_add(1, Ordering::Relaxed);
            note_error(&ctx.stats, format!("agent {}: stream ended", ctx.id));
            return;
        }
    }
}

/// Runs one stream until it ends (false) or the generator stops (true).
async fn session(
    ctx: &AgentCtx,
    mut inbound: tonic::Streaming<Command>,
    tx: mpsc::Sender<Bytes>,
) -> bool {
    let (ended_tx, mut ended) = tokio::sync::oneshot::channel::<()>();
    let stats = ctx.stats.clone();
    let receiver = tokio::spawn(async move {
        while let Ok(Some(cmd)) = inbound.message().await {
            if let Some(t) = cmd.task {
                let start = stats.pending.lock().unwrap().remove(&t.token);
                if let Some(start) = start {
                    let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                    stats.rtts_us.lock().unwrap().push(us);
                }
            }
        }
        let _ = ended_tx.send(());
    });

    let stop = ctx.stop.notified();
    tokio::pin!(stop);
    let stopped = match ctx.period {
        Some(period) => {
            // Spread agents over the period.
            let jitter = period.mul_f64((fxhash(&ctx.id) % 1000) as f64 / 1000.0);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + jitter, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = &mut stop => break true,
                    _ = &mut ended => break false,
                    _ = tick.tick() => {
                        match tx.try_send(ctx.body.clone()) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(b)) => {
                                ctx.stats.send_stalls.fetch_add(1, Ordering::Relaxed);
                                if tx.send(b).await.is_err() { break false; }
                            }
                            Err(mpsc::error::TrySendError::Closed(_)) => break false,
                        }
                        ctx.stats.packets.fetch_add(1, Ordering::Relaxed);
                        ctx.stats.records.fetch_add(ctx.records, Ordering::Relaxed);
                    }
                }
            }
        }
        None => tokio::select! {
            () = &mut stop => true,
            _ = &mut ended => false,
        },
    };
    drop(tx);
    receiver.abort();
    stopped
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
