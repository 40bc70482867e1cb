//! A GitHub Actions workflow as the trainer (seed 002 trains on GitHub-hosted
//! runners): `trainer = { github_workflow = { repo, workflow, ref, inputs,
//! timeout } }`.
//!
//! **Start.** `POST /repos/{o}/{r}/actions/workflows/{workflow}/dispatches`
//! with `ref` and the configured `inputs` plus `retrain_job_key`,
//! `dataset_name`, `dataset_version` and `label`. The dispatch answers 204
//! without a run id (GitHub's newer 200 with `workflow_run_id` is used when it
//! comes), so the workflow's `run-name` must contain the job key (template in
//! `examples/github-actions/train-on-runner.yml`): the run is found by
//! listing `…/workflows/{workflow}/runs?event=workflow_dispatch&created=>=…`
//! and matching `display_title`, with bounded polling.
//!
//! **Idempotent for the job key.** `start` first lists the workflow's runs
//! created since the retrain run began (its id is a UUIDv7, so it carries that
//! time; ten minutes of clock skew allowed) and adopts a run whose title names
//! the key; only when there is none does it dispatch. (A first start,
//! `TrainingRequest::first_start`, skips that listing: the intent was just
//! journaled by this process, so no run can name the key yet.) The dispatch is a POST
//! and is never resent blindly: after an answer that was lost (timeout, 5xx)
//! the runs are listed again for the key (polling up to the find timeout) and
//! a run found is adopted; only otherwise is the dispatch sent again. A rate
//! limit refusal (403/429 with `x-ratelimit-remaining: 0` or `retry-after`)
//! provably did not dispatch and is waited out and retried.
//!
//! **Wait.** The run is polled (`status`, `conclusion`); rate limits are
//! waited out by the shared client and other transport trouble is polled
//! through (the engine's `train_timeout` bounds the wait). `success` → the
//! artifact named [`RESULT_ARTIFACT`] is downloaded (size-capped, zip and
//! uncompressed file both) and its [`RESULT_FILE`] validated by the command
//! trainer's §6 result parser; any other conclusion fails with the run URL and
//! the failing job and step (`…/runs/{id}/jobs`). A run that is gone (404) is
//! `Lost`.
//!
//! **Cancel.** `POST …/runs/{id}/cancel`; a 409 on a run that already
//! finished, or a 404, is success.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Cursor, Read};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::{Method, Response, StatusCode};
use retrain_core::domain::{Candidate, TrainingHandle, TrainingOutcome};
use retrain_core::ports::{PortError, Trainer, TrainingRequest};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tracing::{info, warn};
use url::Url;

use crate::command::result::{parse_result, RESULT_LIMIT};
use crate::error::AdapterError;
use crate::github::{failure, split_repo, GithubApi};
use crate::http::{read_limited, Call, Checked, HttpPolicy, Replay};

/// `TrainingHandle::kind` of workflow runs.
pub const HANDLE_KIND: &str = "github-workflow";
/// The artifact holding the §6 result file.
pub const RESULT_ARTIFACT: &str = "retrain-result";
/// The result file at the artifact's root.
pub const RESULT_FILE: &str = "result.json";
/// The workflow inputs retrain sets on every dispatch (the workflow must
/// declare them); configured `inputs` may not use these names.
pub const JOB_KEY_INPUT: &str = "retrain_job_key";
pub const RESERVED_INPUTS: [&str; 4] = [JOB_KEY_INPUT, "dataset_name", "dataset_version", "label"];
/// GitHub accepts at most 10 inputs per dispatch
/// (`shared/reference/external-apis-2.md` §5), retrain's four included.
pub const MAX_INPUTS: usize = 10;
/// Largest artifact zip downloaded (`size_in_bytes` is checked first, the
/// body is capped while reading).
pub const DEFAULT_ARTIFACT_LIMIT: u64 = 8 << 20;
/// How long `start` looks for the run of a dispatch before giving up.
pub const DEFAULT_FIND_TIMEOUT: Duration = Duration::from_secs(120);
/// How often `wait` reads the run: 240 calls an hour, a quarter of the
/// 1,000/h a repository's `GITHUB_TOKEN` gets.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(15);
/// Runs created this long before the retrain run began are still looked at
/// (GitHub's clock against ours).
const CLOCK_SKEW: Duration = Duration::from_secs(600);
/// Pages of 100 runs read at most when looking for a key (GitHub returns at
/// most 1,000 runs for a filtered listing).
const MAX_RUN_PAGES: usize = 10;
/// Largest JSON answer read (a page of 100 runs is about 0.5 MB).
const MAX_JSON_BYTES: usize = 8 << 20;
const ACTIONS_HINT: &str = "the token needs `actions: write` to dispatch and cancel workflow runs and `actions: read` to read runs, jobs and artifacts (workflow `permissions: actions: write`; a fine-grained token: Actions read and write)";

/// Configuration of one workflow trainer.
#[derive(Clone)]
pub struct GithubWorkflowSettings {
    /// `GITHUB_API_URL` (GitHub Enterprise: `https://host/api/v3`).
    pub api_url: String,
    /// `[github] token` / `GITHUB_TOKEN`.
    pub token: SecretString,
    /// `owner/name` of the repository holding the workflow.
    pub repo: String,
    /// The workflow's file name (`train.yml`) or numeric id.
    pub workflow: String,
    /// The branch or tag the workflow runs on.
    pub git_ref: String,
    /// Extra `workflow_dispatch` inputs (strings), besides retrain's four.
    pub inputs: BTreeMap<String, String>,
    pub policy: HttpPolicy,
}

impl fmt::Debug for GithubWorkflowSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubWorkflowSettings")
            .field("api_url", &self.api_url)
            .field("token", &"***")
            .field("repo", &self.repo)
            .field("workflow", &self.workflow)
            .field("git_ref", &self.git_ref)
            .field("inputs", &self.inputs)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Check a workflow reference: a file name under `.github/workflows/`
/// (`train.yml`, no directory) or the workflow's numeric id.
pub fn check_workflow(workflow: &str) -> Result<(), String> {
    let numeric = !workflow.is_empty() && workflow.chars().all(|c| c.is_ascii_digit());
    let stem = workflow
        .strip_suffix(".yml")
        .or_else(|| workflow.strip_suffix(".yaml"));
    let file = stem.is_some_and(|stem| !stem.is_empty())
        && workflow
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if numeric || file {
        Ok(())
    } else {
        Err(format!(
            "`workflow` = {workflow:?}: expected the workflow's file name in .github/workflows/ (e.g. \"train.yml\") or its numeric id"
        ))
    }
}

/// Check an `owner/name` repository.
pub fn check_repo(repo: &str) -> Result<(), String> {
    let valid = split_repo(repo).is_some_and(|(owner, name)| {
        [owner, name].iter().all(|part| {
            part.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
    });
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`repo` = {repo:?}: expected the GitHub repository as \"owner/name\""
        ))
    }
}

/// Check the configured inputs: no name retrain sets itself, and at most
/// [`MAX_INPUTS`] in all.
pub fn check_inputs(inputs: &BTreeMap<String, String>) -> Result<(), String> {
    if let Some(reserved) = inputs
        .keys()
        .find(|k| RESERVED_INPUTS.contains(&k.as_str()))
    {
        return Err(format!(
            "`inputs.{reserved}` is set by retrain on every dispatch ({}); choose another name",
            RESERVED_INPUTS.join(", ")
        ));
    }
    if inputs.keys().any(|k| k.trim().is_empty()) {
        return Err("`inputs` has an empty name".into());
    }
    let max = MAX_INPUTS - RESERVED_INPUTS.len();
    if inputs.len() > max {
        return Err(format!(
            "`inputs` has {} entries; GitHub accepts {MAX_INPUTS} inputs per dispatch and retrain sets {} itself, so at most {max}",
            inputs.len(),
            RESERVED_INPUTS.len()
        ));
    }
    Ok(())
}

/// Whether a run's `display_title` names `key` as a whole word (so key
/// `…/train/1` never matches a title naming `…/train/10`).
pub fn title_names_key(title: &str, key: &str) -> bool {
    if key.is_empty() {
        return false;
    }
    let part_of_key = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '/');
    title.match_indices(key).any(|(at, _)| {
        let before = title[..at].chars().next_back();
        let after = title[at + key.len()..].chars().next();
        !before.is_some_and(part_of_key) && !after.is_some_and(part_of_key)
    })
}

/// `TrainingHandle::data` of workflow runs (journaled; keep it stable).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct HandleData {
    repo: String,
    workflow: String,
    run_id: u64,
    html_url: String,
    job_key: String,
}

/// A workflow run (`GET …/actions/runs/{id}`, `workflow_runs[]`).
#[derive(Debug, Clone, Deserialize)]
struct WorkflowRun {
    id: u64,
    #[serde(default)]
    display_title: String,
    /// `queued`, `in_progress`, `completed`, `waiting`, `requested`, `pending`.
    #[serde(default)]
    status: Option<String>,
    /// `null` until completed.
    #[serde(default)]
    conclusion: Option<String>,
    #[serde(default)]
    html_url: String,
}

#[derive(Debug, Deserialize)]
struct WorkflowRuns {
    #[serde(default)]
    workflow_runs: Vec<WorkflowRun>,
}

/// The 200 answer of a dispatch with run details (GitHub changelog
/// 2026-02-19); a 204 has no body.
#[derive(Debug, Deserialize)]
struct DispatchDetails {
    workflow_run_id: u64,
    #[serde(default)]
    html_url: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Jobs {
    #[serde(default)]
    jobs: Vec<Job>,
}

#[derive(Debug, Deserialize)]
struct Job {
    name: String,
    #[serde(default)]
    conclusion: Option<String>,
    #[serde(default)]
    html_url: Option<String>,
    #[serde(default)]
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
struct Step {
    name: String,
    #[serde(default)]
    conclusion: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Artifacts {
    #[serde(default)]
    artifacts: Vec<Artifact>,
}

#[derive(Debug, Deserialize)]
struct Artifact {
    id: u64,
    name: String,
    #[serde(default)]
    size_in_bytes: u64,
    archive_download_url: String,
    #[serde(default)]
    expired: bool,
}

/// Conclusions that mean the job did not succeed, most telling first.
const FAILED_CONCLUSIONS: [&str; 4] = ["failure", "timed_out", "startup_failure", "cancelled"];

/// Trains by dispatching a GitHub Actions workflow and reading its
/// `retrain-result` artifact.
#[derive(Debug, Clone)]
pub struct GithubWorkflowTrainer {
    api: GithubApi,
    repo: String,
    workflow: String,
    git_ref: String,
    inputs: BTreeMap<String, String>,
    poll_interval: Duration,
    find_timeout: Duration,
    artifact_limit: u64,
}

impl GithubWorkflowTrainer {
    /// Errors name the key that is wrong (`github_workflow.repo`, …,
    /// `GITHUB_TOKEN`), never the token.
    pub fn new(settings: GithubWorkflowSettings) -> Result<Self, AdapterError> {
        check_repo(&settings.repo)
            .map_err(|e| AdapterError::config("trainer.github_workflow.repo", e))?;
        check_workflow(&settings.workflow)
            .map_err(|e| AdapterError::config("trainer.github_workflow.workflow", e))?;
        if settings.git_ref.trim().is_empty() {
            return Err(AdapterError::config(
                "trainer.github_workflow.ref",
                "is empty: the branch or tag the workflow runs on",
            ));
        }
        check_inputs(&settings.inputs)
            .map_err(|e| AdapterError::config("trainer.github_workflow.inputs", e))?;
        Ok(Self {
            api: GithubApi::new(&settings.api_url, &settings.token, settings.policy)?,
            repo: settings.repo,
            workflow: settings.workflow,
            git_ref: settings.git_ref,
            inputs: settings.inputs,
            poll_interval: DEFAULT_POLL_INTERVAL,
            find_timeout: DEFAULT_FIND_TIMEOUT,
            artifact_limit: DEFAULT_ARTIFACT_LIMIT,
        })
    }

    /// How often `wait` reads the run (default [`DEFAULT_POLL_INTERVAL`]).
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How long `start` looks for the run of its dispatch (default
    /// [`DEFAULT_FIND_TIMEOUT`]).
    pub fn with_find_timeout(mut self, timeout: Duration) -> Self {
        self.find_timeout = timeout;
        self
    }

    /// Largest artifact zip accepted (default [`DEFAULT_ARTIFACT_LIMIT`]).
    pub fn with_artifact_limit(mut self, bytes: u64) -> Self {
        self.artifact_limit = bytes;
        self
    }

    fn repo_parts(repo: &str) -> Result<(String, String), PortError> {
        split_repo(repo)
            .ok_or_else(|| PortError::Config(format!("`{repo}` is not an owner/name repository")))
    }

    fn runs_endpoint(&self, repo: &str, rest: &[&str]) -> Result<Url, PortError> {
        let (owner, name) = Self::repo_parts(repo)?;
        let mut segments = vec!["repos", owner.as_str(), name.as_str(), "actions", "runs"];
        segments.extend_from_slice(rest);
        Ok(self.api.endpoint(&segments))
    }

    fn workflow_endpoint(&self, rest: &str) -> Result<Url, PortError> {
        let (owner, name) = Self::repo_parts(&self.repo)?;
        Ok(self.api.endpoint(&[
            "repos",
            &owner,
            &name,
            "actions",
            "workflows",
            &self.workflow,
            rest,
        ]))
    }

    async fn get(&self, what: &str, url: &str) -> Result<Response, PortError> {
        self.api
            .http()
            .send_with(&Call::new(what, Replay::ByMethod), |c| {
                self.api.request(c, Method::GET, url, None)
            })
            .await
    }

    /// GET a JSON answer (at most [`MAX_JSON_BYTES`]), with the URL of its
    /// next page (`Link: rel="next"`, only on the API's own origin).
    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        url: &str,
    ) -> Result<(T, Option<String>), PortError> {
        let response = self.get(what, url).await?;
        if !response.status().is_success() {
            return Err(failure(what, ACTIONS_HINT, response).await);
        }
        let next = self.api.next_link(&response);
        let body = read_limited(what, response, MAX_JSON_BYTES).await?;
        let value = serde_json::from_slice(&body).map_err(|e| {
            PortError::InvalidResponse(format!("{what}: unexpected GitHub answer: {e}"))
        })?;
        Ok((value, next))
    }

    /// The run of this workflow whose title names `key`, created at or after
    /// `since` (every run when unknown); the oldest when several do.
    async fn find_run(
        &self,
        key: &str,
        since: Option<SystemTime>,
    ) -> Result<Option<WorkflowRun>, PortError> {
        let mut url = self.workflow_endpoint("runs")?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("event", "workflow_dispatch");
            if let Some(since) = since {
                query.append_pair("created", &format!(">={}", rfc3339(since)));
            }
            query.append_pair("per_page", "100");
        }
        let what = format!("runs of workflow {} in {}", self.workflow, self.repo);
        let mut next = Some(url.to_string());
        let mut found: Option<WorkflowRun> = None;
        let mut pages = 0;
        while let Some(page_url) = next.take() {
            pages += 1;
            let (page, next_page): (WorkflowRuns, _) = self.get_json(&what, &page_url).await?;
            for run in page.workflow_runs {
                if title_names_key(&run.display_title, key)
                    && found.as_ref().is_none_or(|f| run.id < f.id)
                {
                    found = Some(run);
                }
            }
            if pages < MAX_RUN_PAGES {
                next = next_page;
            }
        }
        Ok(found)
    }

    /// [`Self::find_run`] until the run shows up or `within` has passed.
    async fn await_run(
        &self,
        key: &str,
        since: Option<SystemTime>,
        within: Duration,
    ) -> Result<Option<WorkflowRun>, PortError> {
        let deadline = tokio::time::Instant::now() + within;
        let interval = self.poll_interval.min(Duration::from_secs(5));
        loop {
            if let Some(run) = self.find_run(key, since).await? {
                return Ok(Some(run));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
        }
    }

    fn dispatch_body(&self, request: &TrainingRequest) -> Value {
        let mut inputs: serde_json::Map<String, Value> = self
            .inputs
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        inputs.insert(JOB_KEY_INPUT.into(), json!(request.job_key.as_str()));
        inputs.insert("dataset_name".into(), json!(request.dataset_name));
        inputs.insert(
            "dataset_version".into(),
            json!(request.dataset_version.as_str()),
        );
        inputs.insert("label".into(), json!(request.label.as_str()));
        json!({ "ref": self.git_ref, "inputs": inputs })
    }

    /// Dispatch the workflow for `request`; the run id when GitHub returned
    /// run details, else `None` (204). Never sent twice for an answer that
    /// was lost: the runs are looked at first ([`Checked::AlreadyApplied`]).
    async fn dispatch(
        &self,
        request: &TrainingRequest,
        since: Option<SystemTime>,
    ) -> Result<Option<WorkflowRun>, PortError> {
        let url = self.workflow_endpoint("dispatches")?;
        let body = self.dispatch_body(request);
        let key = request.job_key.as_str();
        let what = format!(
            "dispatching workflow {} of {} on `{}`",
            self.workflow, self.repo, self.git_ref
        );
        let outcome = self
            .api
            .http()
            .send_checked(
                &Call::new(&what, Replay::Never),
                |c| self.api.request(c, Method::POST, url.as_str(), Some(&body)),
                || self.await_run(key, since, self.find_timeout),
            )
            .await?;
        let response = match outcome {
            Checked::AlreadyApplied(run) => {
                info!(repo = %self.repo, workflow = %self.workflow, run = %run.html_url, job_key = key, "the dispatch's answer was lost but its run exists; adopting it");
                return Ok(Some(run));
            }
            Checked::Response(response) => response,
        };
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        if status.is_success() {
            let body = read_limited(&what, response, 1 << 20).await?;
            return Ok(serde_json::from_slice::<DispatchDetails>(&body)
                .ok()
                .map(|details| WorkflowRun {
                    id: details.workflow_run_id,
                    display_title: String::new(),
                    status: None,
                    conclusion: None,
                    html_url: details.html_url.unwrap_or_default(),
                }));
        }
        let error = failure(&what, ACTIONS_HINT, response).await;
        Err(match (status, error) {
            (StatusCode::UNPROCESSABLE_ENTITY, PortError::Failed(message)) => PortError::Failed(format!(
                "{message} (the workflow must have `on: workflow_dispatch` on `{}` and declare the inputs {} plus {})",
                self.git_ref,
                RESERVED_INPUTS.join(", "),
                if self.inputs.is_empty() { "nothing else".to_owned() } else { self.inputs.keys().cloned().collect::<Vec<_>>().join(", ") }
            )),
            (_, error) => error,
        })
    }

    fn handle(&self, run: &WorkflowRun, key: &str) -> Result<TrainingHandle, PortError> {
        let html_url = if run.html_url.is_empty() {
            self.web_run_url(run.id)
        } else {
            run.html_url.clone()
        };
        let data = HandleData {
            repo: self.repo.clone(),
            workflow: self.workflow.clone(),
            run_id: run.id,
            html_url,
            job_key: key.to_owned(),
        };
        Ok(TrainingHandle {
            kind: HANDLE_KIND.to_owned(),
            data: serde_json::to_value(data)
                .map_err(|e| PortError::Failed(format!("cannot encode the handle: {e}")))?,
        })
    }

    /// `https://github.com/o/r/actions/runs/N` (Enterprise: the API host
    /// without `/api/v3`), when GitHub's answer did not carry `html_url`.
    fn web_run_url(&self, run_id: u64) -> String {
        let base = self.api.base();
        let web = match base.host_str() {
            Some("api.github.com") => "https://github.com".to_owned(),
            _ => base
                .as_str()
                .trim_end_matches('/')
                .trim_end_matches("/api/v3")
                .to_owned(),
        };
        format!("{web}/{}/actions/runs/{run_id}", self.repo)
    }

    fn handle_data(&self, handle: &TrainingHandle) -> Result<HandleData, PortError> {
        if handle.kind != HANDLE_KIND {
            return Err(PortError::Config(format!(
                "workflow trainer {} cannot await a `{}` job (expected `{HANDLE_KIND}`)",
                self.describe(),
                handle.kind
            )));
        }
        // The journaled repository wins over the configured one: a resumed
        // run awaits the run it actually started.
        serde_json::from_value(handle.data.clone()).map_err(|e| {
            PortError::Config(format!(
                "journaled handle of workflow trainer {} is malformed: {e}",
                self.describe()
            ))
        })
    }

    /// The run, `None` when GitHub answers 404 (deleted, or no longer visible).
    async fn read_run(&self, data: &HandleData) -> Result<Option<WorkflowRun>, PortError> {
        let url = self.runs_endpoint(&data.repo, &[&data.run_id.to_string()])?;
        let what = format!("workflow run {}", data.html_url);
        let response = self.get(&what, url.as_str()).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(failure(&what, ACTIONS_HINT, response).await);
        }
        let body = read_limited(&what, response, MAX_JSON_BYTES).await?;
        serde_json::from_slice(&body).map(Some).map_err(|e| {
            PortError::InvalidResponse(format!("{what}: unexpected GitHub answer: {e}"))
        })
    }

    /// "job `train` failed at step `Train` (https://…)", from the run's jobs.
    async fn failing_job(&self, data: &HandleData) -> Result<Option<String>, PortError> {
        let mut url = self.runs_endpoint(&data.repo, &[&data.run_id.to_string(), "jobs"])?;
        url.query_pairs_mut()
            .append_pair("filter", "latest")
            .append_pair("per_page", "100");
        let what = format!("jobs of workflow run {}", data.html_url);
        let (jobs, _): (Jobs, _) = self.get_json(&what, url.as_str()).await?;
        let job = FAILED_CONCLUSIONS.iter().find_map(|wanted| {
            jobs.jobs
                .iter()
                .find(|job| job.conclusion.as_deref() == Some(wanted))
        });
        Ok(job.map(|job| {
            let conclusion = job.conclusion.as_deref().unwrap_or("failure");
            let step = job
                .steps
                .iter()
                .find(|s| FAILED_CONCLUSIONS.contains(&s.conclusion.as_deref().unwrap_or("")))
                .map(|s| format!(" at step `{}`", s.name))
                .unwrap_or_default();
            let link = job
                .html_url
                .as_deref()
                .map(|u| format!(" ({u})"))
                .unwrap_or_default();
            format!("job `{}` {conclusion}{step}{link}", job.name)
        }))
    }

    /// Download the run's `retrain-result` artifact and validate its
    /// `result.json`.
    async fn read_result(&self, data: &HandleData) -> Result<Candidate, PortError> {
        let mut url = self.runs_endpoint(&data.repo, &[&data.run_id.to_string(), "artifacts"])?;
        url.query_pairs_mut()
            .append_pair("name", RESULT_ARTIFACT)
            .append_pair("per_page", "100");
        let what = format!("artifacts of workflow run {}", data.html_url);
        let (listing, _): (Artifacts, _) = self.get_json(&what, url.as_str()).await?;
        let named: Vec<&Artifact> = listing
            .artifacts
            .iter()
            .filter(|a| a.name == RESULT_ARTIFACT)
            .collect();
        // A re-run uploads the artifact again: the newest one is the result.
        let Some(artifact) = named.iter().filter(|a| !a.expired).max_by_key(|a| a.id) else {
            let why = if named.is_empty() {
                format!(
                    "uploaded no artifact named `{RESULT_ARTIFACT}`: the workflow must upload {RESULT_FILE} with actions/upload-artifact (`name: {RESULT_ARTIFACT}`)"
                )
            } else {
                format!("has an artifact `{RESULT_ARTIFACT}` but it expired")
            };
            return Err(PortError::Failed(format!(
                "workflow run {} succeeded but {why}",
                data.html_url
            )));
        };
        let what = format!(
            "artifact `{RESULT_ARTIFACT}` (id {}) of workflow run {}",
            artifact.id, data.html_url
        );
        if artifact.size_in_bytes > self.artifact_limit {
            return Err(PortError::InvalidResponse(format!(
                "{what} is {} bytes, over the {} byte limit: upload only {RESULT_FILE} in it",
                artifact.size_in_bytes, self.artifact_limit
            )));
        }
        // Sent with the token, so only to GitHub's API itself; GitHub then
        // redirects to short-lived blob storage, and the client drops the
        // Authorization header on that cross-origin redirect.
        let download = Url::parse(&artifact.archive_download_url)
            .ok()
            .filter(|u| self.api.is_own(u))
            .ok_or_else(|| {
                PortError::InvalidResponse(format!(
                    "{what}: its archive_download_url is not on {}; not sending the token there",
                    self.api.base().origin().ascii_serialization()
                ))
            })?;
        let response = self.get(&what, download.as_str()).await?;
        if response.status() == StatusCode::GONE {
            return Err(PortError::Failed(format!(
                "{what} expired before it could be downloaded (HTTP 410)"
            )));
        }
        if !response.status().is_success() {
            return Err(failure(&what, ACTIONS_HINT, response).await);
        }
        let limit = usize::try_from(self.artifact_limit).unwrap_or(usize::MAX);
        let zip = read_limited(&what, response, limit).await?;
        result_from_zip(&what, &zip)
    }

    async fn conclude(
        &self,
        data: &HandleData,
        run: WorkflowRun,
    ) -> Result<TrainingOutcome, PortError> {
        let conclusion = run.conclusion.as_deref().unwrap_or("none");
        if conclusion == "success" {
            let candidate = self.read_result(data).await?;
            info!(run = %data.html_url, candidate = %candidate.id, "workflow run succeeded");
            return Ok(TrainingOutcome::Finished(candidate));
        }
        let job = match self.failing_job(data).await {
            Ok(Some(job)) => format!("; {job}"),
            Ok(None) => String::new(),
            Err(e) => format!("; the failing job could not be read: {e}"),
        };
        Err(PortError::Failed(format!(
            "workflow run {} (job key {}) concluded `{conclusion}`{job}",
            data.html_url, data.job_key
        )))
    }
}

/// The §6 result inside the artifact zip: `result.json` at its root, at most
/// [`RESULT_LIMIT`] bytes uncompressed (declared *and* actually read, so a
/// zip that lies about its sizes is caught), validated by the command
/// trainer's parser.
fn result_from_zip(what: &str, zip: &[u8]) -> Result<Candidate, PortError> {
    let invalid = |m: String| PortError::InvalidResponse(format!("{what}: {m}"));
    let mut archive = zip::ZipArchive::new(Cursor::new(zip))
        .map_err(|e| invalid(format!("is not a readable zip archive: {e}")))?;
    let names: Vec<String> = archive
        .file_names()
        .take(10)
        .filter_map(|name| name.ok().map(|n| n.into_owned()))
        .collect();
    let mut file = match archive.by_name(RESULT_FILE) {
        Ok(file) => file,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(invalid(format!(
                "holds no `{RESULT_FILE}` at its root (it holds: {}); upload the result file itself with `path: {RESULT_FILE}`",
                if names.is_empty() { "nothing".to_owned() } else { names.join(", ") }
            )))
        }
        Err(e) => return Err(invalid(format!("cannot read `{RESULT_FILE}`: {e}"))),
    };
    if file.size() > RESULT_LIMIT {
        return Err(invalid(format!(
            "`{RESULT_FILE}` is {} bytes uncompressed, over the {RESULT_LIMIT} byte (1 MiB) limit",
            file.size()
        )));
    }
    let mut bytes = Vec::new();
    (&mut file)
        .take(RESULT_LIMIT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(format!("cannot read `{RESULT_FILE}`: {e}")))?;
    if bytes.len() as u64 > RESULT_LIMIT {
        return Err(invalid(format!(
            "`{RESULT_FILE}` inflates to more than {RESULT_LIMIT} bytes (1 MiB)"
        )));
    }
    parse_result(&bytes).map_err(|e| invalid(format!("`{RESULT_FILE}` {e}")))
}

/// When the retrain run began, from its UUIDv7 id, minus [`CLOCK_SKEW`]: no
/// run dispatched for one of its job keys can be older. `None` for an id
/// that is not a UUIDv7 (every run is looked at then).
fn intent_time(request: &TrainingRequest) -> Option<SystemTime> {
    let id = uuid::Uuid::parse_str(request.run_id.as_str()).ok()?;
    if id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    let began = UNIX_EPOCH + Duration::new(secs, nanos);
    began.checked_sub(CLOCK_SKEW)
}

fn rfc3339(time: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[async_trait]
impl Trainer for GithubWorkflowTrainer {
    /// Idempotent for `request.job_key` (see the module doc): a run already
    /// dispatched for the key is adopted, never dispatched twice.
    async fn start(&self, request: &TrainingRequest) -> Result<TrainingHandle, PortError> {
        let key = request.job_key.as_str();
        let since = intent_time(request);
        // A first start (this process just journaled the intent) has no
        // run to adopt: no listing of the workflow's runs.
        let adoptable = if request.first_start {
            None
        } else {
            self.find_run(key, since).await?
        };
        if let Some(run) = adoptable {
            info!(repo = %self.repo, workflow = %self.workflow, run = %run.html_url, job_key = key, "a run was already dispatched for this job; adopting it");
            return self.handle(&run, key);
        }
        let run = match self.dispatch(request, since).await? {
            Some(run) => run,
            None => self
                .await_run(key, since, self.find_timeout)
                .await?
                .ok_or_else(|| {
                    PortError::Failed(format!(
                        "dispatched workflow {} of {} on `{}` for job {key}, but no run whose title names the key appeared within {}s: the workflow's `run-name` must contain `${{{{ inputs.{JOB_KEY_INPUT} }}}}` (see examples/github-actions/train-on-runner.yml)",
                        self.workflow,
                        self.repo,
                        self.git_ref,
                        self.find_timeout.as_secs()
                    ))
                })?,
        };
        info!(repo = %self.repo, workflow = %self.workflow, run = %run.html_url, job_key = key, "workflow dispatched");
        self.handle(&run, key)
    }

    async fn wait(
        &self,
        _request: &TrainingRequest,
        handle: &TrainingHandle,
    ) -> Result<TrainingOutcome, PortError> {
        let data = self.handle_data(handle)?;
        loop {
            match self.read_run(&data).await {
                Ok(Some(run)) if run.status.as_deref() == Some("completed") => {
                    return self.conclude(&data, run).await
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Ok(TrainingOutcome::Lost {
                        reason: format!(
                            "workflow run {} is gone (HTTP 404): deleted, or no longer visible to the token",
                            data.html_url
                        ),
                    })
                }
                // The client already retried; keep polling, the engine's
                // train_timeout bounds the wait.
                Err(PortError::Transient(e)) => {
                    warn!(run = %data.html_url, error = %e, "reading the workflow run failed; polling again")
                }
                Err(e) => return Err(e),
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// `POST …/runs/{id}/cancel`. Cancelling twice is cancelling once, so the
    /// request may be resent; a 409 on a run that already finished and a
    /// 404 (gone) are success.
    async fn cancel(&self, handle: &TrainingHandle) -> Result<(), PortError> {
        let data = self.handle_data(handle)?;
        let url = self.runs_endpoint(&data.repo, &[&data.run_id.to_string(), "cancel"])?;
        let what = format!("cancelling workflow run {}", data.html_url);
        let response = self
            .api
            .http()
            .send_with(&Call::new(&what, Replay::Idempotent), |c| {
                self.api.request(c, Method::POST, url.as_str(), None)
            })
            .await?;
        match response.status() {
            s if s.is_success() => {
                info!(run = %data.html_url, "workflow run cancelled");
                Ok(())
            }
            StatusCode::NOT_FOUND => {
                info!(run = %data.html_url, "workflow run is gone; nothing to cancel");
                Ok(())
            }
            StatusCode::CONFLICT => match self.read_run(&data).await? {
                Some(run) if run.status.as_deref() != Some("completed") => {
                    Err(PortError::Failed(format!(
                        "{what}: GitHub refused (HTTP 409) while the run is `{}`",
                        run.status.as_deref().unwrap_or("unknown")
                    )))
                }
                _ => {
                    info!(run = %data.html_url, "workflow run already finished; nothing to cancel");
                    Ok(())
                }
            },
            _ => Err(failure(&what, ACTIONS_HINT, response).await),
        }
    }

    fn describe(&self) -> String {
        format!(
            "github-workflow://{}/{}@{}",
            self.repo, self.workflow, self.git_ref
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_name_a_key_only_as_a_whole_word() {
        let key = "0190a1b2-0000-7000-8000-000000000001/train/1";
        assert!(title_names_key(&format!("retrain seg {key}"), key));
        assert!(title_names_key(&format!("retrain [{key}]"), key));
        assert!(title_names_key(key, key));
        assert!(!title_names_key(&format!("retrain seg {key}0"), key));
        assert!(!title_names_key(&format!("retrain seg x{key}"), key));
        assert!(!title_names_key("retrain seg", key));
        assert!(!title_names_key("anything", ""));
    }

    #[test]
    fn configuration_is_checked() {
        assert!(check_repo("acme/ml").is_ok());
        for bad in ["acme", "acme/", "/ml", "a/b/c", "acme/m l"] {
            let err = check_repo(bad).unwrap_err();
            assert!(err.contains("`repo`"), "{err}");
        }
        assert!(check_workflow("train.yml").is_ok());
        assert!(check_workflow("train.yaml").is_ok());
        assert!(check_workflow("161335").is_ok());
        for bad in [
            "",
            "train",
            ".github/workflows/train.yml",
            ".yml",
            "a b.yml",
        ] {
            let err = check_workflow(bad).unwrap_err();
            assert!(err.contains("`workflow`"), "{err}");
        }
        let mut inputs = BTreeMap::new();
        inputs.insert("epochs".to_owned(), "20".to_owned());
        assert!(check_inputs(&inputs).is_ok());
        inputs.insert("label".to_owned(), "x".to_owned());
        assert!(check_inputs(&inputs).unwrap_err().contains("inputs.label"));
        let many: BTreeMap<String, String> =
            (0..7).map(|i| (format!("i{i}"), String::new())).collect();
        assert!(check_inputs(&many).unwrap_err().contains("at most 6"));
    }

    #[test]
    fn the_intent_time_comes_from_the_run_id() {
        use retrain_core::domain::{JobKey, Label, RunId, VersionTag};
        let run_id = RunId::generate();
        let request = TrainingRequest {
            label: Label::new("seg").unwrap(),
            job_key: JobKey::training(&run_id, 1),
            run_id,
            attempt: 1,
            dataset_name: "d".into(),
            dataset_version: VersionTag::new("v1"),
            lease: None,
            first_start: false,
        };
        let since = intent_time(&request).unwrap();
        let ago = SystemTime::now().duration_since(since).unwrap();
        assert!(ago >= CLOCK_SKEW && ago < CLOCK_SKEW + Duration::from_secs(60));
        let other = TrainingRequest {
            run_id: retrain_core::domain::RunId("not-a-uuid".into()),
            ..request
        };
        assert_eq!(intent_time(&other), None);
    }
}
