//! The lambda merge: covered buckets from batch, the rest from speed, bucket by bucket, then
//! rolled up to the asked granularity. Each row says where it came from.
//!
//! The merge is in two parts, so that the larger one can be reused ([`crate::answer`]): the
//! batch's part ([`batch_part`]) depends only on the batch version, and holds the rows whose
//! answer buckets the batch covers entirely (settled: no speed event can change them); the
//! speed's part ([`speed_part`]) is the rows of the buckets the batch does not settle, with the
//! batch's rows for the covered part of those buckets merged in.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Mutex;

use tandem_core::metric::MetricState;
use tandem_core::query::{
    too_many_groups, AggRow, Coverage, GroupKey, OrderBy, QueryResult, ResultRow, Source,
    ViewQuery, MAX_QUERY_GROUPS,
};
use tandem_core::time::day_of;
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::ViewDef;
use tandem_core::Result;

/// Answers `q` on `view` from both layers, the batch at `coverage` (which
/// [`BatchViews::coverage`] gave).
pub async fn answer_at(
    view: &ViewDef,
    q: &ViewQuery,
    coverage: Coverage,
    batch: &dyn BatchViews,
    speed: &dyn RealtimeView,
) -> Result<QueryResult> {
    let part = batch_part(view, q, &coverage, batch).await?;
    let fresh = speed_part(view, q, &coverage, &part.open, speed, None)?;
    let mut rows = part.settled;
    rows.extend(fresh);
    if rows.len() > MAX_QUERY_GROUPS {
        return Err(too_many_groups(&view.name, MAX_QUERY_GROUPS));
    }
    Order::new(view, q).sort(&mut rows);
    let cut = rows.split_off(q.limit.min(rows.len()));
    let truncated = !cut.is_empty();
    if q.other {
        let others = others(q, cut);
        let buckets: Vec<i64> = rows.iter().map(|r| r.bucket_us).collect();
        let at = other_positions(q, &buckets, &others);
        // Later rows first, so that the earlier positions hold.
        for (row, at) in others.into_iter().zip(at).rev() {
            rows.insert(at, row);
        }
    }
    let mut result = shell(view, q, coverage);
    result.realtime = speed.status();
    result.rows = rows;
    result.truncated = truncated;
    Ok(result)
}

/// The `other` rows of `q`'s answer: the rows its limit `cut`, merged into one row per answer
/// bucket (no group-by values; distinct counts rolled up by sketch union, as any roll-up), in
/// the answer's bucket direction.
pub fn others(q: &ViewQuery, cut: impl IntoIterator<Item = ResultRow>) -> Vec<ResultRow> {
    let cut = cut.into_iter().map(|r| {
        let row = AggRow {
            bucket_us: r.bucket_us,
            dims: vec![None; r.dims.len()],
            states: r.states,
        };
        (r.source, row)
    });
    let mut rows = group(q, cut);
    rows.iter_mut().for_each(|r| r.other = true);
    match q.order_by {
        OrderBy::Bucket { descending: true } => {
            rows.sort_by_key(|r| std::cmp::Reverse(r.bucket_us))
        }
        _ => rows.sort_by_key(|r| r.bucket_us),
    }
    rows
}

/// Where each of `others` (of [`others`]) goes among an answer's rows, whose buckets are
/// `buckets` in the answer's order: the number of rows before it. In an answer in bucket
/// order, a bucket's `other` row follows its bucket's rows; in one ordered by a metric, the
/// `other` rows follow every row.
pub fn other_positions(q: &ViewQuery, buckets: &[i64], others: &[ResultRow]) -> Vec<usize> {
    others
        .iter()
        .map(|o| match q.order_by {
            OrderBy::Bucket { descending: false } => buckets.partition_point(|&b| b <= o.bucket_us),
            OrderBy::Bucket { descending: true } => buckets.partition_point(|&b| b >= o.bucket_us),
            OrderBy::Metric { .. } => buckets.len(),
        })
        .collect()
}

/// The answer of `q` at `coverage` without rows: view, granularity, dimensions and metrics.
pub fn shell(view: &ViewDef, q: &ViewQuery, coverage: Coverage) -> QueryResult {
    QueryResult {
        view: view.name.clone(),
        definition_hash: view.definition_hash.clone(),
        granularity: q.granularity,
        coverage,
        realtime: Default::default(),
        dims: q
            .group_by
            .iter()
            .map(|&d| view.dimensions[d].clone())
            .collect(),
        metrics: q.metrics.clone(),
        rows: Vec::new(),
        truncated: false,
        other: q.other,
        degraded: Vec::new(),
    }
}

/// The batch's part of an answer.
#[derive(Debug, Default)]
pub struct BatchPart {
    /// Rows of answer buckets the batch covers entirely, in the answer's order (all of them:
    /// the limit applies once merged).
    pub settled: Vec<ResultRow>,
    /// Batch rows of answer buckets the batch covers only in part, to merge with speed rows.
    pub open: Vec<ResultRow>,
}

/// The batch's part of `q` on `view` at `coverage`.
pub async fn batch_part(
    view: &ViewDef,
    q: &ViewQuery,
    coverage: &Coverage,
    batch: &dyn BatchViews,
) -> Result<BatchPart> {
    let rows = batch.query(view, q, coverage).await?;
    let rows = group(
        q,
        rows.into_iter()
            .filter(|r| q.in_range(r.bucket_us) && coverage.covers(r.bucket_us))
            .map(|r| (Source::Batch, r)),
    );
    let (mut settled, open): (Vec<_>, Vec<_>) = rows
        .into_iter()
        .partition(|r| settles(coverage, q, r.bucket_us));
    Order::new(view, q).sort(&mut settled);
    Ok(BatchPart { settled, open })
}

/// The rows of `q` on `view` the batch at `coverage` does not settle: speed rows of the
/// buckets it does not cover, merged with `open` (the batch's part for the buckets it covers
/// in part), in the answer's order. With `kept`, the speed rows of buckets unchanged since
/// they were last read (same stamp) are reused from it, and the others read and kept.
pub fn speed_part(
    view: &ViewDef,
    q: &ViewQuery,
    coverage: &Coverage,
    open: &[ResultRow],
    speed: &dyn RealtimeView,
    kept: Option<&SpeedBuckets>,
) -> Result<Vec<ResultRow>> {
    let speed_rows = match kept {
        Some(kept) => kept.rows(view, q, coverage, speed)?,
        None => speed.query(view, q, coverage)?,
    };
    let mut rows = group(
        q,
        open.iter()
            .map(|r| {
                let row = AggRow {
                    bucket_us: r.bucket_us,
                    dims: r.dims.clone(),
                    states: r.states.clone(),
                };
                (Source::Batch, row)
            })
            .chain(
                speed_rows
                    .into_iter()
                    .filter(|r| q.in_range(r.bucket_us) && !coverage.covers(r.bucket_us))
                    .map(|r| (Source::Speed, r)),
            ),
    );
    Order::new(view, q).sort(&mut rows);
    Ok(rows)
}

/// Speed rows of one query by native bucket, each with the stamp it was read after
/// ([`RealtimeView::bucket_stamps`]): a new event costs the next answer the rows of its own
/// bucket, not every bucket of the day.
#[derive(Debug, Default)]
pub struct SpeedBuckets(Mutex<HashMap<i64, (u64, Vec<AggRow>)>>);

/// A bucket with more rows than this is read every time rather than kept.
const MAX_KEPT_ROWS: usize = 1024;

impl SpeedBuckets {
    /// The speed rows of `q` at `coverage`: kept rows of buckets whose stamp is unchanged,
    /// the others read (after their stamps, so rows are never older than the stamp they are
    /// kept with).
    fn rows(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
        speed: &dyn RealtimeView,
    ) -> Result<Vec<AggRow>> {
        let Some(stamps) = speed.bucket_stamps(view, q, coverage) else {
            return speed.query(view, q, coverage);
        };
        let mut rows = Vec::new();
        let mut stale = Vec::new();
        {
            let kept = self.0.lock().expect("kept speed rows lock poisoned");
            for (&bucket, &stamp) in &stamps {
                match kept.get(&bucket) {
                    Some((s, r)) if *s == stamp => rows.extend(r.iter().cloned()),
                    _ => stale.push(bucket),
                }
            }
        }
        if stale.is_empty() {
            return Ok(rows);
        }
        let mut read: HashMap<i64, Vec<AggRow>> = stale.iter().map(|&b| (b, Vec::new())).collect();
        for r in speed.query_buckets(view, q, coverage, &stale)? {
            read.entry(r.bucket_us).or_default().push(r);
        }
        let mut kept = self.0.lock().expect("kept speed rows lock poisoned");
        kept.retain(|b, _| stamps.contains_key(b));
        for (bucket, bucket_rows) in read {
            rows.extend(bucket_rows.iter().cloned());
            if bucket_rows.len() <= MAX_KEPT_ROWS {
                kept.insert(bucket, (stamps[&bucket], bucket_rows));
            }
        }
        Ok(rows)
    }
}

/// Whether the batch at `coverage` covers every native bucket of `q`'s range that the answer
/// bucket starting at `bucket_us` holds.
fn settles(coverage: &Coverage, q: &ViewQuery, bucket_us: i64) -> bool {
    let from = bucket_us.max(q.from_us);
    let to = q.answer_bucket_end(bucket_us).min(q.to_us);
    to <= from || (day_of(from)..=day_of(to - 1)).all(|d| coverage.days.contains(&d))
}

/// Rows (native buckets in `q`'s range, or rows already in answer buckets) rolled up to
/// `q`'s granularity, marked with the layers they came from.
fn group(q: &ViewQuery, rows: impl Iterator<Item = (Source, AggRow)>) -> Vec<ResultRow> {
    let mut groups: HashMap<GroupKey, (Source, Vec<MetricState>)> = HashMap::new();
    for (source, r) in rows {
        let key = (q.answer_bucket(r.bucket_us), r.dims);
        match groups.get_mut(&key) {
            Some((s, states)) => {
                if *s != source {
                    *s = Source::Mixed;
                }
                states
                    .iter_mut()
                    .zip(&r.states)
                    .for_each(|(a, b)| a.merge(b));
            }
            None => {
                groups.insert(key, (source, r.states));
            }
        }
    }
    groups
        .into_iter()
        .map(|((bucket_us, dims), (source, states))| ResultRow {
            bucket_us,
            source,
            dims,
            states,
            other: false,
        })
        .collect()
}

/// What orders a row in an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SortKey {
    pub bucket_us: i64,
    pub dims: Vec<Option<String>>,
    /// The ordering metric's value, when the answer is ordered by one.
    pub metric: Option<f64>,
}

/// The order of `q`'s answer rows.
#[derive(Debug, Clone, Copy)]
pub struct Order<'a> {
    view: &'a ViewDef,
    q: &'a ViewQuery,
}

impl<'a> Order<'a> {
    pub fn new(view: &'a ViewDef, q: &'a ViewQuery) -> Self {
        Order { view, q }
    }

    pub fn key(&self, row: &ResultRow) -> SortKey {
        let metric = match self.q.order_by {
            OrderBy::Metric { index, .. } => {
                row.states[index].sort_key(&self.view.metrics[self.q.metrics[index]])
            }
            OrderBy::Bucket { .. } => None,
        };
        SortKey {
            bucket_us: row.bucket_us,
            dims: row.dims.clone(),
            metric,
        }
    }

    pub fn compare(&self, a: &SortKey, b: &SortKey) -> Ordering {
        let natural = || {
            a.bucket_us
                .cmp(&b.bucket_us)
                .then_with(|| a.dims.cmp(&b.dims))
        };
        match self.q.order_by {
            OrderBy::Bucket { descending } => {
                let o = natural();
                if descending {
                    o.reverse()
                } else {
                    o
                }
            }
            OrderBy::Metric { descending, .. } => {
                let o = a.metric.partial_cmp(&b.metric).unwrap_or(Ordering::Equal);
                let o = if descending { o.reverse() } else { o };
                o.then_with(natural)
            }
        }
    }

    pub fn sort(&self, rows: &mut Vec<ResultRow>) {
        let mut keyed: Vec<(SortKey, ResultRow)> =
            rows.drain(..).map(|r| (self.key(&r), r)).collect();
        keyed.sort_by(|(a, _), (b, _)| self.compare(a, b));
        rows.extend(keyed.into_iter().map(|(_, r)| r));
    }
}
