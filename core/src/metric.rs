//! Metric states: the partial aggregates both layers produce and serving merges.
//!
//! Every state merges associatively and commutatively, so speed partitions, batch rows and
//! time rollups all combine the same way. `distinct` is an Apache DataSketches HLL sketch
//! (Hll8); a state from the batch layer also carries the exact count, which stays exact as
//! long as nothing is merged into it.

use std::fmt;

use datasketches::hash::value::raw_bytes;
use datasketches::hll::{HllSketch, HllType, HllUnion};
use serde_json::{json, Value as Json};

use crate::error::{CoreError, Result};
use crate::view::{MetricDef, MetricKind};

/// A distinct-count state.
#[derive(Clone, PartialEq)]
pub struct DistinctState {
    pub sketch: HllSketch,
    /// The exact number of distinct values, known when the batch layer computed this row and
    /// it was not merged since.
    pub exact: Option<u64>,
}

impl fmt::Debug for DistinctState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistinctState")
            .field("estimate", &self.sketch.estimate())
            .field("exact", &self.exact)
            .finish()
    }
}

impl DistinctState {
    pub fn new(lg_k: u8) -> Self {
        DistinctState {
            sketch: new_sketch(lg_k),
            exact: None,
        }
    }

    /// Adds a string value (hashed as its UTF-8 bytes, as DataSketches Java and C++ do; empty
    /// strings are skipped, as they skip them).
    pub fn update_str(&mut self, v: &str) {
        if !v.is_empty() {
            self.sketch.update(raw_bytes::from_str(v));
        }
    }

    /// Adds an integer value (hashed as its 8 little-endian bytes).
    pub fn update_i64(&mut self, v: i64) {
        self.sketch.update(raw_bytes::from_slice(&v.to_le_bytes()));
    }

    pub fn from_parts(bytes: &[u8], exact: Option<u64>) -> Result<Self> {
        let sketch = HllSketch::deserialize(bytes).map_err(|e| CoreError::Sketch(e.to_string()))?;
        Ok(DistinctState { sketch, exact })
    }

    pub fn estimate(&self) -> f64 {
        self.sketch.estimate()
    }

    /// Folds `other` in: a sketch union; the exact count survives only a merge with nothing.
    pub fn merge(&mut self, other: &DistinctState) {
        let mut union = HllUnion::new(self.sketch.lg_config_k().max(other.sketch.lg_config_k()))
            .expect("lg_k comes from a valid sketch");
        union.update(&self.sketch);
        union.update(&other.sketch);
        self.sketch = union.to_sketch(HllType::Hll8);
        self.exact = match (self.exact, other.exact) {
            // Merging with an empty state keeps exactness.
            (Some(a), _) if other.sketch.is_empty() => Some(a),
            (_, Some(b)) if self.exact == Some(0) => Some(b),
            _ => None,
        };
    }
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
}

impl MetricState {
    /// The empty state of `metric`.
    pub fn empty(metric: &MetricDef) -> Self {
        use crate::schema::FieldType::Float;
        match (metric.kind, metric.field_type == Some(Float)) {
            (MetricKind::Count, _) => MetricState::Count(0),
            (MetricKind::Sum, false) => MetricState::SumInt(0),
            (MetricKind::Sum, true) => MetricState::SumFloat(0.0),
            (MetricKind::Min, false) => MetricState::MinInt(None),
            (MetricKind::Min, true) => MetricState::MinFloat(None),
            (MetricKind::Max, false) => MetricState::MaxInt(None),
            (MetricKind::Max, true) => MetricState::MaxFloat(None),
            (MetricKind::Distinct, _) => {
                MetricState::Distinct(Box::new(DistinctState::new(metric.lg_k())))
            }
        }
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
            (a, b) => panic!("merging states of different metrics: {a:?} and {b:?}; this is a bug"),
        }
    }

    /// The value served for this state, as JSON. Distinct values say whether they are exact
    /// and, if not, their relative standard error.
    pub fn to_json(&self, metric: &MetricDef) -> Json {
        use MetricState::*;
        let int = |v: i128| -> Json {
            match metric.scale() {
                Some(s) if s > 0 => json!(v as f64 / 10f64.powi(s as i32)),
                _ => i64::try_from(v)
                    .map(Json::from)
                    .unwrap_or_else(|_| json!(v as f64)),
            }
        };
        let time_or_int = |v: i128| -> Json {
            if metric.field_type == Some(crate::schema::FieldType::Timestamp) {
                json!(crate::time::format_us(v as i64))
            } else {
                int(v)
            }
        };
        match self {
            Count(c) => json!(c),
            SumInt(v) => int(*v),
            SumFloat(v) => json!(v),
            MinInt(v) | MaxInt(v) => v.map(time_or_int).unwrap_or(Json::Null),
            MinFloat(v) | MaxFloat(v) => v.map(|v| json!(v)).unwrap_or(Json::Null),
            Distinct(d) => match d.exact {
                Some(n) => json!({ "value": n, "exact": true }),
                None => json!({
                    "value": d.estimate().round() as u64,
                    "exact": false,
                    "rse": (hll_rse(d.sketch.lg_config_k()) * 1e4).round() / 1e4,
                }),
            },
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
            _ => None,
        }
    }

    /// The value of a float sum, min or max; `None` if empty or not a float.
    pub fn as_float(&self) -> Option<f64> {
        use MetricState::*;
        match self {
            SumFloat(v) => Some(*v),
            MinFloat(v) | MaxFloat(v) => *v,
            _ => None,
        }
    }

    /// A plain number for CSV output and comparisons.
    pub fn as_f64(&self, metric: &MetricDef) -> Option<f64> {
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

    fn sketch_of(range: std::ops::Range<u32>) -> DistinctState {
        let mut d = DistinctState::new(12);
        for i in range {
            d.update_str(&format!("device-{i}"));
        }
        d
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
    fn sketch_round_trips_and_exactness_is_lost_on_merge() {
        let mut a = sketch_of(0..100);
        a.exact = Some(100);
        let back = DistinctState::from_parts(&a.sketch.serialize(), Some(100)).unwrap();
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
}
