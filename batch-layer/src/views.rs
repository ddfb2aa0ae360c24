//! Reading published batch views for the serving layer (core's `BatchViews`).
//!
//! Coverage and rows are read from one table version, so a query never mixes two publishes: a
//! publish that lands between them is seen by the next query. Opened tables are cached for a
//! short time (`refresh`), which bounds how soon a new publish is served.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimestampMicrosecondType};
use datafusion::common::ScalarValue;
use datafusion::prelude::{ident, lit, Expr};
use deltalake::DeltaTable;
use tandem_core::query::{AggRow, Coverage, RowSet, ViewQuery};
use tandem_core::storage::Storage;
use tandem_core::time::day_string;
use tandem_core::traits::BatchViews;
use tandem_core::view::{ViewDef, BUCKET_COLUMN, DAY_COLUMN};
use tandem_core::CoreError;

use crate::compute::{published, session, Published};
use crate::error::BatchError;

#[derive(Debug, Clone)]
struct Cached {
    table: Option<DeltaTable>,
    published: Published,
    loaded: Instant,
}

/// Published batch views in Delta tables.
#[derive(Debug)]
pub struct DeltaBatchViews {
    storage: Storage,
    cache: Mutex<HashMap<String, Cached>>,
    refresh: Duration,
}

impl DeltaBatchViews {
    pub fn new(storage: Storage) -> Self {
        DeltaBatchViews {
            storage,
            cache: Mutex::new(HashMap::new()),
            refresh: Duration::from_secs(1),
        }
    }

    /// How long an opened view table is reused before its log is read again.
    pub fn with_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    async fn load(&self, view: &ViewDef) -> Result<Cached, BatchError> {
        if let Some(c) = self.cache.lock().expect("cache lock").get(&view.name) {
            if c.loaded.elapsed() < self.refresh {
                return Ok(c.clone());
            }
        }
        let table = self
            .storage
            .open(&self.storage.layout().view(&view.name))
            .await?;
        let published = match &table {
            Some(t) => published(t).await?,
            None => Published::default(),
        };
        let c = Cached {
            table,
            published,
            loaded: Instant::now(),
        };
        self.cache
            .lock()
            .expect("cache lock")
            .insert(view.name.clone(), c.clone());
        Ok(c)
    }
}

#[async_trait]
impl BatchViews for DeltaBatchViews {
    async fn coverage(&self, view: &ViewDef) -> tandem_core::Result<Coverage> {
        let c = self.load(view).await?;
        if c.published.hash.as_deref() != Some(view.definition_hash.as_str()) {
            // Computed under another definition (or never): covers nothing.
            return Ok(Coverage {
                version: c.published.coverage.version,
                ..Default::default()
            });
        }
        Ok(c.published.coverage)
    }

    async fn query(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        let days: Vec<String> = q
            .days()
            .filter(|d| coverage.days.contains(d))
            .map(day_string)
            .collect();
        if days.is_empty() {
            return Ok(Vec::new());
        }
        let c = self.load(view).await?;
        let Some(mut table) = c.table else {
            return Ok(Vec::new());
        };
        if let Some(v) = coverage.version {
            if table.version().map(|x| x as i64) != Some(v) {
                table
                    .load_version(v as u64)
                    .await
                    .map_err(tandem_core::storage::delta)?;
            }
        }
        let rows = read_rows(&table, view, q, &days)
            .await
            .map_err(CoreError::from)?;
        Ok(rows)
    }
}

fn ts(us: i64) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(us),
        Some("UTC".into()),
    ))
}

async fn read_rows(
    table: &DeltaTable,
    view: &ViewDef,
    q: &ViewQuery,
    days: &[String],
) -> Result<Vec<AggRow>, BatchError> {
    let ctx = session();
    ctx.register_table("v", table.table_provider().await?)?;
    let mut df = ctx
        .table("v")
        .await?
        .filter(ident(DAY_COLUMN).in_list(days.iter().map(|d| lit(d.as_str())).collect(), false))?
        .filter(
            ident(BUCKET_COLUMN)
                .gt_eq(ts(q.from_us))
                .and(ident(BUCKET_COLUMN).lt(ts(q.to_us))),
        )?;
    for (d, values) in &q.filters {
        // Values are literals, never SQL text.
        df = df.filter(
            ident(view.dimensions[*d].as_str())
                .in_list(values.iter().map(|v| lit(v.as_str())).collect(), false),
        )?;
    }
    let mut columns = vec![ident(BUCKET_COLUMN)];
    columns.extend(
        q.group_by
            .iter()
            .map(|&d| ident(view.dimensions[d].as_str())),
    );
    // Each asked metric's columns, as its kind stores them.
    let widths: Vec<usize> = q
        .metrics
        .iter()
        .map(|&m| {
            let fields = view.metrics[m].batch_fields();
            columns.extend(fields.iter().map(|f| ident(f.name().as_str())));
            fields.len()
        })
        .collect();
    let df = df.select(columns)?;
    let mut merged = RowSet::default();
    for b in df.collect().await? {
        let buckets = b.column(0).as_primitive::<TimestampMicrosecondType>();
        let dims: Vec<ArrayRef> = (0..q.group_by.len())
            .map(|i| cast(b.column(1 + i), &DataType::Utf8))
            .collect::<Result<_, _>>()?;
        for row in 0..b.num_rows() {
            let key_dims: Vec<Option<String>> = dims
                .iter()
                .map(|c| (!c.is_null(row)).then(|| c.as_string::<i32>().value(row).to_string()))
                .collect();
            let mut col = 1 + q.group_by.len();
            let mut states = Vec::with_capacity(q.metrics.len());
            for (&m, &width) in q.metrics.iter().zip(&widths) {
                states.push(view.metrics[m].state_from_batch(&b.columns()[col..col + width], row)?);
                col += width;
            }
            merged.add(buckets.value(row), key_dims, states);
        }
    }
    Ok(merged.into_rows())
}
