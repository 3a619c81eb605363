//! The top of the agent: builds the parts, owns them, wires them together,
//! and executes the actions [`crate::command::plan`] returns. Nothing below
//! imports this module; each part gets only what it uses:
//!
//! | part | owns | module |
//! |---|---|---|
//! | `Counters` | bytes, records sent, commands, reconnects, net_mode | `counters` (written by the transport) |
//! | `HostMeta` | id, host facts, hostname/IPs, idc/region, packet metadata | `meta` (refreshed by the heartbeat, 1051 sets idc/region) |
//! | `Link` | the live connection, closing, release_memory | `transport` |
//! | `Delivery` | unacknowledged window, disk spool | `transport::delivery` (heartbeat reads a published snapshot) |
//! | `Heartbeat` | previous samples, the agent's `state_detail` entries | `heartbeat` |
//! | `AgentTasks` | the upload-running flag | `tasks` |
//! | `StopSignal` | why the agent stops | `stop` |

use std::rc::Rc;
use std::sync::Arc;

use elkeid_proto::grpc::Command;

use crate::buffer::Buffer;
use crate::command::Action;
use crate::config::Config;
use crate::counters::Counters;
use crate::heartbeat::Heartbeat;
use crate::meta::HostMeta;
use crate::plugin::PluginManager;
use crate::stop::{Exit, StopSignal};
use crate::tasks::AgentTasks;
use crate::transport::delivery::Delivery;
use crate::transport::{Link, Transport};

/// Every part of a running agent.
#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) cfg: Rc<Config>,
    pub(crate) buffer: Rc<Buffer>,
    pub(crate) plugins: Rc<PluginManager>,
    pub(crate) counters: Rc<Counters>,
    pub(crate) meta: Rc<HostMeta>,
    pub(crate) link: Rc<Link>,
    /// Unacknowledged window and disk spool (owned by the transport).
    pub(crate) delivery: Rc<Delivery>,
    pub(crate) heartbeat: Rc<Heartbeat>,
    pub(crate) tasks: Rc<AgentTasks>,
    pub(crate) stop: Rc<StopSignal>,
    /// Self-update trial / rollback report.
    pub(crate) update: Rc<crate::rollback::Watch>,
}

impl Agent {
    pub(crate) fn new(
        cfg: Config,
        id: String,
        buffer: Rc<Buffer>,
        plugins: Rc<PluginManager>,
        update: Rc<crate::rollback::Watch>,
    ) -> Rc<Agent> {
        let cfg = Rc::new(cfg);
        let meta = Rc::new(HostMeta::new(id, cfg.idc.clone(), cfg.region.clone()));
        let counters = Rc::new(Counters::default());
        let link = Rc::new(Link::default());
        let delivery = Rc::new(Delivery::new(
            cfg.unacked_bytes,
            cfg.failover,
            &cfg.spool_dir(),
            cfg.spool_max_bytes,
            cfg.spool_full,
        ));
        let stop = Rc::new(StopSignal::new());
        let heartbeat = Rc::new(Heartbeat::new(
            cfg.clone(),
            meta.clone(),
            counters.clone(),
            buffer.clone(),
            plugins.clone(),
        ));
        let tasks = Rc::new(AgentTasks {
            cfg: cfg.clone(),
            meta: meta.clone(),
            buffer: buffer.clone(),
            link: link.clone(),
            stop: stop.clone(),
            upload_busy: std::cell::Cell::new(false),
        });
        Rc::new(Agent {
            cfg,
            buffer,
            plugins,
            counters,
            meta,
            link,
            delivery,
            heartbeat,
            tasks,
            stop,
            update,
        })
    }

    /// The transport's view.
    pub(crate) fn transport(&self) -> Rc<Transport> {
        Rc::new(Transport {
            cfg: self.cfg.clone(),
            buffer: self.buffer.clone(),
            counters: self.counters.clone(),
            meta: self.meta.clone(),
            heartbeat: self.heartbeat.clone(),
            link: self.link.clone(),
            delivery: self.delivery.clone(),
            update: self.update.clone(),
        })
    }

    /// Handles one received command: plan, then execute in order.
    pub(crate) fn on_command(self: &Rc<Self>, cmd: Command) {
        for action in crate::command::plan(cmd) {
            self.execute(action);
        }
    }

    /// Executes one action of a received command.
    fn execute(self: &Rc<Self>, action: Action) {
        match action {
            Action::RunAgentTask(task) => crate::tasks::handle(&self.tasks, task),
            Action::DeliverTask(task) => {
                let token = task.token.clone();
                let name = task.object_name.clone();
                if let Err(error) = self.plugins.send_task(task) {
                    tracing::warn!(plugin = %name, %error, "task not delivered");
                    crate::tasks::task_failed(&self.buffer, &token, &error.to_string());
                }
            }
            Action::ClearAbnormal => self.heartbeat.clear_abnormal(),
            Action::SelfUpdate(cfg) => {
                let a = self.clone();
                tokio::task::spawn_local(async move {
                    let ctx = crate::update::UpdateContext {
                        work_dir: a.cfg.work_dir.clone(),
                        probe_args: Some(std::env::args_os().skip(1).collect()),
                        rollback_bound: a.cfg.update_rollback,
                        max_starts: a.cfg.update_max_starts,
                    };
                    match crate::update::self_update(&ctx, &cfg).await {
                        Ok(crate::update::UpdateOutcome::Replaced(path)) => {
                            tracing::info!(version = %cfg.version, "self-update installed, restarting");
                            a.stop.stop(Exit::Reexec(path));
                        }
                        Err(error) => {
                            tracing::error!(version = %cfg.version, %error, "agent update failed");
                            a.heartbeat
                                .set_abnormal(format!("agent update failed: {error}"));
                        }
                    }
                });
            }
            Action::SyncPlugins(plugins) => {
                let a = self.clone();
                tokio::task::spawn_local(async move {
                    a.plugins.sync(plugins).await;
                });
            }
        }
    }

    /// Logs the internal state (SIGUSR1).
    pub(crate) fn dump(&self, debug_on: bool) {
        let plugins = self.plugins.names();
        let c = &self.counters;
        tracing::info!(
            debug_logging = debug_on,
            agent_id = %self.meta.id,
            net_mode = c.net_mode.get(),
            connected = self.link.channel.borrow().is_some(),
            ring_len = self.buffer.len(),
            ring_bytes = self.buffer.bytes(),
            drop_cnt = self.buffer.drops(),
            log_drops = crate::log::pending_drops(),
            log_lines_dropped = crate::log::lines_dropped(),
            tx_records = c.tx_records.get(),
            rx_commands = c.rx_commands.get(),
            reconnects = c.reconnects.get(),
            upload_busy = self.tasks.upload_busy.get(),
            abnormal = ?self.heartbeat.abnormal(),
            plugins = ?plugins,
            "state dump"
        );
    }

    /// Starts the signal, heartbeat and transport tasks.
    pub(crate) fn spawn(
        self: &Rc<Self>,
        tls: Arc<rustls::ClientConfig>,
    ) -> (
        Vec<tokio::task::JoinHandle<()>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (a1, a2) = (self.clone(), self.clone());
        let tasks = vec![
            tokio::task::spawn_local(crate::signals::run(
                self.stop.clone(),
                move |debug_on| a1.dump(debug_on),
                move || a2.link.release_memory.set(true),
            )),
            tokio::task::spawn_local(crate::heartbeat::run(self.heartbeat.clone())),
            tokio::task::spawn_local({
                let a = self.clone();
                crate::status::run(self.cfg.work_dir.clone(), move |t0| a.status(t0))
            }),
        ];
        let a = self.clone();
        let on_command: crate::transport::OnCommand = Rc::new(move |cmd| a.on_command(cmd));
        let transport =
            tokio::task::spawn_local(crate::transport::run(self.transport(), tls, on_command));
        (tasks, transport)
    }

    /// The agent's state for `status.json` (`started_at`: when the
    /// status writer started).
    fn status(&self, started_at: i64) -> crate::status::Status {
        use crate::status::{PluginStatus, Ring, SpoolStatus, Status};
        let state = if self.link.closing.get() {
            "stopping"
        } else {
            "running"
        };
        let (connection, restarts) = crate::status::board(self.counters.reconnects.get());
        let plugins = self
            .plugins
            .status()
            .into_iter()
            .map(|p| PluginStatus {
                restarts: restarts.get(&p.name).copied().unwrap_or(0),
                name: p.name,
                version: p.version,
                pid: p.pid,
                started_at: p.start_time,
                records_per_sec: p.records_per_sec,
            })
            .collect();
        let mut abnormal = self.heartbeat.abnormal();
        abnormal.extend(self.plugins.abnormal());
        Status {
            pid: std::process::id(),
            agent_id: self.meta.id.clone(),
            version: crate::config::VERSION.to_string(),
            state: state.to_string(),
            started_at,
            updated_at: crate::clock::now_unix(),
            connection,
            plugins,
            ring: Ring {
                len: self.buffer.len() as u64,
                capacity: crate::buffer::RING_SLOTS as u64,
                bytes: self.buffer.bytes() as u64,
                capacity_bytes: self.cfg.ring_bytes as u64,
                drops: self.buffer.drops(),
            },
            abnormal,
            spool: {
                let d = self.delivery.stats();
                SpoolStatus {
                    entries: d.spool.entries,
                    bytes: d.spool.bytes,
                    full_policy: d.spool_full.to_string(),
                    dropped_packets: d.spool_dropped_packets,
                    dropped_records: d.spool_dropped_records,
                }
            },
        }
    }
}
