//! `tandem erase`: one subject's events out of the master dataset and the dead-letter table.
//!
//! The master's rows whose field equals the value are deleted (Delta DELETE: the files holding
//! them are rewritten without them), in a commit that names the days it touched, so the next
//! batch run recomputes those days and republishes every view without the subject. Dead
//! letters have no parsed fields: those whose raw bytes contain the value are deleted. Each
//! erasure appends an audit record (when, who, which schema and field, a SHA-256 of the value
//! rather than the value itself, the rows removed and their days) to `audit/erasures`.

use std::collections::BTreeSet;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::{ident, lit, Expr, SessionContext};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};
use tandem_core::master::DAYS_KEY;
use tandem_core::schema::{timestamp_type, EventSchema};
use tandem_core::storage::Storage;
use tandem_core::view::DAY_COLUMN;

use crate::error::{BatchError, Result};

/// What one erasure did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EraseReport {
    pub schema: String,
    pub field: String,
    /// SHA-256 of the value, hex: what the audit record keeps.
    pub value_sha256: String,
    pub master_rows: u64,
    pub dead_letter_rows: u64,
    /// The event days the erased master rows belonged to (dirty for the next batch run).
    pub days: Vec<String>,
}

/// The audit table's schema.
fn audit_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("erased_at", timestamp_type(), false),
        Field::new("who", DataType::Utf8, false),
        Field::new("schema", DataType::Utf8, false),
        Field::new("field", DataType::Utf8, false),
        Field::new("value_sha256", DataType::Utf8, false),
        Field::new("master_rows", DataType::Int64, false),
        Field::new("dead_letter_rows", DataType::Int64, false),
        Field::new("days", DataType::Utf8, false),
    ]))
}

/// Erases the events of `schema` whose `field` equals `value` (compared in the field's type)
/// from its master dataset and dead-letter table, and records it for `who`.
pub async fn erase(
    storage: &Storage,
    schema: &EventSchema,
    field: &str,
    value: &str,
    who: &str,
    now_us: i64,
) -> Result<EraseReport> {
    if schema.field(field).is_none() {
        return Err(BatchError::BadRequest(format!(
            "schema `{}` has no field `{field}` (fields: {})",
            schema.name,
            schema
                .fields
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if value.is_empty() {
        return Err(BatchError::BadRequest("the value to erase is empty".into()));
    }
    let mut report = EraseReport {
        schema: schema.name.clone(),
        field: field.to_string(),
        value_sha256: tandem_core::codec::hex(&Sha256::digest(value.as_bytes())),
        ..Default::default()
    };
    let predicate = || ident(field).eq(lit(value));

    let master_url = storage.layout().master(&schema.name);
    if let Some(master) = storage.open(&master_url).await? {
        // The days first: the delete's commit names them, so the batch layer sees them dirty.
        let ctx = SessionContext::new();
        ctx.register_table("m", master.table_provider().await?)?;
        let df = ctx
            .table("m")
            .await?
            .filter(predicate())?
            .select(vec![ident(DAY_COLUMN)])?
            .distinct()?;
        let mut days = BTreeSet::new();
        for b in df.collect().await? {
            let c = cast(b.column(0), &DataType::Utf8)?;
            days.extend(c.as_string::<i32>().iter().flatten().map(str::to_string));
        }
        if !days.is_empty() {
            let props = CommitProperties::default().with_metadata([
                (DAYS_KEY.to_string(), json!(days)),
                (
                    "tandem.erase".to_string(),
                    json!({ "field": field, "value_sha256": report.value_sha256, "who": who }),
                ),
            ]);
            let (_, metrics) = master
                .delete()
                .with_predicate(predicate())
                .with_commit_properties(props)
                .await
                .map_err(|e| BatchError::delta(&master_url, e))?;
            report.master_rows = metrics.num_deleted_rows.unwrap_or(0) as u64;
        }
        report.days = days.into_iter().collect();
    }

    let dlq_url = storage.layout().dead_letter(&schema.name);
    if let Some(dlq) = storage.open(&dlq_url).await? {
        let ctx = SessionContext::new();
        ctx.register_table("d", dlq.table_provider().await?)?;
        let df = ctx.table("d").await?.select(vec![
            ident("topic"),
            ident("partition"),
            ident("offset"),
            ident("raw"),
        ])?;
        let needle = value.as_bytes();
        let mut matches: Vec<Expr> = Vec::new();
        for b in df.collect().await? {
            let topic = cast(b.column(0), &DataType::Utf8)?;
            let topic = topic.as_string::<i32>();
            let partition = b.column(1).as_primitive::<Int32Type>();
            let offset = b.column(2).as_primitive::<Int64Type>();
            let raw = cast(b.column(3), &DataType::Binary)?;
            let raw = raw.as_binary::<i32>();
            for row in 0..b.num_rows() {
                if raw.is_valid(row) && contains(raw.value(row), needle) {
                    matches.push(
                        ident("topic")
                            .eq(lit(topic.value(row)))
                            .and(ident("partition").eq(lit(partition.value(row))))
                            .and(ident("offset").eq(lit(offset.value(row)))),
                    );
                }
            }
        }
        if let Some(any) = matches.into_iter().reduce(Expr::or) {
            let props = CommitProperties::default().with_metadata([(
                "tandem.erase".to_string(),
                json!({ "field": field, "value_sha256": report.value_sha256, "who": who }),
            )]);
            let (_, metrics) = dlq
                .delete()
                .with_predicate(any)
                .with_commit_properties(props)
                .await
                .map_err(|e| BatchError::delta(&dlq_url, e))?;
            report.dead_letter_rows = metrics.num_deleted_rows.unwrap_or(0) as u64;
        }
    }

    let audit_url = storage.layout().erasures();
    let audit = storage
        .open_or_create(&audit_url, &audit_schema(), &[])
        .await?;
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMicrosecondArray::from(vec![now_us]).with_timezone("UTC")),
        Arc::new(StringArray::from(vec![who])),
        Arc::new(StringArray::from(vec![schema.name.as_str()])),
        Arc::new(StringArray::from(vec![field])),
        Arc::new(StringArray::from(vec![report.value_sha256.as_str()])),
        Arc::new(Int64Array::from(vec![report.master_rows as i64])),
        Arc::new(Int64Array::from(vec![report.dead_letter_rows as i64])),
        Arc::new(StringArray::from(vec![report.days.join(",")])),
    ];
    audit
        .write(vec![RecordBatch::try_new(audit_schema(), columns)?])
        .with_save_mode(SaveMode::Append)
        .await
        .map_err(|e| BatchError::delta(&audit_url, e))?;
    tracing::info!(schema = %schema.name, field, master_rows = report.master_rows, dead_letter_rows = report.dead_letter_rows, days = report.days.len(), "erased");
    Ok(report)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
