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
    if etcd.is_empty() {
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
    }
}
