//! Artifacts uploaded by remote trainers: the bytes in
//! `[server] artifacts_dir/<run>/<name>`, the record (size, SHA-256, who,
//! when) in the store's `run_artifacts` (shown in the run's manifest).
//!
//! **Invariants.**
//! - A name is one path segment of `[A-Za-z0-9._-]`, not `.` or `..` (so
//!   nothing decoded from the URL, `%2e%2e`, `%2f`, `%00`, a backslash or an
//!   absolute path, can leave `artifacts_dir/<run>/`). Run ids pass the same
//!   check before they become a directory.
//! - An upload streams into a temporary file of the same directory, whose
//!   name holds a `~` (never a valid artifact name, so never served), and is
//!   renamed over `<name>` only once complete, within `artifact_max_bytes`
//!   and hashed: a reader sees the old bytes or the new ones, never a part.
//!   Whatever ends the upload early (too large, the client gone, a disk
//!   error) removes the temporary file.
//! - Rename and record happen under one lock, so with concurrent uploads of
//!   one name the record always describes the bytes on disk.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures::StreamExt;
use retrain_adapters::store::{ArtifactLog, ArtifactRecord};
use retrain_core::domain::RunId;
use retrain_core::ports::StoreError;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// Longest accepted artifact name (a file name on every common filesystem).
pub const MAX_NAME_LEN: usize = 200;

/// Why a name (or a run id) cannot be a path segment here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("`.` and `..` are not names")]
    DotSegment,
    #[error("contains {0:?}: only A-Z, a-z, 0-9, `.`, `_` and `-` are allowed (one path segment)")]
    Character(char),
}

/// `name` as one safe path segment, or why not.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong);
    }
    if name == "." || name == ".." {
        return Err(NameError::DotSegment);
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(NameError::Character(c)),
        None => Ok(()),
    }
}

/// Why an upload failed (nothing was kept).
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the artifact is larger than [server] artifact_max_bytes ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("no data received for {0:?} ([server] request_timeout): upload abandoned")]
    Stalled(Duration),
    #[error("reading the request body: {0}")]
    Body(String),
    #[error("writing the artifact: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The artifacts directory and the records.
#[derive(Debug)]
pub struct Artifacts {
    dir: PathBuf,
    max_bytes: u64,
    /// Longest wait for the next chunk of an upload (a stalled client must
    /// not hold a connection and a temporary file forever).
    idle_timeout: Duration,
    log: Arc<dyn ArtifactLog>,
    commit: Mutex<()>,
}

/// A temporary file removed on drop unless it was renamed into place.
struct TempFile {
    path: PathBuf,
    kept: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.kept {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %self.path.display(), error = %e, "could not remove a partial artifact upload");
                }
            }
        }
    }
}

static UPLOADS: AtomicU64 = AtomicU64::new(0);

impl Artifacts {
    pub fn new(
        dir: PathBuf,
        max_bytes: u64,
        idle_timeout: Duration,
        log: Arc<dyn ArtifactLog>,
    ) -> Self {
        Self {
            dir,
            max_bytes,
            idle_timeout,
            log,
            commit: Mutex::new(()),
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn log(&self) -> &dyn ArtifactLog {
        self.log.as_ref()
    }

    /// `artifacts_dir/<run>/<name>`; both already checked by [`check_name`].
    pub fn path(&self, run_id: &RunId, name: &str) -> PathBuf {
        self.dir.join(run_id.as_str()).join(name)
    }

    /// Stream `body` to `<run>/<name>` (replacing it), hashing as it goes,
    /// and record it. `run_id` and `name` must have passed [`check_name`].
    pub async fn upload(
        &self,
        run_id: &RunId,
        name: &str,
        uploaded_by: &str,
        body: Body,
    ) -> Result<ArtifactRecord, UploadError> {
        let run_dir = self.dir.join(run_id.as_str());
        tokio::fs::create_dir_all(&run_dir).await?;
        let temp = TempFile {
            path: run_dir.join(format!(
                "{name}~upload-{}-{}",
                std::process::id(),
                UPLOADS.fetch_add(1, Ordering::Relaxed)
            )),
            kept: false,
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp.path)
            .await?;
        let mut hasher = Sha256::new();
        let mut size: u64 = 0;
        let mut chunks = body.into_data_stream();
        loop {
            let next = tokio::time::timeout(self.idle_timeout, chunks.next())
                .await
                .map_err(|_| UploadError::Stalled(self.idle_timeout))?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
            size += chunk.len() as u64;
            if size > self.max_bytes {
                return Err(UploadError::TooLarge {
                    limit: self.max_bytes,
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.sync_all().await?;
        drop(file);
        let record = ArtifactRecord {
            run_id: run_id.clone(),
            name: name.to_owned(),
            size_bytes: size,
            sha256: hex::encode(hasher.finalize()),
            uploaded_at: chrono::Utc::now(),
            uploaded_by: uploaded_by.to_owned(),
        };
        self.commit(temp, &run_dir.join(name), &record).await?;
        Ok(record)
    }

    async fn commit(
        &self,
        mut temp: TempFile,
        target: &Path,
        record: &ArtifactRecord,
    ) -> Result<(), UploadError> {
        let _one_at_a_time = self.commit.lock().await;
        tokio::fs::rename(&temp.path, target).await?;
        temp.kept = true;
        self.log.record_artifact(record).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_safe_segment() {
        for ok in ["model.bin", "eval-1_final.json", ".hidden", "a..b", "A9"] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(check_name("."), Err(NameError::DotSegment));
        assert_eq!(check_name(".."), Err(NameError::DotSegment));
        assert_eq!(check_name(&"a".repeat(201)), Err(NameError::TooLong));
        for (bad, c) in [
            ("../etc", '/'),
            ("/etc/passwd", '/'),
            ("a\\b", '\\'),
            ("a\0b", '\0'),
            ("a b", ' '),
            ("%2e%2e", '%'),
            ("é", 'é'),
            ("x~upload-1-2", '~'),
        ] {
            assert_eq!(check_name(bad), Err(NameError::Character(c)), "{bad:?}");
        }
    }
}
