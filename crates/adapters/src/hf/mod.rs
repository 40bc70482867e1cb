//! Hugging Face Hub adapters: a Space as the prepare job
//! ([`HfSpaceController`]), `dataset_metadata.json` in a dataset repo
//! ([`HfMetadataStore`]) and a retrain Space as the trainer
//! ([`HfSpaceTrainer`]).
//!
//! Every call goes through [`HubClient`], which owns the endpoint, the token
//! and the shared [`RetryingClient`] (timeouts, backoff, `Retry-After` and the
//! Hub's `RateLimit` header). Shapes follow `shared/reference/external-apis.md`
//! §1 (what `huggingface_hub` itself sends and reads).

mod metadata;
mod space;
mod trainer;

use std::fmt;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, Response, StatusCode};
use retrain_core::ports::PortError;
use secrecy::{ExposeSecret, SecretString};
use url::Url;

use crate::error::AdapterError;
use crate::http::{is_retryable_status, server_requested_wait, HttpPolicy, RetryingClient};

pub use metadata::HfMetadataStore;
pub use space::HfSpaceController;
pub use trainer::{HfSpaceTrainer, DATASET_VERSION_VARIABLE, HANDLE_KIND, JOB_KEY_VARIABLE};

/// `huggingface_hub`'s default endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The Hub adapters' name in [`crate::http::retries`].
pub(crate) const HF_ADAPTER: &str = "hf";

/// Python's `quote(s, safe="")`: everything but `A-Za-z0-9_.-~` is escaped.
pub(crate) const QUOTE_ALL: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'_')
    .remove(b'.')
    .remove(b'-')
    .remove(b'~');
/// Python's `quote(s)` (default `safe="/"`), used for file paths.
pub(crate) const QUOTE_PATH: &AsciiSet = &QUOTE_ALL.remove(b'/');

/// Where the Hub is and how to authenticate to it.
#[derive(Clone)]
pub struct HubSettings {
    /// `HF_ENDPOINT`; default `https://huggingface.co`.
    pub endpoint: Url,
    /// `HF_TOKEN`. Sent only to `endpoint`'s origin.
    pub token: Option<SecretString>,
    pub policy: HttpPolicy,
}

impl fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint.as_str())
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for HubSettings {
    fn default() -> Self {
        Self {
            // A constant that always parses; `expect` cannot fire on external data.
            endpoint: Url::parse(DEFAULT_ENDPOINT).expect("constant endpoint URL"),
            token: None,
            policy: HttpPolicy::default(),
        }
    }
}

impl HubSettings {
    /// Settings from `HF_ENDPOINT` and `HF_TOKEN` (empty values count as unset).
    pub fn from_env() -> Result<Self, AdapterError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`HubSettings::from_env`] with an injectable lookup (for tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, AdapterError> {
        let mut settings = Self::default();
        if let Some(endpoint) = lookup("HF_ENDPOINT").filter(|v| !v.trim().is_empty()) {
            settings.endpoint = parse_endpoint(endpoint.trim())?;
        }
        settings.token = lookup("HF_TOKEN")
            .map(|t| t.trim().to_owned())
            .filter(|t| !t.is_empty())
            .map(SecretString::from);
        Ok(settings)
    }
}

/// Validate an endpoint: http(s), a host, no credentials, no query.
pub fn parse_endpoint(raw: &str) -> Result<Url, AdapterError> {
    let url = Url::parse(raw)
        .map_err(|e| AdapterError::config("hub.endpoint", format!("{raw:?} is not a URL: {e}")))?;
    check_endpoint(&url)?;
    Ok(url)
}

fn check_endpoint(url: &Url) -> Result<(), AdapterError> {
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(AdapterError::config(
            "hub.endpoint",
            "expected an http(s) URL with a host, e.g. https://huggingface.co",
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(AdapterError::config(
            "hub.endpoint",
            "must not contain credentials; set HF_TOKEN instead",
        ));
    }
    if url.query().is_some() {
        return Err(AdapterError::config(
            "hub.endpoint",
            "must not contain a query string",
        ));
    }
    Ok(())
}

/// The authenticated Hub client shared by the three adapters. Cheap to clone.
#[derive(Clone)]
pub struct HubClient {
    /// Endpoint without a trailing slash (it may carry a path prefix, as a
    /// mirror would); API paths are appended to it like `huggingface_hub` does.
    base: String,
    endpoint: Url,
    token: Option<SecretString>,
    http: RetryingClient,
    /// Same policy, but follows only same-origin redirects: the metadata
    /// probe must read the Hub's own headers, not the CDN's (§1.3).
    probe: RetryingClient,
}

impl fmt::Debug for HubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.base)
            .field("authenticated", &self.token.is_some())
            .finish()
    }
}

impl HubClient {
    pub fn new(settings: HubSettings) -> Result<Self, AdapterError> {
        check_endpoint(&settings.endpoint)?;
        let http = RetryingClient::new(HF_ADAPTER, settings.policy.clone())?;
        let same_origin_only = reqwest::redirect::Policy::custom(|attempt| {
            let follow = attempt
                .previous()
                .last()
                .is_some_and(|prev| prev.origin() == attempt.url().origin());
            if follow && attempt.previous().len() < 5 {
                attempt.follow()
            } else {
                attempt.stop()
            }
        });
        let probe =
            RetryingClient::with_redirect_policy(HF_ADAPTER, settings.policy, same_origin_only)?;
        Ok(Self {
            base: settings.endpoint.as_str().trim_end_matches('/').to_owned(),
            endpoint: settings.endpoint,
            token: settings.token,
            http,
            probe,
        })
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `endpoint + path` (path starts with `/`).
    pub(crate) fn url(&self, path: &str) -> Result<Url, PortError> {
        let raw = format!("{}{path}", self.base);
        Url::parse(&raw).map_err(|e| PortError::Config(format!("invalid Hub URL {raw}: {e}")))
    }

    /// Whether `url` is on the configured endpoint's origin: the only place
    /// the token may go (a full metadata URL may point anywhere).
    pub(crate) fn is_endpoint(&self, url: &Url) -> bool {
        url.origin() == self.endpoint.origin()
    }

    /// Send one request with retries. `probe` selects the client that does
    /// not follow redirects to other origins. `body` is sent as JSON.
    pub(crate) async fn send(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&serde_json::Value>,
        probe: bool,
    ) -> Result<Response, PortError> {
        self.send_with_header(what, method, url, body, probe, None)
            .await
    }

    /// [`HubClient::send`] with one more request header (e.g. `If-None-Match`).
    pub(crate) async fn send_with_header(
        &self,
        what: &str,
        method: Method,
        url: &Url,
        body: Option<&serde_json::Value>,
        probe: bool,
        extra: Option<(reqwest::header::HeaderName, &reqwest::header::HeaderValue)>,
    ) -> Result<Response, PortError> {
        let client = if probe { &self.probe } else { &self.http };
        let token = self
            .token
            .as_ref()
            .filter(|_| self.is_endpoint(url))
            .map(|t| t.expose_secret().to_owned());
        let result = client
            .send(what, |c| {
                let mut request = c.request(method.clone(), url.clone());
                if probe {
                    // As `get_hf_file_metadata`: sizes/ETags of the raw file.
                    request = request.header(reqwest::header::ACCEPT_ENCODING, "identity");
                }
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                if let Some((name, value)) = &extra {
                    request = request.header(name.clone(), (*value).clone());
                }
                if let Some(body) = body {
                    request = request.json(body);
                }
                request
            })
            .await;
        result.map_err(|e| self.scrub_error(e))
    }

    /// Defence in depth: no message leaves this module with the token in it,
    /// even if a server or proxy were to echo it back.
    pub(crate) fn scrub(&self, message: String) -> String {
        match &self.token {
            Some(token) if !token.expose_secret().is_empty() => {
                message.replace(token.expose_secret(), "***")
            }
            _ => message,
        }
    }

    pub(crate) fn scrub_error(&self, error: PortError) -> PortError {
        match error {
            PortError::Transient(m) => PortError::Transient(self.scrub(m)),
            PortError::Denied(m) => PortError::Denied(self.scrub(m)),
            PortError::NotFound(m) => PortError::NotFound(self.scrub(m)),
            PortError::InvalidResponse(m) => PortError::InvalidResponse(self.scrub(m)),
            PortError::Config(m) => PortError::Config(self.scrub(m)),
            PortError::Failed(m) => PortError::Failed(self.scrub(m)),
        }
    }

    /// Map a non-success Hub response to a [`PortError`] naming `what` (e.g.
    /// "Space owner/name"); `permission` says which access is likely missing.
    pub(crate) async fn error(
        &self,
        what: &str,
        permission: &str,
        response: Response,
    ) -> PortError {
        let status = response.status();
        let failure = HubFailure::read(response).await;
        let detail = failure.detail();
        let no_token = if self.token.is_none() {
            " (no HF_TOKEN is configured)"
        } else {
            ""
        };
        let error = match status {
            StatusCode::UNAUTHORIZED => PortError::Denied(format!(
                "{what}: HTTP 401{detail}: the Hub refused the request{no_token}; {permission}. \
                 A private repo also answers 401 when the token cannot read it"
            )),
            StatusCode::FORBIDDEN if failure.code.as_deref() == Some("GatedRepo") => {
                PortError::Denied(format!(
                    "{what}: HTTP 403{detail}: the repo is gated; accept its access conditions \
                     on the Hub with the token's account"
                ))
            }
            StatusCode::FORBIDDEN => PortError::Denied(format!(
                "{what}: HTTP 403{detail}: access denied{no_token}; {permission}"
            )),
            StatusCode::NOT_FOUND if failure.code.as_deref() == Some("RevisionNotFound") => {
                PortError::NotFound(format!(
                    "{what}: HTTP 404{detail}: the revision does not exist"
                ))
            }
            StatusCode::NOT_FOUND => PortError::NotFound(format!(
                "{what}: HTTP 404{detail}: not found; check the name, and if the repo is \
                 private, that the token{no_token} has read access to it"
            )),
            StatusCode::TOO_MANY_REQUESTS => {
                let reset = failure
                    .wait
                    .map(|w| format!("; the quota resets in {}s", w.as_secs()))
                    .unwrap_or_default();
                PortError::Transient(format!(
                    "{what}: HTTP 429{detail}: rate limited by the Hub{reset} (gave up retrying)"
                ))
            }
            s if is_retryable_status(s) => {
                PortError::Transient(format!("{what}: HTTP {status}{detail} (gave up retrying)"))
            }
            _ => PortError::Failed(format!("{what}: HTTP {status}{detail}")),
        };
        self.scrub_error(error)
    }
}

/// The error details the Hub sends with a failure (§1.1).
#[derive(Debug, Default)]
pub(crate) struct HubFailure {
    pub code: Option<String>,
    pub message: Option<String>,
    pub wait: Option<std::time::Duration>,
}

impl HubFailure {
    pub(crate) fn from_headers(response: &Response) -> Self {
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Self {
            code: header("x-error-code"),
            message: header("x-error-message"),
            wait: server_requested_wait(response),
        }
    }

    async fn read(response: Response) -> Self {
        let mut failure = Self::from_headers(&response);
        if failure.message.is_none() {
            // The Hub's JSON error bodies look like {"error": "..."}.
            let body = response.text().await.unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or(body);
            let message = message.trim();
            if !message.is_empty() {
                failure.message = Some(excerpt(message, 300));
            }
        }
        failure
    }

    fn detail(&self) -> String {
        let mut out = String::new();
        if let Some(code) = &self.code {
            out.push_str(&format!(" [{code}]"));
        }
        if let Some(message) = &self.message {
            out.push_str(&format!(" \"{}\"", excerpt(message, 300)));
        }
        out
    }
}

pub(crate) fn excerpt(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}

/// A Hub repository id `owner/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RepoId {
    owner: String,
    name: String,
}

impl RepoId {
    /// Parse `owner/name`, checking the characters the Hub allows
    /// (`A-Za-z0-9`, `-`, `_`, `.`) so the id is safe in URL paths.
    pub fn parse(raw: &str) -> Option<Self> {
        let (owner, name) = raw.split_once('/')?;
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 96
                && part != "."
                && part != ".."
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (valid(owner) && valid(name)).then(|| Self {
            owner: owner.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn owner(&self) -> &str {
        &self.owner
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// Parse a Space address: `hf-space://owner/name`, `owner/name` (the seed's
/// `PREPARE_DATASET_REPO` / `RETRAIN_<LABEL>_REPO`), `spaces/owner/name` or
/// `https://huggingface.co/spaces/owner/name` (any host; the API calls go to
/// the configured endpoint).
pub fn parse_space(raw: &str) -> Result<RepoId, AdapterError> {
    let trimmed = raw.trim();
    let bad = || {
        AdapterError::config(
            "space",
            format!(
                "{trimmed:?} is not a Space address; expected hf-space://owner/name, owner/name \
                 or https://huggingface.co/spaces/owner/name"
            ),
        )
    };
    let id = if let Some(rest) = trimmed.strip_prefix("hf-space://") {
        rest.trim_end_matches('/').to_owned()
    } else if trimmed.starts_with("https://") || trimmed.starts_with("http://") {
        let url = Url::parse(trimmed).map_err(|_| bad())?;
        let segments: Vec<&str> = url
            .path_segments()
            .map(|s| s.filter(|p| !p.is_empty()).collect())
            .unwrap_or_default();
        match segments.iter().position(|s| *s == "spaces") {
            Some(i) if segments.len() == i + 3 => {
                format!("{}/{}", segments[i + 1], segments[i + 2])
            }
            _ => return Err(bad()),
        }
    } else {
        let rest = trimmed.strip_prefix("spaces/").unwrap_or(trimmed);
        rest.trim_end_matches('/').to_owned()
    };
    RepoId::parse(&id).ok_or_else(bad)
}

/// Read at most `limit` bytes of a response body: metadata files are small,
/// and a misconfigured URL must not make us buffer a multi-GB file.
pub(crate) async fn read_limited(
    what: &str,
    response: Response,
    limit: usize,
) -> Result<Vec<u8>, PortError> {
    crate::http::read_limited(what, response, limit)
        .await
        .map_err(|e| match e {
            PortError::InvalidResponse(m) => {
                PortError::InvalidResponse(format!("{m}; is this the metadata file?"))
            }
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn space_addresses() {
        for raw in [
            "hf-space://owner/name",
            "owner/name",
            "spaces/owner/name",
            "https://huggingface.co/spaces/owner/name",
            "https://huggingface.co/spaces/owner/name/",
            " owner/name ",
        ] {
            assert_eq!(parse_space(raw).unwrap().to_string(), "owner/name", "{raw}");
        }
        for raw in [
            "",
            "owner",
            "owner/name/extra",
            "hf-space://owner",
            "https://huggingface.co/owner/name",
            "owner/na me",
            "../x",
            "owner/..",
        ] {
            assert!(parse_space(raw).is_err(), "{raw} should be rejected");
        }
    }

    #[test]
    fn quoting_matches_python() {
        use percent_encoding::utf8_percent_encode as enc;
        assert_eq!(enc("refs/pr/1", QUOTE_ALL).to_string(), "refs%2Fpr%2F1");
        assert_eq!(
            enc("a b/c~d.json", QUOTE_PATH).to_string(),
            "a%20b/c~d.json"
        );
    }

    #[test]
    fn settings_from_env_and_debug_hides_the_token() {
        let settings = HubSettings::from_lookup(|k| match k {
            "HF_ENDPOINT" => Some("https://hub-ci.huggingface.co/".into()),
            "HF_TOKEN" => Some("hf_secret_value".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(settings.endpoint.host_str(), Some("hub-ci.huggingface.co"));
        assert!(!format!("{settings:?}").contains("hf_secret_value"));
        let client = HubClient::new(settings).unwrap();
        assert!(!format!("{client:?}").contains("hf_secret_value"));
        assert_eq!(
            client.url("/api/spaces/a/b/runtime").unwrap().as_str(),
            "https://hub-ci.huggingface.co/api/spaces/a/b/runtime"
        );
        assert!(HubSettings::from_lookup(|_| Some("ftp://x".into())).is_err());
        let empty = HubSettings::from_lookup(|_| Some(String::new())).unwrap();
        assert!(empty.token.is_none());
        assert_eq!(empty.endpoint.as_str(), "https://huggingface.co/");
    }
}
