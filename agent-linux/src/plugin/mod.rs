//! Plugin management: config sync, install, run, tasks, heartbeat samples.
//!
//! # Layout
//! - this file: [`PluginManager`] (the desired-set sync, task forwarding,
//!   1001 snapshots, shutdown), [`PluginContext`], 1010 reporting and the
//!   abnormal list for the 1000 heartbeat's `state`.
//! - `layout`: name validation and `<work-dir>/plugin/<name>/` paths.
//! - `extract`: hardened `tar.gz` extraction.
//! - `install`: reuse / download / extract into staging, then commit.
//! - `process`: spawning with the fd 0-5 layout, process-group kill.
//! - `reader`: record pipes -> ring (back-pressure), task frames -> fd 3.
//! - `stderr`: size-capped stderr capture.
//! - `supervisor`: one task per plugin, restart with backoff, stop.
//!
//! Config sync semantics: the list is the desired set. New names are
//! installed and started; a different `version` is downloaded and staged
//! first, then the old process is stopped and the new files committed (so
//! a failed download keeps the old version running); names no longer listed
//! are stopped and their directories deleted. An entry named `elkeid-agent`
//! is ignored here (self-update is `update.rs`). An **empty list keeps
//! every plugin** and logs a warning (Elkeid deletes them all, which one bad
//! manager answer turns into a fleet-wide outage); set
//! [`PluginContext::empty_config_removes_all`] for Elkeid's behaviour.

pub(crate) mod extract;
pub(crate) mod install;
pub(crate) mod layout;
pub(crate) mod process;
pub(crate) mod reader;
pub(crate) mod stderr;
pub(crate) mod supervisor;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;

use elkeid_core::frame::{TaskRef, encode_task_frame, task_frame_len};
use elkeid_core::payload::PayloadBuf;
use elkeid_proto::grpc::{Config, Task};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::buffer::Buffer;
use crate::command::{PluginOp, plan_sync};
use crate::fetch::{DownloadConfig, Downloader};
use layout::Paths;
use reader::Counters;
use supervisor::Plugin;

/// Tasks queued per plugin before `send_task` answers "busy".
pub(crate) const TASK_QUEUE: usize = 16;
/// Largest encoded Task frame forwarded to a plugin (Go SDK reads ≤ 1 MiB).
pub(crate) const MAX_TASK_FRAME: usize = 1024 * 1024;
/// Most abnormal messages kept for the heartbeat.
const MAX_ABNORMAL: usize = 32;
/// Data type of agent log records.
pub(crate) use elkeid_core::schema::data_type::AGENT_LOG as DT_AGENT_LOG;

/// What the plugin manager needs from the agent.
#[derive(Debug, Clone)]
pub(crate) struct PluginContext {
    /// `<work-dir>`; plugins live under `<work-dir>/plugin/<name>/`.
    pub(crate) work_dir: PathBuf,
    /// The shared record buffer.
    pub(crate) buffer: Rc<Buffer>,
    /// Largest record frame body accepted from a plugin.
    pub(crate) max_frame_len: u32,
    /// Size at which `<name>.stderr` is rotated.
    pub(crate) stderr_cap: u64,
    /// Download limits.
    pub(crate) download: DownloadConfig,
    /// Elkeid semantics for an empty config list: stop and delete all.
    pub(crate) empty_config_removes_all: bool,
}

impl PluginContext {
    /// Defaults: 4 MiB frames, 1 MiB stderr, 512 MiB / 15 s / 10 min
    /// downloads, empty list keeps plugins.
    pub(crate) fn new(work_dir: PathBuf, buffer: Rc<Buffer>) -> Self {
        PluginContext {
            work_dir,
            buffer,
            max_frame_len: elkeid_core::frame::DEFAULT_MAX_FRAME_LEN,
            stderr_cap: 1024 * 1024,
            download: DownloadConfig::default(),
            empty_config_removes_all: false,
        }
    }
}

/// Errors of the plugin manager.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PluginError {
    /// No plugin of that name is running.
    #[error("plugin {0} is not running")]
    NotRunning(String),
    /// The plugin's task queue is full.
    #[error("plugin {0} is processing tasks, try again later")]
    Busy(String),
    /// The task does not fit in a frame a plugin can read.
    #[error("task for plugin {0} is too large")]
    TaskTooLarge(String),
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

/// A plugin as `elkeid-agent status` shows it.
#[derive(Debug, Clone)]
pub(crate) struct PluginView {
    pub(crate) name: String,
    pub(crate) version: String,
    /// `None` while waiting to restart.
    pub(crate) pid: Option<u32>,
    pub(crate) start_time: i64,
    pub(crate) records_per_sec: f64,
}

/// State shared by the manager and the plugin tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) buffer: Rc<Buffer>,
    pub(crate) max_frame_len: u32,
    pub(crate) stderr_cap: u64,
    abnormal: RefCell<Vec<String>>,
}

impl Shared {
    /// Reports a plugin problem: a 1010 record (level=error), the abnormal
    /// list, and a local warning.
    pub(crate) fn report(&self, plugin: &str, version: &str, msg: &str) {
        tracing::warn!(plugin, pver = version, "{msg}");
        let mut p = PayloadBuf::new();
        p.field("level", "error")
            .field("source", "plugin")
            .field("msg", msg)
            .field("plugin", plugin)
            .field("pver", version);
        self.buffer
            .push_agent(DT_AGENT_LOG, crate::clock::now_unix(), p.as_bytes());
        let mut ab = self.abnormal.borrow_mut();
        if ab.len() >= MAX_ABNORMAL {
            ab.remove(0);
        }
        ab.push(msg.to_string());
    }
}

#[derive(Debug)]
struct Entry {
    plugin: Rc<Plugin>,
    task: JoinHandle<()>,
}

/// The set of plugins.
#[derive(Debug)]
pub(crate) struct PluginManager {
    ctx: PluginContext,
    shared: Rc<Shared>,
    downloader: Downloader,
    plugins: RefCell<BTreeMap<String, Entry>>,
    sync_lock: tokio::sync::Mutex<()>,
    shut_down: Cell<bool>,
}

impl PluginManager {
    pub(crate) fn new(ctx: PluginContext) -> Self {
        let shared = Rc::new(Shared {
            buffer: ctx.buffer.clone(),
            max_frame_len: ctx.max_frame_len,
            stderr_cap: ctx.stderr_cap,
            abnormal: RefCell::new(Vec::new()),
        });
        PluginManager {
            downloader: Downloader::new(ctx.download.clone()),
            ctx,
            shared,
            plugins: RefCell::new(BTreeMap::new()),
            sync_lock: tokio::sync::Mutex::new(()),
            shut_down: Cell::new(false),
        }
    }

    /// Problems since the last config sync ("load plugin X failed: ...",
    /// "plugin X exited with code N unexpectedly", ...): the heartbeat's
    /// `state` is `abnormal` when non-empty, `state_detail` their JSON list.
    pub(crate) fn abnormal(&self) -> Vec<String> {
        self.shared.abnormal.borrow().clone()
    }

    /// Names of the managed plugins (running or waiting to restart).
    pub(crate) fn names(&self) -> Vec<String> {
        self.plugins.borrow().keys().cloned().collect()
    }

    /// The config list is the desired set (see the module docs). Must run
    /// inside a `LocalSet`. Syncs are serialised.
    pub(crate) async fn sync(&self, configs: Vec<Config>) {
        let _guard = self.sync_lock.lock().await;
        if self.shut_down.get() {
            return;
        }
        self.shared.abnormal.borrow_mut().clear();
        let running: BTreeMap<String, String> = self
            .plugins
            .borrow()
            .iter()
            .map(|(k, e)| (k.clone(), e.plugin.version.clone()))
            .collect();
        let plan = plan_sync(configs, &running, self.ctx.empty_config_removes_all, |n| {
            layout::validate_name(n).map_err(|e| e.to_string())
        });
        if plan.kept_all {
            tracing::warn!(
                running = running.len(),
                "empty plugin config list: keeping the running plugins (set empty_config_removes_all for Elkeid's behaviour)"
            );
        }
        for op in plan.ops {
            match op {
                PluginOp::Reject { name, version, msg } => {
                    self.shared.report(&name, &version, &msg);
                }
                PluginOp::Remove(name) => self.remove(&name).await,
                PluginOp::Install(cfg) | PluginOp::Upgrade(cfg) => {
                    let name = cfg.name.clone();
                    if let Err(msg) = self.load(cfg).await {
                        let version = msg.1;
                        self.shared.report(
                            &name,
                            &version,
                            &format!("load plugin {name} failed: {}", msg.0),
                        );
                    }
                }
            }
        }
    }

    async fn load(&self, cfg: Config) -> Result<(), (String, String)> {
        let fail = |e: String| (e, cfg.version.clone());
        let paths = Paths::new(&self.ctx.work_dir, &cfg.name).map_err(|e| fail(e.to_string()))?;
        let p2 = paths.clone();
        tokio::task::spawn_blocking(move || p2.prepare())
            .await
            .map_err(|e| fail(e.to_string()))?
            .map_err(|e| fail(e.to_string()))?;
        let staged = install::stage(&self.downloader, &paths, &cfg)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if self.shut_down.get() {
            return Err(fail("the agent is shutting down".into()));
        }
        // Upgrade: the old version runs until the new files are ready.
        if let Some(old) = self.take(&cfg.name) {
            stop(old).await;
        }
        install::commit_async(&paths, staged)
            .await
            .map_err(|e| fail(e.to_string()))?;
        if self.shut_down.get() {
            return Err(fail("the agent is shutting down".into()));
        }
        self.start(cfg, paths);
        Ok(())
    }

    fn start(&self, cfg: Config, paths: Paths) {
        let (tx, rx) = mpsc::channel(TASK_QUEUE);
        let plugin = Rc::new(Plugin {
            name: cfg.name.clone(),
            version: cfg.version,
            detail: cfg.detail,
            paths,
            counters: Counters::default(),
            pid: Cell::new(None),
            start_time: Cell::new(0),
            last_sample: Cell::new(Instant::now()),
            tasks: tx,
            stopping: Cell::new(false),
            stop: Notify::new(),
        });
        let task = tokio::task::spawn_local(supervisor::supervise(
            self.shared.clone(),
            plugin.clone(),
            rx,
        ));
        self.plugins
            .borrow_mut()
            .insert(cfg.name, Entry { plugin, task });
    }

    fn take(&self, name: &str) -> Option<Entry> {
        self.plugins.borrow_mut().remove(name)
    }

    /// Stops `name` and deletes its directory.
    async fn remove(&self, name: &str) {
        let Some(e) = self.take(name) else { return };
        let paths = e.plugin.paths.clone();
        stop(e).await;
        let r = tokio::task::spawn_blocking(move || paths.remove()).await;
        if let Ok(Err(e)) | Err(e) = r.map_err(std::io::Error::other) {
            tracing::warn!(plugin = name, error = %e, "cannot delete plugin directory");
        }
        tracing::info!(plugin = name, "plugin removed");
    }

    /// Forwards a Task to plugin `task.object_name` as a Task frame on fd 3.
    pub(crate) fn send_task(&self, task: Task) -> Result<(), PluginError> {
        let plugins = self.plugins.borrow();
        let Some(e) = plugins
            .get(&task.object_name)
            .filter(|e| e.plugin.pid.get().is_some())
        else {
            return Err(PluginError::NotRunning(task.object_name));
        };
        let t = TaskRef {
            data_type: task.data_type,
            object_name: &task.object_name,
            data: &task.data,
            token: &task.token,
        };
        let len = task_frame_len(&t);
        if len > MAX_TASK_FRAME {
            return Err(PluginError::TaskTooLarge(task.object_name.clone()));
        }
        let mut frame = vec![0u8; len];
        let n = encode_task_frame(&t, &mut frame)
            .map_err(|_| PluginError::TaskTooLarge(task.object_name.clone()))?;
        frame.truncate(n);
        e.plugin
            .tasks
            .try_send(frame)
            .map_err(|_| PluginError::Busy(task.object_name.clone()))
    }

    /// For `status.json`: every managed plugin, counters left alone
    /// (records/s is the average since the last heartbeat sample).
    pub(crate) fn status(&self) -> Vec<PluginView> {
        let now = Instant::now();
        self.plugins
            .borrow()
            .values()
            .map(|e| {
                let p = &e.plugin;
                let secs = now.duration_since(p.last_sample.get()).as_secs_f64();
                let rx = p.counters.rx_cnt.get();
                PluginView {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    pid: p.pid.get(),
                    start_time: p.start_time.get(),
                    records_per_sec: if secs > 0.0 { rx as f64 / secs } else { 0.0 },
                }
            })
            .collect()
    }

    /// For 1001 heartbeats: one entry per running plugin; counters reset.
    pub(crate) fn snapshot(&self) -> Vec<PluginSnapshot> {
        let now = Instant::now();
        self.plugins
            .borrow()
            .values()
            .filter_map(|e| {
                let p = &e.plugin;
                let pid = p.pid.get()?;
                let (rx_cnt, rx_bytes, tx_cnt, tx_bytes) = p.counters.take();
                let elapsed_secs = now.duration_since(p.last_sample.replace(now)).as_secs_f64();
                Some(PluginSnapshot {
                    name: p.name.clone(),
                    version: p.version.clone(),
                    pid,
                    dir: p.paths.dir.clone(),
                    start_time: p.start_time.get(),
                    rx_cnt,
                    rx_bytes,
                    tx_cnt,
                    tx_bytes,
                    elapsed_secs,
                })
            })
            .collect()
    }

    /// Close pipes, wait 10 s, SIGKILL the process group; all plugins in
    /// parallel. Later syncs are ignored.
    pub(crate) async fn shutdown(&self) {
        // Not behind the sync lock: a sync may be in a 10-minute download.
        // It notices `shut_down` before starting anything.
        self.shut_down.set(true);
        let all: Vec<Entry> = std::mem::take(&mut *self.plugins.borrow_mut())
            .into_values()
            .collect();
        // Signal every plugin first so their grace periods run in parallel.
        for e in &all {
            e.plugin.stopping.set(true);
            e.plugin.stop.notify_one();
        }
        for e in all {
            stop(e).await;
        }
    }
}

/// Asks a plugin task to stop and waits for it.
async fn stop(e: Entry) {
    e.plugin.stopping.set(true);
    e.plugin.stop.notify_one();
    if let Err(err) = e.task.await {
        tracing::warn!(plugin = %e.plugin.name, error = %err, "plugin task failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use elkeid_core::ring::RingConfig;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// Installs `script` as plugin `name`'s executable and returns a config
    /// whose signature matches it (so sync reuses it: no download).
    fn preinstall(wd: &std::path::Path, name: &str, version: &str, script: &str) -> Config {
        let paths = Paths::new(wd, name).unwrap();
        paths.prepare().unwrap();
        let body = format!("#!/bin/sh\n{script}\n");
        // Replace (not rewrite) so a running old version is unaffected.
        let tmp = paths.dir.join(".new");
        std::fs::write(&tmp, &body).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::rename(&tmp, &paths.exe).unwrap();
        Config {
            name: name.into(),
            r#type: String::new(),
            version: version.into(),
            sha256: String::new(),
            signature: crate::fetch::hex(
                ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref(),
            ),
            download_urls: Vec::new(),
            detail: String::new(),
        }
    }

    fn manager(wd: &std::path::Path) -> PluginManager {
        PluginManager::new(PluginContext::new(
            wd.to_path_buf(),
            Buffer::new(RingConfig::default()),
        ))
    }

    /// Polls `f` every 10 ms; a bound only (plugins are real processes,
    /// slow to start on a loaded machine).
    async fn wait_until(mut f: impl FnMut() -> bool) {
        for _ in 0..3000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached in 30 s");
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false)
    }

    #[test]
    fn sync_tasks_snapshot_upgrade_remove() {
        let wd = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let m = manager(wd.path());
            // Exits at EOF on fd 3, after copying the task frames to a file.
            let a1 = preinstall(wd.path(), "a", "1", "exec cat <&3 > tasks.bin");
            m.sync(vec![a1.clone()]).await;
            wait_until(|| m.snapshot().len() == 1).await;
            let pid1 = m.snapshot()[0].pid;
            assert!(m.abnormal().is_empty());

            let task = Task {
                data_type: 42,
                object_name: "a".into(),
                data: "{\"x\":1}".into(),
                token: "tok".into(),
            };
            m.send_task(task.clone()).unwrap();
            let tasks = wd.path().join("plugin/a/tasks.bin");
            let t = TaskRef {
                data_type: 42,
                object_name: "a",
                data: "{\"x\":1}",
                token: "tok",
            };
            let len = task_frame_len(&t);
            wait_until(|| std::fs::metadata(&tasks).is_ok_and(|m| m.len() == len as u64)).await;
            let bytes = std::fs::read(&tasks).unwrap();
            let (got, n) = elkeid_core::frame::decode_task_frame(&bytes, 1 << 20)
                .unwrap()
                .unwrap();
            assert_eq!((got, n), (t, len));
            let s = m.snapshot();
            assert_eq!(
                (s[0].rx_cnt, s[0].rx_bytes, s[0].tx_cnt),
                (1, len as u64, 0)
            );
            assert_eq!(s[0].name, "a");
            assert_eq!(s[0].version, "1");
            assert_eq!(m.snapshot()[0].rx_cnt, 0, "counters reset by each sample");
            let other = Task {
                object_name: "nope".into(),
                ..task.clone()
            };
            assert!(matches!(
                m.send_task(other),
                Err(PluginError::NotRunning(_))
            ));

            // An empty list keeps everything (documented default).
            m.sync(Vec::new()).await;
            assert_eq!(m.snapshot()[0].pid, pid1);
            // Same version: untouched. New version: old stopped, new started.
            m.sync(vec![a1]).await;
            assert_eq!(m.snapshot()[0].pid, pid1);
            let a2 = preinstall(wd.path(), "a", "2", "exec cat <&3 > tasks2.bin");
            m.sync(vec![a2]).await;
            wait_until(|| m.snapshot().first().is_some_and(|s| s.pid != pid1)).await;
            assert_eq!(m.snapshot()[0].version, "2");
            assert!(!alive(pid1));
            // The stop was graceful (EOF on fd 3), so nothing was reported.
            assert!(m.abnormal().is_empty(), "{:?}", m.abnormal());
            let pid2 = m.snapshot()[0].pid;

            // Bad names are reported; a list without `a` removes it.
            let b = preinstall(wd.path(), "b", "1", "exec cat <&3 >/dev/null");
            let bad = Config {
                name: "../x".into(),
                ..b.clone()
            };
            m.sync(vec![b, bad]).await;
            assert!(!wd.path().join("plugin/a").exists());
            assert!(!alive(pid2));
            assert_eq!(m.names(), ["b"]);
            assert_eq!(m.abnormal().len(), 1);
            assert!(
                m.abnormal()[0].contains("load plugin \"../x\" failed"),
                "{:?}",
                m.abnormal()
            );
            let one_1010 = m.shared.buffer.len();
            assert!(one_1010 >= 1);
            m.shutdown().await;
            assert!(m.names().is_empty());
        });
    }

    /// Tasks still queued when their plugin dies are not delivered to the
    /// restarted process: each gets a failed 5100 result instead of
    /// vanishing (before: only the crash's 1010 record was left).
    #[test]
    fn tasks_queued_for_a_dying_plugin_get_failed_results() {
        let wd = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let m = manager(wd.path());
            // Never reads fd 3; dies after a second.
            let c = preinstall(wd.path(), "deaf", "1", "sleep 1\nexit 3");
            m.sync(vec![c]).await;
            wait_until(|| m.snapshot().len() == 1).await;
            // The first 200 KiB task fills the 64 KiB pipe; four stay queued.
            for i in 0..5 {
                m.send_task(Task {
                    data_type: 1,
                    object_name: "deaf".into(),
                    data: "x".repeat(200 * 1024),
                    token: format!("t{i}"),
                })
                .unwrap();
            }
            assert_eq!(m.shared.buffer.len(), 0);
            // The crash's 1010 plus one 5100 per queued task.
            wait_until(|| m.shared.buffer.len() >= 5).await;
            m.shutdown().await;
        });
    }

    /// A plugin that ignores EOF on fd 3 (and forked a helper) is SIGKILLed
    /// with its whole process group after the 10 s grace period.
    #[test]
    fn shutdown_kills_the_group_after_the_grace_period() {
        let wd = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&rt, async {
            let m = manager(wd.path());
            let c = preinstall(
                wd.path(),
                "stubborn",
                "1",
                "sleep 1000 &\necho $$ $! > pids\nwait",
            );
            m.sync(vec![c]).await;
            let pids_file = wd.path().join("plugin/stubborn/pids");
            let mut pids: Vec<u32> = Vec::new();
            // real time, up to 30 s (a bound for a loaded machine)
            for _ in 0..3000 {
                if let Ok(s) = std::fs::read_to_string(&pids_file)
                    && s.ends_with('\n')
                {
                    pids = s.split_whitespace().map(|p| p.parse().unwrap()).collect();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
                tokio::task::yield_now().await;
            }
            assert_eq!(pids.len(), 2, "plugin wrote its pids");
            let t0 = tokio::time::Instant::now();
            m.shutdown().await;
            assert!(
                t0.elapsed() >= supervisor::STOP_GRACE,
                "waited the grace period"
            );
            for _ in 0..1000 {
                if pids.iter().all(|p| !alive(*p)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            for p in pids {
                assert!(!alive(p), "pid {p} survived");
            }
        });
    }
}
