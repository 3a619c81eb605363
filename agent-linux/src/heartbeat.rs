//! Heartbeats: 1000 (agent, every field of §3.8 plus our own counters
//! `drop_cnt`, `log_drop_cnt` (1010 error-log records dropped because their
//! pending queue was full), `ring_len`, `ring_bytes`, `reconnects`, and `hb_seq`, a sequence
//! number of 1000 records per process) and 1001 (one per
//! running plugin, §3.9), at start, after every (re)connect (1000 only) and
//! every `heartbeat_interval`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use elkeid_core::payload::PayloadBuf;
use tokio::time::Instant;

use crate::buffer::Buffer;
use crate::config::Config;
use crate::counters::Counters;
use crate::host::Host;
use crate::meta::HostMeta;
use crate::plugin::PluginManager;
use crate::procstat::{ProcSample, clock_ticks, sample};

/// Data type of the agent heartbeat.
pub(crate) use elkeid_core::schema::data_type::AGENT_HEARTBEAT as DT_AGENT_HEARTBEAT;
/// Data type of a plugin heartbeat.
pub(crate) use elkeid_core::schema::data_type::PLUGIN_HEARTBEAT as DT_PLUGIN_HEARTBEAT;

/// The heartbeat: what it reads (shared), and what it owns (the previous
/// samples for its rates and the agent's own `state_detail` entries).
#[derive(Debug)]
pub(crate) struct Heartbeat {
    cfg: Rc<Config>,
    meta: Rc<HostMeta>,
    counters: Rc<Counters>,
    buffer: Rc<Buffer>,
    plugins: Rc<PluginManager>,
    prev: RefCell<Prev>,
    /// The agent's own `state_detail` entries (plugins keep theirs).
    abnormal: RefCell<Vec<String>>,
}

/// Previous samples for rates.
#[derive(Debug, Default)]
struct Prev {
    at: Option<Instant>,
    own: Option<ProcSample>,
    rx_bytes: u64,
    tx_bytes: u64,
    tx_records: u64,
    rx_commands: u64,
    sys_cpu: (u64, u64),
    /// 1000 heartbeats built so far (`hb_seq`, lets a center spot gaps).
    seq: u64,
    plugins: HashMap<u32, (ProcSample, Instant)>,
}

/// Per-second rate of `delta` over `secs` (0 when no time passed).
fn rate(delta: u64, secs: f64) -> f64 {
    if secs > 0.0 { delta as f64 / secs } else { 0.0 }
}

/// CPU fraction of one core from a tick delta.
fn cpu_frac(ticks: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        ticks as f64 / clock_ticks() as f64 / secs
    } else {
        0.0
    }
}

/// Seconds since `start_unix` (at least 1 to avoid 0-division on fresh processes).
fn since_start(start_unix: i64) -> f64 {
    crate::clock::now_unix().saturating_sub(start_unix).max(1) as f64
}

impl Heartbeat {
    pub(crate) fn new(
        cfg: Rc<Config>,
        meta: Rc<HostMeta>,
        counters: Rc<Counters>,
        buffer: Rc<Buffer>,
        plugins: Rc<PluginManager>,
    ) -> Self {
        Heartbeat {
            cfg,
            meta,
            counters,
            buffer,
            plugins,
            prev: RefCell::new(Prev::default()),
            abnormal: RefCell::new(Vec::new()),
        }
    }

    /// Marks the agent abnormal (`state_detail` gets `msg`).
    pub(crate) fn set_abnormal(&self, msg: String) {
        let mut v = self.abnormal.borrow_mut();
        if v.len() < 32 && !v.contains(&msg) {
            v.push(msg);
        }
    }

    /// A config sync starts: forget the agent's own entries.
    pub(crate) fn clear_abnormal(&self) {
        self.abnormal.borrow_mut().clear();
    }

    /// The agent's own entries (SIGUSR1 dump).
    pub(crate) fn abnormal(&self) -> Vec<String> {
        self.abnormal.borrow().clone()
    }
}

/// Builds the 1000 payload and updates `prev`.
pub(crate) async fn agent_payload(agent: &Heartbeat) -> PayloadBuf {
    let now = Instant::now();
    let pid = std::process::id();
    let own = sample(pid).unwrap_or_default();
    let host = agent.meta.host.clone();
    let work_dir = agent.cfg.work_dir.clone();
    let du = tokio::task::spawn_blocking(move || Host::du(&work_dir, Some("plugin")))
        .await
        .unwrap_or(0);
    let rx_bytes = agent.counters.bytes.rx.load(Ordering::Relaxed);
    let tx_bytes = agent.counters.bytes.tx.load(Ordering::Relaxed);
    let tx_records = agent.counters.tx_records.get();
    let rx_commands = agent.counters.rx_commands.get();
    let sys_cpu = host.cpu_times();

    let mut prev = agent.prev.borrow_mut();
    // First sample: rates since process start (Elkeid reports cpu 0).
    let (secs, cpu, read_speed, write_speed) = match (prev.at, prev.own) {
        (Some(at), Some(p)) => {
            let s = now.duration_since(at).as_secs_f64();
            (
                s,
                cpu_frac(own.cpu_ticks.saturating_sub(p.cpu_ticks), s),
                rate(own.read_bytes.saturating_sub(p.read_bytes), s),
                rate(own.write_bytes.saturating_sub(p.write_bytes), s),
            )
        }
        _ => {
            let s = since_start(own.start_time_unix);
            (
                s,
                cpu_frac(own.cpu_ticks, s),
                rate(own.read_bytes, s),
                rate(own.write_bytes, s),
            )
        }
    };
    let cpu_usage = {
        let (busy, total) = sys_cpu;
        let (pb, pt) = prev.sys_cpu;
        let dt = total.saturating_sub(pt);
        if dt > 0 {
            busy.saturating_sub(pb) as f64 / dt as f64
        } else {
            0.0
        }
    };
    let rx_speed = rate(rx_bytes.saturating_sub(prev.rx_bytes), secs);
    let tx_speed = rate(tx_bytes.saturating_sub(prev.tx_bytes), secs);
    let tx_tps = rate(tx_records.saturating_sub(prev.tx_records), secs);
    let rx_tps = rate(rx_commands.saturating_sub(prev.rx_commands), secs);
    prev.at = Some(now);
    prev.own = Some(own);
    prev.rx_bytes = rx_bytes;
    prev.tx_bytes = tx_bytes;
    prev.tx_records = tx_records;
    prev.rx_commands = rx_commands;
    prev.sys_cpu = sys_cpu;
    prev.seq += 1;
    let seq = prev.seq;
    drop(prev);

    let (load1, load5, load15, running, total) = host.loadavg();
    let (total_mem, used_mem) = host.memory();
    let mem_usage = if total_mem > 0 {
        used_mem as f64 / total_mem as f64
    } else {
        0.0
    };
    let nproc = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let ngr = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut abnormal = agent.abnormal.borrow().clone();
    abnormal.extend(agent.plugins.abnormal());
    let state = if abnormal.is_empty() {
        "running"
    } else {
        "abnormal"
    };
    let state_detail = serde_json::to_string(&abnormal).unwrap_or_else(|_| "[]".into());
    let st = &agent.meta.host_static;

    let mut p = PayloadBuf::with_capacity(2048);
    p.field("kernel_version", &st.kernel_version)
        .field("arch", &st.arch)
        .field("platform", &st.platform)
        .field("platform_family", &st.platform_family)
        .field("platform_version", &st.platform_version)
        .field("state", state)
        .field("state_detail", &state_detail)
        .field("idc", &agent.meta.idc.borrow())
        .field("region", &agent.meta.region.borrow())
        .field("net_mode", agent.counters.net_mode.get())
        .field_f64("rx_speed", rx_speed)
        .field_f64("tx_speed", tx_speed)
        .field_f64("cpu", cpu)
        .field_u64("rss", own.rss_bytes)
        .field_f64("read_speed", read_speed)
        .field_f64("write_speed", write_speed)
        .field_u64("pid", u64::from(pid))
        .field_u64("nfd", own.nfd)
        .field_i64("start_time", own.start_time_unix)
        .field_f64("tx_tps", tx_tps)
        .field_f64("rx_tps", rx_tps)
        .field_u64("du", du)
        .field_u64("ngr", ngr as u64)
        .field_u64("nproc", nproc as u64)
        .field_u64("total_mem", total_mem)
        .field_f64("load_1", load1)
        .field_f64("load_5", load5)
        .field_f64("load_15", load15)
        .field_u64("running_procs", running)
        .field_u64("total_procs", total)
        .field("host_serial", &st.host_serial)
        .field("host_id", &st.host_id)
        .field("host_model", &st.host_model)
        .field("host_vendor", &st.host_vendor)
        .field("dns", &host.dns())
        .field("gateway", &host.gateway())
        .field("cpu_name", &st.cpu_name)
        .field_i64("boot_time", st.boot_time)
        .field_f64("cpu_usage", cpu_usage)
        .field_f64("mem_usage", mem_usage)
        .field_u64("drop_cnt", agent.buffer.drops())
        .field_u64("log_drop_cnt", crate::log::pending_drops())
        .field_u64("ring_len", agent.buffer.len() as u64)
        .field_u64("ring_bytes", agent.buffer.bytes() as u64)
        .field_u64("reconnects", agent.counters.reconnects.get())
        .field_u64("hb_seq", seq);
    crate::delivery_stats::heartbeat_fields(&mut p);
    p
}

/// Pushes a 1000 heartbeat into the ring and wakes the sender.
pub(crate) async fn push_agent_heartbeat(agent: &Heartbeat) {
    let p = agent_payload(agent).await;
    agent
        .buffer
        .push_agent(DT_AGENT_HEARTBEAT, crate::clock::now_unix(), p.as_bytes());
    agent.buffer.kick();
}

/// Pushes one 1001 per running plugin.
pub(crate) async fn push_plugin_heartbeats(agent: &Heartbeat) {
    let snaps = agent.plugins.snapshot();
    let now = Instant::now();
    let mut seen = Vec::with_capacity(snaps.len());
    for s in snaps {
        seen.push(s.pid);
        let cur = sample(s.pid).unwrap_or_default();
        let dir = s.dir.clone();
        let du = tokio::task::spawn_blocking(move || Host::du(&dir, None))
            .await
            .unwrap_or(0);
        let prev = agent.prev.borrow().plugins.get(&s.pid).copied();
        let (cpu, read_speed, write_speed) = match prev {
            Some((p, at)) => {
                let secs = now.duration_since(at).as_secs_f64();
                (
                    cpu_frac(cur.cpu_ticks.saturating_sub(p.cpu_ticks), secs),
                    rate(cur.read_bytes.saturating_sub(p.read_bytes), secs),
                    rate(cur.write_bytes.saturating_sub(p.write_bytes), secs),
                )
            }
            None => {
                let secs = since_start(cur.start_time_unix);
                (
                    cpu_frac(cur.cpu_ticks, secs),
                    rate(cur.read_bytes, secs),
                    rate(cur.write_bytes, secs),
                )
            }
        };
        agent.prev.borrow_mut().plugins.insert(s.pid, (cur, now));
        let secs = s.elapsed_secs;
        let start_time = if cur.start_time_unix > 0 {
            cur.start_time_unix
        } else {
            s.start_time
        };
        let mut p = PayloadBuf::with_capacity(512);
        p.field("name", &s.name)
            .field("pversion", &s.version)
            .field_f64("cpu", cpu)
            .field_u64("rss", cur.rss_bytes)
            .field_f64("read_speed", read_speed)
            .field_f64("write_speed", write_speed)
            .field_u64("pid", u64::from(s.pid))
            .field_u64("nfd", cur.nfd)
            .field_i64("start_time", start_time)
            .field_u64("du", du)
            .field_f64("rx_tps", rate(s.rx_cnt, secs))
            .field_f64("tx_tps", rate(s.tx_cnt, secs))
            .field_f64("rx_speed", rate(s.rx_bytes, secs))
            .field_f64("tx_speed", rate(s.tx_bytes, secs));
        agent
            .buffer
            .push_agent(DT_PLUGIN_HEARTBEAT, crate::clock::now_unix(), p.as_bytes());
    }
    agent
        .prev
        .borrow_mut()
        .plugins
        .retain(|pid, _| seen.contains(pid));
}

/// The periodic heartbeat task: refresh host facts, 1000, then 1001s.
pub(crate) async fn run(agent: Rc<Heartbeat>) {
    let mut tick = tokio::time::interval(agent.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        agent.meta.refresh();
        push_agent_heartbeat(&agent).await;
        push_plugin_heartbeats(&agent).await;
        // Once the heartbeat has gone out, the stack pages of the deepest
        // calls since the last beat (a reconnect's TLS handshake) go back.
        tokio::time::sleep(TRIM_AFTER.min(agent.cfg.heartbeat_interval / 2)).await;
        let n = crate::stack::trim_main_stack();
        if n > 0 {
            tracing::trace!(bytes = n, "main stack trimmed");
        }
    }
}

/// Delay between a heartbeat and the stack trim that follows it (at most
/// half the interval, so the trim never delays the next beat).
const TRIM_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(rate(100, 4.0), 25.0);
        assert_eq!(rate(100, 0.0), 0.0);
        let t = clock_ticks() as f64;
        assert!((cpu_frac(clock_ticks() * 2, 4.0) - 0.5).abs() < 1e-9, "{t}");
    }

    #[test]
    fn since_start_survives_bogus_proc_times() {
        // start times come from /proc (btime + start ticks); nonsense there
        // must not overflow.
        assert!(since_start(i64::MIN) > 1e18);
        assert_eq!(since_start(i64::MAX), 1.0);
    }
}
