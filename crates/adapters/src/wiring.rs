//! Turns validated [`Settings`] into adapters and an [`Engine`]. This is the
//! only place that knows which adapter serves which address scheme; the CLI
//! and the server both call it.

use std::sync::Arc;

use retrain_core::domain::{Label, LockOwner};
use retrain_core::engine::{Engine, EngineSettings, LabelBinding};
use retrain_core::machine::{LabelPlan, RunManifest, Trigger};
use retrain_core::ports::{
    CountSource, DatasetCheck, LeaseProvider, MetadataStore, ModelRegistry, Notifier, RunStore,
    SpaceController, Trainer,
};
use secrecy::ExposeSecret;

use crate::command::{CommandDatasetCheck, CommandSpace, CommandSpec, CommandTrainer};
use crate::error::AdapterError;
use crate::file_metadata::FileMetadataStore;
use crate::github_workflow::{GithubWorkflowSettings, GithubWorkflowTrainer};
use crate::hf::{HfMetadataStore, HfSpaceController, HfSpaceTrainer, HubClient, HubSettings};
use crate::http::HttpPolicy;
use crate::json_registry::JsonRegistry;
use crate::log_notifier::LogNotifier;
use crate::scrub::{url_secrets, Scrubber};
use crate::settings::{
    CommandConfig, GithubWorkflowConfig, JobSpec, LabelSettings, LeaseSpec, LoadedSettings,
    NotifyOn, NotifySpec, RegistrySpec, Settings,
};
use crate::store::{open_run_store, open_stores, StoreOptions, Stores};
use crate::worker_trainer::{RemoteJobs, WorkerTrainer};

/// Open the `RunStore` named by `state`; `migrate` applies pending migrations.
pub async fn open_store(
    settings: &Settings,
    migrate: bool,
) -> Result<Arc<dyn RunStore>, AdapterError> {
    open_run_store(
        settings.state.expose_secret(),
        StoreOptions {
            migrate,
            read_only: false,
        },
    )
    .await
}

/// Open the `RunStore` for reading only (`plan`, `status`, `runs`): never
/// creates or migrates anything. A SQLite file that does not exist yet is an
/// empty store, served from memory so that a plan on a fresh checkout works
/// and leaves no file behind.
pub async fn open_store_for_reading(
    settings: &Settings,
) -> Result<Arc<dyn RunStore>, AdapterError> {
    Ok(open_stores_for_reading(settings).await?.runs)
}

/// [`open_store_for_reading`] with the other stores on the same pool
/// (`retrain status` also reads the remote job queue).
pub async fn open_stores_for_reading(settings: &Settings) -> Result<Stores, AdapterError> {
    let url = settings.state.expose_secret();
    let missing_file = sqlite_path(url).is_some_and(|p| !std::path::Path::new(&p).exists());
    let opened = if missing_file {
        Err(AdapterError::NotInitialised(String::new()))
    } else {
        open_stores(
            url,
            StoreOptions {
                migrate: false,
                read_only: true,
            },
        )
        .await
    };
    match opened {
        Err(AdapterError::NotInitialised(_)) => {
            tracing::info!("the run store is not initialised yet: reading it as empty");
            open_stores("sqlite::memory:", StoreOptions::default()).await
        }
        other => other,
    }
}

/// The file of a `sqlite://path` / `sqlite:path` URL (not `:memory:`).
fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.contains(":memory:")).then(|| path.to_owned())
}

/// `retrain migrate`.
pub async fn migrate(settings: &Settings) -> Result<(), AdapterError> {
    crate::store::migrate(settings.state.expose_secret()).await
}

fn http_policy(settings: &Settings) -> HttpPolicy {
    HttpPolicy {
        timeout: settings.http_timeout,
        max_retries: settings.http_max_retries,
        ..HttpPolicy::default()
    }
}

fn command_spec(config: &CommandConfig) -> CommandSpec {
    CommandSpec {
        argv: config.argv.clone(),
        timeout: config.timeout,
        env: config.env.clone(),
        workdir: config.workdir.clone(),
    }
}

/// Lazily built shared clients, so a config without HF labels never builds one.
struct Clients<'a> {
    settings: &'a Settings,
    hub: Option<HubClient>,
    /// Scrubs job output quoted in errors (see [`job_scrubber`]).
    scrubber: Scrubber,
    /// The job queue of worker trainers (opened only when a label has one).
    jobs: Option<RemoteJobs>,
}

/// Every secret the configuration knows, so that no job output quoting one
/// (a trainer echoing a token, a stack trace with a database URL) reaches an
/// error or a report: the store and feedback database URLs (and their
/// passwords), the Hub, MLflow and GitHub tokens, the MLflow password,
/// webhook URLs and the AWS keys; plus the secret-named env vars.
fn job_scrubber(settings: &Settings) -> Scrubber {
    use secrecy::SecretString;
    let mut secrets: Vec<SecretString> = Vec::new();
    secrets.extend(url_secrets(settings.state.expose_secret()));
    if let Some(counts) = &settings.counts {
        secrets.extend(url_secrets(counts.database.expose_secret()));
    }
    secrets.extend(
        [
            &settings.hub.token,
            &settings.mlflow.token,
            &settings.mlflow.password,
            &settings.github.token,
        ]
        .into_iter()
        .flatten()
        .cloned(),
    );
    for label in settings.labels.values() {
        for notify in &label.notify {
            if let NotifySpec::Webhook { url, .. } = notify {
                secrets.extend(url_secrets(url.expose_secret()));
            }
        }
    }
    if let Ok(aws) = crate::aws::AwsSettings::from_env() {
        secrets.push(SecretString::from(aws.access_key_id.clone()));
        secrets.push(aws.secret_access_key.clone());
        secrets.extend(aws.session_token.clone());
    }
    Scrubber::new(secrets)
}

impl<'a> Clients<'a> {
    fn hub(&mut self) -> Result<HubClient, AdapterError> {
        if let Some(client) = &self.hub {
            return Ok(client.clone());
        }
        let client = HubClient::new(HubSettings {
            endpoint: self.settings.hub.endpoint.clone(),
            token: self.settings.hub.token.clone(),
            policy: http_policy(self.settings),
        })?;
        self.hub = Some(client.clone());
        Ok(client)
    }
}

fn job_dir(settings: &Settings) -> std::path::PathBuf {
    settings.state_dir.clone()
}

fn prepare_controller(
    clients: &mut Clients<'_>,
    spec: &JobSpec,
) -> Result<Arc<dyn SpaceController>, AdapterError> {
    Ok(match spec {
        JobSpec::HfSpace {
            repo,
            factory_reboot,
            ..
        } => Arc::new(HfSpaceController::new(
            clients.hub()?,
            repo,
            *factory_reboot,
        )?),
        JobSpec::Command(config) => Arc::new(
            CommandSpace::new(command_spec(config), job_dir(clients.settings))?
                .with_scrubber(clients.scrubber.clone()),
        ),
        JobSpec::GithubWorkflow(_) | JobSpec::Worker(_) => {
            return Err(AdapterError::config(
                "prepare",
                "a GitHub workflow or a worker runs trainers only; a prepare job is a command or a Space",
            ))
        }
    })
}

fn trainer(clients: &mut Clients<'_>, spec: &JobSpec) -> Result<Arc<dyn Trainer>, AdapterError> {
    Ok(match spec {
        JobSpec::HfSpace {
            repo, wait_running, ..
        } => Arc::new(HfSpaceTrainer::new(clients.hub()?, repo, *wait_running)?),
        JobSpec::Command(config) => Arc::new(
            CommandTrainer::new(command_spec(config), job_dir(clients.settings))?
                .with_scrubber(clients.scrubber.clone()),
        ),
        JobSpec::GithubWorkflow(config) => {
            Arc::new(github_workflow_trainer(clients.settings, config)?)
        }
        JobSpec::Worker(config) => {
            let jobs = clients.jobs.clone().ok_or_else(|| {
                AdapterError::config(
                    "trainer",
                    "the worker trainer needs the run store's job queue",
                )
            })?;
            Arc::new(WorkerTrainer::new(jobs, config.clone()))
        }
    })
}

/// The job queue for worker trainers when the caller has none (the CLI): a
/// second handle on the same store. A private in-memory SQLite store cannot
/// be shared, so there it is refused.
async fn own_job_queue(settings: &Settings) -> Result<RemoteJobs, AdapterError> {
    let url = settings.state.expose_secret();
    if url.contains(":memory:") {
        return Err(AdapterError::config(
            "state",
            "the worker trainer needs a store that `retrain-server` shares (a SQLite file or Postgres), not an in-memory one",
        ));
    }
    let stores = open_stores(
        url,
        StoreOptions {
            migrate: false,
            read_only: false,
        },
    )
    .await?;
    Ok(RemoteJobs::new(stores.jobs))
}

fn github_workflow_trainer(
    settings: &Settings,
    config: &GithubWorkflowConfig,
) -> Result<GithubWorkflowTrainer, AdapterError> {
    let token = settings.github.token.clone().ok_or_else(|| {
        AdapterError::config(
            "github.token",
            format!(
                "the GitHub workflow trainer ({}) needs GITHUB_TOKEN (or [github] token) with `actions: write`",
                config.repo
            ),
        )
    })?;
    let trainer = GithubWorkflowTrainer::new(GithubWorkflowSettings {
        api_url: settings.github.api_url.clone(),
        token,
        repo: config.repo.clone(),
        workflow: config.workflow.clone(),
        git_ref: config.git_ref.clone(),
        inputs: config.inputs.clone(),
        policy: http_policy(settings),
    })?;
    Ok(match config.poll_interval {
        Some(interval) => trainer.with_poll_interval(interval),
        None => trainer,
    })
}

fn metadata_store(
    clients: &mut Clients<'_>,
    label: &LabelSettings,
) -> Result<Arc<dyn MetadataStore>, AdapterError> {
    let location = label.metadata.as_str();
    if location.starts_with("hf://")
        || location.starts_with("https://")
        || location.starts_with("http://")
    {
        return Ok(Arc::new(HfMetadataStore::from_url(
            clients.hub()?,
            location,
        )?));
    }
    if location.starts_with("s3://") {
        return aws_metadata_store(clients.settings, location);
    }
    Ok(Arc::new(FileMetadataStore::new(location)?))
}

fn registry(
    settings: &Settings,
    spec: &RegistrySpec,
) -> Result<Arc<dyn ModelRegistry>, AdapterError> {
    match spec {
        RegistrySpec::Json { path, model } => {
            Ok(Arc::new(JsonRegistry::open(path.clone(), model.clone())))
        }
        RegistrySpec::Mlflow { .. } => mlflow_registry(settings, spec),
    }
}

/// `cycles`: the engine runs cycles (which notify); `false` for `retrain
/// gate` and `infra reap`, which never do.
fn notifiers(
    settings: &Settings,
    label: &LabelSettings,
    cycles: bool,
) -> Result<Vec<Arc<dyn Notifier>>, AdapterError> {
    let mut out: Vec<Arc<dyn Notifier>> = vec![Arc::new(LogNotifier)];
    for spec in &label.notify {
        match spec {
            NotifySpec::Log => {}
            other => out.extend(remote_notifier(settings, label, other, cycles)?),
        }
    }
    Ok(out)
}

fn plan(settings: &Settings, label: &LabelSettings) -> LabelPlan {
    let trigger = if label.counts {
        Trigger::Counts {
            threshold: label.threshold,
            correct_ratio: label.correct_ratio,
        }
    } else {
        Trigger::Metadata {
            threshold: label.threshold,
        }
    };
    LabelPlan {
        label: label.label.clone(),
        trigger,
        prepare: label.prepare.as_ref().map(JobSpec::key),
        gate: label.gate.clone(),
        leased: label.lease.is_some(),
        promote: label.promote,
        max_attempts: label.max_attempts,
        max_step_retries: label.max_step_retries,
        poll_interval: label.poll_interval,
        poll_timeout: label.poll_timeout,
        dry_run: settings.dry_run,
        approval_expires: label.approval_expires,
        dataset_check: label.dataset_check.is_some(),
    }
}

/// Build the engine for `loaded` on `store`, for running cycles.
pub async fn build_engine(
    loaded: &LoadedSettings,
    store: Arc<dyn RunStore>,
) -> Result<Engine, AdapterError> {
    assemble_engine(loaded, store, None, true).await
}

/// [`build_engine`] with the job queue worker trainers enqueue into (the
/// server's, whose `lease-job` long polls wake on `jobs.enqueued`).
pub async fn build_engine_with_jobs(
    loaded: &LoadedSettings,
    store: Arc<dyn RunStore>,
    jobs: RemoteJobs,
) -> Result<Engine, AdapterError> {
    assemble_engine(loaded, store, Some(jobs), true).await
}

/// Build the engine for commands that never count (`retrain gate`,
/// `retrain infra reap`): the feedback database is not even connected to,
/// so its being down cannot block them.
pub async fn build_control_engine(
    loaded: &LoadedSettings,
    store: Arc<dyn RunStore>,
) -> Result<Engine, AdapterError> {
    assemble_engine(loaded, store, None, false).await
}

async fn assemble_engine(
    loaded: &LoadedSettings,
    store: Arc<dyn RunStore>,
    jobs: Option<RemoteJobs>,
    with_counts: bool,
) -> Result<Engine, AdapterError> {
    let settings = &loaded.settings;
    let counts: Option<Arc<dyn CountSource>> = match &settings.counts {
        Some(c) if with_counts && settings.labels.values().any(|l| l.counts) => Some(
            crate::counts::open_count_source(
                c.database.expose_secret(),
                &c.query,
                crate::counts::CountOptions {
                    statement_timeout: c.statement_timeout,
                    form: c.watermarks,
                    labels: settings
                        .labels
                        .iter()
                        .filter(|(_, l)| l.counts)
                        .map(|(label, _)| label.clone())
                        .collect(),
                },
            )
            .await? as Arc<dyn CountSource>,
        ),
        _ => None,
    };
    let needs_jobs = settings
        .labels
        .values()
        .any(|l| matches!(l.trainer, JobSpec::Worker(_)));
    let jobs = match jobs {
        Some(jobs) => Some(jobs),
        None if needs_jobs => Some(own_job_queue(settings).await?),
        None => None,
    };
    let mut clients = Clients {
        settings,
        hub: None,
        scrubber: job_scrubber(settings),
        jobs,
    };
    // One controller per prepare job so labels sharing it share its state.
    let mut prepares: std::collections::HashMap<String, Arc<dyn SpaceController>> =
        std::collections::HashMap::new();
    // One metadata store per file: labels reading the same file share its
    // last download and its request in flight (one read per poll round).
    let mut metadata: std::collections::HashMap<String, Arc<dyn MetadataStore>> =
        std::collections::HashMap::new();
    let mut bindings = Vec::new();
    for label in settings.labels.values() {
        let prepare = match &label.prepare {
            Some(spec) => {
                let key = spec.key();
                if let Some(existing) = prepares.get(&key) {
                    Some(existing.clone())
                } else {
                    let controller = prepare_controller(&mut clients, spec)?;
                    prepares.insert(key, controller.clone());
                    Some(controller)
                }
            }
            None => None,
        };
        let lease = match &label.lease {
            Some(spec) => Some(lease_provider(settings, label, spec)?),
            None => None,
        };
        bindings.push(LabelBinding {
            plan: plan(settings, label),
            metadata: match metadata.get(&label.metadata) {
                Some(existing) => existing.clone(),
                None => {
                    let store = metadata_store(&mut clients, label)?;
                    metadata.insert(label.metadata.clone(), store.clone());
                    store
                }
            },
            prepare,
            trainer: trainer(&mut clients, &label.trainer)?,
            registry: label
                .registry
                .as_ref()
                .map(|r| registry(settings, r))
                .transpose()?,
            lease,
            notifiers: notifiers(settings, label, with_counts)?,
            train_timeout: label.train_timeout,
            dataset_check: label
                .dataset_check
                .as_ref()
                .map(|config| -> Result<Arc<dyn DatasetCheck>, AdapterError> {
                    Ok(Arc::new(
                        CommandDatasetCheck::new(command_spec(config), job_dir(settings))?
                            .with_scrubber(clients.scrubber.clone()),
                    ))
                })
                .transpose()?,
        });
    }
    let engine_settings = EngineSettings {
        max_parallel_labels: settings.max_parallel_labels,
        lock_ttl: settings.lock_ttl,
        poll_jitter: settings.poll.jitter,
        poll_scout_max_gap: settings.poll.scout_max_gap,
        // Names this process (host, pid, start time), so that another
        // orchestrator on this host can take its locks at once if it dies.
        owner: LockOwner::for_process("retrain", &crate::process::current_identity()),
        manifest: RunManifest {
            binary_version: env!("CARGO_PKG_VERSION").to_owned(),
            config_hash: loaded.config_hash(),
            git_sha: crate::build_info::GIT_SHA.to_owned(),
            rustc_version: crate::build_info::RUSTC_VERSION.to_owned(),
            os: crate::build_info::os(),
            trainer: None,
            trainer_exit: None,
            triggered_by: None,
        },
    };
    Ok(Engine::new(store, counts, bindings, engine_settings))
}

// ---- AWS / MLflow / GitHub (see the modules for their behaviour) ----

fn aws_settings(
    settings: &Settings,
    region: Option<&str>,
) -> Result<crate::aws::AwsSettings, AdapterError> {
    let mut aws = crate::aws::AwsSettings::from_env()?;
    if let Some(r) = region
        .map(str::to_owned)
        .or_else(|| settings.aws.region.clone())
    {
        aws = aws.with_region(r);
    }
    if let Some(endpoint) = &settings.aws.endpoint_url {
        let url = url::Url::parse(endpoint)
            .map_err(|e| AdapterError::config("aws.endpoint_url", format!("not a URL: {e}")))?;
        aws = aws.with_endpoint(url);
    }
    Ok(aws)
}

fn aws_metadata_store(
    settings: &Settings,
    location: &str,
) -> Result<Arc<dyn MetadataStore>, AdapterError> {
    Ok(Arc::new(crate::s3::S3MetadataStore::new(
        aws_settings(settings, None)?,
        location,
    )?))
}

fn mlflow_registry(
    settings: &Settings,
    spec: &RegistrySpec,
) -> Result<Arc<dyn ModelRegistry>, AdapterError> {
    let RegistrySpec::Mlflow {
        tracking_uri,
        model,
        alias,
        stages,
    } = spec
    else {
        return Err(AdapterError::config("registry", "not an MLflow registry"));
    };
    let auth = match (
        &settings.mlflow.token,
        &settings.mlflow.username,
        &settings.mlflow.password,
    ) {
        (Some(token), _, _) => crate::mlflow::MlflowAuth::Token(token.clone()),
        (None, Some(user), Some(password)) => crate::mlflow::MlflowAuth::Basic {
            user: user.clone(),
            password: password.clone(),
        },
        _ => crate::mlflow::MlflowAuth::None,
    };
    Ok(Arc::new(crate::mlflow::MlflowRegistry::new(
        crate::mlflow::MlflowSettings {
            tracking_uri: tracking_uri.clone(),
            model: model.clone(),
            alias: alias.clone(),
            mode: if *stages {
                crate::mlflow::RegistryMode::Stage
            } else {
                crate::mlflow::RegistryMode::Alias
            },
            auth,
            policy: http_policy(settings),
        },
    )?))
}

fn lease_provider(
    settings: &Settings,
    label: &LabelSettings,
    spec: &LeaseSpec,
) -> Result<Arc<dyn LeaseProvider>, AdapterError> {
    let aws = aws_settings(settings, spec.region.as_deref()).map_err(|e| {
        AdapterError::config(format!("labels.{}.lease", label.label), e.to_string())
    })?;
    let client = crate::ec2::Ec2Client::new(&aws, http_policy(settings))?;
    Ok(Arc::new(crate::ec2::Ec2LeaseProvider::new(
        client,
        spec.ec2.clone(),
        spec.region.clone(),
        spec.health_url.clone(),
        spec.max,
        crate::ec2::Ec2WaitSettings::default(),
    )?))
}

fn remote_notifier(
    settings: &Settings,
    label: &LabelSettings,
    spec: &NotifySpec,
    cycles: bool,
) -> Result<Option<Arc<dyn Notifier>>, AdapterError> {
    let on = |on: &NotifyOn| match on {
        NotifyOn::Improved => crate::github::NotifyOn::Improved,
        NotifyOn::Always => crate::github::NotifyOn::Always,
    };
    match spec {
        NotifySpec::Log => Ok(Some(Arc::new(LogNotifier))),
        NotifySpec::Github {
            repo,
            on: when,
            issue,
            pr_head,
            pr_base,
            pr_triggering,
            approve,
            auto_merge,
            pr_file,
            app_login,
        } => {
            let token = settings.github.token.clone().ok_or_else(|| {
                AdapterError::config("github.token", "a GitHub notifier needs GITHUB_TOKEN")
            })?;
            let target = match (issue, pr_head, pr_triggering) {
                (Some(issue), _, _) => crate::github::GithubTarget::Comment { issue: *issue },
                (None, Some(head), _) => crate::github::GithubTarget::PullRequest {
                    head: head.clone(),
                    base: pr_base.clone(),
                    auto_merge: *auto_merge,
                    file: pr_file.clone(),
                },
                (None, None, true) => match crate::github::triggering_pull_request_from_env() {
                    Ok(number) => crate::github::GithubTarget::TriggeringPullRequest {
                        number,
                        approve: *approve,
                        auto_merge: *auto_merge,
                        file: pr_file.clone(),
                    },
                    // A dry run, `retrain gate` and `infra reap` notify
                    // nobody: they need not run on a pull request.
                    Err(e) if settings.dry_run || !cycles => {
                        tracing::debug!(label = %label.label, error = %e, "no triggering pull request: its notifier is left out (nothing here notifies)");
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                },
                (None, None, false) => {
                    return Err(AdapterError::config(
                        "notify",
                        "github needs issue, pr_head or pr = \"triggering\"",
                    ))
                }
            };
            let registry = label.registry.as_ref().map(|r| match r {
                RegistrySpec::Mlflow {
                    tracking_uri,
                    model,
                    alias,
                    stages,
                } => crate::github::RegistryRef {
                    kind: "mlflow".into(),
                    uri: public_uri(tracking_uri),
                    model: model.clone(),
                    alias: (!stages).then(|| alias.clone()),
                    stage: stages.then(|| alias.clone()),
                },
                RegistrySpec::Json { model, .. } => crate::github::RegistryRef {
                    kind: "json".into(),
                    uri: None,
                    model: model.clone(),
                    alias: None,
                    stage: None,
                },
            });
            let notifier = crate::github::GithubNotifier::new(crate::github::GithubSettings {
                api_url: settings.github.api_url.clone(),
                token,
                repo: repo.clone(),
                on: on(when),
                target,
                policy: http_policy(settings),
                registry,
                report_url: crate::github::actions_run_url_from_env(),
            })?;
            Ok(Some(Arc::new(match app_login {
                Some(login) => notifier.with_app_login(login.clone()),
                None => notifier,
            })))
        }
        NotifySpec::Webhook {
            url,
            slack,
            on: when,
        } => Ok(Some(Arc::new(
            crate::webhook::WebhookNotifier::with_policy(
                url.clone(),
                if *slack {
                    crate::webhook::WebhookFormat::Slack
                } else {
                    crate::webhook::WebhookFormat::Json
                },
                on(when),
                http_policy(settings),
            )?,
        ))),
    }
}

/// A registry address fit for a file committed to a repository: no user
/// info, query or fragment; `None` for an address templated on an ephemeral
/// instance (`http://{public_ip}:5000`) or one that is not a URL.
fn public_uri(raw: &str) -> Option<String> {
    if raw.contains('{') {
        return None;
    }
    let mut url = url::Url::parse(raw).ok()?;
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    Some(url.to_string())
}

/// `retrain infra start|stop --label L`: returns `(instance id, state)`.
pub async fn infra_control(
    settings: &Settings,
    label: &Label,
    start: bool,
) -> Result<Vec<(String, String)>, AdapterError> {
    let spec = lease_spec(settings, label)?;
    let client = crate::ec2::Ec2Client::new(
        &aws_settings(settings, spec.region.as_deref())?,
        http_policy(settings),
    )?;
    let result = if start {
        client.start_instances(&spec.ec2).await
    } else {
        client.stop_instances(&spec.ec2).await
    };
    result
        .map(|states| {
            states
                .into_iter()
                .map(|s| (s.instance_id, format!("{} (was {})", s.current, s.previous)))
                .collect()
        })
        .map_err(|e| AdapterError::Unavailable(e.to_string()))
}

/// `retrain infra status`: `(label, instance id, state)` for leased labels.
pub async fn infra_status(
    settings: &Settings,
    only: Option<&Label>,
) -> Result<Vec<(String, String, String)>, AdapterError> {
    let mut rows = Vec::new();
    for (label, label_settings) in &settings.labels {
        if only.is_some_and(|o| o != label) {
            continue;
        }
        let Some(spec) = &label_settings.lease else {
            continue;
        };
        let client = crate::ec2::Ec2Client::new(
            &aws_settings(settings, spec.region.as_deref())?,
            http_policy(settings),
        )?;
        let states = client
            .describe_instances(&spec.ec2)
            .await
            .map_err(|e| AdapterError::Unavailable(e.to_string()))?;
        for s in states {
            let ip = s.public_ip.map(|ip| format!(" {ip}")).unwrap_or_default();
            rows.push((label.to_string(), s.instance_id, format!("{}{ip}", s.state)));
        }
    }
    Ok(rows)
}

fn lease_spec<'a>(settings: &'a Settings, label: &Label) -> Result<&'a LeaseSpec, AdapterError> {
    settings
        .labels
        .get(label)
        .ok_or_else(|| AdapterError::config("--label", format!("unknown label `{label}`")))?
        .lease
        .as_ref()
        .ok_or_else(|| {
            AdapterError::config(
                format!("labels.{label}.lease"),
                "this label has no lease configured",
            )
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use retrain_core::domain::LockOutcome;
    use retrain_core::engine::CycleRequest;
    use retrain_core::mocks::MockRunStore;

    use super::*;
    use crate::settings::{load, ConfigSources};

    #[test]
    fn the_job_scrubber_knows_every_configured_secret() {
        let env = [
            ("HF_TOKEN", "hf_wired_secret_token"),
            ("PREPARE_DATASET_REPO", "owner/prep"),
            ("RETRAIN_DEPT_REPO", "owner/train"),
            (
                "HF_HUB_METADATA_DEPT",
                "https://huggingface.co/datasets/owner/d/resolve/main/dataset_metadata.json",
            ),
            (
                "DATABASE_URL",
                "postgresql+psycopg2://demo_user:wired_db_pass@db.example.com:5432/project_db",
            ),
            ("THRESHOLD_DEPARTMENT", "40"),
            (
                "RETRAIN_COUNTS__QUERY",
                "SELECT label, misclassified, correct FROM counts WHERE reviewed_at > $1",
            ),
        ];
        let loaded = load(&ConfigSources {
            file: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            overrides: Vec::new(),
        })
        .unwrap();
        let scrubber = job_scrubber(&loaded.settings);
        let out = scrubber.scrub("hf=hf_wired_secret_token db=wired_db_pass ok=department");
        assert_eq!(out, "hf=*** db=*** ok=department");
    }

    /// The engine locks labels as this process (so a contender on this
    /// host can take its locks at once if it dies), for the default TTL.
    #[tokio::test]
    async fn the_engine_locks_as_this_process_for_a_minute() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("retrain.toml");
        std::fs::write(
            &file,
            format!(
                "[labels.a]\nthreshold = 1\nmetadata = \"file://{}/meta.json\"\ntrainer = \"command:true\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let loaded = load(&ConfigSources {
            file: Some(file),
            env: Vec::new(),
            overrides: Vec::new(),
        })
        .unwrap();
        let locks = Arc::new(Mutex::new(Vec::new()));
        let mut store = MockRunStore::new();
        store.expect_try_lock().returning({
            let locks = locks.clone();
            move |_, owner, ttl| {
                locks.lock().unwrap().push((owner.clone(), ttl));
                Ok(LockOutcome::Busy {
                    owner: "someone-else".into(),
                    expires_at: chrono::Utc::now(),
                })
            }
        });
        let engine = build_engine(&loaded, Arc::new(store)).await.unwrap();
        engine
            .run_cycle(
                CycleRequest::default(),
                retrain_core::CancellationToken::new(),
            )
            .await
            .unwrap();
        let locks = locks.lock().unwrap();
        let (owner, ttl) = locks.first().expect("the engine locked the label");
        assert_eq!(*ttl, Duration::from_secs(60));
        assert!(owner.0.starts_with("retrain@"), "{owner}");
        assert_eq!(owner.process(), Some(crate::process::current_identity()));
    }
}

#[cfg(test)]
mod worker_wiring_tests {
    use super::*;
    use crate::settings::{load, ConfigSources};

    fn loaded(dir: &std::path::Path, state: &str) -> LoadedSettings {
        let file = dir.join("retrain.toml");
        std::fs::write(
            &file,
            format!(
                "state = \"{state}\"\n[labels.a]\nthreshold = 1\nmetadata = \"file://{}/meta.json\"\ntrainer = {{ worker = {{ gpu = 1, command = [\"python\", \"train.py\"] }} }}\n",
                dir.display()
            ),
        )
        .unwrap();
        load(&ConfigSources {
            file: Some(file),
            env: Vec::new(),
            overrides: Vec::new(),
        })
        .unwrap()
    }

    /// Without the server's queue the CLI opens one on the same store; a
    /// private in-memory store cannot be shared with a server and is
    /// refused, naming `state`.
    #[tokio::test]
    async fn the_worker_trainer_needs_a_shareable_store() {
        let dir = tempfile::tempdir().unwrap();
        let memory = loaded(dir.path(), "sqlite::memory:");
        let store = open_store(&memory.settings, true).await.unwrap();
        let err = build_engine(&memory, store).await.unwrap_err();
        assert!(err.to_string().contains("state"), "{err}");
        assert!(err.to_string().contains("in-memory"), "{err}");

        let url = format!("sqlite://{}/state.db", dir.path().display());
        let file = loaded(dir.path(), &url);
        let store = open_store(&file.settings, true).await.unwrap();
        build_engine(&file, store).await.unwrap();
    }
}
