//! The HTTP API (DESIGN §7): `/v1/views`, `/v1/views/{view}`, `/v1/views/{view}/query` (GET and
//! POST; JSON, CSV or an Arrow IPC stream), `/livez`, `/readyz`, `/metrics`. Every error becomes
//! a JSON problem body here and only here; bad queries are 400, never 500.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use datafusion::arrow::ipc::writer::StreamWriter;
use serde_json::{json, Value as Json_};
use tandem_core::query::ViewQuery;
use tandem_core::time::{format_us, Clock};
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::{Catalog, CoreError};

use crate::merge::answer;

/// What the API serves from.
#[derive(Debug, Clone)]
pub struct AppState {
    pub catalog: Arc<Catalog>,
    pub batch: Arc<dyn BatchViews>,
    pub speed: Arc<dyn RealtimeView>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<ApiMetrics>,
}

/// Request counters, by outcome class only (bounded label set).
#[derive(Debug, Default)]
pub struct ApiMetrics {
    pub queries: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
}

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/views", get(list_views))
        .route("/v1/views/{view}", get(get_view))
        .route("/v1/views/{view}/query", get(query_get).post(query_post))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .fallback(|| async {
            ApiError(
                CoreError::BadQuery("no such endpoint; see /v1/views".into()),
                StatusCode::NOT_FOUND,
            )
        })
        .with_state(state)
}

/// An error on its way to becoming a response.
#[derive(Debug)]
pub struct ApiError(pub CoreError, pub StatusCode);

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = match &e {
            CoreError::BadQuery(_) => StatusCode::BAD_REQUEST,
            CoreError::UnknownView(_) => StatusCode::NOT_FOUND,
            CoreError::Backend(_) | CoreError::Delta(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(e, status)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let ApiError(e, status) = self;
        let detail = if status.is_server_error() {
            tracing::error!(error = %e, "request failed");
            "the server could not answer; the error is in its log".to_string()
        } else {
            e.to_string()
        };
        let body = json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("error"),
            "status": status.as_u16(),
            "detail": detail,
        });
        (
            status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body.to_string(),
        )
            .into_response()
    }
}

async fn view_json(state: &AppState, name: &str) -> Result<Json_, ApiError> {
    let view = state.catalog.view(name)?;
    let coverage = state.batch.coverage(view).await?;
    let mut v =
        serde_json::to_value(view.as_ref()).map_err(|e| CoreError::Backend(e.to_string()))?;
    v["coverage"] = json!({
        "batch_version": coverage.version,
        "covered_until": coverage.covered_until_us().map(format_us),
        "days": coverage.ranges().into_iter().map(|(a, b)| json!({"from": a, "to": b})).collect::<Vec<_>>(),
    });
    Ok(v)
}

async fn list_views(State(state): State<AppState>) -> Result<Json<Json_>, ApiError> {
    let mut views = Vec::new();
    for name in state.catalog.views.keys() {
        views.push(view_json(&state, name).await?);
    }
    Ok(Json(json!({ "views": views })))
}

async fn get_view(
    State(state): State<AppState>,
    Path(view): Path<String>,
) -> Result<Json<Json_>, ApiError> {
    Ok(Json(view_json(&state, &view).await?))
}

async fn query_get(
    State(state): State<AppState>,
    Path(view): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    run_query(&state, &view, params, &headers).await
}

async fn query_post(
    State(state): State<AppState>,
    Path(view): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError(CoreError::BadQuery(r.body_text()), r.status()))?;
    let body: Json_ = serde_json::from_slice(&body)
        .map_err(|e| CoreError::BadQuery(format!("the body is not JSON: {e}")))?;
    let Json_::Object(map) = body else {
        return Err(CoreError::BadQuery("the body must be a JSON object".into()).into());
    };
    // The body's keys are the query parameters; lists become comma lists, and `filter` may be an
    // object of dimension -> value or list of values.
    let mut params = Vec::new();
    for (k, v) in map {
        match (k.as_str(), v) {
            ("filter", Json_::Object(f)) => {
                for (dim, val) in f {
                    let values = match val {
                        Json_::Array(a) => a,
                        other => vec![other],
                    };
                    for x in values {
                        params.push(("filter".to_string(), format!("{dim}={}", scalar(&x)?)));
                    }
                }
            }
            (_, Json_::Array(a)) => {
                let items: Result<Vec<String>, ApiError> = a.iter().map(scalar).collect();
                params.push((k, items?.join(",")));
            }
            (_, v) => params.push((k, scalar(&v)?)),
        }
    }
    run_query(&state, &view, params, &headers).await
}

fn scalar(v: &Json_) -> Result<String, ApiError> {
    match v {
        Json_::String(s) => Ok(s.clone()),
        Json_::Number(n) => Ok(n.to_string()),
        Json_::Bool(b) => Ok(b.to_string()),
        other => {
            Err(CoreError::BadQuery(format!("expected a string or number, got {other}")).into())
        }
    }
}

async fn run_query(
    state: &AppState,
    view: &str,
    params: Vec<(String, String)>,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    state.metrics.queries.fetch_add(1, Ordering::Relaxed);
    let result = async {
        let view = state.catalog.view(view)?;
        let format = match params
            .iter()
            .find(|(k, _)| k == "format")
            .map(|(_, v)| v.as_str())
        {
            Some("csv") => Format::Csv,
            Some("json") => Format::Json,
            Some("arrow") => Format::Arrow,
            Some(other) => {
                return Err(CoreError::BadQuery(format!(
                    "format `{other}` (expected json, csv or arrow)"
                ))
                .into())
            }
            None => {
                let accept = headers
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if accept.starts_with("text/csv") {
                    Format::Csv
                } else if accept.starts_with(ARROW_STREAM) {
                    Format::Arrow
                } else {
                    Format::Json
                }
            }
        };
        let q = ViewQuery::from_params(
            view,
            params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            state.clock.now_us(),
        )?;
        let result = answer(view, &q, state.batch.as_ref(), state.speed.as_ref()).await?;
        Ok::<_, ApiError>(match format {
            Format::Csv => (
                [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
                result.to_csv(view),
            )
                .into_response(),
            Format::Json => Json(result.to_json(view)).into_response(),
            Format::Arrow => {
                let batch = result.to_arrow(view)?;
                let mut out = Vec::new();
                let mut w =
                    StreamWriter::try_new(&mut out, &batch.schema()).map_err(CoreError::from)?;
                w.write(&batch).map_err(CoreError::from)?;
                w.finish().map_err(CoreError::from)?;
                drop(w);
                ([(header::CONTENT_TYPE, ARROW_STREAM)], out).into_response()
            }
        })
    }
    .await;
    if let Err(ApiError(_, status)) = &result {
        let counter = if status.is_server_error() {
            &state.metrics.server_errors
        } else {
            &state.metrics.client_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// The media type of an Arrow IPC stream.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

enum Format {
    Json,
    Csv,
    Arrow,
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let m = &state.metrics;
    let status = state.speed.status();
    let mut out = String::new();
    for (name, help, v) in [
        (
            "tandem_api_queries_total",
            "Queries received.",
            m.queries.load(Ordering::Relaxed),
        ),
        (
            "tandem_api_client_errors_total",
            "Queries answered with a 4xx.",
            m.client_errors.load(Ordering::Relaxed),
        ),
        (
            "tandem_api_server_errors_total",
            "Queries answered with a 5xx.",
            m.server_errors.load(Ordering::Relaxed),
        ),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    if let Some(lag) = status.lag_ms {
        out.push_str(&format!(
            "# HELP tandem_speed_lag_ms Age of the newest applied message.\n# TYPE tandem_speed_lag_ms gauge\ntandem_speed_lag_ms {lag}\n"
        ));
    }
    out.push_str(&format!(
        "# HELP tandem_speed_stale_partitions Partitions whose speed state is known to be incomplete.\n# TYPE tandem_speed_stale_partitions gauge\ntandem_speed_stale_partitions {}\n",
        status.stale_partitions.len()
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
