//! Errors of tandem-core.

use std::path::PathBuf;

/// Errors raised while loading definitions, decoding events or answering queries.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A definition file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A definition file is not valid TOML or has an unknown / missing key.
    #[error("{path}: {message}")]
    Definition { path: PathBuf, message: String },

    /// A definition names a key whose value is wrong; the key is named.
    #[error("{path}: key `{key}`: {message}")]
    InvalidKey {
        path: PathBuf,
        key: String,
        message: String,
    },

    /// A query does not fit the view it names (the user's mistake: HTTP 400).
    #[error("{0}")]
    BadQuery(String),

    /// A view name that no definition has.
    #[error("unknown view `{0}`")]
    UnknownView(String),

    /// A storage URL that cannot be used.
    #[error("storage URL `{url}`: {message}")]
    Storage { url: String, message: String },

    /// A sketch that cannot be read back.
    #[error("sketch: {0}")]
    Sketch(String),

    /// An error from Arrow / DataFusion while evaluating a filter or building a batch.
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),

    /// A Delta table could not be read or written.
    #[error("delta table: {0}")]
    Delta(#[source] Box<deltalake::DeltaTableError>),

    /// A layer behind a seam failed (storage, broker); a retry may help.
    #[error("{0}")]
    Backend(String),

    /// An Arrow error while building or reading a batch.
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
}

/// Result alias of tandem-core.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

impl CoreError {
    pub(crate) fn key(
        path: &std::path::Path,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        CoreError::InvalidKey {
            path: path.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }
}
