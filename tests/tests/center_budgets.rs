//! Global bounds of the center, against the real binary (issue 10): stored
//! heartbeat details share one byte budget across all connections, queued
//! commands are bounded in bytes (refused through the HTTP API with a clear
//! error), and TLS handshakes that never complete are closed within their
//! deadline and counted while real agents keep connecting.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use elkeid_tests::Center;
use elkeid_tests::center::{eventually, heartbeat, http, record, unix_now};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The value of the sample whose line starts with `prefix` (name and
/// labels), 0 when absent.
async fn sample(center: &Center, prefix: &str) -> u64 {
    let r = http(center.api_target(), "GET", "/metrics", &[], b"").await;
    let text = String::from_utf8(r.body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{prefix} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A 1000 heartbeat carrying `pad` bytes of padding (under the 64 KiB
/// per-body cap, so only the global budget can refuse it).
fn fat_heartbeat(pad: &str) -> elkeid_proto::grpc::EncodedRecord {
    record(1000, unix_now(), &[("arch", "x86_64"), ("pad", pad)])
}

/// `GET /conn/stat`: (agents with a stored 1000 detail, plugin details).
async fn stored(center: &Center) -> (usize, usize) {
    let (status, v) = center.api("GET", "/conn/stat", b"").await;
    assert_eq!((status, &v["code"]), (200, &json!(0)), "{v}");
    let list = v["data"].as_array().unwrap();
    let agents = list
        .iter()
        .filter(|a| a["agent_info"].as_object().is_some_and(|m| !m.is_empty()))
        .count();
    let plugins = list
        .iter()
        .map(|a| a["plugins_info"].as_array().map_or(0, Vec::len))
        .sum();
    (agents, plugins)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_details_of_all_connections_share_one_byte_budget() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &["--detail-budget-bytes", "400000"]);
    let pad = "p".repeat(50_000);
    // 20 agents x ~50 KB: 1 MB offered, 400 kB allowed (about 7 details).
    let mut streams = Vec::new();
    for i in 0..20 {
        streams.push(
            center
                .open_stream(&format!("fat-{i}"), vec![fat_heartbeat(&pad)])
                .await,
        );
    }
    // Every first heartbeat is either stored or refused (counted).
    let (agents, refused) = eventually(Duration::from_secs(20), || async {
        let n = sample(&center, "elkeid_center_details_refused_total").await;
        let (a, _) = stored(&center).await;
        (a as u64 + n == 20).then_some((a, n))
    })
    .await
    .expect("every heartbeat stored or refused");
    assert!((5..=8).contains(&agents), "{agents} details stored");
    assert_eq!(center.conn_list().await.len(), 20, "agents stay connected");
    let held = sample(&center, "elkeid_center_detail_bytes").await;
    assert!(held <= 400_000 && held > 250_000, "{held}");
    // Plugin heartbeats (1001) draw on the same budget.
    let plugins: Vec<_> = (0..30)
        .map(|i| {
            record(
                1001,
                unix_now(),
                &[("name", &format!("plugin-{i}")), ("pad", &pad)],
            )
        })
        .collect();
    streams[0].send(plugins).await;
    eventually(Duration::from_secs(20), || async {
        (sample(&center, "elkeid_center_details_refused_total").await >= refused + 30).then_some(())
    })
    .await
    .expect("plugin details refused too");
    assert_eq!(stored(&center).await.1, 0);
    // The records themselves still reached the sink.
    let names = eventually(Duration::from_secs(20), || async {
        let n = center
            .ndjson_records()
            .iter()
            .filter(|r| r["data_type"] == 1001)
            .count();
        (n == 30).then_some(n)
    })
    .await;
    assert_eq!(names, Some(30));
    // Connections that end give their bytes back; new details fit again.
    streams.clear();
    eventually(Duration::from_secs(20), || async {
        (sample(&center, "elkeid_center_detail_bytes").await == 0).then_some(())
    })
    .await
    .expect("budget released after disconnect");
    let _s = center.open_stream("after", vec![fat_heartbeat(&pad)]).await;
    let ok = eventually(Duration::from_secs(20), || async {
        (stored(&center).await.0 == 1).then_some(())
    })
    .await;
    assert!(ok.is_some(), "a new agent's detail is stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_over_the_queue_byte_budget_are_refused_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(
        dir.path(),
        &[
            "--command-queue-bytes",
            "3000000",
            // How long a post waits for its command to be handed to the
            // stream: short, so commands pile up quickly, but long enough
            // for the last post below (a reading agent) on a loaded machine.
            "--command-result-timeout-ms",
            "2000",
        ],
    );
    let mut s = center
        .open_stream("slow-reader", vec![heartbeat(unix_now())])
        .await;
    eventually(Duration::from_secs(10), || async {
        (center.conn_list().await == ["slow-reader"]).then_some(())
    })
    .await
    .unwrap();
    // The agent reads none of its commands: once HTTP/2 flow control stops
    // the sending, 1 MiB tasks pile up in its queue until its budget (3 MB)
    // refuses the next one.
    // Not compressible (the stream is snappy-compressed): pseudo-random letters.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let data: String = (0..1 << 20)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            char::from(b'a' + ((x >> 33) % 26) as u8)
        })
        .collect();
    let body = |i: usize| {
        json!({"agent_id": "slow-reader", "command": {"task": {
            "data_type": 8001, "name": "collector", "data": data, "token": format!("t{i}")}}})
    };
    let mut refusal: Option<Value> = None;
    let mut posted = 0;
    for i in 0..40 {
        let v = center.command(&body(i)).await;
        posted += 1;
        if v["code"] == 3
            && v["data"]
                .as_str()
                .is_some_and(|d| d.contains("byte budget"))
        {
            refusal = Some(v);
            break;
        }
        assert!(v["code"] == 0 || v["code"] == 3, "{v}");
    }
    let v = refusal.unwrap_or_else(|| panic!("no refusal after {posted} commands of 1 MiB"));
    assert_eq!(v["msg"], "some errors occurred", "{v}");
    let msg = v["data"].as_str().unwrap();
    assert!(
        msg.contains("agent's command queue byte budget") && msg.contains("of 3000000 bytes"),
        "{msg}"
    );
    assert_eq!(
        center
            .metric("elkeid_center_commands_refused_bytes_total")
            .await,
        1
    );
    let queued = center.metric("elkeid_center_command_queue_bytes").await;
    assert!(queued > 1 << 20 && queued <= 3_000_000, "{queued}");
    // The agent reads: every accepted command arrives, the budget empties,
    // and new commands go through.
    let mut got = 0;
    while let Some(Ok(Some(c))) = s.next(Duration::from_secs(3)).await {
        assert_eq!(c.task.unwrap().data.len(), 1 << 20);
        got += 1;
    }
    assert_eq!(got, posted - 1, "every command not refused was delivered");
    assert_eq!(center.metric("elkeid_center_command_queue_bytes").await, 0);
    let reader = tokio::spawn(async move { s.next(Duration::from_secs(10)).await.is_some() });
    let v = center.command(&body(1000)).await;
    assert_eq!(v["code"], 0, "{v}");
    assert!(reader.await.unwrap());
}

/// The first bytes of a ClientHello: a handshake record announcing 512
/// bytes, of which only a few follow.
const HALF_CLIENT_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];

/// Reads until the peer closes (EOF or reset); when that was.
async fn closed_at(mut s: tokio::net::TcpStream, limit: Duration) -> Option<Instant> {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_that_never_complete_are_closed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let center = Center::start(dir.path(), &["--tls-handshake-timeout-secs", "2"]);
    // Each stalled connection with the instant its connect began (the
    // center's deadline starts later, when it accepts it).
    let mut socks = Vec::new();
    for i in 0..20 {
        let at = Instant::now();
        let mut s = tokio::net::TcpStream::connect(center.grpc).await.unwrap();
        if i % 2 == 1 {
            s.write_all(HALF_CLIENT_HELLO).await.unwrap();
        }
        socks.push((s, at));
    }
    let at = Instant::now();
    let api_idle = tokio::net::TcpStream::connect(center.http).await.unwrap();
    socks.push((api_idle, at));
    let waits: Vec<_> = socks
        .into_iter()
        .map(|(s, at)| (tokio::spawn(closed_at(s, Duration::from_secs(20))), at))
        .collect();
    // Meanwhile a real agent connects and registers.
    let _agent = center
        .open_stream("real", vec![heartbeat(unix_now())])
        .await;
    assert_eq!(center.conn_list().await, vec!["real".to_string()]);
    // Every stalled connection is closed by the center, after the 2 s
    // deadline (well before the 10 s default), each timed from its own
    // connect (not from the first one's, nor after the agent's handshake).
    for (w, at) in waits {
        let open = w
            .await
            .unwrap()
            .expect("a stalled connection stayed open")
            .duration_since(at);
        assert!(open >= Duration::from_secs(2), "closed after {open:?}");
        assert!(open < Duration::from_secs(8), "closed after {open:?}");
    }
    let grpc_timeouts =
        r#"elkeid_center_tls_handshakes_refused_total{listener="grpc",reason="timeout"}"#;
    let http_timeouts =
        r#"elkeid_center_tls_handshakes_refused_total{listener="http",reason="timeout"}"#;
    assert_eq!(sample(&center, grpc_timeouts).await, 20);
    assert_eq!(sample(&center, http_timeouts).await, 1);
    // A handshake that fails (not TLS at all) is closed and counted at once.
    let mut g = tokio::net::TcpStream::connect(center.grpc).await.unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_at(g, Duration::from_secs(20)).await.is_some());
    let failed = r#"elkeid_center_tls_handshakes_refused_total{listener="grpc",reason="failed"}"#;
    let n = eventually(Duration::from_secs(5), || async {
        let n = sample(&center, failed).await;
        (n == 1).then_some(n)
    })
    .await;
    assert_eq!(n, Some(1));
    // The real agent's stream is still there, and new agents still connect.
    let _again = center
        .open_stream("second", vec![heartbeat(unix_now())])
        .await;
    let mut list = center.conn_list().await;
    list.sort();
    assert_eq!(list, vec!["real".to_string(), "second".to_string()]);
}
