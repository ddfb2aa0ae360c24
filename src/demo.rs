//! `tandem demo`: every layer in one process on the embedded default.
//!
//! librdkafka's mock cluster stands in for Kafka, the generator writes a few days of history
//! (or `--events FILE` is streamed instead), the archiver and the speed layer consume it, the
//! batch layer recomputes the closed days once the archiver has caught up, and the API serves
//! the merge. A live stream then keeps the speed layer busy until Ctrl-C.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rdkafka::mocking::MockCluster;
use tandem_batch::{BatchLayer, RunRequest};
use tandem_core::storage::Storage;
use tandem_core::time::format_us;
use tandem_core::view::{DAY_US, HOUR_US};
use tandem_speed::archiver::ArchiverStats;
use tandem_speed::{KafkaConfig, SpeedLayer};
use tandem_workload::{GenConfig, Generator};

use crate::config::{Config, GlobalOpts};
use crate::produce::EventProducer;
use crate::roles::{catalog, clock, start_all};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Port of the HTTP API on 127.0.0.1.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Port of the admin listener (`/livez`, `/readyz`, `/metrics`) on 127.0.0.1; none if
    /// not given (the API's port answers them too).
    #[arg(long)]
    pub admin_port: Option<u16>,
    /// Stream this JSON-lines file instead of synthetic events.
    #[arg(long)]
    pub events: Option<PathBuf>,
    /// Live events per second after the history (0: no live stream).
    #[arg(long, default_value_t = 200)]
    pub rate: u32,
    /// Days of synthetic history before now.
    #[arg(long, default_value_t = 3)]
    pub history_days: u32,
    /// Synthetic history events.
    #[arg(long, default_value_t = 300_000)]
    pub history_events: usize,
    /// Seed of the synthetic events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Kafka partitions of the demo topic.
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
}

pub async fn run(global: &GlobalOpts, args: DemoArgs) -> Result<()> {
    let data = match &global.data {
        Some(d) => {
            if d.exists()
                && std::fs::read_dir(d)
                    .map(|mut e| e.next().is_some())
                    .unwrap_or(true)
            {
                bail!(
                    "the demo's --data directory {} is not empty; the demo's Kafka is new on every start, so give it an empty directory",
                    d.display()
                );
            }
            d.clone()
        }
        None => std::env::temp_dir().join(format!(
            "tandem-demo-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S")
        )),
    };
    std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
    let mut opts = global.clone();
    opts.data = Some(data.clone());
    opts.storage = None;
    let mut config = Config::resolve(&opts)?;
    config.listen.set_port(args.port);
    let (catalog, storage, clock) = (
        catalog(&config)?,
        Storage::new(config.layout.clone())?,
        clock(),
    );
    let schema = Arc::clone(
        catalog
            .schemas
            .values()
            .next()
            .context("no schema defined")?,
    );

    // Ingestion (the consumers, the demo's broker and producer) runs below serving's CPU
    // priority, as in `tandem run`; the broker's and the producer's threads inherit it from
    // the thread that starts them.
    let ingest = config.ingest_runtime()?;
    let cluster = DemoBroker::start(config.ingest_nice, &schema.topic, args.partitions)?;
    let brokers = cluster.brokers.clone();
    tracing::info!(%brokers, topic = %schema.topic, "mock Kafka cluster up");

    let auth = crate::roles::auth(&config, &catalog)?;
    let listen = crate::roles::api_listen(&config, &auth, config.listen);
    let running = start_all(
        &catalog,
        &storage,
        &KafkaConfig::new(&brokers),
        Arc::clone(&clock),
        listen,
        crate::roles::admin_listen(&config, args.admin_port),
        &tandem_speed::ConsumerOptions {
            runtime: ingest.clone(),
            ..config.consumer_options(true, true)
        },
        auth,
    )
    .await?;
    let archiver = running
        .consumers
        .archiver_stats
        .get(&schema.name)
        .cloned()
        .context("archiver")?;

    // History: a file, or synthetic days before now, paced to what the mock broker keeps.
    let producer = {
        let brokers = brokers.clone();
        Arc::new(crate::ingest::on_thread(config.ingest_nice, move || {
            EventProducer::new(&brokers)
        })??)
    };
    let pace = Pace {
        archiver: Arc::clone(&archiver),
        speed: Arc::clone(
            running
                .consumers
                .speed
                .get(&schema.name)
                .context("speed layer")?,
        ),
        window: PACE_EVENTS_PER_PARTITION * args.partitions.max(1) as u64,
    };
    let now = clock.now_us();
    let started = Instant::now();
    let produced = match &args.events {
        Some(file) => {
            let f =
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            let mut n = 0u64;
            for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
                let line = line.with_context(|| format!("reading {}", file.display()))?;
                producer.send(&schema.topic, &i.to_string(), line.as_bytes())?;
                n += 1;
                if n.is_multiple_of(PACE_STEP) {
                    pace.wait(n).await?;
                }
            }
            n
        }
        None => {
            let start = now - args.history_days.max(1) as i64 * DAY_US;
            let gen = Generator::new(GenConfig {
                seed: args.seed,
                ..Default::default()
            });
            let mut n = 0u64;
            for e in gen.history(args.history_events, start, now) {
                producer.send(&schema.topic, &e.device_id, e.to_json().as_bytes())?;
                n += 1;
                if n.is_multiple_of(PACE_STEP) {
                    pace.wait(n).await?;
                }
            }
            n
        }
    };
    producer.finish()?;
    println!(
        "produced {produced} history events in {:.1}s; archiving...",
        started.elapsed().as_secs_f64()
    );

    // Once the archiver has everything, the batch layer recomputes the closed days.
    let (mut last, mut last_progress) = (0, Instant::now());
    loop {
        let missed = archiver.missed_offsets.load(Ordering::Relaxed);
        let done = archiver.archived.load(Ordering::Relaxed)
            + archiver.dead_lettered.load(Ordering::Relaxed)
            + missed;
        if done >= produced {
            if missed > 0 {
                tracing::warn!(
                    missed,
                    "the broker dropped events before they were archived; the batch run lacks them"
                );
            }
            break;
        }
        if done > last {
            (last, last_progress) = (done, Instant::now());
        } else if last_progress.elapsed() > Duration::from_secs(60) {
            tracing::warn!(
                done,
                produced,
                "the archiver made no progress for a minute; the batch run covers what it archived"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let batch = BatchLayer::new(storage.clone(), Arc::clone(&catalog), Arc::clone(&clock))
        .with_options(config.batch.clone());
    // Days close on the archiver's progress: wait (a little) for it to say it caught up.
    let today = tandem_core::time::day_of(clock.now_us());
    let waited = Instant::now();
    while batch.first_open_day(&schema.name).await? < today
        && waited.elapsed() < Duration::from_secs(15)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let t = Instant::now();
    for r in batch.run(None, &RunRequest::default()).await? {
        println!(
            "batch: {} covers {} day(s), {} rows, {} rollup rows",
            r.view,
            r.days.len(),
            r.rows,
            r.rollup_rows
        );
    }
    println!("batch run took {:.1}s", t.elapsed().as_secs_f64());
    // Serve the publish from the first query on.
    running.batch.refresh().await?;

    let base = format!("http://{}", running.address);
    let from = format_us(clock.now_us() / HOUR_US * HOUR_US - 36 * HOUR_US);
    println!("\nTandem demo is serving at {base}");
    if let Some(admin) = running.admin_address {
        println!("  admin (probes):   curl -s http://{admin}/readyz");
    }
    println!("  views:            curl -s {base}/v1/views");
    println!("  installs by hour: curl -s '{base}/v1/views/installs_hourly/query?from={from}&group_by=media_source&limit=20'");
    println!("  top sources:      curl -s '{base}/v1/views/installs_hourly/query?from={from}&granularity=day&group_by=media_source&order_by=-installs&limit=5'");
    println!("  revenue (CSV):    curl -s '{base}/v1/views/purchases_daily/query?from={}&group_by=country&format=csv'", format_us(now - 7 * DAY_US));
    println!("  from the CLI:     cargo run --release -- query installs_hourly --url {base} --from {from} --group-by media_source");
    println!("data: {}   (Ctrl-C stops)", data.display());

    // A live stream until Ctrl-C.
    let live = if args.events.is_none() && args.rate > 0 {
        let (producer, topic, token, clock) = (
            Arc::clone(&producer),
            schema.topic.clone(),
            running.backend.clone(),
            Arc::clone(&clock),
        );
        let rate = args.rate;
        let task = async move {
            let mut gen = Generator::new(GenConfig {
                seed: args.seed.wrapping_add(1),
                ..Default::default()
            });
            // Ten ticks a second, or one event a tick below ten a second.
            let (per_tick, period) = if rate >= 10 {
                (rate / 10, 100)
            } else {
                (1, 1000 / rate as u64)
            };
            let mut tick = tokio::time::interval(Duration::from_millis(period));
            while !token.is_cancelled() {
                tick.tick().await;
                for _ in 0..per_tick {
                    let e = gen.next_at(clock.now_us());
                    if let Err(e) = producer.send(&topic, &e.device_id, e.to_json().as_bytes()) {
                        tracing::warn!(error = %e, "live event not produced");
                    }
                }
            }
        };
        Some(match &ingest {
            Some(runtime) => runtime.spawn(task),
            None => tokio::spawn(task),
        })
    } else {
        None
    };

    let result = running.until_stopped().await;
    if let Some(live) = live {
        live.abort();
        let _ = live.await;
    }
    // Clients go before the broker, so none of them logs the broker's disappearance.
    drop(producer);
    drop(cluster);
    result
}

/// The demo's broker (librdkafka's mock cluster) with its topic, held by a thread of its own
/// at ingestion's priority, which the cluster's threads inherit; it stops when this is dropped.
struct DemoBroker {
    brokers: String,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DemoBroker {
    fn start(nice: i32, topic: &str, partitions: i32) -> Result<Self> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (up_tx, up) = std::sync::mpsc::channel::<Result<String>>();
        let topic = topic.to_string();
        let thread = crate::ingest::thread(nice, move || {
            let cluster = MockCluster::new(1)
                .context("starting the mock Kafka cluster")
                .and_then(|c| {
                    c.create_topic(&topic, partitions, 1)
                        .context("creating the demo topic")?;
                    Ok(c)
                });
            match cluster {
                Ok(cluster) => {
                    let _ = up_tx.send(Ok(cluster.bootstrap_servers()));
                    // Until the demo drops its end.
                    let _ = stopped.recv();
                    drop(cluster);
                }
                Err(e) => {
                    let _ = up_tx.send(Err(e));
                }
            }
        })?;
        let brokers = up
            .recv()
            .context("the mock Kafka cluster's thread ended before it started")??;
        Ok(DemoBroker {
            brokers,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for DemoBroker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Events produced between two looks at the consumers.
const PACE_STEP: u64 = 2_000;
/// How far the producer may run ahead of the slower consumer group, per partition.
///
/// librdkafka's mock broker keeps only the newest 5 MB (or 100,000 message sets) of each
/// partition (`max_size` in `rdkafka_mock.c`) and drops older message sets however far behind
/// the consumers are. A reference event is about 350 bytes on the wire, so 4,000 unread events
/// a partition stay well inside what the broker keeps, even with skewed keys.
const PACE_EVENTS_PER_PARTITION: u64 = 4_000;

/// Holds the history producer back until both consumer groups have nearly caught up.
struct Pace {
    archiver: Arc<ArchiverStats>,
    speed: Arc<SpeedLayer>,
    window: u64,
}

impl Pace {
    /// Messages the slower consumer group has taken in (or learned it will never see).
    fn consumed(&self) -> u64 {
        let a = &self.archiver;
        let s = &self.speed.stats;
        let archived =
            a.received.load(Ordering::Relaxed) + a.missed_offsets.load(Ordering::Relaxed);
        let speed = s.events.load(Ordering::Relaxed)
            + s.rejected.load(Ordering::Relaxed)
            + s.missed_offsets.load(Ordering::Relaxed);
        archived.min(speed)
    }

    async fn wait(&self, produced: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        while produced.saturating_sub(self.consumed()) > self.window {
            if Instant::now() > deadline {
                bail!(
                    "the consumers stopped at {} of {produced} produced events; see the log above",
                    self.consumed()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}
