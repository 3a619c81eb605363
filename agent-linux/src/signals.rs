//! Signals: SIGTERM (and SIGINT in the foreground) -> graceful stop;
//! SIGUSR1 -> toggle debug logging and log a state dump; SIGUSR2 -> release
//! cached memory: the send loop drops its reusable packet buffer and the
//! next heartbeat re-samples; the ring's arena is fixed-size by design and
//! is not released.

use std::rc::Rc;

use tokio::signal::unix::{SignalKind, signal};

use crate::stop::{Exit, StopSignal};

/// Listens for signals until the task is dropped: SIGTERM/SIGINT stop the
/// agent, SIGUSR1 toggles debug logging then calls `on_usr1(debug_on)` (the
/// state dump), SIGUSR2 calls `on_usr2`.
pub(crate) async fn run(stop: Rc<StopSignal>, on_usr1: impl Fn(bool), on_usr2: impl Fn()) {
    let (Ok(mut term), Ok(mut int), Ok(mut usr1), Ok(mut usr2)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::user_defined1()),
        signal(SignalKind::user_defined2()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                stop.stop(Exit::Terminate);
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                stop.stop(Exit::Terminate);
            }
            _ = usr1.recv() => {
                let debug_on = crate::log::toggle_debug();
                on_usr1(debug_on);
            }
            _ = usr2.recv() => {
                on_usr2();
                tracing::info!("SIGUSR2: releasing cached buffers");
            }
        }
    }
}
