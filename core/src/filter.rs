//! A view's filter: one SQL predicate, parsed by DataFusion against the event schema. The speed
//! layer evaluates the compiled form on each decoded batch; the batch layer hands the same text
//! to DataFusion's planner. Both therefore share one parser, one type-coercion and one set of
//! functions, so the predicate means the same in both layers.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::DFSchema;
use datafusion::logical_expr::ExprSchemable;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;

use crate::error::{CoreError, Result};
use crate::schema::EventSchema;
use crate::view::ViewDef;

/// A filter ready to evaluate on batches of the schema it was compiled for.
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    expr: Arc<dyn PhysicalExpr>,
}

impl CompiledFilter {
    /// Compiles `view`'s filter, if it has one; an error names the view's file and `filter`.
    pub fn for_view(view: &ViewDef, schema: &EventSchema) -> Result<Option<Self>> {
        let Some(sql) = &view.filter else {
            return Ok(None);
        };
        Self::compile(sql, schema)
            .map(Some)
            .map_err(|e| CoreError::key(&view.path, "filter", e.to_string()))
    }

    /// Compiles a predicate over `schema`'s fields.
    pub fn compile(sql: &str, schema: &EventSchema) -> Result<Self> {
        let ctx = SessionContext::new();
        let df_schema = DFSchema::try_from(schema.arrow_schema())?;
        let expr = ctx.parse_sql_expr(sql, &df_schema)?;
        let ty = expr.get_type(&df_schema)?;
        if ty != datafusion::arrow::datatypes::DataType::Boolean {
            return Err(CoreError::BadQuery(format!(
                "the filter `{sql}` is a {ty}, not a predicate"
            )));
        }
        let expr = ctx.create_physical_expr(expr, &df_schema)?;
        Ok(CompiledFilter { expr })
    }

    /// Which rows pass; a null result (e.g. comparing with a missing value) counts as false.
    pub fn evaluate(&self, batch: &RecordBatch) -> Result<BooleanArray> {
        let value = self.expr.evaluate(batch)?.into_array(batch.num_rows())?;
        let mask = value.as_boolean();
        if mask.null_count() == 0 {
            return Ok(mask.clone());
        }
        Ok(mask.iter().map(|v| Some(v.unwrap_or(false))).collect())
    }
}
