//! The one HTTP client every REST adapter uses: timeouts on every call,
//! capped exponential backoff with jitter on connect errors/408/429/5xx,
//! `Retry-After` (seconds) and the Hub's `RateLimit: "...";r=0;t=N` honoured,
//! and error messages that name the resource but never a credential.

use std::time::Duration;

use rand::Rng;
use reqwest::{RequestBuilder, Response, StatusCode};
use retrain_core::ports::PortError;
use tracing::warn;

use crate::error::AdapterError;

/// Retry and timeout policy of an HTTP adapter.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    /// Whole-request timeout.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest server-requested wait (`Retry-After`, `RateLimit`) we accept
    /// before giving up instead of sleeping.
    pub max_server_wait: Duration,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            max_retries: 5,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(8),
            max_server_wait: Duration::from_secs(300),
        }
    }
}

impl HttpPolicy {
    /// A policy for tests: tiny backoffs so retries take milliseconds.
    pub fn fast_for_tests() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            max_retries: 3,
            base_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
            max_server_wait: Duration::from_secs(3),
        }
    }
}

/// A reqwest client with the retry policy applied by [`RetryingClient::send`].
#[derive(Debug, Clone)]
pub struct RetryingClient {
    client: reqwest::Client,
    policy: HttpPolicy,
}

impl RetryingClient {
    pub fn new(policy: HttpPolicy) -> Result<Self, AdapterError> {
        Self::with_redirect_policy(policy, reqwest::redirect::Policy::default())
    }

    /// Like [`RetryingClient::new`] with a custom redirect policy (the Hub's
    /// metadata probe must not follow absolute redirects to its CDN).
    pub fn with_redirect_policy(
        policy: HttpPolicy,
        redirect: reqwest::redirect::Policy,
    ) -> Result<Self, AdapterError> {
        let client = reqwest::Client::builder()
            .redirect(redirect)
            .timeout(policy.timeout)
            .connect_timeout(policy.connect_timeout)
            .user_agent(concat!("retrain/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AdapterError::Unavailable(format!("cannot build HTTP client: {e}")))?;
        Ok(Self { client, policy })
    }

    pub fn inner(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn policy(&self) -> &HttpPolicy {
        &self.policy
    }

    /// Send the request built by `build` (called again for every attempt),
    /// retrying transient failures. Returns the last response whatever its
    /// status once it is not retryable or retries are exhausted; `what` names
    /// the resource in errors (e.g. "Space owner/name").
    pub async fn send(
        &self,
        what: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, PortError> {
        let mut attempt: u32 = 0;
        loop {
            let result = build(&self.client).send().await;
            let wait = match &result {
                Ok(response) if !is_retryable_status(response.status()) => {
                    return Ok(result.expect("checked Ok"))
                }
                Ok(response) => server_requested_wait(response),
                Err(e) if is_retryable_transport(e) => None,
                Err(e) => return Err(PortError::Transient(describe_transport(what, e))),
            };
            if attempt >= self.policy.max_retries {
                return match result {
                    Ok(response) => Ok(response),
                    Err(e) => Err(PortError::Transient(format!(
                        "{} (gave up after {} attempts)",
                        describe_transport(what, &e),
                        attempt + 1
                    ))),
                };
            }
            if let Some(wait) = wait {
                if wait > self.policy.max_server_wait {
                    return match result {
                        Ok(response) => Ok(response),
                        Err(e) => Err(PortError::Transient(describe_transport(what, &e))),
                    };
                }
            }
            let delay = wait.unwrap_or_else(|| self.backoff(attempt));
            match &result {
                Ok(r) => warn!(%what, status = %r.status(), attempt = attempt + 1, delay_ms = delay.as_millis() as u64, "retrying HTTP request"),
                Err(e) => warn!(%what, error = %describe_transport(what, e), attempt = attempt + 1, delay_ms = delay.as_millis() as u64, "retrying HTTP request"),
            }
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .policy
            .base_backoff
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(self.policy.max_backoff);
        // Full jitter in [exp/2, exp] keeps retries spread but bounded below.
        let half = exp / 2;
        let spread = rand::thread_rng().gen_range(0..=half.as_millis().max(1) as u64);
        half + Duration::from_millis(spread)
    }
}

/// 408, 429 and 5xx are worth retrying.
pub fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

fn is_retryable_transport(error: &reqwest::Error) -> bool {
    error.is_connect() || error.is_timeout() || error.is_request()
}

fn describe_transport(what: &str, error: &reqwest::Error) -> String {
    // reqwest's Display includes the URL, which never carries our secrets
    // (tokens go in headers), but strip query strings defensively.
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let url = error
        .url()
        .map(|u| {
            let mut u = u.clone();
            u.set_query(None);
            let _ = u.set_password(None);
            format!(" ({u})")
        })
        .unwrap_or_default();
    format!("{what}: {kind}{url}")
}

/// Server-requested wait: the Hub's `RateLimit: "api";r=0;t=N` (wait N+1 s),
/// else `Retry-After` in integer seconds (HTTP-dates are ignored, as the
/// Python client does).
pub fn server_requested_wait(response: &Response) -> Option<Duration> {
    let headers = response.headers();
    if let Some(rate) = headers.get("ratelimit").and_then(|v| v.to_str().ok()) {
        if let Some(wait) = parse_ratelimit_reset(rate) {
            return Some(wait);
        }
    }
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Parse `"api";r=0;t=55` → 56 s when the remaining quota `r` is 0.
pub fn parse_ratelimit_reset(header: &str) -> Option<Duration> {
    let mut remaining = None;
    let mut reset = None;
    for part in header.split(';') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("r=") {
            remaining = v.trim().parse::<u64>().ok();
        } else if let Some(v) = part.strip_prefix("t=") {
            reset = v.trim().parse::<u64>().ok();
        }
    }
    match (remaining, reset) {
        (Some(0), Some(t)) => Some(Duration::from_secs(t + 1)),
        _ => None,
    }
}

/// Map a non-success response to a `PortError` that names `what` and, for
/// 401/403, the permission that is likely missing. The body is included only
/// as a short excerpt (servers do not echo our Authorization header).
pub async fn error_for_status(what: &str, permission_hint: &str, response: Response) -> PortError {
    let status = response.status();
    let error_code = response
        .headers()
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    let excerpt: String = body.chars().take(300).collect();
    let detail = match error_code {
        Some(code) => format!(" [{code}]"),
        None => String::new(),
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => PortError::Denied(format!(
            "{what}: HTTP {status}{detail}: access denied; {permission_hint}"
        )),
        StatusCode::NOT_FOUND => PortError::NotFound(format!(
            "{what}: HTTP 404{detail}: not found (check the name, and that the token can see it if it is private)"
        )),
        s if is_retryable_status(s) => PortError::Transient(format!(
            "{what}: HTTP {status}{detail} after retries: {excerpt}"
        )),
        _ => PortError::Failed(format!("{what}: HTTP {status}{detail}: {excerpt}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratelimit_header_is_parsed() {
        assert_eq!(
            parse_ratelimit_reset("\"api\";r=0;t=55"),
            Some(Duration::from_secs(56))
        );
        assert_eq!(parse_ratelimit_reset("\"api\";r=3;t=55"), None);
        assert_eq!(parse_ratelimit_reset("garbage"), None);
    }

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable_status(StatusCode::TOO_MANY_REQUESTS));
        assert!(is_retryable_status(StatusCode::BAD_GATEWAY));
        assert!(is_retryable_status(StatusCode::REQUEST_TIMEOUT));
        assert!(!is_retryable_status(StatusCode::NOT_FOUND));
        assert!(!is_retryable_status(StatusCode::UNAUTHORIZED));
    }

    #[tokio::test]
    async fn retries_5xx_then_succeeds_and_honours_retry_after() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(503))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_string("ok"))
            .mount(&server)
            .await;
        let client = RetryingClient::new(HttpPolicy::fast_for_tests()).unwrap();
        let started = std::time::Instant::now();
        let url = server.uri();
        let response = client.send("test", |c| c.get(&url)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(900), "Retry-After honoured");
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn does_not_retry_404_and_names_the_resource() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(404).insert_header("x-error-code", "RepoNotFound"))
            .mount(&server)
            .await;
        let client = RetryingClient::new(HttpPolicy::fast_for_tests()).unwrap();
        let url = server.uri();
        let response = client.send("dataset owner/ds", |c| c.get(&url)).await.unwrap();
        let err = error_for_status("dataset owner/ds", "needs read", response).await;
        assert!(matches!(err, PortError::NotFound(_)));
        assert!(err.to_string().contains("dataset owner/ds"));
        assert!(err.to_string().contains("RepoNotFound"));
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn gives_up_when_the_server_asks_for_too_long_a_wait() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("ratelimit", "\"api\";r=0;t=3600"))
            .mount(&server)
            .await;
        let client = RetryingClient::new(HttpPolicy::fast_for_tests()).unwrap();
        let url = server.uri();
        let response = client.send("x", |c| c.get(&url)).await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }
}
