//! A retrain Space as the trainer (seed 000 §6): the dataset version goes in
//! as the Space variable `DATASET_VERSION`, then the Space is restarted. The
//! Space trains, evaluates and deploys by itself (gate = "none").
//!
//! **Idempotent for the job key.** Before the restart, the trainer sets two
//! Space variables: `DATASET_VERSION` (the protocol) and then
//! `RETRAIN_JOB_KEY` (the key of this start). Per the Hub reference
//! (`shared/reference/external-apis.md` §1.2), setting a variable does *not*
//! restart the Space: it is injected as an env var at the next (re)start,
//! which is the restart we post right after. A `start` for a key whose
//! variables are already set (`RETRAIN_JOB_KEY` = the key, `DATASET_VERSION`
//! = the version) and whose runtime shows the Space (re)starting or running
//! (`BUILDING`, `RUNNING_BUILDING`, `APP_STARTING`, `RUNNING_APP_STARTING`,
//! `RUNNING`) adopts that job and posts no restart: that is a resumed run
//! whose previous process died between the restart and its journal write.
//! Any other stage (`PAUSED`, `STOPPED`, an error stage) shows no restart
//! for the key, so the Space is restarted.
//!
//! The variables are read only when a job may exist under the key: not
//! for a first start (`TrainingRequest::first_start`: this process has
//! just journaled the intent), which costs three requests (two variables,
//! one restart) instead of four.
//!
//! **Crash window.** The Hub records no restart time, so the variables and
//! the stage are the only evidence. A process killed *after* setting
//! `RETRAIN_JOB_KEY` but *before* its restart request reached the Hub, on a
//! Space that was already `RUNNING`, is indistinguishable from one whose
//! restart went through: the job is adopted without a restart. The window
//! is one HTTP round trip (the key is set last, immediately before the
//! restart). A restart request whose outcome is unknown (timeout, 5xx) is
//! never re-posted blindly ([`restart_space`]).

use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use retrain_core::domain::{Candidate, SpaceStage, TrainingHandle, TrainingOutcome};
use retrain_core::ports::{PortError, Trainer, TrainingRequest};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::space::{fetch_runtime, is_restarting, restart_space, Runtime};
use super::{parse_space, HubClient, RepoId};
use crate::error::AdapterError;

/// `TrainingHandle::kind` of Space trainings.
pub const HANDLE_KIND: &str = "hf-space";
/// The Space variable carrying the dataset version (BRIEF §6).
pub const DATASET_VERSION_VARIABLE: &str = "DATASET_VERSION";
/// The Space variable carrying the job key of the last start (set after
/// `DATASET_VERSION`, before the restart): what makes `start` idempotent.
pub const JOB_KEY_VARIABLE: &str = "RETRAIN_JOB_KEY";

/// `TrainingHandle::data` of Space trainings (journaled; keep it stable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HandleData {
    space: String,
    dataset_version: String,
}

/// Trains by restarting a Space with `DATASET_VERSION` set.
#[derive(Debug, Clone)]
pub struct HfSpaceTrainer {
    client: HubClient,
    space: RepoId,
    wait_for_running: Option<Duration>,
    poll_interval: Duration,
}

impl HfSpaceTrainer {
    /// `wait_for_running`: when set, `wait` polls the runtime until the Space
    /// is `RUNNING` (at most that long) and fails fast on an error stage;
    /// when unset, `wait` returns at once: the Space decides by itself.
    pub fn new(
        client: HubClient,
        space: &str,
        wait_for_running: Option<Duration>,
    ) -> Result<Self, AdapterError> {
        Ok(Self {
            client,
            space: parse_space(space)?,
            wait_for_running,
            poll_interval: Duration::from_secs(5),
        })
    }

    /// How often `wait` reads the runtime (default 5 s; the Hub's API bucket
    /// is 1,000 calls per 5 minutes for a free user, so not much faster).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    pub fn space(&self) -> &RepoId {
        &self.space
    }

    fn variables_permission(&self) -> String {
        format!(
            "the token needs write access to Space {} to read and set its variables",
            self.space
        )
    }

    /// `GET /api/spaces/{id}/variables`: `{KEY: {"value", "description",
    /// "updatedAt"}}` → key → value.
    async fn variables(&self) -> Result<std::collections::BTreeMap<String, String>, PortError> {
        let url = self
            .client
            .url(&format!("/api/spaces/{}/variables", self.space))?;
        let what = format!("reading the variables of Space {}", self.space);
        let response = self
            .client
            .send(&what, Method::GET, &url, None, false)
            .await?;
        if !response.status().is_success() {
            return Err(self
                .client
                .error(&what, &self.variables_permission(), response)
                .await);
        }
        let body = super::read_limited(&what, response, 1 << 20).await?;
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            PortError::InvalidResponse(format!("{what}: the response is not JSON: {e}"))
        })?;
        let serde_json::Value::Object(map) = value else {
            return Err(PortError::InvalidResponse(format!(
                "{what}: expected an object of variables"
            )));
        };
        Ok(map
            .into_iter()
            .filter_map(|(key, entry)| {
                let value = match entry {
                    serde_json::Value::Object(fields) => fields.get("value")?.as_str()?.to_owned(),
                    serde_json::Value::String(value) => value,
                    _ => return None,
                };
                Some((key, value))
            })
            .collect())
    }

    fn handle(&self, version: &str) -> Result<TrainingHandle, PortError> {
        let data = HandleData {
            space: self.space.to_string(),
            dataset_version: version.to_owned(),
        };
        Ok(TrainingHandle {
            kind: HANDLE_KIND.to_owned(),
            data: serde_json::to_value(data)
                .map_err(|e| PortError::Failed(format!("cannot encode the handle: {e}")))?,
        })
    }

    async fn set_variable(&self, key: &str, value: &str) -> Result<(), PortError> {
        let url = self
            .client
            .url(&format!("/api/spaces/{}/variables", self.space))?;
        let body = serde_json::json!({ "key": key, "value": value });
        let what = format!("setting variable {key} on Space {}", self.space);
        let response = self
            .client
            .send(&what, Method::POST, &url, Some(&body), false)
            .await?;
        if response.status().is_success() {
            return Ok(());
        }
        let permission = format!(
            "the token needs write access to Space {} to set its variables",
            self.space
        );
        Err(self.client.error(&what, &permission, response).await)
    }

    fn handle_data(&self, handle: &TrainingHandle) -> Result<(RepoId, HandleData), PortError> {
        if handle.kind != HANDLE_KIND {
            return Err(PortError::Config(format!(
                "Space trainer {} cannot await a `{}` job (expected `{HANDLE_KIND}`)",
                self.space, handle.kind
            )));
        }
        let data: HandleData = serde_json::from_value(handle.data.clone()).map_err(|e| {
            PortError::Config(format!(
                "journaled handle of Space trainer {} is malformed: {e}",
                self.space
            ))
        })?;
        // The journaled Space wins over the configured one: a resumed run
        // awaits the job it actually started.
        let space = parse_space(&data.space).map_err(|e| {
            PortError::Config(format!("journaled handle names an invalid Space: {e}"))
        })?;
        Ok((space, data))
    }
}

#[async_trait]
impl Trainer for HfSpaceTrainer {
    /// Idempotent for `request.job_key` (see the module doc): adopts the
    /// Space already restarted for the key instead of restarting it again.
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        let version = request.dataset_version.as_str();
        let key = request.job_key.as_str();
        // A first start (this process just journaled the intent) has no
        // job to adopt: no read of the variables, both set, one restart.
        let variables = if request.first_start {
            Default::default()
        } else {
            self.variables().await?
        };
        let same_version =
            variables.get(DATASET_VERSION_VARIABLE).map(String::as_str) == Some(version);
        let same_key = variables.get(JOB_KEY_VARIABLE).map(String::as_str) == Some(key);
        if same_version && same_key {
            let runtime = fetch_runtime(&self.client, &self.space).await?;
            if is_restarting(&runtime.stage) || runtime.stage == SpaceStage::Running {
                info!(
                    space = %self.space,
                    job_key = key,
                    stage = %runtime.raw_stage,
                    "the Space was already restarted for this job; adopting it"
                );
                return self.handle(version);
            }
            info!(
                space = %self.space,
                job_key = key,
                stage = %runtime.raw_stage,
                "the variables are set for this job but the Space shows no restart; restarting it"
            );
        }
        // The variables first: they are injected at the next (re)start, so
        // the restart below is what makes the Space train on this version.
        // The key last, so "key set" implies "version set".
        if !same_version {
            self.set_variable(DATASET_VERSION_VARIABLE, version).await?;
        }
        if !same_key {
            self.set_variable(JOB_KEY_VARIABLE, key).await?;
        }
        restart_space(&self.client, &self.space, false).await?;
        info!(space = %self.space, dataset_version = version, job_key = key, "retrain Space restarted");
        self.handle(version)
    }

    async fn wait(
        &self,
        _request: &TrainingRequest,
        handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        let (space, data) = self.handle_data(handle)?;
        let finished = || {
            TrainingOutcome::Finished(Candidate {
                id: format!("{space}@{}", data.dataset_version),
                metrics: Default::default(),
            })
        };
        let Some(limit) = self.wait_for_running else {
            // Seed 000: the Space trains, evaluates and deploys by itself and
            // reports nothing back; the restart is the whole job.
            return Ok(finished());
        };
        let deadline = tokio::time::Instant::now() + limit;
        let mut last: Option<Runtime> = None;
        loop {
            match fetch_runtime(&self.client, &space).await {
                Ok(runtime) if runtime.stage == SpaceStage::Running => return Ok(finished()),
                Ok(runtime) if runtime.stage.is_error() => {
                    let detail = runtime
                        .error_message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default();
                    return Err(PortError::Failed(self.client.scrub(format!(
                        "retrain Space {space} is in error stage {}{detail} (dataset version {})",
                        runtime.raw_stage, data.dataset_version
                    ))));
                }
                Ok(runtime) => last = Some(runtime),
                // Transient trouble: keep polling until the deadline.
                Err(PortError::Transient(e)) => {
                    warn!(space = %space, error = %e, "reading the Space runtime failed; polling again")
                }
                Err(e) => return Err(e),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                let stage = last
                    .map(|r| r.raw_stage)
                    .unwrap_or_else(|| "unknown".to_owned());
                return Err(PortError::Failed(format!(
                    "retrain Space {space} did not reach RUNNING within {}s (last stage {stage})",
                    limit.as_secs()
                )));
            }
            tokio::time::sleep(self.poll_interval.min(deadline - now)).await;
        }
    }

    /// Nothing to do, on purpose: the Hub can only *pause* a Space, which
    /// stops it for good (until someone restarts it by hand) and would break
    /// the Space for everyone using it. A run the Space already started
    /// finishes on its own; the timeout is recorded by the engine.
    async fn cancel(&self, handle: &TrainingHandle) -> Result<(), PortError> {
        info!(space = %self.space, kind = %handle.kind, "not stopping the Space: a Space cannot be stopped mid-run without pausing it");
        Ok(())
    }

    fn describe(&self) -> String {
        format!("hf-space://{}", self.space)
    }

    /// The Space trains on the Hub, whatever becomes of this process, and
    /// cannot be stopped (see `cancel`): an interrupt leaves the job to the
    /// resumed run, which awaits it. Cancelling it instead would journal it
    /// cancelled, and the resumed run would restart the Space under a new
    /// key, in the middle of the training the first restart began.
    fn outlives_interrupt(&self) -> bool {
        true
    }

    /// Without `wait_for_running` the restart is the whole job (seed 000:
    /// the Space trains, evaluates and deploys by itself) and `wait`
    /// answers at once.
    fn start_is_the_job(&self) -> bool {
        self.wait_for_running.is_none()
    }
}
