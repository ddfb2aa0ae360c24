//! `hll_sketch(value)`: a DataFusion aggregate that builds the same Apache DataSketches HLL
//! sketch the speed layer keeps, hashing values the same way (strings as UTF-8 bytes; integers,
//! decimals in units of their scale and timestamps in microseconds as 8 little-endian bytes;
//! booleans as "true"/"false"), so batch and speed sketches merge.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Decimal128Type, Field, FieldRef, Int64Type, TimeUnit, TimestampMicrosecondType,
};
use datafusion::common::{Result, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
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
    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format_state_name(args.name, "sketch"),
            DataType::Binary,
            true,
        ))])
    }
}

#[derive(Debug)]
struct HllAccumulator {
    state: DistinctState,
}

impl Accumulator for HllAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let v = &values[0];
        match v.data_type() {
            DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 => {
                let v = cast(v, &DataType::Int64)?;
                for x in v.as_primitive::<Int64Type>().iter().flatten() {
                    self.state.update_i64(x);
                }
            }
            DataType::Decimal128(..) => {
                for x in v.as_primitive::<Decimal128Type>().iter().flatten() {
                    self.state.update_i64(x as i64);
                }
            }
            DataType::Timestamp(TimeUnit::Microsecond, _) => {
                for x in v
                    .as_primitive::<TimestampMicrosecondType>()
                    .iter()
                    .flatten()
                {
                    self.state.update_i64(x);
                }
            }
            DataType::Boolean => {
                for x in v.as_boolean().iter().flatten() {
                    self.state.update_str(if x { "true" } else { "false" });
                }
            }
            _ => {
                let v = cast(v, &DataType::Utf8)?;
                for x in v.as_string::<i32>().iter().flatten() {
                    self.state.update_str(x);
                }
            }
        }
        Ok(())
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
