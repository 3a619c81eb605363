//! Connection to the center and the Transfer stream.
//!
//! # Layout
//! - `tls`: rustls client config (mTLS, ALPN h2, fixed-name verification).
//! - `channel`: TCP + TLS + h2 connection with PING keepalive, byte counters.
//! - `grpc`: the gRPC calls on that connection (message framing, snappy,
//!   status), straight on `h2`.
//! - this file: address selection (§2.4: service discovery, private,
//!   public), reconnect with exponential backoff and jitter (never exits),
//!   the send loop (ring batches, commit/rollback) and the receive loop
//!   (each command goes to the `on_command` callback; the agent plans and
//!   executes it, see `crate::command`).
//!
//! - `delivery`: the unacknowledged window and the disk spool (acknowledged
//!   delivery): packets are stamped with their identity, kept until the
//!   center acknowledges them, re-sent in order after a reconnect or a
//!   failover, and spilled to the spool while no center takes data.
//!
//! The transport owns the connection state ([`Link`]) and the delivery
//! state; it writes the counters and reads the host metadata (packet
//! fields, region).
//!
//! A hung center is left within `--failover-secs`: HTTP/2 PING keepalive
//! and `TCP_USER_TIMEOUT` end a dead connection, and acknowledgements that
//! stop advancing while packets wait end the session; the address that
//! failed is then tried last, at once.

pub(crate) mod channel;
pub(crate) mod delivery;
pub(crate) mod grpc;
pub(crate) mod recycle;
pub(crate) mod tls;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use elkeid_proto::grpc::Command;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;

use crate::buffer::{Buffer, RING_SLOTS};
use crate::config::Config;
use crate::counters::Counters;
use crate::heartbeat::Heartbeat;
use crate::meta::HostMeta;
use channel::Channel;
use delivery::Delivery;

/// Connection state, owned by the transport (others only look).
#[derive(Debug, Default)]
pub(crate) struct Link {
    /// The live connection (uploads open another stream on it).
    pub(crate) channel: RefCell<Option<Channel>>,
    /// Graceful stop: end the Transfer stream once the ring is empty.
    pub(crate) closing: Cell<bool>,
    /// SIGUSR2 asked to drop cached buffers.
    pub(crate) release_memory: Cell<bool>,
}

/// What the transport works with.
#[derive(Debug)]
pub(crate) struct Transport {
    pub(crate) cfg: Rc<Config>,
    pub(crate) buffer: Rc<Buffer>,
    pub(crate) counters: Rc<Counters>,
    pub(crate) meta: Rc<HostMeta>,
    /// A 1000 heartbeat is pushed at the start of every session.
    pub(crate) heartbeat: Rc<Heartbeat>,
    pub(crate) link: Rc<Link>,
    /// Unacknowledged window and disk spool.
    pub(crate) delivery: Rc<Delivery>,
    /// Self-update trial: told about the first connect.
    pub(crate) update: Rc<crate::rollback::Watch>,
}

/// Receives every Command, in order, on the runtime thread.
pub(crate) type OnCommand = Rc<dyn Fn(Command)>;

/// gRPC path of the Transfer stream.
pub(crate) const TRANSFER_PATH: &str = "/grpc.Transfer/Transfer";
/// Largest PackagedData we build (decompressed), well under the center's 10 MiB.
pub(crate) const MAX_BATCH_BYTES: usize = elkeid_core::ring::DEFAULT_BATCH_BYTES;
/// Send tick.
const SEND_INTERVAL: Duration = Duration::from_millis(100);
/// The room the unacknowledged window must have before a new batch is
/// taken from the ring: the largest packet that ring can make (its byte
/// budget, plus per-record keys and the packet's metadata), at most
/// `MAX_BATCH_BYTES`. With a small ring (the OpenWrt profile: 1 MiB) a
/// small window (`unacked_bytes`) still keeps more than one packet in
/// flight. The window itself refuses a packet that does not fit
/// (`Delivery::push`), so this is only the early check.
fn batch_gate(ring_bytes: usize) -> usize {
    MAX_BATCH_BYTES.min(ring_bytes.saturating_add(64 * 1024))
}

/// Send-loop wake-ups with an empty ring (at least one per
/// `SEND_INTERVAL`, so about a second) before the ring's pages are released.
const RELEASE_AFTER_IDLE_WAKES: u32 = 10;
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
    Rpc(#[from] grpc::GrpcError),
    /// The center ended the stream cleanly.
    #[error("center ended the stream")]
    Ended,
    /// Acknowledgements stopped advancing while packets waited.
    #[error("center stalled: no acknowledgement progress")]
    Stalled,
}

/// Errors of a service-discovery lookup.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DiscoveryError {
    /// The HTTP request failed.
    #[error("service discovery: {0}")]
    Http(#[from] crate::fetch::DownloadError),
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
    let body = crate::fetch::get(&url, timeout, MAX_SD_RESPONSE).await?;
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

/// Tries service discovery, then the private list, then the public list;
/// `avoid` (the address that just failed) is tried last.
async fn dial(
    agent: &Transport,
    tls: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    avoid: Option<&str>,
) -> Option<(Channel, &'static str, String)> {
    let region = agent.meta.region.borrow().clone();
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
    if let Some(bad) = avoid
        && candidates.len() > 1
        && let Some(i) = candidates.iter().position(|(a, _)| a == bad)
    {
        let c = candidates.remove(i);
        candidates.push(c);
    }
    for (addr, mode) in candidates {
        match Channel::connect(
            &addr,
            tls.clone(),
            name.clone(),
            agent.counters.bytes.clone(),
            agent.cfg.dial_timeout,
            agent.cfg.failover,
        )
        .await
        {
            Ok(ch) => {
                tracing::info!(addr = %addr, net_mode = mode, "connected to center");
                crate::status::connected(&addr);
                return Some((ch, mode, addr));
            }
            Err(error) => tracing::warn!(addr = %addr, %error, "dial failed"),
        }
    }
    None
}

/// Connects, runs a session, backs off and reconnects, forever; returns
/// only once `link.closing` is set and the ring was flushed (the request
/// stream is then ended cleanly).
pub(crate) async fn run(agent: Rc<Transport>, tls: Arc<ClientConfig>, on_command: OnCommand) {
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
    let mut avoid: Option<String> = None;
    let delivery = agent.delivery.clone();
    loop {
        // While no center takes data, the ring spills into the spool.
        let connect = async {
            if !backoff.is_zero() {
                let d = jitter.apply(backoff);
                tracing::info!(delay_ms = d.as_millis() as u64, "reconnecting after delay");
                tokio::time::sleep(d).await;
            }
            dial(&agent, &tls, &name, avoid.as_deref()).await
        };
        let dialed = tokio::select! {
            r = connect => r,
            () = offline(&agent) => None,
        };
        let Some((ch, mode, addr)) = dialed else {
            if agent.link.closing.get() {
                return;
            }
            backoff = next_backoff(backoff);
            continue;
        };
        if connected_once {
            Counters::add(&agent.counters.reconnects, 1);
        } else {
            // A self-updated binary on trial commits after it stayed up;
            // a rolled-back one reports the rollback.
            agent.update.on_connect(&agent.heartbeat);
        }
        connected_once = true;
        agent.counters.net_mode.set(mode);
        agent.link.channel.replace(Some(ch.clone()));
        let started = tokio::time::Instant::now();
        delivery.rewind();
        let r = session(&agent, ch, &on_command).await;
        agent.link.channel.replace(None);
        delivery.publish();
        avoid = None;
        crate::status::disconnected(
            &r.as_ref()
                .err()
                .map(ToString::to_string)
                .unwrap_or_default(),
        );
        match r {
            Ok(()) => tracing::info!("transfer session ended"),
            Err(error) => {
                tracing::warn!(addr = %addr, %error, "transfer session ended");
                // a hung or failing center: the others first
                avoid = Some(addr);
            }
        }
        if agent.link.closing.get() {
            return;
        }
        backoff = if started.elapsed() > Duration::from_secs(30) {
            BACKOFF_MIN
        } else if avoid.is_some() && !delivery.is_empty() {
            // failover: the next address at once
            Duration::ZERO
        } else {
            next_backoff(backoff)
        };
    }
}

/// One Transfer stream: a 1000 heartbeat first, then the send and receive
/// loops until either fails.
async fn session(
    agent: &Transport,
    ch: Channel,
    on_command: &OnCommand,
) -> Result<(), SessionError> {
    crate::heartbeat::push_agent_heartbeat(&agent.heartbeat).await;
    let (tx, response) = grpc::start(
        &ch.send,
        &ch.counters,
        &agent.cfg.server_name,
        TRANSFER_PATH,
    )
    .await?;
    let receiver = async {
        let mut commands = grpc::Receiver::open(response, &ch.counters).await?;
        while let Some(cmd) = commands.message::<Command>().await? {
            Counters::add(&agent.counters.rx_commands, 1);
            // an ack-only Command is an acknowledgement, never a config sync
            if agent.delivery.on_command(&cmd) {
                continue;
            }
            on_command(cmd);
        }
        Err::<(), _>(SessionError::Ended)
    };
    tokio::pin!(receiver);
    tokio::select! {
        r = send_loop(agent, tx) => {
            // Closing: the request stream has ended; give the center a
            // moment to end its side cleanly.
            r?;
            match tokio::time::timeout(CLOSE_GRACE, &mut receiver).await {
                Ok(Err(SessionError::Ended)) | Err(_) => Ok(()),
                Ok(r) => r,
            }
        }
        r = &mut receiver => r,
    }
}

/// Hands one packet to the request stream (waits while the stream's send
/// window is full).
async fn send_one(tx: &mut grpc::Sender, pkt: &Bytes) -> Result<(), SessionError> {
    tx.send(pkt).await?;
    Ok(())
}

/// Ships packets every 100 ms, at once when the ring passes its high-water
/// mark, when kicked, or when an acknowledgement made room. Order: what the
/// window holds unsent (re-sends after a reconnect first), then the spool,
/// then new ring batches, each stamped with its identity and kept in the
/// window until acknowledged (released at once against a center without
/// the extension). Ends with [`SessionError::Stalled`] when
/// acknowledgements stop advancing while packets wait.
async fn send_loop(agent: &Transport, mut tx: grpc::Sender) -> Result<(), SessionError> {
    let delivery = &agent.delivery;
    let mut tick = tokio::time::interval(SEND_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf: Vec<u8> = Vec::new();
    // Packet buffers come back once acknowledged (`recycle.rs`). It tracks
    // as much as the unacked window holds; an acknowledged buffer is taken
    // by the next packet before anything new is allocated, so the window
    // and the buffers waiting for reuse together stay within about the
    // window's bound, as before.
    let mut packets = recycle::Recycler::new(agent.cfg.unacked_bytes);
    // Wake-ups in a row that found the ring empty.
    let mut idle_wakes: u32 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = agent.buffer.high_water() => {}
            _ = agent.buffer.kicked() => {}
            _ = delivery.acked.notified() => {}
        }
        crate::log::drain_error_records(&agent.buffer);
        if delivery.poll() {
            delivery.publish();
            return Err(SessionError::Stalled);
        }
        if agent.link.release_memory.replace(false) {
            buf = Vec::new();
            packets.clear();
            tx.release_buffers();
            agent.buffer.release_idle_pages(1);
            crate::stack::trim_main_stack();
        }
        // A wake that built a packet is not idle, even if it emptied the ring.
        let mut built = false;
        loop {
            while let Some((id, pkt)) = delivery.next_to_send() {
                send_one(&mut tx, &pkt).await?;
                // by identity: an ack may have moved the window meanwhile
                delivery.sent(id);
            }
            if delivery.refill_from_spool() > 0 {
                continue;
            }
            if !delivery.can_take(batch_gate(agent.cfg.ring_bytes)) {
                break;
            }
            buf.clear();
            let meta = agent.meta.packet.borrow().clone();
            let Some((batch, n)) =
                agent
                    .buffer
                    .begin_packet(RING_SLOTS, MAX_BATCH_BYTES, &meta, &mut buf)
            else {
                // Empty for now. Under a flood the ring empties between
                // two plugin reads: the buffer stays (a fresh one would
                // grow, and fault its pages in, all over again) until the
                // ring stayed idle (below).
                break;
            };
            delivery::stamp(&mut buf, delivery.next_id());
            // Hand the buffer itself to the window (no copy); the next
            // batch starts a buffer of the same size, reused if one came back.
            let cap = buf.len();
            let next = packets.take(cap);
            let pkt = packets.hand_out(std::mem::replace(&mut buf, next));
            match delivery.push(pkt) {
                Ok(()) => {
                    // the window owns the packet now: the ring slots free
                    agent.buffer.commit(batch);
                    Counters::add(&agent.counters.tx_records, n as u64);
                    built = true;
                }
                Err(_) => {
                    agent.buffer.rollback(batch);
                    break;
                }
            }
        }
        delivery.publish();
        if agent.link.closing.get() && agent.buffer.is_empty() && delivery.is_empty() {
            tx.finish()?;
            return Ok(());
        }
        // After a burst, once the ring stayed empty for about a second, its
        // touched pages go back to the kernel and the send buffers are
        // dropped (RSS back to the idle level).
        if agent.buffer.is_empty() && !built {
            idle_wakes = idle_wakes.saturating_add(1);
            if idle_wakes == RELEASE_AFTER_IDLE_WAKES {
                let n = agent
                    .buffer
                    .release_idle_pages(crate::buffer::RELEASE_MIN_BYTES);
                if n > 0 {
                    tracing::debug!(bytes = n, "ring pages released after a burst");
                }
                buf = Vec::new();
                packets.clear();
                tx.release_buffers();
            }
        } else {
            idle_wakes = 0;
        }
    }
}

/// While no center is connected: when a spool is configured, moves ring
/// batches into it (stamped with their identity) so plugins keep being
/// read; when it is full, the ring fills and back-pressure applies as
/// before. Never returns.
async fn offline(agent: &Transport) {
    let mut tick = tokio::time::interval(SEND_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = agent.buffer.high_water() => {}
            _ = agent.buffer.kicked() => {}
        }
        crate::log::drain_error_records(&agent.buffer);
        spill(&agent.buffer, &agent.meta, &agent.delivery, &mut buf);
        agent.delivery.publish();
        if buf.capacity() > 64 * 1024 {
            buf = Vec::new();
        }
    }
}

/// Moves everything the ring holds into the spool while it has room;
/// returns records moved.
pub(crate) fn spill(
    buffer: &Buffer,
    meta: &HostMeta,
    delivery: &Delivery,
    buf: &mut Vec<u8>,
) -> usize {
    let mut moved = 0;
    if !delivery.has_spool() {
        return 0;
    }
    loop {
        if !delivery.spool_has_room(MAX_BATCH_BYTES) {
            break;
        }
        buf.clear();
        let m = meta.packet.borrow().clone();
        let Some((batch, n)) = buffer.begin_packet(RING_SLOTS, MAX_BATCH_BYTES, &m, buf) else {
            break;
        };
        delivery::stamp(buf, delivery.next_id());
        if delivery.spool_new(buf) {
            buffer.commit(batch);
            moved += n;
        } else {
            buffer.rollback(batch);
            break;
        }
    }
    moved
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
