//! `dataset_metadata.json` read from the local file system (`file://`).
//!
//! Accepted locations: `file:///abs/path`, `file://relative/path` (relative to
//! the current directory, as the quickstart writes it) and plain paths. The
//! change marker (`DatasetVersion::revision`) is the SHA-256 of the file's
//! bytes, so an unchanged file answers `Unchanged` without being parsed.

use std::path::PathBuf;

use async_trait::async_trait;
use retrain_core::domain::{DatasetMetadata, DatasetVersion};
use retrain_core::ports::{MetadataRead, MetadataStore, PortError};
use sha2::Digest;

use crate::error::AdapterError;

/// Reads one metadata file.
#[derive(Debug, Clone)]
pub struct FileMetadataStore {
    path: PathBuf,
}

impl FileMetadataStore {
    /// Bind to `location`; a relative path is resolved against the current
    /// directory now, so a later `chdir` cannot redirect the reads.
    pub fn new(location: &str) -> Result<Self, AdapterError> {
        let raw = location.trim();
        let raw = raw
            .strip_prefix("file://")
            .or_else(|| raw.strip_prefix("file:"))
            .unwrap_or(raw);
        // `file://localhost/abs/path` is the RFC 8089 spelling of `file:///abs/path`.
        let raw = if raw.starts_with("localhost/") {
            &raw["localhost".len()..]
        } else {
            raw
        };
        if raw.is_empty() {
            return Err(AdapterError::config(
                "metadata",
                format!("{location:?} names no file"),
            ));
        }
        let path = PathBuf::from(raw);
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .map(|cwd| cwd.join(&path))
                .unwrap_or(path)
        };
        Ok(Self { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

#[async_trait]
impl MetadataStore for FileMetadataStore {
    async fn read(&self, known_revision: Option<String>) -> Result<MetadataRead, PortError> {
        let bytes = match tokio::fs::read(&self.path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(MetadataRead::Absent),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(PortError::Denied(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )))
            }
            Err(e) => {
                return Err(PortError::Failed(format!(
                    "cannot read {}: {e}",
                    self.path.display()
                )))
            }
        };
        let revision = hex::encode(sha2::Sha256::digest(&bytes));
        if known_revision.as_deref() == Some(revision.as_str()) {
            return Ok(MetadataRead::Unchanged);
        }
        let metadata = DatasetMetadata::parse(&bytes)
            .map_err(|e| PortError::InvalidResponse(format!("{}: {e}", self.path.display())))?;
        Ok(MetadataRead::Published(DatasetVersion {
            metadata,
            revision: Some(revision),
        }))
    }

    fn describe(&self) -> String {
        format!("file://{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_resolve() {
        let abs = FileMetadataStore::new("file:///data/m.json").unwrap();
        assert_eq!(abs.path(), std::path::Path::new("/data/m.json"));
        let host = FileMetadataStore::new("file://localhost/data/m.json").unwrap();
        assert_eq!(host.path(), std::path::Path::new("/data/m.json"));
        let rel = FileMetadataStore::new("file://datasets/m.json").unwrap();
        assert!(rel.path().is_absolute() && rel.path().ends_with("datasets/m.json"));
        let plain = FileMetadataStore::new("m.json").unwrap();
        assert!(plain.path().ends_with("m.json"));
        assert!(FileMetadataStore::new("file://").is_err());
    }
}
