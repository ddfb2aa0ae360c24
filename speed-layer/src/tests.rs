//! The speed layer without Kafka: batches applied directly.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tandem_core::decode::Message;
use tandem_core::query::ViewQuery;
use tandem_core::time::parse_instant;
use tandem_core::time::MockClock;
use tandem_core::traits::RealtimeView;
use tandem_core::view::DAY_US;
use tandem_core::Catalog;
use tandem_workload::{GenConfig, Generator};

use crate::SpeedLayer;

const NOW: i64 = 1_795_694_400_000_000;

fn layer() -> (Arc<Catalog>, SpeedLayer) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalog = Arc::new(Catalog::load(&root.join("schemas"), &root.join("jobs")).unwrap());
    let layer = SpeedLayer::new(&catalog, "app_events", Arc::new(MockClock::new(NOW))).unwrap();
    (catalog, layer)
}

fn total_events(catalog: &Catalog, layer: &SpeedLayer) -> u64 {
    let v = &catalog.views["active_devices_daily"];
    let mut q = ViewQuery::all(
        v,
        parse_instant("2026-11-01").unwrap(),
        parse_instant("2026-11-27").unwrap(),
    );
    q.metrics = vec![v.metric("events").unwrap()];
    total_of(&layer.query(v, &q, &Default::default()).unwrap())
}

/// `n` generated reference events as JSON.
fn payloads(n: usize) -> Vec<String> {
    Generator::new(GenConfig::default())
        .history(n, NOW - DAY_US, NOW)
        .map(|e| e.to_json())
        .collect()
}

/// `payloads` as consecutive messages of `partition` from offset 0.
fn messages(payloads: &[String], partition: i32, timestamp_ms: Option<i64>) -> Vec<Message<'_>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| Message {
            payload: Some(p.as_bytes()),
            partition,
            offset: i as i64,
            timestamp_ms,
        })
        .collect()
}

#[test]
fn redelivered_offsets_are_not_counted_twice() {
    let (catalog, layer) = layer();
    let payloads = payloads(1_000);
    let msgs = messages(&payloads, 0, Some(NOW / 1000));
    layer.apply(0, &msgs[..600]).unwrap();
    // A rebalance or a retry delivers 400..1000 again, overlapping what was applied.
    layer.apply(0, &msgs[400..]).unwrap();
    layer.apply(0, &msgs[..]).unwrap();
    assert_eq!(total_events(&catalog, &layer), 1_000);
    assert_eq!(layer.offsets()[&0], 1_000);
    assert_eq!(layer.status().lag_ms, Some(0));
    // A partition that stopped an hour ago is the lag reported, however fresh the others.
    let stuck = payloads[..10].to_vec();
    layer
        .apply(5, &messages(&stuck, 5, Some(NOW / 1000 - 3_600_000)))
        .unwrap();
    let status = layer.status();
    assert_eq!(status.lag_ms, Some(3_600_000));
    assert_eq!(status.partition_lag_ms, [(0, 0), (5, 3_600_000)].into());
    assert_eq!(layer.stats.missed_offsets.load(Ordering::Relaxed), 0);
}

#[test]
fn offsets_the_broker_no_longer_had_are_counted_as_missed() {
    let (catalog, layer) = layer();
    let payloads = payloads(100);
    let msgs = messages(&payloads, 0, None);
    // Retention removed 30..50 before the consumer read them.
    layer.apply(0, &msgs[..30]).unwrap();
    layer.apply(0, &msgs[50..]).unwrap();
    assert_eq!(layer.stats.missed_offsets.load(Ordering::Relaxed), 20);
    assert_eq!(total_events(&catalog, &layer), 80);
    assert_eq!(layer.offsets()[&0], 100);
    // The API's meta lists the partition as stale: its state is known to be incomplete.
    assert_eq!(layer.status().stale_partitions, vec![0]);

    // A partition whose first message is past offset 0 (retention trimmed the topic before
    // this process started) is not incomplete: those events are the batch layer's.
    let on_partition_1 = messages(&payloads, 1, None);
    layer.apply(1, &on_partition_1[60..70]).unwrap();
    assert_eq!(layer.offsets()[&1], 70);
    assert_eq!(layer.stats.missed_offsets.load(Ordering::Relaxed), 20);
    assert_eq!(layer.status().stale_partitions, vec![0]);
}

#[test]
fn partitions_are_kept_apart_and_merged_on_query() {
    let (catalog, layer) = layer();
    let payloads = payloads(900);
    for p in 0..3 {
        let msgs = messages(&payloads[p * 300..(p + 1) * 300], p as i32, None);
        layer.apply(p as i32, &msgs).unwrap();
    }
    assert_eq!(layer.offsets().len(), 3);
    assert_eq!(total_events(&catalog, &layer), 900);
}

#[test]
fn buckets_the_batch_covers_are_not_answered() {
    let (catalog, layer) = layer();
    let payloads = payloads(2_000);
    layer.apply(0, &messages(&payloads, 0, None)).unwrap();
    let v = &catalog.views["active_devices_daily"];
    let q = ViewQuery::all(v, NOW - 10 * DAY_US, NOW + DAY_US);
    let all = layer.query(v, &q, &Default::default()).unwrap();
    let yesterday = NOW / DAY_US - 1;
    let covered = tandem_core::query::Coverage {
        days: [yesterday].into(),
        ..Default::default()
    };
    let rest = layer.query(v, &q, &covered).unwrap();
    assert!(rest.len() < all.len());
    assert!(rest.iter().all(|r| r.bucket_us / DAY_US != yesterday));
    assert_eq!(
        all.iter()
            .filter(|r| r.bucket_us / DAY_US != yesterday)
            .count(),
        rest.len()
    );
}

/// Buckets a publish covers are dropped once the publish is older than the grace period, and
/// only those: what the batch does not cover is still answered.
#[test]
fn covered_buckets_are_pruned_after_the_grace_period() {
    let (catalog, layer) = layer();
    let payloads = payloads(3_000);
    layer.apply(0, &messages(&payloads, 0, None)).unwrap();
    let v = &catalog.views["active_devices_daily"];
    let q = ViewQuery::all(v, NOW - 10 * DAY_US, NOW + DAY_US);
    let none = tandem_core::query::Coverage::default();
    let before = total_of(&layer.query(v, &q, &none).unwrap());
    let yesterday = NOW / DAY_US - 1;
    let mut covered = tandem_core::query::Coverage {
        days: [yesterday].into(),
        published_us: Some(NOW - 30_000_000),
        ..Default::default()
    };
    let uncovered = total_of(&layer.query(v, &q, &covered).unwrap());
    assert!(uncovered < before);

    // Published 30 s ago: within a minute's grace, nothing goes.
    assert_eq!(layer.prune(&v.name, &covered, 60_000_000), 0);
    assert_eq!(total_of(&layer.query(v, &q, &none).unwrap()), before);

    // Past the grace: the covered day's groups go, the rest stays, other views are untouched.
    covered.published_us = Some(NOW - 120_000_000);
    assert!(layer.prune(&v.name, &covered, 60_000_000) > 0);
    assert_eq!(total_of(&layer.query(v, &q, &none).unwrap()), uncovered);
    assert_eq!(total_events(&catalog, &layer), uncovered);
    let other = &catalog.views["installs_hourly"];
    let all_other = ViewQuery::all(other, NOW - 10 * DAY_US, NOW + DAY_US);
    assert!(layer
        .query(other, &all_other, &none)
        .unwrap()
        .iter()
        .any(|r| r.bucket_us / DAY_US == yesterday));
}

fn total_of(rows: &[tandem_core::query::AggRow]) -> u64 {
    rows.iter()
        .map(|r| match r.states[0] {
            tandem_core::metric::MetricState::Count(c) => c,
            _ => unreachable!(),
        })
        .sum()
}

#[test]
fn a_bucket_stamp_changes_only_with_its_own_state() {
    use tandem_core::view::HOUR_US;

    let (catalog, layer) = layer();
    let v = &catalog.views["installs_hourly"];
    let day = payloads(5_000);
    layer.apply(0, &messages(&day, 0, None)).unwrap();
    let q = ViewQuery::all(v, NOW - 2 * DAY_US, NOW + DAY_US);
    let covered = Default::default();
    let before = layer.bucket_stamps(v, &q, &covered).unwrap();
    assert!(before.len() > 20, "{} buckets", before.len());
    // Every bucket read in pieces answers as the whole query does.
    let buckets: Vec<i64> = before.keys().copied().collect();
    let mut whole = layer.query(v, &q, &covered).unwrap();
    let mut pieces: Vec<_> = buckets
        .chunks(7)
        .flat_map(|b| layer.query_buckets(v, &q, &covered, b).unwrap())
        .collect();
    let key = |r: &tandem_core::query::AggRow| r.bucket_us;
    whole.sort_by_key(key);
    pieces.sort_by_key(key);
    assert_eq!(whole, pieces);

    // Installs of one hour, on another partition.
    let hour = buckets[buckets.len() / 2];
    let late: Vec<String> = Generator::new(GenConfig::default())
        .history(2_000, hour, hour + HOUR_US)
        .filter(|e| e.event_name == "install" && (hour..hour + HOUR_US).contains(&e.event_time))
        .map(|e| e.to_json())
        .collect();
    assert!(!late.is_empty());
    // Events the view filters out change other views' generations, not its own.
    let daily = &catalog.views["active_devices_daily"];
    let (gen_installs, gen_daily) = (layer.generation(v), layer.generation(daily));
    let launches: Vec<String> = Generator::new(GenConfig::default())
        .history(200, hour, hour + HOUR_US)
        .filter(|e| e.event_name != "install")
        .map(|e| e.to_json())
        .collect();
    layer.apply(2, &messages(&launches, 2, None)).unwrap();
    assert_eq!(layer.generation(v), gen_installs);
    assert_ne!(layer.generation(daily), gen_daily);
    assert_eq!(layer.bucket_stamps(v, &q, &covered).unwrap(), before);
    layer.apply(1, &messages(&late, 1, None)).unwrap();
    assert_ne!(layer.generation(v), gen_installs);
    let after = layer.bucket_stamps(v, &q, &covered).unwrap();
    for (b, stamp) in &before {
        if *b == hour {
            assert_ne!(after[b], *stamp, "the changed bucket keeps its stamp");
        } else {
            assert_eq!(after[b], *stamp, "bucket {b} changed its stamp");
        }
    }
}

#[test]
fn filters_keep_what_they_accept_and_no_nulls() {
    use tandem_core::query::Match;

    let (catalog, layer) = layer();
    let v = &catalog.views["installs_hourly"];
    layer
        .apply(0, &messages(&payloads(5_000), 0, None))
        .unwrap();
    let covered = Default::default();
    let campaign = v.dimensions.iter().position(|d| d == "campaign").unwrap();
    let mut all = ViewQuery::all(v, NOW - 2 * DAY_US, NOW + DAY_US);
    all.group_by = vec![campaign];
    let rows = layer.query(v, &all, &covered).unwrap();
    assert!(
        rows.iter().any(|r| r.dims[0].is_none()),
        "some installs have no campaign"
    );
    let some = rows.iter().find_map(|r| r.dims[0].clone()).unwrap();
    let prefix: String = some.chars().take(3).collect();
    for m in [
        Match::In(vec![some.clone()]),
        Match::NotIn(vec![some.clone()]),
        Match::Prefix(prefix),
    ] {
        let mut q = all.clone();
        q.filters = vec![(campaign, m.clone())];
        let mut got = layer.query(v, &q, &covered).unwrap();
        let mut expected: Vec<_> = rows
            .iter()
            .filter(|r| m.accepts(r.dims[0].as_deref()))
            .cloned()
            .collect();
        let key = |r: &tandem_core::query::AggRow| (r.bucket_us, r.dims.clone());
        got.sort_by_key(key);
        expected.sort_by_key(key);
        assert!(!got.is_empty(), "{m:?}");
        assert_eq!(got, expected, "{m:?}");
    }
}
