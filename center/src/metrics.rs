//! Counters and the Prometheus text exposition, with the `prometheus-client`
//! crate: each counter is one `Counter` (an atomic) registered once in a
//! [`Registry`]; scrape-time values (stream count, sink lag, the sinks' own
//! counters) and the bounded per-`data_type` series come from a collector.
//! The output is the Prometheus text format 0.0.4
//! ([`CONTENT_TYPE`]).
//!
//! Elkeid names (kept so dashboards carry over): `elkeid_ac_grpc_conn_count`
//! (gauge), `elkeid_ac_grpc_recv_qps` (every packet received, the first of
//! each stream included), `elkeid_ac_grpc_send_qps` (commands sent),
//! `elkeid_ac_output_data_type_count{data_type}`. These three count up but
//! have no `_total` suffix; `prometheus-client` appends `_total` to every
//! metric typed `counter`, so they are exported with `# TYPE … untyped`
//! (Prometheus treats them alike; `rate()` works). Ours start with
//! `elkeid_center_` and are counters ending in `_total`. The per-agent
//! series of Elkeid (`elkeid_ac_output_count`, `elkeid_ac_agent_*`) are not
//! exported: at 10,000 agents they cost more than they tell; `/conn/stat`
//! has the same numbers.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

/// `Content-Type` of [`Metrics::render`]'s output (Prometheus text 0.0.4).
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Most distinct `data_type` series kept: agents choose the values, so an
/// unbounded map would let one agent grow the center's memory at will.
pub(crate) const MAX_DATA_TYPES: usize = 1024;

/// One `sink` label.
type SinkLabel = [(&'static str, &'static str); 1];
/// `listener` (`grpc`, `http`) and `reason` (`timeout`, `failed`).
type TlsLabel = [(&'static str, &'static str); 2];
type ResultLabel = [(&'static str, &'static str); 1];

/// All counters of the center.
#[derive(Debug)]
pub(crate) struct Metrics {
    pub(crate) recv_packets: Counter,
    pub(crate) recv_records: Counter,
    pub(crate) sent_commands: Counter,
    pub(crate) failed_commands: Counter,
    pub(crate) refused_limit: Counter,
    pub(crate) tcp_refused: Counter,
    pub(crate) refused_empty_id: Counter,
    pub(crate) refused_first_timeout: Counter,
    pub(crate) conflicts: Counter,
    pub(crate) streams_total: Counter,
    pub(crate) payload_errors: Counter,
    pub(crate) oversized_packets: Counter,
    pub(crate) task_results_dropped: Counter,
    pub(crate) task_results_failed: Counter,
    pub(crate) config_pushes: Counter,
    pub(crate) config_push_failures: Counter,
    pub(crate) uploads_ok: Counter,
    pub(crate) uploads_failed: Counter,
    pub(crate) auth_failures: Counter,
    pub(crate) http_replays_refused: Counter,
    pub(crate) http_bodies_refused: Counter,
    pub(crate) identity_mismatches: Counter,
    pub(crate) refused_identity_fields: Counter,
    pub(crate) refused_unidentified: Counter,
    pub(crate) details_refused: Counter,
    pub(crate) commands_refused_bytes: Counter,
    /// Stored 1000/1001 detail bytes of all connections.
    pub(crate) detail_bytes: Gauge,
    /// Bytes of commands waiting in the agents' queues.
    pub(crate) command_queue_bytes: Gauge,
    /// Bytes of task results waiting for the manager backend.
    pub(crate) task_queue_bytes: Gauge,
    /// TLS handshakes that did not complete, by listener and reason.
    tls_handshakes: Family<TlsLabel, Counter>,
    /// TLS handshakes completed, by listener and kind (full, resumed).
    tls_done: Family<TlsLabel, Counter>,
    /// Client certificate chains of the gRPC listener, by how they were
    /// accepted (see [`crate::certcache`]).
    tls_chains: Family<ResultLabel, Counter>,
    sink_errors: Family<SinkLabel, Counter>,
    sink_dropped: Family<SinkLabel, Counter>,
    /// Per-`data_type` record counts and the scrape-time values.
    live: Arc<Live>,
    registry: Registry,
    /// One scrape at a time: `render` fills `live.scrape`, then encodes.
    render_lock: Mutex<()>,
}

/// What the collector reads at scrape time.
#[derive(Debug, Default)]
struct Live {
    data_types: Mutex<BTreeMap<i32, u64>>,
    /// Records whose data_type arrived after [`MAX_DATA_TYPES`] distinct
    /// ones were already tracked (exported as `data_type="other"`).
    data_types_other: AtomicU64,
    scrape: Mutex<Scrape>,
}

/// Values owned elsewhere (pool, sinks), handed to [`Metrics::render`].
#[derive(Debug, Default)]
struct Scrape {
    conn_count: usize,
    sink_lag: Vec<(&'static str, usize)>,
    sink_counters: Vec<(&'static str, &'static str, u64)>,
}

/// A counter exported under its exact name, without the `_total` suffix
/// `prometheus-client` gives metrics typed `counter` (Elkeid's names).
#[derive(Debug, Clone)]
struct Untyped(Counter);

impl EncodeMetric for Untyped {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

/// Increments a counter by one.
pub(crate) fn inc(c: &Counter) {
    c.inc();
}

impl Default for Metrics {
    fn default() -> Self {
        let m = MetricsCounters::default();
        let live = Arc::new(Live::default());
        let mut r = Registry::default();
        // Elkeid's names first, as before.
        r.register_collector(Box::new(ConnCount(live.clone())));
        r.register(
            "elkeid_ac_grpc_recv_qps",
            "Packets received",
            Untyped(m.recv_packets.clone()),
        );
        r.register(
            "elkeid_ac_grpc_send_qps",
            "Commands sent",
            Untyped(m.sent_commands.clone()),
        );
        r.register_collector(Box::new(DataTypes(live.clone())));
        let counters: [(&str, &str, &Counter); 25] = [
            (
                "elkeid_center_tcp_refused",
                "TCP connections closed: too many open",
                &m.tcp_refused,
            ),
            (
                "elkeid_center_records_received",
                "Records received",
                &m.recv_records,
            ),
            (
                "elkeid_center_streams",
                "Agent streams registered",
                &m.streams_total,
            ),
            (
                "elkeid_center_commands_failed",
                "Commands not delivered",
                &m.failed_commands,
            ),
            (
                "elkeid_center_conn_refused_limit",
                "Streams refused: conn_limit reached",
                &m.refused_limit,
            ),
            (
                "elkeid_center_conn_refused_empty_id",
                "Streams refused: empty agent_id",
                &m.refused_empty_id,
            ),
            (
                "elkeid_center_conn_refused_first_packet_timeout",
                "Streams closed: no first packet in time",
                &m.refused_first_timeout,
            ),
            (
                "elkeid_center_agent_conflicts",
                "Streams replaced by a newer stream of the same agent id",
                &m.conflicts,
            ),
            (
                "elkeid_center_payload_decode_errors",
                "Record bodies that are not a valid Payload",
                &m.payload_errors,
            ),
            (
                "elkeid_center_packets_oversized",
                "Packets refused: per-record copies of their host metadata too large",
                &m.oversized_packets,
            ),
            (
                "elkeid_center_task_results_dropped",
                "Task results dropped: queue full or over its byte budget",
                &m.task_results_dropped,
            ),
            (
                "elkeid_center_task_results_failed",
                "Task results the manager backend did not take",
                &m.task_results_failed,
            ),
            (
                "elkeid_center_config_pushes",
                "Config commands pushed",
                &m.config_pushes,
            ),
            (
                "elkeid_center_config_push_failures",
                "Config pushes that failed",
                &m.config_push_failures,
            ),
            (
                "elkeid_center_uploads_ok",
                "File uploads stored",
                &m.uploads_ok,
            ),
            (
                "elkeid_center_uploads_failed",
                "File uploads refused or failed",
                &m.uploads_failed,
            ),
            (
                "elkeid_center_http_auth_failures",
                "HTTP API requests refused by auth",
                &m.auth_failures,
            ),
            (
                "elkeid_center_http_replays_refused",
                "HTTP API requests refused: signature already used within the window",
                &m.http_replays_refused,
            ),
            (
                "elkeid_center_http_bodies_refused",
                "HTTP API requests refused: body too large or not received in time",
                &m.http_bodies_refused,
            ),
            (
                "elkeid_center_identity_mismatches",
                "Streams or packets refused: agent_id not the one bound to the client certificate or stream",
                &m.identity_mismatches,
            ),
            (
                "elkeid_center_conn_refused_identity_fields",
                "Streams refused: first packet identity fields over their caps",
                &m.refused_identity_fields,
            ),
            (
                "elkeid_center_conn_refused_unidentified",
                "Streams refused: too many streams waiting for their first packet",
                &m.refused_unidentified,
            ),
            (
                "elkeid_center_packets_received",
                "Packets received (all)",
                &m.recv_packets,
            ),
            (
                "elkeid_center_details_refused",
                "Heartbeat details (1000/1001) not stored: detail byte budget of all connections full, or 256 plugins on one connection",
                &m.details_refused,
            ),
            (
                "elkeid_center_commands_refused_bytes",
                "Commands refused: the agent's or all command queues over their byte budget",
                &m.commands_refused_bytes,
            ),
        ];
        for (name, help, c) in counters {
            r.register(name, help, c.clone());
        }
        let detail_bytes = Gauge::default();
        let command_queue_bytes = Gauge::default();
        let task_queue_bytes = Gauge::default();
        r.register(
            "elkeid_center_detail_bytes",
            "Bytes of stored heartbeat details (1000/1001), all connections",
            detail_bytes.clone(),
        );
        r.register(
            "elkeid_center_command_queue_bytes",
            "Bytes of commands queued for agents, all connections",
            command_queue_bytes.clone(),
        );
        r.register(
            "elkeid_center_task_queue_bytes",
            "Bytes of task results queued for the manager backend",
            task_queue_bytes.clone(),
        );
        let tls_handshakes = Family::<TlsLabel, Counter>::default();
        r.register(
            "elkeid_center_tls_handshakes_refused",
            "TLS handshakes that did not complete (reason timeout: not within the deadline; failed: TLS error)",
            tls_handshakes.clone(),
        );
        let tls_done = Family::<TlsLabel, Counter>::default();
        r.register(
            "elkeid_center_tls_handshakes",
            "TLS handshakes completed (kind full: certificates exchanged; resumed: session ticket)",
            tls_done.clone(),
        );
        let tls_chains = Family::<ResultLabel, Counter>::default();
        r.register(
            "elkeid_center_tls_client_chains",
            "gRPC client certificate chains checked (result verified: against the CA, accepted or refused; cached: the same chain accepted before and still inside its validity)",
            tls_chains.clone(),
        );
        let sink_errors = Family::<SinkLabel, Counter>::default();
        let sink_dropped = Family::<SinkLabel, Counter>::default();
        r.register(
            "elkeid_center_sink_errors",
            "Batches a sink failed to take",
            sink_errors.clone(),
        );
        r.register(
            "elkeid_center_sink_dropped",
            "Batches dropped by a sink's drop policy",
            sink_dropped.clone(),
        );
        r.register_collector(Box::new(SinkValues(live.clone())));
        let MetricsCounters {
            recv_packets,
            recv_records,
            sent_commands,
            failed_commands,
            refused_limit,
            tcp_refused,
            refused_empty_id,
            refused_first_timeout,
            conflicts,
            streams_total,
            payload_errors,
            oversized_packets,
            task_results_dropped,
            task_results_failed,
            config_pushes,
            config_push_failures,
            uploads_ok,
            uploads_failed,
            auth_failures,
            http_replays_refused,
            http_bodies_refused,
            identity_mismatches,
            refused_identity_fields,
            refused_unidentified,
            details_refused,
            commands_refused_bytes,
        } = m;
        Metrics {
            recv_packets,
            recv_records,
            sent_commands,
            failed_commands,
            refused_limit,
            tcp_refused,
            refused_empty_id,
            refused_first_timeout,
            conflicts,
            streams_total,
            payload_errors,
            oversized_packets,
            task_results_dropped,
            task_results_failed,
            config_pushes,
            config_push_failures,
            uploads_ok,
            uploads_failed,
            auth_failures,
            http_replays_refused,
            http_bodies_refused,
            identity_mismatches,
            refused_identity_fields,
            refused_unidentified,
            details_refused,
            commands_refused_bytes,
            detail_bytes,
            command_queue_bytes,
            task_queue_bytes,
            tls_handshakes,
            tls_done,
            tls_chains,
            sink_errors,
            sink_dropped,
            live,
            registry: r,
            render_lock: Mutex::new(()),
        }
    }
}

/// The plain counters, created before they are registered.
#[derive(Default)]
struct MetricsCounters {
    recv_packets: Counter,
    recv_records: Counter,
    sent_commands: Counter,
    failed_commands: Counter,
    refused_limit: Counter,
    tcp_refused: Counter,
    refused_empty_id: Counter,
    refused_first_timeout: Counter,
    conflicts: Counter,
    streams_total: Counter,
    payload_errors: Counter,
    oversized_packets: Counter,
    task_results_dropped: Counter,
    task_results_failed: Counter,
    config_pushes: Counter,
    config_push_failures: Counter,
    uploads_ok: Counter,
    uploads_failed: Counter,
    auth_failures: Counter,
    http_replays_refused: Counter,
    http_bodies_refused: Counter,
    identity_mismatches: Counter,
    refused_identity_fields: Counter,
    refused_unidentified: Counter,
    details_refused: Counter,
    commands_refused_bytes: Counter,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `elkeid_ac_grpc_conn_count` (gauge, from the pool at scrape time).
#[derive(Debug)]
struct ConnCount(Arc<Live>);

impl Collector for ConnCount {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let n = lock(&self.0.scrape).conn_count;
        let g = ConstGauge::new(n);
        g.encode(encoder.encode_descriptor(
            "elkeid_ac_grpc_conn_count",
            "Current agent streams.",
            None,
            g.metric_type(),
        )?)
    }
}

/// `elkeid_ac_output_data_type_count{data_type}` (bounded, see
/// [`MAX_DATA_TYPES`]).
#[derive(Debug)]
struct DataTypes(Arc<Live>);

impl Collector for DataTypes {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let mut e = encoder.encode_descriptor(
            "elkeid_ac_output_data_type_count",
            "Records received per data_type.",
            None,
            MetricType::Unknown,
        )?;
        for (dt, n) in lock(&self.0.data_types).iter() {
            let label = [("data_type", dt.to_string())];
            e.encode_family(&label)?.encode_gauge(n)?;
        }
        let other = self.0.data_types_other.load(Ordering::Relaxed);
        if other > 0 {
            e.encode_family(&[("data_type", "other")])?
                .encode_gauge(&other)?;
        }
        Ok(())
    }
}

/// `elkeid_center_sink_lag{sink}` and `elkeid_center_sink_records_total{sink,kind}`.
#[derive(Debug)]
struct SinkValues(Arc<Live>);

impl Collector for SinkValues {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let scrape = lock(&self.0.scrape);
        let mut e = encoder.encode_descriptor(
            "elkeid_center_sink_lag",
            "Batches queued in a sink, not yet written.",
            None,
            MetricType::Gauge,
        )?;
        for &(sink, lag) in &scrape.sink_lag {
            ConstGauge::new(lag).encode(e.encode_family(&[("sink", sink)])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "elkeid_center_sink_records",
            "A sink's own record counters.",
            None,
            MetricType::Counter,
        )?;
        for &(sink, kind, v) in &scrape.sink_counters {
            ConstCounter::new(v).encode(e.encode_family(&[("sink", sink), ("kind", kind)])?)?;
        }
        Ok(())
    }
}

impl Metrics {
    /// Adds one packet's per-data_type record counts.
    pub(crate) fn add_data_types(&self, counts: &[(i32, u64)]) {
        let mut m = lock(&self.live.data_types);
        for &(dt, n) in counts {
            if m.len() >= MAX_DATA_TYPES && !m.contains_key(&dt) {
                self.live.data_types_other.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            let c = m.entry(dt).or_default();
            *c = c.saturating_add(n);
        }
    }

    /// Counts a TLS handshake that did not complete on `listener`
    /// (`grpc`, `http`); `timeout`: not within the deadline, else failed.
    pub(crate) fn tls_refused(&self, listener: &'static str, timeout: bool) {
        let reason = if timeout { "timeout" } else { "failed" };
        self.tls_handshakes
            .get_or_create(&[("listener", listener), ("reason", reason)])
            .inc();
    }

    /// Counts a completed TLS handshake on `listener`.
    pub(crate) fn tls_handshake(&self, listener: &'static str, resumed: bool) {
        let kind = if resumed { "resumed" } else { "full" };
        self.tls_done
            .get_or_create(&[("listener", listener), ("kind", kind)])
            .inc();
    }

    /// The counters of the gRPC listener's chain cache.
    pub(crate) fn chain_counters(&self) -> crate::certcache::ChainCounters {
        // One statement per lookup: a family's read guard lives to the end of
        // its statement, and a second get_or_create (write lock) inside the
        // same statement would wait for it forever.
        let cached = self
            .tls_chains
            .get_or_create(&[("result", "cached")])
            .clone();
        let verified = self
            .tls_chains
            .get_or_create(&[("result", "verified")])
            .clone();
        crate::certcache::ChainCounters { cached, verified }
    }

    /// Counts a sink failure (`dropped` = by explicit drop policy).
    pub(crate) fn sink_failed(&self, sink: &'static str, dropped: bool) {
        let family = if dropped {
            &self.sink_dropped
        } else {
            &self.sink_errors
        };
        family.get_or_create(&[("sink", sink)]).inc();
    }

    /// Renders the Prometheus text format ([`CONTENT_TYPE`]).
    pub(crate) fn render(
        &self,
        conn_count: usize,
        sink_lag: &[(&'static str, usize)],
        sink_counters: &[(&'static str, &'static str, u64)],
    ) -> String {
        let _one = lock(&self.render_lock);
        *lock(&self.live.scrape) = Scrape {
            conn_count,
            sink_lag: sink_lag.to_vec(),
            sink_counters: sink_counters.to_vec(),
        };
        let mut s = String::with_capacity(4096);
        // Writing into a String cannot fail; the collectors' own writes are
        // the only fallible part and they only format numbers.
        if let Err(error) =
            prometheus_client::encoding::prometheus_text::encode(&mut s, &self.registry)
        {
            tracing::error!(%error, "metrics: encoding failed");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_elkeid_names() {
        let m = Metrics::default();
        m.add_data_types(&[(1000, 2), (5100, 1)]);
        inc(&m.recv_packets);
        m.sink_failed("kafka", true);
        m.sink_failed("kafka", true);
        m.sink_failed("ndjson", false);
        m.tls_refused("grpc", true);
        let t = m.render(3, &[("ndjson", 0)], &[("kafka", "delivered", 5)]);
        assert!(t.contains("elkeid_ac_grpc_conn_count 3\n"));
        assert!(t.contains("elkeid_ac_grpc_recv_qps 1\n"));
        assert!(t.contains("elkeid_ac_output_data_type_count{data_type=\"1000\"} 2\n"));
        assert!(t.contains("elkeid_center_sink_lag{sink=\"ndjson\"} 0\n"));
        assert!(
            t.contains("elkeid_center_sink_records_total{sink=\"kafka\",kind=\"delivered\"} 5\n")
        );
        assert!(t.contains("elkeid_center_sink_dropped_total{sink=\"kafka\"} 2\n"));
        assert!(t.contains("elkeid_center_sink_errors_total{sink=\"ndjson\"} 1\n"));
        assert!(t.contains(
            "elkeid_center_tls_handshakes_refused_total{listener=\"grpc\",reason=\"timeout\"} 1\n"
        ));
        assert!(t.contains("# TYPE elkeid_center_detail_bytes gauge\n"));
        // One storage per counter, exported under both of its names.
        assert!(t.contains("elkeid_center_packets_received_total 1\n"));
        assert!(t.contains("elkeid_center_streams_total 0\n"));
        assert!(t.contains("# TYPE elkeid_center_streams_total counter\n"));
        assert!(t.contains("# TYPE elkeid_ac_grpc_conn_count gauge\n"));
        // Every sample line is `name{labels} value`, names as documented.
        let names: std::collections::BTreeSet<&str> = t
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(['{', ' ']).next().unwrap())
            .collect();
        let want = [
            "elkeid_ac_grpc_conn_count",
            "elkeid_ac_grpc_recv_qps",
            "elkeid_ac_grpc_send_qps",
            "elkeid_ac_output_data_type_count",
            "elkeid_center_agent_conflicts_total",
            "elkeid_center_command_queue_bytes",
            "elkeid_center_commands_failed_total",
            "elkeid_center_commands_refused_bytes_total",
            "elkeid_center_config_push_failures_total",
            "elkeid_center_config_pushes_total",
            "elkeid_center_conn_refused_empty_id_total",
            "elkeid_center_conn_refused_first_packet_timeout_total",
            "elkeid_center_conn_refused_identity_fields_total",
            "elkeid_center_conn_refused_limit_total",
            "elkeid_center_conn_refused_unidentified_total",
            "elkeid_center_detail_bytes",
            "elkeid_center_details_refused_total",
            "elkeid_center_http_auth_failures_total",
            "elkeid_center_http_bodies_refused_total",
            "elkeid_center_http_replays_refused_total",
            "elkeid_center_identity_mismatches_total",
            "elkeid_center_packets_oversized_total",
            "elkeid_center_packets_received_total",
            "elkeid_center_payload_decode_errors_total",
            "elkeid_center_records_received_total",
            "elkeid_center_sink_dropped_total",
            "elkeid_center_sink_errors_total",
            "elkeid_center_sink_lag",
            "elkeid_center_sink_records_total",
            "elkeid_center_streams_total",
            "elkeid_center_task_queue_bytes",
            "elkeid_center_task_results_dropped_total",
            "elkeid_center_task_results_failed_total",
            "elkeid_center_tcp_refused_total",
            "elkeid_center_tls_handshakes_refused_total",
            "elkeid_center_uploads_failed_total",
            "elkeid_center_uploads_ok_total",
        ];
        assert_eq!(names.into_iter().collect::<Vec<_>>(), want, "{t}");
        assert!(!t.contains("EOF"), "{t}");
    }

    #[test]
    fn distinct_data_types_are_bounded() {
        let m = Metrics::default();
        let counts: Vec<(i32, u64)> = (0..5000).map(|dt| (dt, 1)).collect();
        m.add_data_types(&counts);
        m.add_data_types(&[(0, 1), (4999, 2)]);
        let t = m.render(0, &[], &[]);
        let series = t
            .lines()
            .filter(|l| l.starts_with("elkeid_ac_output_data_type_count{"))
            .count();
        assert_eq!(series, MAX_DATA_TYPES + 1);
        assert!(t.contains("elkeid_ac_output_data_type_count{data_type=\"0\"} 2\n"));
        let other = 5000 - MAX_DATA_TYPES as u64 + 2;
        assert!(t.contains(&format!(
            "elkeid_ac_output_data_type_count{{data_type=\"other\"}} {other}\n"
        )));
    }
}
