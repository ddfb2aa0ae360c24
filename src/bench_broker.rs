//! `tandem bench --consume archive|speed`: a consumer's throughput end to end from a broker on
//! one runtime thread, next to a consumer of the same messages that only counts them (the raw
//! consume rate through the same client) and, if given, the Python consumer of the shared
//! benchmarks, in one run. `archive`: decode, Parquet and Delta commits into a master dataset;
//! `speed`: decode, aggregate into every view and checkpoint the state. It needs a real broker
//! (`--brokers`): librdkafka's mock keeps only the newest 5 MB of a partition. Run it pinned to
//! one core (`taskset -c 1`) with the broker on another.

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
use tandem_speed::{Archiver, CheckpointStore, KafkaConfig, SpeedLayer, SpeedSink};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::produce::EventProducer;

/// Which consumer the benchmark times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Consumed {
    /// The archiver, into a fresh master dataset.
    Archive,
    /// The speed layer, aggregating every view and checkpointing.
    Speed,
}

/// What the benchmark measured.
#[derive(Debug, serde::Serialize)]
pub struct BrokerBench {
    pub consumer: Consumed,
    pub events: usize,
    pub partitions: i32,
    pub json_bytes: usize,
    pub produce_events_per_s: f64,
    pub raw_consume_events_per_s: f64,
    /// The consumer's rate, end to end.
    pub events_per_s: f64,
    /// Its rate over the raw consume rate.
    pub ratio_to_raw: f64,
    /// The Python consumer's rate on the same topic (its `agg` mode), if it ran.
    pub python_peer_events_per_s: Option<f64>,
    pub ratio_to_python_peer: Option<f64>,
    /// The archiver's commits, files and Parquet bytes.
    pub commits: Option<u64>,
    pub master_files: Option<usize>,
    pub master_bytes: Option<u64>,
    /// The speed state's keys and their estimated bytes.
    pub state_keys: Option<usize>,
    pub state_bytes: Option<usize>,
}

/// The benchmark's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub consumer: Consumed,
    pub events: usize,
    pub partitions: i32,
    pub seed: u64,
    /// `python` and the path of `shared/bench/speed_consumer_ck.py`, to run it beside.
    pub python_peer: Option<(String, std::path::PathBuf)>,
    /// The events as JSON lines (the first `events` of the file, such as the JSON lines of
    /// `shared/bench/gen_events.py`) instead of generated ones.
    pub jsonl: Option<std::path::PathBuf>,
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
/// `taken` (when given) counts the messages the consumer has taken: once it reaches `n` the
/// loop is stopped, so that it writes what it holds at once (its final flush), rather than
/// when its latency bound next comes, which is idle time a stream that never ends does not
/// have; the rate then runs to the end of that flush.
fn timed<F>(
    n: u64,
    counter: Arc<AtomicU64>,
    taken: Option<Box<dyn Fn() -> u64 + Send>>,
    consume: F,
) -> Result<f64>
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
        if seen >= n || taken.as_ref().is_some_and(|t| t() >= n) {
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
    let mut done = Instant::now();
    token.cancel();
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the consumer panicked"))??;
    if taken.is_some() {
        done = Instant::now();
        // The counter may follow the consumer's own by a moment.
        let mut seen = counter.load(Ordering::Relaxed);
        for _ in 0..500 {
            if seen >= n {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
            seen = counter.load(Ordering::Relaxed);
        }
        if seen < n {
            bail!("the consumer stopped at {seen} of {n} messages");
        }
    }
    let (start, at_start) = first.expect("counted");
    let secs = done.duration_since(start).as_secs_f64().max(1e-9);
    Ok((n - at_start) as f64 / secs)
}

pub async fn run(config: &Config, settings: Settings) -> Result<BrokerBench> {
    let Settings {
        consumer,
        events,
        partitions,
        seed,
        python_peer,
        jsonl,
    } = settings;
    let brokers = config.brokers.clone().context(
        "--consume needs a broker (--brokers): librdkafka's mock keeps only 5 MB a partition",
    )?;
    let catalog = crate::roles::catalog(config)?;
    let schema = crate::roles::one_schema(&catalog, None)?;
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

    let payloads = match &jsonl {
        Some(path) => first_lines(path, events)?,
        None => tandem_workload::bench::reference_payloads(events, seed),
    };
    if payloads.len() < events {
        bail!(
            "{} holds only {} events",
            jsonl.unwrap_or_default().display(),
            payloads.len()
        );
    }
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
        timed(events as u64, Arc::clone(&count), None, move |stop| {
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

    let peer = match &python_peer {
        Some((python, script)) => Some(python_consumer(
            python,
            script,
            &brokers,
            &topic,
            events,
            &config.kafka()?.extra,
        )?),
        None => None,
    };
    if let Some(p) = peer {
        eprintln!("python consumer: {p:.0} events/s");
    }

    let dir = tempfile::tempdir().context("a directory for the benchmark's storage")?;
    let storage = Storage::new(tandem_core::paths::Layout::local(dir.path())?)?;
    let mut out = BrokerBench {
        consumer,
        events,
        partitions,
        json_bytes,
        produce_events_per_s,
        raw_consume_events_per_s: raw,
        events_per_s: 0.0,
        ratio_to_raw: 0.0,
        python_peer_events_per_s: peer,
        ratio_to_python_peer: None,
        commits: None,
        master_files: None,
        master_bytes: None,
        state_keys: None,
        state_bytes: None,
    };
    out.events_per_s = match consumer {
        Consumed::Archive => {
            archive(config, &kafka, &topic, &storage, &schema, events, &mut out).await?
        }
        Consumed::Speed => {
            let layer = SpeedLayer::new(&catalog, &schema.name, Arc::new(SystemClock))?;
            let at = (&storage, schema.name.as_str());
            speed(config, &kafka, &topic, at, layer, events, &mut out)?
        }
    };
    out.ratio_to_raw = out.events_per_s / raw;
    out.ratio_to_python_peer = peer.map(|p| out.events_per_s / p);
    Ok(out)
}

/// Times the archiver into a fresh master dataset in `storage`.
async fn archive(
    config: &Config,
    kafka: &KafkaConfig,
    topic: &str,
    storage: &Storage,
    schema: &Arc<tandem_core::schema::EventSchema>,
    events: usize,
    out: &mut BrokerBench,
) -> Result<f64> {
    let archiver = Archiver::open(
        storage.clone(),
        Arc::clone(schema),
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
    let rate = {
        let (kafka, topic) = (kafka.clone(), topic.to_string());
        let archiver = std::sync::Mutex::new(Some(archiver));
        let received = Arc::clone(&stats);
        let taken = Box::new(move || received.received.load(Ordering::Relaxed));
        timed(
            events as u64,
            Arc::clone(&archived),
            Some(taken),
            move |stop| {
                let mut archiver = archiver.lock().expect("archiver").take().expect("once");
                Box::pin(async move {
                    let tick = Duration::from_millis(500);
                    tandem_speed::kafka::run(&kafka, "archive", &topic, &mut archiver, tick, stop)
                        .await
                })
            },
        )?
    };
    let _ = progress.join();
    eprintln!("archive: {rate:.0} events/s");
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
    out.commits = Some(stats.commits.load(Ordering::Relaxed));
    out.master_files = Some(sizes.len());
    out.master_bytes = Some(sizes.iter().sum());
    Ok(rate)
}

/// Times the speed `layer`, aggregating every view of its schema and checkpointing to
/// `storage` as configured.
fn speed(
    config: &Config,
    kafka: &KafkaConfig,
    topic: &str,
    (storage, schema): (&Storage, &str),
    layer: SpeedLayer,
    events: usize,
    out: &mut BrokerBench,
) -> Result<f64> {
    let options = config.consumer_options(false, true);
    let store = CheckpointStore::new(storage.objects()?, schema, options.checkpoint_keep);
    let layer = Arc::new(
        layer
            .with_max_keys(options.max_state_keys)
            .with_dedup_window(options.dedup_window)
            .with_checkpoints(store),
    );
    let applied = Arc::new(AtomicU64::new(0));
    let progress = {
        let (layer, applied) = (Arc::clone(&layer), Arc::clone(&applied));
        // The state's size is read when the last event is applied (the partition's state is
        // dropped when the consumer leaves the group).
        std::thread::spawn(move || loop {
            let n: i64 = layer.offsets().values().sum();
            applied.store(n.max(0) as u64, Ordering::Relaxed);
            if n >= events as i64 {
                return layer.state_size();
            }
            std::thread::sleep(Duration::from_millis(1));
        })
    };
    let rate = {
        let (kafka, topic, layer) = (kafka.clone(), topic.to_string(), Arc::clone(&layer));
        let tick = options.speed_tick;
        timed(events as u64, Arc::clone(&applied), None, move |stop| {
            Box::pin(async move {
                let mut sink = SpeedSink(layer);
                tandem_speed::kafka::run(&kafka, "speed", &topic, &mut sink, tick, stop).await
            })
        })?
    };
    let (keys, bytes) = progress
        .join()
        .map_err(|_| anyhow::anyhow!("the progress thread panicked"))?;
    eprintln!("speed: {rate:.0} events/s");
    out.state_keys = Some(keys);
    out.state_bytes = Some(bytes);
    Ok(rate)
}

/// The first `n` non-empty lines of `path`.
fn first_lines(path: &std::path::Path, n: usize) -> Result<Vec<String>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::with_capacity(n);
    for line in std::io::BufReader::new(file).lines() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if !line.trim().is_empty() {
            out.push(line);
        }
        if out.len() == n {
            break;
        }
    }
    Ok(out)
}

/// Runs the shared benchmarks' Python consumer (`speed_consumer_ck.py --mode agg`) on `topic`;
/// its events/s from its first message.
fn python_consumer(
    python: &str,
    script: &std::path::Path,
    brokers: &str,
    topic: &str,
    events: usize,
    extra: &[(String, String)],
) -> Result<f64> {
    let mut c = std::process::Command::new(python);
    c.arg(script).args([
        "--bootstrap",
        brokers,
        "--topic",
        topic,
        "--mode",
        "agg",
        "--expect",
        &events.to_string(),
    ]);
    for (k, v) in extra {
        c.args(["-X", &format!("{k}={v}")]);
    }
    let out = c
        .output()
        .with_context(|| format!("running {python} {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().with_context(|| {
        format!(
            "the Python consumer printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("the Python consumer's output: {line}"))?;
    v["events_per_s"]
        .as_f64()
        .with_context(|| format!("no events_per_s in {line}"))
}
