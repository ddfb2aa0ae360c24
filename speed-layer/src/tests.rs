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

/// A checkpoint reads a partition's whole state under one read lock, and ingestion's next
/// apply waits for it: answers, probes and metrics go on meanwhile instead of queuing behind
/// the waiting writer for the checkpoint's whole encoding.
#[test]
fn answers_pass_an_apply_waiting_for_a_checkpoint() {
    let (catalog, layer) = layer();
    let layer = Arc::new(layer);
    let payloads = payloads(1_000);
    layer.apply(0, &messages(&payloads, 0, None)).unwrap();
    let state = layer.partition_state(0);
    let checkpoint = state.read();
    let writer = {
        let state = Arc::clone(&state);
        std::thread::spawn(move || drop(state.write()))
    };
    // A writer takes the lock's writer bit first, then waits for the readers to leave.
    let waited = std::time::Instant::now();
    while !state.is_locked_exclusive() {
        assert!(waited.elapsed() < std::time::Duration::from_secs(30));
        std::thread::yield_now();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let asking = {
        let layer = Arc::clone(&layer);
        std::thread::spawn(move || {
            let events = total_events(&catalog, &layer);
            let status = layer.status();
            let keys = layer.state_size().0;
            let _ = tx.send((events, status.lag_ms.is_some(), keys));
        })
    };
    let answered = rx.recv_timeout(std::time::Duration::from_secs(30));
    drop(checkpoint);
    writer.join().unwrap();
    asking.join().unwrap();
    let (events, _, keys) = answered.expect("the answer waited behind the apply");
    assert_eq!(events, 1_000);
    assert!(keys > 0);
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

mod checkpoints {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
    use rdkafka::Offset;

    use crate::CheckpointStore;

    fn owner(catalog: &Catalog, store: &Arc<InMemory>, keep: usize) -> SpeedLayer {
        let store: Arc<dyn ObjectStore> = Arc::clone(store) as _;
        SpeedLayer::new(catalog, "app_events", Arc::new(MockClock::new(NOW)))
            .unwrap()
            .with_checkpoints(CheckpointStore::new(store, "app_events", keep))
    }

    /// A fresh store, `n` generated payloads, and an owner of partition 0 keeping `keep`
    /// checkpoints.
    async fn owning(
        n: usize,
        keep: usize,
    ) -> (Arc<Catalog>, Arc<InMemory>, Vec<String>, SpeedLayer) {
        let (catalog, _) = layer();
        let store = Arc::new(InMemory::new());
        let first = owner(&catalog, &store, keep);
        first.assign(0).await.unwrap();
        (catalog, store, payloads(n), first)
    }

    async fn objects(store: &InMemory) -> Vec<String> {
        use futures::TryStreamExt;
        let mut names: Vec<String> = store
            .list(Some(&Path::from("speed/app_events/checkpoints/0")))
            .map_ok(|m| m.location.filename().unwrap_or_default().to_string())
            .try_collect()
            .await
            .unwrap();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_new_owner_resumes_from_the_checkpoint_with_the_same_answers() {
        let (catalog, _) = layer();
        let store = Arc::new(InMemory::new());
        let payloads = payloads(2_000);
        let msgs = messages(&payloads, 0, Some(NOW / 1000));

        let first = owner(&catalog, &store, 3);
        assert_eq!(first.assign(0).await.unwrap(), Offset::Beginning);
        first.apply(0, &msgs[..1_200]).unwrap();
        assert_eq!(first.checkpoint().await, vec![(0, 1_200)]);
        // Nothing changed: nothing written.
        assert_eq!(first.checkpoint().await, vec![]);
        first.apply(0, &msgs[1_200..1_500]).unwrap();
        // Messages of a partition this instance does not own are not counted.
        first.apply(1, &messages(&payloads, 1, None)).unwrap();
        assert_eq!(first.stats.unowned.load(Ordering::Relaxed), 2_000);
        first.revoke(0, false).await;
        assert_eq!(
            total_events(&catalog, &first),
            0,
            "a revoked partition is not answered"
        );

        let second = owner(&catalog, &store, 3);
        assert_eq!(second.assign(0).await.unwrap(), Offset::Offset(1_500));
        assert_eq!(total_events(&catalog, &second), 1_500);
        second.apply(0, &msgs[1_500..]).unwrap();
        assert_eq!(total_events(&catalog, &second), 2_000);
        assert_eq!(second.stats.restored.load(Ordering::Relaxed), 1);

        // Every view answers exactly what one layer fed everything answers.
        let (_, oracle) = layer();
        oracle.apply(0, &msgs).unwrap();
        for v in catalog.views.values().filter(|v| v.source == "app_events") {
            let q = ViewQuery::all(v, NOW - 2 * DAY_US, NOW + DAY_US);
            let mut got = second.query(v, &q, &Default::default()).unwrap();
            let mut want = oracle.query(v, &q, &Default::default()).unwrap();
            got.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            want.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
            assert_eq!(got.len(), want.len(), "view {}", v.name);
            for (g, w) in got.iter().zip(&want) {
                assert_eq!((g.bucket_us, &g.dims), (w.bucket_us, &w.dims));
                for (a, b) in g.states.iter().zip(&w.states) {
                    match (a, b) {
                        (
                            tandem_core::metric::MetricState::Distinct(a),
                            tandem_core::metric::MetricState::Distinct(b),
                        ) => {
                            // A restored sketch estimates as a sketch, not with the running
                            // (HIP) estimate of the one that saw every update: equal within
                            // the sketch's error.
                            let bound = 3.0 * tandem_core::metric::hll_rse(a.lg_k());
                            let err = (a.estimate() - b.estimate()).abs() / b.estimate().max(1.0);
                            assert!(
                                err <= bound,
                                "view {}: {} vs {}",
                                v.name,
                                a.estimate(),
                                b.estimate()
                            );
                        }
                        _ => assert_eq!(a, b, "view {}", v.name),
                    }
                }
            }
        }
    }

    #[tokio::test]
    async fn a_crash_between_applying_and_checkpointing_replays_from_the_checkpoint_once() {
        let (catalog, store, payloads, first) = owning(1_000, 3).await;
        let msgs = messages(&payloads, 0, None);
        first.apply(0, &msgs[..300]).unwrap();
        first.checkpoint().await;
        // Applied, then the process dies before its next checkpoint: no revoke, no write.
        first.apply(0, &msgs[300..800]).unwrap();
        drop(first);

        let next = owner(&catalog, &store, 3);
        assert_eq!(next.assign(0).await.unwrap(), Offset::Offset(300));
        // The broker delivers from the checkpoint's offset on; the consumer may also hand
        // over a batch that overlaps what the checkpoint holds.
        next.apply(0, &msgs[250..]).unwrap();
        assert_eq!(total_events(&catalog, &next), 1_000);
        assert_eq!(next.stats.skipped_redelivered.load(Ordering::Relaxed), 50);
    }

    #[tokio::test]
    async fn a_corrupt_newest_checkpoint_is_skipped_for_the_one_before() {
        let (catalog, store, payloads, first) = owning(1_000, 5).await;
        let msgs = messages(&payloads, 0, None);
        first.apply(0, &msgs[..400]).unwrap();
        first.checkpoint().await;
        first.apply(0, &msgs[400..700]).unwrap();
        first.checkpoint().await;
        let names = objects(&store).await;
        assert_eq!(names.len(), 3, "a claim and two checkpoints: {names:?}");
        let newest = Path::from(format!(
            "speed/app_events/checkpoints/0/{}",
            names.last().unwrap()
        ));
        let mut bytes = store
            .get(&newest)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        store.put(&newest, PutPayload::from(bytes)).await.unwrap();

        let second = owner(&catalog, &store, 5);
        assert_eq!(second.assign(0).await.unwrap(), Offset::Offset(400));
        assert_eq!(total_events(&catalog, &second), 400);
        assert_eq!(second.stats.skipped_checkpoints.load(Ordering::Relaxed), 1);
        // The corrupt one's number is not reused: the claim goes above it.
        assert_eq!(objects(&store).await.len(), 4);
    }

    #[tokio::test]
    async fn a_zombie_cannot_overwrite_the_new_owners_checkpoint() {
        let (catalog, store, payloads, zombie) = owning(1_000, 3).await;
        let msgs = messages(&payloads, 0, None);
        zombie.apply(0, &msgs[..300]).unwrap();
        zombie.checkpoint().await;

        // The zombie sleeps; the partition moves.
        let owner2 = owner(&catalog, &store, 3);
        assert_eq!(owner2.assign(0).await.unwrap(), Offset::Offset(300));

        // The zombie wakes with more events and tries to checkpoint them.
        zombie.apply(0, &msgs[300..900]).unwrap();
        assert_eq!(zombie.checkpoint().await, vec![]);
        assert_eq!(zombie.stats.fenced.load(Ordering::Relaxed), 1);
        assert_eq!(
            total_events(&catalog, &zombie),
            0,
            "a fenced partition is dropped"
        );

        owner2.apply(0, &msgs[300..500]).unwrap();
        assert_eq!(owner2.checkpoint().await, vec![(0, 500)]);
        let third = owner(&catalog, &store, 3);
        assert_eq!(third.assign(0).await.unwrap(), Offset::Offset(500));
        assert_eq!(total_events(&catalog, &third), 500);
    }

    #[tokio::test]
    async fn a_restarted_process_answers_from_checkpoints_flagged_stale_until_assigned() {
        let (catalog, _) = layer();
        let store = Arc::new(InMemory::new());
        let payloads = payloads(600);
        let first = owner(&catalog, &store, 3);
        for p in [0, 1] {
            first.assign(p).await.unwrap();
            first
                .apply(p, &messages(&payloads[p as usize * 300..][..300], p, None))
                .unwrap();
        }
        first.checkpoint().await;

        let restarted = owner(&catalog, &store, 3);
        assert_eq!(restarted.preload().await.unwrap(), 2);
        assert_eq!(total_events(&catalog, &restarted), 600);
        assert_eq!(restarted.status().stale_partitions, vec![0, 1]);
        // Not owned yet: nothing is applied to a provisional state.
        restarted.apply(0, &messages(&payloads, 0, None)).unwrap();
        assert_eq!(total_events(&catalog, &restarted), 600);
        // The group gives this process partition 1 only.
        assert_eq!(restarted.assign(1).await.unwrap(), Offset::Offset(300));
        restarted.assignment(&[1]);
        assert_eq!(total_events(&catalog, &restarted), 300);
        assert!(restarted.status().stale_partitions.is_empty());
    }

    #[tokio::test]
    async fn readiness_says_why_while_catching_up_unassigned_or_cut_off() {
        use std::time::Duration;
        let (catalog, store, payloads, l) = owning(100, 3).await;
        l.apply(0, &messages(&payloads, 0, None)).unwrap();
        let grace = Duration::from_secs(10);
        assert_eq!(l.not_ready(1_000, grace), None, "no statistics yet");
        l.watermarks(&[(0, 5_000)], true);
        assert_eq!(l.consumer_lag()[&0], 4_900);
        let why = l.not_ready(1_000, grace).unwrap();
        assert!(why.contains("partition 0 is 4900 messages behind"), "{why}");
        l.watermarks(&[(0, 100)], true);
        assert_eq!(l.not_ready(1_000, grace), None);
        l.watermarks(&[(0, 100)], false);
        assert_eq!(l.not_ready(1_000, grace), None, "within the grace");
        let why = l.not_ready(1_000, Duration::ZERO).unwrap();
        assert!(why.contains("no Kafka broker"), "{why}");
        l.watermarks(&[(0, 100)], true);
        assert_eq!(l.not_ready(1_000, Duration::ZERO), None, "back");
        l.checkpoint().await;

        let restarted = owner(&catalog, &store, 3);
        restarted.preload().await.unwrap();
        let why = restarted.not_ready(1_000, grace).unwrap();
        assert!(why.contains("waiting for the group"), "{why}");
        restarted.assign(0).await.unwrap();
        restarted.assignment(&[0]);
        assert_eq!(restarted.not_ready(1_000, grace), None);
    }

    #[tokio::test]
    async fn a_rewound_partition_counts_every_event_once() {
        let (catalog, store, payloads, first) = owning(1_500, 3).await;
        let msgs = messages(&payloads, 0, None);
        first.apply(0, &msgs[..1_000]).unwrap();
        first.checkpoint().await;
        first.revoke(0, false).await;

        // Rewind to the middle of the events' day, reading again from offset 0 (which holds
        // every event of the discarded buckets).
        let tool = owner(&catalog, &store, 3);
        let cutoffs = tool.cutoffs(NOW - DAY_US / 2);
        let (held, discarded) = tool.rewind(0, &cutoffs, 0).await.unwrap().unwrap();
        assert_eq!(held, 1_000);
        assert!(discarded > 0);
        let err = tool.rewind(0, &cutoffs, 0).await.unwrap_err().to_string();
        assert!(err.contains("still replaying"), "{err}");

        let next = owner(&catalog, &store, 3);
        assert_eq!(next.assign(0).await.unwrap(), Offset::Offset(0));
        assert!(
            total_events(&catalog, &next) < 1_000,
            "buckets were discarded"
        );
        next.apply(0, &msgs[..700]).unwrap();
        next.apply(0, &msgs[700..]).unwrap();

        let (_, oracle) = layer();
        oracle.apply(0, &msgs).unwrap();
        for v in catalog.views.values().filter(|v| v.source == "app_events") {
            let q = ViewQuery::all(v, NOW - 2 * DAY_US, NOW + DAY_US);
            let count = v
                .metrics
                .iter()
                .position(|m| m.kind == tandem_core::metric::MetricKind::Count)
                .unwrap();
            let mut q = q;
            q.metrics = vec![count];
            assert_eq!(
                total_of(&next.query(v, &q, &Default::default()).unwrap()),
                total_of(&oracle.query(v, &q, &Default::default()).unwrap()),
                "view {}",
                v.name
            );
        }
    }

    #[tokio::test]
    async fn a_repeated_event_id_counts_once_also_across_a_restore() {
        use std::time::Duration;
        let (catalog, _) = layer();
        let store = Arc::new(InMemory::new());
        let payloads = payloads(600);
        // The producer retried: events 100..200 arrive again, at new offsets.
        let mut stream: Vec<String> = payloads[..400].to_vec();
        stream.extend_from_slice(&payloads[100..200]);
        stream.extend_from_slice(&payloads[400..]);
        let msgs = messages(&stream, 0, None);
        let with_window = |store: &Arc<InMemory>| {
            owner(&catalog, store, 3).with_dedup_window(Duration::from_secs(7 * 24 * 3600))
        };
        let first = with_window(&store);
        first.assign(0).await.unwrap();
        first.apply(0, &msgs[..450]).unwrap();
        first.checkpoint().await;
        first.revoke(0, false).await;
        // The new owner still knows the ids applied before the checkpoint.
        let second = with_window(&store);
        second.assign(0).await.unwrap();
        second.apply(0, &msgs[450..]).unwrap();
        assert_eq!(total_events(&catalog, &second), 600);
        let dropped = first.stats.duplicates.load(Ordering::Relaxed)
            + second.stats.duplicates.load(Ordering::Relaxed);
        assert_eq!(dropped, 100);
    }

    #[test]
    fn past_the_key_cap_new_groups_are_counted_not_applied() {
        let (catalog, _) = layer();
        let capped = SpeedLayer::new(&catalog, "app_events", Arc::new(MockClock::new(NOW)))
            .unwrap()
            .with_max_keys(50);
        let payloads = payloads(2_000);
        capped.apply(0, &messages(&payloads, 0, None)).unwrap();
        assert_eq!(capped.state_size().0, 50);
        assert!(capped.stats.over_cap.load(Ordering::Relaxed) > 0);
        assert_eq!(capped.status().stale_partitions, vec![0]);
        // Groups that exist keep counting: the cap bounds memory, not the events of known keys.
        let before = total_events(&catalog, &capped);
        let again: Vec<Message<'_>> = messages(&payloads, 0, None)
            .into_iter()
            .map(|m| Message {
                offset: m.offset + 2_000,
                ..m
            })
            .collect();
        capped.apply(0, &again).unwrap();
        assert_eq!(total_events(&catalog, &capped), 2 * before);
        assert_eq!(capped.state_size().0, 50);
    }

    #[test]
    fn events_of_days_a_settled_publish_covers_are_late() {
        use tandem_core::query::Coverage;
        let (catalog, layer) = layer();
        let payloads = payloads(1_000);
        let msgs = messages(&payloads, 0, None);
        layer.apply(0, &msgs[..500]).unwrap();
        // A publish covering every day of the events, older than the grace.
        let days = (tandem_core::time::day_of(NOW - 2 * DAY_US)..=tandem_core::time::day_of(NOW))
            .collect();
        let covered = Coverage {
            version: Some(1),
            days,
            published_us: Some(NOW - 120_000_000),
        };
        let v = &catalog.views["active_devices_daily"];
        assert!(layer.prune(&v.name, &covered, 60_000_000) > 0);
        layer.apply(0, &msgs[500..]).unwrap();
        assert_eq!(layer.stats.late.load(Ordering::Relaxed), 500);
        assert_eq!(
            total_events(&catalog, &layer),
            0,
            "late events are the batch's"
        );
    }

    #[tokio::test]
    async fn old_checkpoints_are_deleted_past_the_count_kept() {
        let (catalog, store, payloads, l) = owning(100, 2).await;
        let msgs = messages(&payloads, 0, None);
        for i in 0..10 {
            l.apply(0, &msgs[i * 10..(i + 1) * 10]).unwrap();
            l.checkpoint().await;
        }
        let names = objects(&store).await;
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names.last().unwrap().starts_with("00000000000000000011"));
        let again = owner(&catalog, &store, 2);
        assert_eq!(again.assign(0).await.unwrap(), Offset::Offset(100));
    }

    #[tokio::test]
    async fn a_checkpoint_of_another_view_definition_is_not_restored() {
        let (catalog, store, payloads, l) = owning(100, 3).await;
        l.apply(0, &messages(&payloads, 0, None)).unwrap();
        l.checkpoint().await;

        let mut changed = (*catalog).clone();
        let v = changed.views.get_mut("installs_hourly").unwrap();
        let mut def = (**v).clone();
        def.definition_hash = "another definition".into();
        *v = Arc::new(def);
        let after = owner(&changed, &store, 3);
        assert_eq!(after.assign(0).await.unwrap(), Offset::Beginning);
        assert_eq!(total_events(&changed, &after), 0);
        assert_eq!(after.stats.skipped_checkpoints.load(Ordering::Relaxed), 1);
    }
}
