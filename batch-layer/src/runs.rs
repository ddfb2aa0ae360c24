//! The runs table: one row per run of a view or job, scheduled, by hand or in a backfill,
//! with its outcome. The scheduler reads it back to know what is done and what to retry, so
//! that any number of schedulers agree without talking to each other.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::prelude::SessionContext;
use deltalake::protocol::SaveMode;
use tandem_core::storage::Storage;

use crate::error::{BatchError, Result};

/// How a run ended.
pub const SUCCEEDED: &str = "succeeded";
/// The attempt failed and another will follow after a back-off.
pub const RETRYING: &str = "retrying";
/// The last attempt failed; the run is given up.
pub const FAILED: &str = "failed";

/// One run of a view or a job.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunRecord {
    /// The view's or job's name.
    pub task: String,
    /// `view` or `job`.
    pub kind: String,
    /// A job's date (`YYYY-MM-DD`); the first day recomputed for a view, if any.
    pub date: Option<String>,
    /// `schedule`, `manual` or `backfill`.
    pub trigger: String,
    /// The schedule's tick this run is for (epoch µs), if scheduled.
    pub scheduled_us: Option<i64>,
    pub started_us: i64,
    pub seconds: f64,
    pub rows: i64,
    /// [`SUCCEEDED`], [`RETRYING`] or [`FAILED`].
    pub status: String,
    /// 1 for the first attempt of a scheduled tick.
    pub attempt: i32,
    pub error: Option<String>,
    /// Who ran it (the scheduler's holder id, or `cli`).
    pub holder: String,
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("task", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("date", DataType::Utf8, true),
        Field::new("trigger", DataType::Utf8, false),
        Field::new("scheduled_us", DataType::Int64, true),
        Field::new("started_us", DataType::Int64, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("rows", DataType::Int64, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("attempt", DataType::Int32, false),
        Field::new("error", DataType::Utf8, true),
        Field::new("holder", DataType::Utf8, false),
    ]))
}

/// Appends `records` to the runs table (created on first use).
pub async fn record(storage: &Storage, records: &[RunRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let s = |f: fn(&RunRecord) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(records.iter().map(f)))
    };
    let o = |f: fn(&RunRecord) -> Option<&str>| -> ArrayRef {
        Arc::new(StringArray::from_iter(records.iter().map(f)))
    };
    let columns: Vec<ArrayRef> = vec![
        s(|r| &r.task),
        s(|r| &r.kind),
        o(|r| r.date.as_deref()),
        s(|r| &r.trigger),
        Arc::new(Int64Array::from_iter(
            records.iter().map(|r| r.scheduled_us),
        )),
        Arc::new(Int64Array::from_iter_values(
            records.iter().map(|r| r.started_us),
        )),
        Arc::new(Float64Array::from_iter_values(
            records.iter().map(|r| r.seconds),
        )),
        Arc::new(Int64Array::from_iter_values(records.iter().map(|r| r.rows))),
        s(|r| &r.status),
        Arc::new(Int32Array::from_iter_values(
            records.iter().map(|r| r.attempt),
        )),
        o(|r| r.error.as_deref()),
        s(|r| &r.holder),
    ];
    let batch = RecordBatch::try_new(schema(), columns)?;
    let url = storage.layout().runs();
    let table = storage.open_or_create(&url, &schema(), &[]).await?;
    table
        .write(vec![batch])
        .with_save_mode(SaveMode::Append)
        .await
        .map_err(|e| BatchError::delta(&url, e))?;
    Ok(())
}

/// Every run recorded, oldest first (optionally of one task only).
pub async fn list(storage: &Storage, task: Option<&str>) -> Result<Vec<RunRecord>> {
    let url = storage.layout().runs();
    let Some(table) = storage.open(&url).await? else {
        return Ok(Vec::new());
    };
    let ctx = SessionContext::new();
    ctx.register_table("runs", table.table_provider().await?)?;
    let mut df = ctx.table("runs").await?;
    if let Some(t) = task {
        df = df.filter(datafusion::prelude::col("task").eq(datafusion::prelude::lit(t)))?;
    }
    let df = df.sort(vec![datafusion::prelude::col("started_us").sort(true, true)])?;
    let batches = df.collect().await?;
    let mut buf = Vec::new();
    {
        let mut w = datafusion::arrow::json::ArrayWriter::new(&mut buf);
        for b in &batches {
            w.write(b)?;
        }
        w.finish()?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_slice(&buf).map_err(|e| BatchError::BadRequest(format!("runs table: {e}")))
}
