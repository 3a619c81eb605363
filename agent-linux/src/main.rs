//! `elkeid-agent` binary: parse configuration (exit 64 naming the bad key),
//! set up logging, build the single-threaded runtime and run the agent.

use std::process::ExitCode;

use elkeid_agent::config::{self, Command};

fn main() -> ExitCode {
    // `elkeid-agent status …`: report on the running agent (status.rs).
    if std::env::args().nth(1).as_deref() == Some("status") {
        return elkeid_agent::status::main(std::env::args().skip(2).collect());
    }
    let cmd = match config::parse(std::env::args().skip(1), |k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("elkeid-agent: {e}");
            return ExitCode::from(64);
        }
    };
    let cfg = match cmd {
        Command::Version => {
            println!("{} {}", config::PRODUCT, config::VERSION);
            return ExitCode::SUCCESS;
        }
        Command::Help => {
            print!("{}", config::USAGE);
            return ExitCode::SUCCESS;
        }
        Command::Run(c) => *c,
        Command::Probe(c) => return probe(&c),
    };
    // A pending self-update first (a new binary on trial counts this start,
    // and is rolled back here after too many starts or past its deadline).
    let update = elkeid_agent::update_start_check(&cfg);
    if let Some(exe) = update.reexec() {
        use std::os::unix::process::CommandExt;
        eprintln!(
            "elkeid-agent: self-update rolled back; starting the previous binary {}",
            exe.display()
        );
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .exec();
        eprintln!("elkeid-agent: exec {} failed: {err}", exe.display());
        return ExitCode::from(1);
    }
    // Validate everything before the first directory or log file exists.
    let mut pre = match elkeid_agent::preflight(&cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("elkeid-agent: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if let Err(e) = std::fs::create_dir_all(&cfg.work_dir) {
        eprintln!(
            "elkeid-agent: invalid value for work_dir: {}: {e}",
            cfg.work_dir.display()
        );
        return ExitCode::from(64);
    }
    if let Err(e) = elkeid_agent::log::init(
        &cfg.work_dir,
        cfg.log_level,
        cfg.log_max_bytes,
        cfg.foreground,
    ) {
        eprintln!("elkeid-agent: {e}");
        return ExitCode::from(64);
    }
    update.log_notes();
    pre.set_update(update);
    let work_dir = cfg.work_dir.clone();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(cfg.workers)
        .thread_keep_alive(std::time::Duration::from_secs(10))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("elkeid-agent: cannot build runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    let r = local.block_on(&rt, elkeid_agent::run(cfg, pre));
    drop(local);
    drop(rt);
    elkeid_agent::log::flush();
    match r {
        Ok(elkeid_agent::Exit::Terminate) => ExitCode::SUCCESS,
        Ok(elkeid_agent::Exit::Reexec(path)) => {
            use std::os::unix::process::CommandExt;
            let err = std::process::Command::new(&path)
                .args(std::env::args_os().skip(1))
                .exec();
            eprintln!("elkeid-agent: re-exec {} failed: {err}", path.display());
            let reason = format!("re-exec of the new binary failed: {err}");
            if let Ok(true) = elkeid_agent::restore_old_binary(&work_dir, &path, &reason) {
                let err = std::process::Command::new(&path)
                    .args(std::env::args_os().skip(1))
                    .exec();
                eprintln!("elkeid-agent: re-exec of the restored binary failed: {err}");
            }
            ExitCode::from(1)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            elkeid_agent::log::flush();
            eprintln!("elkeid-agent: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `--probe-connect`: exit 0 when a center answers TLS + HTTP/2, 1 otherwise.
fn probe(cfg: &config::Config) -> ExitCode {
    let pre = match elkeid_agent::preflight(cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("elkeid-agent: {e}");
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("elkeid-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    match local.block_on(&rt, elkeid_agent::probe(cfg, &pre)) {
        Ok(addr) => {
            println!("elkeid-agent: connected to {addr}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("elkeid-agent: probe failed: {e}");
            ExitCode::from(1)
        }
    }
}
