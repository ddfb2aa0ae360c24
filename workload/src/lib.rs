//! tandem-workload: tools, not a layer. It owns the synthetic reference workload ([`gen`]:
//! mobile attribution events with realistic skew, late arrivals and a seed) that the demo,
//! `tandem gen` and the tests produce, and the throughput benchmarks built on it ([`bench`]:
//! what `tandem bench` and `cargo bench -p tandem-workload` measure). No layer depends on it.

pub mod bench;
pub mod gen;

pub use gen::{Event, GenConfig, Generator};

/// Errors of the workload tools.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadError {
    /// A speed layer could not be built or fed.
    #[error(transparent)]
    Speed(#[from] tandem_speed::SpeedError),

    /// Decoding failed.
    #[error(transparent)]
    Core(#[from] tandem_core::CoreError),

    /// The schema the benchmark names is not defined.
    #[error("no schema `{0}`")]
    UnknownSchema(String),

    /// A benchmark run did not process what it was given.
    #[error("benchmark: {0}")]
    Bench(String),
}
