//! Connection to the center and the Transfer stream.
//!
//! # Layout
//! - `tls`: rustls client config (mTLS, ALPN h2, fixed-name verification).
//! - `channel`: TCP + TLS + h2 connection as a tonic service, byte counters.
//! - this file: address selection (§2.4: service discovery, private,
//!   public), reconnect with exponential backoff and jitter (never exits),
//!   the send loop (ring batches, commit/rollback) and the receive loop
//!   (command dispatch).

pub(crate) mod channel;
#[allow(dead_code)] // wired into the send loop after the agent restructuring lands
pub(crate) mod delivery;
pub(crate) mod tls;

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elkeid_proto::codec::RawEncodeCodec;
use elkeid_proto::grpc::{Command, Config as PluginConfig};
use elkeid_proto::snappy::SnappyClient;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::sync::mpsc;
use tonic::codegen::http::uri::PathAndQuery;

use crate::buffer::RING_SLOTS;
use crate::config::{PRODUCT, VERSION};
use crate::state::{Agent, Exit};
use channel::Channel;

/// gRPC path of the Transfer stream.
pub(crate) const TRANSFER_PATH: &str = "/grpc.Transfer/Transfer";
/// Largest PackagedData we build (decompressed), well under the center's 10 MiB.
pub(crate) const MAX_BATCH_BYTES: usize = elkeid_core::ring::DEFAULT_BATCH_BYTES;
/// Send tick.
const SEND_INTERVAL: Duration = Duration::from_millis(100);
/// Cap of a service-discovery response.
const MAX_SD_RESPONSE: usize = 256 * 1024;
/// How long a closing session waits for the center to end its side.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Errors ending one Transfer session (the loop reconnects after each).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The gRPC call failed (status from the center or the connection).
    #[error("transfer: {0}")]
    Status(#[from] tonic::Status),
    /// The request stream was dropped: the connection is gone.
    #[error("transfer stream closed")]
    Closed,
    /// The center ended the stream cleanly.
    #[error("center ended the stream")]
    Ended,
}

/// Errors of a service-discovery lookup.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DiscoveryError {
    /// The HTTP request failed.
    #[error("service discovery: {0}")]
    Http(#[from] crate::http_client::HttpError),
    /// The response is not the expected JSON.
    #[error("service discovery: bad response: {0}")]
    Json(String),
    /// No usable entry.
    #[error("service discovery returned no servers")]
    Empty,
}

/// Parses `{"code":..,"data":[{"ip":..,"port":..,"weight":..}],"msg":..}`
/// into `ip:port` strings (port as number or string; bad entries skipped).
pub(crate) fn parse_discovery(body: &[u8]) -> Result<Vec<String>, DiscoveryError> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| DiscoveryError::Json(e.to_string()))?;
    let data = v
        .get("data")
        .and_then(|d| d.as_array())
        .ok_or_else(|| DiscoveryError::Json("no data array".into()))?;
    let out: Vec<String> = data
        .iter()
        .take(64)
        .filter_map(|e| {
            let ip = e.get("ip")?.as_str()?;
            let port = match e.get("port")? {
                serde_json::Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
                serde_json::Value::String(s) => s.parse().ok()?,
                _ => return None,
            };
            if ip.is_empty() || port == 0 {
                return None;
            }
            Some(if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            })
        })
        .collect();
    if out.is_empty() {
        return Err(DiscoveryError::Empty);
    }
    Ok(out)
}

async fn discover(sd: &str, timeout: Duration) -> Result<Vec<String>, DiscoveryError> {
    let url = format!("http://{sd}/registry/detail?name=hids_svr_grpc&count=10");
    let body = crate::http_client::get(&url, timeout, MAX_SD_RESPONSE).await?;
    parse_discovery(&body)
}

/// Tiny xorshift for backoff jitter.
#[derive(Debug)]
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter(t ^ u64::from(std::process::id()).rotate_left(32) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// `d` scaled by a random factor in [0.5, 1.0].
    fn apply(&mut self, d: Duration) -> Duration {
        let f = 0.5 + (self.next() % 1000) as f64 / 2000.0;
        d.mul_f64(f)
    }
}

/// Exponential backoff: doubles up to [`BACKOFF_MAX`].
pub(crate) fn next_backoff(cur: Duration) -> Duration {
    (cur * 2).clamp(BACKOFF_MIN, BACKOFF_MAX)
}

/// Tries service discovery, then the private list, then the public list.
async fn dial(
    agent: &Agent,
    tls: &Arc<ClientConfig>,
    name: &ServerName<'static>,
) -> Option<(Channel, &'static str)> {
    let region = agent.region.borrow().clone();
    let servers = agent.cfg.servers.get(&region).cloned().unwrap_or_default();
    let mut candidates: Vec<(String, &'static str)> = Vec::new();
    for sd in &servers.service_discovery {
        match discover(sd, agent.cfg.sd_timeout).await {
            Ok(list) => {
                candidates.extend(list.into_iter().map(|a| (a, "sd")));
                break;
            }
            Err(error) => tracing::warn!(sd = %sd, %error, "service discovery failed"),
        }
    }
    candidates.extend(servers.private.iter().map(|a| (a.clone(), "private")));
    candidates.extend(servers.public.iter().map(|a| (a.clone(), "public")));
    if candidates.is_empty() {
        tracing::error!(region = %region, "no center address configured for this region");
    }
    for (addr, mode) in candidates {
        match Channel::connect(
            &addr,
            tls.clone(),
            name.clone(),
            agent.bytes.clone(),
            agent.cfg.dial_timeout,
        )
        .await
        {
            Ok(ch) => {
                tracing::info!(addr = %addr, net_mode = mode, "connected to center");
                return Some((ch, mode));
            }
            Err(error) => tracing::warn!(addr = %addr, %error, "dial failed"),
        }
    }
    None
}

/// Connects, runs a session, backs off and reconnects, forever; returns
/// only once `agent.closing` is set and the ring was flushed (the request
/// stream is then ended cleanly).
pub(crate) async fn run(agent: Rc<Agent>, tls: Arc<ClientConfig>) {
    let name = match tls::server_name(&agent.cfg.server_name) {
        Ok(n) => n,
        Err(error) => {
            // Checked at start-up; unreachable in practice.
            tracing::error!(%error, "invalid server name");
            return;
        }
    };
    let mut jitter = Jitter::new();
    let mut backoff = Duration::ZERO;
    let mut connected_once = false;
    loop {
        if !backoff.is_zero() {
            let d = jitter.apply(backoff);
            tracing::info!(delay_ms = d.as_millis() as u64, "reconnecting after delay");
            tokio::time::sleep(d).await;
        }
        let Some((ch, mode)) = dial(&agent, &tls, &name).await else {
            backoff = next_backoff(backoff);
            continue;
        };
        if connected_once {
            agent.reconnects.set(agent.reconnects.get() + 1);
        } else {
            // A self-updated binary keeps `<exe>.old` until it has connected.
            crate::update::cleanup_old_binary();
        }
        connected_once = true;
        agent.net_mode.set(mode);
        agent.channel.replace(Some(ch.clone()));
        let started = tokio::time::Instant::now();
        let r = session(&agent, ch).await;
        agent.channel.replace(None);
        match r {
            Ok(()) => tracing::info!("transfer session ended"),
            Err(error) => tracing::warn!(%error, "transfer session ended"),
        }
        if agent.closing.get() {
            return;
        }
        backoff = if started.elapsed() > Duration::from_secs(30) {
            BACKOFF_MIN
        } else {
            next_backoff(backoff)
        };
    }
}

/// One Transfer stream: a 1000 heartbeat first, then the send and receive
/// loops until either fails.
async fn session(agent: &Rc<Agent>, ch: Channel) -> Result<(), SessionError> {
    crate::heartbeat::push_agent_heartbeat(agent).await;
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let origin = format!("https://{}", agent.cfg.server_name)
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("https://elkeid.com"));
    let mut grpc = tonic::client::Grpc::with_origin(SnappyClient::new(ch), origin);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (b, rx)) });
    let call = grpc.streaming(
        tonic::Request::new(stream),
        PathAndQuery::from_static(TRANSFER_PATH),
        RawEncodeCodec::<Command>::new(),
    );
    let receiver = async {
        let mut commands = call.await?.into_inner();
        while let Some(cmd) = commands.message().await? {
            dispatch(agent, cmd);
        }
        Err::<(), _>(SessionError::Ended)
    };
    tokio::pin!(receiver);
    tokio::select! {
        r = send_loop(agent, tx) => {
            // Closing: the request stream has ended (tx dropped); give the
            // center a moment to end its side cleanly.
            r?;
            match tokio::time::timeout(CLOSE_GRACE, &mut receiver).await {
                Ok(Err(SessionError::Ended)) | Err(_) => Ok(()),
                Ok(r) => r,
            }
        }
        r = &mut receiver => r,
    }
}

/// Ships ring batches every 100 ms, at once when the ring passes its
/// high-water mark, or when kicked. A batch is committed once the request
/// body took it; on any failure it is rolled back and re-sent after the
/// reconnect, in order.
async fn send_loop(agent: &Agent, tx: mpsc::Sender<Bytes>) -> Result<(), SessionError> {
    let mut tick = tokio::time::interval(SEND_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = agent.buffer.high_water() => {}
            _ = agent.kick.notified() => {}
        }
        crate::log::drain_error_records(agent);
        if agent.closing.get() && agent.buffer.is_empty() {
            return Ok(());
        }
        if agent.release_memory.replace(false) {
            buf = Vec::new();
        }
        loop {
            buf.clear();
            let meta = agent.meta.borrow().clone();
            let Some((batch, n)) =
                agent
                    .buffer
                    .begin_packet(RING_SLOTS, MAX_BATCH_BYTES, &meta, &mut buf)
            else {
                // Idle: do not keep a large buffer around.
                if buf.capacity() > 64 * 1024 {
                    buf = Vec::new();
                }
                break;
            };
            // Hand the buffer itself to the request body (no copy); the
            // next batch starts a buffer of the same size.
            let cap = buf.len();
            let pkt = Bytes::from(std::mem::replace(&mut buf, Vec::with_capacity(cap)));
            if tx.send(pkt).await.is_err() {
                agent.buffer.rollback(batch);
                return Err(SessionError::Closed);
            }
            // The slot frees once the body took the packet.
            match tx.reserve().await {
                Ok(permit) => drop(permit),
                Err(_) => {
                    agent.buffer.rollback(batch);
                    return Err(SessionError::Closed);
                }
            }
            agent.buffer.commit(batch);
            agent.tx_records.set(agent.tx_records.get() + n as u64);
        }
    }
}

/// Handles one Command (§3.5, with Elkeid's "task drops configs" fixed).
fn dispatch(agent: &Rc<Agent>, cmd: Command) {
    agent.rx_commands.set(agent.rx_commands.get() + 1);
    if let Some(task) = cmd.task {
        if task.object_name == PRODUCT {
            crate::tasks::handle(agent, task);
        } else {
            let token = task.token.clone();
            let name = task.object_name.clone();
            if let Err(error) = agent.plugins.send_task(task) {
                tracing::warn!(plugin = %name, %error, "task not delivered");
                agent.task_failed(&token, &error.to_string());
            }
        }
        if cmd.configs.is_empty() {
            return;
        }
    }
    config_sync(agent, cmd.configs);
}

/// Config sync: `elkeid-agent` entry with another version -> self-update;
/// the rest is the desired plugin set.
fn config_sync(agent: &Rc<Agent>, configs: Vec<PluginConfig>) {
    agent.abnormal.borrow_mut().clear();
    let (own, plugins): (Vec<PluginConfig>, Vec<PluginConfig>) =
        configs.into_iter().partition(|c| c.name == PRODUCT);
    if let Some(cfg) = own.into_iter().next()
        && cfg.version != VERSION
    {
        let a = agent.clone();
        tokio::task::spawn_local(async move {
            let ctx = crate::update::UpdateContext {
                work_dir: a.cfg.work_dir.clone(),
            };
            match crate::update::self_update(&ctx, &cfg).await {
                Ok(crate::update::UpdateOutcome::Replaced(path)) => {
                    tracing::info!(version = %cfg.version, "self-update installed, restarting");
                    a.stop(Exit::Reexec(path));
                }
                Err(error) => {
                    tracing::error!(version = %cfg.version, %error, "agent update failed");
                    a.set_abnormal(format!("agent update failed: {error}"));
                }
            }
        });
    }
    let a = agent.clone();
    tokio::task::spawn_local(async move {
        a.plugins.sync(plugins).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_json() {
        let body = br#"{"code":0,"data":[{"ip":"10.0.0.1","port":6751,"weight":3},{"ip":"fd00::1","port":"6752"},{"ip":"","port":1},{"ip":"x","port":70000}],"msg":"ok"}"#;
        assert_eq!(
            parse_discovery(body).unwrap(),
            vec!["10.0.0.1:6751", "[fd00::1]:6752"]
        );
        assert!(matches!(
            parse_discovery(br#"{"code":0,"data":[],"msg":""}"#),
            Err(DiscoveryError::Empty)
        ));
        assert!(matches!(
            parse_discovery(b"<html>"),
            Err(DiscoveryError::Json(_))
        ));
    }

    #[test]
    fn backoff_grows_and_caps() {
        let mut d = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..10 {
            d = next_backoff(d);
            seen.push(d.as_secs());
        }
        assert_eq!(seen, vec![1, 2, 4, 8, 16, 32, 60, 60, 60, 60]);
        let mut j = Jitter::new();
        for _ in 0..100 {
            let x = j.apply(Duration::from_secs(10));
            assert!(x >= Duration::from_secs(5) && x <= Duration::from_secs(10));
        }
    }
}
