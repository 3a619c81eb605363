//! Signals: SIGTERM (and SIGINT in the foreground) -> graceful stop;
//! SIGUSR1 -> toggle debug logging and log a state dump; SIGUSR2 -> release
//! cached memory: the send loop drops its reusable packet buffer and the
//! next heartbeat re-samples; the ring's arena is fixed-size by design and
//! is not released.

use std::rc::Rc;

use tokio::signal::unix::{SignalKind, signal};

use crate::state::{Agent, Exit};

/// Listens for signals until the task is dropped.
pub(crate) async fn run(agent: Rc<Agent>) {
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
                agent.stop(Exit::Terminate);
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                agent.stop(Exit::Terminate);
            }
            _ = usr1.recv() => {
                let debug_on = crate::log::toggle_debug();
                dump(&agent, debug_on);
            }
            _ = usr2.recv() => {
                agent.release_memory.set(true);
                tracing::info!("SIGUSR2: releasing cached buffers");
            }
        }
    }
}

/// Logs the internal state (SIGUSR1).
fn dump(agent: &Agent, debug_on: bool) {
    let plugins = agent.plugins.names();
    tracing::info!(
        debug_logging = debug_on,
        agent_id = %agent.id,
        net_mode = agent.net_mode.get(),
        connected = agent.channel.borrow().is_some(),
        ring_len = agent.buffer.len(),
        ring_bytes = agent.buffer.bytes(),
        drop_cnt = agent.buffer.drops(),
        log_drops = crate::log::pending_drops(),
        tx_records = agent.tx_records.get(),
        rx_commands = agent.rx_commands.get(),
        reconnects = agent.reconnects.get(),
        upload_busy = agent.upload_busy.get(),
        abnormal = ?agent.abnormal.borrow(),
        plugins = ?plugins,
        "state dump"
    );
}
