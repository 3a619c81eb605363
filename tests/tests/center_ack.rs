//! Acknowledged delivery, center side, against the real `elkeid-center`:
//! acks only after the NDJSON lines are on disk, identity keys on every
//! line, re-sends de-duplicated (also across a `kill -9` restart on the same
//! data dir), and no ack-only Command ever reaches a stream that did not
//! advertise (an Elkeid Go agent would read it as "remove every plugin").
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use elkeid_proto::grpc::{Command, EncodedRecord, PackagedData};
use elkeid_tests::Center;
use elkeid_tests::center::{AgentStream, packet, record, unix_now};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);
const EPOCH: u64 = 0x5eed_0001;

fn pkt(id: &str, seq: u64) -> PackagedData {
    let recs: Vec<EncodedRecord> = (0..3)
        .map(|i| {
            record(
                4242,
                unix_now(),
                &[("seq", &seq.to_string()), ("i", &i.to_string())],
            )
        })
        .collect();
    PackagedData {
        ack_epoch: EPOCH,
        ack_seq: seq,
        ..packet(id, recs)
    }
}

/// Reads commands until an ack of at least `seq` arrives; every one must be
/// ack-only.
async fn ack_up_to(s: &mut AgentStream, seq: u64) -> Vec<Command> {
    let mut seen = Vec::new();
    loop {
        let c = s.expect_command(T).await;
        assert!(
            c.task.is_none() && c.configs.is_empty(),
            "ack-only command expected: {c:?}"
        );
        assert_eq!(c.ack_epoch, EPOCH, "{c:?}");
        let done = c.ack_seq >= seq;
        seen.push(c);
        if done {
            return seen;
        }
    }
}

fn lines_of(center: &Center, id: &str) -> Vec<Value> {
    center
        .ndjson_records()
        .into_iter()
        .filter(|v| v["agent_id"] == id && v["data_type"] == 4242)
        .collect()
}

async fn metric(center: &Center, name: &str) -> f64 {
    let r = elkeid_tests::center::http(center.api_target(), "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8_lossy(&r.body).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_follow_durability_and_resends_are_deduplicated_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut center = Center::start(dir.path(), &[]);
    let id = "agent-ack-1";
    let mut s = AgentStream::open(center.agent().await, pkt(id, 1))
        .await
        .unwrap();
    // hello (nothing durable yet for this epoch), then the ack of packet 1
    let first = ack_up_to(&mut s, 1).await;
    assert_eq!(first[0].ack_seq, 0, "hello first: {first:?}");
    // what an ack covers is already on disk
    assert_eq!(lines_of(&center, id).len(), 3);
    for seq in 2..=5 {
        s.send_packet(pkt(id, seq)).await;
    }
    ack_up_to(&mut s, 5).await;
    let lines = lines_of(&center, id);
    assert_eq!(lines.len(), 15);
    for (n, l) in lines.iter().enumerate() {
        assert_eq!(l["agent_epoch"], EPOCH, "{l}");
        assert_eq!(l["agent_seq"], (n / 3 + 1) as u64, "{l}");
        assert_eq!(l["record_idx"], (n % 3) as u64, "{l}");
        assert_eq!(l["fields"]["seq"], (n / 3 + 1).to_string(), "{l}");
    }

    // re-sends on the same connection: acknowledged, not stored again
    s.send_packet(pkt(id, 3)).await;
    s.send_packet(pkt(id, 4)).await;
    let acks = ack_up_to(&mut s, 4).await;
    assert_eq!(acks.last().unwrap().ack_seq, 4);
    assert_eq!(lines_of(&center, id).len(), 15);
    assert_eq!(
        metric(&center, "elkeid_center_duplicate_packets_dropped_total").await,
        2.0
    );
    drop(s);

    // kill -9 and restart on the same data dir and port
    let grpc = center.grpc.to_string();
    drop(center); // SIGKILL
    center = Center::start_at(dir.path(), &grpc, &[]);
    // the agent re-sends what it had not seen acknowledged
    let mut s = AgentStream::open(center.agent().await, pkt(id, 5))
        .await
        .unwrap();
    let hello = s.expect_command(T).await;
    assert_eq!(
        (hello.ack_epoch, hello.ack_seq),
        (EPOCH, 5),
        "the restarted center knows what is durable"
    );
    ack_up_to(&mut s, 5).await;
    s.send_packet(pkt(id, 6)).await;
    ack_up_to(&mut s, 6).await;
    let lines = lines_of(&center, id);
    assert_eq!(lines.len(), 18, "packet 5 not stored twice, 6 stored");
    let mut seqs: Vec<u64> = lines
        .iter()
        .map(|l| l["agent_seq"].as_u64().unwrap())
        .collect();
    seqs.dedup();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    assert!(metric(&center, "elkeid_center_acks_sent_total").await >= 3.0);
    drop(s);
    // again, and this time the first packet after the restart is new
    drop(center);
    center = Center::start_at(dir.path(), &grpc, &[]);
    let mut s = AgentStream::open(center.agent().await, pkt(id, 7))
        .await
        .unwrap();
    ack_up_to(&mut s, 7).await;
    assert_eq!(
        lines_of(&center, id).len(),
        21,
        "the first packet of a stream is stored"
    );
    assert!(metric(&center, "elkeid_center_ndjson_sync_seconds_count").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_identity_never_gets_an_ack_only_command() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &[]);
    let id = "elkeid-go-agent";
    let plain = |seq: u64| {
        packet(
            id,
            vec![record(4242, unix_now(), &[("seq", &seq.to_string())])],
        )
    };
    let mut s = AgentStream::open(center.agent().await, plain(1))
        .await
        .unwrap();
    for seq in 2..=20 {
        s.send_packet(plain(seq)).await;
    }
    elkeid_tests::center::eventually(T, || async {
        (lines_of(&center, id).len() == 20).then_some(())
    })
    .await
    .expect("all 20 records stored");
    // nothing at all comes back: no ack, no empty Command
    assert!(
        s.next(Duration::from_secs(2)).await.is_none(),
        "a non-advertising stream got a Command"
    );
    // and its lines carry no identity keys (Elkeid's line format)
    for l in lines_of(&center, id) {
        assert!(l.get("agent_epoch").is_none(), "{l}");
    }
}
