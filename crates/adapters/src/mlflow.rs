//! MLflow model registry (`ModelRegistry`) over the REST API 2.0.
//!
//! Aliases are the default (MLflow deprecated stages); legacy stages are
//! available with [`RegistryMode::Stage`]. Quirks handled here, all verified
//! against `mlflow server` 3.17 (shared/reference §2):
//! - empty results are `{}` (every collection is `#[serde(default)]`);
//! - a missing model is 404 `RESOURCE_DOES_NOT_EXIST`, an unset alias is
//!   400 `INVALID_PARAMETER_VALUE "... alias ... not found"`: both mean "no
//!   production model yet";
//! - metric values are JSON numbers, or the strings `"NaN"`/`"Infinity"`.
//!
//! Promotion is idempotent per retrain run id: the model version carries the
//! tag `retrain_run_id`, found again with `model-versions/search`, and the
//! steps after the version's creation are re-done only if the version lacks
//! the `retrain.promoted` tag (set last).
//!
//! A rollback (`retrain rollback`) moves the alias back to an existing
//! version (stages: transitions it to `Production`, archiving the current
//! one) and tags the version it replaces `retrain.rolled_back_by`,
//! `retrain.rolled_back_reason` and `retrain.rolled_back_run_id`. It is
//! idempotent per rollback run id through tags on the restored version:
//! `retrain.restored_by_run_id` + `retrain.restored_from` before production
//! moves, `retrain.restored` = the run id last.
//!
//! A candidate is a run id or, in MLflow 3, a LoggedModel id (`m-…`, what
//! `mlflow.<flavor>.log_model` returns): it is registered with
//! `source = models:/m-…` and `model_id`, and its metrics are the logged
//! model's (`logged-models/{id}`, `model.data.metrics`), else its source
//! run's. Production moves only once the new version is `READY`
//! (`PENDING_REGISTRATION` is waited for, bounded by [`ReadyWait`];
//! `FAILED_REGISTRATION` fails the promotion with MLflow's message).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use retrain_core::domain::{Candidate, Lease, Metrics, ProductionModel, PromotedVersion, RunId};
use retrain_core::ports::{ModelRegistry, PortError, RegistryRollback};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{debug, info};

use crate::error::AdapterError;
use crate::http::{is_retryable_status, HttpPolicy, RetryingClient};

/// Tag on a model version: the retrain run that created it (idempotency key).
pub const TAG_RUN_ID: &str = "retrain_run_id";
/// Tag on a model version: the production version it replaced.
pub const TAG_PREVIOUS: &str = "retrain.previous_version";
/// Tag on a model version: promotion finished (alias/stage moved).
pub const TAG_PROMOTED: &str = "retrain.promoted";
/// Tag on the replaced version (alias mode; stage mode archives it instead).
pub const TAG_ARCHIVED: &str = "retrain.archived";
/// Tag on the version a rollback moved away from: who rolled it back.
pub const TAG_ROLLED_BACK_BY: &str = "retrain.rolled_back_by";
/// Tag on the version a rollback moved away from: why.
pub const TAG_ROLLED_BACK_REASON: &str = "retrain.rolled_back_reason";
/// Tag on the version a rollback moved away from: the rollback run.
pub const TAG_ROLLED_BACK_RUN_ID: &str = "retrain.rolled_back_run_id";
/// Tag on a restored version: the rollback run restoring it (set, with
/// [`TAG_RESTORED_FROM`], before production moves).
pub const TAG_RESTORED_BY_RUN: &str = "retrain.restored_by_run_id";
/// Tag on a restored version: the version it replaced (`none` if none).
pub const TAG_RESTORED_FROM: &str = "retrain.restored_from";
/// Tag on a restored version: the rollback run that finished (set last).
pub const TAG_RESTORED: &str = "retrain.restored";
/// MLflow's limit on a model version tag value is 5000 characters.
const MAX_TAG_VALUE: usize = 5000;
/// Artifact path of the model inside the candidate's run (`runs:/<id>/model`).
pub const MODEL_ARTIFACT_PATH: &str = "model";

/// How "production" is represented in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RegistryMode {
    /// A registered-model alias (default `production`).
    #[default]
    Alias,
    /// The deprecated `Production` stage (`transition-stage`).
    Stage,
}

/// Credentials for an MLflow server behind auth.
#[derive(Clone, Default)]
pub enum MlflowAuth {
    #[default]
    None,
    /// `MLFLOW_TRACKING_TOKEN`: `Authorization: Bearer …`.
    Token(SecretString),
    /// `MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD`: HTTP basic.
    Basic {
        user: String,
        password: SecretString,
    },
}

impl fmt::Debug for MlflowAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token(_) => f.write_str("Token(***)"),
            Self::Basic { user, .. } => write!(f, "Basic {{ user: {user:?}, password: *** }}"),
        }
    }
}

impl MlflowAuth {
    /// The MLflow client's env names: `MLFLOW_TRACKING_TOKEN` wins over
    /// `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());
        if let Some(token) = get("MLFLOW_TRACKING_TOKEN") {
            return Self::Token(SecretString::from(token));
        }
        match (
            get("MLFLOW_TRACKING_USERNAME"),
            get("MLFLOW_TRACKING_PASSWORD"),
        ) {
            (Some(user), Some(password)) => Self::Basic {
                user,
                password: SecretString::from(password),
            },
            _ => Self::None,
        }
    }
}

/// Configuration of one label's MLflow registry binding.
#[derive(Clone)]
pub struct MlflowSettings {
    /// `http://host:5000`; may contain `{public_ip}` (and `{private_ip}`),
    /// filled from the lease attributes when the server runs on the leased host.
    pub tracking_uri: String,
    /// Registered model name.
    pub model: String,
    /// Alias that marks production (alias mode); default `production`.
    pub alias: String,
    pub mode: RegistryMode,
    pub auth: MlflowAuth,
    pub policy: HttpPolicy,
}

impl fmt::Debug for MlflowSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MlflowSettings")
            .field("tracking_uri", &display_uri(&self.tracking_uri))
            .field("model", &self.model)
            .field("alias", &self.alias)
            .field("mode", &self.mode)
            .field("auth", &self.auth)
            .field("policy", &self.policy)
            .finish()
    }
}

impl MlflowSettings {
    pub fn new(tracking_uri: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            tracking_uri: tracking_uri.into(),
            model: model.into(),
            alias: "production".into(),
            mode: RegistryMode::Alias,
            auth: MlflowAuth::None,
            policy: HttpPolicy::default(),
        }
    }
}

/// How long a promotion waits for a new model version to leave
/// `PENDING_REGISTRATION` (MLflow's own client polls the same way).
#[derive(Debug, Clone)]
pub struct ReadyWait {
    /// Give up (`Transient`) when the version is not `READY` by then.
    pub timeout: Duration,
    /// First pause between `model-versions/get` polls (doubles).
    pub poll_interval: Duration,
    /// Cap of the poll interval.
    pub max_poll_interval: Duration,
}

impl Default for ReadyWait {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(500),
            max_poll_interval: Duration::from_secs(5),
        }
    }
}

/// What a candidate id names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CandidateRef {
    /// A tracking run (`runs:/<id>/model`).
    Run(String),
    /// An MLflow 3 LoggedModel (`models:/m-…`).
    LoggedModel(String),
}

impl CandidateRef {
    /// `m-<alphanumerics>` (optionally as a `models:/m-…` URI) is a
    /// LoggedModel id (the SQL store makes `"m-" + uuid4 hex`); anything else
    /// is a run id (32 hex characters, no prefix).
    fn parse(id: &str) -> Self {
        let trimmed = id.trim();
        let bare = trimmed.strip_prefix("models:/").unwrap_or(trimmed);
        match bare.strip_prefix("m-") {
            Some(rest) if !rest.is_empty() && rest.chars().all(|c| c.is_ascii_alphanumeric()) => {
                Self::LoggedModel(bare.to_owned())
            }
            _ => Self::Run(trimmed.to_owned()),
        }
    }

    fn id(&self) -> &str {
        match self {
            Self::Run(id) | Self::LoggedModel(id) => id,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Run(id) => format!("run `{id}`"),
            Self::LoggedModel(id) => format!("logged model `{id}`"),
        }
    }
}

/// `ModelRegistry` backed by an MLflow tracking server.
#[derive(Debug, Clone)]
pub struct MlflowRegistry {
    settings: MlflowSettings,
    ready_wait: ReadyWait,
    http: RetryingClient,
    /// Same policy without retries: used for creating a model version, which
    /// is not idempotent; we retry it ourselves after checking it did not land.
    http_once: RetryingClient,
}

/// An MLflow error answer: `{"error_code", "message"}` with its status.
#[derive(Debug, Clone)]
struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ApiError {
    fn is(&self, code: &str) -> bool {
        self.code == code
    }
}

#[derive(Debug, Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    error_code: String,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct Tag {
    key: String,
    #[serde(default)]
    value: String,
}

#[derive(Debug, Clone, Deserialize)]
struct ModelVersion {
    version: String,
    #[serde(default)]
    run_id: String,
    #[serde(default)]
    source: String,
    /// The LoggedModel the version was registered from (MLflow 3; the 3.17
    /// server does not echo it, `source` = `models:/m-…` tells instead).
    #[serde(default)]
    model_id: String,
    /// `PENDING_REGISTRATION` | `FAILED_REGISTRATION` | `READY`.
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    status_message: String,
    #[serde(default)]
    tags: Vec<Tag>,
}

/// `ModelVersionStatus`, open for values a newer server may add.
#[derive(Debug, Clone, PartialEq, Eq)]
enum VersionStatus {
    Pending,
    Failed,
    Ready,
    Unknown(String),
}

impl ModelVersion {
    fn status(&self) -> VersionStatus {
        match self.status.as_deref() {
            // No status at all: a server without background registration.
            None | Some("") | Some("READY") => VersionStatus::Ready,
            Some("PENDING_REGISTRATION") => VersionStatus::Pending,
            Some("FAILED_REGISTRATION") => VersionStatus::Failed,
            Some(other) => VersionStatus::Unknown(other.to_owned()),
        }
    }

    /// The LoggedModel behind the version, if it was registered from one.
    fn logged_model(&self) -> Option<String> {
        if let CandidateRef::LoggedModel(id) = CandidateRef::parse(&self.model_id) {
            return Some(id);
        }
        match CandidateRef::parse(&self.source) {
            CandidateRef::LoggedModel(id) if self.source.starts_with("models:/") => Some(id),
            _ => None,
        }
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|t| t.key == key)
            .map(|t| t.value.as_str())
    }
}

#[derive(Debug, Deserialize)]
struct ModelVersionResponse {
    #[serde(default)]
    model_version: Option<ModelVersion>,
}

#[derive(Debug, Deserialize)]
struct ModelVersionsResponse {
    #[serde(default)]
    model_versions: Vec<ModelVersion>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LoggedModelResponse {
    model: LoggedModel,
}

#[derive(Debug, Default, Deserialize)]
struct LoggedModel {
    #[serde(default)]
    info: LoggedModelInfo,
    #[serde(default)]
    data: RunData,
}

#[derive(Debug, Default, Deserialize)]
struct LoggedModelInfo {
    #[serde(default)]
    source_run_id: String,
    /// `LOGGED_MODEL_PENDING` | `LOGGED_MODEL_READY` | `LOGGED_MODEL_UPLOAD_FAILED`.
    #[serde(default)]
    status: String,
    #[serde(default)]
    status_message: String,
}

#[derive(Debug, Deserialize)]
struct RunResponse {
    run: Run,
}

#[derive(Debug, Deserialize)]
struct Run {
    #[serde(default)]
    data: RunData,
}

#[derive(Debug, Default, Deserialize)]
struct RunData {
    #[serde(default)]
    metrics: Vec<Metric>,
}

#[derive(Debug, Deserialize)]
struct Metric {
    key: String,
    /// A number, or `"NaN"`/`"Infinity"`/`"-Infinity"` (protobuf JSON).
    value: Value,
    #[serde(default)]
    timestamp: i64,
    #[serde(default)]
    step: i64,
}

fn metric_value(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "NaN" => Some(f64::NAN),
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            other => other.parse().ok(),
        },
        _ => None,
    }
}

/// Latest value per key (`data.metrics` already holds the latest, but keep
/// the highest (step, timestamp) should a server list a key twice).
fn latest_metrics(metrics: &[Metric], what: &str) -> Result<Metrics, PortError> {
    let mut latest: BTreeMap<&str, (i64, i64, f64)> = BTreeMap::new();
    for m in metrics {
        let value = metric_value(&m.value).ok_or_else(|| {
            PortError::InvalidResponse(format!(
                "{what}: metric `{}` has a non-numeric value {}",
                m.key, m.value
            ))
        })?;
        let entry = latest.entry(&m.key).or_insert((m.step, m.timestamp, value));
        if (m.step, m.timestamp) > (entry.0, entry.1) {
            *entry = (m.step, m.timestamp, value);
        }
    }
    Ok(latest
        .into_iter()
        .map(|(k, (_, _, v))| (k.to_owned(), v))
        .collect())
}

fn version_number(v: &ModelVersion) -> u64 {
    v.version.parse().unwrap_or(0)
}

impl MlflowRegistry {
    pub fn new(settings: MlflowSettings) -> Result<Self, AdapterError> {
        if settings.model.trim().is_empty() {
            return Err(AdapterError::config("registry.model", "must not be empty"));
        }
        if settings.model.contains('\'') {
            // The idempotency lookup quotes the name in a search filter.
            return Err(AdapterError::config(
                "registry.model",
                format!("`{}` must not contain a single quote", settings.model),
            ));
        }
        if settings.mode == RegistryMode::Alias && settings.alias.trim().is_empty() {
            return Err(AdapterError::config("registry.alias", "must not be empty"));
        }
        if settings.mode == RegistryMode::Alias {
            // MLflow reserves these; fail at build time rather than at promotion.
            let alias = settings.alias.to_ascii_lowercase();
            let versionish = alias.len() > 1
                && alias.starts_with('v')
                && alias[1..].chars().all(|c| c.is_ascii_digit());
            if alias == "latest" || versionish {
                return Err(AdapterError::config(
                    "registry.alias",
                    format!("`{}` is reserved by MLflow", settings.alias),
                ));
            }
        }
        if !settings.tracking_uri.starts_with("http://")
            && !settings.tracking_uri.starts_with("https://")
        {
            return Err(AdapterError::config(
                "registry.mlflow",
                format!(
                    "tracking URI must be http(s)://…, got `{}`",
                    display_uri(&settings.tracking_uri)
                ),
            ));
        }
        let http = RetryingClient::new("mlflow", settings.policy.clone())?;
        let http_once = RetryingClient::new(
            "mlflow",
            HttpPolicy {
                max_retries: 0,
                ..settings.policy.clone()
            },
        )?;
        Ok(Self {
            settings,
            ready_wait: ReadyWait::default(),
            http,
            http_once,
        })
    }

    /// Override how long a promotion waits for a new version to be `READY`.
    pub fn with_ready_wait(mut self, ready_wait: ReadyWait) -> Self {
        self.ready_wait = ready_wait;
        self
    }

    pub fn settings(&self) -> &MlflowSettings {
        &self.settings
    }

    fn model(&self) -> &str {
        &self.settings.model
    }

    /// The version number when `candidate_id` is `models:/<this model>/<N>`
    /// (a version already registered, as MLflow webhooks announce them).
    fn registered_version<'c>(&self, candidate_id: &'c str) -> Option<&'c str> {
        let (name, number) = candidate_id
            .trim()
            .strip_prefix("models:/")?
            .rsplit_once('/')?;
        (name == self.model() && !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()))
            .then_some(number)
    }

    /// Base API URL, with `{public_ip}`/`{private_ip}` filled from the lease.
    fn api_base(&self, lease: Option<&Lease>) -> Result<String, PortError> {
        let mut uri = self.settings.tracking_uri.clone();
        for key in ["public_ip", "private_ip"] {
            let placeholder = format!("{{{key}}}");
            if uri.contains(&placeholder) {
                let value = lease
                    .and_then(|l| l.attributes.get(key))
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        PortError::Config(format!(
                            "MLflow tracking URI {} needs `{key}` from an active lease, but there is none (is `lease` configured for this label?)",
                            display_uri(&self.settings.tracking_uri)
                        ))
                    })?;
                uri = uri.replace(&placeholder, value);
            }
        }
        Ok(format!("{}/api/2.0/mlflow", uri.trim_end_matches('/')))
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.settings.auth {
            MlflowAuth::None => request,
            MlflowAuth::Token(token) => request.bearer_auth(token.expose_secret()),
            MlflowAuth::Basic { user, password } => {
                request.basic_auth(user, Some(password.expose_secret()))
            }
        }
    }

    /// One REST call. `Ok(Err(api))` is an MLflow error answer the caller may
    /// interpret (not found, already exists); transport failures, 401/403 and
    /// unparseable answers are `Err`.
    async fn call<T: DeserializeOwned>(
        &self,
        base: &str,
        method: Method,
        path: &str,
        params: Value,
        what: &str,
        once: bool,
    ) -> Result<Result<T, ApiError>, PortError> {
        let url = format!("{base}/{path}");
        let client = if once { &self.http_once } else { &self.http };
        let response = client
            .send(what, |c| {
                let request = c.request(method.clone(), &url);
                // GET sends the message as query params, everything else as a
                // JSON body (MLflow rejects DELETE with query params).
                let request = if method == Method::GET {
                    let pairs: Vec<(String, String)> = params
                        .as_object()
                        .map(|o| {
                            o.iter()
                                .map(|(k, v)| {
                                    let v = match v {
                                        Value::String(s) => s.clone(),
                                        other => other.to_string(),
                                    };
                                    (k.clone(), v)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    request.query(&pairs)
                } else {
                    request.json(&params)
                };
                self.authorize(request)
            })
            .await?;
        let status = response.status();
        let body = response.text().await.map_err(|e| {
            PortError::Transient(format!("{what}: reading the MLflow response failed: {e}"))
        })?;
        if status.is_success() {
            let text = if body.trim().is_empty() {
                "{}"
            } else {
                body.as_str()
            };
            return serde_json::from_str(text).map(Ok).map_err(|e| {
                PortError::InvalidResponse(format!(
                    "{what}: unexpected MLflow response ({e}): {}",
                    excerpt(&body)
                ))
            });
        }
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(PortError::Denied(format!(
                "{what}: HTTP {status}: MLflow refused access (check MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD)"
            )));
        }
        match serde_json::from_str::<ApiErrorBody>(&body) {
            Ok(err) if !err.error_code.is_empty() => Ok(Err(ApiError {
                status,
                code: err.error_code,
                message: err.message,
            })),
            _ if is_retryable_status(status) => Err(PortError::Transient(format!(
                "{what}: HTTP {status} after retries: {}",
                excerpt(&body)
            ))),
            _ => Err(PortError::Failed(format!(
                "{what}: HTTP {status}: {}",
                excerpt(&body)
            ))),
        }
    }

    fn unexpected(what: &str, err: ApiError) -> PortError {
        let text = format!("{what}: HTTP {} {}: {}", err.status, err.code, err.message);
        if err.is("RESOURCE_DOES_NOT_EXIST") {
            PortError::NotFound(text)
        } else if is_retryable_status(err.status) {
            PortError::Transient(text)
        } else {
            PortError::Failed(text)
        }
    }

    /// The version currently in production, `None` when there is none.
    async fn current_production(&self, base: &str) -> Result<Option<ModelVersion>, PortError> {
        let model = self.model();
        match self.settings.mode {
            RegistryMode::Alias => {
                let alias = &self.settings.alias;
                let what = format!("MLflow model `{model}` alias `{alias}`");
                let answer: Result<ModelVersionResponse, ApiError> = self
                    .call(
                        base,
                        Method::GET,
                        "registered-models/alias",
                        json!({"name": model, "alias": alias}),
                        &what,
                        false,
                    )
                    .await?;
                match answer {
                    Ok(r) => Ok(r.model_version),
                    // No such model yet: first model.
                    Err(e) if e.is("RESOURCE_DOES_NOT_EXIST") => Ok(None),
                    // The model exists but the alias is unset: 400, not 404.
                    Err(e)
                        if e.is("INVALID_PARAMETER_VALUE")
                            && e.message.to_ascii_lowercase().contains("alias")
                            && e.message.to_ascii_lowercase().contains("not found") =>
                    {
                        Ok(None)
                    }
                    Err(e) => Err(Self::unexpected(&what, e)),
                }
            }
            RegistryMode::Stage => {
                let what = format!("MLflow model `{model}` stage Production");
                let answer: Result<ModelVersionsResponse, ApiError> = self
                    .call(
                        base,
                        Method::POST,
                        "registered-models/get-latest-versions",
                        json!({"name": model, "stages": ["Production"]}),
                        &what,
                        false,
                    )
                    .await?;
                match answer {
                    Ok(r) => Ok(r.model_versions.into_iter().max_by_key(version_number)),
                    Err(e) if e.is("RESOURCE_DOES_NOT_EXIST") => Ok(None),
                    Err(e) => Err(Self::unexpected(&what, e)),
                }
            }
        }
    }

    async fn run_metrics(
        &self,
        base: &str,
        run_id: &str,
        what: &str,
    ) -> Result<Metrics, PortError> {
        let answer: Result<RunResponse, ApiError> = self
            .call(
                base,
                Method::GET,
                "runs/get",
                json!({"run_id": run_id}),
                what,
                false,
            )
            .await?;
        match answer {
            Ok(r) => latest_metrics(&r.run.data.metrics, what),
            Err(e) if e.is("RESOURCE_DOES_NOT_EXIST") => Err(PortError::NotFound(format!(
                "{what}: MLflow run `{run_id}` not found"
            ))),
            Err(e) => Err(Self::unexpected(what, e)),
        }
    }

    /// Metrics of a LoggedModel: `model.data.metrics` (latest per key), or
    /// its `source_run_id` run's when the model has none.
    async fn logged_model_metrics(
        &self,
        base: &str,
        model_id: &str,
        what: &str,
    ) -> Result<Metrics, PortError> {
        let answer: Result<LoggedModelResponse, ApiError> = self
            .call(
                base,
                Method::GET,
                &format!("logged-models/{model_id}"),
                json!({}),
                what,
                false,
            )
            .await?;
        let model = match answer {
            Ok(r) => r.model,
            Err(e) if e.is("RESOURCE_DOES_NOT_EXIST") => {
                return Err(PortError::NotFound(format!(
                    "{what}: MLflow logged model `{model_id}` not found"
                )))
            }
            Err(e) => return Err(Self::unexpected(what, e)),
        };
        if model.info.status == "LOGGED_MODEL_UPLOAD_FAILED" {
            return Err(PortError::Failed(format!(
                "{what}: MLflow logged model `{model_id}` is LOGGED_MODEL_UPLOAD_FAILED{}",
                if model.info.status_message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", model.info.status_message)
                }
            )));
        }
        if !model.data.metrics.is_empty() {
            return latest_metrics(&model.data.metrics, what);
        }
        if model.info.source_run_id.is_empty() {
            debug!(model_id, "logged model has no metrics and no source run");
            return Ok(Metrics::new());
        }
        debug!(model_id, run_id = %model.info.source_run_id, "logged model has no metrics; reading its source run");
        self.run_metrics(base, &model.info.source_run_id, what)
            .await
    }

    async fn metrics_of(
        &self,
        base: &str,
        candidate: &CandidateRef,
        what: &str,
    ) -> Result<Metrics, PortError> {
        match candidate {
            CandidateRef::Run(id) => self.run_metrics(base, id, what).await,
            CandidateRef::LoggedModel(id) => self.logged_model_metrics(base, id, what).await,
        }
    }

    async fn get_version(&self, base: &str, version: &str) -> Result<ModelVersion, PortError> {
        let model = self.model();
        let what = format!("MLflow model `{model}` version {version}");
        let answer: Result<ModelVersionResponse, ApiError> = self
            .call(
                base,
                Method::GET,
                "model-versions/get",
                json!({"name": model, "version": version}),
                &what,
                false,
            )
            .await?;
        match answer {
            Ok(ModelVersionResponse {
                model_version: Some(v),
            }) => Ok(v),
            Ok(ModelVersionResponse {
                model_version: None,
            }) => Err(PortError::InvalidResponse(format!(
                "{what}: the answer has no `model_version`"
            ))),
            Err(e) => Err(Self::unexpected(&what, e)),
        }
    }

    /// Poll `model-versions/get` until the version is `READY`
    /// (`PENDING_REGISTRATION` and unknown statuses keep waiting, bounded by
    /// [`ReadyWait::timeout`]); `FAILED_REGISTRATION` is `Failed` with
    /// MLflow's `status_message`.
    async fn wait_ready(
        &self,
        base: &str,
        mut version: ModelVersion,
    ) -> Result<ModelVersion, PortError> {
        let model = self.model();
        let deadline = Instant::now() + self.ready_wait.timeout;
        let mut interval = self.ready_wait.poll_interval;
        loop {
            let status = version.status();
            match &status {
                VersionStatus::Ready => return Ok(version),
                VersionStatus::Failed => {
                    return Err(PortError::Failed(format!(
                        "MLflow model `{model}` version {}: registration failed (FAILED_REGISTRATION){}",
                        version.version,
                        if version.status_message.is_empty() {
                            String::new()
                        } else {
                            format!(": {}", version.status_message)
                        }
                    )))
                }
                VersionStatus::Pending | VersionStatus::Unknown(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PortError::Transient(format!(
                    "MLflow model `{model}` version {} is still {} after {:?}; production was not moved{}",
                    version.version,
                    version.status.as_deref().unwrap_or("?"),
                    self.ready_wait.timeout,
                    if version.status_message.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", version.status_message)
                    }
                )));
            }
            info!(model, version = %version.version, status = ?status, "waiting for the MLflow model version to be READY");
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = interval
                .saturating_mul(2)
                .min(self.ready_wait.max_poll_interval);
            version = self.get_version(base, &version.version).await?;
        }
    }

    /// Versions of the model tagged with `retrain_run_id = run_id`. The
    /// server-side tag filter works on MLflow 3.17 (verified); the result is
    /// still filtered client-side in case a server ignores part of it.
    async fn versions_of_run(
        &self,
        base: &str,
        run_id: &RunId,
    ) -> Result<Vec<ModelVersion>, PortError> {
        let model = self.model();
        let what = format!("MLflow model `{model}` versions of retrain run {run_id}");
        let filter = format!("name='{}' and tags.{TAG_RUN_ID}='{}'", model, run_id);
        let mut found = Vec::new();
        let mut page_token: Option<String> = None;
        loop {
            let mut params = json!({"filter": filter, "max_results": 1000});
            if let Some(token) = &page_token {
                params["page_token"] = json!(token);
            }
            let answer: Result<ModelVersionsResponse, ApiError> = self
                .call(
                    base,
                    Method::GET,
                    "model-versions/search",
                    params,
                    &what,
                    false,
                )
                .await?;
            let page = match answer {
                Ok(page) => page,
                Err(e) if e.is("RESOURCE_DOES_NOT_EXIST") => return Ok(found),
                Err(e) => return Err(Self::unexpected(&what, e)),
            };
            found.extend(
                page.model_versions
                    .into_iter()
                    .filter(|v| v.tag(TAG_RUN_ID) == Some(run_id.as_str())),
            );
            match page.next_page_token.filter(|t| !t.is_empty()) {
                Some(token) => page_token = Some(token),
                None => break,
            }
        }
        found.sort_by_key(version_number);
        Ok(found)
    }

    async fn ensure_registered_model(&self, base: &str) -> Result<(), PortError> {
        let model = self.model();
        let what = format!("MLflow create registered model `{model}`");
        let answer: Result<Value, ApiError> = self
            .call(
                base,
                Method::POST,
                "registered-models/create",
                json!({"name": model}),
                &what,
                false,
            )
            .await?;
        match answer {
            Ok(_) => Ok(()),
            Err(e) if e.is("RESOURCE_ALREADY_EXISTS") => Ok(()),
            Err(e) => Err(Self::unexpected(&what, e)),
        }
    }

    /// Create the version exactly once: the create call is not retried
    /// blindly (a retried POST after a lost answer would make a second
    /// version); after a transient failure we look for our tag first.
    async fn create_version_once(
        &self,
        base: &str,
        candidate: &Candidate,
        run_id: &RunId,
    ) -> Result<ModelVersion, PortError> {
        let model = self.model();
        let source = CandidateRef::parse(&candidate.id);
        let what = format!(
            "MLflow create version of `{model}` from {}",
            source.describe()
        );
        let tags = json!([{"key": TAG_RUN_ID, "value": run_id.as_str()}]);
        let description = format!("promoted by retrain run {run_id}");
        let body = match &source {
            CandidateRef::Run(id) => json!({
                "name": model,
                "source": format!("runs:/{id}/{MODEL_ARTIFACT_PATH}"),
                "run_id": id,
                "tags": tags,
                "description": description,
            }),
            // The server fills `run_id` from the logged model's source run.
            CandidateRef::LoggedModel(id) => json!({
                "name": model,
                "source": format!("models:/{id}"),
                "model_id": id,
                "tags": tags,
                "description": description,
            }),
        };
        let attempts = self.settings.policy.max_retries + 1;
        let mut last_error = None;
        for attempt in 0..attempts {
            if attempt > 0 {
                if let Some(existing) = self.versions_of_run(base, run_id).await?.into_iter().next()
                {
                    return Ok(existing);
                }
                let backoff = self
                    .settings
                    .policy
                    .base_backoff
                    .saturating_mul(2u32.saturating_pow(attempt - 1))
                    .min(self.settings.policy.max_backoff);
                tokio::time::sleep(backoff).await;
            }
            let answer: Result<Result<ModelVersionResponse, ApiError>, PortError> = self
                .call(
                    base,
                    Method::POST,
                    "model-versions/create",
                    body.clone(),
                    &what,
                    true,
                )
                .await;
            match answer {
                Ok(Ok(ModelVersionResponse {
                    model_version: Some(v),
                })) => return Ok(v),
                Ok(Ok(ModelVersionResponse {
                    model_version: None,
                })) => {
                    return Err(PortError::InvalidResponse(format!(
                        "{what}: the answer has no `model_version`"
                    )))
                }
                Ok(Err(e)) if e.is("RESOURCE_DOES_NOT_EXIST") => {
                    return Err(PortError::NotFound(format!(
                        "{what}: {} (does the candidate {} exist on this server?)",
                        e.message,
                        source.describe()
                    )))
                }
                Ok(Err(e)) if is_retryable_status(e.status) => {
                    last_error = Some(Self::unexpected(&what, e));
                }
                Ok(Err(e)) => return Err(Self::unexpected(&what, e)),
                Err(PortError::Transient(m)) => last_error = Some(PortError::Transient(m)),
                Err(other) => return Err(other),
            }
        }
        Err(last_error.unwrap_or_else(|| PortError::Transient(format!("{what}: gave up"))))
    }

    async fn set_version_tag(
        &self,
        base: &str,
        version: &str,
        key: &str,
        value: &str,
    ) -> Result<(), PortError> {
        let model = self.model();
        let what = format!("MLflow tag `{key}` on `{model}` version {version}");
        let answer: Result<Value, ApiError> = self
            .call(
                base,
                Method::POST,
                "model-versions/set-tag",
                json!({"name": model, "version": version, "key": key, "value": value}),
                &what,
                false,
            )
            .await?;
        answer.map(|_| ()).map_err(|e| Self::unexpected(&what, e))
    }

    async fn move_production(&self, base: &str, version: &str) -> Result<(), PortError> {
        let model = self.model();
        let (what, path, body) = match self.settings.mode {
            RegistryMode::Alias => (
                format!(
                    "MLflow set alias `{}` of `{model}` to version {version}",
                    self.settings.alias
                ),
                "registered-models/alias",
                json!({"name": model, "alias": self.settings.alias, "version": version}),
            ),
            RegistryMode::Stage => (
                format!("MLflow transition `{model}` version {version} to Production"),
                "model-versions/transition-stage",
                json!({"name": model, "version": version, "stage": "Production", "archive_existing_versions": true}),
            ),
        };
        let answer: Result<Value, ApiError> = self
            .call(base, Method::POST, path, body, &what, false)
            .await?;
        answer.map(|_| ()).map_err(|e| Self::unexpected(&what, e))
    }
}

/// The tracking URI for messages: a password in its userinfo is masked.
fn display_uri(uri: &str) -> String {
    // `{public_ip}` placeholders are not valid hosts; mask on the raw text.
    match (uri.find("://"), uri.find('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &uri[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &uri[..scheme_end + 3], &uri[at..]),
                None => uri.to_owned(),
            }
        }
        _ => uri.to_owned(),
    }
}

/// What a registered version is measured by: its LoggedModel (MLflow 3) or
/// its run, like the candidate it was registered from.
fn measured_by(version: &ModelVersion, what: &str) -> Result<CandidateRef, PortError> {
    match version.logged_model() {
        Some(model_id) => Ok(CandidateRef::LoggedModel(model_id)),
        None if !version.run_id.is_empty() => Ok(CandidateRef::Run(version.run_id.clone())),
        None => Err(PortError::InvalidResponse(format!(
            "{what} has neither a run_id nor a logged model source, so its metrics cannot be read"
        ))),
    }
}

fn excerpt(body: &str) -> String {
    body.chars().take(300).collect()
}

#[async_trait]
impl ModelRegistry for MlflowRegistry {
    async fn production(&self, lease: Option<Lease>) -> Result<Option<ProductionModel>, PortError> {
        let base = self.api_base(lease.as_ref())?;
        let Some(version) = self.current_production(&base).await? else {
            return Ok(None);
        };
        let what = format!(
            "MLflow production model `{}` version {}",
            self.model(),
            version.version
        );
        let source = measured_by(&version, &what)?;
        let metrics = self.metrics_of(&base, &source, &what).await?;
        Ok(Some(ProductionModel {
            version: version.version,
            candidate_id: Some(source.id().to_owned()),
            metrics,
        }))
    }

    async fn candidate_metrics(
        &self,
        candidate_id: String,
        lease: Option<Lease>,
    ) -> Result<Metrics, PortError> {
        let base = self.api_base(lease.as_ref())?;
        if let Some(number) = self.registered_version(&candidate_id) {
            // A version already registered (announced by an MLflow webhook):
            // measured by its run or logged model, like production is.
            let version = self.get_version(&base, number).await?;
            let what = format!("MLflow model `{}` version {number}", self.model());
            let source = measured_by(&version, &what)?;
            return self.metrics_of(&base, &source, &what).await;
        }
        let candidate = CandidateRef::parse(&candidate_id);
        let what = format!("MLflow candidate {}", candidate.describe());
        self.metrics_of(&base, &candidate, &what).await
    }

    async fn promote(
        &self,
        candidate: Candidate,
        run_id: RunId,
        lease: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        let base = self.api_base(lease.as_ref())?;
        // Reuse the version an earlier attempt of this run created.
        let existing = self
            .versions_of_run(&base, &run_id)
            .await?
            .into_iter()
            .next();
        let version = match (existing, self.registered_version(&candidate.id)) {
            (Some(v), _) => v,
            // Already registered: promote that version itself (no copy), tagged
            // with this run first so a retry finds it like one it created.
            (None, Some(number)) => {
                self.set_version_tag(&base, number, TAG_RUN_ID, run_id.as_str())
                    .await?;
                self.get_version(&base, number).await?
            }
            (None, None) => {
                self.ensure_registered_model(&base).await?;
                self.create_version_once(&base, &candidate, &run_id).await?
            }
        };
        if version.tag(TAG_PROMOTED) == Some("true") {
            return Ok(PromotedVersion {
                previous: version.tag(TAG_PREVIOUS).map(str::to_owned),
                version: version.version,
            });
        }
        // Production only ever points at a usable version.
        let version = self.wait_ready(&base, version).await?;
        // The previous production version: recorded on the new version before
        // production moves, so a retry after a crash still knows it.
        let current = self.current_production(&base).await?.map(|c| c.version);
        let already_production = current.as_deref() == Some(version.version.as_str());
        let previous = match current {
            Some(c) if c != version.version => {
                self.set_version_tag(&base, &version.version, TAG_PREVIOUS, &c)
                    .await?;
                Some(c)
            }
            _ => version.tag(TAG_PREVIOUS).map(str::to_owned),
        };
        if !already_production {
            self.move_production(&base, &version.version).await?;
        }
        if let (RegistryMode::Alias, Some(previous)) = (self.settings.mode, &previous) {
            self.set_version_tag(&base, previous, TAG_ARCHIVED, "true")
                .await?;
        }
        self.set_version_tag(&base, &version.version, TAG_PROMOTED, "true")
            .await?;
        Ok(PromotedVersion {
            version: version.version,
            previous,
        })
    }

    async fn version_exists(
        &self,
        version: String,
        lease: Option<Lease>,
    ) -> Result<bool, PortError> {
        let base = self.api_base(lease.as_ref())?;
        match self.get_version(&base, &version).await {
            Ok(_) => Ok(true),
            Err(PortError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn roll_back(
        &self,
        rollback: RegistryRollback,
        lease: Option<Lease>,
    ) -> Result<PromotedVersion, PortError> {
        const NO_PREVIOUS: &str = "none";
        let base = self.api_base(lease.as_ref())?;
        let run_id = rollback.run_id.as_str();
        let target = self.get_version(&base, &rollback.version).await?;
        let recorded_previous = |v: &ModelVersion| {
            v.tag(TAG_RESTORED_FROM)
                .filter(|p| !p.is_empty() && *p != NO_PREVIOUS)
                .map(str::to_owned)
        };
        if target.tag(TAG_RESTORED) == Some(run_id) {
            // Idempotent per run: this rollback already finished.
            return Ok(PromotedVersion {
                previous: recorded_previous(&target),
                version: target.version,
            });
        }
        let current = self.current_production(&base).await?.map(|v| v.version);
        let previous = if target.tag(TAG_RESTORED_BY_RUN) == Some(run_id) {
            // An earlier attempt of this run recorded what it replaces
            // (production may already point at the target).
            recorded_previous(&target)
        } else {
            let previous = current.clone().filter(|c| *c != target.version);
            let from = previous.as_deref().unwrap_or(NO_PREVIOUS);
            self.set_version_tag(&base, &target.version, TAG_RESTORED_FROM, from)
                .await?;
            self.set_version_tag(&base, &target.version, TAG_RESTORED_BY_RUN, run_id)
                .await?;
            previous
        };
        if current.as_deref() != Some(target.version.as_str()) {
            self.move_production(&base, &target.version).await?;
        }
        if let Some(previous) = &previous {
            let reason: String = rollback.reason.chars().take(MAX_TAG_VALUE).collect();
            for (key, value) in [
                (TAG_ROLLED_BACK_BY, rollback.by.as_str()),
                (TAG_ROLLED_BACK_REASON, reason.as_str()),
                (TAG_ROLLED_BACK_RUN_ID, run_id),
            ] {
                self.set_version_tag(&base, previous, key, value).await?;
            }
            if self.settings.mode == RegistryMode::Alias {
                self.set_version_tag(&base, previous, TAG_ARCHIVED, "true")
                    .await?;
            }
        }
        if self.settings.mode == RegistryMode::Alias && target.tag(TAG_ARCHIVED).is_some() {
            // Production again: no longer archived.
            self.set_version_tag(&base, &target.version, TAG_ARCHIVED, "false")
                .await?;
        }
        self.set_version_tag(&base, &target.version, TAG_RESTORED, run_id)
            .await?;
        Ok(PromotedVersion {
            version: target.version,
            previous,
        })
    }

    fn describe(&self) -> String {
        match self.settings.mode {
            RegistryMode::Alias => format!(
                "mlflow {} model `{}` alias `{}`",
                display_uri(&self.settings.tracking_uri),
                self.settings.model,
                self.settings.alias
            ),
            RegistryMode::Stage => format!(
                "mlflow {} model `{}` stage Production",
                display_uri(&self.settings.tracking_uri),
                self.settings.model
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_accept_protobuf_special_strings() {
        assert_eq!(metric_value(&json!(0.5)), Some(0.5));
        assert!(metric_value(&json!("NaN")).unwrap().is_nan());
        assert_eq!(metric_value(&json!("-Infinity")), Some(f64::NEG_INFINITY));
        assert_eq!(metric_value(&json!(null)), None);
    }

    #[test]
    fn candidate_ids_name_runs_or_logged_models() {
        let m = "m-e6dd905da2f644c7896cc1fe2dbd35ca";
        assert_eq!(CandidateRef::parse(m), CandidateRef::LoggedModel(m.into()));
        assert_eq!(
            CandidateRef::parse(&format!("models:/{m}")),
            CandidateRef::LoggedModel(m.into())
        );
        let run = "9f6c17f79cda43c6bed22b82327861ee";
        assert_eq!(CandidateRef::parse(run), CandidateRef::Run(run.into()));
        // Not an id shape: never used as a URL path segment.
        assert_eq!(CandidateRef::parse("m-"), CandidateRef::Run("m-".into()));
        assert_eq!(
            CandidateRef::parse("m-../x"),
            CandidateRef::Run("m-../x".into())
        );
        assert_eq!(
            CandidateRef::parse("models:/seg@champion"),
            CandidateRef::Run("models:/seg@champion".into())
        );
    }

    #[test]
    fn version_status_and_logged_model_source() {
        let v: ModelVersion = serde_json::from_value(json!({
            "name": "m", "version": "2", "source": "models:/m-abc123", "run_id": "r",
            "status": "PENDING_REGISTRATION"
        }))
        .unwrap();
        assert_eq!(v.status(), VersionStatus::Pending);
        assert_eq!(v.logged_model().as_deref(), Some("m-abc123"));
        let v: ModelVersion = serde_json::from_value(json!({
            "version": "1", "source": "runs:/r/model", "run_id": "r", "status": "FAILED_REGISTRATION"
        }))
        .unwrap();
        assert_eq!(v.status(), VersionStatus::Failed);
        assert_eq!(v.logged_model(), None);
        let v: ModelVersion = serde_json::from_value(json!({"version": "1"})).unwrap();
        assert_eq!(
            v.status(),
            VersionStatus::Ready,
            "no status: nothing to wait for"
        );
        let v: ModelVersion =
            serde_json::from_value(json!({"version": "1", "status": "COPYING"})).unwrap();
        assert_eq!(v.status(), VersionStatus::Unknown("COPYING".into()));
    }

    #[test]
    fn latest_metric_wins() {
        let metrics: Vec<Metric> = serde_json::from_value(json!([
            {"key": "dice", "value": 0.8, "timestamp": 2, "step": 1},
            {"key": "dice", "value": 0.7, "timestamp": 1, "step": 0},
            {"key": "iou", "value": 0.6}
        ]))
        .unwrap();
        let m = latest_metrics(&metrics, "x").unwrap();
        assert_eq!(m["dice"], 0.8);
        assert_eq!(m["iou"], 0.6);
    }

    #[test]
    fn auth_debug_hides_secrets_and_env_is_read() {
        let auth = MlflowAuth::from_lookup(|n| match n {
            "MLFLOW_TRACKING_USERNAME" => Some("bob".into()),
            "MLFLOW_TRACKING_PASSWORD" => Some("hunter2-secret".into()),
            _ => None,
        });
        let debug = format!("{auth:?}");
        assert!(
            debug.contains("bob") && !debug.contains("hunter2"),
            "{debug}"
        );
        let auth = MlflowAuth::from_lookup(|n| {
            (n == "MLFLOW_TRACKING_TOKEN").then(|| "tok-secret".into())
        });
        assert!(matches!(auth, MlflowAuth::Token(_)));
        assert!(!format!("{auth:?}").contains("tok-secret"));
    }

    #[test]
    fn reserved_aliases_and_bad_uris_are_config_errors() {
        let mut s = MlflowSettings::new("http://h:5000", "m");
        s.alias = "Latest".into();
        assert!(MlflowRegistry::new(s.clone()).is_err());
        s.alias = "v3".into();
        assert!(MlflowRegistry::new(s.clone()).is_err());
        s.alias = "champion".into();
        assert!(MlflowRegistry::new(s.clone()).is_ok());
        s.tracking_uri = "file:///tmp/mlruns".into();
        assert!(MlflowRegistry::new(s).is_err());
    }

    #[test]
    fn passwords_in_the_uri_are_masked() {
        assert_eq!(
            display_uri("https://bob:pw@h:5000"),
            "https://bob:***@h:5000"
        );
        assert_eq!(
            display_uri("http://{public_ip}:5000"),
            "http://{public_ip}:5000"
        );
        let r = MlflowRegistry::new(MlflowSettings::new("https://bob:pw@h:5000", "m")).unwrap();
        assert!(!r.describe().contains("pw"));
        assert!(!format!("{r:?}").contains(":pw@"));
    }

    #[test]
    fn placeholder_needs_a_lease() {
        let r = MlflowRegistry::new(MlflowSettings::new("http://{public_ip}:5000/", "m")).unwrap();
        let err = r.api_base(None).unwrap_err();
        assert!(matches!(err, PortError::Config(_)));
        assert!(err.to_string().contains("public_ip"));
    }
}
