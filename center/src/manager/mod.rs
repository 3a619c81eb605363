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

/// Queue length of the task-result batcher; beyond it results are dropped
/// and counted (`elkeid_center_task_results_dropped_total`).
const TASK_QUEUE: usize = 16 * 1024;
/// Flush when this many are pending ...
const TASK_BATCH: usize = 100;
/// ... or this often.
const TASK_EVERY: Duration = Duration::from_secs(10);

/// Batches task results to the backend.
#[derive(Debug, Clone)]
pub(crate) struct TaskQueue {
    tx: mpsc::Sender<TaskItem>,
    metrics: Arc<Metrics>,
}

impl TaskQueue {
    /// Starts the batcher; it ends (after a final flush) when every
    /// `TaskQueue` clone is dropped. The handle resolves then.
    pub(crate) fn start(
        manager: Arc<dyn Manager>,
        metrics: Arc<Metrics>,
    ) -> (TaskQueue, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::channel::<TaskItem>(TASK_QUEUE);
        let m = metrics.clone();
        let handle = tokio::spawn(async move {
            let mut pending: Vec<TaskItem> = Vec::new();
            let mut tick = tokio::time::interval(TASK_EVERY);
            loop {
                let (closed, ticked) = tokio::select! {
                    item = rx.recv() => match item {
                        Some(item) => { pending.push(item); (false, false) }
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
                }
                if closed {
                    break;
                }
            }
        });
        (TaskQueue { tx, metrics }, handle)
    }

    /// Queues one result without waiting; counts a drop when full.
    pub(crate) fn push(&self, item: TaskItem) {
        if self.tx.try_send(item).is_err() {
            inc(&self.metrics.task_results_dropped);
            tracing::warn!("task result dropped: queue full");
        }
    }
}
