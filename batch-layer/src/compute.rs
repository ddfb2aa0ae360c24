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

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::functions_aggregate::expr_fn::{count, count_distinct, max, min, sum};
use datafusion::prelude::{
    cast as cast_expr, date_trunc, ident, lit, Expr, SessionConfig, SessionContext,
};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
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
}

/// What one publish did.
#[derive(Debug, Clone, PartialEq)]
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
}

/// The last publish of a view, as its commit metadata says.
#[derive(Debug, Clone, Default)]
pub(crate) struct Published {
    pub coverage: Coverage,
    pub hash: Option<String>,
    pub master_version: Option<i64>,
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
        let Some(Json::Array(ranges)) = info.info.get(COVERAGE_KEY) else {
            continue;
        };
        let mut days = BTreeSet::new();
        for r in ranges {
            let (Some(a), Some(b)) = (
                r.get(0).and_then(Json::as_str),
                r.get(1).and_then(Json::as_str),
            ) else {
                continue;
            };
            if let (Some(a), Some(b)) = (parse_day(a), parse_day(b)) {
                days.extend(a..=b);
            }
        }
        return Ok(Published {
            coverage: Coverage {
                version,
                days,
                published_us: info.timestamp.map(|t| t * 1000),
            },
            hash: info
                .info
                .get(HASH_KEY)
                .and_then(Json::as_str)
                .map(str::to_string),
            master_version: info.info.get(MASTER_VERSION_KEY).and_then(Json::as_i64),
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
#[derive(Debug, Clone)]
pub struct BatchLayer {
    storage: Storage,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
}

/// A DataFusion session for batch work: strings read back as plain `Utf8`.
pub(crate) fn session() -> SessionContext {
    let mut config = SessionConfig::new();
    config
        .options_mut()
        .execution
        .parquet
        .schema_force_view_types = false;
    SessionContext::new_with_config(config)
}

impl BatchLayer {
    pub fn new(storage: Storage, catalog: Arc<Catalog>, clock: Arc<dyn Clock>) -> Self {
        BatchLayer {
            storage,
            catalog,
            clock,
        }
    }

    /// Recomputes and publishes every view (or the one named).
    pub async fn run(&self, view: Option<&str>, req: &RunRequest) -> Result<Vec<PublishReport>> {
        let views: Vec<Arc<ViewDef>> = match view {
            Some(v) => vec![Arc::clone(self.catalog.view(v)?)],
            None => self.catalog.views.values().cloned().collect(),
        };
        let mut out = Vec::new();
        for v in views {
            out.push(self.run_view(&v, req).await?);
        }
        Ok(out)
    }

    /// Recomputes the requested (or the new and dirty) closed days of `view` and publishes
    /// them in one commit.
    pub async fn run_view(&self, view: &ViewDef, req: &RunRequest) -> Result<PublishReport> {
        let mut report = PublishReport {
            view: view.name.clone(),
            days: Vec::new(),
            rows: 0,
            rollup_rows: 0,
            version: None,
        };
        let master_url = self.storage.layout().master(&view.source);
        let Some(master) = self.storage.open(&master_url).await? else {
            tracing::info!(view = %view.name, "no master dataset yet; nothing to compute");
            return Ok(report);
        };
        let master_version = master.version().map(|v| v as i64).unwrap_or(0);
        let view_url = self.storage.layout().view(&view.name);
        let existing = self.storage.open(&view_url).await?;
        let previous = match &existing {
            Some(t) => published(t).await?,
            None => Published::default(),
        };
        let same_definition = previous.hash.as_deref() == Some(view.definition_hash.as_str());
        let today = day_of(self.clock.now_us());

        let ctx = session();
        ctx.register_table("master", master.table_provider().await?)?;
        let available = self.master_days(&ctx).await?;
        let days: BTreeSet<i64> = match (req.from_day, req.to_day) {
            (Some(a), Some(b)) => {
                if a > b {
                    return Err(BatchError::BadRequest("--from is after --to".into()));
                }
                if b >= today {
                    return Err(BatchError::BadRequest(format!(
                        "{} is not closed yet: the batch layer covers days before today ({})",
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
            return Ok(report);
        }
        let day_strings: Vec<String> = days.iter().map(|&d| day_string(d)).collect();
        let mut batches = self.compute(&ctx, view, &day_strings).await?;
        report.rows = batches.iter().map(RecordBatch::num_rows).sum();
        // The rollups of the recomputed days, from their rows, off the runtime's threads.
        let rollups = {
            let (view, base) = (view.clone(), batches.clone());
            tokio::task::spawn_blocking(move || crate::rollup::compute(&view, &base))
                .await
                .map_err(|e| BatchError::BadRequest(format!("computing rollups failed: {e}")))??
        };
        report.rollup_rows = rollups.iter().map(RecordBatch::num_rows).sum();
        batches.extend(rollups);

        // Publish: one commit replaces exactly the recomputed days and records the coverage.
        let mut coverage = Coverage {
            days: days.clone(),
            ..Default::default()
        };
        if same_definition {
            coverage.days.extend(previous.coverage.days.iter().copied());
        }
        let ranges: Vec<Json> = coverage
            .ranges()
            .into_iter()
            .map(|(a, b)| json!([a, b]))
            .collect();
        let props = CommitProperties::default().with_metadata([
            (COVERAGE_KEY.to_string(), Json::Array(ranges)),
            (HASH_KEY.to_string(), json!(view.definition_hash)),
            (MASTER_VERSION_KEY.to_string(), json!(master_version)),
        ]);
        let schema = view.batch_schema();
        let table = match existing {
            Some(t) if same_definition => t,
            _ => {
                self.storage
                    .open_or_create(&view_url, &schema, &[ROLLUP_COLUMN, DAY_COLUMN])
                    .await?
            }
        };
        let batches = if batches.is_empty() {
            vec![RecordBatch::new_empty(schema)]
        } else {
            batches
        };
        let mut write = table
            .write(batches)
            .with_save_mode(SaveMode::Overwrite)
            .with_partition_columns([ROLLUP_COLUMN, DAY_COLUMN])
            .with_commit_properties(props);
        if same_definition {
            write = write.with_replace_where(
                ident(DAY_COLUMN)
                    .in_list(day_strings.iter().map(|d| lit(d.as_str())).collect(), false),
            );
        } else {
            write = write.with_schema_mode(deltalake::operations::write::SchemaMode::Overwrite);
        }
        let table = write.await.map_err(|e| conflict_or(view, &view_url, e))?;
        report.version = table.version().map(|v| v as i64);
        report.days = day_strings;
        tracing::info!(view = %view.name, days = report.days.len(), rows = report.rows, rollup_rows = report.rollup_rows, version = ?report.version, "published");
        Ok(report)
    }

    async fn master_days(&self, ctx: &SessionContext) -> Result<BTreeSet<i64>> {
        let df = ctx
            .table("master")
            .await?
            .select(vec![ident(DAY_COLUMN)])?
            .distinct()?;
        let mut days = BTreeSet::new();
        for b in df.collect().await? {
            let col = cast(b.column(0), &DataType::Utf8)?;
            days.extend(
                col.as_string::<i32>()
                    .iter()
                    .flatten()
                    .filter_map(parse_day),
            );
        }
        Ok(days)
    }

    /// The exact rows of `view` for `days`, in the view's batch schema.
    pub(crate) async fn compute(
        &self,
        ctx: &SessionContext,
        view: &ViewDef,
        days: &[String],
    ) -> Result<Vec<RecordBatch>> {
        let schema = self.catalog.schema_of(view);
        let mut df = ctx.table("master").await?.filter(
            ident(DAY_COLUMN).in_list(days.iter().map(|d| lit(d.as_str())).collect(), false),
        )?;
        if let Some(f) = &view.filter {
            let predicate = df.parse_sql_expr(f)?;
            df = df.filter(predicate)?;
        }
        let bucket = date_trunc(
            lit(view.granularity.as_str()),
            ident(schema.event_time_name()),
        )
        .alias(BUCKET_COLUMN);
        let dims: Vec<Expr> = view
            .dimensions
            .iter()
            .map(|d| cast_expr(ident(d), DataType::Utf8).alias(d))
            .collect();
        let distinct_fields: BTreeSet<&str> = view
            .metrics
            .iter()
            .filter(|m| m.kind == MetricKind::Distinct)
            .filter_map(|m| m.field.as_deref())
            .collect();

        let metrics = || view.metrics.iter().enumerate();
        let df = if distinct_fields.len() == 1 {
            // Two phases: first grouped by the keys and the distinct field, then by the keys.
            let f = *distinct_fields.iter().next().expect("one");
            const F: &str = "__distinct";
            let mut group = vec![bucket];
            group.extend(dims);
            group.push(ident(f).alias(F));
            let partial = metrics()
                .flat_map(|(i, m)| metric_exprs(i, m, Phase::Partial))
                .collect();
            let phase1 = df.aggregate(group, partial)?;
            let mut keys = vec![ident(BUCKET_COLUMN)];
            keys.extend(view.dimensions.iter().map(|d| ident(d.as_str())));
            let finals = metrics()
                .flat_map(|(i, m)| metric_exprs(i, m, Phase::Final { distinct: F }))
                .collect();
            phase1.aggregate(keys, finals)?
        } else {
            let mut group = vec![bucket];
            group.extend(dims);
            let aggs = metrics()
                .flat_map(|(i, m)| metric_exprs(i, m, Phase::Direct))
                .collect();
            df.aggregate(group, aggs)?
        };
        let target = view.batch_schema();
        let mut out = Vec::new();
        for b in df.collect().await? {
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
}

/// Where a metric's aggregates sit in the plan.
#[derive(Debug, Clone, Copy)]
enum Phase<'a> {
    /// One aggregation over the events.
    Direct,
    /// The first of two: grouped by the keys and the distinct field.
    Partial,
    /// The second of two, over the partials; `distinct` is the grouped distinct field.
    Final { distinct: &'a str },
}

/// The batch expressions of every metric kind: the aggregates that compute metric `i`'s batch
/// view columns ([`MetricDef::batch_fields`], named as they are), in a one-phase plan, or as
/// partials (`__m{i}_{j}`) and their combination in a two-phase plan.
fn metric_exprs(i: usize, m: &MetricDef, phase: Phase<'_>) -> Vec<Expr> {
    let columns: Vec<String> = m.batch_fields().iter().map(|f| f.name().clone()).collect();
    let field = || ident(m.field.as_deref().unwrap_or_default());
    let part = |j: usize| format!("__m{i}_{j}");
    let named = |j: usize, e: Expr| e.alias(&columns[j]);
    let hll = |x: Expr| HllSketchUdaf::udaf(m.lg_k()).call(vec![x]);
    // A kind whose partials combine with the same aggregate (sum of sums, min of mins).
    let same = |agg: fn(Expr) -> Expr, input: Expr| match phase {
        Phase::Direct => vec![named(0, agg(input))],
        Phase::Partial => vec![agg(input).alias(part(0))],
        Phase::Final { .. } => vec![named(0, agg(ident(part(0))))],
    };
    match (m.kind, phase) {
        (MetricKind::Count, Phase::Final { .. }) => vec![named(0, sum(ident(part(0))))],
        (MetricKind::Count, _) => same(count, lit(1)),
        (MetricKind::Sum, _) => same(sum, field()),
        (MetricKind::Min, _) => same(min, field()),
        (MetricKind::Max, _) => same(max, field()),
        (MetricKind::Distinct, Phase::Direct) => {
            vec![named(0, count_distinct(field())), named(1, hll(field()))]
        }
        (MetricKind::Distinct, Phase::Partial) => Vec::new(),
        (MetricKind::Distinct, Phase::Final { distinct }) => vec![
            named(0, count(ident(distinct))),
            named(1, hll(ident(distinct))),
        ],
        (MetricKind::Avg, Phase::Direct) => {
            vec![named(0, sum(field())), named(1, count(field()))]
        }
        (MetricKind::Avg, Phase::Partial) => {
            vec![sum(field()).alias(part(0)), count(field()).alias(part(1))]
        }
        (MetricKind::Avg, Phase::Final { .. }) => {
            vec![named(0, sum(ident(part(0)))), named(1, sum(ident(part(1))))]
        }
    }
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

fn conflict_or(view: &ViewDef, url: &url::Url, e: deltalake::DeltaTableError) -> BatchError {
    match e {
        e @ deltalake::DeltaTableError::Transaction { .. } => BatchError::Conflict {
            view: view.name.clone(),
            source: Box::new(e),
        },
        e => BatchError::delta(url, e),
    }
}
