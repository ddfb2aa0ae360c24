//! Kafka plumbing shared by the archiver and the speed aggregation: consumer settings, and a
//! loop that gathers messages into batches (one arena of payload bytes per batch) and hands
//! them to a [`BatchSink`].
//!
//! Offsets are never auto-committed: each sink keeps its offsets with its output and only
//! reports progress to the group after its output is durable. A sink that keeps per-partition
//! state moves it with the group's assignments through a [`Rebalance`] handler: the handler
//! restores an assigned partition and says where its consumption resumes, and saves and drops
//! a revoked one, before the group goes on.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::message::Message as _;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tandem_core::decode::Message;
use tokio_util::sync::CancellationToken;

use crate::error::{Result, SpeedError};
use crate::partition_queues::PartitionQueues;

/// How to reach Kafka.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Prefix of the consumer groups (`<prefix>-archive`, `<prefix>-speed`).
    pub group_prefix: String,
    /// Most messages per batch.
    pub max_batch: usize,
    /// Longest wait to fill a batch.
    pub batch_wait: Duration,
    /// Extra librdkafka settings.
    pub extra: Vec<(String, String)>,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            group_prefix: "tandem".into(),
            max_batch: 10_000,
            batch_wait: Duration::from_millis(50),
            extra: Vec::new(),
        }
    }

    /// A consumer of `group`, auto-commit off, starting from the earliest offset when the group
    /// has none.
    pub fn consumer(&self, group: &str) -> Result<StreamConsumer> {
        Ok(self.client_config(group).create()?)
    }

    /// The settings of a consumer of `group`.
    pub fn client_config(&self, group: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("{}-{group}", self.group_prefix))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            // A crashed member holds its partitions until its session expires: 10 s rather
            // than librdkafka's 45 s, so a restarted process takes them back sooner.
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "10")
            // Once its queue of fetched messages is full, librdkafka waits this long before it
            // fetches again (1 s by default): a consumer that drains the queue in a fifth of
            // that sat idle for the rest, and ran at a seventh of its speed.
            .set("fetch.queue.backoff.ms", "10");
        for (k, v) in &self.extra {
            c.set(k, v);
        }
        c
    }
}

/// What a sink with per-partition state does when the group moves partitions. Called from
/// the consumer's rebalance callback, which waits for the futures: the group goes on only
/// once they are done.
pub trait Rebalance: Send + Sync + std::fmt::Debug {
    /// `partition` is now this consumer's: restore its state; the answer is where consumption
    /// resumes.
    fn assigned(&self, partition: i32) -> BoxFuture<'_, Result<Offset>>;

    /// `partition` is no longer this consumer's (`lost`: taken without a revoke, as after a
    /// session timeout): save what can be saved and drop it.
    fn revoked(&self, partition: i32, lost: bool) -> BoxFuture<'_, ()>;

    /// The partitions just assigned (all of them under the eager protocol; the added ones
    /// under the cooperative one), after each was restored.
    fn assignment(&self, _partitions: &[i32]) {}

    /// From the client's statistics (every second): each assigned partition's high
    /// watermark, and whether any broker is reachable.
    fn watermarks(&self, _high: &[(i32, i64)], _broker_up: bool) {}
}

/// The consumer's context: runs a [`Rebalance`] handler around each assignment change.
pub struct Context {
    topic: String,
    handler: Option<Arc<dyn Rebalance>>,
    runtime: tokio::runtime::Handle,
    /// Partitions assigned whose restore failed: retried at every tick, then sought to.
    pending: Mutex<Vec<i32>>,
    /// The assigned partitions' messages, off the consumer's queue.
    queues: PartitionQueues,
}

impl ClientContext for Context {
    /// Reads only what the speed layer needs from librdkafka's statistics JSON, leniently (a
    /// missing field has its default), rather than all of rdkafka's `Statistics`.
    fn stats_raw(&self, statistics: &[u8]) {
        let Some(h) = &self.handler else {
            return;
        };
        let stats: ClientStats = match serde_json::from_slice(statistics) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "unreadable client statistics");
                return;
            }
        };
        let broker_up = stats
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        let high: Vec<(i32, i64)> = stats
            .topics
            .get(&self.topic)
            .map(|t| {
                t.partitions
                    .values()
                    .filter(|p| p.partition >= 0 && p.desired && p.hi_offset >= 0)
                    .map(|p| (p.partition, p.hi_offset))
                    .collect()
            })
            .unwrap_or_default();
        h.watermarks(&high, broker_up);
    }
}

/// The part of librdkafka's statistics the consumers read.
#[derive(Debug, serde::Deserialize)]
struct ClientStats {
    #[serde(default)]
    brokers: std::collections::HashMap<String, BrokerStats>,
    #[serde(default)]
    topics: std::collections::HashMap<String, TopicStats>,
}

#[derive(Debug, serde::Deserialize)]
struct BrokerStats {
    nodeid: i64,
    state: String,
}

#[derive(Debug, serde::Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: std::collections::HashMap<String, PartitionStats>,
}

#[derive(Debug, serde::Deserialize)]
struct PartitionStats {
    partition: i32,
    #[serde(default)]
    desired: bool,
    #[serde(default = "unknown_offset")]
    hi_offset: i64,
}

fn unknown_offset() -> i64 {
    -1
}

impl Context {
    fn wait<T>(&self, f: BoxFuture<'_, T>) -> T {
        tokio::task::block_in_place(|| self.runtime.block_on(f))
    }
}

impl ConsumerContext for Context {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        let outcome = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(h) = &self.handler {
                    for &p in &partitions {
                        match self.wait(h.assigned(p)) {
                            Ok(offset) => {
                                if let Err(e) = tpl.set_partition_offset(&self.topic, p, offset) {
                                    tracing::warn!(partition = p, error = %e, "cannot set the resume offset");
                                }
                            }
                            Err(e) => {
                                tracing::warn!(partition = p, error = %e, "partition not restored; retrying at the next tick");
                                self.pending.lock().expect("pending lock poisoned").push(p);
                            }
                        }
                    }
                }
                if let Some(h) = &self.handler {
                    h.assignment(&partitions);
                }
                tracing::info!(topic = %self.topic, ?partitions, "partitions assigned");
                // Split before assigning, so no fetched message takes the consumer's queue.
                let client = consumer.client().native_ptr();
                for &p in &partitions {
                    if !self.queues.split(client, p) {
                        tracing::debug!(
                            partition = p,
                            "partition not split off the consumer's queue"
                        );
                    }
                }
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let lost = consumer.assignment_lost();
                if let Some(h) = &self.handler {
                    self.pending
                        .lock()
                        .expect("pending lock poisoned")
                        .retain(|p| !partitions.contains(p));
                    for &p in &partitions {
                        self.wait(h.revoked(p, lost));
                    }
                }
                tracing::info!(topic = %self.topic, ?partitions, lost, "partitions revoked");
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                // After the unassignment: what the queues still hold is outdated now, and
                // librdkafka drops it from the consumer's queue.
                let client = consumer.client().native_ptr();
                if cooperative {
                    self.queues.unsplit(client, &partitions);
                } else {
                    self.queues.unsplit_all(client);
                }
                r
            }
            other => {
                tracing::warn!(error = ?other, "rebalance failed");
                let r = consumer.unassign();
                self.queues.unsplit_all(consumer.client().native_ptr());
                r
            }
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "applying the new assignment failed");
        }
    }
}

/// Messages gathered from one or more polls; payloads live in one buffer.
#[derive(Debug, Default)]
pub struct MessageBatch {
    buf: Vec<u8>,
    items: Vec<Item>,
}

#[derive(Debug, Clone)]
struct Item {
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    payload: Option<Range<usize>>,
}

impl MessageBatch {
    pub fn push(
        &mut self,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
        payload: Option<&[u8]>,
    ) {
        let payload = payload.map(|p| {
            let start = self.buf.len();
            self.buf.extend_from_slice(p);
            start..self.buf.len()
        });
        self.items.push(Item {
            partition,
            offset,
            timestamp_ms,
            payload,
        });
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.items.clear();
    }

    /// The messages of each partition, in offset order.
    pub fn by_partition(&self) -> BTreeMap<i32, Vec<Message<'_>>> {
        let mut out: BTreeMap<i32, Vec<Message<'_>>> = BTreeMap::new();
        for it in &self.items {
            out.entry(it.partition).or_default().push(Message {
                payload: it.payload.clone().map(|r| &self.buf[r]),
                partition: it.partition,
                offset: it.offset,
                timestamp_ms: it.timestamp_ms,
            });
        }
        out
    }
}

/// What a consumer loop feeds.
#[allow(async_fn_in_trait)]
pub trait BatchSink {
    /// Takes one batch. Returns offsets (partition, next offset) that are now durable and may
    /// be reported to the group.
    async fn handle(&mut self, batch: &MessageBatch) -> Result<Vec<(i32, i64)>>;

    /// Called on every tick and at shutdown (`final_flush`): write out what is pending.
    async fn flush(&mut self, final_flush: bool) -> Result<Vec<(i32, i64)>>;

    /// The handler that moves the sink's state with the group's assignments, if it keeps any.
    fn rebalance(&self) -> Option<Arc<dyn Rebalance>> {
        None
    }
}

/// Consumes `topic` as `group` into `sink` until `shutdown`; then flushes the sink once more.
/// Broker errors are logged and retried; a sink error stops the loop.
pub async fn run<S: BatchSink>(
    config: &KafkaConfig,
    group: &str,
    topic: &str,
    sink: &mut S,
    tick: Duration,
    shutdown: CancellationToken,
) -> Result<()> {
    let handler = sink.rebalance();
    let runtime = tokio::runtime::Handle::current();
    if handler.is_some() && runtime.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
        return Err(SpeedError::Runtime(
            "a consumer that restores state on rebalance needs tokio's multi-thread runtime".into(),
        ));
    }
    let context = Context {
        topic: topic.to_string(),
        handler,
        runtime,
        pending: Mutex::new(Vec::new()),
        queues: PartitionQueues::new(topic),
    };
    let mut client = config.client_config(group);
    if context.handler.is_some()
        && !config
            .extra
            .iter()
            .any(|(k, _)| k == "statistics.interval.ms")
    {
        client.set("statistics.interval.ms", "1000");
    }
    let consumer: StreamConsumer<Context> = client.create_with_context(context)?;
    let consumer = Unsplit(consumer);
    consumer.subscribe(&[topic])?;
    let queues = &consumer.context().queues;
    let mut batch = MessageBatch::default();
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // `recv` comes before the split queues' wake-up: polling it serves the group's events
        // (rebalances among them), which a busy stream of messages must not starve.
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                retry_pending(&consumer, topic).await;
                let done = sink.flush(false).await?;
                report(&consumer, topic, &done, CommitMode::Async);
            }
            first = consumer.recv() => {
                match first {
                    Ok(m) => batch.push(m.partition(), m.offset(), m.timestamp().to_millis(), m.payload()),
                    Err(e) => {
                        tracing::warn!(group, topic, error = %e, "kafka receive failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
                let deadline = tokio::time::Instant::now() + config.batch_wait;
                while batch.len() < config.max_batch {
                    // A message already fetched is taken without arming a timer (one per
                    // message otherwise); the wait for the next one is bounded by the deadline.
                    let next = match consumer.recv().now_or_never() {
                        Some(r) => Ok(r),
                        None => tokio::time::timeout_at(deadline, consumer.recv()).await,
                    };
                    match next {
                        Ok(Ok(m)) => batch.push(m.partition(), m.offset(), m.timestamp().to_millis(), m.payload()),
                        Ok(Err(e)) => {
                            tracing::warn!(group, topic, error = %e, "kafka receive failed");
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let done = sink.handle(&batch).await?;
                report(&consumer, topic, &done, CommitMode::Async);
                batch.clear();
            }
            _ = queues.notify().notified() => {
                let deadline = tokio::time::Instant::now() + config.batch_wait;
                let mut more = false;
                loop {
                    let room = config.max_batch.saturating_sub(batch.len());
                    if queues.drain(&mut batch, room) || batch.len() >= config.max_batch {
                        more = true;
                        break;
                    }
                    if batch.is_empty()
                        || tokio::time::timeout_at(deadline, queues.notify().notified()).await.is_err()
                    {
                        break;
                    }
                }
                if batch.is_empty() {
                    continue;
                }
                let done = sink.handle(&batch).await?;
                report(&consumer, topic, &done, CommitMode::Async);
                batch.clear();
                if more {
                    // The queues hold more, and will not wake the loop until they are empty.
                    queues.notify().notify_one();
                }
            }
        }
    }
    let done = sink.flush(true).await?;
    report(&consumer, topic, &done, CommitMode::Sync);
    Ok(())
}

/// The loop's consumer: hands the split partitions back to the consumer's queue before the
/// consumer goes (their handles must not outlive the client).
struct Unsplit(StreamConsumer<Context>);

impl std::ops::Deref for Unsplit {
    type Target = StreamConsumer<Context>;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Unsplit {
    fn drop(&mut self) {
        self.0
            .context()
            .queues
            .unsplit_all(self.0.client().native_ptr());
    }
}

/// Restores the partitions whose restore failed at assignment, and resumes each where its
/// state says.
async fn retry_pending(consumer: &StreamConsumer<Context>, topic: &str) {
    let ctx = consumer.context();
    let (Some(handler), pending) = (
        &ctx.handler,
        ctx.pending.lock().expect("pending lock poisoned").clone(),
    ) else {
        return;
    };
    for p in pending {
        match handler.assigned(p).await {
            Ok(offset) => {
                if let Err(e) = consumer.seek(topic, p, offset, Duration::from_secs(10)) {
                    tracing::warn!(partition = p, error = %e, "restored, but cannot seek; retrying");
                    continue;
                }
                tracing::info!(partition = p, "partition restored after a retry");
                ctx.pending
                    .lock()
                    .expect("pending lock poisoned")
                    .retain(|&q| q != p);
            }
            Err(e) => tracing::warn!(partition = p, error = %e, "partition still not restored"),
        }
    }
}

/// Reports durable progress to the group. Failures only delay the report: the sink's own
/// stored offsets decide where consumption resumes.
fn report(consumer: &StreamConsumer<Context>, topic: &str, done: &[(i32, i64)], mode: CommitMode) {
    if done.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for &(p, next) in done {
        if let Err(e) = tpl.add_partition_offset(topic, p, Offset::Offset(next)) {
            tracing::warn!(partition = p, error = %e, "cannot report progress");
        }
    }
    if let Err(e) = consumer.commit(&tpl, mode) {
        tracing::debug!(error = %e, "progress report failed; it will be sent again");
    }
}
