//! [`KafkaSink`]: the bounded in-flight queue and the producer task.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rskafka::BackoffConfig;
use rskafka::client::partition::{Compression, PartitionClient, UnknownTopicHandling};
use rskafka::client::{Client, ClientBuilder, Credentials, SaslConfig};
use rskafka::record::Record;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::time::Instant;

use super::config::{KafkaConfig, OverflowPolicy};
use super::encode::{encode_batch, partition_for};
use crate::ack::Ticket;
use crate::sinks::{PacketBatch, Sink, SinkError, SinkFuture};

/// Record headers carrying the record identity (acknowledged delivery),
/// decimal ASCII; the `MQData` value is unchanged.
pub(crate) const HEADER_EPOCH: &str = "elkeid-agent-epoch";
/// See [`HEADER_EPOCH`].
pub(crate) const HEADER_SEQ: &str = "elkeid-agent-seq";
/// See [`HEADER_EPOCH`].
pub(crate) const HEADER_IDX: &str = "elkeid-record-idx";

const NAME: &str = "kafka";

/// Counters of the Kafka sink (exported as metrics by the center).
#[derive(Debug, Default)]
pub(crate) struct KafkaStats {
    /// Records accepted into the in-flight queue.
    pub(crate) accepted: AtomicU64,
    /// Records acknowledged by Kafka.
    pub(crate) delivered: AtomicU64,
    /// Records dropped under `overflow = drop` (queue full, or a produce
    /// that failed).
    pub(crate) dropped: AtomicU64,
    /// Records whose `MQData` exceeded `max_message_bytes` (never sendable).
    pub(crate) oversized: AtomicU64,
    /// Failed produce attempts (each retried under `overflow = block`).
    pub(crate) produce_errors: AtomicU64,
    /// Records accepted and not yet acknowledged or dropped.
    pub(crate) pending: AtomicU64,
    /// Produce requests Kafka acknowledged (one per partition batch).
    pub(crate) produced_batches: AtomicU64,
}

/// Records of one packet, bound for one partition, holding their share of
/// the in-flight budget until Kafka acknowledges them.
struct Job {
    partition: usize,
    records: Vec<Record>,
    permit: Option<OwnedSemaphorePermit>,
    /// Released when Kafka acknowledged the records (acks=all).
    ticket: Option<Ticket>,
}

enum Msg {
    Records(Job),
    Flush(oneshot::Sender<()>),
}

/// The Kafka sink: one `MQData` message per record, key = agent id.
///
/// `send` encodes the packet's records, takes their size from a byte budget
/// (`queue_bytes`) and hands them to a producer task that batches per
/// partition (`linger_ms`, `batch_bytes`) and produces with the configured
/// compression. The budget is returned only when Kafka acknowledges, so a
/// slow or absent broker makes `send` wait: back-pressure onto the agent's
/// stream (`overflow = block`, the default), or an immediate, counted drop
/// (`overflow = drop`).
#[derive(Debug)]
pub(crate) struct KafkaSink {
    tx: mpsc::UnboundedSender<Msg>,
    budget: Arc<Semaphore>,
    queue_bytes: usize,
    overflow: OverflowPolicy,
    max_message_bytes: usize,
    partitions: i32,
    flush_timeout: Duration,
    stats: Arc<KafkaStats>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Records(j) => write!(
                f,
                "Records(partition {}, {} records)",
                j.partition,
                j.records.len()
            ),
            Msg::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl KafkaSink {
    /// Connects to the cluster, creates the topic if asked to and missing,
    /// opens a client per partition and starts the producer task (on the
    /// current tokio runtime).
    pub(crate) async fn connect(cfg: KafkaConfig) -> Result<KafkaSink, SinkError> {
        cfg.validate().map_err(|e| other(e.to_string()))?;
        let timeout = cfg.request_timeout();
        let mut builder = ClientBuilder::new(cfg.brokers.clone())
            .client_id(cfg.client_id.as_str())
            .backoff_config(BackoffConfig {
                deadline: Some(timeout),
                ..BackoffConfig::default()
            });
        if cfg.sasl.enable {
            builder = builder.sasl_config(SaslConfig::Plain(Credentials::new(
                cfg.sasl.username.clone(),
                cfg.sasl.password.clone(),
            )));
        }
        let client = tokio::time::timeout(timeout, builder.build())
            .await
            .map_err(|_| other(format!("connecting to {:?} timed out", cfg.brokers)))?
            .map_err(|e| other(format!("connecting to {:?}: {e}", cfg.brokers)))?;
        let partitions = topic_partitions(&client, &cfg).await?;
        let mut clients = Vec::with_capacity(partitions.len());
        for p in partitions {
            let pc = client
                .partition_client(cfg.topic.as_str(), p, UnknownTopicHandling::Retry)
                .await
                .map_err(|e| other(format!("topic {} partition {p}: {e}", cfg.topic)))?;
            clients.push(Arc::new(pc));
        }
        let n = i32::try_from(clients.len()).map_err(|_| other("too many partitions".into()))?;
        let stats = Arc::new(KafkaStats::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(Semaphore::new(cfg.queue_bytes));
        let worker = Worker {
            rx,
            clients,
            compression: cfg.compression.to_rskafka(),
            linger: cfg.linger(),
            batch_bytes: cfg.batch_bytes,
            request_timeout: timeout,
            overflow: cfg.overflow,
            stats: Arc::clone(&stats),
        };
        tokio::spawn(worker.run());
        tracing::info!(brokers = ?cfg.brokers, topic = %cfg.topic, partitions = n,
            compression = ?cfg.compression, overflow = ?cfg.overflow, "kafka sink connected");
        Ok(KafkaSink {
            tx,
            budget,
            queue_bytes: cfg.queue_bytes,
            overflow: cfg.overflow,
            max_message_bytes: cfg.max_message_bytes,
            partitions: n,
            flush_timeout: cfg.flush_timeout(),
            stats,
        })
    }

    /// The sink's counters.
    #[cfg(test)]
    pub(crate) fn stats(&self) -> &Arc<KafkaStats> {
        &self.stats
    }

    /// Bytes accepted and not yet acknowledged by Kafka (the sink's lag).
    pub(crate) fn in_flight_bytes(&self) -> usize {
        self.queue_bytes
            .saturating_sub(self.budget.available_permits())
    }

    async fn send_batch(&self, batch: &PacketBatch) -> Result<(), SinkError> {
        if batch.records.is_empty() {
            return Ok(());
        }
        let key = batch.agent_id.as_bytes();
        let partition = partition_for(key, self.partitions);
        let timestamp = DateTime::<Utc>::from_timestamp(batch.svr_time, 0).unwrap_or_default();
        let mut bytes = 0usize;
        let mut records = Vec::with_capacity(batch.records.len());
        for (idx, value) in encode_batch(batch).into_iter().enumerate() {
            if value.len() > self.max_message_bytes {
                self.stats.oversized.fetch_add(1, Ordering::Relaxed);
                tracing::error!(agent_id = %batch.agent_id, size = value.len(),
                    max = self.max_message_bytes, "kafka: record larger than max_message_bytes not sent");
                continue;
            }
            bytes += key.len() + value.len();
            let mut headers = BTreeMap::new();
            if let Some(id) = batch.id {
                headers.insert(HEADER_EPOCH.to_string(), id.epoch.to_string().into_bytes());
                headers.insert(HEADER_SEQ.to_string(), id.seq.to_string().into_bytes());
                headers.insert(HEADER_IDX.to_string(), idx.to_string().into_bytes());
                bytes += 64;
            }
            records.push(Record {
                key: Some(key.to_vec()),
                value: Some(value),
                headers,
                timestamp,
            });
        }
        if records.is_empty() {
            return Ok(());
        }
        let n = records.len() as u64;
        // A packet bigger than the whole budget takes all of it.
        let want = u32::try_from(bytes.clamp(1, self.queue_bytes)).unwrap_or(u32::MAX);
        let permit = match self.overflow {
            OverflowPolicy::Block => Arc::clone(&self.budget)
                .acquire_many_owned(want)
                .await
                .map_err(|_| SinkError::Closed(NAME))?,
            OverflowPolicy::Drop => match Arc::clone(&self.budget).try_acquire_many_owned(want) {
                Ok(p) => p,
                Err(TryAcquireError::NoPermits) => {
                    self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                    tracing::warn!(agent_id = %batch.agent_id, records = n, "kafka queue full: batch dropped");
                    return Err(SinkError::Dropped(NAME));
                }
                Err(TryAcquireError::Closed) => return Err(SinkError::Closed(NAME)),
            },
        };
        let partition = usize::try_from(partition).unwrap_or(0);
        self.tx
            .send(Msg::Records(Job {
                partition,
                records,
                permit: Some(permit),
                ticket: batch.ticket.clone(),
            }))
            .map_err(|_| SinkError::Closed(NAME))?;
        self.stats.accepted.fetch_add(n, Ordering::Relaxed);
        self.stats.pending.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn flush_all(&self) -> Result<(), SinkError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Msg::Flush(done))
            .map_err(|_| SinkError::Closed(NAME))?;
        match tokio::time::timeout(self.flush_timeout, wait).await {
            Ok(Ok(())) => {
                let s = &self.stats;
                tracing::info!(
                    accepted = s.accepted.load(Ordering::Relaxed),
                    delivered = s.delivered.load(Ordering::Relaxed),
                    dropped = s.dropped.load(Ordering::Relaxed),
                    oversized = s.oversized.load(Ordering::Relaxed),
                    produce_errors = s.produce_errors.load(Ordering::Relaxed),
                    "kafka sink flushed"
                );
                Ok(())
            }
            Ok(Err(_)) => Err(SinkError::Closed(NAME)),
            Err(_) => Err(other(format!(
                "flush timed out after {:?} with {} bytes not acknowledged",
                self.flush_timeout,
                self.in_flight_bytes()
            ))),
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        NAME
    }

    fn send<'a>(&'a self, batch: &'a Arc<PacketBatch>) -> SinkFuture<'a> {
        Box::pin(self.send_batch(batch))
    }

    fn flush(&self) -> SinkFuture<'_> {
        Box::pin(self.flush_all())
    }

    /// Records accepted and not yet acknowledged by Kafka.
    fn lag(&self) -> usize {
        usize::try_from(self.stats.pending.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("accepted", s.accepted.load(Ordering::Relaxed)),
            ("delivered", s.delivered.load(Ordering::Relaxed)),
            ("dropped", s.dropped.load(Ordering::Relaxed)),
            ("oversized", s.oversized.load(Ordering::Relaxed)),
            ("produce_errors", s.produce_errors.load(Ordering::Relaxed)),
        ]
    }
}

fn other(msg: String) -> SinkError {
    SinkError::Other { sink: NAME, msg }
}

/// The topic's partition ids (0..n), creating the topic when configured to.
async fn topic_partitions(client: &Client, cfg: &KafkaConfig) -> Result<Vec<i32>, SinkError> {
    let timeout = cfg.request_timeout();
    let deadline = Instant::now() + timeout;
    let mut created = false;
    loop {
        let topics = client
            .list_topics()
            .await
            .map_err(|e| other(format!("listing topics: {e}")))?;
        if let Some(t) = topics.into_iter().find(|t| t.name == cfg.topic) {
            let ids: Vec<i32> = t.partitions.into_iter().collect();
            let contiguous = ids
                .iter()
                .enumerate()
                .all(|(i, p)| usize::try_from(*p).ok() == Some(i));
            if !ids.is_empty() && contiguous {
                return Ok(ids);
            }
            if !created || Instant::now() >= deadline {
                return Err(other(format!(
                    "topic {} has unusable partitions {ids:?}",
                    cfg.topic
                )));
            }
        } else if !cfg.create_topic {
            return Err(other(format!(
                "topic {} does not exist and kafka.create_topic is false",
                cfg.topic
            )));
        } else if !created {
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            let controller = client
                .controller_client()
                .map_err(|e| other(format!("controller: {e}")))?;
            controller
                .create_topic(
                    cfg.topic.as_str(),
                    cfg.create_partitions,
                    cfg.create_replication,
                    ms,
                )
                .await
                .map_err(|e| other(format!("creating topic {}: {e}", cfg.topic)))?;
            tracing::info!(topic = %cfg.topic, partitions = cfg.create_partitions, "kafka topic created");
            created = true;
        }
        if Instant::now() >= deadline {
            return Err(other(format!(
                "topic {} did not appear after creation",
                cfg.topic
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Records waiting for one partition's next produce request.
#[derive(Default)]
struct PartitionBuf {
    records: Vec<Record>,
    bytes: usize,
    permits: Vec<OwnedSemaphorePermit>,
    tickets: Vec<Ticket>,
    since: Option<Instant>,
}

/// The producer task: batches per partition, produces, retries, and
/// returns budget on acknowledgement.
struct Worker {
    rx: mpsc::UnboundedReceiver<Msg>,
    clients: Vec<Arc<PartitionClient>>,
    compression: Compression,
    linger: Duration,
    batch_bytes: usize,
    request_timeout: Duration,
    overflow: OverflowPolicy,
    stats: Arc<KafkaStats>,
}

impl Worker {
    async fn run(mut self) {
        let mut bufs: Vec<PartitionBuf> = self
            .clients
            .iter()
            .map(|_| PartitionBuf::default())
            .collect();
        loop {
            let due = bufs
                .iter()
                .filter_map(|b| b.since)
                .min()
                .map(|t| t + self.linger);
            let msg = match due {
                Some(at) => tokio::select! {
                    m = self.rx.recv() => Some(m),
                    () = tokio::time::sleep_until(at) => None,
                },
                None => Some(self.rx.recv().await),
            };
            let Some(msg) = msg else {
                let now = Instant::now();
                let linger = self.linger;
                self.produce_where(&mut bufs, |b| b.since.is_some_and(|s| s + linger <= now))
                    .await;
                continue;
            };
            match msg {
                Some(Msg::Records(job)) => self.append(&mut bufs, job).await,
                Some(Msg::Flush(done)) => {
                    self.produce_where(&mut bufs, |b| !b.records.is_empty())
                        .await;
                    let _ = done.send(());
                }
                None => {
                    self.produce_where(&mut bufs, |b| !b.records.is_empty())
                        .await;
                    return;
                }
            }
        }
    }

    async fn append(&self, bufs: &mut [PartitionBuf], job: Job) {
        let Some(idx) = (job.partition < bufs.len()).then_some(job.partition) else {
            return;
        };
        for rec in job.records {
            let size = rec.approximate_size();
            if bufs[idx].bytes + size > self.batch_bytes && !bufs[idx].records.is_empty() {
                let full = std::mem::take(&mut bufs[idx]);
                self.produce(idx, full).await;
            }
            let b = &mut bufs[idx];
            b.since.get_or_insert_with(Instant::now);
            b.bytes += size;
            b.records.push(rec);
        }
        bufs[idx].permits.extend(job.permit);
        bufs[idx].tickets.extend(job.ticket);
        if bufs[idx].bytes >= self.batch_bytes {
            let full = std::mem::take(&mut bufs[idx]);
            self.produce(idx, full).await;
        }
    }

    /// Produces every buffer matching `pick`, partitions concurrently.
    async fn produce_where(&self, bufs: &mut [PartitionBuf], pick: impl Fn(&PartitionBuf) -> bool) {
        let jobs: Vec<_> = bufs
            .iter_mut()
            .enumerate()
            .filter(|(_, b)| pick(b))
            .map(|(i, b)| self.produce(i, std::mem::take(b)))
            .collect();
        futures_util::future::join_all(jobs).await;
    }

    /// Produces one partition's batch. Under `block` it retries until Kafka
    /// takes it (the budget stays held, so senders wait); under `drop` a
    /// failed batch is counted as dropped.
    async fn produce(&self, idx: usize, buf: PartitionBuf) {
        let Some(client) = self.clients.get(idx) else {
            return;
        };
        if buf.records.is_empty() {
            return;
        }
        let n = buf.records.len() as u64;
        let mut backoff = Duration::from_millis(200);
        loop {
            let attempt = tokio::time::timeout(
                self.request_timeout,
                client.produce(buf.records.clone(), self.compression),
            );
            let err = match attempt.await {
                Ok(Ok(_offsets)) => {
                    self.stats.produced_batches.fetch_add(1, Ordering::Relaxed);
                    self.stats.delivered.fetch_add(n, Ordering::Relaxed);
                    self.stats.pending.fetch_sub(n, Ordering::Relaxed);
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.request_timeout),
            };
            self.stats.produce_errors.fetch_add(1, Ordering::Relaxed);
            if self.overflow == OverflowPolicy::Drop {
                for t in &buf.tickets {
                    t.fail();
                }
                self.stats.dropped.fetch_add(n, Ordering::Relaxed);
                self.stats.pending.fetch_sub(n, Ordering::Relaxed);
                tracing::error!(partition = idx, records = n, error = %err, "kafka produce failed: batch dropped");
                break;
            }
            tracing::warn!(partition = idx, records = n, error = %err, retry_in = ?backoff,
                "kafka produce failed: retrying (senders wait)");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        drop(buf.permits);
        // acknowledged by the broker (or failed above): tickets fire
        drop(buf.tickets);
    }
}
