//! Table upkeep: `tandem compact` and `tandem vacuum` over every table Tandem writes.
//!
//! The archiver commits small files (one per partition per flush), so compaction merges a
//! day's files into few large ones (Delta OPTIMIZE: a commit that removes and adds files
//! without changing the rows, `dataChange = false`, so readers and the batch layer's dirty-day
//! tracking see no change). Vacuum deletes the files no version within the retention period
//! references: files that compaction and publishes replaced, and files written but never
//! committed (a crash between writing and committing, a failed batch run), which Delta's
//! `full` mode finds by listing the table's directory.

use std::num::NonZeroU64;
use std::time::Duration;

use deltalake::operations::vacuum::VacuumMode;
use deltalake::parquet::basic::{Compression, ZstdLevel};
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::{FilterOp, FilterValue};
use serde::Serialize;
use tandem_core::storage::Storage;
use tandem_core::view::DAY_COLUMN;
use tandem_core::Catalog;
use url::Url;

use crate::error::{BatchError, Result};

/// A table Tandem writes, by what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// `master/app_events`, `dead_letter/app_events`, `views/installs_hourly`.
    pub name: String,
    pub url: Url,
    /// Partitioned by day (`dt`): compaction can be limited to days.
    pub by_day: bool,
}

/// Every table of `catalog`'s schemas, views and jobs, and the runs table (whether it exists
/// yet or not).
pub fn tables(storage: &Storage, catalog: &Catalog) -> Vec<Table> {
    let layout = storage.layout();
    let mut out = Vec::new();
    for s in catalog.schemas.keys() {
        out.push(Table {
            name: format!("master/{s}"),
            url: layout.master(s),
            by_day: true,
        });
        out.push(Table {
            name: format!("dead_letter/{s}"),
            url: layout.dead_letter(s),
            by_day: false,
        });
    }
    for v in catalog.views.keys() {
        out.push(Table {
            name: format!("views/{v}"),
            url: layout.view(v),
            by_day: true,
        });
    }
    for j in catalog.jobs.keys() {
        out.push(Table {
            name: format!("jobs/{j}"),
            url: layout.job(j),
            by_day: false,
        });
    }
    // One small commit per run: compaction keeps the scheduler's reads of it quick.
    out.push(Table {
        name: "batch/runs".into(),
        url: layout.runs(),
        by_day: false,
    });
    out
}

/// What compacting one table did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CompactReport {
    pub table: String,
    pub files_removed: u64,
    pub files_added: u64,
    pub partitions: u64,
    /// The table's version after the compaction (`None`: nothing to compact, no commit).
    pub version: Option<i64>,
}

/// Merges the small files of `table` (of `days` only, `YYYY-MM-DD`, when given and the table is
/// partitioned by day) into files of about `target_bytes`. `None` if the table does not exist.
pub async fn compact(
    storage: &Storage,
    table: &Table,
    days: Option<&[String]>,
    target_bytes: u64,
) -> Result<Option<CompactReport>> {
    let Some(t) = storage.open(&table.url).await? else {
        return Ok(None);
    };
    let before = t.version().map(|v| v as i64);
    let filters = match days {
        Some(days) if table.by_day => vec![(
            DAY_COLUMN,
            FilterOp::In,
            FilterValue::Set(days.iter().map(String::as_str).collect()),
        )],
        _ => Vec::new(),
    };
    let target = NonZeroU64::new(target_bytes.max(1)).expect("at least 1");
    // deltalake's own compaction settings (Zstandard level 4), in row groups no larger than
    // a master file's, which every thread shares when a day is read.
    let level = ZstdLevel::try_new(4).unwrap_or_default();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        .set_max_row_group_row_count(Some(tandem_core::master::MASTER_ROW_GROUP_ROWS))
        .build();
    let (t, metrics) = t
        .optimize()
        .with_filters(&filters)
        .with_target_size(target)
        .with_writer_properties(props)
        .await
        .map_err(|e| BatchError::delta(&table.url, e))?;
    let after = t.version().map(|v| v as i64);
    Ok(Some(CompactReport {
        table: table.name.clone(),
        files_removed: metrics.num_files_removed,
        files_added: metrics.num_files_added,
        partitions: metrics.partitions_optimized,
        version: (after != before).then_some(after).flatten(),
    }))
}

/// What vacuuming one table did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct VacuumReport {
    pub table: String,
    /// Paths relative to the table.
    pub files: Vec<String>,
    pub dry_run: bool,
}

/// Deletes the files of `table` that no version within `retention` references, including files
/// written but never committed. `None` if the table does not exist.
///
/// Readers and writers still at work need what they read or write to outlive them: serving
/// keeps the version before the newest while a new one loads, and a batch run writes its files
/// before its commit names them. Keep `retention` longer than the longest run (the default of
/// `tandem vacuum` is a week, Delta's own).
pub async fn vacuum(
    storage: &Storage,
    table: &Table,
    retention: Duration,
    dry_run: bool,
) -> Result<Option<VacuumReport>> {
    let Some(t) = storage.open(&table.url).await? else {
        return Ok(None);
    };
    let retention = chrono::Duration::from_std(retention)
        .map_err(|_| BatchError::BadRequest("the retention period is too long".into()))?;
    let (_, metrics) = t
        .vacuum()
        .with_mode(VacuumMode::Full)
        .with_retention_period(retention)
        .with_enforce_retention_duration(false)
        .with_dry_run(dry_run)
        .await
        .map_err(|e| BatchError::delta(&table.url, e))?;
    let mut files = metrics.files_deleted;
    files.sort();
    Ok(Some(VacuumReport {
        table: table.name.clone(),
        files,
        dry_run,
    }))
}
