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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::AsArray;
use datafusion::arrow::record_batch::RecordBatch;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::protocol::SaveMode;
use deltalake::DeltaTable;
use serde_json::json;
use tandem_core::decode::{Decoder, Rejected};
use tandem_core::master::{archive_batch, dead_letter_batch, dead_letter_schema};
use tandem_core::schema::EventSchema;
use tandem_core::storage::Storage;
use tandem_core::time::Clock;
use tandem_core::view::DAY_COLUMN;

use crate::error::{Result, SpeedError};
use crate::kafka::{BatchSink, MessageBatch};

/// When the archiver writes.
#[derive(Debug, Clone, Copy)]
pub struct ArchiverConfig {
    /// Write at least this often while rows are pending.
    pub flush_interval: Duration,
    /// Write as soon as this many rows are pending.
    pub flush_rows: usize,
}

impl Default for ArchiverConfig {
    fn default() -> Self {
        ArchiverConfig {
            flush_interval: Duration::from_secs(2),
            flush_rows: 200_000,
        }
    }
}

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
    storage: Storage,
    master_url: url::Url,
    dlq_url: url::Url,
    master: Option<DeltaTable>,
    dlq: Option<DeltaTable>,
    /// Last archived offset per partition (master txn), and last dead-lettered (dlq txn).
    archived: BTreeMap<i32, i64>,
    dead_lettered: BTreeMap<i32, i64>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    pending_rejects: Vec<Rejected>,
    /// Last offset seen per partition in the pending data.
    pending_last: BTreeMap<i32, i64>,
    last_flush: Instant,
    config: ArchiverConfig,
    clock: Arc<dyn Clock>,
    pub stats: Arc<ArchiverStats>,
}

/// The version stored with `app_id` in `table`'s `txn` actions, -1 if none.
async fn txn_version(
    table: &DeltaTable,
    app_id: String,
) -> Result<i64, deltalake::DeltaTableError> {
    let snapshot = table.snapshot()?;
    Ok(snapshot
        .transaction_version(table.log_store().as_ref(), app_id)
        .await?
        .unwrap_or(-1))
}

fn write_err(table: &url::Url, e: deltalake::DeltaTableError) -> SpeedError {
    SpeedError::Write {
        table: table.to_string(),
        source: Box::new(e),
    }
}

impl Archiver {
    /// Opens (creating if needed) the master and dead-letter tables of `schema`.
    pub async fn open(
        storage: Storage,
        schema: Arc<EventSchema>,
        config: ArchiverConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let master_url = storage.layout().master(&schema.name);
        let dlq_url = storage.layout().dead_letter(&schema.name);
        let mut a = Archiver {
            topic: schema.topic.clone(),
            decoder: Decoder::new(Arc::clone(&schema)),
            master_url,
            dlq_url,
            master: None,
            dlq: None,
            archived: BTreeMap::new(),
            dead_lettered: BTreeMap::new(),
            pending: Vec::new(),
            pending_rows: 0,
            pending_rejects: Vec::new(),
            pending_last: BTreeMap::new(),
            last_flush: Instant::now(),
            config,
            clock,
            stats: Arc::new(ArchiverStats::default()),
            storage,
        };
        a.reload().await?;
        Ok(a)
    }

    /// (Re)opens both tables and forgets cached versions, so they are read again.
    async fn reload(&mut self) -> Result<()> {
        let master_schema = self.decoder.schema().master_schema();
        self.master = Some(
            self.storage
                .open_or_create(&self.master_url, &master_schema, &[DAY_COLUMN])
                .await?,
        );
        self.dlq = Some(
            self.storage
                .open_or_create(&self.dlq_url, &dead_letter_schema(), &[])
                .await?,
        );
        self.archived.clear();
        self.dead_lettered.clear();
        Ok(())
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
            let master = self.master.as_ref().expect("opened");
            let mv = txn_version(master, self.master_app_id(partition))
                .await
                .map_err(|e| write_err(&self.master_url, e))?;
            let dlq = self.dlq.as_ref().expect("opened");
            let dv = txn_version(dlq, self.dlq_app_id(partition))
                .await
                .map_err(|e| write_err(&self.dlq_url, e))?;
            self.archived.insert(partition, mv);
            self.dead_lettered.insert(partition, dv);
        }
        Ok((self.archived[&partition], self.dead_lettered[&partition]))
    }

    async fn write(&mut self) -> Result<Vec<(i32, i64)>> {
        self.last_flush = Instant::now();
        if self.pending_last.is_empty() {
            return Ok(Vec::new());
        }
        // 1. Dead letters first: a master commit implies its rejects are stored.
        if !self.pending_rejects.is_empty() {
            let mut props = CommitProperties::default();
            let mut last: BTreeMap<i32, i64> = BTreeMap::new();
            for r in &self.pending_rejects {
                last.insert(
                    r.partition,
                    r.offset.max(*last.get(&r.partition).unwrap_or(&-1)),
                );
            }
            for (&p, &o) in &last {
                props = props.with_application_transaction(Transaction::new(self.dlq_app_id(p), o));
            }
            let batch = dead_letter_batch(&self.topic, &self.pending_rejects, self.clock.now_us())?;
            let table = self.dlq.take().expect("opened");
            let table = table
                .write(vec![batch])
                .with_save_mode(SaveMode::Append)
                .with_commit_properties(props)
                .await
                .map_err(|e| write_err(&self.dlq_url, e))?;
            self.dlq = Some(table);
            self.stats
                .dead_lettered
                .fetch_add(self.pending_rejects.len() as u64, Ordering::Relaxed);
            self.dead_lettered.extend(last);
            self.pending_rejects.clear();
        }
        // 2. The events, with every partition's last offset, in one commit.
        let mut props = CommitProperties::default();
        for (&p, &o) in &self.pending_last {
            props = props.with_application_transaction(Transaction::new(self.master_app_id(p), o));
        }
        let mut days = BTreeSet::new();
        for b in &self.pending {
            let col = b
                .column_by_name(DAY_COLUMN)
                .expect("archive batches have dt")
                .as_string::<i32>();
            days.extend(col.iter().flatten().map(str::to_string));
        }
        props = props.with_metadata([("tandem.days".to_string(), json!(days))]);
        let batches = std::mem::take(&mut self.pending);
        let rows = self.pending_rows;
        let table = self.master.take().expect("opened");
        let result = table
            .write(batches)
            .with_save_mode(SaveMode::Append)
            .with_partition_columns([DAY_COLUMN])
            .with_commit_properties(props)
            .await;
        let table = match result {
            Ok(t) => t,
            Err(e) => {
                // The batches are gone with the failed write; so is our certainty about what
                // committed. Reopen so the next poll reads the stored versions again; the
                // consumer group resumes from the last reported offset and replays the rest.
                self.pending_rows = 0;
                self.pending_last.clear();
                let err = write_err(&self.master_url, e);
                if let Err(reload) = self.reload().await {
                    tracing::warn!(error = %reload, "reopening the master dataset failed");
                }
                return Err(err);
            }
        };
        self.master = Some(table);
        self.stats
            .archived
            .fetch_add(rows as u64, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.pending_rows = 0;
        let done: Vec<(i32, i64)> = self
            .pending_last
            .iter()
            .map(|(&p, &o)| (p, o + 1))
            .collect();
        self.archived.extend(std::mem::take(&mut self.pending_last));
        tracing::debug!(rows, ?done, "archived");
        Ok(done)
    }
}

impl BatchSink for Archiver {
    async fn handle(&mut self, batch: &MessageBatch) -> Result<Vec<(i32, i64)>> {
        let now = self.clock.now_us();
        for (partition, messages) in batch.by_partition() {
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
                let b = archive_batch(self.decoder.schema(), &decoded)?;
                self.pending_rows += b.num_rows();
                self.pending.push(b);
            }
            self.pending_rejects.extend(
                decoded
                    .rejected
                    .into_iter()
                    .filter(|r| r.offset > dead_lettered),
            );
            self.pending_last.insert(partition, last);
        }
        if self.pending_rows >= self.config.flush_rows {
            return self.write().await;
        }
        Ok(Vec::new())
    }

    async fn flush(&mut self, final_flush: bool) -> Result<Vec<(i32, i64)>> {
        if final_flush || self.last_flush.elapsed() >= self.config.flush_interval {
            return self.write().await;
        }
        Ok(Vec::new())
    }
}
