//! The API's OpenAPI description, derived from the code: the query parameters from
//! [`QueryParams`] itself, the routes from their handlers' `#[utoipa::path]` attributes, and the
//! answers from the types below, which describe what [`crate::render`] prints and what
//! [`crate::api`] lists; the refusals the routes share are listed once, in `IntoResponses`
//! types. Served at `/openapi.json`; `docs/openapi.json` is its snapshot (a test
//! keeps them equal, and `docs/api.md` naming every route and parameter).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Serialize;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, Modify, OpenApi, PartialSchema, ToSchema};

use crate::error::PROBLEM_JSON;
use crate::render::ARROW_STREAM;

use crate::params::{Format, QueryParams};

/// A refusal or an error (RFC 9457), as every non-2xx answer of the API is.
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// Always `about:blank`: the status says what kind of problem it is.
    #[serde(rename = "type")]
    #[schema(example = "about:blank")]
    pub kind: String,
    /// The status's reason phrase.
    #[schema(example = "Bad Request")]
    pub title: String,
    /// The HTTP status.
    #[schema(example = 400)]
    pub status: u16,
    /// What was wrong, naming the parameter.
    #[schema(example = "limit `0` must be a whole number from 1 to 100000")]
    pub detail: String,
}

/// Which layer answered a row.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RowSource {
    /// The published batch view (exact).
    Batch,
    /// The speed layer's state.
    Speed,
    /// A rolled-up bucket with parts from both.
    Mixed,
}

/// A distinct count: exact only where the row says so.
#[derive(Debug, Serialize, ToSchema)]
pub struct DistinctValue {
    pub value: f64,
    /// Whether `value` is the exact count (else an HLL estimate).
    pub exact: bool,
    /// The estimate's relative standard error (0 when exact).
    pub rse: f64,
}

/// One row of an answer: a bucket, the group-by values and the metrics.
#[derive(Debug, Serialize, ToSchema)]
pub struct Row {
    /// The bucket's start (UTC).
    #[schema(format = DateTime, example = "2026-11-25T13:00:00Z")]
    pub bucket: String,
    pub source: RowSource,
    /// Whether the row is its bucket's `other` row (the rows the limit cut, merged); only
    /// when the query asks `other=true`.
    pub other: Option<bool>,
    /// Group-by dimension to its value (`null`: the event had none, or an `other` row).
    #[schema(example = json!({"media_source": "googleadwords_int"}))]
    pub dims: BTreeMap<String, Option<String>>,
    /// Metric to its value: a number (counts, sums as exact decimals, averages, min and max),
    /// a time for min/max of a timestamp, a `DistinctValue` for distinct counts, or `null`
    /// where nothing was aggregated.
    #[schema(value_type = Object, example = json!({"installs": 1832, "devices": {"value": 1790, "exact": false, "rse": 0.0081}}))]
    pub metrics: BTreeMap<String, serde_json::Value>,
}

/// Provenance and freshness of an answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Meta {
    /// The batch view's table version the answer used (`null`: nothing published).
    pub batch_version: Option<i64>,
    /// The end of the last day the batch covers.
    #[schema(format = DateTime)]
    pub covered_until: Option<String>,
    /// When that batch version was published.
    #[schema(format = DateTime)]
    pub batch_published_at: Option<String>,
    /// Whether a speed layer answered.
    pub speed_available: bool,
    /// The view definition's hash the answer was computed under.
    pub definition_hash: String,
    /// The worst partition's lag: milliseconds since its newest applied message.
    pub speed_lag_ms: Option<i64>,
    /// Each partition's lag.
    pub speed_lag_ms_by_partition: BTreeMap<String, i64>,
    /// Partitions whose speed state is known to be incomplete.
    pub stale_partitions: Vec<i32>,
    /// Whether the limit cut rows.
    pub truncated: bool,
    /// Why the answer is partial, if it is (empty: it is whole): a layer that could not be
    /// reached, whose rows are missing.
    pub degraded: Vec<String>,
}

/// A query's answer (JSON).
#[derive(Debug, Serialize, ToSchema)]
pub struct Answer {
    pub view: String,
    /// The answer's granularity.
    #[schema(example = "hour")]
    pub granularity: String,
    pub meta: Meta,
    pub rows: Vec<Row>,
    /// One row per answer bucket over every group, when `totals=true`.
    pub totals: Option<Vec<Row>>,
}

/// A metric of a view.
#[derive(Debug, Serialize, ToSchema)]
pub struct MetricInfo {
    pub name: String,
    /// `count`, `sum`, `min`, `max`, `avg` or `distinct`.
    pub kind: String,
    /// The event field it reads (`null` for `count`).
    pub field: Option<String>,
    /// log2 of a distinct sketch's register count.
    pub lg_k: Option<u8>,
}

/// Days of a view the published batch covers, as inclusive ranges.
#[derive(Debug, Serialize, ToSchema)]
pub struct DayRange {
    #[schema(format = Date)]
    pub from: String,
    #[schema(format = Date)]
    pub to: String,
}

/// What the published batch of a view covers.
#[derive(Debug, Serialize, ToSchema)]
pub struct ViewCoverage {
    pub batch_version: Option<i64>,
    #[schema(format = DateTime)]
    pub covered_until: Option<String>,
    pub days: Vec<DayRange>,
}

/// A view's definition and coverage.
#[derive(Debug, Serialize, ToSchema)]
pub struct ViewInfo {
    pub name: String,
    /// The schema (master dataset) it aggregates.
    pub source: String,
    /// Its row filter (SQL), if any.
    pub filter: Option<String>,
    /// Its native granularity.
    pub granularity: String,
    pub dimensions: Vec<String>,
    pub metrics: Vec<MetricInfo>,
    /// The rollups published with it (dimension subsets and coarser granularities).
    #[schema(value_type = Vec<Object>)]
    pub rollups: Vec<serde_json::Value>,
    pub definition_hash: String,
    pub coverage: ViewCoverage,
}

/// The views a caller may read.
#[derive(Debug, Serialize, ToSchema)]
pub struct ViewList {
    pub views: Vec<ViewInfo>,
}

/// A refusal's response: a problem body, with `Retry-After` on the statuses a client waits
/// out (429, 503).
fn refusal(status: u16, description: &str) -> (String, RefOr<Response>) {
    let mut response = ResponseBuilder::new().description(description).content(
        PROBLEM_JSON,
        Content::new(Some(Ref::from_schema_name("Problem"))),
    );
    if matches!(status, 429 | 503) {
        let seconds = HeaderBuilder::new()
            .schema(<u32 as PartialSchema>::schema())
            .description(Some("Seconds to wait"))
            .build();
        response = response.header("Retry-After", seconds);
    }
    (status.to_string(), response.build().into())
}

/// The refusals of every route that reads views.
fn read_refusals() -> BTreeMap<String, RefOr<Response>> {
    [
        (
            401,
            "No API key, or an unknown one (when keys are configured)",
        ),
        (429, "The key is over its rate"),
        (
            503,
            "Storage is unavailable, or the query routes are saturated or timed out",
        ),
    ]
    .into_iter()
    .map(|(status, description)| refusal(status, description))
    .collect()
}

/// The refusals of a route that reads one view (`/v1/views/{view}...`).
pub struct ViewRefusals;

impl IntoResponses for ViewRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut out = read_refusals();
        out.extend([
            refusal(403, "The key may not read this view"),
            refusal(404, "No such view"),
        ]);
        out
    }
}

/// The refusals of `GET /v1/views`.
pub struct ListRefusals;

impl IntoResponses for ListRefusals {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        read_refusals()
    }
}

/// The answers of the query routes (`GET` and `POST`): the answer in the format asked, or a
/// refusal.
pub struct QueryAnswers;

impl IntoResponses for QueryAnswers {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let answer = ResponseBuilder::new()
            .description("The answer, in the format asked (`format`, else `Accept`)")
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("Answer"))),
            )
            .content("text/csv", Content::new(Some(String::schema())))
            .content(ARROW_STREAM, Content::new(Some(<Vec<u8>>::schema())))
            .build();
        let mut out = ViewRefusals::responses();
        out.extend([
            ("200".to_string(), answer.into()),
            refusal(400, "A bad parameter, named in `detail`"),
            refusal(413, "The body is larger than 64 KiB"),
        ]);
        out
    }
}

/// API keys: `Authorization: Bearer KEY` or `X-Api-Key: KEY`, when keys are configured.
struct Keys;

impl Modify for Keys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tandem",
        description = "Merged batch and speed views of a lambda architecture: exact where the \
            nightly batch has settled a day, fresh from the speed layer for the rest, and honest \
            about which is which (`source` per row, freshness in `meta`)."
    ),
    paths(
        crate::api::list_views,
        crate::api::get_view,
        crate::api::query_get,
        crate::api::query_post,
        crate::api::livez,
        crate::api::readyz_doc,
        crate::api::metrics,
        crate::api::openapi_json,
    ),
    components(schemas(
        Problem, Answer, Row, RowSource, Meta, DistinctValue, ViewList, ViewInfo, MetricInfo,
        ViewCoverage, DayRange, QueryParams, Format
    )),
    modifiers(&Keys),
    tags(
        (name = "views", description = "Views and their answers"),
        (name = "operations", description = "Probes, metrics and this description")
    )
)]
pub struct ApiDoc;

/// The description as served (pretty JSON), built once.
pub fn spec_json() -> &'static str {
    static SPEC: OnceLock<String> = OnceLock::new();
    SPEC.get_or_init(|| {
        let mut doc = ApiDoc::openapi();
        doc.info.version = env!("CARGO_PKG_VERSION").to_string();
        let mut text = doc
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
        text.push('\n');
        text
    })
}
