//! Recomputing a view exactly from the master dataset, and publishing it atomically.
//!
//! The plan is generated from the view's definition with the DataFrame API (no SQL text is
//! assembled). A view with a `distinct` metric is computed in two phases, first grouped by the
//! keys plus the distinct field, then by the keys: DataFusion's one-phase `COUNT(DISTINCT)`
//! keeps a hash set per group and ran out of memory on the reference cube, the two-phase plan
//! did not (DESIGN §8). The second phase also builds each group's HLL sketch.
//!
//! ```text
//!  master (dt IN days, view filter)
//!    └► phase 1: GROUP BY bucket, dims, f   count(*), sum(x), min(x), max(x)
//!         └► phase 2: GROUP BY bucket, dims sum(count), sum(sum), min, max, count(f), hll(f)
//!              └► rollups: regrouped from these rows (crate::rollup)
//!                   └► one Delta commit: replace dt IN days, the view's rows (rollup=base)
//!                      and its rollups' alike; coverage, definition hash and the master
//!                      version read go into the same commit's metadata
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::functions_aggregate::expr_fn::{count, count_distinct, max, min, sum};
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::{EnabledStatistics, WriterProperties};
use datafusion::parquet::schema::types::ColumnPath;
use datafusion::physical_plan::{collect, ExecutionPlan};
use datafusion::prelude::{
    cast as cast_expr, date_trunc, ident, lit, when, Expr, SessionConfig, SessionContext,
};
use deltalake::kernel::scalars::ScalarExt;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties, TableReference};
use deltalake::kernel::Action;
use deltalake::protocol::DeltaOperation;
use deltalake::protocol::SaveMode;
use deltalake::writer::{DeltaWriter as _, RecordBatchWriter, WriteMode};
use deltalake::DeltaTable;
use futures::TryStreamExt;
use serde_json::{json, Value as Json};
use tandem_core::metric::{MetricDef, MetricKind};
use tandem_core::query::Coverage;
use tandem_core::storage::Storage;
use tandem_core::time::{day_of, day_string, parse_day, Clock};
use tandem_core::view::{ViewDef, BASE_ROLLUP, BUCKET_COLUMN, DAY_COLUMN, ROLLUP_COLUMN};
use tandem_core::Catalog;

use crate::error::{BatchError, Result};
use crate::hll::HllSketchUdaf;

/// Commit metadata keys of a batch view publish.
pub const COVERAGE_KEY: &str = "tandem.coverage";
pub const HASH_KEY: &str = "tandem.definition_hash";
pub const MASTER_VERSION_KEY: &str = "tandem.master_version";
pub use tandem_core::master::DAYS_KEY;

/// Which days to recompute.
#[derive(Debug, Clone, Default)]
pub struct RunRequest {
    /// Inclusive day numbers; both or neither.
    pub from_day: Option<i64>,
    pub to_day: Option<i64>,
    /// Recompute every closed day, not only new and dirty ones.
    pub full: bool,
    /// More metadata for the publish's commit (a backfill's progress).
    pub metadata: Vec<(String, Json)>,
}

/// What one publish did.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct PublishReport {
    pub view: String,
    /// Days recomputed, `YYYY-MM-DD`.
    pub days: Vec<String>,
    /// The view's rows published.
    pub rows: usize,
    /// The rollups' rows published with them.
    pub rollup_rows: usize,
    /// The view table's version after the publish (`None` if nothing was to do).
    pub version: Option<i64>,
    /// Per recomputed day: what was read and computed.
    pub per_day: Vec<DayReport>,
    /// Master rows and bytes read, over every day.
    pub rows_read: u64,
    pub bytes_read: u64,
    /// Seconds of the publish's commit (the files are written day by day: see the days).
    pub publish_seconds: f64,
    /// Seconds spent on this view: planning, its days (a day read once for several views
    /// counts in the first one's) and its publish.
    pub seconds: f64,
}

/// What the recompute of one view's day read and computed.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct DayReport {
    /// `YYYY-MM-DD`.
    pub day: String,
    /// Master rows and Parquet bytes the scan read (after partition and row-group pruning).
    pub rows_read: u64,
    pub bytes_read: u64,
    /// Bytes the day's query spilled to disk to stay within the memory limit.
    pub spilled_bytes: u64,
    /// The view's rows computed for the day, and its rollups' rows.
    pub rows: usize,
    pub rollup_rows: usize,
    /// Seconds computing the rows, and writing them to files.
    pub seconds: f64,
    pub write_seconds: f64,
}

/// Hears about each day as its recompute ends, before the publish.
pub type Progress = Arc<dyn Fn(&str, &DayReport) + Send + Sync>;

/// How batch work runs: threads, memory and where it spills.
#[derive(Debug, Clone, Default)]
pub struct BatchOptions {
    /// Threads of a query (DataFusion's target partitions); the machine's cores if unset.
    pub threads: Option<usize>,
    /// The bytes queries may hold (DataFusion's memory pool); what does not fit is spilled to
    /// `spill_dir`. Unbounded if unset.
    pub memory_limit: Option<usize>,
    /// Where spills go; the system's temporary directory if unset.
    pub spill_dir: Option<std::path::PathBuf>,
    /// How long after its end a day the archiver has committed past waits before the batch
    /// layer treats it as closed.
    pub close_grace: std::time::Duration,
    /// Where the first phase of a recompute runs: in this process (`None`), or on the Apache
    /// Ballista cluster whose scheduler is at this URL (`ballista://HOST:PORT`).
    pub engine: Option<String>,
}

/// The last publish of a view, as its commit metadata says.
#[derive(Debug, Clone, Default)]
pub(crate) struct Published {
    pub coverage: Coverage,
    pub hash: Option<String>,
    pub master_version: Option<i64>,
}

/// What a publish commit's metadata says, as written (`None` for a commit that is no publish).
pub(crate) struct PublishMeta {
    /// The view's coverage after the commit: inclusive ranges of `YYYY-MM-DD`.
    pub coverage: Vec<(String, String)>,
    pub definition_hash: Option<String>,
    pub master_version: Option<i64>,
}

impl PublishMeta {
    pub(crate) fn of(info: &deltalake::kernel::CommitInfo) -> Option<Self> {
        let Some(Json::Array(ranges)) = info.info.get(COVERAGE_KEY) else {
            return None;
        };
        Some(PublishMeta {
            coverage: ranges
                .iter()
                .filter_map(|r| {
                    Some((
                        r.get(0)?.as_str()?.to_string(),
                        r.get(1)?.as_str()?.to_string(),
                    ))
                })
                .collect(),
            definition_hash: info
                .info
                .get(HASH_KEY)
                .and_then(Json::as_str)
                .map(str::to_string),
            master_version: info.info.get(MASTER_VERSION_KEY).and_then(Json::as_i64),
        })
    }
}

/// Reads the newest publish metadata of a view table.
///
/// Publishes are normally the newest commits, so the newest few are read first; the whole
/// history only when none of them is a publish (e.g. after many maintenance commits).
pub(crate) async fn published(table: &DeltaTable) -> Result<Published> {
    const NEWEST: usize = 8;
    let version = table.version().map(|v| v as i64);
    let mut infos: Vec<_> = table
        .history(Some(NEWEST))
        .try_collect()
        .await
        .map_err(|e| BatchError::Core(tandem_core::storage::delta(e)))?;
    if infos.len() == NEWEST && !infos.iter().any(|i| i.info.contains_key(COVERAGE_KEY)) {
        infos = table
            .history(None)
            .try_collect()
            .await
            .map_err(|e| BatchError::Core(tandem_core::storage::delta(e)))?;
    }
    for info in infos {
        let Some(meta) = PublishMeta::of(&info) else {
            continue;
        };
        let days = meta
            .coverage
            .iter()
            .filter_map(|(a, b)| Some(parse_day(a)?..=parse_day(b)?))
            .flatten()
            .collect();
        return Ok(Published {
            coverage: Coverage {
                version,
                days,
                published_us: info.timestamp.map(|t| t * 1000),
            },
            hash: meta.definition_hash,
            master_version: meta.master_version,
        });
    }
    Ok(Published {
        coverage: Coverage {
            version,
            ..Default::default()
        },
        ..Default::default()
    })
}

/// The batch layer: recomputes and publishes views.
#[derive(Clone)]
pub struct BatchLayer {
    storage: Storage,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    options: BatchOptions,
    progress: Option<Progress>,
    /// Per (schema, day, master version): the filter that leaves out repeated event ids, found
    /// once for every view of a run.
    repeats: Arc<std::sync::Mutex<RepeatsCache>>,
}

impl std::fmt::Debug for BatchLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchLayer")
            .field("storage", &self.storage)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A DataFusion session for batch work: strings read back as plain `Utf8`.
pub(crate) fn session() -> SessionContext {
    session_with(&BatchOptions::default()).expect("a session without a memory limit")
}

/// A session for batch work with `options`, on a runtime of its own.
pub(crate) fn session_with(options: &BatchOptions) -> Result<SessionContext> {
    Ok(session_on(options, runtime_with(options)?))
}

impl BatchLayer {
    pub fn new(storage: Storage, catalog: Arc<Catalog>, clock: Arc<dyn Clock>) -> Self {
        BatchLayer {
            storage,
            catalog,
            clock,
            options: BatchOptions::default(),
            progress: None,
            repeats: Default::default(),
        }
    }

    /// Runs with `options` (threads, memory limit, spill directory).
    pub fn with_options(mut self, options: BatchOptions) -> Self {
        self.options = options;
        self
    }

    /// Calls `progress` with each day's report as the day's recompute ends.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The event ids of `day` that more than one row holds (`None` if none does): a
    /// producer's retry is archived twice, and counted once. Found from the day's ids alone,
    /// once per day and master version for every view of the run, and recorded for the
    /// day's data files (`files`, which Delta never changes in place): a later run over the
    /// same files reads the record ([`RepeatsRecord`]) instead of the day's ids.
    async fn repeats(
        &self,
        ctx: &SessionContext,
        view: &ViewDef,
        day: &str,
        master_version: i64,
        files: &[String],
    ) -> Result<Repeats> {
        let key = (view.source.clone(), day.to_string(), master_version);
        if let Some(found) = self.repeats.lock().expect("not poisoned").get(&key) {
            return Ok(found.clone());
        }
        let schema = self.catalog.schema_of(view);
        let id = schema.fields[schema.event_id].name.clone();
        let started = Instant::now();
        let record = RepeatsRecord::new(&id, files);
        if let Some(found) = record.read(&self.storage, &view.source, day).await {
            tracing::debug!(schema = %view.source, day, seconds = started.elapsed().as_secs_f64(), repeated = found.as_ref().map_or(0, |f| f.len()), "repeated event ids read from the day's record");
            self.repeats
                .lock()
                .expect("not poisoned")
                .insert(key, found.clone());
            return Ok(found);
        }
        // Each id hashed to 64 bits as the day is read, on every thread; hashes that repeat are
        // found by sorting them. Only if any does is the day read again, to find the ids behind
        // those hashes exactly (a repeated hash may be two ids).
        let ids = ctx
            .table("master")
            .await?
            .filter(ident(DAY_COLUMN).eq(lit(day)))?
            .select(vec![ident(&id)])?;
        let hashes = for_each_partition(&ids, |batch, out: &mut Vec<u64>| {
            hash_ids(batch.column(0), out)
        })
        .await?;
        let threads = ctx.state().config().target_partitions();
        let candidates = tokio::task::spawn_blocking(move || repeated_hashes(hashes, threads))
            .await
            .map_err(|e| BatchError::BadRequest(format!("looking for repeated ids failed: {e}")))?;
        let repeated = match candidates.is_empty() {
            true => BTreeSet::new(),
            false => {
                let candidates = Arc::new(candidates);
                let found = for_each_partition(&ids, {
                    let candidates = Arc::clone(&candidates);
                    move |batch, out: &mut Vec<String>| {
                        ids_with_hashes(batch.column(0), &candidates, out)
                    }
                })
                .await?;
                repeated_ids(found.into_iter().flatten())
            }
        };
        tracing::debug!(schema = %view.source, day, seconds = started.elapsed().as_secs_f64(), repeated = repeated.len(), "repeated event ids looked for");
        let found = (!repeated.is_empty()).then(|| {
            tracing::info!(schema = %view.source, day, ids = repeated.len(), "rows repeating an event id are counted once");
            Arc::new(repeated.into_iter().collect::<Vec<_>>())
        });
        if !files.is_empty() {
            record.write(&self.storage, &view.source, day, &found).await;
        }
        self.repeats
            .lock()
            .expect("not poisoned")
            .insert(key, found.clone());
        Ok(found)
    }

    /// The storage this layer reads and publishes to.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The layer's clock, now.
    pub fn now_us(&self) -> i64 {
        self.clock.now_us()
    }

    /// Runs SQL job `job` for `date` (see crate::jobs::run_job), with this layer's options.
    pub async fn run_job(
        &self,
        job: &tandem_core::job::JobDef,
        date: chrono::NaiveDate,
        metadata: Vec<(String, Json)>,
    ) -> Result<crate::jobs::JobReport> {
        crate::jobs::run_job(
            &self.storage,
            &self.catalog,
            &self.options,
            job,
            date,
            metadata,
        )
        .await
    }

    /// The first day of `schema`'s master dataset that is not closed yet: days before it are
    /// final for the batch layer.
    ///
    /// A day is closed when the archiver has committed past its end (plus the grace of
    /// [`BatchOptions::close_grace`]) on every partition it has archived, or has caught up with
    /// a partition that holds nothing newer; never before the wall clock's today. Without an
    /// archiver (history imported only), every day before today is closed.
    pub async fn first_open_day(&self, schema: &str) -> Result<i64> {
        let today = day_of(self.clock.now_us());
        let store = self.storage.objects()?;
        let progress =
            tandem_core::master::PartitionProgress::read_all(store.as_ref(), schema).await?;
        let through = progress
            .iter()
            .map(|p| p.archived_through_us().unwrap_or(i64::MIN))
            .min();
        Ok(match through {
            None => today,
            Some(t) => {
                let grace = self.options.close_grace.as_micros() as i64;
                day_of(t.saturating_sub(grace)).min(today)
            }
        })
    }

    /// Recomputes and publishes every view (or the one named): [`Self::run_each`], failing
    /// with the first view's error.
    pub async fn run(&self, view: Option<&str>, req: &RunRequest) -> Result<Vec<PublishReport>> {
        let views: Vec<Arc<ViewDef>> = match view {
            Some(v) => vec![Arc::clone(self.catalog.view(v)?)],
            None => self.catalog.views.values().cloned().collect(),
        };
        self.run_each(&views, req).await.into_iter().collect()
    }

    /// Recomputes and publishes `views`, each in one commit of its own; gives each view's
    /// report or error, in their order.
    ///
    /// Day by day over the days any view recomputes: the views of one schema that recompute a
    /// day in this process read it once ([`SharedDay`]). A view that fails is left out of the
    /// rest of the run (nothing of it is published); the others go on.
    pub async fn run_each(
        &self,
        views: &[Arc<ViewDef>],
        req: &RunRequest,
    ) -> Vec<Result<PublishReport>> {
        // One runtime (memory pool, spill directory) for every view of the run: a day read
        // for several views is held in the pool their queries draw from.
        let runtime = match runtime_with(&self.options) {
            Ok(r) => r,
            Err(e) => {
                let message = e.to_string();
                return views
                    .iter()
                    .map(|_| Err(BatchError::BadRequest(message.clone())))
                    .collect();
            }
        };
        let mut planned = Vec::with_capacity(views.len());
        for v in views {
            planned.push(self.plan_view(v, req, &runtime).await);
        }
        let days: BTreeSet<String> = planned
            .iter()
            .filter_map(|p| match p {
                Ok(Planned::Run(r)) => Some(r.day_strings.iter().cloned()),
                _ => None,
            })
            .flatten()
            .collect();
        // Schemas whose day the memory pool could not hold: their views read alone for the
        // rest of the run (a day is not read in part again and again).
        let mut read_alone: BTreeSet<String> = BTreeSet::new();
        let mut upcoming = days.iter().skip(1);
        for day in &days {
            // The next day's repeated event ids are looked for while this day is computed
            // (they are kept for its read): the look reads one column and sorts its hashes,
            // and fills the time this day's threads wait on each other and on its files.
            let ahead = upcoming.next().and_then(|next| {
                planned.iter().find_map(|p| match p {
                    Ok(Planned::Run(r)) => r.files.get(next).map(|files| {
                        (
                            r.ctx.clone(),
                            r.view,
                            r.master_version,
                            next.clone(),
                            files.clone(),
                        )
                    }),
                    _ => None,
                })
            });
            let look_ahead = async {
                if let Some((ctx, view, version, next, files)) = ahead {
                    if let Err(e) = self.repeats(&ctx, view, &next, version, &files).await {
                        tracing::debug!(day = %next, error = %e, "looking ahead for repeated ids failed; looked for again when read");
                    }
                }
            };
            let this_day = async {
                let mut runs: Vec<&mut Result<Planned<'_>>> = planned
                    .iter_mut()
                    .filter(|p| matches!(p, Ok(Planned::Run(r)) if r.day_strings.contains(day)))
                    .collect();
                // Views that read the same files of the same snapshot here share the day's read.
                let mut done = vec![false; runs.len()];
                for i in 0..runs.len() {
                    if done[i] {
                        continue;
                    }
                    let mut together = vec![i];
                    together.extend((i + 1..runs.len()).filter(|&j| {
                        !done[j]
                            && match (&*runs[i], &*runs[j]) {
                                (Ok(Planned::Run(a)), Ok(Planned::Run(b))) => {
                                    a.shares_reads_with(b, day)
                                        && !read_alone.contains(&a.view.source)
                                }
                                _ => false,
                            }
                    }));
                    let read = match together.len() {
                        1 => Ok(None),
                        _ => {
                            let group: Vec<&ViewRun<'_>> = together
                                .iter()
                                .filter_map(|&j| match &*runs[j] {
                                    Ok(Planned::Run(r)) => Some(&**r),
                                    _ => None,
                                })
                                .collect();
                            let read = self.read_shared(&group, day).await;
                            if let (Ok(None), Some(r)) = (&read, group.first()) {
                                read_alone.insert(r.view.source.clone());
                            }
                            read
                        }
                    };
                    // A failed shared read fails each of its views: the first with the error.
                    let (shared, mut failed, message) = match read {
                        Ok(shared) => (shared, None, String::new()),
                        Err(e) => {
                            let message = format!("reading {day} for several views failed: {e}");
                            (None, Some(e), message)
                        }
                    };
                    let failing = failed.is_some();
                    for (k, &j) in together.iter().enumerate() {
                        done[j] = true;
                        let outcome = match &mut *runs[j] {
                            Ok(Planned::Run(_)) if failing => Err(failed
                                .take()
                                .unwrap_or_else(|| BatchError::BadRequest(message.clone()))),
                            Ok(Planned::Run(r)) => {
                                // The shared read's time is counted in the first view's day.
                                let read_seconds = match &shared {
                                    Some(s) if k == 0 => s.seconds,
                                    _ => 0.0,
                                };
                                r.run_day(self, day, shared.as_ref(), read_seconds).await
                            }
                            _ => Ok(()),
                        };
                        if let Err(e) = outcome {
                            *runs[j] = Err(e);
                        }
                    }
                }
            };
            tokio::join!(look_ahead, this_day);
        }
        let mut out = Vec::with_capacity(planned.len());
        for p in planned {
            out.push(match p {
                Ok(Planned::Done(report)) => Ok(report),
                Ok(Planned::Run(r)) => r.publish(req).await,
                Err(e) => Err(e),
            });
        }
        out
    }

    /// Recomputes the requested (or the new and dirty) closed days of `view` and publishes
    /// them in one commit.
    pub async fn run_view(&self, view: &ViewDef, req: &RunRequest) -> Result<PublishReport> {
        let runtime = runtime_with(&self.options)?;
        match self.plan_view(view, req, &runtime).await? {
            Planned::Done(report) => Ok(report),
            Planned::Run(mut r) => {
                for day in r.day_strings.clone() {
                    r.run_day(self, &day, None, 0.0).await?;
                }
                r.publish(req).await
            }
        }
    }

    /// What a run of `view` will recompute, with its session, its table and its writers
    /// opened; or the report of a run with nothing to do.
    async fn plan_view<'a>(
        &self,
        view: &'a ViewDef,
        req: &RunRequest,
        runtime: &Arc<RuntimeEnv>,
    ) -> Result<Planned<'a>> {
        let started = Instant::now();
        let mut report = PublishReport {
            view: view.name.clone(),
            ..Default::default()
        };
        let master_url = self.storage.layout().master(&view.source);
        let Some(master) = self.storage.open(&master_url).await? else {
            tracing::info!(view = %view.name, "no master dataset yet; nothing to compute");
            return Ok(Planned::Done(report));
        };
        let master_version = master.version().map(|v| v as i64).unwrap_or(0);
        let view_url = self.storage.layout().view(&view.name);
        let existing = self.storage.open(&view_url).await?;
        let previous = match &existing {
            Some(t) => published(t).await?,
            None => Published::default(),
        };
        let same_definition = previous.hash.as_deref() == Some(view.definition_hash.as_str());
        let today = self.first_open_day(&view.source).await?;

        let ctx = session_on(&self.options, Arc::clone(runtime));
        ctx.register_table("master", master.table_provider().await?)?;
        // The master's files, by their paths in its table, for crate::dayscan.
        let master_store = datafusion::execution::object_store::ObjectStoreUrl::parse(format!(
            "tandem-master://{}",
            view.source.to_ascii_lowercase()
        ))?;
        ctx.runtime_env()
            .register_object_store(master_store.as_ref(), master.object_store());
        // On a Ballista cluster the scans and the first phase run on its executors, which read
        // the day's Parquet files (the snapshot's, named one by one) from the same store.
        let remote = match &self.options.engine {
            Some(url) => {
                use ballista::prelude::SessionContextExt as _;
                let state = session_with(&self.options)?.state();
                Some(
                    SessionContext::remote_with_state(url, state)
                        .await
                        .map_err(|e| {
                            BatchError::BadRequest(format!("the Ballista scheduler at {url}: {e}"))
                        })?,
                )
            }
            None => None,
        };
        // Tandem's sketch aggregate is not registered on executors: a view with several
        // distinct fields (which needs it in DataFusion's plan) is computed here.
        let distinct_fields = distinct_fields(view);
        let remote = match remote {
            Some(_) if distinct_fields.len() > 1 => {
                tracing::warn!(view = %view.name, "several distinct fields: computed in this process, not on the Ballista cluster");
                None
            }
            r => r,
        };
        // The days the master holds, from its snapshot's file list (no scan).
        let files = master_files(&master, &master_url).await?;
        let available: BTreeSet<i64> = files.keys().filter_map(|d| parse_day(d)).collect();
        let days: BTreeSet<i64> = match (req.from_day, req.to_day) {
            (Some(a), Some(b)) => {
                if a > b {
                    return Err(BatchError::BadRequest("--from is after --to".into()));
                }
                if b >= today {
                    return Err(BatchError::BadRequest(format!(
                        "{} is not closed yet: the first open day is {} (the archiver has not \
                         committed past the day's end plus the grace, or it is today)",
                        day_string(b),
                        day_string(today)
                    )));
                }
                (a..=b).collect()
            }
            (None, None) => {
                let closed: BTreeSet<i64> =
                    available.iter().copied().filter(|&d| d < today).collect();
                if req.full || !same_definition {
                    closed
                } else {
                    match dirty_days(&master, previous.master_version, master_version).await? {
                        Some(dirty) => closed
                            .iter()
                            .copied()
                            .filter(|d| !previous.coverage.days.contains(d) || dirty.contains(d))
                            .collect(),
                        None => closed,
                    }
                }
            }
            _ => {
                return Err(BatchError::BadRequest(
                    "give both --from and --to, or neither".into(),
                ))
            }
        };
        if days.is_empty() {
            tracing::info!(view = %view.name, "every closed day is covered and clean; nothing to publish");
            report.version = existing.and_then(|t| t.version()).map(|v| v as i64);
            return Ok(Planned::Done(report));
        }
        let day_strings: Vec<String> = days.iter().map(|&d| day_string(d)).collect();
        // Day by day: a view's buckets never span days, so each day is a query of its own and
        // a recompute holds one day's working set, however long the range. Each day's rows are
        // written to files as soon as they are computed and all are committed at the end, in
        // one commit; only a changed definition (a new schema replacing every row) is written
        // from memory by one Delta write.
        let schema = view.batch_schema();
        let table = match existing {
            Some(t) if same_definition => Some(t),
            Some(_) => None,
            None => Some(
                self.storage
                    .open_or_create(&view_url, &schema, &[ROLLUP_COLUMN, DAY_COLUMN])
                    .await?,
            ),
        };
        // As many file writers as threads: a day's tables are encoded in parallel.
        let writers = match &table {
            Some(t) => {
                let n = ctx.state().config().target_partitions().max(1);
                let mut w = Vec::with_capacity(n);
                for _ in 0..n {
                    w.push(
                        RecordBatchWriter::for_table(t)
                            .map_err(|e| BatchError::delta(&view_url, e))?
                            .with_writer_properties(writer_properties(view)),
                    );
                }
                Some(w)
            }
            None => None,
        };
        Ok(Planned::Run(Box::new(ViewRun {
            view,
            busy: started.elapsed().as_secs_f64(),
            report,
            master_url,
            master,
            master_version,
            view_url,
            previous,
            same_definition,
            ctx,
            master_store,
            remote,
            files,
            days,
            day_strings,
            schema,
            table,
            writers,
            adds: Vec::new(),
            batches: Vec::new(),
            storage: self.storage.clone(),
        })))
    }

    /// Reads `day` once for every run of `runs` (views of one schema, one snapshot of its
    /// master, computed here): the columns any of them reads, each event id once, held in
    /// the memory pool. `None` if the pool cannot hold the day: each view then reads it alone.
    async fn read_shared(&self, runs: &[&ViewRun<'_>], day: &str) -> Result<Option<SharedDay>> {
        let Some(first) = runs.first() else {
            return Ok(None);
        };
        let Some(paths) = first.files.get(day) else {
            return Ok(None);
        };
        let started = Instant::now();
        let ctx = &first.ctx;
        let schema = self.catalog.schema_of(first.view);
        // Text dimensions of any of the views are read as the dictionaries they are stored
        // in, unless one of the views counts a field's distinct values (crate::dayscan).
        let distinct: BTreeSet<&str> = runs.iter().flat_map(|r| distinct_fields(r.view)).collect();
        let dictionary: Vec<&str> = runs
            .iter()
            .flat_map(|r| r.view.dimensions.iter().map(String::as_str))
            .filter(|d| !distinct.contains(d))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let table = crate::dayscan::DayFiles::open(
            &first.master.object_store(),
            first.master_store.clone(),
            paths,
            &without_day(schema),
            &dictionary,
        )
        .await?;
        let mut df = ctx.read_table(Arc::new(table))?;
        let mut columns = BTreeSet::new();
        for r in runs {
            columns.extend(view_columns(r.view, schema, &df)?);
        }
        let files = first.files.get(day).map_or(&[][..], |f| f.as_slice());
        if let Some(ids) = self
            .repeats(ctx, first.view, day, first.master_version, files)
            .await?
        {
            df = once_per_id(df, schema, &ids)?;
        }
        let df = df.select(
            columns
                .iter()
                .map(|c| ident(c.as_str()))
                .collect::<Vec<_>>(),
        )?;
        let plan = df.create_physical_plan().await?;
        let Some((events, held)) = collect_within_pool(Arc::clone(&plan), ctx).await? else {
            tracing::info!(schema = %first.view.source, day, "the day's events exceed the memory limit: each view reads them alone from now on");
            return Ok(None);
        };
        let read = Read::of(plan.as_ref());
        // The distinct values that views fold as events, numbered once for them all.
        let fields: BTreeSet<String> = runs
            .iter()
            .filter(|r| r.view.filter.is_none())
            .filter_map(|r| {
                let fields = distinct_fields(r.view);
                (fields.len() == 1).then(|| fields.into_iter().next().map(str::to_string))?
            })
            .collect();
        let mut numbered = BTreeMap::new();
        let threads = ctx.state().config().target_partitions().max(1);
        for f in fields {
            let Some(arrays) = events
                .iter()
                .map(|b| b.column_by_name(&f).cloned())
                .collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let ids = tokio::task::spawn_blocking(move || {
                crate::value_ids::NumberedArrays::of(arrays, threads)
            })
            .await
            .map_err(|e| BatchError::BadRequest(format!("numbering the values failed: {e}")))??;
            numbered.insert(f, Arc::new(ids));
        }
        let seconds = started.elapsed().as_secs_f64();
        let names: Vec<&str> = runs.iter().map(|r| r.view.name.as_str()).collect();
        tracing::debug!(schema = %first.view.source, day, views = ?names, rows = read.rows, seconds, "day read once for its views");
        Ok(Some(SharedDay {
            schema: plan.schema(),
            events,
            numbered,
            read,
            seconds,
            _held: held,
        }))
    }

    /// The exact rows of `view` for `day` and its rollups' rows, in the view's batch schema,
    /// and what was read.
    ///
    /// With `files` (URLs of the day's Parquet files), the day is read from those files alone:
    /// how a Ballista cluster's executors read it.
    pub(crate) async fn compute(
        &self,
        ctx: &SessionContext,
        view: &ViewDef,
        day: &str,
        source: DaySource<'_>,
        repeats: Option<&Arc<Vec<String>>>,
    ) -> Result<(Rows, Read)> {
        let schema = self.catalog.schema_of(view);
        let distinct_fields = distinct_fields(view);
        // The view's text dimensions are read as the dictionaries they are stored in where the
        // cube pass takes them (one distinct field; not the distinct field itself).
        let dictionary: Vec<&str> = match distinct_fields.len() {
            1 => view
                .dimensions
                .iter()
                .map(String::as_str)
                .filter(|d| !distinct_fields.contains(d))
                .collect(),
            _ => Vec::new(),
        };
        let mut df = match &source {
            DaySource::Shared(shared) => {
                use datafusion::datasource::MemTable;
                let threads = ctx.state().config().target_partitions().max(1);
                let mut partitions = vec![Vec::new(); threads];
                for (i, b) in shared.events.iter().enumerate() {
                    partitions[i % threads].push(b.clone());
                }
                let table = MemTable::try_new(Arc::clone(&shared.schema), partitions)?;
                ctx.read_table(Arc::new(table))?
            }
            // Read from the day's files by a table of their own, not through the Delta table
            // provider: it hands a filter on to deltalake's own expressions, which recurse
            // once per item of a list (a day's thousands of repeated ids overflowed the
            // stack).
            DaySource::Files(local) => {
                let table = crate::dayscan::DayFiles::open(
                    &local.store,
                    local.url.clone(),
                    local.paths,
                    &without_day(schema),
                    &dictionary,
                )
                .await?;
                ctx.read_table(Arc::new(table))?
            }
            DaySource::Remote(files) => {
                use datafusion::datasource::file_format::parquet::ParquetFormat;
                use datafusion::datasource::listing::{
                    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
                };
                let urls = files
                    .iter()
                    .map(ListingTableUrl::parse)
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                let config = ListingTableConfig::new_with_multi_paths(urls)
                    .with_listing_options(
                        ListingOptions::new(Arc::new(ParquetFormat::default()))
                            .with_file_extension(".parquet"),
                    )
                    .with_schema(Arc::new(without_day(schema)));
                ctx.read_table(Arc::new(ListingTable::try_new(config)?))?
            }
        };
        if let Some(ids) = repeats {
            df = once_per_id(df, schema, ids)?;
        }
        if let Some(f) = &view.filter {
            let predicate = df.parse_sql_expr(f)?;
            df = df.filter(predicate)?;
        }
        // A view's buckets (minute, hour, day) are fixed widths in UTC: the bucket is integer
        // arithmetic on the microseconds (date_trunc goes through time-zone rules per row);
        // times before 1970, where division rounds the wrong way, take date_trunc.
        let time = ident(schema.event_time_name());
        let width = view.granularity.micros();
        let micros = cast_expr(time.clone(), DataType::Int64);
        let bucket = when(
            micros.clone().gt_eq(lit(0i64)),
            cast_expr(
                micros / lit(width) * lit(width),
                tandem_core::schema::timestamp_type(),
            ),
        )
        .otherwise(date_trunc(lit(view.granularity.as_str()), time))?
        .alias(BUCKET_COLUMN);
        // Text, or (for the events the cube pass reads) the dictionaries they were read as.
        let text_dims: Vec<Expr> = view
            .dimensions
            .iter()
            .map(|d| cast_expr(ident(d), DataType::Utf8).alias(d))
            .collect();
        let dims: Vec<Expr> = view
            .dimensions
            .iter()
            .zip(&text_dims)
            .map(
                |(d, text)| match df.schema().field_with_unqualified_name(d) {
                    Ok(f) if matches!(f.data_type(), DataType::Dictionary(..)) => ident(d).alias(d),
                    _ => text.clone(),
                },
            )
            .collect();

        let metrics = || view.metrics.iter().enumerate();
        let threads = ctx.state().config().target_partitions();
        // One distinct field: DataFusion reads the day's events as the view sees them (bucket,
        // dimensions, the distinct field, each metric's partial of one event), and one pass
        // over them builds the view's rows, each distinct value counted once a group, and the
        // rollups' (crate::cube): its distinct values are numbered once (crate::value_ids), and
        // each group's counted in a sort of (group, number) pairs, whether values repeat within
        // groups or not. A first phase grouped by the keys and the distinct field is computed
        // by DataFusion only when the memory pool cannot hold the day's events (spilling as it
        // must), and the same pass takes its rows. No distinct
        // metric: DataFusion computes the view's rows, the same pass the rollups. Several
        // distinct fields: DataFusion computes the view's rows in one phase and the rollups are
        // merged from them (crate::rollup).
        const F: &str = "__distinct";
        let mut grouped = None;
        let (df, cube_input) = match distinct_fields.len() {
            1 => {
                let f = *distinct_fields.iter().next().expect("one");
                let mut columns = vec![bucket.clone()];
                columns.extend(dims);
                columns.push(ident(f).alias(F));
                for (_, m) in metrics() {
                    columns.extend(event_exprs(m)?);
                }
                // Grouped by text: DataFusion's grouping spills text keys, not dictionaries.
                let mut keys = vec![bucket];
                keys.extend(text_dims);
                keys.push(ident(f).alias(F));
                let partials = metrics()
                    .filter(|(_, m)| m.kind != MetricKind::Distinct)
                    .flat_map(|(_, m)| metric_exprs(m))
                    .collect();
                grouped = Some(df.clone().aggregate(keys, partials)?);
                (df.select(columns)?, Some(Some(F)))
            }
            n => {
                let mut group = vec![bucket];
                group.extend(text_dims);
                let aggs = metrics().flat_map(|(_, m)| metric_exprs(m)).collect();
                (df.aggregate(group, aggs)?, (n == 0).then_some(None))
            }
        };
        let started = Instant::now();
        let mut plan = df.create_physical_plan().await?;
        // The day's events, held in the memory pool until the view's rows are built.
        let mut held = None;
        // The rows, and whether they are events (a value may come again within a group) or
        // the first phase's (each value once a group).
        let (collected, events) = match grouped {
            None => (collect(Arc::clone(&plan), ctx.task_ctx()).await?, false),
            Some(grouped) => match collect_within_pool(Arc::clone(&plan), ctx).await? {
                Some((events, reservation)) => {
                    held = Some(reservation);
                    (events, true)
                }
                None => {
                    tracing::info!(view = %view.name, day, "the day's events exceed the memory limit: grouped by the keys and the distinct value first, spilling as needed");
                    plan = grouped.create_physical_plan().await?;
                    (collect(Arc::clone(&plan), ctx.task_ctx()).await?, false)
                }
            },
        };
        let read = match &source {
            // The day was read for several views: each reports that read.
            DaySource::Shared(shared) => Read {
                spilled: Read::of(plan.as_ref()).spilled,
                ..shared.read
            },
            _ => Read::of(plan.as_ref()),
        };
        tracing::trace!(plan = %datafusion::physical_plan::display::DisplayableExecutionPlan::with_metrics(plan.as_ref()).indent(true), "first phase");
        tracing::debug!(view = %view.name, seconds = started.elapsed().as_secs_f64(), rows = collected.iter().map(RecordBatch::num_rows).sum::<usize>(), "first phase computed");
        let started = Instant::now();
        let tables = match cube_input {
            Some(distinct) => {
                let view = view.clone();
                // The shared read's numbers of the distinct values, if it numbered them.
                let numbered = match (&source, &view.filter) {
                    (DaySource::Shared(shared), None) => distinct_fields
                        .iter()
                        .next()
                        .and_then(|f| shared.numbered.get(*f))
                        .map(Arc::clone),
                    _ => None,
                };
                tokio::task::spawn_blocking(move || {
                    let numbered = numbered.as_deref();
                    crate::cube::build(&view, &collected, distinct, events, numbered, threads)
                })
                .await
                .map_err(|e| {
                    BatchError::BadRequest(format!("building the view's rows failed: {e}"))
                })??
            }
            None => {
                let base = final_rows(view, collected)?;
                let (view, b) = (view.clone(), base.clone());
                let rollups =
                    tokio::task::spawn_blocking(move || crate::rollup::compute(&view, &b))
                        .await
                        .map_err(|e| {
                            BatchError::BadRequest(format!("computing rollups failed: {e}"))
                        })??;
                base.into_iter().chain(rollups).collect()
            }
        };
        tracing::debug!(view = %view.name, seconds = started.elapsed().as_secs_f64(), "view and rollup rows built");
        drop(held);
        let mut out = Rows::default();
        for b in tables {
            let base = b
                .column_by_name(ROLLUP_COLUMN)
                .map(|c| c.as_string::<i32>().value(0) == BASE_ROLLUP)
                .unwrap_or(false);
            if base {
                out.rows += b.num_rows();
            } else {
                out.rollup_rows += b.num_rows();
            }
            out.batches.push(b);
        }
        Ok((out, read))
    }
}

/// A day's files of the master, read in this process: the store registered under `url`, and
/// the files' paths in it.
pub(crate) struct MasterDay<'a> {
    pub url: &'a datafusion::execution::object_store::ObjectStoreUrl,
    pub store: Arc<dyn object_store::ObjectStore>,
    pub paths: &'a [String],
}

/// A day's rows: the view's and its rollups', in the view's batch schema.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub batches: Vec<RecordBatch>,
    /// The view's own rows and the rollups' among `batches`.
    pub rows: usize,
    pub rollup_rows: usize,
}

/// A view's run: planned, or found to have nothing to do.
enum Planned<'a> {
    Done(PublishReport),
    Run(Box<ViewRun<'a>>),
}

/// One view's run in progress: what it recomputes, its session, its table and writers, the
/// files written so far.
struct ViewRun<'a> {
    view: &'a ViewDef,
    /// Seconds spent on this view so far (its days interleave with other views' in a run).
    busy: f64,
    report: PublishReport,
    master_url: url::Url,
    master: DeltaTable,
    master_version: i64,
    view_url: url::Url,
    previous: Published,
    same_definition: bool,
    ctx: SessionContext,
    /// Where the session finds the master's files (crate::dayscan).
    master_store: datafusion::execution::object_store::ObjectStoreUrl,
    /// A Ballista cluster's session, when the day's scan and first phase run there.
    remote: Option<SessionContext>,
    /// The master snapshot's files, by day.
    files: std::collections::BTreeMap<String, Vec<String>>,
    days: BTreeSet<i64>,
    day_strings: Vec<String>,
    schema: datafusion::arrow::datatypes::SchemaRef,
    /// The view's table, unless a changed definition rewrites it from `batches`.
    table: Option<DeltaTable>,
    writers: Option<Vec<RecordBatchWriter>>,
    adds: Vec<deltalake::kernel::Add>,
    batches: Vec<RecordBatch>,
    storage: Storage,
}

/// A day's events read once for several views of one schema: the columns any of them reads,
/// each event id once, held in the memory pool until every view has computed the day.
pub(crate) struct SharedDay {
    schema: datafusion::arrow::datatypes::SchemaRef,
    events: Vec<RecordBatch>,
    /// Per field that a view of the day counts the distinct values of (its only distinct
    /// field, with no filter of its own), the values of its arrays numbered once for them
    /// all (crate::value_ids).
    numbered: BTreeMap<String, Arc<crate::value_ids::NumberedArrays>>,
    read: Read,
    seconds: f64,
    _held: MemoryReservation,
}

impl ViewRun<'_> {
    /// Whether this run and `other` read the same files for `day` here (not on a cluster):
    /// the same schema's master, at the same snapshot.
    fn shares_reads_with(&self, other: &ViewRun<'_>, day: &str) -> bool {
        self.remote.is_none()
            && other.remote.is_none()
            && self.master_url == other.master_url
            && self.master_version == other.master_version
            && self.files.contains_key(day)
            && self.files.get(day) == other.files.get(day)
    }

    /// Recomputes `day` (from `shared`, the day's events read for several views, if given)
    /// and writes its files; `read_seconds` of the shared read are counted in its time.
    async fn run_day(
        &mut self,
        layer: &BatchLayer,
        day: &str,
        shared: Option<&SharedDay>,
        read_seconds: f64,
    ) -> Result<()> {
        let view = self.view;
        let day_started = Instant::now();
        let repeats = match (self.files.get(day), shared) {
            (Some(files), None) => {
                layer
                    .repeats(&self.ctx, view, day, self.master_version, files)
                    .await?
            }
            _ => None,
        };
        let repeats = repeats.as_ref();
        let source = match (self.files.get(day), &self.remote, shared) {
            (None, _, _) => None,
            (Some(_), _, Some(shared)) => Some((&self.ctx, DaySource::Shared(shared))),
            (Some(paths), None, None) => Some((
                &self.ctx,
                DaySource::Files(MasterDay {
                    url: &self.master_store,
                    store: self.master.object_store(),
                    paths,
                }),
            )),
            (Some(day_files), Some(remote), None) => {
                let urls = day_files
                    .iter()
                    .map(|f| {
                        self.master_url.join(f).map(String::from).map_err(|e| {
                            BatchError::BadRequest(format!("file {f} of the master: {e}"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some((remote, DaySource::Remote(urls)))
            }
        };
        let (rows, read) = match source {
            None => Default::default(),
            Some((ctx, source)) => layer.compute(ctx, view, day, source, repeats).await?,
        };
        let mut day_report = DayReport {
            day: day.to_string(),
            rows_read: read.rows,
            bytes_read: read.bytes,
            spilled_bytes: read.spilled,
            rows: rows.rows,
            rollup_rows: rows.rollup_rows,
            seconds: day_started.elapsed().as_secs_f64() + read_seconds,
            write_seconds: 0.0,
        };
        let write_started = Instant::now();
        match &mut self.writers {
            Some(w) => {
                self.adds.extend(
                    write_files(w, rows.batches)
                        .await
                        .map_err(|e| BatchError::delta(&self.view_url, e))?,
                );
            }
            None => self.batches.extend(rows.batches),
        }
        day_report.write_seconds = write_started.elapsed().as_secs_f64();
        tracing::debug!(view = %view.name, day = %day, rows_read = read.rows, rows = day_report.rows, "day computed");
        if let Some(p) = &layer.progress {
            p(&view.name, &day_report);
        }
        let report = &mut self.report;
        report.rows += rows.rows;
        report.rollup_rows += rows.rollup_rows;
        report.rows_read += read.rows;
        report.bytes_read += read.bytes;
        report.per_day.push(day_report);
        self.busy += day_started.elapsed().as_secs_f64() + read_seconds;
        Ok(())
    }

    /// Publishes the recomputed days: one commit replaces exactly those days and records the
    /// coverage.
    async fn publish(self, req: &RunRequest) -> Result<PublishReport> {
        let ViewRun {
            view,
            busy,
            mut report,
            master_version,
            view_url,
            previous,
            same_definition,
            days,
            day_strings,
            schema,
            table,
            adds,
            batches,
            storage,
            ..
        } = self;
        let publish_started = Instant::now();
        if let Some(table) = table {
            let version = publish_days(
                view,
                &view_url,
                table,
                adds,
                &days,
                master_version,
                same_definition.then_some(&previous.coverage.days),
                &req.metadata,
            )
            .await?;
            report.version = Some(version);
            report.days = day_strings;
            report.publish_seconds = publish_started.elapsed().as_secs_f64();
            report.seconds = busy + report.publish_seconds;
            tracing::info!(view = %view.name, days = report.days.len(), rows = report.rows, rollup_rows = report.rollup_rows, version = ?report.version, "published");
            return Ok(report);
        }
        let props = publish_properties(view, &days, &days, master_version, &req.metadata);
        let table = storage
            .open_or_create(&view_url, &schema, &[ROLLUP_COLUMN, DAY_COLUMN])
            .await?;
        let batches = if batches.is_empty() {
            vec![RecordBatch::new_empty(schema)]
        } else {
            batches
        };
        // A changed definition: every row of the old one goes, with its schema.
        let table = table
            .write(batches)
            .with_save_mode(SaveMode::Overwrite)
            .with_partition_columns([ROLLUP_COLUMN, DAY_COLUMN])
            .with_commit_properties(props)
            .with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite)
            .await
            .map_err(|e| conflict_or(view, &view_url, e))?;
        report.version = table.version().map(|v| v as i64);
        report.days = day_strings;
        report.publish_seconds = publish_started.elapsed().as_secs_f64();
        report.seconds = busy + report.publish_seconds;
        tracing::info!(view = %view.name, days = report.days.len(), rows = report.rows, rollup_rows = report.rollup_rows, version = ?report.version, "published");
        Ok(report)
    }
}

/// Where a view's day is read from.
pub(crate) enum DaySource<'a> {
    /// The day's files, read in this process.
    Files(MasterDay<'a>),
    /// The day's files by URL, read by a Ballista cluster's executors.
    Remote(Vec<String>),
    /// The day's events, read once for several views.
    Shared(&'a SharedDay),
}

/// The master's columns without its day partition: what a day's files hold.
fn without_day(schema: &tandem_core::schema::EventSchema) -> datafusion::arrow::datatypes::Schema {
    let master = schema.master_schema();
    let fields: Vec<_> = master
        .fields()
        .iter()
        .filter(|f| f.name() != DAY_COLUMN)
        .cloned()
        .collect();
    datafusion::arrow::datatypes::Schema::new(fields)
}

/// The event fields `view` reads: its time, dimensions, metric fields and those its filter
/// names (parsed against `df`, the master's columns).
fn view_columns(
    view: &ViewDef,
    schema: &tandem_core::schema::EventSchema,
    df: &datafusion::dataframe::DataFrame,
) -> Result<BTreeSet<String>> {
    let mut columns = BTreeSet::new();
    columns.insert(schema.event_time_name().to_string());
    columns.extend(view.dimensions.iter().cloned());
    columns.extend(view.metrics.iter().filter_map(|m| m.field.clone()));
    if let Some(f) = &view.filter {
        let predicate = df.parse_sql_expr(f)?;
        columns.extend(predicate.column_refs().into_iter().map(|c| c.name.clone()));
    }
    Ok(columns)
}

/// A runtime for batch work with `options`: a memory pool that spills (shared fairly among a
/// query's spilling operators; crate::pool) when a limit is set, and the spill directory.
fn runtime_with(options: &BatchOptions) -> Result<Arc<RuntimeEnv>> {
    let mut runtime = RuntimeEnvBuilder::new();
    if let Some(limit) = options.memory_limit {
        runtime = runtime.with_memory_pool(Arc::new(crate::pool::BatchPool::new(limit)));
    }
    if let Some(dir) = &options.spill_dir {
        std::fs::create_dir_all(dir).map_err(|source| BatchError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        runtime = runtime.with_temp_file_path(dir);
    }
    Ok(runtime.build_arc()?)
}

/// A session for batch work with `options` on `runtime`: its threads, and strings read back
/// as plain `Utf8` (`Utf8View` grouping was no faster here, and reserves memory in blocks of
/// megabytes, which a small memory limit cannot spare).
fn session_on(options: &BatchOptions, runtime: Arc<RuntimeEnv>) -> SessionContext {
    let mut config = SessionConfig::new();
    if let Some(n) = options.threads {
        config = config.with_target_partitions(n.max(1));
    }
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    if let Some(limit) = options.memory_limit {
        // An operator reserves memory a batch at a time; under a small limit, batches are made
        // small enough that one batch's reservation leaves room to spill (4 KiB of pool per
        // row of a batch; the default 8,192 rows from 32 MiB up).
        let rows = (limit / 4096).max(256).min(config.batch_size());
        config = config.with_batch_size(rows);
    }
    SessionContext::new_with_config_rt(config, runtime)
}

/// The one-phase plan's output in the view's batch schema (the view's own rows).
fn final_rows(view: &ViewDef, collected: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
    let target = view.batch_schema();
    let mut out = Vec::new();
    for b in collected {
        if b.num_rows() == 0 {
            continue;
        }
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
        for field in target.fields() {
            if field.name() == ROLLUP_COLUMN {
                columns.push(Arc::new(StringArray::from_iter_values(
                    std::iter::repeat_n(BASE_ROLLUP, b.num_rows()),
                )));
                continue;
            }
            if field.name() == DAY_COLUMN {
                let buckets = b
                    .column_by_name(BUCKET_COLUMN)
                    .expect("bucket")
                    .as_primitive::<TimestampMicrosecondType>();
                let dt: StringArray = buckets
                    .iter()
                    .map(|t| t.map(|t| day_string(day_of(t))))
                    .collect();
                columns.push(Arc::new(dt));
                continue;
            }
            let col = b.column_by_name(field.name()).ok_or_else(|| {
                BatchError::BadRequest(format!("plan lost column {}", field.name()))
            })?;
            columns.push(if col.data_type() == field.data_type() {
                Arc::clone(col)
            } else {
                cast(col, field.data_type())?
            });
        }
        let nulls_ok = columns
            .iter()
            .zip(target.fields())
            .all(|(c, f)| f.is_nullable() || c.null_count() == 0);
        if !nulls_ok {
            return Err(BatchError::BadRequest(format!(
                "view `{}`: a non-null column came out null",
                view.name
            )));
        }
        out.push(RecordBatch::try_new(Arc::clone(&target), columns)?);
    }
    Ok(out)
}

/// Writes `batches` to files with `writers` in parallel (the largest batches first, each to
/// the writer with the fewest rows so far) and returns the files' add actions; the writers
/// are handed back for the next day.
async fn write_files(
    writers: &mut Vec<RecordBatchWriter>,
    mut batches: Vec<RecordBatch>,
) -> std::result::Result<Vec<deltalake::kernel::Add>, deltalake::DeltaTableError> {
    batches.sort_by_key(|b| std::cmp::Reverse(b.num_rows()));
    let mut shares: Vec<(usize, Vec<RecordBatch>)> =
        (0..writers.len()).map(|_| (0, Vec::new())).collect();
    for b in batches {
        let least = shares
            .iter_mut()
            .min_by_key(|(rows, _)| *rows)
            .expect("at least one writer");
        least.0 += b.num_rows();
        least.1.push(b);
    }
    let tasks: Vec<_> = std::mem::take(writers)
        .into_iter()
        .zip(shares)
        .map(|(mut w, (_, share))| {
            tokio::spawn(async move {
                for b in share {
                    // A table's batch holds one rollup's rows of one day: written as the one
                    // partition it is, not split by deltalake (a sort and a copy of every
                    // column).
                    let values: Option<Vec<(String, _)>> = [ROLLUP_COLUMN, DAY_COLUMN]
                        .iter()
                        .map(|c| {
                            let column = b.column_by_name(c).filter(|a| one_value(a))?;
                            let value = ScalarExt::from_array(column.as_ref(), 0)?;
                            Some((c.to_string(), value))
                        })
                        .collect();
                    match values {
                        Some(values) => {
                            let values = values.into_iter().collect();
                            w.write_partition(b, &values, WriteMode::Default).await?;
                        }
                        None => w.write(b).await?,
                    }
                }
                let adds = w.flush().await?;
                Ok::<_, deltalake::DeltaTableError>((w, adds))
            })
        })
        .collect();
    let mut adds = Vec::new();
    let mut failed = None;
    for t in tasks {
        match t.await {
            Ok(Ok((w, a))) => {
                writers.push(w);
                adds.extend(a);
            }
            Ok(Err(e)) => failed = Some(e),
            Err(e) => {
                failed = Some(deltalake::DeltaTableError::Generic(format!(
                    "a file writer failed: {e}"
                )))
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(adds),
    }
}

/// Whether `a` is text holding one value in every row (and no null).
fn one_value(a: &ArrayRef) -> bool {
    match a.as_string_opt::<i32>() {
        Some(text) if !text.is_empty() && text.null_count() == 0 => {
            let first = text.value(0);
            (1..text.len()).all(|i| text.value(i) == first)
        }
        _ => false,
    }
}

/// How a view's files are written: sketches (unique bytes per row, never filtered on) without
/// a dictionary or statistics; dimensions without statistics (a file's rows come in no order
/// of them, so every file and row group spans about all their values, and their bounds never
/// let a reader skip one; computing them compared every value); everything else as deltalake
/// writes it (Snappy, dictionaries, page statistics for pruning by time).
fn writer_properties(view: &ViewDef) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(1 << 20));
    for d in &view.dimensions {
        b = b.set_column_statistics_enabled(ColumnPath::from(d.as_str()), EnabledStatistics::None);
    }
    for m in &view.metrics {
        for f in m.batch_fields() {
            if f.data_type() == &DataType::Binary {
                let column = ColumnPath::from(f.name().as_str());
                b = b
                    .set_column_dictionary_enabled(column.clone(), false)
                    .set_column_statistics_enabled(column, EnabledStatistics::None);
            }
        }
    }
    b.build()
}

/// The master dataset's data files by day (`dt`), from its snapshot: paths relative to the
/// table.
async fn master_files(
    master: &DeltaTable,
    url: &url::Url,
) -> Result<std::collections::BTreeMap<String, Vec<String>>> {
    let files: Vec<_> = master
        .get_active_add_actions_by_partitions(&[])
        .try_collect()
        .await
        .map_err(|e| BatchError::delta(url, e))?;
    let mut out = std::collections::BTreeMap::<String, Vec<String>>::new();
    for f in files {
        if let Some(Some(day)) = f.partition_values_map().get(DAY_COLUMN).cloned() {
            out.entry(day)
                .or_default()
                .push(f.object_store_path().to_string());
        }
    }
    Ok(out)
}

/// What a plan's scans read, from their metrics.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Read {
    pub rows: u64,
    pub bytes: u64,
    /// Bytes spilled to disk under the memory limit.
    pub spilled: u64,
}

impl Read {
    /// Sums the leaves' (the scans') output rows and Parquet bytes scanned, and every
    /// operator's spilled bytes.
    fn of(plan: &dyn ExecutionPlan) -> Self {
        let m = plan.metrics().unwrap_or_default();
        let sum = |name: &str| {
            m.sum_by_name(name)
                .map(|v| v.as_usize() as u64)
                .unwrap_or(0)
        };
        let children = plan.children();
        let own = Read {
            spilled: m.spilled_bytes().unwrap_or(0) as u64,
            ..Default::default()
        };
        if children.is_empty() {
            return Read {
                rows: m.output_rows().unwrap_or(0) as u64,
                bytes: sum("bytes_scanned"),
                ..own
            };
        }
        children.into_iter().fold(own, |acc, c| {
            let r = Read::of(c.as_ref());
            Read {
                rows: acc.rows + r.rows,
                bytes: acc.bytes + r.bytes,
                spilled: acc.spilled + r.spilled,
            }
        })
    }
}

/// The aggregates that compute a metric's batch view columns ([`MetricDef::batch_fields`],
/// named as they are) in a one-phase plan.
fn metric_exprs(m: &MetricDef) -> Vec<Expr> {
    let columns: Vec<String> = m.batch_fields().iter().map(|f| f.name().clone()).collect();
    let field = || ident(m.field.as_deref().unwrap_or_default());
    let named = |j: usize, e: Expr| e.alias(&columns[j]);
    let hll = |x: Expr| HllSketchUdaf::udaf(m.lg_k()).call(vec![x]);
    match m.kind {
        MetricKind::Count => vec![named(0, count(lit(1)))],
        MetricKind::Sum => vec![named(0, sum(field()))],
        MetricKind::Min => vec![named(0, min(field()))],
        MetricKind::Max => vec![named(0, max(field()))],
        MetricKind::Distinct => {
            vec![named(0, count_distinct(field())), named(1, hll(field()))]
        }
        MetricKind::Avg => vec![named(0, sum(field())), named(1, count(field()))],
    }
}

/// A metric's partials for one event, named and typed as its batch columns (what
/// [`metric_exprs`] gives for a group of one event; none for a distinct metric: the events'
/// values are read as they are).
fn event_exprs(m: &MetricDef) -> Result<Vec<Expr>> {
    let fields = m.batch_fields();
    let field = || ident(m.field.as_deref().unwrap_or_default());
    let typed =
        |j: usize| cast_expr(field(), fields[j].data_type().clone()).alias(fields[j].name());
    Ok(match m.kind {
        MetricKind::Count => vec![lit(1i64).alias(fields[0].name())],
        MetricKind::Sum | MetricKind::Min | MetricKind::Max => vec![typed(0)],
        MetricKind::Avg => vec![
            typed(0),
            when(field().is_null(), lit(0i64))
                .otherwise(lit(1i64))?
                .alias(fields[1].name()),
        ],
        MetricKind::Distinct => Vec::new(),
    })
}

/// Event days that master commits after `since` touched (late events mark their day dirty);
/// `None` when a commit does not say which days it touched, so any may be dirty.
async fn dirty_days(
    master: &DeltaTable,
    since: Option<i64>,
    now: i64,
) -> Result<Option<BTreeSet<i64>>> {
    let Some(since) = since else { return Ok(None) };
    let newer = (now - since).max(0) as usize;
    if newer == 0 {
        return Ok(Some(BTreeSet::new()));
    }
    let infos: Vec<_> = master
        .history(Some(newer))
        .try_collect()
        .await
        .map_err(|e| BatchError::Core(tandem_core::storage::delta(e)))?;
    let mut days = BTreeSet::new();
    for info in infos {
        match info.info.get(DAYS_KEY) {
            Some(Json::Array(list)) => {
                days.extend(list.iter().filter_map(Json::as_str).filter_map(parse_day))
            }
            // A write that does not say which days it touched (a manual write): any may be dirty.
            _ if info.operation.as_deref() == Some("WRITE") => return Ok(None),
            _ => {}
        }
    }
    Ok(Some(days))
}

/// The fields a view's distinct metrics count.
fn distinct_fields(view: &ViewDef) -> BTreeSet<&str> {
    view.metrics
        .iter()
        .filter(|m| m.kind == MetricKind::Distinct)
        .filter_map(|m| m.field.as_deref())
        .collect()
}

/// Event ids that several rows of a day hold.
type Repeats = Option<Arc<Vec<String>>>;

/// What the look for a day's repeated event ids found, kept beside the batch runs
/// (`batch/repeats/<schema>/<day>.json`) for the day's data files it read. Delta data files
/// are never changed in place (an import, an archive commit or an erasure adds or replaces
/// files), so the same list of files holds the same ids: a run that finds the record's list
/// equal to the day's reads the answer instead of the day's ids. Any other list, a record
/// of another format or id field, or one that cannot be read, and the day is looked at again.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct RepeatsRecord {
    format: u32,
    /// The event id field looked at.
    event_id: String,
    /// The day's data files, sorted.
    files: Vec<String>,
    /// The ids more than one row holds, sorted.
    repeated: Vec<String>,
}

impl RepeatsRecord {
    const FORMAT: u32 = 1;

    fn new(event_id: &str, files: &[String]) -> Self {
        let mut files = files.to_vec();
        files.sort();
        RepeatsRecord {
            format: Self::FORMAT,
            event_id: event_id.to_string(),
            files,
            repeated: Vec::new(),
        }
    }

    fn path(schema: &str, day: &str) -> object_store::path::Path {
        object_store::path::Path::from(format!("batch/repeats/{schema}/{day}.json"))
    }

    /// The recorded answer for this record's files, if the record holds them.
    async fn read(&self, storage: &Storage, schema: &str, day: &str) -> Option<Repeats> {
        if self.files.is_empty() {
            return None;
        }
        use object_store::ObjectStoreExt as _;
        let store = storage.objects().ok()?;
        let bytes = match store.get(&Self::path(schema, day)).await {
            Ok(r) => r.bytes().await.ok()?,
            Err(object_store::Error::NotFound { .. }) => return None,
            Err(e) => {
                tracing::debug!(schema, day, error = %e, "the day's repeated ids record is not read");
                return None;
            }
        };
        let recorded: RepeatsRecord = serde_json::from_slice(&bytes).ok()?;
        (recorded.format == self.format
            && recorded.event_id == self.event_id
            && recorded.files == self.files)
            .then(|| (!recorded.repeated.is_empty()).then(|| Arc::new(recorded.repeated)))
    }

    /// Records `found` for this record's files; a record that cannot be written is only
    /// looked for again next time.
    async fn write(mut self, storage: &Storage, schema: &str, day: &str, found: &Repeats) {
        self.repeated = found.as_ref().map(|f| f.to_vec()).unwrap_or_default();
        self.repeated.sort();
        let put = async {
            use object_store::ObjectStoreExt as _;
            let store = storage.objects().map_err(|e| e.to_string())?;
            let bytes = serde_json::to_vec(&self).map_err(|e| e.to_string())?;
            store
                .put(&Self::path(schema, day), bytes.into())
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        if let Err(e) = put.await {
            tracing::warn!(schema, day, error = %e, "the day's repeated ids are not recorded");
        }
    }
}

/// Repeats found, by schema, day and master version.
type RepeatsCache = std::collections::HashMap<(String, String, i64), Repeats>;

/// Runs `f` on every batch of `df`, each of its plan's output partitions on a task of its own
/// (so on every thread), and gives what each partition's calls put in their vector.
async fn for_each_partition<T, F>(
    df: &datafusion::dataframe::DataFrame,
    f: F,
) -> Result<Vec<Vec<T>>>
where
    T: Send + 'static,
    F: Fn(&RecordBatch, &mut Vec<T>) -> Result<()> + Clone + Send + 'static,
{
    let task_ctx = Arc::new(df.task_ctx());
    let plan = df.clone().create_physical_plan().await?;
    let streams = datafusion::physical_plan::execute_stream_partitioned(plan, task_ctx)?;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let f = f.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                while let Some(batch) = stream.try_next().await? {
                    f(&batch, &mut out)?;
                }
                Ok::<_, BatchError>(out)
            })
        })
        .collect();
    let mut parts = Vec::with_capacity(tasks.len());
    for task in tasks {
        parts.push(
            task.await.map_err(|e| {
                BatchError::BadRequest(format!("reading a partition failed: {e}"))
            })??,
        );
    }
    Ok(parts)
}

/// Runs `plan` and collects its batches, holding their memory in `ctx`'s memory pool: `None`
/// (the batches dropped, the plan stopped) once the pool refuses more.
async fn collect_within_pool(
    plan: Arc<dyn ExecutionPlan>,
    ctx: &SessionContext,
) -> Result<Option<(Vec<RecordBatch>, MemoryReservation)>> {
    let reservation =
        MemoryConsumer::new("tandem view events").register(&ctx.runtime_env().memory_pool);
    let mut stream = datafusion::physical_plan::execute_stream(plan, ctx.task_ctx())?;
    let mut batches = Vec::new();
    while let Some(batch) = stream.try_next().await? {
        if reservation.try_grow(batch.get_array_memory_size()).is_err() {
            return Ok(None);
        }
        batches.push(batch);
    }
    Ok(Some((batches, reservation)))
}

/// How event ids are hashed to find repeats: fixed, so both reads of a day agree.
fn id_hasher() -> datafusion::common::hash_utils::RandomState {
    datafusion::common::hash_utils::RandomState::with_seed(0x7461_6e64_656d)
}

/// Appends the 64-bit hash of every id of `ids` that is not null.
fn hash_ids(ids: &ArrayRef, out: &mut Vec<u64>) -> Result<()> {
    let mut hashes = vec![0u64; ids.len()];
    datafusion::common::hash_utils::create_hashes([ids], &id_hasher(), &mut hashes)?;
    match ids.logical_nulls() {
        None => out.extend_from_slice(&hashes),
        Some(nulls) => out.extend(
            hashes
                .iter()
                .zip(nulls.iter())
                .filter_map(|(&h, valid)| valid.then_some(h)),
        ),
    }
    Ok(())
}

/// Appends, as text, every id of `ids` (not null) whose hash is one of `wanted`.
fn ids_with_hashes(
    ids: &ArrayRef,
    wanted: &std::collections::HashSet<u64>,
    out: &mut Vec<String>,
) -> Result<()> {
    let mut hashes = vec![0u64; ids.len()];
    datafusion::common::hash_utils::create_hashes([ids], &id_hasher(), &mut hashes)?;
    let text = cast(ids, &DataType::Utf8)?;
    let text = text.as_string::<i32>();
    for (row, h) in hashes.iter().enumerate() {
        if wanted.contains(h) && text.is_valid(row) {
            out.push(text.value(row).to_string());
        }
    }
    Ok(())
}

/// The hashes that occur more than once in `parts`. They are spread by their top byte into
/// 256 runs (each small enough to sort in cache), which `threads` threads sort and scan.
fn repeated_hashes(parts: Vec<Vec<u64>>, threads: usize) -> std::collections::HashSet<u64> {
    const RUNS: usize = 256;
    let run_of = |h: u64| (h >> 56) as usize;
    let mut counts = [0usize; RUNS];
    for &h in parts.iter().flatten() {
        counts[run_of(h)] += 1;
    }
    let mut runs: Vec<Vec<u64>> = counts.iter().map(|&n| Vec::with_capacity(n)).collect();
    for h in parts.into_iter().flatten() {
        runs[run_of(h)].push(h);
    }
    let per_thread = RUNS.div_ceil(threads.clamp(1, RUNS));
    std::thread::scope(|scope| {
        let found: Vec<_> = runs
            .chunks_mut(per_thread)
            .map(|runs| {
                scope.spawn(move || {
                    let mut found = Vec::new();
                    for run in runs {
                        run.sort_unstable();
                        found.extend(run.windows(2).filter(|w| w[0] == w[1]).map(|w| w[0]));
                    }
                    found
                })
            })
            .collect();
        found
            .into_iter()
            .flat_map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// The ids that occur more than once in `ids`.
fn repeated_ids(ids: impl IntoIterator<Item = String>) -> BTreeSet<String> {
    let mut seen = std::collections::HashSet::new();
    let mut repeated = BTreeSet::new();
    for id in ids {
        if let Some(id) = seen.replace(id) {
            repeated.insert(id);
        }
    }
    repeated
}

/// `df` (a day of the master dataset) with one row per event id of `ids`: the rows of other
/// ids as they are, and for each repeated id its first arrival (the lowest partition, then
/// offset), every column taken from that row.
fn once_per_id(
    df: datafusion::dataframe::DataFrame,
    schema: &tandem_core::schema::EventSchema,
    ids: &[String],
) -> Result<datafusion::dataframe::DataFrame> {
    use datafusion::functions_aggregate::expr_fn::first_value;
    use tandem_core::schema::{OFFSET_COLUMN, PARTITION_COLUMN};
    let id_name = &schema.fields[schema.event_id].name;
    let id = ident(id_name);
    let list: Vec<Expr> = ids.iter().map(|s| lit(s.as_str())).collect();
    let columns: Vec<String> = df
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let arrival = vec![
        ident(PARTITION_COLUMN).sort(true, false),
        ident(OFFSET_COLUMN).sort(true, false),
    ];
    let firsts: Vec<Expr> = columns
        .iter()
        .filter(|c| *c != id_name)
        .map(|c| first_value(ident(c), arrival.clone()).alias(c))
        .collect();
    let once = df
        .clone()
        .filter(id.clone().in_list(list.clone(), false))?
        .aggregate(vec![id.clone()], firsts)?
        .select(columns.iter().map(ident).collect::<Vec<_>>())?;
    Ok(df.filter(id.in_list(list, true))?.union(once)?)
}

/// The metadata of a publish commit: the view's coverage after it, the days it replaced, the
/// definition hash and the master version read.
fn publish_properties(
    view: &ViewDef,
    coverage: &BTreeSet<i64>,
    days: &BTreeSet<i64>,
    master_version: i64,
    extra: &[(String, Json)],
) -> CommitProperties {
    let ranges: Vec<Json> = Coverage {
        days: coverage.clone(),
        ..Default::default()
    }
    .ranges()
    .into_iter()
    .map(|(a, b)| json!([a, b]))
    .collect();
    let days: Vec<String> = days.iter().map(|&d| day_string(d)).collect();
    let mut metadata = vec![
        (COVERAGE_KEY.to_string(), Json::Array(ranges)),
        (DAYS_KEY.to_string(), json!(days)),
        (HASH_KEY.to_string(), json!(view.definition_hash)),
        (MASTER_VERSION_KEY.to_string(), json!(master_version)),
    ];
    metadata.extend(extra.iter().cloned());
    CommitProperties::default()
        .with_metadata(metadata)
        // Conflicts are resolved below, against the view's own metadata.
        .with_max_retries(0)
}

/// Commits the files written for `days` (and the removal of those days' old files) as one
/// publish, and returns the version.
///
/// The coverage is computed from the table as it is when the commit lands, not when the run
/// began: when another commit got in first, the table is read again, and the commit is built
/// anew on top of it, so that concurrent publishes of different days both keep their days.
/// A publish in between that replaced any of the same days (or a rollback, or a change of
/// definition) is a conflict: this run fails and nothing of it is visible.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn publish_days(
    view: &ViewDef,
    view_url: &url::Url,
    mut table: DeltaTable,
    adds: Vec<deltalake::kernel::Add>,
    days: &BTreeSet<i64>,
    master_version: i64,
    kept: Option<&BTreeSet<i64>>,
    extra: &[(String, Json)],
) -> Result<i64> {
    const ATTEMPTS: usize = 20;
    let read_version = table.version().map_or(-1, |v| v as i64);
    let mut kept = kept.cloned().unwrap_or_default();
    let day_strings: Vec<String> = days.iter().map(|&d| day_string(d)).collect();
    let predicate = format!(
        "{DAY_COLUMN} IN ({})",
        day_strings
            .iter()
            .map(|d| format!("'{d}'"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for _ in 0..ATTEMPTS {
        let replaced: Vec<_> = table
            .get_active_add_actions_by_partitions(&[])
            .try_collect()
            .await
            .map_err(|e| BatchError::delta(view_url, e))?;
        let mut actions: Vec<Action> = adds.iter().cloned().map(Action::Add).collect();
        for f in replaced {
            let in_days = f
                .partition_values_map()
                .get(DAY_COLUMN)
                .and_then(|v| v.as_deref())
                .is_some_and(|d| day_strings.iter().any(|x| x == d));
            if in_days {
                actions.push(Action::Remove(f.remove_action(true)));
            }
        }
        let mut coverage = kept.clone();
        coverage.extend(days.iter().copied());
        let snapshot = table
            .snapshot()
            .map_err(|e| BatchError::delta(view_url, e))?;
        let committed = CommitBuilder::from(publish_properties(
            view,
            &coverage,
            days,
            master_version,
            extra,
        ))
        .with_actions(actions)
        .build(
            Some(snapshot as &dyn TableReference),
            table.log_store(),
            DeltaOperation::Write {
                mode: SaveMode::Overwrite,
                partition_by: Some(vec![ROLLUP_COLUMN.into(), DAY_COLUMN.into()]),
                predicate: Some(predicate.clone()),
            },
        )
        .await;
        match committed {
            Ok(c) => return Ok(c.version() as i64),
            Err(e @ deltalake::DeltaTableError::Transaction { .. }) => {
                // Someone committed first: what did they do?
                let seen = table.version().map_or(-1, |v| v as i64);
                table
                    .update_state()
                    .await
                    .map_err(|e| BatchError::delta(view_url, e))?;
                let latest = table.version().map_or(-1, |v| v as i64);
                if latest <= seen {
                    return Err(conflict_or(view, view_url, e));
                }
                let newer: Vec<_> = table
                    .history(Some((latest - seen) as usize))
                    .try_collect()
                    .await
                    .map_err(|e| BatchError::delta(view_url, e))?;
                for info in &newer {
                    if let Some(reason) = overlap(view, info, &day_strings) {
                        tracing::warn!(view = %view.name, read_version, reason = %reason, "publish conflict");
                        return Err(BatchError::Conflict {
                            view: view.name.clone(),
                            source: Box::new(deltalake::DeltaTableError::Generic(reason)),
                        });
                    }
                }
                // Different days only: keep theirs, as the newest publish records them.
                kept = published(&table).await?.coverage.days;
                tracing::info!(view = %view.name, latest, "another publish of other days landed first; committing on top of it");
            }
            Err(e) => return Err(BatchError::delta(view_url, e)),
        }
    }
    Err(BatchError::Conflict {
        view: view.name.clone(),
        source: Box::new(deltalake::DeltaTableError::Generic(format!(
            "the table kept moving: {ATTEMPTS} attempts to commit failed"
        ))),
    })
}

/// Why a commit that landed while this publish was running conflicts with it, if it does: it
/// replaced some of the same days, rolled the view back, or changed its definition.
fn overlap(
    view: &ViewDef,
    info: &deltalake::kernel::CommitInfo,
    days: &[String],
) -> Option<String> {
    let op = info.operation.as_deref().unwrap_or("");
    if op.eq_ignore_ascii_case("RESTORE") {
        return Some("the view was rolled back while this run was computing".into());
    }
    if info
        .info
        .get(HASH_KEY)
        .and_then(Json::as_str)
        .is_some_and(|h| h != view.definition_hash)
    {
        return Some("the view was published with another definition meanwhile".into());
    }
    if !info.info.contains_key(COVERAGE_KEY) {
        return None;
    }
    let theirs: BTreeSet<&str> = match info.info.get(DAYS_KEY) {
        Some(Json::Array(d)) => d.iter().filter_map(Json::as_str).collect(),
        // A publish that does not say which days it replaced may have replaced any.
        _ => return Some("another publish landed meanwhile".into()),
    };
    let same: Vec<&str> = days
        .iter()
        .map(String::as_str)
        .filter(|d| theirs.contains(d))
        .collect();
    (!same.is_empty()).then(|| {
        format!(
            "another publish of the same days ({}) committed first",
            same.join(", ")
        )
    })
}

fn conflict_or(view: &ViewDef, url: &url::Url, e: deltalake::DeltaTableError) -> BatchError {
    match e {
        e @ deltalake::DeltaTableError::Transaction { .. } => BatchError::Conflict {
            view: view.name.clone(),
            source: Box::new(e),
        },
        e => BatchError::delta(url, e),
    }
}

#[cfg(test)]
mod repeat_tests {
    use std::collections::HashSet;

    use datafusion::arrow::array::{Int64Array, StringViewArray};

    use super::*;

    #[test]
    fn hashes_held_more_than_once_are_found_across_parts_whatever_the_threads() {
        let a = vec![1 << 56 | 5, 7, 9 << 56, 1 << 56 | 5, u64::MAX, 3 << 56];
        let b = vec![7, 3, u64::MAX, 42, 7];
        let want = HashSet::from([1 << 56 | 5, 7, u64::MAX]);
        for threads in [0, 1, 2, 3, 300] {
            let found = repeated_hashes(vec![a.clone(), b.clone(), Vec::new()], threads);
            assert_eq!(found, want, "{threads} threads");
        }
        assert!(repeated_hashes(vec![vec![1, 2, 3], vec![4 << 56]], 2).is_empty());
    }

    #[test]
    fn ids_behind_a_repeated_hash_are_told_apart_exactly() {
        let ids: ArrayRef = Arc::new(StringArray::from(vec![
            Some("a"),
            Some("b"),
            None,
            Some("a"),
            Some("c"),
            None,
        ]));
        let mut hashes = Vec::new();
        hash_ids(&ids, &mut hashes).unwrap();
        assert_eq!(hashes.len(), 4, "nulls are no ids");
        assert_eq!(hashes[0], hashes[2], "one id, one hash");
        assert_eq!(
            repeated_hashes(vec![hashes.clone()], 2),
            HashSet::from([hashes[0]])
        );
        // "b" as if its hash had been another id's repeated one: read again, it is not repeated.
        let wanted = HashSet::from([hashes[0], hashes[1]]);
        let mut found = Vec::new();
        ids_with_hashes(&ids, &wanted, &mut found).unwrap();
        assert_eq!(found, ["a", "b", "a"]);
        assert_eq!(repeated_ids(found), BTreeSet::from(["a".to_string()]));
    }

    #[test]
    fn ids_of_other_types_hash_alike_in_both_reads() {
        let views: ArrayRef = Arc::new(StringViewArray::from(vec![
            "a long id past twelve bytes",
            "x",
            "a long id past twelve bytes",
        ]));
        let numbers: ArrayRef = Arc::new(Int64Array::from(vec![Some(7), None, Some(8), Some(7)]));
        for (ids, repeated) in [(views, "a long id past twelve bytes"), (numbers, "7")] {
            let mut hashes = Vec::new();
            hash_ids(&ids, &mut hashes).unwrap();
            let wanted = repeated_hashes(vec![hashes], 1);
            assert_eq!(wanted.len(), 1);
            let mut found = Vec::new();
            ids_with_hashes(&ids, &wanted, &mut found).unwrap();
            assert_eq!(repeated_ids(found), BTreeSet::from([repeated.to_string()]));
        }
    }
}
