//! A plugin writing far more records than the agent's ring holds (2048
//! slots) as fast as its pipe takes them: back-pressure instead of drops,
//! so every record reaches the center's NDJSON sink exactly once and in
//! order, and the agent reports no drops. Afterwards the agent gives the
//! memory the flood touched (ring pages, send buffers) back.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use elkeid_tests::plugin::{Agent, FileServer, field, push_flood, records, wait_connected};
use elkeid_tests::{Center, proc_status_kb, wait_for};

const N: u64 = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_is_delivered_without_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let files = FileServer::start();
    let agent = Agent::start(
        &center,
        &tmp.path().join("agent"),
        "e2e-flood-agent",
        None,
        &[],
    );
    let id = agent.id.clone();
    wait_connected(&center, &id, Duration::from_secs(60)).await;

    push_flood(&center, &id, &files, &format!("count={N},size=120")).await;
    let marker = wait_for(Duration::from_secs(240), || {
        records(&center, &id, 7001).into_iter().next()
    })
    .expect("end marker delivered");
    assert_eq!(field(&marker, "done"), N.to_string());

    // The marker was written last, so everything before it has arrived.
    let got = records(&center, &id, 7000);
    assert_eq!(got.len() as u64, N, "every record exactly once");
    for (i, r) in got.iter().enumerate() {
        let seq: u64 = field(r, "s").trim_start_matches('0').parse().unwrap_or(0);
        assert_eq!(seq, i as u64, "in order");
    }
    // No agent record was dropped either: asked of a heartbeat queued after
    // the end marker (a fast machine floods between two heartbeats, and an
    // earlier one would say nothing about the flood).
    let hb = wait_for(Duration::from_secs(30), || {
        center
            .ndjson_records()
            .into_iter()
            .filter(|r| r["agent_id"] == id.as_str())
            .skip_while(|r| r["data_type"] != 7001)
            .find(|r| r["data_type"] == 1000)
    })
    .expect("a heartbeat after the end marker");
    assert_eq!(field(&hb, "drop_cnt"), "0", "{hb}");
    // 1010 log-record drops are reported too (none here).
    assert_eq!(field(&hb, "log_drop_cnt"), "0", "{hb}");

    // The flood touched the 8 MiB ring and the send buffers (peak anonymous
    // memory, from the high-water mark); about a second after the ring went
    // idle the agent gives them back.
    let pid = agent.child.0.id();
    let kb = |key: &str| proc_status_kb(pid, key).unwrap_or(0);
    let peak_anon = kb("VmHWM").saturating_sub(kb("RssFile") + kb("RssShmem"));
    // (7.2 MiB measured with the debug agent; 1.5 MiB once idle)
    assert!(
        peak_anon > 5 * 1024,
        "the flood touched the ring: {peak_anon} kB"
    );
    let after = wait_for(Duration::from_secs(30), || {
        let anon = kb("RssAnon");
        (anon < 3 * 1024).then_some(anon)
    });
    assert!(
        after.is_some(),
        "anonymous memory back under 3 MiB after the flood (peak {peak_anon} kB, now {} kB)",
        kb("RssAnon")
    );
}
