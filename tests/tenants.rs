//! API keys and tenants on the real layers: a key scoped to tenant A's apps never sees tenant
//! B's rows, whatever it asks (any view, grouping, filter, granularity, limit with `other`,
//! totals) and in any format; keys are checked (401), views refused (403), rates limited (429).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{Harness, NOW_US};
use tandem_core::time::format_us;
use tandem_core::view::DAY_US;
use tandem_serving::auth::{ApiKey, Auth};
use tandem_workload::{Event, GenConfig, Generator};
use tower::ServiceExt;

const A_APP: &str = "com.tenant-a.sentinel";
const B_APP: &str = "com.tenant-b.sentinel";

fn key(name: &str, apps: &[&str], views: Option<&[&str]>, rate: Option<u32>) -> ApiKey {
    ApiKey {
        name: name.into(),
        sha256: ApiKey::hash(&format!("secret-{name}")),
        views: views.map(|v| v.iter().map(|s| s.to_string()).collect()),
        scope: BTreeMap::from([(
            "app_id".to_string(),
            apps.iter().map(|s| s.to_string()).collect(),
        )]),
        requests_per_minute: rate,
    }
}

async fn get(
    app: &axum::Router,
    uri: &str,
    key: Option<&str>,
    accept: &str,
) -> (StatusCode, Vec<u8>) {
    let mut req = Request::get(uri).header("accept", accept);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    (
        status,
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_key_never_returns_another_tenants_rows() {
    let mut h = Harness::start(&[], 2).await;
    // Generated traffic, a share of it relabelled as each tenant's sentinel app.
    let mut events: Vec<Event> = Generator::new(GenConfig {
        seed: 31,
        devices: 2_000,
        late_share: 0.0,
        ..Default::default()
    })
    .history(8_000, NOW_US - 3 * DAY_US, NOW_US)
    .collect();
    for (i, e) in events.iter_mut().enumerate() {
        match i % 5 {
            0 => e.app_id = A_APP.into(),
            1 => e.app_id = B_APP.into(),
            _ => {}
        }
    }
    h.produce(&events);
    h.settle().await;
    h.run_batch().await;
    let others: Vec<String> = events
        .iter()
        .map(|e| e.app_id.clone())
        .filter(|a| a != A_APP && a != B_APP)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .take(2)
        .collect();
    let keys = vec![
        key("a", &[A_APP, &others[0]], None, None),
        key("b", &[B_APP], None, None),
    ];
    let app = h.router_with_auth(Arc::new(Auth::new(keys, &h.catalog).unwrap()));

    let mut rng = StdRng::seed_from_u64(7);
    let (from, to) = (format_us(NOW_US - 4 * DAY_US), format_us(NOW_US + DAY_US));
    let mut saw_own = 0;
    for i in 0..150 {
        let views: Vec<_> = h.catalog.views.values().cloned().collect();
        let view = &views[rng.random_range(0..views.len())];
        let mut params = vec![format!("from={from}"), format!("to={to}")];
        let mut dims: Vec<&String> = view
            .dimensions
            .iter()
            .filter(|_| rng.random_bool(0.5))
            .collect();
        if rng.random_bool(0.3) {
            dims.clear();
        }
        if !dims.is_empty() {
            params.push(format!(
                "group_by={}",
                dims.iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            ));
        }
        params.push(
            ["granularity=day", "granularity=all", "granularity=week", ""][rng.random_range(0..4)]
                .to_string(),
        );
        // Filters that ask for B's rows outright, or around them.
        match rng.random_range(0..6) {
            0 => params.push(format!("filter=app_id={B_APP}")),
            1 => params.push(format!("filter=app_id.in={B_APP},{A_APP}")),
            2 => params.push("filter=app_id.prefix=com.".into()),
            3 => params.push(format!("filter=app_id.not_in={A_APP}")),
            _ => {}
        }
        if rng.random_bool(0.4) {
            params.push(format!("limit={}", rng.random_range(1..4)));
            if rng.random_bool(0.5) {
                params.push("other=true".into());
            }
        }
        let accept = [
            "application/json",
            "text/csv",
            "application/vnd.apache.arrow.stream",
        ][rng.random_range(0..3)];
        if accept == "application/json" && rng.random_bool(0.4) {
            params.push("totals=true".into());
        }
        let uri = format!(
            "/v1/views/{}/query?{}",
            view.name,
            params
                .into_iter()
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("&")
        );
        let (status, body) = get(&app, &uri, Some("secret-a"), accept).await;
        assert!(
            status.is_success() || status == StatusCode::BAD_REQUEST,
            "{i} {uri}: {status} {}",
            String::from_utf8_lossy(&body)
        );
        assert!(
            !contains(&body, B_APP),
            "{i} {uri} ({accept}) returned B's rows"
        );
        if contains(&body, A_APP) {
            saw_own += 1;
        }
        // The same query without a key is refused.
        let (status, _) = get(&app, &uri, None, accept).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    assert!(
        saw_own > 10,
        "A sees its own rows ({saw_own} answers named its app)"
    );

    // A's rows (the first and the `other` row) and totals are A's events, every one: the
    // scope holds for `other` rows and totals too.
    let uri = format!("/v1/views/active_devices_daily/query?from={from}&to={to}&granularity=all&group_by=app_id&limit=1&other=true&totals=true");
    let (status, body) = get(&app, &uri, Some("secret-a"), "application/json").await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let sum = |rows: &serde_json::Value| -> u64 {
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["metrics"]["events"].as_u64().unwrap())
            .sum()
    };
    let truth = events
        .iter()
        .filter(|e| e.app_id == A_APP || e.app_id == others[0])
        .count() as u64;
    assert_eq!(sum(&v["rows"]), truth, "{v}");
    assert_eq!(sum(&v["totals"]), truth, "{v}");

    // The view list shows what a key may read.
    let (_, body) = get(&app, "/v1/views", Some("secret-b"), "application/json").await;
    assert!(contains(&body, "installs_hourly"));
    let (status, _) = get(&app, "/v1/views", Some("wrong"), "application/json").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_limit_views_and_rates() {
    let h = Harness::start(&[], 1).await;
    let keys = vec![key("narrow", &[A_APP], Some(&["purchases_daily"]), Some(2))];
    let app = h.router_with_auth(Arc::new(Auth::new(keys, &h.catalog).unwrap()));
    let (from, to) = (format_us(NOW_US - DAY_US), format_us(NOW_US));
    let (status, body) = get(
        &app,
        &format!("/v1/views/installs_hourly/query?from={from}&to={to}"),
        Some("secret-narrow"),
        "application/json",
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(contains(&body, "may not read view") && contains(&body, "\"status\":403"));
    let (_, body) = get(&app, "/v1/views", Some("secret-narrow"), "application/json").await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<_> = v["views"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["purchases_daily"]);
    // Two requests a minute: the third is 429 with a problem body.
    let (status, body) = get(
        &app,
        &format!("/v1/views/purchases_daily/query?from={from}&to={to}"),
        Some("secret-narrow"),
        "application/json",
    )
    .await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert!(contains(&body, "over its rate"));
    // Keys naming what does not exist fail at start, naming the key.
    let e = Auth::new(
        vec![key("typo", &[A_APP], Some(&["no_view"]), None)],
        &h.catalog,
    )
    .unwrap_err();
    assert!(e.contains("typo") && e.contains("no_view"), "{e}");
    let mut bad = key("dim", &[A_APP], None, None);
    bad.scope = BTreeMap::from([("tenant".to_string(), vec!["x".to_string()])]);
    let e = Auth::new(vec![bad], &h.catalog).unwrap_err();
    assert!(e.contains("tenant"), "{e}");
}
