//! A local command as the label's [`DatasetCheck`] (`dataset_check`).
//!
//! The command runs with the §6 environment of the accepted dataset version
//! (`RETRAIN_LABEL`, `RETRAIN_RUN_ID`, `RETRAIN_JOB_KEY`,
//! `RETRAIN_DATASET_NAME`, `RETRAIN_DATASET_VERSION`, `RETRAIN_RESULT`), in
//! its own process group, output to `<state_dir>/jobs/<key>.log`, and may
//! write `{"passed": bool, "summary": {...}, "report_md": "..."}` to
//! `$RETRAIN_RESULT` (read like a trainer's result file: regular file, at
//! most 1 MiB, and validated strictly: unknown fields are refused).
//!
//! Verdict: a non-zero exit, or `"passed": false`, rejects the dataset (the
//! result file's summary and report are kept when it wrote a valid one, and
//! the scrubbed tail of its output is the `detail`); exit 0 without a result
//! file passes. A check that cannot start, times out (default 10 minutes) or
//! writes an invalid result file is an error, not a verdict.
//!
//! **Idempotent for the key.** A completed check is recorded atomically in
//! `<state_dir>/jobs/<key>.check.json`; a later call with the same key (a
//! resumed run whose result was not journaled) returns that record without
//! running the command again. A check interrupted before it completed (the
//! future dropped: Ctrl-C, lost lock) has its process group killed and is run
//! again from the start by the resumed run; a check only reads the dataset,
//! so running it again is harmless.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;

use async_trait::async_trait;
use retrain_core::domain::{DatasetCheckResult, JobKey};
use retrain_core::ports::{DatasetCheck, DatasetCheckRequest, PortError};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::process::{kill_group_now, read_record, stop_orphans, write_record};
use super::{
    absolute, describe_status, key_stem, remove_if_exists, render_env, result, spawn, with_tail,
    CommandSpec, JobHandle,
};
use crate::error::AdapterError;
use crate::scrub::Scrubber;

/// Longest `report_md` kept (notifications and PR comments have limits).
const REPORT_LIMIT: usize = 32 * 1024;

/// What a dataset check may write to `$RETRAIN_RESULT`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckFile {
    passed: bool,
    #[serde(default)]
    summary: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    report_md: Option<String>,
}

/// `<key>.check.json`: the completed check of a key.
#[derive(Debug, Serialize, Deserialize)]
struct CheckRecord {
    key: String,
    result: DatasetCheckResult,
}

/// Parse a check's result file; the error says what is wrong.
fn parse_check(bytes: &[u8]) -> Result<CheckFile, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "is not a valid dataset check result ({e}); expected {{\"passed\": true|false, \"summary\": {{...}}, \"report_md\": \"...\"}}"
        )
    })
}

/// Cut `text` to at most [`REPORT_LIMIT`] bytes on a character boundary.
fn bounded(mut text: String) -> String {
    if text.len() > REPORT_LIMIT {
        let mut end = REPORT_LIMIT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("\n\n… (report truncated)");
    }
    text
}

/// Kills the check's process group if the check is dropped before it ended.
/// Declared after the `Child` it guards, so it runs while the leader is not
/// yet reaped (its pgid cannot have been reused).
struct GroupGuard {
    pgid: u32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            warn!(
                pgid = self.pgid,
                "dataset check abandoned (interrupt or lost lock); killing it"
            );
            kill_group_now(self.pgid);
        }
    }
}

/// Runs the `dataset_check` command of a label.
pub struct CommandDatasetCheck {
    spec: CommandSpec,
    state_dir: PathBuf,
    scrubber: Scrubber,
}

impl fmt::Debug for CommandDatasetCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CommandDatasetCheck")
            .field("spec", &self.spec)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl CommandDatasetCheck {
    /// `state_dir` holds `jobs/<key>.{check.json,log,result.json}`.
    pub fn new(spec: CommandSpec, state_dir: PathBuf) -> Result<Self, AdapterError> {
        spec.validate()?;
        let scrubber = Scrubber::new([]).with_env(spec.env.clone());
        Ok(Self {
            spec,
            state_dir: absolute(state_dir),
            scrubber,
        })
    }

    /// Scrub output quoted in results with `scrubber` (see
    /// `CommandTrainer::with_scrubber`).
    pub fn with_scrubber(mut self, scrubber: Scrubber) -> Self {
        self.scrubber = scrubber.with_env(self.spec.env.clone());
        self
    }

    fn path(&self, key: &JobKey, suffix: &str) -> PathBuf {
        self.state_dir
            .join("jobs")
            .join(format!("{}.{suffix}", key_stem(key)))
    }

    /// The verdict of a check that exited with `status`.
    async fn verdict(
        &self,
        status: ExitStatus,
        result_path: &std::path::Path,
        log_path: &std::path::Path,
    ) -> Result<DatasetCheckResult, PortError> {
        let program = self.spec.argv[0].clone();
        let path = result_path.to_owned();
        let state_dir = self.state_dir.clone();
        let bytes =
            tokio::task::spawn_blocking(move || result::read_result_bytes(&path, &state_dir))
                .await
                .map_err(|e| {
                    PortError::Failed(format!("reading the check's result file failed: {e}"))
                })?;
        let file = match bytes {
            Ok(None) => None,
            // A failed check's result is informative only: its exit status
            // already decided.
            Err(e) if !status.success() => {
                warn!(error = %e, "ignoring the unreadable result file of a failed dataset check");
                None
            }
            Err(e) => return Err(e),
            Ok(Some(bytes)) => match parse_check(&bytes) {
                Ok(file) => Some(file),
                Err(what) if !status.success() => {
                    warn!(result = %result_path.display(), "ignoring the invalid result file of a failed dataset check: {what}");
                    None
                }
                Err(what) => return Err(result::invalid(result_path, what)),
            },
        };
        let passed = status.success() && file.as_ref().is_none_or(|f| f.passed);
        let detail = (!passed).then(|| {
            let how = if status.success() {
                format!("command `{program}` reported \"passed\": false")
            } else {
                format!(
                    "command `{program}` failed with {}",
                    describe_status(status)
                )
            };
            with_tail(how, log_path, &self.scrubber)
        });
        let (summary, report_md) = match file {
            Some(f) => (
                // User code wrote it: scrubbed like the output it quotes.
                f.summary
                    .map(|summary| self.scrubber.scrub_map(summary))
                    .unwrap_or_default(),
                f.report_md
                    .map(|r| bounded(self.scrubber.scrub(&r)))
                    .filter(|r| !r.trim().is_empty()),
            ),
            None => (Default::default(), None),
        };
        Ok(DatasetCheckResult {
            passed,
            summary,
            report_md,
            detail,
        })
    }
}

#[async_trait]
impl DatasetCheck for CommandDatasetCheck {
    async fn check(&self, request: &DatasetCheckRequest) -> Result<DatasetCheckResult, PortError> {
        let key = &request.job_key;
        let record_path = self.path(key, "check.json");
        if let Some(record) = read_record::<CheckRecord>(&record_path)? {
            if record.key != key.as_str() {
                return Err(PortError::Failed(format!(
                    "check record {} belongs to job key {}, not {key}",
                    record_path.display(),
                    record.key
                )));
            }
            info!(key = %key, "this dataset check already completed; using its recorded result");
            return Ok(record.result);
        }
        let result_path = self.path(key, "result.json");
        let log_path = self.path(key, "log");
        // A result left by an interrupted earlier attempt must not pass for this one.
        remove_if_exists(&result_path, "stale result file")?;

        let mut env = render_env(&self.spec.env, None)?;
        env.extend([
            ("RETRAIN_LABEL".to_owned(), request.label.to_string()),
            ("RETRAIN_RUN_ID".to_owned(), request.run_id.to_string()),
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
                result_path.to_string_lossy().into_owned(),
            ),
        ]);
        let mut spawned = spawn(&self.spec, env, &[], &log_path, true)?;
        let mut guard = GroupGuard {
            pgid: spawned.pid,
            armed: true,
        };
        info!(
            pid = spawned.pid,
            key = %key,
            command = %self.spec.display(),
            log = %log_path.display(),
            "dataset check started"
        );
        let job = JobHandle {
            pid: spawned.pid,
            pgid: spawned.pid,
            start_time: spawned.start_time,
            started_at: Some(chrono::Utc::now()),
            result_path: result_path.clone(),
            log_path: log_path.clone(),
            argv0: self.spec.argv[0].clone(),
        };
        let waited = match self.spec.timeout {
            Some(timeout) => tokio::time::timeout(timeout, spawned.child.wait()).await,
            None => Ok(spawned.child.wait().await),
        };
        let status = match waited {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                return Err(PortError::Failed(format!(
                    "waiting for dataset check `{}` failed: {e}",
                    job.argv0
                )))
            }
            Err(_) => {
                kill_group_now(job.pgid);
                guard.armed = false;
                let _ = spawned.child.wait().await;
                return Err(PortError::Failed(with_tail(
                    format!(
                        "dataset check `{}` timed out after {}s",
                        job.argv0,
                        self.spec.timeout.unwrap_or_default().as_secs_f64()
                    ),
                    &log_path,
                    &self.scrubber,
                )));
            }
        };
        guard.armed = false;
        // Whatever it left running in its group is stopped.
        stop_orphans(&job, &job.trainer_marker(), true).await;
        let result = self.verdict(status, &result_path, &log_path).await?;
        let record = CheckRecord {
            key: key.as_str().to_owned(),
            result: result.clone(),
        };
        if let Err(e) = write_record(&record_path, &record) {
            // The verdict stands; a resumed run would only check again.
            warn!(error = %e, "could not record the completed dataset check");
        }
        info!(key = %key, passed = result.passed, "dataset check finished");
        Ok(result)
    }

    fn describe(&self) -> String {
        format!("command: {}", self.spec.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_files_are_validated_strictly() {
        let ok =
            parse_check(br#"{"passed": false, "summary": {"bad": 3}, "report_md": "x"}"#).unwrap();
        assert!(!ok.passed);
        assert_eq!(ok.summary.unwrap()["bad"], 3);
        assert!(parse_check(br#"{"passed": true}"#).unwrap().passed);
        for (bad, names) in [
            (&br#"{"summary": {}}"#[..], "passed"),
            (br#"{"passed": "yes"}"#, "expected a boolean"),
            (br#"{"passed": true, "summary": [1]}"#, "expected a map"),
            (br#"{"passed": true, "report_md": 3}"#, "expected a string"),
            (br#"{"passed": true, "pased": false}"#, "pased"),
            (b"nope", "expected"),
        ] {
            let err = parse_check(bad).unwrap_err();
            assert!(err.contains(names), "{err}");
            assert!(err.contains("\"passed\": true|false"), "{err}");
        }
    }

    #[test]
    fn long_reports_are_cut_on_a_character_boundary() {
        let report = "é".repeat(REPORT_LIMIT);
        let cut = bounded(report);
        assert!(cut.len() <= REPORT_LIMIT + 32);
        assert!(cut.ends_with("(report truncated)"));
        assert_eq!(bounded("short".into()), "short");
    }
}
