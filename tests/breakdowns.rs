//! Breakdowns against the oracle, on the real layers (batch for the closed days, speed for
//! today): day, week, month and `all` buckets in a time zone, filters, a top-N whose cut rows
//! come back as one `other` row per bucket, and totals. Counts are exact; distinct devices,
//! rolled up by sketch union, are within 3 RSE of the exact count.

mod support;

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet};

use axum::http::StatusCode;
use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use serde_json::Value;
use support::{Harness, NOW_US};
use tandem_core::time::format_us;
use tandem_core::view::DAY_US;
use tandem_workload::{Event, GenConfig, Generator};

/// The start of the bucket of `g` in `tz` holding `us`, computed with chrono alone.
fn bucket(g: &str, tz: chrono_tz::Tz, us: i64, from_us: i64) -> i64 {
    let local = DateTime::<Utc>::from_timestamp_micros(us)
        .unwrap()
        .with_timezone(&tz);
    let date = local.date_naive();
    let start: NaiveDate = match g {
        "day" => date,
        "week" => date - chrono::Days::new(date.weekday().num_days_from_monday().into()),
        "month" => date.with_day(1).unwrap(),
        "all" => return from_us,
        other => panic!("{other}"),
    };
    tz.from_local_datetime(&start.and_hms_opt(0, 0, 0).unwrap())
        .earliest()
        .unwrap()
        .timestamp_micros()
}

fn micros(rfc3339: &str) -> i64 {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_micros()
}

/// One group of the oracle: installs and the devices that installed.
#[derive(Default, Clone)]
struct Group {
    installs: u64,
    devices: HashSet<String>,
}

impl Group {
    fn add(&mut self, g: &Group) {
        self.installs += g.installs;
        self.devices.extend(g.devices.iter().cloned());
    }
}

fn dim<'a>(e: &'a Event, name: &str) -> Option<&'a str> {
    match name {
        "app_id" => Some(&e.app_id),
        "media_source" => Some(e.media_source),
        "campaign" => e.campaign.as_deref(),
        "country" => Some(e.country),
        other => panic!("{other}"),
    }
}

/// A served distinct count agrees with `exact`: equal where the row says it is exact, else
/// within 3 of its RSE.
fn check_distinct(v: &Value, exact: usize, case: &str) {
    let value = v["value"].as_f64().unwrap();
    if v["exact"].as_bool().unwrap() {
        assert_eq!(value as usize, exact, "{case}: {v}");
    } else {
        let rse = v["rse"].as_f64().unwrap();
        assert!(
            support::within(value, exact, rse, 3.0),
            "{case}: {value} vs {exact} (rse {rse})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breakdowns_top_n_with_other_and_totals_equal_the_oracle() {
    let mut h = Harness::start(&[], 2).await;
    let events: Vec<Event> = Generator::new(GenConfig {
        seed: 11,
        devices: 3_000,
        late_share: 0.0,
        ..Default::default()
    })
    // Four weeks up to now (2026-11-26, a Thursday): weeks and two months of buckets.
    .history(9_000, NOW_US - 27 * DAY_US, NOW_US)
    .collect();
    h.produce(&events);
    h.settle().await;
    h.run_batch().await;

    let installs: Vec<&Event> = events
        .iter()
        .filter(|e| e.event_name == "install")
        .collect();
    let (from_us, to_us) = (NOW_US - 26 * DAY_US - DAY_US / 3, NOW_US + DAY_US);
    // Filters, each as the API takes it and as a predicate for the oracle.
    type Pred = Box<dyn Fn(&Event) -> bool>;
    let filters: Vec<(&str, Pred)> = vec![
        ("", Box::new(|_| true)),
        (
            "filter=country.not_in=US,GB",
            Box::new(|e| !["US", "GB"].contains(&e.country)),
        ),
        (
            "filter=media_source.prefix=g",
            Box::new(|e| e.media_source.starts_with('g')),
        ),
        ("filter=country!=DE&filter=campaign.prefix=c", {
            Box::new(|e| {
                e.country != "DE" && e.campaign.as_deref().is_some_and(|c| c.starts_with('c'))
            })
        }),
    ];
    let mut checked_other = 0;
    for (gi, (granularity, tz)) in [
        ("day", "America/New_York"),
        ("week", "Asia/Tokyo"),
        ("month", "UTC"),
        ("all", "UTC"),
    ]
    .into_iter()
    .enumerate()
    {
        let zone: chrono_tz::Tz = tz.parse().unwrap();
        for (gbi, group_by) in [vec!["media_source"], vec!["app_id", "country"]]
            .into_iter()
            .enumerate()
        {
            // Each filter with two granularities (a query costs about a second unoptimised).
            {
                let (filter, pred) = &filters[(gi + gbi) % filters.len()];
                for (order_by, limit) in [("-installs", 3), ("bucket", 7), ("-devices", 2)] {
                    let case =
                        format!("{granularity} {tz} {group_by:?} {filter} {order_by} {limit}");
                    // The oracle: answer bucket -> group-by values -> group.
                    let mut truth: BTreeMap<i64, BTreeMap<Vec<Option<String>>, Group>> =
                        BTreeMap::new();
                    for e in installs.iter().filter(|e| pred(e)) {
                        if e.event_time < from_us || e.event_time >= to_us {
                            continue;
                        }
                        let b = bucket(granularity, zone, e.event_time, from_us);
                        let key = group_by
                            .iter()
                            .map(|d| dim(e, d).map(str::to_string))
                            .collect();
                        let g = truth.entry(b).or_default().entry(key).or_default();
                        g.installs += 1;
                        g.devices.insert(e.device_id.clone());
                    }
                    let uri = format!(
                        "/v1/views/installs_hourly/query?from={}&to={}&granularity={granularity}\
                         &tz={tz}&group_by={}&{filter}&order_by={order_by}&limit={limit}\
                         &other=true&totals=true",
                        format_us(from_us),
                        format_us(to_us),
                        group_by.join(","),
                    );
                    let (status, v) = h.get(&uri).await;
                    assert_eq!(status, StatusCode::OK, "{case}: {v}");
                    let rows = v["rows"].as_array().unwrap();

                    // The shown rows are the first `limit` of the oracle's rows in the
                    // answer's order (counts exact; by a distinct count, within its error).
                    let mut all: Vec<(i64, Vec<Option<String>>, Group)> = truth
                        .iter()
                        .flat_map(|(b, groups)| {
                            groups.iter().map(|(k, g)| (*b, k.clone(), g.clone()))
                        })
                        .collect();
                    let shown: Vec<&Value> = rows.iter().filter(|r| r["other"] == false).collect();
                    assert_eq!(shown.len(), all.len().min(limit), "{case}");
                    assert_eq!(v["meta"]["truncated"], all.len() > limit, "{case}");
                    let key_of = |r: &Value| {
                        let dims = group_by
                            .iter()
                            .map(|d| r["dims"][d].as_str().map(str::to_string))
                            .collect::<Vec<_>>();
                        (micros(r["bucket"].as_str().unwrap()), dims)
                    };
                    match order_by {
                        "-installs" => {
                            all.sort_by_key(|(b, k, g)| (Reverse(g.installs), *b, k.clone()))
                        }
                        "bucket" => all.sort_by_key(|(b, k, _)| (*b, k.clone())),
                        _ => {}
                    }
                    let mut cut: BTreeMap<i64, Group> = BTreeMap::new();
                    let shown_keys: HashSet<_> = shown.iter().map(|r| key_of(r)).collect();
                    for (b, k, g) in &all {
                        if !shown_keys.contains(&(*b, k.clone())) {
                            cut.entry(*b).or_default().add(g);
                        }
                    }
                    if order_by != "-devices" {
                        let expected: Vec<_> = all
                            .iter()
                            .take(limit)
                            .map(|(b, k, _)| (*b, k.clone()))
                            .collect();
                        let got: Vec<_> = shown.iter().map(|r| key_of(r)).collect();
                        assert_eq!(got, expected, "{case}");
                    }
                    for r in &shown {
                        let (b, k) = key_of(r);
                        let g = &truth[&b][&k];
                        assert_eq!(r["metrics"]["installs"], g.installs, "{case}");
                        check_distinct(&r["metrics"]["devices"], g.devices.len(), &case);
                    }

                    // One `other` row per bucket that lost rows, holding exactly them, after
                    // its bucket's rows in bucket order, after every row otherwise.
                    let others: Vec<(usize, &Value)> = rows
                        .iter()
                        .enumerate()
                        .filter(|(_, r)| r["other"] == true)
                        .collect();
                    assert_eq!(
                        others
                            .iter()
                            .map(|(_, r)| micros(r["bucket"].as_str().unwrap()))
                            .collect::<Vec<_>>(),
                        cut.keys().copied().collect::<Vec<_>>(),
                        "{case}"
                    );
                    for (at, r) in &others {
                        let b = micros(r["bucket"].as_str().unwrap());
                        let g = &cut[&b];
                        assert!(group_by.iter().all(|d| r["dims"][d].is_null()), "{case}");
                        assert_eq!(r["metrics"]["installs"], g.installs, "{case}");
                        check_distinct(&r["metrics"]["devices"], g.devices.len(), &case);
                        if order_by == "bucket" {
                            let before = rows[..*at]
                                .iter()
                                .all(|x| micros(x["bucket"].as_str().unwrap()) <= b);
                            let after = rows[at + 1..]
                                .iter()
                                .all(|x| micros(x["bucket"].as_str().unwrap()) > b);
                            assert!(before && after, "{case}: {rows:?}");
                        } else {
                            assert!(*at >= shown.len(), "{case}");
                        }
                        checked_other += 1;
                    }

                    // Totals: one row per bucket over every group, whatever the limit.
                    let totals = v["totals"].as_array().unwrap();
                    assert_eq!(totals.len(), truth.len(), "{case}");
                    for t in totals {
                        let b = micros(t["bucket"].as_str().unwrap());
                        let mut whole = Group::default();
                        truth[&b].values().for_each(|g| whole.add(g));
                        assert_eq!(t["metrics"]["installs"], whole.installs, "{case}");
                        check_distinct(&t["metrics"]["devices"], whole.devices.len(), &case);
                    }
                }
            }
        }
    }
    assert!(checked_other > 20, "{checked_other} other rows checked");

    // CSV and Arrow carry the `other` column too.
    let uri = format!(
        "/v1/views/installs_hourly/query?from={}&to={}&granularity=all&group_by=country\
         &order_by=-installs&limit=2&other=true",
        format_us(from_us),
        format_us(to_us),
    );
    let (status, csv) = h.get_bytes(&uri, "text/csv").await;
    assert_eq!(status, StatusCode::OK);
    let csv = String::from_utf8(csv).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("bucket,source,other,country,installs"),
        "{csv}"
    );
    assert_eq!(lines.len(), 1 + 3, "{csv}");
    assert!(lines[3].contains(",true,"), "{csv}");
    let installs_in_range = installs
        .iter()
        .filter(|e| e.event_time >= from_us && e.event_time < to_us)
        .count() as u64;
    let sum: u64 = lines[1..]
        .iter()
        .map(|l| l.split(',').nth(4).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(sum, installs_in_range, "{csv}");
    h.stop().await;
}
