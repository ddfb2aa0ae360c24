//! Publishing: idempotent reruns, dirty days, definition changes, imports.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tandem_core::paths::Layout;
use tandem_core::query::{Match, ViewQuery};
use tandem_core::storage::Storage;
use tandem_core::time::{day_of, day_string, MockClock};
use tandem_core::traits::BatchViews;
use tandem_core::view::{DAY_US, HOUR_US};
use tandem_core::Catalog;
use tandem_workload::{GenConfig, Generator};

use crate::{import_jsonl, BatchError, BatchLayer, DeltaBatchViews, RunRequest};

pub(crate) const NOW: i64 = 1_795_694_400_000_000; // 2026-11-26T12:00:00Z

pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) storage: Storage,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) clock: MockClock,
}

pub(crate) fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalog = Arc::new(Catalog::load(&root.join("schemas"), &root.join("jobs")).unwrap());
    let storage = Storage::new(Layout::local(&path.join("data")).unwrap()).unwrap();
    Setup {
        _dir: dir,
        dir: path,
        storage,
        catalog,
        clock: MockClock::new(NOW),
    }
}

pub(crate) fn write_lines(path: &Path, lines: &[String]) {
    let mut f = std::fs::File::create(path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// `n` generated events of `seed` (no late ones) in `[from, to)`, as JSON lines.
fn history(seed: u64, n: usize, from: i64, to: i64) -> Vec<String> {
    Generator::new(GenConfig {
        seed,
        late_share: 0.0,
        ..Default::default()
    })
    .history(n, from, to)
    .map(|e| e.to_json())
    .collect()
}

pub(crate) async fn total(s: &Setup, view: &str) -> u64 {
    let v = &s.catalog.views[view];
    let views = DeltaBatchViews::new(s.storage.clone()).with_refresh(std::time::Duration::ZERO);
    let cov = views.coverage(v).await.unwrap();
    let from = tandem_core::time::parse_instant("2026-11-01").unwrap();
    let q = ViewQuery::all(v, from, from + 26 * DAY_US);
    count_of(&views.query(v, &q, &cov).await.unwrap())
}

/// The sum of the first metric (a count) over rows.
fn count_of(rows: &[tandem_core::query::AggRow]) -> u64 {
    rows.iter()
        .map(|r| match r.states[0] {
            tandem_core::metric::MetricState::Count(c) => c,
            _ => panic!("the first metric is a count"),
        })
        .sum()
}

#[tokio::test]
async fn reruns_are_noops_and_late_events_mark_their_day_dirty() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let events: Vec<String> = Generator::new(GenConfig {
        late_share: 0.0,
        ..Default::default()
    })
    .history(5_000, NOW - 3 * DAY_US, NOW)
    .map(|e| e.to_json())
    .collect();
    let file = s.dir.join("history.jsonl");
    write_lines(&file, &events);
    let r = import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();
    assert_eq!((r.events, r.rejected), (5_000, 0));

    let batch = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&s.catalog),
        Arc::new(s.clock.clone()),
    );
    let first = batch
        .run(Some("active_devices_daily"), &RunRequest::default())
        .await
        .unwrap()
        .remove(0);
    let today = day_of(NOW);
    assert_eq!(
        first.days,
        (today - 3..today).map(day_string).collect::<Vec<_>>(),
        "closed days only"
    );
    let closed_events = Generator::new(GenConfig {
        late_share: 0.0,
        ..Default::default()
    })
    .history(5_000, NOW - 3 * DAY_US, NOW)
    .filter(|e| e.event_time < today * DAY_US)
    .count() as u64;
    assert_eq!(total(&s, "active_devices_daily").await, closed_events);

    // Nothing changed: nothing to do, and the version stays.
    let again = batch
        .run(Some("active_devices_daily"), &RunRequest::default())
        .await
        .unwrap()
        .remove(0);
    assert!(again.days.is_empty());
    assert_eq!(again.version, first.version);

    // A late event for two days ago: only that day is recomputed.
    let late = Generator::new(GenConfig {
        seed: 9,
        ..Default::default()
    })
    .next_at(NOW - 2 * DAY_US + HOUR_US);
    let file2 = s.dir.join("late.jsonl");
    write_lines(&file2, &[late.to_json()]);
    import_jsonl(&s.storage, &schema, &[&file2], NOW)
        .await
        .unwrap();
    let dirty = batch
        .run(Some("active_devices_daily"), &RunRequest::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(dirty.days, [day_string(today - 2)]);
    assert_eq!(total(&s, "active_devices_daily").await, closed_events + 1);

    // --full recomputes every closed day; a range must be closed.
    let full = batch
        .run(
            Some("active_devices_daily"),
            &RunRequest {
                full: true,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .remove(0);
    assert_eq!(full.days.len(), 3);
    assert_eq!(total(&s, "active_devices_daily").await, closed_events + 1);
    let open = RunRequest {
        from_day: Some(today - 1),
        to_day: Some(today),
        ..Default::default()
    };
    assert!(
        matches!(batch.run(None, &open).await, Err(BatchError::BadRequest(m)) if m.contains("not closed"))
    );
}

#[tokio::test]
async fn a_changed_definition_covers_nothing_until_recomputed() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let lines: Vec<String> = Generator::new(GenConfig {
        late_share: 0.0,
        ..Default::default()
    })
    .history(2_000, NOW - 2 * DAY_US, NOW)
    .map(|e| e.to_json())
    .collect();
    let file = s.dir.join("h.jsonl");
    write_lines(&file, &lines);
    import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();
    BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&s.catalog),
        Arc::new(s.clock.clone()),
    )
    .run(Some("purchases_daily"), &RunRequest::default())
    .await
    .unwrap();

    // The same view name, another meaning.
    let jobs = s.dir.join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("jobs/purchases_daily.toml"))
        .unwrap()
        .replace("'purchase'", "'install'");
    std::fs::write(jobs.join("purchases_daily.toml"), text).unwrap();
    let changed = Arc::new(Catalog::load(&root.join("schemas"), &jobs).unwrap());
    let views = DeltaBatchViews::new(s.storage.clone()).with_refresh(std::time::Duration::ZERO);
    let v = &changed.views["purchases_daily"];
    assert!(
        views.coverage(v).await.unwrap().days.is_empty(),
        "a batch of the old definition covers nothing"
    );
    let r = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&changed),
        Arc::new(s.clock.clone()),
    )
    .run(Some("purchases_daily"), &RunRequest::default())
    .await
    .unwrap()
    .remove(0);
    assert_eq!(r.days.len(), 2);
    assert_eq!(views.coverage(v).await.unwrap().days.len(), 2);
}

#[tokio::test]
async fn import_rejects_go_to_the_dead_letter_table() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let good = Generator::new(GenConfig::default())
        .next_at(NOW - DAY_US)
        .to_json();
    let file = s.dir.join("mixed.jsonl");
    write_lines(
        &file,
        &[
            good.clone(),
            "{not json".into(),
            String::new(),
            r#"{"event_id":"x"}"#.into(),
            good,
        ],
    );
    let r = import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();
    assert_eq!((r.events, r.rejected), (2, 2));
    let dlq = s
        .storage
        .open(&s.storage.layout().dead_letter("app_events"))
        .await
        .unwrap();
    assert!(dlq.is_some());
}

/// A published version is loaded once: queries answer from memory (here, after the view's
/// Parquet files are gone), the log is looked at once per refresh interval (in the background,
/// on the runtime given, by the commit after the loaded one), and a query answers from the
/// version its coverage names even when a newer one was loaded meanwhile.
#[tokio::test]
async fn published_versions_are_answered_from_memory_one_version_per_query() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let import = |name: &str, seed: u64, n: usize| {
        let lines: Vec<String> = history(seed, n, NOW - 3 * DAY_US, NOW - DAY_US);
        let file = s.dir.join(name);
        write_lines(&file, &lines);
        file
    };
    let batch = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&s.catalog),
        Arc::new(s.clock.clone()),
    );
    let publish = |file: PathBuf| {
        let (storage, schema, batch) = (s.storage.clone(), Arc::clone(&schema), batch.clone());
        async move {
            import_jsonl(&storage, &schema, &[&file], NOW)
                .await
                .unwrap();
            let full = RunRequest {
                full: true,
                ..Default::default()
            };
            batch
                .run(Some("active_devices_daily"), &full)
                .await
                .unwrap();
        }
    };
    publish(import("a.jsonl", 1, 2_000)).await;

    let view = &s.catalog.views["active_devices_daily"];
    let from = NOW - 10 * DAY_US;
    let q = ViewQuery::all(view, from, NOW);
    let slow =
        DeltaBatchViews::new(s.storage.clone()).with_refresh(std::time::Duration::from_secs(3600));
    let eager = DeltaBatchViews::new(s.storage.clone()).with_refresh(std::time::Duration::ZERO);
    let elsewhere = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let background = DeltaBatchViews::new(s.storage.clone())
        .with_refresh(std::time::Duration::from_millis(50))
        .with_runtime(Some(elsewhere.handle().clone()));
    let v1 = slow.coverage(view).await.unwrap();
    assert_eq!(background.coverage(view).await.unwrap(), v1);
    let first = count_of(&slow.query(view, &q, &v1).await.unwrap());
    assert_eq!(first, 2_000);
    let old = eager.coverage(view).await.unwrap();
    assert_eq!(old, v1);

    // The view's files go away: the loaded version still answers, without reading them.
    let table_dir = s.dir.join("data/views/active_devices_daily");
    let mut removed = 0;
    for entry in walk(&table_dir) {
        if entry.extension().is_some_and(|e| e == "parquet") {
            std::fs::remove_file(entry).unwrap();
            removed += 1;
        }
    }
    assert!(removed > 0);
    assert_eq!(count_of(&slow.query(view, &q, &v1).await.unwrap()), 2_000);

    // A new publish: the slow reader does not look at the log again within its interval; the
    // eager one loads the new version, and still answers a query begun on the old one from it.
    publish(import("b.jsonl", 2, 500)).await;
    assert_eq!(slow.coverage(view).await.unwrap(), v1);
    let v2 = eager.coverage(view).await.unwrap();
    assert!(v2.version > v1.version, "{v2:?}");
    assert_eq!(count_of(&eager.query(view, &q, &v2).await.unwrap()), 2_500);
    assert_eq!(count_of(&eager.query(view, &q, &old).await.unwrap()), 2_000);

    // The background reader answers from the loaded version until its look in the background
    // finds the next commit and loads it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let found = loop {
        let c = background.coverage(view).await.unwrap();
        if c.version == v2.version || std::time::Instant::now() > deadline {
            break c;
        }
        assert_eq!(c, v1, "only the loaded version or the new one");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(found, v2);
    assert_eq!(
        count_of(&background.query(view, &q, &v2).await.unwrap()),
        2_500
    );
    elsewhere.shutdown_background();
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Every answer a rollup gives equals the answer from the view's own rows: for every subset
/// of the dimensions grouped by, unfiltered or filtered by `in`, `not in` or `prefix` (each
/// filter checked against the unfiltered answer filtered here), at the view's granularity and the day, over
/// ranges that rollups can and cannot answer (counts, sums, minima, maxima and averages
/// exactly; distinct counts within 3 RSE, as sketches merged in another order may differ).
#[tokio::test]
async fn answers_from_rollups_equal_answers_from_the_view() {
    use tandem_core::metric::{hll_rse, MetricState};
    use tandem_core::query::RowSet;
    use tandem_core::view::Granularity;

    let s = setup();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let jobs = s.dir.join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    let view = |rollups: &str| {
        format!(
            r#"kind = "view"
source = "app_events"
granularity = "hour"
dimensions = ["app_id", "media_source", "country"]
{rollups}
metrics = [
  {{ name = "n", kind = "count" }},
  {{ name = "revenue", kind = "sum", field = "revenue_usd" }},
  {{ name = "least", kind = "min", field = "revenue_usd" }},
  {{ name = "most", kind = "max", field = "revenue_usd" }},
  {{ name = "mean", kind = "avg", field = "revenue_usd" }},
  {{ name = "devices", kind = "distinct", field = "device_id" }},
]"#
        )
    };
    std::fs::write(jobs.join("kinds.toml"), view("")).unwrap();
    std::fs::write(jobs.join("kinds_plain.toml"), view("rollups = []")).unwrap();
    let catalog = Arc::new(Catalog::load(&root.join("schemas"), &jobs).unwrap());
    let schema = Arc::clone(&catalog.schemas["app_events"]);
    let start = day_of(NOW - 4 * DAY_US) * DAY_US;
    let lines: Vec<String> = history(7, 6_000, start, day_of(NOW) * DAY_US);
    let file = s.dir.join("h.jsonl");
    write_lines(&file, &lines);
    import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();
    let reports = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&catalog),
        Arc::new(s.clock.clone()),
    )
    .run(None, &RunRequest::default())
    .await
    .unwrap();
    let rollup_rows = |name: &str| {
        reports
            .iter()
            .find(|r| r.view == name)
            .map(|r| (r.rows, r.rollup_rows))
            .unwrap()
    };
    let (rows, rollups) = rollup_rows("kinds");
    assert!(
        rows > 1_000 && rollups > 0,
        "{rows} rows, {rollups} rollup rows"
    );
    assert_eq!(rollup_rows("kinds_plain"), (rows, 0));

    let views = DeltaBatchViews::new(s.storage.clone()).with_refresh(std::time::Duration::ZERO);
    let (with, plain) = (&catalog.views["kinds"], &catalog.views["kinds_plain"]);
    let (cov_with, cov_plain) = (
        views.coverage(with).await.unwrap(),
        views.coverage(plain).await.unwrap(),
    );
    assert_eq!(cov_with.days.len(), 4);
    // Rows folded to the answer's granularity, as the serving merge folds them.
    let folded = |rows: Vec<tandem_core::query::AggRow>, g: Granularity| {
        let mut set = RowSet::default();
        for r in rows {
            set.add(g.floor(r.bucket_us), r.dims, r.states);
        }
        let mut rows = set.into_rows();
        rows.sort_by(|a, b| (a.bucket_us, &a.dims).cmp(&(b.bucket_us, &b.dims)));
        rows
    };
    let mut used = std::collections::BTreeSet::new();
    let ranges = [
        (start, start + 4 * DAY_US),
        (start + 5 * HOUR_US + 1, start + 3 * DAY_US),
        (start + DAY_US, start + 2 * DAY_US - 90 * 60_000_000),
    ];
    for (from, to) in ranges {
        for g in [
            Granularity::Hour,
            Granularity::Day,
            Granularity::Week,
            Granularity::Month,
        ] {
            for subset in 0..8usize {
                let filters = [
                    None,
                    Some(Match::In(vec!["US".into(), "DE".into()])),
                    Some(Match::NotIn(vec!["US".into()])),
                    Some(Match::Prefix("D".into())),
                ];
                for filter in filters {
                    let mut q = ViewQuery::all(with, from, to);
                    q.granularity = g;
                    q.group_by = (0..3).filter(|d| subset & (1 << d) != 0).collect();
                    if let Some(m) = &filter {
                        q.filters = vec![(2, m.clone())];
                        // The oracle: the same query unfiltered, grouped by country too, with
                        // the filter applied here (null passes no filter).
                        let mut all = q.clone();
                        all.filters.clear();
                        if !all.group_by.contains(&2) {
                            all.group_by.push(2);
                        }
                        let c = all.group_by.iter().position(|&d| d == 2).unwrap();
                        let mut kept = views.query(plain, &all, &cov_plain).await.unwrap();
                        kept.retain(|r| m.accepts(r.dims[c].as_deref()));
                        let got = views.query(plain, &q, &cov_plain).await.unwrap();
                        assert_eq!(count_of(&got), count_of(&kept), "{q:?}");
                    }
                    used.insert(views.answered_from(with, &q, &cov_with).await.unwrap());
                    assert_eq!(
                        views.answered_from(plain, &q, &cov_plain).await.unwrap(),
                        None
                    );
                    let a = folded(views.query(with, &q, &cov_with).await.unwrap(), g);
                    let b = folded(views.query(plain, &q, &cov_plain).await.unwrap(), g);
                    let what = format!("{q:?}");
                    assert!(!b.is_empty(), "{what}");
                    assert_eq!(a.len(), b.len(), "{what}");
                    for (x, y) in a.iter().zip(&b) {
                        assert_eq!((x.bucket_us, &x.dims), (y.bucket_us, &y.dims), "{what}");
                        for (m, (sx, sy)) in x.states.iter().zip(&y.states).enumerate() {
                            match (sx, sy) {
                                (MetricState::Distinct(dx), MetricState::Distinct(dy)) => {
                                    let (ex, ey) = (dx.estimate(), dy.estimate());
                                    let bound = 3.0 * hll_rse(dx.lg_k()) * ex.max(ey) + 1.0;
                                    assert!((ex - ey).abs() <= bound, "{what}: {ex} vs {ey}");
                                }
                                _ => assert_eq!(sx, sy, "metric {m} of {what}"),
                            }
                        }
                    }
                }
            }
        }
    }
    // The rollups did answer: by the hour, by the day, and the view's own rows where none can.
    for name in [
        "hour",
        "hour.country",
        "day.media_source",
        "day.app_id.media_source.country",
    ] {
        assert!(
            used.contains(&Some(name.to_string())),
            "{name} unused: {used:?}"
        );
    }
    assert!(used.contains(&None), "{used:?}");

    // New York's days and weeks start at 04:00 or 05:00 UTC: no day rollup can answer them,
    // hour rollups can, and the answer is the view's own.
    for g in [Granularity::Day, Granularity::Week] {
        let mut q = ViewQuery::all(with, start, start + 4 * DAY_US);
        q.granularity = g;
        q.tz = Some(chrono_tz::America::New_York);
        q.group_by = vec![1];
        let from = views.answered_from(with, &q, &cov_with).await.unwrap();
        assert!(
            from.as_deref().is_none_or(|r| r.starts_with("hour")),
            "{from:?}"
        );
        let fold = |rows: Vec<tandem_core::query::AggRow>| {
            let mut set = RowSet::default();
            for r in rows {
                set.add(q.answer_bucket(r.bucket_us), r.dims, r.states);
            }
            let mut rows = set.into_rows();
            rows.sort_by(|a, b| (a.bucket_us, &a.dims).cmp(&(b.bucket_us, &b.dims)));
            rows.into_iter()
                .map(|r| (r.bucket_us, r.dims, r.states[0].clone()))
                .collect::<Vec<_>>()
        };
        let a = fold(views.query(with, &q, &cov_with).await.unwrap());
        let b = fold(views.query(plain, &q, &cov_plain).await.unwrap());
        assert!(!a.is_empty());
        assert_eq!(a, b, "{g}");
    }

    // A query's memory is bounded: past the most grouped rows it may hold, it is refused as a
    // bad query that says so; a smaller one is answered.
    let bounded = DeltaBatchViews::new(s.storage.clone())
        .with_refresh(std::time::Duration::ZERO)
        .with_max_groups(100);
    assert_eq!(bounded.coverage(plain).await.unwrap(), cov_plain);
    let mut q = ViewQuery::all(plain, start, start + 4 * DAY_US);
    q.group_by = vec![0, 1, 2];
    let err = bounded.query(plain, &q, &cov_plain).await.unwrap_err();
    assert!(
        matches!(&err, tandem_core::CoreError::BadQuery(m) if m.contains("more than 100 rows of `kinds_plain`")),
        "{err}"
    );
    q.group_by = Vec::new();
    q.granularity = Granularity::Day;
    assert_eq!(
        bounded.query(plain, &q, &cov_plain).await.unwrap().len(),
        4 * 24
    );
}

/// Writes `lines` (JSON objects) as a Parquet file with the reference generator's column types:
/// millisecond UTC timestamps, revenue as a double.
fn write_parquet(path: &Path, lines: &[String]) {
    write_parquet_with(path, lines, None)
}

/// [`write_parquet`] with writer properties.
fn write_parquet_with(
    path: &Path,
    lines: &[String],
    props: Option<datafusion::parquet::file::properties::WriterProperties>,
) {
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let s = |n: &str, nullable: bool| Field::new(n, DataType::Utf8, nullable);
    let schema = Arc::new(Schema::new(vec![
        s("event_id", false),
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        s("app_id", false),
        s("event_name", false),
        s("media_source", true),
        s("campaign", true),
        s("country", true),
        s("platform", true),
        s("device_id", true),
        Field::new("revenue_usd", DataType::Float64, true),
    ]));
    let text = lines.join("\n");
    let reader = datafusion::arrow::json::ReaderBuilder::new(Arc::clone(&schema))
        .build(std::io::Cursor::new(text.into_bytes()))
        .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(file, schema, props).unwrap();
    for b in reader {
        w.write(&b.unwrap()).unwrap();
    }
    w.close().unwrap();
}

async fn dead_letters(s: &Setup) -> usize {
    let url = s.storage.layout().dead_letter("app_events");
    if s.storage.open(&url).await.unwrap().is_none() {
        return 0;
    }
    let b = sql_on(s, &url, "SELECT count(*) FROM t").await;
    use datafusion::arrow::array::AsArray;
    b[0].column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .value(0) as usize
}

/// Parquet history is held to the JSON rules (a row without its required `device_id` is a dead
/// letter, revenue stays exact), and a file whose content was imported before, under any name
/// or format, is skipped: running an import twice adds nothing.
#[tokio::test]
async fn parquet_imports_are_checked_like_json_and_never_imported_twice() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let mut lines: Vec<String> = Generator::new(GenConfig {
        late_share: 0.0,
        ..Default::default()
    })
    .history(3_000, NOW - 3 * DAY_US, NOW - DAY_US)
    .map(|e| e.to_json())
    .collect();
    // Milliseconds, as in the reference Parquet files, and one row without a device.
    for l in &mut lines {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        let t = tandem_core::time::parse_instant(v["event_time"].as_str().unwrap()).unwrap();
        v["event_time"] = serde_json::json!(t / 1000);
        *l = v.to_string();
    }
    let mut broken: serde_json::Value = serde_json::from_str(&lines[7]).unwrap();
    broken["device_id"] = serde_json::Value::Null;
    lines[7] = broken.to_string();
    let dir = s.dir.join("history");
    std::fs::create_dir_all(dir.join("dt=a")).unwrap();
    write_parquet(&dir.join("dt=a/part-0.parquet"), &lines[..1_000]);
    write_parquet(&dir.join("dt=a/part-1.parquet"), &lines[1_000..]);

    let mut seen = Vec::new();
    let r = crate::import_files(&s.storage, &schema, &[&dir], NOW, |f| {
        if f.done {
            seen.push((f.index, f.of, f.events, f.rejected, f.skipped))
        }
    })
    .await
    .unwrap();
    assert_eq!((r.files, r.events, r.rejected, r.skipped), (2, 2_999, 1, 0));
    assert_eq!(
        seen,
        [(1, 2, 999, 1, false), (2, 2, 2_000, 0, false)],
        "a report per file, in order"
    );
    assert_eq!(dead_letters(&s).await, 1);

    // Again, and the same content under another name: nothing is added.
    let copy = s.dir.join("copy.parquet");
    std::fs::copy(dir.join("dt=a/part-1.parquet"), &copy).unwrap();
    let again = crate::import_files(&s.storage, &schema, &[dir.clone(), copy], NOW, |_| {})
        .await
        .unwrap();
    assert_eq!((again.files, again.events, again.skipped), (0, 0, 3));
    assert_eq!(
        dead_letters(&s).await,
        1,
        "the dead letters are not repeated"
    );

    let batch = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&s.catalog),
        Arc::new(s.clock.clone()),
    );
    batch
        .run(Some("active_devices_daily"), &RunRequest::default())
        .await
        .unwrap();
    assert_eq!(total(&s, "active_devices_daily").await, 2_999);
}

/// A file is written to the master dataset as it is decoded and committed once its last row
/// is: a file that breaks part way (here a Parquet file whose fifth row group is damaged), after
/// its first rows were written, fails the import and commits nothing of it; the file made
/// whole is then imported with every row once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_breaks_part_way_commits_none_of_its_rows() {
    use datafusion::parquet::file::properties::WriterProperties;
    use datafusion::parquet::file::reader::{FileReader, SerializedFileReader};
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let lines = history(7, 3_000, NOW - 3 * DAY_US, NOW - DAY_US);
    let props = || {
        Some(
            WriterProperties::builder()
                .set_max_row_group_row_count(Some(500))
                .set_write_batch_size(500)
                .build(),
        )
    };
    let broken = s.dir.join("broken.parquet");
    write_parquet_with(&broken, &lines, props());
    let meta = SerializedFileReader::new(std::fs::File::open(&broken).unwrap())
        .unwrap()
        .metadata()
        .clone();
    assert_eq!(meta.num_row_groups(), 6);
    // The fifth row group's first page header overwritten.
    let chunk = meta.row_group(4).column(0);
    let at = chunk
        .dictionary_page_offset()
        .unwrap_or(chunk.data_page_offset()) as usize;
    let mut bytes = std::fs::read(&broken).unwrap();
    bytes[at..at + 32].fill(0xff);
    std::fs::write(&broken, bytes).unwrap();

    let failed = crate::import_files(&s.storage, &schema, &[&broken], NOW, |_| {}).await;
    let error = failed
        .expect_err("a damaged file fails its import")
        .to_string();
    assert!(error.contains("broken.parquet"), "names the file: {error}");
    let (rows, _, files) = master_state(&s).await;
    assert_eq!(rows, 0, "nothing of the broken file is committed");
    assert!(files.is_empty(), "{files:?}");

    let whole = s.dir.join("whole.parquet");
    write_parquet_with(&whole, &lines, props());
    let r = crate::import_files(&s.storage, &schema, &[&whole], NOW, |_| {})
        .await
        .unwrap();
    assert_eq!((r.files, r.events, r.rejected), (1, 3_000, 0));
    let (rows, _, files) = master_state(&s).await;
    assert_eq!(rows, 3_000, "every row once");
    assert!(files.len() >= 2, "the file's days: {files:?}");
}

/// A Parquet file whose columns carry over (the reference types: strings, millisecond UTC
/// times, revenue as a double) is taken as columns, without passing through JSON, and lands in
/// the master dataset row for row as the same events imported as JSON lines do.
#[tokio::test]
async fn parquet_taken_as_columns_lands_as_its_json_lines_do() {
    let (a, b) = (setup(), setup());
    let schema = Arc::clone(&a.catalog.schemas["app_events"]);
    let lines: Vec<String> = Generator::new(GenConfig {
        late_share: 0.0,
        ..Default::default()
    })
    .history(2_000, NOW - 3 * DAY_US, NOW - DAY_US)
    .map(|e| {
        let mut v: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
        let t = tandem_core::time::parse_instant(v["event_time"].as_str().unwrap()).unwrap();
        v["event_time"] = serde_json::json!(t / 1000);
        v.to_string()
    })
    .collect();
    assert!(lines.iter().any(|l| l.contains("revenue_usd")));
    let jsonl = a.dir.join("events.jsonl");
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let parquet = b.dir.join("events.parquet");
    write_parquet(&parquet, &lines);

    // Every batch of the file is taken as columns.
    let file = std::fs::File::open(&parquet).unwrap();
    let reader =
        datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
    let mut before = 0;
    for batch in reader {
        let batch = batch.unwrap();
        let d = crate::import::direct(&schema, &batch, before, NOW + DAY_US)
            .unwrap()
            .expect("the reference columns are taken as they are");
        assert_eq!(d.offsets[0], before + 1);
        before += batch.num_rows() as i64;
    }

    let ra = crate::import_files(&a.storage, &schema, &[&jsonl], NOW, |_| {})
        .await
        .unwrap();
    let rb = crate::import_files(&b.storage, &schema, &[&parquet], NOW, |_| {})
        .await
        .unwrap();
    assert_eq!((ra.events, ra.rejected), (2_000, 0));
    assert_eq!((rb.events, rb.rejected), (2_000, 0));
    let mut all = Vec::new();
    for s in [&a, &b] {
        let url = s.storage.layout().master("app_events");
        let rows = sql_on(s, &url, "SELECT * FROM t ORDER BY _offset").await;
        all.push(
            datafusion::arrow::util::pretty::pretty_format_batches(&rows)
                .unwrap()
                .to_string(),
        );
    }
    let (from_json, from_parquet) = (&all[0], &all[1]);
    assert_eq!(from_json.lines().count(), 2_000 + 4);
    assert_eq!(from_json, from_parquet);
}

/// Every row of `view` as the serving layer reads it, sorted, with metric states shown (exact
/// counts and sums, sketch estimates).
async fn rows_of(storage: &Storage, view: &tandem_core::view::ViewDef) -> Vec<String> {
    let mut rows: Vec<String> = published_rows(storage, view)
        .await
        .iter()
        .map(|r| format!("{} {:?} {:?}", r.bucket_us, r.dims, r.states))
        .collect();
    rows.sort();
    rows
}

/// A view's published rows by every dimension, as served, over the last 30 days.
async fn published_rows(
    storage: &Storage,
    view: &tandem_core::view::ViewDef,
) -> Vec<tandem_core::query::AggRow> {
    let views = DeltaBatchViews::new(storage.clone()).with_refresh(std::time::Duration::ZERO);
    let cov = views.coverage(view).await.unwrap();
    let mut q = ViewQuery::all(view, NOW - 30 * DAY_US, NOW);
    q.group_by = (0..view.dimensions.len()).collect();
    q.limit = usize::MAX;
    views.query(view, &q, &cov).await.unwrap()
}

/// The batch benchmark's hourly cube (five dimensions, a count, a distinct and a sum) and
/// the countries of each app a day (a distinct whose values repeat within groups, a count
/// and an average, filtered on its dimension) as the views of a catalog, over `events` events of
/// `seed` imported into `s`'s store.
async fn cube_store(s: &Setup, seed: u64, events: usize) -> Arc<Catalog> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let jobs = s.dir.join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    std::fs::write(
        jobs.join("cube_hourly.toml"),
        r#"kind = "view"
source = "app_events"
granularity = "hour"
dimensions = ["app_id", "media_source", "campaign", "country", "event_name"]
metrics = [
  { name = "events", kind = "count" },
  { name = "devices", kind = "distinct", field = "device_id" },
  { name = "revenue_usd", kind = "sum", field = "revenue_usd" },
]"#,
    )
    .unwrap();
    std::fs::write(
        jobs.join("countries_daily.toml"),
        r#"kind = "view"
source = "app_events"
granularity = "day"
dimensions = ["app_id"]
filter = "app_id <> 'com.example.app001'"
metrics = [
  { name = "countries", kind = "distinct", field = "country" },
  { name = "events", kind = "count" },
  { name = "revenue_usd", kind = "avg", field = "revenue_usd" },
]"#,
    )
    .unwrap();
    let catalog = Arc::new(Catalog::load(&root.join("schemas"), &jobs).unwrap());
    let lines = history(seed, events, NOW - 3 * DAY_US, NOW - DAY_US);
    import_lines(s, &catalog, "h.jsonl", &lines).await;
    catalog
}

/// Writes `lines` to the file `name` in `s`'s folder and imports it as `app_events` of
/// `catalog`.
async fn import_lines(s: &Setup, catalog: &Catalog, name: &str, lines: &[String]) {
    let file = s.dir.join(name);
    write_lines(&file, lines);
    let schema = Arc::clone(&catalog.schemas["app_events"]);
    import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();
}

/// Under a memory limit far below what a day's events hold, the recompute has DataFusion
/// group them by the keys and the distinct value first, spilling to disk, and publishes the
/// same rows as without one, where the cube's rows are folded from the events as they are and
/// the daily countries' (whose values repeat within groups) grouped in memory first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recompute_under_a_small_memory_limit_spills_and_publishes_the_same_rows() {
    let s = setup();
    let catalog = cube_store(&s, 11, 60_000).await;
    let full = RunRequest {
        full: true,
        ..Default::default()
    };
    let layer = |options: crate::BatchOptions| {
        BatchLayer::new(
            s.storage.clone(),
            Arc::clone(&catalog),
            Arc::new(s.clock.clone()),
        )
        .with_options(options)
    };
    // (The countries' first phase is small enough not to spill.)
    for (name, least, spills) in [
        ("cube_hourly", 10_000, true),
        ("countries_daily", 100, false),
    ] {
        let view = &catalog.views[name];
        let free = layer(crate::BatchOptions::default())
            .run(Some(name), &full)
            .await
            .unwrap()
            .remove(0);
        let unlimited = rows_of(&s.storage, view).await;
        assert!(unlimited.len() > least, "{name}: {}", unlimited.len());
        assert_eq!(free.per_day.iter().map(|d| d.spilled_bytes).sum::<u64>(), 0);

        let spill = tempfile::tempdir().unwrap();
        let small = layer(crate::BatchOptions {
            threads: Some(2),
            memory_limit: Some(2 << 20),
            spill_dir: Some(spill.path().to_path_buf()),
            ..Default::default()
        })
        .run(Some(name), &full)
        .await
        .unwrap()
        .remove(0);
        assert_eq!(
            small.per_day.iter().map(|d| d.spilled_bytes).sum::<u64>() > 0,
            spills,
            "{name}: a 2 MiB limit makes the cube's first phase spill: {:?}",
            small.per_day
        );
        assert_eq!(small.rows, free.rows, "{name}");
        assert_eq!(small.rollup_rows, free.rollup_rows, "{name}");
        assert_eq!(small.rows_read, 60_000, "{name}");
        assert!(small.version > free.version, "{name}");
        // Counts, sums and exact distinct counts are equal; a sketch past its exact modes
        // estimates by the order its values came in, within 3 RSE (lg_k 12: 1.6%) of the other.
        let limited = rows_of(&s.storage, view).await;
        assert_eq!(limited.len(), unlimited.len(), "{name}");
        if view.filter.is_some() {
            assert!(
                unlimited.iter().all(|r| !r.contains("app001")),
                "{name}: the filter holds"
            );
        }
        let estimate = |row: &str| -> (String, Vec<f64>) {
            let mut rest = String::new();
            let mut estimates = Vec::new();
            for (i, part) in row.split("estimate: ").enumerate() {
                let value_end = part.find(',').filter(|_| i > 0).unwrap_or(0);
                if i > 0 {
                    estimates.push(part[..value_end].parse().unwrap());
                }
                rest.push_str(&part[value_end..]);
            }
            (rest, estimates)
        };
        for (a, b) in limited.iter().zip(&unlimited) {
            let ((a_rest, a_est), (b_rest, b_est)) = (estimate(a), estimate(b));
            assert_eq!(a_rest, b_rest, "{name}");
            for (x, y) in a_est.iter().zip(&b_est) {
                assert!(
                    (x - y).abs() <= 3.0 * 0.0163 * y.max(1.0),
                    "{name}: {a} / {b}"
                );
            }
        }
    }
    // Both views together under the limit (a day read once for both if the pool holds it,
    // else by each alone): the exact rows are the same.
    let before: Vec<_> = ["countries_daily", "cube_hourly"]
        .iter()
        .map(|n| &catalog.views[*n])
        .collect();
    let mut exact = Vec::new();
    for v in &before {
        exact.push(exact_rows_of(&s.storage, v).await);
    }
    let together = layer(crate::BatchOptions {
        memory_limit: Some(2 << 20),
        ..Default::default()
    })
    .run(None, &full)
    .await
    .unwrap();
    assert!(together.iter().all(|r| r.rows > 0 && r.days.len() == 3));
    for (v, rows) in before.iter().zip(&exact) {
        let now = exact_rows_of(&s.storage, v).await;
        let keys = |r: &[(String, Vec<f64>)]| r.iter().map(|r| r.0.clone()).collect::<Vec<_>>();
        assert_eq!(keys(&now), keys(rows), "{}", v.name);
    }
}

/// The view's own table is built in one part per thread: however many parts, the published
/// rows are the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_views_rows_are_the_same_however_many_threads_build_them() {
    let s = setup();
    let catalog = cube_store(&s, 5, 20_000).await;
    let view = &catalog.views["cube_hourly"];
    let full = RunRequest {
        full: true,
        ..Default::default()
    };
    let mut published = Vec::new();
    for threads in [1, 3] {
        let report = BatchLayer::new(
            s.storage.clone(),
            Arc::clone(&catalog),
            Arc::new(s.clock.clone()),
        )
        .with_options(crate::BatchOptions {
            threads: Some(threads),
            ..Default::default()
        })
        .run(Some("cube_hourly"), &full)
        .await
        .unwrap()
        .remove(0);
        published.push((
            report.rows,
            report.rollup_rows,
            rows_of(&s.storage, view).await,
        ));
    }
    assert!(published[0].2.len() > 1_000, "{}", published[0].2.len());
    assert_eq!(published[0], published[1]);
}

/// The answer of `sql` over the Delta table at `url`, registered as `t`.
async fn sql_on(
    s: &Setup,
    url: &url::Url,
    sql: &str,
) -> Vec<datafusion::arrow::record_batch::RecordBatch> {
    let t = s.storage.open(url).await.unwrap().unwrap();
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_table("t", t.table_provider().await.unwrap())
        .unwrap();
    ctx.sql(sql).await.unwrap().collect().await.unwrap()
}

/// Rows and revenue of the master dataset, and its data files by day.
async fn master_state(s: &Setup) -> (i64, String, std::collections::BTreeMap<String, usize>) {
    let url = s.storage.layout().master("app_events");
    let b = sql_on(
        s,
        &url,
        "SELECT count(*), CAST(sum(revenue_usd) AS VARCHAR) FROM t",
    )
    .await;
    use datafusion::arrow::array::AsArray;
    let rows = b[0]
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .value(0);
    let revenue = datafusion::arrow::compute::cast(
        b[0].column(1),
        &datafusion::arrow::datatypes::DataType::Utf8,
    )
    .unwrap()
    .as_string::<i32>()
    .value(0)
    .to_string();
    let mut files = std::collections::BTreeMap::new();
    for f in master_files(s).await {
        let day = f.partition_values_map()["dt"].clone().unwrap();
        *files.entry(day).or_insert(0) += 1;
    }
    (rows, revenue, files)
}

/// The master dataset's files, as its log names them.
async fn master_files(s: &Setup) -> Vec<deltalake::kernel::LogicalFileView> {
    let url = s.storage.layout().master("app_events");
    let t = s.storage.open(&url).await.unwrap().unwrap();
    use futures::TryStreamExt;
    t.get_active_add_actions_by_partitions(&[])
        .try_collect()
        .await
        .unwrap()
}

/// Compaction merges each day's small files without changing a row, a recompute after it finds
/// nothing dirty, and imports stay idempotent; vacuum deletes what compaction replaced and a
/// file no commit names (as a crash leaves), and the table reads the same after.
#[tokio::test]
async fn compaction_keeps_the_rows_and_vacuum_removes_replaced_and_orphan_files() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let mut files = Vec::new();
    for seed in 1..=3 {
        let lines: Vec<String> = history(seed, 1_000, NOW - 3 * DAY_US, NOW - DAY_US);
        let f = s.dir.join(format!("part{seed}.jsonl"));
        write_lines(&f, &lines);
        files.push(f);
    }
    import_jsonl(&s.storage, &schema, &files, NOW)
        .await
        .unwrap();
    let batch = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&s.catalog),
        Arc::new(s.clock.clone()),
    );
    batch.run(None, &RunRequest::default()).await.unwrap();
    let (rows, revenue, before) = master_state(&s).await;
    assert_eq!(rows, 3_000);
    assert!(before.values().all(|&n| n == 3), "{before:?}");

    let tables = crate::maintenance::tables(&s.storage, &s.catalog);
    let master = tables
        .iter()
        .find(|t| t.name == "master/app_events")
        .unwrap();
    let r = crate::maintenance::compact(&s.storage, master, None, 128 << 20)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r.files_removed as usize, before.values().sum::<usize>());
    assert_eq!(r.files_added as usize, before.len());
    let (rows_after, revenue_after, after) = master_state(&s).await;
    assert_eq!((rows_after, revenue_after), (rows, revenue.clone()));
    assert!(after.values().all(|&n| n == 1), "{after:?}");
    // Compacting again finds nothing to do.
    let again = crate::maintenance::compact(&s.storage, master, None, 128 << 20)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.files_removed, again.version), (0, None));

    // No day became dirty, and an import of the same files adds nothing.
    let rerun = batch.run(None, &RunRequest::default()).await.unwrap();
    assert!(rerun.iter().all(|r| r.days.is_empty()), "{rerun:?}");
    let r = import_jsonl(&s.storage, &schema, &files, NOW)
        .await
        .unwrap();
    assert_eq!((r.files, r.skipped), (0, 3));

    // A data file written but never committed.
    let day_dir = s
        .dir
        .join("data/master/app_events")
        .join(format!("dt={}", after.keys().next().unwrap()));
    let committed = std::fs::read_dir(&day_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "parquet"))
        .unwrap();
    let orphan = day_dir.join("part-00000-orphan-c000.snappy.parquet");
    std::fs::copy(&committed, &orphan).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));

    let dry = crate::maintenance::vacuum(&s.storage, master, std::time::Duration::ZERO, true)
        .await
        .unwrap()
        .unwrap();
    assert!(dry.files.iter().any(|f| f.contains("orphan")), "{dry:?}");
    assert_eq!(
        dry.files.len(),
        before.values().sum::<usize>() + 1,
        "{dry:?}"
    );
    assert!(orphan.exists(), "a dry run deletes nothing");
    let done = crate::maintenance::vacuum(&s.storage, master, std::time::Duration::ZERO, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.files, dry.files);
    assert!(!orphan.exists());
    let (rows_vacuumed, revenue_vacuumed, _) = master_state(&s).await;
    assert_eq!((rows_vacuumed, revenue_vacuumed), (rows, revenue));
}

/// Erasing a device deletes its events from the master dataset and its dead letters, marks
/// their days dirty so the next run republishes them without it, and leaves an audit record
/// that does not hold the value.
#[tokio::test]
async fn erasure_removes_a_subject_everywhere_and_is_audited() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let mut lines: Vec<String> = history(4, 3_000, NOW - 3 * DAY_US, NOW - DAY_US);
    let device = {
        let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        v["device_id"].as_str().unwrap().to_string()
    };
    let of_device = lines.iter().filter(|l| l.contains(&device)).count() as u64;
    // A dead letter of the same device (no event id) and one of another.
    lines.push(format!(r#"{{"device_id":"{device}","app_id":"x"}}"#));
    lines.push(r#"{"device_id":"someone-else","app_id":"x"}"#.to_string());
    let file = s.dir.join("h.jsonl");
    write_lines(&file, &lines);
    let r = import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();
    assert_eq!((r.events, r.rejected), (3_000, 2));
    let batch = BatchLayer::new(
        s.storage.clone(),
        Arc::clone(&s.catalog),
        Arc::new(s.clock.clone()),
    );
    batch.run(None, &RunRequest::default()).await.unwrap();
    let before = total(&s, "active_devices_daily").await;

    let err = crate::erase::erase(&s.storage, &schema, "nope", &device, "dpo", NOW)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no field `nope`"), "{err}");

    let r = crate::erase::erase(&s.storage, &schema, "device_id", &device, "dpo", NOW)
        .await
        .unwrap();
    assert_eq!((r.master_rows, r.dead_letter_rows), (of_device, 1));
    assert!(!r.days.is_empty());
    assert_eq!(master_state(&s).await.0 as u64, 3_000 - of_device);
    assert_eq!(dead_letters(&s).await, 1);

    // The next run recomputes exactly the subject's days.
    let rerun = batch
        .run(Some("active_devices_daily"), &RunRequest::default())
        .await
        .unwrap()
        .remove(0);
    assert_eq!(rerun.days, r.days);
    assert_eq!(total(&s, "active_devices_daily").await, before - of_device);

    // Audited without the value.
    let rows = sql_on(
        &s,
        &s.storage.layout().erasures(),
        "SELECT who, field, value_sha256, master_rows FROM t",
    )
    .await;
    let shown = datafusion::arrow::util::pretty::pretty_format_batches(&rows)
        .unwrap()
        .to_string();
    assert!(
        shown.contains("dpo") && shown.contains(&r.value_sha256),
        "{shown}"
    );
    assert!(!shown.contains(&device), "{shown}");

    // Erasing again finds nothing and is audited too.
    let again = crate::erase::erase(&s.storage, &schema, "device_id", &device, "dpo", NOW)
        .await
        .unwrap();
    assert_eq!((again.master_rows, again.dead_letter_rows), (0, 0));
}

/// Dead letters are listed by reason and time with their bytes printable; a replay moves those
/// that are events now into the master dataset once, even when it was interrupted between its
/// two commits, and leaves the rest.
#[tokio::test]
async fn dead_letters_are_listed_and_replayed_once_even_after_an_interrupted_replay() {
    use crate::dlq::{list, replay, replay_with, Filter};
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    let mut gen = Generator::new(GenConfig::default());
    let good = gen.next_at(NOW - DAY_US).to_json();
    // Two days ahead of the clock: refused now, an event once the clock has moved on.
    let future = gen.next_at(NOW + 2 * DAY_US).to_json();
    let file = s.dir.join("mixed.jsonl");
    write_lines(
        &file,
        &[
            good,
            future.clone(),
            "{not json\u{1}".into(),
            r#"{"event_id":"x"}"#.into(),
        ],
    );
    import_jsonl(&s.storage, &schema, &[&file], NOW)
        .await
        .unwrap();

    let all = list(&s.storage, &schema, &Filter::default()).await.unwrap();
    assert_eq!(all.len(), 3);
    let late = Filter {
        reason: Some("event_time".into()),
        ..Default::default()
    };
    let only = list(&s.storage, &schema, &late).await.unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].raw, future.as_bytes());
    assert_eq!(only[0].offset, 2);
    let broken = all.iter().find(|d| d.reason == "decode").unwrap();
    assert_eq!(crate::dlq::printable(&broken.raw), "{not json\\u{1}");
    let since = Filter {
        since_us: Some(NOW + 1),
        ..Default::default()
    };
    assert!(list(&s.storage, &schema, &since).await.unwrap().is_empty());

    // Nothing changed: nothing moves.
    let r = replay(&s.storage, &schema, &Filter::default(), NOW)
        .await
        .unwrap();
    assert_eq!((r.moved, r.still_rejected), (0, 3));

    // Three days later the future event is an event; the first replay stops between its
    // commits, the next one finishes it and moves nothing twice.
    let later = NOW + 3 * DAY_US;
    replay_with(&s.storage, &schema, &Filter::default(), later, true)
        .await
        .unwrap();
    assert_eq!(master_state(&s).await.0, 2);
    assert_eq!(dead_letters(&s).await, 3, "interrupted before the delete");
    let r = replay(&s.storage, &schema, &Filter::default(), later)
        .await
        .unwrap();
    assert_eq!((r.finished_earlier, r.moved, r.still_rejected), (1, 0, 2));
    assert_eq!(master_state(&s).await.0, 2);
    assert_eq!(dead_letters(&s).await, 2);
    let again = replay(&s.storage, &schema, &Filter::default(), later)
        .await
        .unwrap();
    assert_eq!((again.finished_earlier, again.moved), (0, 0));
    assert_eq!(master_state(&s).await.0, 2);

    // An uninterrupted replay moves in one go.
    let file2 = s.dir.join("more.jsonl");
    write_lines(&file2, &[gen.next_at(NOW + 2 * DAY_US).to_json()]);
    import_jsonl(&s.storage, &schema, &[&file2], NOW)
        .await
        .unwrap();
    let r = replay(&s.storage, &schema, &late, later).await.unwrap();
    assert_eq!((r.finished_earlier, r.moved, r.still_rejected), (0, 1, 0));
    assert_eq!(master_state(&s).await.0, 3);
    assert_eq!(dead_letters(&s).await, 2);
}

/// A field added to a schema is added to the master dataset when a writer starts on the new
/// definition (earlier rows read null); a field removed or retyped is refused at start with a
/// message naming it, and so is a writer still on the definition before the field was added.
#[tokio::test]
async fn a_field_added_to_a_schema_joins_the_master_and_removals_are_refused() {
    let s = setup();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let original = std::fs::read_to_string(root.join("schemas/app_events.toml")).unwrap();
    let load = |text: String| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("app_events.toml"), text).unwrap();
        let c = Catalog::load(dir.path(), &root.join("jobs")).unwrap();
        Arc::clone(&c.schemas["app_events"])
    };
    let v1 = Arc::clone(&s.catalog.schemas["app_events"]);
    let anchor = r#"  { name = "platform",     type = "string" },"#;
    assert!(original.contains(anchor));
    let v2 = load(original.replace(
        anchor,
        &format!("{anchor}\n  {{ name = \"os_version\", type = \"string\" }},"),
    ));

    let file = s.dir.join("old.jsonl");
    write_lines(&file, &history(1, 500, NOW - 2 * DAY_US, NOW - DAY_US));
    import_jsonl(&s.storage, &v1, &[&file], NOW).await.unwrap();
    // An archiver started on the old definition, still running when the new one starts.
    let mut running = tandem_core::master::MasterWriter::open(s.storage.clone(), Arc::clone(&v1))
        .await
        .unwrap();

    // The new definition: the column is added, new rows carry it.
    let mut with_os: Vec<String> = history(2, 300, NOW - 2 * DAY_US, NOW - DAY_US);
    for l in &mut with_os {
        let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["os_version"] = serde_json::json!("17.1");
        *l = v.to_string();
    }
    let file2 = s.dir.join("new.jsonl");
    write_lines(&file2, &with_os);
    import_jsonl(&s.storage, &v2, &[&file2], NOW).await.unwrap();

    // The archiver still on the old definition cannot commit over the new schema (nothing is
    // written), and restarting it on the old definition is refused, naming the field.
    let lines = history(3, 200, NOW - 2 * DAY_US, NOW - DAY_US);
    assert!(running
        .commit(
            tandem_core::master::MasterCommit {
                rows: vec![master_rows(&v1, &lines)],
                ..Default::default()
            },
            NOW,
        )
        .await
        .is_err());
    let err = tandem_core::master::MasterWriter::open(s.storage.clone(), Arc::clone(&v1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`os_version`"), "{err}");

    let url = s.storage.layout().master("app_events");
    let b = sql_on(&s, &url, "SELECT count(*), count(os_version) FROM t").await;
    use datafusion::arrow::array::AsArray;
    let col = |i: usize| {
        b[0].column(i)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0)
    };
    assert_eq!((col(0), col(1)), (800, 300));

    // Removing or retyping a field is refused, naming it.
    for (text, field) in [
        (original.replace(anchor, ""), "platform"),
        (
            original.replace(
                r#"{ name = "revenue_usd",  type = "decimal", scale = 6 }"#,
                r#"{ name = "revenue_usd",  type = "float" }"#,
            ),
            "revenue_usd",
        ),
    ] {
        let err = tandem_core::master::MasterWriter::open(s.storage.clone(), load(text))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("`{field}`")), "{err}");
    }
}

/// Under a memory limit, queries whose repartitioning runs short of memory finish: a grouped
/// distinct count on two partitions with small batches, repeated, each within a time bound
/// (DataFusion's repartition spill could park every worker: apache/datafusion#24883).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_under_a_memory_limit_never_wait_forever() {
    let spill = tempfile::tempdir().unwrap();
    let ctx = crate::compute::session_with(&crate::BatchOptions {
        threads: Some(2),
        memory_limit: Some(2 << 20),
        spill_dir: Some(spill.path().to_path_buf()),
        ..Default::default()
    })
    .unwrap();
    ctx.sql("set datafusion.execution.batch_size = 64")
        .await
        .unwrap();
    ctx.sql(
        "create table t as select v % 13 as g, md5(cast(v % 337 as varchar)) as id \
         from generate_series(1, 40000) as s(v)",
    )
    .await
    .unwrap()
    .collect()
    .await
    .unwrap();
    for attempt in 0..12 {
        let run = async {
            ctx.sql("select g, count(distinct id) as n from t group by g")
                .await?
                .collect()
                .await
        };
        let batches = tokio::time::timeout(std::time::Duration::from_secs(30), run)
            .await
            .unwrap_or_else(|_| panic!("attempt {attempt} did not finish in 30 s"))
            .unwrap();
        let groups: usize = batches.iter().map(|b| b.num_rows()).sum();
        assert_eq!(groups, 13, "attempt {attempt}");
    }
}

/// A view's published rows, sorted: each row's bucket, dimensions and states with every
/// distinct count exact, and apart, the distinct counts' sketch estimates.
async fn exact_rows_of(
    storage: &Storage,
    view: &tandem_core::view::ViewDef,
) -> Vec<(String, Vec<f64>)> {
    use tandem_core::metric::MetricState;
    let mut rows: Vec<(String, Vec<f64>)> = published_rows(storage, view)
        .await
        .iter()
        .map(|r| {
            let mut estimates = Vec::new();
            let states: Vec<String> = r
                .states
                .iter()
                .map(|s| match s {
                    MetricState::Distinct(d) => {
                        estimates.push(d.estimate());
                        format!("exact {:?}", d.exact)
                    }
                    s => format!("{s:?}"),
                })
                .collect();
            (
                format!("{} {:?} {states:?}", r.bucket_us, r.dims),
                estimates,
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Four views of one schema (a cube, a distinct whose field is the cube's dimension, no
/// distinct, two distinct fields), over events of which some repeat an event id, imported
/// into `s`'s store.
async fn four_views_store(s: &Setup) -> Arc<Catalog> {
    let catalog = cube_store(s, 11, 40_000).await;
    let jobs = s.dir.join("jobs");
    std::fs::write(
        jobs.join("events_hourly.toml"),
        r#"kind = "view"
source = "app_events"
granularity = "hour"
dimensions = ["country", "event_name"]
filter = "event_name <> 'launch'"
metrics = [
  { name = "events", kind = "count" },
  { name = "top_revenue", kind = "max", field = "revenue_usd" },
]"#,
    )
    .unwrap();
    std::fs::write(
        jobs.join("reach_daily.toml"),
        r#"kind = "view"
source = "app_events"
granularity = "day"
dimensions = ["media_source"]
metrics = [
  { name = "devices", kind = "distinct", field = "device_id" },
  { name = "campaigns", kind = "distinct", field = "campaign" },
]"#,
    )
    .unwrap();
    drop(catalog);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalog = Arc::new(Catalog::load(&root.join("schemas"), &jobs).unwrap());
    // A producer's retries: every fifth event of a second file is archived again.
    let again: Vec<String> = history(11, 40_000, NOW - 3 * DAY_US, NOW - DAY_US)
        .into_iter()
        .step_by(5)
        .collect();
    import_lines(s, &catalog, "again.jsonl", &again).await;
    catalog
}

/// The event ids of each day's records (`batch/repeats/app_events/<day>.json`): per day, the
/// record's files and its repeated ids, and when it was last written.
fn repeats_records(
    s: &Setup,
) -> BTreeMap<String, (Vec<String>, Vec<String>, std::time::SystemTime)> {
    let dir = s.dir.join("data/batch/repeats/app_events");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| {
            let e = e.unwrap();
            let body: serde_json::Value =
                serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap();
            let list = |k: &str| -> Vec<String> {
                body[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            let modified = e.metadata().unwrap().modified().unwrap();
            let day = e
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_string();
            (day, (list("files"), list("repeated"), modified))
        })
        .collect()
}

/// A day's repeated event ids are recorded for the day's data files: a later run over the
/// same files reads the record instead of the ids, and publishes the same rows. Another
/// file in a day (a producer's retries archived later) makes the run look at the day again,
/// and its repeats are counted once like the first ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_ids_are_recorded_for_a_days_files_and_looked_for_again_when_they_change() {
    let full = RunRequest {
        full: true,
        ..Default::default()
    };
    let (s, reference) = (setup(), setup());
    let catalog = four_views_store(&s).await;
    let view = &catalog.views["cube_hourly"];
    let layer = |s: &Setup| {
        BatchLayer::new(
            s.storage.clone(),
            Arc::clone(&catalog),
            Arc::new(s.clock.clone()),
        )
    };
    let event_ids = |lines: &[String]| -> BTreeSet<String> {
        lines
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["event_id"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let retried = event_ids(
        &history(11, 40_000, NOW - 3 * DAY_US, NOW - DAY_US)
            .into_iter()
            .step_by(5)
            .collect::<Vec<_>>(),
    );

    layer(&s).run_view(view, &full).await.unwrap();
    let first = exact_rows_of(&s.storage, view).await;
    let records = repeats_records(&s);
    assert_eq!(records.len(), 3, "a record a day: {:?}", records.keys());
    let recorded: BTreeSet<String> = records
        .values()
        .flat_map(|(_, ids, _)| ids.iter().cloned())
        .collect();
    assert_eq!(
        recorded, retried,
        "every retried id, and no other, is recorded"
    );
    assert!(records.values().all(|(files, _, _)| !files.is_empty()));

    // Another process over the same files: the records are read, not written again, and
    // the rows are the same.
    layer(&s).run_view(view, &full).await.unwrap();
    assert_eq!(exact_rows_of(&s.storage, view).await, first);
    let again = repeats_records(&s);
    for (day, (files, ids, written)) in &records {
        assert_eq!(again[day], (files.clone(), ids.clone(), *written), "{day}");
    }

    // Retries of the last day archived later: that day's files change, and its new repeats
    // are found and counted once, as a store that held them from the start counts them.
    let last_day = day_string(day_of(NOW - DAY_US));
    let later: Vec<String> = history(11, 40_000, NOW - 3 * DAY_US, NOW - DAY_US)
        .into_iter()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event_time"].as_str().unwrap().starts_with(&last_day)
        })
        .skip(2)
        .step_by(7)
        .collect();
    assert!(later.len() > 100);
    import_lines(&s, &catalog, "later.jsonl", &later).await;
    layer(&s).run_view(view, &full).await.unwrap();
    let changed = repeats_records(&s);
    let moved: Vec<&String> = changed
        .iter()
        .filter(|(day, (files, _, _))| records[*day].0 != *files)
        .map(|(day, _)| day)
        .collect();
    assert_eq!(moved, [&last_day], "only the last day's files changed");
    let now_recorded: BTreeSet<String> = changed
        .values()
        .flat_map(|(_, ids, _)| ids.iter().cloned())
        .collect();
    assert!(now_recorded.is_superset(&retried));
    assert!(
        now_recorded.len() > retried.len(),
        "the later retries are recorded"
    );

    // A retry is counted once, however late it is archived: the rows are the first run's,
    // and those of a store that held every file from the start.
    let rows = exact_rows_of(&s.storage, view).await;
    assert!(rows == first, "the later retries are counted once");
    four_views_store(&reference).await;
    import_lines(&reference, &catalog, "later.jsonl", &later).await;
    layer(&reference).run_view(view, &full).await.unwrap();
    assert!(rows == exact_rows_of(&reference.storage, view).await);
}

/// The views of one schema recomputed together read each day once, and publish exactly what
/// each publishes when recomputed alone (repeated event ids counted once either way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn views_of_a_schema_read_a_day_once_and_publish_what_they_publish_alone() {
    let full = RunRequest {
        full: true,
        ..Default::default()
    };
    let (together, alone) = (setup(), setup());
    let catalog = four_views_store(&together).await;
    let layer = |s: &Setup| {
        BatchLayer::new(
            s.storage.clone(),
            Arc::clone(&catalog),
            Arc::new(s.clock.clone()),
        )
    };
    let names = [
        "countries_daily",
        "cube_hourly",
        "events_hourly",
        "reach_daily",
    ];
    let reports = layer(&together).run(None, &full).await.unwrap();
    assert_eq!(
        reports.iter().map(|r| r.view.as_str()).collect::<Vec<_>>(),
        names
    );
    four_views_store(&alone).await;
    let mut alone_reports = Vec::new();
    for name in names {
        alone_reports.push(
            layer(&alone)
                .run_view(&catalog.views[name], &full)
                .await
                .unwrap(),
        );
    }
    for (t, a) in reports.iter().zip(&alone_reports) {
        let view = &catalog.views[&t.view];
        assert_eq!(t.days.len(), 3, "{}", t.view);
        assert_eq!(
            (t.rows, t.rollup_rows),
            (a.rows, a.rollup_rows),
            "{}",
            t.view
        );
        let rows = exact_rows_of(&together.storage, view).await;
        assert!(rows.len() > 10, "{}: {}", t.view, rows.len());
        let other = exact_rows_of(&alone.storage, view).await;
        assert_eq!(rows.len(), other.len(), "{}", t.view);
        for ((a, x), (b, y)) in rows.iter().zip(&other) {
            assert_eq!(a, b, "{}", t.view);
            // Sketches merged in another order differ by no more than their own error.
            for (x, y) in x.iter().zip(y) {
                assert!(
                    (x - y).abs() <= 0.02 * x.max(1.0),
                    "{}: {a}: {x} {y}",
                    t.view
                );
            }
        }
    }
    // Together, every view's day is the one read of the columns any of them needs; alone,
    // each reads its own.
    for day in 0..3 {
        let read: Vec<(u64, u64)> = reports
            .iter()
            .map(|r| (r.per_day[day].rows_read, r.per_day[day].bytes_read))
            .collect();
        assert!(read.iter().all(|r| *r == read[0]), "{read:?}");
        let alone: Vec<u64> = alone_reports
            .iter()
            .map(|r| r.per_day[day].bytes_read)
            .collect();
        assert!(alone.iter().any(|&b| b != alone[0]), "{alone:?} {read:?}");
    }
}

/// `lines` decoded as the messages of partition 0 from offset 0, as master rows.
fn master_rows(
    schema: &Arc<tandem_core::schema::EventSchema>,
    lines: &[impl AsRef<str>],
) -> datafusion::arrow::record_batch::RecordBatch {
    let messages: Vec<tandem_core::decode::Message<'_>> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| tandem_core::decode::Message {
            payload: Some(l.as_ref().as_bytes()),
            partition: 0,
            offset: i as i64,
            timestamp_ms: None,
        })
        .collect();
    let decoded = tandem_core::decode::Decoder::new(Arc::clone(schema))
        .decode(&messages, NOW)
        .unwrap();
    tandem_core::master::archive_batch(schema, &decoded).unwrap()
}

/// A batch whose rows alternate between days, row by row (a producer's events out of order),
/// is committed whole: each row once, in the files of its own day, and the commit names every
/// day it touched.
#[tokio::test]
async fn rows_whose_days_alternate_land_each_in_its_own_day() {
    let s = setup();
    let schema = Arc::clone(&s.catalog.schemas["app_events"]);
    // NOW is noon: two whole days, the day before yesterday and yesterday.
    let yesterday = NOW - DAY_US / 2 - DAY_US;
    let earlier = history(7, 300, yesterday - DAY_US, yesterday - 1);
    let later = history(8, 300, yesterday, yesterday + DAY_US - 1);
    let lines: Vec<&String> = earlier
        .iter()
        .zip(&later)
        .flat_map(|(a, b)| [a, b])
        .collect();
    let rows = master_rows(&schema, &lines);
    assert_eq!(rows.num_rows(), 600);
    let mut w = tandem_core::master::MasterWriter::open(s.storage.clone(), Arc::clone(&schema))
        .await
        .unwrap();
    let report = w
        .commit(
            tandem_core::master::MasterCommit {
                rows: vec![rows],
                master_txns: vec![("test.partition-0".into(), 599)],
                ..Default::default()
            },
            NOW,
        )
        .await
        .unwrap();
    assert_eq!(report.rows, 600);
    let (rows, _, files) = master_state(&s).await;
    assert_eq!(rows, 600);
    assert_eq!(
        report.days.iter().collect::<Vec<_>>(),
        files.keys().collect::<Vec<_>>()
    );
    assert_eq!(files.len(), 2, "{files:?}");
    let url = s.storage.layout().master("app_events");
    let misplaced = sql_on(
        &s,
        &url,
        "SELECT count(*) FROM t WHERE to_char(event_time, '%Y-%m-%d') <> dt",
    )
    .await;
    use datafusion::arrow::array::AsArray;
    let misplaced = misplaced[0]
        .column(0)
        .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
        .value(0);
    assert_eq!(misplaced, 0);
    let distinct = sql_on(&s, &url, "SELECT count(DISTINCT _offset) FROM t").await;
    assert_eq!(
        distinct[0]
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0),
        600
    );

    // Each file's statistics in the log give its range of event times, inside its day, for
    // readers to skip files by time (strings carry none: their rows come in no order).
    let adds = master_files(&s).await;
    assert_eq!(adds.len(), 2);
    for f in adds {
        let day = f.partition_values_map()["dt"].clone().unwrap();
        let stats: serde_json::Value = serde_json::from_str(&f.stats().unwrap()).unwrap();
        assert_eq!(stats["numRecords"], 300, "{stats}");
        for bound in ["minValues", "maxValues"] {
            let time = stats[bound]["event_time"].as_str().unwrap_or_default();
            assert!(time.starts_with(&day), "{bound} of {day}: {stats}");
        }
        assert!(stats["minValues"].get("device_id").is_none(), "{stats}");
    }
}
