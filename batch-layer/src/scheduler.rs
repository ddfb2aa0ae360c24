//! The scheduler: runs views (their recompute of new and dirty days) and SQL jobs on their
//! cron schedules, any number of schedulers at once.
//!
//! - **What is due** comes from the runs table (crate::runs), not from memory: a task is due
//!   when its schedule's newest tick has no finished run (succeeded, or failed for good). A
//!   scheduler that was down for three ticks finds only the newest one due: a missed run is
//!   caught up once.
//! - **Leases**: before running a task a scheduler takes its lease, an object
//!   `batch/leases/<task>/<term>` created only if absent (a conditional put, which every object
//!   store offers): of two schedulers creating the same term, one wins. A lease expires
//!   `lease_ttl` after it was taken or renewed (its holder renews it while the run lasts, each
//!   renewal the next term), so a holder that dies frees the task within one TTL. After taking
//!   the lease the scheduler reads the runs table again, so that a run another scheduler just
//!   finished is not repeated.
//! - **Final inputs**: a job's run for date D waits until every day it reads (its window, and
//!   `lag_days` after D) is final: covered by each view it names, closed for each master
//!   dataset it names.
//! - **Retries**: a failed attempt is recorded `retrying` and tried again after a back-off
//!   that doubles each time; the last allowed attempt that fails is recorded `failed`.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use tandem_core::job::{JobDef, Schedule};
use tandem_core::storage::Storage;
use tandem_core::time::{day_number, Clock};
use tandem_core::view::ViewDef;
use tandem_core::Catalog;

use crate::compute::{BatchLayer, BatchOptions, RunRequest};
use crate::error::{BatchError, Result};
use crate::runs::{self, RunRecord, FAILED, RETRYING, SUCCEEDED};

/// The lease of one task, as its current term's object says.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseBody {
    holder: String,
    /// Epoch µs after which the lease is free (0: released).
    expires_us: i64,
}

/// A lease held: the task and its newest term.
#[derive(Debug)]
pub struct Lease {
    task: String,
    term: AtomicU64,
}

/// Leases on tasks, by conditional create in the object store.
#[derive(Debug, Clone)]
pub struct Leases {
    store: Arc<dyn ObjectStore>,
    holder: String,
    ttl_us: i64,
    clock: Arc<dyn Clock>,
}

fn store_error(e: object_store::Error) -> BatchError {
    BatchError::Core(tandem_core::CoreError::ObjectStore {
        url: "batch/leases".into(),
        source: Box::new(e),
    })
}

impl Leases {
    pub fn new(
        storage: &Storage,
        holder: impl Into<String>,
        ttl: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        Ok(Leases {
            store: storage.objects()?,
            holder: holder.into(),
            ttl_us: ttl.as_micros() as i64,
            clock,
        })
    }

    fn term_path(task: &str, term: u64) -> ObjectPath {
        ObjectPath::from(format!("batch/leases/{task}/{term:020}.json"))
    }

    /// The newest term of `task` and its body.
    async fn current(&self, task: &str) -> Result<Option<(u64, LeaseBody)>> {
        use futures::TryStreamExt;
        let prefix = ObjectPath::from(format!("batch/leases/{task}"));
        let listed: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(store_error)?;
        let newest = listed
            .iter()
            .filter_map(|m| {
                let name = m.location.filename()?;
                Some((name.strip_suffix(".json")?.parse::<u64>().ok()?, m))
            })
            .max_by_key(|(t, _)| *t);
        let Some((term, meta)) = newest else {
            return Ok(None);
        };
        let bytes = match self.store.get(&meta.location).await {
            Ok(r) => r.bytes().await.map_err(store_error)?,
            // Cleaned up meanwhile: a newer term exists; read again.
            Err(object_store::Error::NotFound { .. }) => return Box::pin(self.current(task)).await,
            Err(e) => return Err(store_error(e)),
        };
        let body: LeaseBody = serde_json::from_slice(&bytes).unwrap_or(LeaseBody {
            holder: String::new(),
            expires_us: 0,
        });
        Ok(Some((term, body)))
    }

    /// Creates `term` of `task`; false if another got there first.
    async fn create(&self, task: &str, term: u64, body: &LeaseBody) -> Result<bool> {
        let bytes = serde_json::to_vec(body).expect("a lease serializes");
        let put = self
            .store
            .put_opts(
                &Self::term_path(task, term),
                PutPayload::from(bytes),
                PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                },
            )
            .await;
        match put {
            Ok(_) => {
                // Older terms are history; keep the one before, for whoever is reading it.
                if term >= 2 {
                    let _ = self.store.delete(&Self::term_path(task, term - 2)).await;
                }
                Ok(true)
            }
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_error(e)),
        }
    }

    /// Takes the lease of `task` if it is free (never taken, released or expired).
    pub async fn acquire(&self, task: &str) -> Result<Option<Lease>> {
        let now = self.clock.now_us();
        let term = match self.current(task).await? {
            None => 0,
            Some((_, body)) if body.expires_us > now => return Ok(None),
            Some((term, _)) => term + 1,
        };
        let body = LeaseBody {
            holder: self.holder.clone(),
            expires_us: now + self.ttl_us,
        };
        Ok(self.create(task, term, &body).await?.then(|| Lease {
            task: task.to_string(),
            term: AtomicU64::new(term),
        }))
    }

    /// Extends a held lease by a TTL from now; false if it was lost (it expired and another
    /// holder took it).
    pub async fn renew(&self, lease: &Lease) -> Result<bool> {
        let term = lease.term.load(Ordering::SeqCst) + 1;
        let body = LeaseBody {
            holder: self.holder.clone(),
            expires_us: self.clock.now_us() + self.ttl_us,
        };
        let ok = self.create(&lease.task, term, &body).await?;
        if ok {
            lease.term.store(term, Ordering::SeqCst);
        }
        Ok(ok)
    }

    /// Gives a lease back, so that the task is free before its TTL.
    pub async fn release(&self, lease: &Lease) -> Result<()> {
        let term = lease.term.load(Ordering::SeqCst) + 1;
        let body = LeaseBody {
            holder: self.holder.clone(),
            expires_us: 0,
        };
        self.create(&lease.task, term, &body).await?;
        Ok(())
    }
}

/// How the scheduler runs.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// When views are recomputed (their new and dirty days); `None`: views are not scheduled.
    pub views: Option<Schedule>,
    /// Attempts of a view's scheduled run, and the first back-off.
    pub view_max_attempts: u32,
    pub view_backoff: Duration,
    /// How long a lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// This scheduler's name in leases and runs.
    pub holder: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            views: Some(Schedule::parse("0 1 * * *", chrono_tz::UTC).expect("a valid cron")),
            view_max_attempts: 3,
            view_backoff: Duration::from_secs(300),
            lease_ttl: Duration::from_secs(300),
            holder: format!("{}-{}", hostname(), std::process::id()),
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tandem".into())
}

/// A task the scheduler runs.
#[derive(Debug, Clone)]
enum Task {
    View(Arc<ViewDef>),
    Job(Arc<JobDef>),
}

impl Task {
    fn name(&self) -> &str {
        match self {
            Task::View(v) => &v.name,
            Task::Job(j) => &j.name,
        }
    }
    fn kind(&self) -> &'static str {
        match self {
            Task::View(_) => "view",
            Task::Job(_) => "job",
        }
    }
}

/// Runs views and jobs on their schedules.
#[derive(Debug, Clone)]
pub struct Scheduler {
    storage: Storage,
    catalog: Arc<Catalog>,
    clock: Arc<dyn Clock>,
    options: BatchOptions,
    config: SchedulerConfig,
    leases: Leases,
}

impl Scheduler {
    pub fn new(
        storage: Storage,
        catalog: Arc<Catalog>,
        clock: Arc<dyn Clock>,
        options: BatchOptions,
        config: SchedulerConfig,
    ) -> Result<Self> {
        let leases = Leases::new(
            &storage,
            config.holder.clone(),
            config.lease_ttl,
            Arc::clone(&clock),
        )?;
        Ok(Scheduler {
            storage,
            catalog,
            clock,
            options,
            config,
            leases,
        })
    }

    fn tasks(&self) -> Vec<(Task, Schedule, u32, Duration)> {
        let mut out = Vec::new();
        if let Some(s) = &self.config.views {
            for v in self.catalog.views.values() {
                out.push((
                    Task::View(Arc::clone(v)),
                    s.clone(),
                    self.config.view_max_attempts,
                    self.config.view_backoff,
                ));
            }
        }
        for j in self.catalog.jobs.values() {
            if let Some(s) = &j.schedule {
                out.push((
                    Task::Job(Arc::clone(j)),
                    s.clone(),
                    j.max_attempts,
                    Duration::from_secs(j.retry_backoff_secs),
                ));
            }
        }
        out
    }

    /// One round: runs every task that is due now, one after another. Returns the runs it
    /// recorded.
    pub async fn tick(&self) -> Result<Vec<RunRecord>> {
        let mut recorded = Vec::new();
        let history = runs::list(&self.storage, None).await?;
        for (task, schedule, max_attempts, backoff) in self.tasks() {
            let now = self.clock.now_us();
            let Some(tick) = schedule.last_tick(now) else {
                continue;
            };
            let Some(attempt) = due(&history, task.name(), tick, now, backoff) else {
                continue;
            };
            let date = match &task {
                Task::Job(j) => {
                    let Some(date) = j.date_for_tick(tick) else {
                        continue;
                    };
                    if let Some(why) = self.waiting_for(j, date).await? {
                        tracing::info!(job = %j.name, %date, %why, "waiting for final inputs");
                        continue;
                    }
                    Some(date)
                }
                Task::View(_) => None,
            };
            let Some(lease) = self.leases.acquire(task.name()).await? else {
                tracing::debug!(task = task.name(), "leased by another scheduler");
                continue;
            };
            // Another scheduler may have finished it between our read and our lease.
            let fresh = runs::list(&self.storage, Some(task.name())).await?;
            let Some(attempt) =
                due(&fresh, task.name(), tick, now, backoff).map(|a| a.max(attempt))
            else {
                self.leases.release(&lease).await?;
                continue;
            };
            let record = self
                .run_leased(&task, &lease, date, tick, attempt, max_attempts)
                .await;
            self.leases.release(&lease).await?;
            let record = record?;
            runs::record(&self.storage, std::slice::from_ref(&record)).await?;
            recorded.push(record);
        }
        Ok(recorded)
    }

    /// Runs a task under its lease (renewed meanwhile) and says how it went.
    async fn run_leased(
        &self,
        task: &Task,
        lease: &Lease,
        date: Option<NaiveDate>,
        tick: i64,
        attempt: u32,
        max_attempts: u32,
    ) -> Result<RunRecord> {
        let started_us = self.clock.now_us();
        let started = std::time::Instant::now();
        let renew_every = self.config.lease_ttl / 3;
        let outcome = {
            let work = self.run_task(task, date);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    r = &mut work => break r,
                    _ = tokio::time::sleep(renew_every) => {
                        if !self.leases.renew(lease).await? {
                            tracing::warn!(task = task.name(), "lease lost while running (it expired and another scheduler took it)");
                        }
                    }
                }
            }
        };
        let (status, rows, date_done, error) = match outcome {
            Ok((rows, d)) => (SUCCEEDED, rows, d, None),
            Err(e) => {
                let message = error_chain(&e);
                let status = if attempt >= max_attempts {
                    FAILED
                } else {
                    RETRYING
                };
                tracing::warn!(task = task.name(), attempt, status, error = %message, "run failed");
                (status, 0, date.map(|d| d.to_string()), Some(message))
            }
        };
        Ok(RunRecord {
            task: task.name().to_string(),
            kind: task.kind().into(),
            date: date_done,
            trigger: "schedule".into(),
            scheduled_us: Some(tick),
            started_us,
            seconds: started.elapsed().as_secs_f64(),
            rows,
            status: status.into(),
            attempt: attempt as i32,
            error,
            holder: self.config.holder.clone(),
        })
    }

    async fn run_task(
        &self,
        task: &Task,
        date: Option<NaiveDate>,
    ) -> Result<(i64, Option<String>)> {
        match (task, date) {
            (Task::Job(j), Some(date)) => {
                let r = crate::jobs::run_job(
                    &self.storage,
                    &self.catalog,
                    &self.options,
                    j,
                    date,
                    Vec::new(),
                )
                .await?;
                Ok((r.rows as i64, Some(r.date)))
            }
            (Task::View(v), _) => {
                let layer = BatchLayer::new(
                    self.storage.clone(),
                    Arc::clone(&self.catalog),
                    Arc::clone(&self.clock),
                )
                .with_options(self.options.clone());
                let r = layer.run_view(v, &RunRequest::default()).await?;
                Ok((r.rows as i64, r.days.first().cloned()))
            }
            (Task::Job(j), None) => Err(BatchError::BadRequest(format!(
                "job `{}` has no date to run",
                j.name
            ))),
        }
    }

    /// Why `job`'s run for `date` cannot start yet, if it cannot: a day it reads is not final.
    pub async fn waiting_for(&self, job: &JobDef, date: NaiveDate) -> Result<Option<String>> {
        let first = day_number(date) - (job.window_days - 1);
        let last = day_number(date) + job.lag_days;
        let layer = BatchLayer::new(
            self.storage.clone(),
            Arc::clone(&self.catalog),
            Arc::clone(&self.clock),
        );
        for table in tables_read(job, date)? {
            if let Some(view) = self.catalog.views.get(&table) {
                let covered = match self
                    .storage
                    .open(&self.storage.layout().view(&table))
                    .await?
                {
                    Some(t) => crate::compute::published(&t).await?.coverage.days,
                    None => BTreeSet::new(),
                };
                if let Some(d) = (first..=last).find(|d| !covered.contains(d)) {
                    return Ok(Some(format!(
                        "view `{}` does not cover {} yet",
                        view.name,
                        tandem_core::time::day_string(d)
                    )));
                }
            } else if self.catalog.schemas.contains_key(&table) {
                let open = layer.first_open_day(&table).await?;
                if last >= open {
                    return Ok(Some(format!(
                        "{} of `{table}` is not closed yet",
                        tandem_core::time::day_string(last)
                    )));
                }
            }
        }
        Ok(None)
    }

    /// Ticks until `stop` resolves: each round as soon as the previous ends, at most every
    /// `every` (and when a schedule's next tick comes).
    pub async fn run_until(&self, every: Duration, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            match self.tick().await {
                Ok(done) if !done.is_empty() => {
                    tracing::info!(runs = done.len(), "scheduler round done");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %error_chain(&e), "scheduler round failed"),
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// The tables `job`'s SQL names (for `date`).
fn tables_read(job: &JobDef, date: NaiveDate) -> Result<BTreeSet<String>> {
    let ctx = datafusion::prelude::SessionContext::new();
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let sql = job.sql_for(date)?;
    let parse = |e: datafusion::error::DataFusionError| BatchError::Job {
        path: job.path.display().to_string(),
        message: e.to_string(),
    };
    let statement = state.sql_to_statement(&sql, &dialect).map_err(parse)?;
    Ok(state
        .resolve_table_references(&statement)
        .map_err(parse)?
        .into_iter()
        .map(|t| t.table().to_string())
        .collect())
}

/// Whether `task`'s `tick` is due at `now`, and as which attempt: not if a run of that tick
/// finished (succeeded or failed for good), nor while the back-off after a failed attempt
/// lasts.
fn due(history: &[RunRecord], task: &str, tick: i64, now: i64, backoff: Duration) -> Option<u32> {
    let mine: Vec<&RunRecord> = history
        .iter()
        .filter(|r| r.task == task && r.trigger == "schedule" && r.scheduled_us == Some(tick))
        .collect();
    if mine.iter().any(|r| r.status != RETRYING) {
        return None;
    }
    let failed = mine.len() as u32;
    if let Some(last) = mine.iter().max_by_key(|r| r.started_us) {
        let wait = backoff.as_micros() as i64 * (1i64 << (failed - 1).min(20));
        let ended = last.started_us + (last.seconds * 1e6) as i64;
        if now < ended + wait {
            return None;
        }
    }
    Some(failed + 1)
}

/// An error and its sources, one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        source = c.source();
    }
    s
}
