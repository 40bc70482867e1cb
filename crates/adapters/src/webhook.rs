//! Generic webhook / Slack notifier: POSTs the `LabelReport` as JSON, or a
//! Slack incoming-webhook message `{"text": <markdown>}`.
//!
//! Webhook URLs are credentials (a Slack URL's path *is* its secret), so the
//! URL is kept in a `SecretString`, every request is marked
//! [`Call::secret_url`] (the shared client's log lines and errors show only
//! scheme, host and port), and this module's own errors name only the host.
//!
//! A message is not idempotent (Slack and most receivers have no idempotency
//! key), so a POST whose outcome is unknown (timeout, dropped connection,
//! 5xx) is **not** resent by this call: a missed notification is better than
//! a duplicate one. Refusals that provably did not deliver (connection
//! refused, 429) are retried per the policy. The engine retries a transient
//! failure at the next cycle and may repeat a delivery after a crash between
//! sending and journaling it, so every request carries the header
//! `Idempotency-Key: <run_id>`: receivers that can deduplicate see one
//! delivery per run.

use std::fmt;

use async_trait::async_trait;
use retrain_core::ports::{Notifier, PortError};
use retrain_core::report::LabelReport;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use url::Url;

use crate::error::AdapterError;
use crate::github::NotifyOn;
use crate::http::{is_rate_limited, is_retryable_status, Call, HttpPolicy, Replay, RetryingClient};

/// Body format of the webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WebhookFormat {
    /// The `LabelReport` as JSON.
    #[default]
    Json,
    /// Slack incoming webhook: `{"text": "<markdown>"}`.
    Slack,
}

/// `Notifier` POSTing to a URL.
#[derive(Clone)]
pub struct WebhookNotifier {
    url: SecretString,
    host: String,
    format: WebhookFormat,
    on: NotifyOn,
    http: RetryingClient,
}

impl fmt::Debug for WebhookNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookNotifier")
            .field("host", &self.host)
            .field("url", &"***")
            .field("format", &self.format)
            .field("on", &self.on)
            .finish()
    }
}

impl WebhookNotifier {
    pub fn new(
        url: SecretString,
        format: WebhookFormat,
        on: NotifyOn,
    ) -> Result<Self, AdapterError> {
        Self::with_policy(url, format, on, HttpPolicy::default())
    }

    pub fn with_policy(
        url: SecretString,
        format: WebhookFormat,
        on: NotifyOn,
        policy: HttpPolicy,
    ) -> Result<Self, AdapterError> {
        // The parse error text never includes the URL itself.
        let parsed = Url::parse(url.expose_secret())
            .map_err(|e| AdapterError::config("notify.webhook", format!("not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(AdapterError::config(
                "notify.webhook",
                "must be an http(s) URL",
            ));
        }
        let host = parsed.host_str().unwrap_or_default().to_owned();
        Ok(Self {
            url,
            host,
            format,
            on,
            http: RetryingClient::new("webhook", policy)?,
        })
    }

    /// Defence in depth: strip any form of the secret URL from an error
    /// message (the shared client already shows only its origin).
    fn redact(&self, error: PortError) -> PortError {
        let secret = self.url.expose_secret();
        let parsed = Url::parse(secret).ok();
        let path = parsed
            .as_ref()
            .map(|u| u.path().to_owned())
            .unwrap_or_default();
        let query = parsed
            .as_ref()
            .and_then(|u| u.query().map(str::to_owned))
            .unwrap_or_default();
        let clean = |m: &str| {
            let mut m = m.replace(secret, &format!("https://{}/***", self.host));
            if path.len() > 1 {
                m = m.replace(&path, "/***");
            }
            if !query.is_empty() {
                m = m.replace(&query, "***");
            }
            m
        };
        match error {
            PortError::Transient(m) => PortError::Transient(clean(&m)),
            PortError::Denied(m) => PortError::Denied(clean(&m)),
            PortError::NotFound(m) => PortError::NotFound(clean(&m)),
            PortError::InvalidResponse(m) => PortError::InvalidResponse(clean(&m)),
            PortError::Config(m) => PortError::Config(clean(&m)),
            PortError::Failed(m) => PortError::Failed(clean(&m)),
        }
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn notify(&self, report: &LabelReport) -> Result<(), PortError> {
        if !self.on.wants(report) {
            return Ok(());
        }
        let body = match self.format {
            WebhookFormat::Json => serde_json::to_value(report)
                .map_err(|e| PortError::Failed(format!("cannot serialize the report: {e}")))?,
            WebhookFormat::Slack => json!({ "text": report.to_markdown() }),
        };
        let what = format!("webhook {}", self.host);
        let url = self.url.expose_secret();
        // POST: not resent after an unknown outcome (`Replay::ByMethod`).
        let call = Call::new(&what, Replay::ByMethod).secret_url();
        let response = self
            .http
            .send_with(&call, |c| {
                let request = c.post(url).json(&body);
                match &report.run_id {
                    Some(run_id) => request.header("Idempotency-Key", run_id.as_str()),
                    None => request,
                }
            })
            .await
            .map_err(|e| self.redact(e))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        if is_rate_limited(&response) {
            return Err(PortError::Transient(format!(
                "{what}: HTTP {status}: rate limited; try again later"
            )));
        }
        Err(match status.as_u16() {
            401 | 403 => PortError::Denied(format!(
                "{what}: HTTP {status}: the webhook refused the message"
            )),
            404 | 410 => PortError::NotFound(format!(
                "{what}: HTTP {status}: the webhook no longer exists"
            )),
            _ if is_retryable_status(status) => PortError::Transient(format!(
                "{what}: HTTP {status} (not resent: the message may have been delivered)"
            )),
            _ => PortError::Failed(format!("{what}: HTTP {status}")),
        })
    }

    fn describe(&self) -> String {
        match self.format {
            WebhookFormat::Json => format!("webhook {}", self.host),
            WebhookFormat::Slack => format!("slack {}", self.host),
        }
    }
}
