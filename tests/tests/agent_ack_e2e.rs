//! Nothing lost when the center fails, with real processes: a flood plugin
//! -> `elkeid-agent` -> `elkeid-center` (NDJSON), and the center killed,
//! frozen or lacking the extension in the middle. Records are counted by
//! their plugin sequence number and their identity (agent epoch, packet
//! sequence, index) in the NDJSON lines.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use elkeid_tests::center::{count_in_records, ndjson_records_in};
use elkeid_tests::plugin::{Agent, FileServer, field, push_flood, wait_connected};
use elkeid_tests::{Center, KillOnDrop, bin, wait_for};
use serde_json::Value;

/// `"data_type":7000` lines written so far (progress probe).
fn flood_lines(data_dir: &Path) -> usize {
    count_in_records(data_dir, "\"data_type\":7000")
}

fn has_marker(data_dir: &Path) -> bool {
    count_in_records(data_dir, "\"data_type\":7001") > 0
}

/// `wait_for` polling every 300 ms (the probes read whole files).
fn poll<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    elkeid_tests::wait_for_every(timeout, Duration::from_millis(300), f)
}

/// Flood records of `id` in a data dir: (plugin sequence, identity).
fn flood_records(data_dir: &Path, id: &str) -> Vec<(u64, (u64, u64, u64))> {
    ndjson_records_in(data_dir)
        .into_iter()
        .filter(|r| r["agent_id"] == id && r["data_type"] == 7000)
        .map(|r: Value| {
            let s: u64 = field(&r, "s").trim_start_matches('0').parse().unwrap_or(0);
            let ident = (
                r["agent_epoch"].as_u64().expect("identity keys"),
                r["agent_seq"].as_u64().unwrap(),
                r["record_idx"].as_u64().unwrap(),
            );
            (s, ident)
        })
        .collect()
}

async fn start_flood(center: &Center, id: &str, files: &FileServer, n: u64) {
    push_flood(center, id, files, &format!("count={n},size=120")).await;
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
}

/// Regression: each restart used to lose one packet. The restarted
/// center's first ack (what it already had) released packets while one was
/// being handed to the connection; finishing that send then marked the next,
/// never-sent packet as sent, and the next cumulative ack released it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_kill_9_twice_during_a_flood_loses_and_duplicates_nothing() {
    // 120,000 records by default, paced at 8,000 records/s (15 s) so that
    // both kills land while the flood is still running on any machine:
    // unpaced, a fast machine can deliver all of it before the first kill.
    // ELKEID_KILL9_RECORDS=2000000 ELKEID_KILL9_RATE=0 (unpaced) with
    // `cargo test --release` shows the same at the release builds' rate
    // (docs/BENCHMARKS.md).
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let n = env("ELKEID_KILL9_RECORDS").unwrap_or(120_000);
    let rate = env("ELKEID_KILL9_RATE").unwrap_or(8_000);
    let tmp = tempfile::tempdir().unwrap();
    let cdir = tmp.path().join("center");
    let mut center = Center::start(&cdir, &[]);
    let grpc = center.grpc.to_string();
    let files = FileServer::start();
    let agent = Agent::start(&center, &tmp.path().join("agent"), "ack-kill9", None, &[]);
    let id = agent.id.clone();
    wait_connected(&center, &id, Duration::from_secs(60)).await;
    let pace = if rate > 0 {
        format!(",rate={rate}")
    } else {
        String::new()
    };
    push_flood(&center, &id, &files, &format!("count={n},size=120{pace}")).await;

    // the flood's rate, measured on the center's disk from the config push
    // (round 1) or the restart (round 2) to the poll that saw the kill
    // point: a lower bound (plugin start-up, reconnect and the 300 ms poll
    // are included)
    let (mut t0, mut n0) = (Instant::now(), 0);
    for (round, at) in [(1, n as usize / 5), (2, n as usize / 2)] {
        poll(Duration::from_secs(240), || {
            (flood_lines(&cdir) >= at).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: flood progressed to {at}"));
        let n1 = flood_lines(&cdir);
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "round {round}: {} records stored in {secs:.2} s before the kill: at least {:.0} records/s",
            n1 - n0,
            (n1 - n0) as f64 / secs
        );
        drop(center); // SIGKILL mid-flood
        assert!(
            !has_marker(&cdir),
            "set-up: the flood ended before kill {round} ({} records arrived); \
             pace it (ELKEID_KILL9_RATE, now {rate})",
            flood_lines(&cdir)
        );
        std::thread::sleep(Duration::from_secs(2));
        center = Center::start_at(&cdir, &grpc, &[]);
        (t0, n0) = (Instant::now(), flood_lines(&cdir));
    }
    poll(Duration::from_secs(300), || has_marker(&cdir).then_some(()))
        .expect("end marker delivered");
    // the marker is the plugin's last record: everything before it is in
    let got = flood_records(&cdir, &id);
    let distinct: HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
    let idents: HashSet<(u64, u64, u64)> = got.iter().map(|(_, i)| *i).collect();
    if distinct.len() as u64 != n {
        let missing: Vec<u64> = (0..n).filter(|s| !distinct.contains(s)).collect();
        let by_s: HashMap<u64, (u64, u64, u64)> = got.iter().map(|(s, i)| (*s, *i)).collect();
        let first = missing[0];
        let last = missing[missing.len() - 1];
        eprintln!(
            "missing {} records, first {first} last {last}; before: {:?}, after: {:?}; data kept in {}",
            missing.len(),
            first.checked_sub(1).and_then(|s| by_s.get(&s)),
            by_s.get(&(last + 1)),
            tmp.keep().display()
        );
        panic!("records lost");
    }
    assert_eq!(distinct.len() as u64, n, "0 lost");
    assert_eq!(
        got.len() as u64,
        n,
        "0 duplicates: returned to the same center"
    );
    assert_eq!(idents.len(), got.len(), "identities are unique");
    drop(agent);
}

/// A center started by hand (the helper has no environment option).
fn center_with_env(
    dir: &Path,
    env: &[(&str, &str)],
) -> (KillOnDrop, std::net::SocketAddr, std::net::SocketAddr) {
    let listen = dir.join("listen.json");
    let _ = std::fs::remove_file(&listen);
    let mut cmd = Command::new(bin("elkeid-center", "elkeid-center"));
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = KillOnDrop(cmd.spawn().unwrap());
    let v: Value = wait_for(Duration::from_secs(60), || {
        serde_json::from_str(&std::fs::read_to_string(&listen).ok()?).ok()
    })
    .expect("listen.json");
    let addr = |k: &str| v[k].as_str().unwrap().parse().unwrap();
    (child, addr("grpc"), addr("http"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_of_the_center_in_use_fails_over_within_the_bound() {
    const N: u64 = 100_000;
    let tmp = tempfile::tempdir().unwrap();
    let a = Center::start(&tmp.path().join("a"), &[]);
    // B shares A's PKI so the agent's certificate works on both
    let bdir = tmp.path().join("b");
    std::fs::create_dir_all(bdir.join("pki")).unwrap();
    for f in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "client.crt",
        "client.key",
    ] {
        std::fs::copy(a.pki(f), bdir.join("pki").join(f)).unwrap();
    }
    let b = Center::start(&bdir, &[]);
    let files = FileServer::start();
    let agent = Agent::start(
        &a,
        &tmp.path().join("agent"),
        "ack-failover",
        None,
        &["--server", &b.grpc.to_string(), "--failover-secs", "15"],
    );
    // servers in order: A (from the helper), then B
    let id = agent.id.clone();
    wait_connected(&a, &id, Duration::from_secs(60)).await;
    // Paced (about 10 s at 10,000 records/s) so that A freezes while the
    // flood runs: the stall the agent detects is packets waiting for acks,
    // and the rest of the flood must go to B. Unpaced, a fast machine
    // delivered everything to A before the test noticed a fifth of it.
    push_flood(&a, &id, &files, &format!("count={N},size=120,rate=10000")).await;
    poll(Duration::from_secs(240), || {
        (flood_lines(&a.data_dir) >= N as usize / 5).then_some(())
    })
    .expect("flood reaches A");
    let a_pid = a.child.0.id();
    signal(a_pid, "STOP");
    let stopped = Instant::now();
    assert!(
        !has_marker(&a.data_dir),
        "set-up: the flood ended before A froze ({} records arrived)",
        flood_lines(&a.data_dir)
    );
    poll(Duration::from_secs(30), || {
        (flood_lines(&b.data_dir) > 0).then_some(())
    })
    .expect("the agent moved to B");
    let took = stopped.elapsed();
    assert!(
        took <= Duration::from_secs(15),
        "failover took {took:?}, bound 15 s"
    );
    poll(Duration::from_secs(300), || {
        has_marker(&b.data_dir).then_some(())
    })
    .expect("end marker delivered to B");
    signal(a_pid, "CONT");
    // A writes out what it had received before it froze
    std::thread::sleep(Duration::from_secs(3));
    let in_a = flood_records(&a.data_dir, &id);
    let in_b = flood_records(&b.data_dir, &id);
    let distinct: HashSet<u64> = in_a.iter().chain(&in_b).map(|(s, _)| *s).collect();
    assert_eq!(distinct.len() as u64, N, "0 lost across the failover");
    let a_ids: HashSet<_> = in_a.iter().map(|(_, i)| *i).collect();
    let dups = in_b.iter().filter(|(_, i)| a_ids.contains(i)).count();
    // duplicates are possible only here (two centers) and are counted
    let mut per_s: HashMap<u64, usize> = HashMap::new();
    for (s, _) in in_a.iter().chain(&in_b) {
        *per_s.entry(*s).or_default() += 1;
    }
    let dup_records = per_s.values().filter(|&&c| c > 1).count();
    assert_eq!(
        dups, dup_records,
        "every duplicate is identified by its identity"
    );
    println!(
        "failover after {took:?}; {} records at A, {} at B, {dups} duplicates (identified)",
        in_a.len(),
        in_b.len()
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_center_without_the_extension_the_agent_behaves_as_before() {
    const N: u64 = 20_000;
    let tmp = tempfile::tempdir().unwrap();
    let cdir = tmp.path().join("center");
    std::fs::create_dir_all(&cdir).unwrap();
    let (_child, grpc, http) = center_with_env(&cdir, &[("ELKEID_CENTER_TEST_NO_ACKS", "1")]);
    let center = Center {
        child: KillOnDrop(Command::new("true").spawn().unwrap()),
        data_dir: cdir.clone(),
        grpc,
        http,
        sd: None,
        http_ca: Some(cdir.join("pki").join("ca.crt")),
    };
    let files = FileServer::start();
    let agent = Agent::start(&center, &tmp.path().join("agent"), "ack-legacy", None, &[]);
    let id = agent.id.clone();
    wait_connected(&center, &id, Duration::from_secs(60)).await;
    start_flood(&center, &id, &files, N).await;
    poll(Duration::from_secs(240), || has_marker(&cdir).then_some(()))
        .expect("end marker delivered");
    let got: Vec<Value> = ndjson_records_in(&cdir)
        .into_iter()
        .filter(|r| r["agent_id"] == id.as_str() && r["data_type"] == 7000)
        .collect();
    assert_eq!(got.len() as u64, N, "every record exactly once");
    assert!(got.iter().all(|r| r.get("agent_epoch").is_none()));
    // a heartbeat sent after the whole flood (after its end marker on the
    // stream: a fast machine finishes the flood between two heartbeats)
    // shows no acknowledging center and nothing held back
    let hb = poll(Duration::from_secs(30), || {
        heartbeat_after_marker(&ndjson_records_in(&cdir), &id)
    })
    .expect("a heartbeat after the end marker");
    assert_eq!(field(&hb, "ack_mode"), "none", "{hb}");
    assert_eq!(field(&hb, "drop_cnt"), "0", "{hb}");
    drop(agent);
}

/// The first 1000 heartbeat of `id` stored after its flood's end marker
/// (one stream: stored order is the order the agent queued them in).
fn heartbeat_after_marker(records: &[Value], id: &str) -> Option<Value> {
    records
        .iter()
        .filter(|r| r["agent_id"] == id)
        .skip_while(|r| r["data_type"] != 7001)
        .find(|r| r["data_type"] == 1000)
        .cloned()
}

/// Records of `data_type` in the agent's spool segments (decoded with the
/// core codec and prost, as the agent's replay would).
fn spooled(work_dir: &Path, data_type: i32) -> usize {
    use prost::Message;
    let Ok(rd) = std::fs::read_dir(work_dir.join("spool")) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.filter_map(Result::ok) {
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        let Ok(mut pos) = elkeid_core::spool::check_magic(&data) else {
            continue;
        };
        while let Ok((entry, len)) = elkeid_core::spool::decode_entry(&data[pos..]) {
            pos += len;
            if let Ok(p) = elkeid_proto::grpc::PackagedData::decode(entry.packet) {
                n += p
                    .records
                    .iter()
                    .filter(|r| r.data_type == data_type)
                    .count();
            }
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_outage_spools_keeps_the_plugin_running_and_survives_agent_restart() {
    const N: u64 = 60_000;
    let tmp = tempfile::tempdir().unwrap();
    let cdir = tmp.path().join("center");
    let wd = tmp.path().join("agent");
    let center = Center::start(&cdir, &[]);
    let grpc = center.grpc.to_string();
    let files = FileServer::start();
    let mut agent = Agent::start(&center, &wd, "ack-spool", None, &[]);
    let id = agent.id.clone();
    wait_connected(&center, &id, Duration::from_secs(60)).await;
    // Paced (about 8 s at 8,000 records/s) so the center is always gone
    // before the plugin's last record: unpaced, a fast machine delivered
    // the whole flood before the test noticed the first 1,000 records.
    push_flood(
        &center,
        &id,
        &files,
        &format!("count={N},size=120,rate=8000"),
    )
    .await;
    poll(Duration::from_secs(240), || {
        (flood_lines(&cdir) >= 1000).then_some(())
    })
    .expect("flood reaches the center");
    drop(center); // the center goes away for the rest of the flood
    let before = flood_lines(&cdir);
    assert!(
        !has_marker(&cdir),
        "set-up: the flood ended before the center went away ({before} records arrived)"
    );
    // The plugin is not blocked: its last record (the marker) is written
    // while no center takes data, so it lands in the spool.
    poll(Duration::from_secs(120), || {
        (spooled(&wd, 7001) == 1).then_some(())
    })
    .expect("the whole flood was read from the plugin into the spool");
    assert!(spooled(&wd, 7000) > 0);
    // SIGTERM with no center: what is in memory goes to the spool too
    let st = agent
        .terminate(Duration::from_secs(30))
        .expect("agent exits");
    assert!(st.success(), "{st:?}");
    assert!(
        before as u64 + spooled(&wd, 7000) as u64 >= N,
        "at exit everything is on the center's disk or in the spool"
    );
    // center back, agent restarted on the same work dir: the spool replays
    let center = Center::start_at(&cdir, &grpc, &[]);
    let agent = Agent::start(&center, &wd, "ack-spool", None, &[]);
    poll(Duration::from_secs(240), || has_marker(&cdir).then_some(()))
        .expect("end marker delivered from the spool");
    let got = flood_records(&cdir, &id);
    let distinct: HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(distinct.len() as u64, N, "0 lost");
    assert_eq!(got.len() as u64, N, "0 duplicates");
    drop(agent);
}

/// The outage figure: the center is down for 60 s while a plugin
/// floods 50 000 records/s; the spool has room, so the agent keeps reading
/// the plugin (its achieved rate stays >= 90 % of the offered rate: it never
/// blocked) and, once the center is back, every record arrives exactly once.
/// The center runs the null sink and counts received records per data_type
/// (re-sends it already had are dropped before that count), so 2.5 million
/// records need no NDJSON files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_down_60_s_while_a_plugin_floods_50k_per_s_into_the_spool() {
    const RATE: u64 = 50_000;
    const N: u64 = RATE * 50;
    const OUTAGE: Duration = Duration::from_secs(60);
    let tmp = tempfile::tempdir().unwrap();
    let cdir = tmp.path().join("center");
    let args = ["--sink", "null"];
    let center = Center::start(&cdir, &args);
    let grpc = center.grpc.to_string();
    let files = FileServer::start();
    let agent = Agent::start(&center, &tmp.path().join("agent"), "ack-outage", None, &[]);
    let id = agent.id.clone();
    wait_connected(&center, &id, Duration::from_secs(60)).await;
    let report = tmp.path().join("flood-report.json");
    let detail = format!(
        "count={N},size=40,rate={RATE},delay=3,report={}",
        report.display()
    );
    push_flood(&center, &id, &files, &detail).await;
    // the plugin runs (and waits 3 s before flooding): the center goes down
    poll(Duration::from_secs(120), || report.exists().then_some(()))
        .expect("the flood plugin started");
    drop(center);
    let down = Instant::now();
    let read_report = || -> Value {
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap_or_default())
            .unwrap_or(Value::Null)
    };
    let done = poll(OUTAGE, || {
        let r = read_report();
        (r["state"] == "done").then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "the plugin did not finish its {N} records within the {OUTAGE:?} outage (it blocked): {}",
            read_report()
        )
    });
    let rate = done["rate"].as_f64().unwrap();
    println!(
        "center down: the plugin wrote {N} records at {rate:.0} records/s (offered {RATE}), {:.2} s blocked in writes",
        done["write_secs"].as_f64().unwrap()
    );
    assert!(
        rate >= RATE as f64 * 0.9,
        "the plugin's rate held during the outage: {rate:.0} of {RATE} records/s"
    );
    if let Some(rest) = OUTAGE.checked_sub(down.elapsed()) {
        std::thread::sleep(rest);
    }
    let center = Center::start_at(&cdir, &grpc, &args);
    let back = Instant::now();
    let count = |dt: i32| {
        let c = &center;
        async move {
            c.metric(&format!(
                "elkeid_ac_output_data_type_count{{data_type=\"{dt}\"}}"
            ))
            .await
        }
    };
    let mut last = 0;
    let deadline = Instant::now() + Duration::from_secs(900);
    while Instant::now() < deadline {
        let r = elkeid_tests::center::http(center.api_target(), "GET", "/metrics", &[], b"").await;
        let text = String::from_utf8_lossy(&r.body).to_string();
        if text.contains("elkeid_ac_output_data_type_count{data_type=\"7001\"} 1") {
            break;
        }
        last = text
            .lines()
            .find_map(|l| l.strip_prefix("elkeid_ac_output_data_type_count{data_type=\"7000\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(last);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(
        count(7001).await,
        1,
        "end marker delivered ({last} of {N} records so far)"
    );
    println!(
        "after the outage: {N} records replayed from the spool in {:.1} s",
        back.elapsed().as_secs_f64()
    );
    assert_eq!(
        count(7000).await,
        N,
        "every record exactly once: 0 lost, 0 duplicated"
    );
    drop(agent);
}
