//! A day's Parquet files of a master dataset as a DataFusion table whose chosen text columns
//! are read as dictionaries.
//!
//! The master's low-cardinality columns (a view's dimensions) are stored dictionary-encoded.
//! DataFusion's Parquet reader reads a column in the type its file's Arrow schema gives it and
//! casts to the table's type after, so through the Delta table provider every row's text is
//! decoded and copied (0.4 s of CPU for a reference day's five dimensions), and the cube pass
//! then interns every value again. Here each file is read with its own schema, the chosen
//! columns turned into `Dictionary(Int32, Utf8)`: the reader keeps the pages' dictionaries and
//! their keys, and the cube pass interns each dictionary's values once.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use datafusion::parquet::arrow::parquet_to_arrow_schema;
use datafusion::parquet::file::metadata::ParquetMetaDataReader;
use datafusion::physical_plan::ExecutionPlan;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::{BatchError, Result};

/// The type the chosen text columns are read as.
fn dictionary_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// `field` read as a dictionary if it is one of `names` and holds text.
fn as_dictionary(field: &Field, names: &[&str]) -> Field {
    match field.data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            if names.contains(&field.name().as_str()) =>
        {
            field.clone().with_data_type(dictionary_type())
        }
        _ => field.clone(),
    }
}

/// The files of one day, read through `store` (registered in the session under `url`).
#[derive(Debug)]
pub(crate) struct DayFiles {
    schema: SchemaRef,
    url: ObjectStoreUrl,
    files: Vec<PartitionedFile>,
}

impl DayFiles {
    /// The files at `paths` of `store` as a table of `table` (the master's columns, without
    /// its partition column), the text columns `dictionary` read as dictionaries. Each file's
    /// own schema (an older file may lack a newer column) is read from its footer.
    pub(crate) async fn open(
        store: &Arc<dyn ObjectStore>,
        url: ObjectStoreUrl,
        paths: &[String],
        table: &Schema,
        dictionary: &[&str],
    ) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            let location = Path::parse(p)
                .map_err(|e| BatchError::BadRequest(format!("file {p} of the master: {e}")))?;
            let mut meta = store.head(&location).await.map_err(DataFusionError::from)?;
            // (A store rooted at the table may answer with the path from its own root.)
            meta.location = location.clone();
            let own = file_schema(store, &location, meta.size).await?;
            let hint: Vec<Field> = own
                .fields()
                .iter()
                .map(|f| as_dictionary(f, dictionary))
                .collect();
            files.push(
                PartitionedFile::new_from_meta(meta).with_arrow_schema(Arc::new(Schema::new(hint))),
            );
        }
        let fields: Vec<Field> = table
            .fields()
            .iter()
            .map(|f| as_dictionary(f, dictionary))
            .collect();
        Ok(DayFiles {
            schema: Arc::new(Schema::new(fields)),
            url,
            files,
        })
    }
}

/// The Arrow schema of the Parquet file at `location` (`size` bytes), from its footer.
async fn file_schema(store: &Arc<dyn ObjectStore>, location: &Path, size: u64) -> Result<Schema> {
    let bad = |what: &str| BatchError::BadRequest(format!("{location}: {what}"));
    if size < 12 {
        return Err(bad("too short for a Parquet file"));
    }
    let tail = store
        .get_range(location, size - 8..size)
        .await
        .map_err(DataFusionError::from)?;
    if &tail[4..] != b"PAR1" {
        return Err(bad("not a Parquet file"));
    }
    let length = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if length + 8 > size {
        return Err(bad("a footer longer than the file"));
    }
    let footer = store
        .get_range(location, size - 8 - length..size - 8)
        .await
        .map_err(DataFusionError::from)?;
    let metadata =
        ParquetMetaDataReader::decode_metadata(&footer).map_err(DataFusionError::from)?;
    let file = metadata.file_metadata();
    Ok(
        parquet_to_arrow_schema(file.schema_descr(), file.key_value_metadata())
            .map_err(DataFusionError::from)?,
    )
}

#[async_trait]
impl TableProvider for DayFiles {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let threads = state.config().target_partitions().max(1);
        let mut groups: Vec<Vec<PartitionedFile>> =
            vec![Vec::new(); threads.min(self.files.len()).max(1)];
        let n = groups.len();
        for (i, f) in self.files.iter().enumerate() {
            groups[i % n].push(f.clone());
        }
        let source = Arc::new(ParquetSource::new(Arc::clone(&self.schema)));
        let config = FileScanConfigBuilder::new(self.url.clone(), source)
            .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}
