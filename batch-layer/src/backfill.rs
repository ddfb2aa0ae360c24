//! Backfills: a view or a job recomputed over a range of days, a chunk at a time, each chunk
//! published atomically, resumable.
//!
//! Every chunk's commit records the backfill's id (a hash of what it computes: the view or
//! job, its definition and the range) and the last day it published. Run again with the same
//! range after an interruption, the backfill reads that from the table's history and starts
//! after the last chunk that landed: every day is published once, and a view's coverage grows
//! chunk by chunk while serving keeps answering.

use std::sync::Arc;
use std::time::Instant;

use chrono::NaiveDate;
use futures::TryStreamExt;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use tandem_core::job::JobDef;
use tandem_core::time::{day_string, parse_day};
use tandem_core::view::ViewDef;

use crate::compute::{BatchLayer, RunRequest};
use crate::error::{BatchError, Result};
use crate::runs::{RunRecord, SUCCEEDED};

/// Commit metadata keys of a backfill's chunk: its id, and the last day it published.
pub const BACKFILL_KEY: &str = "tandem.backfill";
pub const BACKFILL_THROUGH_KEY: &str = "tandem.backfill_through";

/// What a backfill computes.
#[derive(Debug, Clone)]
pub enum Target {
    View(Arc<ViewDef>),
    Job(Arc<JobDef>),
}

impl Target {
    pub fn name(&self) -> &str {
        match self {
            Target::View(v) => &v.name,
            Target::Job(j) => &j.name,
        }
    }
}

/// Where a backfill stands, after each chunk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackfillProgress {
    pub target: String,
    /// Days of the range, days published (this run and before it), days left at the start.
    pub total_days: usize,
    pub done_days: usize,
    /// Days this run resumed after (published by an earlier, interrupted run).
    pub resumed_days: usize,
    /// The chunk just published (inclusive), and its rows.
    pub chunk: (String, String),
    pub rows: usize,
    /// Rows published by this run so far.
    pub total_rows: usize,
    pub seconds: f64,
}

/// Hears about each published chunk.
pub type BackfillObserver = Arc<dyn Fn(&BackfillProgress) + Send + Sync>;

/// A backfill's request.
#[derive(Debug, Clone)]
pub struct Backfill {
    pub target: Target,
    pub from: i64,
    pub to: i64,
    /// Days per chunk (each chunk one publish).
    pub chunk_days: usize,
    /// Start over, even if an earlier run of the same backfill published chunks.
    pub restart: bool,
}

/// What a backfill did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackfillReport {
    pub target: String,
    pub from: String,
    pub to: String,
    /// Days published by earlier runs, skipped by this one.
    pub resumed_days: usize,
    pub published_days: usize,
    pub chunks: usize,
    pub rows: usize,
    pub seconds: f64,
}

impl Backfill {
    /// The id of this backfill: what it computes, over which range.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        let (kind, name, hash) = match &self.target {
            Target::View(v) => ("view", &v.name, &v.definition_hash),
            Target::Job(j) => ("job", &j.name, &j.definition_hash),
        };
        for part in [kind, name.as_str(), hash.as_str()] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        h.update(self.from.to_le_bytes());
        h.update(self.to.to_le_bytes());
        tandem_core::codec::hex(&h.finalize()[..12])
    }

    /// Runs the backfill on `layer`, telling `observer` after each chunk.
    pub async fn run(
        &self,
        layer: &BatchLayer,
        observer: Option<BackfillObserver>,
    ) -> Result<BackfillReport> {
        if self.from > self.to {
            return Err(BatchError::BadRequest("--from is after --to".into()));
        }
        let started = Instant::now();
        let id = self.id();
        let storage = layer.storage();
        let url = match &self.target {
            Target::View(v) => storage.layout().view(&v.name),
            Target::Job(j) => storage.layout().job(&j.name),
        };
        let through = match (self.restart, storage.open(&url).await?) {
            (false, Some(t)) => last_chunk(&t, &id).await?,
            _ => None,
        };
        let start = through.map_or(self.from, |d| d + 1);
        let total = (self.to - self.from + 1) as usize;
        let mut report = BackfillReport {
            target: self.target.name().to_string(),
            from: day_string(self.from),
            to: day_string(self.to),
            resumed_days: (start - self.from) as usize,
            ..Default::default()
        };
        if through.is_some() {
            tracing::info!(target = self.target.name(), resumed_after = %day_string(start - 1), "resuming a backfill");
        }
        let chunk = self.chunk_days.max(1) as i64;
        let mut a = start;
        while a <= self.to {
            let b = (a + chunk - 1).min(self.to);
            let meta = vec![
                (BACKFILL_KEY.to_string(), json!(id)),
                (BACKFILL_THROUGH_KEY.to_string(), json!(day_string(b))),
            ];
            let chunk_started = Instant::now();
            let chunk_started_us = layer.now_us();
            let rows = match &self.target {
                Target::View(v) => {
                    let req = RunRequest {
                        from_day: Some(a),
                        to_day: Some(b),
                        full: false,
                        metadata: meta,
                    };
                    layer.run_view(v, &req).await?.rows
                }
                Target::Job(j) => {
                    // One commit per date: each says itself how far the backfill got.
                    let mut rows = 0;
                    for d in a..=b {
                        let meta = vec![
                            (BACKFILL_KEY.to_string(), json!(id)),
                            (BACKFILL_THROUGH_KEY.to_string(), json!(day_string(d))),
                        ];
                        let r = layer.run_job(j, date_of_day(d)?, meta).await?;
                        rows += r.rows;
                    }
                    rows
                }
            };
            crate::runs::record(
                storage,
                &[RunRecord {
                    task: self.target.name().to_string(),
                    kind: match self.target {
                        Target::View(_) => "view",
                        Target::Job(_) => "job",
                    }
                    .into(),
                    date: Some(day_string(a)),
                    trigger: "backfill".into(),
                    scheduled_us: None,
                    started_us: chunk_started_us,
                    seconds: chunk_started.elapsed().as_secs_f64(),
                    rows: rows as i64,
                    status: SUCCEEDED.into(),
                    attempt: 1,
                    error: None,
                    holder: "backfill".into(),
                }],
            )
            .await?;
            report.chunks += 1;
            report.published_days += (b - a + 1) as usize;
            report.rows += rows;
            if let Some(o) = &observer {
                o(&BackfillProgress {
                    target: self.target.name().to_string(),
                    total_days: total,
                    done_days: (b - self.from + 1) as usize,
                    resumed_days: report.resumed_days,
                    chunk: (day_string(a), day_string(b)),
                    rows,
                    total_rows: report.rows,
                    seconds: started.elapsed().as_secs_f64(),
                });
            }
            a = b + 1;
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

fn date_of_day(d: i64) -> Result<NaiveDate> {
    NaiveDate::parse_from_str(&day_string(d), "%Y-%m-%d")
        .map_err(|e| BatchError::BadRequest(format!("day {d}: {e}")))
}

/// The last day published by backfill `id` in `table`'s history, if any chunk landed.
async fn last_chunk(table: &deltalake::DeltaTable, id: &str) -> Result<Option<i64>> {
    let infos: Vec<_> = table
        .history(None)
        .try_collect()
        .await
        .map_err(|e| BatchError::Core(tandem_core::storage::delta(e)))?;
    Ok(infos
        .iter()
        .filter(|i| i.info.get(BACKFILL_KEY).and_then(Json::as_str) == Some(id))
        .filter_map(|i| {
            i.info
                .get(BACKFILL_THROUGH_KEY)?
                .as_str()
                .and_then(parse_day)
        })
        .max())
}
