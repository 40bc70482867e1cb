//! GitHub notifier: one comment or pull request per label, updated in place.
//!
//! The report's markdown carries a hidden marker
//! `<!-- retrain:label=<label> -->`; the notifier finds its earlier comment
//! (or open PR) by that marker and PATCHes it instead of posting another, so
//! an issue or PR never fills up with one comment per cycle (CML users' top
//! complaint). REST API version `2022-11-28`; auto-merge through GraphQL
//! `enablePullRequestAutoMerge`, as `gh pr merge --auto` does.

use std::fmt;

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Response};
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::LabelReport;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::info;
use url::Url;

use crate::error::AdapterError;
use crate::http::{error_for_status, HttpPolicy, RetryingClient};

pub const DEFAULT_API_URL: &str = "https://api.github.com";
const API_VERSION: &str = "2022-11-28";
const ACCEPT: &str = "application/vnd.github+json";
const PERMISSION_HINT: &str = "GITHUB_TOKEN needs `issues: write` (comments) or `pull-requests: write` and `contents: write` (pull requests, auto-merge)";
/// Pages followed at most when looking for our comment (100 per page).
const MAX_PAGES: usize = 50;

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
    /// A pull request from `head` into `base` whose body is the report;
    /// `auto_merge` enables squash auto-merge on it.
    PullRequest {
        head: String,
        base: String,
        auto_merge: bool,
    },
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

/// `Notifier` posting to GitHub.
#[derive(Debug, Clone)]
pub struct GithubNotifier {
    settings: GithubSettings,
    api: Url,
    owner: String,
    name: String,
    http: RetryingClient,
}

#[derive(Debug, Deserialize)]
struct Comment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PullRequest {
    number: u64,
    #[serde(default)]
    node_id: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    html_url: String,
}

/// The hidden marker identifying a label's comment / PR.
pub fn marker(label: &str) -> String {
    format!("<!-- retrain:label={label} -->")
}

impl GithubNotifier {
    pub fn new(settings: GithubSettings) -> Result<Self, AdapterError> {
        let (owner, name) = settings
            .repo
            .split_once('/')
            .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
            .map(|(o, n)| (o.to_owned(), n.to_owned()))
            .ok_or_else(|| {
                AdapterError::config(
                    "notify.github",
                    format!("`{}` is not an owner/name repository", settings.repo),
                )
            })?;
        let api = Url::parse(settings.api_url.trim_end_matches('/')).map_err(|e| {
            AdapterError::config(
                "GITHUB_API_URL",
                format!("`{}` is not a URL: {e}", settings.api_url),
            )
        })?;
        if settings.token.expose_secret().trim().is_empty() {
            return Err(AdapterError::config("GITHUB_TOKEN", "is empty"));
        }
        if let GithubTarget::PullRequest { head, base, .. } = &settings.target {
            if head.is_empty() || base.is_empty() {
                return Err(AdapterError::config(
                    "notify.github",
                    "a pull request target needs `head` and `base` branches",
                ));
            }
        }
        Ok(Self {
            http: RetryingClient::new(settings.policy.clone())?,
            settings,
            api,
            owner,
            name,
        })
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}/{}",
            self.api.as_str().trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }

    /// GraphQL endpoint: `https://api.github.com/graphql`, or for Enterprise
    /// (`https://host/api/v3`) `https://host/api/graphql`.
    fn graphql_url(&self) -> String {
        let base = self.api.as_str().trim_end_matches('/');
        match base.strip_suffix("/api/v3") {
            Some(host) => format!("{host}/api/graphql"),
            None => format!("{base}/graphql"),
        }
    }

    fn headers(&self, request: RequestBuilder) -> RequestBuilder {
        request
            .header("accept", ACCEPT)
            .header("x-github-api-version", API_VERSION)
            .bearer_auth(self.settings.token.expose_secret())
    }

    async fn send(
        &self,
        what: &str,
        method: Method,
        url: &str,
        body: Option<&Value>,
    ) -> Result<Response, PortError> {
        let response = self
            .http
            .send(what, |c| {
                let request = self.headers(c.request(method.clone(), url));
                match body {
                    Some(body) => request.json(body),
                    None => request,
                }
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

    /// Follow `Link: <…>; rel="next"`, but only to our own API host: the
    /// token must never be sent elsewhere.
    fn next_link(&self, response: &Response) -> Option<String> {
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
        (parsed.origin() == self.api.origin()).then_some(next)
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
            let response = self.send(what, Method::GET, &url, None).await?;
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

    async fn upsert_comment(&self, issue: u64, body: &str, marker: &str) -> Result<(), PortError> {
        let repo = self.repo();
        let what = format!("GitHub {repo}#{issue} comments");
        let comments: Vec<Comment> = self
            .list_all(
                &what,
                self.url(&format!(
                    "repos/{repo}/issues/{issue}/comments?per_page=100"
                )),
            )
            .await?;
        let payload = json!({ "body": body });
        match comments
            .iter()
            .find(|c| c.body.as_deref().is_some_and(|b| b.contains(marker)))
        {
            Some(existing) => {
                let what = format!("GitHub {repo}#{issue} update comment {}", existing.id);
                self.send(
                    &what,
                    Method::PATCH,
                    &self.url(&format!("repos/{repo}/issues/comments/{}", existing.id)),
                    Some(&payload),
                )
                .await?;
                info!(%repo, issue, comment = existing.id, "updated GitHub comment");
            }
            None => {
                let what = format!("GitHub {repo}#{issue} new comment");
                self.send(
                    &what,
                    Method::POST,
                    &self.url(&format!("repos/{repo}/issues/{issue}/comments")),
                    Some(&payload),
                )
                .await?;
                info!(%repo, issue, "posted GitHub comment");
            }
        }
        Ok(())
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
        let repo = self.repo();
        // The `head` filter wants `owner:branch`.
        let head_filter = if head.contains(':') {
            head.to_owned()
        } else {
            format!("{}:{head}", self.owner)
        };
        let what = format!("GitHub {repo} pull requests from {head}");
        let list_url = {
            let mut url = Url::parse(&self.url(&format!("repos/{repo}/pulls")))
                .map_err(|e| PortError::Config(format!("{what}: {e}")))?;
            url.query_pairs_mut()
                .append_pair("state", "open")
                .append_pair("head", &head_filter)
                .append_pair("base", base)
                .append_pair("per_page", "100");
            url.to_string()
        };
        let open: Vec<PullRequest> = self.list_all(&what, list_url).await?;
        // Ours first; else the open PR of this head/base (GitHub allows only
        // one, so creating another would fail with 422).
        let existing = open
            .iter()
            .find(|p| p.body.as_deref().is_some_and(|b| b.contains(marker)))
            .or_else(|| open.first());
        let pr: PullRequest = match existing {
            Some(pr) => {
                let what = format!("GitHub {repo}#{} update pull request", pr.number);
                let response = self
                    .send(
                        &what,
                        Method::PATCH,
                        &self.url(&format!("repos/{repo}/pulls/{}", pr.number)),
                        Some(&json!({ "body": body })),
                    )
                    .await?;
                info!(%repo, number = pr.number, "updated pull request");
                Self::json(&what, response).await?
            }
            None => {
                let what = format!("GitHub {repo} create pull request {head} → {base}");
                let title = format!("retrain: `{}` {}", report.label, report.status.as_str());
                let response = self
                    .send(
                        &what,
                        Method::POST,
                        &self.url(&format!("repos/{repo}/pulls")),
                        Some(&json!({ "title": title, "head": head, "base": base, "body": body })),
                    )
                    .await?;
                let pr: PullRequest = Self::json(&what, response).await?;
                info!(%repo, number = pr.number, url = %pr.html_url, "created pull request");
                pr
            }
        };
        if auto_merge {
            self.enable_auto_merge(&pr).await?;
        }
        Ok(())
    }

    async fn enable_auto_merge(&self, pr: &PullRequest) -> Result<(), PortError> {
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
        let response = self
            .send(&what, Method::POST, &self.graphql_url(), Some(&query))
            .await?;
        let answer: Value = Self::json(&what, response).await?;
        let Some(errors) = answer
            .get("errors")
            .and_then(Value::as_array)
            .filter(|e| !e.is_empty())
        else {
            info!(%repo, number = pr.number, "auto-merge enabled");
            return Ok(());
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
            )
            .await?;
            info!(%repo, number = pr.number, "pull request was mergeable: merged");
            return Ok(());
        }
        Err(PortError::Failed(format!(
            "{what}: {}",
            messages.join("; ")
        )))
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
            GithubTarget::PullRequest {
                head,
                base,
                auto_merge,
            } => {
                self.upsert_pull_request(report, head, base, *auto_merge, &body, &marker)
                    .await
            }
        }
    }

    fn describe(&self) -> String {
        match &self.settings.target {
            GithubTarget::Comment { issue } => format!("github {}#{issue}", self.repo()),
            GithubTarget::PullRequest { head, base, .. } => {
                format!("github {} pull request {head} → {base}", self.repo())
            }
        }
    }
}
