//! The agent's shared state (one `Rc<Agent>` on the single runtime thread):
//! configuration, identity, host facts, counters, the current connection,
//! `state` / `state_detail` (§3.3) and the stop signal.

use std::cell::{Cell, RefCell};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use elkeid_core::packet::{PacketMeta, encode_meta, meta_len};
use tokio::sync::{Notify, watch};

use crate::buffer::Buffer;
use crate::config::{Config, PRODUCT, VERSION};
use crate::host::{Host, HostStatic, IpLists};
use crate::plugin::PluginManager;
use crate::transport::channel::{ByteCounters, Channel};

/// Why the agent stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or task 1060: graceful shutdown, exit 0.
    Terminate,
    /// Self-update installed a new binary: graceful shutdown, then re-exec it.
    Reexec(PathBuf),
}

/// Shared agent state.
#[derive(Debug)]
pub(crate) struct Agent {
    pub(crate) cfg: Config,
    pub(crate) id: String,
    pub(crate) host: Host,
    pub(crate) host_static: HostStatic,
    pub(crate) hostname: RefCell<String>,
    pub(crate) ips: RefCell<IpLists>,
    pub(crate) buffer: Rc<Buffer>,
    pub(crate) plugins: Rc<PluginManager>,
    /// gRPC bytes received / sent (all RPCs).
    pub(crate) bytes: Arc<ByteCounters>,
    /// Records delivered to the center.
    pub(crate) tx_records: Cell<u64>,
    /// Commands received.
    pub(crate) rx_commands: Cell<u64>,
    /// Successful connections after the first.
    pub(crate) reconnects: Cell<u64>,
    /// `sd` / `private` / `public` / `unknown`.
    pub(crate) net_mode: Cell<&'static str>,
    pub(crate) idc: RefCell<String>,
    pub(crate) region: RefCell<String>,
    /// `state_detail` entries; empty = `running`.
    pub(crate) abnormal: RefCell<Vec<String>>,
    /// Encoded `PackagedData` fields 2..9.
    pub(crate) meta: RefCell<Bytes>,
    /// The live connection (uploads open another stream on it).
    pub(crate) channel: RefCell<Option<Channel>>,
    /// Wakes the sender at once (e.g. after a heartbeat).
    pub(crate) kick: Notify,
    /// An upload is running.
    pub(crate) upload_busy: Cell<bool>,
    /// Graceful stop: end the Transfer stream once the ring is empty.
    pub(crate) closing: Cell<bool>,
    /// SIGUSR2 asked to drop cached buffers.
    pub(crate) release_memory: Cell<bool>,
    /// Previous heartbeat samples (rates).
    pub(crate) hb: RefCell<crate::heartbeat::Prev>,
    stop: watch::Sender<Option<Exit>>,
}

impl Agent {
    pub(crate) fn new(
        cfg: Config,
        id: String,
        buffer: Rc<Buffer>,
        plugins: Rc<PluginManager>,
    ) -> Rc<Agent> {
        let host = Host::default();
        let host_static = host.static_facts();
        let (stop, _) = watch::channel(None);
        let a = Agent {
            idc: RefCell::new(cfg.idc.clone()),
            region: RefCell::new(cfg.region.clone()),
            cfg,
            id,
            host,
            host_static,
            hostname: RefCell::new(String::new()),
            ips: RefCell::new(IpLists::default()),
            buffer,
            plugins,
            bytes: Arc::new(ByteCounters::default()),
            tx_records: Cell::new(0),
            rx_commands: Cell::new(0),
            reconnects: Cell::new(0),
            net_mode: Cell::new("unknown"),
            abnormal: RefCell::new(Vec::new()),
            meta: RefCell::new(Bytes::new()),
            channel: RefCell::new(None),
            kick: Notify::new(),
            upload_busy: Cell::new(false),
            closing: Cell::new(false),
            release_memory: Cell::new(false),
            hb: RefCell::new(crate::heartbeat::Prev::default()),
            stop,
        };
        a.refresh_host();
        Rc::new(a)
    }

    /// Re-reads hostname and IP lists and re-encodes the packet metadata.
    pub(crate) fn refresh_host(&self) {
        let hostname = crate::host::hostname();
        let ips = crate::host::ip_lists();
        fn v(l: &[String]) -> Vec<&str> {
            l.iter().map(String::as_str).collect()
        }
        let (a, b, c, d) = (
            v(&ips.intranet_ipv4),
            v(&ips.extranet_ipv4),
            v(&ips.intranet_ipv6),
            v(&ips.extranet_ipv6),
        );
        let meta = PacketMeta {
            agent_id: &self.id,
            intranet_ipv4: &a,
            extranet_ipv4: &b,
            intranet_ipv6: &c,
            extranet_ipv6: &d,
            hostname: &hostname,
            version: VERSION,
            product: PRODUCT,
        };
        let mut out = vec![0u8; meta_len(&meta)];
        match encode_meta(&meta, &mut out) {
            Ok(n) => {
                out.truncate(n);
                self.meta.replace(Bytes::from(out));
            }
            Err(error) => tracing::error!(%error, "cannot encode packet metadata"),
        }
        self.hostname.replace(hostname);
        self.ips.replace(ips);
    }

    /// Marks the agent abnormal (`state_detail` gets `msg`).
    pub(crate) fn set_abnormal(&self, msg: String) {
        let mut v = self.abnormal.borrow_mut();
        if v.len() < 32 && !v.contains(&msg) {
            v.push(msg);
        }
    }

    /// Asks the agent to stop (first reason wins).
    pub(crate) fn stop(&self, why: Exit) {
        self.stop.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// Resolves once a stop was asked.
    pub(crate) async fn stopped(&self) -> Exit {
        let mut rx = self.stop.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::Terminate;
            }
        }
    }

    /// Pushes an agent-generated record (counted as a drop if even the
    /// reserve is full).
    pub(crate) fn push(&self, data_type: i32, payload: &[u8]) -> bool {
        self.buffer
            .push_agent(data_type, crate::clock::now_unix(), payload)
    }

    /// A 5100 task-failure record.
    pub(crate) fn task_failed(&self, token: &str, msg: &str) {
        tracing::warn!(token, msg, "task failed");
        let mut p = elkeid_core::payload::PayloadBuf::new();
        p.field("token", token)
            .field("msg", msg)
            .field("status", "failed");
        self.push(5100, p.as_bytes());
        self.kick.notify_one();
    }
}
