//! Errors of tandem-speed.

/// Errors of the consumers (archiver and speed aggregation).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpeedError {
    /// The broker or the client failed; retrying may help.
    #[error("kafka")]
    Kafka(#[from] rdkafka::error::KafkaError),

    /// A definition, decoding or storage error from core.
    #[error(transparent)]
    Core(#[from] tandem_core::CoreError),

    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),

    /// A checkpoint could not be read or written.
    #[error("checkpoint `{path}`")]
    Checkpoint {
        path: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// A newer owner claimed the partition: this instance's checkpoint was refused.
    #[error("partition {partition} is fenced: checkpoint {seq} of generation {generation} was refused because a newer owner holds the partition")]
    Fenced {
        partition: i32,
        generation: u64,
        seq: u64,
    },

    /// The consumer cannot run on this runtime.
    #[error("{0}")]
    Runtime(String),

    /// A schema named by the configuration does not exist.
    #[error("no schema `{0}`")]
    UnknownSchema(String),
}

/// Result alias of tandem-speed.
pub type Result<T, E = SpeedError> = std::result::Result<T, E>;
