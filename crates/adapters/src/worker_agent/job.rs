//! One leased job on the worker: run it exactly like the local command
//! trainer ([`CommandTrainer`]: §6 env vars, `$RETRAIN_RESULT`, own process
//! group, timeout, scrubbed stderr tail), stream its output to the server,
//! report its end, upload its artifacts.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use retrain_core::domain::{Candidate, JobKey, Label, RunId, TrainingOutcome, VersionTag};
use retrain_core::ports::{Trainer, TrainingRequest};
use retrain_core::CancellationToken;
use sha2::Digest;
use tracing::{info, warn};

use super::client::{Job, ResultAnswer};
use super::{forced_wait, AgentError, Session, FORCED_REQUEST_WAIT};
use crate::command::{CommandSpec, CommandTrainer};
use crate::scrub::Scrubber;

/// The variable pointing the job to the directory whose files are uploaded.
pub const ARTIFACTS_DIR_VAR: &str = "RETRAIN_ARTIFACTS_DIR";
/// Largest log chunk posted at once.
const CHUNK_BYTES: usize = 16 * 1024;
/// How often new output is looked for.
const LOG_EVERY: Duration = Duration::from_secs(1);
/// The server keeps this much of a job's log: output further behind is
/// skipped (with a marker) rather than posted to be dropped.
const SERVER_TAIL_BYTES: u64 = 64 * 1024;
/// How long a result report is retried while the server is unreachable.
const RESULT_PATIENCE: Duration = Duration::from_secs(15 * 60);

/// How a job left the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Its result (success or failure) was delivered, and the server took it.
    Reported,
    /// Its result was delivered but the server no longer awaited it (409).
    TakenAway,
    /// The server asked for it to be killed (heartbeat `cancel`): killed,
    /// nothing reported.
    CancelledByServer,
    /// Draining outlasted `--drain-timeout`: killed and reported
    /// `cancelled` (re-queued without using an attempt).
    DrainCancelled,
    /// Its end could not be delivered (the server stayed unreachable).
    Undelivered,
    /// A forced stop (second signal): killed, reported `cancelled` if the
    /// server answered in time.
    Forced,
}

/// What a finished job reports.
enum Report {
    Success(Candidate),
    Failure {
        message: String,
        exit_status: Option<String>,
    },
}

/// Runs leased jobs for one agent.
pub(super) struct JobRunner {
    pub session: Arc<Session>,
    pub work_dir: PathBuf,
    pub scrubber: Scrubber,
    pub hidden_env: Vec<String>,
    pub drain_timeout: Duration,
    /// Fires on a forced stop: kill the job now, wait for nothing.
    pub force: CancellationToken,
}

impl JobRunner {
    /// Run `job` to its end. `cancel` fires when the server asks for the job
    /// to be killed; `drain` when the agent was told to stop.
    pub async fn run(
        &self,
        job: Job,
        cancel: CancellationToken,
        drain: &CancellationToken,
    ) -> JobEnd {
        info!(job_key = %job.job_key, run_id = %job.run_id, label = %job.label, attempt = job.attempt, "job leased");
        let dir = self.work_dir.join("jobs").join(dir_name(&job.job_key));
        let scrubber = self.scrubber.clone().with_env(job.env.clone());
        let end = match self.prepare(&job, &dir, &scrubber) {
            Ok((trainer, request)) => {
                self.execute(&job, &dir, trainer, request, &scrubber, cancel, drain)
                    .await
            }
            Err(message) => {
                let message = scrubber.scrub(&message);
                warn!(job_key = %job.job_key, error = %message, "the job could not be started");
                self.deliver(
                    &job,
                    Report::Failure {
                        message,
                        exit_status: None,
                    },
                )
                .await
            }
        };
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!(dir = %dir.display(), error = %e, "could not remove the job's directory");
            }
        }
        info!(job_key = %job.job_key, end = ?end, "job done");
        end
    }

    /// A fresh job directory, the trainer and its request.
    fn prepare(
        &self,
        job: &Job,
        dir: &Path,
        scrubber: &Scrubber,
    ) -> Result<(CommandTrainer, TrainingRequest), String> {
        let label = Label::new(&job.label).map_err(|e| format!("the job's label: {e}"))?;
        let artifacts = dir.join("artifacts");
        let state = dir.join("state");
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| format!("cannot clear the job directory {}: {e}", dir.display()))?;
        }
        for path in [&artifacts, &state] {
            std::fs::create_dir_all(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        }
        let mut env = job.env.clone();
        env.insert(
            ARTIFACTS_DIR_VAR.to_owned(),
            artifacts.to_string_lossy().into_owned(),
        );
        let spec = CommandSpec {
            argv: job.command.clone(),
            timeout: (job.timeout_secs > 0).then(|| Duration::from_secs(job.timeout_secs)),
            env,
            workdir: None,
        };
        let trainer = CommandTrainer::new(spec, state)
            .map_err(|e| format!("the job's command: {e}"))?
            .with_scrubber(scrubber.clone())
            .with_hidden_env(self.hidden_env.clone());
        let request = TrainingRequest {
            label,
            run_id: RunId(job.run_id.clone()),
            attempt: job.attempt,
            job_key: JobKey(job.job_key.clone()),
            dataset_name: job.dataset.name.clone(),
            dataset_version: VersionTag::new(job.dataset.version.clone()),
            lease: None,
            first_start: false,
        };
        Ok((trainer, request))
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute(
        &self,
        job: &Job,
        dir: &Path,
        trainer: CommandTrainer,
        request: TrainingRequest,
        scrubber: &Scrubber,
        cancel: CancellationToken,
        drain: &CancellationToken,
    ) -> JobEnd {
        let handle = match trainer.start(&request).await {
            Ok(handle) => handle,
            Err(e) => {
                return self
                    .deliver(
                        job,
                        Report::Failure {
                            message: scrubber.scrub(&e.to_string()),
                            exit_status: None,
                        },
                    )
                    .await
            }
        };
        let stop_logs = CancellationToken::new();
        let streamer = LogStreamer {
            session: self.session.clone(),
            logs_url: job.logs_url.clone(),
            job_key: job.job_key.clone(),
            path: trainer.log_path(&request.job_key),
            offset: 0,
            scrubber: scrubber.clone(),
            refused: false,
        };
        let logs = tokio::spawn(streamer.stream(stop_logs.clone()));

        enum Ended {
            Outcome(Result<TrainingOutcome, retrain_core::ports::PortError>),
            ServerCancel,
            DrainTimeout,
            Forced,
        }
        let drain_timeout = self.drain_timeout;
        let drain_deadline = async {
            drain.cancelled().await;
            info!(job_key = %job.job_key, timeout_secs = drain_timeout.as_secs(), "draining: letting the running job finish");
            tokio::time::sleep(drain_timeout).await;
        };
        let mut wait = Box::pin(trainer.wait(&request, &handle));
        let ended = tokio::select! {
            outcome = &mut wait => Ended::Outcome(outcome),
            _ = cancel.cancelled() => Ended::ServerCancel,
            _ = drain_deadline => Ended::DrainTimeout,
            _ = self.force.cancelled() => Ended::Forced,
        };
        // The wait holds the child; let go of it before killing the group.
        drop(wait);
        let report = match &ended {
            Ended::ServerCancel | Ended::DrainTimeout | Ended::Forced => {
                if let Err(e) = trainer.cancel(&handle).await {
                    warn!(job_key = %job.job_key, error = %e, "stopping the job failed");
                }
                None
            }
            Ended::Outcome(Ok(TrainingOutcome::Finished(candidate))) => {
                Some(Report::Success(candidate.clone()))
            }
            Ended::Outcome(Ok(TrainingOutcome::Lost { reason })) => Some(Report::Failure {
                message: scrubber.scrub(reason),
                exit_status: None,
            }),
            Ended::Outcome(Err(e)) => Some(Report::Failure {
                message: scrubber.scrub(&e.to_string()),
                exit_status: trainer.job_exit(&handle),
            }),
        };
        stop_logs.cancel();
        if let Err(e) = logs.await {
            warn!(error = %e, "the log streamer stopped abnormally");
        }
        match (ended, report) {
            (Ended::ServerCancel, _) => {
                warn!(job_key = %job.job_key, "the server cancelled the job; its process group was stopped");
                JobEnd::CancelledByServer
            }
            (Ended::DrainTimeout, _) => {
                warn!(job_key = %job.job_key, "draining took longer than --drain-timeout; the job was stopped and is handed back");
                match self.post_cancelled(job).await {
                    Ok(_) => JobEnd::DrainCancelled,
                    Err(e) => {
                        warn!(job_key = %job.job_key, error = %e, "the cancellation could not be reported; the server will declare the job lost");
                        JobEnd::Undelivered
                    }
                }
            }
            (Ended::Forced, _) => {
                warn!(job_key = %job.job_key, "forced to stop: the job was stopped and is handed back");
                if let Err(e) = self.post_cancelled(job).await {
                    warn!(job_key = %job.job_key, error = %e, "the cancellation could not be reported; the server will declare the job lost");
                }
                JobEnd::Forced
            }
            (Ended::Outcome(_), Some(report)) => {
                let success = matches!(report, Report::Success(_));
                let end = self.deliver(job, report).await;
                if success && end == JobEnd::Reported {
                    let artifacts = dir.join("artifacts");
                    tokio::select! {
                        () = upload_artifacts(&self.session, job, &artifacts) => {}
                        () = self.force.cancelled() => {
                            warn!(job_key = %job.job_key, "forced to stop: the job's artifacts were not all uploaded");
                        }
                    }
                }
                end
            }
            (Ended::Outcome(_), None) => JobEnd::Undelivered,
        }
    }

    /// Post the job's result. A success the server refuses as invalid
    /// (400/422: our result parser accepted it, so the two disagree) is
    /// reported as a failure quoting the server, so the run fails with the
    /// reason instead of waiting for the job's timeout.
    async fn deliver(&self, job: &Job, report: Report) -> JobEnd {
        let worker_id = self.session.worker_id().unwrap_or_default();
        let failure_body = |message: &str, exit_status: Option<&str>| {
            serde_json::json!({
                "job_key": job.job_key,
                "worker_id": worker_id,
                "failed": { "message": message, "exit_status": exit_status },
            })
            .to_string()
        };
        let answer = match &report {
            Report::Success(candidate) => {
                let body = success_body(&job.job_key, &worker_id, candidate);
                match self.post_result(job, body).await {
                    Err(e) if e.is_status(400) || e.is_status(422) => {
                        warn!(job_key = %job.job_key, error = %e, "the server refused the job's result; reporting the job failed");
                        let message =
                            format!("the job succeeded but the server refused its result: {e}");
                        self.post_result(job, failure_body(&message, Some("exit status 0")))
                            .await
                    }
                    answer => answer,
                }
            }
            Report::Failure {
                message,
                exit_status,
            } => {
                self.post_result(job, failure_body(message, exit_status.as_deref()))
                    .await
            }
        };
        match answer {
            Ok(ResultAnswer::Accepted) => JobEnd::Reported,
            Ok(ResultAnswer::NotAwaited) => {
                warn!(job_key = %job.job_key, "the job was taken away from this worker (409); its result is dropped");
                JobEnd::TakenAway
            }
            Err(e) => {
                warn!(job_key = %job.job_key, error = %e, "the job's result could not be reported");
                JobEnd::Undelivered
            }
        }
    }

    /// Report `job` cancelled: the server re-queues it without using an
    /// attempt.
    async fn post_cancelled(&self, job: &Job) -> Result<ResultAnswer, AgentError> {
        let body = serde_json::json!({
            "job_key": job.job_key,
            "worker_id": self.session.worker_id().unwrap_or_default(),
            "cancelled": true,
        });
        self.post_result(job, body.to_string()).await
    }

    /// Post a result body, retrying transport failures and server errors
    /// for up to [`RESULT_PATIENCE`] (a server restart must not lose it);
    /// after a forced stop, for [`FORCED_REQUEST_WAIT`] at most.
    async fn post_result(&self, job: &Job, body: String) -> Result<ResultAnswer, AgentError> {
        let forced_out = || {
            AgentError::Transport(format!(
                "forced to stop before the server answered (waited {}s)",
                FORCED_REQUEST_WAIT.as_secs()
            ))
        };
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_secs(1);
        loop {
            let answer = tokio::select! {
                answer = self.session.client.post_result(&job.results_url, body.clone()) => answer,
                _ = forced_wait(&self.force) => return Err(forced_out()),
            };
            match answer {
                Err(e) if e.is_retryable() && started.elapsed() < RESULT_PATIENCE => {
                    warn!(job_key = %job.job_key, error = %e, retry_in_secs = delay.as_secs(), "reporting the job's result failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = forced_wait(&self.force) => return Err(forced_out()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
                answer => return answer,
            }
        }
    }
}

/// A job key as one directory name.
fn dir_name(job_key: &str) -> String {
    let name: String = job_key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match name.trim_start_matches('.') {
        "" => "job".to_owned(),
        trimmed => trimmed.to_owned(),
    }
}

/// The success body, with non-finite metrics written as Python's bare
/// `NaN`/`Infinity` tokens, which the server's §6 result parser reads (JSON
/// has no such numbers and `serde_json` would write `null`).
pub(super) fn success_body(job_key: &str, worker_id: &str, candidate: &Candidate) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let metrics: Vec<String> = candidate
        .metrics
        .iter()
        .map(|(name, value)| {
            let number = if value.is_nan() {
                "NaN".to_owned()
            } else if value.is_infinite() {
                if *value > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                }
                .to_owned()
            } else {
                serde_json::Value::from(*value).to_string()
            };
            format!("{}:{number}", quote(name))
        })
        .collect();
    format!(
        "{{\"job_key\":{},\"worker_id\":{},\"candidate\":{},\"metrics\":{{{}}}}}",
        quote(job_key),
        quote(worker_id),
        quote(&candidate.id),
        metrics.join(",")
    )
}

/// Whether `name` can be an artifact name: one path segment of
/// `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn is_artifact_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What a job left in its artifacts directory.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ArtifactScan {
    /// Regular files with an artifact name: (name, path), sorted by name.
    pub files: Vec<(String, PathBuf)>,
    /// Entries not uploaded: (name, why).
    pub skipped: Vec<(String, String)>,
}

/// Scan `dir` for the files to upload (see [`ArtifactScan`]).
pub fn artifact_files(dir: &Path) -> ArtifactScan {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return ArtifactScan::default();
    };
    for entry in entries.flatten() {
        let raw = entry.file_name();
        let name = raw.to_string_lossy().into_owned();
        let Some(valid) = raw.to_str().filter(|n| is_artifact_name(n)) else {
            skipped.push((name, "its name is not made of A-Z a-z 0-9 . _ -".into()));
            continue;
        };
        // `symlink_metadata`: a link (maybe to a file outside the job) is not uploaded.
        match entry.path().symlink_metadata() {
            Ok(meta) if meta.file_type().is_file() => files.push((valid.to_owned(), entry.path())),
            Ok(meta) if meta.file_type().is_dir() => skipped.push((
                name,
                "it is a directory (only files directly inside are uploaded)".into(),
            )),
            Ok(_) => skipped.push((name, "it is not a regular file".into())),
            Err(e) => skipped.push((name, format!("it cannot be read: {e}"))),
        }
    }
    files.sort();
    ArtifactScan { files, skipped }
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Upload every artifact the job left; a failure is logged and the others
/// still go.
async fn upload_artifacts(session: &Session, job: &Job, dir: &Path) {
    let ArtifactScan { files, skipped } = artifact_files(dir);
    for (name, why) in skipped {
        warn!(job_key = %job.job_key, artifact = %name, "artifact not uploaded: {why}");
    }
    for (name, path) in files {
        let hashed = path.clone();
        let local = tokio::task::spawn_blocking(move || sha256_file(&hashed))
            .await
            .ok()
            .and_then(Result::ok);
        match session
            .client
            .put_artifact(&job.artifacts_url, &name, &path)
            .await
        {
            Ok(stored) if local.as_deref().is_some_and(|h| h != stored.sha256) => warn!(
                job_key = %job.job_key,
                artifact = %name,
                server_sha256 = %stored.sha256,
                local_sha256 = local.as_deref().unwrap_or_default(),
                "the server stored the artifact with another hash (was the file changed while uploading?)"
            ),
            Ok(stored) => info!(
                job_key = %job.job_key,
                artifact = %stored.name,
                size_bytes = stored.size_bytes,
                sha256 = %stored.sha256,
                "artifact uploaded"
            ),
            Err(e) => {
                warn!(job_key = %job.job_key, artifact = %name, error = %e, "artifact upload failed")
            }
        }
    }
}

/// Length of the longest prefix of `bytes` that does not end inside a
/// UTF-8 sequence (what is left waits for the rest of its character).
pub(super) fn complete_prefix_len(bytes: &[u8]) -> usize {
    let n = bytes.len();
    for back in 1..=n.min(4) {
        let byte = bytes[n - back];
        if byte & 0xC0 != 0x80 {
            let needed = match byte {
                0xF0..=0xFF => 4,
                0xE0..=0xEF => 3,
                0xC0..=0xDF => 2,
                _ => 1,
            };
            return if needed > back { n - back } else { n };
        }
    }
    n
}

/// Tails the job's log file and posts it in chunks: every second, whatever
/// complete lines appeared (a partial line waits for its end unless a full
/// chunk is pending or the job ended). The file is the buffer, so a slow
/// server costs no memory; output the server would not keep anyway is
/// skipped.
struct LogStreamer {
    session: Arc<Session>,
    logs_url: String,
    job_key: String,
    path: PathBuf,
    offset: u64,
    scrubber: Scrubber,
    /// The server refused the log (409): stop posting.
    refused: bool,
}

impl LogStreamer {
    async fn stream(mut self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(LOG_EVERY) => self.flush(false).await,
                _ = stop.cancelled() => break,
            }
        }
        self.flush(true).await;
    }

    /// Post what is pending; stops at the first failure (retried next time).
    async fn flush(&mut self, last: bool) {
        while !self.refused {
            let Some(text) = self.next_chunk(last) else {
                return;
            };
            let (chunk, advance) = text;
            let worker_id = self.session.worker_id().unwrap_or_default();
            match self
                .session
                .client
                .post_log(&self.logs_url, &self.job_key, &worker_id, &chunk)
                .await
            {
                Ok(()) => self.offset += advance,
                Err(e) if e.is_status(409) => {
                    warn!(job_key = %self.job_key, error = %e, "the server refused the job's log; not streaming it any more");
                    self.refused = true;
                }
                Err(e) => {
                    warn!(job_key = %self.job_key, error = %e, "posting the job's log failed; will retry");
                    return;
                }
            }
        }
    }

    /// The next chunk to post and how far it moves the offset.
    fn next_chunk(&mut self, last: bool) -> Option<(String, u64)> {
        let mut file = File::open(&self.path).ok()?;
        let len = file.metadata().ok()?.len();
        let mut prefix = String::new();
        if len.saturating_sub(self.offset) > SERVER_TAIL_BYTES {
            let skip_to = len - SERVER_TAIL_BYTES;
            prefix = format!(
                "[retrain worker: {} bytes of output skipped]\n",
                skip_to - self.offset
            );
            self.offset = skip_to;
        }
        file.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut buffer = Vec::with_capacity(CHUNK_BYTES);
        file.take(CHUNK_BYTES as u64)
            .read_to_end(&mut buffer)
            .ok()?;
        let full = buffer.len() == CHUNK_BYTES;
        let cut = if last || full {
            // Prefer ending at a line end, so a secret is not split.
            match buffer.iter().rposition(|b| matches!(b, b'\n' | b'\r')) {
                Some(i) if full && !last => i + 1,
                _ => complete_prefix_len(&buffer),
            }
        } else {
            buffer
                .iter()
                .rposition(|b| matches!(b, b'\n' | b'\r'))
                .map_or(0, |i| i + 1)
        };
        if cut == 0 && prefix.is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(&buffer[..cut]);
        Some((self.scrubber.scrub(&format!("{prefix}{text}")), cut as u64))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn artifact_names_are_one_plain_segment() {
        for ok in ["model.pt", "metrics-v2.json", "a_b", ".hidden", "x..y"] {
            assert!(is_artifact_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "modèle.pt", "x?y", "a\\b"] {
            assert!(!is_artifact_name(bad), "{bad}");
        }
    }

    #[test]
    fn only_regular_files_with_plain_names_are_uploaded() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("model.pt"), b"weights").unwrap();
        std::fs::write(root.join("b.json"), b"{}").unwrap();
        std::fs::write(root.join("bad name.txt"), b"x").unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("passwd")).unwrap();
        let ArtifactScan { files, skipped } = artifact_files(root);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["b.json", "model.pt"]);
        let mut skipped_names: Vec<&str> = skipped.iter().map(|(n, _)| n.as_str()).collect();
        skipped_names.sort();
        assert_eq!(skipped_names, ["bad name.txt", "passwd", "sub"]);
        assert_eq!(
            artifact_files(&root.join("absent")),
            ArtifactScan::default()
        );
    }

    #[test]
    fn success_bodies_keep_non_finite_metrics_as_python_tokens() {
        let candidate = Candidate {
            id: "run-\"7\"".into(),
            metrics: BTreeMap::from([
                ("dice".to_owned(), 0.81),
                ("loss".to_owned(), f64::NAN),
                ("up".to_owned(), f64::INFINITY),
                ("down".to_owned(), f64::NEG_INFINITY),
            ]),
        };
        let body = success_body("r/train/1", "w-1", &candidate);
        assert_eq!(
            body,
            r#"{"job_key":"r/train/1","worker_id":"w-1","candidate":"run-\"7\"","metrics":{"dice":0.81,"down":-Infinity,"loss":NaN,"up":Infinity}}"#
        );
        // The server's parser (the `$RETRAIN_RESULT` one) reads it back.
        let parsed = crate::command::result::parse_result(body.as_bytes()).unwrap();
        assert_eq!(parsed.id, candidate.id);
        assert!(parsed.metrics["loss"].is_nan());
        assert_eq!(parsed.metrics["down"], f64::NEG_INFINITY);
        let plain: serde_json::Value = serde_json::from_str(&success_body(
            "k",
            "w",
            &Candidate {
                id: "c".into(),
                metrics: BTreeMap::new(),
            },
        ))
        .unwrap();
        assert_eq!(plain["metrics"], serde_json::json!({}));
    }

    #[test]
    fn utf8_sequences_are_not_split() {
        let text = "aé€😀".as_bytes();
        assert_eq!(complete_prefix_len(text), text.len());
        for cut in 1..text.len() {
            let len = complete_prefix_len(&text[..cut]);
            assert!(std::str::from_utf8(&text[..len]).is_ok(), "cut {cut}");
            assert!(cut - len < 4);
        }
        assert_eq!(complete_prefix_len(b""), 0);
        assert_eq!(
            complete_prefix_len(&[0x80, 0x80]),
            2,
            "garbage is passed on"
        );
    }

    #[test]
    fn job_directories_are_one_segment() {
        assert_eq!(dir_name("run-1/train/2"), "run-1_train_2");
        assert_eq!(dir_name("../x"), "_x");
        assert_eq!(dir_name(".."), "job");
    }
}
