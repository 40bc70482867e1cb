//! `retrain worker`: the pull-based worker agent (docs/workers.md).
//!
//! The agent needs only outbound HTTP(S) to `retrain-server`. It registers
//! with its resources, heartbeats every `heartbeat_interval_secs` (its state
//! and the job it runs; the answer names jobs to kill), long-polls for one
//! job at a time, runs it with the local [`CommandTrainer`](crate::command::CommandTrainer)
//! (same §6 protocol as `trainer = { command = ... }`), streams its output,
//! reports its end and uploads what it left in `$RETRAIN_ARTIFACTS_DIR`.
//!
//! **Recovery.** Transport failures are retried with capped backoff (the
//! agent outlives a server restart; a result is retried for 15 minutes).
//! `404 worker_not_found` (the server forgot or removed us) → register
//! again. A lease whose answer was lost may have assigned a job we never
//! saw: the server then answers `409 worker_busy` while we are idle, and the
//! agent deregisters (which re-queues that job without using an attempt)
//! and registers afresh.
//!
//! **Draining** (the cancellation token given to [`WorkerAgent::run`],
//! SIGTERM/SIGINT in the CLI): no new lease; the running job finishes, or
//! after `drain_timeout` is killed and reported `cancelled` (re-queued, no
//! attempt used); then the worker deregisters. A second signal (the `force`
//! token of [`WorkerAgent::run_until`]) stops the job at once.
//!
//! **Leftovers.** A job runs in its own process group, so it outlives an
//! agent killed with `kill -9`. The agent locks its work directory and, at
//! start, stops the jobs recorded there (their state files name the
//! process group) before it registers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use retrain_core::CancellationToken;
use secrecy::SecretString;
use tracing::{error, info, warn};

use crate::http::HttpPolicy;
use crate::scrub::Scrubber;

pub mod client;
pub mod job;
pub mod resources;

pub use client::{Job, LeaseAnswer, Registered, Registration, ServerClient, WorkerState};
pub use job::{artifact_files, is_artifact_name, ArtifactScan, JobEnd, ARTIFACTS_DIR_VAR};
pub use resources::{ResourceOverrides, Resources};

/// The environment variable holding the worker's token (scope `worker`).
pub const TOKEN_VAR: &str = "RETRAIN_WORKER_TOKEN";
/// Default long-poll wait of a lease request (the server's default).
pub const DEFAULT_LEASE_WAIT_SECS: u32 = 25;
/// Longest pause between retries of a failing lease or registration.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Why the agent (or one of its requests) failed. Never holds the token.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad flags or environment; nothing was sent.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached or did not answer in time.
    #[error("{0}")]
    Transport(String),
    /// The server answered with an error.
    #[error("{what}: HTTP {status}{}: {message}", if code.is_empty() { String::new() } else { format!(" {code}") })]
    Api {
        what: String,
        status: u16,
        code: String,
        message: String,
    },
    /// The server's answer does not follow the contract.
    #[error("{0}")]
    Protocol(String),
    /// A local file of a job could not be read.
    #[error("{0}")]
    Job(String),
    /// Another agent holds the lock of `--work-dir`.
    #[error(
        "another retrain worker uses the work directory {0} (--work-dir); give each worker its own"
    )]
    WorkDirInUse(String),
}

impl AgentError {
    /// Whether the server answered `status`.
    pub fn is_status(&self, expected: u16) -> bool {
        matches!(self, Self::Api { status, .. } if *status == expected)
    }

    /// Whether the server answered `status` with error code `code`.
    pub fn is_api(&self, expected: u16, expected_code: &str) -> bool {
        matches!(self, Self::Api { status, code, .. } if *status == expected && code == expected_code)
    }

    /// Worth trying again later: unreachable, timed out, or a server error.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Transport(_) => true,
            Self::Api { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => false,
        }
    }

    /// The token is wrong or lacks scope `worker`: retrying cannot help.
    fn is_denied(&self) -> bool {
        self.is_status(401) || self.is_status(403)
    }
}

/// Everything the agent needs; see `retrain worker --help`.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The server's base URL.
    pub server: String,
    pub token: SecretString,
    pub name: String,
    pub hostname: String,
    /// Labels whose jobs this worker accepts (empty: any).
    pub labels: Vec<String>,
    pub resources: Resources,
    /// Per-job directories (state, log, artifacts) live under `jobs/` here.
    pub work_dir: PathBuf,
    pub drain_timeout: Duration,
    pub lease_wait_secs: u32,
    pub http: HttpPolicy,
    /// Variables of this process the jobs must not inherit (the token's).
    pub hidden_env: Vec<String>,
}

/// What the heartbeat reports and the lease loop updates.
#[derive(Debug, Default)]
struct Shared {
    worker_id: Option<String>,
    heartbeat_every: Duration,
    /// The running job's key and the token that kills it.
    job: Option<(String, CancellationToken)>,
}

/// The agent's connection to the server: who it is registered as, and what
/// it runs. Shared by the lease loop, the heartbeat and the running job.
#[derive(Debug)]
pub(crate) struct Session {
    client: ServerClient,
    registration: Registration,
    shared: Mutex<Shared>,
    /// One registration at a time (the heartbeat and the lease loop may
    /// both find the worker unknown).
    registering: tokio::sync::Mutex<()>,
    draining: CancellationToken,
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn worker_id(&self) -> Option<String> {
        self.lock().worker_id.clone()
    }

    fn state(&self) -> (WorkerState, Option<String>) {
        let shared = self.lock();
        let key = shared.job.as_ref().map(|(key, _)| key.clone());
        let state = if self.draining.is_cancelled() {
            WorkerState::Draining
        } else if key.is_some() {
            WorkerState::Running
        } else {
            WorkerState::Idle
        };
        (state, key)
    }

    /// Kill the running job if the server named it.
    fn cancel_jobs(&self, keys: &[String]) {
        let shared = self.lock();
        for key in keys {
            match &shared.job {
                Some((running, cancel)) if running == key => {
                    warn!(job_key = %key, "the server asks for the running job to be killed");
                    cancel.cancel();
                }
                _ => {
                    warn!(job_key = %key, "the server asks to kill a job this worker does not run; ignored")
                }
            }
        }
    }

    /// Forget `stale` as our id (unknown to the server) so the next
    /// [`Session::registered`] registers again.
    fn forget(&self, stale: &str) {
        let mut shared = self.lock();
        if shared.worker_id.as_deref() == Some(stale) {
            shared.worker_id = None;
        }
    }

    /// Our worker id, registering first when we have none. Transport
    /// failures are retried with backoff until `give_up` fires (`None`
    /// then); a refused token is an error.
    async fn registered(&self, give_up: &CancellationToken) -> Result<Option<String>, AgentError> {
        let _one = self.registering.lock().await;
        if let Some(id) = self.worker_id() {
            return Ok(Some(id));
        }
        let mut failures = 0;
        loop {
            match self.client.register(&self.registration).await {
                Ok(registered) => {
                    info!(
                        worker_id = %registered.worker_id,
                        heartbeat_interval_secs = registered.heartbeat_interval_secs,
                        worker_ttl_secs = registered.worker_ttl_secs,
                        "registered with the server"
                    );
                    let mut shared = self.lock();
                    shared.worker_id = Some(registered.worker_id.clone());
                    shared.heartbeat_every =
                        Duration::from_secs(registered.heartbeat_interval_secs.max(1));
                    return Ok(Some(registered.worker_id));
                }
                Err(e) if e.is_retryable() => {
                    let delay = backoff(failures);
                    failures += 1;
                    warn!(error = %e, retry_in_secs = delay.as_secs(), "registration failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = give_up.cancelled() => return Ok(None),
                    }
                }
                Err(e) => {
                    return Err(if e.is_denied() {
                        AgentError::Config(format!(
                            "{e} (is {TOKEN_VAR} a server token with scope `worker`?)"
                        ))
                    } else {
                        e
                    })
                }
            }
        }
    }
}

/// 1 s, 2 s, 4 s … capped at [`MAX_BACKOFF`].
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(5)).min(MAX_BACKOFF)
}

/// The worker agent.
#[derive(Debug)]
pub struct WorkerAgent {
    config: AgentConfig,
    client: ServerClient,
}

impl WorkerAgent {
    /// Validate the configuration (nothing is sent yet).
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        if config.name.trim().is_empty() {
            return Err(AgentError::Config("--name must not be empty".into()));
        }
        if let Some(bad) = config
            .labels
            .iter()
            .find(|l| retrain_core::domain::Label::new(l.as_str()).is_err())
        {
            return Err(AgentError::Config(format!(
                "--labels: {bad:?} is not a label name ([a-z0-9_-], 1-64 characters)"
            )));
        }
        if config.lease_wait_secs == 0 || config.lease_wait_secs > 60 {
            return Err(AgentError::Config(
                "the lease wait must be between 1 and 60 seconds".into(),
            ));
        }
        let client = ServerClient::new(&config.server, config.token.clone(), config.http.clone())?;
        Ok(Self { config, client })
    }

    /// Serve until `drain` fires and the running job (if any) is done,
    /// then deregister. `Err` only for what retrying cannot fix (a refused
    /// token, a bad server URL, a work directory in use).
    pub async fn run(self, drain: CancellationToken) -> Result<(), AgentError> {
        self.run_until(drain, CancellationToken::new()).await
    }

    /// [`WorkerAgent::run`], and when `force` fires (a second signal while
    /// draining) stop now: the running job's process group is stopped, the
    /// job reported `cancelled` if the server answers within
    /// [`FORCED_REQUEST_WAIT`], the worker deregistered likewise.
    pub async fn run_until(
        self,
        drain: CancellationToken,
        force: CancellationToken,
    ) -> Result<(), AgentError> {
        let Self { config, client } = self;
        // A forced stop drains too (no new lease) when it comes first.
        let draining = force.child_token();
        let _relay = AbortOnDrop(tokio::spawn({
            let draining = draining.clone();
            async move {
                drain.cancelled().await;
                draining.cancel();
            }
        }));
        let drain = draining;
        std::fs::create_dir_all(config.work_dir.join("jobs")).map_err(|e| {
            AgentError::Config(format!(
                "cannot create the work directory {}: {e}",
                config.work_dir.display()
            ))
        })?;
        // Held until we return: the leftover jobs below are ours to stop
        // only if no other agent works in this directory.
        let _lock = lock_work_dir(&config.work_dir)?;
        stop_leftover_jobs(&config.work_dir.join("jobs")).await;
        let session = Arc::new(Session {
            client,
            registration: Registration {
                name: config.name.clone(),
                hostname: config.hostname.clone(),
                labels: config.labels.clone(),
                resources: config.resources.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            shared: Mutex::new(Shared::default()),
            registering: tokio::sync::Mutex::new(()),
            draining: drain.clone(),
        });
        // Fail fast on a refused token before anything else starts.
        if session.registered(&drain).await?.is_none() {
            return Ok(());
        }
        let stopped = CancellationToken::new();
        let heartbeat = tokio::spawn(heartbeat_loop(session.clone(), stopped.clone()));
        let runner = job::JobRunner {
            session: session.clone(),
            work_dir: config.work_dir.clone(),
            scrubber: Scrubber::new([config.token.clone()]),
            hidden_env: config.hidden_env.clone(),
            drain_timeout: config.drain_timeout,
            force: force.clone(),
        };
        let served = lease_loop(&session, &runner, config.lease_wait_secs, &drain).await;
        stopped.cancel();
        let _ = heartbeat.await;
        if let Some(id) = session.worker_id() {
            let deregistered = tokio::select! {
                done = session.client.deregister(&id) => Some(done),
                _ = forced_wait(&force) => None,
            };
            match deregistered {
                Some(Ok(())) => info!(worker_id = %id, "deregistered"),
                Some(Err(e)) if e.is_status(404) => {
                    info!(worker_id = %id, "already unknown to the server")
                }
                Some(Err(e)) => {
                    warn!(worker_id = %id, error = %e, "deregistration failed; the server will mark this worker stale")
                }
                None => {
                    warn!(worker_id = %id, "stopping without deregistering; the server will mark this worker stale")
                }
            }
        }
        served
    }
}

/// A task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a request may still take once a forced stop was asked for.
pub const FORCED_REQUEST_WAIT: Duration = Duration::from_secs(5);

/// Completes [`FORCED_REQUEST_WAIT`] after `force` fired (never before).
pub(crate) async fn forced_wait(force: &CancellationToken) {
    force.cancelled().await;
    tokio::time::sleep(FORCED_REQUEST_WAIT).await;
}

/// The name of the lock file in the work directory.
const LOCK_FILE: &str = "agent.lock";

/// Lock `work_dir` for this agent (an advisory lock the kernel drops when
/// the process dies, however it dies), or say which directory is in use.
fn lock_work_dir(work_dir: &std::path::Path) -> Result<std::fs::File, AgentError> {
    let path = work_dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| AgentError::Config(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(AgentError::WorkDirInUse(work_dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(AgentError::Config(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// Stop the jobs an earlier agent in this work directory left running
/// (killed with `kill -9`, or crashed: a job runs in its own process group
/// and outlives the agent), and remove their directories. Nothing will
/// report them: the server declared them lost once the old agent stopped
/// heartbeating, and re-queued them.
async fn stop_leftover_jobs(jobs_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(jobs_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        for key in crate::command::stop_recorded_jobs(&dir.join("state")).await {
            warn!(job_key = %key, "stopped a job an earlier agent left running; the server re-queued it");
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(dir = %dir.display(), error = %e, "could not remove a leftover job directory");
        }
    }
}

/// Lease and run jobs until draining.
async fn lease_loop(
    session: &Arc<Session>,
    runner: &job::JobRunner,
    wait_secs: u32,
    drain: &CancellationToken,
) -> Result<(), AgentError> {
    let mut failures = 0;
    while !drain.is_cancelled() {
        let Some(id) = session.registered(drain).await? else {
            break;
        };
        let answer = tokio::select! {
            answer = session.client.lease(&id, wait_secs) => answer,
            // Dropping the poll may lose a job assigned at that instant; the
            // deregistration that follows hands it back.
            _ = drain.cancelled() => break,
        };
        match answer {
            Ok(LeaseAnswer::Job(job)) => {
                failures = 0;
                let cancel = CancellationToken::new();
                session.lock().job = Some((job.job_key.clone(), cancel.clone()));
                runner.run(*job, cancel, drain).await;
                session.lock().job = None;
            }
            Ok(LeaseAnswer::NoJob) => failures = 0,
            Err(e) if e.is_api(404, "worker_not_found") => {
                warn!(worker_id = %id, "the server does not know this worker; registering again");
                session.forget(&id);
            }
            Err(e) if e.is_api(409, "worker_busy") => {
                // A job was assigned to us by a lease whose answer we lost.
                warn!(worker_id = %id, "the server holds a job for this worker that it never received; handing it back and registering afresh");
                if let Err(e) = session.client.deregister(&id).await {
                    warn!(error = %e, "deregistration failed");
                }
                session.forget(&id);
            }
            Err(e) if e.is_denied() => {
                return Err(AgentError::Config(format!(
                    "{e} (is {TOKEN_VAR} a server token with scope `worker`?)"
                )))
            }
            Err(e) => {
                let delay = backoff(failures);
                failures += 1;
                if e.is_retryable() {
                    warn!(error = %e, retry_in_secs = delay.as_secs(), "lease request failed; retrying");
                } else {
                    error!(error = %e, retry_in_secs = delay.as_secs(), "lease request refused; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = drain.cancelled() => break,
                }
            }
        }
    }
    Ok(())
}

/// Heartbeat every `heartbeat_interval_secs` until `stopped`.
async fn heartbeat_loop(session: Arc<Session>, stopped: CancellationToken) {
    loop {
        let every = session
            .lock()
            .heartbeat_every
            .max(Duration::from_millis(100));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.cancelled() => return,
        }
        let Some(id) = session.worker_id() else {
            continue;
        };
        let (state, job_key) = session.state();
        let sent = tokio::select! {
            sent = session.client.heartbeat(&id, state, job_key.as_deref()) => sent,
            _ = stopped.cancelled() => return,
        };
        match sent {
            Ok(cancel) => session.cancel_jobs(&cancel),
            Err(e) if e.is_api(404, "worker_not_found") => {
                warn!(worker_id = %id, "the server does not know this worker; registering again");
                session.forget(&id);
                if let Err(e) = session.registered(&stopped).await {
                    error!(error = %e, "registering again failed");
                }
            }
            Err(e) => warn!(worker_id = %id, error = %e, "heartbeat failed"),
        }
    }
}
