//! Registered versions accepted for gating and not gated yet (table
//! `pending_gates`, migrations sqlite `0012` / postgres `0011`).
//!
//! **Invariant (an accepted delivery is never lost):** `retrain-server`
//! adds the row *before* it answers an MLflow `model_version.created`
//! delivery with 202, and removes it only once the version was gated (or
//! gating failed for a reason a retry would not fix). A server that stops
//! while the gate waits for the label's lock resumes every row at start-up;
//! a replica that finds the row gone stops waiting (another one gated it).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::ports::StoreError;

use super::backend::{Arg, Backend, Columns, Statements, StoreRow};
use super::SqlRunStore;

/// One registered version to gate against production for `label`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingGate {
    pub label: String,
    /// The registered model and version the registry announced.
    pub model: String,
    pub version: String,
    /// The registry run the version came from, when the sender said.
    pub candidate_run_id: Option<String>,
    pub received_at: DateTime<Utc>,
}

/// The durable list of gates to do (see the module docs).
#[async_trait]
pub trait PendingGates: Send + Sync + std::fmt::Debug {
    /// Add `gate` (a no-op when that label/model/version is pending already).
    async fn add(&self, gate: &PendingGate) -> Result<(), StoreError>;
    /// Whether `label`'s `model`/`version` is still pending.
    async fn is_pending(&self, label: &str, model: &str, version: &str)
        -> Result<bool, StoreError>;
    /// Done with it (gated, or failed for good).
    async fn remove(&self, label: &str, model: &str, version: &str) -> Result<(), StoreError>;
    /// Every pending gate, oldest first.
    async fn list(&self) -> Result<Vec<PendingGate>, StoreError>;
}

const INSERT: &str =
    "INSERT INTO pending_gates (label, model, version, candidate_run_id, received_at)
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING";
const EXISTS: &str =
    "SELECT label FROM pending_gates WHERE label = $1 AND model = $2 AND version = $3";
const DELETE: &str = "DELETE FROM pending_gates WHERE label = $1 AND model = $2 AND version = $3";
const SELECT: &str = "SELECT label, model, version, candidate_run_id, received_at
     FROM pending_gates ORDER BY received_at, label, model, version";

fn key(label: &str, model: &str, version: &str) -> Vec<Arg> {
    vec![Arg::text(label), Arg::text(model), Arg::text(version)]
}

#[async_trait]
impl<B: Backend> PendingGates for SqlRunStore<B> {
    async fn add(&self, gate: &PendingGate) -> Result<(), StoreError> {
        let b = &self.0;
        let mut args = key(&gate.label, &gate.model, &gate.version);
        args.push(Arg::OptText(gate.candidate_run_id.clone()));
        args.push(Arg::Time(gate.received_at));
        b.pool().execute(INSERT, args).await.map_err(|e| {
            b.error(
                &format!(
                    "recording the pending gate of {} version {} for label {}",
                    gate.model, gate.version, gate.label
                ),
                e,
            )
        })?;
        Ok(())
    }

    async fn is_pending(
        &self,
        label: &str,
        model: &str,
        version: &str,
    ) -> Result<bool, StoreError> {
        let b = &self.0;
        let row = b
            .pool()
            .fetch_optional(EXISTS, key(label, model, version))
            .await
            .map_err(|e| b.error(&format!("reading the pending gates of label {label}"), e))?;
        Ok(row.is_some())
    }

    async fn remove(&self, label: &str, model: &str, version: &str) -> Result<(), StoreError> {
        let b = &self.0;
        b.pool()
            .execute(DELETE, key(label, model, version))
            .await
            .map_err(|e| b.error(&format!("removing the pending gate of label {label}"), e))?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<PendingGate>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_all(SELECT, Vec::new())
            .await
            .map_err(|e| b.error("listing the pending gates", e))?
            .iter()
            .map(|row| {
                let label = row.text("label")?;
                Ok(PendingGate {
                    model: row.text("model")?,
                    version: row.text("version")?,
                    candidate_run_id: row.opt_text("candidate_run_id")?,
                    received_at: row.time(
                        "received_at",
                        &format!("time of the pending gate of label {label}"),
                    )?,
                    label,
                })
            })
            .collect()
    }
}
