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
        let layer = SpeedLayer::new(catalog, schema, Arc::new(SystemClock))?;
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
