//! A view's rows and every rollup's, built in one pass over a day's events.
//!
//! For a view with one distinct metric, DataFusion reads the day's events as the view sees them
//! (bucket, dimensions, the distinct value, every other metric's partial of one event); when
//! the memory pool cannot hold them it groups them by the keys and the distinct value first
//! (`GROUP BY bucket, dims, device_id`, spilling), and its rows come here instead, in the same
//! columns. Each row is folded into the view's own table and into each rollup's at once: its
//! dimension values are interned once, its distinct value numbered once ([`crate::value_ids`])
//! with its sketch coupon, and every table adds the coupon to its group's sketch. A rollup's
//! sketch is thus built from the distinct values themselves, never as a union of the view's
//! sketches (a union per group costs a 4 KiB gadget and a merge per input sketch). The view's
//! distinct counts are exact: once the rows are folded, each group's value numbers are counted
//! once each, in a sort of (group, number) pairs ([`Table::settle`]), so a value that comes
//! again in a group adds nothing. A rollup's are not (its groups span the view's), and are
//! published as sketches only. A rollup that a finer rollup holds (`day.app_id` and
//! `hour.app_id`, `day` and `hour`) is merged from that one's groups once they are folded: a
//! union per group over thousands of groups costs less than reading millions of rows again.
//!
//! The input is read once, in chunks, on every thread (the dimension values interned on one);
//! then the tables are split among threads, and each thread folds every chunk into the
//! tables it takes, meeting the others only when every table is done. The
//! view's own table, which holds most of the groups, is built in one part per thread, each
//! holding the groups of its share of key hashes, and comes out as one batch per part. A
//! table indexes its groups by bucket, directly by their value ids where its dimensions hold
//! few value combinations ([`BucketIndex`]).
//! A view without a distinct metric comes here with its final rows, one per group, and the
//! same pass computes the rollups from them.

use std::borrow::Cow;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Int64Array, StringArray, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use hashbrown::HashTable;
use tandem_core::metric::{Coupon, DistinctState, MetricKind, MetricState, LIST_COUPONS};
use tandem_core::time::{day_of, day_string};
use tandem_core::view::{Granularity, Rollup, ViewDef, BASE_ROLLUP, BUCKET_COLUMN};

use crate::error::{BatchError, Result};
use crate::hll::for_each_value;
use crate::rollup::Dictionary;
use crate::value_ids::{coupon_of, CouponOf, NumberedArrays};

/// The rows of one batch, read once for every table.
struct Prepared {
    /// Per row, `2 + dimensions` words: its bucket (floored to the view's granularity) as
    /// two words, then each view dimension's value id (0 = null). A row's key is one run of
    /// memory, which every table reads in order, where a vector a dimension made each table
    /// read as many streams.
    keys: Vec<u32>,
    rows: usize,
    /// The number of rows in each bucket.
    per_bucket: hashbrown::HashMap<i64, usize>,
    /// Each row's bucket and, per view dimension, each row's value id, until they are laid
    /// out in [`Self::keys`].
    buckets: Vec<i64>,
    ids: Vec<Vec<u32>>,
    /// Per row: whether the distinct value is there (not null), and its coupon (`None` for a
    /// null or a value sketches skip).
    present: Vec<bool>,
    coupons: Vec<Option<Coupon>>,
    /// Per row: the bits of its coupon (0 for none), which a sketch's list image holds.
    bits: Vec<u32>,
    /// Per row of events (which may repeat a value within a group): the number of its
    /// distinct value (0 for a null), equal values the same ([`crate::value_ids`]), by which
    /// an exact table counts a value once a group.
    value_ids: Vec<u32>,
    /// Per metric (none for the distinct metrics), each row's partial.
    partials: Vec<StateColumn>,
}

/// One metric's states, one a group of a table or one a row of a chunk (each row's partial),
/// as compact as its kind allows: a count is 8 bytes and a sum 16, not a 48-byte state (a
/// table reads every row's partials, and the view's own table holds millions of groups a day).
enum StateColumn {
    /// Counts (an event's is one; a first-phase row's its events).
    Counts(Vec<u64>),
    /// Sums of an int field, or of a decimal field in units of its scale.
    IntSums(Vec<i128>),
    FloatSums(Vec<f64>),
    /// Any other metric's states (a rollup's distinct metric among them).
    States(Vec<MetricState>),
}

impl StateColumn {
    /// `m`'s partials of the rows of `columns` (its batch columns); a null row's is the
    /// metric's zero, as [`MetricDef::states_from_batch`] reads it.
    fn of(m: &tandem_core::metric::MetricDef, columns: &[ArrayRef]) -> Result<Self> {
        use datafusion::arrow::datatypes::{
            ArrowPrimitiveType, Decimal128Type, Float64Type, Int64Type,
        };
        let value = &columns[0];
        let nulls = value.logical_nulls();
        // Each row's value as `f` makes it, a null row's the zero.
        fn each<T: ArrowPrimitiveType, V: Default>(
            value: &ArrayRef,
            nulls: Option<&datafusion::arrow::buffer::NullBuffer>,
            f: impl Fn(T::Native) -> V,
        ) -> Vec<V> {
            let values = value.as_primitive::<T>().values().iter();
            values
                .enumerate()
                .map(|(row, &v)| match nulls {
                    Some(n) if n.is_null(row) => V::default(),
                    _ => f(v),
                })
                .collect()
        }
        let nulls = nulls.as_ref();
        Ok(match (m.empty_state(), value.data_type()) {
            (MetricState::Count(_), DataType::Int64) => {
                StateColumn::Counts(each::<Int64Type, _>(value, nulls, |v| v as u64))
            }
            (MetricState::SumInt(_), DataType::Int64) => {
                StateColumn::IntSums(each::<Int64Type, _>(value, nulls, i128::from))
            }
            (MetricState::SumInt(_), DataType::Decimal128(..)) => {
                StateColumn::IntSums(each::<Decimal128Type, _>(value, nulls, |v| v))
            }
            (MetricState::SumFloat(_), DataType::Float64) => {
                StateColumn::FloatSums(each::<Float64Type, _>(value, nulls, |v| v))
            }
            _ => StateColumn::States(m.states_from_batch(columns)?),
        })
    }

    /// Appends `other`'s rows (the same metric's partials).
    fn append(&mut self, other: StateColumn) {
        match (self, other) {
            (StateColumn::Counts(a), StateColumn::Counts(b)) => a.extend(b),
            (StateColumn::IntSums(a), StateColumn::IntSums(b)) => a.extend(b),
            (StateColumn::FloatSums(a), StateColumn::FloatSums(b)) => a.extend(b),
            (StateColumn::States(a), StateColumn::States(b)) => a.extend(b),
            (a, b) => {
                let mut states: Vec<MetricState> = a.states();
                states.extend((0..b.len()).map(|r| b.state(r)));
                *a = StateColumn::States(states);
            }
        }
    }

    /// An empty column for states like `empty`.
    fn like(empty: &MetricState) -> Self {
        match empty {
            MetricState::Count(_) => StateColumn::Counts(Vec::new()),
            MetricState::SumInt(_) => StateColumn::IntSums(Vec::new()),
            MetricState::SumFloat(_) => StateColumn::FloatSums(Vec::new()),
            _ => StateColumn::States(Vec::new()),
        }
    }

    fn reserve(&mut self, groups: usize) {
        match self {
            StateColumn::Counts(v) => v.reserve(groups),
            StateColumn::IntSums(v) => v.reserve(groups),
            StateColumn::FloatSums(v) => v.reserve(groups),
            StateColumn::States(v) => v.reserve(groups),
        }
    }

    /// Appends a group's state `s` (of this column's kind).
    fn push(&mut self, s: MetricState) {
        match (self, s) {
            (StateColumn::Counts(v), MetricState::Count(c)) => v.push(c),
            (StateColumn::IntSums(v), MetricState::SumInt(x)) => v.push(x),
            (StateColumn::FloatSums(v), MetricState::SumFloat(x)) => v.push(x),
            (StateColumn::States(v), s) => v.push(s),
            (c, s) => {
                // A state of another kind: the column keeps states from now on.
                let mut states = c.states();
                states.push(s);
                *c = StateColumn::States(states);
            }
        }
    }

    /// Group `g`'s state.
    fn state(&self, g: usize) -> MetricState {
        match self {
            StateColumn::Counts(v) => MetricState::Count(v[g]),
            StateColumn::IntSums(v) => MetricState::SumInt(v[g]),
            StateColumn::FloatSums(v) => MetricState::SumFloat(v[g]),
            StateColumn::States(v) => v[g].clone(),
        }
    }

    fn len(&self) -> usize {
        match self {
            StateColumn::Counts(v) => v.len(),
            StateColumn::IntSums(v) => v.len(),
            StateColumn::FloatSums(v) => v.len(),
            StateColumn::States(v) => v.len(),
        }
    }

    /// Every group's state.
    fn states(&self) -> Vec<MetricState> {
        (0..self.len()).map(|g| self.state(g)).collect()
    }

    /// Merges group or row `from` of `source` (the same metric's column) into group `g`.
    #[inline]
    fn merge_from(&mut self, g: usize, source: &StateColumn, from: usize) {
        match (&mut *self, source) {
            (StateColumn::Counts(v), StateColumn::Counts(s)) => v[g] += s[from],
            (StateColumn::IntSums(v), StateColumn::IntSums(s)) => v[g] += s[from],
            (StateColumn::FloatSums(v), StateColumn::FloatSums(s)) => v[g] += s[from],
            (StateColumn::States(v), StateColumn::States(s)) => v[g].merge(&s[from]),
            (c, s) => c.merge_state(g, &s.state(from)),
        }
    }

    /// Merges `s` (a state of the same metric) into group `g`.
    fn merge_state(&mut self, g: usize, s: &MetricState) {
        match (&mut *self, s) {
            (StateColumn::Counts(v), MetricState::Count(c)) => v[g] += c,
            (StateColumn::IntSums(v), MetricState::SumInt(x)) => v[g] += x,
            (StateColumn::FloatSums(v), MetricState::SumFloat(x)) => v[g] += x,
            (StateColumn::States(v), s) => v[g].merge(s),
            (c, s) => {
                let mut states = c.states();
                states[g].merge(s);
                *c = StateColumn::States(states);
            }
        }
    }

    /// The metric's batch columns for the first `n` groups, as [`MetricDef::batch_columns`]
    /// makes them from the states.
    fn batch_columns(&self, m: &tandem_core::metric::MetricDef, n: usize) -> Result<Vec<ArrayRef>> {
        use datafusion::arrow::array::{Decimal128Array, Float64Array};
        let fields = m.batch_fields();
        let too_large = |v: &dyn std::fmt::Display| {
            BatchError::Core(tandem_core::CoreError::Internal(format!(
                "`{}`: {v} does not fit in 64 bits",
                m.name
            )))
        };
        let column: ArrayRef = match (self, fields.first().map(|f| f.data_type())) {
            (StateColumn::Counts(v), Some(DataType::Int64)) if fields.len() == 1 => Arc::new(
                v[..n]
                    .iter()
                    .map(|&c| i64::try_from(c).map_err(|_| too_large(&c)))
                    .collect::<Result<Int64Array>>()?,
            ),
            (StateColumn::IntSums(v), Some(DataType::Int64)) if fields.len() == 1 => Arc::new(
                v[..n]
                    .iter()
                    .map(|&x| i64::try_from(x).map_err(|_| too_large(&x)))
                    .collect::<Result<Int64Array>>()?,
            ),
            (StateColumn::IntSums(v), Some(DataType::Decimal128(p, s))) if fields.len() == 1 => {
                Arc::new(
                    Decimal128Array::from_iter_values(v[..n].iter().copied())
                        .with_precision_and_scale(*p, *s)?,
                )
            }
            (StateColumn::FloatSums(v), Some(DataType::Float64)) if fields.len() == 1 => {
                Arc::new(Float64Array::from_iter_values(v[..n].iter().copied()))
            }
            (StateColumn::States(v), _) => {
                let states: Vec<&MetricState> = v[..n].iter().collect();
                return Ok(m.batch_columns(&states)?);
            }
            (c, _) => {
                let states: Vec<MetricState> = (0..n).map(|g| c.state(g)).collect();
                let states: Vec<&MetricState> = states.iter().collect();
                return Ok(m.batch_columns(&states)?);
            }
        };
        Ok(vec![column])
    }
}

/// One table being built: the view's own rows or a rollup's.
struct Table {
    name: String,
    /// The view dimensions it holds, ascending.
    dims: Vec<usize>,
    granularity: Granularity,
    /// Distinct counts are exact (the view's own rows from distinct-level input).
    exact: bool,
    /// The share of the groups it holds: those whose key hash [`Share::holds`] (the view's
    /// own table is split among the threads, so that its groups, by far the most, are not
    /// all one thread's work).
    share: Share,
    /// Per group: its key (bucket as two words, then the dimension ids), `width` words each.
    keys: Vec<u32>,
    width: usize,
    /// The groups' index, one per bucket ([`BucketIndex`]).
    index: BucketIndex,
    /// Every metric's states but that of the distinct metric kept apart ([`Self::distinct`]):
    /// [`Self::stored`] columns, a state a group in each.
    states: Vec<StateColumn>,
    /// The distinct metric's states, kept apart in an exact table.
    distinct: Option<ExactDistinct>,
    /// In an exact table whose input rows may repeat a value within a group: each row's
    /// group and value number (`group << 32 | number`), counted once the rows are folded
    /// ([`Self::settle`]).
    pairs: Option<Vec<u64>>,
    /// What went wrong folding rows in, if anything did.
    error: Option<BatchError>,
    /// A rollup's coupons of the rows being folded, by the slot of their distinct metric:
    /// each row's group and coupon, added to the groups' sketches group by group once the
    /// rows are folded ([`Self::add_pending`]).
    pending: Vec<(usize, Vec<(u32, Coupon)>)>,
}

/// The distinct metric of an exact table (the view's own rows, from the first phase's rows,
/// whose distinct values are distinct within a group), per group: its exact count, and its
/// first coupons, which are written out as a sketch's list image. Most groups hold a value or
/// two: they cost no sketch (an allocation or two each, and a serialization). A group given
/// more coupons than a list holds gets a sketch.
struct ExactDistinct {
    /// The metric's index in the view.
    metric: usize,
    lg_k: u8,
    exact: Vec<u64>,
    /// Per group: the coupons it holds, or [`SKETCHED`].
    held: Vec<u8>,
    coupons: Vec<[u32; LIST_COUPONS]>,
    sketches: hashbrown::HashMap<u32, DistinctState>,
}

/// The most groups a rollup adds its pending coupons to in the order they came, not sorted
/// by group first ([`Table::add_pending`]): their sketches stay in a core's caches.
const FEW_GROUPS: usize = 64;

/// [`ExactDistinct::held`] of a group whose coupons are in a sketch.
const SKETCHED: u8 = u8::MAX;

impl ExactDistinct {
    fn push_group(&mut self) {
        self.exact.push(0);
        self.held.push(0);
        self.coupons.push([0; LIST_COUPONS]);
    }

    /// Adds a row of group `g`: whether its value counts (it is there, and new to the group),
    /// and its coupon (bits and coupon; none for a value sketches skip).
    fn add(&mut self, g: usize, present: bool, bits: u32, coupon: Option<Coupon>) -> Result<()> {
        if present {
            self.exact[g] += 1;
        }
        let Some(coupon) = coupon.filter(|_| bits != 0) else {
            return Ok(());
        };
        let held = self.held[g] as usize;
        if held == SKETCHED as usize {
            if let Some(d) = self.sketches.get_mut(&(g as u32)) {
                d.update_coupon(coupon);
            }
            return Ok(());
        }
        let coupons = &mut self.coupons[g];
        if coupons[..held].contains(&bits) {
            return Ok(());
        }
        if held < LIST_COUPONS {
            coupons[held] = bits;
            self.held[g] += 1;
            return Ok(());
        }
        let mut d = DistinctState::from_list(self.lg_k, coupons, None)?;
        d.update_coupon(coupon);
        self.sketches.insert(g as u32, d);
        self.held[g] = SKETCHED;
        Ok(())
    }

    /// The metric's batch columns (its exact counts, its sketches) for the first `n` groups.
    fn columns(&self, n: usize) -> Vec<ArrayRef> {
        let exact = Int64Array::from_iter_values(
            self.exact[..n]
                .iter()
                .map(|&e| i64::try_from(e).unwrap_or(i64::MAX)),
        );
        let mut sketches = BinaryBuilder::with_capacity(n, n * 16);
        let mut image = Vec::with_capacity(8 + 4 * LIST_COUPONS);
        for g in 0..n {
            match self.held[g] {
                SKETCHED => match self.sketches.get(&(g as u32)) {
                    Some(d) => sketches.append_value(d.serialize()),
                    None => sketches.append_null(),
                },
                held => {
                    image.clear();
                    DistinctState::write_list(
                        self.lg_k,
                        &self.coupons[g][..held as usize],
                        &mut image,
                    );
                    sketches.append_value(&image);
                }
            }
        }
        vec![Arc::new(exact), Arc::new(sketches.finish())]
    }
}

impl Table {
    fn new(view: &ViewDef, name: String, dims: Vec<usize>, g: Granularity, exact: bool) -> Self {
        let width = 2 + dims.len();
        let mut distincts = view
            .metrics
            .iter()
            .enumerate()
            .filter(|(_, m)| m.kind == MetricKind::Distinct);
        let distinct = match (distincts.next(), distincts.next()) {
            (Some((metric, m)), None) if exact => Some(ExactDistinct {
                metric,
                lg_k: m.lg_k(),
                exact: Vec::new(),
                held: Vec::new(),
                coupons: Vec::new(),
                sketches: hashbrown::HashMap::new(),
            }),
            _ => None,
        };
        Table {
            name,
            dims,
            granularity: g,
            exact,
            share: Share::ALL,
            keys: Vec::new(),
            width,
            index: BucketIndex::default(),
            states: Vec::new(),
            distinct,
            pairs: None,
            error: None,
            pending: Vec::new(),
        }
    }

    /// Room for `groups` more groups, so that its vectors are not copied as they grow, and
    /// in each bucket's index for the groups `per_bucket` says it gets.
    fn reserve(
        &mut self,
        view: &ViewDef,
        groups: usize,
        per_bucket: hashbrown::HashMap<i64, usize>,
    ) {
        self.index.room = per_bucket;
        self.keys.reserve(groups * self.width);
        self.ensure_columns(view);
        for c in &mut self.states {
            c.reserve(groups);
        }
    }

    /// A group's empty states, one a stored metric (a distinct metric's exact in an exact
    /// table).
    fn empty_states(&self, view: &ViewDef) -> Vec<MetricState> {
        let apart = self.distinct.as_ref().map(|d| d.metric);
        view.metrics
            .iter()
            .enumerate()
            .filter(|(i, _)| apart != Some(*i))
            .map(|(_, m)| {
                let mut s = m.empty_state();
                if let MetricState::Distinct(d) = &mut s {
                    d.exact = self.exact.then_some(0);
                }
                s
            })
            .collect()
    }

    /// The state columns, made on first use (once whether the distinct metric is kept apart
    /// is settled).
    fn ensure_columns(&mut self, view: &ViewDef) {
        if self.states.is_empty() {
            self.states = self
                .empty_states(view)
                .iter()
                .map(StateColumn::like)
                .collect();
        }
    }

    /// The states a group keeps: one a metric, but the distinct metric kept apart.
    fn stored(&self, view: &ViewDef) -> usize {
        view.metrics.len() - usize::from(self.distinct.is_some())
    }

    /// Where among a group's states metric `i`'s is (none for the distinct metric kept
    /// apart).
    fn slot(&self, i: usize) -> Option<usize> {
        match self.distinct.as_ref().map(|d| d.metric) {
            Some(apart) if apart == i => None,
            Some(apart) if apart < i => Some(i - 1),
            _ => Some(i),
        }
    }

    fn groups(&self) -> usize {
        self.keys.len() / self.width
    }

    /// The group of `key` (whose hash is `hash`), if the table holds it; otherwise a new
    /// group of it, without states yet. Its number, and whether it is new.
    fn find_or_insert(&mut self, key: &[u32], hash: u64) -> (usize, bool) {
        let bucket = (key[0] as i64 & 0xffff_ffff) | ((key[1] as i64) << 32);
        let (keys, width) = (&mut self.keys, self.width);
        if let Some(strides) = &self.index.strides {
            let slot: usize = key[2..]
                .iter()
                .zip(strides)
                .map(|(&id, &stride)| id as usize * stride)
                .sum();
            let slots = self.index.slots_of(bucket);
            debug_assert!(slot < slots.len(), "ids within the dictionary's ranges");
            return match slots.get(slot).copied() {
                Some(0) | None => {
                    let g = keys.len() / width;
                    keys.extend_from_slice(key);
                    if let Some(s) = slots.get_mut(slot) {
                        *s = g as u32 + 1;
                    }
                    (g, true)
                }
                Some(g) => (g as usize - 1, false),
            };
        }
        let index = self.index.of(bucket);
        let found = index.find(hash, |&g| {
            let at = g as usize * width;
            same(&keys[at..at + width], key)
        });
        if let Some(&g) = found {
            return (g as usize, false);
        }
        let g = keys.len() / width;
        keys.extend_from_slice(key);
        index.insert_unique(hash, g as u32, |&g| {
            let at = g as usize * width;
            hash_key(&keys[at..at + width])
        });
        (g, true)
    }

    /// The start of group `g`'s bucket.
    fn bucket(&self, g: usize) -> i64 {
        let at = g * self.width;
        (self.keys[at] as i64 & 0xffff_ffff) | ((self.keys[at + 1] as i64) << 32)
    }

    /// Whether this table's groups can be merged from `source`'s (a table that is not
    /// exact, holding every dimension of this one's, in buckets that nest in this one's),
    /// and `source` is finer: more dimensions or finer buckets.
    fn derives_from(&self, source: &Table) -> bool {
        !source.exact
            && source.granularity <= self.granularity
            && self.dims.iter().all(|d| source.dims.contains(d))
            && (source.dims.len() > self.dims.len() || source.granularity < self.granularity)
    }

    /// Merges every group of `source` (see [`Self::derives_from`]) into this table: its
    /// states as serving would merge them (a distinct count by the union of sketches).
    fn derive(&mut self, view: &ViewDef, source: &Table) {
        self.ensure_columns(view);
        debug_assert_eq!(
            self.stored(view),
            source.stored(view),
            "neither keeps a metric apart"
        );
        let positions: Vec<usize> = self
            .dims
            .iter()
            .filter_map(|d| source.dims.iter().position(|s| s == d))
            .collect();
        debug_assert_eq!(
            positions.len(),
            self.dims.len(),
            "a source holds every dimension"
        );
        let mut key = vec![0u32; self.width];
        for g in 0..source.groups() {
            let bucket = self.granularity.floor(source.bucket(g));
            key[0] = bucket as u32;
            key[1] = (bucket >> 32) as u32;
            let at = g * source.width + 2;
            for (k, &p) in positions.iter().enumerate() {
                key[2 + k] = source.keys[at + p];
            }
            let hash = hash_key(&key);
            match self.find_or_insert(&key, hash) {
                (group, false) => {
                    for (a, b) in self.states.iter_mut().zip(&source.states) {
                        a.merge_from(group, b, g);
                    }
                }
                (_, true) => {
                    for (a, b) in self.states.iter_mut().zip(&source.states) {
                        a.push(b.state(g));
                    }
                }
            }
        }
    }

    /// Folds rows of `p` into this table.
    fn add(&mut self, view: &ViewDef, p: &Prepared) {
        self.fold(view, p);
        self.add_pending();
    }

    /// Counts the distinct values of the rows folded ([`Self::pairs`]): each (group, value)
    /// once, in a sort of the pairs, adding its value's coupon (`coupons`, by number) to the
    /// group's sketch.
    fn settle(&mut self, view: &ViewDef, coupons: &[CouponOf]) {
        let Some(mut pairs) = self.pairs.take() else {
            return;
        };
        pairs.sort_unstable();
        pairs.dedup();
        let slot = view
            .metrics
            .iter()
            .position(|m| m.kind == MetricKind::Distinct)
            .and_then(|i| self.slot(i));
        for pair in pairs {
            let (g, id) = ((pair >> 32) as usize, pair as u32 as usize);
            let (bits, coupon) = coupons.get(id).copied().unwrap_or((0, None));
            if let Some(d) = &mut self.distinct {
                if let Err(e) = d.add(g, true, bits, coupon) {
                    self.error.get_or_insert(e);
                }
            } else if let Some(StateColumn::States(states)) =
                slot.and_then(|k| self.states.get_mut(k))
            {
                if let Some(MetricState::Distinct(d)) = states.get_mut(g) {
                    d.exact = d.exact.map(|n| n + 1);
                    if let Some(c) = coupon {
                        d.update_coupon(c);
                    }
                }
            }
        }
    }

    /// Adds the coupons [`Self::fold`] left pending to their groups' sketches, group by group
    /// (each group's in the order of its rows): a rollup's sketches of a while (a sketch of
    /// a large group is 4 KiB) are more than the caches hold, and a sketch taken once for all
    /// its rows of a chunk is not missed once a row.
    fn add_pending(&mut self) {
        let groups = self.groups();
        let mut sorted = Vec::new();
        let mut starts = Vec::new();
        for (slot, pending) in &mut self.pending {
            if pending.is_empty() {
                continue;
            }
            if groups <= FEW_GROUPS {
                // Few sketches, which the caches hold: each coupon added as it came.
                if let Some(StateColumn::States(states)) = self.states.get_mut(*slot) {
                    for &(g, c) in pending.iter() {
                        if let Some(MetricState::Distinct(d)) = states.get_mut(g as usize) {
                            d.update_coupon(c);
                        }
                    }
                }
                pending.clear();
                continue;
            }
            // A counting sort by group, which keeps each group's coupons in order.
            starts.clear();
            starts.resize(groups + 1, 0u32);
            for &(g, _) in pending.iter() {
                starts[g as usize + 1] += 1;
            }
            for g in 0..groups {
                starts[g + 1] += starts[g];
            }
            sorted.clear();
            sorted.resize(pending.len(), None);
            for &(g, c) in pending.iter() {
                let at = &mut starts[g as usize];
                sorted[*at as usize] = Some((g, c));
                *at += 1;
            }
            if let Some(StateColumn::States(states)) = self.states.get_mut(*slot) {
                for &(g, c) in sorted.iter().flatten() {
                    if let MetricState::Distinct(d) = &mut states[g as usize] {
                        d.update_coupon(c);
                    }
                }
            }
            pending.clear();
        }
    }

    /// Folds rows of `p` into this table, but a rollup's coupons, which it leaves pending, and
    /// an exact table's distinct values of events, which it counts once all are folded.
    fn fold(&mut self, view: &ViewDef, p: &Prepared) {
        self.ensure_columns(view);
        let empty = self.empty_states(view);
        if !self.exact && self.pending.is_empty() {
            self.pending = view
                .metrics
                .iter()
                .enumerate()
                .filter(|(_, m)| m.kind == MetricKind::Distinct)
                .filter_map(|(i, _)| self.slot(i))
                .map(|slot| (slot, Vec::with_capacity(p.rows)))
                .collect();
        }
        let mut key = vec![0u32; self.width];
        // The input's buckets are floored to the view's ([`prepare`]): a table of the view's
        // granularity keeps them.
        let coarser = self.granularity != view.granularity;
        let width = 2 + view.dimensions.len();
        for (row, words) in p.keys.chunks_exact(width).enumerate() {
            if coarser {
                let bucket = (words[0] as i64 & 0xffff_ffff) | ((words[1] as i64) << 32);
                let bucket = self.granularity.floor(bucket);
                key[0] = bucket as u32;
                key[1] = (bucket >> 32) as u32;
            } else {
                key[0] = words[0];
                key[1] = words[1];
            }
            for (k, &d) in self.dims.iter().enumerate() {
                key[2 + k] = words[2 + d];
            }
            // (A table indexed directly and whole needs no hash.)
            let hash = match (&self.index.strides, self.share.parts) {
                (Some(_), 1) => 0,
                _ => hash_key(&key),
            };
            if !self.share.holds(hash) {
                continue;
            }
            let group = match self.find_or_insert(&key, hash) {
                (g, false) => g,
                (g, true) => {
                    for (c, s) in self.states.iter_mut().zip(&empty) {
                        c.push(s.clone());
                    }
                    if let Some(d) = &mut self.distinct {
                        d.push_group();
                    }
                    g
                }
            };
            // An exact table's distinct value of an event is counted once all are folded.
            let deferred = match &mut self.pairs {
                Some(pairs) => {
                    let id = p.value_ids[row];
                    if id != 0 {
                        pairs.push(((group as u64) << 32) | u64::from(id));
                    }
                    true
                }
                None => false,
            };
            let mut states = self.states.iter_mut();
            let mut partial = p.partials.iter();
            let mut distinct_at = 0;
            for m in &view.metrics {
                if m.kind == MetricKind::Distinct {
                    if let Some(d) = &mut self.distinct {
                        if deferred {
                            continue;
                        }
                        let added = d.add(group, p.present[row], p.bits[row], p.coupons[row]);
                        if let Err(e) = added {
                            self.error.get_or_insert(e);
                        }
                        continue;
                    }
                }
                let Some(state) = states.next() else { break };
                if m.kind == MetricKind::Distinct {
                    if self.exact {
                        if deferred {
                            continue;
                        }
                        if let StateColumn::States(v) = state {
                            let MetricState::Distinct(d) = &mut v[group] else {
                                continue;
                            };
                            if p.present[row] {
                                d.exact = d.exact.map(|n| n + 1);
                            }
                            if let Some(c) = p.coupons[row] {
                                d.update_coupon(c);
                            }
                        }
                    } else {
                        // A rollup's sketch takes the coupon once the rows are folded.
                        let pending = self.pending.get_mut(distinct_at);
                        distinct_at += 1;
                        if let (Some((_, pending)), Some(c)) = (pending, p.coupons[row]) {
                            pending.push((group as u32, c));
                        }
                    }
                } else if let Some(column) = partial.next() {
                    state.merge_from(group, column, row);
                }
            }
        }
    }

    /// The table's rows as one batch of the view's batch schema (dimensions it leaves out are
    /// null).
    fn finish(
        &self,
        view: &ViewDef,
        schema: &SchemaRef,
        dictionary: &Dictionary,
    ) -> Result<RecordBatch> {
        let n = self.groups();
        let bucket = |g: usize| self.bucket(g);
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        columns.push(Arc::new(
            TimestampMicrosecondArray::from_iter_values((0..n).map(bucket)).with_timezone("UTC"),
        ));
        for d in 0..view.dimensions.len() {
            let values = dictionary.values(d);
            let column: StringArray = match self.dims.iter().position(|&x| x == d) {
                Some(k) => {
                    let ids = (0..n).map(|g| self.keys[g * self.width + 2 + k]);
                    texts_of(values, ids, n)
                }
                None => StringArray::new_null(n),
            };
            columns.push(Arc::new(column));
        }
        for (i, m) in view.metrics.iter().enumerate() {
            let Some(slot) = self.slot(i) else {
                if let Some(d) = &self.distinct {
                    columns.extend(d.columns(n));
                }
                continue;
            };
            match self.states.get(slot) {
                Some(c) => columns.extend(c.batch_columns(m, n)?),
                None => {
                    let empty = m.empty_state();
                    columns.extend(m.batch_columns(&vec![&empty; n])?);
                }
            }
        }
        let name = [self.name.clone()];
        columns.push(Arc::new(texts_of(&name, std::iter::repeat_n(1, n), n)));
        // Rows of a day are many: its name is formatted once.
        let mut days: Vec<(i64, String)> = Vec::new();
        let mut day_ids = Vec::with_capacity(n);
        for g in 0..n {
            let d = day_of(bucket(g));
            let id = match days.iter().position(|(x, _)| *x == d) {
                Some(i) => i,
                None => {
                    days.push((d, day_string(d)));
                    days.len() - 1
                }
            };
            day_ids.push(id as u32 + 1);
        }
        let days: Vec<String> = days.into_iter().map(|(_, s)| s).collect();
        columns.push(Arc::new(texts_of(&days, day_ids.into_iter(), n)));
        Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
    }
}

/// The texts of value ids `ids` (`n` of them; 0 for null) of a dimension whose values are
/// `values` (by id minus one). A group's text is copied as a fixed run of [`PADDED`] bytes,
/// then cut to its length: a copy of known size is a few moves, where a copy of each text's
/// own length is a call (and most of the time writing a day's millions of groups).
fn texts_of<I: Iterator<Item = u32> + Clone>(values: &[String], ids: I, n: usize) -> StringArray {
    use datafusion::arrow::buffer::{Buffer, NullBuffer, OffsetBuffer, ScalarBuffer};
    let padded: Vec<[u8; PADDED]> = values
        .iter()
        .map(|v| {
            let mut p = [0u8; PADDED];
            let b = v.as_bytes();
            p[..b.len().min(PADDED)].copy_from_slice(&b[..b.len().min(PADDED)]);
            p
        })
        .collect();
    let total: usize = ids
        .clone()
        .map(|id| match id {
            0 => 0,
            id => values.get(id as usize - 1).map_or(0, String::len),
        })
        .sum();
    // Each text appended as it is: past what 32-bit offsets hold (or were the runs refused).
    let appended = |ids: I| -> StringArray {
        ids.map(|id| {
            values
                .get((id as usize).wrapping_sub(1))
                .map(String::as_str)
        })
        .collect()
    };
    if i32::try_from(total).is_err() {
        return appended(ids);
    }
    let again = ids.clone();
    let mut offsets: Vec<i32> = Vec::with_capacity(n + 1);
    let mut bytes: Vec<u8> = Vec::with_capacity(total + PADDED);
    let mut valid = Vec::new();
    offsets.push(0);
    for (row, id) in ids.enumerate() {
        match values.get((id as usize).wrapping_sub(1)) {
            Some(v) => {
                let at = bytes.len();
                if v.len() <= PADDED {
                    bytes.extend_from_slice(&padded[id as usize - 1]);
                    bytes.truncate(at + v.len());
                } else {
                    bytes.extend_from_slice(v.as_bytes());
                }
            }
            None => {
                if valid.is_empty() {
                    valid = vec![true; n];
                }
                valid[row] = false;
            }
        }
        offsets.push(bytes.len() as i32);
    }
    let nulls = (!valid.is_empty()).then(|| NullBuffer::from(valid));
    let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
    // (Whole texts between growing offsets: never refused.)
    StringArray::try_new(offsets, Buffer::from_vec(bytes), nulls)
        .unwrap_or_else(|_| appended(again))
}

/// The bytes [`texts_of`] copies a text as (a longer text is copied as it is).
const PADDED: usize = 32;

/// A table's index of its groups, one hash table per bucket. Events come about in time
/// order, so the rows of a while fall in one or two buckets, and the index they probe is
/// small enough to stay in the caches: one index of a day's 1.1 M groups missed them once
/// or twice a row, and was the larger part of the fold's time.
///
/// A table whose dimensions hold few values between them (a rollup of a dimension or two)
/// indexes a bucket's groups directly instead: a slot for every combination of their value
/// ids, no hash computed and no key compared.
#[derive(Default)]
struct BucketIndex {
    /// The index of each bucket seen, by bucket.
    of_bucket: hashbrown::HashMap<i64, usize>,
    indexes: Vec<HashTable<u32>>,
    /// The bucket of the index last asked for, and its place in `indexes` (or `slots`).
    last: Option<(i64, usize)>,
    /// The room a bucket's index is made with, by bucket (none: it grows as it fills).
    room: hashbrown::HashMap<i64, usize>,
    /// With direct indexes: per dimension of the table, the slots between two of its value
    /// ids (the product of the later dimensions' id ranges)...
    strides: Option<Vec<usize>>,
    /// ... and per bucket, each slot's group + 1 (0 for none), `size` slots each.
    slots: Vec<Vec<u32>>,
    size: usize,
}

/// The most slots a bucket's direct index holds (a table whose dimensions' id ranges
/// multiply to more is hashed): 256 KiB a bucket.
const MOST_SLOTS: usize = 1 << 16;

impl BucketIndex {
    /// Direct indexes, if the dimensions' id ranges (`ranges`, ids from 0) multiply to at most
    /// [`MOST_SLOTS`] and no bucket is indexed yet. Every key looked up must then hold ids in
    /// those ranges (a day's dictionary is complete before any table folds a row).
    fn direct(&mut self, ranges: &[usize]) {
        let mut strides = vec![0; ranges.len()];
        let mut size = 1usize;
        for (stride, &range) in strides.iter_mut().zip(ranges).rev() {
            *stride = size;
            size = match size.checked_mul(range.max(1)) {
                Some(s) if s <= MOST_SLOTS => s,
                _ => return,
            };
        }
        if self.of_bucket.is_empty() {
            self.strides = Some(strides);
            self.size = size;
        }
    }

    /// Where `bucket`'s index is (made if new, by `make`).
    #[inline]
    fn place(&mut self, bucket: i64, make: impl FnOnce(&mut Self)) -> usize {
        match self.last {
            Some((b, at)) if b == bucket => at,
            _ => {
                let next = self.of_bucket.len();
                let at = *self.of_bucket.entry(bucket).or_insert(next);
                if at == next {
                    make(self);
                }
                self.last = Some((bucket, at));
                at
            }
        }
    }

    /// The index of `bucket`'s groups.
    #[inline]
    fn of(&mut self, bucket: i64) -> &mut HashTable<u32> {
        let at = self.place(bucket, |index| {
            let room = index.room.get(&bucket).copied().unwrap_or(0);
            index.indexes.push(HashTable::with_capacity(room));
        });
        &mut self.indexes[at]
    }

    /// The direct index of `bucket`'s groups.
    #[inline]
    fn slots_of(&mut self, bucket: i64) -> &mut Vec<u32> {
        let at = self.place(bucket, |index| index.slots.push(vec![0; index.size]));
        &mut self.slots[at]
    }
}

/// Which groups of a table one part of it holds: those whose key hash, in 24 bits that
/// neither the hash table's bucket index (low bits) nor its tag (the top seven) use, falls in
/// the `index`th of `parts` equal ranges.
#[derive(Debug, Clone, Copy)]
struct Share {
    index: u64,
    parts: u64,
}

impl Share {
    const ALL: Share = Share { index: 0, parts: 1 };

    #[inline]
    fn holds(self, hash: u64) -> bool {
        // The 24 bits scaled to `parts`: no division a row.
        self.parts == 1 || (((hash >> 40) & 0xff_ffff) * self.parts) >> 24 == self.index
    }
}

/// A key's hash: its words folded by multiply-rotate (keys are a few words; a general
/// byte hasher costs more than the lookup).
#[inline]
fn hash_key(key: &[u32]) -> u64 {
    let mut h: u64 = 0x243f_6a88_85a3_08d3;
    for &w in key {
        h = (h ^ u64::from(w))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
    h ^ (h >> 32)
}

#[inline]
fn same(a: &[u32], b: &[u32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x == y)
}

/// The view's own rows (named [`BASE_ROLLUP`]) and every rollup's, from `input`: a day's
/// events (`events`: a distinct value may come again within a group) or the first phase's
/// rows (each value once a group), with the distinct field in column `distinct`, when the
/// view has one distinct metric; otherwise the view's final rows. Every other metric's
/// partials are in columns named as its batch columns. `threads` share the tables. Events'
/// distinct values are numbered here, unless `numbered` holds their arrays.
pub(crate) fn build(
    view: &ViewDef,
    input: &[RecordBatch],
    distinct: Option<&str>,
    events: bool,
    numbered: Option<&NumberedArrays>,
    threads: usize,
) -> Result<Vec<RecordBatch>> {
    let distinct = distinct.map(|d| (d, events));
    build_with(view, input, distinct, numbered, threads, Ways::BEST)
}

/// How [`build_with`] builds the tables: [`Ways::BEST`], or for comparison another way.
#[derive(Debug, Clone, Copy)]
struct Ways {
    /// The exact table's distinct metric kept apart ([`ExactDistinct`]), or a sketch a group.
    apart: bool,
    /// Tables of few value combinations indexed directly ([`BucketIndex::direct`]), or all
    /// hashed.
    direct: bool,
}

impl Ways {
    const BEST: Ways = Ways {
        apart: true,
        direct: true,
    };
}

/// [`build`], the tables built in `ways`.
fn build_with(
    view: &ViewDef,
    input: &[RecordBatch],
    distinct: Option<(&str, bool)>,
    numbered: Option<&NumberedArrays>,
    threads: usize,
    ways: Ways,
) -> Result<Vec<RecordBatch>> {
    let (distinct, events) = match distinct {
        Some((d, events)) => (Some(d), events),
        None => (None, false),
    };
    let dims = view.dimensions.len();
    let mut dictionary = Dictionary::new(dims);
    // The view's own table in one part per thread, each part holding a share of its groups.
    let parts = threads.max(1) as u64;
    let mut tables: Vec<Table> = (0..parts)
        .map(|index| {
            let mut t = Table::new(
                view,
                BASE_ROLLUP.to_string(),
                (0..dims).collect(),
                view.granularity,
                true,
            );
            t.share = Share { index, parts };
            if !ways.apart {
                t.distinct = None;
            }
            if events && distinct.is_some() {
                t.pairs = Some(Vec::new());
            }
            t
        })
        .collect();
    tables.extend(
        view.rollups
            .iter()
            .map(|r: &Rollup| Table::new(view, r.name(), r.dims.clone(), r.granularity, false)),
    );
    let threads = threads.clamp(1, tables.len());
    // Tables go to threads as threads come free, the largest first (the view's own parts,
    // then the rollups with the most dimensions at the finest grain): the longest jobs start
    // first. A finer table comes before any table merged from it.
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| {
        let t = &tables[i];
        (std::cmp::Reverse(t.dims.len()), t.granularity)
    });
    // A rollup that a finer rollup holds (`day.app_id` from `hour.app_id`, `day` from `hour`)
    // is merged from that one's groups once they are folded, not folded from every row:
    // thousands of groups, where the rows are millions.
    let derived: Vec<bool> = tables
        .iter()
        .map(|t| tables.iter().any(|source| t.derives_from(source)))
        .collect();
    let folded: Vec<usize> = order.iter().copied().filter(|&i| !derived[i]).collect();
    let tables: Vec<std::sync::Mutex<Table>> =
        tables.into_iter().map(std::sync::Mutex::new).collect();
    // `work` on every table of `order`, `threads` at a time, each table by the next free
    // thread.
    let each_table = |order: &[usize], work: &(dyn Fn(usize, &mut Table) + Sync)| {
        crate::value_ids::each_on(threads, order.len(), |k| {
            let i = order[k];
            let mut t = tables[i].lock().unwrap_or_else(|e| e.into_inner());
            work(i, &mut t);
        });
    };
    let (mut preparing, mut adding) = (0.0, 0.0);
    // Per table, the nanoseconds its thread spent folding rows into it.
    let folding: Vec<std::sync::atomic::AtomicU64> = (0..tables.len())
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    // Input rows are read in chunks: a rollup adds a chunk's coupons to its sketches group
    // by group, once a chunk.
    const CHUNK_ROWS: usize = 1 << 18;
    let mut start = 0;
    let mut chunks = Vec::new();
    while start < input.len() {
        let mut end = start;
        let mut rows = 0;
        while end < input.len() && (rows == 0 || rows + input[end].num_rows() <= CHUNK_ROWS) {
            rows += input[end].num_rows();
            end += 1;
        }
        let chunk = &input[start..end];
        start = end;
        if rows == 0 {
            continue;
        }
        chunks.push(chunk);
    }
    let t = std::time::Instant::now();
    let (prepared, coupons) = prepare(
        view,
        &chunks,
        distinct,
        events,
        numbered,
        &mut dictionary,
        threads,
    )?;
    drop(chunks);
    preparing += t.elapsed().as_secs_f64();
    // The view's own table holds at most a group a row: its parts, and each bucket's index
    // in them, are sized before the fold.
    let rows: usize = prepared.iter().map(|p| p.rows).sum();
    let mut per_bucket: hashbrown::HashMap<i64, usize> = hashbrown::HashMap::new();
    for p in &prepared {
        for (&b, &n) in &p.per_bucket {
            *per_bucket.entry(b).or_insert(0) += n;
        }
    }
    for t in &tables {
        let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
        // Every value id is known: a table of few value combinations indexes them directly.
        if ways.direct {
            let ranges: Vec<usize> = t
                .dims
                .iter()
                .map(|&d| dictionary.values(d).len() + 1)
                .collect();
            t.index.direct(&ranges);
        }
        if t.exact {
            let per_part = per_bucket
                .iter()
                .map(|(&b, &n)| (b, n / parts as usize + 1))
                .collect();
            t.reserve(view, rows / parts as usize + 1, per_part);
            if let Some(pairs) = &mut t.pairs {
                pairs.reserve(rows / parts as usize + 1);
            }
        }
    }
    // Each table folds every chunk on the thread that takes it: threads meet once, not once
    // a chunk, and a table's groups stay in one thread's caches.
    let t = std::time::Instant::now();
    each_table(&folded, &|i, table: &mut Table| {
        let t = std::time::Instant::now();
        for p in &prepared {
            table.add(view, p);
        }
        table.settle(view, &coupons);
        let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        folding[i].fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
    });
    drop(prepared);
    // Each merged table from its smallest folded source (a source of a source is one too),
    // the merges shared out to threads like the folds.
    let lock = |j: usize| tables[j].lock().unwrap_or_else(|e| e.into_inner());
    let mut sources = vec![None; tables.len()];
    for &i in order.iter().filter(|&&i| derived[i]) {
        let table = lock(i);
        sources[i] = folded
            .iter()
            .map(|&j| (j, lock(j)))
            .filter(|(_, s)| table.derives_from(s))
            .min_by_key(|(_, s)| s.groups())
            .map(|(j, _)| j);
    }
    let merged: Vec<usize> = order.iter().copied().filter(|&i| derived[i]).collect();
    each_table(&merged, &|i, table: &mut Table| {
        let Some(j) = sources[i] else { return };
        let source = lock(j);
        let started = std::time::Instant::now();
        table.derive(view, &source);
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        folding[i].fetch_add(ns, std::sync::atomic::Ordering::Relaxed);
        tracing::trace!(table = %table.name, from = %source.name, "merged from a finer table");
    });
    adding += t.elapsed().as_secs_f64();
    if tracing::enabled!(tracing::Level::DEBUG) {
        let per_table: Vec<String> = tables
            .iter()
            .zip(&folding)
            .map(|(t, ns)| {
                let t = t.lock().unwrap_or_else(|e| e.into_inner());
                let ns = ns.load(std::sync::atomic::Ordering::Relaxed);
                format!("{} {} groups {:.3} s", t.name, t.groups(), ns as f64 / 1e9)
            })
            .collect();
        tracing::debug!(tables = %per_table.join(", "), "rows folded into each table");
    }
    let t = std::time::Instant::now();
    let schema = view.batch_schema();
    let dictionary = &dictionary;
    let finished: Vec<std::sync::Mutex<Option<Result<RecordBatch>>>> = (0..tables.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    // Each table is written, then emptied, by the thread that takes it.
    each_table(&order, &|i, t: &mut Table| {
        if let Some(e) = t.error.take() {
            *finished[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(Err(e));
        } else if t.groups() > 0 {
            let b = t.finish(view, &schema, dictionary);
            *finished[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(b);
        }
        *t = Table::new(view, String::new(), Vec::new(), t.granularity, false);
    });
    let out = finished
        .into_iter()
        .filter_map(|f| f.into_inner().unwrap_or_else(|e| e.into_inner()))
        .collect();
    tracing::debug!(
        preparing,
        adding,
        finishing = t.elapsed().as_secs_f64(),
        "view and rollup tables"
    );
    out
}

/// The column `name` of `batch`.
fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| BatchError::BadRequest(format!("the plan lost column `{name}`")))
}

/// Reads the input's chunks for the tables: the dimension values interned on this thread,
/// chunk after chunk, while `threads` share out the rest of every chunk's reading
/// ([`prepare_values`]); this thread joins them once it has interned every chunk. Events'
/// distinct values are then numbered ([`crate::value_ids`]), unless `numbered` holds them.
/// Returns the chunks read, and the coupon of each value number.
fn prepare<'a>(
    view: &ViewDef,
    chunks: &[&[RecordBatch]],
    distinct: Option<&str>,
    events: bool,
    numbered: Option<&'a NumberedArrays>,
    dictionary: &mut Dictionary,
    threads: usize,
) -> Result<(Vec<Prepared>, Cow<'a, [CouponOf]>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let values: Vec<std::sync::Mutex<Option<Result<Prepared>>>> = (0..chunks.len())
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    let work = || loop {
        let k = next.fetch_add(1, Ordering::Relaxed);
        let Some(batches) = chunks.get(k) else {
            break;
        };
        let p = prepare_values(view, batches, distinct, events);
        *values[k].lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
    };
    let ids = std::thread::scope(|scope| {
        for _ in 1..threads.max(1) {
            scope.spawn(work);
        }
        let ids = chunks
            .iter()
            .map(|batches| {
                view.dimensions
                    .iter()
                    .enumerate()
                    .map(|(d, name)| {
                        let mut ids = Vec::new();
                        for b in *batches {
                            dictionary.intern_column_into(d, column(b, name)?, &mut ids)?;
                        }
                        Ok(ids)
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>();
        work();
        ids
    })?;
    let mut prepared = values
        .into_iter()
        .zip(ids)
        .map(|(p, ids)| {
            let mut p = p
                .into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .ok_or_else(|| {
                    datafusion::error::DataFusionError::Internal("a chunk was not read".into())
                })??;
            p.ids = ids;
            Ok(p)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut coupons = Cow::Borrowed(&[][..]);
    if let (Some(name), true) = (distinct, events) {
        let columns = chunks
            .iter()
            .map(|batches| batches.iter().map(|b| column(b, name)).collect())
            .collect::<Result<Vec<Vec<&ArrayRef>>>>()?;
        // Each chunk's numbers from the arrays numbered before, if they hold all of them.
        let known = numbered.and_then(|n| {
            let ids = columns
                .iter()
                .map(|arrays| {
                    let mut ids = Vec::new();
                    for a in arrays {
                        ids.extend_from_slice(n.ids_of(a)?);
                    }
                    Some(ids)
                })
                .collect::<Option<Vec<Vec<u32>>>>()?;
            Some((ids, Cow::Borrowed(n.coupons())))
        });
        tracing::trace!(known = known.is_some(), "distinct values numbered before");
        let (ids, numbers) = match known {
            Some(known) => known,
            None => {
                let n = crate::value_ids::number(&columns, threads)?;
                (n.ids, Cow::Owned(n.coupons))
            }
        };
        for (p, ids) in prepared.iter_mut().zip(ids) {
            p.value_ids = ids;
        }
        coupons = numbers;
    }
    // Each chunk's keys laid out a row at a time (and events' coupons taken by their value
    // numbers), the chunks shared out to the threads.
    let per_thread = prepared.len().div_ceil(threads.max(1)).max(1);
    let numbers: &[CouponOf] = &coupons;
    std::thread::scope(|scope| {
        for share in prepared.chunks_mut(per_thread) {
            scope.spawn(move || {
                for p in share {
                    p.lay_out_keys();
                    p.take_coupons(numbers);
                }
            });
        }
    });
    Ok((prepared, coupons))
}

impl Prepared {
    /// Each row's distinct value (whether it is there, its coupon) from its value number, if
    /// the rows have them.
    fn take_coupons(&mut self, coupons: &[CouponOf]) {
        if self.value_ids.is_empty() {
            return;
        }
        self.present = self.value_ids.iter().map(|&id| id != 0).collect();
        (self.bits, self.coupons) = self
            .value_ids
            .iter()
            .map(|&id| coupons.get(id as usize).copied().unwrap_or((0, None)))
            .unzip();
    }

    /// Lays each row's bucket and value ids out in [`Self::keys`], counting the rows of each
    /// bucket.
    fn lay_out_keys(&mut self) {
        let width = 2 + self.ids.len();
        let mut keys = Vec::with_capacity(self.rows * width);
        // Rows come in runs of a bucket: a run is counted at once.
        let mut run: Option<(i64, usize)> = None;
        for (row, &bucket) in self.buckets.iter().enumerate() {
            match &mut run {
                Some((b, n)) if *b == bucket => *n += 1,
                _ => {
                    if let Some((b, n)) = run.replace((bucket, 1)) {
                        *self.per_bucket.entry(b).or_insert(0) += n;
                    }
                }
            }
            keys.push(bucket as u32);
            keys.push((bucket >> 32) as u32);
            keys.extend(
                self.ids
                    .iter()
                    .map(|ids| ids.get(row).copied().unwrap_or(0)),
            );
        }
        if let Some((b, n)) = run {
            *self.per_bucket.entry(b).or_insert(0) += n;
        }
        self.keys = keys;
        self.buckets = Vec::new();
        self.ids = Vec::new();
    }
}

/// [`prepare`]'s part that needs no dictionary and no other chunk: each row's distinct value
/// (present, coupon, bits; events' are taken from their value numbers instead) and every
/// other metric's state.
fn prepare_values(
    view: &ViewDef,
    batches: &[RecordBatch],
    distinct: Option<&str>,
    events: bool,
) -> Result<Prepared> {
    let n: usize = batches.iter().map(RecordBatch::num_rows).sum();
    let mut buckets = Vec::with_capacity(n);
    // Events' distinct values are numbered once all chunks are read ([`prepare`]).
    let distinct = distinct.filter(|_| !events);
    let rows_of = |n| if distinct.is_some() { n } else { 0 };
    let mut present = vec![false; rows_of(n)];
    let mut coupons = vec![None; rows_of(n)];
    let mut bits = vec![0; rows_of(n)];
    let mut partials: Vec<StateColumn> = Vec::new();
    let mut at = 0;
    for batch in batches {
        let len = batch.num_rows();
        // Floored to the view's granularity here, once a row, rather than by every table.
        let granularity = view.granularity;
        buckets.extend(
            column(batch, BUCKET_COLUMN)?
                .as_primitive::<TimestampMicrosecondType>()
                .values()
                .iter()
                .map(|&b| granularity.floor(b)),
        );
        if let Some(name) = distinct {
            let values = column(batch, name)?;
            for (row, p) in present[at..at + len].iter_mut().enumerate() {
                *p = values.is_valid(row);
            }
            let (coupons, bits) = (&mut coupons[at..at + len], &mut bits[at..at + len]);
            for_each_value(values, None, |row, v| {
                (bits[row], coupons[row]) = coupon_of(v);
            })?;
        }
        let metrics = view
            .metrics
            .iter()
            .filter(|m| m.kind != MetricKind::Distinct);
        for (k, m) in metrics.enumerate() {
            let columns = m
                .batch_fields()
                .iter()
                .map(|f| column(batch, f.name()).cloned())
                .collect::<Result<Vec<ArrayRef>>>()?;
            let p = StateColumn::of(m, &columns)?;
            match partials.get_mut(k) {
                Some(all) => all.append(p),
                None => partials.push(p),
            }
        }
        at += len;
    }
    Ok(Prepared {
        keys: Vec::new(),
        rows: n,
        per_bucket: hashbrown::HashMap::new(),
        buckets,
        ids: Vec::new(),
        present,
        coupons,
        bits,
        value_ids: Vec::new(),
        partials,
    })
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use datafusion::arrow::array::{Decimal128Array, Float64Array, Int64Array};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// The first phase's rows of a cube view: groups holding 0 to 20 distinct device ids
    /// (past a list's 7, into a hash set and past it), with null and empty ids and a repeated
    /// one, in rows spread over the groups.
    fn first_phase(view: &ViewDef) -> RecordBatch {
        let mut rows: Vec<(i64, String, Option<String>)> = Vec::new();
        for group in 0..60usize {
            let devices = group % 21;
            for d in 0..devices {
                rows.push((
                    group as i64,
                    format!("app-{group}"),
                    Some(format!("dev-{d}")),
                ));
            }
            match group % 4 {
                0 => rows.push((group as i64, format!("app-{group}"), None)),
                1 => rows.push((group as i64, format!("app-{group}"), Some(String::new()))),
                2 => rows.push((group as i64, format!("app-{group}"), Some("dev-0".into()))),
                _ => {}
            }
        }
        // Rows of a group are not consecutive.
        rows.sort_by_key(|(g, _, d)| (d.clone(), *g));
        let n = rows.len();
        let buckets = TimestampMicrosecondArray::from_iter_values(
            rows.iter()
                .map(|(g, _, _)| 1_700_000_000_000_000 + g * 3_600_000_000),
        )
        .with_timezone("UTC");
        let mut fields = vec![Field::new(
            BUCKET_COLUMN,
            buckets.data_type().clone(),
            false,
        )];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(buckets)];
        for (i, d) in view.dimensions.iter().enumerate() {
            let column: StringArray = match i {
                0 => rows.iter().map(|(_, a, _)| Some(a.as_str())).collect(),
                _ => rows.iter().map(|_| Some("x")).collect(),
            };
            fields.push(Field::new(d, DataType::Utf8, true));
            columns.push(Arc::new(column));
        }
        fields.push(Field::new("device_id", DataType::Utf8, true));
        columns.push(Arc::new(
            rows.iter()
                .map(|(_, _, d)| d.as_deref())
                .collect::<StringArray>(),
        ));
        for m in view
            .metrics
            .iter()
            .filter(|m| m.kind != MetricKind::Distinct)
        {
            for f in m.batch_fields() {
                let column: ArrayRef = match f.data_type() {
                    DataType::Int64 => Arc::new(Int64Array::from_iter_values((0..n).map(|_| 1))),
                    DataType::Float64 => {
                        Arc::new(Float64Array::from_iter_values((0..n).map(|_| 1.5)))
                    }
                    DataType::Decimal128(p, s) => Arc::new(
                        Decimal128Array::from_iter_values((0..n).map(|r| r as i128))
                            .with_precision_and_scale(*p, *s)
                            .unwrap(),
                    ),
                    other => panic!("no test column of type {other}"),
                };
                fields.push(Field::new(f.name(), f.data_type().clone(), true));
                columns.push(column);
            }
        }
        RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
    }

    /// A cube view of the reference schema: two dimensions, a count, a distinct count and a
    /// decimal sum.
    fn cube_view() -> ViewDef {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let schemas = tandem_core::schema::load_schemas(&root.join("schemas")).unwrap();
        ViewDef::from_toml(
            Path::new("cube.toml"),
            r#"kind = "view"
source = "app_events"
granularity = "hour"
dimensions = ["app_id", "media_source"]
metrics = [
  { name = "events", kind = "count" },
  { name = "devices", kind = "distinct", field = "device_id" },
  { name = "revenue_usd", kind = "sum", field = "revenue_usd" },
]"#,
            &schemas,
        )
        .unwrap()
    }

    /// A dimension's texts copied in fixed runs read back as the values they are: short,
    /// empty, as long as a run and longer, not ASCII, and null.
    #[test]
    fn texts_copied_in_runs_are_the_values() {
        let values: Vec<String> = [
            "",
            "US",
            "com.example.app001",
            &"x".repeat(PADDED),
            &"y".repeat(PADDED + 1),
            "googleadwords_int_c02 \u{e9}t\u{e9} \u{1f600} and a long tail",
            "\u{e9}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut ids: Vec<u32> = (0..200).map(|i| (i * 7 % 8) as u32).collect();
        ids.extend([0, 0, 7, 6, 5, 4, 3, 2, 1]);
        let got = texts_of(&values, ids.iter().copied(), ids.len());
        let want: StringArray = ids
            .iter()
            .map(|&id| (id != 0).then(|| values[id as usize - 1].as_str()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got.null_count(), ids.iter().filter(|&&i| i == 0).count());
        let none = texts_of(&values, std::iter::empty(), 0);
        assert_eq!(none.len(), 0);
    }

    #[test]
    fn the_views_distinct_kept_apart_is_what_a_sketch_a_group_gives() {
        let view = cube_view();
        let input = first_phase(&view);
        for threads in [1, 2] {
            let built = |apart| {
                build_with(
                    &view,
                    std::slice::from_ref(&input),
                    Some(("device_id", true)),
                    None,
                    threads,
                    Ways {
                        apart,
                        direct: true,
                    },
                )
                .unwrap()
            };
            let (apart, sketched) = (built(true), built(false));
            assert_eq!(apart.len(), sketched.len());
            for (a, s) in apart.iter().zip(&sketched) {
                assert_eq!(a, s, "{threads} threads");
            }
            let own: usize = apart
                .iter()
                .filter(|b| {
                    b.column_by_name(ROLLUP)
                        .is_some_and(|r| r.as_string::<i32>().value(0) == BASE_ROLLUP)
                })
                .map(RecordBatch::num_rows)
                .sum();
            assert_eq!(own, 60);
        }
    }

    /// Every row of `batches` as text, sorted, a sketch by its estimate: what the rows answer,
    /// whatever the order of the rows and of a sketch's coupons.
    fn answers(batches: &[RecordBatch]) -> Vec<String> {
        let mut out = Vec::new();
        for b in batches {
            for row in 0..b.num_rows() {
                let cells: Vec<String> = b
                    .schema()
                    .fields()
                    .iter()
                    .zip(b.columns())
                    .map(
                        |(f, c)| match (f.name().ends_with("__hll"), c.is_null(row)) {
                            (true, false) => {
                                let bytes = c.as_binary::<i32>().value(row);
                                let d = DistinctState::from_parts(bytes, None).unwrap();
                                format!("{:.6}", d.estimate())
                            }
                            _ => datafusion::arrow::util::display::array_value_to_string(c, row)
                                .unwrap(),
                        },
                    )
                    .collect();
                out.push(cells.join("|"));
            }
        }
        out.sort();
        out
    }

    /// Events repeating a device within a group (every event three times, in other orders,
    /// across batches of any size) build the rows that their first phase (the events grouped by
    /// the keys and the device, DataFusion summing the partials) builds, and each group of the
    /// view's own rows counts its devices exactly.
    #[tokio::test]
    async fn events_repeating_a_value_build_what_their_first_phase_builds() {
        use datafusion::arrow::array::UInt32Array;
        use datafusion::arrow::compute::{concat_batches, take};
        use datafusion::functions_aggregate::expr_fn::sum;
        use datafusion::prelude::{ident, SessionContext};

        let view = cube_view();
        let once = first_phase(&view);
        let n = once.num_rows() as u32;
        let reversed = UInt32Array::from_iter_values((0..n).rev());
        let shuffled = UInt32Array::from_iter_values((0..n).map(|i| (i * 7 + 3) % n));
        let mut parts = vec![once.clone()];
        for order in [&reversed, &shuffled] {
            let columns = once
                .columns()
                .iter()
                .map(|c| take(c.as_ref(), order, None).unwrap())
                .collect();
            parts.push(RecordBatch::try_new(once.schema(), columns).unwrap());
        }
        let events = concat_batches(&once.schema(), &parts).unwrap();
        let total = events.num_rows();
        let mut split = Vec::new();
        let mut at = 0;
        for len in [0, 7, 0, 50, 1, total] {
            let len = len.min(total - at);
            split.push(events.slice(at, len));
            at += len;
        }

        let ctx = SessionContext::new();
        ctx.register_batch("events", events.clone()).unwrap();
        let mut keys = vec![ident(BUCKET_COLUMN)];
        keys.extend(view.dimensions.iter().map(ident));
        keys.push(ident("device_id"));
        let grouped = ctx
            .table("events")
            .await
            .unwrap()
            .aggregate(
                keys,
                vec![
                    sum(ident("events")).alias("events"),
                    sum(ident("revenue_usd")).alias("revenue_usd"),
                ],
            )
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert!(grouped.iter().map(RecordBatch::num_rows).sum::<usize>() < total);

        // Each (bucket, app) group's devices, counted from the events.
        let mut devices: std::collections::HashMap<
            (i64, String),
            std::collections::HashSet<String>,
        > = Default::default();
        let bucket = events.column(0).as_primitive::<TimestampMicrosecondType>();
        let app = events.column_by_name("app_id").unwrap().as_string::<i32>();
        let device = events
            .column_by_name("device_id")
            .unwrap()
            .as_string::<i32>();
        for row in 0..total {
            let held = devices
                .entry((
                    view.granularity.floor(bucket.value(row)),
                    app.value(row).to_string(),
                ))
                .or_default();
            if device.is_valid(row) {
                held.insert(device.value(row).to_string());
            }
        }

        for threads in [1, 2] {
            let from_events = build(&view, &split, Some("device_id"), true, None, threads).unwrap();
            let from_groups =
                build(&view, &grouped, Some("device_id"), false, None, threads).unwrap();
            assert_eq!(
                answers(&from_events),
                answers(&from_groups),
                "{threads} threads"
            );
            // The same events, their values numbered before (as a day's shared read numbers
            // them), build the same rows, byte for byte.
            let devices_of = |b: &RecordBatch| b.column_by_name("device_id").unwrap().clone();
            let numbered =
                NumberedArrays::of(split.iter().map(devices_of).collect(), threads).unwrap();
            let from_numbered = build(
                &view,
                &split,
                Some("device_id"),
                true,
                Some(&numbered),
                threads,
            )
            .unwrap();
            assert_eq!(from_numbered, from_events, "{threads} threads");
            // Every table hashed, none indexed directly: the same rows, byte for byte.
            let hashed = Ways {
                apart: true,
                direct: false,
            };
            let distinct = Some(("device_id", true));
            let all_hashed = build_with(&view, &split, distinct, None, threads, hashed).unwrap();
            assert_eq!(all_hashed, from_events, "{threads} threads");
            let mut own = 0;
            for b in from_events.iter().filter(|b| {
                b.column_by_name(ROLLUP)
                    .is_some_and(|r| r.as_string::<i32>().value(0) == BASE_ROLLUP)
            }) {
                let bucket = b.column(0).as_primitive::<TimestampMicrosecondType>();
                let app = b.column_by_name("app_id").unwrap().as_string::<i32>();
                let exact = b
                    .column_by_name("devices")
                    .unwrap()
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
                for row in 0..b.num_rows() {
                    let want = devices[&(bucket.value(row), app.value(row).to_string())].len();
                    assert_eq!(
                        exact.value(row) as usize,
                        want,
                        "{threads} threads, row {row}"
                    );
                    own += 1;
                }
            }
            assert_eq!(own, devices.len());
        }
    }

    /// A rollup's sketch of a group is, byte for byte, the sketch the library builds from the
    /// group's values in the order of their rows, whatever the groups the rows between them
    /// fall in, and past a list, a set and into an HLL array (the images hold the order).
    #[test]
    fn a_rollups_sketch_is_the_librarys_of_its_rows_in_order() {
        let view = cube_view();
        let hour = 3_600_000_000i64;
        let start = 1_700_000_000_000_000 / hour * hour;
        // (bucket, app, media source, device): 4 apps, 2 hours, rows of a group far apart.
        let rows: Vec<(i64, String, String, Option<String>)> = (0..12_000usize)
            .map(|i| {
                let device = match i % 97 {
                    0 => None,
                    _ => Some(format!("dev-{}", (i * 7919) % (1500 + 500 * (i % 4)))),
                };
                (
                    start + ((i / 5) % 2) as i64 * hour + (i % 1000) as i64,
                    format!("app-{}", i % 4),
                    format!("m-{}", i % 3),
                    device,
                )
            })
            .collect();
        let n = rows.len();
        let schema = view.batch_schema();
        let mut fields = vec![Field::new(
            BUCKET_COLUMN,
            DataType::Timestamp(
                datafusion::arrow::datatypes::TimeUnit::Microsecond,
                Some("UTC".into()),
            ),
            false,
        )];
        let mut columns: Vec<ArrayRef> = vec![Arc::new(
            TimestampMicrosecondArray::from_iter_values(rows.iter().map(|r| r.0))
                .with_timezone("UTC"),
        )];
        for (name, values) in [
            (
                "app_id",
                rows.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
            ),
            ("media_source", rows.iter().map(|r| r.2.as_str()).collect()),
        ] {
            fields.push(Field::new(name, DataType::Utf8, true));
            columns.push(Arc::new(StringArray::from(values)));
        }
        fields.push(Field::new("device_id", DataType::Utf8, true));
        columns.push(Arc::new(
            rows.iter().map(|r| r.3.as_deref()).collect::<StringArray>(),
        ));
        for name in ["events", "revenue_usd"] {
            let f = schema.field_with_name(name).unwrap();
            let column: ArrayRef = match f.data_type() {
                DataType::Int64 => Arc::new(Int64Array::from_iter_values((0..n).map(|_| 1))),
                DataType::Decimal128(p, s) => Arc::new(
                    Decimal128Array::from_iter_values((0..n).map(|r| r as i128))
                        .with_precision_and_scale(*p, *s)
                        .unwrap(),
                ),
                other => panic!("no test column of type {other}"),
            };
            fields.push(Field::new(name, f.data_type().clone(), true));
            columns.push(column);
        }
        let input = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
        // In chunks of uneven sizes, as the day's batches come.
        let chunks = [input.slice(0, 5_000), input.slice(5_000, 7_000)];
        let lg_k = view.metrics[1].lg_k();
        for threads in [1, 2] {
            let out = build(&view, &chunks, Some("device_id"), true, None, threads).unwrap();
            let mut checked = std::collections::BTreeSet::new();
            for b in &out {
                let rollup = b
                    .column_by_name(ROLLUP)
                    .unwrap()
                    .as_string::<i32>()
                    .value(0);
                let dim = match rollup {
                    "hour.app_id" => 1,
                    "hour.media_source" => 2,
                    _ => continue,
                };
                let buckets = b.column(0).as_primitive::<TimestampMicrosecondType>();
                let keys = b
                    .column_by_name(["", "app_id", "media_source"][dim])
                    .unwrap()
                    .as_string::<i32>();
                let sketches = b.column_by_name("devices__hll").unwrap().as_binary::<i32>();
                for row in 0..b.num_rows() {
                    let mut want = DistinctState::new(lg_k);
                    let mut values = 0;
                    for r in rows.iter().filter(|r| {
                        r.0 / hour * hour == buckets.value(row)
                            && [&r.0.to_string(), &r.1, &r.2][dim] == keys.value(row)
                    }) {
                        if let Some(d) = &r.3 {
                            want.update_str(d);
                            values += 1;
                        }
                    }
                    assert!(values > 400, "a group's sketch reaches an HLL array");
                    assert_eq!(
                        sketches.value(row),
                        want.serialize().as_slice(),
                        "{rollup} row {row}, {threads} threads"
                    );
                    checked.insert((rollup.to_string(), row));
                }
            }
            assert_eq!(checked.len(), 2 * 4 + 2 * 3, "{threads} threads");
        }
    }

    /// A column of counts or sums gives the batch columns its states give, and a count too
    /// large for the column is an error, as it is from the states.
    #[test]
    fn state_columns_give_the_batch_columns_of_their_states() {
        let view = cube_view();
        for m in view
            .metrics
            .iter()
            .filter(|m| m.kind != MetricKind::Distinct)
        {
            let mut column = StateColumn::like(&m.empty_state());
            for g in 0..50u64 {
                column.push(match m.empty_state() {
                    MetricState::Count(_) => MetricState::Count(g * 3),
                    MetricState::SumInt(_) => MetricState::SumInt(i128::from(g) * 1_000 - 7),
                    MetricState::SumFloat(_) => MetricState::SumFloat(g as f64 / 3.0),
                    other => other,
                });
            }
            assert!(!matches!(column, StateColumn::States(_)), "{}", m.name);
            let states = column.states();
            let refs: Vec<&MetricState> = states.iter().collect();
            let want = m.batch_columns(&refs[..40]).unwrap();
            let got = column.batch_columns(m, 40).unwrap();
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert_eq!(a.as_ref(), b.as_ref(), "{}", m.name);
            }
        }
        let count = view
            .metrics
            .iter()
            .find(|m| m.kind == MetricKind::Count)
            .unwrap();
        let column = StateColumn::Counts(vec![1, u64::MAX]);
        assert!(column.batch_columns(count, 2).is_err());
        let states = [MetricState::Count(1), MetricState::Count(u64::MAX)];
        assert!(count.batch_columns(&[&states[0], &states[1]]).is_err());
    }

    const ROLLUP: &str = tandem_core::view::ROLLUP_COLUMN;
}
