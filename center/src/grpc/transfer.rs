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

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use elkeid_proto::grpc::transfer_server::Transfer;
use elkeid_proto::grpc::{Command, PackagedData};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_util::sync::DropGuard;
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::inc;
use crate::pool::{Conn, Outgoing, Pool, Registration};
use crate::records::{Ctx, handle_packet};

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
        tokio::spawn(receive(self.ctx.clone(), reg, first, inbound, end.clone()));
        Ok(Response::new(commands(
            conn,
            self.pool.clone(),
            rx,
            end,
            self.ctx.metrics.clone(),
        )))
    }
}

async fn receive(
    ctx: Ctx,
    reg: Registration,
    first: PackagedData,
    mut inbound: Streaming<PackagedData>,
    end: Arc<Mutex<Option<Status>>>,
) {
    let conn = reg.conn.clone();
    handle_packet(&ctx, &conn, first).await;
    loop {
        tokio::select! {
            _ = conn.closed.cancelled() => break,
            msg = inbound.message() => match msg {
                Ok(Some(p)) => handle_packet(&ctx, &conn, p).await,
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

struct SendState {
    conn: Arc<Conn>,
    pool: Arc<Pool>,
    rx: mpsc::Receiver<Outgoing>,
    end: Arc<Mutex<Option<Status>>>,
    metrics: Arc<crate::metrics::Metrics>,
    finished: bool,
    // Cancels the connection when the response stream is dropped.
    _guard: DropGuard,
}

fn commands(
    conn: Arc<Conn>,
    pool: Arc<Pool>,
    rx: mpsc::Receiver<Outgoing>,
    end: Arc<Mutex<Option<Status>>>,
    metrics: Arc<crate::metrics::Metrics>,
) -> CommandStream {
    let guard = conn.closed.clone().drop_guard();
    let st = SendState {
        conn,
        pool,
        rx,
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
