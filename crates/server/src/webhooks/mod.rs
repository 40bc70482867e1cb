//! Inbound webhooks: Hugging Face (`X-Webhook-Secret`), GitHub
//! (`X-Hub-Signature-256`) and MLflow 3 (`X-MLflow-Signature`).
//!
//! Each source has a pure part, unit-tested without a server: `verify`
//! (secret or HMAC, compared in constant time: `subtle` and `hmac`'s
//! `verify_slice`), `parse` (the payload shape of that sender) and `route`
//! (which labels it concerns, from the label settings) giving a
//! [`WebhookAction`]. [`receive`] is the one flow every endpoint shares:
//! verify → parse → claim the delivery id → act → record the outcome.
//!
//! **Invariant:** a delivery that fails verification or parsing changes
//! nothing but its own line in the delivery log; a delivery id (GitHub,
//! MLflow) acts at most once across replicas (the log's claim, see
//! `retrain_adapters::store::DeliveryLog`).

pub mod effects;
pub mod github;
pub mod huggingface;
pub mod mlflow;
pub mod routes;

use std::sync::Arc;

use async_trait::async_trait;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use retrain_adapters::settings::{GithubTrigger, RegistrySpec, Settings};
use retrain_adapters::store::{DeliveryLog, NewDelivery, Recorded};
use retrain_core::domain::Label;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

/// Who sent a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookSource {
    HuggingFace,
    Github,
    Mlflow,
}

impl WebhookSource {
    /// The name in the delivery log, metrics and URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HuggingFace => "huggingface",
            Self::Github => "github",
            Self::Mlflow => "mlflow",
        }
    }
}

/// One MLflow model version to gate against production for `label`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateRequest {
    pub label: Label,
    /// The registered model and version the webhook announced.
    pub model: String,
    pub version: String,
    /// The MLflow run the version was registered from, when it says.
    pub candidate_run_id: Option<String>,
}

impl GateRequest {
    /// The candidate as the registry adapter takes it: that registered
    /// version itself (`models:/<model>/<version>`), measured by its run or
    /// LoggedModel and promoted as is.
    pub fn candidate_id(&self) -> String {
        format!("models:/{}/{}", self.model, self.version)
    }
}

/// What a verified delivery asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookAction {
    /// A sender's connectivity check (GitHub `ping`): answered, nothing done.
    Ping,
    /// Valid, but concerns no label (another repo, another event…).
    Ignored { reason: String },
    /// A dataset changed: wake the polls of `labels` now, and start a cycle
    /// for `start` (the metadata-triggered ones among them).
    WakeLabels {
        labels: Vec<Label>,
        start: Vec<Label>,
    },
    /// Start a cycle for these labels (a GitHub push they watch).
    StartLabels(Vec<Label>),
    /// Gate these registered versions against production, promoting the
    /// ones that pass (or parking them for approval).
    GateModelVersions(Vec<GateRequest>),
}

impl WebhookAction {
    /// The stable outcome code recorded for this action when it succeeded.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Ping => "ping",
            Self::Ignored { .. } => "ignored",
            Self::WakeLabels { .. } => "woken",
            Self::StartLabels(_) => "started",
            Self::GateModelVersions(_) => "gating",
        }
    }
}

/// Why a delivery was refused; `code` is stable (the API's error code and
/// the delivery log's outcome).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    #[error("no secret is configured for {0} webhooks (set [server.webhooks] {0}_secret)")]
    NotConfigured(&'static str),
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}")]
    StaleTimestamp(String),
    #[error("delivery {0} was already received")]
    ReplayedDelivery(String),
    #[error("malformed payload: {0}")]
    MalformedPayload(String),
    /// Acting failed (store or engine unavailable): the sender should retry.
    #[error("{0}")]
    Unavailable(String),
}

impl WebhookError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotConfigured(_) => "not_configured",
            Self::MissingHeader(_) => "missing_header",
            Self::BadSignature(_) => "bad_signature",
            Self::StaleTimestamp(_) => "stale_timestamp",
            Self::ReplayedDelivery(_) => "replayed_delivery",
            Self::MalformedPayload(_) => "malformed_payload",
            Self::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotConfigured(_) => StatusCode::NOT_FOUND,
            Self::MissingHeader(_) | Self::BadSignature(_) | Self::StaleTimestamp(_) => {
                StatusCode::UNAUTHORIZED
            }
            Self::ReplayedDelivery(_) => StatusCode::CONFLICT,
            Self::MalformedPayload(_) => StatusCode::BAD_REQUEST,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// What the webhooks need to know about one label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelTarget {
    pub label: Label,
    /// `owner/name` of the Hub dataset its metadata is read from.
    pub dataset_repo: Option<String>,
    /// Triggered by new metadata alone (no feedback counts): a new dataset
    /// commit is reason enough to start a cycle.
    pub metadata_triggered: bool,
    pub github: Option<GithubTrigger>,
    /// The MLflow registered model it promotes into.
    pub mlflow_model: Option<String>,
}

/// Every label's target, from the settings.
pub fn targets(settings: &Settings) -> Vec<LabelTarget> {
    settings
        .labels
        .values()
        .map(|l| LabelTarget {
            label: l.label.clone(),
            dataset_repo: huggingface::dataset_repo_of(&l.metadata),
            metadata_triggered: !l.counts,
            github: l.github_trigger.clone(),
            mlflow_model: match &l.registry {
                Some(RegistrySpec::Mlflow { model, .. }) => Some(model.clone()),
                _ => None,
            },
        })
        .collect()
}

/// Constant-time equality of a presented secret and the configured one.
/// Lengths are not secret (an attacker learns only that they differ).
pub fn secrets_match(presented: &[u8], configured: &[u8]) -> bool {
    presented.ct_eq(configured).into()
}

/// A header as text; absent or not visible ASCII → `MissingHeader`.
pub(crate) fn header<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<&'h str, WebhookError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(WebhookError::MissingHeader(name))
}

/// What a source checked and understood about one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The sender's delivery id, claimed before acting when present.
    pub delivery_id: Option<String>,
    pub action: WebhookAction,
}

/// The effects a verified delivery can have, implemented over the engine by
/// the server (and by fakes in tests).
#[async_trait]
pub trait WebhookEffects: Send + Sync {
    /// Wake the dataset polls of `labels` now.
    fn wake(&self, labels: &[Label]);
    /// Start a cycle for `labels` (in the background; labels already being
    /// driven are reported busy by the engine, never driven twice).
    async fn start(&self, labels: Vec<Label>, reason: String) -> Result<(), String>;
    /// Gate (and promote, or park for approval) registered versions.
    async fn gate(&self, requests: Vec<GateRequest>) -> Result<(), String>;
}

/// Everything a webhook endpoint needs.
pub struct WebhookContext {
    pub huggingface_secret: Option<SecretString>,
    pub github_secret: Option<SecretString>,
    pub mlflow_secret: Option<SecretString>,
    pub targets: Arc<Vec<LabelTarget>>,
    pub deliveries: Arc<dyn DeliveryLog>,
    pub effects: Arc<dyn WebhookEffects>,
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl std::fmt::Debug for WebhookContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookContext")
            .field("huggingface", &self.huggingface_secret.is_some())
            .field("github", &self.github_secret.is_some())
            .field("mlflow", &self.mlflow_secret.is_some())
            .field("targets", &self.targets)
            .finish_non_exhaustive()
    }
}

/// The answer to a delivery: status, stable code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl WebhookContext {
    fn secret(&self, source: WebhookSource) -> Result<&SecretString, WebhookError> {
        match source {
            WebhookSource::HuggingFace => self.huggingface_secret.as_ref(),
            WebhookSource::Github => self.github_secret.as_ref(),
            WebhookSource::Mlflow => self.mlflow_secret.as_ref(),
        }
        .ok_or(WebhookError::NotConfigured(source.as_str()))
    }

    /// Verify and parse one delivery of `source`.
    fn check(
        &self,
        source: WebhookSource,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Verified, WebhookError> {
        let secret = self.secret(source)?.expose_secret().as_bytes();
        match source {
            WebhookSource::HuggingFace => {
                huggingface::verify(headers, secret)?;
                let event = huggingface::parse(body)?;
                Ok(Verified {
                    delivery_id: None,
                    action: huggingface::route(&event, &self.targets),
                })
            }
            WebhookSource::Github => {
                let delivery = github::verify(headers, body, secret)?;
                let event = github::parse(&delivery.event, body)?;
                Ok(Verified {
                    delivery_id: delivery.id,
                    action: github::route(&event, &self.targets),
                })
            }
            WebhookSource::Mlflow => {
                let delivery_id = mlflow::verify(headers, body, secret, now)?;
                let event = mlflow::parse(body)?;
                Ok(Verified {
                    delivery_id: Some(delivery_id),
                    action: mlflow::route(&event, &self.targets)?,
                })
            }
        }
    }

    /// Record a delivery line; a store failure is logged, not fatal to a
    /// refusal (the refusal itself changed nothing).
    async fn log(&self, delivery: NewDelivery) -> Result<Recorded, WebhookError> {
        self.deliveries.record(&delivery).await.map_err(|e| {
            tracing::warn!(source = %delivery.source, error = %e, "cannot record the webhook delivery");
            WebhookError::Unavailable(format!("cannot record the delivery: {e}"))
        })
    }

    fn count(&self, source: WebhookSource, outcome: &str) {
        if let Some(metrics) = &self.metrics {
            metrics.webhook_delivery(source.as_str(), outcome);
        }
    }

    /// The whole flow of one delivery: verify, parse, claim, act, record.
    pub async fn receive(
        &self,
        source: WebhookSource,
        headers: &HeaderMap,
        body: &[u8],
        now: DateTime<Utc>,
    ) -> Result<Answer, WebhookError> {
        let record = |delivery_id: Option<String>,
                      claim: bool,
                      outcome: &str,
                      status: StatusCode,
                      detail: String| NewDelivery {
            source: source.as_str().to_owned(),
            delivery_id,
            claim,
            outcome: outcome.to_owned(),
            status: status.as_u16(),
            detail: Some(detail),
            received_at: now,
        };
        let verified = match self.check(source, headers, body, now) {
            Ok(verified) => verified,
            Err(refused) => {
                // The id of a refused delivery is logged but never claimed:
                // a forged request cannot burn a real delivery's id.
                let unverified_id = match source {
                    WebhookSource::Github => header(headers, github::DELIVERY_HEADER).ok(),
                    WebhookSource::Mlflow => header(headers, mlflow::DELIVERY_HEADER).ok(),
                    WebhookSource::HuggingFace => None,
                };
                self.count(source, refused.code());
                let _ = self
                    .log(record(
                        unverified_id.map(|id| id.chars().take(200).collect()),
                        false,
                        refused.code(),
                        refused.status(),
                        refused.to_string(),
                    ))
                    .await;
                return Err(refused);
            }
        };
        let action = verified.action;
        let pending = record(
            verified.delivery_id.clone(),
            verified.delivery_id.is_some(),
            action.outcome(),
            StatusCode::ACCEPTED,
            describe(&action),
        );
        let seq = match self.log(pending).await? {
            Recorded::Recorded { seq } => seq,
            Recorded::AlreadyClaimed => {
                let id = verified.delivery_id.unwrap_or_default();
                let replay = WebhookError::ReplayedDelivery(id.clone());
                self.count(source, replay.code());
                let _ = self
                    .log(record(
                        Some(id),
                        false,
                        replay.code(),
                        replay.status(),
                        replay.to_string(),
                    ))
                    .await;
                return Err(replay);
            }
        };
        let acted = match &action {
            WebhookAction::Ping | WebhookAction::Ignored { .. } => Ok(()),
            WebhookAction::WakeLabels { labels, start } => {
                self.effects.wake(labels);
                if start.is_empty() {
                    Ok(())
                } else {
                    self.effects
                        .start(
                            start.clone(),
                            format!("{} webhook: new dataset commit", source.as_str()),
                        )
                        .await
                }
            }
            WebhookAction::StartLabels(labels) => {
                self.effects
                    .start(labels.clone(), format!("{} webhook: push", source.as_str()))
                    .await
            }
            WebhookAction::GateModelVersions(requests) => self.effects.gate(requests.clone()).await,
        };
        match acted {
            Ok(()) => {
                self.count(source, action.outcome());
                let status = match action {
                    WebhookAction::Ping | WebhookAction::Ignored { .. } => StatusCode::OK,
                    _ => StatusCode::ACCEPTED,
                };
                Ok(Answer {
                    status,
                    code: action.outcome(),
                    message: describe(&action),
                })
            }
            Err(reason) => {
                // Give the claim up: the sender's retry of this id may act.
                let failed = WebhookError::Unavailable(reason);
                self.count(source, failed.code());
                if let Err(e) = self
                    .deliveries
                    .settle(
                        seq,
                        failed.code(),
                        failed.status().as_u16(),
                        Some(&failed.to_string()),
                        false,
                    )
                    .await
                {
                    tracing::warn!(seq, error = %e, "cannot record the failed delivery's outcome");
                }
                Err(failed)
            }
        }
    }
}

/// A one-line account of an action, for the log and the answer.
pub fn describe(action: &WebhookAction) -> String {
    let names = |labels: &[Label]| {
        labels
            .iter()
            .map(Label::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    };
    match action {
        WebhookAction::Ping => "pong".into(),
        WebhookAction::Ignored { reason } => reason.clone(),
        WebhookAction::WakeLabels { labels, start } if start.is_empty() => {
            format!("woke the dataset poll of {}", names(labels))
        }
        WebhookAction::WakeLabels { labels, start } => format!(
            "woke the dataset poll of {} and started {}",
            names(labels),
            names(start)
        ),
        WebhookAction::StartLabels(labels) => format!("started {}", names(labels)),
        WebhookAction::GateModelVersions(requests) => {
            let each: Vec<String> = requests
                .iter()
                .map(|r| format!("{} version {} for {}", r.model, r.version, r.label))
                .collect();
            format!("gating {}", each.join(", "))
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
