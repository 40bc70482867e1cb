//! The worker side of the `retrain-server` HTTP contract (docs/workers.md):
//! typed requests and answers over the shared [`RetryingClient`].
//!
//! What may be resent after a lost answer: heartbeats (they set a state),
//! result reports (the server answers the same body twice with 200) and
//! artifact PUTs; never a lease (a lost answer may have assigned a job,
//! which the agent then recovers from, see `WorkerAgent`) nor a log chunk
//! (it would be appended twice).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::{Response, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use url::Url;

use super::resources::Resources;
use super::AgentError;
use crate::http::{Call, HttpPolicy, Replay, RetryingClient};

/// The largest answer read from the server (listings included).
const ANSWER_LIMIT: usize = 8 << 20;
/// Longest artifact upload.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Added to a long poll's `wait_secs` for the request's own timeout.
const LONG_POLL_SLACK: Duration = Duration::from_secs(15);

/// `POST /v1/workers`.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    pub name: String,
    pub hostname: String,
    pub labels: Vec<String>,
    pub resources: Resources,
    pub version: String,
}

/// The answer to a registration.
#[derive(Debug, Clone, Deserialize)]
pub struct Registered {
    pub worker_id: String,
    pub heartbeat_interval_secs: u64,
    pub worker_ttl_secs: u64,
}

/// What the worker reports in a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    Idle,
    Running,
    Draining,
}

#[derive(Debug, Deserialize)]
struct HeartbeatAnswer {
    #[serde(default)]
    cancel: Vec<String>,
}

/// `dataset` of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobDataset {
    pub name: String,
    pub version: String,
}

/// A job leased to this worker. `env` may hold secrets: `Debug` shows only
/// the variable names.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub job_key: String,
    pub run_id: String,
    pub label: String,
    pub attempt: u32,
    pub dataset: JobDataset,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub timeout_secs: u64,
    pub results_url: String,
    pub logs_url: String,
    pub artifacts_url: String,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("job_key", &self.job_key)
            .field("run_id", &self.run_id)
            .field("label", &self.label)
            .field("attempt", &self.attempt)
            .field("dataset", &self.dataset)
            .field("command", &self.command)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("timeout_secs", &self.timeout_secs)
            .finish_non_exhaustive()
    }
}

/// The answer to a lease request.
#[derive(Debug)]
pub enum LeaseAnswer {
    Job(Box<Job>),
    /// `204`: nothing fitted within the wait.
    NoJob,
}

/// The answer to a result report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultAnswer {
    Accepted,
    /// `409`: the server no longer awaits this job from this worker.
    NotAwaited,
}

/// `PUT /v1/runs/{id}/artifacts/{name}`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct StoredArtifact {
    pub name: String,
    pub size_bytes: u64,
    pub sha256: String,
}

/// A client of one `retrain-server`, authenticated with one bearer token.
#[derive(Clone)]
pub struct ServerClient {
    base: Url,
    token: SecretString,
    http: RetryingClient,
}

impl std::fmt::Debug for ServerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClient")
            .field(
                "base",
                &crate::http::display_url(&self.base, Default::default()),
            )
            .finish_non_exhaustive()
    }
}

/// The server's error body.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl ServerClient {
    /// `server` is the base URL (`https://retrain.example.com`); paths of
    /// the contract are joined to it.
    pub fn new(server: &str, token: SecretString, policy: HttpPolicy) -> Result<Self, AgentError> {
        // The text is not echoed: an unparsable URL may still hold a password.
        let mut base = Url::parse(server.trim())
            .map_err(|e| AgentError::Config(format!("--server is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
            return Err(AgentError::Config(
                "--server must be an http:// or https:// URL with a host".into(),
            ));
        }
        if !base.username().is_empty() || base.password().is_some() || base.query().is_some() {
            return Err(AgentError::Config(
                "--server must not carry user info or a query; the token comes from the environment"
                    .into(),
            ));
        }
        if token.expose_secret().trim().is_empty() {
            return Err(AgentError::Config("the server token is empty".into()));
        }
        // A base with a path prefix (behind a proxy) keeps it: paths are
        // appended (see `url`), never resolved against the root.
        let path = base.path().trim_end_matches('/').to_owned();
        base.set_path(&path);
        let http = RetryingClient::new("retrain-server", policy)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        Ok(Self { base, token, http })
    }

    /// The server's URL for the absolute path `path` (`/v1/...`).
    pub fn url(&self, path: &str) -> Result<Url, AgentError> {
        if !path.starts_with('/') || path.starts_with("//") {
            return Err(AgentError::Protocol(format!(
                "the server sent the URL {path:?}; expected an absolute path such as /v1/runs/ID/results"
            )));
        }
        let mut url = self.base.clone();
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        url.set_path(&format!("{}{path}", self.base.path().trim_end_matches('/')));
        url.set_query(query);
        Ok(url)
    }

    async fn send(
        &self,
        call: Call<'_>,
        method: reqwest::Method,
        url: &Url,
        body: Option<&serde_json::Value>,
        timeout: Option<Duration>,
    ) -> Result<Response, AgentError> {
        let token = self.token.expose_secret();
        self.http
            .send_with(&call, |client| {
                let mut request = client
                    .request(method.clone(), url.clone())
                    .bearer_auth(token);
                if let Some(body) = body {
                    request = request.json(body);
                }
                if let Some(timeout) = timeout {
                    request = request.timeout(timeout);
                }
                request
            })
            .await
            .map_err(|e| AgentError::Transport(e.to_string()))
    }

    /// Register this worker.
    pub async fn register(&self, registration: &Registration) -> Result<Registered, AgentError> {
        let what = "worker registration";
        let url = self.url("/v1/workers")?;
        let body = to_json(registration);
        // A lost answer leaves an extra registration, which goes stale and
        // is cleaned up: registering again is harmless.
        let response = self
            .send(
                Call::new(what, Replay::Idempotent),
                reqwest::Method::POST,
                &url,
                Some(&body),
                None,
            )
            .await?;
        expect_json(what, response, StatusCode::CREATED).await
    }

    /// Report the state; returns the job keys the server wants killed.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        state: WorkerState,
        job_key: Option<&str>,
    ) -> Result<Vec<String>, AgentError> {
        let what = "worker heartbeat";
        let url = self.url(&format!("/v1/workers/{}/heartbeat", segment(worker_id)))?;
        let body = serde_json::json!({ "state": state, "job_key": job_key });
        // Not retried: the next heartbeat is the retry. A backoff (1, 2, 4 s…)
        // while the server restarts would deliver it later than the next
        // tick, past `worker_ttl`, and lose the running job.
        let response = self
            .send(
                Call::new(what, Replay::Idempotent).retries(0),
                reqwest::Method::POST,
                &url,
                Some(&body),
                None,
            )
            .await?;
        let answer: HeartbeatAnswer = expect_json(what, response, StatusCode::OK).await?;
        Ok(answer.cancel)
    }

    /// Long-poll for a job for up to `wait_secs`.
    pub async fn lease(&self, worker_id: &str, wait_secs: u32) -> Result<LeaseAnswer, AgentError> {
        let what = "job lease";
        let url = self.url(&format!("/v1/workers/{}/lease-job", segment(worker_id)))?;
        let body = serde_json::json!({ "wait_secs": wait_secs });
        let timeout = Duration::from_secs(wait_secs.into()) + LONG_POLL_SLACK;
        let response = self
            .send(
                Call::new(what, Replay::Never),
                reqwest::Method::POST,
                &url,
                Some(&body),
                Some(timeout),
            )
            .await?;
        if response.status() == StatusCode::NO_CONTENT {
            return Ok(LeaseAnswer::NoJob);
        }
        let job: Job = expect_json(what, response, StatusCode::OK).await?;
        if job.command.is_empty() {
            return Err(AgentError::Protocol(format!(
                "job {} has an empty command",
                job.job_key
            )));
        }
        Ok(LeaseAnswer::Job(Box::new(job)))
    }

    /// Append `chunk` to the job's log on the server.
    pub async fn post_log(
        &self,
        logs_url: &str,
        job_key: &str,
        worker_id: &str,
        chunk: &str,
    ) -> Result<(), AgentError> {
        let what = "job log chunk";
        let url = self.url(logs_url)?;
        let body =
            serde_json::json!({ "job_key": job_key, "worker_id": worker_id, "chunk": chunk });
        let response = self
            .send(
                Call::new(what, Replay::Never),
                reqwest::Method::POST,
                &url,
                Some(&body),
                None,
            )
            .await?;
        expect_empty(what, response).await
    }

    /// Report a job's end (`body` is the full JSON text: success bodies
    /// carry Python-style `NaN` tokens, which `serde_json` cannot write).
    pub async fn post_result(
        &self,
        results_url: &str,
        body: String,
    ) -> Result<ResultAnswer, AgentError> {
        let what = "job result";
        let url = self.url(results_url)?;
        let token = self.token.expose_secret();
        let response = self
            .http
            .send_with(&Call::new(what, Replay::Idempotent), |client| {
                client
                    .post(url.clone())
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await
            .map_err(|e| AgentError::Transport(e.to_string()))?;
        if response.status() == StatusCode::CONFLICT {
            let error = api_error(what, response).await;
            tracing::warn!(error = %error, "the server no longer awaits this job's result");
            return Ok(ResultAnswer::NotAwaited);
        }
        let _: serde_json::Value = expect_json(what, response, StatusCode::OK).await?;
        Ok(ResultAnswer::Accepted)
    }

    /// Upload the file at `path` as artifact `name`, streamed.
    pub async fn put_artifact(
        &self,
        artifacts_url: &str,
        name: &str,
        path: &Path,
    ) -> Result<StoredArtifact, AgentError> {
        let what = format!("artifact {name}");
        let url = self.url(&format!(
            "{}/{}",
            artifacts_url.trim_end_matches('/'),
            segment(name)
        ))?;
        let size = std::fs::metadata(path)
            .map_err(|e| AgentError::Job(format!("cannot read {}: {e}", path.display())))?
            .len();
        let token = self.token.expose_secret();
        let response = self
            .http
            .send_with(&Call::new(&what, Replay::ByMethod), |client| {
                client
                    .put(url.clone())
                    .bearer_auth(token)
                    .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                    .header(reqwest::header::CONTENT_LENGTH, size)
                    .timeout(UPLOAD_TIMEOUT)
                    .body(reqwest::Body::wrap_stream(file_stream(path.to_path_buf())))
            })
            .await
            .map_err(|e| AgentError::Transport(e.to_string()))?;
        expect_json(&what, response, StatusCode::CREATED).await
    }

    /// Deregister (after draining).
    pub async fn deregister(&self, worker_id: &str) -> Result<(), AgentError> {
        let what = "worker deregistration";
        let url = self.url(&format!("/v1/workers/{}", segment(worker_id)))?;
        let response = self
            .send(
                Call::new(what, Replay::ByMethod),
                reqwest::Method::DELETE,
                &url,
                None,
                None,
            )
            .await?;
        expect_empty(what, response).await
    }

    /// `GET path` as JSON (the `retrain workers` listings).
    pub async fn get_json(&self, what: &str, path: &str) -> Result<serde_json::Value, AgentError> {
        let url = self.url(path)?;
        let response = self
            .send(
                Call::new(what, Replay::ByMethod),
                reqwest::Method::GET,
                &url,
                None,
                None,
            )
            .await?;
        expect_json(what, response, StatusCode::OK).await
    }
}

/// What is escaped in a path segment: everything but RFC 3986's unreserved.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// A path segment: ids and artifact names are checked to be URL-safe, but
/// a path is never built on that assumption.
fn segment(raw: &str) -> String {
    match percent_encoding::utf8_percent_encode(raw, SEGMENT).to_string() {
        // `.` and `..` would be resolved away.
        dots if dots.chars().all(|c| c == '.') => dots.replace('.', "%2E"),
        encoded => encoded,
    }
}

fn to_json(value: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// The file's bytes in 64 KiB chunks, opened when the upload starts (so
/// every retry reads it from the beginning).
fn file_stream(
    path: std::path::PathBuf,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    enum State {
        Closed(std::path::PathBuf),
        Open(tokio::fs::File),
        Done,
    }
    futures::stream::unfold(State::Closed(path), |state| async move {
        let mut file = match state {
            State::Done => return None,
            State::Open(file) => file,
            State::Closed(path) => match tokio::fs::File::open(&path).await {
                Ok(file) => file,
                Err(e) => return Some((Err(e), State::Done)),
            },
        };
        let mut buffer = vec![0u8; 64 * 1024];
        match file.read(&mut buffer).await {
            Ok(0) => None,
            Ok(n) => {
                buffer.truncate(n);
                Some((Ok(buffer), State::Open(file)))
            }
            Err(e) => Some((Err(e), State::Done)),
        }
    })
}

/// The server's error as an [`AgentError::Api`].
async fn api_error(what: &str, response: Response) -> AgentError {
    let status = response.status().as_u16();
    let text = crate::http::read_limited(what, response, 64 * 1024)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default();
    let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => (body.error.code, body.error.message),
        Err(_) => (String::new(), text.chars().take(300).collect()),
    };
    AgentError::Api {
        what: what.to_owned(),
        status,
        code,
        message,
    }
}

async fn expect_json<T: serde::de::DeserializeOwned>(
    what: &str,
    response: Response,
    expected: StatusCode,
) -> Result<T, AgentError> {
    if response.status() != expected {
        return Err(api_error(what, response).await);
    }
    let bytes = crate::http::read_limited(what, response, ANSWER_LIMIT)
        .await
        .map_err(|e| AgentError::Transport(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        AgentError::Protocol(format!("{what}: unexpected answer from the server: {e}"))
    })
}

async fn expect_empty(what: &str, response: Response) -> Result<(), AgentError> {
    if response.status().is_success() {
        Ok(())
    } else {
        Err(api_error(what, response).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> ServerClient {
        ServerClient::new(
            base,
            SecretString::from("t0ken"),
            HttpPolicy::fast_for_tests(),
        )
        .unwrap()
    }

    #[test]
    fn paths_are_joined_to_the_base_keeping_its_prefix() {
        assert_eq!(
            client("http://127.0.0.1:8080")
                .url("/v1/runs/r1/results")
                .unwrap()
                .as_str(),
            "http://127.0.0.1:8080/v1/runs/r1/results"
        );
        assert_eq!(
            client("https://x.example/retrain/")
                .url("/v1/workers")
                .unwrap()
                .as_str(),
            "https://x.example/retrain/v1/workers"
        );
        let base = client("https://x.example");
        for bad in ["v1/workers", "//evil.example/v1", "https://evil.example/v1"] {
            assert!(base.url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segments_escape_all_but_unreserved_characters() {
        assert_eq!(segment("w-1_a.b~c"), "w-1_a.b~c");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(segment(".."), "%2E%2E");
    }

    #[test]
    fn bad_server_urls_and_empty_tokens_are_refused() {
        for bad in [
            "not a url",
            "ftp://x.example",
            "https://user:pw@x.example",
            "https://x.example/?token=1",
        ] {
            let err = ServerClient::new(bad, SecretString::from("t"), HttpPolicy::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains("--server"), "{bad}: {err}");
            assert!(!err.contains("pw"), "{err}");
        }
        let err = ServerClient::new(
            "https://x.example",
            SecretString::from(" "),
            HttpPolicy::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("token is empty"));
        assert!(!format!("{:?}", client("https://x.example")).contains("t0ken"));
    }

    #[test]
    fn job_debug_hides_env_values() {
        let job: Job = serde_json::from_value(serde_json::json!({
            "job_key": "r/train/1", "run_id": "r", "label": "l", "attempt": 1,
            "dataset": {"name": "d", "version": "v1"}, "command": ["true"],
            "env": {"HF_TOKEN": "hf_s3cret"}, "timeout_secs": 60,
            "results_url": "/v1/runs/r/results", "logs_url": "/v1/runs/r/logs",
            "artifacts_url": "/v1/runs/r/artifacts"
        }))
        .unwrap();
        let shown = format!("{job:?}");
        assert!(
            shown.contains("HF_TOKEN") && !shown.contains("hf_s3cret"),
            "{shown}"
        );
    }
}
