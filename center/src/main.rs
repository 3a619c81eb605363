//! `elkeid-center` binary: configuration, logging, runtime, signals.
#![deny(unsafe_code)]

use std::process::ExitCode;

use std::io::IsTerminal;

use elkeid_center::{Cli, Config, RunError};

/// `EX_USAGE`: bad configuration.
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    // `elkeid-center pki issue-agent …`: per-agent client certificates.
    if std::env::args_os().nth(1).is_some_and(|a| a == "pki") {
        let args: Vec<String> = std::env::args_os()
            .skip(2)
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        return ExitCode::from(elkeid_center::pki_command(&args));
    }
    // `elkeid-center ctl …`: the operator commands (their own command line).
    if std::env::args_os().nth(1).is_some_and(|a| a == "ctl") {
        return elkeid_center::ctl::main(std::env::args_os().skip(1));
    }
    let cli = match Cli::parse_args() {
        Ok(c) => c,
        Err(e) if e.kind() == clap::error::ErrorKind::ValueValidation => {
            // A value refused by its typed parser: the same words as every
            // other configuration error (see `Cli::parse_args_from`).
            let text = e.to_string();
            let text = text.strip_prefix("error: ").unwrap_or(&text);
            eprintln!("elkeid-center: {}", text.trim_end());
            return ExitCode::from(EXIT_CONFIG);
        }
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp => {
                    println!(
                        "\nOperator commands (list agents, send tasks and configs, reset \
                         connections): elkeid-center ctl --help"
                    );
                    ExitCode::SUCCESS
                }
                clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_CONFIG),
            };
        }
    };
    let config = match Config::load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("elkeid-center: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&config.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "elkeid-center: {}",
                config.origins.invalid("log_level", e.to_string())
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes into pipes, files or the journal.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Before any thread: packet memory is reused, not re-faulted (heap.rs).
    let _ = elkeid_center::heap::tune();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("elkeid-center")
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("elkeid-center: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The handlers are installed now, before `run` binds and writes
    // `listen.json`: a SIGTERM sent as soon as that file exists (by a
    // service manager or a test) stops the center gracefully instead of
    // killing it with the default action.
    let shutdown = {
        let _in_runtime = runtime.enter();
        shutdown_signal()
    };
    match runtime.block_on(elkeid_center::run(config, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("elkeid-center: {e}");
            match e {
                RunError::Config(_) => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// Installs the SIGTERM and SIGINT handlers at once (call it inside the
/// runtime); the returned future resolves on either signal.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                    one.recv().await;
                }
                (Err(e), Err(_)) => {
                    tracing::warn!(error = %e, "no signal handlers: stop with SIGKILL");
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
