//! tandem-batch: everything that reads the master dataset.
//!
//! [`compute`] recomputes views exactly with DataFusion from the master dataset (a Delta
//! table of every valid event), a day at a time, and publishes each run atomically, one Delta
//! commit per view that replaces the recomputed days and records the view's coverage and
//! definition hash; `cube` builds a day's view rows and rollups in one pass over a day's
//! events or DataFusion's first phase (`rollup` merges rollups for views it cannot serve), and
//! `dayscan` reads a day's files with the view's text dimensions as dictionaries, and
//! `value_ids` numbers the distinct values the cube pass counts. [`views`] reads the
//! published views back for the serving layer through core's `BatchViews`. [`import`] loads
//! history files into the master dataset; [`maintenance`] compacts and vacuums the tables;
//! [`erase`] deletes one subject's events; [`dlq`] lists and replays dead letters.
//! [`hll`] is the DataFusion aggregate that builds the same DataSketches HLL sketches as the
//! speed layer. A recompute's first phase may run on an Apache Ballista cluster
//! ([`BatchOptions::engine`]).
//!
//! For analysts and engineers: [`jobs`] runs SQL jobs and ad-hoc queries over the master
//! datasets, the views and the jobs' outputs; [`scheduler`] runs views and jobs on their cron
//! schedules under leases, recording every run in the [`runs`] table; [`backfill`] recomputes
//! a range chunk by chunk and resumes; [`publishes`] lists a view's publishes and rolls one
//! back.

pub mod backfill;
pub mod compute;
mod cube;
mod dayscan;
pub mod dlq;
pub mod erase;
pub mod error;
pub mod hll;
pub mod import;
pub mod jobs;
pub mod maintenance;
mod pool;
pub mod publishes;
mod rollup;
pub mod runs;
pub mod scheduler;
mod value_ids;
pub mod views;

#[cfg(test)]
mod job_tests;
#[cfg(test)]
mod tests;

pub use compute::{BatchLayer, BatchOptions, DayReport, Progress, PublishReport, RunRequest};
pub use error::{BatchError, Result};
pub use import::{import_files, import_jsonl, FileReport, ImportReport, PROGRESS_EVERY};
pub use views::DeltaBatchViews;
