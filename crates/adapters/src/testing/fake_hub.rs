//! A stateful fake Hugging Face Hub for end-to-end tests of other crates.
//!
//! It speaks the shapes of `shared/reference/external-apis.md` §1 for the
//! calls retrain makes: Space runtime/restart/variables and dataset resolve
//! URLs (`HEAD`/`GET` with `X-Repo-Commit` and `ETag`; `If-None-Match` →
//! `304`). Every request must carry `authorization: Bearer <token>` (401
//! otherwise), so a test passing against it proves the token is sent.
//!
//! Time is wall-clock: a publication scheduled `delay` after a restart
//! becomes visible to the first request made after that delay.
//!
//! Space variables behave as the reference says (§1.2): setting one does not
//! restart the Space; the variables are injected at the next (re)start
//! ([`FakeHub::started_env`]). Restarts are counted per Space and per
//! `RETRAIN_JOB_KEY` ([`FakeHub::restarts_for_job`]), and a second restart
//! for the job key the Space was last restarted for is **refused** (HTTP 409,
//! counted by [`FakeHub::rejected_restarts`]) unless a test allows it
//! ([`FakeHub::allow_repeated_job_restarts`]): an adapter that restarts a
//! trainer Space twice for one job fails loudly here. A restart can also be
//! applied while its response is lost ([`FakeHub::lose_next_restart_response`]),
//! to check that a client does not re-post it blindly.
//!
//! ```no_run
//! # async fn demo() {
//! use retrain_adapters::testing::fake_hub::FakeHub;
//! let hub = FakeHub::start().await;
//! hub.add_space("owner/prepare", "RUNNING");
//! hub.add_dataset("owner/ds", "dataset_metadata.json", None);
//! hub.on_restart_publish(
//!     "owner/prepare",
//!     "owner/ds",
//!     "dataset_metadata.json",
//!     serde_json::json!({"dataset_name": "owner/ds", "version_tag": "v2",
//!                        "num_samples": 100, "created_at": "2025-10-30T11:53:01Z"}),
//!     std::time::Duration::from_millis(50),
//! );
//! let settings = hub.settings(); // endpoint + token + fast retry policy
//! # }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use sha2::Digest;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::hf::{HubClient, HubSettings};
use crate::http::HttpPolicy;

/// The token [`FakeHub::start`] requires.
pub const FAKE_TOKEN: &str = "hf_fake_hub_token_0123456789";

/// The variable whose value identifies the job a restart is for.
const JOB_KEY_VARIABLE: &str = "RETRAIN_JOB_KEY";

/// How the response of a restart that *was applied* gets lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostResponse {
    /// The response arrives after this delay (longer than the client's
    /// timeout: the client sees a timeout).
    Delay(Duration),
    /// The response is this HTTP status (e.g. a 502 from a gateway).
    Status(u16),
}

/// One request the fake Hub received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Whether it carried the expected bearer token.
    pub authorized: bool,
}

#[derive(Debug, Clone)]
struct Publication {
    dataset: String,
    path: String,
    content: Vec<u8>,
    delay: Duration,
}

#[derive(Debug)]
struct Space {
    stage: String,
    error_message: Option<String>,
    /// Stages a restart goes through, one per runtime read; the last stays.
    restart_stages: Vec<String>,
    queued: VecDeque<String>,
    variables: BTreeMap<String, String>,
    variable_history: Vec<(String, String)>,
    restarts: u64,
    factory_restarts: u64,
    on_restart: Vec<Publication>,
    /// Restarts per `RETRAIN_JOB_KEY` value at the time of the restart.
    restarts_by_job: BTreeMap<String, u64>,
    /// The job key of the last restart, if the variable was set.
    last_restart_job: Option<String>,
    /// The variables injected at the last restart.
    started_env: BTreeMap<String, String>,
    allow_repeated_job_restarts: bool,
    rejected_restarts: u64,
    lose_next_restart_response: Option<LostResponse>,
}

impl Space {
    fn new(stage: &str) -> Self {
        Self {
            stage: stage.to_owned(),
            error_message: None,
            restart_stages: vec!["RUNNING".to_owned()],
            queued: VecDeque::new(),
            variables: BTreeMap::new(),
            variable_history: Vec::new(),
            restarts: 0,
            factory_restarts: 0,
            on_restart: Vec::new(),
            restarts_by_job: BTreeMap::new(),
            last_restart_job: None,
            started_env: BTreeMap::new(),
            allow_repeated_job_restarts: false,
            rejected_restarts: 0,
            lose_next_restart_response: None,
        }
    }
}

#[derive(Debug, Default)]
struct Dataset {
    commit: String,
    files: BTreeMap<String, Vec<u8>>,
    heads: u64,
    gets: u64,
    /// Conditional requests answered `304 Not Modified`.
    not_modified: u64,
}

#[derive(Debug, Default)]
struct State {
    token: String,
    spaces: BTreeMap<String, Space>,
    datasets: BTreeMap<String, Dataset>,
    pending: Vec<(Instant, Publication)>,
    requests: Vec<RecordedRequest>,
    posts: u64,
    commits: u64,
    failures: VecDeque<u16>,
}

impl State {
    /// The Space `repo`, created `RUNNING` if unknown: configuring a Space
    /// the test forgot to add must not be silently ignored.
    fn space_mut(&mut self, repo: &str) -> &mut Space {
        self.spaces
            .entry(repo.to_owned())
            .or_insert_with(|| Space::new("RUNNING"))
    }

    fn next_commit(&mut self) -> String {
        self.commits += 1;
        // Shaped like a git sha so adapters see realistic markers.
        let digest = sha2::Sha256::digest(self.commits.to_be_bytes());
        hex::encode(&digest[..20])
    }

    fn publish(&mut self, dataset: &str, path: &str, content: Vec<u8>) {
        let commit = self.next_commit();
        let entry = self.datasets.entry(dataset.to_owned()).or_default();
        entry.commit = commit;
        entry.files.insert(path.to_owned(), content);
    }

    /// Apply the publications whose delay has passed.
    fn apply_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.pending = later;
        let mut due = due;
        due.sort_by_key(|(at, _)| *at);
        for (_, publication) in due {
            self.publish(&publication.dataset, &publication.path, publication.content);
        }
    }
}

/// The fake Hub. Dropping it stops the server.
#[derive(Debug)]
pub struct FakeHub {
    server: MockServer,
    state: Arc<Mutex<State>>,
    token: String,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not cascade into every later request.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_error_stage(stage: &str) -> bool {
    matches!(
        stage,
        "BUILD_ERROR" | "RUNTIME_ERROR" | "CONFIG_ERROR" | "NO_APP_FILE"
    )
}

impl FakeHub {
    /// Start a fake Hub requiring [`FAKE_TOKEN`].
    pub async fn start() -> Self {
        Self::start_with_token(FAKE_TOKEN).await
    }

    pub async fn start_with_token(token: &str) -> Self {
        let state = Arc::new(Mutex::new(State {
            token: token.to_owned(),
            ..State::default()
        }));
        let server = MockServer::start().await;
        Mock::given(any())
            .respond_with(Responder(state.clone()))
            .mount(&server)
            .await;
        Self {
            server,
            state,
            token: token.to_owned(),
        }
    }

    /// Base URL, to use as `HF_ENDPOINT`.
    pub fn uri(&self) -> String {
        self.server.uri()
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Settings pointing at this fake with its token and millisecond retries.
    pub fn settings(&self) -> HubSettings {
        HubSettings {
            // MockServer's URI is always a valid http URL.
            endpoint: url::Url::parse(&self.uri()).expect("wiremock URI is a URL"),
            token: Some(SecretString::from(self.token.clone())),
            policy: HttpPolicy::fast_for_tests(),
        }
    }

    /// A client for [`FakeHub::settings`].
    pub fn client(&self) -> HubClient {
        HubClient::new(self.settings()).expect("fake hub settings are valid")
    }

    /// The dataset-metadata URL of `repo`/`path` on this fake (the seed's form).
    pub fn metadata_url(&self, repo: &str, path: &str) -> String {
        format!("{}/datasets/{repo}/resolve/main/{path}", self.uri())
    }

    /// Create dataset repo `repo`, with `path` holding `metadata` if given
    /// (`None`: the repo exists but the file does not, so reads are `Absent`).
    pub fn add_dataset(&self, repo: &str, path: &str, metadata: Option<serde_json::Value>) {
        let mut state = lock(&self.state);
        let commit = state.next_commit();
        let entry = state.datasets.entry(repo.to_owned()).or_default();
        entry.commit = commit;
        if let Some(metadata) = metadata {
            entry
                .files
                .insert(path.to_owned(), metadata.to_string().into_bytes());
        }
    }

    /// Publish `metadata` now (a new commit: `X-Repo-Commit` and `ETag` change).
    pub fn publish(&self, repo: &str, path: &str, metadata: serde_json::Value) {
        self.publish_raw(repo, path, metadata.to_string().into_bytes());
    }

    /// Publish arbitrary bytes (e.g. malformed JSON).
    pub fn publish_raw(&self, repo: &str, path: &str, content: impl Into<Vec<u8>>) {
        lock(&self.state).publish(repo, path, content.into());
    }

    /// Create Space `repo` in `stage`. A restart then moves it to `RUNNING`
    /// unless [`FakeHub::set_restart_stages`] says otherwise.
    pub fn add_space(&self, repo: &str, stage: &str) {
        lock(&self.state)
            .spaces
            .insert(repo.to_owned(), Space::new(stage));
    }

    /// Set the current stage. The setters below create an unknown Space
    /// (`RUNNING`) rather than ignore it.
    pub fn set_stage(&self, space: &str, stage: &str) {
        let mut state = lock(&self.state);
        let s = state.space_mut(space);
        s.stage = stage.to_owned();
        s.queued.clear();
    }

    /// The `errorMessage` reported on error stages.
    pub fn set_error_message(&self, space: &str, message: &str) {
        lock(&self.state).space_mut(space).error_message = Some(message.to_owned());
    }

    /// The stages a restart goes through, one per runtime read, the last one
    /// sticking (default `["RUNNING"]`). E.g. `["BUILDING", "BUILD_ERROR"]`
    /// makes a prepare Space fail after a restart.
    pub fn set_restart_stages(&self, space: &str, stages: &[&str]) {
        lock(&self.state).space_mut(space).restart_stages =
            stages.iter().map(|s| (*s).to_owned()).collect();
    }

    /// Every restart of `space` publishes `metadata` at `dataset`/`path`
    /// `delay` later (bumping its commit and ETag). Registering the same
    /// (space, dataset, path) again replaces the metadata.
    pub fn on_restart_publish(
        &self,
        space: &str,
        dataset: &str,
        path: &str,
        metadata: serde_json::Value,
        delay: Duration,
    ) {
        let mut state = lock(&self.state);
        state.datasets.entry(dataset.to_owned()).or_default();
        let s = state.space_mut(space);
        s.on_restart
            .retain(|p| !(p.dataset == dataset && p.path == path));
        s.on_restart.push(Publication {
            dataset: dataset.to_owned(),
            path: path.to_owned(),
            content: metadata.to_string().into_bytes(),
            delay,
        });
    }

    /// The next `count` requests (any route) answer `status` (429s carry
    /// `Retry-After: 0`), to exercise retries.
    pub fn fail_next(&self, count: usize, status: u16) {
        let mut state = lock(&self.state);
        state.failures.extend(std::iter::repeat_n(status, count));
    }

    pub fn restarts(&self, space: &str) -> u64 {
        lock(&self.state)
            .spaces
            .get(space)
            .map_or(0, |s| s.restarts)
    }

    /// Restarts of `space` made while its `RETRAIN_JOB_KEY` was `job_key`.
    pub fn restarts_for_job(&self, space: &str, job_key: &str) -> u64 {
        lock(&self.state)
            .spaces
            .get(space)
            .and_then(|s| s.restarts_by_job.get(job_key).copied())
            .unwrap_or(0)
    }

    /// Restarts refused because the Space was already restarted for that
    /// job key (see the module doc).
    pub fn rejected_restarts(&self, space: &str) -> u64 {
        lock(&self.state)
            .spaces
            .get(space)
            .map_or(0, |s| s.rejected_restarts)
    }

    /// Accept repeated restarts for one job key on `space` (for tests of a
    /// Space that must legitimately be restarted again, e.g. after a pause).
    pub fn allow_repeated_job_restarts(&self, space: &str) {
        lock(&self.state)
            .space_mut(space)
            .allow_repeated_job_restarts = true;
    }

    /// The variables the Space was last (re)started with: what its app sees
    /// as env vars.
    pub fn started_env(&self, space: &str) -> BTreeMap<String, String> {
        lock(&self.state)
            .spaces
            .get(space)
            .map(|s| s.started_env.clone())
            .unwrap_or_default()
    }

    /// The next restart of `space` is applied, but its response is lost
    /// `how` (delayed past the client's timeout, or a 5xx).
    pub fn lose_next_restart_response(&self, space: &str, how: LostResponse) {
        lock(&self.state)
            .space_mut(space)
            .lose_next_restart_response = Some(how);
    }

    pub fn factory_restarts(&self, space: &str) -> u64 {
        lock(&self.state)
            .spaces
            .get(space)
            .map_or(0, |s| s.factory_restarts)
    }

    /// Current variables of `space`.
    pub fn variables(&self, space: &str) -> BTreeMap<String, String> {
        lock(&self.state)
            .spaces
            .get(space)
            .map(|s| s.variables.clone())
            .unwrap_or_default()
    }

    /// Every variable set on `space`, in order.
    pub fn variable_history(&self, space: &str) -> Vec<(String, String)> {
        lock(&self.state)
            .spaces
            .get(space)
            .map(|s| s.variable_history.clone())
            .unwrap_or_default()
    }

    pub fn stage(&self, space: &str) -> Option<String> {
        lock(&self.state).spaces.get(space).map(|s| s.stage.clone())
    }

    /// Total POST requests (restarts + variables + anything else).
    pub fn posts(&self) -> u64 {
        lock(&self.state).posts
    }

    /// Number of resolve `HEAD`s / `GET`s on dataset `repo`.
    pub fn metadata_heads(&self, repo: &str) -> u64 {
        lock(&self.state).datasets.get(repo).map_or(0, |d| d.heads)
    }

    pub fn metadata_gets(&self, repo: &str) -> u64 {
        lock(&self.state).datasets.get(repo).map_or(0, |d| d.gets)
    }

    /// Number of resolve requests on dataset `repo` answered `304 Not
    /// Modified` (their `If-None-Match` named the current `ETag`).
    pub fn metadata_not_modified(&self, repo: &str) -> u64 {
        lock(&self.state)
            .datasets
            .get(repo)
            .map_or(0, |d| d.not_modified)
    }

    /// Current commit of dataset `repo` (after due publications).
    pub fn commit(&self, repo: &str) -> Option<String> {
        let mut state = lock(&self.state);
        state.apply_due();
        state.datasets.get(repo).map(|d| d.commit.clone())
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }
}

struct Responder(Arc<Mutex<State>>);

fn json_error(status: u16, code: Option<&str>, message: &str) -> ResponseTemplate {
    let mut response =
        ResponseTemplate::new(status).set_body_json(serde_json::json!({ "error": message }));
    if let Some(code) = code {
        response = response
            .insert_header("x-error-code", code)
            .insert_header("x-error-message", message);
    }
    response
}

fn runtime_json(space: &Space) -> serde_json::Value {
    let mut body = serde_json::json!({
        "stage": space.stage,
        "hardware": {"current": "cpu-basic", "requested": "cpu-basic"},
        "storage": null,
        "gcTimeout": 172800,
        "replicas": {"requested": 1},
        "devMode": false,
    });
    if is_error_stage(&space.stage) {
        body["errorMessage"] = serde_json::Value::String(
            space
                .error_message
                .clone()
                .unwrap_or_else(|| format!("fake hub: Space is in {}", space.stage)),
        );
    }
    body
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut state = lock(&self.0);
        state.apply_due();
        let method = request.method.as_str().to_owned();
        let expected = format!("Bearer {}", state.token);
        let authorized = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(expected.as_str());
        state.requests.push(RecordedRequest {
            method: method.clone(),
            path: request.url.path().to_owned(),
            query: request.url.query().map(str::to_owned),
            authorized,
        });
        if method == "POST" {
            state.posts += 1;
        }
        if let Some(status) = state.failures.pop_front() {
            let mut response = json_error(status, None, "fake hub: injected failure");
            if status == 429 {
                response = response.insert_header("retry-after", "0");
            }
            return response;
        }
        if !authorized {
            return json_error(401, None, "Invalid credentials in Authorization header");
        }
        let segments: Vec<String> = request
            .url
            .path_segments()
            .map(|s| {
                s.map(|p| {
                    percent_encoding::percent_decode_str(p)
                        .decode_utf8_lossy()
                        .into_owned()
                })
                .collect()
            })
            .unwrap_or_default();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (method.as_str(), segments.as_slice()) {
            (_, ["api", "spaces", owner, name, action]) => {
                let repo = format!("{owner}/{name}");
                space_route(&mut state, &method, &repo, action, request)
            }
            ("HEAD" | "GET", ["datasets", owner, name, "resolve", revision, path @ ..])
                if !path.is_empty() =>
            {
                let repo = format!("{owner}/{name}");
                let if_none_match = request
                    .headers
                    .get("if-none-match")
                    .and_then(|v| v.to_str().ok());
                resolve_route(
                    &mut state,
                    &method,
                    &repo,
                    (revision, &path.join("/")),
                    if_none_match,
                )
            }
            _ => json_error(404, None, "fake hub: no such route"),
        }
    }
}

fn space_route(
    state: &mut State,
    method: &str,
    repo: &str,
    action: &str,
    request: &Request,
) -> ResponseTemplate {
    let now = Instant::now();
    let Some(space) = state.spaces.get_mut(repo) else {
        return json_error(404, Some("RepoNotFound"), "Repository not found");
    };
    match (method, action) {
        ("GET", "runtime") => {
            let body = runtime_json(space);
            if let Some(next) = space.queued.pop_front() {
                space.stage = next;
            }
            ResponseTemplate::new(200).set_body_json(body)
        }
        ("POST", "restart") => {
            let job = space.variables.get(JOB_KEY_VARIABLE).cloned();
            if let Some(job) = &job {
                if space.last_restart_job.as_ref() == Some(job)
                    && !space.allow_repeated_job_restarts
                {
                    space.rejected_restarts += 1;
                    return json_error(
                        409,
                        None,
                        &format!(
                            "fake hub: Space {repo} was already restarted for job {job}; \
                             a second restart for one job is a bug"
                        ),
                    );
                }
                *space.restarts_by_job.entry(job.clone()).or_default() += 1;
            }
            space.last_restart_job = job;
            space.started_env = space.variables.clone();
            space.restarts += 1;
            let factory = request
                .url
                .query_pairs()
                .any(|(k, v)| k == "factory" && v == "true");
            if factory {
                space.factory_restarts += 1;
            }
            space.queued = space.restart_stages.iter().cloned().collect();
            if let Some(first) = space.queued.pop_front() {
                space.stage = first;
            }
            let body = runtime_json(space);
            let scheduled: Vec<_> = space
                .on_restart
                .iter()
                .map(|p| (now + p.delay, p.clone()))
                .collect();
            let lost = space.lose_next_restart_response.take();
            state.pending.extend(scheduled);
            state.apply_due();
            match lost {
                None => ResponseTemplate::new(200).set_body_json(body),
                Some(LostResponse::Delay(delay)) => ResponseTemplate::new(200)
                    .set_body_json(body)
                    .set_delay(delay),
                Some(LostResponse::Status(status)) => json_error(
                    status,
                    None,
                    "fake hub: bad gateway (the restart was applied)",
                ),
            }
        }
        ("POST", "variables") => {
            let body: serde_json::Value = match request.body_json() {
                Ok(v) => v,
                Err(_) => return json_error(400, None, "body must be JSON"),
            };
            let (Some(key), Some(value)) = (
                body.get("key").and_then(|k| k.as_str()),
                body.get("value").and_then(|v| v.as_str()),
            ) else {
                return json_error(400, None, "`key` and `value` must be strings");
            };
            space.variables.insert(key.to_owned(), value.to_owned());
            space
                .variable_history
                .push((key.to_owned(), value.to_owned()));
            ResponseTemplate::new(200).set_body_json(variables_json(space))
        }
        ("GET", "variables") => ResponseTemplate::new(200).set_body_json(variables_json(space)),
        _ => json_error(404, None, "fake hub: no such Space route"),
    }
}

fn variables_json(space: &Space) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = space
        .variables
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                serde_json::json!({"value": v, "description": null, "updatedAt": "2025-01-01T00:00:00.000Z"}),
            )
        })
        .collect();
    serde_json::Value::Object(map)
}

/// A dataset file's resolve URL, as the Hub answers it for a small (non-LFS)
/// file: `200` with the content, `X-Repo-Commit` and the quoted `ETag`; a
/// request whose `If-None-Match` names the current `ETag` gets `304 Not
/// Modified` with the same headers and no body (the Hub does this on
/// resolve URLs, not on `raw` ones: huggingface/huggingface.js#1713).
fn resolve_route(
    state: &mut State,
    method: &str,
    repo: &str,
    (revision, path): (&str, &str),
    if_none_match: Option<&str>,
) -> ResponseTemplate {
    let Some(dataset) = state.datasets.get_mut(repo) else {
        return json_error(404, Some("RepoNotFound"), "Repository not found");
    };
    if method == "HEAD" {
        dataset.heads += 1;
    } else {
        dataset.gets += 1;
    }
    if revision != "main" && revision != dataset.commit {
        return json_error(
            404,
            Some("RevisionNotFound"),
            &format!("Invalid rev id: {revision}"),
        );
    }
    let Some(content) = dataset.files.get(path) else {
        return json_error(404, Some("EntryNotFound"), "Entry not found");
    };
    // Non-LFS files: the ETag is the git blob sha; any content hash will do.
    let etag = format!("\"{}\"", hex::encode(&sha2::Sha256::digest(content)[..20]));
    let matches = if_none_match.is_some_and(|header| {
        header
            .split(',')
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag == etag)
    });
    let status = if matches { 304 } else { 200 };
    let response = ResponseTemplate::new(status)
        .insert_header("x-repo-commit", dataset.commit.as_str())
        .insert_header("etag", etag.as_str());
    if matches {
        dataset.not_modified += 1;
        response
    } else if method == "HEAD" {
        response
    } else {
        response.set_body_raw(content.clone(), "application/json")
    }
}
