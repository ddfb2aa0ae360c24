//! Storage: the deployment's object store and its Delta tables, chosen by URL.
//!
//! `file://` tables are opened by deltalake from their URL. A `memory://` root gets one shared
//! in-memory store per process, so every table of the deployment (and DataFusion reading them)
//! sees the same bytes. An `s3://bucket/prefix` root gets one object_store S3 client for the
//! bucket, configured from the standard `AWS_*` environment (credentials, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` for S3-compatible stores, `AWS_ALLOW_HTTP`); Delta commits on it are
//! conditional puts (`If-None-Match: *`), which S3 and most S3-compatible stores support, so no
//! lock table is needed. Other schemes are refused at start with a clear error.

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema as ArrowSchema;
use deltalake::kernel::engine::arrow_conversion::TryFromArrow;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::kernel::StructType;
use deltalake::logstore::{
    default_logstore, LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig,
};
use deltalake::protocol::SaveMode;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, ObjectStoreExt};
use url::Url;

use crate::error::{CoreError, Result};
use crate::paths::Layout;

/// The layout plus the object store behind it.
#[derive(Debug, Clone)]
pub struct Storage {
    layout: Layout,
    shared: Option<Arc<dyn ObjectStore>>,
}

impl Storage {
    pub fn new(layout: Layout) -> Result<Self> {
        let root = layout.root();
        let refuse = |message: String| CoreError::Storage {
            url: root.to_string(),
            message,
        };
        let shared: Option<Arc<dyn ObjectStore>> = match root.scheme() {
            "memory" => Some(Arc::new(object_store::memory::InMemory::new())),
            "file" => None,
            "s3" | "s3a" => {
                register_conditional_put_logstore(root.scheme());
                let store = AmazonS3Builder::from_env()
                    .with_url(root.as_str())
                    .build()
                    .map_err(|e| refuse(e.to_string()))?;
                Some(Arc::new(store))
            }
            other => {
                return Err(refuse(format!(
                    "`{other}://` storage is not supported by this build (file://, memory:// and s3:// are)"
                )))
            }
        };
        Ok(Storage { layout, shared })
    }

    /// The layout over a store of the caller's (a wrapped store in tests, an embedder's own):
    /// every table and object under the layout's root is read and written through `store`.
    pub fn with_store(layout: Layout, store: Arc<dyn ObjectStore>) -> Self {
        Storage {
            layout,
            shared: Some(store),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The object store under the deployment's root, for objects that are not Delta tables
    /// (the speed layer's checkpoints): paths given to it are relative to the root.
    pub fn objects(&self) -> Result<Arc<dyn ObjectStore>> {
        let root = self.layout.root();
        let prefix = object_store::path::Path::from(root.path().trim_matches('/'));
        match &self.shared {
            Some(store) => Ok(Arc::new(object_store::prefix::PrefixStore::new(
                Arc::clone(store),
                prefix,
            ))),
            None => {
                let dir = self.layout.local_dir().ok_or_else(|| CoreError::Storage {
                    url: root.to_string(),
                    message: "not a local directory".into(),
                })?;
                std::fs::create_dir_all(&dir).map_err(|source| CoreError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let store =
                    object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(|e| {
                        CoreError::ObjectStore {
                            url: root.to_string(),
                            source: Box::new(e),
                        }
                    })?;
                Ok(Arc::new(store))
            }
        }
    }

    fn builder(&self, url: &Url) -> Result<DeltaTableBuilder> {
        let b = DeltaTableBuilder::from_url(url.clone()).map_err(delta)?;
        Ok(match &self.shared {
            Some(store) => b.with_storage_backend(Arc::clone(store), url.clone()),
            None => b,
        })
    }

    /// Whether the table at `url` has a commit of `version` (its log's `{version:020}.json`):
    /// one look at one object, far cheaper than loading the table to learn its newest version.
    pub async fn has_commit(&self, url: &Url, version: i64) -> Result<bool> {
        let name = format!("{version:020}.json");
        match &self.shared {
            None => {
                let dir = url.to_file_path().map_err(|()| CoreError::Storage {
                    url: url.to_string(),
                    message: "not a local path".into(),
                })?;
                let path = dir.join("_delta_log").join(name);
                match std::fs::metadata(&path) {
                    Ok(_) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                    Err(source) => Err(CoreError::Io { path, source }),
                }
            }
            Some(store) => {
                let path = log_dir(url).join(name.as_str());
                match store.head(&path).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(CoreError::ObjectStore {
                        url: url.to_string(),
                        source: Box::new(e),
                    }),
                }
            }
        }
    }

    /// The table at `url`, or `None` if there is none yet.
    pub async fn open(&self, url: &Url) -> Result<Option<DeltaTable>> {
        // A table exists when its log does; look before loading, since a missing location is
        // reported differently by each store.
        if url.scheme() == "file" {
            let log = url.to_file_path().map(|p| p.join("_delta_log"));
            if !log.is_ok_and(|l| l.is_dir()) {
                return Ok(None);
            }
        } else if let Some(store) = &self.shared {
            let listed = store
                .list_with_delimiter(Some(&log_dir(url)))
                .await
                .map_err(|e| CoreError::ObjectStore {
                    url: url.to_string(),
                    source: Box::new(e),
                })?;
            if listed.objects.is_empty() && listed.common_prefixes.is_empty() {
                return Ok(None);
            }
        }
        let mut table = self.builder(url)?.build().map_err(delta)?;
        match table.load().await {
            Ok(()) => Ok(Some(table)),
            Err(DeltaTableError::NotATable(_)) => Ok(None),
            Err(e) => Err(delta(e)),
        }
    }

    /// The table at `url`, created with `schema` and `partitions` if there is none.
    pub async fn open_or_create(
        &self,
        url: &Url,
        schema: &ArrowSchema,
        partitions: &[&str],
    ) -> Result<DeltaTable> {
        if let Some(t) = self.open(url).await? {
            return Ok(t);
        }
        if let Some(dir) = url.to_file_path().ok().filter(|_| url.scheme() == "file") {
            std::fs::create_dir_all(&dir).map_err(|source| CoreError::Io { path: dir, source })?;
        }
        let table = self.builder(url)?.build().map_err(delta)?;
        let columns = StructType::try_from_arrow(schema).map_err(|e| delta(e.into()))?;
        // Two writers may create the table at once. Without retries the loser's create fails
        // instead of landing as a second metadata commit, which would make every append that
        // started from version 0 fail its conflict check; the loser then opens the winner's.
        let created = table
            .create()
            .with_columns(columns.fields().cloned())
            .with_partition_columns(partitions.iter().map(|p| p.to_string()))
            .with_save_mode(SaveMode::Ignore)
            .with_commit_properties(CommitProperties::default().with_max_retries(0))
            .await;
        match created {
            Ok(t) => Ok(t),
            Err(e) => match self.open(url).await? {
                Some(t) => Ok(t),
                None => Err(delta(e)),
            },
        }
    }
}

/// Delta tables under `scheme://` commit through deltalake's default log store: each commit
/// is a put-if-absent of the next log entry, which the store itself keeps atomic.
fn register_conditional_put_logstore(scheme: &str) {
    let url = Url::parse(&format!("{scheme}://")).expect("a scheme makes a URL");
    deltalake::logstore::logstore_factories()
        .entry(url)
        .or_insert_with(|| Arc::new(ConditionalPutLogStores));
}

struct ConditionalPutLogStores;

impl LogStoreFactory for ConditionalPutLogStores {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> deltalake::DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// A Delta error as a core error.
/// The Delta log of the table at `url`, as a path in the shared store.
fn log_dir(url: &Url) -> object_store::path::Path {
    object_store::path::Path::from(format!("{}/_delta_log", url.path().trim_matches('/')))
}

pub fn delta(e: DeltaTableError) -> CoreError {
    CoreError::Delta(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field};

    #[tokio::test]
    async fn memory_tables_are_shared_within_a_process() {
        let storage = Storage::new(Layout::parse("memory:///").unwrap()).unwrap();
        let url = storage.layout().view("v");
        assert!(storage.open(&url).await.unwrap().is_none());
        let schema = ArrowSchema::new(vec![
            Field::new("a", DataType::Int64, true),
            Field::new("dt", DataType::Utf8, false),
        ]);
        let created = storage
            .open_or_create(&url, &schema, &["dt"])
            .await
            .unwrap();
        assert_eq!(created.version(), Some(0));
        let again = storage
            .clone()
            .open(&url)
            .await
            .unwrap()
            .expect("the same store sees the table");
        assert_eq!(again.version(), Some(0));
        assert!(Storage::new(Layout::parse("gs://bucket/x").unwrap())
            .unwrap_err()
            .to_string()
            .contains("gs://"));
    }

    #[tokio::test]
    async fn a_commit_is_found_by_its_version_on_every_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = Layout::parse(&format!("file://{}", dir.path().display())).unwrap();
        for storage in [
            Storage::new(Layout::parse("memory:///").unwrap()).unwrap(),
            Storage::new(file).unwrap(),
        ] {
            let url = storage.layout().view("v");
            let schema = ArrowSchema::new(vec![
                Field::new("a", DataType::Int64, true),
                Field::new("dt", DataType::Utf8, false),
            ]);
            storage
                .open_or_create(&url, &schema, &["dt"])
                .await
                .unwrap();
            assert!(storage.has_commit(&url, 0).await.unwrap());
            assert!(!storage.has_commit(&url, 1).await.unwrap());
            assert!(!storage
                .has_commit(&storage.layout().view("absent"), 0)
                .await
                .unwrap());
        }
    }
}
