//! `tandem import`: history files into the master dataset, through the same decoder as Kafka
//! messages and the same writer (core's `MasterWriter`) as the archiver.
//!
//! Files are JSON lines or Parquet (by extension, `.parquet`); a directory stands for every such
//! file under it. Both formats are held to one set of rules (types, required fields, the
//! event-time policy). A Parquet batch whose columns carry over exactly (strings, integers,
//! floats, booleans, zoned timestamps, decimals, and doubles for decimal fields) and whose every
//! row is an event is taken as it is, cast to the schema's types, without passing through
//! JSON; any other batch is re-encoded as JSON objects and decoded like lines, which judges
//! each row, so a rejected Parquet row reaches the dead-letter table as the JSON of its row.
//! Rejected rows go there with the file's name as their topic and the row's number (from 1) as
//! their offset.
//!
//! A file's rows are decoded on a thread of their own and written to new files of the master
//! dataset as they come ([`MasterWriter::stage`]), so no file is held whole in memory; the files
//! are committed at once after its last row. Each file is one commit, and an import is
//! idempotent: the commit carries a Delta `txn` action
//! whose app id is the BLAKE3 hash of the file's content, so a file already imported (under any
//! name) is skipped, and an import that crashed can simply be run again.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::json::LineDelimitedWriter;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::json;
use tandem_core::decode::{Decoded, Decoder, Message, Rejected};
use tandem_core::master::{archive_batch, MasterCommit, MasterWriter};
use tandem_core::schema::EventSchema;
use tandem_core::storage::Storage;

use crate::error::{BatchError, Result};

/// Rows decoded per batch.
const CHUNK: usize = 50_000;

/// The `txn` app id prefix of imported files; the rest is the content hash.
pub const IMPORT_APP_PREFIX: &str = "tandem.import.";

/// What one import did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportReport {
    pub events: usize,
    pub rejected: usize,
    /// Files imported now.
    pub files: usize,
    /// Files skipped because their content was imported before.
    pub skipped: usize,
}

/// What happened to one file, for progress output.
#[derive(Debug, Clone, PartialEq)]
pub struct FileReport {
    pub path: PathBuf,
    /// 1-based position among the files of the import, and their number.
    pub index: usize,
    pub of: usize,
    pub events: usize,
    pub rejected: usize,
    pub bytes: u64,
    /// Already imported: nothing was written.
    pub skipped: bool,
    pub seconds: f64,
    /// The file is imported (committed or skipped). A report with `done` false is one of a
    /// file still being imported (every [`PROGRESS_EVERY`]): its events written so far.
    pub done: bool,
}

/// How often a file still being imported is reported.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The format of a history file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    JsonLines,
    Parquet,
}

impl Format {
    fn of(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("parquet") => Format::Parquet,
            _ => Format::JsonLines,
        }
    }
}

/// The files `paths` stand for: each file itself, each directory every `.parquet`, `.jsonl`,
/// `.json` and `.ndjson` file under it, sorted; directories that are Delta tables (a store's,
/// Tandem's own included) or hidden (`.x`, `_x`) are not walked.
pub fn expand(paths: &[impl AsRef<Path>]) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let io = |source| BatchError::Io {
            path: dir.display().to_string(),
            source,
        };
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .map_err(io)?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                // Not a Delta table's files (Tandem's own store among them), nor hidden ones.
                let hidden = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with('.') || n.starts_with('_'));
                if !hidden && !p.join("_delta_log").is_dir() {
                    walk(&p, out)?;
                }
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("parquet" | "jsonl" | "json" | "ndjson")
            ) {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        if p.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.to_path_buf());
        }
    }
    Ok(out)
}

/// The BLAKE3 hash of a file's content, in hex.
fn content_hash(path: &Path) -> Result<String> {
    let io = |source| BatchError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Decodes one file's rows into master batches, sent to the writer as they are decoded, and
/// rejects.
struct FileDecoder {
    schema: Arc<EventSchema>,
    decoder: Arc<Decoder>,
    now_us: i64,
    out: tokio::sync::mpsc::Sender<RecordBatch>,
    rejects: Vec<Rejected>,
    events: usize,
    /// Rows seen so far (the next row's number is `rows + 1`).
    rows: i64,
}

impl FileDecoder {
    /// Decodes the file at `path`, of `format`: its events and rejected rows. Its rows have
    /// all been sent when this returns (the sender is dropped, which ends the writer's loop).
    fn run(mut self, path: &Path, format: Format) -> Result<(usize, Vec<Rejected>)> {
        match format {
            Format::JsonLines => self.jsonl(path)?,
            Format::Parquet => self.parquet(path)?,
        }
        Ok((self.events, self.rejects))
    }

    /// Decodes `lines`, the next rows of the file; an empty line is no event but keeps its number.
    fn push(&mut self, lines: &[Vec<u8>]) -> Result<()> {
        let messages: Vec<Message<'_>> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(i, l)| Message {
                payload: Some(l),
                partition: -1,
                offset: self.rows + i as i64 + 1,
                timestamp_ms: None,
            })
            .collect();
        let decoded = self.decoder.decode(&messages, self.now_us)?;
        self.take(decoded, lines.len())
    }

    /// Keeps `decoded`, the file's next `rows` rows.
    fn take(&mut self, decoded: Decoded, rows: usize) -> Result<()> {
        if decoded.batch.num_rows() > 0 {
            let b = archive_batch(&self.schema, &decoded)?;
            self.events += b.num_rows();
            // The writer has stopped only if it failed: its error is the import's.
            if self.out.blocking_send(b).is_err() {
                return Err(BatchError::BadRequest("the import's writer stopped".into()));
            }
        }
        self.rejects.extend(decoded.rejected);
        self.rows += rows as i64;
        Ok(())
    }

    fn jsonl(&mut self, path: &Path) -> Result<()> {
        let io = |source| BatchError::Io {
            path: path.display().to_string(),
            source,
        };
        let reader = BufReader::new(std::fs::File::open(path).map_err(io)?);
        let mut lines: Vec<Vec<u8>> = Vec::with_capacity(CHUNK);
        for line in reader.split(b'\n') {
            let mut l = line.map_err(io)?;
            if l.last() == Some(&b'\r') {
                l.pop();
            }
            if l.iter().all(u8::is_ascii_whitespace) {
                l.clear();
            }
            lines.push(l);
            if lines.len() == CHUNK {
                self.push(&lines)?;
                lines.clear();
            }
        }
        if !lines.is_empty() {
            self.push(&lines)?;
        }
        Ok(())
    }

    fn parquet(&mut self, path: &Path) -> Result<()> {
        let name = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| BatchError::Io {
            path: name.clone(),
            source,
        })?;
        let bad = |e: &dyn std::fmt::Display| {
            BatchError::BadRequest(format!("{name}: not a readable Parquet file: {e}"))
        };
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| bad(&e))?
            .with_batch_size(CHUNK)
            .build()
            .map_err(|e| bad(&e))?;
        let mut json = Vec::new();
        let latest = self.decoder.latest_event_time(self.now_us);
        for batch in reader {
            let batch = batch.map_err(|e| bad(&e))?;
            if let Some(decoded) = direct(&self.schema, &batch, self.rows, latest)? {
                self.take(decoded, batch.num_rows())?;
                continue;
            }
            json.clear();
            let mut w = LineDelimitedWriter::new(&mut json);
            w.write(&batch)?;
            w.finish()?;
            drop(w);
            let lines: Vec<Vec<u8>> = json
                .split(|&b| b == b'\n')
                .take(batch.num_rows())
                .map(<[u8]>::to_vec)
                .collect();
            self.push(&lines)?;
        }
        Ok(())
    }
}

/// `batch`, the Parquet rows after the file's first `before`, decoded as the decoder decodes
/// the JSON of its rows, without the JSON: when every schema field's column has a type whose
/// values carry over exactly, and every row is an event (required fields present, event time
/// within 1970 and `latest`). `None` otherwise: the caller decodes the batch's JSON, which
/// judges every row as a message is judged.
pub(crate) fn direct(
    schema: &EventSchema,
    batch: &RecordBatch,
    before: i64,
    latest: i64,
) -> Result<Option<Decoded>> {
    use datafusion::arrow::array::{new_null_array, Array, AsArray, Decimal128Array};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{
        DataType as T, Float64Type, Int64Type, TimeUnit, TimestampMicrosecondType,
    };
    use tandem_core::schema::FieldType as F;

    let rows = batch.num_rows();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields.len());
    for f in &schema.fields {
        let Some(col) = batch.column_by_name(&f.name) else {
            if f.required {
                return Ok(None);
            }
            columns.push(new_null_array(&f.ty.arrow_type(), rows));
            continue;
        };
        let integer = matches!(
            col.data_type(),
            T::Int8 | T::Int16 | T::Int32 | T::Int64 | T::UInt8 | T::UInt16 | T::UInt32
        );
        let out: ArrayRef = match (f.ty, col.data_type()) {
            (F::String, T::Utf8 | T::LargeUtf8 | T::Utf8View) => cast(col, &f.ty.arrow_type())?,
            (F::Int, _) if integer => cast(col, &f.ty.arrow_type())?,
            // JSON has no NaN or infinity (its writer makes them null): those go to it.
            (F::Float, T::Float64)
                if col
                    .as_primitive::<Float64Type>()
                    .iter()
                    .flatten()
                    .all(f64::is_finite) =>
            {
                Arc::clone(col)
            }
            (F::Float, _) if integer => cast(col, &f.ty.arrow_type())?,
            (F::Bool, T::Boolean) => Arc::clone(col),
            (F::Timestamp, T::Timestamp(unit, Some(_))) => {
                // Nanoseconds before 1970 round toward zero in the cast, where the JSON path
                // floors them: those are left to it.
                if *unit == TimeUnit::Nanosecond
                    && cast(col, &T::Int64)?
                        .as_primitive::<Int64Type>()
                        .iter()
                        .flatten()
                        .any(|t| t < 0)
                {
                    return Ok(None);
                }
                cast(col, &f.ty.arrow_type())?
            }
            (F::Decimal { scale }, T::Decimal128(_, s)) if *s >= 0 && *s as u8 <= scale => {
                cast(col, &f.ty.arrow_type())?
            }
            (F::Decimal { scale }, T::Float64) => {
                // As the JSON path reads a double: its shortest text, parsed exactly. Only
                // plain notation (no exponent) is taken here, where both texts are the same.
                let mut values = Vec::with_capacity(rows);
                for v in col.as_primitive::<Float64Type>().iter() {
                    values.push(match v {
                        None => None,
                        Some(0.0) => Some(0),
                        Some(v) if v.is_finite() && (1e-4..1e15).contains(&v.abs()) => {
                            match tandem_core::decode::parse_decimal(&v.to_string(), scale) {
                                Ok(units) => Some(units),
                                Err(_) => return Ok(None),
                            }
                        }
                        Some(_) => return Ok(None),
                    });
                }
                Arc::new(Decimal128Array::from(values).with_precision_and_scale(38, scale as i8)?)
            }
            _ => return Ok(None),
        };
        // A cast that lost a value (out of range) makes it null: not this path's to judge.
        if out.null_count() != col.null_count() || (f.required && out.null_count() > 0) {
            return Ok(None);
        }
        columns.push(out);
    }
    let times = columns[schema.event_time].as_primitive::<TimestampMicrosecondType>();
    if times.iter().flatten().any(|t| t < 0 || t > latest) {
        return Ok(None);
    }
    Ok(Some(Decoded {
        batch: RecordBatch::try_new(schema.arrow_schema(), columns)?,
        partitions: vec![-1; rows],
        offsets: (before + 1..=before + rows as i64).collect(),
        rejected: Vec::new(),
    }))
}

/// Imports history `files` (JSON lines or Parquet; directories stand for the files under them)
/// of `schema` into the master dataset, one commit per file, skipping files whose content was
/// imported before. `now_us` drives the event-time policy (future events are rejected);
/// `progress` hears about every file as it is done, and about a file
/// still being imported every [`PROGRESS_EVERY`].
pub async fn import_files(
    storage: &Storage,
    schema: &Arc<EventSchema>,
    files: &[impl AsRef<Path>],
    now_us: i64,
    mut progress: impl FnMut(&FileReport),
) -> Result<ImportReport> {
    let files = expand(files)?;
    let decoder = Arc::new(Decoder::new(Arc::clone(schema)));
    let mut writer: Option<MasterWriter> = None;
    let mut report = ImportReport::default();
    for (i, path) in files.iter().enumerate() {
        let started = Instant::now();
        let name = path.display().to_string();
        let bytes = std::fs::metadata(path)
            .map_err(|source| BatchError::Io {
                path: name.clone(),
                source,
            })?
            .len();
        let app_id = format!("{IMPORT_APP_PREFIX}{}", content_hash(path)?);
        let w = match &mut writer {
            Some(w) => w,
            None => writer.insert(MasterWriter::open(storage.clone(), Arc::clone(schema)).await?),
        };
        let (in_master, in_dead_letters) = w.txn_versions(&app_id, &app_id).await?;
        let mut file = FileReport {
            path: path.clone(),
            index: i + 1,
            of: files.len(),
            events: 0,
            rejected: 0,
            bytes,
            skipped: in_master >= 1,
            seconds: 0.0,
            done: true,
        };
        if file.skipped {
            tracing::info!(file = %name, "already imported (same content); skipped");
            report.skipped += 1;
            file.seconds = started.elapsed().as_secs_f64();
            progress(&file);
            continue;
        }
        // The file is decoded on a thread of its own and its rows written to new files as
        // they come (decoding and encoding each take a core), so no file is ever held whole
        // in memory; the files are committed at once when the last row is written.
        let (out, mut rows) = tokio::sync::mpsc::channel(4);
        let d = FileDecoder {
            schema: Arc::clone(schema),
            decoder: Arc::clone(&decoder),
            now_us,
            out,
            rejects: Vec::new(),
            events: 0,
            rows: 0,
        };
        let decoding = tokio::task::spawn_blocking({
            let path = path.clone();
            move || d.run(&path, Format::of(&path))
        });
        let mut staged = w.stage()?;
        let mut written = Ok(());
        let mut reported = Instant::now();
        while let Some(batch) = rows.recv().await {
            written = staged.write(batch).await;
            if written.is_err() {
                break;
            }
            if reported.elapsed() >= PROGRESS_EVERY {
                reported = Instant::now();
                progress(&FileReport {
                    events: staged.rows(),
                    seconds: started.elapsed().as_secs_f64(),
                    done: false,
                    ..file.clone()
                });
            }
        }
        // Dropped, so a decoder still sending stops.
        drop(rows);
        let decoded = decoding
            .await
            .map_err(|e| BatchError::BadRequest(format!("decoding {name} failed: {e}")))?;
        written?;
        let (events, rejects) = decoded?;
        file.events = events;
        file.rejected = rejects.len();
        // The dead letters' commit of an earlier, interrupted run of this file stands: its
        // rejects are not written twice.
        let rejects = if in_dead_letters >= 1 {
            Vec::new()
        } else {
            rejects
        };
        let dead_letter_txns = if rejects.is_empty() {
            Vec::new()
        } else {
            vec![(app_id.clone(), 1)]
        };
        w.commit_staged(
            staged,
            MasterCommit {
                rejects,
                source: name.clone(),
                master_txns: vec![(app_id, 1)],
                dead_letter_txns,
                metadata: vec![("tandem.import".to_string(), json!(name))],
                ..Default::default()
            },
            now_us,
        )
        .await?;
        report.files += 1;
        report.events += file.events;
        report.rejected += file.rejected;
        file.seconds = started.elapsed().as_secs_f64();
        tracing::info!(file = %name, events = file.events, rejected = file.rejected, "imported");
        progress(&file);
    }
    Ok(report)
}

/// Imports JSON-lines `files` of `schema` ([`import_files`] without progress).
pub async fn import_jsonl(
    storage: &Storage,
    schema: &Arc<EventSchema>,
    files: &[impl AsRef<Path>],
    now_us: i64,
) -> Result<ImportReport> {
    import_files(storage, schema, files, now_us, |_| {}).await
}
