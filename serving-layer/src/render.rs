//! Answers as JSON, CSV and Arrow IPC, all printed from one Arrow batch ([`to_arrow`]), so the
//! three formats carry the same exact values: sums of decimal fields are Decimal128 and print
//! as exact decimal numbers in JSON and CSV, never through f64. Each metric's column comes
//! from its kind (core's `MetricDef::answer_column`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::body::Bytes;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, RecordBatchOptions, StringArray,
    TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, Float64Type, Int64Type, Schema, TimestampMicrosecondType,
    UInt64Type,
};
use datafusion::arrow::ipc::writer::StreamWriter;
use serde_json::{json, Value as Json};
use tandem_core::query::{QueryResult, RealtimeStatus};
use tandem_core::schema::timestamp_type;
use tandem_core::time::format_us;
use tandem_core::view::ViewDef;
use tandem_core::CoreError;

/// The media type of an Arrow IPC stream.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// Provenance and freshness of the whole answer, with `realtime` as the speed layer's.
pub fn meta(result: &QueryResult, realtime: &RealtimeStatus) -> Json {
    json!({
        "batch_version": result.coverage.version,
        "covered_until": result.coverage.covered_until_us().map(format_us),
        "batch_published_at": result.coverage.published_us.map(format_us),
        "speed_available": realtime.available,
        "definition_hash": result.definition_hash,
        "speed_lag_ms": realtime.lag_ms,
        "speed_lag_ms_by_partition": realtime.partition_lag_ms,
        "stale_partitions": realtime.stale_partitions,
        "truncated": result.truncated,
        "degraded": result.degraded,
    })
}

/// The answer as one Arrow batch: `bucket` (UTC timestamp), `source`, `other` (whether the
/// row is its bucket's `other` row; only when the query asks for them), a text column per
/// group-by dimension, then a column per metric as its kind answers it. The answer's `meta`
/// (as in JSON) is in the schema metadata under `tandem.meta`, with `tandem.view` and
/// `tandem.granularity`.
pub fn to_arrow(result: &QueryResult, view: &ViewDef) -> Result<RecordBatch, CoreError> {
    let mut fields = vec![
        Field::new("bucket", timestamp_type(), false),
        Field::new("source", DataType::Utf8, false),
    ];
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(
            TimestampMicrosecondArray::from_iter_values(result.rows.iter().map(|r| r.bucket_us))
                .with_timezone("UTC"),
        ),
        Arc::new(StringArray::from_iter_values(
            result.rows.iter().map(|r| r.source.as_str()),
        )),
    ];
    if result.other {
        fields.push(Field::new("other", DataType::Boolean, false));
        columns.push(Arc::new(BooleanArray::from_iter(
            result.rows.iter().map(|r| Some(r.other)),
        )));
    }
    for (i, d) in result.dims.iter().enumerate() {
        fields.push(Field::new(d, DataType::Utf8, true));
        columns.push(Arc::new(StringArray::from_iter(
            result
                .rows
                .iter()
                .map(|r| r.dims.get(i).and_then(|d| d.as_deref())),
        )));
    }
    for (j, &m) in result.metrics.iter().enumerate() {
        let def = &view.metrics[m];
        let column = def.answer_column(result.rows.iter().map(|r| r.states.get(j)))?;
        fields.push(Field::new(&def.name, column.data_type().clone(), true));
        columns.push(column);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new_with_options(
        schema,
        columns,
        &RecordBatchOptions::new().with_row_count(Some(result.rows.len())),
    )?;
    with_meta(&batch, result, &result.realtime)
}

/// `batch` with the answer's `meta` (freshness from `realtime`), view and granularity in its
/// schema metadata.
pub fn with_meta(
    batch: &RecordBatch,
    result: &QueryResult,
    realtime: &RealtimeStatus,
) -> Result<RecordBatch, CoreError> {
    let metadata = HashMap::from([
        ("tandem.view".to_string(), result.view.clone()),
        (
            "tandem.granularity".to_string(),
            result.granularity.as_str().to_string(),
        ),
        (
            "tandem.meta".to_string(),
            meta(result, realtime).to_string(),
        ),
    ]);
    let schema = Arc::new(batch.schema().as_ref().clone().with_metadata(metadata));
    Ok(batch.clone().with_schema(schema)?)
}

/// The JSON answer of DESIGN §7, printed from the Arrow batch.
pub fn to_json(result: &QueryResult, batch: &RecordBatch) -> String {
    let rows = JsonRows::print(result.dims.len(), result.other, batch);
    let mut out = json_head(result, &result.realtime);
    out.push_str(std::str::from_utf8(&rows.joined()).unwrap_or_default());
    out.push_str(JSON_TAIL);
    out
}

/// The JSON answer up to its rows, with `realtime` as the speed layer's freshness in `meta`:
/// the answer is this, the rows (comma-separated, as [`JsonRows`] prints them) and
/// [`JSON_TAIL`], so that rows printed once can be sent to every request with its own
/// freshness.
pub fn json_head(result: &QueryResult, realtime: &RealtimeStatus) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("{\"view\":");
    push_str(&mut out, &result.view);
    out.push_str(",\"granularity\":");
    push_str(&mut out, result.granularity.as_str());
    out.push_str(",\"meta\":");
    write_meta(&mut out, result, realtime);
    out.push_str(",\"rows\":[");
    out
}

/// [`meta`] printed into `out`: the same object with its keys in the same (sorted) order,
/// without building a JSON value, as every request prints it.
fn write_meta(out: &mut String, result: &QueryResult, realtime: &RealtimeStatus) {
    fn number(out: &mut String, n: Option<impl std::fmt::Display>) {
        match n {
            Some(n) => {
                let _ = write!(out, "{n}");
            }
            None => out.push_str("null"),
        }
    }
    fn text(out: &mut String, t: Option<String>) {
        match t {
            Some(t) => push_str(out, &t),
            None => out.push_str("null"),
        }
    }
    let coverage = &result.coverage;
    out.push_str("{\"batch_published_at\":");
    text(out, coverage.published_us.map(format_us));
    out.push_str(",\"batch_version\":");
    number(out, coverage.version);
    out.push_str(",\"covered_until\":");
    text(out, coverage.covered_until_us().map(format_us));
    out.push_str(",\"definition_hash\":");
    push_str(out, &result.definition_hash);
    out.push_str(",\"degraded\":[");
    for (i, d) in result.degraded.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_str(out, d);
    }
    let _ = write!(out, "],\"speed_available\":{}", realtime.available);
    out.push_str(",\"speed_lag_ms\":");
    number(out, realtime.lag_ms);
    out.push_str(",\"speed_lag_ms_by_partition\":{");
    for (i, (p, lag)) in realtime.partition_lag_ms.iter().enumerate() {
        let _ = write!(out, "{}\"{p}\":{lag}", if i > 0 { "," } else { "" });
    }
    out.push_str("},\"stale_partitions\":[");
    for (i, p) in realtime.stale_partitions.iter().enumerate() {
        let _ = write!(out, "{}{p}", if i > 0 { "," } else { "" });
    }
    let _ = write!(out, "],\"truncated\":{}}}", result.truncated);
}

/// What follows the rows in the JSON answer.
pub const JSON_TAIL: &str = "]}";

/// What separates the rows from the totals' rows in a JSON answer with totals (which end with
/// [`JSON_TAIL`] too).
pub const JSON_TOTALS: &str = "],\"totals\":[";

/// Rows of the JSON answer, printed once and comma-separated, so that any run of them can be
/// sent as a slice of one buffer, in many answers.
#[derive(Debug, Default, Clone)]
pub struct JsonRows {
    text: Bytes,
    /// Where each row starts and ends in `text`.
    spans: Vec<(usize, usize)>,
}

impl JsonRows {
    /// The rows of an answer batch (of [`to_arrow`]) with `dims` group-by dimensions, and
    /// the `other` column if `other`.
    pub fn print(dims: usize, other: bool, batch: &RecordBatch) -> Self {
        let first = 2 + usize::from(other);
        let dims = first..first + dims;
        let metrics = dims.end..batch.num_columns();
        let schema = batch.schema();
        let mut out = String::with_capacity(batch.num_rows() * 128);
        let mut spans = Vec::with_capacity(batch.num_rows());
        for row in 0..batch.num_rows() {
            if row > 0 {
                out.push(',');
            }
            let start = out.len();
            out.push_str("{\"bucket\":");
            push_cell(&mut out, batch.column(0), row);
            out.push_str(",\"source\":");
            push_cell(&mut out, batch.column(1), row);
            if other {
                out.push_str(",\"other\":");
                push_cell(&mut out, batch.column(2), row);
            }
            for (name, range) in [("dims", dims.clone()), ("metrics", metrics.clone())] {
                let _ = write!(out, ",\"{name}\":{{");
                for (n, c) in range.enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    push_str(&mut out, schema.field(c).name());
                    out.push(':');
                    push_cell(&mut out, batch.column(c), row);
                }
                out.push('}');
            }
            out.push('}');
            spans.push((start, out.len()));
        }
        JsonRows {
            text: crate::sendfile::shared(out.into_bytes()),
            spans,
        }
    }

    /// Rows `rows`, comma-separated, as a slice of the printed rows.
    pub fn run(&self, rows: std::ops::Range<usize>) -> Bytes {
        if rows.is_empty() {
            return Bytes::new();
        }
        self.text
            .slice(self.spans[rows.start].0..self.spans[rows.end - 1].1)
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.text.len() + self.spans.capacity() * std::mem::size_of::<(usize, usize)>()
    }

    /// Every row, comma-separated.
    pub fn joined(&self) -> Bytes {
        self.text.clone()
    }
}

/// Rows per chunk of a streamed CSV or Arrow answer.
pub const STREAM_ROWS: usize = 1024;

/// CSV with a header: `bucket,source,<dims>,<metrics>`, printed by arrow-csv from the Arrow
/// batch; a distinct metric gives its value.
pub fn to_csv(batch: &RecordBatch) -> Result<Vec<u8>, CoreError> {
    csv(batch, true)
}

/// The CSV of `batch` (as [`to_csv`]) in chunks of [`STREAM_ROWS`] rows, each printed when
/// it is asked for: a large answer goes out as it is printed, one chunk held at a time.
pub fn csv_chunks(
    batch: RecordBatch,
) -> impl Iterator<Item = Result<Bytes, CoreError>> + Send + 'static {
    let n = batch.num_rows();
    (0..n.max(1)).step_by(STREAM_ROWS).map(move |start| {
        let len = STREAM_ROWS.min(n - start);
        csv(&batch.slice(start, len), start == 0).map(Bytes::from)
    })
}

/// The Arrow IPC stream of `batch` in chunks: the schema with the first
/// [`STREAM_ROWS`] rows, then a chunk of rows at a time, then the end of the stream, each
/// written when it is asked for.
pub fn ipc_chunks(
    batch: RecordBatch,
) -> Result<impl Iterator<Item = Result<Bytes, CoreError>> + Send + 'static, CoreError> {
    let mut writer = Some(StreamWriter::try_new(Vec::new(), &batch.schema())?);
    let (n, mut start) = (batch.num_rows(), 0);
    Ok(std::iter::from_fn(move || {
        let mut w = writer.take()?;
        let finishing = start >= n;
        let written = if finishing {
            w.finish()
        } else {
            let len = STREAM_ROWS.min(n - start);
            let slice = batch.slice(start, len);
            start += len;
            w.write(&slice)
        };
        let bytes = Bytes::from(std::mem::take(w.get_mut()));
        // The writer goes on until it has finished the stream, or failed.
        if written.is_ok() && !finishing {
            writer = Some(w);
        }
        Some(written.map(|()| bytes).map_err(CoreError::from))
    }))
}

fn csv(batch: &RecordBatch, header: bool) -> Result<Vec<u8>, CoreError> {
    let schema = batch.schema();
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        match column.as_struct_opt() {
            Some(s) => {
                let value = s
                    .column_by_name("value")
                    .cloned()
                    .unwrap_or_else(|| Arc::clone(column));
                fields.push(Field::new(field.name(), value.data_type().clone(), true));
                columns.push(value);
            }
            None => {
                fields.push(field.as_ref().clone());
                columns.push(Arc::clone(column));
            }
        }
    }
    let flat = RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
    )?;
    let mut out = Vec::new();
    let mut writer = datafusion::arrow::csv::WriterBuilder::new()
        .with_header(header)
        .with_timestamp_tz_format("%Y-%m-%dT%H:%M:%S%.fZ".to_string())
        .build(&mut out);
    writer.write(&flat)?;
    drop(writer);
    Ok(out)
}

pub(crate) fn push_str(out: &mut String, s: &str) {
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "null".into()));
}

/// One cell as JSON: numbers as numbers (decimals exactly, as their decimal text), timestamps
/// as RFC 3339 text, structs as objects without their null fields.
fn push_cell(out: &mut String, col: &ArrayRef, row: usize) {
    if col.is_null(row) {
        out.push_str("null");
        return;
    }
    match col.data_type() {
        DataType::UInt64 => {
            let _ = write!(out, "{}", col.as_primitive::<UInt64Type>().value(row));
        }
        DataType::Int64 => {
            let _ = write!(out, "{}", col.as_primitive::<Int64Type>().value(row));
        }
        DataType::Float64 => {
            let v = col.as_primitive::<Float64Type>().value(row);
            out.push_str(&serde_json::to_string(&v).unwrap_or_else(|_| "null".into()));
        }
        DataType::Decimal128(..) => {
            out.push_str(&col.as_primitive::<Decimal128Type>().value_as_string(row));
        }
        DataType::Timestamp(..) => {
            push_str(
                out,
                &format_us(col.as_primitive::<TimestampMicrosecondType>().value(row)),
            );
        }
        DataType::Boolean => out.push_str(if col.as_boolean().value(row) {
            "true"
        } else {
            "false"
        }),
        DataType::Utf8 => push_str(out, col.as_string::<i32>().value(row)),
        DataType::Struct(fields) => {
            let s = col.as_struct();
            out.push('{');
            let mut first = true;
            for (f, c) in fields.iter().zip(s.columns()) {
                if c.is_null(row) {
                    continue;
                }
                if !first {
                    out.push(',');
                }
                first = false;
                push_str(out, f.name());
                out.push(':');
                push_cell(out, c, row);
            }
            out.push('}');
        }
        other => push_str(out, &format!("unsupported answer type {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::UInt64Type;
    use tandem_core::metric::MetricState;
    use tandem_core::query::{Coverage, RealtimeStatus, ResultRow, Source};
    use tandem_core::time::DAY_US;
    use tandem_core::view::Granularity;

    /// The JSON head prints the same `meta` object as the Arrow metadata's, key for key
    /// and in the same order, with and without each optional part.
    #[test]
    fn the_printed_meta_is_the_meta_value() {
        let (_, mut result) = purchases();
        let mut realtime = RealtimeStatus::default();
        for step in 0..3 {
            let head = json_head(&result, &realtime);
            let printed = format!("{head}{JSON_TAIL}");
            let expected = format!(
                "{{\"view\":{},\"granularity\":{},\"meta\":{},\"rows\":[]}}",
                json!(result.view),
                json!(result.granularity.as_str()),
                meta(&result, &realtime),
            );
            assert_eq!(printed, expected, "step {step}");
            let _: Json = serde_json::from_str(&printed).unwrap();
            // Then with every optional part, strings that need escaping among them.
            result.coverage = Coverage {
                version: Some(7),
                days: [20_000, 20_001].into(),
                published_us: Some(20_002 * DAY_US + 1_500),
            };
            result.degraded = vec!["the \"batch\" views\nare unreachable".into(), "x".into()];
            result.truncated = step == 1;
            realtime = RealtimeStatus {
                lag_ms: Some(120),
                partition_lag_ms: [(0, 120), (3, 7)].into(),
                stale_partitions: vec![1, 2],
                available: true,
            };
        }
    }

    fn purchases() -> (tandem_core::Catalog, QueryResult) {
        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let catalog =
            tandem_core::Catalog::load(&root.join("schemas"), &root.join("jobs")).unwrap();
        let result = QueryResult {
            view: "purchases_daily".into(),
            definition_hash: catalog.views["purchases_daily"].definition_hash.clone(),
            granularity: Granularity::Day,
            coverage: Coverage::default(),
            realtime: RealtimeStatus::default(),
            dims: vec!["country".into()],
            metrics: vec![0, 1, 2],
            rows: vec![
                ResultRow {
                    bucket_us: 20_000 * DAY_US,
                    source: Source::Batch,
                    dims: vec![Some("DE".into())],
                    // More than f64 holds exactly, in micro-dollars.
                    states: vec![
                        MetricState::Count(2),
                        MetricState::SumInt(12_345_678_901_234_567_891),
                        MetricState::MaxInt(Some(200_000)),
                    ],
                    other: false,
                },
                ResultRow {
                    bucket_us: 20_001 * DAY_US,
                    source: Source::Speed,
                    dims: vec![None],
                    states: vec![
                        MetricState::Count(0),
                        MetricState::SumInt(0),
                        MetricState::MaxInt(None),
                    ],
                    other: false,
                },
            ],
            truncated: false,
            other: false,
            degraded: Vec::new(),
        };
        (catalog, result)
    }

    #[test]
    fn the_three_formats_print_the_same_exact_values() {
        let (catalog, result) = purchases();
        let view = &catalog.views["purchases_daily"];
        let b = to_arrow(&result, view).unwrap();
        let names: Vec<_> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            [
                "bucket",
                "source",
                "country",
                "purchases",
                "revenue",
                "max_revenue"
            ]
        );
        assert_eq!(b.column(3).as_primitive::<UInt64Type>().value(0), 2);
        let revenue = b.column(4).as_primitive::<Decimal128Type>();
        assert_eq!(revenue.data_type(), &DataType::Decimal128(38, 6));
        assert_eq!(revenue.value_as_string(0), "12345678901234.567891");
        assert!(b.column(5).is_null(1));
        let meta: Json = serde_json::from_str(&b.schema().metadata()["tandem.meta"]).unwrap();
        assert_eq!(meta["truncated"], false);
        assert_eq!(b.schema().metadata()["tandem.granularity"], "day");

        let json = to_json(&result, &b);
        assert!(json.contains("\"revenue\":12345678901234.567891"), "{json}");
        let parsed: Json = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed["rows"][1]["dims"]["country"], Json::Null);
        assert_eq!(parsed["rows"][0]["bucket"], format_us(20_000 * DAY_US));

        let csv = String::from_utf8(to_csv(&b).unwrap()).unwrap();
        let lines: Vec<_> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "bucket,source,country,purchases,revenue,max_revenue"
        );
        assert_eq!(
            lines[1],
            format!(
                "{},batch,DE,2,12345678901234.567891,0.200000",
                format_us(20_000 * DAY_US)
            )
        );
        assert_eq!(
            lines[2],
            format!("{},speed,,0,0.000000,", format_us(20_001 * DAY_US))
        );
    }

    #[test]
    fn streamed_csv_and_arrow_are_the_whole_answer_in_chunks() {
        let (catalog, result) = purchases();
        let view = &catalog.views["purchases_daily"];
        let one = to_arrow(&result, view).unwrap();
        let copies = vec![one.clone(); 2 * STREAM_ROWS / one.num_rows().max(1) + 3];
        let big = datafusion::arrow::compute::concat_batches(&one.schema(), &copies).unwrap();
        assert!(big.num_rows() > 2 * STREAM_ROWS);
        for b in [big, one.slice(0, 0)] {
            let chunks: Vec<Bytes> = csv_chunks(b.clone()).map(Result::unwrap).collect();
            assert_eq!(chunks.len(), b.num_rows().div_ceil(STREAM_ROWS).max(1));
            assert_eq!(chunks.concat(), to_csv(&b).unwrap());

            let chunks: Vec<Bytes> = ipc_chunks(b.clone()).unwrap().map(Result::unwrap).collect();
            assert_eq!(chunks.len(), b.num_rows().div_ceil(STREAM_ROWS) + 1);
            let bytes = chunks.concat();
            let reader =
                datafusion::arrow::ipc::reader::StreamReader::try_new(&bytes[..], None).unwrap();
            let read: Vec<RecordBatch> = reader.map(Result::unwrap).collect();
            let read = datafusion::arrow::compute::concat_batches(&b.schema(), &read).unwrap();
            assert_eq!(read, b);
        }
    }
}
