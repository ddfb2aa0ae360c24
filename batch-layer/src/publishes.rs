//! A view's publishes: their history, and rolling a view back to one of them.
//!
//! Every publish is one commit of the view's table whose metadata holds the coverage after it,
//! the days it replaced, the definition hash and the master version read (crate::compute). A
//! rollback is Delta's RESTORE to the publish's version, committed with that publish's
//! metadata, so that serving (which reads the newest commit's coverage) answers exactly as it
//! did then: the same rows, the same coverage, the same definition.

use deltalake::kernel::transaction::CommitProperties;
use futures::TryStreamExt;
use serde_json::{json, Value as Json};
use tandem_core::storage::Storage;

use crate::compute::{PublishMeta, COVERAGE_KEY, DAYS_KEY, HASH_KEY, MASTER_VERSION_KEY};
use crate::error::{BatchError, Result};

/// Metadata key of a rollback commit: the version it restored.
pub const RESTORED_KEY: &str = "tandem.restored_version";

/// One publish (or rollback) of a view, as its commit records it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PublishEntry {
    pub version: i64,
    /// Commit time, epoch milliseconds.
    pub timestamp_ms: Option<i64>,
    /// `publish` or `rollback`.
    pub kind: String,
    /// The days the commit replaced (`YYYY-MM-DD`; empty for a rollback).
    pub days: Vec<String>,
    /// The view's coverage after the commit, as inclusive ranges of days.
    pub coverage: Vec<(String, String)>,
    pub definition_hash: Option<String>,
    pub master_version: Option<i64>,
    /// For a rollback: the version restored.
    pub restored: Option<i64>,
}

/// The publishes and rollbacks of `view`, newest first (empty if it was never published).
pub async fn history(storage: &Storage, view: &str) -> Result<Vec<PublishEntry>> {
    let url = storage.layout().view(view);
    let Some(table) = storage.open(&url).await? else {
        return Ok(Vec::new());
    };
    let latest = table.version().unwrap_or(0) as i64;
    let infos: Vec<_> = table
        .history(None)
        .try_collect()
        .await
        .map_err(|e| BatchError::delta(&url, e))?;
    // Commit infos come newest first, one per version.
    let mut out = Vec::new();
    for (i, info) in infos.into_iter().enumerate() {
        let Some(meta) = PublishMeta::of(&info) else {
            continue;
        };
        let restored = info.info.get(RESTORED_KEY).and_then(Json::as_i64);
        let days = match (restored, info.info.get(DAYS_KEY)) {
            (None, Some(Json::Array(d))) => d
                .iter()
                .filter_map(Json::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        out.push(PublishEntry {
            version: latest - i as i64,
            timestamp_ms: info.timestamp,
            kind: if restored.is_some() {
                "rollback"
            } else {
                "publish"
            }
            .into(),
            days,
            coverage: meta.coverage,
            definition_hash: meta.definition_hash,
            master_version: meta.master_version,
            restored,
        });
    }
    Ok(out)
}

/// Restores `view` to the publish of `version`: a new commit whose rows, coverage and
/// definition hash are that publish's. Returns the new version.
pub async fn rollback(storage: &Storage, view: &str, version: i64) -> Result<i64> {
    let url = storage.layout().view(view);
    let Some(table) = storage.open(&url).await? else {
        return Err(BatchError::BadRequest(format!(
            "view `{view}` was never published"
        )));
    };
    let entries = history(storage, view).await?;
    let Some(target) = entries.iter().find(|e| e.version == version) else {
        let versions: Vec<String> = entries.iter().map(|e| e.version.to_string()).collect();
        return Err(BatchError::BadRequest(format!(
            "version {version} of view `{view}` is not a publish (its publishes: {})",
            if versions.is_empty() {
                "none".to_string()
            } else {
                versions.join(", ")
            }
        )));
    };
    if entries.first().is_some_and(|e| e.version == version) {
        return Err(BatchError::BadRequest(format!(
            "version {version} is already the newest publish of view `{view}`"
        )));
    }
    let ranges: Vec<Json> = target.coverage.iter().map(|(a, b)| json!([a, b])).collect();
    let mut metadata = vec![
        (COVERAGE_KEY.to_string(), Json::Array(ranges)),
        (DAYS_KEY.to_string(), json!(Vec::<String>::new())),
        (RESTORED_KEY.to_string(), json!(version)),
    ];
    if let Some(h) = &target.definition_hash {
        metadata.push((HASH_KEY.to_string(), json!(h)));
    }
    if let Some(m) = target.master_version {
        metadata.push((MASTER_VERSION_KEY.to_string(), json!(m)));
    }
    let (table, _metrics) = table
        .restore()
        .with_version_to_restore(version as _)
        .with_commit_properties(CommitProperties::default().with_metadata(metadata))
        .await
        .map_err(|e| BatchError::delta(&url, e))?;
    let new_version = table.version().unwrap_or(0) as i64;
    tracing::info!(
        view,
        restored = version,
        version = new_version,
        "view rolled back"
    );
    Ok(new_version)
}
