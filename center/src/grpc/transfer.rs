//! The agent stream: `/grpc.Transfer/Transfer` (spec §5.2).
//!
//! 1. Until its first packet a stream is *unidentified* and holds one of a
//!    separate, smaller budget ([`unidentified_limit`]), never a pool slot.
//!    With that budget full, a new stream evicts the *oldest* unidentified
//!    one (ended with `RESOURCE_EXHAUSTED`, counted in
//!    `elkeid_center_conn_refused_unidentified_total`): a real agent sends
//!    its first packet milliseconds after opening the stream, so streams
//!    that never identify can neither lock agents out nor pile up.
//! 2. The first `PackagedData` must come within `first_packet_timeout`
//!    (else `DEADLINE_EXCEEDED`) and name the agent (empty `agent_id` ->
//!    `INVALID_ARGUMENT`). Its identity fields are capped
//!    ([`check_identity_fields`]; `INVALID_ARGUMENT`, counted). In
//!    `grpc.agent_identity = cert` mode its `agent_id` must be the client
//!    certificate's CN (`PERMISSION_DENIED`, counted).
//! 3. A pool slot is taken (`conn_limit`). When none is free the stream is
//!    refused with `RESOURCE_EXHAUSTED "out of max connection limit"`, unless
//!    its first packet names an agent already registered, whose slot the new
//!    stream then takes over.
//! 4. The stream is registered (a previous stream of the same id is closed
//!    with `ABORTED`); a receive task processes packets; the response stream
//!    carries the connection's queued commands. Either side ending ends both;
//!    a receive error (oversized or malformed message) is returned to the
//!    agent as the stream's status.
//! 4. Acknowledged delivery: when acknowledgements are on and the first
//!    packet carries an identity (`ack_epoch`, only elkeid-rs agents send
//!    one), an acknowledgement task follows the stream's packets in order:
//!    it waits until each is durable in every sink (or, for a re-send,
//!    until the original is), journals the durable point, then sends an
//!    ack-only `Command` (fields 2001/2002, no task, no configs). Right
//!    after the first packet it sends the durable point already known for
//!    that epoch (a "hello": the agent learns the center acknowledges, and
//!    drops what an earlier connection already delivered). A stream
//!    without identities never gets an ack-only Command: an Elkeid agent
//!    would take it as an empty config list.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elkeid_proto::grpc::transfer_server::Transfer;
use elkeid_proto::grpc::{Command, PackagedData};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::DropGuard;
use tonic::{Request, Response, Status, Streaming};

use crate::ack::{AckStore, PacketId};
use crate::identity::AgentIdentity;
use crate::metrics::inc;
use crate::pool::{Conn, Outgoing, Pool, Registration};
use crate::records::{Ctx, Pending, handle_packet};

/// Packets of one stream waiting for their acknowledgement.
const ACK_PIPELINE: usize = 4096;
/// Acknowledgements queued for the response stream.
const ACK_QUEUE: usize = 64;
/// How long a re-sent packet waits for its original to become durable
/// before the stream is closed (the agent then re-sends again).
const DUPLICATE_WAIT: Duration = Duration::from_secs(60);

/// Longest `agent_id` (Elkeid's are 36-character UUIDs).
pub(crate) const MAX_AGENT_ID: usize = 128;
/// Longest hostname (a DNS name is at most 253 bytes).
pub(crate) const MAX_HOSTNAME: usize = 255;
/// Longest `version` / `product`.
pub(crate) const MAX_VERSION: usize = 64;
/// Most addresses in each of the four IP lists.
pub(crate) const MAX_IPS: usize = 256;
/// Longest address text (an IPv6 address with zone is under 64).
pub(crate) const MAX_IP_LEN: usize = 64;

/// Streams that may wait for their first packet at once.
pub(crate) fn unidentified_limit(conn_limit: usize) -> usize {
    (conn_limit / 10).max(64)
}

/// Streams waiting for their first packet, oldest first; bounded, the
/// oldest evicted when full.
#[derive(Debug)]
pub(crate) struct Unidentified {
    limit: usize,
    queue: Mutex<(
        u64,
        std::collections::VecDeque<(u64, tokio_util::sync::CancellationToken)>,
    )>,
}

/// One waiting stream; leaves the queue on drop.
struct Waiting<'a> {
    owner: &'a Unidentified,
    id: u64,
    evicted: tokio_util::sync::CancellationToken,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut q = self.owner.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.1.retain(|(id, _)| *id != self.id);
    }
}

impl Unidentified {
    pub(crate) fn new(limit: usize) -> Self {
        Unidentified {
            limit: limit.max(1),
            queue: Mutex::new((0, std::collections::VecDeque::new())),
        }
    }

    /// Joins the queue; returns the entry and whether an older one was evicted.
    fn join(&self) -> (Waiting<'_>, bool) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let mut evicted = false;
        while q.1.len() >= self.limit {
            if let Some((_, token)) = q.1.pop_front() {
                token.cancel();
                evicted = true;
            }
        }
        q.0 += 1;
        let id = q.0;
        let token = tokio_util::sync::CancellationToken::new();
        q.1.push_back((id, token.clone()));
        (
            Waiting {
                owner: self,
                id,
                evicted: token,
            },
            evicted,
        )
    }
}

/// Checks the identity fields of a first packet against their caps.
pub(crate) fn check_identity_fields(p: &PackagedData) -> Result<(), String> {
    let len = |name: &str, v: &str, max: usize| {
        if v.len() > max {
            Err(format!("{name} is {} bytes, more than {max}", v.len()))
        } else {
            Ok(())
        }
    };
    len("agent_id", &p.agent_id, MAX_AGENT_ID)?;
    len("hostname", &p.hostname, MAX_HOSTNAME)?;
    len("version", &p.version, MAX_VERSION)?;
    len("product", &p.product, MAX_VERSION)?;
    for (name, list) in [
        ("intranet_ipv4", &p.intranet_ipv4),
        ("extranet_ipv4", &p.extranet_ipv4),
        ("intranet_ipv6", &p.intranet_ipv6),
        ("extranet_ipv6", &p.extranet_ipv6),
    ] {
        if list.len() > MAX_IPS {
            return Err(format!(
                "{name} has {} entries, more than {MAX_IPS}",
                list.len()
            ));
        }
        for ip in list {
            len(name, ip, MAX_IP_LEN)?;
        }
    }
    Ok(())
}

/// The Transfer service.
#[derive(Debug)]
pub(crate) struct TransferSvc {
    pool: Arc<Pool>,
    ctx: Ctx,
    first_timeout: Duration,
    identity: AgentIdentity,
    /// Streams that have not sent their first packet yet.
    unidentified: Unidentified,
}

impl TransferSvc {
    pub(crate) fn new(
        pool: Arc<Pool>,
        ctx: Ctx,
        first_timeout: Duration,
        identity: AgentIdentity,
        unidentified: usize,
    ) -> Self {
        TransferSvc {
            pool,
            ctx,
            first_timeout,
            identity,
            unidentified: Unidentified::new(unidentified),
        }
    }
}

/// The subject CN of the stream's verified client certificate.
fn cert_cn<T>(req: &Request<T>) -> Option<String> {
    let certs = req.peer_certs()?;
    crate::identity::subject_cn(certs.first()?.as_ref())
}

type CommandStream = Pin<Box<dyn Stream<Item = Result<Command, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Transfer for TransferSvc {
    type TransferStream = CommandStream;

    async fn transfer(
        &self,
        req: Request<Streaming<PackagedData>>,
    ) -> Result<Response<CommandStream>, Status> {
        let m = &self.ctx.metrics;
        let addr = super::peer(req.remote_addr());
        if self.pool.is_draining() {
            self.pool
                .refused_draining
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(peer = %addr, "stream refused: this center is draining");
            return Err(Status::unavailable(
                "this center is draining: connect to another center",
            ));
        }
        let (waiting, evicted) = self.unidentified.join();
        if evicted {
            inc(&m.refused_unidentified);
            tracing::warn!(peer = %addr, "too many streams waiting for their first packet: the oldest was closed");
        }
        let cn = match self.identity {
            AgentIdentity::Shared => None,
            AgentIdentity::Cert => match cert_cn(&req) {
                Some(cn) => Some(cn),
                None => {
                    inc(&m.identity_mismatches);
                    tracing::warn!(peer = %addr, "stream refused: no client certificate CN (agent_identity = cert)");
                    return Err(Status::permission_denied(
                        "the client certificate has no subject CN to bind the agent id to",
                    ));
                }
            },
        };
        let mut inbound = req.into_inner();
        let first = tokio::select! {
            r = tokio::time::timeout(self.first_timeout, inbound.message()) => r,
            _ = waiting.evicted.cancelled() => {
                return Err(Status::resource_exhausted(
                    "too many streams waiting for their first packet: closed as the oldest",
                ));
            }
        };
        let first = match first {
            Err(_) => {
                inc(&m.refused_first_timeout);
                tracing::info!(peer = %addr, "stream closed: no first packet in time");
                return Err(Status::deadline_exceeded(format!(
                    "no PackagedData within {} s of opening the stream",
                    self.first_timeout.as_secs()
                )));
            }
            Ok(Err(status)) => {
                tracing::info!(peer = %addr, %status, "stream failed before its first packet");
                return Err(status);
            }
            Ok(Ok(None)) => return Err(Status::cancelled("stream closed before its first packet")),
            Ok(Ok(Some(p))) => p,
        };
        if first.agent_id.is_empty() {
            inc(&m.refused_empty_id);
            tracing::warn!(peer = %addr, "stream refused: empty agent_id");
            return Err(Status::invalid_argument(
                "the first PackagedData has an empty agent_id",
            ));
        }
        if let Err(why) = check_identity_fields(&first) {
            inc(&m.refused_identity_fields);
            tracing::warn!(peer = %addr, %why, "stream refused: identity fields over their caps");
            return Err(Status::invalid_argument(format!(
                "first PackagedData refused: {why}"
            )));
        }
        let agent_id = first.agent_id.clone();
        if let Some(cn) = &cn
            && *cn != agent_id
        {
            inc(&m.identity_mismatches);
            tracing::warn!(peer = %addr, agent_id = %agent_id, certificate_cn = %cn, "stream refused: agent_id is not the one of the client certificate");
            return Err(Status::permission_denied(format!(
                "agent_id {agent_id:?} does not match the client certificate (CN {cn:?})"
            )));
        }
        drop(waiting);
        // No free slot: only a reconnect of a registered agent may proceed,
        // taking over the slot of the stream it replaces.
        let slot = self.pool.try_slot();
        let Some(permit) = slot.or_else(|| self.pool.take_over_slot(&agent_id)) else {
            inc(&m.refused_limit);
            tracing::warn!(agent_id = %agent_id, peer = %addr, "stream refused: out of max connection limit");
            return Err(Status::resource_exhausted("out of max connection limit"));
        };
        let (reg, rx) = self.pool.register(&agent_id, addr.clone(), permit);
        tracing::info!(agent_id = %agent_id, peer = %addr, "agent connected");
        self.ctx.manager.agent_connected(&agent_id);
        let end: Arc<Mutex<Option<Status>>> = Arc::new(Mutex::new(None));
        let conn = reg.conn.clone();
        let (pipeline, acks) = match &self.ctx.acks {
            Some(store) if first.ack_epoch != 0 => {
                let (ptx, prx) = mpsc::channel(ACK_PIPELINE);
                let (atx, arx) = mpsc::channel(ACK_QUEUE);
                // hello: the durable point already known for this epoch
                let hello = PacketId {
                    epoch: first.ack_epoch,
                    seq: store.durable(&agent_id, first.ack_epoch),
                };
                let _ = atx.try_send(hello);
                tokio::spawn(ack_loop(store.clone(), conn.clone(), prx, atx));
                (Some(ptx), Some(arx))
            }
            _ => (None, None),
        };
        let bound = self.identity == AgentIdentity::Cert;
        tokio::spawn(receive(
            self.ctx.clone(),
            reg,
            first,
            inbound,
            end.clone(),
            pipeline,
            bound,
        ));
        Ok(Response::new(commands(
            conn,
            self.pool.clone(),
            rx,
            acks,
            end,
            self.ctx.metrics.clone(),
            self.ctx.acks.clone(),
        )))
    }
}

async fn receive(
    ctx: Ctx,
    reg: Registration,
    first: PackagedData,
    mut inbound: Streaming<PackagedData>,
    end: Arc<Mutex<Option<Status>>>,
    pipeline: Option<mpsc::Sender<Pending>>,
    bound: bool,
) {
    let conn = reg.conn.clone();
    let track = |p: Option<Pending>| {
        let pipeline = pipeline.clone();
        async move {
            if let (Some(tx), Some(p)) = (pipeline, p) {
                // waits when acknowledgements lag: back-pressure
                let _ = tx.send(p).await;
            }
        }
    };
    track(handle_packet(&ctx, &conn, first).await).await;
    loop {
        tokio::select! {
            _ = conn.closed.cancelled() => break,
            msg = inbound.message() => match msg {
                // Bound identity: a packet may not speak for another agent.
                Ok(Some(p)) if bound && p.agent_id != conn.agent_id => {
                    inc(&ctx.metrics.identity_mismatches);
                    tracing::warn!(agent_id = %conn.agent_id, packet_agent_id = %p.agent_id.escape_debug(), "stream ended: packet for another agent_id");
                    *end.lock().unwrap_or_else(|e| e.into_inner()) = Some(Status::permission_denied(
                        "a packet's agent_id differs from the stream's registered agent_id",
                    ));
                    break;
                }
                Ok(Some(p)) => track(handle_packet(&ctx, &conn, p).await).await,
                Ok(None) => break,
                Err(status) => {
                    tracing::info!(agent_id = %conn.agent_id, %status, "agent stream receive error");
                    *end.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
                    break;
                }
            }
        }
    }
    tracing::info!(agent_id = %conn.agent_id, peer = %conn.addr, "agent disconnected");
    drop(reg);
}

/// Follows one stream's packets in order and sends cumulative
/// acknowledgements once they are durable and journaled (see the module
/// docs). A packet a sink could not make durable ends the stream: the agent
/// reconnects and re-sends everything unacknowledged.
async fn ack_loop(
    store: Arc<AckStore>,
    conn: Arc<Conn>,
    mut pending: mpsc::Receiver<Pending>,
    acks: mpsc::Sender<PacketId>,
) {
    let agent = conn.agent_id.clone();
    let mut group: Vec<Pending> = Vec::new();
    loop {
        group.clear();
        // Even after the stream closed, the packets it handed to the sinks
        // are followed to the end: their durability must be recorded, or a
        // re-send on the next stream would wait for it forever.
        match pending.recv().await {
            Some(p) => group.push(p),
            None => return,
        }
        while group.len() < ACK_PIPELINE
            && let Ok(p) = pending.try_recv()
        {
            group.push(p);
        }
        // Resolve in order; one ack per run of the same epoch.
        let mut out: Vec<PacketId> = Vec::new();
        for p in group.drain(..) {
            let id = match p {
                Pending::Stored(id, rx) => {
                    if rx.await != Ok(true) {
                        store
                            .metrics
                            .not_durable
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        store.rollback(&agent, id.epoch);
                        tracing::warn!(agent_id = %agent, epoch = id.epoch, seq = id.seq, "packet not durable in every sink: closing the stream so the agent re-sends");
                        conn.closed.cancel();
                        return;
                    }
                    store.mark_durable(&agent, id);
                    id
                }
                Pending::Refused(id) => {
                    store.mark_durable(&agent, id);
                    id
                }
                Pending::Duplicate(id) => {
                    let deadline = tokio::time::Instant::now() + DUPLICATE_WAIT;
                    while store.durable(&agent, id.epoch) < id.seq {
                        if tokio::time::Instant::now() >= deadline || conn.closed.is_cancelled() {
                            conn.closed.cancel();
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    id
                }
            };
            match out.last_mut() {
                Some(last) if last.epoch == id.epoch => last.seq = last.seq.max(id.seq),
                _ => out.push(id),
            }
        }
        let lines = out.iter().map(|id| (agent.clone(), *id)).collect();
        if let Err(error) = store.persist(lines).await {
            tracing::error!(agent_id = %agent, %error, "ack journal failed: no acknowledgements");
            conn.closed.cancel();
            return;
        }
        for id in out {
            // a closed stream takes no more acks; keep recording durability
            let _ = acks.try_send(id);
        }
    }
}

struct SendState {
    conn: Arc<Conn>,
    pool: Arc<Pool>,
    rx: mpsc::Receiver<Box<Outgoing>>,
    acks: Option<mpsc::Receiver<PacketId>>,
    store: Option<Arc<AckStore>>,
    end: Arc<Mutex<Option<Status>>>,
    metrics: Arc<crate::metrics::Metrics>,
    finished: bool,
    // Cancels the connection when the response stream is dropped.
    _guard: DropGuard,
}

async fn next_ack(acks: &mut Option<mpsc::Receiver<PacketId>>) -> Option<PacketId> {
    match acks {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn commands(
    conn: Arc<Conn>,
    pool: Arc<Pool>,
    rx: mpsc::Receiver<Box<Outgoing>>,
    acks: Option<mpsc::Receiver<PacketId>>,
    end: Arc<Mutex<Option<Status>>>,
    metrics: Arc<crate::metrics::Metrics>,
    store: Option<Arc<AckStore>>,
) -> CommandStream {
    let guard = conn.closed.clone().drop_guard();
    let st = SendState {
        conn,
        pool,
        rx,
        acks,
        store,
        end,
        metrics,
        finished: false,
        _guard: guard,
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        if st.finished {
            return None;
        }
        tokio::select! {
            biased;
            out = st.rx.recv() => match out {
                Some(o) => {
                    let o = *o;
                    inc(&st.metrics.sent_commands);
                    if let Some(done) = o.done {
                        let _ = done.send(());
                    }
                    Some((Ok(o.cmd), st))
                }
                None => None,
            },
            Some(id) = next_ack(&mut st.acks) => {
                if let Some(s) = &st.store {
                    s.metrics.acks_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // ack-only: no task, no configs (only to advertising agents)
                let cmd = Command { ack_epoch: id.epoch, ack_seq: id.seq, ..Default::default() };
                Some((Ok(cmd), st))
            }
            _ = st.conn.closed.cancelled() => {
                st.finished = true;
                let replaced = st.pool.get(&st.conn.agent_id).is_some_and(|c| c.generation != st.conn.generation);
                let end = st.end.lock().unwrap_or_else(|e| e.into_inner()).take();
                match (end, replaced) {
                    (Some(status), _) => Some((Err(status), st)),
                    (None, true) => Some((Err(Status::aborted("replaced by a newer stream with the same agent_id")), st)),
                    (None, false) => None,
                }
            }
        }
    }))
}
