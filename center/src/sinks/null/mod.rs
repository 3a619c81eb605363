//! The null sink: counts and discards (benchmarks: `--sink null`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{PacketBatch, Sink, SinkFuture};

/// Discards every batch, counting records.
#[derive(Debug, Default)]
pub(crate) struct NullSink {
    records: AtomicU64,
}

impl Sink for NullSink {
    fn name(&self) -> &'static str {
        "null"
    }

    fn send<'a>(&'a self, batch: &'a Arc<PacketBatch>) -> SinkFuture<'a> {
        self.records
            .fetch_add(batch.records.len() as u64, Ordering::Relaxed);
        Box::pin(std::future::ready(Ok(())))
    }

    fn flush(&self) -> SinkFuture<'_> {
        tracing::info!(
            records = self.records.load(Ordering::Relaxed),
            "null sink discarded records"
        );
        Box::pin(std::future::ready(Ok(())))
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("discarded", self.records.load(Ordering::Relaxed))]
    }
}
