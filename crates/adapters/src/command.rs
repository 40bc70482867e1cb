//! Local commands as a [`Trainer`] and as a prepare job ([`SpaceController`]).
//!
//! Protocol (BRIEF §6 "Command trainer protocol"): the trainer command runs
//! with `RETRAIN_LABEL`, `RETRAIN_RUN_ID`, `RETRAIN_ATTEMPT`,
//! `RETRAIN_DATASET_NAME`, `RETRAIN_DATASET_VERSION` and `RETRAIN_RESULT` (a
//! file path) and, under a lease, `RETRAIN_HOST`; it writes
//! `{"candidate": "<id>", "metrics": {"dice": 0.81, ...}}` to
//! `$RETRAIN_RESULT` and exits 0. Configured `env` values may contain
//! `{public_ip}` (or any other lease attribute in braces), substituted from the
//! lease, so `MLFLOW_TRACKING_URI = "http://{public_ip}:5000"` works.
//!
//! Every job runs in its own process group so that cancelling it (timeout,
//! Ctrl-C) also stops whatever it spawned, while a `kill -9` of the
//! orchestrator leaves it running: the journaled [`TrainingHandle`] carries the
//! pid, its kernel start time (to tell a reused pid apart) and the result path,
//! so a new orchestrator process can await it ([`CommandTrainer::wait`]).
//!
//! Output (stdout and stderr) goes to `<state_dir>/jobs/<run_id>-<attempt>.log`;
//! errors quote its last lines. Env values may hold secrets: they are never
//! logged, described or put in an error message (only their names are).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use retrain_core::domain::{
    Candidate, JobKey, Lease, Metrics, SpaceStage, TrainingHandle, TrainingOutcome,
};
use retrain_core::ports::{PortError, SpaceController, Trainer, TrainingRequest};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::error::AdapterError;
use crate::process::{process_alive, ProcStat};

/// `TrainingHandle::kind` of the jobs this module starts.
pub const HANDLE_KIND: &str = "command";

/// How often a job started by an earlier process is polled through `/proc`.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Time between SIGTERM and SIGKILL when stopping a job's process group.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// Lines of the job log quoted in errors.
const TAIL_LINES: usize = 20;
/// Bytes read from the end of the log to find those lines (logs can be huge).
const TAIL_BYTES: u64 = 64 * 1024;

/// Variables of the command protocol, set only by the adapter.
const PROTOCOL_VARS: [&str; 8] = [
    "RETRAIN_LABEL",
    "RETRAIN_RUN_ID",
    "RETRAIN_ATTEMPT",
    "RETRAIN_DATASET_NAME",
    "RETRAIN_DATASET_VERSION",
    "RETRAIN_RESULT",
    "RETRAIN_HOST",
    "RETRAIN_PREPARE",
];

/// A command from the configuration: `argv` (non-empty), an optional timeout,
/// extra environment variables (values may be secrets) and a working directory.
#[derive(Clone, Default)]
pub struct CommandSpec {
    pub argv: Vec<String>,
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
}

impl CommandSpec {
    /// A spec running `argv` with no timeout, extra env or working directory.
    pub fn new(argv: Vec<String>) -> Result<Self, AdapterError> {
        let spec = Self {
            argv,
            ..Self::default()
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Check the invariants the adapters rely on.
    pub fn validate(&self) -> Result<(), AdapterError> {
        match self.argv.first() {
            None => return Err(AdapterError::config("command", "must not be empty")),
            Some(program) if program.trim().is_empty() => {
                return Err(AdapterError::config(
                    "command",
                    "the program (first element) must not be empty",
                ))
            }
            Some(_) => {}
        }
        for name in self.env.keys() {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(AdapterError::config(
                    format!("env.{name}"),
                    "is not a valid environment variable name",
                ));
            }
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(AdapterError::config("timeout", "must be greater than zero"));
        }
        Ok(())
    }

    /// `argv` for humans; never the environment.
    pub fn display(&self) -> String {
        self.argv
            .iter()
            .map(|a| {
                if a.is_empty() || a.contains(char::is_whitespace) || a.contains('\'') {
                    format!("'{}'", a.replace('\'', r"'\''"))
                } else {
                    a.clone()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn program(&self) -> &str {
        self.argv.first().map(String::as_str).unwrap_or_default()
    }
}

// Hand-written so that env values (secrets) never reach a log via `{:?}`.
impl fmt::Debug for CommandSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSpec")
            .field("argv", &self.argv)
            .field("timeout", &self.timeout)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .finish()
    }
}

/// Make `dir` absolute so result/log paths stay valid when the job runs in
/// another working directory.
fn absolute(dir: PathBuf) -> PathBuf {
    if dir.is_absolute() {
        dir
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(dir),
            Err(_) => dir,
        }
    }
}

/// Keep file names derived from ids inside `jobs/` and portable.
fn file_safe(raw: &str) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_owned()
}

/// Substitute `{attribute}` of the lease into configured env values. A
/// placeholder that cannot be filled is a configuration error naming the
/// variable (not its value).
fn render_env(
    env: &BTreeMap<String, String>,
    lease: Option<&Lease>,
) -> Result<Vec<(String, String)>, PortError> {
    let mut out = Vec::with_capacity(env.len());
    for (name, value) in env {
        let mut rendered = value.clone();
        if let Some(lease) = lease {
            for (key, attr) in &lease.attributes {
                rendered = rendered.replace(&format!("{{{key}}}"), attr);
            }
        }
        if rendered.contains("{public_ip}") {
            return Err(PortError::Config(format!(
                "env var {name} refers to {{public_ip}}, but the command runs without a lease that has a public_ip"
            )));
        }
        out.push((name.clone(), rendered));
    }
    Ok(out)
}

/// Whether any non-zombie process is still in process group `pgid`.
fn group_alive(pgid: u32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .and_then(ProcStat::read)
            .is_some_and(|stat| stat.is_running() && stat.pgrp == i64::from(pgid))
    })
}

/// Send `signal` to every process of group `pgid` with the `kill` utility
/// (the workspace denies `unsafe`, so no `libc::kill`). "No such process" is
/// fine: stopping a stopped group is a success.
async fn signal_group(pgid: u32, signal: &str) {
    let result = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = result {
        warn!(pgid, signal, error = %e, "could not run `kill`");
    }
}

/// SIGTERM the group, give it [`KILL_GRACE`] to exit, then SIGKILL.
async fn stop_group(pgid: u32) {
    if !group_alive(pgid) {
        return;
    }
    signal_group(pgid, "TERM").await;
    let deadline = tokio::time::Instant::now() + KILL_GRACE;
    while tokio::time::Instant::now() < deadline {
        if !group_alive(pgid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_group(pgid, "KILL").await;
}

/// The last `n` non-empty lines of a job log (best effort: "" when unreadable).
fn log_tail(path: &Path, n: usize) -> String {
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len > TAIL_BYTES && file.seek(SeekFrom::Start(len - TAIL_BYTES)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::new();
    if file.read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// A process spawned in its own group, with its output going to `log_path`.
struct Spawned {
    child: Child,
    pid: u32,
    start_time: Option<u64>,
}

fn spawn(
    spec: &CommandSpec,
    env: Vec<(String, String)>,
    log_path: &Path,
    truncate_log: bool,
) -> Result<Spawned, PortError> {
    let log_error = |e: std::io::Error| {
        PortError::Failed(format!("cannot open job log {}: {e}", log_path.display()))
    };
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            PortError::Failed(format!(
                "cannot create job directory {}: {e}",
                dir.display()
            ))
        })?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(!truncate_log)
        .write(true)
        .truncate(truncate_log)
        .open(log_path)
        .map_err(log_error)?;
    let log_err = log.try_clone().map_err(log_error)?;

    let mut command = Command::new(spec.program());
    // Protocol variables inherited from our own environment (e.g. a retrain
    // running inside a job) must not leak into this job's protocol.
    for name in PROTOCOL_VARS {
        command.env_remove(name);
    }
    command
        .args(&spec.argv[1..])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        // Its own group: a cancel stops the job and everything it spawned,
        // and a terminal's Ctrl-C reaches the orchestrator, which decides.
        .process_group(0)
        // The job must outlive a crashed orchestrator (resume awaits it).
        .kill_on_drop(false);
    if let Some(dir) = &spec.workdir {
        command.current_dir(dir);
    }
    let child = command.spawn().map_err(|e| {
        PortError::Failed(format!("cannot start command `{}`: {e}", spec.program()))
    })?;
    let pid = child.id().ok_or_else(|| {
        PortError::Failed(format!(
            "command `{}` exited before its pid could be read",
            spec.program()
        ))
    })?;
    // The child is not reaped until we wait on it, so its /proc entry exists.
    let start_time = ProcStat::read(pid).map(|s| s.start_time);
    Ok(Spawned {
        child,
        pid,
        start_time,
    })
}

/// What a command job's [`TrainingHandle::data`] holds (journaled).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct JobHandle {
    pid: u32,
    pgid: u32,
    /// `/proc/<pid>/stat` field 22 (clock ticks after boot); `None` where
    /// `/proc` is unavailable.
    start_time: Option<u64>,
    /// Wall-clock start, so a timeout counts from the start even after a resume.
    #[serde(default)]
    started_at: Option<DateTime<Utc>>,
    result_path: PathBuf,
    log_path: PathBuf,
    argv0: String,
}

impl JobHandle {
    fn from_handle(handle: &TrainingHandle) -> Result<Self, PortError> {
        if handle.kind != HANDLE_KIND {
            return Err(PortError::InvalidResponse(format!(
                "training handle of kind `{}` was not started by a command trainer",
                handle.kind
            )));
        }
        serde_json::from_value(handle.data.clone()).map_err(|e| {
            PortError::InvalidResponse(format!("command training handle is malformed: {e}"))
        })
    }
}

/// The `RETRAIN_RESULT` file a trainer writes.
#[derive(Debug, Deserialize)]
struct ResultFile {
    candidate: serde_json::Value,
    #[serde(default)]
    metrics: Option<serde_json::Value>,
}

/// Parse a result file; the error says what is wrong (the caller names the file).
fn parse_result(bytes: &[u8]) -> Result<Candidate, String> {
    let raw: ResultFile =
        serde_json::from_slice(bytes).map_err(|e| format!("is not valid result JSON: {e}"))?;
    let id = match raw.candidate {
        serde_json::Value::String(s) if !s.trim().is_empty() => s,
        serde_json::Value::String(_) => return Err("has an empty `candidate`".into()),
        // A numeric run id is unambiguous; accept it as text.
        serde_json::Value::Number(n) => n.to_string(),
        _ => return Err("field `candidate` must be a string".into()),
    };
    let mut metrics = Metrics::new();
    match raw.metrics {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (name, value) in map {
                match value.as_f64() {
                    Some(v) if v.is_finite() => {
                        metrics.insert(name, v);
                    }
                    _ => {
                        return Err(format!(
                            "metric `{name}` must be a finite number, got {value}"
                        ))
                    }
                }
            }
        }
        Some(_) => return Err("field `metrics` must be an object of numbers".into()),
    }
    Ok(Candidate { id, metrics })
}

/// Read the result file: `Ok(None)` when it does not exist.
async fn read_result(path: &Path) -> Result<Option<Candidate>, PortError> {
    match tokio::fs::read(path).await {
        Ok(bytes) => parse_result(&bytes).map(Some).map_err(|what| {
            PortError::InvalidResponse(format!("result file {} {what}", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PortError::Failed(format!(
            "cannot read result file {}: {e}",
            path.display()
        ))),
    }
}

fn with_tail(message: String, log_path: &Path) -> String {
    let tail = log_tail(log_path, TAIL_LINES);
    if tail.is_empty() {
        format!("{message} (no output; log {})", log_path.display())
    } else {
        format!(
            "{message}; last output lines (log {}):\n{tail}",
            log_path.display()
        )
    }
}

type ChildKey = (u32, Option<u64>);

/// Runs the training command of a label (§6 command trainer protocol).
pub struct CommandTrainer {
    spec: CommandSpec,
    state_dir: PathBuf,
    /// Children started by this instance, so `wait` gets their exit status.
    /// Behind a mutex each: `Child::wait` is cancel-safe, so a `wait` dropped
    /// by the engine's timeout leaves the child here for `cancel`/another wait.
    children: std::sync::Mutex<HashMap<ChildKey, Arc<Mutex<Child>>>>,
}

impl fmt::Debug for CommandTrainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandTrainer")
            .field("spec", &self.spec)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl CommandTrainer {
    /// `state_dir` holds `jobs/<run_id>-<attempt>.{log,result.json}`; a
    /// relative path is resolved against the current directory now.
    pub fn new(spec: CommandSpec, state_dir: PathBuf) -> Result<Self, AdapterError> {
        spec.validate()?;
        Ok(Self {
            spec,
            state_dir: absolute(state_dir),
            children: std::sync::Mutex::new(HashMap::new()),
        })
    }

    fn job_path(&self, request: &TrainingRequest, suffix: &str) -> PathBuf {
        self.state_dir.join("jobs").join(format!(
            "{}-{}.{suffix}",
            file_safe(request.run_id.as_str()),
            request.attempt
        ))
    }

    fn child(&self, key: ChildKey) -> Option<Arc<Mutex<Child>>> {
        self.children
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&key)
            .cloned()
    }

    /// Wait until the job's leader exits: `Some(status)` for our own child,
    /// `None` for a process started by an earlier orchestrator (polled).
    async fn wait_exit(&self, job: &JobHandle) -> Option<ExitStatus> {
        if let Some(child) = self.child((job.pid, job.start_time)) {
            let mut child = child.lock().await;
            match child.wait().await {
                Ok(status) => return Some(status),
                Err(e) => {
                    warn!(pid = job.pid, error = %e, "waiting on the command failed; polling /proc")
                }
            }
        }
        while process_alive(job.pid, job.start_time) {
            tokio::time::sleep(POLL_EVERY).await;
        }
        None
    }

    async fn outcome(
        &self,
        job: &JobHandle,
        status: Option<ExitStatus>,
    ) -> Result<TrainingOutcome, PortError> {
        let program = &job.argv0;
        match status {
            Some(status) if !status.success() => Err(PortError::Failed(with_tail(
                format!("command `{program}` failed with {}", describe_status(status)),
                &job.log_path,
            ))),
            Some(_) => match read_result(&job.result_path).await? {
                Some(candidate) => Ok(TrainingOutcome::Finished(candidate)),
                None => Err(PortError::InvalidResponse(with_tail(
                    format!(
                        "command `{program}` exited 0 but wrote no result file {} ($RETRAIN_RESULT)",
                        job.result_path.display()
                    ),
                    &job.log_path,
                ))),
            },
            // Started by an earlier orchestrator: its exit status is gone
            // with it, so the result file is the only evidence.
            None => match read_result(&job.result_path).await? {
                Some(candidate) => Ok(TrainingOutcome::Finished(candidate)),
                None => {
                    let last = log_tail(&job.log_path, 1);
                    Ok(TrainingOutcome::Lost {
                        reason: format!(
                            "command `{program}` (pid {}) is gone without writing {}{}",
                            job.pid,
                            job.result_path.display(),
                            if last.is_empty() {
                                String::new()
                            } else {
                                format!("; last output: {last}")
                            }
                        ),
                    })
                }
            },
        }
    }
}

#[async_trait]
impl Trainer for CommandTrainer {
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        let result_path = self.job_path(request, "result.json");
        let log_path = self.job_path(request, "log");
        // A stale result of an earlier attempt must never pass for this one.
        match std::fs::remove_file(&result_path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(PortError::Failed(format!(
                    "cannot remove stale result file {}: {e}",
                    result_path.display()
                )))
            }
        }
        let mut env = render_env(&self.spec.env, request.lease.as_ref())?;
        if let Some(ip) = request
            .lease
            .as_ref()
            .and_then(|l| l.attributes.get("public_ip"))
        {
            env.push(("RETRAIN_HOST".into(), ip.clone()));
        }
        // Protocol variables last: they win over same-named configured ones.
        env.extend([
            ("RETRAIN_LABEL".to_owned(), request.label.to_string()),
            ("RETRAIN_RUN_ID".to_owned(), request.run_id.to_string()),
            ("RETRAIN_ATTEMPT".to_owned(), request.attempt.to_string()),
            (
                "RETRAIN_DATASET_NAME".to_owned(),
                request.dataset_name.clone(),
            ),
            (
                "RETRAIN_DATASET_VERSION".to_owned(),
                request.dataset_version.to_string(),
            ),
            (
                "RETRAIN_RESULT".to_owned(),
                result_path.to_string_lossy().into_owned(),
            ),
        ]);
        let spawned = spawn(&self.spec, env, &log_path, false)?;
        info!(
            pid = spawned.pid,
            command = %self.spec.display(),
            log = %log_path.display(),
            "training command started"
        );
        let job = JobHandle {
            pid: spawned.pid,
            pgid: spawned.pid,
            start_time: spawned.start_time,
            started_at: Some(Utc::now()),
            result_path,
            log_path,
            argv0: self.spec.program().to_owned(),
        };
        self.children
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                (spawned.pid, spawned.start_time),
                Arc::new(Mutex::new(spawned.child)),
            );
        let data = serde_json::to_value(&job).map_err(|e| {
            PortError::Failed(format!("cannot encode the command training handle: {e}"))
        })?;
        Ok(TrainingHandle {
            kind: HANDLE_KIND.into(),
            data,
        })
    }

    async fn wait(
        &self,
        _request: &TrainingRequest,
        handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        let job = JobHandle::from_handle(handle)?;
        let Some(timeout) = self.spec.timeout else {
            let status = self.wait_exit(&job).await;
            return self.outcome(&job, status).await;
        };
        // Count from the job's start, so a resumed wait keeps the budget.
        let elapsed = job
            .started_at
            .and_then(|t| (Utc::now() - t).to_std().ok())
            .unwrap_or_default();
        let remaining = timeout.saturating_sub(elapsed);
        match tokio::time::timeout(remaining, self.wait_exit(&job)).await {
            Ok(status) => self.outcome(&job, status).await,
            Err(_) => {
                warn!(
                    pid = job.pid,
                    "training command timed out; stopping its process group"
                );
                self.cancel(handle).await?;
                Err(PortError::Failed(with_tail(
                    format!(
                        "command `{}` timed out after {}s",
                        job.argv0,
                        timeout.as_secs_f64()
                    ),
                    &job.log_path,
                )))
            }
        }
    }

    async fn cancel(&self, handle: &TrainingHandle) -> Result<(), PortError> {
        let job = JobHandle::from_handle(handle)?;
        // A live leader with another start time means the pid was reused,
        // which the kernel only does once our whole group is gone.
        if let Some(stat) = ProcStat::read(job.pid) {
            if job.start_time.is_some_and(|t| t != stat.start_time) {
                debug!(pid = job.pid, "pid reused: the command job is long gone");
                return Ok(());
            }
        }
        stop_group(job.pgid).await;
        // Reap our own child so it does not linger as a zombie.
        if let Some(child) = self.child((job.pid, job.start_time)) {
            if let Ok(mut child) = child.try_lock() {
                let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("command: {}", self.spec.display())
    }
}

/// The prepare job started by [`CommandSpace::restart`].
struct PrepareJob {
    child: Child,
    pid: u32,
    started: tokio::time::Instant,
    log_path: PathBuf,
    /// Set once the job has been observed to exit (or was timed out).
    finished: Option<SpaceStage>,
}

/// Runs a local dataset-preparation command as the label's "Space".
pub struct CommandSpace {
    spec: CommandSpec,
    state_dir: PathBuf,
    job: Mutex<Option<PrepareJob>>,
}

impl fmt::Debug for CommandSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandSpace")
            .field("spec", &self.spec)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl CommandSpace {
    pub fn new(spec: CommandSpec, state_dir: PathBuf) -> Result<Self, AdapterError> {
        spec.validate()?;
        Ok(Self {
            spec,
            state_dir: absolute(state_dir),
            job: Mutex::new(None),
        })
    }

    /// One log per distinct command (truncated on restart), so several
    /// prepare commands can share a state directory.
    fn log_path(&self) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.spec.argv.join("\0").as_bytes());
        let short = hex::encode(&digest[..6]);
        self.state_dir
            .join("jobs")
            .join(format!("prepare-{short}.log"))
    }

    fn failed_stage(&self, what: String, log_path: &Path) -> SpaceStage {
        let last = log_tail(log_path, 1);
        if last.is_empty() {
            SpaceStage::Error(format!("COMMAND_FAILED: {what}"))
        } else {
            SpaceStage::Error(format!("COMMAND_FAILED: {what}: {last}"))
        }
    }
}

#[async_trait]
impl SpaceController for CommandSpace {
    async fn restart(&self, _intent: &JobKey) -> Result<(), PortError> {
        let mut slot = self.job.lock().await;
        if let Some(mut previous) = slot.take() {
            // Only signal the group while the leader is unreaped: until then
            // its pid (= the pgid) cannot have been reused by someone else.
            if matches!(previous.child.try_wait(), Ok(None)) {
                info!(pid = previous.pid, "stopping the previous prepare command");
                stop_group(previous.pid).await;
                let _ = tokio::time::timeout(Duration::from_secs(1), previous.child.wait()).await;
            }
        }
        let mut env = render_env(&self.spec.env, None)?;
        env.push(("RETRAIN_PREPARE".into(), "1".into()));
        let log_path = self.log_path();
        let spawned = spawn(&self.spec, env, &log_path, true)?;
        info!(
            pid = spawned.pid,
            command = %self.spec.display(),
            log = %log_path.display(),
            "prepare command started"
        );
        *slot = Some(PrepareJob {
            child: spawned.child,
            pid: spawned.pid,
            started: tokio::time::Instant::now(),
            log_path,
            finished: None,
        });
        Ok(())
    }

    async fn stage(&self) -> Result<SpaceStage, PortError> {
        let mut slot = self.job.lock().await;
        let Some(job) = slot.as_mut() else {
            return Ok(SpaceStage::Unknown("NOT_STARTED".into()));
        };
        if let Some(stage) = &job.finished {
            return Ok(stage.clone());
        }
        let stage = match job.child.try_wait() {
            Ok(None) => {
                let timed_out = self.spec.timeout.filter(|t| job.started.elapsed() >= *t);
                match timed_out {
                    None => return Ok(SpaceStage::Running),
                    Some(t) => {
                        warn!(
                            pid = job.pid,
                            "prepare command timed out; stopping its process group"
                        );
                        stop_group(job.pid).await;
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), job.child.wait()).await;
                        self.failed_stage(
                            format!("timed out after {}s", t.as_secs_f64()),
                            &job.log_path,
                        )
                    }
                }
            }
            Ok(Some(status)) if status.success() => SpaceStage::Stopped,
            Ok(Some(status)) => self.failed_stage(describe_status(status), &job.log_path),
            Err(e) => {
                return Err(PortError::Failed(format!(
                    "cannot query prepare command `{}` (pid {}): {e}",
                    self.spec.program(),
                    job.pid
                )))
            }
        };
        job.finished = Some(stage.clone());
        Ok(stage)
    }

    fn describe(&self) -> String {
        format!("command: {}", self.spec.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_files_are_validated() {
        let ok = parse_result(br#"{"candidate":"run-1","metrics":{"dice":0.81,"iou":1},"x":true}"#)
            .unwrap();
        assert_eq!(ok.id, "run-1");
        assert_eq!(ok.metrics["iou"], 1.0);
        let err = parse_result(br#"{"candidate":"r","metrics":{"dice":null}}"#).unwrap_err();
        assert!(err.contains("`dice`"), "{err}");
        let err = parse_result(br#"{"candidate":"r","metrics":{"dice":"0.8"}}"#).unwrap_err();
        assert!(err.contains("`dice`"), "{err}");
        assert!(parse_result(br#"{"metrics":{}}"#).is_err());
        assert!(parse_result(b"nope").is_err());
    }

    #[test]
    fn env_placeholders_need_a_lease() {
        let env = BTreeMap::from([(
            "MLFLOW_TRACKING_URI".to_owned(),
            "http://{public_ip}:5000".to_owned(),
        )]);
        let err = render_env(&env, None).unwrap_err().to_string();
        assert!(
            err.contains("MLFLOW_TRACKING_URI") && !err.contains("5000"),
            "{err}"
        );
    }

    #[test]
    fn debug_and_describe_hide_env_values() {
        let mut spec = CommandSpec::new(vec!["python".into(), "train.py".into()]).unwrap();
        spec.env.insert("TOKEN".into(), "s3cret".into());
        assert!(!format!("{spec:?}").contains("s3cret"));
        let trainer = CommandTrainer::new(spec, PathBuf::from("/tmp")).unwrap();
        assert_eq!(trainer.describe(), "command: python train.py");
        assert!(!format!("{trainer:?}").contains("s3cret"));
        assert!(CommandSpec::new(vec![]).is_err());
    }
}
