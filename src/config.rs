//! Configuration: a flag beats its `TANDEM_*` environment variable, which beats `tandem.toml`,
//! which beats the default. Unknown keys in the file are errors that name the key. Every
//! resolved value remembers where it came from, for `tandem config`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use serde::Deserialize;
use tandem_core::paths::Layout;

/// Options every subcommand takes.
#[derive(Debug, Clone, Default, Args)]
pub struct GlobalOpts {
    /// The config file (default: ./tandem.toml if it exists).
    #[arg(long, global = true, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Shorthand for a local store in DIR (same as --storage file:///abs/DIR).
    #[arg(long, global = true, env = "TANDEM_DATA")]
    pub data: Option<PathBuf>,
    /// Storage URL: file:///dir, memory:/// or s3://bucket/prefix.
    #[arg(long, global = true, env = "TANDEM_STORAGE")]
    pub storage: Option<String>,
    /// Kafka bootstrap servers (HOST:PORT,...).
    #[arg(long, global = true, env = "TANDEM_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Directory of event schema definitions.
    #[arg(long, global = true, env = "TANDEM_SCHEMAS")]
    pub schemas: Option<PathBuf>,
    /// Directory of view and job definitions.
    #[arg(long, global = true, env = "TANDEM_JOBS")]
    pub jobs: Option<PathBuf>,
    /// Address the HTTP API listens on.
    #[arg(long, global = true, env = "TANDEM_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the admin port (`/livez`, `/readyz`, `/metrics` only, with connections of
    /// its own); none by default.
    #[arg(long, global = true, env = "TANDEM_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Where each option above was given (flag or environment), from the parsed arguments.
    #[arg(skip)]
    pub origins: BTreeMap<&'static str, Origin>,
}

/// The ids of the global options, as clap names them.
const GLOBAL_IDS: [&str; 8] = [
    "config",
    "data",
    "storage",
    "brokers",
    "schemas",
    "jobs",
    "listen",
    "admin_listen",
];

impl GlobalOpts {
    /// Records which options came from a flag and which from the environment.
    pub fn with_origins(mut self, matches: &ArgMatches) -> Self {
        for id in GLOBAL_IDS {
            let origin = match matches.value_source(id) {
                Some(ValueSource::CommandLine) => Origin::Flag,
                Some(ValueSource::EnvVariable) => Origin::Env,
                _ => continue,
            };
            self.origins.insert(id, origin);
        }
        self
    }

    fn origin(&self, id: &str) -> Origin {
        // A value set in code (the demo's own store) counts as a flag.
        self.origins.get(id).copied().unwrap_or(Origin::Flag)
    }
}

/// Where a setting came from, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    Default,
    File,
    Env,
    Flag,
}

/// `tandem.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub storage: Option<String>,
    pub data: Option<PathBuf>,
    pub schemas: Option<PathBuf>,
    pub jobs: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    #[serde(default)]
    pub kafka: KafkaFile,
    #[serde(default)]
    pub speed: SpeedFile,
    #[serde(default)]
    pub batch: BatchFile,
    #[serde(default)]
    pub archive: ArchiveFile,
    #[serde(default)]
    pub maintenance: MaintenanceFile,
    #[serde(default)]
    pub api: ApiFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiFile {
    /// The API keys (with none, the API serves anyone, on loopback only unless
    /// `allow_anonymous_remote`).
    #[serde(default)]
    pub keys: Vec<KeyFile>,
    /// Serve without keys on a non-loopback address (behind a proxy that authenticates).
    pub allow_anonymous_remote: Option<bool>,
    /// How many nice steps below the serving threads' CPU priority ingestion's threads run
    /// (0-19; 0: the same priority, on the same runtime).
    pub ingest_nice: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Who the key is for.
    pub name: String,
    /// Hex SHA-256 of the key (`tandem apikey` makes a key and its hash).
    pub sha256: String,
    /// The views it may read (default: every view).
    pub views: Option<Vec<String>>,
    /// Dimension values it is limited to, e.g. `{ app_id = ["com.a.app"] }`.
    #[serde(default)]
    pub scope: std::collections::BTreeMap<String, Vec<String>>,
    /// Requests a minute (default: unlimited).
    pub requests_per_minute: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveFile {
    /// The longest a valid event waits in the archiver before it is committed, milliseconds.
    pub flush_interval_ms: Option<u64>,
    /// Commit as soon as the pending rows would make a Parquet file of about this many MiB.
    pub target_file_mb: Option<u64>,
    /// Commit as soon as this many rows are pending, whatever their size (bounds memory).
    pub flush_rows: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaintenanceFile {
    /// `tandem run` compacts every table this often (0: never).
    pub compact_interval_secs: Option<u64>,
    /// `tandem run` vacuums every table this often (0: never).
    pub vacuum_interval_secs: Option<u64>,
    /// What a scheduled vacuum keeps: files a version of the last this many hours references.
    pub vacuum_retention_hours: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchFile {
    /// Bytes a recompute's operators may hold before they spill: `"4GiB"`, `"512MB"`, bytes.
    pub memory_limit: Option<toml::Value>,
    /// Where spills go (default: the system's temporary directory).
    pub spill_dir: Option<PathBuf>,
    /// Threads of a recompute (default: the machine's cores).
    pub threads: Option<usize>,
    /// When the scheduler recomputes views (cron, default `"0 1 * * *"`; `"off"`: never).
    pub schedule: Option<String>,
    /// The time zone of `schedule` (IANA name; default UTC).
    pub timezone: Option<String>,
    /// Seconds a scheduler's lease on a task lasts unless renewed.
    pub lease_ttl_secs: Option<u64>,
    /// Seconds between the scheduler's rounds.
    pub scheduler_interval_secs: Option<u64>,
    /// Seconds after a day's end before the batch layer treats it as closed, once the
    /// archiver has committed past it.
    pub close_grace_secs: Option<u64>,
    /// Where recomputes run: `local` or `ballista://HOST:PORT`.
    pub engine: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpeedFile {
    /// Seconds a publish must be old before the speed layer drops the buckets it covers.
    pub prune_grace_secs: Option<u64>,
    /// Milliseconds between checkpoints of the partitions that changed.
    pub checkpoint_interval_ms: Option<u64>,
    /// Checkpoints kept per partition.
    pub checkpoint_keep: Option<usize>,
    /// Messages a partition may lag with `/readyz` still ready.
    pub ready_max_lag: Option<i64>,
    /// The most groups the speed state holds.
    pub max_state_keys: Option<usize>,
    /// Seconds of event time within which a repeated event id is a duplicate.
    pub dedup_window_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    pub brokers: Option<String>,
    pub group_prefix: Option<String>,
    /// librdkafka settings passed through to every client (TLS, SASL, fetch sizes, ...).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, toml::Value>,
}

/// One resolved setting, for `tandem config`.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub key: &'static str,
    pub value: String,
    /// Where it came from, in words: `flag --data`, `environment TANDEM_STORAGE`, ...
    pub from: String,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub layout: Layout,
    pub brokers: Option<String>,
    pub group_prefix: String,
    pub schemas: PathBuf,
    pub jobs: PathBuf,
    pub listen: SocketAddr,
    /// The admin port's address, if it has one.
    pub admin_listen: Option<SocketAddr>,
    /// Whether the definition directories were named (not defaults).
    pub definitions_given: bool,
    /// How old a publish must be before the speed layer drops the buckets it covers.
    pub prune_grace: std::time::Duration,
    /// Time between the speed layer's checkpoints.
    pub checkpoint_interval: std::time::Duration,
    /// Checkpoints kept per partition.
    pub checkpoint_keep: usize,
    /// Messages a partition may lag with `/readyz` still ready.
    pub ready_max_lag: i64,
    /// The most groups the speed state holds.
    pub max_state_keys: usize,
    /// Event time within which a repeated event id is a duplicate.
    pub dedup_window: std::time::Duration,
    /// `[kafka.properties]`, passed to librdkafka.
    pub kafka_properties: Vec<(String, String)>,
    /// How recomputes run: threads, memory limit, spill directory.
    pub batch: tandem_batch::BatchOptions,
    /// The API's keys, and whether it may serve without keys beyond loopback.
    pub api_keys: Vec<tandem_serving::auth::ApiKey>,
    pub allow_anonymous_remote: bool,
    /// Nice steps between serving's threads and ingestion's (see `crate::ingest`).
    pub ingest_nice: i32,
    /// How the scheduler runs views and jobs, and how often it looks.
    pub scheduler: tandem_batch::scheduler::SchedulerConfig,
    pub scheduler_interval: std::time::Duration,
    /// When the archiver commits.
    pub archiver: tandem_speed::ArchiverConfig,
    /// How often `tandem run` compacts and vacuums (`None`: never), and the vacuum's retention.
    pub compact_interval: Option<std::time::Duration>,
    pub vacuum_interval: Option<std::time::Duration>,
    pub vacuum_retention: std::time::Duration,
    /// Every setting with its origin.
    pub settings: Vec<Setting>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Longer than serving's look at a view's log (1 s), so no replica still answering from the
/// previous publish asks the speed layer for buckets it already dropped.
pub const DEFAULT_PRUNE_GRACE_SECS: u64 = 60;
pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 1_000;
pub const DEFAULT_CHECKPOINT_KEEP: usize = 3;
pub const DEFAULT_READY_MAX_LAG: i64 = 100_000;
/// About 2 GB of speed state at 200 bytes a key.
pub const DEFAULT_MAX_STATE_KEYS: usize = 10_000_000;
pub const DEFAULT_DEDUP_WINDOW_SECS: u64 = 60;

/// A recompute engine: `local` (`None`) or a Ballista scheduler's `ballista://HOST:PORT`.
pub fn parse_engine(text: &str) -> Result<Option<String>> {
    if text == "local" {
        return Ok(None);
    }
    let url = url::Url::parse(text)
        .ok()
        .filter(|u| u.scheme() == "ballista" && u.host_str().is_some() && u.port().is_some());
    match url {
        Some(_) => Ok(Some(text.to_string())),
        None => bail!("`{text}`: expected `local` or `ballista://HOST:PORT`"),
    }
}

/// A value and where it came from.
struct Given<T> {
    value: T,
    origin: Origin,
    /// The option's name at that origin.
    name: String,
}

fn given<T>(value: T, (origin, name): (Origin, String)) -> Given<T> {
    Given {
        value,
        origin,
        name,
    }
}

impl<T> Given<T> {
    fn describe(&self) -> String {
        match self.origin {
            Origin::Default => "default".to_string(),
            Origin::File => format!("tandem.toml key `{}`", self.name),
            Origin::Env => format!("environment {}", self.name),
            Origin::Flag => format!("flag --{}", self.name),
        }
    }
}

impl Config {
    pub fn resolve(opts: &GlobalOpts) -> Result<Self> {
        let (file, base, file_name) = match &opts.config {
            Some(p) => (
                read_file(p)?,
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
                Some(p.clone()),
            ),
            None if Path::new("tandem.toml").exists() => (
                read_file(Path::new("tandem.toml"))?,
                PathBuf::new(),
                Some(PathBuf::from("tandem.toml")),
            ),
            None => (FileConfig::default(), PathBuf::new(), None),
        };
        // Paths in the file are relative to the file.
        let rel = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        let cli = |id: &str, env: &str| {
            let origin = opts.origin(id);
            let name = if origin == Origin::Env {
                env.to_string()
            } else {
                id.replace('_', "-")
            };
            (origin, name)
        };
        let file_key = |key: &str| (Origin::File, key.to_string());
        let default = (Origin::Default, String::new());

        // Storage: `data` and `storage` name the same thing, so the strongest origin wins,
        // and both at one origin is a mistake.
        let mut stores: Vec<Given<StoreSpec>> = Vec::new();
        let dirs = [
            (opts.data.clone(), cli("data", "TANDEM_DATA")),
            (file.data.as_ref().map(&rel), file_key("data")),
        ];
        let urls = [
            (opts.storage.clone(), cli("storage", "TANDEM_STORAGE")),
            (file.storage.clone(), file_key("storage")),
        ];
        for (d, from) in dirs {
            stores.extend(d.map(|d| given(StoreSpec::Dir(d), from)));
        }
        for (u, from) in urls {
            stores.extend(u.map(|u| given(StoreSpec::Url(u), from)));
        }
        let strongest = stores.iter().map(|s| s.origin).max();
        let mut at_strongest = stores.into_iter().filter(|s| Some(s.origin) == strongest);
        let store = match (at_strongest.next(), at_strongest.next()) {
            (Some(a), Some(b)) => bail!(
                "the store is given twice: {} and {}; give one of them",
                a.describe(),
                b.describe()
            ),
            (Some(a), None) => a,
            (None, _) => given(
                StoreSpec::Dir(PathBuf::from("tandem-data")),
                default.clone(),
            ),
        };
        let layout = match &store.value {
            StoreSpec::Dir(d) => Layout::local(d),
            StoreSpec::Url(u) => Layout::parse(u),
        }
        .with_context(|| store.describe())?;

        let brokers = match (&opts.brokers, &file.kafka.brokers) {
            (Some(b), _) => Some(given(b.clone(), cli("brokers", "TANDEM_KAFKA_BROKERS"))),
            (None, Some(b)) => Some(given(b.clone(), file_key("kafka.brokers"))),
            (None, None) => None,
        };
        let group_prefix = match &file.kafka.group_prefix {
            Some(p) => given(p.clone(), file_key("kafka.group_prefix")),
            None => given("tandem".to_string(), default.clone()),
        };
        let dir = |flag: &Option<PathBuf>, id: &str, env: &str, f: &Option<PathBuf>, d: &str| match (
            flag, f,
        ) {
            (Some(p), _) => given(p.clone(), cli(id, env)),
            (None, Some(p)) => given(rel(p), file_key(id)),
            (None, None) => given(PathBuf::from(d), default.clone()),
        };
        let schemas = dir(
            &opts.schemas,
            "schemas",
            "TANDEM_SCHEMAS",
            &file.schemas,
            "schemas",
        );
        let jobs = dir(&opts.jobs, "jobs", "TANDEM_JOBS", &file.jobs, "jobs");
        let listen = match (opts.listen, file.listen) {
            (Some(l), _) => given(l, cli("listen", "TANDEM_LISTEN")),
            (None, Some(l)) => given(l, file_key("listen")),
            (None, None) => given(DEFAULT_LISTEN.parse().expect("valid"), default.clone()),
        };
        let admin_listen = match (opts.admin_listen, file.admin_listen) {
            (Some(l), _) => Some(given(l, cli("admin_listen", "TANDEM_ADMIN_LISTEN"))),
            (None, Some(l)) => Some(given(l, file_key("admin_listen"))),
            (None, None) => None,
        };
        let prune_grace = match file.speed.prune_grace_secs {
            Some(s) => given(s, file_key("speed.prune_grace_secs")),
            None => given(DEFAULT_PRUNE_GRACE_SECS, default.clone()),
        };
        let checkpoint_interval = match file.speed.checkpoint_interval_ms {
            Some(0) => bail!("speed.checkpoint_interval_ms must be at least 1"),
            Some(ms) => given(ms, file_key("speed.checkpoint_interval_ms")),
            None => given(DEFAULT_CHECKPOINT_INTERVAL_MS, default.clone()),
        };
        let checkpoint_keep = match file.speed.checkpoint_keep {
            Some(0) => bail!("speed.checkpoint_keep must be at least 1"),
            Some(n) => given(n, file_key("speed.checkpoint_keep")),
            None => given(DEFAULT_CHECKPOINT_KEEP, default.clone()),
        };
        let ready_max_lag = match file.speed.ready_max_lag {
            Some(n) if n < 0 => bail!("speed.ready_max_lag must not be negative"),
            Some(n) => given(n, file_key("speed.ready_max_lag")),
            None => given(DEFAULT_READY_MAX_LAG, default.clone()),
        };
        let max_state_keys = match file.speed.max_state_keys {
            Some(0) => bail!("speed.max_state_keys must be at least 1"),
            Some(n) => given(n, file_key("speed.max_state_keys")),
            None => given(DEFAULT_MAX_STATE_KEYS, default.clone()),
        };
        let ingest_nice = match file.api.ingest_nice {
            Some(n) if !(0..=19).contains(&n) => {
                bail!("api.ingest_nice must be between 0 and 19 (Linux nice steps), not {n}")
            }
            Some(n) => given(n, file_key("api.ingest_nice")),
            None => given(crate::ingest::DEFAULT_NICE, default.clone()),
        };
        let dedup_window = match file.speed.dedup_window_secs {
            Some(n) => given(n, file_key("speed.dedup_window_secs")),
            None => given(DEFAULT_DEDUP_WINDOW_SECS, default.clone()),
        };
        let memory_limit = match &file.batch.memory_limit {
            Some(v) => given(
                parse_size(v).map_err(|e| anyhow::anyhow!("batch.memory_limit: {e}"))?,
                file_key("batch.memory_limit"),
            ),
            None => given(default_memory_limit(), default.clone()),
        };
        if memory_limit.value < (16 << 20) {
            bail!("batch.memory_limit must be at least 16MiB");
        }
        let batch_threads = match file.batch.threads {
            Some(0) => bail!("batch.threads must be at least 1"),
            Some(n) => Some(given(n, file_key("batch.threads"))),
            None => None,
        };
        let timezone: chrono_tz::Tz = match &file.batch.timezone {
            Some(tz) => tz
                .parse()
                .map_err(|_| anyhow::anyhow!("batch.timezone: `{tz}` is not an IANA time zone"))?,
            None => chrono_tz::UTC,
        };
        let mut scheduler = tandem_batch::scheduler::SchedulerConfig::default();
        match file.batch.schedule.as_deref() {
            Some("off") => scheduler.views = None,
            Some(expr) => {
                scheduler.views = Some(
                    tandem_core::job::Schedule::parse(expr, timezone)
                        .map_err(|e| anyhow::anyhow!("batch.schedule: {e}"))?,
                )
            }
            None => {
                if let Some(s) = &mut scheduler.views {
                    s.timezone = timezone;
                }
            }
        }
        match file.batch.lease_ttl_secs {
            Some(n) if n < 3 => bail!("batch.lease_ttl_secs must be at least 3"),
            Some(n) => scheduler.lease_ttl = std::time::Duration::from_secs(n),
            None => {}
        }
        let scheduler_interval = match file.batch.scheduler_interval_secs {
            Some(0) => bail!("batch.scheduler_interval_secs must be at least 1"),
            Some(n) => std::time::Duration::from_secs(n),
            None => std::time::Duration::from_secs(30),
        };
        let close_grace =
            std::time::Duration::from_secs(file.batch.close_grace_secs.unwrap_or(900));
        let mut api_keys = Vec::new();
        for (i, k) in file.api.keys.iter().enumerate() {
            let sha256 =
                tandem_serving::auth::ApiKey::parse_sha256(&k.sha256).with_context(|| {
                    format!("api.keys[{i}].sha256: expected 64 hex digits (the SHA-256 of the key)")
                })?;
            if k.requests_per_minute == Some(0) {
                bail!("api.keys[{i}].requests_per_minute must be at least 1");
            }
            api_keys.push(tandem_serving::auth::ApiKey {
                name: k.name.clone(),
                sha256,
                views: k.views.as_ref().map(|v| v.iter().cloned().collect()),
                scope: k.scope.clone(),
                requests_per_minute: k.requests_per_minute,
            });
        }
        let defaults = tandem_speed::ArchiverConfig::default();
        let flush_interval = match file.archive.flush_interval_ms {
            Some(0) => bail!("archive.flush_interval_ms must be at least 1"),
            Some(ms) => given(ms, file_key("archive.flush_interval_ms")),
            None => given(defaults.flush_interval.as_millis() as u64, default.clone()),
        };
        let target_file_mb = match file.archive.target_file_mb {
            Some(0) => bail!("archive.target_file_mb must be at least 1"),
            Some(n) if n > 4096 => bail!("archive.target_file_mb must be at most 4096"),
            Some(n) => given(n, file_key("archive.target_file_mb")),
            None => given(defaults.target_file_bytes >> 20, default.clone()),
        };
        let flush_rows = match file.archive.flush_rows {
            Some(0) => bail!("archive.flush_rows must be at least 1"),
            Some(n) => given(n, file_key("archive.flush_rows")),
            None => given(defaults.flush_rows, default.clone()),
        };
        let every = |v: Option<u64>, key: &'static str| match v {
            Some(0) | None => given(
                0,
                if v.is_some() {
                    file_key(key)
                } else {
                    default.clone()
                },
            ),
            Some(n) => given(n, file_key(key)),
        };
        let compact_every = every(
            file.maintenance.compact_interval_secs,
            "maintenance.compact_interval_secs",
        );
        let vacuum_every = every(
            file.maintenance.vacuum_interval_secs,
            "maintenance.vacuum_interval_secs",
        );
        let retention = match file.maintenance.vacuum_retention_hours {
            Some(h) => given(h, file_key("maintenance.vacuum_retention_hours")),
            None => given(168, default.clone()),
        };
        let mut kafka_properties = Vec::new();
        for (key, value) in &file.kafka.properties {
            let value = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!(
                    "kafka.properties.{key} must be a string, number or boolean, not {}",
                    other.type_str()
                ),
            };
            kafka_properties.push((key.clone(), value));
        }
        let config_from = match opts.config {
            Some(_) => given((), cli("config", "TANDEM_CONFIG")).describe(),
            None => "default".to_string(),
        };
        let mut settings = vec![
            Setting {
                key: "config",
                value: file_name
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(none)".into()),
                from: config_from,
            },
            Setting {
                key: "storage",
                value: layout.root().to_string(),
                from: store.describe(),
            },
        ];
        match &brokers {
            Some(b) => settings.push(Setting {
                key: "kafka.brokers",
                value: b.value.clone(),
                from: b.describe(),
            }),
            None => settings.push(Setting {
                key: "kafka.brokers",
                value: "(none)".into(),
                from: "default".into(),
            }),
        }
        settings.push(Setting {
            key: "kafka.group_prefix",
            value: group_prefix.value.clone(),
            from: group_prefix.describe(),
        });
        for (key, g) in [("schemas", &schemas), ("jobs", &jobs)] {
            settings.push(Setting {
                key,
                value: g.value.display().to_string(),
                from: g.describe(),
            });
        }
        settings.push(Setting {
            key: "speed.prune_grace_secs",
            value: prune_grace.value.to_string(),
            from: prune_grace.describe(),
        });
        settings.push(Setting {
            key: "speed.checkpoint_interval_ms",
            value: checkpoint_interval.value.to_string(),
            from: checkpoint_interval.describe(),
        });
        settings.push(Setting {
            key: "speed.checkpoint_keep",
            value: checkpoint_keep.value.to_string(),
            from: checkpoint_keep.describe(),
        });
        settings.push(Setting {
            key: "speed.ready_max_lag",
            value: ready_max_lag.value.to_string(),
            from: ready_max_lag.describe(),
        });
        settings.push(Setting {
            key: "speed.max_state_keys",
            value: max_state_keys.value.to_string(),
            from: max_state_keys.describe(),
        });
        settings.push(Setting {
            key: "speed.dedup_window_secs",
            value: dedup_window.value.to_string(),
            from: dedup_window.describe(),
        });
        settings.push(Setting {
            key: "api.ingest_nice",
            value: ingest_nice.value.to_string(),
            from: ingest_nice.describe(),
        });
        for (key, g) in [
            ("archive.flush_interval_ms", &flush_interval),
            ("archive.target_file_mb", &target_file_mb),
            ("maintenance.compact_interval_secs", &compact_every),
            ("maintenance.vacuum_interval_secs", &vacuum_every),
            ("maintenance.vacuum_retention_hours", &retention),
        ] {
            settings.push(Setting {
                key,
                value: g.value.to_string(),
                from: g.describe(),
            });
        }
        settings.push(Setting {
            key: "archive.flush_rows",
            value: flush_rows.value.to_string(),
            from: flush_rows.describe(),
        });
        settings.push(Setting {
            key: "batch.memory_limit",
            value: format!("{} MiB", memory_limit.value >> 20),
            from: match memory_limit.origin {
                Origin::Default => "default (half the machine's memory)".into(),
                _ => memory_limit.describe(),
            },
        });
        settings.push(Setting {
            key: "batch.spill_dir",
            value: file
                .batch
                .spill_dir
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| std::env::temp_dir().display().to_string()),
            from: if file.batch.spill_dir.is_some() {
                "config file".into()
            } else {
                "default".into()
            },
        });
        settings.push(Setting {
            key: "batch.schedule",
            value: scheduler.views.as_ref().map_or_else(
                || "off".to_string(),
                |s| format!("{} ({})", s.expr, s.timezone),
            ),
            from: if file.batch.schedule.is_some() {
                "config file".into()
            } else {
                "default".into()
            },
        });
        settings.push(match &batch_threads {
            Some(t) => Setting {
                key: "batch.threads",
                value: t.value.to_string(),
                from: t.describe(),
            },
            None => Setting {
                key: "batch.threads",
                value: std::thread::available_parallelism()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|_| "1".into()),
                from: "default (the machine's cores)".into(),
            },
        });
        for (key, value) in &kafka_properties {
            // Secrets (sasl.password, ssl.key.password, ...) are not printed.
            let secret = key.contains("password") || key.contains("secret");
            settings.push(Setting {
                key: "kafka.properties.*",
                value: format!("{key}={}", if secret { "(set)" } else { value }),
                from: "config file".into(),
            });
        }
        settings.push(Setting {
            key: "listen",
            value: listen.value.to_string(),
            from: listen.describe(),
        });
        settings.push(match &admin_listen {
            Some(a) => Setting {
                key: "admin_listen",
                value: a.value.to_string(),
                from: a.describe(),
            },
            None => Setting {
                key: "admin_listen",
                value: "(none)".into(),
                from: "default".into(),
            },
        });
        Ok(Config {
            layout,
            brokers: brokers.map(|b| b.value),
            group_prefix: group_prefix.value,
            definitions_given: schemas.origin != Origin::Default || jobs.origin != Origin::Default,
            schemas: schemas.value,
            jobs: jobs.value,
            listen: listen.value,
            admin_listen: admin_listen.map(|a| a.value),
            prune_grace: std::time::Duration::from_secs(prune_grace.value),
            checkpoint_interval: std::time::Duration::from_millis(checkpoint_interval.value),
            checkpoint_keep: checkpoint_keep.value,
            ready_max_lag: ready_max_lag.value,
            max_state_keys: max_state_keys.value,
            dedup_window: std::time::Duration::from_secs(dedup_window.value),
            kafka_properties,
            archiver: tandem_speed::ArchiverConfig {
                flush_interval: std::time::Duration::from_millis(flush_interval.value),
                flush_rows: flush_rows.value,
                target_file_bytes: target_file_mb.value << 20,
            },
            compact_interval: (compact_every.value > 0)
                .then(|| std::time::Duration::from_secs(compact_every.value)),
            vacuum_interval: (vacuum_every.value > 0)
                .then(|| std::time::Duration::from_secs(vacuum_every.value)),
            vacuum_retention: std::time::Duration::from_secs(retention.value.saturating_mul(3600)),
            batch: tandem_batch::BatchOptions {
                threads: batch_threads.map(|t| t.value),
                memory_limit: Some(memory_limit.value),
                spill_dir: file.batch.spill_dir.clone(),
                close_grace,
                engine: match &file.batch.engine {
                    Some(e) => parse_engine(e).context("batch.engine")?,
                    None => None,
                },
            },
            scheduler,
            scheduler_interval,
            api_keys,
            allow_anonymous_remote: file.api.allow_anonymous_remote.unwrap_or(false),
            ingest_nice: ingest_nice.value,
            settings,
        })
    }

    pub fn brokers(&self) -> Result<&str> {
        match &self.brokers {
            Some(b) => Ok(b),
            None => bail!("no Kafka brokers: set --brokers, TANDEM_KAFKA_BROKERS or `kafka.brokers` in tandem.toml"),
        }
    }

    /// How the consumers reach Kafka.
    pub fn kafka(&self) -> Result<tandem_speed::KafkaConfig> {
        Ok(tandem_speed::KafkaConfig {
            group_prefix: self.group_prefix.clone(),
            extra: self.kafka_properties.clone(),
            ..tandem_speed::KafkaConfig::new(self.brokers()?)
        })
    }

    /// The runtime ingestion runs on in a process that also serves queries (`None`: the
    /// caller's), see `crate::ingest`.
    pub fn ingest_runtime(&self) -> Result<Option<tokio::runtime::Handle>> {
        crate::ingest::runtime(self.ingest_nice)
    }

    /// The consumers' settings: which to start is the role's choice.
    /// (They run on the caller's runtime: a process that serves too sets `runtime` to
    /// [`Self::ingest_runtime`].)
    pub fn consumer_options(&self, archive: bool, speed: bool) -> tandem_speed::ConsumerOptions {
        tandem_speed::ConsumerOptions {
            archive,
            speed,
            speed_tick: self.checkpoint_interval,
            checkpoint_keep: self.checkpoint_keep,
            prune_grace: self.prune_grace,
            ready_max_lag: self.ready_max_lag,
            max_state_keys: self.max_state_keys,
            dedup_window: self.dedup_window,
            archiver: self.archiver,
            ..Default::default()
        }
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.settings.iter().map(|s| s.key.len()).max().unwrap_or(0);
        let value_width = self
            .settings
            .iter()
            .map(|s| s.value.len())
            .max()
            .unwrap_or(0);
        for s in &self.settings {
            writeln!(
                f,
                "{:width$} = {:value_width$}  # {}",
                s.key, s.value, s.from
            )?;
        }
        Ok(())
    }
}

/// A store given as a directory or as a URL.
#[derive(Debug, Clone)]
enum StoreSpec {
    Dir(PathBuf),
    Url(String),
}

/// Half the machine's memory (from `/proc/meminfo`), or 4 GiB where that cannot be read.
fn default_memory_limit() -> usize {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
    });
    match total_kib {
        Some(kib) => kib * 1024 / 2,
        None => 4 << 30,
    }
}

/// A size: bytes as a number, or a number with `B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`,
/// `TB`/`TiB` (decimal and binary units alike, spaces allowed).
pub fn parse_size(v: &toml::Value) -> std::result::Result<usize, String> {
    let text = match v {
        toml::Value::Integer(n) if *n > 0 => return Ok(*n as usize),
        toml::Value::String(s) => s.trim(),
        other => return Err(format!("expected a size such as \"4GiB\", not {other}")),
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as \"4GiB\""))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" | "k" => 1024.0,
        "mb" => 1e6,
        "mib" | "m" => 1024.0 * 1024.0,
        "gb" => 1e9,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tb" => 1e12,
        "tib" | "t" => 1024f64.powi(4),
        u => {
            return Err(format!(
                "`{u}` is not a unit of size (B, KiB, MiB, GiB, MB, GB, ...)"
            ))
        }
    };
    let bytes = number * scale;
    if !(bytes >= 1.0 && bytes < usize::MAX as f64) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(bytes as usize)
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        global: GlobalOpts,
    }

    /// The option a `TANDEM_*` variable sets.
    fn id_of(var: &str) -> &'static str {
        match var {
            "TANDEM_KAFKA_BROKERS" => "brokers",
            v => GLOBAL_IDS
                .into_iter()
                .find(|id| v == format!("TANDEM_{}", id.to_uppercase()))
                .expect("a known variable"),
        }
    }

    /// Parses `args` as if `env` were the environment. (Tests run in parallel, so the process
    /// environment is left alone: clap reads a variable as a default value of its argument,
    /// and the origin is then marked as the environment.)
    fn parse(args: &[&str], env: &[(&str, &str)]) -> GlobalOpts {
        let mut cmd = Cli::command();
        for (k, v) in env {
            cmd = cmd.mut_arg(id_of(k), |a| a.default_value(v.to_string().leak() as &str));
        }
        let argv = std::iter::once("tandem").chain(args.iter().copied());
        let matches = cmd.try_get_matches_from(argv).unwrap();
        let mut opts = Cli::from_arg_matches(&matches)
            .unwrap()
            .global
            .with_origins(&matches);
        for (k, _) in env {
            opts.origins.entry(id_of(k)).or_insert(Origin::Env);
        }
        opts
    }

    #[test]
    fn unknown_keys_are_named() {
        let err =
            toml::from_str::<FileConfig>("storage = \"memory:///\"\n[kafka]\nbroker = \"x\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("broker"), "{err}");
    }

    #[test]
    fn flag_beats_environment_beats_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem.toml");
        std::fs::write(&path, "storage = \"memory:///\"\nlisten = \"127.0.0.1:9000\"\nschemas = \"defs\"\n[kafka]\nbrokers = \"file:9092\"\n").unwrap();
        let config = path.to_str().unwrap();

        // The file beats the defaults.
        let c = Config::resolve(&parse(&["--config", config], &[])).unwrap();
        assert_eq!(c.layout.root().scheme(), "memory");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.schemas, dir.path().join("defs"));
        assert_eq!(c.jobs, PathBuf::from("jobs"));
        assert_eq!(c.brokers.as_deref(), Some("file:9092"));

        // The environment beats the file; a flag beats the environment.
        let env = [
            ("TANDEM_KAFKA_BROKERS", "env:9092"),
            ("TANDEM_DATA", "/tmp/from-env"),
        ];
        let c = Config::resolve(&parse(&["--config", config], &env)).unwrap();
        assert_eq!(c.brokers.as_deref(), Some("env:9092"));
        assert_eq!(c.layout.root().as_str(), "file:///tmp/from-env/");
        let c = Config::resolve(&parse(
            &[
                "--config",
                config,
                "--brokers",
                "flag:9092",
                "--storage",
                "memory:///",
            ],
            &env,
        ))
        .unwrap();
        assert_eq!(c.brokers.as_deref(), Some("flag:9092"));
        // A --storage flag beats TANDEM_DATA: they name the same setting.
        assert_eq!(c.layout.root().scheme(), "memory");
        let shown = c.to_string();
        assert!(shown.contains("flag --storage"), "{shown}");
        assert!(shown.contains("tandem.toml key `listen`"), "{shown}");

        let env_only = Config::resolve(&parse(&[], &env)).unwrap().to_string();
        assert!(
            env_only.contains("environment TANDEM_KAFKA_BROKERS"),
            "{env_only}"
        );
        assert!(env_only.contains("environment TANDEM_DATA"), "{env_only}");
    }

    #[test]
    fn batch_memory_limit_takes_units_and_bad_values_name_the_key() {
        let size =
            |v: &str| parse_size(&toml::from_str::<toml::Value>(&format!("v = {v}")).unwrap()["v"]);
        assert_eq!(size("\"1GiB\""), Ok(1 << 30));
        assert_eq!(size("\"512 MB\""), Ok(512_000_000));
        assert_eq!(size("\"1.5g\""), Ok(3 << 29));
        assert_eq!(size("4096"), Ok(4096));
        assert!(size("\"lots\"").is_err());
        assert!(size("\"3 parsecs\"").is_err());
        assert!(size("-1").is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem.toml");
        std::fs::write(&path, "[batch]\nmemory_limit = \"1GiB\"\nthreads = 2\n").unwrap();
        let c = Config::resolve(&parse(&["--config", path.to_str().unwrap()], &[])).unwrap();
        assert_eq!(c.batch.memory_limit, Some(1 << 30));
        assert_eq!(c.batch.threads, Some(2));
        assert!(c.to_string().contains("batch.memory_limit"));
        std::fs::write(
            &path,
            "[archive]\nflush_interval_ms = 500\nflush_rows = 1000\ntarget_file_mb = 8\n[maintenance]\ncompact_interval_secs = 3600\n",
        )
        .unwrap();
        let c = Config::resolve(&parse(&["--config", path.to_str().unwrap()], &[])).unwrap();
        assert_eq!(
            c.archiver.flush_interval,
            std::time::Duration::from_millis(500)
        );
        assert_eq!(c.archiver.flush_rows, 1000);
        assert_eq!(c.archiver.target_file_bytes, 8 << 20);
        assert_eq!(
            c.compact_interval,
            Some(std::time::Duration::from_secs(3600))
        );
        assert_eq!(c.vacuum_interval, None);
        assert_eq!(c.consumer_options(true, false).archiver.flush_rows, 1000);
        for bad in [
            "[batch]\nmemory_limit = \"lots\"",
            "[batch]\nmemory_limit = \"1KiB\"",
            "[batch]\nthreads = 0",
            "[archive]\nflush_rows = 0",
            "[archive]\ntarget_file_mb = 0",
            "[archive]\nflush_interval_ms = 0",
            "[api]\ningest_nice = 20",
            "[api]\ningest_nice = -1",
        ] {
            std::fs::write(&path, format!("{bad}\n")).unwrap();
            let err = Config::resolve(&parse(&["--config", path.to_str().unwrap()], &[]))
                .unwrap_err()
                .to_string();
            let key = bad.trim_start_matches('[').split(']').next().unwrap();
            assert!(err.contains(&format!("{key}.")), "{bad}: {err}");
        }
    }

    #[test]
    fn data_together_with_storage_is_an_error() {
        let err = Config::resolve(&parse(
            &["--data", "/tmp/x", "--storage", "memory:///"],
            &[],
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("--data") && err.contains("--storage"), "{err}");
    }
}
