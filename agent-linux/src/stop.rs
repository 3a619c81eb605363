//! The stop signal: why the agent stops (first reason wins). Written by the
//! signal handler, task 1060 and self-update; awaited by the top level.

use std::path::PathBuf;

use tokio::sync::watch;

/// Why the agent stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or task 1060: graceful shutdown, exit 0.
    Terminate,
    /// Self-update installed a new binary: graceful shutdown, then re-exec it.
    Reexec(PathBuf),
}

/// A one-shot stop request shared on the runtime thread.
#[derive(Debug)]
pub(crate) struct StopSignal {
    tx: watch::Sender<Option<Exit>>,
}

impl StopSignal {
    pub(crate) fn new() -> Self {
        StopSignal {
            tx: watch::channel(None).0,
        }
    }

    /// Asks the agent to stop (first reason wins).
    pub(crate) fn stop(&self, why: Exit) {
        self.tx.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// Resolves once a stop was asked.
    pub(crate) async fn stopped(&self) -> Exit {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::Terminate;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn first_reason_wins() {
        let s = StopSignal::new();
        s.stop(Exit::Terminate);
        s.stop(Exit::Reexec("/x".into()));
        assert_eq!(s.stopped().await, Exit::Terminate);
    }
}
