//! The agent stream: `/grpc.Transfer/Transfer` (spec §5.2).
//!
//! 1. A slot is taken without waiting (`conn_limit`). When none is free the
//!    stream is refused with `RESOURCE_EXHAUSTED "out of max connection
//!    limit"` right after its first packet, unless that packet names an agent
//!    already registered, whose slot the new stream then takes over.
//! 2. The first `PackagedData` must come within `first_packet_timeout`
//!    (else `DEADLINE_EXCEEDED`, slot released) and name the agent (empty
//!    `agent_id` -> `INVALID_ARGUMENT`).
//! 3. The stream is registered (a previous stream of the same id is closed
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

/// The Transfer service.
#[derive(Debug)]
pub(crate) struct TransferSvc {
    pool: Arc<Pool>,
    ctx: Ctx,
    first_timeout: Duration,
}

impl TransferSvc {
    pub(crate) fn new(pool: Arc<Pool>, ctx: Ctx, first_timeout: Duration) -> Self {
        TransferSvc {
            pool,
            ctx,
            first_timeout,
        }
    }
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
        let slot = self.pool.try_slot();
        let addr = super::peer(req.remote_addr());
        let mut inbound = req.into_inner();
        let first = match tokio::time::timeout(self.first_timeout, inbound.message()).await {
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
        let agent_id = first.agent_id.clone();
        // No free slot: only a reconnect of a registered agent may proceed,
        // taking over the slot of the stream it replaces.
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
        tokio::spawn(receive(
            self.ctx.clone(),
            reg,
            first,
            inbound,
            end.clone(),
            pipeline,
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
    rx: mpsc::Receiver<Outgoing>,
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
    rx: mpsc::Receiver<Outgoing>,
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
