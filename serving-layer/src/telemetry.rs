//! The API's histograms and counters in a Prometheus registry (`prometheus-client`): request
//! latency by route template, method and status class; answers served from the cache or
//! computed; the time a computed answer took (the merge of both layers and its rendering).

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::api::AppState;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
    method: String,
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    outcome: String,
}

type Latency = Family<RouteLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// The cache, computed from the current state.
    Hit,
    /// The cache, computed from older speed state while the current one's is computed.
    Behind,
    /// Computed for the request.
    Miss,
}

/// The registry and the metrics in it.
pub struct Telemetry {
    registry: Registry,
    latency: Latency,
    cache: Family<CacheLabels, Counter>,
    answer_seconds: Histogram,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tandem_api");
        let latency: Latency = Family::new_with_constructor(latency_histogram);
        registry.register(
            "request_seconds",
            "Latency of API requests, by route template, method and status class",
            latency.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "answers",
            "Query answers served from the answer cache (hit), from it while the answer of newer speed state is computed (behind), or computed (miss)",
            cache.clone(),
        );
        let answer_seconds = latency_histogram();
        registry.register(
            "answer_compute_seconds",
            "Time to compute an answer that was not cached: both layers' rows merged and printed",
            answer_seconds.clone(),
        );
        Telemetry {
            registry,
            latency,
            cache,
            answer_seconds,
        }
    }
}

impl Telemetry {
    /// Where an answer came from.
    pub fn cached(&self, reuse: Reuse) {
        let outcome = match reuse {
            Reuse::Hit => "hit",
            Reuse::Behind => "behind",
            Reuse::Miss => "miss",
        };
        self.cache
            .get_or_create(&CacheLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    /// A computed answer took `seconds`.
    pub fn computed(&self, seconds: f64) {
        self.answer_seconds.observe(seconds);
    }

    /// The registry in Prometheus' text format, without OpenMetrics' closing `# EOF` (it is
    /// appended to the rest of `/metrics`).
    pub fn encode(&self, out: &mut String) {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_ok() {
            for line in text.lines().filter(|l| *l != "# EOF") {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
}

/// Times each routed request (a `route_layer`, so its route template is known).
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(req).await;
    let status = format!("{}xx", response.status().as_u16() / 100);
    state
        .metrics
        .telemetry
        .latency
        .get_or_create(&RouteLabels {
            route,
            method,
            status,
        })
        .observe(started.elapsed().as_secs_f64());
    response
}
