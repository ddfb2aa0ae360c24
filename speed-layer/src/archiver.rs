//! The archiver: Kafka into the master dataset, exactly once.
//!
//! ```text
//!  poll ─► decode ─► pending rows (events + _partition, _offset, dt)   pending rejects
//!                         │  every flush interval or N rows                  │
//!                         │        1. dead-letter commit  ◄──────────────────┘
//!                         │           txn(tandem-dlq-<topic>-<p>) = last offset
//!                         └──────► 2. master commit: rows + txn(tandem-archive-<topic>-<p>)
//!                                     = last offset of the partition in this flush
//!                                  3. report offset+1 to the consumer group (progress only)
//! ```
//!
//! The Delta `txn` versions are the truth: a message at or below the master's version for its
//! partition is already archived (its rejects too), and a reject at or below the dead-letter
//! version is already there. Replays after a crash, a lost commit response or a rebalance are
//! dropped on that rule, so every offset lands in exactly one committed file. Each commit also
//! records the event days it touched (`tandem.days`), so late events mark their day dirty.
//! After each commit, and when it has found nothing new to read, the archiver writes each
//! partition's progress (`archive/progress/<schema>/<partition>.json`: the newest event time
//! committed, when it was last caught up), from which the batch layer tells closed days.
//! Both commits go through core's `MasterWriter`, the one writer `tandem import` uses too.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::TimestampMicrosecondType;
use datafusion::arrow::record_batch::RecordBatch;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tandem_core::decode::{Decoder, Rejected};
use tandem_core::master::{archive_batch, MasterCommit, MasterWriter, PartitionProgress};
use tandem_core::schema::EventSchema;
use tandem_core::storage::Storage;
use tandem_core::time::Clock;

use crate::error::Result;
use crate::kafka::{BatchSink, MessageBatch, Rebalance};

/// When the archiver writes.
#[derive(Debug, Clone, Copy)]
pub struct ArchiverConfig {
    /// Write at least this often while rows are pending: an event's longest wait.
    pub flush_interval: Duration,
    /// Write as soon as the pending rows would make a Parquet file of about this many bytes
    /// (estimated from the bytes per row of the files written so far).
    pub target_file_bytes: u64,
    /// Write as soon as this many rows are pending, whatever their size: the bound on the
    /// archiver's memory.
    pub flush_rows: usize,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        ArchiverConfig {
            flush_interval: Duration::from_secs(2),
            target_file_bytes: 16 << 20,
            flush_rows: 500_000,
        }
    }
}

/// The Parquet bytes per archived row assumed until a file has been written (the reference
/// events take about 65).
const INITIAL_BYTES_PER_ROW: f64 = 64.0;

/// Counters of the archiver.
#[derive(Debug, Default)]
pub struct ArchiverStats {
    pub archived: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub commits: AtomicU64,
    pub skipped_replayed: AtomicU64,
    /// Messages taken in (valid or not), before they are written.
    pub received: AtomicU64,
    /// Offsets never delivered, in gaps wider than a transaction marker: the broker no longer
    /// had them (retention ran ahead of the archiver), or an aborted transaction's.
    pub missed_offsets: AtomicU64,
}

/// The archiver of one event schema.
#[derive(Debug)]
pub struct Archiver {
    topic: String,
    decoder: Decoder,
    writer: MasterWriter,
    /// Last archived offset per partition (master txn), and last dead-lettered (dlq txn).
    archived: BTreeMap<i32, i64>,
    dead_lettered: BTreeMap<i32, i64>,
    /// Rows waiting for the next commit, by partition.
    pending: Vec<(i32, RecordBatch)>,
    /// Partitions the group moved, told by the rebalance handler, applied before the next
    /// batch or commit; and those revoked and not assigned back since.
    moves: Arc<std::sync::Mutex<Moves>>,
    revoked: std::collections::BTreeSet<i32>,
    storage: Storage,
    pending_rows: usize,
    /// Parquet bytes per row of the files written so far (a moving average), which sizes the
    /// next file.
    bytes_per_row: f64,
    pending_rejects: Vec<Rejected>,
    /// Last offset seen per partition in the pending data.
    pending_last: BTreeMap<i32, i64>,
    last_flush: Instant,
    /// The newest event time pending per partition, and committed per partition (with when
    /// the partition was last found caught up), for the progress objects.
    pending_event_max: BTreeMap<i32, i64>,
    progress: BTreeMap<i32, PartitionProgress>,
    progress_store: Arc<dyn ObjectStore>,
    schema_name: String,
    /// Messages received as of the previous flush: none since means caught up.
    received_at_flush: u64,
    last_idle_write: Option<Instant>,
    committed_since_idle: bool,
    config: ArchiverConfig,
    clock: Arc<dyn Clock>,
    pub stats: Arc<ArchiverStats>,
}

impl Archiver {
    /// Opens (creating if needed) the master and dead-letter tables of `schema`.
    pub async fn open(
        storage: Storage,
        schema: Arc<EventSchema>,
        config: ArchiverConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        Ok(Archiver {
            progress_store: storage.objects()?,
            schema_name: schema.name.clone(),
            pending_event_max: BTreeMap::new(),
            progress: BTreeMap::new(),
            received_at_flush: 0,
            last_idle_write: None,
            committed_since_idle: false,
            topic: schema.topic.clone(),
            decoder: Decoder::new(Arc::clone(&schema)),
            writer: MasterWriter::open(storage.clone(), schema).await?,
            archived: BTreeMap::new(),
            dead_lettered: BTreeMap::new(),
            pending: Vec::new(),
            moves: Default::default(),
            revoked: Default::default(),
            storage: storage.clone(),
            pending_rows: 0,
            bytes_per_row: INITIAL_BYTES_PER_ROW,
            pending_rejects: Vec::new(),
            pending_last: BTreeMap::new(),
            last_flush: Instant::now(),
            config,
            clock,
            stats: Arc::new(ArchiverStats::default()),
        })
    }

    /// The Parquet bytes per row the next file is sized by: learnt from the files written.
    pub fn bytes_per_row(&self) -> f64 {
        self.bytes_per_row
    }

    fn master_app_id(&self, partition: i32) -> String {
        format!("tandem-archive-{}-{partition}", self.topic)
    }

    fn dlq_app_id(&self, partition: i32) -> String {
        format!("tandem-dlq-{}-{partition}", self.topic)
    }

    /// The last offset stored with each table for `partition` (-1 if none).
    async fn versions(&mut self, partition: i32) -> Result<(i64, i64)> {
        if !self.archived.contains_key(&partition) {
            let (mv, dv) = self
                .writer
                .txn_versions(&self.master_app_id(partition), &self.dlq_app_id(partition))
                .await?;
            self.archived.insert(partition, mv);
            self.dead_lettered.insert(partition, dv);
        }
        Ok((self.archived[&partition], self.dead_lettered[&partition]))
    }

    /// Writes the progress objects of `partitions` (best effort: a failure only delays the
    /// batch layer's closing of days).
    async fn write_progress(&self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            let Some(progress) = self.progress.get(&p) else {
                continue;
            };
            let bytes = serde_json::to_vec(progress).expect("progress serializes");
            let path = PartitionProgress::path(&self.schema_name, p);
            if let Err(e) = self
                .progress_store
                .put(&path, PutPayload::from(bytes))
                .await
            {
                tracing::warn!(partition = p, error = %e, "writing the archiver's progress failed");
            }
        }
    }

    /// Applies the group's moves: a revoked partition's pending rows and rejects are dropped
    /// (its new owner archives them from the offset the table holds), and what this archiver
    /// knew of a moved partition's stored offsets is forgotten, to be read again.
    fn apply_moves(&mut self) {
        let moves = std::mem::take(&mut *self.moves.lock().expect("moves lock poisoned"));
        for p in moves.assigned {
            self.revoked.remove(&p);
            self.archived.remove(&p);
            self.dead_lettered.remove(&p);
        }
        for p in moves.revoked {
            self.revoked.insert(p);
            self.archived.remove(&p);
            self.dead_lettered.remove(&p);
            let before = self.pending.len();
            self.pending.retain(|(q, _)| *q != p);
            self.pending_rejects.retain(|r| r.partition != p);
            self.pending_last.remove(&p);
            self.pending_event_max.remove(&p);
            self.progress.remove(&p);
            if before != self.pending.len() {
                tracing::info!(topic = %self.topic, partition = p, "partition revoked: its pending rows are dropped, for its new owner to archive");
            }
        }
        self.pending_rows = self.pending.iter().map(|(_, b)| b.num_rows()).sum();
    }

    /// The handler that tells this archiver of the group's moves, and resumes an assigned
    /// partition at the offset after the one its master table holds.
    pub fn rebalance_handler(&self) -> Arc<ArchiverRebalance> {
        Arc::new(ArchiverRebalance {
            moves: Arc::clone(&self.moves),
            storage: self.storage.clone(),
            schema: self.schema_name.clone(),
            topic: self.topic.clone(),
        })
    }

    async fn write(&mut self) -> Result<Vec<(i32, i64)>> {
        self.apply_moves();
        self.last_flush = Instant::now();
        let received = self.stats.received.load(Ordering::Relaxed);
        let idle = received == self.received_at_flush;
        self.received_at_flush = received;
        if self.pending_last.is_empty() {
            // Nothing came since the last flush: every partition this archiver reads is caught
            // up. Said at once after commits, and every 10 s while quiet (so that days close
            // as the clock passes them).
            let due = self.committed_since_idle
                || self
                    .last_idle_write
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
            if idle && due && !self.progress.is_empty() {
                let now = self.clock.now_us();
                for p in self.progress.values_mut() {
                    p.caught_up_us = Some(now);
                    p.updated_us = now;
                }
                let parts: Vec<i32> = self.progress.keys().copied().collect();
                self.write_progress(parts).await;
                self.last_idle_write = Some(Instant::now());
                self.committed_since_idle = false;
            }
            return Ok(Vec::new());
        }
        let mut dlq_last: BTreeMap<i32, i64> = BTreeMap::new();
        for r in &self.pending_rejects {
            let last = dlq_last.entry(r.partition).or_insert(-1);
            *last = (*last).max(r.offset);
        }
        let commit = MasterCommit {
            rows: std::mem::take(&mut self.pending)
                .into_iter()
                .map(|(_, b)| b)
                .collect(),
            rejects: std::mem::take(&mut self.pending_rejects),
            source: self.topic.clone(),
            master_txns: self
                .pending_last
                .iter()
                .map(|(&p, &o)| (self.master_app_id(p), o))
                .collect(),
            dead_letter_txns: dlq_last
                .iter()
                .map(|(&p, &o)| (self.dlq_app_id(p), o))
                .collect(),
            metadata: Vec::new(),
            expected_txns: self
                .pending_last
                .keys()
                .map(|&p| {
                    (
                        self.master_app_id(p),
                        self.archived.get(&p).copied().unwrap_or(-1),
                    )
                })
                .collect(),
        };
        let pending_last = std::mem::take(&mut self.pending_last);
        self.pending_rows = 0;
        let report = match self.writer.commit(commit, self.clock.now_us()).await {
            Ok(r) => {
                if r.rows > 0 && r.bytes > 0 {
                    let observed = r.bytes as f64 / r.rows as f64;
                    // Small files carry a fixed footer; weigh each by its rows.
                    let weight = (r.rows as f64 / 100_000.0).min(1.0);
                    self.bytes_per_row += weight * (observed - self.bytes_per_row);
                }
                r
            }
            Err(e) => {
                // The batches are gone with the failed write; so is our certainty about what
                // committed. Read the tables again, so the next poll reads the stored versions;
                // the consumer group resumes from the last reported offset and replays the rest.
                self.archived.clear();
                self.dead_lettered.clear();
                self.pending_event_max.clear();
                if let Err(reload) = self.writer.reload().await {
                    tracing::warn!(error = %reload, "reopening the master dataset failed");
                }
                return Err(e.into());
            }
        };
        // Progress first: whoever sees the counters move sees the progress of this commit.
        let now = self.clock.now_us();
        let event_max = std::mem::take(&mut self.pending_event_max);
        for (&p, &offset) in &pending_last {
            let entry = self.progress.entry(p).or_insert(PartitionProgress {
                partition: p,
                offset,
                event_time_us: None,
                caught_up_us: None,
                updated_us: now,
            });
            entry.offset = offset;
            entry.updated_us = now;
            if let Some(&t) = event_max.get(&p) {
                entry.event_time_us = Some(entry.event_time_us.map_or(t, |e| e.max(t)));
            }
        }
        self.write_progress(pending_last.keys().copied()).await;
        self.committed_since_idle = true;
        self.stats
            .dead_lettered
            .fetch_add(report.rejects as u64, Ordering::Relaxed);
        self.dead_lettered.extend(dlq_last);
        self.stats
            .archived
            .fetch_add(report.rows as u64, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        let done: Vec<(i32, i64)> = pending_last.iter().map(|(&p, &o)| (p, o + 1)).collect();
        self.archived.extend(pending_last);
        tracing::debug!(rows = report.rows, ?done, "archived");
        Ok(done)
    }
}

impl BatchSink for Archiver {
    async fn handle(&mut self, batch: &MessageBatch) -> Result<Vec<(i32, i64)>> {
        self.apply_moves();
        let now = self.clock.now_us();
        for (partition, messages) in batch.by_partition() {
            // Fetched before the partition was revoked: its new owner archives them.
            if self.revoked.contains(&partition) {
                continue;
            }
            let (archived, dead_lettered) = self.versions(partition).await?;
            // Skip what is committed, and what is pending already (a redelivery before a flush).
            let seen = archived.max(self.pending_last.get(&partition).copied().unwrap_or(-1));
            let total = messages.len();
            let fresh: Vec<_> = messages.into_iter().filter(|m| m.offset > seen).collect();
            self.stats
                .skipped_replayed
                .fetch_add((total - fresh.len()) as u64, Ordering::Relaxed);
            let (Some(first), Some(last)) = (fresh.first(), fresh.last()) else {
                continue;
            };
            // A gap of one is a transaction's commit marker, not an event.
            if first.offset > seen + 2 {
                let missed = first.offset - seen - 1;
                self.stats
                    .missed_offsets
                    .fetch_add(missed as u64, Ordering::Relaxed);
                tracing::warn!(
                    topic = %self.topic,
                    partition,
                    from = seen + 1,
                    to = first.offset - 1,
                    "offsets were never delivered to the archiver: the broker's retention removed them before they were archived, or a transaction was aborted"
                );
            }
            let last = last.offset;
            self.stats
                .received
                .fetch_add(fresh.len() as u64, Ordering::Relaxed);
            let decoded = self.decoder.decode(&fresh, now)?;
            if decoded.batch.num_rows() > 0 {
                let times = decoded
                    .batch
                    .column(self.decoder.schema().event_time)
                    .as_primitive::<TimestampMicrosecondType>();
                if let Some(t) = datafusion::arrow::compute::max(times) {
                    let e = self.pending_event_max.entry(partition).or_insert(t);
                    *e = (*e).max(t);
                }
                let b = archive_batch(self.decoder.schema(), &decoded)?;
                self.pending_rows += b.num_rows();
                self.pending.push((partition, b));
            }
            self.pending_rejects.extend(
                decoded
                    .rejected
                    .into_iter()
                    .filter(|r| r.offset > dead_lettered),
            );
            self.pending_last.insert(partition, last);
        }
        let estimated = self.pending_rows as f64 * self.bytes_per_row;
        if self.pending_rows >= self.config.flush_rows
            || estimated >= self.config.target_file_bytes as f64
        {
            return self.write().await;
        }
        Ok(Vec::new())
    }

    fn rebalance(&self) -> Option<Arc<dyn Rebalance>> {
        Some(self.rebalance_handler())
    }

    async fn flush(&mut self, final_flush: bool) -> Result<Vec<(i32, i64)>> {
        if final_flush || self.last_flush.elapsed() >= self.config.flush_interval {
            return self.write().await;
        }
        Ok(Vec::new())
    }
}

/// The group's moves not yet applied by the archiver.
#[derive(Debug, Default)]
struct Moves {
    assigned: std::collections::BTreeSet<i32>,
    revoked: std::collections::BTreeSet<i32>,
}

/// Moves an [`Archiver`]'s partitions with the group's assignments.
#[derive(Debug)]
pub struct ArchiverRebalance {
    moves: Arc<std::sync::Mutex<Moves>>,
    storage: Storage,
    schema: String,
    topic: String,
}

impl ArchiverRebalance {
    /// Where consumption of `partition` resumes: after the offset its master table holds,
    /// whatever the group's committed offset says.
    pub async fn resume_offset(&self, partition: i32) -> Result<rdkafka::Offset> {
        let url = self.storage.layout().master(&self.schema);
        let app = format!("tandem-archive-{}-{partition}", self.topic);
        let stored = match self.storage.open(&url).await? {
            Some(table) => {
                let snapshot = table.snapshot().map_err(tandem_core::storage::delta)?;
                snapshot
                    .transaction_version(table.log_store().as_ref(), &app)
                    .await
                    .map_err(tandem_core::storage::delta)?
                    .unwrap_or(-1)
            }
            None => -1,
        };
        Ok(if stored < 0 {
            rdkafka::Offset::Beginning
        } else {
            rdkafka::Offset::Offset(stored + 1)
        })
    }
}

impl Rebalance for ArchiverRebalance {
    fn assigned(&self, partition: i32) -> futures::future::BoxFuture<'_, Result<rdkafka::Offset>> {
        Box::pin(async move {
            self.moves
                .lock()
                .expect("moves lock poisoned")
                .assigned
                .insert(partition);
            let offset = self.resume_offset(partition).await?;
            tracing::info!(topic = %self.topic, partition, ?offset, "archiving resumes from the master dataset's offset");
            Ok(offset)
        })
    }

    fn revoked(&self, partition: i32, _lost: bool) -> futures::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut moves = self.moves.lock().expect("moves lock poisoned");
            moves.assigned.remove(&partition);
            moves.revoked.insert(partition);
        })
    }
}
