//! Local commands as a [`Trainer`], as a prepare job ([`SpaceController`])
//! and as a dataset check (`check.rs`).
//!
//! Protocol (BRIEF §6 "Command trainer protocol"): the trainer command runs
//! with `RETRAIN_LABEL`, `RETRAIN_RUN_ID`, `RETRAIN_ATTEMPT`,
//! `RETRAIN_JOB_KEY`, `RETRAIN_DATASET_NAME`, `RETRAIN_DATASET_VERSION` and
//! `RETRAIN_RESULT` (a file path) and, under a lease, `RETRAIN_HOST`; it
//! writes `{"candidate": "<id>", "metrics": {"dice": 0.81, ...}}` to
//! `$RETRAIN_RESULT` and exits 0 (Python's bare `NaN`/`Infinity` are read as
//! such; see [`result`]). Configured `env` values may contain `{public_ip}`
//! (or any other lease attribute in braces), substituted from the lease, so
//! `MLFLOW_TRACKING_URI = "http://{public_ip}:5000"` works.
//!
//! **Idempotent for the job key.** Each job has a record
//! `<state_dir>/jobs/<key>.job.json` (trainer: the key's file stem; prepare
//! job: one record per command, holding the intent it last ran for). A start
//! whose key already has a record adopts that job — running, finished with a
//! result, or gone without one (then `wait` reports it `Lost`) — and never
//! spawns a second process for the key. The record is written twice, each
//! time atomically: a *claim* before the spawn and the pid + kernel start time
//! right after it. **Crash window:** an orchestrator killed between the spawn
//! and the second write leaves a claim without a pid; the next start then
//! looks for the job by its environment (`/proc/<pid>/environ` holds
//! `RETRAIN_RESULT=<path>` / `RETRAIN_JOB_KEY=<key>`) and adopts it, or, if it
//! already exited, adopts its result file. Only a job that died inside that
//! window *without* a result cannot be told from one never started, and is
//! started (once more).
//!
//! **Process groups.** Every job runs in its own process group so that
//! cancelling it (timeout, Ctrl-C) also stops whatever it spawned, while a
//! `kill -9` of the orchestrator leaves it running: the journaled
//! [`TrainingHandle`] carries the pid, its kernel start time (to tell a reused
//! pid apart) and the result path, so a new orchestrator process can await it
//! ([`CommandTrainer::wait`]). When the main process exits, the rest of its
//! group (background children it left) is terminated — SIGTERM, then SIGKILL
//! after a short grace — so no orphan keeps running. Signals go through
//! `killpg` (`nix`), never `/bin/kill`, and only to a group proven to be the
//! job's ([`process`]). A child that leaves the group (`setsid`) escapes this.
//!
//! **Output.** stdout and stderr go to `<state_dir>/jobs/<key>.log`; errors
//! quote its last lines after the [`Scrubber`] replaced every secret value by
//! `***`. Env values may hold secrets: they are never logged, described or
//! put in an error message (only their names are).

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
use retrain_core::domain::{Candidate, JobKey, Lease, SpaceStage, TrainingHandle, TrainingOutcome};
use retrain_core::ports::{PortError, SpaceController, Trainer, TrainingRequest};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::error::AdapterError;
use crate::scrub::Scrubber;

mod check;
mod process;
pub(crate) mod result;

pub use check::CommandDatasetCheck;

/// Parse a §6 result (`{"candidate": …, "metrics": {…}}`) as the
/// `$RETRAIN_RESULT` file is parsed, for results that arrive another way
/// (`POST /v1/runs/{id}/results`); the error names the field.
pub fn parse_result_json(bytes: &[u8]) -> Result<retrain_core::domain::Candidate, String> {
    result::parse_result(bytes)
}

/// `bytes` (JSON text) with Python's bare `NaN`/`Infinity`/`-Infinity`
/// value tokens made strings, so a lenient reader can see the document's
/// other fields; `None` when it has none. The values themselves are read by
/// [`parse_result_json`] on the original bytes.
pub fn quote_non_finite(bytes: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let nonce = uuid::Uuid::now_v7().simple().to_string();
    result::rewrite_non_finite(text, &nonce).map(String::into_bytes)
}

use process::{
    find_job, process_alive, read_record, stop_group, stop_job, stop_orphans, write_record,
    JobRecord,
};

/// `TrainingHandle::kind` of the jobs this module starts.
pub const HANDLE_KIND: &str = "command";

/// How often a job started by an earlier process is polled through `/proc`.
const POLL_EVERY: Duration = Duration::from_millis(500);
/// Lines of the job log quoted in errors.
const TAIL_LINES: usize = 20;
/// Bytes read from the end of the log to find those lines (logs can be huge).
const TAIL_BYTES: u64 = 64 * 1024;

/// Variables of the command protocol, set only by the adapter.
const PROTOCOL_VARS: [&str; 9] = [
    "RETRAIN_LABEL",
    "RETRAIN_RUN_ID",
    "RETRAIN_ATTEMPT",
    "RETRAIN_JOB_KEY",
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

/// The file stem of a job key, safe inside `jobs/` (no leading dots).
fn key_stem(key: &JobKey) -> String {
    let stem = file_safe(&key.file_stem());
    if stem.is_empty() {
        "job".to_owned()
    } else {
        stem
    }
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

/// `message` followed by the scrubbed tail of the job log.
fn with_tail(message: String, log_path: &Path, scrubber: &Scrubber) -> String {
    let tail = log_tail(log_path, TAIL_LINES);
    let text = if tail.is_empty() {
        format!("{message} (no output; log {})", log_path.display())
    } else {
        format!(
            "{message}; last output lines (log {}):\n{tail}",
            log_path.display()
        )
    };
    scrubber.scrub(&text)
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
    hidden_env: &[String],
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
    for name in hidden_env {
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
    let start_time = process::ProcStat::read(pid).map(|s| s.start_time);
    Ok(Spawned {
        child,
        pid,
        start_time,
    })
}

/// What a command job's [`TrainingHandle::data`] holds (journaled), and the
/// `job` of its [`JobRecord`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct JobHandle {
    /// The group leader; 0 when a job adopted from a crash window had
    /// already exited (its result file is then all that is left).
    pid: u32,
    pgid: u32,
    /// `/proc/<pid>/stat` field 22 (clock ticks after boot); `None` where
    /// `/proc` is unavailable.
    start_time: Option<u64>,
    /// Wall-clock start, so a timeout counts from the start even after a resume.
    #[serde(default)]
    started_at: Option<DateTime<Utc>>,
    /// Empty for prepare jobs (they write no result).
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

    fn to_handle(&self) -> Result<TrainingHandle, PortError> {
        let data = serde_json::to_value(self).map_err(|e| {
            PortError::Failed(format!("cannot encode the command training handle: {e}"))
        })?;
        Ok(TrainingHandle {
            kind: HANDLE_KIND.into(),
            data,
        })
    }

    /// The environment entry every process of a trainer job carries.
    fn trainer_marker(&self) -> String {
        format!("RETRAIN_RESULT={}", self.result_path.to_string_lossy())
    }
}

/// The environment entry every process of a prepare job for `intent` carries.
fn prepare_marker(intent: &str) -> String {
    format!("RETRAIN_JOB_KEY={intent}")
}

/// Remove `path` if it exists.
fn remove_if_exists(path: &Path, what: &str) -> Result<(), PortError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PortError::Failed(format!(
            "cannot remove {what} {}: {e}",
            path.display()
        ))),
    }
}

/// Whether anything exists at `path` (a file, a link, a FIFO...).
fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

type ChildKey = (u32, Option<u64>);

/// Runs the training command of a label (§6 command trainer protocol).
pub struct CommandTrainer {
    spec: CommandSpec,
    state_dir: PathBuf,
    scrubber: Scrubber,
    /// Children started by this instance, so `wait` gets their exit status.
    /// Behind a mutex each: `Child::wait` is cancel-safe, so a `wait` dropped
    /// by the engine's timeout leaves the child here for `cancel`/another wait.
    children: std::sync::Mutex<HashMap<ChildKey, Arc<Mutex<Child>>>>,
    /// Serialises `start`s of this instance (record check, claim, spawn).
    starting: Mutex<()>,
    /// How the jobs this instance waited for ended (`exit status 0`), for
    /// [`Trainer::job_exit`].
    exits: std::sync::Mutex<HashMap<ChildKey, String>>,
    /// Variables of this process's environment the job must not inherit.
    hidden_env: Vec<String>,
}

impl fmt::Debug for CommandTrainer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandTrainer")
            .field("spec", &self.spec)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// The files of one trainer job.
struct TrainerPaths {
    record: PathBuf,
    result: PathBuf,
    log: PathBuf,
}

impl CommandTrainer {
    /// `state_dir` holds `jobs/<key>.{job.json,log,result.json}`; a relative
    /// path is resolved against the current directory now. Output quoted in
    /// errors is scrubbed of the secret-named variables of this process and
    /// of `spec.env` (see [`CommandTrainer::with_scrubber`] for more).
    pub fn new(spec: CommandSpec, state_dir: PathBuf) -> Result<Self, AdapterError> {
        spec.validate()?;
        let scrubber = Scrubber::new([]).with_env(spec.env.clone());
        Ok(Self {
            spec,
            state_dir: absolute(state_dir),
            scrubber,
            children: std::sync::Mutex::new(HashMap::new()),
            starting: Mutex::new(()),
            exits: std::sync::Mutex::new(HashMap::new()),
            hidden_env: Vec::new(),
        })
    }

    /// Do not pass these variables of this process's environment on to the
    /// job (the worker agent hides its own server token from the code it
    /// runs). Configured `spec.env` and protocol variables are unaffected.
    pub fn with_hidden_env(mut self, names: impl IntoIterator<Item = String>) -> Self {
        self.hidden_env = names.into_iter().collect();
        self
    }

    /// Where the output (stdout and stderr) of the job for `key` goes: the
    /// worker agent streams it from there while the job runs.
    pub fn log_path(&self, key: &JobKey) -> PathBuf {
        self.paths(key).log
    }

    /// Scrub job output with `scrubber` (the wiring's: every configured
    /// secret and the secret-named env vars), plus the secret-named
    /// variables of `spec.env`.
    pub fn with_scrubber(mut self, scrubber: Scrubber) -> Self {
        self.scrubber = scrubber.with_env(self.spec.env.clone());
        self
    }

    fn paths(&self, key: &JobKey) -> TrainerPaths {
        let dir = self.state_dir.join("jobs");
        let stem = key_stem(key);
        TrainerPaths {
            record: dir.join(format!("{stem}.job.json")),
            result: dir.join(format!("{stem}.result.json")),
            log: dir.join(format!("{stem}.log")),
        }
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
    /// The flag says whether the leader was seen alive (see `stop_orphans`).
    async fn wait_exit(&self, job: &JobHandle) -> (Option<ExitStatus>, bool) {
        if let Some(child) = self.child((job.pid, job.start_time)) {
            let mut child = child.lock().await;
            match child.wait().await {
                Ok(status) => return (Some(status), true),
                Err(e) => {
                    warn!(pid = job.pid, error = %e, "waiting on the command failed; polling /proc")
                }
            }
        }
        let mut seen = false;
        while process_alive(job.pid, job.start_time) {
            seen = true;
            tokio::time::sleep(POLL_EVERY).await;
        }
        (None, seen)
    }

    async fn read_result(&self, job: &JobHandle) -> Result<Option<Candidate>, PortError> {
        let path = job.result_path.clone();
        let state_dir = self.state_dir.clone();
        tokio::task::spawn_blocking(move || result::read_result(&path, &state_dir))
            .await
            .map_err(|e| PortError::Failed(format!("reading the result file failed: {e}")))?
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
                &self.scrubber,
            ))),
            Some(_) => match self.read_result(job).await? {
                Some(candidate) => Ok(TrainingOutcome::Finished(candidate)),
                None => Err(PortError::InvalidResponse(with_tail(
                    format!(
                        "command `{program}` exited 0 but wrote no result file {} ($RETRAIN_RESULT)",
                        job.result_path.display()
                    ),
                    &job.log_path,
                    &self.scrubber,
                ))),
            },
            // Started by an earlier orchestrator: its exit status is gone
            // with it, so the result file is the only evidence.
            None => match self.read_result(job).await? {
                Some(candidate) => Ok(TrainingOutcome::Finished(candidate)),
                None => {
                    let last = log_tail(&job.log_path, 1);
                    let reason = format!(
                        "command `{program}` (pid {}) is gone without writing {}{}",
                        job.pid,
                        job.result_path.display(),
                        if last.is_empty() {
                            String::new()
                        } else {
                            format!("; last output: {last}")
                        }
                    );
                    Ok(TrainingOutcome::Lost {
                        reason: self.scrubber.scrub(&reason),
                    })
                }
            },
        }
    }

    /// Wait for the leader, stop what it left behind, read the outcome.
    async fn run_to_outcome(&self, job: &JobHandle) -> Result<TrainingOutcome, PortError> {
        let (status, leader_seen) = self.wait_exit(job).await;
        if let Some(status) = status {
            self.exits
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert((job.pid, job.start_time), describe_status(status));
        }
        stop_orphans(job, &job.trainer_marker(), leader_seen).await;
        self.outcome(job, status).await
    }

    /// A claim without a pid: the orchestrator died between writing it and
    /// spawning, or between spawning and recording the pid. Find the job by
    /// its environment; `None` when it must be (re)started.
    async fn recover_claim(
        &self,
        record: &JobRecord,
        paths: &TrainerPaths,
    ) -> Result<Option<JobHandle>, PortError> {
        let marker = format!("RETRAIN_RESULT={}", paths.result.to_string_lossy());
        let found = find_job(&marker);
        let mut job = JobHandle {
            pid: 0,
            pgid: found.pgid.unwrap_or(0),
            start_time: None,
            started_at: Some(record.claimed_at),
            result_path: paths.result.clone(),
            log_path: paths.log.clone(),
            argv0: self.spec.program().to_owned(),
        };
        if let Some((pid, start_time)) = found.leader {
            info!(pid, key = %record.key, "adopting a job whose start was not recorded");
            job.pid = pid;
            job.pgid = pid;
            job.start_time = Some(start_time);
            return Ok(Some(job));
        }
        if exists(&paths.result) {
            info!(key = %record.key, "adopting the result of a job whose start was not recorded");
            return Ok(Some(job));
        }
        // Gone without a result (or never started): leftovers are stopped,
        // and the key's job is started afresh.
        if let Some(pgid) = found.pgid {
            stop_group(pgid).await;
        }
        Ok(None)
    }
}

#[async_trait]
impl Trainer for CommandTrainer {
    /// Idempotent for `request.job_key` (see the module doc): the job
    /// recorded for the key is adopted; a new one is spawned only when the
    /// key has none.
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        let _starting = self.starting.lock().await;
        let key = &request.job_key;
        let paths = self.paths(key);
        let claim = match read_record::<JobRecord>(&paths.record)? {
            Some(record) if record.key != key.as_str() => {
                return Err(PortError::Failed(format!(
                    "job record {} belongs to job key {}, not {key}",
                    paths.record.display(),
                    record.key
                )))
            }
            Some(JobRecord { job: Some(job), .. }) => {
                info!(pid = job.pid, key = %key, "a job was already started for this key; adopting it");
                return job.to_handle();
            }
            Some(record) => {
                if let Some(job) = self.recover_claim(&record, &paths).await? {
                    let adopted = JobRecord {
                        job: Some(job.clone()),
                        ..record
                    };
                    write_record(&paths.record, &adopted)?;
                    return job.to_handle();
                }
                record
            }
            None => {
                // A result without a record was not written by a job of
                // this key: it must never pass for this one.
                remove_if_exists(&paths.result, "stale result file")?;
                let claim = JobRecord {
                    key: key.as_str().to_owned(),
                    claimed_at: Utc::now(),
                    job: None,
                };
                write_record(&paths.record, &claim)?;
                claim
            }
        };

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
            ("RETRAIN_JOB_KEY".to_owned(), key.to_string()),
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
                paths.result.to_string_lossy().into_owned(),
            ),
        ]);
        let spawned = match spawn(&self.spec, env, &self.hidden_env, &paths.log, false) {
            Ok(spawned) => spawned,
            Err(e) => {
                // Nothing runs for the key: a later start may try again.
                let _ = std::fs::remove_file(&paths.record);
                return Err(e);
            }
        };
        info!(
            pid = spawned.pid,
            key = %key,
            command = %self.spec.display(),
            log = %paths.log.display(),
            "training command started"
        );
        let job = JobHandle {
            pid: spawned.pid,
            pgid: spawned.pid,
            start_time: spawned.start_time,
            started_at: Some(Utc::now()),
            result_path: paths.result,
            log_path: paths.log,
            argv0: self.spec.program().to_owned(),
        };
        self.children
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(
                (spawned.pid, spawned.start_time),
                Arc::new(Mutex::new(spawned.child)),
            );
        let record = JobRecord {
            job: Some(job.clone()),
            ..claim
        };
        if let Err(e) = write_record(&paths.record, &record) {
            // The job runs; the claim lets a later start find it by its
            // environment, and the handle returned now is journaled.
            warn!(error = %e, "could not record the started job");
        }
        job.to_handle()
    }

    async fn wait(
        &self,
        _request: &TrainingRequest,
        handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        let job = JobHandle::from_handle(handle)?;
        let Some(timeout) = self.spec.timeout else {
            return self.run_to_outcome(&job).await;
        };
        // Count from the job's start, so a resumed wait keeps the budget;
        // reading the result file counts too.
        let elapsed = job
            .started_at
            .and_then(|t| (Utc::now() - t).to_std().ok())
            .unwrap_or_default();
        let remaining = timeout.saturating_sub(elapsed);
        match tokio::time::timeout(remaining, self.run_to_outcome(&job)).await {
            Ok(outcome) => outcome,
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
                    &self.scrubber,
                )))
            }
        }
    }

    async fn cancel(&self, handle: &TrainingHandle) -> Result<(), PortError> {
        let job = JobHandle::from_handle(handle)?;
        // Only a group provably the job's is signalled: a live leader with
        // the recorded start time, or a member carrying the job's marker.
        stop_job(&job, &job.trainer_marker()).await;
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

    fn job_exit(&self, handle: &TrainingHandle) -> Option<String> {
        let job = JobHandle::from_handle(handle).ok()?;
        self.exits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&(job.pid, job.start_time))
            .cloned()
    }
}

/// Stop every trainer job recorded under `state_dir` (its
/// `jobs/*.job.json`) that still runs, with the same proof of ownership as
/// [`Trainer::cancel`]: what a process killed with `kill -9` left running
/// in its own process group, when nothing will ever await it (the `retrain
/// worker` agent, whose jobs are re-queued elsewhere once it is gone).
/// Returns the keys of the jobs it stopped; unreadable records are skipped
/// with a warning.
pub async fn stop_recorded_jobs(state_dir: &Path) -> Vec<String> {
    let dir = absolute(state_dir.to_path_buf()).join("jobs");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut stopped = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".job.json"))
        else {
            continue;
        };
        let record = match read_record::<JobRecord>(&path) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "leftover job record not read");
                continue;
            }
        };
        let found = match &record.job {
            Some(job) => stop_job(job, &job.trainer_marker()).await,
            // A claim without a pid: find the job by its environment.
            None => {
                let result = dir.join(format!("{stem}.result.json"));
                let marker = format!("RETRAIN_RESULT={}", result.to_string_lossy());
                match find_job(&marker).pgid {
                    Some(pgid) => {
                        stop_group(pgid).await;
                        true
                    }
                    None => false,
                }
            }
        };
        if found {
            warn!(key = %record.key, "stopped a job left running by an earlier process");
            stopped.push(record.key);
        }
    }
    stopped
}

/// The prepare job started (or adopted) by [`CommandSpace::restart`].
struct PrepareJob {
    /// The restart intent this job runs for.
    intent: JobKey,
    /// `None` when started by an earlier orchestrator process (adopted).
    child: Option<Child>,
    job: JobHandle,
    /// Set once the job has been observed to exit (or was timed out).
    finished: Option<SpaceStage>,
}

/// Runs a local dataset-preparation command as the label's "Space".
pub struct CommandSpace {
    spec: CommandSpec,
    state_dir: PathBuf,
    scrubber: Scrubber,
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
        let scrubber = Scrubber::new([]).with_env(spec.env.clone());
        Ok(Self {
            spec,
            state_dir: absolute(state_dir),
            scrubber,
            job: Mutex::new(None),
        })
    }

    /// See [`CommandTrainer::with_scrubber`].
    pub fn with_scrubber(mut self, scrubber: Scrubber) -> Self {
        self.scrubber = scrubber.with_env(self.spec.env.clone());
        self
    }

    /// One log and one record per distinct command (the log is truncated on
    /// restart), so several prepare commands can share a state directory.
    fn file(&self, suffix: &str) -> PathBuf {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.spec.argv.join("\0").as_bytes());
        let short = hex::encode(&digest[..6]);
        self.state_dir
            .join("jobs")
            .join(format!("prepare-{short}.{suffix}"))
    }

    fn failed_stage(&self, what: String, log_path: &Path) -> SpaceStage {
        let last = log_tail(log_path, 1);
        let detail = if last.is_empty() {
            format!("COMMAND_FAILED: {what}")
        } else {
            format!("COMMAND_FAILED: {what}: {last}")
        };
        SpaceStage::Error(self.scrubber.scrub(&detail))
    }

    /// Adopt the job an earlier orchestrator process started for `intent`.
    fn adopt(&self, intent: &JobKey, job: JobHandle) -> PrepareJob {
        info!(pid = job.pid, intent = %intent, "the prepare command already runs (or ran) for this restart; not restarting it");
        PrepareJob {
            intent: intent.clone(),
            child: None,
            job,
            finished: None,
        }
    }

    /// Stop a previous run (another intent) before starting the next.
    async fn stop_previous(&self, previous: Option<PrepareJob>, record: Option<&JobRecord>) {
        if let Some(mut previous) = previous {
            if previous.finished.is_none() {
                let marker = prepare_marker(previous.intent.as_str());
                if stop_job(&previous.job, &marker).await {
                    info!(
                        pid = previous.job.pid,
                        "stopped the previous prepare command"
                    );
                }
            }
            if let Some(child) = previous.child.as_mut() {
                let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            }
        } else if let Some(JobRecord {
            key,
            job: Some(job),
            ..
        }) = record
        {
            // Started by an earlier orchestrator process for an earlier intent.
            if stop_job(job, &prepare_marker(key)).await {
                info!(
                    pid = job.pid,
                    "stopped the prepare command an earlier process started"
                );
            }
        }
    }
}

#[async_trait]
impl SpaceController for CommandSpace {
    /// Idempotent for `intent`: the command runs once per intent. A second
    /// call with the same intent — from this process or, through the job
    /// record, a later one — does nothing, whether the job still runs or has
    /// finished; a new intent stops the previous run and starts the command.
    async fn restart(&self, intent: &JobKey) -> Result<(), PortError> {
        let mut slot = self.job.lock().await;
        if slot.as_ref().is_some_and(|job| job.intent == *intent) {
            debug!(intent = %intent, "prepare command already started for this restart");
            return Ok(());
        }
        let record_path = self.file("job.json");
        let log_path = self.file("log");
        let record = read_record::<JobRecord>(&record_path)?;
        if slot.is_none() {
            match &record {
                Some(JobRecord {
                    key,
                    job: Some(job),
                    ..
                }) if key == intent.as_str() => {
                    *slot = Some(self.adopt(intent, job.clone()));
                    return Ok(());
                }
                Some(claim @ JobRecord { key, job: None, .. }) if key == intent.as_str() => {
                    let found = find_job(&prepare_marker(key));
                    if let Some((pid, start_time)) = found.leader {
                        let job = JobHandle {
                            pid,
                            pgid: pid,
                            start_time: Some(start_time),
                            started_at: Some(claim.claimed_at),
                            result_path: PathBuf::new(),
                            log_path: log_path.clone(),
                            argv0: self.spec.program().to_owned(),
                        };
                        write_record(
                            &record_path,
                            &JobRecord {
                                job: Some(job.clone()),
                                ..claim.clone()
                            },
                        )?;
                        *slot = Some(self.adopt(intent, job));
                        return Ok(());
                    }
                    // Not running: never started, or finished before its pid
                    // was recorded (indistinguishable); a prepare job is
                    // restartable, so it runs (again).
                    if let Some(pgid) = found.pgid {
                        stop_group(pgid).await;
                    }
                }
                _ => {}
            }
        }
        self.stop_previous(slot.take(), record.as_ref()).await;

        let claim = JobRecord {
            key: intent.as_str().to_owned(),
            claimed_at: Utc::now(),
            job: None,
        };
        write_record(&record_path, &claim)?;
        let mut env = render_env(&self.spec.env, None)?;
        env.push(("RETRAIN_PREPARE".into(), "1".into()));
        env.push(("RETRAIN_JOB_KEY".into(), intent.to_string()));
        let spawned = match spawn(&self.spec, env, &[], &log_path, true) {
            Ok(spawned) => spawned,
            Err(e) => {
                let _ = std::fs::remove_file(&record_path);
                return Err(e);
            }
        };
        info!(
            pid = spawned.pid,
            intent = %intent,
            command = %self.spec.display(),
            log = %log_path.display(),
            "prepare command started"
        );
        let job = JobHandle {
            pid: spawned.pid,
            pgid: spawned.pid,
            start_time: spawned.start_time,
            started_at: Some(Utc::now()),
            result_path: PathBuf::new(),
            log_path,
            argv0: self.spec.program().to_owned(),
        };
        if let Err(e) = write_record(
            &record_path,
            &JobRecord {
                job: Some(job.clone()),
                ..claim
            },
        ) {
            warn!(error = %e, "could not record the started prepare command");
        }
        *slot = Some(PrepareJob {
            intent: intent.clone(),
            child: Some(spawned.child),
            job,
            finished: None,
        });
        Ok(())
    }

    async fn stage(&self) -> Result<SpaceStage, PortError> {
        let mut slot = self.job.lock().await;
        let Some(prepare) = slot.as_mut() else {
            return Ok(SpaceStage::Unknown("NOT_STARTED".into()));
        };
        if let Some(stage) = &prepare.finished {
            return Ok(stage.clone());
        }
        let marker = prepare_marker(prepare.intent.as_str());
        // `Some(status)` once exited; the inner `None` when the exit status
        // is unknown (a job started by an earlier process).
        let exited: Option<Option<ExitStatus>> = match prepare.child.as_mut() {
            Some(child) => match child.try_wait() {
                Ok(None) => None,
                Ok(Some(status)) => Some(Some(status)),
                Err(e) => {
                    return Err(PortError::Failed(format!(
                        "cannot query prepare command `{}` (pid {}): {e}",
                        self.spec.program(),
                        prepare.job.pid
                    )))
                }
            },
            None if process_alive(prepare.job.pid, prepare.job.start_time) => None,
            None => Some(None),
        };
        let stage = match exited {
            None => {
                let elapsed = prepare
                    .job
                    .started_at
                    .and_then(|t| (Utc::now() - t).to_std().ok())
                    .unwrap_or_default();
                match self.spec.timeout.filter(|t| elapsed >= *t) {
                    None => return Ok(SpaceStage::Running),
                    Some(t) => {
                        warn!(
                            pid = prepare.job.pid,
                            "prepare command timed out; stopping its process group"
                        );
                        stop_job(&prepare.job, &marker).await;
                        if let Some(child) = prepare.child.as_mut() {
                            let _ =
                                tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
                        }
                        self.failed_stage(
                            format!("timed out after {}s", t.as_secs_f64()),
                            &prepare.job.log_path,
                        )
                    }
                }
            }
            Some(status) => {
                // Our own child was held unreaped until now: its group is ours.
                let leader_seen = prepare.child.is_some();
                stop_orphans(&prepare.job, &marker, leader_seen).await;
                match status {
                    Some(status) if status.success() => SpaceStage::Stopped,
                    Some(status) => {
                        self.failed_stage(describe_status(status), &prepare.job.log_path)
                    }
                    // Its exit status went with the process that started it;
                    // the metadata poll decides whether it produced a dataset.
                    None => SpaceStage::Stopped,
                }
            }
        };
        prepare.finished = Some(stage.clone());
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

    #[test]
    fn key_stems_are_file_names() {
        assert_eq!(key_stem(&JobKey("run-1/train/2".into())), "run-1_train_2");
        assert_eq!(key_stem(&JobKey("../x".into())), "_x");
        assert_eq!(key_stem(&JobKey("..".into())), "job");
    }
}
