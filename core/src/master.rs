//! The master dataset's and the dead-letter table's rows, built from decoded messages. The
//! archiver (from Kafka) and the importer (from files) write the same shapes.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, AsArray, BinaryBuilder, Int32Array, Int32Builder, Int64Array, Int64Builder,
    StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;

use crate::decode::{Decoded, Rejected};
use crate::error::Result;
use crate::schema::{timestamp_type, EventSchema};
use crate::time::{day_of, day_string};

/// The decoded events with their Kafka partition, offset and `dt` day, in the master schema.
pub fn archive_batch(schema: &EventSchema, decoded: &Decoded) -> Result<RecordBatch> {
    let batch = &decoded.batch;
    let times = batch
        .column(schema.event_time)
        .as_primitive::<TimestampMicrosecondType>();
    let days: StringArray = times
        .iter()
        .map(|t| t.map(|t| day_string(day_of(t))))
        .collect();
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
