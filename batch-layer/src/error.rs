//! Errors of tandem-batch.

/// Errors of recomputing, publishing and reading batch views.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    #[error(transparent)]
    Core(#[from] tandem_core::CoreError),

    #[error("datafusion")]
    DataFusion(#[from] datafusion::error::DataFusionError),

    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),

    /// A Delta table could not be read or written.
    #[error("{table}")]
    Delta {
        table: String,
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// Another publish of the same view won the race; nothing of this run is visible.
    #[error("view `{view}`: another publish committed first; nothing was published, run again")]
    Conflict {
        view: String,
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// An input file could not be read.
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// An SQL job's definition or query is wrong; the file is named.
    #[error("{path}: {message}")]
    Job { path: String, message: String },

    /// The request does not make sense (e.g. `--from` after `--to`).
    #[error("{0}")]
    BadRequest(String),
}

/// Result alias of tandem-batch.
pub type Result<T, E = BatchError> = std::result::Result<T, E>;

impl BatchError {
    pub(crate) fn delta(table: &url::Url, e: deltalake::DeltaTableError) -> Self {
        BatchError::Delta {
            table: table.to_string(),
            source: Box::new(e),
        }
    }
}

impl From<BatchError> for tandem_core::CoreError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Core(c) => c,
            BatchError::DataFusion(e) => tandem_core::CoreError::DataFusion(e),
            BatchError::Arrow(e) => tandem_core::CoreError::Arrow(e),
            BatchError::Delta { table, source } => tandem_core::CoreError::Table { table, source },
            other => tandem_core::CoreError::Layer {
                layer: "batch layer",
                retryable: false,
                source: Box::new(other),
            },
        }
    }
}
