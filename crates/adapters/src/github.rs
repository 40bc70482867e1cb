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

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::LabelReport;
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
        let policy = HttpPolicy {
            max_server_wait: settings.policy.max_server_wait.min(MAX_RATE_LIMIT_WAIT),
            ..settings.policy.clone()
        };
        Ok(Self {
            http: RetryingClient::new(policy)?,
            settings,
            api,
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

    fn request(
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
            .bearer_auth(self.settings.token.expose_secret());
        match body {
            Some(body) => request.json(body),
            None => request,
        }
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
            .http
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
            .http
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
            .http
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
            self.enable_auto_merge(&pr).await?;
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
            .http
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
            return Err(error_for_status(&what, PERMISSION_HINT, response).await);
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
                Replay::ByMethod,
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
