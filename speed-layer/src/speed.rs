//! The speed aggregation: every view of one event schema, kept per Kafka partition, so that a
//! partition's state can move with the partition.
//!
//! State lives in memory, each partition behind its own lock: ingestion into one partition
//! never waits for another, and a query holds a partition's lock for one bucket's merge at a
//! time, so ingestion waits at most that long. A message whose offset the partition has
//! already applied is skipped, so a redelivery never counts twice. Buckets a published batch
//! covers are dropped once the publish is older than a grace period ([`prune_covered`]), so the
//! state holds what no batch covers yet, plus that grace. Without checkpoints, a restarted speed layer replays its
//! topic from the earliest retained offset (its consumer group never commits).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tandem_core::decode::{Decoder, Message};
use tandem_core::query::{AggRow, Coverage, RealtimeStatus, RowSet, ViewQuery};
use tandem_core::time::Clock;
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::ViewDef;
use tandem_core::{Catalog, CoreError};

use crate::aggregate::{Groups, Interner, ViewAggregator};
use crate::error::{Result, SpeedError};
use crate::kafka::{BatchSink, MessageBatch};

/// One partition's state: every view's groups and the next offset to apply.
#[derive(Debug, Default)]
struct PartitionState {
    next_offset: i64,
    groups: Vec<Groups>,
    interner: Interner,
    last_broker_ms: Option<i64>,
    /// Offsets skipped after this partition's first applied message.
    missed: u64,
}

/// Counters of the speed layer.
#[derive(Debug, Default)]
pub struct SpeedStats {
    pub events: AtomicU64,
    pub rejected: AtomicU64,
    pub skipped_redelivered: AtomicU64,
    /// Offsets never delivered, in gaps wider than a transaction marker (removed by retention
    /// before they were read, or an aborted transaction's): events the speed view may lack
    /// until a batch covers their buckets.
    pub missed_offsets: AtomicU64,
    /// Groups dropped because a published batch covers their buckets.
    pub pruned_groups: AtomicU64,
}

/// The speed layer of one event schema.
#[derive(Debug)]
pub struct SpeedLayer {
    decoder: Decoder,
    aggregators: Vec<ViewAggregator>,
    /// The partitions' states; the map's own lock is taken for writing only to add one.
    partitions: RwLock<BTreeMap<i32, Arc<RwLock<PartitionState>>>>,
    clock: Arc<dyn Clock>,
    pub stats: SpeedStats,
    /// Per view (in the order of `aggregators`): bumped by every change of its state (see
    /// `RealtimeView::generation`), so that events of one view leave the others' answers
    /// standing.
    generations: Vec<AtomicU64>,
    /// The last stamp given to an apply (see `RealtimeView::bucket_stamps`).
    stamps: AtomicU64,
}

impl SpeedLayer {
    /// The speed layer for `schema`'s views in `catalog`.
    pub fn new(catalog: &Catalog, schema: &str, clock: Arc<dyn Clock>) -> Result<Self> {
        let s = catalog
            .schemas
            .get(schema)
            .ok_or_else(|| SpeedError::UnknownSchema(schema.to_string()))?;
        let aggregators = catalog
            .views_of(schema)
            .map(|v| ViewAggregator::new(Arc::clone(v), s))
            .collect::<Result<Vec<_>>>()?;
        let views = aggregators.len();
        Ok(SpeedLayer {
            decoder: Decoder::new(Arc::clone(s)),
            aggregators,
            partitions: RwLock::new(BTreeMap::new()),
            clock,
            stats: SpeedStats::default(),
            generations: (0..views).map(|_| AtomicU64::new(0)).collect(),
            stamps: AtomicU64::new(0),
        })
    }

    /// The partitions' states, each still to be locked.
    fn partition_states(&self) -> Vec<(i32, Arc<RwLock<PartitionState>>)> {
        let parts = self.partitions.read().expect("speed state lock poisoned");
        parts.iter().map(|(p, s)| (*p, Arc::clone(s))).collect()
    }

    /// `partition`'s state, created empty if new.
    fn partition_state(&self, partition: i32) -> Arc<RwLock<PartitionState>> {
        if let Some(s) = self
            .partitions
            .read()
            .expect("speed state lock poisoned")
            .get(&partition)
        {
            return Arc::clone(s);
        }
        let mut parts = self.partitions.write().expect("speed state lock poisoned");
        Arc::clone(parts.entry(partition).or_insert_with(|| {
            Arc::new(RwLock::new(PartitionState {
                groups: vec![Groups::default(); self.aggregators.len()],
                ..Default::default()
            }))
        }))
    }

    /// Applies one partition's messages (in offset order), skipping offsets already applied.
    pub fn apply(&self, partition: i32, messages: &[Message<'_>]) -> Result<()> {
        let state = self.partition_state(partition);
        let mut state = write(&state);
        let state = &mut *state;
        let fresh = messages
            .iter()
            .position(|m| m.offset >= state.next_offset)
            .unwrap_or(messages.len());
        self.stats
            .skipped_redelivered
            .fetch_add(fresh as u64, Ordering::Relaxed);
        let messages = &messages[fresh..];
        let (Some(first), Some(last)) = (messages.first(), messages.last()) else {
            return Ok(());
        };
        // A fresh partition starts wherever the broker's retention begins (older events are the
        // batch layer's); after that, a jump forward means events this state will never hold.
        // A gap of one is a transaction's commit marker, not an event.
        if state.next_offset > 0 && first.offset > state.next_offset + 1 {
            let missed = (first.offset - state.next_offset) as u64;
            state.missed += missed;
            self.stats
                .missed_offsets
                .fetch_add(missed, Ordering::Relaxed);
            tracing::warn!(
                partition,
                from = state.next_offset,
                to = first.offset - 1,
                "offsets were never delivered to the speed layer (removed by retention, or an aborted transaction)"
            );
        }
        let decoded = self.decoder.decode(messages, self.clock.now_us())?;
        let stamp = self.stamps.fetch_add(1, Ordering::Relaxed) + 1;
        for (i, (agg, groups)) in self
            .aggregators
            .iter()
            .zip(state.groups.iter_mut())
            .enumerate()
        {
            if agg.apply(&decoded.batch, groups, &mut state.interner, stamp)? {
                // After the change, before the partition's lock is released.
                self.generations[i].fetch_add(1, Ordering::Release);
            }
        }
        state.next_offset = last.offset + 1;
        state.last_broker_ms = last.timestamp_ms.or(state.last_broker_ms);
        self.stats
            .events
            .fetch_add(decoded.batch.num_rows() as u64, Ordering::Relaxed);
        self.stats
            .rejected
            .fetch_add(decoded.rejected.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the state of `view`'s buckets that `covered` covers, once the publish that covers
    /// them is older than `grace_us` (serving answers those buckets from the batch, so the
    /// state is dead weight for memory and for every query). Returns the groups dropped.
    pub fn prune(&self, view: &str, covered: &Coverage, grace_us: i64) -> usize {
        let Some(i) = self.aggregator(view) else {
            return 0;
        };
        let settled = covered
            .published_us
            .is_some_and(|p| self.clock.now_us().saturating_sub(p) >= grace_us);
        if covered.days.is_empty() || !settled {
            return 0;
        }
        let removed: usize = self
            .partition_states()
            .iter()
            .map(|(_, state)| self.aggregators[i].prune(&mut write(state).groups[i], covered))
            .sum();
        if removed > 0 {
            self.generations[i].fetch_add(1, Ordering::Release);
        }
        self.stats
            .pruned_groups
            .fetch_add(removed as u64, Ordering::Relaxed);
        if removed > 0 {
            tracing::debug!(view, removed, "pruned speed groups a batch covers");
        }
        removed
    }

    /// Adds the rows of `buckets` of view `i` in one partition's `state` to `out`. The
    /// partition's lock is held for one bucket at a time: ingestion waits at most one
    /// bucket's merge. Buckets pruned in between are simply gone.
    fn query_partition(
        &self,
        i: usize,
        state: &RwLock<PartitionState>,
        q: &ViewQuery,
        buckets: &[i64],
        out: &mut RowSet,
    ) {
        for &bucket in buckets {
            let s = read(state);
            self.aggregators[i].query_bucket(&s.groups[i], &s.interner, bucket, q, out);
        }
    }

    /// The index of `view`'s aggregator.
    fn aggregator(&self, view: &str) -> Option<usize> {
        self.aggregators.iter().position(|a| a.view.name == view)
    }

    /// The next offset each partition expects.
    pub fn offsets(&self) -> BTreeMap<i32, i64> {
        self.partition_states()
            .iter()
            .map(|(p, s)| (*p, read(s).next_offset))
            .collect()
    }

    /// The number of groups held, over all views and partitions.
    pub fn group_count(&self) -> usize {
        self.partition_states()
            .iter()
            .map(|(_, s)| {
                read(s)
                    .groups
                    .iter()
                    .flat_map(|g| g.values())
                    .map(|b| b.groups.len())
                    .sum::<usize>()
            })
            .sum()
    }
}

/// `h` and `x` mixed (FxHash's step): equal inputs give equal stamps, different ones almost
/// surely different stamps.
fn mix(h: u64, x: u64) -> u64 {
    (h.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95)
}

fn read(state: &RwLock<PartitionState>) -> RwLockReadGuard<'_, PartitionState> {
    state.read().expect("speed state lock poisoned")
}

fn write(state: &RwLock<PartitionState>) -> RwLockWriteGuard<'_, PartitionState> {
    state.write().expect("speed state lock poisoned")
}

impl RealtimeView for SpeedLayer {
    fn query(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        covered: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        let Some(i) = self.aggregator(&view.name) else {
            return Err(CoreError::UnknownView(view.name.clone()));
        };
        let agg = &self.aggregators[i];
        let mut out = RowSet::default();
        for (_, state) in self.partition_states() {
            let buckets = agg.buckets(&read(&state).groups[i], q, covered);
            self.query_partition(i, &state, q, &buckets, &mut out);
        }
        Ok(out.into_rows())
    }

    fn query_buckets(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        _covered: &Coverage,
        buckets: &[i64],
    ) -> tandem_core::Result<Vec<AggRow>> {
        let Some(i) = self.aggregator(&view.name) else {
            return Err(CoreError::UnknownView(view.name.clone()));
        };
        let mut out = RowSet::default();
        for (_, state) in self.partition_states() {
            self.query_partition(i, &state, q, buckets, &mut out);
        }
        Ok(out.into_rows())
    }

    fn bucket_stamps(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        covered: &Coverage,
    ) -> Option<BTreeMap<i64, u64>> {
        let i = self.aggregator(&view.name)?;
        let mut stamps: BTreeMap<i64, u64> = BTreeMap::new();
        for (p, state) in self.partition_states() {
            let s = read(&state);
            for bucket in self.aggregators[i].buckets(&s.groups[i], q, covered) {
                // Every partition's stamp enters the bucket's, so that a change in any of them
                // (or a partition's state appearing) changes it.
                let stamp = s.groups[i][&bucket].stamp;
                let h = stamps.entry(bucket).or_insert(0);
                *h = mix(mix(*h, p as u64), stamp);
            }
        }
        Some(stamps)
    }

    fn status(&self) -> RealtimeStatus {
        let now_ms = self.clock.now_us() / 1000;
        let (mut partition_lag_ms, mut stale_partitions) = (BTreeMap::new(), Vec::new());
        for (p, state) in self.partition_states() {
            let s = read(&state);
            if let Some(t) = s.last_broker_ms {
                partition_lag_ms.insert(p, (now_ms - t).max(0));
            }
            if s.missed > 0 {
                stale_partitions.push(p);
            }
        }
        RealtimeStatus {
            lag_ms: partition_lag_ms.values().copied().max(),
            partition_lag_ms,
            stale_partitions,
            available: true,
        }
    }

    fn generation(&self, view: &ViewDef) -> Option<u64> {
        let i = self.aggregator(&view.name)?;
        Some(self.generations[i].load(Ordering::Acquire))
    }
}

/// Prunes every speed layer of `layers` of the buckets that `batch` covers, every `every`,
/// once a publish is `grace` old, until `shutdown`.
pub async fn prune_covered(
    layers: Arc<SpeedLayers>,
    batch: Arc<dyn BatchViews>,
    catalog: Arc<Catalog>,
    every: std::time::Duration,
    grace: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let grace_us = i64::try_from(grace.as_micros()).unwrap_or(i64::MAX);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for view in catalog.views.values() {
            let Some(layer) = layers.get(&view.source) else {
                continue;
            };
            match batch.coverage(view).await {
                Ok(covered) => {
                    layer.prune(&view.name, &covered, grace_us);
                }
                Err(e) => {
                    tracing::debug!(view = %view.name, error = %e, "coverage unknown; nothing pruned")
                }
            }
        }
    }
}

/// Feeds consumed batches into a shared [`SpeedLayer`].
#[derive(Debug, Clone)]
pub struct SpeedSink(pub Arc<SpeedLayer>);

impl BatchSink for SpeedSink {
    async fn handle(&mut self, batch: &MessageBatch) -> Result<Vec<(i32, i64)>> {
        for (partition, messages) in batch.by_partition() {
            self.0.apply(partition, &messages)?;
        }
        // State is not durable yet: nothing to report to the group.
        Ok(Vec::new())
    }

    async fn flush(&mut self, _final_flush: bool) -> Result<Vec<(i32, i64)>> {
        Ok(Vec::new())
    }
}

/// The speed layers of several schemas, answering each view from its schema's layer.
#[derive(Debug, Default)]
pub struct SpeedLayers(BTreeMap<String, Arc<SpeedLayer>>);

impl SpeedLayers {
    pub fn new(layers: BTreeMap<String, Arc<SpeedLayer>>) -> Self {
        SpeedLayers(layers)
    }

    /// The speed layer of `schema`.
    pub fn get(&self, schema: &str) -> Option<&Arc<SpeedLayer>> {
        self.0.get(schema)
    }
}

impl RealtimeView for SpeedLayers {
    fn query(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        covered: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        match self.0.get(&view.source) {
            Some(layer) => layer.query(view, q, covered),
            None => Ok(Vec::new()),
        }
    }

    fn status(&self) -> RealtimeStatus {
        let mut out = RealtimeStatus {
            available: !self.0.is_empty(),
            ..Default::default()
        };
        for layer in self.0.values() {
            let s = layer.status();
            out.lag_ms = match (out.lag_ms, s.lag_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            for (p, lag) in s.partition_lag_ms {
                let worst = out.partition_lag_ms.entry(p).or_insert(lag);
                *worst = (*worst).max(lag);
            }
            out.stale_partitions.extend(s.stale_partitions);
        }
        out
    }

    fn generation(&self, view: &ViewDef) -> Option<u64> {
        match self.0.get(&view.source) {
            Some(layer) => layer.generation(view),
            None => Some(0),
        }
    }

    fn bucket_stamps(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        covered: &Coverage,
    ) -> Option<BTreeMap<i64, u64>> {
        match self.0.get(&view.source) {
            Some(layer) => layer.bucket_stamps(view, q, covered),
            None => Some(BTreeMap::new()),
        }
    }

    fn query_buckets(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        covered: &Coverage,
        buckets: &[i64],
    ) -> tandem_core::Result<Vec<AggRow>> {
        match self.0.get(&view.source) {
            Some(layer) => layer.query_buckets(view, q, covered, buckets),
            None => Ok(Vec::new()),
        }
    }
}
