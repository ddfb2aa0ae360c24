//! `tandem bench --archive`: the archiver's throughput from a broker into the master dataset
//! (decode, Parquet, Delta commits) on one runtime thread, next to a consumer of the same
//! messages that only counts them (the raw consume rate through the same client), in one run.
//! It needs a real broker (`--brokers`): librdkafka's mock keeps only the newest 5 MB of a
//! partition. Run it pinned to one core (`taskset -c 1`) with the broker on another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;
use tandem_core::storage::Storage;
use tandem_core::time::SystemClock;
use tandem_speed::kafka::{BatchSink, MessageBatch};
use tandem_speed::{Archiver, KafkaConfig};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::produce::EventProducer;

/// What the archive benchmark measured.
#[derive(Debug, serde::Serialize)]
pub struct ArchiveBench {
    pub events: usize,
    pub partitions: i32,
    pub json_bytes: usize,
    pub produce_events_per_s: f64,
    pub raw_consume_events_per_s: f64,
    pub archive_events_per_s: f64,
    /// Archive rate over raw consume rate (the goal: at least 0.5).
    pub ratio: f64,
    pub commits: u64,
    pub master_files: usize,
    pub master_bytes: u64,
}

/// Counts the messages it is given and nothing else.
struct CountSink(Arc<AtomicU64>);

impl BatchSink for CountSink {
    async fn handle(&mut self, batch: &MessageBatch) -> tandem_speed::Result<Vec<(i32, i64)>> {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(Vec::new())
    }

    async fn flush(&mut self, _final_flush: bool) -> tandem_speed::Result<Vec<(i32, i64)>> {
        Ok(Vec::new())
    }
}

/// Runs `consume` (a consumer loop) on a runtime of one worker thread until `counter` reaches
/// `n`; the rate from the first message counted to the last (group joins not included).
fn timed<F>(n: u64, counter: Arc<AtomicU64>, consume: F) -> Result<f64>
where
    F: FnOnce(
            CancellationToken,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = tandem_speed::Result<()>> + Send>,
        > + Send
        + 'static,
{
    let token = CancellationToken::new();
    let stop = token.clone();
    let worker = std::thread::spawn(move || -> Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        runtime.block_on(consume(stop))?;
        Ok(())
    });
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let seen = counter.load(Ordering::Relaxed);
        if first.is_none() && seen > 0 {
            first = Some((Instant::now(), seen));
        }
        if seen >= n {
            break;
        }
        if worker.is_finished() || Instant::now() > deadline {
            token.cancel();
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("the consumer panicked"))??;
            bail!("the consumer stopped at {seen} of {n} messages");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let done = Instant::now();
    token.cancel();
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the consumer panicked"))??;
    let (start, at_start) = first.expect("counted");
    let secs = done.duration_since(start).as_secs_f64().max(1e-9);
    Ok((n - at_start) as f64 / secs)
}

pub async fn run(
    config: &Config,
    events: usize,
    partitions: i32,
    seed: u64,
) -> Result<ArchiveBench> {
    let brokers = config.brokers.clone().context(
        "--archive needs a broker (--brokers): librdkafka's mock keeps only 5 MB a partition",
    )?;
    let catalog = crate::roles::catalog(config)?;
    let schema = Arc::clone(
        catalog
            .schemas
            .values()
            .next()
            .context("no schema defined")?,
    );
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let topic = format!("tandem-bench-{stamp}");

    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let created = admin
        .create_topics(
            &[NewTopic::new(
                &topic,
                partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .context("creating the benchmark topic")?;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }

    let payloads = tandem_workload::bench::reference_payloads(events, seed);
    let json_bytes: usize = payloads.iter().map(String::len).sum();
    let producer = EventProducer::new(&brokers)?;
    let t = Instant::now();
    let topic_p = topic.clone();
    let produced = tokio::task::spawn_blocking(move || -> Result<()> {
        for (i, p) in payloads.iter().enumerate() {
            producer.send(&topic_p, &format!("k{}", i % 10_007), p.as_bytes())?;
        }
        producer.finish()
    });
    produced.await??;
    let produce_events_per_s = events as f64 / t.elapsed().as_secs_f64();
    eprintln!("produced {events} events to {topic} ({produce_events_per_s:.0} events/s)");

    let kafka = KafkaConfig {
        group_prefix: format!("tandem-bench-{stamp}"),
        max_batch: 10_000,
        ..config.kafka()?
    };
    let count = Arc::new(AtomicU64::new(0));
    let raw = {
        let (kafka, topic, count) = (kafka.clone(), topic.clone(), Arc::clone(&count));
        timed(events as u64, Arc::clone(&count), move |stop| {
            Box::pin(async move {
                let mut sink = CountSink(count);
                tandem_speed::kafka::run(
                    &kafka,
                    "raw",
                    &topic,
                    &mut sink,
                    Duration::from_millis(500),
                    stop,
                )
                .await
            })
        })?
    };
    eprintln!("raw consume: {raw:.0} events/s");

    let dir = tempfile::tempdir().context("a directory for the benchmark's master dataset")?;
    let storage = Storage::new(tandem_core::paths::Layout::local(dir.path())?)?;
    let archiver = Archiver::open(
        storage.clone(),
        Arc::clone(&schema),
        config.consumer_options(true, false).archiver,
        Arc::new(SystemClock),
    )
    .await?;
    let stats = Arc::clone(&archiver.stats);
    let archived = Arc::new(AtomicU64::new(0));
    let progress = {
        let (stats, archived) = (Arc::clone(&stats), Arc::clone(&archived));
        std::thread::spawn(move || loop {
            let n = stats.archived.load(Ordering::Relaxed)
                + stats.dead_lettered.load(Ordering::Relaxed);
            // The first message taken counts as the start, as for the raw consumer.
            let taken = stats.received.load(Ordering::Relaxed).min(1);
            archived.store(n.max(taken), Ordering::Relaxed);
            if n >= events as u64 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        })
    };
    let archive = {
        let (kafka, topic) = (kafka.clone(), topic.clone());
        let archiver = std::sync::Mutex::new(Some(archiver));
        timed(events as u64, Arc::clone(&archived), move |stop| {
            let mut archiver = archiver.lock().expect("archiver").take().expect("once");
            Box::pin(async move {
                tandem_speed::kafka::run(
                    &kafka,
                    "archive",
                    &topic,
                    &mut archiver,
                    Duration::from_millis(500),
                    stop,
                )
                .await
            })
        })?
    };
    let _ = progress.join();
    eprintln!("archive: {archive:.0} events/s");

    let table = storage
        .open(&storage.layout().master(&schema.name))
        .await?
        .context("the benchmark's master dataset")?;
    let sizes: Vec<u64> = table
        .snapshot()?
        .log_data()
        .into_iter()
        .map(|f| f.size() as u64)
        .collect();
    Ok(ArchiveBench {
        events,
        partitions,
        json_bytes,
        produce_events_per_s,
        raw_consume_events_per_s: raw,
        archive_events_per_s: archive,
        ratio: archive / raw,
        commits: stats.commits.load(Ordering::Relaxed),
        master_files: sizes.len(),
        master_bytes: sizes.iter().sum(),
    })
}
