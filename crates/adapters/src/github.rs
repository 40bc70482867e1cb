//! GitHub notifier: one comment or pull request per label, updated in place.
//!
//! The report's markdown carries a hidden marker
//! `<!-- retrain:label=<label> -->`; the notifier finds its earlier comment
//! (or open PR) by that marker and PATCHes it instead of posting another, so
//! an issue or PR never fills up with one comment per cycle (CML users' top
//! complaint). REST API version `2022-11-28`; auto-merge through GraphQL
//! `enablePullRequestAutoMerge`, as `gh pr merge --auto` does.
//!
//! **Only its own marker.** A comment or PR is adopted only when it carries
//! the marker *and* was authored by the token's own account (`GET /user`,
//! once per notifier; for a GitHub App installation token, where `GET /user`
//! answers 403, the configured [`GithubNotifier::with_app_login`], else any
//! App bot: `user.type == "Bot"` and `performed_via_github_app` not null).
//! Someone pasting the marker into their own comment gets a new comment
//! next to theirs, never an edit of theirs.
//!
//! **Exactly one comment.** Creating a comment or PR is a POST and is never
//! resent blindly: when its answer is lost (timeout, dropped connection,
//! 5xx), the notifier lists again and adopts its own marker comment (or its
//! own PR) if GitHub did create it, and only otherwise posts again. A
//! "pull request already exists" 422 is adopted the same way.
//!
//! **Rate limits** (403/429 with `x-ratelimit-remaining: 0` or
//! `retry-after`) are waited out by the shared client, at most
//! [`MAX_RATE_LIMIT_WAIT`] per wait; they are never reported as a
//! permission error.
//!
//! **Pull requests carry a commit.** [`GithubTarget::PullRequest`] writes
//! the label's model file ([`model_file`], at `models/<label>.json` unless
//! configured) as one commit on the base branch through the Git Data API
//! (tree, commit, then the branch ref created or force-updated to it), then
//! opens or updates the label's one PR. A later promotion replaces that
//! commit with a new one on the current base: same branch, same PR. The
//! branch never points at the base itself, which would make GitHub close
//! the open PR. A branch holding commits retrain did not make (they carry
//! the `Retrain-Label:` trailer) is never force-updated.
//!
//! **The triggering pull request.** [`GithubTarget::TriggeringPullRequest`]
//! (seed 002: a data PR triggers training) posts the report on that PR and,
//! when the model improved, commits the model file to the PR's own branch
//! (Contents API), approves the PR and enables squash auto-merge. The PR
//! number comes from the workflow's event ([`triggering_pull_request`]).

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::{LabelReport, LabelStatus};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use tokio::sync::OnceCell;
use tracing::{info, warn};
use url::Url;

use crate::error::AdapterError;
use crate::http::{
    error_for_status, is_rate_limited, Call, Checked, HttpPolicy, Replay, RetryingClient,
};

pub const DEFAULT_API_URL: &str = "https://api.github.com";
const API_VERSION: &str = "2022-11-28";
const ACCEPT: &str = "application/vnd.github+json";
const PERMISSION_HINT: &str = "GITHUB_TOKEN needs `issues: write` (comments) or `pull-requests: write` and `contents: write` (pull requests, auto-merge)";
/// Branches, commits and files (Git Data and Contents APIs).
const CONTENTS_HINT: &str = "GITHUB_TOKEN needs `contents: write` (workflow `permissions: contents: write`; a fine-grained token: Contents read and write) to create the branch and commit the model file";
/// Opening, updating, reviewing and merging pull requests.
const PULLS_HINT: &str = "GITHUB_TOKEN needs `pull-requests: write` (workflow `permissions: pull-requests: write`; a fine-grained token: Pull requests read and write) to open, update, approve and merge pull requests";
/// Pages followed at most when looking for our comment (100 per page).
const MAX_PAGES: usize = 50;
/// Longest rate-limit wait (`retry-after`, `x-ratelimit-reset`) the notifier
/// sits through; a longer one fails the notification as `Transient`.
pub const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// When to notify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NotifyOn {
    /// Only when the model improved (promoted): the seed's "PR only if improved".
    #[default]
    Improved,
    Always,
}

impl NotifyOn {
    pub fn wants(self, report: &LabelReport) -> bool {
        match self {
            Self::Always => true,
            Self::Improved => report.improved(),
        }
    }
}

/// Where the report goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubTarget {
    /// A comment on an issue or pull request, updated in place.
    Comment { issue: u64 },
    /// Only for an improved model: commit the model file (`file`, default
    /// [`default_pr_file`]) on top of `base` as branch `head` (created, or
    /// force-updated when it only holds retrain's commits), then open or
    /// update the label's pull request from `head` into `base`, whose body
    /// is the report; `auto_merge` enables squash auto-merge on it.
    PullRequest {
        head: String,
        base: String,
        auto_merge: bool,
        file: Option<String>,
    },
    /// The pull request that triggered the workflow (`on: pull_request`):
    /// the report is posted on it (the label's comment, updated in place);
    /// an improved model's file (`file`, default [`default_pr_file`]) is
    /// committed to its branch, then it is approved (`approve`) and
    /// squash auto-merge is enabled (`auto_merge`). A model that did not
    /// improve gets a comment saying why, and auto-merge is turned off.
    TriggeringPullRequest {
        number: u64,
        approve: bool,
        auto_merge: bool,
        file: Option<String>,
    },
}

/// Where the promoted model lives, as written into the committed model file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegistryRef {
    /// `mlflow`, `json`, …
    pub kind: String,
    /// The registry's address, without credentials (`None`: not shown).
    pub uri: Option<String>,
    /// The registered model's name.
    pub model: String,
    /// The alias (or, with legacy stages, the stage) production points at.
    pub alias: Option<String>,
    pub stage: Option<String>,
}

/// Configuration of the GitHub notifier.
#[derive(Clone)]
pub struct GithubSettings {
    /// `GITHUB_API_URL` (GitHub Enterprise: `https://host/api/v3`).
    pub api_url: String,
    /// `GITHUB_TOKEN`.
    pub token: SecretString,
    /// `owner/name`.
    pub repo: String,
    pub on: NotifyOn,
    pub target: GithubTarget,
    pub policy: HttpPolicy,
    /// The label's registry, written into the committed model file.
    pub registry: Option<RegistryRef>,
    /// Where the full report can be read (the Actions run:
    /// [`actions_run_url_from_env`]), written into the model file.
    pub report_url: Option<String>,
}

impl fmt::Debug for GithubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubSettings")
            .field("api_url", &self.api_url)
            .field("token", &"***")
            .field("repo", &self.repo)
            .field("on", &self.on)
            .field("target", &self.target)
            .field("policy", &self.policy)
            .field("registry", &self.registry)
            .field("report_url", &self.report_url)
            .finish()
    }
}

impl GithubSettings {
    /// `api_url` from `GITHUB_API_URL` (set by GitHub Actions), else api.github.com.
    pub fn default_api_url() -> String {
        std::env::var("GITHUB_API_URL")
            .ok()
            .filter(|v| !v.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned())
    }
}

/// Where a label's model file is committed unless `pr_file` says otherwise.
pub fn default_pr_file(label: &str) -> String {
    format!("models/{label}.json")
}

/// Check a `pr_file` path: relative, `/`-separated, no `.`/`..` segments,
/// and not under `.github/workflows/` (GitHub refuses those to a token
/// without the `workflow` scope).
pub fn check_pr_file(path: &str) -> Result<(), String> {
    if path.trim().is_empty() {
        return Err("`pr_file` is empty".into());
    }
    if path.starts_with('/') || path.contains('\\') {
        return Err(format!(
            "`pr_file` = `{path}` must be a path relative to the repository root, with `/` separators"
        ));
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return Err(format!(
            "`pr_file` = `{path}` has an empty, `.` or `..` segment"
        ));
    }
    if path.starts_with(".github/workflows/") {
        return Err(format!(
            "`pr_file` = `{path}`: GitHub refuses writes under .github/workflows/ without the `workflow` scope; choose another path"
        ));
    }
    Ok(())
}

/// The model file committed by the pull-request targets: which model was
/// promoted, from which candidate and dataset, with which metrics and gate
/// verdict. Pretty JSON with sorted keys and a final newline; non-finite
/// metrics are `null`. Nothing time-dependent, so the same promotion always
/// gives the same bytes (a re-run commits nothing new).
pub fn model_file(
    report: &LabelReport,
    registry: Option<&RegistryRef>,
    report_url: Option<&str>,
) -> String {
    let registry_json = registry.map(|r| {
        json!({
            "kind": r.kind,
            "uri": r.uri,
            "alias": r.alias,
            "stage": r.stage,
        })
    });
    let metrics: serde_json::Map<String, Value> = report
        .candidate
        .as_ref()
        .map(|c| {
            c.metrics
                .iter()
                .map(|(name, value)| (name.clone(), json!(value)))
                .collect()
        })
        .unwrap_or_default();
    let verdict = report.verdict.as_ref().map(|v| {
        json!({
            "passed": v.passed,
            "first_model": v.first_model,
            "forced": v.forced,
            "reason": v.reason,
            "comparisons": v.comparisons.iter().map(|c| json!({
                "metric": c.metric,
                "candidate": c.candidate,
                "production": c.baseline,
                "delta": c.delta,
                "passed": c.passed,
            })).collect::<Vec<_>>(),
        })
    });
    let file = json!({
        "label": report.label.as_str(),
        "status": report.status.as_str(),
        "registry": registry_json,
        "model": registry.map(|r| r.model.clone()),
        "version": report.promoted.as_ref().map(|p| p.version.clone()),
        "previous_version": report.promoted.as_ref().and_then(|p| p.previous.clone()),
        "candidate": report.candidate.as_ref().map(|c| c.id.clone()).filter(|id| !id.is_empty()),
        "dataset_version": report.dataset_version.as_ref().map(|v| v.to_string()),
        "dataset_samples": report.dataset_samples,
        "metrics": metrics,
        "verdict": verdict,
        "run_id": report.run_id.as_ref().map(|r| r.to_string()),
        "report_url": report_url,
    });
    let mut text = serde_json::to_string_pretty(&file).expect("a JSON value always serialises");
    text.push('\n');
    text
}

/// The trailer on every commit retrain makes for `label`: how it recognises
/// a branch it may force-update.
fn trailer(label: &str) -> String {
    format!("Retrain-Label: {label}")
}

fn carries_trailer(message: &str, label: &str) -> bool {
    let trailer = trailer(label);
    message.lines().any(|line| line.trim() == trailer)
}

fn commit_message(report: &LabelReport, path: &str) -> String {
    let mut subject = format!("retrain: {} model", report.label);
    if let Some(promoted) = &report.promoted {
        subject.push_str(&format!(" version {}", promoted.version));
    }
    if let Some(dataset) = &report.dataset_version {
        subject.push_str(&format!(" (dataset {dataset})"));
    }
    let mut message = format!(
        "{subject}\n\nUpdate {path}.\n\n{}",
        trailer(report.label.as_str())
    );
    if let Some(run) = &report.run_id {
        message.push_str(&format!("\nRetrain-Run: {run}"));
    }
    message
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

/// The number of the pull request that triggered the workflow: the event
/// JSON at `event_path` (`GITHUB_EVENT_PATH`: `pull_request.number`, else
/// `number`, else `issue.number` of a comment on a PR), else `github_ref`
/// (`GITHUB_REF` = `refs/pull/<N>/merge` or `refs/pull/<N>/head`). The error
/// names both variables and what they held.
pub fn triggering_pull_request(
    event_path: Option<&Path>,
    github_ref: Option<&str>,
) -> Result<u64, AdapterError> {
    let mut tried = Vec::new();
    match event_path {
        Some(path) => match std::fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(event) => {
                    if let Some(number) = event_pull_request(&event) {
                        return Ok(number);
                    }
                    tried.push(format!(
                        "the event in GITHUB_EVENT_PATH ({}) has no `pull_request.number` nor `number`",
                        path.display()
                    ));
                }
                Err(e) => tried.push(format!(
                    "GITHUB_EVENT_PATH ({}) is not JSON: {e}",
                    path.display()
                )),
            },
            Err(e) => tried.push(format!(
                "GITHUB_EVENT_PATH ({}) cannot be read: {e}",
                path.display()
            )),
        },
        None => tried.push("GITHUB_EVENT_PATH is not set".into()),
    }
    match github_ref {
        Some(git_ref) => {
            if let Some(number) = ref_pull_request(git_ref) {
                return Ok(number);
            }
            tried.push(format!(
                "GITHUB_REF (`{git_ref}`) is not `refs/pull/<N>/merge`"
            ));
        }
        None => tried.push("GITHUB_REF is not set".into()),
    }
    Err(AdapterError::config(
        "notify.github.pr",
        format!(
            "`pr = \"triggering\"` needs the pull request that triggered the workflow (run it `on: pull_request`), but {}",
            tried.join(", and ")
        ),
    ))
}

/// [`triggering_pull_request`] from `GITHUB_EVENT_PATH` and `GITHUB_REF`.
pub fn triggering_pull_request_from_env() -> Result<u64, AdapterError> {
    let event_path = non_empty(std::env::var("GITHUB_EVENT_PATH").ok());
    let github_ref = non_empty(std::env::var("GITHUB_REF").ok());
    triggering_pull_request(event_path.as_deref().map(Path::new), github_ref.as_deref())
}

fn event_pull_request(event: &Value) -> Option<u64> {
    let number = |v: Option<&Value>| v.and_then(Value::as_u64).filter(|n| *n > 0);
    number(event.pointer("/pull_request/number"))
        .or_else(|| number(event.get("number")))
        .or_else(|| {
            event
                .pointer("/issue/pull_request")
                .filter(|v| !v.is_null())
                .and_then(|_| number(event.pointer("/issue/number")))
        })
}

fn ref_pull_request(git_ref: &str) -> Option<u64> {
    let rest = git_ref.strip_prefix("refs/pull/")?;
    let (number, tail) = rest.split_once('/')?;
    matches!(tail, "merge" | "head")
        .then(|| number.parse::<u64>().ok())
        .flatten()
        .filter(|n| *n > 0)
}

/// The URL of the running GitHub Actions run (its summary holds the full
/// report): `$GITHUB_SERVER_URL/$GITHUB_REPOSITORY/actions/runs/$GITHUB_RUN_ID`,
/// `None` outside Actions.
pub fn actions_run_url_from_env() -> Option<String> {
    let server = non_empty(std::env::var("GITHUB_SERVER_URL").ok())?;
    let repository = non_empty(std::env::var("GITHUB_REPOSITORY").ok())?;
    let run = non_empty(std::env::var("GITHUB_RUN_ID").ok())?;
    Some(format!(
        "{}/{repository}/actions/runs/{run}",
        server.trim_end_matches('/')
    ))
}

/// `Notifier` posting to GitHub.
#[derive(Debug, Clone)]
pub struct GithubNotifier {
    settings: GithubSettings,
    api: GithubApi,
    owner: String,
    name: String,
    /// The App bot login (`my-app[bot]`) to recognise our own comments by
    /// when the token is an installation token (`GET /user` answers 403).
    app_login: Option<String>,
    /// Who the token acts as, asked once (`GET /user`) and cached.
    me: Arc<OnceCell<Me>>,
    /// The login GitHub put on a comment or PR we created: the truth, which
    /// overrides `me` from then on.
    learned: Arc<Mutex<Option<String>>>,
}

/// The account the token acts as, to recognise our own comments and PRs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Me {
    /// `GET /user`'s login, the configured App bot login, or the login of a
    /// comment we created.
    Login(String),
    /// An App installation token whose bot login is unknown: any App bot
    /// (`user.type == "Bot"`, `performed_via_github_app` not null).
    AnyAppBot,
}

impl Me {
    fn wrote(&self, user: Option<&Author>, app: Option<&Option<Value>>) -> bool {
        let Some(user) = user else {
            return false;
        };
        match self {
            // GitHub logins are case-insensitive.
            Self::Login(login) => user.login.eq_ignore_ascii_case(login),
            Self::AnyAppBot => user.kind == "Bot" && !matches!(app, Some(None)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct Author {
    login: String,
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct Comment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    user: Option<Author>,
    /// Absent → `None`; `null` → `Some(None)`; an App → `Some(Some(app))`.
    #[serde(default, deserialize_with = "present")]
    performed_via_github_app: Option<Option<Value>>,
}

#[derive(Debug, Clone, Deserialize)]
struct PullRequest {
    number: u64,
    #[serde(default)]
    node_id: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    html_url: String,
    #[serde(default)]
    user: Option<Author>,
    /// `open` or `closed`.
    #[serde(default)]
    state: String,
    #[serde(default)]
    head: Option<PrBranch>,
    /// `null` unless auto-merge is enabled.
    #[serde(default)]
    auto_merge: Option<Value>,
}

#[derive(Debug, Clone, Deserialize)]
struct PrBranch {
    #[serde(rename = "ref")]
    name: String,
    /// `null` when the fork it came from was deleted.
    #[serde(default)]
    repo: Option<RepoName>,
}

#[derive(Debug, Clone, Deserialize)]
struct RepoName {
    full_name: String,
}

/// A pull request review (`GET /repos/{o}/{r}/pulls/{n}/reviews`).
#[derive(Debug, Deserialize)]
struct Review {
    id: u64,
    #[serde(default)]
    user: Option<Author>,
    /// `APPROVED`, `CHANGES_REQUESTED`, `COMMENTED`, `DISMISSED`, `PENDING`.
    #[serde(default)]
    state: String,
}

/// `GET /repos/{o}/{r}/git/ref/{ref}`.
#[derive(Debug, Deserialize)]
struct GitRef {
    object: GitObject,
}

#[derive(Debug, Deserialize)]
struct GitObject {
    sha: String,
}

/// `GET /repos/{o}/{r}/git/commits/{sha}` (and `POST …/git/commits`).
#[derive(Debug, Deserialize)]
struct GitCommit {
    sha: String,
    #[serde(default)]
    message: String,
    tree: GitObject,
    #[serde(default)]
    parents: Vec<GitObject>,
}

/// `GET /repos/{o}/{r}/compare/{base}...{head}`.
#[derive(Debug, Deserialize)]
struct Comparison {
    ahead_by: u64,
    #[serde(default)]
    commits: Vec<ComparedCommit>,
}

#[derive(Debug, Deserialize)]
struct ComparedCommit {
    sha: String,
    commit: CommitText,
}

#[derive(Debug, Deserialize)]
struct CommitText {
    #[serde(default)]
    message: String,
}

/// A file as the Contents API returns it: its blob sha and its bytes (when
/// GitHub sent them: files over 1 MB come without content).
#[derive(Debug, Clone)]
struct RepoFile {
    sha: String,
    content: Option<Vec<u8>>,
}

impl RepoFile {
    fn holds(&self, content: &str) -> bool {
        self.content.as_deref() == Some(content.as_bytes())
    }
}

/// Tell a present `null` from an absent field.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<Value>>, D::Error> {
    Option::<Value>::deserialize(d).map(Some)
}

fn carries(body: Option<&str>, marker: &str) -> bool {
    body.is_some_and(|b| b.contains(marker))
}

/// The hidden marker identifying a label's comment / PR.
pub fn marker(label: &str) -> String {
    format!("<!-- retrain:label={label} -->")
}

/// `owner/name` → (`owner`, `name`): both non-empty, exactly one `/`.
pub(crate) fn split_repo(repo: &str) -> Option<(String, String)> {
    repo.split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
        .map(|(o, n)| (o.to_owned(), n.to_owned()))
}

/// GitHub's REST API as every GitHub adapter talks to it (the notifier, the
/// workflow trainer): one base URL (`GITHUB_API_URL`; Enterprise:
/// `https://host/api/v3`), the token as a bearer, REST API version
/// [`API_VERSION`], and the shared retrying client (rate limits waited out).
/// The token never appears in `Debug`, logs or errors.
#[derive(Clone)]
pub(crate) struct GithubApi {
    base: Url,
    token: SecretString,
    http: RetryingClient,
}

impl fmt::Debug for GithubApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubApi")
            .field("base", &self.base.as_str())
            .field("token", &"***")
            .finish_non_exhaustive()
    }
}

impl GithubApi {
    /// Errors name `GITHUB_API_URL` or `GITHUB_TOKEN`, never the token.
    pub(crate) fn new(
        api_url: &str,
        token: &SecretString,
        policy: HttpPolicy,
    ) -> Result<Self, AdapterError> {
        let base = Url::parse(api_url.trim_end_matches('/')).map_err(|e| {
            AdapterError::config("GITHUB_API_URL", format!("`{api_url}` is not a URL: {e}"))
        })?;
        if token.expose_secret().trim().is_empty() {
            return Err(AdapterError::config("GITHUB_TOKEN", "is empty"));
        }
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            return Err(AdapterError::config(
                "GITHUB_API_URL",
                format!("`{api_url}` is not an http(s) URL"),
            ));
        }
        Ok(Self {
            base,
            token: token.clone(),
            http: RetryingClient::new("github", policy)?,
        })
    }

    pub(crate) fn base(&self) -> &Url {
        &self.base
    }

    pub(crate) fn http(&self) -> &RetryingClient {
        &self.http
    }

    /// `<api>/<path>` (the path as given, already escaped).
    pub(crate) fn url(&self, path: &str) -> String {
        format!(
            "{}/{}",
            self.base.as_str().trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    /// `<api>/<segments…>`, every `/`-separated part pushed as one
    /// percent-encoded path segment (branch names and file paths keep their
    /// slashes, anything else is escaped).
    pub(crate) fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            let mut path = url
                .path_segments_mut()
                .expect("checked in new(): the API URL can be a base");
            path.pop_if_empty();
            for segment in segments {
                for part in segment.split('/') {
                    path.push(part);
                }
            }
        }
        url
    }

    /// A request with GitHub's headers and the token.
    pub(crate) fn request(
        &self,
        client: &reqwest::Client,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> RequestBuilder {
        let request = client
            .request(method, url)
            .header("accept", ACCEPT)
            .header("x-github-api-version", API_VERSION)
            .bearer_auth(self.token.expose_secret());
        match body {
            Some(body) => request.json(body),
            None => request,
        }
    }

    /// Whether `url` is on the API's own origin: the only place the token
    /// may be sent.
    pub(crate) fn is_own(&self, url: &Url) -> bool {
        url.origin() == self.base.origin()
    }

    /// Follow `Link: <…>; rel="next"`, but only to our own API host: the
    /// token must never be sent elsewhere.
    pub(crate) fn next_link(&self, response: &Response) -> Option<String> {
        let link = response.headers().get("link")?.to_str().ok()?;
        let next = link.split(',').find_map(|part| {
            let (url, rel) = part.split_once(';')?;
            rel.contains("rel=\"next\"").then(|| {
                url.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_owned()
            })
        })?;
        let parsed = Url::parse(&next).ok()?;
        self.is_own(&parsed).then_some(next)
    }
}

/// `error_for_status` with `hint`, plus the permission GitHub says the call
/// needed (`x-accepted-github-permissions`) when it says so.
pub(crate) async fn failure(what: &str, hint: &str, response: Response) -> PortError {
    let needed = response
        .headers()
        .get("x-accepted-github-permissions")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.trim().is_empty())
        .map(str::to_owned);
    let hint = match needed {
        Some(needed) => format!("{hint} (GitHub says this call needs: {needed})"),
        None => hint.to_owned(),
    };
    error_for_status(what, &hint, response).await
}

impl GithubNotifier {
    pub fn new(settings: GithubSettings) -> Result<Self, AdapterError> {
        let (owner, name) = split_repo(&settings.repo).ok_or_else(|| {
            AdapterError::config(
                "notify.github",
                format!("`{}` is not an owner/name repository", settings.repo),
            )
        })?;
        match &settings.target {
            GithubTarget::PullRequest {
                head, base, file, ..
            } => {
                if head.is_empty() || base.is_empty() {
                    return Err(AdapterError::config(
                        "notify.github",
                        "a pull request target needs `head` and `base` branches",
                    ));
                }
                if head.contains(':') || head == base {
                    return Err(AdapterError::config(
                        "notify.github.pr_head",
                        format!(
                            "`{head}` must be a branch of {} other than `{base}`: retrain creates it and commits the model file to it",
                            settings.repo
                        ),
                    ));
                }
                if let Some(file) = file {
                    check_pr_file(file)
                        .map_err(|e| AdapterError::config("notify.github.pr_file", e))?;
                }
            }
            GithubTarget::TriggeringPullRequest { number, file, .. } => {
                if *number == 0 {
                    return Err(AdapterError::config(
                        "notify.github.pr",
                        "pull request number 0",
                    ));
                }
                if let Some(file) = file {
                    check_pr_file(file)
                        .map_err(|e| AdapterError::config("notify.github.pr_file", e))?;
                }
            }
            GithubTarget::Comment { .. } => {}
        }
        let policy = HttpPolicy {
            max_server_wait: settings.policy.max_server_wait.min(MAX_RATE_LIMIT_WAIT),
            ..settings.policy.clone()
        };
        Ok(Self {
            api: GithubApi::new(&settings.api_url, &settings.token, policy)?,
            settings,
            owner,
            name,
            app_login: None,
            me: Arc::new(OnceCell::new()),
            learned: Arc::new(Mutex::new(None)),
        })
    }

    /// The login of the GitHub App's bot (`my-app[bot]`; `github-actions[bot]`
    /// for Actions' `GITHUB_TOKEN`), used to recognise our own comments when
    /// the token is an installation token, for which `GET /user` is 403.
    /// Without it, any App bot's marker comment is taken as ours.
    pub fn with_app_login(mut self, login: impl Into<String>) -> Self {
        let login = login.into();
        self.app_login = Some(login.trim().to_owned()).filter(|l| !l.is_empty());
        self
    }

    fn url(&self, path: &str) -> String {
        self.api.url(path)
    }

    /// GraphQL endpoint: `https://api.github.com/graphql`, or for Enterprise
    /// (`https://host/api/v3`) `https://host/api/graphql`.
    fn graphql_url(&self) -> String {
        let base = self.api.base().as_str().trim_end_matches('/');
        match base.strip_suffix("/api/v3") {
            Some(host) => format!("{host}/api/graphql"),
            None => format!("{base}/graphql"),
        }
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> RequestBuilder {
        self.api.request(client, method, url, body)
    }

    /// One request; non-2xx answers become errors naming `what`.
    async fn send(
        &self,
        what: &str,
        method: Method,
        url: &str,
        body: Option<&Value>,
        replay: Replay,
    ) -> Result<Response, PortError> {
        let response = self
            .api
            .http()
            .send_with(&Call::new(what, replay), |c| {
                self.request(c, method.clone(), url, body)
            })
            .await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(error_for_status(what, PERMISSION_HINT, response).await)
        }
    }

    async fn json<T: for<'de> Deserialize<'de>>(
        what: &str,
        response: Response,
    ) -> Result<T, PortError> {
        response.json().await.map_err(|e| {
            PortError::InvalidResponse(format!("{what}: unexpected GitHub answer: {e}"))
        })
    }

    fn next_link(&self, response: &Response) -> Option<String> {
        self.api.next_link(response)
    }

    async fn list_all<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        first: String,
    ) -> Result<Vec<T>, PortError> {
        let mut out = Vec::new();
        let mut next = Some(first);
        let mut pages = 0;
        while let Some(url) = next.take() {
            pages += 1;
            let response = self
                .send(what, Method::GET, &url, None, Replay::ByMethod)
                .await?;
            next = self.next_link(&response);
            let page: Vec<T> = Self::json(what, response).await?;
            out.extend(page);
            if pages >= MAX_PAGES {
                break;
            }
        }
        Ok(out)
    }

    fn repo(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Who the token acts as: the login of something we created, else
    /// `GET /user` (asked once per notifier), else for an App installation
    /// token (403 there) the configured App login or any App bot.
    async fn me(&self) -> Result<Me, PortError> {
        if let Some(login) = self.learned.lock().expect("not poisoned").clone() {
            return Ok(Me::Login(login));
        }
        self.me.get_or_try_init(|| self.ask_me()).await.cloned()
    }

    async fn ask_me(&self) -> Result<Me, PortError> {
        let what = "GitHub authenticated user (GET /user)";
        let url = self.url("user");
        let response = self
            .api
            .http()
            .send_with(&Call::new(what, Replay::ByMethod), |c| {
                self.request(c, Method::GET, &url, None)
            })
            .await?;
        let status = response.status();
        if status.is_success() {
            let user: Author = Self::json(what, response).await?;
            info!(login = %user.login, "GitHub notifier acts as this account");
            return Ok(Me::Login(user.login));
        }
        // An installation token (GitHub App, Actions' GITHUB_TOKEN) cannot
        // read `/user`: 403 "Resource not accessible by integration".
        if matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND)
            && !is_rate_limited(&response)
        {
            return Ok(match &self.app_login {
                Some(login) => {
                    info!(%login, "GitHub token is an App installation token: using the configured App login");
                    Me::Login(login.clone())
                }
                None => {
                    info!("GitHub token is an App installation token and no App login is configured: any App bot's marker comment counts as ours");
                    Me::AnyAppBot
                }
            });
        }
        Err(error_for_status(what, PERMISSION_HINT, response).await)
    }

    /// Remember the login GitHub put on something we created.
    fn learn(&self, user: Option<&Author>) {
        if let Some(user) = user.filter(|u| !u.login.is_empty()) {
            *self.learned.lock().expect("not poisoned") = Some(user.login.clone());
        }
    }

    async fn list_comments(&self, issue: u64) -> Result<Vec<Comment>, PortError> {
        let repo = self.repo();
        self.list_all(
            &format!("GitHub {repo}#{issue} comments"),
            self.url(&format!(
                "repos/{repo}/issues/{issue}/comments?per_page=100"
            )),
        )
        .await
    }

    /// Our own comment carrying `marker`, if any: `(id, body)`.
    async fn find_own_comment(
        &self,
        issue: u64,
        marker: &str,
    ) -> Result<Option<(u64, Option<String>)>, PortError> {
        let comments = self.list_comments(issue).await?;
        let marked: Vec<&Comment> = comments
            .iter()
            .filter(|c| carries(c.body.as_deref(), marker))
            .collect();
        if marked.is_empty() {
            return Ok(None);
        }
        let me = self.me().await?;
        let mine = marked
            .iter()
            .find(|c| me.wrote(c.user.as_ref(), c.performed_via_github_app.as_ref()));
        if mine.is_none() {
            let authors: Vec<&str> = marked
                .iter()
                .map(|c| c.user.as_ref().map_or("(unknown)", |u| u.login.as_str()))
                .collect();
            warn!(
                repo = %self.repo(),
                issue,
                ?authors,
                "comments carry this label's marker but were not written by this token's account: leaving them alone"
            );
        }
        Ok(mine.map(|c| (c.id, c.body.clone())))
    }

    async fn update_comment(&self, issue: u64, id: u64, body: &str) -> Result<(), PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo}#{issue} update comment {id}");
        // Setting the body to a fixed text: idempotent, safe to resend.
        self.send(
            &what,
            Method::PATCH,
            &self.url(&format!("repos/{repo}/issues/comments/{id}")),
            Some(&json!({ "body": body })),
            Replay::Idempotent,
        )
        .await?;
        info!(%repo, issue, comment = id, "updated GitHub comment");
        Ok(())
    }

    async fn upsert_comment(&self, issue: u64, body: &str, marker: &str) -> Result<(), PortError> {
        if let Some((id, _)) = self.find_own_comment(issue, marker).await? {
            return self.update_comment(issue, id, body).await;
        }
        let repo = self.repo();
        let what = format!("GitHub {repo}#{issue} new comment");
        let url = self.url(&format!("repos/{repo}/issues/{issue}/comments"));
        let payload = json!({ "body": body });
        // A POST: resent only after the check found it did not take effect.
        let outcome = self
            .api
            .http()
            .send_checked(
                &Call::new(&what, Replay::ByMethod),
                |c| self.request(c, Method::POST, &url, Some(&payload)),
                || self.find_own_comment(issue, marker),
            )
            .await?;
        match outcome {
            Checked::AlreadyApplied((id, existing)) => {
                info!(%repo, issue, comment = id, "the comment was created although its answer was lost: adopted it");
                if existing.as_deref() != Some(body) {
                    self.update_comment(issue, id, body).await?;
                }
                Ok(())
            }
            Checked::Response(response) if response.status().is_success() => {
                let created: Comment = Self::json(&what, response).await?;
                self.learn(created.user.as_ref());
                info!(%repo, issue, comment = created.id, "posted GitHub comment");
                Ok(())
            }
            Checked::Response(response) => {
                Err(error_for_status(&what, PERMISSION_HINT, response).await)
            }
        }
    }

    /// Open PRs from `head_filter` (`owner:branch`) into `base`.
    async fn list_pull_requests(
        &self,
        head_filter: &str,
        base: &str,
    ) -> Result<Vec<PullRequest>, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} pull requests from {head_filter}");
        let list_url = {
            let mut url = Url::parse(&self.url(&format!("repos/{repo}/pulls")))
                .map_err(|e| PortError::Config(format!("{what}: {e}")))?;
            url.query_pairs_mut()
                .append_pair("state", "open")
                .append_pair("head", head_filter)
                .append_pair("base", base)
                .append_pair("per_page", "100");
            url.to_string()
        };
        self.list_all(&what, list_url).await
    }

    /// The open PR of `head_filter` → `base` to update: ours with the marker,
    /// else ours without it (GitHub allows one open PR per head and base, so
    /// ours is the one). `Err` when the only one was opened by someone else.
    async fn find_own_pull_request(
        &self,
        head_filter: &str,
        base: &str,
        marker: &str,
    ) -> Result<Option<PullRequest>, PortError> {
        let open = self.list_pull_requests(head_filter, base).await?;
        if open.is_empty() {
            return Ok(None);
        }
        let me = self.me().await?;
        let mine = |p: &&PullRequest| me.wrote(p.user.as_ref(), None);
        if let Some(pr) = open
            .iter()
            .filter(mine)
            .find(|p| carries(p.body.as_deref(), marker))
            .or_else(|| open.iter().find(mine))
        {
            return Ok(Some(pr.clone()));
        }
        let other = &open[0];
        Err(PortError::Failed(format!(
            "GitHub {}: pull request #{} from {head_filter} into {base} was opened by {}, not by this token's account; retrain does not overwrite someone else's pull request (close it or use another pr_head)",
            self.repo(),
            other.number,
            other
                .user
                .as_ref()
                .map_or("an unknown account".to_owned(), |u| format!("@{}", u.login)),
        )))
    }

    async fn update_pull_request(&self, number: u64, body: &str) -> Result<PullRequest, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo}#{number} update pull request");
        // Setting the body to a fixed text: idempotent, safe to resend.
        let response = self
            .send(
                &what,
                Method::PATCH,
                &self.url(&format!("repos/{repo}/pulls/{number}")),
                Some(&json!({ "body": body })),
                Replay::Idempotent,
            )
            .await?;
        info!(%repo, number, "updated pull request");
        Self::json(&what, response).await
    }

    async fn upsert_pull_request(
        &self,
        report: &LabelReport,
        head: &str,
        base: &str,
        auto_merge: bool,
        body: &str,
        marker: &str,
    ) -> Result<(), PortError> {
        // The `head` filter wants `owner:branch`.
        let head_filter = if head.contains(':') {
            head.to_owned()
        } else {
            format!("{}:{head}", self.owner)
        };
        let pr: PullRequest = match self
            .find_own_pull_request(&head_filter, base, marker)
            .await?
        {
            Some(pr) => self.update_pull_request(pr.number, body).await?,
            None => {
                self.create_pull_request(report, head, &head_filter, base, body, marker)
                    .await?
            }
        };
        if auto_merge {
            if pr.auto_merge.as_ref().is_some_and(|a| !a.is_null()) {
                info!(repo = %self.repo(), number = pr.number, "auto-merge is already enabled");
            } else {
                self.enable_auto_merge(&pr).await?;
            }
        }
        Ok(())
    }

    async fn create_pull_request(
        &self,
        report: &LabelReport,
        head: &str,
        head_filter: &str,
        base: &str,
        body: &str,
        marker: &str,
    ) -> Result<PullRequest, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} create pull request {head} → {base}");
        let title = format!("retrain: `{}` {}", report.label, report.status.as_str());
        let url = self.url(&format!("repos/{repo}/pulls"));
        let payload = json!({ "title": title, "head": head, "base": base, "body": body });
        // A POST: resent only after the check found no PR of ours.
        let outcome = self
            .api
            .http()
            .send_checked(
                &Call::new(&what, Replay::ByMethod),
                |c| self.request(c, Method::POST, &url, Some(&payload)),
                || self.find_own_pull_request(head_filter, base, marker),
            )
            .await?;
        let response = match outcome {
            Checked::AlreadyApplied(pr) => {
                info!(%repo, number = pr.number, "the pull request was created although its answer was lost: adopted it");
                if pr.body.as_deref() == Some(body) {
                    return Ok(pr);
                }
                return self.update_pull_request(pr.number, body).await;
            }
            Checked::Response(response) => response,
        };
        let status = response.status();
        if status.is_success() {
            let pr: PullRequest = Self::json(&what, response).await?;
            self.learn(pr.user.as_ref());
            info!(%repo, number = pr.number, url = %pr.html_url, "created pull request");
            return Ok(pr);
        }
        if status != StatusCode::UNPROCESSABLE_ENTITY {
            return Err(Self::failure(&what, PULLS_HINT, response).await);
        }
        let text = response.text().await.unwrap_or_default();
        if !text
            .to_ascii_lowercase()
            .contains("pull request already exists")
        {
            let excerpt: String = text.chars().take(300).collect();
            return Err(PortError::Failed(format!(
                "{what}: HTTP {status}: {excerpt}"
            )));
        }
        // 422 "A pull request already exists for owner:branch.": ours (an
        // earlier attempt, or one opened by the same account) is updated.
        match self
            .find_own_pull_request(head_filter, base, marker)
            .await?
        {
            Some(pr) => {
                info!(%repo, number = pr.number, "a pull request already existed: updating it");
                self.update_pull_request(pr.number, body).await
            }
            None => Err(PortError::Failed(format!(
                "{what}: GitHub says a pull request already exists, but none is open from {head_filter} into {base}"
            ))),
        }
    }

    async fn enable_auto_merge(&self, pr: &PullRequest) -> Result<AutoMerge, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo}#{} enable auto-merge", pr.number);
        if pr.node_id.is_empty() {
            return Err(PortError::InvalidResponse(format!(
                "{what}: the pull request has no node_id"
            )));
        }
        let query = json!({
            "query": "mutation($id: ID!) { enablePullRequestAutoMerge(input: {pullRequestId: $id, mergeMethod: SQUASH}) { pullRequest { number } } }",
            "variables": { "id": pr.node_id },
        });
        // A GraphQL mutation is a POST: not resent after an unknown outcome.
        let response = self
            .send(
                &what,
                Method::POST,
                &self.graphql_url(),
                Some(&query),
                Replay::ByMethod,
            )
            .await?;
        let answer: Value = Self::json(&what, response).await?;
        let Some(errors) = answer
            .get("errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        else {
            info!(%repo, number = pr.number, "auto-merge enabled");
            return Ok(AutoMerge::Enabled);
        };
        let messages: Vec<&str> = errors
            .iter()
            .filter_map(|e| e.get("message").and_then(Value::as_str))
            .collect();
        // Auto-merge cannot be enabled on a PR that is already mergeable
        // ("clean status"); `gh pr merge --auto` merges it right away then.
        if messages.iter().any(|m| m.contains("clean status")) {
            let what = format!("GitHub {repo}#{} merge", pr.number);
            self.send(
                &what,
                Method::PUT,
                &self.url(&format!("repos/{repo}/pulls/{}/merge", pr.number)),
                Some(&json!({ "merge_method": "squash" })),
                Replay::ByMethod,
            )
            .await?;
            info!(%repo, number = pr.number, "pull request was mergeable: merged");
            return Ok(AutoMerge::Merged);
        }
        Err(PortError::Failed(format!(
            "{what}: {}",
            messages.join("; ")
        )))
    }
}

/// What `enable_auto_merge` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AutoMerge {
    Enabled,
    /// The PR was already mergeable ("clean status"): merged at once.
    Merged,
}

/// What became of the model file on a pull request's branch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FileOutcome {
    /// A new commit (its sha when GitHub said).
    Committed(Option<String>),
    /// The branch already held exactly this file.
    Unchanged,
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}

fn excerpt(text: &str) -> String {
    text.chars().take(300).collect()
}

/// The line under the report on the triggering PR when the model did not
/// improve: why, and that nothing was approved.
fn not_improved_line(report: &LabelReport) -> String {
    let why = report
        .verdict
        .as_ref()
        .map(|v| v.reason.clone())
        .or_else(|| report.error.clone())
        .unwrap_or_else(|| "see the table above".into());
    match report.status {
        LabelStatus::Rejected => format!(
            "**The model did not improve**: {why}. retrain does not approve this pull request, and a workflow running `retrain run --fail-on-reject` fails."
        ),
        LabelStatus::Failed => {
            format!("**retrain failed**: {why}. Nothing was committed or approved.")
        }
        LabelStatus::Passed => "The gate passed, but promotion is disabled (`promote = \"disabled\"`): nothing was committed or approved.".into(),
        LabelStatus::AwaitingApproval => format!(
            "The gate passed; the model is **awaiting approval** (`promote = \"manual\"`): {}.",
            report.approval_hint().unwrap_or_default()
        ),
        LabelStatus::Trained => "Trained without a gate: the model was not promoted; nothing was committed or approved.".into(),
        LabelStatus::DatasetRejected => "**The dataset check rejected the dataset** (see its report above): nothing was leased, trained, committed or approved.".into(),
        LabelStatus::RolledBack => format!(
            "Production was **{}**; nothing was committed or approved.",
            report
                .rollback_summary()
                .unwrap_or_else(|| "rolled back".into())
        ),
        other => format!(
            "Status `{}`: nothing was committed or approved.",
            other.as_str()
        ),
    }
}

fn approval_body(report: &LabelReport) -> String {
    let mut body = format!("retrain: the `{}` model improved", report.label);
    if let Some(promoted) = &report.promoted {
        body.push_str(&format!(
            " and version `{}` is in production",
            promoted.version
        ));
    }
    if let Some(verdict) = &report.verdict {
        body.push_str(&format!(" ({})", verdict.reason));
    }
    body.push('.');
    body
}

// ---- Branches, commits and files: pull requests that carry a commit ----
impl GithubNotifier {
    /// `<api>/<segments…>`, every `/`-separated part pushed as one
    /// percent-encoded path segment (branch names and file paths keep their
    /// slashes, anything else is escaped).
    fn endpoint(&self, segments: &[&str]) -> Url {
        self.api.endpoint(segments)
    }

    async fn failure(what: &str, hint: &str, response: Response) -> PortError {
        failure(what, hint, response).await
    }

    async fn get(&self, what: &str, url: &Url) -> Result<Response, PortError> {
        self.api
            .http()
            .send_with(&Call::new(what, Replay::ByMethod), |c| {
                self.request(c, Method::GET, url.as_str(), None)
            })
            .await
    }

    /// Send `body`; a non-2xx answer becomes an error naming `what` and `hint`.
    async fn send_json(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: &Value,
        replay: Replay,
        hint: &str,
    ) -> Result<Response, PortError> {
        let response = self
            .api
            .http()
            .send_with(&Call::new(what, replay), |c| {
                self.request(c, method.clone(), url.as_str(), Some(body))
            })
            .await?;
        if response.status().is_success() {
            Ok(response)
        } else {
            Err(Self::failure(what, hint, response).await)
        }
    }

    /// `GET /repos/{o}/{r}/git/ref/heads/{branch}`: the branch's commit,
    /// `None` when there is no such branch.
    async fn branch_sha(&self, branch: &str) -> Result<Option<String>, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} branch `{branch}`");
        let response = self
            .get(
                &what,
                &self.endpoint(&["repos", &repo, "git/ref/heads", branch]),
            )
            .await?;
        match response.status() {
            StatusCode::NOT_FOUND => Ok(None),
            status if status.is_success() => Ok(Some(
                Self::json::<GitRef>(&what, response).await?.object.sha,
            )),
            _ => Err(Self::failure(&what, CONTENTS_HINT, response).await),
        }
    }

    /// `GET /repos/{o}/{r}/git/commits/{sha}`.
    async fn git_commit(&self, sha: &str) -> Result<GitCommit, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} commit {}", short(sha));
        let response = self
            .get(&what, &self.endpoint(&["repos", &repo, "git/commits", sha]))
            .await?;
        if !response.status().is_success() {
            return Err(Self::failure(&what, CONTENTS_HINT, response).await);
        }
        Self::json(&what, response).await
    }

    /// `POST /repos/{o}/{r}/git/trees`: `base_tree` with `path` holding
    /// `content`. Trees are content-addressed: resending is harmless.
    async fn create_tree(
        &self,
        base_tree: &str,
        path: &str,
        content: &str,
    ) -> Result<String, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} tree with {path}");
        let payload = json!({
            "base_tree": base_tree,
            "tree": [{ "path": path, "mode": "100644", "type": "blob", "content": content }],
        });
        let response = self
            .send_json(
                &what,
                Method::POST,
                &self.endpoint(&["repos", &repo, "git/trees"]),
                &payload,
                Replay::Idempotent,
                CONTENTS_HINT,
            )
            .await?;
        Ok(Self::json::<GitObject>(&what, response).await?.sha)
    }

    /// `POST /repos/{o}/{r}/git/commits`: `tree` on top of `parent`. A
    /// resend after a lost answer leaves at most an unreferenced commit
    /// object behind (no branch points at it), so it is allowed.
    async fn create_commit(
        &self,
        message: &str,
        tree: &str,
        parent: &str,
    ) -> Result<String, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} create commit");
        let payload = json!({ "message": message, "tree": tree, "parents": [parent] });
        let response = self
            .send_json(
                &what,
                Method::POST,
                &self.endpoint(&["repos", &repo, "git/commits"]),
                &payload,
                Replay::Idempotent,
                CONTENTS_HINT,
            )
            .await?;
        Ok(Self::json::<GitCommit>(&what, response).await?.sha)
    }

    /// `POST /repos/{o}/{r}/git/refs`: create `branch` at `sha`. `Ok(false)`:
    /// the branch exists (GitHub's 422, or found by the lost-answer check at
    /// another commit).
    async fn create_branch(&self, branch: &str, sha: &str) -> Result<bool, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} create branch `{branch}`");
        let url = self.endpoint(&["repos", &repo, "git/refs"]);
        let payload = json!({ "ref": format!("refs/heads/{branch}"), "sha": sha });
        // A POST: resent only after the check found no such branch.
        let outcome = self
            .api
            .http()
            .send_checked(
                &Call::new(&what, Replay::ByMethod),
                |c| self.request(c, Method::POST, url.as_str(), Some(&payload)),
                || self.branch_sha(branch),
            )
            .await?;
        let response = match outcome {
            Checked::AlreadyApplied(found) => return Ok(found == sha),
            Checked::Response(response) => response,
        };
        let status = response.status();
        if status.is_success() {
            info!(%repo, branch, commit = short(sha), "created branch");
            return Ok(true);
        }
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            let text = response.text().await.unwrap_or_default();
            if text.to_ascii_lowercase().contains("already exists") {
                return Ok(false);
            }
            return Err(PortError::Failed(format!(
                "{what}: HTTP {status}: {}",
                excerpt(&text)
            )));
        }
        Err(Self::failure(&what, CONTENTS_HINT, response).await)
    }

    /// `PATCH /repos/{o}/{r}/git/refs/heads/{branch}` with `force`: "set the
    /// branch to `sha`", idempotent.
    async fn move_branch(&self, branch: &str, sha: &str) -> Result<(), PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} force-update branch `{branch}`");
        self.send_json(
            &what,
            Method::PATCH,
            &self.endpoint(&["repos", &repo, "git/refs/heads", branch]),
            &json!({ "sha": sha, "force": true }),
            Replay::Idempotent,
            CONTENTS_HINT,
        )
        .await?;
        info!(%repo, branch, commit = short(sha), "force-updated branch");
        Ok(())
    }

    /// Fail unless every commit `head_sha` has on top of `base_sha` was made
    /// by retrain for `label` (carries its trailer).
    async fn check_own_branch(
        &self,
        label: &str,
        head: &str,
        base: &str,
        base_sha: &str,
        head_sha: &str,
    ) -> Result<(), PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} compare `{base}`...`{head}`");
        let response = self
            .get(
                &what,
                &self.endpoint(&[
                    "repos",
                    &repo,
                    "compare",
                    &format!("{base_sha}...{head_sha}"),
                ]),
            )
            .await?;
        if !response.status().is_success() {
            return Err(Self::failure(&what, CONTENTS_HINT, response).await);
        }
        let comparison: Comparison = Self::json(&what, response).await?;
        let foreign: Vec<&ComparedCommit> = comparison
            .commits
            .iter()
            .filter(|c| !carries_trailer(&c.commit.message, label))
            .collect();
        let unlisted = comparison
            .ahead_by
            .saturating_sub(comparison.commits.len() as u64);
        if foreign.is_empty() && unlisted == 0 {
            return Ok(());
        }
        let example = foreign
            .first()
            .map(|c| {
                format!(
                    " (e.g. {} \"{}\")",
                    short(&c.sha),
                    c.commit.message.lines().next().unwrap_or_default()
                )
            })
            .unwrap_or_default();
        Err(PortError::Failed(format!(
            "GitHub {repo}: branch `{head}` has {} commit(s) on top of `{base}` that retrain did not make{example}; retrain replaces its pull request branch's commit at every promotion and will not discard them: point `pr_head` at a branch of its own (e.g. `retrain/{label}`)",
            foreign.len() as u64 + unlisted
        )))
    }

    /// Make `head` = `base` + one retrain commit whose `path` holds
    /// `content`: built with the Git Data API on the current base, then the
    /// branch is created at it or force-updated to it, so the branch never
    /// points at the base itself (GitHub would close an open PR whose head
    /// has no commits of its own). `Ok(false)`: the base already holds
    /// exactly this file, there is nothing to propose.
    async fn prepare_pr_branch(
        &self,
        report: &LabelReport,
        head: &str,
        base: &str,
        path: &str,
        content: &str,
    ) -> Result<bool, PortError> {
        let repo = self.repo();
        let label = report.label.as_str();
        let base_sha = self.branch_sha(base).await?.ok_or_else(|| {
            PortError::NotFound(format!(
                "GitHub {repo}: base branch `{base}` does not exist (or the token cannot see the repository)"
            ))
        })?;
        let base_commit = self.git_commit(&base_sha).await?;
        let tree = self
            .create_tree(&base_commit.tree.sha, path, content)
            .await?;
        if tree == base_commit.tree.sha {
            info!(%repo, base, path, "the base branch already holds this model file: nothing to propose");
            return Ok(false);
        }
        let existing = self.branch_sha(head).await?;
        if let Some(head_sha) = &existing {
            let head_commit = self.git_commit(head_sha).await?;
            let on_base =
                matches!(head_commit.parents.as_slice(), [parent] if parent.sha == base_sha);
            if on_base
                && head_commit.tree.sha == tree
                && carries_trailer(&head_commit.message, label)
            {
                info!(%repo, head, "the branch already holds this model file on the current base");
                return Ok(true);
            }
            self.check_own_branch(label, head, base, &base_sha, head_sha)
                .await?;
        }
        let commit = self
            .create_commit(&commit_message(report, path), &tree, &base_sha)
            .await?;
        match existing {
            Some(_) => self.move_branch(head, &commit).await?,
            None => {
                if !self.create_branch(head, &commit).await? {
                    // Created meanwhile: the same checks as an existing branch.
                    let now = self.branch_sha(head).await?.ok_or_else(|| {
                        PortError::Transient(format!(
                            "GitHub {repo}: branch `{head}` exists and vanished again; retried at the next cycle"
                        ))
                    })?;
                    if now != commit {
                        self.check_own_branch(label, head, base, &base_sha, &now)
                            .await?;
                        self.move_branch(head, &commit).await?;
                    }
                }
            }
        }
        Ok(true)
    }

    /// `GET /repos/{o}/{r}/contents/{path}?ref={branch}`; `None`: no such file.
    async fn get_file(&self, path: &str, branch: &str) -> Result<Option<RepoFile>, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} file {path} on `{branch}`");
        let mut url = self.endpoint(&["repos", &repo, "contents", path]);
        url.query_pairs_mut().append_pair("ref", branch);
        let response = self.get(&what, &url).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(Self::failure(&what, CONTENTS_HINT, response).await);
        }
        let file: Value = Self::json(&what, response).await?;
        if file.get("type").and_then(Value::as_str) != Some("file") {
            return Err(PortError::Failed(format!(
                "{what}: not a file (a directory, a link or a submodule): choose another `pr_file`"
            )));
        }
        let sha = file
            .get("sha")
            .and_then(Value::as_str)
            .ok_or_else(|| PortError::InvalidResponse(format!("{what}: no `sha`")))?
            .to_owned();
        let content = match (
            file.get("encoding").and_then(Value::as_str),
            file.get("content").and_then(Value::as_str),
        ) {
            (Some("base64"), Some(text)) => base64::decode(text),
            _ => None,
        };
        Ok(Some(RepoFile { sha, content }))
    }

    /// The lost-answer check of `put_file`: does `path` on `branch` hold
    /// `content` now?
    async fn file_written(
        &self,
        path: &str,
        branch: &str,
        content: &str,
    ) -> Result<Option<()>, PortError> {
        Ok(self
            .get_file(path, branch)
            .await?
            .filter(|f| f.holds(content))
            .map(|_| ()))
    }

    /// `PUT /repos/{o}/{r}/contents/{path}`: commit `content` to `branch`,
    /// replacing the blob `sha` (required by GitHub when the file exists).
    /// Returns the new commit's sha when GitHub said it.
    async fn put_file(
        &self,
        branch: &str,
        path: &str,
        content: &str,
        message: &str,
        sha: Option<&str>,
    ) -> Result<Option<String>, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo} commit {path} to `{branch}`");
        let url = self.endpoint(&["repos", &repo, "contents", path]);
        let mut payload = json!({
            "message": message,
            "content": base64::encode(content.as_bytes()),
            "branch": branch,
        });
        if let Some(sha) = sha {
            payload["sha"] = json!(sha);
        }
        // Conditional on `sha` (or on the file's absence): a blind resend
        // after a lost answer would fail with 409/422 once the first one
        // took effect, so it is resent only after the check found the file
        // not written.
        let outcome = self
            .api
            .http()
            .send_checked(
                &Call::new(&what, Replay::ByMethod),
                |c| self.request(c, Method::PUT, url.as_str(), Some(&payload)),
                || self.file_written(path, branch, content),
            )
            .await?;
        let response = match outcome {
            Checked::AlreadyApplied(()) => {
                info!(%repo, branch, path, "the commit was made although its answer was lost");
                return Ok(None);
            }
            Checked::Response(response) => response,
        };
        let status = response.status();
        if status.is_success() {
            let answer: Value = Self::json(&what, response).await?;
            let commit = answer
                .pointer("/commit/sha")
                .and_then(Value::as_str)
                .map(str::to_owned);
            info!(%repo, branch, path, commit = commit.as_deref().map(short).unwrap_or("?"), "committed the model file");
            return Ok(commit);
        }
        if status == StatusCode::CONFLICT || status == StatusCode::UNPROCESSABLE_ENTITY {
            let text = response.text().await.unwrap_or_default();
            // 409: the branch moved; 422 about `sha`: the file appeared or
            // changed since it was read. Both resolve on a fresh read.
            if status == StatusCode::CONFLICT || text.contains("sha") {
                return Err(PortError::Transient(format!(
                    "{what}: HTTP {status}: the file or the branch changed meanwhile: {}",
                    excerpt(&text)
                )));
            }
            return Err(PortError::Failed(format!(
                "{what}: HTTP {status}: {}",
                excerpt(&text)
            )));
        }
        Err(Self::failure(&what, CONTENTS_HINT, response).await)
    }

    /// Make `path` on `branch` hold `content`, one commit on top of it
    /// (Contents API), unless it already does.
    async fn commit_file(
        &self,
        branch: &str,
        path: &str,
        content: &str,
        message: &str,
    ) -> Result<FileOutcome, PortError> {
        let existing = self.get_file(path, branch).await?;
        if existing.as_ref().is_some_and(|f| f.holds(content)) {
            return Ok(FileOutcome::Unchanged);
        }
        let commit = self
            .put_file(
                branch,
                path,
                content,
                message,
                existing.as_ref().map(|f| f.sha.as_str()),
            )
            .await?;
        Ok(FileOutcome::Committed(commit))
    }

    /// PR mode on an improved model: the branch with its commit, then the
    /// label's one pull request (and auto-merge).
    #[allow(clippy::too_many_arguments)]
    async fn promote_through_pull_request(
        &self,
        report: &LabelReport,
        head: &str,
        base: &str,
        auto_merge: bool,
        file: Option<&str>,
        body: &str,
        marker: &str,
    ) -> Result<(), PortError> {
        let path = file
            .map(str::to_owned)
            .unwrap_or_else(|| default_pr_file(report.label.as_str()));
        let content = model_file(
            report,
            self.settings.registry.as_ref(),
            self.settings.report_url.as_deref(),
        );
        if !self
            .prepare_pr_branch(report, head, base, &path, &content)
            .await?
        {
            return Ok(());
        }
        self.upsert_pull_request(report, head, base, auto_merge, body, marker)
            .await
    }
}

// ---- The triggering pull request (seed 002) ----
impl GithubNotifier {
    /// `GET /repos/{o}/{r}/pulls/{n}`.
    async fn get_pull_request(&self, number: u64) -> Result<PullRequest, PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo}#{number} pull request");
        let response = self
            .get(
                &what,
                &self.endpoint(&["repos", &repo, "pulls", &number.to_string()]),
            )
            .await?;
        if !response.status().is_success() {
            return Err(Self::failure(&what, PULLS_HINT, response).await);
        }
        Self::json(&what, response).await
    }

    /// The id of our latest approving review of PR `number`: our last
    /// review that approved, requested changes or was dismissed, if it
    /// approved.
    async fn own_approval(&self, number: u64) -> Result<Option<u64>, PortError> {
        let repo = self.repo();
        let mut url = self.endpoint(&["repos", &repo, "pulls", &number.to_string(), "reviews"]);
        url.query_pairs_mut().append_pair("per_page", "100");
        let reviews: Vec<Review> = self
            .list_all(&format!("GitHub {repo}#{number} reviews"), url.to_string())
            .await?;
        if reviews.is_empty() {
            return Ok(None);
        }
        let me = self.me().await?;
        let latest = reviews.iter().rfind(|r| {
            me.wrote(r.user.as_ref(), None)
                && matches!(
                    r.state.as_str(),
                    "APPROVED" | "CHANGES_REQUESTED" | "DISMISSED"
                )
        });
        Ok(latest.filter(|r| r.state == "APPROVED").map(|r| r.id))
    }

    /// Approve PR `number` unless our latest review already does.
    /// `Ok(true)`: approved now; `Ok(false)`: it already was.
    async fn approve(&self, number: u64, report: &LabelReport) -> Result<bool, PortError> {
        if let Some(review) = self.own_approval(number).await? {
            info!(repo = %self.repo(), number, review, "already approved by this account: not approving twice");
            return Ok(false);
        }
        let repo = self.repo();
        let what = format!("GitHub {repo}#{number} approve");
        let url = self.endpoint(&["repos", &repo, "pulls", &number.to_string(), "reviews"]);
        let payload = json!({ "event": "APPROVE", "body": approval_body(report) });
        // A POST: resent only after the check found no approval of ours.
        let outcome = self
            .api
            .http()
            .send_checked(
                &Call::new(&what, Replay::ByMethod),
                |c| self.request(c, Method::POST, url.as_str(), Some(&payload)),
                || self.own_approval(number),
            )
            .await?;
        let response = match outcome {
            Checked::AlreadyApplied(_) => return Ok(true),
            Checked::Response(response) => response,
        };
        let status = response.status();
        if status.is_success() {
            let review: Review = Self::json(&what, response).await?;
            self.learn(review.user.as_ref());
            info!(%repo, number, review = review.id, "approved the pull request");
            return Ok(true);
        }
        if status == StatusCode::UNPROCESSABLE_ENTITY {
            let text = response.text().await.unwrap_or_default();
            let lower = text.to_ascii_lowercase();
            let hint = if lower.contains("your own pull request") {
                " (GitHub does not let the account that opened a pull request approve it: use another account's token, or `approve = false`)"
            } else if lower.contains("not permitted to approve") {
                " (allow it in the repository's Settings → Actions → General → \"Allow GitHub Actions to create and approve pull requests\", or use a GitHub App or personal token)"
            } else {
                ""
            };
            return Err(PortError::Failed(format!(
                "{what}: HTTP {status}: {}{hint}",
                excerpt(&text)
            )));
        }
        Err(Self::failure(&what, PULLS_HINT, response).await)
    }

    async fn disable_auto_merge(&self, pr: &PullRequest) -> Result<(), PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo}#{} disable auto-merge", pr.number);
        let query = json!({
            "query": "mutation($id: ID!) { disablePullRequestAutoMerge(input: {pullRequestId: $id}) { pullRequest { number } } }",
            "variables": { "id": pr.node_id },
        });
        // Turning a setting off: harmless to repeat.
        let url = Url::parse(&self.graphql_url())
            .map_err(|e| PortError::Config(format!("{what}: {e}")))?;
        let response = self
            .send_json(
                &what,
                Method::POST,
                &url,
                &query,
                Replay::Idempotent,
                PULLS_HINT,
            )
            .await?;
        let answer: Value = Self::json(&what, response).await?;
        match answer
            .get("errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        {
            None => {
                info!(%repo, number = pr.number, "auto-merge disabled");
                Ok(())
            }
            Some(errors) => Err(PortError::Failed(format!(
                "{what}: {}",
                errors
                    .iter()
                    .filter_map(|e| e.get("message").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))),
        }
    }

    /// An improved model: commit the model file to the PR's own branch,
    /// approve, enable auto-merge. Each step done is recorded in `done`.
    async fn act_on_improved(
        &self,
        report: &LabelReport,
        pr: &PullRequest,
        approve: bool,
        auto_merge: bool,
        file: Option<&str>,
        done: &mut Vec<String>,
    ) -> Result<(), PortError> {
        let repo = self.repo();
        let head = pr.head.as_ref().ok_or_else(|| {
            PortError::InvalidResponse(format!(
                "GitHub {repo}#{}: the pull request has no `head`",
                pr.number
            ))
        })?;
        let head_repo = head.repo.as_ref().map(|r| r.full_name.as_str());
        if !head_repo.is_some_and(|r| r.eq_ignore_ascii_case(&repo)) {
            return Err(PortError::Failed(format!(
                "GitHub {repo}#{}: the pull request's branch `{}` is in {}, not in {repo}: retrain cannot push the model file to another repository's branch, so it neither approves nor merges this pull request (open it from a branch of {repo})",
                pr.number,
                head.name,
                head_repo.map_or_else(|| "a deleted fork".to_owned(), |r| format!("the fork {r}")),
            )));
        }
        let path = file
            .map(str::to_owned)
            .unwrap_or_else(|| default_pr_file(report.label.as_str()));
        let content = model_file(
            report,
            self.settings.registry.as_ref(),
            self.settings.report_url.as_deref(),
        );
        match self
            .commit_file(&head.name, &path, &content, &commit_message(report, &path))
            .await?
        {
            FileOutcome::Committed(_) => {
                done.push(format!("Committed `{path}` to `{}`.", head.name))
            }
            FileOutcome::Unchanged => done.push(format!(
                "`{path}` on `{}` already describes this model.",
                head.name
            )),
        }
        if approve {
            if self.approve(pr.number, report).await? {
                done.push("Approved.".into());
            } else {
                done.push("Already approved by retrain.".into());
            }
        }
        if auto_merge {
            if pr.auto_merge.as_ref().is_some_and(|a| !a.is_null()) {
                done.push("Auto-merge was already enabled.".into());
            } else {
                match self.enable_auto_merge(pr).await? {
                    AutoMerge::Enabled => done.push(
                        "Squash auto-merge enabled: GitHub merges once the required reviews and checks pass.".into(),
                    ),
                    AutoMerge::Merged => done.push("Merged (squash): nothing was left to wait for.".into()),
                }
            }
        }
        Ok(())
    }

    /// The report on the triggering PR (the label's comment, updated in
    /// place), after acting on it: an improved model is committed, approved
    /// and auto-merged; otherwise auto-merge is turned off. The comment says
    /// what was done, and what failed.
    #[allow(clippy::too_many_arguments)]
    async fn notify_triggering(
        &self,
        report: &LabelReport,
        number: u64,
        approve: bool,
        auto_merge: bool,
        file: Option<&str>,
        marker: &str,
    ) -> Result<(), PortError> {
        let pr = self.get_pull_request(number).await?;
        let mut done = Vec::new();
        let mut failure = None;
        if !pr.state.is_empty() && pr.state != "open" {
            done.push(format!(
                "This pull request is {}: retrain changed nothing on it.",
                pr.state
            ));
        } else if report.improved() {
            if let Err(e) = self
                .act_on_improved(report, &pr, approve, auto_merge, file, &mut done)
                .await
            {
                done.push(format!("⚠️ {e}"));
                failure = Some(e);
            }
        } else {
            done.push(not_improved_line(report));
            if auto_merge && pr.auto_merge.as_ref().is_some_and(|a| !a.is_null()) {
                match self.disable_auto_merge(&pr).await {
                    Ok(()) => done.push("Auto-merge was turned off.".into()),
                    Err(e) => {
                        done.push(format!("⚠️ turning auto-merge off failed: {e}"));
                        failure = Some(e);
                    }
                }
            }
        }
        let body = format!(
            "{marker}\n{}\n\n---\n\n{}\n",
            report.to_markdown().trim_end(),
            done.join("\n\n")
        );
        let commented = self.upsert_comment(number, &body, marker).await;
        match failure {
            Some(e) => Err(e),
            None => commented,
        }
    }
}

/// Standard base64 (RFC 4648, with padding), for the Contents API.
mod base64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                chunk.get(1).copied().unwrap_or(0),
                chunk.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    /// Decode, ignoring whitespace (GitHub wraps its base64 at 60
    /// columns); `None` on anything that is not base64.
    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(text.len() / 4 * 3);
        let mut acc: u32 = 0;
        let mut bits = 0;
        let mut padding = 0;
        for c in text.bytes().filter(|c| !c.is_ascii_whitespace()) {
            if c == b'=' {
                padding += 1;
                continue;
            }
            if padding > 0 {
                return None;
            }
            let value = ALPHABET.iter().position(|&a| a == c)? as u32;
            acc = (acc << 6) | value;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        (padding <= 2).then_some(out)
    }
}

#[async_trait]
impl Notifier for GithubNotifier {
    async fn notify(&self, report: &LabelReport) -> Result<(), PortError> {
        if !self.settings.on.wants(report) {
            return Ok(());
        }
        let marker = marker(report.label.as_str());
        let body = format!("{marker}\n{}", report.to_markdown());
        match &self.settings.target {
            GithubTarget::Comment { issue } => self.upsert_comment(*issue, &body, &marker).await,
            // A branch, a commit and a PR only for a model that improved:
            // anything else touches nothing, whatever `on` says.
            GithubTarget::PullRequest { .. } if !report.improved() => Ok(()),
            GithubTarget::PullRequest {
                head,
                base,
                auto_merge,
                file,
            } => {
                self.promote_through_pull_request(
                    report,
                    head,
                    base,
                    *auto_merge,
                    file.as_deref(),
                    &body,
                    &marker,
                )
                .await
            }
            GithubTarget::TriggeringPullRequest {
                number,
                approve,
                auto_merge,
                file,
            } => {
                // Not deferred to the next cycle: here that is the next
                // workflow run, likely another pull request's, which would
                // get this report (and its approval). The HTTP client has
                // already retried within this attempt.
                self.notify_triggering(
                    report,
                    *number,
                    *approve,
                    *auto_merge,
                    file.as_deref(),
                    &marker,
                )
                .await
                .map_err(|e| match e {
                    PortError::Transient(message) => PortError::Failed(format!(
                        "{message} (not retried at the next cycle, which runs for the next pull request's workflow)"
                    )),
                    other => other,
                })
            }
        }
    }

    fn describe(&self) -> String {
        match &self.settings.target {
            GithubTarget::Comment { issue } => format!("github {}#{issue}", self.repo()),
            GithubTarget::PullRequest { head, base, .. } => {
                format!("github {} pull request {head} → {base}", self.repo())
            }
            GithubTarget::TriggeringPullRequest { number, .. } => {
                format!("github {}#{number} (triggering pull request)", self.repo())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips_and_reads_githubs_wrapped_form() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64::encode(plain.as_bytes()), encoded);
            assert_eq!(base64::decode(encoded).unwrap(), plain.as_bytes());
        }
        let long = "{\n  \"label\": \"seg\",\n  \"version\": \"7\"\n}\n".repeat(5);
        let encoded = base64::encode(long.as_bytes());
        let wrapped: String = encoded
            .as_bytes()
            .chunks(60)
            .map(|c| format!("{}\n", std::str::from_utf8(c).unwrap()))
            .collect();
        assert_eq!(base64::decode(&wrapped).unwrap(), long.as_bytes());
        assert_eq!(base64::decode("Zm9v!"), None);
        assert_eq!(base64::decode("Zg==Zg"), None);
    }

    #[test]
    fn the_triggering_pull_request_comes_from_the_event_then_the_ref() {
        let dir = std::env::temp_dir().join(format!("retrain-gh-event-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let event = dir.join("event.json");
        std::fs::write(
            &event,
            r#"{"action":"synchronize","number":17,"pull_request":{"number":17}}"#,
        )
        .unwrap();
        assert_eq!(triggering_pull_request(Some(&event), None).unwrap(), 17);
        std::fs::write(&event, r#"{"action":"opened","number":18}"#).unwrap();
        assert_eq!(triggering_pull_request(Some(&event), None).unwrap(), 18);
        std::fs::write(
            &event,
            r#"{"action":"created","issue":{"number":19,"pull_request":{"url":"x"}}}"#,
        )
        .unwrap();
        assert_eq!(triggering_pull_request(Some(&event), None).unwrap(), 19);
        // A push event: falls back to GITHUB_REF.
        std::fs::write(&event, r#"{"ref":"refs/heads/main","after":"abc"}"#).unwrap();
        assert_eq!(
            triggering_pull_request(Some(&event), Some("refs/pull/21/merge")).unwrap(),
            21
        );
        let err = triggering_pull_request(Some(&event), Some("refs/heads/main"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("GITHUB_EVENT_PATH") && err.contains("GITHUB_REF"),
            "{err}"
        );
        assert!(err.contains("refs/heads/main"), "{err}");
        let err = triggering_pull_request(None, None).unwrap_err().to_string();
        assert!(
            err.contains("GITHUB_EVENT_PATH is not set") && err.contains("GITHUB_REF is not set"),
            "{err}"
        );
        assert_eq!(
            triggering_pull_request(None, Some("refs/pull/5/head")).unwrap(),
            5
        );
        assert!(triggering_pull_request(None, Some("refs/pull/x/merge")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pr_file_paths_are_checked() {
        assert!(check_pr_file("model-metadata.json").is_ok());
        assert!(check_pr_file("models/seg.json").is_ok());
        for bad in [
            "",
            "/etc/x",
            "a//b",
            "../x",
            "a/./b",
            "a\\b",
            ".github/workflows/x.yml",
        ] {
            assert!(check_pr_file(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_rollback_says_from_what_to_what_by_whom_and_why() {
        use retrain_core::domain::{Label, PromotedVersion};
        use retrain_core::machine::Rollback;
        let mut report = LabelReport::failed_before_run(Label::new("seg").unwrap(), 10, "x".into());
        report.status = LabelStatus::RolledBack;
        report.error = None;
        report.promoted = Some(PromotedVersion {
            version: "6".into(),
            previous: Some("7".into()),
        });
        report.rollback = Some(Rollback {
            to_version: "6".into(),
            from_version: Some("7".into()),
            by: "alice".into(),
            reason: "dice regressed".into(),
            forced: false,
            at: chrono::DateTime::UNIX_EPOCH,
            restored_run: None,
            restored_candidate: None,
        });
        assert_eq!(
            not_improved_line(&report),
            "Production was **rolled back from version 7 to version 6 by alice because dice regressed**; nothing was committed or approved."
        );
    }

    #[test]
    fn the_model_file_is_stable_json_naming_the_promotion() {
        use retrain_core::domain::{Candidate, Label, PromotedVersion, VersionTag};
        let mut report = LabelReport::failed_before_run(Label::new("seg").unwrap(), 10, "x".into());
        report.status = LabelStatus::Promoted;
        report.error = None;
        report.dataset_version = Some(VersionTag::new("v3"));
        report.candidate = Some(Candidate {
            id: "run-1".into(),
            metrics: [("dice".to_owned(), 0.83), ("iou".to_owned(), f64::NAN)]
                .into_iter()
                .collect(),
        });
        report.promoted = Some(PromotedVersion {
            version: "7".into(),
            previous: Some("6".into()),
        });
        let registry = RegistryRef {
            kind: "mlflow".into(),
            uri: Some("https://mlflow.example.com".into()),
            model: "seg-unet".into(),
            alias: Some("production".into()),
            stage: None,
        };
        let text = model_file(
            &report,
            Some(&registry),
            Some("https://github.com/o/r/actions/runs/1"),
        );
        assert_eq!(
            text,
            model_file(
                &report,
                Some(&registry),
                Some("https://github.com/o/r/actions/runs/1")
            )
        );
        assert!(text.ends_with("}\n"));
        let value: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(value["model"], "seg-unet");
        assert_eq!(value["registry"]["kind"], "mlflow");
        assert_eq!(value["version"], "7");
        assert_eq!(value["candidate"], "run-1");
        assert_eq!(value["dataset_version"], "v3");
        assert_eq!(value["metrics"]["dice"], 0.83);
        assert!(value["metrics"]["iou"].is_null());
        assert_eq!(value["report_url"], "https://github.com/o/r/actions/runs/1");
        let message = commit_message(&report, "models/seg.json");
        assert!(carries_trailer(&message, "seg"));
        assert!(!carries_trailer(&message, "se"));
        assert!(message.starts_with("retrain: seg model version 7 (dataset v3)"));
    }
}
