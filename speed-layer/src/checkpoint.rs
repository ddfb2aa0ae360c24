//! Checkpoints: one Kafka partition's speed state (every view's buckets and metric states,
//! sketches included) together with the partition's next offset, in one object.
//!
//! A partition's checkpoints form a numbered log under
//! `speed/<schema>/checkpoints/<partition>/<seq>.ckpt`, each object written once with
//! `PutMode::Create`, as Delta writes its log. That one primitive (which `file://`, `memory://`
//! and S3 all provide) fences zombies:
//!
//! - An owner that is assigned a partition lists its log, restores the newest checkpoint whose
//!   checksum holds (a torn or corrupt one is skipped for the one before), and *claims* the
//!   partition by writing a small claim object at the next number, with a generation one above
//!   the highest it saw. If someone else wrote that number first, it starts over.
//! - From then on it writes each checkpoint at the number after its last one. A zombie (an old
//!   owner that slept through a rebalance) tries a number the new owner's claim or checkpoints
//!   already hold: its put fails, it learns it is fenced, and it drops the partition. Nothing
//!   it writes can ever replace a newer owner's checkpoint.
//!
//! Old checkpoints are deleted once `keep` newer ones exist. Every object ends with a CRC-32 of
//! all the bytes before it.

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tandem_core::codec::{Malformed, Put, Reader};
use tandem_core::metric::MetricState;

use crate::aggregate::{Bucket, Groups, Interner};
use crate::dedup::Dedup;
use crate::error::{Result, SpeedError};

const MAGIC: &[u8; 8] = b"TNDMCKPT";
const FORMAT: u32 = 2;
const KIND_STATE: u8 = 0;
const KIND_CLAIM: u8 = 1;

/// What a view's state must match to be restored: its name, its definition hash and shape. A
/// checkpoint written for another definition of a view is not restored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewKey {
    pub name: String,
    pub definition_hash: String,
    pub dimensions: usize,
    /// The kind of each metric's state (from the view's empty states).
    pub metrics: Vec<std::mem::Discriminant<MetricState>>,
}

/// One partition's state as a checkpoint holds it.
#[derive(Debug, Default)]
pub struct Parts {
    pub next_offset: i64,
    pub last_broker_ms: Option<i64>,
    pub missed: u64,
    pub replay: Option<Replay>,
    pub dedup: Option<Dedup>,
    pub interner: Interner,
    /// One per view, in the order of the layer's views.
    pub groups: Vec<Groups>,
}

/// The state to write, borrowed from the partition under its lock.
#[derive(Debug, Clone, Copy)]
pub struct StateRef<'a> {
    pub next_offset: i64,
    pub last_broker_ms: Option<i64>,
    pub missed: u64,
    pub replay: Option<&'a Replay>,
    pub dedup: Option<&'a Dedup>,
    pub interner: &'a Interner,
    pub groups: &'a [Groups],
}

/// A rewound partition (`tandem replay`): its buckets from `cutoffs` on were discarded, and
/// its offsets before `until` are read again, counting only the events of those buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// The offset the state held before the rewind.
    pub until: i64,
    /// Per view: the first bucket discarded (and so counted again).
    pub cutoffs: Vec<i64>,
}

/// An owner's hold on a partition's checkpoint log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Claims so far, this one included.
    pub generation: u64,
    /// The number of the last object this owner wrote (its claim or its newest checkpoint).
    pub seq: u64,
    /// Objects numbered below this are deleted (or were never there).
    deleted_below: u64,
}

/// What an assignment found and claimed.
#[derive(Debug)]
pub struct Restored {
    pub lease: Lease,
    /// The newest good checkpoint's state and number, if there is one for these views.
    pub state: Option<(u64, Parts)>,
    /// Microseconds since the restored checkpoint was written.
    pub age_us: Option<i64>,
    /// Objects passed over, with why: corrupt, torn, or written for other view definitions.
    pub skipped: Vec<(u64, String)>,
}

/// What reading a partition's log found.
#[derive(Debug, Default)]
pub struct Found {
    /// The highest generation among the objects read.
    pub generation: u64,
    /// The newest good checkpoint's number and state.
    pub state: Option<(u64, Parts)>,
    pub age_us: Option<i64>,
    pub skipped: Vec<(u64, String)>,
}

/// A checkpoint written.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub seq: u64,
    pub bytes: usize,
}

/// The checkpoint logs of one schema's partitions.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    store: Arc<dyn ObjectStore>,
    schema: String,
    keep: u64,
}

impl CheckpointStore {
    /// Checkpoints of `schema` in `store` (paths relative to the deployment root), keeping the
    /// newest `keep` (at least one).
    pub fn new(store: Arc<dyn ObjectStore>, schema: &str, keep: usize) -> Self {
        CheckpointStore {
            store,
            schema: schema.to_string(),
            keep: keep.max(1) as u64,
        }
    }

    fn dir(&self, partition: i32) -> Path {
        Path::from(format!("speed/{}/checkpoints/{partition}", self.schema))
    }

    fn object(&self, partition: i32, seq: u64) -> Path {
        self.dir(partition).join(format!("{seq:020}.ckpt"))
    }

    fn error(&self, path: &Path, source: object_store::Error) -> SpeedError {
        SpeedError::Checkpoint {
            path: path.to_string(),
            source: Box::new(source),
        }
    }

    /// The numbers of `partition`'s objects, newest first.
    async fn list(&self, partition: i32) -> Result<Vec<u64>> {
        let dir = self.dir(partition);
        let metas: Vec<_> = self
            .store
            .list(Some(&dir))
            .try_collect()
            .await
            .map_err(|e| self.error(&dir, e))?;
        let mut seqs: Vec<u64> = metas
            .iter()
            .filter_map(|m| m.location.filename()?.strip_suffix(".ckpt")?.parse().ok())
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(seqs)
    }

    /// The partitions that have checkpoints.
    pub async fn partitions(&self) -> Result<Vec<i32>> {
        let dir = Path::from(format!("speed/{}/checkpoints", self.schema));
        let listed = self
            .store
            .list_with_delimiter(Some(&dir))
            .await
            .map_err(|e| self.error(&dir, e))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect())
    }

    /// Reads `partition`'s log from the newest object down to the first good checkpoint
    /// (without claiming anything). Returns the numbers listed, newest first, and what was
    /// found.
    pub async fn newest(
        &self,
        partition: i32,
        views: &[ViewKey],
        now_us: i64,
    ) -> Result<(Vec<u64>, Found)> {
        let seqs = self.list(partition).await?;
        let mut generation = 0;
        let mut state = None;
        let mut age_us = None;
        let mut skipped = Vec::new();
        for &seq in &seqs {
            let path = self.object(partition, seq);
            let bytes = match self.store.get(&path).await {
                Ok(r) => r.bytes().await.map_err(|e| self.error(&path, e))?,
                // Deleted by retention since the listing.
                Err(object_store::Error::NotFound { .. }) => continue,
                Err(e) => return Err(self.error(&path, e)),
            };
            match decode(&bytes, partition, views) {
                Ok(d) => {
                    generation = generation.max(d.generation);
                    if let Some(parts) = d.parts {
                        age_us = Some(now_us.saturating_sub(d.written_us));
                        state = Some((seq, parts));
                        break;
                    }
                }
                Err(why) => {
                    tracing::warn!(
                        partition,
                        checkpoint = %path,
                        reason = %why,
                        "checkpoint skipped; trying the one before"
                    );
                    skipped.push((seq, why.0));
                }
            }
        }
        Ok((
            seqs,
            Found {
                generation,
                state,
                age_us,
                skipped,
            },
        ))
    }

    /// Restores `partition` for a new owner and claims it: the newest checkpoint that reads
    /// back whole and matches `views`, and a lease that fences every earlier owner.
    pub async fn claim(&self, partition: i32, views: &[ViewKey], now_us: i64) -> Result<Restored> {
        loop {
            let (seqs, found) = self.newest(partition, views, now_us).await?;
            let Found {
                generation,
                state,
                age_us,
                skipped,
            } = found;
            let newest = seqs.first().copied().unwrap_or(0);
            let lease = Lease {
                generation: generation + 1,
                seq: newest + 1,
                deleted_below: seqs.last().copied().unwrap_or(1),
            };
            let claim = encode_claim(lease.generation, partition, now_us);
            match self.put_new(partition, lease.seq, claim).await {
                Ok(()) => {
                    return Ok(Restored {
                        lease,
                        state,
                        age_us,
                        skipped,
                    })
                }
                Err(PutNew::Taken) => {
                    tracing::info!(
                        partition,
                        seq = lease.seq,
                        "another owner wrote first; reading the log again"
                    );
                }
                Err(PutNew::Failed(e)) => return Err(e),
            }
        }
    }

    /// Writes `body` (from [`encode_state`] with `lease.generation`) as `partition`'s next
    /// checkpoint. `Err(SpeedError::Fenced)` means a newer owner holds the partition.
    pub async fn write(&self, partition: i32, lease: &mut Lease, body: Vec<u8>) -> Result<Written> {
        let seq = lease.seq + 1;
        let bytes = body.len();
        match self.put_new(partition, seq, body).await {
            Ok(()) => {}
            Err(PutNew::Taken) => {
                return Err(SpeedError::Fenced {
                    partition,
                    generation: lease.generation,
                    seq,
                })
            }
            Err(PutNew::Failed(e)) => return Err(e),
        }
        lease.seq = seq;
        // Keep the newest `keep` objects, this checkpoint among them.
        let below = seq.saturating_sub(self.keep - 1);
        while lease.deleted_below < below {
            let path = self.object(partition, lease.deleted_below);
            match self.store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => lease.deleted_below += 1,
                Err(e) => {
                    tracing::warn!(checkpoint = %path, error = %e, "old checkpoint not deleted; will retry");
                    break;
                }
            }
        }
        Ok(Written { seq, bytes })
    }

    async fn put_new(&self, partition: i32, seq: u64, body: Vec<u8>) -> Result<(), PutNew> {
        let path = self.object(partition, seq);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(body), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(PutNew::Taken),
            Err(e) => Err(PutNew::Failed(self.error(&path, e))),
        }
    }
}

enum PutNew {
    Taken,
    Failed(SpeedError),
}

fn header(out: &mut Vec<u8>, kind: u8, generation: u64, partition: i32, now_us: i64) {
    out.extend_from_slice(MAGIC);
    out.put_u32(FORMAT);
    out.put_u8(kind);
    out.put_u64(generation);
    out.put_i64(partition as i64);
    out.put_i64(now_us);
}

fn seal(mut out: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&out);
    out.put_u32(crc);
    out
}

fn encode_claim(generation: u64, partition: i32, now_us: i64) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    header(&mut out, KIND_CLAIM, generation, partition, now_us);
    seal(out)
}

/// A checkpoint of `state` for the owner of `generation`.
pub fn encode_state(
    generation: u64,
    partition: i32,
    now_us: i64,
    views: &[ViewKey],
    state: StateRef<'_>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096);
    header(&mut out, KIND_STATE, generation, partition, now_us);
    out.put_i64(state.next_offset);
    match state.last_broker_ms {
        Some(t) => (out.put_u8(1), out.put_i64(t)).0,
        None => out.put_u8(0),
    }
    out.put_u64(state.missed);
    match state.replay {
        Some(r) => {
            out.put_u8(1);
            out.put_i64(r.until);
            out.put_u32(r.cutoffs.len() as u32);
            for &c in &r.cutoffs {
                out.put_i64(c);
            }
        }
        None => out.put_u8(0),
    }
    match state.dedup {
        Some(d) => {
            out.put_u8(1);
            d.encode(&mut out);
        }
        None => out.put_u8(0),
    }
    let values = state.interner.values();
    out.put_u32(values.len() as u32);
    for v in values {
        out.put_bytes(v.as_bytes());
    }
    out.put_u32(views.len() as u32);
    for (key, groups) in views.iter().zip(state.groups) {
        out.put_bytes(key.name.as_bytes());
        out.put_bytes(key.definition_hash.as_bytes());
        out.put_u32(key.dimensions as u32);
        out.put_u32(key.metrics.len() as u32);
        out.put_u32(groups.len() as u32);
        for (&bucket, b) in groups {
            out.put_i64(bucket);
            out.put_u32(b.groups.len() as u32);
            for (dims, states) in &b.groups {
                for &id in dims.iter() {
                    out.put_u32(id);
                }
                for s in states {
                    s.encode(&mut out);
                }
            }
        }
    }
    seal(out)
}

struct Decoded {
    generation: u64,
    written_us: i64,
    parts: Option<Parts>,
}

/// Reads a checkpoint back, checking its checksum, its partition and its views.
fn decode(bytes: &[u8], partition: i32, views: &[ViewKey]) -> Result<Decoded, Malformed> {
    let Some(body_len) = bytes.len().checked_sub(4) else {
        return Err(Malformed("shorter than its checksum".into()));
    };
    let (body, crc) = bytes.split_at(body_len);
    let crc = u32::from_le_bytes(crc.try_into().expect("four bytes"));
    if crc32fast::hash(body) != crc {
        return Err(Malformed("checksum mismatch (torn or corrupt)".into()));
    }
    let mut r = Reader::new(body);
    let magic: Vec<u8> = (0..MAGIC.len()).map(|_| r.u8()).collect::<Result<_, _>>()?;
    if magic != MAGIC {
        return Err(Malformed("not a checkpoint".into()));
    }
    let format = r.u32()?;
    if format != FORMAT {
        return Err(Malformed(format!(
            "format {format}, this build reads {FORMAT}"
        )));
    }
    let kind = r.u8()?;
    let generation = r.u64()?;
    let p = r.i64()?;
    if p != partition as i64 {
        return Err(Malformed(format!("written for partition {p}")));
    }
    let written_us = r.i64()?;
    if kind == KIND_CLAIM {
        return Ok(Decoded {
            generation,
            written_us,
            parts: None,
        });
    }
    if kind != KIND_STATE {
        return Err(Malformed(format!("kind {kind}")));
    }
    let next_offset = r.i64()?;
    let last_broker_ms = match r.u8()? {
        0 => None,
        _ => Some(r.i64()?),
    };
    let missed = r.u64()?;
    let replay = match r.u8()? {
        0 => None,
        _ => {
            let until = r.i64()?;
            let n = r.count(8)?;
            let cutoffs = (0..n).map(|_| r.i64()).collect::<Result<Vec<_>, _>>()?;
            if cutoffs.len() != views.len() {
                return Err(Malformed("a replay window for other views".into()));
            }
            Some(Replay { until, cutoffs })
        }
    };
    let dedup = match r.u8()? {
        0 => None,
        _ => Some(Dedup::decode(&mut r)?),
    };
    let n_values = r.count(4)?;
    let values = (0..n_values)
        .map(|_| r.str().map(Box::from))
        .collect::<Result<Vec<Box<str>>, _>>()?;
    let n_views = r.count(4)?;
    if n_views != views.len() {
        return Err(Malformed(format!(
            "holds {n_views} views, the schema has {}",
            views.len()
        )));
    }
    let mut groups = Vec::with_capacity(views.len());
    for key in views {
        let (name, hash) = (r.str()?, r.str()?);
        let (dims, metrics) = (r.u32()? as usize, r.u32()? as usize);
        if name != key.name || hash != key.definition_hash {
            return Err(Malformed(format!(
                "written for view `{name}` ({hash}), not `{}` ({})",
                key.name, key.definition_hash
            )));
        }
        if dims != key.dimensions || metrics != key.metrics.len() {
            return Err(Malformed(format!("view `{name}` has another shape")));
        }
        let mut view_groups = Groups::new();
        for _ in 0..r.count(12)? {
            let bucket = r.i64()?;
            let n = r.count(dims * 4 + metrics)?;
            let mut b = Bucket::default();
            b.groups.reserve(n);
            for _ in 0..n {
                let ids = (0..dims)
                    .map(|_| {
                        let id = r.u32()?;
                        if id as usize > values.len() {
                            return Err(Malformed(format!("value id {id} out of range")));
                        }
                        Ok(id)
                    })
                    .collect::<Result<Box<[u32]>, _>>()?;
                let states = key
                    .metrics
                    .iter()
                    .map(|kind| {
                        let s = MetricState::decode(&mut r)?;
                        if std::mem::discriminant(&s) != *kind {
                            return Err(Malformed(format!(
                                "view `{name}`: a state of another metric"
                            )));
                        }
                        Ok(s)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                b.groups.insert(ids, states);
            }
            view_groups.insert(bucket, b);
        }
        groups.push(view_groups);
    }
    if r.remaining() != 0 {
        return Err(Malformed(format!(
            "{} bytes after the state",
            r.remaining()
        )));
    }
    Ok(Decoded {
        generation,
        written_us,
        parts: Some(Parts {
            next_offset,
            last_broker_ms,
            missed,
            replay,
            dedup,
            interner: Interner::from_values(values),
            groups,
        }),
    })
}
