//! The reference definitions, compiled in, so that `tandem demo` runs from any directory.

use std::path::Path;

use anyhow::{Context, Result};
use tandem_core::Catalog;

use crate::config::Config;

const SCHEMAS: &[(&str, &str)] = &[(
    "app_events.toml",
    include_str!("../schemas/app_events.toml"),
)];
const JOBS: &[(&str, &str)] = &[
    (
        "installs_hourly.toml",
        include_str!("../jobs/installs_hourly.toml"),
    ),
    (
        "purchases_daily.toml",
        include_str!("../jobs/purchases_daily.toml"),
    ),
    (
        "active_devices_daily.toml",
        include_str!("../jobs/active_devices_daily.toml"),
    ),
    (
        "install_retention.toml",
        include_str!("../jobs/install_retention.toml"),
    ),
];

/// Loads the configured definitions; when none were named and `./schemas` is absent, writes
/// the reference definitions under `fallback` and loads those.
pub fn load(config: &Config, fallback: &Path) -> Result<Catalog> {
    if config.definitions_given || config.schemas.is_dir() {
        return Catalog::load(&config.schemas, &config.jobs).context("loading definitions");
    }
    let (schemas, jobs) = (fallback.join("schemas"), fallback.join("jobs"));
    for (dir, files) in [(&schemas, SCHEMAS), (&jobs, JOBS)] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, text) in files {
            std::fs::write(dir.join(name), text)
                .with_context(|| format!("writing {}", dir.display()))?;
        }
    }
    tracing::info!(dir = %fallback.display(), "using the built-in reference definitions");
    Catalog::load(&schemas, &jobs).context("loading the built-in definitions")
}
