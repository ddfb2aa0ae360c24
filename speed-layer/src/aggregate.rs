//! A view compiled for the speed layer: applies decoded batches to per-partition state.
//!
//! Groups are held by bucket start, then keyed by a flat `[u32]` of one interned id per dimension
//! (0 = null), so looking a group up allocates nothing, a query walks only the buckets of its
//! range, and pruning drops whole buckets.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher as _;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, BooleanArray};
use datafusion::arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use tandem_core::filter::CompiledFilter;
use tandem_core::metric::MetricState;
use tandem_core::query::{Coverage, RowSet, ViewQuery};
use tandem_core::schema::{EventSchema, FieldType};
use tandem_core::view::ViewDef;

use crate::error::Result;

/// The hasher of the speed state's maps: foldhash, seeded per map (a few times SipHash's
/// speed on these short keys; the seed keeps keys an attacker picks from colliding at will).
type Fast = foldhash::fast::RandomState;

/// Interned dimension values of one partition; id 0 is null.
///
/// Finding a value (once for each dimension of each row) compares it with the candidate in
/// a few word loads (`same`) rather than a call to `memcmp`: dimension values are short.
#[derive(Debug, Default)]
pub struct Interner {
    hasher: Fast,
    /// Each value's id, found by the value's hash; the value itself is in `values`.
    ids: hashbrown::HashTable<u32>,
    values: Vec<Box<str>>,
}

/// Whether `a` and `b` hold the same bytes; up to 16 bytes in two overlapping word
/// comparisons.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    if n > 16 {
        return a == b;
    }
    if n >= 8 {
        let word =
            |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
        return word(a, 0) == word(b, 0) && word(a, n - 8) == word(b, n - 8);
    }
    if n >= 4 {
        let word =
            |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap_or_default());
        return word(a, 0) == word(b, 0) && word(a, n - 4) == word(b, n - 4);
    }
    a.iter().zip(b).all(|(x, y)| x == y)
}

impl Interner {
    fn id(&mut self, v: &str) -> u32 {
        let hash = self.hasher.hash_one(v);
        let values = &self.values;
        if let Some(&id) = self.ids.find(hash, |&id| {
            same(values[id as usize - 1].as_bytes(), v.as_bytes())
        }) {
            return id;
        }
        self.insert(hash, v.into())
    }

    fn insert(&mut self, hash: u64, v: Box<str>) -> u32 {
        self.values.push(v);
        let id = self.values.len() as u32;
        let (hasher, values) = (&self.hasher, &self.values);
        self.ids
            .insert_unique(hash, id, |&id| hasher.hash_one(&*values[id as usize - 1]));
        id
    }

    /// An interner holding `values` as ids 1, 2, ...
    pub fn from_values(values: Vec<Box<str>>) -> Self {
        let mut interner = Interner::default();
        for v in values {
            let hash = interner.hasher.hash_one(&*v);
            interner.insert(hash, v);
        }
        interner
    }

    /// The values, id 1 first.
    pub fn values(&self) -> &[Box<str>] {
        &self.values
    }

    fn value(&self, id: u32) -> Option<&str> {
        (id != 0).then(|| &*self.values[id as usize - 1])
    }
}

/// The dimension columns of one batch, each interned once (a row's id, 0 for null) for every
/// view that groups by it: the reference views share most of their dimensions.
#[derive(Debug, Default)]
pub struct BatchIds {
    columns: Vec<Option<Vec<u32>>>,
}

impl BatchIds {
    /// Interns column `i` of `batch` (of type `ty`) unless done already.
    fn intern(&mut self, batch: &RecordBatch, i: usize, ty: FieldType, interner: &mut Interner) {
        if self.columns.len() <= i {
            self.columns.resize(i + 1, None);
        }
        if self.columns[i].is_some() {
            return;
        }
        let col = batch.column(i);
        // The column's array is looked up once, not once a row.
        let ids = match ty {
            FieldType::String => col
                .as_string::<i32>()
                .iter()
                .map(|v| v.map_or(0, |v| interner.id(v)))
                .collect(),
            FieldType::Int => col
                .as_primitive::<Int64Type>()
                .iter()
                .map(|v| v.map_or(0, |v| interner.id(&v.to_string())))
                .collect(),
            _ => col
                .as_boolean()
                .iter()
                .map(|v| v.map_or(0, |v| interner.id(if v { "true" } else { "false" })))
                .collect(),
        };
        self.columns[i] = Some(ids);
    }

    fn ids(&self, i: usize) -> &[u32] {
        self.columns[i].as_deref().unwrap_or_default()
    }
}

/// One bucket's groups of one view in one partition, by interned dimension ids.
pub type BucketGroups = HashMap<Box<[u32]>, Vec<MetricState>, Fast>;

/// One bucket's groups, with the stamp of the last apply that changed them.
#[derive(Debug, Clone, Default)]
pub struct Bucket {
    pub stamp: u64,
    pub groups: BucketGroups,
}

/// One view's groups in one partition, by bucket start.
pub type Groups = BTreeMap<i64, Bucket>;

/// What an apply may do.
#[derive(Debug, Clone, Copy)]
pub struct Admit<'a> {
    /// Only events of buckets from this one on (a replay window).
    pub from: Option<i64>,
    /// Events of buckets this covers are late: counted, not applied.
    pub covered: Option<&'a Coverage>,
    /// New groups the apply may create (the state-key cap's room).
    pub new_keys: usize,
    /// Rows not to apply (`true`): duplicates of events already applied.
    pub skip: Option<&'a BooleanArray>,
}

/// What an apply did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Applied {
    pub changed: bool,
    /// Events of covered buckets, not applied.
    pub late: u64,
    /// Events that needed a new group past the cap, not applied.
    pub over_cap: u64,
    pub new_keys: usize,
}

/// A view ready to apply batches of its schema.
#[derive(Debug, Clone)]
pub struct ViewAggregator {
    pub view: Arc<ViewDef>,
    filter: Option<CompiledFilter>,
    event_time: usize,
    dims: Vec<(usize, FieldType)>,
    /// Per metric: the column it reads.
    inputs: Vec<Option<usize>>,
}

impl ViewAggregator {
    pub fn new(view: Arc<ViewDef>, schema: &EventSchema) -> Result<Self> {
        let filter = CompiledFilter::for_view(&view, schema)?;
        let field = |name: &str| {
            schema
                .field(name)
                .map(|(i, f)| (i, f.ty))
                .expect("checked when the view loaded")
        };
        let dims = view.dimensions.iter().map(|d| field(d)).collect();
        let inputs = view
            .metrics
            .iter()
            .map(|m| m.field.as_deref().map(|f| field(f).0))
            .collect();
        Ok(ViewAggregator {
            filter,
            event_time: schema.event_time,
            dims,
            inputs,
            view,
        })
    }

    /// Folds `batch` (decoded events of the view's schema) into `groups`, stamping the buckets
    /// it changes with `stamp`, as far as `admit` lets it.
    pub fn apply(
        &self,
        batch: &RecordBatch,
        groups: &mut Groups,
        interner: &mut Interner,
        ids: &mut BatchIds,
        stamp: u64,
        admit: &Admit<'_>,
    ) -> Result<Applied> {
        let mut applied = Applied::default();
        let n = batch.num_rows();
        if n == 0 {
            return Ok(applied);
        }
        let mask: Option<BooleanArray> = self
            .filter
            .as_ref()
            .map(|f| f.evaluate(batch))
            .transpose()?;
        let times = batch
            .column(self.event_time)
            .as_primitive::<TimestampMicrosecondType>();
        for &(i, ty) in &self.dims {
            ids.intern(batch, i, ty, interner);
        }
        let dim_ids: Vec<&[u32]> = self.dims.iter().map(|&(i, _)| ids.ids(i)).collect();
        let metric_cols: Vec<Option<&ArrayRef>> = self
            .inputs
            .iter()
            .map(|i| i.map(|c| batch.column(c)))
            .collect();
        let mut key: Vec<u32> = Vec::with_capacity(self.dims.len());
        // Events arrive mostly in the current bucket: its groups are looked up once per run.
        let mut current: Option<(i64, &mut BucketGroups)> = None;
        let (mut last_bucket, mut last_covered) = (None, false);
        for row in 0..n {
            if let Some(m) = &mask {
                if !m.value(row) {
                    continue;
                }
            }
            if admit.skip.is_some_and(|s| s.value(row)) {
                continue;
            }
            let bucket = self.view.granularity.floor(times.value(row));
            if admit.from.is_some_and(|f| bucket < f) {
                continue;
            }
            if last_bucket != Some(bucket) {
                last_bucket = Some(bucket);
                last_covered = admit.covered.is_some_and(|c| c.covers(bucket));
            }
            if last_covered {
                applied.late += 1;
                continue;
            }
            key.clear();
            key.extend(dim_ids.iter().map(|ids| ids[row]));
            if current.as_ref().is_none_or(|(b, _)| *b != bucket) {
                let b = groups.entry(bucket).or_default();
                b.stamp = stamp;
                current = Some((bucket, &mut b.groups));
            }
            let Some((_, bucket_groups)) = current.as_mut() else {
                continue;
            };
            let states = match bucket_groups.get_mut(key.as_slice()) {
                Some(s) => s,
                None if applied.new_keys < admit.new_keys => {
                    applied.new_keys += 1;
                    bucket_groups
                        .entry(key.clone().into_boxed_slice())
                        .or_insert_with(|| {
                            self.view.metrics.iter().map(|m| m.empty_state()).collect()
                        })
                }
                None => {
                    applied.over_cap += 1;
                    continue;
                }
            };
            for (state, col) in states.iter_mut().zip(&metric_cols) {
                state.update(*col, row);
            }
            applied.changed = true;
        }
        Ok(applied)
    }

    /// Drops the groups of buckets `covered` covers; returns how many.
    pub fn prune(&self, groups: &mut Groups, covered: &Coverage) -> usize {
        let mut removed = 0;
        groups.retain(|&bucket, g| {
            let keep = !covered.covers(bucket);
            if !keep {
                removed += g.groups.len();
            }
            keep
        });
        removed
    }

    /// The buckets of `groups` the query asks for and `covered` does not cover.
    pub fn buckets(&self, groups: &Groups, q: &ViewQuery, covered: &Coverage) -> Vec<i64> {
        groups
            .range(q.from_us..q.to_us.max(q.from_us))
            .map(|(&b, _)| b)
            .filter(|&b| !covered.covers(b))
            .collect()
    }

    /// Adds the rows of `bucket`'s groups the query asks for, grouped by its dimensions, to
    /// `out`.
    pub fn query_bucket(
        &self,
        groups: &Groups,
        interner: &Interner,
        bucket: i64,
        q: &ViewQuery,
        out: &mut RowSet,
    ) {
        let Some(b) = groups.get(&bucket) else {
            return;
        };
        let mut dims: Vec<Option<&str>> = Vec::with_capacity(self.dims.len());
        for (key, states) in &b.groups {
            dims.clear();
            dims.extend(key.iter().map(|&id| interner.value(id)));
            if !q.accepts(&dims) {
                continue;
            }
            let group = q
                .group_by
                .iter()
                .map(|&d| dims[d].map(str::to_string))
                .collect();
            out.add(
                bucket,
                group,
                q.metrics.iter().map(|&m| states[m].clone()).collect(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{same, Interner};

    #[test]
    fn same_compares_every_byte_of_every_length() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).map(|i| b'a' + i % 26).collect();
            assert!(same(&a, &a.clone()), "length {n}");
            for at in 0..n {
                let mut b = a.clone();
                b[at] ^= 0x20;
                assert!(!same(&a, &b), "length {n}, byte {at}");
            }
            let mut longer = a.clone();
            longer.push(0);
            assert!(!same(&a, &longer), "length {n} against {}", n + 1);
        }
    }

    #[test]
    fn the_interner_gives_each_value_one_id_and_keeps_them_when_restored() {
        let stem = "m".repeat(23);
        let values = [
            String::new(),
            "US".to_string(),
            "US\0".to_string(),
            stem[..22].to_string(),
            stem.clone(),
            format!("{stem}a"),
            format!("{stem}b"),
            format!("{stem}a{}", "z".repeat(100)),
            "é".repeat(12),
            // Values of each length class that differ only in a middle byte.
            "abcdefghijklmnop".to_string(),
            "abcdefgXijklmnop".to_string(),
            "abcdefghijklmnoX".to_string(),
            "abcdefghij".to_string(),
            "abcdeXghij".to_string(),
            "abcdefg".to_string(),
            "abcXefg".to_string(),
            "abcdefX".to_string(),
            "aXc".to_string(),
            "abc".to_string(),
        ];
        let mut interner = Interner::default();
        let ids: Vec<u32> = values.iter().map(|v| interner.id(v)).collect();
        assert_eq!(ids, (1..=values.len() as u32).collect::<Vec<_>>());
        // Seen again, in another order: the same ids.
        for (v, &id) in values.iter().zip(&ids).rev() {
            assert_eq!(interner.id(v), id, "{v:?}");
            assert_eq!(interner.value(id), Some(v.as_str()));
        }
        assert_eq!(interner.value(0), None);
        // Restored from its values (as from a checkpoint): the same ids, and new ones after.
        let mut restored = Interner::from_values(interner.values().to_vec());
        for (v, &id) in values.iter().zip(&ids) {
            assert_eq!(restored.id(v), id, "{v:?}");
        }
        assert_eq!(restored.id(&format!("{stem}c")), values.len() as u32 + 1);
    }
}
