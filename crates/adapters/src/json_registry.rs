//! A model registry in one JSON file: the embedded default (`registry = {
//! json = "registry.json", model = "..." }`), good for a laptop, a CI cache or
//! a shared volume.
//!
//! # File format
//!
//! ```json
//! {
//!   "models": {
//!     "<model>": {
//!       "production": "2",
//!       "versions": [
//!         {"version": "1", "candidate": "<candidate id>", "run_id": "<retrain run id>",
//!          "metrics": {"dice": 0.80}, "status": "archived",
//!          "created_at": "2025-10-30T11:53:01Z"},
//!         {"version": "2", "candidate": "<candidate id>", "run_id": "<retrain run id>",
//!          "metrics": {"dice": 0.81}, "status": "production", "previous": "1",
//!          "created_at": "2025-10-31T09:00:00Z"}
//!       ]
//!     }
//!   },
//!   "runs": {"<candidate id>": {"metrics": {"dice": 0.81}}}
//! }
//! ```
//!
//! - `production` names the production version (`null` or absent: none yet);
//!   versions are decimal strings numbered from 1; `status` is `production`
//!   or `archived`; `previous` is the version this one replaced.
//! - `rollbacks` (written by `retrain rollback`) lists every rollback of the
//!   model: `{"run_id", "version", "previous", "by", "reason", "at"}`; it
//!   makes a rollback idempotent per run. The version rolled back from also
//!   gets `rolled_back_by`, `rolled_back_reason` and `rolled_back_run_id`.
//! - `runs` is where a training program may log a candidate's metrics (like an
//!   MLflow run); [`ModelRegistry::candidate_metrics`] reads it first and
//!   falls back to a registered version of that candidate.
//! - Metric values must be JSON numbers. Unknown keys anywhere are kept when
//!   the file is rewritten.
//!
//! # Concurrency and durability
//!
//! Every read-modify-write happens under an exclusive lock on the sidecar file
//! `<file>.lock` (std `File::lock`, i.e. `flock`), so concurrent orchestrators
//! and tasks never lose an update. The new content is written to a temporary
//! file in the same directory, fsynced and renamed over the old one, so
//! readers (which take no lock) see either the old or the new file. A file
//! that cannot be parsed is reported and never overwritten.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use chrono::Utc;
use retrain_core::domain::{Candidate, Lease, Metrics, ProductionModel, PromotedVersion, RunId};
use retrain_core::ports::{ModelRegistry, PortError, RegistryRollback};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

const PRODUCTION: &str = "production";
const ARCHIVED: &str = "archived";

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    #[serde(default)]
    models: BTreeMap<String, ModelEntry>,
    #[serde(default)]
    runs: BTreeMap<String, RunEntry>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ModelEntry {
    #[serde(default)]
    production: Option<String>,
    #[serde(default)]
    versions: Vec<VersionEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    rollbacks: Vec<RollbackEntry>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Debug, Serialize, Deserialize)]
struct VersionEntry {
    version: String,
    candidate: String,
    #[serde(default)]
    run_id: Option<String>,
    /// Kept as JSON so a bad value is reported by name, not as a parse error
    /// of the whole file.
    #[serde(default)]
    metrics: Map<String, Value>,
    status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_at: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// One `retrain rollback` of a model (its run id is the idempotency key).
#[derive(Debug, Serialize, Deserialize)]
struct RollbackEntry {
    run_id: String,
    version: String,
    #[serde(default)]
    previous: Option<String>,
    by: String,
    reason: String,
    at: String,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RunEntry {
    #[serde(default)]
    metrics: Map<String, Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// A registry of one model in one JSON file.
#[derive(Debug, Clone)]
pub struct JsonRegistry {
    path: PathBuf,
    model: String,
}

impl JsonRegistry {
    /// Bind to `model` in the file at `path` (created on the first promotion,
    /// with its parent directories). Nothing is read here.
    /// A relative `path` is resolved against the current directory now.
    pub fn open(path: PathBuf, model: String) -> Self {
        let path = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .map(|cwd| cwd.join(&path))
                .unwrap_or(path)
        };
        Self { path, model }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock_path(&self) -> PathBuf {
        let mut name = self
            .path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(".lock");
        self.path.with_file_name(name)
    }

    /// Read the file; `Ok(None)` when it does not exist yet.
    fn load(path: &Path) -> Result<Option<RegistryFile>, PortError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(PortError::Failed(format!(
                    "cannot read model registry {}: {e}",
                    path.display()
                )))
            }
        };
        // An empty file holds nothing to lose (e.g. created with `touch`).
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Some(RegistryFile::default()));
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            PortError::InvalidResponse(format!(
                "model registry {} is not a valid registry file (left untouched): {e}",
                path.display()
            ))
        })
    }

    /// Write `content` atomically: temp file in the same directory, fsync,
    /// rename, fsync the directory (so the rename itself survives a crash).
    fn store(path: &Path, content: &RegistryFile) -> Result<(), PortError> {
        let failed = |what: &str, e: std::io::Error| {
            PortError::Failed(format!(
                "cannot {what} model registry {}: {e}",
                path.display()
            ))
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut bytes = serde_json::to_vec_pretty(content).map_err(|e| {
            PortError::Failed(format!(
                "cannot encode model registry {}: {e}",
                path.display()
            ))
        })?;
        bytes.push(b'\n');
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "registry.json".into());
        let tmp = dir.join(format!(
            ".{file_name}.tmp-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        let result = (|| {
            let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
            // Directory fsync is best effort: not every file system supports it.
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(|e| failed("write", e))
    }

    fn metrics(&self, raw: &Map<String, Value>, whose: &str) -> Result<Metrics, PortError> {
        raw.iter()
            .map(|(name, value)| match value.as_f64() {
                Some(v) => Ok((name.clone(), v)),
                None => Err(PortError::InvalidResponse(format!(
                    "model registry {}: metric `{name}` of {whose} must be a number, got {value}",
                    self.path.display()
                ))),
            })
            .collect()
    }

    fn production_sync(&self) -> Result<Option<ProductionModel>, PortError> {
        let Some(file) = Self::load(&self.path)? else {
            return Ok(None);
        };
        let Some(model) = file.models.get(&self.model) else {
            return Ok(None);
        };
        let Some(version) = &model.production else {
            return Ok(None);
        };
        let entry = model
            .versions
            .iter()
            .find(|v| &v.version == version)
            .ok_or_else(|| {
                PortError::InvalidResponse(format!(
                    "model registry {}: model `{}` names production version {version}, which is not in its `versions`",
                    self.path.display(),
                    self.model
                ))
            })?;
        Ok(Some(ProductionModel {
            version: entry.version.clone(),
            candidate_id: Some(entry.candidate.clone()),
            metrics: self.metrics(
                &entry.metrics,
                &format!("version {} of `{}`", entry.version, self.model),
            )?,
        }))
    }

    fn candidate_metrics_sync(&self, id: &str) -> Result<Metrics, PortError> {
        let not_found = || {
            PortError::NotFound(format!(
                "candidate `{id}` is neither in `runs` nor a version of `{}` in model registry {}",
                self.model,
                self.path.display()
            ))
        };
        let file = Self::load(&self.path)?.ok_or_else(not_found)?;
        if let Some(run) = file.runs.get(id) {
            return self.metrics(&run.metrics, &format!("run `{id}`"));
        }
        let entry = file
            .models
            .get(&self.model)
            .and_then(|m| m.versions.iter().rev().find(|v| v.candidate == id))
            .ok_or_else(not_found)?;
        self.metrics(&entry.metrics, &format!("candidate `{id}`"))
    }

    /// Take the exclusive lock on `<file>.lock` (creating the directory
    /// and the lock file); held until the returned file is dropped (flock
    /// locks are released when the file is closed, even on a crash).
    fn lock_for_update(&self) -> Result<File, PortError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                PortError::Failed(format!(
                    "cannot create the directory of model registry {}: {e}",
                    self.path.display()
                ))
            })?;
        }
        let lock_path = self.lock_path();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| {
                PortError::Failed(format!(
                    "cannot open registry lock file {}: {e}",
                    lock_path.display()
                ))
            })?;
        lock.lock().map_err(|e| {
            PortError::Failed(format!(
                "cannot lock registry lock file {}: {e}",
                lock_path.display()
            ))
        })?;
        Ok(lock)
    }

    fn promote_sync(
        &self,
        candidate: &Candidate,
        run_id: &RunId,
    ) -> Result<PromotedVersion, PortError> {
        let lock = self.lock_for_update()?;
        let mut file = Self::load(&self.path)?.unwrap_or_default();
        let model = file.models.entry(self.model.clone()).or_default();
        if let Some(done) = model
            .versions
            .iter()
            .find(|v| v.run_id.as_deref() == Some(run_id.as_str()))
        {
            // Idempotent per run: the promotion already happened.
            return Ok(PromotedVersion {
                version: done.version.clone(),
                previous: done.previous.clone(),
            });
        }
        let next = model
            .versions
            .iter()
            .filter_map(|v| v.version.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        let version = next.to_string();
        let previous = model.production.clone();
        for entry in &mut model.versions {
            if entry.status == PRODUCTION {
                entry.status = ARCHIVED.into();
            }
        }
        // Metrics the trainer reported, else what the training program
        // logged under `runs`.
        let metrics: Map<String, Value> = if candidate.metrics.is_empty() {
            file.runs
                .get(&candidate.id)
                .map(|r| r.metrics.clone())
                .unwrap_or_default()
        } else {
            candidate
                .metrics
                .iter()
                .filter_map(|(k, v)| {
                    serde_json::Number::from_f64(*v).map(|n| (k.clone(), Value::Number(n)))
                })
                .collect()
        };
        let model = file.models.entry(self.model.clone()).or_default();
        model.versions.push(VersionEntry {
            version: version.clone(),
            candidate: candidate.id.clone(),
            run_id: Some(run_id.to_string()),
            metrics,
            status: PRODUCTION.into(),
            previous: previous.clone(),
            created_at: Some(Utc::now().to_rfc3339()),
            extra: Map::new(),
        });
        model.production = Some(version.clone());
        Self::store(&self.path, &file)?;
        drop(lock);
        Ok(PromotedVersion { version, previous })
    }

    fn version_exists_sync(&self, version: &str) -> Result<bool, PortError> {
        let Some(file) = Self::load(&self.path)? else {
            return Ok(false);
        };
        Ok(file
            .models
            .get(&self.model)
            .is_some_and(|m| m.versions.iter().any(|v| v.version == version)))
    }

    fn roll_back_sync(&self, rollback: &RegistryRollback) -> Result<PromotedVersion, PortError> {
        let lock = self.lock_for_update()?;
        let mut file = Self::load(&self.path)?.unwrap_or_default();
        let model = file.models.entry(self.model.clone()).or_default();
        if let Some(done) = model
            .rollbacks
            .iter()
            .find(|r| r.run_id == rollback.run_id.as_str())
        {
            // Idempotent per run: this rollback already happened.
            return Ok(PromotedVersion {
                version: done.version.clone(),
                previous: done.previous.clone(),
            });
        }
        if !model.versions.iter().any(|v| v.version == rollback.version) {
            return Err(PortError::NotFound(format!(
                "model registry {}: model `{}` has no version {} to roll back to",
                self.path.display(),
                self.model,
                rollback.version
            )));
        }
        let previous = model
            .production
            .clone()
            .filter(|current| current != &rollback.version);
        for entry in &mut model.versions {
            if entry.version == rollback.version {
                entry.status = PRODUCTION.into();
            } else if entry.status == PRODUCTION {
                entry.status = ARCHIVED.into();
            }
            if Some(&entry.version) == previous.as_ref() {
                for (key, value) in [
                    ("rolled_back_by", &rollback.by),
                    ("rolled_back_reason", &rollback.reason),
                    ("rolled_back_run_id", &rollback.run_id.0),
                ] {
                    entry.extra.insert(key.into(), Value::String(value.clone()));
                }
            }
        }
        model.production = Some(rollback.version.clone());
        model.rollbacks.push(RollbackEntry {
            run_id: rollback.run_id.to_string(),
            version: rollback.version.clone(),
            previous: previous.clone(),
            by: rollback.by.clone(),
            reason: rollback.reason.clone(),
            at: Utc::now().to_rfc3339(),
            extra: Map::new(),
        });
        Self::store(&self.path, &file)?;
        drop(lock);
        Ok(PromotedVersion {
            version: rollback.version.clone(),
            previous,
        })
    }

    /// Run blocking file work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(Self) -> Result<T, PortError> + Send + 'static,
    ) -> Result<T, PortError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || work(this))
            .await
            .map_err(|e| {
                PortError::Failed(format!(
                    "model registry {} task failed: {e}",
                    self.path.display()
                ))
            })?
    }
}

#[async_trait]
impl ModelRegistry for JsonRegistry {
    async fn production(
        &self,
        _lease: Option<Lease>,
    ) -> Result<Option<ProductionModel>, PortError> {
        self.blocking(|this| this.production_sync()).await
    }

    async fn candidate_metrics(
        &self,
        candidate_id: String,
        _lease: Option<Lease>,
    ) -> Result<Metrics, PortError> {
        self.blocking(move |this| this.candidate_metrics_sync(&candidate_id))
            .await
    }

    async fn promote(
        &self,
        candidate: Candidate,
        run_id: RunId,
        _lease: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        self.blocking(move |this| this.promote_sync(&candidate, &run_id))
            .await
    }

    async fn version_exists(
        &self,
        version: String,
        _lease: Option<Lease>,
    ) -> Result<bool, PortError> {
        self.blocking(move |this| this.version_exists_sync(&version))
            .await
    }

    async fn roll_back(
        &self,
        rollback: RegistryRollback,
        _lease: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        self.blocking(move |this| this.roll_back_sync(&rollback))
            .await
    }

    fn describe(&self) -> String {
        format!("json:{}#{}", self.path.display(), self.model)
    }
}
