//! Per-packet and per-record processing (spec §5.3).
//!
//! - 1000 (agent heartbeat): stored detail on the connection, numeric fields
//!   as JSON numbers except [`AGENT_STRING_FIELDS`]; on the first heartbeat of
//!   a connection, a config push from the manager backend (never empty).
//! - 1001 (plugin heartbeat): per-plugin detail keyed by `name`, numeric
//!   except `pversion`.
//! - Stored details are bounded per connection (64 KiB per body, 256
//!   plugins) and across all connections by the detail byte budget
//!   (`grpc.detail_budget_bytes`): a detail that does not fit is not stored
//!   (the previous one stays), counted in
//!   `elkeid_center_details_refused_total` and logged once a minute; the
//!   record still goes to the sinks.
//! - 2001, 2003, 6000, 5100, 5101, 8010: task results, with
//!   `"data_type": "<n>"` added, to the batched manager queue.
//! - 1010, 1011: agent logs, written to the center's log.
//! - every record, decodable or not: to the sinks.
//!
//! Numbers: a value becomes a number when it parses as a finite `f64`
//! (Rust's float syntax; Go's hex floats such as `0x1p4` stay strings);
//! integral values below 2^53 are written without a fraction, like Go's JSON.

use std::sync::Arc;

use elkeid_proto::grpc::{Command, PackagedData};
use serde_json::{Map, Number, Value};

use crate::ack::{AckStore, Admit, PacketId, Ticket};
use crate::manager::{Manager, TaskItem, TaskQueue};
use crate::metrics::{Metrics, inc};
use crate::now_unix;
use crate::pool::Conn;
use crate::sinks::{PacketBatch, Sinks};

// 1000 fields that stay strings.
use elkeid_core::schema::heartbeat::STRING_KEYS as AGENT_STRING_FIELDS;
// 1001 fields that stay strings.
use elkeid_core::schema::plugin_heartbeat::STRING_KEYS as PLUGIN_STRING_FIELDS;
use elkeid_core::schema::{data_type as dt, plugin_heartbeat};

/// Everything a stream handler needs.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) sinks: Sinks,
    pub(crate) manager: Arc<dyn Manager>,
    pub(crate) tasks: TaskQueue,
    pub(crate) metrics: Arc<Metrics>,
    /// Acknowledged delivery (None: disabled, the center then behaves as
    /// Elkeid's: no identity keys, no acknowledgements).
    pub(crate) acks: Option<Arc<AckStore>>,
}

/// What the acknowledgement path waits for after a packet with an identity.
#[derive(Debug)]
pub(crate) enum Pending {
    /// Stored: acknowledged when every sink made it durable (`true`).
    Stored(PacketId, tokio::sync::oneshot::Receiver<bool>),
    /// A re-send of a packet already accepted: acknowledged once that one
    /// is durable.
    Duplicate(PacketId),
    /// Refused (counted): acknowledged at once so the agent moves on.
    Refused(PacketId),
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("sinks", &self.sinks)
            .finish_non_exhaustive()
    }
}

/// A string value as JSON: a number when it parses as a finite float.
pub(crate) fn numeric(v: &str) -> Value {
    match v.trim().parse::<f64>() {
        Ok(f) if f.is_finite() && !v.is_empty() && v.trim() == v => {
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                // lossless: |f| < 2^53 and integral
                #[allow(clippy::cast_possible_truncation)]
                Value::Number(Number::from(f as i64))
            } else {
                Number::from_f64(f).map_or_else(|| Value::String(v.to_string()), Value::Number)
            }
        }
        _ => Value::String(v.to_string()),
    }
}

fn detail(fields: &[(&str, &str)], keep: &[&str]) -> Map<String, Value> {
    let mut m = Map::new();
    for &(k, v) in fields {
        let val = if keep.contains(&k) {
            Value::String(v.to_string())
        } else {
            numeric(v)
        };
        m.insert(k.to_string(), val);
    }
    m
}

fn strings(v: &[String]) -> Value {
    Value::Array(v.iter().map(|s| Value::String(s.clone())).collect())
}

/// Builds the stored 1000 detail.
pub(crate) fn agent_detail(
    fields: &[(&str, &str)],
    conn: &Conn,
    pkt: &PackagedData,
    now: i64,
) -> Map<String, Value> {
    let mut m = detail(fields, &AGENT_STRING_FIELDS);
    m.insert("agent_id".into(), Value::String(pkt.agent_id.clone()));
    m.insert("agent_addr".into(), Value::String(conn.addr.clone()));
    m.insert("create_at".into(), Value::Number(conn.create_at.into()));
    m.insert("intranet_ipv4".into(), strings(&pkt.intranet_ipv4));
    m.insert("extranet_ipv4".into(), strings(&pkt.extranet_ipv4));
    m.insert("intranet_ipv6".into(), strings(&pkt.intranet_ipv6));
    m.insert("extranet_ipv6".into(), strings(&pkt.extranet_ipv6));
    m.insert("version".into(), Value::String(pkt.version.clone()));
    m.insert("hostname".into(), Value::String(pkt.hostname.clone()));
    m.insert("product".into(), Value::String(pkt.product.clone()));
    m.insert("last_heartbeat_time".into(), Value::Number(now.into()));
    m
}

/// Most bytes of packet-level host metadata (agent id, hostname, version,
/// product, IP lists) times records a packet may carry: every record is
/// stored and sent with its own copy of that metadata, so a hostile agent
/// could otherwise turn a 10 MiB packet into terabytes (real agents: about
/// 2048 records x 1 KiB).
pub(crate) const MAX_PACKET_EXPANSION: u64 = 256 * 1024 * 1024;

/// Largest 1000/1001 heartbeat body kept as connection detail (real ones
/// are under 2 KiB; up to 256 plugin details are kept per connection).
pub(crate) const MAX_DETAIL_BYTES: usize = 64 * 1024;

/// Bytes of packet-level metadata copied into every record.
fn meta_len(pkt: &PackagedData) -> u64 {
    let ips = [
        &pkt.intranet_ipv4,
        &pkt.extranet_ipv4,
        &pkt.intranet_ipv6,
        &pkt.extranet_ipv6,
    ]
    .iter()
    .flat_map(|l| l.iter())
    .map(|s| s.len() as u64 + 1)
    .sum::<u64>();
    (pkt.agent_id.len() + pkt.hostname.len() + pkt.version.len() + pkt.product.len()) as u64 + ips
}

/// Processes one received packet and hands it to the sinks. With
/// acknowledgements on and a packet identity, returns what the
/// acknowledgement of this packet waits for.
pub(crate) async fn handle_packet(
    ctx: &Ctx,
    conn: &Arc<Conn>,
    pkt: PackagedData,
) -> Option<Pending> {
    let now = now_unix();
    let m = &ctx.metrics;
    let id = match &ctx.acks {
        Some(store) if pkt.ack_epoch != 0 => {
            let id = PacketId {
                epoch: pkt.ack_epoch,
                seq: pkt.ack_seq,
            };
            if store.admit(&conn.agent_id, id) == Admit::Duplicate {
                store
                    .metrics
                    .dup_packets
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                store.metrics.dup_records.fetch_add(
                    pkt.records.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                tracing::debug!(agent_id = %conn.agent_id, epoch = id.epoch, seq = id.seq, "duplicate packet dropped");
                return Some(Pending::Duplicate(id));
            }
            Some(id)
        }
        _ => None,
    };
    let expansion = meta_len(&pkt).saturating_mul(pkt.records.len() as u64);
    if expansion > MAX_PACKET_EXPANSION {
        inc(&m.oversized_packets);
        tracing::warn!(agent_id = %conn.agent_id, records = pkt.records.len(), meta_bytes = meta_len(&pkt), "packet refused: host metadata x records too large");
        return id.map(Pending::Refused);
    }
    inc(&m.recv_packets);
    m.recv_records.inc_by(pkt.records.len() as u64);
    // A map, not a linear scan: a packet may hold ~10^6 distinct data_types.
    // Runs of one data_type (the usual packet) touch it once per run.
    let mut counts: std::collections::BTreeMap<i32, u64> = std::collections::BTreeMap::new();
    let mut run: Option<(i32, u64)> = None;
    for rec in &pkt.records {
        let ty = rec.data_type;
        match &mut run {
            Some((t, n)) if *t == ty => *n += 1,
            _ => {
                if let Some((t, n)) = run.replace((ty, 1)) {
                    *counts.entry(t).or_default() += n;
                }
            }
        }
        let heartbeat = ty == dt::AGENT_HEARTBEAT || ty == dt::PLUGIN_HEARTBEAT;
        if !(heartbeat || dt::is_agent_log(ty) || dt::is_task_result(ty)) {
            continue;
        }
        if heartbeat && rec.data.len() > MAX_DETAIL_BYTES {
            // Kept per connection (1001: per plugin name): bound what one
            // agent can pin in memory. The record still goes to the sinks.
            inc(&m.payload_errors);
            tracing::warn!(agent_id = %conn.agent_id, data_type = ty, bytes = rec.data.len(), "heartbeat too large to keep as connection detail");
            continue;
        }
        let fields = match elkeid_core::payload::decode_utf8(&rec.data) {
            Ok(f) => f,
            Err(error) => {
                inc(&m.payload_errors);
                tracing::debug!(agent_id = %conn.agent_id, data_type = ty, %error, "record body is not a Payload");
                continue;
            }
        };
        match ty {
            dt::AGENT_HEARTBEAT => {
                let d = agent_detail(&fields, conn, &pkt, now);
                if conn.take_first_heartbeat() {
                    push_configs(ctx, conn, d.clone());
                }
                if !conn.store_detail(d) {
                    detail_refused(ctx, conn, ty);
                }
            }
            dt::PLUGIN_HEARTBEAT => {
                let Some(&(_, name)) = fields
                    .iter()
                    .rev()
                    .find(|(k, _)| *k == plugin_heartbeat::NAME)
                else {
                    inc(&m.payload_errors);
                    continue;
                };
                let mut d = detail(&fields, &PLUGIN_STRING_FIELDS);
                d.insert("last_heartbeat_time".into(), Value::Number(now.into()));
                // bounded per connection (plugin names) and by the budget of all
                if !conn.store_plugin(name, d) {
                    detail_refused(ctx, conn, ty);
                }
            }
            dt::AGENT_LOG | dt::AGENT_LOG_2 => {
                let map: std::collections::BTreeMap<&str, &str> = fields.iter().copied().collect();
                tracing::info!(target: "elkeid_center::agent_log", agent_id = %conn.agent_id, data_type = ty, fields = ?map, "agent log");
            }
            _ => {
                let mut f: Map<String, Value> = fields
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), Value::String((*v).to_string())))
                    .collect();
                f.insert("data_type".into(), Value::String(ty.to_string()));
                ctx.tasks.push(TaskItem {
                    agent_id: conn.agent_id.clone(),
                    fields: f,
                });
            }
        }
    }
    if let Some((t, n)) = run {
        *counts.entry(t).or_default() += n;
    }
    m.add_data_types(&counts.into_iter().collect::<Vec<_>>());
    let (ticket, pending) = match id {
        Some(id) => {
            let (t, rx) = Ticket::new();
            (Some(t), Some(Pending::Stored(id, rx)))
        }
        None => (None, None),
    };
    let tag = ctx.manager.tag(&pkt.agent_id);
    let batch = Arc::new(PacketBatch::from_packet(pkt, now, tag, id, ticket));
    ctx.sinks.send(&batch).await;
    pending
}

/// Counts a heartbeat detail that was not stored; logs at most once per
/// interval how many were refused since the last line.
fn detail_refused(ctx: &Ctx, conn: &Conn, data_type: i32) {
    inc(&ctx.metrics.details_refused);
    if let Some(n) = conn.detail_refused() {
        tracing::warn!(
            agent_id = %conn.agent_id,
            data_type,
            refused = n,
            "heartbeat details not stored: detail byte budget of all connections full (grpc.detail_budget_bytes) or 256 plugins on one connection; /conn/stat keeps the previous ones"
        );
    }
}

/// Asks the manager for the agent's components and queues one config
/// Command; nothing is sent when the list is empty.
fn push_configs(ctx: &Ctx, conn: &Arc<Conn>, detail: Map<String, Value>) {
    let manager = ctx.manager.clone();
    let metrics = ctx.metrics.clone();
    let conn = conn.clone();
    tokio::spawn(async move {
        match manager.configs(&conn.agent_id, &detail).await {
            Ok(list) if list.is_empty() => {
                tracing::debug!(agent_id = %conn.agent_id, "no components for agent; nothing pushed");
            }
            Ok(list) => {
                let n = list.len();
                let cmd = Command {
                    agent_ctrl: 0,
                    task: None,
                    configs: list.into_iter().map(Into::into).collect(),
                    ..Default::default()
                };
                match conn.try_push(cmd) {
                    Ok(()) => {
                        inc(&metrics.config_pushes);
                        tracing::info!(agent_id = %conn.agent_id, components = n, "config push queued");
                    }
                    Err(error) => {
                        inc(&metrics.config_push_failures);
                        tracing::warn!(agent_id = %conn.agent_id, %error, "config push not queued");
                    }
                }
            }
            Err(error) => {
                inc(&metrics.config_push_failures);
                tracing::warn!(agent_id = %conn.agent_id, %error, "config fetch failed");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_conversion() {
        assert_eq!(numeric("12"), Value::from(12));
        assert_eq!(numeric("0.25000000"), Value::from(0.25));
        assert_eq!(numeric("-3"), Value::from(-3));
        assert_eq!(numeric("1e3"), Value::from(1000));
        assert_eq!(numeric("NaN"), Value::from("NaN"));
        assert_eq!(numeric("inf"), Value::from("inf"));
        assert_eq!(numeric("1e400"), Value::from("1e400"));
        assert_eq!(numeric(""), Value::from(""));
        assert_eq!(numeric(" 5"), Value::from(" 5"));
        assert_eq!(numeric("10.0.0.1"), Value::from("10.0.0.1"));
        assert_eq!(
            serde_json::to_string(&numeric("0.50000000")).unwrap(),
            "0.5"
        );
        assert_eq!(
            serde_json::to_string(&numeric("1700000000.00000000")).unwrap(),
            "1700000000"
        );
    }

    /// What a real agent's stored details cost against the detail budget
    /// (the figure behind the 256 MiB default: ~26 KiB per agent at 10,000).
    #[test]
    fn a_real_agents_details_cost_a_few_kib() {
        use crate::budget::map_cost;
        use elkeid_core::schema::{heartbeat, plugin_heartbeat};
        // Every key an agent sends, with 16-byte values (numbers and names
        // are shorter, kernel versions about as long).
        let value = "0123456789abcdef";
        let agent: Vec<(&str, &str)> = heartbeat::KEYS.iter().map(|k| (*k, value)).collect();
        let pool = crate::pool::Pool::new(
            1,
            crate::config::CommandConfig {
                queue_len: 1,
                send_timeout: std::time::Duration::from_secs(1),
                result_timeout: std::time::Duration::from_secs(1),
                queue_bytes: 1,
                total_queue_bytes: 1,
            },
            1,
            Arc::new(Metrics::default()),
        );
        let (reg, _rx) = pool.register("a", "10.0.0.5:40000".into(), pool.try_slot().unwrap());
        let pkt = PackagedData {
            agent_id: "0f8fad5b-d9cb-469f-a165-70867728950e".into(),
            hostname: "web-1.example.com".into(),
            version: "1.9.1.4".into(),
            product: "elkeid-agent".into(),
            intranet_ipv4: vec!["10.0.0.5".into(), "172.17.0.1".into()],
            intranet_ipv6: vec!["fe80::1".into()],
            ..Default::default()
        };
        let agent_cost = map_cost(&agent_detail(&agent, &reg.conn, &pkt, 1));
        let plugin: Vec<(&str, &str)> =
            plugin_heartbeat::KEYS.iter().map(|k| (*k, value)).collect();
        let plugin_cost = map_cost(&detail(&plugin, &PLUGIN_STRING_FIELDS)) + 16;
        eprintln!("agent detail {agent_cost} B, plugin detail {plugin_cost} B");
        assert!(agent_cost < 5 * 1024, "{agent_cost}");
        assert!(plugin_cost < 2 * 1024, "{plugin_cost}");
        // An agent with 4 plugins: well under the 26 KiB per agent the
        // default budget leaves at the default conn_limit.
        assert!(agent_cost + 4 * plugin_cost < 10 * 1024);
    }

    #[tokio::test]
    async fn packet_with_huge_metadata_times_records_is_refused() {
        let metrics = Arc::new(Metrics::default());
        let dir = tempfile::tempdir().unwrap();
        let manager = crate::manager::local::LocalManager::start(
            dir.path().join("components.json"),
            dir.path().join("results.ndjson"),
        );
        let (tasks, _done) = TaskQueue::start(manager.clone(), metrics.clone(), 1 << 20);
        let ctx = Ctx {
            sinks: Sinks::new(Vec::new(), metrics.clone()),
            manager,
            tasks,
            metrics: metrics.clone(),
            acks: None,
        };
        let pool = crate::pool::Pool::new(
            4,
            crate::config::CommandConfig {
                queue_len: 4,
                send_timeout: std::time::Duration::from_secs(2),
                result_timeout: std::time::Duration::from_secs(2),
                queue_bytes: 1 << 20,
                total_queue_bytes: 1 << 20,
            },
            1 << 20,
            metrics.clone(),
        );
        let (reg, _rx) = pool.register("a", "x:1".into(), pool.try_slot().unwrap());
        let rec = elkeid_proto::grpc::EncodedRecord {
            data_type: 5,
            ..Default::default()
        };
        // 1 MiB hostname x 300 records: 300 MiB of copies.
        let hostile = PackagedData {
            agent_id: "a".into(),
            hostname: "h".repeat(1 << 20),
            records: vec![rec.clone(); 300],
            ..Default::default()
        };
        handle_packet(&ctx, &reg.conn, hostile).await;
        assert_eq!(metrics.oversized_packets.get(), 1);
        assert_eq!(metrics.recv_packets.get(), 0);
        let normal = PackagedData {
            agent_id: "a".into(),
            hostname: "host-1".into(),
            intranet_ipv4: vec!["10.0.0.1".into(); 64],
            records: vec![rec; 2048],
            ..Default::default()
        };
        handle_packet(&ctx, &reg.conn, normal).await;
        assert_eq!(metrics.oversized_packets.get(), 1);
        assert_eq!(metrics.recv_packets.get(), 1);

        // A plugin heartbeat too large to keep per connection.
        let big = elkeid_proto::grpc::EncodedRecord {
            data_type: 1001,
            data: crate::test_payload(&[("name", "p"), ("x", &"y".repeat(100_000))]).into(),
            ..Default::default()
        };
        let small = elkeid_proto::grpc::EncodedRecord {
            data_type: 1001,
            data: crate::test_payload(&[("name", "q"), ("pversion", "1")]).into(),
            ..Default::default()
        };
        let pkt = PackagedData {
            agent_id: "a".into(),
            records: vec![big, small],
            ..Default::default()
        };
        handle_packet(&ctx, &reg.conn, pkt).await;
        let plugins = reg.conn.plugins.lock().unwrap();
        assert!(!plugins.contains_key("p"));
        assert!(plugins.contains_key("q"));
        assert_eq!(metrics.payload_errors.get(), 1);
    }

    #[test]
    fn kept_strings() {
        let d = detail(
            &[("version", "1.0"), ("cpu", "0.5"), ("host_serial", "123")],
            &AGENT_STRING_FIELDS,
        );
        assert_eq!(d["version"], Value::from("1.0"));
        assert_eq!(d["host_serial"], Value::from("123"));
        assert_eq!(d["cpu"], Value::from(0.5));
        let p = detail(
            &[("pversion", "1.7"), ("rss", "100")],
            &PLUGIN_STRING_FIELDS,
        );
        assert_eq!(p["pversion"], Value::from("1.7"));
        assert_eq!(p["rss"], Value::from(100));
    }
}
