//! Starting the consumers of a deployment: an archiver and a speed layer for every event
//! schema, each in its own task. Production (`tandem run`, `tandem archive`, the demo) and the
//! tests start them through [`start`], so what is tested is what runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tandem_core::storage::Storage;
use tandem_core::time::Clock;
use tandem_core::Catalog;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::archiver::{Archiver, ArchiverConfig, ArchiverStats};
use crate::checkpoint::CheckpointStore;
use crate::error::Result;
use crate::kafka::{self, KafkaConfig};
use crate::speed::{SpeedLayer, SpeedLayers, SpeedSink};

/// Which consumers to start, and how often they flush.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// Start an archiver per schema.
    pub archive: bool,
    /// Start a speed layer per schema.
    pub speed: bool,
    pub archiver: ArchiverConfig,
    /// How often the archiver is asked to flush.
    pub archive_tick: Duration,
    /// How often the speed layer checkpoints the partitions that changed.
    pub speed_tick: Duration,
    /// Keep the speed layer's state in checkpoints in the deployment's storage (off: in memory
    /// only, replayed from the earliest retained offset after a restart).
    pub checkpoints: bool,
    /// How many checkpoints of each partition to keep.
    pub checkpoint_keep: usize,
    /// How old a publish must be before the speed layer drops the buckets it covers.
    pub prune_grace: Duration,
    /// Messages a partition may be behind its high watermark with the speed layer still
    /// ready (`/readyz`).
    pub ready_max_lag: i64,
    /// The most groups the speed state of a schema holds (see `SpeedLayer::with_max_keys`).
    pub max_state_keys: usize,
    /// Event time within which a repeated event id is dropped as a duplicate (zero: never).
    pub dedup_window: Duration,
    /// The runtime the consumers run on (`None`: the caller's). A process that serves queries
    /// gives ingestion a runtime of its own whose threads run at a lower CPU priority, so
    /// that a commit or a checkpoint never holds up an answer.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            archive: true,
            speed: true,
            archiver: ArchiverConfig::default(),
            archive_tick: Duration::from_millis(500),
            speed_tick: Duration::from_secs(1),
            checkpoints: true,
            checkpoint_keep: 3,
            prune_grace: Duration::from_secs(60),
            ready_max_lag: 100_000,
            max_state_keys: 10_000_000,
            dedup_window: Duration::from_secs(60),
            runtime: None,
        }
    }
}

/// Which consumer a task is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerName {
    /// `archiver` or `speed layer`.
    pub role: &'static str,
    pub schema: String,
}

impl std::fmt::Display for ConsumerName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} of `{}`", self.role, self.schema)
    }
}

/// The running consumers.
#[derive(Debug)]
pub struct Consumers {
    /// One task per consumer; each ends with its name and its result.
    pub tasks: JoinSet<(ConsumerName, Result<()>)>,
    /// The speed layers, to answer queries from.
    pub speed: Arc<SpeedLayers>,
    /// Each archiver's counters, by schema.
    pub archiver_stats: BTreeMap<String, Arc<ArchiverStats>>,
}

/// Spawns a consumer's task on the runtime `options` names, or the caller's.
fn spawn<F>(tasks: &mut JoinSet<F::Output>, options: &ConsumerOptions, task: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match &options.runtime {
        Some(runtime) => tasks.spawn_on(task, runtime),
        None => tasks.spawn(task),
    };
}

/// Starts the consumers `options` asks for, for every schema of `catalog`, until `shutdown`.
/// Opening the tables happens before this returns, so a store that cannot be written fails
/// here.
pub async fn start(
    catalog: &Catalog,
    storage: &Storage,
    kafka_config: &KafkaConfig,
    clock: Arc<dyn Clock>,
    shutdown: &CancellationToken,
    options: &ConsumerOptions,
) -> Result<Consumers> {
    let mut tasks = JoinSet::new();
    let mut layers = BTreeMap::new();
    let mut archiver_stats = BTreeMap::new();
    for (name, schema) in &catalog.schemas {
        if options.archive {
            let mut archiver = Archiver::open(
                storage.clone(),
                Arc::clone(schema),
                options.archiver,
                Arc::clone(&clock),
            )
            .await?;
            archiver_stats.insert(name.clone(), Arc::clone(&archiver.stats));
            let (cfg, topic, token, tick) = (
                kafka_config.clone(),
                schema.topic.clone(),
                shutdown.clone(),
                options.archive_tick,
            );
            let id = ConsumerName {
                role: "archiver",
                schema: name.clone(),
            };
            let task = async move {
                let r = kafka::run(&cfg, "archive", &topic, &mut archiver, tick, token).await;
                (id, r)
            };
            spawn(&mut tasks, options, task);
        }
        if options.speed {
            let mut layer = SpeedLayer::new(catalog, name, Arc::clone(&clock))?
                .with_max_keys(options.max_state_keys)
                .with_dedup_window(options.dedup_window);
            if options.checkpoints {
                let store = CheckpointStore::new(storage.objects()?, name, options.checkpoint_keep);
                layer = layer.with_checkpoints(store);
            }
            let layer = Arc::new(layer);
            if let Err(e) = layer.preload().await {
                tracing::warn!(schema = %name, error = %e, "checkpoints not preloaded; answering from assigned partitions only");
            }
            layers.insert(name.clone(), Arc::clone(&layer));
            let (cfg, topic, token, tick) = (
                kafka_config.clone(),
                schema.topic.clone(),
                shutdown.clone(),
                options.speed_tick,
            );
            let id = ConsumerName {
                role: "speed layer",
                schema: name.clone(),
            };
            let task = async move {
                let r = kafka::run(&cfg, "speed", &topic, &mut SpeedSink(layer), tick, token).await;
                (id, r)
            };
            spawn(&mut tasks, options, task);
        }
    }
    Ok(Consumers {
        tasks,
        speed: Arc::new(SpeedLayers::new(layers)),
        archiver_stats,
    })
}
