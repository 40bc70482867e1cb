//! The durable queue of remote training jobs and the workers that pull them
//! (`trainer = { worker = … }`, `retrain worker`; tables `remote_jobs` and
//! `remote_workers`, migrations sqlite `0010` / postgres `0009`).
//!
//! **Invariants.**
//! - *One row per job key.* [`JobQueue::enqueue`] inserts with `ON CONFLICT
//!   DO NOTHING` and returns the row that exists, so the trainer's `start`,
//!   called again for the same intent key after a crash, adopts the job.
//! - *A job moves only by compare-and-set on its state* (and, once assigned,
//!   on its worker): `queued → assigned` (one worker wins: `WHERE state =
//!   'queued'`), `assigned|cancelling → finished|failed` (only by the worker
//!   it is assigned to), `assigned → queued` (a drain cancel: same key, no
//!   attempt used), `assigned|cancelling → lost` (its worker went stale).
//!   So a result from a stale worker, or from any worker but the holder, is
//!   refused, and a job finishes at most once.
//! - *At most one job per worker*: a partial unique index on `worker_id`
//!   over the held states, on every process sharing the store.
//! - *Staleness is one transaction*: workers past the TTL become `stale`
//!   and every job they hold `lost` together ([`JobQueue::mark_stale`]).
//!
//! Times are passed in by the caller (the server's clock on both dialects),
//! so replicas sharing a Postgres store must keep their clocks in sync to
//! well within `worker_ttl`.

use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::Candidate;
use retrain_core::ports::StoreError;
use serde::{Deserialize, Serialize};

use super::backend::{Arg, Backend, Columns, Statements, StoreRow};
use super::SqlRunStore;

/// Largest log tail kept per job, in bytes (the API's "last 64 KiB"). The
/// SQL keeps the last 65,536 characters; reads trim that to this.
pub const LOG_TAIL_BYTES: usize = 64 * 1024;

/// A fresh, unguessable worker id (`w-<uuid v7>`).
pub fn new_worker_id() -> String {
    format!("w-{}", uuid::Uuid::now_v7().simple())
}

/// What a worker has (`POST /v1/workers`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub memory_bytes: u64,
    #[serde(default)]
    pub gpus: u32,
    /// Per GPU; 0 without GPUs.
    #[serde(default)]
    pub gpu_memory_bytes: u64,
    #[serde(default)]
    pub gpu_names: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// What a job needs; a worker fits when every given amount is at most its
/// own and it carries every tag.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl ResourceRequest {
    /// Whether `resources` satisfy every part of the request.
    pub fn fits(&self, resources: &Resources) -> bool {
        self.cpus.is_none_or(|n| n <= resources.cpus)
            && self
                .memory_bytes
                .is_none_or(|n| n <= resources.memory_bytes)
            && self.gpus.is_none_or(|n| n <= resources.gpus)
            && self
                .gpu_memory_bytes
                .is_none_or(|n| n <= resources.gpu_memory_bytes)
            && self.tags.iter().all(|t| resources.tags.contains(t))
    }

    /// The request for people: `gpu≥1, gpu_memory≥24G, tags ⊇ [a100]`
    /// (`any worker` when empty).
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.gpus {
            parts.push(format!("gpu≥{n}"));
        }
        if let Some(n) = self.gpu_memory_bytes {
            parts.push(format!("gpu_memory≥{}", format_size(n)));
        }
        if let Some(n) = self.memory_bytes {
            parts.push(format!("memory≥{}", format_size(n)));
        }
        if let Some(n) = self.cpus {
            parts.push(format!("cpus≥{n}"));
        }
        if !self.tags.is_empty() {
            parts.push(format!("tags ⊇ [{}]", self.tags.join(", ")));
        }
        if parts.is_empty() {
            "any worker".into()
        } else {
            parts.join(", ")
        }
    }
}

/// `24G`, `512M`, `1536K`, or bytes: the largest unit that divides exactly.
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [
        ("T", 1u64 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    bytes.to_string()
}

/// What a worker runs for a job (the `Job` of `lease-job`, minus the URLs).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteJobSpec {
    pub dataset_name: String,
    pub dataset_version: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u64,
    #[serde(default)]
    pub request: ResourceRequest,
}

/// Env values may be credentials: only their names are shown.
impl std::fmt::Debug for RemoteJobSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJobSpec")
            .field("dataset_name", &self.dataset_name)
            .field("dataset_version", &self.dataset_version)
            .field("command", &self.command)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("timeout_secs", &self.timeout_secs)
            .field("request", &self.request)
            .finish()
    }
}

/// A job to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub job_key: String,
    pub run_id: String,
    pub label: String,
    pub attempt: u32,
    pub spec: RemoteJobSpec,
    pub enqueued_at: DateTime<Utc>,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker that fits.
    Queued,
    /// Held by one worker.
    Assigned,
    /// The engine asked to stop it; its worker is told on its heartbeat.
    Cancelling,
    /// Its worker reported a result.
    Finished,
    /// Its worker reported a failure, or it was cancelled or timed out in
    /// the queue (`failure` says which).
    Failed,
    /// Its worker went stale while holding it.
    Lost,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Cancelling => "cancelling",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Lost => "lost",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Assigned,
            Self::Cancelling,
            Self::Finished,
            Self::Failed,
            Self::Lost,
        ]
        .into_iter()
        .find(|s| s.as_str() == raw)
    }

    /// Held by a worker (it may be running it).
    pub fn is_held(self) -> bool {
        matches!(self, Self::Assigned | Self::Cancelling)
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoteJob {
    pub job_key: String,
    pub run_id: String,
    pub label: String,
    pub attempt: u32,
    pub spec: RemoteJobSpec,
    pub state: JobState,
    pub worker_id: Option<String>,
    pub result: Option<Candidate>,
    pub failure: Option<String>,
    pub log_tail: String,
    pub enqueued_at: DateTime<Utc>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a worker says it is doing (a stored worker may also be `Stale`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Running,
    Draining,
    /// No heartbeat within `worker_ttl` (set by the server, never sent).
    Stale,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Running => "running",
            Self::Draining => "draining",
            Self::Stale => "stale",
        }
    }

    fn parse(raw: &str) -> Option<Self> {
        [Self::Idle, Self::Running, Self::Draining, Self::Stale]
            .into_iter()
            .find(|s| s.as_str() == raw)
    }
}

/// A worker registering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewWorker {
    pub worker_id: String,
    pub name: String,
    pub hostname: String,
    /// Labels it takes jobs of; empty: any.
    pub labels: Vec<String>,
    pub resources: Resources,
    pub version: String,
    pub registered_at: DateTime<Utc>,
}

/// A worker as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Worker {
    pub worker_id: String,
    pub name: String,
    pub hostname: String,
    pub labels: Vec<String>,
    pub resources: Resources,
    pub version: String,
    pub state: WorkerState,
    /// The job it holds (assigned or being cancelled), if any.
    pub job_key: Option<String>,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
}

impl Worker {
    /// Whether it takes jobs of `label`.
    pub fn accepts(&self, label: &str) -> bool {
        self.labels.is_empty() || self.labels.iter().any(|l| l == label)
    }
}

/// What asking for a job gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Lease {
    /// Assigned to this worker now.
    Assigned(Box<RemoteJob>),
    /// No queued job fits it.
    NoneFits,
    /// It already holds `job_key`.
    Busy {
        job_key: String,
    },
    /// It is draining (or stale): it gets no new job.
    NotTaking(WorkerState),
    UnknownWorker,
}

/// What a worker reports about the job it holds.
#[derive(Debug, Clone, PartialEq)]
pub enum JobReport {
    Finished(Candidate),
    Failed {
        message: String,
        exit_status: Option<String>,
    },
    /// Stopped by a draining worker: back to the queue, same key, no attempt
    /// used (unless the engine had asked to cancel it: then it is over).
    Cancelled,
}

/// What a report did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reported {
    Accepted,
    /// The very same result was accepted before (a retried request).
    AlreadyAccepted,
    /// The job does not await this report from this worker; says why.
    NotAwaited(String),
}

/// What a staleness sweep changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaleSweep {
    /// Workers that became stale.
    pub workers: Vec<String>,
    /// Jobs they held, now lost.
    pub lost_jobs: Vec<String>,
}

/// The types of [`WorkerEvent`]s, as the triggers of migrations sqlite
/// `0013` / postgres `0012` write them.
pub const WORKER_EVENT_TYPES: &[&str] = &[
    "worker.registered",
    "worker.stale",
    "worker.removed",
    "job.queued",
    "job.assigned",
    "job.finished",
    "job.failed",
    "job.requeued",
    "job.lost",
];

/// One change of a worker or a job, recorded in the transaction that made
/// it (table `worker_events`). Its position comes from the journal's
/// counter: journal lines and worker events interleave in commit order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerEvent {
    /// The journal position (the SSE `id`).
    #[serde(rename = "id")]
    pub position: u64,
    /// One of [`WORKER_EVENT_TYPES`].
    #[serde(rename = "type")]
    pub kind: String,
    /// When the store recorded it (the database's clock on Postgres).
    pub at: DateTime<Utc>,
    pub worker_id: Option<String>,
    /// `job_key`, `run_id` and `label` are set on `job.*` events only.
    pub job_key: Option<String>,
    pub run_id: Option<String>,
    pub label: Option<String>,
    /// A few facts: the worker's name and resources, the job's attempt,
    /// resource request, candidate or failure reason. Never a token or the
    /// job's env values.
    pub detail: serde_json::Value,
}

/// The durable job queue and worker registry (see the module docs).
#[async_trait]
pub trait JobQueue: Send + Sync + std::fmt::Debug {
    /// Insert `job` unless its key exists; the stored row either way.
    async fn enqueue(&self, job: &NewJob) -> Result<RemoteJob, StoreError>;

    async fn job(&self, job_key: &str) -> Result<Option<RemoteJob>, StoreError>;

    /// The jobs of a run, oldest first.
    async fn jobs_of_run(&self, run_id: &str) -> Result<Vec<RemoteJob>, StoreError>;

    /// Queued and held jobs, oldest first.
    async fn queue(&self) -> Result<Vec<RemoteJob>, StoreError>;

    async fn register_worker(&self, worker: &NewWorker) -> Result<Worker, StoreError>;

    /// Record a heartbeat (a stale worker becomes live again). `None`: no
    /// such worker. Otherwise the job keys it must kill now: the jobs it
    /// holds that the engine cancels, and `running` if that job is not held
    /// by it (any more).
    async fn heartbeat(
        &self,
        worker_id: &str,
        state: WorkerState,
        running: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<Option<Vec<String>>, StoreError>;

    /// The worker says it runs nothing, yet holds jobs assigned before
    /// `assigned_before`: it never received them (the lease answer was
    /// lost). An assigned one goes back to the queue (same key, no attempt
    /// used), one being cancelled is over. The keys released.
    async fn release_unclaimed(
        &self,
        worker_id: &str,
        assigned_before: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError>;

    /// Remove the worker; a job it holds goes back to the queue (no attempt
    /// used). `false`: no such worker.
    async fn deregister_worker(&self, worker_id: &str) -> Result<bool, StoreError>;

    async fn worker(&self, worker_id: &str) -> Result<Option<Worker>, StoreError>;

    async fn workers(&self) -> Result<Vec<Worker>, StoreError>;

    /// Assign the oldest queued job that fits the worker (labels and
    /// resources) to it.
    async fn lease(&self, worker_id: &str, at: DateTime<Utc>) -> Result<Lease, StoreError>;

    /// The report of the worker holding `job_key` (`worker_id = None`:
    /// whichever holds it).
    async fn report(
        &self,
        job_key: &str,
        worker_id: Option<&str>,
        report: &JobReport,
        at: DateTime<Utc>,
    ) -> Result<Reported, StoreError>;

    /// Append `chunk` to the log tail of `job_key` if `worker_id` holds it.
    async fn append_log(
        &self,
        job_key: &str,
        worker_id: &str,
        chunk: &str,
    ) -> Result<bool, StoreError>;

    /// Stop `job_key`: a queued job fails at once with `reason` (it leaves
    /// the queue), a held one is `cancelling` until its worker reports.
    /// The state after; `None`: no such job.
    async fn cancel(
        &self,
        job_key: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<JobState>, StoreError>;

    /// Workers whose last heartbeat is older than `cutoff` become stale and
    /// the jobs they hold lost, in one transaction.
    async fn mark_stale(
        &self,
        cutoff: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<StaleSweep, StoreError>;

    /// Delete the stale workers; their ids.
    async fn remove_stale(&self) -> Result<Vec<String>, StoreError>;

    /// Up to `limit` worker events with a position greater than `after`
    /// (only `label`'s job events, if given: worker events have no label),
    /// in position order. Positions are assigned in commit order, as
    /// journal positions are (`RunStore::journal_after`).
    async fn worker_events_after(
        &self,
        after: u64,
        label: Option<&str>,
        limit: u32,
    ) -> Result<Vec<WorkerEvent>, StoreError>;
}

// ---- SQL (shared by both dialects) ----

const INSERT_JOB: &str = "INSERT INTO remote_jobs
        (job_key, run_id, label, attempt, spec, state, enqueued_at)
     VALUES ($1, $2, $3, $4, $5, 'queued', $6)
     ON CONFLICT (job_key) DO NOTHING";

const SELECT_JOB: &str = "SELECT job_key, run_id, label, attempt, spec, state, worker_id,
            COALESCE(result, 'null') AS result, failure, log_tail, enqueued_at, assigned_at, finished_at
     FROM remote_jobs WHERE job_key = $1";

const SELECT_JOBS_OF_RUN: &str = "SELECT job_key, run_id, label, attempt, spec, state, worker_id,
            COALESCE(result, 'null') AS result, failure, log_tail, enqueued_at, assigned_at, finished_at
     FROM remote_jobs WHERE run_id = $1 ORDER BY enqueued_at, job_key";

const SELECT_QUEUE: &str = "SELECT job_key, run_id, label, attempt, spec, state, worker_id,
            COALESCE(result, 'null') AS result, failure, log_tail, enqueued_at, assigned_at, finished_at
     FROM remote_jobs WHERE state IN ('queued', 'assigned', 'cancelling')
     ORDER BY enqueued_at, job_key";

const SELECT_QUEUED: &str = "SELECT job_key, run_id, label, attempt, spec, state, worker_id,
            COALESCE(result, 'null') AS result, failure, log_tail, enqueued_at, assigned_at, finished_at
     FROM remote_jobs WHERE state = 'queued' ORDER BY enqueued_at, job_key";

/// `$1` key, `$2` worker, `$3` now. The worker must still be live; the
/// unique index refuses a second held job of one worker.
const ASSIGN: &str = "UPDATE remote_jobs SET state = 'assigned', worker_id = $2, assigned_at = $3
     WHERE job_key = $1 AND state = 'queued'
       AND EXISTS (SELECT 1 FROM remote_workers WHERE worker_id = $2 AND state <> 'stale')";

/// `$1` key, `$2` worker (NULL: any holder), `$3` result, `$4` now.
const FINISH: &str = "UPDATE remote_jobs SET state = 'finished', result = $3, finished_at = $4
     WHERE job_key = $1 AND state IN ('assigned', 'cancelling')
       AND (CAST($2 AS TEXT) IS NULL OR worker_id = $2)";

/// `$1` key, `$2` worker (NULL: any holder), `$3` failure, `$4` now.
const FAIL: &str = "UPDATE remote_jobs SET state = 'failed', failure = $3, finished_at = $4
     WHERE job_key = $1 AND state IN ('assigned', 'cancelling')
       AND (CAST($2 AS TEXT) IS NULL OR worker_id = $2)";

/// A job the engine is cancelling ends when its worker stops it.
const CANCELLED_WHILE_CANCELLING: &str =
    "UPDATE remote_jobs SET state = 'failed', failure = $3, finished_at = $4
     WHERE job_key = $1 AND state = 'cancelling'
       AND (CAST($2 AS TEXT) IS NULL OR worker_id = $2)";

const REQUEUE: &str =
    "UPDATE remote_jobs SET state = 'queued', worker_id = NULL, assigned_at = NULL
     WHERE job_key = $1 AND state = 'assigned' AND (CAST($2 AS TEXT) IS NULL OR worker_id = $2)";

const REQUEUE_OF_WORKER: &str =
    "UPDATE remote_jobs SET state = 'queued', worker_id = NULL, assigned_at = NULL
     WHERE worker_id = $1 AND state = 'assigned' RETURNING job_key";

/// A job being cancelled whose worker leaves is over.
const FAIL_CANCELLING_OF_WORKER: &str =
    "UPDATE remote_jobs SET state = 'failed', failure = $2, finished_at = $3
     WHERE worker_id = $1 AND state = 'cancelling' RETURNING job_key";

/// `$1` worker, `$2` assigned before.
const REQUEUE_UNCLAIMED: &str =
    "UPDATE remote_jobs SET state = 'queued', worker_id = NULL, assigned_at = NULL
     WHERE worker_id = $1 AND state = 'assigned' AND assigned_at < $2 RETURNING job_key";

/// `$1` worker, `$2` assigned before, `$3` now.
const FAIL_UNCLAIMED_CANCELLING: &str =
    "UPDATE remote_jobs SET state = 'failed', failure = 'cancelled', finished_at = $3
     WHERE worker_id = $1 AND state = 'cancelling' AND assigned_at < $2 RETURNING job_key";

const DELETE_WORKER: &str = "DELETE FROM remote_workers WHERE worker_id = $1 RETURNING worker_id";

const CANCEL_QUEUED: &str =
    "UPDATE remote_jobs SET state = 'failed', failure = $2, finished_at = $3
     WHERE job_key = $1 AND state = 'queued'";

const CANCEL_ASSIGNED: &str =
    "UPDATE remote_jobs SET state = 'cancelling' WHERE job_key = $1 AND state = 'assigned'";

const INSERT_WORKER: &str = "INSERT INTO remote_workers
        (worker_id, name, hostname, labels, resources, version, state, registered_at, last_heartbeat_at)
     VALUES ($1, $2, $3, $4, $5, $6, 'idle', $7, $7)";

const SELECT_WORKER: &str =
    "SELECT w.worker_id, w.name, w.hostname, w.labels, w.resources, w.version, w.state,
            w.registered_at, w.last_heartbeat_at,
            (SELECT j.job_key FROM remote_jobs j
             WHERE j.worker_id = w.worker_id AND j.state IN ('assigned', 'cancelling')) AS job_key
     FROM remote_workers w WHERE w.worker_id = $1";

const SELECT_WORKERS: &str =
    "SELECT w.worker_id, w.name, w.hostname, w.labels, w.resources, w.version, w.state,
            w.registered_at, w.last_heartbeat_at,
            (SELECT j.job_key FROM remote_jobs j
             WHERE j.worker_id = w.worker_id AND j.state IN ('assigned', 'cancelling')) AS job_key
     FROM remote_workers w ORDER BY w.registered_at, w.worker_id";

const HEARTBEAT: &str =
    "UPDATE remote_workers SET state = $2, last_heartbeat_at = $3 WHERE worker_id = $1";

const SELECT_CANCELLING_OF_WORKER: &str =
    "SELECT job_key FROM remote_jobs WHERE worker_id = $1 AND state = 'cancelling'";

/// `$1` cutoff.
const MARK_WORKERS_STALE: &str = "UPDATE remote_workers SET state = 'stale'
     WHERE state <> 'stale' AND last_heartbeat_at < $1 RETURNING worker_id";

/// `$1` now.
const LOSE_JOBS_OF_STALE: &str = "UPDATE remote_jobs SET state = 'lost', finished_at = $1,
        failure = 'worker ' || worker_id || ' stopped sending heartbeats'
     WHERE state IN ('assigned', 'cancelling')
       AND worker_id IN (SELECT worker_id FROM remote_workers WHERE state = 'stale')
     RETURNING job_key";

const DELETE_STALE: &str = "DELETE FROM remote_workers WHERE state = 'stale' RETURNING worker_id";

/// `$1` the position to read after, `$2` an optional label, `$3` the limit.
const SELECT_WORKER_EVENTS_AFTER: &str =
    "SELECT position, at, type AS kind, worker_id, job_key, run_id, label, detail
     FROM worker_events
     WHERE position > $1 AND (CAST($2 AS TEXT) IS NULL OR label = $2)
     ORDER BY position LIMIT $3";

fn to_json<T: Serialize>(value: &T, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value)
        .map_err(|e| StoreError::Corrupt(format!("{what} cannot be encoded: {e}")))
}

fn json<R: StoreRow, T: serde::de::DeserializeOwned>(
    row: &R,
    column: &str,
    what: &str,
) -> Result<T, StoreError> {
    row.json(column)
        .map_err(|e| StoreError::Corrupt(format!("{what} cannot be read: {e}")))
}

/// `text` cut to its last [`LOG_TAIL_BYTES`] bytes, on a character boundary.
pub fn log_tail(text: &str) -> &str {
    if text.len() <= LOG_TAIL_BYTES {
        return text;
    }
    let mut start = text.len() - LOG_TAIL_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn job_of<R: StoreRow>(row: &R) -> Result<RemoteJob, StoreError> {
    let job_key = row.text("job_key")?;
    let what = |column: &str| format!("{column} of job {job_key}");
    let state = row.text("state")?;
    let attempt = row.int("attempt")?;
    Ok(RemoteJob {
        run_id: row.text("run_id")?,
        label: row.text("label")?,
        attempt: u32::try_from(attempt)
            .map_err(|_| StoreError::Corrupt(format!("{}: {attempt}", what("attempt"))))?,
        spec: json(row, "spec", &what("spec"))?,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("{}: {state:?}", what("state"))))?,
        worker_id: row.opt_text("worker_id")?,
        result: json(row, "result", &what("result"))?,
        failure: row.opt_text("failure")?,
        log_tail: log_tail(&row.text("log_tail")?).to_owned(),
        enqueued_at: row.time("enqueued_at", &what("enqueued_at"))?,
        assigned_at: row.opt_time("assigned_at", &what("assigned_at"))?,
        finished_at: row.opt_time("finished_at", &what("finished_at"))?,
        job_key,
    })
}

fn worker_of<R: StoreRow>(row: &R) -> Result<Worker, StoreError> {
    let worker_id = row.text("worker_id")?;
    let what = |column: &str| format!("{column} of worker {worker_id}");
    let state = row.text("state")?;
    Ok(Worker {
        name: row.text("name")?,
        hostname: row.text("hostname")?,
        labels: json(row, "labels", &what("labels"))?,
        resources: json(row, "resources", &what("resources"))?,
        version: row.text("version")?,
        state: WorkerState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("{}: {state:?}", what("state"))))?,
        job_key: row.opt_text("job_key")?,
        registered_at: row.time("registered_at", &what("registered_at"))?,
        last_heartbeat_at: row.time("last_heartbeat_at", &what("last_heartbeat_at"))?,
        worker_id,
    })
}

fn worker_event_of<R: StoreRow>(row: &R) -> Result<WorkerEvent, StoreError> {
    let position = row.int("position")?;
    let what = |column: &str| format!("{column} of worker event {position}");
    Ok(WorkerEvent {
        position: super::i64_to_u64(position, "worker event position")?,
        kind: row.text("kind")?,
        at: row.time("at", &what("at"))?,
        worker_id: row.opt_text("worker_id")?,
        job_key: row.opt_text("job_key")?,
        run_id: row.opt_text("run_id")?,
        label: row.opt_text("label")?,
        detail: json(row, "detail", &what("detail"))?,
    })
}

fn keys<R: Columns>(rows: &[R], column: &str) -> Result<Vec<String>, StoreError> {
    rows.iter().map(|r| r.text(column)).collect()
}

fn failure_text(message: &str, exit_status: Option<&str>) -> String {
    match exit_status {
        Some(status) => format!("{message} ({status})"),
        None => message.to_owned(),
    }
}

impl<B: Backend> SqlRunStore<B> {
    async fn one_job(
        &self,
        sql: &'static str,
        args: Vec<Arg>,
        what: &str,
    ) -> Result<Option<RemoteJob>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_optional(sql, args)
            .await
            .map_err(|e| b.error(what, e))?
            .as_ref()
            .map(job_of)
            .transpose()
    }

    async fn all_jobs(
        &self,
        sql: &'static str,
        args: Vec<Arg>,
        what: &str,
    ) -> Result<Vec<RemoteJob>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_all(sql, args)
            .await
            .map_err(|e| b.error(what, e))?
            .iter()
            .map(job_of)
            .collect()
    }

    async fn exec(&self, sql: &'static str, args: Vec<Arg>, what: &str) -> Result<u64, StoreError> {
        let b = &self.0;
        b.pool()
            .execute(sql, args)
            .await
            .map_err(|e| b.error(what, e))
    }

    /// Why `job_key` does not await a report from `worker_id`.
    async fn not_awaited(
        &self,
        job_key: &str,
        worker_id: Option<&str>,
    ) -> Result<String, StoreError> {
        Ok(match self.job(job_key).await? {
            None => format!("no job {job_key}"),
            Some(job) if job.state.is_held() => format!(
                "job {job_key} is held by worker {}, not {}",
                job.worker_id.as_deref().unwrap_or("?"),
                worker_id.unwrap_or("?")
            ),
            Some(job) => format!(
                "job {job_key} is {}, not awaiting a report",
                job.state.as_str()
            ),
        })
    }
}

#[async_trait]
impl<B: Backend> JobQueue for SqlRunStore<B> {
    async fn enqueue(&self, job: &NewJob) -> Result<RemoteJob, StoreError> {
        let what = format!("enqueuing job {}", job.job_key);
        let args = vec![
            Arg::text(&job.job_key),
            Arg::text(&job.run_id),
            Arg::text(&job.label),
            Arg::Int(i64::from(job.attempt)),
            Arg::Json(to_json(&job.spec, "the job spec")?),
            Arg::Time(job.enqueued_at),
        ];
        self.exec(INSERT_JOB, args, &what).await?;
        self.job(&job.job_key)
            .await?
            .ok_or_else(|| StoreError::Conflict(format!("{what}: the row vanished")))
    }

    async fn job(&self, job_key: &str) -> Result<Option<RemoteJob>, StoreError> {
        self.one_job(
            SELECT_JOB,
            vec![Arg::text(job_key)],
            &format!("reading job {job_key}"),
        )
        .await
    }

    async fn jobs_of_run(&self, run_id: &str) -> Result<Vec<RemoteJob>, StoreError> {
        self.all_jobs(
            SELECT_JOBS_OF_RUN,
            vec![Arg::text(run_id)],
            &format!("reading the jobs of run {run_id}"),
        )
        .await
    }

    async fn queue(&self) -> Result<Vec<RemoteJob>, StoreError> {
        self.all_jobs(SELECT_QUEUE, Vec::new(), "reading the job queue")
            .await
    }

    async fn register_worker(&self, worker: &NewWorker) -> Result<Worker, StoreError> {
        let what = format!("registering worker {}", worker.worker_id);
        let args = vec![
            Arg::text(&worker.worker_id),
            Arg::text(&worker.name),
            Arg::text(&worker.hostname),
            Arg::Json(to_json(&worker.labels, "the worker's labels")?),
            Arg::Json(to_json(&worker.resources, "the worker's resources")?),
            Arg::text(&worker.version),
            Arg::Time(worker.registered_at),
        ];
        self.exec(INSERT_WORKER, args, &what).await?;
        self.worker(&worker.worker_id)
            .await?
            .ok_or_else(|| StoreError::Conflict(format!("{what}: the row vanished")))
    }

    async fn heartbeat(
        &self,
        worker_id: &str,
        state: WorkerState,
        running: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let b = &self.0;
        let what = format!("recording a heartbeat of worker {worker_id}");
        let args = vec![
            Arg::text(worker_id),
            Arg::text(state.as_str()),
            Arg::Time(at),
        ];
        if self.exec(HEARTBEAT, args, &what).await? == 0 {
            return Ok(None);
        }
        let rows = b
            .pool()
            .fetch_all(SELECT_CANCELLING_OF_WORKER, vec![Arg::text(worker_id)])
            .await
            .map_err(|e| b.error(&what, e))?;
        let mut cancel = keys(&rows, "job_key")?;
        if let Some(key) = running {
            let held = self
                .job(key)
                .await?
                .is_some_and(|j| j.state.is_held() && j.worker_id.as_deref() == Some(worker_id));
            if !held && !cancel.iter().any(|k| k == key) {
                cancel.push(key.to_owned());
            }
        }
        Ok(Some(cancel))
    }

    async fn release_unclaimed(
        &self,
        worker_id: &str,
        assigned_before: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<Vec<String>, StoreError> {
        let b = &self.0;
        let rows = b
            .pool()
            .transaction(vec![
                (
                    REQUEUE_UNCLAIMED,
                    vec![Arg::text(worker_id), Arg::Time(assigned_before)],
                ),
                (
                    FAIL_UNCLAIMED_CANCELLING,
                    vec![
                        Arg::text(worker_id),
                        Arg::Time(assigned_before),
                        Arg::Time(at),
                    ],
                ),
            ])
            .await
            .map_err(|e| {
                b.error(
                    &format!("releasing the jobs worker {worker_id} never took"),
                    e,
                )
            })?;
        let mut released = keys(&rows[0], "job_key")?;
        released.extend(keys(&rows[1], "job_key")?);
        Ok(released)
    }

    async fn deregister_worker(&self, worker_id: &str) -> Result<bool, StoreError> {
        let b = &self.0;
        let rows = b
            .pool()
            .transaction(vec![
                (REQUEUE_OF_WORKER, vec![Arg::text(worker_id)]),
                (
                    FAIL_CANCELLING_OF_WORKER,
                    vec![
                        Arg::text(worker_id),
                        Arg::text(format!("cancelled; worker {worker_id} left")),
                        Arg::Time(Utc::now()),
                    ],
                ),
                (DELETE_WORKER, vec![Arg::text(worker_id)]),
            ])
            .await
            .map_err(|e| b.error(&format!("removing worker {worker_id}"), e))?;
        Ok(rows.last().is_some_and(|deleted| !deleted.is_empty()))
    }

    async fn worker(&self, worker_id: &str) -> Result<Option<Worker>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_optional(SELECT_WORKER, vec![Arg::text(worker_id)])
            .await
            .map_err(|e| b.error(&format!("reading worker {worker_id}"), e))?
            .as_ref()
            .map(worker_of)
            .transpose()
    }

    async fn workers(&self) -> Result<Vec<Worker>, StoreError> {
        let b = &self.0;
        b.pool()
            .fetch_all(SELECT_WORKERS, Vec::new())
            .await
            .map_err(|e| b.error("listing workers", e))?
            .iter()
            .map(worker_of)
            .collect()
    }

    async fn lease(&self, worker_id: &str, at: DateTime<Utc>) -> Result<Lease, StoreError> {
        let Some(worker) = self.worker(worker_id).await? else {
            return Ok(Lease::UnknownWorker);
        };
        if let Some(job_key) = worker.job_key {
            return Ok(Lease::Busy { job_key });
        }
        if matches!(worker.state, WorkerState::Draining | WorkerState::Stale) {
            return Ok(Lease::NotTaking(worker.state));
        }
        let queued = self
            .all_jobs(SELECT_QUEUED, Vec::new(), "reading the job queue")
            .await?;
        for job in queued {
            if !worker.accepts(&job.label) || !job.spec.request.fits(&worker.resources) {
                continue;
            }
            let what = format!("assigning job {} to worker {worker_id}", job.job_key);
            let args = vec![Arg::text(&job.job_key), Arg::text(worker_id), Arg::Time(at)];
            match self.exec(ASSIGN, args, &what).await {
                // Another worker took it first: try the next one.
                Ok(0) => continue,
                Ok(_) => {
                    return self
                        .job(&job.job_key)
                        .await?
                        .map(|job| Lease::Assigned(Box::new(job)))
                        .ok_or_else(|| StoreError::Conflict(format!("{what}: the row vanished")));
                }
                // The one-job-per-worker index: a concurrent lease of this
                // worker won.
                Err(StoreError::Conflict(_)) => {
                    let job_key = self
                        .worker(worker_id)
                        .await?
                        .and_then(|w| w.job_key)
                        .unwrap_or_default();
                    return Ok(Lease::Busy { job_key });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Lease::NoneFits)
    }

    async fn report(
        &self,
        job_key: &str,
        worker_id: Option<&str>,
        report: &JobReport,
        at: DateTime<Utc>,
    ) -> Result<Reported, StoreError> {
        let worker = Arg::OptText(worker_id.map(str::to_owned));
        let what = format!("recording the report of job {job_key}");
        let applied = match report {
            JobReport::Finished(candidate) => {
                let args = vec![
                    Arg::text(job_key),
                    worker,
                    Arg::Json(to_json(candidate, "the result")?),
                    Arg::Time(at),
                ];
                let applied = self.exec(FINISH, args, &what).await?;
                if applied == 0 {
                    // A retried request carries the result already stored.
                    if let Some(job) = self.job(job_key).await? {
                        let same_worker =
                            worker_id.is_none() || job.worker_id.as_deref() == worker_id;
                        if job.state == JobState::Finished
                            && same_worker
                            && job.result.as_ref() == Some(candidate)
                        {
                            return Ok(Reported::AlreadyAccepted);
                        }
                    }
                }
                applied
            }
            JobReport::Failed {
                message,
                exit_status,
            } => {
                let args = vec![
                    Arg::text(job_key),
                    worker,
                    Arg::text(failure_text(message, exit_status.as_deref())),
                    Arg::Time(at),
                ];
                self.exec(FAIL, args, &what).await?
            }
            JobReport::Cancelled => {
                let args = vec![
                    Arg::text(job_key),
                    worker.clone(),
                    Arg::text("cancelled"),
                    Arg::Time(at),
                ];
                match self.exec(CANCELLED_WHILE_CANCELLING, args, &what).await? {
                    0 => {
                        self.exec(REQUEUE, vec![Arg::text(job_key), worker], &what)
                            .await?
                    }
                    n => n,
                }
            }
        };
        if applied == 0 {
            return Ok(Reported::NotAwaited(
                self.not_awaited(job_key, worker_id).await?,
            ));
        }
        Ok(Reported::Accepted)
    }

    async fn append_log(
        &self,
        job_key: &str,
        worker_id: &str,
        chunk: &str,
    ) -> Result<bool, StoreError> {
        let args = vec![
            Arg::text(job_key),
            Arg::text(worker_id),
            Arg::text(log_tail(chunk)),
        ];
        let applied = self
            .exec(
                B::APPEND_LOG,
                args,
                &format!("appending to the log of job {job_key}"),
            )
            .await?;
        Ok(applied == 1)
    }

    async fn cancel(
        &self,
        job_key: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<JobState>, StoreError> {
        let what = format!("cancelling job {job_key}");
        let args = vec![Arg::text(job_key), Arg::text(reason), Arg::Time(at)];
        if self.exec(CANCEL_QUEUED, args, &what).await? == 0 {
            self.exec(CANCEL_ASSIGNED, vec![Arg::text(job_key)], &what)
                .await?;
        }
        Ok(self.job(job_key).await?.map(|j| j.state))
    }

    async fn mark_stale(
        &self,
        cutoff: DateTime<Utc>,
        at: DateTime<Utc>,
    ) -> Result<StaleSweep, StoreError> {
        let b = &self.0;
        let rows = b
            .pool()
            .transaction(vec![
                (MARK_WORKERS_STALE, vec![Arg::Time(cutoff)]),
                (LOSE_JOBS_OF_STALE, vec![Arg::Time(at)]),
            ])
            .await
            .map_err(|e| b.error("marking stale workers", e))?;
        Ok(StaleSweep {
            workers: keys(&rows[0], "worker_id")?,
            lost_jobs: keys(&rows[1], "job_key")?,
        })
    }

    async fn remove_stale(&self) -> Result<Vec<String>, StoreError> {
        let b = &self.0;
        let rows = b
            .pool()
            .fetch_all(DELETE_STALE, Vec::new())
            .await
            .map_err(|e| b.error("removing stale workers", e))?;
        keys(&rows, "worker_id")
    }

    async fn worker_events_after(
        &self,
        after: u64,
        label: Option<&str>,
        limit: u32,
    ) -> Result<Vec<WorkerEvent>, StoreError> {
        let b = &self.0;
        let args = vec![
            Arg::Int(super::u64_to_i64(after, "worker event position")?),
            Arg::OptText(label.map(str::to_owned)),
            Arg::Int(i64::from(limit)),
        ];
        b.pool()
            .fetch_all(SELECT_WORKER_EVENTS_AFTER, args)
            .await
            .map_err(|e| {
                b.error(
                    &format!("reading the worker events after position {after}"),
                    e,
                )
            })?
            .iter()
            .map(worker_event_of)
            .collect()
    }
}
