//! Starting a plugin process with the Elkeid pipe layout (wire spec §4.3).
//!
//! Child file descriptors: 0 and 1 `/dev/null`; 2 the write end of a pipe the
//! agent drains into the size-capped `<name>.stderr` (see `stderr`); 3 the
//! read end of the task pipe; 4 the write end of the record pipe; 5 the write
//! end of the high-priority record pipe, announced by
//! `ELKEID_PLUGIN_HIGH_PRIORITY_PIPE=1`. Nothing else: every descriptor the
//! agent opens is close-on-exec (std and tokio open everything `O_CLOEXEC`),
//! and the three pipe ends are moved to 3/4/5 in the child by [`map_fds`].
//! The child's pipe ends stay blocking (plugins use plain blocking reads);
//! the agent's ends are non-blocking and registered with tokio.
//!
//! The child runs in its own process group (`process_group(0)`), cwd = the
//! plugin directory, no arguments. Environment: when `detail` is non-empty it
//! is exactly `DETAIL=<detail>` plus the high-priority variable (Elkeid's
//! rule); otherwise the agent's environment is inherited, plus `PWD` and the
//! high-priority variable.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::net::unix::pipe;
use tokio::process::{Child, Command};

use super::layout::Paths;

/// Environment variable telling SDKs that fd 5 is the high-priority pipe.
pub(crate) const HIGH_PRIORITY_ENV: &str = "ELKEID_PLUGIN_HIGH_PRIORITY_PIPE";

/// Highest descriptor number scanned for leaks in the child.
const MAX_FD_SCAN: libc::rlim_t = 65_536;

/// Pipe size requested for the record pipes (throughput; best effort).
const RECORD_PIPE_SIZE: i32 = 1024 * 1024;

/// A started plugin and the agent's ends of its pipes.
#[derive(Debug)]
pub(crate) struct Spawned {
    /// The process (leader of its own process group).
    pub(crate) child: Child,
    /// Its pid (= process group id).
    pub(crate) pid: u32,
    /// Agent end of the task pipe (child fd 3).
    pub(crate) tasks: pipe::Sender,
    /// Agent end of the record pipe (child fd 4).
    pub(crate) records: pipe::Receiver,
    /// Agent end of the high-priority record pipe (child fd 5).
    pub(crate) high: pipe::Receiver,
    /// Agent end of the stderr pipe (child fd 2).
    pub(crate) stderr: pipe::Receiver,
}

/// Starts `<dir>/<name>` with the pipe layout above. Call it from the
/// runtime thread: the parent-death signal follows the thread that forked,
/// and blocking-pool threads come and go.
pub(crate) fn spawn(paths: &Paths, detail: &str) -> io::Result<Spawned> {
    let (task_r, task_w) = std::io::pipe()?;
    let (rec_r, rec_w) = std::io::pipe()?;
    let (high_r, high_w) = std::io::pipe()?;
    let (err_r, err_w) = std::io::pipe()?;
    let task_r = OwnedFd::from(task_r);
    let rec_w = OwnedFd::from(rec_w);
    let high_w = OwnedFd::from(high_w);
    let rec_r = OwnedFd::from(rec_r);
    let high_r = OwnedFd::from(high_r);
    for fd in [&rec_r, &high_r] {
        // Bigger pipes mean fewer wake-ups under load; failure is harmless.
        let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETPIPE_SZ(RECORD_PIPE_SIZE));
    }

    let mut cmd = Command::new(&paths.exe);
    cmd.current_dir(&paths.dir)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(OwnedFd::from(err_w)));
    if detail.is_empty() {
        cmd.env("PWD", &paths.dir);
    } else {
        cmd.env_clear().env("DETAIL", detail);
    }
    cmd.env(HIGH_PRIORITY_ENV, "1");
    map_fds(
        &mut cmd,
        [task_r.as_raw_fd(), rec_w.as_raw_fd(), high_w.as_raw_fd()],
    );
    // ETXTBSY: another thread forked while the executable was open for
    // writing (tests, or a concurrent install); it clears within moments.
    let mut attempts = 0;
    let child = loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempts < 5 => {
                attempts += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r?,
        }
    };
    // The child has its copies now; closing ours makes EOF/EPIPE work.
    drop((task_r, rec_w, high_w));
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("plugin exited before its pid was read"))?;
    Ok(Spawned {
        child,
        pid,
        tasks: pipe::Sender::from_owned_fd(OwnedFd::from(task_w))?,
        records: pipe::Receiver::from_owned_fd(rec_r)?,
        high: pipe::Receiver::from_owned_fd(high_r)?,
        stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(err_r))?,
    })
}

/// Makes `src[0]`, `src[1]`, `src[2]` the child's fds 3, 4, 5.
///
/// Two steps, so that a source that already sits on 3, 4 or 5 is neither
/// clobbered by an earlier `dup2` nor left close-on-exec (`dup2(fd, fd)` is a
/// no-op that keeps the flag): first copy every source above 9 (the copies
/// are close-on-exec and vanish at exec), then `dup2` the copies onto 3/4/5,
/// which clears close-on-exec on the targets only. Then the child asks for
/// SIGKILL when the agent dies, and finally any other descriptor without
/// close-on-exec is closed.
#[allow(unsafe_code)]
fn map_fds(cmd: &mut Command, src: [RawFd; 3]) {
    let parent = std::process::id() as libc::pid_t;
    let child_side = move || -> io::Result<()> {
        let mut high = [0 as RawFd; 3];
        for (slot, fd) in high.iter_mut().zip(src) {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor that is open in
            // the child (inherited from the parent, which keeps it open until
            // spawn returns); async-signal-safe, no allocation.
            let r = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            *slot = r;
        }
        for (target, fd) in (3..).zip(high) {
            // SAFETY: dup2 between two descriptors valid in the child;
            // async-signal-safe, no allocation.
            if unsafe { libc::dup2(fd, target) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // If the agent dies (SIGKILL, OOM), the plugin dies with it instead
        // of lingering as an orphan that a restarted agent would duplicate.
        // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid are plain syscalls,
        // async-signal-safe.
        unsafe {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // The agent may have died before the prctl took effect.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        // Descriptors the agent itself inherited without close-on-exec
        // (from whatever started it) must not reach the plugin: close every
        // such descriptor above 5. Close-on-exec ones (including std's
        // exec-error pipe) are left to exec.
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the local struct; async-signal-safe.
        let max = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur.min(MAX_FD_SCAN)
        } else {
            MAX_FD_SCAN
        };
        for fd in 6..max as RawFd {
            // SAFETY: F_GETFD/close on a descriptor number; an unused number
            // just fails with EBADF. Both are async-signal-safe.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                    libc::close(fd);
                }
            }
        }
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec and only
    // calls fcntl, dup2, prctl, getppid, getrlimit, close and reads errno
    // (all async-signal-safe); it takes no locks and does not allocate
    // (`[RawFd; 3]` and the pid are captured by copy).
    unsafe {
        cmd.pre_exec(child_side);
    }
}

/// SIGKILLs the whole process group `pgid` (already gone is fine).
pub(crate) fn kill_group(pgid: u32) {
    let Ok(raw) = i32::try_from(pgid) else { return };
    if raw <= 1 {
        return;
    }
    match killpg(Pid::from_raw(raw), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, error = %e, "killpg failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncReadExt;

    fn script(body: &str) -> (tempfile::TempDir, Paths) {
        let wd = tempfile::tempdir().unwrap();
        let paths = Paths::new(wd.path(), "probe").unwrap();
        paths.prepare().unwrap();
        std::fs::write(&paths.exe, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&paths.exe, std::fs::Permissions::from_mode(0o700)).unwrap();
        (wd, paths)
    }

    async fn read_all(mut r: pipe::Receiver) -> String {
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        s
    }

    /// The real child sees exactly fds 0-5 with the documented targets.
    #[tokio::test(flavor = "current_thread")]
    async fn fd_layout_of_a_real_child() {
        // `ls` also lists the directory it opened to read /proc/self/fd
        // (a descriptor >= 6 pointing into /proc) and its stdout (the
        // redirect into fds.txt); everything else is what the plugin got.
        // Output goes through files: shell redirections of the plugin's own
        // fds would make the shell keep saved copies.
        let (_wd, paths) = script(
            "echo \"pgid=$(cut -d' ' -f5 /proc/$$/stat) pid=$$ cwd=$(pwd) hp=$ELKEID_PLUGIN_HIGH_PRIORITY_PIPE detail=$DETAIL path=${PATH:-unset}\" > info.txt\n\
             ls -l /proc/self/fd > fds.txt",
        );
        // A descriptor the agent inherited without close-on-exec must not
        // reach the plugin either.
        let leaked = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        )
        .unwrap();
        let mut sp = spawn(&paths, "").unwrap();
        sp.child.wait().await.unwrap();
        drop(leaked);
        let out = std::fs::read_to_string(paths.dir.join("fds.txt")).unwrap();
        let info = std::fs::read_to_string(paths.dir.join("info.txt")).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        let fds: Vec<(&str, &str)> = lines
            .iter()
            .filter_map(|l| l.split_once(" -> "))
            .map(|(a, t)| (a.rsplit(' ').next().unwrap(), t))
            .filter(|(_, t)| !t.starts_with("/proc/"))
            .collect();
        let nums: Vec<&str> = fds.iter().map(|(a, _)| *a).collect();
        assert_eq!(nums, ["0", "1", "2", "3", "4", "5"], "{out}");
        assert!(fds[1].1.ends_with("fds.txt"), "{out}");
        assert_eq!(fds[0].1, "/dev/null");
        for (_, t) in &fds[2..] {
            assert!(t.starts_with("pipe:["), "{out}");
        }
        // 3, 4 and 5 are three distinct pipes, and fd 2 a fourth.
        let mut ids: Vec<&str> = fds[2..].iter().map(|(_, t)| *t).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), 4, "{out}");
        assert!(
            info.contains(&format!("pgid={} pid={}", sp.pid, sp.pid)),
            "{info}"
        );
        assert!(
            info.contains(&format!("cwd={}", paths.dir.display())),
            "{info}"
        );
        assert!(info.contains("hp=1 detail= path="), "{info}");
        assert!(!info.contains("path=unset"), "{info}");
    }

    /// Non-empty detail: the environment is exactly DETAIL (+ the pipe flag).
    #[tokio::test(flavor = "current_thread")]
    async fn detail_replaces_the_environment() {
        let (_wd, paths) = script("env >&2");
        let mut sp = spawn(&paths, "{\"k\":1}").unwrap();
        let out = read_all(sp.stderr).await;
        sp.child.wait().await.unwrap();
        let mut vars: Vec<&str> = out
            .lines()
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        vars.sort_unstable();
        assert_eq!(
            vars,
            ["DETAIL={\"k\":1}", "ELKEID_PLUGIN_HIGH_PRIORITY_PIPE=1"],
            "{out}"
        );
    }

    /// Pipes carry data both ways, and EOF on fd 3 reaches the child.
    #[tokio::test(flavor = "current_thread")]
    async fn pipes_work_and_group_kill() {
        use tokio::io::AsyncWriteExt;
        let (_wd, paths) = script("cat <&3 >&4; echo hi >&5; sleep 30 & wait");
        let mut sp = spawn(&paths, "").unwrap();
        sp.tasks.write_all(b"task-bytes").await.unwrap();
        drop(sp.tasks);
        let mut got = vec![0u8; 10];
        sp.records.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"task-bytes");
        let mut hi = [0u8; 3];
        sp.high.read_exact(&mut hi).await.unwrap();
        assert_eq!(&hi, b"hi\n");
        kill_group(sp.pid);
        let st = sp.child.wait().await.unwrap();
        assert!(!st.success());
        // The backgrounded sleep was in the group too: its end of fd 4 closes.
        let mut rest = Vec::new();
        sp.records.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}
