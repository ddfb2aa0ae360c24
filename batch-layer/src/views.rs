//! Reading published batch views for the serving layer (core's `BatchViews`).
//!
//! Each published version of a view is loaded once into memory, in a form made for answering:
//! rows sorted by bucket, dimension values dictionary-encoded, metric states (sketches
//! included) deserialised once. A query filters and groups those rows; it never reads Parquet
//! or parses a sketch. Whether a newer version was published is checked at most once per
//! `refresh` interval per view, by one task at a time, off the request path: requests answer
//! from the loaded version meanwhile, so a slow store or a burst of queries never piles up on
//! the Delta log. (With a zero interval the check is made on every request, before answering:
//! for tests that publish and query in one breath.)
//!
//! Coverage and rows come from one loaded version, so a query never mixes two publishes: the
//! coverage a query was given names its version, and the rows are read from that version (the
//! previous one is kept while a new one takes over).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimestampMicrosecondType};
use datafusion::prelude::ident;
use tandem_core::metric::MetricState;
use tandem_core::query::{AggRow, Coverage, ViewQuery};
use tandem_core::storage::Storage;
use tandem_core::traits::BatchViews;
use tandem_core::view::{ViewDef, BUCKET_COLUMN};
use tandem_core::CoreError;

use crate::compute::{published, session, Published};
use crate::error::BatchError;

/// Loaded versions kept per view: the newest, and the one before it for queries that began on
/// it.
const KEPT_VERSIONS: usize = 2;

/// Published batch views in Delta tables, loaded into memory per version.
#[derive(Debug)]
pub struct DeltaBatchViews {
    storage: Storage,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    refresh: Duration,
}

/// One view's loaded versions and the single flight that refreshes them.
#[derive(Debug)]
struct Slot {
    view: Arc<ViewDef>,
    storage: Storage,
    /// Newest first.
    versions: Mutex<VecDeque<Arc<Loaded>>>,
    /// When the log was last looked at.
    checked: Mutex<Option<Instant>>,
    /// Held by the one task that reads the log and loads a version.
    loading: Arc<tokio::sync::Mutex<()>>,
}

/// One published version of a view, ready to answer.
#[derive(Debug)]
struct Loaded {
    published: Published,
    /// Bucket start of each row, ascending.
    buckets: Vec<i64>,
    /// Per dimension: each row's value id (0 = null).
    dims: Vec<Vec<u32>>,
    /// Per dimension: the value of id `i + 1`, and the id of each value.
    values: Vec<Vec<String>>,
    ids: Vec<HashMap<String, u32>>,
    /// Per metric: each row's state.
    states: Vec<Vec<MetricState>>,
}

impl DeltaBatchViews {
    pub fn new(storage: Storage) -> Self {
        DeltaBatchViews {
            storage,
            slots: Mutex::new(HashMap::new()),
            refresh: Duration::from_secs(1),
        }
    }

    /// How often each view's log is looked at for a newer publish.
    pub fn with_refresh(mut self, refresh: Duration) -> Self {
        self.refresh = refresh;
        self
    }

    fn slot(&self, view: &ViewDef) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("slots lock");
        let slot = slots
            .entry(view.name.clone())
            .or_insert_with(|| Arc::new(Slot::new(Arc::new(view.clone()), self.storage.clone())));
        // A changed definition (the catalog was reloaded) starts afresh.
        if slot.view.definition_hash != view.definition_hash {
            *slot = Arc::new(Slot::new(Arc::new(view.clone()), self.storage.clone()));
        }
        Arc::clone(slot)
    }

    /// The newest loaded version of `view`: loaded now if none is; refreshed in the background
    /// (or, with a zero interval, now) when the last look at the log is older than `refresh`.
    async fn newest(&self, view: &ViewDef) -> Result<Arc<Loaded>, BatchError> {
        let slot = self.slot(view);
        match slot.newest() {
            Some(loaded) if !slot.due(self.refresh) => Ok(loaded),
            Some(loaded) if !self.refresh.is_zero() => {
                Slot::refresh_in_background(Arc::clone(&slot));
                Ok(loaded)
            }
            _ => slot.refresh().await,
        }
    }
}

impl Slot {
    fn new(view: Arc<ViewDef>, storage: Storage) -> Self {
        Slot {
            view,
            storage,
            versions: Mutex::new(VecDeque::new()),
            checked: Mutex::new(None),
            loading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn newest(&self) -> Option<Arc<Loaded>> {
        self.versions
            .lock()
            .expect("versions lock")
            .front()
            .cloned()
    }

    fn due(&self, refresh: Duration) -> bool {
        self.checked
            .lock()
            .expect("checked lock")
            .is_none_or(|t| t.elapsed() >= refresh)
    }

    fn refresh_in_background(slot: Arc<Slot>) {
        let Ok(guard) = Arc::clone(&slot.loading).try_lock_owned() else {
            return; // A refresh is under way.
        };
        tokio::spawn(async move {
            if let Err(e) = slot.refresh_locked().await {
                tracing::warn!(view = %slot.view.name, error = %e, "refreshing a batch view failed; serving the loaded version");
            }
            drop(guard);
        });
    }

    /// Looks at the log and loads a newer version, if any; one caller at a time.
    async fn refresh(&self) -> Result<Arc<Loaded>, BatchError> {
        let _guard = self.loading.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<Arc<Loaded>, BatchError> {
        let url = self.storage.layout().view(&self.view.name);
        let table = self.storage.open(&url).await?;
        let version = table.as_ref().and_then(|t| t.version()).map(|v| v as i64);
        *self.checked.lock().expect("checked lock") = Some(Instant::now());
        if let Some(newest) = self.newest() {
            if newest.published.coverage.version == version {
                return Ok(newest);
            }
        }
        let loaded = Arc::new(match table {
            Some(t) => Loaded::read(&self.view, &t).await?,
            None => Loaded::empty(&self.view),
        });
        let mut versions = self.versions.lock().expect("versions lock");
        versions.push_front(Arc::clone(&loaded));
        versions.truncate(KEPT_VERSIONS);
        tracing::debug!(view = %self.view.name, ?version, rows = loaded.buckets.len(), "batch view loaded");
        Ok(loaded)
    }

    /// The loaded version a coverage was read from.
    fn version(&self, version: Option<i64>) -> Option<Arc<Loaded>> {
        self.versions
            .lock()
            .expect("versions lock")
            .iter()
            .find(|l| l.published.coverage.version == version)
            .cloned()
    }
}

impl Loaded {
    fn empty(view: &ViewDef) -> Self {
        Loaded {
            published: Published::default(),
            buckets: Vec::new(),
            dims: vec![Vec::new(); view.dimensions.len()],
            values: vec![Vec::new(); view.dimensions.len()],
            ids: vec![HashMap::new(); view.dimensions.len()],
            states: vec![Vec::new(); view.metrics.len()],
        }
    }

    /// Reads every row of the table's version, sorted by bucket.
    async fn read(view: &ViewDef, table: &deltalake::DeltaTable) -> Result<Self, BatchError> {
        let mut out = Loaded::empty(view);
        out.published = published(table).await?;
        let ctx = session();
        ctx.register_table("v", table.table_provider().await?)?;
        let mut columns = vec![ident(BUCKET_COLUMN)];
        columns.extend(view.dimensions.iter().map(|d| ident(d.as_str())));
        let widths: Vec<usize> = view
            .metrics
            .iter()
            .map(|m| {
                let fields = m.batch_fields();
                columns.extend(fields.iter().map(|f| ident(f.name().as_str())));
                fields.len()
            })
            .collect();
        let df = ctx
            .table("v")
            .await?
            .select(columns)?
            .sort(vec![ident(BUCKET_COLUMN).sort(true, false)])?;
        let dims = view.dimensions.len();
        for b in df.collect().await? {
            let buckets = b.column(0).as_primitive::<TimestampMicrosecondType>();
            let texts: Vec<ArrayRef> = (0..dims)
                .map(|i| cast(b.column(1 + i), &DataType::Utf8))
                .collect::<Result<_, _>>()?;
            for row in 0..b.num_rows() {
                out.buckets.push(buckets.value(row));
                for (d, col) in texts.iter().enumerate() {
                    let id = if col.is_null(row) {
                        0
                    } else {
                        out.intern(d, col.as_string::<i32>().value(row))
                    };
                    out.dims[d].push(id);
                }
                let mut col = 1 + dims;
                for (m, (metric, &width)) in view.metrics.iter().zip(&widths).enumerate() {
                    let state = metric.state_from_batch(&b.columns()[col..col + width], row)?;
                    out.states[m].push(state);
                    col += width;
                }
            }
        }
        Ok(out)
    }

    fn intern(&mut self, dim: usize, value: &str) -> u32 {
        if let Some(&id) = self.ids[dim].get(value) {
            return id;
        }
        self.values[dim].push(value.to_string());
        let id = self.values[dim].len() as u32;
        self.ids[dim].insert(value.to_string(), id);
        id
    }

    fn value(&self, dim: usize, id: u32) -> Option<String> {
        (id != 0).then(|| self.values[dim][id as usize - 1].clone())
    }

    /// The rows of covered buckets in the query's range, filtered and grouped as asked.
    fn answer(&self, q: &ViewQuery, coverage: &Coverage) -> Vec<AggRow> {
        let start = self.buckets.partition_point(|&b| b < q.from_us);
        let end = self.buckets.partition_point(|&b| b < q.to_us);
        // Each filter as the ids it accepts; a value never seen accepts nothing.
        let filters: Vec<(usize, Vec<u32>)> = q
            .filters
            .iter()
            .map(|(d, values)| {
                let ids = values
                    .iter()
                    .filter_map(|v| self.ids[*d].get(v).copied())
                    .collect();
                (*d, ids)
            })
            .collect();
        // Rows are sorted by bucket: group one bucket at a time, looking groups up by a reused
        // key, so a row that joins a group allocates nothing.
        let mut out = Vec::new();
        let mut groups: HashMap<Vec<u32>, Vec<MetricState>> = HashMap::new();
        let mut key: Vec<u32> = Vec::with_capacity(q.group_by.len());
        let mut row = start;
        while row < end {
            let bucket = self.buckets[row];
            let run_end = row + self.buckets[row..end].partition_point(|&b| b == bucket);
            if coverage.covers(bucket) {
                for r in row..run_end {
                    if !filters
                        .iter()
                        .all(|(d, ids)| ids.contains(&self.dims[*d][r]))
                    {
                        continue;
                    }
                    key.clear();
                    key.extend(q.group_by.iter().map(|&d| self.dims[d][r]));
                    match groups.get_mut(key.as_slice()) {
                        Some(states) => {
                            for (s, &m) in states.iter_mut().zip(&q.metrics) {
                                s.merge(&self.states[m][r]);
                            }
                        }
                        None => {
                            let states = q
                                .metrics
                                .iter()
                                .map(|&m| self.states[m][r].clone())
                                .collect();
                            groups.insert(key.clone(), states);
                        }
                    }
                }
                out.extend(groups.drain().map(|(ids, states)| {
                    AggRow {
                        bucket_us: bucket,
                        dims: q
                            .group_by
                            .iter()
                            .zip(ids)
                            .map(|(&d, id)| self.value(d, id))
                            .collect(),
                        states,
                    }
                }));
            }
            row = run_end;
        }
        out
    }
}

#[async_trait]
impl BatchViews for DeltaBatchViews {
    async fn coverage(&self, view: &ViewDef) -> tandem_core::Result<Coverage> {
        let loaded = self.newest(view).await?;
        let published = &loaded.published;
        if published.hash.as_deref() != Some(view.definition_hash.as_str()) {
            // Computed under another definition (or never): covers nothing.
            return Ok(Coverage {
                version: published.coverage.version,
                ..Default::default()
            });
        }
        Ok(published.coverage.clone())
    }

    async fn refresh(&self) -> tandem_core::Result<()> {
        let slots: Vec<Arc<Slot>> = self
            .slots
            .lock()
            .expect("slots lock")
            .values()
            .cloned()
            .collect();
        for slot in slots {
            slot.refresh().await?;
        }
        Ok(())
    }

    async fn query(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        if coverage.days.is_empty() {
            return Ok(Vec::new());
        }
        let slot = self.slot(view);
        let loaded = slot
            .version(coverage.version)
            .ok_or_else(|| CoreError::Layer {
                layer: "batch views",
                retryable: true,
                source: format!(
                    "view `{}`: version {:?} was replaced while the query ran",
                    view.name, coverage.version
                )
                .into(),
            })?;
        Ok(loaded.answer(q, coverage))
    }
}
