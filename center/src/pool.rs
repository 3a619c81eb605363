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
//!   waits `send_timeout` to enqueue and `result_timeout` for the send. A
//!   queued command holds its encoded bytes against two byte budgets, the
//!   agent's (`commands.queue_bytes`) and all agents' together
//!   (`commands.total_queue_bytes`), until it is handed to the transport; a
//!   command that would pass either is refused at once
//!   ([`CommandError::OverBudget`], counted in
//!   `elkeid_center_commands_refused_bytes_total`).
//! - Stored heartbeat details (the last 1000 and each plugin's last 1001)
//!   hold their estimated bytes against one budget shared by all
//!   connections (`grpc.detail_budget_bytes`); a detail that does not fit
//!   is not stored ([`Conn::store_detail`], [`Conn::store_plugin`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use elkeid_proto::grpc::Command;
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::budget::{ByteBudget, Reservation, map_cost};
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
    /// Queuing it would pass a command-queue byte budget (`all`: the budget
    /// of all agents together, else the agent's own).
    #[error(
        "the command ({bytes} bytes) does not fit the {} command queue byte budget: {queued} of {limit} bytes already queued",
        if *all { "all agents'" } else { "agent's" }
    )]
    OverBudget {
        /// Encoded size of the refused command.
        bytes: u64,
        /// Bytes queued in that budget.
        queued: u64,
        /// Its limit.
        limit: u64,
        /// The budget of all agents (true) or the agent's own (false).
        all: bool,
    },
}

/// Largest Command sent: grpc-go's default receive limit, which Go agents keep.
pub(crate) const MAX_COMMAND_BYTES: usize = 4 * 1024 * 1024;

/// The encoded size of `cmd`, checked against [`MAX_COMMAND_BYTES`].
fn check_size(cmd: &Command) -> Result<u64, CommandError> {
    use prost::Message;
    let n = cmd.encoded_len();
    if n > MAX_COMMAND_BYTES {
        return Err(CommandError::TooLarge(n));
    }
    Ok(n as u64)
}

/// A command waiting in a connection's queue.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) cmd: Command,
    /// Fired when the command was handed to the transport.
    pub(crate) done: Option<oneshot::Sender<()>>,
    /// Its bytes in the agent's and all agents' queue budgets; released
    /// when the command leaves the queue (sent or dropped).
    pub(crate) _held: QueueHold,
}

/// A queued command's reservations (the agent's, all agents').
#[derive(Debug)]
pub(crate) struct QueueHold {
    _agent: Reservation,
    _all: Reservation,
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
    /// Boxed: a bounded channel allocates its first block of 32 slots at
    /// once, 32 pointers instead of 32 `Outgoing`s (5.7 KiB) per agent.
    tx: mpsc::Sender<Box<Outgoing>>,
    /// Cancelled when the stream must end (replaced, reset, shutdown).
    pub(crate) closed: CancellationToken,
    /// Last 1000 detail.
    pub(crate) detail: Mutex<Option<Map<String, Value>>>,
    /// 1001 details by plugin name.
    pub(crate) plugins: Mutex<Plugins>,
    /// Bytes of `detail` and `plugins` in the budget of all connections.
    details_held: Mutex<Reservation>,
    /// This agent's command queue bytes.
    queue_budget: Arc<ByteBudget>,
    /// All agents' command queue bytes.
    all_queues: Arc<ByteBudget>,
    first_heartbeat_seen: AtomicBool,
    /// The connection slot; moved to a replacing stream when none is free.
    permit: Mutex<Option<OwnedSemaphorePermit>>,
}

impl Conn {
    /// True exactly once: on the first heartbeat of this connection.
    pub(crate) fn take_first_heartbeat(&self) -> bool {
        !self.first_heartbeat_seen.swap(true, Ordering::AcqRel)
    }

    /// Reserves `bytes` of queue budget for one command.
    fn hold(&self, bytes: u64) -> Result<QueueHold, CommandError> {
        let over = |b: &ByteBudget, all: bool| CommandError::OverBudget {
            bytes,
            queued: b.used(),
            limit: b.limit(),
            all,
        };
        let agent = self
            .queue_budget
            .try_reserve(bytes)
            .ok_or_else(|| over(&self.queue_budget, false))?;
        let all = self
            .all_queues
            .try_reserve(bytes)
            .ok_or_else(|| over(&self.all_queues, true))?;
        Ok(QueueHold {
            _agent: agent,
            _all: all,
        })
    }

    /// Replaces the stored 1000 detail if the detail budget covers its
    /// growth; false (the previous detail stays) when it does not.
    pub(crate) fn store_detail(&self, d: Map<String, Value>) -> bool {
        let new = map_cost(&d);
        let mut slot = self.detail.lock().unwrap_or_else(|e| e.into_inner());
        let old = slot.as_ref().map_or(0, map_cost);
        let mut held = self.details_held.lock().unwrap_or_else(|e| e.into_inner());
        let want = held.bytes().saturating_sub(old).saturating_add(new);
        if !held.resize(want) {
            return false;
        }
        *slot = Some(d);
        true
    }

    /// Stores plugin `name`'s 1001 detail (at most [`MAX_PLUGINS`] names per
    /// connection) if the detail budget covers it; false when not stored.
    pub(crate) fn store_plugin(&self, name: &str, d: Map<String, Value>) -> bool {
        let new = map_cost(&d) + name.len() as u64;
        let mut plugins = self.plugins.lock().unwrap_or_else(|e| e.into_inner());
        let old = match plugins.get(name) {
            Some(p) => map_cost(p) + name.len() as u64,
            None if plugins.len() >= MAX_PLUGINS => return false,
            None => 0,
        };
        let mut held = self.details_held.lock().unwrap_or_else(|e| e.into_inner());
        let want = held.bytes().saturating_sub(old).saturating_add(new);
        if !held.resize(want) {
            return false;
        }
        plugins.insert(name.to_string(), d);
        true
    }

    /// Notes a detail that was not stored; `Some(refusals since the last
    /// report)` when a log line is due (once per interval, all connections).
    pub(crate) fn detail_refused(&self) -> Option<u64> {
        self.details_held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .budget()
            .refused()
    }

    /// Queues a command without waiting for its delivery (config pushes).
    pub(crate) fn try_push(&self, cmd: Command) -> Result<(), CommandError> {
        let bytes = check_size(&cmd)?;
        let held = self.hold(bytes)?;
        self.tx
            .try_send(Box::new(Outgoing {
                cmd,
                done: None,
                _held: held,
            }))
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

/// Most plugin details kept per connection.
pub(crate) const MAX_PLUGINS: usize = 256;

/// All live agent streams.
#[derive(Debug)]
pub(crate) struct Pool {
    slots: Arc<Semaphore>,
    /// Stored heartbeat details of all connections.
    details: Arc<ByteBudget>,
    /// Queued commands of all connections.
    all_queues: Arc<ByteBudget>,
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
    /// A pool with `conn_limit` slots whose stored heartbeat details share
    /// `detail_budget` bytes.
    pub(crate) fn new(
        conn_limit: usize,
        commands: CommandConfig,
        detail_budget: u64,
        metrics: Arc<Metrics>,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            slots: Arc::new(Semaphore::new(conn_limit.min(Semaphore::MAX_PERMITS))),
            details: ByteBudget::new(detail_budget, Some(metrics.detail_bytes.clone())),
            all_queues: ByteBudget::new(
                commands.total_queue_bytes,
                Some(metrics.command_queue_bytes.clone()),
            ),
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
    ) -> (Registration, mpsc::Receiver<Box<Outgoing>>) {
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
            details_held: Mutex::new(self.details.empty()),
            queue_budget: ByteBudget::new(self.commands.queue_bytes, None),
            all_queues: self.all_queues.clone(),
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

    /// The budget of all connections' stored details.
    #[cfg(test)]
    pub(crate) fn detail_budget(&self) -> &ByteBudget {
        &self.details
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
        let bytes = check_size(&cmd)?;
        let conn = self.get(agent_id).ok_or(CommandError::NotFound)?;
        let held = conn.hold(bytes).inspect_err(|e| {
            inc(&self.metrics.commands_refused_bytes);
            tracing::warn!(agent_id, error = %e, "command refused: command queue byte budget");
        })?;
        let (done, wait) = oneshot::channel();
        match tokio::time::timeout(
            self.commands.send_timeout,
            conn.tx.send(Box::new(Outgoing {
                cmd,
                done: Some(done),
                _held: held,
            })),
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
                queue_bytes: 1 << 20,
                total_queue_bytes: 1 << 30,
            },
            1 << 20,
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

    fn task(data: usize) -> Command {
        Command {
            task: Some(elkeid_proto::grpc::Task {
                data: "x".repeat(data),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn queued_commands_are_bounded_in_bytes_per_agent_and_in_total() {
        let metrics = Arc::new(Metrics::default());
        let p = Pool::new(
            4,
            CommandConfig {
                queue_len: 1024,
                send_timeout: Duration::from_secs(2),
                result_timeout: Duration::from_millis(10),
                queue_bytes: 3000,
                total_queue_bytes: 3500,
            },
            1 << 20,
            metrics.clone(),
        );
        let (_a, mut rx_a) = p.register("a", "x".into(), p.try_slot().unwrap());
        let (_b, _rx_b) = p.register("b", "x".into(), p.try_slot().unwrap());
        // Nobody reads: each command stays queued (result timeout), holding its bytes.
        for _ in 0..2 {
            assert_eq!(
                p.post_command("a", task(1000)).await,
                Err(CommandError::ResultTimeout)
            );
        }
        let e = p.post_command("a", task(1000)).await.unwrap_err();
        assert!(
            matches!(
                e,
                CommandError::OverBudget {
                    all: false,
                    limit: 3000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            e.to_string().contains("agent's command queue byte budget"),
            "{e}"
        );
        // b has its own budget, but all queues together are capped at 3500.
        assert_eq!(
            p.post_command("b", task(1000)).await,
            Err(CommandError::ResultTimeout)
        );
        let e = p.post_command("b", task(1000)).await.unwrap_err();
        assert!(
            matches!(e, CommandError::OverBudget { all: true, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("all agents'"), "{e}");
        assert_eq!(metrics.commands_refused_bytes.get(), 2);
        assert!(metrics.command_queue_bytes.get() > 3000);
        // Sending releases: a's queue drains, a new command fits again.
        let sent = rx_a.recv().await.unwrap();
        drop(sent);
        let _ = rx_a.recv().await.unwrap();
        let conn = p.get("a").unwrap();
        assert!(conn.try_push(task(1000)).is_ok());
        // Config pushes are held to the same budget.
        assert!(matches!(
            conn.try_push(task(4000)),
            Err(CommandError::OverBudget { .. })
        ));
    }

    fn detail(pad: usize) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("pad".into(), Value::String("p".repeat(pad)));
        m
    }

    #[test]
    fn stored_details_share_one_budget_across_connections() {
        let metrics = Arc::new(Metrics::default());
        let p = Pool::new(
            8,
            CommandConfig {
                queue_len: 4,
                send_timeout: Duration::from_secs(2),
                result_timeout: Duration::from_secs(2),
                queue_bytes: 1 << 20,
                total_queue_bytes: 1 << 20,
            },
            10_000,
            metrics.clone(),
        );
        let (a, _ra) = p.register("a", "x".into(), p.try_slot().unwrap());
        let (b, _rb) = p.register("b", "x".into(), p.try_slot().unwrap());
        assert!(a.conn.store_detail(detail(4000)));
        assert!(a.conn.store_plugin("p1", detail(4000)));
        // b cannot store what would pass the budget shared with a.
        assert!(!b.conn.store_detail(detail(4000)));
        assert!(b.conn.detail.lock().unwrap().is_none());
        assert!(b.conn.store_detail(detail(1000)));
        // Replacing a detail accounts only its growth; a too-large one leaves the old.
        assert!(a.conn.store_detail(detail(3000)));
        assert!(!a.conn.store_plugin("p1", detail(9000)));
        assert_eq!(
            a.conn.plugins.lock().unwrap()["p1"]["pad"]
                .as_str()
                .unwrap()
                .len(),
            4000
        );
        let used = p.detail_budget().used();
        assert!(used <= 10_000, "{used}");
        assert_eq!(metrics.detail_bytes.get(), i64::try_from(used).unwrap());
        // A connection that ends gives its bytes back.
        drop(a);
        assert!(p.detail_budget().used() < 2000);
        assert!(b.conn.store_plugin("p2", detail(6000)));
        drop(b);
        assert_eq!(p.detail_budget().used(), 0);
        assert_eq!(metrics.detail_bytes.get(), 0);
    }

    #[test]
    fn plugin_names_per_connection_are_capped() {
        let p = pool(2, 2);
        let (a, _r) = p.register("a", "x".into(), p.try_slot().unwrap());
        for i in 0..MAX_PLUGINS {
            assert!(a.conn.store_plugin(&format!("p{i}"), detail(1)));
        }
        assert!(!a.conn.store_plugin("one-more", detail(1)));
        assert!(
            a.conn.store_plugin("p0", detail(2)),
            "known names still update"
        );
    }
}
