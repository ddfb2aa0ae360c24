//! The query contract shared by the HTTP API, the CLI and both layers: what a dashboard asks
//! (`ViewQuery`), what each layer answers (`AggRow`s of metric states), and the merged answer
//! (`QueryResult`) with its provenance.
//!
//! Parameters are checked against the view's definition: dimensions and metrics must be the
//! view's own, so no user string ever reaches SQL as anything but a literal value.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Decimal128Array, Float64Array, Int64Array, RecordBatch,
    RecordBatchOptions, StringArray, StructArray, TimestampMicrosecondArray, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use serde_json::{json, Map, Value as Json};

use crate::error::{CoreError, Result};
use crate::metric::{hll_rse, MetricState};
use crate::schema::FieldType;
use crate::time::{format_us, parse_instant};
use crate::view::{Granularity, MetricKind, ViewDef, DAY_US};

/// The most rows one answer may hold.
pub const MAX_LIMIT: usize = 100_000;
/// The rows an answer holds when the query does not say.
pub const DEFAULT_LIMIT: usize = 10_000;
/// The widest range one query may cover.
pub const MAX_RANGE_DAYS: i64 = 3_660;
/// The most native buckets one query may scan (10 years of hours, ~60 days of minutes).
pub const MAX_BUCKETS: i64 = 88_000;
/// The longest value a filter may carry.
pub const MAX_VALUE_LEN: usize = 1_024;

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

/// A checked query on one view.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewQuery {
    /// Buckets starting in `[from_us, to_us)` are answered.
    pub from_us: i64,
    pub to_us: i64,
    /// The answer's granularity: the view's own or coarser.
    pub granularity: Granularity,
    /// Indexes into the view's dimensions to group by, in the order asked.
    pub group_by: Vec<usize>,
    /// Equality filters: (dimension index, accepted values). Different dimensions AND,
    /// values of one dimension OR.
    pub filters: Vec<(usize, Vec<String>)>,
    /// Indexes into the view's metrics to answer, in the order asked.
    pub metrics: Vec<usize>,
    pub order_by: OrderBy,
    pub limit: usize,
}

fn bad(msg: impl Into<String>) -> CoreError {
    CoreError::BadQuery(msg.into())
}

impl ViewQuery {
    /// Builds a query from `key=value` parameters (the HTTP query string, the CLI's flags or a
    /// JSON body flattened). `filter` may repeat; `group_by` and `metrics` are comma lists.
    /// Without `to`, the range ends now; without `from`, it starts a day before `to`.
    pub fn from_params<'a>(
        view: &ViewDef,
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
        now_us: i64,
    ) -> Result<Self> {
        let (mut from, mut to, mut gran, mut group_by, mut metrics, mut order, mut limit) =
            (None, None, None, None, None, None, None);
        let mut filters: Vec<(usize, Vec<String>)> = Vec::new();
        for (key, value) in params {
            let once = |slot: &Option<&'a str>| -> Result<()> {
                if slot.is_some() {
                    return Err(bad(format!("`{key}` is given twice")));
                }
                Ok(())
            };
            match key {
                "from" => (once(&from)?, from = Some(value)).1,
                "to" => (once(&to)?, to = Some(value)).1,
                "granularity" => (once(&gran)?, gran = Some(value)).1,
                "group_by" => (once(&group_by)?, group_by = Some(value)).1,
                "metrics" => (once(&metrics)?, metrics = Some(value)).1,
                "order_by" => (once(&order)?, order = Some(value)).1,
                "limit" => (once(&limit)?, limit = Some(value)).1,
                "filter" => {
                    let (dim, v) = value
                        .split_once('=')
                        .ok_or_else(|| bad(format!("filter `{}` is not DIMENSION=VALUE", clip(value))))?;
                    let d = dimension(view, dim)?;
                    if v.len() > MAX_VALUE_LEN {
                        return Err(bad(format!("filter value of `{dim}` is longer than {MAX_VALUE_LEN} bytes")));
                    }
                    match filters.iter_mut().find(|(i, _)| *i == d) {
                        Some((_, values)) => values.push(v.to_string()),
                        None => filters.push((d, vec![v.to_string()])),
                    }
                }
                "format" => {}
                other => {
                    return Err(bad(format!(
                        "unknown parameter `{}` (expected from, to, granularity, group_by, filter, metrics, order_by, limit, format)",
                        clip(other)
                    )))
                }
            }
        }
        let instant = |name: &str, v: &str| {
            parse_instant(v).ok_or_else(|| {
                bad(format!(
                    "`{name}` = `{}` is not RFC 3339, a date or epoch milliseconds",
                    clip(v)
                ))
            })
        };
        let to_us = match to {
            Some(v) => instant("to", v)?,
            None => now_us,
        };
        let from_us = match from {
            Some(v) => instant("from", v)?,
            None => to_us - DAY_US,
        };
        if from_us >= to_us {
            return Err(bad("`from` must be before `to`"));
        }
        if to_us - from_us > MAX_RANGE_DAYS * DAY_US {
            return Err(bad(format!(
                "range too large: at most {MAX_RANGE_DAYS} days"
            )));
        }
        if (to_us - from_us) / view.granularity.micros() > MAX_BUCKETS {
            return Err(bad(format!(
                "range too large: more than {MAX_BUCKETS} {} buckets; narrow the range",
                view.granularity
            )));
        }
        let granularity = match gran {
            None => view.granularity,
            Some(g) => {
                let g = Granularity::parse(g).ok_or_else(|| {
                    bad(format!(
                        "granularity `{}` (expected minute, hour or day)",
                        clip(g)
                    ))
                })?;
                if g < view.granularity {
                    return Err(bad(format!(
                        "granularity `{g}` is finer than the view's `{}`",
                        view.granularity
                    )));
                }
                g
            }
        };
        let group_by = match group_by {
            None | Some("") => Vec::new(),
            Some(list) => {
                let mut out = Vec::new();
                for name in list.split(',') {
                    let d = dimension(view, name.trim())?;
                    if out.contains(&d) {
                        return Err(bad(format!("`{}` is grouped by twice", name.trim())));
                    }
                    out.push(d);
                }
                out
            }
        };
        let metrics = match metrics {
            None | Some("") => (0..view.metrics.len()).collect(),
            Some(list) => {
                let mut out = Vec::new();
                for name in list.split(',') {
                    let m = metric(view, name.trim())?;
                    if !out.contains(&m) {
                        out.push(m);
                    }
                }
                out
            }
        };
        let order_by = match order {
            None | Some("bucket") => OrderBy::Bucket { descending: false },
            Some("-bucket") => OrderBy::Bucket { descending: true },
            Some(o) => {
                let (descending, name) = match o.strip_prefix('-') {
                    Some(n) => (true, n),
                    None => (false, o),
                };
                let m = metric(view, name)?;
                let index = metrics.iter().position(|&i| i == m).ok_or_else(|| {
                    bad(format!(
                        "order_by `{name}` is not among the metrics asked for"
                    ))
                })?;
                OrderBy::Metric { index, descending }
            }
        };
        let limit = match limit {
            None => DEFAULT_LIMIT,
            Some(l) => match l.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(bad(format!(
                        "limit `{}` must be a whole number from 1 to {MAX_LIMIT}",
                        clip(l)
                    )))
                }
            },
        };
        Ok(ViewQuery {
            from_us,
            to_us,
            granularity,
            group_by,
            filters,
            metrics,
            order_by,
            limit,
        })
    }

    /// Whether a row's full dimension values pass the filters.
    pub fn accepts(&self, dims: &[Option<&str>]) -> bool {
        self.filters
            .iter()
            .all(|(d, values)| matches!(dims[*d], Some(v) if values.iter().any(|x| x == v)))
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

fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn dimension(view: &ViewDef, name: &str) -> Result<usize> {
    view.dimension(name).ok_or_else(|| {
        bad(format!(
            "view `{}` has no dimension `{}` (it has: {})",
            view.name,
            clip(name),
            view.dimensions.join(", ")
        ))
    })
}

fn metric(view: &ViewDef, name: &str) -> Result<usize> {
    view.metric(name).ok_or_else(|| {
        let names: Vec<_> = view.metrics.iter().map(|m| m.name.as_str()).collect();
        bad(format!(
            "view `{}` has no metric `{}` (it has: {})",
            view.name,
            clip(name),
            names.join(", ")
        ))
    })
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
    /// Milliseconds between now and the broker time of the newest message applied; `None`
    /// before the first message.
    pub lag_ms: Option<i64>,
    /// Partitions whose state could not be read or is known to be incomplete.
    pub stale_partitions: Vec<i32>,
    /// Whether a speed layer answers at all.
    pub available: bool,
}

/// One served row.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    pub bucket_us: i64,
    pub source: Source,
    pub dims: Vec<Option<String>>,
    pub states: Vec<MetricState>,
}

/// The merged answer.
#[derive(Debug, Clone)]
pub struct QueryResult {
    pub view: String,
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
}

impl QueryResult {
    /// The JSON answer of DESIGN §7.
    pub fn to_json(&self, view: &ViewDef) -> Json {
        let rows: Vec<Json> = self
            .rows
            .iter()
            .map(|r| {
                let dims: Map<String, Json> = self
                    .dims
                    .iter()
                    .zip(&r.dims)
                    .map(|(k, v)| (k.clone(), v.as_ref().map_or(Json::Null, |s| json!(s))))
                    .collect();
                let metrics: Map<String, Json> = self
                    .metrics
                    .iter()
                    .zip(&r.states)
                    .map(|(&m, s)| (view.metrics[m].name.clone(), s.to_json(&view.metrics[m])))
                    .collect();
                json!({ "bucket": format_us(r.bucket_us), "source": r.source.as_str(), "dims": dims, "metrics": metrics })
            })
            .collect();
        json!({
            "view": self.view,
            "granularity": self.granularity,
            "meta": self.meta(),
            "rows": rows,
        })
    }

    /// Provenance and freshness of the whole answer.
    pub fn meta(&self) -> Json {
        json!({
            "batch_version": self.coverage.version,
            "covered_until": self.coverage.covered_until_us().map(format_us),
            "speed_available": self.realtime.available,
            "speed_lag_ms": self.realtime.lag_ms,
            "stale_partitions": self.realtime.stale_partitions,
            "truncated": self.truncated,
        })
    }

    /// Arrow: a column per bucket (UTC timestamp), source, dimension and metric. Counts are
    /// UInt64; sums of int and decimal fields Decimal128 (exact); float metrics Float64; min and
    /// max keep their field's type; a distinct is a struct of `value`, `exact` and `rse`, as in
    /// JSON. The answer's `meta` (as in JSON) is in the schema metadata under `tandem.meta`,
    /// with `tandem.view` and `tandem.granularity`.
    pub fn to_arrow(&self, view: &ViewDef) -> Result<RecordBatch> {
        let utc = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        let mut fields = vec![
            Field::new("bucket", utc.clone(), false),
            Field::new("source", DataType::Utf8, false),
        ];
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(self.rows.iter().map(|r| r.bucket_us))
                    .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(
                self.rows.iter().map(|r| r.source.as_str()),
            )),
        ];
        for (i, d) in self.dims.iter().enumerate() {
            fields.push(Field::new(d, DataType::Utf8, true));
            columns.push(Arc::new(StringArray::from_iter(
                self.rows
                    .iter()
                    .map(|r| r.dims.get(i).and_then(|d| d.as_deref())),
            )));
        }
        for (j, &m) in self.metrics.iter().enumerate() {
            let def = &view.metrics[m];
            let states = || self.rows.iter().map(move |r| r.states.get(j));
            let ints = || states().map(|s| s.and_then(MetricState::as_i128));
            let column: ArrayRef = match (def.kind, def.field_type) {
                (MetricKind::Count, _) => Arc::new(UInt64Array::from_iter(
                    ints().map(|v| v.and_then(|v| u64::try_from(v).ok())),
                )),
                (MetricKind::Distinct, _) => {
                    let parts: Vec<(u64, bool, Option<f64>)> = states()
                        .map(|s| match s {
                            Some(MetricState::Distinct(d)) => match d.exact {
                                Some(n) => (n, true, None),
                                None => (
                                    d.estimate().round() as u64,
                                    false,
                                    Some(hll_rse(d.sketch.lg_config_k())),
                                ),
                            },
                            _ => (0, false, None),
                        })
                        .collect();
                    Arc::new(StructArray::from(vec![
                        (
                            Arc::new(Field::new("value", DataType::UInt64, false)),
                            Arc::new(UInt64Array::from_iter_values(parts.iter().map(|p| p.0)))
                                as ArrayRef,
                        ),
                        (
                            Arc::new(Field::new("exact", DataType::Boolean, false)),
                            Arc::new(BooleanArray::from_iter(parts.iter().map(|p| Some(p.1)))),
                        ),
                        (
                            Arc::new(Field::new("rse", DataType::Float64, true)),
                            Arc::new(Float64Array::from_iter(parts.iter().map(|p| p.2))),
                        ),
                    ]))
                }
                (_, Some(FieldType::Float)) => Arc::new(Float64Array::from_iter(
                    states().map(|s| s.and_then(MetricState::as_float)),
                )),
                (_, Some(FieldType::Timestamp)) => Arc::new(
                    TimestampMicrosecondArray::from_iter(
                        ints().map(|v| v.and_then(|v| i64::try_from(v).ok())),
                    )
                    .with_timezone("UTC"),
                ),
                (MetricKind::Sum, _) | (_, Some(FieldType::Decimal { .. })) => Arc::new(
                    Decimal128Array::from_iter(ints())
                        .with_precision_and_scale(38, def.scale().unwrap_or(0) as i8)?,
                ),
                _ => Arc::new(Int64Array::from_iter(
                    ints().map(|v| v.and_then(|v| i64::try_from(v).ok())),
                )),
            };
            fields.push(Field::new(&def.name, column.data_type().clone(), true));
            columns.push(column);
        }
        let metadata = HashMap::from([
            ("tandem.view".to_string(), self.view.clone()),
            (
                "tandem.granularity".to_string(),
                json!(self.granularity)
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
            ("tandem.meta".to_string(), self.meta().to_string()),
        ]);
        let schema = Arc::new(Schema::new_with_metadata(fields, metadata));
        Ok(RecordBatch::try_new_with_options(
            schema,
            columns,
            &RecordBatchOptions::new().with_row_count(Some(self.rows.len())),
        )?)
    }

    /// CSV: `bucket,source,<dims>,<metrics>`; distinct metrics give their value.
    pub fn to_csv(&self, view: &ViewDef) -> String {
        let mut out = String::from("bucket,source");
        for d in &self.dims {
            out.push(',');
            out.push_str(&csv_field(d));
        }
        for &m in &self.metrics {
            out.push(',');
            out.push_str(&view.metrics[m].name);
        }
        out.push('\n');
        for r in &self.rows {
            let _ = write!(out, "{},{}", format_us(r.bucket_us), r.source.as_str());
            for d in &r.dims {
                out.push(',');
                out.push_str(&csv_field(d.as_deref().unwrap_or("")));
            }
            for (&m, s) in self.metrics.iter().zip(&r.states) {
                out.push(',');
                match s.to_json(&view.metrics[m]) {
                    Json::Object(o) => {
                        out.push_str(&o.get("value").map(|v| v.to_string()).unwrap_or_default())
                    }
                    Json::Null => {}
                    Json::String(s) => out.push_str(&csv_field(&s)),
                    v => out.push_str(&v.to_string()),
                }
            }
            out.push('\n');
        }
        out
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::EventSchema;
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::Arc;

    fn view() -> ViewDef {
        let s = EventSchema::from_toml(
            Path::new("ev.toml"),
            r#"
event_time = "ts"
event_id = "id"
fields = [{ name = "id", type = "string" }, { name = "ts", type = "timestamp" }, { name = "app", type = "string" }, { name = "country", type = "string" }]"#,
        )
        .unwrap();
        let schemas = BTreeMap::from([("ev".to_string(), Arc::new(s))]);
        ViewDef::from_toml(
            Path::new("v.toml"),
            r#"
kind = "view"
source = "ev"
granularity = "hour"
dimensions = ["app", "country"]
metrics = [{ name = "n", kind = "count" }, { name = "users", kind = "distinct", field = "id" }]"#,
            &schemas,
        )
        .unwrap()
    }

    const NOW: i64 = 1_795_611_600_000_000;

    #[test]
    fn parses_a_full_query() {
        let q = ViewQuery::from_params(
            &view(),
            [
                ("from", "2026-11-24T00:00:00Z"),
                ("to", "1795611600000"),
                ("granularity", "day"),
                ("group_by", "country"),
                ("filter", "app=a"),
                ("filter", "app=b"),
                ("metrics", "users"),
                ("order_by", "-users"),
                ("limit", "5"),
            ],
            NOW,
        )
        .unwrap();
        assert_eq!(q.group_by, [1]);
        assert_eq!(q.filters, [(0, vec!["a".to_string(), "b".to_string()])]);
        assert_eq!(q.metrics, [1]);
        assert_eq!(
            q.order_by,
            OrderBy::Metric {
                index: 0,
                descending: true
            }
        );
        assert!(q.accepts(&[Some("b"), None]) && !q.accepts(&[Some("c"), None]));
    }

    #[test]
    fn bad_queries_say_why() {
        for (params, needle) in [
            (vec![("metrics", "nope")], "no metric `nope`"),
            (vec![("group_by", "'; DROP TABLE x; --")], "no dimension"),
            (vec![("from", "2026-11-25"), ("to", "2026-11-24")], "before"),
            (vec![("from", "garbage")], "RFC 3339"),
            (vec![("limit", "-1")], "limit"),
            (vec![("limit", "100000000")], "limit"),
            (vec![("granularity", "minute")], "finer"),
            (
                vec![("from", "2000-01-01"), ("to", "2026-01-01")],
                "range too large",
            ),
            (vec![("filter", "country")], "DIMENSION=VALUE"),
            (vec![("colour", "red")], "unknown parameter"),
            (vec![("order_by", "n"), ("metrics", "users")], "not among"),
        ] {
            let err = ViewQuery::from_params(&view(), params.clone(), NOW).unwrap_err();
            assert!(matches!(err, CoreError::BadQuery(_)));
            assert!(err.to_string().contains(needle), "{params:?}: {err}");
        }
    }

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
    fn arrow_answers_keep_exact_types() {
        use datafusion::arrow::array::Array;
        use datafusion::arrow::array::AsArray;
        use datafusion::arrow::datatypes::{Decimal128Type, TimestampMicrosecondType, UInt64Type};

        let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let catalog = crate::Catalog::load(&root.join("schemas"), &root.join("jobs")).unwrap();
        let view = &catalog.views["purchases_daily"];
        let result = QueryResult {
            view: view.name.clone(),
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
                    // 0.1 + 0.2 dollars, exactly, in micro-dollars.
                    states: vec![
                        MetricState::Count(2),
                        MetricState::SumInt(300_000),
                        MetricState::MaxInt(Some(200_000)),
                    ],
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
                },
            ],
            truncated: false,
        };
        let b = result.to_arrow(view).unwrap();
        assert_eq!(b.num_rows(), 2);
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
        let bucket = b.column(0).as_primitive::<TimestampMicrosecondType>();
        assert_eq!(bucket.value(1), 20_001 * DAY_US);
        assert_eq!(b.column(1).as_string::<i32>().value(1), "speed");
        assert!(b.column(2).is_null(1));
        assert_eq!(b.column(3).as_primitive::<UInt64Type>().value(0), 2);
        let revenue = b.column(4).as_primitive::<Decimal128Type>();
        assert_eq!(revenue.data_type(), &DataType::Decimal128(38, 6));
        assert_eq!(revenue.value_as_string(0), "0.300000");
        let max = b.column(5).as_primitive::<Decimal128Type>();
        assert_eq!(max.value_as_string(0), "0.200000");
        assert!(max.is_null(1));
        let meta: Json = serde_json::from_str(&b.schema().metadata()["tandem.meta"]).unwrap();
        assert_eq!(meta["truncated"], false);
        assert_eq!(b.schema().metadata()["tandem.granularity"], "day");
    }
}
