//! A view's rollups, computed at publish time from the rows just computed.
//!
//! Each rollup ([`tandem_core::view::Rollup`]) groups rows by a subset of the view's
//! dimensions in buckets of its granularity and merges their metric states with the same
//! merge serving uses, so an answer from a rollup equals the answer from the view's rows
//! (counts, sums, minima, maxima and averages exactly; a distinct by the same sketch union).
//! The rollups are listed so that each can be computed from one before it; each is computed
//! from the smallest such source, as a star-tree builds its coarser nodes from finer ones.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray, TimestampMicrosecondArray};
use datafusion::arrow::datatypes::{DataType, Int32Type, SchemaRef, TimestampMicrosecondType};
use datafusion::arrow::record_batch::RecordBatch;
use tandem_core::metric::MetricState;
use tandem_core::time::{day_of, day_string};
use tandem_core::view::{Granularity, ViewDef, BUCKET_COLUMN};

use crate::error::{BatchError, Result};

/// Rows of one table (the view's or a rollup's) in a form made for regrouping.
struct Rows {
    /// The view dimensions this table holds, ascending.
    dims: Vec<usize>,
    granularity: Granularity,
    /// Per row: bucket start and the value ids of `dims` (0 = null).
    keys: Vec<(i64, Vec<u32>)>,
    /// Per row: every metric's state.
    states: Vec<Vec<MetricState>>,
}

/// Per view dimension: the value of id `i + 1`, and the id of each value (0 stands for null).
#[derive(Debug, Default)]
pub(crate) struct Dictionary {
    values: Vec<Vec<String>>,
    ids: Vec<hashbrown::HashMap<String, u32>>,
    /// Per dimension, the values of the last dictionary column interned, and their ids.
    last: Vec<Option<(ArrayRef, Vec<u32>)>>,
}

impl Dictionary {
    pub(crate) fn new(dims: usize) -> Self {
        Dictionary {
            values: vec![Vec::new(); dims],
            ids: vec![hashbrown::HashMap::new(); dims],
            last: Vec::new(),
        }
    }

    pub(crate) fn intern(&mut self, dim: usize, value: &str) -> u32 {
        if let Some(&id) = self.ids[dim].get(value) {
            return id;
        }
        self.values[dim].push(value.to_string());
        let id = self.values[dim].len() as u32;
        self.ids[dim].insert(value.to_string(), id);
        id
    }

    /// The ids of a column's values (a string column, a dictionary of strings, whose values
    /// are interned once each, or a column cast to strings).
    pub(crate) fn intern_column(&mut self, dim: usize, column: &ArrayRef) -> Result<Vec<u32>> {
        if let Some(dict) = column.as_dictionary_opt::<Int32Type>() {
            if dict.values().data_type() == &DataType::Utf8 {
                let values = dict.values().as_string::<i32>();
                let ids: Vec<u32> = values
                    .iter()
                    .map(|v| v.map_or(0, |v| self.intern(dim, v)))
                    .collect();
                return Ok(dict
                    .keys()
                    .iter()
                    .map(|k| k.map_or(0, |k| ids.get(k as usize).copied().unwrap_or(0)))
                    .collect());
            }
        }
        let mut intern = |v: Option<&str>| v.map_or(0, |v| self.intern(dim, v));
        Ok(match column.data_type() {
            DataType::Utf8View => column.as_string_view().iter().map(&mut intern).collect(),
            DataType::Utf8 => column.as_string::<i32>().iter().map(&mut intern).collect(),
            _ => {
                let column = datafusion::arrow::compute::cast(column, &DataType::Utf8)?;
                column.as_string::<i32>().iter().map(&mut intern).collect()
            }
        })
    }

    /// Appends to `ids` the ids of a column's values, as [`Self::intern_column`] gives them; a
    /// dictionary column whose values are the last one's (batches of one column chunk share
    /// them) is mapped with the ids its values got then.
    pub(crate) fn intern_column_into(
        &mut self,
        dim: usize,
        column: &ArrayRef,
        ids: &mut Vec<u32>,
    ) -> Result<()> {
        if let Some(dict) = column.as_dictionary_opt::<Int32Type>() {
            if dict.values().data_type() == &DataType::Utf8 {
                if self.last.len() <= dim {
                    self.last.resize_with(dim + 1, Default::default);
                }
                let same = matches!(&self.last[dim], Some((values, _)) if Arc::ptr_eq(values, dict.values()));
                if !same {
                    let values = dict.values().as_string::<i32>();
                    let of_key: Vec<u32> = values
                        .iter()
                        .map(|v| v.map_or(0, |v| self.intern(dim, v)))
                        .collect();
                    self.last[dim] = Some((Arc::clone(dict.values()), of_key));
                }
                let of_key = self.last[dim]
                    .as_ref()
                    .map(|(_, k)| k.as_slice())
                    .unwrap_or(&[]);
                ids.extend(
                    dict.keys()
                        .iter()
                        .map(|k| k.map_or(0, |k| of_key.get(k as usize).copied().unwrap_or(0))),
                );
                return Ok(());
            }
        }
        ids.extend(self.intern_column(dim, column)?);
        Ok(())
    }

    /// The values of `dim`, by id minus one.
    pub(crate) fn values(&self, dim: usize) -> &[String] {
        &self.values[dim]
    }

    pub(crate) fn value(&self, dim: usize, id: u32) -> Option<&str> {
        (id != 0).then(|| self.values[dim][id as usize - 1].as_str())
    }

    /// Per id of `dim` (0, null, first), whether `m` accepts its value.
    pub(crate) fn accepted(&self, dim: usize, m: &tandem_core::query::Match) -> Vec<bool> {
        std::iter::once(m.accepts(None))
            .chain(self.values[dim].iter().map(|v| m.accepts(Some(v))))
            .collect()
    }
}

/// The rows of every rollup of `view`, in the view's batch schema, from its base rows `base`
/// (in that schema too).
pub(crate) fn compute(view: &ViewDef, base: &[RecordBatch]) -> Result<Vec<RecordBatch>> {
    if view.rollups.is_empty() || base.iter().all(|b| b.num_rows() == 0) {
        return Ok(Vec::new());
    }
    let mut dictionary = Dictionary::new(view.dimensions.len());
    let base = read(view, base, &mut dictionary)?;
    let schema = view.batch_schema();
    let mut tables: Vec<Rows> = Vec::with_capacity(view.rollups.len());
    let mut out = Vec::with_capacity(view.rollups.len());
    for rollup in &view.rollups {
        let source = tables
            .iter()
            .filter(|t| rollup.derives_from(&t.dims, t.granularity))
            .chain(std::iter::once(&base))
            .min_by_key(|t| t.keys.len())
            .expect("the base rows are always a source");
        let rows = regroup(source, &rollup.dims, rollup.granularity);
        out.push(write(view, &schema, &rollup.name(), &rows, &dictionary)?);
        tables.push(rows);
    }
    Ok(out)
}

/// Reads base rows into [`Rows`].
fn read(view: &ViewDef, batches: &[RecordBatch], dictionary: &mut Dictionary) -> Result<Rows> {
    let dims = view.dimensions.len();
    let widths: Vec<usize> = view
        .metrics
        .iter()
        .map(|m| m.batch_fields().len())
        .collect();
    let mut rows = Rows {
        dims: (0..dims).collect(),
        granularity: view.granularity,
        keys: Vec::new(),
        states: Vec::new(),
    };
    for b in batches {
        let column = |name: &str| {
            b.column_by_name(name)
                .ok_or_else(|| BatchError::BadRequest(format!("view rows lack column `{name}`")))
        };
        let buckets = column(BUCKET_COLUMN)?.as_primitive::<TimestampMicrosecondType>();
        let texts: Vec<&StringArray> = view
            .dimensions
            .iter()
            .map(|d| column(d).map(|c| c.as_string::<i32>()))
            .collect::<Result<_>>()?;
        let metric_columns: Vec<Vec<ArrayRef>> = view
            .metrics
            .iter()
            .map(|m| {
                m.batch_fields()
                    .iter()
                    .map(|f| column(f.name()).cloned())
                    .collect::<Result<_>>()
            })
            .collect::<Result<_>>()?;
        for row in 0..b.num_rows() {
            let ids = texts
                .iter()
                .enumerate()
                .map(|(d, col)| {
                    if col.is_null(row) {
                        0
                    } else {
                        dictionary.intern(d, col.value(row))
                    }
                })
                .collect();
            rows.keys.push((buckets.value(row), ids));
            let states = view
                .metrics
                .iter()
                .zip(&metric_columns)
                .zip(&widths)
                .map(|((m, cols), &w)| m.state_from_batch(&cols[..w], row))
                .collect::<tandem_core::Result<_>>()?;
            rows.states.push(states);
        }
    }
    Ok(rows)
}

/// `source` grouped by `dims` (a subset of its own) in buckets of `granularity`.
fn regroup(source: &Rows, dims: &[usize], granularity: Granularity) -> Rows {
    let positions: Vec<usize> = dims
        .iter()
        .map(|d| {
            source
                .dims
                .iter()
                .position(|s| s == d)
                .expect("a rollup is computed from a source holding its dimensions")
        })
        .collect();
    let mut index: HashMap<(i64, Vec<u32>), usize> = HashMap::new();
    let mut out = Rows {
        dims: dims.to_vec(),
        granularity,
        keys: Vec::new(),
        states: Vec::new(),
    };
    for ((bucket, ids), states) in source.keys.iter().zip(&source.states) {
        let key = (
            granularity.floor(*bucket),
            positions.iter().map(|&p| ids[p]).collect::<Vec<u32>>(),
        );
        match index.get(&key) {
            Some(&i) => out.states[i]
                .iter_mut()
                .zip(states)
                .for_each(|(a, b)| a.merge(b)),
            None => {
                index.insert(key.clone(), out.keys.len());
                out.keys.push(key);
                out.states.push(states.clone());
            }
        }
    }
    out
}

/// A rollup's rows as one batch of the view's batch schema: the dimensions it leaves out are
/// null.
fn write(
    view: &ViewDef,
    schema: &SchemaRef,
    name: &str,
    rows: &Rows,
    dictionary: &Dictionary,
) -> Result<RecordBatch> {
    let n = rows.keys.len();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    columns.push(Arc::new(
        TimestampMicrosecondArray::from_iter_values(rows.keys.iter().map(|(b, _)| *b))
            .with_timezone("UTC"),
    ));
    for d in 0..view.dimensions.len() {
        let column: StringArray = match rows.dims.iter().position(|&x| x == d) {
            Some(p) => rows
                .keys
                .iter()
                .map(|(_, ids)| dictionary.value(d, ids[p]))
                .collect(),
            None => StringArray::new_null(n),
        };
        columns.push(Arc::new(column));
    }
    for (m, metric) in view.metrics.iter().enumerate() {
        let states: Vec<&MetricState> = rows.states.iter().map(|s| &s[m]).collect();
        columns.extend(metric.batch_columns(&states)?);
    }
    columns.push(Arc::new(StringArray::from_iter_values(
        std::iter::repeat_n(name, n),
    )));
    columns.push(Arc::new(StringArray::from_iter_values(
        rows.keys.iter().map(|(b, _)| day_string(day_of(*b))),
    )));
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{DictionaryArray, Int32Array};

    use super::*;

    /// A dictionary column's rows get the ids its text would get, nulls (a null key or a null
    /// value) included.
    #[test]
    fn a_dictionary_columns_ids_are_its_texts_ids() {
        let values = StringArray::from(vec![Some("b"), None, Some("a"), Some("unused")]);
        let keys = Int32Array::from(vec![Some(0), Some(2), None, Some(1), Some(0), Some(2)]);
        let dict: ArrayRef =
            Arc::new(DictionaryArray::<Int32Type>::try_new(keys, Arc::new(values)).unwrap());
        let text: ArrayRef = datafusion::arrow::compute::cast(&dict, &DataType::Utf8).unwrap();
        let mut by_text = Dictionary::new(1);
        let mut by_dict = Dictionary::new(1);
        by_text.intern(0, "a");
        by_dict.intern(0, "a");
        let from_text = by_text.intern_column(0, &text).unwrap();
        let from_dict = by_dict.intern_column(0, &dict).unwrap();
        let named = |d: &Dictionary, ids: &[u32]| -> Vec<Option<String>> {
            ids.iter()
                .map(|&id| d.value(0, id).map(str::to_string))
                .collect()
        };
        assert_eq!(named(&by_dict, &from_dict), named(&by_text, &from_text));
        assert_eq!(from_dict[2], 0, "a null key is null");
        assert_eq!(from_dict[3], 0, "a null value is null");
        assert_eq!(from_dict[0], from_dict[4]);
    }

    /// Batches read in turn (two sharing one dictionary's values, one with values of its own
    /// in another order, one of plain text, then the shared values again) get the ids of their
    /// texts, in one run of ids.
    #[test]
    fn batches_sharing_a_dictionary_get_their_texts_ids() {
        let shared: ArrayRef = Arc::new(StringArray::from(vec![Some("x"), Some("y"), None]));
        let other: ArrayRef = Arc::new(StringArray::from(vec![Some("z"), Some("y"), Some("x")]));
        let dict = |values: &ArrayRef, keys: Vec<Option<i32>>| -> ArrayRef {
            Arc::new(
                DictionaryArray::<Int32Type>::try_new(Int32Array::from(keys), Arc::clone(values))
                    .unwrap(),
            )
        };
        let columns = [
            dict(&shared, vec![Some(0), Some(1), Some(2), None]),
            dict(&shared, vec![Some(1), Some(1)]),
            dict(&other, vec![Some(0), Some(1), Some(2)]),
            Arc::new(StringArray::from(vec![Some("y"), None, Some("w")])),
            dict(&shared, vec![Some(0)]),
        ];
        let mut by_batch = Dictionary::new(1);
        let mut ids = Vec::new();
        for c in &columns {
            by_batch.intern_column_into(0, c, &mut ids).unwrap();
        }
        let texts: Vec<Option<&str>> = ids.iter().map(|&id| by_batch.value(0, id)).collect();
        assert_eq!(
            texts,
            [
                Some("x"),
                Some("y"),
                None,
                None,
                Some("y"),
                Some("y"),
                Some("z"),
                Some("y"),
                Some("x"),
                Some("y"),
                None,
                Some("w"),
                Some("x"),
            ]
        );
    }
}
