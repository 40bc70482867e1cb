//! The records of the artifacts uploaded to `retrain-server` (table
//! `run_artifacts`, migrations sqlite `0011` / postgres `0010`): one row per
//! (run, name), replaced by a later upload of the same name. The bytes are
//! the server's business (`[server] artifacts_dir`); the row is what the
//! run's manifest shows and what a download answers as its ETag.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::RunId;
use retrain_core::ports::StoreError;

use super::backend::{Arg, Backend, Statements, StoreRow};
use super::SqlRunStore;

/// One uploaded artifact.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ArtifactRecord {
    #[serde(skip)]
    pub run_id: RunId,
    pub name: String,
    pub size_bytes: u64,
    /// Lowercase hex SHA-256 of the bytes.
    pub sha256: String,
    pub uploaded_at: DateTime<Utc>,
    /// The name of the token that uploaded it.
    pub uploaded_by: String,
}

/// Where the artifact records live.
#[async_trait]
pub trait ArtifactLog: Send + Sync + std::fmt::Debug {
    /// Record `artifact`, replacing the record of the same (run, name).
    async fn record_artifact(&self, artifact: &ArtifactRecord) -> Result<(), StoreError>;

    /// The run's artifacts, by name.
    async fn artifacts(&self, run_id: &RunId) -> Result<Vec<ArtifactRecord>, StoreError>;

    async fn artifact(
        &self,
        run_id: &RunId,
        name: &str,
    ) -> Result<Option<ArtifactRecord>, StoreError>;
}

const UPSERT: &str = "INSERT INTO run_artifacts
        (run_id, name, size_bytes, sha256, uploaded_at, uploaded_by)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (run_id, name) DO UPDATE SET
        size_bytes = excluded.size_bytes, sha256 = excluded.sha256,
        uploaded_at = excluded.uploaded_at, uploaded_by = excluded.uploaded_by";

const SELECT_OF_RUN: &str = "SELECT run_id, name, size_bytes, sha256, uploaded_at, uploaded_by
     FROM run_artifacts WHERE run_id = $1 ORDER BY name";

const SELECT_ONE: &str = "SELECT run_id, name, size_bytes, sha256, uploaded_at, uploaded_by
     FROM run_artifacts WHERE run_id = $1 AND name = $2";

fn artifact_of<R: StoreRow>(row: &R) -> Result<ArtifactRecord, StoreError> {
    let run_id = RunId(row.text("run_id")?);
    let name = row.text("name")?;
    let size = row.int("size_bytes")?;
    let what = format!("artifact {name} of run {run_id}");
    Ok(ArtifactRecord {
        size_bytes: u64::try_from(size)
            .map_err(|_| StoreError::Corrupt(format!("{what}: negative size {size}")))?,
        sha256: row.text("sha256")?,
        uploaded_at: row.time("uploaded_at", &what)?,
        uploaded_by: row.text("uploaded_by")?,
        run_id,
        name,
    })
}

#[async_trait]
impl<B: Backend> ArtifactLog for SqlRunStore<B> {
    async fn record_artifact(&self, artifact: &ArtifactRecord) -> Result<(), StoreError> {
        let b = &self.0;
        let what = format!(
            "recording artifact {} of run {}",
            artifact.name, artifact.run_id
        );
        let size = i64::try_from(artifact.size_bytes)
            .map_err(|_| StoreError::Conflict(format!("{what}: size out of range")))?;
        let args = vec![
            Arg::text(&artifact.run_id),
            Arg::text(&artifact.name),
            Arg::Int(size),
            Arg::text(&artifact.sha256),
            Arg::Time(artifact.uploaded_at),
            Arg::text(&artifact.uploaded_by),
        ];
        b.pool()
            .execute(UPSERT, args)
            .await
            .map_err(|e| b.error(&what, e))?;
        Ok(())
    }

    async fn artifacts(&self, run_id: &RunId) -> Result<Vec<ArtifactRecord>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_all(SELECT_OF_RUN, vec![Arg::text(run_id)])
            .await
            .map_err(|e| b.error(&format!("listing the artifacts of run {run_id}"), e))?
            .iter()
            .map(artifact_of)
            .collect()
    }

    async fn artifact(
        &self,
        run_id: &RunId,
        name: &str,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_optional(SELECT_ONE, vec![Arg::text(run_id), Arg::text(name)])
            .await
            .map_err(|e| b.error(&format!("reading artifact {name} of run {run_id}"), e))?
            .as_ref()
            .map(artifact_of)
            .transpose()
    }
}
