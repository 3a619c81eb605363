//! Plugin management (owned by agent-plugins; this is a placeholder with the
//! agreed interface so the crate builds until the real module lands).

use std::path::PathBuf;
use std::rc::Rc;

use crate::buffer::Buffer;

/// What the plugin manager needs from the agent.
#[derive(Debug, Clone)]
pub(crate) struct PluginContext {
    /// `<work-dir>`; plugins live under `<work-dir>/plugin/<name>/`.
    pub(crate) work_dir: PathBuf,
    /// The shared record buffer.
    pub(crate) buffer: Rc<Buffer>,
}

/// Errors of the plugin manager.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PluginError {
    /// No plugin of that name is running.
    #[error("plugin {0} is not running")]
    NotRunning(String),
}

/// One running plugin, for 1001 heartbeats.
#[derive(Debug, Clone)]
pub(crate) struct PluginSnapshot {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) pid: u32,
    pub(crate) dir: PathBuf,
    pub(crate) start_time: i64,
    pub(crate) rx_cnt: u64,
    pub(crate) rx_bytes: u64,
    pub(crate) tx_cnt: u64,
    pub(crate) tx_bytes: u64,
    pub(crate) elapsed_secs: f64,
}

/// The set of running plugins.
#[derive(Debug)]
pub(crate) struct PluginManager {
    #[allow(dead_code)]
    ctx: PluginContext,
}

impl PluginManager {
    pub(crate) fn new(ctx: PluginContext) -> Self {
        PluginManager { ctx }
    }
    pub(crate) async fn sync(&self, configs: Vec<elkeid_proto::grpc::Config>) {
        tracing::warn!(n = configs.len(), "plugin support not built yet");
    }
    pub(crate) fn send_task(&self, task: elkeid_proto::grpc::Task) -> Result<(), PluginError> {
        Err(PluginError::NotRunning(task.object_name))
    }
    pub(crate) fn snapshot(&self) -> Vec<PluginSnapshot> {
        Vec::new()
    }
    pub(crate) async fn shutdown(&self) {}
}
