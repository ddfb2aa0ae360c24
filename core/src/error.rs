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

    /// A schema's definition changed in a way its master dataset cannot follow (a field
    /// removed or retyped).
    #[error("schema `{schema}`: {message}")]
    SchemaChange { schema: String, message: String },

    /// Another writer archived a partition's offsets since this one read them: this writer
    /// lost the partition (a zombie after a rebalance) and must not commit.
    #[error(
        "`{app}`: the master dataset holds offset {stored}, not {expected} as this archiver \
         believed: another archiver owns the partition now; nothing was committed"
    )]
    Fenced {
        app: String,
        expected: i64,
        stored: i64,
    },

    /// A query does not fit the view it names (the user's mistake: HTTP 400).
    #[error("{0}")]
    BadQuery(String),

    /// A view name that no definition has.
    #[error("unknown view `{0}`")]
    UnknownView(String),

    /// A storage URL that cannot be used (configuration).
    #[error("storage URL `{url}`: {message}")]
    Storage { url: String, message: String },

    /// The object store did not answer as asked (unreachable, refused, failed): a retry may
    /// help.
    #[error("object store at {url}")]
    ObjectStore {
        url: String,
        #[source]
        source: Box<object_store::Error>,
    },

    /// A sketch that cannot be read back.
    #[error("sketch: {0}")]
    Sketch(String),

    /// An error from Arrow / DataFusion while evaluating a filter or building a batch.
    #[error(transparent)]
    DataFusion(#[from] datafusion::error::DataFusionError),

    /// A Delta table could not be read or written.
    #[error("delta table")]
    Delta(#[source] Box<deltalake::DeltaTableError>),

    /// A named Delta table could not be read or written.
    #[error("delta table {table}")]
    Table {
        table: String,
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },

    /// A layer behind a seam failed; `retryable` says whether a retry may help (storage or a
    /// broker that is away) or not (a bug or corrupt data).
    #[error("{layer}")]
    Layer {
        layer: &'static str,
        retryable: bool,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A broken invariant: a bug, never the user's input.
    #[error("internal error: {0}")]
    Internal(String),

    /// An Arrow error while building or reading a batch.
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
}

/// Result alias of tandem-core.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Whose the fault is, and whether a retry helps: how an error is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request or the input is wrong (HTTP 400 / 404).
    User,
    /// A dependency is unavailable; a retry may help (HTTP 503).
    Unavailable,
    /// A bug or corrupt data (HTTP 500).
    Internal,
}

impl CoreError {
    /// Classifies the error by its variant and, for wrapped errors, by the cause underneath.
    pub fn class(&self) -> ErrorClass {
        match self {
            CoreError::BadQuery(_) | CoreError::UnknownView(_) => ErrorClass::User,
            CoreError::ObjectStore { .. } => ErrorClass::Unavailable,
            CoreError::Layer { retryable, .. } => {
                if *retryable {
                    ErrorClass::Unavailable
                } else {
                    ErrorClass::Internal
                }
            }
            CoreError::Delta(e) | CoreError::Table { source: e, .. } => delta_class(e),
            CoreError::DataFusion(e) => datafusion_class(e),
            _ => ErrorClass::Internal,
        }
    }

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

/// Storage that cannot be reached is `Unavailable`; anything else from Delta is `Internal`.
pub fn delta_class(e: &deltalake::DeltaTableError) -> ErrorClass {
    use deltalake::DeltaTableError as D;
    match e {
        D::ObjectStore { .. } | D::Io { .. } => ErrorClass::Unavailable,
        _ => ErrorClass::Internal,
    }
}

/// DataFusion errors that come from storage are `Unavailable`; the rest `Internal`.
pub fn datafusion_class(e: &datafusion::error::DataFusionError) -> ErrorClass {
    use datafusion::error::DataFusionError as D;
    match e.find_root() {
        D::ObjectStore(_) | D::IoError(_) => ErrorClass::Unavailable,
        D::External(inner) => match inner.downcast_ref::<deltalake::DeltaTableError>() {
            Some(d) => delta_class(d),
            None if inner.downcast_ref::<object_store::Error>().is_some() => {
                ErrorClass::Unavailable
            }
            None => ErrorClass::Internal,
        },
        _ => ErrorClass::Internal,
    }
}
