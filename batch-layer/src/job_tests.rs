//! SQL jobs, the scheduler, publish races, rollback and the days the archiver closes.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use tandem_core::job::JobDef;
use tandem_core::master::PartitionProgress;
use tandem_core::time::{day_of, day_string, Clock, MockClock};
use tandem_core::view::{DAY_US, HOUR_US};
use tandem_core::Catalog;
use tandem_workload::{Event, GenConfig, Generator};

use crate::runs::{FAILED, RETRYING, SUCCEEDED};
use crate::scheduler::{Leases, Scheduler, SchedulerConfig};
use crate::tests::{setup, total, write_lines, Setup, NOW};
use crate::{import_jsonl, BatchError, BatchLayer, RunRequest};

fn events(seed: u64, n: usize, devices: usize, from: i64, to: i64) -> Vec<Event> {
    Generator::new(GenConfig {
        seed,
        devices,
        late_share: 0.0,
        ..Default::default()
    })
    .history(n, from, to)
    .collect()
}

async fn import(s: &Setup, name: &str, evs: &[Event]) {
    let file = s.dir.join(name);
    let lines: Vec<String> = evs.iter().map(Event::to_json).collect();
    write_lines(&file, &lines);
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();
}

/// The batch layer of the setup's storage, reference catalog and clock.
fn layer_of(s: &Setup) -> BatchLayer {
    BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&s.catalog),
        Arc::new(s.clock.clone()),
    )
}

fn date(day: i64) -> chrono::NaiveDate {
    chrono::NaiveDate::parse_from_str(&day_string(day), "%Y-%m-%d").unwrap()
}

async fn sql(s: &Setup, q: &str) -> Vec<RecordBatch> {
    sql_in(s, &s.catalog, q).await
}

async fn sql_in(s: &Setup, catalog: &Catalog, q: &str) -> Vec<RecordBatch> {
    let ctx = crate::jobs::session(&s.storage, catalog, &Default::default())
        .await
        .unwrap();
    crate::jobs::query(&ctx, q)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()
}

/// A date the job's query finds nothing for publishes an empty partition: the run succeeds
/// with no rows, and an earlier run's rows of that date are gone.
#[tokio::test]
async fn a_date_without_rows_publishes_an_empty_partition() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(3, 3_000, 300, (today - 10) * DAY_US, NOW),
    )
    .await;
    let job = Arc::clone(s.catalog.job("install_retention").unwrap());
    let layer = layer_of(&s);
    let d = today - 9;
    let first = layer.run_job(&job, date(d), Vec::new()).await.unwrap();
    assert!(first.rows > 0);
    // The same date again, once its events are gone from the master dataset.
    let master = s.storage.layout().master("app_events");
    let table = s.storage.open(&master).await.unwrap().unwrap();
    table
        .delete()
        .with_predicate(format!("dt = '{}'", day_string(d)))
        .await
        .unwrap();
    let empty = layer.run_job(&job, date(d), Vec::new()).await.unwrap();
    assert_eq!(empty.rows, 0);
    assert!(empty.version > first.version);
    let out = sql(
        &s,
        &format!(
            "SELECT count(*) FROM install_retention WHERE date = '{}'",
            day_string(d)
        ),
    )
    .await;
    assert_eq!(out[0].column(0).as_primitive::<Int64Type>().value(0), 0);
}

/// The reference job `install_retention` against the same retention computed from the
/// generated events directly.
#[tokio::test]
async fn the_retention_job_equals_retention_computed_from_the_events() {
    let s = setup();
    let today = day_of(NOW);
    let evs = events(21, 30_000, 1_500, (today - 10) * DAY_US, NOW);
    import(&s, "history.jsonl", &evs).await;
    let job = Arc::clone(s.catalog.job("install_retention").unwrap());
    crate::jobs::check(&s.storage, &s.catalog).await.unwrap();
    let layer = layer_of(&s);
    for d in [today - 10, today - 9] {
        let r = layer.run_job(&job, date(d), Vec::new()).await.unwrap();
        assert!(r.rows > 0);
    }
    // The independent computation.
    for d in [today - 10, today - 9] {
        let on = |day: i64| move |e: &&Event| day_of(e.event_time) == day;
        let mut installs: BTreeMap<(String, String), HashSet<String>> = BTreeMap::new();
        for e in evs
            .iter()
            .filter(on(d))
            .filter(|e| e.event_name == "install")
        {
            installs
                .entry((e.app_id.clone(), e.media_source.to_string()))
                .or_default()
                .insert(e.device_id.clone());
        }
        let active = |day: i64| -> HashSet<(String, String)> {
            evs.iter()
                .filter(on(day))
                .map(|e| (e.app_id.clone(), e.device_id.clone()))
                .collect()
        };
        let (a1, a7) = (active(d + 1), active(d + 7));
        let expected: BTreeMap<(String, String), (i64, i64, i64)> = installs
            .iter()
            .map(|((app, media), devices)| {
                let kept = |a: &HashSet<(String, String)>| {
                    devices
                        .iter()
                        .filter(|dev| a.contains(&(app.clone(), (*dev).clone())))
                        .count() as i64
                };
                (
                    (app.clone(), media.clone()),
                    (devices.len() as i64, kept(&a1), kept(&a7)),
                )
            })
            .collect();
        assert!(
            expected.values().any(|v| v.1 > 0) && expected.values().any(|v| v.2 > 0),
            "the data has retained devices"
        );
        let got: BTreeMap<(String, String), (i64, i64, i64)> = sql(
            &s,
            &format!(
                "SELECT app_id, media_source, installs, retained_d1, retained_d7 \
                 FROM install_retention WHERE date = '{}'",
                day_string(d)
            ),
        )
        .await
        .iter()
        .flat_map(|b| {
            let s = |i: usize| {
                datafusion::arrow::compute::cast(b.column(i), &DataType::Utf8)
                    .unwrap()
                    .as_string::<i32>()
                    .clone()
            };
            let n = |i: usize| b.column(i).as_primitive::<Int64Type>().clone();
            let (app, media, i, r1, r7) = (s(0), s(1), n(2), n(3), n(4));
            (0..b.num_rows())
                .map(|k| {
                    (
                        (app.value(k).to_string(), media.value(k).to_string()),
                        (i.value(k), r1.value(k), r7.value(k)),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect();
        assert_eq!(got, expected, "retention of {}", day_string(d));
    }
    // A second run of a date replaces its partition: no duplicates.
    let before = sql(&s, "SELECT count(*) FROM install_retention").await;
    layer
        .run_job(&job, date(today - 10), Vec::new())
        .await
        .unwrap();
    let after = sql(&s, "SELECT count(*) FROM install_retention").await;
    assert_eq!(
        before[0].column(0).as_primitive::<Int64Type>().value(0),
        after[0].column(0).as_primitive::<Int64Type>().value(0)
    );
}

/// A catalog of the reference schema, the view `active_devices_daily` and the given job
/// files.
fn catalog_with(s: &Setup, jobs: &[(&str, &str)]) -> Arc<Catalog> {
    let dir = s.dir.join("jobs");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in jobs {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(
        root.join("jobs/active_devices_daily.toml"),
        dir.join("active_devices_daily.toml"),
    )
    .unwrap();
    Arc::new(Catalog::load(&root.join("schemas"), &dir).unwrap())
}

fn scheduler(s: &Setup, catalog: &Arc<Catalog>, holder: &str, clock: &MockClock) -> Scheduler {
    Scheduler::new(
        s.storage.clone(),
        Arc::clone(catalog),
        Arc::new(clock.clone()),
        Default::default(),
        SchedulerConfig {
            views: None,
            lease_ttl: Duration::from_secs(60),
            holder: holder.into(),
            ..Default::default()
        },
    )
    .unwrap()
}

const DAILY: &str = "kind = \"sql\"\nschedule = \"0 4 * * *\"\nsql = \"SELECT count(*) AS n FROM app_events WHERE dt = '{{date}}'\"\n";

#[tokio::test]
async fn missed_runs_are_caught_up_once_and_two_schedulers_never_overlap() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(2, 2_000, 500, (today - 2) * DAY_US, NOW),
    )
    .await;
    let catalog = catalog_with(&s, &[("daily_count.toml", DAILY)]);
    let clock = MockClock::new(NOW);
    let a = scheduler(&s, &catalog, "a", &clock);
    let b = scheduler(&s, &catalog, "b", &clock);

    // 12:00: the 04:00 tick is due, for yesterday.
    let done = a.tick().await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].date.as_deref(),
        Some(day_string(today - 1).as_str())
    );
    assert_eq!(done[0].status, SUCCEEDED);
    assert!(a.tick().await.unwrap().is_empty(), "done for this tick");

    // Down for three days: one run, for the newest tick, not three.
    clock.set(NOW + 3 * DAY_US);
    let done = a.tick().await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].date.as_deref(),
        Some(day_string(today + 2).as_str())
    );
    assert!(a.tick().await.unwrap().is_empty());

    // Two schedulers at once: one run between them.
    clock.set(NOW + 4 * DAY_US);
    let (x, y) = tokio::join!(a.tick(), b.tick());
    assert_eq!(x.unwrap().len() + y.unwrap().len(), 1);

    // A holder dies holding the lease: nobody runs until it expires, then one does.
    clock.set(NOW + 5 * DAY_US);
    let dead = Leases::new(
        &s.storage,
        "dead",
        Duration::from_secs(60),
        Arc::new(clock.clone()),
    )
    .unwrap();
    let held = dead.acquire("daily_count").await.unwrap();
    assert!(held.is_some());
    assert!(
        dead.acquire("daily_count").await.unwrap().is_none(),
        "one holder at a time"
    );
    assert!(
        b.tick().await.unwrap().is_empty(),
        "leased by the dead holder"
    );
    clock.set(NOW + 5 * DAY_US + 61_000_000);
    let done = b.tick().await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].holder, "b");
    assert_eq!(
        done[0].date.as_deref(),
        Some(day_string(today + 4).as_str())
    );

    let runs = crate::runs::list(&s.storage, Some("daily_count"))
        .await
        .unwrap();
    let dates: Vec<_> = runs.iter().filter_map(|r| r.date.clone()).collect();
    assert_eq!(
        dates,
        [today - 1, today + 2, today + 3, today + 4].map(day_string),
        "each tick ran once"
    );
    // Their outputs: one partition per date.
    let out = sql_in(
        &s,
        &catalog,
        "SELECT date, n FROM daily_count ORDER BY date",
    )
    .await;
    let rows: usize = out.iter().map(RecordBatch::num_rows).sum();
    assert_eq!(rows, 4);
}

#[tokio::test]
async fn a_failing_job_is_retried_with_backoff_then_recorded_failed() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(2, 500, 100, (today - 2) * DAY_US, NOW),
    )
    .await;
    let failing = "kind = \"sql\"\nschedule = \"0 4 * * *\"\nmax_attempts = 3\nretry_backoff_secs = 60\nsql = \"SELECT n / (n - n) AS r FROM (SELECT count(*) AS n FROM app_events WHERE dt = '{{date}}')\"\n";
    let catalog = catalog_with(&s, &[("broken.toml", failing)]);
    // The SQL plans: the failure is at run time.
    crate::jobs::check(&s.storage, &catalog).await.unwrap();
    let clock = MockClock::new(NOW);
    let a = scheduler(&s, &catalog, "a", &clock);
    let status = |r: Vec<crate::runs::RunRecord>| -> Vec<(String, i32)> {
        r.into_iter().map(|r| (r.status, r.attempt)).collect()
    };
    assert_eq!(status(a.tick().await.unwrap()), [(RETRYING.into(), 1)]);
    assert!(a.tick().await.unwrap().is_empty(), "backing off");
    clock.set(NOW + 61_000_000);
    assert_eq!(status(a.tick().await.unwrap()), [(RETRYING.into(), 2)]);
    clock.set(NOW + 122_000_000);
    assert!(a.tick().await.unwrap().is_empty(), "the back-off doubled");
    clock.set(NOW + 190_000_000);
    assert_eq!(status(a.tick().await.unwrap()), [(FAILED.into(), 3)]);
    clock.set(NOW + HOUR_US);
    assert!(a.tick().await.unwrap().is_empty(), "given up for this tick");
    let runs = crate::runs::list(&s.storage, Some("broken")).await.unwrap();
    assert_eq!(runs.len(), 3);
    assert!(
        runs.iter().all(|r| r
            .error
            .as_deref()
            .is_some_and(|e| e.to_lowercase().contains("divide by zero"))),
        "{runs:?}"
    );
}

#[tokio::test]
async fn a_job_waits_until_its_days_are_final() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(2, 500, 100, (today - 3) * DAY_US, NOW),
    )
    .await;
    // Reads a view, a week after its date.
    let text = "kind = \"sql\"\nschedule = \"0 4 * * *\"\nlag_days = 1\nsql = \"SELECT sum(events) AS n FROM active_devices_daily WHERE dt BETWEEN '{{date}}' AND '{{date+1}}'\"\n";
    let catalog = catalog_with(&s, &[("from_view.toml", text)]);
    let clock = MockClock::new(NOW);
    let a = scheduler(&s, &catalog, "a", &clock);
    let job: Arc<JobDef> = Arc::clone(catalog.job("from_view").unwrap());
    // The run of today-2 needs today-1 covered by the view, which was never published.
    let why = a.waiting_for(&job, date(today - 2)).await.unwrap();
    assert!(why.is_some_and(|w| w.contains("active_devices_daily")));
    assert!(
        a.tick().await.unwrap().is_empty(),
        "it waits, recording nothing"
    );
    BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&catalog),
        Arc::new(clock.clone()),
    )
    .run(Some("active_devices_daily"), &RunRequest::default())
    .await
    .unwrap();
    assert_eq!(a.waiting_for(&job, date(today - 2)).await.unwrap(), None);
    let done = a.tick().await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].status, SUCCEEDED);
}

#[tokio::test]
async fn concurrent_publishes_keep_each_others_days_and_the_same_days_conflict() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(4, 4_000, 500, (today - 4) * DAY_US, NOW),
    )
    .await;
    let clock: Arc<dyn Clock> = Arc::new(s.clock.clone());
    let layer = BatchLayer::new(s.storage.clone(), Arc::clone(&s.catalog), clock);
    let view = "active_devices_daily";
    let range = |a: i64, b: i64| RunRequest {
        from_day: Some(a),
        to_day: Some(b),
        ..Default::default()
    };
    layer
        .run(Some(view), &range(today - 4, today - 3))
        .await
        .unwrap();
    // Two runs that read the table at the same version: A publishes first...
    let url = s.storage.layout().view(view);
    let stale = s.storage.open(&url).await.unwrap().unwrap();
    let a = layer
        .run(Some(view), &range(today - 2, today - 2))
        .await
        .unwrap();
    // ...B, of another day, commits on top of A and keeps A's day.
    let v = &s.catalog.views[view];
    let days_b = BTreeSet::from([today - 1]);
    let version = crate::compute::publish_days(
        v,
        &url,
        stale,
        Vec::new(),
        &days_b,
        a[0].version.unwrap(),
        Some(&BTreeSet::from([today - 4, today - 3])),
        &[],
    )
    .await
    .unwrap();
    let table = s.storage.open(&url).await.unwrap().unwrap();
    let published = crate::compute::published(&table).await.unwrap();
    assert_eq!(published.coverage.version, Some(version));
    assert_eq!(
        published.coverage.days,
        (today - 4..today).collect::<BTreeSet<_>>(),
        "both runs' days are covered"
    );
    // A run of a day another run published meanwhile fails, and leaves nothing.
    let stale = s.storage.open(&url).await.unwrap().unwrap();
    layer
        .run(Some(view), &range(today - 3, today - 3))
        .await
        .unwrap();
    let before = s.storage.open(&url).await.unwrap().unwrap().version();
    let e = crate::compute::publish_days(
        v,
        &url,
        stale,
        Vec::new(),
        &BTreeSet::from([today - 3]),
        0,
        None,
        &[],
    )
    .await
    .unwrap_err();
    assert!(matches!(e, BatchError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("nothing was published"), "{e}");
    assert_eq!(
        s.storage.open(&url).await.unwrap().unwrap().version(),
        before
    );
}

#[tokio::test]
async fn rollback_restores_the_old_rows_and_coverage() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "a.jsonl",
        &events(5, 3_000, 500, (today - 3) * DAY_US, (today - 1) * DAY_US),
    )
    .await;
    let layer = layer_of(&s);
    let view = "active_devices_daily";
    let first = layer.run(Some(view), &RunRequest::default()).await.unwrap();
    let v1 = first[0].version.unwrap();
    let total_v1 = total(&s, view).await;
    // More history, for a covered day and a new one: a second publish.
    import(
        &s,
        "b.jsonl",
        &events(6, 1_000, 500, (today - 2) * DAY_US, today * DAY_US),
    )
    .await;
    layer.run(Some(view), &RunRequest::default()).await.unwrap();
    assert!(total(&s, view).await > total_v1);
    let history = crate::publishes::history(&s.storage, view).await.unwrap();
    assert_eq!(history.len(), 2);
    let v = crate::publishes::rollback(&s.storage, view, v1)
        .await
        .unwrap();
    assert!(v > v1);
    assert_eq!(total(&s, view).await, total_v1, "the old numbers");
    let table = s
        .storage
        .open(&s.storage.layout().view(view))
        .await
        .unwrap()
        .unwrap();
    let published = crate::compute::published(&table).await.unwrap();
    assert_eq!(
        published.coverage.days,
        BTreeSet::from([today - 3, today - 2]),
        "the old coverage"
    );
    let history = crate::publishes::history(&s.storage, view).await.unwrap();
    assert_eq!(history[0].kind, "rollback");
    assert_eq!(history[0].restored, Some(v1));
    // Rolling back to what is not a publish is refused, naming the publishes.
    let e = crate::publishes::rollback(&s.storage, view, 999)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not a publish"), "{e}");
}

#[tokio::test]
async fn a_day_closes_when_every_partition_is_archived_past_it() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(7, 2_000, 300, (today - 3) * DAY_US, NOW),
    )
    .await;
    let store = s.storage.objects().unwrap();
    let put = |p: PartitionProgress| {
        let store = Arc::clone(&store);
        async move {
            use object_store::ObjectStoreExt;
            store
                .put(
                    &PartitionProgress::path("app_events", p.partition),
                    serde_json::to_vec(&p).unwrap().into(),
                )
                .await
                .unwrap();
        }
    };
    // Partition 0 has archived into today; partition 1 lags, its newest event at 23:00 two
    // days ago: yesterday is not closed.
    put(PartitionProgress {
        partition: 0,
        offset: 10,
        event_time_us: Some(NOW - HOUR_US),
        caught_up_us: None,
        updated_us: NOW,
    })
    .await;
    put(PartitionProgress {
        partition: 1,
        offset: 10,
        event_time_us: Some((today - 1) * DAY_US - HOUR_US),
        caught_up_us: None,
        updated_us: NOW,
    })
    .await;
    let layer = layer_of(&s);
    assert_eq!(layer.first_open_day("app_events").await.unwrap(), today - 2);
    let r = layer
        .run(Some("active_devices_daily"), &RunRequest::default())
        .await
        .unwrap();
    assert_eq!(
        r[0].days,
        [today - 3].map(day_string),
        "only the closed day"
    );
    // Partition 1 catches up (nothing newer to read) at 00:30 today; with 15 minutes of
    // grace, yesterday closes.
    put(PartitionProgress {
        partition: 1,
        offset: 10,
        event_time_us: Some((today - 1) * DAY_US - HOUR_US),
        caught_up_us: Some(today * DAY_US + HOUR_US / 2),
        updated_us: NOW,
    })
    .await;
    let layer = layer.with_options(crate::BatchOptions {
        close_grace: Duration::from_secs(900),
        ..Default::default()
    });
    assert_eq!(layer.first_open_day("app_events").await.unwrap(), today);
    let r = layer
        .run(Some("active_devices_daily"), &RunRequest::default())
        .await
        .unwrap();
    assert_eq!(r[0].days, [today - 2, today - 1].map(day_string));
}

#[tokio::test]
async fn jobs_are_checked_against_the_real_tables_naming_the_file() {
    let s = setup();
    for (text, needle) in [
        (
            "kind = \"sql\"\nsql = \"SELECT nope FROM app_events\"\n",
            "nope",
        ),
        (
            "kind = \"sql\"\nsql = \"SELECT * FROM no_such_table\"\n",
            "no_such_table",
        ),
        (
            "kind = \"sql\"\nsql = \"DELETE FROM app_events\"\n",
            "bad.toml",
        ),
    ] {
        let dir = s.dir.join(format!("jobs-{}", needle.len()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("bad.toml"), text).unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let catalog = Catalog::load(&root.join("schemas"), &dir).unwrap();
        let e = crate::jobs::check(&s.storage, &catalog)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.toml") && e.contains(needle), "{text}: {e}");
    }
    // Jobs over views and over other jobs' outputs plan, in any order of their names.
    let catalog = catalog_with(
        &s,
        &[
            ("a_top.toml", "kind = \"sql\"\nsql = \"SELECT max(n) AS m FROM z_base\"\n"),
            ("z_base.toml", "kind = \"sql\"\nsql = \"SELECT app_id, sum(events) AS n FROM active_devices_daily GROUP BY app_id\"\n"),
        ],
    );
    crate::jobs::check(&s.storage, &catalog).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_of_different_days_at_once_both_keep_their_days() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(8, 6_000, 500, (today - 6) * DAY_US, NOW),
    )
    .await;
    let layer = layer_of(&s);
    let view = "active_devices_daily";
    layer
        .run(
            Some(view),
            &RunRequest {
                from_day: Some(today - 6),
                to_day: Some(today - 6),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let range = |a: i64, b: i64| RunRequest {
        from_day: Some(a),
        to_day: Some(b),
        ..Default::default()
    };
    let (x, y) = (range(today - 5, today - 3), range(today - 2, today - 1));
    let (a, b) = tokio::join!(layer.run(Some(view), &x), layer.run(Some(view), &y));
    a.unwrap();
    b.unwrap();
    let table = s
        .storage
        .open(&s.storage.layout().view(view))
        .await
        .unwrap()
        .unwrap();
    let published = crate::compute::published(&table).await.unwrap();
    assert_eq!(
        published.coverage.days,
        (today - 6..today).collect::<BTreeSet<_>>()
    );
    let closed = events(8, 6_000, 500, (today - 6) * DAY_US, NOW)
        .iter()
        .filter(|e| e.event_time < today * DAY_US)
        .count() as u64;
    assert_eq!(total(&s, view).await, closed, "every day's rows, once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_during_a_publish_sees_the_old_total_or_the_new() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "a.jsonl",
        &events(9, 6_000, 500, (today - 5) * DAY_US, today * DAY_US),
    )
    .await;
    let layer = layer_of(&s);
    let view = "active_devices_daily";
    layer.run(Some(view), &RunRequest::default()).await.unwrap();
    let old = total(&s, view).await;
    import(
        &s,
        "b.jsonl",
        &events(10, 3_000, 500, (today - 5) * DAY_US, today * DAY_US),
    )
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (storage, catalog, stop) =
            (s.storage.clone(), Arc::clone(&s.catalog), Arc::clone(&stop));
        tokio::spawn(async move {
            use tandem_core::traits::BatchViews;
            let v = &catalog.views[view];
            let views = crate::DeltaBatchViews::new(storage).with_refresh(Duration::ZERO);
            let from = (today - 10) * DAY_US;
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let cov = views.coverage(v).await.unwrap();
                let q = tandem_core::query::ViewQuery::all(v, from, today * DAY_US);
                let rows = views.query(v, &q, &cov).await.unwrap();
                let n: u64 = rows
                    .iter()
                    .map(|r| match r.states[0] {
                        tandem_core::metric::MetricState::Count(c) => c,
                        _ => unreachable!("the first metric is a count"),
                    })
                    .sum();
                seen.push((n, cov.days.len()));
                tokio::task::yield_now().await;
            }
            seen
        })
    };
    layer.run(Some(view), &RunRequest::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.await.unwrap();
    let new = total(&s, view).await;
    assert_eq!(new, old + 3_000);
    assert!(!seen.is_empty());
    for (n, days) in &seen {
        assert!(*n == old || *n == new, "saw {n}: neither {old} nor {new}");
        assert_eq!(*days, 5);
    }
    assert_eq!(seen.last().unwrap().0, new);
}

#[tokio::test]
async fn a_job_backfill_interrupted_mid_chunk_resumes_after_its_last_date() {
    let s = setup();
    let today = day_of(NOW);
    import(
        &s,
        "h.jsonl",
        &events(12, 3_000, 300, (today - 6) * DAY_US, NOW),
    )
    .await;
    let catalog = catalog_with(&s, &[("daily_count.toml", DAILY)]);
    let layer = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&catalog),
        Arc::new(s.clock.clone()),
    );
    let backfill = crate::backfill::Backfill {
        target: crate::backfill::Target::Job(Arc::clone(catalog.job("daily_count").unwrap())),
        from: today - 6,
        to: today - 1,
        chunk_days: 4,
        restart: false,
    };
    // An earlier run got through the first chunk's third date and was killed.
    let job = catalog.job("daily_count").unwrap();
    for d in today - 6..=today - 4 {
        let meta = vec![
            (
                crate::backfill::BACKFILL_KEY.to_string(),
                serde_json::json!(backfill.id()),
            ),
            (
                crate::backfill::BACKFILL_THROUGH_KEY.to_string(),
                serde_json::json!(day_string(d)),
            ),
        ];
        layer.run_job(job, date(d), meta).await.unwrap();
    }
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let observer: crate::backfill::BackfillObserver = {
        let seen = Arc::clone(&seen);
        Arc::new(move |p: &crate::backfill::BackfillProgress| {
            seen.lock()
                .unwrap()
                .push((p.chunk.clone(), p.done_days, p.total_days))
        })
    };
    let report = backfill.run(&layer, Some(observer)).await.unwrap();
    assert_eq!((report.resumed_days, report.published_days), (3, 3));
    assert_eq!(
        *seen.lock().unwrap(),
        [((day_string(today - 3), day_string(today - 1)), 6, 6)]
    );
    // Every date once, each equal to its day's events.
    let all = events(12, 3_000, 300, (today - 6) * DAY_US, NOW);
    let out = sql_in(
        &s,
        &catalog,
        "SELECT date, n FROM daily_count ORDER BY date",
    )
    .await;
    let got: Vec<(String, i64)> = out
        .iter()
        .flat_map(|b| {
            let d = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            let n = b.column(1).as_primitive::<Int64Type>().clone();
            (0..b.num_rows())
                .map(|i| (d.as_string::<i32>().value(i).to_string(), n.value(i)))
                .collect::<Vec<_>>()
        })
        .collect();
    let want: Vec<(String, i64)> = (today - 6..today)
        .map(|d| {
            (
                day_string(d),
                all.iter().filter(|e| day_of(e.event_time) == d).count() as i64,
            )
        })
        .collect();
    assert_eq!(got, want);
    // Run again: nothing left; --restart does it all again.
    let again = backfill.run(&layer, None).await.unwrap();
    assert_eq!((again.resumed_days, again.published_days), (6, 0));
    let restart = crate::backfill::Backfill {
        restart: true,
        ..backfill
    };
    assert_eq!(restart.run(&layer, None).await.unwrap().published_days, 6);
}

/// History imported with repeats (the same events in two files, some twice in one): every
/// view counts each event id once, however far apart the copies are.
#[tokio::test]
async fn repeated_event_ids_are_counted_once_by_the_recompute() {
    let s = setup();
    let today = day_of(NOW);
    let evs = events(14, 4_000, 500, (today - 3) * DAY_US, today * DAY_US);
    let mut first: Vec<Event> = evs.clone();
    first.extend(evs.iter().step_by(7).cloned());
    import(&s, "a.jsonl", &first).await;
    let again: Vec<Event> = evs.iter().step_by(3).cloned().collect();
    import(&s, "b.jsonl", &again).await;
    let layer = layer_of(&s);
    layer.run(None, &RunRequest::default()).await.unwrap();
    assert_eq!(total(&s, "active_devices_daily").await, evs.len() as u64);
    let out = sql(
        &s,
        "SELECT sum(purchases), sum(revenue) FROM purchases_daily",
    )
    .await;
    let purchases = out[0].column(0).as_primitive::<Int64Type>().value(0);
    assert_eq!(
        purchases as usize,
        evs.iter().filter(|e| e.event_name == "purchase").count()
    );
    let revenue = datafusion::arrow::compute::cast(out[0].column(1), &DataType::Utf8).unwrap();
    let cents: i128 = evs
        .iter()
        .filter_map(|e| e.revenue_usd)
        .map(|r| (r * 1e6).round() as i128)
        .sum();
    let shown: f64 = revenue.as_string::<i32>().value(0).parse().unwrap();
    assert_eq!((shown * 1e6).round() as i128, cents);
}
