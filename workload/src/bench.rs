//! The decode and decode+aggregate benchmark of the speed layer on the reference events,
//! without Kafka: what `tandem bench` and `cargo bench -p tandem-workload` measure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tandem_core::decode::{Decoder, Message};
use tandem_core::time::{Clock, SystemClock, DAY_US};
use tandem_core::Catalog;
use tandem_speed::SpeedLayer;

use crate::gen::{GenConfig, Generator};
use crate::WorkloadError;

type Result<T> = std::result::Result<T, WorkloadError>;

/// Messages per decoded batch, as the consumer loop gathers them.
const CHUNK: usize = 10_000;
/// Kafka partitions the events are spread over.
const PARTITIONS: usize = 4;

/// What one run measured.
#[derive(Debug, Clone)]
pub struct DecodeAggregate {
    pub events: usize,
    pub bytes: usize,
    pub views: usize,
    /// Best of the rounds, in seconds.
    pub decode_s: f64,
    pub aggregate_s: f64,
}

impl DecodeAggregate {
    pub fn decode_events_per_s(&self) -> f64 {
        self.events as f64 / self.decode_s
    }

    pub fn aggregate_events_per_s(&self) -> f64 {
        self.events as f64 / self.aggregate_s
    }
}

/// The reference events as JSON payloads: three days of `n` generated events ending now.
pub fn reference_payloads(n: usize, seed: u64) -> Vec<String> {
    let now = SystemClock.now_us();
    Generator::new(GenConfig {
        seed,
        ..Default::default()
    })
    .history(n, now - 3 * DAY_US, now)
    .map(|e| e.to_json())
    .collect()
}

/// Decodes `payloads` in consumer-sized batches, then decodes and aggregates them into every
/// view of `schema` on one core; best of `rounds` for each.
pub fn decode_aggregate(
    catalog: &Catalog,
    schema: &str,
    payloads: &[String],
    rounds: usize,
) -> Result<DecodeAggregate> {
    let s = catalog
        .schemas
        .get(schema)
        .ok_or_else(|| WorkloadError::UnknownSchema(schema.to_string()))?;
    let n = payloads.len();
    // Messages as a consumer sees them: partition by position, offsets per partition.
    let mut by_partition: Vec<Vec<Message<'_>>> = vec![Vec::new(); PARTITIONS];
    for (i, p) in payloads.iter().enumerate() {
        by_partition[i % PARTITIONS].push(Message {
            payload: Some(p.as_bytes()),
            partition: (i % PARTITIONS) as i32,
            offset: (i / PARTITIONS) as i64,
            timestamp_ms: None,
        });
    }
    let now = SystemClock.now_us();
    let decoder = Decoder::new(Arc::clone(s));
    let mut decode_s = f64::INFINITY;
    let mut aggregate_s = f64::INFINITY;
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let mut rows = 0;
        for msgs in &by_partition {
            for c in msgs.chunks(CHUNK) {
                rows += decoder.decode(c, now)?.batch.num_rows();
            }
        }
        decode_s = decode_s.min(t.elapsed().as_secs_f64());
        std::hint::black_box(rows);

        let t = Instant::now();
        // As production runs it: duplicates by event id dropped within a minute.
        let layer = SpeedLayer::new(catalog, schema, Arc::new(SystemClock))?
            .with_dedup_window(std::time::Duration::from_secs(60));
        for (p, msgs) in by_partition.iter().enumerate() {
            for c in msgs.chunks(CHUNK) {
                layer.apply(p as i32, c)?;
            }
        }
        aggregate_s = aggregate_s.min(t.elapsed().as_secs_f64());
        let seen = layer.stats.events.load(Ordering::Relaxed)
            + layer.stats.rejected.load(Ordering::Relaxed);
        if seen != n as u64 {
            return Err(WorkloadError::Bench(format!(
                "the speed layer took in {seen} of {n} events"
            )));
        }
    }
    Ok(DecodeAggregate {
        events: n,
        bytes: payloads.iter().map(String::len).sum(),
        views: catalog.views_of(schema).count(),
        decode_s,
        aggregate_s,
    })
}

/// What checkpointing a speed state measured.
#[derive(Debug, Clone)]
pub struct CheckpointFigures {
    /// Groups held over all views and partitions.
    pub keys: usize,
    /// The state's estimated bytes in memory.
    pub state_bytes: usize,
    /// Bytes of the checkpoints written (one per partition).
    pub checkpoint_bytes: u64,
    /// Encoding and writing every partition's checkpoint to a local directory.
    pub checkpoint_s: f64,
    /// Reading them back into a new owner's state.
    pub restore_s: f64,
}

/// Aggregates `payloads` into every view of `schema`, then times a checkpoint of the whole
/// state to a local directory (under the system's temporary directory, removed after) and
/// its restore by a new owner.
pub fn checkpoint(
    catalog: &Catalog,
    schema: &str,
    payloads: &[String],
) -> Result<CheckpointFigures> {
    use object_store::local::LocalFileSystem;
    use tandem_speed::CheckpointStore;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkloadError::Bench(e.to_string()))?;
    let dir = std::env::temp_dir().join(format!("tandem-checkpoint-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| WorkloadError::Bench(e.to_string()))?;
    let store: Arc<dyn object_store::ObjectStore> = Arc::new(
        LocalFileSystem::new_with_prefix(&dir).map_err(|e| WorkloadError::Bench(e.to_string()))?,
    );
    let layer = |store: &Arc<dyn object_store::ObjectStore>| -> Result<SpeedLayer> {
        Ok(SpeedLayer::new(catalog, schema, Arc::new(SystemClock))?
            .with_checkpoints(CheckpointStore::new(Arc::clone(store), schema, 1)))
    };
    let result = runtime.block_on(async {
        let owner = layer(&store)?;
        for p in 0..PARTITIONS as i32 {
            owner.assign(p).await?;
        }
        for (i, chunk) in payloads.chunks(CHUNK * PARTITIONS).enumerate() {
            for p in 0..PARTITIONS {
                let msgs: Vec<Message<'_>> = chunk
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| j % PARTITIONS == p)
                    .map(|(j, payload)| Message {
                        payload: Some(payload.as_bytes()),
                        partition: p as i32,
                        offset: ((i * CHUNK * PARTITIONS + j) / PARTITIONS) as i64,
                        timestamp_ms: None,
                    })
                    .collect();
                owner.apply(p as i32, &msgs)?;
            }
        }
        let (keys, state_bytes) = owner.state_size();
        let t = Instant::now();
        let written = owner.checkpoint().await;
        let checkpoint_s = t.elapsed().as_secs_f64();
        if written.len() != PARTITIONS {
            return Err(WorkloadError::Bench(format!(
                "{} of {PARTITIONS} partitions checkpointed",
                written.len()
            )));
        }
        let checkpoint_bytes = dir_bytes(&dir);
        let t = Instant::now();
        let restored = layer(&store)?;
        for p in 0..PARTITIONS as i32 {
            restored.assign(p).await?;
        }
        let restore_s = t.elapsed().as_secs_f64();
        if restored.state_size().0 != keys {
            return Err(WorkloadError::Bench("the restored state differs".into()));
        }
        Ok(CheckpointFigures {
            keys,
            state_bytes,
            checkpoint_bytes,
            checkpoint_s,
            restore_s,
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Bytes of the files under `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
