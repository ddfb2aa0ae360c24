//! `tandem import`: history from JSON-lines files into the master dataset, through the same
//! decoder as Kafka messages. Rejected lines go to the dead-letter table with the file's name as
//! their topic and the line number as their offset. Each file is one commit.

use std::io::{BufRead, BufReader};
use std::path::Path;

use datafusion::arrow::array::AsArray;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::protocol::SaveMode;
use serde_json::json;
use tandem_core::decode::{Decoder, Message};
use tandem_core::master::{archive_batch, dead_letter_batch, dead_letter_schema};
use tandem_core::schema::EventSchema;
use tandem_core::storage::Storage;
use tandem_core::view::DAY_COLUMN;

use crate::compute::DAYS_KEY;
use crate::error::{BatchError, Result};

/// Lines decoded per batch.
const CHUNK: usize = 50_000;

/// What one import did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportReport {
    pub events: usize,
    pub rejected: usize,
    pub files: usize,
}

/// Imports JSON-lines `files` of `schema` into the master dataset. `now_us` drives the
/// event-time policy (future events are rejected).
pub async fn import_jsonl(
    storage: &Storage,
    schema: &std::sync::Arc<EventSchema>,
    files: &[impl AsRef<Path>],
    now_us: i64,
) -> Result<ImportReport> {
    let decoder = Decoder::new(std::sync::Arc::clone(schema));
    let master_url = storage.layout().master(&schema.name);
    let dlq_url = storage.layout().dead_letter(&schema.name);
    let mut report = ImportReport::default();
    for path in files {
        let path = path.as_ref();
        let io = |source| BatchError::Io {
            path: path.display().to_string(),
            source,
        };
        let reader = BufReader::new(std::fs::File::open(path).map_err(io)?);
        let mut batches = Vec::new();
        let mut rejects = Vec::new();
        let mut days = std::collections::BTreeSet::new();
        let mut lines: Vec<Vec<u8>> = Vec::with_capacity(CHUNK);
        let mut line_no = 0i64;
        let mut split = reader.split(b'\n');
        loop {
            let next = split.next().transpose().map_err(io)?;
            let done = next.is_none();
            if let Some(mut l) = next {
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                // Blank lines keep their number but are not events.
                if l.iter().all(u8::is_ascii_whitespace) {
                    l.clear();
                }
                lines.push(l);
            }
            if lines.len() == CHUNK || (done && !lines.is_empty()) {
                let messages: Vec<Message<'_>> = lines
                    .iter()
                    .enumerate()
                    .filter(|(_, l)| !l.is_empty())
                    .map(|(i, l)| Message {
                        payload: Some(l),
                        partition: -1,
                        offset: line_no + i as i64 + 1,
                        timestamp_ms: None,
                    })
                    .collect();
                let decoded = decoder.decode(&messages, now_us)?;
                if decoded.batch.num_rows() > 0 {
                    let b = archive_batch(schema, &decoded)?;
                    let dt = b
                        .column_by_name(DAY_COLUMN)
                        .expect("archive batches have dt")
                        .as_string::<i32>();
                    days.extend(dt.iter().flatten().map(str::to_string));
                    report.events += b.num_rows();
                    batches.push(b);
                }
                report.rejected += decoded.rejected.len();
                rejects.extend(decoded.rejected);
                line_no += lines.len() as i64;
                lines.clear();
            }
            if done {
                break;
            }
        }
        let name = path.display().to_string();
        if !rejects.is_empty() {
            let dlq = storage
                .open_or_create(&dlq_url, &dead_letter_schema(), &[])
                .await?;
            dlq.write(vec![dead_letter_batch(&name, &rejects, now_us)?])
                .with_save_mode(SaveMode::Append)
                .await
                .map_err(|e| BatchError::delta(&dlq_url, e))?;
        }
        if !batches.is_empty() {
            let master = storage
                .open_or_create(&master_url, &schema.master_schema(), &[DAY_COLUMN])
                .await?;
            let props = CommitProperties::default().with_metadata([
                (DAYS_KEY.to_string(), json!(days)),
                ("tandem.import".to_string(), json!(name)),
            ]);
            master
                .write(batches)
                .with_save_mode(SaveMode::Append)
                .with_partition_columns([DAY_COLUMN])
                .with_commit_properties(props)
                .await
                .map_err(|e| BatchError::delta(&master_url, e))?;
        }
        report.files += 1;
        tracing::info!(file = %name, events = report.events, rejected = report.rejected, "imported");
    }
    Ok(report)
}
