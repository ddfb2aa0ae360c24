//! Answers built from two parts rendered apart: the batch's settled rows, printed once per batch
//! version and query, and the speed's rows, printed per speed state; an answer interleaves the
//! two in its order. A new event costs the answer only its own buckets' rows, not the week the
//! batch settled.

use std::sync::Arc;

use axum::body::Bytes;
use datafusion::arrow::array::{Array, RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::interleave;
use datafusion::arrow::datatypes::Schema;
use tandem_core::query::{Coverage, QueryResult, ResultRow, ViewQuery};
use tandem_core::traits::{BatchViews, RealtimeView};
use tandem_core::view::ViewDef;
use tandem_core::CoreError;

use crate::merge::{batch_part, shell, speed_part, Order, SortKey};
use crate::render::{to_arrow, JsonRows};

/// An answer ready to send: the result (without rows: they are in the batch), its Arrow batch
/// (without the answer's metadata) and its rows printed as JSON, comma-separated (shared by
/// every response that sends them).
#[derive(Debug)]
pub struct Answered {
    pub result: QueryResult,
    pub batch: RecordBatch,
    pub json_rows: Bytes,
}

impl Answered {
    /// Bytes held, roughly.
    pub fn weight(&self) -> usize {
        self.json_rows.len() + self.batch.get_array_memory_size() + 1024
    }
}

/// Rows printed once: as Arrow, as JSON, and the keys that order them.
#[derive(Debug)]
struct Rendered {
    batch: RecordBatch,
    json: JsonRows,
    keys: Vec<SortKey>,
}

impl Rendered {
    /// `rows` (in the answer's order) of `q` on `view`, printed.
    fn new(
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
        rows: Vec<ResultRow>,
    ) -> Result<Self, CoreError> {
        let order = Order::new(view, q);
        let keys = rows.iter().map(|r| order.key(r)).collect();
        let mut result = shell(view, q, coverage.clone());
        result.rows = rows;
        let batch = to_arrow(&result, view)?;
        // The answer's metadata is each request's own.
        let bare = Schema::new(batch.schema().fields().clone());
        let batch = RecordBatch::try_new_with_options(
            Arc::new(bare),
            batch.columns().to_vec(),
            &RecordBatchOptions::new().with_row_count(Some(batch.num_rows())),
        )?;
        let json = JsonRows::print(q.group_by.len(), &batch);
        Ok(Rendered { batch, json, keys })
    }

    fn bytes(&self) -> usize {
        let keys: usize = self
            .keys
            .iter()
            .map(|k| {
                std::mem::size_of::<SortKey>()
                    + k.dims
                        .iter()
                        .map(|d| 24 + d.as_ref().map_or(0, String::len))
                        .sum::<usize>()
            })
            .sum();
        self.batch.get_array_memory_size() + self.json.bytes() + keys
    }
}

/// The batch's part of one query's answer at one batch version: the rows it settles, printed,
/// and its rows of the answer buckets it covers only in part, kept as states to merge with the
/// speed's rows.
#[derive(Debug)]
pub struct Settled {
    rows: Rendered,
    open: Vec<ResultRow>,
}

impl Settled {
    /// The batch's part of `q` on `view` at `coverage`.
    pub async fn compute(
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
        batch: &dyn BatchViews,
    ) -> Result<Self, CoreError> {
        let part = batch_part(view, q, coverage, batch).await?;
        Ok(Settled {
            rows: Rendered::new(view, q, coverage, part.settled)?,
            open: part.open,
        })
    }

    /// Bytes held, roughly (an open row's states are counted at a sketch's size).
    pub fn weight(&self) -> usize {
        self.rows.bytes()
            + self
                .open
                .iter()
                .map(|r| 64 + r.states.len() * 512)
                .sum::<usize>()
            + 1024
    }
}

/// The answer of `q` on `view` at `coverage`: the batch's `settled` part and the speed's rows
/// as they are now, in the answer's order, cut at its limit.
pub fn answer(
    view: &ViewDef,
    q: &ViewQuery,
    coverage: Coverage,
    settled: &Settled,
    speed: &dyn RealtimeView,
) -> Result<Answered, CoreError> {
    let fresh = speed_part(view, q, &coverage, &settled.open, speed)?;
    let fresh = Rendered::new(view, q, &coverage, fresh)?;
    let parts = [&settled.rows, &fresh];
    let order = Order::new(view, q);
    let total = parts[0].keys.len() + parts[1].keys.len();
    let mut picks: Vec<(usize, usize)> = Vec::with_capacity(total.min(q.limit));
    let mut next = [0usize, 0usize];
    while picks.len() < total.min(q.limit) {
        let part = match (parts[0].keys.get(next[0]), parts[1].keys.get(next[1])) {
            (Some(a), Some(b)) => usize::from(order.compare(a, b).is_gt()),
            (Some(_), None) => 0,
            _ => 1,
        };
        picks.push((part, next[part]));
        next[part] += 1;
    }

    let columns = (0..parts[0].batch.num_columns())
        .map(|c| {
            let arrays: [&dyn Array; 2] = [
                parts[0].batch.column(c).as_ref(),
                parts[1].batch.column(c).as_ref(),
            ];
            interleave(&arrays, &picks)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let batch = RecordBatch::try_new_with_options(
        parts[0].batch.schema(),
        columns,
        &RecordBatchOptions::new().with_row_count(Some(picks.len())),
    )?;
    let bytes: usize = picks
        .iter()
        .map(|&(p, i)| parts[p].json.row(i).len() + 1)
        .sum();
    let mut json_rows = String::with_capacity(bytes);
    for (n, &(p, i)) in picks.iter().enumerate() {
        if n > 0 {
            json_rows.push(',');
        }
        json_rows.push_str(parts[p].json.row(i));
    }
    let mut result = shell(view, q, coverage);
    result.truncated = total > q.limit;
    Ok(Answered {
        result,
        batch,
        json_rows: json_rows.into(),
    })
}
