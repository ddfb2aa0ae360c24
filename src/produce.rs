//! `tandem gen`, and the producer the demo streams with.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use tandem_core::time::{Clock, SystemClock};
use tandem_core::view::DAY_US;
use tandem_workload::{GenConfig, Generator};

use crate::config::Config;

#[derive(Debug, Args)]
pub struct GenArgs {
    /// Number of events.
    #[arg(long, default_value_t = 100_000)]
    pub events: usize,
    /// Days of history the events span, ending now.
    #[arg(long, default_value_t = 3)]
    pub days: u32,
    /// Random seed: the same seed gives the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of late events (event time 1 to 36 hours before arrival).
    #[arg(long, default_value_t = 0.02)]
    pub late_share: f64,
    /// Write to a Kafka topic: kafka://HOST:PORT/TOPIC.
    #[arg(long, conflicts_with = "out")]
    pub to: Option<String>,
    /// Write JSON lines to a file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub async fn gen(_config: &Config, args: GenArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.late_share) {
        bail!("--late-share must be between 0 and 1");
    }
    let end = SystemClock.now_us();
    let start = end - args.days.max(1) as i64 * DAY_US;
    let events = Generator::new(GenConfig {
        seed: args.seed,
        late_share: args.late_share,
        ..Default::default()
    })
    .history(args.events, start, end);
    match (&args.to, &args.out) {
        (Some(url), None) => {
            let rest = url
                .strip_prefix("kafka://")
                .context("--to must look like kafka://HOST:PORT/TOPIC")?;
            let (brokers, topic) = rest
                .split_once('/')
                .context("--to must look like kafka://HOST:PORT/TOPIC")?;
            let producer = EventProducer::new(brokers)?;
            let n = producer.send_all(topic, events.map(|e| (e.device_id.clone(), e.to_json())))?;
            producer.finish()?;
            eprintln!("produced {n} events to {topic} at {brokers}");
        }
        (None, Some(path)) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("creating {}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let mut n = 0;
            for e in events {
                writeln!(w, "{}", e.to_json())?;
                n += 1;
            }
            w.flush()?;
            eprintln!("wrote {n} events to {}", path.display());
        }
        _ => bail!("say where the events go: --to kafka://HOST:PORT/TOPIC or --out FILE.jsonl"),
    }
    Ok(())
}

/// Counts failed deliveries, so a producer can say whether everything arrived.
#[derive(Debug, Default, Clone)]
pub struct DeliveryCounter {
    pub delivered: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
}

impl ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err((e, _)) => {
                tracing::warn!(error = %e, "delivery failed");
                self.failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// A producer of JSON events, keyed by device so a device's events stay in order.
pub struct EventProducer {
    producer: ThreadedProducer<DeliveryCounter>,
    pub counter: DeliveryCounter,
}

impl EventProducer {
    pub fn new(brokers: &str) -> Result<Self> {
        let counter = DeliveryCounter::default();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "500000")
            .create_with_context(counter.clone())
            .context("creating the Kafka producer")?;
        Ok(EventProducer { producer, counter })
    }

    /// Sends every (key, payload); waits when the local queue is full.
    pub fn send_all(
        &self,
        topic: &str,
        records: impl Iterator<Item = (String, String)>,
    ) -> Result<usize> {
        let mut n = 0;
        for (key, payload) in records {
            self.send(topic, &key, payload.as_bytes())?;
            n += 1;
        }
        Ok(n)
    }

    pub fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
    }

    /// Waits until everything sent is delivered; fails if anything was not.
    pub fn finish(&self) -> Result<()> {
        self.producer
            .flush(Duration::from_secs(60))
            .context("flushing the producer")?;
        let failed = self.counter.failed.load(Ordering::Relaxed);
        if failed > 0 {
            bail!("{failed} events were not delivered");
        }
        Ok(())
    }
}
