//! One command that shows the whole flow on this machine, over real mutual
//! TLS, with the real binaries:
//!
//! ```text
//! cargo build && target/debug/quickstart
//! ```
//!
//! (one build of every binary, then this program; `cargo run -p elkeid-tests
//! --bin quickstart` also works and builds what is missing first.)
//!
//! It starts `elkeid-center --data-dir ./elkeid-data` (first start generates
//! the development PKI and API key), serves the example plugin over HTTP on
//! loopback and lists it in `elkeid-data/components.json` (the center's local
//! manager pushes it to every agent), starts `elkeid-agent` with its work dir
//! in `elkeid-data/agent`, then shows, with the operator commands: the agent
//! list, a task round trip through the plugin, and the records (1000 agent
//! heartbeat, 1001 plugin heartbeat, plugin records, the task echo) and where
//! they are. Then it keeps running until Ctrl-C or SIGTERM, which stop the
//! agent (it stops its plugin) and then the center (it flushes its sinks),
//! each with SIGTERM, waiting for them to exit.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use elkeid_tests::center::ndjson_records_in;
use elkeid_tests::plugin::{FileServer, component, sha256_hex};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::os::unix::process::CommandExt;

/// The plugin the quickstart installs.
const PLUGIN: &str = "example";

/// Starts a center, an agent and the example plugin and shows the flow.
#[derive(Debug, Parser)]
#[command(name = "quickstart")]
struct Args {
    /// The center's data dir (the agent's work dir is DIR/agent).
    #[arg(long, env = "ELKEID_DATA", default_value = "elkeid-data")]
    data_dir: PathBuf,
    /// The center's gRPC address.
    #[arg(long, default_value = "127.0.0.1:6751")]
    grpc_addr: String,
    /// The center's HTTP API address.
    #[arg(long, default_value = "127.0.0.1:6752")]
    http_addr: String,
    /// Agent heartbeat interval, seconds (1000 and 1001 records).
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u32,
    /// Stop (cleanly) after the demo instead of running until Ctrl-C.
    #[arg(long)]
    exit_after_demo: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("quickstart: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut procs = Procs::default();
    let r = rt.block_on(run(&args, &mut procs));
    // Agent first (it stops its plugin), then the center (it flushes).
    procs.stop_all();
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args, procs: &mut Procs) -> Result<(), String> {
    let started = elkeid_tests::center::unix_now();
    let bins = binaries()?;
    let data = &args.data_dir;
    std::fs::create_dir_all(data).map_err(|e| format!("{}: {e}", data.display()))?;
    let ctl = |sub: &[&str]| {
        let mut c = Command::new(bins.join("elkeid-center"));
        c.arg("ctl").arg("--data-dir").arg(data).args(sub);
        c
    };

    // The example plugin, served on loopback, listed for the local manager.
    let plugin = std::fs::read(bins.join("elkeid-example-plugin"))
        .map_err(|e| format!("read elkeid-example-plugin: {e}"))?;
    let sum = sha256_hex(&plugin);
    let files = FileServer::start();
    let url = files.put("/elkeid-example-plugin", plugin);
    let components = data.join("components.json");
    let list = json!({"default": [component(PLUGIN, "1.0.0", "bin", &sum, &sum, &[url], "interval=2000")]});
    std::fs::write(&components, format!("{list}\n"))
        .map_err(|e| format!("{}: {e}", components.display()))?;

    let listen = data.join("listen.json");
    let _ = std::fs::remove_file(&listen);
    let center_log = data.join("center.log");
    println!(
        "quickstart: starting elkeid-center (data dir {}, log {})",
        data.display(),
        center_log.display()
    );
    let mut center_cmd = Command::new(bins.join("elkeid-center"));
    center_cmd.arg("--data-dir").arg(data).args([
        "--grpc-addr",
        &args.grpc_addr,
        "--http-addr",
        &args.http_addr,
        // HTTPS API with the generated server certificate whatever the
        // center's default: the README's raw curl recipe expects it.
        "--http-tls",
        "true",
    ]);
    procs.center = Some(spawn("elkeid-center", &mut center_cmd, &center_log)?);
    let http = wait(Duration::from_secs(30), procs, || {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&listen).ok()?).ok()?;
        v["http"].as_str().map(str::to_string)
    })
    .await?
    .ok_or("the center wrote no listen.json within 30 s (see its log)")?;

    // Absolute paths for the agent: it starts plugins from their own
    // directory, where a relative work dir no longer resolves.
    let abs = std::path::absolute(data).map_err(|e| format!("{}: {e}", data.display()))?;
    let pki = abs.join("pki");
    let work = abs.join("agent");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let grpc = std::fs::read_to_string(&listen)
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok())
        .and_then(|v| v["grpc"].as_str().map(str::to_string))
        .ok_or("listen.json has no grpc address")?;
    let agent_log = data.join("agent.log");
    println!(
        "quickstart: starting elkeid-agent (work dir {}, log {})",
        work.display(),
        agent_log.display()
    );
    let mut agent_cmd = Command::new(bins.join("elkeid-agent"));
    agent_cmd
        .arg("--work-dir")
        .arg(&work)
        .args(["--server", &loopback(&grpc), "--foreground"])
        .args(["--heartbeat-secs", &args.heartbeat_secs.to_string()])
        .arg("--ca")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("client.crt"))
        .arg("--key")
        .arg(pki.join("client.key"));
    procs.agent = Some(spawn("elkeid-agent", &mut agent_cmd, &agent_log)?);

    // 1. The agent list, from the operator command.
    let t0 = Instant::now();
    let agent_id = wait(Duration::from_secs(30), procs, || {
        let o = ctl(&["--json", "list"]).output().ok()?;
        let v: Value = serde_json::from_slice(&o.stdout).ok()?;
        v.as_array()?.first()?.as_str().map(str::to_string)
    })
    .await?
    .ok_or("the agent did not connect within 30 s (see the logs)")?;
    // As the user would type it from here (relative when under the cwd).
    let exe = bins.join("elkeid-center");
    let exe = std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or(exe);
    let shown = format!("{} ctl --data-dir {}", exe.display(), data.display());
    println!("\n$ {shown} list");
    show(ctl(&["list"]))?;

    // 2. The plugin's records, then a task round trip through it.
    // Only this run's records (the data dir may hold earlier runs').
    let this_run = |r: &Value| {
        r["agent_id"] == agent_id.as_str() && r["svr_time"].as_i64().is_some_and(|t| t >= started)
    };
    let records = |dt: i64| -> Vec<Value> {
        ndjson_records_in(data)
            .into_iter()
            .filter(|r| this_run(r) && r["data_type"] == dt)
            .collect()
    };
    println!("\nquickstart: waiting for the agent to install and start plugin `{PLUGIN}`…");
    wait(Duration::from_secs(60), procs, || {
        (!records(8000).is_empty()).then_some(())
    })
    .await?
    .ok_or("no plugin records within 60 s (see the agent log and elkeid-data/agent/plugin/)")?;
    let token = format!("quickstart-{}", elkeid_tests::center::unix_now());
    let task = [
        "task",
        agent_id.as_str(),
        "--plugin",
        PLUGIN,
        "--data-type",
        "8001",
        "--data",
        "hello from the quickstart",
        "--token",
        token.as_str(),
    ];
    println!(
        "\n$ {shown} task {agent_id} --plugin {PLUGIN} --data-type 8001 --data 'hello from the quickstart' --token {token}"
    );
    show(ctl(&task))?;
    let echo = wait(Duration::from_secs(30), procs, || {
        records(6000)
            .into_iter()
            .find(|r| r["fields"]["token"] == token.as_str())
    })
    .await?
    .ok_or("the plugin's task echo did not arrive within 30 s")?;
    println!(
        "quickstart: the plugin answered (data_type 6000): {}",
        echo["fields"]
    );

    // 3. Every kind of record, and where they are.
    let hb = wait(
        Duration::from_secs(u64::from(args.heartbeat_secs) * 3 + 10),
        procs,
        || {
            records(1001)
                .into_iter()
                .find(|r| r["fields"]["name"] == PLUGIN)
        },
    )
    .await?
    .ok_or("no 1001 plugin heartbeat arrived")?;
    let mut counts = BTreeMap::new();
    for r in ndjson_records_in(data) {
        if this_run(&r) {
            *counts
                .entry(r["data_type"].as_i64().unwrap_or(0))
                .or_insert(0u64) += 1;
        }
    }
    let label = |dt: &i64| match dt {
        1000 => "agent heartbeat",
        1001 => "plugin heartbeat",
        1010 => "agent/plugin log",
        6000 => "task echo",
        8000 => "plugin records",
        _ => "",
    };
    println!(
        "\nquickstart: the whole flow took {:.1} s after start. Records of agent {agent_id} in this run:",
        t0.elapsed().as_secs_f64()
    );
    for (dt, n) in &counts {
        println!("  {dt:>5}  {n:>5}  {}", label(dt));
    }
    println!(
        "  (1001 of plugin `{PLUGIN}`: pid {}, version {})",
        hb["fields"]["pid"].as_str().unwrap_or("?"),
        hb["fields"]["pversion"].as_str().unwrap_or("?")
    );
    println!(
        "\nWhere things are:\n  records        {d}/records/*.ndjson (one JSON object per line)\n  \
         task results   {d}/task-results.ndjson\n  center log     {}\n  agent log      {} \
         (and {}/log/)\n  API            https://{http} (signed; keys in {d}/api-keys.toml, CA {d}/pki/ca.crt)\n  \
         operator cmds  {shown} --help",
        center_log.display(),
        agent_log.display(),
        work.display(),
        d = data.display(),
    );
    if args.exit_after_demo {
        println!("\nquickstart: demo done, stopping.");
        return Ok(());
    }
    println!("\nquickstart: running. Ctrl-C (or SIGTERM) stops the agent, then the center.");
    match wait_signal_or_exit(procs).await {
        Some(name) => Err(format!("{name} exited unexpectedly (see its log)")),
        None => Ok(()),
    }
}

/// The directory of this executable, holding the other binaries; under
/// `cargo run` (CARGO set) they are built (or found fresh) first.
fn binaries() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let dir = exe
        .parent()
        .map(Path::to_path_buf)
        .ok_or("no parent directory for current_exe")?;
    let names = ["elkeid-center", "elkeid-agent", "elkeid-example-plugin"];
    let cargo = std::env::var("CARGO").ok();
    if cargo.is_none() && names.iter().all(|n| dir.join(n).exists()) {
        return Ok(dir);
    }
    let Some(cargo) = cargo else {
        return Err(format!(
            "{} lacks {names:?}: build them first with `cargo build` (then run target/debug/quickstart)",
            dir.display()
        ));
    };
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q", "-p", "elkeid-center", "-p", "elkeid-agent"])
        .args(["-p", "elkeid-core", "--bin", "elkeid-example-plugin"])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"));
    if dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    let st = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !st.success() {
        return Err("cargo build failed".into());
    }
    Ok(dir)
}

/// `0.0.0.0:p` → `127.0.0.1:p` (an address to dial).
fn loopback(addr: &str) -> String {
    match addr.strip_prefix("0.0.0.0:") {
        Some(p) => format!("127.0.0.1:{p}"),
        None => addr.to_string(),
    }
}

/// Starts `cmd` in its own process group (a terminal's Ctrl-C reaches only
/// the quickstart, which then stops the children in order), output to `log`.
fn spawn(name: &'static str, cmd: &mut Command, log: &Path) -> Result<Proc, String> {
    let f = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let f2 = f
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f)
        .stderr(f2)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {name}: {e}"))?;
    Ok(Proc { name, child })
}

/// Runs `cmd`, copying its output; a failure is an error.
fn show(mut cmd: Command) -> Result<(), String> {
    let o = cmd.output().map_err(|e| format!("cannot run ctl: {e}"))?;
    print!("{}", String::from_utf8_lossy(&o.stdout));
    if !o.status.success() {
        return Err(format!(
            "ctl failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(())
}

/// Polls `f` every 250 ms until `Some`, `timeout` (then `None`), a child
/// exit or a signal (both errors).
async fn wait<T>(
    timeout: Duration,
    procs: &mut Procs,
    mut f: impl FnMut() -> Option<T>,
) -> Result<Option<T>, String> {
    let deadline = Instant::now() + timeout;
    let mut signals = Signals::new()?;
    loop {
        if let Some(v) = f() {
            return Ok(Some(v));
        }
        if let Some(name) = procs.exited() {
            return Err(format!("{name} exited unexpectedly (see its log)"));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::select! {
            s = signals.recv() => return Err(format!("interrupted by {s}, stopping")),
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// Waits for SIGINT/SIGTERM (→ `None`) or a child exit (→ its name).
async fn wait_signal_or_exit(procs: &mut Procs) -> Option<&'static str> {
    let Ok(mut signals) = Signals::new() else {
        return Some("signal handler");
    };
    loop {
        if let Some(name) = procs.exited() {
            return Some(name);
        }
        tokio::select! {
            s = signals.recv() => {
                println!("\nquickstart: {s}: stopping the agent, then the center…");
                return None;
            }
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// SIGINT and SIGTERM.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, String> {
        use tokio::signal::unix::{SignalKind, signal};
        let err = |e: std::io::Error| format!("cannot install signal handlers: {e}");
        Ok(Signals {
            int: signal(SignalKind::interrupt()).map_err(err)?,
            term: signal(SignalKind::terminate()).map_err(err)?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    /// SIGTERM, wait up to `grace`, then SIGKILL; reports how it ended.
    fn stop(mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = i32::try_from(self.child.id()).map(Pid::from_raw);
        if let Ok(pid) = pid {
            let _ = kill(pid, Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                println!("quickstart: {} stopped ({st})", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "quickstart: {} did not stop within {grace:?}: SIGKILL",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Procs {
    center: Option<Proc>,
    agent: Option<Proc>,
}

impl Procs {
    fn exited(&mut self) -> Option<&'static str> {
        for p in [&mut self.center, &mut self.agent].into_iter().flatten() {
            if let Ok(Some(_)) = p.child.try_wait() {
                return Some(p.name);
            }
        }
        None
    }

    fn stop_all(&mut self) {
        // The agent gives its plugins 10 s; the center drains and flushes.
        if let Some(a) = self.agent.take() {
            a.stop(Duration::from_secs(20));
        }
        if let Some(c) = self.center.take() {
            c.stop(Duration::from_secs(30));
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop_all();
    }
}
