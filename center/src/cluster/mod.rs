//! Several centers as one service, coordinated through etcd.
//!
//! # Layout
//! - `config.rs`: `--etcd`, `--cluster-*` flags and the `[cluster]` table.
//! - `etcd.rs`: the etcd v3 client (JSON gateway over HTTP/1.1).
//! - `peer.rs`: signed center-to-center HTTP calls (command forwarding,
//!   `/conn/stat` fan-out, `/conn/reset` forwarding).
//! - this file: [`Cluster`], the task that keeps this center's etcd keys
//!   in step with its pool, the cached view of live centers answering
//!   `/registry/detail`, agent lookups, and the cluster metrics.
//!
//! # What is stored in etcd (under the prefix, default `/elkeid-rs/`)
//! - `centers/<id>` = JSON [`CenterInfo`] (gRPC and HTTP addresses, load,
//!   capacity), bound to this center's lease.
//! - `agents/<agent id>` = `<center id>`, bound to the lease of the center
//!   holding the stream. Written after connect, deleted after disconnect
//!   (only if it still names this center: the agent may already be on
//!   another one).
//!
//! A center that dies stops refreshing its lease; after the TTL every key
//! it wrote disappears. A center that loses etcd keeps serving its agents
//! and its local API (the record path never touches etcd), reports
//! `elkeid_center_cluster_etcd_up 0`, retries every second, and when etcd is
//! back re-registers (a new lease if the old one expired) and re-publishes
//! every agent it holds.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::pool::Pool;

pub(crate) mod config;
pub(crate) mod elkeid_sd;
pub(crate) mod etcd;
pub(crate) mod http;
pub(crate) mod peer;

pub use config::{ClusterArgs, ClusterConfig, ElkeidSdConfig};
use etcd::{Etcd, EtcdError};
use peer::PeerClient;

/// How long one etcd call may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(3);
/// Retry period while etcd is unreachable.
const RETRY: Duration = Duration::from_secs(1);
/// Pool changes are batched for this long before being written.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// The live-centers view and this center's load are refreshed this often.
const REFRESH: Duration = Duration::from_secs(2);

/// One center as registered in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CenterInfo {
    /// Center id (the key suffix).
    pub(crate) id: String,
    /// gRPC `host:port` agents dial.
    pub(crate) grpc: String,
    /// HTTP API `host:port`.
    pub(crate) http: String,
    /// The API is HTTPS.
    #[serde(default)]
    pub(crate) https: bool,
    /// Connected agents.
    pub(crate) weight: u64,
    /// `conn_limit`.
    pub(crate) capacity: u64,
}

impl CenterInfo {
    /// Load in millionths of capacity (for ordering).
    pub(crate) fn load(&self) -> u64 {
        self.weight.saturating_mul(1_000_000) / self.capacity.max(1)
    }
}

/// Counters and state for `/metrics`.
#[derive(Debug, Default)]
struct Stats {
    etcd_up: AtomicBool,
    etcd_errors: AtomicU64,
    registrations: AtomicU64,
    forwarded: AtomicU64,
    forward_errors: AtomicU64,
}

/// This center's membership in the cluster.
#[derive(Debug)]
pub(crate) struct Cluster {
    cfg: ClusterConfig,
    etcd: Etcd,
    me: Mutex<CenterInfo>,
    pool: Arc<Pool>,
    /// Live centers as last read from etcd (this one included).
    centers: Mutex<Vec<CenterInfo>>,
    stats: Stats,
    peers: PeerClient,
    /// Current lease (0 = none).
    lease: AtomicU64,
    stop: CancellationToken,
}

/// This center's listeners as bound.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Local {
    /// Bound gRPC address.
    pub(crate) grpc: std::net::SocketAddr,
    /// Bound HTTP API address.
    pub(crate) http: std::net::SocketAddr,
    /// The API is HTTPS.
    pub(crate) https: bool,
    /// `grpc.conn_limit`.
    pub(crate) conn_limit: usize,
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

impl Cluster {
    /// Builds the membership of the center bound at `local`.
    /// Errors when no advertised address can be derived.
    pub(crate) fn new(
        cfg: ClusterConfig,
        local: Local,
        pool: Arc<Pool>,
        key: Option<(String, String)>,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Arc<Cluster>, String> {
        let Local {
            grpc,
            http,
            https,
            conn_limit,
        } = local;
        let host = match &cfg.advertise {
            Some(h) => h.clone(),
            None if grpc.ip().is_unspecified() => {
                return Err(format!(
                    "gRPC listens on {grpc}: set cluster.advertise (--cluster-advertise) to the address agents and centers reach this one on"
                ));
            }
            None => grpc.ip().to_string(),
        };
        let grpc_adv = host_port(&host, grpc.port());
        let http_adv = host_port(&host, http.port());
        let id = cfg.id.clone().unwrap_or_else(|| http_adv.clone());
        let me = CenterInfo {
            id: id.clone(),
            grpc: grpc_adv,
            http: http_adv,
            https,
            weight: 0,
            capacity: conn_limit as u64,
        };
        Ok(Arc::new(Cluster {
            etcd: Etcd::new(&cfg.etcd, ETCD_TIMEOUT),
            cfg,
            me: Mutex::new(me),
            pool,
            centers: Mutex::new(Vec::new()),
            stats: Stats::default(),
            peers: PeerClient {
                me: id,
                key,
                tls,
                timeout: Duration::from_secs(10),
            },
            lease: AtomicU64::new(0),
            stop: CancellationToken::new(),
        }))
    }

    /// This center's id.
    pub(crate) fn id(&self) -> String {
        self.me.lock().unwrap_or_else(|e| e.into_inner()).id.clone()
    }

    fn center_key(&self, id: &str) -> String {
        format!("{}centers/{id}", self.cfg.prefix)
    }

    fn agent_key(&self, id: &str) -> String {
        format!("{}agents/{id}", self.cfg.prefix)
    }

    fn agents_prefix(&self) -> String {
        format!("{}agents/", self.cfg.prefix)
    }

    fn set_up(&self, up: bool, err: Option<&EtcdError>) {
        let was = self.stats.etcd_up.swap(up, Ordering::Relaxed);
        if let Some(e) = err {
            self.stats.etcd_errors.fetch_add(1, Ordering::Relaxed);
            if was {
                tracing::warn!(error = %e, "cluster: etcd unreachable; serving local agents, retrying every second");
            } else {
                tracing::debug!(error = %e, "cluster: etcd still unreachable");
            }
        } else if up && !was {
            tracing::info!("cluster: etcd reachable");
        }
    }

    /// Keeps this center's keys in etcd until [`Cluster::leave`].
    pub(crate) async fn run(self: Arc<Self>) {
        let mut published: HashSet<String> = HashSet::new();
        let mut lease: i64 = 0;
        let ttl = self.cfg.lease_ttl;
        let keepalive_every = ttl / 3;
        let mut last_keepalive = Instant::now();
        let mut last_refresh = Instant::now() - REFRESH;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let step = async {
                if self.pool.is_draining() {
                    // Drained: out of etcd for good; keep the view fresh
                    // for the SD answers this center still gives.
                    if lease != 0 {
                        match self.etcd.lease_revoke(lease).await {
                            // Revoked here or already by `drain`.
                            Ok(()) | Err(EtcdError::Server(_)) => {}
                            Err(e) => return Err(e),
                        }
                        lease = 0;
                        self.lease.store(0, Ordering::Relaxed);
                        published.clear();
                    }
                    if last_refresh.elapsed() >= REFRESH {
                        self.refresh_centers().await?;
                        last_refresh = Instant::now();
                    }
                    return Ok(false);
                }
                if lease == 0 {
                    lease = self.etcd.lease_grant(ttl.as_secs()).await?;
                    self.lease.store(lease as u64, Ordering::Relaxed);
                    published.clear();
                    last_keepalive = Instant::now();
                    last_refresh = Instant::now() - REFRESH;
                    self.stats.registrations.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(lease, id = %self.id(), "cluster: registered in etcd");
                } else if last_keepalive.elapsed() >= keepalive_every {
                    if !self.etcd.lease_keep_alive(lease).await? {
                        tracing::warn!(lease, "cluster: lease expired; registering again");
                        lease = 0;
                        self.lease.store(0, Ordering::Relaxed);
                        return Ok::<bool, EtcdError>(true);
                    }
                    last_keepalive = Instant::now();
                }
                self.sync_agents(lease, &mut published).await?;
                if last_refresh.elapsed() >= REFRESH {
                    self.publish_self(lease).await?;
                    self.refresh_centers().await?;
                    last_refresh = Instant::now();
                }
                Ok(false)
            };
            match tokio::select! {
                r = step => r,
                () = self.stop.cancelled() => return,
            } {
                Ok(true) => continue,
                Ok(false) => self.set_up(true, None),
                Err(e) => {
                    self.set_up(false, Some(&e));
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => {}
                        () = self.stop.cancelled() => return,
                    }
                    continue;
                }
            }
            let wake = keepalive_every.min(REFRESH);
            tokio::select! {
                () = self.pool.changed.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                }
                () = tokio::time::sleep(wake) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    async fn publish_self(&self, lease: i64) -> Result<(), EtcdError> {
        let me = {
            let mut me = self.me.lock().unwrap_or_else(|e| e.into_inner());
            me.weight = self.pool.count() as u64;
            me.clone()
        };
        let value = serde_json::to_vec(&me).unwrap_or_default();
        self.etcd.put(&self.center_key(&me.id), &value, lease).await
    }

    /// Writes the keys of newly connected agents and deletes those of gone ones.
    async fn sync_agents(
        &self,
        lease: i64,
        published: &mut HashSet<String>,
    ) -> Result<(), EtcdError> {
        let now: HashSet<String> = self.pool.list().into_iter().collect();
        let me = self.id();
        let added: Vec<(String, Vec<u8>)> = now
            .difference(published)
            .map(|a| (self.agent_key(a), me.as_bytes().to_vec()))
            .collect();
        let removed: Vec<String> = published.difference(&now).cloned().collect();
        if !added.is_empty() {
            self.etcd.put_many(&added, lease).await?;
            for a in now.difference(published).cloned().collect::<Vec<_>>() {
                published.insert(a);
            }
        }
        for a in removed {
            self.etcd
                .delete_if_value(&self.agent_key(&a), me.as_bytes())
                .await?;
            published.remove(&a);
        }
        Ok(())
    }

    async fn refresh_centers(&self) -> Result<(), EtcdError> {
        let kvs = self
            .etcd
            .range_prefix(&format!("{}centers/", self.cfg.prefix), false)
            .await?;
        let mut list: Vec<CenterInfo> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        list.sort_by(|a, b| a.load().cmp(&b.load()).then_with(|| a.id.cmp(&b.id)));
        *self.centers.lock().unwrap_or_else(|e| e.into_inner()) = list;
        Ok(())
    }

    /// Live centers, least loaded first (etcd's view, at most [`REFRESH`] old).
    pub(crate) fn centers(&self) -> Vec<CenterInfo> {
        self.centers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The other center holding `agent_id`, if etcd names one that is alive.
    pub(crate) async fn locate(&self, agent_id: &str) -> Result<Option<CenterInfo>, EtcdError> {
        let Some(owner) = self.etcd.get(&self.agent_key(agent_id)).await? else {
            return Ok(None);
        };
        let owner = String::from_utf8_lossy(&owner).into_owned();
        if owner == self.id() {
            return Ok(None);
        }
        if let Some(c) = self.centers().into_iter().find(|c| c.id == owner) {
            return Ok(Some(c));
        }
        Ok(self
            .etcd
            .get(&self.center_key(&owner))
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Every agent id registered in the cluster, sorted.
    pub(crate) async fn all_agents(&self) -> Result<Vec<String>, EtcdError> {
        let prefix = self.agents_prefix();
        let mut ids: Vec<String> = self
            .etcd
            .range_prefix(&prefix, true)
            .await?
            .into_iter()
            .filter_map(|kv| kv.key.strip_prefix(&prefix).map(str::to_string))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Number of agents registered in the cluster.
    pub(crate) async fn agent_count(&self) -> Result<u64, EtcdError> {
        self.etcd.count_prefix(&self.agents_prefix()).await
    }

    /// Signed call to another center.
    pub(crate) async fn call_peer(
        &self,
        peer: &CenterInfo,
        method: &str,
        path: &str,
        body: bytes::Bytes,
    ) -> Result<(u16, bytes::Bytes), String> {
        let r = self.peers.call(peer, method, path, body).await;
        match &r {
            Ok(_) => self.stats.forwarded.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(peer = %peer.id, error = %e, "cluster: call to another center failed");
                self.stats.forward_errors.fetch_add(1, Ordering::Relaxed)
            }
        };
        r
    }

    /// Drain (`POST /cluster/drain`; the pool is already draining): revokes
    /// the lease so this center and its agent keys leave etcd at once, and
    /// drops this center from its own view. The task keeps refreshing the
    /// view (this center's SD answers name the others) but no longer
    /// registers. Errors when etcd could not be told (the lease then
    /// expires by itself within the TTL).
    pub(crate) async fn drain(&self) -> Result<(), EtcdError> {
        let me = self.id();
        self.centers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| c.id != me);
        let lease = self.lease.swap(0, Ordering::Relaxed) as i64;
        if lease != 0 {
            self.etcd.lease_revoke(lease).await?;
            tracing::info!("cluster: draining: left etcd (lease revoked)");
        }
        Ok(())
    }

    /// Leaves the cluster: stops the task and revokes the lease, so this
    /// center and its agents vanish from etcd at once (drain).
    pub(crate) async fn leave(&self) {
        self.stop.cancel();
        let lease = self.lease.swap(0, Ordering::Relaxed) as i64;
        if lease != 0 {
            match self.etcd.lease_revoke(lease).await {
                Ok(()) => tracing::info!("cluster: left (lease revoked)"),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: could not revoke the lease; it expires by itself")
                }
            }
        }
    }

    /// Prometheus text of the cluster gauges and counters, encoded by
    /// `prometheus-client` (as the center's own; appended to them).
    pub(crate) fn render_metrics(&self, out: &mut String) {
        let s = &self.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let values = ClusterValues([
            u64::from(s.etcd_up.load(Ordering::Relaxed)),
            g(&s.etcd_errors),
            g(&s.registrations),
            self.centers().len() as u64,
            g(&s.forwarded),
            g(&s.forward_errors),
        ]);
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(values));
        if let Err(error) = prometheus_client::encoding::prometheus_text::encode(out, &r) {
            tracing::error!(%error, "cluster metrics: encoding failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_brackets_ipv6() {
        assert_eq!(host_port("10.0.0.1", 1), "10.0.0.1:1");
        assert_eq!(host_port("::1", 1), "[::1]:1");
    }

    #[test]
    fn load_orders_by_share_of_capacity() {
        let c = |w, cap| CenterInfo {
            id: String::new(),
            grpc: String::new(),
            http: String::new(),
            https: false,
            weight: w,
            capacity: cap,
        };
        assert!(c(10, 100).load() > c(10, 1000).load());
        assert_eq!(c(5, 0).load(), 5_000_000);
        assert!(c(1, 10_000).load() > c(0, 10_000).load());
    }
}

/// The cluster's values at scrape time, in [`CLUSTER_METRICS`] order.
#[derive(Debug)]
struct ClusterValues([u64; 6]);

/// Name (counters without the `_total` the encoder appends), help, gauge?
const CLUSTER_METRICS: [(&str, &str, bool); 6] = [
    (
        "elkeid_center_cluster_etcd_up",
        "1 when the last etcd call succeeded.",
        true,
    ),
    (
        "elkeid_center_cluster_etcd_errors",
        "Failed etcd calls.",
        false,
    ),
    (
        "elkeid_center_cluster_registrations",
        "Leases granted to this center (re-registrations after expiry included).",
        false,
    ),
    (
        "elkeid_center_cluster_centers",
        "Live centers in etcd's view.",
        true,
    ),
    (
        "elkeid_center_cluster_forwarded",
        "Calls answered by another center.",
        false,
    ),
    (
        "elkeid_center_cluster_forward_errors",
        "Calls to another center that failed.",
        false,
    ),
];

impl prometheus_client::collector::Collector for ClusterValues {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        for ((name, help, gauge), &v) in CLUSTER_METRICS.iter().zip(&self.0) {
            if *gauge {
                let m = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
                m.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
            } else {
                let m = ConstCounter::new(v);
                m.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod metrics_tests {
    use super::*;

    #[test]
    fn cluster_metrics_keep_their_names_types_and_values() {
        let mut out = String::new();
        let mut r = prometheus_client::registry::Registry::default();
        r.register_collector(Box::new(ClusterValues([1, 2, 3, 4, 5, 6])));
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        for want in [
            "# HELP elkeid_center_cluster_etcd_up 1 when the last etcd call succeeded.\n# TYPE elkeid_center_cluster_etcd_up gauge\nelkeid_center_cluster_etcd_up 1\n",
            "# TYPE elkeid_center_cluster_etcd_errors_total counter\nelkeid_center_cluster_etcd_errors_total 2\n",
            "elkeid_center_cluster_registrations_total 3\n",
            "# TYPE elkeid_center_cluster_centers gauge\nelkeid_center_cluster_centers 4\n",
            "elkeid_center_cluster_forwarded_total 5\n",
            "elkeid_center_cluster_forward_errors_total 6\n",
        ] {
            assert!(out.contains(want), "{want:?} not in:\n{out}");
        }
        assert!(!out.contains("EOF"), "{out}");
    }
}
