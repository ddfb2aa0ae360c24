//! Configuration: flags, then `TANDEM_*` environment variables (clap reads both), then
//! `tandem.toml`, then defaults. Unknown keys in the file are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
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
    /// Storage URL: file:///dir or memory:///.
    #[arg(long, global = true, env = "TANDEM_STORAGE")]
    pub storage: Option<String>,
    /// Kafka bootstrap servers.
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
    #[serde(default)]
    pub kafka: KafkaFile,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaFile {
    pub brokers: Option<String>,
    pub group_prefix: Option<String>,
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
    /// Whether the definition directories were named (not defaults).
    pub definitions_given: bool,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

impl Config {
    pub fn resolve(opts: &GlobalOpts) -> Result<Self> {
        let (file, base) = match &opts.config {
            Some(p) => (
                read_file(p)?,
                p.parent().map(Path::to_path_buf).unwrap_or_default(),
            ),
            None if Path::new("tandem.toml").exists() => {
                (read_file(Path::new("tandem.toml"))?, PathBuf::new())
            }
            None => (FileConfig::default(), PathBuf::new()),
        };
        // Paths in the file are relative to the file.
        let rel = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base.join(p)
            }
        };
        let layout = if let Some(d) = &opts.data {
            Layout::local(d)?
        } else if let Some(s) = &opts.storage {
            Layout::parse(s).context("--storage / TANDEM_STORAGE")?
        } else if let Some(s) = &file.storage {
            Layout::parse(s).context("tandem.toml: key `storage`")?
        } else if let Some(d) = &file.data {
            Layout::local(&rel(d))?
        } else {
            Layout::local(Path::new("tandem-data"))?
        };
        let definitions_given = opts.schemas.is_some()
            || opts.jobs.is_some()
            || file.schemas.is_some()
            || file.jobs.is_some();
        Ok(Config {
            layout,
            brokers: opts.brokers.clone().or(file.kafka.brokers),
            group_prefix: file.kafka.group_prefix.unwrap_or_else(|| "tandem".into()),
            schemas: opts
                .schemas
                .clone()
                .or(file.schemas.as_ref().map(rel))
                .unwrap_or_else(|| "schemas".into()),
            jobs: opts
                .jobs
                .clone()
                .or(file.jobs.as_ref().map(rel))
                .unwrap_or_else(|| "jobs".into()),
            listen: opts
                .listen
                .or(file.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid")),
            definitions_given,
        })
    }

    pub fn brokers(&self) -> Result<&str> {
        match &self.brokers {
            Some(b) => Ok(b),
            None => bail!("no Kafka brokers: set --brokers, TANDEM_KAFKA_BROKERS or `kafka.brokers` in tandem.toml"),
        }
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err =
            toml::from_str::<FileConfig>("storage = \"memory:///\"\n[kafka]\nbroker = \"x\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("broker"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tandem.toml");
        std::fs::write(&path, "storage = \"memory:///\"\nlisten = \"127.0.0.1:9000\"\nschemas = \"defs\"\n[kafka]\nbrokers = \"file:9092\"\n").unwrap();
        let opts = GlobalOpts {
            config: Some(path),
            brokers: Some("flag:9092".into()),
            ..Default::default()
        };
        let c = Config::resolve(&opts).unwrap();
        assert_eq!(c.brokers.as_deref(), Some("flag:9092"));
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.layout.root().scheme(), "memory");
        assert_eq!(c.schemas, dir.path().join("defs"));
    }
}
