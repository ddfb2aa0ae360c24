//! Storage layout: where each table lives under the deployment's storage URL.
//!
//! ```text
//! <root>/master/<schema>/         Delta table: every valid event, partitioned by dt=YYYY-MM-DD
//! <root>/dead_letter/<schema>/    Delta table: rejected messages with raw bytes and reason
//! <root>/views/<view>/            Delta table: a view's exact batch rows + sketches and its
//!                                 rollups, by rollup=base|<rollup name> and dt
//! ```

use url::Url;

use crate::error::{CoreError, Result};

/// The day partition column of the master dataset and of every view table (`YYYY-MM-DD`).
pub const DAY_COLUMN: &str = "dt";
/// A view table's bucket start column.
pub const BUCKET_COLUMN: &str = "bucket";
/// A view table's partition column naming which rollup a row belongs to ([`BASE_ROLLUP`] for
/// the view's own rows).
pub const ROLLUP_COLUMN: &str = "rollup";
/// The [`ROLLUP_COLUMN`] value of a view's own rows.
pub const BASE_ROLLUP: &str = "base";

/// The root of a deployment's storage, parsed once from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: Url,
}

/// The URL schemes storage may use.
pub const SCHEMES: [&str; 5] = ["file", "memory", "s3", "gs", "az"];

impl Layout {
    /// Parses a storage URL (`file:///abs/dir`, `memory:///`, `s3://bucket/prefix`, ...).
    pub fn parse(url: &str) -> Result<Self> {
        let err = |message: String| CoreError::Storage {
            url: url.to_string(),
            message,
        };
        let mut root = Url::parse(url).map_err(|e| err(e.to_string()))?;
        if !SCHEMES.contains(&root.scheme()) {
            return Err(err(format!(
                "scheme `{}` is not one of {}",
                root.scheme(),
                SCHEMES.join(", ")
            )));
        }
        if !root.path().ends_with('/') {
            let p = format!("{}/", root.path());
            root.set_path(&p);
        }
        Ok(Layout { root })
    }

    /// A local directory as a `file://` layout.
    pub fn local(dir: &std::path::Path) -> Result<Self> {
        let abs = std::path::absolute(dir).map_err(|e| CoreError::Storage {
            url: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let url = Url::from_directory_path(&abs).map_err(|_| CoreError::Storage {
            url: abs.display().to_string(),
            message: "not an absolute path".into(),
        })?;
        Self::parse(url.as_str())
    }

    pub fn root(&self) -> &Url {
        &self.root
    }

    fn join(&self, parts: &[&str]) -> Url {
        let mut u = self.root.clone();
        let path = format!("{}{}/", u.path(), parts.join("/"));
        u.set_path(&path);
        u
    }

    /// The master dataset of one event schema.
    pub fn master(&self, schema: &str) -> Url {
        self.join(&["master", schema])
    }

    /// The dead-letter table of one event schema.
    pub fn dead_letter(&self, schema: &str) -> Url {
        self.join(&["dead_letter", schema])
    }

    /// A view's batch table.
    pub fn view(&self, view: &str) -> Url {
        self.join(&["views", view])
    }

    /// The output table of an SQL job.
    pub fn job(&self, job: &str) -> Url {
        self.join(&["jobs", job])
    }

    /// The table of batch runs (views' and jobs', scheduled and by hand).
    pub fn runs(&self) -> Url {
        self.join(&["batch", "runs"])
    }

    /// The scheduler's leases: one object per job and term.
    pub fn leases(&self) -> Url {
        self.join(&["batch", "leases"])
    }

    /// The audit table of erasures.
    pub fn erasures(&self) -> Url {
        self.join(&["audit", "erasures"])
    }

    /// Whether the root is a local directory (and which).
    pub fn local_dir(&self) -> Option<std::path::PathBuf> {
        (self.root.scheme() == "file")
            .then(|| self.root.to_file_path().ok())
            .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_sit_under_the_root() {
        let l = Layout::parse("s3://bucket/prefix").unwrap();
        assert_eq!(
            l.master("app_events").as_str(),
            "s3://bucket/prefix/master/app_events/"
        );
        assert_eq!(l.view("v").as_str(), "s3://bucket/prefix/views/v/");
        assert!(Layout::parse("ftp://x")
            .unwrap_err()
            .to_string()
            .contains("scheme"));
        let m = Layout::parse("memory:///").unwrap();
        assert_eq!(m.dead_letter("e").as_str(), "memory:///dead_letter/e/");
    }
}
