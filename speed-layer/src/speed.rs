//! The speed aggregation: every view of one event schema, kept per Kafka partition, so that a
//! partition's state can move with the partition.
//!
//! State lives in memory, each partition behind its own lock: ingestion into one partition
//! never waits for another, and a query holds a partition's lock for one bucket's merge at a
//! time, so ingestion waits at most that long. A message whose offset the partition has
//! already applied is skipped, so a redelivery never counts twice. Buckets a published batch
//! covers are dropped once the publish is older than a grace period ([`prune_covered`]), so the
//! state holds what no batch covers yet, plus that grace.
//!
//! With a [`CheckpointStore`], a partition's state exists only while this instance owns the
//! partition: on assignment it is restored from the partition's newest good checkpoint (and
//! consumption resumes at the checkpoint's offset), every `flush` checkpoints the partitions
//! that changed, and a revoked partition is checkpointed and dropped from the answers. A
//! partition whose checkpoint is refused (a newer owner claimed it) is dropped at once.
//! Without one (tests, benchmarks), any partition that delivers a message gets a state.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use parking_lot::{RwLockReadGuard, RwLockWriteGuard};

use tandem_core::decode::{Decoded, Decoder, Message};
use tandem_core::metric::MetricState;
use tandem_core::query::{AggRow, Coverage, RealtimeStatus, RowSet, ViewQuery};
use tandem_core::time::Clock;
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::ViewDef;
use tandem_core::{Catalog, CoreError};

use std::sync::Mutex;

use datafusion::arrow::array::AsArray;
use futures::future::BoxFuture;
use rdkafka::Offset;

use crate::aggregate::{Admit, BatchIds, Groups, Interner, ViewAggregator};
use crate::checkpoint::{encode_state, CheckpointStore, Lease, Replay, StateRef, ViewKey};
use crate::dedup::Dedup;
use crate::error::{Result, SpeedError};
use crate::kafka::{BatchSink, MessageBatch, Rebalance};

/// One partition's state: every view's groups and the next offset to apply.
#[derive(Debug, Default)]
pub(crate) struct PartitionState {
    next_offset: i64,
    groups: Vec<Groups>,
    interner: Interner,
    last_broker_ms: Option<i64>,
    /// Offsets skipped after this partition's first applied message.
    missed: u64,
    /// Changes (applies and prunes) so far, and how many the last checkpoint holds.
    changes: u64,
    checkpointed: u64,
    /// Loaded from a checkpoint at start to answer from until the group assigns partitions:
    /// not owned, never applied to, flagged stale in answers.
    provisional: bool,
    /// After `tandem replay`: offsets before `until` count only in the buckets discarded.
    replay: Option<Replay>,
    /// The event ids seen within the duplicate window.
    dedup: Option<Dedup>,
}

impl PartitionState {
    fn empty(views: usize) -> Self {
        PartitionState {
            groups: vec![Groups::default(); views],
            ..Default::default()
        }
    }
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
    /// Messages of partitions this instance does not own (fetched before a revoke).
    pub unowned: AtomicU64,
    /// View rows of buckets a settled publish covers: not applied (the archiver sends their
    /// events to the master dataset, the next batch run recomputes their days).
    pub late: AtomicU64,
    /// View rows that needed a new group past the state-key cap: not applied.
    pub over_cap: AtomicU64,
    /// Events dropped as repeats of an event id seen within the duplicate window.
    pub duplicates: AtomicU64,
    /// Checkpoints written, and the last one's size and duration.
    pub checkpoints: AtomicU64,
    pub checkpoint_bytes: AtomicU64,
    pub checkpoint_micros: AtomicU64,
    /// When the last checkpoint was written (microseconds since the epoch; 0 = never).
    pub checkpoint_at_us: AtomicU64,
    /// Checkpoints that could not be written (storage errors; retried at the next flush).
    pub checkpoint_failures: AtomicU64,
    /// Checkpoints refused because a newer owner claimed the partition.
    pub fenced: AtomicU64,
    /// Partitions restored from a checkpoint, and checkpoints passed over as corrupt or stale.
    pub restored: AtomicU64,
    pub skipped_checkpoints: AtomicU64,
}

/// The speed layer of one event schema.
#[derive(Debug)]
pub struct SpeedLayer {
    decoder: Decoder,
    aggregators: Vec<ViewAggregator>,
    /// The partitions' states; the map's own lock is taken for writing only to add one.
    partitions: RwLock<BTreeMap<i32, Arc<StateLock>>>,
    clock: Arc<dyn Clock>,
    pub stats: SpeedStats,
    /// Per view (in the order of `aggregators`): bumped by every change of its state (see
    /// `RealtimeView::generation`), so that events of one view leave the others' answers
    /// standing.
    generations: Vec<AtomicU64>,
    /// The last stamp given to an apply (see `RealtimeView::bucket_stamps`).
    stamps: AtomicU64,
    /// Where checkpoints go; `None` keeps state in memory only.
    checkpoints: Option<CheckpointStore>,
    /// What a checkpoint must match to be restored, per view.
    view_keys: Vec<ViewKey>,
    /// This instance's lease on each partition it owns (with checkpoints only).
    leases: Mutex<BTreeMap<i32, Lease>>,
    /// The offset each partition was last restored at.
    restored_offsets: Mutex<BTreeMap<i32, i64>>,
    /// The broker's view, from the consumer's statistics.
    broker: Mutex<BrokerView>,
    /// Per view: the coverage of the last publish older than the prune grace (its buckets'
    /// events are late).
    covered: Vec<RwLock<Option<Arc<Coverage>>>>,
    /// Groups held, over all views and partitions, and the most allowed.
    keys: std::sync::atomic::AtomicUsize,
    max_keys: usize,
    cap_warned: std::sync::atomic::AtomicBool,
    /// Duplicates by event id are dropped within this much event time (0: not at all).
    dedup_window_us: i64,
    /// The event id and event time columns of decoded batches.
    event_id: usize,
    event_time: usize,
}

/// What the consumer's statistics last said about the broker.
#[derive(Debug, Default)]
struct BrokerView {
    /// Each assigned partition's high watermark.
    high: BTreeMap<i32, i64>,
    /// Since when no broker is reachable (`None`: one is, or no statistics yet).
    down_since: Option<std::time::Instant>,
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
        let view_keys = aggregators
            .iter()
            .map(|a| ViewKey {
                name: a.view.name.clone(),
                definition_hash: a.view.definition_hash.clone(),
                dimensions: a.view.dimensions.len(),
                metrics: a
                    .view
                    .metrics
                    .iter()
                    .map(|m| std::mem::discriminant(&m.empty_state()))
                    .collect(),
            })
            .collect();
        Ok(SpeedLayer {
            checkpoints: None,
            view_keys,
            leases: Mutex::new(BTreeMap::new()),
            restored_offsets: Mutex::new(BTreeMap::new()),
            broker: Mutex::new(BrokerView::default()),
            covered: (0..views).map(|_| RwLock::new(None)).collect(),
            keys: std::sync::atomic::AtomicUsize::new(0),
            max_keys: usize::MAX,
            cap_warned: std::sync::atomic::AtomicBool::new(false),
            dedup_window_us: 0,
            event_id: s.event_id,
            event_time: s.event_time,
            decoder: Decoder::new(Arc::clone(s)),
            aggregators,
            partitions: RwLock::new(BTreeMap::new()),
            clock,
            stats: SpeedStats::default(),
            generations: (0..views).map(|_| AtomicU64::new(0)).collect(),
            stamps: AtomicU64::new(0),
        })
    }

    /// Keeps state in `store`'s checkpoints: partitions are then owned through
    /// [`SpeedLayer::assign`] and [`SpeedLayer::revoke`].
    pub fn with_checkpoints(mut self, store: CheckpointStore) -> Self {
        self.checkpoints = Some(store);
        self
    }

    /// Caps the groups held over all views and partitions: past it, events that need a new
    /// group are counted (`over_cap`) and not applied, and their partitions are flagged stale;
    /// existing groups keep counting.
    pub fn with_max_keys(mut self, max_keys: usize) -> Self {
        self.max_keys = max_keys;
        self
    }

    /// Drops events whose id was seen within `window` of event time (per partition; see
    /// [`crate::dedup`]).
    pub fn with_dedup_window(mut self, window: std::time::Duration) -> Self {
        self.dedup_window_us = i64::try_from(window.as_micros()).unwrap_or(i64::MAX);
        self
    }

    /// Groups in `state`.
    fn keys_of(state: &PartitionState) -> usize {
        state
            .groups
            .iter()
            .flat_map(|g| g.values())
            .map(|b| b.groups.len())
            .sum()
    }

    /// Puts `state` in for `partition`, keeping the key count.
    fn install(&self, partition: i32, state: PartitionState, only_if_absent: bool) {
        let added = Self::keys_of(&state);
        let mut map = self.partitions.write().expect("speed state lock poisoned");
        if only_if_absent && map.contains_key(&partition) {
            return;
        }
        self.keys.fetch_add(added, Ordering::Relaxed);
        if let Some(old) = map.insert(partition, Arc::new(StateLock::new(state))) {
            let removed = Self::keys_of(&read(&old));
            self.keys.fetch_sub(removed, Ordering::Relaxed);
        }
    }

    /// Every view's answers change (a partition appeared or went).
    fn bump_all(&self) {
        for g in &self.generations {
            g.fetch_add(1, Ordering::Release);
        }
    }

    /// Takes ownership of `partition`: restores its newest good checkpoint and claims it.
    /// Returns where consumption resumes: the checkpoint's offset, or the beginning of what
    /// the broker retains when there is no checkpoint for these views.
    pub async fn assign(&self, partition: i32) -> Result<Offset> {
        let Some(store) = &self.checkpoints else {
            self.partition_state(partition);
            return Ok(Offset::Stored);
        };
        let restored = store
            .claim(partition, &self.view_keys, self.clock.now_us())
            .await?;
        self.stats
            .skipped_checkpoints
            .fetch_add(restored.skipped.len() as u64, Ordering::Relaxed);
        let (state, offset) = match restored.state {
            Some((seq, parts)) => {
                self.stats.restored.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    partition,
                    checkpoint = seq,
                    generation = restored.lease.generation,
                    offset = parts.next_offset,
                    age_ms = restored.age_us.unwrap_or(0) / 1000,
                    "partition restored from its checkpoint"
                );
                let offset = Offset::Offset(parts.next_offset);
                self.restored_offsets
                    .lock()
                    .expect("restored offsets lock poisoned")
                    .insert(partition, parts.next_offset);
                (self.state_from(parts), offset)
            }
            None => {
                tracing::info!(
                    partition,
                    generation = restored.lease.generation,
                    "no checkpoint for these views; consuming the partition from the beginning the broker retains"
                );
                (
                    PartitionState::empty(self.aggregators.len()),
                    Offset::Beginning,
                )
            }
        };
        self.leases
            .lock()
            .expect("lease lock poisoned")
            .insert(partition, restored.lease);
        self.install(partition, state, false);
        self.bump_all();
        Ok(offset)
    }

    fn state_from(&self, parts: crate::checkpoint::Parts) -> PartitionState {
        let stamp = self.stamps.fetch_add(1, Ordering::Relaxed) + 1;
        let mut groups = parts.groups;
        for b in groups.iter_mut().flat_map(|g| g.values_mut()) {
            b.stamp = stamp;
        }
        PartitionState {
            next_offset: parts.next_offset,
            groups,
            interner: parts.interner,
            last_broker_ms: parts.last_broker_ms,
            missed: parts.missed,
            changes: 0,
            checkpointed: 0,
            provisional: false,
            replay: parts.replay,
            dedup: parts.dedup,
        }
    }

    /// Loads every partition's newest good checkpoint, to answer from until the group assigns
    /// partitions (a restarted process otherwise answers nothing until its old membership
    /// expires). These states are flagged stale and never applied to; the first assignment
    /// replaces those it assigns and drops the others. Returns how many were loaded.
    pub async fn preload(&self) -> Result<usize> {
        let Some(store) = &self.checkpoints else {
            return Ok(0);
        };
        let mut loaded = 0;
        for partition in store.partitions().await? {
            let (_, found) = store
                .newest(partition, &self.view_keys, self.clock.now_us())
                .await?;
            let Some((_, parts)) = found.state else {
                continue;
            };
            let mut state = self.state_from(parts);
            state.provisional = true;
            // An assignment that came first wins.
            self.install(partition, state, true);
            loaded += 1;
        }
        if loaded > 0 {
            self.bump_all();
            tracing::info!(
                partitions = loaded,
                "answering from checkpoints until the group assigns partitions"
            );
        }
        Ok(loaded)
    }

    /// Records the broker's high watermarks and reachability (from the consumer's
    /// statistics).
    pub fn watermarks(&self, high: &[(i32, i64)], broker_up: bool) {
        let mut b = self.broker.lock().expect("broker view lock poisoned");
        b.high = high.iter().copied().collect();
        match (broker_up, b.down_since) {
            (true, _) => b.down_since = None,
            (false, None) => {
                tracing::warn!("no Kafka broker is reachable");
                b.down_since = Some(std::time::Instant::now());
            }
            (false, Some(_)) => {}
        }
    }

    /// Messages each owned partition has still to apply (high watermark minus next offset).
    pub fn consumer_lag(&self) -> BTreeMap<i32, i64> {
        let high = self
            .broker
            .lock()
            .expect("broker view lock poisoned")
            .high
            .clone();
        self.partition_states()
            .iter()
            .filter_map(|(p, s)| {
                let s = look(s);
                let h = *high.get(p)?;
                (!s.provisional).then(|| (*p, (h - s.next_offset).max(0)))
            })
            .collect()
    }

    /// Why the speed layer should not take traffic yet, if it should not: no broker
    /// reachable for longer than `broker_grace`, partitions not assigned yet (answered from
    /// checkpoints), or a partition more than `max_lag` messages behind (catching up after a
    /// restore).
    pub fn not_ready(&self, max_lag: i64, broker_grace: std::time::Duration) -> Option<String> {
        if let Some(since) = self
            .broker
            .lock()
            .expect("broker view lock poisoned")
            .down_since
        {
            if since.elapsed() >= broker_grace {
                return Some(format!(
                    "no Kafka broker reachable for {} s",
                    since.elapsed().as_secs()
                ));
            }
        }
        let provisional: Vec<i32> = self
            .partition_states()
            .iter()
            .filter(|(_, s)| look(s).provisional)
            .map(|(p, _)| *p)
            .collect();
        if !provisional.is_empty() {
            return Some(format!(
                "waiting for the group to assign partitions (partitions {provisional:?} answered from their checkpoints)"
            ));
        }
        let behind: Vec<String> = self
            .consumer_lag()
            .into_iter()
            .filter(|&(_, lag)| lag > max_lag)
            .map(|(p, lag)| format!("partition {p} is {lag} messages behind"))
            .collect();
        (!behind.is_empty()).then(|| format!("catching up: {}", behind.join(", ")))
    }

    /// The group's assignment is `assigned`: provisional states of other partitions go.
    pub fn assignment(&self, assigned: &[i32]) {
        let provisional: Vec<i32> = self
            .partition_states()
            .iter()
            .filter(|(p, s)| !assigned.contains(p) && read(s).provisional)
            .map(|(p, _)| *p)
            .collect();
        for p in provisional {
            self.drop_partition(p);
        }
    }

    /// The first bucket at or after `from_us` of every view, in the order of the state's
    /// views: what a rewind to `from_us` discards.
    pub fn cutoffs(&self, from_us: i64) -> Vec<i64> {
        self.aggregators
            .iter()
            .map(|a| {
                let g = a.view.granularity;
                let floor = g.floor(from_us);
                if floor < from_us {
                    g.next(floor)
                } else {
                    floor
                }
            })
            .collect()
    }

    /// Rewinds `partition`'s checkpointed state (for `tandem replay`, with no instance
    /// consuming): discards every view's buckets from its cutoff on and makes the partition
    /// resume at `offset`, counting the offsets it had already applied only in the discarded
    /// buckets. `offset` must hold every event of those buckets (the offset for the earliest
    /// cutoff's time: brokers stamp an event after it happens). Returns the offset the state
    /// held and the groups discarded, or `None` if there is nothing to rewind.
    pub async fn rewind(
        &self,
        partition: i32,
        cutoffs: &[i64],
        offset: i64,
    ) -> Result<Option<(i64, usize)>> {
        let store = self
            .checkpoints
            .as_ref()
            .ok_or_else(|| SpeedError::Runtime("rewinding needs the checkpoint store".into()))?;
        let restored = store
            .claim(partition, &self.view_keys, self.clock.now_us())
            .await?;
        let mut lease = restored.lease;
        let Some((_, mut parts)) = restored.state else {
            return Ok(None);
        };
        if let Some(r) = &parts.replay {
            return Err(SpeedError::Runtime(format!(
                "partition {partition} is still replaying an earlier rewind (up to offset {}); let the speed layer pass it first",
                r.until
            )));
        }
        if offset >= parts.next_offset {
            return Ok(None);
        }
        let mut discarded = 0;
        for (g, &cutoff) in parts.groups.iter_mut().zip(cutoffs) {
            let tail = g.split_off(&cutoff);
            discarded += tail.values().map(|b| b.groups.len()).sum::<usize>();
        }
        let held = parts.next_offset;
        let replay = Replay {
            until: held,
            cutoffs: cutoffs.to_vec(),
        };
        let body = encode_state(
            lease.generation,
            partition,
            self.clock.now_us(),
            &self.view_keys,
            StateRef {
                next_offset: offset,
                last_broker_ms: parts.last_broker_ms,
                missed: parts.missed,
                replay: Some(&replay),
                dedup: parts.dedup.as_ref(),
                interner: &parts.interner,
                groups: &parts.groups,
            },
        );
        store.write(partition, &mut lease, body).await?;
        Ok(Some((held, discarded)))
    }

    /// Gives `partition` up: checkpoints it and drops it from the answers. A `lost` partition
    /// (the session expired: a newer owner may hold it already) is checkpointed too: if no one
    /// claimed it yet, its next owner starts from fresher state; if someone did, the fence
    /// refuses the write and counts it.
    pub async fn revoke(&self, partition: i32, lost: bool) {
        // A lost partition is written even unchanged: the write is how this instance learns
        // whether it was fenced.
        match self.checkpoint_partition(partition, lost).await {
            Ok(_) | Err(SpeedError::Fenced { .. }) => {}
            Err(e) => {
                tracing::warn!(partition, lost, error = %e, "revoked partition not checkpointed; its next owner replays from the previous checkpoint")
            }
        }
        self.drop_partition(partition);
    }

    fn drop_partition(&self, partition: i32) {
        self.leases
            .lock()
            .expect("lease lock poisoned")
            .remove(&partition);
        let removed = self
            .partitions
            .write()
            .expect("speed state lock poisoned")
            .remove(&partition);
        if let Some(state) = removed {
            let keys = Self::keys_of(&read(&state));
            self.keys.fetch_sub(keys, Ordering::Relaxed);
            self.bump_all();
        }
    }

    /// Checkpoints every owned partition that changed since its last checkpoint. Returns the
    /// offsets now durable, to report to the group. A partition a newer owner claimed is
    /// dropped; a storage error leaves the partition for the next call.
    pub async fn checkpoint(&self) -> Vec<(i32, i64)> {
        if self.checkpoints.is_none() {
            return Vec::new();
        }
        let owned: Vec<i32> = self.partition_states().iter().map(|(p, _)| *p).collect();
        let mut done = Vec::new();
        for p in owned {
            match self.checkpoint_partition(p, false).await {
                Ok(Some(offset)) => done.push((p, offset)),
                Ok(None) => {}
                Err(SpeedError::Fenced { .. }) => {}
                Err(e) => {
                    self.stats
                        .checkpoint_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(partition = p, error = %e, "checkpoint failed; retrying at the next interval");
                }
            }
        }
        done
    }

    /// Writes `partition`'s checkpoint if it changed (or if `force`); returns its offset when
    /// one was written.
    async fn checkpoint_partition(&self, partition: i32, force: bool) -> Result<Option<i64>> {
        let Some(store) = &self.checkpoints else {
            return Ok(None);
        };
        // Only a partition this instance holds a lease on (not a provisional one).
        let lease = self
            .leases
            .lock()
            .expect("lease lock poisoned")
            .get(&partition)
            .copied();
        let state = self
            .partitions
            .read()
            .expect("speed state lock poisoned")
            .get(&partition)
            .cloned();
        let (Some(state), Some(mut lease)) = (state, lease) else {
            return Ok(None);
        };
        let started = std::time::Instant::now();
        let now_us = self.clock.now_us();
        let (body, changes, offset) = {
            let s = read(&state);
            if s.changes == s.checkpointed && !force {
                return Ok(None);
            }
            let body = encode_state(
                lease.generation,
                partition,
                now_us,
                &self.view_keys,
                StateRef {
                    next_offset: s.next_offset,
                    last_broker_ms: s.last_broker_ms,
                    missed: s.missed,
                    replay: s.replay.as_ref(),
                    dedup: s.dedup.as_ref(),
                    interner: &s.interner,
                    groups: &s.groups,
                },
            );
            (body, s.changes, s.next_offset)
        };
        match store.write(partition, &mut lease, body).await {
            Ok(w) => {
                write(&state).checkpointed = changes;
                if let Some(l) = self
                    .leases
                    .lock()
                    .expect("lease lock poisoned")
                    .get_mut(&partition)
                {
                    *l = lease;
                }
                let st = &self.stats;
                st.checkpoints.fetch_add(1, Ordering::Relaxed);
                st.checkpoint_bytes.store(w.bytes as u64, Ordering::Relaxed);
                st.checkpoint_micros
                    .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                st.checkpoint_at_us
                    .store(now_us.max(0) as u64, Ordering::Relaxed);
                tracing::debug!(
                    partition,
                    seq = w.seq,
                    bytes = w.bytes,
                    offset,
                    "checkpoint written"
                );
                Ok(Some(offset))
            }
            Err(e @ SpeedError::Fenced { .. }) => {
                self.stats.fenced.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition, error = %e, "fenced: a newer owner holds the partition; dropping its state");
                self.drop_partition(partition);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// The partitions' states, each still to be locked.
    fn partition_states(&self) -> Vec<(i32, Arc<StateLock>)> {
        let parts = self.partitions.read().expect("speed state lock poisoned");
        parts.iter().map(|(p, s)| (*p, Arc::clone(s))).collect()
    }

    /// `partition`'s state, created empty if new.
    pub(crate) fn partition_state(&self, partition: i32) -> Arc<StateLock> {
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
            Arc::new(StateLock::new(PartitionState::empty(
                self.aggregators.len(),
            )))
        }))
    }

    /// Applies one partition's messages (in offset order), skipping offsets already applied.
    pub fn apply(&self, partition: i32, messages: &[Message<'_>]) -> Result<()> {
        let state = if self.checkpoints.is_some() {
            let owned = self
                .partitions
                .read()
                .expect("speed state lock poisoned")
                .get(&partition)
                .cloned();
            match owned {
                Some(s) if !read(&s).provisional => s,
                _ => {
                    self.stats
                        .unowned
                        .fetch_add(messages.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
            }
        } else {
            self.partition_state(partition)
        };
        // Decoded before the write lock is taken: decoding is most of a batch's cost, and
        // answers wait for the write lock. Only this partition's consumer applies to it, so the
        // state read here is almost always the one written below; if a restore or a replay
        // changed it in between, the batch is decoded again under the lock.
        let seen = {
            let s = read(&state);
            (s.next_offset, s.replay.as_ref().map(|r| r.until))
        };
        let early = self.decode_parts(&messages[first_fresh(messages, seen.0)..], seen.1)?;
        let mut state = write(&state);
        let state = &mut *state;
        let fresh = first_fresh(messages, state.next_offset);
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
        let until = state.replay.as_ref().map(|r| r.until);
        let parts = if (state.next_offset, until) == seen {
            early
        } else {
            self.decode_parts(messages, until)?
        };
        let decoded = self.apply_to(state, messages, parts)?;
        state.next_offset = last.offset + 1;
        state.changes += 1;
        state.last_broker_ms = last.timestamp_ms.or(state.last_broker_ms);
        self.stats.events.fetch_add(decoded.0, Ordering::Relaxed);
        self.stats.rejected.fetch_add(decoded.1, Ordering::Relaxed);
        Ok(())
    }

    /// `messages` decoded in up to two parts: those before a replay window's end `until` (the
    /// `true` part) and the rest.
    fn decode_parts(
        &self,
        messages: &[Message<'_>],
        until: Option<i64>,
    ) -> Result<Vec<(Decoded, bool)>> {
        let split = until.map_or(0, |u| messages.partition_point(|m| m.offset < u));
        let (replayed, rest) = messages.split_at(split);
        let now_us = self.clock.now_us();
        let mut parts = Vec::with_capacity(2);
        for (part, window) in [(replayed, true), (rest, false)] {
            if !part.is_empty() {
                parts.push((self.decoder.decode(part, now_us)?, window));
            }
        }
        Ok(parts)
    }

    /// Folds `messages`, decoded as `parts` (see `decode_parts`), into `state`'s views. In a
    /// replay window, only the events of the discarded buckets count. Returns (events,
    /// rejected).
    fn apply_to(
        &self,
        state: &mut PartitionState,
        messages: &[Message<'_>],
        parts: Vec<(Decoded, bool)>,
    ) -> Result<(u64, u64)> {
        let (mut events, mut rejected) = (0, 0);
        for (decoded, window) in parts {
            // Duplicates by event id, outside a replay window (whose events were applied
            // before, and are read again on purpose).
            if self.dedup_window_us > 0 && state.dedup.is_none() {
                state.dedup = Some(Dedup::new(self.dedup_window_us));
            }
            let (skip, duplicates) = match (&mut state.dedup, window) {
                (Some(d), false) => {
                    let batch = &decoded.batch;
                    match (
                        batch.column(self.event_id).as_string_opt::<i32>(),
                        batch
                            .column(self.event_time)
                            .as_primitive_opt::<datafusion::arrow::datatypes::TimestampMicrosecondType>(),
                    ) {
                        (Some(ids), Some(times)) => d.check(ids, times),
                        _ => (None, 0),
                    }
                }
                _ => (None, 0),
            };
            self.stats
                .duplicates
                .fetch_add(duplicates, Ordering::Relaxed);
            let stamp = self.stamps.fetch_add(1, Ordering::Relaxed) + 1;
            let mut ids = BatchIds::default();
            for (i, (agg, groups)) in self
                .aggregators
                .iter()
                .zip(state.groups.iter_mut())
                .enumerate()
            {
                let from = match (&state.replay, window) {
                    (Some(r), true) => Some(r.cutoffs[i]),
                    _ => None,
                };
                let covered = self.covered[i]
                    .read()
                    .expect("coverage lock poisoned")
                    .clone();
                let admit = Admit {
                    from,
                    covered: covered.as_deref(),
                    new_keys: self
                        .max_keys
                        .saturating_sub(self.keys.load(Ordering::Relaxed)),
                    skip: skip.as_ref(),
                };
                let applied = agg.apply(
                    &decoded.batch,
                    groups,
                    &mut state.interner,
                    &mut ids,
                    stamp,
                    &admit,
                )?;
                if applied.changed {
                    // After the change, before the partition's lock is released.
                    self.generations[i].fetch_add(1, Ordering::Release);
                }
                self.keys.fetch_add(applied.new_keys, Ordering::Relaxed);
                self.stats.late.fetch_add(applied.late, Ordering::Relaxed);
                if applied.over_cap > 0 {
                    self.stats
                        .over_cap
                        .fetch_add(applied.over_cap, Ordering::Relaxed);
                    // The state lacks these events until a batch covers their days.
                    state.missed += applied.over_cap;
                    if !self.cap_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            max_keys = self.max_keys,
                            "the speed state reached its key cap: events that need a new group are not applied (counted in tandem_speed_over_cap_total; the archiver keeps them and the next batch run serves them)"
                        );
                    }
                }
            }
            events += decoded.batch.num_rows() as u64 - duplicates;
            rejected += decoded.rejected.len() as u64;
        }
        if state
            .replay
            .as_ref()
            .is_some_and(|r| messages.last().is_some_and(|m| m.offset + 1 >= r.until))
        {
            tracing::info!("replay window passed; counting every event again");
            state.replay = None;
        }
        Ok((events, rejected))
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
        // From now on, events of these days are late.
        *self.covered[i].write().expect("coverage lock poisoned") = Some(Arc::new(covered.clone()));
        let removed: usize = self
            .partition_states()
            .iter()
            .map(|(_, state)| {
                let mut s = write(state);
                let removed = self.aggregators[i].prune(&mut s.groups[i], covered);
                if removed > 0 {
                    s.changes += 1;
                }
                removed
            })
            .sum();
        if removed > 0 {
            self.generations[i].fetch_add(1, Ordering::Release);
            self.keys.fetch_sub(removed, Ordering::Relaxed);
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
        state: &StateLock,
        q: &ViewQuery,
        buckets: &[i64],
        out: &mut RowSet,
    ) {
        for &bucket in buckets {
            let s = look(state);
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
            .map(|(p, s)| (*p, look(s).next_offset))
            .collect()
    }

    /// Groups held and an estimate of their bytes (keys, states, sketches and the hash
    /// tables' slots), over all views and partitions.
    pub fn state_size(&self) -> (usize, usize) {
        let (mut keys, mut bytes) = (0, 0);
        for (_, state) in self.partition_states() {
            let s = look(&state);
            for (key, states) in s
                .groups
                .iter()
                .flat_map(|g| g.values())
                .flat_map(|b| &b.groups)
            {
                keys += 1;
                bytes +=
                    48 + key.len() * 4 + states.capacity() * std::mem::size_of::<MetricState>();
                for m in states {
                    if let MetricState::Distinct(d) = m {
                        bytes += d.estimated_size();
                    }
                }
            }
            bytes += s
                .interner
                .values()
                .iter()
                .map(|v| 2 * v.len() + 40)
                .sum::<usize>();
        }
        (keys, bytes)
    }
}

/// `h` and `x` mixed (FxHash's step): equal inputs give equal stamps, different ones almost
/// surely different stamps.
fn mix(h: u64, x: u64) -> u64 {
    (h.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95)
}

/// The index of the first of `messages` at or after `next_offset`.
fn first_fresh(messages: &[Message<'_>], next_offset: i64) -> usize {
    messages
        .iter()
        .position(|m| m.offset >= next_offset)
        .unwrap_or(messages.len())
}

/// A partition's state behind its lock: `parking_lot`'s, whose readers can pass a waiting
/// writer (see [`look`]).
pub(crate) type StateLock = parking_lot::RwLock<PartitionState>;

/// `state` read by ingestion and checkpoints: a fair read, which waits behind a writer that is
/// waiting for the lock.
fn read(state: &StateLock) -> RwLockReadGuard<'_, PartitionState> {
    state.read()
}

/// `state` read for an answer, a probe or a metric: never queued behind a waiting writer.
/// A checkpoint reads the whole state under one read lock (milliseconds of work, and many
/// times that when ingestion's lower priority loses the core to serving); ingestion's next
/// apply waits for it, and a fair read would wait behind that apply, holding an answer for
/// the checkpoint's whole encoding. Reads of answers are per bucket and short, so they leave
/// the writer gaps to take the lock in.
fn look(state: &StateLock) -> RwLockReadGuard<'_, PartitionState> {
    state.read_recursive()
}

fn write(state: &StateLock) -> RwLockWriteGuard<'_, PartitionState> {
    state.write()
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
            let buckets = agg.buckets(&look(&state).groups[i], q, covered);
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
            let s = look(&state);
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
            let s = look(&state);
            if let Some(t) = s.last_broker_ms {
                partition_lag_ms.insert(p, (now_ms - t).max(0));
            }
            if s.missed > 0 || s.provisional {
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
        Ok(self.0.checkpoint().await)
    }

    fn rebalance(&self) -> Option<Arc<dyn Rebalance>> {
        self.0.checkpoints.as_ref()?;
        Some(Arc::new(SpeedRebalance(Arc::clone(&self.0))))
    }
}

/// Moves a [`SpeedLayer`]'s partitions with the group's assignments.
#[derive(Debug)]
struct SpeedRebalance(Arc<SpeedLayer>);

impl Rebalance for SpeedRebalance {
    fn assigned(&self, partition: i32) -> BoxFuture<'_, Result<Offset>> {
        Box::pin(self.0.assign(partition))
    }

    fn revoked(&self, partition: i32, lost: bool) -> BoxFuture<'_, ()> {
        Box::pin(self.0.revoke(partition, lost))
    }

    fn assignment(&self, partitions: &[i32]) {
        self.0.assignment(partitions)
    }

    fn watermarks(&self, high: &[(i32, i64)], broker_up: bool) {
        self.0.watermarks(high, broker_up)
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

    /// Every layer, by schema.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<SpeedLayer>)> {
        self.0.iter()
    }

    /// The layers' counters and gauges in Prometheus' text format, labelled by schema.
    pub fn write_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        type Get = fn(&SpeedLayer) -> f64;
        fn load(a: &AtomicU64) -> f64 {
            a.load(Ordering::Relaxed) as f64
        }
        let families: [(&str, &str, &str, Get); 17] = [
            ("tandem_speed_duplicates_total", "counter", "Events dropped as repeats of an event id seen within the duplicate window.", |l| load(&l.stats.duplicates)),
            ("tandem_speed_late_total", "counter", "View rows of days a settled publish covers: not applied (the next batch run recomputes those days).", |l| load(&l.stats.late)),
            ("tandem_speed_over_cap_total", "counter", "View rows that needed a new group past the state-key cap: not applied (the batch serves them).", |l| load(&l.stats.over_cap)),
            ("tandem_speed_state_keys_max", "gauge", "The cap on groups held (speed.max_state_keys).", |l| l.max_keys as f64),
            ("tandem_speed_events_total", "counter", "Events applied to the speed state.", |l| load(&l.stats.events)),
            ("tandem_speed_rejected_total", "counter", "Messages the decoder rejected (the archiver dead-letters them).", |l| load(&l.stats.rejected)),
            ("tandem_speed_redelivered_total", "counter", "Messages skipped because their offset was already applied (replayed after a restore or a retry).", |l| load(&l.stats.skipped_redelivered)),
            ("tandem_speed_missed_offsets_total", "counter", "Offsets never delivered (removed by retention before they were read).", |l| load(&l.stats.missed_offsets)),
            ("tandem_speed_pruned_groups_total", "counter", "Groups dropped because a published batch covers their buckets.", |l| load(&l.stats.pruned_groups)),
            ("tandem_speed_unowned_messages_total", "counter", "Messages of partitions this instance no longer owns, not applied.", |l| load(&l.stats.unowned)),
            ("tandem_speed_checkpoints_total", "counter", "Checkpoints written.", |l| load(&l.stats.checkpoints)),
            ("tandem_speed_checkpoint_failures_total", "counter", "Checkpoints that could not be written (retried).", |l| load(&l.stats.checkpoint_failures)),
            ("tandem_speed_fenced_total", "counter", "Checkpoints refused because a newer owner holds the partition.", |l| load(&l.stats.fenced)),
            ("tandem_speed_restored_partitions_total", "counter", "Partitions restored from a checkpoint.", |l| load(&l.stats.restored)),
            ("tandem_speed_checkpoints_skipped_total", "counter", "Checkpoints passed over at restore (corrupt, or for other view definitions).", |l| load(&l.stats.skipped_checkpoints)),
            ("tandem_speed_checkpoint_bytes", "gauge", "Size of the last checkpoint written.", |l| load(&l.stats.checkpoint_bytes)),
            ("tandem_speed_checkpoint_duration_seconds", "gauge", "Time the last checkpoint took to encode and write.", |l| load(&l.stats.checkpoint_micros) / 1e6),
        ];
        for (name, kind, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (schema, layer) in &self.0 {
                let _ = writeln!(out, "{name}{{schema=\"{schema}\"}} {}", get(layer));
            }
        }
        let _ = writeln!(out, "# HELP tandem_speed_checkpoint_age_seconds Time since the last checkpoint was written.\n# TYPE tandem_speed_checkpoint_age_seconds gauge");
        for (schema, layer) in &self.0 {
            let at = layer.stats.checkpoint_at_us.load(Ordering::Relaxed) as i64;
            if at > 0 {
                let age = (layer.clock.now_us() - at).max(0) as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "tandem_speed_checkpoint_age_seconds{{schema=\"{schema}\"}} {age}"
                );
            }
        }
        let sizes: Vec<(&String, (usize, usize))> =
            self.0.iter().map(|(s, l)| (s, l.state_size())).collect();
        let _ = writeln!(out, "# HELP tandem_speed_state_keys Groups held in the speed state.\n# TYPE tandem_speed_state_keys gauge");
        for (schema, (keys, _)) in &sizes {
            let _ = writeln!(out, "tandem_speed_state_keys{{schema=\"{schema}\"}} {keys}");
        }
        let _ = writeln!(out, "# HELP tandem_speed_state_bytes Estimated bytes of the speed state (keys, metric states, sketches).\n# TYPE tandem_speed_state_bytes gauge");
        for (schema, (_, bytes)) in &sizes {
            let _ = writeln!(
                out,
                "tandem_speed_state_bytes{{schema=\"{schema}\"}} {bytes}"
            );
        }
        type PerPartition = fn(&SpeedLayer) -> BTreeMap<i32, i64>;
        let per_partition: [(&str, &str, PerPartition); 3] = [
            ("tandem_speed_restored_offset", "The offset each partition was last restored at from its checkpoint.", |l| {
                l.restored_offsets.lock().expect("restored offsets lock poisoned").clone()
            }),
            ("tandem_speed_consumer_lag", "Messages each owned partition has still to apply (the broker's high watermark minus the next offset).", SpeedLayer::consumer_lag),
            ("tandem_speed_next_offset", "The next offset each owned partition applies.", SpeedLayer::offsets),
        ];
        for (name, help, get) in per_partition {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (schema, layer) in &self.0 {
                for (p, v) in get(layer) {
                    let _ = writeln!(out, "{name}{{schema=\"{schema}\",partition=\"{p}\"}} {v}");
                }
            }
        }
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
