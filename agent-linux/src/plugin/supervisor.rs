//! One task per plugin: start, pump pipes, restart with backoff, stop.
//!
//! Unlike Elkeid (which leaves a crashed plugin dead until the next config
//! push), an unexpected exit or a broken frame is reported (1010 record +
//! abnormal state) and the plugin is restarted after an exponential backoff:
//! 1 s, 2 s, 4 s ... capped at 5 min, back to 1 s once a run lasted 60 s.
//!
//! Stop (config removal, upgrade, agent shutdown): the task pipe is closed
//! (EOF on fd 3) while records keep being read; after 10 s the process group
//! is SIGKILLed. Records still in the pipes are drained for up to
//! [`DRAIN_AFTER_EXIT`] after the exit.

use std::cell::Cell;
use std::pin::pin;
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::OptionFuture;
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::layout::Paths;
use super::reader::{Counters, ReadError, read_records, write_tasks};
use super::{Shared, process, stderr};

/// First restart delay.
pub(crate) const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A run at least this long resets the delay.
pub(crate) const BACKOFF_STABLE: Duration = Duration::from_secs(60);
/// Grace period between closing the pipes and SIGKILL.
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long records are drained from the pipes after the plugin exited.
pub(crate) const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(5);

/// Restart delays.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            next: BACKOFF_INITIAL,
        }
    }

    /// Delay before the next start, given how long the last run lasted.
    pub(crate) fn next(&mut self, uptime: Duration) -> Duration {
        if uptime >= BACKOFF_STABLE {
            self.next = BACKOFF_INITIAL;
        }
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        d
    }
}

/// A plugin as the manager and its task share it.
#[derive(Debug)]
pub(crate) struct Plugin {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) detail: String,
    pub(crate) paths: Paths,
    pub(crate) counters: Counters,
    /// Pid while a process runs.
    pub(crate) pid: Cell<Option<u32>>,
    /// Unix seconds of the current process start.
    pub(crate) start_time: Cell<i64>,
    /// When counters were last sampled (or the process started).
    pub(crate) last_sample: Cell<Instant>,
    /// Encoded Task frames for fd 3.
    pub(crate) tasks: mpsc::Sender<Vec<u8>>,
    pub(crate) stopping: Cell<bool>,
    pub(crate) stop: Notify,
}

/// How one run ended.
enum End {
    /// Asked to stop; done.
    Stopped,
    /// Something to report; restart after the backoff.
    Failed(String),
}

/// Runs `p` until it is stopped.
pub(crate) async fn supervise(sh: Rc<Shared>, p: Rc<Plugin>, mut queue: mpsc::Receiver<Vec<u8>>) {
    let mut backoff = Backoff::new();
    loop {
        if p.stopping.get() {
            return;
        }
        let started = Instant::now();
        let end = run_once(&sh, &p, &mut queue).await;
        p.pid.set(None);
        // Tasks queued for the dead process are not delivered to the next
        // one: each gets a failed 5100 result (never a silent discard).
        while let Ok(frame) = queue.try_recv() {
            let token = match elkeid_core::frame::decode_task_frame(&frame, u32::MAX) {
                Ok(Some((t, _))) => t.token.to_string(),
                _ => String::new(),
            };
            crate::buffer::task_failed(
                &sh.buffer,
                &token,
                &format!(
                    "plugin {} stopped before the task was delivered; not delivered to its restart",
                    p.name
                ),
            );
        }
        match end {
            End::Stopped => return,
            End::Failed(msg) => sh.report(&p.name, &p.version, &msg),
        }
        let delay = backoff.next(started.elapsed());
        tracing::info!(plugin = %p.name, delay_ms = delay.as_millis() as u64, "restarting plugin after backoff");
        crate::status::plugin_restarted(&p.name);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = p.stop.notified() => return,
        }
    }
}

async fn run_once(sh: &Shared, p: &Plugin, queue: &mut mpsc::Receiver<Vec<u8>>) -> End {
    let sp = match process::spawn(&p.paths, &p.detail) {
        Ok(sp) => sp,
        Err(e) => return End::Failed(format!("plugin {} failed to start: {e}", p.name)),
    };
    let process::Spawned {
        mut child,
        pid,
        tasks,
        records,
        high,
        stderr,
    } = sp;
    tokio::task::spawn_local(stderr::drain(stderr, p.paths.clone(), sh.stderr_cap));
    p.pid.set(Some(pid));
    p.start_time.set(crate::clock::now_unix());
    p.last_sample.set(Instant::now());
    p.counters.take();
    tracing::info!(plugin = %p.name, version = %p.version, pid, "plugin started");

    let mut reader = pin!(read_records(
        records,
        high,
        &sh.buffer,
        sh.max_frame_len,
        &p.counters
    ));
    let mut reader_done = false;
    let mut writer = Some(Box::pin(write_tasks(tasks, queue, &p.counters)));

    enum Why {
        Stop,
        Exit(std::io::Result<std::process::ExitStatus>),
        Broken(ReadError),
    }
    let why = loop {
        tokio::select! {
            biased;
            () = p.stop.notified() => break Why::Stop,
            st = child.wait() => break Why::Exit(st),
            r = &mut reader, if !reader_done => match r {
                Ok(()) => reader_done = true,
                Err(ReadError::Io(e)) => {
                    tracing::warn!(plugin = %p.name, error = %e, "plugin record pipe failed");
                    reader_done = true;
                }
                Err(e) => break Why::Broken(e),
            },
            Some(r) = OptionFuture::from(writer.as_mut()), if writer.is_some() => {
                if let Err(e) = r {
                    tracing::debug!(plugin = %p.name, error = %e, "task pipe closed");
                }
                writer = None;
            }
        }
    };
    match why {
        Why::Stop => {
            // Close fd 3's writer: the plugin sees EOF. Keep reading records.
            drop(writer);
            let graceful = tokio::time::timeout(STOP_GRACE, async {
                loop {
                    tokio::select! {
                        st = child.wait() => return st.ok(),
                        r = &mut reader, if !reader_done => {
                            reader_done = true;
                            if let Err(e) = r {
                                tracing::warn!(plugin = %p.name, error = %e, "record pipe error while stopping");
                                return None;
                            }
                        }
                    }
                }
            })
            .await;
            process::kill_group(pid);
            if !matches!(graceful, Ok(Some(_))) {
                tracing::warn!(plugin = %p.name, pid, "plugin did not exit in time; killed its process group");
                let _ = child.wait().await;
            }
            if !reader_done {
                match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut reader).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(plugin = %p.name, error = %e, "record pipe error while draining a stopped plugin");
                    }
                    Err(_) => {
                        tracing::warn!(plugin = %p.name, "records left unread in the pipes of a stopped plugin are discarded");
                    }
                }
            }
            tracing::info!(plugin = %p.name, pid, "plugin stopped");
            End::Stopped
        }
        Why::Exit(st) => {
            drop(writer);
            // Leftover members of the group would keep the pipes open.
            process::kill_group(pid);
            let mut broken = None;
            if !reader_done {
                match tokio::time::timeout(DRAIN_AFTER_EXIT, &mut reader).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e @ (ReadError::Frame { .. } | ReadError::TooBigForRing(_)))) => {
                        broken = Some(e);
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(plugin = %p.name, error = %e, "record pipe error while draining an exited plugin");
                    }
                    Err(_) => {
                        tracing::warn!(plugin = %p.name, "records left unread in the pipes of an exited plugin are discarded");
                    }
                }
            }
            let how = match &st {
                Ok(st) => match (st.code(), std::os::unix::process::ExitStatusExt::signal(st)) {
                    (Some(c), _) => format!("code {c}"),
                    (None, Some(s)) => format!("code -1 (signal {s})"),
                    (None, None) => "code -1".to_string(),
                },
                Err(e) => format!("unknown status ({e})"),
            };
            let mut msg = format!("plugin {} exited with {how} unexpectedly", p.name);
            if let Some(e) = broken {
                msg.push_str(&format!("; it also sent a {e}"));
            }
            End::Failed(msg)
        }
        Why::Broken(e) => {
            drop(writer);
            process::kill_group(pid);
            let _ = child.wait().await;
            End::Failed(format!("plugin {} killed and restarted: {e}", p.name))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_schedule() {
        let mut b = Backoff::new();
        let short = Duration::from_secs(1);
        let got: Vec<u64> = (0..12).map(|_| b.next(short).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        // A stable run resets the schedule.
        assert_eq!(b.next(BACKOFF_STABLE).as_secs(), 1);
        assert_eq!(b.next(short).as_secs(), 2);
    }

    /// The waits really take the scheduled time on the (paused) clock.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn backoff_sleeps_on_paused_clock() {
        let mut b = Backoff::new();
        let t0 = Instant::now();
        let mut at = Vec::new();
        for _ in 0..5 {
            tokio::time::sleep(b.next(Duration::ZERO)).await;
            at.push(t0.elapsed().as_secs());
        }
        assert_eq!(at, [1, 3, 7, 15, 31]);
    }
}
