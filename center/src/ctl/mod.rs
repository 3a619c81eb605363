//! `elkeid-center ctl …`: operator commands that sign with the center's own
//! API key file and call its HTTP API, so daily work needs no openssl/curl.
//!
//! # Layout
//! - this file: the command line, the commands, tables and `--json` output.
//! - `client.rs`: the signed HTTP/HTTPS client (rustls, hyper).
//!
//! The API address comes from `DIR/listen.json` (written by the running
//! center) unless `--url` is given; the key from `DIR/api-keys.toml`; the CA
//! for HTTPS from `DIR/pki/ca.crt`. With a `host:port` or the listen file,
//! HTTPS is tried first; plain HTTP is used only on loopback when the center
//! answers without TLS (`--http-tls false`).
//!
//! Exit codes: 0 done, 1 the call failed or the API answered an error,
//! 64 bad usage.

mod client;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::{Value, json};

pub use client::{ApiKey, Client, ClientError, Endpoint, Scheme, TlsOptions};

/// `EX_USAGE`.
const EXIT_USAGE: u8 = 64;

const EXAMPLES: &str = "\
Examples (run where the center's data dir is):
  elkeid-center ctl list
  elkeid-center ctl stat AGENT_ID
  elkeid-center ctl task AGENT_ID --plugin elkeid-example-plugin --data-type 8001 --data hello
  elkeid-center ctl config AGENT_ID --file plugins.json
  elkeid-center ctl reset AGENT_ID          # or: --random 10
  elkeid-center ctl drain --yes             # take this center out of service
  elkeid-center ctl --json list             # machine-readable";

/// Operator commands against a running center's HTTP API.
#[derive(Debug, Parser)]
#[command(
    name = "elkeid-center ctl",
    bin_name = "elkeid-center ctl",
    version,
    after_help = EXAMPLES
)]
pub struct CtlCli {
    /// The center's data directory: `listen.json`, `api-keys.toml`, `pki/ca.crt`.
    #[arg(long, env = "ELKEID_CENTER_DATA_DIR", default_value = "elkeid-data")]
    pub data_dir: PathBuf,
    /// API root (`https://host:port`, `http://host:port`, or `host:port` to
    /// try HTTPS first) [default: the `http` address in DIR/listen.json].
    #[arg(long, env = "ELKEID_CTL_URL")]
    pub url: Option<String>,
    /// `[aksk]` key file [default: DIR/api-keys.toml].
    #[arg(long, env = "ELKEID_CENTER_API_KEYS")]
    pub api_keys: Option<PathBuf>,
    /// Access key to use from the key file [default: the first].
    #[arg(long)]
    pub access_key: Option<String>,
    /// Send unsigned requests (a center running with `--auth false`).
    #[arg(long)]
    pub no_auth: bool,
    /// CA certificate to verify an HTTPS API with [default: DIR/pki/ca.crt].
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Name the HTTPS certificate must carry [default: the URL host].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Seconds to wait for each answer.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
    /// Print the API's `data` as JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The operator commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Connected agents: id, host, address, version, platform, plugins, last heartbeat.
    List,
    /// Number of connected agents.
    Count,
    /// Last heartbeat details of every (or one) connected agent and its plugins.
    Stat {
        /// Only this agent.
        agent_id: Option<String>,
    },
    /// Send a task to a plugin of an agent (`POST /command/`).
    Task {
        /// The agent.
        agent_id: String,
        /// Plugin name (`elkeid-agent` for the agent itself).
        #[arg(long)]
        plugin: String,
        /// Task data_type (the plugin decides what it means).
        #[arg(long)]
        data_type: i32,
        /// Task data (a string, often JSON).
        #[arg(long, default_value = "")]
        data: String,
        /// Token echoed in the task's result records [default: random].
        #[arg(long)]
        token: Option<String>,
        /// Confirm a task that stops the agent (1060 to `elkeid-agent`).
        #[arg(long)]
        yes: bool,
    },
    /// Push component configs (the agent's desired plugin set) to an agent.
    Config {
        /// The agent.
        agent_id: String,
        /// JSON file: a list of components (`name`, `type`, `version`,
        /// `sha256`, `signature`, `download_url`, `detail`) or `{"config": [...]}`.
        #[arg(long)]
        file: PathBuf,
    },
    /// Close agent connections (they reconnect): given ids, or `--random N`.
    Reset {
        /// Agents to disconnect.
        #[arg(required_unless_present = "random", conflicts_with = "random")]
        agent_ids: Vec<String>,
        /// Disconnect this many agents, chosen by the center.
        #[arg(long)]
        random: Option<usize>,
    },
    /// Take the center out of service (`POST /cluster/drain`): refuse new
    /// agents, leave etcd / the Elkeid SD, end every agent stream so the
    /// agents move to the other centers. The center keeps running.
    Drain {
        /// Confirm (every agent of this center disconnects).
        #[arg(long)]
        yes: bool,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Bad usage (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The API answered with a non-zero code.
    #[error("{path}: code {code} ({msg}): {data}")]
    Api {
        /// The route.
        path: String,
        /// Envelope code (1 auth, 2 parameters, 3 errors).
        code: i64,
        /// Envelope message.
        msg: String,
        /// Envelope data.
        data: String,
    },
}

/// `elkeid-center ctl ARGS…` (`args` starts with `ctl`).
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match CtlCli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("elkeid-center ctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    match rt.block_on(run(&cli, &mut out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("elkeid-center ctl: {e}");
            match e {
                CtlError::Usage(_) => ExitCode::from(EXIT_USAGE),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Runs one command, writing its output to `out`.
pub async fn run(cli: &CtlCli, out: &mut dyn std::io::Write) -> Result<(), CtlError> {
    // Check what needs no network first (a bad file is a usage error).
    let body = match &cli.command {
        CtlCommand::Task {
            agent_id,
            plugin,
            data_type,
            data,
            token,
            yes,
        } => {
            if plugin == "elkeid-agent" && *data_type == 1060 && !yes {
                return Err(CtlError::Usage(
                    "task 1060 to elkeid-agent shuts the agent down (it exits; only its \
                     supervisor restarts it): add --yes to send it"
                        .into(),
                ));
            }
            let token = token.clone().unwrap_or_else(random_token);
            Some(json!({"agent_id": agent_id, "command": {"task": {
                "data_type": data_type, "name": plugin, "data": data, "token": token}}}))
        }
        CtlCommand::Config { agent_id, file } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| CtlError::Usage(format!("--file {}: {e}", file.display())))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                CtlError::Usage(format!("--file {}: not JSON: {e}", file.display()))
            })?;
            let list = match v {
                Value::Array(a) => a,
                Value::Object(mut o) => match o.remove("config") {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            };
            if list.is_empty() || !list.iter().all(Value::is_object) {
                return Err(CtlError::Usage(format!(
                    "--file {}: expected a non-empty list of component objects \
                     (an empty list would make an agent remove every plugin)",
                    file.display()
                )));
            }
            Some(json!({"agent_id": agent_id, "command": {"config": list}}))
        }
        CtlCommand::Reset { agent_ids, random } => Some(match random {
            Some(n) => json!({"type": "random", "count": n}),
            None => json!({"type": "strict", "id_list": agent_ids}),
        }),
        CtlCommand::Drain { yes: false } => {
            return Err(CtlError::Usage(
                "drain disconnects every agent of this center and refuses new ones \
                 until it is restarted: add --yes"
                    .into(),
            ));
        }
        _ => None,
    };
    let mut client = connect(cli)?;
    let w = |out: &mut dyn std::io::Write, s: String| {
        // A closed stdout (`| head`) is not an error worth reporting.
        let _ = out.write_all(s.as_bytes());
    };
    match &cli.command {
        CtlCommand::List => {
            if cli.json {
                let data = get(&mut client, "/conn/list").await?;
                w(out, format!("{data}\n"));
            } else {
                let stat = get(&mut client, "/conn/stat").await?;
                w(out, list_table(&stat, crate::now_unix()));
            }
        }
        CtlCommand::Count => {
            let data = get(&mut client, "/conn/count").await?;
            w(out, format!("{data}\n"));
        }
        CtlCommand::Stat { agent_id } => {
            let stat = get(&mut client, "/conn/stat").await?;
            let rows: Vec<Value> = stat
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|r| {
                            agent_id
                                .as_deref()
                                .is_none_or(|id| r["agent_info"]["agent_id"] == id)
                        })
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            if let (Some(id), true) = (agent_id, rows.is_empty()) {
                return Err(CtlError::Api {
                    path: "/conn/stat".into(),
                    code: 3,
                    msg: "not connected".into(),
                    data: format!("agentID not found: {id}"),
                });
            }
            if cli.json {
                w(out, format!("{}\n", Value::Array(rows)));
            } else {
                w(out, stat_text(&rows, crate::now_unix()));
            }
        }
        CtlCommand::Task { .. } | CtlCommand::Config { .. } => {
            let body = body.unwrap_or_default();
            post(&mut client, "/command/", &body).await?;
            let agent = body["agent_id"].as_str().unwrap_or("");
            let task = &body["command"]["task"];
            if cli.json {
                let v = if task.is_object() {
                    json!({"agent_id": agent, "task": task})
                } else {
                    json!({"agent_id": agent, "configs": body["command"]["config"].as_array().map_or(0, Vec::len)})
                };
                w(out, format!("{v}\n"));
            } else if task.is_object() {
                w(
                    out,
                    format!(
                        "task sent: agent {agent}, plugin {}, data_type {}, token {}\n",
                        task["name"].as_str().unwrap_or(""),
                        task["data_type"],
                        task["token"].as_str().unwrap_or("")
                    ),
                );
            } else {
                w(
                    out,
                    format!(
                        "config sent: agent {agent}, {} component(s)\n",
                        body["command"]["config"].as_array().map_or(0, Vec::len)
                    ),
                );
            }
        }
        CtlCommand::Reset { .. } => {
            let data = post(&mut client, "/conn/reset", &body.unwrap_or_default()).await?;
            if cli.json {
                w(out, format!("{data}\n"));
            } else {
                let mut rows = vec![vec!["AGENT ID".to_string(), "RESULT".to_string()]];
                if let Some(d) = data["detail"].as_object() {
                    for (id, r) in d {
                        rows.push(vec![id.clone(), r.as_str().unwrap_or("").to_string()]);
                    }
                }
                let n = rows.len() - 1;
                w(out, format!("{}{n} connection(s) reset\n", table(&rows)));
            }
        }
        CtlCommand::Drain { .. } => {
            let data = post(&mut client, "/cluster/drain", &json!({})).await?;
            if cli.json {
                w(out, format!("{data}\n"));
            } else {
                w(
                    out,
                    format!(
                        "draining{}: {} agent stream(s) closed, {}\n",
                        if data["was_draining"] == true {
                            " (already)"
                        } else {
                            ""
                        },
                        data["streams_closed"],
                        if data["left_etcd"] == true {
                            "left etcd"
                        } else {
                            "not in etcd"
                        }
                    ),
                );
            }
        }
    }
    Ok(())
}

fn connect(cli: &CtlCli) -> Result<Client, CtlError> {
    let dir = &cli.data_dir;
    let endpoint = match &cli.url {
        Some(u) => Endpoint::parse(u)?,
        None => Endpoint::from_listen_json(&dir.join("listen.json"))?,
    };
    let key = if cli.no_auth {
        None
    } else {
        let path = cli
            .api_keys
            .clone()
            .unwrap_or_else(|| dir.join("api-keys.toml"));
        Some(ApiKey::load(&path, cli.access_key.as_deref())?)
    };
    let tls = TlsOptions {
        ca: cli
            .ca
            .clone()
            .unwrap_or_else(|| dir.join("pki").join("ca.crt")),
        server_name: cli.server_name.clone(),
    };
    Ok(Client::new(
        endpoint,
        key,
        tls,
        Duration::from_secs(cli.timeout_secs.max(1)),
    ))
}

/// The envelope's `data` when `code` is 0.
fn envelope(path: &str, status: u16, body: Value) -> Result<Value, CtlError> {
    let code = body["code"].as_i64();
    match code {
        Some(0) => Ok(body["data"].clone()),
        _ => Err(CtlError::Api {
            path: path.to_string(),
            code: code.unwrap_or(-1),
            msg: body["msg"]
                .as_str()
                .map_or_else(|| format!("HTTP {status}"), str::to_string),
            data: match &body["data"] {
                Value::String(s) => s.clone(),
                Value::Null => body.to_string(),
                v => v.to_string(),
            },
        }),
    }
}

async fn get(client: &mut Client, path: &str) -> Result<Value, CtlError> {
    let r = client.call("GET", path, Vec::new()).await?;
    envelope(path, r.status, r.body)
}

async fn post(client: &mut Client, path: &str, body: &Value) -> Result<Value, CtlError> {
    let r = client
        .call("POST", path, body.to_string().into_bytes())
        .await?;
    envelope(path, r.status, r.body)
}

fn random_token() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 6];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // Uniqueness, not secrecy, is what a token needs.
        return format!("ctl-{}-{}", std::process::id(), crate::now_unix());
    }
    format!("ctl-{}", hex::encode(b))
}

/// A JSON value as table text (strings bare, lists joined with `,`).
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        v => v.to_string(),
    }
}

fn ago(now: i64, v: &Value) -> String {
    match v.as_i64() {
        Some(t) if t > 0 => format!("{}s ago", now.saturating_sub(t).max(0)),
        _ => "-".into(),
    }
}

/// Left-aligned columns separated by two spaces; the first row is the header.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c + 1 == r.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

fn list_table(stat: &Value, now: i64) -> String {
    let mut rows = vec![
        [
            "AGENT ID",
            "HOSTNAME",
            "ADDRESS",
            "VERSION",
            "PLATFORM",
            "PLUGINS",
            "LAST HEARTBEAT",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let empty = Vec::new();
    let agents = stat.as_array().unwrap_or(&empty);
    for a in agents {
        let i = &a["agent_info"];
        let plugins: Vec<String> = a["plugins_info"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|p| text(&p["name"]))
            .collect();
        rows.push(vec![
            text(&i["agent_id"]),
            text(&i["hostname"]),
            text(&i["agent_addr"]),
            text(&i["version"]),
            format!("{} {}", text(&i["platform"]), text(&i["platform_version"])),
            if plugins.is_empty() {
                "-".into()
            } else {
                plugins.join(",")
            },
            ago(now, &i["last_heartbeat_time"]),
        ]);
    }
    format!("{}{} agent(s) connected\n", table(&rows), agents.len())
}

fn stat_text(rows: &[Value], now: i64) -> String {
    let mut s = String::new();
    for a in rows {
        let i = &a["agent_info"];
        s.push_str(&format!(
            "agent {} ({}, {}), last heartbeat {}\n",
            text(&i["agent_id"]),
            text(&i["hostname"]),
            text(&i["agent_addr"]),
            ago(now, &i["last_heartbeat_time"])
        ));
        if let Some(m) = i.as_object() {
            let mut kv: Vec<Vec<String>> = m
                .iter()
                .map(|(k, v)| vec![format!("  {k}"), text(v)])
                .collect();
            kv.sort();
            s.push_str(&table(&kv));
        }
        let mut prow = vec![
            [
                "  PLUGIN", "VERSION", "PID", "CPU", "RSS", "RX TPS", "TX TPS",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for p in a["plugins_info"].as_array().into_iter().flatten() {
            prow.push(vec![
                format!("  {}", text(&p["name"])),
                text(&p["pversion"]),
                text(&p["pid"]),
                text(&p["cpu"]),
                text(&p["rss"]),
                text(&p["rx_tps"]),
                text(&p["tx_tps"]),
            ]);
        }
        if prow.len() > 1 {
            s.push_str(&table(&prow));
        } else {
            s.push_str("  no plugins\n");
        }
        s.push('\n');
    }
    s.push_str(&format!("{} agent(s)\n", rows.len()));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_and_fill_missing() {
        let stat = json!([{"agent_info": {"agent_id": "a1", "hostname": "h", "agent_addr": "1.2.3.4:5",
            "version": "0.1.0", "platform": "debian", "platform_version": "12",
            "last_heartbeat_time": 95}, "plugins_info": [{"name": "p1"}, {"name": "p2"}]},
            {"agent_info": {"agent_id": "longer-id"}, "plugins_info": []}]);
        let t = list_table(&stat, 100);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("AGENT ID   HOSTNAME"), "{t}");
        assert!(
            lines[1].contains("debian 12")
                && lines[1].contains("p1,p2")
                && lines[1].ends_with("5s ago"),
            "{t}"
        );
        assert!(lines[2].starts_with("longer-id  -"), "{t}");
        assert_eq!(lines[3], "2 agent(s) connected");
        let s = stat_text(stat.as_array().unwrap(), 100);
        assert!(s.contains("  PLUGIN") && s.contains("  p2"), "{s}");
        assert!(s.contains("no plugins"), "{s}");
    }

    #[test]
    fn envelope_errors_name_the_route() {
        let e = envelope(
            "/command/",
            200,
            json!({"code": 3, "msg": "some errors occurred", "data": "agentID not found"}),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/command/: code 3 (some errors occurred): agentID not found"
        );
        assert_eq!(
            envelope("/x", 200, json!({"code": 0, "data": 5})).unwrap(),
            json!(5)
        );
        assert!(envelope("/x", 404, json!("nope")).is_err());
    }

    #[tokio::test]
    async fn shutdown_task_needs_yes_and_bad_files_are_usage_errors() {
        let dir = tempfile::tempdir().unwrap();
        let parse = |args: &[&str]| {
            let mut v = vec!["ctl", "--data-dir", dir.path().to_str().unwrap()];
            v.extend_from_slice(args);
            CtlCli::try_parse_from(v).unwrap()
        };
        let mut out = Vec::new();
        let cli = parse(&[
            "task",
            "a1",
            "--plugin",
            "elkeid-agent",
            "--data-type",
            "1060",
        ]);
        let e = run(&cli, &mut out).await.unwrap_err();
        assert!(
            matches!(e, CtlError::Usage(_)) && e.to_string().contains("--yes"),
            "{e}"
        );
        std::fs::write(dir.path().join("c.json"), "[]").unwrap();
        let f = dir.path().join("c.json");
        let cli = parse(&["config", "a1", "--file", f.to_str().unwrap()]);
        let e = run(&cli, &mut out).await.unwrap_err();
        assert!(
            matches!(e, CtlError::Usage(_)) && e.to_string().contains("non-empty"),
            "{e}"
        );
        // No center: the error names the listen file.
        let e = run(&parse(&["list"]), &mut out).await.unwrap_err();
        assert!(e.to_string().contains("listen.json"), "{e}");
        assert!(out.is_empty());
    }
}
