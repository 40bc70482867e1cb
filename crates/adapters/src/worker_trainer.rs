//! Remote workers as the trainer: `trainer = { worker = { gpu, gpu_memory,
//! memory, cpus, tags, command, env, timeout, queue_timeout } }`. Jobs go
//! into the run store's durable queue ([`JobQueue`]); `retrain worker`
//! agents pull them from `retrain-server` (see `docs/workers.md`).
//!
//! **Start** enqueues the job under the engine's intent key (`run/train/N`),
//! idempotently: a second `start` for the key after a crash adopts the row
//! that exists, whatever its state. The handle names the key only.
//!
//! **Wait** polls the job row (cancel-safe: dropping the future changes
//! nothing): `finished` → the reported candidate; `failed` → an error with
//! the worker's message; `lost` (its worker went stale) → `Lost`, so the
//! machine counts the attempt and enqueues the next key; still `queued`
//! after `queue_timeout` → the job is taken out of the queue and the run
//! fails naming the unmet request. A job row that vanished is `Lost`.
//!
//! **Cancel** marks the job `cancelling`; the worker holding it learns on
//! its next heartbeat and kills its process group. A job still queued
//! leaves the queue at once.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use retrain_core::domain::{TrainingHandle, TrainingOutcome};
use retrain_core::ports::{PortError, StoreError, Trainer, TrainingRequest};
use tokio::sync::Notify;
use tracing::warn;

use crate::settings::WorkerTrainerConfig;
use crate::store::{JobQueue, JobState, NewJob, RemoteJobSpec};

/// `TrainingHandle::kind` of worker jobs.
pub const HANDLE_KIND: &str = "worker";

/// How often `wait` reads the job row by default.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The queue plus a wake-up for whoever long-polls it in this process (the
/// server's `lease-job`), poked on every enqueue so that an idle worker gets
/// the job at once rather than at its next re-check.
#[derive(Clone)]
pub struct RemoteJobs {
    pub queue: Arc<dyn JobQueue>,
    pub enqueued: Arc<Notify>,
}

impl std::fmt::Debug for RemoteJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJobs").finish_non_exhaustive()
    }
}

impl RemoteJobs {
    pub fn new(queue: Arc<dyn JobQueue>) -> Self {
        Self {
            queue,
            enqueued: Arc::new(Notify::new()),
        }
    }
}

/// The worker-pool trainer of one label.
#[derive(Debug)]
pub struct WorkerTrainer {
    jobs: RemoteJobs,
    config: WorkerTrainerConfig,
    poll_interval: Duration,
}

impl WorkerTrainer {
    pub fn new(jobs: RemoteJobs, config: WorkerTrainerConfig) -> Self {
        Self {
            jobs,
            config,
            poll_interval: POLL_INTERVAL,
        }
    }

    /// Read the job row this often (tests).
    #[must_use]
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    fn spec(&self, request: &TrainingRequest) -> RemoteJobSpec {
        RemoteJobSpec {
            dataset_name: request.dataset_name.clone(),
            dataset_version: request.dataset_version.as_str().to_owned(),
            command: self.config.command.clone(),
            env: self.config.env.clone(),
            timeout_secs: self.config.timeout.as_secs(),
            request: self.config.request.clone(),
        }
    }

    /// Why nobody took the job: the request, and how long it waited.
    fn unfitted(&self, job_key: &str, label: &str) -> String {
        format!(
            "no worker with {} (label {label}) registered and took job {job_key} within queue_timeout ({}): see `GET /v1/workers` and `GET /v1/workers/queue`",
            self.config.request.describe(),
            crate::settings::format_duration(self.config.queue_timeout)
        )
    }
}

fn job_key_of(handle: &TrainingHandle) -> Result<&str, PortError> {
    if handle.kind != HANDLE_KIND {
        return Err(PortError::Config(format!(
            "the worker trainer cannot await a {:?} job",
            handle.kind
        )));
    }
    handle
        .data
        .get("job_key")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| PortError::InvalidResponse("worker job handle without a job_key".into()))
}

fn port_error(what: &str, error: StoreError) -> PortError {
    match error {
        StoreError::Unavailable(m) => PortError::Transient(format!("{what}: {m}")),
        other => PortError::Failed(format!("{what}: {other}")),
    }
}

#[async_trait]
impl Trainer for WorkerTrainer {
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        let key = request.job_key.as_str();
        let job = NewJob {
            job_key: key.to_owned(),
            run_id: request.run_id.as_str().to_owned(),
            label: request.label.as_str().to_owned(),
            attempt: request.attempt,
            spec: self.spec(request),
            enqueued_at: Utc::now(),
        };
        let stored = self
            .jobs
            .queue
            .enqueue(&job)
            .await
            .map_err(|e| port_error(&format!("enqueuing worker job {key}"), e))?;
        if stored.state == JobState::Queued {
            self.jobs.enqueued.notify_waiters();
        }
        Ok(TrainingHandle {
            kind: HANDLE_KIND.into(),
            data: serde_json::json!({ "job_key": key }),
        })
    }

    async fn wait(
        &self,
        request: &TrainingRequest,
        handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        let key = job_key_of(handle)?;
        loop {
            let job = match self.jobs.queue.job(key).await {
                Ok(job) => job,
                // The engine's train_timeout bounds an outage.
                Err(StoreError::Unavailable(m)) => {
                    warn!(job = key, error = %m, "reading the worker job failed; retrying");
                    tokio::time::sleep(self.poll_interval).await;
                    continue;
                }
                Err(e) => return Err(port_error(&format!("reading worker job {key}"), e)),
            };
            let Some(job) = job else {
                return Ok(TrainingOutcome::Lost {
                    reason: format!("worker job {key} is no longer in the queue"),
                });
            };
            match job.state {
                JobState::Finished => {
                    return job.result.map(TrainingOutcome::Finished).ok_or_else(|| {
                        PortError::InvalidResponse(format!(
                            "worker job {key} finished without a result"
                        ))
                    })
                }
                JobState::Failed => {
                    return Err(PortError::Failed(format!(
                        "worker job {key} failed{}: {}",
                        job.worker_id
                            .map(|w| format!(" on worker {w}"))
                            .unwrap_or_default(),
                        job.failure.as_deref().unwrap_or("no message")
                    )))
                }
                JobState::Lost => {
                    return Ok(TrainingOutcome::Lost {
                        reason: job
                            .failure
                            .unwrap_or_else(|| format!("worker job {key} was lost")),
                    })
                }
                JobState::Queued => {
                    let waited = (Utc::now() - job.enqueued_at).to_std().unwrap_or_default();
                    if waited >= self.config.queue_timeout {
                        let message = self.unfitted(key, request.label.as_str());
                        let after = self
                            .jobs
                            .queue
                            .cancel(key, &message, Utc::now())
                            .await
                            .map_err(|e| port_error(&format!("dequeuing worker job {key}"), e))?;
                        // A worker may have taken it at the last moment.
                        if after == Some(JobState::Failed) {
                            return Err(PortError::Failed(message));
                        }
                        continue;
                    }
                }
                JobState::Assigned | JobState::Cancelling => {}
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    async fn cancel(&self, handle: &TrainingHandle) -> Result<(), PortError> {
        let key = job_key_of(handle)?;
        self.jobs
            .queue
            .cancel(key, "cancelled by the orchestrator", Utc::now())
            .await
            .map_err(|e| port_error(&format!("cancelling worker job {key}"), e))?;
        Ok(())
    }

    /// The job runs on a worker, which keeps running it (and retries its
    /// report) while this process restarts; the resumed run awaits it.
    fn outlives_interrupt(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "worker pool ({}; {})",
            self.config.request.describe(),
            self.config.command.join(" ")
        )
    }
}
