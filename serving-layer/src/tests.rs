//! The merge and the API against fake layers.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tandem_core::metric::MetricState;
use tandem_core::query::{AggRow, Coverage, RealtimeStatus, ViewQuery};
use tandem_core::time::MockClock;
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::{ViewDef, DAY_US, HOUR_US};
use tandem_core::Catalog;
use tower::ServiceExt;

use crate::{router, ApiMetrics, AppState};

const DAY: i64 = 20_000; // 2024-10-04
const NOW: i64 = (DAY + 1) * DAY_US + 12 * HOUR_US;

fn catalog() -> Arc<Catalog> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    Arc::new(Catalog::load(&root.join("schemas"), &root.join("jobs")).unwrap())
}

/// installs_hourly rows: one per hour given, with `installs` = n and no dims asked.
fn rows(hours: &[(i64, u64)], q: &ViewQuery) -> Vec<AggRow> {
    hours
        .iter()
        .map(|&(bucket_us, n)| AggRow {
            bucket_us,
            dims: q.group_by.iter().map(|_| Some("x".to_string())).collect(),
            states: q
                .metrics
                .iter()
                .map(|&m| {
                    if m == 0 {
                        MetricState::Count(n)
                    } else {
                        MetricState::Distinct(Box::new(tandem_core::metric::DistinctState::new(12)))
                    }
                })
                .collect(),
        })
        .collect()
}

#[derive(Debug)]
struct FakeBatch(Vec<(i64, u64)>, BTreeSet<i64>);

#[async_trait]
impl BatchViews for FakeBatch {
    async fn coverage(&self, _: &ViewDef) -> tandem_core::Result<Coverage> {
        Ok(Coverage {
            version: Some(3),
            days: self.1.clone(),
            published_us: None,
        })
    }
    async fn query(
        &self,
        _: &ViewDef,
        q: &ViewQuery,
        _: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        Ok(rows(&self.0, q))
    }
}

#[derive(Debug)]
struct FakeSpeed(Vec<(i64, u64)>);

impl RealtimeView for FakeSpeed {
    fn query(&self, _: &ViewDef, q: &ViewQuery, _: &Coverage) -> tandem_core::Result<Vec<AggRow>> {
        Ok(rows(&self.0, q)
            .into_iter()
            .filter(|r| q.in_range(r.bucket_us))
            .collect())
    }
    fn status(&self) -> RealtimeStatus {
        RealtimeStatus {
            lag_ms: Some(42),
            partition_lag_ms: [(0, 7), (3, 42)].into(),
            stale_partitions: vec![3],
            available: true,
        }
    }
}

/// The API's state over `batch` and `speed`, at `NOW`, without keys.
fn state(batch: Arc<dyn BatchViews>, speed: Arc<dyn RealtimeView>) -> AppState {
    AppState::from(crate::Shared {
        catalog: catalog(),
        batch,
        speed,
        clock: Arc::new(MockClock::new(NOW)),
        metrics: Arc::new(ApiMetrics::default()),
        readiness: Default::default(),
        answers: Default::default(),
        auth: Default::default(),
        compute: None,
    })
}

fn app() -> axum::Router {
    let d = DAY * DAY_US;
    // Batch covers DAY; it also (wrongly) holds a row of DAY+1, which must not be served.
    let batch = FakeBatch(
        vec![(d, 10), (d + HOUR_US, 20), (d + DAY_US, 999)],
        [DAY].into(),
    );
    // Speed holds DAY too (not yet pruned): covered, so not served; and DAY+1.
    let speed = FakeSpeed(vec![(d, 7), (d + DAY_US, 5), (d + DAY_US + HOUR_US, 6)]);
    router(state(Arc::new(batch), Arc::new(speed)))
}

async fn call(req: Request<Body>) -> (StatusCode, Value) {
    let resp = app().oneshot(req).await.unwrap();
    let status = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    if status.is_client_error() {
        assert_eq!(ct, "application/problem+json");
    }
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into())),
    )
}

async fn get(uri: &str) -> (StatusCode, Value) {
    call(Request::get(uri).body(Body::empty()).unwrap()).await
}

#[tokio::test]
async fn covered_buckets_from_batch_the_rest_from_speed() {
    let (status, body) =
        get("/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&metrics=installs").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got: Vec<(String, String, u64)> = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["bucket"].as_str().unwrap().to_string(),
                r["source"].as_str().unwrap().to_string(),
                r["metrics"]["installs"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("2024-10-04T00:00:00Z".to_string(), "batch".to_string(), 10),
            ("2024-10-04T01:00:00Z".into(), "batch".into(), 20),
            ("2024-10-05T00:00:00Z".into(), "speed".into(), 5),
            ("2024-10-05T01:00:00Z".into(), "speed".into(), 6),
        ]
    );
    assert_eq!(body["meta"]["batch_version"], 3);
    assert_eq!(body["meta"]["covered_until"], "2024-10-05T00:00:00Z");
    assert_eq!(body["meta"]["speed_lag_ms"], 42);
}

#[tokio::test]
async fn rollups_merge_within_a_source_and_order_and_limit_apply() {
    let (status, body) = get("/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&granularity=day&order_by=-installs&limit=1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["metrics"]["installs"], 30);
    assert_eq!(rows[0]["source"], "batch");
    assert_eq!(body["meta"]["truncated"], true);
}

#[tokio::test]
async fn post_and_get_answer_the_same() {
    let get_body = get("/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&group_by=country&filter=country=x&metrics=installs").await;
    let post = Request::post("/v1/views/installs_hourly/query")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"from":"2024-10-04","to":"2024-10-06","group_by":["country"],"filter":{"country":"x"},"metrics":["installs"]}"#))
        .unwrap();
    let post_body = call(post).await;
    assert_eq!(get_body.0, StatusCode::OK);
    assert_eq!(get_body, post_body);
}

#[tokio::test]
async fn bad_requests_get_a_reason_never_a_500() {
    let cases = [
        (
            "/v1/views/nope/query",
            StatusCode::NOT_FOUND,
            "unknown view",
        ),
        (
            "/v1/views/installs_hourly/query?metrics=revenue",
            StatusCode::BAD_REQUEST,
            "no metric `revenue`",
        ),
        (
            "/v1/views/installs_hourly/query?group_by=country%3B%20DROP%20TABLE%20x",
            StatusCode::BAD_REQUEST,
            "no dimension",
        ),
        (
            "/v1/views/installs_hourly/query?from=tomorrow",
            StatusCode::BAD_REQUEST,
            "RFC 3339",
        ),
        (
            "/v1/views/installs_hourly/query?from=2024-10-05&to=2024-10-04",
            StatusCode::BAD_REQUEST,
            "before",
        ),
        (
            "/v1/views/installs_hourly/query?limit=0",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
        (
            "/v1/views/installs_hourly/query?format=xml",
            StatusCode::BAD_REQUEST,
            "format",
        ),
        (
            "/v1/views/installs_hourly/query?from=1990-01-01",
            StatusCode::BAD_REQUEST,
            "range too large",
        ),
        (
            "/v1/views/installs_hourly/query?from=-9223372036854775&to=-9223372036854000",
            StatusCode::BAD_REQUEST,
            "RFC 3339",
        ),
        (
            "/v1/views/installs_hourly/query?from=9223372036854775807",
            StatusCode::BAD_REQUEST,
            "RFC 3339",
        ),
        ("/v2/anything", StatusCode::NOT_FOUND, "no such endpoint"),
    ];
    for (uri, want, needle) in cases {
        let (status, body) = get(uri).await;
        assert_eq!(status, want, "{uri}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(needle),
            "{uri}: {body}"
        );
    }
    for body in ["not json", "[1,2]", r#"{"metrics":{"a":1}}"#] {
        let req = Request::post("/v1/views/installs_hourly/query")
            .body(Body::from(body))
            .unwrap();
        let (status, b) = call(req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {b}");
    }
    let huge = format!(r#"{{"from":"{}"}}"#, "x".repeat(crate::api::MAX_BODY + 1));
    let (status, _) = call(
        Request::post("/v1/views/installs_hourly/query")
            .body(Body::from(huge))
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn views_list_their_definition_and_coverage() {
    let (status, body) = get("/v1/views").await;
    assert_eq!(status, StatusCode::OK);
    let v = body["views"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "installs_hourly")
        .unwrap()
        .clone();
    assert_eq!(v["granularity"], "hour");
    assert_eq!(v["filter"], "event_name = 'install'");
    assert_eq!(
        v["coverage"]["days"],
        serde_json::json!([{"from": "2024-10-04", "to": "2024-10-04"}])
    );
    assert_eq!(v["definition_hash"].as_str().unwrap().len(), 24);
}

#[tokio::test]
async fn csv_by_accept_header() {
    let req = Request::get(
        "/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-05&metrics=installs",
    )
    .header("accept", "text/csv")
    .body(Body::empty())
    .unwrap();
    let (status, body) = call(req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body.as_str().unwrap(),
        "bucket,source,installs\n2024-10-04T00:00:00Z,batch,10\n2024-10-04T01:00:00Z,batch,20\n"
    );
}

#[tokio::test]
async fn freshness_and_incomplete_partitions_are_reported() {
    let (status, body) =
        get("/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&metrics=installs").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["meta"]["speed_lag_ms"], 42);
    assert_eq!(
        body["meta"]["speed_lag_ms_by_partition"],
        serde_json::json!({"0": 7, "3": 42})
    );
    assert_eq!(body["meta"]["stale_partitions"], serde_json::json!([3]));
    assert_eq!(
        body["meta"]["definition_hash"],
        catalog().views["installs_hourly"].definition_hash.as_str()
    );
    let (status, text) = get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap();
    assert!(text.contains("\ntandem_speed_lag_ms 42\n"), "{text}");
    assert!(
        text.contains("\ntandem_speed_partition_lag_ms{partition=\"0\"} 7\n"),
        "{text}"
    );
    assert!(
        text.contains("\ntandem_speed_stale_partitions 1\n"),
        "{text}"
    );
    assert!(text.contains("\ntandem_api_queries_total "), "{text}");
}

#[tokio::test]
async fn arrow_stream_answers_the_same_as_json() {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::UInt64Type;
    use datafusion::arrow::ipc::reader::StreamReader;

    let uri = "/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&group_by=country";
    let (status, json) = get(uri).await;
    assert_eq!(status, StatusCode::OK);
    let req = Request::get(uri)
        .header("accept", crate::render::ARROW_STREAM)
        .body(Body::empty())
        .unwrap();
    let resp = app().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], crate::render::ARROW_STREAM);
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let batches: Vec<_> = StreamReader::try_new(std::io::Cursor::new(bytes), None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(batches.len(), 1);
    let b = &batches[0];
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(b.num_rows(), rows.len());
    let meta: Value = serde_json::from_str(&b.schema().metadata()["tandem.meta"]).unwrap();
    assert_eq!(meta, json["meta"]);
    let source = b.column_by_name("source").unwrap().as_string::<i32>();
    let country = b.column_by_name("country").unwrap().as_string::<i32>();
    let installs = b
        .column_by_name("installs")
        .unwrap()
        .as_primitive::<UInt64Type>();
    let devices = b.column_by_name("devices").unwrap().as_struct();
    let device_values = devices.column(0).as_primitive::<UInt64Type>();
    let device_exact = devices.column(1).as_boolean();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(source.value(i), r["source"]);
        assert_eq!(country.value(i), r["dims"]["country"]);
        assert_eq!(
            installs.value(i),
            r["metrics"]["installs"].as_u64().unwrap()
        );
        assert_eq!(
            device_values.value(i),
            r["metrics"]["devices"]["value"].as_u64().unwrap()
        );
        assert_eq!(
            device_exact.value(i),
            r["metrics"]["devices"]["exact"].as_bool().unwrap()
        );
    }
    assert!(!devices.is_null(0));

    let (status, body) = get(&format!("{uri}&format=parquet")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["detail"].as_str().unwrap().contains("arrow"), "{body}");
}

#[tokio::test]
async fn unknown_parameters_are_refused_by_name() {
    let (status, body) = get("/v1/views/installs_hourly/query?colour=red").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"].as_str().unwrap().contains("`colour`"),
        "{body}"
    );
    let post = Request::post("/v1/views/installs_hourly/query")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"from":"2024-10-04","shape":"round"}"#))
        .unwrap();
    let (status, body) = call(post).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"].as_str().unwrap().contains("`shape`"),
        "{body}"
    );
}

#[tokio::test]
async fn the_routers_own_refusals_are_problems_too() {
    // A method the route does not take.
    let (status, body) = call(
        Request::delete("/v1/views/installs_hourly/query")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(
        body["detail"].as_str().unwrap().contains("DELETE"),
        "{body}"
    );
    // A path that is not UTF-8 once decoded.
    let (status, body) = get("/v1/views/%FF%FE/query").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["status"], 400);
    // A request target or headers too large.
    let long = format!(
        "/v1/views/installs_hourly/query?filter=country={}",
        "x".repeat(crate::error::MAX_URI_LEN)
    );
    let (status, body) = get(&long).await;
    assert_eq!(status, StatusCode::URI_TOO_LONG);
    assert_eq!(body["status"], 414);
    let mut req = Request::get("/livez");
    for i in 0..40 {
        req = req.header(format!("x-filler-{i}"), "y".repeat(1_000));
    }
    let (status, body) = call(req.body(Body::empty()).unwrap()).await;
    assert_eq!(status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(body["status"], 431);
}

/// A batch layer whose store fails: unreachable (a retry may help) or corrupt (a bug).
#[derive(Debug)]
struct FailingBatch {
    unreachable: bool,
}

#[async_trait]
impl BatchViews for FailingBatch {
    async fn coverage(&self, _: &ViewDef) -> tandem_core::Result<Coverage> {
        Err(if self.unreachable {
            tandem_core::CoreError::ObjectStore {
                url: "s3://bucket/views/v/".into(),
                source: Box::new(object_store::Error::Generic {
                    store: "S3",
                    source: "connection refused".into(),
                }),
            }
        } else {
            tandem_core::CoreError::Internal("a view table without its bucket column".into())
        })
    }
    async fn query(
        &self,
        _: &ViewDef,
        _: &ViewQuery,
        _: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        Ok(Vec::new())
    }
}

/// A speed layer that is not there (a `serve` process has none).
#[derive(Debug)]
struct NoSpeed;

impl RealtimeView for NoSpeed {
    fn query(&self, _: &ViewDef, _: &ViewQuery, _: &Coverage) -> tandem_core::Result<Vec<AggRow>> {
        Ok(Vec::new())
    }
    fn status(&self) -> RealtimeStatus {
        RealtimeStatus::default()
    }
}

#[tokio::test]
async fn an_unreachable_store_degrades_the_answer_to_the_speed_layer() {
    let d = DAY * DAY_US;
    let app = router(state(
        Arc::new(FailingBatch { unreachable: true }),
        Arc::new(FakeSpeed(vec![(d, 7), (d + DAY_US, 5)])),
    ));
    let resp = app
        .oneshot(
            Request::get(
                "/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&metrics=installs",
            )
            .body(Body::empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let degraded = body["meta"]["degraded"].as_array().unwrap();
    assert_eq!(degraded.len(), 1, "{body}");
    assert!(degraded[0]
        .as_str()
        .unwrap()
        .contains("batch views are unreachable"));
    let installs: Vec<_> = body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["source"].clone(), r["metrics"]["installs"].clone()))
        .collect();
    assert_eq!(
        installs,
        [("speed".into(), 7.into()), ("speed".into(), 5.into())],
        "{body}"
    );
}

#[tokio::test]
async fn an_unreachable_store_without_a_speed_layer_is_a_503_with_retry_after_and_a_bug_a_500() {
    for (unreachable, want) in [
        (true, StatusCode::SERVICE_UNAVAILABLE),
        (false, StatusCode::INTERNAL_SERVER_ERROR),
    ] {
        let app = router(state(
            Arc::new(FailingBatch { unreachable }),
            Arc::new(NoSpeed),
        ));
        let resp = app
            .oneshot(
                Request::get("/v1/views/installs_hourly/query?from=2024-10-04")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), want);
        assert_eq!(
            resp.headers().contains_key("retry-after"),
            unreachable,
            "{want}"
        );
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        // The cause is logged, not sent.
        let detail = body["detail"].as_str().unwrap();
        assert!(
            !detail.contains("refused") && !detail.contains("bucket column"),
            "{detail}"
        );
    }
}

/// A batch layer that takes its time.
#[derive(Debug)]
struct SlowBatch(std::time::Duration);

#[async_trait]
impl BatchViews for SlowBatch {
    async fn coverage(&self, _: &ViewDef) -> tandem_core::Result<Coverage> {
        tokio::time::sleep(self.0).await;
        Ok(Coverage::default())
    }
    async fn query(
        &self,
        _: &ViewDef,
        _: &ViewQuery,
        _: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn queries_beyond_the_limits_are_refused_with_503_and_the_probes_still_answer() {
    use std::time::Duration;
    let app = |delay_ms: u64, limits: crate::QueryLimits| {
        crate::router_with(
            state(
                Arc::new(SlowBatch(Duration::from_millis(delay_ms))),
                Arc::new(FakeSpeed(Vec::new())),
            ),
            limits,
        )
    };
    let query = || {
        Request::get("/v1/views/installs_hourly/query?from=2024-10-04")
            .body(Body::empty())
            .unwrap()
    };
    let one_at_a_time = app(
        400,
        crate::QueryLimits {
            max_concurrent: 1,
            timeout: Duration::from_secs(10),
        },
    );
    let first = tokio::spawn(one_at_a_time.clone().oneshot(query()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = one_at_a_time.clone().oneshot(query()).await.unwrap();
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(second.headers().contains_key("retry-after"));
    let body = second.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("at once"),
        "{body}"
    );
    let probe = |path: &'static str| {
        let app = one_at_a_time.clone();
        async move {
            let resp = app
                .oneshot(Request::get(path).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&body).to_string())
        }
    };
    assert_eq!(probe("/livez").await.0, StatusCode::OK);
    // Saturated: not ready, and it says why.
    let (status, body) = probe("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("1 in flight"), "{body}");
    assert_eq!(first.await.unwrap().unwrap().status(), StatusCode::OK);
    assert_eq!(probe("/readyz").await, (StatusCode::OK, "ok".to_string()));

    let impatient = app(
        2_000,
        crate::QueryLimits {
            max_concurrent: 4,
            timeout: Duration::from_millis(100),
        },
    );
    let resp = impatient.oneshot(query()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("longer than 100 ms"),
        "{body}"
    );
}

#[tokio::test]
async fn readyz_reports_every_failing_check() {
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = Arc::clone(&failing);
    let mut state = state(
        Arc::new(FakeBatch(Vec::new(), BTreeSet::new())),
        Arc::new(FakeSpeed(Vec::new())),
    );
    state.readiness = Arc::new(crate::Readiness::default().with(
        "archiver `app_events`",
        Box::new(move || {
            flag.load(std::sync::atomic::Ordering::Relaxed)
                .then(|| "no commit for 31 s with 5 messages pending".to_string())
        }),
    ));
    // The admin listener's routes tell the same.
    let admin = crate::admin_router(state.clone(), Default::default());
    let app = router(state);
    for app in [&app, &admin] {
        let resp = app
            .clone()
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body["detail"],
            "archiver `app_events`: no commit for 31 s with 5 messages pending"
        );
    }
    failing.store(false, std::sync::atomic::Ordering::Relaxed);
    for app in [&app, &admin] {
        let resp = app
            .clone()
            .oneshot(Request::get("/readyz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // The admin listener serves nothing else.
    let resp = admin
        .oneshot(
            Request::get("/v1/views/installs_hourly/query")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

/// A batch layer whose version and rows the test changes.
#[derive(Debug)]
struct VersionedBatch(std::sync::Mutex<(i64, Vec<(i64, u64)>)>);

#[async_trait]
impl BatchViews for VersionedBatch {
    async fn coverage(&self, _: &ViewDef) -> tandem_core::Result<Coverage> {
        Ok(Coverage {
            version: Some(self.0.lock().unwrap().0),
            days: [DAY].into(),
            published_us: None,
        })
    }
    async fn query(
        &self,
        _: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        let (version, hours) = self.0.lock().unwrap().clone();
        assert_eq!(coverage.version, Some(version));
        Ok(rows(&hours, q))
    }
}

/// A speed layer with a generation, counting the queries it answers.
#[derive(Debug, Default)]
struct CountingSpeed {
    state: std::sync::Mutex<(u64, Vec<(i64, u64)>)>,
    queries: std::sync::atomic::AtomicUsize,
    lag_ms: std::sync::atomic::AtomicI64,
    /// While true, queries wait (a slow computation).
    held: std::sync::Mutex<bool>,
    released: std::sync::Condvar,
}

impl RealtimeView for CountingSpeed {
    fn query(&self, _: &ViewDef, q: &ViewQuery, _: &Coverage) -> tandem_core::Result<Vec<AggRow>> {
        let hours = self.state.lock().unwrap().1.clone();
        self.queries
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.released.wait(held).unwrap();
        }
        Ok(rows(&hours, q)
            .into_iter()
            .filter(|r| q.in_range(r.bucket_us))
            .collect())
    }
    fn status(&self) -> RealtimeStatus {
        RealtimeStatus {
            lag_ms: Some(self.lag_ms.load(std::sync::atomic::Ordering::SeqCst)),
            stale_partitions: Vec::new(),
            available: true,
            ..Default::default()
        }
    }
    fn generation(&self, _: &ViewDef) -> Option<u64> {
        Some(self.state.lock().unwrap().0)
    }
}

/// The installs of `installs_hourly` from 2024-10-04 to `to_ms`, summed over the answer's
/// rows, and the answer's `speed_lag_ms`.
async fn installs_and_lag(app: axum::Router, to_ms: i64) -> (u64, i64) {
    let uri =
        format!("/v1/views/installs_hourly/query?from=2024-10-04&to={to_ms}&metrics=installs");
    let resp = app
        .oneshot(Request::get(uri).body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    let total: u64 = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metrics"]["installs"].as_u64().unwrap())
        .sum();
    (total, v["meta"]["speed_lag_ms"].as_i64().unwrap())
}

/// An answer is reused while the batch version and the speed state it came from stand, and
/// never after either changes; its freshness (`speed_lag_ms`) is always the request's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_reused_only_while_their_batch_version_and_speed_state_stand() {
    use std::sync::atomic::Ordering::SeqCst;
    let d = DAY * DAY_US;
    let batch = Arc::new(VersionedBatch(std::sync::Mutex::new((
        3,
        vec![(d, 10), (d + HOUR_US, 20)],
    ))));
    let speed = Arc::new(CountingSpeed::default());
    speed.state.lock().unwrap().1 = vec![(d + DAY_US, 5)];
    let app = router(state(
        Arc::clone(&batch) as Arc<dyn BatchViews>,
        Arc::clone(&speed) as Arc<dyn RealtimeView>,
    ));
    let ask = |to_minute: i64| {
        let to = (d + DAY_US + 11 * HOUR_US) / 1000 + to_minute * 60_000;
        installs_and_lag(app.clone(), to)
    };
    speed.lag_ms.store(100, SeqCst);
    assert_eq!(ask(1).await, (35, 100));
    assert_eq!(speed.queries.load(SeqCst), 1);
    // The same buckets (a `to` later within the same hour): reused, with today's freshness.
    speed.lag_ms.store(250, SeqCst);
    assert_eq!(ask(20).await, (35, 250));
    assert_eq!(speed.queries.load(SeqCst), 1, "answered from the cache");
    // An event applied: a new generation, answered afresh.
    *speed.state.lock().unwrap() = (1, vec![(d + DAY_US, 5), (d + DAY_US + HOUR_US, 1)]);
    assert_eq!(ask(20).await.0, 36);
    assert_eq!(speed.queries.load(SeqCst), 2);
    // A new publish: answered from it.
    *batch.0.lock().unwrap() = (4, vec![(d, 100)]);
    assert_eq!(ask(20).await.0, 106);
    assert_eq!(speed.queries.load(SeqCst), 3);
    // One more hour in range: other buckets, another answer.
    assert_eq!(ask(61).await.0, 106);
    assert_eq!(speed.queries.load(SeqCst), 4);
}

/// While one request computes the answer of newer speed state, the others get the newest
/// answer at once, with the freshness it was computed at; the one that computes gets the new
/// answer, and so does everyone after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_a_computation_get_the_newest_answer_with_its_own_freshness() {
    use std::sync::atomic::Ordering::SeqCst;
    let d = DAY * DAY_US;
    let batch = Arc::new(VersionedBatch(std::sync::Mutex::new((3, vec![(d, 10)]))));
    let speed = Arc::new(CountingSpeed::default());
    speed.state.lock().unwrap().1 = vec![(d + DAY_US, 5)];
    let app = router(state(
        Arc::clone(&batch) as Arc<dyn BatchViews>,
        Arc::clone(&speed) as Arc<dyn RealtimeView>,
    ));
    let ask = |app: axum::Router| installs_and_lag(app, (d + 2 * DAY_US) / 1000);
    speed.lag_ms.store(100, SeqCst);
    assert_eq!(ask(app.clone()).await, (15, 100));

    // An event applied (fresher now), and its answer slow to compute.
    *speed.state.lock().unwrap() = (1, vec![(d + DAY_US, 5), (d + DAY_US + HOUR_US, 1)]);
    speed.lag_ms.store(40, SeqCst);
    *speed.held.lock().unwrap() = true;
    let first = tokio::spawn(ask(app.clone()));
    let started = std::time::Instant::now();
    while speed.queries.load(SeqCst) < 2 {
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    // Meanwhile: the answer before the event, as fresh as it was (older now), not the speed
    // layer's freshness of now.
    let (total, lag) = ask(app.clone()).await;
    assert_eq!(total, 15);
    assert!(lag >= 100, "the older answer's own lag, aged: {lag}");
    assert!(!first.is_finished());
    *speed.held.lock().unwrap() = false;
    speed.released.notify_all();
    assert_eq!(first.await.unwrap(), (16, 40));
    // From then on, the new answer, reused.
    assert_eq!(ask(app.clone()).await, (16, 40));
    assert_eq!(speed.queries.load(SeqCst), 2);
    let metrics = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = metrics.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("tandem_api_answers_total{outcome=\"behind\"} 1"),
        "{text}"
    );
}

/// Rows of installs_hourly by (bucket, value, n): every group-by dimension takes `value`;
/// `installs` = n, `devices` counts n distinct devices.
#[derive(Debug)]
struct Keyed(Vec<(i64, &'static str, u64)>, BTreeSet<i64>);

impl Keyed {
    fn rows(&self, q: &ViewQuery) -> Vec<AggRow> {
        self.0
            .iter()
            .map(|&(bucket_us, value, n)| AggRow {
                bucket_us,
                dims: q.group_by.iter().map(|_| Some(value.to_string())).collect(),
                states: q
                    .metrics
                    .iter()
                    .map(|&m| {
                        if m == 0 {
                            MetricState::Count(n)
                        } else {
                            let mut d = tandem_core::metric::DistinctState::new(12);
                            (0..n).for_each(|i| d.update_str(&format!("{value}{i}")));
                            MetricState::Distinct(Box::new(d))
                        }
                    })
                    .collect(),
            })
            .collect()
    }
}

#[async_trait]
impl BatchViews for Keyed {
    async fn coverage(&self, _: &ViewDef) -> tandem_core::Result<Coverage> {
        Ok(Coverage {
            version: Some(1),
            days: self.1.clone(),
            published_us: None,
        })
    }
    async fn query(
        &self,
        _: &ViewDef,
        q: &ViewQuery,
        _: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        Ok(self.rows(q))
    }
}

impl RealtimeView for Keyed {
    fn query(&self, _: &ViewDef, q: &ViewQuery, _: &Coverage) -> tandem_core::Result<Vec<AggRow>> {
        Ok(self.rows(q))
    }
    fn status(&self) -> RealtimeStatus {
        RealtimeStatus::default()
    }
}

#[tokio::test]
async fn answers_built_from_a_settled_part_equal_answers_merged_whole() {
    use crate::answer::{answer, Settled};
    use crate::render::{to_arrow, JsonRows};
    use tandem_core::query::OrderBy;
    use tandem_core::view::Granularity;

    let catalog = catalog();
    let view = catalog.view("installs_hourly").unwrap();
    let d = |day: i64, hour: i64| (DAY + day) * DAY_US + hour * HOUR_US;
    // The batch covers DAY and DAY+1 (and holds a row of DAY+2 it must not answer); speed
    // holds DAY+1 (covered: never served) and DAY+2, DAY+3.
    let batch = Keyed(
        vec![
            (d(0, 0), "a", 5),
            (d(0, 0), "b", 9),
            (d(0, 5), "a", 2),
            (d(1, 3), "c", 7),
            (d(1, 3), "a", 1),
            (d(2, 1), "a", 100),
        ],
        [DAY, DAY + 1].into(),
    );
    let speed = Keyed(
        vec![
            (d(1, 3), "a", 50),
            (d(2, 1), "a", 3),
            (d(2, 1), "b", 8),
            (d(2, 2), "c", 4),
            (d(3, 0), "b", 6),
        ],
        BTreeSet::new(),
    );
    let coverage = BatchViews::coverage(&batch, view).await.unwrap();
    let mut checked = 0;
    let granularities = [
        Granularity::Hour,
        Granularity::Day,
        Granularity::Week,
        Granularity::Month,
        Granularity::All,
    ];
    for granularity in granularities {
        for group_by in [vec![], vec![1], vec![0, 2]] {
            for order_by in [
                OrderBy::Bucket { descending: false },
                OrderBy::Bucket { descending: true },
                OrderBy::Metric {
                    index: 0,
                    descending: true,
                },
                OrderBy::Metric {
                    index: 1,
                    descending: false,
                },
            ] {
                for (limit, other) in [1, 3, 100]
                    .into_iter()
                    .flat_map(|l| [(l, false), (l, true)])
                {
                    for (from, to) in [(d(0, 0), d(4, 0)), (d(0, 3), d(2, 2))] {
                        let mut q = ViewQuery::all(view, from, to);
                        q.other = other;
                        q.granularity = granularity;
                        q.group_by = group_by.clone();
                        q.order_by = order_by.clone();
                        q.limit = limit;
                        let whole =
                            crate::merge::answer_at(view, &q, coverage.clone(), &batch, &speed)
                                .await
                                .unwrap();
                        let expected = to_arrow(&whole, view).unwrap();
                        let settled =
                            Arc::new(Settled::compute(view, &q, &coverage, &batch).await.unwrap());
                        let got = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
                        let case = format!("{q:?}");
                        assert_eq!(got.result.truncated, whole.truncated, "{case}");
                        assert_eq!(got.batch().unwrap().columns(), expected.columns(), "{case}");
                        assert_eq!(
                            got.json_rows().concat(),
                            JsonRows::print(q.group_by.len(), q.other, &expected)
                                .joined()
                                .to_vec(),
                            "{case}"
                        );
                        // The gzip rows, deflated from the parts, inflate to the same, also
                        // when the next answer reuses the parts' deflated runs.
                        let again = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
                        for a in [&got, &again] {
                            let member = crate::gzip::member(&[a.gzip().unwrap()]).concat();
                            let mut inflated = Vec::new();
                            std::io::Read::read_to_end(
                                &mut flate2::read::GzDecoder::new(&member[..]),
                                &mut inflated,
                            )
                            .unwrap();
                            assert_eq!(inflated, got.json_rows().concat(), "{case}");
                        }
                        checked += 1;
                    }
                }
            }
        }
    }
    assert_eq!(checked, 5 * 3 * 4 * 6 * 2);
}

#[tokio::test]
async fn a_client_accepting_gzip_gets_the_same_answer_gzipped_with_its_length() {
    use std::io::Read;

    let app = app();
    let uri = "/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&group_by=country";
    let fetch = |encoding: Option<&'static str>| {
        let app = app.clone();
        async move {
            let mut req = Request::get(uri);
            if let Some(e) = encoding {
                req = req.header("accept-encoding", e);
            }
            let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let headers = resp.headers().clone();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let length: usize = headers["content-length"].to_str().unwrap().parse().unwrap();
            assert_eq!(length, bytes.len());
            assert_eq!(headers["vary"], "accept-encoding");
            (headers.get("content-encoding").cloned(), bytes)
        }
    };
    let (plain_encoding, plain) = fetch(None).await;
    assert_eq!(plain_encoding, None);
    let plain: Value = serde_json::from_slice(&plain).unwrap();
    assert!(!plain["rows"].as_array().unwrap().is_empty(), "{plain}");
    // Every time alike.
    for _ in 0..2 {
        let (encoding, gz) = fetch(Some("br, gzip;q=0.8")).await;
        assert_eq!(encoding.unwrap(), "gzip");
        let mut json = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut json)
            .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&json).unwrap(), plain);
    }
    let (refused, _) = fetch(Some("gzip;q=0")).await;
    assert_eq!(refused, None);
}

/// A speed layer with bucket stamps, counting the buckets it is asked to read.
#[derive(Debug)]
struct Stamped {
    rows: std::sync::Mutex<Vec<(i64, &'static str, u64)>>,
    stamps: std::sync::Mutex<std::collections::BTreeMap<i64, u64>>,
    read: std::sync::Mutex<Vec<i64>>,
}

impl Stamped {
    fn keyed(&self) -> Keyed {
        Keyed(self.rows.lock().unwrap().clone(), BTreeSet::new())
    }
}

impl RealtimeView for Stamped {
    fn query(&self, v: &ViewDef, q: &ViewQuery, c: &Coverage) -> tandem_core::Result<Vec<AggRow>> {
        let buckets: Vec<i64> = self.stamps.lock().unwrap().keys().copied().collect();
        self.query_buckets(v, q, c, &buckets)
    }
    fn query_buckets(
        &self,
        _: &ViewDef,
        q: &ViewQuery,
        c: &Coverage,
        buckets: &[i64],
    ) -> tandem_core::Result<Vec<AggRow>> {
        self.read.lock().unwrap().extend(buckets);
        Ok(self
            .keyed()
            .rows(q)
            .into_iter()
            .filter(|r| buckets.contains(&r.bucket_us) && !c.covers(r.bucket_us))
            .collect())
    }
    fn bucket_stamps(
        &self,
        _: &ViewDef,
        q: &ViewQuery,
        c: &Coverage,
    ) -> Option<std::collections::BTreeMap<i64, u64>> {
        let mut stamps = self.stamps.lock().unwrap().clone();
        stamps.retain(|b, _| q.in_range(*b) && !c.covers(*b));
        Some(stamps)
    }
    fn status(&self) -> RealtimeStatus {
        RealtimeStatus::default()
    }
}

#[tokio::test]
async fn an_answer_rereads_only_the_speed_buckets_whose_stamp_changed() {
    use crate::answer::{answer, Settled};

    let catalog = catalog();
    let view = catalog.view("installs_hourly").unwrap();
    let h = |hour: i64| (DAY + 1) * DAY_US + hour * HOUR_US;
    let batch = Keyed(vec![(DAY * DAY_US, "a", 5)], [DAY].into());
    let speed = Stamped {
        rows: std::sync::Mutex::new(vec![(h(0), "a", 1), (h(1), "b", 2), (h(2), "a", 3)]),
        stamps: std::sync::Mutex::new([(h(0), 1), (h(1), 2), (h(2), 3)].into()),
        read: Default::default(),
    };
    let coverage = BatchViews::coverage(&batch, view).await.unwrap();
    let mut q = ViewQuery::all(view, DAY * DAY_US, (DAY + 2) * DAY_US);
    q.group_by = vec![1];
    let settled = Arc::new(Settled::compute(view, &q, &coverage, &batch).await.unwrap());
    let expect = |speed: &Stamped| {
        let (batch, speed) = (&batch, speed.keyed());
        let (q, coverage) = (q.clone(), coverage.clone());
        async move {
            let whole = crate::merge::answer_at(view, &q, coverage, batch, &speed)
                .await
                .unwrap();
            crate::render::to_arrow(&whole, view).unwrap()
        }
    };

    let first = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
    assert_eq!(
        first.batch().unwrap().columns(),
        expect(&speed).await.columns()
    );
    assert_eq!(
        std::mem::take(&mut *speed.read.lock().unwrap()),
        vec![h(0), h(1), h(2)]
    );

    // An event lands in hour 1: only that bucket is read again.
    speed.rows.lock().unwrap().push((h(1), "c", 4));
    speed.stamps.lock().unwrap().insert(h(1), 4);
    let second = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
    assert_eq!(
        second.batch().unwrap().columns(),
        expect(&speed).await.columns()
    );
    assert_eq!(
        second.batch().unwrap().num_rows(),
        first.batch().unwrap().num_rows() + 1
    );
    assert_eq!(std::mem::take(&mut *speed.read.lock().unwrap()), vec![h(1)]);

    // Unchanged: nothing is read.
    let third = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
    assert_eq!(
        third.batch().unwrap().columns(),
        second.batch().unwrap().columns()
    );
    assert!(speed.read.lock().unwrap().is_empty());

    // A bucket gone (pruned) is no longer answered.
    speed.rows.lock().unwrap().retain(|r| r.0 != h(2));
    speed.stamps.lock().unwrap().remove(&h(2));
    let fourth = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
    assert_eq!(
        fourth.batch().unwrap().columns(),
        expect(&speed).await.columns()
    );
    assert!(speed.read.lock().unwrap().is_empty());
}

/// Weeks (from Monday), months and `all` roll up the hours of both layers, also where a
/// bucket is partly covered by the batch and partly answered by speed.
#[tokio::test]
async fn weeks_months_and_all_roll_up_both_layers() {
    use crate::answer::{answer, Settled};
    use tandem_core::query::Source;
    use tandem_core::view::Granularity;

    let catalog = catalog();
    let view = catalog.view("installs_hourly").unwrap();
    let d = |day: i64, hour: i64| (DAY + day) * DAY_US + hour * HOUR_US;
    // DAY is Friday 2024-10-04; the batch covers Friday to Sunday.
    let batch = Keyed(
        vec![(d(0, 1), "a", 1), (d(1, 2), "a", 2), (d(2, 3), "b", 4)],
        [DAY, DAY + 1, DAY + 2].into(),
    );
    let speed = Keyed(
        vec![
            (d(2, 5), "a", 100), // covered: never served
            (d(3, 1), "a", 8),   // Monday 2024-10-07
            (d(27, 0), "b", 16), // Thursday 2024-10-31
            (d(28, 0), "a", 32), // Friday 2024-11-01
        ],
        BTreeSet::new(),
    );
    let coverage = BatchViews::coverage(&batch, view).await.unwrap();
    let day = |s: &str| tandem_core::time::parse_instant(s).unwrap();
    for (g, expected) in [
        (
            Granularity::Week,
            vec![
                (day("2024-09-30"), 7, Source::Batch),
                (day("2024-10-07"), 8, Source::Speed),
                (day("2024-10-28"), 48, Source::Speed),
            ],
        ),
        (
            Granularity::Month,
            vec![
                (day("2024-10-01"), 31, Source::Mixed),
                (day("2024-11-01"), 32, Source::Speed),
            ],
        ),
        (Granularity::All, vec![(d(0, 0), 63, Source::Mixed)]),
    ] {
        let mut q = ViewQuery::all(view, d(0, 0), d(29, 0));
        q.granularity = g;
        q.metrics = vec![0];
        let whole = crate::merge::answer_at(view, &q, coverage.clone(), &batch, &speed)
            .await
            .unwrap();
        let got: Vec<(i64, u64, Source)> = whole
            .rows
            .iter()
            .map(|r| match r.states[0] {
                MetricState::Count(n) => (r.bucket_us, n, r.source),
                _ => panic!("installs is a count"),
            })
            .collect();
        assert_eq!(got, expected, "{g}");
        // Built from a settled part and the speed's rows, the answer is the same.
        let settled = Arc::new(Settled::compute(view, &q, &coverage, &batch).await.unwrap());
        let split = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
        let expected = crate::render::to_arrow(&whole, view).unwrap();
        assert_eq!(split.batch().unwrap().columns(), expected.columns(), "{g}");
    }
    // A view stores minute, hour or day buckets only.
    let (status, body) =
        get("/v1/views/installs_hourly/query?from=2024-10-04&granularity=fortnight").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("week, month or all"),
        "{body}"
    );
}

/// Days in a time zone: New York's 2024-10-04 runs from 04:00 UTC that day to 04:00 UTC the
/// next, so it holds a covered UTC day's batch rows and the next UTC day's speed rows.
#[tokio::test]
async fn days_in_a_time_zone_take_their_hours_from_both_layers() {
    use crate::answer::{answer, Settled};
    use tandem_core::query::Source;
    use tandem_core::view::Granularity;

    let catalog = catalog();
    let view = catalog.view("installs_hourly").unwrap();
    let d = |day: i64, hour: i64| (DAY + day) * DAY_US + hour * HOUR_US;
    let batch = Keyed(
        vec![(d(0, 3), "a", 1), (d(0, 4), "a", 2), (d(0, 23), "a", 4)],
        [DAY].into(),
    );
    let speed = Keyed(
        vec![(d(1, 3), "a", 8), (d(1, 4), "a", 16), (d(1, 5), "a", 32)],
        BTreeSet::new(),
    );
    let coverage = BatchViews::coverage(&batch, view).await.unwrap();
    let mut q = ViewQuery::all(view, d(-1, 0), d(3, 0));
    q.granularity = Granularity::Day;
    q.tz = Some(chrono_tz::America::New_York);
    q.metrics = vec![0];
    let whole = crate::merge::answer_at(view, &q, coverage.clone(), &batch, &speed)
        .await
        .unwrap();
    let got: Vec<(i64, u64, Source)> = whole
        .rows
        .iter()
        .map(|r| match r.states[0] {
            MetricState::Count(n) => (r.bucket_us, n, r.source),
            _ => panic!("installs is a count"),
        })
        .collect();
    assert_eq!(
        got,
        [
            (d(-1, 4), 1, Source::Batch), // New York's 2024-10-03
            (d(0, 4), 14, Source::Mixed), // 2024-10-04: 2 + 4 from batch, 8 from speed
            (d(1, 4), 48, Source::Speed), // 2024-10-05
        ]
    );
    let settled = Arc::new(Settled::compute(view, &q, &coverage, &batch).await.unwrap());
    let split = answer(view, &q, coverage.clone(), &settled, &speed).unwrap();
    let expected = crate::render::to_arrow(&whole, view).unwrap();
    assert_eq!(split.batch().unwrap().columns(), expected.columns());
}

#[tokio::test]
async fn totals_come_beside_the_rows_in_json_plain_or_gzipped() {
    use std::io::Read;

    // Two groups a bucket; the totals hold every group, also those cut by the limit.
    let d = |day: i64, hour: i64| (DAY + day) * DAY_US + hour * HOUR_US;
    let batch = Keyed(
        vec![(d(0, 1), "a", 1), (d(0, 1), "b", 2), (d(0, 2), "a", 4)],
        [DAY].into(),
    );
    let speed = Keyed(vec![(d(1, 0), "b", 8), (d(1, 0), "c", 16)], BTreeSet::new());
    let app = router(state(Arc::new(batch), Arc::new(speed)));
    let uri = "/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&group_by=country\
               &metrics=installs&order_by=-installs&limit=2&totals=true";
    let fetch = |uri: &'static str, encoding: &'static str| {
        let app = app.clone();
        async move {
            let req = Request::get(uri).header("accept-encoding", encoding);
            let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            let status = resp.status();
            let gz = resp.headers().get("content-encoding").is_some();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            let mut text = String::new();
            if gz {
                flate2::read::GzDecoder::new(&bytes[..])
                    .read_to_string(&mut text)
                    .unwrap();
            } else {
                text = String::from_utf8(bytes.to_vec()).unwrap();
            }
            (status, serde_json::from_str::<Value>(&text).unwrap())
        }
    };
    let (status, plain) = fetch(uri, "identity").await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    assert_eq!(plain["rows"].as_array().unwrap().len(), 2);
    assert_eq!(plain["meta"]["truncated"], true);
    let totals: Vec<(String, u64)> = plain["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["dims"], serde_json::json!({}));
            (
                r["bucket"].as_str().unwrap().to_string(),
                r["metrics"]["installs"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        totals,
        [
            ("2024-10-04T01:00:00Z".to_string(), 3),
            ("2024-10-04T02:00:00Z".to_string(), 4),
            ("2024-10-05T00:00:00Z".to_string(), 24),
        ]
    );
    let (_, gzipped) = fetch(uri, "gzip").await;
    assert_eq!(gzipped, plain);

    // Totals are JSON's only.
    let (status, body) = fetch(
        "/v1/views/installs_hourly/query?from=2024-10-04&totals=true&format=csv",
        "identity",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("JSON answers only"));
    let (status, body) = fetch(
        "/v1/views/installs_hourly/query?from=2024-10-04&totals=maybe",
        "identity",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["detail"].as_str().unwrap().contains("true or false"));
}

#[tokio::test]
async fn dashboards_on_another_origin_may_read_the_api() {
    let uri = "/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06";
    let preflight = Request::options(uri)
        .header("origin", "https://grafana.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .body(Body::empty())
        .unwrap();
    let resp = app().oneshot(preflight).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let h = resp.headers();
    assert_eq!(h["access-control-allow-origin"], "*");
    assert!(h["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .contains("POST"));
    let get = Request::get(uri)
        .header("origin", "https://grafana.example")
        .body(Body::empty())
        .unwrap();
    let resp = app().oneshot(get).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["access-control-allow-origin"], "*");
    // The same whatever the origin: nothing varies with it.
    assert!(resp
        .headers()
        .get("vary")
        .is_none_or(|v| !v.to_str().unwrap().contains("origin")));
}

#[tokio::test]
async fn metrics_have_latency_by_route_and_cache_outcomes() {
    let d = DAY * DAY_US;
    let speed = Arc::new(CountingSpeed::default());
    speed.state.lock().unwrap().1 = vec![(d + DAY_US, 5)];
    let app = router(state(
        Arc::new(FakeBatch(vec![(d, 10)], [DAY].into())),
        speed,
    ));
    let send = |uri: &str| {
        let app = app.clone();
        let req = Request::get(uri).body(Body::empty()).unwrap();
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let uri = "/v1/views/installs_hourly/query?from=2024-10-04&to=2024-10-06&metrics=installs";
    for _ in 0..3 {
        assert_eq!(send(uri).await.0, StatusCode::OK);
    }
    assert_eq!(send("/v1/views/nope/query").await.0, StatusCode::NOT_FOUND);
    let (status, text) = send("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let line = |prefix: &str| {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no `{prefix}` in:\n{text}"))
            .to_string()
    };
    // Labels in the order they are declared: route, method, status.
    let count = line(
        "tandem_api_request_seconds_count{route=\"/v1/views/{view}/query\",method=\"GET\",status=\"2xx\"}",
    );
    assert!(count.ends_with(" 3"), "{count}");
    line("tandem_api_request_seconds_count{route=\"/v1/views/{view}/query\",method=\"GET\",status=\"4xx\"}");
    line("tandem_api_request_seconds_bucket{");
    assert!(line("tandem_api_answers_total{outcome=\"miss\"}").ends_with(" 1"));
    assert!(line("tandem_api_answers_total{outcome=\"hit\"}").ends_with(" 2"));
    line("tandem_api_answer_compute_seconds_count");
    assert!(!text.contains("# EOF"));
}

/// `docs/openapi.json` is the served description (`UPDATE_SNAPSHOTS=1` rewrites it), every
/// route it describes is served, and `docs/api.md` names every route and query parameter.
#[tokio::test]
async fn the_openapi_description_is_served_documented_and_true_to_the_routes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let served = crate::openapi::spec_json();
    let snapshot = root.join("docs/openapi.json");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&snapshot, served).unwrap();
    }
    assert!(
        std::fs::read_to_string(&snapshot).unwrap_or_default() == served,
        "docs/openapi.json differs from the served description; rerun with UPDATE_SNAPSHOTS=1"
    );
    let (status, body) = get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    let spec: Value = serde_json::from_str(served).unwrap();
    assert_eq!(body, spec);

    let api_md = std::fs::read_to_string(root.join("docs/api.md")).unwrap();
    let paths = spec["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let route = format!("`{} {path}`", method.to_uppercase());
            assert!(api_md.contains(&route), "docs/api.md lacks {route}");
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = format!("`{}`", p["name"].as_str().unwrap());
                assert!(
                    api_md.contains(&name),
                    "docs/api.md lacks {name} of {route}"
                );
            }
            // Each described route is served (not the fallback's 404).
            let uri = path.replace("{view}", "installs_hourly");
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(&uri)
                .header("content-type", "application/json")
                .body(Body::from(if method == "post" { "{}" } else { "" }))
                .unwrap();
            let (status, body) = call(req).await;
            assert!(
                status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
                "{route}: {status} {body}"
            );
            operations += 1;
        }
    }
    assert_eq!(operations, 8);
    // Every parameter docs/api.md's table lists is one the description has.
    let described: BTreeSet<String> = paths
        .values()
        .flat_map(|i| i.as_object().unwrap().values())
        .flat_map(|op| op["parameters"].as_array().cloned().unwrap_or_default())
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    let table = api_md
        .split("## Query parameters")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("docs/api.md has a section of query parameters");
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let name = line[3..].split('`').next().unwrap();
        assert!(
            described.contains(name),
            "docs/api.md lists `{name}`, which the API has not"
        );
    }
}
