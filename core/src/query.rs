//! The query model shared by the serving layer and both layers behind it: what a dashboard
//! asks, checked against a view (`ViewQuery`, built by the serving layer from its request
//! parameters), what each layer answers (`AggRow`s of metric states), and the merged answer
//! (`QueryResult`) with its provenance. Parsing requests and rendering answers belong to the
//! serving layer.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};

use crate::metric::MetricState;
use crate::time::DAY_US;
use crate::view::{Granularity, ViewDef};

/// The rows an answer holds when the query does not say.
pub const DEFAULT_LIMIT: usize = 10_000;

/// The most grouped rows one query may hold from a layer before its limit applies: the bound
/// on a query's memory. A query past it is refused as too large (400), saying so.
pub const MAX_QUERY_GROUPS: usize = 250_000;

/// The error of a query on `view` past `max` grouped rows ([`MAX_QUERY_GROUPS`] by default).
pub fn too_many_groups(view: &str, max: usize) -> crate::CoreError {
    crate::CoreError::BadQuery(format!(
        "the query groups more than {max} rows of `{view}` before its limit \
         applies, the most one query may hold; narrow the range, group by fewer dimensions, \
         filter, or ask a coarser granularity"
    ))
}

/// What to sort the rows by.
#[derive(Debug, Clone, PartialEq)]
pub enum OrderBy {
    Bucket {
        descending: bool,
    },
    /// An index into `ViewQuery::metrics`.
    Metric {
        index: usize,
        descending: bool,
    },
}

/// What a filter accepts of one dimension's values. A null value is accepted by none, as by
/// SQL's comparisons: `country != 'US'` keeps neither `US` nor rows without a country.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// One of these values (`=`, `in`).
    In(Vec<String>),
    /// A value, and none of these (`!=`, `not in`).
    NotIn(Vec<String>),
    /// A value starting with this (`prefix`).
    Prefix(String),
}

impl Match {
    pub fn accepts(&self, value: Option<&str>) -> bool {
        let Some(v) = value else {
            return false;
        };
        match self {
            Match::In(values) => values.iter().any(|x| x == v),
            Match::NotIn(values) => !values.iter().any(|x| x == v),
            Match::Prefix(p) => v.starts_with(p.as_str()),
        }
    }
}

/// A checked query on one view.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewQuery {
    /// Buckets starting in `[from_us, to_us)` are answered.
    pub from_us: i64,
    pub to_us: i64,
    /// The answer's granularity: the view's own or coarser.
    pub granularity: Granularity,
    /// The time zone of day, week and month buckets (`None`: UTC). Finer buckets are UTC's.
    pub tz: Option<chrono_tz::Tz>,
    /// Indexes into the view's dimensions to group by, in the order asked.
    pub group_by: Vec<usize>,
    /// Filters: (dimension index, what it accepts), all of which a row must pass.
    pub filters: Vec<(usize, Match)>,
    /// Indexes into the view's metrics to answer, in the order asked.
    pub metrics: Vec<usize>,
    pub order_by: OrderBy,
    pub limit: usize,
    /// Whether the rows the limit cuts are merged into one `other` row per answer bucket.
    pub other: bool,
}

impl ViewQuery {
    /// Every metric of `view`, at its own granularity, over `[from_us, to_us)`, not grouped,
    /// not filtered, in bucket order.
    pub fn all(view: &ViewDef, from_us: i64, to_us: i64) -> Self {
        ViewQuery {
            from_us,
            to_us,
            granularity: view.granularity,
            tz: None,
            group_by: Vec::new(),
            filters: Vec::new(),
            metrics: (0..view.metrics.len()).collect(),
            order_by: OrderBy::Bucket { descending: false },
            limit: DEFAULT_LIMIT,
            other: false,
        }
    }

    /// Whether a row's full dimension values pass the filters.
    pub fn accepts(&self, dims: &[Option<&str>]) -> bool {
        self.filters.iter().all(|(d, m)| m.accepts(dims[*d]))
    }

    /// The answer bucket a native bucket starting at `bucket_us` rolls up into: its
    /// granularity's bucket, or the range's start for `all`.
    pub fn answer_bucket(&self, bucket_us: i64) -> i64 {
        match (self.granularity, self.zone()) {
            (Granularity::All, _) => self.from_us,
            (g, Some(tz)) => crate::time::local_floor(tz, g, bucket_us),
            (g, None) => g.floor(bucket_us),
        }
    }

    /// The end of the answer bucket starting at `start` (exclusive; the range's end for
    /// `all`).
    pub fn answer_bucket_end(&self, start: i64) -> i64 {
        match (self.granularity, self.zone()) {
            (Granularity::All, _) => self.to_us,
            (g, Some(tz)) => crate::time::local_next(tz, g, start),
            (g, None) => g.next(start),
        }
    }

    /// The time zone its buckets follow: `tz` for day and coarser buckets, else none (UTC).
    pub fn zone(&self) -> Option<chrono_tz::Tz> {
        self.tz.filter(|_| self.granularity >= Granularity::Day)
    }

    /// The UTC offsets of the zone at the range's two ends (microseconds), if it has a zone:
    /// what stored buckets must divide to be cut exactly at its day boundaries.
    pub fn zone_offsets_us(&self) -> Option<[i64; 2]> {
        let tz = self.zone()?;
        Some([self.from_us, self.to_us].map(|t| crate::time::offset_us(tz, t)))
    }

    /// Whether a native bucket start falls in the range.
    pub fn in_range(&self, bucket_us: i64) -> bool {
        bucket_us >= self.from_us && bucket_us < self.to_us
    }

    /// The days (day numbers) the range touches.
    pub fn days(&self) -> std::ops::RangeInclusive<i64> {
        crate::time::day_of(self.from_us)..=crate::time::day_of(self.to_us - 1)
    }
}

/// One row a layer answers: a native bucket, the group-by values, the asked metrics' states.
#[derive(Debug, Clone, PartialEq)]
pub struct AggRow {
    pub bucket_us: i64,
    /// In `ViewQuery::group_by` order.
    pub dims: Vec<Option<String>>,
    /// In `ViewQuery::metrics` order.
    pub states: Vec<MetricState>,
}

/// A row's identity: its bucket and its group-by values.
pub type GroupKey = (i64, Vec<Option<String>>);

/// Rows keyed by bucket and group-by values; adding a row whose key is present merges states.
#[derive(Debug, Default)]
pub struct RowSet(HashMap<GroupKey, Vec<MetricState>>);

impl RowSet {
    pub fn add(&mut self, bucket_us: i64, dims: Vec<Option<String>>, states: Vec<MetricState>) {
        match self.0.entry((bucket_us, dims)) {
            Entry::Occupied(mut e) => e
                .get_mut()
                .iter_mut()
                .zip(&states)
                .for_each(|(a, b)| a.merge(b)),
            Entry::Vacant(e) => {
                e.insert(states);
            }
        }
    }

    pub fn into_rows(self) -> Vec<AggRow> {
        self.0
            .into_iter()
            .map(|((bucket_us, dims), states)| AggRow {
                bucket_us,
                dims,
                states,
            })
            .collect()
    }
}

/// Which layer a served row came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    Batch,
    Speed,
    /// A rolled-up bucket with parts from both layers.
    Mixed,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Batch => "batch",
            Source::Speed => "speed",
            Source::Mixed => "mixed",
        }
    }
}

/// Which buckets of a view the published batch covers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Coverage {
    /// The batch view's table version, if anything was published.
    pub version: Option<i64>,
    /// Covered days (day numbers). Every bucket of a covered day comes from batch.
    pub days: BTreeSet<i64>,
    /// When the batch was published (µs).
    pub published_us: Option<i64>,
}

impl Coverage {
    pub fn covers(&self, bucket_us: i64) -> bool {
        self.days.contains(&crate::time::day_of(bucket_us))
    }

    /// The end of the last covered day.
    pub fn covered_until_us(&self) -> Option<i64> {
        self.days.last().map(|d| (d + 1) * DAY_US)
    }

    /// Covered days as inclusive ranges of `YYYY-MM-DD`, for people.
    pub fn ranges(&self) -> Vec<(String, String)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for &d in &self.days {
            match out.last_mut() {
                Some((_, end)) if *end + 1 == d => *end = d,
                _ => out.push((d, d)),
            }
        }
        out.into_iter()
            .map(|(a, b)| (crate::time::day_string(a), crate::time::day_string(b)))
            .collect()
    }
}

/// How fresh the speed layer is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RealtimeStatus {
    /// The worst partition's lag ([`RealtimeStatus::partition_lag_ms`]), so that one stuck
    /// partition cannot hide behind fresh ones; `None` before the first message.
    pub lag_ms: Option<i64>,
    /// Per partition, milliseconds between now and the broker time of the newest message it
    /// applied.
    pub partition_lag_ms: std::collections::BTreeMap<i32, i64>,
    /// Partitions whose state could not be read or is known to be incomplete.
    pub stale_partitions: Vec<i32>,
    /// Whether a speed layer answers at all.
    pub available: bool,
}

impl RealtimeStatus {
    /// The worse of two statuses: each lag the larger, the stale partitions of both.
    pub fn worst(mut self, other: RealtimeStatus) -> RealtimeStatus {
        self.lag_ms = match (self.lag_ms, other.lag_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        for (p, lag) in other.partition_lag_ms {
            let mine = self.partition_lag_ms.entry(p).or_insert(lag);
            *mine = (*mine).max(lag);
        }
        for p in other.stale_partitions {
            if !self.stale_partitions.contains(&p) {
                self.stale_partitions.push(p);
            }
        }
        self.stale_partitions.sort_unstable();
        self.available &= other.available;
        self
    }
}

/// One served row.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub bucket_us: i64,
    pub source: Source,
    /// The group-by values; every one `None` in an `other` row.
    pub dims: Vec<Option<String>>,
    pub states: Vec<MetricState>,
    /// Whether the row is the `other` row of its bucket: the rows the limit cut, merged.
    pub other: bool,
}

/// The merged answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub view: String,
    /// The view's definition hash: the definition the answer was computed under.
    pub definition_hash: String,
    pub granularity: Granularity,
    pub coverage: Coverage,
    pub realtime: RealtimeStatus,
    /// The group-by dimension names, in order.
    pub dims: Vec<String>,
    /// The metric indexes into the view, in order.
    pub metrics: Vec<usize>,
    pub rows: Vec<ResultRow>,
    /// Whether rows were cut at the limit.
    pub truncated: bool,
    /// Whether the query asked for `other` rows (the answer then says of each row whether it
    /// is one).
    pub other: bool,
    /// Why the answer is partial, if it is: a layer that could not be reached (its rows are
    /// missing; the other layer's are served).
    pub degraded: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_ranges_and_until() {
        let c = Coverage {
            version: Some(1),
            days: [10, 11, 12, 20].into(),
            published_us: None,
        };
        assert_eq!(c.ranges().len(), 2);
        assert_eq!(c.covered_until_us(), Some(21 * DAY_US));
        assert!(c.covers(11 * DAY_US + 5) && !c.covers(13 * DAY_US));
    }

    #[test]
    fn row_sets_merge_rows_of_one_group() {
        let mut rows = RowSet::default();
        rows.add(0, vec![Some("a".into())], vec![MetricState::Count(2)]);
        rows.add(0, vec![Some("a".into())], vec![MetricState::Count(3)]);
        rows.add(0, vec![None], vec![MetricState::Count(1)]);
        let mut out = rows.into_rows();
        out.sort_by(|a, b| a.dims.cmp(&b.dims));
        assert_eq!(out.len(), 2);
        assert_eq!(out[1].states, [MetricState::Count(5)]);
    }
}
