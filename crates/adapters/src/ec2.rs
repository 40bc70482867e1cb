//! EC2 instances as a lease (`LeaseProvider`): start before training, stop
//! after promotion on every path.
//!
//! Talks the EC2 Query API (version 2016-11-15: form-encoded `POST /`, SigV4
//! service `ec2`, XML answers) with quick-xml. The same client backs
//! `retrain infra start|stop|status` through [`Ec2LeaseProvider::start`],
//! [`Ec2LeaseProvider::stop`] and [`Ec2LeaseProvider::status`].

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use retrain_core::domain::Lease;
use retrain_core::ports::{LeasePlan, LeaseProvider, PortError};
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use url::Url;

use crate::aws::{AwsSettings, SigV4Signer};
use crate::error::AdapterError;
use crate::http::{is_retryable_status, HttpPolicy, RetryingClient};

/// Query API version all request/answer shapes here follow.
pub const EC2_API_VERSION: &str = "2016-11-15";
const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";

/// `InstanceStateName`, decided by the state code's low byte (AWS: mask the
/// high byte, it carries internal information).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
    ShuttingDown,
    Terminated,
    Stopping,
    Stopped,
    Unknown(String),
}

impl InstanceState {
    pub fn from_code(code: i64, name: &str) -> Self {
        match code & 0xFF {
            0 => Self::Pending,
            16 => Self::Running,
            32 => Self::ShuttingDown,
            48 => Self::Terminated,
            64 => Self::Stopping,
            80 => Self::Stopped,
            _ => match name {
                "pending" => Self::Pending,
                "running" => Self::Running,
                "shutting-down" => Self::ShuttingDown,
                "terminated" => Self::Terminated,
                "stopping" => Self::Stopping,
                "stopped" => Self::Stopped,
                other => Self::Unknown(other.to_owned()),
            },
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::ShuttingDown => "shutting-down",
            Self::Terminated => "terminated",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Unknown(name) => name,
        }
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One item of a StartInstances/StopInstances answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStateChange {
    pub instance_id: String,
    pub current: InstanceState,
    pub previous: InstanceState,
}

/// One instance of a DescribeInstances answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    pub instance_id: String,
    pub state: InstanceState,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
}

// ---- XML shapes (element names are botocore's locationNames) ----

#[derive(Debug, Deserialize)]
struct ItemSet<T> {
    #[serde(rename = "item", default = "Vec::new")]
    items: Vec<T>,
}

impl<T> Default for ItemSet<T> {
    fn default() -> Self {
        Self { items: Vec::new() }
    }
}

#[derive(Debug, Deserialize)]
struct StateXml {
    code: i64,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateChangeXml {
    instance_id: String,
    current_state: StateXml,
    previous_state: StateXml,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StateChangeResponseXml {
    #[serde(default)]
    instances_set: ItemSet<StateChangeXml>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InstanceXml {
    instance_id: String,
    instance_state: StateXml,
    #[serde(default)]
    ip_address: Option<String>,
    #[serde(default)]
    private_ip_address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReservationXml {
    #[serde(default)]
    instances_set: ItemSet<InstanceXml>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DescribeResponseXml {
    #[serde(default)]
    reservation_set: ItemSet<ReservationXml>,
    #[serde(default)]
    next_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ErrorResponseXml {
    #[serde(rename = "Errors")]
    errors: ErrorsXml,
}

#[derive(Debug, Deserialize)]
struct ErrorsXml {
    #[serde(rename = "Error", default)]
    error: Vec<ErrorXml>,
}

#[derive(Debug, Deserialize)]
struct ErrorXml {
    #[serde(rename = "Code")]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

/// An EC2 error answer (`<Response><Errors><Error><Code>…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

/// A small EC2 Query API client: the three calls a lease needs, plus
/// [`Ec2Client::call`] for anything else (tests use it for RunInstances).
#[derive(Debug, Clone)]
pub struct Ec2Client {
    http: RetryingClient,
    settings: AwsSettings,
    signer: SigV4Signer,
    endpoint: Url,
    region: String,
}

impl Ec2Client {
    pub fn new(settings: &AwsSettings, policy: HttpPolicy) -> Result<Self, AdapterError> {
        Ok(Self {
            http: RetryingClient::new("ec2", policy)?,
            signer: settings.signer("ec2"),
            endpoint: settings.ec2_endpoint()?,
            region: settings.region.clone(),
            settings: settings.clone(),
        })
    }

    /// The same client for another region (endpoint overrides are kept).
    pub fn with_region(&self, region: &str) -> Result<Self, AdapterError> {
        let settings = self.settings.clone().with_region(region);
        Ok(Self {
            http: self.http.clone(),
            signer: settings.signer("ec2"),
            endpoint: settings.ec2_endpoint()?,
            region: settings.region.clone(),
            settings,
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn endpoint(&self) -> &Url {
        &self.endpoint
    }

    /// Send `Action` with `params`; the raw XML of a 2xx answer, or the
    /// parsed EC2 error (`Ok(Err(..))`), or a transport/parse failure.
    pub async fn call(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<Result<String, Ec2ApiError>, PortError> {
        // Built in a block: the serializer is not Send and must not live
        // across an await.
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("Action", action);
            form.append_pair("Version", EC2_API_VERSION);
            for (k, v) in params {
                form.append_pair(k, v);
            }
            form.finish()
        };
        let what = format!("EC2 {action} in {}", self.region);
        // Signed per attempt: a retry never resends an earlier signature.
        let response = self
            .signer
            .send(
                &self.http,
                &what,
                reqwest::Method::POST,
                &self.endpoint,
                &[("content-type", FORM_CONTENT_TYPE)],
                body.as_bytes(),
            )
            .await?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| PortError::Transient(format!("{what}: reading the answer failed: {e}")))?;
        if status.is_success() {
            return Ok(Ok(text));
        }
        match quick_xml::de::from_str::<ErrorResponseXml>(&text) {
            Ok(parsed) if !parsed.errors.error.is_empty() => {
                let first = &parsed.errors.error[0];
                Ok(Err(Ec2ApiError {
                    status: status.as_u16(),
                    code: first.code.clone(),
                    message: first.message.clone(),
                }))
            }
            _ if is_retryable_status(status) => Err(PortError::Transient(format!(
                "{what}: HTTP {status} after retries"
            ))),
            _ => Err(PortError::Failed(format!(
                "{what}: HTTP {status}: {}",
                text.chars().take(300).collect::<String>()
            ))),
        }
    }

    fn map_error(&self, action: &str, ids: &[String], e: Ec2ApiError) -> PortError {
        let text = format!(
            "EC2 {action} of {} in {}: {}: {}",
            ids.join(", "),
            self.region,
            e.code,
            e.message
        );
        match e.code.as_str() {
            "InvalidInstanceID.NotFound" | "InvalidInstanceID.Malformed" => {
                PortError::NotFound(text)
            }
            "AuthFailure"
            | "UnauthorizedOperation"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "OptInRequired"
            | "Blocked" => PortError::Denied(format!(
                "{text} (check the AWS credentials and their ec2:{action} permission)"
            )),
            "RequestLimitExceeded" | "InternalError" | "Unavailable" | "ServiceUnavailable" => {
                PortError::Transient(text)
            }
            _ if is_retryable_status(
                reqwest::StatusCode::from_u16(e.status).unwrap_or(reqwest::StatusCode::BAD_REQUEST),
            ) =>
            {
                PortError::Transient(text)
            }
            _ => PortError::Failed(text),
        }
    }

    fn instance_params(ids: &[String]) -> Vec<(String, String)> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| (format!("InstanceId.{}", i + 1), id.clone()))
            .collect()
    }

    async fn state_change(
        &self,
        action: &str,
        ids: &[String],
    ) -> Result<Result<Vec<InstanceStateChange>, Ec2ApiError>, PortError> {
        let xml = match self.call(action, &Self::instance_params(ids)).await? {
            Ok(xml) => xml,
            Err(e) => return Ok(Err(e)),
        };
        let parsed: StateChangeResponseXml = quick_xml::de::from_str(&xml).map_err(|e| {
            PortError::InvalidResponse(format!(
                "EC2 {action} of {}: unexpected answer ({e})",
                ids.join(", ")
            ))
        })?;
        Ok(Ok(parsed
            .instances_set
            .items
            .into_iter()
            .map(|i| InstanceStateChange {
                instance_id: i.instance_id,
                current: InstanceState::from_code(i.current_state.code, &i.current_state.name),
                previous: InstanceState::from_code(i.previous_state.code, &i.previous_state.name),
            })
            .collect()))
    }

    pub async fn start_instances(
        &self,
        ids: &[String],
    ) -> Result<Vec<InstanceStateChange>, PortError> {
        self.state_change("StartInstances", ids)
            .await?
            .map_err(|e| self.map_error("StartInstances", ids, e))
    }

    pub async fn stop_instances(
        &self,
        ids: &[String],
    ) -> Result<Vec<InstanceStateChange>, PortError> {
        self.state_change("StopInstances", ids)
            .await?
            .map_err(|e| self.map_error("StopInstances", ids, e))
    }

    /// State and addresses of `ids` (all pages).
    pub async fn describe_instances(&self, ids: &[String]) -> Result<Vec<InstanceInfo>, PortError> {
        let mut out = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let mut params = Self::instance_params(ids);
            if let Some(token) = &next_token {
                params.push(("NextToken".into(), token.clone()));
            }
            let xml = self
                .call("DescribeInstances", &params)
                .await?
                .map_err(|e| self.map_error("DescribeInstances", ids, e))?;
            let parsed: DescribeResponseXml = quick_xml::de::from_str(&xml).map_err(|e| {
                PortError::InvalidResponse(format!(
                    "EC2 DescribeInstances of {}: unexpected answer ({e})",
                    ids.join(", ")
                ))
            })?;
            for reservation in parsed.reservation_set.items {
                for i in reservation.instances_set.items {
                    out.push(InstanceInfo {
                        state: InstanceState::from_code(
                            i.instance_state.code,
                            &i.instance_state.name,
                        ),
                        instance_id: i.instance_id,
                        public_ip: i.ip_address.filter(|s| !s.is_empty()),
                        private_ip: i.private_ip_address.filter(|s| !s.is_empty()),
                    });
                }
            }
            match parsed.next_token.filter(|t| !t.is_empty()) {
                Some(token) => next_token = Some(token),
                None => break,
            }
        }
        Ok(out)
    }
}

/// How the lease waits for instances: the acquire's `running` (and health)
/// wait, the wait for a transitional state to end before a start or stop
/// can be issued, and the release's retries.
#[derive(Debug, Clone)]
pub struct Ec2WaitSettings {
    /// First DescribeInstances / health poll interval.
    pub poll_interval: Duration,
    /// Deadline for the whole acquire: `running` and then a healthy `health_url`.
    pub running_timeout: Duration,
    /// Longest wait for instances to leave `pending` (before a stop) or
    /// `stopping` (before a start) after EC2 answered `IncorrectInstanceState`.
    pub transition_timeout: Duration,
    /// Cap of the poll backoff during such a wait and of the release's
    /// backoff (both start at their base and double).
    pub max_poll_interval: Duration,
    /// Attempts of the stop in `release` (and `infra stop`) when it fails
    /// transiently; every failed attempt is logged.
    pub release_attempts: u32,
    /// Pause after the first failed release attempt (doubles per attempt).
    pub release_backoff: Duration,
}

impl Default for Ec2WaitSettings {
    fn default() -> Self {
        // botocore's InstanceRunning waiter: every 15 s, 40 attempts. We poll
        // faster (starting takes ~30-60 s) and allow the same ten minutes.
        // Stopping can take minutes (OS shutdown); five are allowed.
        Self {
            poll_interval: Duration::from_secs(5),
            running_timeout: Duration::from_secs(600),
            transition_timeout: Duration::from_secs(300),
            max_poll_interval: Duration::from_secs(30),
            release_attempts: 5,
            release_backoff: Duration::from_secs(5),
        }
    }
}

/// A state change the lease asks for, with what EC2's states mean for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transition {
    Start,
    Stop,
}

impl Transition {
    fn action(self) -> &'static str {
        match self {
            Self::Start => "StartInstances",
            Self::Stop => "StopInstances",
        }
    }

    fn past(self) -> &'static str {
        match self {
            Self::Start => "started",
            Self::Stop => "stopped",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
        }
    }

    /// Already where the transition leads (or on its way there).
    fn settled(self, state: &InstanceState) -> bool {
        match self {
            Self::Start => matches!(state, InstanceState::Pending | InstanceState::Running),
            Self::Stop => matches!(
                state,
                InstanceState::Stopping
                    | InstanceState::Stopped
                    | InstanceState::ShuttingDown
                    | InstanceState::Terminated
            ),
        }
    }

    /// The state EC2 refuses the transition in until it ends
    /// (`IncorrectInstanceState`): wait it out, then ask again.
    fn blocking(self) -> InstanceState {
        match self {
            Self::Start => InstanceState::Stopping,
            Self::Stop => InstanceState::Pending,
        }
    }

    /// States the transition can never leave (a terminated instance does
    /// not start again).
    fn impossible(self, state: &InstanceState) -> bool {
        match self {
            Self::Start => matches!(
                state,
                InstanceState::ShuttingDown | InstanceState::Terminated
            ),
            Self::Stop => false,
        }
    }
}

fn state_list(described: &[InstanceInfo]) -> String {
    described
        .iter()
        .map(|i| format!("{}={}", i.instance_id, i.state))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The same error kind with another message.
fn with_message(error: &PortError, message: String) -> PortError {
    match error {
        PortError::Transient(_) => PortError::Transient(message),
        PortError::Denied(_) => PortError::Denied(message),
        PortError::NotFound(_) => PortError::NotFound(message),
        PortError::InvalidResponse(_) => PortError::InvalidResponse(message),
        PortError::Config(_) => PortError::Config(message),
        PortError::Failed(_) => PortError::Failed(message),
    }
}

/// `IncorrectInstanceState`: the instance is in a state the call cannot
/// leave from (stop while `pending`, start while `stopping`).
const INCORRECT_INSTANCE_STATE: &str = "IncorrectInstanceState";

/// `LeaseProvider` over a fixed set of EC2 instances.
#[derive(Debug, Clone)]
pub struct Ec2LeaseProvider {
    client: Ec2Client,
    instance_ids: Vec<String>,
    region: Option<String>,
    health_url: Option<String>,
    max: Duration,
    wait: Ec2WaitSettings,
    health: reqwest::Client,
}

impl Ec2LeaseProvider {
    /// `health_url` may contain `{public_ip}` / `{private_ip}` (of the first
    /// instance); a `region` different from the client's re-targets the
    /// client there (the lease config's region wins over `AWS_REGION`).
    pub fn new(
        client: Ec2Client,
        instance_ids: Vec<String>,
        region: Option<String>,
        health_url: Option<String>,
        max: Duration,
        wait: Ec2WaitSettings,
    ) -> Result<Self, AdapterError> {
        if instance_ids.is_empty() {
            return Err(AdapterError::config(
                "lease.ec2",
                "needs at least one instance id",
            ));
        }
        if let Some(bad) = instance_ids.iter().find(|id| !id.starts_with("i-")) {
            return Err(AdapterError::config(
                "lease.ec2",
                format!("`{bad}` is not an EC2 instance id (i-…)"),
            ));
        }
        let health = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| AdapterError::Unavailable(format!("cannot build HTTP client: {e}")))?;
        let client = match region.as_deref() {
            Some(r) if !r.is_empty() && r != client.region() => client.with_region(r)?,
            _ => client,
        };
        Ok(Self {
            region: Some(client.region().to_owned()),
            client,
            instance_ids,
            health_url,
            max,
            wait,
            health,
        })
    }

    pub fn client(&self) -> &Ec2Client {
        &self.client
    }

    pub fn instance_ids(&self) -> &[String] {
        &self.instance_ids
    }

    fn ids_of<'a>(&'a self, lease: &'a Lease) -> &'a [String] {
        if lease.resources.is_empty() {
            &self.instance_ids
        } else {
            &lease.resources
        }
    }

    /// `retrain infra start`: start the instances and wait until they are
    /// running (and healthy, with a health URL). Returns their final state.
    pub async fn start(&self) -> Result<Vec<InstanceInfo>, PortError> {
        self.start_and_wait(&self.instance_ids).await
    }

    /// `retrain infra stop`: stop the instances (idempotent), with the
    /// release's retries.
    pub async fn stop(&self) -> Result<Vec<InstanceStateChange>, PortError> {
        self.stop_with_retries(&self.instance_ids).await
    }

    /// `retrain infra status`: state and addresses of the instances.
    pub async fn status(&self) -> Result<Vec<InstanceInfo>, PortError> {
        self.client.describe_instances(&self.instance_ids).await
    }

    async fn start_and_wait(&self, ids: &[String]) -> Result<Vec<InstanceInfo>, PortError> {
        let changes = self.change_state(Transition::Start, ids).await?;
        let deadline = Instant::now() + self.wait.running_timeout;
        for c in &changes {
            info!(instance = %c.instance_id, from = %c.previous, to = %c.current, "EC2 instance starting");
        }
        let running = self.wait_running(ids, deadline).await?;
        if let Some(template) = &self.health_url {
            let url = fill_placeholders(template, running.first())?;
            self.wait_healthy(&url, deadline).await?;
        }
        Ok(running)
    }

    async fn wait_running(
        &self,
        ids: &[String],
        deadline: Instant,
    ) -> Result<Vec<InstanceInfo>, PortError> {
        loop {
            let described = match self.client.describe_instances(ids).await {
                Ok(d) => d,
                // Eventual consistency right after a start (botocore retries it too).
                Err(PortError::NotFound(m)) if Instant::now() < deadline => {
                    debug!(error = %m, "instance not visible yet");
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            for info in &described {
                if matches!(
                    info.state,
                    InstanceState::ShuttingDown
                        | InstanceState::Terminated
                        | InstanceState::Stopping
                ) {
                    return Err(PortError::Failed(format!(
                        "EC2 instance {} is {} while waiting for it to run",
                        info.instance_id, info.state
                    )));
                }
            }
            let all_running = ids.iter().all(|id| {
                described
                    .iter()
                    .any(|i| &i.instance_id == id && i.state == InstanceState::Running)
            });
            if all_running {
                // Keep the configured order so `public_ip` is the first id's.
                let mut ordered = Vec::with_capacity(ids.len());
                for id in ids {
                    if let Some(info) = described.iter().find(|i| &i.instance_id == id) {
                        ordered.push(info.clone());
                    }
                }
                return Ok(ordered);
            }
            if Instant::now() + self.wait.poll_interval > deadline {
                let states: Vec<String> = described
                    .iter()
                    .map(|i| format!("{}={}", i.instance_id, i.state))
                    .collect();
                return Err(PortError::Transient(format!(
                    "EC2 instances {} not running after {:?} ({})",
                    ids.join(", "),
                    self.wait.running_timeout,
                    states.join(", ")
                )));
            }
            tokio::time::sleep(self.wait.poll_interval).await;
        }
    }

    async fn wait_healthy(&self, url: &str, deadline: Instant) -> Result<(), PortError> {
        loop {
            // Never wait past the deadline on one unreachable host.
            let remaining = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            let last = match self
                .health
                .get(url)
                .timeout(remaining.min(Duration::from_secs(10)))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    info!(%url, "leased host is healthy");
                    return Ok(());
                }
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) if e.is_timeout() => "timed out".to_owned(),
                Err(e) if e.is_connect() => "connection refused or unreachable".to_owned(),
                Err(_) => "request failed".to_owned(),
            };
            if Instant::now() + self.wait.poll_interval > deadline {
                return Err(PortError::Transient(format!(
                    "health check {url} of EC2 instances {} not healthy within {:?}: {last}",
                    self.instance_ids.join(", "),
                    self.wait.running_timeout
                )));
            }
            tokio::time::sleep(self.wait.poll_interval).await;
        }
    }

    /// StartInstances or StopInstances, waiting out the state EC2 refuses it
    /// in: a stop of a `pending` instance waits until it left `pending`
    /// (normally `running`), a start of a `stopping` instance until it is
    /// `stopped`, polling DescribeInstances with a doubling interval for at
    /// most `transition_timeout`. Instances already where the transition
    /// leads count as done (an empty change list).
    async fn change_state(
        &self,
        transition: Transition,
        ids: &[String],
    ) -> Result<Vec<InstanceStateChange>, PortError> {
        let action = transition.action();
        let deadline = Instant::now() + self.wait.transition_timeout;
        // Refusals with nothing to wait for: one more try covers a state
        // change between the call and the DescribeInstances.
        let mut unexplained = 0;
        loop {
            let refusal = match self.client.state_change(action, ids).await? {
                Ok(changes) => return Ok(changes),
                Err(e) if e.code == INCORRECT_INSTANCE_STATE => e,
                Err(e) => return Err(self.client.map_error(action, ids, e)),
            };
            let described = self.client.describe_instances(ids).await?;
            if let Some(stuck) = described.iter().find(|i| transition.impossible(&i.state)) {
                return Err(PortError::Failed(format!(
                    "EC2 {action} of {} in {}: instance {} is {} and cannot {} ({}: {})",
                    ids.join(", "),
                    self.client.region(),
                    stuck.instance_id,
                    stuck.state,
                    transition.verb(),
                    refusal.code,
                    refusal.message
                )));
            }
            let is = |id: &String, f: &dyn Fn(&InstanceState) -> bool| {
                described
                    .iter()
                    .any(|i| &i.instance_id == id && f(&i.state))
            };
            if ids.iter().all(|id| is(id, &|s| transition.settled(s))) {
                info!(instances = %state_list(&described), action, "EC2 instances already there");
                return Ok(Vec::new());
            }
            let blocking = transition.blocking();
            let blocked: Vec<String> = ids
                .iter()
                .filter(|id| is(id, &|s| *s == blocking))
                .cloned()
                .collect();
            if blocked.is_empty() {
                unexplained += 1;
                if unexplained > 1 || Instant::now() >= deadline {
                    return Err(PortError::Failed(format!(
                        "EC2 {action} of {} in {}: {}: {} (states: {})",
                        ids.join(", "),
                        self.client.region(),
                        refusal.code,
                        refusal.message,
                        state_list(&described)
                    )));
                }
                debug!(instances = %state_list(&described), action, "IncorrectInstanceState without a transitional state; asking again");
                continue;
            }
            info!(
                instances = %blocked.join(", "),
                state = %blocking,
                action,
                "EC2 refused ({}); waiting for the instances to leave `{blocking}`",
                refusal.code
            );
            self.wait_while(&blocked, &blocking, transition, deadline)
                .await?;
        }
    }

    /// Poll DescribeInstances (interval doubling from `poll_interval` to
    /// `max_poll_interval`) until none of `ids` is in `state`.
    async fn wait_while(
        &self,
        ids: &[String],
        state: &InstanceState,
        transition: Transition,
        deadline: Instant,
    ) -> Result<Vec<InstanceInfo>, PortError> {
        let mut interval = self.wait.poll_interval;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let described = self.client.describe_instances(ids).await?;
                return Err(PortError::Transient(format!(
                    "EC2 instances {} in {} still `{state}` after {:?}, so they could not be {} ({})",
                    ids.join(", "),
                    self.client.region(),
                    self.wait.transition_timeout,
                    transition.past(),
                    state_list(&described)
                )));
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = interval.saturating_mul(2).min(self.wait.max_poll_interval);
            let described = self.client.describe_instances(ids).await?;
            if !described.iter().any(|i| &i.state == state) {
                debug!(instances = %state_list(&described), "transitional state over");
                return Ok(described);
            }
        }
    }

    /// The release's stop: [`Self::change_state`] retried on transient
    /// failures (`release_attempts`, doubling backoff), each failure logged.
    /// The final error names the instances that are still up.
    async fn stop_with_retries(
        &self,
        ids: &[String],
    ) -> Result<Vec<InstanceStateChange>, PortError> {
        let attempts = self.wait.release_attempts.max(1);
        let mut backoff = self.wait.release_backoff;
        let mut attempt = 1;
        loop {
            let error = match self.change_state(Transition::Stop, ids).await {
                Ok(changes) => {
                    for c in &changes {
                        info!(instance = %c.instance_id, from = %c.previous, to = %c.current, "EC2 instance stopping");
                    }
                    return Ok(changes);
                }
                Err(e) => e,
            };
            let retry = matches!(error, PortError::Transient(_)) && attempt < attempts;
            if retry {
                warn!(
                    instances = %ids.join(", "),
                    region = %self.client.region(),
                    attempt,
                    attempts,
                    retry_in_ms = backoff.as_millis() as u64,
                    error = %error,
                    "stopping EC2 instances failed; retrying"
                );
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2).min(self.wait.max_poll_interval);
                attempt += 1;
                continue;
            }
            error!(
                instances = %ids.join(", "),
                region = %self.client.region(),
                attempt,
                attempts,
                error = %error,
                "stopping EC2 instances failed; giving up (they may still be running and costing money)"
            );
            return Err(self.release_failure(ids, attempt, &error).await);
        }
    }

    /// The error of a release that gave up: which instances are still up
    /// (best effort: all of them when even DescribeInstances fails).
    async fn release_failure(&self, ids: &[String], attempts: u32, last: &PortError) -> PortError {
        let up = match self.client.describe_instances(ids).await {
            Ok(described) => {
                let up: Vec<String> = ids
                    .iter()
                    .filter(|id| {
                        !described
                            .iter()
                            .any(|i| &i.instance_id == *id && Transition::Stop.settled(&i.state))
                    })
                    .map(|id| match described.iter().find(|i| &i.instance_id == id) {
                        Some(i) => format!("{id} ({})", i.state),
                        None => id.clone(),
                    })
                    .collect();
                if up.is_empty() {
                    // Stopped meanwhile (e.g. by hand): still report the
                    // failure, naming every instance.
                    ids.to_vec()
                } else {
                    up
                }
            }
            Err(e) => {
                warn!(instances = %ids.join(", "), error = %e, "cannot read the instances' state after a failed stop");
                ids.to_vec()
            }
        };
        with_message(
            last,
            format!(
                "could not stop EC2 instances {} in {} after {attempts} attempt{}: {last}",
                up.join(", "),
                self.client.region(),
                if attempts == 1 { "" } else { "s" }
            ),
        )
    }
}

/// Replace `{public_ip}` / `{private_ip}` with the instance's addresses.
fn fill_placeholders(template: &str, instance: Option<&InstanceInfo>) -> Result<String, PortError> {
    let mut out = template.to_owned();
    for (key, value) in [
        ("{public_ip}", instance.and_then(|i| i.public_ip.clone())),
        ("{private_ip}", instance.and_then(|i| i.private_ip.clone())),
    ] {
        if out.contains(key) {
            let value = value.ok_or_else(|| {
                PortError::Config(format!(
                    "health URL {template} needs {key} but EC2 instance {} has none",
                    instance.map(|i| i.instance_id.as_str()).unwrap_or("?")
                ))
            })?;
            out = out.replace(key, &value);
        }
    }
    Ok(out)
}

#[async_trait]
impl LeaseProvider for Ec2LeaseProvider {
    fn plan(&self) -> LeasePlan {
        LeasePlan {
            provider: "ec2".into(),
            resources: self.instance_ids.clone(),
            region: self.region.clone(),
            max: self.max,
        }
    }

    async fn acquire(&self, mut lease: Lease) -> Result<Lease, PortError> {
        let ids = self.ids_of(&lease).to_vec();
        let running = self.start_and_wait(&ids).await?;
        let mut attributes = BTreeMap::new();
        if let Some(first) = running.first() {
            if let Some(ip) = &first.public_ip {
                attributes.insert("public_ip".to_owned(), ip.clone());
            }
            if let Some(ip) = &first.private_ip {
                attributes.insert("private_ip".to_owned(), ip.clone());
            }
        }
        if running.len() > 1 {
            for info in &running {
                if let Some(ip) = &info.public_ip {
                    attributes.insert(format!("public_ip.{}", info.instance_id), ip.clone());
                }
            }
        }
        lease.attributes.extend(attributes);
        Ok(lease)
    }

    async fn release(&self, lease: &Lease) -> Result<(), PortError> {
        let ids = self.ids_of(lease).to_vec();
        self.stop_with_retries(&ids).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_start_answer_from_moto() {
        let xml = r#"<StartInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15"><instancesSet><item>
  <instanceId>i-b3b01cb414235fa55</instanceId>
  <currentState><code>0</code><name>pending</name></currentState>
  <previousState><code>80</code><name>stopped</name></previousState>
</item></instancesSet><requestId>request-id</requestId></StartInstancesResponse>"#;
        let parsed: StateChangeResponseXml = quick_xml::de::from_str(xml).unwrap();
        assert_eq!(parsed.instances_set.items.len(), 1);
        assert_eq!(
            parsed.instances_set.items[0].instance_id,
            "i-b3b01cb414235fa55"
        );
        assert_eq!(parsed.instances_set.items[0].previous_state.code, 80);
    }

    #[test]
    fn parses_describe_with_empty_sets_and_masks_state_codes() {
        let xml = r#"<DescribeInstancesResponse xmlns="x"><reservationSet><item><reservationId>r-1</reservationId><groupSet/>
<instancesSet><item><instanceId>i-1</instanceId><instanceState><code>272</code><name>running</name></instanceState>
<groupSet/><ipAddress>1.2.3.4</ipAddress><privateIpAddress>10.0.0.1</privateIpAddress><tagSet/></item></instancesSet></item></reservationSet>
<requestId>x</requestId></DescribeInstancesResponse>"#;
        let parsed: DescribeResponseXml = quick_xml::de::from_str(xml).unwrap();
        let i = &parsed.reservation_set.items[0].instances_set.items[0];
        assert_eq!(
            InstanceState::from_code(i.instance_state.code, &i.instance_state.name),
            InstanceState::Running
        );
        assert_eq!(i.ip_address.as_deref(), Some("1.2.3.4"));
        let empty: DescribeResponseXml = quick_xml::de::from_str(
            "<DescribeInstancesResponse><reservationSet/></DescribeInstancesResponse>",
        )
        .unwrap();
        assert!(empty.reservation_set.items.is_empty());
    }

    #[test]
    fn parses_errors() {
        let xml = "<Response><Errors><Error><Code>InvalidInstanceID.NotFound</Code><Message>The instance ID 'i-1' does not exist</Message></Error></Errors><RequestID>x</RequestID></Response>";
        let parsed: ErrorResponseXml = quick_xml::de::from_str(xml).unwrap();
        assert_eq!(parsed.errors.error[0].code, "InvalidInstanceID.NotFound");
    }

    #[test]
    fn placeholders_need_an_address() {
        let info = InstanceInfo {
            instance_id: "i-1".into(),
            state: InstanceState::Running,
            public_ip: Some("1.2.3.4".into()),
            private_ip: None,
        };
        assert_eq!(
            fill_placeholders("http://{public_ip}:5000/health", Some(&info)).unwrap(),
            "http://1.2.3.4:5000/health"
        );
        assert!(fill_placeholders("http://{private_ip}/", Some(&info)).is_err());
    }
}
