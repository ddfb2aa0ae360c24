//! The one writer of the master dataset and its dead-letter table. The archiver (from Kafka)
//! and `tandem import` (from files) both commit through [`MasterWriter`]:
//!
//! ```text
//!  decoded events ─► archive_batch (events + _partition, _offset, dt)
//!  rejected messages ─────────────────────────────────────────────┐
//!                                                                 ▼
//!  commit: 1. dead-letter table: rejects + txn(app id, version) per source
//!          2. master dataset: rows + txn(app id, version) per source
//!                             + the event days touched (DAYS_KEY), so late events mark
//!                               their day dirty for the next batch run
//! ```
//!
//! Dead letters go first, so a master commit implies its rejects are stored. The `txn` versions
//! make a replayed commit detectable by its writer: a message at or below the stored version
//! of its source is already there.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int32Array, Int32Builder, Int64Array, Int64Builder,
    StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;

use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::{StructField, StructType, Transaction};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use deltalake::writer::RecordBatchWriter;
use deltalake::DeltaTable;
use serde_json::{json, Value as Json};
use url::Url;

use crate::decode::{Decoded, Rejected};
use crate::error::{CoreError, Result};
use crate::paths::DAY_COLUMN;
use crate::schema::{timestamp_type, EventSchema};
use crate::storage::Storage;
use crate::time::{day_of, day_string};

/// Commit metadata key of a master commit: the event days (`YYYY-MM-DD`) it touched.
pub const DAYS_KEY: &str = "tandem.days";

/// What one commit writes: rows of the master schema ([`archive_batch`]), rejected messages,
/// and the transaction versions that let the writer recognise a replay.
#[derive(Debug, Default)]
pub struct MasterCommit {
    pub rows: Vec<RecordBatch>,
    pub rejects: Vec<Rejected>,
    /// The topic (or imported file) the rejects came from, for the dead-letter rows.
    pub source: String,
    /// `txn` (app id, version) actions of the master commit.
    pub master_txns: Vec<(String, i64)>,
    /// `txn` (app id, version) actions of the dead-letter commit.
    pub dead_letter_txns: Vec<(String, i64)>,
    /// More metadata for the master commit.
    pub metadata: Vec<(String, Json)>,
    /// (app id, version) the writer believes the master holds for each of `master_txns`' apps
    /// (-1: none): if the table holds another, another writer archived those offsets since
    /// (this one is a zombie) and the commit is refused ([`CoreError::Fenced`]).
    pub expected_txns: Vec<(String, i64)>,
}

/// What one commit did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommitReport {
    pub rows: usize,
    pub rejects: usize,
    /// Bytes of the master files the commit added.
    pub bytes: u64,
    /// The event days the rows touched.
    pub days: BTreeSet<String>,
}

/// Writes one event schema's master dataset and dead-letter table.
#[derive(Debug)]
pub struct MasterWriter {
    storage: Storage,
    schema: Arc<EventSchema>,
    master_url: Url,
    dlq_url: Url,
    master: DeltaTable,
    dlq: DeltaTable,
}

impl MasterWriter {
    /// Opens (creating if needed) the master and dead-letter tables of `schema`.
    pub async fn open(storage: Storage, schema: Arc<EventSchema>) -> Result<Self> {
        let master_url = storage.layout().master(&schema.name);
        let dlq_url = storage.layout().dead_letter(&schema.name);
        let master = storage
            .open_or_create(&master_url, &schema.master_schema(), &[DAY_COLUMN])
            .await?;
        let master = evolve(master, &master_url, &schema).await?;
        let dlq = storage
            .open_or_create(&dlq_url, &dead_letter_schema(), &[])
            .await?;
        Ok(MasterWriter {
            storage,
            schema,
            master_url,
            dlq_url,
            master,
            dlq,
        })
    }

    pub fn schema(&self) -> &Arc<EventSchema> {
        &self.schema
    }

    /// Reads both tables' logs again (after a failed commit, whose outcome is unknown).
    pub async fn reload(&mut self) -> Result<()> {
        *self = Self::open(self.storage.clone(), Arc::clone(&self.schema)).await?;
        Ok(())
    }

    /// The versions stored with `app_id` in the master's and the dead-letter table's `txn`
    /// actions (-1 where none).
    pub async fn txn_versions(&self, master_app: &str, dlq_app: &str) -> Result<(i64, i64)> {
        Ok((
            txn_version(&self.master, &self.master_url, master_app).await?,
            txn_version(&self.dlq, &self.dlq_url, dlq_app).await?,
        ))
    }

    /// Commits `commit`: dead letters first, then the rows with the days they touched.
    /// Nothing is written for an empty part.
    pub async fn commit(&mut self, mut commit: MasterCommit, now_us: i64) -> Result<CommitReport> {
        let mut staged = self.stage()?;
        for batch in std::mem::take(&mut commit.rows) {
            staged.write(batch).await?;
        }
        self.commit_staged(staged, commit, now_us).await
    }

    /// A writer of rows into new files of the master dataset, as they come (a file's rows
    /// are never all held in memory), which [`Self::commit_staged`] commits at once.
    pub fn stage(&self) -> Result<StagedRows> {
        let writer = RecordBatchWriter::for_table(&self.master)
            .map_err(|e| table_err(&self.master_url, e))?
            .with_target_file_size(STAGED_FILE_BYTES)
            .with_writer_properties(master_writer_properties(&self.schema));
        Ok(StagedRows {
            writer,
            url: self.master_url.clone(),
            rows: 0,
            days: BTreeSet::new(),
        })
    }

    /// Commits `commit` with the rows `staged` wrote (`commit.rows` must be empty): dead
    /// letters first, then the staged files with the days they touched, in one commit of the
    /// master dataset. If this fails, the staged files are left unreferenced (`vacuum`
    /// removes them).
    pub async fn commit_staged(
        &mut self,
        mut staged: StagedRows,
        commit: MasterCommit,
        now_us: i64,
    ) -> Result<CommitReport> {
        use deltalake::kernel::transaction::{CommitBuilder, TableReference};
        use deltalake::kernel::Action;
        use deltalake::protocol::DeltaOperation;
        use deltalake::writer::DeltaWriter as _;
        if !commit.rows.is_empty() {
            return Err(CoreError::Internal(
                "a staged commit takes its rows from its files".into(),
            ));
        }
        let mut report = self.before_rows(&commit, now_us).await?;
        if staged.rows == 0 && commit.master_txns.is_empty() {
            return Ok(report);
        }
        let adds = staged
            .writer
            .flush()
            .await
            .map_err(|e| table_err(&self.master_url, e))?;
        report.bytes = adds.iter().map(|a| a.size.max(0) as u64).sum();
        report.rows = staged.rows;
        report.days = staged.days;
        let mut metadata = commit.metadata;
        metadata.push((DAYS_KEY.to_string(), json!(report.days)));
        let props = with_txns(
            CommitProperties::default().with_metadata(metadata),
            &commit.master_txns,
        );
        let snapshot = self
            .master
            .snapshot()
            .map_err(|e| table_err(&self.master_url, e))?;
        CommitBuilder::from(props)
            .with_actions(adds.into_iter().map(Action::Add).collect())
            .build(
                Some(snapshot as &dyn TableReference),
                self.master.log_store(),
                DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: Some(vec![DAY_COLUMN.to_string()]),
                    predicate: None,
                },
            )
            .await
            .map_err(|e| table_err(&self.master_url, e))?;
        self.master
            .update_state()
            .await
            .map_err(|e| table_err(&self.master_url, e))?;
        Ok(report)
    }

    /// What every commit does before its rows: the fence check of `commit.expected_txns`,
    /// then the dead letters' commit.
    async fn before_rows(&mut self, commit: &MasterCommit, now_us: i64) -> Result<CommitReport> {
        let mut report = CommitReport::default();
        if !commit.expected_txns.is_empty() {
            // The table as it is now: a writer that took these partitions over since this
            // one read them has moved their versions on. (One that commits between this look
            // and the write below is caught by Delta's check of concurrent transaction ids.)
            self.master
                .update_state()
                .await
                .map_err(|e| table_err(&self.master_url, e))?;
            for (app, expected) in &commit.expected_txns {
                let stored = txn_version(&self.master, &self.master_url, app).await?;
                if stored != *expected {
                    return Err(CoreError::Fenced {
                        app: app.clone(),
                        expected: *expected,
                        stored,
                    });
                }
            }
        }
        if !commit.rejects.is_empty() {
            let batch = dead_letter_batch(&commit.source, &commit.rejects, now_us)?;
            let props = with_txns(CommitProperties::default(), &commit.dead_letter_txns);
            self.dlq = self
                .dlq
                .clone()
                .write(vec![batch])
                .with_save_mode(SaveMode::Append)
                .with_commit_properties(props)
                .await
                .map_err(|e| table_err(&self.dlq_url, e))?;
            report.rejects = commit.rejects.len();
        }
        Ok(report)
    }
}

/// How `schema`'s master files are written: Zstandard at level 1, which on the reference
/// events gives 54% of Snappy's bytes at the same speed of writing and of reading
/// (`docs/performance.md`); compaction rewrites them with deltalake's Zstandard level 4. The
/// columns of a value an event of its own holds (the event id, the event time, the Kafka
/// offset) are written without a dictionary, which they never fill with repeats: the encoder
/// would intern every value until the dictionary outgrew its page and was dropped. String
/// columns carry no min/max statistics: rows arrive in no order of theirs, so every page's
/// range spans nearly all values and prunes nothing (a day is found by its partition, a time
/// by the event time's statistics, which stay), while comparing every value with the page's
/// bounds was a sixth of the Parquet encoder's time.
pub fn master_writer_properties(schema: &EventSchema) -> WriterProperties {
    use crate::schema::FieldType;
    use deltalake::parquet::basic::{Compression, ZstdLevel};
    use deltalake::parquet::file::properties::EnabledStatistics;
    use deltalake::parquet::schema::types::ColumnPath;
    let mut b = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(MASTER_ROW_GROUP_ROWS));
    for column in [
        schema.fields[schema.event_id].name.as_str(),
        schema.fields[schema.event_time].name.as_str(),
        crate::schema::OFFSET_COLUMN,
    ] {
        b = b.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    for field in schema.fields.iter().filter(|f| f.ty == FieldType::String) {
        b = b.set_column_statistics_enabled(
            ColumnPath::from(field.name.as_str()),
            EnabledStatistics::None,
        );
    }
    b.build()
}

/// The most rows of a master file's row group. A day's file is read by every thread at once,
/// each reading whole row groups: a day of 2.86 M events in 1 M-row groups (the writer's
/// default) gave one of two threads twice the other's rows. Smaller groups share out evenly
/// (DuckDB writes 122,880 rows a group) and let the row-group statistics prune finer.
pub const MASTER_ROW_GROUP_ROWS: usize = 1 << 18;

/// The size at which a staged file is closed and the next begun.
const STAGED_FILE_BYTES: u64 = 128 << 20;

/// Rows written to new files of the master dataset, not committed yet
/// ([`MasterWriter::stage`]).
pub struct StagedRows {
    writer: RecordBatchWriter,
    url: Url,
    rows: usize,
    days: BTreeSet<String>,
}

impl std::fmt::Debug for StagedRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StagedRows")
            .field("rows", &self.rows)
            .field("days", &self.days)
            .finish_non_exhaustive()
    }
}

impl StagedRows {
    /// Writes `batch` (rows of the master schema, [`archive_batch`]) into the files of its
    /// days. Rows come mostly in runs of one day (a topic's or a file's events are roughly in
    /// time order): each run is written as the one partition it is, a slice of the batch,
    /// rather than split by deltalake (a sort and a copy of every column). A batch whose days
    /// interleave is sorted by day first.
    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        use deltalake::kernel::scalars::ScalarExt;
        use deltalake::writer::WriteMode;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let mut batch = batch;
        let mut runs = day_runs(&batch)?;
        if runs.len() > MAX_DAY_RUNS.max(batch.num_rows() / MIN_DAY_RUN) {
            let dt = day_column(&batch)?;
            let order = datafusion::arrow::compute::sort_to_indices(dt, None, None)?;
            batch = datafusion::arrow::compute::take_record_batch(&batch, &order)?;
            runs = day_runs(&batch)?;
        }
        self.rows += batch.num_rows();
        let dt = day_column(&batch)?;
        let days = dt.as_string::<i32>();
        for (start, len) in runs {
            if days.is_valid(start) && !self.days.contains(days.value(start)) {
                self.days.insert(days.value(start).to_string());
            }
            let value = ScalarExt::from_array(dt.as_ref(), start).ok_or_else(|| {
                CoreError::Internal(format!("`{DAY_COLUMN}` has no value at row {start}"))
            })?;
            let values = [(DAY_COLUMN.to_string(), value)].into_iter().collect();
            self.writer
                .write_partition(batch.slice(start, len), &values, WriteMode::Default)
                .await
                .map_err(|e| table_err(&self.url, e))?;
        }
        Ok(())
    }

    /// The rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// Above this many runs of one day in a batch (and below [`MIN_DAY_RUN`] rows a run on
/// average), [`StagedRows::write`] sorts the batch by day rather than write each run.
const MAX_DAY_RUNS: usize = 16;
const MIN_DAY_RUN: usize = 1024;

/// The `DAY_COLUMN` of master rows `batch`.
fn day_column(batch: &RecordBatch) -> Result<&ArrayRef> {
    batch
        .column_by_name(DAY_COLUMN)
        .ok_or_else(|| CoreError::Internal(format!("a master batch without `{DAY_COLUMN}`")))
}

/// The runs of consecutive rows of one day in master rows `batch`, as (first row, rows).
fn day_runs(batch: &RecordBatch) -> Result<Vec<(usize, usize)>> {
    let dt = day_column(batch)?.as_string::<i32>();
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..=dt.len() {
        if i == dt.len() || dt.is_valid(i) != dt.is_valid(start) || dt.value(i) != dt.value(start) {
            runs.push((start, i - start));
            start = i;
        }
    }
    Ok(runs)
}

fn with_txns(mut props: CommitProperties, txns: &[(String, i64)]) -> CommitProperties {
    for (app, version) in txns {
        props = props.with_application_transaction(Transaction::new(app, *version));
    }
    props
}

fn table_err(url: &Url, source: deltalake::DeltaTableError) -> CoreError {
    CoreError::Table {
        table: url.to_string(),
        source: Box::new(source),
    }
}

/// Follows `schema` where the master dataset can: fields the definition added are added to the
/// table (nullable; earlier rows read them as null) by a metadata commit; a field removed from
/// the definition, or given another type, is refused with a message naming it (the rows
/// already written keep it, and a batch run would misread them).
async fn evolve(table: DeltaTable, url: &Url, schema: &EventSchema) -> Result<DeltaTable> {
    let wanted = StructType::try_from_arrow(schema.master_schema().as_ref())
        .map_err(|e| table_err(url, e.into()))?;
    let current = table.snapshot().map_err(|e| table_err(url, e))?.schema();
    let refuse = |message: String| CoreError::SchemaChange {
        schema: schema.name.clone(),
        message,
    };
    for f in current.fields() {
        match wanted.field(f.name()) {
            None => {
                return Err(refuse(format!(
                    "field `{}` is in the master dataset but no longer in the definition; \
                     removing a field is refused (rows hold it): put it back",
                    f.name()
                )))
            }
            Some(w) if w.data_type() != f.data_type() => {
                return Err(refuse(format!(
                    "field `{}` is {} in the master dataset but {} in the definition; \
                     changing a field's type is refused (rows hold the old one): add a field \
                     under a new name instead",
                    f.name(),
                    f.data_type(),
                    w.data_type()
                )))
            }
            Some(_) => {}
        }
    }
    let added: Vec<StructField> = wanted
        .fields()
        .filter(|w| current.field(w.name()).is_none())
        .map(|w| StructField::new(w.name(), w.data_type().clone(), true))
        .collect();
    if added.is_empty() {
        return Ok(table);
    }
    table
        .add_columns()
        .with_fields(added)
        .await
        .map_err(|e| table_err(url, e))
}

/// The version stored with `app_id` in `table`'s `txn` actions, -1 if none.
async fn txn_version(table: &DeltaTable, url: &Url, app_id: &str) -> Result<i64> {
    let snapshot = table.snapshot().map_err(|e| table_err(url, e))?;
    Ok(snapshot
        .transaction_version(table.log_store().as_ref(), app_id)
        .await
        .map_err(|e| table_err(url, e))?
        .unwrap_or(-1))
}

/// The decoded events with their Kafka partition, offset and `dt` day, in the master schema.
pub fn archive_batch(schema: &EventSchema, decoded: &Decoded) -> Result<RecordBatch> {
    let batch = &decoded.batch;
    let times = batch
        .column(schema.event_time)
        .as_primitive::<TimestampMicrosecondType>();
    // Rows come mostly in runs of one day: each day is formatted once per run, not per row.
    let mut days = StringBuilder::with_capacity(times.len(), times.len() * 10);
    let mut last: Option<(i64, String)> = None;
    for t in times.iter() {
        let Some(t) = t else {
            days.append_null();
            continue;
        };
        let day = day_of(t);
        let text = match &mut last {
            Some((d, text)) if *d == day => text,
            slot => &mut slot.insert((day, day_string(day))).1,
        };
        days.append_value(text);
    }
    let days = days.finish();
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(Int32Array::from(decoded.partitions.clone())));
    columns.push(Arc::new(Int64Array::from(decoded.offsets.clone())));
    columns.push(Arc::new(days));
    Ok(RecordBatch::try_new(schema.master_schema(), columns)?)
}

/// The dead-letter table's schema: where a message came from, why it was rejected, its bytes.
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("broker_time", timestamp_type(), true),
        Field::new("reason", DataType::Utf8, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("raw", DataType::Binary, false),
        Field::new("received_at", timestamp_type(), false),
    ]))
}

/// Rejected messages of `topic` (or an imported file's name) as dead-letter rows.
pub fn dead_letter_batch(topic: &str, rejects: &[Rejected], now_us: i64) -> Result<RecordBatch> {
    let n = rejects.len();
    let mut t = StringBuilder::with_capacity(n, n * topic.len());
    let mut partition = Int32Builder::with_capacity(n);
    let mut offset = Int64Builder::with_capacity(n);
    let mut broker = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    let mut reason = StringBuilder::new();
    let mut error = StringBuilder::new();
    let mut raw = BinaryBuilder::new();
    let mut received = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
    for r in rejects {
        t.append_value(topic);
        partition.append_value(r.partition);
        offset.append_value(r.offset);
        broker.append_option(r.timestamp_ms.map(|t| t * 1000));
        reason.append_value(r.reason.as_str());
        error.append_value(&r.error);
        raw.append_value(&r.raw);
        received.append_value(now_us);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(t.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
        Arc::new(broker.finish()),
        Arc::new(reason.finish()),
        Arc::new(error.finish()),
        Arc::new(raw.finish()),
        Arc::new(received.finish()),
    ];
    Ok(RecordBatch::try_new(dead_letter_schema(), columns)?)
}

/// How far the archiver has archived one partition of a schema's topic: the object
/// `archive/progress/<schema>/<partition>.json` under the root, rewritten after its commits.
/// The batch layer reads them to know which days are closed (DESIGN §4: a day is closed once
/// every partition is archived past its end, or caught up).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartitionProgress {
    pub partition: i32,
    /// The last offset committed to the master dataset.
    pub offset: i64,
    /// The newest event time committed from this partition.
    pub event_time_us: Option<i64>,
    /// When the archiver last found nothing left to read in the partition (caught up).
    pub caught_up_us: Option<i64>,
    /// When this was written.
    pub updated_us: i64,
}

impl PartitionProgress {
    /// The partition's object under the root.
    pub fn path(schema: &str, partition: i32) -> object_store::path::Path {
        object_store::path::Path::from(format!("archive/progress/{schema}/{partition}.json"))
    }

    /// Times up to which the partition holds nothing more to archive: its newest event, or
    /// the moment it was caught up, whichever is later.
    pub fn archived_through_us(&self) -> Option<i64> {
        match (self.event_time_us, self.caught_up_us) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Every partition's progress of `schema` (empty if no archiver ever ran).
    pub async fn read_all(
        store: &dyn object_store::ObjectStore,
        schema: &str,
    ) -> Result<Vec<PartitionProgress>> {
        use futures::TryStreamExt;
        use object_store::ObjectStoreExt;
        let prefix = object_store::path::Path::from(format!("archive/progress/{schema}"));
        let err = |e: object_store::Error| CoreError::ObjectStore {
            url: prefix.to_string(),
            source: Box::new(e),
        };
        let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.map_err(err)?;
        let mut out = Vec::new();
        for meta in listed {
            let bytes = match store.get(&meta.location).await {
                Ok(r) => r.bytes().await.map_err(err)?,
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(err(e)),
            };
            // A file that is not progress (a stray upload) is not ours to judge: skip it.
            if let Ok(p) = serde_json::from_slice::<PartitionProgress>(&bytes) {
                out.push(p);
            }
        }
        Ok(out)
    }
}
