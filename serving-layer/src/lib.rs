//! tandem-serving: the HTTP API that dashboards read, and everything about its requests and
//! answers.
//!
//! A query names a view, a time range, a granularity, group-by dimensions, filters and
//! metrics: [`params`] reads them (query string or JSON body) into core's `ViewQuery`.
//! [`merge`] answers it from the batch layer for the buckets its published batch covers and
//! from the speed layer for the rest, rolls the buckets up and says per row which layer
//! answered. [`answer`] builds answers from the batch's settled part, printed once per batch
//! version, and the speed's rows; [`cache`] keeps both while what they came from stands.
//! [`render`] prints the answer as JSON, CSV or Arrow from one Arrow batch. [`api`] is the axum
//! router around them and [`server`] the connections' loop that serves it; [`auth`] checks
//! API keys and scopes tenants; [`telemetry`] keeps its Prometheus histograms; [`error`] turns
//! every error into a problem body; [`openapi`] describes it all at `/openapi.json`. The layers are reached only through core's
//! `BatchViews` and `RealtimeView` traits.

pub mod answer;
pub mod api;
pub mod auth;
pub mod body;
pub mod cache;
pub mod error;
pub mod gzip;
pub mod merge;
pub mod openapi;
pub mod params;
pub mod render;
pub mod sendfile;
pub mod server;
pub mod telemetry;

#[cfg(test)]
mod tests;

pub use api::{
    admin_router, router, router_with, ApiMetrics, AppState, Check, MetricsSource, QueryLimits,
    Readiness, Shared,
};
pub use error::ApiError;
pub use params::{Format, QueryParams};
