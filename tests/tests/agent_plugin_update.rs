//! Self-update end to end: an `elkeid-agent` config entry with another
//! version makes a real agent download a new build over HTTP, verify it,
//! rename it over its own executable (keeping `<exe>.old`), shut down
//! gracefully, re-exec, reconnect, and delete `<exe>.old`. A wrong sha256
//! is refused and reported, leaving the binary untouched; so is a new
//! binary that cannot connect to a center (`--probe-connect`).
//!
//! Rollback: the test plays the service manager (systemd `Restart=always`)
//! with [`Supervisor`]. A new build that crashes right after start-up is
//! rolled back after 3 starts; one that runs but never connects is rolled
//! back at the `--update-rollback-secs` deadline; an agent killed at each
//! step of an update converges to one consistent version.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use elkeid_tests::plugin::{
    Agent, FileServer, component, field, push_configs, records, sha256_hex, wait_connected,
};
use elkeid_tests::{Center, bin, wait_for};

const T: Duration = Duration::from_secs(60);

/// A private copy of the agent binary under `dir/bin/` (so an update may
/// rename over it) and the bytes it was made from.
fn agent_copy(dir: &Path) -> (PathBuf, Vec<u8>) {
    let exe = dir.join("bin/elkeid-agent");
    std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
    let original = std::fs::read(bin("elkeid-agent", "elkeid-agent")).unwrap();
    std::fs::write(&exe, &original).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    (exe, original)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_replaces_binary_and_reexecs() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let files = FileServer::start();

    // The agent runs from its own copy, so renaming over it is harmless.
    let (exe, original) = agent_copy(tmp.path());
    // "A new build": the same program with different bytes (trailing data
    // does not change how an ELF file runs, but changes its sha256).
    let mut new_build = original.clone();
    new_build.extend_from_slice(b"\0elkeid-agent self-update test build\0");
    let url = files.put("/elkeid-agent-9.9.9", new_build.clone());

    let agent = Agent::start(
        &center,
        &tmp.path().join("work"),
        "e2e-update-agent",
        Some(&exe),
        &[],
    );
    let id = agent.id.clone();
    let pid = agent.pid();
    wait_connected(&center, &id, T).await;

    // Wrong sha256: refused, reported, binary untouched.
    let bad = component(
        "elkeid-agent",
        "9.9.9",
        "",
        &"ab".repeat(32),
        "",
        std::slice::from_ref(&url),
        "",
    );
    push_configs(&center, &id, vec![bad]).await;
    let hb = wait_for(T, || {
        records(&center, &id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state_detail").contains("agent update failed"))
    })
    .expect("abnormal heartbeat after the refused update");
    assert!(
        field(&hb, "state_detail").contains("sha256 mismatch"),
        "{hb}"
    );
    assert_eq!(std::fs::read(&exe).unwrap(), original);
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());

    // The real update.
    let good = component(
        "elkeid-agent",
        "9.9.9",
        "",
        &sha256_hex(&new_build),
        "",
        &[url],
        "",
    );
    push_configs(&center, &id, vec![good.clone()]).await;
    wait_for(T, || (std::fs::read(&exe).ok()? == new_build).then_some(()))
        .expect("new binary renamed over the old one");
    // The re-exec'd process (same pid: exec replaces the image) connects
    // again and removes the old binary.
    wait_for(T, || {
        (!tmp.path().join("bin/elkeid-agent.old").exists()).then_some(())
    })
    .expect("<exe>.old removed by the new process");
    wait_connected(&center, &id, T).await;
    let running = std::fs::metadata(format!("/proc/{pid}/exe"))
        .expect("agent still running under the same pid");
    let installed = std::fs::metadata(&exe).unwrap();
    assert_eq!(
        (running.dev(), running.ino()),
        (installed.dev(), installed.ino()),
        "the new file is what runs"
    );
    assert_eq!(installed.permissions().mode() & 0o777, 0o755);

    // The same artifact again (a manager whose version string differs from
    // the compiled one) must not loop: nothing is replaced, no restart.
    push_configs(&center, &id, vec![good]).await;
    let hb = wait_for(T, || {
        records(&center, &id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state_detail").contains("already has sha256"))
    })
    .expect("update skipped and reported");
    assert!(
        field(&hb, "state_detail").contains(&sha256_hex(&new_build)),
        "{hb}"
    );
    let still = std::fs::metadata(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(still.ino(), installed.ino());
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());
}

/// A new binary that passes `--version` but cannot run (it exits 1 for
/// anything else, as a crash after start-up would) is never swapped in:
/// it must connect to a center with the agent's own arguments
/// (`--probe-connect`) first. The running agent stays, still connected,
/// and reports the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_to_a_binary_that_cannot_connect_keeps_the_running_version() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Center::start(&tmp.path().join("center"), &[]);
    let files = FileServer::start();
    let (exe, original) = agent_copy(tmp.path());
    let crasher = b"#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'elkeid-agent 9.9.9'; exit 0; fi\necho crashed >&2\nexit 1\n".to_vec();
    let url = files.put("/elkeid-agent-crasher", crasher.clone());

    let agent = Agent::start(
        &center,
        &tmp.path().join("work"),
        "e2e-crasher-agent",
        Some(&exe),
        &[],
    );
    let id = agent.id.clone();
    let pid = agent.pid();
    wait_connected(&center, &id, T).await;
    let c = component(
        "elkeid-agent",
        "9.9.9",
        "",
        &sha256_hex(&crasher),
        "",
        &[url],
        "",
    );
    push_configs(&center, &id, vec![c]).await;
    let hb = wait_for(T, || {
        records(&center, &id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state_detail").contains("agent update failed"))
    })
    .expect("abnormal heartbeat after the refused update");
    assert!(
        field(&hb, "state_detail").contains("did not connect"),
        "{hb}"
    );
    assert_eq!(std::fs::read(&exe).unwrap(), original, "binary untouched");
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());
    let dir: Vec<_> = std::fs::read_dir(exe.parent().unwrap()).unwrap().collect();
    assert_eq!(dir.len(), 1, "no staged binary left next to the executable");
    // Same process, still connected and reporting.
    let running = std::fs::metadata(format!("/proc/{pid}/exe")).expect("agent still running");
    let installed = std::fs::metadata(&exe).unwrap();
    assert_eq!(running.ino(), installed.ino());
    let before = records(&center, &id, 1000).len();
    wait_for(T, || {
        (records(&center, &id, 1000).len() > before).then_some(())
    })
    .expect("heartbeats keep arriving");
}

/// Plays systemd `Restart=always`: starts the agent and starts it again
/// 300 ms after every exit. `env` applies to the first `env_starts` starts.
struct Supervisor {
    stop: Arc<AtomicBool>,
    pid: Arc<AtomicU32>,
    exits: Arc<Mutex<Vec<std::process::ExitStatus>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Supervisor {
    fn start(
        center: &Arc<Center>,
        work: &Path,
        id: &str,
        exe: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
        env_starts: usize,
    ) -> Supervisor {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = Arc::new(AtomicU32::new(0));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let (center, work, id, exe) = (
            center.clone(),
            work.to_path_buf(),
            id.to_string(),
            exe.to_path_buf(),
        );
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (s2, p2, e2) = (stop.clone(), pid.clone(), exits.clone());
        let thread = std::thread::spawn(move || {
            let mut starts = 0;
            while !s2.load(Ordering::SeqCst) {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let env: Vec<(&str, &str)> = if starts < env_starts {
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
                } else {
                    Vec::new()
                };
                starts += 1;
                let mut a = Agent::start_env(&center, &work, &id, Some(&exe), &extra, &env);
                p2.store(a.pid(), Ordering::SeqCst);
                loop {
                    if s2.load(Ordering::SeqCst) {
                        return; // `a` is killed on drop
                    }
                    if let Some(st) = a.child.0.try_wait().unwrap() {
                        e2.lock().unwrap().push(st);
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Supervisor {
            stop,
            pid,
            exits,
            thread: Some(thread),
        }
    }

    fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    fn exits(&self) -> usize {
        self.exits.lock().unwrap().len()
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The running agent's executable is the file at `exe` (same inode).
fn runs_installed(pid: u32, exe: &Path) -> bool {
    match (
        std::fs::metadata(format!("/proc/{pid}/exe")),
        std::fs::metadata(exe),
    ) {
        (Ok(r), Ok(i)) => (r.dev(), r.ino()) == (i.dev(), i.ino()),
        _ => false,
    }
}

/// `<work>/update.journal` as JSON, if present.
fn journal(work: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read(work.join("update.journal")).ok()?;
    Some(serde_json::from_slice(&text).unwrap())
}

/// A 1010 record of agent `id` whose `msg` is "self-update rolled back".
fn rollback_record(center: &Center, id: &str) -> Option<serde_json::Value> {
    records(center, id, 1010)
        .into_iter()
        .find(|r| field(r, "msg") == "self-update rolled back")
}

/// A new build and its config entry, served by `files`.
fn new_build(original: &[u8], files: &FileServer, tag: &str) -> (Vec<u8>, serde_json::Value) {
    let mut new_build = original.to_vec();
    new_build.extend_from_slice(format!("\0elkeid-agent test build {tag}\0").as_bytes());
    let url = files.put(&format!("/elkeid-agent-{tag}"), new_build.clone());
    let c = component(
        "elkeid-agent",
        "9.9.9",
        "",
        &sha256_hex(&new_build),
        "",
        &[url],
        "",
    );
    (new_build, c)
}

/// A new build that passes `--version` and `--probe-connect` but dies
/// right after every start (here: killed at start-up while on trial, as a
/// crash would) is rolled back by its own 4th start (`--update-max-starts`
/// 3): the old binary is back at `<exe>`, runs, connects and reports the
/// rollback in a 1010 record; the same artifact is then refused, not
/// installed again in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_to_a_crashing_binary_rolls_back_after_three_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Arc::new(Center::start(&tmp.path().join("center"), &[]));
    let files = FileServer::start();
    let (exe, original) = agent_copy(tmp.path());
    let (_new, c) = new_build(&original, &files, "crash");
    let work = tmp.path().join("work");
    let id = "e2e-rollback-crash";
    // Every start of a binary on trial dies (SIGKILL) before connecting.
    let sup = Supervisor::start(
        &center,
        &work,
        id,
        &exe,
        &[],
        &[("ELKEID_TEST_UPDATE_ABORT_AT", "started")],
        usize::MAX,
    );
    wait_connected(&center, id, T).await;
    let first_pid = sup.pid();
    push_configs(&center, id, vec![c.clone()]).await;
    let rec = wait_for(Duration::from_secs(120), || rollback_record(&center, id))
        .expect("1010 record reporting the rollback");
    assert!(field(&rec, "reason").contains("started 3 times"), "{rec}");
    assert_eq!(field(&rec, "to_version"), "9.9.9", "{rec}");
    assert_eq!(sup.exits(), 3, "three crashed starts, then the rollback");
    assert_eq!(std::fs::read(&exe).unwrap(), original, "old binary back");
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());
    let pid = sup.pid();
    assert_ne!(pid, first_pid);
    assert!(runs_installed(pid, &exe), "the restored binary runs");
    let j = wait_for(T, || journal(&work).filter(|j| j["reported"] == true))
        .expect("journal marks the rollback reported");
    assert_eq!(j["phase"], "rolled_back", "{j}");
    assert_eq!(j["starts"], 4, "{j}");
    wait_connected(&center, id, T).await;

    // The same artifact again: refused (no update loop), reported.
    push_configs(&center, id, vec![c]).await;
    let hb = wait_for(T, || {
        records(&center, id, 1000)
            .into_iter()
            .rev()
            .find(|r| field(r, "state_detail").contains("rolled back before"))
    })
    .expect("refusal of the rolled-back artifact in a heartbeat");
    assert!(
        field(&hb, "state_detail").contains("agent update failed"),
        "{hb}"
    );
    assert_eq!(std::fs::read(&exe).unwrap(), original);
    assert_eq!(sup.exits(), 3);
    assert_eq!(sup.pid(), pid);
}

/// A new build that runs but never reaches a center is rolled back at the
/// `--update-rollback-secs` deadline by the new process itself: it stops
/// gracefully and execs the old binary (same pid, no restart by the
/// supervisor), which connects and reports the rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_to_a_binary_that_never_connects_rolls_back_at_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Arc::new(Center::start(&tmp.path().join("center"), &[]));
    let files = FileServer::start();
    let (exe, original) = agent_copy(tmp.path());
    let (new_build, c) = new_build(&original, &files, "offline");
    let work = tmp.path().join("work");
    let id = "e2e-rollback-offline";
    let sup = Supervisor::start(
        &center,
        &work,
        id,
        &exe,
        &["--update-rollback-secs", "5"],
        &[("ELKEID_TEST_TRIAL_NO_CONNECT", "1")],
        usize::MAX,
    );
    wait_connected(&center, id, T).await;
    let pid = sup.pid();
    push_configs(&center, id, vec![c]).await;
    wait_for(T, || {
        (std::fs::metadata(&exe).ok()?.len() == new_build.len() as u64).then_some(())
    })
    .expect("new binary swapped in");
    let swapped = Instant::now();
    wait_for(T, || {
        (std::fs::metadata(&exe).ok()?.len() == original.len() as u64).then_some(())
    })
    .expect("old binary restored");
    let took = swapped.elapsed();
    // 5 s bound; the margin only absorbs a slow machine.
    assert!(took < Duration::from_secs(35), "rolled back after {took:?}");
    let rec = wait_for(T, || rollback_record(&center, id)).expect("rollback reported (1010)");
    assert!(field(&rec, "reason").contains("did not connect"), "{rec}");
    assert_eq!(std::fs::read(&exe).unwrap(), original);
    assert!(!tmp.path().join("bin/elkeid-agent.old").exists());
    assert_eq!(sup.exits(), 0, "rolled back by exec, not by a crash");
    assert_eq!(sup.pid(), pid);
    assert!(runs_installed(pid, &exe), "the restored binary runs");
}

/// Kills the agent (SIGKILL) at each step of a self-update. At every
/// moment `<exe>` is a whole binary (old or new size, sampled every 2 ms);
/// after the restart the agent converges to the new version (a config
/// push is repeated until it is in place): it runs from `<exe>`, the
/// journal and `<exe>.old` are gone, no staged file is left, and it was
/// killed exactly once (no crash loop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_update_killed_at_every_step_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let center = Arc::new(Center::start(&tmp.path().join("center"), &[]));
    let files = FileServer::start();
    for step in [
        "downloaded",
        "synced",
        "journaled",
        "linked",
        "renamed",
        "committed",
        "started",
    ] {
        let root = tmp.path().join(step);
        let (exe, original) = agent_copy(&root);
        let (new_build, c) = new_build(&original, &files, step);
        let sizes = [original.len() as u64, new_build.len() as u64];
        let work = root.join("work");
        let id = format!("e2e-kill-{step}");
        // Samples `<exe>` until the scenario ends.
        let done = Arc::new(AtomicBool::new(false));
        let bad = Arc::new(Mutex::new(Vec::<String>::new()));
        let sampler = {
            let (done, bad, exe) = (done.clone(), bad.clone(), exe.clone());
            std::thread::spawn(move || {
                while !done.load(Ordering::SeqCst) {
                    match std::fs::metadata(&exe) {
                        Ok(m) if sizes.contains(&m.len()) => {}
                        Ok(m) => bad.lock().unwrap().push(format!("size {}", m.len())),
                        Err(e) => bad.lock().unwrap().push(e.to_string()),
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        let sup = Supervisor::start(
            &center,
            &work,
            &id,
            &exe,
            &[],
            &[("ELKEID_TEST_UPDATE_ABORT_AT", step)],
            1,
        );
        wait_connected(&center, &id, T).await;
        push_configs(&center, &id, vec![c.clone()]).await;
        wait_for(T, || (sup.exits() >= 1).then_some(()))
            .unwrap_or_else(|| panic!("{step}: agent not killed at the step"));
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut last_push = Instant::now();
        loop {
            let pid = sup.pid();
            let converged = std::fs::metadata(&exe).is_ok_and(|m| m.len() == sizes[1])
                && runs_installed(pid, &exe)
                && !root.join("bin/elkeid-agent.old").exists()
                && journal(&work).is_none();
            if converged {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{step}: no convergence; journal {:?}",
                journal(&work)
            );
            // The old version (killed before the rename) updates again.
            if last_push.elapsed() > Duration::from_secs(5) {
                push_configs(&center, &id, vec![c.clone()]).await;
                last_push = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_connected(&center, &id, T).await;
        done.store(true, Ordering::SeqCst);
        sampler.join().unwrap();
        assert!(
            bad.lock().unwrap().is_empty(),
            "{step}: {:?}",
            bad.lock().unwrap()
        );
        assert_eq!(std::fs::read(&exe).unwrap(), new_build, "{step}");
        assert_eq!(sup.exits(), 1, "{step}: killed once, no crash loop");
        let bin_dir: Vec<PathBuf> = std::fs::read_dir(root.join("bin"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(bin_dir, vec![exe.clone()], "{step}");
        let staged: Vec<_> = std::fs::read_dir(work.join("tmp"))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        assert!(staged.is_empty(), "{step}: {staged:?}");
        drop(sup);
    }
}
