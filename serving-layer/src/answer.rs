//! Answers built from two parts rendered apart: the batch's settled rows, printed once per batch
//! version and query, and the speed's rows, printed per speed state; an answer interleaves the
//! two in its order. A new event costs the answer only its own buckets' rows, not the week the
//! batch settled.

use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use axum::body::Bytes;
use datafusion::arrow::array::{Array, RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::interleave;
use datafusion::arrow::datatypes::Schema;
use tandem_core::query::{
    too_many_groups, Coverage, QueryResult, RealtimeStatus, ResultRow, ViewQuery, MAX_QUERY_GROUPS,
};
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::ViewDef;
use tandem_core::CoreError;

use crate::gzip::Deflated;
use crate::merge::{batch_part, shell, speed_part, Order, SortKey, SpeedBuckets};
use crate::render::{to_arrow, JsonRows};

/// An answer ready to send: the result (without rows: they are in its parts), and its rows as
/// runs of the rows its parts printed: JSON shared with every answer built from the same parts
/// (never copied), an Arrow batch built when a client first asks for Arrow or CSV.
#[derive(Debug)]
pub struct Answered {
    pub result: QueryResult,
    /// The speed layer's freshness read before its rows were: the rows hold at least what it
    /// describes (what an answer served after newer events states, see [`Self::aged_status`]).
    status: RealtimeStatus,
    /// When the answer was computed.
    pub computed_at: Instant,
    /// The Arrow batch (without the answer's metadata), once asked for.
    batch: OnceLock<RecordBatch>,
    settled: Arc<Settled>,
    fresh: Rendered,
    /// The `other` rows, if the query asks for them.
    others: Option<Rendered>,
    /// The rows in the answer's order: runs of consecutive rows of one part (0: settled, 1:
    /// fresh, 2: others).
    runs: Vec<(usize, Range<usize>)>,
    /// The JSON rows in one buffer, when they are too many runs to send as slices.
    joined: OnceLock<Bytes>,
    /// The JSON rows deflated, once the first client accepting gzip asks (`None`: deflating
    /// failed, and gzip is not offered).
    gzip: OnceLock<Option<Deflated>>,
}

/// Past this many runs, an answer's JSON rows are sent as one buffer (joined once) rather
/// than as slices.
const MAX_SLICES: usize = 64;

impl Answered {
    /// The speed layer's freshness of this answer's rows, as of now: the status read before
    /// they were, with each lag grown by the time since.
    pub fn aged_status(&self) -> RealtimeStatus {
        let age = i64::try_from(self.computed_at.elapsed().as_millis()).unwrap_or(i64::MAX);
        let mut status = self.status.clone();
        status.lag_ms = status.lag_ms.map(|l| l.saturating_add(age));
        for lag in status.partition_lag_ms.values_mut() {
            *lag = lag.saturating_add(age);
        }
        status
    }

    /// Bytes held, roughly, besides the settled part (the cache of those counts it).
    pub fn weight(&self) -> usize {
        // The Arrow batch, if it is built, holds about the rows' own Arrow size again.
        let others = self.others.as_ref().map_or(0, Rendered::bytes);
        (self.fresh.bytes() + others) * 2 + self.runs.len() * 32 + 1024
    }

    /// Whether the Arrow batch is built (sending CSV or Arrow costs no interleaving).
    pub fn batch_ready(&self) -> bool {
        self.batch.get().is_some()
    }

    /// The rows as one Arrow batch (without the answer's metadata), built by the first caller.
    pub fn batch(&self) -> Result<RecordBatch, CoreError> {
        if let Some(b) = self.batch.get() {
            return Ok(b.clone());
        }
        let parts: Vec<&Rendered> = (0..3).map_while(|p| self.part(p)).collect();
        let picks: Vec<(usize, usize)> = self
            .runs
            .iter()
            .flat_map(|(p, rows)| rows.clone().map(move |i| (*p, i)))
            .collect();
        let columns = (0..parts[0].batch.num_columns())
            .map(|c| {
                let arrays: Vec<&dyn Array> =
                    parts.iter().map(|p| p.batch.column(c).as_ref()).collect();
                interleave(&arrays, &picks)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new_with_options(
            parts[0].batch.schema(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(picks.len())),
        )?;
        Ok(self.batch.get_or_init(|| batch).clone())
    }

    /// Part `p` of the rows, if the answer has it.
    fn part(&self, p: usize) -> Option<&Rendered> {
        match p {
            0 => Some(&self.settled.rows),
            1 => Some(&self.fresh),
            _ => self.others.as_ref(),
        }
    }

    /// The JSON rows, comma-separated, as chunks to send one after the other.
    pub fn json_rows(&self) -> Vec<Bytes> {
        let slices = self.runs.iter().enumerate().flat_map(|(n, (p, rows))| {
            let comma = (n > 0).then(|| Bytes::from_static(b","));
            comma
                .into_iter()
                .chain(self.part(*p).map(|part| part.json.run(rows.clone())))
        });
        if self.runs.len() <= MAX_SLICES {
            return slices.collect();
        }
        let joined = self.joined.get_or_init(|| {
            let mut joined = Vec::new();
            slices.for_each(|b| joined.extend_from_slice(&b));
            crate::sendfile::shared(joined)
        });
        vec![joined.clone()]
    }

    /// Whether the gzip rows are ready (sending them costs no compression).
    pub fn gzip_ready(&self) -> bool {
        self.gzip.get().is_some()
    }

    /// The JSON rows deflated for gzip answers (by the first caller): each part's rows are
    /// deflated once and shared; only runs that are not a whole part are deflated here.
    pub fn gzip(&self) -> Option<&Deflated> {
        self.gzip
            .get_or_init(|| {
                let mut out = Deflated::empty();
                for (n, (p, rows)) in self.runs.iter().enumerate() {
                    if n > 0 {
                        out.append(&Deflated::stored(b","));
                    }
                    out.append(&self.part(*p)?.deflated_run(rows.clone())?);
                }
                Some(out)
            })
            .as_ref()
    }
}

fn deflate(bytes: &[u8]) -> Option<Deflated> {
    Deflated::new(bytes)
        .inspect_err(|e| tracing::warn!(error = %e, "deflating an answer failed; it is sent as is"))
        .ok()
}

/// Rows printed once: as Arrow, as JSON, and the keys that order them.
#[derive(Debug)]
struct Rendered {
    batch: RecordBatch,
    json: JsonRows,
    keys: Vec<SortKey>,
    /// The rows themselves, kept when the query asks for `other` rows (the rows its limit
    /// cuts are merged into them); else empty.
    rows: Vec<ResultRow>,
    /// Every JSON row deflated, once a gzip answer needs them.
    deflated: OnceLock<Option<Deflated>>,
    /// The last few runs that were not every row, deflated (an answer cut at its limit sends
    /// the same run of the settled rows at every speed generation).
    runs: Mutex<Vec<(Range<usize>, Deflated)>>,
}

/// The partial runs a part keeps deflated.
const KEPT_RUNS: usize = 4;

impl Rendered {
    /// `rows` (in the answer's order) of `q` on `view`, printed.
    fn new(
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
        rows: Vec<ResultRow>,
    ) -> Result<Self, CoreError> {
        let order = Order::new(view, q);
        let keys = rows.iter().map(|r| order.key(r)).collect();
        let mut result = shell(view, q, coverage.clone());
        result.rows = rows;
        let batch = to_arrow(&result, view)?;
        let rows = match q.other {
            true => result.rows,
            false => Vec::new(),
        };
        // The answer's metadata is each request's own.
        let bare = Schema::new(batch.schema().fields().clone());
        let batch = RecordBatch::try_new_with_options(
            Arc::new(bare),
            batch.columns().to_vec(),
            &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?;
        let json = JsonRows::print(q.group_by.len(), q.other, &batch);
        Ok(Rendered {
            batch,
            json,
            keys,
            rows,
            deflated: OnceLock::new(),
            runs: Mutex::new(Vec::new()),
        })
    }

    /// JSON rows `rows`, deflated (kept for the next answer that sends the same run).
    fn deflated_run(&self, rows: Range<usize>) -> Option<Deflated> {
        if rows.len() == self.json.len() {
            return self.deflated();
        }
        let kept = |runs: &Vec<(Range<usize>, Deflated)>| {
            runs.iter()
                .find(|(r, _)| *r == rows)
                .map(|(_, d)| d.clone())
        };
        if let Some(d) = kept(&self.runs.lock().expect("runs lock poisoned")) {
            return Some(d);
        }
        let d = deflate(&self.json.run(rows.clone()))?;
        let mut runs = self.runs.lock().expect("runs lock poisoned");
        if kept(&runs).is_none() {
            if runs.len() == KEPT_RUNS {
                runs.remove(0);
            }
            runs.push((rows, d.clone()));
        }
        Some(d)
    }

    /// Every JSON row, deflated (by the first caller).
    fn deflated(&self) -> Option<Deflated> {
        self.deflated
            .get_or_init(|| deflate(&self.json.joined()))
            .clone()
    }

    fn bytes(&self) -> usize {
        let keys: usize = self
            .keys
            .iter()
            .map(|k| {
                std::mem::size_of::<SortKey>()
                    + k.dims
                        .iter()
                        .map(|d| 24 + d.as_ref().map_or(0, String::len))
                        .sum::<usize>()
            })
            .sum();
        // Deflated rows are counted at a sixth of the rows (what JSON rows deflate to): every
        // row once, and the kept runs.
        let deflated = self.json.bytes() * (1 + KEPT_RUNS) / 6;
        let rows: usize = self.rows.iter().map(|r| 64 + r.states.len() * 512).sum();
        self.batch.get_array_memory_size() + self.json.bytes() + deflated + keys + rows
    }
}

/// The batch's part of one query's answer at one batch version: the rows it settles, printed,
/// and its rows of the answer buckets it covers only in part, kept as states to merge with the
/// speed's rows.
#[derive(Debug)]
pub struct Settled {
    rows: Rendered,
    open: Vec<ResultRow>,
    /// The speed's rows by bucket, reused while a bucket is unchanged.
    speed: SpeedBuckets,
    /// What the kept speed rows are counted at in the weight.
    speed_bytes: usize,
}

impl Settled {
    /// The batch's part of `q` on `view` at `coverage`.
    pub async fn compute(
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
        batch: &dyn BatchViews,
    ) -> Result<Self, CoreError> {
        let part = batch_part(view, q, coverage, batch).await?;
        let days = q.days().count().max(1);
        let speed_bytes = part.settled.len().div_ceil(days) * (64 + q.metrics.len() * 512);
        Ok(Settled {
            rows: Rendered::new(view, q, coverage, part.settled)?,
            open: part.open,
            speed: SpeedBuckets::default(),
            speed_bytes,
        })
    }

    /// Bytes held, roughly (an open row's states are counted at a sketch's size, and so are
    /// the states of the speed rows it may keep: a day's worth of the settled part's rows).
    pub fn weight(&self) -> usize {
        self.rows.bytes()
            + self
                .open
                .iter()
                .map(|r| 64 + r.states.len() * 512)
                .sum::<usize>()
            + self.speed_bytes
            + 1024
    }
}

/// The answer of `q` on `view` at `coverage`: the batch's `settled` part and the speed's rows
/// as they are now, in the answer's order, cut at its limit.
pub fn answer(
    view: &ViewDef,
    q: &ViewQuery,
    coverage: Coverage,
    settled: &Arc<Settled>,
    speed: &dyn RealtimeView,
) -> Result<Answered, CoreError> {
    let (status, computed_at) = (speed.status(), Instant::now());
    let fresh = speed_part(
        view,
        q,
        &coverage,
        &settled.open,
        speed,
        Some(&settled.speed),
    )?;
    let fresh = Rendered::new(view, q, &coverage, fresh)?;
    let parts = [&settled.rows, &fresh];
    let order = Order::new(view, q);
    let total = parts[0].keys.len() + parts[1].keys.len();
    // The points an answer may hold before its limit, as the batch side bounds its own.
    if total > MAX_QUERY_GROUPS {
        return Err(too_many_groups(&view.name, MAX_QUERY_GROUPS));
    }
    let mut picks: Vec<(usize, usize)> = Vec::with_capacity(total.min(q.limit));
    let mut next = [0usize, 0usize];
    while picks.len() < total.min(q.limit) {
        let part = match (parts[0].keys.get(next[0]), parts[1].keys.get(next[1])) {
            (Some(a), Some(b)) => usize::from(order.compare(a, b).is_gt()),
            (Some(_), None) => 0,
            _ => 1,
        };
        picks.push((part, next[part]));
        next[part] += 1;
    }

    let others = match q.other {
        true => {
            let cut = parts
                .iter()
                .zip(next)
                .flat_map(|(part, n)| part.rows[n..].iter().cloned());
            let others = crate::merge::others(q, cut);
            let buckets: Vec<i64> = picks
                .iter()
                .map(|&(p, i)| parts[p].keys[i].bucket_us)
                .collect();
            let at = crate::merge::other_positions(q, &buckets, &others);
            let mut placed = Vec::with_capacity(picks.len() + others.len());
            let mut taken = 0;
            for (j, at) in at.into_iter().enumerate() {
                placed.extend_from_slice(&picks[taken..at]);
                placed.push((2, j));
                taken = at;
            }
            placed.extend_from_slice(&picks[taken..]);
            picks = placed;
            Some(Rendered::new(view, q, &coverage, others)?)
        }
        false => None,
    };
    let mut runs: Vec<(usize, Range<usize>)> = Vec::new();
    for &(p, i) in &picks {
        match runs.last_mut() {
            Some((last, rows)) if *last == p && rows.end == i => rows.end += 1,
            _ => runs.push((p, i..i + 1)),
        }
    }
    let mut result = shell(view, q, coverage);
    result.truncated = total > q.limit;
    Ok(Answered {
        result,
        status,
        computed_at,
        batch: OnceLock::new(),
        settled: Arc::clone(settled),
        fresh,
        others,
        runs,
        joined: OnceLock::new(),
        gzip: OnceLock::new(),
    })
}
