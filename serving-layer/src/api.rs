//! The HTTP API (DESIGN §7): `/v1/views`, `/v1/views/{view}`, `/v1/views/{view}/query` (GET
//! with a query string, POST with a JSON body of the same [`QueryParams`]; JSON, CSV or an
//! Arrow IPC stream), `/livez`, `/readyz`, `/metrics`. Errors become problem bodies in
//! [`crate::error`] only; bad queries are 400, never 500.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value as Json_};
use tandem_core::query::{Coverage, OrderBy, QueryResult, RealtimeStatus, ViewQuery};
use tandem_core::time::{format_us, Clock};
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::ViewDef;
use tandem_core::Catalog;
use tandem_core::ErrorClass;
use tower::{BoxError, ServiceBuilder};

use crate::answer::{self, Answered, Settled};
use crate::body::Chunks;
use crate::cache::{normalized, AnswerCache};
use crate::error::{problem, problem_bodies, ApiError};
use crate::gzip::{self, Deflated};
use crate::params::{Format, Params, QueryParams, MAX_LIMIT};
use crate::render::{self, ARROW_STREAM};
use crate::telemetry::Reuse;

/// What the API serves from: [`Shared`], cloned with every request as one reference count.
/// Its fields read through it; setting one before serving copies the references if the
/// state is already shared.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl From<Shared> for AppState {
    fn from(shared: Shared) -> Self {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl std::ops::DerefMut for AppState {
    fn deref_mut(&mut self) -> &mut Shared {
        Arc::make_mut(&mut self.0)
    }
}

/// The parts of [`AppState`].
#[derive(Debug, Clone)]
pub struct Shared {
    pub catalog: Arc<Catalog>,
    pub batch: Arc<dyn BatchViews>,
    pub speed: Arc<dyn RealtimeView>,
    pub clock: Arc<dyn Clock>,
    pub metrics: Arc<ApiMetrics>,
    /// What `/readyz` checks besides the API's own load and the batch views' health.
    pub readiness: Arc<Readiness>,
    /// Answers reused while their inputs are unchanged.
    pub answers: AnswerCache,
    /// API keys and their scopes (none: every request is served).
    pub auth: Arc<crate::auth::Auth>,
    /// The runtime on whose blocking threads answers are computed (`None`: the serving
    /// runtime's own). A server gives them threads of a lower CPU priority than the ones
    /// that send answers, so that a computation (a heavy query, or the answer of new events)
    /// never slows the requests answered from the cache.
    pub compute: Option<tokio::runtime::Handle>,
}

/// A readiness check: `Some(reason)` while what it watches is not ready.
pub type Check = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// The checks `/readyz` runs, each named (the process's roles add theirs).
#[derive(Default)]
pub struct Readiness {
    checks: Vec<(String, Check)>,
    /// Checks kept elsewhere, asked too.
    nested: Vec<Arc<Readiness>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.checks.iter().map(|(n, _)| n))
            .finish()
    }
}

impl Readiness {
    pub fn with(mut self, name: impl Into<String>, check: Check) -> Self {
        self.checks.push((name.into(), check));
        self
    }

    /// These checks and `other`'s.
    pub fn including(mut self, other: Arc<Readiness>) -> Self {
        self.nested.push(other);
        self
    }

    /// Why the process is not ready, one reason per failing check.
    pub fn reasons(&self) -> Vec<String> {
        self.checks
            .iter()
            .filter_map(|(name, check)| check().map(|r| format!("{name}: {r}")))
            .chain(self.nested.iter().flat_map(|n| n.reasons()))
            .collect()
    }
}

/// Writes a role's own metrics (Prometheus text format) into `/metrics`.
pub type MetricsSource = Arc<dyn Fn(&mut String) + Send + Sync>;

/// Request counters, by outcome class only (bounded label set), and the process's other
/// roles' metrics.
#[derive(Default)]
pub struct ApiMetrics {
    pub queries: AtomicU64,
    pub client_errors: AtomicU64,
    pub server_errors: AtomicU64,
    /// Queries being answered now.
    pub in_flight: AtomicU64,
    /// The other roles of the process, appended to `/metrics`.
    pub sources: Vec<MetricsSource>,
    /// Latency histograms, cache outcomes and answer times.
    pub telemetry: crate::telemetry::Telemetry,
}

impl std::fmt::Debug for ApiMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiMetrics")
            .field("queries", &self.queries)
            .field("sources", &self.sources.len())
            .finish_non_exhaustive()
    }
}

/// Counts a query in flight while it lives.
struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// Bounds on the query routes, so that no burst of clients can take the process down.
#[derive(Debug, Clone, Copy)]
pub struct QueryLimits {
    /// Queries answered at once; a query beyond them is refused at once with 503 and
    /// `Retry-After`, not queued.
    pub max_concurrent: usize,
    /// The longest one query may take; past it, it is dropped with a 503.
    pub timeout: Duration,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_concurrent: 64,
            timeout: Duration::from_secs(10),
        }
    }
}

/// The API's routes, with the default query limits.
pub fn router(state: AppState) -> Router {
    router_with(state, QueryLimits::default())
}

/// The API's routes. Only the query routes are limited: the probes, `/metrics` and the view
/// list always answer.
pub fn router_with(state: AppState, limits: QueryLimits) -> Router {
    let limited = ServiceBuilder::new()
        .layer(HandleErrorLayer::new(move |e: BoxError| async move {
            limit_refusal(e, limits)
        }))
        .load_shed()
        .concurrency_limit(limits.max_concurrent.max(1))
        .timeout(limits.timeout);
    let router = probes(limits)
        .route("/openapi.json", get(openapi_json))
        .route("/v1/views", get(list_views))
        .route("/v1/views/{view}", get(get_view))
        .route(
            "/v1/views/{view}/query",
            get(query_get).post(query_post).layer(limited),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::telemetry::track,
        ))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see /v1/views")
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(problem_bodies))
        .layer(cors())
        .with_state(state);
    // The access log: a span per request, with its method, path, status and latency, at debug
    // level (`RUST_LOG=tower_http=debug`). Left out unless that level is on when the router is
    // built, so that a busy server does not pay for it.
    if tracing::enabled!(target: "tower_http::trace::on_response", tracing::Level::DEBUG) {
        router.layer(tower_http::trace::TraceLayer::new_for_http())
    } else {
        router
    }
}

/// Dashboards served from another origin (Grafana, Superset, a page of one's own) may read
/// the API from the browser: any origin, `GET` and `POST`, any request header, no cookies (the
/// API has none), preflights cached for an hour. Every CORS header is the same whatever the
/// request's `Origin` and preflight headers (wildcards and a fixed list), so no response
/// varies with them: no `Vary` for them (which would also cost each response a header).
fn cors() -> tower_http::cors::CorsLayer {
    use tower_http::cors::{Any, CorsLayer};
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
        .allow_headers(Any)
        .expose_headers(Any)
        .max_age(Duration::from_secs(3600))
        .vary([])
}

/// The admin routes alone: `/livez`, `/readyz` and `/metrics`, for a listener of their own,
/// so that orchestrators and scrapers reach them however many clients hold the API's
/// connections. `limits` are the API's query limits (`/readyz` reports their saturation).
pub fn admin_router(state: AppState, limits: QueryLimits) -> Router {
    probes(limits)
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "the admin port serves /livez, /readyz and /metrics",
            )
        })
        .layer(axum::middleware::from_fn(problem_bodies))
        .with_state(state)
}

fn probes(limits: QueryLimits) -> Router<AppState> {
    Router::new()
        .route("/livez", get(livez))
        .route(
            "/readyz",
            get(move |State(state): State<AppState>| async move { readyz(&state, limits) }),
        )
        .route("/metrics", get(metrics))
}

/// Liveness: the process runs.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "operations",
    responses((status = 200, description = "`ok`", body = String, content_type = "text/plain"))
)]
pub(crate) async fn livez() -> &'static str {
    "ok"
}

/// Readiness: 200 when the process can answer and ingest, 503 with every reason it cannot.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = 200, description = "`ok`", body = String, content_type = "text/plain"),
        (status = 503, description = "Not ready; `detail` gives every reason", body = crate::openapi::Problem, content_type = "application/problem+json", headers(("Retry-After" = u32, description = "Seconds to wait"))),
    )
)]
#[allow(dead_code)]
pub(crate) fn readyz_doc() {}

/// This API's OpenAPI description.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    responses((status = 200, description = "The OpenAPI 3.1 description", body = Object, content_type = "application/json"))
)]
pub(crate) async fn openapi_json() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::spec_json(),
    )
}

/// 200 when the process can answer and ingest; 503 with every reason it cannot: the query
/// routes saturated (new queries are being shed), a batch view that cannot be refreshed, or a
/// check a role added (an archiver that stopped committing).
fn readyz(state: &AppState, limits: QueryLimits) -> Response {
    let mut reasons = Vec::new();
    let in_flight = state.metrics.in_flight.load(Ordering::Relaxed);
    if in_flight >= limits.max_concurrent.max(1) as u64 {
        reasons.push(format!(
            "queries: {in_flight} in flight, the most allowed; new ones are shed"
        ));
    }
    if let Some(r) = state.batch.health() {
        reasons.push(format!("batch views: {r}"));
    }
    reasons.extend(state.readiness.reasons());
    if reasons.is_empty() {
        "ok".into_response()
    } else {
        problem(StatusCode::SERVICE_UNAVAILABLE, &reasons.join("; "))
    }
}

/// A query refused by a limit: 503 with `Retry-After`, saying which limit.
fn limit_refusal(e: BoxError, limits: QueryLimits) -> Response {
    if e.is::<tower::load_shed::error::Overloaded>() {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "more than {} queries at once; retry later",
                limits.max_concurrent
            ),
        )
    } else if e.is::<tower::timeout::error::Elapsed>() {
        problem(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "the query took longer than {} ms; narrow it or retry later",
                limits.timeout.as_millis()
            ),
        )
    } else {
        tracing::error!(error = %e, "a query failed in its limits");
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the server could not answer; the error is in its log",
        )
    }
}

async fn view_json(state: &AppState, name: &str) -> Result<Json_, ApiError> {
    let view = state.catalog.view(name)?;
    let coverage = state.batch.coverage(view).await?;
    let mut v = serde_json::to_value(view.as_ref())
        .map_err(|e| tandem_core::CoreError::Internal(format!("a view as JSON: {e}")))?;
    v["coverage"] = json!({
        "batch_version": coverage.version,
        "covered_until": coverage.covered_until_us().map(format_us),
        "days": coverage.ranges().into_iter().map(|(a, b)| json!({"from": a, "to": b})).collect::<Vec<_>>(),
    });
    Ok(v)
}

/// Every view the caller may read, with its definition and batch coverage.
#[utoipa::path(
    get,
    path = "/v1/views",
    tag = "views",
    responses(
        (status = 200, description = "The views", body = crate::openapi::ViewList),
        crate::openapi::ListRefusals,
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn list_views(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Json_>, ApiError> {
    let key = state.auth.authenticate(&headers)?;
    let mut views = Vec::new();
    for (name, view) in &state.catalog.views {
        if crate::auth::may_read(key.as_deref(), view) {
            views.push(view_json(&state, name).await?);
        }
    }
    Ok(Json(json!({ "views": views })))
}

/// One view's definition and batch coverage.
#[utoipa::path(
    get,
    path = "/v1/views/{view}",
    tag = "views",
    params(("view" = String, Path, description = "The view's name")),
    responses(
        (status = 200, description = "The view", body = crate::openapi::ViewInfo),
        crate::openapi::ViewRefusals,
    ),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn get_view(
    State(state): State<AppState>,
    Path(view): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Json_>, ApiError> {
    let key = state.auth.authenticate(&headers)?;
    crate::auth::check_view(key.as_deref(), state.catalog.view(&view)?)?;
    Ok(Json(view_json(&state, &view).await?))
}

/// A view's answer: buckets of the range at the granularity asked, grouped, filtered,
/// ordered and limited; batch rows where the published batch covers a bucket, speed rows for
/// the rest.
#[utoipa::path(
    get,
    path = "/v1/views/{view}/query",
    tag = "views",
    params(("view" = String, Path, description = "The view's name"), QueryParams),
    responses(crate::openapi::QueryAnswers),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn query_get(
    State(state): State<AppState>,
    Path(view): Path<String>,
    headers: HeaderMap,
    Params(params): Params,
) -> Result<Response, ApiError> {
    run_query(&state, &view, &params, &headers).await
}

/// The same query as `GET`, its parameters in a JSON body (lists as lists, numbers as numbers).
#[utoipa::path(
    post,
    path = "/v1/views/{view}/query",
    tag = "views",
    params(("view" = String, Path, description = "The view's name")),
    request_body(content = QueryParams, content_type = "application/json"),
    responses(crate::openapi::QueryAnswers),
    security((), ("bearer" = []), ("api_key" = []))
)]
pub(crate) async fn query_post(
    State(state): State<AppState>,
    Path(view): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // The body is JSON whatever its declared type (`curl -d` says form-urlencoded).
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let value: Json_ = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let params = QueryParams::from_json(value).map_err(ApiError::bad_request)?;
    run_query(&state, &view, &params, &headers).await
}

async fn run_query(
    state: &AppState,
    view: &str,
    params: &QueryParams,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    state.metrics.queries.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight::new(&state.metrics.in_flight);
    let result = async {
        let key = state.auth.authenticate(headers)?;
        let view = state.catalog.view(view)?;
        crate::auth::check_view(key.as_deref(), view)?;
        let format = params.format.unwrap_or_else(|| {
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
        });
        let mut q = params
            .resolve(view, state.clock.now_us())
            .map_err(ApiError::bad_request)?;
        crate::auth::scope(key.as_deref(), view, &mut q);
        let totals = params.totals().map_err(ApiError::bad_request)?;
        if totals && format != Format::Json {
            return Err(ApiError::bad_request(
                "totals are given in JSON answers only; ask JSON, or the same query without \
                 group_by for the totals",
            ));
        }
        let gzip = gzip::accepted(headers) && format == Format::Json;
        let q = normalized(view, q);
        // An unreachable store degrades the answer to the speed layer's rows, flagged in
        // `meta`, while the speed layer answers; with neither, it is a 503.
        let (coverage, degraded) = match state.batch.coverage(view).await {
            Ok(c) => (c, None),
            Err(e) if e.class() == ErrorClass::Unavailable && state.speed.status().available => {
                tracing::warn!(view = %view.name, error = %crate::error::Chain(&e), "the batch views are unreachable; answering from the speed layer");
                let reason = "the batch views are unreachable: rows of the days the batch \
                              covers may be missing or partial";
                (Coverage::default(), Some(reason))
            }
            Err(e) => return Err(e.into()),
        };
        let answered = obtain(state, view, &q, &coverage, format, gzip).await?;
        let totals = match totals {
            true => Some(obtain(state, view, &totals_query(&q), &coverage, format, gzip).await?),
            false => None,
        };
        // The freshness of the rows sent: the speed layer's now, or an answer's own if it is
        // behind it (both parts' worst, if both are).
        let behind = [Some(&answered), totals.as_ref()]
            .into_iter()
            .flatten()
            .filter(|o| o.behind)
            .map(|o| o.answered.aged_status())
            .reduce(RealtimeStatus::worst);
        let realtime = behind.unwrap_or_else(|| state.speed.status());
        let mut shown = answered.answered.result.clone();
        shown.degraded.extend(degraded.map(str::to_string));
        render_answer(
            &answered.answered,
            &shown,
            totals.as_ref().map(|t| t.answered.as_ref()),
            &realtime,
            format,
            gzip,
        )
    }
    .await;
    if let Err(e) = &result {
        let counter = if e.status.is_server_error() {
            &state.metrics.server_errors
        } else {
            &state.metrics.client_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    result
}

/// An answer to send, and whether it was computed from older speed state than the newest
/// (see `crate::cache`): its freshness is then its own, not the speed layer's of now.
struct Obtained {
    answered: Arc<Answered>,
    behind: bool,
}

/// The answer of `q` (normalized) on `view` at `coverage`, ready to send in `format` (deflated
/// too if `gzip`): a standing answer from the cache if it is ready; else, while another
/// request computes the answer of newer speed state, the newest one of the query (at most
/// [`crate::cache::MAX_BEHIND`] old); else one computed, or made ready, on a blocking thread.
/// So a client asking one query after another always gets the current state's answer, and
/// requests that arrive during a computation never wait for it. Answering is CPU work: it
/// never holds the runtime's threads (the concurrency limit bounds how many run at once).
async fn obtain(
    state: &AppState,
    view: &Arc<ViewDef>,
    q: &ViewQuery,
    coverage: &Coverage,
    format: Format,
    gzip: bool,
) -> Result<Obtained, ApiError> {
    let settled_key = AnswerCache::settled_key(view, q, coverage);
    let generation = state.speed.generation(view);
    let key = generation.map(|g| AnswerCache::at_generation(&settled_key, g));
    let ready = |a: &Answered| match format {
        Format::Json => !gzip || a.gzip_ready(),
        Format::Csv | Format::Arrow => a.batch_ready(),
    };
    if let Some(answered) = key.as_ref().and_then(|k| state.answers.get(k)) {
        if ready(&answered) {
            state.metrics.telemetry.cached(Reuse::Hit);
            return Ok(Obtained {
                answered,
                behind: false,
            });
        }
    }
    if let (Some(g), Some(newest)) = (generation, state.answers.newest(&settled_key)) {
        if ready(&newest.answered) && newest.generation >= g {
            // Computed at this generation or a newer one (read after ours).
            state.metrics.telemetry.cached(Reuse::Hit);
            return Ok(Obtained {
                answered: Arc::clone(&newest.answered),
                behind: false,
            });
        }
        // The first request to see newer speed state computes its answer; the others meanwhile
        // take the newest one rather than wait.
        if ready(&newest.answered) && newest.servable() && !newest.claim_refresh() {
            state.metrics.telemetry.cached(Reuse::Behind);
            return Ok(Obtained {
                answered: Arc::clone(&newest.answered),
                behind: true,
            });
        }
    }
    state.metrics.telemetry.cached(Reuse::Miss);
    let answered = compute(
        state,
        view,
        q,
        coverage,
        format,
        gzip,
        settled_key,
        generation,
    )
    .await?;
    Ok(Obtained {
        answered,
        behind: false,
    })
}

/// Computes the answer of `q` (its settled part's key `settled_key`), makes it ready for
/// `format`, and, at a speed `generation`, computes it once however many ask at once and
/// records it as its query's newest (without one, it is never reused).
#[allow(clippy::too_many_arguments)] // the query and its keys, as `obtain` has them
async fn compute(
    state: &AppState,
    view: &Arc<ViewDef>,
    q: &ViewQuery,
    coverage: &Coverage,
    format: Format,
    gzip: bool,
    settled_key: String,
    generation: Option<u64>,
) -> Result<Arc<Answered>, ApiError> {
    let started = std::time::Instant::now();
    let (owned, view, q, coverage) = (state.clone(), Arc::clone(view), q.clone(), coverage.clone());
    let work = move || {
        let handle = tokio::runtime::Handle::current();
        let settled = settled_part(&owned, &view, &q, &coverage, settled_key.clone(), &handle)?;
        let compute = || {
            answer::answer(&view, &q, coverage.clone(), &settled, owned.speed.as_ref())
                .map_err(ApiError::from)
        };
        let answered = match generation {
            Some(g) => owned
                .answers
                .get_or_compute(AnswerCache::at_generation(&settled_key, g), compute)
                .map_err(shared_error)?,
            None => Arc::new(compute()?),
        };
        make_ready(&answered, format, gzip)?;
        if let Some(g) = generation {
            owned
                .answers
                .set_newest(settled_key, g, Arc::clone(&answered));
        }
        owned
            .metrics
            .telemetry
            .computed(started.elapsed().as_secs_f64());
        Ok(answered)
    };
    match &state.compute {
        Some(runtime) => runtime.spawn_blocking(work),
        None => tokio::task::spawn_blocking(work),
    }
    .await
    .map_err(|e| tandem_core::CoreError::Internal(format!("a query task failed: {e}")))?
}

/// The batch's settled part of `q`, from the cache or computed (once however many ask). On a
/// blocking thread: `handle` runs the batch side's reads.
fn settled_part(
    state: &AppState,
    view: &ViewDef,
    q: &ViewQuery,
    coverage: &Coverage,
    settled_key: String,
    handle: &tokio::runtime::Handle,
) -> Result<Arc<Settled>, ApiError> {
    state
        .answers
        .settled(settled_key, || {
            handle
                .block_on(Settled::compute(view, q, coverage, state.batch.as_ref()))
                .map_err(ApiError::from)
        })
        .map_err(shared_error)
}

/// Makes what sending `answered` in `format` needs, here rather than on the runtime's threads.
fn make_ready(answered: &Answered, format: Format, gzip: bool) -> Result<(), ApiError> {
    match format {
        Format::Json if gzip => {
            answered.gzip();
        }
        Format::Json => {}
        Format::Csv | Format::Arrow => {
            answered.batch()?;
        }
    }
    Ok(())
}

/// The query of `q`'s totals: the same range, granularity and filters, no grouping, one row
/// per answer bucket in bucket order.
fn totals_query(q: &ViewQuery) -> ViewQuery {
    let mut t = q.clone();
    t.group_by.clear();
    t.order_by = match q.order_by {
        OrderBy::Bucket { descending } => OrderBy::Bucket { descending },
        OrderBy::Metric { .. } => OrderBy::Bucket { descending: false },
    };
    t.limit = MAX_LIMIT;
    t
}

/// An error several waiting queries share, as each one's own.
fn shared_error(e: Arc<ApiError>) -> ApiError {
    Arc::try_unwrap(e).unwrap_or_else(|shared| ApiError::new(shared.status, &shared.detail))
}

/// `answered`'s rows in the format asked, under `result` (its result with this request's own
/// flags) and with `realtime` as the speed layer's freshness; JSON is gzipped if `gzip` (the
/// client accepts it), and carries `totals` (an answer of [`totals_query`]) if given.
fn render_answer(
    answered: &Answered,
    result: &QueryResult,
    totals: Option<&Answered>,
    realtime: &RealtimeStatus,
    format: Format,
    gzip: bool,
) -> Result<Response, ApiError> {
    let batch = || render::with_meta(&answered.batch()?, result, realtime);
    Ok(match format {
        // CSV and Arrow are printed a chunk of rows at a time, as the client takes them.
        Format::Csv => (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            Body::from_stream(futures::stream::iter(render::csv_chunks(batch()?))),
        )
            .into_response(),
        Format::Json => {
            let head = render::json_head(result, realtime);
            let tail = render::JSON_TAIL.as_bytes();
            let vary = (header::VARY, "accept-encoding");
            // gzip needs every part deflated; if one could not be, the answer goes as is.
            let deflated = match (gzip, totals) {
                (false, _) => None,
                (true, None) => answered.gzip().map(|rows| (rows, None)),
                (true, Some(t)) => answered.gzip().zip(t.gzip()).map(|(r, t)| (r, Some(t))),
            };
            match deflated {
                Some((rows, t)) => {
                    let (head, middle, end) = (
                        Deflated::stored(head.as_bytes()),
                        Deflated::stored(render::JSON_TOTALS.as_bytes()),
                        Deflated::stored(tail),
                    );
                    let mut parts = vec![&head, rows];
                    if let Some(t) = t {
                        parts.extend([&middle, t]);
                    }
                    parts.push(&end);
                    (
                        [
                            (header::CONTENT_TYPE, "application/json"),
                            (header::CONTENT_ENCODING, "gzip"),
                            vary,
                        ],
                        Body::new(Chunks::new(gzip::member(&parts))),
                    )
                        .into_response()
                }
                None => {
                    let mut chunks = vec![Bytes::from(head)];
                    chunks.extend(answered.json_rows());
                    if let Some(t) = totals {
                        chunks.push(Bytes::from_static(render::JSON_TOTALS.as_bytes()));
                        chunks.extend(t.json_rows());
                    }
                    chunks.push(Bytes::from_static(tail));
                    (
                        [(header::CONTENT_TYPE, "application/json"), vary],
                        Body::new(Chunks::new(chunks)),
                    )
                        .into_response()
                }
            }
        }
        Format::Arrow => (
            [(header::CONTENT_TYPE, ARROW_STREAM)],
            Body::from_stream(futures::stream::iter(render::ipc_chunks(batch()?)?)),
        )
            .into_response(),
    })
}

/// Prometheus metrics of every role of the process (text format).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    responses((status = 200, description = "The metrics", body = String, content_type = "text/plain"))
)]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
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
            "# HELP tandem_speed_lag_ms Age of the newest applied message of the partition that lags most.\n# TYPE tandem_speed_lag_ms gauge\ntandem_speed_lag_ms {lag}\n"
        ));
    }
    if !status.partition_lag_ms.is_empty() {
        out.push_str("# HELP tandem_speed_partition_lag_ms Age of the newest applied message, per partition.\n# TYPE tandem_speed_partition_lag_ms gauge\n");
        for (p, lag) in &status.partition_lag_ms {
            out.push_str(&format!(
                "tandem_speed_partition_lag_ms{{partition=\"{p}\"}} {lag}\n"
            ));
        }
    }
    out.push_str(&format!(
        "# HELP tandem_speed_stale_partitions Partitions whose speed state is known to be incomplete.\n# TYPE tandem_speed_stale_partitions gauge\ntandem_speed_stale_partitions {}\n",
        status.stale_partitions.len()
    ));
    m.telemetry.encode(&mut out);
    for source in &m.sources {
        source(&mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}
