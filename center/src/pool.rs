//! The connection pool: one entry per live agent stream, keyed by agent id.
//!
//! - `conn_limit` slots (a semaphore) taken before any work on a stream.
//!   When none is free, a stream whose first packet names an agent that is
//!   already registered takes over that agent's slot (see
//!   [`Pool::take_over_slot`]), so a full center does not lock out
//!   reconnecting agents either.
//! - A newer stream with an already registered agent id wins: the old one is
//!   closed (its response stream ends with `ABORTED`), counted
//!   (`elkeid_center_agent_conflicts_total`) and logged. Elkeid refused the
//!   new one instead, locking reconnecting agents out behind half-open streams.
//! - Commands go through a bounded per-connection queue; [`Pool::post_command`]
//!   waits `send_timeout` to enqueue and `result_timeout` for the send.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use elkeid_proto::grpc::Command;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::CommandConfig;
use crate::metrics::{Metrics, inc};

/// Why a command was not delivered. The Display strings are Elkeid's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CommandError {
    /// No stream registered under that id.
    #[error("agentID not found")]
    NotFound,
    /// The per-connection queue stayed full for `send_timeout`.
    #[error("the sendPool of the agent is full")]
    Full,
    /// Queued, but not handed to the transport within `result_timeout`.
    #[error("the command has been sent but get results timed out")]
    ResultTimeout,
    /// Larger than a Go agent accepts (grpc-go's default 4 MiB receive limit).
    #[error("the command is {0} bytes, more than the 4 MiB an agent accepts")]
    TooLarge(usize),
    /// The stream ended before the command was sent.
    #[error("the agent connection closed before the command was sent")]
    Closed,
}

/// Largest Command sent: grpc-go's default receive limit, which Go agents keep.
pub(crate) const MAX_COMMAND_BYTES: usize = 4 * 1024 * 1024;

fn check_size(cmd: &Command) -> Result<(), CommandError> {
    use prost::Message;
    let n = cmd.encoded_len();
    if n > MAX_COMMAND_BYTES {
        return Err(CommandError::TooLarge(n));
    }
    Ok(())
}

/// A command waiting in a connection's queue.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) cmd: Command,
    /// Fired when the command was handed to the transport.
    pub(crate) done: Option<oneshot::Sender<()>>,
}

/// Per-agent plugin details (`name` -> 1001 detail).
pub(crate) type Plugins = BTreeMap<String, Map<String, Value>>;

/// One registered agent stream.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) agent_id: String,
    /// Peer `ip:port`.
    pub(crate) addr: String,
    /// Registration time, Unix seconds.
    pub(crate) create_at: i64,
    /// Unique per registration; tells an old stream from its replacement.
    pub(crate) generation: u64,
    tx: mpsc::Sender<Outgoing>,
    /// Cancelled when the stream must end (replaced, reset, shutdown).
    pub(crate) closed: CancellationToken,
    /// Last 1000 detail.
    pub(crate) detail: Mutex<Option<Map<String, Value>>>,
    /// 1001 details by plugin name.
    pub(crate) plugins: Mutex<Plugins>,
    first_heartbeat_seen: AtomicBool,
    /// The connection slot; moved to a replacing stream when none is free.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Conn {
    /// True exactly once: on the first heartbeat of this connection.
    pub(crate) fn take_first_heartbeat(&self) -> bool {
        !self.first_heartbeat_seen.swap(true, Ordering::AcqRel)
    }

    /// Queues a command without waiting for its delivery (config pushes).
    pub(crate) fn try_push(&self, cmd: Command) -> Result<(), CommandError> {
        check_size(&cmd)?;
        self.tx
            .try_send(Outgoing { cmd, done: None })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => CommandError::Full,
                mpsc::error::TrySendError::Closed(_) => CommandError::Closed,
            })
    }
}

/// Keeps a stream registered; unregisters and frees the slot on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    pool: Arc<Pool>,
    pub(crate) conn: Arc<Conn>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.pool.unregister(&self.conn);
        self.conn.closed.cancel();
        drop(
            self.conn
                .permit
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
}

/// All live agent streams.
#[derive(Debug)]
pub(crate) struct Pool {
    slots: Arc<Semaphore>,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
    next_generation: AtomicU64,
    commands: CommandConfig,
    metrics: Arc<Metrics>,
    /// Notified on every register/unregister (the cluster's etcd sync).
    pub(crate) changed: tokio::sync::Notify,
    /// Set by a drain (`POST /cluster/drain`): new streams are refused.
    draining: AtomicBool,
    /// Streams refused because the center is draining.
    pub(crate) refused_draining: AtomicU64,
}

impl Pool {
    /// A pool with `conn_limit` slots.
    pub(crate) fn new(
        conn_limit: usize,
        commands: CommandConfig,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            slots: Arc::new(Semaphore::new(conn_limit.min(Semaphore::MAX_PERMITS))),
            conns: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(1),
            commands,
            metrics,
            changed: tokio::sync::Notify::new(),
            draining: AtomicBool::new(false),
            refused_draining: AtomicU64::new(0),
        })
    }

    /// Starts draining: from now on new streams are refused. Returns
    /// false if the center was already draining.
    pub(crate) fn start_draining(&self) -> bool {
        !self.draining.swap(true, Ordering::AcqRel)
    }

    /// The center is draining (no new streams).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a connection slot without waiting; `None` when at `conn_limit`.
    pub(crate) fn try_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// With no free slot: takes the slot of the stream registered under
    /// `agent_id` (about to be replaced by the caller's stream), if any.
    pub(crate) fn take_over_slot(&self, agent_id: &str) -> Option<OwnedSemaphorePermit> {
        let conn = self.get(agent_id)?;
        conn.permit.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Registers a stream under `agent_id`, replacing (and closing) any
    /// previous stream with the same id.
    pub(crate) fn register(
        self: &Arc<Self>,
        agent_id: &str,
        addr: String,
        permit: OwnedSemaphorePermit,
    ) -> (Registration, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(self.commands.queue_len);
        let conn = Arc::new(Conn {
            agent_id: agent_id.to_string(),
            addr,
            create_at: crate::now_unix(),
            generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
            tx,
            closed: CancellationToken::new(),
            detail: Mutex::new(None),
            plugins: Mutex::new(BTreeMap::new()),
            first_heartbeat_seen: AtomicBool::new(false),
            permit: Mutex::new(Some(permit)),
        });
        let old = self.map().insert(agent_id.to_string(), conn.clone());
        inc(&self.metrics.streams_total);
        self.changed.notify_one();
        if let Some(old) = old {
            inc(&self.metrics.conflicts);
            tracing::warn!(
                agent_id,
                old_addr = %old.addr,
                new_addr = %conn.addr,
                "agent id already connected: the newer stream replaces the older one"
            );
            old.closed.cancel();
        }
        (
            Registration {
                pool: self.clone(),
                conn,
            },
            rx,
        )
    }

    fn unregister(&self, conn: &Arc<Conn>) {
        let mut map = self.map();
        if map
            .get(&conn.agent_id)
            .is_some_and(|c| c.generation == conn.generation)
        {
            map.remove(&conn.agent_id);
            self.changed.notify_one();
        }
    }

    /// The registered stream of `agent_id`.
    pub(crate) fn get(&self, agent_id: &str) -> Option<Arc<Conn>> {
        self.map().get(agent_id).cloned()
    }

    /// Number of registered streams.
    pub(crate) fn count(&self) -> usize {
        self.map().len()
    }

    /// Registered agent ids, sorted.
    pub(crate) fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map().keys().cloned().collect();
        v.sort_unstable();
        v
    }

    /// All registered connections, sorted by agent id.
    pub(crate) fn conns(&self) -> Vec<Arc<Conn>> {
        let mut v: Vec<Arc<Conn>> = self.map().values().cloned().collect();
        v.sort_unstable_by(|a, b| a.agent_id.cmp(&b.agent_id));
        v
    }

    /// Closes one agent's stream; false if not registered.
    pub(crate) fn close(&self, agent_id: &str) -> bool {
        match self.get(agent_id) {
            Some(c) => {
                c.closed.cancel();
                true
            }
            None => false,
        }
    }

    /// Closes every stream (shutdown, drain); returns how many.
    pub(crate) fn close_all(&self) -> usize {
        let map = self.map();
        for c in map.values() {
            c.closed.cancel();
        }
        map.len()
    }

    /// Sends a command to one agent as Elkeid's `PostCommand` does: enqueue
    /// within `send_timeout`, then wait `result_timeout` until it is sent.
    pub(crate) async fn post_command(
        &self,
        agent_id: &str,
        cmd: Command,
    ) -> Result<(), CommandError> {
        let res = self.post_command_inner(agent_id, cmd).await;
        if res.is_err() {
            inc(&self.metrics.failed_commands);
        }
        res
    }

    async fn post_command_inner(&self, agent_id: &str, cmd: Command) -> Result<(), CommandError> {
        check_size(&cmd)?;
        let conn = self.get(agent_id).ok_or(CommandError::NotFound)?;
        let (done, wait) = oneshot::channel();
        match tokio::time::timeout(
            self.commands.send_timeout,
            conn.tx.send(Outgoing {
                cmd,
                done: Some(done),
            }),
        )
        .await
        {
            Err(_) => return Err(CommandError::Full),
            Ok(Err(_)) => return Err(CommandError::Closed),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(self.commands.result_timeout, wait).await {
            Err(_) => Err(CommandError::ResultTimeout),
            Ok(Err(_)) => Err(CommandError::Closed),
            Ok(Ok(())) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(limit: usize, queue: usize) -> Arc<Pool> {
        Pool::new(
            limit,
            CommandConfig {
                queue_len: queue,
                send_timeout: Duration::from_secs(2),
                result_timeout: Duration::from_secs(2),
            },
            Arc::new(Metrics::default()),
        )
    }

    #[test]
    fn limit_is_enforced_and_released() {
        let p = pool(1, 4);
        let a = p.try_slot().unwrap();
        assert!(p.try_slot().is_none());
        drop(a);
        assert!(p.try_slot().is_some());
    }

    #[test]
    fn newer_stream_wins_and_old_unregister_is_harmless() {
        let p = pool(4, 4);
        let (old, _rx1) = p.register("a", "1.1.1.1:1".into(), p.try_slot().unwrap());
        let (new, _rx2) = p.register("a", "1.1.1.1:2".into(), p.try_slot().unwrap());
        assert!(old.conn.closed.is_cancelled());
        assert!(!new.conn.closed.is_cancelled());
        assert_eq!(p.metrics.conflicts.get(), 1);
        drop(old);
        assert_eq!(p.list(), vec!["a".to_string()]);
        assert_eq!(p.get("a").unwrap().addr, "1.1.1.1:2");
        drop(new);
        assert_eq!(p.count(), 0);
        // both slots are back
        let _x = p.try_slot().unwrap();
        let _y = p.try_slot().unwrap();
    }

    #[test]
    fn reconnect_takes_over_the_slot_when_full() {
        let p = pool(1, 4);
        let (old, _rx1) = p.register("a", "x:1".into(), p.try_slot().unwrap());
        assert!(p.try_slot().is_none());
        assert!(p.take_over_slot("b").is_none());
        let permit = p.take_over_slot("a").unwrap();
        assert!(p.take_over_slot("a").is_none(), "one slot, taken once");
        let (new, _rx2) = p.register("a", "x:2".into(), permit);
        assert!(old.conn.closed.is_cancelled());
        drop(old);
        assert!(p.try_slot().is_none(), "the new stream holds the only slot");
        drop(new);
        assert!(p.try_slot().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn command_errors() {
        let p = pool(4, 1);
        assert_eq!(
            p.post_command("x", Command::default()).await,
            Err(CommandError::NotFound)
        );
        let (_reg, mut rx) = p.register("a", "x".into(), p.try_slot().unwrap());
        // nobody takes it from the queue: result times out
        assert_eq!(
            p.post_command("a", Command::default()).await,
            Err(CommandError::ResultTimeout)
        );
        // the queue (len 1) is now full
        assert_eq!(
            p.post_command("a", Command::default()).await,
            Err(CommandError::Full)
        );
        // a consumer that acknowledges
        let out = rx.recv().await.unwrap();
        drop(out);
        let p2 = p.clone();
        let h = tokio::spawn(async move { p2.post_command("a", Command::default()).await });
        let out = rx.recv().await.unwrap();
        out.done.unwrap().send(()).unwrap();
        assert_eq!(h.await.unwrap(), Ok(()));
        assert_eq!(
            CommandError::Full.to_string(),
            "the sendPool of the agent is full"
        );
    }
}
