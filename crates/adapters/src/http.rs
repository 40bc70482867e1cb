//! The one HTTP client every REST adapter uses: timeouts on every call,
//! capped exponential backoff with jitter, server-requested waits honoured
//! (`Retry-After` seconds, the Hub's `RateLimit: "...";r=0;t=N`, GitHub's
//! `x-ratelimit-remaining: 0` + `x-ratelimit-reset`), and log lines and error
//! messages that name the resource but never a credential.
//!
//! # What is resent, and when
//!
//! Every request is sent through a [`Call`] that states two things:
//!
//! - **[`Replay`]**: may the request be sent again when an attempt's outcome
//!   is *unknown* (timeout, dropped connection, 408/5xx)? GET, HEAD, OPTIONS,
//!   TRACE, PUT and DELETE are idempotent and are resent per the policy
//!   ([`Replay::ByMethod`]); a POST or PATCH is resent only when the caller
//!   vouches for it ([`Replay::Idempotent`]: an idempotency key, or a "set X
//!   to V" operation), or supplies a "did it already take effect?" check
//!   ([`RetryingClient::send_checked`]). A request that *provably* did not
//!   take effect is always retried, whatever its method: a connection that
//!   could not be established, and a rate-limit refusal (429, or 403 with
//!   `Retry-After` or `x-ratelimit-remaining: 0`).
//! - **[`UrlDisplay`]**: how the URL appears in log lines and errors. Never
//!   with its query string or user info; only scheme, host and port when the
//!   caller marks the URL secret ([`Call::secret_url`]: Slack, Discord and
//!   generic webhook URLs, whose path is the credential).

use std::collections::BTreeMap;
use std::error::Error as _;
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use retrain_core::ports::PortError;
use tracing::warn;
use url::Url;

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
    /// Longest server-requested wait (`Retry-After`, `RateLimit`,
    /// `x-ratelimit-reset`) we accept before giving up instead of sleeping.
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

/// Whether a request may be sent again after an attempt whose outcome is
/// unknown (timeout, dropped connection, 408 or 5xx answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Decided by the method: GET, HEAD, OPTIONS, TRACE, PUT and DELETE are
    /// idempotent (RFC 9110 §9.2.2) and resent per the policy; POST, PATCH
    /// and any other method are not.
    ByMethod,
    /// The caller vouches that sending the request twice has the effect of
    /// sending it once, whatever its method: it carries an idempotency key
    /// the server honours, or it sets a value ("PATCH the body to this
    /// text", "set variable X to V").
    Idempotent,
    /// Never resent once it may have reached the server.
    Never,
}

/// How a request's URL appears in the client's log lines and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UrlDisplay {
    /// Scheme, host, port and path: never the query string (presigned URLs,
    /// `?token=`) nor user info.
    #[default]
    Path,
    /// Scheme, host and port only: the URL itself is a credential (a Slack,
    /// Discord or generic webhook URL's path is its secret).
    OriginOnly,
}

/// One request's name and policy: what it is called in messages, whether it
/// may be resent, and how its URL may be shown.
#[derive(Debug, Clone, Copy)]
pub struct Call<'a> {
    what: &'a str,
    replay: Replay,
    url: UrlDisplay,
    /// Retries after the first attempt, when not the policy's.
    max_retries: Option<u32>,
}

impl<'a> Call<'a> {
    /// `what` names the resource in log lines and errors (e.g. "Space
    /// owner/name"); it must not contain a secret.
    pub fn new(what: &'a str, replay: Replay) -> Self {
        Self {
            what,
            replay,
            url: UrlDisplay::Path,
            max_retries: None,
        }
    }

    /// Send at most `1 + retries` times, whatever the policy says: for a
    /// request that a loop repeats anyway (a heartbeat), where a backoff
    /// longer than the loop's period would only make it late.
    pub fn retries(mut self, retries: u32) -> Self {
        self.max_retries = Some(retries);
        self
    }

    /// The URL is a secret: show only its scheme, host and port.
    pub fn secret_url(mut self) -> Self {
        self.url = UrlDisplay::OriginOnly;
        self
    }

    pub fn what(&self) -> &str {
        self.what
    }

    pub fn replay(&self) -> Replay {
        self.replay
    }

    pub fn url_display(&self) -> UrlDisplay {
        self.url
    }
}

/// The outcome of [`RetryingClient::send_checked`].
#[derive(Debug)]
pub enum Checked<T> {
    /// The server's answer to the last attempt, whatever its status.
    Response(Response),
    /// An attempt's outcome was lost, and the caller's check found that it
    /// had taken effect; `T` is what the check found (e.g. the comment id).
    AlreadyApplied(T),
}

/// Why an attempt did not produce a final answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request provably did not take effect: no connection could be
    /// made, or the server refused it for a rate limit. Always retryable.
    Refused,
    /// It may or may not have taken effect: timeout, dropped connection,
    /// 408 or 5xx. Resent only when the [`Replay`] choice (or a check) allows.
    Ambiguous,
}

/// A reqwest client with the retry policy applied by [`RetryingClient::send_with`].
#[derive(Debug, Clone)]
pub struct RetryingClient {
    client: reqwest::Client,
    policy: HttpPolicy,
    /// Which adapter this client serves (`hf`, `mlflow`…), the `adapter`
    /// label of [`retries`].
    adapter: &'static str,
}

/// Resends of one adapter for one reason, since the process started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryCount {
    /// The adapter ([`RetryingClient::new`]'s name).
    pub adapter: &'static str,
    /// Why the attempt was resent: `rate_limited`, `http_5xx`, `http_408`,
    /// `connect` (no connection), `timeout` or `transport` (the connection
    /// dropped).
    pub reason: &'static str,
    pub count: u64,
}

/// Resends by `(adapter, reason)`. Process-wide, like a process's CPU
/// time: the clients are built by the adapters, which do not know which
/// server (if any) exports them, and `retrain-server` runs one per process.
static RETRIES: std::sync::Mutex<BTreeMap<(&'static str, &'static str), u64>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Every HTTP resend this process's adapters made, by adapter and reason
/// (`retrain_http_retries_total` on `retrain-server`'s `/metrics`).
pub fn retries() -> Vec<RetryCount> {
    RETRIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(&(adapter, reason), &count)| RetryCount {
            adapter,
            reason,
            count,
        })
        .collect()
}

/// Count one resend (also by the adapters with a retry loop of their own).
pub(crate) fn count_retry(adapter: &'static str, reason: &'static str) {
    *RETRIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((adapter, reason))
        .or_insert(0) += 1;
}

/// The `reason` of [`RetryCount`] for an answer that is resent.
pub(crate) fn retry_reason(status: StatusCode, rate_limited: bool) -> &'static str {
    if rate_limited {
        "rate_limited"
    } else if status == StatusCode::REQUEST_TIMEOUT {
        "http_408"
    } else {
        "http_5xx"
    }
}

/// `check` argument of [`RetryingClient::send_with`]'s shared loop: none.
type NoCheck = fn() -> std::future::Ready<Result<Option<()>, PortError>>;

impl RetryingClient {
    /// A client for `adapter` (its name in [`retries`]: `hf`, `mlflow`…).
    pub fn new(adapter: &'static str, policy: HttpPolicy) -> Result<Self, AdapterError> {
        Self::with_redirect_policy(adapter, policy, reqwest::redirect::Policy::default())
    }

    /// Like [`RetryingClient::new`] with a custom redirect policy (the Hub's
    /// metadata probe must not follow absolute redirects to its CDN).
    pub fn with_redirect_policy(
        adapter: &'static str,
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
        Ok(Self {
            client,
            policy,
            adapter,
        })
    }

    pub fn inner(&self) -> &reqwest::Client {
        &self.client
    }

    pub fn policy(&self) -> &HttpPolicy {
        &self.policy
    }

    /// Shorthand for `send_with(&Call::new(what, Replay::Idempotent), build)`:
    /// the caller vouches that repeating the request is harmless, whatever
    /// its method. Kept for the adapters written before [`Call`] existed
    /// (Hub, S3, EC2, MLflow); new call sites use [`RetryingClient::send_with`],
    /// which makes the choice visible where the request is made.
    pub async fn send(
        &self,
        what: &str,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, PortError> {
        self.send_with(&Call::new(what, Replay::Idempotent), build)
            .await
    }

    /// Send the request built by `build` (called again for every attempt),
    /// retrying as `call` allows (see the module documentation). Returns the
    /// last response whatever its status once it is final, not resendable or
    /// retries are exhausted; transport failures become
    /// [`PortError::Transient`] naming `call.what()`.
    pub async fn send_with(
        &self,
        call: &Call<'_>,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
    ) -> Result<Response, PortError> {
        match self.run::<(), NoCheck, _>(call, &build, None).await? {
            Checked::Response(response) => Ok(response),
            Checked::AlreadyApplied(()) => unreachable!("no check was given"),
        }
    }

    /// Like [`RetryingClient::send_with`] for a request that is not
    /// idempotent but whose effect can be looked for: after an attempt whose
    /// outcome is unknown (timeout, dropped connection, 408/5xx), `check` is
    /// called (after the backoff delay, so the server had time to finish);
    /// `Some(t)` means the request took effect → [`Checked::AlreadyApplied`],
    /// `None` means it did not → it is sent again (within `max_retries`).
    /// The check also runs after the last attempt, so an effect is never
    /// reported as a failure.
    pub async fn send_checked<T, F, Fut>(
        &self,
        call: &Call<'_>,
        build: impl Fn(&reqwest::Client) -> RequestBuilder,
        check: F,
    ) -> Result<Checked<T>, PortError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, PortError>>,
    {
        self.run(call, &build, Some(&check)).await
    }

    async fn run<T, F, Fut>(
        &self,
        call: &Call<'_>,
        build: &impl Fn(&reqwest::Client) -> RequestBuilder,
        check: Option<&F>,
    ) -> Result<Checked<T>, PortError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, PortError>>,
    {
        let what = call.what;
        let mut attempt: u32 = 0;
        loop {
            let request = match build(&self.client).build() {
                Ok(request) => request,
                Err(e) => return Err(PortError::Transient(describe_transport(call, None, &e))),
            };
            let method = request.method().clone();
            let url = request.url().clone();
            let shown = display_url(&url, call.url);
            let result = self.client.execute(request).await;
            let (failure, server_wait, reason) = match &result {
                Ok(response) if is_rate_limited(response) => (
                    Failure::Refused,
                    server_requested_wait(response),
                    "rate_limited",
                ),
                Ok(response) if is_retryable_status(response.status()) => (
                    Failure::Ambiguous,
                    server_requested_wait(response),
                    retry_reason(response.status(), false),
                ),
                Ok(_) => return Ok(Checked::Response(result.expect("checked Ok"))),
                Err(e) if e.is_connect() => (Failure::Refused, None, "connect"),
                Err(e) if e.is_timeout() => (Failure::Ambiguous, None, "timeout"),
                Err(e) if e.is_request() => (Failure::Ambiguous, None, "transport"),
                Err(e) => {
                    return Err(PortError::Transient(describe_transport(
                        call,
                        Some(&url),
                        e,
                    )))
                }
            };
            let outcome = match &result {
                Ok(response) => format!("HTTP {}", response.status()),
                Err(e) => describe_transport(call, Some(&url), e),
            };
            let resendable = failure == Failure::Refused
                || check.is_some()
                || match call.replay {
                    Replay::ByMethod => is_idempotent(&method),
                    Replay::Idempotent => true,
                    Replay::Never => false,
                };
            let checked = failure == Failure::Ambiguous && check.is_some();
            if !resendable {
                warn!(%what, %method, url = %shown, outcome = %outcome, "not resending: the request may already have taken effect");
                return match result {
                    Ok(response) => Ok(Checked::Response(response)),
                    Err(_) => Err(PortError::Transient(format!(
                        "{outcome}; not resent: a {method} may already have taken effect"
                    ))),
                };
            }
            let too_long = server_wait.is_some_and(|w| w > self.policy.max_server_wait);
            if attempt >= call.max_retries.unwrap_or(self.policy.max_retries) || too_long {
                if checked {
                    if let Some(found) = self.look(call, &outcome, check).await? {
                        return Ok(Checked::AlreadyApplied(found));
                    }
                }
                return match result {
                    Ok(response) => Ok(Checked::Response(response)),
                    Err(_) => Err(PortError::Transient(format!(
                        "{outcome} (gave up after {} attempts)",
                        attempt + 1
                    ))),
                };
            }
            let delay = server_wait.unwrap_or_else(|| self.backoff(attempt));
            warn!(
                %what,
                %method,
                url = %shown,
                outcome = %outcome,
                attempt = attempt + 1,
                delay_ms = delay.as_millis() as u64,
                "retrying HTTP request"
            );
            count_retry(self.adapter, reason);
            drop(result);
            tokio::time::sleep(delay).await;
            if checked {
                if let Some(found) = self.look(call, &outcome, check).await? {
                    return Ok(Checked::AlreadyApplied(found));
                }
            }
            attempt += 1;
        }
    }

    /// Run the caller's "did it take effect?" check.
    async fn look<T, F, Fut>(
        &self,
        call: &Call<'_>,
        outcome: &str,
        check: Option<&F>,
    ) -> Result<Option<T>, PortError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, PortError>>,
    {
        let Some(check) = check else {
            return Ok(None);
        };
        let found = check().await.map_err(|e| {
            PortError::Transient(format!(
                "{outcome}; checking whether it took effect failed: {e}"
            ))
        })?;
        if found.is_some() {
            warn!(what = %call.what, outcome = %outcome, "the request's answer was lost but it took effect: not resending");
        }
        Ok(found)
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

/// GET, HEAD, OPTIONS, TRACE, PUT and DELETE (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// 408, 429 and 5xx are worth retrying.
pub fn is_retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
}

/// A rate-limit refusal: 429, or a 403 carrying `Retry-After` or
/// `x-ratelimit-remaining: 0` (GitHub's primary and secondary limits). Such a
/// request did not take effect, so it may be retried whatever its method.
/// A 403 without those headers is a permission error.
pub fn is_rate_limited(response: &Response) -> bool {
    rate_limited(response.status(), response.headers())
}

fn rate_limited(status: StatusCode, headers: &HeaderMap) -> bool {
    match status {
        StatusCode::TOO_MANY_REQUESTS => true,
        StatusCode::FORBIDDEN => {
            headers.contains_key(reqwest::header::RETRY_AFTER)
                || header_u64(headers, "x-ratelimit-remaining") == Some(0)
        }
        _ => false,
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// How `url` may appear in a log line or an error: never its query string
/// nor user info; only its origin when `display` says it is secret.
pub fn display_url(url: &Url, display: UrlDisplay) -> String {
    let origin = url.origin().ascii_serialization();
    match display {
        UrlDisplay::OriginOnly => origin,
        UrlDisplay::Path => {
            if url.cannot_be_a_base() {
                // `mailto:`-like URLs have no origin worth showing.
                return format!("{}:…", url.scheme());
            }
            format!("{origin}{}", url.path())
        }
    }
}

/// Replace every form of `url` that must not be shown in `text`: the full
/// URL, its query, and (when secret) its path.
fn scrub(text: &str, url: &Url, display: UrlDisplay) -> String {
    let mut out = text.replace(url.as_str(), &display_url(url, display));
    if let Some(query) = url.query().filter(|q| !q.is_empty()) {
        out = out.replace(query, "***");
    }
    if display == UrlDisplay::OriginOnly && url.path().len() > 1 {
        out = out.replace(url.path(), "/***");
    }
    if let Some(password) = url.password().filter(|p| !p.is_empty()) {
        out = out.replace(password, "***");
    }
    out
}

/// "`what`: timed out (https://host/path): cause", with the URL shown as
/// `call` allows and the cause scrubbed of any form of it.
fn describe_transport(
    call: &Call<'_>,
    request_url: Option<&Url>,
    error: &reqwest::Error,
) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_builder() {
        "invalid request"
    } else {
        "request failed"
    };
    // reqwest's own `Display` includes the full URL: never use it. The
    // innermost cause ("Connection refused (os error 111)") is what helps.
    let mut cause = None;
    let mut source = error.source();
    while let Some(inner) = source {
        cause = Some(inner.to_string());
        source = inner.source();
    }
    let urls: Vec<&Url> = request_url.into_iter().chain(error.url()).collect();
    let mut cause = cause.unwrap_or_default();
    for url in &urls {
        cause = scrub(&cause, url, call.url);
    }
    let shown = urls
        .first()
        .map(|u| format!(" ({})", display_url(u, call.url)))
        .unwrap_or_default();
    if cause.is_empty() {
        format!("{}: {kind}{shown}", call.what)
    } else {
        format!("{}: {kind}{shown}: {cause}", call.what)
    }
}

/// Server-requested wait: the Hub's `RateLimit: "api";r=0;t=N` (wait N+1 s),
/// else `Retry-After` in integer seconds (HTTP-dates are ignored, as the
/// Python client does), else GitHub's `x-ratelimit-remaining: 0` with
/// `x-ratelimit-reset` (UTC epoch seconds; wait until then + 1 s).
pub fn server_requested_wait(response: &Response) -> Option<Duration> {
    wait_from_headers(response.headers(), SystemTime::now())
}

fn wait_from_headers(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(rate) = headers.get("ratelimit").and_then(|v| v.to_str().ok()) {
        if let Some(wait) = parse_ratelimit_reset(rate) {
            return Some(wait);
        }
    }
    if let Some(seconds) = header_u64(headers, reqwest::header::RETRY_AFTER.as_str()) {
        return Some(Duration::from_secs(seconds));
    }
    if header_u64(headers, "x-ratelimit-remaining") == Some(0) {
        if let Some(reset) = header_u64(headers, "x-ratelimit-reset") {
            let reset = UNIX_EPOCH + Duration::from_secs(reset);
            let until = reset.duration_since(now).unwrap_or(Duration::ZERO);
            return Some(until + Duration::from_secs(1));
        }
    }
    None
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

/// " (retry after 120s)" / " (quota resets at 2026-…Z)" for a rate-limit
/// refusal, from its headers.
fn rate_limit_detail(headers: &HeaderMap) -> String {
    if let Some(seconds) = header_u64(headers, reqwest::header::RETRY_AFTER.as_str()) {
        return format!(" (retry after {seconds}s)");
    }
    if header_u64(headers, "x-ratelimit-remaining") == Some(0) {
        if let Some(at) = header_u64(headers, "x-ratelimit-reset")
            .and_then(|r| i64::try_from(r).ok())
            .and_then(|r| chrono::DateTime::from_timestamp(r, 0))
        {
            let resource = headers
                .get("x-ratelimit-resource")
                .and_then(|v| v.to_str().ok())
                .map(|r| format!(" `{r}`"))
                .unwrap_or_default();
            return format!(
                " (quota{resource} resets at {})",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
        }
    }
    String::new()
}

/// Map a non-success response to a `PortError` that names `what` and, for
/// 401/403, the permission that is likely missing. A rate-limit refusal
/// (see [`is_rate_limited`], or a 403 whose message says "rate limit") is
/// `Transient`, never a permission error. The body is included only as a
/// short excerpt (servers do not echo our Authorization header).
pub async fn error_for_status(what: &str, permission_hint: &str, response: Response) -> PortError {
    let status = response.status();
    let headers = response.headers().clone();
    let error_code = headers
        .get("x-error-code")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.text().await.unwrap_or_default();
    let excerpt: String = body.chars().take(300).collect();
    let detail = match error_code {
        Some(code) => format!(" [{code}]"),
        None => String::new(),
    };
    let rate_limit_message =
        status == StatusCode::FORBIDDEN && body.to_ascii_lowercase().contains("rate limit");
    if rate_limited(status, &headers) || rate_limit_message {
        return PortError::Transient(format!(
            "{what}: HTTP {status}{detail}: rate limited{}; try again later: {excerpt}",
            rate_limit_detail(&headers)
        ));
    }
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => PortError::Denied(format!(
            "{what}: HTTP {status}{detail}: access denied; {permission_hint}"
        )),
        StatusCode::NOT_FOUND => PortError::NotFound(format!(
            "{what}: HTTP 404{detail}: not found (check the name, and that the token can see it if it is private)"
        )),
        s if is_retryable_status(s) => {
            PortError::Transient(format!("{what}: HTTP {status}{detail}: {excerpt}"))
        }
        _ => PortError::Failed(format!("{what}: HTTP {status}{detail}: {excerpt}")),
    }
}

/// The body of `response`, refused once it grows over `limit` bytes (read
/// chunk by chunk, so an endless or huge body is never buffered whole).
pub async fn read_limited(
    what: &str,
    mut response: Response,
    limit: usize,
) -> Result<Vec<u8>, PortError> {
    let mut body = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(PortError::InvalidResponse(format!(
                        "{what}: response body is larger than {limit} bytes"
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(PortError::Transient(format!(
                    "{what}: reading the response body failed: {}",
                    if e.is_timeout() {
                        "timed out"
                    } else {
                        "connection error"
                    }
                )))
            }
        }
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
        // A name of its own: the counts are process-wide.
        let client = RetryingClient::new("counted", HttpPolicy::fast_for_tests()).unwrap();
        let started = std::time::Instant::now();
        let url = server.uri();
        let response = client.send("test", |c| c.get(&url)).await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "Retry-After honoured"
        );
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
        let counted: Vec<_> = retries()
            .into_iter()
            .filter(|r| r.adapter == "counted")
            .map(|r| (r.reason, r.count))
            .collect();
        assert_eq!(counted, vec![("http_5xx", 1), ("rate_limited", 1)]);
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
        let client = RetryingClient::new("test", HttpPolicy::fast_for_tests()).unwrap();
        let url = server.uri();
        let response = client
            .send("dataset owner/ds", |c| c.get(&url))
            .await
            .unwrap();
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
            .respond_with(
                ResponseTemplate::new(429).insert_header("ratelimit", "\"api\";r=0;t=3600"),
            )
            .mount(&server)
            .await;
        let client = RetryingClient::new("test", HttpPolicy::fast_for_tests()).unwrap();
        let url = server.uri();
        let response = client.send("x", |c| c.get(&url)).await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    fn fast(max_retries: u32) -> HttpPolicy {
        HttpPolicy {
            max_retries,
            timeout: Duration::from_millis(400),
            ..HttpPolicy::fast_for_tests()
        }
    }

    /// A server that answers every `method` request 503.
    async fn unavailable(method: &str) -> wiremock::MockServer {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::method(method))
            .respond_with(wiremock::ResponseTemplate::new(503))
            .mount(&server)
            .await;
        server
    }

    async fn count(server: &wiremock::MockServer) -> usize {
        server.received_requests().await.unwrap().len()
    }

    #[tokio::test]
    async fn a_call_with_its_own_retries_overrides_the_policy() {
        let server = unavailable("POST").await;
        let client = RetryingClient::new("test", fast(3)).unwrap();
        let url = server.uri();
        let once = Call::new("heartbeat", Replay::Idempotent).retries(0);
        let response = client.send_with(&once, |c| c.post(&url)).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(count(&server).await, 1, "no retry");
        let policy = Call::new("heartbeat", Replay::Idempotent);
        client.send_with(&policy, |c| c.post(&url)).await.unwrap();
        assert_eq!(count(&server).await, 1 + 4, "the policy's 3 retries");
    }

    #[tokio::test]
    async fn post_is_not_resent_after_an_unknown_outcome() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = unavailable("POST").await;
        let client = RetryingClient::new("test", fast(3)).unwrap();
        let url = server.uri();
        for replay in [Replay::ByMethod, Replay::Never] {
            let response = client
                .send_with(&Call::new("hook", replay), |c| c.post(&url))
                .await
                .unwrap();
            assert_eq!(response.status(), 503);
        }
        assert_eq!(count(&server).await, 2, "one attempt each");

        // A timeout: the error says it was not resent.
        let slow = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(2)))
            .mount(&slow)
            .await;
        let url = slow.uri();
        let err = client
            .send_with(&Call::new("hook", Replay::ByMethod), |c| c.post(&url))
            .await
            .unwrap_err();
        assert!(matches!(err, PortError::Transient(_)), "{err:?}");
        assert!(err.to_string().contains("timed out"), "{err}");
        assert!(err.to_string().contains("not resent"), "{err}");
        assert_eq!(count(&slow).await, 1);
    }

    #[tokio::test]
    async fn idempotent_methods_and_vouched_posts_are_resent() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(ResponseTemplate::new(502))
            .mount(&server)
            .await;
        let client = RetryingClient::new("test", fast(2)).unwrap();
        let url = server.uri();
        for m in [Method::GET, Method::PUT, Method::DELETE, Method::HEAD] {
            server.reset().await;
            Mock::given(method(m.as_str()))
                .respond_with(ResponseTemplate::new(502))
                .mount(&server)
                .await;
            let response = client
                .send_with(&Call::new("x", Replay::ByMethod), |c| {
                    c.request(m.clone(), &url)
                })
                .await
                .unwrap();
            assert_eq!(response.status(), 502);
            assert_eq!(count(&server).await, 3, "{m}: 1 + 2 retries");
        }
        for m in [Method::POST, Method::PATCH] {
            server.reset().await;
            Mock::given(method(m.as_str()))
                .respond_with(ResponseTemplate::new(502))
                .mount(&server)
                .await;
            client
                .send_with(&Call::new("x", Replay::Idempotent), |c| {
                    c.request(m.clone(), &url)
                })
                .await
                .unwrap();
            assert_eq!(count(&server).await, 3, "{m} vouched idempotent");
            server.reset().await;
            Mock::given(method(m.as_str()))
                .respond_with(ResponseTemplate::new(502))
                .mount(&server)
                .await;
            client
                .send_with(&Call::new("x", Replay::ByMethod), |c| {
                    c.request(m.clone(), &url)
                })
                .await
                .unwrap();
            assert_eq!(count(&server).await, 1, "{m} by method: never resent");
        }
    }

    #[tokio::test]
    async fn a_rate_limit_refusal_is_retried_even_for_a_post() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201))
            .mount(&server)
            .await;
        let client = RetryingClient::new("test", fast(3)).unwrap();
        let url = server.uri();
        let started = std::time::Instant::now();
        let response = client
            .send_with(&Call::new("x", Replay::Never), |c| c.post(&url))
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(count(&server).await, 2);
    }

    #[tokio::test]
    async fn github_403_with_remaining_0_waits_until_the_reset() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        let reset = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 1;
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(403)
                    .insert_header("x-ratelimit-limit", "5000")
                    .insert_header("x-ratelimit-remaining", "0")
                    .insert_header("x-ratelimit-used", "5000")
                    .insert_header("x-ratelimit-reset", reset.to_string().as_str())
                    .insert_header("x-ratelimit-resource", "core")
                    .set_body_string(r#"{"message":"API rate limit exceeded for user ID 1.","documentation_url":"https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"}"#),
            )
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        let client = RetryingClient::new("test", fast(3)).unwrap();
        let url = server.uri();
        let started = std::time::Instant::now();
        let response = client
            .send_with(&Call::new("x", Replay::ByMethod), |c| c.get(&url))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert_eq!(count(&server).await, 2);
    }

    #[tokio::test]
    async fn a_403_without_rate_limit_headers_is_denied_at_once() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(403)
                    .insert_header("x-ratelimit-remaining", "4999")
                    .set_body_string(r#"{"message":"Resource not accessible by integration"}"#),
            )
            .mount(&server)
            .await;
        let client = RetryingClient::new("test", fast(3)).unwrap();
        let url = server.uri();
        let response = client
            .send_with(&Call::new("x", Replay::ByMethod), |c| c.get(&url))
            .await
            .unwrap();
        let err = error_for_status("repo a/b", "needs `issues: write`", response).await;
        assert!(matches!(err, PortError::Denied(_)), "{err:?}");
        assert!(err.to_string().contains("issues: write"), "{err}");
        assert_eq!(count(&server).await, 1);
    }

    #[tokio::test]
    async fn a_rate_limit_too_long_to_wait_is_transient_naming_the_reset() {
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(403)
                    .insert_header("x-ratelimit-remaining", "0")
                    .insert_header("x-ratelimit-reset", "4102444800")
                    .insert_header("x-ratelimit-resource", "core"),
            )
            .mount(&server)
            .await;
        let client = RetryingClient::new("test", fast(3)).unwrap();
        let url = server.uri();
        let response = client
            .send_with(&Call::new("x", Replay::ByMethod), |c| c.get(&url))
            .await
            .unwrap();
        let err = error_for_status("repo a/b", "needs `issues: write`", response).await;
        assert!(matches!(err, PortError::Transient(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("quota `core` resets at 2100-01-01T00:00:00Z"),
            "{err}"
        );
        assert_eq!(count(&server).await, 1);
    }

    #[test]
    fn waits_from_github_headers() {
        use reqwest::header::{HeaderMap, HeaderValue};
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1010"));
        assert_eq!(wait_from_headers(&h, now), Some(Duration::from_secs(11)));
        // A reset already past: one second, not zero, not an error.
        h.insert("x-ratelimit-reset", HeaderValue::from_static("990"));
        assert_eq!(wait_from_headers(&h, now), Some(Duration::from_secs(1)));
        // `retry-after` wins; remaining > 0 means no wait.
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(wait_from_headers(&h, now), Some(Duration::from_secs(7)));
        h.remove("retry-after");
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("3"));
        assert_eq!(wait_from_headers(&h, now), None);
        assert!(!rate_limited(StatusCode::FORBIDDEN, &h));
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        assert!(rate_limited(StatusCode::FORBIDDEN, &h));
        assert!(rate_limited(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new()
        ));
        assert!(!rate_limited(StatusCode::FORBIDDEN, &HeaderMap::new()));
    }

    #[test]
    fn urls_are_shown_without_query_or_secret_path() {
        let url = Url::parse(
            "https://user:pw@bucket.s3.example.com:8443/key/x.json?X-Amz-Signature=abc&token=t0k",
        )
        .unwrap();
        assert_eq!(
            display_url(&url, UrlDisplay::Path),
            "https://bucket.s3.example.com:8443/key/x.json"
        );
        assert_eq!(
            display_url(&url, UrlDisplay::OriginOnly),
            "https://bucket.s3.example.com:8443"
        );
        let text = format!("error sending request for url ({url}): X-Amz-Signature=abc&token=t0k");
        for display in [UrlDisplay::Path, UrlDisplay::OriginOnly] {
            let clean = scrub(&text, &url, display);
            assert!(!clean.contains("t0k") && !clean.contains("abc"), "{clean}");
            assert!(!clean.contains("pw@"), "{clean}");
        }
        let clean = scrub(&text, &url, UrlDisplay::OriginOnly);
        assert!(!clean.contains("/key/x.json"), "{clean}");
    }

    #[tokio::test]
    async fn secret_urls_show_only_their_origin_in_transport_errors() {
        // Nothing listens on port 9 (discard): connection refused, retried.
        let client = RetryingClient::new("test", fast(1)).unwrap();
        let url = "http://127.0.0.1:9/services/T0/B0/SECRETPATH?token=SECRETQUERY";
        let err = client
            .send_with(
                &Call::new("webhook 127.0.0.1", Replay::ByMethod).secret_url(),
                |c| c.post(url),
            )
            .await
            .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(text.contains("http://127.0.0.1:9"), "{text}");
        assert!(
            text.contains("gave up after 2 attempts"),
            "refused: retried: {text}"
        );
        assert!(!text.contains("SECRET"), "{text}");
        // Not secret: the path is shown, never the query.
        let err = client
            .send_with(&Call::new("object", Replay::ByMethod), |c| c.get(url))
            .await
            .unwrap_err();
        let text = format!("{err} {err:?}");
        assert!(text.contains("/services/T0/B0/SECRETPATH"), "{text}");
        assert!(!text.contains("SECRETQUERY"), "{text}");
    }

    #[tokio::test]
    async fn a_checked_post_whose_answer_was_lost_is_adopted_not_resent() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use wiremock::matchers::method;
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201).set_delay(Duration::from_secs(2)))
            .mount(&server)
            .await;
        let client = RetryingClient::new("test", fast(3)).unwrap();
        let url = server.uri();
        let checks = AtomicUsize::new(0);
        let outcome = client
            .send_checked(
                &Call::new("comment", Replay::ByMethod),
                |c| c.post(&url),
                || {
                    checks.fetch_add(1, Ordering::SeqCst);
                    async { Ok::<_, PortError>(Some(42u64)) }
                },
            )
            .await
            .unwrap();
        assert!(
            matches!(outcome, Checked::AlreadyApplied(42)),
            "{outcome:?}"
        );
        assert_eq!(checks.load(Ordering::SeqCst), 1);
        assert_eq!(count(&server).await, 1);

        // The check finds nothing: sent again, until an answer arrives.
        server.reset().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(502))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(201))
            .mount(&server)
            .await;
        let outcome = client
            .send_checked(
                &Call::new("comment", Replay::ByMethod),
                |c| c.post(&url),
                || async { Ok::<Option<u64>, PortError>(None) },
            )
            .await
            .unwrap();
        match outcome {
            Checked::Response(r) => assert_eq!(r.status(), 201),
            other => panic!("{other:?}"),
        }
        assert_eq!(count(&server).await, 2);
    }
}
