//! Host facts (wire spec §3.7 and the system-wide heartbeat fields of §3.8),
//! read from a configurable root directory so tests can use a fake one.
//! Missing files are normal (routers, containers) and yield empty values.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// At most this many intranet addresses per family (as Elkeid).
const MAX_INTRANET: usize = 5;

/// IP lists as they appear in every `PackagedData`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IpLists {
    pub(crate) intranet_ipv4: Vec<String>,
    pub(crate) extranet_ipv4: Vec<String>,
    pub(crate) intranet_ipv6: Vec<String>,
    pub(crate) extranet_ipv6: Vec<String>,
}

/// Static host facts (read once at start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HostStatic {
    pub(crate) kernel_version: String,
    pub(crate) arch: String,
    pub(crate) platform: String,
    pub(crate) platform_family: String,
    pub(crate) platform_version: String,
    pub(crate) cpu_name: String,
    pub(crate) host_serial: String,
    pub(crate) host_id: String,
    pub(crate) host_model: String,
    pub(crate) host_vendor: String,
    pub(crate) boot_time: i64,
}

/// Reader of host facts below `root` (`/` in production).
#[derive(Debug, Clone)]
pub(crate) struct Host {
    root: PathBuf,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            root: PathBuf::from("/"),
        }
    }
}

/// Go's `IsGlobalUnicast`: not unspecified, loopback, multicast, link-local
/// or the IPv4 broadcast address.
fn is_global_unicast(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified()
                || v4.is_loopback()
                || v4.is_multicast()
                || v4.is_link_local()
                || v4.is_broadcast())
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            !(v6.is_unspecified()
                || v6.is_loopback()
                || v6.is_multicast()
                || (s[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// Splits `(interface, address)` pairs into the four lists of §3.7: skips
/// interfaces named `docker*` / `lo*` and non-global-unicast addresses;
/// private IPv4 (10/8, 172.16/12, 192.168/16) and IPv6 `fd00::/8` are
/// intranet; intranet lists are truncated to 5.
pub(crate) fn classify<'a>(addrs: impl IntoIterator<Item = (&'a str, IpAddr)>) -> IpLists {
    let mut l = IpLists::default();
    for (ifname, ip) in addrs {
        if ifname.starts_with("docker") || ifname.starts_with("lo") || !is_global_unicast(&ip) {
            continue;
        }
        match ip {
            IpAddr::V4(v4) => {
                let o = v4.octets();
                let private = o[0] == 10
                    || (o[0] == 172 && (o[1] & 0xf0) == 16)
                    || (o[0] == 192 && o[1] == 168);
                if private {
                    if l.intranet_ipv4.len() < MAX_INTRANET {
                        l.intranet_ipv4.push(v4.to_string());
                    }
                } else {
                    l.extranet_ipv4.push(v4.to_string());
                }
            }
            IpAddr::V6(v6) => {
                if v6.octets()[0] == 0xfd {
                    if l.intranet_ipv6.len() < MAX_INTRANET {
                        l.intranet_ipv6.push(v6.to_string());
                    }
                } else {
                    l.extranet_ipv6.push(v6.to_string());
                }
            }
        }
    }
    l
}

/// The live interface addresses, classified: IPv4 from `SIOCGIFCONF`, IPv6
/// from `/proc/net/if_inet6` (as net-tools' `ifconfig` reads them).
///
/// Not `getifaddrs()`: musl implements it over rtnetlink, and qemu-user
/// (7.2) leaves one attribute length of every `RTM_NEWLINK` message
/// un-swapped on a big-endian guest, so musl's loop never ends under
/// `qemu-mips` — the CI's only way to run the big-endian MIPS agent. The
/// ioctl and the proc file give the same addresses on every kernel.
pub(crate) fn ip_lists() -> IpLists {
    let pairs = interface_addrs();
    classify(pairs.iter().map(|(n, ip)| (n.as_str(), *ip)))
}

/// Every `(interface, address)` pair: IPv4, then IPv6.
fn interface_addrs() -> Vec<(String, IpAddr)> {
    let mut pairs = ipv4_addrs();
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        pairs.extend(parse_if_inet6(&text));
    }
    pairs
}

/// At most this many IPv4 addresses are read (`SIOCGIFCONF` entries).
const MAX_IFCONF_ENTRIES: usize = 1024;

/// The IPv4 addresses of every interface (`SIOCGIFCONF`); empty on error.
#[allow(unsafe_code)]
fn ipv4_addrs() -> Vec<(String, IpAddr)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    use std::os::fd::AsRawFd;
    let Ok(sock) = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    ) else {
        return Vec::new();
    };
    let entry = std::mem::size_of::<libc::ifreq>();
    let mut entries = 16;
    loop {
        let mut buf = vec![0u8; entries * entry];
        let mut conf = libc::ifconf {
            ifc_len: (entries * entry) as libc::c_int,
            ifc_ifcu: libc::__c_anonymous_ifc_ifcu {
                ifcu_buf: buf.as_mut_ptr().cast(),
            },
        };
        // SAFETY: `conf` points at `buf`, which is valid for writes of
        // `ifc_len` bytes and outlives the call; the kernel writes at most
        // `ifc_len` bytes of whole `ifreq` entries and stores the length used.
        let rc = unsafe {
            libc::ioctl(
                sock.as_raw_fd(),
                libc::SIOCGIFCONF as _,
                &mut conf as *mut libc::ifconf,
            )
        };
        if rc < 0 {
            return Vec::new();
        }
        let used = usize::try_from(conf.ifc_len).unwrap_or(0).min(buf.len());
        // A full buffer may have been truncated: ask again with more room.
        if used + entry > buf.len() && entries < MAX_IFCONF_ENTRIES {
            entries *= 4;
            continue;
        }
        return parse_ifconf(&buf[..used], entry);
    }
}

/// `(name, address)` of each `ifreq` in a `SIOCGIFCONF` answer: the name is
/// the first 16 bytes (NUL-padded), then a `sockaddr_in` (family in host
/// order, port, address in network order). Non-IPv4 entries are skipped.
fn parse_ifconf(buf: &[u8], entry: usize) -> Vec<(String, IpAddr)> {
    const NAME: usize = libc::IFNAMSIZ;
    if entry < NAME + 8 {
        return Vec::new();
    }
    buf.chunks_exact(entry)
        .filter_map(|e| {
            let family = u16::from_ne_bytes([e[NAME], e[NAME + 1]]);
            if family != libc::AF_INET as u16 {
                return None;
            }
            let name = &e[..NAME];
            let end = name.iter().position(|&b| b == 0).unwrap_or(NAME);
            let name = std::str::from_utf8(&name[..end]).ok()?;
            let a = [e[NAME + 4], e[NAME + 5], e[NAME + 6], e[NAME + 7]];
            Some((name.to_string(), IpAddr::from(a)))
        })
        .collect()
}

/// `(name, address)` of each line of `/proc/net/if_inet6`: 32 hex digits of
/// address, then index, prefix length, scope, flags (hex) and the name.
fn parse_if_inet6(text: &str) -> Vec<(String, IpAddr)> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let hex = f.next()?;
            let name = f.nth(4)?;
            if hex.len() != 32 {
                return None;
            }
            let v = u128::from_str_radix(hex, 16).ok()?;
            Some((name.to_string(), IpAddr::from(std::net::Ipv6Addr::from(v))))
        })
        .collect()
}

/// The hostname (empty when unavailable).
pub(crate) fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Parses `KEY=value` / `KEY="value"` lines (os-release, openwrt_release).
fn parse_shell_vars(s: &str) -> Vec<(String, String)> {
    s.lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            Some((k.trim().to_string(), v.to_string()))
        })
        .collect()
}

fn var<'a>(vars: &'a [(String, String)], key: &str) -> Option<&'a str> {
    vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// gopsutil-like platform family.
fn family_of(platform: &str) -> &'static str {
    match platform {
        "debian" | "ubuntu" | "linuxmint" | "raspbian" => "debian",
        "oracle"
        | "centos"
        | "redhat"
        | "rhel"
        | "scientific"
        | "enterpriseenterprise"
        | "amazon"
        | "xenserver"
        | "cloudlinux"
        | "ibm_powerkvm"
        | "rocky"
        | "almalinux"
        | "ol"
        | "anolis"
        | "tencentos"
        | "alinux"
        | "openeuler"
        | "kylin" => "rhel",
        "fedora" => "fedora",
        "suse" | "opensuse" | "opensuse-leap" | "opensuse-tumbleweed" | "sles" | "sled" => "suse",
        "gentoo" => "gentoo",
        "arch" | "archlinux" | "manjaro" => "arch",
        "alpine" => "alpine",
        "coreos" => "coreos",
        "openwrt" => "openwrt",
        _ => "",
    }
}

impl Host {
    /// A reader rooted at `root` (tests use a fake root).
    #[cfg(test)]
    pub(crate) fn with_root(root: impl Into<PathBuf>) -> Self {
        Host { root: root.into() }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }

    fn read_trim(&self, rel: &str) -> String {
        self.read(rel)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// `(platform, family, version)` from `/etc/openwrt_release` or `/etc/os-release`.
    pub(crate) fn platform(&self) -> (String, String, String) {
        if let Some(s) = self.read("etc/openwrt_release") {
            let v = parse_shell_vars(&s);
            let version = var(&v, "DISTRIB_RELEASE").unwrap_or_default().to_string();
            return ("openwrt".into(), "openwrt".into(), version);
        }
        let s = self
            .read("etc/os-release")
            .or_else(|| self.read("usr/lib/os-release"))
            .unwrap_or_default();
        let v = parse_shell_vars(&s);
        let mut platform = var(&v, "ID").unwrap_or_default().to_ascii_lowercase();
        if platform == "rhel" {
            platform = "redhat".into();
        }
        let version = var(&v, "VERSION_ID").unwrap_or_default().to_string();
        let family = family_of(&platform).to_string();
        (platform, family, version)
    }

    /// First `model name` of `/proc/cpuinfo` (routers: `cpu model` / `Processor`).
    pub(crate) fn cpu_name(&self) -> String {
        let s = self.read("proc/cpuinfo").unwrap_or_default();
        for key in ["model name", "cpu model", "Processor"] {
            for l in s.lines() {
                if let Some((k, v)) = l.split_once(':')
                    && k.trim() == key
                {
                    return v.trim().to_string();
                }
            }
        }
        String::new()
    }

    /// `btime` of `/proc/stat`.
    pub(crate) fn boot_time(&self) -> i64 {
        self.read("proc/stat")
            .and_then(|s| crate::procstat::parse_btime(&s))
            .unwrap_or(0)
    }

    /// Static facts (uname from the live kernel).
    pub(crate) fn static_facts(&self) -> HostStatic {
        let (kernel_version, arch) = match nix::sys::utsname::uname() {
            Ok(u) => (
                u.release().to_string_lossy().into_owned(),
                u.machine().to_string_lossy().into_owned(),
            ),
            Err(_) => (String::new(), String::new()),
        };
        let (platform, platform_family, platform_version) = self.platform();
        HostStatic {
            kernel_version,
            arch,
            platform,
            platform_family,
            platform_version,
            cpu_name: self.cpu_name(),
            host_serial: self.read_trim("sys/class/dmi/id/product_serial"),
            host_id: self.read_trim("sys/class/dmi/id/product_uuid"),
            host_model: self.read_trim("sys/class/dmi/id/product_name"),
            host_vendor: self.read_trim("sys/class/dmi/id/sys_vendor"),
            boot_time: self.boot_time(),
        }
    }

    /// Comma-joined `nameserver` entries of `/etc/resolv.conf`.
    pub(crate) fn dns(&self) -> String {
        let s = self.read("etc/resolv.conf").unwrap_or_default();
        let v: Vec<&str> = s
            .lines()
            .filter_map(|l| {
                let mut it = l.split_ascii_whitespace();
                (it.next() == Some("nameserver"))
                    .then(|| it.next())
                    .flatten()
            })
            .collect();
        v.join(",")
    }

    /// First IPv4 route with flags UP|GATEWAY in `/proc/net/route`.
    pub(crate) fn gateway(&self) -> String {
        let s = self.read("proc/net/route").unwrap_or_default();
        for l in s.lines().skip(1) {
            let f: Vec<&str> = l.split_ascii_whitespace().collect();
            let (Some(gw), Some(flags)) = (f.get(2), f.get(3)) else {
                continue;
            };
            let (Ok(gw), Ok(flags)) = (u32::from_str_radix(gw, 16), u16::from_str_radix(flags, 16))
            else {
                continue;
            };
            if flags & 0x3 == 0x3 {
                // The kernel prints the address in host (little-endian) order.
                return std::net::Ipv4Addr::from(gw.to_le_bytes()).to_string();
            }
        }
        String::new()
    }

    /// `/proc/loadavg`: (load1, load5, load15, running, total).
    pub(crate) fn loadavg(&self) -> (f64, f64, f64, u64, u64) {
        let s = self.read("proc/loadavg").unwrap_or_default();
        let f: Vec<&str> = s.split_ascii_whitespace().collect();
        let fl = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let (run, total) = f
            .get(3)
            .and_then(|p| p.split_once('/'))
            .map(|(a, b)| (a.parse().unwrap_or(0), b.parse().unwrap_or(0)))
            .unwrap_or((0, 0));
        (fl(0), fl(1), fl(2), run, total)
    }

    /// `(total, used)` memory bytes, gopsutil-style: used = total - available
    /// (available falls back to free + buffers + cached).
    pub(crate) fn memory(&self) -> (u64, u64) {
        let s = self.read("proc/meminfo").unwrap_or_default();
        let kb = |key: &str| -> Option<u64> {
            s.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                rest.split_ascii_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
                    .map(|v| v * 1024)
            })
        };
        let total = kb("MemTotal").unwrap_or(0);
        let avail = kb("MemAvailable").unwrap_or_else(|| {
            kb("MemFree").unwrap_or(0) + kb("Buffers").unwrap_or(0) + kb("Cached").unwrap_or(0)
        });
        (total, total.saturating_sub(avail))
    }

    /// `(busy, total)` jiffies of the `cpu` line of `/proc/stat`.
    pub(crate) fn cpu_times(&self) -> (u64, u64) {
        let s = self.read("proc/stat").unwrap_or_default();
        let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
            return (0, 0);
        };
        let v: Vec<u64> = line
            .split_ascii_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest counted in user)
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        (total.saturating_sub(idle), total)
    }

    /// Bytes of all files under `dir`, skipping directories named `skip`
    /// (not following symlinks, bounded depth).
    pub(crate) fn du(dir: &Path, skip: Option<&str>) -> u64 {
        fn walk(p: &Path, skip: Option<&str>, depth: u32) -> u64 {
            if depth > 32 {
                return 0;
            }
            let Ok(rd) = std::fs::read_dir(p) else {
                return 0;
            };
            let mut n = 0u64;
            for e in rd.flatten() {
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() {
                    if skip.is_some_and(|s| e.file_name() == s) {
                        continue;
                    }
                    n = n.saturating_add(walk(&e.path(), skip, depth + 1));
                } else if ft.is_file() {
                    n = n.saturating_add(e.metadata().map(|m| m.len()).unwrap_or(0));
                }
            }
            n
        }
        walk(dir, skip, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    #[test]
    fn classify_split() {
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut v = vec![
            ("lo", a("127.0.0.1")),
            ("eth0", a("10.1.2.3")),
            ("eth0", a("172.31.0.1")),
            ("eth0", a("172.32.0.1")),
            ("eth0", a("192.168.1.1")),
            ("eth0", a("169.254.1.1")),
            ("docker0", a("172.17.0.1")),
            ("eth1", a("8.8.8.8")),
            ("eth1", a("fd00::1")),
            ("eth1", a("fe80::1")),
            ("eth1", a("2001:db8::1")),
            ("eth1", a("::1")),
        ];
        for i in 0..6 {
            v.push(("eth2", a(&format!("10.9.9.{i}"))));
        }
        let l = classify(v.iter().map(|(n, ip)| (*n, *ip)));
        assert_eq!(
            l.intranet_ipv4,
            vec![
                "10.1.2.3",
                "172.31.0.1",
                "192.168.1.1",
                "10.9.9.0",
                "10.9.9.1"
            ]
        );
        assert_eq!(l.extranet_ipv4, vec!["172.32.0.1", "8.8.8.8"]);
        assert_eq!(l.intranet_ipv6, vec!["fd00::1"]);
        assert_eq!(l.extranet_ipv6, vec!["2001:db8::1"]);
    }

    #[test]
    fn fake_root_facts() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        put(
            r,
            "etc/os-release",
            "NAME=\"Ubuntu\"\nID=ubuntu\nVERSION_ID=\"20.04\"\n",
        );
        put(
            r,
            "proc/cpuinfo",
            "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU\n",
        );
        put(
            r,
            "proc/stat",
            "cpu  100 0 50 800 50 0 0 0 0 0\nbtime 1700000000\n",
        );
        put(r, "sys/class/dmi/id/product_serial", "SER123\n");
        put(r, "sys/class/dmi/id/sys_vendor", "Dell Inc.\n");
        put(
            r,
            "etc/resolv.conf",
            "# c\nnameserver 1.1.1.1\nsearch x\nnameserver 8.8.8.8\n",
        );
        put(
            r,
            "proc/net/route",
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
             eth0\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\n\
             eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\n",
        );
        put(r, "proc/loadavg", "0.50 0.25 0.10 2/345 6789\n");
        put(
            r,
            "proc/meminfo",
            "MemTotal:       1000 kB\nMemFree:  100 kB\nMemAvailable:   400 kB\n",
        );
        let h = Host::with_root(r);
        let s = h.static_facts();
        assert_eq!(
            (
                s.platform.as_str(),
                s.platform_family.as_str(),
                s.platform_version.as_str()
            ),
            ("ubuntu", "debian", "20.04")
        );
        assert_eq!(s.cpu_name, "Intel(R) Xeon(R) CPU");
        assert_eq!(s.boot_time, 1_700_000_000);
        assert_eq!(s.host_serial, "SER123");
        assert_eq!(s.host_vendor, "Dell Inc.");
        assert_eq!(s.host_id, "");
        assert!(!s.kernel_version.is_empty());
        assert!(!s.arch.is_empty());
        assert_eq!(h.dns(), "1.1.1.1,8.8.8.8");
        assert_eq!(h.gateway(), "192.168.2.1");
        assert_eq!(h.loadavg(), (0.5, 0.25, 0.1, 2, 345));
        assert_eq!(h.memory(), (1_024_000, 614_400));
        assert_eq!(h.cpu_times(), (150, 1000));
    }

    #[test]
    fn openwrt_router_with_missing_files() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        put(
            r,
            "etc/openwrt_release",
            "DISTRIB_ID='OpenWrt'\nDISTRIB_RELEASE='23.05.3'\n",
        );
        put(
            r,
            "proc/cpuinfo",
            "system type\t\t: MediaTek MT7621\ncpu model\t\t: MIPS 1004Kc V2.15\n",
        );
        let h = Host::with_root(r);
        let s = h.static_facts();
        assert_eq!(s.platform, "openwrt");
        assert_eq!(s.platform_version, "23.05.3");
        assert_eq!(s.cpu_name, "MIPS 1004Kc V2.15");
        assert_eq!(s.boot_time, 0);
        assert_eq!(h.dns(), "");
        assert_eq!(h.gateway(), "");
        assert_eq!(h.memory(), (0, 0));
    }

    #[test]
    fn du_skips_plugin_dirs() {
        let d = tempfile::tempdir().unwrap();
        put(d.path(), "a", "12345");
        put(d.path(), "log/b", "123");
        put(d.path(), "plugin/x/y", "1234567890");
        assert_eq!(Host::du(d.path(), Some("plugin")), 8);
        assert_eq!(Host::du(d.path(), None), 18);
    }

    #[test]
    fn live_lists_and_hostname() {
        let _ = ip_lists();
        assert!(!hostname().is_empty());
    }

    #[test]
    fn ifconf_entries_are_parsed_by_layout() {
        let entry = std::mem::size_of::<libc::ifreq>();
        let mut buf = vec![0u8; 3 * entry];
        let put = |b: &mut [u8], name: &str, family: u16, ip: [u8; 4]| {
            b[..name.len()].copy_from_slice(name.as_bytes());
            b[16..18].copy_from_slice(&family.to_ne_bytes());
            b[20..24].copy_from_slice(&ip);
        };
        put(
            &mut buf[..entry],
            "lo",
            libc::AF_INET as u16,
            [127, 0, 0, 1],
        );
        put(
            &mut buf[entry..],
            "eth0:1",
            libc::AF_INET as u16,
            [192, 168, 7, 9],
        );
        put(&mut buf[2 * entry..], "odd", 99, [1, 2, 3, 4]);
        let got = parse_ifconf(&buf, entry);
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            got,
            vec![
                ("lo".to_string(), a("127.0.0.1")),
                ("eth0:1".to_string(), a("192.168.7.9"))
            ]
        );
        // A torn tail and a too-small entry size give nothing, not a panic.
        assert_eq!(parse_ifconf(&buf[..entry + 3], entry).len(), 1);
        assert!(parse_ifconf(&buf, 8).is_empty());
    }

    #[test]
    fn if_inet6_lines_are_parsed() {
        let text = "00000000000000000000000000000001 01 80 10 80       lo\n\
                    fd000000000000000000000000000042 02 40 00 80     eth0\n\
                    fe80000000000000021122fffe334455 02 40 20 80     eth0\n\
                    short 02 40 20 80 eth9\n\
                    zz000000000000000000000000000042 02 40 00 80 eth9\n\
                    20010db8000000000000000000000001 03\n";
        let a = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            parse_if_inet6(text),
            vec![
                ("lo".to_string(), a("::1")),
                ("eth0".to_string(), a("fd00::42")),
                ("eth0".to_string(), a("fe80::211:22ff:fe33:4455")),
            ]
        );
    }

    /// The ioctl + proc path sees what `getifaddrs()` sees (not run on
    /// big-endian MIPS, where `getifaddrs()` hangs under qemu-user).
    #[cfg(not(all(target_arch = "mips", target_endian = "big")))]
    #[test]
    fn live_addresses_match_getifaddrs() {
        let mut ours = interface_addrs();
        let mut theirs: Vec<(String, IpAddr)> = nix::ifaddrs::getifaddrs()
            .unwrap()
            .filter_map(|a| {
                let sa = a.address?;
                let ip = if let Some(v4) = sa.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else {
                    IpAddr::V6(sa.as_sockaddr_in6()?.ip())
                };
                Some((a.interface_name, ip))
            })
            .collect();
        ours.sort();
        theirs.sort();
        assert!(ours.iter().any(|(_, ip)| ip.is_loopback()), "{ours:?}");
        assert_eq!(ours, theirs);
    }
}
