//! `tandem dlq list` and `tandem dlq replay`: dead letters a person can read and act on.
//!
//! A replay decodes the chosen dead letters again with the current schema and decoder; those
//! that are events now move into the master dataset (with the partition and offset they came
//! from), the rest stay. A move is two commits, one per table, made safe by a numbered Delta
//! transaction id (`tandem.dlq-replay`) in both: the master's commit carries replay `n` with the
//! keys it moved, the dead-letter table's delete carries `n` too. A replay that finds the
//! master one ahead (a crash between the two commits) finishes the delete of the keys the
//! master's commit names before anything else, so a dead letter is moved once, never twice and
//! never lost; replaying again adds nothing.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int32Type, Int64Type, TimestampMicrosecondType};
use datafusion::prelude::{concat, ident, lit, Expr, SessionContext};
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::Transaction;
use deltalake::DeltaTable;
use futures::TryStreamExt;
use serde::Serialize;
use serde_json::{json, Value as Json};
use tandem_core::decode::{Decoder, Message};
use tandem_core::master::{archive_batch, MasterCommit, MasterWriter};
use tandem_core::schema::EventSchema;
use tandem_core::storage::Storage;

use crate::error::{BatchError, Result};

/// The `txn` app id of replays, in both tables.
pub const REPLAY_APP: &str = "tandem.dlq-replay";
/// The master commit's metadata key listing the dead letters a replay moved.
const REPLAY_KEY: &str = "tandem.dlq_replay";

/// One dead letter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The broker's timestamp, microseconds.
    pub broker_time_us: Option<i64>,
    pub reason: String,
    pub error: String,
    /// The bytes as received, shown printable ([`printable`]).
    #[serde(serialize_with = "raw_as_text")]
    pub raw: Vec<u8>,
    pub received_at_us: i64,
}

fn raw_as_text<S: serde::Serializer>(raw: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&printable(raw))
}

/// Bytes for a person: UTF-8 text with control characters escaped, or `0x` and hex when they
/// are not UTF-8.
pub fn printable(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(s) => s
            .chars()
            .flat_map(|c| {
                if c.is_control() {
                    c.escape_default().collect::<Vec<_>>()
                } else {
                    vec![c]
                }
            })
            .collect(),
        Err(_) => {
            format!("0x{}", tandem_core::codec::hex(raw))
        }
    }
}

/// Which dead letters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `decode`, `schema` or `event_time`.
    pub reason: Option<String>,
    /// Received at or after, microseconds.
    pub since_us: Option<i64>,
}

impl Filter {
    fn keeps(&self, d: &DeadLetter) -> bool {
        self.reason.as_deref().is_none_or(|r| r == d.reason)
            && self.since_us.is_none_or(|t| d.received_at_us >= t)
    }
}

/// The dead letters of `schema` that `filter` keeps, oldest received first.
pub async fn list(
    storage: &Storage,
    schema: &EventSchema,
    filter: &Filter,
) -> Result<Vec<DeadLetter>> {
    let url = storage.layout().dead_letter(&schema.name);
    match storage.open(&url).await? {
        Some(t) => read(&t, filter).await,
        None => Ok(Vec::new()),
    }
}

async fn read(table: &DeltaTable, filter: &Filter) -> Result<Vec<DeadLetter>> {
    let ctx = SessionContext::new();
    ctx.register_table("d", table.table_provider().await?)?;
    let df = ctx.table("d").await?.select(
        [
            "topic",
            "partition",
            "offset",
            "broker_time",
            "reason",
            "error",
            "raw",
            "received_at",
        ]
        .into_iter()
        .map(ident)
        .collect::<Vec<Expr>>(),
    )?;
    let mut out = Vec::new();
    for b in df.collect().await? {
        let text = |i: usize| cast(b.column(i), &DataType::Utf8);
        let (topic, reason, error) = (text(0)?, text(4)?, text(5)?);
        let (topic, reason, error) = (
            topic.as_string::<i32>(),
            reason.as_string::<i32>(),
            error.as_string::<i32>(),
        );
        let partition = b.column(1).as_primitive::<Int32Type>();
        let offset = b.column(2).as_primitive::<Int64Type>();
        let broker = b.column(3).as_primitive::<TimestampMicrosecondType>();
        let raw = cast(b.column(6), &DataType::Binary)?;
        let raw = raw.as_binary::<i32>();
        let received = b.column(7).as_primitive::<TimestampMicrosecondType>();
        for row in 0..b.num_rows() {
            let d = DeadLetter {
                topic: topic.value(row).to_string(),
                partition: partition.value(row),
                offset: offset.value(row),
                broker_time_us: broker.is_valid(row).then(|| broker.value(row)),
                reason: reason.value(row).to_string(),
                error: error.value(row).to_string(),
                raw: raw.value(row).to_vec(),
                received_at_us: received.value(row),
            };
            if filter.keeps(&d) {
                out.push(d);
            }
        }
    }
    out.sort_by(|a, b| {
        (a.received_at_us, &a.topic, a.partition, a.offset).cmp(&(
            b.received_at_us,
            &b.topic,
            b.partition,
            b.offset,
        ))
    });
    Ok(out)
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReplayReport {
    /// Dead letters moved into the master dataset now.
    pub moved: usize,
    /// Dead letters looked at that are still not events (they stay).
    pub still_rejected: usize,
    /// Dead letters of an interrupted replay (in the master, not yet deleted) deleted first.
    pub finished_earlier: usize,
}

/// A dead letter's identity, as the delete matches it.
fn key(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

fn key_expr() -> Expr {
    concat(vec![
        ident("topic"),
        lit("/"),
        datafusion::prelude::cast(ident("partition"), DataType::Utf8),
        lit("/"),
        datafusion::prelude::cast(ident("offset"), DataType::Utf8),
    ])
}

/// Deletes the dead letters `keys` with replay number `n` in the commit.
async fn delete(table: DeltaTable, url: &url::Url, keys: &[String], n: i64) -> Result<()> {
    let props =
        CommitProperties::default().with_application_transaction(Transaction::new(REPLAY_APP, n));
    table
        .delete()
        .with_predicate(key_expr().in_list(keys.iter().map(|k| lit(k.as_str())).collect(), false))
        .with_commit_properties(props)
        .await
        .map_err(|e| BatchError::delta(url, e))?;
    Ok(())
}

/// Decodes the dead letters of `schema` that `filter` keeps again, with the current schema and
/// `now_us` for the event-time policy, and moves those that are events now into the master
/// dataset, once.
pub async fn replay(
    storage: &Storage,
    schema: &Arc<EventSchema>,
    filter: &Filter,
    now_us: i64,
) -> Result<ReplayReport> {
    replay_with(storage, schema, filter, now_us, false).await
}

/// [`replay`]; with `stop_after_master`, stops between the two commits (as a crash would).
pub(crate) async fn replay_with(
    storage: &Storage,
    schema: &Arc<EventSchema>,
    filter: &Filter,
    now_us: i64,
    stop_after_master: bool,
) -> Result<ReplayReport> {
    let mut report = ReplayReport::default();
    let dlq_url = storage.layout().dead_letter(&schema.name);
    if storage.open(&dlq_url).await?.is_none() {
        return Ok(report);
    }
    let mut writer = MasterWriter::open(storage.clone(), Arc::clone(schema)).await?;
    let (in_master, in_dlq) = writer.txn_versions(REPLAY_APP, REPLAY_APP).await?;
    if in_master > in_dlq {
        // Replay `in_master` moved its dead letters into the master but did not delete them.
        let master_url = storage.layout().master(&schema.name);
        let master = storage
            .open(&master_url)
            .await?
            .ok_or_else(|| BatchError::BadRequest("the master dataset is gone".into()))?;
        let infos: Vec<_> = master
            .history(None)
            .try_collect()
            .await
            .map_err(|e| BatchError::delta(&master_url, e))?;
        let keys: Vec<String> = infos
            .iter()
            .filter_map(|i| i.info.get(REPLAY_KEY))
            .find(|m| m.get("replay").and_then(Json::as_i64) == Some(in_master))
            .and_then(|m| m.get("keys"))
            .and_then(Json::as_array)
            .map(|k| k.iter().filter_map(Json::as_str).map(str::to_string).collect())
            .ok_or_else(|| {
                BatchError::BadRequest(format!(
                    "replay {in_master} is in the master's transaction ids but its commit is not in the history"
                ))
            })?;
        let dlq = storage.open(&dlq_url).await?.expect("exists");
        delete(dlq, &dlq_url, &keys, in_master).await?;
        report.finished_earlier = keys.len();
    }
    let dlq = storage.open(&dlq_url).await?.expect("exists");
    let letters = read(&dlq, filter).await?;
    if letters.is_empty() {
        return Ok(report);
    }
    // Decoded a topic (or an imported file) at a time: (partition, offset) names a message
    // within one.
    let decoder = Decoder::new(Arc::clone(schema));
    let mut rows = Vec::new();
    let mut moved: Vec<String> = Vec::new();
    let mut start = 0;
    let mut letters = letters;
    letters
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    while start < letters.len() {
        let end = start
            + letters[start..]
                .iter()
                .take_while(|d| d.topic == letters[start].topic)
                .count();
        let group = &letters[start..end];
        start = end;
        let messages: Vec<Message<'_>> = group
            .iter()
            .map(|d| Message {
                payload: Some(&d.raw),
                partition: d.partition,
                offset: d.offset,
                timestamp_ms: d.broker_time_us.map(|t| t.div_euclid(1000)),
            })
            .collect();
        let decoded = decoder.decode(&messages, now_us)?;
        report.still_rejected += decoded.rejected.len();
        let rejected: std::collections::HashSet<(i32, i64)> = decoded
            .rejected
            .iter()
            .map(|r| (r.partition, r.offset))
            .collect();
        moved.extend(
            group
                .iter()
                .filter(|d| !rejected.contains(&(d.partition, d.offset)))
                .map(|d| key(&d.topic, d.partition, d.offset)),
        );
        if decoded.batch.num_rows() > 0 {
            rows.push(archive_batch(schema, &decoded)?);
        }
    }
    if moved.is_empty() {
        return Ok(report);
    }
    let n = in_master.max(in_dlq) + 1;
    writer
        .commit(
            MasterCommit {
                rows,
                master_txns: vec![(REPLAY_APP.to_string(), n)],
                metadata: vec![(
                    REPLAY_KEY.to_string(),
                    json!({ "replay": n, "keys": moved }),
                )],
                ..Default::default()
            },
            now_us,
        )
        .await?;
    if stop_after_master {
        return Ok(report);
    }
    let dlq = storage.open(&dlq_url).await?.expect("exists");
    delete(dlq, &dlq_url, &moved, n).await?;
    report.moved = moved.len();
    Ok(report)
}
