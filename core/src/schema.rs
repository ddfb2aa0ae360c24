//! Event schemas: `schemas/<name>.toml`, one event type each.
//!
//! ```toml
//! topic = "app_events"
//! event_time = "event_time"
//! event_id = "event_id"
//!
//! [[fields]]
//! name = "event_id"
//! type = "string"
//! required = true
//! ```
//!
//! The schema's name is the file's stem. Unknown keys are errors, and so is a field type,
//! an event-time field or an event-id field that does not fit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema as ArrowSchema, SchemaRef, TimeUnit};
use serde::Deserialize;

use crate::error::{CoreError, Result};

/// The largest decimal scale a field may use (Delta and Arrow allow up to 38 digits).
pub const MAX_DECIMAL_SCALE: u8 = 12;

/// The type of one event field, as written in a schema file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FieldType {
    /// UTF-8 text.
    String,
    /// 64-bit signed integer.
    Int,
    /// 64-bit float.
    Float,
    /// Fixed-point decimal with `scale` digits after the point; sums are exact.
    Decimal { scale: u8 },
    /// true / false.
    Bool,
    /// RFC 3339 text or epoch milliseconds; stored as microseconds in UTC.
    Timestamp,
}

impl FieldType {
    /// The Arrow type this field decodes to.
    pub fn arrow_type(self) -> DataType {
        match self {
            FieldType::String => DataType::Utf8,
            FieldType::Int => DataType::Int64,
            FieldType::Float => DataType::Float64,
            FieldType::Decimal { scale } => DataType::Decimal128(38, scale as i8),
            FieldType::Bool => DataType::Boolean,
            FieldType::Timestamp => timestamp_type(),
        }
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::Decimal { .. } => "decimal",
            FieldType::Bool => "bool",
            FieldType::Timestamp => "timestamp",
        }
    }

    /// Whether `sum`, `min` and `max` apply.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            FieldType::Int | FieldType::Float | FieldType::Decimal { .. }
        )
    }
}

/// The Arrow type of every timestamp Tandem stores: microseconds, UTC (Delta's `timestamp`).
pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// One field of an event schema.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDef {
    pub name: String,
    pub ty: FieldType,
    pub required: bool,
}

/// An event type: its topic, fields, event-time and event-id fields.
#[derive(Debug, Clone)]
pub struct EventSchema {
    pub name: String,
    pub topic: String,
    pub fields: Vec<FieldDef>,
    /// Index into `fields` of the event-time field (type timestamp, required).
    pub event_time: usize,
    /// Index into `fields` of the event-id field (type string, required).
    pub event_id: usize,
    /// Where the definition was read from.
    pub path: PathBuf,
    arrow: SchemaRef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SchemaFile {
    topic: Option<String>,
    event_time: String,
    event_id: String,
    fields: Vec<FieldFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldFile {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    required: bool,
    scale: Option<u8>,
}

/// The master dataset's column of each event's Kafka partition.
pub const PARTITION_COLUMN: &str = "_partition";
/// The master dataset's column of each event's Kafka offset.
pub const OFFSET_COLUMN: &str = "_offset";

/// Names of fields, dimensions and metrics: lower-case letters, digits and `_`, starting with a
/// letter (names starting with `_` are reserved for Tandem's own columns). Lower case keeps them
/// valid unquoted SQL identifiers, so a view's filter reads them as written.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 64
}

impl EventSchema {
    /// Parses a schema from TOML text; `path` names the file in errors and gives the name.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self> {
        let name = stem(path)?;
        let file: SchemaFile = toml::from_str(text).map_err(|e| CoreError::Definition {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if file.fields.is_empty() {
            return Err(CoreError::key(
                path,
                "fields",
                "a schema needs at least one field",
            ));
        }
        let mut fields = Vec::with_capacity(file.fields.len());
        for (i, f) in file.fields.iter().enumerate() {
            let key = format!("fields[{i}]");
            if !is_identifier(&f.name) {
                return Err(CoreError::key(
                    path,
                    format!("{key}.name"),
                    format!("`{}` is not a valid name (lower-case letters, digits, `_`; starts with a letter; at most 64)", f.name),
                ));
            }
            if fields.iter().any(|g: &FieldDef| g.name == f.name) {
                return Err(CoreError::key(
                    path,
                    format!("{key}.name"),
                    format!("duplicate field `{}`", f.name),
                ));
            }
            let ty = match (f.ty.as_str(), f.scale) {
                ("string", None) => FieldType::String,
                ("int", None) => FieldType::Int,
                ("float", None) => FieldType::Float,
                ("bool", None) => FieldType::Bool,
                ("timestamp", None) => FieldType::Timestamp,
                ("decimal", scale) => {
                    let scale = scale.unwrap_or(6);
                    if scale > MAX_DECIMAL_SCALE {
                        return Err(CoreError::key(path, format!("{key}.scale"), format!("at most {MAX_DECIMAL_SCALE}")));
                    }
                    FieldType::Decimal { scale }
                }
                (_, Some(_)) if ["string", "int", "float", "bool", "timestamp"].contains(&f.ty.as_str()) => {
                    return Err(CoreError::key(path, format!("{key}.scale"), "only a decimal field has a scale"));
                }
                (other, _) => {
                    return Err(CoreError::key(
                        path,
                        format!("{key}.type"),
                        format!("unknown type `{other}` (expected string, int, float, decimal, bool or timestamp)"),
                    ))
                }
            };
            fields.push(FieldDef {
                name: f.name.clone(),
                ty,
                required: f.required,
            });
        }
        let find = |key: &str, want: &str, ty: FieldType| -> Result<usize> {
            let i = fields
                .iter()
                .position(|f| f.name == want)
                .ok_or_else(|| CoreError::key(path, key, format!("no field named `{want}`")))?;
            if fields[i].ty != ty {
                return Err(CoreError::key(
                    path,
                    key,
                    format!("field `{want}` must have type {}", ty.name()),
                ));
            }
            Ok(i)
        };
        let event_time = find("event_time", &file.event_time, FieldType::Timestamp)?;
        let event_id = find("event_id", &file.event_id, FieldType::String)?;
        // The event time and id decide bucketing and identity: they cannot be absent.
        fields[event_time].required = true;
        fields[event_id].required = true;
        let arrow = Arc::new(ArrowSchema::new(
            fields
                .iter()
                .map(|f| Field::new(&f.name, f.ty.arrow_type(), !f.required))
                .collect::<Vec<_>>(),
        ));
        let topic = file.topic.unwrap_or_else(|| name.clone());
        if topic.is_empty() {
            return Err(CoreError::key(path, "topic", "must not be empty"));
        }
        Ok(EventSchema {
            name,
            topic,
            fields,
            event_time,
            event_id,
            path: path.to_path_buf(),
            arrow,
        })
    }

    /// The Arrow schema of decoded events (one column per field, in file order).
    pub fn arrow_schema(&self) -> SchemaRef {
        Arc::clone(&self.arrow)
    }

    /// The field called `name`, with its index.
    pub fn field(&self, name: &str) -> Option<(usize, &FieldDef)> {
        self.fields.iter().enumerate().find(|(_, f)| f.name == name)
    }

    /// The master dataset's schema: the event columns, then the Kafka partition and offset each
    /// event came from, then the `dt` day partition of its event time.
    pub fn master_schema(&self) -> SchemaRef {
        let mut fields: Vec<Field> = self
            .arrow
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new(PARTITION_COLUMN, DataType::Int32, false));
        fields.push(Field::new(OFFSET_COLUMN, DataType::Int64, false));
        fields.push(Field::new(crate::paths::DAY_COLUMN, DataType::Utf8, false));
        Arc::new(ArrowSchema::new(fields))
    }

    /// The event-time field's name.
    pub fn event_time_name(&self) -> &str {
        &self.fields[self.event_time].name
    }
}

/// Loads every `*.toml` in `dir` as an event schema, keyed by name.
pub fn load_schemas(dir: &Path) -> Result<BTreeMap<String, Arc<EventSchema>>> {
    let mut out = BTreeMap::new();
    for path in toml_files(dir)? {
        let text = read(&path)?;
        let schema = EventSchema::from_toml(&path, &text)?;
        out.insert(schema.name.clone(), Arc::new(schema));
    }
    Ok(out)
}

pub(crate) fn stem(path: &Path) -> Result<String> {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default()
        .to_string();
    if !is_identifier(&stem) {
        return Err(CoreError::Definition {
            path: path.to_path_buf(),
            message: format!("the file name `{stem}` must be a valid name (letters, digits, `_`)"),
        });
    }
    Ok(stem)
}

pub(crate) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The `*.toml` files of a directory, sorted by name.
pub(crate) fn toml_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| CoreError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) == Some("toml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
topic = "t"
event_time = "ts"
event_id = "id"
fields = [
  { name = "id", type = "string", required = true },
  { name = "ts", type = "timestamp" },
  { name = "price", type = "decimal", scale = 2 },
]
"#;

    #[test]
    fn parses_and_forces_time_and_id_required() {
        let s = EventSchema::from_toml(Path::new("ev.toml"), OK).unwrap();
        assert_eq!(s.name, "ev");
        assert_eq!(s.topic, "t");
        assert!(s.fields[1].required);
        assert_eq!(s.fields[2].ty, FieldType::Decimal { scale: 2 });
        assert_eq!(
            s.arrow_schema().field(2).data_type(),
            &DataType::Decimal128(38, 2)
        );
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let bad = OK.replace("\"decimal\"", "\"money\"");
        let err = EventSchema::from_toml(Path::new("schemas/ev.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("schemas/ev.toml")
                && err.contains("fields[2].type")
                && err.contains("money"),
            "{err}"
        );

        let bad = OK.replace("event_time = \"ts\"", "event_time = \"id\"");
        let err = EventSchema::from_toml(Path::new("ev.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("key `event_time`") && err.contains("timestamp"),
            "{err}"
        );

        let bad = format!("colour = 1\n{OK}");
        let err = EventSchema::from_toml(Path::new("ev.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ev.toml") && err.contains("colour"), "{err}");
    }
}
