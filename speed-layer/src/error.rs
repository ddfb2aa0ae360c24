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

    /// A schema named by the configuration does not exist.
    #[error("no schema `{0}`")]
    UnknownSchema(String),
}

/// Result alias of tandem-speed.
pub type Result<T, E = SpeedError> = std::result::Result<T, E>;
