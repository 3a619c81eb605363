//! Acknowledged delivery, center side (the wire extension is described in
//! `elkeid_core::ack` and docs/ARCHITECTURE.md).
//!
//! - [`Ticket`]: travels with a packet into every sink; each sink keeps a
//!   clone until the records are durable (NDJSON: written and fdatasync'd;
//!   Kafka: acknowledged by the broker; null: at once) or calls
//!   [`Ticket::fail`]. When the last clone is gone, the receiver learns
//!   whether every sink succeeded.
//! - [`AckStore`]: per agent and boot epoch, the highest sequence accepted
//!   (handed to the sinks) and the highest durable. A re-sent packet at or
//!   below the accepted point is a duplicate: not stored again, counted, and
//!   acknowledged once the original is durable. The durable points are
//!   journaled in `DIR/acks/journal` (fdatasync'd before the acknowledgement
//!   goes out) and reloaded at start, together with the identities found in
//!   the newest NDJSON files (records made durable just before a crash whose
//!   journal line was not yet written), so de-duplication survives a restart.
//! - [`AckMetrics`]: acks sent, duplicates dropped, journal sync latency.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub(crate) use elkeid_core::ack::PacketId;
use tokio::sync::oneshot;

/// Boot epochs remembered per agent (the newest ones by last use).
pub(crate) const MAX_EPOCHS_PER_AGENT: usize = 8;
/// Agents remembered; beyond it new agents are not de-duplicated (counted).
pub(crate) const MAX_AGENTS: usize = 1 << 20;
/// Journal size that triggers a rewrite from the in-memory state.
const JOURNAL_COMPACT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest journal line read back (agent ids are bounded by the packet size
/// anyway; longer lines are skipped as corrupt).
const MAX_JOURNAL_LINE: usize = 64 * 1024;

/// Whether every sink made a packet durable. Cheap to clone; see the module
/// docs.
#[derive(Debug, Clone)]
pub(crate) struct Ticket(Arc<TicketInner>);

#[derive(Debug)]
struct TicketInner {
    failed: AtomicBool,
    tx: Mutex<Option<oneshot::Sender<bool>>>,
}

impl Drop for TicketInner {
    fn drop(&mut self) {
        let tx = self.tx.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(tx) = tx {
            let _ = tx.send(!self.failed.load(Ordering::Acquire));
        }
    }
}

impl Ticket {
    /// A ticket and the receiver told `true` (all durable) or `false`.
    pub(crate) fn new() -> (Ticket, oneshot::Receiver<bool>) {
        let (tx, rx) = oneshot::channel();
        (
            Ticket(Arc::new(TicketInner {
                failed: AtomicBool::new(false),
                tx: Mutex::new(Some(tx)),
            })),
            rx,
        )
    }

    /// A sink could not make the packet durable.
    pub(crate) fn fail(&self) {
        self.0.failed.store(true, Ordering::Release);
    }
}

/// What to do with a packet that carries an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Not seen before: store it.
    New,
    /// Already accepted (a re-send): drop it, acknowledge when durable.
    Duplicate,
    /// De-duplication state is full: store it (duplicates possible).
    Untracked,
}

#[derive(Debug, Clone, Copy)]
struct EpochState {
    epoch: u64,
    accepted: u64,
    durable: u64,
    touched: u64,
}

/// Counters of the acknowledgement path.
#[derive(Debug, Default)]
pub(crate) struct AckMetrics {
    /// Ack-only Commands sent.
    pub(crate) acks_sent: AtomicU64,
    /// Re-sent packets dropped as already stored.
    pub(crate) dup_packets: AtomicU64,
    /// Records in those packets.
    pub(crate) dup_records: AtomicU64,
    /// Agents not tracked because the state is full.
    pub(crate) untracked: AtomicU64,
    /// Packets a sink failed to make durable (not acknowledged; the stream is
    /// closed so the agent re-sends).
    pub(crate) not_durable: AtomicU64,
    /// NDJSON group commits and their fdatasync time.
    pub(crate) ndjson_syncs: AtomicU64,
    pub(crate) ndjson_sync_micros: AtomicU64,
    pub(crate) ndjson_sync_max_micros: AtomicU64,
    /// Journal syncs and their time.
    pub(crate) journal_syncs: AtomicU64,
    pub(crate) journal_sync_micros: AtomicU64,
    /// Journal lines skipped as corrupt at start.
    pub(crate) journal_corrupt: AtomicU64,
}

impl AckMetrics {
    /// Records one NDJSON fdatasync.
    pub(crate) fn ndjson_synced(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.ndjson_syncs.fetch_add(1, Ordering::Relaxed);
        self.ndjson_sync_micros.fetch_add(us, Ordering::Relaxed);
        self.ndjson_sync_max_micros.fetch_max(us, Ordering::Relaxed);
    }

    /// Appends the Prometheus text of these counters.
    pub(crate) fn render(&self, s: &mut String) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let us = |c: &AtomicU64| g(c) as f64 / 1e6;
        for (name, help, v) in [
            (
                "elkeid_center_acks_sent_total",
                "Acknowledgement Commands sent to agents that advertised the extension.",
                g(&self.acks_sent),
            ),
            (
                "elkeid_center_duplicate_packets_dropped_total",
                "Re-sent packets already stored (not written again).",
                g(&self.dup_packets),
            ),
            (
                "elkeid_center_duplicate_records_dropped_total",
                "Records in re-sent packets already stored.",
                g(&self.dup_records),
            ),
            (
                "elkeid_center_ack_untracked_total",
                "Packets of agents beyond the de-duplication state bound.",
                g(&self.untracked),
            ),
            (
                "elkeid_center_packets_not_durable_total",
                "Packets a sink failed to make durable (not acknowledged).",
                g(&self.not_durable),
            ),
            (
                "elkeid_center_ack_journal_corrupt_lines_total",
                "Ack journal lines skipped as corrupt at start.",
                g(&self.journal_corrupt),
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP elkeid_center_ndjson_sync_seconds NDJSON group-commit fdatasync time.\n# TYPE elkeid_center_ndjson_sync_seconds summary\nelkeid_center_ndjson_sync_seconds_sum {}\nelkeid_center_ndjson_sync_seconds_count {}",
            us(&self.ndjson_sync_micros),
            g(&self.ndjson_syncs)
        );
        let _ = writeln!(
            s,
            "# HELP elkeid_center_ndjson_sync_seconds_max Longest NDJSON fdatasync.\n# TYPE elkeid_center_ndjson_sync_seconds_max gauge\nelkeid_center_ndjson_sync_seconds_max {}",
            us(&self.ndjson_sync_max_micros)
        );
        let _ = writeln!(
            s,
            "# HELP elkeid_center_ack_journal_sync_seconds Ack journal fdatasync time.\n# TYPE elkeid_center_ack_journal_sync_seconds summary\nelkeid_center_ack_journal_sync_seconds_sum {}\nelkeid_center_ack_journal_sync_seconds_count {}",
            us(&self.journal_sync_micros),
            g(&self.journal_syncs)
        );
    }
}

type State = HashMap<String, Vec<EpochState>>;

/// Per agent and epoch: accepted and durable sequence points; see the
/// module docs.
#[derive(Debug)]
pub(crate) struct AckStore {
    state: Arc<Mutex<State>>,
    clock: AtomicU64,
    journal: Option<std::sync::mpsc::SyncSender<JournalReq>>,
    pub(crate) metrics: Arc<AckMetrics>,
}

struct JournalReq {
    lines: Vec<(String, PacketId)>,
    done: oneshot::Sender<std::io::Result<()>>,
}

fn lock(s: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

impl AckStore {
    /// A store that persists nothing (tests, or no data dir).
    #[cfg(test)]
    pub(crate) fn memory() -> AckStore {
        AckStore {
            state: Arc::new(Mutex::new(HashMap::new())),
            clock: AtomicU64::new(0),
            journal: None,
            metrics: Arc::new(AckMetrics::default()),
        }
    }

    /// Opens (creating) `dir/journal`, loads it, adds `recovered` (identities
    /// of records found durable in the sinks), rewrites the journal compactly
    /// and starts its writer thread.
    pub(crate) fn open(
        dir: &Path,
        recovered: &[(String, PacketId)],
        metrics: Arc<AckMetrics>,
    ) -> std::io::Result<AckStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("journal");
        let mut state: State = HashMap::new();
        let mut n = 0u64;
        let mut put = |state: &mut State, agent: &str, id: PacketId| {
            n += 1;
            put_durable(state, agent, id, n);
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                for line in bytes.split(|b| *b == b'\n') {
                    if line.is_empty() {
                        continue;
                    }
                    match parse_line(line) {
                        Some((agent, id)) => put(&mut state, &agent, id),
                        None => {
                            metrics.journal_corrupt.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for (agent, id) in recovered {
            put(&mut state, agent, *id);
        }
        rewrite(&path, &state)?;
        let agents = state.len();
        let state = Arc::new(Mutex::new(state));
        let (tx, rx) = std::sync::mpsc::sync_channel::<JournalReq>(1024);
        let file = std::fs::OpenOptions::new().append(true).open(&path)?;
        let st = state.clone();
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("ack-journal".into())
            .spawn(move || journal_thread(path, file, rx, st, m))?;
        tracing::info!(dir = %dir.display(), agents, "ack journal loaded");
        Ok(AckStore {
            state,
            clock: AtomicU64::new(n + 1),
            journal: Some(tx),
            metrics,
        })
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Decides whether a packet is new, and marks it accepted if so.
    pub(crate) fn admit(&self, agent: &str, id: PacketId) -> Admit {
        let t = self.tick();
        let mut st = lock(&self.state);
        if !st.contains_key(agent) && st.len() >= MAX_AGENTS {
            self.metrics.untracked.fetch_add(1, Ordering::Relaxed);
            return Admit::Untracked;
        }
        let e = epoch_entry(st.entry(agent.to_string()).or_default(), id.epoch, t);
        e.touched = t;
        if id.seq <= e.accepted {
            Admit::Duplicate
        } else {
            e.accepted = id.seq;
            Admit::New
        }
    }

    /// Durable point of an agent's epoch (0 when unknown).
    pub(crate) fn durable(&self, agent: &str, epoch: u64) -> u64 {
        lock(&self.state)
            .get(agent)
            .and_then(|v| v.iter().find(|e| e.epoch == epoch))
            .map_or(0, |e| e.durable)
    }

    /// Every packet of `id.epoch` up to `id.seq` is durable.
    pub(crate) fn mark_durable(&self, agent: &str, id: PacketId) {
        let t = self.tick();
        put_durable(&mut lock(&self.state), agent, id, t);
    }

    /// A sink failed: packets after the durable point may be accepted again.
    pub(crate) fn rollback(&self, agent: &str, epoch: u64) {
        if let Some(e) = lock(&self.state)
            .get_mut(agent)
            .and_then(|v| v.iter_mut().find(|e| e.epoch == epoch))
        {
            e.accepted = e.durable;
        }
    }

    /// Journals durable points; returns once they are fdatasync'd.
    pub(crate) async fn persist(&self, lines: Vec<(String, PacketId)>) -> std::io::Result<()> {
        let Some(tx) = &self.journal else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        let tx = tx.clone();
        // The bounded channel may block briefly: not on the runtime thread.
        tokio::task::spawn_blocking(move || tx.send(JournalReq { lines, done }))
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("ack journal closed"))?;
        wait.await
            .map_err(|_| std::io::Error::other("ack journal closed"))?
    }
}

fn epoch_entry(v: &mut Vec<EpochState>, epoch: u64, t: u64) -> &mut EpochState {
    let idx = match v.iter().position(|e| e.epoch == epoch) {
        Some(i) => i,
        None => {
            if v.len() >= MAX_EPOCHS_PER_AGENT {
                // forget the least recently used epoch
                if let Some((i, _)) = v.iter().enumerate().min_by_key(|(_, e)| e.touched) {
                    v.swap_remove(i);
                }
            }
            v.push(EpochState {
                epoch,
                accepted: 0,
                durable: 0,
                touched: t,
            });
            v.len() - 1
        }
    };
    &mut v[idx]
}

fn put_durable(st: &mut State, agent: &str, id: PacketId, t: u64) {
    if !st.contains_key(agent) && st.len() >= MAX_AGENTS {
        return;
    }
    let e = epoch_entry(st.entry(agent.to_string()).or_default(), id.epoch, t);
    e.durable = e.durable.max(id.seq);
    e.accepted = e.accepted.max(e.durable);
    e.touched = t;
}

fn line(agent: &str, id: PacketId) -> String {
    let mut s = serde_json::to_string(&(agent, id.epoch, id.seq)).unwrap_or_default();
    s.push('\n');
    s
}

fn parse_line(l: &[u8]) -> Option<(String, PacketId)> {
    if l.len() > MAX_JOURNAL_LINE {
        return None;
    }
    let (agent, epoch, seq): (String, u64, u64) = serde_json::from_slice(l).ok()?;
    Some((agent, PacketId { epoch, seq }))
}

/// Writes the state to a temp file, fsyncs and renames it over `path`.
fn rewrite(path: &Path, st: &State) -> std::io::Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
        for (agent, epochs) in st {
            for e in epochs.iter().filter(|e| e.durable > 0) {
                f.write_all(
                    line(
                        agent,
                        PacketId {
                            epoch: e.epoch,
                            seq: e.durable,
                        },
                    )
                    .as_bytes(),
                )?;
            }
        }
        f.flush()?;
        f.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent()
        && let Ok(d) = std::fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn journal_thread(
    path: PathBuf,
    mut file: std::fs::File,
    rx: std::sync::mpsc::Receiver<JournalReq>,
    state: Arc<Mutex<State>>,
    metrics: Arc<AckMetrics>,
) {
    let mut size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut buf = String::new();
    while let Ok(first) = rx.recv() {
        // group commit: everything queued now shares one fdatasync
        let mut reqs = vec![first];
        while reqs.len() < 1024
            && let Ok(r) = rx.try_recv()
        {
            reqs.push(r);
        }
        buf.clear();
        for r in &reqs {
            for (agent, id) in &r.lines {
                buf.push_str(&line(agent, *id));
            }
        }
        let started = Instant::now();
        let result = file
            .write_all(buf.as_bytes())
            .and_then(|()| file.sync_data());
        metrics.journal_syncs.fetch_add(1, Ordering::Relaxed);
        metrics.journal_sync_micros.fetch_add(
            u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        size += buf.len() as u64;
        let err = result.as_ref().err().map(|e| (e.kind(), e.to_string()));
        if let Some((_, msg)) = &err {
            tracing::error!(error = %msg, "ack journal write failed");
        }
        for r in reqs {
            let _ = r.done.send(match &err {
                None => Ok(()),
                Some((kind, msg)) => Err(std::io::Error::new(*kind, msg.clone())),
            });
        }
        if size > JOURNAL_COMPACT_BYTES {
            let snapshot = lock(&state).clone();
            match rewrite(&path, &snapshot)
                .and_then(|()| std::fs::OpenOptions::new().append(true).open(&path))
            {
                Ok(f) => {
                    file = f;
                    size = file.metadata().map(|m| m.len()).unwrap_or(0);
                }
                Err(error) => tracing::error!(%error, "ack journal compaction failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(epoch: u64, seq: u64) -> PacketId {
        PacketId { epoch, seq }
    }

    #[test]
    fn admit_and_duplicates() {
        let s = AckStore::memory();
        assert_eq!(s.admit("a", id(1, 1)), Admit::New);
        assert_eq!(s.admit("a", id(1, 2)), Admit::New);
        assert_eq!(s.admit("a", id(1, 2)), Admit::Duplicate);
        assert_eq!(s.admit("a", id(2, 1)), Admit::New);
        assert_eq!(s.admit("b", id(1, 1)), Admit::New);
        assert_eq!(s.durable("a", 1), 0);
        s.mark_durable("a", id(1, 1));
        assert_eq!(s.durable("a", 1), 1);
        s.rollback("a", 1);
        assert_eq!(s.admit("a", id(1, 2)), Admit::New);
    }

    #[test]
    fn epochs_per_agent_bounded() {
        let s = AckStore::memory();
        for e in 1..=20 {
            s.admit("a", id(e, 1));
        }
        assert_eq!(lock(&s.state)["a"].len(), MAX_EPOCHS_PER_AGENT);
        // the newest are kept
        assert_eq!(s.admit("a", id(20, 1)), Admit::Duplicate);
        assert_eq!(s.admit("a", id(1, 1)), Admit::New);
    }

    #[tokio::test]
    async fn journal_survives_restart_and_skips_corrupt_lines() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(AckMetrics::default());
        {
            let s = AckStore::open(dir.path(), &[], m.clone()).unwrap();
            s.admit("a\t\"x", id(7, 3));
            s.mark_durable("a\t\"x", id(7, 3));
            s.persist(vec![("a\t\"x".into(), id(7, 3))]).await.unwrap();
            s.persist(vec![("b".into(), id(1, 9))]).await.unwrap();
        }
        // a torn last line, as after a crash
        let p = dir.path().join("journal");
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"[\"c\",1,").unwrap();
        drop(f);
        let s = AckStore::open(dir.path(), &[("d".into(), id(4, 4))], m.clone()).unwrap();
        assert_eq!(s.durable("a\t\"x", 7), 3);
        assert_eq!(s.durable("b", 1), 9);
        assert_eq!(s.durable("d", 4), 4);
        assert_eq!(s.admit("a\t\"x", id(7, 3)), Admit::Duplicate);
        assert_eq!(s.admit("a\t\"x", id(7, 4)), Admit::New);
        assert_eq!(m.journal_corrupt.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn ticket_reports_all_clones() {
        let (t, rx) = Ticket::new();
        let t2 = t.clone();
        drop(t);
        t2.fail();
        drop(t2);
        assert!(!rx.await.unwrap());
        let (t, rx) = Ticket::new();
        let t2 = t.clone();
        drop(t);
        drop(t2);
        assert!(rx.await.unwrap());
    }
}
