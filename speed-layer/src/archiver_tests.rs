//! The archiver without Kafka: a revoked partition's pending rows are not written by its old
//! owner, a zombie's late commit is refused, and an assigned partition resumes at the offset
//! the master dataset holds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::{Int32Type, Int64Type};
use datafusion::prelude::SessionContext;
use tandem_core::paths::Layout;
use tandem_core::storage::Storage;
use tandem_core::time::MockClock;
use tandem_core::{Catalog, CoreError};
use tandem_workload::{GenConfig, Generator};

use crate::archiver::{Archiver, ArchiverConfig};
use crate::kafka::{BatchSink, MessageBatch, Rebalance};
use crate::SpeedError;

const NOW: i64 = 1_795_694_400_000_000;

fn setup() -> (tempfile::TempDir, Storage, Arc<Catalog>) {
    let dir = tempfile::tempdir().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalog = Arc::new(Catalog::load(&root.join("schemas"), &root.join("jobs")).unwrap());
    let storage = Storage::new(Layout::local(dir.path()).unwrap()).unwrap();
    (dir, storage, catalog)
}

async fn archiver(storage: &Storage, catalog: &Catalog) -> Archiver {
    Archiver::open(
        storage.clone(),
        Arc::clone(&catalog.schemas["app_events"]),
        ArchiverConfig {
            flush_interval: Duration::from_secs(3600),
            flush_rows: 1_000_000,
            target_file_bytes: u64::MAX,
        },
        Arc::new(MockClock::new(NOW)),
    )
    .await
    .unwrap()
}

/// Messages of `partition` at `offsets`, each a generated event.
fn batch(parts: &[(i32, std::ops::Range<i64>)]) -> MessageBatch {
    let mut events = Generator::new(GenConfig::default()).history(10_000, NOW - 3_600_000_000, NOW);
    let mut b = MessageBatch::default();
    for (p, offsets) in parts {
        for o in offsets.clone() {
            let e = events.next().unwrap();
            b.push(*p, o, Some(NOW / 1000), Some(e.to_json().as_bytes()));
        }
    }
    b
}

/// The (partition, offset) pairs in the master dataset, sorted.
async fn archived(storage: &Storage) -> Vec<(i32, i64)> {
    let Some(t) = storage
        .open(&storage.layout().master("app_events"))
        .await
        .unwrap()
    else {
        return Vec::new();
    };
    let ctx = SessionContext::new();
    ctx.register_table("m", t.table_provider().await.unwrap())
        .unwrap();
    let mut out = Vec::new();
    for b in ctx
        .sql("SELECT _partition, _offset FROM m")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap()
    {
        let p = b.column(0).as_primitive::<Int32Type>();
        let o = b.column(1).as_primitive::<Int64Type>();
        out.extend((0..b.num_rows()).map(|i| (p.value(i), o.value(i))));
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_revoked_partitions_pending_rows_are_left_to_its_new_owner() {
    let (_dir, storage, catalog) = setup();
    let mut a = archiver(&storage, &catalog).await;
    let handler = a.rebalance_handler();
    a.handle(&batch(&[(0, 0..10), (1, 0..10)])).await.unwrap();
    // The group takes partition 0 away before the flush.
    handler.revoked(0, false).await;
    // Messages of partition 0 fetched before the revoke are not taken either.
    a.handle(&batch(&[(0, 10..15), (1, 10..12)])).await.unwrap();
    let done = a.flush(true).await.unwrap();
    assert_eq!(done, [(1, 12)], "only partition 1's offsets are reported");
    let rows = archived(&storage).await;
    assert!(rows.iter().all(|&(p, _)| p == 1), "{rows:?}");
    assert_eq!(rows.len(), 12);
    // Its new owner resumes it from the master's offsets: from the beginning here, and
    // after the last archived offset for partition 1.
    assert_eq!(
        handler.resume_offset(0).await.unwrap(),
        rdkafka::Offset::Beginning
    );
    assert_eq!(
        handler.resume_offset(1).await.unwrap(),
        rdkafka::Offset::Offset(12)
    );
    assert_eq!(
        handler.assigned(1).await.unwrap(),
        rdkafka::Offset::Offset(12)
    );
}

#[tokio::test]
async fn a_zombies_late_commit_is_refused_and_nothing_counts_twice() {
    let (_dir, storage, catalog) = setup();
    let mut zombie = archiver(&storage, &catalog).await;
    let mut owner = archiver(&storage, &catalog).await;
    // Both read partition 0 from offset 0: the zombie never heard it lost the partition.
    zombie.handle(&batch(&[(0, 0..20)])).await.unwrap();
    owner.handle(&batch(&[(0, 0..20)])).await.unwrap();
    owner.flush(true).await.unwrap();
    let e = zombie.flush(true).await.unwrap_err();
    assert!(
        matches!(
            e,
            SpeedError::Core(CoreError::Fenced {
                stored: 19,
                expected: -1,
                ..
            })
        ),
        "{e}"
    );
    let rows = archived(&storage).await;
    assert_eq!(
        rows,
        (0..20).map(|o| (0, o)).collect::<Vec<_>>(),
        "each offset once"
    );
    // The new owner goes on; a replay of what it archived adds nothing.
    owner.handle(&batch(&[(0, 10..30)])).await.unwrap();
    owner.flush(true).await.unwrap();
    assert_eq!(
        archived(&storage).await,
        (0..30).map(|o| (0, o)).collect::<Vec<_>>()
    );
}

/// A store that fails some puts of Delta log entries: before writing them, or after (the
/// response lost although the entry landed).
#[derive(Debug)]
struct Faulty {
    inner: Arc<dyn object_store::ObjectStore>,
    fail_before: std::sync::atomic::AtomicUsize,
    lose_response: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

fn take(n: &std::sync::atomic::AtomicUsize) -> bool {
    n.fetch_update(
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
        |v| v.checked_sub(1),
    )
    .is_ok()
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: what.into(),
    }
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let log = location.as_ref().contains("master/app_events/_delta_log/")
            && location.as_ref().ends_with(".json");
        if log && take(&self.fail_before) {
            return Err(injected("timed out before the write"));
        }
        let r = self.inner.put_opts(location, payload, opts).await?;
        if log && take(&self.lose_response) {
            return Err(injected("connection reset after the write"));
        }
        Ok(r)
    }
    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// Storage faults while committing: a commit that failed before it was written, and one
/// whose response was lost after it landed. Each fails the archiver's flush; its restart
/// replays the same messages, and every offset is in the master dataset exactly once.
#[tokio::test]
async fn storage_faults_at_commit_never_duplicate_or_tear() {
    let (_dir, _, catalog) = setup();
    let faulty = Arc::new(Faulty {
        inner: Arc::new(object_store::memory::InMemory::new()),
        fail_before: 0.into(),
        lose_response: 0.into(),
    });
    let storage = Storage::with_store(
        Layout::parse("memory:///").unwrap(),
        Arc::clone(&faulty) as Arc<dyn object_store::ObjectStore>,
    );
    // Created before the faults: the tables exist.
    let mut a = archiver(&storage, &catalog).await;
    a.handle(&batch(&[(0, 0..10)])).await.unwrap();
    a.flush(true).await.unwrap();

    for (fault, from) in [(&faulty.fail_before, 10), (&faulty.lose_response, 20)] {
        fault.store(1, std::sync::atomic::Ordering::SeqCst);
        let mut a = archiver(&storage, &catalog).await;
        a.handle(&batch(&[(0, from..from + 10)])).await.unwrap();
        assert!(a.flush(true).await.is_err(), "the commit at {from} failed");
        // The restart: the group replays from its last reported offset.
        let mut again = archiver(&storage, &catalog).await;
        again.handle(&batch(&[(0, 0..from + 10)])).await.unwrap();
        again.flush(true).await.unwrap();
        assert_eq!(
            archived(&storage).await,
            (0..from + 10).map(|o| (0, o)).collect::<Vec<_>>(),
            "each offset once after the fault at {from}"
        );
    }
}

/// The archiver writes when its pending rows would make a file of the target size (estimated
/// from the bytes per row of what it wrote), long before its row cap or its interval.
#[tokio::test]
async fn the_archiver_writes_files_of_about_the_target_size() {
    let (_dir, storage, catalog) = setup();
    let mut a = Archiver::open(
        storage.clone(),
        Arc::clone(&catalog.schemas["app_events"]),
        ArchiverConfig {
            flush_interval: Duration::from_secs(3600),
            flush_rows: 1_000_000,
            target_file_bytes: 100_000,
        },
        Arc::new(MockClock::new(NOW)),
    )
    .await
    .unwrap();
    let stats = Arc::clone(&a.stats);
    let commits = || stats.commits.load(std::sync::atomic::Ordering::Relaxed);
    // 1,000 rows at the assumed 64 bytes a row: under the target, nothing written.
    assert!(a.handle(&batch(&[(0, 0..1_000)])).await.unwrap().is_empty());
    assert_eq!(commits(), 0);
    assert!(archived(&storage).await.is_empty());
    // 2,000: over it, written at once.
    let done = a.handle(&batch(&[(0, 1_000..2_000)])).await.unwrap();
    assert_eq!(
        done,
        [(0, 2_000)],
        "the offsets to commit: the next to read"
    );
    assert_eq!(commits(), 1);
    assert_eq!(archived(&storage).await.len(), 2_000);
    // The bytes per row it sizes files by moved towards what it wrote (the reference events
    // take fewer than the 64 it assumed).
    assert!(a.bytes_per_row() < 64.0, "{}", a.bytes_per_row());
    // What it wrote is near the target.
    let table = storage
        .open(&storage.layout().master("app_events"))
        .await
        .unwrap()
        .unwrap();
    let sizes: Vec<u64> = table
        .snapshot()
        .unwrap()
        .log_data()
        .into_iter()
        .map(|f| f.size() as u64)
        .collect();
    // One file per event day (a few events are late, of other days).
    let total: u64 = sizes.iter().sum();
    assert!(
        (40_000..400_000).contains(&total),
        "{sizes:?}: {total} bytes for a 100,000-byte target"
    );
}
