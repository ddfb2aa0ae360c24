//! `tandem`: the one binary. Each role is a subcommand; this crate only parses configuration
//! and wires the layers' concrete types together.

// A binary exports nothing: `pub` here means "for the other modules of the CLI".
#![allow(unreachable_pub)]

mod ballista;
mod batch;
mod bench;
mod bench_broker;
mod broker;
mod config;
mod defs;
mod demo;
mod ingest;
mod produce;
mod replay;
mod roles;

use std::path::PathBuf;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{Config, GlobalOpts};

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Lambda architecture in one binary: Kafka speed layer, DataFusion batch layer, merged serving."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOpts,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Everything in one process on the embedded default: mock Kafka, generated events, local store.
    Demo(demo::DemoArgs),
    /// Archiver, speed layer and serving in one process, against real Kafka.
    Run(roles::ServeArgs),
    /// The archiver role only: Kafka into the master dataset and the dead-letter table.
    Archive,
    /// The speed layer role with its API (its state, /metrics, probes): instances share the
    /// topic's partitions through the consumer group, with state in checkpoints.
    Speed(roles::ServeArgs),
    /// The serving role on published batch views only (no speed layer in this process).
    Serve(roles::ServeArgs),
    /// Batch work: views' recomputes and SQL jobs, by hand or scheduled; runs, publishes,
    /// rollback.
    #[command(subcommand)]
    Batch(batch::BatchCommand),
    /// Recompute a view (or run an SQL job) over a range of days, a chunk at a time, each
    /// chunk published atomically; run again after an interruption, it resumes.
    Backfill(batch::BackfillArgs),
    /// Run a read-only SQL query over the master datasets, the views and the jobs' outputs.
    Sql(batch::SqlArgs),
    /// An Apache Ballista cluster's scheduler or executor, for `batch run --engine
    /// ballista://HOST:PORT`.
    #[command(subcommand)]
    Ballista(ballista::BallistaCommand),
    /// Make a new API key: prints the key (give it to its user) and the `[[api.keys]]` entry
    /// for tandem.toml, which holds only its SHA-256.
    Apikey {
        /// Who the key is for.
        #[arg(long, default_value = "dashboards")]
        name: String,
    },
    /// Rewind a consumer group to a time (every instance of the group stopped): the speed
    /// layer's checkpoints are rewound so that nothing counts twice.
    Replay(replay::ReplayArgs),
    /// Load history (JSON lines or Parquet) into the master dataset; files already imported
    /// are skipped.
    Import {
        /// Files of JSON lines (one event per line) or Parquet (`.parquet`); a directory
        /// stands for the `.parquet`, `.jsonl`, `.json` and `.ndjson` files under it.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The event schema of the files (default: the only schema).
        #[arg(long)]
        schema: Option<String>,
    },
    /// Dead letters: list them, or replay them through the current schema.
    #[command(subcommand)]
    Dlq(roles::DlqCommand),
    /// Erase one subject's events (GDPR) from the master dataset and the dead-letter table;
    /// the next batch run republishes their days without them.
    Erase(roles::EraseArgs),
    /// Merge small files per day in every table (Delta OPTIMIZE), rows unchanged.
    Compact(roles::CompactArgs),
    /// Delete files no table version within the retention period references, including files
    /// written but never committed.
    Vacuum(roles::VacuumArgs),
    /// A development Kafka broker (librdkafka's mock cluster, in memory) on a fixed loopback
    /// port, until Ctrl-C.
    Broker(broker::BrokerArgs),
    /// Generate synthetic reference events.
    Gen(produce::GenArgs),
    /// Query a view through a running server's API.
    Query(roles::QueryArgs),
    /// Measure decode and decode+aggregate throughput on the reference events, next to a
    /// Python peer on the same events.
    Bench(bench::BenchArgs),
    /// Print the effective configuration and where each value came from.
    Config,
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(
            "info,datafusion=warn,deltalake=warn,deltalake_core=error,buoyant_kernel=warn",
        )
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// glibc gives each thread that allocates under contention an arena of its own (up to eight per
/// core), and memory freed in one arena is not reused by another: under a burst of queries
/// on blocking threads, resident memory doubled (1.27 GiB against 0.61 GiB with two arenas, in
/// `bench/serving_abuse.sh`) for no gain in speed. Two arenas, unless `MALLOC_ARENA_MAX` says
/// otherwise.
///
/// A batch recompute (`batch`, `backfill`) builds and drops a day's tables, hundreds of MB in
/// blocks of tens of MB, day after day. glibc maps each such block afresh and unmaps it when
/// freed, so the next day's first touch of every page was a fault and the kernel zeroing the
/// page (half the reference week's 0.75 M page faults). For those commands large blocks come
/// from the heap and what is freed stays in it for the next day, unless `MALLOC_MMAP_MAX_` or
/// `MALLOC_TRIM_THRESHOLD_` say otherwise (the week's recompute 2–3% faster, its peak 0.1 GiB
/// higher: `docs/performance.md`). Called before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn tune_malloc() {
    let unset = |name: &str| std::env::var_os(name).is_none();
    if unset("MALLOC_ARENA_MAX") {
        // SAFETY: mallopt only sets an allocator parameter; it is called before any other
        // thread exists, with a valid parameter and value.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
    let batch = matches!(subcommand().as_deref(), Some("batch" | "backfill"));
    if batch && unset("MALLOC_MMAP_MAX_") && unset("MALLOC_TRIM_THRESHOLD_") {
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

/// The command line's subcommand, before clap reads it: the first argument that is neither an
/// option nor the value of one (every global option takes a value).
#[cfg_attr(not(all(target_os = "linux", target_env = "gnu")), allow(dead_code))]
fn subcommand() -> Option<String> {
    subcommand_of(std::env::args().skip(1))
}

/// [`subcommand`] of `args` (the arguments after the program's name).
fn subcommand_of(mut args: impl Iterator<Item = String>) -> Option<String> {
    while let Some(arg) = args.next() {
        if arg.starts_with("--") && !arg.contains('=') && arg != "--help" && arg != "--version" {
            args.next();
        } else if !arg.starts_with('-') {
            return Some(arg);
        }
    }
    None
}

/// How often the heap trimmer looks, and how far the arenas' free bytes must have grown past
/// their lowest since its last trim for it to trim.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
const TRIM_GROWTH: usize = 64 << 20;

/// When to trim the heap: the bytes free in glibc's arenas have grown [`TRIM_GROWTH`] past
/// their lowest since the last trim (a burst came and went). Trimming leaves those bytes free
/// in the allocator's accounts (only their pages go back), so they are the next trim's base.
#[derive(Debug, Default)]
struct TrimPolicy {
    lowest: Option<usize>,
}

impl TrimPolicy {
    fn due(&mut self, free: usize) -> bool {
        let lowest = self.lowest.map_or(free, |l| l.min(free));
        let due = free >= lowest.saturating_add(TRIM_GROWTH);
        self.lowest = Some(if due { free } else { lowest });
        due
    }
}

/// Hands the memory a burst freed back to the system, from a thread of its own, once per
/// process (the serving roles start it). glibc keeps what a burst (the abuse benchmark's 1,000
/// heavy answers) freed in its arenas, in fragments: resident memory stays at the burst's peak
/// and the serving threads' allocations work through the fragments (`malloc_consolidate` among
/// the hottest functions in the 10 s after `bench/serving_abuse.sh`, where the benchmark
/// query's p99 was 11–16 ms in its first run against 7–10 ms with the heap trimmed;
/// `docs/architecture.md` 70).
/// Every [`TRIM_EVERY`] the thread reads the arenas' free bytes (`mallinfo2`) and, when
/// [`TrimPolicy`] says so, trims them (`malloc_trim`: chunks consolidated, free pages
/// returned).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn trim_heap_after_bursts() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let mut policy = TrimPolicy::default();
        let spawned = std::thread::Builder::new()
            .name("tandem-heap-trim".into())
            .spawn(move || loop {
                std::thread::sleep(TRIM_EVERY);
                // SAFETY: mallinfo2 only reads the allocator's statistics.
                let free = unsafe { libc::mallinfo2() }.fordblks;
                if policy.due(free) {
                    // SAFETY: malloc_trim only returns the arenas' free pages to the system.
                    unsafe { libc::malloc_trim(0) };
                    tracing::debug!(free, "heap trimmed after a burst");
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "the heap trimmer did not start; memory freed after bursts stays with the process");
        }
    });
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn trim_heap_after_bursts() {}

fn main() -> std::process::ExitCode {
    tune_malloc();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(async_main()),
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn async_main() -> std::process::ExitCode {
    init_tracing();
    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli.global = cli.global.with_origins(&matches);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let config = Config::resolve(&cli.global)?;
    match cli.command {
        Command::Demo(args) => demo::run(&cli.global, args).await,
        Command::Run(args) => roles::run_all(&config, args, true).await,
        Command::Speed(args) => roles::run_all(&config, args, false).await,
        Command::Archive => roles::archive(&config).await,
        Command::Serve(args) => roles::serve(&config, args).await,
        Command::Batch(cmd) => batch::batch(&config, cmd).await,
        Command::Backfill(args) => batch::backfill(&config, args).await,
        Command::Sql(args) => batch::sql(&config, args).await,
        Command::Ballista(cmd) => ballista::run(cmd).await,
        Command::Apikey { name } => {
            use rand::RngCore as _;
            let mut bytes = [0u8; 24];
            rand::rng().fill_bytes(&mut bytes);
            let key = format!("tk_{}", tandem_core::codec::hex(&bytes));
            let hash = tandem_core::codec::hex(&tandem_serving::auth::ApiKey::hash(&key));
            println!("key: {key}\n\n[[api.keys]]\nname = \"{name}\"\nsha256 = \"{hash}\"\n# views = [\"installs_hourly\"]        # default: every view\n# requests_per_minute = 600\n# scope = {{ app_id = [\"com.example.app\"] }}  # a tenant: these values only");
            Ok(())
        }
        Command::Import { files, schema } => roles::import(&config, files, schema).await,
        Command::Gen(args) => produce::gen(&config, args).await,
        Command::Broker(args) => broker::run(&config, args).await,
        Command::Replay(args) => replay::run(&config, args).await,
        Command::Compact(args) => roles::compact(&config, args).await,
        Command::Erase(args) => roles::erase(&config, args).await,
        Command::Dlq(cmd) => roles::dlq(&config, cmd).await,
        Command::Vacuum(args) => roles::vacuum(&config, args).await,
        Command::Query(args) => roles::query(&config, args),
        Command::Bench(args) => bench::run(&config, args).await,
        Command::Config => {
            print!("{config}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The subcommand is found past the global options and their values, whatever a value
    /// says; none before clap's own flags.
    #[test]
    fn the_subcommand_is_found_past_the_global_options() {
        let of = |args: &[&str]| subcommand_of(args.iter().map(|a| a.to_string()));
        assert_eq!(of(&["batch", "run", "--full"]).as_deref(), Some("batch"));
        let options = ["--data", "/tmp/x", "--jobs=views", "backfill", "v"];
        assert_eq!(of(&options).as_deref(), Some("backfill"));
        assert_eq!(of(&["--data", "batch", "serve"]).as_deref(), Some("serve"));
        assert_eq!(of(&["--help"]), None);
        assert_eq!(of(&["--version", "batch"]).as_deref(), Some("batch"));
        assert_eq!(of(&[]), None);
    }

    /// A burst freed (free bytes up by the growth) is trimmed once; the allocator's free bytes
    /// then stay where they are, and are not trimmed again until another burst.
    #[test]
    fn the_heap_is_trimmed_once_after_each_burst() {
        let mut p = TrimPolicy::default();
        let mib = 1 << 20;
        assert!(!p.due(10 * mib), "the first look is the base");
        assert!(!p.due(60 * mib));
        assert!(p.due(80 * mib), "grown 70 MiB past the lowest");
        assert!(!p.due(80 * mib), "trimming leaves the bytes counted free");
        assert!(!p.due(90 * mib));
        assert!(!p.due(20 * mib), "reused: a new lowest");
        assert!(!p.due(83 * mib));
        assert!(p.due(84 * mib), "another burst");
    }

    /// Every subcommand's every flag and argument says what it is for.
    #[test]
    fn every_flag_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && arg.get_help().is_none() {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "tandem", &mut missing);
        assert!(missing.is_empty(), "without help text: {missing:?}");
    }
}
