//! `hll_sketch(value)`: a DataFusion aggregate that builds the same Apache DataSketches HLL
//! sketch the speed layer keeps, hashing values the same way (strings as UTF-8 bytes; integers,
//! decimals in units of their scale and timestamps in microseconds as 8 little-endian bytes;
//! booleans as "true"/"false"), so batch and speed sketches merge.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, BooleanArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, FieldRef, Int64Type, TimeUnit, TimestampMicrosecondType,
};
use datafusion::common::{Result, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use tandem_core::metric::DistinctState;

/// The aggregate for sketches of `lg_k`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct HllSketchUdaf {
    signature: Signature,
    lg_k: u8,
    name: String,
}

impl HllSketchUdaf {
    pub fn udaf(lg_k: u8) -> AggregateUDF {
        AggregateUDF::from(HllSketchUdaf {
            signature: Signature::any(1, Volatility::Immutable),
            lg_k,
            name: format!("hll_sketch_{lg_k}"),
        })
    }
}

impl AggregateUDFImpl for HllSketchUdaf {
    fn name(&self) -> &str {
        &self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Binary)
    }
    fn accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(HllAccumulator {
            state: DistinctState::new(self.lg_k),
        }))
    }
    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }
    fn create_groups_accumulator(&self, _: AccumulatorArgs) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(HllGroups {
            lg_k: self.lg_k,
            states: Vec::new(),
            bytes: 0,
        }))
    }
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "sketch"),
            DataType::Binary,
            true,
        ))])
    }
}

/// Calls `f` with each value of `v` (with its row) that `filter` keeps, hashed as
/// [`DistinctState`] hashes values of its type: strings as UTF-8, integers, decimals and
/// timestamps as 8 little-endian bytes, booleans as "true"/"false".
pub(crate) fn for_each_value(
    v: &ArrayRef,
    filter: Option<&BooleanArray>,
    mut f: impl FnMut(usize, Value<'_>),
) -> Result<()> {
    let keep = |i: usize| filter.is_none_or(|f| f.is_valid(i) && f.value(i));
    match v.data_type() {
        DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 => {
            let v = cast(v, &DataType::Int64)?;
            for (i, x) in v.as_primitive::<Int64Type>().iter().enumerate() {
                if let Some(x) = x.filter(|_| keep(i)) {
                    f(i, Value::I64(x));
                }
            }
        }
        DataType::Decimal128(..) => {
            for (i, x) in v.as_primitive::<Decimal128Type>().iter().enumerate() {
                if let Some(x) = x.filter(|_| keep(i)) {
                    f(i, Value::I64(x as i64));
                }
            }
        }
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            for (i, x) in v
                .as_primitive::<TimestampMicrosecondType>()
                .iter()
                .enumerate()
            {
                if let Some(x) = x.filter(|_| keep(i)) {
                    f(i, Value::I64(x));
                }
            }
        }
        DataType::Boolean => {
            for (i, x) in v.as_boolean().iter().enumerate() {
                if let Some(x) = x.filter(|_| keep(i)) {
                    f(i, Value::Str(if x { "true" } else { "false" }));
                }
            }
        }
        DataType::Utf8View => {
            for (i, x) in v.as_string_view().iter().enumerate() {
                if let Some(x) = x.filter(|_| keep(i)) {
                    f(i, Value::Str(x));
                }
            }
        }
        DataType::Utf8 => {
            for (i, x) in v.as_string::<i32>().iter().enumerate() {
                if let Some(x) = x.filter(|_| keep(i)) {
                    f(i, Value::Str(x));
                }
            }
        }
        _ => {
            let v = cast(v, &DataType::Utf8)?;
            for (i, x) in v.as_string::<i32>().iter().enumerate() {
                if let Some(x) = x.filter(|_| keep(i)) {
                    f(i, Value::Str(x));
                }
            }
        }
    }
    Ok(())
}

/// A value as a sketch hashes it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    I64(i64),
    Str(&'a str),
}

fn add(state: &mut DistinctState, v: Value<'_>) {
    match v {
        Value::I64(x) => state.update_i64(x),
        Value::Str(x) => state.update_str(x),
    }
}

/// The sketches of many groups at once: DataFusion hands each batch over with the group of
/// every row, so a row costs one sketch update (no per-group slicing of the batch, as the
/// one-group [`Accumulator`] path needs). A group's sketch is created with its first value.
#[derive(Debug)]
struct HllGroups {
    lg_k: u8,
    states: Vec<Option<DistinctState>>,
    /// Bytes held by the sketches, as they were created (sketches grow; this is a floor).
    bytes: usize,
}

impl HllGroups {
    fn state(&mut self, group: usize) -> &mut DistinctState {
        let (lg_k, bytes) = (self.lg_k, &mut self.bytes);
        self.states[group].get_or_insert_with(|| {
            let s = DistinctState::new(lg_k);
            *bytes += s.estimated_size();
            s
        })
    }

    fn emit(&mut self, emit_to: EmitTo) -> ArrayRef {
        let taken = emit_to.take_needed(&mut self.states);
        let mut out = BinaryBuilder::with_capacity(taken.len(), taken.len() * 16);
        for s in taken {
            match s {
                Some(s) => {
                    self.bytes = self.bytes.saturating_sub(s.estimated_size());
                    out.append_value(s.serialize());
                }
                None => out.append_value(DistinctState::new(self.lg_k).serialize()),
            }
        }
        Arc::new(out.finish())
    }
}

impl GroupsAccumulator for HllGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.states.resize_with(total_num_groups, || None);
        for_each_value(&values[0], opt_filter, |i, v| {
            add(self.state(group_indices[i]), v)
        })
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        Ok(self.emit(emit_to))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![self.emit(emit_to)])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.states.resize_with(total_num_groups, || None);
        let states = cast(&values[0], &DataType::Binary)?;
        for (i, bytes) in states.as_binary::<i32>().iter().enumerate() {
            let Some(bytes) = bytes else { continue };
            let other = DistinctState::from_parts(bytes, None)
                .map_err(|e| DataFusionError::Execution(e.to_string()))?;
            self.state(group_indices[i]).merge(&other);
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let empty = DistinctState::new(self.lg_k).serialize();
        let mut sketches: Vec<Option<Vec<u8>>> = vec![Some(empty); values[0].len()];
        for_each_value(&values[0], opt_filter, |i, v| {
            let mut s = DistinctState::new(self.lg_k);
            add(&mut s, v);
            sketches[i] = Some(s.serialize());
        })?;
        Ok(vec![Arc::new(BinaryArray::from_iter(sketches))])
    }

    fn size(&self) -> usize {
        self.states.capacity() * std::mem::size_of::<Option<DistinctState>>() + self.bytes
    }
}

#[derive(Debug)]
struct HllAccumulator {
    state: DistinctState,
}

impl Accumulator for HllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let state = &mut self.state;
        for_each_value(&values[0], None, |_, v| add(state, v))
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let states = cast(&states[0], &DataType::Binary)?;
        for bytes in states.as_binary::<i32>().iter().flatten() {
            let other = DistinctState::from_parts(bytes, None)
                .map_err(|e| DataFusionError::Execution(e.to_string()))?;
            self.state.merge(&other);
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Binary(Some(self.state.serialize())))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.state.estimated_size()
    }
}
