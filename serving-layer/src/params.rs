//! A query's parameters, as the API takes them: one serde struct, [`QueryParams`], read from a
//! GET query string (`filter` may repeat; lists are comma-separated) by the [`Params`]
//! extractor and from a POST body by axum's `Json`, and written by `tandem query`. Unknown
//! parameters are refused by name. [`QueryParams::resolve`] checks them against a view into
//! core's `ViewQuery`: dimensions and metrics must be the view's own, so no user string ever
//! reaches SQL as anything but a literal value, and every arithmetic on request values is
//! checked.

use std::collections::BTreeMap;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};
use tandem_core::query::{Match, OrderBy, ViewQuery, DEFAULT_LIMIT};
use tandem_core::time::{parse_instant, DAY_US};
use tandem_core::view::{Granularity, ViewDef};

use crate::error::ApiError;

/// The most rows one answer may hold.
pub const MAX_LIMIT: usize = 100_000;
/// The widest range one query may cover.
pub const MAX_RANGE_DAYS: i64 = 3_660;
/// The most native buckets one query may scan (10 years of hours, ~60 days of minutes).
pub const MAX_BUCKETS: i64 = 88_000;
/// The longest value a filter may carry.
pub const MAX_VALUE_LEN: usize = 1_024;

/// The parameters of a query on one view: a query string (GET) or a JSON body (POST), which
/// also takes lists as lists and numbers as numbers. Its OpenAPI description is derived from
/// this definition (`/openapi.json`).
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::IntoParams, utoipa::ToSchema,
)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct QueryParams {
    /// Start of the range: RFC 3339, a date, or epoch milliseconds. Default: a day before `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>, example = "2026-11-20T00:00:00Z")]
    #[schema(value_type = Option<Value>)]
    pub from: Option<Scalar>,
    /// End of the range (exclusive), in the same forms. Default: now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>, example = "2026-11-27T00:00:00Z")]
    #[schema(value_type = Option<Value>)]
    pub to: Option<Scalar>,
    /// `minute`, `hour`, `day`, `week` (from Monday), `month` or `all` (one bucket for the
    /// whole range); the view's own or coarser.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(example = "day")]
    pub granularity: Option<String>,
    /// `true` for the answer's totals beside its rows: one row per answer bucket over every
    /// group (JSON only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<bool>)]
    #[schema(value_type = Option<Value>)]
    pub totals: Option<Json>,
    /// The IANA time zone of `day`, `week` and `month` buckets (default UTC), such as
    /// `Europe/Berlin`; finer buckets are UTC's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(example = "Europe/Berlin")]
    pub tz: Option<String>,
    /// Dimensions to group by: a comma list or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>, example = "media_source,country")]
    #[schema(value_type = Option<Value>)]
    pub group_by: Option<Names>,
    /// Filter items (a list; repeated in a query string): `DIM=VALUE`, `DIM!=VALUE`,
    /// `DIM.in=V1,V2`, `DIM.not_in=V1,V2`, `DIM.prefix=TEXT`; or an object of `DIM` (or
    /// `DIM.OP`, OP one of `eq`, `ne`, `in`, `not_in`, `prefix`) to a value or a list of
    /// values. `=`/`in` values of one dimension OR, `!=`/`not in` values of one dimension
    /// are all excluded, and every filter must hold. A null value passes no filter.
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Filters::is_empty"
    )]
    #[param(value_type = Option<Vec<String>>, style = Form, explode, example = json!(["country.in=US,DE"]))]
    #[schema(value_type = Option<Value>)]
    pub filter: Filters,
    /// Metrics to answer: a comma list or a list. Default: all of the view's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<String>)]
    #[schema(value_type = Option<Value>)]
    pub metrics: Option<Names>,
    /// `bucket`, `-bucket`, `METRIC` or `-METRIC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(example = "-installs")]
    pub order_by: Option<String>,
    /// The most rows, 1 to 100,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 100000)]
    #[schema(value_type = Option<Value>)]
    pub limit: Option<Scalar>,
    /// `true` to merge the rows the limit cuts into one `other` row per answer bucket (each
    /// row then says whether it is one): a top-N with the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[param(value_type = Option<bool>)]
    #[schema(value_type = Option<Value>)]
    pub other: Option<Json>,
    /// The answer's format; without it, the `Accept` header decides (JSON by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Format>,
}

/// The granularity of a dashboard's interval (`500ms`, `30s`, `5m`, `1h`, `2d`, `1w`, `1M`,
/// `1y`): the finest answer bucket at least as wide.
fn interval_granularity(text: &str) -> Option<Granularity> {
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (n, unit) = text.split_at(split);
    let n: i64 = n.parse().ok().filter(|&n| n > 0)?;
    let minute = 60_000_000i64;
    let us = match unit {
        "ms" => n.checked_mul(1_000)?,
        "s" => n.checked_mul(1_000_000)?,
        "m" => n.checked_mul(minute)?,
        "h" => n.checked_mul(60 * minute)?,
        "d" => n.checked_mul(DAY_US)?,
        "w" => n.checked_mul(7 * DAY_US)?,
        "M" | "y" => return Some(Granularity::Month),
        _ => return None,
    };
    Some(
        [
            (minute, Granularity::Minute),
            (60 * minute, Granularity::Hour),
            (DAY_US, Granularity::Day),
            (7 * DAY_US, Granularity::Week),
        ]
        .into_iter()
        .find(|&(width, _)| width >= us)
        .map_or(Granularity::Month, |(_, g)| g),
    )
}

/// A string or a number (JSON bodies may send either for instants and limits).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Text(String),
    Number(serde_json::Number),
}

impl Scalar {
    pub fn text(&self) -> String {
        match self {
            Scalar::Text(s) => s.clone(),
            Scalar::Number(n) => n.to_string(),
        }
    }
}

impl From<&str> for Scalar {
    fn from(s: &str) -> Self {
        Scalar::Text(s.to_string())
    }
}

/// Names as a comma list or a list. (The comma list is tried first: a query string's every
/// value is text, and an untagged variant that does not match costs an error's message.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Names {
    Comma(String),
    List(Vec<String>),
}

impl Names {
    pub fn names(&self) -> Vec<String> {
        match self {
            Names::List(l) => l.iter().map(|s| s.trim().to_string()).collect(),
            Names::Comma(s) if s.is_empty() => Vec::new(),
            Names::Comma(s) => s.split(',').map(|n| n.trim().to_string()).collect(),
        }
    }
}

/// Equality filters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Filters {
    /// `DIMENSION=VALUE` items.
    Items(Vec<String>),
    /// Dimension to one value or several.
    ByDimension(BTreeMap<String, OneOrMany>),
}

impl Default for Filters {
    fn default() -> Self {
        Filters::Items(Vec::new())
    }
}

/// A filter's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    In,
    NotIn,
    Prefix,
}

/// `DIM` or `DIM.OP` as the dimension and its operator (`eq` without one).
fn dim_op(key: &str) -> Result<(String, Op), String> {
    let Some((dim, op)) = key.split_once('.') else {
        return Ok((key.to_string(), Op::Eq));
    };
    let op = match op {
        "eq" => Op::Eq,
        "ne" => Op::Ne,
        "in" => Op::In,
        "not_in" => Op::NotIn,
        "prefix" => Op::Prefix,
        _ => {
            return Err(format!(
                "filter operator `{}` is not one of eq, ne, in, not_in, prefix",
                clip(op)
            ))
        }
    };
    Ok((dim.to_string(), op))
}

/// A filter item: `DIM=VALUE`, `DIM!=VALUE` or `DIM.OP=VALUE` (`in` and `not_in` take a comma
/// list).
fn item_triple(item: &str) -> Result<(String, Op, Vec<String>), String> {
    let (key, value) = item.split_once('=').ok_or_else(|| {
        format!(
            "filter `{}` is not DIMENSION=VALUE, DIMENSION!=VALUE or DIMENSION.OP=VALUE",
            clip(item)
        )
    })?;
    let (dim, op) = match key.strip_suffix('!') {
        Some(dim) => (dim.to_string(), Op::Ne),
        None => dim_op(key)?,
    };
    let values = match op {
        Op::In | Op::NotIn => value.split(',').map(str::to_string).collect(),
        _ => vec![value.to_string()],
    };
    Ok((dim, op, values))
}

/// One value or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(Scalar),
    Many(Vec<Scalar>),
}

impl Filters {
    pub fn is_empty(&self) -> bool {
        match self {
            Filters::Items(i) => i.is_empty(),
            Filters::ByDimension(m) => m.is_empty(),
        }
    }

    /// (dimension, operator, values) triples, in order.
    fn triples(&self) -> Result<Vec<(String, Op, Vec<String>)>, String> {
        match self {
            Filters::Items(items) => items.iter().map(|item| item_triple(item)).collect(),
            Filters::ByDimension(map) => map
                .iter()
                .map(|(key, v)| {
                    let (dim, op) = dim_op(key)?;
                    let values = match v {
                        OneOrMany::One(s) => vec![s.text()],
                        OneOrMany::Many(l) => l.iter().map(Scalar::text).collect(),
                    };
                    Ok((dim, op, values))
                })
                .collect(),
        }
    }
}

/// The formats of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum Format {
    Json,
    Csv,
    Arrow,
}

impl TryFrom<String> for Format {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "json" => Ok(Format::Json),
            "csv" => Ok(Format::Csv),
            "arrow" => Ok(Format::Arrow),
            other => Err(format!(
                "format `{}` (expected json, csv or arrow)",
                clip(other)
            )),
        }
    }
}

/// The query string's parameters as [`QueryParams`]: an axum extractor whose refusals are
/// problem bodies naming what is wrong.
#[derive(Debug, Clone)]
pub struct Params(pub QueryParams);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        QueryParams::from_query_string(parts.uri.query().unwrap_or_default())
            .map(Params)
            .map_err(ApiError::bad_request)
    }
}

impl QueryParams {
    /// Whether the totals are asked: `true`, `false`, `1` or `0` (as text or JSON).
    pub fn totals(&self) -> Result<bool, String> {
        flag("totals", self.totals.as_ref())
    }

    /// Reads a query string: `filter` may repeat, any other key is given once.
    pub fn from_query_string(query: &str) -> Result<Self, String> {
        let mut map = Map::new();
        let mut filters = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if key.contains('\u{FFFD}') || value.contains('\u{FFFD}') {
                return Err("the query string is not valid UTF-8 once percent-decoded".into());
            }
            if key == "filter" {
                filters.push(Json::String(value.into_owned()));
            } else if map.contains_key(key.as_ref()) {
                return Err(format!("`{}` is given twice", clip(&key)));
            } else {
                map.insert(key.into_owned(), Json::String(value.into_owned()));
            }
        }
        if !filters.is_empty() {
            map.insert("filter".into(), Json::Array(filters));
        }
        Self::from_json(Json::Object(map))
    }

    /// Reads a JSON object (a POST body).
    pub fn from_json(value: Json) -> Result<Self, String> {
        serde_json::from_value(value).map_err(|e| {
            let e = e.to_string();
            if e.starts_with("unknown field") {
                format!("unknown parameter {}", e.trim_start_matches("unknown field "))
            } else if e.starts_with("data did not match any variant") {
                "a parameter has the wrong shape (lists of names, `filter` as DIMENSION=VALUE items or an object)".into()
            } else {
                e
            }
        })
    }

    /// Checks the parameters against `view` into a query; `now_us` ends a range without `to`.
    pub fn resolve(&self, view: &ViewDef, now_us: i64) -> Result<ViewQuery, String> {
        let instant = |name: &str, v: &Scalar| {
            let text = v.text();
            parse_instant(&text).ok_or_else(|| {
                format!(
                    "`{name}` = `{}` is not RFC 3339, a date or epoch milliseconds",
                    clip(&text)
                )
            })
        };
        let to_us = match &self.to {
            Some(v) => instant("to", v)?,
            None => now_us,
        };
        let from_us = match &self.from {
            Some(v) => instant("from", v)?,
            None => to_us
                .checked_sub(DAY_US)
                .ok_or("`to` is too early to start a day before it")?,
        };
        if from_us >= to_us {
            return Err("`from` must be before `to`".into());
        }
        let span = to_us
            .checked_sub(from_us)
            .filter(|&s| s <= MAX_RANGE_DAYS * DAY_US)
            .ok_or_else(|| format!("range too large: at most {MAX_RANGE_DAYS} days"))?;
        if span / view.granularity.micros() > MAX_BUCKETS {
            return Err(format!(
                "range too large: more than {MAX_BUCKETS} {} buckets; narrow the range",
                view.granularity
            ));
        }
        let granularity = match &self.granularity {
            None => view.granularity,
            // A dashboard's interval (Grafana's `$__interval`: `30s`, `5m`, `1h`, `2d`, `1w`,
            // `1M`): the finest bucket at least that wide, never finer than the view's.
            Some(g) if interval_granularity(g).is_some() => interval_granularity(g)
                .expect("checked")
                .max(view.granularity),
            Some(g) => {
                let parsed = Granularity::parse(g).ok_or_else(|| {
                    format!(
                        "granularity `{}` (expected minute, hour, day, week, month or all, or \
                         an interval such as 5m, 1h, 1d)",
                        clip(g)
                    )
                })?;
                if parsed < view.granularity {
                    return Err(format!(
                        "granularity `{parsed}` is finer than the view's `{}`",
                        view.granularity
                    ));
                }
                parsed
            }
        };
        let mut group_by = Vec::new();
        for name in self.group_by.as_ref().map(Names::names).unwrap_or_default() {
            let d = dimension(view, &name)?;
            if group_by.contains(&d) {
                return Err(format!("`{}` is grouped by twice", clip(&name)));
            }
            group_by.push(d);
        }
        let mut filters: Vec<(usize, Match)> = Vec::new();
        for (dim, op, values) in self.filter.triples()? {
            let d = dimension(view, &dim)?;
            if values.iter().any(|v| v.len() > MAX_VALUE_LEN) {
                return Err(format!(
                    "filter value of `{}` is longer than {MAX_VALUE_LEN} bytes",
                    clip(&dim)
                ));
            }
            if values.is_empty() {
                return Err(format!("filter on `{}` has no value", clip(&dim)));
            }
            // Values of one dimension's `=`/`in` filters OR; of its `!=`/`not in`, all are
            // excluded.
            let merged = filters.iter_mut().find_map(|(i, m)| {
                if *i != d {
                    return None;
                }
                match (m, op) {
                    (Match::In(v), Op::Eq | Op::In) => Some(v),
                    (Match::NotIn(v), Op::Ne | Op::NotIn) => Some(v),
                    _ => None,
                }
            });
            match (merged, op) {
                (Some(v), _) => v.extend(values),
                (None, Op::Eq | Op::In) => filters.push((d, Match::In(values))),
                (None, Op::Ne | Op::NotIn) => filters.push((d, Match::NotIn(values))),
                (None, Op::Prefix) => {
                    filters.extend(values.into_iter().map(|p| (d, Match::Prefix(p))))
                }
            }
        }
        let metrics = match self.metrics.as_ref().map(Names::names) {
            None => (0..view.metrics.len()).collect(),
            Some(names) if names.is_empty() => (0..view.metrics.len()).collect(),
            Some(names) => {
                let mut out = Vec::new();
                for name in names {
                    let m = metric(view, &name)?;
                    if !out.contains(&m) {
                        out.push(m);
                    }
                }
                out
            }
        };
        let order_by = match self.order_by.as_deref() {
            None | Some("bucket") => OrderBy::Bucket { descending: false },
            Some("-bucket") => OrderBy::Bucket { descending: true },
            Some(o) => {
                let (descending, name) = match o.strip_prefix('-') {
                    Some(n) => (true, n),
                    None => (false, o),
                };
                let m = metric(view, name)?;
                let index = metrics.iter().position(|&i| i == m).ok_or_else(|| {
                    format!(
                        "order_by `{}` is not among the metrics asked for",
                        clip(name)
                    )
                })?;
                OrderBy::Metric { index, descending }
            }
        };
        let limit = match &self.limit {
            None => DEFAULT_LIMIT,
            Some(l) => match l.text().parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
                _ => {
                    return Err(format!(
                        "limit `{}` must be a whole number from 1 to {MAX_LIMIT}",
                        clip(&l.text())
                    ))
                }
            },
        };
        let tz = match &self.tz {
            None => None,
            Some(name) => Some(name.parse::<chrono_tz::Tz>().map_err(|_| {
                format!(
                    "tz `{}` is not an IANA time zone (such as Europe/Berlin or UTC)",
                    clip(name)
                )
            })?),
        };
        let q = ViewQuery {
            from_us,
            to_us,
            granularity,
            tz,
            group_by,
            filters,
            metrics,
            order_by,
            limit,
            other: flag("other", self.other.as_ref())?,
        };
        // The zone's midnights must fall on the view's bucket boundaries, or its days would
        // cut a stored bucket in two.
        if let (Some(offsets), Some(tz)) = (q.zone_offsets_us(), tz) {
            if offsets.iter().any(|o| o % view.granularity.micros() != 0) {
                return Err(format!(
                    "tz `{tz}` starts its days off the `{}` buckets of this view; ask a \
                     zone whose offset is whole {0}s, or UTC",
                    view.granularity
                ));
            }
        }
        Ok(q)
    }
}

/// Filters, a JSON `null` read as none (as every other parameter's `null` is read as absent).
fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Filters, D::Error> {
    Ok(Option::<Filters>::deserialize(d)?.unwrap_or_default())
}

/// A yes-or-no parameter `name`: `true`, `false`, `1` or `0` (as text or JSON); absent is no.
fn flag(name: &str, value: Option<&Json>) -> Result<bool, String> {
    match value {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(Json::String(s)) if s == "true" || s == "1" => Ok(true),
        Some(Json::String(s)) if s == "false" || s == "0" => Ok(false),
        Some(Json::Number(n)) if n.as_u64() == Some(1) => Ok(true),
        Some(Json::Number(n)) if n.as_u64() == Some(0) => Ok(false),
        Some(other) => {
            let text = match other {
                Json::String(s) => s.clone(),
                v => v.to_string(),
            };
            Err(format!("{name} `{}` must be true or false", clip(&text)))
        }
    }
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn dimension(view: &ViewDef, name: &str) -> Result<usize, String> {
    view.dimension(name).ok_or_else(|| {
        format!(
            "view `{}` has no dimension `{}` (it has: {})",
            view.name,
            clip(name),
            view.dimensions.join(", ")
        )
    })
}

fn metric(view: &ViewDef, name: &str) -> Result<usize, String> {
    view.metric(name).ok_or_else(|| {
        let names: Vec<_> = view.metrics.iter().map(|m| m.name.as_str()).collect();
        format!(
            "view `{}` has no metric `{}` (it has: {})",
            view.name,
            clip(name),
            names.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;
    use tandem_core::schema::EventSchema;

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

    fn resolve(query: &str) -> Result<ViewQuery, String> {
        QueryParams::from_query_string(query)?.resolve(&view(), NOW)
    }

    #[test]
    fn a_query_string_and_a_json_body_mean_the_same() {
        let q = resolve(
            "from=2026-11-24T00:00:00Z&to=1795611600000&granularity=day&group_by=country\
             &filter=app%3Da&filter=app=b&metrics=users&order_by=-users&limit=5",
        )
        .unwrap();
        assert_eq!(q.group_by, [1]);
        assert_eq!(
            q.filters,
            [(0, Match::In(vec!["a".to_string(), "b".to_string()]))]
        );
        assert_eq!(q.metrics, [1]);
        assert_eq!(
            q.order_by,
            OrderBy::Metric {
                index: 0,
                descending: true
            }
        );
        assert_eq!(q.limit, 5);
        assert!(q.accepts(&[Some("b"), None]) && !q.accepts(&[Some("c"), None]));
        let body = serde_json::json!({
            "from": "2026-11-24T00:00:00Z", "to": 1795611600000u64, "granularity": "day",
            "group_by": ["country"], "filter": {"app": ["a", "b"]}, "metrics": "users",
            "order_by": "-users", "limit": 5,
        });
        let from_body = QueryParams::from_json(body).unwrap().resolve(&view(), NOW);
        assert_eq!(from_body.unwrap(), q);
        // `null` is absent, for every parameter.
        let nulls = serde_json::json!({
            "from": null, "to": null, "granularity": null, "tz": null, "group_by": null,
            "filter": null, "metrics": null, "order_by": null, "limit": null, "other": null,
            "totals": null, "format": null,
        });
        assert_eq!(
            QueryParams::from_json(nulls).unwrap(),
            QueryParams::default()
        );
    }

    #[test]
    fn filter_operators_in_a_query_string_and_a_json_body() {
        let q = resolve(
            "filter=country!=US&filter=country.not_in=DE,FR&filter=app.prefix=com.&filter=app=x\
             &filter=app.in=y,z",
        )
        .unwrap();
        assert_eq!(
            q.filters,
            [
                (1, Match::NotIn(vec!["US".into(), "DE".into(), "FR".into()])),
                (0, Match::Prefix("com.".into())),
                (0, Match::In(vec!["x".into(), "y".into(), "z".into()])),
            ]
        );
        // A row must pass every filter; null passes none.
        assert!(!q.accepts(&[Some("x"), Some("GB")]));
        assert!(!q.accepts(&[Some("com.x"), Some("US")]));
        assert!(!q.accepts(&[Some("com.x"), None]));
        assert!(!q.accepts(&[None, Some("GB")]));
        let q = resolve("filter=country!=US&filter=app.prefix=com.").unwrap();
        assert!(q.accepts(&[Some("com.x"), Some("GB")]));
        assert!(!q.accepts(&[Some("org.x"), Some("GB")]));
        assert!(!q.accepts(&[Some("com.x"), None]));

        let body = serde_json::json!({
            "filter": {"country.ne": "US", "country.not_in": ["DE", "FR"], "app.prefix": "com."},
        });
        let from_body = QueryParams::from_json(body)
            .unwrap()
            .resolve(&view(), NOW)
            .unwrap();
        let from_items =
            resolve("filter=app.prefix=com.&filter=country!=US&filter=country.not_in=DE,FR")
                .unwrap();
        assert_eq!(from_body, from_items);
    }

    #[test]
    fn a_dashboards_interval_picks_the_finest_bucket_as_wide() {
        // The test view is hourly: finer intervals answer by the hour.
        for (interval, g) in [
            ("30s", Granularity::Hour),
            ("15m", Granularity::Hour),
            ("1h", Granularity::Hour),
            ("2h", Granularity::Day),
            ("1d", Granularity::Day),
            ("3d", Granularity::Week),
            ("1w", Granularity::Week),
            ("2w", Granularity::Month),
            ("1M", Granularity::Month),
        ] {
            let q = resolve(&format!("granularity={interval}")).unwrap();
            assert_eq!(q.granularity, g, "{interval}");
        }
        for bad in ["0h", "h", "5x", "1.5h"] {
            let e = resolve(&format!("granularity={bad}")).unwrap_err();
            assert!(e.contains("granularity"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_time_zone_applies_to_days_and_coarser() {
        let q = resolve("granularity=week&tz=America/New_York").unwrap();
        assert_eq!(q.zone(), Some(chrono_tz::America::New_York));
        // Hours are UTC's: the zone is kept but plays no part.
        let q = resolve("tz=Asia/Kolkata").unwrap();
        assert_eq!(q.zone(), None);
    }

    #[test]
    fn the_struct_round_trips_through_json() {
        let p = QueryParams {
            from: Some("2026-11-24".into()),
            group_by: Some(Names::List(vec!["app".into()])),
            filter: Filters::Items(vec!["country=DE".into()]),
            format: Some(Format::Csv),
            ..Default::default()
        };
        let text = serde_json::to_string(&p).unwrap();
        let back = QueryParams::from_json(serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn bad_queries_say_why() {
        for (query, needle) in [
            ("metrics=nope", "no metric `nope`"),
            ("group_by=%27%3B%20DROP%20TABLE%20x%3B%20--", "no dimension"),
            ("from=2026-11-25&to=2026-11-24", "before"),
            ("from=garbage", "RFC 3339"),
            ("limit=-1", "limit"),
            ("limit=100000000", "limit"),
            ("other=perhaps", "other `perhaps` must be true or false"),
            ("granularity=minute", "finer"),
            ("from=2000-01-01&to=2026-01-01", "range too large"),
            ("filter=country", "DIMENSION=VALUE"),
            (
                "filter=country.like=U",
                "not one of eq, ne, in, not_in, prefix",
            ),
            ("filter=colour!=red", "no dimension"),
            ("colour=red", "unknown parameter `colour`"),
            ("order_by=n&metrics=users", "not among"),
            ("from=1&from=2", "given twice"),
            ("format=xml", "format `xml`"),
            ("group_by=%FF", "UTF-8"),
            // Wraps an unchecked subtraction in a release build.
            (
                "from=-8300000000000000&to=8200000000000000",
                "range too large",
            ),
            ("to=-9223372036854775", "RFC 3339"),
        ] {
            let err = resolve(query).unwrap_err();
            assert!(err.contains(needle), "{query}: {err}");
        }
    }
}
