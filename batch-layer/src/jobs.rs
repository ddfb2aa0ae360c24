//! SQL jobs and ad-hoc SQL: the analysts' tables, the check of every job's SQL at start, and
//! the run of a job for a date into its output table.
//!
//! The tables an analyst's SQL names:
//! - each event schema's master dataset, named after the schema (`app_events`), every column;
//! - each view's published rows, named after the view: its base rows (no rollups), the
//!   bucket, dimensions, metric values and `dt`, without the sketches;
//! - each job's output, named after the job, with its `date` partition.
//!
//! A job's run for date D replaces the partition `date = D` of its output table in one Delta
//! commit (`replaceWhere`): readers see the old rows of D or the new, never a mix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use datafusion::arrow::array::{new_null_array, ArrayRef, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{col, lit, DataFrame, SessionContext};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use serde_json::{json, Value as Json};
use tandem_core::job::{JobDef, JOB_DATE_COLUMN};
use tandem_core::storage::Storage;
use tandem_core::view::{BASE_ROLLUP, ROLLUP_COLUMN};
use tandem_core::Catalog;

use crate::compute::{session_with, BatchOptions, HASH_KEY};
use crate::error::{BatchError, Result};

/// Commit metadata key of a job run: the date it replaced.
pub const JOB_DATE_KEY: &str = "tandem.job_date";

/// What one run of a job did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct JobReport {
    pub job: String,
    /// `YYYY-MM-DD`.
    pub date: String,
    pub rows: usize,
    /// The output table's version after the run.
    pub version: i64,
    pub seconds: f64,
}

/// Queries are read-only: no DDL, no DML, no `SET`.
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

/// A view's columns as analysts see them: no rollup partition, no sketches.
fn analyst_fields(schema: &Schema) -> Vec<Field> {
    schema
        .fields()
        .iter()
        .filter(|f| {
            f.name() != ROLLUP_COLUMN
                && !matches!(
                    f.data_type(),
                    DataType::Binary | DataType::LargeBinary | DataType::BinaryView
                )
        })
        .map(|f| f.as_ref().clone())
        .collect()
}

fn empty(fields: Vec<Field>) -> Result<Arc<MemTable>> {
    let schema = Arc::new(Schema::new(fields));
    Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?))
}

/// Registers the tables of `catalog` in `ctx`: masters, views and job outputs. A table not
/// yet written is registered empty with its schema when `placeholders` is set (for checking
/// SQL), and left out otherwise; a job output not yet written has no known schema and is left
/// out either way (see [`check`]).
pub async fn register_tables(
    ctx: &SessionContext,
    storage: &Storage,
    catalog: &Catalog,
    placeholders: bool,
) -> Result<()> {
    let layout = storage.layout();
    for (name, schema) in &catalog.schemas {
        match storage.open(&layout.master(name)).await? {
            Some(t) => {
                ctx.register_table(name.as_str(), t.table_provider().await?)?;
            }
            None if placeholders => {
                let fields = schema
                    .master_schema()
                    .fields()
                    .iter()
                    .map(|f| f.as_ref().clone())
                    .collect();
                ctx.register_table(name.as_str(), empty(fields)?)?;
            }
            None => {}
        }
    }
    for (name, view) in &catalog.views {
        match storage.open(&layout.view(name)).await? {
            Some(t) => {
                let df = ctx.read_table(t.table_provider().await?)?;
                let columns: Vec<_> = analyst_fields(df.schema().as_arrow())
                    .iter()
                    .map(|f| col(datafusion::common::Column::from_name(f.name())))
                    .collect();
                let df = df
                    .filter(col(ROLLUP_COLUMN).eq(lit(BASE_ROLLUP)))?
                    .select(columns)?;
                ctx.register_table(name.as_str(), df.into_view())?;
            }
            None if placeholders => {
                ctx.register_table(name.as_str(), empty(analyst_fields(&view.batch_schema()))?)?;
            }
            None => {}
        }
    }
    for name in catalog.jobs.keys() {
        if let Some(t) = storage.open(&layout.job(name)).await? {
            ctx.register_table(name.as_str(), t.table_provider().await?)?;
        }
    }
    Ok(())
}

fn job_error(job: &JobDef, e: impl std::fmt::Display) -> BatchError {
    BatchError::Job {
        path: job.path.display().to_string(),
        message: e.to_string(),
    }
}

/// Parses and plans every job's SQL against the real tables (empty stand-ins for those not
/// written yet), so that a misspelt table or column fails at start, naming the job's file.
/// Jobs may read other jobs' outputs, in any order that has no cycle.
pub async fn check(storage: &Storage, catalog: &Catalog) -> Result<()> {
    let ctx = SessionContext::new();
    register_tables(&ctx, storage, catalog, true).await?;
    let mut pending: BTreeMap<&str, &Arc<JobDef>> = catalog
        .jobs
        .iter()
        .filter(|(name, _)| !ctx.table_exist(name.as_str()).unwrap_or(false))
        .map(|(n, j)| (n.as_str(), j))
        .collect();
    // Jobs whose outputs exist already are checked against them; the others are planned in
    // rounds, each round's outputs registered (empty) for the next.
    let date = NaiveDate::from_ymd_opt(2000, 1, 1).expect("a date");
    let existing: Vec<&Arc<JobDef>> = catalog
        .jobs
        .values()
        .filter(|j| !pending.contains_key(j.name.as_str()))
        .collect();
    for job in existing {
        plan(&ctx, job, date).await?;
    }
    while !pending.is_empty() {
        let mut progressed = Vec::new();
        let mut last_error = None;
        for (name, job) in &pending {
            match plan(&ctx, job, date).await {
                Ok(schema) => progressed.push((*name, output_schema(job, &schema)?)),
                Err(e) => last_error = Some(e),
            }
        }
        if progressed.is_empty() {
            return Err(last_error.expect("a job failed to plan"));
        }
        for (name, schema) in progressed {
            let fields = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
            ctx.register_table(name, empty(fields)?)?;
            pending.remove(name);
        }
    }
    Ok(())
}

/// Plans `job`'s SQL for `date`; the plan's schema.
async fn plan(ctx: &SessionContext, job: &JobDef, date: NaiveDate) -> Result<SchemaRef> {
    let sql = job.sql_for(date)?;
    let df = ctx
        .sql_with_options(&sql, read_only())
        .await
        .map_err(|e| job_error(job, e))?;
    Ok(Arc::new(df.schema().as_arrow().clone()))
}

/// A Delta-friendly type for a query's column (Delta has no unsigned integers or views).
fn delta_type(t: &DataType) -> DataType {
    match t {
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        DataType::Utf8View | DataType::LargeUtf8 => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary => DataType::Binary,
        DataType::Float16 => DataType::Float32,
        DataType::Null => DataType::Utf8,
        other => other.clone(),
    }
}

/// The output table's schema: the query's columns (nullable, Delta types) and the date.
fn output_schema(job: &JobDef, query: &Schema) -> Result<SchemaRef> {
    let mut fields = Vec::with_capacity(query.fields().len() + 1);
    for f in query.fields() {
        if f.name() == JOB_DATE_COLUMN {
            return Err(job_error(
                job,
                format!(
                    "the query has a column `{JOB_DATE_COLUMN}`: that name is the output's \
                     partition (the run's date); rename the column"
                ),
            ));
        }
        fields.push(Field::new(f.name(), delta_type(f.data_type()), true));
    }
    fields.push(Field::new(JOB_DATE_COLUMN, DataType::Utf8, false));
    Ok(Arc::new(Schema::new(fields)))
}

/// A session with every table of `catalog` registered, for jobs and ad-hoc queries.
pub async fn session(
    storage: &Storage,
    catalog: &Catalog,
    options: &BatchOptions,
) -> Result<SessionContext> {
    let ctx = session_with(options)?;
    register_tables(&ctx, storage, catalog, false).await?;
    Ok(ctx)
}

/// Runs an ad-hoc read-only query over the tables of `catalog`.
pub async fn query(ctx: &SessionContext, sql: &str) -> Result<DataFrame> {
    ctx.sql_with_options(sql, read_only())
        .await
        .map_err(|e| BatchError::BadRequest(format!("{e}")))
}

/// Runs `job` for `date`: its output's partition of that date is replaced, in one commit that
/// also carries `metadata`.
pub async fn run_job(
    storage: &Storage,
    catalog: &Catalog,
    options: &BatchOptions,
    job: &JobDef,
    date: NaiveDate,
    metadata: Vec<(String, Json)>,
) -> Result<JobReport> {
    let started = Instant::now();
    let ctx = session(storage, catalog, options).await?;
    let sql = job.sql_for(date)?;
    let df = ctx
        .sql_with_options(&sql, read_only())
        .await
        .map_err(|e| job_error(job, e))?;
    let schema = output_schema(job, df.schema().as_arrow())?;
    let batches = df.collect().await?;
    let day = date.format("%Y-%m-%d").to_string();
    let mut out = Vec::with_capacity(batches.len());
    let mut rows = 0;
    for b in batches {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for (i, f) in schema.fields().iter().take(b.num_columns()).enumerate() {
            let c = b.column(i);
            columns.push(match c.data_type() {
                DataType::Null => new_null_array(f.data_type(), b.num_rows()),
                t if t == f.data_type() => Arc::clone(c),
                _ => cast(c, f.data_type())?,
            });
        }
        columns.push(Arc::new(StringArray::from(vec![
            day.as_str();
            b.num_rows()
        ])));
        rows += b.num_rows();
        out.push(RecordBatch::try_new(Arc::clone(&schema), columns)?);
    }
    let url = storage.layout().job(&job.name);
    let table = storage
        .open_or_create(&url, &schema, &[JOB_DATE_COLUMN])
        .await?;
    let have = table
        .snapshot()
        .map_err(|e| BatchError::delta(&url, e))?
        .schema();
    let have: Vec<String> = have.fields().map(|f| f.name().to_string()).collect();
    let want: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    if have != want {
        return Err(job_error(
            job,
            format!(
                "the query's columns ({}) are not those of its output table ({}): give the \
                 changed job a new name, or remove its table ({url}) to recompute every date",
                want.join(", "),
                have.join(", ")
            ),
        ));
    }
    let mut meta = vec![
        (JOB_DATE_KEY.to_string(), json!(day)),
        (HASH_KEY.to_string(), json!(job.definition_hash)),
    ];
    meta.extend(metadata);
    // A date the query finds nothing for still replaces its partition, with nothing.
    if out.is_empty() {
        out.push(RecordBatch::new_empty(Arc::clone(&schema)));
    }
    let table = table
        .write(out)
        .with_save_mode(SaveMode::Overwrite)
        .with_replace_where(col(JOB_DATE_COLUMN).eq(lit(day.as_str())))
        .with_partition_columns([JOB_DATE_COLUMN])
        .with_commit_properties(CommitProperties::default().with_metadata(meta))
        .await
        .map_err(|e| BatchError::delta(&url, e))?;
    let version = table.version().map_or(0, |v| v as i64);
    tracing::info!(job = %job.name, date = %day, rows, version, "job run published");
    Ok(JobReport {
        job: job.name.clone(),
        date: day,
        rows,
        version,
        seconds: started.elapsed().as_secs_f64(),
    })
}
