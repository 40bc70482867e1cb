//! A Hugging Face Space as the dataset-preparation job (seed 000's
//! `PREPARE_DATASET_REPO`): restart it, read its runtime stage.

use async_trait::async_trait;
use reqwest::Method;
use retrain_core::domain::{JobKey, SpaceStage};
use retrain_core::ports::{PortError, SpaceController};
use tracing::{debug, warn};

use super::{excerpt, parse_space, HubClient, RepoId};
use crate::error::AdapterError;

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

/// `POST /api/spaces/{id}/restart[?factory=true]`.
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
    let response = client.send(&what, Method::POST, &url, None, false).await?;
    if response.status() == reqwest::StatusCode::BAD_REQUEST {
        // The documented 400 of restart: a static Space has nothing to restart.
        let error = client
            .error(&what, &restart_permission(space), response)
            .await;
        return Err(PortError::Failed(format!(
            "{} (static Spaces cannot be restarted; the prepare/retrain job must be a Gradio, Streamlit or Docker Space)",
            error.message()
        )));
    }
    if !response.status().is_success() {
        return Err(client
            .error(&what, &restart_permission(space), response)
            .await);
    }
    // The body is the new runtime; it is informative only, so a body we
    // cannot parse does not turn a successful restart into a failure.
    let body = response.bytes().await.unwrap_or_default();
    match Runtime::parse(space, &body) {
        Ok(runtime) => {
            debug!(space = %space, stage = %runtime.raw_stage, factory_reboot, "Space restarted")
        }
        Err(e) => {
            debug!(space = %space, error = %e, "Space restarted; runtime body not understood")
        }
    }
    Ok(())
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
    /// alike (§1.2: "no matter the current state").
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
