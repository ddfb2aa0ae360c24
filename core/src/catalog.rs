//! The catalog: every schema, view and SQL job definition of a deployment, loaded and checked at start.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::error::{CoreError, Result};
use crate::filter::CompiledFilter;
use crate::job::{load_jobs, JobDef};
use crate::schema::{load_schemas, EventSchema};
use crate::view::{load_views, ViewDef};

/// Schemas and views, checked against each other (filters compiled, fields resolved).
#[derive(Debug, Clone)]
pub struct Catalog {
    pub schemas: BTreeMap<String, Arc<EventSchema>>,
    pub views: BTreeMap<String, Arc<ViewDef>>,
    /// The SQL jobs (their SQL is planned against the tables by the batch layer).
    pub jobs: BTreeMap<String, Arc<JobDef>>,
}

impl Catalog {
    /// Loads `schemas_dir/*.toml` and the views of `jobs_dir/*.toml`. Any invalid definition
    /// fails the whole load, naming its file and key.
    pub fn load(schemas_dir: &Path, jobs_dir: &Path) -> Result<Self> {
        let schemas = load_schemas(schemas_dir)?;
        if schemas.is_empty() {
            return Err(CoreError::Definition {
                path: schemas_dir.to_path_buf(),
                message: "no schema definitions (*.toml) found".into(),
            });
        }
        let views = load_views(jobs_dir, &schemas)?;
        let jobs = load_jobs(jobs_dir)?;
        for job in jobs.values() {
            let taken = if schemas.contains_key(&job.name) {
                Some("an event schema")
            } else if views.contains_key(&job.name) {
                Some("a view")
            } else {
                None
            };
            if let Some(what) = taken {
                return Err(CoreError::Definition {
                    path: job.path.clone(),
                    message: format!(
                        "the job's output table `{}` would shadow {what} of that name",
                        job.name
                    ),
                });
            }
        }
        let catalog = Catalog {
            schemas,
            views,
            jobs,
        };
        for view in catalog.views.values() {
            CompiledFilter::for_view(view, catalog.schema_of(view))?;
        }
        Ok(catalog)
    }

    /// The schema a view reads (checked at load).
    pub fn schema_of(&self, view: &ViewDef) -> &Arc<EventSchema> {
        &self.schemas[&view.source]
    }

    /// The views over one schema.
    pub fn views_of<'a>(&'a self, schema: &'a str) -> impl Iterator<Item = &'a Arc<ViewDef>> + 'a {
        self.views.values().filter(move |v| v.source == schema)
    }

    pub fn job(&self, name: &str) -> Result<&Arc<JobDef>> {
        self.jobs.get(name).ok_or_else(|| CoreError::Definition {
            path: name.into(),
            message: format!(
                "no SQL job `{name}` (known: {})",
                self.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        })
    }

    pub fn view(&self, name: &str) -> Result<&Arc<ViewDef>> {
        self.views
            .get(name)
            .ok_or_else(|| CoreError::UnknownView(name.to_string()))
    }
}
