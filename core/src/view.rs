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
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};
pub use crate::metric::{MetricDef, MetricKind, DEFAULT_LG_K};
pub use crate::paths::{BUCKET_COLUMN, DAY_COLUMN};
use crate::schema::{is_identifier, timestamp_type, EventSchema, FieldType};
pub use crate::time::{DAY_US, HOUR_US, MINUTE_US};

/// The width of a view's time buckets. Buckets are aligned to UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    /// The bucket width in microseconds.
    pub fn micros(self) -> i64 {
        match self {
            Granularity::Minute => MINUTE_US,
            Granularity::Hour => HOUR_US,
            Granularity::Day => DAY_US,
        }
    }

    /// The start of the bucket holding `ts_us` (floor, also for times before 1970).
    pub fn floor(self, ts_us: i64) -> i64 {
        ts_us.div_euclid(self.micros()) * self.micros()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "minute" => Some(Granularity::Minute),
            "hour" => Some(Granularity::Hour),
            "day" => Some(Granularity::Day),
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
    /// SHA-256 of the definition's meaning (source, filter, granularity, dimensions, metrics):
    /// a batch view computed under another hash is not served for this view.
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
        let granularity = Granularity::parse(&file.granularity).ok_or_else(|| {
            CoreError::key(
                path,
                "granularity",
                format!("`{}` (expected minute, hour or day)", file.granularity),
            )
        })?;
        let mut seen: Vec<&str> = vec![BUCKET_COLUMN, DAY_COLUMN];
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
        let mut view = ViewDef {
            name,
            source: file.source,
            filter: file.filter,
            granularity,
            dimensions: file.dimensions,
            metrics,
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
        });
        h.update(canonical.to_string().as_bytes());
        h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
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
    /// columns ([`MetricDef::batch_fields`]), and the day partition `dt`.
    pub fn batch_schema(&self) -> SchemaRef {
        let mut fields = vec![Field::new(BUCKET_COLUMN, timestamp_type(), false)];
        for d in &self.dimensions {
            fields.push(Field::new(d, DataType::Utf8, true));
        }
        for m in &self.metrics {
            fields.extend(m.batch_fields());
        }
        fields.push(Field::new(DAY_COLUMN, DataType::Utf8, false));
        Arc::new(ArrowSchema::new(fields))
    }
}

/// A job file's `kind`, read before the rest so that SQL jobs can sit beside views.
#[derive(Deserialize)]
struct KindOnly {
    kind: Option<String>,
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
        let kind: KindOnly = toml::from_str(&text).map_err(|e| CoreError::Definition {
            path: path.clone(),
            message: e.to_string(),
        })?;
        match kind.kind.as_deref() {
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
            ["bucket", "app", "n", "revenue", "users", "users__hll", "dt"]
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

    #[test]
    fn floor_is_utc_aligned_and_handles_negative_times() {
        assert_eq!(Granularity::Hour.floor(HOUR_US + 5), HOUR_US);
        assert_eq!(Granularity::Day.floor(-1), -DAY_US);
    }
}
