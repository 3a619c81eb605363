//! Counters and the Prometheus text exposition.
//!
//! Elkeid names (kept so dashboards carry over): `elkeid_ac_grpc_conn_count`,
//! `elkeid_ac_grpc_recv_qps` (every packet received, the first of each
//! stream included),
//! `elkeid_ac_grpc_send_qps` (commands sent),
//! `elkeid_ac_output_data_type_count{data_type}`. Ours start with
//! `elkeid_center_`. The per-agent series of Elkeid (`elkeid_ac_output_count`,
//! `elkeid_ac_agent_*`) are not exported: at 10,000 agents they cost more than
//! they tell; `/conn/stat` has the same numbers.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// All counters of the center.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) recv_packets: AtomicU64,
    pub(crate) recv_records: AtomicU64,
    pub(crate) sent_commands: AtomicU64,
    pub(crate) failed_commands: AtomicU64,
    pub(crate) refused_limit: AtomicU64,
    pub(crate) tcp_refused: AtomicU64,
    pub(crate) refused_empty_id: AtomicU64,
    pub(crate) refused_first_timeout: AtomicU64,
    pub(crate) conflicts: AtomicU64,
    pub(crate) streams_total: AtomicU64,
    pub(crate) payload_errors: AtomicU64,
    pub(crate) oversized_packets: AtomicU64,
    pub(crate) task_results_dropped: AtomicU64,
    pub(crate) task_results_failed: AtomicU64,
    pub(crate) config_pushes: AtomicU64,
    pub(crate) config_push_failures: AtomicU64,
    pub(crate) uploads_ok: AtomicU64,
    pub(crate) uploads_failed: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    data_types: Mutex<BTreeMap<i32, u64>>,
    /// Records whose data_type arrived after [`MAX_DATA_TYPES`] distinct
    /// ones were already tracked (exported as `data_type="other"`).
    data_types_other: AtomicU64,
    sink_errors: Mutex<BTreeMap<&'static str, u64>>,
    sink_dropped: Mutex<BTreeMap<&'static str, u64>>,
}

/// Most distinct `data_type` series kept: agents choose the values, so an
/// unbounded map would let one agent grow the center's memory at will.
pub(crate) const MAX_DATA_TYPES: usize = 1024;

/// Increments an atomic counter by one.
pub(crate) fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// Adds one packet's per-data_type record counts.
    pub(crate) fn add_data_types(&self, counts: &[(i32, u64)]) {
        let mut m = self.data_types.lock().unwrap_or_else(|e| e.into_inner());
        for &(dt, n) in counts {
            if m.len() >= MAX_DATA_TYPES && !m.contains_key(&dt) {
                self.data_types_other.fetch_add(n, Ordering::Relaxed);
                continue;
            }
            let c = m.entry(dt).or_default();
            *c = c.saturating_add(n);
        }
    }

    /// Counts a sink failure (`dropped` = by explicit drop policy).
    pub(crate) fn sink_failed(&self, sink: &'static str, dropped: bool) {
        let map = if dropped {
            &self.sink_dropped
        } else {
            &self.sink_errors
        };
        *map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(sink)
            .or_default() += 1;
    }

    /// Renders the Prometheus text format.
    pub(crate) fn render(
        &self,
        conn_count: usize,
        sink_lag: &[(&'static str, usize)],
        sink_counters: &[(&'static str, &'static str, u64)],
    ) -> String {
        let mut s = String::with_capacity(4096);
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP elkeid_ac_grpc_conn_count Current agent streams.\n# TYPE elkeid_ac_grpc_conn_count gauge"
        );
        let _ = writeln!(s, "elkeid_ac_grpc_conn_count {conn_count}");
        let _ = writeln!(
            s,
            "# HELP elkeid_ac_grpc_recv_qps Packets received.\n# TYPE elkeid_ac_grpc_recv_qps counter"
        );
        let _ = writeln!(s, "elkeid_ac_grpc_recv_qps {}", g(&self.recv_packets));
        let _ = writeln!(
            s,
            "# HELP elkeid_ac_grpc_send_qps Commands sent.\n# TYPE elkeid_ac_grpc_send_qps counter"
        );
        let _ = writeln!(s, "elkeid_ac_grpc_send_qps {}", g(&self.sent_commands));
        let _ = writeln!(
            s,
            "# HELP elkeid_ac_output_data_type_count Records received per data_type.\n# TYPE elkeid_ac_output_data_type_count counter"
        );
        for (dt, n) in self
            .data_types
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                s,
                "elkeid_ac_output_data_type_count{{data_type=\"{dt}\"}} {n}"
            );
        }
        let other = g(&self.data_types_other);
        if other > 0 {
            let _ = writeln!(
                s,
                "elkeid_ac_output_data_type_count{{data_type=\"other\"}} {other}"
            );
        }
        let counters: [(&str, &str, u64); 18] = [
            (
                "elkeid_center_tcp_refused_total",
                "TCP connections closed: too many open.",
                g(&self.tcp_refused),
            ),
            (
                "elkeid_center_records_received_total",
                "Records received.",
                g(&self.recv_records),
            ),
            (
                "elkeid_center_streams_total",
                "Agent streams registered.",
                g(&self.streams_total),
            ),
            (
                "elkeid_center_commands_failed_total",
                "Commands not delivered.",
                g(&self.failed_commands),
            ),
            (
                "elkeid_center_conn_refused_limit_total",
                "Streams refused: conn_limit reached.",
                g(&self.refused_limit),
            ),
            (
                "elkeid_center_conn_refused_empty_id_total",
                "Streams refused: empty agent_id.",
                g(&self.refused_empty_id),
            ),
            (
                "elkeid_center_conn_refused_first_packet_timeout_total",
                "Streams closed: no first packet in time.",
                g(&self.refused_first_timeout),
            ),
            (
                "elkeid_center_agent_conflicts_total",
                "Streams replaced by a newer stream of the same agent id.",
                g(&self.conflicts),
            ),
            (
                "elkeid_center_payload_decode_errors_total",
                "Record bodies that are not a valid Payload.",
                g(&self.payload_errors),
            ),
            (
                "elkeid_center_packets_oversized_total",
                "Packets refused: per-record copies of their host metadata too large.",
                g(&self.oversized_packets),
            ),
            (
                "elkeid_center_task_results_dropped_total",
                "Task results dropped: queue full.",
                g(&self.task_results_dropped),
            ),
            (
                "elkeid_center_task_results_failed_total",
                "Task results the manager backend did not take.",
                g(&self.task_results_failed),
            ),
            (
                "elkeid_center_config_pushes_total",
                "Config commands pushed.",
                g(&self.config_pushes),
            ),
            (
                "elkeid_center_config_push_failures_total",
                "Config pushes that failed.",
                g(&self.config_push_failures),
            ),
            (
                "elkeid_center_uploads_ok_total",
                "File uploads stored.",
                g(&self.uploads_ok),
            ),
            (
                "elkeid_center_uploads_failed_total",
                "File uploads refused or failed.",
                g(&self.uploads_failed),
            ),
            (
                "elkeid_center_http_auth_failures_total",
                "HTTP API requests refused by auth.",
                g(&self.auth_failures),
            ),
            (
                "elkeid_center_packets_received_total",
                "Packets received (all).",
                g(&self.recv_packets),
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP elkeid_center_sink_errors_total Batches a sink failed to take.\n# TYPE elkeid_center_sink_errors_total counter"
        );
        for (k, v) in self
            .sink_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(s, "elkeid_center_sink_errors_total{{sink=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP elkeid_center_sink_dropped_total Batches dropped by a sink's drop policy.\n# TYPE elkeid_center_sink_dropped_total counter"
        );
        for (k, v) in self
            .sink_dropped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(s, "elkeid_center_sink_dropped_total{{sink=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP elkeid_center_sink_lag Batches queued in a sink, not yet written.\n# TYPE elkeid_center_sink_lag gauge"
        );
        for (k, v) in sink_lag {
            let _ = writeln!(s, "elkeid_center_sink_lag{{sink=\"{k}\"}} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP elkeid_center_sink_records_total A sink's own record counters.\n# TYPE elkeid_center_sink_records_total counter"
        );
        for (sink, kind, v) in sink_counters {
            let _ = writeln!(
                s,
                "elkeid_center_sink_records_total{{sink=\"{sink}\",kind=\"{kind}\"}} {v}"
            );
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
        let t = m.render(3, &[("ndjson", 0)], &[("kafka", "delivered", 5)]);
        assert!(t.contains("elkeid_ac_grpc_conn_count 3\n"));
        assert!(t.contains("elkeid_ac_grpc_recv_qps 1\n"));
        assert!(t.contains("elkeid_ac_output_data_type_count{data_type=\"1000\"} 2\n"));
        assert!(t.contains("elkeid_center_sink_lag{sink=\"ndjson\"} 0\n"));
        assert!(
            t.contains("elkeid_center_sink_records_total{sink=\"kafka\",kind=\"delivered\"} 5\n")
        );
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
