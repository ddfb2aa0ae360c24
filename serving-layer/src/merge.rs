//! The lambda merge: covered buckets from batch, the rest from speed, bucket by bucket, then
//! rolled up to the asked granularity. Each row says where it came from.

use std::cmp::Ordering;
use std::collections::HashMap;

use tandem_core::metric::MetricState;
use tandem_core::query::{Coverage, GroupKey, OrderBy, QueryResult, ResultRow, Source, ViewQuery};
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::ViewDef;
use tandem_core::Result;

/// Answers `q` on `view` from both layers.
pub async fn answer(
    view: &ViewDef,
    q: &ViewQuery,
    batch: &dyn BatchViews,
    speed: &dyn RealtimeView,
) -> Result<QueryResult> {
    let coverage = batch.coverage(view).await?;
    answer_at(view, q, coverage, batch, speed).await
}

/// Answers `q` on `view` from both layers, the batch at `coverage` (which
/// [`BatchViews::coverage`] gave).
pub async fn answer_at(
    view: &ViewDef,
    q: &ViewQuery,
    coverage: Coverage,
    batch: &dyn BatchViews,
    speed: &dyn RealtimeView,
) -> Result<QueryResult> {
    let batch_rows = batch.query(view, q, &coverage).await?;
    let speed_rows = speed.query(view, q, &coverage)?;
    let realtime = speed.status();

    let mut groups: HashMap<GroupKey, (Source, Vec<MetricState>)> = HashMap::new();
    let rows = batch_rows
        .into_iter()
        .filter(|r| coverage.covers(r.bucket_us))
        .map(|r| (Source::Batch, r))
        .chain(
            speed_rows
                .into_iter()
                .filter(|r| !coverage.covers(r.bucket_us))
                .map(|r| (Source::Speed, r)),
        );
    for (source, r) in rows {
        if !q.in_range(r.bucket_us) {
            continue;
        }
        let key = (q.granularity.floor(r.bucket_us), r.dims);
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
    let mut rows: Vec<ResultRow> = groups
        .into_iter()
        .map(|((bucket_us, dims), (source, states))| ResultRow {
            bucket_us,
            source,
            dims,
            states,
        })
        .collect();
    sort(&mut rows, view, q);
    let truncated = rows.len() > q.limit;
    rows.truncate(q.limit);
    Ok(QueryResult {
        view: view.name.clone(),
        granularity: q.granularity,
        coverage,
        realtime,
        dims: q
            .group_by
            .iter()
            .map(|&d| view.dimensions[d].clone())
            .collect(),
        metrics: q.metrics.clone(),
        rows,
        truncated,
    })
}

fn sort(rows: &mut [ResultRow], view: &ViewDef, q: &ViewQuery) {
    let natural = |a: &ResultRow, b: &ResultRow| {
        a.bucket_us
            .cmp(&b.bucket_us)
            .then_with(|| a.dims.cmp(&b.dims))
    };
    match q.order_by {
        OrderBy::Bucket { descending } => rows.sort_by(|a, b| {
            let o = natural(a, b);
            if descending {
                o.reverse()
            } else {
                o
            }
        }),
        OrderBy::Metric { index, descending } => {
            let metric = &view.metrics[q.metrics[index]];
            rows.sort_by(|a, b| {
                let (x, y) = (
                    a.states[index].sort_key(metric),
                    b.states[index].sort_key(metric),
                );
                let o = x.partial_cmp(&y).unwrap_or(Ordering::Equal);
                let o = if descending { o.reverse() } else { o };
                o.then_with(|| natural(a, b))
            })
        }
    }
}
