//! Views: `jobs/<name>.toml` with `kind = "view"`, an aggregate defined once and computed by
//! both layers.
//!
//! ```toml
//! kind = "view"
//! source = "app_events"                 # an event schema
//! filter = "event_name = 'install'"     # optional SQL predicate over event fields
//! granularity = "hour"                  # minute | hour | day, on event time (UTC)
//! dimensions = ["app_id", "country"]
//!
//! [[metrics]]
//! name = "installs"
//! kind = "count"                        # count | sum | min | max | distinct
//!
//! [[metrics]]
//! name = "devices"
//! kind = "distinct"
//! field = "device_id"
//!
//! [[rollups]]                           # optional; see below
//! dimensions = ["country"]
//! granularity = "day"                   # optional: the view's own by default
//! ```
//!
//! **Rollups** are the view's rows aggregated again over a subset of its dimensions and/or at
//! a coarser granularity. The batch layer publishes them in the same commit as the view, and
//! serving answers a query from the smallest one that answers it exactly. Without a `rollups`
//! key a view gets the defaults ([`default_rollups`]): no dimensions and each single dimension,
//! at the view's granularity and at the day; at the day also all dimensions together.
//! `rollups = []` publishes none.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use chrono::Datelike;

use crate::error::{CoreError, Result};
pub use crate::metric::{MetricDef, MetricKind, DEFAULT_LG_K};
pub use crate::paths::{BASE_ROLLUP, BUCKET_COLUMN, DAY_COLUMN, ROLLUP_COLUMN};
use crate::schema::{is_identifier, timestamp_type, EventSchema, FieldType};
pub use crate::time::{DAY_US, HOUR_US, MINUTE_US};

/// The width of time buckets, aligned to UTC. A view and its rollups store minute, hour or
/// day buckets ([`Granularity::is_stored`]); an answer may also ask `week` (from Monday),
/// `month` (calendar months) or `all` (one bucket for the whole range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
    Week,
    Month,
    All,
}

impl Granularity {
    /// The bucket width in microseconds, for the fixed-width granularities (up to `week`); a
    /// month's longest (31 days), and unbounded for `all`.
    pub fn micros(self) -> i64 {
        match self {
            Granularity::Minute => MINUTE_US,
            Granularity::Hour => HOUR_US,
            Granularity::Day => DAY_US,
            Granularity::Week => 7 * DAY_US,
            Granularity::Month => 31 * DAY_US,
            Granularity::All => i64::MAX,
        }
    }

    /// Whether views and rollups may store buckets of this width.
    pub fn is_stored(self) -> bool {
        self <= Granularity::Day
    }

    /// The start of the bucket holding `ts_us` (floor, also for times before 1970). `all` has
    /// no buckets of its own: its one bucket is the range's (`ViewQuery::answer_bucket`), and
    /// here every time is its own start.
    pub fn floor(self, ts_us: i64) -> i64 {
        match self {
            Granularity::Minute | Granularity::Hour | Granularity::Day => {
                ts_us.div_euclid(self.micros()) * self.micros()
            }
            Granularity::Week => {
                // 1970-01-01 was a Thursday: three days after a Monday.
                let day = ts_us.div_euclid(DAY_US);
                (day - (day + 3).rem_euclid(7)).saturating_mul(DAY_US)
            }
            Granularity::Month => {
                let d = crate::time::date_of(ts_us);
                crate::time::day_start_us(crate::time::day_number(d.with_day(1).unwrap_or(d)))
            }
            Granularity::All => ts_us,
        }
    }

    /// The start of the bucket after the one starting at `start` (saturating).
    pub fn next(self, start: i64) -> i64 {
        match self {
            Granularity::Month => {
                let d = crate::time::date_of(start);
                let (y, m) = if d.month() == 12 {
                    (d.year() + 1, 1)
                } else {
                    (d.year(), d.month() + 1)
                };
                chrono::NaiveDate::from_ymd_opt(y, m, 1).map_or(i64::MAX, |n| {
                    crate::time::day_start_us(crate::time::day_number(n))
                })
            }
            Granularity::All => i64::MAX,
            g => start.saturating_add(g.micros()),
        }
    }

    /// The first bucket start at or after `ts_us` (the latest bucket start for times past it).
    pub fn ceil(self, ts_us: i64) -> i64 {
        let start = self.floor(ts_us);
        if start == ts_us {
            start
        } else {
            let next = self.next(start);
            if next == i64::MAX {
                self.floor(i64::MAX)
            } else {
                next
            }
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Week => "week",
            Granularity::Month => "month",
            Granularity::All => "all",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(Granularity::Minute),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
            "week" => Some(Granularity::Week),
            "month" => Some(Granularity::Month),
            "all" => Some(Granularity::All),
            _ => None,
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A view: the parsed definition both layers compute from.
#[derive(Debug, Clone, Serialize)]
pub struct ViewDef {
    pub name: String,
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    pub granularity: Granularity,
    pub dimensions: Vec<String>,
    pub metrics: Vec<MetricDef>,
    /// The rollups published with the view, ordered so that each can be computed from the
    /// base rows or from a rollup before it.
    pub rollups: Vec<Rollup>,
    /// SHA-256 of the definition's meaning (source, filter, granularity, dimensions, metrics,
    /// rollups): a batch view computed under another hash is not served for this view.
    pub definition_hash: String,
    #[serde(skip)]
    pub path: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ViewFile {
    kind: String,
    source: String,
    filter: Option<String>,
    granularity: String,
    #[serde(default)]
    dimensions: Vec<String>,
    metrics: Vec<MetricFile>,
    rollups: Option<Vec<RollupFile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollupFile {
    dimensions: Vec<String>,
    granularity: Option<String>,
}

/// A rollup of a view: its rows aggregated over `dims` (a subset of the view's dimensions) in
/// buckets of `granularity` (the view's or coarser).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rollup {
    /// Indexes into the view's dimensions, ascending.
    #[serde(skip)]
    pub dims: Vec<usize>,
    /// The dimensions' names, in the view's order.
    pub dimensions: Vec<String>,
    pub granularity: Granularity,
}

impl Rollup {
    fn new(view_dimensions: &[String], mut dims: Vec<usize>, granularity: Granularity) -> Self {
        dims.sort_unstable();
        dims.dedup();
        Rollup {
            dimensions: dims.iter().map(|&d| view_dimensions[d].clone()).collect(),
            dims,
            granularity,
        }
    }

    /// The rollup's name, its `rollup` partition value: the granularity, then the dimensions,
    /// joined by dots (`day.country`; `hour` for no dimensions).
    pub fn name(&self) -> String {
        let mut name = self.granularity.as_str().to_string();
        for d in &self.dimensions {
            name.push('.');
            name.push_str(d);
        }
        name
    }

    /// Whether the rows of this rollup can be computed from rows with `dims` at `granularity`.
    pub fn derives_from(&self, dims: &[usize], granularity: Granularity) -> bool {
        granularity <= self.granularity && self.dims.iter().all(|d| dims.contains(d))
    }

    /// Whether this rollup answers `q` on a view of `view_granularity` exactly as the view's
    /// own rows do: it holds every dimension the query groups or filters by, its buckets are
    /// no coarser than the answer's, and each of its buckets lies wholly inside or wholly
    /// outside the view buckets the range selects.
    pub fn answers(&self, q: &crate::query::ViewQuery, view_granularity: Granularity) -> bool {
        let holds = |d: &usize| self.dims.contains(d);
        if self.granularity > q.granularity
            || !q.group_by.iter().all(holds)
            || !q.filters.iter().all(|(d, _)| holds(d))
        {
            return false;
        }
        // Buckets in a time zone start at its midnights: this rollup's buckets must divide its
        // offsets (a day rollup cannot answer New York's days; an hour rollup can).
        if let Some(offsets) = q.zone_offsets_us() {
            if offsets.iter().any(|o| o % self.granularity.micros() != 0) {
                return false;
            }
        }
        // The range selects the view buckets starting in [from, to): those in
        // [ceil(from), ceil(to)) at the view's granularity.
        let aligned = |t: i64| {
            let start = view_granularity.ceil(t);
            self.granularity.floor(start) == start
        };
        aligned(q.from_us) && aligned(q.to_us)
    }
}

/// The most dimensions a view may have for its default rollups to include all of them by the
/// day. A wider view's groups are sparse: few of them see events in more than an hour or two of
/// a day, so the day barely shrinks them. The reference hourly cube's five dimensions by the day
/// were 1.3 M groups a week against the view's 2.3 M, 87% of all its default rollups' rows and
/// most of their time in the recompute (`docs/architecture.md` 71). A view can still name that
/// rollup in its `rollups` key.
pub const DAY_OF_ALL_DIMENSIONS_UP_TO: usize = 3;

/// The rollups a view without a `rollups` key gets: no dimensions and each single dimension,
/// at the view's granularity and at the day; at the day also all dimensions together, for a
/// view of at most [`DAY_OF_ALL_DIMENSIONS_UP_TO`] dimensions. Those that would equal the view
/// itself are left out.
pub fn default_rollups(dimensions: &[String], granularity: Granularity) -> Vec<Rollup> {
    let n = dimensions.len();
    let mut grains = vec![granularity];
    if granularity < Granularity::Day {
        grains.push(Granularity::Day);
    }
    let mut out = Vec::new();
    for g in grains {
        let mut sets: Vec<Vec<usize>> = Vec::new();
        if g != granularity && n <= DAY_OF_ALL_DIMENSIONS_UP_TO {
            sets.push((0..n).collect());
        }
        sets.extend((0..n).map(|d| vec![d]));
        sets.push(Vec::new());
        for dims in sets {
            let r = Rollup::new(dimensions, dims, g);
            let is_view = r.dims.len() == n && g == granularity;
            if !is_view && !out.contains(&r) {
                out.push(r);
            }
        }
    }
    order_rollups(&mut out);
    out
}

/// Orders rollups so that each comes after every rollup it could be computed from: more
/// dimensions first, then finer granularity first.
fn order_rollups(rollups: &mut [Rollup]) {
    rollups.sort_by(|a, b| {
        b.dims
            .len()
            .cmp(&a.dims.len())
            .then(a.granularity.cmp(&b.granularity))
            .then(a.dims.cmp(&b.dims))
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricFile {
    name: String,
    kind: String,
    field: Option<String>,
    lg_k: Option<u8>,
}

impl ViewDef {
    /// Parses a view from TOML text, checking it against the event schemas.
    /// The filter is checked separately ([`crate::filter::CompiledFilter`]), since that needs
    /// the SQL parser.
    pub fn from_toml(
        path: &Path,
        text: &str,
        schemas: &BTreeMap<String, Arc<EventSchema>>,
    ) -> Result<Self> {
        let name = crate::schema::stem(path)?;
        let file: ViewFile = toml::from_str(text).map_err(|e| CoreError::Definition {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if file.kind != "view" {
            return Err(CoreError::key(
                path,
                "kind",
                format!("`{}` is not a view (expected \"view\")", file.kind),
            ));
        }
        let schema = schemas.get(&file.source).ok_or_else(|| {
            let known: Vec<_> = schemas.keys().cloned().collect();
            CoreError::key(
                path,
                "source",
                format!("no schema `{}` (known: {})", file.source, known.join(", ")),
            )
        })?;
        let granularity = Granularity::parse(&file.granularity)
            .filter(|g| g.is_stored())
            .ok_or_else(|| {
                CoreError::key(
                    path,
                    "granularity",
                    format!("`{}` (expected minute, hour or day)", file.granularity),
                )
            })?;
        let mut seen: Vec<&str> = vec![BUCKET_COLUMN, DAY_COLUMN, ROLLUP_COLUMN];
        for (i, d) in file.dimensions.iter().enumerate() {
            let key = format!("dimensions[{i}]");
            let (_, f) = schema.field(d).ok_or_else(|| {
                CoreError::key(
                    path,
                    &key,
                    format!("schema `{}` has no field `{d}`", schema.name),
                )
            })?;
            if !matches!(f.ty, FieldType::String | FieldType::Int | FieldType::Bool) {
                return Err(CoreError::key(
                    path,
                    &key,
                    format!(
                        "`{d}` is a {} field; dimensions are string, int or bool",
                        f.ty.name()
                    ),
                ));
            }
            if seen.contains(&d.as_str()) {
                return Err(CoreError::key(
                    path,
                    &key,
                    format!("`{d}` is used twice or is reserved"),
                ));
            }
            seen.push(d);
        }
        if file.metrics.is_empty() {
            return Err(CoreError::key(
                path,
                "metrics",
                "a view needs at least one metric",
            ));
        }
        let mut metrics = Vec::new();
        for (i, m) in file.metrics.iter().enumerate() {
            let key = format!("metrics[{i}]");
            if !is_identifier(&m.name) || m.name.contains("__") {
                return Err(CoreError::key(
                    path,
                    format!("{key}.name"),
                    format!("`{}` is not a valid metric name", m.name),
                ));
            }
            if seen.contains(&m.name.as_str()) {
                return Err(CoreError::key(
                    path,
                    format!("{key}.name"),
                    format!("`{}` is used twice", m.name),
                ));
            }
            seen.push(&m.name);
            let kind = MetricKind::parse(&m.kind).ok_or_else(|| {
                let known: Vec<_> = MetricKind::ALL.iter().map(|k| k.as_str()).collect();
                CoreError::key(
                    path,
                    format!("{key}.kind"),
                    format!(
                        "unknown kind `{}` (expected one of {})",
                        m.kind,
                        known.join(", ")
                    ),
                )
            })?;
            let field_type = match &m.field {
                None => None,
                Some(f) => Some(
                    schema
                        .field(f)
                        .ok_or_else(|| {
                            CoreError::key(
                                path,
                                format!("{key}.field"),
                                format!("schema `{}` has no field `{f}`", schema.name),
                            )
                        })?
                        .1
                        .ty,
                ),
            };
            kind.check_field(field_type).map_err(|e| {
                let f = m
                    .field
                    .as_deref()
                    .map(|f| format!(" `{f}`"))
                    .unwrap_or_default();
                CoreError::key(path, format!("{key}.field"), format!("{e}{f}"))
            })?;
            if let Some(lg_k) = m.lg_k {
                if kind != MetricKind::Distinct || !(4..=21).contains(&lg_k) {
                    return Err(CoreError::key(
                        path,
                        format!("{key}.lg_k"),
                        "only distinct takes lg_k, between 4 and 21",
                    ));
                }
            }
            metrics.push(MetricDef {
                name: m.name.clone(),
                kind,
                field: m.field.clone(),
                field_type,
                lg_k: m.lg_k,
            });
        }
        if let Some(f) = &file.filter {
            if f.trim().is_empty() {
                return Err(CoreError::key(
                    path,
                    "filter",
                    "is empty; leave the key out to keep every event",
                ));
            }
        }
        let rollups = match &file.rollups {
            None => default_rollups(&file.dimensions, granularity),
            Some(list) => parse_rollups(path, list, &file.dimensions, granularity)?,
        };
        let mut view = ViewDef {
            name,
            source: file.source,
            filter: file.filter,
            granularity,
            dimensions: file.dimensions,
            metrics,
            rollups,
            definition_hash: String::new(),
            path: path.to_path_buf(),
        };
        view.definition_hash = view.compute_hash();
        Ok(view)
    }

    fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        let canonical = serde_json::json!({
            "source": self.source, "filter": self.filter, "granularity": self.granularity,
            "dimensions": self.dimensions,
            "metrics": self.metrics.iter().map(|m| (&m.name, m.kind, &m.field, m.lg_k())).collect::<Vec<_>>(),
            "rollups": self.rollups.iter().map(Rollup::name).collect::<Vec<_>>(),
        });
        h.update(canonical.to_string().as_bytes());
        crate::codec::hex(&h.finalize()[..12])
    }

    /// The index of a metric by name.
    pub fn metric(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|m| m.name == name)
    }

    /// The index of a dimension by name.
    pub fn dimension(&self, name: &str) -> Option<usize> {
        self.dimensions.iter().position(|d| d == name)
    }

    /// The Arrow schema of this view's batch table: bucket, dimensions (as text), each metric's
    /// columns ([`MetricDef::batch_fields`]), and the partitions `rollup` and `dt`. A rollup's
    /// rows hold null in the dimensions it leaves out, and null in a distinct metric's value
    /// column (its sketch holds the estimate).
    pub fn batch_schema(&self) -> SchemaRef {
        let mut fields = vec![Field::new(BUCKET_COLUMN, timestamp_type(), false)];
        for d in &self.dimensions {
            fields.push(Field::new(d, DataType::Utf8, true));
        }
        for m in &self.metrics {
            fields.extend(m.batch_fields());
        }
        fields.push(Field::new(ROLLUP_COLUMN, DataType::Utf8, false));
        fields.push(Field::new(DAY_COLUMN, DataType::Utf8, false));
        Arc::new(ArrowSchema::new(fields))
    }
}

/// Checks a view file's `rollups` list.
fn parse_rollups(
    path: &Path,
    list: &[RollupFile],
    dimensions: &[String],
    granularity: Granularity,
) -> Result<Vec<Rollup>> {
    let mut out: Vec<Rollup> = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let key = format!("rollups[{i}]");
        let mut dims = Vec::new();
        for (j, d) in r.dimensions.iter().enumerate() {
            let index = dimensions.iter().position(|x| x == d).ok_or_else(|| {
                CoreError::key(
                    path,
                    format!("{key}.dimensions[{j}]"),
                    format!("`{d}` is not a dimension of the view"),
                )
            })?;
            if dims.contains(&index) {
                return Err(CoreError::key(
                    path,
                    format!("{key}.dimensions[{j}]"),
                    format!("`{d}` is listed twice"),
                ));
            }
            dims.push(index);
        }
        let g = match &r.granularity {
            None => granularity,
            Some(text) => {
                let g = Granularity::parse(text)
                    .filter(|g| g.is_stored())
                    .ok_or_else(|| {
                        CoreError::key(
                            path,
                            format!("{key}.granularity"),
                            format!("`{text}` (expected minute, hour or day)"),
                        )
                    })?;
                if g < granularity {
                    return Err(CoreError::key(
                        path,
                        format!("{key}.granularity"),
                        format!("`{g}` is finer than the view's `{granularity}`"),
                    ));
                }
                g
            }
        };
        let rollup = Rollup::new(dimensions, dims, g);
        if rollup.dims.len() == dimensions.len() && g == granularity {
            return Err(CoreError::key(
                path,
                key,
                "has every dimension at the view's granularity: it is the view itself",
            ));
        }
        if out.contains(&rollup) {
            return Err(CoreError::key(
                path,
                key,
                format!("`{}` is listed twice", rollup.name()),
            ));
        }
        out.push(rollup);
    }
    order_rollups(&mut out);
    Ok(out)
}

/// A job file's `kind`, read before the rest so that SQL jobs can sit beside views.
#[derive(Deserialize)]
struct KindOnly {
    kind: Option<String>,
}

/// A job file's `kind` (`None` if it has none).
pub(crate) fn kind_of(path: &Path, text: &str) -> Result<Option<String>> {
    let kind: KindOnly = toml::from_str(text).map_err(|e| CoreError::Definition {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(kind.kind)
}

/// Loads every `kind = "view"` file of `dir`. Files of other kinds (SQL jobs) are skipped here;
/// a file without a kind is an error.
pub fn load_views(
    dir: &Path,
    schemas: &BTreeMap<String, Arc<EventSchema>>,
) -> Result<BTreeMap<String, Arc<ViewDef>>> {
    let mut out = BTreeMap::new();
    for path in crate::schema::toml_files(dir)? {
        let text = crate::schema::read(&path)?;
        match kind_of(&path, &text)?.as_deref() {
            Some("view") => {
                let view = ViewDef::from_toml(&path, &text, schemas)?;
                out.insert(view.name.clone(), Arc::new(view));
            }
            Some("sql") => {}
            Some(other) => {
                return Err(CoreError::key(
                    &path,
                    "kind",
                    format!("unknown kind `{other}` (expected view or sql)"),
                ))
            }
            None => {
                return Err(CoreError::key(
                    &path,
                    "kind",
                    "missing (expected \"view\" or \"sql\")",
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schemas() -> BTreeMap<String, Arc<EventSchema>> {
        let s = EventSchema::from_toml(
            Path::new("ev.toml"),
            r#"
event_time = "ts"
event_id = "id"
fields = [
  { name = "id", type = "string" }, { name = "ts", type = "timestamp" },
  { name = "app", type = "string" }, { name = "price", type = "decimal", scale = 2 },
  { name = "score", type = "float" },
]"#,
        )
        .unwrap();
        BTreeMap::from([("ev".to_string(), Arc::new(s))])
    }

    const VIEW: &str = r#"
kind = "view"
source = "ev"
granularity = "hour"
dimensions = ["app"]
metrics = [
  { name = "n", kind = "count" },
  { name = "revenue", kind = "sum", field = "price" },
  { name = "users", kind = "distinct", field = "id" },
]"#;

    #[test]
    fn parses_a_view_and_its_batch_schema() {
        let v = ViewDef::from_toml(Path::new("v.toml"), VIEW, &schemas()).unwrap();
        assert_eq!(v.granularity, Granularity::Hour);
        let names: Vec<_> = v
            .batch_schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        assert_eq!(
            names,
            [
                "bucket",
                "app",
                "n",
                "revenue",
                "users",
                "users__hll",
                "rollup",
                "dt"
            ]
        );
        assert_eq!(
            v.metrics[1].batch_fields()[0].data_type(),
            &DataType::Decimal128(38, 2)
        );
        assert_eq!(v.definition_hash.len(), 24);
    }

    #[test]
    fn hash_changes_with_meaning() {
        let a = ViewDef::from_toml(Path::new("v.toml"), VIEW, &schemas()).unwrap();
        let b = ViewDef::from_toml(
            Path::new("v.toml"),
            &VIEW.replace("hour", "day"),
            &schemas(),
        )
        .unwrap();
        assert_ne!(a.definition_hash, b.definition_hash);
    }

    #[test]
    fn bad_views_name_file_and_key() {
        for (from, to, key) in [
            ("\"hour\"", "\"week\"", "granularity"),
            ("[\"app\"]", "[\"nope\"]", "dimensions[0]"),
            (
                "kind = \"sum\", field = \"price\"",
                "kind = \"sum\", field = \"app\"",
                "metrics[1].field",
            ),
            ("kind = \"count\"", "kind = \"median\"", "metrics[0].kind"),
            ("source = \"ev\"", "source = \"other\"", "source"),
            (
                "kind = \"count\"",
                "kind = \"distinct\", field = \"score\"",
                "metrics[0].field",
            ),
        ] {
            let err = ViewDef::from_toml(
                Path::new("jobs/v.toml"),
                &VIEW.replace(from, to),
                &schemas(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("jobs/v.toml") && err.contains(&format!("`{key}`")),
                "{key}: {err}"
            );
        }
    }

    fn names(rollups: &[Rollup]) -> Vec<String> {
        rollups.iter().map(Rollup::name).collect()
    }

    #[test]
    fn default_rollups_are_singles_and_totals_and_the_day() {
        let dims: Vec<String> = ["app", "country"].map(String::from).to_vec();
        assert_eq!(
            names(&default_rollups(&dims, Granularity::Hour)),
            [
                "day.app.country",
                "hour.app",
                "hour.country",
                "day.app",
                "day.country",
                "hour",
                "day"
            ]
        );
        // A wider view: no day rollup of all its dimensions, whose groups would barely shrink.
        let wide: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let names_wide = names(&default_rollups(&wide, Granularity::Hour));
        assert_eq!(names_wide.len(), 10, "{names_wide:?}");
        assert!(
            names_wide.iter().all(|n| n.split('.').count() <= 2),
            "{names_wide:?}"
        );
        assert_eq!(
            names(&default_rollups(&wide[..3], Granularity::Hour))[0],
            "day.a.b.c"
        );
        // A daily view with one dimension: only the total is smaller than the view.
        assert_eq!(
            names(&default_rollups(&dims[..1], Granularity::Day)),
            ["day"]
        );
        // Every rollup comes after one it can be computed from (or from the view itself).
        let all = default_rollups(&dims, Granularity::Minute);
        for (i, r) in all.iter().enumerate() {
            let from_view = r.derives_from(&[0, 1], Granularity::Minute);
            assert!(from_view, "{}", r.name());
            if r.dims.len() < 2 && r.granularity == Granularity::Day {
                assert!(all[..i]
                    .iter()
                    .any(|s| r.derives_from(&s.dims, s.granularity)));
            }
        }
    }

    #[test]
    fn rollups_in_the_file_are_checked_and_hashed() {
        let with = |rollups: &str| {
            ViewDef::from_toml(
                Path::new("jobs/v.toml"),
                &format!("{VIEW}\n{rollups}"),
                &schemas(),
            )
        };
        let none = with("rollups = []").unwrap();
        assert!(none.rollups.is_empty());
        let one = with("[[rollups]]\ndimensions = []\ngranularity = \"day\"").unwrap();
        assert_eq!(names(&one.rollups), ["day"]);
        let default = with("").unwrap();
        assert_eq!(names(&default.rollups), ["day.app", "hour", "day"]);
        assert_ne!(none.definition_hash, one.definition_hash);
        assert_ne!(one.definition_hash, default.definition_hash);
        for (rollups, key, says) in [
            (
                "[[rollups]]\ndimensions = [\"nope\"]",
                "rollups[0].dimensions[0]",
                "not a dimension",
            ),
            (
                "[[rollups]]\ndimensions = [\"app\", \"app\"]",
                "rollups[0].dimensions[1]",
                "twice",
            ),
            (
                "[[rollups]]\ndimensions = []\ngranularity = \"minute\"",
                "rollups[0].granularity",
                "finer",
            ),
            (
                "[[rollups]]\ndimensions = [\"app\"]",
                "rollups[0]",
                "the view itself",
            ),
            (
                "[[rollups]]\ndimensions = []\n[[rollups]]\ndimensions = []",
                "rollups[1]",
                "twice",
            ),
            ("[[rollups]]\ndims = []", "dims", "unknown field"),
        ] {
            let err = with(rollups).unwrap_err().to_string();
            assert!(
                err.contains("jobs/v.toml") && err.contains(key) && err.contains(says),
                "{rollups}: {err}"
            );
        }
    }

    #[test]
    fn a_rollup_answers_only_what_it_answers_exactly() {
        use crate::query::ViewQuery;
        let v = ViewDef::from_toml(Path::new("v.toml"), VIEW, &schemas()).unwrap();
        let day = Rollup::new(&v.dimensions, vec![0], Granularity::Day);
        let hour_total = Rollup::new(&v.dimensions, vec![], Granularity::Hour);
        let d = 20_000 * DAY_US;
        let mut q = ViewQuery::all(&v, d, d + 7 * DAY_US);
        q.granularity = Granularity::Day;
        q.group_by = vec![0];
        assert!(day.answers(&q, v.granularity));
        assert!(!hour_total.answers(&q, v.granularity), "it lacks `app`");
        // Not grouped but filtered by `app`: still needs `app`.
        q.group_by.clear();
        q.filters = vec![(0, crate::query::Match::In(vec!["a".into()]))];
        assert!(!hour_total.answers(&q, v.granularity));
        q.filters.clear();
        assert!(hour_total.answers(&q, v.granularity));
        // A range that cuts a day: the day rollup would count hours outside it.
        q.from_us = d + 5 * HOUR_US;
        assert!(!day.answers(&q, v.granularity));
        // ... unless the cut falls inside the view's first bucket, which it selects whole.
        q.from_us = d - 30 * MINUTE_US;
        assert!(day.answers(&q, v.granularity));
        q.to_us = d + 7 * DAY_US - 30 * MINUTE_US;
        assert!(day.answers(&q, v.granularity));
        q.to_us = d + 6 * DAY_US + 23 * HOUR_US;
        assert!(!day.answers(&q, v.granularity));
        // Answers by the hour cannot come from a day rollup.
        q.to_us = d + 7 * DAY_US;
        q.granularity = Granularity::Hour;
        assert!(!day.answers(&q, v.granularity) && hour_total.answers(&q, v.granularity));
    }

    #[test]
    fn floor_is_utc_aligned_and_handles_negative_times() {
        assert_eq!(Granularity::Hour.floor(HOUR_US + 5), HOUR_US);
        // Weeks start on Monday, months on the first, in UTC.
        let t = |s: &str| crate::time::parse_instant(s).unwrap();
        let thursday = t("2026-11-26T18:00:00Z");
        assert_eq!(Granularity::Week.floor(thursday), t("2026-11-23"));
        assert_eq!(Granularity::Week.floor(t("2026-11-23")), t("2026-11-23"));
        assert_eq!(Granularity::Week.next(t("2026-11-23")), t("2026-11-30"));
        assert_eq!(Granularity::Week.floor(t("1969-12-31")), t("1969-12-29"));
        assert_eq!(Granularity::Month.floor(thursday), t("2026-11-01"));
        assert_eq!(Granularity::Month.next(t("2026-12-01")), t("2027-01-01"));
        assert_eq!(Granularity::Month.ceil(thursday), t("2026-12-01"));
        assert_eq!(Granularity::Month.ceil(t("2026-12-01")), t("2026-12-01"));
        assert_eq!(
            Granularity::Month.floor(t("1969-12-31T23:00:00Z")),
            t("1969-12-01")
        );
        assert!(Granularity::Day.is_stored() && !Granularity::Week.is_stored());

        // In a time zone: New York's days start at 04:00 or 05:00 UTC, and the day clocks
        // move forward has 23 hours; Berlin's months start at 23:00 UTC in winter.
        use crate::time::{local_floor, local_next};
        let (ny, berlin) = (chrono_tz::America::New_York, chrono_tz::Europe::Berlin);
        let (day, week, month) = (Granularity::Day, Granularity::Week, Granularity::Month);
        for (tz, g, at, floor) in [
            (ny, day, "2026-11-26T03:00:00Z", "2026-11-25T05:00:00Z"),
            (ny, day, "2026-03-08T12:00:00Z", "2026-03-08T05:00:00Z"),
            (ny, week, "2026-11-26T18:00:00Z", "2026-11-23T05:00:00Z"),
            (
                berlin,
                month,
                "2026-11-26T18:00:00Z",
                "2026-10-31T23:00:00Z",
            ),
        ] {
            assert_eq!(local_floor(tz, g, t(at)), t(floor), "{tz} {g} {at}");
        }
        for (tz, g, start, next) in [
            (ny, day, "2026-11-25T05:00:00Z", "2026-11-26T05:00:00Z"),
            (ny, day, "2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"),
            (ny, week, "2026-11-23T05:00:00Z", "2026-11-30T05:00:00Z"),
            (
                berlin,
                month,
                "2026-10-31T23:00:00Z",
                "2026-11-30T23:00:00Z",
            ),
        ] {
            assert_eq!(local_next(tz, g, t(start)), t(next), "{tz} {g} {start}");
        }
    }
}
