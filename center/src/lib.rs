//! Elkeid-compatible agent center: gRPC agent streams over mutual TLS, a
//! connection pool, the HTTP command API, config push, file upload and sinks.
//!
//! # Layout
//! - [`config`]: TOML file + flags + env (the CLI reference is there).
//! - [`ctl`]: `elkeid-center ctl …`, the operator commands (a signed API client).
//! - `pki.rs`: dev PKI and API keys generated on first start.
//! - `tls.rs`: server TLS material (mTLS, client certificate required).
//! - `tickets.rs`: TLS session tickets whose keys (`DIR/tls-ticket-keys`)
//!   survive a restart, so reconnecting agents resume their sessions.
//! - `identity.rs`: agent identity mode (shared certificate or per-agent CN).
//! - `grpc/`: tonic server, the Transfer stream handler, FileExt upload.
//! - `pool.rs`: live agent streams, conn limit, conflicts, command delivery.
//! - `budget.rs`: byte budgets shared by many holders (stored details,
//!   command queues, task results).
//! - `records.rs`: per-record processing (heartbeats, task results, logs).
//! - `manager/`: where configs come from and task results go (`local`, `elkeid`).
//! - `http/`: the axum API with AK/SK auth.
//! - `metrics.rs`: counters and Prometheus text.
//! - `sinks/`: the `Sink` trait and the `ndjson`, `null` (and `kafka`) sinks.
//! - `ack.rs`: acknowledged delivery (durability tickets, de-duplication
//!   state and its journal in `DIR/acks/`, counters).
//! - `cluster/`: optional: several centers as one service through etcd
//!   (`--etcd`): registration, agent locations, `/registry/detail`,
//!   center-to-center forwarding.
//!
//! [`run`] wires them: prepare the data dir, bind both listeners, write
//! `DIR/listen.json` (`{"grpc":"ip:port","http":"ip:port"}`, plus
//! `"sd":"ip:port"` with `--sd-listen`, written to a
//! temp file and renamed, only after both listeners are bound), serve until
//! `shutdown` resolves, then stop accepting, close the agent streams, drain
//! the task results and flush the sinks.
#![deny(unsafe_code)]

mod ack;
mod budget;
mod certcache;
mod cluster;
pub mod config;
pub mod ctl;
mod der;
mod grpc;
pub mod heap;
mod http;
mod identity;
mod manager;
mod metrics;
mod pki;
mod pool;
mod records;
mod sinks;
mod tickets;
mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

pub use cluster::{ClusterArgs, ClusterConfig};
pub use config::{Cli, Config, ConfigError};
pub use identity::AgentIdentity;
pub use pki::{PkiError, pki_command};
pub use tickets::TicketError;
pub use tls::TlsError;

/// The gRPC listener's session ticket keys, in the data dir (see `tickets.rs`).
pub const TICKET_KEYS_FILE: &str = "tls-ticket-keys";

use crate::config::ManagerKind;
use crate::manager::{Manager, TaskQueue};

/// Why the center could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A configuration value is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The dev PKI or API keys could not be prepared.
    #[error("pki: {0}")]
    Pki(#[from] PkiError),
    /// TLS material is unreadable or invalid.
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// Config key of the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The I/O error (e.g. address in use).
        #[source]
        source: std::io::Error,
    },
    /// A data-dir file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A sink could not start.
    #[error("sink: {0}")]
    Sink(String),
    /// The gRPC server failed.
    #[error(transparent)]
    Grpc(#[from] grpc::GrpcError),
    /// The HTTP server failed.
    #[error("http server: {0}")]
    Http(std::io::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| RunError::Bind { key, addr, source })
}

fn write_listen(
    dir: &Path,
    grpc: SocketAddr,
    http: SocketAddr,
    sd: Option<SocketAddr>,
) -> Result<(), RunError> {
    let path = dir.join("listen.json");
    let tmp = dir.join(format!(".listen.json.tmp{}", std::process::id()));
    let mut v = serde_json::json!({ "grpc": grpc.to_string(), "http": http.to_string() });
    if let Some(sd) = sd {
        v["sd"] = serde_json::Value::String(sd.to_string());
    }
    let text = v.to_string();
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Every 240 s plus a random 0..30 s, the manager's extra info (tags) of all
/// connected agents (Elkeid's schedule). Ends when the pool is gone.
async fn refresh_extra_info(manager: Arc<dyn Manager>, pool: std::sync::Weak<pool::Pool>) {
    loop {
        let jitter = {
            use ring::rand::SecureRandom;
            let mut b = [0u8; 1];
            let _ = ring::rand::SystemRandom::new().fill(&mut b);
            u64::from(b[0]) * 30_000 / 256
        };
        tokio::time::sleep(Duration::from_secs(240) + Duration::from_millis(jitter)).await;
        let Some(pool) = pool.upgrade() else { return };
        let ids = pool.list();
        drop(pool);
        manager.refresh(&ids).await;
    }
}

/// `(ca, cert, key)`: the configured files, or the dev PKI (generated when missing).
fn tls_material(config: &Config, dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), RunError> {
    let g = &config.grpc;
    match (&g.ca_file, &g.cert_file, &g.key_file) {
        (None, None, None) => {
            let pki = pki::ensure_dev_pki(&dir.join("pki"))?;
            if !pki.created.is_empty() {
                println!(
                    "elkeid-center: generated development PKI in {}",
                    dir.join("pki").display()
                );
            }
            println!(
                "elkeid-center: TLS: CA {} server {} ; agents use {} + {}",
                pki.ca_cert.display(),
                pki.server_cert.display(),
                pki.client_cert.display(),
                pki.client_key.display()
            );
            Ok((pki.ca_cert, pki.server_cert, pki.server_key))
        }
        (Some(ca), Some(cert), Some(key)) => Ok((ca.clone(), cert.clone(), key.clone())),
        _ => {
            let key = if g.ca_file.is_none() {
                "grpc.ca_file"
            } else if g.cert_file.is_none() {
                "grpc.cert_file"
            } else {
                "grpc.key_file"
            };
            Err(ConfigError::Invalid {
                key,
                msg: "grpc.ca_file, grpc.cert_file and grpc.key_file go together".into(),
            }
            .into())
        }
    }
}

/// Runs the center until `shutdown` resolves; returns after a graceful drain.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let metrics = Arc::new(metrics::Metrics::default());

    // TLS material: configured files, or the generated dev PKI.
    let material = if config.grpc.tls || config.http.tls {
        Some(tls_material(&config, &dir)?)
    } else {
        None
    };
    let tls = match (&material, config.grpc.tls) {
        (Some((ca, cert, key)), true) => Some((
            tls::server_config(
                ca,
                cert,
                key,
                Some(&dir.join(TICKET_KEYS_FILE)),
                tls::ChainCache {
                    capacity: config.grpc.conn_limit,
                    counters: metrics.chain_counters(),
                },
            )?,
            config.tls_handshake_timeout,
        )),
        _ => {
            println!(
                "elkeid-center: WARNING: gRPC in plaintext mode (--insecure-plaintext): no TLS, no client authentication"
            );
            None
        }
    };
    let http_tls = match (&material, config.http.tls) {
        // A clustered center asks callers for an optional client
        // certificate of its CA: the other centers present theirs.
        (Some((ca, cert, key)), true) => Some(http::tls::server_config(
            cert,
            key,
            config.cluster.as_ref().map(|_| ca.as_path()),
        )?),
        _ => {
            println!(
                "elkeid-center: WARNING: HTTP API in plain HTTP (http.tls = false): signed requests and responses travel in clear text"
            );
            tracing::warn!("HTTP API in plain HTTP (http.tls = false)");
            None
        }
    };

    let aksk = if config.http.auth {
        let (aksk, created) = pki::ensure_api_keys(&config.http.api_keys_file)?;
        println!(
            "elkeid-center: HTTP API keys ({}) in {}{}",
            aksk.len(),
            config.http.api_keys_file.display(),
            if created { " (generated)" } else { "" }
        );
        aksk
    } else {
        println!("elkeid-center: WARNING: HTTP API authentication is off");
        Default::default()
    };

    let ack_metrics = Arc::new(ack::AckMetrics::default());
    // Acknowledged delivery is on unless ELKEID_CENTER_TEST_NO_ACKS is set
    // (tests only: the center then behaves exactly as Elkeid's, no identity
    // keys and no ack Commands, as a stand-in for a center without the
    // extension).
    let acks = if std::env::var_os("ELKEID_CENTER_TEST_NO_ACKS").is_some() {
        println!("elkeid-center: acknowledged delivery disabled (test mode)");
        None
    } else {
        let recovered = if config.sinks.contains(&sinks::SinkKind::Ndjson) {
            sinks::ndjson::recover_ids(&config.ndjson.dir)
        } else {
            Vec::new()
        };
        let acks_dir = dir.join("acks");
        Some(Arc::new(
            ack::AckStore::open(&acks_dir, &recovered, ack_metrics.clone())
                .map_err(io_err(&acks_dir))?,
        ))
    };
    // Sink settings were checked when the config was loaded.
    let sinks = sinks::build(&config, &metrics, &ack_metrics)
        .await
        .map_err(|e| RunError::Sink(e.to_string()))?;
    if config.sinks.contains(&sinks::SinkKind::Ndjson) {
        println!(
            "elkeid-center: records go to {}",
            config.ndjson.dir.display()
        );
    }
    let manager: Arc<dyn Manager> = match config.manager.backend {
        ManagerKind::Local => manager::local::LocalManager::start(
            config.manager.components_file.clone(),
            dir.join("task-results.ndjson"),
        ),
        ManagerKind::Elkeid => manager::elkeid::ElkeidManager::new(
            config.manager.addrs.clone(),
            config.manager.timeout,
            config.manager.retries,
        ),
    };
    let (tasks, tasks_done) = TaskQueue::start(
        manager.clone(),
        metrics.clone(),
        config.manager.task_queue_bytes,
    );
    let pool = pool::Pool::new(
        config.grpc.conn_limit,
        config.commands.clone(),
        config.grpc.detail_budget_bytes,
        metrics.clone(),
    );
    let refresher = tokio::spawn(refresh_extra_info(manager.clone(), Arc::downgrade(&pool)));
    let ctx = records::Ctx {
        sinks: sinks.clone(),
        manager,
        tasks,
        metrics: metrics.clone(),
        acks,
    };
    let uploads_dir = dir.join("uploads");
    std::fs::create_dir_all(&uploads_dir).map_err(io_err(&uploads_dir))?;
    let uploads = grpc::upload::UploadConfig {
        dir: uploads_dir,
        max_bytes: config.grpc.upload_max_bytes,
        quota_bytes: config.grpc.upload_quota_bytes,
        idle: config.grpc.upload_idle,
    };

    let grpc_listener = bind("grpc.addr", config.grpc.addr).await?;
    let http_listener = bind("http.addr", config.http.addr).await?;
    let sd_listener = match config.cluster.as_ref().and_then(|c| c.sd_listen) {
        Some(addr) => Some(bind("cluster.sd_listen", addr).await?),
        None => None,
    };
    let sd_addr = match &sd_listener {
        Some(l) => Some(l.local_addr().map_err(|source| {
            RunError::Bind {
                key: "cluster.sd_listen",
                addr: config
                    .cluster
                    .as_ref()
                    .and_then(|c| c.sd_listen)
                    .unwrap_or(config.http.addr),
                source,
            }
        })?),
        None => None,
    };
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| RunError::Bind {
            key: "grpc.addr",
            addr: config.grpc.addr,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| RunError::Bind {
            key: "http.addr",
            addr: config.http.addr,
            source,
        })?;

    // Cluster membership (only with --etcd): signed with this center's first
    // API key, TLS to peers with this center's own certificate and CA.
    let cluster = match &config.cluster {
        None => None,
        Some(cc) => {
            let key = aksk.iter().next().map(|(a, s)| (a.clone(), s.clone()));
            let peer_tls = match &material {
                Some((ca, cert, key)) => Some(
                    cluster::peer::tls_config(ca, cert, key)
                        .map_err(|msg| config.origins.invalid("grpc.cert_file", msg))?,
                ),
                None => None,
            };
            let c = cluster::Cluster::new(
                cc.clone(),
                cluster::Local {
                    grpc: grpc_addr,
                    http: http_addr,
                    https: http_tls.is_some(),
                    conn_limit: config.grpc.conn_limit,
                },
                pool.clone(),
                key,
                peer_tls,
            )
            .map_err(|msg| config.origins.invalid("cluster.advertise", msg))?;
            println!(
                "elkeid-center: cluster member {} via etcd {}",
                c.id(),
                cc.etcd.join(",")
            );
            tokio::spawn(c.clone().run());
            Some(c)
        }
    };

    // Registration into an Elkeid SD (--elkeid-sd), clustered or not.
    let elkeid_sd = match &config.elkeid_sd {
        None => None,
        Some(cfg) => {
            let sd =
                cluster::elkeid_sd::ElkeidSd::new(cfg.clone(), grpc_addr, http_addr, pool.clone())
                    .map_err(|msg| config.origins.invalid("cluster.advertise", msg))?;
            println!(
                "elkeid-center: registering as {}_grpc/{}_http in the Elkeid SD {}",
                cfg.name,
                cfg.name,
                cfg.addrs.join(",")
            );
            tokio::spawn(sd.clone().run());
            Some(sd)
        }
    };

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    every(heap::TRIM_EVERY, stop_rx.clone(), heap::trim, |_| {});
    if let Some(tickets) = tls.as_ref().and_then(|(t, _)| t.tickets.clone()) {
        every(
            tickets::ROTATE_CHECK,
            stop_rx.clone(),
            move || tickets.rotate(),
            |r| match r {
                Ok(Ok(true)) => tracing::info!("tls ticket key rotated"),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "tls ticket key rotation failed"),
                Err(error) => tracing::warn!(%error, "tls ticket key rotation task failed"),
            },
        );
    }
    let grpc_cfg = config.grpc.clone();
    let grpc_pool = pool.clone();
    let grpc_ctx = ctx.clone();
    let grpc_stop = stopped(stop_rx.clone());
    let mut grpc_task = tokio::spawn(async move {
        grpc::serve(
            grpc_listener,
            &grpc_cfg,
            tls,
            grpc_pool,
            grpc_ctx,
            uploads,
            grpc_stop,
        )
        .await
    });
    let state = http::AppState {
        pool: pool.clone(),
        metrics: metrics.clone(),
        sinks: sinks.clone(),
        aksk: Arc::new(aksk),
        auth: config.http.auth,
        acks: ack_metrics,
        replays: Default::default(),
        cluster: cluster.clone(),
        elkeid_sd: elkeid_sd.clone(),
        peer_mtls: http_tls.is_some() && cluster.is_some(),
    };
    let mut sd_task = sd_listener.map(|l| {
        println!(
            "elkeid-center: WARNING: service discovery in plain HTTP on {} (read-only: GET /registry/detail only)",
            sd_addr.map(|a| a.to_string()).unwrap_or_default()
        );
        let router = http::sd_router(state.clone());
        let stop = stopped(stop_rx.clone());
        let (timeout, metrics) = (config.tls_handshake_timeout, metrics.clone());
        tokio::spawn(async move { http::serve::serve(l, router, None, timeout, metrics, stop).await })
    });
    let http_stop = stopped(stop_rx.clone());
    let http_handshake = config.tls_handshake_timeout;
    let http_metrics = metrics.clone();
    let mut http_task = tokio::spawn(async move {
        http::serve::serve(
            http_listener,
            http::router(state),
            http_tls,
            http_handshake,
            http_metrics,
            http_stop,
        )
        .await
    });
    drop(ctx);

    write_listen(&dir, grpc_addr, http_addr, sd_addr)?;
    println!("elkeid-center: gRPC on {grpc_addr}, HTTP API on {http_addr}");
    tracing::info!(grpc = %grpc_addr, http = %http_addr, data_dir = %dir.display(), "elkeid-center started");

    // Serve until asked to stop or a server fails.
    let early = tokio::select! {
        _ = shutdown => None,
        r = &mut grpc_task => Some(("grpc", r.map(|r| r.map_err(RunError::from)))),
        r = &mut http_task => Some(("http", r.map(|r| r.map_err(RunError::Http)))),
    };
    tracing::info!(
        "elkeid-center stopping: no new connections, closing agent streams, draining sinks"
    );
    // Leave the cluster first: SD stops naming this center and its agent
    // keys vanish, so agents told to reconnect land on the others.
    if let Some(c) = &cluster {
        let _ = tokio::time::timeout(Duration::from_secs(3), c.leave()).await;
    }
    if let Some(sd) = &elkeid_sd {
        let _ = tokio::time::timeout(Duration::from_secs(6), sd.leave()).await;
    }
    let _ = stop_tx.send(true);
    pool.close_all();
    let mut result = Ok(());
    if let Some((which, r)) = early {
        match r {
            Ok(Err(e)) => result = Err(e),
            Ok(Ok(())) => tracing::warn!(server = which, "server ended on its own"),
            Err(e) => tracing::error!(server = which, error = %e, "server task failed"),
        }
    }
    let grace = Duration::from_secs(10);
    if !grpc_task.is_finished() {
        let _ = tokio::time::timeout(grace, &mut grpc_task).await;
    }
    if !http_task.is_finished() {
        let _ = tokio::time::timeout(grace, &mut http_task).await;
    }
    // Receive loops finish the packet in hand, then unregister.
    let deadline = tokio::time::Instant::now() + grace;
    while pool.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    grpc_task.abort();
    http_task.abort();
    if let Some(t) = sd_task.take() {
        t.abort();
    }
    refresher.abort();
    // Dropping the servers dropped their task-queue handles: the batcher flushes and ends.
    let _ = tokio::time::timeout(grace, tasks_done).await;
    sinks.flush().await;
    let _ = std::fs::remove_file(dir.join("listen.json"));
    tracing::info!("elkeid-center stopped");
    result
}

/// Current Unix seconds (0 if the clock is before 1970).
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Runs `work` on the blocking pool every `period` (the first time one
/// period after the start) until `stop` turns true; `done` sees each
/// outcome.
fn every<T, W, D>(period: Duration, mut stop: tokio::sync::watch::Receiver<bool>, work: W, done: D)
where
    T: Send + 'static,
    W: Fn() -> T + Clone + Send + 'static,
    D: Fn(Result<T, tokio::task::JoinError>) + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.wait_for(|v| *v) => return,
                _ = tick.tick() => {}
            }
            let w = work.clone();
            let outcome = tokio::task::spawn_blocking(w).await;
            done(outcome);
        }
    });
}

/// Entry points for the criterion benches in `center/benches/` (and the
/// encoder tests): not a stable API.
#[doc(hidden)]
pub mod bench {
    use elkeid_proto::grpc::{EncodedRecord, PackagedData};

    use crate::ack::PacketId;
    use crate::sinks::PacketBatch;
    use crate::sinks::ndjson::line::PacketJson;

    /// The gRPC listener's rustls configuration over the dev PKI in `dir`
    /// (made if missing), without a ticket-keys file; `chain_cache` as the
    /// center runs it, or off (every chain checked against the CA). Also
    /// returns the PEM of the CA, the client certificate and its key.
    pub fn grpc_tls(
        dir: &std::path::Path,
        chain_cache: bool,
    ) -> Result<(std::sync::Arc<rustls::ServerConfig>, [Vec<u8>; 3]), String> {
        let pki = crate::pki::ensure_dev_pki(dir).map_err(|e| e.to_string())?;
        let cache = crate::tls::ChainCache {
            capacity: if chain_cache { 1024 } else { 0 },
            ..Default::default()
        };
        let tls =
            crate::tls::server_config(&pki.ca_cert, &pki.server_cert, &pki.server_key, None, cache)
                .map_err(|e| e.to_string())?;
        let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| e.to_string());
        Ok((
            tls.config,
            [
                read(&pki.ca_cert)?,
                read(&pki.client_cert)?,
                read(&pki.client_key)?,
            ],
        ))
    }

    /// One received packet as the NDJSON sink sees it.
    #[derive(Debug)]
    pub struct Packet(PacketBatch);

    impl Packet {
        /// The packet as `handle_packet` hands it to the sinks, with an
        /// acknowledgement identity (`epoch`, `seq`) or without.
        pub fn new(pkt: PackagedData, svr_time: i64, id: Option<(u64, u64)>) -> Self {
            let id = id.map(|(epoch, seq)| PacketId { epoch, seq });
            Packet(PacketBatch::from_packet(
                pkt,
                svr_time,
                String::new(),
                id,
                None,
            ))
        }

        /// Appends every record's line, as the sink writes them.
        pub fn ndjson(&self, out: &mut Vec<u8>) {
            let p = PacketJson::new(&self.0);
            for (i, rec) in self.0.records.iter().enumerate() {
                p.write(out, i, rec);
            }
        }

        /// Appends every record's line through `serde_json` (a struct and
        /// a `BTreeMap` of the fields per record), the encoder before the
        /// direct one: the reference the tests compare against.
        pub fn ndjson_serde(&self, out: &mut Vec<u8>) {
            for (i, rec) in self.0.records.iter().enumerate() {
                serde_line(out, &self.0, i, rec);
            }
        }
    }

    pub(crate) fn serde_line(
        out: &mut Vec<u8>,
        batch: &PacketBatch,
        idx: usize,
        rec: &EncodedRecord,
    ) {
        use base64::Engine;
        #[derive(serde::Serialize)]
        struct Line<'a> {
            data_type: i32,
            agent_time: i64,
            svr_time: i64,
            agent_id: &'a str,
            hostname: &'a str,
            version: &'a str,
            product: &'a str,
            intranet_ipv4: &'a [String],
            extranet_ipv4: &'a [String],
            intranet_ipv6: &'a [String],
            extranet_ipv6: &'a [String],
            tag: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            agent_epoch: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            agent_seq: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            record_idx: Option<usize>,
            #[serde(skip_serializing_if = "Option::is_none")]
            packet_records: Option<usize>,
            #[serde(skip_serializing_if = "Option::is_none")]
            fields: Option<std::collections::BTreeMap<&'a str, &'a str>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            body: Option<String>,
        }
        let (fields, body) = match elkeid_core::payload::decode_utf8(&rec.data) {
            // Last duplicate wins, as in a protobuf map.
            Ok(pairs) => (Some(pairs.into_iter().collect()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(&rec.data)),
            ),
        };
        let line = Line {
            data_type: rec.data_type,
            agent_time: rec.timestamp,
            svr_time: batch.svr_time,
            agent_id: &batch.agent_id,
            hostname: &batch.hostname,
            version: &batch.version,
            product: &batch.product,
            intranet_ipv4: &batch.intranet_ipv4,
            extranet_ipv4: &batch.extranet_ipv4,
            intranet_ipv6: &batch.intranet_ipv6,
            extranet_ipv6: &batch.extranet_ipv6,
            tag: &batch.tag,
            agent_epoch: batch.id.map(|id| id.epoch),
            agent_seq: batch.id.map(|id| id.seq),
            record_idx: batch.id.map(|_| idx),
            packet_records: batch.id.map(|_| batch.records.len()),
            fields,
            body,
        };
        // Serializing borrowed strings into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, &line);
        out.push(b'\n');
    }
}

/// A serialized `Payload` with these entries (tests only).
#[cfg(test)]
pub(crate) fn test_payload(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut p = elkeid_core::payload::PayloadBuf::new();
    for (k, v) in fields {
        p.field(k, v);
    }
    p.into_vec()
}
