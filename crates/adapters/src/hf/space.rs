//! A Hugging Face Space as the dataset-preparation job (seed 000's
//! `PREPARE_DATASET_REPO`): restart it, read its runtime stage.
//!
//! **Idempotence.** The Hub keeps no record of *why* a Space restarted, so
//! the prepare controller does not key its restarts: a resumed run whose
//! restart was sent but not journaled restarts the prepare Space once more
//! (a prepare job is restartable by design: it republishes the dataset).
//! What it never does is repeat a restart *blindly*: a restart request that
//! failed in a way that leaves its effect unknown (timeout, 5xx) is followed
//! by a runtime read, and a Space already (re)starting is not restarted again
//! ([`restart_space`]).

use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use reqwest::Method;
use retrain_core::domain::{JobKey, SpaceStage};
use retrain_core::ports::{PortError, SpaceController};
use secrecy::ExposeSecret;
use tracing::{debug, info, warn};
use url::Url;

use super::{excerpt, parse_space, HubClient, RepoId};
use crate::error::AdapterError;
use crate::http::{
    count_retry, is_retryable_status, retry_reason, server_requested_wait, HttpPolicy,
};

use super::HF_ADAPTER;

/// The fields of the Hub's SpaceRuntime JSON we use (§1.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Runtime {
    pub raw_stage: String,
    pub stage: SpaceStage,
    /// Set by the Hub on error stages (build log excerpt, crash reason).
    pub error_message: Option<String>,
}

impl Runtime {
    /// Validate a runtime body: `stage` must be a string; everything else is
    /// optional and ignored, since the Hub adds fields freely.
    pub(crate) fn parse(space: &RepoId, body: &[u8]) -> Result<Self, PortError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            PortError::InvalidResponse(format!("Space {space}: runtime response is not JSON: {e}"))
        })?;
        let raw_stage = match value.get("stage") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_owned(),
            Some(_) => {
                return Err(PortError::InvalidResponse(format!(
                    "Space {space}: runtime field `stage` is not a non-empty string"
                )))
            }
            None => {
                return Err(PortError::InvalidResponse(format!(
                    "Space {space}: runtime response has no field `stage`"
                )))
            }
        };
        let error_message = value
            .get("errorMessage")
            .and_then(|m| m.as_str())
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| excerpt(m, 500));
        Ok(Self {
            stage: SpaceStage::from_hub(&raw_stage),
            raw_stage,
            error_message,
        })
    }
}

pub(crate) fn restart_permission(space: &RepoId) -> String {
    format!(
        "the token needs write access (fine-grained: \"write\" on repos / space restart) to \
         Space {space}; only its owner or members of its organization with write access can restart it"
    )
}

/// Whether a runtime stage shows a (re)start under way: what a restart
/// leads to first (`BUILDING`, `RUNNING_BUILDING`, `APP_STARTING`,
/// `RUNNING_APP_STARTING`).
pub(crate) fn is_restarting(stage: &SpaceStage) -> bool {
    matches!(stage, SpaceStage::Building | SpaceStage::Starting)
}

/// One attempt of a request, without the client's retries: a restart must
/// not be repeated blindly.
async fn send_once(
    client: &HubClient,
    method: Method,
    url: &Url,
) -> Result<reqwest::Response, reqwest::Error> {
    let mut request = client.http.inner().request(method, url.clone());
    if let Some(token) = client.token.as_ref().filter(|_| client.is_endpoint(url)) {
        request = request.bearer_auth(token.expose_secret());
    }
    request.send().await
}

/// Capped exponential backoff with jitter in `[d/2, d]`, as the shared
/// client does.
fn backoff(policy: &HttpPolicy, attempt: u32) -> Duration {
    let exp = policy
        .base_backoff
        .saturating_mul(2u32.saturating_pow(attempt))
        .min(policy.max_backoff);
    let half = exp / 2;
    let spread = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
    half + Duration::from_millis(spread)
}

/// `POST /api/spaces/{id}/restart[?factory=true]`, never repeated blindly.
///
/// A failure that proves the Hub did not act (connection refused, 408, 429)
/// is retried with backoff. A failure after which the restart may have
/// happened anyway (timeout, dropped connection, 5xx) is followed by a read
/// of the runtime: a stage showing a (re)start under way ([`is_restarting`])
/// means it took effect, and it is not posted again; only a Space that shows
/// none is restarted again. If even the runtime cannot be read, the restart
/// fails (transiently) rather than risk a second one.
pub(crate) async fn restart_space(
    client: &HubClient,
    space: &RepoId,
    factory_reboot: bool,
) -> Result<(), PortError> {
    let mut url = client.url(&format!("/api/spaces/{space}/restart"))?;
    if factory_reboot {
        // Only when asked: a factory reboot rebuilds without any cache (§1.2).
        url.query_pairs_mut().append_pair("factory", "true");
    }
    let what = format!("restarting Space {space}");
    let policy = client.http.policy().clone();
    let mut attempt: u32 = 0;
    loop {
        let (failure, ambiguous, server_wait, reason) = match send_once(client, Method::POST, &url)
            .await
        {
            Ok(response) if response.status().is_success() => {
                // The body is the new runtime; it is informative only, so a
                // body we cannot parse does not turn a success into a failure.
                let body = response.bytes().await.unwrap_or_default();
                match Runtime::parse(space, &body) {
                    Ok(runtime) => {
                        debug!(space = %space, stage = %runtime.raw_stage, factory_reboot, "Space restarted")
                    }
                    Err(e) => {
                        debug!(space = %space, error = %e, "Space restarted; runtime body not understood")
                    }
                }
                return Ok(());
            }
            Ok(response) if response.status() == reqwest::StatusCode::BAD_REQUEST => {
                // The documented 400 of restart: a static Space has nothing to restart.
                let error = client
                    .error(&what, &restart_permission(space), response)
                    .await;
                return Err(PortError::Failed(format!(
                    "{} (static Spaces cannot be restarted; the prepare/retrain job must be a Gradio, Streamlit or Docker Space)",
                    error.message()
                )));
            }
            Ok(response) if !is_retryable_status(response.status()) => {
                return Err(client
                    .error(&what, &restart_permission(space), response)
                    .await);
            }
            Ok(response) => {
                let status = response.status();
                let wait = server_requested_wait(&response);
                let too_long = wait.is_some_and(|w| w > policy.max_server_wait);
                let error = client
                    .error(&what, &restart_permission(space), response)
                    .await;
                if attempt >= policy.max_retries || too_long {
                    return Err(error);
                }
                let failure = error
                    .message()
                    .trim_end_matches(" (gave up retrying)")
                    .to_owned();
                // 408/429: refused before acting. 5xx: it may have acted.
                let reason = retry_reason(status, status == reqwest::StatusCode::TOO_MANY_REQUESTS);
                (failure, status.is_server_error(), wait, reason)
            }
            Err(e) => {
                let (kind, reason) = if e.is_timeout() {
                    ("timed out", "timeout")
                } else if e.is_connect() {
                    ("connection failed", "connect")
                } else {
                    ("request failed", "transport")
                };
                if attempt >= policy.max_retries {
                    return Err(PortError::Transient(format!(
                        "{what}: {kind} (gave up after {} attempts)",
                        attempt + 1
                    )));
                }
                // A connection that never opened cannot have restarted anything.
                (format!("{what}: {kind}"), !e.is_connect(), None, reason)
            }
        };
        if ambiguous {
            match fetch_runtime(client, space).await {
                Ok(runtime) if is_restarting(&runtime.stage) => {
                    info!(
                        space = %space,
                        stage = %runtime.raw_stage,
                        failure = %failure,
                        "the restart request failed, but the Space is (re)starting: it took effect; not posting it again"
                    );
                    return Ok(());
                }
                Ok(runtime) => {
                    debug!(space = %space, stage = %runtime.raw_stage, "the restart did not take effect; posting it again")
                }
                Err(e) => {
                    return Err(client.scrub_error(PortError::Transient(format!(
                        "{failure}; whether the restart took effect cannot be told \
                         (reading the runtime failed: {}), so it is not posted again blindly",
                        e.message()
                    ))))
                }
            }
        }
        let delay = server_wait.unwrap_or_else(|| backoff(&policy, attempt));
        warn!(space = %space, failure = %failure, attempt = attempt + 1, delay_ms = delay.as_millis() as u64, "retrying the Space restart");
        count_retry(HF_ADAPTER, reason);
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

/// `GET /api/spaces/{id}/runtime`.
pub(crate) async fn fetch_runtime(
    client: &HubClient,
    space: &RepoId,
) -> Result<Runtime, PortError> {
    let url = client.url(&format!("/api/spaces/{space}/runtime"))?;
    let what = format!("reading the runtime of Space {space}");
    let response = client.send(&what, Method::GET, &url, None, false).await?;
    if !response.status().is_success() {
        let permission = format!(
            "the token needs read access to Space {space} (a private Space is invisible without it)"
        );
        return Err(client.error(&what, &permission, response).await);
    }
    let body = super::read_limited(&what, response, 1 << 20).await?;
    let runtime = Runtime::parse(space, &body).map_err(|e| client.scrub_error(e))?;
    if runtime.stage.is_error() {
        warn!(
            space = %space,
            stage = %runtime.raw_stage,
            error_message = runtime.error_message.as_deref().unwrap_or("(none)"),
            "Space is in an error stage"
        );
    }
    Ok(runtime)
}

/// A Space used as the prepare job.
#[derive(Debug, Clone)]
pub struct HfSpaceController {
    client: HubClient,
    space: RepoId,
    factory_reboot: bool,
}

impl HfSpaceController {
    /// `space`: `hf-space://owner/name`, `owner/name` or
    /// `https://huggingface.co/spaces/owner/name`. `factory_reboot` rebuilds
    /// the image without cache on every restart (slow; for stuck builds).
    pub fn new(client: HubClient, space: &str, factory_reboot: bool) -> Result<Self, AdapterError> {
        Ok(Self {
            client,
            space: parse_space(space)?,
            factory_reboot,
        })
    }

    pub fn space(&self) -> &RepoId {
        &self.space
    }
}

#[async_trait]
impl SpaceController for HfSpaceController {
    /// Safe in any state: the Hub restarts running, paused and errored Spaces
    /// alike (§1.2: "no matter the current state"). Not keyed by `intent`
    /// (see the module doc), but never re-posted blindly.
    async fn restart(&self, _intent: &JobKey) -> Result<(), PortError> {
        restart_space(&self.client, &self.space, self.factory_reboot).await
    }

    async fn stage(&self) -> Result<SpaceStage, PortError> {
        Ok(fetch_runtime(&self.client, &self.space).await?.stage)
    }

    fn describe(&self) -> String {
        format!("hf-space://{}", self.space)
    }
}
