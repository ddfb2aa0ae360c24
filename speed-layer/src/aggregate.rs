//! A view compiled for the speed layer: applies decoded batches to per-partition state.
//!
//! Groups are held by bucket start, then keyed by a flat `[u32]` of one interned id per dimension
//! (0 = null), so looking a group up allocates nothing, a query walks only the buckets of its
//! range, and pruning drops whole buckets.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher as _;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
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

/// The dimension columns of one batch, each row interned once (its id, 0 for null) for every
/// view that groups by it: the reference views share most of their dimensions. Only the rows
/// a view reads are interned: a view of installs groups by columns that the other events
/// never need as ids (most rows, in the reference events).
#[derive(Debug, Default)]
pub struct BatchIds {
    columns: Vec<Option<IdColumn>>,
}

/// One column's ids, [`UNSET`] for rows no view has read yet.
#[derive(Debug)]
struct IdColumn {
    ids: Vec<u32>,
    /// Every row interned.
    complete: bool,
}

/// [`IdColumn::ids`] of a row not interned yet (the interner gives fewer ids).
const UNSET: u32 = u32::MAX;

/// Gives each row of `rows` (every row without it) not interned yet in `ids` its id.
#[inline]
fn fill(
    ids: &mut [u32],
    rows: Option<&BooleanArray>,
    interner: &mut Interner,
    mut id_of: impl FnMut(usize, &mut Interner) -> u32,
) {
    match rows {
        Some(m) => {
            for row in m.values().set_indices() {
                if ids[row] == UNSET {
                    ids[row] = id_of(row, interner);
                }
            }
        }
        None => {
            for (row, id) in ids.iter_mut().enumerate() {
                if *id == UNSET {
                    *id = id_of(row, interner);
                }
            }
        }
    }
}

impl BatchIds {
    /// Interns the rows of column `i` of `batch` (of type `ty`) that `rows` selects (every
    /// row without it) and that are not interned yet.
    fn intern(
        &mut self,
        batch: &RecordBatch,
        i: usize,
        ty: FieldType,
        interner: &mut Interner,
        rows: Option<&BooleanArray>,
    ) {
        if self.columns.len() <= i {
            self.columns.resize_with(i + 1, || None);
        }
        let n = batch.num_rows();
        let column = self.columns[i].get_or_insert_with(|| IdColumn {
            ids: vec![UNSET; n],
            complete: false,
        });
        if column.complete {
            return;
        }
        let col = batch.column(i);
        let ids = &mut column.ids;
        // The column's array is looked up once, not once a row.
        match ty {
            FieldType::String => {
                let a = col.as_string::<i32>();
                fill(ids, rows, interner, |row, interner| match a.is_valid(row) {
                    true => interner.id(a.value(row)),
                    false => 0,
                })
            }
            FieldType::Int => {
                let a = col.as_primitive::<Int64Type>();
                fill(ids, rows, interner, |row, interner| match a.is_valid(row) {
                    true => interner.id(&a.value(row).to_string()),
                    false => 0,
                })
            }
            _ => {
                let a = col.as_boolean();
                fill(ids, rows, interner, |row, interner| match a.is_valid(row) {
                    true => interner.id(if a.value(row) { "true" } else { "false" }),
                    false => 0,
                })
            }
        }
        column.complete = rows.is_none();
    }

    fn ids(&self, i: usize) -> &[u32] {
        self.columns[i]
            .as_ref()
            .map(|c| c.ids.as_slice())
            .unwrap_or_default()
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
            ids.intern(batch, i, ty, interner, mask.as_ref());
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

    /// Views sharing a batch intern only the rows they read: a view of installs leaves the
    /// other events' campaigns out of the partition's interner (and its checkpoints), and
    /// every view's groups are the same whichever view reads the shared columns first.
    #[test]
    fn only_the_rows_a_view_reads_are_interned_and_views_agree_in_any_order() {
        use std::collections::BTreeMap;
        use std::path::PathBuf;
        use tandem_core::decode::{Decoder, Message};
        use tandem_core::Catalog;

        use super::{Admit, BatchIds, Groups, ViewAggregator};

        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let catalog = Catalog::load(&root.join("schemas"), &root.join("jobs")).unwrap();
        let schema = &catalog.schemas["app_events"];
        let payloads: Vec<String> = (0..200)
            .map(|i| {
                let (event, campaign) = match i % 4 {
                    0 => ("install", format!("cmp_install_{}", i % 7)),
                    _ => ("launch", format!("cmp_launch_{i}")),
                };
                format!(
                    r#"{{"event_id":"e{i}","event_time":"2026-11-26T0{}:00:00Z","app_id":"app{}","event_name":"{event}","media_source":"src{}","campaign":"{campaign}","country":"C{}","platform":"ios","device_id":"d{}","revenue_usd":null}}"#,
                    i % 3,
                    i % 5,
                    i % 2,
                    i % 6,
                    i % 11
                )
            })
            .collect();
        let messages: Vec<Message<'_>> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Message {
                payload: Some(p.as_bytes()),
                partition: 0,
                offset: i as i64,
                timestamp_ms: None,
            })
            .collect();
        let batch = Decoder::new(std::sync::Arc::clone(schema))
            .decode(&messages, 1_800_000_000_000_000)
            .unwrap()
            .batch;
        let aggs: Vec<ViewAggregator> = ["installs_hourly", "active_devices_daily"]
            .iter()
            .map(|v| {
                ViewAggregator::new(std::sync::Arc::clone(&catalog.views[*v]), schema).unwrap()
            })
            .collect();
        let admit = Admit {
            from: None,
            covered: None,
            new_keys: usize::MAX,
            skip: None,
        };
        // Each view's groups by their dimension values.
        type Rows = BTreeMap<(i64, Vec<Option<String>>), String>;
        let run = |order: [usize; 2]| -> (Vec<Rows>, Interner) {
            let (mut interner, mut ids) = (Interner::default(), BatchIds::default());
            let mut groups = [Groups::new(), Groups::new()];
            for v in order {
                let applied = aggs[v]
                    .apply(&batch, &mut groups[v], &mut interner, &mut ids, 1, &admit)
                    .unwrap();
                assert!(applied.changed);
            }
            let rows = groups
                .iter()
                .map(|g| {
                    g.iter()
                        .flat_map(|(&bucket, b)| {
                            b.groups
                                .iter()
                                .map(move |(key, states)| (bucket, key, states))
                        })
                        .map(|(bucket, key, states)| {
                            let dims = key.iter().map(|&id| interner.value(id).map(String::from));
                            ((bucket, dims.collect()), format!("{states:?}"))
                        })
                        .collect()
                })
                .collect();
            (rows, interner)
        };
        let (installs_first, interner) = run([0, 1]);
        let (installs_last, _) = run([1, 0]);
        assert_eq!(installs_first, installs_last);
        let campaigns: Vec<&str> = interner
            .values()
            .iter()
            .map(|v| &**v)
            .filter(|v| v.starts_with("cmp_"))
            .collect();
        assert_eq!(campaigns.len(), 7, "{campaigns:?}");
        assert!(
            campaigns.iter().all(|c| c.starts_with("cmp_install_")),
            "{campaigns:?}"
        );
        // Each view's first metric counts its events: the 50 installs, and all 200 events.
        let counted = |rows: &Rows| -> u64 {
            rows.values()
                .filter_map(|s| {
                    s.strip_prefix("[Count(")?
                        .split(')')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum()
        };
        assert_eq!(counted(&installs_first[0]), 50);
        assert_eq!(counted(&installs_first[1]), 200);
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
