//! The example Grafana dashboard (`docs/grafana/tandem-dashboard.json`): every query of its
//! panels, as the Infinity data source sends it, answers with the columns the panel plots.

mod support;

use axum::http::StatusCode;
use support::{Harness, NOW_US};
use tandem_core::view::DAY_US;
use tandem_workload::{GenConfig, Generator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_of_the_example_dashboard_answers_its_columns() {
    let mut h = Harness::start(&[], 2).await;
    let events: Vec<_> = Generator::new(GenConfig {
        seed: 5,
        late_share: 0.0,
        ..Default::default()
    })
    .history(6_000, NOW_US - 5 * DAY_US, NOW_US)
    .collect();
    h.produce(&events);
    h.settle().await;
    h.run_batch().await;

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/grafana/tandem-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 4);
    let (from, to) = ((NOW_US - 7 * DAY_US) / 1000, NOW_US / 1000);
    let mut checked = 0;
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["type"], "csv", "{}", panel["title"]);
            // Grafana's intervals as a dashboard of a week, a day and an hour would pick them.
            for interval in ["5m", "1h", "1d"] {
                let params: Vec<String> = target["url_options"]["params"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| {
                        let value = p["value"]
                            .as_str()
                            .unwrap()
                            .replace("${__from}", &from.to_string())
                            .replace("${__to}", &to.to_string())
                            .replace("$__interval", interval);
                        format!("{}={value}", p["key"].as_str().unwrap())
                    })
                    .collect();
                let uri = format!("{}?{}", target["url"].as_str().unwrap(), params.join("&"));
                let (status, body) = h.get_bytes(&uri, "text/csv").await;
                let text = String::from_utf8(body).unwrap();
                assert_eq!(status, StatusCode::OK, "{uri}: {text}");
                let mut lines = text.lines();
                let header: Vec<&str> = lines.next().unwrap().split(',').collect();
                assert!(lines.next().is_some(), "{uri}: no rows");
                for column in target["columns"].as_array().unwrap() {
                    let selector = column["selector"].as_str().unwrap();
                    assert!(
                        header.contains(&selector),
                        "{uri}: no column `{selector}` in {header:?}"
                    );
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, panels.len() * 3);
}
