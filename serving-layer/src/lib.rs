//! tandem-serving: the HTTP API that dashboards read.
//!
//! A query names a view, a time range, a granularity, group-by dimensions, filters and
//! metrics. [`merge`] answers it from the batch layer for the buckets its published batch
//! covers and from the speed layer for the rest, rolls the buckets up and says per row which
//! layer answered. [`api`] is the axum router around it. The layers are reached only through
//! core's `BatchViews` and `RealtimeView` traits.

pub mod api;
pub mod merge;

#[cfg(test)]
mod tests;

pub use api::{router, ApiMetrics, AppState};
pub use merge::answer;
