//! `tandem import`: history from JSON-lines files into the master dataset, through the same
//! decoder as Kafka messages and the same writer (core's `MasterWriter`) as the archiver.
//! Rejected lines go to the dead-letter table with the file's name as their topic and the line
//! number as their offset. Each file is one commit.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::json;
use tandem_core::decode::{Decoder, Message};
use tandem_core::master::{archive_batch, MasterCommit, MasterWriter};
use tandem_core::schema::EventSchema;
use tandem_core::storage::Storage;

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
    let mut writer: Option<MasterWriter> = None;
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
        if !batches.is_empty() || !rejects.is_empty() {
            let w = match &mut writer {
                Some(w) => w,
                None => writer.insert(
                    MasterWriter::open(storage.clone(), std::sync::Arc::clone(schema)).await?,
                ),
            };
            w.commit(
                MasterCommit {
                    rows: batches,
                    rejects,
                    source: name.clone(),
                    metadata: vec![("tandem.import".to_string(), json!(name))],
                    ..Default::default()
                },
                now_us,
            )
            .await?;
        }
        report.files += 1;
        tracing::info!(file = %name, events = report.events, rejected = report.rejected, "imported");
    }
    Ok(report)
}
