//! The roles: wiring of the layers for `run`, `archive`, `serve`, `batch`, `import`, `query`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tandem_batch::DeltaBatchViews;
use tandem_core::storage::Storage;
use tandem_core::time::{parse_day, Clock, SystemClock};
use tandem_core::traits::{NoRealtime, RealtimeView};
use tandem_core::Catalog;
use tandem_serving::params::{Filters, Names, Scalar};
use tandem_serving::server::{self as http, ConnectionLimits};
use tandem_serving::{
    admin_router, router, ApiMetrics, AppState, Check, Format, QueryLimits, QueryParams, Readiness,
    Shared,
};
use tandem_speed::{ConsumerName, ConsumerOptions, Consumers, KafkaConfig};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Port to listen on (overrides the port of --listen).
    #[arg(long)]
    pub port: Option<u16>,
    /// Port of the admin listener (overrides the port of --admin-listen; on the API's host if
    /// that is not set).
    #[arg(long)]
    pub admin_port: Option<u16>,
}

impl ServeArgs {
    /// The API's address.
    pub fn listen(&self, config: &Config) -> std::net::SocketAddr {
        let mut addr = config.listen;
        if let Some(p) = self.port {
            addr.set_port(p);
        }
        addr
    }

    /// The admin listener's address, if there is one.
    pub fn admin_listen(&self, config: &Config) -> Option<std::net::SocketAddr> {
        admin_listen(config, self.admin_port)
    }
}

/// The admin listener's address: `config`'s, with `port` if given (on the API's host if the
/// configuration has none).
pub fn admin_listen(config: &Config, port: Option<u16>) -> Option<std::net::SocketAddr> {
    match (config.admin_listen, port) {
        (Some(mut a), Some(p)) => {
            a.set_port(p);
            Some(a)
        }
        (Some(a), None) => Some(a),
        (None, Some(p)) => Some(std::net::SocketAddr::new(config.listen.ip(), p)),
        (None, None) => None,
    }
}

#[derive(Debug, Args)]
pub struct DlqFilter {
    /// Only dead letters of this reason: `decode`, `schema` or `event_time`.
    #[arg(long)]
    pub reason: Option<String>,
    /// Only dead letters received at or after this time (RFC 3339, a date or epoch ms).
    #[arg(long)]
    pub since: Option<String>,
    /// The event schema (default: the only schema).
    #[arg(long)]
    pub schema: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Show dead letters: where they came from, why, and their bytes.
    List {
        #[command(flatten)]
        filter: DlqFilter,
        /// At most this many, oldest first.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Decode dead letters again with the current schema; move those that are events now into
    /// the master dataset (once), leave the rest.
    Replay {
        #[command(flatten)]
        filter: DlqFilter,
    },
}

#[derive(Debug, Args)]
pub struct EraseArgs {
    /// The field that identifies the subject, e.g. `device_id`.
    #[arg(long)]
    pub field: String,
    /// The subject's value of the field.
    #[arg(long)]
    pub value: String,
    /// The event schema (default: the only schema).
    #[arg(long)]
    pub schema: Option<String>,
    /// Who asks, for the audit record (default: $USER).
    #[arg(long)]
    pub who: Option<String>,
}

#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Only these days (`YYYY-MM-DD`, comma-separated) of the day-partitioned tables.
    #[arg(long, value_delimiter = ',')]
    pub days: Option<Vec<String>>,
    /// The size to merge files up to, e.g. `128MiB`.
    #[arg(long, default_value = "128MiB")]
    pub target_size: String,
    /// Print the reports as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct VacuumArgs {
    /// Keep every file a version of the last this many hours references (and any file younger):
    /// readers and a running batch still need them.
    #[arg(long, default_value_t = 168)]
    pub retention_hours: u64,
    /// List what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the reports as one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The view to query.
    pub view: String,
    /// Start of the range: RFC 3339, a date or epoch milliseconds (default: a day before --to).
    #[arg(long)]
    pub from: Option<String>,
    /// End of the range, exclusive (default: now).
    #[arg(long)]
    pub to: Option<String>,
    /// minute, hour, day, week (from Monday), month or all (one bucket for the range): the
    /// view's own or coarser.
    #[arg(long)]
    pub granularity: Option<String>,
    /// IANA time zone of day, week and month buckets (default UTC).
    #[arg(long)]
    pub tz: Option<String>,
    /// Comma-separated dimensions.
    #[arg(long)]
    pub group_by: Option<String>,
    /// DIM=VALUE, DIM!=VALUE, DIM.in=A,B, DIM.not_in=A,B or DIM.prefix=TEXT; repeat to
    /// combine.
    #[arg(long = "where")]
    pub filters: Vec<String>,
    /// Comma-separated metrics.
    #[arg(long)]
    pub metrics: Option<String>,
    /// bucket, -bucket, METRIC or -METRIC (descending).
    #[arg(long)]
    pub order_by: Option<String>,
    /// The most rows.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Merge the rows the limit cuts into one `other` row per bucket.
    #[arg(long)]
    pub other: bool,
    /// json or csv.
    #[arg(long, default_value = "json", value_parser = ["json", "csv"])]
    pub format: String,
    /// The server (default: http:// + the configured listen address).
    #[arg(long)]
    pub url: Option<String>,
}

pub fn clock() -> Arc<dyn Clock> {
    Arc::new(SystemClock)
}

pub fn catalog(config: &Config) -> Result<Arc<Catalog>> {
    let fallback = config
        .layout
        .local_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("definitions");
    Ok(Arc::new(crate::defs::load(config, &fallback)?))
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Binds the API's address, so a taken port fails at start. The socket reuses the address, so
/// a server restarted right after a crash binds its port though connections of the old one
/// linger in TIME_WAIT.
pub async fn bind(listen: std::net::SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = if listen.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .context("creating the API's socket")?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(listen)
        .with_context(|| format!("listening on {listen}"))?;
    let listener = socket
        .listen(1024)
        .with_context(|| format!("listening on {listen}"))?;
    tracing::info!(address = %listener.local_addr()?, "serving");
    Ok(listener)
}

/// The connections the admin listener holds at once: enough for probes and scrapers, too few
/// for a client to matter.
pub const ADMIN_CONNECTIONS: usize = 16;

/// Serves the API on `listener`, and the admin routes on `admin` if given, until `shutdown`,
/// within the default connection limits (the admin listener's its own).
pub async fn serve_api(
    mut state: AppState,
    listener: tokio::net::TcpListener,
    admin: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<()> {
    crate::trim_heap_after_bursts();
    // Not ready until every view's published version is loaded (off the request path).
    let loading = load_batch_views(&state, shutdown.clone());
    state.readiness = Arc::new(
        Readiness::default()
            .with("batch views", loading)
            .including(Arc::clone(&state.readiness)),
    );
    if let Some(admin) = admin {
        let app = admin_router(state.clone(), QueryLimits::default());
        let limits = ConnectionLimits {
            max_connections: ADMIN_CONNECTIONS,
            ..Default::default()
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            http::serve(app, admin, limits, shutdown).await;
        });
    }
    http::serve(
        router(state),
        listener,
        ConnectionLimits::default(),
        shutdown,
    )
    .await;
    Ok(())
}

/// Loads the newest published version of every view in the background, each retried until
/// it loads (or `shutdown`); the check says how many are still to load.
fn load_batch_views(state: &AppState, shutdown: CancellationToken) -> Check {
    let views: Vec<_> = state.catalog.views.values().cloned().collect();
    let total = views.len();
    let left = Arc::new(std::sync::atomic::AtomicUsize::new(total));
    let (batch, counter) = (Arc::clone(&state.batch), Arc::clone(&left));
    tokio::spawn(async move {
        for view in views {
            loop {
                match batch.coverage(&view).await {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(view = %view.name, error = %e, "loading a published view failed; retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                    }
                }
            }
            counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Box::new(move || {
        let n = left.load(std::sync::atomic::Ordering::Relaxed);
        (n > 0).then(|| format!("loading the published views: {n} of {total} still to load"))
    })
}

/// The API's keys, checked against the catalog.
pub fn auth(config: &Config, catalog: &Catalog) -> Result<Arc<tandem_serving::auth::Auth>> {
    Ok(Arc::new(
        tandem_serving::auth::Auth::new(config.api_keys.clone(), catalog)
            .map_err(|e| anyhow::anyhow!("api.keys: {e}"))?,
    ))
}

/// Where the API listens: `addr`, or its loopback twin when no API key is configured (and
/// serving anyone beyond this machine was not allowed), said in the log.
pub fn api_listen(
    config: &Config,
    auth: &tandem_serving::auth::Auth,
    addr: std::net::SocketAddr,
) -> std::net::SocketAddr {
    if auth.enabled() || config.allow_anonymous_remote || addr.ip().is_loopback() {
        return addr;
    }
    let local = std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port());
    tracing::warn!(asked = %addr, listening = %local, "no API keys are configured: the API serves loopback only; add [[api.keys]] (see `tandem apikey`) or set api.allow_anonymous_remote");
    local
}

pub fn app_state(
    catalog: Arc<Catalog>,
    storage: &Storage,
    speed: Arc<dyn RealtimeView>,
    clock: Arc<dyn Clock>,
    auth: Arc<tandem_serving::auth::Auth>,
) -> AppState {
    // Loading a publish is a computation too: on the computations' runtime, below serving.
    let compute = crate::ingest::compute_runtime();
    AppState::from(Shared {
        catalog,
        batch: Arc::new(DeltaBatchViews::new(storage.clone()).with_runtime(compute.clone())),
        speed,
        clock,
        metrics: Arc::new(ApiMetrics::default()),
        readiness: Default::default(),
        answers: Default::default(),
        auth,
        compute,
    })
}

/// A consumer's end as an error: every consumer runs until it is told to stop, so one that
/// ends by itself has failed.
fn consumer_ended(
    joined: Result<(ConsumerName, tandem_speed::Result<()>), tokio::task::JoinError>,
) -> anyhow::Error {
    match joined {
        Ok((name, Err(e))) => anyhow::Error::new(e).context(format!("the {name} failed")),
        Ok((name, Ok(()))) => anyhow::anyhow!("the {name} stopped by itself"),
        Err(e) => anyhow::Error::new(e).context("a consumer task panicked"),
    }
}

/// Stops in order: the consumers flush and finish first, then the HTTP frontend. Returns the
/// first error a consumer ended with.
pub async fn drain(
    mut tasks: JoinSet<(ConsumerName, tandem_speed::Result<()>)>,
    backend: CancellationToken,
    frontend: CancellationToken,
) -> Result<()> {
    backend.cancel();
    let mut first_err = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((name, Ok(()))) => tracing::info!(consumer = %name, "stopped"),
            other => {
                let e = consumer_ended(other);
                tracing::error!(error = %format!("{e:#}"), "while stopping");
                first_err.get_or_insert(e);
            }
        }
    }
    frontend.cancel();
    first_err.map_or(Ok(()), Err)
}

/// A whole deployment in one process: consumers of every schema and the API.
pub struct Running {
    /// The API's bound address.
    pub address: std::net::SocketAddr,
    /// The admin listener's bound address, if it has one.
    pub admin_address: Option<std::net::SocketAddr>,
    pub consumers: Consumers,
    /// The published batch views the API answers from.
    pub batch: Arc<dyn tandem_core::traits::BatchViews>,
    /// Cancelled to stop the consumers (and whatever else feeds them).
    pub backend: CancellationToken,
    frontend: CancellationToken,
    server: tokio::task::JoinHandle<Result<()>>,
}

/// An archiver holding messages that has not committed for this long is not ready.
const ARCHIVER_STALL: Duration = Duration::from_secs(30);

/// Not ready while an archiver holds messages it has not committed for longer than `stall`:
/// its store or its commits are stuck.
fn archiver_check(stats: Arc<tandem_speed::archiver::ArchiverStats>, stall: Duration) -> Check {
    use std::sync::atomic::Ordering::Relaxed;
    let seen = std::sync::Mutex::new((stats.commits.load(Relaxed), std::time::Instant::now()));
    Box::new(move || {
        let commits = stats.commits.load(Relaxed);
        let mut seen = seen.lock().expect("readiness lock");
        if commits != seen.0 {
            *seen = (commits, std::time::Instant::now());
            return None;
        }
        let handled = stats.archived.load(Relaxed) + stats.dead_lettered.load(Relaxed);
        let pending = stats.received.load(Relaxed).saturating_sub(handled);
        let quiet = seen.1.elapsed();
        (pending > 0 && quiet > stall).then(|| {
            format!(
                "no commit for {} s with {pending} messages pending",
                quiet.as_secs()
            )
        })
    })
}

/// How often the speed layer looks at what published batches cover.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How long no Kafka broker may be reachable before the speed layer says it is not ready.
const SPEED_BROKER_GRACE: Duration = Duration::from_secs(10);

/// Spawns an ingestion task on ingestion's runtime (`None`: the caller's).
pub fn spawn_ingest<F>(runtime: Option<&tokio::runtime::Handle>, task: F)
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime {
        Some(runtime) => drop(runtime.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
}

/// Starts the archiver and the speed layer of every schema, the pruning of the speed layer's
/// covered buckets, and the API on `listen`. Ingestion runs on `options.runtime` (see
/// `crate::ingest`), the API on the caller's runtime.
#[allow(clippy::too_many_arguments)] // the wiring of a process: each argument is one of its parts
pub async fn start_all(
    catalog: &Arc<Catalog>,
    storage: &Storage,
    kafka_config: &KafkaConfig,
    clock: Arc<dyn Clock>,
    listen: std::net::SocketAddr,
    admin_listen: Option<std::net::SocketAddr>,
    options: &ConsumerOptions,
    auth: Arc<tandem_serving::auth::Auth>,
) -> Result<Running> {
    let listener = bind(listen).await?;
    let address = listener.local_addr()?;
    let admin = match admin_listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let admin_address = admin.as_ref().map(|a| a.local_addr()).transpose()?;
    let (backend, frontend) = (CancellationToken::new(), CancellationToken::new());
    let consumers = tandem_speed::start(
        catalog,
        storage,
        kafka_config,
        Arc::clone(&clock),
        &backend,
        options,
    )
    .await?;
    let mut state = app_state(
        Arc::clone(catalog),
        storage,
        consumers.speed.clone(),
        clock,
        auth,
    );
    let speed = Arc::clone(&consumers.speed);
    state.metrics = Arc::new(ApiMetrics {
        sources: vec![Arc::new(move |out: &mut String| speed.write_metrics(out))],
        ..Default::default()
    });
    let mut readiness = Readiness::default();
    for (schema, stats) in &consumers.archiver_stats {
        readiness = readiness.with(
            format!("archiver `{schema}`"),
            archiver_check(Arc::clone(stats), ARCHIVER_STALL),
        );
    }
    for (schema, layer) in consumers.speed.iter() {
        let (layer, max_lag) = (Arc::clone(layer), options.ready_max_lag);
        readiness = readiness.with(
            format!("speed layer `{schema}`"),
            Box::new(move || layer.not_ready(max_lag, SPEED_BROKER_GRACE)),
        );
    }
    state.readiness = Arc::new(readiness);
    let state_batch = Arc::clone(&state.batch);
    // The speed layer drops what published batches cover, as serving sees the publishes.
    spawn_ingest(
        options.runtime.as_ref(),
        tandem_speed::speed::prune_covered(
            Arc::clone(&consumers.speed),
            Arc::clone(&state.batch),
            Arc::clone(catalog),
            PRUNE_EVERY,
            options.prune_grace,
            backend.clone(),
        ),
    );
    let server = tokio::spawn(serve_api(state, listener, admin, frontend.clone()));
    Ok(Running {
        address,
        admin_address,
        batch: Arc::clone(&state_batch),
        consumers,
        backend,
        frontend,
        server,
    })
}

impl Running {
    /// Runs until Ctrl-C, SIGTERM or a failed role; then stops the others in order (consumers
    /// drain, then the HTTP server). A failed role's error is the result, so the process exits
    /// non-zero with it.
    pub async fn until_stopped(mut self) -> Result<()> {
        let mut server_done = None;
        let failed = tokio::select! {
            _ = shutdown_signal() => {
                tracing::info!("stopping");
                None
            }
            Some(joined) = self.consumers.tasks.join_next() => {
                let e = consumer_ended(joined);
                tracing::error!(error = %format!("{e:#}"), "a role failed; stopping the others");
                Some(e)
            }
            r = &mut self.server => {
                let e = match r {
                    Ok(Ok(())) => anyhow::anyhow!("the HTTP server stopped by itself"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::Error::new(e).context("the HTTP server panicked"),
                };
                tracing::error!(error = %format!("{e:#}"), "a role failed; stopping the others");
                server_done = Some(());
                Some(e)
            }
        };
        let drained = drain(self.consumers.tasks, self.backend, self.frontend).await;
        if server_done.is_none() {
            let served = self.server.await;
            tracing::info!("HTTP server stopped");
            if failed.is_none() {
                served??;
            }
        }
        match failed {
            Some(e) => Err(e),
            None => drained,
        }
    }
}

/// `tandem run` (every role) and `tandem speed` (the speed layer with its API: its state,
/// `/metrics` and probes; no archiver).
pub async fn run_all(config: &Config, args: ServeArgs, archive: bool) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let ingest = config.ingest_runtime()?;
    if archive {
        // Upkeep on a schedule, beside the roles; a failed round is logged and tried again at
        // the next one (a collision with the archiver's commit is normal).
        let schedule = [
            (config.compact_interval, Upkeep::Compact),
            (
                config.vacuum_interval,
                Upkeep::Vacuum(config.vacuum_retention),
            ),
        ];
        for (every, job) in schedule {
            if let Some(every) = every {
                let (catalog, storage) = (Arc::clone(&catalog), storage.clone());
                spawn_ingest(ingest.as_ref(), async move {
                    let mut tick = tokio::time::interval(every);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        job.run(&storage, &catalog).await;
                    }
                });
            }
        }
        // The scheduler of views and SQL jobs; their SQL is checked before anything starts.
        let scheduler = crate::batch::scheduler(config).await?;
        let every = config.scheduler_interval;
        spawn_ingest(ingest.as_ref(), async move {
            scheduler.run_until(every, std::future::pending()).await
        });
    }
    let auth = auth(config, &catalog)?;
    let listen = api_listen(config, &auth, args.listen(config));
    start_all(
        &catalog,
        &storage,
        &config.kafka()?,
        clock(),
        listen,
        args.admin_listen(config),
        &tandem_speed::ConsumerOptions {
            runtime: ingest,
            ..config.consumer_options(archive, true)
        },
        auth,
    )
    .await?
    .until_stopped()
    .await
}

/// Table upkeep `tandem run` does on a schedule.
#[derive(Debug, Clone, Copy)]
enum Upkeep {
    Compact,
    /// With this retention.
    Vacuum(std::time::Duration),
}

impl Upkeep {
    /// One round over every table; failures are logged, never fatal.
    async fn run(self, storage: &Storage, catalog: &Catalog) {
        for t in tandem_batch::maintenance::tables(storage, catalog) {
            match self {
                Upkeep::Compact => {
                    match tandem_batch::maintenance::compact(storage, &t, None, 128 << 20).await {
                        Ok(Some(r)) if r.version.is_some() => tracing::info!(
                            table = %r.table,
                            files_removed = r.files_removed,
                            files_added = r.files_added,
                            "compacted"
                        ),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(table = %t.name, error = %e, "compaction failed; next round retries")
                        }
                    }
                }
                Upkeep::Vacuum(retention) => {
                    match tandem_batch::maintenance::vacuum(storage, &t, retention, false).await {
                        Ok(Some(r)) if !r.files.is_empty() => {
                            tracing::info!(table = %r.table, files = r.files.len(), "vacuumed")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(table = %t.name, error = %e, "vacuum failed; next round retries")
                        }
                    }
                }
            }
        }
    }
}

pub async fn archive(config: &Config) -> Result<()> {
    let (catalog, storage, clock) = (
        catalog(config)?,
        Storage::new(config.layout.clone())?,
        clock(),
    );
    let kafka_config = config.kafka()?;
    let backend = CancellationToken::new();
    let options = config.consumer_options(true, false);
    let mut consumers =
        tandem_speed::start(&catalog, &storage, &kafka_config, clock, &backend, &options).await?;
    let failed = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("stopping");
            None
        }
        Some(joined) = consumers.tasks.join_next() => Some(consumer_ended(joined)),
    };
    let drained = drain(consumers.tasks, backend, CancellationToken::new()).await;
    match failed {
        Some(e) => Err(e),
        None => drained,
    }
}

pub async fn serve(config: &Config, args: ServeArgs) -> Result<()> {
    let (catalog, storage, clock) = (
        catalog(config)?,
        Storage::new(config.layout.clone())?,
        clock(),
    );
    let auth = auth(config, &catalog)?;
    let listen = api_listen(config, &auth, args.listen(config));
    let state = app_state(catalog, &storage, Arc::new(NoRealtime), clock, auth);
    let listener = bind(listen).await?;
    let admin = match args.admin_listen(config) {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let token = CancellationToken::new();
    let mut server = tokio::spawn(serve_api(state, listener, admin, token.clone()));
    tokio::select! {
        _ = shutdown_signal() => tracing::info!("stopping"),
        r = &mut server => return r?,
    }
    token.cancel();
    server.await?
}

pub(crate) fn one_schema(
    catalog: &Catalog,
    name: Option<&str>,
) -> Result<Arc<tandem_core::schema::EventSchema>> {
    Ok(match name {
        Some(s) => Arc::clone(
            catalog
                .schemas
                .get(s)
                .with_context(|| format!("--schema: no schema `{s}`"))?,
        ),
        None if catalog.schemas.len() == 1 => {
            Arc::clone(catalog.schemas.values().next().expect("one"))
        }
        None => bail!("several schemas are defined; name one with --schema"),
    })
}

pub async fn dlq(config: &Config, cmd: DlqCommand) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let (DlqCommand::List { filter, .. } | DlqCommand::Replay { filter }) = &cmd;
    let schema = one_schema(&catalog, filter.schema.as_deref())?;
    if let Some(r) = &filter.reason {
        if !["decode", "schema", "event_time"].contains(&r.as_str()) {
            bail!("--reason `{r}`: one of decode, schema, event_time");
        }
    }
    let since_us = match &filter.since {
        Some(t) => Some(tandem_core::time::parse_instant(t).with_context(|| {
            format!("--since `{t}` is not a time (RFC 3339, a date or epoch ms)")
        })?),
        None => None,
    };
    let f = tandem_batch::dlq::Filter {
        reason: filter.reason.clone(),
        since_us,
    };
    match cmd {
        DlqCommand::List { limit, json, .. } => {
            let letters = tandem_batch::dlq::list(&storage, &schema, &f).await?;
            let total = letters.len();
            for d in letters.iter().take(limit) {
                if json {
                    println!("{}", serde_json::to_string(d)?);
                } else {
                    println!(
                        "{} {}[{}]@{} {}: {}\n    {}",
                        tandem_core::time::format_us(d.received_at_us),
                        d.topic,
                        d.partition,
                        d.offset,
                        d.reason,
                        d.error,
                        tandem_batch::dlq::printable(&d.raw)
                    );
                }
            }
            if !json && total > limit {
                eprintln!("{total} dead letters; the oldest {limit} shown (--limit)");
            }
        }
        DlqCommand::Replay { .. } => {
            let r = tandem_batch::dlq::replay(&storage, &schema, &f, clock().now_us()).await?;
            if r.finished_earlier > 0 {
                println!(
                    "finished an interrupted replay: {} dead letter(s) were already in the master dataset",
                    r.finished_earlier
                );
            }
            println!(
                "moved {} dead letter(s) into the master dataset; {} still rejected, left as they are",
                r.moved, r.still_rejected
            );
        }
    }
    Ok(())
}

pub async fn erase(config: &Config, args: EraseArgs) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let schema = one_schema(&catalog, args.schema.as_deref())?;
    let who = args
        .who
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let r = tandem_batch::erase::erase(
        &storage,
        &schema,
        &args.field,
        &args.value,
        &who,
        clock().now_us(),
    )
    .await?;
    println!(
        "erased {} event(s) from master/{} and {} dead letter(s); {} day(s) to recompute: {}",
        r.master_rows,
        r.schema,
        r.dead_letter_rows,
        r.days.len(),
        r.days.join(", ")
    );
    println!(
        "audit record written (value as SHA-256 {}); run `tandem batch run` to republish those days. \
         The speed layer's state still counts the subject's events of days no batch covers yet \
         (a sketch cannot remove a value) until a publish covers them.",
        r.value_sha256
    );
    Ok(())
}

pub async fn compact(config: &Config, args: CompactArgs) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    if let Some(days) = &args.days {
        for d in days {
            parse_day(d).with_context(|| format!("--days: `{d}` is not a day (YYYY-MM-DD)"))?;
        }
    }
    let target = crate::config::parse_size(&toml::Value::String(args.target_size.clone()))
        .map_err(|e| anyhow::anyhow!("--target-size: {e}"))?;
    let mut reports = Vec::new();
    for t in tandem_batch::maintenance::tables(&storage, &catalog) {
        let Some(r) =
            tandem_batch::maintenance::compact(&storage, &t, args.days.as_deref(), target as u64)
                .await
                .with_context(|| format!("compacting {}", t.name))?
        else {
            continue;
        };
        if !args.json {
            match r.version {
                Some(v) => println!(
                    "{}: {} files merged into {} in {} partition(s), version {v}",
                    r.table, r.files_removed, r.files_added, r.partitions
                ),
                None => println!("{}: nothing to merge", r.table),
            }
        }
        reports.push(r);
    }
    if args.json {
        println!("{}", serde_json::json!({ "tables": reports }));
    }
    Ok(())
}

pub async fn vacuum(config: &Config, args: VacuumArgs) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let retention = std::time::Duration::from_secs(args.retention_hours.saturating_mul(3600));
    let mut reports = Vec::new();
    for t in tandem_batch::maintenance::tables(&storage, &catalog) {
        let Some(r) = tandem_batch::maintenance::vacuum(&storage, &t, retention, args.dry_run)
            .await
            .with_context(|| format!("vacuuming {}", t.name))?
        else {
            continue;
        };
        if !args.json {
            let verb = if r.dry_run { "would delete" } else { "deleted" };
            println!("{}: {verb} {} file(s)", r.table, r.files.len());
            for f in &r.files {
                println!("  {f}");
            }
        }
        reports.push(r);
    }
    if args.json {
        println!("{}", serde_json::json!({ "tables": reports }));
    }
    Ok(())
}

pub async fn import(config: &Config, files: Vec<PathBuf>, schema: Option<String>) -> Result<()> {
    let (catalog, storage) = (catalog(config)?, Storage::new(config.layout.clone())?);
    let schema = one_schema(&catalog, schema.as_deref())?;
    let started = std::time::Instant::now();
    let (mut events, mut bytes) = (0usize, 0u64);
    let r = tandem_batch::import_files(&storage, &schema, &files, clock().now_us(), |f| {
        if f.skipped {
            eprintln!(
                "[{}/{}] {}: already imported (same content), skipped",
                f.index,
                f.of,
                f.path.display()
            );
            return;
        }
        if !f.done {
            eprintln!(
                "[{}/{}] {}: {} events so far, {:.1} s, {:.0} events/s",
                f.index,
                f.of,
                f.path.display(),
                f.events,
                f.seconds,
                f.events as f64 / f.seconds.max(1e-9)
            );
            return;
        }
        events += f.events;
        bytes += f.bytes;
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        eprintln!(
            "[{}/{}] {}: {} events, {} rejected, {:.1} s; so far {} events, {:.0} events/s, {:.1} MB/s",
            f.index,
            f.of,
            f.path.display(),
            f.events,
            f.rejected,
            f.seconds,
            events,
            events as f64 / secs,
            bytes as f64 / secs / 1e6
        );
    })
    .await?;
    println!(
        "imported {} events from {} file(s) in {:.1} s; {} rejected into the dead-letter table; {} file(s) already imported, skipped",
        r.events,
        r.files,
        started.elapsed().as_secs_f64(),
        r.rejected,
        r.skipped
    );
    Ok(())
}

pub fn query(config: &Config, args: QueryArgs) -> Result<()> {
    let base = args
        .url
        .clone()
        .unwrap_or_else(|| format!("http://{}", config.listen));
    let params = QueryParams {
        from: args.from.as_deref().map(Scalar::from),
        to: args.to.as_deref().map(Scalar::from),
        granularity: args.granularity,
        tz: args.tz,
        totals: None,
        group_by: args.group_by.map(Names::Comma),
        filter: Filters::Items(args.filters),
        metrics: args.metrics.map(Names::Comma),
        order_by: args.order_by,
        limit: args.limit.map(|l| Scalar::Number(l.into())),
        other: args.other.then_some(serde_json::Value::Bool(true)),
        format: Some(if args.format == "csv" {
            Format::Csv
        } else {
            Format::Json
        }),
    };
    let view: String = url::form_urlencoded::byte_serialize(args.view.as_bytes()).collect();
    let url = format!("{}/v1/views/{view}/query", base.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .post(&url)
        .content_type("application/json")
        .send(serde_json::to_string(&params)?)
        .with_context(|| {
            format!("cannot reach {base}; is `tandem run` or `tandem demo` running?")
        })?;
    let status = resp.status();
    let body = resp
        .body_mut()
        .read_to_string()
        .context("reading the answer")?;
    if !status.is_success() {
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string))
            .unwrap_or(body);
        bail!("{status}: {detail}");
    }
    print!("{body}");
    if !body.ends_with('\n') {
        println!();
    }
    Ok(())
}
