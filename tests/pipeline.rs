//! End to end through the mock Kafka cluster: archiver and speed layer consume the same
//! generated events; the batch layer recomputes from the archive; the API merges. Every answer
//! is compared to an oracle computed directly from the generated events.

mod support;

use std::collections::HashMap;

use axum::http::StatusCode;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use serde_json::Value;
use support::*;
use tandem_core::metric::hll_rse;
use tandem_core::time::format_us;
use tandem_core::view::DAY_US;
use tandem_workload::{Event, GenConfig, Generator};

fn events(seed: u64, n: usize) -> Vec<Event> {
    Generator::new(GenConfig {
        seed,
        devices: 4_000,
        ..Default::default()
    })
    .history(n, NOW_US - 3 * DAY_US, NOW_US)
    .collect()
}

/// Checks every served row of `view` against the oracle: the same groups, equal counts and
/// sums, distinct exact when the row says so and within 3 standard errors otherwise.
/// Returns how many rows each source answered.
fn check(
    view: &str,
    dims: &[String],
    rows: &[Value],
    truth: &HashMap<Key, Truth>,
) -> HashMap<String, usize> {
    let mut sources = HashMap::new();
    let mut seen = 0;
    for row in rows {
        let key = row_key(row, dims);
        let t = truth
            .get(&key)
            .unwrap_or_else(|| panic!("{view}: served a group the events do not have: {key:?}"));
        seen += 1;
        *sources
            .entry(row["source"].as_str().unwrap().to_string())
            .or_default() += 1;
        let m = &row["metrics"];
        let count_metric = ["installs", "purchases", "events"]
            .into_iter()
            .find(|k| !m[*k].is_null())
            .unwrap();
        assert_eq!(
            m[count_metric].as_u64().unwrap(),
            t.count,
            "{view} {key:?} {count_metric}"
        );
        if !m["revenue"].is_null() {
            assert_eq!(
                units(&m["revenue"]),
                t.revenue_units,
                "{view} {key:?} revenue"
            );
            assert_eq!(
                Some(units(&m["max_revenue"])),
                t.max_units,
                "{view} {key:?} max_revenue"
            );
        }
        for d in ["devices", "active_devices"] {
            if m[d].is_null() {
                continue;
            }
            let value = m[d]["value"].as_f64().unwrap();
            if m[d]["exact"].as_bool().unwrap() {
                assert_eq!(value as usize, t.devices.len(), "{view} {key:?} exact {d}");
            } else {
                assert!(
                    within(value, t.devices.len(), hll_rse(12), 3.0),
                    "{view} {key:?} {d}: {value} vs {}",
                    t.devices.len()
                );
            }
        }
    }
    assert_eq!(
        seen,
        truth.len(),
        "{view}: every group of the events is served"
    );
    sources
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_then_batch_equal_the_oracle() {
    let mut h = Harness::start(&[], 3).await;
    let events = events(7, 20_000);
    h.produce(&events);
    h.settle().await;
    let truth = oracle(&events);

    // Before any batch run, everything comes from the speed layer, exactly.
    for (view, t) in &truth {
        let dims = h.catalog.views[*view].dimensions.clone();
        let rows = h.all_rows(view).await;
        let sources = check(view, &dims, &rows, t);
        assert_eq!(sources.keys().collect::<Vec<_>>(), ["speed"], "{view}");
    }

    // After the batch run, closed days come from batch (distinct exact), today from speed.
    h.run_batch().await;
    let today = format_us(NOW_US / DAY_US * DAY_US);
    for (view, t) in &truth {
        let dims = h.catalog.views[*view].dimensions.clone();
        let rows = h.all_rows(view).await;
        let sources = check(view, &dims, &rows, t);
        assert!(
            sources["batch"] > 0 && sources["speed"] > 0,
            "{view}: {sources:?}"
        );
        for row in &rows {
            let from_batch = row["bucket"].as_str().unwrap() < today.as_str();
            assert_eq!(
                row["source"],
                if from_batch { "batch" } else { "speed" },
                "{view} {row}"
            );
            if from_batch {
                for d in ["devices", "active_devices"] {
                    if !row["metrics"][d].is_null() {
                        assert_eq!(row["metrics"][d]["exact"], true, "{row}");
                    }
                }
            }
        }
    }

    // A rollup: daily totals of the hourly view, over both layers.
    let (status, body) = h
        .get(&format!(
            "/v1/views/installs_hourly/query?from={}&to={}&granularity=day",
            format_us(NOW_US - 10 * DAY_US),
            format_us(NOW_US + DAY_US)
        ))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut per_day: HashMap<String, u64> = HashMap::new();
    for ((bucket, _), t) in &truth["installs_hourly"] {
        *per_day
            .entry(format!("{}T00:00:00Z", &bucket[..10]))
            .or_default() += t.count;
    }
    let rows = body["rows"].as_array().unwrap();
    assert_eq!(rows.len(), per_day.len());
    for row in rows {
        assert_eq!(
            row["metrics"]["installs"].as_u64().unwrap(),
            per_day[row["bucket"].as_str().unwrap()],
            "{row}"
        );
    }
    assert_eq!(body["meta"]["covered_until"], Value::String(today.clone()));

    // Filter values are literals in both layers, never SQL.
    let (status, body) = h
        .get(&format!(
            "/v1/views/installs_hourly/query?from={}&group_by=country&filter=country%3D'%20OR%201%3D1%20--",
            format_us(NOW_US - 10 * DAY_US)
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["rows"], serde_json::json!([]));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_go_to_dead_letters_and_nothing_stops() {
    let mut h = Harness::start(&[], 2).await;
    let good = events(11, 3_000);
    let mut records = Vec::new();
    let mut bad = 0;
    let mut bad_payloads: Vec<Vec<u8>> = Vec::new();
    for (i, e) in good.iter().enumerate() {
        records.push((e.device_id.clone(), e.to_json().into_bytes()));
        if i % 100 == 0 {
            let json = e.to_json();
            let mut wrong_type: Value = serde_json::from_str(&json).unwrap();
            wrong_type["revenue_usd"] = Value::String("abc".into());
            let mut missing: Value = serde_json::from_str(&json).unwrap();
            missing.as_object_mut().unwrap().remove("app_id");
            for payload in [
                json.as_bytes()[..json.len() / 2].to_vec(), // truncated
                b"{\"event_id\":\"\xff\xfe\"}".to_vec(),    // invalid UTF-8
                wrong_type.to_string().into_bytes(),        // wrong type
                missing.to_string().into_bytes(),           // missing required
                Vec::new(),                                 // empty
            ] {
                records.push((format!("bad-{i}"), payload.clone()));
                bad_payloads.push(payload);
                bad += 1;
            }
        }
    }
    h.produce_raw(&records);
    h.settle().await;

    // Both layers count every valid event.
    let truth = oracle(&good);
    for (view, t) in &truth {
        let dims = h.catalog.views[*view].dimensions.clone();
        check(view, &dims, &h.all_rows(view).await, t);
    }
    // Each malformed message is in the dead-letter table with its bytes and a reason.
    let dlq = h
        .storage
        .open(&h.storage.layout().dead_letter("app_events"))
        .await
        .unwrap()
        .expect("dead-letter table");
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("dlq", dlq.table_provider().await.unwrap())
        .unwrap();
    let batches = ctx
        .sql("SELECT reason, count(*) AS n FROM dlq GROUP BY reason ORDER BY reason")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut per_reason = HashMap::new();
    for b in &batches {
        let reasons = datafusion::arrow::compute::cast(
            b.column(0),
            &datafusion::arrow::datatypes::DataType::Utf8,
        )
        .unwrap();
        for i in 0..b.num_rows() {
            per_reason.insert(
                reasons.as_string::<i32>().value(i).to_string(),
                b.column(1).as_primitive::<Int64Type>().value(i),
            );
        }
    }
    assert_eq!(
        per_reason.values().sum::<i64>(),
        bad as i64,
        "{per_reason:?}"
    );
    assert_eq!(
        per_reason["decode"],
        bad as i64 / 5 * 3,
        "truncated, invalid UTF-8, empty"
    );
    assert_eq!(
        per_reason["schema"],
        bad as i64 / 5 * 2,
        "wrong type, missing field"
    );
    let raw = ctx
        .sql("SELECT raw FROM dlq")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let mut stored: Vec<Vec<u8>> = Vec::new();
    for b in &raw {
        let col = datafusion::arrow::compute::cast(
            b.column(0),
            &datafusion::arrow::datatypes::DataType::Binary,
        )
        .unwrap();
        stored.extend(col.as_binary::<i32>().iter().map(|v| v.unwrap().to_vec()));
    }
    stored.sort();
    bad_payloads.sort();
    assert_eq!(stored, bad_payloads, "the raw bytes are kept exactly");
    let master = h
        .storage
        .open(&h.storage.layout().master("app_events"))
        .await
        .unwrap()
        .unwrap();
    ctx.register_table("master", master.table_provider().await.unwrap())
        .unwrap();
    let n = ctx
        .sql("SELECT count(*) FROM master")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(
        n[0].column(0).as_primitive::<Int64Type>().value(0),
        good.len() as i64
    );

    // Neither layer stopped: later events are still counted.
    let more = events(12, 500);
    h.produce(&more);
    h.settle().await;
    let all: Vec<Event> = good.iter().chain(&more).cloned().collect();
    let truth = oracle(&all);
    let dims = h.catalog.views["active_devices_daily"].dimensions.clone();
    check(
        "active_devices_daily",
        &dims,
        &h.all_rows("active_devices_daily").await,
        &truth["active_devices_daily"],
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_added_as_a_file_is_served_without_code_change() {
    let view = r#"
kind = "view"
source = "app_events"
filter = "platform = 'ios' AND revenue_usd > 1"
granularity = "day"
dimensions = ["country"]
metrics = [
  { name = "ios_purchases", kind = "count" },
  { name = "first_purchase", kind = "min", field = "event_time" },
]
"#;
    let mut h = Harness::start(&[("ios_purchases_daily.toml", view)], 2).await;
    let events = events(21, 6_000);
    h.produce(&events);
    h.settle().await;
    let mut truth: HashMap<(String, String), (u64, i64)> = HashMap::new();
    for e in events
        .iter()
        .filter(|e| e.platform == "ios" && e.revenue_usd.is_some_and(|r| r > 1.0))
    {
        let t = truth
            .entry((
                format_us(e.event_time / DAY_US * DAY_US),
                e.country.to_string(),
            ))
            .or_insert((0, i64::MAX));
        t.0 += 1;
        t.1 = t.1.min(e.event_time);
    }
    let (status, listed) = h.get("/v1/views").await;
    assert_eq!(status, StatusCode::OK);
    assert!(listed["views"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == "ios_purchases_daily"));

    for round in ["speed only", "after batch"] {
        if round == "after batch" {
            h.run_batch().await;
        }
        let rows = h.all_rows("ios_purchases_daily").await;
        assert_eq!(rows.len(), truth.len(), "{round}");
        for row in &rows {
            let key = (
                row["bucket"].as_str().unwrap().to_string(),
                row["dims"]["country"].as_str().unwrap().to_string(),
            );
            let (count, first) = truth[&key];
            assert_eq!(
                row["metrics"]["ios_purchases"].as_u64().unwrap(),
                count,
                "{round} {key:?}"
            );
            assert_eq!(
                row["metrics"]["first_purchase"].as_str().unwrap(),
                format_us(first),
                "{round} {key:?}"
            );
        }
        if round == "after batch" {
            assert!(rows.iter().any(|r| r["source"] == "batch"));
        }
    }
    h.stop().await;
}

/// Sums of decimal fields are exact in both layers and in every answer format, also where an
/// f64 is not: values come as JSON numbers and as numeric strings, and are never parsed or
/// printed through f64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decimal_sums_are_exact_in_both_layers_and_every_format() {
    use datafusion::arrow::datatypes::Decimal128Type;
    use datafusion::arrow::ipc::reader::StreamReader;

    let mut h = Harness::start(&[], 1).await;
    // Yesterday, so that the batch run covers it.
    let day = NOW_US / DAY_US * DAY_US - DAY_US;
    let event = |i: usize, revenue: &str| {
        let payload = format!(
            r#"{{"event_id":"p{i}","event_time":"{}","app_id":"a","event_name":"purchase","country":"DE","device_id":"d{i}","revenue_usd":{revenue}}}"#,
            format_us(day + 3_600_000_000)
        );
        (format!("k{i}"), payload.into_bytes())
    };
    // Ten times 0.1, a value with more digits than an f64 carries, and a numeric string.
    let mut records: Vec<_> = (0..10).map(|i| event(i, "0.1")).collect();
    records.push(event(10, "12345678901234.567891"));
    records.push(event(11, "\"0.000001\""));
    h.produce_raw(&records);
    h.settle().await;
    let exact = "12345678901235.567892";
    assert_ne!(
        format!("{:.6}", exact.parse::<f64>().unwrap()),
        exact,
        "an f64 would not carry this sum"
    );
    let uri = format!(
        "/v1/views/purchases_daily/query?from={}&to={}&metrics=purchases,revenue",
        format_us(day),
        format_us(day + DAY_US)
    );
    for source in ["speed", "batch"] {
        if source == "batch" {
            h.run_batch().await;
        }
        let (status, json) = h.get_bytes(&uri, "application/json").await;
        let json = String::from_utf8(json).unwrap();
        assert_eq!(status, StatusCode::OK, "{json}");
        assert!(json.contains(&format!("\"source\":\"{source}\"")), "{json}");
        assert!(
            json.contains(&format!("\"revenue\":{exact}")),
            "{source}: {json}"
        );

        let (_, csv) = h.get_bytes(&uri, "text/csv").await;
        let csv = String::from_utf8(csv).unwrap();
        let row = csv.lines().nth(1).unwrap();
        assert!(
            row.ends_with(&format!(",{source},12,{exact}")),
            "{source}: {csv}"
        );

        let (_, ipc) = h
            .get_bytes(&uri, "application/vnd.apache.arrow.stream")
            .await;
        let batch = StreamReader::try_new(std::io::Cursor::new(ipc), None)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        let revenue = batch
            .column_by_name("revenue")
            .unwrap()
            .as_primitive::<Decimal128Type>();
        assert_eq!(revenue.value_as_string(0), exact, "{source}");
    }
    h.stop().await;
}

/// `avg` is exact in both layers (an exact sum over a count, at six more digits than the field)
/// and rolls up from its parts, not from averages of averages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn averages_equal_the_oracle_in_both_layers_and_in_a_rollup() {
    let view = r#"
kind = "view"
source = "app_events"
filter = "event_name = 'purchase'"
granularity = "hour"
dimensions = ["app_id", "country"]
metrics = [
  { name = "purchases", kind = "count" },
  { name = "avg_revenue", kind = "avg", field = "revenue_usd" },
]
"#;
    let mut h = Harness::start(&[("avg_revenue_hourly.toml", view)], 2).await;
    let events = events(31, 12_000);
    h.produce(&events);
    h.settle().await;
    // (bucket, app, country) -> (sum of revenue in micro-dollars, purchases), at two grains.
    let mut hourly: HashMap<(String, String, String), (i128, i128)> = HashMap::new();
    let mut daily: HashMap<(String, String), (i128, i128)> = HashMap::new();
    for e in events.iter().filter(|e| e.event_name == "purchase") {
        let units = (e.revenue_usd.unwrap() * 1e6).round() as i128;
        let hour = format_us(e.event_time / 3_600_000_000 * 3_600_000_000);
        let h = hourly
            .entry((hour, e.app_id.clone(), e.country.to_string()))
            .or_default();
        *h = (h.0 + units, h.1 + 1);
        let d = daily
            .entry((
                format_us(e.event_time / DAY_US * DAY_US),
                e.country.to_string(),
            ))
            .or_default();
        *d = (d.0 + units, d.1 + 1);
    }
    // The mean at 6 + 6 digits after the point, rounded half away from zero, as text.
    let mean = |(sum, n): (i128, i128)| {
        let num = sum * 1_000_000;
        let (q, r) = (num / n, num % n);
        let units = if 2 * r.abs() >= n {
            q + num.signum()
        } else {
            q
        };
        format!(
            "{}.{:012}",
            units / 1_000_000_000_000,
            units % 1_000_000_000_000
        )
    };
    let csv_rows = |body: Vec<u8>| -> Vec<Vec<String>> {
        String::from_utf8(body)
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split(',').map(str::to_string).collect())
            .collect()
    };
    let (from, to) = (format_us(NOW_US - 10 * DAY_US), format_us(NOW_US + DAY_US));
    for round in ["speed", "after batch"] {
        if round == "after batch" {
            h.run_batch().await;
        }
        let uri = format!("/v1/views/avg_revenue_hourly/query?from={from}&to={to}&group_by=app_id,country&limit=100000");
        let (status, body) = h.get_bytes(&uri, "text/csv").await;
        assert_eq!(status, StatusCode::OK);
        let rows = csv_rows(body);
        assert_eq!(rows.len(), hourly.len(), "{round}");
        for r in &rows {
            let key = (r[0].clone(), r[2].clone(), r[3].clone());
            let truth = hourly[&key];
            assert_eq!(r[4], truth.1.to_string(), "{round} {key:?}");
            assert_eq!(r[5], mean(truth), "{round} {key:?}");
        }
        // Daily by country: every hour and app of a day folded into one mean.
        let uri = format!("/v1/views/avg_revenue_hourly/query?from={from}&to={to}&granularity=day&group_by=country&limit=100000");
        let (_, body) = h.get_bytes(&uri, "text/csv").await;
        let rows = csv_rows(body);
        assert_eq!(rows.len(), daily.len(), "{round}");
        for r in &rows {
            let key = (r[0].clone(), r[2].clone());
            assert_eq!(r[4], mean(daily[&key]), "{round} rollup {key:?}");
        }
        if round == "after batch" {
            assert!(rows.iter().any(|r| r[1] == "batch"), "{rows:?}");
        }
    }
    h.stop().await;
}

/// Request errors on fetch and commit, then the broker down for 10 s: the consumers neither
/// crash nor lose or double an event, and the speed layer says it is not ready while no
/// broker can be reached, and ready again after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_faults_and_an_outage_change_no_count() {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    use std::time::{Duration, Instant};

    let mut h = Harness::start(&[], 2).await;
    let all = events(23, 6_000);
    h.produce(&all[..2_000]);
    h.settle().await;

    h.cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4],
    );
    h.cluster.request_errors(
        RDKafkaApiKey::OffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 4],
    );
    h.produce(&all[2_000..4_000]);
    h.settle().await;

    let grace = Duration::from_secs(2);
    let not_ready = |h: &Harness| h.speed.not_ready(100_000, grace);
    h.cluster.broker_down(1).unwrap();
    let down = Instant::now();
    let deadline = down + Duration::from_secs(30);
    let why = loop {
        if let Some(why) = not_ready(&h) {
            break why;
        }
        assert!(
            Instant::now() < deadline,
            "never reported the broker unreachable"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(why.contains("no Kafka broker"), "{why}");
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(down.elapsed())).await;
    h.cluster.broker_up(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Some(why) = not_ready(&h) {
        assert!(Instant::now() < deadline, "still not ready: {why}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(h.tasks.try_join_next().is_none(), "a consumer stopped");

    h.produce(&all[4_000..]);
    h.settle().await;
    let truth = oracle(&all);
    let view = "installs_hourly";
    let dims = h.catalog.views[view].dimensions.clone();
    let rows = h.all_rows(view).await;
    check(view, &dims, &rows, &truth[view]);
    assert_eq!(rows.len(), truth[view].len());
    h.stop().await;
}

/// A producer's retries: 10 % of the events sent twice, the copy right after the original.
/// Every view counts each event once: the speed layer drops the copy within its window, the
/// batch recompute keeps one row per event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_event_ids_count_once_in_every_view() {
    let mut h = Harness::start(&[], 2).await;
    let events = events(17, 6_000);
    let mut sent = Vec::with_capacity(events.len() * 11 / 10);
    for (i, e) in events.iter().enumerate() {
        sent.push(e.clone());
        if i % 10 == 0 {
            sent.push(e.clone());
        }
    }
    h.produce(&sent);
    h.settle().await;
    h.run_batch().await;
    let truth = oracle(&events);
    for (view, t) in &truth {
        let dims = h.catalog.views[*view].dimensions.clone();
        let rows = h.all_rows(view).await;
        let sources = check(view, &dims, &rows, t);
        assert!(
            sources.get("batch").copied().unwrap_or(0) > 0,
            "{view}: {sources:?}"
        );
    }
}
