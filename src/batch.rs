//! The batch commands: runs of views and jobs by hand, the scheduler, the runs table, a view's
//! publishes and rollback, backfills, and ad-hoc SQL.

use std::io::{IsTerminal, Write as _};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tandem_batch::backfill::{Backfill, BackfillProgress, Target};
use tandem_batch::runs::{RunRecord, FAILED, RETRYING, SUCCEEDED};
use tandem_batch::scheduler::{error_chain, Scheduler};
use tandem_batch::{BatchLayer, RunRequest};
use tandem_core::storage::Storage;
use tandem_core::time::{day_string, parse_day};

use crate::config::Config;
use crate::roles::{catalog, clock};

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Recompute views from the master dataset and publish them, or run an SQL job.
    Run {
        /// Only this view.
        #[arg(long, conflicts_with = "job")]
        view: Option<String>,
        /// Run this SQL job (for --date, or each date of --from..--to) instead of views.
        #[arg(long)]
        job: Option<String>,
        /// The job's date (YYYY-MM-DD).
        #[arg(long, requires = "job", conflicts_with_all = ["from", "to"])]
        date: Option<String>,
        /// First day (YYYY-MM-DD) to recompute.
        #[arg(long, requires = "to")]
        from: Option<String>,
        /// Last day (YYYY-MM-DD) to recompute, inclusive.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// Recompute every closed day, not only new and dirty ones.
        #[arg(long, conflicts_with_all = ["from", "to"])]
        full: bool,
        /// Print the reports as one JSON object on stdout (progress still goes to stderr).
        #[arg(long)]
        json: bool,
        /// The bytes the recompute may hold before it spills (e.g. `1GiB`; default:
        /// `batch.memory_limit`).
        #[arg(long)]
        memory_limit: Option<String>,
        /// Where recomputes run: `local` (this process) or `ballista://HOST:PORT` (a Ballista
        /// cluster's scheduler; default: `batch.engine`).
        #[arg(long)]
        engine: Option<String>,
    },
    /// Run views and SQL jobs on their schedules until stopped (any number of schedulers may
    /// run: leases keep them from running one task twice).
    Schedule {
        /// One round only: run what is due now, then exit.
        #[arg(long)]
        once: bool,
    },
    /// List the runs of views and jobs (scheduled, by hand, backfills), oldest first.
    Runs {
        /// Only this job's (or view's) runs.
        #[arg(long)]
        job: Option<String>,
        /// Only failed attempts (retried or given up).
        #[arg(long)]
        failed: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// List a view's publishes and rollbacks, newest first.
    History {
        /// The view.
        #[arg(long)]
        view: String,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Restore a view to one of its publishes (a new commit: rows, coverage and definition as
    /// they were then; serving answers from it at once).
    Rollback {
        /// The view.
        #[arg(long)]
        view: String,
        /// The version of the publish to restore (see `batch history`).
        #[arg(long)]
        to_version: i64,
    },
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("target").required(true).args(["view", "job"]))]
pub struct BackfillArgs {
    /// The view to recompute.
    #[arg(long)]
    pub view: Option<String>,
    /// The SQL job to run for each date.
    #[arg(long)]
    pub job: Option<String>,
    /// First day (YYYY-MM-DD).
    #[arg(long)]
    pub from: String,
    /// Last day (YYYY-MM-DD), inclusive.
    #[arg(long)]
    pub to: String,
    /// Days per chunk; each chunk is published atomically, and a re-run resumes after the
    /// last chunk published.
    #[arg(long, default_value_t = 7)]
    pub chunk_days: usize,
    /// Start from --from even if an earlier run of this backfill published chunks.
    #[arg(long)]
    pub restart: bool,
    /// Progress as log lines even on a terminal.
    #[arg(long)]
    pub no_progress_bar: bool,
}

#[derive(Debug, Args)]
pub struct SqlArgs {
    /// The query (read-only): over the master datasets (named after their schemas), the
    /// views' published rows and the jobs' outputs (named after their files).
    pub query: String,
    /// table, csv, json (one object per line) or parquet.
    #[arg(long, default_value = "table", value_parser = ["table", "csv", "json", "parquet"])]
    pub format: String,
    /// Write to this file instead of stdout.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

fn day(flag: &str, v: Option<&str>) -> Result<Option<i64>> {
    v.map(|s| parse_day(s).with_context(|| format!("{flag} `{s}` is not a day (YYYY-MM-DD)")))
        .transpose()
}

fn date(d: i64) -> Result<chrono::NaiveDate> {
    chrono::NaiveDate::parse_from_str(&day_string(d), "%Y-%m-%d")
        .with_context(|| format!("day {d} is out of range"))
}

pub async fn batch(config: &Config, cmd: BatchCommand) -> Result<()> {
    match cmd {
        BatchCommand::Run {
            view,
            job,
            date,
            from,
            to,
            full,
            json,
            memory_limit,
            engine,
        } => {
            let mut options = config.batch.clone();
            if let Some(e) = engine {
                options.engine = crate::config::parse_engine(&e).context("--engine")?;
            }
            if let Some(m) = memory_limit {
                options.memory_limit = Some(
                    crate::config::parse_size(&toml::Value::String(m))
                        .map_err(|e| anyhow::anyhow!("--memory-limit: {e}"))?,
                );
            }
            match job {
                Some(job) => run_job(config, options, &job, date, from, to, full, json).await,
                None => run_views(config, options, view, from, to, full, json).await,
            }
        }
        BatchCommand::Schedule { once } => schedule(config, once).await,
        BatchCommand::Runs { job, failed, json } => runs(config, job, failed, json).await,
        BatchCommand::History { view, json } => history(config, &view, json).await,
        BatchCommand::Rollback { view, to_version } => {
            let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
            catalog.view(&view)?;
            let version = tandem_batch::publishes::rollback(&storage, &view, to_version).await?;
            println!(
                "{view}: rolled back to the publish of version {to_version}, as version {version}"
            );
            Ok(())
        }
    }
}

/// A run by hand, in the runs table.
fn manual(task: &str, kind: &str, date: Option<String>, started_us: i64) -> RunRecord {
    RunRecord {
        task: task.to_string(),
        kind: kind.into(),
        date,
        trigger: "manual".into(),
        scheduled_us: None,
        started_us,
        seconds: 0.0,
        rows: 0,
        status: SUCCEEDED.into(),
        attempt: 1,
        error: None,
        holder: "cli".into(),
    }
}

/// Records a run by hand that failed, and gives its error back.
async fn failed(
    storage: &Storage,
    mut record: RunRecord,
    e: tandem_batch::BatchError,
) -> anyhow::Error {
    record.status = FAILED.into();
    record.error = Some(error_chain(&e));
    if let Err(not_recorded) = tandem_batch::runs::record(storage, &[record]).await {
        tracing::warn!(error = %not_recorded, "the failed run could not be recorded");
    }
    e.into()
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    config: &Config,
    options: tandem_batch::BatchOptions,
    job: &str,
    date_flag: Option<String>,
    from: Option<String>,
    to: Option<String>,
    full: bool,
    json: bool,
) -> Result<()> {
    if full {
        bail!("--full recomputes views; a job runs for --date or --from/--to");
    }
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let def = Arc::clone(catalog.job(job)?);
    tandem_batch::jobs::check(&storage, &catalog).await?;
    let days: Vec<i64> = match (
        day("--date", date_flag.as_deref())?,
        day("--from", from.as_deref())?,
        day("--to", to.as_deref())?,
    ) {
        (Some(d), _, _) => vec![d],
        (None, Some(a), Some(b)) if a <= b => (a..=b).collect(),
        (None, Some(_), Some(_)) => bail!("--from is after --to"),
        _ => bail!("give the job's --date, or --from and --to"),
    };
    let layer =
        BatchLayer::new(storage.clone(), Arc::clone(&catalog), clock()).with_options(options);
    let mut reports = Vec::new();
    for d in days {
        let started_us = layer.now_us();
        let started = std::time::Instant::now();
        let mut record = manual(job, "job", Some(day_string(d)), started_us);
        let outcome = layer.run_job(&def, date(d)?, Vec::new()).await;
        record.seconds = started.elapsed().as_secs_f64();
        match outcome {
            Ok(r) => {
                record.rows = r.rows as i64;
                tandem_batch::runs::record(&storage, &[record]).await?;
                if !json {
                    println!(
                        "{job} {}: {} rows as version {} in {:.2} s",
                        r.date, r.rows, r.version, r.seconds
                    );
                }
                reports.push(r);
            }
            Err(e) => return Err(failed(&storage, record, e).await),
        }
    }
    if json {
        println!("{}", serde_json::json!({ "jobs": reports }));
    }
    Ok(())
}

async fn run_views(
    config: &Config,
    options: tandem_batch::BatchOptions,
    view: Option<String>,
    from: Option<String>,
    to: Option<String>,
    full: bool,
    json: bool,
) -> Result<()> {
    let req = RunRequest {
        from_day: day("--from", from.as_deref())?,
        to_day: day("--to", to.as_deref())?,
        full,
        ..Default::default()
    };
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let started = std::time::Instant::now();
    let progress: tandem_batch::Progress = Arc::new(|view: &str, d: &tandem_batch::DayReport| {
        let spilled = if d.spilled_bytes > 0 {
            format!(", spilled {:.1} MB", d.spilled_bytes as f64 / 1e6)
        } else {
            String::new()
        };
        eprintln!(
            "{view} {}: read {} rows ({:.1} MB) -> {} rows, {} rollup rows in {:.2} s, written in {:.2} s{spilled}",
            d.day,
            d.rows_read,
            d.bytes_read as f64 / 1e6,
            d.rows,
            d.rollup_rows,
            d.seconds,
            d.write_seconds
        );
    });
    let layer = BatchLayer::new(storage.clone(), Arc::clone(&catalog), clock())
        .with_options(options)
        .with_progress(progress);
    let views: Vec<_> = match &view {
        Some(v) => vec![Arc::clone(catalog.view(v)?)],
        None => catalog.views.values().cloned().collect(),
    };
    // The views are computed together, day by day (a day read once for the views of a
    // schema), and each is published and recorded on its own.
    let started_us = layer.now_us();
    let outcomes = layer.run_each(&views, &req).await;
    let mut reports = Vec::new();
    let mut first_failure = None;
    for (v, outcome) in views.iter().zip(outcomes) {
        let mut record = manual(&v.name, "view", None, started_us);
        match outcome {
            Ok(r) => {
                record.seconds = r.seconds;
                if r.version.is_some() && !r.days.is_empty() {
                    record.rows = r.rows as i64;
                    record.date = r.days.first().cloned();
                    tandem_batch::runs::record(&storage, &[record]).await?;
                }
                reports.push(r);
            }
            Err(e) => {
                record.seconds = started.elapsed().as_secs_f64();
                let e = failed(&storage, record, e).await;
                // The first failure is the command's error; later ones are logged.
                match first_failure {
                    None => first_failure = Some(e),
                    Some(_) => {
                        tracing::error!(view = %v.name, error = %format!("{e:#}"), "the view's run failed")
                    }
                }
            }
        }
    }
    if let Some(e) = first_failure {
        return Err(e);
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "views": reports,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
        return Ok(());
    }
    for r in reports {
        match (r.days.len(), r.version) {
            (0, _) => println!("{}: nothing to recompute", r.view),
            (n, Some(v)) => println!(
                "{}: published {} rows and {} rollup rows for {n} day(s) {}..{} as version {v}; read {} rows ({:.1} MB); {:.2} s ({:.2} s publishing)",
                r.view,
                r.rows,
                r.rollup_rows,
                r.days[0],
                r.days[n - 1],
                r.rows_read,
                r.bytes_read as f64 / 1e6,
                r.seconds,
                r.publish_seconds
            ),
            (n, None) => println!("{}: computed {n} day(s)", r.view),
        }
    }
    Ok(())
}

/// The scheduler of `config`, its jobs' SQL checked.
pub async fn scheduler(config: &Config) -> Result<Scheduler> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    tandem_batch::jobs::check(&storage, &catalog).await?;
    Ok(Scheduler::new(
        storage,
        catalog,
        clock(),
        config.batch.clone(),
        config.scheduler.clone(),
    )?)
}

async fn schedule(config: &Config, once: bool) -> Result<()> {
    let scheduler = scheduler(config).await?;
    if once {
        for r in scheduler.tick().await? {
            print_run(&r);
        }
        return Ok(());
    }
    tracing::info!(every = ?config.scheduler_interval, holder = %config.scheduler.holder, "scheduler started");
    scheduler
        .run_until(config.scheduler_interval, crate::roles::shutdown_signal())
        .await;
    Ok(())
}

fn print_run(r: &RunRecord) {
    let when = tandem_core::time::format_us(r.started_us);
    let error = r
        .error
        .as_deref()
        .map(|e| format!("  {e}"))
        .unwrap_or_default();
    println!(
        "{when}  {:<24} {:<4} {:<10} {:<9} attempt {}  {:>8.2} s  {:>9} rows  {:<8}{error}",
        r.task,
        r.kind,
        r.date.as_deref().unwrap_or("-"),
        r.status,
        r.attempt,
        r.seconds,
        r.rows,
        r.trigger,
    );
}

async fn runs(config: &Config, job: Option<String>, failed: bool, json: bool) -> Result<()> {
    let storage = Storage::new(config.layout.clone())?;
    let list = tandem_batch::runs::list(&storage, job.as_deref()).await?;
    for r in list
        .iter()
        .filter(|r| !failed || r.status == FAILED || r.status == RETRYING)
    {
        if json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            print_run(r);
        }
    }
    Ok(())
}

async fn history(config: &Config, view: &str, json: bool) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    catalog.view(view)?;
    for e in tandem_batch::publishes::history(&storage, view).await? {
        if json {
            println!("{}", serde_json::to_string(&e)?);
            continue;
        }
        let when = e
            .timestamp_ms
            .map(|t| tandem_core::time::format_us(t * 1000))
            .unwrap_or_default();
        let coverage: Vec<String> = e
            .coverage
            .iter()
            .map(|(a, b)| {
                if a == b {
                    a.clone()
                } else {
                    format!("{a}..{b}")
                }
            })
            .collect();
        let what = match e.restored {
            Some(v) => format!("rollback to version {v}"),
            None => format!(
                "publish of {} day(s){}",
                e.days.len(),
                match (e.days.first(), e.days.last()) {
                    (Some(a), Some(b)) => format!(" {a}..{b}"),
                    _ => String::new(),
                }
            ),
        };
        println!(
            "version {:>4}  {when}  {what}; covers {}; definition {}",
            e.version,
            if coverage.is_empty() {
                "nothing".into()
            } else {
                coverage.join(", ")
            },
            e.definition_hash
                .as_deref()
                .map_or("-", |h| &h[..h.len().min(12)]),
        );
    }
    Ok(())
}

pub async fn backfill(config: &Config, args: BackfillArgs) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let target = match (&args.view, &args.job) {
        (Some(v), None) => Target::View(Arc::clone(catalog.view(v)?)),
        (None, Some(j)) => {
            tandem_batch::jobs::check(&storage, &catalog).await?;
            Target::Job(Arc::clone(catalog.job(j)?))
        }
        _ => bail!("give --view or --job"),
    };
    let (Some(from), Some(to)) = (
        day("--from", Some(&args.from))?,
        day("--to", Some(&args.to))?,
    ) else {
        bail!("--from and --to are required");
    };
    if args.chunk_days == 0 {
        bail!("--chunk-days must be at least 1");
    }
    let backfill = Backfill {
        target,
        from,
        to,
        chunk_days: args.chunk_days,
        restart: args.restart,
    };
    let layer =
        BatchLayer::new(storage, Arc::clone(&catalog), clock()).with_options(config.batch.clone());
    let total = (to - from + 1).max(0) as u64;
    let bar = (!args.no_progress_bar && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} days  {msg}  {per_sec}  ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("backfill {}", backfill.target.name()));
        bar
    });
    let observer: tandem_batch::backfill::BackfillObserver = {
        let bar = bar.clone();
        let first = std::sync::Mutex::new(true);
        Arc::new(move |p: &BackfillProgress| {
            let left = p.total_days - p.done_days;
            let fresh = (p.done_days - p.resumed_days).max(1) as f64;
            let rate = fresh / p.seconds.max(1e-3);
            match &bar {
                Some(bar) => {
                    let mut first = first.lock().expect("not poisoned");
                    if *first && p.resumed_days > 0 {
                        bar.set_position(p.resumed_days as u64);
                        bar.reset_eta();
                    }
                    *first = false;
                    bar.set_message(format!("{} rows", p.total_rows));
                    bar.set_position(p.done_days as u64);
                }
                None => eprintln!(
                    "backfill {}: {}..{} published ({} rows); {}/{} days, {} rows, {:.2} days/s, ETA {:.0} s",
                    p.target,
                    p.chunk.0,
                    p.chunk.1,
                    p.rows,
                    p.done_days,
                    p.total_days,
                    p.total_rows,
                    rate,
                    left as f64 / rate
                ),
            }
        })
    };
    let report = backfill.run(&layer, Some(observer)).await;
    if let Some(bar) = &bar {
        bar.finish();
    }
    let report = report?;
    if report.published_days == 0 && report.resumed_days > 0 {
        println!(
            "backfill {} {}..{}: already complete (resumed: every day was published by an earlier run of it); --restart runs it again",
            report.target, report.from, report.to
        );
        return Ok(());
    }
    let resumed = if report.resumed_days > 0 {
        format!(
            " (resumed: {} day(s) were published by an earlier run)",
            report.resumed_days
        )
    } else {
        String::new()
    };
    println!(
        "backfill {} {}..{}: published {} day(s) in {} chunk(s), {} rows, {:.2} s{resumed}",
        report.target,
        report.from,
        report.to,
        report.published_days,
        report.chunks,
        report.rows,
        report.seconds
    );
    Ok(())
}

pub async fn sql(config: &Config, args: SqlArgs) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let ctx = tandem_batch::jobs::session(&storage, &catalog, &config.batch).await?;
    let df = tandem_batch::jobs::query(&ctx, &args.query).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await?;
    let mut out: Box<dyn std::io::Write + Send> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => {
            if args.format == "parquet" && std::io::stdout().is_terminal() {
                bail!("Parquet is binary: give --output FILE, or redirect stdout");
            }
            Box::new(std::io::BufWriter::new(std::io::stdout()))
        }
    };
    use datafusion::arrow;
    match args.format.as_str() {
        "table" => {
            writeln!(
                out,
                "{}",
                arrow::util::pretty::pretty_format_batches(&batches)?
            )?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            writeln!(out, "{rows} row(s)")?;
        }
        "csv" => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if batches.is_empty() {
                w.write(&arrow::record_batch::RecordBatch::new_empty(Arc::clone(
                    &schema,
                )))?;
            }
            for b in &batches {
                w.write(b)?;
            }
        }
        "json" => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
        _ => {
            let mut w = datafusion::parquet::arrow::ArrowWriter::try_new(&mut out, schema, None)?;
            for b in &batches {
                w.write(b)?;
            }
            w.close()?;
        }
    }
    out.flush()?;
    Ok(())
}
