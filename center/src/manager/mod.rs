//! Where component configs come from and where task results go.
//!
//! # Layout
//! - this file: the [`Manager`] trait, [`Component`] (one config entry as the
//!   manager and the HTTP API spell it), [`TaskItem`], and [`TaskQueue`], the
//!   batcher that hands task results to the backend every 10 s or 100 items.
//! - `local.rs`: component file in the data dir, results to a local file.
//! - `elkeid.rs`: the HTTP calls of an Elkeid manager (spec §5.4).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::budget::{ByteBudget, Reservation, map_cost};
use crate::metrics::{Metrics, inc};

pub(crate) mod elkeid;
pub(crate) mod local;

/// A boxed future (keeps [`Manager`] dyn-compatible).
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a manager call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ManagerError {
    /// Local file I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The manager could not be reached or timed out (after the retries).
    #[error("manager unreachable: {0}")]
    Unreachable(String),
    /// The manager answered, but not with success.
    #[error("manager refused: {0}")]
    Refused(String),
}

/// One component config (plugin or agent version) as the manager's JSON and
/// `POST /command/` spell it; converted to the wire `Config`.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub(crate) struct Component {
    pub(crate) name: String,
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) version: String,
    pub(crate) sha256: String,
    pub(crate) signature: String,
    pub(crate) download_url: Vec<String>,
    pub(crate) detail: String,
}

impl From<Component> for elkeid_proto::grpc::Config {
    fn from(c: Component) -> Self {
        elkeid_proto::grpc::Config {
            name: c.name,
            r#type: c.kind,
            version: c.version,
            sha256: c.sha256,
            signature: c.signature,
            download_urls: c.download_url,
            detail: c.detail,
        }
    }
}

/// One task result (data types 2001, 2003, 6000, 5100, 5101, 8010): the
/// record's fields plus `"data_type": "<n>"`, all strings.
#[derive(Debug, Clone)]
pub(crate) struct TaskItem {
    pub(crate) agent_id: String,
    pub(crate) fields: Map<String, Value>,
}

/// A manager backend.
pub(crate) trait Manager: Send + Sync + 'static {
    /// Components for an agent, given its 1000 detail. An empty list means
    /// "nothing to push" (an empty Command would wipe the agent's plugins).
    fn configs<'a>(
        &'a self,
        agent_id: &'a str,
        detail: &'a Map<String, Value>,
    ) -> BoxFuture<'a, Result<Vec<Component>, ManagerError>>;
    /// Takes one batch of task results.
    fn push_task_results<'a>(
        &'a self,
        items: &'a [TaskItem],
    ) -> BoxFuture<'a, Result<(), ManagerError>>;
    /// A new stream was registered (Elkeid: extra-info lookup).
    fn agent_connected(&self, _agent_id: &str) {}
    /// Periodic full refresh of the extra info of every connected agent
    /// (Elkeid: every 240 s + up to 30 s); the new answer replaces the cache.
    fn refresh<'a>(&'a self, _agent_ids: &'a [String]) -> BoxFuture<'a, ()> {
        Box::pin(std::future::ready(()))
    }
    /// `tag` for the agent's records (Elkeid extra info), else empty.
    fn tag(&self, _agent_id: &str) -> String {
        String::new()
    }
}

/// Queue length of the task-result batcher; beyond it, or beyond its byte
/// budget (`manager.task_queue_bytes`, counting the results queued and
/// those in the batch being handed to the backend), results are dropped,
/// counted (`elkeid_center_task_results_dropped_total`) and logged once a
/// minute.
const TASK_QUEUE: usize = 16 * 1024;
/// Flush when this many are pending ...
const TASK_BATCH: usize = 100;
/// ... or this often.
const TASK_EVERY: Duration = Duration::from_secs(10);

/// Batches task results to the backend.
#[derive(Debug, Clone)]
pub(crate) struct TaskQueue {
    tx: mpsc::Sender<(TaskItem, Reservation)>,
    budget: Arc<ByteBudget>,
    metrics: Arc<Metrics>,
}

/// Estimated bytes a queued result holds (texts, map entries, the item).
fn item_cost(item: &TaskItem) -> u64 {
    item.agent_id.len() as u64 + map_cost(&item.fields) + 64
}

impl TaskQueue {
    /// Starts the batcher; it ends (after a final flush) when every
    /// `TaskQueue` clone is dropped. The handle resolves then.
    pub(crate) fn start(
        manager: Arc<dyn Manager>,
        metrics: Arc<Metrics>,
        budget_bytes: u64,
    ) -> (TaskQueue, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<(TaskItem, Reservation)>(TASK_QUEUE);
        let m = metrics.clone();
        let budget = ByteBudget::new(budget_bytes, Some(metrics.task_queue_bytes.clone()));
        let handle = tokio::spawn(async move {
            let mut pending: Vec<TaskItem> = Vec::new();
            // The pending results' bytes stay held until the backend took them.
            let mut held: Vec<Reservation> = Vec::new();
            let mut tick = tokio::time::interval(TASK_EVERY);
            loop {
                let (closed, ticked) = tokio::select! {
                    item = rx.recv() => match item {
                        Some((item, r)) => { pending.push(item); held.push(r); (false, false) }
                        None => (true, false),
                    },
                    _ = tick.tick() => (false, true),
                };
                let due = closed || ticked || pending.len() >= TASK_BATCH;
                if due && !pending.is_empty() {
                    if let Err(error) = manager.push_task_results(&pending).await {
                        m.task_results_failed.inc_by(pending.len() as u64);
                        tracing::error!(%error, items = pending.len(), "task results not taken by the manager backend");
                    }
                    pending.clear();
                    held.clear();
                }
                if closed {
                    break;
                }
            }
        });
        (
            TaskQueue {
                tx,
                budget,
                metrics,
            },
            handle,
        )
    }

    /// Queues one result without waiting; counts a drop when the queue is
    /// full or over its byte budget (logged at most once a minute).
    pub(crate) fn push(&self, item: TaskItem) {
        let why = match self.budget.try_reserve(item_cost(&item)) {
            None => "over its byte budget (manager.task_queue_bytes)",
            Some(r) => match self.tx.try_send((item, r)) {
                Ok(()) => return,
                Err(_) => "queue full",
            },
        };
        inc(&self.metrics.task_results_dropped);
        if let Some(n) = self.budget.refused() {
            tracing::warn!(
                dropped = n,
                reason = why,
                "task results dropped: the manager backend does not keep up"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that never answers (a hung Elkeid manager).
    struct Hung;

    impl Manager for Hung {
        fn configs<'a>(
            &'a self,
            _agent_id: &'a str,
            _detail: &'a Map<String, Value>,
        ) -> BoxFuture<'a, Result<Vec<Component>, ManagerError>> {
            Box::pin(std::future::pending())
        }
        fn push_task_results<'a>(
            &'a self,
            _items: &'a [TaskItem],
        ) -> BoxFuture<'a, Result<(), ManagerError>> {
            Box::pin(std::future::pending())
        }
    }

    fn item(pad: usize) -> TaskItem {
        let mut fields = Map::new();
        fields.insert("msg".into(), Value::String("m".repeat(pad)));
        TaskItem {
            agent_id: "a".into(),
            fields,
        }
    }

    #[tokio::test]
    async fn task_results_are_bounded_in_bytes_while_the_backend_hangs() {
        let metrics = Arc::new(Metrics::default());
        let (q, _h) = TaskQueue::start(Arc::new(Hung), metrics.clone(), 100_000);
        // 1000 results of ~10 KB: ~10 MB offered, at most 100 kB held.
        for _ in 0..1000 {
            q.push(item(10_000));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = metrics.task_queue_bytes.get();
        assert!(held <= 100_000, "{held}");
        assert!(held > 80_000, "{held}");
        let dropped = metrics.task_results_dropped.get();
        assert!((985..1000).contains(&dropped), "{dropped}");
        // Small results still fit beside them until the budget is used up.
        assert!(q.budget.used() <= q.budget.limit());
    }

    #[tokio::test]
    async fn taken_results_release_their_bytes() {
        let metrics = Arc::new(Metrics::default());
        let dir = tempfile::tempdir().unwrap();
        let manager = local::LocalManager::start(
            dir.path().join("components.json"),
            dir.path().join("results.ndjson"),
        );
        let (q, h) = TaskQueue::start(manager, metrics.clone(), 100_000);
        for _ in 0..5 {
            q.push(item(1000));
        }
        assert!(metrics.task_queue_bytes.get() > 5000);
        drop(q);
        h.await.unwrap();
        assert_eq!(metrics.task_queue_bytes.get(), 0);
        assert_eq!(metrics.task_results_dropped.get(), 0);
        let lines = std::fs::read_to_string(dir.path().join("results.ndjson")).unwrap();
        assert_eq!(lines.lines().count(), 5);
    }
}
