//! `[server]`: the settings of `retrain-server`, in the same file as the
//! rest. Parsed and validated with everything else so that a bad value
//! stops the server at startup (exit 2) with the key named; the CLI reads
//! and ignores them.
//!
//! Seed 003's environment names are accepted: `PORT` (the port of `bind`),
//! `LOG_FILE`, `LOG_MAX_BYTES`, `LOG_BACKUP_COUNT`, `LOG_LEVEL`, and the
//! simple bearer token `RETRAIN_SERVER_TOKEN` (or `ORCHESTRATOR_TOKEN`);
//! every key is also settable as `RETRAIN_SERVER__<KEY>` (webhook secrets:
//! `RETRAIN_SERVER__WEBHOOKS__GITHUB_SECRET`, …).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, HumanDuration};

/// Identity of the simple token (`RETRAIN_SERVER_TOKEN`), recorded as who
/// triggered or approved.
pub const SIMPLE_TOKEN_NAME: &str = "server-token";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    #[serde(default = "default_bind")]
    bind: String,
    /// `PORT` (seed 003): replaces the port of `bind`.
    port: Option<u16>,
    #[serde(default = "default_body_limit")]
    body_limit: u64,
    #[serde(default = "default_request_timeout")]
    request_timeout: HumanDuration,
    #[serde(default = "default_shutdown_timeout")]
    shutdown_timeout: HumanDuration,
    schedule: Option<RawSchedule>,
    artifacts_dir: Option<PathBuf>,
    #[serde(default = "default_artifact_max_bytes")]
    artifact_max_bytes: u64,
    log_file: Option<PathBuf>,
    #[serde(default = "default_log_max_bytes")]
    log_max_bytes: u64,
    #[serde(default = "default_log_backup_count")]
    log_backup_count: u32,
    #[serde(default = "default_log_level")]
    log_level: String,
    /// The simple token (`RETRAIN_SERVER_TOKEN` / `ORCHESTRATOR_TOKEN`).
    token: Option<SecretString>,
    #[serde(default)]
    tokens: Vec<RawToken>,
    #[serde(default)]
    webhooks: RawWebhooks,
    /// Whether `GET /metrics` needs a token with the `read` scope.
    #[serde(default)]
    metrics_require_auth: bool,
    #[serde(default = "default_worker_ttl")]
    worker_ttl: HumanDuration,
    #[serde(default = "default_heartbeat_interval")]
    heartbeat_interval: HumanDuration,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            bind: default_bind(),
            port: None,
            body_limit: default_body_limit(),
            request_timeout: default_request_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
            schedule: None,
            artifacts_dir: None,
            artifact_max_bytes: default_artifact_max_bytes(),
            log_file: None,
            log_max_bytes: default_log_max_bytes(),
            log_backup_count: default_log_backup_count(),
            log_level: default_log_level(),
            token: None,
            tokens: Vec::new(),
            webhooks: RawWebhooks::default(),
            metrics_require_auth: false,
            worker_ttl: default_worker_ttl(),
            heartbeat_interval: default_heartbeat_interval(),
        }
    }
}

fn default_worker_ttl() -> HumanDuration {
    HumanDuration::secs(60)
}
fn default_heartbeat_interval() -> HumanDuration {
    HumanDuration::secs(10)
}

fn default_bind() -> String {
    "127.0.0.1:8080".into()
}
fn default_body_limit() -> u64 {
    1024 * 1024
}
fn default_request_timeout() -> HumanDuration {
    HumanDuration::secs(30)
}
fn default_shutdown_timeout() -> HumanDuration {
    HumanDuration::secs(30)
}
fn default_artifact_max_bytes() -> u64 {
    1024 * 1024 * 1024
}
fn default_log_max_bytes() -> u64 {
    10 * 1024 * 1024
}
fn default_log_backup_count() -> u32 {
    5
}
fn default_log_level() -> String {
    "info".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    cron: String,
    #[serde(default = "default_timezone")]
    timezone: String,
    #[serde(default)]
    jitter: HumanDuration,
}

fn default_timezone() -> String {
    "UTC".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    /// The environment variable holding the token.
    env: String,
    scopes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhooks {
    huggingface_secret: Option<SecretString>,
    github_secret: Option<SecretString>,
    mlflow_secret: Option<SecretString>,
}

/// What a bearer token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Read runs, labels, events, metrics.
    Read,
    /// Start cycles (`POST /v1/runs`).
    Trigger,
    /// Approve or reject a waiting candidate.
    Approve,
    /// Roll a label's production model back.
    Rollback,
    /// Report results and upload artifacts (remote trainers).
    Worker,
    /// Everything.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Self::Read,
        Self::Trigger,
        Self::Approve,
        Self::Rollback,
        Self::Worker,
        Self::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Trigger => "trigger",
            Self::Approve => "approve",
            Self::Rollback => "rollback",
            Self::Worker => "worker",
            Self::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One bearer token the server accepts. `Debug` never shows the secret.
#[derive(Clone)]
pub struct ApiToken {
    /// The identity recorded for what this token does.
    pub name: String,
    pub secret: SecretString,
    pub scopes: BTreeSet<Scope>,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    /// Whether this token may act with `scope` (`admin` may do anything).
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin)
    }
}

/// `[server.schedule]`, carried as written; the schedule module parses the
/// cron expression and time zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleSettings {
    pub cron: String,
    pub timezone: String,
    pub jitter: Duration,
}

/// `[server.webhooks]`: one secret per source (`None`: that hook is off).
#[derive(Debug, Clone, Default)]
pub struct WebhookSecrets {
    pub huggingface_secret: Option<SecretString>,
    pub github_secret: Option<SecretString>,
    pub mlflow_secret: Option<SecretString>,
}

/// `[server]` logging: seed 003's `LOG_FILE` with size rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLogSettings {
    /// `None`: logs go to stderr only.
    pub file: Option<PathBuf>,
    pub max_bytes: u64,
    pub backup_count: u32,
    /// A `tracing` filter (`info`, `retrain=debug,info`…).
    pub level: String,
}

/// Validated `[server]`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub bind: SocketAddr,
    pub body_limit: usize,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub schedule: Option<ScheduleSettings>,
    /// Uploaded artifacts (`<dir>/<run>/<name>`); default `<state_dir>/artifacts`.
    pub artifacts_dir: PathBuf,
    pub artifact_max_bytes: u64,
    pub log: ServerLogSettings,
    /// Every accepted bearer token; empty: none configured (the server
    /// refuses to start without `--insecure-no-auth`).
    pub tokens: Vec<ApiToken>,
    pub webhooks: WebhookSecrets,
    pub metrics_require_auth: bool,
    /// A worker without a heartbeat for this long is stale and its job lost.
    pub worker_ttl: Duration,
    /// How often workers are told to send a heartbeat.
    pub heartbeat_interval: Duration,
}

/// Bounds that catch typos (a body limit of 10 bytes, a 0 s timeout).
const MIN_BODY_LIMIT: u64 = 1024;
const MIN_TOKEN_LEN: usize = 16;

pub(super) fn validate(
    raw: RawServer,
    state_dir: &std::path::Path,
    env: &[(String, String)],
    err: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ServerSettings, ConfigError> {
    let mut bind: SocketAddr = raw.bind.trim().parse().map_err(|_| {
        err(
            "server.bind",
            format!(
                "expected host:port with an IP address (e.g. 127.0.0.1:8080 or 0.0.0.0:8080), got {:?}",
                raw.bind
            ),
        )
    })?;
    if let Some(port) = raw.port {
        bind.set_port(port);
    }
    if raw.body_limit < MIN_BODY_LIMIT || raw.body_limit > 1024 * 1024 * 1024 {
        return Err(err(
            "server.body_limit",
            format!(
                "expected {MIN_BODY_LIMIT}..=1073741824 bytes, got {}",
                raw.body_limit
            ),
        ));
    }
    let body_limit = usize::try_from(raw.body_limit)
        .map_err(|_| err("server.body_limit", "too large for this platform".into()))?;
    for (key, value) in [
        ("server.request_timeout", raw.request_timeout.0),
        ("server.shutdown_timeout", raw.shutdown_timeout.0),
    ] {
        if value < Duration::from_secs(1) {
            return Err(err(key, "expected at least 1s".into()));
        }
    }
    if raw.heartbeat_interval.0 < Duration::from_secs(1) {
        return Err(err(
            "server.heartbeat_interval",
            "expected at least 1s".into(),
        ));
    }
    // One late or lost heartbeat must not declare a worker stale.
    if raw.worker_ttl.0 < 2 * raw.heartbeat_interval.0 {
        return Err(err(
            "server.worker_ttl",
            format!(
                "expected at least twice server.heartbeat_interval ({}s), got {}s",
                raw.heartbeat_interval.0.as_secs_f64(),
                raw.worker_ttl.0.as_secs_f64()
            ),
        ));
    }
    if raw.artifact_max_bytes == 0 {
        return Err(err(
            "server.artifact_max_bytes",
            "expected a size in bytes > 0".into(),
        ));
    }
    if raw.log_max_bytes < MIN_BODY_LIMIT {
        return Err(err(
            "server.log_max_bytes",
            format!("expected at least {MIN_BODY_LIMIT} bytes"),
        ));
    }
    if raw.log_level.trim().is_empty() {
        return Err(err(
            "server.log_level",
            "expected a level (error, warn, info, debug, trace) or a tracing filter".into(),
        ));
    }
    let schedule = match raw.schedule {
        None => None,
        Some(s) => {
            if s.cron.trim().is_empty() {
                return Err(err(
                    "server.schedule.cron",
                    "expected a cron expression (e.g. \"0 3 * * *\")".into(),
                ));
            }
            if s.timezone.trim().is_empty() {
                return Err(err(
                    "server.schedule.timezone",
                    "expected an IANA time zone (e.g. \"Europe/Paris\") or \"UTC\"".into(),
                ));
            }
            Some(ScheduleSettings {
                cron: s.cron,
                timezone: s.timezone,
                jitter: s.jitter.0,
            })
        }
    };

    let mut tokens = Vec::new();
    if let Some(secret) = raw.token {
        check_token_secret(&secret)
            .map_err(|e| err("server.token", format!("{e} (RETRAIN_SERVER_TOKEN)")))?;
        tokens.push(ApiToken {
            name: SIMPLE_TOKEN_NAME.into(),
            secret,
            scopes: Scope::ALL.into_iter().collect(),
        });
    }
    let mut names = BTreeSet::new();
    for (i, token) in raw.tokens.into_iter().enumerate() {
        let key = |k: &str| format!("server.tokens[{i}].{k}");
        let name = token.name.trim().to_owned();
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
        if !valid_name {
            return Err(err(
                &key("name"),
                format!("expected 1 to 64 characters of [A-Za-z0-9._@-], got {name:?}"),
            ));
        }
        if name == SIMPLE_TOKEN_NAME || !names.insert(name.clone()) {
            return Err(err(&key("name"), format!("{name:?} is used twice")));
        }
        let value = env
            .iter()
            .rev()
            .find(|(var, _)| *var == token.env)
            .map(|(_, value)| value.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                err(
                    &key("env"),
                    format!("environment variable {:?} is not set", token.env),
                )
            })?;
        let secret = SecretString::from(value);
        check_token_secret(&secret)
            .map_err(|e| err(&key("env"), format!("{e} (in {})", token.env)))?;
        if token.scopes.is_empty() {
            return Err(err(
                &key("scopes"),
                format!("expected at least one of {}", scope_list()),
            ));
        }
        let mut scopes = BTreeSet::new();
        for raw_scope in &token.scopes {
            let scope = Scope::parse(raw_scope).ok_or_else(|| {
                err(
                    &key("scopes"),
                    format!("unknown scope {raw_scope:?}; expected {}", scope_list()),
                )
            })?;
            scopes.insert(scope);
        }
        tokens.push(ApiToken {
            name,
            secret,
            scopes,
        });
    }
    // Two tokens with one secret would make the identity ambiguous.
    for (i, a) in tokens.iter().enumerate() {
        if tokens[i + 1..]
            .iter()
            .any(|b| b.secret.expose_secret() == a.secret.expose_secret())
        {
            return Err(err(
                "server.tokens",
                format!("token {:?} shares its secret with another token", a.name),
            ));
        }
    }

    let webhooks = WebhookSecrets {
        huggingface_secret: nonempty(raw.webhooks.huggingface_secret),
        github_secret: nonempty(raw.webhooks.github_secret),
        mlflow_secret: nonempty(raw.webhooks.mlflow_secret),
    };
    Ok(ServerSettings {
        bind,
        body_limit,
        request_timeout: raw.request_timeout.0,
        shutdown_timeout: raw.shutdown_timeout.0,
        schedule,
        artifacts_dir: raw
            .artifacts_dir
            .unwrap_or_else(|| state_dir.join("artifacts")),
        artifact_max_bytes: raw.artifact_max_bytes,
        log: ServerLogSettings {
            file: raw.log_file.filter(|p| !p.as_os_str().is_empty()),
            max_bytes: raw.log_max_bytes,
            backup_count: raw.log_backup_count,
            level: raw.log_level.trim().to_owned(),
        },
        tokens,
        webhooks,
        metrics_require_auth: raw.metrics_require_auth,
        worker_ttl: raw.worker_ttl.0,
        heartbeat_interval: raw.heartbeat_interval.0,
    })
}

fn nonempty(secret: Option<SecretString>) -> Option<SecretString> {
    secret.filter(|s| !s.expose_secret().is_empty())
}

fn scope_list() -> String {
    Scope::ALL.map(Scope::as_str).join(", ")
}

/// A guessable token is refused rather than accepted (without quoting it).
fn check_token_secret(secret: &SecretString) -> Result<(), String> {
    let value = secret.expose_secret();
    if value.trim() != value || value.chars().count() < MIN_TOKEN_LEN {
        return Err(format!(
            "expected a token of at least {MIN_TOKEN_LEN} characters without surrounding spaces (e.g. `openssl rand -hex 32`)"
        ));
    }
    Ok(())
}
