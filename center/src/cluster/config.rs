//! Cluster configuration: flags (`--etcd`, `--cluster-*`), environment
//! (`ELKEID_CENTER_ETCD`, `ELKEID_CENTER_CLUSTER_*`) and the `[cluster]`
//! table of the TOML file. Everything is optional: without `--etcd` the
//! center is a single center exactly as before.

use std::time::Duration;

use clap::Args;
use serde::Deserialize;

use crate::config::ConfigError;

/// Cluster flags, flattened into the center's [`crate::Cli`].
#[derive(Debug, Default, Clone, Args)]
pub struct ClusterArgs {
    /// etcd endpoint(s) (`http://host:2379`, comma list): join the cluster
    /// registered there. Without it the center runs alone.
    #[arg(long, env = "ELKEID_CENTER_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Address (IP or host name) agents and other centers reach this center
    /// on. [default: the IP of --grpc-addr when it is not 0.0.0.0/::]
    #[arg(long, env = "ELKEID_CENTER_CLUSTER_ADVERTISE")]
    pub cluster_advertise: Option<String>,
    /// This center's name in etcd. [default: ADVERTISE:HTTP_PORT]
    #[arg(long, env = "ELKEID_CENTER_CLUSTER_ID")]
    pub cluster_id: Option<String>,
    /// Key prefix in etcd, shared by all centers of one service. [default: /elkeid-rs/]
    #[arg(long, env = "ELKEID_CENTER_CLUSTER_PREFIX")]
    pub cluster_prefix: Option<String>,
    /// Lease TTL, seconds: how long a dead center stays visible. [default: 10]
    #[arg(long, env = "ELKEID_CENTER_CLUSTER_LEASE_TTL_SECS")]
    pub cluster_lease_ttl_secs: Option<u64>,
    /// Also serve `GET /registry/detail` (only that, read-only) in PLAIN
    /// HTTP on this address, for Elkeid Go agents, which query service
    /// discovery over plain HTTP while the API is HTTPS. Needs --etcd.
    /// [default: none]
    #[arg(long, env = "ELKEID_CENTER_SD_LISTEN")]
    pub sd_listen: Option<std::net::SocketAddr>,
    /// Register this center into an existing Elkeid service discovery
    /// (`http://host:port`, comma list, tried in order): `/registry/register`
    /// at start and every --elkeid-sd-interval-secs, `/registry/evict` on
    /// shutdown or drain. Works with or without --etcd. [default: none]
    #[arg(long, env = "ELKEID_CENTER_ELKEID_SD", value_delimiter = ',')]
    pub elkeid_sd: Vec<String>,
    /// Service name registered as `<name>_grpc` and `<name>_http` (Elkeid's
    /// `sd.name`). [default: hids_svr]
    #[arg(long, env = "ELKEID_CENTER_ELKEID_SD_NAME")]
    pub elkeid_sd_name: Option<String>,
    /// Access key signing the calls to the Elkeid SD (`sd.auth.ak`).
    /// [default: unsigned]
    #[arg(long, env = "ELKEID_CENTER_ELKEID_SD_AK")]
    pub elkeid_sd_ak: Option<String>,
    /// Secret key of --elkeid-sd-ak (`sd.auth.sk`); prefer the environment
    /// variable. [default: none]
    #[arg(long, env = "ELKEID_CENTER_ELKEID_SD_SK", hide_env_values = true)]
    pub elkeid_sd_sk: Option<String>,
    /// Seconds between re-registrations (heartbeats) in the Elkeid SD.
    /// [default: 30, as Elkeid's centers]
    #[arg(long, env = "ELKEID_CENTER_ELKEID_SD_INTERVAL_SECS")]
    pub elkeid_sd_interval_secs: Option<u64>,
}

/// The `[cluster]` table of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileCluster {
    etcd: Option<Vec<String>>,
    advertise: Option<String>,
    id: Option<String>,
    prefix: Option<String>,
    lease_ttl_secs: Option<u64>,
    sd_listen: Option<std::net::SocketAddr>,
    elkeid_sd: Option<Vec<String>>,
    elkeid_sd_name: Option<String>,
    elkeid_sd_ak: Option<String>,
    elkeid_sd_sk: Option<String>,
    elkeid_sd_interval_secs: Option<u64>,
}

/// Resolved cluster configuration; `None` in [`crate::Config::cluster`] when
/// no etcd endpoint is configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// Advertised host; `None` = derive from the bound gRPC address.
    pub advertise: Option<String>,
    /// Center id; `None` = `advertise:http_port`.
    pub id: Option<String>,
    /// Key prefix, ending in `/`.
    pub prefix: String,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Plain-HTTP listener serving only `GET /registry/detail`.
    pub sd_listen: Option<std::net::SocketAddr>,
}

/// Registration into an existing Elkeid service discovery (spec §5.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElkeidSdConfig {
    /// SD base URLs (`http://host:port`), tried in order.
    pub addrs: Vec<String>,
    /// `sd.name`: registered as `<name>_grpc` and `<name>_http`.
    pub name: String,
    /// `sd.auth` access and secret key; `None` = unsigned calls.
    pub auth: Option<(String, String)>,
    /// Re-registration period.
    pub interval: Duration,
    /// Advertised host (`cluster.advertise`); `None` = the gRPC bind IP.
    pub advertise: Option<String>,
}

/// The Elkeid SD settings (`None` without `--elkeid-sd`).
pub(crate) fn resolve_elkeid_sd(
    cli: &ClusterArgs,
    file: &FileCluster,
) -> Result<Option<ElkeidSdConfig>, ConfigError> {
    let addrs: Vec<String> = if cli.elkeid_sd.is_empty() {
        file.elkeid_sd.clone().unwrap_or_default()
    } else {
        cli.elkeid_sd.clone()
    };
    let addrs: Vec<String> = addrs
        .into_iter()
        .map(|a| {
            let a = a.trim().trim_end_matches('/');
            if a.contains("://") {
                a.to_string()
            } else {
                format!("http://{a}")
            }
        })
        .filter(|a| a.len() > "http://".len())
        .collect();
    if addrs.is_empty() {
        return Ok(None);
    }
    if let Some(a) = addrs.iter().find(|a| !a.starts_with("http://")) {
        return Err(ConfigError::Invalid {
            key: "cluster.elkeid_sd",
            msg: format!("`{a}`: Elkeid's service discovery is plain http://"),
        });
    }
    let name = cli
        .elkeid_sd_name
        .clone()
        .or_else(|| file.elkeid_sd_name.clone())
        .unwrap_or_else(|| "hids_svr".into());
    if name.is_empty() || name.len() > 128 {
        return Err(ConfigError::Invalid {
            key: "cluster.elkeid_sd_name",
            msg: "must be 1..=128 bytes".into(),
        });
    }
    let ak = cli
        .elkeid_sd_ak
        .clone()
        .or_else(|| file.elkeid_sd_ak.clone());
    let sk = cli
        .elkeid_sd_sk
        .clone()
        .or_else(|| file.elkeid_sd_sk.clone());
    let auth = match (ak, sk) {
        (Some(a), Some(s)) => Some((a, s)),
        (None, None) => None,
        _ => {
            return Err(ConfigError::Invalid {
                key: "cluster.elkeid_sd_ak",
                msg: "elkeid_sd_ak and elkeid_sd_sk go together".into(),
            });
        }
    };
    let secs = cli
        .elkeid_sd_interval_secs
        .or(file.elkeid_sd_interval_secs)
        .unwrap_or(30);
    if !(1..=3600).contains(&secs) {
        return Err(ConfigError::Invalid {
            key: "cluster.elkeid_sd_interval_secs",
            msg: format!("{secs} is not within 1..=3600 seconds"),
        });
    }
    Ok(Some(ElkeidSdConfig {
        addrs,
        name,
        auth,
        interval: Duration::from_secs(secs),
        advertise: cli
            .cluster_advertise
            .clone()
            .or_else(|| file.advertise.clone()),
    }))
}

/// Flag > env > file > default.
pub(crate) fn resolve(
    cli: ClusterArgs,
    file: FileCluster,
) -> Result<Option<ClusterConfig>, ConfigError> {
    let etcd: Vec<String> = if cli.etcd.is_empty() {
        file.etcd.unwrap_or_default()
    } else {
        cli.etcd
    };
    let etcd: Vec<String> = etcd
        .into_iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    let sd_listen = cli.sd_listen.or(file.sd_listen);
    if etcd.is_empty() {
        if sd_listen.is_some() {
            return Err(ConfigError::Invalid {
                key: "cluster.sd_listen",
                msg: "serves the live centers from etcd: set cluster.etcd (--etcd) too".into(),
            });
        }
        return Ok(None);
    }
    let mut prefix = cli
        .cluster_prefix
        .or(file.prefix)
        .unwrap_or_else(|| "/elkeid-rs/".into());
    if !prefix.ends_with('/') {
        prefix.push('/');
    }
    let ttl = cli
        .cluster_lease_ttl_secs
        .or(file.lease_ttl_secs)
        .unwrap_or(10);
    if !(2..=3600).contains(&ttl) {
        return Err(ConfigError::Invalid {
            key: "cluster.lease_ttl_secs",
            msg: format!("{ttl} is not within 2..=3600 seconds"),
        });
    }
    let id = cli.cluster_id.or(file.id);
    if let Some(id) = &id
        && (id.is_empty() || id.contains('/'))
    {
        return Err(ConfigError::Invalid {
            key: "cluster.id",
            msg: format!("`{id}` must be non-empty and contain no `/`"),
        });
    }
    Ok(Some(ClusterConfig {
        etcd,
        advertise: cli.cluster_advertise.or(file.advertise),
        id,
        prefix,
        lease_ttl: Duration::from_secs(ttl),
        sd_listen,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_etcd_means_no_cluster() {
        assert_eq!(
            resolve(ClusterArgs::default(), FileCluster::default()).unwrap(),
            None
        );
    }

    #[test]
    fn flags_win_and_values_are_checked() {
        let cli = ClusterArgs {
            etcd: vec!["127.0.0.1:2379".into()],
            cluster_prefix: Some("/x".into()),
            ..Default::default()
        };
        let file = FileCluster {
            etcd: Some(vec!["10.0.0.1:2379".into()]),
            lease_ttl_secs: Some(5),
            ..Default::default()
        };
        let c = resolve(cli, file).unwrap().unwrap();
        assert_eq!(c.etcd, vec!["127.0.0.1:2379".to_string()]);
        assert_eq!(c.prefix, "/x/");
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        let bad = ClusterArgs {
            etcd: vec!["e".into()],
            cluster_lease_ttl_secs: Some(1),
            ..Default::default()
        };
        assert!(resolve(bad, FileCluster::default()).is_err());
        let sd_alone = ClusterArgs {
            sd_listen: Some("127.0.0.1:8088".parse().unwrap()),
            ..Default::default()
        };
        assert!(resolve(sd_alone, FileCluster::default()).is_err());
    }

    #[test]
    fn elkeid_sd_settings() {
        let none = resolve_elkeid_sd(&ClusterArgs::default(), &FileCluster::default()).unwrap();
        assert_eq!(none, None);
        let cli = ClusterArgs {
            elkeid_sd: vec!["10.0.0.5:8088".into(), "http://10.0.0.6:8088/".into()],
            elkeid_sd_ak: Some("ak".into()),
            elkeid_sd_sk: Some("sk".into()),
            ..Default::default()
        };
        let c = resolve_elkeid_sd(&cli, &FileCluster::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.addrs, ["http://10.0.0.5:8088", "http://10.0.0.6:8088"]);
        assert_eq!(c.name, "hids_svr");
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.auth, Some(("ak".into(), "sk".into())));
        let https = ClusterArgs {
            elkeid_sd: vec!["https://x:1".into()],
            ..Default::default()
        };
        assert!(resolve_elkeid_sd(&https, &FileCluster::default()).is_err());
        let half = ClusterArgs {
            elkeid_sd: vec!["x:1".into()],
            elkeid_sd_sk: Some("sk".into()),
            ..Default::default()
        };
        assert!(resolve_elkeid_sd(&half, &FileCluster::default()).is_err());
    }
}
