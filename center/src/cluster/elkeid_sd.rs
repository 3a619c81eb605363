//! Registration into an existing Elkeid service discovery (`--elkeid-sd`),
//! for fleets migrating from Elkeid: their agents keep asking the Elkeid SD
//! and find this center there (spec §5.8).
//!
//! - At start: `POST <sd>/registry/register` with
//!   `{"name":"<name>_grpc","ip":ADVERTISE,"port":GRPC_PORT,"weight":0,"extra":null}`
//!   and the same for `<name>_http` with the API port, signed with the SD's
//!   AK/SK exactly as API calls are (§5.6) when a key is configured.
//! - Then every `interval` (30 s, Elkeid's period) again, `weight` = the
//!   connected agents. Unlike Elkeid, a failed first registration is
//!   retried (every 5 s) instead of giving up for good.
//! - On shutdown or drain: `POST <sd>/registry/evict` with the same bodies,
//!   after a registration in flight has ended (so none lands after it).
//!
//! SD addresses are tried in order until one answers 2xx with a JSON body
//! whose `code` (when present) is 0. Independent of etcd: works for a
//! single center too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::config::ElkeidSdConfig;
use crate::pool::Pool;

/// One call's timeout.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Retry period until the first registration succeeds.
const RETRY: Duration = Duration::from_secs(5);
/// Largest SD answer read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// This center's registration in an Elkeid SD.
#[derive(Debug)]
pub(crate) struct ElkeidSd {
    cfg: ElkeidSdConfig,
    client: Client<HttpConnector, Full<Bytes>>,
    /// Advertised host.
    host: String,
    grpc_port: u16,
    http_port: u16,
    pool: Arc<Pool>,
    stop: CancellationToken,
    /// Held for each registration round and by [`ElkeidSd::leave`]: the
    /// evict is sent after a round in flight has ended, never before it
    /// (the SD would otherwise list a drained center again).
    calls: tokio::sync::Mutex<()>,
    up: AtomicBool,
    registrations: AtomicU64,
    errors: AtomicU64,
}

impl ElkeidSd {
    /// `grpc`/`http`: the bound listeners; the host registered is
    /// `cfg.advertise`, else the gRPC bind IP (an error when unspecified).
    pub(crate) fn new(
        cfg: ElkeidSdConfig,
        grpc: std::net::SocketAddr,
        http: std::net::SocketAddr,
        pool: Arc<Pool>,
    ) -> Result<Arc<ElkeidSd>, String> {
        let host = match &cfg.advertise {
            Some(h) => h.clone(),
            None if grpc.ip().is_unspecified() => {
                return Err(format!(
                    "gRPC listens on {grpc}: set cluster.advertise (--cluster-advertise) to the IP the Elkeid SD should hand to agents"
                ));
            }
            None => grpc.ip().to_string(),
        };
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(TIMEOUT));
        Ok(Arc::new(ElkeidSd {
            cfg,
            client: Client::builder(TokioExecutor::new()).build(connector),
            host,
            grpc_port: grpc.port(),
            http_port: http.port(),
            pool,
            stop: CancellationToken::new(),
            calls: tokio::sync::Mutex::new(()),
            up: AtomicBool::new(false),
            registrations: AtomicU64::new(0),
            errors: AtomicU64::new(0),
        }))
    }

    /// The two registration bodies (`_grpc`, `_http`) with `weight`.
    pub(crate) fn bodies(&self, weight: u64) -> [Value; 2] {
        let one = |suffix: &str, port: u16| {
            json!({
                "name": format!("{}{suffix}", self.cfg.name),
                "ip": self.host,
                "port": port,
                "weight": weight,
                "extra": null,
            })
        };
        [one("_grpc", self.grpc_port), one("_http", self.http_port)]
    }

    async fn post_one(&self, base: &str, path: &str, body: &[u8]) -> Result<(), String> {
        let mut req = http::Request::post(format!("{base}{path}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some((ak, sk)) = &self.cfg.auth {
            let ts = crate::now_unix().to_string();
            let sig = crate::http::auth::sign(sk, "POST", path, "", ak, &ts, body);
            req = req
                .header("AccessKey", ak.as_str())
                .header("Signature", sig)
                .header("TimeStamp", ts);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| e.to_string())?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{base}: {e}"))?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| format!("{base}: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!(
                    "{base}{path}: HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            // Elkeid's envelope: code 0 = success. A body that is not JSON
            // (or has no code) with a 2xx status is taken as success.
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                && let Some(code) = v.get("code").and_then(Value::as_i64)
                && code != 0
            {
                return Err(format!("{base}{path}: refused: {v}"));
            }
            Ok(())
        };
        tokio::time::timeout(TIMEOUT, call)
            .await
            .map_err(|_| format!("{base}: timed out"))?
    }

    /// Posts both bodies to `path` on the first SD that takes them.
    async fn post(&self, path: &str, weight: u64) -> Result<(), String> {
        let bodies: Vec<Vec<u8>> = self
            .bodies(weight)
            .iter()
            .map(|b| b.to_string().into_bytes())
            .collect();
        let mut last = String::from("no SD address");
        'addrs: for base in &self.cfg.addrs {
            for b in &bodies {
                if let Err(e) = self.post_one(base, path, b).await {
                    last = e;
                    continue 'addrs;
                }
            }
            return Ok(());
        }
        Err(last)
    }

    /// Registers now and every `interval` until [`ElkeidSd::leave`].
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let round = self.calls.lock().await;
            if self.stop.is_cancelled() {
                return;
            }
            let weight = self.pool.count() as u64;
            let wait = match self.post("/registry/register", weight).await {
                Ok(()) => {
                    if !self.up.swap(true, Ordering::Relaxed) {
                        tracing::info!(sd = ?self.cfg.addrs, name = %self.cfg.name, "registered in the Elkeid service discovery");
                    }
                    self.registrations.fetch_add(1, Ordering::Relaxed);
                    self.cfg.interval
                }
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    if self.up.swap(false, Ordering::Relaxed) {
                        tracing::warn!(error = %e, "Elkeid service discovery: registration failed; retrying");
                    } else {
                        tracing::debug!(error = %e, "Elkeid service discovery: still failing");
                    }
                    RETRY.min(self.cfg.interval)
                }
            };
            drop(round);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = self.stop.cancelled() => return,
            }
        }
    }

    /// Stops re-registering and evicts this center (shutdown, drain).
    pub(crate) async fn leave(&self) {
        if self.stop.is_cancelled() {
            return;
        }
        self.stop.cancel();
        // A registration round already in flight finishes first (bounded by
        // the per-call timeout); the loop then sees the cancellation.
        let _turn = self.calls.lock().await;
        self.up.store(false, Ordering::Relaxed);
        match self.post("/registry/evict", 0).await {
            Ok(()) => tracing::info!("evicted from the Elkeid service discovery"),
            Err(e) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "Elkeid service discovery: evict failed")
            }
        }
    }

    /// Prometheus text of the registration state.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let rows: [(&str, &str, &str, u64); 3] = [
            (
                "elkeid_center_elkeid_sd_up",
                "gauge",
                "1 when the last registration into the Elkeid SD succeeded.",
                u64::from(self.up.load(Ordering::Relaxed)),
            ),
            (
                "elkeid_center_elkeid_sd_registrations_total",
                "counter",
                "Successful registrations (heartbeats) into the Elkeid SD.",
                self.registrations.load(Ordering::Relaxed),
            ),
            (
                "elkeid_center_elkeid_sd_errors_total",
                "counter",
                "Failed calls to the Elkeid SD.",
                self.errors.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, v) in rows {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CommandConfig;
    use crate::metrics::Metrics;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stand-in SD that records `(path, name)` of each call as it arrives
    /// and holds its answer to the first call until `release` fires.
    async fn stand_in(
        held: tokio::sync::oneshot::Sender<()>,
        release: tokio::sync::oneshot::Receiver<()>,
    ) -> (
        std::net::SocketAddr,
        Arc<std::sync::Mutex<Vec<(String, String)>>>,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            let mut hold = Some((held, release));
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head, mut body) = loop {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "request cut short");
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break (
                            String::from_utf8_lossy(&buf[..p]).into_owned(),
                            buf[p + 4..].to_vec(),
                        );
                    }
                };
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                while body.len() < len {
                    let n = s.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "body cut short");
                    body.extend_from_slice(&chunk[..n]);
                }
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let v: Value = serde_json::from_slice(&body).unwrap();
                let name = v["name"].as_str().unwrap_or("").to_string();
                seen2.lock().unwrap().push((path, name));
                if let Some((held, release)) = hold.take() {
                    let _ = held.send(());
                    let _ = release.await;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{\"code\":0}")
                    .await;
            }
        });
        (addr, seen)
    }

    /// Regression: a drain while a registration round was in flight sent
    /// the evict first; the round's remaining registration then listed the
    /// drained center in the SD again.
    #[tokio::test]
    async fn leave_evicts_after_the_registration_in_flight() {
        let (held_tx, held_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel();
        let (addr, seen) = stand_in(held_tx, release_rx).await;
        let pool = Pool::new(
            4,
            CommandConfig {
                queue_len: 16,
                send_timeout: Duration::from_secs(2),
                result_timeout: Duration::from_secs(2),
                queue_bytes: 1 << 20,
                total_queue_bytes: 1 << 20,
            },
            1 << 20,
            Arc::new(Metrics::default()),
        );
        let sd = ElkeidSd::new(
            ElkeidSdConfig {
                addrs: vec![format!("http://{addr}")],
                name: "hids_svr".into(),
                auth: None,
                interval: Duration::from_secs(3600),
                advertise: None,
            },
            "127.0.0.1:6751".parse().unwrap(),
            "127.0.0.1:6752".parse().unwrap(),
            pool,
        )
        .unwrap();
        let runner = tokio::spawn(sd.clone().run());
        // The first registration is at the SD, its answer held back.
        held_rx.await.unwrap();
        let leaving = tokio::spawn({
            let sd = sd.clone();
            async move { sd.leave().await }
        });
        // Room for a leave that does not wait to send its evict now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        release_tx.send(()).unwrap();
        leaving.await.unwrap();
        runner.await.unwrap();
        let calls = seen.lock().unwrap().clone();
        let want = [
            ("/registry/register", "hids_svr_grpc"),
            ("/registry/register", "hids_svr_http"),
            ("/registry/evict", "hids_svr_grpc"),
            ("/registry/evict", "hids_svr_http"),
        ]
        .map(|(p, n)| (p.to_string(), n.to_string()));
        assert_eq!(calls, want);
        assert!(!sd.up.load(Ordering::Relaxed), "down after the evict");
    }
}
