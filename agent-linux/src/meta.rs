//! Host metadata: the agent id, host facts, hostname and IP lists (refreshed
//! by the heartbeat), idc/region (changed by task 1051) and the encoded
//! `PackagedData` fields 2..9 every batch carries (read by the transport).

use std::cell::RefCell;

use bytes::Bytes;
use elkeid_core::packet::{PacketMeta, encode_meta, meta_len};

use crate::config::{PRODUCT, VERSION};
use crate::host::{Host, HostStatic, IpLists};

/// Host metadata (one per agent, on the runtime thread).
#[derive(Debug)]
pub(crate) struct HostMeta {
    /// The agent id.
    pub(crate) id: String,
    /// Live host facts (load, memory, DNS, ...).
    pub(crate) host: Host,
    /// Facts read once at start.
    pub(crate) host_static: HostStatic,
    /// Current hostname.
    pub(crate) hostname: RefCell<String>,
    /// Current IP lists.
    pub(crate) ips: RefCell<IpLists>,
    /// `idc` (config, then task 1051).
    pub(crate) idc: RefCell<String>,
    /// `region` (config, then task 1051; selects the server list).
    pub(crate) region: RefCell<String>,
    /// Encoded `PackagedData` fields 2..9.
    pub(crate) packet: RefCell<Bytes>,
}

impl HostMeta {
    /// Reads the host facts and encodes the packet metadata.
    pub(crate) fn new(id: String, idc: String, region: String) -> Self {
        let host = Host::default();
        let host_static = host.static_facts();
        let m = HostMeta {
            id,
            host,
            host_static,
            hostname: RefCell::new(String::new()),
            ips: RefCell::new(IpLists::default()),
            idc: RefCell::new(idc),
            region: RefCell::new(region),
            packet: RefCell::new(Bytes::new()),
        };
        m.refresh();
        m
    }

    /// Re-reads hostname and IP lists and re-encodes the packet metadata.
    pub(crate) fn refresh(&self) {
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
                self.packet.replace(Bytes::from(out));
            }
            Err(error) => tracing::error!(%error, "cannot encode packet metadata"),
        }
        self.hostname.replace(hostname);
        self.ips.replace(ips);
    }
}
