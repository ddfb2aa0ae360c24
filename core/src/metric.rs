//! Metric kinds, in one place: what each kind of metric reads, its partial state, how an event
//! updates the state, how states merge, how a state is stored in and read back from a batch
//! view's columns, and how it is answered (its Arrow column; JSON and CSV print from that).
//! The batch layer's aggregate expressions for each kind sit in one function beside its plan
//! (`tandem_batch::compute::metric_exprs`).
//!
//! Every state merges associatively and commutatively, so speed partitions, batch rows and
//! time rollups all combine the same way. `distinct` is an Apache DataSketches HLL sketch
//! (Hll8); a state from the batch layer also carries the exact count, which stays exact as
//! long as nothing is merged into it.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Float64Array, Int64Array, StructArray,
    TimestampMicrosecondArray, UInt64Array,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, DataType, Decimal128Type, Field, Float64Type, Int64Type,
    TimestampMicrosecondType,
};
use datasketches::hash::value::raw_bytes;
pub use datasketches::hll::Coupon;
use datasketches::hll::{HllSketch, HllType, HllUnion};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::schema::FieldType;

/// Default log2 register count of HLL sketches: relative standard error 1.04/sqrt(4096) = 1.6 %.
pub const DEFAULT_LG_K: u8 = 12;

/// The widest decimal Arrow holds; sums of decimal fields use it.
pub const DECIMAL_PRECISION: u8 = 38;

/// Digits an average of an int or decimal field keeps beyond the field's own scale.
pub const AVG_EXTRA_SCALE: u8 = 6;

/// What a metric computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    /// Number of events (exact).
    Count,
    /// Sum of a numeric field (exact for int and decimal fields).
    Sum,
    /// Smallest value of a numeric or timestamp field.
    Min,
    /// Largest value of a numeric or timestamp field.
    Max,
    /// Distinct values of a field: exact in batch, an HLL sketch in speed and in rollups.
    Distinct,
    /// Mean of a numeric field: kept as an exact sum and a count, so it rolls up exactly.
    Avg,
}

impl MetricKind {
    /// Every kind, in the order messages list them.
    pub const ALL: [MetricKind; 6] = [
        MetricKind::Count,
        MetricKind::Sum,
        MetricKind::Min,
        MetricKind::Max,
        MetricKind::Distinct,
        MetricKind::Avg,
    ];

    /// The name in a view file.
    pub fn as_str(self) -> &'static str {
        match self {
            MetricKind::Count => "count",
            MetricKind::Sum => "sum",
            MetricKind::Min => "min",
            MetricKind::Max => "max",
            MetricKind::Distinct => "distinct",
            MetricKind::Avg => "avg",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether the kind reads a field of type `ty` (`None`: no field). The error says why not.
    pub fn check_field(self, ty: Option<FieldType>) -> std::result::Result<(), String> {
        let ok = match (self, ty) {
            (MetricKind::Count, None) => return Ok(()),
            (MetricKind::Count, Some(_)) => return Err("count takes no field".into()),
            (_, None) => return Err(format!("{} needs a field", self.as_str())),
            (MetricKind::Sum | MetricKind::Avg, Some(t)) => t.is_numeric(),
            (MetricKind::Min | MetricKind::Max, Some(t)) => {
                t.is_numeric() || t == FieldType::Timestamp
            }
            (MetricKind::Distinct, Some(t)) => t != FieldType::Float,
        };
        match (ok, ty) {
            (true, _) => Ok(()),
            (false, Some(t)) => Err(format!(
                "{} does not apply to a {} field",
                self.as_str(),
                t.name()
            )),
            (false, None) => Err(format!("{} needs a field", self.as_str())),
        }
    }
}

impl fmt::Display for MetricKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One metric of a view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricDef {
    pub name: String,
    pub kind: MetricKind,
    /// The event field it reads (none for `count`).
    pub field: Option<String>,
    /// The field's type (none for `count`).
    #[serde(skip)]
    pub field_type: Option<FieldType>,
    /// log2 of the HLL sketch's register count, for `distinct` (4..=21, default 12).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lg_k: Option<u8>,
}

impl MetricDef {
    /// The decimal scale of the value, if it is a decimal.
    pub fn scale(&self) -> Option<u8> {
        match (self.kind, self.field_type) {
            (MetricKind::Avg, Some(FieldType::Int)) => Some(AVG_EXTRA_SCALE),
            (MetricKind::Avg, Some(FieldType::Decimal { scale })) => Some(scale + AVG_EXTRA_SCALE),
            (
                MetricKind::Sum | MetricKind::Min | MetricKind::Max,
                Some(FieldType::Decimal { scale }),
            ) => Some(scale),
            _ => None,
        }
    }

    pub fn lg_k(&self) -> u8 {
        self.lg_k.unwrap_or(DEFAULT_LG_K)
    }

    /// The columns this metric keeps in a batch view table, in order: first its value (named
    /// as the metric), then any parts serving needs to merge it (a distinct's sketch).
    pub fn batch_fields(&self) -> Vec<Field> {
        let value = |ty: DataType| Field::new(&self.name, ty, true);
        match (self.kind, self.field_type) {
            (MetricKind::Count, _) => vec![value(DataType::Int64)],
            (MetricKind::Distinct, _) => vec![
                value(DataType::Int64),
                Field::new(format!("{}__hll", self.name), DataType::Binary, true),
            ],
            (MetricKind::Sum, Some(FieldType::Decimal { scale })) => {
                vec![value(DataType::Decimal128(DECIMAL_PRECISION, scale as i8))]
            }
            // An average is stored as its exact parts.
            (MetricKind::Avg, t) => vec![
                Field::new(
                    format!("{}__sum", self.name),
                    match t {
                        Some(FieldType::Decimal { scale }) => {
                            DataType::Decimal128(DECIMAL_PRECISION, scale as i8)
                        }
                        Some(FieldType::Float) => DataType::Float64,
                        _ => DataType::Int64,
                    },
                    true,
                ),
                Field::new(format!("{}__count", self.name), DataType::Int64, true),
            ],
            (_, Some(t)) => vec![value(t.arrow_type())],
            (_, None) => vec![value(DataType::Int64)],
        }
    }

    /// The empty state.
    pub fn empty_state(&self) -> MetricState {
        let float = self.field_type == Some(FieldType::Float);
        match (self.kind, float) {
            (MetricKind::Count, _) => MetricState::Count(0),
            (MetricKind::Sum, false) => MetricState::SumInt(0),
            (MetricKind::Sum, true) => MetricState::SumFloat(0.0),
            (MetricKind::Min, false) => MetricState::MinInt(None),
            (MetricKind::Min, true) => MetricState::MinFloat(None),
            (MetricKind::Max, false) => MetricState::MaxInt(None),
            (MetricKind::Max, true) => MetricState::MaxFloat(None),
            (MetricKind::Distinct, _) => {
                MetricState::Distinct(Box::new(DistinctState::new(self.lg_k())))
            }
            (MetricKind::Avg, false) => MetricState::AvgInt { sum: 0, n: 0 },
            (MetricKind::Avg, true) => MetricState::AvgFloat { sum: 0.0, n: 0 },
        }
    }

    /// Every row's state of `columns` (the metric's batch columns), as
    /// [`Self::state_from_batch`] gives it row by row: counts and sums of 64-bit columns are
    /// read a column at a time.
    pub fn states_from_batch(&self, columns: &[ArrayRef]) -> Result<Vec<MetricState>> {
        let value = &columns[0];
        let nulls = value.logical_nulls();
        // Each row's state from its value, a null row's from the type's zero.
        fn each<T: ArrowPrimitiveType>(
            value: &ArrayRef,
            nulls: Option<&NullBuffer>,
            state: impl Fn(T::Native) -> MetricState,
        ) -> Vec<MetricState> {
            let values = value.as_primitive::<T>().values();
            values
                .iter()
                .enumerate()
                .map(|(row, &v)| match nulls {
                    Some(n) if n.is_null(row) => state(T::Native::default()),
                    _ => state(v),
                })
                .collect()
        }
        let nulls = nulls.as_ref();
        Ok(match (self.empty_state(), value.data_type()) {
            (MetricState::Count(_), DataType::Int64) => {
                each::<Int64Type>(value, nulls, |v| MetricState::Count(v as u64))
            }
            (MetricState::SumInt(_), DataType::Int64) => {
                each::<Int64Type>(value, nulls, |v| MetricState::SumInt(v as i128))
            }
            // A decimal's sum is kept in units of its scale: the column's own values.
            (MetricState::SumInt(_), DataType::Decimal128(..)) => {
                each::<Decimal128Type>(value, nulls, MetricState::SumInt)
            }
            (MetricState::SumFloat(_), DataType::Float64) => {
                each::<Float64Type>(value, nulls, MetricState::SumFloat)
            }
            _ => (0..value.len())
                .map(|row| self.state_from_batch(columns, row))
                .collect::<Result<_>>()?,
        })
    }

    /// The state stored in row `row` of this metric's batch view columns (as [`batch_fields`]
    /// lists them).
    ///
    /// [`batch_fields`]: MetricDef::batch_fields
    pub fn state_from_batch(&self, columns: &[ArrayRef], row: usize) -> Result<MetricState> {
        let value = &columns[0];
        let null = value.is_null(row);
        let int = || cell_i128(value, row);
        let float = || value.as_primitive::<Float64Type>().value(row);
        Ok(match self.empty_state() {
            MetricState::Count(_) => MetricState::Count(if null { 0 } else { int()? as u64 }),
            MetricState::SumInt(_) => MetricState::SumInt(if null { 0 } else { int()? }),
            MetricState::SumFloat(_) => MetricState::SumFloat(if null { 0.0 } else { float() }),
            MetricState::MinInt(_) => MetricState::MinInt((!null).then(int).transpose()?),
            MetricState::MaxInt(_) => MetricState::MaxInt((!null).then(int).transpose()?),
            MetricState::MinFloat(_) => MetricState::MinFloat((!null).then(float)),
            MetricState::MaxFloat(_) => MetricState::MaxFloat((!null).then(float)),
            MetricState::AvgInt { .. } | MetricState::AvgFloat { .. } => {
                let count = columns.get(1).ok_or_else(|| {
                    CoreError::Internal(format!("`{}` has no count column", self.name))
                })?;
                let n = if count.is_null(row) {
                    0
                } else {
                    cell_i128(count, row)? as u64
                };
                match (null, value.data_type()) {
                    (true, DataType::Float64) => MetricState::AvgFloat { sum: 0.0, n },
                    (false, DataType::Float64) => MetricState::AvgFloat { sum: float(), n },
                    (true, _) => MetricState::AvgInt { sum: 0, n },
                    (false, _) => MetricState::AvgInt { sum: int()?, n },
                }
            }
            MetricState::Distinct(empty) => {
                let sketch = columns.get(1).ok_or_else(|| {
                    CoreError::Sketch(format!("`{}` has no sketch column", self.name))
                })?;
                if sketch.is_null(row) {
                    MetricState::Distinct(empty)
                } else {
                    let exact = if null { None } else { Some(int()? as u64) };
                    MetricState::Distinct(Box::new(DistinctState::from_parts(
                        binary_cell(sketch, row)?,
                        exact,
                    )?))
                }
            }
        })
    }

    /// The batch view columns ([`batch_fields`]) of these states, one row each: the inverse of
    /// [`state_from_batch`]. A distinct state that was merged (a rollup's) has a null value
    /// column: only its sketch says how many.
    ///
    /// [`batch_fields`]: MetricDef::batch_fields
    /// [`state_from_batch`]: MetricDef::state_from_batch
    pub fn batch_columns(&self, states: &[&MetricState]) -> Result<Vec<ArrayRef>> {
        /// One cell of a batch column.
        enum Cell {
            Null,
            Int(i128),
            Float(f64),
            Bytes(Vec<u8>),
        }
        // Each part's cells, made as its column is built (a table's states are millions).
        let cells = |part: usize| {
            use MetricState::*;
            let opt_int = |v: &Option<i128>| v.map_or(Cell::Null, Cell::Int);
            let opt_float = |v: &Option<f64>| v.map_or(Cell::Null, Cell::Float);
            states.iter().map(move |s| match (s, part) {
                (Count(n), 0) => Cell::Int(*n as i128),
                (SumInt(v), 0) => Cell::Int(*v),
                (SumFloat(v), 0) => Cell::Float(*v),
                (MinInt(v) | MaxInt(v), 0) => opt_int(v),
                (MinFloat(v) | MaxFloat(v), 0) => opt_float(v),
                (AvgInt { sum, .. }, 0) => Cell::Int(*sum),
                (AvgFloat { sum, .. }, 0) => Cell::Float(*sum),
                (AvgInt { n, .. } | AvgFloat { n, .. }, 1) => Cell::Int(*n as i128),
                (Distinct(d), 0) => d.exact.map_or(Cell::Null, |n| Cell::Int(n as i128)),
                (Distinct(d), 1) => Cell::Bytes(d.serialize()),
                _ => Cell::Null,
            })
        };
        let mut out = Vec::new();
        for (part, field) in self.batch_fields().iter().enumerate() {
            let ints = || {
                cells(part).map(|c| match c {
                    Cell::Int(v) => Some(v),
                    _ => None,
                })
            };
            let to_i64 = |v: i128| {
                i64::try_from(v).map_err(|_| {
                    CoreError::Internal(format!("`{}`: {v} does not fit in 64 bits", self.name))
                })
            };
            let column: ArrayRef = match field.data_type() {
                DataType::Int64 => Arc::new(
                    ints()
                        .map(|v| v.map(to_i64).transpose())
                        .collect::<Result<Int64Array>>()?,
                ),
                DataType::Timestamp(_, tz) => Arc::new(
                    ints()
                        .map(|v| v.map(to_i64).transpose())
                        .collect::<Result<TimestampMicrosecondArray>>()?
                        .with_timezone_opt(tz.clone()),
                ),
                DataType::Decimal128(p, s) => {
                    Arc::new(Decimal128Array::from_iter(ints()).with_precision_and_scale(*p, *s)?)
                }
                DataType::Float64 => {
                    Arc::new(Float64Array::from_iter(cells(part).map(|c| match c {
                        Cell::Float(v) => Some(v),
                        _ => None,
                    })))
                }
                DataType::Binary => {
                    let mut b = datafusion::arrow::array::BinaryBuilder::new();
                    for c in cells(part) {
                        match c {
                            Cell::Bytes(bytes) => b.append_value(&bytes),
                            _ => b.append_null(),
                        }
                    }
                    Arc::new(b.finish())
                }
                other => {
                    return Err(CoreError::Internal(format!(
                        "`{}`: no batch column of type {other}",
                        self.name
                    )))
                }
            };
            out.push(column);
        }
        Ok(out)
    }

    /// The Arrow type of this metric in an answer. Counts are UInt64; sums of int and decimal
    /// fields Decimal128 (exact); float metrics Float64; min and max keep their field's type;
    /// a distinct is a struct of `value`, `exact` and `rse`.
    pub fn answer_type(&self) -> DataType {
        match (self.kind, self.field_type) {
            (MetricKind::Count, _) => DataType::UInt64,
            (MetricKind::Distinct, _) => DataType::Struct(distinct_fields().into()),
            (_, Some(FieldType::Float)) => DataType::Float64,
            (_, Some(FieldType::Timestamp)) => crate::schema::timestamp_type(),
            (MetricKind::Sum | MetricKind::Avg, _) | (_, Some(FieldType::Decimal { .. })) => {
                DataType::Decimal128(DECIMAL_PRECISION, self.scale().unwrap_or(0) as i8)
            }
            _ => DataType::Int64,
        }
    }

    /// The answer column of these states (one per row; `None` for a missing state).
    pub fn answer_column<'a>(
        &self,
        states: impl Iterator<Item = Option<&'a MetricState>>,
    ) -> Result<ArrayRef> {
        let states: Vec<Option<&MetricState>> = states.collect();
        let ints = || states.iter().map(|s| s.and_then(|s| s.as_i128()));
        let column: ArrayRef = match self.answer_type() {
            DataType::UInt64 => Arc::new(UInt64Array::from_iter(
                ints().map(|v| v.and_then(|v| u64::try_from(v).ok())),
            )),
            DataType::Struct(_) => {
                let parts: Vec<(u64, bool, Option<f64>)> = states
                    .iter()
                    .map(|s| match s {
                        Some(MetricState::Distinct(d)) => match d.exact {
                            Some(n) => (n, true, None),
                            None => (d.estimate().round() as u64, false, Some(hll_rse(d.lg_k()))),
                        },
                        _ => (0, false, None),
                    })
                    .collect();
                let fields = distinct_fields();
                Arc::new(StructArray::new(
                    fields.into(),
                    vec![
                        Arc::new(UInt64Array::from_iter_values(parts.iter().map(|p| p.0))),
                        Arc::new(BooleanArray::from_iter(parts.iter().map(|p| Some(p.1)))),
                        Arc::new(Float64Array::from_iter(
                            parts.iter().map(|p| p.2.map(|r| (r * 1e4).round() / 1e4)),
                        )),
                    ],
                    None,
                ))
            }
            DataType::Float64 => Arc::new(Float64Array::from_iter(
                states.iter().map(|s| s.and_then(MetricState::as_float)),
            )),
            DataType::Timestamp(..) => Arc::new(
                TimestampMicrosecondArray::from_iter(
                    ints().map(|v| v.and_then(|v| i64::try_from(v).ok())),
                )
                .with_timezone("UTC"),
            ),
            DataType::Decimal128(p, s) => {
                Arc::new(Decimal128Array::from_iter(ints()).with_precision_and_scale(p, s)?)
            }
            _ => Arc::new(Int64Array::from_iter(
                ints().map(|v| v.and_then(|v| i64::try_from(v).ok())),
            )),
        };
        Ok(column)
    }
}

/// The fields of a distinct metric's answer: its value, whether it is exact, and if not, the
/// sketch's relative standard error.
fn distinct_fields() -> Vec<Field> {
    vec![
        Field::new("value", DataType::UInt64, false),
        Field::new("exact", DataType::Boolean, false),
        Field::new("rse", DataType::Float64, true),
    ]
}

/// An integer cell of a batch view column (Int64, Decimal128 in units, or timestamp µs).
fn cell_i128(col: &ArrayRef, row: usize) -> Result<i128> {
    Ok(match col.data_type() {
        DataType::Decimal128(..) => col.as_primitive::<Decimal128Type>().value(row),
        DataType::Timestamp(..) => {
            col.as_primitive::<TimestampMicrosecondType>().value(row) as i128
        }
        DataType::Int64 => col.as_primitive::<Int64Type>().value(row) as i128,
        other => {
            let cast = datafusion::arrow::compute::cast(&col.slice(row, 1), &DataType::Int64)
                .map_err(|e| CoreError::Sketch(format!("a {other} cell: {e}")))?;
            cast.as_primitive::<Int64Type>().value(0) as i128
        }
    })
}

fn binary_cell(col: &ArrayRef, row: usize) -> Result<&[u8]> {
    match col.data_type() {
        DataType::Binary => Ok(col.as_binary::<i32>().value(row)),
        DataType::LargeBinary => Ok(col.as_binary::<i64>().value(row)),
        DataType::BinaryView => Ok(col.as_binary_view().value(row)),
        other => Err(CoreError::Sketch(format!(
            "a sketch column of type {other}"
        ))),
    }
}

/// A distinct-count state.
///
/// A state that nothing was merged into is its sketch. The first merge opens an HLL union that
/// later merges and updates fold into, so rolling many rows' sketches up into one group costs
/// one union, not a new union and two copies per row.
#[derive(Clone)]
pub struct DistinctState {
    /// The values seen, while nothing was merged in.
    sketch: HllSketch,
    /// This state and everything merged into it, once anything was.
    union: Option<HllUnion>,
    /// The exact number of distinct values, known when the batch layer computed this row and
    /// it was not merged since.
    pub exact: Option<u64>,
}

impl PartialEq for DistinctState {
    fn eq(&self, other: &Self) -> bool {
        self.exact == other.exact && self.serialize() == other.serialize()
    }
}

impl fmt::Debug for DistinctState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistinctState")
            .field("estimate", &self.estimate())
            .field("exact", &self.exact)
            .finish()
    }
}

impl DistinctState {
    pub fn new(lg_k: u8) -> Self {
        DistinctState {
            sketch: new_sketch(lg_k),
            union: None,
            exact: None,
        }
    }

    /// Adds a string value (hashed as its UTF-8 bytes, as DataSketches Java and C++ do; empty
    /// strings are skipped, as they skip them).
    pub fn update_str(&mut self, v: &str) {
        if !v.is_empty() {
            match &mut self.union {
                Some(u) => u.update_value(raw_bytes::from_str(v)),
                None => self.sketch.update(raw_bytes::from_str(v)),
            }
        }
    }

    /// Adds an integer value (hashed as its 8 little-endian bytes).
    pub fn update_i64(&mut self, v: i64) {
        let bytes = v.to_le_bytes();
        match &mut self.union {
            Some(u) => u.update_value(raw_bytes::from_slice(&bytes)),
            None => self.sketch.update(raw_bytes::from_slice(&bytes)),
        }
    }

    /// The coupon a string value adds to a sketch (`None` for the empty string, which
    /// sketches skip): computed once, it can be added to many sketches ([`Self::update_coupon`]).
    pub fn coupon_of_str(v: &str) -> Option<Coupon> {
        (!v.is_empty()).then(|| Coupon::from_value(raw_bytes::from_str(v)))
    }

    /// The coupon an integer value adds to a sketch (see [`Self::coupon_of_str`]).
    pub fn coupon_of_i64(v: i64) -> Coupon {
        Coupon::from_value(raw_bytes::from_slice(&v.to_le_bytes()))
    }

    /// Adds a value by its coupon: the same as adding the value.
    pub fn update_coupon(&mut self, c: Coupon) {
        match &mut self.union {
            Some(u) => {
                let mut one = new_sketch(self.sketch.lg_config_k().max(4));
                one.update_with_coupon(c);
                u.update(&one);
            }
            None => self.sketch.update_with_coupon(c),
        }
    }

    /// The bits of [`Self::coupon_of_str`]'s coupon (`None` for the empty string), for
    /// [`Self::write_list`]: never 0.
    pub fn coupon_bits_of_str(v: &str) -> Option<u32> {
        (!v.is_empty()).then(|| coupon_bits(v.as_bytes()))
    }

    /// The bits of [`Self::coupon_of_i64`]'s coupon.
    pub fn coupon_bits_of_i64(v: i64) -> u32 {
        coupon_bits(&v.to_le_bytes())
    }

    /// Appends to `out` the serialized sketch (as [`Self::serialize`] gives it) of `lg_k`
    /// holding the coupons `bits` (distinct, in the order they were added, at most
    /// [`LIST_COUPONS`]): the compact list image of the DataSketches format, written without
    /// building a sketch.
    pub fn write_list(lg_k: u8, bits: &[u32], out: &mut Vec<u8>) {
        debug_assert!(bits.len() <= LIST_COUPONS);
        let flags = LIST_COMPACT | if bits.is_empty() { LIST_EMPTY } else { 0 };
        out.extend_from_slice(&[
            LIST_PREINTS,
            SERIAL_VERSION,
            HLL_FAMILY,
            lg_k,
            LIST_LG_ARR,
            flags,
            bits.len() as u8,
            LIST_MODE_HLL8,
        ]);
        for b in bits {
            out.extend_from_slice(&b.to_le_bytes());
        }
    }

    /// The state of `lg_k` holding the coupons `bits` (as [`Self::write_list`] takes them),
    /// ready for more ([`Self::update_coupon`]).
    pub fn from_list(lg_k: u8, bits: &[u32], exact: Option<u64>) -> Result<Self> {
        let mut image = Vec::with_capacity(8 + 4 * bits.len());
        Self::write_list(lg_k, bits, &mut image);
        Self::from_parts(&image, exact)
    }

    pub fn from_parts(bytes: &[u8], exact: Option<u64>) -> Result<Self> {
        let sketch = HllSketch::deserialize(bytes).map_err(|e| CoreError::Sketch(e.to_string()))?;
        Ok(DistinctState {
            sketch,
            union: None,
            exact,
        })
    }

    pub fn estimate(&self) -> f64 {
        match &self.union {
            Some(u) => u.estimate(),
            None => self.sketch.estimate(),
        }
    }

    /// log2 of the register count.
    pub fn lg_k(&self) -> u8 {
        match &self.union {
            Some(u) => u.lg_config_k(),
            None => self.sketch.lg_config_k(),
        }
    }

    pub fn is_empty(&self) -> bool {
        match &self.union {
            Some(u) => u.is_empty(),
            None => self.sketch.is_empty(),
        }
    }

    /// The sketch in the DataSketches format (HLL_8).
    pub fn serialize(&self) -> Vec<u8> {
        match &self.union {
            Some(u) => u.to_sketch(HllType::Hll8).serialize(),
            None => self.sketch.serialize(),
        }
    }

    /// Bytes held.
    pub fn estimated_size(&self) -> usize {
        match &self.union {
            Some(u) => u.estimated_size(),
            None => self.sketch.estimated_size(),
        }
    }

    /// Folds `other` in: a sketch union; the exact count survives only a merge with nothing.
    pub fn merge(&mut self, other: &DistinctState) {
        self.exact = match (self.exact, other.exact) {
            // Merging with an empty state keeps exactness.
            (Some(a), _) if other.is_empty() => Some(a),
            (_, Some(b)) if self.exact == Some(0) => Some(b),
            _ => None,
        };
        let union = match &mut self.union {
            Some(u) => u,
            None => {
                let lg_k = self.sketch.lg_config_k().max(other.lg_k());
                let mut u = HllUnion::new(lg_k).expect("lg_k comes from a valid sketch");
                u.update(&self.sketch);
                self.sketch = new_sketch(4);
                self.union.insert(u)
            }
        };
        match &other.union {
            Some(o) => union.update(&o.to_sketch(HllType::Hll8)),
            None => union.update(&other.sketch),
        }
    }
}

/// The most coupons an HLL sketch keeps as a list: the next one makes it a hash set (or, with
/// fewer than 256 registers, an array).
pub const LIST_COUPONS: usize = 7;

// The compact list image of the DataSketches HLL format (`hll/serialization.rs` of the
// `datasketches` crate, and the Java and C++ libraries): preamble ints, serial version,
// family, lg_k, lg of the list's array (8 slots), flags, coupon count, mode (list, HLL_8).
const LIST_PREINTS: u8 = 2;
const SERIAL_VERSION: u8 = 1;
const HLL_FAMILY: u8 = 7;
const LIST_LG_ARR: u8 = 3;
const LIST_EMPTY: u8 = 4;
const LIST_COMPACT: u8 = 8;
const LIST_MODE_HLL8: u8 = 2 << 2;

/// The coupon of a value's bytes, as `datasketches::hll::Coupon::from_value` computes it
/// (whose bits the crate keeps private): MurmurHash3 x64 128 with the DataSketches seed, the
/// low 26 bits of the first word as the slot, and one more than the second word's leading
/// zeros (at most 63) as the value above them.
fn coupon_bits(bytes: &[u8]) -> u32 {
    let (lo, hi) = murmur3_x64_128(bytes, 9001);
    let slot = lo as u32 & ((1 << 26) - 1);
    let value = hi.leading_zeros().min(62) + 1;
    (value << 26) | slot
}

/// MurmurHash3's x64 128-bit variant (Austin Appleby's reference, public domain).
fn murmur3_x64_128(bytes: &[u8], seed: u64) -> (u64, u64) {
    const C1: u64 = 0x87c3_7b91_1142_53d5;
    const C2: u64 = 0x4cf5_ad43_2745_937f;
    fn fmix64(mut k: u64) -> u64 {
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
    fn word(b: &[u8]) -> u64 {
        b.iter()
            .enumerate()
            .fold(0, |w, (i, &x)| w | (u64::from(x) << (8 * i)))
    }
    let mix1 = |k: u64| k.wrapping_mul(C1).rotate_left(31).wrapping_mul(C2);
    let mix2 = |k: u64| k.wrapping_mul(C2).rotate_left(33).wrapping_mul(C1);
    let (mut h1, mut h2) = (seed, seed);
    let mut blocks = bytes.chunks_exact(16);
    for b in &mut blocks {
        let k1 = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let k2 = u64::from_le_bytes(b[8..].try_into().expect("8 bytes"));
        h1 ^= mix1(k1);
        h1 = h1
            .rotate_left(27)
            .wrapping_add(h2)
            .wrapping_mul(5)
            .wrapping_add(0x52dc_e729);
        h2 ^= mix2(k2);
        h2 = h2
            .rotate_left(31)
            .wrapping_add(h1)
            .wrapping_mul(5)
            .wrapping_add(0x3849_5ab5);
    }
    let tail = blocks.remainder();
    if tail.len() > 8 {
        h2 ^= mix2(word(&tail[8..]));
    }
    if !tail.is_empty() {
        h1 ^= mix1(word(&tail[..tail.len().min(8)]));
    }
    h1 ^= bytes.len() as u64;
    h2 ^= bytes.len() as u64;
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 = h1.wrapping_add(h2);
    h2 = h2.wrapping_add(h1);
    (h1, h2)
}

/// A new empty HLL sketch with `lg_k` registers.
pub fn new_sketch(lg_k: u8) -> HllSketch {
    HllSketch::new(lg_k, HllType::Hll8).expect("lg_k is checked when the view loads")
}

/// The relative standard error of an HLL sketch of `lg_k` (1.04 / sqrt(2^lg_k)).
pub fn hll_rse(lg_k: u8) -> f64 {
    1.04 / ((1u64 << lg_k) as f64).sqrt()
}

/// The partial aggregate of one metric.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricState {
    Count(u64),
    /// Sum of an int field, or of a decimal field in units of its scale.
    SumInt(i128),
    SumFloat(f64),
    /// Min / max of an int, decimal (in units) or timestamp (in microseconds) field.
    MinInt(Option<i128>),
    MaxInt(Option<i128>),
    MinFloat(Option<f64>),
    MaxFloat(Option<f64>),
    Distinct(Box<DistinctState>),
    /// Sum (in units, for int and decimal fields) and count of an average.
    AvgInt {
        sum: i128,
        n: u64,
    },
    AvgFloat {
        sum: f64,
        n: u64,
    },
}

impl MetricState {
    /// Folds row `row` of `input` (the metric's field column; `None` for a count) into the
    /// state. Null values change nothing but a count.
    pub fn update(&mut self, input: Option<&ArrayRef>, row: usize) {
        let Some(col) = input else {
            if let MetricState::Count(c) = self {
                *c += 1;
            }
            return;
        };
        if col.is_null(row) {
            return;
        }
        let int = || -> i128 {
            match col.data_type() {
                DataType::Decimal128(..) => col.as_primitive::<Decimal128Type>().value(row),
                DataType::Timestamp(..) => {
                    col.as_primitive::<TimestampMicrosecondType>().value(row) as i128
                }
                _ => col.as_primitive::<Int64Type>().value(row) as i128,
            }
        };
        let float = || col.as_primitive::<Float64Type>().value(row);
        match self {
            MetricState::Count(c) => *c += 1,
            MetricState::SumInt(s) => *s += int(),
            MetricState::SumFloat(s) => *s += float(),
            MetricState::MinInt(m) => *m = Some(m.map_or(int(), |v| v.min(int()))),
            MetricState::MaxInt(m) => *m = Some(m.map_or(int(), |v| v.max(int()))),
            MetricState::MinFloat(m) => *m = Some(m.map_or(float(), |v| v.min(float()))),
            MetricState::MaxFloat(m) => *m = Some(m.map_or(float(), |v| v.max(float()))),
            MetricState::AvgInt { sum, n } => {
                *sum += int();
                *n += 1;
            }
            MetricState::AvgFloat { sum, n } => {
                *sum += float();
                *n += 1;
            }
            MetricState::Distinct(d) => match col.data_type() {
                DataType::Utf8 => d.update_str(col.as_string::<i32>().value(row)),
                DataType::Boolean => d.update_str(if col.as_boolean().value(row) {
                    "true"
                } else {
                    "false"
                }),
                _ => d.update_i64(int() as i64),
            },
        }
    }

    /// Appends the state to `out` (a tag and its values; a distinct count as its sketch in the
    /// DataSketches format), as [`MetricState::decode`] reads it back.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use crate::codec::Put;
        use MetricState::*;
        let opt_i = |out: &mut Vec<u8>, v: &Option<i128>| match v {
            Some(v) => (out.put_u8(1), out.put_i128(*v)).0,
            None => out.put_u8(0),
        };
        let opt_f = |out: &mut Vec<u8>, v: &Option<f64>| match v {
            Some(v) => (out.put_u8(1), out.put_f64(*v)).0,
            None => out.put_u8(0),
        };
        match self {
            Count(c) => (out.put_u8(0), out.put_u64(*c)).0,
            SumInt(v) => (out.put_u8(1), out.put_i128(*v)).0,
            SumFloat(v) => (out.put_u8(2), out.put_f64(*v)).0,
            MinInt(v) => (out.put_u8(3), opt_i(out, v)).0,
            MaxInt(v) => (out.put_u8(4), opt_i(out, v)).0,
            MinFloat(v) => (out.put_u8(5), opt_f(out, v)).0,
            MaxFloat(v) => (out.put_u8(6), opt_f(out, v)).0,
            Distinct(d) => {
                out.put_u8(7);
                match d.exact {
                    Some(n) => (out.put_u8(1), out.put_u64(n)).0,
                    None => out.put_u8(0),
                }
                out.put_bytes(&d.serialize());
            }
            AvgInt { sum, n } => (out.put_u8(8), out.put_i128(*sum), out.put_u64(*n)).0,
            AvgFloat { sum, n } => (out.put_u8(9), out.put_f64(*sum), out.put_u64(*n)).0,
        }
    }

    /// Reads back a state [`MetricState::encode`] wrote.
    pub fn decode(
        r: &mut crate::codec::Reader<'_>,
    ) -> std::result::Result<Self, crate::codec::Malformed> {
        use crate::codec::Malformed;
        use MetricState::*;
        fn opt<T>(
            r: &mut crate::codec::Reader<'_>,
            f: impl Fn(&mut crate::codec::Reader<'_>) -> std::result::Result<T, Malformed>,
        ) -> std::result::Result<Option<T>, Malformed> {
            match r.u8()? {
                0 => Ok(None),
                1 => f(r).map(Some),
                t => Err(Malformed(format!("option tag {t}"))),
            }
        }
        Ok(match r.u8()? {
            0 => Count(r.u64()?),
            1 => SumInt(r.i128()?),
            2 => SumFloat(r.f64()?),
            3 => MinInt(opt(r, |r| r.i128())?),
            4 => MaxInt(opt(r, |r| r.i128())?),
            5 => MinFloat(opt(r, |r| r.f64())?),
            6 => MaxFloat(opt(r, |r| r.f64())?),
            7 => {
                let exact = opt(r, |r| r.u64())?;
                let sketch = r.bytes()?;
                Distinct(Box::new(
                    DistinctState::from_parts(sketch, exact)
                        .map_err(|e| Malformed(e.to_string()))?,
                ))
            }
            8 => AvgInt {
                sum: r.i128()?,
                n: r.u64()?,
            },
            9 => AvgFloat {
                sum: r.f64()?,
                n: r.u64()?,
            },
            t => return Err(Malformed(format!("metric state tag {t}"))),
        })
    }

    /// Folds `other` (a state of the same metric) into `self`.
    pub fn merge(&mut self, other: &MetricState) {
        use MetricState::*;
        match (self, other) {
            (Count(a), Count(b)) => *a += b,
            (SumInt(a), SumInt(b)) => *a += b,
            (SumFloat(a), SumFloat(b)) => *a += b,
            (MinInt(a), MinInt(b)) => *a = opt(*a, *b, i128::min),
            (MaxInt(a), MaxInt(b)) => *a = opt(*a, *b, i128::max),
            (MinFloat(a), MinFloat(b)) => *a = opt(*a, *b, f64::min),
            (MaxFloat(a), MaxFloat(b)) => *a = opt(*a, *b, f64::max),
            (Distinct(a), Distinct(b)) => a.merge(b),
            (AvgInt { sum: a, n: m }, AvgInt { sum: b, n }) => (*a += b, *m += n).1,
            (AvgFloat { sum: a, n: m }, AvgFloat { sum: b, n }) => (*a += b, *m += n).1,
            (a, b) => panic!("merging states of different metrics: {a:?} and {b:?}; this is a bug"),
        }
    }

    /// The integer value of a count, or of a sum, min or max of an int, decimal (in units of
    /// its scale) or timestamp field; `None` if empty or not an integer.
    pub fn as_i128(&self) -> Option<i128> {
        use MetricState::*;
        match self {
            Count(c) => Some(*c as i128),
            SumInt(v) => Some(*v),
            MinInt(v) | MaxInt(v) => *v,
            // The mean in units of the field's scale plus AVG_EXTRA_SCALE, rounded half away
            // from zero; none for no values (or a sum too large to scale).
            AvgInt { sum, n } if *n > 0 => {
                let num = sum.checked_mul(10i128.pow(AVG_EXTRA_SCALE as u32))?;
                let (den, q, r) = (*n as i128, num / *n as i128, num % *n as i128);
                Some(if 2 * r.abs() >= den {
                    q + num.signum()
                } else {
                    q
                })
            }
            _ => None,
        }
    }

    /// The value of a float sum, min or max; `None` if empty or not a float.
    pub fn as_float(&self) -> Option<f64> {
        use MetricState::*;
        match self {
            SumFloat(v) => Some(*v),
            MinFloat(v) | MaxFloat(v) => *v,
            AvgFloat { sum, n } if *n > 0 => Some(sum / *n as f64),
            _ => None,
        }
    }

    /// The value as a plain number, to order rows by.
    pub fn sort_key(&self, metric: &MetricDef) -> Option<f64> {
        use MetricState::*;
        let scaled = |v: i128| match metric.scale() {
            Some(s) => v as f64 / 10f64.powi(s as i32),
            None => v as f64,
        };
        match self {
            Count(c) => Some(*c as f64),
            SumInt(v) => Some(scaled(*v)),
            SumFloat(v) => Some(*v),
            MinInt(v) | MaxInt(v) => v.map(scaled),
            MinFloat(v) | MaxFloat(v) => *v,
            AvgInt { .. } => self.as_i128().map(scaled),
            AvgFloat { .. } => self.as_float(),
            Distinct(d) => Some(
                d.exact
                    .map(|n| n as f64)
                    .unwrap_or_else(|| d.estimate().round()),
            ),
        }
    }
}

fn opt<T: Copy>(a: Option<T>, b: Option<T>, f: fn(T, T) -> T) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(f(a, b)),
        (a, None) => a,
        (None, b) => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// A metric `m` of `kind` over a field `f` of `field_type` (none for a count).
    fn def(kind: MetricKind, field_type: Option<FieldType>) -> MetricDef {
        MetricDef {
            name: "m".into(),
            kind,
            field: field_type.map(|_| "f".into()),
            field_type,
            lg_k: None,
        }
    }

    fn sketch_of(range: std::ops::Range<u32>) -> DistinctState {
        let mut d = DistinctState::new(12);
        for i in range {
            d.update_str(&format!("device-{i}"));
        }
        d
    }

    #[test]
    fn a_list_written_from_coupon_bits_is_the_sketch_the_library_serializes() {
        // Strings of every length around MurmurHash3's 16-byte blocks, integers, and up to a
        // full list, so the hash's tail and the image's count are both covered.
        let strings: Vec<String> = (0..40).map(|n| "d".repeat(n + 1)).collect();
        for lg_k in [4, 11, 12, 21] {
            for n in 0..=LIST_COUPONS {
                let mut by_library = DistinctState::new(lg_k);
                let mut bits = Vec::new();
                for s in strings.iter().skip(n * 3).take(n) {
                    by_library.update_str(s);
                    bits.push(DistinctState::coupon_bits_of_str(s).expect("not empty"));
                }
                let mut written = Vec::new();
                DistinctState::write_list(lg_k, &bits, &mut written);
                assert_eq!(written, by_library.serialize(), "lg_k {lg_k}, {n} strings");
                let read = DistinctState::from_list(lg_k, &bits, None).expect("a valid image");
                assert_eq!(read.serialize(), by_library.serialize());
            }
            let mut by_library = DistinctState::new(lg_k);
            let values = [0i64, -1, 7, i64::MAX, i64::MIN, 1 << 40];
            let bits: Vec<u32> = values
                .iter()
                .map(|&v| {
                    by_library.update_i64(v);
                    DistinctState::coupon_bits_of_i64(v)
                })
                .collect();
            let mut written = Vec::new();
            DistinctState::write_list(lg_k, &bits, &mut written);
            assert_eq!(written, by_library.serialize(), "lg_k {lg_k}, integers");
        }
        assert_eq!(DistinctState::coupon_bits_of_str(""), None);
        // A full list given more coupons becomes what the library makes of them all.
        let mut by_library = DistinctState::new(12);
        let full: Vec<u32> = strings[..LIST_COUPONS]
            .iter()
            .map(|s| DistinctState::coupon_bits_of_str(s).expect("not empty"))
            .collect();
        let mut listed = DistinctState::from_list(12, &full, None).expect("a valid image");
        for (i, s) in strings.iter().take(LIST_COUPONS + 30).enumerate() {
            by_library.update_str(s);
            if i >= LIST_COUPONS {
                listed.update_coupon(DistinctState::coupon_of_str(s).expect("not empty"));
            }
        }
        assert_eq!(listed.serialize(), by_library.serialize());
    }

    #[test]
    fn every_state_reads_back_as_it_was_written() {
        let mut merged = MetricState::Distinct(Box::new(sketch_of(0..1_000)));
        merged.merge(&MetricState::Distinct(Box::new(sketch_of(500..2_000))));
        let mut exact = sketch_of(0..10);
        exact.exact = Some(10);
        let states = [
            MetricState::Count(42),
            MetricState::SumInt(-(1i128 << 100)),
            MetricState::SumFloat(2.5),
            MetricState::MinInt(None),
            MetricState::MaxInt(Some(9)),
            MetricState::MinFloat(Some(-1.0)),
            MetricState::MaxFloat(None),
            MetricState::Distinct(Box::new(exact)),
            merged,
            MetricState::AvgInt { sum: 7, n: 2 },
            MetricState::AvgFloat { sum: 7.5, n: 3 },
        ];
        let mut bytes = Vec::new();
        for s in &states {
            s.encode(&mut bytes);
        }
        let mut r = crate::codec::Reader::new(&bytes);
        for s in &states {
            let back = MetricState::decode(&mut r).unwrap();
            match (s, &back) {
                (MetricState::Distinct(a), MetricState::Distinct(b)) => {
                    assert_eq!(a.estimate(), b.estimate());
                    assert_eq!(a.exact, b.exact);
                }
                _ => assert_eq!(s, &back),
            }
        }
        assert_eq!(r.remaining(), 0);
        assert!(MetricState::decode(&mut crate::codec::Reader::new(&[42])).is_err());
        assert!(MetricState::decode(&mut crate::codec::Reader::new(&bytes[..3])).is_err());
    }

    #[test]
    fn sketches_merge_commutatively_and_associatively_within_bound() {
        let (a, b, c) = (
            sketch_of(0..30_000),
            sketch_of(20_000..60_000),
            sketch_of(50_000..90_000),
        );
        let m = |x: &DistinctState, y: &DistinctState| {
            let mut s = MetricState::Distinct(Box::new(x.clone()));
            s.merge(&MetricState::Distinct(Box::new(y.clone())));
            match s {
                MetricState::Distinct(d) => *d,
                _ => unreachable!(),
            }
        };
        let ab_c = m(&m(&a, &b), &c);
        let a_bc = m(&a, &m(&b, &c));
        let cb_a = m(&m(&c, &b), &a);
        let exact: HashSet<u32> = (0..90_000).collect();
        for est in [ab_c.estimate(), a_bc.estimate(), cb_a.estimate()] {
            let err = (est - exact.len() as f64).abs() / exact.len() as f64;
            assert!(err <= 3.0 * hll_rse(12), "error {err}");
        }
        assert_eq!(ab_c.estimate(), a_bc.estimate());
        assert_eq!(ab_c.estimate(), cb_a.estimate());
    }

    #[test]
    fn states_round_trip_through_batch_columns() {
        let mut merged = MetricState::Distinct(Box::new(sketch_of(0..100)));
        merged.merge(&MetricState::Distinct(Box::new(sketch_of(50..200))));
        let mut exact = sketch_of(0..10);
        exact.exact = Some(10);
        let dec = Some(FieldType::Decimal { scale: 2 });
        let cases: Vec<(MetricDef, Vec<MetricState>)> = vec![
            (def(MetricKind::Count, None), vec![MetricState::Count(7)]),
            (
                def(MetricKind::Sum, dec),
                vec![MetricState::SumInt(-12_345)],
            ),
            (
                def(MetricKind::Sum, Some(FieldType::Int)),
                vec![MetricState::SumInt(3)],
            ),
            (
                def(MetricKind::Sum, Some(FieldType::Float)),
                vec![MetricState::SumFloat(1.5)],
            ),
            (
                def(MetricKind::Min, Some(FieldType::Timestamp)),
                vec![
                    MetricState::MinInt(Some(1_700_000_000_000_000)),
                    MetricState::MinInt(None),
                ],
            ),
            (
                def(MetricKind::Max, dec),
                vec![MetricState::MaxInt(Some(999))],
            ),
            (
                def(MetricKind::Max, Some(FieldType::Float)),
                vec![MetricState::MaxFloat(None)],
            ),
            (
                def(MetricKind::Avg, dec),
                vec![MetricState::AvgInt { sum: 1001, n: 3 }],
            ),
            (
                def(MetricKind::Avg, Some(FieldType::Float)),
                vec![MetricState::AvgFloat { sum: 2.5, n: 2 }],
            ),
            (
                def(MetricKind::Distinct, Some(FieldType::String)),
                vec![merged, MetricState::Distinct(Box::new(exact))],
            ),
        ];
        for (m, states) in cases {
            let refs: Vec<&MetricState> = states.iter().collect();
            let columns = m.batch_columns(&refs).unwrap();
            for (c, f) in columns.iter().zip(m.batch_fields()) {
                assert_eq!(c.data_type(), f.data_type(), "{:?}", m.kind);
            }
            for (row, state) in states.iter().enumerate() {
                match (m.state_from_batch(&columns, row).unwrap(), state) {
                    // A union's sketch is written in its compact form: the same registers.
                    (MetricState::Distinct(a), MetricState::Distinct(b)) => {
                        assert_eq!((a.exact, a.estimate()), (b.exact, b.estimate()))
                    }
                    (read, state) => assert_eq!(&read, state),
                }
            }
            // Read a column at a time, the same states.
            let all = m.states_from_batch(&columns).unwrap();
            assert_eq!(all.len(), states.len());
            for (row, read) in all.iter().enumerate() {
                if !matches!(read, MetricState::Distinct(_)) {
                    assert_eq!(read, &m.state_from_batch(&columns, row).unwrap());
                }
            }
        }
    }

    /// Counts and sums read a column at a time are the states read row by row, nulls
    /// included (a null count or sum is nothing counted or added).
    #[test]
    fn a_columns_states_are_its_rows_states_nulls_included() {
        // The null slots hold values (9, 7.0) that must not be read.
        let ints: ArrayRef = Arc::new(Int64Array::new(
            vec![3, 9, 4, 0].into(),
            Some(NullBuffer::from(vec![true, false, true, true])),
        ));
        let floats: ArrayRef = Arc::new(Float64Array::new(
            vec![7.0, 1.5, -2.0].into(),
            Some(NullBuffer::from(vec![false, true, true])),
        ));
        let decimals: ArrayRef = Arc::new(
            datafusion::arrow::array::Decimal128Array::new(
                vec![1_500_000, 8, -2_250_000, i128::from(i64::MAX) * 4].into(),
                Some(NullBuffer::from(vec![true, false, true, true])),
            )
            .with_precision_and_scale(DECIMAL_PRECISION, 6)
            .unwrap(),
        );
        let cases = [
            (def(MetricKind::Count, None), &ints),
            (def(MetricKind::Sum, Some(FieldType::Int)), &ints),
            (def(MetricKind::Sum, Some(FieldType::Float)), &floats),
            (
                def(MetricKind::Sum, Some(FieldType::Decimal { scale: 6 })),
                &decimals,
            ),
            // Not a fast path: read row by row.
            (def(MetricKind::Max, Some(FieldType::Int)), &ints),
        ];
        for (m, column) in cases {
            let columns = vec![Arc::clone(column)];
            let rows: Vec<MetricState> = (0..column.len())
                .map(|row| m.state_from_batch(&columns, row).unwrap())
                .collect();
            assert_eq!(m.states_from_batch(&columns).unwrap(), rows, "{:?}", m.kind);
        }
        assert_eq!(
            def(MetricKind::Sum, Some(FieldType::Float))
                .states_from_batch(&[Arc::clone(&floats)])
                .unwrap(),
            vec![
                MetricState::SumFloat(0.0),
                MetricState::SumFloat(1.5),
                MetricState::SumFloat(-2.0)
            ]
        );
    }

    #[test]
    fn sketch_round_trips_and_exactness_is_lost_on_merge() {
        let mut a = sketch_of(0..100);
        a.exact = Some(100);
        let back = DistinctState::from_parts(&a.serialize(), Some(100)).unwrap();
        assert_eq!(back.estimate(), a.estimate());
        let mut s = MetricState::Distinct(Box::new(back));
        s.merge(&MetricState::Distinct(Box::new(DistinctState::new(12))));
        assert!(matches!(&s, MetricState::Distinct(d) if d.exact == Some(100)));
        s.merge(&MetricState::Distinct(Box::new(sketch_of(50..60))));
        assert!(matches!(&s, MetricState::Distinct(d) if d.exact.is_none()));
    }

    #[test]
    fn min_max_sum_merge() {
        let mut s = MetricState::MinInt(None);
        s.merge(&MetricState::MinInt(Some(5)));
        s.merge(&MetricState::MinInt(Some(3)));
        s.merge(&MetricState::MinInt(None));
        assert_eq!(s, MetricState::MinInt(Some(3)));
        let mut t = MetricState::SumInt(499);
        t.merge(&MetricState::SumInt(1));
        assert_eq!(t, MetricState::SumInt(500));
    }

    #[test]
    fn averages_merge_their_parts_and_round_half_away_from_zero() {
        let mut a = MetricState::AvgInt { sum: 1, n: 2 };
        a.merge(&MetricState::AvgInt { sum: 0, n: 1 });
        // 1 / 3 = 0.333333|33 at six more digits.
        assert_eq!(a.as_i128(), Some(333_333));
        assert_eq!(
            MetricState::AvgInt { sum: -1, n: 2 }.as_i128(),
            Some(-500_000)
        );
        assert_eq!(
            MetricState::AvgInt { sum: 2, n: 3 }.as_i128(),
            Some(666_667)
        );
        assert_eq!(MetricState::AvgInt { sum: 5, n: 0 }.as_i128(), None);
        let mut f = MetricState::AvgFloat { sum: 1.0, n: 1 };
        f.merge(&MetricState::AvgFloat { sum: 2.0, n: 3 });
        assert_eq!(f.as_float(), Some(0.75));
    }

    #[test]
    fn kinds_check_their_fields() {
        assert!(MetricKind::Count.check_field(None).is_ok());
        assert!(MetricKind::Sum
            .check_field(Some(FieldType::String))
            .is_err());
        assert!(MetricKind::Distinct
            .check_field(Some(FieldType::Float))
            .is_err());
        assert!(MetricKind::Max
            .check_field(Some(FieldType::Timestamp))
            .is_ok());
        for k in MetricKind::ALL {
            assert_eq!(MetricKind::parse(k.as_str()), Some(k));
        }
    }
}
