//! Layered configuration (§6): `retrain.toml` < the seed's env names <
//! `RETRAIN_*` env vars < command-line flags, merged with figment, then
//! validated into typed [`Settings`]. Every error names where the value came
//! from (file or env var), the key, and what was expected.

mod duration;
mod github_trigger;
mod label_defaults;
mod paths;
mod seed_env;
mod server;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use retrain_core::domain::{CorrectRatio, Label};
use retrain_core::gate::GatePolicy;
use retrain_core::machine::PromoteMode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

pub use github_trigger::GithubTrigger;

pub use duration::{format_duration, parse_duration, HumanDuration};
pub use seed_env::SeedEnv;
pub use server::{
    ApiToken, ScheduleSettings, Scope, ServerLogSettings, ServerSettings, WebhookSecrets,
    SIMPLE_TOKEN_NAME,
};

/// The default config file, relative to the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "retrain.toml";

/// A configuration problem. `Display` names the source, the key and what was
/// expected; never a secret value.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub key: Option<String>,
    pub message: String,
}

impl ConfigError {
    fn at(key: &str, origin: &str, expected: impl std::fmt::Display) -> Self {
        Self {
            key: Some(key.to_owned()),
            message: format!("{origin}: key `{key}`: {expected}"),
        }
    }
}

/// Where configuration comes from. `env` is passed in (not read here) so
/// tests and the server can control it.
#[derive(Debug, Clone, Default)]
pub struct ConfigSources {
    /// `--config`; an explicit path that does not exist is an error.
    pub file: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    /// Flag overrides as (dotted key, value).
    pub overrides: Vec<(String, Value)>,
}

impl ConfigSources {
    pub fn from_process(file: Option<PathBuf>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            overrides: Vec::new(),
        }
    }
}

/// Top-level keys that `RETRAIN_<KEY>` (without `__`) may set. Everything
/// else needs the `__` nesting, so the seed's `RETRAIN_<LABEL>_REPO` and the
/// trainer protocol's `RETRAIN_LABEL`, `RETRAIN_RESULT`... are never config.
const TOP_LEVEL_KEYS: &[&str] = &[
    "state",
    "state_dir",
    "dry_run",
    "max_parallel_labels",
    "lock_ttl",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    #[serde(default = "default_state")]
    state: SecretString,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    dry_run: bool,
    #[serde(default = "default_parallel")]
    max_parallel_labels: usize,
    #[serde(default = "default_lock_ttl")]
    lock_ttl: HumanDuration,
    counts: Option<RawCounts>,
    #[serde(default)]
    hub: RawHub,
    #[serde(default)]
    poll: RawPoll,
    prepare: Option<Value>,
    #[serde(default)]
    mlflow: RawMlflow,
    #[serde(default)]
    github: RawGithub,
    #[serde(default)]
    aws: RawAws,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    labels: BTreeMap<String, RawLabel>,
    /// Copied into `labels` before this is read (`label_defaults.rs`); here
    /// so that the error path's `Figment::extract` accepts the key.
    #[serde(default, rename = "label_defaults")]
    _label_defaults: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    server: server::RawServer,
}

fn default_state() -> SecretString {
    SecretString::from("sqlite://.retrain/state.db")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(".retrain")
}
fn default_parallel() -> usize {
    16
}
/// Short enough that a crashed holder on another machine frees its labels
/// within a minute (a dead holder on this host is noticed at once); the
/// engine renews every third of it (20 s).
fn default_lock_ttl() -> HumanDuration {
    HumanDuration::secs(60)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCounts {
    database: Option<SecretString>,
    query: Option<String>,
    #[serde(default = "one")]
    correct_ratio: f64,
    #[serde(default = "default_statement_timeout")]
    statement_timeout: HumanDuration,
    #[serde(default)]
    watermarks: crate::counts::WatermarkForm,
}

fn one() -> f64 {
    1.0
}
fn default_statement_timeout() -> HumanDuration {
    HumanDuration::secs(30)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHub {
    #[serde(default = "default_hub_endpoint")]
    endpoint: String,
    token: Option<SecretString>,
}

impl Default for RawHub {
    fn default() -> Self {
        Self {
            endpoint: default_hub_endpoint(),
            token: None,
        }
    }
}

fn default_hub_endpoint() -> String {
    "https://huggingface.co".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPoll {
    #[serde(default = "default_interval")]
    interval: HumanDuration,
    #[serde(default = "default_timeout")]
    timeout: HumanDuration,
    #[serde(default = "default_jitter")]
    jitter: f64,
    #[serde(default = "default_scout_max_gap")]
    scout_max_gap: HumanDuration,
}

impl Default for RawPoll {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            timeout: default_timeout(),
            jitter: default_jitter(),
            scout_max_gap: default_scout_max_gap(),
        }
    }
}

fn default_interval() -> HumanDuration {
    HumanDuration::secs(60)
}
fn default_timeout() -> HumanDuration {
    HumanDuration::secs(1800)
}
fn default_jitter() -> f64 {
    0.1
}
fn default_scout_max_gap() -> HumanDuration {
    HumanDuration(retrain_core::engine::DEFAULT_POLL_SCOUT_MAX_GAP)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMlflow {
    tracking_uri: Option<String>,
    token: Option<SecretString>,
    username: Option<String>,
    password: Option<SecretString>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGithub {
    #[serde(default = "default_github_api")]
    api_url: String,
    token: Option<SecretString>,
}

impl Default for RawGithub {
    fn default() -> Self {
        Self {
            api_url: default_github_api(),
            token: None,
        }
    }
}

fn default_github_api() -> String {
    "https://api.github.com".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAws {
    region: Option<String>,
    endpoint_url: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default = "default_http_timeout")]
    timeout: HumanDuration,
    #[serde(default = "default_retries")]
    max_retries: u32,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            timeout: default_http_timeout(),
            max_retries: default_retries(),
        }
    }
}

fn default_http_timeout() -> HumanDuration {
    HumanDuration::secs(30)
}
fn default_retries() -> u32 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLabel {
    threshold: Option<u64>,
    metadata: Option<String>,
    trainer: Option<Value>,
    counts: Option<String>,
    prepare: Option<Value>,
    correct_ratio: Option<f64>,
    gate: Option<Value>,
    registry: Option<Value>,
    lease: Option<Value>,
    #[serde(default)]
    notify: Vec<Value>,
    #[serde(default)]
    promote: Option<String>,
    #[serde(default = "default_attempts")]
    max_attempts: u32,
    #[serde(default = "default_step_retries")]
    max_step_retries: u32,
    train_timeout: Option<HumanDuration>,
    poll_interval: Option<HumanDuration>,
    poll_timeout: Option<HumanDuration>,
    approval_expires: Option<HumanDuration>,
    dataset_check: Option<Value>,
    /// `{ repo, branch, paths? }`, or `"none"` (opting out of a
    /// `[label_defaults]` trigger).
    github_trigger: Option<Value>,
}

fn default_attempts() -> u32 {
    2
}

fn default_step_retries() -> u32 {
    retrain_core::machine::DEFAULT_MAX_STEP_RETRIES
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `RunStore` URL (`sqlite://…`, `postgres://…`); may hold a password.
    pub state: SecretString,
    /// Where command jobs keep their logs and result files.
    pub state_dir: PathBuf,
    pub dry_run: bool,
    pub max_parallel_labels: usize,
    pub lock_ttl: Duration,
    pub counts: Option<CountsSettings>,
    pub hub: HubSettingsConfig,
    pub poll: PollSettings,
    pub mlflow: MlflowConfig,
    pub github: GithubConfig,
    pub aws: AwsConfig,
    pub http_timeout: Duration,
    pub http_max_retries: u32,
    pub labels: BTreeMap<Label, LabelSettings>,
    /// `[server]` (`retrain-server` only; the CLI ignores it).
    pub server: ServerSettings,
}

#[derive(Debug, Clone)]
pub struct CountsSettings {
    /// `postgres://…` or `sqlite://…`; may hold a password.
    pub database: SecretString,
    pub query: String,
    pub correct_ratio: CorrectRatio,
    pub statement_timeout: Duration,
    /// How the query takes the labels' watermarks.
    pub watermarks: crate::counts::WatermarkForm,
}

#[derive(Debug, Clone)]
pub struct HubSettingsConfig {
    pub endpoint: url::Url,
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct PollSettings {
    pub interval: Duration,
    pub timeout: Duration,
    pub jitter: f64,
    /// `poll.scout_max_gap`: see `EngineSettings::poll_scout_max_gap`.
    pub scout_max_gap: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct MlflowConfig {
    pub tracking_uri: Option<String>,
    pub token: Option<SecretString>,
    pub username: Option<String>,
    pub password: Option<SecretString>,
}

#[derive(Debug, Clone)]
pub struct GithubConfig {
    pub api_url: String,
    pub token: Option<SecretString>,
}

#[derive(Debug, Clone, Default)]
pub struct AwsConfig {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// A job: the prepare job or a trainer.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSpec {
    HfSpace {
        repo: String,
        factory_reboot: bool,
        /// Trainer only: wait until the Space is `RUNNING` (or errors).
        wait_running: Option<Duration>,
    },
    Command(CommandConfig),
    /// Trainer only: a GitHub Actions workflow dispatched per job.
    GithubWorkflow(GithubWorkflowConfig),
    /// Trainer only: a job in the run store's queue, run by a `retrain
    /// worker` that fits its request.
    Worker(WorkerTrainerConfig),
}

impl JobSpec {
    /// Key under which labels share one prepare job per cycle.
    pub fn key(&self) -> String {
        match self {
            Self::HfSpace { repo, .. } => format!("hf-space://{repo}"),
            Self::Command(c) => format!("command:{}", c.argv.join(" ")),
            Self::GithubWorkflow(w) => {
                format!("github-workflow://{}/{}@{}", w.repo, w.workflow, w.git_ref)
            }
            Self::Worker(w) => format!("worker:{}", w.command.join(" ")),
        }
    }
}

/// `trainer = { github_workflow = { repo, workflow, ref, inputs, timeout,
/// poll_interval } }`.
#[derive(Debug, Clone, PartialEq)]
pub struct GithubWorkflowConfig {
    /// `owner/name`.
    pub repo: String,
    /// File name in `.github/workflows/` or numeric id.
    pub workflow: String,
    /// Branch or tag (default `main`).
    pub git_ref: String,
    /// Extra `workflow_dispatch` inputs.
    pub inputs: BTreeMap<String, String>,
    /// The run's time limit (the label's `train_timeout` unless that is set).
    pub timeout: Option<Duration>,
    /// How often the run is read (default 15 s).
    pub poll_interval: Option<Duration>,
}

/// `trainer = { worker = { gpu, gpu_memory, memory, cpus, tags, command,
/// env, timeout, queue_timeout } }` (see `docs/adapters/worker.md`).
#[derive(Clone, PartialEq)]
pub struct WorkerTrainerConfig {
    /// What a worker must have to take the job.
    pub request: crate::store::ResourceRequest,
    /// Run on the worker as a §6 command trainer.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The job's time limit on the worker (default 2 h).
    pub timeout: Duration,
    /// How long the job may wait for a worker that fits (default 10 min).
    pub queue_timeout: Duration,
}

/// Env values may be credentials: only their names are shown.
impl std::fmt::Debug for WorkerTrainerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerTrainerConfig")
            .field("request", &self.request)
            .field("command", &self.command)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("queue_timeout", &self.queue_timeout)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandConfig {
    pub argv: Vec<String>,
    pub timeout: Option<Duration>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RegistrySpec {
    Mlflow {
        tracking_uri: String,
        model: String,
        alias: String,
        stages: bool,
    },
    Json {
        path: PathBuf,
        model: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LeaseSpec {
    pub ec2: Vec<String>,
    pub region: Option<String>,
    pub health_url: Option<String>,
    pub max: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyOn {
    Improved,
    Always,
}

#[derive(Debug, Clone)]
pub enum NotifySpec {
    Log,
    Github {
        repo: String,
        on: NotifyOn,
        issue: Option<u64>,
        pr_head: Option<String>,
        pr_base: String,
        /// `pr = "triggering"`: the pull request that triggered the workflow.
        pr_triggering: bool,
        /// Approve the triggering pull request when the model improved.
        approve: bool,
        auto_merge: bool,
        /// The model file committed with a PR (default `models/<label>.json`).
        pr_file: Option<String>,
        /// The App bot login (`github-actions[bot]`) that identifies our own
        /// comments when the token is an App installation token.
        app_login: Option<String>,
    },
    Webhook {
        url: SecretString,
        slack: bool,
        on: NotifyOn,
    },
}

#[derive(Debug, Clone)]
pub struct LabelSettings {
    pub label: Label,
    pub threshold: u64,
    /// `false`: triggered by the metadata alone (`counts = "none"` or no `[counts]`).
    pub counts: bool,
    pub correct_ratio: CorrectRatio,
    pub metadata: String,
    pub prepare: Option<JobSpec>,
    pub trainer: JobSpec,
    pub train_timeout: Duration,
    pub gate: Option<GatePolicy>,
    pub registry: Option<RegistrySpec>,
    pub lease: Option<LeaseSpec>,
    pub notify: Vec<NotifySpec>,
    pub promote: PromoteMode,
    pub max_attempts: u32,
    /// Cycles a transiently failing registry/notify/release step is retried.
    pub max_step_retries: u32,
    pub poll_interval: Duration,
    pub poll_timeout: Duration,
    /// `promote = "manual"`: how long a candidate may wait for a decision.
    pub approval_expires: Duration,
    /// The data gate run on every accepted dataset version before the lease
    /// and the training (its `timeout` always set).
    pub dataset_check: Option<CommandConfig>,
    /// Start this label's cycle on a GitHub push (`retrain-server`).
    pub github_trigger: Option<GithubTrigger>,
}

/// Default `timeout` of a `dataset_check` command.
pub const DEFAULT_DATASET_CHECK_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Settings plus what `config show` and the run manifest need. Its `Debug`
/// shows the settings (whose secrets are redacted) and not the raw layers,
/// which hold the secrets as written.
pub struct LoadedSettings {
    pub settings: Settings,
    /// The layers as given (file, environment, flags), before path
    /// resolution; [`LoadedSettings::effective`] adds the resolved paths.
    figment: Figment,
    /// Every relative path resolved to an absolute one (see `paths.rs`), as
    /// one nested object to merge over `figment`. Kept apart because the
    /// merge rebuilds every map on the merged paths (10,000 labels: ≈ 12 %
    /// of loading) and only `config show` and the config hash need it.
    resolved: Value,
    /// The config file used, if any.
    pub file: Option<PathBuf>,
}

impl std::fmt::Debug for LoadedSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedSettings")
            .field("settings", &self.settings)
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl LoadedSettings {
    /// The effective configuration (every layer, relative paths resolved),
    /// for `config show` (render with [`redacted_toml`]).
    pub fn effective(&self) -> Figment {
        self.figment
            .clone()
            .merge(Named::root(self.resolved.clone(), "resolved path".into()))
    }

    /// sha256 of the effective (redacted) configuration, for run manifests
    /// and `config check`. Computed on demand: rendering the configuration
    /// costs a third of loading it (10,000 labels: ≈ 0.6 s), and the
    /// commands that only read (`status`, `plan`) do not need it.
    pub fn config_hash(&self) -> String {
        use sha2::Digest;
        let redacted = redacted_toml(&self.effective()).unwrap_or_default();
        hex::encode(sha2::Sha256::digest(redacted.as_bytes()))
    }
}

/// Build the figment: file < seed env < `RETRAIN_*` env < flags.
pub fn figment(sources: &ConfigSources) -> Result<(Figment, Option<PathBuf>), ConfigError> {
    let mut figment = Figment::new();
    let file = match &sources.file {
        Some(path) => {
            if !path.exists() {
                return Err(ConfigError {
                    key: None,
                    message: format!("config file {} does not exist", path.display()),
                });
            }
            Some(path.clone())
        }
        None => {
            let default = PathBuf::from(DEFAULT_CONFIG_FILE);
            default.exists().then_some(default)
        }
    };
    if let Some(path) = &file {
        figment = figment.merge(Toml::file_exact(path));
    }
    // One provider per variable so errors can name the variable. figment's
    // own `Env` provider reads the process environment; passing ours in keeps
    // tests hermetic.
    for entry in SeedEnv::entries(&sources.env)? {
        figment = figment.merge(Named::new(
            &entry.key,
            entry.value,
            format!("environment variable {}", entry.var),
        ));
    }
    for (var, value) in sources.env.iter().filter(|(k, _)| is_retrain_config_var(k)) {
        let dotted = var["RETRAIN_".len()..]
            .to_ascii_lowercase()
            .replace("__", ".");
        figment = figment.merge(Named::new(
            &dotted,
            env_value(value),
            format!("environment variable {var}"),
        ));
    }
    for (key, value) in &sources.overrides {
        figment = figment.merge(Named::new(key, value.clone(), "command-line flag".into()));
    }
    Ok((figment, file))
}

/// One key-value pair with a name for error messages ("environment variable X").
struct Named {
    inner: Serialized<Value>,
    name: String,
}

impl Named {
    fn new(key: &str, value: Value, name: String) -> Self {
        Self {
            inner: Serialized::default(key, value),
            name,
        }
    }

    /// A whole tree of values (keys nested as figment reads dotted keys).
    fn root(value: Value, name: String) -> Self {
        Self {
            inner: Serialized::defaults(value),
            name,
        }
    }
}

/// `(dotted key, value)` pairs as one nested object, to be merged in one
/// step: each merge into a figment rebuilds every map on the merged path
/// (figment's map coalesce re-inserts all their keys), so merging the
/// resolved paths of 10,000 labels one by one took minutes.
fn nest(pairs: Vec<(String, Value)>) -> Value {
    let mut root = serde_json::Map::new();
    for (key, value) in pairs {
        let mut parts: Vec<&str> = key.split('.').collect();
        let leaf = parts.pop().unwrap_or_default();
        let mut map = &mut root;
        for part in parts {
            let entry = map
                .entry(part)
                .or_insert_with(|| Value::Object(serde_json::Map::new()));
            if !entry.is_object() {
                *entry = Value::Object(serde_json::Map::new());
            }
            map = entry.as_object_mut().expect("an object: just made one");
        }
        map.insert(leaf.to_owned(), value);
    }
    Value::Object(root)
}

impl figment::Provider for Named {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(self.name.clone())
    }
    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        self.inner.data()
    }
}

/// Whether `RETRAIN_<X>` configures retrain (as opposed to the seed's
/// `RETRAIN_<LABEL>_REPO` or the trainer protocol's variables).
pub fn is_retrain_config_var(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("RETRAIN_") else {
        return false;
    };
    if rest.is_empty() || rest == "CONFIG" {
        return false;
    }
    if rest.contains("__") {
        return true;
    }
    TOP_LEVEL_KEYS.contains(&rest.to_ascii_lowercase().as_str())
}

/// Env values are typed the way TOML would read them: booleans, integers and
/// floats become numbers, everything else stays a string.
fn env_value(raw: &str) -> Value {
    let trimmed = raw.trim();
    if let Ok(b) = trimmed.parse::<bool>() {
        return Value::Bool(b);
    }
    if let Ok(i) = trimmed.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = trimmed.parse::<f64>() {
        if f.is_finite() && trimmed.contains('.') {
            return Value::from(f);
        }
    }
    Value::String(raw.to_owned())
}

/// Describe where `key` came from: the file, an env var or a flag.
fn origin(figment: &Figment, key: &str) -> String {
    let mut probe = key.to_owned();
    loop {
        if let Some(meta) = figment.find_metadata(&probe) {
            return match &meta.source {
                Some(figment::Source::File(path)) => path.display().to_string(),
                _ => meta.name.to_string(),
            };
        }
        match probe.rfind('.') {
            Some(i) => probe.truncate(i),
            None => return "configuration".into(),
        }
    }
}

fn figment_error(figment: &Figment, error: figment::Error) -> ConfigError {
    let key = error.path.join(".");
    let source = error
        .metadata
        .as_ref()
        .map(|m| match &m.source {
            Some(figment::Source::File(p)) => p.display().to_string(),
            _ => m.name.to_string(),
        })
        .unwrap_or_else(|| origin(figment, &key));
    let kind = error.kind.to_string();
    if key.is_empty() {
        ConfigError {
            key: None,
            message: format!("{source}: {kind}"),
        }
    } else {
        ConfigError {
            key: Some(key.clone()),
            message: format!("{source}: key `{key}`: {kind}"),
        }
    }
}

/// Load and validate the configuration.
pub fn load(sources: &ConfigSources) -> Result<LoadedSettings, ConfigError> {
    let (figment, file) = figment(sources)?;
    // Merged once, for the extraction and the path resolution both
    // (`Figment::extract` and `find_value` each clone the whole tree).
    let mut merged = figment
        .find_value("")
        .map_err(|e| figment_error(&figment, e))?;
    let defaulted = label_defaults::apply(&mut merged, &figment)?;
    let raw: RawSettings = match merged.deserialize() {
        Ok(raw) => raw,
        // `extract` again, for its error: it names the provider (file, env
        // var, flag) of the value at fault, which a bare `Value` cannot.
        // The defaults are checked on their own before, so the value at
        // fault is one the figment has too; should it still extract, the
        // bare error stands.
        Err(error) => {
            return Err(match figment.extract::<RawSettings>() {
                Err(named) => figment_error(&figment, named),
                Ok(_) => figment_error(&figment, error),
            })
        }
    };
    let mut settings = validate(raw, &figment, &sources.env, &defaulted)?;
    let resolved = paths::resolve(
        &mut settings,
        &figment,
        &merged,
        file.as_deref(),
        &defaulted,
    )?;
    Ok(LoadedSettings {
        settings,
        figment,
        resolved: nest(resolved),
        file,
    })
}

fn validate(
    raw: RawSettings,
    figment: &Figment,
    env: &[(String, String)],
    defaulted: &label_defaults::Defaulted,
) -> Result<Settings, ConfigError> {
    let err = |key: &str, expected: String| ConfigError::at(key, &origin(figment, key), expected);
    let server = server::validate(raw.server, &raw.state_dir, env, &err)?;

    let state = raw.state.expose_secret().trim().to_owned();
    if !(state.starts_with("sqlite:")
        || state.starts_with("postgres://")
        || state.starts_with("postgresql://")
        || state.starts_with("postgresql+psycopg2://"))
    {
        return Err(err(
            "state",
            "expected a sqlite://path or postgres:// URL".into(),
        ));
    }
    if raw.max_parallel_labels == 0 || raw.max_parallel_labels > 4096 {
        return Err(err(
            "max_parallel_labels",
            format!("expected 1..=4096, got {}", raw.max_parallel_labels),
        ));
    }
    if raw.lock_ttl.0 < Duration::from_secs(1) {
        return Err(err("lock_ttl", "expected at least 1s".into()));
    }

    let counts = match raw.counts {
        None => None,
        Some(c) => {
            let database = c.database.ok_or_else(|| {
                err(
                    "counts.database",
                    "missing: set it in [counts] or via DATABASE_URL".into(),
                )
            })?;
            let db = database.expose_secret();
            if !(db.starts_with("sqlite:")
                || db.starts_with("postgres://")
                || db.starts_with("postgresql://")
                || db.starts_with("postgresql+psycopg2://"))
            {
                return Err(err(
                    "counts.database",
                    "expected a sqlite:// or postgres:// URL (postgresql+psycopg2:// is accepted)"
                        .into(),
                ));
            }
            let query = c.query.filter(|q| !q.trim().is_empty()).ok_or_else(|| {
                err(
                    "counts.query",
                    "missing: the SQL returning `label, misclassified, correct` with the watermark as $1 (or RETRAIN_COUNTS__QUERY)".into(),
                )
            })?;
            let correct_ratio =
                CorrectRatio::new(c.correct_ratio).map_err(|e| err("counts.correct_ratio", e))?;
            Some(CountsSettings {
                database,
                query,
                correct_ratio,
                statement_timeout: c.statement_timeout.0,
                watermarks: c.watermarks,
            })
        }
    };

    let endpoint = url::Url::parse(raw.hub.endpoint.trim_end_matches('/'))
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| {
            err(
                "hub.endpoint",
                format!("expected an http(s) URL, got {:?}", raw.hub.endpoint),
            )
        })?;

    if raw.poll.interval.0.is_zero() {
        return Err(err("poll.interval", "expected a duration > 0".into()));
    }
    if !(0.0..=1.0).contains(&raw.poll.jitter) {
        return Err(err(
            "poll.jitter",
            "expected a fraction between 0 and 1".into(),
        ));
    }
    let poll = PollSettings {
        interval: raw.poll.interval.0,
        timeout: raw.poll.timeout.0,
        jitter: raw.poll.jitter,
        scout_max_gap: raw.poll.scout_max_gap.0,
    };

    let default_prepare = match &raw.prepare {
        None => None,
        Some(v) => parse_job(v, false).map_err(|e| err("prepare", e))?,
    };

    let mut labels = BTreeMap::new();
    for (name, label_raw) in raw.labels {
        let key = |k: &str| defaulted.key(&name, k);
        let label = Label::new(&name).map_err(|e| err(&format!("labels.{name}"), e.to_string()))?;
        let threshold = label_raw.threshold.ok_or_else(|| {
            err(
                &key("threshold"),
                format!("missing (or THRESHOLD_{})", label.env_name()),
            )
        })?;
        let metadata = label_raw
            .metadata
            .filter(|m| !m.trim().is_empty())
            .ok_or_else(|| {
                err(
                    &key("metadata"),
                    format!(
                        "missing: where dataset_metadata.json is published (or HF_HUB_METADATA_{})",
                        label.env_name()
                    ),
                )
            })?;
        check_metadata_location(&metadata).map_err(|e| err(&key("metadata"), e))?;
        let trainer_value = label_raw.trainer.ok_or_else(|| {
            err(
                &key("trainer"),
                format!("missing (or RETRAIN_{}_REPO)", label.env_name()),
            )
        })?;
        let trainer = parse_job(&trainer_value, true)
            .map_err(|e| err(&key("trainer"), e))?
            .ok_or_else(|| {
                err(
                    &key("trainer"),
                    "a label needs a trainer; \"none\" is not allowed".into(),
                )
            })?;
        let uses_counts = match label_raw.counts.as_deref() {
            None => counts.is_some(),
            Some("none") => false,
            Some("default") => {
                if counts.is_none() {
                    return Err(err(
                        &key("counts"),
                        "\"default\" needs a [counts] section".into(),
                    ));
                }
                true
            }
            Some(other) => {
                return Err(err(
                    &key("counts"),
                    format!("expected \"none\" or \"default\", got {other:?}"),
                ))
            }
        };
        let prepare = match &label_raw.prepare {
            Some(v) => parse_job(v, false).map_err(|e| err(&key("prepare"), e))?,
            None => default_prepare.clone(),
        };
        let correct_ratio = match label_raw.correct_ratio {
            Some(r) => CorrectRatio::new(r).map_err(|e| err(&key("correct_ratio"), e))?,
            None => counts.as_ref().map(|c| c.correct_ratio).unwrap_or_default(),
        };
        // `"none"`: what a label writes to opt out of a `[label_defaults]`
        // registry or lease.
        let registry = match &label_raw.registry {
            None => None,
            Some(Value::String(s)) if s == "none" => None,
            Some(v) => Some(
                parse_registry(v, raw.mlflow.tracking_uri.as_deref())
                    .map_err(|e| err(&key("registry"), e))?,
            ),
        };
        let gate = match &label_raw.gate {
            None if registry.is_some() => {
                return Err(err(
                    &key("gate"),
                    "missing: a label with a registry needs a gate policy (e.g. gate = { metrics = [{ name = \"dice\", direction = \"higher\" }] }) or gate = \"none\"".into(),
                ))
            }
            None => None,
            Some(Value::String(s)) if s == "none" => None,
            Some(v) => {
                let policy: GatePolicy = serde_json::from_value(v.clone()).map_err(|e| {
                    err(&key("gate"), format!("{e} (expected \"none\" or {{ require, metrics = [{{ name, direction, min_delta?, min_relative?, min?, max? }}], first_model? }})"))
                })?;
                if registry.is_none() {
                    return Err(err(
                        &key("registry"),
                        "missing: a gate compares against the production model in a registry; add registry = { json = \"path\", model = \"name\" } or { mlflow = \"http://…\", model = \"name\" }".into(),
                    ));
                }
                Some(policy)
            }
        };
        let lease = match &label_raw.lease {
            None => None,
            Some(Value::String(s)) if s == "none" => None,
            Some(v) => Some(parse_lease(v).map_err(|e| err(&key("lease"), e))?),
        };
        let mut notify = Vec::new();
        for (i, v) in label_raw.notify.iter().enumerate() {
            notify.push(parse_notify(v).map_err(|e| err(&key(&format!("notify[{i}]")), e))?);
        }
        let promote = match label_raw.promote.as_deref() {
            None | Some("auto") => PromoteMode::Auto,
            Some("manual") => PromoteMode::Manual,
            Some("disabled") | Some("off") => PromoteMode::Disabled,
            Some(other) => {
                return Err(err(
                    &key("promote"),
                    format!("expected \"auto\", \"manual\" or \"disabled\", got {other:?}"),
                ))
            }
        };
        if label_raw.max_attempts == 0 || label_raw.max_attempts > 10 {
            return Err(err(&key("max_attempts"), "expected 1..=10".into()));
        }
        if label_raw.max_step_retries == 0 || label_raw.max_step_retries > 1000 {
            return Err(err(&key("max_step_retries"), "expected 1..=1000".into()));
        }
        let approval_expires = match label_raw.approval_expires {
            None => retrain_core::machine::DEFAULT_APPROVAL_EXPIRES,
            Some(d) if d.0.is_zero() => {
                return Err(err(
                    &key("approval_expires"),
                    "expected a duration > 0 (e.g. \"7d\", \"36h\")".into(),
                ))
            }
            Some(d) => d.0,
        };
        let dataset_check = match &label_raw.dataset_check {
            None => None,
            Some(v) => parse_dataset_check(v).map_err(|e| err(&key("dataset_check"), e))?,
        };
        let trainer_timeout = match &trainer {
            JobSpec::Command(c) => c.timeout,
            JobSpec::HfSpace { wait_running, .. } => {
                wait_running.map(|w| w + Duration::from_secs(60))
            }
            JobSpec::GithubWorkflow(w) => w.timeout,
            // The engine's wait includes the time in the queue.
            JobSpec::Worker(w) => Some(w.timeout + w.queue_timeout),
        };
        let github_trigger = match &label_raw.github_trigger {
            None => None,
            Some(Value::String(s)) if s == "none" => None,
            Some(v) => Some(github_trigger::parse(v).map_err(|e| err(&key("github_trigger"), e))?),
        };
        let train_timeout = label_raw
            .train_timeout
            .map(|d| d.0)
            .or(trainer_timeout)
            .unwrap_or(Duration::from_secs(2 * 3600));
        labels.insert(
            label.clone(),
            LabelSettings {
                label,
                threshold,
                counts: uses_counts,
                correct_ratio,
                metadata,
                prepare,
                trainer,
                train_timeout,
                gate,
                registry,
                lease,
                notify,
                promote,
                max_attempts: label_raw.max_attempts,
                max_step_retries: label_raw.max_step_retries,
                poll_interval: label_raw
                    .poll_interval
                    .map(|d| d.0)
                    .unwrap_or(poll.interval),
                poll_timeout: label_raw.poll_timeout.map(|d| d.0).unwrap_or(poll.timeout),
                approval_expires,
                dataset_check,
                github_trigger,
            },
        );
    }

    Ok(Settings {
        state: raw.state,
        state_dir: raw.state_dir,
        dry_run: raw.dry_run,
        max_parallel_labels: raw.max_parallel_labels,
        lock_ttl: raw.lock_ttl.0,
        counts,
        hub: HubSettingsConfig {
            endpoint,
            token: raw.hub.token,
        },
        poll,
        mlflow: MlflowConfig {
            tracking_uri: raw.mlflow.tracking_uri,
            token: raw.mlflow.token,
            username: raw.mlflow.username,
            password: raw.mlflow.password,
        },
        github: GithubConfig {
            api_url: raw.github.api_url,
            token: raw.github.token,
        },
        aws: AwsConfig {
            region: raw.aws.region,
            endpoint_url: raw.aws.endpoint_url,
        },
        http_timeout: raw.http.timeout.0,
        http_max_retries: raw.http.max_retries,
        labels,
        server,
    })
}

fn check_metadata_location(location: &str) -> Result<(), String> {
    let ok = location.starts_with("file://")
        || location.starts_with("hf://datasets/")
        || location.starts_with("https://")
        || location.starts_with("http://")
        || location.starts_with("s3://")
        || !location.contains("://");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "unsupported location {location:?}: expected file://, a path, hf://datasets/…, https://…/resolve/… or s3://bucket/key"
        ))
    }
}

fn string_list(value: &Value, what: &str) -> Result<Vec<String>, String> {
    match value {
        Value::String(s) => Ok(s.split_whitespace().map(str::to_owned).collect()),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!("{what}: expected strings, got {other}")),
            })
            .collect(),
        other => Err(format!(
            "{what}: expected a string or a list of strings, got {other}"
        )),
    }
}

fn opt_duration(
    table: &serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<Duration>, String> {
    match table.get(key) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| Some(Duration::from_secs_f64(f)))
            .ok_or_else(|| format!("`{key}`: expected a non-negative duration")),
        Some(Value::String(s)) => parse_duration(s)
            .map(Some)
            .map_err(|e| format!("`{key}`: {e}")),
        Some(other) => Err(format!("`{key}`: expected a duration, got {other}")),
    }
}

fn check_keys(table: &serde_json::Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    for key in table.keys() {
        if !allowed.contains(&key.as_str()) {
            return Err(format!(
                "unknown key `{key}` (expected one of: {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

/// Parse a prepare job or trainer: `"none"`, `"hf-space://o/n"`, `"o/n"`,
/// `"command:prog args"`, `{ command = [...], timeout, env, workdir }` or
/// `{ hf_space = "o/n", factory_reboot, wait_running }`.
/// `dataset_check = { command = [...], timeout = "5m", env, workdir }` (or
/// `"command:…"`, or `"none"`): a local command, with a timeout (default
/// [`DEFAULT_DATASET_CHECK_TIMEOUT`]).
fn parse_dataset_check(value: &Value) -> Result<Option<CommandConfig>, String> {
    const EXPECTED: &str =
        "expected { command = [\"python\", \"check.py\"], timeout = \"5m\" } (a local command) or \"none\"";
    match value {
        Value::String(_) | Value::Object(_) => {}
        _ => return Err(EXPECTED.into()),
    }
    if let Value::Object(table) = value {
        if !table.contains_key("command") {
            return Err(format!("missing `command`: {EXPECTED}"));
        }
    }
    match parse_job(value, false)? {
        None => Ok(None),
        Some(JobSpec::Command(mut config)) => {
            config.timeout = Some(config.timeout.unwrap_or(DEFAULT_DATASET_CHECK_TIMEOUT));
            if config.timeout == Some(Duration::ZERO) {
                return Err("`timeout` must be greater than zero".into());
            }
            Ok(Some(config))
        }
        Some(JobSpec::HfSpace { .. } | JobSpec::GithubWorkflow(_) | JobSpec::Worker(_)) => {
            Err(format!("a dataset check runs locally: {EXPECTED}"))
        }
    }
}

pub fn parse_job(value: &Value, trainer: bool) -> Result<Option<JobSpec>, String> {
    match value {
        Value::String(s) => {
            let s = s.trim();
            if s == "none" {
                return Ok(None);
            }
            if let Some(cmd) = s.strip_prefix("command:") {
                let argv: Vec<String> = cmd.split_whitespace().map(str::to_owned).collect();
                if argv.is_empty() {
                    return Err("`command:` needs a program".into());
                }
                return Ok(Some(JobSpec::Command(CommandConfig {
                    argv,
                    timeout: None,
                    env: BTreeMap::new(),
                    workdir: None,
                })));
            }
            let repo = parse_space_repo(s)?;
            Ok(Some(JobSpec::HfSpace {
                repo,
                factory_reboot: false,
                wait_running: None,
            }))
        }
        Value::Object(table) => {
            if let Some(cmd) = table.get("command") {
                check_keys(table, &["command", "timeout", "env", "workdir"])?;
                let argv = string_list(cmd, "command")?;
                if argv.is_empty() {
                    return Err("`command` must not be empty".into());
                }
                let mut env = BTreeMap::new();
                if let Some(e) = table.get("env") {
                    let Value::Object(map) = e else {
                        return Err("`env` must be a table of strings".into());
                    };
                    for (k, v) in map {
                        let v = match v {
                            Value::String(s) => s.clone(),
                            Value::Number(n) => n.to_string(),
                            Value::Bool(b) => b.to_string(),
                            _ => return Err(format!("`env.{k}` must be a string")),
                        };
                        env.insert(k.clone(), v);
                    }
                }
                let workdir = match table.get("workdir") {
                    None => None,
                    Some(Value::String(s)) => Some(PathBuf::from(s)),
                    Some(_) => return Err("`workdir` must be a path string".into()),
                };
                return Ok(Some(JobSpec::Command(CommandConfig {
                    argv,
                    timeout: opt_duration(table, "timeout")?,
                    env,
                    workdir,
                })));
            }
            if let Some(workflow) = table.get("github_workflow") {
                check_keys(table, &["github_workflow"])?;
                if !trainer {
                    return Err("`github_workflow` runs trainers only; a prepare job is a command or a Space".into());
                }
                return parse_github_workflow(workflow).map(|w| Some(JobSpec::GithubWorkflow(w)));
            }
            if let Some(worker) = table.get("worker") {
                check_keys(table, &["worker"])?;
                if !trainer {
                    return Err(
                        "`worker` runs trainers only; a prepare job is a command or a Space".into(),
                    );
                }
                return parse_worker(worker).map(|w| Some(JobSpec::Worker(w)));
            }
            let space = table.get("hf_space").or_else(|| table.get("space"));
            if let Some(Value::String(space)) = space {
                check_keys(
                    table,
                    &["hf_space", "space", "factory_reboot", "wait_running"],
                )?;
                let factory_reboot = match table.get("factory_reboot") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err("`factory_reboot` must be true or false".into()),
                };
                let wait_running = opt_duration(table, "wait_running")?;
                if wait_running.is_some() && !trainer {
                    return Err("`wait_running` applies to trainers only".into());
                }
                return Ok(Some(JobSpec::HfSpace {
                    repo: parse_space_repo(space)?,
                    factory_reboot,
                    wait_running,
                }));
            }
            Err("expected { command = [...] }, { hf_space = \"owner/name\" }, { github_workflow = { repo = \"owner/name\", workflow = \"train.yml\" } } or { worker = { gpu = 1, command = [...] } }".into())
        }
        other => Err(format!(
            "expected \"none\", \"hf-space://owner/name\", \"command:…\" or a table, got {other}"
        )),
    }
}

/// `{ repo = "o/n", workflow = "train.yml", ref = "main", inputs = { … },
/// timeout = "2h", poll_interval = "15s" }`; errors name the inner key.
fn parse_github_workflow(value: &Value) -> Result<GithubWorkflowConfig, String> {
    use crate::github_workflow::{check_inputs, check_repo, check_workflow};
    const EXPECTED: &str =
        "expected github_workflow = { repo = \"owner/name\", workflow = \"train.yml\", ref = \"main\", inputs = { … }, timeout = \"2h\" }";
    let Value::Object(table) = value else {
        return Err(EXPECTED.into());
    };
    check_keys(
        table,
        &[
            "repo",
            "workflow",
            "ref",
            "inputs",
            "timeout",
            "poll_interval",
        ],
    )
    .map_err(|e| format!("github_workflow: {e}"))?;
    let text = |key: &str| -> Result<Option<String>, String> {
        match table.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.trim().to_owned())),
            Some(other) => Err(format!(
                "github_workflow: `{key}` must be a string, got {other}"
            )),
        }
    };
    let repo =
        text("repo")?.ok_or_else(|| format!("github_workflow: missing `repo`: {EXPECTED}"))?;
    check_repo(&repo).map_err(|e| format!("github_workflow: {e}"))?;
    let workflow = text("workflow")?
        .ok_or_else(|| format!("github_workflow: missing `workflow`: {EXPECTED}"))?;
    check_workflow(&workflow).map_err(|e| format!("github_workflow: {e}"))?;
    let git_ref = text("ref")?.unwrap_or_else(|| "main".to_owned());
    if git_ref.is_empty() || git_ref.chars().any(char::is_whitespace) {
        return Err(format!(
            "github_workflow: `ref` = {git_ref:?}: expected the branch or tag the workflow runs on"
        ));
    }
    let mut inputs = BTreeMap::new();
    match table.get("inputs") {
        None => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => {
                        return Err(format!(
                            "github_workflow: `inputs.{k}` must be a string, number or boolean, got {other}"
                        ))
                    }
                };
                inputs.insert(k.clone(), v);
            }
        }
        Some(_) => return Err("github_workflow: `inputs` must be a table of strings".into()),
    }
    check_inputs(&inputs).map_err(|e| format!("github_workflow: {e}"))?;
    let timeout = opt_duration(table, "timeout").map_err(|e| format!("github_workflow: {e}"))?;
    if timeout == Some(Duration::ZERO) {
        return Err("github_workflow: `timeout` must be greater than zero".into());
    }
    let poll_interval =
        opt_duration(table, "poll_interval").map_err(|e| format!("github_workflow: {e}"))?;
    if poll_interval.is_some_and(|p| p < Duration::from_secs(1)) {
        return Err("github_workflow: `poll_interval` must be at least 1s".into());
    }
    Ok(GithubWorkflowConfig {
        repo,
        workflow,
        git_ref,
        inputs,
        timeout,
        poll_interval,
    })
}

/// Default `timeout` of a worker job.
const DEFAULT_WORKER_TIMEOUT: Duration = Duration::from_secs(2 * 3600);
/// Default `queue_timeout` of a worker job.
const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(600);

/// `{ gpu = 1, gpu_memory = "24G", memory = "32G", cpus = 4, tags = ["a100"],
/// command = ["python", "train.py"], env = { … }, timeout = "4h",
/// queue_timeout = "10m" }`; errors name the inner key.
fn parse_worker(value: &Value) -> Result<WorkerTrainerConfig, String> {
    const EXPECTED: &str =
        "expected worker = { gpu = 1, gpu_memory = \"24G\", memory = \"32G\", cpus = 4, tags = [\"a100\"], command = [\"python\", \"train.py\"], timeout = \"4h\", queue_timeout = \"10m\" }";
    let Value::Object(table) = value else {
        return Err(EXPECTED.into());
    };
    let inner = |e: String| format!("worker: {e}");
    check_keys(
        table,
        &[
            "gpu",
            "gpu_memory",
            "memory",
            "cpus",
            "tags",
            "command",
            "env",
            "timeout",
            "queue_timeout",
        ],
    )
    .map_err(inner)?;
    let count = |key: &str| -> Result<Option<u32>, String> {
        match table.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| inner(format!("`{key}` must be a whole number ≥ 0, got {n}"))),
            Some(other) => Err(inner(format!(
                "`{key}` must be a whole number, got {other}"
            ))),
        }
    };
    let size = |key: &str| -> Result<Option<u64>, String> {
        match table.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => parse_size(s)
                .map(Some)
                .map_err(|e| inner(format!("`{key}`: {e}"))),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
                inner(format!(
                    "`{key}` must be a size such as \"24G\" or bytes, got {n}"
                ))
            }),
            Some(other) => Err(inner(format!(
                "`{key}` must be a size such as \"24G\", got {other}"
            ))),
        }
    };
    let command = match table.get("command") {
        None => return Err(inner(format!("missing `command`: {EXPECTED}"))),
        Some(v) => string_list(v, "command").map_err(inner)?,
    };
    if command.is_empty() || command[0].trim().is_empty() {
        return Err(inner("`command` must name a program".into()));
    }
    let tags = match table.get("tags") {
        None => Vec::new(),
        Some(v) => string_list(v, "tags").map_err(inner)?,
    };
    if let Some(bad) = tags.iter().find(|t| t.trim().is_empty() || t.contains(',')) {
        return Err(inner(format!(
            "`tags`: {bad:?} is not a tag (no empty tags or commas)"
        )));
    }
    let mut env = BTreeMap::new();
    match table.get("env") {
        None => {}
        Some(Value::Object(map)) => {
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return Err(inner(format!("`env.{k}` must be a string"))),
                };
                env.insert(k.clone(), v);
            }
        }
        Some(_) => return Err(inner("`env` must be a table of strings".into())),
    }
    let positive = |key: &str, default: Duration| -> Result<Duration, String> {
        match opt_duration(table, key).map_err(inner)? {
            None => Ok(default),
            Some(d) if d.is_zero() => Err(inner(format!("`{key}` must be greater than zero"))),
            Some(d) => Ok(d),
        }
    };
    Ok(WorkerTrainerConfig {
        request: crate::store::ResourceRequest {
            cpus: count("cpus")?,
            memory_bytes: size("memory")?,
            gpus: count("gpu")?,
            gpu_memory_bytes: size("gpu_memory")?,
            tags,
        },
        command,
        env,
        timeout: positive("timeout", DEFAULT_WORKER_TIMEOUT)?,
        queue_timeout: positive("queue_timeout", DEFAULT_QUEUE_TIMEOUT)?,
    })
}

/// Sizes in settings (`24G`, `512M`, `80GiB`, bytes; binary units) are read
/// as `retrain worker --resources` reads them: one parser.
pub use crate::worker_agent::resources::parse_size;

/// `hf-space://o/n`, `https://huggingface.co/spaces/o/n` or the seed's `o/n`.
pub fn parse_space_repo(raw: &str) -> Result<String, String> {
    let s = raw.trim().trim_end_matches('/');
    let repo = if let Some(rest) = s.strip_prefix("hf-space://") {
        rest
    } else if let Some(i) = s.find("/spaces/") {
        if s.starts_with("http://") || s.starts_with("https://") {
            &s[i + "/spaces/".len()..]
        } else {
            s
        }
    } else {
        s
    };
    let parts: Vec<&str> = repo.split('/').collect();
    let valid = parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        });
    if valid {
        Ok(repo.to_owned())
    } else {
        Err(format!(
            "{raw:?} is not a Space: expected hf-space://owner/name, owner/name or command:…"
        ))
    }
}

fn parse_registry(value: &Value, default_mlflow: Option<&str>) -> Result<RegistrySpec, String> {
    let Value::Object(table) = value else {
        return Err("expected { json = \"path\", model = \"name\" } or { mlflow = \"http://…\", model = \"name\", alias?, stages? }".into());
    };
    let model = match table.get("model") {
        Some(Value::String(m)) if !m.trim().is_empty() => m.clone(),
        _ => return Err("`model` (the registered model name) is required".into()),
    };
    if let Some(path) = table.get("json") {
        check_keys(table, &["json", "model"])?;
        let Value::String(path) = path else {
            return Err("`json` must be a file path".into());
        };
        return Ok(RegistrySpec::Json {
            path: PathBuf::from(path.strip_prefix("file://").unwrap_or(path)),
            model,
        });
    }
    if table.contains_key("mlflow") || default_mlflow.is_some() {
        check_keys(table, &["mlflow", "model", "alias", "stages"])?;
        let tracking_uri = match table.get("mlflow") {
            Some(Value::String(u)) if u != "default" => u.clone(),
            Some(Value::String(_)) | None => default_mlflow.map(str::to_owned).ok_or(
                "`mlflow` = \"default\" needs MLFLOW_TRACKING_URI or [mlflow] tracking_uri",
            )?,
            Some(_) => return Err("`mlflow` must be the tracking URI".into()),
        };
        if !(tracking_uri.starts_with("http://") || tracking_uri.starts_with("https://")) {
            return Err(format!(
                "`mlflow` must be an http(s) URL, got {tracking_uri:?}"
            ));
        }
        let alias = match table.get("alias") {
            None => "production".to_owned(),
            Some(Value::String(a)) if !a.is_empty() => {
                if a.eq_ignore_ascii_case("latest") {
                    return Err("`alias` \"latest\" is reserved by MLflow".into());
                }
                a.clone()
            }
            Some(_) => return Err("`alias` must be a non-empty string".into()),
        };
        let stages = match table.get("stages") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err("`stages` must be true or false".into()),
        };
        return Ok(RegistrySpec::Mlflow {
            tracking_uri,
            model,
            alias,
            stages,
        });
    }
    Err("expected `json = \"path\"` or `mlflow = \"http://…\"`".into())
}

fn parse_lease(value: &Value) -> Result<LeaseSpec, String> {
    let Value::Object(table) = value else {
        return Err("expected { ec2 = [\"i-…\"], region?, health_url?, max? }".into());
    };
    check_keys(table, &["ec2", "region", "health_url", "max"])?;
    let ec2 = match table.get("ec2") {
        Some(v) => string_list(v, "ec2")?,
        None => return Err("`ec2` (instance ids) is required".into()),
    };
    if ec2.is_empty() || ec2.iter().any(|id| !id.starts_with("i-")) {
        return Err("`ec2` must list instance ids such as \"i-0abc\"".into());
    }
    let region = match table.get("region") {
        None => None,
        Some(Value::String(r)) => Some(r.clone()),
        Some(_) => return Err("`region` must be a string".into()),
    };
    let health_url = match table.get("health_url") {
        None => None,
        Some(Value::String(u)) => Some(u.clone()),
        Some(_) => return Err("`health_url` must be a string".into()),
    };
    let max = opt_duration(table, "max")?.unwrap_or(Duration::from_secs(3 * 3600));
    Ok(LeaseSpec {
        ec2,
        region,
        health_url,
        max,
    })
}

fn parse_on(table: &serde_json::Map<String, Value>) -> Result<NotifyOn, String> {
    match table.get("on") {
        None => Ok(NotifyOn::Improved),
        Some(Value::String(s)) if s == "improved" => Ok(NotifyOn::Improved),
        Some(Value::String(s)) if s == "always" => Ok(NotifyOn::Always),
        Some(other) => Err(format!(
            "`on`: expected \"improved\" or \"always\", got {other}"
        )),
    }
}

fn parse_notify(value: &Value) -> Result<NotifySpec, String> {
    match value {
        Value::String(s) if s == "log" => Ok(NotifySpec::Log),
        Value::Object(table) if table.contains_key("log") => Ok(NotifySpec::Log),
        Value::Object(table) if table.contains_key("github") => {
            check_keys(
                table,
                &[
                    "github", "on", "issue", "pr_head", "pr_base", "pr", "approve", "auto_merge",
                    "pr_file", "app_login",
                ],
            )?;
            let repo = match table.get("github") {
                Some(Value::String(r)) if r.split('/').filter(|p| !p.is_empty()).count() == 2 => r.clone(),
                _ => return Err("`github` must be \"owner/repo\"".into()),
            };
            let issue = match table.get("issue") {
                None => None,
                Some(v) => Some(v.as_u64().ok_or("`issue` must be an issue/PR number")?),
            };
            let pr_head = match table.get("pr_head") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err("`pr_head` must be a branch name".into()),
            };
            let pr_triggering = match table.get("pr") {
                None => false,
                Some(Value::String(s)) if s == "triggering" => true,
                Some(other) => {
                    return Err(format!(
                        "`pr`: expected \"triggering\" (the pull request that triggered the workflow), got {other}"
                    ))
                }
            };
            let targets = [issue.is_some(), pr_head.is_some(), pr_triggering]
                .iter()
                .filter(|t| **t)
                .count();
            if targets == 0 {
                return Err("set `issue = N` (comment on an issue/PR), `pr_head = \"branch\"` (open/update a PR carrying the model file) or `pr = \"triggering\"` (act on the pull request that triggered the workflow)".into());
            }
            if targets > 1 {
                return Err("set only one of `issue`, `pr_head` and `pr`".into());
            }
            let pr_base = match table.get("pr_base") {
                None => "main".to_owned(),
                Some(Value::String(s)) if pr_head.is_some() => s.clone(),
                Some(Value::String(_)) => return Err("`pr_base` goes with `pr_head`".into()),
                Some(_) => return Err("`pr_base` must be a branch name".into()),
            };
            let flag = |key: &str| match table.get(key) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(format!("`{key}` must be true or false, got {other}")),
            };
            let approve = flag("approve")?;
            if approve && !pr_triggering {
                return Err("`approve` goes with `pr = \"triggering\"`".into());
            }
            let auto_merge = flag("auto_merge")?;
            if auto_merge && issue.is_some() {
                return Err("`auto_merge` goes with `pr_head` or `pr = \"triggering\"`".into());
            }
            let pr_file = match table.get("pr_file") {
                None => None,
                Some(Value::String(_)) if issue.is_some() => {
                    return Err("`pr_file` goes with `pr_head` or `pr = \"triggering\"`".into())
                }
                Some(Value::String(s)) => {
                    crate::github::check_pr_file(s)?;
                    Some(s.clone())
                }
                Some(_) => return Err("`pr_file` must be a path in the repository".into()),
            };
            let app_login = match table.get("app_login") {
                None => None,
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
                Some(_) => return Err("`app_login` must be the App's bot login, e.g. \"github-actions[bot]\"".into()),
            };
            // On the triggering PR the report is posted whatever the outcome
            // (a reject explains itself there), unless `on` says otherwise.
            let on = match (table.contains_key("on"), pr_triggering) {
                (false, true) => NotifyOn::Always,
                _ => parse_on(table)?,
            };
            Ok(NotifySpec::Github {
                repo,
                on,
                issue,
                pr_head,
                pr_base,
                pr_triggering,
                approve,
                auto_merge,
                pr_file,
                app_login,
            })
        }
        Value::Object(table) if table.contains_key("webhook") || table.contains_key("slack") => {
            check_keys(table, &["webhook", "slack", "on"])?;
            let (url, slack) = match (table.get("webhook"), table.get("slack")) {
                (Some(Value::String(u)), None) => (u.clone(), false),
                (None, Some(Value::String(u))) => (u.clone(), true),
                _ => return Err("set exactly one of `webhook = \"https://…\"` or `slack = \"https://hooks.slack.com/…\"`".into()),
            };
            if !(url.starts_with("https://") || url.starts_with("http://")) {
                return Err("the webhook URL must be http(s)".into());
            }
            Ok(NotifySpec::Webhook {
                url: SecretString::from(url),
                slack,
                on: parse_on(table)?,
            })
        }
        _ => Err("expected \"log\", { github = \"owner/repo\", … }, { webhook = \"https://…\" } or { slack = \"https://…\" }".into()),
    }
}

/// Key names whose values are secrets.
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("token")
        || k.contains("password")
        || k.contains("secret")
        || k == "webhook"
        || k == "slack"
}

/// Mask the password of a URL-looking string (`postgres://u:pw@h/db`).
pub fn mask_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => raw.to_owned(),
    }
}

fn redact(value: &mut figment::value::Value) {
    use figment::value::Value as V;
    match value {
        V::Dict(tag, dict) => {
            let tag = *tag;
            for (k, v) in dict.iter_mut() {
                if is_secret_key(k) {
                    *v = V::String(tag, "***".into());
                } else {
                    redact(v);
                }
            }
        }
        V::Array(_, items) => items.iter_mut().for_each(redact),
        V::String(_, s) => *s = mask_url(s),
        _ => {}
    }
}

/// The effective configuration as TOML with every secret replaced by `***`.
pub fn redacted_toml(figment: &Figment) -> Result<String, ConfigError> {
    let mut value: figment::value::Value =
        figment.extract().map_err(|e| figment_error(figment, e))?;
    redact(&mut value);
    toml::to_string_pretty(&value).map_err(|e| ConfigError {
        key: None,
        message: format!("cannot render configuration: {e}"),
    })
}

#[cfg(test)]
mod tests;
