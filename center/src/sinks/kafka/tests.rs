//! Kafka sink against a real Kafka-protocol broker (tansu in CI).
//!
//! `ELKEID_TEST_KAFKA=host:port` names a running broker and
//! `ELKEID_TEST_TANSU` the `tansu` binary (`eval "$(bash tests/kafka-broker.sh
//! start)"` exports both). Without them at build time these tests are
//! reported `ignored, SKIPPED: …` by `cargo test` (see `center/build.rs`);
//! with `CI` set they always run and fail without a broker. The
//! back-pressure test starts its own private `tansu` so it can freeze it
//! with SIGSTOP without disturbing other tests.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elkeid_proto::grpc::{EncodedRecord, MqData};
use prost::Message;
use rskafka::client::ClientBuilder;
use rskafka::client::partition::{OffsetAt, UnknownTopicHandling};
use rskafka::record::Record;

use super::config::{KafkaCompression, OverflowPolicy};
use super::encode::partition_for;
use super::*;
use crate::sinks::{PacketBatch, Sink, SinkError};

/// The value of `var`; these tests only run when it was set at build time
/// (or under `CI`), so a missing one is a failure, never a silent pass.
fn require(var: &str, what: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => v,
        _ => panic!(
            "{var} is not set: {what} (run `eval \"$(bash tests/kafka-broker.sh start)\"`, \
             which exports it)"
        ),
    }
}

fn broker() -> String {
    require("ELKEID_TEST_KAFKA", "Kafka sink tests need a real broker")
}

fn unique_topic(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("sinktest-{name}-{}-{nanos}", std::process::id())
}

fn config(broker: &str, topic: &str) -> KafkaConfig {
    KafkaConfig {
        brokers: vec![broker.to_string()],
        topic: topic.to_string(),
        linger_ms: 5,
        request_timeout_ms: 20_000,
        flush_timeout_ms: 60_000,
        ..KafkaConfig::default()
    }
}

/// A heartbeat-like Payload: `{1: {1: key, 2: value}}` per entry.
fn payload(pairs: &[(&str, &str)]) -> Bytes {
    let mut out = Vec::new();
    for (k, v) in pairs {
        let entry_len = 2 + k.len() + 2 + v.len();
        out.extend_from_slice(&[
            0x0a,
            u8::try_from(entry_len).unwrap(),
            0x0a,
            u8::try_from(k.len()).unwrap(),
        ]);
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&[0x12, u8::try_from(v.len()).unwrap()]);
        out.extend_from_slice(v.as_bytes());
    }
    Bytes::from(out)
}

fn batch(agent: &str, svr_time: i64, n: usize) -> Arc<PacketBatch> {
    Arc::new(PacketBatch {
        svr_time,
        agent_id: agent.into(),
        intranet_ipv4: vec!["10.1.2.3".into(), "192.168.0.9".into()],
        extranet_ipv4: vec!["1.2.3.4".into()],
        intranet_ipv6: vec![],
        extranet_ipv6: vec!["2001:db8::1".into(), "2001:db8::2".into()],
        hostname: format!("host-{agent}"),
        version: "1.9.1.4".into(),
        product: "elkeid-rs".into(),
        tag: "blue".into(),
        records: (0..n)
            .map(|i| EncodedRecord {
                data_type: 5000 + i32::try_from(i).unwrap(),
                timestamp: 1_700_000_000 + i64::try_from(i).unwrap(),
                data: payload(&[("seq", &i.to_string()), ("agent", agent)]),
            })
            .collect(),
        id: None,
        ticket: None,
    })
}

/// Every message of `topic`, per partition in offset order.
async fn read_all(broker: &str, topic: &str, partitions: i32) -> Vec<(i32, Record)> {
    let client = ClientBuilder::new(vec![broker.to_string()])
        .build()
        .await
        .unwrap();
    let mut out = Vec::new();
    for p in 0..partitions {
        let pc = client
            .partition_client(topic, p, UnknownTopicHandling::Retry)
            .await
            .unwrap();
        let high = pc.get_offset(OffsetAt::Latest).await.unwrap();
        let mut offset = pc.get_offset(OffsetAt::Earliest).await.unwrap();
        while offset < high {
            let (recs, _) = pc.fetch_records(offset, 1..4_000_000, 500).await.unwrap();
            assert!(
                !recs.is_empty() || offset >= high,
                "fetch at {offset} < {high} returned nothing"
            );
            for r in recs {
                offset = r.offset + 1;
                out.push((p, r.record));
            }
        }
    }
    out
}

fn check_message(p: i32, rec: &Record, partitions: i32, b: &PacketBatch, i: usize) {
    let key = rec.key.as_deref().unwrap();
    assert_eq!(key, b.agent_id.as_bytes(), "key = agent id");
    assert_eq!(p, partition_for(key, partitions), "sarama hash partition");
    let m = MqData::decode(rec.value.as_deref().unwrap()).unwrap();
    let r = &b.records[i];
    assert_eq!(m.data_type, r.data_type);
    assert_eq!(m.agent_time, r.timestamp);
    assert_eq!(m.body, r.data, "body is the Payload unchanged");
    assert_eq!(m.agent_id, b.agent_id);
    assert_eq!(m.intranet_ipv4, "10.1.2.3,192.168.0.9");
    assert_eq!(m.extranet_ipv4, "1.2.3.4");
    assert_eq!(m.intranet_ipv6, "");
    assert_eq!(m.extranet_ipv6, "2001:db8::1,2001:db8::2");
    assert_eq!(m.hostname, b.hostname);
    assert_eq!(m.version, "1.9.1.4");
    assert_eq!(m.product, "elkeid-rs");
    assert_eq!(m.svr_time, b.svr_time);
    assert_eq!(m.psm_name, "");
    assert_eq!(m.psm_path, "");
    assert_eq!(m.tag, "blue");
    assert_eq!(
        rec.timestamp.timestamp(),
        b.svr_time,
        "message timestamp = server receive time"
    );
}

/// Checks that `got` holds exactly the records of `batches`, each agent's in order.
fn check_all(got: &[(i32, Record)], partitions: i32, batches: &[Arc<PacketBatch>]) {
    let total: usize = batches.iter().map(|b| b.records.len()).sum();
    assert_eq!(got.len(), total, "one message per record");
    let agents: std::collections::BTreeSet<&str> =
        batches.iter().map(|b| b.agent_id.as_str()).collect();
    for agent in agents {
        let mine: Vec<&(i32, Record)> = got
            .iter()
            .filter(|(_, r)| r.key.as_deref() == Some(agent.as_bytes()))
            .collect();
        let want: Vec<(&PacketBatch, usize)> = batches
            .iter()
            .filter(|b| b.agent_id == agent)
            .flat_map(|b| (0..b.records.len()).map(move |i| (&**b, i)))
            .collect();
        assert_eq!(mine.len(), want.len(), "agent {agent}");
        for ((p, rec), (b, i)) in mine.into_iter().zip(want) {
            check_message(*p, rec, partitions, b, i);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(elkeid_test_kafka),
    ignore = "SKIPPED: no Kafka broker (ELKEID_TEST_KAFKA unset at build time; eval \"$(bash tests/kafka-broker.sh start)\")"
)]
async fn records_round_trip_through_a_real_broker() {
    let broker = broker();
    let topic = unique_topic("roundtrip");
    let cfg = KafkaConfig {
        create_partitions: 3,
        ..config(&broker, &topic)
    };
    let sink = KafkaSink::connect(cfg).await.unwrap();
    assert_eq!(sink.name(), "kafka");
    let batches = vec![
        batch("agent-a", 1_700_000_500, 3),
        batch("agent-b", 1_700_000_501, 5),
        batch("agent-a", 1_700_000_502, 2),
        batch("agent-c", 1_700_000_503, 1),
        batch("agent-b", 1_700_000_504, 0),
    ];
    for b in &batches {
        sink.send(b).await.unwrap();
    }
    sink.flush().await.unwrap();
    let stats = sink.stats();
    assert_eq!(
        stats.accepted.load(std::sync::atomic::Ordering::Relaxed),
        11
    );
    assert_eq!(
        stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
        11
    );
    assert_eq!(stats.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(sink.in_flight_bytes(), 0);
    assert_eq!(sink.lag(), 0);
    let counters = sink.counters();
    assert!(
        counters.contains(&("delivered", 11)) && counters.contains(&("dropped", 0)),
        "{counters:?}"
    );
    let got = read_all(&broker, &topic, 3).await;
    check_all(&got, 3, &batches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(elkeid_test_kafka),
    ignore = "SKIPPED: no Kafka broker (ELKEID_TEST_KAFKA unset at build time; eval \"$(bash tests/kafka-broker.sh start)\")"
)]
async fn every_compression_round_trips() {
    let broker = broker();
    for c in [
        KafkaCompression::Gzip,
        KafkaCompression::Snappy,
        KafkaCompression::Lz4,
        KafkaCompression::Zstd,
    ] {
        let topic = unique_topic(&format!("{c:?}").to_lowercase());
        let sink = KafkaSink::connect(KafkaConfig {
            compression: c,
            ..config(&broker, &topic)
        })
        .await
        .unwrap();
        let batches = vec![
            batch("agent-z", 1_700_000_900, 50),
            batch("agent-y", 1_700_000_901, 7),
        ];
        for b in &batches {
            sink.send(b).await.unwrap();
        }
        sink.flush().await.unwrap();
        let got = read_all(&broker, &topic, 1).await;
        check_all(&got, 1, &batches);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(elkeid_test_kafka),
    ignore = "SKIPPED: no Kafka broker (ELKEID_TEST_KAFKA unset at build time; eval \"$(bash tests/kafka-broker.sh start)\")"
)]
async fn batches_split_at_batch_bytes() {
    let broker = broker();
    let batches = vec![batch("agent-s", 1_700_001_000, 40)];
    let values = super::encode::encode_batch(&batches[0]);
    let bytes: usize = values.iter().map(Vec::len).sum();
    // A batch holds at most 300 bytes, or one record when that is larger.
    let per_batch = values.iter().map(Vec::len).max().unwrap_or(0).max(300);
    // The same 40 records with the default 1 MiB limit, then with 300 bytes:
    // one produce request, then at least one per 300 bytes of values.
    let mut requests = Vec::new();
    for (name, batch_bytes) in [("whole", 1024 * 1024), ("split", 300)] {
        let topic = unique_topic(name);
        let sink = KafkaSink::connect(KafkaConfig {
            batch_bytes,
            ..config(&broker, &topic)
        })
        .await
        .unwrap();
        sink.send(&batches[0]).await.unwrap();
        sink.flush().await.unwrap();
        check_all(&read_all(&broker, &topic, 1).await, 1, &batches);
        requests.push(
            sink.stats()
                .produced_batches
                .load(std::sync::atomic::Ordering::Relaxed),
        );
    }
    assert_eq!(requests[0], 1, "one request under the default limit");
    assert!(
        requests[1] > 1 && requests[1] as usize >= bytes / per_batch,
        "{} requests for {bytes} bytes at 300 bytes per batch",
        requests[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(elkeid_test_kafka),
    ignore = "SKIPPED: no Kafka broker (ELKEID_TEST_KAFKA unset at build time; eval \"$(bash tests/kafka-broker.sh start)\")"
)]
async fn missing_topic_without_create_is_a_clear_error() {
    let broker = broker();
    let topic = unique_topic("absent");
    let err = KafkaSink::connect(KafkaConfig {
        create_topic: false,
        ..config(&broker, &topic)
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(elkeid_test_kafka),
    ignore = "SKIPPED: no Kafka broker (ELKEID_TEST_KAFKA unset at build time; eval \"$(bash tests/kafka-broker.sh start)\")"
)]
async fn oversized_records_are_counted_not_sent() {
    let broker = broker();
    let topic = unique_topic("oversized");
    let sink = KafkaSink::connect(KafkaConfig {
        max_message_bytes: 200,
        ..config(&broker, &topic)
    })
    .await
    .unwrap();
    let mut b = (*batch("agent-o", 1_700_002_000, 2)).clone();
    b.records[1].data = Bytes::from(vec![b'x'; 500]);
    let b = Arc::new(b);
    sink.send(&b).await.unwrap();
    sink.flush().await.unwrap();
    assert_eq!(
        sink.stats()
            .oversized
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    let got = read_all(&broker, &topic, 1).await;
    assert_eq!(got.len(), 1);
    check_message(got[0].0, &got[0].1, 1, &b, 0);
}

/// A private tansu broker, SIGCONT + SIGKILL on drop.
struct OwnBroker {
    child: Child,
    addr: String,
}

impl OwnBroker {
    fn start() -> OwnBroker {
        let tansu = std::env::var("ELKEID_TEST_TANSU")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "tansu".into());
        let runs = Command::new(&tansu)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !runs {
            require(
                "ELKEID_TEST_TANSU",
                "the back-pressure test starts its own `tansu` broker; none runs",
            );
            panic!("ELKEID_TEST_TANSU={tansu} does not run");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "own tansu did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnBroker { child, addr }
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(sig)
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(st.success(), "kill {sig}");
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(elkeid_test_tansu),
    ignore = "SKIPPED: no tansu broker binary (ELKEID_TEST_TANSU unset at build time; eval \"$(bash tests/kafka-broker.sh start)\")"
)]
async fn frozen_broker_blocks_senders_or_drops_by_policy() {
    let own = OwnBroker::start();
    let (t_block, t_drop) = (unique_topic("block"), unique_topic("drop"));
    let a = batch("agent-p", 1_700_003_000, 4);
    let b = batch("agent-p", 1_700_003_001, 4);
    let one = super::encode::encode_batch(&a)
        .iter()
        .map(Vec::len)
        .sum::<usize>()
        + 4 * "agent-p".len();
    // Room for one batch, not two; no retry while the broker is frozen.
    let tight = |topic: &str, overflow| KafkaConfig {
        queue_bytes: one + one / 2,
        overflow,
        request_timeout_ms: 120_000,
        ..config(&own.addr, topic)
    };
    let blocking = KafkaSink::connect(tight(&t_block, OverflowPolicy::Block))
        .await
        .unwrap();
    let dropping = KafkaSink::connect(tight(&t_drop, OverflowPolicy::Drop))
        .await
        .unwrap();

    own.signal("-STOP");
    blocking.send(&a).await.unwrap();
    dropping.send(&a).await.unwrap();
    // Kafka cannot acknowledge `a`, so there is no room for `b`:
    let mut pending = Box::pin(blocking.send(&b));
    assert!(
        tokio::time::timeout(Duration::from_secs(1), &mut pending)
            .await
            .is_err(),
        "send must wait while the broker holds the queue full"
    );
    assert!(matches!(
        dropping.send(&b).await,
        Err(SinkError::Dropped("kafka"))
    ));
    assert_eq!(
        dropping
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    assert!(blocking.in_flight_bytes() > 0);

    own.signal("-CONT");
    tokio::time::timeout(Duration::from_secs(120), pending)
        .await
        .expect("send resumes")
        .unwrap();
    blocking.flush().await.unwrap();
    dropping.flush().await.unwrap();
    assert_eq!(
        blocking
            .stats()
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    check_all(&read_all(&own.addr, &t_block, 1).await, 1, &[a.clone(), b]);
    check_all(&read_all(&own.addr, &t_drop, 1).await, 1, &[a]);
}
