//! Reading published batch views for the serving layer (core's `BatchViews`).
//!
//! Each published version of a view is loaded once into memory, in a form made for answering:
//! rows sorted by bucket, dimension values dictionary-encoded, metric states (sketches
//! included) deserialised once; the view's rollups (published in the same commit) likewise.
//! A query is answered from the smallest of the view's rows and the rollups that answer it
//! exactly; it filters and groups those rows, and never reads Parquet or parses a sketch.
//!
//! Whether a newer version was published is checked at most once per `refresh` interval per
//! view, by one task at a time, off the request path: requests answer from the loaded version
//! meanwhile, so a slow store or a burst of queries never piles up on the Delta log. The check
//! looks for the commit after the loaded one (one object), and loads the table's log whole
//! only when that commit exists or at least every [`WHOLE_LOOK`]. The checks and the loads run
//! on the runtime given with [`DeltaBatchViews::with_runtime`] (a server's lower-priority one,
//! so that loading a publish does not take the core from the requests). (With a zero interval
//! the check is made on every request, before answering: for tests that publish and query in
//! one breath.)
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
use tandem_core::query::{too_many_groups, AggRow, Coverage, ViewQuery, MAX_QUERY_GROUPS};
use tandem_core::storage::Storage;
use tandem_core::traits::BatchViews;
use tandem_core::view::{Granularity, Rollup, ViewDef, BASE_ROLLUP, BUCKET_COLUMN, ROLLUP_COLUMN};
use tandem_core::CoreError;

use crate::compute::{published, session, Published};
use crate::error::BatchError;
use crate::rollup::Dictionary;

/// Loaded versions kept per view: the newest, and the one before it for queries that began on
/// it.
const KEPT_VERSIONS: usize = 2;

/// The longest a view goes without its log loaded whole: a table replaced under the same
/// name (its versions started over) is noticed within it.
const WHOLE_LOOK: Duration = Duration::from_secs(60);

/// Published batch views in Delta tables, loaded into memory per version.
#[derive(Debug)]
pub struct DeltaBatchViews {
    storage: Storage,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    refresh: Duration,
    /// The most grouped rows one query may hold.
    max_groups: usize,
    /// Where the background checks and loads run (`None`: the caller's runtime).
    runtime: Option<tokio::runtime::Handle>,
}

/// One view's loaded versions and the single flight that refreshes them.
#[derive(Debug)]
struct Slot {
    view: Arc<ViewDef>,
    storage: Storage,
    /// Newest first.
    versions: Mutex<VecDeque<Arc<Loaded>>>,
    /// When the log was last looked at (its next commit, or whole).
    checked: Mutex<Option<Instant>>,
    /// When the log was last loaded whole.
    whole: Mutex<Option<Instant>>,
    /// Held by the one task that reads the log and loads a version.
    loading: Arc<tokio::sync::Mutex<()>>,
    /// Why the last look at the log failed, if it did.
    failure: Mutex<Option<String>>,
}

/// One published version of a view, ready to answer.
#[derive(Debug)]
struct Loaded {
    published: Published,
    granularity: Granularity,
    /// The view's own rows, then each rollup's, in the view's order of rollups.
    tables: Vec<Table>,
    /// The dimension values of every table.
    dictionary: Dictionary,
}

/// The rows of the view itself or of one rollup.
#[derive(Debug)]
struct Table {
    /// `None` for the view's own rows.
    rollup: Option<Rollup>,
    /// Bucket start of each row, ascending.
    buckets: Vec<i64>,
    /// Per view dimension: each row's value id (0 = null); empty for a dimension the rollup
    /// leaves out.
    dims: Vec<Vec<u32>>,
    /// Per metric: each row's state.
    states: Vec<Vec<MetricState>>,
}

impl DeltaBatchViews {
    pub fn new(storage: Storage) -> Self {
        DeltaBatchViews {
            storage,
            slots: Mutex::new(HashMap::new()),
            refresh: Duration::from_secs(1),
            max_groups: MAX_QUERY_GROUPS,
            runtime: None,
        }
    }

    /// Runs the background checks and loads on `runtime` instead of the caller's.
    pub fn with_runtime(mut self, runtime: Option<tokio::runtime::Handle>) -> Self {
        self.runtime = runtime;
        self
    }

    /// The most grouped rows one query may hold before its limit applies (default
    /// [`MAX_QUERY_GROUPS`]); a query past it is refused as a bad query.
    pub fn with_max_groups(mut self, max: usize) -> Self {
        self.max_groups = max;
        self
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
                Slot::refresh_in_background(Arc::clone(&slot), self.runtime.as_ref());
                Ok(loaded)
            }
            _ => slot.refresh().await,
        }
    }
}

impl DeltaBatchViews {
    /// Which rollup answers `q` from the version `coverage` names (`None`: the view's own
    /// rows).
    pub async fn answered_from(
        &self,
        view: &ViewDef,
        q: &ViewQuery,
        coverage: &Coverage,
    ) -> tandem_core::Result<Option<String>> {
        let loaded = self.slot(view).version(coverage.version).ok_or_else(|| {
            CoreError::Internal(format!(
                "view `{}`: version {:?} is not loaded",
                view.name, coverage.version
            ))
        })?;
        Ok(loaded.table_for(q).rollup.as_ref().map(Rollup::name))
    }
}

impl Slot {
    fn new(view: Arc<ViewDef>, storage: Storage) -> Self {
        Slot {
            view,
            storage,
            versions: Mutex::new(VecDeque::new()),
            checked: Mutex::new(None),
            whole: Mutex::new(None),
            loading: Arc::new(tokio::sync::Mutex::new(())),
            failure: Mutex::new(None),
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

    fn refresh_in_background(slot: Arc<Slot>, runtime: Option<&tokio::runtime::Handle>) {
        let Ok(guard) = Arc::clone(&slot.loading).try_lock_owned() else {
            return; // A refresh is under way.
        };
        let refresh = async move {
            if let Err(e) = slot.refresh_locked().await {
                tracing::warn!(view = %slot.view.name, error = %e, "refreshing a batch view failed; serving the loaded version");
            }
            drop(guard);
        };
        match runtime {
            Some(runtime) => drop(runtime.spawn(refresh)),
            None => drop(tokio::spawn(refresh)),
        }
    }

    /// Looks at the log and loads a newer version, if any; one caller at a time.
    async fn refresh(&self) -> Result<Arc<Loaded>, BatchError> {
        let _guard = self.loading.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> Result<Arc<Loaded>, BatchError> {
        let result = self.look().await;
        *self.failure.lock().expect("failure lock") = result.as_ref().err().map(|e| e.to_string());
        result
    }

    async fn look(&self) -> Result<Arc<Loaded>, BatchError> {
        let url = self.storage.layout().view(&self.view.name);
        // The loaded version stands while its next commit does not exist.
        let newest = self.newest();
        if let Some(version) = newest.as_ref().and_then(|n| n.published.coverage.version) {
            let recent = self
                .whole
                .lock()
                .expect("whole lock")
                .is_some_and(|t| t.elapsed() < WHOLE_LOOK);
            if recent && !self.storage.has_commit(&url, version + 1).await? {
                *self.checked.lock().expect("checked lock") = Some(Instant::now());
                return Ok(newest.expect("a loaded version"));
            }
        }
        let table = self.storage.open(&url).await?;
        let version = table.as_ref().and_then(|t| t.version()).map(|v| v as i64);
        let now = Instant::now();
        *self.checked.lock().expect("checked lock") = Some(now);
        *self.whole.lock().expect("whole lock") = Some(now);
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
        tracing::debug!(view = %self.view.name, ?version, rows = loaded.rows(), "batch view loaded");
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

impl Table {
    fn new(view: &ViewDef, rollup: Option<Rollup>) -> Self {
        Table {
            rollup,
            buckets: Vec::new(),
            dims: vec![Vec::new(); view.dimensions.len()],
            states: vec![Vec::new(); view.metrics.len()],
        }
    }

    /// The rows whose buckets start in the query's range.
    fn range(&self, q: &ViewQuery) -> std::ops::Range<usize> {
        self.buckets.partition_point(|&b| b < q.from_us)
            ..self.buckets.partition_point(|&b| b < q.to_us)
    }
}

impl Loaded {
    fn empty(view: &ViewDef) -> Self {
        let mut tables = vec![Table::new(view, None)];
        tables.extend(
            view.rollups
                .iter()
                .map(|r| Table::new(view, Some(r.clone()))),
        );
        Loaded {
            published: Published::default(),
            granularity: view.granularity,
            tables,
            dictionary: Dictionary::new(view.dimensions.len()),
        }
    }

    /// Rows held, over every table.
    fn rows(&self) -> usize {
        self.tables.iter().map(|t| t.buckets.len()).sum()
    }

    /// Reads every row of the table's version (the view's and its rollups'), each table
    /// sorted by bucket. A version published under another definition is not read: it covers
    /// nothing.
    async fn read(view: &ViewDef, table: &deltalake::DeltaTable) -> Result<Self, BatchError> {
        let mut out = Loaded::empty(view);
        out.published = published(table).await?;
        if out.published.hash.as_deref() != Some(view.definition_hash.as_str()) {
            return Ok(out);
        }
        let names: HashMap<String, usize> = std::iter::once(BASE_ROLLUP.to_string())
            .chain(view.rollups.iter().map(Rollup::name))
            .enumerate()
            .map(|(i, name)| (name, i))
            .collect();
        let ctx = session();
        ctx.register_table("v", table.table_provider().await?)?;
        let mut columns = vec![ident(ROLLUP_COLUMN), ident(BUCKET_COLUMN)];
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
        let df = ctx.table("v").await?.select(columns)?.sort(vec![
            ident(ROLLUP_COLUMN).sort(true, false),
            ident(BUCKET_COLUMN).sort(true, false),
        ])?;
        let dims = view.dimensions.len();
        for b in df.collect().await? {
            let rollups = cast(b.column(0), &DataType::Utf8)?;
            let rollups = rollups.as_string::<i32>();
            let buckets = b.column(1).as_primitive::<TimestampMicrosecondType>();
            let texts: Vec<ArrayRef> = (0..dims)
                .map(|i| cast(b.column(2 + i), &DataType::Utf8))
                .collect::<Result<_, _>>()?;
            for row in 0..b.num_rows() {
                // Rows of a rollup the definition no longer lists are not answered from.
                let Some(&t) = names.get(rollups.value(row)) else {
                    continue;
                };
                out.tables[t].buckets.push(buckets.value(row));
                for (d, col) in texts.iter().enumerate() {
                    let held = match &out.tables[t].rollup {
                        None => true,
                        Some(r) => r.dims.contains(&d),
                    };
                    if !held {
                        continue;
                    }
                    let id = if col.is_null(row) {
                        0
                    } else {
                        out.dictionary.intern(d, col.as_string::<i32>().value(row))
                    };
                    out.tables[t].dims[d].push(id);
                }
                let mut col = 2 + dims;
                for (m, (metric, &width)) in view.metrics.iter().zip(&widths).enumerate() {
                    let state = metric.state_from_batch(&b.columns()[col..col + width], row)?;
                    out.tables[t].states[m].push(state);
                    col += width;
                }
            }
        }
        Ok(out)
    }

    /// The table to answer `q` from: of the view's rows and the rollups that answer it
    /// exactly, the one with the fewest rows in the range.
    fn table_for(&self, q: &ViewQuery) -> &Table {
        self.tables
            .iter()
            .filter(|t| {
                t.rollup
                    .as_ref()
                    .is_none_or(|r| r.answers(q, self.granularity))
            })
            .min_by_key(|t| t.range(q).len())
            .expect("the view's own rows answer every query")
    }

    /// The rows of covered buckets in the query's range, filtered and grouped as asked.
    /// The grouped rows of `q` (at most `max_groups`, else a bad-query error).
    fn answer(
        &self,
        view: &str,
        max_groups: usize,
        q: &ViewQuery,
        coverage: &Coverage,
    ) -> tandem_core::Result<Vec<AggRow>> {
        let table = self.table_for(q);
        let std::ops::Range { start, end } = table.range(q);
        // Each filter as whether it accepts each id of its dimension.
        let filters: Vec<(usize, Vec<bool>)> = q
            .filters
            .iter()
            .map(|(d, m)| (*d, self.dictionary.accepted(*d, m)))
            .collect();
        // Rows are sorted by bucket: group one bucket at a time, looking groups up by a reused
        // key, so a row that joins a group allocates nothing.
        let mut out = Vec::new();
        let mut groups: HashMap<Vec<u32>, Vec<MetricState>> = HashMap::new();
        let mut key: Vec<u32> = Vec::with_capacity(q.group_by.len());
        let mut row = start;
        while row < end {
            let bucket = table.buckets[row];
            let run_end = row + table.buckets[row..end].partition_point(|&b| b == bucket);
            if coverage.covers(bucket) {
                for r in row..run_end {
                    if !filters
                        .iter()
                        .all(|(d, accepted)| accepted[table.dims[*d][r] as usize])
                    {
                        continue;
                    }
                    key.clear();
                    key.extend(q.group_by.iter().map(|&d| table.dims[d][r]));
                    match groups.get_mut(key.as_slice()) {
                        Some(states) => {
                            for (s, &m) in states.iter_mut().zip(&q.metrics) {
                                s.merge(&table.states[m][r]);
                            }
                        }
                        None => {
                            let states = q
                                .metrics
                                .iter()
                                .map(|&m| table.states[m][r].clone())
                                .collect();
                            groups.insert(key.clone(), states);
                        }
                    }
                }
                if out.len() + groups.len() > max_groups {
                    return Err(too_many_groups(view, max_groups));
                }
                out.extend(groups.drain().map(|(ids, states)| {
                    AggRow {
                        bucket_us: bucket,
                        dims: q
                            .group_by
                            .iter()
                            .zip(ids)
                            .map(|(&d, id)| self.dictionary.value(d, id).map(str::to_string))
                            .collect(),
                        states,
                    }
                }));
            }
            row = run_end;
        }
        Ok(out)
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

    fn health(&self) -> Option<String> {
        let slots = self.slots.lock().expect("slots lock");
        let failing: Vec<String> = slots
            .values()
            .filter_map(|slot| {
                let failure = slot.failure.lock().expect("failure lock").clone()?;
                let serving = slot
                    .newest()
                    .and_then(|l| l.published.coverage.version)
                    .map_or("nothing".to_string(), |v| format!("version {v}"));
                Some(format!(
                    "view `{}` cannot be refreshed ({failure}); serving {serving}",
                    slot.view.name
                ))
            })
            .collect();
        (!failing.is_empty()).then(|| failing.join("; "))
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
        loaded.answer(&view.name, self.max_groups, q, coverage)
    }
}
